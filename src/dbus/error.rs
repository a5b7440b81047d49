//! The one mapping from service and authorisation errors to D-Bus error names.

use zbus::DBusError;

use crate::auth::AuthError;
use crate::error::{Error, ErrorKind};

/// Errors as they go on the bus: `org.banger.Error.*`, or a standard freedesktop error (such as
/// `AccessDenied`) carried in `ZBus`.
#[derive(Debug, DBusError)]
#[zbus(prefix = "org.banger.Error")]
pub enum BusError {
    /// A standard D-Bus error.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The named object does not exist.
    NotFound(String),
    /// The name is already taken.
    AlreadyExists(String),
    /// The object is still used.
    InUse(String),
    /// The arguments are wrong.
    InvalidArgument(String),
    /// The operation failed.
    Failed(String),
}

impl From<Error> for BusError {
    fn from(e: Error) -> Self {
        let msg = e.full_message();
        match e.kind() {
            ErrorKind::NotFound => BusError::NotFound(msg),
            ErrorKind::AlreadyExists => BusError::AlreadyExists(msg),
            ErrorKind::InUse => BusError::InUse(msg),
            ErrorKind::InvalidArgument => BusError::InvalidArgument(msg),
            ErrorKind::Failed => BusError::Failed(msg),
        }
    }
}

impl From<AuthError> for BusError {
    fn from(e: AuthError) -> Self {
        let msg = e.to_string();
        let fdo = match e {
            AuthError::InteractionRequired { .. } => {
                zbus::fdo::Error::InteractiveAuthorizationRequired(msg)
            }
            _ => zbus::fdo::Error::AccessDenied(msg),
        };
        BusError::ZBus(zbus::Error::FDO(Box::new(fdo)))
    }
}

/// Result of a D-Bus method. Interface files import it as `Result`: the interface macro
/// recognises fallible methods by that name.
pub type BusResult<T> = std::result::Result<T, BusError>;
