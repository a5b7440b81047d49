//! The host's side of the guest agent: the async client (`client`) the daemon and `banger vm
//! exec` use, and the checks on what a guest sends back (`untrusted`). The wire protocol, the
//! agent itself and the channel's multiplexing live in the `banger-guest` crate (built without
//! the daemon's dependencies) and are re-exported here, where they used to be.

pub use banger_guest::agent::*;

pub mod client;
pub mod untrusted;
