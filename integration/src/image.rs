//! A local container image for CRI tests, with no registry: Debian's static busybox as
//! one uncompressed layer ([`crate::oci::busybox_rootfs`]), written as an OCI image
//! layout tarball that `ctr images import` takes.
//!
//! The image's default command sleeps forever, so the same image also serves as the
//! CRI `sandbox_image` (the pause container of runc pods).

use crate::oci;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The reference the image is imported under (a full reference: containerd leaves it as is).
pub const BUSYBOX_REF: &str = "cocoon.test/busybox:latest";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Rootfs(#[from] oci::OciError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tar failed ({status}): {stderr}")]
    Tar {
        status: std::process::ExitStatus,
        stderr: String,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let context = context.into();
    move |source| ImageError::Io { context, source }
}

fn sha256_hex(data: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(data);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs GNU tar with fixed owners and times, so the same input gives the same bytes.
fn tar(args: &[&str], dir: &Path, out: &Path) -> Result<(), ImageError> {
    let o = Command::new("tar")
        .args([
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "--mtime=@0",
            "--sort=name",
            "-C",
        ])
        .arg(dir)
        .arg("-cf")
        .arg(out)
        .args(args)
        .output()
        .map_err(io("run tar"))?;
    if !o.status.success() {
        return Err(ImageError::Tar {
            status: o.status,
            stderr: String::from_utf8_lossy(&o.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Writes a blob into an OCI layout's `blobs/sha256/` and returns its digest.
fn put_blob(layout: &Path, data: &[u8]) -> Result<String, ImageError> {
    let hex = sha256_hex(data);
    let p = layout.join("blobs/sha256").join(&hex);
    std::fs::write(&p, data).map_err(io(format!("write {}", p.display())))?;
    Ok(format!("sha256:{hex}"))
}

/// Builds the busybox image as an OCI layout tarball in `work` (a scratch directory the
/// caller owns) and returns the tarball's path.
pub fn busybox_oci_archive(work: &Path) -> Result<PathBuf, ImageError> {
    let rootfs = work.join("rootfs");
    let layout = work.join("layout");
    std::fs::create_dir_all(&rootfs).map_err(io("create image rootfs dir"))?;
    std::fs::create_dir_all(layout.join("blobs/sha256")).map_err(io("create OCI layout"))?;
    oci::busybox_rootfs(&rootfs)?;

    let layer_path = work.join("layer.tar");
    tar(&["."], &rootfs, &layer_path)?;
    let layer = std::fs::read(&layer_path).map_err(io("read layer.tar"))?;
    let layer_digest = put_blob(&layout, &layer)?;

    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": [oci::DEFAULT_PATH],
            // Sleeps until killed: the pause process of runc pods, and a harmless
            // default for containers that set no command.
            "Cmd": ["/bin/sleep", "2147483647"],
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
        "history": [{ "created_by": "cocoon integration tests: busybox-static" }],
    }))
    .map_err(|e| io("encode image config")(e.into()))?;
    let config_digest = put_blob(&layout, &config)?;

    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))
    .map_err(|e| io("encode image manifest")(e.into()))?;
    let manifest_digest = put_blob(&layout, &manifest)?;

    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                // containerd's importer names the image after this annotation.
                "io.containerd.image.name": BUSYBOX_REF,
                "org.opencontainers.image.ref.name": "latest",
            },
        }],
    }))
    .map_err(|e| io("encode image index")(e.into()))?;
    std::fs::write(layout.join("index.json"), index).map_err(io("write index.json"))?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .map_err(io("write oci-layout"))?;

    let archive = work.join("busybox-oci.tar");
    tar(&["oci-layout", "index.json", "blobs"], &layout, &archive)?;
    Ok(archive)
}
