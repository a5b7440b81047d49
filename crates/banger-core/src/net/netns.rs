//! A VM's network in a namespace it is given (CreateVM `netns`, as containerd's CNI plugins
//! make one per pod): its tap is made in that namespace and wired to the namespace's `eth0`
//! both ways by tc (an ingress qdisc on each and a match-all u32 filter that redirects every
//! frame to the other's egress, the model Kata Containers calls `tcfilter`), and the guest
//! takes eth0's IPv4 address, MAC and default route. Frames for eth0's address and MAC reach
//! the guest, and the guest's leave through eth0 as the namespace's own would; the
//! namespace's owner (a CNI plugin) decides what it reaches. banger's bridge, walls and leases
//! are not involved.
//!
//! A thread enters the namespace (`setns` changes only the calling thread's): it creates the
//! tap and the netlink socket there, and the socket keeps speaking to that namespace wherever
//! it is polled. The thread ends right after, so no thread of the daemon's stays inside.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use futures_util::TryStreamExt;

use super::error::{failed, invalid};
use super::{errno, fresh_tap, link_index, remove_link, tap};
use crate::Result;

/// The interface of the namespace the guest takes over (CNI's name for a pod's).
pub const POD_IF: &str = "eth0";

const NSFS_MAGIC: i64 = 0x6e73_6673;
/// `_IO(0xb7, 0x3)` (linux/nsfs.h).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// What the guest takes from the namespace's `eth0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLink {
    /// Its IPv4 address.
    pub address: Ipv4Addr,
    /// The address's prefix length.
    pub prefix: u8,
    /// The namespace's default gateway, if it has one.
    pub gateway: Option<Ipv4Addr>,
    /// eth0's MAC address (the guest NIC's, so that frames for it reach the guest).
    pub mac: String,
}

/// Opens network namespace `path` and checks it is one: a namespace file (nsfs), of a
/// network namespace, and not the daemon's own (a tap wired to the host's own `eth0` would
/// take the host's network away).
pub fn open_netns(path: &str) -> Result<OwnedFd> {
    let f = std::fs::File::open(path).map_err(|e| {
        invalid(format!(
            "netns (--netns): cannot open {path} ({e}); give a network namespace such as \
             /run/netns/NAME"
        ))
    })?;
    let fd = f.as_raw_fd();
    // SAFETY: statfs is plain data, valid all zero.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs fills the struct it is given; `fd` is open.
    let statted = unsafe { libc::fstatfs(fd, &mut sfs) };
    if statted < 0 || sfs.f_type as i64 != NSFS_MAGIC {
        return Err(invalid(format!(
            "netns (--netns): {path} is not a namespace file; give a network namespace such \
             as /run/netns/NAME or /proc/PID/ns/net"
        )));
    }
    // SAFETY: NS_GET_NSTYPE takes no argument; `fd` is an nsfs file.
    let kind = unsafe { libc::ioctl(fd, NS_GET_NSTYPE) };
    if kind != libc::CLONE_NEWNET {
        return Err(invalid(format!(
            "netns (--netns): {path} is a namespace, but not a network namespace"
        )));
    }
    let id = |m: &std::fs::Metadata| {
        use std::os::unix::fs::MetadataExt;
        (m.dev(), m.ino())
    };
    let own = std::fs::metadata("/proc/self/ns/net")
        .map_err(|e| failed("Cannot read /proc/self/ns/net", e))?;
    let given = f
        .metadata()
        .map_err(|e| failed(format!("Cannot stat {path}"), e))?;
    if id(&own) == id(&given) {
        return Err(invalid(format!(
            "netns (--netns): {path} is bangerd's own network namespace; give the VM a \
             namespace of its own (leave netns out for banger's network)"
        )));
    }
    Ok(f.into())
}

/// Runs `f` on a thread of its own inside namespace `path`.
async fn in_netns<T, F>(path: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let ns = open_netns(path)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let shown = path.to_owned();
    std::thread::Builder::new()
        .name("banger-netns".into())
        .spawn(move || {
            // SAFETY: setns with an open network namespace fd changes this thread's alone.
            let r = if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                Err(failed(
                    format!("Cannot enter the network namespace {shown}"),
                    std::io::Error::last_os_error(),
                ))
            } else {
                f()
            };
            let _ = tx.send(r);
        })
        .map_err(|e| failed("Cannot start a thread", e))?;
    rx.await
        .map_err(|e| failed("The network namespace's thread died", e))?
}

/// A netlink connection inside namespace `path`, and the task that drives it.
async fn netlink_in(path: &str) -> Result<(rtnetlink::Handle, tokio::task::JoinHandle<()>)> {
    let rt = tokio::runtime::Handle::current();
    let (conn, handle, _) = in_netns(path, move || {
        // The socket registers with the runtime's reactor as it is made.
        let _entered = rt.enter();
        rtnetlink::new_connection().map_err(|e| failed("Cannot open netlink", e))
    })
    .await?;
    Ok((handle, tokio::spawn(conn)))
}

/// Opens tap `name` in namespace `path` (for a VMM the daemon starts itself).
pub async fn open_tap_in(path: &str, name: &str) -> Result<OwnedFd> {
    let name = name.to_owned();
    in_netns(path, move || tap::open_tap(&name)).await
}

/// Makes tap `tap` in namespace `path` and wires it to the namespace's `eth0` both ways;
/// returns what the guest takes from eth0. A tap of that name left from before (a VMM that
/// died with its host) is replaced, and so is eth0's ingress wiring.
pub async fn attach_in(path: &str, tap: &str) -> Result<PodLink> {
    let (h, task) = netlink_in(path).await?;
    let r = wire(&h, path, tap).await;
    task.abort();
    r
}

async fn wire(h: &rtnetlink::Handle, path: &str, name: &str) -> Result<PodLink> {
    let (pod, mtu, link) = pod_link(h, path).await?;
    let t = name.to_owned();
    let made = in_netns(path, move || tap::create_tap(&t));
    let tap = fresh_tap(h, name, &format!("{name} in {path}"), made).await?;
    let fail = |what: String, e: rtnetlink::Error| failed(format!("{what} in {path}"), e);
    h.link()
        .set(
            rtnetlink::LinkUnspec::new_with_index(tap)
                .mtu(mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(|e| fail(format!("Cannot bring tap {name} up"), e))?;
    // eth0's ingress qdisc is rebuilt (it may redirect to an earlier tap of this VM's).
    unwire(h, link).await;
    for (from, to, what) in [(link, tap, POD_IF), (tap, link, name)] {
        h.qdisc()
            .add(from as i32)
            .ingress()
            .execute()
            .await
            .map_err(|e| fail(format!("Cannot add an ingress qdisc to {what}"), e))?;
        h.traffic_filter(from as i32)
            .add()
            .parent(0xffff_0000)
            // Network byte order, as the kernel reads it (tc's `protocol all`).
            .protocol((libc::ETH_P_ALL as u16).to_be())
            .redirect(to)
            .map_err(|e| fail(format!("Cannot build the redirect of {what}"), e))?
            .execute()
            .await
            .map_err(|e| fail(format!("Cannot redirect {what}'s frames"), e))?;
    }
    Ok(pod)
}

/// eth0's address, gateway and MAC, its MTU and index.
async fn pod_link(h: &rtnetlink::Handle, path: &str) -> Result<(PodLink, u32, u32)> {
    use rtnetlink::packet_route::address::AddressAttribute;
    use rtnetlink::packet_route::link::LinkAttribute;
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader};
    let fail = |what: &str, e: rtnetlink::Error| failed(format!("Cannot read {what} in {path}"), e);
    let mut links = h.link().get().match_name(POD_IF.to_owned()).execute();
    let link = match links.try_next().await {
        Ok(Some(m)) => m,
        Ok(None) => None.ok_or_else(|| no_pod_if(path))?,
        Err(e) if errno(&e) == Some(libc::ENODEV) => return Err(no_pod_if(path)),
        Err(e) => return Err(fail(POD_IF, e)),
    };
    let index = link.header.index;
    let mut mac = String::new();
    let mut mtu = 1500;
    for a in &link.attributes {
        match a {
            LinkAttribute::Address(b) if b.len() == 6 => {
                mac = b
                    .iter()
                    .map(|x| format!("{x:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            }
            LinkAttribute::Mtu(m) => mtu = *m,
            _ => {}
        }
    }
    let mut address = None;
    let mut addrs = h.address().get().set_link_index_filter(index).execute();
    while let Some(m) = addrs
        .try_next()
        .await
        .map_err(|e| fail("eth0's addresses", e))?
    {
        for a in &m.attributes {
            if let AddressAttribute::Address(std::net::IpAddr::V4(v4)) = a {
                address = address.or(Some((*v4, m.header.prefix_len)));
            }
        }
    }
    let Some((address, prefix)) = address else {
        return Err(invalid(format!(
            "netns (--netns): {POD_IF} in {path} has no IPv4 address; configure the \
             namespace's network (a CNI plugin does) before the VM starts"
        )));
    };
    let mut gateway = None;
    let mut routes = h
        .route()
        .get(rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(m) = routes.try_next().await.map_err(|e| fail("routes", e))? {
        let main = m.header.table == RouteHeader::RT_TABLE_MAIN
            || m.attributes.iter().any(|a| {
                matches!(a, RouteAttribute::Table(t) if *t == u32::from(RouteHeader::RT_TABLE_MAIN))
            });
        if !main || m.header.destination_prefix_length != 0 {
            continue;
        }
        for a in &m.attributes {
            if let RouteAttribute::Gateway(RouteAddress::Inet(g)) = a {
                gateway = gateway.or(Some(*g));
            }
        }
    }
    if mac.is_empty() {
        return Err(invalid(format!(
            "netns (--netns): {POD_IF} in {path} has no Ethernet address"
        )));
    }
    Ok((
        PodLink {
            address,
            prefix,
            gateway,
            mac,
        },
        mtu,
        index,
    ))
}

fn no_pod_if(path: &str) -> crate::Error {
    invalid(format!(
        "netns (--netns): {path} has no {POD_IF}; the VM takes over the namespace's {POD_IF} \
         (a CNI plugin makes it)"
    ))
}

/// Removes link `index`'s ingress qdisc and with it its filters; fine when it has none.
async fn unwire(h: &rtnetlink::Handle, index: u32) {
    use rtnetlink::packet_route::tc::TcHandle;
    let mut req = h.qdisc().del(index as i32);
    req.message_mut().header.parent = TcHandle::INGRESS;
    req.message_mut().header.handle = TcHandle::from(0xffff_0000);
    let _ = req.execute().await;
}

/// Removes tap `tap` from namespace `path` and eth0's wiring to it; fine when the namespace
/// is gone (its taps went with it) or the tap is.
pub async fn detach_in(path: &str, tap: &str) -> Result<()> {
    if std::fs::metadata(path).is_err() {
        return Ok(());
    }
    let (h, task) = netlink_in(path).await?;
    let r = async {
        remove_link(&h, tap, &format!("tap {tap} in {path}")).await?;
        if let Some(link) = link_index(&h, POD_IF).await? {
            unwire(&h, link).await;
        }
        Ok(())
    }
    .await;
    task.abort();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_another_network_namespace_is_taken() {
        for (path, says) in [
            ("/nonexistent/ns", "cannot open"),
            ("/etc/passwd", "not a namespace file"),
            ("/proc/self/ns/uts", "not a network namespace"),
            ("/proc/self/ns/net", "bangerd's own"),
        ] {
            let e = open_netns(path).unwrap_err().to_string();
            assert!(e.contains(says), "{path}: {e}");
        }
    }
}
