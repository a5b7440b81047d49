//! What can go wrong with a registry or an OCI layout, each failure with its kind.

/// A registry's or an OCI layout's failure.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// An image reference that does not parse.
    #[error("Malformed image reference {reference:?} ({why}); use e.g. docker.io/library/debian:bookworm")]
    Reference {
        /// What was given.
        reference: String,
        /// What is wrong with it.
        why: String,
    },
    /// What the registry or layout sent is not acceptable (digest, size, media type, credentials).
    #[error("{0}")]
    Invalid(String),
    /// Talking to the registry or reading the layout failed; `what` says which.
    #[error("{what}")]
    Registry {
        /// What banger was doing.
        what: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl crate::error::Kind for OciError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            OciError::Reference { .. } | OciError::Invalid(_) => ErrorKind::InvalidArgument,
            OciError::Registry { .. } => ErrorKind::Failed,
        }
    }
}

/// A [`OciError::Invalid`] as a service error.
pub(crate) fn invalid(message: impl Into<String>) -> crate::Error {
    OciError::Invalid(message.into()).into()
}

/// A [`OciError::Registry`]: what banger was doing, and why it failed.
pub(crate) fn failed(
    what: impl Into<String>,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> crate::Error {
    OciError::Registry {
        what: what.into(),
        source: source.into(),
    }
    .into()
}
