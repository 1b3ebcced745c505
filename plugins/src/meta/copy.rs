//! The local copy of what a node last read from the central API: one file per
//! namespace whose NetworkAttachmentDefinitions it read, one for the
//! ClusterNetworks, each with the time of the read. ADD falls back on it when
//! etcd is unreachable, so pods on networks the node already knows still start.
//!
//! Only a cache: written by rename (never half a file) but not synced, and a
//! file that does not read is as good as absent. A file's modification time
//! is when it was last read from etcd; a read that finds what the file holds
//! only touches it (most reads change nothing, and a write costs far more).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tracing::warn;

/// The copy's directory under `cacheDir`.
#[derive(Debug, Clone)]
pub struct LocalCopy {
    dir: PathBuf,
}

/// What the copy holds for the parts asked of it.
#[derive(Debug, Default)]
pub struct Read {
    pub nads: Vec<Value>,
    pub cluster_networks: Vec<Value>,
    /// When the oldest part used was read (seconds since the epoch); `None`
    /// when nothing was there.
    pub read_at: Option<u64>,
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    secs(SystemTime::now())
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl LocalCopy {
    pub fn new(cache_dir: &Path) -> LocalCopy {
        LocalCopy {
            dir: cache_dir.join("api").join("copy"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `namespace`'s NADs, or the ClusterNetworks for `None`. Namespaces are
    /// DNS labels (checked before any read), so a name never leaves the dir.
    fn path(&self, namespace: Option<&str>) -> PathBuf {
        match namespace {
            Some(ns) => self.dir.join(format!("ns-{ns}.json")),
            None => self.dir.join("clusternetworks.json"),
        }
    }

    /// Keeps what one read returned; a failure only costs the fallback.
    pub fn save(&self, namespace: Option<&str>, objects: &[Value]) {
        let path = self.path(namespace);
        let raw = match serde_json::to_vec(objects) {
            Ok(raw) => raw,
            Err(e) => return warn!(error = %e, "local copy of definitions not encoded"),
        };
        if fs::read(&path).is_ok_and(|old| old == raw) {
            let touched = File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(SystemTime::now()));
            if touched.is_ok() {
                return;
            }
        }
        if let Err(e) = replace_file(&self.dir, &path, &raw) {
            warn!(error = %e, path = %path.display(), "local copy of definitions not saved");
        }
    }

    /// The objects of one part (`None`: the ClusterNetworks), when the copy
    /// has it, and when it was read.
    pub fn load_one(&self, namespace: Option<&str>) -> Option<(u64, Vec<Value>)> {
        let path = self.path(namespace);
        let file = File::open(&path).ok()?;
        let read_at = secs(file.metadata().ok()?.modified().ok()?);
        let objects = serde_json::from_reader(std::io::BufReader::new(file)).ok()?;
        Some((read_at, objects))
    }

    /// The ClusterNetworks and the NADs of `namespaces` (`None`: every
    /// namespace the copy has).
    pub fn load(&self, namespaces: Option<&[String]>) -> Read {
        let listed: Vec<String> = match namespaces {
            Some(ns) => ns.to_vec(),
            None => self.namespaces(),
        };
        let mut read = Read::default();
        let mut oldest = |t: u64| read.read_at = Some(read.read_at.map_or(t, |o| o.min(t)));
        let mut cluster_networks = Vec::new();
        if let Some((t, objects)) = self.load_one(None) {
            oldest(t);
            cluster_networks = objects;
        }
        let mut nads = Vec::new();
        for ns in &listed {
            if let Some((t, objects)) = self.load_one(Some(ns)) {
                oldest(t);
                nads.extend(objects);
            }
        }
        read.nads = nads;
        read.cluster_networks = cluster_networks;
        read
    }

    fn namespaces(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let ns = name.strip_prefix("ns-")?.strip_suffix(".json")?;
                Some(ns.to_string())
            })
            .collect()
    }
}

/// Writes `path` (in `dir`) whole or not at all: a temporary file beside
/// it, renamed over it; the temporary file goes on failure. No sync: the
/// local copy and the journal are caches of what etcd holds.
pub(super) fn replace_file(dir: &Path, path: &Path, raw: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{}.{name}", std::process::id()));
    let written = fs::create_dir_all(dir)
        .and_then(|_| fs::write(&tmp, raw))
        .and_then(|_| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn saves_and_loads_per_namespace() {
        let dir = tempfile::Builder::new()
            .prefix("plexus-copy-test-")
            .tempdir()
            .unwrap();
        let copy = LocalCopy::new(dir.path());
        assert!(copy.load(Some(&["red".into()])).read_at.is_none());
        copy.save(Some("red"), &[json!({"metadata": {"name": "a"}})]);
        copy.save(Some("blue"), &[json!({"metadata": {"name": "b"}})]);
        copy.save(None, &[json!({"metadata": {"name": "c"}})]);
        // The same read again only touches the file.
        copy.save(None, &[json!({"metadata": {"name": "c"}})]);
        let red = copy.load(Some(&["red".into()]));
        assert_eq!(red.nads.len(), 1);
        assert_eq!(red.cluster_networks.len(), 1);
        assert!(red.read_at.is_some_and(|t| t <= now()));
        assert_eq!(copy.load(None).nads.len(), 2);
        // Nothing but the copies is left behind.
        assert_eq!(fs::read_dir(copy.dir()).unwrap().count(), 3);
    }
}
