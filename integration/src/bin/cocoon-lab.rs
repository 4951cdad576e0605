//! `cocoon-lab`: the test lab from the command line.
//!
//!   cocoon-lab run [--timeout SECS] [--out DIR] -- COMMAND [ARGS...]
//!   cocoon-lab shell

use anyhow::{bail, Context, Result};
use cocoon_integration::lab::{Job, Lab, Outcome};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const HELP: &str = "\
cocoon-lab: run commands with real KVM inside the test lab (QEMU TCG + emulated AMD SVM)

Usage:
  cocoon-lab run [--timeout SECS] [--out DIR] -- COMMAND [ARGS...]
      Boot the lab, run COMMAND in the current directory (the host's / is visible
      read-only; /tmp, /run, /root are scratch tmpfs), stream its output, exit with its
      status. Files the command writes to $COCOON_LAB_OUT are copied to DIR.
      Exit status 124: timed out; 125: the lab kernel panicked or the lab failed.
  cocoon-lab shell
      An interactive shell inside the lab (Ctrl-A X quits).
";

fn main() -> Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("shell") => {
            let status = Lab::from_build()?.shell()?;
            Ok(ExitCode::from(status.code().unwrap_or(1) as u8))
        }
        Some("help") | Some("--help") | Some("-h") | None => {
            print!("{HELP}");
            Ok(ExitCode::SUCCESS)
        }
        Some(other) => bail!("unknown command '{other}'; see `cocoon-lab --help`"),
    }
}

fn run(args: &[String]) -> Result<ExitCode> {
    let mut timeout = Duration::from_secs(600);
    let mut out = None;
    let mut rest = args.iter();
    let command: Vec<String> = loop {
        match rest.next().map(String::as_str) {
            Some("--timeout") => {
                let v = rest.next().context("--timeout needs seconds")?;
                timeout = Duration::from_secs(v.parse().context("--timeout needs seconds")?);
            }
            Some("--out") => {
                out = Some(PathBuf::from(
                    rest.next().context("--out needs a directory")?,
                ))
            }
            Some("--") => break rest.cloned().collect(),
            Some(other) => bail!("unexpected argument '{other}' (the command goes after --)"),
            None => bail!("no command given (cocoon-lab run -- COMMAND ...)"),
        }
    };
    if command.is_empty() {
        bail!("no command given after --");
    }
    let mut job = Job::new(command);
    job.timeout = timeout;
    job.out_dir = out;
    let run = Lab::from_build()?.run(&job)?;
    eprintln!(
        "cocoon-lab: {} (lab boot {:.1}s, total {:.1}s)",
        run.outcome,
        run.boot.map(|b| b.as_secs_f64()).unwrap_or(0.0),
        run.wall.as_secs_f64()
    );
    Ok(match run.outcome {
        Outcome::Exited(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        Outcome::TimedOut => ExitCode::from(124),
        Outcome::Panicked | Outcome::InfraFailure(_) => {
            eprintln!("--- last console lines ---\n{}", run.console_tail(40));
            ExitCode::from(125)
        }
    })
}
