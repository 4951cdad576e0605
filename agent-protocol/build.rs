//! Generates the protobuf messages and ttrpc client/server code from proto/agent.proto
//! (pure Rust: no protoc needed).
//!
//! The generated files start with inner attributes (`#![allow(..)]`), which `include!`
//! cannot take; they are stripped here and the crate sets its own allows.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    ttrpc_codegen::Codegen::new()
        .out_dir(&out)
        .input("proto/agent.proto")
        .include("proto")
        .rust_protobuf()
        .run()
        .expect("generating the agent protocol from proto/agent.proto");
    for file in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out.join(file);
        let text = std::fs::read_to_string(&path).expect("reading generated code");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
            .collect();
        std::fs::write(&path, kept.join("\n")).expect("writing generated code");
    }
}
