//! A node's addresses are reclaimed once it is gone for its grace period,
//! and never while it lives: each node's agent keeps its Node object alive
//! in the API through an etcd lease, and `plexusd` reclaims a node whose
//! object has been missing (lease expired, or deleted by an admin) for the
//! whole grace period. Real etcd, real `plexusd`, real agents, pods added
//! by `plexus` with `plexus-ipam` on the API's etcd.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cni::NetConfList;
use conf::api::{ATTACHMENT, CLUSTER_NETWORK, NODE};
use netns_harness::etcd::{EtcdCluster, Tls};
use netns_harness::plexusd::Plexusd;
use plexus_tests::*;
use serde_json::{json, Value};

const ADMIN: &str = "admin-token-0123456789";
const GRACE: u64 = 3;

/// A conflist for node `node` whose cluster network is `network`.
fn list(n: &Node, api: &Value, node: &str, network: &str) -> NetConfList {
    let v = json!({
        "cniVersion": "1.0.0", "name": "plexus",
        "plugins": [{
            "type": "plexus", "clusterNetwork": network, "api": api, "nodeName": node,
            "cacheDir": n.plexus_cache(), "logFile": n.log_file(),
        }]
    });
    NetConfList::parse_value(&v).expect("conflist")
}

/// `key → value` of every key under `prefix`.
fn dump(etcd: &EtcdCluster, prefix: &str) -> Vec<(String, String)> {
    let out = etcd
        .etcdctl(0, &["get", "--prefix", prefix])
        .expect("etcdctl get");
    let lines: Vec<&str> = out.lines().collect();
    lines
        .chunks(2)
        .map(|kv| (kv[0].to_string(), kv.get(1).unwrap_or(&"").to_string()))
        .collect()
}

/// The handles held by `node`: key → addresses.
fn handles_of(etcd: &EtcdCluster, node: &str) -> BTreeSet<String> {
    dump(etcd, "/plexus/ipam/handles/")
        .into_iter()
        .filter(|(_, v)| serde_json::from_str::<Value>(v).is_ok_and(|r| r["node"] == json!(node)))
        .map(|(k, _)| k)
        .collect()
}

fn nodes(etcd: &EtcdCluster) -> BTreeSet<String> {
    dump(etcd, &NODE.prefix(None))
        .into_iter()
        .map(|(k, _)| k.rsplit('/').next().unwrap_or("").to_string())
        .collect()
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

fn v4(result: &Value) -> String {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str())
        .find(|a| !a.contains(':'))
        .unwrap_or("")
        .to_string()
}

#[test]
fn a_gone_nodes_addresses_are_reclaimed_after_its_grace_period_never_while_it_lives() {
    let n = Node::new("reclaim");
    let etcd = EtcdCluster::start_in(1, &n.netns).expect("etcd");
    let api = json!({"endpoints": etcd.endpoints(), "timeoutSeconds": 1, "leaseSeconds": 1});
    // One pool, two cluster networks: each names its node for plexus-ipam.
    for (network, node) in [("pods-1", "node-1"), ("pods-2", "node-2")] {
        let mut ipam = plexus_ipam_on_etcd(
            &["10.97.0.0/16", "fd00:97::/64"],
            &etcd.endpoints(),
            node,
            &n.scratch.join(format!("ipam-{node}")),
        );
        ipam["pool"] = json!("pods");
        let config = json!({"cniVersion": "1.0.0", "name": network, "type": "plexus-veth",
                            "ipam": ipam});
        let object = json!({"apiVersion": "plexus.io/v1", "kind": "ClusterNetwork",
            "metadata": {"name": network, "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"config": config.to_string(), "allowedNamespaces": ["*"]}});
        etcd.put_get(0, &CLUSTER_NETWORK.key(None, network), &object.to_string())
            .expect("put");
    }
    let (list1, list2) = (
        list(&n, &api, "node-1", "pods-1"),
        list(&n, &api, "node-2", "pods-2"),
    );
    let (tls, _) = Tls::generate(n.scratch.path()).expect("certificates");
    let grace = GRACE.to_string();
    let plexusd = Plexusd::start_in(
        &n.scratch,
        &etcd.endpoints(),
        &tls,
        &[(ADMIN, "alice", &["plexus:admins"])],
        &["--node-grace-period", &grace, "--node-monitor-period", "1"],
        Some(&n.netns),
    )
    .expect("plexusd");
    let mut agent1 = n.start_agent_named(&list1, "agent-1").expect("agent 1");
    let _agent2 = n.start_agent_named(&list2, "agent-2").expect("agent 2");
    let both: BTreeSet<String> = ["node-1", "node-2"].map(String::from).into();
    wait_for("both Node objects", Duration::from_secs(10), || {
        nodes(&etcd) == both
    });

    let pods1: Vec<_> = (0..3).map(|_| n.pod("default")).collect();
    let pods2: Vec<_> = (0..2).map(|_| n.pod("default")).collect();
    let mut old = BTreeSet::new();
    for (_, pod) in &pods1 {
        old.insert(v4(&n.runtime.add(&list1, pod).expect("ADD on node-1")));
    }
    for (_, pod) in &pods2 {
        n.runtime.add(&list2, pod).expect("ADD on node-2");
    }
    // ADDs answered from a node's reserve reach etcd once their publisher
    // has run.
    for node in ["node-1", "node-2"] {
        ipam_published(&n.scratch.join(format!("ipam-{node}")));
    }
    let held1 = handles_of(&etcd, "node-1");
    let held2 = handles_of(&etcd, "node-2");
    assert_eq!((held1.len(), held2.len()), (3, 2));
    assert!(n.published(), "Attachment records written");

    // An admin deletes node-1's object while its agent runs: the agent
    // writes it again, and nothing is reclaimed however long it waits.
    let out = plexusd
        .plexusctl(ADMIN, &["delete", "node", "node-1"], None)
        .expect("plexusctl");
    assert!(
        out.status.success(),
        "plexusctl delete node: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back = wait_for("node-1 written again", Duration::from_secs(5), || {
        nodes(&etcd) == both
    });
    std::thread::sleep(Duration::from_secs(GRACE + 2));
    assert_eq!(handles_of(&etcd, "node-1"), held1, "reclaimed while alive");
    let log = std::fs::read_to_string(&plexusd.log).unwrap_or_default();
    assert!(!log.contains("reclaimed the addresses"), "{log}");

    // node-1's agent dies: its lease expires, and after the grace period
    // its addresses, blocks and records go; node-2's stay.
    agent1.kill();
    let killed = Instant::now();
    wait_for(
        "node-1's object gone with its lease",
        Duration::from_secs(5),
        || !nodes(&etcd).contains("node-1"),
    );
    wait_for("node-1 reclaimed", Duration::from_secs(GRACE + 10), || {
        handles_of(&etcd, "node-1").is_empty()
    });
    let took = killed.elapsed();
    assert!(
        took >= Duration::from_secs(GRACE),
        "reclaimed {took:?} after the agent died, before the grace period"
    );
    wait_for("node-1's mark deleted", Duration::from_secs(5), || {
        dump(&etcd, "/plexus/ipam/nodes/node-1").is_empty()
    });
    assert_eq!(handles_of(&etcd, "node-2"), held2, "node-2 untouched");
    assert!(dump(&etcd, "/plexus/ipam/blocks/pods/node-1/").is_empty());
    let claims = dump(&etcd, "/plexus/ipam/claims/pods/");
    assert_eq!(
        claims.iter().filter(|(_, v)| v == "node-1").count(),
        0,
        "{claims:?}"
    );
    assert_eq!(
        claims
            .iter()
            .filter(|(_, v)| v.starts_with("returned@"))
            .count(),
        2,
        "node-1's IPv4 and IPv6 blocks given back: {claims:?}"
    );
    let atts = dump(&etcd, &ATTACHMENT.prefix(None));
    assert!(
        atts.iter().all(|(_, v)| !v.contains("\"node-1\"")),
        "{atts:?}"
    );
    assert_eq!(atts.len(), 2, "node-2's records stay: {atts:?}");
    let log = std::fs::read_to_string(&plexusd.log).unwrap_or_default();
    assert!(log.contains("node gone"), "{log}");

    // The runtime's DELs on node-1 still succeed and clean up; node-2 goes
    // on, with none of node-1's addresses handed out again so soon.
    for (_, pod) in &pods1 {
        n.runtime.del(&list1, pod).expect("DEL on node-1");
    }
    let (_ns, pod) = n.pod("default");
    let fresh = v4(&n.runtime.add(&list2, &pod).expect("ADD on node-2"));
    assert!(!old.contains(&fresh), "{fresh} was node-1's a moment ago");
    eprintln!(
        "Node object written again {back:?} after an admin deleted it; reclaimed {took:?} after the agent died (lease 1 s, grace {GRACE} s)"
    );
}
