//! `cocoon-demo` (`make demo`): one real Kubernetes-style pod in its own microVM.
//!
//! It starts the test harness's private containerd (with the `cocoon` runtime entry and a
//! CNI bridge of its own), imports the local busybox image, runs a pod with runtime
//! handler `cocoon` whose container prints the kernel it runs under and its hostname,
//! shows that container's CRI log next to this host's kernel, then stops and removes the
//! pod and shuts containerd down (the harness's cleanup leaves nothing behind).
//!
//! On hosts whose KVM cannot boot a stock Linux guest (PVM, none) it says so and runs
//! itself again inside the test lab, as the VM tests do (`cocoon_integration::vmtest`).

use anyhow::{bail, Context};
use cocoon_integration::containerd::{self, Containerd, Options, COCOON};
use cocoon_integration::cri::{self, Cri, LogLine};
use cocoon_integration::vmtest::{placement, rerun_in_lab, Placement};
use cocoon_integration::{image, paths, residue};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The outer host's kernel release, handed into the lab (`COCOON_*` is passed through).
const OUTER_KERNEL_ENV: &str = "COCOON_DEMO_OUTER_KERNEL";
/// The pod's name, and so its hostname.
const POD_NAME: &str = "cocoon-demo";
const CONTAINER_NAME: &str = "hello";
/// The container's command: its kernel (release, build, this boot's random id) and name.
const SCRIPT: &str = r#"echo "kernel: $(uname -r)"; echo "kernel build: $(uname -v)"; echo "boot id: $(cat /proc/sys/kernel/random/boot_id)"; echo "hostname: $(hostname)""#;

fn started() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// A progress line on stderr with the time since the demo started.
fn step(msg: impl AsRef<str>) {
    eprintln!(
        "[{:6.1}s] {}",
        started().elapsed().as_secs_f64(),
        msg.as_ref()
    );
}

/// A `/proc/sys/kernel` value of the kernel this process runs under.
fn kernel_value(name: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/kernel/{name}"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// This kernel's `uname -r`.
fn kernel_release() -> String {
    kernel_value("osrelease")
}

/// The emulated lab is much slower: every wait scales with this.
fn slow() -> u32 {
    if cocoon_integration::vmtest::in_lab() {
        8
    } else {
        1
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s) * slow()
}

/// Where containerd finds the shim: `$COCOON_SHIM_DIR`, else next to this binary
/// (`target/<profile>/`, where `cargo build -p containerd-shim-cocoon-v1` puts it).
fn options() -> Options {
    let mut opts = Options {
        ready_timeout: secs(60),
        ..Options::default()
    };
    if std::env::var_os("COCOON_SHIM_DIR").is_none() {
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(PathBuf::from))
        {
            opts.shim_dirs = vec![dir];
        }
    }
    opts
}

/// The runtime config the shims read: `$COCOON_CONFIG` (`make demo` names the installed
/// one), else the private containerd writes one pointing at this build.
fn runtime_config() -> Option<cocoon_runtime::config::Config> {
    let path = PathBuf::from(std::env::var_os("COCOON_CONFIG")?);
    Some(
        cocoon_runtime::config::Config::load(&path).unwrap_or_else(|e| {
            eprintln!("demo: {e}");
            std::process::exit(1)
        }),
    )
}

/// What the demo needs before any pod can run; checked before booting a lab.
fn preflight(opts: &Options) -> anyhow::Result<()> {
    let (kernel, initramfs) = match runtime_config() {
        Some(c) => (c.kernel, c.initramfs),
        None => (paths::guest_vmlinux(), paths::guest_initramfs()),
    };
    containerd::preflight(
        opts,
        &[("guest kernel", kernel), ("guest initramfs", initramfs)],
    )
    .map_err(anyhow::Error::msg)
}

fn main() -> ExitCode {
    started();
    let opts = options();
    if let Err(e) = preflight(&opts) {
        eprintln!("demo: cannot run: {e:#}");
        return ExitCode::FAILURE;
    }
    match placement() {
        Placement::Here { kvm, in_lab } => {
            if in_lab {
                let outer = std::env::var(OUTER_KERNEL_ENV).unwrap_or_else(|_| "?".into());
                step(format!(
                    "running inside the test lab (lab kernel {}, on a host with kernel {outer}); KVM here: {kvm}",
                    kernel_release()
                ));
            } else {
                step(format!(
                    "running directly on this host (kernel {}): {kvm}",
                    kernel_release()
                ));
            }
            match demo(opts) {
                Ok(()) => {
                    step("demo done: nothing left behind");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    step(format!("demo FAILED: {e:#}"));
                    ExitCode::FAILURE
                }
            }
        }
        Placement::Lab { kvm } => {
            step(format!(
                "this host has {kvm}: its KVM cannot boot a stock Linux guest; \
                 running the demo inside the test lab (QEMU TCG with nested KVM, a few minutes)"
            ));
            // Edition 2021, and no other thread runs yet. The lab passes COCOON_* in.
            std::env::set_var(OUTER_KERNEL_ENV, kernel_release());
            let code = rerun_in_lab("demo", Duration::from_secs(20 * 60));
            step("back on the host");
            code
        }
        Placement::Broken { kvm } => {
            eprintln!(
                "demo: KVM inside the test lab is unusable ({kvm}); the lab kernel is misbuilt"
            );
            ExitCode::FAILURE
        }
    }
}

/// The pod's whole life against a private containerd, which is removed at the end
/// whatever happened.
fn demo(opts: Options) -> anyhow::Result<()> {
    let shim = containerd::find_cocoon_shim(&opts).unwrap_or_default();
    let config = match std::env::var_os("COCOON_CONFIG") {
        Some(c) => PathBuf::from(c).display().to_string(),
        None => "one written for this build".into(),
    };
    step(format!(
        "starting a private containerd (runtime handler {COCOON:?} -> {}, runtime config {config}, \
         CNI bridge) and importing {}",
        shim.display(),
        image::BUSYBOX_REF
    ));
    let ctrd = Containerd::start(opts).context("starting the private containerd")?;
    let needle = ctrd.base.display().to_string();
    let bridge = ctrd.bridge.clone();
    let result = with_containerd(&ctrd);
    if result.is_err() {
        eprintln!("--- containerd log (last lines) ---\n{}", ctrd.log_tail(25));
    }
    step("shutting the private containerd down and cleaning up");
    drop(ctrd);
    let mut left = Vec::new();
    if std::path::Path::new(&needle).exists() {
        left.push(format!("directory {needle}"));
    }
    for p in residue::processes_of(&needle, None) {
        left.push(format!("process {} {}", p.pid, p.comm));
    }
    if std::path::Path::new("/sys/class/net")
        .join(&bridge)
        .exists()
    {
        left.push(format!("bridge {bridge}"));
    }
    result?;
    if !left.is_empty() {
        bail!("left behind after cleanup: {}", left.join(", "));
    }
    Ok(())
}

fn with_containerd(ctrd: &Containerd) -> anyhow::Result<()> {
    let mut cri = Cri::connect(&ctrd.socket, secs(60)).context("connecting to CRI")?;
    let v = cri.version()?;
    step(format!(
        "containerd {} up at {} (CRI {}), bridge {} ({}.0/24)",
        v.runtime_version,
        ctrd.base.display(),
        v.runtime_api_version,
        ctrd.bridge,
        ctrd.subnet_prefix
    ));
    let images = ctrd.ctr(&["images", "list", "-q"])?;
    step(format!(
        "image imported: {}",
        images
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with("sha256:"))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    let pod_config = cri::pod_config(POD_NAME, &ctrd.pod_logs, &ctrd.cgroup_parent);
    step(format!(
        "RunPodSandbox {POD_NAME:?} with runtime handler {COCOON:?} (boots the pod's microVM)"
    ));
    let t = Instant::now();
    let pod = cri
        .run_pod(&pod_config, COCOON)
        .context("RunPodSandbox with the cocoon runtime")?;
    step(format!(
        "pod {} ready in {:.1}s, IP {}",
        &pod[..12.min(pod.len())],
        t.elapsed().as_secs_f64(),
        cri.pod_ip(&pod).unwrap_or_else(|e| format!("? ({e})"))
    ));

    let result = run_container(&mut cri, &pod, &pod_config);

    step(format!("StopPodSandbox + RemovePodSandbox {POD_NAME:?}"));
    let t = Instant::now();
    let stopped = cri.stop_pod(&pod).context("StopPodSandbox");
    let removed = cri.remove_pod(&pod).context("RemovePodSandbox");
    // kubelet's part: the pod's log directory.
    let _ = std::fs::remove_dir_all(&pod_config.log_directory);
    result?;
    stopped?;
    removed?;
    let listed = cri.list_pods()?;
    if listed.iter().any(|p| p.id == pod) {
        bail!("pod {pod} still listed after RemovePodSandbox");
    }
    step(format!(
        "pod stopped and removed in {:.1}s ({} pods listed now)",
        t.elapsed().as_secs_f64(),
        listed.len()
    ));
    Ok(())
}

fn run_container(
    cri: &mut Cri,
    pod: &str,
    pod_config: &k8s_cri::v1::PodSandboxConfig,
) -> anyhow::Result<()> {
    let config = cri::container_config(CONTAINER_NAME, &["sh", "-c", SCRIPT]);
    step(format!(
        "CreateContainer + StartContainer {CONTAINER_NAME:?}: sh -c '{SCRIPT}'"
    ));
    let t = Instant::now();
    let id = cri
        .run_container(pod, &config, pod_config)
        .context("create and start the container")?;
    let st = cri.wait_exited(&id, secs(60))?;
    step(format!(
        "container {} exited {} ({}) after {:.1}s",
        &id[..12.min(id.len())],
        st.exit_code,
        st.reason,
        t.elapsed().as_secs_f64()
    ));

    let path = cri::log_file(pod_config, &config);
    let deadline = Instant::now() + secs(20);
    let log: Vec<LogLine> = loop {
        let log = cri::read_log(&path);
        if log.iter().any(|l| l.text.starts_with("hostname:")) || Instant::now() >= deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let raw = std::fs::read_to_string(&path).unwrap_or_default();
    let rule = "-".repeat(66);
    println!("{rule}");
    println!("container log ({})", path.display());
    println!("{rule}");
    for l in raw.lines() {
        println!("| {l}");
    }
    println!("{rule}");

    let field = |key: &str| {
        log.iter()
            .find_map(|l| l.text.strip_prefix(key).map(str::trim).map(str::to_string))
    };
    let (Some(pod_kernel), Some(pod_build), Some(pod_boot), Some(hostname)) = (
        field("kernel:"),
        field("kernel build:"),
        field("boot id:"),
        field("hostname:"),
    ) else {
        bail!("the container's log lacks its kernel or hostname lines: {log:?}");
    };
    let (node_kernel, node_build, node_boot) = (
        kernel_release(),
        kernel_value("version"),
        kernel_value("random/boot_id"),
    );
    // Inside the lab the node is the lab VM; the machine running `make demo` is outside.
    let (node, outer) = match std::env::var(OUTER_KERNEL_ENV) {
        Ok(k) if cocoon_integration::vmtest::in_lab() => (
            "node (test-lab VM)",
            format!("; the host outside the lab runs {k}"),
        ),
        _ => ("this host", String::new()),
    };
    let own = pod_boot != node_boot;
    let short = |id: &str| id.chars().take(8).collect::<String>();
    println!(
        "comparison: pod `uname -r` {pod_kernel} ({pod_build}, boot id {}) vs {node} \
         {node_kernel} ({node_build}, boot id {}){outer} => {}",
        short(&pod_boot),
        short(&node_boot),
        if own {
            "the pod ran under its own kernel"
        } else {
            "SAME boot: the pod shared the node's kernel!"
        }
    );
    if !own {
        bail!("the container ran under the node's own kernel (same boot id {node_boot})");
    }
    if st.exit_code != 0 {
        bail!("the container exited {} ({})", st.exit_code, st.reason);
    }
    if hostname != POD_NAME {
        bail!("the container's hostname is {hostname:?}, not the pod's {POD_NAME:?}");
    }
    Ok(())
}
