//! `cocoon-vmm`: see the library docs and `cocoon-vmm --help`.

use cocoon_vmm::config::{self, ConfigError, VmConfig, USAGE};
use cocoon_vmm::vm::{Vm, VmExit};
use std::process::ExitCode;

const EXIT_FAILED: u8 = 1;
const EXIT_BAD_CONFIG: u8 = 2;

fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(u64::MAX)
}

/// Each vsock connection costs a descriptor: allow as many as the hard limit does.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn init_logging(config: &VmConfig) -> Result<(), ConfigError> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COCOON_VMM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    match &config.log {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| ConfigError::Log {
                    path: path.clone(),
                    source,
                })?;
            builder.with_writer(std::sync::Mutex::new(file)).init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--help") | Some("-h") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some("--version") | Some("-V") => {
            println!("cocoon-vmm {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let bad = |e: ConfigError| {
        eprintln!("cocoon-vmm: {e}");
        ExitCode::from(EXIT_BAD_CONFIG)
    };
    let config = match VmConfig::from_args(&args) {
        Ok(c) => c,
        Err(e) => return bad(e.into()),
    };
    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(k) => k,
        Err(e) => return bad(ConfigError::Kvm(e.to_string())),
    };
    if let Err(e) = config::validate(&config, kvm.get_max_vcpus() as u32, host_memory_mib()) {
        return bad(e);
    }
    if let Err(e) = init_logging(&config) {
        return bad(e);
    }
    raise_fd_limit();
    let vm = match Vm::start(&kvm, &config) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("cocoon-vmm: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    if let Some(path) = &config.control_socket {
        if let Err(e) = cocoon_vmm::control::serve(path, vm.clone()) {
            eprintln!("cocoon-vmm: {e}");
            vm.finish(VmExit::Failed(e.to_string()));
        }
    }
    let exit = vm.wait();
    if let Some(path) = &config.control_socket {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!(?exit, "VM ended");
    match exit {
        VmExit::GuestShutdown | VmExit::ControlShutdown => ExitCode::SUCCESS,
        VmExit::Failed(why) => {
            eprintln!("cocoon-vmm: {why}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}
