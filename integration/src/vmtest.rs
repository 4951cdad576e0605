//! The harness for VM-level tests (`integration/tests/vm.rs`).
//!
//! VM-level tests need a KVM that boots stock Linux. On such a host (hardware vmx/svm, or
//! inside the test lab) they run directly. Elsewhere (PVM, no KVM) the harness boots the
//! test lab once and runs the same test binary, with the same arguments, inside it: all
//! VM-level tests share one lab boot. The choice is printed; nothing is skipped silently.

use crate::lab::{Job, Lab, Outcome};
use cocoon_runtime::host::detect_kvm;
use libtest_mimic::{Arguments, Trial};
use std::process::ExitCode;
use std::time::Duration;

/// Time all VM-level tests together may take inside the lab.
const LAB_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Runs `trials` where KVM is real: here, or inside the test lab.
pub fn main(trials: Vec<Trial>) -> ExitCode {
    let args = Arguments::from_args();
    let kvm = detect_kvm();
    let in_lab = std::env::var_os("COCOON_IN_LAB").is_some();
    if args.list {
        return libtest_mimic::run(&args, trials).exit_code();
    }
    if kvm.boots_stock_kernel() {
        let place = if in_lab {
            "inside the test lab"
        } else {
            "directly on this host"
        };
        eprintln!("vm tests: {kvm}: running {place}");
        return libtest_mimic::run(&args, trials).exit_code();
    }
    if in_lab {
        eprintln!(
            "vm tests: KVM inside the test lab is unusable ({kvm}); the lab kernel is misbuilt"
        );
        return ExitCode::FAILURE;
    }
    eprintln!("vm tests: this host has {kvm}; running them inside the test lab (one boot)");
    match run_in_lab() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vm tests: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_in_lab() -> anyhow::Result<ExitCode> {
    let lab = Lab::from_build()?;
    let exe = std::env::current_exe()?;
    let mut argv = vec![exe.to_string_lossy().into_owned()];
    argv.extend(std::env::args().skip(1));
    let mut job = Job::new(argv);
    job.timeout = LAB_TIMEOUT;
    let run = lab.run(&job)?;
    eprintln!(
        "vm tests: lab boot {:.1}s, total {:.1}s{}",
        run.boot.map(|b| b.as_secs_f64()).unwrap_or(0.0),
        run.wall.as_secs_f64(),
        if run.attempts > 1 {
            " (after one retry)"
        } else {
            ""
        }
    );
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
