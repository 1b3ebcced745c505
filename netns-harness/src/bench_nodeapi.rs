//! `make bench`, node side of the central API: a pod's ADD and DEL (the
//! cluster network and one secondary network) with the definitions read from
//! the API's etcd, against the same pod with the same definitions in
//! `confDir`, alternating on one node in one run.
//!
//! Both variants are the same but for where definitions come from: the
//! ClusterNetwork `pods` (`plexus-veth` + `plexus-ipam` on the etcd in the
//! node netns, dual stack) and the NetworkAttachmentDefinition `default/data`
//! (`plexus-macvlan` on the uplink + `host-local`, dual stack), the same node
//! name, cache dir and log. The API variant stores them as `plexusd` does
//! (JSON objects at their `conf::api` keys) in that etcd, reads them there at
//! each ADD (through the node's store relay) and writes an Attachment record
//! per interface; its DEL removes them.

use serde_json::{json, Value};

use crate::bench::{scenario, verdict, Variant};
use crate::etcd::EtcdCluster;
use crate::fixtures::plexus_ipam_on_etcd;
use crate::node::{Node, UPLINK};
use conf::api::{ATTACHMENT, CLUSTER_NETWORK, NAD};

/// The node's name, in both variants' Attachment and IPAM records.
const NODE: &str = "bench-node";
/// Members of the etcd the API and `plexus-ipam` share.
const MEMBERS: usize = 1;

/// Stores `obj` at `key` as `plexusd` does: the JSON object, no
/// `resourceVersion` (that is the etcd revision).
fn put(etcd: &EtcdCluster, key: &str, obj: &Value) -> Result<(), String> {
    etcd.put_get(0, key, &obj.to_string())
        .map_err(|e| format!("put {key}: {e}"))
        .map(|_| ())
}

fn metadata(name: &str, namespace: Option<&str>) -> Value {
    let mut m = json!({"name": name, "uid": format!("uid-bench-{name}"),
                       "creationTimestamp": "2025-01-01T00:00:00Z"});
    if let Some(ns) = namespace {
        m["namespace"] = json!(ns);
    }
    m
}

/// Keys under `prefix` in the etcd (inside the node netns).
fn keys(etcd: &EtcdCluster, prefix: &str) -> Result<Vec<String>, String> {
    let out = etcd
        .etcdctl(0, &["get", "--prefix", "--keys-only", prefix])
        .map_err(|e| e.to_string())?;
    Ok(out
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// Nothing of a pod is left: no host-local lease, no plexus record, no IPAM
/// handle, no Attachment record, nothing journaled.
fn nothing_left(node: &Node, etcd: &EtcdCluster, what: &str) -> Result<(), String> {
    let mut left = Vec::new();
    left.extend(node.leases().into_iter().map(|l| format!("lease {l}")));
    left.extend(node.records().into_iter().map(|r| format!("record {r}")));
    for prefix in ["/plexus/ipam/handles/", &ATTACHMENT.prefix(None)] {
        left.extend(keys(etcd, prefix)?.into_iter().map(|k| format!("key {k}")));
    }
    let journal = node.plexus_cache().join("api").join("journal");
    if let Ok(entries) = std::fs::read_dir(&journal) {
        left.extend(
            entries
                .flatten()
                .map(|e| format!("journal {:?}", e.file_name())),
        );
    }
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!("{what}: left behind: {left:?}"))
    }
}

/// The node side of the central API, `cycles` ADD/DEL cycles per variant.
pub fn run(cycles: usize) -> Result<(), String> {
    let node = Node::try_new("bench-nodeapi").map_err(|e| format!("create node: {e}"))?;
    let etcd = EtcdCluster::start_in(MEMBERS, &node.netns)
        .map_err(|e| format!("etcd in the node: {e}"))?;
    let endpoints = etcd.endpoints();
    let cluster = json!({
        "cniVersion": "1.0.0", "type": "plexus-veth",
        "ipam": plexus_ipam_on_etcd(
            &["10.210.0.0/16", "fd00:210::/64"],
            &endpoints,
            NODE,
            &node.scratch.join("plexus-ipam"),
        ),
    });
    let data = json!({
        "cniVersion": "1.0.0", "type": "plexus-macvlan", "master": UPLINK, "mode": "bridge",
        "ipam": {"type": "host-local", "dataDir": node.ipam_dir(),
                 "ranges": [[{"subnet": "192.168.210.0/24"}], [{"subnet": "fd00:211::/64"}]]},
    });

    // confDir: a cluster-scoped definition and the tenant's, one file each.
    node.define("pods.yaml", &crate::fixtures::nad("pods", None, &cluster));
    node.define(
        "data.yaml",
        &crate::fixtures::nad("data", Some("default"), &data),
    );
    let mut in_dir = node.plexus_list("1.0.0", json!("pods"));
    in_dir.plugins[0].insert("nodeName".into(), json!(NODE));

    // The API: the same two, as plexusd stores a ClusterNetwork and a NAD.
    put(
        &etcd,
        &CLUSTER_NETWORK.key(None, "pods"),
        &json!({"apiVersion": "plexus.io/v1", "kind": "ClusterNetwork",
                "metadata": metadata("pods", None),
                "spec": {"config": cluster.to_string(), "allowedNamespaces": ["*"]}}),
    )?;
    put(
        &etcd,
        &NAD.key(Some("default"), "data"),
        &json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                "metadata": metadata("data", Some("default")),
                "spec": {"config": data.to_string()}}),
    )?;
    // The node's store relay, as a node runs it: ADD's read of the API goes
    // over its open connection.
    let socket = node.scratch.join("store.sock");
    let _relay = crate::relay::StoreRelay::start_in(&node.netns, &socket)
        .map_err(|e| format!("store relay: {e}"))?;
    let mut from_api = in_dir.clone();
    from_api.plugins[0].remove("confDir");
    from_api.plugins[0].insert(
        "api".into(),
        json!({"endpoints": endpoints, "relay": socket}),
    );

    // Once each before timing: both attach, the API variant records each
    // interface in etcd (not from a local copy), and both leave nothing. This
    // also claims the node's IPAM blocks, for both alike.
    for (label, list) in [("confDir", &in_dir), ("API", &from_api)] {
        let (_ns, pod) = node
            .try_pod("default")
            .map_err(|e| format!("pod netns: {e}"))?;
        let pod = pod.networks("data");
        node.runtime
            .add(list, &pod)
            .map_err(|e| format!("{label} ADD: {e}"))?;
        if !node.published() {
            return Err(format!(
                "{label} ADD: its Attachment records' publisher is still running"
            ));
        }
        let recorded = keys(&etcd, &ATTACHMENT.prefix(None))?.len();
        let want = if label == "API" { 2 } else { 0 };
        if recorded != want {
            return Err(format!(
                "{label} ADD: {recorded} Attachment records, not {want}"
            ));
        }
        node.runtime
            .del(list, &pod)
            .map_err(|e| format!("{label} DEL: {e}"))?;
        nothing_left(&node, &etcd, &format!("{label} ADD/DEL"))?;
    }

    let mut variants = [
        Variant::new("plexus, definitions in confDir", in_dir, "plexus").networks("data"),
        Variant::new("plexus, definitions from the API", from_api, "plexus").networks("data"),
    ];
    println!(
        "\nNode side of the central API: cluster network plexus-veth + plexus-ipam (on a \
         {MEMBERS}-member etcd in the node netns, shared with the API), 1 secondary \
         plexus-macvlan on {UPLINK} + host-local, both dual stack; the same definitions in \
         confDir or in the API's etcd (there: per ADD 1 read through the node's store relay, beside the \
         delegates when the local copy has the definitions, and 1 Attachment write by the publisher after ADD \
         answers; 1 delete per DEL)"
    );
    let title = "Pod ADD/DEL, cluster network + 1 secondary";
    let rows = scenario(&node, title, cycles, &mut variants)?;
    verdict(
        "API definitions ADD / confDir ADD, cluster + 1 secondary",
        rows[1][0] / rows[0][0],
        1.15,
        false,
    );
    nothing_left(&node, &etcd, "after the bench")?;
    let log = std::fs::read_to_string(node.log_file()).unwrap_or_default();
    if log.contains("unreachable") || log.contains("not written") {
        return Err(format!(
            "the API's etcd was not always reached; log {}",
            node.log_file().display()
        ));
    }
    println!("  left after the bench: no lease, record, IPAM handle, Attachment or journal entry");
    Ok(())
}
