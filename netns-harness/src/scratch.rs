//! Scratch directories removed on drop, and where the binaries under test live.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique name for this process: `<tag>-<pid>-<n>`, short enough for
/// interface and netns names when `tag` is.
pub fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{tag}{}-{n}", std::process::id() % 100_000)
}

/// A directory that is removed when dropped.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// Creates `/tmp/plexus-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> std::io::Result<Scratch> {
        let path = std::env::temp_dir().join(format!("plexus-{}", unique(tag)));
        std::fs::create_dir_all(&path)?;
        Ok(Scratch { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside it.
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Debian's reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// The names the multi-call `plexus` binary answers to.
pub const PLEXUS_NAMES: [&str; 5] = [
    "plexus",
    "plexus-veth",
    "plexus-ipvlan",
    "plexus-macvlan",
    "plexus-ipam",
];

/// The `plexus` binary under test: `$PLEXUS_BIN`, else the workspace's debug build.
pub fn plexus_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PLEXUS_BIN") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/plexus")
}

/// A runtime bin dir, as `/opt/cni/bin` would be: every reference plugin and
/// `plexus`, linked into one directory.
pub fn bin_dir(scratch: &Scratch) -> std::io::Result<PathBuf> {
    let dir = scratch.join("bin");
    std::fs::create_dir_all(&dir)?;
    for entry in std::fs::read_dir(REFERENCE_PLUGINS)? {
        let entry = entry?;
        std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name()))?;
    }
    let plexus = plexus_bin().canonicalize()?;
    for name in PLEXUS_NAMES {
        std::os::unix::fs::symlink(&plexus, dir.join(name))?;
    }
    Ok(dir)
}
