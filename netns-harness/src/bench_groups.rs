//! `make bench`, security groups: a pod's ADD and DEL (the cluster network
//! and one MACVLAN secondary) where the secondary carries two groups of 20
//! rules each, against the same pod without groups, alternating on one node
//! in one run. The difference of the ADD p50s is what the groups cost.

use serde_json::{json, Value};

use crate::bench::{scenario, verdict, Variant};
use crate::fixtures::{macvlan, nad, plexus_veth};
use crate::node::Node;

/// A SecurityGroup of `rules` ingress rules (CIDRs and ports of both
/// families, and ICMP), as YAML.
fn group(name: &str, rules: usize) -> String {
    let rules: Vec<Value> = (0..rules)
        .map(|i| match i % 3 {
            0 => json!({"direction": "ingress", "protocol": "tcp", "portRangeMin": 1000 + i,
                        "portRangeMax": 1010 + i, "remoteIpPrefix": format!("10.{i}.0.0/16")}),
            1 => json!({"direction": "ingress", "protocol": "udp", "portRangeMin": 2000 + i,
                        "remoteIpPrefix": format!("fd00:{i:x}::/48")}),
            _ => json!({"direction": "ingress", "protocol": "icmp", "icmpType": 8}),
        })
        .collect();
    format!(
        "apiVersion: plexus.io/v1\nkind: SecurityGroup\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  rules: {}\n",
        Value::Array(rules)
    )
}

/// The scenario, `cycles` ADD/DEL cycles per variant.
pub fn run(cycles: usize) -> Result<(), String> {
    let node = Node::try_new("bench-groups").map_err(|e| format!("create node: {e}"))?;
    let ipam = node.ipam_dir();
    let mut data = macvlan("1.0.0", &["192.168.230.0/24", "fd00:230::/64"], &ipam);
    data["type"] = json!("plexus-macvlan");
    node.define("plain.yaml", &nad("plain", Some("default"), &data));
    let guarded = nad("guarded", Some("default"), &data).replacen(
        "  namespace: default\n",
        "  namespace: default\n  annotations:\n    plexus.io/security-groups: \"g1,g2\"\n",
        1,
    );
    node.define("guarded.yaml", &guarded);
    node.define("g1.yaml", &group("g1", 20));
    node.define("g2.yaml", &group("g2", 20));
    let cluster = plexus_veth("pods", &["10.230.0.0/16", "fd00:231::/64"], &ipam);
    let mut list = node.plexus_list("1.0.0", cluster);
    if std::env::var_os("BENCH_DEBUG").is_some() {
        list.plugins[0].insert("logLevel".into(), json!("debug"));
    }
    let mut variants = [
        Variant::new("plexus, secondary without groups", list.clone(), "plexus").networks("plain"),
        Variant::new("plexus, secondary with 2 x 20 rules", list, "plexus").networks("guarded"),
    ];
    println!(
        "\nSecurity groups: cluster network plexus-veth + host-local, 1 secondary plexus-macvlan \
         + host-local, both dual stack; the secondary with two groups of 20 rules (one nftables \
         table per pod, written over netlink) or none"
    );
    let rows = scenario(
        &node,
        "Pod ADD/DEL, with and without groups",
        cycles,
        &mut variants,
    )?;
    if std::env::var_os("BENCH_DEBUG").is_some() {
        let _ = std::fs::copy(node.log_file(), "/tmp/bench-groups.log");
    }
    let overhead = rows[1][0] - rows[0][0];
    println!("  ADD overhead of the groups, p50: {overhead:.2} ms");
    verdict(
        "security groups' ADD overhead p50 (ms)",
        overhead,
        2.0,
        false,
    );
    if !node.leases().is_empty() {
        return Err(format!("leases left: {:?}", node.leases()));
    }
    propagation(200)
}

/// Members joining a remote group: `count` Attachment records written in a
/// burst (as pods of two nodes), with the node agent running; from each
/// write to its address in the set of a pod whose rule names the group.
pub fn propagation(count: usize) -> Result<(), String> {
    use crate::etcd::EtcdCluster;
    use conf::api::{ATTACHMENT, CLUSTER_NETWORK, NAD, SECURITY_GROUP};
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    let node = Node::try_new("bench-propagation").map_err(|e| format!("create node: {e}"))?;
    let etcd = EtcdCluster::start_in(1, &node.netns).map_err(|e| format!("etcd: {e}"))?;
    let put = |key: &str, obj: &Value| {
        etcd.put_get(0, key, &obj.to_string())
            .map(|_| ())
            .map_err(|e| format!("put {key}: {e}"))
    };
    let ipam = node.ipam_dir();
    let pods = plexus_veth("pods", &["10.232.0.0/16"], &ipam);
    put(
        &CLUSTER_NETWORK.key(None, "pods"),
        &json!({"apiVersion": "plexus.io/v1", "kind": "ClusterNetwork", "metadata": {"name": "pods"},
                "spec": {"config": pods.to_string(), "allowedNamespaces": ["*"]}}),
    )?;
    let mut data = macvlan("1.0.0", &["192.168.232.0/24"], &ipam);
    data["type"] = json!("plexus-macvlan");
    put(
        &NAD.key(Some("default"), "data"),
        &json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                "metadata": {"name": "data", "namespace": "default",
                             "annotations": {"plexus.io/pod-security-groups": "true"}},
                "spec": {"config": data.to_string()}}),
    )?;
    for (name, rules) in [
        (
            "web",
            json!([{"direction": "ingress", "protocol": "tcp", "portRangeMin": 80,
                    "remoteGroup": "client"}]),
        ),
        ("client", json!([])),
    ] {
        put(
            &SECURITY_GROUP.key(Some("default"), name),
            &json!({"apiVersion": "plexus.io/v1", "kind": "SecurityGroup",
                    "metadata": {"name": name, "namespace": "default"}, "spec": {"rules": rules}}),
        )?;
    }
    let list = node.plexus_api_list(json!({"endpoints": etcd.endpoints()}), "node-1");
    let (server_ns, server) = node.try_pod("default").map_err(|e| e.to_string())?;
    let server = server.annotate(&[
        ("k8s.v1.cni.cncf.io/networks", "data"),
        ("plexus.io/security-groups", "web"),
    ]);
    node.runtime
        .add(&list, &server)
        .map_err(|e| format!("ADD server: {e}"))?;
    let _agent = node.start_agent(&list).map_err(|e| format!("agent: {e}"))?;
    std::thread::sleep(Duration::from_millis(500));

    let address = |i: usize| format!("10.240.{}.{}", i / 250, 1 + i % 250);
    let seen: std::sync::Mutex<BTreeMap<String, Instant>> = Default::default();
    let done = std::sync::atomic::AtomicBool::new(false);
    let mut written: Vec<(String, Instant)> = Vec::new();
    std::thread::scope(|s| -> Result<(), String> {
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let elems = crate::kernel::nft_set_elements(server_ns.name(), "g-client-v4");
                let now = Instant::now();
                let mut seen = seen
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for e in elems {
                    seen.entry(e).or_insert(now);
                }
                drop(seen);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        for i in 0..count {
            let node_name = if i % 2 == 0 { "node-1" } else { "node-2" };
            let name = format!("client-{i}");
            let obj = json!({"apiVersion": "plexus.io/v1", "kind": "Attachment",
                "metadata": {"name": name, "namespace": "default",
                             "labels": {"plexus.io/node": node_name}},
                "spec": {"pod": name, "node": node_name, "containerId": format!("c{i:04}"),
                         "interface": "net1", "network": "default/data",
                         "addresses": [format!("{}/32", address(i))],
                         "securityGroups": ["client"]}});
            put(&ATTACHMENT.key(Some("default"), &name), &obj)?;
            written.push((address(i), Instant::now()));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let n = seen.lock().map(|s| s.len()).unwrap_or(0);
            if n >= count {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    })?;
    let seen = seen.into_inner().unwrap_or_default();
    let mut delays: Vec<Duration> = written
        .iter()
        .filter_map(|(a, t)| seen.get(a).map(|s| s.saturating_duration_since(*t)))
        .collect();
    delays.sort();
    let missing = count - delays.len();
    println!(
        "\nSecurity-group membership: {count} members joining group \"client\" (Attachment records of \
         pods on two nodes, written in a burst through etcdctl), node agent running; from each write \
         to its address in the set of a pod whose rule names the group (set polled every 10 ms)"
    );
    if delays.is_empty() {
        return Err(format!(
            "no member reached the set; log {}",
            node.log_file().display()
        ));
    }
    let p50 = crate::bench::percentile(&delays, 0.5);
    let p99 = crate::bench::percentile(&delays, 0.99);
    println!(
        "  p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms, not there after 10 s: {missing}",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        delays[delays.len() - 1].as_secs_f64() * 1e3
    );
    verdict(
        "membership propagation p99 (s)",
        if missing > 0 {
            f64::INFINITY
        } else {
            p99.as_secs_f64()
        },
        1.0,
        false,
    );
    node.runtime
        .del(&list, &server)
        .map_err(|e| format!("DEL server: {e}"))?;
    Ok(())
}
