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
    build(&[])
}

/// What a worker (see `crate::worker`) may not do on top of [`program`], whatever a parser
/// bug lets its input make it run (x86-64 numbers): change its identity, reach other
/// processes, make namespaces (`clone` with `CLONE_NEWUSER` is refused below), mount, load
/// kernel code or programs, touch keyrings, make device nodes, or use the kernel's
/// least-travelled interfaces.
const WORKER_DENIED: &[u32] = &[
    101, // ptrace
    103, // syslog
    105, // setuid
    106, // setgid
    113, // setreuid
    114, // setregid
    116, // setgroups
    117, // setresuid
    119, // setresgid
    122, // setfsuid
    123, // setfsgid
    133, // mknod
    135, // personality
    155, // pivot_root
    161, // chroot
    163, // acct
    165, // mount
    166, // umount2
    167, // swapon
    168, // swapoff
    169, // reboot
    175, // init_module
    176, // delete_module
    179, // quotactl
    246, // kexec_load
    248, // add_key
    249, // request_key
    250, // keyctl
    259, // mknodat
    272, // unshare
    298, // perf_event_open
    300, // fanotify_init
    303, // name_to_handle_at
    304, // open_by_handle_at
    308, // setns
    310, // process_vm_readv
    311, // process_vm_writev
    313, // finit_module
    320, // kexec_file_load
    321, // bpf
    323, // userfaultfd
    425, // io_uring_setup
    426, // io_uring_enter
    427, // io_uring_register
    428, // open_tree
    429, // move_mount
    430, // fsopen
    431, // fsconfig
    432, // fsmount
    433, // fspick
];
const CLONE: u32 = 56;
const CLONE3: u32 = 435;

/// A worker's filter: [`program`] and [`WORKER_DENIED`]; `clone3` (whose flags sit in a
/// structure) answers `ENOSYS`, so callers use `clone`, whose flags are checked.
pub fn worker_program() -> Vec<libc::sock_filter> {
    build(WORKER_DENIED)
}

fn build(denied: &[u32]) -> Vec<libc::sock_filter> {
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
    if !denied.is_empty() {
        p.extend([op(JEQ_K, 0, 1, CLONE3), op(RET_K, 0, 0, enosys)]);
        // clone(flags, …): no new user namespace (nor any other: those need capabilities).
        p.extend([
            op(JEQ_K, 0, 3, CLONE),
            op(LD_W_ABS, 0, 0, arg_low(0)),
            op(JSET_K, 0, 1, libc::CLONE_NEWUSER as u32),
            op(RET_K, 0, 0, eperm),
            op(LD_W_ABS, 0, 0, NR),
        ]);
        for &nr in denied {
            p.extend([op(JEQ_K, 0, 1, nr), op(RET_K, 0, 0, eperm)]);
        }
    }
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
pub(crate) fn install(prog: &[libc::sock_filter]) -> std::io::Result<()> {
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

    /// A worker's filter: what it denies fails with EPERM, ordinary work (files, threads,
    /// programs) goes on.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn a_worker_cannot_unshare_mount_or_change_identity() {
        let d = tempfile::tempdir().unwrap();
        let prog = super::worker_program();
        let mut c = std::process::Command::new("sh");
        c.current_dir(d.path()).args([
            "-c",
            "unshare -U true 2>/dev/null && echo userns-allowed; \
             unshare -r true 2>/dev/null && echo userns-allowed; \
             mkfifo p 2>/dev/null && echo mknod-allowed; \
             chmod 4755 . 2>/dev/null && echo suid-allowed; \
             echo data > f && cat f && (echo threads | cat) && echo done",
        ]);
        // SAFETY: install only makes system calls on a program built before the fork.
        unsafe { c.pre_exec(move || super::install(&prog)) };
        let out = c.output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "data\nthreads\ndone\n",
            "{out:?}"
        );
    }
}
