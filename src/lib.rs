//! banger: one-command sandbox microVMs as a systemd-native D-Bus system service.
//!
//! All logic lives here; `src/bin/*.rs` only parse arguments and call in. The D-Bus layer
//! (`dbus`) and the authority (`auth`) are the only modules that know zbus; the services
//! (`images`, `kernels`, `vms`, `jobs`) hold the logic and the locks.

pub mod agent;
pub mod auth;
pub mod bundle;
pub mod callerfile;
pub mod cancel;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dbus;
pub mod error;
pub mod events;
pub mod ext4;
pub mod fault;
pub mod guest;
pub mod host;
pub mod images;
pub mod jobs;
pub mod kernels;
pub mod layout;
pub mod logging;
pub mod model;
pub mod net;
pub mod oci;
pub mod ops;
pub mod service;
pub mod shelf;
pub mod store;
pub mod tree;
pub mod varlink;
pub mod vmm;
pub mod vms;
pub mod worker;

pub use banger_guest::guestinit;
pub use error::{Error, Result};

/// The version every binary reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
