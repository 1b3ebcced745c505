//! The sandbox ("pause") image: one layer holding Debian's static busybox,
//! whose entrypoint sleeps until the runtime kills it. Written as an OCI
//! image layout in a tar archive, the form `ctr images import` takes.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::json;

use crate::scratch::Scratch;

/// The name the image is imported under and the runtime's `sandbox_image`.
pub const SANDBOX_IMAGE: &str = "localhost/plexus-pause:1";

/// Debian's `busybox-static`.
const BUSYBOX: &str = "/bin/busybox";

/// The image archive, built on first use and kept for the process.
pub fn archive() -> io::Result<PathBuf> {
    static ARCHIVE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ARCHIVE
        .get_or_init(|| build().map_err(|e| format!("sandbox image: {e}")))
        .clone()
        .map_err(io::Error::other)
}

fn build() -> io::Result<PathBuf> {
    // Lives as long as the process; a later run sweeps it (its owner gone).
    let dir = Scratch::new("image")?;
    let stage = dir.join("rootfs");
    std::fs::create_dir_all(stage.join("bin"))?;
    std::fs::copy(BUSYBOX, stage.join("bin/busybox"))
        .map_err(|e| io::Error::new(e.kind(), format!("copy {BUSYBOX}: {e}")))?;
    let layout = dir.join("oci");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;

    let layer_tar = dir.join("layer.tar");
    tar(&stage, &["bin"], &layer_tar)?;
    let layer = Blob::store(&blobs, &std::fs::read(&layer_tar)?)?;
    let config = Blob::store(
        &blobs,
        &serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": ["PATH=/bin"],
                // About 68 years: the sandbox holds its namespaces until killed.
                "Entrypoint": ["/bin/busybox", "sleep", "2147483647"],
            },
            "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
        }))?,
    )?;
    let manifest = Blob::store(
        &blobs,
        &serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config.descriptor("application/vnd.oci.image.config.v1+json"),
            "layers": [layer.descriptor("application/vnd.oci.image.layer.v1.tar")],
        }))?,
    )?;
    let mut entry = manifest.descriptor("application/vnd.oci.image.manifest.v1+json");
    entry["annotations"] = json!({"io.containerd.image.name": SANDBOX_IMAGE});
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [entry]}))?,
    )?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;

    let archive = dir.join("image.tar");
    tar(&layout, &["oci-layout", "index.json", "blobs"], &archive)?;
    std::mem::forget(dir);
    Ok(archive)
}

/// One content-addressed blob of the layout.
struct Blob {
    digest: String,
    size: usize,
}

impl Blob {
    fn store(blobs: &Path, bytes: &[u8]) -> io::Result<Blob> {
        let tmp = blobs.join("incoming");
        std::fs::write(&tmp, bytes)?;
        let hex = sha256(&tmp)?;
        std::fs::rename(&tmp, blobs.join(&hex))?;
        Ok(Blob {
            digest: format!("sha256:{hex}"),
            size: bytes.len(),
        })
    }

    fn descriptor(&self, media_type: &str) -> serde_json::Value {
        json!({"mediaType": media_type, "digest": self.digest, "size": self.size})
    }
}

/// An archive of `names` in `dir`, the same bytes every time (owner, times
/// and order fixed), so the layer's digest is stable.
fn tar(dir: &Path, names: &[&str], out: &Path) -> io::Result<()> {
    let status = Command::new("tar")
        .args([
            "--create",
            "--sort=name",
            "--mtime=@0",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
        ])
        .arg("--file")
        .arg(out)
        .arg("--directory")
        .arg(dir)
        .args(names)
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "tar of {} failed: {status}",
            dir.display()
        )))
    }
}

fn sha256(file: &Path) -> io::Result<String> {
    let out = Command::new("sha256sum").arg(file).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.split_whitespace().next() {
        Some(hex) if out.status.success() && hex.len() == 64 => Ok(hex.to_string()),
        _ => Err(io::Error::other(format!(
            "sha256sum {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}
