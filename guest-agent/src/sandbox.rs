//! SetupSandbox and SetSysctls: the pod's shared namespaces and files.
//!
//! The pod gets its own network, IPC and UTS namespaces (and PID namespace with
//! `share_pid`), held by a pause process: the agent re-executed as
//! `cocoon-agent sandbox-pause`, started through the reaper with `unshare` between fork
//! and exec, so the whole process is born in the new namespaces. With `share_pid` it
//! also unshares the PID namespace and forks the namespace's init, which reaps what the
//! pod's processes orphan. The namespaces are bind-mounted onto files under
//! `SANDBOX_DIR/ns/` (which keeps them alive and gives the containers' OCI specs
//! paths to join).
//!
//! The agent's own network namespace is not the pod's: a container cannot reach a
//! listener of the agent's.
//!
//! Namespace work in the agent happens on short-lived threads that `setns` and then
//! exit ([`in_namespaces`]): net, IPC and UTS may be entered by one thread of a
//! multi-threaded process; the mount namespace never is.

use crate::error::{AgentError, Result};
use crate::files::write_atomic;
use crate::paths::SANDBOX_DIR;
use cocoon_agent_protocol::api;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::statfs::{fstatfs, statfs, NSFS_MAGIC};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// argv[1] that makes the agent the pause process.
pub const PAUSE_ARG: &str = "sandbox-pause";
const ENV_HOSTNAME: &str = "COCOON_PAUSE_HOSTNAME";
const ENV_SHARE_PID: &str = "COCOON_PAUSE_SHARE_PID";
/// The pause's one line on stdout once its namespaces are ready, followed by the pid
/// (in the agent's PID namespace) of the process whose PID namespace is the pod's.
const READY: &str = "cocoon-pause ready";
/// How long SetupSandbox waits for the pause process to report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const HOST_NAME_MAX: usize = 64;
const MAX_SYSCTL_VALUE: usize = 4096;

/// Serializes SetupSandbox calls (the second one fails).
static SETUP: Mutex<()> = Mutex::new(());

/// Runs `f` on a fresh thread that first joined the namespaces given; the thread ends
/// with `f`, so no thread of the agent stays in a pod namespace.
pub(crate) fn in_namespaces<T: Send>(
    nss: &[(&File, CloneFlags)],
    f: impl FnOnce() -> Result<T> + Send,
) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            for (ns, kind) in nss {
                setns(ns, *kind).map_err(|e| {
                    AgentError::io(format!("entering the pod's {kind:?} namespace"))(e.into())
                })?;
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(AgentError::Failed {
                context: "namespace worker thread".into(),
                message: "panicked".into(),
            })
        })
    })
}

fn is_nsfs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == NSFS_MAGIC)
}

/// Opens the pod namespace `kind` ("net", "ipc", "uts", "pid") under `root/ns`.
pub(crate) fn open_pod_ns(root: &Path, kind: &str) -> Result<File> {
    let path = root.join("ns").join(kind);
    let not_set_up = || {
        AgentError::FailedPrecondition(format!(
            "the pod's {kind} namespace is not set up (SetupSandbox first)"
        ))
    };
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_set_up()),
        Err(e) => return Err(AgentError::io(format!("opening {}", path.display()))(e)),
    };
    match fstatfs(&f) {
        Ok(s) if s.filesystem_type() == NSFS_MAGIC => Ok(f),
        _ => Err(not_set_up()),
    }
}

fn validate_hostname(h: &str) -> Result<()> {
    if h.len() > HOST_NAME_MAX {
        return Err(AgentError::InvalidArgument(format!(
            "hostname {h:?} is longer than {HOST_NAME_MAX} bytes"
        )));
    }
    if h.chars()
        .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err(AgentError::InvalidArgument(format!(
            "hostname {h:?} has a slash, whitespace or control characters"
        )));
    }
    Ok(())
}

/// One word of a resolv.conf line: no whitespace, nothing that would end the line.
fn resolv_word(what: &str, w: &str) -> Result<()> {
    if w.is_empty() || w.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(AgentError::InvalidArgument(format!(
            "{what} {w:?} is empty or has whitespace or control characters"
        )));
    }
    Ok(())
}

fn render_resolv_conf(
    servers: &[String],
    searches: &[String],
    options: &[String],
) -> Result<String> {
    let mut out = String::new();
    for s in servers {
        // An IPv6 link-local server may carry a zone ("fe80::1%eth0").
        let addr = s.split_once('%').map_or(s.as_str(), |(a, _)| a);
        if addr.parse::<IpAddr>().is_err() {
            return Err(AgentError::InvalidArgument(format!(
                "DNS server {s:?} is not an IP address"
            )));
        }
        resolv_word("DNS server", s)?;
        out.push_str(&format!("nameserver {s}\n"));
    }
    for (key, words, what) in [
        ("search", searches, "DNS search domain"),
        ("options", options, "DNS option"),
    ] {
        for w in words {
            resolv_word(what, w)?;
        }
        if !words.is_empty() {
            out.push_str(&format!("{key} {}\n", words.join(" ")));
        }
    }
    Ok(out)
}

fn render_hosts(lines: &[String]) -> Result<String> {
    let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for l in lines {
        if l.chars().any(|c| c == '\n' || c == '\r' || c == '\0') {
            return Err(AgentError::InvalidArgument(format!(
                "hosts line {l:?} has a line break or NUL"
            )));
        }
        out.push_str(l);
        out.push('\n');
    }
    Ok(out)
}

/// Checks a sysctl key and returns its path under /proc/sys. Only keys of the namespaces
/// the pod owns are accepted: net.*, the IPC ones (kernel.shm*, kernel.msg*, kernel.sem,
/// fs.mqueue.*). kernel.hostname and kernel.domainname belong to the UTS namespace and
/// are set through the hostname, not here.
fn sysctl_path(key: &str) -> Result<PathBuf> {
    let bad = |why: &str| AgentError::InvalidArgument(format!("sysctl {key:?}: {why}"));
    if key.is_empty() || key.len() > 256 {
        return Err(bad("empty or too long"));
    }
    if key.contains("..") || key.contains('/') {
        return Err(bad("has \"..\" or \"/\""));
    }
    if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("has whitespace or control characters"));
    }
    if key.starts_with('.') || key.ends_with('.') {
        return Err(bad("has an empty component"));
    }
    let namespaced = key.starts_with("net.")
        || key.starts_with("kernel.shm")
        || key.starts_with("kernel.msg")
        || key == "kernel.sem"
        || key.starts_with("fs.mqueue.");
    if !namespaced {
        return Err(bad(
            "is not a namespaced sysctl (net.*, kernel.shm*, kernel.msg*, kernel.sem, fs.mqueue.*)",
        ));
    }
    Ok(Path::new("/proc/sys").join(key.replace('.', "/")))
}

fn validate_sysctls(sysctls: &HashMap<String, String>) -> Result<Vec<(String, PathBuf, String)>> {
    let mut out = Vec::with_capacity(sysctls.len());
    for (key, value) in sysctls {
        let path = sysctl_path(key)?;
        if value.len() > MAX_SYSCTL_VALUE || value.contains('\0') {
            return Err(AgentError::InvalidArgument(format!(
                "sysctl {key:?}: value too long or has a NUL byte"
            )));
        }
        out.push((key.clone(), path, value.clone()));
    }
    // Deterministic order (a map has none) for logs and for the error of the first failure.
    out.sort();
    Ok(out)
}

fn apply_sysctls(root: &Path, sysctls: &[(String, PathBuf, String)]) -> Result<()> {
    if sysctls.is_empty() {
        return Ok(());
    }
    let net = open_pod_ns(root, "net")?;
    let ipc = open_pod_ns(root, "ipc")?;
    in_namespaces(
        &[
            (&net, CloneFlags::CLONE_NEWNET),
            (&ipc, CloneFlags::CLONE_NEWIPC),
        ],
        || {
            for (key, path, value) in sysctls {
                let written = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .and_then(|mut f| f.write_all(value.as_bytes()));
                match written {
                    Ok(()) => tracing::info!(%key, %value, "sysctl set in the pod"),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(AgentError::not_found("sysctl", key.clone()))
                    }
                    Err(e) => {
                        return Err(AgentError::io(format!("setting sysctl {key} to {value:?}"))(e))
                    }
                }
            }
            Ok(())
        },
    )
}

/// SetSysctls: namespaced sysctls in the pod's namespaces. All keys are checked before
/// any is written.
pub fn set_sysctls(sysctls: &HashMap<String, String>) -> Result<()> {
    let checked = validate_sysctls(sysctls)?;
    apply_sysctls(Path::new(SANDBOX_DIR), &checked)
}

/// The running pause process.
#[derive(Debug, Clone, Copy)]
struct Pause {
    /// The process the agent started (holds net, IPC, UTS).
    pid: i32,
    /// The pod PID namespace's init when `share_pid`, else `pid`.
    holder: i32,
}

/// Undoes a half-done setup when dropped armed.
struct Undo {
    mounts: Vec<PathBuf>,
    files: Vec<PathBuf>,
    pause: Option<Pause>,
}

impl Drop for Undo {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = umount2(m, MntFlags::MNT_DETACH);
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        if let Some(p) = self.pause {
            // Its exit goes to the reaper's watcher (and the holder's to the reaper).
            let _ = kill(Pid::from_raw(p.holder), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
        }
    }
}

/// SetupSandbox.
pub fn setup(req: &api::SetupSandboxRequest) -> Result<api::SetupSandboxResponse> {
    let mut pause = Command::new("/proc/self/exe");
    // Its complaints, if any, go to the console like the agent's.
    pause
        .arg0("cocoon-agent")
        .arg(PAUSE_ARG)
        .env_clear()
        .stderr(Stdio::inherit());
    setup_in(Path::new(SANDBOX_DIR), pause, req).map(|(resp, _)| resp)
}

/// Reads the pause's stdout until its ready line; returns the holder pid.
fn wait_ready(stdout: std::process::ChildStdout) -> Result<i32> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        // The agent prints nothing else; a test harness prints around it, on the line too.
        let result = (0..16)
            .map_while(|_| lines.next().and_then(|l| l.ok()))
            .find_map(|l| {
                let at = l.find(READY)?;
                l[at + READY.len()..].trim().parse::<i32>().ok()
            });
        let _ = tx.send(result);
    });
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(Some(pid)) if pid > 0 => Ok(pid),
        Ok(_) => Err(AgentError::Failed {
            context: "starting the sandbox pause process".into(),
            message: "it exited without reporting ready (see the console)".into(),
        }),
        Err(_) => Err(AgentError::Timeout(format!(
            "after {} s waiting for the sandbox pause process",
            READY_TIMEOUT.as_secs()
        ))),
    }
}

fn setup_in(
    root: &Path,
    mut pause: Command,
    req: &api::SetupSandboxRequest,
) -> Result<(api::SetupSandboxResponse, Pause)> {
    validate_hostname(&req.hostname)?;
    let resolv = render_resolv_conf(&req.dns_servers, &req.dns_searches, &req.dns_options)?;
    let hosts = render_hosts(&req.hosts)?;
    let sysctls = validate_sysctls(&req.sysctls)?;

    let _one_at_a_time = SETUP.lock().unwrap_or_else(|p| p.into_inner());
    let ns_dir = root.join("ns");
    if is_nsfs(&ns_dir.join("net")) {
        return Err(AgentError::FailedPrecondition(
            "the sandbox is already set up".into(),
        ));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&ns_dir)
        .map_err(AgentError::io(format!("creating {}", ns_dir.display())))?;
    let mut undo = Undo {
        mounts: Vec::new(),
        files: Vec::new(),
        pause: None,
    };
    let hostname_file = root.join("hostname");
    let resolv_file = root.join("resolv.conf");
    let hosts_file = root.join("hosts");
    for (path, text) in [
        (&hostname_file, format!("{}\n", req.hostname)),
        (&resolv_file, resolv),
        (&hosts_file, hosts),
    ] {
        write_atomic(path, text.as_bytes(), 0o644, 0, 0)?;
        undo.files.push(path.clone());
    }

    // The PID namespace (share_pid) is unshared by the pause itself: unshare(CLONE_NEWPID)
    // moves only the caller's future children, the first of which becomes its init.
    let flags = CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
    pause
        .env(ENV_HOSTNAME, &req.hostname)
        .env(ENV_SHARE_PID, if req.share_pid { "1" } else { "0" })
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // unshare system call (async-signal-safe), touching no memory shared with the agent.
    unsafe {
        pause.pre_exec(move || unshare(flags).map_err(std::io::Error::from));
    }
    let mut child = crate::reaper::reaper()
        .spawn(&mut pause, |info| {
            tracing::error!(
                pid = info.pid,
                status = info.status,
                "the sandbox pause process exited: the pod's namespaces are orphaned"
            )
        })
        .map_err(AgentError::io("starting the sandbox pause process"))?;
    let pid = child.id() as i32;
    undo.pause = Some(Pause { pid, holder: pid });
    let stdout = child.stdout.take().ok_or_else(|| AgentError::Failed {
        context: "starting the sandbox pause process".into(),
        message: "no stdout pipe".into(),
    })?;
    let holder = wait_ready(stdout)?;
    let pause_info = Pause { pid, holder };
    undo.pause = Some(pause_info);

    let mut kinds = vec![("net", pid), ("ipc", pid), ("uts", pid)];
    if req.share_pid {
        kinds.push(("pid", holder));
    }
    for (kind, source_pid) in &kinds {
        let source = PathBuf::from(format!("/proc/{source_pid}/ns/{kind}"));
        let target = ns_dir.join(kind);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o444)
            .open(&target)
            .map_err(AgentError::io(format!("creating {}", target.display())))?;
        undo.files.push(target.clone());
        mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            AgentError::io(format!(
                "bind-mounting {} on {}",
                source.display(),
                target.display()
            ))(e.into())
        })?;
        undo.mounts.push(target);
    }

    let net = open_pod_ns(root, "net")?;
    crate::network::bring_lo_up(&net)?;
    apply_sysctls(root, &sysctls)?;

    // Done: keep everything.
    undo.mounts.clear();
    undo.files.clear();
    undo.pause = None;
    tracing::info!(
        hostname = %req.hostname,
        share_pid = req.share_pid,
        pause_pid = pid,
        "sandbox set up"
    );
    let path = |p: &Path| p.display().to_string();
    Ok((
        api::SetupSandboxResponse {
            net_ns: path(&ns_dir.join("net")),
            ipc_ns: path(&ns_dir.join("ipc")),
            uts_ns: path(&ns_dir.join("uts")),
            pid_ns: if req.share_pid {
                path(&ns_dir.join("pid"))
            } else {
                String::new()
            },
            hostname_file: path(&hostname_file),
            resolv_conf_file: path(&resolv_file),
            hosts_file: path(&hosts_file),
            ..Default::default()
        },
        pause_info,
    ))
}

fn say_ready(holder: i32) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{READY} {holder}")?;
    out.flush()
}

/// The pod PID namespace's init: reaps whatever the pod orphans, forever. Only
/// async-signal-safe calls (it may run in the child of a fork from a threaded process).
fn pid_ns_init(chld: &SigSet) -> ! {
    loop {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        let _ = chld.wait();
    }
}

fn pause(
    hostname: Option<std::ffi::OsString>,
    share_pid: bool,
) -> std::result::Result<std::convert::Infallible, String> {
    if let Some(h) = hostname.filter(|h| !h.is_empty()) {
        nix::unistd::sethostname(&h).map_err(|e| format!("sethostname {h:?}: {e}"))?;
    }
    if !share_pid {
        say_ready(std::process::id() as i32).map_err(|e| format!("reporting ready: {e}"))?;
        loop {
            nix::unistd::pause();
        }
    }
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    chld.thread_block()
        .map_err(|e| format!("blocking SIGCHLD: {e}"))?;
    unshare(CloneFlags::CLONE_NEWPID).map_err(|e| format!("unshare(CLONE_NEWPID): {e}"))?;
    // SAFETY: the child runs only pid_ns_init, which makes async-signal-safe calls, so
    // forking is sound even if this process had other threads.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            // Dies with the pause (a failed setup kills only the process it started);
            // the kernel's SIGKILL reaches a PID namespace's init from the parent's side.
            let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
            pid_ns_init(&chld)
        }
        ForkResult::Parent { child } => {
            say_ready(child.as_raw()).map_err(|e| format!("reporting ready: {e}"))?;
            loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => {
                        return Err(format!("the pod's PID namespace init (pid {child}) exited"))
                    }
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(format!("waiting for pid {child}: {e}")),
                }
            }
        }
    }
}

/// `cocoon-agent sandbox-pause`: holds the pod's namespaces until the VM ends. Returns
/// only on failure.
pub fn pause_main() -> ExitCode {
    let hostname = std::env::var_os(ENV_HOSTNAME);
    let share_pid = std::env::var_os(ENV_SHARE_PID).is_some_and(|v| v == "1");
    match pause(hostname, share_pid) {
        Ok(never) => match never {},
        Err(msg) => {
            eprintln!("cocoon-agent {PAUSE_ARG}: {msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// Runs `f` on a thread that joined the network namespace `ns` (for `ip` checks).
    pub fn in_netns<T: Send>(ns: &File, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(ns, CloneFlags::CLONE_NEWNET).expect("setns net");
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// A new, empty network namespace (gone once the file is closed).
    pub fn fresh_netns() -> File {
        std::thread::spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET).expect("unshare net");
            File::open("/proc/thread-self/ns/net").expect("open netns")
        })
        .join()
        .expect("netns thread")
    }

    /// Runs `f` on a thread with its own mount namespace (private propagation), so that
    /// its mounts neither show on the host nor outlive it and what it started.
    pub fn in_private_mount_ns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                unshare(CloneFlags::CLONE_NEWNS).expect("unshare mnt");
                mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                    None::<&str>,
                )
                .expect("make / private");
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::in_private_mount_ns;
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const HELPER_ENV: &str = "COCOON_TEST_PAUSE_HELPER";

    /// Not a test of its own: the pause process of the tests below is this test binary
    /// running only this function, with the helper variable set.
    #[test]
    fn pause_helper() {
        if std::env::var_os(HELPER_ENV).is_some() {
            let _ = pause_main();
            std::process::exit(1);
        }
    }

    fn helper_command() -> Command {
        let mut c = Command::new(std::env::current_exe().expect("current_exe"));
        c.args([
            "sandbox::tests::pause_helper",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env_clear()
        .env(HELPER_ENV, "1")
        // Not the test's stderr: a pause left behind must not hold a caller's pipe open.
        .stderr(Stdio::null());
        c
    }

    /// Kills the pause processes of a test and waits for the one it started.
    struct Reap(Pause);
    impl Drop for Reap {
        fn drop(&mut self) {
            // The pause reaps the holder and exits; killing both at once could leave the
            // holder's zombie to the host's init.
            let _ = kill(Pid::from_raw(self.0.holder), Signal::SIGKILL);
            if self.0.holder == self.0.pid {
                let _ = kill(Pid::from_raw(self.0.pid), Signal::SIGKILL);
            }
            let _ = waitpid(Pid::from_raw(self.0.pid), None);
        }
    }

    /// Reaps the pause processes a failed setup killed (the tests run no reaper): zombie
    /// children of this process that run this test binary.
    fn reap_killed_pauses() {
        let me = std::process::id().to_string();
        let exe = std::fs::read_to_string("/proc/self/comm").unwrap_or_default();
        for _ in 0..100 {
            let mut found = false;
            for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                    continue;
                };
                // pid (comm) state ppid ...
                let Some((comm, rest)) =
                    stat.split_once(" (").and_then(|(_, r)| r.rsplit_once(") "))
                else {
                    continue;
                };
                let mut fields = rest.split(' ');
                let (state, ppid) = (fields.next(), fields.next());
                if ppid == Some(me.as_str()) && comm == exe.trim() {
                    found = true;
                    if state == Some("Z") {
                        let _ = waitpid(Pid::from_raw(pid), None);
                    }
                }
            }
            if !found {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn resolv_conf_and_hosts_rendering() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let r = render_resolv_conf(
            &s(&["10.96.0.10", "fd00::a", "fe80::1%eth0"]),
            &s(&["ns.svc.cluster.local", "svc.cluster.local"]),
            &s(&["ndots:5", "edns0"]),
        )
        .expect("resolv");
        assert_eq!(
            r,
            "nameserver 10.96.0.10\nnameserver fd00::a\nnameserver fe80::1%eth0\n\
             search ns.svc.cluster.local svc.cluster.local\noptions ndots:5 edns0\n"
        );
        assert_eq!(render_resolv_conf(&[], &[], &[]).ok(), Some(String::new()));
        assert!(render_resolv_conf(&s(&["dns.example"]), &[], &[]).is_err());
        assert!(render_resolv_conf(&[], &s(&["a b"]), &[]).is_err());
        assert!(render_resolv_conf(&[], &[], &s(&["x\nnameserver 1.2.3.4"])).is_err());
        assert!(render_resolv_conf(&[], &[], &s(&[""])).is_err());

        let h = render_hosts(&s(&["10.1.0.5\tweb-0.web", "10.1.0.6 db"])).expect("hosts");
        assert_eq!(
            h,
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
             10.1.0.5\tweb-0.web\n10.1.0.6 db\n"
        );
        assert!(render_hosts(&s(&["1.2.3.4 a\n5.6.7.8 b"])).is_err());
    }

    #[test]
    fn hostname_and_sysctl_validation() {
        assert!(validate_hostname("web-0").is_ok());
        assert!(validate_hostname("").is_ok());
        assert!(validate_hostname(&"a".repeat(65)).is_err());
        assert!(validate_hostname("a b").is_err());
        assert!(validate_hostname("a/b").is_err());

        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").ok(),
            Some(PathBuf::from("/proc/sys/net/ipv4/ip_forward"))
        );
        for ok in [
            "net.core.somaxconn",
            "kernel.shmmax",
            "kernel.shm_rmid_forced",
            "kernel.msgmnb",
            "kernel.sem",
            "fs.mqueue.msg_max",
        ] {
            assert!(sysctl_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "kernel.hostname",
            "kernel.domainname",
            "vm.overcommit_memory",
            "kernel.semx",
            "net..ipv4",
            "net/ipv4/ip_forward",
            "net.ipv4.",
            ".net.ipv4",
            "",
            "net.ipv4.ip forward",
            "fs.file-max",
        ] {
            let err = sysctl_path(bad).expect_err(bad);
            assert!(matches!(err, AgentError::InvalidArgument(_)), "{err}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        let mut m = HashMap::new();
        m.insert("net.ipv4.ip_forward".to_string(), "1".to_string());
        m.insert("vm.swappiness".to_string(), "1".to_string());
        let err = validate_sysctls(&m).expect_err("not namespaced");
        assert!(err.to_string().contains("vm.swappiness"), "{err}");
    }

    #[test]
    fn sysctls_need_the_sandbox() {
        let root = tempfile::tempdir().expect("tempdir");
        let checked = vec![(
            "net.ipv4.ip_forward".to_string(),
            PathBuf::from("/proc/sys/net/ipv4/ip_forward"),
            "1".to_string(),
        )];
        let err = apply_sysctls(root.path(), &checked).expect_err("no sandbox");
        assert!(matches!(err, AgentError::FailedPrecondition(_)), "{err}");
        // A plain file where the namespace should be is not taken for one.
        std::fs::create_dir(root.path().join("ns")).expect("mkdir");
        std::fs::write(root.path().join("ns/net"), "").expect("write");
        let err = open_pod_ns(root.path(), "net").expect_err("plain file");
        assert!(matches!(err, AgentError::FailedPrecondition(_)), "{err}");
    }

    fn read_sysctl_in(net: &File, ipc: &File, path: &str) -> String {
        in_namespaces(
            &[
                (net, CloneFlags::CLONE_NEWNET),
                (ipc, CloneFlags::CLONE_NEWIPC),
            ],
            || std::fs::read_to_string(path).map_err(AgentError::io(path)),
        )
        .expect("read sysctl")
        .trim()
        .to_string()
    }

    fn ino(path: impl AsRef<Path>) -> u64 {
        std::fs::metadata(path).expect("stat").ino()
    }

    #[test]
    fn sets_up_a_sandbox_with_shared_pid_namespace() {
        in_private_mount_ns(|| {
            let root = tempfile::tempdir().expect("tempdir");
            let req = api::SetupSandboxRequest {
                hostname: "web-0".into(),
                dns_servers: vec!["10.96.0.10".into()],
                dns_searches: vec!["default.svc.cluster.local".into()],
                dns_options: vec!["ndots:5".into()],
                hosts: vec!["10.1.0.9 other".into()],
                share_pid: true,
                sysctls: [
                    ("net.ipv4.ip_unprivileged_port_start", "80"),
                    ("kernel.shm_rmid_forced", "1"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
                ..Default::default()
            };
            let (resp, pause) = setup_in(root.path(), helper_command(), &req).expect("setup");
            let _reap = Reap(pause);
            let r = root.path();
            assert_eq!(resp.net_ns, r.join("ns/net").display().to_string());
            assert_eq!(resp.pid_ns, r.join("ns/pid").display().to_string());
            assert_eq!(resp.hosts_file, r.join("hosts").display().to_string());
            for kind in ["net", "ipc", "uts", "pid"] {
                assert!(is_nsfs(&r.join("ns").join(kind)), "{kind}");
            }
            assert_ne!(pause.holder, pause.pid);

            // The namespaces are the pause's, and not the agent's (this thread's).
            assert_eq!(
                ino(&resp.net_ns),
                ino(format!("/proc/{}/ns/net", pause.pid))
            );
            assert_ne!(ino(&resp.net_ns), ino("/proc/thread-self/ns/net"));
            assert_ne!(ino(&resp.ipc_ns), ino("/proc/thread-self/ns/ipc"));
            assert_eq!(
                ino(&resp.pid_ns),
                ino(format!("/proc/{}/ns/pid", pause.holder))
            );
            assert_ne!(ino(&resp.pid_ns), ino("/proc/thread-self/ns/pid"));
            // The holder is init of the pod's PID namespace.
            let status =
                std::fs::read_to_string(format!("/proc/{}/status", pause.holder)).expect("status");
            let nspid = status
                .lines()
                .find(|l| l.starts_with("NSpid:"))
                .expect("NSpid");
            assert!(nspid.trim_end().ends_with("\t1"), "{nspid}");

            // Hostname in the pod's UTS namespace.
            let uts = File::open(&resp.uts_ns).expect("uts");
            let name = in_namespaces(&[(&uts, CloneFlags::CLONE_NEWUTS)], || {
                nix::unistd::gethostname().map_err(|e| AgentError::io("gethostname")(e.into()))
            })
            .expect("hostname");
            assert_eq!(name, "web-0");

            // Files.
            assert_eq!(
                std::fs::read_to_string(&resp.hostname_file).expect("read"),
                "web-0\n"
            );
            assert_eq!(
                std::fs::read_to_string(&resp.resolv_conf_file).expect("read"),
                "nameserver 10.96.0.10\nsearch default.svc.cluster.local\noptions ndots:5\n"
            );
            let hosts = std::fs::read_to_string(&resp.hosts_file).expect("read");
            assert!(hosts.starts_with("127.0.0.1\tlocalhost\n"), "{hosts}");
            assert!(hosts.ends_with("10.1.0.9 other\n"), "{hosts}");

            // lo is up, sysctls are set in the pod's namespaces only.
            let net = File::open(&resp.net_ns).expect("net");
            let ipc = File::open(&resp.ipc_ns).expect("ipc");
            let lo = test_support::in_netns(&net, || {
                Command::new("ip")
                    .args(["-o", "link", "show", "lo"])
                    .output()
            })
            .expect("ip");
            assert!(
                String::from_utf8_lossy(&lo.stdout).contains(",UP"),
                "{lo:?}"
            );
            assert_eq!(
                read_sysctl_in(&net, &ipc, "/proc/sys/net/ipv4/ip_unprivileged_port_start"),
                "80"
            );
            assert_eq!(
                read_sysctl_in(&net, &ipc, "/proc/sys/kernel/shm_rmid_forced"),
                "1"
            );

            // SetSysctls later: a missing key names itself.
            let more: Vec<_> = [("net.ipv4.tcp_syncookies", "0")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), sysctl_path(k).expect("path"), v.to_string()))
                .collect();
            apply_sysctls(r, &more).expect("set");
            assert_eq!(
                read_sysctl_in(&net, &ipc, "/proc/sys/net/ipv4/tcp_syncookies"),
                "0"
            );
            let missing = vec![(
                "net.ipv4.no_such_key".to_string(),
                sysctl_path("net.ipv4.no_such_key").expect("path"),
                "1".to_string(),
            )];
            let err = apply_sysctls(r, &missing).expect_err("missing");
            assert!(matches!(err, AgentError::NotFound { .. }), "{err}");
            assert!(err.to_string().contains("net.ipv4.no_such_key"), "{err}");

            // A second SetupSandbox is refused.
            let err = setup_in(r, helper_command(), &req).expect_err("twice");
            assert!(matches!(err, AgentError::FailedPrecondition(_)), "{err}");
        });
    }

    #[test]
    fn sets_up_a_sandbox_without_pid_sharing_and_cleans_up_a_failure() {
        in_private_mount_ns(|| {
            let root = tempfile::tempdir().expect("tempdir");
            let req = api::SetupSandboxRequest {
                hostname: "solo".into(),
                ..Default::default()
            };
            let (resp, pause) = setup_in(root.path(), helper_command(), &req).expect("setup");
            let _reap = Reap(pause);
            assert_eq!(resp.pid_ns, "");
            assert_eq!(pause.holder, pause.pid);
            assert!(!root.path().join("ns/pid").exists());
            assert_eq!(
                ino(&resp.net_ns),
                ino(format!("/proc/{}/ns/net", pause.pid))
            );
            assert_eq!(
                std::fs::read_to_string(&resp.resolv_conf_file).expect("read"),
                ""
            );

            // A failing setup (a sysctl the pod's kernel lacks) leaves nothing behind.
            let root2 = tempfile::tempdir().expect("tempdir");
            let bad = api::SetupSandboxRequest {
                hostname: "x".into(),
                sysctls: [("net.ipv4.no_such_key".to_string(), "1".to_string())]
                    .into_iter()
                    .collect(),
                ..Default::default()
            };
            let err = setup_in(root2.path(), helper_command(), &bad).expect_err("bad sysctl");
            assert!(matches!(err, AgentError::NotFound { .. }), "{err}");
            let left: Vec<_> = std::fs::read_dir(root2.path().join("ns"))
                .expect("readdir")
                .collect();
            assert!(left.is_empty(), "{left:?}");
            assert!(!root2.path().join("hosts").exists());

            // A pause that exits without reporting ready: a clear error, nothing left.
            let mut quits = Command::new(std::env::current_exe().expect("current_exe"));
            quits.arg("--list").stderr(Stdio::null());
            let err = setup_in(root2.path(), quits, &bad).expect_err("no ready line");
            assert!(err.to_string().contains("without reporting ready"), "{err}");
            assert!(!root2.path().join("hosts").exists());
            reap_killed_pauses();
        });
    }
}
