//! Persistent tap devices. The kernel creates taps only through `/dev/net/tun` (rtnetlink
//! refuses), so this is the one ioctl path; the rest of their life is netlink's.

use std::os::fd::AsRawFd;

use super::error::{failed, invalid};
use crate::Result;

/// VM taps are named `bgr<12 hex of the VM id>`.
pub const TAP_PREFIX: &str = "bgr";

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates persistent tap `name` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR), left down and
/// unattached, owned by uid 0: the VMM gets it open as a descriptor (`open_tap`), attached by
/// root without `CAP_NET_ADMIN`, and nobody else may attach to it.
pub fn create_tap(name: &str) -> Result<()> {
    let tun = tun_for(name)?;
    let fail = |e: std::io::Error| failed(format!("Cannot create tap {name}"), e);
    // SAFETY: TUNSETOWNER takes an integer argument; the fd is attached to the new tap.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETOWNER, 0 as libc::c_ulong) } < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    // SAFETY: TUNSETPERSIST takes an integer argument; the fd is attached to the new tap.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Gives existing tap `name` to `uid`, for a VMM that opens it by name as that uid
/// (Firecracker).
pub fn own_tap(name: &str, uid: u32) -> Result<()> {
    let tun = tun_for(name)?;
    // SAFETY: TUNSETOWNER takes an integer argument; the fd is attached to the tap.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETOWNER, uid as libc::c_ulong) } < 0 {
        return Err(failed(
            format!("Cannot give tap {name} to the VM"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Opens existing tap `name` (as the VMM would), for a VMM that gets it as a descriptor.
pub fn open_tap(name: &str) -> Result<std::os::fd::OwnedFd> {
    Ok(tun_for(name)?.into())
}

/// `/dev/net/tun` attached to tap `name` (created when it does not exist and the caller may).
fn tun_for(name: &str) -> Result<std::fs::File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        return Err(invalid(format!("{name:?} is not a tap name")));
    }
    let fail = |e: std::io::Error| failed(format!("Cannot open tap {name}"), e);
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(fail)?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `req` is a valid, initialised ifreq-sized buffer that outlives the call, and the
    // fd is the open tun control device.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    Ok(tun)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_never_reach_the_kernel() {
        for bad in ["", "a/b", "sixteen-chars-xx", "x y"] {
            assert!(create_tap(bad).is_err(), "{bad:?}");
        }
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
