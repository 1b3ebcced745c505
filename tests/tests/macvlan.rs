//! `plexus-macvlan` on the host kernel, with the reference plugin's fields.

use std::path::Path;
use std::time::Duration;

use netns_harness::{kernel, probe};
use plexus_tests::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(5);

fn plexus_macvlan(mode: &str, subnets: &[&str], ipam: &Path) -> Value {
    let ranges: Vec<Value> = subnets.iter().map(|s| json!([{"subnet": s}])).collect();
    json!({
        "cniVersion": "1.0.0",
        "type": "plexus-macvlan",
        "master": UPLINK,
        "mode": mode,
        "mtu": 1400,
        "capabilities": {"mac": true},
        "ipam": {"type": "host-local", "ranges": ranges, "dataDir": ipam}
    })
}

fn cluster(node: &Node, subnet: &str) -> cni::NetConfList {
    node.plexus_list("1.0.0", plexus_veth("k8s", &[subnet], &node.ipam_dir()))
}

#[test]
fn bridge_mode_dual_stack_between_two_pods() {
    let node = Node::new("pmv");
    let ipam = node.ipam_dir();
    node.define(
        "data.yaml",
        &nad(
            "data",
            None,
            &plexus_macvlan("bridge", &["192.168.90.0/24", "fd00:90::/64"], &ipam),
        ),
    );
    let list = cluster(&node, "10.244.20.0/24");
    let before = node.snapshot();
    let (ns_a, pod_a) = node.pod("default");
    let (ns_b, pod_b) = node.pod("default");
    let pod_a = pod_a.networks(r#"[{"name":"data","mac":"02:00:00:00:90:0a"}]"#);
    let pod_b = pod_b.networks("data");
    let res = node.runtime.add(&list, &pod_a).expect("ADD a");
    node.runtime.add(&list, &pod_b).expect("ADD b");

    let net1 = kernel::link(ns_a.name(), "net1")
        .expect("link")
        .expect("net1");
    assert_eq!(
        (net1.kind.as_str(), net1.mode.as_str(), net1.mtu),
        ("macvlan", "bridge", 1400)
    );
    assert_eq!(net1.mac, "02:00:00:00:90:0a", "the requested MAC");
    let addrs = kernel::addrs(ns_a.name(), "net1").expect("addrs");
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    assert!(addrs
        .iter()
        .any(|a| a.starts_with("192.168.90.") && a.ends_with("/24")));
    assert!(addrs
        .iter()
        .any(|a| a.starts_with("fd00:90::") && a.ends_with("/64")));
    let (idx, _) = res["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .enumerate()
        .find(|(_, i)| i["name"] == "net1")
        .expect("net1 in result");
    assert_eq!(res["interfaces"][idx]["mac"], "02:00:00:00:90:0a");

    let server = probe::EchoServer::start(&ns_b).expect("server");
    for cidr in kernel::addrs(ns_b.name(), "net1").expect("addrs") {
        let ip = addr_ip(&cidr);
        probe::reach(&ns_a, ip, server.port(), T).unwrap_or_else(|e| panic!("{e}"));
    }
    drop(server);

    node.runtime.check(&list, &pod_a).expect("CHECK");
    let v4 = addrs.iter().find(|a| !a.contains(':')).expect("v4").clone();
    kernel::ip(&["-n", ns_a.name(), "addr", "del", &v4, "dev", "net1"]).expect("del addr");
    let err = node.runtime.check(&list, &pod_a).expect_err("address gone");
    assert_eq!(err.code, 100, "{err}");
    assert!(err.msg.contains(&v4), "{err}");

    node.runtime.del(&list, &pod_a).expect("DEL a");
    node.runtime.del(&list, &pod_b).expect("DEL b");
    node.assert_released(&ns_a, "pod a");
    node.assert_released(&ns_b, "pod b");
    assert_eq!(node.snapshot(), before);
}

#[test]
fn private_mode_keeps_pods_apart() {
    let node = Node::new("pmvp");
    let ipam = node.ipam_dir();
    node.define(
        "p.yaml",
        &nad(
            "priv",
            None,
            &plexus_macvlan("private", &["192.168.91.0/24"], &ipam),
        ),
    );
    let list = cluster(&node, "10.244.21.0/24");
    let (ns_a, pod_a) = node.pod("default");
    let (ns_b, pod_b) = node.pod("default");
    let pod_a = pod_a.networks("priv");
    let pod_b = pod_b.networks("priv");
    node.runtime.add(&list, &pod_a).expect("ADD a");
    node.runtime.add(&list, &pod_b).expect("ADD b");
    assert_eq!(
        kernel::link(ns_a.name(), "net1")
            .expect("link")
            .expect("net1")
            .mode,
        "private"
    );
    let target = addr_ip(&kernel::addrs(ns_b.name(), "net1").expect("addrs")[0]);
    assert!(
        probe::ping(&ns_a, target, Duration::from_millis(800)).is_err(),
        "private mode must not bridge pods"
    );
    node.runtime.del(&list, &pod_a).expect("DEL a");
    node.runtime.del(&list, &pod_b).expect("DEL b");
    node.assert_released(&ns_a, "pod a");
}

#[test]
fn master_inside_the_pod_with_link_in_container() {
    let node = Node::new("pmvl");
    let ipam = node.ipam_dir();
    let mut conf = plexus_macvlan("bridge", &["192.168.92.0/24"], &ipam);
    conf["master"] = json!("side0");
    conf["linkInContainer"] = json!(true);
    node.define("lic.yaml", &nad("lic", None, &conf));
    let list = cluster(&node, "10.244.22.0/24");
    let (ns, pod) = node.pod("default");
    kernel::veth(ns.name(), "side0", ns.name(), "side1").expect("master in the pod");
    let before_host = node.snapshot();
    node.runtime
        .add(&list, &pod.clone().networks("lic"))
        .expect("ADD");
    let net1 = kernel::link(ns.name(), "net1")
        .expect("link")
        .expect("net1");
    assert_eq!(net1.kind, "macvlan");
    node.runtime.del(&list, &pod.networks("lic")).expect("DEL");
    assert!(kernel::link(ns.name(), "net1").expect("link").is_none());
    assert!(
        kernel::link(ns.name(), "side0").expect("link").is_some(),
        "the master stays"
    );
    assert_eq!(node.snapshot(), before_host);
}

#[test]
fn a_missing_master_is_a_clear_error_and_leaves_nothing() {
    let node = Node::new("pmvm");
    let ipam = node.ipam_dir();
    let mut conf = plexus_macvlan("bridge", &["192.168.93.0/24"], &ipam);
    conf["master"] = json!("absent0");
    node.define("m.yaml", &nad("nomaster", None, &conf));
    let list = cluster(&node, "10.244.23.0/24");
    let (ns, pod) = node.pod("default");
    let err = node
        .runtime
        .add(&list, &pod.clone().networks("nomaster"))
        .expect_err("no master");
    assert_eq!(err.code, cni::code::INVALID_NETWORK_CONFIG, "{err}");
    assert!(err.msg.contains("absent0"), "{err}");
    node.runtime
        .del(&list, &pod.networks("nomaster"))
        .expect("DEL after failed ADD");
    node.assert_released(&ns, "missing master");
}
