//! The OCI spec's bind mounts (`config.json`'s `mounts`: CRI's `/etc/hosts`, `/etc/hostname`,
//! `/etc/resolv.conf`, a pod's volumes, `ctr run --mount`), bound below a container's root on
//! the host before the guest sees it: the root is served to the VM over virtio-fs, whose server
//! sees what is bound there (a container of a pod: its root is below the pod sandbox's shared
//! rootfs mount). Destinations are resolved inside the root as if it were `/` (`openat2` with
//! `RESOLVE_IN_ROOT`): the root is the image's, and a symlink of the image's never takes a mount
//! out of it onto the host. What the guest mounts itself (`/proc`, `/dev`, `/sys` and below)
//! is left to it; tmpfs mounts ([`tmpfs`]) are made by the guest's agent, in the VM's memory;
//! other mount types (mqueue, …) are not applied.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use serde_json::Value;

/// One bind mount of the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub source: String,
    pub destination: String,
    pub read_only: bool,
}

/// The spec's bind mounts this shim applies, in order.
pub fn binds(config: &Value) -> Vec<Bind> {
    config["mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let options: Vec<&str> = m["options"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let bind = m["type"] == "bind" || options.iter().any(|o| *o == "bind" || *o == "rbind");
            let destination = m["destination"].as_str()?;
            let source = m["source"].as_str()?;
            (bind && !guests_own(destination)).then(|| Bind {
                source: source.to_owned(),
                destination: destination.to_owned(),
                read_only: options.contains(&"ro"),
            })
        })
        .collect()
}

/// Whether `destination` is where the guest mounts its own (`/proc`, `/sys`, `/dev`).
fn guests_own(destination: &str) -> bool {
    ["/proc", "/sys", "/dev"]
        .iter()
        .any(|g| destination == *g || destination.starts_with(&format!("{g}/")))
}

/// One tmpfs mount of the spec, which the guest's agent makes (its memory is the VM's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tmpfs {
    pub destination: String,
    pub options: Vec<String>,
}

/// The spec's tmpfs mounts the agent makes, in order.
pub fn tmpfs(config: &Value) -> Vec<Tmpfs> {
    config["mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["type"] == "tmpfs")
        .filter_map(|m| {
            let destination = m["destination"].as_str()?;
            (!guests_own(destination)).then(|| Tmpfs {
                destination: destination.to_owned(),
                options: m["options"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|o| o.as_str().map(str::to_owned))
                    .collect(),
            })
        })
        .collect()
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x04;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
const MOUNT_ATTR_RDONLY: u64 = 0x1;

/// The kernel's `struct mount_attr` (linux/mount.h).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A copy of the mount tree at `source` (`open_tree(OPEN_TREE_CLONE | AT_RECURSIVE)`),
/// read-only throughout when `read_only`, attached on `target`. Made read-only before it is
/// attached, so the copies that propagate to the VM's file server are read-only too (a remount
/// after would change this namespace's mount alone).
fn bind_onto(source: &str, target: &OwnedFd, read_only: bool) -> io::Result<()> {
    let src = CString::new(source).map_err(io::Error::other)?;
    let fail = |r: libc::c_long| {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    // SAFETY: a NUL-terminated path; plain flags.
    let tree = fail(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_RECURSIVE as libc::c_uint,
        )
    })?;
    // SAFETY: the kernel just returned this descriptor to us alone.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
    let empty = c"";
    if read_only {
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_RDONLY,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        // SAFETY: an open mount descriptor, an empty path with AT_EMPTY_PATH, and a mount_attr
        // of the size given, outliving the call.
        fail(unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                empty.as_ptr(),
                (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        })?;
    }
    // SAFETY: two open descriptors and empty paths with the EMPTY_PATH flags.
    fail(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            target.as_raw_fd(),
            empty.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    })?;
    Ok(())
}

/// Binds each of `binds` below `root`; the first that cannot be is the error, naming it.
pub fn apply(binds: &[Bind], root: &Path) -> io::Result<()> {
    let dir = CString::new(root.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            dir.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ours alone.
    let rootfd = unsafe { OwnedFd::from_raw_fd(fd) };
    for b in binds {
        let named = |e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("mount {} on {}: {e}", b.source, b.destination),
            )
        };
        let is_dir = std::fs::metadata(&b.source).map_err(named)?.is_dir();
        let at =
            banger_guest::sys::in_root(&rootfd, &b.destination, is_dir, true).map_err(named)?;
        bind_onto(&b.source, &at, b.read_only).map_err(named)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_binds_outside_the_guests_own_folders_are_taken() {
        let spec = json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev/shm", "type": "bind", "source": "/run/x/shm", "options": ["rbind"]},
            {"destination": "/etc/hosts", "type": "bind", "source": "/run/x/hosts", "options": ["rbind", "rw"]},
            {"destination": "/data", "type": "none", "source": "/srv/d", "options": ["bind", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/devices", "type": "bind", "source": "/srv/e"},
        ]});
        assert_eq!(
            binds(&spec),
            [
                Bind {
                    source: "/run/x/hosts".into(),
                    destination: "/etc/hosts".into(),
                    read_only: false
                },
                Bind {
                    source: "/srv/d".into(),
                    destination: "/data".into(),
                    read_only: true
                },
                Bind {
                    source: "/srv/e".into(),
                    destination: "/devices".into(),
                    read_only: false
                },
            ]
        );
        let spec = json!({"mounts": [
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["mode=755"]},
            {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "size=65536k"]},
            {"destination": "/data", "type": "bind", "source": "/srv/d"},
        ]});
        assert_eq!(
            tmpfs(&spec),
            [Tmpfs {
                destination: "/run".into(),
                options: vec!["nosuid".into(), "size=65536k".into()]
            }]
        );
    }
}
