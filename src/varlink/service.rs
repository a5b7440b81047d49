//! `org.varlink.service`: what the service is and the description of each interface, so any
//! Varlink client (`varlinkctl`, the `varlink` Python package) can call banger knowing
//! nothing of it beforehand.

use serde_json::json;

use super::{Answer, Failure, Params};

/// The interface's name.
pub const INTERFACE: &str = "org.varlink.service";

/// The standard interface's description (varlink.org).
pub const DESCRIPTION: &str = r#"# The Varlink Service Interface is provided by every varlink service. It
# describes the service and the interfaces it implements.
interface org.varlink.service

# Get a list of all the interfaces a service provides and information
# about the implementation.
method GetInfo() -> (
  vendor: string,
  product: string,
  version: string,
  url: string,
  interfaces: []string
)

# Get the description of an interface that is implemented by this service.
method GetInterfaceDescription(interface: string) -> (description: string)

# The requested interface was not found.
error InterfaceNotFound (interface: string)

# The requested method was not found
error MethodNotFound (method: string)

# The interface defines the requested method, but the service does not
# implement it.
error MethodNotImplemented (method: string)

# One of the passed parameters is invalid.
error InvalidParameter (parameter: string)

# Client is denied access
error PermissionDenied ()

# Method is expected to be called with 'more' set to true, but wasn't
error ExpectedMore ()
"#;

/// Answers for a socket whose interfaces are `descriptions` (name, description).
pub(super) fn call(
    method: &str,
    mut p: Params,
    descriptions: &[(&str, &str)],
) -> Result<Answer, Failure> {
    match method {
        "GetInfo" => {
            p.finish()?;
            let interfaces: Vec<&str> = descriptions.iter().map(|d| d.0).collect();
            Ok(Answer::One(json!({
                "vendor": "banger",
                "product": "bangerd",
                "version": crate::VERSION,
                "url": env!("CARGO_PKG_REPOSITORY"),
                "interfaces": interfaces,
            })))
        }
        "GetInterfaceDescription" => {
            let name: String = p.req("interface")?;
            p.finish()?;
            descriptions
                .iter()
                .find(|d| d.0 == name)
                .map(|d| Answer::One(json!({ "description": d.1 })))
                .ok_or_else(|| Failure::interface_not_found(&name))
        }
        m => Err(Failure::method_not_found(&format!("{INTERFACE}.{m}"))),
    }
}
