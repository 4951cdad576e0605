//! The `start` action: containerd runs the shim binary with `start`, and reads the
//! address of the (possibly already running) shim server of the pod from its stdout.
//!
//! The containerd-shim crate answers the pre-2.3 ("legacy") protocol with JSON
//! (`{"version":3,"address":...}`), which only containerd 1.7 and later parse:
//! containerd 1.6 dials the whole JSON text as a socket path. A bare address is what
//! every version before 2.3 accepts (1.7 and 2.0-2.2 take it for task API v2, which
//! this shim serves too), so that is the legacy answer here; containerd 2.3+
//! (bootstrap protocol: `BootstrapParams` on stdin) gets a `BootstrapResult`.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use containerd_shim as shim;
use shim::bootstrap::{BootstrapParams, BootstrapResult};
use shim::protos::protobuf::Message;

use cocoon_runtime::spec;

use crate::service::bundle_spec;

/// Same bound as containerd's.
const MAX_INPUT: u64 = 10 << 20;

/// Runs the `start` action; the reply goes to stdout.
pub fn start(flags: &shim::Flags) -> Result<(), String> {
    let input = read_stdin()?;
    let (opts, bootstrap) = match bootstrap_params(&input, flags) {
        Some(p) => (shim::StartOpts::from(p), true),
        None => (
            shim::StartOpts {
                id: flags.id.clone(),
                publish_binary: flags.publish_binary.clone(),
                address: flags.address.clone(),
                ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
                namespace: flags.namespace.clone(),
                debug: flags.debug,
                ..Default::default()
            },
            false,
        ),
    };
    if opts.ttrpc_address.is_empty() {
        return Err("containerd's TTRPC address is not set (TTRPC_ADDRESS)".into());
    }
    // containerd runs `start` in the bundle directory; every container of a pod is
    // served by the shim of its sandbox.
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))
    } else {
        PathBuf::from(&flags.bundle)
    };
    let grouping = bundle_spec(&bundle)
        .map(|s| spec::sandbox_id_of(&s, &opts.id))
        .unwrap_or_else(|| opts.id.clone());
    let (_pid, address) =
        shim::spawn(opts, &grouping, Vec::new()).map_err(|e| format!("spawn the shim: {e}"))?;
    shim::synchronous::util::write_address(&address)
        .map_err(|e| format!("write the address file: {e}"))?;
    let reply = if bootstrap {
        BootstrapResult {
            version: shim::protos::TASK_API_VERSION,
            address: address.clone(),
            protocol: "ttrpc".into(),
            ..Default::default()
        }
        .write_to_bytes()
        .map_err(|e| format!("encode the bootstrap result: {e}"))?
    } else {
        address.into_bytes()
    };
    let mut out = std::io::stdout().lock();
    out.write_all(&reply)
        .and_then(|()| out.flush())
        .map_err(|e| format!("write the reply: {e}"))
}

fn read_stdin() -> Result<Vec<u8>, String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(Vec::new());
    }
    let mut input = Vec::new();
    stdin
        .lock()
        .take(MAX_INPUT)
        .read_to_end(&mut input)
        .map_err(|e| format!("read stdin: {e}"))?;
    Ok(input)
}

/// containerd 2.3+'s bootstrap parameters, if that is what stdin holds (older
/// versions pass nothing or the runtime options, a protobuf `Any`).
fn bootstrap_params(input: &[u8], flags: &shim::Flags) -> Option<BootstrapParams> {
    if input.is_empty() {
        return None;
    }
    let p = BootstrapParams::parse_from_bytes(input).ok()?;
    (p.instance_id == flags.id
        && p.namespace == flags.namespace
        && !p.containerd_ttrpc_address.is_empty())
    .then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> shim::Flags {
        shim::parse(&["-namespace", "k8s.io", "-id", "abc", "start"]).expect("flags")
    }

    #[test]
    fn legacy_input_is_not_bootstrap() {
        assert!(bootstrap_params(b"", &flags()).is_none());
        // Runtime options: a protobuf Any (type URL, value).
        let any = shim::protos::protobuf::well_known_types::any::Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: vec![1, 2, 3],
            ..Default::default()
        };
        let bytes = any.write_to_bytes().expect("encode");
        assert!(bootstrap_params(&bytes, &flags()).is_none());
    }

    #[test]
    fn bootstrap_input_is_recognised() {
        let p = BootstrapParams {
            instance_id: "abc".into(),
            namespace: "k8s.io".into(),
            containerd_ttrpc_address: "/run/containerd/containerd.sock.ttrpc".into(),
            ..Default::default()
        };
        let bytes = p.write_to_bytes().expect("encode");
        let got = bootstrap_params(&bytes, &flags()).expect("bootstrap");
        assert_eq!(got.instance_id, "abc");
    }
}
