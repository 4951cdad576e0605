//! The real agent in a real pod VM: `cocoon-vmm` boots `build/vmlinux` with
//! `build/initramfs.cpio` (the agent as `/init`) and the host drives it through the
//! runtime's agent client over hybrid vsock. Image and writable disks are swapped into
//! empty drive slots, as the runtime will do.
//!
//! One VM serves every check (booted on first use; trials run one at a time in the lab):
//! each check uses its own container and writable disk. On hosts without a KVM that boots
//! stock Linux, the harness reruns this binary inside one test-lab boot.
//!
//! The VM has a NIC: a TAP in a throwaway network namespace (`netns::NetLab`), with a
//! busybox httpd as the peer in the lab's second namespace. Only the network check
//! configures it; the others run with it unconfigured (and fail only that check when the
//! network lab cannot be made).

use cocoon_agent_protocol::api::event::Kind;
use cocoon_agent_protocol::api::{Interface, Route};
use cocoon_agent_protocol::stdio::{StdioHeader, Stream};
use cocoon_agent_protocol::PROTOCOL_VERSION;
use cocoon_integration::netns::{self, NetLab};
use cocoon_integration::oci::pod_vm::{PodVm, PodVmConfig, PodVmNet};
use cocoon_integration::oci::{
    busybox_rootfs, erofs_image, writable_disk, PodNamespaces, SpecBuilder,
};
use cocoon_integration::paths;
use cocoon_integration::testguest::ext4_cat;
use cocoon_integration::vmtest::{self, test};
use cocoon_runtime::agent::{Rootfs, SetupNetworkRequest, SetupSandboxRequest, Stdio};
use libtest_mimic::Failed;
use std::io::{BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

const IMAGE_MOUNT: &str = "/run/pod/image";
const HOSTNAME: &str = "agent-vm-test";
/// Writable slots for the containers alive at one time (a removed container's slot is
/// used again); with the image's slot, the vsock and the NIC within cocoon-vmm's 18.
const WRITABLE_SLOTS: usize = 8;
/// Output and waits in the nested, emulated guest.
const WAIT: Duration = Duration::from_secs(60);
/// The guest NIC's MAC.
const NET_MAC: &str = "02:00:00:00:a9:01";
/// The peer's HTTP port (busybox httpd in namespace B) and the file it serves.
const PEER_PORT: u16 = 8080;
const PEER_TOKEN: &str = "peer-token-7f3a";
/// The privileged helper container in the agent's network and PID namespaces.
const HOST_CTR: &str = "hostns";

/// The network lab of the pod: namespaces, TAP, and the peer's HTTP server.
struct NetPod {
    peer: std::process::Child,
    lab: NetLab,
    _www: tempfile::TempDir,
}

impl Drop for NetPod {
    fn drop(&mut self) {
        // Our own child, by handle; the namespaces go when `lab` drops after this.
        let _ = self.peer.kill();
        let _ = self.peer.wait();
    }
}

fn start_net() -> Result<NetPod, String> {
    let lab = NetLab::new(&format!("avm{}", std::process::id()))
        .map_err(|e| format!("network namespaces: {e}"))?;
    let www = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    std::fs::write(www.path().join("token"), PEER_TOKEN).map_err(|e| format!("token: {e}"))?;
    let www_dir = www.path().display().to_string();
    let listen = format!("{}:{PEER_PORT}", netns::PEER_IP);
    let peer = lab
        .command(
            &lab.b,
            &["/bin/busybox", "httpd", "-f", "-p", &listen, "-h", &www_dir],
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("start busybox httpd in {}: {e}", lab.b))?;
    Ok(NetPod {
        peer,
        lab,
        _www: www,
    })
}

/// The shared pod: the VM, the pod's namespaces, the next free writable slot. Fields drop
/// in order: the VM before its network lab.
struct Pod {
    vm: PodVm,
    ns: PodNamespaces,
    next_slot: usize,
    /// Slots whose container was removed and disk ejected.
    free_slots: Vec<usize>,
    /// Container id -> its writable disk's slot and guest mount point.
    disks: std::collections::HashMap<String, (usize, String)>,
    net: Result<NetPod, String>,
    host_ctr: bool,
}

static POD: Mutex<Option<Result<Pod, String>>> = Mutex::new(None);

fn main() -> ExitCode {
    let code = cocoon_integration::vmtest::main(vec![
        test("agent_vm_hello_and_sandbox", hello_and_sandbox),
        test(
            "agent_vm_overlay_container_output_exit_and_persistence",
            overlay_container_output_exit_and_persistence,
        ),
        test(
            "agent_vm_exec_into_running_container",
            exec_into_running_container,
        ),
        test("agent_vm_sigterm_gives_143", sigterm_gives_143),
        test(
            "agent_vm_tty_resize_seen_by_process",
            tty_resize_seen_by_process,
        ),
        test("agent_vm_memory_limit_oom_kills", memory_limit_oom_kills),
        test(
            "agent_vm_stdin_eof_and_close_stdin",
            stdin_eof_and_close_stdin,
        ),
        test(
            "agent_vm_stderr_is_its_own_stream",
            stderr_is_its_own_stream,
        ),
        test("agent_vm_tty_init_process", tty_init_process),
        test("agent_vm_stats_from_cgroup_v2", stats_from_cgroup_v2),
        test(
            "agent_vm_update_limits_seen_inside",
            update_limits_seen_inside,
        ),
        test("agent_vm_pause_freezes_resume_continues", pause_and_resume),
        test("agent_vm_root_is_pivoted_overlay", root_is_pivoted_overlay),
        test(
            "agent_vm_free_page_reporting_order_lowered",
            free_page_reporting_order_lowered,
        ),
        test("agent_vm_setup_network_pod_netns", setup_network_pod_netns),
        test(
            "agent_vm_containers_cannot_reach_the_agent_api",
            containers_cannot_reach_the_agent_api,
        ),
        test("agent_vm_shutdown_powers_off", shutdown_powers_off),
    ]);
    // A run filtered to some trials leaves the VM up: end it (killed on drop).
    let leftover = POD.lock().map(|mut p| p.take()).unwrap_or(None);
    if let Some(Err(e)) = &leftover {
        // Last, so that it is in the tail a CI log keeps.
        eprintln!("agent_vm: every check failed because the pod VM did not come up:\n{e}");
    }
    drop(leftover);
    code
}

/// [`boot_pod`], once more after a failure: the emulated lab has rare boot hangs of its
/// own (a guest bug fails twice). The first failure is printed in full.
fn boot_pod_twice() -> Result<Pod, String> {
    boot_pod().or_else(|first| {
        eprintln!(
            "agent_vm: the pod VM did not come up, booting it once more. First try:\n{first}"
        );
        vmtest::count_rerun("agent_vm pod boot", &first);
        boot_pod().map_err(|second| format!("{second}\n--- first try ---\n{first}"))
    })
}

/// Boots the pod: VM, Hello, the busybox EROFS image in slot 0, SetupSandbox.
fn boot_pod() -> Result<Pod, String> {
    let net = start_net();
    if let Err(e) = &net {
        eprintln!("agent_vm: no network lab, the network check will fail: {e}");
    }
    let vm_net = net.as_ref().ok().map(|n| PodVmNet {
        netns: Some(n.lab.a.clone()),
        tap: netns::TAP.into(),
        mac: NET_MAC.into(),
    });
    let vm = PodVm::boot_with_net(
        &PodVmConfig {
            writable_slots: WRITABLE_SLOTS,
            memory_mib: 512,
            vcpus: 2,
        },
        vm_net.as_ref(),
    )?;
    // busybox plus the vsock probe (a container trying the agent's ports).
    let rootfs = vm.dir().join("rootfs");
    busybox_rootfs(&rootfs).map_err(|e| format!("busybox rootfs: {e}"))?;
    std::fs::copy(paths::probe(), rootfs.join("bin/cocoon-vsock-probe")).map_err(|e| {
        format!(
            "copy {} into the image (make build/cocoon-vsock-probe): {e}",
            paths::probe().display()
        )
    })?;
    let image = vm.dir().join("image.erofs");
    erofs_image(&rootfs, &image).map_err(|e| format!("busybox image: {e}"))?;
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
        free_slots: Vec::new(),
        disks: Default::default(),
        net,
        host_ctr: false,
    })
}

/// Runs one check on the shared pod VM. If the check fails because the VM itself ended
/// (the emulated lab resets a nested guest now and then, without a word on its console)
/// or, in the lab, stopped answering, that is printed with the guest's console and the
/// VMM's thread states, and the check runs once more on a new pod VM: a check that fails
/// on a live VM, or twice, fails.
fn with_pod<T>(mut f: impl FnMut(&mut Pod) -> Result<T, Failed>) -> Result<T, Failed> {
    let mut guard = POD.lock().unwrap_or_else(|p| p.into_inner());
    let first = match guard.get_or_insert_with(boot_pod_twice) {
        Ok(pod) => match f(pod) {
            Ok(v) => return Ok(v),
            Err(e) => {
                let why = e.message().unwrap_or("");
                match pod.vm_end_within(Duration::from_secs(3)) {
                    Some(status) => format!("{why}\nthe pod VM ended ({status})"),
                    // The guest stopped answering altogether (the lab's nested guests
                    // hang now and then, docs/test-lab.md); the message has the VMM's
                    // thread states. On hardware KVM a hang is a plain failure.
                    None if vmtest::in_lab() && vmtest::says_agent_hung(why) => {
                        format!("{why}\nthe pod VM stopped answering")
                    }
                    None => return Err(e),
                }
            }
        },
        Err(e) => return Err(format!("the pod VM did not come up: {e}").into()),
    };
    eprintln!("agent_vm: the pod VM ended or hung during this check; on a new pod VM once more. First try:\n{first}");
    vmtest::count_rerun(vmtest::current_test(), &first);
    // The old pod (and its network lab, whose names the new one reuses) goes first.
    *guard = None;
    *guard = Some(boot_pod_twice());
    match guard.as_mut() {
        Some(Ok(pod)) => f(pod).map_err(|e| {
            format!("{}\n--- first try ---\n{first}", e.message().unwrap_or("")).into()
        }),
        Some(Err(e)) => {
            Err(format!("the pod VM did not come up again: {e}\n--- first try ---\n{first}").into())
        }
        None => Err(first.into()),
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
        let slot = match self.free_slots.pop() {
            Some(slot) => slot,
            None if self.next_slot < self.vm.slots => {
                self.next_slot += 1;
                self.next_slot - 1
            }
            None => return Err(format!("no free drive slot for {id}: raise WRITABLE_SLOTS").into()),
        };
        let file = self.vm.dir().join(format!("{id}.ext4"));
        writable_disk(&file, 64).map_err(|e| format!("writable disk for {id}: {e}"))?;
        let mount = format!("/run/pod/w-{id}");
        self.vm
            .add_disk(slot, &file, "ext4", false, &format!("w-{id}"), &mount)
            .map_err(|e| self.fail(e))?;
        self.disks.insert(id.to_string(), (slot, mount.clone()));
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
        let spec = spec.pod(self.ns.clone());
        self.run_spec(id, spec, stdio, before_start)
    }

    /// [`Pod::run`] with stdout only; returns all the container's stdout (it has ended
    /// its output; the caller waits for and removes it).
    fn run_for_stdout(&mut self, id: &str, spec: SpecBuilder) -> Result<String, Failed> {
        let mut out = None;
        self.run(id, spec, stdout_only(), |p| {
            out = Some(p.stdout(id, "")?);
            Ok(())
        })?;
        self.read_all(out.ok_or("no stdout stream")?, &format!("stdout of {id}"))
    }

    /// [`Pod::run`] with the spec's namespaces as they are (not the pod's).
    fn run_spec(
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
        let spec = spec.to_json();
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

    fn stdout(&self, id: &str, exec: &str) -> Result<UnixStream, Failed> {
        self.open(id, exec, Stream::Stdout)
    }

    /// One stdio stream of `id`/`exec`, reads bounded by [`WAIT`].
    fn open(&self, id: &str, exec: &str, stream: Stream) -> Result<UnixStream, Failed> {
        let header = StdioHeader {
            container_id: id.into(),
            exec_id: exec.into(),
            stream,
        };
        let s = self
            .vm
            .client
            .open_stdio(&header)
            .map_err(|e| self.fail(format!("open {stream:?} of {id}/{exec}: {e}")))?;
        s.set_read_timeout(Some(WAIT))
            .map_err(|e| format!("stream timeout: {e}"))?;
        Ok(s)
    }

    /// Starts `process_json` in container `id` as exec `exec`.
    fn exec(&self, id: &str, exec: &str, process_json: &[u8], stdio: Stdio) -> Result<(), Failed> {
        self.vm
            .client
            .exec_process(id, exec, process_json, stdio)
            .map(drop)
            .map_err(|e| self.fail(format!("ExecProcess {id}/{exec}: {e}")))
    }

    /// Runs `process` in container `id` as exec `exec` with stdout only; its output and
    /// exit status.
    fn exec_out(
        &self,
        id: &str,
        exec: &str,
        process: &SpecBuilder,
    ) -> Result<(String, i32), Failed> {
        self.exec(id, exec, &process.process_json(), stdout_only())?;
        let out = self.stdout(id, exec)?;
        let text = self.read_all(out, &format!("stdout of {id}/{exec}"))?;
        let wait = self.wait(id, exec)?;
        Ok((text, wait.exit_status))
    }

    /// How the pod's VMM ended, if it has or does within `grace` (a guest reset shows first
    /// as a broken agent connection, the VMM's exit follows).
    fn vm_end_within(&mut self, grace: Duration) -> Option<String> {
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = self.vm.ended() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Removes container `id`, unmounts its writable disk and ejects it: the slot is free
    /// for the next container, as the runtime does it.
    fn remove(&mut self, id: &str) -> Result<(), Failed> {
        self.vm
            .client
            .remove_container(id)
            .map_err(|e| self.fail(format!("RemoveContainer {id}: {e}")))?;
        if let Some((slot, mount)) = self.disks.remove(id) {
            self.vm
                .client
                .remove_storage(&mount)
                .map_err(|e| self.fail(format!("RemoveStorage {mount}: {e}")))?;
            self.vm.eject(slot).map_err(|e| self.fail(e))?;
            self.free_slots.push(slot);
        }
        Ok(())
    }

    /// A sleeping container in the agent's own network and PID namespaces, with
    /// CAP_SYS_PTRACE (to read the agent's /proc/1 files): created on first use.
    fn host_container(&mut self) -> Result<&'static str, Failed> {
        if !self.host_ctr {
            let spec = SpecBuilder::new(&["sleep", "100000"])
                .pod(PodNamespaces {
                    ipc: self.ns.ipc.clone(),
                    uts: self.ns.uts.clone(),
                    ..Default::default()
                })
                .host_network(true)
                .host_pid(true)
                .capability("CAP_SYS_PTRACE");
            self.run_spec(HOST_CTR, spec, Stdio::default(), |_| Ok(()))?;
            self.host_ctr = true;
        }
        Ok(HOST_CTR)
    }

    fn read_all(&self, s: UnixStream, what: &str) -> Result<String, Failed> {
        read_to_end(s)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .map_err(|e| self.fail(format!("reading {what}: {e}")))
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

/// Reads a stream to EOF; the error says how much came before it failed.
fn read_to_end(mut s: UnixStream) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => Ok(out),
        Err(e) => {
            let head = String::from_utf8_lossy(&out[..out.len().min(200)]).into_owned();
            Err(format!(
                "{e} after {} bytes (no EOF; start: {head:?})",
                out.len()
            ))
        }
    }
}

/// Where two byte strings first differ, for messages about long outputs.
fn first_difference(got: &[u8], want: &[u8]) -> String {
    match got.iter().zip(want).position(|(a, b)| a != b) {
        Some(i) => format!(
            "first difference at byte {i} (got {:#04x}, want {:#04x}); got {} bytes, want {}",
            got[i],
            want[i],
            got.len(),
            want.len()
        ),
        None => format!("got {} bytes, want {}", got.len(), want.len()),
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
        let (file, _) = pod.run("persist", spec, stdout_only(), |p| {
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
        // Also unmounts and ejects the writable disk: the host reads it afterwards.
        pod.remove("persist")?;
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
        pod.exec("exec", "e1", &process, stdout_only())?;
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
        pod.remove("exec")
    })
}

fn sigterm_gives_143() -> Result<(), Failed> {
    with_pod(|pod| {
        sleeper(pod, "sig")?;
        // An exec'd process, not the container's PID 1 (which ignores unhandled signals).
        let process = SpecBuilder::new(&["sleep", "100000"]).process_json();
        pod.exec("sig", "s1", &process, Stdio::default())?;
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
        pod.remove("sig")
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
        pod.exec("tty", "t1", &process, stdio)?;
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
        pod.remove("tty")
    })
}

fn memory_limit_oom_kills() -> Result<(), Failed> {
    with_pod(|pod| {
        // One process that only grows (awk doubling a string): under a 16 MiB limit the
        // OOM killer has a single candidate. (A shell pipeline let it pick `tr` or
        // `head` instead now and then, and the shell survived.)
        let spec = SpecBuilder::new(&["awk", "BEGIN { s = \"x\"; for (;;) s = s s }"])
            .memory_limit(16 << 20);
        pod.run("oom", spec, Stdio::default(), |_| Ok(()))?;
        let result = (|| {
            let wait = pod.wait("oom", "")?;
            pod.check(
                wait.exit_status == 137,
                format!(
                    "exit status {} (want 137, SIGKILL by the OOM killer)",
                    wait.exit_status
                ),
            )?;
            pod.check(wait.oom_killed, "WaitProcess does not say oom_killed")?;
            let saw_oom =
                pod.events_until(|k| matches!(k, Kind::Oom(o) if o.container_id == "oom"))?;
            pod.check(saw_oom, "no OomKilled event for the container")
        })();
        // Removed whatever happened, so a failure here cannot disturb the next checks.
        let removed = pod.remove("oom");
        result.and(removed)
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

/// Stdin, both ways of ending it: a `cat` exec whose stdin stream the host half-closes
/// (shutdown(SHUT_WR)) after 256 KiB, which must echo every byte and exit 0; and one
/// whose stdin is never attached, ended by CloseStdin.
fn stdin_eof_and_close_stdin() -> Result<(), Failed> {
    with_pod(|pod| {
        sleeper(pod, "stdio")?;
        let both = Stdio {
            stdin: true,
            stdout: true,
            ..Default::default()
        };
        let cat = SpecBuilder::new(&["cat"]).process_json();
        pod.exec("stdio", "cat1", &cat, both.clone())?;
        // More than a pipe holds, so the copy has to flow while we read.
        let input: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
        let mut stdin = pod.open("stdio", "cat1", Stream::Stdin)?;
        let out = pod.stdout("stdio", "cat1")?;
        let sent = input.clone();
        let writer = std::thread::spawn(move || -> Result<UnixStream, String> {
            stdin
                .write_all(&sent)
                .map_err(|e| format!("write stdin: {e}"))?;
            stdin
                .shutdown(std::net::Shutdown::Write)
                .map_err(|e| format!("shutdown(SHUT_WR) of stdin: {e}"))?;
            Ok(stdin)
        });
        let got = read_to_end(out).map_err(|e| {
            pod.fail(format!(
                "cat1 stdout: {e}: did cat see EOF after the host shut down its stdin?"
            ))
        })?;
        let _stdin = writer
            .join()
            .map_err(|_| "stdin writer panicked")?
            .map_err(|e| pod.fail(e))?;
        pod.check(
            got == input,
            format!(
                "cat1 echoed something else than its stdin: {}",
                first_difference(&got, &input)
            ),
        )?;
        let wait = pod.wait("stdio", "cat1")?;
        pod.check(
            wait.exit_status == 0,
            format!(
                "cat1 exit status {} after stdin EOF (want 0)",
                wait.exit_status
            ),
        )?;

        // Stdin requested but never attached: CloseStdin alone must give EOF.
        let cat = SpecBuilder::new(&["sh", "-c", "cat; echo cat2-saw-eof"]).process_json();
        pod.exec("stdio", "cat2", &cat, both)?;
        let out = pod.stdout("stdio", "cat2")?;
        pod.vm
            .client
            .close_stdin("stdio", "cat2")
            .map_err(|e| pod.fail(format!("CloseStdin cat2: {e}")))?;
        let text = pod.read_all(out, "cat2 stdout (EOF expected from CloseStdin)")?;
        pod.check(
            text == "cat2-saw-eof\n",
            format!("cat2 output {text:?} (want only the line after cat's EOF)"),
        )?;
        let wait = pod.wait("stdio", "cat2")?;
        pod.check(
            wait.exit_status == 0,
            format!("cat2 exit status {} (want 0)", wait.exit_status),
        )?;
        // A closed stdin cannot be attached any more.
        let header = StdioHeader {
            container_id: "stdio".into(),
            exec_id: "cat2".into(),
            stream: Stream::Stdin,
        };
        match pod.vm.client.open_stdio(&header) {
            Err(e) if e.to_string().contains("closed") => Ok(()),
            Err(e) => Err(pod.fail(format!(
                "attaching cat2's closed stdin failed, but not for being closed: {e}"
            ))),
            Ok(_) => Err(pod.fail("cat2's stdin could be attached after CloseStdin")),
        }
    })
}

/// Stdout and stderr as separate streams, each more than a pipe holds, read at the same
/// time: each carries its own bytes, none of the other's.
fn stderr_is_its_own_stream() -> Result<(), Failed> {
    with_pod(|pod| {
        if lookup_missing(pod, "stdio") {
            sleeper(pod, "stdio")?;
        }
        let process = SpecBuilder::new(&[
            "sh",
            "-c",
            "echo to-stdout; echo to-stderr >&2; head -c 200000 /dev/zero | tr '\\0' o; \
             head -c 150000 /dev/zero | tr '\\0' e >&2; exit 5",
        ])
        .process_json();
        let stdio = Stdio {
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        pod.exec("stdio", "both", &process, stdio)?;
        let out = pod.stdout("stdio", "both")?;
        let err = pod.open("stdio", "both", Stream::Stderr)?;
        let err_reader = std::thread::spawn(move || read_to_end(err));
        let out = read_to_end(out).map_err(|e| pod.fail(format!("stdout: {e}")))?;
        let err = err_reader
            .join()
            .map_err(|_| "stderr reader panicked")?
            .map_err(|e| pod.fail(format!("stderr: {e}")))?;
        let want_out = [&b"to-stdout\n"[..], &[b'o'; 200_000]].concat();
        let want_err = [&b"to-stderr\n"[..], &[b'e'; 150_000]].concat();
        pod.check(
            out == want_out,
            format!("stdout stream: {}", first_difference(&out, &want_out)),
        )?;
        pod.check(
            err == want_err,
            format!("stderr stream: {}", first_difference(&err, &want_err)),
        )?;
        let wait = pod.wait("stdio", "both")?;
        pod.check(
            wait.exit_status == 5,
            format!("exit status {} (want 5)", wait.exit_status),
        )
    })
}

/// Whether container `id` is unknown to the agent (a check run alone creates it).
fn lookup_missing(pod: &Pod, id: &str) -> bool {
    pod.vm.client.list_processes(id).is_err()
}

/// A container whose init (not an exec) has a terminal: input through the pty, output
/// with CRLF through the stdout stream, and its exit status.
fn tty_init_process() -> Result<(), Failed> {
    with_pod(|pod| {
        let spec = SpecBuilder::new(&[
            "sh",
            "-c",
            "read line; echo \"got=$line\"; [ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo all-tty; \
             echo tty=$(tty); exit 3",
        ])
        .terminal(true);
        let stdio = Stdio {
            terminal: true,
            stdin: true,
            stdout: true,
            ..Default::default()
        };
        let mut streams = None;
        pod.run("ttyinit", spec, stdio, |p| {
            streams = Some((
                p.stdout("ttyinit", "")?,
                p.open("ttyinit", "", Stream::Stdin)?,
            ));
            Ok(())
        })?;
        let (out, mut stdin) = streams.ok_or("no streams")?;
        stdin
            .write_all(b"ping-tty\n")
            .map_err(|e| pod.fail(format!("write to the terminal: {e}")))?;
        let text = pod.read_all(out, "terminal init output")?;
        drop(stdin);
        for want in ["got=ping-tty", "all-tty", "tty=/dev/pts/"] {
            pod.check(
                text.contains(want),
                format!("terminal init output lacks {want:?}: {text:?}"),
            )?;
        }
        pod.check(
            text.contains("\r\n"),
            format!("output did not go through a terminal (no CRLF): {text:?}"),
        )?;
        let wait = pod.wait("ttyinit", "")?;
        pod.check(
            wait.exit_status == 3,
            format!("terminal init exit status {} (want 3)", wait.exit_status),
        )?;
        pod.remove("ttyinit")
    })
}

/// Reads `stream` line by line until a line starts with `prefix`; returns that line and
/// keeps the stream open (the process may still write).
fn read_until_line(
    pod: &Pod,
    stream: &mut std::io::BufReader<UnixStream>,
    prefix: &str,
    what: &str,
) -> Result<String, Failed> {
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        match stream.read_line(&mut line) {
            Ok(0) => {
                return Err(pod.fail(format!(
                    "{what}: EOF before a line starting {prefix:?}; output: {seen:?}"
                )))
            }
            Ok(_) if line.starts_with(prefix) => return Ok(line.trim_end().to_string()),
            Ok(_) => seen.push_str(&line),
            Err(e) => {
                return Err(pod.fail(format!(
                    "{what}: {e} before a line starting {prefix:?}; output: {seen:?}"
                )))
            }
        }
    }
}

const MIB: u64 = 1 << 20;

/// StatsContainer on the guest's cgroup v2: a container that holds 8 MiB and counted a
/// little: usage, its limits, CPU time, processes.
fn stats_from_cgroup_v2() -> Result<(), Failed> {
    with_pod(|pod| {
        // The shell keeps the 8 MiB string while sleep runs (the trailing echo stops it
        // from exec'ing sleep in its place).
        let spec = SpecBuilder::new(&[
            "sh",
            "-c",
            "x=$(head -c 8388608 /dev/zero | tr '\\0' a); i=0; \
             while [ $i -lt 3000 ]; do i=$((i+1)); done; echo ready ${#x}; sleep 100000; echo $i",
        ])
        .memory_limit(64 * MIB)
        .pids_limit(40);
        let mut out = None;
        pod.run("stats", spec, stdout_only(), |p| {
            out = Some(p.stdout("stats", "")?);
            Ok(())
        })?;
        let mut out = std::io::BufReader::new(out.ok_or("no stdout stream")?);
        let line = read_until_line(pod, &mut out, "ready", "stats container")?;
        pod.check(
            line == "ready 8388608",
            format!("the container did not build its 8 MiB string: {line:?}"),
        )?;
        // "ready" comes just before the shell forks sleep: wait for the second process.
        let deadline = Instant::now() + WAIT;
        let s = loop {
            let s = pod
                .vm
                .client
                .stats_container("stats")
                .map_err(|e| pod.fail(format!("StatsContainer: {e}")))?;
            if s.pids_current >= 2 || Instant::now() >= deadline {
                break s;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let facts = format!("{s:?}");
        pod.check(
            s.memory_usage_bytes >= 8 * MIB,
            format!(
                "memory_usage_bytes {} < the 8 MiB the shell holds: {facts}",
                s.memory_usage_bytes
            ),
        )?;
        pod.check(
            s.memory_limit_bytes == 64 * MIB,
            format!(
                "memory_limit_bytes {} (want the spec's 64 MiB): {facts}",
                s.memory_limit_bytes
            ),
        )?;
        pod.check(
            s.memory_working_set_bytes > 0 && s.memory_working_set_bytes <= s.memory_usage_bytes,
            format!(
                "memory_working_set_bytes {} not in (0, usage]: {facts}",
                s.memory_working_set_bytes
            ),
        )?;
        pod.check(
            s.cpu_usage_usec > 0 && s.cpu_usage_usec >= s.cpu_user_usec,
            format!(
                "cpu_usage_usec {} after a busy loop: {facts}",
                s.cpu_usage_usec
            ),
        )?;
        pod.check(
            s.pids_current >= 2,
            format!(
                "pids_current {} (want sh and sleep, 2): {facts}",
                s.pids_current
            ),
        )?;
        pod.check(
            s.pids_limit == 40,
            format!("pids_limit {} (want the spec's 40): {facts}", s.pids_limit),
        )?;
        pod.check(s.timestamp_ns > 0, format!("no timestamp: {facts}"))?;
        pod.remove("stats")
    })
}

/// The container's limits as it sees them in its own cgroup namespace.
fn limits_inside(pod: &Pod, id: &str, exec: &str) -> Result<String, Failed> {
    let process = SpecBuilder::new(&[
        "sh",
        "-c",
        "echo $(cat /sys/fs/cgroup/memory.max) $(cat /sys/fs/cgroup/pids.max)",
    ]);
    let (text, status) = pod.exec_out(id, exec, &process)?;
    pod.check(
        status == 0,
        format!("reading the limits inside {id}: exit {status}, output {text:?}"),
    )?;
    Ok(text.trim().to_string())
}

/// UpdateContainer raises, then lowers, the memory and pids limits; the container sees
/// each change in its cgroup (own cgroup namespace), and StatsContainer agrees.
fn update_limits_seen_inside() -> Result<(), Failed> {
    with_pod(|pod| {
        let spec = SpecBuilder::new(&["sleep", "100000"])
            .memory_limit(64 * MIB)
            .pids_limit(40)
            .cgroup_namespace(true);
        pod.run("update", spec, Stdio::default(), |_| Ok(()))?;
        let seen = limits_inside(pod, "update", "l0")?;
        pod.check(
            seen == format!("{} 40", 64 * MIB),
            format!("limits inside before any update: {seen:?} (want 64 MiB and 40)"),
        )?;
        for (step, memory, pids) in [("raise", 96 * MIB, 100), ("lower", 48 * MIB, 10)] {
            let resources = serde_json::json!({
                "memory": {"limit": memory},
                "pids": {"limit": pids},
            });
            pod.vm
                .client
                .update_container("update", resources.to_string().as_bytes())
                .map_err(|e| pod.fail(format!("UpdateContainer ({step}) {resources}: {e}")))?;
            let seen = limits_inside(pod, "update", &format!("l-{step}"))?;
            pod.check(
                seen == format!("{memory} {pids}"),
                format!(
                    "after UpdateContainer ({step}) the container sees memory.max pids.max = \
                     {seen:?} (want {memory} {pids})"
                ),
            )?;
            let s = pod
                .vm
                .client
                .stats_container("update")
                .map_err(|e| pod.fail(format!("StatsContainer: {e}")))?;
            pod.check(
                s.memory_limit_bytes == memory && s.pids_limit == pids as u64,
                format!(
                    "after UpdateContainer ({step}) stats say memory {} pids {} (want {memory} {pids})",
                    s.memory_limit_bytes, s.pids_limit
                ),
            )?;
        }
        pod.remove("update")
    })
}

/// A counter printing every 100 ms: nothing while paused, and after resume it goes on
/// from where it stopped (nothing lost, nothing restarted).
fn pause_and_resume() -> Result<(), Failed> {
    with_pod(|pod| {
        let spec = SpecBuilder::new(&[
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done",
        ]);
        let mut out = None;
        pod.run("pause", spec, stdout_only(), |p| {
            out = Some(p.stdout("pause", "")?);
            Ok(())
        })?;
        let out = out.ok_or("no stdout stream")?;
        let (tx, rx) = mpsc::channel::<Result<u64, String>>();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let item = match line {
                    Ok(l) => l
                        .trim()
                        .parse::<u64>()
                        .map_err(|_| format!("not a number: {l:?}")),
                    Err(e) => Err(format!("read: {e}")),
                };
                let stop = item.is_err();
                if tx.send(item).is_err() || stop {
                    break;
                }
            }
        });
        let next = |what: &str, within: Duration| -> Result<u64, Failed> {
            match rx.recv_timeout(within) {
                Ok(Ok(n)) => Ok(n),
                Ok(Err(e)) => Err(pod.fail(format!("counter output {what}: {e}"))),
                Err(_) => Err(pod.fail(format!("no counter line {what} within {within:?}"))),
            }
        };
        for want in 1..=3 {
            let n = next("before pause", WAIT)?;
            pod.check(n == want, format!("counter started with {n}, want {want}"))?;
        }
        pod.vm
            .client
            .pause_container("pause")
            .map_err(|e| pod.fail(format!("PauseContainer: {e}")))?;
        // What was printed before the freeze landed may still be in flight.
        std::thread::sleep(Duration::from_millis(700));
        let mut last = 3;
        loop {
            match rx.try_recv() {
                Ok(Ok(n)) => last = n,
                Ok(Err(e)) => return Err(pod.fail(format!("counter output: {e}"))),
                Err(_) => break,
            }
        }
        let quiet = Duration::from_secs(2);
        match rx.recv_timeout(quiet) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(Ok(n)) => {
                return Err(pod.fail(format!(
                    "the paused container printed {n} (last before pause {last})"
                )))
            }
            Ok(Err(e)) => return Err(pod.fail(format!("counter output while paused: {e}"))),
            Err(e) => return Err(pod.fail(format!("counter stream ended while paused: {e}"))),
        }
        let pids = pod
            .vm
            .client
            .list_processes("pause")
            .map_err(|e| pod.fail(format!("ListProcesses while paused: {e}")))?;
        pod.check(
            !pids.is_empty(),
            "ListProcesses of the paused container is empty",
        )?;
        pod.vm
            .client
            .resume_container("pause")
            .map_err(|e| pod.fail(format!("ResumeContainer: {e}")))?;
        for want in last + 1..=last + 3 {
            let n = next("after resume", WAIT)?;
            pod.check(
                n == want,
                format!(
                    "after resume the counter printed {n}, want {want} (last before pause {last})"
                ),
            )?;
        }
        pod.remove("pause")
    })
}

/// Mount point and file system type of each /proc/<pid>/mountinfo line, with the
/// super-block options.
fn mounts(info: &str) -> Vec<(String, String, String)> {
    info.lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            Some((
                fields.get(4)?.to_string(),
                fields.get(sep + 1)?.to_string(),
                fields.get(sep + 3).unwrap_or(&"").to_string(),
            ))
        })
        .collect()
}

/// The container's "/" is its overlay (image lower dir), with the initramfs nowhere in
/// sight, and the agent runs off a tmpfs root, not the initramfs: so the agent picks
/// pivot_root (`Config::no_pivot` is `root_is_initramfs()`), not MS_MOVE + chroot.
/// The agent lowers the guest's free page reporting order at boot (Linux 6.1 takes the
/// balloon driver's order over a command-line value, so only a write after boot works).
fn free_page_reporting_order_lowered() -> Result<(), Failed> {
    with_pod(|pod| {
        let order = pod.run_for_stdout(
            "fpr",
            SpecBuilder::new(&[
                "cat",
                "/sys/module/page_reporting/parameters/page_reporting_order",
            ]),
        )?;
        pod.wait("fpr", "")?;
        pod.remove("fpr")?;
        pod.check(
            order.trim() == "4",
            format!("page_reporting_order is {:?}, want 4", order.trim()),
        )
    })
}

fn root_is_pivoted_overlay() -> Result<(), Failed> {
    with_pod(|pod| {
        let info =
            pod.run_for_stdout("root", SpecBuilder::new(&["cat", "/proc/self/mountinfo"]))?;
        let all = mounts(&info);
        let root = all.iter().rev().find(|(mp, _, _)| mp == "/");
        match root {
            Some((_, fstype, opts)) => {
                pod.check(
                    fstype == "overlay",
                    format!("the container's / is {fstype}, not overlay:\n{info}"),
                )?;
                pod.check(
                    opts.contains(&format!("lowerdir={IMAGE_MOUNT}")),
                    format!("the container's / overlay is not on the image ({opts}):\n{info}"),
                )?;
            }
            None => return Err(pod.fail(format!("no mount for / in the container:\n{info}"))),
        }
        pod.check(
            !all.iter().any(|(_, fstype, _)| fstype == "rootfs"),
            format!("the initramfs (rootfs) is visible in the container:\n{info}"),
        )?;
        let wait = pod.wait("root", "")?;
        pod.check(
            wait.exit_status == 0,
            format!("cat mountinfo exit {}", wait.exit_status),
        )?;
        pod.remove("root")?;

        // The agent's own root, seen from a container in its PID namespace.
        let host = pod.host_container()?;
        let (agent_info, status) = pod.exec_out(
            host,
            "agent-mountinfo",
            &SpecBuilder::new(&["sh", "-c", "cat /proc/1/comm /proc/1/mountinfo"])
                .capability("CAP_SYS_PTRACE"),
        )?;
        pod.check(
            status == 0,
            format!("reading the agent's /proc/1/mountinfo: exit {status}: {agent_info:?}"),
        )?;
        let agent_root = mounts(&agent_info)
            .into_iter()
            .rev()
            .find(|(mp, _, _)| mp == "/");
        pod.check(
            matches!(&agent_root, Some((_, fstype, _)) if fstype != "rootfs"),
            format!(
                "the agent's / is {agent_root:?}: it did not leave the initramfs, so \
                 containers get MS_MOVE + chroot instead of pivot_root:\n{agent_info}"
            ),
        )
    })
}

/// SetupNetwork moves the NIC (by MAC) from the agent's namespace into the pod's as eth0
/// with an address and a default route: a pod container sees it and reaches the peer
/// namespace through the TAP's namespace; the agent's namespace (a host-network
/// container) and a container with a new network namespace have no such NIC.
fn setup_network_pod_netns() -> Result<(), Failed> {
    with_pod(|pod| {
        if let Err(e) = &pod.net {
            return Err(format!("no network lab, the VM has no NIC: {e}").into());
        }
        let host = pod.host_container()?;
        let links = SpecBuilder::new(&["ip", "-o", "link"]);
        let (before, _) = pod.exec_out(host, "links-before", &links)?;
        pod.check(
            before.contains(NET_MAC),
            format!("the guest NIC {NET_MAC} is not in the agent's namespace before SetupNetwork:\n{before}"),
        )?;
        let request = |mac: &str| SetupNetworkRequest {
            interfaces: vec![Interface {
                mac: mac.into(),
                name: "eth0".into(),
                mtu: 1400,
                addresses: vec![format!("{}/24", netns::GUEST_IP)],
                ..Default::default()
            }],
            routes: vec![Route {
                destination: "default".into(),
                gateway: netns::TAP_IP.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        pod.vm
            .client
            .setup_network(&request(NET_MAC))
            .map_err(|e| pod.fail(format!("SetupNetwork: {e}")))?;
        pod.vm
            .client
            .setup_network(&request(&NET_MAC.to_uppercase()))
            .map_err(|e| {
                pod.fail(format!(
                    "a second SetupNetwork (same request, MAC in upper case) failed: {e}"
                ))
            })?;

        sleeper(pod, "netpod")?;
        let (link, _) = pod.exec_out(
            "netpod",
            "link",
            &SpecBuilder::new(&["ip", "-o", "link", "show", "eth0"]),
        )?;
        pod.check(
            link.contains(NET_MAC) && link.contains("mtu 1400") && link.contains(",UP"),
            format!("eth0 in the pod is not the NIC, up, with MTU 1400:\n{link}"),
        )?;
        let (addr, _) = pod.exec_out(
            "netpod",
            "addr",
            &SpecBuilder::new(&["ip", "-o", "addr", "show", "dev", "eth0"]),
        )?;
        pod.check(
            addr.contains(&format!("inet {}/24", netns::GUEST_IP)),
            format!("eth0 in the pod lacks {}/24:\n{addr}", netns::GUEST_IP),
        )?;
        pod.check(
            addr.matches("inet ").count() == 1,
            format!("eth0 has other than one IPv4 address after two SetupNetwork calls:\n{addr}"),
        )?;
        let (routes, _) = pod.exec_out("netpod", "route", &SpecBuilder::new(&["ip", "route"]))?;
        pod.check(
            routes.contains(&format!("default via {}", netns::TAP_IP)),
            format!(
                "no default route via {} in the pod:\n{routes}",
                netns::TAP_IP
            ),
        )?;
        let (ping, status) = pod.exec_out(
            "netpod",
            "ping",
            &SpecBuilder::new(&["ping", "-c", "1", "-W", "10", netns::TAP_IP]),
        )?;
        pod.check(
            status == 0,
            format!(
                "ping {} (the TAP) from the pod failed ({status}):\n{ping}",
                netns::TAP_IP
            ),
        )?;
        // No `wget -T`: Debian's busybox-static 1.35 wget segfaults with it.
        let url = format!("http://{}:{PEER_PORT}/token", netns::PEER_IP);
        let fetch = format!(
            "for i in 1 2 3 4 5; do timeout 15 wget -q -O - {url} 2>&1 && exit 0; sleep 1; done; exit 1"
        );
        let (body, status) =
            pod.exec_out("netpod", "wget", &SpecBuilder::new(&["sh", "-c", &fetch]))?;
        pod.check(
            status == 0 && body == PEER_TOKEN,
            format!("wget {url} from the pod: exit {status}, body {body:?} (want {PEER_TOKEN:?})"),
        )?;

        // The agent's namespace kept no NIC (lo and the kernel's fallback tunnels only).
        let (after, _) = pod.exec_out(host, "links-after", &links)?;
        pod.check(
            !after.contains(NET_MAC) && !after.contains("link/ether"),
            format!(
                "the agent's namespace still has an Ethernet interface after SetupNetwork \
                 (interfaces {:?}):\n{after}",
                link_names(&after)
            ),
        )?;
        // A container with a network namespace of its own: no NIC either.
        let mut out = None;
        pod.run_spec(
            "netiso",
            SpecBuilder::new(&["ip", "-o", "link"]),
            stdout_only(),
            |p| {
                out = Some(p.stdout("netiso", "")?);
                Ok(())
            },
        )?;
        let iso = pod.read_all(out.ok_or("no stdout stream")?, "netiso ip link")?;
        let names = link_names(&iso);
        pod.check(
            names.iter().any(|n| n == "lo")
                && !names.iter().any(|n| n == "eth0")
                && !iso.contains("link/ether"),
            format!(
                "a container in a new network namespace should have lo and no Ethernet \
                 interface, has {names:?}:\n{iso}"
            ),
        )?;
        pod.remove("netiso")?;
        pod.remove("netpod")
    })
}

/// Interface names from `ip -o link` ("1: lo: <...").
fn link_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

/// A container's process must not reach the agent: its ports are vsock only, the guest
/// has no vsock loopback (its own CID, or CID 1), and the host does not listen on the
/// agent's port numbers. A host port that does listen is the control: the probe can
/// connect at all.
fn containers_cannot_reach_the_agent_api() -> Result<(), Failed> {
    with_pod(|pod| {
        let control = vmm_api::vsock::host_port_path(&pod.vm.vsock, 5555);
        let _ = std::fs::remove_file(&control);
        let listener = std::os::unix::net::UnixListener::bind(&control)
            .map_err(|e| format!("control listener {}: {e}", control.display()))?;
        let targets = ["1 1024", "3 1024", "3 1025", "2 1024", "2 1025", "2 5555"];
        let script: String = targets
            .iter()
            .map(|t| {
                format!("echo \"{t}: $(/bin/cocoon-vsock-probe expect-unreachable {t} 2>&1)\"; ")
            })
            .collect();
        let mut out = None;
        pod.run(
            "novsock",
            SpecBuilder::new(&["sh", "-c", &script]),
            stdout_only(),
            |p| {
                out = Some(p.stdout("novsock", "")?);
                Ok(())
            },
        )?;
        let text = pod.read_all(out.ok_or("no stdout stream")?, "probe output")?;
        drop(listener);
        let _ = std::fs::remove_file(&control);
        for t in &targets[..5] {
            pod.check(
                text.lines()
                    .any(|l| l.starts_with(&format!("{t}: UNREACHABLE-OK"))),
                format!("a container reached vsock {t} (CID PORT):\n{text}"),
            )?;
        }
        pod.check(
            text.lines()
                .any(|l| l.starts_with("2 5555: FAIL connected")),
            format!("control: the probe could not reach a listening host port:\n{text}"),
        )?;
        let wait = pod.wait("novsock", "")?;
        pod.check(
            wait.exit_status == 0,
            format!("probe script exit {}", wait.exit_status),
        )?;
        pod.remove("novsock")
    })
}
