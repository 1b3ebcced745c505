//! Fixtures shared by the end-to-end tests: a node (its own netns standing in
//! for the host, with an uplink for macvlan), pods, and the configs that wire
//! Debian's reference plugins in as delegates.

use std::path::{Path, PathBuf};

use cni::NetConfList;
use netns_harness::{kernel, scratch, Netns, Pod, Runtime, Scratch};
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
    /// A fresh node with an uplink veth (both ends up).
    pub fn new(tag: &str) -> Node {
        let scratch = Scratch::new(tag).expect("scratch dir");
        let netns = Netns::create(&scratch::unique("pxn")).expect("node netns");
        kernel::veth(netns.name(), UPLINK, netns.name(), "uplink0p").expect("uplink veth");
        kernel::up(netns.name(), "lo").expect("lo up");
        let bin = netns_harness::scratch::bin_dir(&scratch).expect("bin dir");
        let runtime = Runtime::new(&bin, &scratch.join("libcni"), &netns).expect("runtime");
        std::fs::create_dir_all(scratch.join("net.d")).expect("conf dir");
        Node {
            scratch,
            netns,
            runtime,
            bin,
        }
    }

    /// The node netns name.
    pub fn ns(&self) -> &str {
        self.netns.name()
    }

    /// A new pod netns (lo up, as the runtime's loopback plugin leaves it).
    pub fn pod(&self, namespace: &str) -> (Netns, Pod) {
        let netns = Netns::create(&scratch::unique("pxp")).expect("pod netns");
        kernel::up(netns.name(), "lo").expect("lo up");
        let id = scratch::unique("c").replace('-', "");
        let pod = Pod::new(&id, &netns, namespace);
        (netns, pod)
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

    /// Plexus' log file.
    pub fn log_file(&self) -> PathBuf {
        self.scratch.join("plexus.log")
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

    /// Writes a definition file into the conf dir.
    pub fn define(&self, file: &str, text: &str) {
        std::fs::write(self.conf_dir().join(file), text).expect("write definition");
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

    /// The node's links, addresses and routes.
    pub fn snapshot(&self) -> Vec<String> {
        kernel::snapshot(self.ns()).expect("snapshot")
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

/// `ptp` + `host-local` over the given subnets (the cluster network of most tests).
pub fn ptp(name: &str, version: &str, subnets: &[&str], ipam_dir: &Path) -> Value {
    let ranges: Vec<Value> = subnets.iter().map(|s| json!([{"subnet": s}])).collect();
    json!({
        "cniVersion": version,
        "name": name,
        "type": "ptp",
        "ipMasq": false,
        "mtu": 1400,
        "ipam": {"type": "host-local", "ranges": ranges, "dataDir": ipam_dir, "routes": [{"dst": "0.0.0.0/0"}]}
    })
}

/// A NetworkAttachmentDefinition in YAML.
pub fn nad(name: &str, namespace: Option<&str>, config: &Value) -> String {
    let ns = namespace
        .map(|n| format!("  namespace: {n}\n"))
        .unwrap_or_default();
    let config = serde_json::to_string(config)
        .unwrap_or_default()
        .replace('\'', "''");
    format!(
        "apiVersion: k8s.cni.cncf.io/v1\nkind: NetworkAttachmentDefinition\nmetadata:\n  name: {name}\n{ns}spec:\n  config: '{config}'\n"
    )
}

/// `macvlan` (bridge mode) on the node uplink with `host-local`.
pub fn macvlan(version: &str, subnets: &[&str], ipam_dir: &Path) -> Value {
    let ranges: Vec<Value> = subnets.iter().map(|s| json!([{"subnet": s}])).collect();
    json!({
        "cniVersion": version,
        "type": "macvlan",
        "master": UPLINK,
        "mode": "bridge",
        "ipam": {"type": "host-local", "ranges": ranges, "dataDir": ipam_dir}
    })
}

/// `bridge` with `host-local`.
pub fn bridge(version: &str, bridge: &str, subnet: &str, ipam_dir: &Path) -> Value {
    json!({
        "cniVersion": version,
        "type": "bridge",
        "bridge": bridge,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": ipam_dir}
    })
}

/// The address part of `a.b.c.d/nn`.
pub fn addr_ip(cidr: &str) -> std::net::IpAddr {
    cidr.split('/')
        .next()
        .unwrap_or("")
        .parse()
        .expect("an IP address")
}

/// Global addresses of one family on `dev` inside `ns`.
pub fn family_addrs(ns: &str, dev: &str, v6: bool) -> Vec<String> {
    kernel::addrs(ns, dev)
        .expect("addrs")
        .into_iter()
        .filter(|a| a.contains(':') == v6)
        .collect()
}
