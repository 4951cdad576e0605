//! `make bench` (agent part): agent call latencies inside one pod VM.
//!
//! - exec round trip: ExecProcess of `true` until WaitProcess returns (50 runs);
//! - container create + start: CreateContainer + StartContainer of a busybox container on
//!   overlay(EROFS image, fresh ext4 writable disk) (20 runs; disk preparation, swap and
//!   AddStorage are outside the timing).
//!
//! Runs where KVM boots stock Linux; here that is the test lab, so the figures are
//! absolute milliseconds of a nested guest under TCG emulation: compare them only with
//! other lab runs. There is no in-VM baseline to divide by.

use cocoon_integration::oci::pod_vm::{PodVm, PodVmConfig};
use cocoon_integration::oci::{busybox_image, writable_disk, PodNamespaces, SpecBuilder};
use cocoon_integration::stats::{median, quantile};
use cocoon_integration::vmtest::{placement, rerun_in_lab, Placement};
use cocoon_runtime::agent::{Rootfs, SetupSandboxRequest, Stdio};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const EXEC_RUNS: usize = 50;
const CREATE_RUNS: usize = 20;
const IMAGE_MOUNT: &str = "/run/pod/image";
/// Writable slots used in turn by the create+start runs.
const ROTATING_SLOTS: usize = 2;

fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        return ExitCode::SUCCESS;
    }
    let result = match placement() {
        Placement::Here { in_lab, .. } => bench(in_lab).map(|_| ExitCode::SUCCESS),
        Placement::Lab { kvm } => {
            eprintln!("bench-agent: this host has {kvm}; running inside the test lab");
            Ok(rerun_in_lab("bench-agent", Duration::from_secs(60 * 60)))
        }
        Placement::Broken { kvm } => Err(format!("KVM in the lab is unusable: {kvm}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bench-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn figure(name: &str, samples: &[f64], place: &str) {
    println!(
        "{name} median={:.1} p90={:.1} runs={} ({place})",
        median(samples).unwrap_or(f64::NAN),
        quantile(samples, 0.9).unwrap_or(f64::NAN),
        samples.len()
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn bench(in_lab: bool) -> Result<(), String> {
    let place = if in_lab {
        "absolute ms, test lab: nested KVM under TCG"
    } else {
        "absolute ms, hardware KVM"
    };
    let vm = PodVm::boot(&PodVmConfig {
        writable_slots: 1 + ROTATING_SLOTS,
        memory_mib: 512,
        vcpus: 2,
    })?;
    let with_console = |e: String| format!("{e}\n{}", vm.transcript());
    let (_, image) = busybox_image(vm.dir()).map_err(|e| format!("busybox image: {e}"))?;
    vm.add_disk(0, &image, "erofs", true, "image0", IMAGE_MOUNT)
        .map_err(with_console)?;
    let sandbox = vm
        .client
        .setup_sandbox(&SetupSandboxRequest {
            hostname: "bench".into(),
            ..Default::default()
        })
        .map_err(|e| with_console(format!("SetupSandbox: {e}")))?;
    let pod = PodNamespaces::from(&sandbox);
    let c = &vm.client;

    // Exec round trips into one sleeping container (slot 1).
    let disk = vm.dir().join("exec.ext4");
    writable_disk(&disk, 64).map_err(|e| e.to_string())?;
    vm.add_disk(1, &disk, "ext4", false, "w-exec", "/run/pod/w-exec")
        .map_err(with_console)?;
    let rootfs = |mount: &str| Rootfs {
        image_mount: IMAGE_MOUNT.into(),
        writable_mount: mount.into(),
        ..Default::default()
    };
    let spec = SpecBuilder::new(&["sleep", "100000"])
        .pod(pod.clone())
        .to_json();
    c.create_container(
        "exec",
        &spec,
        Some(rootfs("/run/pod/w-exec")),
        Stdio::default(),
    )
    .and_then(|_| c.start_container("exec"))
    .map_err(|e| with_console(format!("sleeper container: {e}")))?;
    let process = SpecBuilder::new(&["true"]).process_json();
    let mut exec_ms = Vec::new();
    for i in 0..EXEC_RUNS {
        let id = format!("x{i}");
        let t = Instant::now();
        c.exec_process("exec", &id, &process, Stdio::default())
            .map_err(|e| with_console(format!("ExecProcess {id}: {e}")))?;
        let w = c
            .wait_process("exec", &id, Some(Duration::from_secs(60)))
            .map_err(|e| with_console(format!("WaitProcess {id}: {e}")))?;
        exec_ms.push(ms(t.elapsed()));
        if w.exit_status != 0 {
            return Err(with_console(format!("`true` exited {}", w.exit_status)));
        }
    }
    figure("agent.exec_roundtrip_ms", &exec_ms, place);

    // Create + start, each container on a fresh writable disk in a rotating slot.
    let spec = SpecBuilder::new(&["sleep", "100000"]).pod(pod).to_json();
    let mut create_ms = Vec::new();
    for i in 0..CREATE_RUNS {
        let id = format!("c{i}");
        let slot = 2 + i % ROTATING_SLOTS;
        let mount = format!("/run/pod/w-{id}");
        let disk = vm.dir().join(format!("{id}.ext4"));
        writable_disk(&disk, 64).map_err(|e| e.to_string())?;
        vm.add_disk(slot, &disk, "ext4", false, &format!("w-{id}"), &mount)
            .map_err(with_console)?;
        let t = Instant::now();
        c.create_container(&id, &spec, Some(rootfs(&mount)), Stdio::default())
            .and_then(|_| c.start_container(&id))
            .map_err(|e| with_console(format!("create+start {id}: {e}")))?;
        create_ms.push(ms(t.elapsed()));
        c.remove_container(&id)
            .and_then(|_| c.remove_storage(&mount))
            .map_err(|e| with_console(format!("cleanup {id}: {e}")))?;
        let _ = std::fs::remove_file(&disk);
    }
    figure("agent.create_start_ms", &create_ms, place);
    let out = vm.shutdown()?;
    if out.code() != Some(0) {
        return Err(format!(
            "VMM did not exit 0 after Shutdown:\n{}",
            out.transcript()
        ));
    }
    Ok(())
}
