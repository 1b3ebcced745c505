//! The result cache, in libcni's layout: `<dir>/results/<network>-<container>-<ifname>`.
//!
//! DEL reads it to learn what ADD made, so entries are written atomically
//! (temp file, then rename) and an unreadable one is treated as absent.

use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{code, Error};

/// One cached attachment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// Always `cniCacheV1`.
    pub kind: String,
    #[serde(rename = "containerId")]
    pub container_id: String,
    /// The config that was used, base64 as libcni writes it.
    #[serde(default)]
    pub config: String,
    #[serde(rename = "ifName")]
    pub ifname: String,
    #[serde(rename = "networkName")]
    pub network_name: String,
    #[serde(rename = "netns", default, skip_serializing_if = "String::is_empty")]
    pub netns: String,
    #[serde(rename = "cniArgs", default, skip_serializing_if = "Vec::is_empty")]
    pub cni_args: Vec<[String; 2]>,
    #[serde(
        rename = "capabilityArgs",
        default,
        skip_serializing_if = "Map::is_empty"
    )]
    pub capability_args: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Anything a caller wants to keep beside the result.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl CacheEntry {
    /// A new entry for one attachment, with the config bytes it was made from.
    pub fn new(network: &str, container_id: &str, ifname: &str, config: &[u8]) -> Self {
        CacheEntry {
            kind: "cniCacheV1".into(),
            container_id: container_id.into(),
            config: base64::engine::general_purpose::STANDARD.encode(config),
            ifname: ifname.into(),
            network_name: network.into(),
            netns: String::new(),
            cni_args: Vec::new(),
            capability_args: Map::new(),
            result: None,
            extra: Map::new(),
        }
    }

    /// The config bytes, decoded.
    pub fn config_bytes(&self) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.config)
            .unwrap_or_default()
    }
}

/// A cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

fn io_err(what: String, e: std::io::Error) -> Error {
    Error::new(code::IO_FAILURE, what).with_details(e.to_string())
}

impl Cache {
    /// A cache rooted at `dir` (libcni's default is `/var/lib/cni`).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Cache { dir: dir.into() }
    }

    fn results(&self) -> PathBuf {
        self.dir.join("results")
    }

    /// The file of one attachment.
    pub fn path(&self, network: &str, container_id: &str, ifname: &str) -> PathBuf {
        self.results()
            .join(format!("{network}-{container_id}-{ifname}"))
    }

    /// Writes an entry, replacing any previous one atomically ([`replace`]:
    /// its hidden file beside it is one [`Cache::list`] skips).
    pub fn put(&self, entry: &CacheEntry) -> Result<(), Error> {
        self.write(entry, false)
    }

    /// Writes an entry where there is none, straight into place (nothing
    /// to swap with); one already there is replaced as [`Cache::put`] does.
    /// A process killed half-way leaves an entry that does not read, as
    /// one whose writer did nothing else yet.
    pub fn create(&self, entry: &CacheEntry) -> Result<(), Error> {
        self.write(entry, true)
    }

    fn write(&self, entry: &CacheEntry, in_place: bool) -> Result<(), Error> {
        let dir = self.results();
        fs::create_dir_all(&dir).map_err(|e| io_err(format!("create {}", dir.display()), e))?;
        let path = self.path(&entry.network_name, &entry.container_id, &entry.ifname);
        let bytes = serde_json::to_vec(entry).unwrap_or_default();
        let failed = |e| io_err(format!("write {}", path.display()), e);
        if !in_place {
            return replace(&path, &bytes).map_err(failed);
        }
        let mut file = match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return replace(&path, &bytes).map_err(failed)
            }
            Err(e) => return Err(failed(e)),
        };
        use std::io::Write;
        file.write_all(&bytes).map_err(|e| {
            // A full or failing disk leaves no half-written entry behind.
            let _ = fs::remove_file(&path);
            failed(e)
        })
    }

    /// Reads an entry; missing or unreadable is `None`.
    pub fn get(&self, network: &str, container_id: &str, ifname: &str) -> Option<CacheEntry> {
        read(&self.path(network, container_id, ifname))
    }

    /// Removes an entry; a missing one is fine.
    pub fn remove(&self, network: &str, container_id: &str, ifname: &str) -> Result<(), Error> {
        let path = self.path(network, container_id, ifname);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_err(format!("remove {}", path.display()), e))
            }
            _ => Ok(()),
        }
    }

    /// Every readable entry of one network.
    pub fn list(&self, network: &str) -> Vec<CacheEntry> {
        let Ok(dir) = fs::read_dir(self.results()) else {
            return Vec::new();
        };
        let mut entries: Vec<CacheEntry> = dir
            .filter_map(|d| d.ok())
            // Hidden: an entry being written, or one just replaced.
            .filter(|d| !d.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|d| read(&d.path()))
            .filter(|e| e.network_name == network)
            .collect();
        entries.sort_by(|a, b| (&a.container_id, &a.ifname).cmp(&(&b.container_id, &b.ifname)));
        entries
    }
}

/// Replaces the file at `path` whole with `bytes`: a reader (or a process
/// killed half-way) sees the old content or the new, never a mix. The new
/// file is written beside it, hidden (`.{name}.tmp{pid}`), and swapped in
/// (`RENAME_EXCHANGE`); the old one is then removed. Renaming over the old
/// file instead would make ext4 allocate the new one's blocks at once and
/// free the old one's (a synchronous discard on a disk mounted with
/// `discard`): a quarter of a millisecond here, where a swap costs nothing
/// of the kind. Nothing is synced.
pub fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let written = fs::write(&tmp, bytes).and_then(|()| {
        if exchange(&tmp, path).is_ok() {
            // The previous content, now at `tmp`.
            let _ = fs::remove_file(&tmp);
            return Ok(());
        }
        // Nothing there yet (or a filesystem that cannot swap).
        fs::rename(&tmp, path)
    });
    if written.is_err() {
        // A full or failing disk leaves no half-written file behind.
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Swaps two paths atomically: `renameat2` with `RENAME_EXCHANGE`, by its
/// system call: nix wraps it for glibc targets alone.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use nix::libc;
    use std::os::unix::ffi::OsStrExt;
    let a = std::ffi::CString::new(a.as_os_str().as_bytes())?;
    let b = std::ffi::CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both paths are NUL-terminated and outlive the call.
    let swapped = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if swapped == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn read(path: &Path) -> Option<CacheEntry> {
    let bytes = fs::read(path).ok()?;
    let entry: CacheEntry = serde_json::from_slice(&bytes).ok()?;
    (entry.kind == "cniCacheV1").then_some(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_remove() {
        let dir = tempfile::Builder::new()
            .prefix("cni-cache-test-")
            .tempdir()
            .unwrap();
        let cache = Cache::new(dir.path());
        let mut e = CacheEntry::new("net", "c1", "eth0", b"{\"a\":1}");
        e.result = Some(serde_json::json!({"cniVersion": "1.0.0"}));
        e.extra.insert("plexus".into(), serde_json::json!({"k": 2}));
        cache.put(&e).unwrap();
        cache
            .put(&CacheEntry::new("other", "c1", "eth0", b""))
            .unwrap();
        let back = cache.get("net", "c1", "eth0").unwrap();
        assert_eq!(back, e);
        assert_eq!(back.config_bytes(), b"{\"a\":1}");
        assert!(cache
            .path("net", "c1", "eth0")
            .ends_with("results/net-c1-eth0"));
        assert_eq!(cache.list("net").len(), 1);
        cache.remove("net", "c1", "eth0").unwrap();
        cache.remove("net", "c1", "eth0").unwrap();
        assert!(cache.get("net", "c1", "eth0").is_none());
    }

    #[test]
    fn a_replaced_entry_leaves_only_the_new_one() {
        let dir = tempfile::Builder::new()
            .prefix("cni-cache-test-")
            .tempdir()
            .unwrap();
        let cache = Cache::new(dir.path());
        let mut e = CacheEntry::new("net", "c1", "eth0", b"{}");
        // Made in place; made again over an entry, it replaces it.
        cache.create(&e).unwrap();
        assert_eq!(cache.get("net", "c1", "eth0").unwrap(), e);
        e.extra
            .insert("plexus".into(), serde_json::json!({"step": 1}));
        cache.create(&e).unwrap();
        assert_eq!(cache.get("net", "c1", "eth0").unwrap(), e);
        e.extra
            .insert("plexus".into(), serde_json::json!({"step": 2}));
        cache.put(&e).unwrap();
        assert_eq!(cache.get("net", "c1", "eth0").unwrap(), e);
        let names: Vec<String> = fs::read_dir(cache.results())
            .unwrap()
            .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["net-c1-eth0"]);
        // A hidden file (a write cut short) is never listed.
        let mut other = CacheEntry::new("net", "c2", "eth0", b"{}");
        other.extra.insert("k".into(), serde_json::json!(1));
        fs::write(
            cache.results().join(".net-c2-eth0.tmp1"),
            serde_json::to_vec(&other).unwrap(),
        )
        .unwrap();
        assert_eq!(cache.list("net"), vec![e]);
    }
}
