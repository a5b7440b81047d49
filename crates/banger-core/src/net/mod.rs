//! The host side of guest networking (a service of docs/ARCHITECTURE.md's map): the `banger0`
//! bridge whose address is the guests' gateway, a tap per VM on it, and forwarding plus
//! masquerade in an nftables table of banger's own (`table inet banger`). Links and routes go through netlink; the nft table is
//! written whole in one transaction (through libnftables, else `nft -f -`) and never touches another table.
//!
//! Everything is created on demand (the first VM's `network` stage) and removed when the last
//! running VM is gone, so a host with no VMs carries nothing of banger's.

mod error;
pub mod netns;
mod nftlib;
mod tap;

pub use error::NetError;

use std::net::Ipv4Addr;

use async_trait::async_trait;
use futures_util::TryStreamExt;

use crate::{Error, Result};
use error::{failed, invalid};

pub use tap::{create_tap, open_tap, own_tap, TAP_PREFIX};

/// The bridge banger owns.
pub const BRIDGE: &str = "banger0";
pub mod walls;

/// The nftables tables banger owns (`inet banger` and `bridge banger`).
pub const NFT_TABLE: &str = "banger";

/// An IPv4 subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    /// The network address.
    pub network: Ipv4Addr,
    /// The prefix length.
    pub prefix: u8,
}

impl Subnet {
    /// The subnet `network/prefix`, host bits cleared.
    pub fn new(network: Ipv4Addr, prefix: u8) -> Self {
        Subnet {
            network: Ipv4Addr::from(u32::from(network) & mask(prefix)),
            prefix,
        }
    }

    /// The first host address, the bridge's and the guests' gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Whether the two share any address.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        let m = mask(self.prefix.min(other.prefix));
        u32::from(self.network) & m == u32::from(other.network) & m
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

/// A route of the host's main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Its destination.
    pub dest: Subnet,
    /// The interface it leaves through.
    pub dev: String,
}

/// The first route `subnet` would collide with, ignoring default routes and banger's bridge.
pub fn colliding_route<'a>(subnet: &Subnet, routes: &'a [Route]) -> Option<&'a Route> {
    routes
        .iter()
        .find(|r| r.dest.prefix > 0 && r.dev != BRIDGE && r.dest.overlaps(subnet))
}

/// The clear error for a collision, naming the way out.
pub fn collision_error(subnet: &Subnet, route: &Route) -> Error {
    invalid(format!(
        "The guest subnet {subnet} overlaps the host route {} (dev {}); set `subnet` in \
         /etc/banger/config.toml to a free range and restart bangerd",
        route.dest, route.dev
    ))
}

/// The IPv4 routes of the main table, through netlink.
pub async fn host_routes() -> Result<Vec<Route>> {
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader};
    let fail = |e: rtnetlink::Error| failed("Cannot read the host's routes (netlink)", e);
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| failed("Cannot open netlink", e))?;
    let task = tokio::spawn(conn);
    let names = link_names(&handle).await?;
    let mut out = Vec::new();
    let mut dump = handle
        .route()
        .get(rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(m) = dump.try_next().await.map_err(fail)? {
        let mut table = u32::from(m.header.table);
        let mut dest = Ipv4Addr::UNSPECIFIED;
        let mut dev = String::new();
        for a in &m.attributes {
            match a {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Destination(RouteAddress::Inet(d)) => dest = *d,
                RouteAttribute::Oif(i) => dev = names.get(i).cloned().unwrap_or_default(),
                _ => {}
            }
        }
        if table == u32::from(RouteHeader::RT_TABLE_MAIN) {
            out.push(Route {
                dest: Subnet::new(dest, m.header.destination_prefix_length),
                dev,
            });
        }
    }
    task.abort();
    Ok(out)
}

async fn link_names(handle: &rtnetlink::Handle) -> Result<std::collections::HashMap<u32, String>> {
    use rtnetlink::packet_route::link::LinkAttribute;
    let mut names = std::collections::HashMap::new();
    let mut links = handle.link().get().execute();
    while let Some(m) = links
        .try_next()
        .await
        .map_err(|e| failed("Cannot list the host's links (netlink)", e))?
    {
        for a in &m.attributes {
            if let LinkAttribute::IfName(n) = a {
                names.insert(m.header.index, n.clone());
            }
        }
    }
    Ok(names)
}

/// The subnet guests get: the configured one, checked against the host's routes. When the
/// configuration keeps the default and it collides, the next free /24 of 172.30.0.0/16.
pub async fn choose_subnet(configured: Subnet, is_default: bool) -> Result<Subnet> {
    let routes = host_routes().await?;
    pick_subnet(configured, is_default, &routes)
}

fn pick_subnet(configured: Subnet, is_default: bool, routes: &[Route]) -> Result<Subnet> {
    let Some(hit) = colliding_route(&configured, routes) else {
        return Ok(configured);
    };
    if is_default {
        let base = u32::from(configured.network);
        for i in 1..=255u32 {
            let candidate = Subnet::new(Ipv4Addr::from(base.wrapping_add(i << 8)), 24);
            if u32::from(candidate.network) >> 16 != u32::from(Ipv4Addr::new(172, 30, 0, 0)) >> 16 {
                break;
            }
            if colliding_route(&candidate, routes).is_none() {
                return Ok(candidate);
            }
        }
    }
    Err(collision_error(&configured, hit))
}

/// The resolvers a guest should use: the host's, without loopback stubs (systemd-resolved's
/// upstream list replaces its 127.0.0.53 stub).
pub fn host_resolvers() -> Vec<Ipv4Addr> {
    let parse = |path: &str| -> Vec<Ipv4Addr> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|a| a.trim().parse().ok())
            .collect()
    };
    let usable = |v: Vec<Ipv4Addr>| -> Vec<Ipv4Addr> {
        v.into_iter()
            .filter(|a| !a.is_loopback() && !a.is_unspecified())
            .take(3)
            .collect()
    };
    let direct = usable(parse("/etc/resolv.conf"));
    if !direct.is_empty() {
        return direct;
    }
    usable(parse("/run/systemd/resolve/resolv.conf"))
}

/// What a guest's network bootstrap needs, passed on its kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNet {
    /// The guest's address.
    pub address: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix: u8,
    /// The default gateway (a namespace given to the VM may have none).
    pub gateway: Option<Ipv4Addr>,
    /// Name servers.
    pub dns: Vec<Ipv4Addr>,
    /// The guest NIC's MAC address.
    pub mac: String,
}

impl GuestNet {
    /// `banger.ip=… banger.gw=… [banger.dns=a,b] banger.mac=…`
    pub fn cmdline(&self) -> String {
        let mut s = format!("banger.ip={}/{}", self.address, self.prefix);
        if let Some(gw) = self.gateway {
            s.push_str(&format!(" banger.gw={gw}"));
        }
        s.push_str(&format!(" banger.mac={}", self.mac));
        if !self.dns.is_empty() {
            let dns: Vec<String> = self.dns.iter().map(|a| a.to_string()).collect();
            s.push_str(&format!(" banger.dns={}", dns.join(",")));
        }
        s
    }
}

/// The host network as the VM service uses it: a small trait so unit tests run without
/// touching any interface.
#[async_trait]
pub trait HostNet: Send + Sync {
    /// The subnet guests are in.
    fn subnet(&self) -> Result<Subnet>;

    /// Brings the bridge up (idempotent), writes the walls for `ports` (which include the
    /// new guest's), then puts a fresh tap `tap` on the bridge.
    async fn attach(&self, tap: &str, ports: &[walls::GuestPort]) -> Result<()>;

    /// Removes the tap (fine when it is already gone) and rewrites the walls for the guests
    /// that remain, `ports`.
    async fn detach(&self, tap: &str, ports: &[walls::GuestPort]) -> Result<()>;

    /// Removes the bridge and banger's nft tables; fine when they are gone.
    async fn teardown(&self) -> Result<()>;

    /// Writes the walls again for the guests `ports` alone, when the bridge is up (a
    /// restarted daemon's repair: a daemon killed between removing a tap and rewriting the
    /// walls left them naming it). (Stand-ins have no walls.)
    async fn rewrite_walls(&self, ports: &[walls::GuestPort]) -> Result<()> {
        let _ = ports;
        Ok(())
    }

    /// Removes banger's taps (`bgr` and 12 hex digits) whose name is not in `keep`: taps a
    /// killed daemon left between making one and recording its VM as started. Returns the
    /// names removed. (Stand-ins have no taps.)
    async fn remove_stray_taps(&self, keep: &[String]) -> Result<Vec<String>> {
        let _ = keep;
        Ok(Vec::new())
    }
}

/// Whether `name` is a tap banger makes (`bgr` and the first 12 hex digits of a VM's id).
pub fn is_banger_tap(name: &str) -> bool {
    name.strip_prefix("bgr")
        .is_some_and(|h| h.len() == 12 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The real host network: `banger0` and `table inet banger` in the daemon's network namespace.
pub struct Bridge {
    subnet: std::result::Result<Subnet, String>,
    allow: Vec<walls::Egress>,
}

impl Bridge {
    /// A bridge for `subnet`, or one that refuses every VM with the start-up check's error;
    /// guests may reach the `allow`ed ranges (the operator's `allow_egress`) although they
    /// are private.
    pub fn new(subnet: Result<Subnet>, allow: Vec<walls::Egress>) -> Self {
        Bridge {
            subnet: subnet.map_err(|e| e.full_message()),
            allow,
        }
    }

    fn walls(&self, subnet: Subnet) -> walls::Walls {
        walls::Walls {
            subnet,
            allow: self.allow.clone(),
            resolvers: host_resolvers(),
        }
    }

    async fn ensure_bridge(&self, handle: &rtnetlink::Handle, subnet: Subnet) -> Result<u32> {
        let fail = |what: &str, e: rtnetlink::Error| {
            failed(format!("Cannot {what} bridge {BRIDGE} (netlink)"), e)
        };
        let index = match link_index(handle, BRIDGE).await? {
            Some(i) => i,
            None => {
                match handle
                    .link()
                    .add(rtnetlink::LinkBridge::new(BRIDGE).build())
                    .execute()
                    .await
                {
                    Ok(()) => {}
                    Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                    Err(e) => return Err(fail("create", e)),
                }
                link_index(handle, BRIDGE).await?.ok_or_else(|| {
                    failed(
                        format!("Cannot create bridge {BRIDGE}"),
                        std::io::Error::other("it vanished"),
                    )
                })?
            }
        };
        match handle
            .address()
            .add(index, std::net::IpAddr::V4(subnet.gateway()), subnet.prefix)
            .execute()
            .await
        {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(e) => return Err(fail("address", e)),
        }
        handle
            .link()
            .set(rtnetlink::LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| fail("bring up", e))?;
        Ok(index)
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// Tells the host's neighbour table the guest's MAC for its address on the bridge. The
/// address may have been another VM's a moment ago (leases are reused, and a VM restored
/// from a snapshot changes its MAC): with that VM's MAC still cached, the host's first
/// packets to the new guest would go nowhere until a probe found the change, a second or
/// more for the first TCP connection. banger hands out both, so it states the pair itself.
async fn learn_neighbour(
    h: &rtnetlink::Handle,
    bridge: u32,
    guest: &walls::GuestPort,
) -> Result<()> {
    use rtnetlink::packet_route::neighbour::NeighbourState;
    let mac = parse_mac(&guest.mac)
        .ok_or_else(|| invalid(format!("{:?} is not a MAC address", guest.mac)))?;
    h.neighbours()
        .add(bridge, std::net::IpAddr::V4(guest.address))
        .link_layer_address(&mac)
        .state(NeighbourState::Reachable)
        .replace()
        .execute()
        .await
        .map_err(|e| {
            failed(
                format!(
                    "Cannot set the neighbour entry of {} on {BRIDGE}",
                    guest.address
                ),
                e,
            )
        })
}

/// `02:ab:…` as six bytes.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

async fn link_index(handle: &rtnetlink::Handle, name: &str) -> Result<Option<u32>> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(m)) => Ok(Some(m.header.index)),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(failed(format!("Cannot look up link {name}"), e)),
    }
}

/// Removes link `name` (`what` in the error); fine when it is gone.
async fn remove_link(h: &rtnetlink::Handle, name: &str, what: &str) -> Result<()> {
    if let Some(i) = link_index(h, name).await? {
        match h.link().del(i).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::ENODEV) => {}
            Err(e) => return Err(failed(format!("Cannot remove {what}"), e)),
        }
    }
    Ok(())
}

/// Tap `name` made afresh by `make` (a tap of that name a VMM left when it died with the host
/// is removed first); its index. `what` names it in the error.
async fn fresh_tap(
    h: &rtnetlink::Handle,
    name: &str,
    what: &str,
    make: impl std::future::Future<Output = Result<()>>,
) -> Result<u32> {
    if let Some(old) = link_index(h, name).await? {
        let _ = h.link().del(old).execute().await;
    }
    make.await?;
    link_index(h, name).await?.ok_or_else(|| {
        failed(
            format!("Cannot create tap {what}"),
            std::io::Error::other("it vanished"),
        )
    })
}

async fn with_netlink<T, F, Fut>(f: F) -> Result<T>
where
    F: FnOnce(rtnetlink::Handle) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| failed("Cannot open netlink", e))?;
    let task = tokio::spawn(conn);
    let r = f(handle).await;
    task.abort();
    r
}

/// Runs `script` as one nftables transaction: through libnftables ([`nftlib`]), else the
/// `nft` program.
async fn nft(script: &str) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let owned = script.to_owned();
    match tokio::task::spawn_blocking(move || nftlib::run(&owned))
        .await
        .map_err(|e| failed("nft task failed", e))?
    {
        Some(Ok(())) => return Ok(()),
        Some(Err(e)) => return Err(failed("nft failed", std::io::Error::other(e))),
        None => {}
    }
    let program = crate::host::find_program("nft").ok_or_else(|| {
        failed(
            "nft is not installed",
            std::io::Error::other("apt-get install nftables"),
        )
    })?;
    let mut child = tokio::process::Command::new(program)
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| failed("Cannot run nft", e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|e| failed("Cannot feed nft", e))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| failed("Cannot run nft", e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(
            "nft failed",
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        ))
    }
}

/// Turns IPv4 forwarding on (guests reach beyond the host only with it). The systemd unit
/// does it before the sandbox makes `/proc/sys` read-only; elsewhere banger does it here. A
/// refusal costs the guests their way out, not their boot: it is logged with the fix.
fn enable_forwarding() {
    const KNOB: &str = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(KNOB).is_ok_and(|v| v.trim() == "1") {
        return;
    }
    if let Err(e) = std::fs::write(KNOB, "1") {
        tracing::warn!(
            "Cannot enable IPv4 forwarding ({e}): guests reach the host and each other but \
             nothing beyond; run `sysctl -w net.ipv4.ip_forward=1`"
        );
    }
}

#[async_trait]
impl HostNet for Bridge {
    fn subnet(&self) -> Result<Subnet> {
        self.subnet.clone().map_err(invalid)
    }

    async fn attach(&self, tap: &str, ports: &[walls::GuestPort]) -> Result<()> {
        let subnet = self.subnet()?;
        // Bridge first: the tables never exist without it (teardown keys on the bridge).
        // The walls go up before the tap does: no frame of the guest's passes unwalled.
        let bridge = with_netlink(|h| async move { self.ensure_bridge(&h, subnet).await }).await?;
        nft(&self.walls(subnet).ruleset(ports)).await?;
        enable_forwarding();
        let guest = ports.iter().find(|p| p.tap == tap).cloned();
        with_netlink(|h| async move {
            let t = tap.to_owned();
            let made = async {
                tokio::task::spawn_blocking(move || create_tap(&t))
                    .await
                    .map_err(|e| failed("Tap task failed", e))?
            };
            let index = fresh_tap(&h, tap, tap, made).await?;
            h.link()
                .set(
                    rtnetlink::LinkUnspec::new_with_index(index)
                        .controller(bridge)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| failed(format!("Cannot put tap {tap} on {BRIDGE}"), e))?;
            if let Some(g) = guest {
                learn_neighbour(&h, bridge, &g).await?;
            }
            Ok(())
        })
        .await
    }

    async fn detach(&self, tap: &str, ports: &[walls::GuestPort]) -> Result<()> {
        let bridge = with_netlink(|h| async move {
            remove_link(&h, tap, &format!("tap {tap}")).await?;
            link_index(&h, BRIDGE).await
        })
        .await?;
        // Without the bridge the tables are gone too (teardown), and stay gone.
        if let (Some(_), Ok(subnet)) = (bridge, self.subnet()) {
            nft(&self.walls(subnet).ruleset(ports)).await?;
        }
        Ok(())
    }

    async fn rewrite_walls(&self, ports: &[walls::GuestPort]) -> Result<()> {
        let bridge = with_netlink(|h| async move { link_index(&h, BRIDGE).await }).await?;
        if let (Some(_), Ok(subnet)) = (bridge, self.subnet()) {
            nft(&self.walls(subnet).ruleset(ports)).await?;
        }
        Ok(())
    }

    async fn remove_stray_taps(&self, keep: &[String]) -> Result<Vec<String>> {
        let keep = keep.to_vec();
        with_netlink(|h| async move {
            let mut removed = Vec::new();
            for (index, name) in link_names(&h).await? {
                if !is_banger_tap(&name) || keep.contains(&name) {
                    continue;
                }
                match h.link().del(index).execute().await {
                    Ok(()) => removed.push(name),
                    Err(e) if errno(&e) == Some(libc::ENODEV) => {}
                    Err(e) => return Err(failed(format!("Cannot remove tap {name}"), e)),
                }
            }
            Ok(removed)
        })
        .await
    }

    async fn teardown(&self) -> Result<()> {
        // The table comes up with the bridge: no bridge, nothing to do (and no nft process
        // on every daemon start of a host without VMs).
        let bridge = with_netlink(|h| async move { link_index(&h, BRIDGE).await }).await?;
        if bridge.is_none() {
            return Ok(());
        }
        nft(&format!(
            "table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n\
             table bridge {NFT_TABLE}\ndelete table bridge {NFT_TABLE}\n"
        ))
        .await?;
        with_netlink(|h| async move { remove_link(&h, BRIDGE, &format!("bridge {BRIDGE}")).await })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Subnet {
        let (a, p) = s.split_once('/').unwrap();
        Subnet::new(a.parse().unwrap(), p.parse().unwrap())
    }

    fn route(s: &str, dev: &str) -> Route {
        Route {
            dest: net(s),
            dev: dev.into(),
        }
    }

    #[test]
    fn only_taps_of_bangers_naming_are_swept() {
        assert!(is_banger_tap("bgr0123456789ab"));
        for other in [
            "bgr",
            "bgr0123456789a",
            "bgr0123456789abc",
            "bgrplanted12",
            "banger0",
            "tap0",
            "bgr0123456789aX",
        ] {
            assert!(!is_banger_tap(other), "{other}");
        }
    }

    #[test]
    fn macs_parse_whole_or_not_at_all() {
        assert_eq!(
            parse_mac("02:37:b1:4D:7a:0b"),
            Some([0x02, 0x37, 0xb1, 0x4d, 0x7a, 0x0b])
        );
        for bad in [
            "02:37:b1:4d:7a",
            "02:37:b1:4d:7a:0b:00",
            "02:37:b1:4d:7a:zz",
            "",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn overlap_is_symmetric_and_exact() {
        assert!(net("10.0.0.0/8").overlaps(&net("10.1.2.0/24")));
        assert!(net("10.1.2.0/24").overlaps(&net("10.0.0.0/8")));
        assert!(!net("10.1.2.0/24").overlaps(&net("10.1.3.0/24")));
        assert!(net("10.1.2.77/24").overlaps(&net("10.1.2.128/25")));
        assert_eq!(
            net("172.30.99.7/24").gateway(),
            Ipv4Addr::new(172, 30, 99, 1)
        );
    }

    #[test]
    fn collisions_ignore_default_routes_and_our_bridge() {
        let s = net("172.30.99.0/24");
        let routes = vec![
            route("0.0.0.0/0", "eth0"),
            route("172.30.99.0/24", BRIDGE),
            route("192.168.1.0/24", "eth0"),
        ];
        assert_eq!(colliding_route(&s, &routes), None);
        let routes = vec![route("172.30.0.0/16", "wg0")];
        let e = pick_subnet(s, false, &routes).unwrap_err().to_string();
        assert!(
            e.contains("172.30.0.0/16") && e.contains("wg0") && e.contains("subnet"),
            "{e}"
        );
    }

    #[test]
    fn the_default_moves_to_a_free_slash_24_and_a_configured_one_does_not() {
        let s = net("172.30.99.0/24");
        let routes = vec![
            route("172.30.99.0/24", "docker0"),
            route("172.30.100.0/23", "x"),
        ];
        assert_eq!(
            pick_subnet(s, true, &routes).unwrap(),
            net("172.30.102.0/24")
        );
        assert!(pick_subnet(s, false, &routes).is_err());
        let all = vec![route("172.30.0.0/16", "vpn")];
        assert!(pick_subnet(s, true, &all).is_err());
    }

    #[test]
    fn the_guest_cmdline_carries_address_gateway_dns_and_mac() {
        let g = GuestNet {
            address: Ipv4Addr::new(172, 30, 99, 2),
            prefix: 24,
            gateway: Some(Ipv4Addr::new(172, 30, 99, 1)),
            dns: vec![Ipv4Addr::new(192, 0, 2, 53), Ipv4Addr::new(192, 0, 2, 54)],
            mac: "02:aa:bb:cc:dd:ee".into(),
        };
        assert_eq!(
            g.cmdline(),
            "banger.ip=172.30.99.2/24 banger.gw=172.30.99.1 banger.mac=02:aa:bb:cc:dd:ee \
             banger.dns=192.0.2.53,192.0.2.54"
        );
    }
}
