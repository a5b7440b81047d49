//! The agent's side of a restore: a VM restored from a snapshot runs its source's memory, so
//! it has its source's host name, address, MAC, keys, machine id, RNG state and a stale
//! clock until the host hands it its own, which this applies (plain syscalls and files: any
//! image, with or without `ip` or systemd).

use std::net::Ipv4Addr;
use std::path::Path;

use super::Identity;
use crate::guestinit::net;

/// Applies `id`; the first failure is the error (what went before stays applied).
pub fn apply(id: &Identity) -> Result<(), String> {
    set_clock(id.time_ns)?;
    reseed(&id.seed)?;
    let address = id
        .address
        .split_once('/')
        .and_then(|(a, p)| Some((a.parse::<Ipv4Addr>().ok()?, p.parse::<u8>().ok()?)))
        .ok_or_else(|| format!("bad address {:?}", id.address))?;
    let args = net::NetArgs {
        address: Some(address),
        gateway: id.gateway.parse().ok(),
        mac: None,
        dns: id.dns.iter().filter_map(|a| a.parse().ok()).collect(),
        hostname: Some(id.hostname.clone()),
    };
    net::set_hostname(&id.hostname)?;
    // The one NIC keeps its name; it gets the new MAC (the device learns it from the driver)
    // before its new address, so nothing leaves with the old pair once the host's walls know
    // only the new one.
    let dev = net::find_interface(Path::new("/sys/class/net"), None, std::time::Duration::ZERO)
        .ok_or("the VM has no network interface")?;
    net::set_mac(&dev, &id.mac)?;
    net::configure(
        &net::NetArgs {
            mac: Some(id.mac.to_ascii_lowercase()),
            ..args.clone()
        },
        Path::new("/sys/class/net"),
        std::time::Duration::from_secs(2),
    )?;
    net::write_root_files(&args, Path::new("/"))?;
    if Path::new("/etc/machine-id").exists() {
        replace(
            Path::new("/etc/machine-id"),
            format!("{}\n", id.machine_id).as_bytes(),
            0o444,
        )?;
    }
    if !id.host_key.is_empty() && Path::new("/etc/ssh").is_dir() {
        install_host_key(&id.host_key, &id.host_key_pub)?;
    }
    if !id.authorized_key.is_empty() {
        authorize(&id.authorized_key)?;
    }
    Ok(())
}

fn replace(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("banger-new");
    std::fs::write(&tmp, data)
        .and_then(|_| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)))
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn set_clock(ns: u64) -> Result<(), String> {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: ts is a valid timespec for the call's duration.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(format!(
            "cannot set the clock: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Mixes `hex` into the kernel's pool and credits it (RNDADDENTROPY), so two VMs restored
/// from one snapshot draw different numbers from here on.
fn reseed(hex: &str) -> Result<(), String> {
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    if bytes.len() < 16 {
        return Err("the seed is too short".into());
    }
    #[repr(C)]
    struct Entropy {
        count: libc::c_int,
        size: libc::c_int,
        buf: [u8; 64],
    }
    let mut e = Entropy {
        count: (bytes.len().min(64) * 8) as libc::c_int,
        size: bytes.len().min(64) as libc::c_int,
        buf: [0; 64],
    };
    e.buf[..bytes.len().min(64)].copy_from_slice(&bytes[..bytes.len().min(64)]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("cannot open /dev/urandom: {e}"))?;
    // RNDADDENTROPY = _IOW('R', 0x03, int[2])
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    use std::os::fd::AsRawFd;
    // SAFETY: e is a rand_pool_info with `size` bytes of buffer after its two ints.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, &e) } != 0 {
        return Err(format!(
            "cannot reseed: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Replaces every SSH host key with the VM's own, then has a running sshd take it (SIGHUP
/// makes sshd re-execute itself and read its keys again).
fn install_host_key(private: &str, public: &str) -> Result<(), String> {
    let ssh = Path::new("/etc/ssh");
    for e in std::fs::read_dir(ssh).map_err(|e| e.to_string())?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("ssh_host_") && name.contains("_key") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    replace(&ssh.join("ssh_host_ed25519_key"), private.as_bytes(), 0o600)?;
    replace(
        &ssh.join("ssh_host_ed25519_key.pub"),
        public.as_bytes(),
        0o644,
    )?;
    for pidfile in ["/run/sshd.pid", "/var/run/sshd.pid"] {
        if let Some(pid) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // SAFETY: kill takes no pointers.
            unsafe { libc::kill(pid, libc::SIGHUP) };
            break;
        }
    }
    Ok(())
}

fn authorize(key: &str) -> Result<(), String> {
    let dir = Path::new("/root/.ssh");
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let path = dir.join("authorized_keys");
    let mut text = std::fs::read_to_string(&path).unwrap_or_default();
    if !text.lines().any(|l| l.trim() == key.trim()) {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(key.trim());
        text.push('\n');
    }
    replace(&path, text.as_bytes(), 0o600)
}
