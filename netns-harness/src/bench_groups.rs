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
         table per pod, written by nft -j) or none"
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
    Ok(())
}
