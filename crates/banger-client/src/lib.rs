//! A client of banger's public protocols for the front ends beside the CLI (the E2B facade,
//! the containerd shim): bangerd over its Varlink socket ([`daemon`]), as the calling user,
//! and a VM's guest agent over the stream `OpenAgent` hands out ([`agent`]).

pub mod agent;
pub mod daemon;
