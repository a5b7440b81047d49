//! banger: one-command sandbox microVMs as a systemd-native D-Bus system service.
//!
//! This crate holds what faces callers: the D-Bus (`dbus`) and Varlink (`varlink`) front
//! ends, the daemon's start-up (`daemon`, and `activator` where systemd is not PID 1) and the
//! CLI (`cli`); `src/bin/*.rs` only parse arguments and call in. Everything below them, the
//! services that hold the logic and the locks, is the `banger-core` crate, re-exported here
//! under the same paths.

pub mod activator;
pub mod daemon;
pub mod dbus;
pub mod helpers;
pub mod varlink;

pub use banger_cli as cli;

pub use banger_core::agent;
pub use banger_core::auth;
pub use banger_core::bundle;
pub use banger_core::callerfile;
pub use banger_core::cancel;
pub use banger_core::config;
pub use banger_core::error;
pub use banger_core::events;
pub use banger_core::ext4;
pub use banger_core::fault;
pub use banger_core::guest;
pub use banger_core::host;
pub use banger_core::images;
pub use banger_core::jobs;
pub use banger_core::kernels;
pub use banger_core::layout;
pub use banger_core::logging;
pub use banger_core::model;
pub use banger_core::net;
pub use banger_core::oci;
pub use banger_core::ops;
pub use banger_core::recorder;
pub use banger_core::service;
pub use banger_core::shelf;
pub use banger_core::store;
pub use banger_core::tree;
pub use banger_core::vmm;
pub use banger_core::vms;
pub use banger_core::worker;
pub use banger_core::{guestinit, Error, Result, VERSION};
