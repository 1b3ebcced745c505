//! A real containerd (Debian's 1.6, with runc) for the tests: its own root,
//! state, sockets and cgroup, started inside a test node's netns (the node
//! plays the host: the CNI plugins it execs make their host-side links
//! there), Plexus' conflist as its only CNI config, the busybox sandbox image
//! imported, and a CRI client on its socket.
//!
//! Dropping it kills containerd, its shims and every process of its pods,
//! and unmounts what it mounted (pod netns, rootfs, shm) and removes its
//! cgroups, whatever state the test left it in. A killed test run leaves the
//! same behind; the next run's [`crate::scratch::sweep_stale`] removes it with
//! [`clean_up`].

mod cleanup;
mod cri;
mod image;

pub use cleanup::{clean_up, LIBCNI_CACHE};
pub use cri::{Cri, CriResult, PodConfig, SandboxStatus};
pub use image::SANDBOX_IMAGE;

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cni::NetConfList;

use crate::scratch::Scratch;
use crate::Netns;
use cleanup::{cgroup_name, cgroup_procs, processes_naming};

/// The tag of a fixture's scratch dir, whose name is also its cgroup's.
pub const TAG: &str = "cri";
const SOCKET: &str = "containerd.sock";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running containerd with its CRI client.
pub struct Containerd {
    dir: Scratch,
    hook: cni::exec::Hook,
    child: Option<Child>,
    cri: Option<Cri>,
}

impl Containerd {
    /// Starts containerd inside `ns` with `list` as its only CNI config and
    /// `cni_bin` as its CNI bin dir, imports the sandbox image and waits
    /// until CRI reports the runtime and the network ready.
    pub fn start_in(ns: &Netns, cni_bin: &Path, list: &NetConfList) -> io::Result<Containerd> {
        let archive = image::archive()?;
        let dir = Scratch::new(TAG)?;
        let conf_dir = dir.join("net.d");
        std::fs::create_dir_all(&conf_dir)?;
        std::fs::write(
            conf_dir.join("10-plexus.conflist"),
            serde_json::to_vec_pretty(list).map_err(io::Error::other)?,
        )?;
        std::fs::write(dir.join("config.toml"), config(&dir, cni_bin, &conf_dir))?;
        let mut c = Containerd {
            dir,
            hook: ns.enter_hook()?,
            child: None,
            cri: None,
        };
        c.launch()?;
        c.import(&archive)?;
        Ok(c)
    }

    /// The CRI client.
    pub fn cri(&self) -> &Cri {
        match &self.cri {
            Some(cri) => cri,
            None => panic!("containerd is not running: its restart failed"),
        }
    }

    /// containerd's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join(SOCKET)
    }

    /// The cgroup (under every controller) its pods run in.
    pub fn cgroup_parent(&self) -> String {
        format!("/{}", cgroup_name(self.dir.path()))
    }

    /// What containerd logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// Kills containerd (SIGKILL, as a crash would) and starts it again on
    /// the same root and state; shims and pods keep running meanwhile.
    pub fn restart(&mut self) -> io::Result<()> {
        self.cri = None;
        self.kill();
        self.launch()
    }

    /// Pids of this containerd's shims still running.
    pub fn shims(&self) -> Vec<i32> {
        let socket = self.socket().display().to_string();
        processes_naming(&socket)
            .into_iter()
            .filter(|(_, cmdline)| cmdline.contains("containerd-shim"))
            .map(|(pid, _)| pid)
            .collect()
    }

    /// Pids of every process in its pods' cgroups.
    pub fn pod_processes(&self) -> Vec<i32> {
        cgroup_procs(&cgroup_name(self.dir.path()))
    }

    fn launch(&mut self) -> io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(self.dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        (self.hook)(&mut cmd);
        self.child = Some(
            cmd.spawn()
                .map_err(|e| io::Error::new(e.kind(), format!("start containerd: {e}")))?,
        );
        let start = Instant::now();
        let mut last = String::from("no socket yet");
        while start.elapsed() < READY_TIMEOUT {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(self.failed(&format!("containerd exited: {status}")));
                }
            }
            if self.socket().exists() {
                match Cri::connect(&self.socket(), &self.cgroup_parent()) {
                    Ok(cri) => match cri.ready() {
                        Ok(Ok(())) => {
                            self.cri = Some(cri);
                            return Ok(());
                        }
                        Ok(Err(unmet)) => last = unmet,
                        // No CRI service at all: its plugin failed to load.
                        Err(e) if e.code() == tonic::Code::Unimplemented => {
                            return Err(self.failed(&format!("no CRI: {}", e.message())));
                        }
                        Err(e) => last = e.to_string(),
                    },
                    Err(e) => last = e.to_string(),
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(self.failed(&format!("not ready in {READY_TIMEOUT:?}: {last}")))
    }

    /// Imports the sandbox image with `ctr` and waits until CRI sees it.
    fn import(&self, archive: &Path) -> io::Result<()> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", "k8s.io", "images", "import"])
            .args(["--snapshotter", "overlayfs"])
            .arg(archive)
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "ctr images import {}: {}",
                archive.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let start = Instant::now();
        while start.elapsed() < READY_TIMEOUT {
            if self.cri().has_image(SANDBOX_IMAGE).unwrap_or(false) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(self.failed(&format!("CRI does not list {SANDBOX_IMAGE} after import")))
    }

    fn failed(&self, what: &str) -> io::Error {
        let log = self.log();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        io::Error::other(format!("containerd: {what}\n{}", tail.join("\n")))
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.cri = None;
        self.kill();
        clean_up(self.dir.path());
    }
}

/// containerd's config: everything of its own under `dir`, CRI with Plexus'
/// conflist, the busybox sandbox image, `restrict_oom_score_adj` (a root
/// that may not lower its own score, as in a container), only the plugins
/// this host can run.
fn config(dir: &Scratch, cni_bin: &Path, conf_dir: &Path) -> String {
    let p = |name: &str| dir.join(name).display().to_string();
    let (root, state, socket) = (p("root"), p("state"), p(SOCKET));
    let runc_root = p("state/runc");
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.internal.v1.opt",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{runc_root}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
"#,
        bin = cni_bin.display(),
        conf = conf_dir.display(),
    )
}
