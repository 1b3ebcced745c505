//! Scratch directories removed on drop, and where the binaries under test live.
//!
//! Everything the harness names on the machine (scratch dirs, netns) carries
//! the pid of the process that made it, so that a later run can tell what a
//! killed run left behind and remove it ([`sweep_stale`]) without touching what
//! a concurrent run still uses.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique name for this process: `<tag>-<pid>-<n>` (pid and n in hex),
/// unique among concurrent test processes and short enough for netns names.
pub fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{tag}-{:x}-{n:x}", std::process::id())
}

/// The pid of the process that named `name` with [`unique`], if it is such a name.
pub fn owner_pid(name: &str) -> Option<u32> {
    let mut parts = name.rsplitn(3, '-');
    let n = parts.next()?;
    let pid = parts.next()?;
    let tag = parts.next()?;
    if tag.is_empty() || u64::from_str_radix(n, 16).is_err() {
        return None;
    }
    u32::from_str_radix(pid, 16).ok()
}

fn alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Scratch dirs (`$TMPDIR/plexus-*`) and netns (`/run/netns/px*`) whose
/// owner process is gone: what a killed run left under the harness' names.
fn stale_names(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let pid = owner_pid(name.strip_prefix(prefix)?)?;
            (!alive(pid)).then(|| e.path())
        })
        .collect()
}

/// Removes what earlier, killed runs of the harness left behind: processes
/// still running from their scratch dirs (etcd members, qemu, containerd and
/// its shims), their netns, what a containerd of theirs left (pods, mounts,
/// cgroups) and their scratch dirs. Never touches anything of a live
/// process. Runs once per process, before the first scratch dir or netns is
/// made.
pub fn sweep_stale() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        let dirs = stale_names(&std::env::temp_dir(), "plexus-");
        kill_processes_under(&dirs);
        for ns in stale_names(Path::new(crate::netns::RUN_DIR), "px") {
            let _ = nix::mount::umount2(&ns, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_file(&ns);
        }
        for dir in dirs {
            let containerd = format!("plexus-{}-", crate::containerd::TAG);
            if dir
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&containerd))
            {
                crate::containerd::clean_up(&dir);
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    });
}

/// Kills every process whose command line names a path under one of `dirs`.
fn kill_processes_under(dirs: &[PathBuf]) {
    if dirs.is_empty() {
        return;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    let needles: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    for p in procs.filter_map(Result::ok) {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if needles.iter().any(|n| cmdline.contains(n.as_str())) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A directory that is removed when dropped.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// Creates `/tmp/plexus-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> std::io::Result<Scratch> {
        sweep_stale();
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
pub const PLEXUS_NAMES: [&str; 7] = [
    "plexus",
    "plexus-veth",
    "plexus-ipvlan",
    "plexus-macvlan",
    "plexus-userspace",
    "plexus-sriov",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_carry_their_owner() {
        let a = unique("pxn");
        let b = unique("etcd-tls");
        assert_ne!(a, b);
        assert_eq!(owner_pid(&a), Some(std::process::id()));
        assert_eq!(owner_pid(&b), Some(std::process::id()));
        assert_eq!(owner_pid("conf-test-x"), None);
        assert_eq!(owner_pid("1a-2"), None);
    }

    #[test]
    fn sweep_removes_only_what_dead_owners_left() {
        // A pid above pid_max never runs; our own pid always does.
        let base = tempfile::Builder::new()
            .prefix("plexus-sweep-test-")
            .tempdir()
            .unwrap();
        let dead = base.path().join("plexus-etcd-7fffffff-0");
        let live = base.path().join(format!("plexus-{}", unique("etcd")));
        let other = base.path().join("plexus-conf-test-abc");
        for d in [&dead, &live, &other] {
            std::fs::create_dir(d).unwrap();
        }
        let stale = stale_names(base.path(), "plexus-");
        assert_eq!(stale, vec![dead]);
    }
}
