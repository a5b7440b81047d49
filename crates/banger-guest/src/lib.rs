//! banger's guest side: `banger-init` (PID 1 of every guest's initrd) and `banger-agent`, and
//! what the host shares with them: the agent's wire protocol, the agent channel's
//! multiplexing, stream splicing, the image's run settings and a few system calls (`sys`). Built on its own (static, for
//! the guest) without the daemon's dependencies; the `banger` crate uses it for the host's side.
//! See docs/ARCHITECTURE.md, "Map".

pub mod agent;
pub mod guestinit;
pub mod model;
pub mod splice;
pub mod sys;

/// The version every binary reports (the workspace's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
