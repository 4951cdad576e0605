//! `cocoon-agent`: PID 1 of the Cocoon guest.
//!
//! It mounts the kernel filesystems, reports ready on the console and then stays up as
//! init: reaping orphans and never exiting (PID 1 exiting panics the kernel). With
//! `cocoon.selftest=1` on the kernel command line it powers the VM off instead.

mod init;

use cocoon_agent_protocol::{cmdline_flag, ReadyLine, SELFTEST_PARAM};
use std::io::Write;

fn main() {
    let mounts = init::mount_kernel_filesystems();
    for err in mounts.iter().filter_map(|r| r.as_ref().err()) {
        // Keep going: a missing /sys should not cost us the console and the host link.
        eprintln!("cocoon-agent: {err}");
    }

    let ready = ReadyLine {
        uptime_ms: init::uptime_ms(),
    };
    let mut out = std::io::stdout().lock();
    // The console is all we have: if it is gone there is nobody to tell.
    let _ = writeln!(out, "{ready}");
    let _ = out.flush();
    drop(out);

    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline_flag(&cmdline, SELFTEST_PARAM) {
        let err = init::power_off();
        eprintln!("cocoon-agent: power off failed: {err}");
    }
    init::reap_forever();
}
