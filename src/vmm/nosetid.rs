//! `bangerd no-setid -- PROGRAM ARGS…`: becomes PROGRAM under a seccomp filter that refuses
//! (`EPERM`) every call that would give a file the setuid or setgid bit: `chmod` and its
//! kin, and `open`/`creat`/`mknod`/`mkdir` with such a mode. Shared folders' servers run so:
//! virtiofsd, as the folder's owner, would otherwise honour a guest's `chmod 4755` and leave a
//! setuid-the-owner program in the owner's folder for any local user to run. The guest sees a
//! plain `EPERM`. `openat2` (whose mode sits in a structure a filter cannot read) answers
//! `ENOSYS`, which makes callers fall back to `openat`. The filter stays across every `exec`
//! and `clone` that follows; `no_new_privs` comes with it.

/// The argument that runs the `bangerd` binary as `no-setid -- PROGRAM ARGS…`.
pub const NO_SETID_ARG: &str = "no-setid";

/// The mode bits refused.
const SETID: u32 = libc::S_ISUID | libc::S_ISGID;

// Classic BPF, as seccomp reads it (linux/filter.h, linux/seccomp.h): BPF_LD|BPF_W|BPF_ABS,
// BPF_JMP|BPF_JEQ|BPF_K, BPF_JMP|BPF_JGE|BPF_K, BPF_JMP|BPF_JSET|BPF_K, BPF_RET|BPF_K.
const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// Offsets in `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;
const fn arg_low(i: u32) -> u32 {
    16 + 8 * i
}

/// The calls that take a mode, and which argument holds it (x86-64 numbers).
const MODE_CALLS: &[(u32, u32)] = &[
    (2, 2),   // open(path, flags, mode)
    (83, 1),  // mkdir(path, mode)
    (85, 1),  // creat(path, mode)
    (90, 1),  // chmod(path, mode)
    (91, 1),  // fchmod(fd, mode)
    (133, 1), // mknod(path, mode, dev)
    (257, 3), // openat(dir, path, flags, mode)
    (258, 2), // mkdirat(dir, path, mode)
    (259, 2), // mknodat(dir, path, mode, dev)
    (268, 2), // fchmodat(dir, path, mode)
    (452, 2), // fchmodat2(dir, path, mode, flags)
];
const OPENAT2: u32 = 437;
/// x32 calls carry this bit; the filter refuses them all.
const X32: u32 = 0x4000_0000;

fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The filter program.
pub fn program() -> Vec<libc::sock_filter> {
    let eperm = RET_ERRNO | libc::EPERM as u32;
    let enosys = RET_ERRNO | libc::ENOSYS as u32;
    let mut p = vec![
        // Only x86-64 calls; anything else is refused.
        op(LD_W_ABS, 0, 0, ARCH),
        op(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        op(RET_K, 0, 0, eperm),
        op(LD_W_ABS, 0, 0, NR),
        op(JGE_K, 0, 1, X32),
        op(RET_K, 0, 0, enosys),
        op(JEQ_K, 0, 1, OPENAT2),
        op(RET_K, 0, 0, enosys),
    ];
    for &(nr, arg) in MODE_CALLS {
        p.extend([
            op(LD_W_ABS, 0, 0, NR),
            op(JEQ_K, 0, 3, nr),
            op(LD_W_ABS, 0, 0, arg_low(arg)),
            op(JSET_K, 0, 1, SETID),
            op(RET_K, 0, 0, eperm),
        ]);
    }
    p.push(op(RET_K, 0, 0, RET_ALLOW));
    p
}

/// Installs `prog` on this thread (the process has one here) with `no_new_privs`. Makes
/// system calls only (no allocation), so it may run between fork and exec.
fn install(prog: &[libc::sock_filter]) -> std::io::Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fprog` points at `prog`, which outlives the call; the kernel copies it.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &fprog as *const libc::sock_fprog,
            0,
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `bangerd no-setid -- PROGRAM ARGS…`; returns only the error that stopped it.
pub fn deny_setid_and_exec(args: &[std::ffi::OsString]) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let [sep, command, rest @ ..] = args else {
        return std::io::Error::other("usage: bangerd no-setid -- PROGRAM ARGS…");
    };
    if sep != "--" {
        return std::io::Error::other("usage: bangerd no-setid -- PROGRAM ARGS…");
    }
    if !cfg!(target_arch = "x86_64") {
        return std::io::Error::other("no-setid: only x86-64 system calls are known");
    }
    if let Err(e) = install(&program()) {
        return std::io::Error::other(format!("no-setid: cannot install the filter: {e}"));
    }
    std::process::Command::new(command).args(rest).exec()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;

    /// A shell under the filter: setuid and setgid modes are refused, plain ones work.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn setid_modes_are_refused_and_plain_ones_pass() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let prog = super::program();
        let mut c = std::process::Command::new("sh");
        c.current_dir(d.path()).args([
            "-c",
            "chmod 4755 f 2>/dev/null && echo suid-allowed; \
             chmod 2755 f 2>/dev/null && echo sgid-allowed; \
             chmod 0700 f || echo plain-refused; \
             mkdir sub || echo mkdir-refused; \
             echo done",
        ]);
        // SAFETY: install only makes system calls on a program built before the fork.
        unsafe { c.pre_exec(move || super::install(&prog)) };
        let out = c.output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n", "{out:?}");
        let m = std::fs::metadata(d.path().join("f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(m & 0o7777, 0o700);
        assert!(d.path().join("sub").is_dir());
    }
}
