//! `plexus-veth`, the Calico-style routed default network, checked against
//! what the kernel holds on the pod side and the host side.

use std::path::Path;
use std::time::Duration;

use netns_harness::{kernel, probe, Netns};
use plexus_tests::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(5);

fn veth_net(name: &str, subnets: &[&str], ipam: &Path) -> Value {
    let mut net = plexus_veth(name, subnets, ipam);
    net["mtu"] = json!(1450);
    net
}

fn read_sysctl(ns: &Netns, key: &str) -> String {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    ns.run(|| std::fs::read_to_string(&path))
        .expect("enter netns")
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .to_string()
}

fn neighbours(ns: &str) -> Vec<String> {
    kernel::ip_json(ns, &["neigh", "show", "nud", "permanent"])
        .expect("neigh")
        .iter()
        .map(|n| {
            format!(
                "{} {}",
                n["dst"].as_str().unwrap_or(""),
                n["lladdr"].as_str().unwrap_or("")
            )
        })
        .collect()
}

#[test]
fn pods_on_one_node_get_the_calico_model_and_reach_each_other() {
    let node = Node::new("veth1");
    let list = node.plexus_list(
        "1.0.0",
        veth_net(
            "k8s-pods",
            &["10.244.5.0/24", "fd00:244:5::/64"],
            &node.ipam_dir(),
        ),
    );
    let before = node.snapshot();
    let (ns_a, pod_a) = node.pod("default");
    let (ns_b, pod_b) = node.pod("default");
    let res_a = node.runtime.add(&list, &pod_a).expect("ADD a");
    node.runtime.add(&list, &pod_b).expect("ADD b");

    // Pod side.
    let eth0 = kernel::link(ns_a.name(), "eth0")
        .expect("link")
        .expect("eth0");
    assert_eq!(
        (eth0.kind.as_str(), eth0.mtu, eth0.up),
        ("veth", 1450, true)
    );
    let addrs = kernel::addrs(ns_a.name(), "eth0").expect("addrs");
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    assert!(
        addrs
            .iter()
            .any(|a| a.starts_with("10.244.5.") && a.ends_with("/32")),
        "{addrs:?}"
    );
    assert!(
        addrs
            .iter()
            .any(|a| a.starts_with("fd00:244:5::") && a.ends_with("/128")),
        "{addrs:?}"
    );
    let v4 = kernel::routes(ns_a.name(), "-4").expect("routes");
    assert!(
        v4.contains(&"default via 169.254.1.1 dev eth0".to_string()),
        "{v4:?}"
    );
    assert!(v4.contains(&"169.254.1.1 dev eth0".to_string()), "{v4:?}");
    let v6 = kernel::routes(ns_a.name(), "-6").expect("routes");
    assert!(
        v6.contains(&"default via fe80::ecee:eeff:feee:eeee dev eth0".to_string()),
        "{v6:?}"
    );
    let neigh = neighbours(ns_a.name());
    assert!(
        neigh.contains(&"169.254.1.1 ee:ee:ee:ee:ee:ee".to_string()),
        "{neigh:?}"
    );
    assert!(
        neigh.contains(&"fe80::ecee:eeff:feee:eeee ee:ee:ee:ee:ee:ee".to_string()),
        "{neigh:?}"
    );
    let tentative = kernel::ip(&[
        "-n",
        ns_a.name(),
        "-6",
        "addr",
        "show",
        "dev",
        "eth0",
        "tentative",
    ])
    .expect("ip");
    assert!(
        !tentative.contains("fd00:244:5"),
        "no DAD wait: {tentative}"
    );

    // Host side, as a Calico operator would find it.
    let host_name = res_a["interfaces"][0]["name"]
        .as_str()
        .expect("host veth in result")
        .to_string();
    assert!(
        host_name.starts_with("plx") && host_name.len() == 15,
        "{host_name}"
    );
    let host = kernel::link(node.ns(), &host_name)
        .expect("link")
        .expect("host veth");
    assert_eq!(
        (host.kind.as_str(), host.mac.as_str(), host.up),
        ("veth", "ee:ee:ee:ee:ee:ee", true)
    );
    let host_routes = kernel::routes(node.ns(), "-4").expect("routes");
    let pod_v4 = addrs
        .iter()
        .find(|a| !a.contains(':'))
        .expect("v4")
        .trim_end_matches("/32")
        .to_string();
    assert!(
        host_routes.contains(&format!("{pod_v4} dev {host_name}")),
        "{host_routes:?}"
    );
    let host_routes6 = kernel::routes(node.ns(), "-6").expect("routes");
    let pod_v6 = addrs
        .iter()
        .find(|a| a.contains(':'))
        .expect("v6")
        .trim_end_matches("/128")
        .to_string();
    assert!(
        host_routes6.contains(&format!("{pod_v6} dev {host_name}")),
        "{host_routes6:?}"
    );
    assert_eq!(
        read_sysctl(&node.netns, &format!("net.ipv4.conf.{host_name}.proxy_arp")),
        "1"
    );
    assert_eq!(read_sysctl(&node.netns, "net.ipv4.ip_forward"), "1");

    // The result says what the kernel holds.
    assert_eq!(res_a["interfaces"][1]["name"], "eth0");
    assert_eq!(res_a["interfaces"][1]["sandbox"], ns_a.path_str());
    let mut res_ips: Vec<String> = res_a["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .map(|i| i["address"].as_str().unwrap_or("").to_string())
        .collect();
    let mut kernel_ips = addrs.clone();
    res_ips.sort();
    kernel_ips.sort();
    assert_eq!(res_ips, kernel_ips);

    let server = probe::EchoServer::start(&ns_b).expect("server");
    for cidr in kernel::addrs(ns_b.name(), "eth0").expect("addrs") {
        let ip = addr_ip(&cidr);
        probe::reach(&ns_a, ip, server.port(), T).unwrap_or_else(|e| panic!("{e}"));
    }
    drop(server);

    node.runtime.del(&list, &pod_a).expect("DEL a");
    node.runtime.del(&list, &pod_b).expect("DEL b");
    node.runtime.del(&list, &pod_b).expect("DEL b again");
    node.assert_released(&ns_a, "pod a");
    node.assert_released(&ns_b, "pod b");
    assert_eq!(node.snapshot(), before);
}

#[test]
fn pods_on_two_nodes_reach_each_other_over_both_families() {
    let n1 = Node::new("vethn1");
    let n2 = Node::new("vethn2");
    kernel::veth(n1.ns(), "under0", n2.ns(), "under0").expect("underlay");
    for (n, v4, v6) in [
        (&n1, "192.0.2.1/24", "fd00:2::1/64"),
        (&n2, "192.0.2.2/24", "fd00:2::2/64"),
    ] {
        kernel::ip(&["-n", n.ns(), "addr", "add", v4, "dev", "under0"]).expect("v4");
        kernel::ip(&["-n", n.ns(), "addr", "add", v6, "dev", "under0", "nodad"]).expect("v6");
    }
    for (n, peer4, peer6, cidr4, cidr6) in [
        (
            &n1,
            "192.0.2.2",
            "fd00:2::2",
            "10.244.12.0/24",
            "fd00:244:12::/64",
        ),
        (
            &n2,
            "192.0.2.1",
            "fd00:2::1",
            "10.244.11.0/24",
            "fd00:244:11::/64",
        ),
    ] {
        kernel::ip(&["-n", n.ns(), "route", "add", cidr4, "via", peer4]).expect("route v4");
        kernel::ip(&["-n", n.ns(), "-6", "route", "add", cidr6, "via", peer6]).expect("route v6");
    }
    let l1 = n1.plexus_list(
        "1.0.0",
        veth_net(
            "k8s",
            &["10.244.11.0/24", "fd00:244:11::/64"],
            &n1.ipam_dir(),
        ),
    );
    let l2 = n2.plexus_list(
        "1.0.0",
        veth_net(
            "k8s",
            &["10.244.12.0/24", "fd00:244:12::/64"],
            &n2.ipam_dir(),
        ),
    );
    let (ns_a, pod_a) = n1.pod("default");
    let (ns_b, pod_b) = n2.pod("default");
    n1.runtime.add(&l1, &pod_a).expect("ADD on node 1");
    n2.runtime.add(&l2, &pod_b).expect("ADD on node 2");
    let server = probe::EchoServer::start(&ns_b).expect("server");
    let targets = kernel::addrs(ns_b.name(), "eth0").expect("addrs");
    assert_eq!(targets.len(), 2);
    for cidr in targets {
        let ip = addr_ip(&cidr);
        probe::reach(&ns_a, ip, server.port(), T).unwrap_or_else(|e| panic!("{e} across nodes"));
    }
    drop(server);
    n1.runtime.del(&l1, &pod_a).expect("DEL a");
    n2.runtime.del(&l2, &pod_b).expect("DEL b");
    n1.assert_released(&ns_a, "node 1");
    n2.assert_released(&ns_b, "node 2");
}

#[test]
fn check_catches_a_deleted_route_and_a_changed_address() {
    let node = Node::new("vethchk");
    let list = node.plexus_list(
        "1.0.0",
        veth_net("k8s", &["10.244.13.0/24"], &node.ipam_dir()),
    );
    let (ns, pod) = node.pod("default");
    node.runtime.add(&list, &pod).expect("ADD");
    node.runtime
        .check(&list, &pod)
        .expect("CHECK right after ADD");

    kernel::ip(&["-n", ns.name(), "route", "del", "default"]).expect("del route");
    let err = node.runtime.check(&list, &pod).expect_err("deleted route");
    assert_eq!(err.code, 100, "{err}");
    assert!(err.msg.contains("0.0.0.0/0"), "{err}");
    kernel::ip(&[
        "-n",
        ns.name(),
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ])
    .expect("restore");
    node.runtime.check(&list, &pod).expect("CHECK after repair");

    let addr = kernel::addrs(ns.name(), "eth0").expect("addrs").remove(0);
    kernel::ip(&["-n", ns.name(), "addr", "del", &addr, "dev", "eth0"]).expect("del addr");
    kernel::ip(&[
        "-n",
        ns.name(),
        "addr",
        "add",
        "10.244.13.250/32",
        "dev",
        "eth0",
    ])
    .expect("other addr");
    let err = node
        .runtime
        .check(&list, &pod)
        .expect_err("changed address");
    assert_eq!(err.code, 100, "{err}");
    assert!(err.msg.contains(&addr), "{err}");
    node.runtime.del(&list, &pod).expect("DEL");
    node.assert_released(&ns, "after CHECK drift");
}

#[test]
fn foreign_interfaces_and_routes_are_untouched() {
    let node = Node::new("vethfor");
    let list = node.plexus_list(
        "1.0.0",
        veth_net("k8s", &["10.244.14.0/24"], &node.ipam_dir()),
    );
    // Planted before ADD: a foreign veth and route on the host, one in the pod.
    kernel::veth(node.ns(), "foreign0", node.ns(), "foreign1").expect("foreign veth");
    kernel::ip(&[
        "-n",
        node.ns(),
        "route",
        "add",
        "10.77.0.0/24",
        "dev",
        "foreign0",
    ])
    .expect("foreign route");
    let (ns, pod) = node.pod("default");
    kernel::veth(ns.name(), "side0", ns.name(), "side1").expect("pod side veth");
    kernel::ip(&[
        "-n",
        ns.name(),
        "addr",
        "add",
        "10.78.0.1/24",
        "dev",
        "side0",
    ])
    .expect("side addr");
    let before = node.snapshot();
    let pod_before = kernel::snapshot(ns.name()).expect("pod snapshot");

    let res = node.runtime.add(&list, &pod).expect("ADD");
    node.runtime.del(&list, &pod).expect("DEL");
    assert_eq!(
        node.snapshot(),
        before,
        "host as before, foreign parts included"
    );
    assert_eq!(
        kernel::snapshot(ns.name()).expect("pod snapshot"),
        pod_before
    );

    // A link that has our name but is not ours survives DEL.
    let name = res["interfaces"][0]["name"]
        .as_str()
        .expect("host name")
        .to_string();
    kernel::veth(node.ns(), &name, node.ns(), "imposter1").expect("same-named veth");
    node.runtime.del(&list, &pod).expect("DEL again");
    assert!(
        kernel::link(node.ns(), &name).expect("link").is_some(),
        "a link we did not make stays"
    );
}
