//! A test node: its own netns standing in for the host, with an uplink for
//! macvlan, a runtime bin dir, and the dirs plugins keep state in, so tests and
//! the demo run side by side without touching the real host.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::{kernel, scratch, Netns, Pod, Runtime, Scratch};
use cni::NetConfList;
use serde_json::{json, Value};

/// One test node: a netns that plays the host, with plugins run inside it.
pub struct Node {
    pub scratch: Scratch,
    pub netns: Netns,
    pub runtime: Runtime,
    pub bin: PathBuf,
}

/// The uplink every node has; macvlan networks use it as `master`.
pub const UPLINK: &str = "uplink0";

impl Node {
    /// A fresh node with an uplink veth (both ends up); panics on failure (tests).
    pub fn new(tag: &str) -> Node {
        Node::try_new(tag).unwrap_or_else(|e| panic!("node {tag}: {e}"))
    }

    /// A fresh node with an uplink veth (both ends up).
    pub fn try_new(tag: &str) -> io::Result<Node> {
        let scratch = Scratch::new(tag)?;
        let netns = Netns::create(&scratch::unique("pxn"))?;
        kernel::veth(netns.name(), UPLINK, netns.name(), "uplink0p")?;
        kernel::up(netns.name(), "lo")?;
        let bin = scratch::bin_dir(&scratch)?;
        let runtime = Runtime::new(&bin, &scratch.join("libcni"), &netns)?;
        std::fs::create_dir_all(scratch.join("net.d"))?;
        Ok(Node {
            scratch,
            netns,
            runtime,
            bin,
        })
    }

    /// The node netns name.
    pub fn ns(&self) -> &str {
        self.netns.name()
    }

    /// A new pod netns (lo up, as the runtime's loopback plugin leaves it);
    /// panics on failure (tests).
    pub fn pod(&self, namespace: &str) -> (Netns, Pod) {
        self.try_pod(namespace)
            .unwrap_or_else(|e| panic!("pod netns: {e}"))
    }

    /// A new pod netns (lo up, as the runtime's loopback plugin leaves it).
    pub fn try_pod(&self, namespace: &str) -> io::Result<(Netns, Pod)> {
        let netns = Netns::create(&scratch::unique("pxp"))?;
        kernel::up(netns.name(), "lo")?;
        let id = scratch::unique("c").replace('-', "");
        let pod = Pod::new(&id, &netns, namespace);
        Ok((netns, pod))
    }

    /// host-local's data dir for this node.
    pub fn ipam_dir(&self) -> PathBuf {
        self.scratch.join("ipam")
    }

    /// Where network definitions go.
    pub fn conf_dir(&self) -> PathBuf {
        self.scratch.join("net.d")
    }

    /// Plexus' own cache dir.
    pub fn plexus_cache(&self) -> PathBuf {
        self.scratch.join("plexus")
    }

    /// Waits (at most 10 s) until no Attachment records' publisher that an
    /// ADD started is still writing (their requests are gone); whether none
    /// is left.
    pub fn published(&self) -> bool {
        let dir = self.plexus_cache().join("api").join("publishing");
        let start = std::time::Instant::now();
        loop {
            let busy = std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some());
            if !busy {
                return true;
            }
            if start.elapsed() > std::time::Duration::from_secs(10) {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Starts `plexus agent` in the node netns with `list` as its conflist;
    /// killed when the handle goes. Its output is `agent.out`.
    pub fn start_agent(&self, list: &NetConfList) -> io::Result<AgentProcess> {
        self.start_agent_named(list, "agent")
    }

    /// The same, with its conflist and output as `<name>.conflist` and
    /// `<name>.out` (for more agents than one).
    pub fn start_agent_named(&self, list: &NetConfList, name: &str) -> io::Result<AgentProcess> {
        let conf = self.scratch.join(format!("{name}.conflist"));
        std::fs::write(&conf, serde_json::to_vec(list).map_err(io::Error::other)?)?;
        let log = std::fs::File::create(self.scratch.join(format!("{name}.out")))?;
        let mut cmd = std::process::Command::new(scratch::plexus_bin());
        cmd.arg("agent")
            .arg(&conf)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        (self.netns.enter_hook()?)(&mut cmd);
        Ok(AgentProcess {
            child: cmd.spawn()?,
        })
    }

    /// Plexus' log file.
    pub fn log_file(&self) -> PathBuf {
        self.scratch.join("plexus.log")
    }

    /// A runtime of this node whose plugin `entry` runs under `wrapper`
    /// (a command line, `entry`'s path and arguments appended), the other
    /// plugins as they are.
    pub fn runtime_wrapping(&self, entry: &str, wrapper: &str) -> io::Result<Runtime> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.scratch.join(crate::scratch::unique("wrapped"));
        fs::create_dir_all(&dir)?;
        for e in fs::read_dir(&self.bin)?.flatten() {
            if e.file_name() != entry {
                std::os::unix::fs::symlink(fs::canonicalize(e.path())?, dir.join(e.file_name()))?;
            }
        }
        // The real binary is exec'd by a path whose last component is
        // `entry` (the multi-call binary picks its plugin by that name).
        let named = dir.join(format!("real-{entry}"));
        fs::create_dir_all(&named)?;
        std::os::unix::fs::symlink(fs::canonicalize(self.bin.join(entry))?, named.join(entry))?;
        let script = format!(
            "#!/bin/sh\nexec {wrapper} {} \"$@\"\n",
            named.join(entry).display()
        );
        let path = dir.join(entry);
        fs::write(&path, script)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
        Runtime::new(
            &dir,
            &self.scratch.join(crate::scratch::unique("libcni")),
            &self.netns,
        )
    }

    /// The node conflist with `plexus` as its only plugin.
    pub fn plexus_list(&self, version: &str, cluster: Value) -> NetConfList {
        let v = json!({
            "cniVersion": version,
            "name": "plexus",
            "plugins": [{
                "type": "plexus",
                "capabilities": {"io.kubernetes.cri.pod-annotations": true},
                "clusterNetwork": cluster,
                "confDir": self.conf_dir(),
                "cacheDir": self.plexus_cache(),
                "logFile": self.log_file(),
            }]
        });
        NetConfList::parse_value(&v).expect("plexus conflist")
    }

    /// The node conflist with `plexus` reading definitions from the central
    /// API (`api`: its etcd, as the node conf's `api` field), the
    /// ClusterNetwork `pods` as the cluster network, as node `node_name`.
    pub fn plexus_api_list(&self, api: Value, node_name: &str) -> NetConfList {
        let v = json!({
            "cniVersion": "1.1.0",
            "name": "plexus",
            "plugins": [{
                "type": "plexus",
                "capabilities": {"io.kubernetes.cri.pod-annotations": true},
                "clusterNetwork": "pods",
                "api": api,
                "nodeName": node_name,
                "cacheDir": self.plexus_cache(),
                "logFile": self.log_file(),
            }]
        });
        NetConfList::parse_value(&v).expect("plexus conflist")
    }

    /// Writes a definition file into the conf dir.
    pub fn define(&self, file: &str, text: &str) {
        let path = self.conf_dir().join(file);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// The addresses host-local holds as leases (file names that are IPs).
    pub fn leases(&self) -> Vec<String> {
        let mut out = Vec::new();
        collect_leases(&self.ipam_dir(), &mut out);
        out.sort();
        out
    }

    /// Attachment records plexus holds.
    pub fn records(&self) -> Vec<String> {
        let dir = self.plexus_cache().join("results");
        let mut out: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Asserts that `pod` holds only `lo` and that no lease and no attachment
    /// record is left on the node.
    pub fn assert_released(&self, pod: &Netns, what: &str) {
        let names = kernel::link_names(pod.name()).unwrap_or_else(|e| panic!("{what}: links: {e}"));
        assert_eq!(
            names,
            vec!["lo".to_string()],
            "{what}: the pod holds only lo"
        );
        assert_eq!(
            self.leases(),
            Vec::<String>::new(),
            "{what}: no lease is left"
        );
        assert_eq!(
            self.records(),
            Vec::<String>::new(),
            "{what}: no record is left"
        );
    }

    /// Waits (at most `timeout`) until the node's snapshot is `want`, and
    /// returns the last one taken. For what the kernel undoes on its own
    /// time: a deleted netns is torn down by a work queue after an RCU grace
    /// period, its veth peers on the node with it, seconds later on a busy
    /// machine.
    pub fn settled_snapshot(&self, want: &[String], timeout: std::time::Duration) -> Vec<String> {
        let start = std::time::Instant::now();
        loop {
            let now = self.snapshot();
            if now == want || start.elapsed() > timeout {
                return now;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The node's links, addresses and routes.
    pub fn snapshot(&self) -> Vec<String> {
        kernel::snapshot(self.ns()).unwrap_or_else(|e| panic!("snapshot of {}: {e}", self.ns()))
    }
}

fn collect_leases(dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let p = e.path();
        if p.is_dir() {
            collect_leases(&p, out);
        } else if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
            if name.parse::<std::net::IpAddr>().is_ok() {
                out.push(name.to_string());
            }
        }
    }
}

/// A running `plexus agent`, killed on drop.
pub struct AgentProcess {
    child: std::process::Child,
}

impl AgentProcess {
    /// Kills it (SIGKILL) now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
