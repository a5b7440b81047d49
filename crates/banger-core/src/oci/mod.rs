//! OCI images: references, registry pulls into a verified blob cache, and flattening layers
//! into a root filesystem tree.

pub mod auth;
mod error;
pub mod flatten;
#[cfg(test)]
mod flatten_tests;
pub mod reference;
pub mod registry;

pub use error::OciError;
