//! What can go wrong with a VM operation, each failure with its kind.

use super::state::VmOp;
use crate::error::{ErrorKind, Kind};
use crate::model::VmState;

/// A VM operation's failure.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// No VM has this name or id.
    #[error("No VM {0:?}; `banger vm list` shows the VMs")]
    NotFound(String),
    /// The name is taken by another VM.
    #[error("A VM named {0:?} exists; pick another name or delete it (`banger vm delete {0}`)")]
    NameTaken(String),
    /// The VM's state does not allow the operation (the table in [`super::state`]).
    #[error("{}", refusal(name, *state, *op))]
    NotAllowed {
        /// The VM's name.
        name: String,
        /// Its state when asked.
        state: VmState,
        /// What was asked.
        op: VmOp,
    },
    /// An option or argument is wrong; the message names it and what it accepts.
    #[error("{0}")]
    Invalid(String),
    /// A configured bound or an owner's quota; the message names the config key.
    #[error("{0}")]
    Limit(String),
    /// Something the VM needs is missing (its console log, its main process's output).
    #[error("{0}")]
    Missing(String),
    /// Creating, starting, stopping or deleting the VM failed; `what` says which step.
    #[error("{what}")]
    Failed {
        /// What banger was doing.
        what: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Kind for VmError {
    fn kind(&self) -> ErrorKind {
        match self {
            VmError::Failed { .. } => ErrorKind::Failed,
            VmError::NotFound(_) | VmError::Missing(_) => ErrorKind::NotFound,
            VmError::NameTaken(_) => ErrorKind::AlreadyExists,
            VmError::NotAllowed {
                op: VmOp::Delete, ..
            } => ErrorKind::InUse,
            VmError::NotAllowed { .. } | VmError::Invalid(_) => ErrorKind::InvalidArgument,
            VmError::Limit(_) => ErrorKind::LimitExceeded,
        }
    }
}

/// A [`VmError::Failed`]: what banger was doing, and why it failed.
pub(crate) fn failed(
    what: impl Into<String>,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> crate::Error {
    VmError::Failed {
        what: what.into(),
        source: source.into(),
    }
    .into()
}

/// An [`VmError::Invalid`] as a service error.
pub(crate) fn invalid(message: impl Into<String>) -> crate::Error {
    VmError::Invalid(message.into()).into()
}

/// A [`VmError::Limit`] as a service error.
pub(crate) fn limit(message: impl Into<String>) -> crate::Error {
    VmError::Limit(message.into()).into()
}

/// What a refusal of `op` on a VM in `state` says: the state, and what to do instead.
fn refusal(name: &str, state: VmState, op: VmOp) -> String {
    use VmState::Stopping;
    match op {
        VmOp::Start if state == Stopping => {
            format!("VM {name} is stopping; start it again once it has stopped")
        }
        VmOp::Start => format!("VM {name} is {state} already"),
        VmOp::Pause => format!("VM {name} is {state}; only a running VM can be paused"),
        VmOp::Resume => format!("VM {name} is {state}; only a paused VM can be resumed"),
        VmOp::Snapshot => format!(
            "VM {name} is {state}; only a running or paused VM can be snapshotted \
             (`banger vm start {name}` first)"
        ),
        VmOp::Delete => format!(
            "VM {name} is {state}; stop it first (`banger vm stop {name}`) or delete with --force"
        ),
        VmOp::Stop | VmOp::ForceDelete => format!("VM {name} is {state}"),
    }
}
