#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

/// The domain, the traits, the default allocator and the in-memory backends.
pub use lablink_core as core;
pub use lablink_core::*;
