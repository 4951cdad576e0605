//! Registry tests without containers, and one host test that runs real containers with
//! libcontainer (root, busybox-static) inside a throwaway mount+pid namespace.

use super::*;
use crate::stdio::serve_connection;
use cocoon_agent_protocol::stdio::parse_reply;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::Command;

/// The test binary doubles as the oci helper: this test is the entry point.
const HELPER_TEST: &str = "container::tests::oci_helper_entry";
const LIFECYCLE_TEST: &str = "container::tests::containers_run_on_the_host";
/// Set in the re-executed test process that runs inside the namespaces.
const INNER_ENV: &str = "COCOON_TEST_CONTAINER_INNER";
const BUSYBOX: &str = "/bin/busybox";

#[test]
fn oci_helper_entry() {
    let Ok(args) = std::env::var(helper::TEST_ARGS_ENV) else {
        return;
    };
    let args: Vec<String> = args.split('\u{1f}').map(String::from).collect();
    helper::prepare_process();
    std::process::exit(i32::from(helper::helper_status(&args)));
}

/// Runs the helper as this agent binary (`$COCOON_TEST_AGENT_BIN oci ...`) instead of
/// the test binary, e.g. the static build.
const AGENT_BIN_ENV: &str = "COCOON_TEST_AGENT_BIN";

fn test_config(base: &Path) -> Config {
    let exe = std::env::current_exe().expect("current exe");
    let helper = match std::env::var_os(AGENT_BIN_ENV) {
        Some(agent) => HelperCommand::agent(agent.into()),
        None => HelperCommand::via_env(
            exe,
            [
                "--exact",
                "--nocapture",
                "--test-threads=1",
                "-q",
                HELPER_TEST,
            ]
            .map(String::from)
            .to_vec(),
        ),
    };
    Config {
        oci_root: base.join("oci"),
        containers_dir: base.join("containers"),
        run_dir: base.join("run"),
        cgroup_root: cgroup::CGROUP_ROOT.into(),
        helper,
        // The guest's root is the initramfs (no pivot_root): COCOON_TEST_NO_PIVOT=1
        // runs the host test the same way.
        no_pivot: std::env::var_os("COCOON_TEST_NO_PIVOT").is_some(),
    }
}

fn create_request(
    id: &str,
    spec: serde_json::Value,
    stdio: api::Stdio,
) -> api::CreateContainerRequest {
    let mut r = api::CreateContainerRequest::new();
    r.container_id = id.to_string();
    r.spec_json = serde_json::to_vec(&spec).expect("json");
    r.stdio = Some(stdio).into();
    r
}

fn stdio(terminal: bool, stdin: bool, stdout: bool, stderr: bool) -> api::Stdio {
    let mut s = api::Stdio::new();
    s.terminal = terminal;
    s.stdin = stdin;
    s.stdout = stdout;
    s.stderr = stderr;
    s
}

#[test]
fn unknown_ids_and_bad_requests() {
    let base = tempfile::tempdir().expect("tempdir");
    let cs = Containers::with_config(test_config(base.path()));
    let nf = |r: Result<()>| matches!(r, Err(AgentError::NotFound { .. }));
    assert!(nf(cs.start("nope").map(drop)));
    assert!(nf(cs.signal("nope", "", 9, false)));
    assert!(nf(cs.wait("nope", "").map(drop)));
    assert!(nf(cs.close_stdin("nope", "")));
    assert!(nf(cs.resize_tty("nope", "", 1, 1)));
    assert!(nf(cs.list_processes("nope").map(drop)));
    assert!(nf(cs.stats("nope").map(drop)));
    assert!(nf(cs.pause("nope")));
    assert!(nf(cs.resume("nope")));
    assert!(nf(cs.update("nope", b"{}")));
    assert!(nf(cs.remove("nope")));

    for bad_id in ["", "../x", "a/b"] {
        let r = cs.create(&create_request(
            bad_id,
            serde_json::json!({}),
            api::Stdio::new(),
        ));
        assert!(
            matches!(r, Err(AgentError::InvalidArgument(_))),
            "{bad_id:?}"
        );
    }
    // A bad spec fails before anything runs and leaves nothing behind.
    let r = cs.create(&create_request(
        "c1",
        serde_json::json!({"root": {"path": "rel"}}),
        api::Stdio::new(),
    ));
    assert!(matches!(r, Err(AgentError::InvalidArgument(_))), "{r:?}");
    assert!(!base.path().join("containers/c1").exists());
    // A half-given rootfs is refused.
    let mut req = create_request("c1", serde_json::json!({}), api::Stdio::new());
    let mut rootfs = api::Rootfs::new();
    rootfs.image_mount = "/images/x".into();
    req.rootfs = Some(rootfs).into();
    assert!(matches!(
        cs.create(&req),
        Err(AgentError::InvalidArgument(_))
    ));
}

#[test]
fn fake_container_process_calls() {
    let (cs, _p) = test_support::fake_containers("f1");
    assert!(matches!(
        cs.signal("f1", "", 12345, false),
        Err(AgentError::InvalidArgument(_))
    ));
    assert!(matches!(
        cs.signal("f1", "e1", 9, false),
        Err(AgentError::NotFound { .. })
    ));
    assert!(matches!(
        cs.signal("f1", "e1", 9, true),
        Err(AgentError::InvalidArgument(_))
    ));
    assert!(matches!(
        cs.resize_tty("f1", "", 10, 10),
        Err(AgentError::FailedPrecondition(_))
    ));
    cs.close_stdin("f1", "").expect("close stdin");
    let mut req = api::ExecProcessRequest::new();
    req.container_id = "f1".into();
    req.exec_id = "bad/id".into();
    assert!(matches!(cs.exec(&req), Err(AgentError::InvalidArgument(_))));
    req.exec_id = "e1".into();
    req.process_json = b"{".to_vec();
    assert!(matches!(cs.exec(&req), Err(AgentError::InvalidArgument(_))));
    assert!(matches!(
        cs.start("f1"),
        Err(AgentError::FailedPrecondition(_))
    ));
}

// ---- the host test ----

/// Whether this host can run the lifecycle test; why not otherwise.
fn host_test_blocker() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root".into());
    }
    if !Path::new(BUSYBOX).exists() {
        return Some(format!("needs {BUSYBOX} (apt-get install busybox-static)"));
    }
    if Command::new("unshare").arg("--version").output().is_err() {
        return Some("needs unshare(1)".into());
    }
    None
}

#[test]
fn containers_run_on_the_host() {
    if std::env::var_os(INNER_ENV).is_some() {
        return lifecycle_inside_namespaces();
    }
    if let Some(why) = host_test_blocker() {
        crate::cannot_run(&why);
        return;
    }
    // A fresh pid namespace makes the test process PID 1, so container processes are
    // re-parented to it as they are to the agent in the guest; a mount namespace with
    // its own /proc keeps the mounts and pids private.
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new("unshare")
        .args(["--mount", "--pid", "--fork", "--mount-proc", "--"])
        .arg(exe)
        .args(["--exact", "--nocapture", "--test-threads=1", LIFECYCLE_TEST])
        .env(INNER_ENV, "1")
        .output()
        .expect("run unshare");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "inner test failed:\n{text}");
    assert!(text.contains("1 passed"), "inner test did not run:\n{text}");
}

fn socket_pair() -> (File, File) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    (File::from(OwnedFd::from(a)), File::from(OwnedFd::from(b)))
}

/// Attaches a stream the way the host does; returns the host end after `ok`.
fn attach(cs: &Arc<Containers>, id: &str, exec: &str, stream: &str) -> File {
    let (agent, mut host) = socket_pair();
    let exec = if exec.is_empty() { "-" } else { exec };
    host.write_all(format!("stdio v1 {id} {exec} {stream}\n").as_bytes())
        .expect("header");
    let c = Arc::clone(cs);
    std::thread::spawn(move || serve_connection(&c, agent));
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while host.read(&mut b).expect("reply") == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    assert_eq!(parse_reply(&line), Ok(()), "attach {id}/{exec} {stream}");
    host
}

fn read_all(mut f: File) -> String {
    let mut s = String::new();
    f.read_to_string(&mut s).expect("read stream");
    s
}

/// Reads from a pty stream until `want` shows up (a pty stream only ends with the
/// terminal).
fn read_until(f: &mut File, want: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains(want) {
        match f.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn make_image(dir: &Path) {
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(dir.join(d)).expect("mkdir");
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("tmp"), std::fs::Permissions::from_mode(0o1777))
        .expect("chmod /tmp");
    std::fs::copy(BUSYBOX, dir.join("bin/busybox")).expect("copy busybox");
    for tool in [
        "sh", "echo", "cat", "sleep", "dd", "true", "ls", "id", "tty", "grep",
    ] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(tool)).expect("symlink");
    }
}

/// Denies mkdir with EPERM: shows whether a process runs under the container's seccomp
/// filter.
fn deny_mkdir() -> serde_json::Value {
    serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
    })
}

fn spec(root: Option<&Path>, args: &[&str], resources: serde_json::Value) -> serde_json::Value {
    let mut s = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "HOME=/"],
            "cwd": "/",
            "noNewPrivileges": true,
        },
        "hostname": "cocoon-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}],
            "resources": resources,
        },
    });
    if let Some(r) = root {
        s["root"] = serde_json::json!({"path": r});
    }
    s
}

fn exec_request(
    id: &str,
    exec_id: &str,
    args: &[&str],
    stdio: api::Stdio,
) -> api::ExecProcessRequest {
    exec_request_nnp(id, exec_id, args, stdio, None)
}

/// A few capabilities, not CAP_SYS_ADMIN: seccomp(2) then needs no_new_privs.
fn limited_caps() -> serde_json::Value {
    let caps = serde_json::json!(["CAP_CHOWN", "CAP_KILL", "CAP_SETUID", "CAP_SETGID"]);
    serde_json::json!({"bounding": caps, "effective": caps, "permitted": caps})
}

/// An exec request with `noNewPrivileges` set as given, and [`limited_caps`], or as
/// [`exec_request`] for None.
fn exec_request_nnp(
    id: &str,
    exec_id: &str,
    args: &[&str],
    stdio: api::Stdio,
    no_new_privileges: Option<bool>,
) -> api::ExecProcessRequest {
    let mut r = api::ExecProcessRequest::new();
    r.container_id = id.into();
    r.exec_id = exec_id.into();
    let mut process = serde_json::json!({
        "user": {"uid": 1000, "gid": 1000, "additionalGids": [10]},
        "args": args,
        "env": ["PATH=/bin"],
        "cwd": "/tmp",
    });
    if let Some(nnp) = no_new_privileges {
        process["noNewPrivileges"] = serde_json::json!(nnp);
        process["capabilities"] = limited_caps();
    }
    r.process_json = serde_json::to_vec(&process).expect("json");
    r.stdio = Some(stdio).into();
    r
}

fn exited_events(id: &str) -> Vec<(String, i32, bool)> {
    events()
        .take(Duration::from_millis(200))
        .into_iter()
        .filter(|e| e.has_exited() && e.exited().container_id == id)
        .map(|e| {
            let x = e.exited();
            (x.exec_id.clone(), x.exit_status, x.oom_killed)
        })
        .collect()
}

fn lifecycle_inside_namespaces() {
    assert_eq!(
        std::process::id(),
        1,
        "runs as PID 1 of its own pid namespace"
    );
    std::thread::spawn(|| loop {
        reaper().reap_pending();
        std::thread::sleep(Duration::from_millis(5));
    });
    let base = tempfile::tempdir().expect("tempdir");
    let cfg = test_config(base.path());
    std::fs::create_dir_all(&cfg.run_dir).expect("run dir");
    let cs = Arc::new(Containers::with_config(cfg));
    let image = base.path().join("image");
    make_image(&image);

    // 1. Pipes: output written before anyone attached is kept; stdin reaches the
    //    process; exit codes and exec; the container's seccomp filter (mkdir fails with
    //    EPERM) holds for its init and for exec'd processes.
    let args = [
        "sh",
        "-c",
        "mkdir /d1 2>/dev/null || echo denied; echo hello; read line; echo got $line; exit 3",
    ];
    let mut c1_spec = spec(Some(&image), &args, serde_json::json!({}));
    c1_spec["linux"]["seccomp"] = deny_mkdir();
    let req = create_request("c1", c1_spec, stdio(false, true, true, false));
    let pid = cs.create(&req).expect("create c1");
    assert!(pid > 1);
    assert!(matches!(
        cs.create(&req),
        Err(AgentError::AlreadyExists { .. })
    ));
    assert!(
        matches!(
            cs.exec(&exec_request("c1", "e0", &["true"], api::Stdio::new())),
            Err(AgentError::FailedPrecondition(_))
        ),
        "no exec before start"
    );
    assert_eq!(cs.start("c1").expect("start c1"), pid);
    assert!(matches!(
        cs.start("c1"),
        Err(AgentError::FailedPrecondition(_))
    ));
    assert!(cs.list_processes("c1").expect("ps").contains(&pid));

    // Unfiltered, uid 1000 could make /tmp/d2 (/tmp is 1777).
    let exec_args = [
        "sh",
        "-c",
        "echo exec $(id -u):$(id -g) $(pwd); mkdir /tmp/d2 2>&1 || echo denied; \
         grep Seccomp: /proc/self/status; exit 5",
    ];
    let epid = cs
        .exec(&exec_request(
            "c1",
            "e1",
            &exec_args,
            stdio(false, false, true, true),
        ))
        .expect("exec e1");
    assert!(matches!(
        cs.exec(&exec_request("c1", "e1", &["true"], api::Stdio::new())),
        Err(AgentError::AlreadyExists { .. })
    ));
    // The exec'd process runs under the container's filter (libcontainer 0.7 dropped
    // it for exec; third_party/libcontainer/PATCHES.md).
    let filtered = "mkdir: can't create directory '/tmp/d2': Operation not permitted\n\
                    denied\nSeccomp:\t2\n";
    assert_eq!(
        read_all(attach(&cs, "c1", "e1", "stdout")),
        format!("exec 1000:1000 /tmp\n{filtered}")
    );
    assert_eq!(read_all(attach(&cs, "c1", "e1", "stderr")), "");
    let w = cs.wait("c1", "e1").expect("wait e1");
    assert_eq!(w.exit_status, 5);
    assert!(w.exited_at_ns > 0);
    assert!(!w.oom_killed);
    // libcontainer installs the filter before dropping capabilities unless the process
    // sets noNewPrivileges (then right before exec): each way holds for an exec, also
    // with an explicit `false` (upstream 0.7 then failed to load the filter).
    for (exec_id, nnp) in [("e2", true), ("e3", false)] {
        let args = [
            "sh",
            "-c",
            "mkdir /tmp/d2 2>&1 || echo denied; grep Seccomp: /proc/self/status",
        ];
        cs.exec(&exec_request_nnp(
            "c1",
            exec_id,
            &args,
            stdio(false, false, true, false),
            Some(nnp),
        ))
        .unwrap_or_else(|e| panic!("exec {exec_id} (noNewPrivileges {nnp}): {e}"));
        assert_eq!(
            read_all(attach(&cs, "c1", exec_id, "stdout")),
            filtered,
            "exec {exec_id} (noNewPrivileges {nnp})"
        );
        assert_eq!(cs.wait("c1", exec_id).expect("wait").exit_status, 0);
    }
    assert!(matches!(
        cs.signal("c1", "e1", 15, false),
        Err(AgentError::NotFound { .. })
    ));
    assert_ne!(epid, pid);

    let out = attach(&cs, "c1", "", "stdout");
    let mut input = attach(&cs, "c1", "", "stdin");
    input.write_all(b"world\n").expect("stdin");
    drop(input);
    assert_eq!(read_all(out), "denied\nhello\ngot world\n");
    let w = cs.wait("c1", "").expect("wait c1");
    assert_eq!(w.exit_status, 3);
    let mut seen = exited_events("c1");
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (String::new(), 3, false),
            ("e1".into(), 5, false),
            ("e2".into(), 0, false),
            ("e3".into(), 0, false),
        ]
    );
    assert!(matches!(
        cs.signal("c1", "", 9, false),
        Err(AgentError::NotFound { .. })
    ));
    cs.signal("c1", "", 9, true)
        .expect("kill --all on a stopped container is fine");
    cs.remove("c1").expect("remove c1");
    assert!(matches!(cs.remove("c1"), Err(AgentError::NotFound { .. })));
    assert!(!base.path().join("containers/c1").exists());
    assert!(!base.path().join("oci/c1").exists());

    // 2. Overlay rootfs, a terminal, pause/resume, resource updates, signals; the
    //    seccomp filter of an init with `noNewPrivileges: false` and few capabilities.
    let disk = base.path().join("disk");
    std::fs::create_dir_all(&disk).expect("disk");
    let args = [
        "sh",
        "-c",
        "echo written > /tmp/f; mkdir /tmp/d 2>/dev/null || echo denied; echo tty; sleep 1000",
    ];
    let mut c2_spec = spec(None, &args, serde_json::json!({}));
    c2_spec["process"]["noNewPrivileges"] = serde_json::json!(false);
    c2_spec["process"]["capabilities"] = limited_caps();
    c2_spec["linux"]["seccomp"] = deny_mkdir();
    let mut req = create_request("c2", c2_spec, stdio(true, true, true, false));
    let mut rootfs = api::Rootfs::new();
    rootfs.image_mount = image.display().to_string();
    rootfs.writable_mount = disk.display().to_string();
    req.rootfs = Some(rootfs).into();
    let pid = cs.create(&req).expect("create c2");
    let bundle_rootfs = base.path().join("containers/c2/rootfs");
    assert!(rootfs::is_mount_point(&bundle_rootfs));
    let mut tty = attach(&cs, "c2", "", "stdout");
    cs.resize_tty("c2", "", 40, 100).expect("resize");
    cs.start("c2").expect("start c2");
    assert!(read_until(&mut tty, "tty").contains("denied\r\ntty\r\n"));
    cs.pause("c2").expect("pause");
    assert!(matches!(
        cs.pause("c2"),
        Err(AgentError::FailedPrecondition(_))
    ));
    cs.resume("c2").expect("resume");
    cs.update("c2", br#"{"pids": {"limit": 50}}"#)
        .expect("update");
    let c2 = cs.get("c2").expect("c2");
    let pids_max =
        std::fs::read_to_string(c2.cgroup.dir("pids").join("pids.max")).expect("pids.max");
    assert_eq!(pids_max.trim(), "50");
    match cs.stats("c2") {
        Ok(st) => assert_eq!((st.pids_limit, st.pids_current > 0), (50, true), "{st:?}"),
        // Stats read cgroup v2 files: on a v1 host they are refused, not faked.
        Err(AgentError::FailedPrecondition(_))
            if !cgroup::is_cgroup2(Path::new(cgroup::CGROUP_ROOT)) => {}
        Err(e) => panic!("stats: {e}"),
    }
    assert!(matches!(
        cs.update("c2", b"[1]"),
        Err(AgentError::InvalidArgument(_))
    ));

    let tpid = cs
        .exec(&exec_request(
            "c2",
            "t1",
            &["sh", "-c", "tty; sleep 1000"],
            stdio(true, false, true, false),
        ))
        .expect("exec with a terminal");
    let mut etty = attach(&cs, "c2", "t1", "stdout");
    assert!(read_until(&mut etty, "/dev/pts/").contains("/dev/pts/"));
    cs.signal("c2", "t1", 9, false).expect("kill t1");
    assert_eq!(cs.wait("c2", "t1").expect("wait t1").exit_status, 137);
    assert_ne!(tpid, pid);
    // The container's init (PID 1 inside) ignores SIGTERM without a handler: all=true
    // SIGKILL ends it.
    cs.signal("c2", "", 9, true).expect("kill all");
    assert_eq!(cs.wait("c2", "").expect("wait c2").exit_status, 137);
    cs.remove("c2").expect("remove c2");
    assert!(!rootfs::is_mount_point(&bundle_rootfs));
    assert_eq!(
        std::fs::read_to_string(disk.join("upper/tmp/f"))
            .ok()
            .as_deref(),
        Some("written\n"),
        "the container wrote to its writable disk: {:?}",
        Command::new("find")
            .arg(&disk)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    );
    let _ = exited_events("c2");

    // 3. An OOM kill is reported on the exit and as an event.
    let limit = serde_json::json!({"memory": {"limit": 16 * 1024 * 1024}});
    let args = [
        "sh",
        "-c",
        "dd if=/dev/zero of=/dev/null bs=64M count=1; exit 0",
    ];
    let req = create_request(
        "c3",
        spec(Some(&image), &args, limit),
        stdio(false, false, false, false),
    );
    cs.create(&req).expect("create c3");
    cs.start("c3").expect("start c3");
    let w = cs.wait("c3", "").expect("wait c3");
    // dd is OOM-killed; sh then exits 0 unless it was the one killed.
    assert!(w.oom_killed, "{w:?}");
    let evs = events().take(Duration::from_millis(200));
    assert!(
        evs.iter()
            .any(|e| e.has_oom() && e.oom().container_id == "c3"),
        "{evs:?}"
    );
    cs.remove("c3").expect("remove c3");
}
