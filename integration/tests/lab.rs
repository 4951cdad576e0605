//! The test lab runner: a command's output and exit status come back, files come out, and
//! failing, hanging and panicking runs are reported as such, leaving nothing behind.
//! Each test boots a lab (several seconds under TCG), one at a time.

use cocoon_integration::lab::{Job, Lab, LabRun, Outcome};
use std::sync::Mutex;
use std::time::Duration;

static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

fn run(script: &str, timeout_s: u64, out: Option<&std::path::Path>) -> LabRun {
    let _guard = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::from_build().expect("test lab (make lab-kernel)");
    let mut job = Job::new(["sh", "-c", script]);
    job.timeout = Duration::from_secs(timeout_s);
    job.out_dir = out.map(Into::into);
    let run = lab.run(&job).expect("run the lab");
    assert_left_nothing_behind(&run);
    run
}

fn assert_left_nothing_behind(run: &LabRun) {
    assert!(
        !std::path::Path::new(&format!("/proc/{}", run.qemu_pid)).exists(),
        "lab QEMU {} still exists",
        run.qemu_pid
    );
    assert!(
        !run.job_dir.exists(),
        "job dir {} left behind",
        run.job_dir.display()
    );
}

#[test]
fn command_runs_with_real_kvm_and_passes_files_out() {
    let out = tempfile::tempdir().expect("tempdir");
    // A host file under /tmp (where a CI clone may live) must stay visible in the lab,
    // and the lab's writes there must not reach the host.
    let host_file = tempfile::NamedTempFile::new().expect("tempfile");
    std::fs::write(host_file.path(), "from-the-host").expect("write");
    let host_path = host_file.path().display().to_string();
    let run = run(
        &format!(
            "echo hello from the lab; grep -qw svm /proc/cpuinfo && test -c /dev/kvm && echo kvm-ok; \
             echo payload >$COCOON_LAB_OUT/result.txt; touch /tmp/scratch-is-writable && echo rw-ok; \
             echo seen-$(cat {host_path}); echo changed >{host_path}"
        ),
        120,
        Some(out.path()),
    );
    let output = run.output.join("\n");
    assert_eq!(run.outcome, Outcome::Exited(0), "{}", run.console_tail(40));
    assert_eq!(
        std::fs::read_to_string(host_file.path()).expect("read"),
        "from-the-host",
        "the lab wrote through to the host"
    );
    for want in [
        "hello from the lab",
        "kvm-ok",
        "rw-ok",
        "seen-from-the-host",
    ] {
        assert!(
            output.contains(want),
            "missing {want:?} in output:\n{output}"
        );
    }
    let file = std::fs::read_to_string(out.path().join("result.txt")).expect("result file");
    assert_eq!(file, "payload\n");
    eprintln!("lab boot {:?}, wall {:?}", run.boot, run.wall);
}

#[test]
fn failing_command_reports_its_status_and_output() {
    let run = run("echo about to fail; exit 3", 120, None);
    assert_eq!(run.outcome, Outcome::Exited(3), "{}", run.console_tail(40));
    assert_eq!(run.output, vec!["about to fail".to_string()]);
}

#[test]
fn hanging_command_times_out() {
    let run = run("echo started; sleep 1000", 15, None);
    assert_eq!(run.outcome, Outcome::TimedOut, "{}", run.console_tail(40));
    assert!(
        run.output.iter().any(|l| l == "started"),
        "{:?}",
        run.output
    );
}

#[test]
fn lab_kernel_panic_is_reported() {
    let run = run(
        "echo before the crash; echo c >/proc/sysrq-trigger; sleep 100",
        120,
        None,
    );
    assert_eq!(run.outcome, Outcome::Panicked, "{}", run.console_tail(40));
    assert!(
        run.output.iter().any(|l| l == "before the crash"),
        "{:?}",
        run.output
    );
}
