//! Cocoon's host-side runtime library.

pub mod host;
