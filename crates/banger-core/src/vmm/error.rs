//! What can go wrong running a VMM, each failure with its kind.

/// The VMM's failure.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The VM asks for what this VMM cannot do; the message says what.
    #[error("{0}")]
    Invalid(String),
    /// Starting, driving or stopping the VMM failed; `what` says which step.
    #[error("{what}")]
    Failed {
        /// What banger was doing.
        what: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl crate::error::Kind for VmmError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            VmmError::Invalid(_) => ErrorKind::InvalidArgument,
            VmmError::Failed { .. } => ErrorKind::Failed,
        }
    }
}

/// A [`VmmError::Invalid`] as a service error.
pub(crate) fn invalid(message: impl Into<String>) -> crate::Error {
    VmmError::Invalid(message.into()).into()
}

/// A [`VmmError::Failed`]: what banger was doing, and why it failed.
pub(crate) fn failed(
    what: impl Into<String>,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> crate::Error {
    VmmError::Failed {
        what: what.into(),
        source: source.into(),
    }
    .into()
}
