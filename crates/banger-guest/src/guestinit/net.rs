//! The guest's network, set by `banger-init` before the system's init runs, so every image
//! (systemd or not, with or without `ip`) has its address, route and resolvers by the time
//! the agent reports ready: `banger.ip=ADDR/PREFIX banger.gw=GW banger.mac=MAC
//! banger.dns=A,B banger.hostname=NAME` from the kernel command line. Plain ioctls on an
//! `AF_INET` socket: the initrd has no `ip`.

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use super::putfile::put_file;

/// The network the host leased to this guest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetArgs {
    /// Address and prefix length.
    pub address: Option<(Ipv4Addr, u8)>,
    /// Default gateway.
    pub gateway: Option<Ipv4Addr>,
    /// The NIC to configure, by MAC address (lower case).
    pub mac: Option<String>,
    /// Name servers.
    pub dns: Vec<Ipv4Addr>,
    /// The host name.
    pub hostname: Option<String>,
}

/// The `banger.*` network arguments of a kernel command line.
pub fn parse(cmdline: &str) -> NetArgs {
    let mut n = NetArgs::default();
    for arg in cmdline.split_whitespace() {
        match arg.split_once('=') {
            Some(("banger.ip", v)) => {
                n.address = v
                    .split_once('/')
                    .and_then(|(a, p)| Some((a.parse().ok()?, p.parse().ok()?)))
                    .filter(|&(_, p): &(Ipv4Addr, u8)| (1..=32).contains(&p));
            }
            Some(("banger.gw", v)) => n.gateway = v.parse().ok(),
            Some(("banger.mac", v)) => n.mac = Some(v.to_ascii_lowercase()),
            Some(("banger.dns", v)) => {
                n.dns = v.split(',').filter_map(|a| a.parse().ok()).collect()
            }
            Some(("banger.hostname", v))
                if !v.is_empty()
                    && v.len() <= 63
                    && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
            {
                n.hostname = Some(v.into())
            }
            _ => {}
        }
    }
    n
}

/// The interface whose MAC is `mac` (any non-loopback one when `mac` is `None`), waiting up to
/// `wait` for its driver to create it.
pub fn find_interface(sys_net: &Path, mac: Option<&str>, wait: Duration) -> Option<String> {
    let deadline = Instant::now() + wait;
    loop {
        let mut names: Vec<(String, String)> = std::fs::read_dir(sys_net)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let addr = std::fs::read_to_string(e.path().join("address")).ok()?;
                Some((name, addr.trim().to_ascii_lowercase()))
            })
            .filter(|(name, _)| name != "lo")
            .collect();
        names.sort();
        let hit = match mac {
            Some(m) => names.into_iter().find(|(_, a)| a == m),
            None => names.into_iter().next(),
        };
        if let Some((name, _)) = hit {
            return Some(name);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[repr(C)]
struct IfReqAddr {
    name: [u8; libc::IFNAMSIZ],
    addr: libc::sockaddr_in,
    _pad: [u8; 8],
}

#[repr(C)]
struct IfReqHw {
    name: [u8; libc::IFNAMSIZ],
    addr: libc::sockaddr,
    _pad: [u8; 8],
}

#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// The kernel's `struct rtentry` (uapi linux/route.h).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr_in,
    rt_gateway: libc::sockaddr_in,
    rt_genmask: libc::sockaddr_in,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn sin(a: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn ifname(name: &str) -> Result<[u8; libc::IFNAMSIZ], String> {
    let mut n = [0u8; libc::IFNAMSIZ];
    if name.is_empty() || name.len() >= n.len() {
        return Err(format!("{name:?} is not an interface name"));
    }
    n[..name.len()].copy_from_slice(name.as_bytes());
    Ok(n)
}

struct Sock(libc::c_int);

impl Drop for Sock {
    fn drop(&mut self) {
        // SAFETY: closes the socket this value owns, once.
        unsafe { libc::close(self.0) };
    }
}

impl Sock {
    fn new() -> Result<Sock, String> {
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        Ok(Sock(fd))
    }

    fn ioctl<T>(&self, req: libc::c_ulong, arg: &mut T, what: &str) -> Result<(), String> {
        // SAFETY: every caller passes the structure the request expects, initialised and
        // alive for the call.
        if unsafe { libc::ioctl(self.0, req, arg as *mut T) } < 0 {
            return Err(format!("{what}: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn up(&self, name: &str) -> Result<(), String> {
        let mut r = IfReqFlags {
            name: ifname(name)?,
            flags: 0,
            _pad: [0; 22],
        };
        self.ioctl(libc::SIOCGIFFLAGS, &mut r, "get flags")?;
        r.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        self.ioctl(libc::SIOCSIFFLAGS, &mut r, &format!("bring {name} up"))
    }

    fn set_addr(&self, name: &str, req: libc::c_ulong, a: Ipv4Addr) -> Result<(), String> {
        let mut r = IfReqAddr {
            name: ifname(name)?,
            addr: sin(a),
            _pad: [0; 8],
        };
        self.ioctl(req, &mut r, &format!("set {a} on {name}"))
    }
}

/// Configures loopback and the leased NIC: address, netmask, up, default route. Returns the
/// interface's name.
pub fn configure(n: &NetArgs, sys_net: &Path, wait: Duration) -> Result<Option<String>, String> {
    if n.address.is_none() {
        Sock::new()?.up("lo")?;
        return Ok(None);
    }
    let dev = find_interface(sys_net, n.mac.as_deref(), wait).ok_or_else(|| {
        format!(
            "no network interface {} appeared; is virtio_net in the initrd?",
            n.mac.as_deref().unwrap_or("")
        )
    })?;
    address(&dev, n)?;
    Ok(Some(dev))
}

/// Gives interface `dev` the lease's address and netmask, brings it and loopback up and
/// routes through the lease's gateway.
pub fn address(dev: &str, n: &NetArgs) -> Result<(), String> {
    let sock = Sock::new()?;
    sock.up("lo")?;
    let Some((address, prefix)) = n.address else {
        return Ok(());
    };
    let mask = Ipv4Addr::from(if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    });
    sock.set_addr(dev, libc::SIOCSIFADDR, address)?;
    sock.set_addr(dev, libc::SIOCSIFNETMASK, mask)?;
    sock.up(dev)?;
    if let Some(gw) = n.gateway {
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sin(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sin(gw),
            rt_genmask: sin(Ipv4Addr::UNSPECIFIED),
            rt_flags: (libc::RTF_UP | libc::RTF_GATEWAY),
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: std::ptr::null_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        match sock.ioctl(libc::SIOCADDRT, &mut rt, "add the default route") {
            Err(e) if e.contains("File exists") => {}
            r => r?,
        }
    }
    Ok(())
}

/// Gives interface `dev` the MAC `mac` (`aa:bb:cc:dd:ee:ff`); the driver tells the device.
pub fn set_mac(dev: &str, mac: &str) -> Result<(), String> {
    let bytes: Vec<u8> = mac
        .split(':')
        .filter_map(|b| u8::from_str_radix(b, 16).ok())
        .collect();
    if bytes.len() != 6 {
        return Err(format!("bad MAC address {mac:?}"));
    }
    let sock = Sock::new()?;
    // SAFETY: sockaddr is plain data; zeroed is valid before the fields are set.
    let mut addr: libc::sockaddr = unsafe { std::mem::zeroed() };
    addr.sa_family = libc::ARPHRD_ETHER;
    for (d, b) in addr.sa_data.iter_mut().zip(&bytes) {
        *d = *b as libc::c_char;
    }
    let mut r = IfReqHw {
        name: ifname(dev)?,
        addr,
        _pad: [0; 8],
    };
    sock.ioctl(libc::SIOCSIFHWADDR, &mut r, &format!("set {dev}'s MAC"))
}

/// Writes what the new root needs to agree with the kernel's state: `/etc/resolv.conf` (a
/// symlink, e.g. to a resolved stub, is replaced), `/etc/hostname` and `/etc/hosts` (the
/// VM's name on 127.0.1.1); `/etc` is made when the image has none.
pub fn write_root_files(n: &NetArgs, root: &Path) -> Result<(), String> {
    let etc = root.join("etc");
    if !etc.is_dir() {
        std::fs::create_dir(&etc).map_err(|e| format!("cannot create /etc: {e}"))?;
    }
    if !n.dns.is_empty() {
        let text: String = n.dns.iter().map(|a| format!("nameserver {a}\n")).collect();
        put_file(
            &etc.join("resolv.conf"),
            &format!("# written by banger-init\n{text}"),
        )?;
    }
    if let Some(h) = &n.hostname {
        put_file(&etc.join("hostname"), &format!("{h}\n"))?;
    }
    // The name resolves to the guest itself, whatever the image shipped.
    let name = n.hostname.as_deref().unwrap_or("localhost");
    put_file(
        &etc.join("hosts"),
        &format!(
            "# written by banger-init\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{name}\n"
        ),
    )
}

/// Sets the kernel's host name.
pub fn set_hostname(name: &str) -> Result<(), String> {
    let c = CString::new(name).map_err(|e| e.to_string())?;
    // SAFETY: the pointer and length describe a live buffer.
    if unsafe { libc::sethostname(c.as_ptr(), name.len()) } < 0 {
        return Err(format!("sethostname: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Installs the VM's own SSH host key, which the host put on the work disk
/// (`/root/.banger/ssh_host_ed25519_key`), in place of every host key the image carries, so
/// no two VMs of one image share a key and the host knows the key it will see.
pub fn install_host_key(root: &Path) -> Result<bool, String> {
    let src = root.join("root/.banger/ssh_host_ed25519_key");
    let ssh = root.join("etc/ssh");
    if !src.exists() || !ssh.is_dir() {
        return Ok(false);
    }
    let fail = |e: std::io::Error| format!("cannot install the VM's SSH host key: {e}");
    for e in std::fs::read_dir(&ssh).map_err(fail)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("ssh_host_") && name.contains("_key") {
            std::fs::remove_file(e.path()).map_err(fail)?;
        }
    }
    use std::os::unix::fs::PermissionsExt;
    for (from, to, mode) in [
        (src.clone(), "ssh_host_ed25519_key", 0o600),
        (src.with_extension("pub"), "ssh_host_ed25519_key.pub", 0o644),
    ] {
        let dest = ssh.join(to);
        std::fs::copy(&from, &dest).map_err(fail)?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode)).map_err(fail)?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_gives_the_lease() {
        let n = parse(
            "console=ttyS0 banger.ip=172.30.99.2/24 banger.gw=172.30.99.1 \
             banger.mac=02:AB:cd:00:00:01 banger.dns=192.0.2.1,bogus,192.0.2.2 banger.hostname=web-1",
        );
        assert_eq!(n.address, Some((Ipv4Addr::new(172, 30, 99, 2), 24)));
        assert_eq!(n.gateway, Some(Ipv4Addr::new(172, 30, 99, 1)));
        assert_eq!(n.mac.as_deref(), Some("02:ab:cd:00:00:01"));
        assert_eq!(
            n.dns,
            vec![Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)]
        );
        assert_eq!(n.hostname.as_deref(), Some("web-1"));
        let bad = parse("banger.ip=1.2.3.4/40 banger.hostname=a/b");
        assert_eq!(bad, NetArgs::default());
    }

    #[test]
    fn the_nic_is_found_by_mac() {
        let tmp = tempfile::tempdir().unwrap();
        for (n, a) in [
            ("lo", "00:00:00:00:00:00"),
            ("eth0", "02:00:00:00:00:09"),
            ("eth1", "02:00:00:00:00:01"),
        ] {
            std::fs::create_dir(tmp.path().join(n)).unwrap();
            std::fs::write(tmp.path().join(n).join("address"), format!("{a}\n")).unwrap();
        }
        let f = |m| find_interface(tmp.path(), m, Duration::ZERO);
        assert_eq!(f(Some("02:00:00:00:00:01")).as_deref(), Some("eth1"));
        assert_eq!(f(None).as_deref(), Some("eth0"));
        assert_eq!(f(Some("02:00:00:00:00:02")), None);
    }

    #[test]
    fn root_files_replace_symlinks_and_host_keys_replace_the_images() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("etc/ssh")).unwrap();
        std::fs::create_dir_all(root.join("root/.banger")).unwrap();
        std::os::unix::fs::symlink(
            "/run/systemd/resolve/stub-resolv.conf",
            root.join("etc/resolv.conf"),
        )
        .unwrap();
        let n = parse("banger.dns=192.0.2.1 banger.hostname=box");
        write_root_files(&n, root).unwrap();
        let r = std::fs::read_to_string(root.join("etc/resolv.conf")).unwrap();
        assert!(r.contains("nameserver 192.0.2.1"), "{r}");
        assert!(!std::fs::symlink_metadata(root.join("etc/resolv.conf"))
            .unwrap()
            .is_symlink());
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "box\n"
        );
        let hosts = std::fs::read_to_string(root.join("etc/hosts")).unwrap();
        assert!(hosts.contains("127.0.0.1\tlocalhost\n"), "{hosts}");
        assert!(hosts.contains("127.0.1.1\tbox\n"), "{hosts}");
        // An image with no /etc gets one.
        let bare = tempfile::tempdir().unwrap();
        write_root_files(&n, bare.path()).unwrap();
        assert!(bare.path().join("etc/hosts").is_file());

        assert!(!install_host_key(root).unwrap(), "no key, nothing done");
        for f in ["ssh_host_rsa_key", "ssh_host_rsa_key.pub", "sshd_config"] {
            std::fs::write(root.join("etc/ssh").join(f), "image's").unwrap();
        }
        std::fs::write(root.join("root/.banger/ssh_host_ed25519_key"), "private").unwrap();
        std::fs::write(root.join("root/.banger/ssh_host_ed25519_key.pub"), "public").unwrap();
        assert!(install_host_key(root).unwrap());
        let mut left: Vec<String> = std::fs::read_dir(root.join("etc/ssh"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "ssh_host_ed25519_key",
                "ssh_host_ed25519_key.pub",
                "sshd_config"
            ]
        );
    }
}
