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
use vmm_api::control::Request;

const RUNS: usize = 10;
const TIMEOUT: Duration = Duration::from_secs(180);

fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        return ExitCode::SUCCESS;
    }
    let result = match placement() {
        Placement::Here { in_lab: true, .. } => guest_boots().and_then(|_| throughput()),
        Placement::Here { in_lab: false, .. } => native()
            .and_then(|_| guest_boots())
            .and_then(|_| throughput()),
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
            .control(&Request::Stats {})
            .map_err(|e| format!("stats: {e}"))?;
        rss.push(stats.stats.map_or(f64::NAN, |s| s.vmm_rss_kib as f64));
        let _ = vm.control(&Request::Shutdown {});
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

/// Bytes per stream for throughput figures (the lab is slow: keep runs to seconds).
const TP_BYTES: u64 = 16 << 20;
const TP_RUNS: usize = 3;

/// MB/s through `streams` Unix socketpairs at once: the ceiling for vsock.
fn socketpair_mbps(streams: u64, bytes: u64) -> Result<f64, String> {
    use std::io::{Read, Write};
    let start = Instant::now();
    let mut threads = Vec::new();
    for _ in 0..streams {
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
        threads.push(std::thread::spawn(move || {
            let buf = vec![0u8; 256 * 1024];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                if a.write_all(&buf[..n]).is_err() {
                    return;
                }
                left -= n as u64;
            }
        }));
        threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            while matches!(b.read(&mut buf), Ok(n) if n > 0) {}
        }));
    }
    for t in threads {
        t.join()
            .map_err(|_| "socketpair thread panicked".to_string())?;
    }
    Ok((streams * bytes) as f64 / start.elapsed().as_secs_f64() / 1e6)
}

/// Pushes (`send`) or pulls bytes through the VMM's vsock to the guest probe.
fn vsock_mbps(uds: &Path, port: u32, streams: u64, bytes: u64, send: bool) -> Result<f64, String> {
    use std::io::{Read, Write};
    let start = Instant::now();
    let threads: Vec<_> = (0..streams)
        .map(|_| {
            let uds = uds.to_path_buf();
            std::thread::spawn(move || -> Result<(), String> {
                let mut c = cocoon_integration::vsock::connect(&uds, port)?;
                let mut buf = vec![0u8; 256 * 1024];
                if send {
                    let mut left = bytes;
                    while left > 0 {
                        let n = left.min(buf.len() as u64) as usize;
                        c.write_all(&buf[..n]).map_err(|e| e.to_string())?;
                        left -= n as u64;
                    }
                    c.shutdown(std::net::Shutdown::Write)
                        .map_err(|e| e.to_string())?;
                    let mut count = [0u8; 8];
                    c.read_exact(&mut count).map_err(|e| e.to_string())?;
                    if u64::from_le_bytes(count) != bytes {
                        return Err("guest sink lost bytes".into());
                    }
                } else {
                    c.write_all(&bytes.to_le_bytes())
                        .map_err(|e| e.to_string())?;
                    let mut total = 0u64;
                    loop {
                        let n = c.read(&mut buf).map_err(|e| e.to_string())?;
                        if n == 0 {
                            break;
                        }
                        total += n as u64;
                    }
                    if total != bytes {
                        return Err(format!("got {total} of {bytes} bytes from the guest"));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| "vsock thread panicked".to_string())??;
    }
    Ok((streams * bytes) as f64 / start.elapsed().as_secs_f64() / 1e6)
}

/// Runs the probe in a namespace and returns the `mbps=` it reports.
fn probe_mbps(
    lab: &cocoon_integration::netns::NetLab,
    ns: &str,
    args: &[&str],
) -> Result<f64, String> {
    let probe = paths::probe().display().to_string();
    let mut argv = vec![probe.as_str()];
    argv.extend_from_slice(args);
    let out = lab.command(ns, &argv).output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("mbps="))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("probe {args:?}: {text}"))
}

fn best(samples: Vec<f64>) -> f64 {
    median(&samples).unwrap_or(f64::NAN)
}

fn tp_line(name: &str, ours: f64, ceiling: f64) {
    println!(
        "{name} cocoon_mbps={ours:.0} ceiling_mbps={ceiling:.0} ratio={:.2}",
        ours / ceiling
    );
}

/// vsock and virtio-net throughput beside their ceilings (socketpair, veth), same machine.
fn throughput() -> Result<ExitCode, String> {
    use cocoon_integration::netns::{self, NetLab};
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let uds = dir.path().join("v.sock");
    let script = format!(
        "ip link set eth0 up; ip addr add {}/24 dev eth0; ip route add default via {}; \
         cocoon-vsock-probe serve-sink vsock:5000 & cocoon-vsock-probe serve-source vsock:5001 & \
         cocoon-vsock-probe serve-sink tcp:0:7000 & cocoon-vsock-probe serve-source tcp:0:7001 & \
         sleep 1; echo BENCH-READY; sleep 3600",
        netns::GUEST_IP,
        netns::TAP_IP
    );
    let init = cocoon_integration::testguest::busybox_initramfs_with(
        dir.path(),
        "bench",
        &script,
        &[(&paths::probe(), "bin/cocoon-vsock-probe")],
    )
    .map_err(|e| e.to_string())?;
    let lab = NetLab::new(&format!("b{}", std::process::id())).map_err(|e| e.to_string())?;
    let args: Vec<String> = [
        "--kernel",
        &paths::guest_vmlinux().display().to_string(),
        "--initramfs",
        &init.display().to_string(),
        "--cmdline",
        "quiet",
        "--vcpus",
        "2",
        "--memory-mib",
        "512",
        "--vsock",
        &uds.display().to_string(),
        "--net",
        &format!("tap={},mac=02:00:00:00:00:02", netns::TAP),
        "--log",
        &dir.path().join("vmm.log").display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Per-connection events (opens, resets and why) go to the log.
    std::env::set_var(
        "COCOON_VMM_LOG",
        "info,cocoon_vmm::devices::virtio_vsock=debug",
    );
    let mut vm = vmm::start_in(&["ip", "netns", "exec", &lab.a], &args)
        .map_err(|e| format!("start cocoon-vmm: {e}"))?;
    if vm.wait_for(|l| l == "BENCH-READY", TIMEOUT).is_none() {
        let out = vm
            .finish(Duration::from_secs(1))
            .map_err(|e| e.to_string())?;
        return Err(format!(
            "bench guest did not come up:\n{}",
            out.transcript()
        ));
    }
    // veth ceiling: a sink in B, the sender in A.
    let mut sink = lab
        .command(
            &lab.b,
            &[
                &paths::probe().display().to_string(),
                "serve-sink",
                "tcp:0:7100",
            ],
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(300));
    let peer = format!("tcp:{}:7100", netns::PEER_IP);
    let guest_sink = format!("tcp:{}:7000", netns::GUEST_IP);
    let guest_source = format!("tcp:{}:7001", netns::GUEST_IP);
    let bytes = TP_BYTES.to_string();
    let result = (|| -> Result<(), String> {
        for streams in [1u64, 16] {
            let per = TP_BYTES / streams;
            let ceiling = best(
                (0..TP_RUNS)
                    .map(|_| socketpair_mbps(streams, per))
                    .collect::<Result<_, _>>()?,
            );
            let h2g = best(
                (0..TP_RUNS)
                    .map(|_| vsock_mbps(&uds, 5000, streams, per, true))
                    .collect::<Result<_, _>>()?,
            );
            let g2h = best(
                (0..TP_RUNS)
                    .map(|_| vsock_mbps(&uds, 5001, streams, per, false))
                    .collect::<Result<_, _>>()?,
            );
            tp_line(
                &format!("vsock.host_to_guest streams={streams}"),
                h2g,
                ceiling,
            );
            tp_line(
                &format!("vsock.guest_to_host streams={streams}"),
                g2h,
                ceiling,
            );
        }
        let veth = best(
            (0..TP_RUNS)
                .map(|_| probe_mbps(&lab, &lab.a, &["send", &peer, "1", &bytes]))
                .collect::<Result<_, _>>()?,
        );
        let to_guest = best(
            (0..TP_RUNS)
                .map(|_| probe_mbps(&lab, &lab.b, &["send", &guest_sink, "1", &bytes]))
                .collect::<Result<_, _>>()?,
        );
        let from_guest = best(
            (0..TP_RUNS)
                .map(|_| probe_mbps(&lab, &lab.b, &["recv", &guest_source, "1", &bytes]))
                .collect::<Result<_, _>>()?,
        );
        tp_line("net.tcp_peer_to_guest streams=1", to_guest, veth);
        tp_line("net.tcp_guest_to_peer streams=1", from_guest, veth);
        Ok(())
    })();
    let _ = sink.kill();
    let _ = sink.wait();
    drop(vm);
    result.map(|_| ExitCode::SUCCESS).map_err(|e| {
        // Every connection reset is logged with its reason: show them with the failure.
        let log = std::fs::read_to_string(dir.path().join("vmm.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "{e}\n--- cocoon-vmm log (last lines) ---\n{}",
            tail.join("\n")
        )
    })
}
