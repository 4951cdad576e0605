//! The real `cocoon-agent` on this host (`cocoon-agent serve` on Unix sockets), driven
//! through the runtime's agent client: API basics, files, errors, and a busybox container
//! from a rootfs directory. No VM: the agent runs as PID 1 of a throwaway pid + mount
//! namespace with its own /run. Needs root.

use cocoon_agent_protocol::api::event::Kind;
use cocoon_agent_protocol::stdio::{StdioHeader, Stream};
use cocoon_agent_protocol::PROTOCOL_VERSION;
use cocoon_integration::oci::{busybox_rootfs, SpecBuilder};
use cocoon_integration::paths;
use cocoon_runtime::agent::{
    AgentClient, AgentError, Code, CopyFileRequest, Endpoint, ReadyListener, Stdio,
};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(20);

/// The agent binary: `$COCOON_AGENT`, else the workspace's debug build, built (or found
/// up to date) once per test run so the tests never run a stale agent.
fn agent_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("COCOON_AGENT") {
            return PathBuf::from(p);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", "cocoon-agent"])
            .current_dir(paths::repo_root())
            .status()
            .expect("run cargo build -p cocoon-agent");
        assert!(status.success(), "cargo build -p cocoon-agent failed");
        paths::repo_root().join("target/debug/cocoon-agent")
    })
    .clone()
}

/// `cocoon-agent serve` as PID 1 of a new pid + mount namespace, with a private tmpfs on
/// /run (its state lives under /run/cocoon). Killed on drop.
struct AgentProcess {
    unshare: Child,
    dir: tempfile::TempDir,
}

impl AgentProcess {
    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default();
        format!("--- agent log ---\n{text}")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // unshare --kill-child takes the agent (PID 1 of its namespace), and with it every
        // process of the namespace, along.
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

struct HostAgent {
    process: AgentProcess,
    client: AgentClient,
    /// The agent's pid on the host: its files are under /proc/<pid>/root.
    pid: u32,
}

impl HostAgent {
    fn start() -> HostAgent {
        let dir = tempfile::tempdir().expect("tempdir");
        let agent_sock = dir.path().join("agent.sock");
        let stdio_sock = dir.path().join("stdio.sock");
        let ready = ReadyListener::bind(&dir.path().join("ready.sock")).expect("ready listener");
        let log = std::fs::File::create(dir.path().join("agent.log")).expect("agent log");
        let script = format!(
            "mount -t tmpfs tmpfs /run && exec '{}' serve --agent unix:{} --stdio unix:{} --ready unix:{}",
            agent_binary().display(),
            agent_sock.display(),
            stdio_sock.display(),
            ready.path().display()
        );
        let unshare = Command::new("unshare")
            .args(["--mount", "--pid", "--fork", "--mount-proc", "--kill-child"])
            .args(["sh", "-c", &script])
            .env("COCOON_AGENT_LOG", "debug")
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start unshare + cocoon-agent serve");
        let process = AgentProcess { unshare, dir };
        if let Err(e) = ready.wait(TIMEOUT) {
            panic!("agent never reported ready: {e}\n{}", process.log());
        }
        let client = AgentClient::connect(
            Endpoint::Unix {
                agent: agent_sock,
                stdio: stdio_sock,
            },
            TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("connect to the agent: {e}\n{}", process.log()));
        let pid = child_of(process.unshare.id())
            .unwrap_or_else(|| panic!("no agent process under unshare\n{}", process.log()));
        HostAgent {
            process,
            client,
            pid,
        }
    }

    fn log(&self) -> String {
        self.process.log()
    }

    fn dir(&self) -> &Path {
        self.process.dir.path()
    }

    /// A path inside the agent's mount namespace, seen from the host.
    fn guest_path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.pid))
    }
}

/// The first child of `parent` (the forked PID 1 of the namespace).
fn child_of(parent: u32) -> Option<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        for e in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            // Fields after the command name (which may hold spaces): state, ppid, ...
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            let exe = std::fs::read_link(e.path().join("exe")).unwrap_or_default();
            if ppid == Some(parent) && exe.to_string_lossy().ends_with("cocoon-agent") {
                return Some(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn stdout_of(agent: &HostAgent, container: &str, exec: &str) -> std::os::unix::net::UnixStream {
    let header = StdioHeader {
        container_id: container.into(),
        exec_id: exec.into(),
        stream: Stream::Stdout,
    };
    let s = agent
        .client
        .open_stdio(&header)
        .unwrap_or_else(|e| panic!("open stdout of {container}/{exec}: {e}\n{}", agent.log()));
    s.set_read_timeout(Some(TIMEOUT)).expect("stream timeout");
    s
}

fn read_all(mut s: std::os::unix::net::UnixStream, what: &str) -> String {
    let mut out = String::new();
    s.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("reading {what}: {e} (read so far: {out:?})"));
    out
}

fn stdout_only() -> Stdio {
    Stdio {
        stdout: true,
        ..Default::default()
    }
}

#[test]
fn hello_round_trip() {
    let agent = HostAgent::start();
    let hello = agent
        .client
        .hello()
        .unwrap_or_else(|e| panic!("Hello: {e}\n{}", agent.log()));
    assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
    assert!(
        !hello.agent_version.is_empty(),
        "Hello has no agent version: {hello:?}"
    );
    assert!(
        !hello.kernel_release.is_empty(),
        "Hello has no kernel release: {hello:?}"
    );
}

#[test]
fn copy_file_sets_mode_owner_and_replaces_atomically() {
    let agent = HostAgent::start();
    let copy = |data: &str, mode: u32, uid: u32| CopyFileRequest {
        path: "/run/test/sub/config.txt".into(),
        data: data.as_bytes().to_vec(),
        mode,
        uid,
        gid: uid + 1,
        ..Default::default()
    };
    agent
        .client
        .copy_file(&copy("first\n", 0o640, 1000))
        .unwrap_or_else(|e| panic!("CopyFile: {e}\n{}", agent.log()));
    let path = agent.guest_path("/run/test/sub/config.txt");
    let meta = std::fs::metadata(&path).expect("copied file visible in the agent's /run");
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "first\n");
    assert_eq!(meta.mode() & 0o7777, 0o640, "mode not applied");
    assert_eq!((meta.uid(), meta.gid()), (1000, 1001), "owner not applied");
    assert!(
        !Path::new("/run/test/sub/config.txt").exists(),
        "the file leaked into the host's /run"
    );

    // A reader holding the old file keeps the old content: the replace is a rename.
    let mut old = std::fs::File::open(&path).expect("open old");
    agent
        .client
        .copy_file(&copy("second\n", 0o600, 2000))
        .unwrap_or_else(|e| panic!("CopyFile replace: {e}\n{}", agent.log()));
    let mut old_text = String::new();
    old.read_to_string(&mut old_text).expect("read old");
    assert_eq!(
        old_text, "first\n",
        "replace was not atomic (file rewritten in place)"
    );
    let meta2 = std::fs::metadata(&path).expect("stat replaced");
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "second\n");
    assert_ne!(meta.ino(), meta2.ino(), "replace reused the inode");
    assert_eq!(meta2.mode() & 0o7777, 0o600);
    assert_eq!((meta2.uid(), meta2.gid()), (2000, 2001));

    let link = CopyFileRequest {
        path: "/run/test/link".into(),
        symlink_target: "sub/config.txt".into(),
        ..Default::default()
    };
    agent.client.copy_file(&link).expect("CopyFile symlink");
    assert_eq!(
        std::fs::read_link(agent.guest_path("/run/test/link")).expect("symlink"),
        Path::new("sub/config.txt")
    );
    let dir = CopyFileRequest {
        path: "/run/test/empty-dir".into(),
        directory: true,
        mode: 0o750,
        ..Default::default()
    };
    agent.client.copy_file(&dir).expect("CopyFile directory");
    let m = std::fs::metadata(agent.guest_path("/run/test/empty-dir")).expect("dir");
    assert!(m.is_dir() && m.mode() & 0o7777 == 0o750, "directory: {m:?}");
}

#[test]
fn errors_carry_status_codes() {
    let agent = HostAgent::start();
    let code = |r: Result<(), AgentError>| r.err().and_then(|e| e.code());
    assert_eq!(
        code(
            agent
                .client
                .wait_process("nosuch", "", Some(TIMEOUT))
                .map(drop)
        ),
        Some(Code::NOT_FOUND),
        "WaitProcess of an unknown container"
    );
    assert_eq!(
        code(agent.client.start_container("nosuch").map(drop)),
        Some(Code::NOT_FOUND),
        "StartContainer of an unknown container"
    );
    assert_eq!(
        code(agent.client.signal_process("nosuch", "", 9, false)),
        Some(Code::NOT_FOUND),
        "SignalProcess of an unknown container"
    );
    let spec = SpecBuilder::new(&["true"]).to_json();
    assert_eq!(
        code(
            agent
                .client
                .create_container("../escape", &spec, None, Stdio::default())
                .map(drop)
        ),
        Some(Code::INVALID_ARGUMENT),
        "CreateContainer with a path-like id"
    );
    assert_eq!(
        code(
            agent
                .client
                .create_container("bad-json", b"{not json", None, Stdio::default())
                .map(drop)
        ),
        Some(Code::INVALID_ARGUMENT),
        "CreateContainer with a broken spec"
    );
    let relative = CopyFileRequest {
        path: "relative/file".into(),
        ..Default::default()
    };
    assert_eq!(
        code(agent.client.copy_file(&relative)),
        Some(Code::INVALID_ARGUMENT),
        "CopyFile to a relative path"
    );
    let header = StdioHeader {
        container_id: "nosuch".into(),
        exec_id: String::new(),
        stream: Stream::Stdout,
    };
    match agent.client.open_stdio(&header) {
        Err(AgentError::StdioRefused { reason, .. }) => {
            assert!(!reason.is_empty(), "stdio refusal without a reason")
        }
        other => panic!("stdio of an unknown container: {other:?}"),
    }
}

#[test]
fn busybox_container_echoes_execs_and_reports_exits() {
    let agent = HostAgent::start();
    let rootfs = agent.dir().join("rootfs");
    busybox_rootfs(&rootfs).expect("busybox rootfs");
    // Init prints, then waits for the exec to drop a file, then exits 3.
    let spec = SpecBuilder::new(&[
        "sh",
        "-c",
        "echo hello-from-init; i=0; while [ ! -e /tmp/stop ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; exit 3",
    ])
    .root(&rootfs, false)
    .to_json();
    let pid = agent
        .client
        .create_container("c1", &spec, None, stdout_only())
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", agent.log()));
    assert!(pid > 0, "CreateContainer returned pid 0");
    let out = stdout_of(&agent, "c1", "");
    agent
        .client
        .start_container("c1")
        .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", agent.log()));

    let exec = SpecBuilder::new(&[
        "sh",
        "-c",
        "echo exec-says-$((6*7)); touch /tmp/stop; exit 5",
    ])
    .process_json();
    agent
        .client
        .exec_process("c1", "e1", &exec, stdout_only())
        .unwrap_or_else(|e| panic!("ExecProcess: {e}\n{}", agent.log()));
    let exec_out = read_all(stdout_of(&agent, "c1", "e1"), "exec stdout");
    assert_eq!(exec_out, "exec-says-42\n", "exec output");
    let exec_wait = agent
        .client
        .wait_process("c1", "e1", Some(TIMEOUT))
        .unwrap_or_else(|e| panic!("WaitProcess exec: {e}\n{}", agent.log()));
    assert_eq!(exec_wait.exit_status, 5, "exec exit status");

    let init_out = read_all(out, "init stdout");
    assert_eq!(init_out, "hello-from-init\n", "init output");
    let wait = agent
        .client
        .wait_process("c1", "", Some(TIMEOUT))
        .unwrap_or_else(|e| panic!("WaitProcess init: {e}\n{}", agent.log()));
    assert_eq!(
        wait.exit_status, 3,
        "init exit status (the exec's /tmp/stop was not seen?)"
    );
    assert!(!wait.oom_killed, "init reported OOM-killed");
    assert!(wait.exited_at_ns > 0, "no exit time");

    // Both exits arrive as events, the exec's first.
    let mut exits = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while exits.len() < 2 && Instant::now() < deadline {
        let events = agent
            .client
            .get_events(Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("GetEvents: {e}\n{}", agent.log()));
        for ev in events {
            if let Some(Kind::Exited(x)) = ev.kind {
                exits.push((x.container_id, x.exec_id, x.exit_status));
            }
        }
    }
    assert_eq!(
        exits,
        vec![
            ("c1".to_string(), "e1".to_string(), 5),
            ("c1".to_string(), String::new(), 3)
        ],
        "exit events"
    );
    agent
        .client
        .remove_container("c1")
        .unwrap_or_else(|e| panic!("RemoveContainer: {e}\n{}", agent.log()));
    assert_eq!(
        agent
            .client
            .wait_process("c1", "", Some(TIMEOUT))
            .err()
            .and_then(|e| e.code()),
        Some(Code::NOT_FOUND),
        "a removed container is still known"
    );
}
