//! The plexus meta-plugin with Debian's reference plugins as delegates, driven
//! the way containerd drives it, checked against what the kernel holds.

use std::time::Duration;

use netns_harness::{kernel, probe};
use plexus_tests::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(5);

fn iface<'a>(result: &'a Value, name: &str) -> (usize, &'a Value) {
    result["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .enumerate()
        .find(|(_, i)| i["name"] == name)
        .unwrap_or_else(|| panic!("no interface {name} in {result}"))
}

fn result_ips(result: &Value, index: usize) -> Vec<String> {
    let mut ips: Vec<String> = result["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .filter(|ip| ip["interface"] == index)
        .map(|ip| ip["address"].as_str().unwrap_or_default().to_string())
        .collect();
    ips.sort();
    ips
}

fn kernel_ips(ns: &str, dev: &str) -> Vec<String> {
    let mut a = kernel::addrs(ns, dev).expect("addrs");
    a.sort();
    a
}

#[test]
fn cluster_network_and_two_secondaries_dual_stack() {
    let node = Node::new("dual");
    let ipam = node.ipam_dir();
    let cluster = ptp(
        "k8s-pods",
        "1.0.0",
        &["10.244.1.0/24", "fd00:244:1::/64"],
        &ipam,
    );
    node.define(
        "10-data.yaml",
        &nad(
            "data",
            None,
            &macvlan("1.0.0", &["192.168.60.0/24", "fd00:60::/64"], &ipam),
        ),
    );
    node.define(
        "20-lan.yaml",
        &nad(
            "lan",
            Some("red"),
            &bridge("0.4.0", "lanbr0", "172.30.0.0/24", &ipam),
        ),
    );
    let list = node.plexus_list("1.0.0", cluster);
    let before = node.snapshot();

    let (ns_a, pod_a) = node.pod("red");
    let (ns_b, pod_b) = node.pod("red");
    let pod_a = pod_a.networks("data,lan@lan0");
    let pod_b =
        pod_b.networks(r#"[{"name":"data"},{"name":"lan","namespace":"red","interface":"lan0"}]"#);
    let res_a = node.runtime.add(&list, &pod_a).expect("ADD pod a");
    let res_b = node.runtime.add(&list, &pod_b).expect("ADD pod b");
    assert_eq!(res_a["cniVersion"], "1.0.0");

    for (ns, res) in [(&ns_a, &res_a), (&ns_b, &res_b)] {
        let links = kernel::links(ns.name()).expect("links");
        let kind = |n: &str| {
            links
                .iter()
                .find(|l| l.name == n)
                .map(|l| (l.kind.clone(), l.mode.clone()))
        };
        assert_eq!(
            kind("eth0"),
            Some(("veth".into(), String::new())),
            "{links:?}"
        );
        assert_eq!(
            kind("net1"),
            Some(("macvlan".into(), "bridge".into())),
            "{links:?}"
        );
        assert_eq!(kind("lan0").map(|k| k.0), Some("veth".into()), "{links:?}");
        for dev in ["eth0", "net1", "lan0"] {
            let (idx, i) = iface(res, dev);
            assert_eq!(i["sandbox"], ns.path_str(), "{dev} sandbox");
            assert_eq!(
                result_ips(res, idx),
                kernel_ips(ns.name(), dev),
                "{dev} addresses"
            );
        }
        assert_eq!(family_addrs(ns.name(), "eth0", false).len(), 1);
        assert_eq!(family_addrs(ns.name(), "eth0", true).len(), 1);
        assert_eq!(family_addrs(ns.name(), "net1", true).len(), 1);
        let eth0 = kernel::link(ns.name(), "eth0")
            .expect("link")
            .expect("eth0");
        assert_eq!(eth0.mtu, 1400);
        let v4 = kernel::routes(ns.name(), "-4").expect("routes");
        assert!(
            v4.iter()
                .any(|r| r.starts_with("default via 10.244.1.1 dev eth0")),
            "{v4:?}"
        );
    }
    // Only the cluster network's routes are in the result.
    assert!(res_a["routes"].as_array().is_some_and(|r| !r.is_empty()));

    let server = probe::EchoServer::start(&ns_b).expect("echo server");
    for dev in ["eth0", "net1", "lan0"] {
        for target in kernel::addrs(ns_b.name(), dev).expect("addrs") {
            let ip = addr_ip(&target);
            probe::reach(&ns_a, ip, server.port(), T).unwrap_or_else(|e| panic!("{e} over {dev}"));
        }
    }
    drop(server);

    node.runtime.del(&list, &pod_a).expect("DEL a");
    node.runtime.del(&list, &pod_b).expect("DEL b");
    for ns in [&ns_a, &ns_b] {
        let names = kernel::link_names(ns.name()).expect("links");
        assert_eq!(names, vec!["lo".to_string()]);
    }
    assert_eq!(node.leases(), Vec::<String>::new());
    assert_eq!(node.records(), Vec::<String>::new());
    // The reference bridge plugin keeps its bridge by design; all else is as before.
    let after: Vec<String> = node
        .snapshot()
        .into_iter()
        .filter(|l| !l.contains("lanbr0"))
        .collect();
    assert_eq!(after, before);
}

#[test]
fn results_come_in_the_conf_version() {
    let node = Node::new("vers");
    let ipam = node.ipam_dir();
    for (version, net) in [("0.3.1", "10.245.1.0/24"), ("0.4.0", "10.245.2.0/24")] {
        // The delegate speaks 1.0.0; plexus answers in its own conf's version.
        let list = node.plexus_list(
            version,
            ptp(
                &format!("k8s-{}", version.replace('.', "")),
                "1.0.0",
                &[net],
                &ipam,
            ),
        );
        let (ns, pod) = node.pod("default");
        let res = node.runtime.add(&list, &pod).expect("ADD");
        assert_eq!(res["cniVersion"], version);
        let ips = res["ips"].as_array().expect("ips");
        assert_eq!(ips.len(), 1);
        assert_eq!(
            ips[0]["version"], "4",
            "pre-1.0 results carry the IP version"
        );
        assert_eq!(
            vec![ips[0]["address"].as_str().unwrap_or("").to_string()],
            kernel_ips(ns.name(), "eth0")
        );
        node.runtime.del(&list, &pod).expect("DEL");
    }
    let out = node
        .runtime
        .raw(
            "plexus",
            cni::plugin::Command::Version,
            None,
            br#"{"cniVersion":"0.4.0"}"#,
        )
        .expect("VERSION");
    let v: Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    assert_eq!(v["cniVersion"], "0.4.0");
}

#[test]
fn failing_second_delegate_undoes_the_first() {
    let node = Node::new("undo");
    let ipam = node.ipam_dir();
    let mut broken = macvlan("1.0.0", &["192.168.61.0/24"], &ipam);
    broken["master"] = json!("nosuchdev0");
    node.define("broken.yaml", &nad("broken", None, &broken));
    let list = node.plexus_list("1.0.0", ptp("k8s", "1.0.0", &["10.246.0.0/24"], &ipam));
    let before = node.snapshot();
    let (ns, pod) = node.pod("default");
    let pod = pod.networks("broken");

    // What the delegate says on its own, for comparison.
    let mut alone = broken.clone();
    alone["name"] = json!("broken");
    let own = node
        .runtime
        .raw(
            "macvlan",
            cni::plugin::Command::Add,
            Some(&pod),
            alone.to_string().as_bytes(),
        )
        .expect_err("macvlan alone fails");

    let err = node.runtime.add(&list, &pod).expect_err("ADD must fail");
    assert_eq!(err.code, own.code, "{err}");
    assert!(err.msg.contains(&own.msg), "{err} should carry {own}");
    assert!(err.msg.contains("broken"), "{err} should name the network");
    // eth0 and the lease of the first delegate are gone.
    node.assert_released(&ns, "failed ADD");
    assert_eq!(node.snapshot(), before);
    // The runtime follows a failed ADD with DEL; that succeeds too.
    node.runtime.del(&list, &pod).expect("DEL after failed ADD");
}

#[test]
fn del_is_repeatable_and_survives_a_deleted_netns() {
    let node = Node::new("del");
    let ipam = node.ipam_dir();
    node.define(
        "data.yaml",
        &nad("data", None, &macvlan("0.4.0", &["192.168.62.0/24"], &ipam)),
    );
    let list = node.plexus_list("1.0.0", ptp("k8s", "1.0.0", &["10.247.0.0/24"], &ipam));
    let before = node.snapshot();

    let (ns, pod) = node.pod("default");
    let pod = pod.networks("data");
    node.runtime.add(&list, &pod).expect("ADD");
    assert_eq!(node.leases().len(), 2);
    node.runtime.del(&list, &pod).expect("first DEL");
    node.runtime.del(&list, &pod).expect("repeated DEL");
    node.runtime
        .del_without_netns(&list, &pod)
        .expect("DEL without netns");
    assert_eq!(node.leases(), Vec::<String>::new());
    drop(ns);

    let (ns, pod) = node.pod("default");
    let pod = pod.networks("data");
    node.runtime.add(&list, &pod).expect("ADD");
    assert_eq!(node.leases().len(), 2);
    ns.delete().expect("delete pod netns");
    node.runtime
        .del(&list, &pod)
        .expect("DEL with the netns gone");
    node.runtime
        .del_without_netns(&list, &pod)
        .expect("second DEL");
    assert_eq!(node.leases(), Vec::<String>::new(), "leases released");
    assert_eq!(node.records(), Vec::<String>::new());
    // ptp's host veth goes when the kernel has torn the deleted netns down.
    assert_eq!(
        node.settled_snapshot(&before, std::time::Duration::from_secs(20)),
        before
    );
}

#[test]
fn check_gc_and_status() {
    let node = Node::new("gc");
    let ipam = node.ipam_dir();
    node.define(
        "data.yaml",
        &nad("data", None, &macvlan("1.0.0", &["192.168.63.0/24"], &ipam)),
    );
    let list = node.plexus_list("1.1.0", ptp("k8s", "1.0.0", &["10.248.0.0/24"], &ipam));
    node.runtime.status(&list).expect("STATUS");

    let (ns_a, pod_a) = node.pod("default");
    let (ns_b, pod_b) = node.pod("default");
    let pod_a = pod_a.networks("data");
    let pod_b = pod_b.networks("data");
    node.runtime.add(&list, &pod_a).expect("ADD a");
    node.runtime.add(&list, &pod_b).expect("ADD b");
    node.runtime.check(&list, &pod_a).expect("CHECK a");
    assert_eq!(node.leases().len(), 4);

    let valid = [cni::config::Attachment {
        container_id: pod_a.container_id.clone(),
        ifname: "eth0".into(),
    }];
    node.runtime.gc(&list, &valid).expect("GC");
    assert_eq!(node.leases().len(), 2, "only pod a's leases remain");
    assert_eq!(node.records().len(), 1);
    let names = kernel::link_names(ns_b.name()).expect("links");
    assert_eq!(names, vec!["lo".to_string()], "pod b's interfaces are gone");
    node.runtime.check(&list, &pod_a).expect("CHECK a after GC");
    assert!(kernel::link(ns_a.name(), "net1").expect("links").is_some());

    // CHECK notices what was taken away behind its back.
    kernel::ip(&["-n", ns_a.name(), "link", "del", "net1"]).expect("del net1");
    let err = node
        .runtime
        .check(&list, &pod_a)
        .expect_err("CHECK must fail");
    assert!(err.msg.contains("data"), "{err}");
    node.runtime.del(&list, &pod_a).expect("DEL a");
    assert_eq!(node.leases(), Vec::<String>::new());

    // STATUS reports a cluster network whose plugin is missing.
    let gone = node.plexus_list(
        "1.1.0",
        json!({"cniVersion": "1.0.0", "name": "x", "type": "no-such-plugin"}),
    );
    let err = node.runtime.status(&gone).expect_err("STATUS must fail");
    assert_eq!(err.code, cni::code::PLUGIN_NOT_AVAILABLE, "{err}");
    assert!(err.msg.contains("no-such-plugin"), "{err}");
}

#[test]
fn named_cluster_network_and_tenant_isolation() {
    let node = Node::new("tenant");
    let ipam = node.ipam_dir();
    let mut cluster = ptp("pods", "1.0.0", &["10.249.0.0/24"], &ipam);
    cluster.as_object_mut().map(|m| m.remove("name"));
    node.define("00-pods.yaml", &nad("pods", None, &cluster));
    node.define(
        "blue.yaml",
        &nad(
            "secret",
            Some("blue"),
            &macvlan("1.0.0", &["192.168.64.0/24"], &ipam),
        ),
    );
    let list = node.plexus_list("1.0.0", json!("pods"));

    let (ns, pod) = node.pod("blue");
    node.runtime
        .add(&list, &pod.clone().networks("secret"))
        .expect("blue pod gets its network");
    assert!(kernel::link(ns.name(), "net1").expect("links").is_some());
    node.runtime
        .del(&list, &pod.networks("secret"))
        .expect("DEL");

    let (ns, pod) = node.pod("green");
    for ask in ["secret", "blue/secret"] {
        let err = node
            .runtime
            .add(&list, &pod.clone().networks(ask))
            .expect_err("green may not use blue's network");
        assert_eq!(err.code, cni::code::INVALID_NETWORK_CONFIG, "{err}");
        assert!(err.msg.contains("secret"), "{err}");
        let names = kernel::link_names(ns.name()).expect("links");
        assert_eq!(names, vec!["lo".to_string()]);
    }
    assert_eq!(node.leases(), Vec::<String>::new());
}

#[test]
fn default_route_moves_to_the_network_that_asks_for_it() {
    let node = Node::new("defrt");
    let ipam = node.ipam_dir();
    let data = macvlan("1.0.0", &["192.168.65.0/24", "fd00:65::/64"], &ipam);
    node.define("data.yaml", &nad("data", None, &data));
    node.define(
        "more.yaml",
        &nad("more", None, &macvlan("1.0.0", &["192.168.66.0/24"], &ipam)),
    );
    let list = node.plexus_list(
        "1.0.0",
        ptp("k8s", "1.0.0", &["10.252.0.0/24", "fd00:252::/64"], &ipam),
    );
    let before = node.snapshot();

    let (ns, pod) = node.pod("default");
    let pod = pod.networks(r#"[{"name":"data","default-route":["192.168.65.1","fd00:65::1"]}]"#);
    let res = node.runtime.add(&list, &pod).expect("ADD");
    let v4 = kernel::routes(ns.name(), "-4").expect("routes");
    let v6 = kernel::routes(ns.name(), "-6").expect("routes");
    let defaults = |routes: &[String]| -> Vec<String> {
        routes
            .iter()
            .filter(|r| r.starts_with("default"))
            .cloned()
            .collect()
    };
    assert_eq!(
        defaults(&v4),
        vec!["default via 192.168.65.1 dev net1".to_string()],
        "{v4:?}"
    );
    assert_eq!(
        defaults(&v6),
        vec!["default via fd00:65::1 dev net1".to_string()],
        "{v6:?}"
    );
    let routes = res["routes"].as_array().expect("routes");
    let default_gws: Vec<&str> = routes
        .iter()
        .filter(|r| r["dst"] == "0.0.0.0/0" || r["dst"] == "::/0")
        .filter_map(|r| r["gw"].as_str())
        .collect();
    assert_eq!(default_gws, vec!["192.168.65.1", "fd00:65::1"], "{res}");
    node.runtime.del(&list, &pod).expect("DEL");

    // A gateway the interface cannot reach: ADD fails and takes everything back.
    let (ns, pod) = node.pod("default");
    let pod = pod.networks(r#"[{"name":"data","default-route":["10.99.99.1"]}]"#);
    let err = node
        .runtime
        .add(&list, &pod)
        .expect_err("unreachable gateway");
    assert!(
        err.msg.contains("10.99.99.1") && err.msg.contains("data"),
        "{err}"
    );
    node.assert_released(&ns, "unreachable gateway");
    node.runtime.del(&list, &pod).expect("DEL after failed ADD");

    // Two networks cannot both be the IPv4 default.
    let (ns, pod) = node.pod("default");
    let pod = pod.networks(
        r#"[{"name":"data","default-route":["192.168.65.1"]},{"name":"more","default-route":["192.168.66.1"]}]"#,
    );
    let err = node.runtime.add(&list, &pod).expect_err("two defaults");
    assert_eq!(err.code, cni::code::INVALID_NETWORK_CONFIG, "{err}");
    assert_eq!(kernel::links(ns.name()).expect("links").len(), 1);
    assert_eq!(node.snapshot(), before);
}

/// A runtime retrying ADD (libcni does) never damages what the first ADD
/// made: the same request gets the recorded result again, another one fails
/// with code 4 leaving every interface, lease and record as it was.
#[test]
fn a_repeated_add_returns_the_recorded_result_or_changes_nothing() {
    let node = Node::new("re-add");
    let ipam = node.ipam_dir();
    node.define(
        "data.yaml",
        &nad("data", None, &macvlan("1.0.0", &["192.168.64.0/24"], &ipam)),
    );
    node.define(
        "more.yaml",
        &nad("more", None, &macvlan("1.0.0", &["192.168.65.0/24"], &ipam)),
    );
    let list = node.plexus_list("1.1.0", ptp("k8s", "1.0.0", &["10.249.0.0/24"], &ipam));
    let (ns, pod) = node.pod("default");
    let pod = pod.networks("data");
    let first = node.runtime.add(&list, &pod).expect("ADD");
    let links = kernel::link_names(ns.name()).expect("links");
    let leases = node.leases();
    let records = node.records();
    assert_eq!(leases.len(), 2);

    let again = node.runtime.add(&list, &pod).expect("the same ADD again");
    assert_eq!(again, first, "the recorded result");
    let other = pod.clone().networks("data,more");
    let err = node
        .runtime
        .add(&list, &other)
        .expect_err("another ADD of the same container");
    assert_eq!(err.code, 4, "{err:?}");
    assert!(err.msg.contains("already attached"), "{err}");
    assert_eq!(kernel::link_names(ns.name()).expect("links"), links);
    assert_eq!(node.leases(), leases);
    assert_eq!(node.records(), records);
    node.runtime
        .check(&list, &pod)
        .expect("CHECK: all still there");
    node.runtime.del(&list, &pod).expect("DEL");
    node.assert_released(&ns, "DEL");
}
