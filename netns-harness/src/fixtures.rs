//! Configs that wire Debian's reference plugins in as delegates, and small
//! readers for what they leave in a pod.

use std::path::Path;

use serde_json::{json, Value};

use crate::kernel;
use crate::node::UPLINK;

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

/// The built-in `plexus-veth` + `host-local` over the given subnets.
pub fn plexus_veth(name: &str, subnets: &[&str], ipam_dir: &Path) -> Value {
    let ranges: Vec<Value> = subnets.iter().map(|s| json!([{"subnet": s}])).collect();
    json!({
        "cniVersion": "1.0.0",
        "name": name,
        "type": "plexus-veth",
        "ipam": {"type": "host-local", "ranges": ranges, "dataDir": ipam_dir}
    })
}

/// A `plexus-ipam` section on etcd (`endpoints`, the default prefix) for
/// node `node_name`, its state under `state_dir`.
pub fn plexus_ipam_on_etcd(
    subnets: &[&str],
    endpoints: &[String],
    node_name: &str,
    state_dir: &Path,
) -> Value {
    let ranges: Vec<Value> = subnets.iter().map(|s| json!([{"subnet": s}])).collect();
    json!({
        "type": "plexus-ipam",
        "ranges": ranges,
        "store": {"type": "etcd", "endpoints": endpoints},
        "nodeName": node_name,
        "stateDir": state_dir,
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
        .unwrap_or_else(|e| panic!("addresses of {dev} in {ns}: {e}"))
        .into_iter()
        .filter(|a| a.contains(':') == v6)
        .collect()
}

/// What the node's `plexus-ipam` caches under `state_dir` hold, as read
/// (`cache-<store>.json`: a checksum line, then the cache).
pub fn ipam_cache_files(state_dir: &Path) -> Vec<Vec<u8>> {
    std::fs::read_dir(state_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("cache-"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .collect()
}

/// Waits until `plexus-ipam`'s publisher has written to the store every
/// assignment the node's reserve handed out under `state_dir` (no IPAM
/// cache there holds an unpublished one), as a reader of the store that
/// follows an ADD must; panics after 10 s.
pub fn ipam_published(state_dir: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting: Vec<String> = ipam_cache_files(state_dir)
            .into_iter()
            .map(|raw| String::from_utf8_lossy(&raw).into_owned())
            .filter(|text| text.contains("\"unpublished\""))
            .collect();
        if waiting.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "IPAM assignments still unpublished after 10 s under {}: {waiting:?}",
            state_dir.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
