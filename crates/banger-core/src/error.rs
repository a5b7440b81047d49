//! The error every service returns, and the kinds the front ends map it onto.
//!
//! Each module names its own failures in a `thiserror` enum with a `kind()` (the VM, image,
//! kernel, snapshot, job, store, network, OCI, VMM and caller-file errors); [`Error`] carries
//! any of them, plus the few generic cases shared helpers raise, and its [`Error::kind`]
//! asks the module's error. `dbus::error` and `varlink::Failure::of` map the kind once each.

/// What kind of failure an [`Error`] is, which decides its D-Bus and Varlink error names.
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

/// A module's error: it knows which [`ErrorKind`] each of its failures is.
pub trait Kind {
    /// The front-end-facing kind of this failure.
    fn kind(&self) -> ErrorKind;
}

/// A service error. Each message is written for the user and says what to do next where
/// that is knowable.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A VM operation's failure.
    #[error(transparent)]
    Vm(#[from] crate::vms::VmError),
    /// A snapshot's failure.
    #[error(transparent)]
    Snapshot(#[from] crate::vms::snapshot::SnapshotError),
    /// An image operation's failure.
    #[error(transparent)]
    Image(#[from] crate::images::ImageError),
    /// A kernel operation's failure.
    #[error(transparent)]
    Kernel(#[from] crate::kernels::KernelError),
    /// A job lookup's failure.
    #[error(transparent)]
    Job(#[from] crate::jobs::JobError),
    /// The state database's failure.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A network setup's failure.
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    /// A registry's or an OCI layout's failure.
    #[error(transparent)]
    Oci(#[from] crate::oci::OciError),
    /// The VMM's failure.
    #[error(transparent)]
    Vmm(#[from] crate::vmm::VmmError),
    /// A file or path a caller named was refused.
    #[error(transparent)]
    CallerFile(#[from] crate::callerfile::CallerFileError),
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
            Error::Vm(e) => e.kind(),
            Error::Snapshot(e) => e.kind(),
            Error::Image(e) => e.kind(),
            Error::Kernel(e) => e.kind(),
            Error::Job(e) => e.kind(),
            Error::Store(e) => e.kind(),
            Error::Net(e) => e.kind(),
            Error::Oci(e) => e.kind(),
            Error::Vmm(e) => e.kind(),
            Error::CallerFile(e) => e.kind(),
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

/// One failure of each module, and the kind it must keep through the service error: the
/// front ends' tests check each maps to its D-Bus and Varlink error.
#[doc(hidden)]
pub fn one_of_each_module() -> Vec<(Error, ErrorKind)> {
    use crate::model::VmState;
    use crate::vms::state::VmOp;
    let io = || std::io::Error::other("refused");
    vec![
        (
            crate::vms::VmError::NotFound("v".into()).into(),
            ErrorKind::NotFound,
        ),
        (
            crate::vms::VmError::NotAllowed {
                name: "v".into(),
                state: VmState::Running,
                op: VmOp::Delete,
            }
            .into(),
            ErrorKind::InUse,
        ),
        (
            crate::vms::VmError::NotAllowed {
                name: "v".into(),
                state: VmState::Stopped,
                op: VmOp::Pause,
            }
            .into(),
            ErrorKind::InvalidArgument,
        ),
        (
            crate::vms::VmError::Limit("max_vcpus".into()).into(),
            ErrorKind::LimitExceeded,
        ),
        (
            crate::vms::snapshot::SnapshotError::NameTaken("s".into()).into(),
            ErrorKind::AlreadyExists,
        ),
        (
            crate::vms::snapshot::SnapshotError::Damaged {
                name: "s".into(),
                why: "short".into(),
            }
            .into(),
            ErrorKind::Failed,
        ),
        (
            crate::images::ImageError::InUse {
                name: "i".into(),
                users: 2,
                next: "VM(s)",
            }
            .into(),
            ErrorKind::InUse,
        ),
        (
            crate::images::ImageError::NoMirror.into(),
            ErrorKind::NotFound,
        ),
        (
            crate::kernels::KernelError::TooLarge(1).into(),
            ErrorKind::LimitExceeded,
        ),
        (
            crate::kernels::KernelError::NameTaken("k".into()).into(),
            ErrorKind::AlreadyExists,
        ),
        (
            crate::jobs::JobError::NotFound(7).into(),
            ErrorKind::NotFound,
        ),
        (
            crate::store::StoreError::Quota("max_vms_per_user".into()).into(),
            ErrorKind::LimitExceeded,
        ),
        (
            crate::store::StoreError::Gone("v".into()).into(),
            ErrorKind::NotFound,
        ),
        (
            crate::net::NetError::Invalid("egress".into()).into(),
            ErrorKind::InvalidArgument,
        ),
        (
            crate::net::NetError::Host {
                what: "Cannot create tap".into(),
                source: io().into(),
            }
            .into(),
            ErrorKind::Failed,
        ),
        (
            crate::oci::OciError::Reference {
                reference: "x:".into(),
                why: "empty tag".into(),
            }
            .into(),
            ErrorKind::InvalidArgument,
        ),
        (
            crate::vmm::VmmError::Invalid("share".into()).into(),
            ErrorKind::InvalidArgument,
        ),
        (
            crate::callerfile::CallerFileError::TooLarge("max_register_bytes".into()).into(),
            ErrorKind::LimitExceeded,
        ),
        (
            crate::auth::AuthError::NoSender.into(),
            ErrorKind::PermissionDenied,
        ),
        (Error::Canceled, ErrorKind::Failed),
    ]
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
    fn each_module_error_keeps_its_kind() {
        let cases = one_of_each_module();
        for (e, kind) in &cases {
            assert_eq!(e.kind(), *kind, "{e}");
            assert!(!e.to_string().is_empty());
        }
        println!("{} module errors, each with its kind", cases.len());
    }

    #[test]
    fn not_implemented_names_the_capability() {
        let err = Error::NotImplemented("PullImage");
        assert!(err
            .to_string()
            .starts_with("PullImage is not implemented yet"));
    }
}
