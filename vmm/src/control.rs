//! The control socket: a Unix stream socket (mode 0600) taking one JSON request per line
//! and answering each with one JSON line. See docs/vmm.md for the protocol.

use crate::devices::block::Backing;
use crate::vm::{Vm, VmExit};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Longest request line accepted; longer ones end the connection.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Put a raw image file into a drive slot.
    Swap {
        slot: usize,
        path: PathBuf,
        #[serde(default)]
        read_only: bool,
        #[serde(default)]
        serial: Option<String>,
    },
    /// Empty a drive slot.
    Eject {
        slot: usize,
    },
    // Struct variants (not unit ones) so that unknown fields are refused for them too.
    Pause {},
    Resume {},
    /// Stop the vCPUs, flush disks, exit with status 0.
    Shutdown {},
    Stats {},
}

#[derive(Debug, Serialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<crate::vm::Stats>,
}

impl Response {
    fn ok() -> Self {
        Response {
            ok: true,
            error: None,
            stats: None,
        }
    }
    fn err(e: impl ToString) -> Self {
        Response {
            ok: false,
            error: Some(e.to_string()),
            stats: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Binds the socket with mode 0600 (bound under a temporary name, then renamed, so it is
/// never reachable with wider permissions) and serves it on a background thread.
pub fn serve(path: &Path, vm: Arc<Vm>) -> Result<(), ControlError> {
    let err = |source| ControlError::Bind {
        path: path.into(),
        source,
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(err)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let vm = vm.clone();
                        let _ = std::thread::Builder::new()
                            .name("control-conn".into())
                            .spawn(move || handle(stream, &vm));
                    }
                    Err(e) => tracing::warn!(socket = %path.display(), error = %e, "accept"),
                }
            }
        })
        .map_err(err)?;
    Ok(())
}

fn handle(stream: UnixStream, vm: &Vm) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream).take(MAX_REQUEST as u64);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if !line.ends_with('\n') => {
                let _ = reply(
                    &mut out,
                    &Response::err("request too long or not newline-terminated"),
                );
                return;
            }
            Ok(_) => {}
        }
        reader.set_limit(MAX_REQUEST as u64);
        let (response, shutdown) = match serde_json::from_str::<Request>(line.trim()) {
            Ok(req) => {
                tracing::info!(?req, "control request");
                let shutdown = req == Request::Shutdown {};
                (execute(vm, req), shutdown)
            }
            Err(e) => (Response::err(format!("bad request: {e}")), false),
        };
        if reply(&mut out, &response).is_err() {
            return;
        }
        if shutdown {
            vm.finish(VmExit::ControlShutdown);
            return;
        }
    }
}

fn reply(out: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut text = serde_json::to_string(r).unwrap_or_else(|_| r#"{"ok":false}"#.into());
    text.push('\n');
    out.write_all(text.as_bytes())
}

fn execute(vm: &Vm, req: Request) -> Response {
    let result = match req {
        Request::Swap {
            slot,
            path,
            read_only,
            serial,
        } => vm.swap_drive(
            slot,
            Some(Backing {
                path,
                read_only,
                serial,
            }),
        ),
        Request::Eject { slot } => vm.swap_drive(slot, None),
        Request::Pause {} => vm.pause(),
        Request::Resume {} => {
            vm.resume();
            Ok(())
        }
        Request::Shutdown {} => Ok(()),
        Request::Stats {} => {
            return Response {
                stats: Some(vm.stats()),
                ..Response::ok()
            }
        }
    };
    match result {
        Ok(()) => Response::ok(),
        Err(e) => Response::err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        let r: Request =
            serde_json::from_str(r#"{"op":"swap","slot":2,"path":"/d.img","read_only":true}"#)
                .expect("swap");
        assert_eq!(
            r,
            Request::Swap {
                slot: 2,
                path: "/d.img".into(),
                read_only: true,
                serial: None
            }
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"eject","slot":0}"#).expect("eject"),
            Request::Eject { slot: 0 }
        );
        for bad in [
            r#"{"op":"swap","slot":-1,"path":"/x"}"#,
            r#"{"op":"swap","path":"/x"}"#,
            r#"{"op":"explode"}"#,
            r#"{"op":"pause","extra":1}"#,
            r#"not json"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }
}
