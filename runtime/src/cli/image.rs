//! `cocoon image prepare`: builds the EROFS image disk of a layer chain ahead of time, so
//! the first pod using the image does not wait for it.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use crate::config::Config;
use crate::image::{ImageCache, ImageDisk};

use super::{Error, Result};

/// The lower directories of the arguments: each argument is one directory, or an
/// overlay `lowerdir=` value (`a:b:c`, with or without the `lowerdir=` prefix).
pub fn lowerdirs(args: &[String]) -> Result<Vec<PathBuf>> {
    let dirs: Vec<PathBuf> = args
        .iter()
        .flat_map(|a| a.strip_prefix("lowerdir=").unwrap_or(a).split(':'))
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect();
    if dirs.is_empty() {
        return Err(Error::Usage(
            "no lower directories given (topmost layer first, as in overlay's lowerdir=)".into(),
        ));
    }
    if let Some(rel) = dirs.iter().find(|d| !d.is_absolute()) {
        return Err(Error::Usage(format!(
            "lower directory {} must be an absolute path",
            rel.display()
        )));
    }
    Ok(dirs)
}

/// Builds (or finds) the image disk of `dirs` and leaves it cached without a holder:
/// acquired for a temporary holder, then released. Progress goes to `progress`.
pub fn prepare(config: &Config, dirs: &[PathBuf], progress: &mut impl Write) -> Result<ImageDisk> {
    let cache = ImageCache::from_config(config);
    let key = ImageCache::key_for(dirs)?;
    let path = cache.disk_path(&key);
    let layers = match dirs.len() {
        1 => "1 layer".to_string(),
        n => format!("{n} layers"),
    };
    let _ = writeln!(progress, "image key {key} ({layers})");
    if path.exists() {
        let _ = writeln!(progress, "found {} in the cache", path.display());
    } else {
        let _ = writeln!(
            progress,
            "building {} with mkfs.erofs (large images take a while)...",
            path.display()
        );
    }
    let holder = format!("cocoon-prepare-{}", std::process::id());
    let start = Instant::now();
    let disk = cache.acquire(dirs, &holder)?;
    cache.release(&disk.key, &holder)?;
    if disk.built {
        let size = std::fs::metadata(&disk.path).map(|m| m.len()).unwrap_or(0);
        let _ = writeln!(
            progress,
            "built in {:.1}s, {} KiB",
            start.elapsed().as_secs_f64(),
            size.div_ceil(1024)
        );
    }
    Ok(disk)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn lowerdirs_take_separate_or_overlay_forms() {
        assert_eq!(
            lowerdirs(&s(&["/l/2", "/l/1"])).expect("two"),
            vec![PathBuf::from("/l/2"), PathBuf::from("/l/1")]
        );
        assert_eq!(
            lowerdirs(&s(&["lowerdir=/a:/b"])).expect("overlay"),
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
        assert!(lowerdirs(&[]).is_err());
        let e = lowerdirs(&s(&["rel/dir"]))
            .expect_err("relative")
            .to_string();
        assert!(e.contains("rel/dir"), "{e}");
    }

    #[test]
    fn missing_layer_is_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = Config {
            state_dir: tmp.path().join("run"),
            image_dir: tmp.path().join("images"),
            ..Config::default()
        };
        let missing = tmp.path().join("no-layer");
        let e =
            prepare(&config, std::slice::from_ref(&missing), &mut Vec::new()).expect_err("missing");
        assert!(e.to_string().contains("no-layer"), "{e}");
    }
}
