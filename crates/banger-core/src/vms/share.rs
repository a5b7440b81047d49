//! Shared folders (`CreateVM` option `shares a(ssb)`, CLI `--share HOSTDIR:GUESTDIR[:ro]`):
//! a host folder the guest mounts through virtio-fs. Each share is served by a `virtiofsd`
//! of its own that runs as the VM's **owner** (uid, primary group and groups from the
//! password database), never as root: the kernel checks every access the guest makes against
//! the owner's own rights, and virtiofsd's namespace sandbox (a user namespace of the owner's,
//! the folder as its root) keeps the guest inside the folder. The guest's root is the owner
//! in the folder (`--translate-uid map:0:UID:1`), so files the guest makes are the owner's.
//!
//! The daemon never opens the folder: at create (and again at every start) it is checked on
//! a thread carrying the owner's file-system credentials (`callerfile::as_caller`), which
//! must find a directory the owner owns or may write; virtiofsd then opens it as the owner.

use std::path::{Component, Path, PathBuf};

use super::error::{failed, invalid};
use crate::Result;

pub use crate::model::{share_tag as tag, Share, MAX_SHARES, ROOT_TAG};

impl Share {
    /// As the CLI writes it: `HOSTDIR:GUESTDIR[:ro]`.
    pub fn spec(&self) -> String {
        format!(
            "{}:{}{}",
            self.host,
            self.guest,
            if self.read_only { ":ro" } else { "" }
        )
    }

    /// Parses the CLI's `HOSTDIR:GUESTDIR[:ro|:rw]` (the host path as given; the CLI makes
    /// it absolute).
    pub fn parse_cli(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            invalid(format!(
                "share {s:?}: {why}; write HOSTDIR:GUESTDIR[:ro], e.g. ./src:/src or \
                 /srv/data:/data:ro"
            ))
        };
        let (rest, read_only) = match s.rsplit_once(':') {
            Some((r, "ro")) => (r, true),
            Some((r, "rw")) => (r, false),
            _ => (s, false),
        };
        let Some((host, guest)) = rest.rsplit_once(':') else {
            return Err(bad("no guest folder"));
        };
        if host.is_empty() || guest.is_empty() {
            return Err(bad("a folder is empty"));
        }
        Ok(Share {
            host: host.into(),
            guest: guest.into(),
            read_only,
        })
    }
}

/// The kernel command line's part for a VM's shares: `banger.share=TAG:GUESTDIR[:ro]` each.
pub fn cmdline(shares: &[Share]) -> String {
    shares
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                " banger.share={}:{}{}",
                tag(i),
                s.guest,
                if s.read_only { ":ro" } else { "" }
            )
        })
        .collect()
}

/// Guest folders a share may not cover: what every guest's base is made of.
const RESERVED: &[&str] = &["/", "/dev", "/proc", "/sys", "/run", "/root", "/tmp"];

/// Checks a guest mount point: absolute, plain (it travels on the kernel command line), no
/// `..`, not one of the guest's base folders.
fn check_guest(dir: &str) -> Result<()> {
    let plain = dir
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._+-@".contains(c));
    let normal = Path::new(dir)
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    let dots = dir.split('/').any(|p| p == "." || p == "..");
    if !dir.starts_with('/') || !plain || !normal || dots || dir.len() > 200 || dir.contains("//") {
        return Err(invalid(format!(
            "share: guest folder {dir:?} must be an absolute path of letters, digits and \
             /._+-@ without . or .. parts"
        )));
    }
    let d = dir.trim_end_matches('/');
    if RESERVED.contains(&if d.is_empty() { "/" } else { d }) {
        return Err(invalid(format!(
            "share: guest folder {dir:?} is part of every guest's base; pick another, e.g. /mnt/share"
        )));
    }
    Ok(())
}

/// Whether a host folder's path can be named to the folder's server as it is: no whitespace,
/// quotes, backslashes, `%` or control characters (systemd's unit settings split and expand
/// on them).
fn plain_host_path(p: &str) -> bool {
    !p.chars()
        .any(|c| c.is_whitespace() || c.is_control() || "\"'\\%".contains(c))
}

/// Refuses a host folder whose path [`plain_host_path`] does not accept; `what` names the
/// option (`share`, `rootfs_dir`).
fn check_host(p: &str, what: &str) -> Result<()> {
    if plain_host_path(p) {
        return Ok(());
    }
    let verb = verb(what);
    Err(invalid(format!(
        "{what}: host folder {p:?} has whitespace, quotes, a backslash, % or a control \
         character in its path, which banger cannot hand to the folder's server; {verb} a \
         folder whose path has none"
    )))
}

/// What a refusal asks the caller to do with another folder, by option.
fn verb(what: &str) -> &'static str {
    if what == "share" {
        "share"
    } else {
        "give"
    }
}

/// Checks a VM's share list without touching the host: at most [`MAX_SHARES`], host folders
/// absolute, guest folders well formed and each used once.
pub fn check(list: &[Share]) -> Result<()> {
    if list.len() > MAX_SHARES {
        return Err(invalid(format!(
            "share: at most {MAX_SHARES} shared folders a VM, not {}",
            list.len()
        )));
    }
    for (i, s) in list.iter().enumerate() {
        if !s.host.starts_with('/') || s.host.contains('\0') || s.host.len() > 4096 {
            return Err(invalid(format!(
                "share: host folder {:?} must be an absolute path",
                s.host
            )));
        }
        check_host(&s.host, "share")?;
        check_guest(&s.guest)?;
        let g = s.guest.trim_end_matches('/');
        if list[..i].iter().any(|o| o.guest.trim_end_matches('/') == g) {
            return Err(invalid(format!("share: guest folder {g} is given twice")));
        }
    }
    Ok(())
}

/// Checks each host folder with `uid`'s own rights and returns the shares with the folders'
/// resolved paths: each must be a directory that `uid` owns or may write. Runs on a thread
/// carrying `uid`'s file-system credentials; the daemon's own rights never apply.
pub async fn verify(uid: u32, shares: Vec<Share>) -> Result<Vec<Share>> {
    if shares.is_empty() {
        return Ok(shares);
    }
    tokio::task::spawn_blocking(move || {
        crate::callerfile::as_caller(uid, move || {
            shares
                .into_iter()
                .map(|s| {
                    let host = resolved_folder(uid, &s.host, "share")?;
                    Ok(Share { host, ..s })
                })
                .collect()
        })
    })
    .await
    .map_err(|e| failed("Share check task failed", e))?
}

/// A VM's root folder (`rootfs_dir`), checked as a share's folder is (with `uid`'s own
/// rights: a directory `uid` owns or may write), resolved.
pub async fn verify_root(uid: u32, dir: String) -> Result<String> {
    tokio::task::spawn_blocking(move || {
        crate::callerfile::as_caller(uid, move || {
            let real = resolved_folder(uid, &dir, "rootfs_dir")?;
            if real == "/" {
                return Err(invalid(
                    "rootfs_dir: the host's own root cannot be a guest's; give a folder of its own",
                ));
            }
            Ok(real)
        })
    })
    .await
    .map_err(|e| failed("Root folder check task failed", e))?
}

/// [`verify_folder`], and the resolved path as the folder's server is handed it: UTF-8 and
/// plain ([`check_host`]).
fn resolved_folder(uid: u32, path: &str, what: &str) -> Result<String> {
    let real = verify_folder(uid, Path::new(path), what)?;
    let real = real.to_str().map(str::to_owned).ok_or_else(|| {
        invalid(format!(
            "{what}: host folder {path} resolves to a path that is not UTF-8"
        ))
    })?;
    check_host(&real, what)?;
    Ok(real)
}

/// One folder, with the calling thread's credentials: resolved, a directory, owned by
/// `uid` or writable (an unnamed temporary file made and dropped there proves it, so ACLs
/// and read-only mounts count; where the file system cannot make one, the mode bits decide).
fn verify_folder(uid: u32, path: &Path, what: &str) -> Result<PathBuf> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let shown = path.display();
    let refuse = |why: String| {
        let verb = verb(what);
        invalid(format!(
            "{what}: {shown} {why}; {verb} a folder of yours (or one you may write)"
        ))
    };
    let real =
        std::fs::canonicalize(path).map_err(|e| refuse(format!("cannot be reached ({e})")))?;
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(&real)
        .map_err(|e| refuse(format!("cannot be opened as a folder ({e})")))?;
    let meta = dir
        .metadata()
        .map_err(|e| refuse(format!("cannot be inspected ({e})")))?;
    if meta.uid() == uid {
        return Ok(real);
    }
    let dot = c".";
    // SAFETY: the descriptor is open and the path NUL-terminated; O_TMPFILE makes an unnamed
    // file that is gone when closed.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            dot.as_ptr(),
            libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd >= 0 {
        // SAFETY: fd was just opened here and is closed once.
        unsafe { libc::close(fd) };
        return Ok(real);
    }
    let err = std::io::Error::last_os_error();
    let unsupported = matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
    );
    if unsupported && writable_by_mode(&meta, uid) {
        return Ok(real);
    }
    Err(refuse(format!(
        "is not yours (owner uid {}) and you cannot write it",
        meta.uid()
    )))
}

/// Whether the mode bits let `uid`, which does not own `meta`, write and enter it.
fn writable_by_mode(meta: &std::fs::Metadata, uid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.mode();
    let in_group = crate::callerfile::creds(uid)
        .map(|c| c.gid == meta.gid() || c.groups.contains(&meta.gid()))
        .unwrap_or(false);
    if in_group {
        mode & 0o030 == 0o030
    } else {
        mode & 0o003 == 0o003
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(host: &str, guest: &str) -> Share {
        Share {
            host: host.into(),
            guest: guest.into(),
            read_only: false,
        }
    }

    #[test]
    fn the_cli_form_parses_and_round_trips() {
        let s = Share::parse_cli("/home/a/src:/src:ro").unwrap();
        assert_eq!(
            (s.host.as_str(), s.guest.as_str(), s.read_only),
            ("/home/a/src", "/src", true)
        );
        assert_eq!(s.spec(), "/home/a/src:/src:ro");
        let s = Share::parse_cli("./x:/mnt/x").unwrap();
        assert!(!s.read_only);
        assert_eq!(Share::parse_cli("a:b:rw").unwrap().guest, "b");
        for bad in ["/only", ":/x", "/x:", "/x::ro"] {
            assert!(Share::parse_cli(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn guest_folders_must_be_plain_and_not_the_base() {
        for good in ["/src", "/mnt/project-1", "/home/dev/work_2"] {
            check(&[share("/h", good)]).unwrap();
        }
        for bad in [
            "src",
            "/",
            "/proc",
            "/root/",
            "/a/../etc",
            "/a b",
            "/a,b",
            "/x\n",
            "/./x",
            "//x",
        ] {
            let e = check(&[share("/h", bad)]).unwrap_err().to_string();
            assert!(e.contains("share"), "{bad}: {e}");
        }
        let e = check(&[share("/a", "/x"), share("/b", "/x/")]).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        assert!(check(&[share("rel", "/x")]).is_err());
        for bad_host in ["/a b", "/a\"b", "/a%h", "/a\\b", "/a\tb"] {
            let e = check(&[share(bad_host, "/x")]).unwrap_err().to_string();
            assert!(e.contains("whitespace, quotes"), "{bad_host}: {e}");
        }
        check(&[share("/home/dev/src-1_2.x@y,z:w", "/x")]).unwrap();
        let many: Vec<Share> = (0..=MAX_SHARES)
            .map(|i| share("/h", &format!("/m{i}")))
            .collect();
        assert!(check(&many).unwrap_err().to_string().contains("at most"));
    }

    #[test]
    fn the_command_line_names_tags_in_order() {
        let mut b = share("/b", "/data");
        b.read_only = true;
        assert_eq!(
            cmdline(&[share("/a", "/src"), b]),
            " banger.share=share0:/src banger.share=share1:/data:ro"
        );
    }

    #[test]
    fn a_folder_is_checked_with_the_callers_rights() {
        // Root's own check: a directory is fine, a file or a missing path is refused with
        // what to do.
        let tmp = tempfile::tempdir().unwrap();
        // SAFETY: getuid has no arguments and cannot fail.
        let me = unsafe { libc::getuid() };
        assert!(verify_folder(me, tmp.path(), "share").is_ok());
        let f = tmp.path().join("file");
        std::fs::write(&f, b"").unwrap();
        let e = verify_folder(me, &f, "share").unwrap_err().to_string();
        assert!(
            e.contains("as a folder") && e.contains("share a folder"),
            "{e}"
        );
        let e = verify_folder(me, &tmp.path().join("nope"), "share")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be reached"), "{e}");
    }
}
