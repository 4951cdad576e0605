//! `cocoon`: the operator CLI. The work of each command is in `cocoon_runtime::cli`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use cocoon_runtime::cli;
use cocoon_runtime::config::{Config, CONFIG_ENV, DEFAULT_CONFIG_PATH};
use cocoon_runtime::error::chain;

/// Operate Cocoon, the containerd runtime that runs each Kubernetes pod in its own KVM
/// microVM.
#[derive(Parser)]
#[command(
    name = "cocoon",
    version,
    after_help = "\
The configuration is /etc/cocoon/config.toml (or $COCOON_CONFIG, or --config); a missing
file means the built-in defaults. Sandboxes live in its state_dir (/run/cocoon/<id>/),
image disks in its image_dir (/var/lib/cocoon/images).

Examples:
  cocoon check                 is this host ready?
  cocoon ps                    which pods run here, how big, how old
  cocoon console 3f2a -f       follow the guest console of sandbox 3f2a...
  cocoon gc --dry-run          what dead sandboxes and unused images would be removed"
)]
struct Cli {
    /// The configuration file [default: $COCOON_CONFIG, else /etc/cocoon/config.toml]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Report whether this host can run Cocoon sandboxes, with a fix hint per problem
    #[command(
        long_about = "\
Report whether this host can run Cocoon sandboxes: one line per item, OK or FAIL, and
for each failure a `fix:` line.

Checked: the configuration file; /dev/kvm and its flavour (hardware KVM boots the stock
guest kernel, PVM does not); /dev/net/tun; `containerd --version`; the guest kernel and
initramfs and the cocoon-vmm binary named by the configuration (`kernel`, `initramfs`,
`vmm`); mkfs.erofs and mkfs.ext4 in PATH; the cgroup hierarchy (v1 or v2).

Exits 1 when a required item fails.",
        after_help = "Example:\n  cocoon check && echo ready\n  COCOON_CONFIG=/tmp/test.toml cocoon check"
    )]
    Check,
    /// List the sandboxes (pod VMs) on this host
    #[command(
        long_about = "\
List the sandboxes on this host: every directory of the configuration's state_dir
(/run/cocoon/<id>/), with the pod it belongs to (from containerd's bundle, when it is
there), the state of its VMM (running; dead: vmm.pid names a process that is gone; no-vmm:
no pid file), the containers in pod.json, the VMM's pid, its vCPUs and memory (from its
command line), its resident memory (VmRSS) and how long it has been running.",
        after_help = "Examples:\n  cocoon ps\n  cocoon ps --json | jq '.[] | select(.state == \"dead\") | .id'"
    )]
    Ps {
        /// Print a JSON array instead of the table (full ids, sizes in KiB, uptime in seconds)
        #[arg(long)]
        json: bool,
    },
    /// Print a sandbox's guest console (kernel and agent output)
    #[command(
        long_about = "\
Print the guest serial console of a sandbox: <state_dir>/<id>/console.log, which holds
the guest kernel's boot messages and the agent's log. The sandbox is named by its id or
any prefix that only one sandbox has (see `cocoon ps`).",
        after_help = "Examples:\n  cocoon console 3f2a9c\n  cocoon console 3f2a9c -f    # follow, like tail -f"
    )]
    Console {
        /// Sandbox id, or a unique prefix of it
        sandbox: String,
        /// Keep printing what the guest writes, until interrupted or the sandbox is removed
        #[arg(short, long)]
        follow: bool,
    },
    /// Manage read-only image disks
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Remove what dead sandboxes left behind, and image disks no one uses
    #[command(
        long_about = "\
Remove the sandbox directories of VMs that are gone, then unused image disks.

A sandbox is removed only when its vmm.pid names a process that no longer runs and no
running process (a shim, a VMM) refers to it on its command line; its TAP and tc filters,
image references and writable disks go with it, as the shim's own cleanup does.
Directories without vmm.pid (a sandbox being created) are left alone. Then the image
cache in image_dir drops every disk without a holder.",
        after_help = "Examples:\n  cocoon gc --dry-run\n  cocoon gc"
    )]
    Gc {
        /// Only print what would be removed
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build the image disk of a layer chain ahead of time
    #[command(
        long_about = "\
Build the EROFS image disk of a layer chain now, so that the first pod using the image
does not wait for it. The lower directories are given topmost first, as in overlay's
lowerdir= (separate arguments or one colon-separated list). The disk goes to the
configuration's image_dir, keyed by the layer chain; it stays cached, without a holder,
until `cocoon gc` finds it unused. Prints the disk's path and whether it was built or
already cached; progress goes to stderr.",
        after_help = "\
Example (the layers of a running container, from its overlay mount):
  cocoon image prepare $(findmnt -no OPTIONS /run/containerd/.../rootfs | tr , '\\n' | grep ^lowerdir=)
  cocoon image prepare /var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/{12,11}/fs"
    )]
    Prepare {
        /// Lower directories, topmost first (or one `a:b:c` list)
        #[arg(required = true, value_name = "LOWERDIR")]
        lowerdirs: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain on one line, each cause once, and no backtrace.
            eprintln!("cocoon: {}", chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let config_path = cli.config.clone().unwrap_or_else(default_config_path);
    if let Command::Check = cli.command {
        return check(&config_path);
    }
    let config = Config::load(&config_path)?;
    match cli.command {
        Command::Check => unreachable!("handled above"),
        Command::Ps { json } => {
            let list = cli::ps::list(&config, Path::new(cli::ps::CONTAINERD_BUNDLES))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no sandboxes in {}", config.state_dir.display());
            } else {
                print!("{}", cli::ps::render(&list));
                for s in &list {
                    for w in &s.warnings {
                        eprintln!("warning: sandbox {}: {w}", s.id);
                    }
                }
            }
        }
        Command::Console { sandbox, follow } => {
            let path = cli::console::log_path(&config, &sandbox)?;
            cli::console::print(&path, follow, &mut std::io::stdout().lock())?;
        }
        Command::Image {
            command: ImageCommand::Prepare { lowerdirs },
        } => {
            let dirs = cli::image::lowerdirs(&lowerdirs)?;
            let disk = cli::image::prepare(&config, &dirs, &mut std::io::stderr())?;
            let how = if disk.built {
                "built"
            } else {
                "already cached"
            };
            println!("{} ({how})", disk.path.display());
        }
        Command::Gc { dry_run } => {
            let report = cli::gc::run(&config, dry_run)?;
            print!("{}", cli::gc::render(&report, dry_run));
            let _ = std::io::stdout().flush();
            for e in &report.errors {
                eprintln!("error: {e}");
            }
            if !report.errors.is_empty() {
                anyhow::bail!("gc: {} error(s), see above", report.errors.len());
            }
        }
    }
    Ok(())
}

fn default_config_path() -> PathBuf {
    match std::env::var_os(CONFIG_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_CONFIG_PATH),
    }
}

fn check(config_path: &Path) -> Result<()> {
    let loaded = Config::load(config_path);
    let items = match &loaded {
        Ok(config) => cli::check::run(Ok((config, config_path))),
        Err(e) => cli::check::run(Err((chain(e), config_path))),
    };
    print!("{}", cli::check::render(&items));
    match cli::check::failures(&items) {
        0 => Ok(()),
        n => Err(cli::Error::NotReady(n).into()),
    }
}
