//! CRI scenarios against a private containerd (Debian's, started by the harness:
//! `cocoon_integration::containerd`), driven through the CRI gRPC API
//! (`cocoon_integration::cri`). Each scenario runs for two runtime handlers:
//!
//! - `runc::*`: the baseline. Needs no VM, so it runs directly on this host.
//! - `cocoon::*`: every pod in its own microVM, through `containerd-shim-cocoon-v1`.
//!   These NEED THE SHIM and real KVM: on hosts whose KVM cannot boot Linux they run
//!   inside the test lab (one boot for all of them). Without a shim they fail, naming it.
//!
//! Every scenario ends by stopping and removing its pods and checking that nothing is
//! left on the host: processes, network namespaces, links, tc, mounts, cgroups, files
//! (`cocoon_integration::residue`). Scenarios share one containerd and run one at a time.

use anyhow::{anyhow, bail, ensure, Context};
use cocoon_integration::containerd::{self, Containerd, Options, COCOON, RUNC};
use cocoon_integration::cri::{self, Cri, LogLine, StreamSession};
use cocoon_integration::residue::{self, Snapshot};
use cocoon_integration::{paths, vmtest};
use cocoon_runtime::config::{Config as CocoonConfig, Liveness};
use k8s_cri::v1::{ContainerConfig, ContainerState, Mount, PodSandboxConfig};
use libtest_mimic::{Arguments, Failed, Trial};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Set (by this harness) when it reruns itself in the lab for the cocoon scenarios only.
const ONLY_COCOON_ENV: &str = "COCOON_CRI_ONLY_COCOON";

type Scenario = fn(&mut Env, &Runtime) -> anyhow::Result<()>;

/// One scenario under the names it has per runtime (they differ where the scenario
/// does: killing the pod's VMM has runc's pause process as its counterpart; an empty
/// name: the runtime has no counterpart, e.g. runc has no VM to health-check).
struct Case {
    runc: &'static str,
    cocoon: &'static str,
    run: Scenario,
}

const CASES: &[Case] = &[
    case("echo_and_logs", echo_and_logs),
    case("exec_sync", exec_sync),
    case("exec_tty_websocket", exec_tty_websocket),
    case(
        "replace_container_in_same_pod",
        replace_container_in_same_pod,
    ),
    case("two_containers_localhost_tcp", two_containers_localhost_tcp),
    case("pod_to_pod_tcp", pod_to_pod_tcp),
    case("exit_codes", exit_codes),
    case("oom_killed", oom_killed),
    case("configmap_update", configmap_update),
    case("stop_remove_no_residue", stop_remove_no_residue),
    Case {
        runc: "kill_pause_process",
        cocoon: "kill_vmm",
        run: kill_pod_process,
    },
    case("containerd_restart", containerd_restart),
    Case {
        runc: "sigstopped_pod_stops",
        cocoon: "silent_vm_stops",
        run: silent_pod_stops,
    },
    Case {
        runc: "",
        cocoon: "health_check_marks_then_kills",
        run: health_check,
    },
    case("shim_killed_while_pod_silent", shim_killed_while_pod_silent),
    case(
        "containerd_restart_mid_stop_of_silent_pod",
        containerd_restart_mid_stop,
    ),
];

/// The liveness thresholds the cocoon scenarios run with (`[liveness]`, see
/// runtime/src/liveness.rs): short enough for [`health_check`] to see both sides in a
/// minute, with the default stop timeout. Silence, not slowness, counts: a lab guest
/// that answers late is never declared dead.
const LIVENESS: Liveness = Liveness {
    stop_timeout_secs: 10,
    ping_interval_secs: 2,
    unresponsive_after_secs: 6,
    dead_after_secs: 30,
};

/// How long stopping or removing anything of a pod that stopped answering may take: two
/// unanswered signals (SIGTERM, then SIGKILL after the 2 s grace period) of
/// `stop_timeout_secs` each, plus the VM's kill. Not scaled for the lab: it is waiting,
/// not work.
const SILENT_STOP_BOUND: Duration = Duration::from_secs(60);

const fn case(name: &'static str, run: Scenario) -> Case {
    Case {
        runc: name,
        cocoon: name,
        run,
    }
}

/// The runtime handler a scenario runs with.
struct Runtime {
    handler: &'static str,
}

impl Runtime {
    fn is_cocoon(&self) -> bool {
        self.handler == COCOON
    }
}

/// Emulated machines (the lab) are much slower: every wait scales with this.
fn slow() -> u32 {
    if vmtest::in_lab() {
        8
    } else {
        1
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s) * slow()
}

/// The private containerd and a client, started on first use.
struct Env {
    ctrd: Containerd,
    cri: Cri,
    /// Pods the running scenario created (removed by [`run_scenario`] whatever happens).
    pods: Vec<Pod>,
}

#[derive(Clone)]
struct Pod {
    id: String,
    config: PodSandboxConfig,
}

impl Env {
    fn start() -> anyhow::Result<Env> {
        let t = Instant::now();
        let opts = Options {
            ready_timeout: secs(60),
            cocoon_config_extra: format!(
                "[liveness]\nstop_timeout_secs = {}\nping_interval_secs = {}\n\
                 unresponsive_after_secs = {}\ndead_after_secs = {}\n",
                LIVENESS.stop_timeout_secs,
                LIVENESS.ping_interval_secs,
                LIVENESS.unresponsive_after_secs,
                LIVENESS.dead_after_secs
            ),
            ..Options::default()
        };
        let ctrd = Containerd::start(opts).context("starting the private containerd")?;
        let mut cri = Cri::connect(&ctrd.socket, secs(60))
            .with_context(|| format!("containerd log:\n{}", ctrd.log_tail(20)))?;
        let v = cri.version()?;
        eprintln!(
            "cri: {} {} (CRI {}) at {} up in {:.1}s",
            v.runtime_name,
            v.runtime_version,
            v.runtime_api_version,
            ctrd.base.display(),
            t.elapsed().as_secs_f64()
        );
        Ok(Env {
            ctrd,
            cri,
            pods: Vec::new(),
        })
    }

    /// Runs a pod with the runtime's handler.
    fn pod(&mut self, name: &str, rt: &Runtime) -> anyhow::Result<Pod> {
        let config = cri::pod_config(name, &self.ctrd.pod_logs, &self.ctrd.cgroup_parent);
        let id = self.cri.run_pod(&config, rt.handler).with_context(|| {
            if rt.is_cocoon() {
                format!(
                    "RunPodSandbox of pod {name} with the cocoon runtime (containerd runs \
                     {} from {:?}; does the shim implement the sandbox yet?)",
                    containerd::COCOON_SHIM,
                    self.ctrd.opts.shim_dirs
                )
            } else {
                format!("RunPodSandbox of pod {name} with {}", rt.handler)
            }
        })?;
        let pod = Pod { id, config };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    fn run(&mut self, pod: &Pod, config: &ContainerConfig) -> anyhow::Result<String> {
        let name = config.metadata.as_ref().map(|m| m.name.as_str());
        self.cri
            .run_container(&pod.id, config, &pod.config)
            .with_context(|| format!("create and start container {name:?}"))
    }

    /// Waits until the container's log has a line satisfying `pred`; returns the log.
    fn wait_log(
        &self,
        pod: &Pod,
        config: &ContainerConfig,
        what: &str,
        pred: impl Fn(&LogLine) -> bool,
    ) -> anyhow::Result<Vec<LogLine>> {
        let path = cri::log_file(&pod.config, config);
        let deadline = Instant::now() + secs(20);
        loop {
            let log = cri::read_log(&path);
            if log.iter().any(&pred) {
                return Ok(log);
            }
            if Instant::now() >= deadline {
                bail!("no {what} in {}: {log:?}", path.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops and removes every pod of the scenario and its log directory.
    fn remove_pods(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for pod in std::mem::take(&mut self.pods) {
            if let Err(e) = self.cri.stop_pod(&pod.id) {
                errors.push(format!("stop pod {}: {e}", pod.id));
            }
            if let Err(e) = self.cri.remove_pod(&pod.id) {
                errors.push(format!("remove pod {}: {e}", pod.id));
            }
            // kubelet's part: pod log directories are its to remove.
            let _ = std::fs::remove_dir_all(&pod.config.log_directory);
        }
        errors
    }
}

/// Shared by all trials: the environment (started lazily, once) and, for cocoon, the
/// first failure to run a pod, so that without a working shim the remaining cocoon
/// scenarios fail at once with that reason instead of each waiting for it.
#[derive(Default)]
struct Harness {
    env: Option<Result<Env, String>>,
    cocoon_broken: Option<String>,
    /// Handlers that have run their warm-up pod.
    warmed: Vec<&'static str>,
    /// `name: first line of why` per failed scenario, repeated as the run's last lines
    /// (a CI log's tail shows them; the full reports are far above).
    failed: Vec<String>,
}

/// One pod through its whole life before any residue snapshot: containerd, CNI and the
/// runtime create some directories and caches on first use (cri/sandboxes, CNI's result
/// cache, host-local's lease dir, an image disk cache), which are not a pod's residue.
fn warm_up(env: &mut Env, rt: &Runtime) -> anyhow::Result<()> {
    let pod = env.pod("warmup", rt)?;
    let id = env.run(&pod, &cri::container_config("warmup", &["true"]))?;
    env.cri.wait_exited(&id, secs(60))?;
    let errors = env.remove_pods();
    ensure!(errors.is_empty(), "{}", errors.join("; "));
    Ok(())
}

/// A failed attempt at a scenario.
struct Failure {
    report: String,
    /// A pod VM of the scenario reset itself or stopped answering (see [`guest_failed`]).
    guest_fault: bool,
}

/// Runs one scenario (see [`attempt`]). Inside the test lab a scenario whose pod VM reset
/// itself or hung runs once more: nested guests there do that now and then in a way
/// hardware KVM does not (docs/test-lab.md), and one such fault must not hide the other
/// scenarios' results. The first attempt's report is printed in full; a second fails.
fn run_scenario(
    harness: &Mutex<Harness>,
    name: &str,
    rt: &Runtime,
    scenario: Scenario,
) -> Result<(), Failed> {
    // A panic in an earlier trial poisons the lock; the state is still usable.
    let mut guard = harness.lock().unwrap_or_else(|p| p.into_inner());
    let h = &mut *guard;
    let mut result = attempt(h, name, rt, scenario);
    if let Err(f) = &result {
        if f.guest_fault && rt.is_cocoon() && slow() > 1 {
            eprintln!(
                "{name}: a pod VM reset itself or hung (lab fault?); running the scenario once more. \
                 First attempt:\n{}",
                f.report
            );
            vmtest::count_rerun(name, &f.report);
            result = attempt(h, name, rt, scenario);
        }
    }
    result.map_err(|f| {
        let why = f.report.rsplit("--- why ---\n").next().unwrap_or_default();
        h.failed.push(format!(
            "{name}: {}",
            why.lines().next().unwrap_or_default()
        ));
        f.report.into()
    })
}

/// One attempt: residue snapshot, the scenario, removal of its pods, residue check.
fn attempt(h: &mut Harness, name: &str, rt: &Runtime, scenario: Scenario) -> Result<(), Failure> {
    let fail = |report: String| Failure {
        report,
        guest_fault: false,
    };
    if rt.is_cocoon() {
        cocoon_preflight().map_err(|e| fail(e.message().unwrap_or_default().to_string()))?;
        if let Some(why) = &h.cocoon_broken {
            return Err(fail(format!(
                "not run: an earlier cocoon scenario could not run a pod: {why}"
            )));
        }
    }
    let env = match h
        .env
        .get_or_insert_with(|| Env::start().map_err(|e| format!("{e:#}")))
    {
        Ok(env) => env,
        Err(e) => return Err(fail(format!("no private containerd: {e}"))),
    };
    if !h.warmed.contains(&rt.handler) {
        h.warmed.push(rt.handler);
        if let Err(e) = warm_up(env, rt) {
            let _ = env.remove_pods();
            let why = format!("warm-up pod with {}: {e:#}", rt.handler);
            if rt.is_cocoon() {
                h.cocoon_broken = Some(why.clone());
            }
            return Err(fail(why));
        }
    }
    let scope = env.ctrd.residue_scope();
    let before = Snapshot::take(&scope);
    let log_start = std::fs::metadata(&env.ctrd.log).map_or(0, |m| m.len());
    let t = Instant::now();
    let result = scenario(env, rt);
    let elapsed = t.elapsed();
    let pod_ids: Vec<String> = env.pods.iter().map(|p| p.id.clone()).collect();
    let cleanup_errors = env.remove_pods();
    // The scope again: a containerd restart changes its pid.
    let scope = env.ctrd.residue_scope();
    let mut left = Snapshot::settle(&before, &scope, secs(5));
    if !left.is_empty() {
        // Unreferenced snapshots wait for containerd's next GC: run it, then look again.
        // What is still referenced stays, and is reported.
        if let Err(e) = env.ctrd.collect_garbage() {
            left.push(format!("(containerd GC failed: {e})"));
        }
        left = Snapshot::settle(&before, &scope, secs(10));
        if !left.is_empty() {
            left.push(env.ctrd.describe());
        }
    }
    eprintln!(
        "{name}: {:.2}s{}",
        elapsed.as_secs_f64(),
        if result.is_ok() { "" } else { " (failed)" }
    );

    let mut report = Vec::new();
    if let Err(e) = &result {
        if rt.is_cocoon() && pod_ids.is_empty() && format!("{e:#}").contains("RunPodSandbox") {
            h.cocoon_broken = Some(format!("{name}: {e:#}"));
        }
        report.push(format!("{e:#}"));
    }
    if !cleanup_errors.is_empty() {
        report.push(format!(
            "cleanup failed:\n  {}",
            cleanup_errors.join("\n  ")
        ));
    }
    if !left.is_empty() {
        report.push(format!(
            "left behind after stop and remove:\n  {}",
            left.join("\n  ")
        ));
    }
    if report.is_empty() {
        return Ok(());
    }
    let mut lines = Vec::new();
    for id in &pod_ids {
        lines.push(env.ctrd.log_lines_with(&id[..12.min(id.len())], 15));
    }
    if pod_ids.is_empty() {
        lines.push(env.ctrd.log_tail(15));
    }
    // The liveness rule's verdicts carry the VM's signature (threads, KVM counters,
    // calls in flight): always part of the report, however far back they are.
    let since = log_since(&env.ctrd.log, log_start);
    let verdicts: Vec<&str> = since
        .lines()
        .filter(|l| l.contains("declared dead") || l.contains("pod VM unresponsive"))
        .take(4)
        .collect();
    if !verdicts.is_empty() {
        lines.push(format!(
            "--- liveness verdicts ---\n{}",
            verdicts.join("\n")
        ));
    }
    let log = lines.join("\n");
    // Only a clean failure runs again: the runtime must clean up after a dead or hung VM
    // too, and residue would also be in the next attempt's "before" snapshot.
    // A pod VM that reset during RunPodSandbox is in no pod id yet: its error says so.
    let boot_reset = result
        .as_ref()
        .err()
        .is_some_and(|e| vmtest::says_guest_reset(&format!("{e:#}")));
    let guest_fault = cleanup_errors.is_empty()
        && left.is_empty()
        && (boot_reset || guest_failed(&since, &pod_ids));
    // The log first: the reason is then the last thing before the next trial's output.
    Err(Failure {
        report: format!(
            "--- containerd log ---\n{log}\n--- why ---\n{}",
            report.join("\n")
        ),
        guest_fault,
    })
}

/// What containerd's log at `path` gained after byte `start` (all of it if it shrank).
fn log_since(path: &Path, start: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let from = usize::try_from(start)
        .ok()
        .filter(|&s| s <= bytes.len())
        .unwrap_or(0);
    String::from_utf8_lossy(&bytes[from..]).into_owned()
}

/// Whether `log` shows a pod VM of `pod_ids` that reset itself (the shim's "VM ended"
/// line carries the VMM's last log lines) or a guest that stopped answering the shim's
/// agent calls: the two faults of the lab's nested guests (docs/test-lab.md).
fn guest_failed(log: &str, pod_ids: &[String]) -> bool {
    log.lines().any(|l| {
        let reset = l.contains("VM ended")
            && vmtest::says_guest_reset(l)
            && pod_ids.iter().any(|id| l.contains(id.as_str()));
        reset || vmtest::says_agent_hung(l)
    })
}

/// Runs the trials, then repeats why each failed scenario failed as the last lines.
fn run_trials(
    args: &Arguments,
    harness: &Arc<Mutex<Harness>>,
    handlers: &[&'static str],
) -> libtest_mimic::Conclusion {
    let mut conclusion = libtest_mimic::run(args, trials(harness, handlers));
    if !vmtest::reruns_within_budget("cri tests") {
        conclusion.num_failed += 1;
    }
    let h = harness.lock().unwrap_or_else(|p| p.into_inner());
    for line in &h.failed {
        eprintln!("cri failed: {line}");
    }
    conclusion
}

/// What cocoon scenarios need before any pod can run; checked before booting a lab.
fn cocoon_preflight() -> Result<(), Failed> {
    let opts = Options::default();
    if containerd::find_cocoon_shim(&opts).is_none() {
        return Err(format!(
            "needs the cocoon shim: {} not found in {:?}; build it with \
             `cargo build -p containerd-shim-cocoon-v1` (or set COCOON_SHIM_DIR)",
            containerd::COCOON_SHIM,
            opts.shim_dirs
        )
        .into());
    }
    for (what, p) in [
        ("guest kernel", paths::guest_vmlinux()),
        ("guest initramfs", paths::guest_initramfs()),
    ] {
        if !p.is_file() {
            return Err(format!("needs the {what} {}: run `make`", p.display()).into());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

fn sh(script: &str) -> Vec<&str> {
    vec!["sh", "-c", script]
}

/// A container that runs until killed (`sleep` as PID 1 ignores SIGTERM: stop kills).
fn sleeper(name: &str) -> ContainerConfig {
    cri::container_config(name, &["sleep", "3600"])
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A busybox httpd on port 8080 serving `body` at `/`.
fn web_server(name: &str, body: &str) -> ContainerConfig {
    let script =
        format!("mkdir -p /www && echo {body} >/www/index.html && exec httpd -f -p 8080 -h /www");
    cri::container_config(name, &sh(&script))
}

/// A client that fetches `url` (retrying while the server comes up) and prints it.
fn web_client(name: &str, url: &str) -> ContainerConfig {
    let script = format!(
        "for i in $(seq 150); do timeout 5 wget -q -O - {url} && exit 0; sleep 0.2; done; exit 1"
    );
    cri::container_config(name, &sh(&script))
}

/// A pod; a container that echoes to stdout and stderr; its exit; its CRI log.
fn echo_and_logs(env: &mut Env, rt: &Runtime) -> anyhow::Result<()> {
    let pod = env.pod("echo", rt)?;
    let c = cri::container_config("echo", &sh("echo hello-$((6*7)); echo to-stderr >&2"));
    let id = env.run(&pod, &c)?;
    let st = env.cri.wait_exited(&id, secs(30))?;
    ensure!(
        st.exit_code == 0 && st.reason == "Completed",
        "exit {} reason {:?} (want 0, Completed)",
        st.exit_code,
        st.reason
    );
    let log = env.wait_log(&pod, &c, "stdout hello-42", |l| {
        l.stream == "stdout" && l.text == "hello-42"
    })?;
    ensure!(
        log.iter()
            .any(|l| l.stream == "stderr" && l.text == "to-stderr"),
        "no stderr line in the log: {log:?}"
    );
    Ok(())
}

/// ExecSync: stdout, stderr and exit code apart; the pod's hostname; the container's
/// own PID namespace.
fn exec_sync(env: &mut Env, rt: &Runtime) -> anyhow::Result<()> {
    let pod = env.pod("execsync", rt)?;
    let id = env.run(&pod, &sleeper("main"))?;
    let r = env.cri.exec_sync(
        &id,
        &sh("echo out-$((2+3)); echo err >&2; exit 5"),
        secs(30).as_secs() as i64,
    )?;
    ensure!(
        (
            text(&r.stdout).as_str(),
            text(&r.stderr).as_str(),
            r.exit_code
        ) == ("out-5\n", "err\n", 5),
        "exec: stdout {:?} stderr {:?} exit {}",
        text(&r.stdout),
        text(&r.stderr),
        r.exit_code
    );
    let r = env.cri.exec_sync(&id, &["hostname"], 30)?;
    ensure!(
        text(&r.stdout) == "execsync\n",
        "hostname {:?}",
        text(&r.stdout)
    );
    let r = env.cri.exec_sync(&id, &["cat", "/proc/1/cmdline"], 30)?;
    ensure!(
        text(&r.stdout).replace('\0', " ").trim() == "sleep 3600",
        "PID 1 of the container is {:?}",
        text(&r.stdout)
    );
    Ok(())
}

/// Exec with a TTY through containerd's streaming server: the remotecommand protocol
/// (v4.channel.k8s.io) over WebSocket, as `kubectl exec -it` speaks it: a terminal,
/// a resize, typed input, the exit code on the error channel.
fn exec_tty_websocket(env: &mut Env, rt: &Runtime) -> anyhow::Result<()> {
    let pod = env.pod("exectty", rt)?;
    let id = env.run(&pod, &sleeper("main"))?;
    let url = env.cri.exec_url(&id, &["sh"], true)?;
    // The resize and the input travel on different channels: wait for the size to land
    // before printing it. `$((6*7))` is echoed by the terminal as typed, 42 is not.
    let input =
        "for i in $(seq 100); do [ \"$(stty size)\" = \"33 101\" ] && break; sleep 0.1; done\n\
                 echo size=$(stty size) tty=$(tty) sum=$((6*7))\n\
                 exit 3\n";
    let session = StreamSession {
        size: Some((101, 33)),
        input: input.as_bytes().to_vec(),
        timeout: secs(30),
    };
    let out = env
        .cri
        .stream_exec(&url, &session)
        .with_context(|| format!("exec session at {url}"))?;
    let stdout = text(&out.stdout);
    ensure!(
        out.protocol == "v4.channel.k8s.io",
        "server chose subprotocol {:?}",
        out.protocol
    );
    ensure!(
        stdout.contains("size=33 101 tty=/dev/pts/") && stdout.contains("sum=42"),
        "terminal output: {stdout:?}"
    );
    ensure!(
        out.exit_code == Some(3),
        "exit status {:?} (want 3); stdout {stdout:?}",
        out.status
    );
    Ok(())
}

/// A container exits and is removed; a new one is created in the same pod (same
/// sandbox: for cocoon, the same VM).
fn replace_container_in_same_pod(env: &mut Env, rt: &Runtime) -> anyhow::Result<()> {
    let pod = env.pod("replace", rt)?;
    let sandbox_before = sandbox_process(env, rt, &pod)?;
    let first = cri::container_config("first", &sh("echo first"));
    let id = env.run(&pod, &first)?;
    let st = env.cri.wait_exited(&id, secs(30))?;
    ensure!(st.exit_code == 0, "first exited {}", st.exit_code);
    env.cri.remove_container(&id)?;
    ensure!(
        env.cri.container_status(&id).is_err(),
        "container {id} still has a status after RemoveContainer"
    );
    let second = cri::container_config("second", &sh("echo second; exec sleep 3600"));
    let id2 = env.run(&pod, &second)?;
    env.wait_log(&pod, &second, "'second'", |l| l.text == "second")?;
    let st = env.cri.container_status(&id2)?;
    ensure!(
        st.state == ContainerState::ContainerRunning as i32,
        "second is {}",
        cri::state_name(st.state)
    );
    ensure!(env.cri.pod_ready(&pod.id)?, "pod not ready any more");
    let sandbox_after = sandbox_process(env, rt, &pod)?;
    ensure!(
        sandbox_before == sandbox_after,
        "the pod's sandbox process changed from {sandbox_before} to {sandbox_after}"
    );
    Ok(())
}

/// Two containers of one pod: one serves TCP on localhost, the other connects.
fn two_containers_localhost_tcp(env: &mut Env, rt: &Runtime) -> anyhow::Result<()> {
    let pod = env.pod("localhost", rt)?;
    env.run(&pod, &web_server("server", "pong-$((40+2))"))?;
    let client = web_client("client", "http://127.0.0.1:8080/");
    let id = env.run(&pod, &client)?;
    let st = env.cri.wait_exited(&id, secs(60))?;
    let log = cri::read_log(&cri::log_file(&pod.config, &client));
    ensure!(
        st.exit_code == 0 && log.iter().any(|l| l.text == "pong-42"),
        "client exit {}; log {log:?}",
        st.exit_code
    );
    Ok(())
}

/// Pod to pod over the CNI bridge.
fn pod_to_pod_tcp(env: &mut Env, rt: &Runtime) -> anyhow::Result<()> {
    let a = env.pod("pod-a", rt)?;
    env.run(&a, &web_server("server", "from-a"))?;
    let b = env.pod("pod-b", rt)?;
    let (ip_a, ip_b) = (env.cri.pod_ip(&a.id)?, env.cri.pod_ip(&b.id)?);
    let subnet = format!("{}.", env.ctrd.subnet_prefix);
    ensure!(
        ip_a.starts_with(&subnet) && ip_b.starts_with(&subnet) && ip_a != ip_b,
        "pod IPs {ip_a} and {ip_b} are not two addresses in {subnet}0/24"
    );
    let client = web_client("client", &format!("http://{ip_a}:8080/"));
    let id = env.run(&b, &client)?;
    let st = env.cri.wait_exited(&id, secs(60))?;
    let log = cri::read_log(&cri::log_file(&b.config, &client));
    ensure!(
        st.exit_code == 0 && log.iter().any(|l| l.text == "from-a"),
        "client in {ip_b} fetching from {ip_a}: exit {}; log {log:?}",
        st.exit_code
    );
    Ok(())
}

/// Exit codes and reasons: 0 Completed, 3 Error, killed by StopContainer 137; ExecSync's.
fn exit_codes(env: &mut Env, rt: &Runtime) -> anyhow::Result<()> {
    // Each step's time: this scenario has been the slow outlier (12 s usually, once 140 s).
    let t = Instant::now();
    let step = |what: &str| eprintln!("exit_codes: {what} at {:.1}s", t.elapsed().as_secs_f64());
    let pod = env.pod("exits", rt)?;
    step("pod running");
    for (name, script, code, reason) in [
        ("zero", "exit 0", 0, "Completed"),
        ("three", "exit 3", 3, "Error"),
        ("big", "exit 255", 255, "Error"),
    ] {
        let id = env.run(&pod, &cri::container_config(name, &sh(script)))?;
        step(&format!("{name} started"));
        let st = env.cri.wait_exited(&id, secs(30))?;
        step(&format!("{name} exited"));
        ensure!(
            st.exit_code == code && st.reason == reason,
            "{script}: exit {} reason {:?} (want {code}, {reason})",
            st.exit_code,
            st.reason
        );
    }
    let id = env.run(&pod, &sleeper("killed"))?;
    step("sleeper started");
    let r = env.cri.exec_sync(&id, &sh("exit 7"), 30)?;
    step("ExecSync done");
    ensure!(r.exit_code == 7, "ExecSync exit {} (want 7)", r.exit_code);
    env.cri.stop_container(&id, 0)?;
    step("StopContainer done");
    let st = env.cri.wait_exited(&id, secs(30))?;
    step("sleeper exited");
    ensure!(
        st.exit_code == 137 && st.reason == "Error",
        "killed: exit {} reason {:?} (want 137, Error)",
        st.exit_code,
        st.reason
    );
    Ok(())
}

/// A container over its memory limit is OOM-killed, and CRI says so.
fn oom_killed(env: &mut Env, rt: &Runtime) -> anyhow::Result<()> {
    const LIMIT: i64 = 32 << 20;
    let pod = env.pod("oom", rt)?;
    // awk doubles a string until the cgroup limit stops it; as PID 1 its death is the
    // container's exit.
    let mut c = cri::container_config(
        "hog",
        &sh("echo start; exec awk 'BEGIN { s = \"x\"; while (1) s = s s }'"),
    );
    if let Some(r) = c.linux.as_mut().and_then(|l| l.resources.as_mut()) {
        r.memory_limit_in_bytes = LIMIT;
        r.memory_swap_limit_in_bytes = LIMIT;
    }
    let id = env.run(&pod, &c)?;
    let st = env.cri.wait_exited(&id, secs(60))?;
    ensure!(
        st.reason == "OOMKilled" && st.exit_code == 137,
        "exit {} reason {:?} (want 137, OOMKilled)",
        st.exit_code,
        st.reason
    );
    Ok(())
}

/// Writes a configmap volume the way kubelet's atomic writer does: the data in a
/// timestamped directory, `..data` a symlink to it swapped by rename, each key a symlink
/// through `..data`.
fn write_configmap(dir: &Path, generation: u32, data: &[(&str, &str)]) -> anyhow::Result<()> {
    let ts_name = format!("..gen_{generation}");
    let ts = dir.join(&ts_name);
    std::fs::create_dir_all(&ts)?;
    for (k, v) in data {
        std::fs::write(ts.join(k), v)?;
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&ts_name, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    for (k, _) in data {
        let link = dir.join(k);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{k}"), &link)?;
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old))?;
    }
    Ok(())
}

/// A configmap-style volume updated on the host shows up in the running container.
fn configmap_update(env: &mut Env, rt: &Runtime) -> anyhow::Result<()> {
    // Where the kubelet puts a configmap volume: the runtime recognises configmaps,
    // secrets and tokens by this layout (a plain host directory is a hostPath).
    let dir: PathBuf = env.ctrd.volumes.join(format!(
        "pods/configmap-{}/volumes/kubernetes.io~configmap/settings",
        rt.handler
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        write_configmap(&dir, 1, &[("greeting", "v1")])?;
        let pod = env.pod("configmap", rt)?;
        let mut c = sleeper("reader");
        c.mounts.push(Mount {
            container_path: "/etc/config".into(),
            host_path: dir.display().to_string(),
            readonly: true,
            ..Default::default()
        });
        let id = env.run(&pod, &c)?;
        let read = |env: &mut Env, key: &str| -> anyhow::Result<String> {
            let r = env
                .cri
                .exec_sync(&id, &["cat", &format!("/etc/config/{key}")], 30)?;
            Ok(text(&r.stdout))
        };
        let first = read(env, "greeting")?;
        ensure!(first == "v1", "/etc/config/greeting is {first:?} (want v1)");
        write_configmap(&dir, 2, &[("greeting", "v2"), ("added", "new-key")])?;
        // kubelet's sync period is a minute; cocoon's copy-in must follow well within it.
        let deadline = Instant::now() + secs(30);
        loop {
            let (g, a) = (read(env, "greeting")?, read(env, "added")?);
            if g == "v2" && a == "new-key" {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("after the update the container sees greeting={g:?} added={a:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A pod with two containers and an exec'd background process; StopPodSandbox ends
/// every process of the pod, RemovePodSandbox removes the pod (the harness then checks
/// that nothing at all is left).
fn stop_remove_no_residue(env: &mut Env, rt: &Runtime) -> anyhow::Result<()> {
    let pod = env.pod("residue", rt)?;
    let a = env.run(&pod, &sleeper("a"))?;
    let b = env.run(&pod, &sleeper("b"))?;
    let r = env
        .cri
        .exec_sync(&a, &sh("sleep 3600 >/dev/null 2>&1 &"), 30)?;
    ensure!(r.exit_code == 0, "background exec: exit {}", r.exit_code);
    env.cri.stop_pod(&pod.id)?;
    for id in [&a, &b] {
        let st = env.cri.container_status(id)?;
        ensure!(
            st.state == ContainerState::ContainerExited as i32,
            "after StopPodSandbox container {id} is {}",
            cri::state_name(st.state)
        );
    }
    ensure!(!env.cri.pod_ready(&pod.id)?, "pod still ready after stop");
    let pod_procs: Vec<String> =
        residue::processes_of(&env.ctrd.base.display().to_string(), env.ctrd.pid())
            .into_iter()
            .filter(|p| p.comm == "sleep" || p.comm == "cocoon-vmm")
            .map(|p| format!("{} {} [{}]", p.pid, p.comm, p.cmdline))
            .collect();
    ensure!(
        pod_procs.is_empty(),
        "after StopPodSandbox these still run: {pod_procs:?}"
    );
    env.cri.remove_pod(&pod.id)?;
    env.pods.retain(|p| p.id != pod.id);
    let listed = env.cri.list_pods()?;
    ensure!(
        listed.iter().all(|p| p.id != pod.id),
        "pod still listed after RemovePodSandbox"
    );
    Ok(())
}

/// The host process that embodies the pod's sandbox: runc's pause process; cocoon's VMM
/// (`cocoon-vmm`, a descendant of the shim started for this sandbox, or naming it).
fn sandbox_process(env: &mut Env, rt: &Runtime, pod: &Pod) -> anyhow::Result<u32> {
    if !rt.is_cocoon() {
        return env
            .cri
            .pod_pid(&pod.id)?
            .ok_or_else(|| anyhow!("containerd reports no pid for sandbox {}", pod.id));
    }
    let vmms: Vec<residue::Proc> = residue::processes_of(&pod.id, None)
        .into_iter()
        .chain(
            residue::processes_of(&env.ctrd.base.display().to_string(), env.ctrd.pid())
                .into_iter()
                .filter(|p| p.cmdline.contains(&pod.id)),
        )
        .filter(|p| p.comm == "cocoon-vmm")
        .collect();
    let mut pids: Vec<u32> = vmms
        .iter()
        .filter_map(|p| u32::try_from(p.pid).ok())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    match pids.as_slice() {
        [pid] => Ok(*pid),
        [] => bail!(
            "no cocoon-vmm process for sandbox {} (looked for one named cocoon-vmm under a \
             process whose command line names the sandbox id, e.g. its shim)",
            pod.id
        ),
        many => bail!(
            "several cocoon-vmm processes for sandbox {}: {many:?}",
            pod.id
        ),
    }
}

/// The pod's sandbox process dies (runc: the pause process; cocoon: the VMM, and with it
/// the VM and every container): containerd notices, the pod is NOTREADY, and stop and
/// remove still leave nothing behind.
fn kill_pod_process(env: &mut Env, rt: &Runtime) -> anyhow::Result<()> {
    let pod = env.pod("killed", rt)?;
    let c = env.run(&pod, &sleeper("main"))?;
    let pid = sandbox_process(env, rt, &pod)?;
    // SAFETY: kill(2) on a pid just read from /proc for this pod.
    let rc = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    ensure!(rc == 0, "kill {pid}: {}", std::io::Error::last_os_error());
    let deadline = Instant::now() + secs(30);
    loop {
        let ready = env.cri.pod_ready(&pod.id)?;
        let st = env.cri.container_status(&c)?;
        // In a VM the containers die with it; runc's keep running without the pause.
        let container_done = !rt.is_cocoon() || st.state == ContainerState::ContainerExited as i32;
        if !ready && container_done {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "after killing {pid}: pod ready={ready}, container {}",
                cri::state_name(st.state)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// containerd restarts while a pod runs: the pod and its container survive, logs keep
/// flowing, exec works, a new container starts in the pod, and cleanup is complete.
fn containerd_restart(env: &mut Env, rt: &Runtime) -> anyhow::Result<()> {
    let pod = env.pod("restart", rt)?;
    let ticker = cri::container_config(
        "ticker",
        &sh("i=0; while :; do echo tick-$i; i=$((i+1)); sleep 0.2; done"),
    );
    let id = env.run(&pod, &ticker)?;
    let tick = |l: &LogLine| -> Option<u32> { l.text.strip_prefix("tick-")?.parse().ok() };
    env.wait_log(&pod, &ticker, "tick-3", |l| tick(l) == Some(3))?;
    env.ctrd.restart().context("restarting containerd")?;
    env.cri = Cri::connect(&env.ctrd.socket, secs(60)).context("CRI after the restart")?;
    let last_before = cri::read_log(&cri::log_file(&pod.config, &ticker))
        .iter()
        .filter_map(tick)
        .max()
        .unwrap_or(0);
    ensure!(
        env.cri.pod_ready(&pod.id)?,
        "pod not ready after the restart"
    );
    let st = env.cri.container_status(&id)?;
    ensure!(
        st.state == ContainerState::ContainerRunning as i32,
        "container {} after the restart",
        cri::state_name(st.state)
    );
    let r = env.cri.exec_sync(&id, &["echo", "alive"], 30)?;
    ensure!(
        text(&r.stdout) == "alive\n",
        "exec after the restart: {r:?}"
    );
    env.wait_log(&pod, &ticker, "ticks after the restart", |l| {
        tick(l).is_some_and(|n| n > last_before + 5)
    })?;
    let late = cri::container_config("late", &sh("echo late"));
    let id2 = env.run(&pod, &late)?;
    let st = env.cri.wait_exited(&id2, secs(30))?;
    ensure!(
        st.exit_code == 0,
        "new container after the restart exited {}",
        st.exit_code
    );
    env.wait_log(&pod, &late, "'late'", |l| l.text == "late")?;
    Ok(())
}

/// Makes the pod stop answering behind its runtime's back: cocoon's VM gets its vCPUs
/// stopped through the VMM's control socket (a hung guest, as far as the shim can tell);
/// runc's pause and container processes get SIGSTOP. Returns the cocoon pod's VMM to
/// resume it with.
fn freeze_pod(
    env: &mut Env,
    rt: &Runtime,
    pod: &Pod,
    containers: &[&str],
) -> anyhow::Result<Option<cocoon_runtime::vmm::VmmProcess>> {
    if rt.is_cocoon() {
        let vmm = pod_vmm(env, pod)?;
        vmm.pause()
            .context("pausing the pod VM through its control socket")?;
        return Ok(Some(vmm));
    }
    let mut pids = vec![sandbox_process(env, rt, pod)?];
    for c in containers {
        pids.push(
            env.cri
                .container_pid(c)?
                .ok_or_else(|| anyhow!("containerd reports no pid for container {c}"))?,
        );
    }
    for pid in pids {
        // SAFETY: kill(2) on pids containerd just reported for this pod.
        let rc = unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        ensure!(
            rc == 0,
            "SIGSTOP {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(None)
}

/// The runtime config the shims of this containerd read.
fn cocoon_config(env: &Env) -> anyhow::Result<CocoonConfig> {
    CocoonConfig::load(&env.ctrd.cocoon_config).context("the suite's cocoon config")
}

/// The cocoon pod's running VMM, found the way `cocoon ps` finds it.
fn pod_vmm(env: &Env, pod: &Pod) -> anyhow::Result<cocoon_runtime::vmm::VmmProcess> {
    let config = cocoon_config(env)?;
    match cocoon_runtime::cli::vmm_state(&config, &pod.id)? {
        cocoon_runtime::cli::VmmState::Running(vmm) => Ok(vmm),
        _ => bail!("sandbox {} has no running VMM", pod.id),
    }
}

/// The pod stops answering (see [`freeze_pod`]): StopContainer (SIGTERM, then SIGKILL
/// after a 2 s grace period), StopPodSandbox and RemovePodSandbox still succeed within
/// [`SILENT_STOP_BOUND`], every container is reported exited (cocoon: the stopped one as
/// killed, 137; the other with the VM, 255), and nothing is left behind. Without the
/// liveness rule the unanswered SIGKILL failed StopContainer and StopPodSandbox.
fn silent_pod_stops(env: &mut Env, rt: &Runtime) -> anyhow::Result<()> {
    let pod = env.pod("silent", rt)?;
    let a = env.run(&pod, &sleeper("a"))?;
    let b = env.run(&pod, &sleeper("b"))?;
    freeze_pod(env, rt, &pod, &[&a, &b])?;
    let t = Instant::now();
    env.cri
        .stop_container(&a, 2)
        .context("StopContainer in a pod that stopped answering")?;
    let took = t.elapsed();
    eprintln!("silent pod: StopContainer took {:.1} s", took.as_secs_f64());
    ensure!(
        took < SILENT_STOP_BOUND,
        "StopContainer took {took:?} (bound {SILENT_STOP_BOUND:?})"
    );
    let st = env.cri.wait_exited(&a, secs(10))?;
    ensure!(
        st.exit_code == 137,
        "stopped container exited {} (want 137: killed)",
        st.exit_code
    );
    let st = env.cri.container_status(&b)?;
    if rt.is_cocoon() {
        // The VM was declared dead: the other container ended with it.
        let st = env.cri.wait_exited(&b, secs(10))?;
        ensure!(
            st.exit_code == 255,
            "the other container of the dead VM exited {} (want 255)",
            st.exit_code
        );
    } else {
        ensure!(
            st.state == ContainerState::ContainerRunning as i32,
            "the other runc container is {}",
            cri::state_name(st.state)
        );
    }
    let t = Instant::now();
    env.cri.stop_pod(&pod.id)?;
    env.cri.remove_pod(&pod.id)?;
    env.pods.retain(|p| p.id != pod.id);
    let took = t.elapsed();
    eprintln!("silent pod: stop + remove took {:.1} s", took.as_secs_f64());
    ensure!(
        took < SILENT_STOP_BOUND,
        "StopPodSandbox + RemovePodSandbox took {took:?} (bound {SILENT_STOP_BOUND:?})"
    );
    Ok(())
}

/// The pod's shim dies while the pod does not answer (see [`freeze_pod`]): containerd
/// reports the containers exited and cleans up through the shim's `delete` action (for
/// cocoon: from `pod.json` and the VMM's pid file alone), and StopPodSandbox +
/// RemovePodSandbox succeed within [`SILENT_STOP_BOUND`] with nothing left behind.
fn shim_killed_while_pod_silent(env: &mut Env, rt: &Runtime) -> anyhow::Result<()> {
    let pod = env.pod("shimkill", rt)?;
    let c = env.run(&pod, &sleeper("main"))?;
    freeze_pod(env, rt, &pod, &[&c])?;
    let mut shims: Vec<i32> = residue::processes_of(&pod.id, None)
        .into_iter()
        .filter(|p| p.comm.starts_with("containerd-shim"))
        .map(|p| p.pid)
        .collect();
    shims.sort_unstable();
    shims.dedup();
    let [shim] = shims.as_slice() else {
        bail!("want one shim process for pod {}, found {shims:?}", pod.id);
    };
    let socket = shim_socket(*shim);
    // SAFETY: kill(2) on the pod's shim, just found in /proc.
    let rc = unsafe { libc::kill(*shim, libc::SIGKILL) };
    ensure!(rc == 0, "kill {shim}: {}", std::io::Error::last_os_error());
    let t = Instant::now();
    env.cri
        .wait_exited(&c, SILENT_STOP_BOUND)
        .context("the container after its shim was killed")?;
    env.cri.stop_pod(&pod.id)?;
    env.cri.remove_pod(&pod.id)?;
    env.pods.retain(|p| p.id != pod.id);
    let took = t.elapsed();
    eprintln!(
        "shim killed: exit seen, stop + remove took {:.1} s",
        took.as_secs_f64()
    );
    if !rt.is_cocoon() {
        // containerd-shim-runc-v2 killed leaves its socket, and containerd 1.6 does not
        // remove it: the baseline's residue, cleared so that the check sees the rest.
        // (Cocoon's `delete` removes a dead shim's socket: its residue check is strict.)
        if let Some(path) = socket {
            let _ = std::fs::remove_file(path);
        }
    }
    ensure!(
        took < SILENT_STOP_BOUND,
        "exit, StopPodSandbox and RemovePodSandbox took {took:?} (bound {SILENT_STOP_BOUND:?})"
    );
    Ok(())
}

/// containerd restarts while a StopContainer of a pod that does not answer is in flight
/// (see [`freeze_pod`]): the stop's client sees its call fail, yet after the restart the
/// container is reported exited and StopPodSandbox + RemovePodSandbox succeed within
/// [`SILENT_STOP_BOUND`] with nothing left behind: no call of the shim waited without a
/// deadline across the restart.
fn containerd_restart_mid_stop(env: &mut Env, rt: &Runtime) -> anyhow::Result<()> {
    let pod = env.pod("midstop", rt)?;
    let c = env.run(&pod, &sleeper("main"))?;
    freeze_pod(env, rt, &pod, &[&c])?;
    let socket = env.ctrd.socket.clone();
    let id = c.clone();
    let stopper = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut cri = Cri::connect(&socket, secs(60))?;
        cri.stop_container(&id, 30)?;
        Ok(())
    });
    // The SIGTERM is in the shim (unanswered) when containerd goes away.
    std::thread::sleep(Duration::from_secs(3));
    env.ctrd
        .restart()
        .context("restarting containerd mid-stop")?;
    let t = Instant::now();
    let outcome = stopper
        .join()
        .map_err(|_| anyhow!("the StopContainer thread panicked"))?;
    eprintln!("containerd restart mid-stop: the interrupted StopContainer said {outcome:?}");
    env.cri = Cri::connect(&env.ctrd.socket, secs(60)).context("CRI after the restart")?;
    env.cri
        .stop_container(&c, 0)
        .context("StopContainer after the restart")?;
    env.cri.wait_exited(&c, secs(10))?;
    env.cri.stop_pod(&pod.id)?;
    env.cri.remove_pod(&pod.id)?;
    env.pods.retain(|p| p.id != pod.id);
    let took = t.elapsed();
    eprintln!(
        "containerd restart mid-stop: stop + remove after the restart took {:.1} s",
        took.as_secs_f64()
    );
    ensure!(
        took < SILENT_STOP_BOUND,
        "after the restart, stopping and removing took {took:?} (bound {SILENT_STOP_BOUND:?})"
    );
    Ok(())
}

/// The Unix socket under /run/containerd/s that process `pid` listens on, if any (read
/// from /proc: the socket inodes of its fds, named in /proc/net/unix).
fn shim_socket(pid: i32) -> Option<PathBuf> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let inodes: Vec<String> = fds
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_string)
        })
        .collect();
    let unix = std::fs::read_to_string("/proc/net/unix").ok()?;
    unix.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (inode, path) = (f.get(6)?, f.get(7)?);
        (inodes.iter().any(|i| i == inode) && path.starts_with("/run/containerd/s/"))
            .then(|| PathBuf::from(path))
    })
}

/// The idle health check (cocoon only): a pod VM silent past `unresponsive_after` but
/// answering again before `dead_after` is marked unresponsive (`pod.json`, `cocoon ps`),
/// then unmarked, and keeps its pod (exec works); one silent past `dead_after` is
/// declared dead: its container is reported exited (255) and the pod not ready.
fn health_check(env: &mut Env, rt: &Runtime) -> anyhow::Result<()> {
    let pod = env.pod("health", rt)?;
    let c = env.run(&pod, &sleeper("main"))?;
    let config = cocoon_config(env)?;
    let (bundles, id) = (env.ctrd.state.clone(), pod.id.clone());
    let sandbox = |config: &CocoonConfig| -> anyhow::Result<cocoon_runtime::cli::ps::Sandbox> {
        let list = cocoon_runtime::cli::ps::list(config, &bundles)?;
        list.into_iter()
            .find(|s| s.id == id)
            .ok_or_else(|| anyhow!("cocoon ps does not list sandbox {id}"))
    };
    let wait_for =
        |what: &str, limit: Duration, pred: &dyn Fn(&cocoon_runtime::cli::ps::Sandbox) -> bool| {
            let deadline = Instant::now() + limit;
            loop {
                let sb = sandbox(&config)?;
                if pred(&sb) {
                    return anyhow::Ok(sb);
                }
                if Instant::now() >= deadline {
                    bail!("{what}: not within {limit:?}; cocoon ps says {sb:?}");
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        };
    ensure!(
        sandbox(&config)?.state == "running",
        "a fresh pod is not 'running'"
    );

    let vmm = pod_vmm(env, &pod)?;
    let t = Instant::now();
    vmm.pause().context("pausing the pod VM")?;
    let mark =
        Duration::from_secs(LIVENESS.unresponsive_after_secs + 3 * LIVENESS.ping_interval_secs);
    wait_for("marked unresponsive", mark + Duration::from_secs(5), &|s| {
        s.state == "unresponsive" && s.unresponsive_since.is_some()
    })?;
    let silent = t.elapsed();
    ensure!(
        silent >= Duration::from_secs(LIVENESS.unresponsive_after_secs),
        "marked unresponsive after {silent:?} of silence (threshold {} s)",
        LIVENESS.unresponsive_after_secs
    );
    vmm.resume().context("resuming the pod VM")?;
    let sb = wait_for(
        "answering again",
        Duration::from_secs(4 * LIVENESS.ping_interval_secs) + secs(5),
        &|s| s.state == "running",
    )?;
    ensure!(
        sb.unresponsive_count == 1,
        "unresponsive count {}",
        sb.unresponsive_count
    );
    let st = env.cri.container_status(&c)?;
    ensure!(
        st.state == ContainerState::ContainerRunning as i32,
        "after a silence shorter than dead_after the container is {}",
        cri::state_name(st.state)
    );
    let r = env.cri.exec_sync(&c, &["echo", "alive"], 30)?;
    ensure!(
        text(&r.stdout) == "alive\n",
        "exec after the silence: {r:?}"
    );

    // Silent for good now.
    vmm.pause().context("pausing the pod VM again")?;
    let st = env.cri.wait_exited(
        &c,
        Duration::from_secs(LIVENESS.dead_after_secs + LIVENESS.ping_interval_secs) + secs(10),
    )?;
    ensure!(
        st.exit_code == 255,
        "container of a VM declared dead exited {} (want 255)",
        st.exit_code
    );
    let deadline = Instant::now() + secs(10);
    while env.cri.pod_ready(&pod.id)? {
        ensure!(
            Instant::now() < deadline,
            "pod still ready after its VM was declared dead"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Where the scenarios run
// ---------------------------------------------------------------------------------------

fn trials(harness: &Arc<Mutex<Harness>>, handlers: &[&'static str]) -> Vec<Trial> {
    let mut out = Vec::new();
    for &handler in handlers {
        for case in CASES {
            let name = if handler == COCOON {
                case.cocoon
            } else {
                case.runc
            };
            if name.is_empty() {
                continue;
            }
            let full = format!("{handler}::{name}");
            let h = Arc::clone(harness);
            let run = case.run;
            out.push(Trial::test(full.clone(), move || {
                run_scenario(&h, &full, &Runtime { handler }, run)
            }));
        }
    }
    out
}

/// Whether libtest's filter and skips select `name` (as libtest-mimic matches them).
fn selected(args: &Arguments, name: &str) -> bool {
    let matches = |pat: &str| {
        if args.exact {
            name == pat
        } else {
            name.contains(pat)
        }
    };
    args.filter.as_deref().is_none_or(matches) && !args.skip.iter().any(|s| matches(s))
}

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    // One containerd, one scenario at a time: residue checks compare the whole host.
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }
    let only_cocoon = std::env::var_os(ONLY_COCOON_ENV).is_some();
    let harness = Arc::new(Mutex::new(Harness::default()));
    let handlers: &[&'static str] = if only_cocoon {
        &[COCOON]
    } else {
        &[RUNC, COCOON]
    };
    if args.list {
        return libtest_mimic::run(&args, trials(&harness, handlers)).exit_code();
    }
    match vmtest::placement() {
        vmtest::Placement::Here { kvm, in_lab } => {
            let place = if in_lab {
                "inside the test lab"
            } else {
                "directly on this host"
            };
            eprintln!("cri tests: {kvm}: running {place}");
            run_trials(&args, &harness, handlers).exit_code()
        }
        vmtest::Placement::Broken { kvm } => {
            eprintln!("cri tests: KVM inside the test lab is unusable ({kvm})");
            ExitCode::FAILURE
        }
        vmtest::Placement::Lab { kvm } => {
            // runc needs no VM: here. cocoon: inside one lab boot, unless it cannot run
            // at all, which is reported here without booting a lab.
            eprintln!("cri tests: runc scenarios on this host");
            let runc = run_trials(&args, &harness, &[RUNC]);
            let runc_failed =
                std::mem::take(&mut harness.lock().unwrap_or_else(|p| p.into_inner()).failed);
            // Stops runc's containerd before the lab starts.
            drop(harness);
            let wants_cocoon = CASES.iter().any(|c| {
                !c.cocoon.is_empty() && selected(&args, &format!("{COCOON}::{}", c.cocoon))
            });
            if !wants_cocoon {
                return runc.exit_code();
            }
            let cocoon = if let Err(why) = cocoon_preflight() {
                eprintln!(
                    "cri tests: cocoon scenarios cannot run: {}",
                    why.message().unwrap_or("")
                );
                let h = Arc::new(Mutex::new(Harness::default()));
                run_trials(&args, &h, &[COCOON]).exit_code()
            } else {
                eprintln!(
                    "cri tests: this host has {kvm}; cocoon scenarios run inside the test lab"
                );
                // SAFETY-free in edition 2021; no other thread runs at this point. The
                // lab runner passes COCOON_* variables into the lab.
                std::env::set_var(ONLY_COCOON_ENV, "1");
                vmtest::rerun_in_lab("cri tests (cocoon)", Duration::from_secs(45 * 60))
            };
            if runc.has_failed() {
                // Again after the lab's output, where a log's tail shows it.
                for line in &runc_failed {
                    eprintln!("cri failed: {line}");
                }
                ExitCode::FAILURE
            } else {
                cocoon
            }
        }
    }
}
