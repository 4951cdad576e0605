use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;

use vmm_api::control::{Reply, Request, Stats};

use super::process::{is_our_vmm, proc_start_time, proc_state, write_pid_file};
use super::*;
use std::sync::atomic::{AtomicU32, Ordering};

fn spec(dir: &Path) -> VmmSpec {
    let config = Config {
        state_dir: dir.to_path_buf(),
        drive_slots: 2,
        kernel_cmdline: " quiet ".into(),
        ..Config::default()
    };
    VmmSpec::for_sandbox(
        &config,
        "sb1",
        VmSize {
            vcpus: 2,
            memory_mib: 512,
        },
    )
    .expect("spec")
}

fn strings(args: &[OsString]) -> Vec<String> {
    args.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

#[test]
fn arguments_for_a_full_spec() {
    let mut s = spec(Path::new("/run/cocoon"));
    s.tap_fd = Some(7);
    s.guest_mac = Some("7e:1a:0e:e2:1f:69".into());
    s.vsock_cid = Some(9);
    assert_eq!(
        strings(&s.args()),
        [
            "--kernel",
            "/usr/local/share/cocoon/vmlinux",
            "--initramfs",
            "/usr/local/share/cocoon/initramfs.cpio",
            "--cmdline",
            "quiet",
            "--vcpus",
            "2",
            "--memory-mib",
            "512",
            "--serial",
            "/run/cocoon/sb1/console.log",
            "--drive",
            "empty",
            "--drive",
            "empty",
            "--vsock",
            "/run/cocoon/sb1/vsock.sock,cid=9",
            "--net",
            "fd=7,mac=7e:1a:0e:e2:1f:69",
            "--control-socket",
            "/run/cocoon/sb1/control.sock",
            "--log",
            "/run/cocoon/sb1/vmm.log",
        ]
    );
}

#[test]
fn arguments_for_a_minimal_spec() {
    let mut s = spec(Path::new("/run/cocoon"));
    s.initramfs = None;
    s.cmdline_extra.clear();
    s.drive_slots = 0;
    let args = strings(&s.args());
    for absent in ["--initramfs", "--cmdline", "--drive", "--net"] {
        assert!(!args.iter().any(|a| a == absent), "{absent}: {args:?}");
    }
    assert!(args
        .windows(2)
        .any(|w| w == ["--vsock", "/run/cocoon/sb1/vsock.sock"]));
}

#[test]
fn bad_specs_are_named() {
    let config = Config::default();
    let size = VmSize {
        vcpus: 1,
        memory_mib: 256,
    };
    for id in ["", "../x", "a/b", ".hidden"] {
        let e = VmmSpec::for_sandbox(&config, id, size).expect_err(id);
        assert!(e.to_string().contains("sandbox id"), "{e}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = spec(dir.path());
    // Not the defaults: this host may have Cocoon installed there.
    s.vmm_binary = dir.path().join("no-vmm");
    s.kernel = dir.path().join("no-vmlinux");
    let e = start(&s).expect_err("no binary").to_string();
    assert!(e.contains("VMM binary") && e.contains("sb1"), "{e}");
    s.vmm_binary = "/bin/sh".into();
    let e = start(&s).expect_err("no kernel").to_string();
    assert!(
        e.contains(&format!("guest kernel {}", s.kernel.display())),
        "{e}"
    );
    s.kernel = "/bin/sh".into();
    s.initramfs = None;
    s.vsock_socket = dir.path().join("x".repeat(100));
    let e = start(&s).expect_err("long").to_string();
    assert!(e.contains("too long for a Unix socket"), "{e}");
}

#[test]
fn slots_allocate_lowest_free_and_say_when_full() {
    let mut slots = Slots::new(3);
    assert_eq!(slots.allocate("img-a").ok(), Some(0));
    assert_eq!(slots.allocate("rw-a").ok(), Some(1));
    assert!(slots.allocate("img-a").is_err(), "duplicate serial");
    assert_eq!(slots.allocate("img-b").ok(), Some(2));
    let e = slots.allocate("rw-b").expect_err("full").to_string();
    assert!(e.contains("all 3 drive slots are in use"), "{e}");
    assert_eq!(slots.release("rw-a"), Some(1));
    assert_eq!(slots.release("rw-a"), None);
    assert_eq!(slots.free(), 1);
    assert_eq!(slots.allocate("rw-b").ok(), Some(1));
    assert_eq!(slots.slot_of("img-b"), Some(2));
    assert_eq!(
        slots.used().collect::<Vec<_>>(),
        [(0, "img-a"), (1, "rw-b"), (2, "img-b")]
    );
    for bad in ["", "a serial with spaces", "x23456789012345678901"] {
        assert!(Slots::new(1).allocate(bad).is_err(), "{bad:?}");
    }
}

fn stats_with(slots: &[(usize, &str)]) -> Stats {
    Stats {
        vcpus: 1,
        memory_mib: 256,
        paused: false,
        vmm_rss_kib: 0,
        guest_touched_kib: 0,
        free_page_reported_kib: 0,
        free_page_reports: 0,
        slots: slots
            .iter()
            .map(|&(slot, serial)| vmm_api::SlotStats {
                slot,
                serial: serial.into(),
                read_only: false,
                capacity_sectors: if serial.is_empty() { 0 } else { 8 },
            })
            .collect(),
    }
}

#[test]
fn slots_come_back_from_stats() {
    let stats = stats_with(&[(0, "img-a"), (1, ""), (2, "rw-a")]);
    let slots = Slots::from_stats(&stats, 4).expect("stats");
    assert_eq!(
        slots.used().collect::<Vec<_>>(),
        [(0, "img-a"), (2, "rw-a")]
    );
    assert_eq!(slots.free(), 2);
    assert_eq!(
        Slots::from_stats(&stats_with(&[]), 4)
            .map(|s| s.free())
            .ok(),
        Some(4)
    );
    let e = Slots::from_stats(&stats_with(&[(9, "x")]), 4).expect_err("beyond");
    assert!(e.to_string().contains("slot 9 is beyond 4 slots"), "{e}");
}

/// A stand-in for cocoon-vmm (Python): records what it was given and where it runs,
/// and answers control requests from a script of exact request and reply lines (see
/// [`fake_script`]), so that it knows nothing of the protocol; it exits after the
/// script's last request. `FAIL` in the kernel path makes it exit 2 at once, like a
/// configuration error.
const FAKE_VMM: &str = r#"#!/usr/bin/env python3
import json, os, socket, sys
args = sys.argv[1:]
def val(flag):
    return args[args.index(flag) + 1]
if "FAIL" in val("--kernel"):
    print("cocoon-vmm: kernel FAIL: not an ELF file", file=sys.stderr)
    sys.exit(2)
with open(sys.argv[0] + ".script") as f:
    script = json.load(f)
ctl = val("--control-socket")
facts = {"args": args, "netns": os.readlink("/proc/self/ns/net"),
         "sid": os.getsid(0) == os.getpid()}
if "--net" in args:
    fd = int(val("--net").split(",")[0].split("=")[1])
    facts["tap"] = os.readlink("/proc/self/fd/%d" % fd)
with open(ctl + ".facts", "w") as f:
    json.dump(facts, f)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(ctl + ".tmp")
s.listen(4)
os.rename(ctl + ".tmp", ctl)
while True:
    c, _ = s.accept()
    line = c.makefile().readline().rstrip("\n")
    c.sendall((script["replies"].get(line, script["refusal"]) + "\n").encode())
    c.close()
    if line == script["exit_after"]:
        os.unlink(ctl)
        sys.exit(0)
"#;

/// What the stand-in answers: the exact lines of the requests the tests send.
#[derive(serde::Serialize)]
struct FakeScript {
    replies: std::collections::BTreeMap<String, String>,
    refusal: String,
    exit_after: String,
}

fn fake_script() -> FakeScript {
    fn line(v: &impl serde::Serialize) -> String {
        serde_json::to_string(v).expect("json")
    }
    let ok = Reply::ok();
    let pairs: [(Request, Reply); 4] = [
        (
            Request::Swap {
                slot: 0,
                path: "/tmp/x.img".into(),
                read_only: true,
                serial: Some("img".into()),
            },
            ok.clone(),
        ),
        (Request::Eject { slot: 0 }, ok.clone()),
        (Request::Stats {}, Reply::stats(stats_with(&[(0, "img")]))),
        (Request::Shutdown {}, ok),
    ];
    FakeScript {
        replies: pairs.iter().map(|(q, r)| (line(q), line(r))).collect(),
        refusal: line(&Reply::error("the stand-in has no reply to this request")),
        exit_after: line(&Request::Shutdown {}),
    }
}

fn fake_spec(dir: &Path) -> VmmSpec {
    let vmm = dir.join("fake-vmm");
    fs::write(&vmm, FAKE_VMM).expect("write fake");
    let script = serde_json::to_string(&fake_script()).expect("script");
    fs::write(dir.join("fake-vmm.script"), script).expect("write script");
    fs::set_permissions(&vmm, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let kernel = dir.join("vmlinux");
    fs::write(&kernel, b"x").expect("kernel");
    let mut s = spec(dir);
    s.vmm_binary = vmm;
    s.kernel = kernel;
    s.initramfs = None;
    s
}

fn python_available() -> bool {
    Command::new("python3")
        .arg("-c")
        .arg("")
        .status()
        .is_ok_and(|s| s.success())
}

/// A test whose subject cannot run here: fails under CI (where everything is installed),
/// otherwise says why it did not run.
fn cannot_run(why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "this test cannot run its subject under CI: {why}"
    );
    eprintln!("not run on this machine: {why}");
}

#[test]
fn start_in_netns_with_tap_control_and_shutdown() {
    if !python_available() {
        cannot_run("python3 (for the stand-in VMM) is missing");
        return;
    }
    static N: AtomicU32 = AtomicU32::new(0);
    let ns = format!(
        "cocoon-rt-vmm-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    struct DelNs(String);
    impl Drop for DelNs {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ip netns add {ns} && ip link add eth0 netns {ns} type veth peer name p0 netns {ns}"
        ))
        .status()
        .is_ok_and(|s| s.success());
    let _del = DelNs(ns.clone());
    assert!(ok, "netns setup");
    let netns = PathBuf::from(format!("/var/run/netns/{ns}"));
    let pod = crate::podnet::setup(&netns).expect("podnet").expect("eth0");

    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = fake_spec(dir.path());
    let tap = pod.tap_fd.as_ref().expect("tap");
    s.tap_fd = Some(tap.as_raw_fd());
    s.guest_mac = Some(pod.mac.clone());
    s.netns = Some(netns.clone());
    let mut vmm = start(&s).expect("start");
    assert!(vmm.is_alive());
    drop(pod); // the VMM holds the TAP now

    let facts: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(dir.path().join("sb1/control.sock.facts")).expect("facts"),
    )
    .expect("json");
    let ns_ino = fs::metadata(&netns).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let want = format!("net:[{}]", ns_ino.expect("ino"));
    assert_eq!(facts["netns"], want);
    assert_eq!(facts["tap"], "/dev/net/tun");
    assert_eq!(facts["sid"], true);

    // Control requests.
    vmm.swap(0, Path::new("/tmp/x.img"), true, "img")
        .expect("swap");
    vmm.eject(0).expect("eject");
    let stats = vmm.stats().expect("stats");
    assert_eq!(
        Slots::from_stats(&stats, 2).expect("slots").slot_of("img"),
        Some(0)
    );
    let e = vmm.resume().expect_err("refused").to_string();
    assert!(e.contains("has no reply") && e.contains("sb1"), "{e}");

    // A second start for the same sandbox is refused while this one runs.
    let e = start(&s).expect_err("twice").to_string();
    assert!(e.contains("already running"), "{e}");

    // A new shim finds it through the pid file.
    let found = VmmProcess::from_pid_file("sb1", &s.pid_file, &s.control_socket)
        .expect("pid file")
        .expect("found");
    assert_eq!(found.pid(), vmm.pid());

    vmm.shutdown(Duration::from_secs(5)).expect("shutdown");
    assert!(!vmm.is_alive());
    assert!(!s.pid_file.exists());
    // The TAP went with the VMM.
    let links = Command::new("ip")
        .args(["-n", &ns, "link", "show"])
        .output()
        .expect("ip");
    assert!(!String::from_utf8_lossy(&links.stdout).contains(crate::podnet::TAP_NAME));
    crate::podnet::teardown(&netns).expect("teardown");
}

#[test]
fn failed_start_reports_the_log_and_leaves_no_pid_file() {
    if !python_available() {
        cannot_run("python3 (for the stand-in VMM) is missing");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = fake_spec(dir.path());
    let bad = dir.path().join("FAIL-vmlinux");
    fs::write(&bad, b"x").expect("kernel");
    s.kernel = bad;
    let e = start(&s).expect_err("fails").to_string();
    assert!(
        e.contains("exit status: 2") && e.contains("not an ELF file"),
        "{e}"
    );
    assert!(!s.pid_file.exists());
}

#[test]
fn kill_by_pid_file_from_a_new_process_view() {
    if !python_available() {
        cannot_run("python3 (for the stand-in VMM) is missing");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let s = fake_spec(dir.path());
    let mut vmm = start(&s).expect("start");
    // As a restarted shim: no Child handle, only the pid file.
    let mut found = VmmProcess::from_pid_file("sb1", &s.pid_file, &s.control_socket)
        .expect("read")
        .expect("alive");
    assert!(found.child.is_none() && found.is_alive());
    // The spawning handle still reaps it (pidfd wait sees the exit either way).
    let reaper = std::thread::spawn(move || {
        let _ = vmm.wait_exit(Duration::from_secs(10));
        vmm
    });
    found.kill().expect("kill");
    assert!(!found.is_alive());
    assert!(!s.pid_file.exists());
    let mut vmm = reaper.join().expect("join");
    assert!(!vmm.is_alive());
    found.kill().expect("kill again is fine");
}

#[test]
fn pid_files_never_name_a_stranger() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("vmm.pid");
    let ctl = dir.path().join("control.sock");
    // A live process that is not a VMM of this sandbox (no --control-socket <ctl>).
    let mut stranger = Command::new("sleep").arg("30").spawn().expect("sleep");
    let pid = stranger.id();
    let start_time = proc_start_time(pid).expect("start time");
    write_pid_file(&pid_file, pid, start_time).expect("write");
    let found = VmmProcess::from_pid_file("sb1", &pid_file, &ctl).expect("read");
    // Same command line but a different start time: a reused pid.
    let mut lookalike = Command::new("sh")
        .args(["-c", "sleep 30; :", "sh", "--control-socket"])
        .arg(&ctl)
        .spawn()
        .expect("sh");
    let lpid = lookalike.id();
    let lstart = proc_start_time(lpid).expect("start");
    std::thread::sleep(Duration::from_millis(50));
    assert!(is_our_vmm(lpid, lstart, &ctl), "the real one matches");
    write_pid_file(&pid_file, lpid, lstart + 1).expect("write");
    let reused = VmmProcess::from_pid_file("sb1", &pid_file, &ctl).expect("read");
    // A VmmProcess with a stale identity refuses to kill.
    let mut stale = VmmProcess {
        sandbox_id: "sb1".into(),
        pid: lpid,
        start_time: lstart + 1,
        control_socket: ctl.clone(),
        pid_file: pid_file.clone(),
        child: None,
    };
    stale.kill().expect("kill is a no-op");
    let lookalike_alive = lookalike.try_wait().expect("try_wait").is_none();
    let stranger_alive = stranger.try_wait().expect("try_wait").is_none();
    let _ = stranger.kill();
    let _ = lookalike.kill();
    let _ = stranger.wait();
    let _ = lookalike.wait();
    assert!(found.is_none(), "a stranger was taken for the VMM");
    assert!(reused.is_none(), "a reused pid was taken for the VMM");
    assert!(lookalike_alive && stranger_alive, "a stranger was killed");
    // Garbage and missing pid files are "no VMM".
    fs::write(&pid_file, "garbage").expect("write");
    assert!(VmmProcess::from_pid_file("sb1", &pid_file, &ctl)
        .expect("read")
        .is_none());
    fs::remove_file(&pid_file).expect("rm");
    assert!(VmmProcess::from_pid_file("sb1", &pid_file, &ctl)
        .expect("read")
        .is_none());
}

#[test]
fn proc_stat_parsing() {
    let me = std::process::id();
    assert!(proc_state(me).is_some());
    assert!(proc_start_time(me).is_some());
    assert!(proc_start_time(u32::MAX).is_none());
}
