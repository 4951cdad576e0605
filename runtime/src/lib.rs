//! Cocoon's host-side runtime library.

pub mod agent;
pub mod cli;
pub mod config;
pub mod disk;
pub mod error;
pub mod events;
pub mod files;
pub mod host;
pub mod image;
pub mod liveness;
pub mod podnet;
pub mod sandbox;
pub mod spec;
pub mod state;
pub mod stdio;
pub mod sys;
pub mod task;
pub mod vmm;
