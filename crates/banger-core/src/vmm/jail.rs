//! Who a VM's processes run as. Each VM's VMM and helpers get a uid of their own,
//! [`VM_ID_BASE`] + the VM's vsock CID (unique among VMs, stable for a VM's life, far above
//! ordinary, system and container ranges), with no passwd entry, no capabilities and
//! `no_new_privs` (see `process::spawn_detached`). The VM's own directory and runtime
//! directory are that uid's alone (0700); what VMs share and only read (image root
//! filesystems, kernels, initrds) is group [`vmm_gid`]'s (0640), reached through banger's
//! directories opened to that group for traversal only (0710). A VMM that escapes its guest
//! can read no other VM's disks or sockets and write nothing of banger's but its own.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::error::failed;
use crate::Result;

/// The first uid (and gid) of VM processes.
pub const VM_ID_BASE: u32 = 0x5BA0_0000;

/// The uid a VM's processes run as.
pub fn vm_uid(cid: u32) -> u32 {
    VM_ID_BASE + cid
}

/// The group every VM process has, which may read what VMs share.
pub fn vmm_gid() -> u32 {
    VM_ID_BASE
}

/// The uid (and gid) of every VM's control relay (`varlink::relay`): one of its own, in
/// no VM's group (vsock CIDs 1 and 2 are never a guest's, so no VM has this uid).
pub fn control_uid() -> u32 {
    VM_ID_BASE + 1
}

/// The control relays' directory, `dir` (root made it in root's runtime directory): theirs,
/// open for every user to reach the sockets in it.
pub fn hand_over_open(dir: &Path, uid: u32) -> Result<()> {
    set(dir, Some(uid), Some(uid), 0o755)
}

/// What one VM's processes get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    /// Their uid.
    pub uid: u32,
    /// Their primary gid (a VM's is its uid).
    pub gid: u32,
    /// Supplementary groups: [`vmm_gid`], and `/dev/kvm`'s group when the VM uses KVM.
    pub groups: Vec<u32>,
    /// banger's roots (state, runtime) that its units see as empty, but for the paths below
    /// and the ones they write (systemd hosts: a mount namespace of the unit's own).
    pub hide: Vec<std::path::PathBuf>,
    /// Files under those roots the VM only reads (its image's root filesystem, its kernel).
    pub read_only: Vec<std::path::PathBuf>,
    /// A VM's own process (VMM, agent link, console logger, port forwarder): it also sees
    /// none of the host's [`HOST_PRIVATE`] places.
    pub private: bool,
    /// No network (a VMM gets its tap as a descriptor): a network namespace of its own where
    /// banger builds the namespace, Unix sockets only in a unit. Every VM process but the
    /// port forwarder, which listens on the host's addresses.
    pub offline: bool,
}

/// Where the host keeps what is its users' or its services' (homes, temporary files, bus and
/// runtime sockets, mounted media): a VM's own processes see these empty, but for the paths
/// of the VM's own bound back.
pub const HOST_PRIVATE: &[&str] = &[
    "/home", "/root", "/tmp", "/var/tmp", "/run", "/dev/shm", "/mnt", "/media", "/srv",
];

/// Sets owner and mode through a descriptor opened without following a final symbolic link,
/// so a link planted in a VM's directory never redirects root's change elsewhere.
fn set(path: &Path, uid: Option<u32>, gid: Option<u32>, mode: u32) -> Result<()> {
    let fail = |e: std::io::Error| failed(format!("Cannot hand {} to the VM", path.display()), e);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(fail)?;
    std::os::unix::fs::fchown(&f, uid, gid).map_err(fail)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(fail)
}

/// Takes a VM's directories back before root works in them again (a start): the VM's uid had
/// them, so whatever it left there is hostile. Every entry that is not a regular file or a
/// socket (symbolic links above all, which root's later writes would follow) is removed, and
/// the rest becomes root's. Runs while none of the VM's processes run.
pub fn reclaim(dirs: &[&Path]) -> Result<()> {
    for dir in dirs {
        let meta = match std::fs::symlink_metadata(dir) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(failed(format!("Cannot inspect {}", dir.display()), e)),
        };
        if !meta.is_dir() {
            return Err(failed(
                format!("{} is not a directory", dir.display()),
                std::io::Error::other("refusing to use it"),
            ));
        }
        set(dir, Some(0), Some(0), 0o700)?;
        for e in std::fs::read_dir(dir)
            .map_err(|e| failed(format!("Cannot list {}", dir.display()), e))?
            .flatten()
        {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_file() => set(&p, Some(0), Some(0), 0o600)?,
                Ok(t) if t.is_socket() => std::os::unix::fs::lchown(&p, Some(0), Some(0))
                    .map_err(|err| failed(format!("Cannot take back {}", p.display()), err))?,
                _ => {
                    tracing::warn!("Removing {} a VM left behind", p.display());
                    crate::layout::remove_any(&p)?;
                }
            }
        }
    }
    Ok(())
}

/// Hands the VM's own directories (and every file directly in them) to `uid`, 0700/0600.
pub fn hand_over(uid: u32, own_dirs: &[&Path]) -> Result<()> {
    for dir in own_dirs {
        set(dir, Some(uid), Some(uid), 0o700)?;
        for e in std::fs::read_dir(dir)
            .map_err(|e| failed(format!("Cannot list {}", dir.display()), e))?
            .flatten()
        {
            let t = e.file_type().ok();
            if t.is_some_and(|t| t.is_file()) {
                set(&e.path(), Some(uid), Some(uid), 0o600)?;
            } else if t.is_some_and(|t| t.is_socket()) {
                std::os::unix::fs::lchown(e.path(), Some(uid), Some(uid)).map_err(|err| {
                    failed(format!("Cannot hand {} to the VM", e.path().display()), err)
                })?;
            }
        }
    }
    Ok(())
}

/// Lets the VMM group read `files` (root:vmm 0640) and reach them. Nothing outside `roots`
/// changes.
pub fn share(files: &[&Path], roots: &[&Path]) -> Result<()> {
    for f in files {
        if roots.iter().any(|r| f.starts_with(r)) {
            set(f, Some(0), Some(vmm_gid()), 0o640)?;
            reach(f, roots)?;
        }
    }
    Ok(())
}

/// Lets the VMM group traverse every directory between `path` and the root it lies in
/// (root:vmm, group execute only; the owner's and others' bits kept).
pub fn reach(path: &Path, roots: &[&Path]) -> Result<()> {
    let Some(root) = roots.iter().find(|r| path.starts_with(r)) else {
        return Ok(());
    };
    let mut dir = path.parent();
    while let Some(d) = dir {
        if !d.starts_with(root) {
            break;
        }
        let mode = std::fs::metadata(d)
            .map_err(|e| failed(format!("Cannot inspect {}", d.display()), e))?
            .permissions()
            .mode()
            & 0o7777;
        set(d, Some(0), Some(vmm_gid()), (mode & 0o7707) | 0o010)?;
        dir = d.parent();
    }
    Ok(())
}

/// The directory in a VM's runtime directory that the VM's uid has (0700): the sockets its
/// processes make. The runtime directory itself is root's (pid files
/// and logs, root:vmm 0710), so nothing the VM's uid writes can stand in for root's files.
pub fn own_runtime(run: &Path) -> std::path::PathBuf {
    run.join("jail")
}

/// `name` below `dir` (the working directory when none), as an `O_PATH` descriptor that did
/// not follow a final symbolic link.
fn open_path(
    dir: Option<&std::os::fd::OwnedFd>,
    name: &Path,
    flags: i32,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd;
    let at = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    crate::host::openat(at, name, libc::O_PATH | libc::O_NOFOLLOW | flags)
}

/// Connects to a socket a VM's processes made (its QMP, vsock or API socket). Root never
/// connects by a path the VM's uid controls: the socket is taken without following links
/// and must be a socket owned by the owner of its directory (which root made and handed to
/// the VM; the VM cannot replace it), so a link or a hard link to another service's socket
/// is refused; then the connection goes through that descriptor.
pub fn connect(path: &Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    let refuse = |why: &str| {
        std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} {why}; refusing to connect", path.display()),
        )
    };
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(refuse("is not a socket path"));
    };
    let dir = open_path(None, dir, libc::O_DIRECTORY)?;
    let sock = open_path(Some(&dir), Path::new(name), 0)?;
    let (d, s) = (crate::host::fstat(&dir)?, crate::host::fstat(&sock)?);
    if s.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(refuse("is not a socket"));
    }
    if s.st_uid != d.st_uid {
        return Err(refuse("is not the socket of its directory's owner"));
    }
    use std::os::fd::AsRawFd;
    std::os::unix::net::UnixStream::connect(format!("/proc/self/fd/{}", sock.as_raw_fd()))
}

/// `rel` below `base`, a directory the VM's uid owns in one only root writes (its VM
/// directory): `base` itself is taken as named, and below it no symbolic link is followed and
/// nothing leads out (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), so what the
/// VM's uid does in its tree cannot lead root elsewhere.
fn open_beneath_fd(
    base: &Path,
    rel: &Path,
    flags: i32,
    mode: u32,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd;
    let dir = crate::host::openat(libc::AT_FDCWD, base, libc::O_PATH | libc::O_DIRECTORY)?;
    match crate::host::openat2(
        dir.as_raw_fd(),
        rel,
        flags | libc::O_NOFOLLOW,
        mode,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    ) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => open_walking(dir, rel, flags, mode),
        r => r,
    }
}

/// [`open_beneath_fd`] where `openat2` is missing (a kernel before 5.6, or a container
/// manager's system call filter that predates it, as systemd-nspawn 252's does): one
/// component at a time, each opened without following a link, and no `..`.
fn open_walking(
    mut dir: std::os::fd::OwnedFd,
    rel: &Path,
    flags: i32,
    mode: u32,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd;
    use std::path::Component;
    let parts: Vec<&std::ffi::OsStr> = rel
        .components()
        .filter(|c| *c != Component::CurDir)
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(std::io::Error::from_raw_os_error(libc::EXDEV)),
        })
        .collect::<std::io::Result<_>>()?;
    let Some((last, dirs)) = parts.split_last() else {
        return crate::host::openat(dir.as_raw_fd(), Path::new("."), flags);
    };
    for d in dirs {
        dir = crate::host::openat(
            dir.as_raw_fd(),
            Path::new(d),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        )?;
    }
    crate::host::openat_mode(
        dir.as_raw_fd(),
        Path::new(last),
        flags | libc::O_NOFOLLOW,
        mode,
    )
}

/// Opens the regular file `rel` below `base` (see [`open_beneath_fd`]), never waiting on a
/// FIFO; with `O_CREAT` the file is new (`O_EXCL`). Root's way to read what a VM's process
/// wrote, or to hand it a file, without being led elsewhere.
pub fn open_beneath(
    base: &Path,
    rel: &Path,
    flags: i32,
    mode: u32,
) -> std::io::Result<std::fs::File> {
    let excl = if flags & libc::O_CREAT != 0 {
        libc::O_EXCL
    } else {
        0
    };
    let f = std::fs::File::from(open_beneath_fd(
        base,
        rel,
        flags | excl | libc::O_NONBLOCK,
        mode,
    )?);
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} is not a regular file", base.join(rel).display()),
        ));
    }
    Ok(f)
}

/// Removes `rel` below `base` (see [`open_beneath_fd`]); fine when it is not there.
pub fn remove_beneath(base: &Path, rel: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let (Some(dir), Some(name)) = (rel.parent(), rel.file_name()) else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let dir = open_beneath_fd(base, dir, libc::O_PATH | libc::O_DIRECTORY, 0)?;
    let name = std::ffi::CString::new(name.as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: dir is an open directory and name a valid C string for the call.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(e);
        }
    }
    Ok(())
}

/// [`connect`] for async callers.
pub fn connect_async(path: &Path) -> std::io::Result<tokio::net::UnixStream> {
    let s = connect(path)?;
    s.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(s)
}

/// The argument that runs the `bangerd` binary as `jail-mounts --hide DIR… --rw PATH…
/// --ro PATH… -- PROGRAM ARGS…`.
pub const MOUNTS_ARG: &str = "jail-mounts";

/// A VM process's own view of banger's directories on hosts without systemd (where a unit's
/// `TemporaryFileSystem=`/`BindPaths=`/`BindReadOnlyPaths=` do the same): `hide` roots are
/// empty (a tmpfs), but for `rw` paths bound back writable and `ro` paths read-only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mounts {
    /// Roots that become empty.
    pub hide: Vec<std::path::PathBuf>,
    /// Paths under them bound back writable.
    pub rw: Vec<std::path::PathBuf>,
    /// Paths under them bound back read-only.
    pub ro: Vec<std::path::PathBuf>,
    /// A VM's own process (see [`Jail::private`]): [`HOST_PRIVATE`] hidden too.
    pub private: bool,
    /// A network namespace of its own (see [`Jail::offline`]).
    pub offline: bool,
}

impl Mounts {
    /// What a [`Jail`] gets for a process that writes `writable` and runs `programs` (bound
    /// back read-only where a hidden root holds them: a test build's `bangerd` under `/tmp`).
    pub fn of(jail: &Jail, writable: &[&Path], programs: &[&Path]) -> Self {
        let mut hide = jail.hide.clone();
        if jail.private {
            hide.extend(HOST_PRIVATE.iter().map(std::path::PathBuf::from));
        }
        let inside = |p: &Path| hide.iter().any(|r| p.starts_with(r));
        Mounts {
            private: jail.private,
            offline: jail.offline,
            rw: writable
                .iter()
                .filter(|p| inside(p))
                .map(|p| p.to_path_buf())
                .fold(Vec::new(), |mut ro, p| {
                    // Once each: a second bind over the first would open the bound file.
                    if !ro.contains(&p) {
                        ro.push(p);
                    }
                    ro
                }),
            ro: jail
                .read_only
                .iter()
                .map(|p| p.as_path())
                .chain(programs.iter().copied().filter(|p| p.is_absolute()))
                .filter(|p| inside(p))
                .map(|p| p.to_path_buf())
                .fold(Vec::new(), |mut ro, p| {
                    // Once each: a second bind over the first would open the bound file.
                    if !ro.contains(&p) {
                        ro.push(p);
                    }
                    ro
                }),
            hide,
        }
    }

    /// The `jail-mounts` arguments up to and including `--`.
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        let mut a = Vec::new();
        if self.private {
            a.push("--private".into());
        }
        if self.offline {
            a.push("--offline".into());
        }
        for (flag, paths) in [
            ("--hide", &self.hide),
            ("--rw", &self.rw),
            ("--ro", &self.ro),
        ] {
            for p in paths {
                a.push(flag.into());
                a.push(p.clone().into_os_string());
            }
        }
        a.push("--".into());
        a
    }

    /// Parses [`Mounts::args`]; returns the rest (the program and its arguments).
    pub fn parse(args: &[std::ffi::OsString]) -> std::io::Result<(Self, &[std::ffi::OsString])> {
        let usage = || {
            std::io::Error::other(
                "usage: bangerd jail-mounts [--private] [--offline] [--hide|--rw|--ro PATH]… -- PROGRAM ARGS…",
            )
        };
        let mut m = Mounts::default();
        let mut i = 0;
        while i < args.len() {
            if args[i] == "--private" || args[i] == "--offline" {
                m.private |= args[i] == "--private";
                m.offline |= args[i] == "--offline";
                i += 1;
                continue;
            }
            if args[i] == "--" {
                return if i + 1 < args.len() {
                    Ok((m, &args[i + 1..]))
                } else {
                    Err(usage())
                };
            }
            let p = std::path::PathBuf::from(args.get(i + 1).ok_or_else(usage)?);
            if !p.is_absolute() {
                return Err(usage());
            }
            match args[i].to_str() {
                Some("--hide") => m.hide.push(p),
                Some("--rw") => m.rw.push(p),
                Some("--ro") => m.ro.push(p),
                _ => return Err(usage()),
            }
            i += 2;
        }
        Err(usage())
    }

    /// Enters a mount namespace of this process's own with this view. Must run before any
    /// other thread exists (unshare of the mount namespace refuses a shared `fs`).
    pub fn enter(&self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        fn c(p: &Path) -> std::io::Result<std::ffi::CString> {
            use std::os::unix::ffi::OsStrExt;
            std::ffi::CString::new(p.as_os_str().as_bytes())
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
        }
        fn mount(
            src: Option<&Path>,
            dst: &Path,
            fstype: Option<&str>,
            flags: libc::c_ulong,
            data: Option<&str>,
        ) -> std::io::Result<()> {
            let (src, dst) = (src.map(c).transpose()?, c(dst)?);
            let fstype = fstype.map(|f| std::ffi::CString::new(f).unwrap());
            let data = data.map(|d| std::ffi::CString::new(d).unwrap());
            let ptr =
                |s: &Option<std::ffi::CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
            // SAFETY: every pointer is null or a valid C string alive for the call.
            let r = unsafe {
                libc::mount(
                    ptr(&src),
                    dst.as_ptr(),
                    ptr(&fstype),
                    flags,
                    ptr(&data).cast(),
                )
            };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("mount on {}: {e}", dst.to_string_lossy()),
                ));
            }
            Ok(())
        }
        // An offline process: no network but the tap it holds as a descriptor (a new network
        // namespace has only a loopback, down).
        let flags = libc::CLONE_NEWNS | if self.offline { libc::CLONE_NEWNET } else { 0 };
        // SAFETY: unshare takes no pointers.
        if unsafe { libc::unshare(flags) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Nothing mounted here reaches the host's namespace.
        mount(
            None,
            Path::new("/"),
            None,
            libc::MS_REC | libc::MS_SLAVE,
            None,
        )?;
        // The binds' sources are held before their roots are hidden.
        let mut binds = Vec::new();
        for (paths, ro) in [(&self.rw, false), (&self.ro, true)] {
            for p in paths {
                let fd = open_path(None, p, 0)?;
                let is_dir = crate::host::fstat(&fd)?.st_mode & libc::S_IFMT == libc::S_IFDIR;
                binds.push((fd, p, ro, is_dir));
            }
        }
        let mut hide = self.hide.clone();
        hide.sort_by_key(|p| p.components().count());
        for root in &hide {
            // A root inside one hidden already is gone with it.
            if std::fs::symlink_metadata(root).is_ok_and(|m| m.is_dir()) {
                mount(
                    Some(Path::new("tmpfs")),
                    root,
                    Some("tmpfs"),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    Some("mode=0711"),
                )?;
            }
        }
        for (fd, p, ro, is_dir) in binds {
            if let Some(parent) = p.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o711)
                    .create(parent)?;
            }
            if is_dir {
                match std::fs::DirBuilder::new().mode(0o711).create(p) {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
                    _ => {}
                }
            } else {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(p)?;
            }
            let src = std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
            mount(Some(&src), p, None, libc::MS_BIND | libc::MS_REC, None)?;
            if ro {
                mount(
                    None,
                    p,
                    None,
                    libc::MS_BIND
                        | libc::MS_REMOUNT
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV,
                    None,
                )?;
            }
        }
        Ok(())
    }
}

/// `bangerd jail-mounts …`: enters the namespace [`Mounts::parse`] describes and becomes
/// the program. Returns only when it could not.
pub fn mounts_and_exec(args: &[std::ffi::OsString]) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let (m, rest) = match Mounts::parse(args) {
        Ok(x) => x,
        Err(e) => return e,
    };
    if let Err(e) = m.enter() {
        return e;
    }
    std::process::Command::new(&rest[0]).args(&rest[1..]).exec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_files_open_a_path_for_the_group_only_inside_the_roots() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("state");
        let img = root.join("images/0123");
        std::fs::create_dir_all(&img).unwrap();
        for p in [&root, &root.join("images"), &img] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        let f = img.join("rootfs.ext4");
        std::fs::write(&f, b"x").unwrap();
        share(&[&f], &[&root]).unwrap();
        use std::os::unix::fs::MetadataExt;
        let m = |p: &Path| std::fs::metadata(p).unwrap();
        assert_eq!((m(&f).mode() & 0o777, m(&f).gid()), (0o640, vmm_gid()));
        for p in [&root, &root.join("images"), &img] {
            assert_eq!(m(p).mode() & 0o777, 0o710, "{}", p.display());
        }
        // The tempdir above the root is not touched.
        assert_ne!(m(d.path()).gid(), vmm_gid());

        // What a VM leaves in its directories is taken back before root works there again:
        // a planted link goes (and its target is untouched), files become root's.
        let target = d.path().join("precious");
        std::fs::write(&target, b"p").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();

        let own = d.path().join("vm");
        std::fs::create_dir(&own).unwrap();
        std::fs::write(own.join("disk"), b"d").unwrap();
        hand_over(vm_uid(3), &[&own]).unwrap();
        assert_eq!((m(&own).uid(), m(&own).mode() & 0o777), (vm_uid(3), 0o700));
        assert_eq!(m(&own.join("disk")).uid(), vm_uid(3));
        std::os::unix::fs::symlink(&target, own.join("console.log")).unwrap();
        std::os::unix::fs::symlink(&target, own.join("work.ext4")).unwrap();
        hand_over(vm_uid(3), &[&own]).unwrap();
        assert_eq!(m(&target).mode() & 0o777, 0o644, "a link is not followed");
        reclaim(&[&own]).unwrap();
        assert!(std::fs::symlink_metadata(own.join("console.log")).is_err());
        assert!(std::fs::symlink_metadata(own.join("work.ext4")).is_err());
        assert_eq!((m(&own).uid(), m(&own.join("disk")).uid()), (0, 0));
        assert_eq!(std::fs::read(&target).unwrap(), b"p");
        assert_eq!(m(&target).mode() & 0o777, 0o644);
    }

    #[test]
    fn root_connects_only_to_a_socket_of_its_directorys_owner() {
        let d = tempfile::tempdir().unwrap();
        let own = d.path().join("jail");
        std::fs::create_dir(&own).unwrap();
        let sock = own.join("vsock.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        connect(&sock).expect("the directory owner's own socket");

        // A link to a socket elsewhere is not followed.
        let elsewhere = d.path().join("service.sock");
        let _e = std::os::unix::net::UnixListener::bind(&elsewhere).unwrap();
        let link = own.join("qmp.sock");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let e = connect(&link).unwrap_err();
        assert!(e.to_string().contains("refusing to connect"), "{e}");

        // A socket of another owner (a hard link keeps its owner) is refused.
        std::os::unix::fs::lchown(&sock, Some(vm_uid(9)), None).unwrap();
        let e = connect(&sock).unwrap_err();
        assert!(
            e.to_string()
                .contains("is not the socket of its directory's owner"),
            "{e}"
        );
        std::os::unix::fs::chown(&own, Some(vm_uid(9)), None).unwrap();
        connect(&sock).expect("owner and directory agree again");

        // Not a socket at all.
        std::fs::write(own.join("file"), b"").unwrap();
        std::os::unix::fs::chown(own.join("file"), Some(vm_uid(9)), None).unwrap();
        assert!(connect(&own.join("file")).is_err());
    }

    #[test]
    fn without_openat2_the_walk_follows_no_link_and_never_leads_out() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("vm");
        std::fs::create_dir_all(base.join("sub")).unwrap();
        std::fs::write(base.join("sub/disk"), b"mine").unwrap();
        std::fs::write(d.path().join("secret"), b"root's").unwrap();
        std::os::unix::fs::symlink(d.path().join("secret"), base.join("link")).unwrap();
        std::os::unix::fs::symlink(d.path(), base.join("dirlink")).unwrap();
        let walk = |rel: &str| {
            let dir = crate::host::openat(libc::AT_FDCWD, &base, libc::O_PATH | libc::O_DIRECTORY)
                .unwrap();
            open_walking(dir, Path::new(rel), libc::O_RDONLY, 0).map(std::fs::File::from)
        };
        let mut f = walk("sub/disk").unwrap();
        let mut got = String::new();
        std::io::Read::read_to_string(&mut f, &mut got).unwrap();
        assert_eq!(got, "mine");
        let (mut tried, mut refused) = (0, 0);
        for bad in [
            "link",
            "dirlink/secret",
            "../secret",
            "sub/../../secret",
            "/etc/passwd",
        ] {
            tried += 1;
            if walk(bad).is_err() {
                refused += 1;
            }
        }
        assert_eq!(refused, tried);
    }

    #[test]
    fn mount_arguments_round_trip() {
        for (private, offline) in [(false, false), (true, false), (true, true)] {
            let m = Mounts {
                hide: vec!["/var/lib/banger".into(), "/run/banger".into()],
                rw: vec!["/run/banger/vms/01".into()],
                ro: vec!["/var/lib/banger/images/02/rootfs.ext4".into()],
                private,
                offline,
            };
            let mut args = m.args();
            args.extend(["qemu".into(), "-m".into()]);
            let (back, rest) = Mounts::parse(&args).unwrap();
            assert_eq!(back, m);
            assert_eq!(rest, ["qemu", "-m"]);
        }
        assert!(
            Mounts::parse(&["--hide".into(), "relative".into(), "--".into(), "x".into()]).is_err()
        );
        assert!(Mounts::parse(&["--hide".into(), "/a".into(), "--".into()]).is_err());
        assert!(Mounts::parse(&["--bogus".into(), "/a".into(), "--".into(), "x".into()]).is_err());
    }

    #[test]
    fn a_vms_own_processes_hide_the_hosts_private_places_but_keep_their_own_paths() {
        let jail = Jail {
            uid: vm_uid(3),
            gid: vm_uid(3),
            groups: Vec::new(),
            hide: vec!["/var/lib/banger".into(), "/run/banger".into()],
            read_only: vec!["/var/lib/banger/images/02/rootfs.ext4".into()],
            private: true,
            offline: true,
        };
        // A state directory an operator put under /srv: bound back, as under /var/lib.
        let m = Mounts::of(
            &jail,
            &[Path::new("/run/banger/vms/01"), Path::new("/srv/x")],
            &[
                Path::new("/tmp/clone/target/debug/bangerd"),
                Path::new("/tmp/clone/target/debug/bangerd"),
                Path::new("/usr/bin/qemu"),
            ],
        );
        assert!(m.private && m.offline);
        for p in ["/home", "/tmp", "/run", "/dev/shm", "/var/lib/banger"] {
            assert!(m.hide.iter().any(|h| h == Path::new(p)), "{p} hidden");
        }
        assert_eq!(m.rw, [Path::new("/run/banger/vms/01"), Path::new("/srv/x")]);
        // A program under a hidden root stays visible (read-only); one outside needs nothing.
        assert_eq!(
            m.ro,
            [
                Path::new("/var/lib/banger/images/02/rootfs.ext4"),
                Path::new("/tmp/clone/target/debug/bangerd")
            ]
        );
        let m = Mounts::of(
            &Jail {
                private: false,
                ..jail
            },
            &[Path::new("/srv/x")],
            &[],
        );
        assert!(!m.private && !m.hide.iter().any(|h| h == Path::new("/home")));
        assert!(
            m.rw.is_empty(),
            "a path outside every hidden root needs no bind"
        );
    }
}
