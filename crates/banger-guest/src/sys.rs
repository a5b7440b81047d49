//! System calls the std library lacks, shared by the guest's binaries and the host's (the
//! daemon, the containerd shim).

/// `openat2(2)`: `path` below `dirfd` opened with `flags` (`O_CLOEXEC` always) and `mode` when
/// it creates, resolved as `resolve` (`RESOLVE_*`) says. `ENOSYS` on kernels before 5.6 and
/// under seccomp filters older than the call.
pub fn openat2(
    dirfd: std::os::fd::RawFd,
    path: &std::path::Path,
    flags: i32,
    mode: u32,
    resolve: u64,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: open_how is plain data; zeroed is a valid value for every field.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    if flags & libc::O_CREAT != 0 {
        how.mode = u64::from(mode);
    }
    how.resolve = resolve;
    // SAFETY: `c` is a valid NUL-terminated string and `how` a valid open_how of the size we
    // pass; the kernel reads both and returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}
