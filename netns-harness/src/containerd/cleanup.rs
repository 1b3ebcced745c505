//! What a containerd of the harness leaves on the machine, and its removal:
//! the processes of its pods (found by their cgroups, which carry the
//! fixture's name), its shims (they name its socket), the pods' netns, its
//! mounts (rootfs, shm) and libcni's cache entries of its pods.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{umount2, MntFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// containerd's default place for pod netns (kubelet nodes have them there).
const NETNS_DIR: &str = "/var/run/netns";
/// Where the cgroup hierarchies are mounted (v1 controllers, and v2 beside
/// them here); runc makes each pod's cgroup in every one.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Where containerd (libcni) caches what ADD answered.
pub const LIBCNI_CACHE: &str = "/var/lib/cni/results";

/// The cgroup a fixture's pods go under: its scratch dir's name, which
/// carries the owner's pid as every harness name does.
pub(super) fn cgroup_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The cgroup hierarchies mounted here (v1's `cpu`, `memory`, `pids`, …, and v2's).
fn hierarchies() -> Vec<PathBuf> {
    std::fs::read_dir(CGROUP_ROOT)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.join("cgroup.procs").exists())
                .collect()
        })
        .unwrap_or_default()
}

/// Every cgroup directory under `name` in every hierarchy, deepest first.
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.filter_map(Result::ok) {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    let mut out = Vec::new();
    for h in hierarchies() {
        let top = h.join(name);
        if top.is_dir() {
            walk(&top, &mut out);
        }
    }
    out
}

pub(super) fn cgroup_procs(name: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = cgroup_dirs(name)
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Processes whose command line contains `needle`: (pid, command line).
pub(super) fn processes_naming(needle: &str) -> Vec<(i32, String)> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .filter_map(Result::ok)
        .filter_map(|p| {
            let pid = p.file_name().to_str()?.parse::<i32>().ok()?;
            let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(needle).then_some((pid, cmdline))
        })
        .collect()
}

/// Kills `pids` and waits (at most 5 s) until they are gone.
fn kill_and_wait(pids: &[i32]) {
    for &pid in pids {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let start = Instant::now();
    while pids.iter().any(|&p| running(p)) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` still runs: a zombie does not (shims are reparented to
/// init, which may take its time to reap them).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z'))
}

/// Mount points under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    out.dedup();
    out
}

/// Removes what the containerd of scratch dir `dir` left (its own process
/// must be gone): the processes of its pods and their netns, its shims, its
/// mounts, its cgroups. Best effort; the caller removes `dir` after.
pub fn clean_up(dir: &Path) {
    let name = cgroup_name(dir);
    let pods = cgroup_procs(&name);
    let netns: HashSet<(u64, u64)> = pods
        .iter()
        .filter_map(|p| std::fs::metadata(format!("/proc/{p}/ns/net")).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    kill_and_wait(&pods);
    let socket = dir.join(super::SOCKET).display().to_string();
    let shims: Vec<i32> = processes_naming(&socket)
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    kill_and_wait(&shims);
    // Only the netns its own pods were in: others under the same dir belong
    // to other runtimes and runs.
    if let Ok(entries) = std::fs::read_dir(NETNS_DIR) {
        for e in entries.filter_map(Result::ok) {
            let ours = std::fs::metadata(e.path())
                .ok()
                .is_some_and(|m| netns.contains(&(m.dev(), m.ino())));
            if ours && e.file_name().to_string_lossy().starts_with("cni-") {
                let _ = umount2(&e.path(), MntFlags::MNT_DETACH);
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    for m in mounts_under(dir) {
        let _ = umount2(&m, MntFlags::MNT_DETACH);
    }
    // libcni's cache of the pods' results (`<network>-<sandbox id>-<ifname>`);
    // each pod's cgroup is named after its sandbox id.
    let sandboxes: Vec<String> = hierarchies()
        .iter()
        .filter_map(|h| std::fs::read_dir(h.join(&name)).ok())
        .flat_map(|d| d.filter_map(Result::ok))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if let Ok(entries) = std::fs::read_dir(LIBCNI_CACHE) {
        for e in entries.filter_map(Result::ok) {
            let file = e.file_name().to_string_lossy().into_owned();
            if sandboxes.iter().any(|id| file.contains(&format!("-{id}-"))) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    // A cgroup goes once its last process has; the kernel may lag a little.
    let start = Instant::now();
    loop {
        let left: Vec<PathBuf> = cgroup_dirs(&name)
            .into_iter()
            .filter(|d| std::fs::remove_dir(d).is_err())
            .collect();
        if left.is_empty() || start.elapsed() > Duration::from_secs(5) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
