//! What can go wrong with an image operation, each failure with its kind.

use crate::error::{ErrorKind, Kind};

/// An image operation's failure.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No image has this name or id.
    #[error("No image {0:?}; `banger image list` shows the images")]
    NotFound(String),
    /// The name is taken; `next` says what to do.
    #[error("An image named {name:?} exists ({}'s); {next}", crate::model::owner_label(*owner))]
    NameTaken {
        /// The name asked for.
        name: String,
        /// Whose image has it.
        owner: u32,
        /// What to do instead.
        next: &'static str,
    },
    /// Another operation took the name or the image meanwhile, or it cannot be changed.
    #[error("{0}")]
    Conflict(String),
    /// Not there and not to be pulled now; the message says why and what to do.
    #[error("{0}")]
    Unavailable(String),
    /// The name is the system's (the default image, a catalog entry) and the caller may not
    /// make an image of their own under it.
    #[error("{0}")]
    Reserved(String),
    /// The image is another user's: the caller may not use, replace or delete it.
    #[error("{0}")]
    Foreign(String),
    /// The image was deleted or changed while the operation ran.
    #[error("{0}")]
    Gone(String),
    /// VMs or snapshots layer on its files; `next` says on what and what to do.
    #[error("Image {name:?} is used by {users} {next}")]
    InUse {
        /// The image's name.
        name: String,
        /// How many users.
        users: u64,
        /// What uses it and what to do.
        next: &'static str,
    },
    /// A build needs a Debian mirror and the host's apt sources name none.
    #[error("No Debian mirror in the host's apt sources (/etc/apt/sources.list*)")]
    NoMirror,
    /// An option, a file or the image's content is not acceptable; the message says which.
    #[error("{0}")]
    Invalid(String),
    /// Pulling, building, registering or publishing failed; `what` says which step.
    #[error("{what}")]
    Failed {
        /// What banger was doing.
        what: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Kind for ImageError {
    fn kind(&self) -> ErrorKind {
        match self {
            ImageError::Failed { .. } => ErrorKind::Failed,
            ImageError::NotFound(_)
            | ImageError::Unavailable(_)
            | ImageError::Gone(_)
            | ImageError::NoMirror => ErrorKind::NotFound,
            ImageError::NameTaken { .. } | ImageError::Conflict(_) | ImageError::Reserved(_) => {
                ErrorKind::AlreadyExists
            }
            ImageError::Foreign(_) => ErrorKind::PermissionDenied,
            ImageError::InUse { .. } => ErrorKind::InUse,
            ImageError::Invalid(_) => ErrorKind::InvalidArgument,
        }
    }
}

/// A [`ImageError::Failed`]: what banger was doing, and why it failed.
pub(crate) fn failed(
    what: impl Into<String>,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> crate::Error {
    ImageError::Failed {
        what: what.into(),
        source: source.into(),
    }
    .into()
}

/// An [`ImageError::Invalid`] as a service error.
pub(crate) fn invalid(message: impl Into<String>) -> crate::Error {
    ImageError::Invalid(message.into()).into()
}
