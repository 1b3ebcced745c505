//! Security groups in force in the pod's netns: real traffic between pods,
//! allowed where a rule says so and dropped elsewhere, on the interfaces of
//! the networks that carry groups only; removed by DEL; drift found by
//! CHECK; remote groups from the central API's Attachment records.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use cni::NetConfList;
use conf::api::{NAD, SECURITY_GROUP};
use netns_harness::etcd::{EtcdCluster, Tls};
use netns_harness::plexusd::Plexusd;
use netns_harness::probe::{self, EchoServer};
use netns_harness::{kernel, Netns};
use plexus_tests::*;
use serde_json::{json, Value};

const OPEN: u16 = 8080;
const SHUT: u16 = 8081;
const WAIT: Duration = Duration::from_millis(400);
const TENANT_TOKEN: &str = "tenant-a-token-0123456";

fn addr(ns: &Netns, dev: &str, v6: bool) -> IpAddr {
    addr_ip(&family_addrs(ns.name(), dev, v6)[0])
}

fn tcp_ok(from: &Netns, ip: IpAddr, port: u16) -> bool {
    probe::tcp(from, SocketAddr::new(ip, port), WAIT).is_ok()
}

/// From `client`, `OPEN` on `server`'s `dev` answers and `SHUT` does not,
/// on both families.
fn only_open_port(client: &Netns, server: &Netns, dev: &str) {
    for v6 in [false, true] {
        let ip = addr(server, dev, v6);
        assert!(tcp_ok(client, ip, OPEN), "tcp/{OPEN} to {ip} is allowed");
        assert!(!tcp_ok(client, ip, SHUT), "tcp/{SHUT} to {ip} is dropped");
    }
}

fn nft_table(ns: &Netns) -> String {
    kernel::ip(&["netns", "exec", ns.name(), "nft", "list", "ruleset"]).unwrap_or_default()
}

fn group(ns: &str, name: &str, rules: Value) -> String {
    format!(
        "apiVersion: plexus.io/v1\nkind: SecurityGroup\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  rules: {rules}\n"
    )
}

fn network_with_groups(
    ns: &str,
    name: &str,
    config: &Value,
    annotations: &[(&str, &str)],
) -> String {
    let mut yaml = nad(name, Some(ns), config);
    let notes: String = annotations
        .iter()
        .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
        .collect();
    yaml = yaml.replacen(
        &format!("  namespace: {ns}\n"),
        &format!("  namespace: {ns}\n  annotations:\n{notes}"),
        1,
    );
    yaml
}

/// A node whose pods get the cluster network (ptp on `pods`) and, in
/// namespace `a`, the MACVLAN network `data` (on `data`) that carries group
/// `web` of `rules`.
fn node_with_web(tag: &str, pods: &str, data: &[&str], rules: Value) -> (Node, NetConfList) {
    let node = Node::new(tag);
    let ipam = node.ipam_dir();
    let list = node.plexus_list("1.0.0", ptp("pods", "1.0.0", &[pods], &ipam));
    node.define("web.yaml", &group("a", "web", rules));
    node.define(
        "data.yaml",
        &network_with_groups(
            "a",
            "data",
            &macvlan("1.0.0", data, &ipam),
            &[("plexus.io/security-groups", "web")],
        ),
    );
    (node, list)
}

#[test]
fn a_networks_groups_filter_its_interface_only_and_go_with_del() {
    let (node, list) = node_with_web(
        "sg-cidr",
        "10.95.0.0/24",
        &["192.168.95.0/24", "fd00:95::/64"],
        json!([
            {"direction": "ingress", "protocol": "tcp", "portRangeMin": OPEN,
             "portRangeMax": OPEN, "remoteIpPrefix": "192.168.95.0/24"},
            {"direction": "ingress", "protocol": "tcp", "portRangeMin": OPEN,
             "remoteIpPrefix": "fd00:95::/64"},
            {"direction": "ingress", "protocol": "icmp", "icmpType": 8}
        ]),
    );
    let (server_ns, server) = node.pod("a");
    let server = server.networks("data");
    let (client_ns, client) = node.pod("a");
    let client = client.networks("data");
    node.runtime.add(&list, &server).expect("ADD server");
    node.runtime.add(&list, &client).expect("ADD client");
    assert!(
        nft_table(&server_ns).contains("in-net1"),
        "{}",
        nft_table(&server_ns)
    );
    let _open = EchoServer::start_on(&server_ns, OPEN).expect("echo");
    let _shut = EchoServer::start_on(&server_ns, SHUT).expect("echo");

    only_open_port(&client_ns, &server_ns, "net1");
    let v4 = addr(&server_ns, "net1", false);
    probe::ping(&client_ns, v4, WAIT).expect("ICMP echo is allowed");
    let v6 = addr(&server_ns, "net1", true);
    assert!(
        probe::ping(&client_ns, v6, WAIT).is_err(),
        "no rule allows ICMPv6 echo"
    );
    // The cluster network carries no group: nothing filters eth0.
    let eth0 = addr(&server_ns, "eth0", false);
    assert!(tcp_ok(&node.netns, eth0, SHUT), "eth0 is not filtered");

    // CHECK passes, then finds a rule taken away.
    node.runtime.check(&list, &server).expect("CHECK");
    kernel::ip(&[
        "netns",
        "exec",
        server_ns.name(),
        "nft",
        "flush",
        "chain",
        "inet",
        "plexus",
        "in-net1",
    ])
    .expect("flush");
    let err = node.runtime.check(&list, &server).expect_err("drift");
    assert!(err.msg.contains("security groups"), "{err:?}");

    // GC of the client, whose sandbox is still there but no longer valid:
    // its table goes with its interfaces.
    let valid = [cni::config::Attachment {
        container_id: server.container_id.clone(),
        ifname: "eth0".into(),
    }];
    let mut gc_list = list.clone();
    gc_list.cni_version = "1.1.0".into();
    node.runtime.gc(&gc_list, &valid).expect("GC");
    assert!(
        !nft_table(&client_ns).contains("plexus"),
        "the table goes with GC: {}",
        nft_table(&client_ns)
    );
    assert_eq!(
        kernel::link_names(client_ns.name()).expect("links"),
        ["lo"],
        "GC took the client's interfaces"
    );
    node.runtime.del(&list, &server).expect("DEL");
    assert!(
        !nft_table(&server_ns).contains("plexus"),
        "the table goes with DEL"
    );
    // No lease or record of either pod is left: GC released the client's.
    node.assert_released(&server_ns, "DEL and GC");
}

/// The table is written while the delegates attach; when the kernel
/// refuses it, the ADD fails with its reason and nothing of the pod stays.
#[test]
fn a_table_the_kernel_refuses_undoes_the_add() {
    let (node, list) = node_with_web(
        "sg-refused",
        "10.97.0.0/24",
        &["192.168.97.0/24"],
        json!([{"direction": "ingress", "protocol": "tcp", "portRangeMin": OPEN}]),
    );
    let (ns, pod) = node.pod("a");
    let pod = pod.networks("data");
    // A chain `input` already there on another priority: the kernel
    // refuses to hook Plexus' chain of that name differently.
    kernel::ip(&[
        "netns",
        "exec",
        ns.name(),
        "nft",
        "add table inet plexus; add chain inet plexus input \
         { type filter hook input priority 10; }",
    ])
    .expect("a conflicting chain");
    let err = node.runtime.add(&list, &pod).expect_err("ADD fails");
    assert_eq!(err.code, 999, "{err:?}");
    assert!(
        err.msg.contains("security groups") && err.msg.contains("chain input"),
        "the error names the groups and what the kernel refused: {err:?}"
    );
    node.assert_released(&ns, "the failed ADD");
    assert!(!nft_table(&ns).contains("plexus"), "{}", nft_table(&ns));
    node.runtime
        .del(&list, &pod)
        .expect("DEL after the failed ADD");
}

#[test]
fn pods_choose_groups_only_where_allowed_and_unknown_groups_refuse_the_pod() {
    let node = Node::new("sg-refuse");
    let ipam = node.ipam_dir();
    let list = node.plexus_list("1.0.0", ptp("pods", "1.0.0", &["10.96.0.0/24"], &ipam));
    let data = macvlan("1.0.0", &["192.168.96.0/24"], &ipam);
    node.define("data.yaml", &nad("data", Some("a"), &data));
    node.define(
        "open.yaml",
        &network_with_groups(
            "a",
            "open",
            &macvlan("1.0.0", &["192.168.97.0/24"], &ipam),
            &[("plexus.io/pod-security-groups", "true")],
        ),
    );
    node.define("web.yaml", &group("a", "web", json!([])));
    // A network whose interface the kernel cannot filter.
    node.define(
        "tapnet.yaml",
        &network_with_groups(
            "a",
            "tapnet",
            &json!({"cniVersion": "1.0.0", "type": "tap",
                    "ipam": {"type": "host-local", "dataDir": ipam,
                             "ranges": [[{"subnet": "192.168.94.0/24"}]]}}),
            &[("plexus.io/security-groups", "web")],
        ),
    );
    let cases: [(&str, &str, &str); 4] = [
        ("data", "web", "none of its networks"),
        ("data", r#"{"data": ["web"]}"#, "does not let pods choose"),
        ("open", "nosuch", "\"nosuch\" not found"),
        ("tapnet", "", "not one the kernel can filter"),
    ];
    for (networks, groups, says) in cases {
        let (ns, pod) = node.pod("a");
        let pod = pod.annotate(&[
            ("k8s.v1.cni.cncf.io/networks", networks),
            ("plexus.io/security-groups", groups),
        ]);
        let err = node.runtime.add(&list, &pod).expect_err(groups);
        assert_eq!(err.code, 7, "{err:?}");
        assert!(err.msg.contains(says), "{says:?} in {}", err.msg);
        node.assert_released(&ns, groups);
    }
    // Where the network allows it, the pod's own group is in force.
    let (ns, pod) = node.pod("a");
    let pod = pod.annotate(&[
        ("k8s.v1.cni.cncf.io/networks", "open"),
        ("plexus.io/security-groups", "web"),
    ]);
    node.runtime
        .add(&list, &pod)
        .expect("ADD with the pod's group");
    assert!(nft_table(&ns).contains("in-net1"), "{}", nft_table(&ns));
    node.runtime.del(&list, &pod).expect("DEL");
    node.assert_released(&ns, "DEL");
}

/// In the API's etcd (through `put`): the NetworkAttachmentDefinition
/// `a/data` with `config`, letting pods choose groups, and the groups `web`
/// (tcp/`OPEN` from group `client`) and `client` (no rules).
fn web_and_client(put: impl Fn(&str, &Value), config: &Value) {
    put(
        &NAD.key(Some("a"), "data"),
        &json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                "metadata": {"name": "data", "namespace": "a",
                             "annotations": {"plexus.io/pod-security-groups": "true"}},
                "spec": {"config": config.to_string()}}),
    );
    for (name, rules) in [
        (
            "web",
            json!([{"direction": "ingress", "protocol": "tcp", "portRangeMin": OPEN,
                    "portRangeMax": OPEN, "remoteGroup": "client"}]),
        ),
        ("client", json!([])),
    ] {
        put(
            &SECURITY_GROUP.key(Some("a"), name),
            &json!({"apiVersion": "plexus.io/v1", "kind": "SecurityGroup",
                    "metadata": {"name": name, "namespace": "a"}, "spec": {"rules": rules}}),
        );
    }
}

#[test]
fn remote_groups_admit_their_members_from_the_apis_records() {
    let n = ApiNode::new("sg-remote");
    let data = macvlan(
        "1.0.0",
        &["192.168.98.0/24", "fd00:98::/64"],
        &n.node.ipam_dir(),
    );
    web_and_client(|k, v| n.put(k, v), &data);
    let pod_in = |group: Option<&str>| {
        let (ns, pod) = n.node.pod("a");
        let mut notes = vec![("k8s.v1.cni.cncf.io/networks", "data")];
        if let Some(g) = group {
            notes.push(("plexus.io/security-groups", g));
        }
        (ns, pod.annotate(&notes))
    };
    let (client_ns, client) = pod_in(Some("client"));
    let (other_ns, other) = pod_in(None);
    n.node.runtime.add(&n.list, &client).expect("ADD client");
    n.node.runtime.add(&n.list, &other).expect("ADD other");
    // The server's ADD reads the members from the Attachment records.
    assert!(n.node.published(), "records published");
    let (server_ns, server) = pod_in(Some("web"));
    n.node.runtime.add(&n.list, &server).expect("ADD server");
    let _open = EchoServer::start_on(&server_ns, OPEN).expect("echo");
    for v6 in [false, true] {
        let ip = addr(&server_ns, "net1", v6);
        assert!(tcp_ok(&client_ns, ip, OPEN), "a client member reaches {ip}");
        assert!(
            !tcp_ok(&other_ns, ip, OPEN),
            "a non-member does not reach {ip}"
        );
    }
    // The records say which groups each interface is in.
    assert!(n.node.published(), "records published");
    let out = n
        .etcd
        .etcdctl(
            0,
            &[
                "get",
                "--prefix",
                "--print-value-only",
                &conf::api::ATTACHMENT.prefix(Some("a")),
            ],
        )
        .expect("etcdctl");
    assert_eq!(
        out.matches("\"securityGroups\":[\"web\"]").count(),
        1,
        "{out}"
    );
    assert_eq!(
        out.matches("\"securityGroups\":[\"client\"]").count(),
        1,
        "{out}"
    );
    for pod in [&server, &client, &other] {
        n.node.runtime.del(&n.list, pod).expect("DEL");
    }
    for ns in [&server_ns, &client_ns, &other_ns] {
        n.node.assert_released(ns, "DEL");
    }
}

/// Polls `what` every 50 ms until it holds or `limit` passes; how long it took.
fn within(limit: Duration, mut what: impl FnMut() -> bool) -> Option<Duration> {
    let start = std::time::Instant::now();
    loop {
        if what() {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The elements of set `name` in the pod's table.
fn set_elements(ns: &Netns, name: &str) -> Vec<String> {
    kernel::nft_set_elements(ns.name(), name)
}

/// The agent's output and the node log, for a failure's message.
fn report(n: &ApiNode) -> String {
    let out = std::fs::read_to_string(n.node.scratch.join("agent.out")).unwrap_or_default();
    let log = std::fs::read_to_string(n.node.log_file()).unwrap_or_default();
    format!("agent output:\n{out}\nlog:\n{log}")
}

fn foreign_member(n: &ApiNode, name: &str, address: &str) -> String {
    let key = conf::api::ATTACHMENT.key(Some("a"), name);
    n.put(
        &key,
        &json!({"apiVersion": "plexus.io/v1", "kind": "Attachment",
                "metadata": {"name": name, "namespace": "a", "labels": {"plexus.io/node": "node-2"}},
                "spec": {"pod": name, "node": "node-2", "containerId": "f00d", "interface": "net1",
                         "network": "a/data", "addresses": [address],
                         "securityGroups": ["client"]}}),
    );
    key
}

/// The node agent keeps running pods' groups current: members that join or
/// leave anywhere, and rules that change, are in force within 2 s; killed,
/// and with etcd away meanwhile, it brings every table back to what the API
/// says once both are back.
#[test]
fn the_agent_keeps_members_and_rules_current() {
    let mut n = ApiNode::new("sg-agent");
    let data = macvlan("1.0.0", &["192.168.99.0/24"], &n.node.ipam_dir());
    web_and_client(|k, v| n.put(k, v), &data);
    // `web` as the test changes it: tcp to each of `ports` from `client`.
    let web = |ports: &[u16]| {
        let rules: Vec<Value> = ports
            .iter()
            .map(|p| {
                json!({"direction": "ingress", "protocol": "tcp", "portRangeMin": p,
                            "remoteGroup": "client"})
            })
            .collect();
        json!({"apiVersion": "plexus.io/v1", "kind": "SecurityGroup",
               "metadata": {"name": "web", "namespace": "a"}, "spec": {"rules": rules}})
    };
    let pod_in = |group: &str| {
        let (ns, pod) = n.node.pod("a");
        let pod = pod.annotate(&[
            ("k8s.v1.cni.cncf.io/networks", "data"),
            ("plexus.io/security-groups", group),
        ]);
        (ns, pod)
    };
    // Rules change as a tenant admin changes them: plexusctl, plexusd.
    let (tls, _) = Tls::generate(n.node.scratch.path()).expect("certificates");
    let plexusd = Plexusd::start_in(
        &n.node.scratch,
        &n.etcd.endpoints(),
        &tls,
        &[(TENANT_TOKEN, "bob", &["plexus:tenant:a"])],
        &[],
        Some(&n.node.netns),
    )
    .expect("plexusd");
    let apply = |ports: &[u16]| {
        let out = plexusd
            .plexusctl(
                TENANT_TOKEN,
                &["apply", "-f", "-"],
                Some(&web(ports).to_string()),
            )
            .expect("plexusctl");
        assert!(
            out.status.success(),
            "plexusctl apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (server_ns, server) = pod_in("web");
    n.node.runtime.add(&n.list, &server).expect("ADD server");
    let _echo = (
        EchoServer::start_on(&server_ns, OPEN).expect("echo"),
        EchoServer::start_on(&server_ns, SHUT).expect("echo"),
    );
    let target = addr(&server_ns, "net1", false);
    let mut agent = n.node.start_agent(&n.list).expect("agent");
    let limit = Duration::from_secs(2);
    let mut took = Vec::new();

    // A client that starts after the server: in within 2 s.
    let (c1_ns, c1) = pod_in("client");
    n.node.runtime.add(&n.list, &c1).expect("ADD client 1");
    let t = within(limit, || tcp_ok(&c1_ns, target, OPEN))
        .unwrap_or_else(|| panic!("client 1 let in within 2 s; {}", report(&n)));
    took.push(("new member", t));
    // A member on another node: its address in the set within 2 s.
    let f1 = foreign_member(&n, "remote-1", "192.168.99.201/24");
    let t = within(limit, || {
        set_elements(&server_ns, "g-client-v4").contains(&"192.168.99.201".to_string())
    })
    .expect("the other node's member in the set within 2 s");
    took.push(("member elsewhere", t));
    // A rule added: in force within 2 s.
    apply(&[OPEN, SHUT]);
    let t = within(limit, || tcp_ok(&c1_ns, target, SHUT)).expect("new rule within 2 s");
    took.push(("rule added", t));
    n.node
        .runtime
        .check(&n.list, &server)
        .expect("CHECK after the agent rewrote the rules");
    // Bad rules: refused by plexusd, each with its field path; no node's
    // table changes.
    let before = kernel::nft_table_shape(server_ns.name());
    let mut bad = web(&[]);
    bad["spec"]["rules"] = json!([
        {"direction": "ingress", "protocol": "tcp", "portRangeMin": 90, "portRangeMax": 80},
        {"direction": "ingress", "protocol": "gre"},
        {"direction": "ingress", "protocol": "tcp", "portRangeMin": 22, "remoteGroup": "b/client"}
    ]);
    let out = plexusd
        .plexusctl(TENANT_TOKEN, &["apply", "-f", "-"], Some(&bad.to_string()))
        .expect("plexusctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "bad rules refused: {err}");
    for path in [
        "spec.rules[0].portRangeMax",
        "spec.rules[1].protocol",
        "spec.rules[2].remoteGroup",
    ] {
        assert!(err.contains(path), "the refusal names {path}: {err}");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        kernel::nft_table_shape(server_ns.name()),
        before,
        "nothing changed"
    );
    // A member that leaves: out within 2 s.
    let c1_addr = addr(&c1_ns, "net1", false).to_string();
    n.node.runtime.del(&n.list, &c1).expect("DEL client 1");
    let t = within(limit, || {
        !set_elements(&server_ns, "g-client-v4").contains(&c1_addr)
    })
    .expect("a member that left is out within 2 s");
    took.push(("member left", t));
    println!("agent propagation: {took:?}");

    // Killed; meanwhile members and a rule change, and etcd goes away and
    // comes back.
    agent.kill();
    n.etcd.etcdctl(0, &["del", &f1]).expect("remove remote-1");
    foreign_member(&n, "remote-2", "192.168.99.202/24");
    apply(&[SHUT]);
    n.etcd.stop_member(0).expect("stop etcd");
    let _agent = n.node.start_agent(&n.list).expect("agent again");
    std::thread::sleep(Duration::from_millis(500));
    n.etcd.restart_member(0).expect("restart etcd");
    let want = vec!["192.168.99.202".to_string()];
    within(Duration::from_secs(10), || {
        set_elements(&server_ns, "g-client-v4") == want
    })
    .unwrap_or_else(|| {
        panic!(
            "after the resync: {:?}",
            set_elements(&server_ns, "g-client-v4")
        )
    });
    // Exactly what the API says: the table a pod of the same groups gets
    // from a fresh ADD now, rule for rule.
    let (fresh_ns, fresh) = pod_in("web");
    n.node
        .runtime
        .add(&n.list, &fresh)
        .expect("ADD a fresh web pod");
    let expected = kernel::nft_table_shape(fresh_ns.name());
    assert!(
        expected.to_string().contains(&format!("{SHUT}"))
            && !expected.to_string().contains(&format!("{OPEN}")),
        "the fresh pod has the rule as changed: {expected}"
    );
    within(Duration::from_secs(10), || {
        kernel::nft_table_shape(server_ns.name()) == expected
    })
    .unwrap_or_else(|| {
        panic!(
            "after the resync the server's table is {} instead of {expected}",
            kernel::nft_table_shape(server_ns.name())
        )
    });
    n.node
        .runtime
        .del(&n.list, &fresh)
        .expect("DEL the fresh pod");
    n.node.runtime.del(&n.list, &server).expect("DEL server");
    n.node.assert_released(&server_ns, "DEL");
    n.node.assert_released(&c1_ns, "DEL");
}

/// The cluster network carries groups too (a named cluster definition with
/// the annotation, Plexus' routed veth): the pod's eth0 is filtered, both
/// families.
#[test]
fn the_cluster_network_carries_groups_too() {
    let node = Node::new("sg-cluster");
    let ipam = node.ipam_dir();
    let pods = plexus_veth("pods", &["10.98.0.0/24", "fd00:980::/64"], &ipam);
    let mut def = nad("pods", None, &pods);
    def = def.replacen(
        "  name: pods\n",
        "  name: pods\n  annotations:\n    plexus.io/security-groups: \"web\"\n",
        1,
    );
    node.define("pods.yaml", &def);
    node.define(
        "web.yaml",
        &group(
            "a",
            "web",
            json!([
                {"direction": "ingress", "protocol": "tcp", "portRangeMin": OPEN,
                 "remoteIpPrefix": "10.98.0.0/24"},
                {"direction": "ingress", "protocol": "tcp", "portRangeMin": OPEN,
                 "remoteIpPrefix": "fd00:980::/64"}
            ]),
        ),
    );
    let list = node.plexus_list("1.0.0", json!("pods"));
    let (server_ns, server) = node.pod("a");
    let (client_ns, client) = node.pod("a");
    node.runtime.add(&list, &server).expect("ADD server");
    node.runtime.add(&list, &client).expect("ADD client");
    assert!(
        nft_table(&server_ns).contains("in-eth0"),
        "{}",
        nft_table(&server_ns)
    );
    let _echo = (
        EchoServer::start_on(&server_ns, OPEN).expect("echo"),
        EchoServer::start_on(&server_ns, SHUT).expect("echo"),
    );
    only_open_port(&client_ns, &server_ns, "eth0");
    for pod in [&server, &client] {
        node.runtime.del(&list, pod).expect("DEL");
    }
    node.assert_released(&server_ns, "DEL");
    node.assert_released(&client_ns, "DEL");
}

/// Two nodes on one link, one API: a `client` pod on node 1 reaches a `web`
/// pod on node 2 on the port web's rule opens, both families, once node 2's
/// agent has it in the set; a pod outside the group, and another port, are
/// dropped.
#[test]
fn a_member_on_another_node_connects_across_nodes() {
    let n1 = Node::new("sg-node1");
    let n2 = Node::new("sg-node2");
    kernel::veth(n1.ns(), "under0", n2.ns(), "under0").expect("link");
    for (n, v4) in [(&n1, "192.0.2.1/24"), (&n2, "192.0.2.2/24")] {
        kernel::ip(&["-n", n.ns(), "addr", "add", v4, "dev", "under0"]).expect("v4");
    }
    let etcd = EtcdCluster::start_in_on(1, &n1.netns, "192.0.2.1").expect("etcd");
    let put = |key: &str, obj: &Value| {
        etcd.put_get(0, key, &obj.to_string())
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
    };
    let pods = ptp("pods", "1.0.0", &["10.99.0.0/24"], &n1.ipam_dir());
    put(
        &conf::api::CLUSTER_NETWORK.key(None, "pods"),
        &json!({"apiVersion": "plexus.io/v1", "kind": "ClusterNetwork", "metadata": {"name": "pods"},
                "spec": {"config": pods.to_string(), "allowedNamespaces": ["*"]}}),
    );
    let data = json!({"cniVersion": "1.0.0", "type": "plexus-macvlan", "master": "under0",
        "mode": "bridge", "ipam": {"type": "plexus-ipam",
        "ranges": [[{"subnet": "192.168.150.0/24"}], [{"subnet": "fd00:150::/64"}]]}});
    web_and_client(put, &data);
    let list = |n: &Node, name: &str| {
        n.plexus_api_list(
            json!({"endpoints": etcd.endpoints_on(), "timeoutSeconds": 2}),
            name,
        )
    };
    let (l1, l2) = (list(&n1, "node-1"), list(&n2, "node-2"));
    let _agents = (
        n1.start_agent(&l1).expect("agent 1"),
        n2.start_agent(&l2).expect("agent 2"),
    );
    let pod_in = |n: &Node, group: Option<&str>| {
        let (ns, pod) = n.pod("a");
        let mut notes = vec![("k8s.v1.cni.cncf.io/networks", "data")];
        if let Some(g) = group {
            notes.push(("plexus.io/security-groups", g));
        }
        (ns, pod.annotate(&notes))
    };
    let (server_ns, server) = pod_in(&n2, Some("web"));
    n2.runtime.add(&l2, &server).expect("ADD web on node 2");
    let _echo = (
        EchoServer::start_on(&server_ns, OPEN).expect("echo"),
        EchoServer::start_on(&server_ns, SHUT).expect("echo"),
    );
    let (client_ns, client) = pod_in(&n1, Some("client"));
    let (other_ns, other) = pod_in(&n1, None);
    n1.runtime.add(&l1, &client).expect("ADD client on node 1");
    n1.runtime.add(&l1, &other).expect("ADD other on node 1");
    for v6 in [false, true] {
        let ip = addr(&server_ns, "net1", v6);
        within(Duration::from_secs(2), || tcp_ok(&client_ns, ip, OPEN))
            .unwrap_or_else(|| panic!("the client on node 1 reaches {ip} within 2 s"));
        assert!(
            !tcp_ok(&client_ns, ip, SHUT),
            "tcp/{SHUT} to {ip} is dropped"
        );
        assert!(
            !tcp_ok(&other_ns, ip, OPEN),
            "a non-member does not reach {ip}"
        );
    }
    n2.runtime.del(&l2, &server).expect("DEL web");
    n1.runtime.del(&l1, &client).expect("DEL client");
    n1.runtime.del(&l1, &other).expect("DEL other");
    n2.assert_released(&server_ns, "DEL");
    n1.assert_released(&client_ns, "DEL");
    n1.assert_released(&other_ns, "DEL");
}
