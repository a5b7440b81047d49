//! What can go wrong with a kernel operation, each failure with its kind.

use crate::error::{ErrorKind, Kind};

/// A kernel operation's failure.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// No kernel is installed under this name.
    #[error(
        "No kernel {0:?}; `banger kernel list` shows installed kernels and \
         `banger kernel list --available` the catalog"
    )]
    NotFound(String),
    /// The catalog has no entry of this name.
    #[error("No kernel {0:?} in the catalog; `banger kernel list --available` shows it")]
    NotInCatalog(String),
    /// Neither installed nor to be pulled now; the message says why and where to look.
    #[error("{0}")]
    Unavailable(String),
    /// apt's index lacks what a pull of Debian's kernel needs; the message says what.
    #[error("{0}")]
    NotInApt(String),
    /// The name is taken; `next` says what to do.
    #[error("{0}")]
    NameTaken(String),
    /// The kernel is another user's: the caller may not boot, name or delete it.
    #[error("{0}")]
    Foreign(String),
    /// Images or VMs boot it.
    #[error("Kernel {name:?} is used by {users} image(s) or VM(s); delete or re-point them first")]
    InUse {
        /// The kernel's name.
        name: String,
        /// How many users.
        users: u64,
    },
    /// The kernel is larger than `max_kernel_bytes` once decompressed.
    #[error(
        "The kernel decompresses to more than {0} bytes (max_kernel_bytes); it is not a kernel \
         banger will boot"
    )]
    TooLarge(u64),
    /// An option, a file or the kernel's content is not acceptable; the message says which.
    #[error("{0}")]
    Invalid(String),
    /// Pulling, importing or publishing the kernel failed; `what` says which step.
    #[error("{what}")]
    Failed {
        /// What banger was doing.
        what: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Kind for KernelError {
    fn kind(&self) -> ErrorKind {
        match self {
            KernelError::Failed { .. } => ErrorKind::Failed,
            KernelError::NotFound(_)
            | KernelError::NotInCatalog(_)
            | KernelError::NotInApt(_)
            | KernelError::Unavailable(_) => ErrorKind::NotFound,
            KernelError::NameTaken(_) => ErrorKind::AlreadyExists,
            KernelError::Foreign(_) => ErrorKind::PermissionDenied,
            KernelError::InUse { .. } => ErrorKind::InUse,
            KernelError::TooLarge(_) => ErrorKind::LimitExceeded,
            KernelError::Invalid(_) => ErrorKind::InvalidArgument,
        }
    }
}

/// A [`KernelError::Invalid`] as a service error.
pub(crate) fn invalid(message: impl Into<String>) -> crate::Error {
    KernelError::Invalid(message.into()).into()
}

/// A [`KernelError::Failed`]: what banger was doing, and why it failed.
pub(crate) fn failed(
    what: impl Into<String>,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> crate::Error {
    KernelError::Failed {
        what: what.into(),
        source: source.into(),
    }
    .into()
}
