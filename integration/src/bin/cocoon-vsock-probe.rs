//! `cocoon-vsock-probe`: the guest side of vsock tests and benchmarks. Built statically
//! and placed in a test initramfs; the host side is the test (see tests/vm.rs).
//!
//!   cocoon-vsock-probe serve-echo PORT       echo every connection back (forever)
//!   cocoon-vsock-probe serve-sink PORT       read and discard; reply with the byte count
//!   cocoon-vsock-probe serve-source PORT     write N bytes (N: first 8 bytes received)
//!   cocoon-vsock-probe connect-echo PORT STREAMS BYTES
//!                                            connect to the host (CID 2) STREAMS times at once,
//!                                            send BYTES of a pattern each, check the echo
//!   cocoon-vsock-probe expect-reset PORT     connect to a host port nobody listens on
//!
//! Results go to stdout as one line (`ECHO-OK ...`, `RESET-OK`, or `FAIL ...`).

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
    use std::os::fd::AsRawFd;
    let fd = socket()?;
    let addr = vsock_addr(HOST_CID, port);
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

/// The byte at `offset` of stream `stream`'s test pattern (also used by the host side).
fn pattern(stream: u64, offset: u64) -> u8 {
    let x = offset
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(stream.wrapping_mul(0xd1b5_4a32_d192_ed03));
    (x >> 56) as u8
}

fn shutdown_write(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown(2) on a socket we own.
    unsafe { libc::shutdown(f.as_raw_fd(), libc::SHUT_WR) };
}

fn serve(port: u32, handler: fn(std::fs::File)) -> std::io::Result<()> {
    let listener = listen(port)?;
    println!("LISTENING {port}");
    loop {
        let conn = accept(&listener)?;
        std::thread::spawn(move || handler(conn));
    }
}

fn echo(mut conn: std::fs::File) {
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
    shutdown_write(&conn);
}

fn sink(mut conn: std::fs::File) {
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

fn source(mut conn: std::fs::File) {
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
    shutdown_write(&conn);
}

/// One stream: send the pattern while reading the echo back, compare every byte.
fn echo_stream(port: u32, stream: u64, bytes: u64) -> Result<(), String> {
    let conn = connect(port).map_err(|e| format!("stream {stream}: connect: {e}"))?;
    let mut writer = conn.try_clone().map_err(|e| e.to_string())?;
    let sender = std::thread::spawn(move || -> Result<(), String> {
        let mut off = 0u64;
        let mut buf = vec![0u8; 32 * 1024];
        while off < bytes {
            let n = (bytes - off).min(buf.len() as u64) as usize;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(stream, off + i as u64);
            }
            writer.write_all(&buf[..n]).map_err(|e| format!("write: {e}"))?;
            off += n as u64;
        }
        shutdown_write(&writer);
        Ok(())
    });
    let mut reader = conn;
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(|e| format!("stream {stream}: read: {e}"))?;
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

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> Result<T, String> {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("argument {i} missing or invalid"))
}

fn run(args: &[String]) -> Result<String, String> {
    let io = |e: std::io::Error| e.to_string();
    match args.first().map(String::as_str) {
        Some("serve-echo") => serve(arg(args, 1)?, echo).map(|_| String::new()).map_err(io),
        Some("serve-sink") => serve(arg(args, 1)?, sink).map(|_| String::new()).map_err(io),
        Some("serve-source") => serve(arg(args, 1)?, source).map(|_| String::new()).map_err(io),
        Some("connect-echo") => {
            let (port, streams, bytes): (u32, u64, u64) = (arg(args, 1)?, arg(args, 2)?, arg(args, 3)?);
            let workers: Vec<_> = (0..streams)
                .map(|s| std::thread::spawn(move || echo_stream(port, s, bytes)))
                .collect();
            for w in workers {
                w.join().map_err(|_| "stream thread panicked".to_string())??;
            }
            Ok(format!("ECHO-OK streams={streams} bytes={bytes}"))
        }
        Some("expect-reset") => match connect(arg(args, 1)?) {
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET)
                || e.raw_os_error() == Some(libc::ECONNREFUSED) =>
            {
                Ok("RESET-OK".into())
            }
            Err(e) => Err(format!("unexpected error {e}")),
            Ok(_) => Err("connected to a port nobody listens on".into()),
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
