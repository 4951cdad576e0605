//! Host side of vsock tests: connections to guest ports (the hybrid-vsock handshake is
//! `vmm_api::vsock`, docs/vsock.md), echo listeners for guest-initiated connections, and
//! the byte pattern both sides check (`cocoon-vsock-probe` uses the same one).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use vmm_api::vsock::host_port_path;

/// The byte at `offset` of stream `stream`'s test pattern.
pub fn pattern(stream: u64, offset: u64) -> u8 {
    let x = offset
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(stream.wrapping_mul(0xd1b5_4a32_d192_ed03));
    (x >> 56) as u8
}

/// Connects to guest port `port` through the VMM's vsock socket; reads on the stream
/// time out after a minute, so a stuck guest fails a test instead of hanging it.
pub fn connect(uds: &Path, port: u32) -> Result<UnixStream, String> {
    let (s, _) =
        vmm_api::vsock::connect(uds, port, Duration::from_secs(60)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| format!("vsock port {port}: setting a read timeout: {e}"))?;
    Ok(s)
}

/// Serves an echo on `<uds>_<port>` on a background thread, one thread per connection.
pub fn echo_listener(uds: &Path, port: u32) -> std::io::Result<()> {
    let listener = UnixListener::bind(host_port_path(uds, port))?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = match conn.try_clone() {
                    Ok(w) => w,
                    Err(_) => return,
                };
                let mut r = conn;
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Ok(())
}

/// Sends `bytes` of stream `stream`'s pattern over `conn` while reading the echo back;
/// errors name the first difference.
pub fn echo_check(conn: UnixStream, stream: u64, bytes: u64) -> Result<(), String> {
    let mut w = conn.try_clone().map_err(|e| e.to_string())?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut off = 0u64;
        let mut buf = vec![0u8; 32 * 1024];
        while off < bytes {
            let n = (bytes - off).min(buf.len() as u64) as usize;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(stream, off + i as u64);
            }
            w.write_all(&buf[..n])?;
            off += n as u64;
        }
        w.shutdown(std::net::Shutdown::Write)
    });
    let mut r = BufReader::with_capacity(64 * 1024, conn);
    let mut off = 0u64;
    loop {
        let buf = r
            .fill_buf()
            .map_err(|e| format!("stream {stream}: read at {off}: {e}"))?;
        if buf.is_empty() {
            break;
        }
        for (i, b) in buf.iter().enumerate() {
            if *b != pattern(stream, off + i as u64) {
                return Err(format!("stream {stream}: byte {} differs", off + i as u64));
            }
        }
        let n = buf.len();
        off += n as u64;
        r.consume(n);
    }
    sender
        .join()
        .map_err(|_| format!("stream {stream}: sender panicked"))?
        .map_err(|e| format!("stream {stream}: write: {e}"))?;
    if off != bytes {
        return Err(format!("stream {stream}: echoed {off} of {bytes} bytes"));
    }
    Ok(())
}
