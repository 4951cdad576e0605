//! A Linux TAP interface as the host side of a virtio-net device.
//!
//! Every frame read from or written to a [`Tap`] starts with a virtio-net header
//! (`IFF_VNET_HDR`); there is no packet-information prefix (`IFF_NO_PI`). The fd is
//! non-blocking: the device reads and writes it from the I/O loop and must never wait.
//!
//! A TAP comes either from [`Tap::open`], which creates or attaches the named interface in
//! the VMM's own network namespace, or from [`Tap::from_fd`], which adopts an fd the
//! runtime opened inside the pod's network namespace and passed on exec.
//!
//! The only `unsafe` code here is the TUN/TAP ioctls.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::raw::{c_int, c_short, c_uint};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};

use thiserror::Error;
use tracing::{debug, info};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// Where TUN/TAP devices are created.
pub const TUN_DEVICE: &str = "/dev/net/tun";
/// Longest interface name the kernel takes (IFNAMSIZ without the terminating NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;
/// Flags a TAP for virtio-net must have.
pub const TAP_FLAGS: c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
/// Offload flags `Tap::set_offload` accepts.
pub const OFFLOAD_MASK: c_uint =
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN | libc::TUN_F_UFO;

/// `struct ifreq` as TUNSETIFF and TUNGETIFF use it: a name and the flags, padded to the
/// kernel's size. Declared here so that no union has to be read.
#[repr(C)]
#[derive(Debug, Default)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: c_short,
    _pad: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == std::mem::size_of::<libc::ifreq>());

impl IfReq {
    /// The name up to its first NUL; the kernel always terminates it.
    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// Errors setting up or configuring a TAP; each names the interface (or the fd, before
/// its name is known) and the ioctl involved.
#[derive(Debug, Error)]
pub enum TapError {
    #[error("invalid TAP interface name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("cannot open {TUN_DEVICE} to create TAP {name:?}")]
    OpenTun {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("{ioctl} failed on TAP {name:?}")]
    Ioctl {
        name: String,
        ioctl: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("fd {fd} is not an attached TUN/TAP device (TUNGETIFF failed)")]
    NotTun {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("fd {fd} is TUN interface {name:?}, not a TAP (flags {flags:#x})")]
    NotTap { fd: RawFd, name: String, flags: u16 },
    #[error(
        "TAP {name:?} (fd {fd}) was opened without IFF_VNET_HDR (flags {flags:#x}); \
         open it with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR"
    )]
    NoVnetHdr { fd: RawFd, name: String, flags: u16 },
    #[error(
        "TAP {name:?} (fd {fd}) was opened without IFF_NO_PI (flags {flags:#x}); \
         open it with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR"
    )]
    PacketInfo { fd: RawFd, name: String, flags: u16 },
    #[error("unsupported offload flags {flags:#x} for TAP {name:?}")]
    UnsupportedOffload { name: String, flags: c_uint },
}

/// What is behind the fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A real TUN/TAP fd: the ioctls apply.
    Tun,
    /// A datagram socket standing in for a TAP in unit tests and fuzzing: same frame
    /// semantics, and the configuration calls only record what they were asked.
    #[cfg(any(test, feature = "fuzzing"))]
    Socket,
}

/// An open, non-blocking TAP interface whose frames carry a virtio-net header.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    kind: Kind,
    /// Last value set with `set_vnet_hdr_size` (the kernel's default is 10).
    vnet_hdr_size: c_int,
    /// Last value set with `set_offload` (the kernel has no way to read it back).
    offload: c_uint,
}

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

fn check_name(name: &str) -> Result<(), TapError> {
    let invalid = |reason| {
        Err(TapError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.len() > MAX_NAME_LEN {
        return invalid("longer than 15 bytes");
    }
    if name
        .bytes()
        .any(|b| b == 0 || b == b'/' || b == b':' || b.is_ascii_whitespace())
    {
        return invalid("contains NUL, '/', ':' or whitespace");
    }
    if name == "." || name == ".." {
        return invalid("reserved name");
    }
    Ok(())
}

/// Checks TUNGETIFF's flags for an fd to adopt.
///
/// IFF_NO_PI cannot be fully checked: TUNGETIFF reports IFF_NOFILTER (the same bit) when
/// no socket filter is attached, so a set bit proves nothing and only a clear one shows
/// a TAP with packet information. The runtime must open the TAP with IFF_NO_PI.
fn check_flags(fd: RawFd, name: &str, flags: u16) -> Result<(), TapError> {
    let flags_int = c_int::from(flags);
    let has = |flag: c_int| flags_int & flag == flag;
    let name = name.to_owned();
    if flags_int & c_int::from(libc::TUN_TYPE_MASK) != libc::IFF_TAP {
        return Err(TapError::NotTap { fd, name, flags });
    }
    if !has(libc::IFF_VNET_HDR) {
        return Err(TapError::NoVnetHdr { fd, name, flags });
    }
    if !has(libc::IFF_NO_PI) {
        return Err(TapError::PacketInfo { fd, name, flags });
    }
    Ok(())
}

impl Tap {
    /// Creates the TAP interface `name`, or attaches to it if it exists (and is a TAP this
    /// process may use), with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR. An empty name lets the
    /// kernel choose one (`tapN`); `name()` then reports it.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let (file, name) = Self::create(name, TAP_FLAGS, true)?;
        info!(tap = %name, "TAP opened");
        Ok(Tap::new(file, name, Kind::Tun))
    }

    /// Adopts a TAP fd opened by someone else (the runtime, in the pod's network
    /// namespace). The fd must be an attached TAP (TUNGETIFF) with IFF_VNET_HDR, and must
    /// have been opened with IFF_NO_PI, which the kernel does not always let us check
    /// (see `check_flags`). It is made non-blocking, which affects every copy of it, and
    /// close-on-exec.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let raw = fd.as_raw_fd();
        let file = File::from(fd);
        let mut ifr = IfReq::default();
        // SAFETY: TUNGETIFF writes at most a `struct ifreq` into `ifr`, which is exactly
        // that size and lives for the call; `file` owns a valid fd. On a non-TUN fd the
        // kernel rejects the request without touching `ifr`.
        let ret = unsafe { ioctl_with_mut_ref(&file, libc::TUNGETIFF, &mut ifr) };
        if ret < 0 {
            return Err(TapError::NotTun {
                fd: raw,
                source: last_error(),
            });
        }
        let name = ifr.name();
        // The kernel reports the flags as an unsigned short.
        check_flags(raw, &name, ifr.flags as u16)?;
        let on: c_int = 1;
        // SAFETY: FIONBIO reads one int from `on`, which lives for the call; `file` owns
        // a valid fd.
        let ret = unsafe { ioctl_with_ref(&file, libc::FIONBIO, &on) };
        if ret < 0 {
            return Err(TapError::Ioctl {
                name,
                ioctl: "FIONBIO",
                source: last_error(),
            });
        }
        // Inherited on purpose, but no further: close it on any later exec.
        // SAFETY: FIOCLEX takes no argument and touches no memory of ours; `file` owns a
        // valid fd.
        let ret = unsafe { ioctl(&file, libc::FIOCLEX) };
        if ret < 0 {
            return Err(TapError::Ioctl {
                name,
                ioctl: "FIOCLEX",
                source: last_error(),
            });
        }
        info!(tap = %name, fd = raw, "TAP adopted from an inherited fd");
        Ok(Tap::new(file, name, Kind::Tun))
    }

    fn new(file: File, name: String, kind: Kind) -> Self {
        Tap {
            file,
            name,
            kind,
            vnet_hdr_size: 10,
            offload: 0,
        }
    }

    /// Opens /dev/net/tun and binds it to interface `name` with `flags`.
    fn create(name: &str, flags: c_int, nonblocking: bool) -> Result<(File, String), TapError> {
        check_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(if nonblocking { libc::O_NONBLOCK } else { 0 })
            .open(TUN_DEVICE)
            .map_err(|source| TapError::OpenTun {
                name: name.to_owned(),
                source,
            })?;
        let mut ifr = IfReq::default();
        ifr.name[..name.len()].copy_from_slice(name.as_bytes());
        // Every TUN flag fits the kernel's unsigned short.
        ifr.flags = flags as c_short;
        // SAFETY: TUNSETIFF reads a `struct ifreq` from `ifr` and writes the chosen name
        // back into it; `ifr` is exactly that size and lives for the call, and `file`
        // owns a valid fd.
        let ret = unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut ifr) };
        if ret < 0 {
            return Err(TapError::Ioctl {
                name: name.to_owned(),
                ioctl: "TUNSETIFF",
                source: last_error(),
            });
        }
        Ok((file, ifr.name()))
    }

    /// A TUN/TAP fd set up with arbitrary flags, as a runtime would pass it (blocking,
    /// inheritable), to test `from_fd`.
    #[cfg(test)]
    pub(crate) fn open_raw_for_tests(name: &str, flags: c_int) -> Result<OwnedFd, TapError> {
        let (file, name) = Self::create(name, flags, false)?;
        // SAFETY: FIONCLEX takes no argument and touches no memory of ours; `file` owns a
        // valid fd.
        if unsafe { ioctl(&file, libc::FIONCLEX) } < 0 {
            return Err(TapError::Ioctl {
                name,
                ioctl: "FIONCLEX",
                source: last_error(),
            });
        }
        Ok(file.into())
    }

    /// An unopened /dev/net/tun fd (no TUNSETIFF yet).
    #[cfg(test)]
    pub(crate) fn unattached_tun_for_tests() -> io::Result<OwnedFd> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(TUN_DEVICE)
            .map(OwnedFd::from)
    }

    /// A TAP stand-in over one end of a datagram socket pair, for unit tests and fuzzing:
    /// frames keep their boundaries like on a TAP, and the configuration calls only record
    /// their arguments. The socket is made non-blocking.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn from_socket_for_tests(
        socket: std::os::unix::net::UnixDatagram,
        name: &str,
    ) -> io::Result<Tap> {
        socket.set_nonblocking(true)?;
        Ok(Tap::new(
            File::from(OwnedFd::from(socket)),
            name.to_owned(),
            Kind::Socket,
        ))
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the length of the virtio-net header on every frame (TUNSETVNETHDRSZ): 12 for
    /// `virtio_net_hdr_v1` with `num_buffers`.
    pub fn set_vnet_hdr_size(&mut self, size: c_int) -> Result<(), TapError> {
        if self.kind == Kind::Tun {
            // SAFETY: TUNSETVNETHDRSZ reads one int from `size`, which lives for the call;
            // `self.file` owns a valid fd.
            let ret = unsafe { ioctl_with_ref(&self.file, libc::TUNSETVNETHDRSZ, &size) };
            if ret < 0 {
                return Err(self.ioctl_error("TUNSETVNETHDRSZ"));
            }
        }
        debug!(tap = %self.name, size, "TAP vnet header size set");
        self.vnet_hdr_size = size;
        Ok(())
    }

    /// The virtio-net header length: the kernel's (TUNGETVNETHDRSZ) for a real TAP.
    pub fn vnet_hdr_size(&self) -> Result<c_int, TapError> {
        if self.kind != Kind::Tun {
            return Ok(self.vnet_hdr_size);
        }
        let mut size: c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes one int into `size`, which lives for the call;
        // `self.file` owns a valid fd.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, libc::TUNGETVNETHDRSZ, &mut size) };
        if ret < 0 {
            return Err(self.ioctl_error("TUNGETVNETHDRSZ"));
        }
        Ok(size)
    }

    /// Sets which offloads the kernel may use in frames it hands us (TUNSETOFFLOAD):
    /// a combination of TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN and TUN_F_UFO.
    /// The kernel ignores segmentation offloads without TUN_F_CSUM and ECN without TSO.
    pub fn set_offload(&mut self, flags: c_uint) -> Result<(), TapError> {
        if flags & !OFFLOAD_MASK != 0 {
            return Err(TapError::UnsupportedOffload {
                name: self.name.clone(),
                flags,
            });
        }
        if self.kind == Kind::Tun {
            // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of
            // ours; `self.file` owns a valid fd.
            let ret = unsafe {
                ioctl_with_val(&self.file, libc::TUNSETOFFLOAD, libc::c_ulong::from(flags))
            };
            if ret < 0 {
                return Err(self.ioctl_error("TUNSETOFFLOAD"));
            }
        }
        debug!(tap = %self.name, flags, "TAP offloads set");
        self.offload = flags;
        Ok(())
    }

    /// The offloads last set with `set_offload` (0 until then).
    pub fn offload(&self) -> c_uint {
        self.offload
    }

    /// Reads one frame (virtio-net header first) into `buf`; `WouldBlock` when there is
    /// none. A frame longer than `buf` is dropped by the kernel with an error (TAP) or
    /// truncated (the test socket).
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one whole frame (virtio-net header first); `WouldBlock` when the TAP is
    /// full. A TAP takes a frame whole or not at all; a short write is reported as an error.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        let n = (&self.file).write(frame)?;
        if n == frame.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write to TAP: {n} of {} bytes", frame.len()),
            ))
        }
    }

    fn ioctl_error(&self, ioctl: &'static str) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            ioctl,
            source: last_error(),
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    use std::os::unix::net::UnixDatagram;

    fn pair() -> (Tap, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        (Tap::from_socket_for_tests(a, "sock0").unwrap(), b)
    }

    #[test]
    fn names_are_checked_before_any_syscall() {
        for bad in ["0123456789abcdef", "a/b", "a:b", "a b", "a\0b", ".", ".."] {
            match Tap::open(bad) {
                Err(TapError::InvalidName { name, .. }) => assert_eq!(name, bad),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert!(check_name("0123456789abcde").is_ok());
        assert!(check_name("").is_ok());
    }

    #[test]
    fn from_fd_rejects_what_is_not_a_tap() {
        let (sock, _peer) = UnixDatagram::pair().unwrap();
        let raw = sock.as_raw_fd();
        match Tap::from_fd(OwnedFd::from(sock)) {
            Err(e @ TapError::NotTun { fd, .. }) => {
                assert_eq!(fd, raw);
                assert!(e.to_string().contains("not an attached TUN/TAP"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        let file = File::open("/dev/null").unwrap();
        assert!(matches!(
            Tap::from_fd(OwnedFd::from(file)),
            Err(TapError::NotTun { .. })
        ));
    }

    #[test]
    fn adopted_fd_flags_are_checked() {
        let tap = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
        assert!(check_flags(3, "t", tap).is_ok());
        // Multi-queue and persistent TAPs are fine too.
        let more = tap | (libc::IFF_MULTI_QUEUE | libc::IFF_PERSIST) as u16;
        assert!(check_flags(3, "t", more).is_ok());
        let tun = (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
        assert!(
            matches!(check_flags(3, "t", tun), Err(TapError::NotTap { flags, .. }) if flags == tun)
        );
        let no_hdr = (libc::IFF_TAP | libc::IFF_NO_PI) as u16;
        let err = check_flags(4, "tap7", no_hdr).unwrap_err();
        assert!(matches!(err, TapError::NoVnetHdr { fd: 4, .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("tap7") && msg.contains("IFF_VNET_HDR"),
            "{msg}"
        );
        let pi = (libc::IFF_TAP | libc::IFF_VNET_HDR) as u16;
        assert!(matches!(
            check_flags(3, "t", pi),
            Err(TapError::PacketInfo { .. })
        ));
    }

    #[test]
    fn socket_stand_in_keeps_frames_whole_and_never_blocks() {
        let (tap, peer) = pair();
        let mut buf = [0u8; 64];
        assert_eq!(
            tap.read_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        peer.send(&[1, 2, 3]).unwrap();
        peer.send(&[4, 5]).unwrap();
        assert_eq!(tap.read_frame(&mut buf).unwrap(), 3);
        assert_eq!(buf[..3], [1, 2, 3]);
        assert_eq!(tap.read_frame(&mut buf).unwrap(), 2);
        tap.write_frame(&[9; 40]).unwrap();
        assert_eq!(peer.recv(&mut buf).unwrap(), 40);
    }

    #[test]
    fn configuration_is_recorded() {
        let (mut tap, _peer) = pair();
        assert_eq!(tap.name(), "sock0");
        assert_eq!(tap.vnet_hdr_size().unwrap(), 10);
        tap.set_vnet_hdr_size(12).unwrap();
        assert_eq!(tap.vnet_hdr_size().unwrap(), 12);
        tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4)
            .unwrap();
        assert_eq!(tap.offload(), libc::TUN_F_CSUM | libc::TUN_F_TSO4);
        match tap.set_offload(libc::TUN_F_USO4) {
            Err(TapError::UnsupportedOffload { flags, .. }) => assert_eq!(flags, 0x20),
            other => panic!("{other:?}"),
        }
        assert_eq!(tap.offload(), libc::TUN_F_CSUM | libc::TUN_F_TSO4);
    }
}
