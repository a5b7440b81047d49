//! The QEMU driver: `qemu-system-x86_64 -M microvm` booting the ELF vmlinux through PVH,
//! virtio-mmio disks (the root disk a qcow2 overlay on the image's raw ext4), the console
//! to a log file, QMP for power-off and snapshots, and the agent's channel on a virtio-serial
//! port whose host side (`agent::link`'s helper) speaks Firecracker's hybrid vsock protocol.
//! QEMU and its helpers run detached, so they outlive bangerd.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;

use super::error::failed;
use super::process::{
    live_pid, spawn_detached, terminate, wait_exit, wait_for_path, Detached, UnitLimits,
};
use super::{qmp, BootSpec, Vmm, ROOT_SERIAL, WORK_SERIAL};
use crate::config::Accel;
use crate::host::find_program;
use crate::Result;

/// The QEMU driver.
pub struct Qemu {
    accel: Accel,
    /// qboot, where QEMU's data holds it (see [`QBOOT`]).
    firmware: Option<PathBuf>,
    /// TCG's translation cache per VM, MiB.
    tcg_cache_mib: u32,
    /// The same for a restored VM.
    tcg_restore_cache_mib: u32,
    /// Whether guest memory may be merged with identical pages (KSM).
    memory_merge: bool,
    /// Whether QEMU may get transparent huge pages (guest memory, TCG's code buffer).
    huge_pages: bool,
}

/// The firmware microvm boots with: qboot, which loads a PVH kernel with its initrd and puts
/// the ACPI tables (which describe the virtio-mmio devices) where the kernel finds them.
/// QEMU ≤ 10 in Debian defaults to it; QEMU 11 in Debian defaults to SeaBIOS's microvm
/// build, with which the guest kernel never sees its initrd (banger-init is in it), so banger
/// names qboot whenever it is installed.
const QBOOT: &[&str] = &[
    "/usr/share/qemu/qboot.rom",
    "/usr/local/share/qemu/qboot.rom",
];

const QEMU: &str = "qemu-system-x86_64";
/// The bandwidth a save may use (bytes/s): no limit in practice (QEMU's default is 128 MiB/s).
const SAVE_BANDWIDTH: u64 = 1 << 40;
fn qemu_pidfile(run: &Path) -> PathBuf {
    run.join("qemu.pid")
}
fn link_pidfile(run: &Path) -> PathBuf {
    run.join("agent-link.pid")
}
/// QEMU's end of the agent's virtio-serial port, which the link helper listens on.
fn link_socket(run: &Path) -> PathBuf {
    super::jail::own_runtime(run).join("agent-link.sock")
}
/// The virtio-fs server of share `tag`: its socket (root:VM group, in root's runtime
/// directory), pid file and log.
fn share_socket(run: &Path, tag: &str) -> PathBuf {
    run.join(format!("{tag}.sock"))
}
fn share_pidfile(run: &Path, tag: &str) -> PathBuf {
    run.join(format!("{tag}.pid"))
}
/// The logger of a share's virtio-fs server's output (virtiofsd logs each bad request of
/// some kinds a guest can make): its name, its listener in root's runtime directory, and the
/// bounded log it keeps beside the console's.
fn share_logger(tag: &str) -> String {
    format!("{tag}-log")
}
fn share_output_socket(run: &Path, tag: &str) -> PathBuf {
    run.join(format!("{tag}-output.sock"))
}
fn share_log(spec: &BootSpec, tag: &str) -> PathBuf {
    log_dir(spec).join(format!("virtiofsd-{tag}.log"))
}
/// Every share's pid files in `run`, its server's and its logger's (a VM has at most
/// `vms::share::MAX_SHARES`).
fn share_pidfiles(run: &Path) -> Vec<PathBuf> {
    (0..crate::model::MAX_SHARES)
        .flat_map(|i| {
            let tag = crate::model::share_tag(i);
            [
                share_pidfile(run, &tag),
                super::console::named_logger_pidfile(run, &share_logger(&tag)),
            ]
        })
        .collect()
}

/// The virtio-fs server (`cargo install virtiofsd`).
pub const VIRTIOFSD: &str = "virtiofsd";

fn qmp_socket(run: &Path) -> PathBuf {
    super::jail::own_runtime(run).join("qmp.sock")
}
fn console_socket(run: &Path) -> PathBuf {
    super::jail::own_runtime(run).join("console.sock")
}
fn console_pidfile(run: &Path) -> PathBuf {
    super::console::logger_pidfile(run)
}
/// Where QEMU's standard output and error go: the console logger's listener, in root's
/// runtime directory (root, or systemd for it, connects; nothing of the VM's can put
/// another socket there).
fn output_socket(run: &Path) -> PathBuf {
    run.join("qemu-output.sock")
}
/// What the console logger keeps of QEMU's output, beside the console's log.
fn output_log(spec: &BootSpec) -> PathBuf {
    log_dir(spec).join("qemu.log")
}
fn marker(run: &Path) -> String {
    run.to_string_lossy().into_owned()
}

/// The VM's own directory (its disks and console log), which its processes write.
fn log_dir(spec: &BootSpec) -> &Path {
    spec.console_log.parent().unwrap_or(&spec.run_dir)
}

fn program(name: &str, hint: &str) -> Result<PathBuf> {
    find_program(name).ok_or_else(|| {
        failed(
            format!("{name} is not installed; {hint}"),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        )
    })
}

/// What `program arg` prints on its standard output (empty when it cannot be run).
fn stdout_of(program: &str, arg: &str) -> String {
    find_program(program)
        .and_then(|p| {
            std::process::Command::new(p)
                .arg(arg)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .ok()
        })
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The first line of `qemu-system-x86_64 --version` (empty when it cannot be run), asked once.
fn version_line() -> &'static str {
    static LINE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    LINE.get_or_init(|| {
        stdout_of(QEMU, "--version")
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    })
}

/// Whether this host's QEMU and virtiofsd can save a vhost-user-fs device: QEMU 8.2 moves
/// the virtio-fs server's state in its migration stream (vhost-user's device state), which
/// virtiofsd offers from 1.9 (`--migration-mode`); QEMU before 8.2 refuses to save or even
/// load a VM with such a device. Asked once.
fn folder_roots_migrate() -> std::result::Result<(), String> {
    static ANSWER: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    ANSWER
        .get_or_init(|| {
            let version = qemu_version(version_line()).ok_or("QEMU is not installed")?;
            if version < (8, 2) {
                return Err(format!(
                    "QEMU {}.{} cannot save a virtio-fs device (8.2 and later can)",
                    version.0, version.1
                ));
            }
            if find_program(VIRTIOFSD).is_none() {
                return Err("virtiofsd is not installed".into());
            }
            if !stdout_of(VIRTIOFSD, "--help").contains("--migration-mode") {
                return Err("this virtiofsd cannot move its state (1.9 and later can)".into());
            }
            Ok(())
        })
        .clone()
}

/// `(major, minor)` from `qemu-system-x86_64 --version`'s first line.
fn qemu_version(said: &str) -> Option<(u32, u32)> {
    let v = said.lines().next()?.split("version ").nth(1)?;
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| failed("QMP task failed", e))?
}

async fn output(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| failed(format!("Cannot run {what}"), e))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(failed(
            format!("{what} failed ({})", out.status),
            std::io::Error::other(stderr),
        ));
    }
    Ok(())
}

/// Whether `/dev/kvm` opens and answers KVM_GET_API_VERSION.
pub fn kvm_opens() -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    else {
        return false;
    };
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a number.
    unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION as _, 0) == 12 }
}

/// Whether this host is itself a virtual machine (the CPU's `hypervisor` flag).
pub fn host_is_a_guest() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "hypervisor"))
        })
        .unwrap_or(false)
}

impl Qemu {
    /// A driver with this accelerator choice.
    pub fn new(accel: Accel) -> Self {
        Self::configured(&crate::config::Config {
            accel,
            ..Default::default()
        })
    }

    /// The driver `config` asks for (accelerator, TCG's cache, page merging).
    pub fn configured(config: &crate::config::Config) -> Self {
        let firmware = QBOOT.iter().map(PathBuf::from).find(|p| p.is_file());
        Qemu {
            accel: config.accel,
            firmware,
            tcg_cache_mib: config.tcg_cache_mib,
            tcg_restore_cache_mib: config.tcg_restore_cache_mib.unwrap_or(config.tcg_cache_mib),
            memory_merge: config.memory_merge,
            huge_pages: config.huge_pages,
        }
    }

    /// What the VMM of `spec` may take: its guest's memory, the translation cache (TCG only)
    /// and QEMU's own heap, threads and state; huge pages only when configured.
    fn limits(&self, spec: &BootSpec, kvm: bool) -> UnitLimits {
        let tcg = if kvm { 0 } else { self.tcg_mib(spec) };
        UnitLimits {
            huge_pages: self.huge_pages,
            ..UnitLimits::vmm_with(spec.vcpus, spec.memory_mib, u64::from(tcg) + 256)
        }
    }

    /// The TCG translation cache of VM `spec`, in MiB: a restore's own size.
    fn tcg_mib(&self, spec: &BootSpec) -> u32 {
        if spec.incoming {
            self.tcg_restore_cache_mib
        } else {
            self.tcg_cache_mib
        }
    }

    /// Whether VMs get KVM (else TCG).
    pub fn uses_kvm(&self) -> bool {
        match self.accel {
            Accel::Kvm => true,
            Accel::Tcg => false,
            Accel::Auto => kvm_opens() && !host_is_a_guest(),
        }
    }

    /// The full QEMU argument list for `spec`.
    pub fn args(&self, spec: &BootSpec, kvm: bool, tsc_khz: Option<u64>) -> Vec<String> {
        let run = &spec.run_dir;
        let p = |p: &Path| p.to_string_lossy().into_owned();
        let root = if spec.root_share {
            format!("root={} rootfstype=virtiofs rw", crate::model::ROOT_TAG)
        } else {
            format!("root=serial:{ROOT_SERIAL} rw banger.work=serial:{WORK_SERIAL}")
        };
        let mut cmdline = format!("console=ttyS0 {root} panic=-1 {}", spec.cmdline);
        if let (false, Some(khz)) = (kvm, tsc_khz) {
            // Under TCG about half the boots hang calibrating the TSC without this. The guest's
            // TSC is the host's (QEMU reads it for the guest), so it is as reliable as the
            // host's own clock: without `tsc=reliable` the guest checked it against jiffies
            // twice a second, an idle VM's commonest wakeup, and could mark it unstable when
            // a busy host delays its ticks (jiffies is then its clock).
            cmdline.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
        }
        if spec.machine.balloon {
            cmdline.push_str(&super::page_reporting_arg());
        }
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!("banger-{},debug-threads=off", spec.id),
            "-M".into(),
            format!(
                "microvm,{}{}memory-backend=mem",
                if spec.machine.no_pit { "pit=off," } else { "" },
                if spec.machine.pci { "pcie=on," } else { "" }
            ),
            "-accel".into(),
            // TCG's translation cache is capped so the VMM's unit can bound its memory.
            if kvm {
                "kvm".into()
            } else {
                format!("tcg,tb-size={}", self.tcg_mib(spec))
            },
            "-cpu".into(),
            (if kvm { "host" } else { "max" }).into(),
            "-smp".into(),
            spec.vcpus.to_string(),
            "-m".into(),
            format!("{}M", spec.memory_mib),
            "-object".into(),
            self.memory_backend(spec),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            // QEMU's own seccomp filter: no obsolete calls, no setuid, no exec, no scheduler
            // or affinity changes.
            "-sandbox".into(),
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
            // The console goes to the VM's logger (bounded), never straight to a file.
            "-chardev".into(),
            format!("socket,id=con,path={}", p(&console_socket(run))),
            "-serial".into(),
            "chardev:con".into(),
            "-kernel".into(),
            p(&spec.kernel),
        ];
        if let Some(f) = &self.firmware {
            a.extend(["-bios".into(), p(f)]);
        }
        if let Some(i) = &spec.initrd {
            a.extend(["-initrd".into(), p(i)]);
        }
        a.extend(["-append".into(), cmdline]);
        // A virtio device's model on the machine's transport (see `Machine::pci`).
        let virtio = |model: &str| {
            if spec.machine.pci {
                format!("{model}-pci")
            } else {
                format!("{model}-device")
            }
        };
        let disks = [
            (ROOT_SERIAL, &spec.rootfs, "qcow2"),
            (WORK_SERIAL, &spec.work, "raw"),
        ];
        for (id, file, format) in disks.into_iter().filter(|_| !spec.root_share) {
            a.extend([
                "-drive".into(),
                format!(
                    "id={id},file={},format={format},if=none,discard=unmap",
                    p(file)
                ),
                "-device".into(),
                format!("{},drive={id},serial={id}", virtio("virtio-blk")),
            ]);
        }
        if let Some(n) = &spec.net {
            // The tap exists already (banger made it, persistent, on the bridge); QEMU, which
            // runs as the VM's uid, gets it open and attached as its fd 3 (see
            // process::Detached::tap).
            a.extend([
                "-netdev".into(),
                "tap,id=net0,fd=3".into(),
                "-device".into(),
                format!(
                    "{},netdev=net0,mac={}{}",
                    virtio("virtio-net"),
                    n.mac,
                    // No boot ROM: nothing network-boots, and QEMU would hold it in memory.
                    if spec.machine.pci { ",romfile=" } else { "" }
                ),
            ]);
        }
        for s in &spec.shares {
            a.extend([
                "-chardev".into(),
                format!("socket,id={},path={}", s.tag, p(&share_socket(run, &s.tag))),
                "-device".into(),
                format!("{},chardev={1},tag={1}", virtio("vhost-user-fs"), s.tag),
            ]);
        }
        // The agent's channel is a virtio-serial port, which migrates (a vhost-user vsock
        // device does not): snapshots need it.
        a.extend([
            "-device".into(),
            virtio("virtio-serial"),
            "-chardev".into(),
            format!("socket,id=agent,path={}", p(&link_socket(run))),
            "-device".into(),
            format!(
                "virtserialport,chardev=agent,name={}",
                banger_guest::agent::link::PORT_NAME
            ),
        ]);
        if spec.machine.balloon {
            // Pages the guest frees are reported (in blocks of `PAGE_REPORTING_ORDER`, seconds
            // after) and QEMU gives them back to the host; the balloon itself never inflates.
            a.extend([
                "-device".into(),
                format!("{},free-page-reporting=on", virtio("virtio-balloon")),
            ]);
        }
        a.extend([
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", p(&qmp_socket(run))),
        ]);
        if spec.incoming {
            // The state comes later, through QMP, from a pipe the daemon fills.
            a.extend(["-incoming".into(), "defer".into()]);
        }
        a
    }

    /// The guest memory's backend, always the block `mem` (so a saved state loads into any
    /// of them). From a snapshot's RAM: the memfd the daemon hands over as fd 4, mapped
    /// copy-on-write (or shared, for a VM's own copy; see `vmm::ram`). Else shared memory
    /// only where a vhost-user server (virtiofsd) must map it: a memfd's untouched pages are
    /// allocated on first read, and loading a saved state reads them all (a busybox restore
    /// loaded in 270 ms from a memfd, 110 ms from plain memory). QEMU marks guest memory
    /// mergeable unless told: banger asks for it only when configured (merged pages are a
    /// timing side channel between VMs).
    fn memory_backend(&self, spec: &BootSpec) -> String {
        let merge = if self.memory_merge { "on" } else { "off" };
        let size = spec.memory_mib;
        match &spec.memory {
            Some(ram) => format!(
                "memory-backend-file,id=mem,size={size}M,mem-path=/proc/self/fd/{},share={},\
                 merge={merge}",
                super::ram::GUEST_RAM_FD,
                if ram.shared { "on" } else { "off" }
            ),
            None if spec.shares.is_empty() => {
                format!("memory-backend-ram,id=mem,size={size}M,merge={merge}")
            }
            None => format!("memory-backend-memfd,id=mem,size={size}M,merge={merge},share=on"),
        }
    }

    /// Starts the VM's console logger (the helpers' program in its logger role) and waits
    /// for its socket, which QEMU then connects to.
    async fn start_console(&self, spec: &BootSpec) -> Result<()> {
        let run = &spec.run_dir;
        terminate(&console_pidfile(run), &marker(run), Duration::from_secs(2)).await;
        let sock = console_socket(run);
        let _ = std::fs::remove_file(&sock);
        let said = output_log(spec);
        let args = [
            sock.as_os_str(),
            spec.console_log.as_os_str(),
            said.as_os_str(),
        ];
        super::console::start_logger(spec, &args, &output_socket(run), &sock).await
    }

    /// Starts the VM's agent-link helper (the helpers' program in its `agent-link` role, as
    /// the VM's uid) and waits until it listens: QEMU connects its end of the agent's port
    /// to it, clients of the agent its hybrid socket.
    async fn start_link(&self, spec: &BootSpec) -> Result<()> {
        let run = &spec.run_dir;
        let bin = super::process::helper_program()?;
        terminate(&link_pidfile(run), &marker(run), Duration::from_secs(2)).await;
        let (vmm_end, clients) = (link_socket(run), self.vsock_socket(run));
        for s in [&vmm_end, &clients] {
            let _ = std::fs::remove_file(s);
        }
        spawn_detached(&Detached {
            pidfile: &link_pidfile(run),
            unit: &super::scope::helper_unit(&spec.id, "link"),
            program: &bin,
            args: &[
                banger_guest::agent::link::HELPER_ARG.as_ref(),
                vmm_end.as_os_str(),
                clients.as_os_str(),
            ],
            log: &run.join("agent-link.log"),
            output: None,
            limits: UnitLimits::helper(spec.memory_mib),
            writable: &[run],
            jail: &spec.jail,
            tap: None,
            tap_netns: None,
            listen: None,
            ram: None,
        })
        .await?;
        // The socket appears under its name only once it listens (see agent::link).
        if !wait_for_path(&vmm_end, Duration::from_secs(10)).await {
            let log = std::fs::read_to_string(run.join("agent-link.log")).unwrap_or_default();
            return Err(failed(
                "The agent link helper did not create its socket",
                std::io::Error::other(log.trim().to_owned()),
            ));
        }
        Ok(())
    }
}

impl Qemu {
    /// Starts one virtio-fs server per shared folder, each as the VM's owner in a user
    /// namespace sandbox of its own with the folder as its root, and waits until each
    /// serves its socket (which the daemon made for the VM's group and hands it as fd 3).
    async fn start_shares(&self, spec: &BootSpec) -> Result<()> {
        if spec.shares.is_empty() {
            return Ok(());
        }
        let bin = program(
            VIRTIOFSD,
            "install it with `cargo install virtiofsd` (shared folders need it)",
        )?;
        let run = &spec.run_dir;
        for s in &spec.shares {
            let (pidfile, log) = (
                share_pidfile(run, &s.tag),
                run.join(format!("{}.log", s.tag)),
            );
            let logger = share_logger(&s.tag);
            let logger_pid = super::console::named_logger_pidfile(run, &logger);
            terminate(&pidfile, &marker(run), Duration::from_secs(2)).await;
            terminate(&logger_pid, &marker(run), Duration::from_secs(2)).await;
            // Its output goes to a logger that keeps the newest of it, never straight to a
            // file a guest could make it fill.
            let (output, said) = (share_output_socket(run, &s.tag), share_log(spec, &s.tag));
            let logger_args = ["-".as_ref(), said.as_os_str()];
            super::console::start_named_logger(spec, &logger, &logger_args, &output, &output)
                .await?;
            let o = &s.owner;
            let mut args: Vec<std::ffi::OsString> = vec![
                "--fd=3".into(),
                "--shared-dir".into(),
                s.host.clone().into(),
                "--sandbox=namespace".into(),
                "--cache=auto".into(),
                // Unprivileged, it may not open file handles or raise its descriptor limit.
                "--inode-file-handles=never".into(),
                "--rlimit-nofile=0".into(),
                // Info: it says when it waits for the VMM, which is when it is ready.
                "--log-level=info".into(),
            ];
            if o.uid != 0 {
                // The guest's root is the owner in the folder, both ways.
                args.push(format!("--translate-uid=map:0:{}:1", o.uid).into());
                args.push(format!("--translate-gid=map:0:{}:1", o.gid).into());
            }
            if s.read_only {
                args.push("--readonly".into());
            }
            // Under a filter that refuses setuid and setgid modes (see `nosetid`).
            let mut wrapped: Vec<std::ffi::OsString> = vec![
                super::nosetid::NO_SETID_ARG.into(),
                "--".into(),
                bin.clone().into(),
            ];
            wrapped.extend(args);
            let argv: Vec<&std::ffi::OsStr> = wrapped.iter().map(|a| a.as_os_str()).collect();
            let sock = share_socket(run, &s.tag);
            // The run directory for its pid file (root writes it before the uid changes;
            // the owner cannot enter it), the folder when the guest may write it.
            let mut writable: Vec<&Path> = vec![run];
            if !s.read_only {
                writable.push(&s.host);
            }
            let owner = super::jail::Jail {
                uid: o.uid,
                gid: o.gid,
                groups: o.groups.clone(),
                hide: spec.jail.hide.clone(),
                read_only: Vec::new(),
                private: false,
                offline: false,
            };
            super::process::spawn_as_owner(&Detached {
                pidfile: &pidfile,
                unit: &super::scope::helper_unit(&spec.id, &s.tag),
                program: &super::process::bangerd_program()?,
                args: &argv,
                log: &log,
                output: Some(&output),
                limits: UnitLimits::helper(spec.memory_mib),
                writable: &writable,
                jail: &owner,
                tap: None,
                tap_netns: None,
                listen: Some((&sock, spec.jail.gid)),
                ram: None,
            })
            .await?;
            // virtiofsd says it waits for the VMM once its sandbox is up; an exit first is a
            // failure, in its words.
            let ready = "Waiting for vhost-user";
            let waited = super::process::wait_for_log(
                &pidfile,
                &marker(run),
                &said,
                ready,
                Duration::from_secs(10),
            )
            .await;
            if waited.is_err() {
                // Its last words are with its logger, which ends once it has them all (once
                // the server is gone: it may still run, silent, at the limit).
                terminate(&pidfile, &marker(run), Duration::from_secs(2)).await;
                wait_exit(&logger_pid, &marker(run), Duration::from_secs(3)).await;
                terminate(&logger_pid, &marker(run), Duration::from_secs(2)).await;
                let mut words = std::fs::read_to_string(&log).unwrap_or_default();
                let tail = super::console::read_tail(&said, 16 * 1024).unwrap_or_default();
                words.push_str(&String::from_utf8_lossy(&tail));
                return Err(failed(
                    format!("Cannot share {}", s.host.display()),
                    std::io::Error::other(words.trim().to_owned()),
                ));
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Vmm for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn virtio_pci(&self) -> bool {
        true
    }

    fn saves_folder_roots(&self) -> std::result::Result<(), String> {
        folder_roots_migrate()
    }

    fn version(&self) -> String {
        version_line().to_owned()
    }

    fn rootfs_path(&self, vm_dir: &Path) -> PathBuf {
        vm_dir.join("rootfs.qcow2")
    }

    fn disk_format(&self) -> super::DiskFormat {
        super::DiskFormat::Qcow2
    }

    async fn rebase_copy(&self, copy: &Path, base: &Path) -> Result<()> {
        // `-u` only rewrites the header: the backing file the VM's QEMU may have named there
        // is never opened.
        let img = program("qemu-img", "install qemu-utils")?;
        let mut cmd = Command::new(img);
        cmd.args(["rebase", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(base)
            .arg(copy);
        output(&mut cmd, "qemu-img rebase").await.map(|_| ())
    }

    async fn prepare_rootfs(
        &self,
        base: &Path,
        format: super::DiskFormat,
        vm_dir: &Path,
        size: Option<u64>,
    ) -> Result<PathBuf> {
        let out = self.rootfs_path(vm_dir);
        let (o, base) = (out.clone(), base.to_owned());
        tokio::task::spawn_blocking(move || super::qcow2::create_overlay(&o, &base, format, size))
            .await
            .map_err(|e| failed("Root disk task failed", e))??;
        Ok(out)
    }

    async fn boot(&self, spec: &BootSpec) -> Result<()> {
        let qemu = program(QEMU, "install qemu-system-x86")?;
        let kvm = self.uses_kvm();
        let _ = std::fs::remove_file(qmp_socket(&spec.run_dir));
        // The two helpers QEMU connects to start side by side.
        tokio::try_join!(self.start_console(spec), self.start_link(spec))?;
        if let Err(e) = self.start_shares(spec).await {
            self.kill(&spec.run_dir).await?;
            return Err(e);
        }
        let args = self.args(spec, kvm, crate::host::tsc_khz());
        // Under KVM the VMM's uid needs /dev/kvm's group as well.
        let mut jail = spec.jail.clone();
        if kvm {
            use std::os::unix::fs::MetadataExt;
            if let Ok(m) = std::fs::metadata("/dev/kvm") {
                jail.groups.push(m.gid());
            }
        }
        tracing::debug!(vm_id = %spec.id, "{QEMU} {}", args.join(" "));
        let run = &spec.run_dir;
        let log_path = run.join("qemu.log");
        let argv: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        spawn_detached(&Detached {
            pidfile: &qemu_pidfile(run),
            unit: &super::scope::vm_unit(&spec.id),
            program: &qemu,
            args: &argv,
            log: &log_path,
            output: Some(&output_socket(run)),
            limits: self.limits(spec, kvm),
            writable: &[run, log_dir(spec)],
            jail: &jail,
            tap: spec.net.as_ref().map(|n| n.tap.as_str()),
            tap_netns: spec.net.as_ref().and_then(|n| n.netns.as_deref()),
            listen: None,
            ram: spec.memory.as_ref().map(|m| &*m.fd),
        })
        .await?;
        // An early exit is a failed boot, with QEMU's words.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let alive = self.running(run);
            // Up once its QMP socket accepts a connection: the file exists between QEMU's
            // bind and its listen, and a restore talks to QMP at once.
            if alive && super::jail::connect(&qmp_socket(run)).is_ok() {
                return Ok(());
            }
            // The pid is written before QEMU runs: a pid that no longer exists means it
            // exited (an empty file is a shell still writing it; a command line read during
            // the exec may be empty, so existence is what counts here).
            let gone = super::process::read_pid(&qemu_pidfile(run))
                .is_some_and(|pid| !super::process::exists(pid));
            let late = tokio::time::Instant::now() > deadline;
            if gone || late {
                // QEMU's last words are with its console logger, which ends once it has
                // them all (QEMU's output closed); then everything of the VM's goes.
                if gone {
                    wait_exit(&console_pidfile(run), &marker(run), Duration::from_secs(3)).await;
                }
                self.kill(run).await?;
                let mut msg = std::fs::read_to_string(&log_path).unwrap_or_default();
                let said =
                    super::console::read_tail(&output_log(spec), 16 * 1024).unwrap_or_default();
                msg.push_str(&String::from_utf8_lossy(&said));
                return Err(failed(
                    format!(
                        "{QEMU} {}",
                        if gone {
                            "exited at start"
                        } else {
                            "did not open its QMP socket within 30 s"
                        }
                    ),
                    std::io::Error::other(msg.trim().to_owned()),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn liveness(&self, run_dir: &Path) -> super::process::Liveness {
        super::process::liveness(&qemu_pidfile(run_dir), &marker(run_dir))
    }

    fn pids(&self, run_dir: &Path) -> Vec<u32> {
        [
            qemu_pidfile(run_dir),
            link_pidfile(run_dir),
            console_pidfile(run_dir),
        ]
        .iter()
        .chain(share_pidfiles(run_dir).iter())
        .filter_map(|f| live_pid(f, &marker(run_dir)))
        .map(|p| p as u32)
        .collect()
    }

    async fn pause(&self, run_dir: &Path) -> Result<()> {
        qmp::execute(&qmp_socket(run_dir), "stop").await.map(|_| ())
    }

    async fn resume(&self, run_dir: &Path) -> Result<()> {
        qmp::execute(&qmp_socket(run_dir), "cont").await.map(|_| ())
    }

    async fn save_state(&self, run_dir: &Path, out: std::os::fd::OwnedFd) -> Result<()> {
        let sock = qmp_socket(run_dir);
        blocking(move || {
            use std::os::fd::AsFd;
            let mut s = qmp::Session::connect(&sock)?;
            s.pass_fd("banger-save", out.as_fd())?;
            // QEMU holds its own copy now: the pipe ends when QEMU closes it.
            drop(out);
            // QEMU caps a migration at 128 MiB/s unless told otherwise (`max-bandwidth`): a
            // limit for a live migration sharing a network with a running guest. A save goes
            // to a pipe on this host from a paused VM, so the cap only made it wait.
            s.command(
                "migrate-set-parameters",
                serde_json::json!({ "max-bandwidth": SAVE_BANDWIDTH }),
            )?;
            s.command("migrate", serde_json::json!({ "uri": "fd:banger-save" }))?;
            s.wait_migration(Duration::from_secs(600))
        })
        .await
    }

    async fn load_state(&self, spec: &BootSpec, input: std::os::fd::OwnedFd) -> Result<()> {
        let sock = qmp_socket(&spec.run_dir);
        blocking(move || {
            use std::os::fd::AsFd;
            let mut s = qmp::Session::connect(&sock)?;
            s.pass_fd("banger-load", input.as_fd())?;
            drop(input);
            s.command(
                "migrate-incoming",
                serde_json::json!({ "uri": "fd:banger-load" }),
            )?;
            s.wait_migration(Duration::from_secs(600))
        })
        .await
    }

    async fn request_power_off(&self, run_dir: &Path) -> Result<()> {
        qmp::execute(&qmp_socket(run_dir), "system_powerdown")
            .await
            .map(|_| ())
    }

    async fn kill(&self, run_dir: &Path) -> Result<()> {
        let m = marker(run_dir);
        terminate(&qemu_pidfile(run_dir), &m, Duration::from_secs(3)).await;
        terminate(&link_pidfile(run_dir), &m, Duration::from_secs(2)).await;
        terminate(&console_pidfile(run_dir), &m, Duration::from_secs(2)).await;
        for pidfile in share_pidfiles(run_dir) {
            terminate(&pidfile, &m, Duration::from_secs(2)).await;
        }
        for i in 0..crate::model::MAX_SHARES {
            let tag = crate::model::share_tag(i);
            let _ = std::fs::remove_file(share_socket(run_dir, &tag));
            let _ = std::fs::remove_file(share_output_socket(run_dir, &tag));
        }
        for s in [
            qmp_socket(run_dir),
            console_socket(run_dir),
            link_socket(run_dir),
            self.vsock_socket(run_dir),
        ] {
            let _ = std::fs::remove_file(s);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_versions_are_read_from_its_first_line() {
        assert_eq!(
            qemu_version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)\nCopyright"),
            Some((7, 2))
        );
        assert_eq!(
            qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)"),
            Some((10, 0))
        );
        assert_eq!(qemu_version("QEMU emulator version 11.0.0"), Some((11, 0)));
        assert_eq!(qemu_version("nothing"), None);
        assert!(qemu_version("QEMU emulator version 8.1.5").unwrap() < (8, 2));
    }

    fn spec() -> BootSpec {
        BootSpec {
            name: "t".into(),
            id: "00ff".into(),
            vcpus: 2,
            memory_mib: 512,
            kernel: "/k/vmlinux".into(),
            initrd: Some("/k/initrd.img".into()),
            cmdline: "quiet".into(),
            rootfs: "/v/rootfs.qcow2".into(),
            work: "/v/work.ext4".into(),
            cid: 7,
            run_dir: "/run/banger/vms/00ff".into(),
            console_log: "/v/console.log".into(),
            shares: Vec::new(),
            root_share: false,
            net: Some(crate::vmm::NetSpec {
                tap: "bgr0123456789ab".into(),
                mac: "02:01:23:45:67:89".into(),
                netns: None,
            }),
            jail: crate::vmm::jail::Jail {
                uid: crate::vmm::jail::vm_uid(3),
                gid: crate::vmm::jail::vm_uid(3),
                groups: vec![crate::vmm::jail::vmm_gid()],
                hide: Vec::new(),
                read_only: Vec::new(),
                private: false,
                offline: false,
            },
            incoming: false,
            machine: crate::vmm::Machine {
                balloon: true,
                no_pit: true,
                pci: false,
            },
            memory: None,
        }
    }

    #[test]
    fn tcg_gets_the_tsc_frequency_and_kvm_does_not() {
        let q = Qemu::new(Accel::Tcg);
        let a = q.args(&spec(), false, Some(2596140)).join(" ");
        assert!(a.contains("-accel tcg,tb-size=64 -cpu max"), "{a}");
        assert!(
            a.contains("-chardev socket,id=con,path=/run/banger/vms/00ff/jail/console.sock"),
            "{a}"
        );
        assert!(a.contains("tsc_early_khz=2596140 tsc=reliable"), "{a}");
        assert!(a.contains("-M microvm,pit=off,memory-backend=mem "), "{a}");
        assert!(
            a.contains("root=serial:root rw banger.work=serial:work"),
            "{a}"
        );
        assert!(
            a.contains("memory-backend-ram,id=mem,size=512M,merge=off"),
            "{a}"
        );
        assert!(
            a.contains("-device virtio-balloon-device,free-page-reporting=on"),
            "{a}"
        );
        assert!(a.contains(" page_reporting.page_reporting_order=5"), "{a}");
        assert!(
            a.contains("virtio-blk-device,drive=work,serial=work"),
            "{a}"
        );
        assert!(!a.contains("-daemonize"), "{a}");
        assert!(
            a.contains(
                "-netdev tap,id=net0,fd=3 \
                 -device virtio-net-device,netdev=net0,mac=02:01:23:45:67:89"
            ),
            "{a}"
        );
        let a = q.args(&spec(), true, Some(2596140)).join(" ");
        assert!(
            a.contains("-accel kvm -cpu host")
                && !a.contains("tsc_early_khz")
                && !a.contains("tsc=reliable"),
            "{a}"
        );
    }

    #[test]
    fn the_cache_merging_and_balloon_follow_the_configuration_and_the_machine() {
        let q = Qemu::configured(&crate::config::Config {
            accel: Accel::Tcg,
            tcg_cache_mib: 32,
            tcg_restore_cache_mib: Some(16),
            memory_merge: true,
            ..Default::default()
        });
        let mut s = spec();
        s.machine = crate::vmm::Machine::default();
        let a = q.args(&s, false, None).join(" ");
        assert!(a.contains("-accel tcg,tb-size=32 "), "{a}");
        s.incoming = true;
        let restore = q.args(&s, false, None).join(" ");
        assert!(restore.contains("-accel tcg,tb-size=16 "), "{restore}");
        s.incoming = false;
        assert!(a.contains(",merge=on"), "{a}");
        // Its unit holds the cache beside the guest; no huge pages unless configured.
        let l = q.limits(&s, false);
        assert_eq!(l.memory_max, (512 + 32 + 256) << 20);
        assert!(!l.huge_pages);
        let huge = Qemu::configured(&crate::config::Config {
            huge_pages: true,
            ..Default::default()
        });
        assert!(huge.limits(&s, true).huge_pages);
        assert_eq!(huge.limits(&s, true).memory_max, (512 + 256) << 20);
        // A VM restored from a snapshot without a balloon gets none.
        assert!(
            !a.contains("balloon") && !a.contains("page_reporting"),
            "{a}"
        );
        assert_eq!(crate::vmm::Machine::parse(""), Some(Default::default()));
        let m = crate::vmm::Machine::parse("balloon").unwrap();
        assert!(m.balloon && !m.no_pit && m.spelled() == "balloon");
        assert_eq!(crate::vmm::Machine::parse("balloon,hotplug-cpus"), None);
        // A VM booted before banger dropped the PIT (an empty or a balloon-only spelling),
        // and so each of its snapshots, restores with one: its saved state has the device.
        assert!(a.contains("-M microvm,memory-backend=mem "), "{a}");
        let cold = crate::vmm::Machine::current(&Default::default(), false);
        assert!(
            cold.no_pit && cold.spelled() == "balloon,no-pit",
            "{cold:?}"
        );
        assert_eq!(crate::vmm::Machine::parse(&cold.spelled()), Some(cold));
        let template = crate::vmm::Machine::template(false);
        assert_eq!(template.spelled(), "no-pit");
        assert_eq!(crate::vmm::Machine::parse("no-pit"), Some(template));
        // A guest that can have its devices on PCI: the word is recorded, so its snapshots
        // restore onto PCI, and those made before onto MMIO.
        let pci = crate::vmm::Machine::current(&Default::default(), true);
        assert_eq!(pci.spelled(), "balloon,no-pit,pci");
        assert_eq!(crate::vmm::Machine::parse("balloon,no-pit,pci"), Some(pci));
        assert_eq!(crate::vmm::Machine::template(true).spelled(), "no-pit,pci");
    }

    /// [`spec`] with a shared folder, `share0`.
    fn spec_with_a_share() -> BootSpec {
        let mut s = spec();
        s.shares.push(crate::vmm::ShareSpec {
            tag: "share0".into(),
            host: "/home/u/src".into(),
            read_only: false,
            owner: crate::callerfile::Creds {
                uid: 1000,
                gid: 1000,
                groups: vec![1000],
            },
        });
        s
    }

    #[test]
    fn a_pci_machine_puts_every_virtio_device_on_pci() {
        let mut s = spec_with_a_share();
        let q = Qemu::new(Accel::Tcg);
        let mmio = q.args(&s, false, None).join(" ");
        s.machine.pci = true;
        let a = q.args(&s, false, None).join(" ");
        assert!(
            a.contains("-M microvm,pit=off,pcie=on,memory-backend=mem "),
            "{a}"
        );
        for device in [
            "virtio-blk-pci,drive=root,serial=root",
            "virtio-blk-pci,drive=work,serial=work",
            "virtio-net-pci,netdev=net0,mac=02:01:23:45:67:89,romfile= ",
            "vhost-user-fs-pci,chardev=share0,tag=share0",
            "-device virtio-serial-pci ",
            "virtio-balloon-pci,free-page-reporting=on",
        ] {
            assert!(a.contains(device), "{device} in {a}");
        }
        // Nothing else changes: the same arguments, device for device, in the same order
        // (a saved state loads only into the devices it was saved with).
        let renamed = mmio
            .replace("microvm,pit=off,", "microvm,pit=off,pcie=on,")
            .replace(",mac=02:01:23:45:67:89", ",mac=02:01:23:45:67:89,romfile=")
            .split(' ')
            .map(|w| match w.split_once(',') {
                Some((m, rest)) if m.ends_with("-device") => {
                    format!("{}-pci,{rest}", m.trim_end_matches("-device"))
                }
                _ if w.ends_with("-device") && w != "-device" => {
                    format!("{}-pci", w.trim_end_matches("-device"))
                }
                _ => w.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(a, renamed);
    }

    #[test]
    fn memory_is_shared_only_with_a_shared_folder() {
        let s = spec_with_a_share();
        let a = Qemu::new(Accel::Tcg).args(&s, false, None).join(" ");
        assert!(
            a.contains("memory-backend-memfd,id=mem,size=512M,merge=off,share=on"),
            "{a}"
        );
        assert!(
            a.contains("vhost-user-fs-device,chardev=share0,tag=share0"),
            "{a}"
        );
    }
}
