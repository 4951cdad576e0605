//! `cocoon-agent`: PID 1 of the Cocoon guest, and the only thing the host talks to.
//!
//! As PID 1 (the VM's `/init`) it mounts the kernel filesystems and cgroup v2, serves the
//! ttrpc API on vsock port 1024 and process stdio on 1025, reports ready on the console
//! and to the host's vsock port 1026, then reaps orphans forever (PID 1 never exits).
//! With `cocoon.selftest=1` on the kernel command line it powers the VM off instead.
//!
//! Other modes (the same binary):
//! - `cocoon-agent serve --agent ADDR --stdio ADDR [--ready ADDR]`: the same services on
//!   Unix sockets, for host-side tests in a throwaway pid+mount namespace.
//! - `cocoon-agent oci ...`: the single-threaded helper that runs libcontainer's
//!   create/exec (they fork and wait, which the agent's reaper must not race).
//! - `cocoon-agent sandbox-pause`: holds the pod's namespaces.

mod container;
mod error;
mod events;
mod files;
mod init;
mod network;
mod paths;
mod reaper;
mod sandbox;
mod server;
mod stdio;
mod storage;
mod transport;

/// A host test that cannot run its subject on this machine: under CI (`CI` set, where
/// everything the tests need is installed and they run as root) that fails the test;
/// elsewhere it says why, without claiming to have run anything.
#[cfg(test)]
fn cannot_run(why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "this test cannot run its subject under CI: {why}"
    );
    eprintln!("not run on this machine: {why}");
}

use cocoon_agent_protocol::{
    api, cmdline_flag, ReadyLine, AGENT_PORT, READY_PORT, SELFTEST_PARAM, STDIO_PORT,
};
use container::Containers;
use error::{AgentError, Result};
use server::{AgentService, OnShutdown};
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use transport::Addr;

const USAGE: &str = "usage: cocoon-agent                      (as PID 1 of a Cocoon VM)
       cocoon-agent serve --agent ADDR --stdio ADDR [--ready ADDR]
ADDR is vsock:PORT or unix:/PATH";

/// Where the agent serves and whom it tells it is ready.
struct Endpoints {
    agent: Addr,
    stdio: Addr,
    ready: Option<Addr>,
}

fn parse_serve_args(args: &[String]) -> Result<Endpoints> {
    let mut agent = None;
    let mut stdio = None;
    let mut ready = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| AgentError::InvalidArgument(format!("{flag} needs a value")))?;
        let slot = match flag.as_str() {
            "--agent" => &mut agent,
            "--stdio" => &mut stdio,
            "--ready" => &mut ready,
            other => return Err(AgentError::InvalidArgument(format!("unknown flag {other}"))),
        };
        *slot = Some(value.parse::<Addr>()?);
    }
    let need = |a: Option<Addr>, flag: &str| {
        a.ok_or_else(|| AgentError::InvalidArgument(format!("{flag} is required")))
    };
    Ok(Endpoints {
        agent: need(agent, "--agent")?,
        stdio: need(stdio, "--stdio")?,
        ready,
    })
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COCOON_AGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .init();
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("oci") => container::helper_main(&args[2..]),
        Some("sandbox-pause") => sandbox::pause_main(),
        Some("serve") => {
            reaper::block_sigchld();
            init_logging("info");
            match parse_serve_args(&args[2..]) {
                Ok(ends) => run(ends, OnShutdown::Exit, false),
                Err(e) => {
                    eprintln!("cocoon-agent: {e}\n{USAGE}");
                    ExitCode::from(2)
                }
            }
        }
        _ if std::process::id() == 1 => {
            reaper::block_sigchld();
            vm_init()
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// PID 1 of the VM.
fn vm_init() -> ! {
    if let Err(e) = init::switch_root_off_initramfs() {
        // Containers still run (libcontainer falls back to chroot), less contained.
        eprintln!("cocoon-agent: leaving the initramfs: {e}");
    }
    for err in init::mount_kernel_filesystems()
        .iter()
        .filter_map(|r| r.as_ref().err())
    {
        // Keep going: a missing /sys should not cost us the console and the host link.
        eprintln!("cocoon-agent: {err}");
    }
    if let Err(e) = init::enable_cgroup_controllers() {
        eprintln!("cocoon-agent: enabling cgroup controllers: {e}");
    }
    if let Err(e) = init::tune_free_page_reporting() {
        eprintln!("cocoon-agent: free page reporting order: {e}");
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    init_logging(if cmdline_flag(&cmdline, "cocoon.debug") {
        "debug"
    } else {
        "info"
    });
    let ends = Endpoints {
        agent: Addr::Vsock(AGENT_PORT),
        stdio: Addr::Vsock(STDIO_PORT),
        ready: Some(Addr::Vsock(READY_PORT)),
    };
    run(
        ends,
        OnShutdown::PowerOff,
        cmdline_flag(&cmdline, SELFTEST_PARAM),
    )
}

fn run(ends: Endpoints, on_shutdown: OnShutdown, selftest: bool) -> ! {
    // Not PID 1 (host tests without a pid namespace): still collect the orphans.
    if std::process::id() != 1 {
        let _ = nix::sys::prctl::set_child_subreaper(true);
    }
    for dir in [paths::RUN_DIR, paths::OCI_ROOT, paths::CONTAINERS_DIR] {
        if let Err(e) = std::fs::create_dir_all(dir) {
            tracing::error!("creating {dir}: {e}");
        }
    }
    let containers = Arc::new(Containers::new());
    let server = if selftest {
        None
    } else {
        match start_services(&ends, &containers, on_shutdown) {
            Ok(server) => Some(server),
            Err(e) => {
                // Without its API the agent is useless; stay up as init so the console
                // shows why (the host times out waiting for ready).
                tracing::error!("cannot serve: {e}");
                None
            }
        }
    };

    let ready = ReadyLine {
        uptime_ms: init::uptime_ms(),
    };
    let mut out = std::io::stdout().lock();
    // The console is all we have: if it is gone there is nobody to tell.
    let _ = writeln!(out, "{ready}");
    let _ = out.flush();
    drop(out);
    if selftest {
        let err = init::power_off();
        tracing::error!("power off failed: {err}");
    } else if server.is_some() {
        if let Some(addr) = &ends.ready {
            report_ready(addr, &ready);
        }
    }
    reaper::reaper().run_forever()
}

fn start_services(
    ends: &Endpoints,
    containers: &Arc<Containers>,
    on_shutdown: OnShutdown,
) -> Result<ttrpc::Server> {
    let service = AgentService {
        containers: Arc::clone(containers),
        on_shutdown,
    };
    let mut server = ttrpc::Server::new()
        .bind(&ends.agent.ttrpc_listen())
        .map_err(AgentError::failed(format!("listen on {}", ends.agent)))?
        .register_service(api::create_agent(Arc::new(service)))
        // Wait and GetEvents block a handler thread each; the default cap (5) would
        // let a few waiters starve every other call.
        .set_thread_count_default(4)
        .set_thread_count_max(256);
    server
        .start()
        .map_err(AgentError::failed(format!("start ttrpc on {}", ends.agent)))?;

    let listener = transport::Listener::bind(&ends.stdio)?;
    let containers = Arc::clone(containers);
    std::thread::Builder::new()
        .name("stdio-accept".into())
        .spawn(move || loop {
            match listener.accept() {
                Ok(conn) => {
                    let containers = Arc::clone(&containers);
                    let spawned = std::thread::Builder::new()
                        .name("stdio".into())
                        .spawn(move || stdio::serve_connection(&containers, conn));
                    if let Err(e) = spawned {
                        tracing::error!("stdio connection thread: {e}");
                    }
                }
                Err(e) => {
                    tracing::error!("{e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        })
        .map_err(AgentError::io("start the stdio listener thread"))?;
    tracing::info!(agent = %ends.agent, stdio = %ends.stdio, "serving");
    Ok(server)
}

/// Tells the host the API is up. A failed report is retried for a while (a host waits
/// for it, and one lost connect must not cost a pod); in the end it is logged, not fatal.
fn report_ready(addr: &Addr, ready: &ReadyLine) {
    const TRIES: u32 = 20;
    let mut pause = std::time::Duration::from_millis(20);
    for attempt in 1..=TRIES {
        let sent = transport::connect_to(addr).and_then(|mut conn| {
            conn.write_all(format!("{ready}\n").as_bytes())
                .map_err(AgentError::io(format!("write ready line to {addr}")))
        });
        match sent {
            Ok(()) => return,
            Err(e) if attempt == TRIES => tracing::error!("reporting ready, giving up: {e}"),
            Err(e) => {
                tracing::warn!(attempt, "reporting ready: {e}");
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn serve_args_parse_and_reject() {
        let e = parse_serve_args(&args("--agent unix:/a --stdio vsock:7 --ready unix:/r"))
            .expect("valid");
        assert_eq!(e.agent, Addr::Unix("/a".into()));
        assert_eq!(e.stdio, Addr::Vsock(7));
        assert_eq!(e.ready, Some(Addr::Unix("/r".into())));
        assert!(parse_serve_args(&args("--agent unix:/a")).is_err());
        assert!(parse_serve_args(&args("--agent unix:/a --stdio")).is_err());
        assert!(parse_serve_args(&args("--agent unix:/a --stdio unix:/b --bogus x")).is_err());
    }
}
