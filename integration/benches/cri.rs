//! `cargo bench -p cocoon-integration --bench cri`: runc against cocoon through the CRI,
//! in one run, on one private containerd (`cocoon_integration::containerd`) with the same
//! busybox image and CNI bridge for both runtime handlers.
//!
//! Per handler, `$COCOON_BENCH_ITERS` iterations (default 20) of: RunPodSandbox;
//! CreateContainer + StartContainer; the full cycle (run pod, container output seen in
//! its log, stop + remove; the ExecSync in between is not counted); ExecSync `true`.
//! Then the host memory of one idle pod (PSS of every process the pod added, plus the
//! guest memory a cocoon VM touched), and density: idle pods started one after another
//! until a RunPodSandbox is too slow (over 1 s; see [`start_limit`] for the lab), memory
//! runs short or `$COCOON_BENCH_MAX_PODS` (default 100) is reached. `make bench` runs
//! release builds: the static `build/cocoon-vmm` and the shim from `target/release`.
//!
//! Both handlers need a KVM that boots Linux for cocoon: where this host has none (PVM)
//! the whole bench runs inside the test lab, both handlers there, and the figures come
//! back to this host's stdout. Lab timings are those of an emulated machine.

use anyhow::{anyhow, bail, Context};
use cocoon_integration::containerd::{self, Containerd, Options, COCOON, RUNC};
use cocoon_integration::cri::{self, Cri};
use cocoon_integration::lab::{Lab, Outcome};
use cocoon_integration::stats::{median, quantile};
use cocoon_integration::vmtest::{in_lab, placement, run_self_in_lab, says_guest_reset, Placement};
use cocoon_integration::{paths, residue, vmm};
use k8s_cri::v1::PodSandboxConfig;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use vmm_api::control::Request;

/// The file (under `$COCOON_LAB_OUT`) the figures come back from the lab in.
const FIGURES: &str = "cri-bench-figures.txt";
const CONTAINER: &str = "bench";
const READY: &str = "bench-ready";

/// The emulated lab is much slower: waits, and the density limit, scale with this.
fn slow() -> u32 {
    if in_lab() {
        8
    } else {
        1
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s) * slow()
}

/// When density stops: a RunPodSandbox over 1 s. In the lab everything is emulated, a
/// VM's boot far more than a runc container's, so one fixed limit would measure the
/// emulator: there the limit is the larger of 8 s and 3x the handler's own median start
/// (`median_ms`), i.e. density until starts slow down markedly under the load of the pods.
fn start_limit(median_ms: f64) -> Duration {
    if slow() > 1 {
        (Duration::from_secs(1) * slow()).max(Duration::from_secs_f64(3.0 * median_ms / 1e3))
    } else {
        Duration::from_secs(1)
    }
}

fn env_usize(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        return ExitCode::SUCCESS;
    }
    let opts = options();
    if let Err(e) = preflight(&opts) {
        eprintln!("bench-cri: cannot run: {e:#}");
        return ExitCode::FAILURE;
    }
    let result = match placement() {
        Placement::Here { kvm, in_lab } => {
            eprintln!(
                "bench-cri: {kvm}: running {}",
                if in_lab {
                    "inside the test lab"
                } else {
                    "directly on this host"
                }
            );
            bench(opts)
        }
        Placement::Lab { kvm } => {
            eprintln!(
                "bench-cri: this host has {kvm}; running the whole bench (runc and cocoon, \
                 one containerd) inside the test lab"
            );
            in_the_lab()
        }
        Placement::Broken { kvm } => Err(anyhow!("KVM inside the test lab is unusable: {kvm}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-cri: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Where containerd finds the shim: `$COCOON_SHIM_DIR`, else `target/<bench profile>`
/// or `target/debug` (where `cargo build -p containerd-shim-cocoon-v1` puts it).
fn options() -> Options {
    let mut opts = Options {
        ready_timeout: secs(60),
        ..Options::default()
    };
    if std::env::var_os("COCOON_SHIM_DIR").is_none() {
        let mut dirs = containerd::default_shim_dirs();
        dirs.push(paths::repo_root().join("target/debug"));
        dirs.retain(|d| d.join(containerd::COCOON_SHIM).is_file());
        dirs.truncate(1);
        if !dirs.is_empty() {
            opts.shim_dirs = dirs;
        }
    }
    opts
}

fn preflight(opts: &Options) -> anyhow::Result<()> {
    containerd::preflight(
        opts,
        &[
            ("cocoon-vmm", vmm::vmm_binary()),
            ("guest kernel", paths::guest_vmlinux()),
            ("guest initramfs", paths::guest_initramfs()),
        ],
    )
    .map_err(anyhow::Error::msg)
}

/// Runs this bench again inside one lab boot; prints the figures it writes there.
fn in_the_lab() -> anyhow::Result<()> {
    let mut lab = Lab::from_build()?;
    // Room for the density run's idle pods (VMs touch their memory lazily): most of what
    // this host has free, up to 16 GiB, or $COCOON_BENCH_LAB_MEMORY_MIB.
    let (avail_kib, _) = meminfo();
    let room = u32::try_from(avail_kib / 1024 * 3 / 4).unwrap_or(u32::MAX);
    lab.memory_mib = std::env::var("COCOON_BENCH_LAB_MEMORY_MIB")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| room.clamp(lab.memory_mib, 16384));
    let out = tempfile::tempdir()?;
    let run = run_self_in_lab(
        "bench-cri",
        &lab,
        Duration::from_secs(90 * 60),
        Some(out.path().to_path_buf()),
    )?;
    if run.outcome != Outcome::Exited(0) {
        bail!(
            "the bench inside the lab: {}\n--- last console lines ---\n{}",
            run.outcome,
            run.console_tail(40)
        );
    }
    let figures = std::fs::read_to_string(out.path().join(FIGURES))
        .context("the figures file did not come back from the lab")?;
    print!("{figures}");
    Ok(())
}

/// Prints one figure line and keeps it for the lab's output file.
fn emit(out: &mut String, line: String) {
    println!("{line}");
    let _ = writeln!(out, "{line}");
}

fn bench(opts: Options) -> anyhow::Result<()> {
    let iters = env_usize("COCOON_BENCH_ITERS", 20);
    let max_pods = env_usize("COCOON_BENCH_MAX_PODS", 100);
    let shim = containerd::find_cocoon_shim(&opts).unwrap_or_default();
    let ctrd = Containerd::start(opts).context("starting the private containerd")?;
    let result = (|| {
        let mut cri = Cri::connect(&ctrd.socket, secs(60))
            .with_context(|| format!("containerd log:\n{}", ctrd.log_tail(20)))?;
        let v = cri.version()?;
        let mut out = String::new();
        let place = if in_lab() {
            "inside the test lab (QEMU TCG, nested KVM): timings are EMULATED, compare ratios"
        } else {
            "directly on this host: native timings"
        };
        emit(
            &mut out,
            format!(
                "bench.setup containerd {} iters={iters} max_pods={max_pods} shim={} vmm={}; {place}",
                v.runtime_version,
                shim.display(),
                vmm::vmm_binary().display()
            ),
        );
        let mut b = Bench {
            ctrd: &ctrd,
            cri,
            pods: Vec::new(),
        };
        let r = b.all(iters, max_pods, &mut out);
        let errors = b.remove_all();
        r?;
        if !errors.is_empty() {
            bail!("cleanup: {}", errors.join("; "));
        }
        if let Some(dir) = std::env::var_os("COCOON_LAB_OUT") {
            std::fs::write(Path::new(&dir).join(FIGURES), &out)?;
        }
        Ok(())
    })();
    if result.is_err() {
        eprintln!("--- containerd log (last lines) ---\n{}", ctrd.log_tail(25));
    }
    result
}

#[derive(Default)]
struct Samples {
    runp: Vec<f64>,
    start: Vec<f64>,
    cycle: Vec<f64>,
    exec: Vec<f64>,
}

struct Memory {
    pss_mib: f64,
    procs: String,
    guest_touched_mib: Option<f64>,
}

struct Density {
    count: usize,
    stopped_by: String,
    /// PSS of every host process the running pods added, per pod (pages shared between
    /// pods, such as binaries and the guest kernel's file-backed text, split among them).
    pss_per_pod_mib: f64,
}

struct Bench<'a> {
    ctrd: &'a Containerd,
    cri: Cri,
    /// Pods running now (removed at the end whatever happens).
    pods: Vec<(String, PodSandboxConfig)>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Bench<'_> {
    fn all(&mut self, iters: usize, max_pods: usize, out: &mut String) -> anyhow::Result<()> {
        let mut samples = Vec::new();
        let mut memory = Vec::new();
        for handler in [RUNC, COCOON] {
            eprintln!("bench-cri: {handler}: warm-up pod");
            self.iteration(handler, "warmup", &mut Samples::default())
                .with_context(|| format!("{handler}: warm-up pod"))?;
            let mut s = Samples::default();
            for i in 0..iters {
                self.iteration(handler, &format!("it{i}"), &mut s)
                    .with_context(|| format!("{handler}: iteration {i}"))?;
            }
            eprintln!("bench-cri: {handler}: {iters} iterations done");
            samples.push(s);
            memory.push(
                self.idle_memory(handler)
                    .with_context(|| format!("{handler}: idle pod memory"))?,
            );
        }
        let line = |name: &str, get: fn(&Samples) -> &Vec<f64>| {
            let (r, c) = (get(&samples[0]), get(&samples[1]));
            let q = |v: &[f64], q: f64| quantile(v, q).unwrap_or(f64::NAN);
            format!(
                "{name} runc median={:.1} p90={:.1} cocoon median={:.1} p90={:.1} ratio={:.2}",
                q(r, 0.5),
                q(r, 0.9),
                q(c, 0.5),
                q(c, 0.9),
                median(c).unwrap_or(f64::NAN) / median(r).unwrap_or(f64::NAN)
            )
        };
        emit(out, line("bench.runp_ms", |s| &s.runp));
        emit(out, line("bench.create_start_ms", |s| &s.start));
        emit(out, line("bench.pod_cycle_ms", |s| &s.cycle));
        emit(out, line("bench.exec_sync_ms", |s| &s.exec));
        let touched = memory[1]
            .guest_touched_mib
            .map(|m| format!("{m:.1}"))
            .unwrap_or_else(|| "?".into());
        emit(
            out,
            format!(
                "bench.idle_pod_pss_mib runc={:.1} cocoon={:.1} ratio={:.2} (one pod alone; cocoon \
                 guest touched {touched} MiB, part of the VMM's PSS; processes: runc {}; cocoon {})",
                memory[0].pss_mib,
                memory[1].pss_mib,
                memory[1].pss_mib / memory[0].pss_mib,
                memory[0].procs,
                memory[1].procs
            ),
        );
        let mut density = Vec::new();
        let mut limits = Vec::new();
        for (handler, s) in [RUNC, COCOON].into_iter().zip(&samples) {
            let limit = start_limit(median(&s.runp).unwrap_or(0.0));
            eprintln!(
                "bench-cri: {handler}: density (RunPodSandbox limit {:.1} s)",
                limit.as_secs_f64()
            );
            density.push(self.density(handler, max_pods, limit)?);
            limits.push(limit);
        }
        let rule = if slow() > 1 {
            "emulated machine: the 1 s limit becomes the larger of 8 s and 3x the handler's \
             own median RunPodSandbox above"
        } else {
            "the 1 s limit"
        };
        emit(
            out,
            format!(
                "bench.idle_pod_pss_at_density_mib runc={:.1} cocoon={:.1} ratio={:.2} \
                 (per pod with runc {} and cocoon {} idle pods running: shared pages split)",
                density[0].pss_per_pod_mib,
                density[1].pss_per_pod_mib,
                density[1].pss_per_pod_mib / density[0].pss_per_pod_mib,
                density[0].count,
                density[1].count
            ),
        );
        emit(
            out,
            format!(
                "bench.idle_pods runc={} cocoon={} ratio={:.2} (stopped by: runc {}; cocoon {}; \
                 RunPodSandbox limit runc {:.1} s, cocoon {:.1} s: {rule})",
                density[0].count,
                density[1].count,
                density[1].count as f64 / density[0].count.max(1) as f64,
                density[0].stopped_by,
                density[1].stopped_by,
                limits[0].as_secs_f64(),
                limits[1].as_secs_f64()
            ),
        );
        Ok(())
    }

    fn run_pod(&mut self, name: &str, handler: &str) -> anyhow::Result<(String, Duration)> {
        let config = cri::pod_config(name, &self.ctrd.pod_logs, &self.ctrd.cgroup_parent);
        let t = Instant::now();
        let id = self
            .cri
            .run_pod(&config, handler)
            .with_context(|| format!("RunPodSandbox {name} with {handler}"))?;
        let took = t.elapsed();
        self.pods.push((id.clone(), config));
        Ok((id, took))
    }

    fn config_of(&self, id: &str) -> PodSandboxConfig {
        self.pods
            .iter()
            .find(|(p, _)| p == id)
            .map(|(_, c)| c.clone())
            .unwrap_or_default()
    }

    /// Stops and removes one pod and its log directory (kubelet's part).
    fn remove_pod(&mut self, id: &str) -> anyhow::Result<()> {
        let config = self.config_of(id);
        self.pods.retain(|(p, _)| p != id);
        let stopped = self.cri.stop_pod(id).context("StopPodSandbox");
        let removed = self.cri.remove_pod(id).context("RemovePodSandbox");
        let _ = std::fs::remove_dir_all(&config.log_directory);
        stopped?;
        removed?;
        Ok(())
    }

    fn remove_all(&mut self) -> Vec<String> {
        let ids: Vec<String> = self.pods.iter().map(|(p, _)| p.clone()).collect();
        ids.iter()
            .filter_map(|id| self.remove_pod(id).err().map(|e| format!("{id}: {e:#}")))
            .collect()
    }

    /// Starts a container that prints [`READY`] and then sleeps; returns its id once the
    /// line is in its log, and the CreateContainer + StartContainer time.
    fn ready_container(&mut self, pod: &str) -> anyhow::Result<(String, Duration)> {
        let pod_config = self.config_of(pod);
        let config = cri::container_config(
            CONTAINER,
            &["sh", "-c", &format!("echo {READY}; exec sleep 3600")],
        );
        let t = Instant::now();
        let id = self
            .cri
            .run_container(pod, &config, &pod_config)
            .context("CreateContainer + StartContainer")?;
        let took = t.elapsed();
        let path = cri::log_file(&pod_config, &config);
        let deadline = Instant::now() + secs(20);
        while !cri::read_log(&path).iter().any(|l| l.text == READY) {
            if Instant::now() >= deadline {
                bail!("no {READY:?} in {}", path.display());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok((id, took))
    }

    /// One pod: run, container up and logging, ExecSync, stop + remove.
    fn iteration(&mut self, handler: &str, name: &str, s: &mut Samples) -> anyhow::Result<()> {
        let t = Instant::now();
        let (pod, runp) = self.run_pod(name, handler)?;
        let (id, start) = self.ready_container(&pod)?;
        let up = t.elapsed();
        let e = Instant::now();
        let r = self
            .cri
            .exec_sync(&id, &["true"], secs(30).as_secs() as i64)
            .context("ExecSync true")?;
        let exec = e.elapsed();
        if r.exit_code != 0 {
            bail!("ExecSync true exited {}", r.exit_code);
        }
        let d = Instant::now();
        self.remove_pod(&pod)?;
        let down = d.elapsed();
        s.runp.push(ms(runp));
        s.start.push(ms(start));
        s.cycle.push(ms(up + down));
        s.exec.push(ms(exec));
        Ok(())
    }

    /// Every process the pod added on the host, and their PSS; for cocoon the guest
    /// memory its VM touched (the VMM's control socket).
    fn idle_memory(&mut self, handler: &str) -> anyhow::Result<Memory> {
        let needle = self.ctrd.base.display().to_string();
        let before: BTreeSet<i32> = residue::processes_of(&needle, self.ctrd.pid())
            .iter()
            .map(|p| p.pid)
            .collect();
        let (pod, _) = self.run_pod("idle", handler)?;
        let (_, _) = self.ready_container(&pod)?;
        // Let the guest (or the container) settle after starting.
        std::thread::sleep(secs(3));
        let added: Vec<_> = residue::processes_of(&needle, self.ctrd.pid())
            .into_iter()
            .filter(|p| !before.contains(&p.pid))
            .collect();
        let mut pss_kib = 0u64;
        let mut procs = Vec::new();
        for p in &added {
            let kib =
                pss_kib_of(p.pid).with_context(|| format!("PSS of {} ({})", p.pid, p.comm))?;
            pss_kib += kib;
            procs.push(format!("{}={:.1}", p.comm, kib as f64 / 1024.0));
        }
        let guest_touched_mib = if handler == COCOON {
            let config_path = std::env::var_os("COCOON_CONFIG")
                .map(PathBuf::from)
                .unwrap_or_else(|| self.ctrd.cocoon_config.clone());
            let config =
                cocoon_runtime::config::Config::load(&config_path).map_err(|e| anyhow!("{e}"))?;
            let sock = config.sandbox_dir(&pod).join("control.sock");
            let stats = vmm::control_request(&sock, &Request::Stats {})
                .with_context(|| format!("stats on {}", sock.display()))?
                .stats
                .ok_or_else(|| anyhow!("a stats reply without stats from {}", sock.display()))?;
            Some(stats.guest_touched_kib as f64 / 1024.0)
        } else {
            None
        };
        self.remove_pod(&pod)?;
        Ok(Memory {
            pss_mib: pss_kib as f64 / 1024.0,
            procs: procs.join(" "),
            guest_touched_mib,
        })
    }

    /// Idle pods one after another until one RunPodSandbox takes over `limit`,
    /// MemAvailable drops under 10% of MemTotal, a start fails, or `max` pods run.
    fn density(&mut self, handler: &str, max: usize, limit: Duration) -> anyhow::Result<Density> {
        let needle = self.ctrd.base.display().to_string();
        let before: BTreeSet<i32> = residue::processes_of(&needle, self.ctrd.pid())
            .iter()
            .map(|p| p.pid)
            .collect();
        let mut ids = Vec::new();
        let mut stopped_by = format!("max pods ({max})");
        // Lab guests that reset during boot (docs/test-lab.md), passed over: up to 3.
        let mut lab_resets = 0;
        while ids.len() < max {
            let (avail, total) = meminfo();
            if avail * 10 < total {
                stopped_by = format!(
                    "MemAvailable {} MiB < 10% of {} MiB",
                    avail / 1024,
                    total / 1024
                );
                break;
            }
            match self.run_pod(&format!("idle{}", ids.len()), handler) {
                Ok((id, took)) => {
                    ids.push(id);
                    if took > limit {
                        stopped_by = format!(
                            "RunPodSandbox of pod {} took {:.2} s",
                            ids.len(),
                            took.as_secs_f64()
                        );
                        // The slow one started, but past the limit: not counted.
                        let count = ids.len() - 1;
                        let pss_per_pod_mib = self.pss_per_pod(&needle, &before, ids.len());
                        self.remove_density(&ids)?;
                        return Ok(Density {
                            count,
                            stopped_by,
                            pss_per_pod_mib,
                        });
                    }
                }
                Err(e) if in_lab() && lab_resets < 3 && says_guest_reset(&format!("{e:#}")) => {
                    lab_resets += 1;
                    eprintln!(
                        "bench-cri: {handler}: pod {} reset during boot (lab fault {lab_resets} \
                         of at most 3 passed over): {e:#}",
                        ids.len() + 1
                    );
                }
                Err(e) => {
                    stopped_by = format!("RunPodSandbox {} failed: {e:#}", ids.len() + 1);
                    // The shim logged the guest console of a VM that did not come up.
                    eprintln!(
                        "bench-cri: {handler}: {stopped_by}\n--- containerd log (last lines) ---\n{}",
                        self.ctrd.log_tail(80)
                    );
                    break;
                }
            }
        }
        if lab_resets > 0 {
            stopped_by.push_str(&format!(", {lab_resets} lab guest resets passed over"));
        }
        let count = ids.len();
        let pss_per_pod_mib = self.pss_per_pod(&needle, &before, count);
        self.remove_density(&ids)?;
        Ok(Density {
            count,
            stopped_by,
            pss_per_pod_mib,
        })
    }

    /// The PSS of the processes that are not in `before`, divided among `pods`.
    fn pss_per_pod(&self, needle: &str, before: &BTreeSet<i32>, pods: usize) -> f64 {
        let kib: u64 = residue::processes_of(needle, self.ctrd.pid())
            .iter()
            .filter(|p| !before.contains(&p.pid))
            // A process that ended meanwhile costs nothing.
            .filter_map(|p| pss_kib_of(p.pid).ok())
            .sum();
        kib as f64 / 1024.0 / pods.max(1) as f64
    }

    fn remove_density(&mut self, ids: &[String]) -> anyhow::Result<()> {
        let t = Instant::now();
        let errors: Vec<String> = ids
            .iter()
            .filter_map(|id| self.remove_pod(id).err().map(|e| format!("{id}: {e:#}")))
            .collect();
        eprintln!(
            "bench-cri: removed {} pods in {:.1}s",
            ids.len(),
            t.elapsed().as_secs_f64()
        );
        if !errors.is_empty() {
            bail!("removing pods: {}", errors.join("; "));
        }
        Ok(())
    }
}

/// `Pss:` of `/proc/<pid>/smaps_rollup`, in KiB.
fn pss_kib_of(pid: i32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no Pss in smaps_rollup of {pid}"))
}

/// (MemAvailable, MemTotal) in KiB.
fn meminfo() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("MemAvailable:"), get("MemTotal:"))
}
