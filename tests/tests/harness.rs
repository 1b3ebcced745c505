//! The harness itself: native netns, probes that fail when they should, the
//! libcni-like runtime's chaining, and the etcd fixture.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use netns_harness::etcd::EtcdCluster;
use netns_harness::{kernel, probe, scratch, Netns};
use plexus_tests::*;
use serde_json::json;

const T: Duration = Duration::from_secs(3);

#[test]
fn netns_are_created_and_removed_without_ip() {
    let name = scratch::unique("pxt");
    let ns = Netns::create(&name).expect("create");
    assert!(Netns::exists(&name));
    let listed = kernel::ip(&["netns", "list"]).expect("ip netns list");
    assert!(listed.contains(&name), "{listed}");
    let links = kernel::links(&name).expect("links");
    assert_eq!(
        links.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
        vec!["lo"]
    );
    assert!(
        Netns::create(&name).is_err(),
        "a second netns of the same name is refused"
    );
    ns.delete().expect("delete");
    assert!(!Netns::exists(&name));
    assert!(kernel::links(&name).is_err());
}

#[test]
fn probes_reach_what_is_wired_and_only_that() {
    let a = Netns::create(&scratch::unique("pxa")).expect("a");
    let b = Netns::create(&scratch::unique("pxb")).expect("b");
    kernel::veth(a.name(), "va", b.name(), "vb").expect("veth");
    for (ns, dev, v4, v6) in [
        (&a, "va", "10.99.0.1/24", "fd99::1/64"),
        (&b, "vb", "10.99.0.2/24", "fd99::2/64"),
    ] {
        kernel::ip(&["-n", ns.name(), "addr", "add", v4, "dev", dev]).expect("v4");
        kernel::ip(&["-n", ns.name(), "addr", "add", v6, "dev", dev, "nodad"]).expect("v6");
        kernel::up(ns.name(), "lo").expect("lo");
    }
    let server = probe::EchoServer::start(&b).expect("server");
    for ip in ["10.99.0.2", "fd99::2"] {
        let ip: IpAddr = ip.parse().expect("ip");
        probe::ping(&a, ip, T).expect("ping");
        probe::tcp(&a, SocketAddr::new(ip, server.port()), T).expect("tcp");
        probe::udp(&a, SocketAddr::new(ip, server.port()), T).expect("udp");
    }
    let nowhere: IpAddr = "10.99.0.77".parse().expect("ip");
    assert!(probe::ping(&a, nowhere, Duration::from_millis(500)).is_err());
    let closed = SocketAddr::new(
        "10.99.0.2".parse().expect("ip"),
        server.port().wrapping_add(1),
    );
    assert!(probe::tcp(&a, closed, T).is_err());
    assert!(probe::udp(&a, closed, Duration::from_millis(600)).is_err());
}

#[test]
fn runtime_chains_prev_result_and_caches_like_libcni() {
    let node = Node::new("chain");
    let list = cni::NetConfList::parse_value(&json!({
        "cniVersion": "1.0.0",
        "name": "chain",
        "plugins": [
            ptp("ignored", "1.0.0", &["10.98.0.0/24"], &node.ipam_dir()),
            {"type": "tuning", "promisc": true}
        ]
    }))
    .expect("list");
    let (ns, pod) = node.pod("default");
    let res = node.runtime.add(&list, &pod).expect("ADD");
    // tuning saw ptp's result as prevResult and passed it on.
    assert_eq!(res["ips"].as_array().map(Vec::len), Some(1));
    let flags = kernel::ip(&["-n", ns.name(), "link", "show", "eth0"]).expect("link");
    assert!(flags.contains("PROMISC"), "{flags}");
    let cached = node.runtime.cached(&list, &pod).expect("cached");
    assert_eq!(cached.result.as_ref(), Some(&res));
    assert_eq!(cached.kind, "cniCacheV1");
    node.runtime.check(&list, &pod).expect("CHECK");
    node.runtime.del(&list, &pod).expect("DEL");
    assert!(node.runtime.cached(&list, &pod).is_none());
    assert_eq!(node.leases(), Vec::<String>::new());
}

#[test]
fn etcd_single_member() {
    let etcd = EtcdCluster::start(1).expect("etcd");
    assert_eq!(etcd.endpoints().len(), 1);
    assert_eq!(
        etcd.put_get(0, "/plexus/test", "one").expect("put/get"),
        "one"
    );
    assert_eq!(etcd.leader(), Some(0));
}

#[test]
fn etcd_three_members_survive_the_leader_stopping() {
    let mut etcd = EtcdCluster::start(3).expect("etcd");
    let leader = etcd.leader().expect("a leader");
    assert_eq!(
        etcd.put_get((leader + 1) % 3, "/k", "before").expect("put"),
        "before"
    );
    etcd.stop_member(leader).expect("stop leader");
    let start = std::time::Instant::now();
    let new_leader = loop {
        if let Some(l) = etcd.leader() {
            break l;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no new leader");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_ne!(new_leader, leader);
    let other = (0..3)
        .find(|i| *i != leader && *i != new_leader)
        .expect("third member");
    assert_eq!(
        etcd.put_get(other, "/k", "after")
            .expect("put after election"),
        "after"
    );
    etcd.restart_member(leader).expect("restart");
    assert!(etcd.is_running(leader));
    let start = std::time::Instant::now();
    loop {
        // The restarted member catches up with what was written while it was down.
        match etcd.get(leader, "/k") {
            Ok(v) if v == "after" => break,
            _ if start.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(200))
            }
            other => panic!("restarted member: {other:?}"),
        }
    }
}
