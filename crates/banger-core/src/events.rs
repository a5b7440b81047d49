//! Objects appearing, changing and going, in order, for the front ends to mirror. Below every
//! service: the services send them, the front ends subscribe, and nothing here knows either.

use tokio::sync::broadcast;

use crate::model::{Image, Kernel, Vm};

/// Objects appearing, changing and going, in order, for the D-Bus layer to mirror.
#[derive(Debug, Clone)]
pub enum ObjectEvent {
    /// An image was published.
    ImageAdded(Image),
    /// An image's row changed (re-registered, promoted).
    ImageChanged(Image),
    /// An image was deleted (its id).
    ImageRemoved(String),
    /// A kernel was added.
    KernelAdded(Kernel),
    /// A kernel was deleted (its name).
    KernelRemoved(String),
    /// A VM was reserved.
    VmAdded(Vm),
    /// A VM's row changed.
    VmChanged(Vm),
    /// A VM was deleted (its id).
    VmRemoved(String),
    /// A snapshot was published.
    SnapshotAdded(crate::model::Snapshot),
    /// A snapshot was deleted (its id).
    SnapshotRemoved(String),
    /// A running VM stopped: `reason` is `requested` (a stop, by its owner or an
    /// administrator), `powered-off` (the guest powered off, or its VMM ended, on its own) or
    /// `exited` (its main process ended, which powers it off); `exit_status` is the main
    /// process's (-1 without one).
    VmStopped {
        /// The VM's id.
        vm_id: String,
        /// Why.
        reason: &'static str,
        /// The main process's exit status.
        exit_status: i32,
    },
    /// A VM creation reached a stage.
    CreateProgress {
        /// The VM's id.
        vm_id: String,
        /// The stage.
        stage: String,
        /// What it is doing.
        message: String,
    },
}

/// Sender of [`ObjectEvent`]s; cheap to clone.
#[derive(Clone)]
pub struct Events(broadcast::Sender<ObjectEvent>);

impl Events {
    /// A new channel.
    pub fn new() -> Self {
        Events(broadcast::channel(1024).0)
    }
    /// Sends an event; nobody listening is fine.
    pub fn send(&self, e: ObjectEvent) {
        let _ = self.0.send(e);
    }
    /// Subscribes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ObjectEvent> {
        self.0.subscribe()
    }
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}
