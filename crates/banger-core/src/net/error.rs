//! What can go wrong setting up a VM's network, each failure with its kind.

/// A network setup's failure.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A network option (egress rule, subnet, MAC, tap name) is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The host refused a step (netlink, nft, a tap); `what` says which.
    #[error("{what}")]
    Host {
        /// What banger was doing.
        what: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl crate::error::Kind for NetError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            NetError::Invalid(_) => ErrorKind::InvalidArgument,
            NetError::Host { .. } => ErrorKind::Failed,
        }
    }
}

/// A [`NetError::Invalid`] as a service error.
pub(crate) fn invalid(message: impl Into<String>) -> crate::Error {
    NetError::Invalid(message.into()).into()
}

/// A [`NetError::Host`]: what banger was doing, and why it failed.
pub(crate) fn failed(
    what: impl Into<String>,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> crate::Error {
    NetError::Host {
        what: what.into(),
        source: source.into(),
    }
    .into()
}
