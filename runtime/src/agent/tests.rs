use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Instant;

use cocoon_agent_protocol::stdio::StdioHeader;
use cocoon_agent_protocol::{PROTOCOL_VERSION, READY_PORT};

use super::*;
use cocoon_agent_protocol::stdio::Stream;
use std::sync::Arc;
use std::thread;

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// A fake VMM vsock socket: accepts one connection, checks the CONNECT line and
/// answers with `reply` (None: close at once; Some("") : never answer).
fn fake_vmm(path: &Path, reply: Option<&'static [u8]>) -> thread::JoinHandle<Vec<u8>> {
    let listener = UnixListener::bind(path).expect("bind fake vmm");
    thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while c.read(&mut b).expect("read CONNECT") == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        match reply {
            None => {}
            Some(b"") => thread::sleep(Duration::from_millis(800)),
            Some(r) => {
                c.write_all(r).expect("write reply");
                thread::sleep(Duration::from_millis(200));
            }
        }
        line
    })
}

#[test]
fn vsock_handshake_leaves_guest_data_in_the_stream() {
    let dir = tempdir();
    let sock = dir.path().join("v.sock");
    let server = fake_vmm(&sock, Some(b"OK 1073741824\nguest-data"));
    let mut s = vsock_connect(&sock, 1024, Duration::from_secs(5)).expect("handshake");
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).expect("guest data");
    assert_eq!(&buf, b"guest-data");
    assert_eq!(server.join().expect("server"), b"CONNECT 1024");
}

#[test]
fn vsock_handshake_errors_name_the_port() {
    let dir = tempdir();
    for (i, (reply, want)) in [
        (None, "closed without OK"),
        (Some(&b"NO\n"[..]), "expected `OK <port>`"),
        (Some(&b"OK x\n"[..]), "expected `OK <port>`"),
        (Some(&[b'O'; 100][..]), "too long"),
    ]
    .into_iter()
    .enumerate()
    {
        let sock = dir.path().join(format!("v{i}.sock"));
        let server = fake_vmm(&sock, reply);
        let err = vsock_connect(&sock, 1025, Duration::from_secs(5)).expect_err("must fail");
        let text = err.to_string();
        assert!(
            matches!(err, AgentError::Handshake { port: 1025, .. }) && text.contains(want),
            "{text}"
        );
        server.join().expect("server");
    }
}

#[test]
fn vsock_handshake_times_out() {
    let dir = tempdir();
    let sock = dir.path().join("v.sock");
    let server = fake_vmm(&sock, Some(b""));
    let started = Instant::now();
    let err = vsock_connect(&sock, 1024, Duration::from_millis(200)).expect_err("timeout");
    assert!(err.to_string().contains("no OK within"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    server.join().expect("server");
}

#[test]
fn connect_to_missing_socket_names_the_path() {
    let dir = tempdir();
    let sock = dir.path().join("absent.sock");
    let err = vsock_connect(&sock, 1024, Duration::from_secs(1)).expect_err("no socket");
    assert!(matches!(err, AgentError::Connect { .. }));
    assert!(err.to_string().contains("absent.sock"), "{err}");
}

fn header(container: &str, stream: Stream) -> StdioHeader {
    StdioHeader {
        container_id: container.into(),
        exec_id: String::new(),
        stream,
    }
}

/// A fake stdio port: reads a header line, answers `reply`, then sends `data`.
fn fake_stdio(path: &Path, reply: &'static str, data: &'static str) -> thread::JoinHandle<String> {
    let listener = UnixListener::bind(path).expect("bind fake stdio");
    thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while c.read(&mut b).expect("read header") == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        c.write_all(reply.as_bytes()).expect("reply");
        c.write_all(data.as_bytes()).expect("data");
        String::from_utf8_lossy(&line).into_owned()
    })
}

#[test]
fn stdio_stream_opens_and_refusals_carry_the_reason() {
    let dir = tempdir();
    let endpoint = Endpoint::Unix {
        agent: dir.path().join("agent.sock"),
        stdio: dir.path().join("stdio.sock"),
    };
    let server = fake_stdio(&dir.path().join("stdio.sock"), "ok\n", "hello\n");
    let mut s = open_stdio(
        &endpoint,
        &header("c1", Stream::Stdout),
        Duration::from_secs(5),
    )
    .expect("open stdout");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read output");
    assert_eq!(out, "hello\n");
    assert_eq!(server.join().expect("server"), "stdio v1 c1 - stdout");

    std::fs::remove_file(dir.path().join("stdio.sock")).expect("rm");
    let server = fake_stdio(
        &dir.path().join("stdio.sock"),
        "err no such container\n",
        "",
    );
    let err = open_stdio(
        &endpoint,
        &header("nope", Stream::Stderr),
        Duration::from_secs(5),
    )
    .expect_err("refused");
    match &err {
        AgentError::StdioRefused { header, reason } => {
            assert_eq!(header, "stdio v1 nope - stderr");
            assert_eq!(reason, "no such container");
        }
        other => panic!("wrong error {other:?}"),
    }
    server.join().expect("server");
}

#[test]
fn unix_endpoint_has_only_agent_and_stdio_ports() {
    let e = Endpoint::Unix {
        agent: "/nonexistent/a".into(),
        stdio: "/nonexistent/s".into(),
    };
    assert!(matches!(
        e.connect(READY_PORT, Duration::from_secs(1)),
        Err(AgentError::Handshake {
            port: READY_PORT,
            ..
        })
    ));
}

#[test]
fn ready_listener_reads_the_line_and_cleans_up() {
    let dir = tempdir();
    let vsock = dir.path().join("vm.sock");
    let listener = ReadyListener::for_vsock(&vsock).expect("bind");
    assert_eq!(listener.path(), dir.path().join("vm.sock_1026"));
    let path = listener.path().to_path_buf();
    let agent = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        let mut c = UnixStream::connect(&path).expect("connect");
        c.write_all(b"cocoon-agent ready uptime_ms=42\n")
            .expect("write");
    });
    let ready = listener.wait(Duration::from_secs(5)).expect("ready");
    assert_eq!(ready.uptime_ms, 42);
    agent.join().expect("agent thread");
    let path = listener.path().to_path_buf();
    drop(listener);
    assert!(!path.exists(), "ready socket left behind");
}

#[test]
fn ready_wait_ends_early_when_the_guest_is_gone() {
    let dir = tempdir();
    let listener = ReadyListener::for_vsock(&dir.path().join("vm.sock")).expect("bind");
    let t = std::time::Instant::now();
    let mut asked = 0;
    let e = listener
        .wait_while(Duration::from_secs(30), || {
            asked += 1;
            if asked < 3 {
                Ok(())
            } else {
                Err("the VMM exited with status 1".into())
            }
        })
        .expect_err("no agent");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(e.to_string().contains("VMM exited with status 1"), "{e}");
}

#[test]
fn ready_listener_times_out_and_rejects_garbage() {
    let dir = tempdir();
    let listener = ReadyListener::bind(&dir.path().join("r.sock")).expect("bind");
    let started = Instant::now();
    let err = listener
        .wait(Duration::from_millis(150))
        .expect_err("timeout");
    assert!(err.to_string().contains("did not report"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(150));

    let path = listener.path().to_path_buf();
    let agent = thread::spawn(move || {
        let mut c = UnixStream::connect(&path).expect("connect");
        c.write_all(b"hello\n").expect("write");
    });
    let err = listener.wait(Duration::from_secs(5)).expect_err("garbage");
    assert!(
        err.to_string().contains("not a cocoon-agent ready line"),
        "{err}"
    );
    agent.join().expect("agent thread");

    // A rebind replaces a stale socket but never another file.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).expect("bind stale"));
    assert!(ReadyListener::bind(&stale).is_ok());
    let file = dir.path().join("file");
    std::fs::write(&file, "x").expect("write file");
    assert!(ReadyListener::bind(&file).is_err());
}

/// A ttrpc server with a few canned answers, to check the client's error mapping.
struct FakeAgent {
    version: u32,
}

impl api::Agent for FakeAgent {
    fn hello(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        _: api::HelloRequest,
    ) -> ttrpc::Result<HelloResponse> {
        Ok(HelloResponse {
            protocol_version: self.version,
            agent_version: "fake".into(),
            ..Default::default()
        })
    }

    fn wait_process(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        req: api::ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        if req.container_id == "slow" {
            thread::sleep(Duration::from_millis(500));
        }
        Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
            Code::NOT_FOUND,
            format!("container {:?} not found", req.container_id),
        )))
    }
}

fn fake_agent(path: &Path, version: u32) -> ttrpc::Server {
    let service = api::create_agent(Arc::new(FakeAgent { version }));
    let mut server = ttrpc::Server::new()
        .bind(&format!("unix://{}", path.display()))
        .expect("bind fake agent")
        .register_service(service);
    server.start().expect("start fake agent");
    server
}

#[test]
fn client_checks_version_and_maps_status_and_timeouts() {
    let dir = tempdir();
    let agent = dir.path().join("agent.sock");
    let server = fake_agent(&agent, PROTOCOL_VERSION);
    let endpoint = Endpoint::Unix {
        agent: agent.clone(),
        stdio: dir.path().join("stdio.sock"),
    };
    let (client, hello) =
        AgentClient::connect_checked(endpoint.clone(), Duration::from_secs(5)).expect("hello");
    assert_eq!(hello.agent_version, "fake");
    let err = client.wait_process("c9", "", None).expect_err("not found");
    assert_eq!(err.code(), Some(Code::NOT_FOUND), "{err}");
    assert!(err.to_string().contains("WaitProcess") && err.to_string().contains("c9"));
    let err = client
        .wait_process("slow", "", Some(Duration::from_millis(100)))
        .expect_err("timeout");
    assert!(
        matches!(
            err,
            AgentError::Timeout {
                call: "WaitProcess",
                ..
            }
        ),
        "{err}"
    );
    drop(client);
    server.shutdown();

    let agent2 = dir.path().join("agent2.sock");
    let server = fake_agent(&agent2, PROTOCOL_VERSION + 1);
    let endpoint = Endpoint::Unix {
        agent: agent2,
        stdio: dir.path().join("stdio.sock"),
    };
    let err = AgentClient::connect_checked(endpoint, Duration::from_secs(5))
        .expect_err("version mismatch");
    assert!(matches!(err, AgentError::ProtocolVersion { .. }), "{err}");
    server.shutdown();
}
