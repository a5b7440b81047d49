//! Start, stop, delete, watching a running VM's VMM, and re-adopting VMs at daemon start.

use std::sync::Arc;
use std::time::Duration;

use super::create::Stages;
use super::state::VmOp;
use super::{StopOptions, Vms};
use crate::auth::Action;
use crate::events::ObjectEvent;
use crate::jobs::{Job, JobSpec};
use crate::model::{Vm, VmState};
use crate::store::rows;
use crate::vmm::process::Liveness;
use crate::Result;

impl Vms {
    /// Starts a VM that is not running, as a job.
    pub async fn start(&self, uid: u32, vm: &Vm) -> Result<Arc<Job>> {
        // A second start of a starting VM is the first one.
        if let Some(job) = self.running_start(&vm.id) {
            return Ok(job);
        }
        let vm = &self.get(&vm.id).await?;
        super::state::check(vm, VmOp::Start)?;
        self.check_run_quota(vm).await?;
        let spec = JobSpec {
            kind: "start-vm".into(),
            target: vm.name.clone(),
            action: Action::VmsManage,
            owner_uid: uid,
        };
        let (this, v) = (self.clone(), vm.clone());
        let job = self.jobs.spawn(spec, move |ctx| async move {
            let mut st = Stages {
                ctx: &ctx,
                vms: &this,
                saved: true,
            };
            this.start_locked(&mut st, v).await
        });
        self.note_start(&vm.id, &job);
        Ok(job)
    }

    /// Stops a VM: the agent (or ACPI) powers the guest off; after `timeout_sec` (or at once
    /// with `force`) the VMM is killed. Stopping a VM that does not run is not an error.
    pub async fn stop(&self, vm: &Vm, o: StopOptions) -> Result<()> {
        // Stopping a starting VM cancels its start.
        self.cancel_start(&vm.id).await;
        let lock = self.lock_of(&vm.id);
        let _held = lock.lock().await;
        let mut vm = self.get(&vm.id).await?;
        super::state::check(&vm, VmOp::Stop)?;
        let run = self.layout.vm_runtime_dir(&vm.id);
        if !self.vmm.running(&run) {
            self.power_down(&vm).await?;
            if vm.state != VmState::Stopped && vm.state != VmState::Created {
                vm.state = VmState::Stopped;
                self.save(&vm).await?;
                self.stopped(&vm, "requested");
            }
            self.release_network_if_idle().await;
            return Ok(());
        }
        let paused = vm.state == VmState::Paused;
        vm.state = VmState::Stopping;
        self.save(&vm).await?;
        if paused && !o.force {
            // A paused guest cannot power itself off: it goes on first.
            if let Err(e) = self.vmm.resume(&run).await {
                tracing::warn!(vm_id = %vm.id, vm_name = %vm.name, "Cannot resume to stop: {}", e.full_message());
            }
        }
        if !o.force {
            let how = self.request_shutdown(&vm).await;
            tracing::info!(vm_id = %vm.id, vm_name = %vm.name, "Asked the guest to power off ({how})");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(o.timeout_sec.into());
            while self.vmm.running(&run) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if self.vmm.running(&run) {
                tracing::warn!(vm_id = %vm.id, vm_name = %vm.name,
                    "The guest did not power off within {} s; killing it", o.timeout_sec);
            }
        }
        self.power_down(&vm).await?;
        vm.state = VmState::Stopped;
        self.save(&vm).await?;
        self.stopped(&vm, "requested");
        self.release_network_if_idle().await;
        tracing::info!(vm_id = %vm.id, vm_name = %vm.name, "VM stopped");
        Ok(())
    }

    /// Says that `vm` stopped and why (`VMs1.VMStopped`).
    fn stopped(&self, vm: &Vm, reason: &'static str) {
        self.events.send(ObjectEvent::VmStopped {
            vm_id: vm.id.clone(),
            reason,
            exit_status: if vm.main.is_empty() {
                -1
            } else {
                vm.exit_status
            },
        });
    }

    /// Pauses a running VM: its vCPUs stop, its memory and devices stay as they are.
    pub async fn pause(&self, vm: &Vm) -> Result<()> {
        self.pause_or_resume(vm, true).await
    }

    /// Lets a paused VM go on where it was.
    pub async fn resume(&self, vm: &Vm) -> Result<()> {
        self.pause_or_resume(vm, false).await
    }

    async fn pause_or_resume(&self, vm: &Vm, pause: bool) -> Result<()> {
        let lock = self.lock_of(&vm.id);
        let _held = lock.lock().await;
        let mut vm = self.get(&vm.id).await?;
        let (op, to) = if pause {
            (VmOp::Pause, VmState::Paused)
        } else {
            (VmOp::Resume, VmState::Running)
        };
        super::state::check(&vm, op)?;
        let run = self.layout.vm_runtime_dir(&vm.id);
        if pause {
            self.vmm.pause(&run).await?;
        } else {
            self.vmm.resume(&run).await?;
        }
        vm.state = to;
        self.save(&vm).await?;
        tracing::info!(vm_id = %vm.id, vm_name = %vm.name, "VM {to}");
        if !pause {
            self.sync_clock(&vm, false).await;
        }
        Ok(())
    }

    /// Sets a guest's wall clock to the host's: stepped after a resume (while paused it stood
    /// still), with `slew` forward-only at ready (see `agent::identity::set_clock`). Best
    /// effort, bounded: an agent that does not answer (or predates the request) leaves the
    /// clock as it was, which is logged.
    pub(super) async fn sync_clock(&self, vm: &Vm, slew: bool) {
        let set = async {
            let mut s = self.open_agent_any(vm).await?;
            crate::agent::client::set_clock(&mut s, slew).await
        };
        match tokio::time::timeout(Duration::from_secs(5), set).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(vm_id = %vm.id, "Cannot set the guest's clock: {e}"),
            Err(_) => {
                tracing::warn!(vm_id = %vm.id, "The guest agent did not set its clock in 5 s")
            }
        }
    }

    async fn request_shutdown(&self, vm: &Vm) -> &'static str {
        let via_agent = async {
            let mut s = self.open_agent_any(vm).await?;
            crate::agent::client::shutdown(&mut s).await
        };
        match tokio::time::timeout(Duration::from_secs(5), via_agent).await {
            Ok(Ok(())) => "agent",
            _ => match self
                .vmm
                .request_power_off(&self.layout.vm_runtime_dir(&vm.id))
                .await
            {
                Ok(()) => "ACPI power button",
                Err(_) => "nothing answered",
            },
        }
    }

    /// A connection to the VM's agent, whatever state the store says it is in.
    pub(super) async fn open_agent_any(&self, vm: &Vm) -> Result<tokio::net::UnixStream> {
        let sock = self.vmm.vsock_socket(&self.layout.vm_runtime_dir(&vm.id));
        crate::agent::client::connect(&sock, crate::agent::PORT).await
    }

    /// Deletes a VM, its disks and its reservation; a running VM only with `force`.
    pub async fn delete(&self, vm: &Vm, force: bool) -> Result<()> {
        let op = if force {
            VmOp::ForceDelete
        } else {
            VmOp::Delete
        };
        // Refused before anything is canceled; forced, a start is canceled first.
        super::state::check(&self.get(&vm.id).await?, op)?;
        if force {
            self.cancel_start(&vm.id).await;
        }
        let lock = self.lock_of(&vm.id);
        let _held = lock.lock().await;
        let mut vm = self.get(&vm.id).await?;
        super::state::check(&vm, op)?;
        let run = self.layout.vm_runtime_dir(&vm.id);
        if self.vmm.running(&run) {
            if !force {
                // The row says it is not running, but its VMM is: the VMM is the truth.
                vm.state = VmState::Running;
                super::state::check(&vm, VmOp::Delete)?;
            }
            tracing::info!(vm_id = %vm.id, vm_name = %vm.name, "Killing the VM to delete it");
        }
        self.power_down(&vm).await?;
        crate::fault::point("vm:powered-down");
        let id = vm.id.clone();
        self.store.call(move |c| rows::delete_vm(c, &id)).await?;
        crate::fault::point("vm:unlisted");
        self.release_network_if_idle().await;
        self.events.send(ObjectEvent::VmRemoved(vm.id.clone()));
        for d in [self.vm_dir(&vm.id), run] {
            if let Err(e) = crate::layout::remove_any(&d) {
                tracing::warn!(vm_id = %vm.id, "Cannot remove {}: {e}", d.display());
            }
        }
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&vm.id);
        tracing::info!(vm_id = %vm.id, vm_name = %vm.name, "VM deleted");
        if !vm.snapshot.is_empty() {
            // It may have been the last VM on a warm snapshot a newer one replaced.
            let this = self.clone();
            tokio::spawn(async move { this.sweep_warm().await });
        }
        Ok(())
    }

    /// Watches a running VM's VMM; when it exits on its own (the guest powered off or
    /// crashed) the VM becomes `stopped` and its helpers are cleaned up. Only a VMM known to
    /// be gone counts: while its pid file or `/proc` cannot be read (descriptors or memory
    /// exhausted by someone's load) the VM, its files, walls and bridge stay as they are.
    pub(super) fn watch(&self, vm: Vm) {
        let this = self.clone();
        tokio::spawn(async move {
            let run = this.layout.vm_runtime_dir(&vm.id);
            this.wait_for_exit(&vm, &run).await;
            loop {
                let lock = this.lock_of(&vm.id);
                let held = lock.lock().await;
                match this.vmm.liveness(&run) {
                    // Stopped and started again while this waited for the lock: that boot
                    // has a watcher of its own.
                    Liveness::Alive(_) => return,
                    Liveness::Unknown(e) => {
                        tracing::warn!(vm_id = %vm.id, vm_name = %vm.name,
                            "Cannot tell whether the VM's VMM still runs ({e}); leaving it as it is");
                        drop(held);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    Liveness::Gone => {}
                }
                let Ok(mut now) = this.get(&vm.id).await else {
                    return;
                };
                if matches!(now.state, VmState::Running | VmState::Paused) {
                    let _ = this.power_down(&now).await;
                    now.state = VmState::Stopped;
                    if !now.main.is_empty() {
                        now.exit_status = this.main_exit_status(&now.id).unwrap_or(-1);
                    }
                    tracing::info!(vm_id = %vm.id, vm_name = %vm.name, "The VM powered off");
                    let _ = this.save(&now).await;
                    let why = if now.main.is_empty() {
                        "powered-off"
                    } else {
                        "exited"
                    };
                    this.stopped(&now, why);
                    this.release_network_if_idle().await;
                }
                return;
            }
        });
    }

    /// Returns once the VM's VMM is known to have exited: through a pidfd (which cannot miss
    /// the exit once open), else by reading its pid file every half second, where a failure
    /// to read is never taken for an exit.
    async fn wait_for_exit(&self, vm: &Vm, run: &std::path::Path) {
        let mut warned = false;
        loop {
            let pid = match self.vmm.liveness(run) {
                Liveness::Gone => return,
                Liveness::Alive(pid) => pid,
                Liveness::Unknown(e) => {
                    if !warned {
                        tracing::warn!(vm_id = %vm.id, vm_name = %vm.name,
                            "Cannot tell whether the VM's VMM still runs ({e}); asking again");
                        warned = true;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            // pid 0: a VMM without a process of its own (the unit tests' stand-ins).
            let fd = if pid > 0 {
                crate::vmm::process::pidfd(pid)
            } else {
                Err(std::io::Error::from_raw_os_error(libc::ENOSYS))
            };
            // The pidfd is the VMM's only if the pid still names it after the open.
            let fd = fd
                .ok()
                .filter(|_| self.vmm.liveness(run).pid() == Some(pid));
            if let Some(fd) = fd {
                // SAFETY: `fd` is an OwnedFd the AsyncFd owns for its whole life: it stays
                // open and names the same pidfd until the AsyncFd drops it.
                let registered = unsafe {
                    tokio::io::unix::AsyncFd::register_with_interest(
                        fd,
                        tokio::io::Interest::READABLE,
                    )
                };
                if let Ok(fd) = registered {
                    // Readable once the process exited.
                    let _ = fd.readable().await;
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// At daemon start: VMs whose VMM still runs are watched again; the others are marked
    /// `stopped` (or `failed`, if they died while starting) and their helpers cleaned up.
    pub async fn adopt(&self) -> Result<()> {
        let vms = self.list().await?;
        let ids: std::collections::HashSet<String> = vms.iter().map(|v| v.id.clone()).collect();
        // The taps of the VMs that stay live: the re-adopted ones.
        let mut keep = Vec::new();
        for mut vm in vms {
            if !vm.state.is_active() {
                continue;
            }
            let run = self.layout.vm_runtime_dir(&vm.id);
            // Not known is not gone: such a VM is watched, and its watcher waits until it
            // can tell.
            let alive = !matches!(self.vmm.liveness(&run), Liveness::Gone);
            match (vm.state, alive) {
                (VmState::Running | VmState::Paused, true) => {
                    tracing::info!(vm_id = %vm.id, vm_name = %vm.name, "Re-adopted a {} VM", vm.state);
                    keep.push(vm.tap_name.clone());
                    self.watch(vm);
                    continue;
                }
                (VmState::Starting, _) => {
                    tracing::warn!(vm_id = %vm.id, vm_name = %vm.name,
                        "The VM was starting when the daemon stopped; marking it failed");
                    vm.state = VmState::Failed;
                }
                _ => {
                    tracing::info!(vm_id = %vm.id, vm_name = %vm.name,
                        "The VM stopped while the daemon was away");
                    vm.state = VmState::Stopped;
                }
            }
            self.power_down(&vm).await?;
            self.save(&vm).await?;
        }
        self.stop_rowless_vmms(&ids).await?;
        // Taps no live VM owns: made by a daemon killed before it recorded the VM's start,
        // or left by a VM whose row is gone.
        match self.net.remove_stray_taps(&keep).await {
            Ok(removed) => {
                for tap in removed {
                    tracing::warn!(tap = %tap, "Removed tap {tap}: no live VM owns it");
                }
            }
            Err(e) => tracing::warn!("Cannot sweep stray taps: {}", e.full_message()),
        }
        // Walls naming a tap no live VM owns (a daemon killed between removing a VM's tap
        // and rewriting the walls): written again from the live VMs alone.
        {
            let _net = self.net_lock.lock().await;
            let rewritten = match self.guest_ports("").await {
                Ok(ports) => self.net.rewrite_walls(&ports).await,
                Err(e) => Err(e),
            };
            if let Err(e) = rewritten {
                tracing::warn!("Cannot write the walls again: {}", e.full_message());
            }
        }
        self.release_network_if_idle().await;
        self.sweep_warm().await;
        Ok(())
    }

    /// Stops the VMM and helpers of every runtime directory whose VM is not in `ids` (a VM deleted by
    /// hand from the database, or by a daemon that lost its row some other way) and removes
    /// the directory: nothing runs on the host that banger does not list.
    async fn stop_rowless_vmms(&self, ids: &std::collections::HashSet<String>) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(self.layout.vms_runtime_dir()) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if ids.contains(&id) || !crate::model::is_id(&id) {
                continue;
            }
            let run = e.path();
            if self.vmm.running(&run) {
                tracing::warn!(vm_id = %id, "Stopping the VMM of VM {id}, which no row names");
            }
            self.stop_processes(&id, None).await?;
            if let Err(e) = crate::layout::remove_any(&run) {
                tracing::warn!(vm_id = %id, "Cannot remove {}: {e}", run.display());
            }
        }
        Ok(())
    }

    /// Kills what runs for VM `id` from its runtime directory alone (control relay, port
    /// forwarder, VMM, agent link, console logger, share servers) and withdraws it from
    /// machined. Then whatever of the VM no pid file named any more is killed too: every
    /// process of the VM's uid (`vm_uid`, when known) and banger's, QEMU's and virtiofsd's
    /// programs that name its runtime directory.
    async fn stop_processes(&self, id: &str, vm_uid: Option<u32>) -> Result<()> {
        let run = self.layout.vm_runtime_dir(id);
        self.stop_control(id).await;
        crate::vmm::process::terminate(
            &run.join(super::create::FORWARD_PID),
            &run.to_string_lossy(),
            Duration::from_secs(2),
        )
        .await;
        self.vmm.kill(&run).await?;
        crate::vmm::process::kill_strays(vm_uid, &run.to_string_lossy()).await;
        self.machines.withdraw(id).await;
        Ok(())
    }

    /// Kills the VM's VMM and helpers and removes its tap (from its namespace, for a VM given
    /// one: and eth0's wiring to it).
    pub(super) async fn power_down(&self, vm: &Vm) -> Result<()> {
        let uid = crate::vmm::jail::vm_uid(vm.vsock_cid);
        self.stop_processes(&vm.id, Some(uid)).await?;
        let detached = if !vm.netns.is_empty() {
            crate::net::netns::detach_in(&vm.netns, &vm.tap_name).await
        } else {
            let _net = self.net_lock.lock().await;
            match self.guest_ports(&vm.id).await {
                Ok(ports) => self.net.detach(&vm.tap_name, &ports).await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = detached {
            tracing::warn!(vm_id = %vm.id, vm_name = %vm.name, "{}", e.full_message());
        }
        Ok(())
    }

    /// Removes the bridge and the nft table once no VM starts, runs or stops: a host without
    /// VMs carries nothing of banger's network.
    pub(super) async fn release_network_if_idle(&self) {
        let _net = self.net_lock.lock().await;
        let Ok(vms) = self.list().await else {
            return;
        };
        // The VMMs themselves, not only the rows: a VMM that runs (or may) keeps its walls.
        let busy = vms.iter().any(|v| v.state.is_active())
            || std::fs::read_dir(self.layout.vms_runtime_dir())
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| !matches!(self.vmm.liveness(&e.path()), Liveness::Gone));
        if !busy {
            if let Err(e) = self.net.teardown().await {
                tracing::warn!("Cannot remove banger's host network: {}", e.full_message());
            }
        }
    }
}
