//! `cocoon-vsock-probe`: the far side of vsock and network tests and benchmarks. Built
//! statically and placed in a test initramfs (or run in a test network namespace).
//! ADDR is `vsock:PORT` (the host, CID 2, when connecting) or `tcp:HOST:PORT`.
//!
//!   serve-echo ADDR                 echo every connection back (forever)
//!   serve-sink ADDR                 read and discard; reply with the byte count (u64 LE)
//!   serve-source ADDR               write N bytes (N: the first 8 bytes received, u64 LE)
//!   connect-echo ADDR STREAMS BYTES send BYTES of a pattern on STREAMS connections at
//!                                   once and check the echo
//!   send ADDR STREAMS BYTES         push BYTES per stream into a sink, report MB/s
//!   recv ADDR STREAMS BYTES         pull BYTES per stream from a source, report MB/s
//!   expect-reset PORT               connect to a vsock host port nobody listens on
//!   expect-unreachable CID PORT     connect to CID:PORT must fail (a container must not
//!                                   reach the agent's API)
//!
//! Results go to stdout as one line (`ECHO-OK ...`, `SEND-OK ...`, `RESET-OK`, `FAIL ...`).

use cocoon_integration::vsock::pattern;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;

const HOST_CID: u32 = 2;

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn addr_len() -> libc::socklen_t {
    std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t
}

fn connect(port: u32) -> std::io::Result<std::fs::File> {
    connect_cid(HOST_CID, port)
}

fn connect_cid(cid: u32, port: u32) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let fd = socket()?;
    let addr = vsock_addr(cid, port);
    // SAFETY: `addr` is a valid sockaddr_vm of the length we pass; `fd` is open.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            addr_len(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(std::fs::File::from(fd))
}

fn listen(port: u32) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let fd = socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: `addr` is a valid sockaddr_vm of the length we pass; `fd` is open.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            addr_len(),
        )
    };
    // SAFETY: listen(2) on our open socket.
    if rc != 0 || unsafe { libc::listen(fd.as_raw_fd(), 256) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn accept(listener: &OwnedFd) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    // SAFETY: accept4 on our listening socket without an address buffer.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn shutdown_write(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown(2) on a socket we own.
    unsafe { libc::shutdown(f.as_raw_fd(), libc::SHUT_WR) };
}

/// A connected stream of either kind.
trait Conn: Read + Write + Send + 'static {
    fn split(&self) -> std::io::Result<Box<dyn Conn>>;
    fn close_write(&self);
}

impl Conn for std::fs::File {
    fn split(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn close_write(&self) {
        shutdown_write(self)
    }
}

impl Conn for std::net::TcpStream {
    fn split(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn close_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

enum Addr {
    Vsock(u32),
    Tcp(String),
}

fn parse_addr(a: &str) -> Result<Addr, String> {
    if let Some(p) = a.strip_prefix("vsock:") {
        return p
            .parse()
            .map(Addr::Vsock)
            .map_err(|_| format!("bad vsock port in {a}"));
    }
    a.strip_prefix("tcp:")
        .map(|t| Addr::Tcp(t.to_string()))
        .ok_or_else(|| format!("address {a}: want vsock:PORT or tcp:HOST:PORT"))
}

fn dial(addr: &Addr) -> std::io::Result<Box<dyn Conn>> {
    match addr {
        Addr::Vsock(port) => Ok(Box::new(connect(*port)?)),
        Addr::Tcp(hp) => {
            let s = std::net::TcpStream::connect(hp)?;
            s.set_nodelay(true)?;
            Ok(Box::new(s))
        }
    }
}

fn serve(addr: &Addr, handler: fn(Box<dyn Conn>)) -> std::io::Result<()> {
    match addr {
        Addr::Vsock(port) => {
            let listener = listen(*port)?;
            println!("LISTENING vsock:{port}");
            loop {
                let conn: Box<dyn Conn> = Box::new(accept(&listener)?);
                std::thread::spawn(move || handler(conn));
            }
        }
        Addr::Tcp(hp) => {
            let port = hp.rsplit(':').next().unwrap_or(hp);
            let listener = std::net::TcpListener::bind(format!("0.0.0.0:{port}"))?;
            println!("LISTENING tcp:{port}");
            loop {
                let (conn, _) = listener.accept()?;
                std::thread::spawn(move || handler(Box::new(conn)));
            }
        }
    }
}

fn echo(mut conn: Box<dyn Conn>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    conn.close_write();
}

fn sink(mut conn: Box<dyn Conn>) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let _ = conn.write_all(&total.to_le_bytes());
}

fn source(mut conn: Box<dyn Conn>) {
    let mut len = [0u8; 8];
    if conn.read_exact(&mut len).is_err() {
        return;
    }
    let mut left = u64::from_le_bytes(len);
    let buf = vec![0x5au8; 256 * 1024];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        if conn.write_all(&buf[..n]).is_err() {
            return;
        }
        left -= n as u64;
    }
    conn.close_write();
}

/// One stream: send the pattern while reading the echo back, compare every byte.
fn echo_stream(addr: &Addr, stream: u64, bytes: u64) -> Result<(), String> {
    let conn = dial(addr).map_err(|e| format!("stream {stream}: connect: {e}"))?;
    let mut writer = conn.split().map_err(|e| e.to_string())?;
    let sender = std::thread::spawn(move || -> Result<(), String> {
        let mut off = 0u64;
        let mut buf = vec![0u8; 32 * 1024];
        while off < bytes {
            let n = (bytes - off).min(buf.len() as u64) as usize;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(stream, off + i as u64);
            }
            writer
                .write_all(&buf[..n])
                .map_err(|e| format!("write: {e}"))?;
            off += n as u64;
        }
        writer.close_write();
        Ok(())
    });
    let mut reader = conn;
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| format!("stream {stream}: read: {e}"))?;
        if n == 0 {
            break;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            if *b != pattern(stream, off + i as u64) {
                return Err(format!("stream {stream}: byte {} differs", off + i as u64));
            }
        }
        off += n as u64;
    }
    sender
        .join()
        .map_err(|_| "sender panicked".to_string())?
        .map_err(|e| format!("stream {stream}: {e}"))?;
    if off != bytes {
        return Err(format!("stream {stream}: echoed {off} of {bytes} bytes"));
    }
    Ok(())
}

/// Pushes `bytes` into a sink; returns what the sink says it received.
fn send_stream(addr: &Addr, bytes: u64) -> Result<u64, String> {
    let mut conn = dial(addr).map_err(|e| format!("connect: {e}"))?;
    let buf = vec![0xa5u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        conn.write_all(&buf[..n])
            .map_err(|e| format!("write: {e}"))?;
        left -= n as u64;
    }
    conn.close_write();
    let mut count = [0u8; 8];
    conn.read_exact(&mut count)
        .map_err(|e| format!("sink count: {e}"))?;
    Ok(u64::from_le_bytes(count))
}

/// Pulls `bytes` from a source; returns how many arrived.
fn recv_stream(addr: &Addr, bytes: u64) -> Result<u64, String> {
    let mut conn = dial(addr).map_err(|e| format!("connect: {e}"))?;
    conn.write_all(&bytes.to_le_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = conn.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// Runs `f` on `streams` threads at once; returns the wall time.
fn parallel(
    streams: u64,
    f: impl Fn(u64) -> Result<(), String> + Send + Sync + 'static,
) -> Result<f64, String> {
    let f = std::sync::Arc::new(f);
    let start = std::time::Instant::now();
    let workers: Vec<_> = (0..streams)
        .map(|s| {
            let f = f.clone();
            std::thread::spawn(move || f(s))
        })
        .collect();
    for w in workers {
        w.join()
            .map_err(|_| "stream thread panicked".to_string())??;
    }
    Ok(start.elapsed().as_secs_f64())
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> Result<T, String> {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("argument {i} missing or invalid"))
}

fn run(args: &[String]) -> Result<String, String> {
    let io = |e: std::io::Error| e.to_string();
    let addr = || parse_addr(args.get(1).map(String::as_str).unwrap_or(""));
    match args.first().map(String::as_str) {
        Some("serve-echo") => serve(&addr()?, echo).map(|_| String::new()).map_err(io),
        Some("serve-sink") => serve(&addr()?, sink).map(|_| String::new()).map_err(io),
        Some("serve-source") => serve(&addr()?, source).map(|_| String::new()).map_err(io),
        Some(mode @ ("connect-echo" | "send" | "recv")) => {
            let a = std::sync::Arc::new(addr()?);
            let (streams, bytes): (u64, u64) = (arg(args, 2)?, arg(args, 3)?);
            let secs = match mode {
                "connect-echo" => parallel(streams, move |s| echo_stream(&a, s, bytes))?,
                "send" => parallel(streams, move |_| match send_stream(&a, bytes)? {
                    n if n == bytes => Ok(()),
                    n => Err(format!("sink got {n} of {bytes} bytes")),
                })?,
                _ => parallel(streams, move |_| match recv_stream(&a, bytes)? {
                    n if n == bytes => Ok(()),
                    n => Err(format!("received {n} of {bytes} bytes")),
                })?,
            };
            let mbps = (streams * bytes) as f64 / secs / 1e6;
            let tag = match mode {
                "connect-echo" => "ECHO-OK",
                "send" => "SEND-OK",
                _ => "RECV-OK",
            };
            Ok(format!(
                "{tag} streams={streams} bytes={bytes} secs={secs:.3} mbps={mbps:.1}"
            ))
        }
        Some("expect-reset") => match connect(arg(args, 1)?) {
            Err(e)
                if e.raw_os_error() == Some(libc::ECONNRESET)
                    || e.raw_os_error() == Some(libc::ECONNREFUSED) =>
            {
                Ok("RESET-OK".into())
            }
            Err(e) => Err(format!("unexpected error {e}")),
            Ok(_) => Err("connected to a port nobody listens on".into()),
        },
        Some("expect-unreachable") => match connect_cid(arg(args, 1)?, arg(args, 2)?) {
            Err(e) => Ok(format!("UNREACHABLE-OK {e}")),
            Ok(_) => Err("connected".into()),
        },
        _ => Err("usage: see the source".into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("FAIL {e}");
            ExitCode::FAILURE
        }
    }
}
