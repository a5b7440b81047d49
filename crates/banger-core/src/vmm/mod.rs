//! Virtual machine monitors behind one small trait. `qemu` runs everywhere (microvm,
//! virtio-mmio, KVM or TCG); `firecracker` needs a usable `/dev/kvm` and its binary.
//!
//! A VMM's processes outlive the daemon (idle exit, restart): everything needed to find them
//! again lives in the VM's runtime directory (pid files, and sockets in its jail), so the daemon can
//! re-adopt or clean up a VM from that directory alone.

pub mod console;
mod error;
pub mod firecracker;
pub mod jail;
pub mod nosetid;
pub mod process;
pub mod qcow2;
pub mod qemu;
pub mod qmp;
pub mod ram;
pub mod ramsplit;
pub mod scope;

pub use error::VmmError;

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use crate::Result;

/// Everything a VMM needs to boot one VM.
#[derive(Debug, Clone)]
pub struct BootSpec {
    /// The VM's id (names its processes and units, `banger-vm-<id>.service`).
    pub id: String,
    /// The VM's name (for messages; units and machines are named by id).
    pub name: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// The ELF vmlinux.
    pub kernel: PathBuf,
    /// The initrd.
    pub initrd: Option<PathBuf>,
    /// The kernel command line, without what the VMM adds itself.
    pub cmdline: String,
    /// The per-VM root disk.
    pub rootfs: PathBuf,
    /// The persistent work disk mounted at `/root`.
    pub work: PathBuf,
    /// The guest's vsock CID.
    pub cid: u32,
    /// Pid files and logs (`/run/banger/vms/<id>`, root's); the VM's sockets are in its
    /// [`jail::own_runtime`] directory.
    pub run_dir: PathBuf,
    /// The serial console's log file.
    pub console_log: PathBuf,
    /// The guest's NIC, when it has one.
    pub net: Option<NetSpec>,
    /// Shared host folders, each served by a virtio-fs server as its owner.
    pub shares: Vec<ShareSpec>,
    /// The root is the share tagged `rootfs` (a VM's root folder), not the disks `rootfs`
    /// and `work`, which it has none of.
    pub root_share: bool,
    /// Who the VM's processes run as.
    pub jail: jail::Jail,
    /// Wait for a saved state ([`Vmm::load_state`]) instead of booting the kernel.
    pub incoming: bool,
    /// The devices beyond the fixed set.
    pub machine: Machine,
    /// The guest's memory when it starts from a snapshot's RAM file (see [`ram`]); else the
    /// VMM allocates it.
    pub memory: Option<ram::GuestRam>,
}

/// The smallest block of free guest memory (2^order pages: 128 KiB) the guest reports to the
/// host through the balloon. The kernel's default is a pageblock (order 9, 2 MiB), which left
/// what a boot frees in smaller runs (the initramfs, init sections) on the host: a cold
/// busybox VM's guest memory measured 118 MiB with it, 102 with order 5, 101 with order 3
/// or 0 (which report 4 and 32 times as many blocks for that last MiB).
pub const PAGE_REPORTING_ORDER: u32 = 5;

/// The kernel command line argument that asks for [`PAGE_REPORTING_ORDER`] (banger-init sets
/// it again after the balloon driver loads, on kernels that let the driver override it).
pub fn page_reporting_arg() -> String {
    format!(
        " {}={PAGE_REPORTING_ORDER}",
        crate::guestinit::PAGE_REPORTING_PARAM
    )
}

/// On every guest's command line: the memory controller charges no kernel memory. With the
/// accounting on, a kernel zeroes a table of 8 bytes per 4 bytes of its first per-CPU chunk at
/// boot (`obj_cgroups`, 4 MiB of every guest: a cold busybox guest on Debian's kernel held 70
/// MiB with it, 66 without), for limits inside a sandbox that is itself the limit (a guest's
/// own cgroups still count and cap user memory). banger's microVM kernel has it built in.
pub const NO_KERNEL_MEMORY_ACCOUNTING: &str = "cgroup.memory=nokmem";

/// How a VMM's devices differ from the fixed set. A saved state loads only into a VMM with
/// the same devices, so a VM's row and each snapshot record them (as [`Machine::spelled`]),
/// and a restore starts the VMM with the snapshot's set, not today's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Machine {
    /// A virtio-balloon device that takes the pages the guest frees back from it (free page
    /// reporting); it never inflates.
    pub balloon: bool,
    /// No i8254 PIT (QEMU). Its channel 0 runs from reset as an 18.2 Hz square wave whether the
    /// guest uses it or not, and Linux on a CPU whose APIC timer always runs (ARAT) ticks on
    /// that timer and leaves the PIT alone (Debian's 6.1 never stops it): an idle VM's QEMU
    /// woke 36 times a second to toggle an interrupt line no one listened to. VMs booted
    /// before banger dropped it, and so their snapshots, have one (the empty spelling).
    pub no_pit: bool,
    /// Virtio devices on PCI (QEMU's microvm with `pcie=on`), not MMIO. QEMU's virtio-mmio
    /// offers every queue 1024 entries whatever the device asks for (virtio-serial: 128 a
    /// port, 32 for control; block and network 256), and Linux fills receive queues and sizes
    /// request pools to what is offered: the agent port's and virtio-serial's control queue's
    /// receive buffers alone held 8 MiB of every guest's memory. On PCI each queue has what its
    /// device asks for. Only for a guest whose initrd loads the transport (see
    /// `kernels::initrd::VIRTIO_PCI`); VMs booted before, and so their snapshots, are on MMIO.
    pub pci: bool,
}

impl Machine {
    /// What a cold boot gets under `config`; `pci` when the VMM and the guest's initrd can.
    pub fn current(config: &crate::config::Config, pci: bool) -> Self {
        Machine {
            balloon: config.free_page_reporting,
            no_pit: true,
            pci,
        }
    }

    /// What a warm snapshot's template VM gets: no balloon, since every warm start maps its
    /// snapshot's memory (see [`ram`]).
    pub fn template(pci: bool) -> Self {
        Machine {
            balloon: false,
            no_pit: true,
            pci,
        }
    }

    /// The set a row spells (a comma list; empty for the fixed set); `None` for a device this
    /// build does not know (a snapshot a newer banger made).
    pub fn parse(s: &str) -> Option<Self> {
        let mut m = Machine::default();
        for word in s.split(',').filter(|w| !w.is_empty()) {
            match word {
                "balloon" => m.balloon = true,
                "no-pit" => m.no_pit = true,
                "pci" => m.pci = true,
                _ => return None,
            }
        }
        Some(m)
    }

    /// How rows spell it.
    pub fn spelled(self) -> String {
        let mut words = Vec::new();
        if self.balloon {
            words.push("balloon");
        }
        if self.no_pit {
            words.push("no-pit");
        }
        if self.pci {
            words.push("pci");
        }
        words.join(",")
    }
}

/// The guest NIC: a tap the host made and the MAC the guest sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// The host tap device.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: String,
    /// The network namespace the tap is in (see `net::netns`); `None`: the daemon's.
    pub netns: Option<String>,
}

/// A shared folder: its virtio-fs tag, the host folder, and whose rights serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSpec {
    /// The tag the guest mounts (`share0`…).
    pub tag: String,
    /// The host folder.
    pub host: PathBuf,
    /// Whether the guest may only read it.
    pub read_only: bool,
    /// The VM's owner, whose server serves it.
    pub owner: crate::callerfile::Creds,
}

/// How a disk file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// A plain image (an image's ext4).
    Raw,
    /// A qcow2 file (a VM's root disk on QEMU, and so a snapshot's).
    Qcow2,
}

impl DiskFormat {
    /// QEMU's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// The serial number of the root disk, which `banger-init` finds it by (`root=serial:root`).
pub const ROOT_SERIAL: &str = "root";
/// The serial number of the work disk (`banger.work=serial:work`).
pub const WORK_SERIAL: &str = "work";

/// A VMM driver.
#[async_trait]
pub trait Vmm: Send + Sync {
    /// `qemu` or `firecracker`.
    fn name(&self) -> &'static str;

    /// Where the VM's own root disk lives in its directory.
    fn rootfs_path(&self, vm_dir: &Path) -> PathBuf;

    /// How the VM's own root disk is laid out (and so a snapshot's copy of it).
    fn disk_format(&self) -> DiskFormat;

    /// Makes `copy`, a snapshot's copy of a VM's root disk, layer on `base` (the image's raw
    /// disk) whatever the VM wrote in its header, so nothing later follows a name the VM
    /// chose. Raw disks have no header: nothing to do.
    async fn rebase_copy(&self, _copy: &Path, _base: &Path) -> Result<()> {
        Ok(())
    }

    /// Makes the VM's own root disk from `base` (an image's raw root disk, or a snapshot's
    /// `format` disk), in `vm_dir`, at least `size` bytes.
    async fn prepare_rootfs(
        &self,
        base: &Path,
        format: DiskFormat,
        vm_dir: &Path,
        size: Option<u64>,
    ) -> Result<PathBuf>;

    /// Starts the VM; returns once the VMM runs (not when the guest is up).
    async fn boot(&self, spec: &BootSpec) -> Result<()>;

    /// What the VMM says of its version (a saved state loads into the VMM that saved it:
    /// warm snapshots are keyed by it).
    fn version(&self) -> String {
        String::new()
    }

    /// Whether a VM whose root is a folder (virtio-fs) can be saved and restored, which warm
    /// starts of folder roots need; `Err` says why not.
    fn saves_folder_roots(&self) -> std::result::Result<(), String> {
        Err(format!("the {} VMM has no virtio-fs to save", self.name()))
    }

    /// Whether the VM's VMM process is alive.
    fn running(&self, run_dir: &Path) -> bool {
        matches!(self.liveness(run_dir), process::Liveness::Alive(_))
    }

    /// Whether the VM's VMM process is alive, gone, or not known now (see
    /// [`process::Liveness`]): what the watchers act on.
    fn liveness(&self, run_dir: &Path) -> process::Liveness;

    /// The VM's live processes, the VMM first (its leader).
    fn pids(&self, run_dir: &Path) -> Vec<u32>;

    /// Whether it can put a VM's virtio devices on PCI ([`Machine::pci`]).
    fn virtio_pci(&self) -> bool {
        false
    }

    /// The host side of the guest's vsock (hybrid `CONNECT <port>` protocol).
    fn vsock_socket(&self, run_dir: &Path) -> PathBuf {
        jail::own_runtime(run_dir).join("vsock.sock")
    }

    /// Stops the guest's vCPUs, keeping its memory and devices (QMP `stop`, Firecracker's
    /// `PATCH /vm Paused`).
    async fn pause(&self, run_dir: &Path) -> Result<()>;

    /// Lets a paused guest go on.
    async fn resume(&self, run_dir: &Path) -> Result<()>;

    /// Writes the paused VM's memory and device state to `out` (a pipe the daemon reads),
    /// returning once all of it is written; the VM stays paused.
    async fn save_state(&self, run_dir: &Path, out: std::os::fd::OwnedFd) -> Result<()>;

    /// Loads a state [`Vmm::save_state`] wrote, from `input`, into the VM `spec` booted with
    /// `incoming`; returns once loaded, the VM paused.
    async fn load_state(&self, spec: &BootSpec, input: std::os::fd::OwnedFd) -> Result<()>;

    /// Asks the guest to power off (ACPI power button or Ctrl-Alt-Del).
    async fn request_power_off(&self, run_dir: &Path) -> Result<()>;

    /// Kills the VMM and its helpers and removes their sockets; fine when nothing runs.
    async fn kill(&self, run_dir: &Path) -> Result<()>;
}

/// The driver the configuration asks for: `auto` is Firecracker when its binary and a
/// usable `/dev/kvm` exist, else QEMU.
pub fn select(config: &crate::config::Config) -> std::sync::Arc<dyn Vmm> {
    use crate::config::VmmChoice;
    match config.vmm {
        VmmChoice::Firecracker => std::sync::Arc::new(firecracker::Firecracker),
        VmmChoice::Auto if firecracker::usable() => std::sync::Arc::new(firecracker::Firecracker),
        VmmChoice::Auto | VmmChoice::Qemu => std::sync::Arc::new(qemu::Qemu::configured(config)),
    }
}
