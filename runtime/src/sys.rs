//! The system calls the runtime makes beyond std, written once: pidfds (nix 0.29 has
//! none, hence raw syscalls), waiting for a readable fd, the nsfs check and the TAP open.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::statfs::{statfs, NSFS_MAGIC};

/// A pidfd for `pid`: it pins the process, so a signal sent through it cannot hit a
/// recycled pid, and it becomes readable when the process ends.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory
    // of ours is involved.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this fd to us, so we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `signal` to the process `pidfd` refers to.
pub fn pidfd_send_signal(pidfd: &OwnedFd, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: pidfd_send_signal takes an fd we own, a signal number, a null siginfo
    // (allowed: the kernel fills in a default) and flags 0.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `fd` becomes readable (or hung up) within `timeout` (`None`: no limit). One
/// poll: an interrupted one is an `Interrupted` error, for the caller to retry or not.
pub fn poll_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    let timeout = match timeout {
        // Longer than poll can wait (~24 days): as long as it can.
        Some(t) => PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX),
        None => PollTimeout::NONE,
    };
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    Ok(nix::poll::poll(&mut fds, timeout)? > 0)
}

/// Blocks until process `pid` has ended (zombie or gone), with a pidfd. Returns at once
/// if no pidfd can be had (the caller then checks otherwise).
pub fn wait_pid_exit(pid: u32) {
    let Ok(fd) = pidfd_open(pid) else {
        return;
    };
    loop {
        match poll_readable(fd.as_fd(), None) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            _ => return,
        }
    }
}

/// Whether `path` is a network (or other) namespace file: one on nsfs. False when it is
/// gone or was unmounted (an empty mount-point file stays behind).
pub fn is_nsfs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == NSFS_MAGIC)
}

/// Opens `/dev/net/tun` and attaches it to the TAP `name` (created if missing, in the
/// calling thread's network namespace) with a virtio-net header and no packet info.
pub fn open_tap(name: &str) -> io::Result<OwnedFd> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: an all-zero ifreq is a valid value (empty name, zero union).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // The flags fit in the short the kernel reads.
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `ifr` is and which
    // outlives the call; `tun` is an open /dev/net/tun fd.
    let ret = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OwnedFd::from(tun))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_waited_for_and_a_missing_pid_returns() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        wait_pid_exit(child.id());
        assert!(child.try_wait().expect("try_wait").is_some());
        wait_pid_exit(u32::MAX);
    }

    #[test]
    fn poll_times_out_on_a_silent_fd_and_sees_a_hangup() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let t = Some(Duration::from_millis(10));
        assert!(!poll_readable(a.as_fd(), t).expect("poll"));
        drop(b);
        assert!(poll_readable(a.as_fd(), t).expect("poll"));
    }

    #[test]
    fn nsfs_is_told_from_a_plain_file() {
        assert!(is_nsfs(Path::new("/proc/self/ns/net")));
        assert!(!is_nsfs(Path::new("/proc/self/status")));
        assert!(!is_nsfs(Path::new("/nonexistent")));
    }
}
