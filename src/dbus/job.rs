//! `org.banger.Job1`: one running job.

use std::sync::Arc;

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{interface, Connection};

use super::{jobs, BusResult as Result, Ctx};
use crate::jobs::Job;

/// A job object; its properties read the job's live status.
pub struct Job1 {
    pub(super) job: Arc<Job>,
    pub(super) ctx: Ctx,
}

/// A long operation.
#[interface(name = "org.banger.Job1")]
impl Job1 {
    /// Cancels the job.
    async fn cancel(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<()> {
        jobs::cancel(&self.ctx, conn, &hdr, self.job.id).await
    }

    /// What kind of work: pull-image, build-image, pull-kernel, create-vm, start-vm, ….
    #[zbus(property(emits_changed_signal = "const"), name = "Kind")]
    fn kind(&self) -> String {
        self.job.kind.clone()
    }
    /// What the job works on: an image ref, a kernel or VM name.
    #[zbus(property(emits_changed_signal = "const"), name = "Target")]
    fn target(&self) -> String {
        self.job.target.clone()
    }
    /// The current stage.
    #[zbus(property, name = "Stage")]
    fn stage(&self) -> String {
        self.job.status().stage
    }
    /// Progress from 0 to 1.
    #[zbus(property, name = "Progress")]
    fn progress(&self) -> f64 {
        self.job.status().progress
    }
    /// running, done, failed or canceled.
    #[zbus(property, name = "State")]
    fn state(&self) -> String {
        self.job.status().state.as_str().to_owned()
    }
    /// The error message when the job failed.
    #[zbus(property, name = "Error")]
    fn error(&self) -> String {
        self.job.status().error
    }

    /// The job entered a stage.
    #[zbus(signal, name = "StageChanged")]
    pub async fn stage_entered(
        e: &SignalEmitter<'_>,
        stage: &str,
        message: &str,
    ) -> zbus::Result<()>;

    /// A log line from the job (syslog priority: 3 error, 4 warning, 6 info, 7 debug).
    #[zbus(signal)]
    pub async fn log_message(e: &SignalEmitter<'_>, priority: u32, line: &str) -> zbus::Result<()>;
}
