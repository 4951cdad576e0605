//! The `cocoon` binary prints an error's causes once each.

use std::process::Command;

/// A config path under a regular file fails with ENOTDIR, for root too.
#[test]
fn os_error_is_printed_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("file");
    std::fs::write(&file, "").expect("write");
    let config = file.join("config.toml");
    let os = std::io::Error::from_raw_os_error(libc::ENOTDIR).to_string();
    for command in ["ps", "check"] {
        let out = Command::new(env!("CARGO_BIN_EXE_cocoon"))
            .arg("--config")
            .arg(&config)
            .arg(command)
            .output()
            .expect("run cocoon");
        assert!(!out.status.success(), "cocoon {command} succeeded");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(text.matches(&os).count(), 1, "cocoon {command}: {text}");
        assert!(text.contains(&config.display().to_string()), "{text}");
    }
}
