//! banger's daemon below its front ends: everything `bangerd` knows and does, with no
//! idea of who asks. The D-Bus and Varlink front ends, the daemon's start-up and the CLI
//! are in the `banger` crate above, which this crate cannot name: an import upward is a
//! compile error. From the bottom up (see docs/ARCHITECTURE.md): foundations (`model`,
//! `error`, `cancel`, `host`, `layout`, …), formats and stores (`store`, `ext4`, `oci`,
//! `tree`, `agent`, …), services (`jobs`, `images`, `kernels`, `vmm`, `net`, `vms`,
//! `service`) and `ops`, one function per API method.

pub mod agent;
pub mod auth;
pub mod bundle;
pub mod callerfile;
pub mod cancel;
pub mod config;
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
pub mod recorder;
pub mod service;
pub mod shelf;
pub mod store;
pub mod tree;
pub mod vmm;
pub mod vms;
pub mod worker;

pub use banger_guest::guestinit;
pub use error::{Error, Result};

/// The version every binary reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
