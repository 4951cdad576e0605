//! Where VM-level work runs: tests (`integration/tests/vm.rs`) and benchmarks that boot
//! guests need a KVM that boots stock Linux.
//!
//! On such a host (hardware vmx/svm, or inside the test lab) they run directly. Elsewhere
//! (PVM, no KVM) the same binary is run again, with the same arguments, inside one test-lab
//! boot. The choice is printed; nothing is skipped silently.

use crate::lab::{Job, Lab, LabRun, Outcome};
use cocoon_runtime::host::{detect_kvm, Kvm};
use libtest_mimic::{Arguments, Failed, Trial};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

/// Where guest-booting work runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// This host's KVM boots stock kernels (or this is the lab).
    Here { kvm: Kvm, in_lab: bool },
    /// Run again inside the test lab.
    Lab { kvm: Kvm },
    /// Inside the lab, yet KVM is unusable: the lab kernel is misbuilt.
    Broken { kvm: Kvm },
}

/// Whether this process runs inside the test lab (its init sets `COCOON_IN_LAB`).
pub fn in_lab() -> bool {
    std::env::var_os("COCOON_IN_LAB").is_some()
}

/// Whether `text` (a VMM log, or an error or log line quoting one) says the guest reset
/// or powered itself off: the VMM's vCPU line, or its final exit line.
pub fn says_guest_reset(text: &str) -> bool {
    text.contains("guest shut down or reset") || text.contains("exit=GuestShutdown")
}

/// Whether `text` holds an agent call that got no answer in time (`AgentError`'s
/// timeout, as the runtime and the test clients word it).
pub fn says_agent_hung(text: &str) -> bool {
    text.contains("no answer within") || text.contains("has not answered the health check")
}

/// What kind of fault `text` (a failure report, a log) shows, for counting reruns across
/// runs: a guest that reset itself, a VM declared dead by the runtime's liveness rule, an
/// agent call that got no answer, or something else.
pub fn fault_signature(text: &str) -> &'static str {
    if says_guest_reset(text) {
        "guest reset"
    } else if text.contains("declared dead") {
        "VM declared dead (agent silent)"
    } else if says_agent_hung(text) {
        "agent silent"
    } else {
        "other"
    }
}

/// How many checks or scenarios one suite run may run again after a lab fault: more
/// fails the run, so that a VMM regression that resets or hangs guests cannot hide
/// behind reruns.
pub const LAB_RERUN_BUDGET: usize = 2;

/// `what: signature` of every rerun of this run.
static RERUNS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records that `what` runs again after a fault whose report is `report`; prints the
/// line that counts it.
pub fn count_rerun(what: &str, report: &str) {
    let line = format!("{what}: {}", fault_signature(report));
    eprintln!("lab rerun: {line}");
    RERUNS.lock().unwrap_or_else(|p| p.into_inner()).push(line);
}

/// Prints how many reruns this run made and which; false if they exceed
/// [`LAB_RERUN_BUDGET`].
pub fn reruns_within_budget(suite: &str) -> bool {
    let reruns = RERUNS.lock().unwrap_or_else(|p| p.into_inner());
    eprintln!(
        "{suite}: {} rerun(s) after lab faults (budget {LAB_RERUN_BUDGET})",
        reruns.len()
    );
    for r in reruns.iter() {
        eprintln!("{suite}: rerun: {r}");
    }
    if reruns.len() > LAB_RERUN_BUDGET {
        eprintln!(
            "failed: {suite}: {} reruns after lab faults exceed the budget of {LAB_RERUN_BUDGET}",
            reruns.len()
        );
        return false;
    }
    true
}

pub fn placement() -> Placement {
    let kvm = detect_kvm();
    let in_lab = in_lab();
    match (kvm.boots_stock_kernel(), in_lab) {
        (true, _) => Placement::Here { kvm, in_lab },
        (false, false) => Placement::Lab { kvm },
        (false, true) => Placement::Broken { kvm },
    }
}

/// Runs this executable again, with the same arguments, inside one lab boot, and returns
/// its exit status. `what` names the work in messages.
pub fn rerun_in_lab(what: &str, timeout: Duration) -> ExitCode {
    match try_rerun_in_lab(what, timeout) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{what}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_rerun_in_lab(what: &str, timeout: Duration) -> anyhow::Result<ExitCode> {
    let run = run_self_in_lab(what, &Lab::from_build()?, timeout, None)?;
    match &run.outcome {
        Outcome::Exited(0) => Ok(ExitCode::SUCCESS),
        Outcome::Exited(c) => Ok(ExitCode::from(u8::try_from(*c).unwrap_or(1).max(1))),
        other => {
            anyhow::bail!(
                "{other}\n--- last console lines ---\n{}",
                run.console_tail(40)
            )
        }
    }
}

/// Runs this executable again, with the same arguments, inside one boot of `lab` (`out_dir`:
/// where the lab's `$COCOON_LAB_OUT` comes back to) and prints the boot and total time. A
/// panicked or oopsed lab kernel is retried once: seen rarely, QEMU's TCG executing stale
/// code after the lab kernel patches its own text, and a stack guard page hit in the lab
/// kernel's page fault entry while running a nested guest (faults of the emulated
/// machine, not of the work inside it).
pub fn run_self_in_lab(
    what: &str,
    lab: &Lab,
    timeout: Duration,
    out_dir: Option<PathBuf>,
) -> anyhow::Result<LabRun> {
    let exe = std::env::current_exe()?;
    let mut argv = vec![exe.to_string_lossy().into_owned()];
    argv.extend(std::env::args().skip(1));
    let mut job = Job::new(argv);
    job.timeout = timeout;
    job.out_dir = out_dir;
    let mut run = lab.run(&job)?;
    if run.outcome == Outcome::Panicked {
        eprintln!("lab rerun: {what}: lab kernel panicked or oopsed");
        eprintln!(
            "{what}: the lab kernel panicked; retrying once\n--- last console lines ---\n{}",
            run.console_tail(30)
        );
        run = lab.run(&job)?;
        run.attempts += 1;
    }
    eprintln!(
        "{what}: lab boot {:.1}s, total {:.1}s{}",
        run.boot.map(|b| b.as_secs_f64()).unwrap_or(0.0),
        run.wall.as_secs_f64(),
        if run.attempts > 1 {
            " (after one retry)"
        } else {
            ""
        }
    );
    Ok(run)
}

thread_local! {
    /// The [`test`] running on this thread.
    static CURRENT: std::cell::Cell<&'static str> = const { std::cell::Cell::new("") };
}

/// The name of the [`test`] running on this thread ("" outside one).
pub fn current_test() -> &'static str {
    CURRENT.with(|c| c.get())
}

/// `name: first line of why` of every failed [`test`], for the end of the run.
static FAILED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// A VM test whose failure [`main`] repeats in one line at the end of the run, where a CI
/// log's tail shows it (the full report is printed in its place, far above).
pub fn test(name: &'static str, f: fn() -> Result<(), Failed>) -> Trial {
    Trial::test(name, move || {
        CURRENT.with(|c| c.set(name));
        f().inspect_err(|e| {
            let why = e.message().and_then(|m| m.lines().next()).unwrap_or("");
            FAILED
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!("{name}: {why}"));
        })
    })
}

/// Runs libtest-mimic, then the one-line reasons of the failed [`test`]s.
fn run(args: &Arguments, trials: Vec<Trial>) -> ExitCode {
    let code = libtest_mimic::run(args, trials).exit_code();
    let within = reruns_within_budget("vm tests");
    for line in FAILED.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        eprintln!("failed: {line}");
    }
    if within {
        code
    } else {
        ExitCode::FAILURE
    }
}

/// Runs `trials` where KVM is real: here, or inside the test lab (one boot for all).
pub fn main(trials: Vec<Trial>) -> ExitCode {
    let mut args = Arguments::from_args();
    if in_lab() && args.test_threads.is_none() {
        // One nested guest at a time: the emulated machine is slow and has shown rare
        // faults with several nested VMs at once (see docs/test-lab.md).
        args.test_threads = Some(1);
    }
    if args.list {
        return libtest_mimic::run(&args, trials).exit_code();
    }
    match placement() {
        Placement::Here { kvm, in_lab } => {
            let place = if in_lab {
                "inside the test lab"
            } else {
                "directly on this host"
            };
            eprintln!("vm tests: {kvm}: running {place}");
            run(&args, trials)
        }
        Placement::Broken { kvm } => {
            eprintln!(
                "vm tests: KVM inside the test lab is unusable ({kvm}); the lab kernel is misbuilt"
            );
            ExitCode::FAILURE
        }
        Placement::Lab { kvm } => {
            eprintln!("vm tests: this host has {kvm}; running them inside the test lab (one boot)");
            rerun_in_lab("vm tests", Duration::from_secs(30 * 60))
        }
    }
}
