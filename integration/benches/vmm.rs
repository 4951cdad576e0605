//! `make bench-vmm`: cocoon-vmm against QEMU microvm on the same kernel and initramfs.
//!
//! Guest boots (10 each, selftest power-off) run where KVM boots stock kernels: here, or
//! inside the test lab, where absolute times are those of an emulated machine, so the
//! ratios and exit counts are the figures that matter. First KVM_RUN latency and the
//! VMM's own RSS are measured natively on this host (creating and running a VM works even
//! on PVM, where the guest itself would not boot).

use cocoon_agent_protocol::ReadyLine;
use cocoon_integration::qemu::{boot_guest, Accel, GuestSpec};
use cocoon_integration::stats::{median, quantile};
use cocoon_integration::vmtest::{placement, rerun_in_lab, Placement};
use cocoon_integration::{paths, vmm};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RUNS: usize = 10;
const TIMEOUT: Duration = Duration::from_secs(180);

fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        return ExitCode::SUCCESS;
    }
    let result = match placement() {
        Placement::Here { in_lab: true, .. } => guest_boots(),
        Placement::Here { in_lab: false, .. } => native().and_then(|_| guest_boots()),
        Placement::Lab { kvm } => native().map(|_| {
            eprintln!("bench-vmm: this host has {kvm}; guest boots run inside the test lab");
            rerun_in_lab("bench-vmm", Duration::from_secs(60 * 60))
        }),
        Placement::Broken { kvm } => Err(format!("KVM in the lab is unusable: {kvm}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bench-vmm: {e}");
            ExitCode::FAILURE
        }
    }
}

fn figure(name: &str, samples: &[f64]) -> f64 {
    let m = median(samples).unwrap_or(f64::NAN);
    println!(
        "{name} median={m:.1} p90={:.1} runs={}",
        quantile(samples, 0.9).unwrap_or(f64::NAN),
        samples.len()
    );
    m
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec we pass, which lives on our stack.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// First KVM_RUN after process start, and the VMM's RSS without guest memory.
fn native() -> Result<ExitCode, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (mut first_run, mut rss) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        let log = dir.path().join(format!("vmm{i}.log"));
        let sock = dir.path().join(format!("vmm{i}.sock"));
        let args: Vec<String> = [
            "--kernel",
            &paths::guest_vmlinux().display().to_string(),
            "--initramfs",
            &paths::guest_initramfs().display().to_string(),
            "--serial",
            "none",
            "--log",
            &log.display().to_string(),
            "--control-socket",
            &sock.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let spawned = monotonic_ns();
        let vm = vmm::start(&args).map_err(|e| format!("start cocoon-vmm: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let run_ns = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let found = text
                .lines()
                .find(|l| l.contains("first KVM_RUN"))
                .and_then(|l| l.split("monotonic_ns=").nth(1))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(ns) = found {
                break ns;
            }
            if Instant::now() > deadline {
                return Err(format!("no first KVM_RUN in {}:\n{text}", log.display()));
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        first_run.push(run_ns.saturating_sub(spawned) as f64 / 1e6);
        let stats = vm
            .control(r#"{"op":"stats"}"#)
            .map_err(|e| format!("stats: {e}"))?;
        rss.push(stats["stats"]["vmm_rss_kib"].as_f64().unwrap_or(f64::NAN));
        let _ = vm.control(r#"{"op":"shutdown"}"#);
        let out = vm
            .finish(Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        if out.code() != Some(0) {
            return Err(format!(
                "cocoon-vmm did not shut down cleanly:\n{}",
                out.transcript()
            ));
        }
    }
    figure("vmm.first_run_ms", &first_run);
    println!("vmm.rss_kib={:.0}", median(&rss).unwrap_or(f64::NAN));
    Ok(ExitCode::SUCCESS)
}

/// Polls KVM's per-VM debugfs statistics for the exit count of the VM that appears while
/// it runs (one VM at a time). The last few milliseconds before exit may be missed.
struct ExitCounter {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl ExitCounter {
    fn start() -> Self {
        let root = Path::new("/sys/kernel/debug/kvm");
        let before: Vec<_> = std::fs::read_dir(root)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut max = 0u64;
            while !flag.load(Ordering::Relaxed) {
                for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
                    let name = e.file_name();
                    if before.contains(&name) || !name.to_string_lossy().contains('-') {
                        continue;
                    }
                    let v = std::fs::read_to_string(e.path().join("exits"))
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                        .unwrap_or(0);
                    max = max.max(v);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            max
        });
        ExitCounter { stop, thread }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

struct Boot {
    ready_ms: f64,
    exit_ms: f64,
    exits: f64,
}

fn cocoon_boot() -> Result<Boot, String> {
    let args: Vec<String> = [
        "--kernel",
        &paths::guest_vmlinux().display().to_string(),
        "--initramfs",
        &paths::guest_initramfs().display().to_string(),
        "--cmdline",
        "quiet cocoon.selftest=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let counter = ExitCounter::start();
    let mut vm = vmm::start(&args).map_err(|e| format!("start cocoon-vmm: {e}"))?;
    let ready = vm.wait_for(|l| ReadyLine::parse(l).is_ok(), TIMEOUT);
    let ready_ms = vm.started.elapsed().as_secs_f64() * 1e3;
    let out = vm.finish(TIMEOUT).map_err(|e| e.to_string())?;
    let exits = counter.finish();
    if ready.is_none() || out.code() != Some(0) {
        return Err(format!("cocoon-vmm boot failed:\n{}", out.transcript()));
    }
    Ok(Boot {
        ready_ms,
        exit_ms: out.wall.as_secs_f64() * 1e3,
        exits: exits as f64,
    })
}

fn qemu_boot() -> Result<Boot, String> {
    let mut spec = GuestSpec::selftest(Accel::Kvm);
    // The same kernel parameters cocoon-vmm passes (it adds these itself).
    spec.cmdline_extra.push_str(" pci=off acpi=off");
    spec.timeout = TIMEOUT;
    let counter = ExitCounter::start();
    let b = boot_guest(&spec).map_err(|e| e.to_string())?;
    let exits = counter.finish();
    match (b.ready_at, b.status.and_then(|s| s.code())) {
        (Some(r), Some(0)) => Ok(Boot {
            ready_ms: r.as_secs_f64() * 1e3,
            exit_ms: b.wall.as_secs_f64() * 1e3,
            exits: exits as f64,
        }),
        _ => Err(format!(
            "QEMU boot failed:\n{}\n{}",
            b.console_text(),
            b.qemu_stderr
        )),
    }
}

fn guest_boots() -> Result<ExitCode, String> {
    let (mut ours, mut qemu) = (Vec::new(), Vec::new());
    // Interleaved, so drift in the (emulated) machine's speed hits both alike.
    for _ in 0..RUNS {
        ours.push(cocoon_boot()?);
        qemu.push(qemu_boot()?);
    }
    let col = |v: &[Boot], f: fn(&Boot) -> f64| v.iter().map(f).collect::<Vec<_>>();
    let r1 = figure("vmm.boot_to_ready_ms", &col(&ours, |b| b.ready_ms));
    let q1 = figure("qemu.boot_to_ready_ms", &col(&qemu, |b| b.ready_ms));
    println!("ratio.boot_to_ready cocoon/qemu={:.2}", r1 / q1);
    let r2 = figure("vmm.boot_to_exit_ms", &col(&ours, |b| b.exit_ms));
    let q2 = figure("qemu.boot_to_exit_ms", &col(&qemu, |b| b.exit_ms));
    println!("ratio.boot_to_exit cocoon/qemu={:.2}", r2 / q2);
    let r3 = figure("vmm.boot_exits", &col(&ours, |b| b.exits));
    let q3 = figure("qemu.boot_exits", &col(&qemu, |b| b.exits));
    println!("ratio.boot_exits cocoon/qemu={:.2}", r3 / q3);
    Ok(ExitCode::SUCCESS)
}
