//! The real agent in a real pod VM: `cocoon-vmm` boots `build/vmlinux` with
//! `build/initramfs.cpio` (the agent as `/init`) and the host drives it through the
//! runtime's agent client over hybrid vsock. Image and writable disks are swapped into
//! empty drive slots, as the runtime will do.
//!
//! One VM serves every check (booted on first use; trials run one at a time in the lab):
//! each check uses its own container and writable disk. On hosts without a KVM that boots
//! stock Linux, the harness reruns this binary inside one test-lab boot.

use cocoon_agent_protocol::api::event::Kind;
use cocoon_agent_protocol::stdio::{StdioHeader, Stream};
use cocoon_agent_protocol::PROTOCOL_VERSION;
use cocoon_integration::oci::pod_vm::{PodVm, PodVmConfig};
use cocoon_integration::oci::{busybox_image, writable_disk, PodNamespaces, SpecBuilder};
use cocoon_integration::testguest::ext4_cat;
use cocoon_runtime::agent::{Rootfs, SetupSandboxRequest, Stdio};
use libtest_mimic::{Failed, Trial};
use std::io::Read;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const IMAGE_MOUNT: &str = "/run/pod/image";
const HOSTNAME: &str = "agent-vm-test";
/// Writable slots: one per check that needs a container.
const WRITABLE_SLOTS: usize = 5;
/// Output and waits in the nested, emulated guest.
const WAIT: Duration = Duration::from_secs(60);

/// The shared pod: the VM, the pod's namespaces, the next free writable slot.
struct Pod {
    vm: PodVm,
    ns: PodNamespaces,
    next_slot: usize,
}

static POD: Mutex<Option<Result<Pod, String>>> = Mutex::new(None);

fn main() -> ExitCode {
    let code = cocoon_integration::vmtest::main(vec![
        Trial::test("agent_vm_hello_and_sandbox", hello_and_sandbox),
        Trial::test(
            "agent_vm_overlay_container_output_exit_and_persistence",
            overlay_container_output_exit_and_persistence,
        ),
        Trial::test(
            "agent_vm_exec_into_running_container",
            exec_into_running_container,
        ),
        Trial::test("agent_vm_sigterm_gives_143", sigterm_gives_143),
        Trial::test(
            "agent_vm_tty_resize_seen_by_process",
            tty_resize_seen_by_process,
        ),
        Trial::test("agent_vm_memory_limit_oom_kills", memory_limit_oom_kills),
        Trial::test("agent_vm_shutdown_powers_off", shutdown_powers_off),
    ]);
    // A run filtered to some trials leaves the VM up: end it (killed on drop).
    let leftover = POD.lock().map(|mut p| p.take()).unwrap_or(None);
    drop(leftover);
    code
}

/// Boots the pod: VM, Hello, the busybox EROFS image in slot 0, SetupSandbox.
fn boot_pod() -> Result<Pod, String> {
    let vm = PodVm::boot(&PodVmConfig {
        writable_slots: WRITABLE_SLOTS,
        memory_mib: 512,
        vcpus: 2,
    })?;
    let (_, image) = busybox_image(vm.dir()).map_err(|e| format!("busybox image: {e}"))?;
    let fail = |what: String| format!("{what}\n{}", vm.transcript());
    vm.add_disk(0, &image, "erofs", true, "image0", IMAGE_MOUNT)
        .map_err(fail)?;
    let sandbox = vm
        .client
        .setup_sandbox(&SetupSandboxRequest {
            hostname: HOSTNAME.into(),
            ..Default::default()
        })
        .map_err(|e| fail(format!("SetupSandbox: {e}")))?;
    let ns = PodNamespaces::from(&sandbox);
    eprintln!(
        "agent_vm: pod up (agent ready at guest uptime {} ms, agent {}, kernel {}), namespaces {ns:?}",
        vm.ready.uptime_ms, vm.hello.agent_version, vm.hello.kernel_release
    );
    Ok(Pod {
        vm,
        ns,
        next_slot: 1,
    })
}

fn with_pod<T>(f: impl FnOnce(&mut Pod) -> Result<T, Failed>) -> Result<T, Failed> {
    let mut guard = POD.lock().unwrap_or_else(|p| p.into_inner());
    match guard.get_or_insert_with(boot_pod) {
        Ok(pod) => f(pod),
        Err(e) => Err(format!("the pod VM did not come up: {e}").into()),
    }
}

impl Pod {
    /// A failure message with the guest's console attached.
    fn fail(&self, what: impl std::fmt::Display) -> Failed {
        format!("{what}\n{}", self.vm.transcript()).into()
    }

    fn check(&self, cond: bool, what: impl std::fmt::Display) -> Result<(), Failed> {
        if cond {
            Ok(())
        } else {
            Err(self.fail(what))
        }
    }

    /// A fresh ext4 disk in the next writable slot, mounted for container `id`. Returns
    /// the host file and the guest mount point.
    fn writable(&mut self, id: &str) -> Result<(std::path::PathBuf, String), Failed> {
        if self.next_slot >= self.vm.slots {
            return Err(format!("no free drive slot for {id}: raise WRITABLE_SLOTS").into());
        }
        let slot = self.next_slot;
        self.next_slot += 1;
        let file = self.vm.dir().join(format!("{id}.ext4"));
        writable_disk(&file, 64).map_err(|e| format!("writable disk for {id}: {e}"))?;
        let mount = format!("/run/pod/w-{id}");
        self.vm
            .add_disk(slot, &file, "ext4", false, &format!("w-{id}"), &mount)
            .map_err(|e| self.fail(e))?;
        Ok((file, mount))
    }

    /// Creates and starts container `id` on the pod image with its own writable disk;
    /// returns the writable disk's host file and its guest mount point.
    fn run(
        &mut self,
        id: &str,
        spec: SpecBuilder,
        stdio: Stdio,
        before_start: impl FnOnce(&Pod) -> Result<(), Failed>,
    ) -> Result<(std::path::PathBuf, String), Failed> {
        let (file, mount) = self.writable(id)?;
        let rootfs = Rootfs {
            image_mount: IMAGE_MOUNT.into(),
            writable_mount: mount.clone(),
            ..Default::default()
        };
        let spec = spec.pod(self.ns.clone()).to_json();
        self.vm
            .client
            .create_container(id, &spec, Some(rootfs), stdio)
            .map_err(|e| self.fail(format!("CreateContainer {id}: {e}")))?;
        before_start(self)?;
        self.vm
            .client
            .start_container(id)
            .map_err(|e| self.fail(format!("StartContainer {id}: {e}")))?;
        Ok((file, mount))
    }

    fn stdout(&self, id: &str, exec: &str) -> Result<std::os::unix::net::UnixStream, Failed> {
        let header = StdioHeader {
            container_id: id.into(),
            exec_id: exec.into(),
            stream: Stream::Stdout,
        };
        let s = self
            .vm
            .client
            .open_stdio(&header)
            .map_err(|e| self.fail(format!("open stdout of {id}/{exec}: {e}")))?;
        s.set_read_timeout(Some(WAIT))
            .map_err(|e| format!("stream timeout: {e}"))?;
        Ok(s)
    }

    fn read_all(
        &self,
        mut s: std::os::unix::net::UnixStream,
        what: &str,
    ) -> Result<String, Failed> {
        let mut out = Vec::new();
        match s.read_to_end(&mut out) {
            Ok(_) => Ok(String::from_utf8_lossy(&out).into_owned()),
            Err(e) => Err(self.fail(format!(
                "reading {what}: {e} (so far: {:?})",
                String::from_utf8_lossy(&out)
            ))),
        }
    }

    fn wait(
        &self,
        id: &str,
        exec: &str,
    ) -> Result<cocoon_runtime::agent::WaitProcessResponse, Failed> {
        self.vm
            .client
            .wait_process(id, exec, Some(WAIT))
            .map_err(|e| self.fail(format!("WaitProcess {id}/{exec}: {e}")))
    }

    /// Collects events until `found` says enough or the wait runs out.
    fn events_until(&self, mut found: impl FnMut(&Kind) -> bool) -> Result<bool, Failed> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let events = self
                .vm
                .client
                .get_events(Duration::from_secs(2))
                .map_err(|e| self.fail(format!("GetEvents: {e}")))?;
            if events
                .iter()
                .filter_map(|e| e.kind.as_ref())
                .any(&mut found)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

fn stdout_only() -> Stdio {
    Stdio {
        stdout: true,
        ..Default::default()
    }
}

fn hello_and_sandbox() -> Result<(), Failed> {
    with_pod(|pod| {
        let hello = pod
            .vm
            .client
            .hello()
            .map_err(|e| pod.fail(format!("Hello: {e}")))?;
        pod.check(
            hello.protocol_version == PROTOCOL_VERSION,
            format!("agent protocol version {}", hello.protocol_version),
        )?;
        pod.check(
            hello.uptime_ms >= pod.vm.ready.uptime_ms,
            format!(
                "Hello uptime {} ms is before the ready report's {} ms",
                hello.uptime_ms, pod.vm.ready.uptime_ms
            ),
        )?;
        pod.check(
            !pod.ns.net.is_empty() && !pod.ns.ipc.is_empty() && !pod.ns.uts.is_empty(),
            format!("SetupSandbox returned no namespace paths: {:?}", pod.ns),
        )
    })
}

/// A container on overlay(EROFS image, ext4 writable): its output, exit code, the pod's
/// hostname, and a file it wrote that is still on the writable disk after the container
/// and the disk are gone from the guest.
fn overlay_container_output_exit_and_persistence() -> Result<(), Failed> {
    with_pod(|pod| {
        let spec = SpecBuilder::new(&[
            "sh",
            "-c",
            "echo hello-from-vm; echo host=$(hostname); echo persisted-data >/data.txt; sync; exit 7",
        ]);
        let mut out = None;
        let (file, mount) = pod.run("persist", spec, stdout_only(), |p| {
            out = Some(p.stdout("persist", "")?);
            Ok(())
        })?;
        let out = out.ok_or("no stdout stream")?;
        let text = pod.read_all(out, "container stdout")?;
        pod.check(
            text == format!("hello-from-vm\nhost={HOSTNAME}\n"),
            format!("container output {text:?} (want the echo and the pod hostname)"),
        )?;
        let wait = pod.wait("persist", "")?;
        pod.check(
            wait.exit_status == 7,
            format!("exit status {} (want 7)", wait.exit_status),
        )?;
        pod.vm
            .client
            .remove_container("persist")
            .map_err(|e| pod.fail(format!("RemoveContainer: {e}")))?;
        pod.vm
            .client
            .remove_storage(&mount)
            .map_err(|e| pod.fail(format!("RemoveStorage {mount}: {e}")))?;
        let data = ext4_cat(&file, "/upper/data.txt").map_err(|e| format!("debugfs: {e}"))?;
        pod.check(
            data == "persisted-data\n",
            format!(
                "the container's file is not on the writable disk: debugfs read {data:?} from /upper/data.txt"
            ),
        )
    })
}

/// A sleeping container; returns once it runs.
fn sleeper(pod: &mut Pod, id: &str) -> Result<(), Failed> {
    pod.run(
        id,
        SpecBuilder::new(&["sleep", "100000"]),
        Stdio::default(),
        |_| Ok(()),
    )
    .map(drop)
}

fn exec_into_running_container() -> Result<(), Failed> {
    with_pod(|pod| {
        sleeper(pod, "exec")?;
        let process = SpecBuilder::new(&[
            "sh",
            "-c",
            "echo exec-sees-pid1=$(cat /proc/1/comm); exit 4",
        ])
        .process_json();
        pod.vm
            .client
            .exec_process("exec", "e1", &process, stdout_only())
            .map_err(|e| pod.fail(format!("ExecProcess: {e}")))?;
        let out = pod.stdout("exec", "e1")?;
        let text = pod.read_all(out, "exec stdout")?;
        pod.check(
            text == "exec-sees-pid1=sleep\n",
            format!("exec output {text:?} (want the container's own pid 1, sleep)"),
        )?;
        let wait = pod.wait("exec", "e1")?;
        pod.check(
            wait.exit_status == 4,
            format!("exec exit status {} (want 4)", wait.exit_status),
        )?;
        let pids = pod
            .vm
            .client
            .list_processes("exec")
            .map_err(|e| pod.fail(format!("ListProcesses: {e}")))?;
        pod.check(
            !pids.is_empty(),
            "ListProcesses of a running container is empty",
        )?;
        pod.vm
            .client
            .remove_container("exec")
            .map_err(|e| pod.fail(format!("RemoveContainer: {e}")))
    })
}

fn sigterm_gives_143() -> Result<(), Failed> {
    with_pod(|pod| {
        sleeper(pod, "sig")?;
        // An exec'd process, not the container's PID 1 (which ignores unhandled signals).
        let process = SpecBuilder::new(&["sleep", "100000"]).process_json();
        pod.vm
            .client
            .exec_process("sig", "s1", &process, Stdio::default())
            .map_err(|e| pod.fail(format!("ExecProcess: {e}")))?;
        pod.vm
            .client
            .signal_process("sig", "s1", 15, false)
            .map_err(|e| pod.fail(format!("SignalProcess SIGTERM: {e}")))?;
        let wait = pod.wait("sig", "s1")?;
        pod.check(
            wait.exit_status == 143,
            format!(
                "exit status after SIGTERM {} (want 128+15)",
                wait.exit_status
            ),
        )?;
        // SIGKILL reaches PID 1 too.
        pod.vm
            .client
            .signal_process("sig", "", 9, false)
            .map_err(|e| pod.fail(format!("SignalProcess SIGKILL: {e}")))?;
        let wait = pod.wait("sig", "")?;
        pod.check(
            wait.exit_status == 137,
            format!(
                "init exit status after SIGKILL {} (want 137)",
                wait.exit_status
            ),
        )?;
        pod.vm
            .client
            .remove_container("sig")
            .map_err(|e| pod.fail(format!("RemoveContainer: {e}")))
    })
}

fn tty_resize_seen_by_process() -> Result<(), Failed> {
    with_pod(|pod| {
        sleeper(pod, "tty")?;
        // Polls its terminal size until the resize lands (bounded), then prints it.
        let process = SpecBuilder::new(&[
            "sh",
            "-c",
            "i=0; while [ \"$(stty size)\" != '40 100' ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; echo size=$(stty size)",
        ])
        .terminal(true)
        .process_json();
        let stdio = Stdio {
            terminal: true,
            stdout: true,
            ..Default::default()
        };
        pod.vm
            .client
            .exec_process("tty", "t1", &process, stdio)
            .map_err(|e| pod.fail(format!("ExecProcess with a terminal: {e}")))?;
        let out = pod.stdout("tty", "t1")?;
        pod.vm
            .client
            .resize_tty("tty", "t1", 40, 100)
            .map_err(|e| pod.fail(format!("ResizeTty: {e}")))?;
        let text = pod.read_all(out, "tty output")?;
        pod.check(
            text.contains("size=40 100"),
            format!("the process did not see 40x100: {text:?}"),
        )?;
        pod.check(
            text.contains("\r\n"),
            format!("output did not go through a terminal (no CRLF): {text:?}"),
        )?;
        let wait = pod.wait("tty", "t1")?;
        pod.check(
            wait.exit_status == 0,
            format!("tty process exit status {}", wait.exit_status),
        )?;
        pod.vm
            .client
            .remove_container("tty")
            .map_err(|e| pod.fail(format!("RemoveContainer: {e}")))
    })
}

fn memory_limit_oom_kills() -> Result<(), Failed> {
    with_pod(|pod| {
        // The shell holds a 64 MiB command substitution in its own memory: far beyond the
        // 16 MiB limit, and not reclaimable.
        let spec = SpecBuilder::new(&[
            "sh",
            "-c",
            "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo survived ${#x}",
        ])
        .memory_limit(16 << 20);
        let mut out = None;
        pod.run("oom", spec, stdout_only(), |p| {
            out = Some(p.stdout("oom", "")?);
            Ok(())
        })?;
        let text = pod.read_all(out.ok_or("no stdout stream")?, "oom container stdout")?;
        let wait = pod.wait("oom", "")?;
        pod.check(
            !text.contains("survived"),
            format!("the process outlived its memory limit: {text:?}"),
        )?;
        pod.check(
            wait.exit_status == 137,
            format!(
                "exit status {} (want 137, SIGKILL by the OOM killer)",
                wait.exit_status
            ),
        )?;
        pod.check(wait.oom_killed, "WaitProcess does not say oom_killed")?;
        let saw_oom = pod.events_until(|k| matches!(k, Kind::Oom(o) if o.container_id == "oom"))?;
        pod.check(saw_oom, "no OomKilled event for the container")?;
        pod.vm
            .client
            .remove_container("oom")
            .map_err(|e| pod.fail(format!("RemoveContainer: {e}")))
    })
}

fn shutdown_powers_off() -> Result<(), Failed> {
    let pod = POD.lock().unwrap_or_else(|p| p.into_inner()).take();
    let pod = match pod {
        Some(Ok(pod)) => pod,
        Some(Err(e)) => return Err(format!("the pod VM did not come up: {e}").into()),
        // Run alone: boot a pod just for this.
        None => boot_pod()?,
    };
    let transcript = pod.vm.transcript();
    let out = pod.vm.shutdown()?;
    if out.code() == Some(0) {
        Ok(())
    } else {
        Err(format!(
            "VMM did not exit 0 after the agent's Shutdown\n{}\n{transcript}",
            out.transcript()
        )
        .into())
    }
}
