//! The guest image boots under QEMU's software emulation to the agent's ready line and
//! powers off: an independent check of kernel + initramfs, needing no KVM at all.

use cocoon_integration::qemu::{boot_guest, Accel, GuestSpec};

#[test]
fn guest_image_boots_to_ready_under_tcg() {
    let boot = boot_guest(&GuestSpec::selftest(Accel::Tcg)).expect("start QEMU");
    let console = boot.console_text();
    assert!(
        !boot.timed_out,
        "guest did not power off in time:\n{console}"
    );
    let ready = boot.ready.unwrap_or_else(|| {
        panic!(
            "no ready line on the console:\n{console}\n{}",
            boot.qemu_stderr
        )
    });
    assert!(ready.uptime_ms > 0, "implausible uptime in {ready}");
    // Power-off (not a panic-reboot) ends QEMU with status 0.
    assert_eq!(
        boot.status.and_then(|s| s.code()),
        Some(0),
        "console:\n{console}"
    );
    assert!(!console.contains("Kernel panic"), "{console}");
    eprintln!(
        "guest ready at uptime {} ms, QEMU wall {:?}",
        ready.uptime_ms, boot.wall
    );
}

#[test]
fn agent_stays_up_as_init_without_selftest() {
    // Without cocoon.selftest=1 the agent must stay PID 1 (never exit, which would
    // panic the kernel): QEMU is still running at the deadline.
    let mut spec = GuestSpec::selftest(Accel::Tcg);
    spec.cmdline_extra.clear();
    spec.timeout = std::time::Duration::from_secs(15);
    let boot = boot_guest(&spec).expect("start QEMU");
    let console = boot.console_text();
    assert!(boot.ready.is_some(), "no ready line:\n{console}");
    assert!(boot.timed_out, "guest stopped on its own:\n{console}");
    assert!(!console.contains("Kernel panic"), "{console}");
}
