//! `cocoon gc`: removes what dead sandboxes left behind, then image disks no one holds.
//!
//! Conservative by design: a sandbox directory is removed only when its `vmm.pid` names
//! a VMM that is gone ([`VmmState::Dead`]) and no running process (a shim, a restarted
//! VMM) carries the sandbox id or directory on its command line. Directories without a
//! pid file may be a sandbox being created right now and are left alone.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::error::chain;
use crate::image::ImageCache;

use super::procfs;
use super::{sandbox_ids, vmm_state, Result, VmmState};

/// What `cocoon gc` did or, with `--dry-run`, would do.
#[derive(Debug, Default)]
pub struct Report {
    /// Sandbox directories removed (or to remove).
    pub sandboxes: Vec<PathBuf>,
    /// Dead sandboxes left alone because a process still refers to them.
    pub referenced: Vec<(PathBuf, u32)>,
    /// Image disks removed (or, dry run: without holders now).
    pub images: Vec<PathBuf>,
    /// Problems met on the way (the rest still ran).
    pub errors: Vec<String>,
}

/// Whether a command line refers to a sandbox: an argument equal to its id, or naming a
/// path inside its directory.
pub fn refers_to(args: &[String], id: &str, dir: &Path) -> bool {
    let dir = dir.to_string_lossy();
    let inside = format!("{}/", dir.trim_end_matches('/'));
    args.iter().any(|a| {
        a == id
            || a.as_str() == dir
            || a.contains(&inside)
            || a.split([',', '=']).any(|part| part == id)
    })
}

/// The first other process whose command line refers to the sandbox.
fn referencing_process(id: &str, dir: &Path) -> Option<u32> {
    let me = std::process::id();
    procfs::all_pids().into_iter().find(|&pid| {
        pid != me && procfs::cmdline(pid).is_some_and(|args| refers_to(&args, id, dir))
    })
}

/// Runs the collection; `dry_run` only reports.
pub fn run(config: &Config, dry_run: bool) -> Result<Report> {
    let mut report = Report::default();
    for id in sandbox_ids(config)? {
        let dir = config.sandbox_dir(&id);
        match vmm_state(config, &id) {
            Ok(VmmState::Dead) => {}
            Ok(_) => continue,
            Err(e) => {
                report.errors.push(format!("sandbox {id}: {}", chain(&e)));
                continue;
            }
        }
        if let Some(pid) = referencing_process(&id, &dir) {
            report.referenced.push((dir, pid));
            continue;
        }
        if !dry_run {
            // Kills nothing (the VMM is gone); tears down the TAP, releases image
            // references and writable disks, removes the directory.
            if let Err(e) = crate::state::cleanup_sandbox(config, &id) {
                report.errors.push(format!("sandbox {id}: {}", chain(&e)));
                if dir.exists() {
                    continue;
                }
            }
        }
        report.sandboxes.push(dir);
    }
    let cache = ImageCache::from_config(config);
    if dry_run {
        report.images = unheld_images(config, &cache);
    } else {
        match cache.gc() {
            Ok(removed) => report.images = removed,
            Err(e) => report.errors.push(format!("image cache: {}", chain(&e))),
        }
    }
    Ok(report)
}

/// Image disks that have no holder now (what `gc` would remove, unless in use).
fn unheld_images(config: &Config, cache: &ImageCache) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(&config.image_dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let key = name.strip_suffix(".erofs")?;
            cache
                .holders(key)
                .ok()
                .filter(|h| h.is_empty())
                .map(|_| e.path())
        })
        .collect();
    out.sort();
    out
}

/// The report as printed.
pub fn render(report: &Report, dry_run: bool) -> String {
    let verb = if dry_run { "would remove" } else { "removed" };
    let mut out = String::new();
    for dir in &report.sandboxes {
        out.push_str(&format!("{verb} sandbox {}\n", dir.display()));
    }
    for (dir, pid) in &report.referenced {
        out.push_str(&format!(
            "kept sandbox {}: its VMM is dead but pid {pid} still refers to it\n",
            dir.display()
        ));
    }
    for disk in &report.images {
        out.push_str(&format!("{verb} image disk {}\n", disk.display()));
    }
    if report.sandboxes.is_empty() && report.images.is_empty() {
        out.push_str("nothing to remove\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn shim_and_vmm_command_lines_refer_to_their_sandbox() {
        let dir = Path::new("/run/cocoon/abc123");
        let shim = s(&[
            "containerd-shim-cocoon-v1",
            "-namespace",
            "k8s.io",
            "-id",
            "abc123",
        ]);
        assert!(refers_to(&shim, "abc123", dir));
        let vmm = s(&[
            "cocoon-vmm",
            "--control-socket",
            "/run/cocoon/abc123/control.sock",
        ]);
        assert!(refers_to(&vmm, "abc123", dir));
        assert!(refers_to(&s(&["x", "--id=abc123"]), "abc123", dir));
        assert!(!refers_to(
            &s(&["bash", "abc1234", "/run/cocoon/abc1234/x"]),
            "abc123",
            dir
        ));
    }

    #[test]
    fn only_dead_unreferenced_sandboxes_go() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = Config {
            state_dir: tmp.path().join("run"),
            image_dir: tmp.path().join("images"),
            ..Config::default()
        };
        let id = format!("gc-test-{}-dead", std::process::id());
        let dead = config.sandbox_dir(&id);
        std::fs::create_dir_all(&dead).expect("mkdir");
        std::fs::write(dead.join("vmm.pid"), "999999999 1\n").expect("pid");
        let booting = config.sandbox_dir("booting");
        std::fs::create_dir_all(&booting).expect("mkdir");
        std::fs::create_dir_all(&config.image_dir).expect("images");
        let disk = config.image_dir.join(format!("{}.erofs", "ab".repeat(32)));
        std::fs::write(&disk, "erofs").expect("disk");

        let report = run(&config, true).expect("dry run");
        assert_eq!(report.sandboxes, vec![dead.clone()]);
        assert_eq!(report.images, vec![disk.clone()]);
        assert!(render(&report, true).contains("would remove sandbox"));
        assert!(dead.exists() && disk.exists());

        let report = run(&config, false).expect("gc");
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.sandboxes, vec![dead.clone()]);
        assert!(!dead.exists() && !disk.exists());
        assert!(booting.exists(), "no pid file: left alone");
        assert_eq!(
            render(&run(&config, false).expect("again"), false),
            "nothing to remove\n"
        );
    }
}
