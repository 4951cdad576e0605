//! One pod's VM: booting it (network, VMM, agent handshake, pod setup), its drive
//! slots, its end, and the threads that watch it (console log, copied host files).
//!
//! Boot order ([`Pod::boot`]):
//! 1. the sandbox directory `<state_dir>/<id>` and its record (`pod.json`, the network
//!    namespace first, so a crash at any later step can be cleaned up);
//! 2. [`crate::podnet::setup`] in the spec's network namespace: TAP + tc redirect;
//! 3. the ready listener (`vsock.sock_1026`), bound before the VMM starts;
//! 4. [`crate::vmm::start`] with the TAP fd, the veth's MAC, N empty drive slots, the
//!    vsock socket and the console log, sized by [`VmSize::for_pod`];
//! 5. the agent's ready line, `Hello`, `SetupSandbox` (hostname, DNS from the pod's
//!    resolv.conf, sysctls, a pod PID namespace) and `SetupNetwork` (the veth's
//!    addresses and routes on the NIC with the veth's MAC).
//!
//! Any failure removes everything again ([`crate::state::cleanup_sandbox`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tracing::{debug, error, info, warn};

use crate::agent::{
    AgentClient, Endpoint, ReadyListener, SetupNetworkRequest, SetupSandboxRequest, DEFAULT_TIMEOUT,
};
use crate::config::{Config, ContainerLimits, VmSize};
use crate::error::chain;
use crate::files;
use crate::image::ImageCache;
use crate::liveness::{self, Change, Tracker};
use crate::spec::{self, GuestNamespaces};
use crate::state::PodRecord;
use crate::task::TaskError;
use crate::vmm::{self, Slots, VmmProcess, VmmSpec};

/// How long the guest agent has to report ready after the VMM started.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often copied host files are checked for changes.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(2);
/// How long a VM shutdown may take before the VMM is killed.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a VM declared dead may take to be seen ended after its VMM was killed.
const DEAD_VM_END_TIMEOUT: Duration = Duration::from_secs(15);

/// Plain values behind these locks: a panicked holder leaves nothing half-updated.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running pod VM.
pub struct Pod {
    pub id: String,
    pub dir: PathBuf,
    pub config: Config,
    pub vmm_pid: u32,
    vmm: Mutex<VmmProcess>,
    pub agent: AgentClient,
    slots: Mutex<Slots>,
    /// The pod's namespaces in the guest.
    pub ns: GuestNamespaces,
    pub record: Mutex<PodRecord>,
    pub images: ImageCache,
    /// Why the VM ended, once it has.
    ended: Mutex<Option<String>>,
    ended_cv: Condvar,
    /// A stop was asked for (kill of the sandbox task): its end is not a failure.
    pub stop_requested: AtomicBool,
    /// The VM's vCPUs are stopped on request (Pause of the sandbox): its silence is excused.
    paused: AtomicBool,
    /// The idle health check's state ([`crate::liveness`]).
    liveness: Mutex<Tracker>,
    /// Why the VM was declared dead, once it has been.
    declared_dead: Mutex<Option<String>>,
    /// Copied host sources: guest path and last signature.
    synced: Mutex<HashMap<PathBuf, (String, String)>>,
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pod")
            .field("id", &self.id)
            .field("vmm_pid", &self.vmm_pid)
            .finish()
    }
}

/// The DNS settings for the guest itself: the resolv.conf the spec mounts, else the one
/// containerd's CRI plugin keeps for the sandbox.
fn pod_dns(spec: &Value, sandbox_id: &str) -> spec::Dns {
    let candidates = spec::resolv_conf_source(spec)
        .into_iter()
        .chain(std::iter::once(spec::cri_resolv_conf(sandbox_id)));
    for path in candidates {
        if let Ok(text) = std::fs::read_to_string(&path) {
            debug!(sandbox = sandbox_id, resolv_conf = %path.display(), "pod DNS");
            return spec::parse_resolv_conf(&text);
        }
    }
    spec::Dns::default()
}

impl Pod {
    /// Boots the pod's VM for the sandbox container `spec` (see the module docs).
    pub fn boot(config: &Config, sandbox_id: &str, spec: &Value) -> Result<Arc<Pod>, TaskError> {
        let dir = config.sandbox_dir(sandbox_id);
        if dir.join(crate::state::RECORD_FILE).exists() {
            // A crashed earlier attempt (or shim) left things: clear them first.
            warn!(
                sandbox = sandbox_id,
                "leftovers of an earlier sandbox: cleaning up"
            );
            crate::state::cleanup_sandbox(config, sandbox_id)
                .map_err(TaskError::runtime(format!("sandbox {sandbox_id}: cleanup")))?;
        }
        match Self::boot_inner(config, sandbox_id, spec) {
            Ok(pod) => Ok(pod),
            Err(e) => {
                error!(sandbox = sandbox_id, error = %chain(&e), "sandbox boot failed: cleaning up");
                if let Err(ce) = crate::state::cleanup_sandbox(config, sandbox_id) {
                    warn!(sandbox = sandbox_id, error = %chain(&ce), "cleanup after failed boot");
                }
                Err(e)
            }
        }
    }

    fn boot_inner(config: &Config, id: &str, spec: &Value) -> Result<Arc<Pod>, TaskError> {
        let ctx = |what: &str| format!("sandbox {id}: {what}");
        let dir = config.sandbox_dir(id);
        let annotations = spec::annotations(spec);
        let limits = ContainerLimits::from_sandbox_annotations(&annotations)
            .map_err(TaskError::runtime(ctx("container limits")))?;
        let size = VmSize::for_pod(config, &annotations, &[limits])
            .map_err(TaskError::runtime(ctx("VM size")))?;
        let mut vspec =
            VmmSpec::for_sandbox(config, id, size).map_err(TaskError::runtime(ctx("VMM spec")))?;

        let mut record = PodRecord::new(id);
        let netns = spec::netns_path(spec);
        record.netns = netns.clone();
        record
            .save(&dir)
            .map_err(TaskError::runtime(ctx("pod record")))?;

        let net = match &netns {
            Some(ns) => crate::podnet::setup(ns).map_err(TaskError::runtime(ctx("pod network")))?,
            None => None,
        };
        if let Some(net) = &net {
            vspec.tap_fd = net.tap_fd.as_ref().map(|fd| fd.as_raw_fd());
            vspec.guest_mac = Some(net.mac.clone());
            vspec.netns = Some(net.netns.clone());
        } else if let Some(ns) = &netns {
            // No NIC, but the VMM still lives in the pod's namespace.
            vspec.netns = Some(ns.clone());
        }
        let ready = ReadyListener::for_vsock(&vspec.vsock_socket)
            .map_err(TaskError::agent(ctx("ready listener")))?;
        let mut vmm = vmm::start(&vspec).map_err(TaskError::runtime(ctx("starting the VMM")))?;
        let vmm_pid = vmm.pid();
        // The VMM holds the TAP now; ours closes with `net`.
        let ready_line = ready.wait_while(READY_TIMEOUT, || {
            if vmm.is_alive() {
                Ok(())
            } else {
                Err(format!(
                    "the VMM (pid {vmm_pid}) ended; its log ends: {}",
                    last_lines(&vspec.vmm_log, 5).join(" | ")
                ))
            }
        });
        let vmm = Mutex::new(vmm);
        let fail_with_console = |e: TaskError| -> TaskError {
            let tail = last_lines(&vspec.console_log, 20).join("\n");
            if !tail.is_empty() {
                error!(sandbox = id, console = %tail, "guest console at failure");
            }
            e
        };
        let ready_line = ready_line
            .map_err(TaskError::agent(ctx("waiting for the guest agent")))
            .map_err(fail_with_console)?;
        info!(
            sandbox = id,
            vmm_pid,
            uptime_ms = ready_line.uptime_ms,
            "guest agent ready"
        );
        let (agent, hello) = AgentClient::connect_checked(
            Endpoint::Vsock(vspec.vsock_socket.clone()),
            DEFAULT_TIMEOUT,
        )
        .map_err(TaskError::agent(ctx("agent hello")))?;
        info!(sandbox = id, agent_version = %hello.agent_version, kernel = %hello.kernel_release,
            "agent connected");

        let dns = pod_dns(spec, id);
        let setup = SetupSandboxRequest {
            hostname: spec::hostname(spec),
            dns_servers: dns.servers,
            dns_searches: dns.searches,
            dns_options: dns.options,
            share_pid: true,
            sysctls: spec::sysctls(spec),
            ..Default::default()
        };
        let reply = agent
            .setup_sandbox(&setup)
            .map_err(TaskError::agent(ctx("SetupSandbox")))?;
        if let Some(net) = &net {
            let req = network_request(net);
            agent
                .setup_network(&req)
                .map_err(TaskError::agent(ctx("SetupNetwork")))?;
            info!(sandbox = id, mac = %net.mac, addresses = ?net.addresses, "guest network set up");
        }
        drop(net);
        Ok(Arc::new(Pod {
            id: id.to_string(),
            dir,
            config: config.clone(),
            vmm_pid,
            vmm,
            agent,
            slots: Mutex::new(Slots::new(config.drive_slots)),
            ns: GuestNamespaces {
                net: reply.net_ns,
                ipc: reply.ipc_ns,
                uts: reply.uts_ns,
                pid: reply.pid_ns,
            },
            record: Mutex::new(record),
            images: ImageCache::from_config(config),
            ended: Mutex::new(None),
            ended_cv: Condvar::new(),
            stop_requested: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            liveness: Mutex::new(Tracker::new(Instant::now())),
            declared_dead: Mutex::new(None),
            synced: Mutex::new(HashMap::new()),
        }))
    }

    /// Why the VM ended, if it has.
    pub fn ended(&self) -> Option<String> {
        self.ended.lock().ok().and_then(|e| e.clone())
    }

    /// Fails with [`TaskError::VmEnded`] once the VM is gone.
    pub fn check_running(&self) -> Result<(), TaskError> {
        match self.ended() {
            Some(reason) => Err(TaskError::VmEnded {
                sandbox: self.id.clone(),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// Saves the record after `f` changed it.
    pub fn update_record(&self, f: impl FnOnce(&mut PodRecord)) -> Result<(), TaskError> {
        let mut r = self
            .record
            .lock()
            .map_err(|_| TaskError::FailedPrecondition("pod record lock poisoned".into()))?;
        f(&mut r);
        r.save(&self.dir).map_err(TaskError::runtime(format!(
            "sandbox {}: pod record",
            self.id
        )))
    }

    /// Puts `path` into a free drive slot under `serial`.
    pub fn swap_in(&self, serial: &str, path: &Path, read_only: bool) -> Result<u32, TaskError> {
        self.check_running()?;
        let ctx = format!("sandbox {}: drive {serial}", self.id);
        let slot = {
            let mut slots = self
                .slots
                .lock()
                .map_err(|_| TaskError::FailedPrecondition("slot table lock poisoned".into()))?;
            slots.allocate(serial).map_err(TaskError::runtime(&ctx))?
        };
        let result = self
            .vmm
            .lock()
            .map_err(|_| TaskError::FailedPrecondition("VMM lock poisoned".into()))
            .and_then(|v| {
                v.swap(slot, path, read_only, serial)
                    .map_err(TaskError::runtime(&ctx))
            });
        if let Err(e) = result {
            if let Ok(mut s) = self.slots.lock() {
                s.release(serial);
            }
            return Err(e);
        }
        Ok(slot)
    }

    /// Empties the slot holding `serial` (nothing if none does).
    pub fn eject(&self, serial: &str) {
        let slot = self.slots.lock().ok().and_then(|mut s| s.release(serial));
        if let (Some(slot), None) = (slot, self.ended()) {
            if let Ok(v) = self.vmm.lock() {
                if let Err(e) = v.eject(slot) {
                    warn!(sandbox = %self.id, slot, serial, error = %chain(&e), "eject");
                }
            }
        }
    }

    pub fn pause_vm(&self) -> Result<(), TaskError> {
        self.check_running()?;
        let v = self
            .vmm
            .lock()
            .map_err(|_| TaskError::FailedPrecondition("VMM lock poisoned".into()))?;
        v.pause()
            .map_err(TaskError::runtime(format!("sandbox {}: pause", self.id)))?;
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    pub fn resume_vm(&self) -> Result<(), TaskError> {
        self.check_running()?;
        let v = self
            .vmm
            .lock()
            .map_err(|_| TaskError::FailedPrecondition("VMM lock poisoned".into()))?;
        v.resume()
            .map_err(TaskError::runtime(format!("sandbox {}: resume", self.id)))?;
        // The silence of the pause ends now, not at the next ping.
        lock(&self.liveness).excuse(Instant::now());
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// The VMM's stats.
    pub fn vmm_stats(&self) -> Result<vmm_api::Stats, TaskError> {
        self.check_running()?;
        let v = self
            .vmm
            .lock()
            .map_err(|_| TaskError::FailedPrecondition("VMM lock poisoned".into()))?;
        v.stats()
            .map_err(TaskError::runtime(format!("sandbox {}: stats", self.id)))
    }

    /// Stops the VM (control-socket shutdown, SIGKILL after [`SHUTDOWN_TIMEOUT`]) and
    /// waits for it to end.
    pub fn stop(&self) {
        self.stop_requested.store(true, Ordering::SeqCst);
        if self.ended().is_some() {
            return;
        }
        if let Ok(mut v) = self.vmm.lock() {
            if let Err(e) = v.shutdown(SHUTDOWN_TIMEOUT) {
                warn!(sandbox = %self.id, error = %chain(&e), "VMM shutdown");
            }
        }
    }

    /// Blocks until the VMM process has ended, reaps it and records why; returns the
    /// reason. Run by the pod's monitor thread.
    pub fn wait_vm_end(&self) -> String {
        crate::sys::wait_pid_exit(self.vmm_pid);
        // Reap it (we are its parent) and make sure it is really gone.
        let alive = self.vmm.lock().map(|mut v| v.is_alive()).unwrap_or(false);
        if alive {
            // pidfd_open failed for another reason: fall back to polling.
            loop {
                std::thread::sleep(Duration::from_millis(200));
                if !self.vmm.lock().map(|mut v| v.is_alive()).unwrap_or(false) {
                    break;
                }
            }
        }
        let declared = lock(&self.declared_dead).clone();
        let reason = if let Some(why) = declared {
            format!("declared dead: {why}")
        } else if self.stop_requested.load(Ordering::SeqCst) {
            "stopped".to_string()
        } else {
            let log = std::fs::read_to_string(self.dir.join("vmm.log")).unwrap_or_default();
            let tail = crate::error::tail(&log, 600);
            format!("the VMM (pid {}) exited unexpectedly: {tail}", self.vmm_pid)
        };
        if let Ok(mut e) = self.ended.lock() {
            *e = Some(reason.clone());
        }
        self.ended_cv.notify_all();
        reason
    }

    /// The liveness rule ([`crate::liveness`]): the VM does not answer, so it is dead.
    /// Logs its signature once, kills the VMM and waits (bounded) until the pod's monitor
    /// has seen the end, so that the pod's exits follow at once. Idempotent.
    pub fn declare_dead(&self, why: &str) {
        {
            let mut declared = lock(&self.declared_dead);
            if declared.is_some() || self.ended().is_some() {
                drop(declared);
                self.wait_ended(DEAD_VM_END_TIMEOUT);
                return;
            }
            *declared = Some(why.to_string());
        }
        let in_flight: Vec<String> = self
            .agent
            .in_flight()
            .iter()
            .map(|(call, waited)| format!("{call} for {:.1} s", waited.as_secs_f64()))
            .collect();
        let threads = liveness::signature(self.vmm_pid, Duration::from_secs(1));
        let console = last_lines(&self.dir.join("console.log"), 20).join("\n");
        error!(sandbox = %self.id, vmm_pid = self.vmm_pid, why, in_flight = ?in_flight,
            vmm_threads = %threads, console = %console,
            "pod VM declared dead: killing its VMM; every process of the pod is reported exited");
        match self.vmm.lock() {
            Ok(mut v) => {
                if let Err(e) = v.kill() {
                    error!(sandbox = %self.id, error = %chain(&e), "killing the VMM of a dead VM");
                }
            }
            Err(_) => error!(sandbox = %self.id, "VMM lock poisoned: cannot kill the VMM"),
        }
        if !self.wait_ended(DEAD_VM_END_TIMEOUT) {
            error!(sandbox = %self.id, "the VMM of a dead VM has not ended");
        }
    }

    /// Whether the VM was declared dead.
    pub fn is_declared_dead(&self) -> bool {
        lock(&self.declared_dead).is_some()
    }

    /// The idle health check ([`crate::liveness`]): pings the agent until the VM ends,
    /// marks it unresponsive after `unresponsive_after` of silence (with its signature in
    /// the log and `pod.json`), clears the mark when it answers again, and declares it
    /// dead after `dead_after`. Run by the pod's liveness thread.
    pub fn watch_liveness(&self) {
        let rule = self.config.liveness;
        // A ping may take up to `unresponsive_after` to be answered: a guest that is busy
        // but answers within that time is alive, however slow.
        let ping = self.agent.with_timeout(rule.unresponsive_after());
        loop {
            let started = Instant::now();
            let change = if self.paused.load(Ordering::SeqCst) {
                lock(&self.liveness).excuse(started);
                Change::None
            } else {
                match ping.hello() {
                    Ok(_) => lock(&self.liveness).answered(Instant::now()),
                    Err(e) => {
                        debug!(sandbox = %self.id, error = %chain(&e), "health check: no answer");
                        if self.ended().is_some() {
                            return;
                        }
                        // A pause that began while the ping waited excuses its silence.
                        if self.paused.load(Ordering::SeqCst) {
                            Change::None
                        } else {
                            lock(&self.liveness).unanswered(Instant::now(), &rule)
                        }
                    }
                }
            };
            match change {
                Change::None => {}
                Change::Unresponsive { silent } => {
                    let threads = liveness::signature(self.vmm_pid, Duration::from_secs(1));
                    let console = last_lines(&self.dir.join("console.log"), 10).join("\n");
                    error!(sandbox = %self.id, vmm_pid = self.vmm_pid,
                        silent_secs = silent.as_secs(), in_flight = ?self.agent.in_flight(),
                        vmm_threads = %threads, console = %console,
                        "pod VM unresponsive: the agent has not answered");
                    let since = SystemTime::now()
                        .checked_sub(silent)
                        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs());
                    self.record_liveness(|r| {
                        r.unresponsive_since = since;
                        r.unresponsive_count = r.unresponsive_count.saturating_add(1);
                    });
                }
                Change::Recovered { silent } => {
                    warn!(sandbox = %self.id, silent_secs = silent.as_secs(),
                        "pod VM answers again");
                    self.record_liveness(|r| r.unresponsive_since = None);
                }
                Change::Dead { silent } => {
                    self.declare_dead(&format!(
                        "the agent has not answered the health check for {} s \
                         (liveness.dead_after_secs {})",
                        silent.as_secs(),
                        rule.dead_after_secs
                    ));
                    return;
                }
            }
            let rest = rule.ping_interval().saturating_sub(started.elapsed());
            if self.wait_ended(rest) {
                return;
            }
        }
    }

    fn record_liveness(&self, f: impl FnOnce(&mut PodRecord)) {
        if let Err(e) = self.update_record(f) {
            warn!(sandbox = %self.id, error = %chain(&e), "recording the VM's liveness");
        }
    }

    /// Waits up to `timeout` for the VM to have ended; true if it has.
    pub fn wait_ended(&self, timeout: Duration) -> bool {
        let Ok(g) = self.ended.lock() else {
            return false;
        };
        match self
            .ended_cv
            .wait_timeout_while(g, timeout, |e| e.is_none())
        {
            Ok((g, _)) => g.is_some(),
            Err(_) => false,
        }
    }

    /// Copies a host source into the guest and keeps it in sync from now on.
    pub fn copy_in(&self, source: &Path, guest: &str) -> Result<(), files::CopyError> {
        let sig = files::copy_in(&self.agent, source, guest)?;
        if let Ok(mut s) = self.synced.lock() {
            s.insert(source.to_path_buf(), (guest.to_string(), sig));
        }
        Ok(())
    }

    /// One pass of the file sync: copies sources that changed since the last copy.
    pub fn sync_files(&self) {
        let entries: Vec<(PathBuf, String, String)> = match self.synced.lock() {
            Ok(s) => s
                .iter()
                .map(|(k, (g, sig))| (k.clone(), g.clone(), sig.clone()))
                .collect(),
            Err(_) => return,
        };
        for (source, guest, old) in entries {
            let Some(new) = files::signature(&source) else {
                continue; // gone or unreadable for now: keep the guest copy
            };
            if new == old {
                continue;
            }
            match files::copy_in(&self.agent, &source, &guest) {
                Ok(sig) => {
                    info!(sandbox = %self.id, source = %source.display(), guest = %guest,
                        "host file changed: copied again");
                    if let Ok(mut s) = self.synced.lock() {
                        s.insert(source, (guest, sig));
                    }
                }
                Err(e) => warn!(sandbox = %self.id, error = %chain(&e), "file sync"),
            }
        }
    }

    /// Forwards the guest console log into the shim's log, line by line, until the VM
    /// has ended and the log is read to its end.
    pub fn forward_console(&self) {
        let path = self.dir.join("console.log");
        let mut offset = 0u64;
        let mut partial = Vec::new();
        loop {
            let ended = self.ended().is_some();
            if let Ok(mut f) = File::open(&path) {
                if f.seek(SeekFrom::Start(offset)).is_ok() {
                    let mut buf = Vec::new();
                    if let Ok(n) = f.by_ref().take(1 << 20).read_to_end(&mut buf) {
                        offset += n as u64;
                        partial.extend_from_slice(&buf);
                        while let Some(pos) = partial.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = partial.drain(..=pos).collect();
                            let text = String::from_utf8_lossy(&line);
                            let text = text.trim_end();
                            if !text.is_empty() {
                                info!(target: "cocoon::guest", sandbox = %self.id, "{text}");
                            }
                        }
                        if n > 0 {
                            continue;
                        }
                    }
                }
            }
            if ended {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// The agent's SetupNetwork request for the pod network.
fn network_request(net: &crate::podnet::PodNetwork) -> SetupNetworkRequest {
    use cocoon_agent_protocol::api::agent::{Interface, Route};
    SetupNetworkRequest {
        interfaces: vec![Interface {
            mac: net.mac.clone(),
            name: net.veth.clone(),
            mtu: net.mtu,
            addresses: net.addresses.clone(),
            ..Default::default()
        }],
        routes: net
            .routes
            .iter()
            .map(|r| Route {
                destination: r.destination.clone(),
                gateway: r.gateway.clone().unwrap_or_default(),
                device: r.device.clone().unwrap_or_default(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// The last `n` lines of a log file (none if it cannot be read), for failure reports.
fn last_lines(path: &Path, n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pod_dns_reads_the_mounted_resolv_conf() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rc = dir.path().join("resolv.conf");
        std::fs::write(&rc, "nameserver 10.96.0.10\nsearch a.b\n").expect("write");
        let spec =
            json!({"mounts": [{"destination": "/etc/resolv.conf", "source": rc, "type": "bind"}]});
        let dns = pod_dns(&spec, "no-such-sandbox");
        assert_eq!(dns.servers, ["10.96.0.10"]);
        assert_eq!(dns.searches, ["a.b"]);
        assert_eq!(
            pod_dns(&json!({}), "no-such-sandbox-xyz"),
            spec::Dns::default()
        );
    }

    #[test]
    fn network_request_carries_mac_addresses_and_routes() {
        let net = crate::podnet::PodNetwork {
            netns: "/x".into(),
            veth: "eth0".into(),
            tap_name: "cocoon-tap0".into(),
            tap_fd: None,
            mac: "aa:bb:cc:dd:ee:ff".into(),
            mtu: 1450,
            addresses: vec!["10.88.0.5/16".into()],
            routes: vec![crate::podnet::Route {
                destination: "default".into(),
                gateway: Some("10.88.0.1".into()),
                device: Some("eth0".into()),
            }],
        };
        let req = network_request(&net);
        assert_eq!(req.interfaces[0].mac, "aa:bb:cc:dd:ee:ff");
        assert_eq!(req.interfaces[0].mtu, 1450);
        assert_eq!(req.routes[0].gateway, "10.88.0.1");
    }
}
