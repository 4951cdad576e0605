//! `cocoon console`: a sandbox's guest console log, optionally followed.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;

use super::{resolve_sandbox, Error, Result};

/// The console log of the sandbox that `query` (an id or a unique prefix) names.
pub fn log_path(config: &Config, query: &str) -> Result<PathBuf> {
    let id = resolve_sandbox(config, query)?;
    Ok(config.sandbox_dir(&id).join("console.log"))
}

/// Copies `path` to `out`; with `follow`, keeps copying what is appended (starting over
/// when the file is truncated) until the sandbox directory is gone.
pub fn print(path: &Path, follow: bool, out: &mut impl Write) -> Result<()> {
    let mut file = File::open(path).map_err(Error::io("opening console log", path))?;
    let mut pos = copy_from(&mut file, 0, path, out)?;
    if !follow {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    loop {
        std::thread::sleep(Duration::from_millis(200));
        if !dir.exists() {
            return Ok(());
        }
        let len = file
            .metadata()
            .map_err(Error::io("reading console log", path))?
            .len();
        if len < pos {
            pos = 0; // truncated
        }
        if len > pos {
            pos = copy_from(&mut file, pos, path, out)?;
        }
    }
}

fn copy_from(file: &mut File, pos: u64, path: &Path, out: &mut impl Write) -> Result<u64> {
    file.seek(SeekFrom::Start(pos))
        .map_err(Error::io("reading console log", path))?;
    let mut buf = [0u8; 64 * 1024];
    let mut pos = pos;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(Error::io("reading console log", path))?;
        if n == 0 {
            break;
        }
        match out.write_all(&buf[..n]) {
            Ok(()) => {}
            // `cocoon console id | head`: the reader is done.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(pos),
            Err(e) => return Err(Error::io("writing console output to", "stdout")(e)),
        }
        pos += n as u64;
    }
    let _ = out.flush();
    Ok(pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_the_log_of_a_prefix() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = Config {
            state_dir: tmp.path().to_path_buf(),
            ..Config::default()
        };
        std::fs::create_dir(tmp.path().join("abcdef")).expect("mkdir");
        let path = log_path(&config, "abc").expect("path");
        assert_eq!(path, tmp.path().join("abcdef/console.log"));
        let e = print(&path, false, &mut Vec::new()).expect_err("missing");
        assert!(e.to_string().contains("console.log"), "{e}");
        std::fs::write(&path, "Linux version 6.1\nready\n").expect("write");
        let mut out = Vec::new();
        print(&path, false, &mut out).expect("print");
        assert_eq!(out, b"Linux version 6.1\nready\n");
    }
}
