//! The one mapping from service and authorisation errors to D-Bus error names:
//! `org.banger.Error.*` for service errors, the standard freedesktop names (`AccessDenied`,
//! `InteractiveAuthorizationRequired`) for authorisation. Implemented by hand because the
//! derive sends wrapped standard errors under zbus's own name.

use std::fmt;

use zbus::message::{Header, Message};
use zbus::names::ErrorName;

use crate::auth::AuthError;
use crate::error::{Error, ErrorKind};

/// An error as it goes on the bus.
#[derive(Debug)]
pub enum BusError {
    /// A standard freedesktop error.
    Fdo(zbus::fdo::Error),
    /// One of `org.banger.Error.*`.
    Banger {
        /// The full error name.
        name: &'static str,
        /// What happened and what to do next.
        message: String,
    },
}

impl From<Error> for BusError {
    fn from(e: Error) -> Self {
        let e = match e {
            Error::Denied(a) => return a.into(),
            e => e,
        };
        let name = match e.kind() {
            ErrorKind::NotFound => "org.banger.Error.NotFound",
            ErrorKind::AlreadyExists => "org.banger.Error.AlreadyExists",
            ErrorKind::InUse => "org.banger.Error.InUse",
            ErrorKind::InvalidArgument => "org.banger.Error.InvalidArgument",
            ErrorKind::LimitExceeded => "org.banger.Error.LimitExceeded",
            ErrorKind::Failed | ErrorKind::PermissionDenied => "org.banger.Error.Failed",
        };
        BusError::Banger {
            name,
            message: e.full_message(),
        }
    }
}

impl From<AuthError> for BusError {
    fn from(e: AuthError) -> Self {
        let msg = e.to_string();
        BusError::Fdo(match e {
            AuthError::InteractionRequired { .. } => {
                zbus::fdo::Error::InteractiveAuthorizationRequired(msg)
            }
            _ => zbus::fdo::Error::AccessDenied(msg),
        })
    }
}

impl From<zbus::Error> for BusError {
    fn from(e: zbus::Error) -> Self {
        BusError::Fdo(zbus::fdo::Error::from(e))
    }
}

impl zbus::DBusError for BusError {
    fn create_reply(&self, call: &Header<'_>) -> zbus::Result<Message> {
        match self {
            BusError::Fdo(e) => e.create_reply(call),
            BusError::Banger { name, message } => {
                Message::error(call, ErrorName::from_static_str_unchecked(name)).build(&(message,))
            }
        }
    }

    fn name(&self) -> ErrorName<'_> {
        match self {
            BusError::Fdo(e) => e.name(),
            BusError::Banger { name, .. } => ErrorName::from_static_str_unchecked(name),
        }
    }

    fn description(&self) -> Option<&str> {
        match self {
            BusError::Fdo(e) => e.description(),
            BusError::Banger { message, .. } => Some(message),
        }
    }
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use zbus::DBusError;
        write!(
            f,
            "{}: {}",
            self.name(),
            self.description().unwrap_or_default()
        )
    }
}

impl std::error::Error for BusError {}

/// Result of a D-Bus method. Interface files import it as `Result`: the interface macro
/// recognises fallible methods by that name.
pub type BusResult<T> = std::result::Result<T, BusError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_error_goes_on_the_bus_under_its_kind() {
        let cases = crate::error::one_of_each_module();
        for (e, kind) in cases {
            let text = e.to_string();
            let bus = BusError::from(e);
            let want = match kind {
                ErrorKind::NotFound => "org.banger.Error.NotFound",
                ErrorKind::AlreadyExists => "org.banger.Error.AlreadyExists",
                ErrorKind::InUse => "org.banger.Error.InUse",
                ErrorKind::InvalidArgument => "org.banger.Error.InvalidArgument",
                ErrorKind::LimitExceeded => "org.banger.Error.LimitExceeded",
                ErrorKind::Failed => "org.banger.Error.Failed",
                ErrorKind::PermissionDenied => "org.freedesktop.DBus.Error.AccessDenied",
            };
            assert_eq!(zbus::DBusError::name(&bus).as_str(), want, "{text}");
        }
    }
}
