//! The error every service returns; `dbus::error` maps it onto the names of DESIGN.md.

/// What kind of failure an [`Error`] is, which decides its D-Bus error name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// `org.banger.Error.NotFound`
    NotFound,
    /// `org.banger.Error.AlreadyExists`
    AlreadyExists,
    /// `org.banger.Error.InUse`
    InUse,
    /// `org.banger.Error.InvalidArgument`
    InvalidArgument,
    /// `org.banger.Error.LimitExceeded`
    LimitExceeded,
    /// `org.banger.Error.Failed`
    Failed,
    /// polkit said no, or could not be asked (`org.freedesktop.DBus.Error.AccessDenied`,
    /// or `InteractiveAuthorizationRequired`).
    PermissionDenied,
}

/// A service error. Each message is written for the user and says what to do next where
/// that is knowable.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The named object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The name is already taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// The object is still used by another one.
    #[error("{0}")]
    InUse(String),
    /// The caller's arguments are wrong.
    #[error("{0}")]
    InvalidArgument(String),
    /// A configured bound or quota would be exceeded; the message names the config key.
    #[error("{0}")]
    LimitExceeded(String),
    /// The capability is part of the contract but lands in a later release.
    #[error("{0} is not implemented yet in banger {version}", version = crate::VERSION)]
    NotImplemented(&'static str),
    /// The operation was canceled by a caller.
    #[error("Canceled")]
    Canceled,
    /// The caller is not authorised for what the operation needs.
    #[error(transparent)]
    Denied(#[from] crate::auth::AuthError),
    /// Anything else, with what was being done and why it failed.
    #[error("{context}")]
    Failed {
        /// What banger was doing.
        context: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Result with a service [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The D-Bus-facing kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Error::InUse(_) => ErrorKind::InUse,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::LimitExceeded(_) => ErrorKind::LimitExceeded,
            Error::NotImplemented(_) | Error::Canceled | Error::Failed { .. } => ErrorKind::Failed,
            Error::Denied(_) => ErrorKind::PermissionDenied,
        }
    }

    /// Wraps a lower-level error with what banger was doing.
    pub fn failed(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Failed {
            context: context.into(),
            source: source.into(),
        }
    }

    /// The message with every source in the chain, as a user should read it. A source whose
    /// text its parent already printed (many errors include their source) is not repeated.
    pub fn full_message(&self) -> String {
        let mut msg = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(err) = source {
            let text = err.to_string();
            if !msg.contains(&text) {
                msg.push_str(": ");
                msg.push_str(&text);
            }
            source = err.source();
        }
        msg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_message_walks_the_source_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        let err = Error::failed("Cannot open the state database", io);
        assert_eq!(err.full_message(), "Cannot open the state database: denied");
        assert_eq!(err.kind(), ErrorKind::Failed);
    }

    #[test]
    fn full_message_does_not_repeat_a_source_its_parent_printed() {
        #[derive(Debug, thiserror::Error)]
        #[error("connect failed: {0}")]
        struct Wrapping(#[source] std::io::Error);
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such socket");
        let err = Error::failed("Cannot connect to the system bus", Wrapping(io));
        assert_eq!(
            err.full_message(),
            "Cannot connect to the system bus: connect failed: no such socket"
        );
    }

    #[test]
    fn not_implemented_names_the_capability() {
        let err = Error::NotImplemented("PullImage");
        assert!(err
            .to_string()
            .starts_with("PullImage is not implemented yet"));
    }
}
