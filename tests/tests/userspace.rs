//! `plexus-userspace` on a real OVS-DPDK (the harness starts Debian's DPDK
//! build of ovs-vswitchd with its own database and huge pages): vhost-user
//! ports that DPDK pods (dpdk-testpmd on virtio_user) pass packets through,
//! both vhost modes, the pod's description file, DEL, CHECK and GC, and a
//! clear error for every environment that cannot work.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cni::NetConfList;
use netns_harness::ovs::{Dpdk, OvsDpdk, PortCounters, Testpmd};
use netns_harness::scratch::Scratch;
use plexus_tests::*;
use serde_json::{json, Value};

/// A `plexus-userspace` network on `bridge`, the host side in `mode`.
fn userspace(ovs: &OvsDpdk, node: &Node, mode: &str, bridge: &str, subnets: &[&str]) -> Value {
    let container = if mode == "client" { "server" } else { "client" };
    let ranges: Vec<Value> = subnets.iter().map(|s| json!([{"subnet": s}])).collect();
    // plexus-ipam (local store): host-local here speaks CNI 1.0.0 at most,
    // and `socketPath` is a 1.1.0 field.
    json!({
        "cniVersion": "1.1.0",
        "name": format!("dpdk-{mode}"),
        "type": "plexus-userspace",
        "host": {"engine": "ovs-dpdk", "iftype": "vhostuser", "netType": "bridge",
                 "vhost": {"mode": mode}, "bridge": {"bridgeName": bridge}},
        "container": {"engine": "ovs-dpdk", "iftype": "vhostuser", "netType": "interface",
                      "vhost": {"mode": container}},
        "ovsdbSocket": ovs.db_socket(),
        "ovsRunDir": ovs.run_dir(),
        "socketDir": socket_dir(ovs),
        "ipam": {"type": "plexus-ipam", "ranges": ranges, "nodeName": "node-1",
                 "stateDir": state_dir(node)}
    })
}

fn state_dir(node: &Node) -> PathBuf {
    node.scratch.join("ipam-state")
}

/// Addresses `plexus-ipam` holds on the node (its handles).
fn held(node: &Node) -> Vec<String> {
    let Ok(mut store) = ipam::LocalStore::open(&state_dir(node).join("store")) else {
        return Vec::new();
    };
    ipam::Store::range(&mut store, "handles/")
        .map(|kvs| kvs.into_iter().map(|kv| kv.key).collect())
        .unwrap_or_default()
}

fn socket_dir(ovs: &OvsDpdk) -> PathBuf {
    ovs.dir().join("vhost")
}

fn list(conf: &Value) -> NetConfList {
    NetConfList::parse_value(&json!({
        "cniVersion": "1.1.0", "name": conf["name"], "plugins": [conf]
    }))
    .expect("conflist")
}

/// The interface of a result, and the description file next to its socket.
fn attached(result: &Value) -> (PathBuf, Value) {
    let socket = PathBuf::from(
        result["interfaces"][0]["socketPath"]
            .as_str()
            .unwrap_or_else(|| panic!("socketPath in {result}")),
    );
    let stem = socket
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string();
    let desc_path = socket.with_file_name(format!("{stem}.json"));
    let desc: Value = serde_json::from_slice(
        &std::fs::read(&desc_path).unwrap_or_else(|e| panic!("{}: {e}", desc_path.display())),
    )
    .expect("description JSON");
    (socket, desc)
}

/// Each pod's testpmd both sends and receives (within 30 s).
fn sends_and_receives(pods: [(&str, &Testpmd); 2]) {
    for (name, pmd) in pods {
        assert!(
            pmd.wait(Duration::from_secs(30), |c: PortCounters| c.rx > 0
                && c.tx > 0),
            "pod {name} sends and receives: {:?}\n{}",
            pmd.counters(),
            pmd.output()
        );
    }
}

fn ovs_up(tag: &str) -> (Scratch, OvsDpdk) {
    let scratch = Scratch::new(tag).expect("scratch");
    let ovs = OvsDpdk::start(&scratch, Dpdk::On).expect("OVS-DPDK");
    (scratch, ovs)
}

#[test]
fn two_dpdk_pods_pass_packets_through_vhost_user_ports_in_both_modes() {
    let (_s, ovs) = ovs_up("us-traffic");
    let node = Node::new("us-traffic");
    let client_mode = list(&userspace(
        &ovs,
        &node,
        "client",
        "br-pods",
        &["10.60.0.0/24", "fd00:60::/64"],
    ));
    let server_mode = list(&userspace(
        &ovs,
        &node,
        "server",
        "br-pods",
        &["10.61.0.0/24", "fd00:61::/64"],
    ));
    let (a_ns, a) = node.pod("default");
    let (b_ns, b) = node.pod("default");
    let (c_ns, c) = node.pod("default");
    let ra = node
        .runtime
        .add(&client_mode, &a)
        .expect("ADD a (OVS is the client)");
    let rb = node.runtime.add(&server_mode, &b).unwrap_or_else(|e| {
        let log = std::fs::read_to_string(ovs.dir().join("log/vswitchd.log")).unwrap_or_default();
        panic!("ADD b (OVS is the server): {e:?}\nvswitchd.log:\n{log}")
    });
    let (a_sock, a_desc) = attached(&ra);
    let (b_sock, b_desc) = attached(&rb);
    assert_eq!(a_desc["config"]["vhost"]["mode"], "server", "{a_desc}");
    assert_eq!(b_desc["config"]["vhost"]["mode"], "client", "{b_desc}");
    for (desc, want) in [(&a_desc, "10.60.0."), (&b_desc, "10.61.0.")] {
        let ips: Vec<&str> = desc["ipResult"]["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["address"].as_str())
            .collect();
        assert_eq!(ips.len(), 2, "dual stack in the description: {desc}");
        assert!(
            ips[0].starts_with(want) && ips[1].starts_with("fd00:"),
            "{ips:?}"
        );
    }
    assert!(b_sock.exists(), "OVS's socket is in b's directory");
    let ports = ovs.ports("br-pods");
    assert_eq!(ports.len(), 2, "{ports:?}");
    let vsctl_type = ovs
        .vsctl(&[
            "get",
            "Interface",
            a_desc["port"].as_str().unwrap_or(""),
            "type",
        ])
        .expect("type");
    assert_eq!(vsctl_type, "dpdkvhostuserclient");

    let mac = |d: &Value| d["mac"].as_str().unwrap_or_default().to_string();
    let port = |d: &Value| d["port"].as_str().unwrap_or_default().to_string();
    let ovs_counts = |port: &str| {
        let s = ovs.stats(port);
        (
            s.get("rx_packets").copied().unwrap_or(0),
            s.get("tx_packets").copied().unwrap_or(0),
        )
    };
    // ovs-vswitchd writes statistics to its database every 5 s.
    let rises = |port: &str, from: (u64, u64)| {
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            let now = ovs_counts(port);
            if (now.0 > from.0 && now.1 > from.1) || Instant::now() > end {
                return now;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    };

    // Two pods on client-mode ports: counters rise in both pods and on
    // both of OVS's ports.
    let rc = node.runtime.add(&client_mode, &c).expect("ADD c");
    let (c_sock, c_desc) = attached(&rc);
    {
        let pmd_a =
            Testpmd::start(&a_ns, &a_sock, true, &mac(&a_desc), &mac(&c_desc)).expect("testpmd a");
        let pmd_c =
            Testpmd::start(&c_ns, &c_sock, true, &mac(&c_desc), &mac(&a_desc)).expect("testpmd c");
        sends_and_receives([("a", &pmd_a), ("c", &pmd_c)]);
        for d in [&a_desc, &c_desc] {
            let p = port(d);
            let (rx, tx) = rises(&p, (0, 0));
            assert!(
                rx > 0 && tx > 0,
                "OVS counts packets both ways on {p}: {:?}",
                ovs.stats(&p)
            );
        }
        println!(
            "client-client: testpmd a {:?}, c {:?}",
            pmd_a.counters(),
            pmd_c.counters()
        );
    }
    // A client-mode and a server-mode port: packets both ways.
    {
        let before = ovs_counts(&port(&a_desc));
        let pmd_a =
            Testpmd::start(&a_ns, &a_sock, true, &mac(&a_desc), &mac(&b_desc)).expect("testpmd a");
        let pmd_b =
            Testpmd::start(&b_ns, &b_sock, false, &mac(&b_desc), &mac(&a_desc)).expect("testpmd b");
        sends_and_receives([("a", &pmd_a), ("b", &pmd_b)]);
        // OVS 3.1 keeps no counters for dpdkvhostuser ports (ovs-ofctl
        // shows "?"): b's side is its peer's port, whose counters rise.
        let after = rises(&port(&a_desc), before);
        assert!(
            after.0 > before.0 && after.1 > before.1,
            "OVS moved packets between a and b: {before:?} -> {after:?}"
        );
        println!(
            "client-server: testpmd a {:?}, b {:?}",
            pmd_a.counters(),
            pmd_b.counters()
        );
    }

    node.runtime.check(&client_mode, &a).expect("CHECK a");
    node.runtime.check(&server_mode, &b).expect("CHECK b");
    node.runtime.del(&client_mode, &a).expect("DEL a");
    node.runtime.del(&server_mode, &b).expect("DEL b");
    node.runtime.del(&client_mode, &c).expect("DEL c");
    assert!(
        ovs.ports("br-pods").is_empty(),
        "{:?}",
        ovs.ports("br-pods")
    );
    for sock in [&a_sock, &b_sock, &c_sock] {
        assert!(!sock.exists(), "{} removed", sock.display());
        assert!(
            !sock.parent().is_some_and(Path::exists),
            "the pod's directory removed"
        );
    }
    assert!(held(&node).is_empty(), "{:?}", held(&node));
    node.runtime
        .del(&client_mode, &a)
        .expect("a second DEL succeeds");
}

#[test]
fn environments_that_cannot_work_are_refused_and_leave_nothing() {
    let (_s, ovs) = ovs_up("us-faults");
    let node = Node::new("us-faults");
    let good = userspace(&ovs, &node, "client", "br-pods", &["10.62.0.0/24"]);
    let nothing_left = |what: &str| {
        assert!(held(&node).is_empty(), "{what}: leases {:?}", held(&node));
        let dirs: Vec<_> = std::fs::read_dir(socket_dir(&ovs))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            dirs.iter().all(|d| d == "by-pod"),
            "{what}: pod directories {dirs:?}"
        );
        assert!(ovs.ports("br-pods").is_empty(), "{what}: ports");
    };

    // Engines and interface types it does not drive.
    for (field, value, word) in [
        ("/host/engine", "vpp", "vpp"),
        ("/host/iftype", "memif", "memif"),
    ] {
        let mut conf = good.clone();
        *conf.pointer_mut(field).expect("field") = json!(value);
        let (_ns, pod) = node.pod("default");
        let err = node.runtime.add(&list(&conf), &pod).expect_err(value);
        assert_eq!(err.code, 7, "{err:?}");
        assert!(err.msg.contains(word), "{err:?}");
        nothing_left(value);
    }

    // A bridge of the kernel datapath.
    ovs.vsctl(&["add-br", "br-sys"]).expect("a system bridge");
    let mut conf = good.clone();
    conf["host"]["bridge"]["bridgeName"] = json!("br-sys");
    let (_ns, pod) = node.pod("default");
    let err = node
        .runtime
        .add(&list(&conf), &pod)
        .expect_err("not netdev");
    assert_eq!(err.code, 7, "{err:?}");
    assert!(err.msg.contains("netdev"), "{err:?}");
    assert_eq!(ovs.ports("br-sys"), Vec::<String>::new());
    nothing_left("system bridge");

    // ovsdb-server down: ADD fails (try again later), nothing made.
    ovs.stop_db();
    let (_ns, pod) = node.pod("default");
    let err = node.runtime.add(&list(&good), &pod).expect_err("OVS down");
    assert_eq!(err.code, 11, "{err:?}");
    assert!(err.msg.contains("ovsdb-server"), "{err:?}");
    ovs.start_db().expect("ovsdb-server again");
    nothing_left("OVS down");

    // DEL with ovsdb-server down fails and loses nothing; later it works.
    let (_ns, pod) = node.pod("default");
    node.runtime.add(&list(&good), &pod).expect("ADD");
    ovs.stop_db();
    let err = node
        .runtime
        .del(&list(&good), &pod)
        .expect_err("DEL, OVS down");
    assert_eq!(err.code, 11, "{err:?}");
    ovs.start_db().expect("ovsdb-server again");
    assert_eq!(ovs.ports("br-pods").len(), 1, "the port is kept");
    assert_eq!(held(&node).len(), 1, "the address is kept");
    // CHECK finds a port taken away by hand.
    let port = ovs.ports("br-pods").remove(0);
    ovs.vsctl(&["del-port", "br-pods", &port])
        .expect("del-port");
    let err = node.runtime.check(&list(&good), &pod).expect_err("drift");
    assert_eq!(err.code, 100, "{err:?}");
    node.runtime.del(&list(&good), &pod).expect("DEL, OVS back");
    nothing_left("DEL after OVS came back");

    // GC takes this network's ports of gone containers, never another's.
    ovs.vsctl(&[
        "add-port",
        "br-pods",
        "foreign0",
        "--",
        "set",
        "Interface",
        "foreign0",
        "type=dpdkvhostuserclient",
        "options:vhost-server-path=/tmp/foreign0.sock",
    ])
    .expect("a port Plexus did not make");
    let (_ns, stale) = node.pod("default");
    node.runtime.add(&list(&good), &stale).expect("ADD");
    let mut gc_list = list(&good);
    gc_list.cni_version = "1.1.0".into();
    node.runtime.gc(&gc_list, &[]).expect("GC");
    assert_eq!(ovs.ports("br-pods"), vec!["foreign0".to_string()]);
    assert!(held(&node).is_empty(), "GC released: {:?}", held(&node));

    // A switch without DPDK (as on a node without huge pages).
    let plain = OvsDpdk::start(&_s, Dpdk::Off).expect("OVS without DPDK");
    let conf = userspace(&plain, &node, "client", "br-pods", &["10.63.0.0/24"]);
    let (_ns, pod) = node.pod("default");
    let err = node.runtime.add(&list(&conf), &pod).expect_err("no DPDK");
    assert_eq!(err.code, 11, "{err:?}");
    assert!(err.msg.contains("DPDK"), "{err:?}");
    assert!(held(&node).is_empty());
    assert_eq!(
        node.runtime.status(&list(&conf)).expect_err("STATUS").code,
        50
    );
}

#[test]
fn under_plexus_a_pod_gets_the_cluster_network_and_a_vhost_user_port() {
    let (_s, ovs) = ovs_up("us-meta");
    let node = Node::new("us-meta");
    let ipam = node.ipam_dir();
    let plexus = node.plexus_list("1.1.0", ptp("pods", "1.0.0", &["10.64.0.0/24"], &ipam));
    let dpdk = userspace(
        &ovs,
        &node,
        "client",
        "br-pods",
        &["10.65.0.0/24", "fd00:65::/64"],
    );
    node.define("dpdk.yaml", &nad("dpdk", Some("default"), &dpdk));
    let (ns, pod) = node.pod("default");
    let pod = pod.networks("dpdk");
    let result = node.runtime.add(&plexus, &pod).expect("ADD");
    let ifaces = result["interfaces"].as_array().cloned().unwrap_or_default();
    let vhost = ifaces
        .iter()
        .find(|i| i["socketPath"].is_string())
        .unwrap_or_else(|| panic!("a vhost-user interface in {result}"));
    assert_eq!(vhost["name"], "net1");
    let socket = PathBuf::from(vhost["socketPath"].as_str().unwrap_or_default());
    let dir = socket.parent().map(Path::to_path_buf).unwrap_or_default();
    assert!(
        dir.join("net1.json").exists(),
        "description next to the socket"
    );
    // The pod finds its directory by name.
    let by_pod = socket_dir(&ovs)
        .join("by-pod")
        .join("default")
        .join(&pod.name);
    assert_eq!(
        by_pod.canonicalize().expect("by-pod link"),
        dir.canonicalize().expect("dir")
    );
    assert_eq!(ovs.ports("br-pods").len(), 1);
    node.runtime.check(&plexus, &pod).expect("CHECK");
    node.runtime.del(&plexus, &pod).expect("DEL");
    assert!(ovs.ports("br-pods").is_empty());
    assert!(!dir.exists() && !by_pod.exists());
    node.assert_released(&ns, "DEL");
}

/// What `pod` left: ports on the bridge, files in the socket directory,
/// addresses, journaled releases.
fn userspace_leaks(
    ovs: &OvsDpdk,
    node: &Node,
    bridge: &str,
    pod: &netns_harness::Pod,
) -> Vec<String> {
    let mut out: Vec<String> = ovs
        .ports(bridge)
        .into_iter()
        .map(|p| format!("port {p} on {bridge}"))
        .collect();
    let short: String = pod.container_id.chars().take(12).collect();
    if socket_dir(ovs).join(&short).exists() {
        out.push(format!("pod directory {short}"));
    }
    let by_pod = socket_dir(ovs)
        .join("by-pod")
        .join(&pod.namespace)
        .join(&pod.name);
    if std::fs::symlink_metadata(&by_pod).is_ok() {
        out.push(format!("link {}", by_pod.display()));
    }
    out.extend(held(node).into_iter().map(|h| format!("IPAM handle {h}")));
    let journal = std::fs::read_dir(state_dir(node).join("journal"))
        .map(|d| d.count())
        .unwrap_or(0);
    if journal > 0 {
        out.push(format!("{journal} journaled releases"));
    }
    out
}

/// `plexus-userspace` killed (SIGKILL, debug builds' crash points) at every
/// step of ADD and DEL that a traced run names; after each kill, DEL with the
/// netns, DEL once it is gone, or GC alone leaves no port, file, address or
/// journal entry. The test prints the matrix.
#[test]
fn killed_at_every_step_of_add_and_del_nothing_is_left() {
    let (_s, ovs) = ovs_up("us-crash");
    let node = Node::new("us-crash");
    let bridge = "br-crash";
    let conf = list(&userspace(&ovs, &node, "client", bridge, &["10.64.0.0/24"]));
    let runtime = |env: &[(&str, &str)]| node.runtime.with_env(&node.netns, env).expect("runtime");
    let trace = node.scratch.join("trace");
    let steps = |what: &dyn Fn(&netns_harness::Runtime)| {
        let _ = std::fs::remove_file(&trace);
        what(&runtime(&[(
            "PLEXUS_CRASH_TRACE",
            &trace.display().to_string(),
        )]));
        let text = std::fs::read_to_string(&trace).unwrap_or_default();
        let mut seen = std::collections::BTreeSet::new();
        text.lines()
            .filter(|l| seen.insert(l.to_string()))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let add_steps = steps(&|rt| {
        let (_ns, pod) = node.pod("default");
        rt.add(&conf, &pod).expect("traced ADD");
        node.runtime.del(&conf, &pod).expect("DEL");
    });
    let del_steps = steps(&|rt| {
        let (_ns, pod) = node.pod("default");
        node.runtime.add(&conf, &pod).expect("ADD");
        rt.del(&conf, &pod).expect("traced DEL");
    });
    assert!(
        add_steps.iter().any(|s| s.starts_with("userspace."))
            && del_steps.iter().any(|s| s.starts_with("userspace.")),
        "{add_steps:?} {del_steps:?}"
    );
    let mut table = String::from(
        "\nkilled at                          DEL with netns  DEL without netns  GC only\n",
    );
    let mut all = Vec::new();
    for (cmd, steps) in [("ADD", &add_steps), ("DEL", &del_steps)] {
        for step in steps {
            let crashing = runtime(&[("PLEXUS_CRASH_AT", step)]);
            let mut row = Vec::new();
            for how in 0..3 {
                let (ns, pod) = node.pod("default");
                let killed = if cmd == "ADD" {
                    crashing.add(&conf, &pod).is_err()
                } else {
                    node.runtime.add(&conf, &pod).expect("ADD before DEL");
                    crashing.del(&conf, &pod).is_err()
                };
                let mut leaks = Vec::new();
                if !killed {
                    leaks.push(format!("not killed at {step}"));
                }
                let cleaned = match how {
                    0 => node.runtime.del(&conf, &pod),
                    1 => {
                        drop(ns);
                        node.runtime.del_without_netns(&conf, &pod)
                    }
                    _ => {
                        drop(ns);
                        Ok(())
                    }
                };
                if let Err(e) = cleaned.and_then(|()| node.runtime.gc(&conf, &[])) {
                    leaks.push(format!("cleanup failed: {e}"));
                }
                leaks.extend(userspace_leaks(&ovs, &node, bridge, &pod));
                row.push(leaks.len());
                all.extend(
                    leaks
                        .into_iter()
                        .map(|l| format!("{cmd} {step} cleanup {how}: {l}")),
                );
            }
            table += &format!(
                "{:34} {:>14}  {:>17}  {:>7}\n",
                format!("{cmd} {step}"),
                row[0],
                row[1],
                row[2]
            );
        }
    }
    eprintln!("{table}leaks found after each kill and cleanup (all must be 0)");
    assert!(all.is_empty(), "{}", all.join("\n"));
    let (_ns, pod) = node.pod("default");
    node.runtime.add(&conf, &pod).expect("ADD after the kills");
    node.runtime.del(&conf, &pod).expect("DEL");
    assert_eq!(
        userspace_leaks(&ovs, &node, bridge, &pod),
        Vec::<String>::new()
    );
}
