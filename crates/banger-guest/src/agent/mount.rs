//! `mount`: a tmpfs the host asks for below a folder of the guest that is a container's root
//! (an OCI spec's `tmpfs` mounts: in the guest, so what is written there is the VM's memory and
//! no one else's), mounted in the agent's mount namespace, which the processes it starts later
//! see (a pod container's are copies of it). The destination resolves inside the root as if it
//! were `/` (`openat2` with `RESOLVE_IN_ROOT`: a symlink of the image's never takes it out),
//! folders made where missing. `unmount`: every mount below such a root, as its container goes.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

/// The longest option string a tmpfs mount is given.
const MAX_DATA: usize = 4096;

/// Mount flags and tmpfs data from an OCI mount's options; an option that is neither is
/// refused by name.
pub fn options(options: &[String]) -> Result<(libc::c_ulong, String), String> {
    let mut flags: libc::c_ulong = 0;
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= libc::MS_RDONLY,
            "nosuid" => flags |= libc::MS_NOSUID,
            "nodev" => flags |= libc::MS_NODEV,
            "noexec" => flags |= libc::MS_NOEXEC,
            "sync" => flags |= libc::MS_SYNCHRONOUS,
            "dirsync" => flags |= libc::MS_DIRSYNC,
            "noatime" => flags |= libc::MS_NOATIME,
            "nodiratime" => flags |= libc::MS_NODIRATIME,
            "relatime" => flags |= libc::MS_RELATIME,
            "strictatime" => flags |= libc::MS_STRICTATIME,
            // Defaults, propagation (the mount is the agent's, private to the guest) and
            // runc's copy-up of what the image had there (an empty tmpfs here).
            "rw" | "suid" | "dev" | "exec" | "atime" | "diratime" | "private" | "rprivate"
            | "shared" | "rshared" | "slave" | "rslave" | "unbindable" | "runbindable"
            | "tmpcopyup" => {}
            kv => match kv.split_once('=') {
                Some((
                    "size" | "nr_blocks" | "nr_inodes" | "mode" | "uid" | "gid" | "huge" | "mpol",
                    v,
                )) if !v.is_empty() && !v.contains(',') => data.push(kv),
                _ => {
                    return Err(format!(
                        "tmpfs option {o:?} is not one banger applies (flags such as nosuid, \
                         ro, noexec; size=, mode=, uid=, gid=, nr_inodes=)"
                    ))
                }
            },
        }
    }
    let data = data.join(",");
    if data.len() > MAX_DATA {
        return Err(format!("tmpfs options longer than {MAX_DATA} bytes"));
    }
    Ok((flags, data))
}

/// `destination` inside `root` as if it were `/`, folders made where missing, opened `O_PATH`;
/// a symlink at it that leads nowhere inside the root is refused.
fn folder(root: &Path, destination: &str) -> Result<OwnedFd, String> {
    let root_fd = std::fs::File::open(root)
        .map(OwnedFd::from)
        .map_err(|e| format!("{}: {e}", root.display()))?;
    crate::sys::in_root(&root_fd, destination, true, false)
        .map_err(|e| format!("mount destination {destination:?}: {e}"))
}

/// Mounts a tmpfs at `destination` inside `root` with the OCI `options`.
pub fn tmpfs(root: &Path, destination: &str, opts: &[String]) -> Result<(), String> {
    let (flags, data) = options(opts)?;
    let dir = folder(root, destination)?;
    let target = CString::new(format!("/proc/self/fd/{}", dir.as_raw_fd())).unwrap_or_default();
    let data = CString::new(data).map_err(|e| e.to_string())?;
    // SAFETY: NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("tmpfs at {destination}: {e}"));
    }
    Ok(())
}

/// A mount point as `/proc/self/mountinfo` writes it (spaces, tabs, newlines and backslashes
/// in octal).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount points strictly below `root` in `mountinfo`, longest first (so each goes before
/// the one it is below).
pub fn below(mountinfo: &str, root: &str) -> Vec<String> {
    let prefix = format!("{}/", root.trim_end_matches('/'));
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(unescape))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    points
}

/// Unmounts everything below `root` (not `/`): how many mounts went.
pub fn unmount_below(root: &Path) -> Result<usize, String> {
    let root = root.to_string_lossy();
    if root.trim_end_matches('/').is_empty() || !root.starts_with('/') {
        return Err(format!(
            "unmount below {root:?}: an absolute folder other than /"
        ));
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let mut n = 0;
    for p in below(&info, &root) {
        let Ok(c) = CString::new(p) else { continue };
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn oci_options_are_flags_and_tmpfs_data() {
        let (flags, data) = options(&strings(&[
            "nosuid",
            "nodev",
            "rprivate",
            "size=16m",
            "mode=1777",
            "ro",
        ]))
        .unwrap();
        assert_eq!(flags, libc::MS_NOSUID | libc::MS_NODEV | libc::MS_RDONLY);
        assert_eq!(data, "size=16m,mode=1777");
        for bad in ["remount", "size=1m,nr_inodes=2", "context=x", "size="] {
            let e = options(&strings(&[bad])).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn what_is_below_a_root_deepest_first() {
        let info = "22 1 0:20 / / rw - virtiofs root rw\n\
                    40 22 0:30 / /.banger/containers/a/tmp rw - tmpfs tmpfs rw\n\
                    41 40 0:31 / /.banger/containers/a/tmp/deep rw - tmpfs tmpfs rw\n\
                    42 22 0:32 / /.banger/containers/ab/tmp rw - tmpfs tmpfs rw\n\
                    43 22 0:33 / /.banger/containers/a/with\\040space rw - tmpfs tmpfs rw\n";
        assert_eq!(
            below(info, "/.banger/containers/a"),
            [
                "/.banger/containers/a/with space",
                "/.banger/containers/a/tmp/deep",
                "/.banger/containers/a/tmp"
            ]
        );
    }

    #[test]
    fn a_destination_stays_inside_its_root() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let inside =
            |fd: OwnedFd| std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        std::fs::create_dir(root.path().join("real")).unwrap();
        std::fs::create_dir(root.path().join("a")).unwrap();
        std::os::unix::fs::symlink("/real", root.path().join("a/link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).unwrap();
        std::os::unix::fs::symlink("../../..", root.path().join("up")).unwrap();
        // A symlink resolves as in the container: from its root.
        let made = inside(folder(root.path(), "/a/link/sub").unwrap());
        assert_eq!(made, root.path().join("real/sub"));
        let made = inside(folder(root.path(), "/up/tmp2").unwrap());
        assert_eq!(made, root.path().join("tmp2"));
        // One that leads out (dangling inside) is refused, and nothing is made outside.
        let tried = ["/escape/sub", "/a/../b", "/", "/escape"];
        for t in tried {
            assert!(folder(root.path(), t).is_err(), "{t}");
        }
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }
}
