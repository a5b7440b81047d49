//! A cold-booted VM's memory, moved once its guest is up (stage `move_memory`): the boot leaves
//! behind what an idle guest never touches again (the kernel's init code and data, what
//! userspace's start read and freed, the page cache of files read once) and, under TCG, a
//! translation cache full of code that ran once. The VM is paused, its state saved as a
//! snapshot's is (`vmm::ramsplit`: its RAM as a plain file, the rest as a stream), and it is
//! restored at once into a fresh VMM that maps that file copy-on-write, as warm starts map a
//! snapshot's: from then on the host holds what the guest touches, the rest staying in the
//! page cache of a file on the state directory's file system, which the host may drop and read
//! again.
//!
//! The file has no name (`O_TMPFILE`): only the VM's VMM holds it, so nothing outlives the
//! VMM (a stop, a crash, a daemon killed at any point leave nothing to sweep), and no other VM
//! or user can reach it. It is the VM's own memory, handed to the VM's uid: the balloon's
//! free page reports punch holes in it as they drop the VMM's copies (QEMU does both for a
//! file it maps privately), so a guest that frees memory shrinks it too.
//!
//! A pause of a few hundred milliseconds before `ready`, once per cold boot (busybox on
//! Debian's kernel under TCG: the host kept 154 MiB of such a VM, BENCHMARKS.md *Density*).
//! Not for VMs whose memory a virtio-fs server maps too (shares, root folders), nor one that
//! runs a main process (its end could fall in the pause), nor under `huge_pages`, nor on
//! Firecracker (whose VMs boot under KVM, without TCG's cache); `move_memory_after_boot = false`
//! turns it off.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};

use super::create::Stages;
use super::error::failed;
use super::Vms;
use crate::model::Vm;
use crate::vmm::BootSpec;
use crate::Result;

/// The most the saved state beside the guest's RAM may be: device state and the firmware's
/// and ACPI tables' small blocks (a busybox VM's: some 400 KiB). A VMM that writes more is
/// not trusted with more of the daemon's memory.
const MAX_REST: usize = 64 << 20;

impl Vms {
    /// Whether this cold boot's memory moves (see the module's text).
    pub(super) fn moves_memory(&self, vm: &Vm, spec: &BootSpec, restored: bool) -> bool {
        self.config.move_memory_after_boot
            && !restored
            && !self.config.huge_pages
            && self.vmm.name() == "qemu"
            && spec.memory.is_none()
            && spec.shares.is_empty()
            && !spec.root_share
            && vm.main.is_empty()
            && !super::warm::is_template(vm)
    }

    /// Stage `move_memory`: the running guest saved and restored into a fresh VMM over its own
    /// memory file. A failure before the old VMM stops leaves the VM as it was (logged);
    /// after, it fails the start.
    pub(super) async fn move_memory(
        &self,
        st: &mut Stages<'_>,
        vm: &mut Vm,
        run: &std::path::Path,
        spec: &BootSpec,
    ) -> Result<()> {
        st.enter(
            vm,
            "move_memory",
            format!(
                "Moving the booted guest's memory to a file its {} maps copy-on-write",
                self.vmm.name()
            ),
        )
        .await?;
        let t0 = std::time::Instant::now();
        let ram = match memory_file(&self.layout.vms_dir(), spec.memory_mib) {
            Ok(ram) => ram,
            Err(e) => {
                tracing::warn!(vm_id = %vm.id, vm_name = %vm.name,
                    "The guest's memory stays where its boot left it: {e}");
                return Ok(());
            }
        };
        let saved = match self.save_for_move(run, spec, ram).await {
            Ok(saved) => saved,
            // The VM is paused (or its pause failed): it goes on as it was.
            Err(e) => {
                tracing::warn!(vm_id = %vm.id, vm_name = %vm.name,
                    "The guest's memory stays where its boot left it: {}", e.full_message());
                self.vmm.resume(run).await?;
                return Ok(());
            }
        };
        let (ram, rest) = saved;
        self.vmm.kill(run).await?;
        let spec = BootSpec {
            incoming: true,
            memory: Some(crate::vmm::ram::GuestRam {
                fd: std::sync::Arc::new(ram),
                shared: false,
            }),
            ..spec.clone()
        };
        self.vmm.boot(&spec).await?;
        let (input, feeder) = feed(rest)?;
        self.load_and_resume(&spec, input, feeder).await?;
        self.wait_agent(run).await?;
        tracing::debug!(vm_id = %vm.id, "Memory moved after {:?}", t0.elapsed());
        Ok(())
    }

    /// Pauses the VM and saves it: its RAM into `ram` (then handed to the VM's uid) and the
    /// rest into memory. Whatever fails, the VMM still runs, paused.
    async fn save_for_move(
        &self,
        run: &std::path::Path,
        spec: &BootSpec,
        ram: OwnedFd,
    ) -> Result<(OwnedFd, Vec<u8>)> {
        let (r, w) = super::snapshot::pipe()?;
        self.vmm.pause(run).await?;
        let writer = crate::jobs::spawn_blocking(move || -> std::io::Result<_> {
            let ram = std::fs::File::from(ram);
            let mut rest = Bounded(Vec::new());
            crate::vmm::ramsplit::split(r, "mem", &ram, &mut rest)?;
            Ok((ram, rest.0))
        });
        let sent = self.vmm.save_state(run, w).await;
        let written = writer
            .await
            .map_err(|e| failed("Memory move task failed", e))?;
        // The reader's failure first: it says what in the stream it could not take.
        let (ram, rest) = written.map_err(|e| failed("Cannot save the guest's memory", e))?;
        sent?;
        let (uid, gid) = (spec.jail.uid, spec.jail.gid);
        let expected = u64::from(spec.memory_mib) << 20;
        crate::jobs::spawn_blocking(move || -> std::io::Result<OwnedFd> {
            let len = ram.metadata()?.len();
            if len != expected {
                return Err(std::io::Error::other(format!(
                    "the saved RAM is {len} bytes, not the VM's {expected}"
                )));
            }
            std::os::unix::fs::fchown(&ram, Some(uid), Some(gid))?;
            Ok(ram.into())
        })
        .await
        .map_err(|e| failed("Memory move task failed", e))?
        .map(|ram| (ram, rest))
        .map_err(|e| failed("Cannot hand the guest's memory to its VMM", e))
    }
}

/// The file a VM of `memory_mib` moves its memory to: unnamed, in `dir`, where the file
/// system has room for all of it twice over (a guest may touch every page; the rest is for
/// everything else on it). Else why not.
fn memory_file(dir: &std::path::Path, memory_mib: u32) -> std::result::Result<OwnedFd, String> {
    let ram = unnamed_file(dir)
        .map_err(|e| format!("cannot make a file for it in {}: {e}", dir.display()))?;
    // SAFETY: a zeroed statvfs is a valid out-buffer; the descriptor is open.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: both are valid for the call.
    if unsafe { libc::fstatvfs(ram.as_raw_fd(), &mut st) } != 0 {
        return Err(format!("cannot tell the room left in {}", dir.display()));
    }
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    let needed = (u64::from(memory_mib) << 20).saturating_mul(2);
    if free < needed {
        return Err(format!(
            "{} has {} MiB free, less than twice the VM's memory",
            dir.display(),
            free >> 20
        ));
    }
    Ok(ram)
}

/// A new file without a name in `dir` (mode 0600), read and written through the descriptor.
fn unnamed_file(dir: &std::path::Path) -> std::io::Result<OwnedFd> {
    let dir = std::fs::File::open(dir)?;
    crate::host::openat_mode(
        dir.as_raw_fd(),
        std::path::Path::new("."),
        libc::O_TMPFILE | libc::O_RDWR,
        0o600,
    )
}

/// Feeds `rest` into a pipe whose read end is returned.
fn feed(rest: Vec<u8>) -> Result<(OwnedFd, std::thread::JoinHandle<Result<()>>)> {
    let (r, w) = super::snapshot::pipe()?;
    let feeder = std::thread::spawn(move || {
        std::fs::File::from(w)
            .write_all(&rest)
            .map_err(|e| failed("Cannot feed the saved state to the VMM", e))
    });
    Ok((r.into(), feeder))
}

/// A buffer that takes at most [`MAX_REST`] bytes.
struct Bounded(Vec<u8>);

impl Write for Bounded {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + b.len() > MAX_REST {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the VMM's state beside the guest's RAM is over {MAX_REST} bytes"),
            ));
        }
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_beside_ram_is_bounded_and_the_file_has_no_name() {
        let mut b = Bounded(Vec::new());
        b.write_all(&vec![1u8; MAX_REST - 1]).unwrap();
        let e = b.write_all(&[0u8; 2]).unwrap_err();
        assert!(e.to_string().contains("over"), "{e}");
        assert_eq!(b.0.len(), MAX_REST - 1);

        let dir = tempfile::tempdir().unwrap();
        // No file system here has room for twice 2^31 MiB.
        let e = memory_file(dir.path(), u32::MAX).unwrap_err();
        assert!(e.contains("less than twice the VM's memory"), "{e}");
        let f = std::fs::File::from(memory_file(dir.path(), 1).unwrap());
        f.set_len(1 << 20).unwrap();
        use std::os::unix::fs::{FileExt, PermissionsExt};
        f.write_all_at(b"page", 4096).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        let mut got = [0u8; 4];
        f.read_exact_at(&mut got, 4096).unwrap();
        assert_eq!(&got, b"page");
    }
}
