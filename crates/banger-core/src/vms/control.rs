//! Each running VM's control socket (`$RUNTIME_DIR/machines/banger-<id>`), which answers
//! `io.systemd.MachineInstance` for it and which machined gives `machinectl` as the machine's
//! control address. Its relay (see `varlink::relay`) runs beside the VMM as a uid of its own
//! with no capabilities, and outlives the daemon as the VM does.

use std::path::PathBuf;
use std::time::Duration;

use super::error::failed;
use super::Vms;
use crate::vmm::{jail, process, scope};
use crate::Result;

/// The argument that runs the helpers' program (`process::helper_program`) as a VM's
/// control relay.
pub const RELAY_ARG: &str = "machine-control";

/// What the relay says in its log once its socket is there and listens.
pub const LISTENING: &str = "machine-control: listening";

/// The relay's pid file in the VM's runtime directory.
pub const CONTROL_PID: &str = "machine-control.pid";

impl Vms {
    /// Starts VM `id`'s control relay and waits until its socket listens; returns the socket.
    pub(super) async fn start_control(&self, id: &str) -> Result<PathBuf> {
        let run = self.layout.vm_runtime_dir(id);
        let (pidfile, log) = (run.join(CONTROL_PID), run.join("machine-control.log"));
        let marker = run.to_string_lossy().into_owned();
        process::terminate(&pidfile, &marker, Duration::from_secs(2)).await;
        let (dir, socket) = (self.layout.machines_dir(), self.layout.machine_socket(id));
        let uid = jail::control_uid();
        jail::hand_over_open(&dir, uid)?;
        let daemon = self.layout.varlink_socket();
        // The daemon's socket is reached by its path each time (a daemon started by hand
        // binds a new one); the state, where VM disks are, is not there at all.
        let who = jail::Jail {
            uid,
            gid: uid,
            groups: Vec::new(),
            hide: vec![self.layout.state_dir.clone()],
            read_only: Vec::new(),
            private: false,
            offline: false,
        };
        let bin = process::helper_program()?;
        process::spawn_detached(&process::Detached {
            pidfile: &pidfile,
            unit: &scope::helper_unit(id, "control"),
            program: &bin,
            args: &[
                RELAY_ARG.as_ref(),
                socket.as_os_str(),
                daemon.as_os_str(),
                id.as_ref(),
            ],
            log: &log,
            output: None,
            limits: process::UnitLimits {
                memory_max: 32 << 20,
                tasks_max: 4,
                huge_pages: true,
            },
            writable: &[run.as_path(), dir.as_path()],
            jail: &who,
            tap: None,
            tap_netns: None,
            listen: None,
            ram: None,
        })
        .await?;
        let ready = LISTENING;
        process::wait_for_log(&pidfile, &marker, &log, ready, Duration::from_secs(10))
            .await
            .map_err(|said| {
                failed(
                    "Cannot start the VM's control socket",
                    std::io::Error::other(said),
                )
            })?;
        Ok(socket)
    }

    /// Stops VM `id`'s control relay and removes its socket; fine when there is none.
    pub(super) async fn stop_control(&self, id: &str) {
        let run = self.layout.vm_runtime_dir(id);
        process::terminate(
            &run.join(CONTROL_PID),
            &run.to_string_lossy(),
            Duration::from_secs(2),
        )
        .await;
        let _ = std::fs::remove_file(self.layout.machine_socket(id));
    }
}
