//! Unpacking a tar stream that came out of a guest (`banger vm cp VM:SRC DST`) as input from
//! an attacker: whoever runs the copy (root too) gets plain files, directories and links that
//! stay inside what was copied, and nothing else. Modes lose setuid, setgid and sticky (as
//! `cp` without `-p` does); devices, FIFOs, sockets, hard links and links that leave the copy
//! are skipped and reported; every directory is walked with `O_NOFOLLOW` from the
//! destination's descriptor, so no link (the guest's or one already on the host) is followed
//! or replaced.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// What an unpack left out, for the user to be told.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Skipped {
    /// Entries that were not a file, a directory or a link inside the copy: `path (why)`.
    pub entries: Vec<String>,
    /// Files and directories whose setuid, setgid or sticky bit was dropped.
    pub modes_masked: usize,
}

fn err(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::other(msg.into())
}

fn cstr(name: &std::ffi::OsStr) -> std::io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| err("a name with a NUL byte"))
}

fn last_error<T>() -> std::io::Result<T> {
    Err(std::io::Error::last_os_error())
}

/// Opens directory `name` under `dir` without following a link.
fn open_dir_at(dir: &OwnedFd, name: &CString) -> std::io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated and `dir` a live descriptor; the result is checked.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_RDONLY,
        )
    };
    if fd < 0 {
        return last_error();
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens an existing directory path (the user's destination, which may pass links the user
/// made: their own choice) as the root of the copy.
fn open_root(path: &Path) -> std::io::Result<OwnedFd> {
    let c = cstr(path.as_os_str())?;
    // SAFETY: `c` is NUL-terminated; the result is checked.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_RDONLY,
        )
    };
    if fd < 0 {
        return last_error();
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes directory `name` under `dir` (private until its mode is set at the end) unless a
/// directory is there; a link or a file there is refused.
fn make_dir_at(dir: &OwnedFd, name: &CString) -> std::io::Result<()> {
    // SAFETY: as in open_dir_at.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o700) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EEXIST) {
        return Err(e);
    }
    // Opening it with O_NOFOLLOW|O_DIRECTORY tells a directory from a link or a file.
    open_dir_at(dir, name).map(|_| ())
}

/// The relative path of an entry, or why it is refused: no absolute paths, no `..`.
fn relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// Whether a link at `at` (relative to the copy's root) pointing to `target` resolves inside
/// the copy, lexically (the copy holds no link that is followed on the way).
fn link_stays_inside(at: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: i64 = at.components().count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => depth -= 1,
            Component::CurDir => {}
            _ => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

/// Where entries land: a directory descriptor and the walk below it.
struct Dest {
    root: OwnedFd,
}

impl Dest {
    /// The directory holding `rel`'s last component (made, privately, when missing), and
    /// that component's name. Every step is a real directory: a link on the way is refused.
    fn parent_of(&self, rel: &Path) -> std::io::Result<(OwnedFd, CString)> {
        let mut parts: Vec<&std::ffi::OsStr> = rel.iter().collect();
        let last = parts
            .pop()
            .ok_or_else(|| err("an entry with an empty name"))?;
        let mut cur = self.root.try_clone()?;
        for p in parts {
            let c = cstr(p)?;
            make_dir_at(&cur, &c).map_err(|e| {
                err(format!(
                    "{}: {e} (not a directory of the copy)",
                    rel.display()
                ))
            })?;
            cur = open_dir_at(&cur, &c)?;
        }
        Ok((cur, cstr(last)?))
    }

    /// Writes a regular file's bytes with `mode` (no special bits), replacing a regular file
    /// but never a link.
    fn file(&self, rel: &Path, mode: u32, data: &mut impl Read) -> std::io::Result<()> {
        let (dir, name) = self.parent_of(rel)?;
        // SAFETY: as in open_dir_at; O_NOFOLLOW refuses a link in the last component.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(err(format!(
                "{}: {e}{}",
                rel.display(),
                if e.raw_os_error() == Some(libc::ELOOP) {
                    " (a symbolic link is there; it is not followed or replaced)"
                } else {
                    ""
                }
            )));
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        // A FIFO or device already at the name would have opened too: only regular files
        // are written.
        if !f.metadata()?.is_file() {
            return Err(err(format!("{}: not a regular file", rel.display())));
        }
        std::io::copy(data, &mut f)?;
        f.flush()?;
        // SAFETY: fchmod takes no pointers; `f` is open.
        if unsafe { libc::fchmod(f.as_raw_fd(), mode & 0o777) } != 0 {
            return last_error();
        }
        Ok(())
    }

    fn symlink(&self, rel: &Path, target: &Path) -> std::io::Result<()> {
        let (dir, name) = self.parent_of(rel)?;
        let t = cstr(target.as_os_str())?;
        // SAFETY: both strings are NUL-terminated; `dir` is live.
        if unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), name.as_ptr()) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(err(format!("{}: {e}", rel.display())));
        }
        Ok(())
    }

    fn dir(&self, rel: &Path) -> std::io::Result<()> {
        if rel.as_os_str().is_empty() {
            return Ok(());
        }
        let (dir, name) = self.parent_of(rel)?;
        make_dir_at(&dir, &name).map_err(|e| err(format!("{}: {e}", rel.display())))
    }

    /// Sets a directory's mode (no special bits; the owner keeps rwx, so the copy can be
    /// removed by whoever made it).
    fn dir_mode(&self, rel: &Path, mode: u32) -> std::io::Result<()> {
        let fd = if rel.as_os_str().is_empty() {
            self.root.try_clone()?
        } else {
            let (dir, name) = self.parent_of(rel)?;
            open_dir_at(&dir, &name)?
        };
        // SAFETY: fchmod takes no pointers; `fd` is open.
        if unsafe { libc::fchmod(fd.as_raw_fd(), (mode & 0o777) | 0o700) } != 0 {
            return last_error();
        }
        Ok(())
    }
}

/// Unpacks a guest's tar stream at `target`: a directory's entries into it (made when
/// missing), or one file or link as `target` itself. What it left out is in the result.
pub fn unpack(input: impl Read, target: &Path, dir: bool) -> std::io::Result<Skipped> {
    let mut a = tar::Archive::new(input);
    let mut skipped = Skipped::default();
    let (dest, single) = if dir {
        std::fs::create_dir_all(target)?;
        (
            Dest {
                root: open_root(target)?,
            },
            None,
        )
    } else {
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .ok_or_else(|| err(format!("{}: not a file name", target.display())))?;
        (
            Dest {
                root: open_root(&parent)?,
            },
            Some(PathBuf::from(name)),
        )
    };
    let mut dirs = Vec::new();
    for e in a.entries()? {
        let mut e = e?;
        let raw = e.path()?.into_owned();
        let rel = match &single {
            Some(name) => name.clone(),
            None => match relative(&raw) {
                Some(r) => r,
                None => {
                    skipped
                        .entries
                        .push(format!("{} (leaves the copy)", raw.display()));
                    continue;
                }
            },
        };
        let kind = e.header().entry_type();
        let mode = e.header().mode().unwrap_or(0o644);
        if mode & 0o7000 != 0 && (kind.is_file() || kind.is_dir()) {
            skipped.modes_masked += 1;
        }
        if kind.is_file() || kind == tar::EntryType::Continuous {
            dest.file(&rel, mode, &mut e)?;
        } else if kind.is_dir() && single.is_none() {
            dest.dir(&rel)?;
            dirs.push((rel, mode));
        } else if kind.is_symlink() {
            let to = e
                .link_name()?
                .ok_or_else(|| err(format!("{}: a link without a target", raw.display())))?
                .into_owned();
            // A single link copied out lands beside the user's files: it too must not lead
            // anywhere but where it was (its own directory's subtree).
            if !link_stays_inside(&rel, &to) {
                if single.is_some() {
                    return Err(err(format!(
                        "{} is a symbolic link to {}, outside what was copied; copy what it \
                         points to instead",
                        raw.display(),
                        to.display()
                    )));
                }
                skipped.entries.push(format!(
                    "{} (a link to {}, outside the copy)",
                    raw.display(),
                    to.display()
                ));
                continue;
            }
            dest.symlink(&rel, &to)?;
        } else if single.is_some() {
            return Err(err(format!(
                "expected a file or a link, got a {kind:?} entry; nothing was written"
            )));
        } else if kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink()
        {
            continue;
        } else {
            skipped
                .entries
                .push(format!("{} (a {kind:?} entry)", raw.display()));
        }
        if single.is_some() {
            break;
        }
    }
    if let Some(name) = &single {
        // The single entry must have arrived.
        if std::fs::symlink_metadata(target).is_err() {
            return Err(err(format!(
                "the copy carried no file for {}",
                name.display()
            )));
        }
    }
    // Deepest first: a directory's mode may take away the write bit its entries needed.
    dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (rel, mode) in dirs {
        dest.dir_mode(&rel, mode)?;
    }
    Ok(skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn archive(build: impl FnOnce(&mut tar::Builder<&mut Vec<u8>>)) -> Vec<u8> {
        let mut v = Vec::new();
        {
            let mut b = tar::Builder::new(&mut v);
            build(&mut b);
            b.finish().unwrap();
        }
        v
    }

    fn entry(
        b: &mut tar::Builder<&mut Vec<u8>>,
        path: &str,
        kind: tar::EntryType,
        mode: u32,
        link: Option<&str>,
        data: &[u8],
    ) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        // Written raw: the builder's path checks would refuse the hostile names.
        let name = path.as_bytes();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    #[test]
    fn hostile_entries_are_masked_skipped_or_refused() {
        use tar::EntryType as T;
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let dst = d.path().join("dst");
        let wire = archive(|b| {
            entry(b, "sh", T::Regular, 0o4755, None, b"suid");
            entry(b, "g", T::Regular, 0o2755, None, b"sgid");
            entry(b, "sub", T::Directory, 0o3777, None, b"");
            entry(b, "sub/ok", T::Regular, 0o640, None, b"ok");
            entry(b, "null", T::Char, 0o666, None, b"");
            entry(b, "fifo", T::Fifo, 0o666, None, b"");
            entry(b, "hard", T::Link, 0o644, Some("sh"), b"");
            entry(b, "up", T::Symlink, 0o777, Some("../outside"), b"");
            entry(b, "abs", T::Symlink, 0o777, Some("/etc"), b"");
            entry(b, "in", T::Symlink, 0o777, Some("sub/ok"), b"");
            entry(b, "../escape", T::Regular, 0o644, None, b"x");
            // A link made by the copy is never walked through either.
            entry(b, "in/x", T::Regular, 0o644, None, b"x");
        });
        let r = unpack(&wire[..], &dst, true);
        // The walk through `in` (a link) is refused.
        assert!(r.is_err(), "{r:?}");
        let mode = |p: &str| {
            std::fs::symlink_metadata(dst.join(p))
                .unwrap()
                .permissions()
                .mode()
        };
        assert_eq!(mode("sh") & 0o7777, 0o755);
        assert_eq!(mode("g") & 0o7777, 0o755);
        assert_eq!(std::fs::read(dst.join("sub/ok")).unwrap(), b"ok");
        for gone in ["null", "fifo", "hard", "up", "abs"] {
            assert!(std::fs::symlink_metadata(dst.join(gone)).is_err(), "{gone}");
        }
        assert!(!d.path().join("escape").exists());
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
    }

    #[test]
    fn a_link_already_at_the_destination_is_neither_followed_nor_replaced() {
        use tar::EntryType as T;
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"mine").unwrap();
        let dst = d.path().join("dst");
        std::fs::create_dir(&dst).unwrap();
        std::os::unix::fs::symlink(&victim, dst.join("f")).unwrap();
        std::os::unix::fs::symlink(d.path(), dst.join("dir")).unwrap();
        let wire = archive(|b| entry(b, "f", T::Regular, 0o644, None, b"guest"));
        assert!(unpack(&wire[..], &dst, true).is_err());
        let wire = archive(|b| entry(b, "dir/victim", T::Regular, 0o644, None, b"guest"));
        assert!(unpack(&wire[..], &dst, true).is_err());
        let wire = archive(|b| entry(b, "x", T::Regular, 0o644, None, b"guest"));
        assert!(unpack(&wire[..], &dst.join("f"), false).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"mine");
        assert!(std::fs::symlink_metadata(dst.join("f"))
            .unwrap()
            .file_type()
            .is_symlink());

        // A plain file is replaced, and reported masked when it was setuid.
        let wire = archive(|b| entry(b, "x", T::Regular, 0o6755, None, b"guest"));
        let s = unpack(&wire[..], &dst.join("one"), false).unwrap();
        assert_eq!(s.modes_masked, 1);
        assert_eq!(std::fs::read(dst.join("one")).unwrap(), b"guest");
        let wire = archive(|b| entry(b, "x", T::Char, 0o644, None, b""));
        assert!(unpack(&wire[..], &dst.join("dev"), false).is_err());
    }

    #[test]
    fn links_inside_the_copy_are_judged_lexically() {
        assert!(link_stays_inside(Path::new("a/l"), Path::new("b")));
        assert!(link_stays_inside(Path::new("a/l"), Path::new("../c")));
        assert!(!link_stays_inside(Path::new("a/l"), Path::new("../../c")));
        assert!(!link_stays_inside(Path::new("l"), Path::new("/etc")));
        assert!(link_stays_inside(Path::new("l"), Path::new("./x/../y")));
        assert!(!link_stays_inside(Path::new("l"), Path::new("x/../../y")));
    }
}
