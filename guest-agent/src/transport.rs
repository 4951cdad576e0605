//! Where the agent listens and reports: vsock in the VM, Unix sockets for host-side tests.

use crate::error::{AgentError, Result};
use nix::sys::socket::{
    accept4, bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrLike, UnixAddr, VsockAddr,
};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

/// The host's CID: guest connections to it reach the VMM's Unix listeners.
const VMADDR_CID_HOST: u32 = 2;
/// Listen on every CID of the guest.
const VMADDR_CID_ANY: u32 = u32::MAX;

/// A stream socket address: `vsock:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Vsock(u32),
    Unix(PathBuf),
}

impl std::str::FromStr for Addr {
    type Err = AgentError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            AgentError::InvalidArgument(format!("bad address {s:?}: use vsock:PORT or unix:/PATH"))
        };
        match s.split_once(':') {
            Some(("vsock", port)) => port.parse().map(Addr::Vsock).map_err(|_| bad()),
            Some(("unix", path)) if path.starts_with('/') => Ok(Addr::Unix(path.into())),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Vsock(port) => write!(f, "vsock:{port}"),
            Addr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Addr {
    /// The address as ttrpc's `Server::bind` wants it.
    pub fn ttrpc_listen(&self) -> String {
        match self {
            Addr::Vsock(port) => format!("vsock://{}:{port}", VMADDR_CID_ANY as i32),
            Addr::Unix(path) => format!("unix://{}", path.display()),
        }
    }
}

/// A listening stream socket; accepted connections are plain files (read/write).
pub struct Listener {
    fd: OwnedFd,
    addr: Addr,
}

/// A stream socket of `addr`'s family and its socket address (vsock: on `cid`).
fn stream_socket(addr: &Addr, cid: u32, ctx: &str) -> Result<(OwnedFd, Box<dyn SockaddrLike>)> {
    let wrap = |e: nix::Error| AgentError::io(format!("{ctx} {addr}"))(e.into());
    let (family, sa): (_, Box<dyn SockaddrLike>) = match addr {
        Addr::Vsock(port) => (AddressFamily::Vsock, Box::new(VsockAddr::new(cid, *port))),
        Addr::Unix(path) => (
            AddressFamily::Unix,
            Box::new(UnixAddr::new(path).map_err(wrap)?),
        ),
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(wrap)?;
    Ok((fd, sa))
}

impl Listener {
    pub fn bind(addr: &Addr) -> Result<Self> {
        let (fd, sa) = stream_socket(addr, VMADDR_CID_ANY, "listen on")?;
        let wrap = |e: nix::Error| AgentError::io(format!("listen on {addr}"))(e.into());
        if let Addr::Unix(path) = addr {
            // A socket file left by an earlier run.
            let _ = std::fs::remove_file(path);
        }
        bind(fd.as_raw_fd(), sa.as_ref()).map_err(wrap)?;
        listen(&fd, Backlog::MAXCONN).map_err(wrap)?;
        Ok(Listener {
            fd,
            addr: addr.clone(),
        })
    }

    pub fn accept(&self) -> Result<File> {
        let raw = accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC)
            .map_err(|e| AgentError::io(format!("accept on {}", self.addr))(e.into()))?;
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(raw) })
    }
}

/// Connects to `addr`; a vsock port means the host's (CID 2).
pub fn connect_to(addr: &Addr) -> Result<File> {
    let (fd, sa) = stream_socket(addr, VMADDR_CID_HOST, "connect to")?;
    connect(fd.as_raw_fd(), sa.as_ref())
        .map_err(|e| AgentError::io(format!("connect to {addr}"))(e.into()))?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn addresses_parse_and_print() {
        assert_eq!("vsock:1024".parse::<Addr>().ok(), Some(Addr::Vsock(1024)));
        assert_eq!(
            "unix:/run/a.sock".parse::<Addr>().ok(),
            Some(Addr::Unix("/run/a.sock".into()))
        );
        for bad in ["vsock:x", "unix:rel", "tcp:1", "1024"] {
            assert!(bad.parse::<Addr>().is_err(), "{bad}");
        }
        assert_eq!(Addr::Vsock(5).ttrpc_listen(), "vsock://-1:5");
        assert_eq!(Addr::Unix("/a".into()).to_string(), "unix:/a");
    }

    #[test]
    fn unix_listener_accepts_and_connects() {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = Addr::Unix(dir.path().join("s"));
        let l = Listener::bind(&addr).expect("bind");
        let mut c = connect_to(&addr).expect("connect");
        let mut s = l.accept().expect("accept");
        c.write_all(b"hi").expect("write");
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"hi");
    }
}
