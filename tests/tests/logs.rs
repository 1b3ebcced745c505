//! What an operator reads in Plexus' log file: one line per CNI call naming
//! the pod, its networks and the outcome; every line of a call carrying its
//! container id; debug lines for each delegate, IPAM answer, netlink change
//! and record; rotation by size; JSON lines. And the Multus-style names of
//! cluster definitions (`default/macnet`).

use netns_harness::{kernel, Pod};
use plexus_tests::*;
use serde_json::{json, Value};

fn node_with(tag: &str, extra: &[(&str, Value)]) -> (Node, cni::NetConfList) {
    let node = Node::new(tag);
    let ipam = node.ipam_dir();
    let mut list = node.plexus_list("1.0.0", ptp("pods", "1.0.0", &["10.90.0.0/24"], &ipam));
    for (k, v) in extra {
        list.plugins[0].insert(k.to_string(), v.clone());
    }
    (node, list)
}

fn log(node: &Node) -> String {
    std::fs::read_to_string(node.log_file()).unwrap_or_default()
}

/// The lines of the log written since `from` bytes.
fn lines_since(node: &Node, from: usize) -> Vec<String> {
    log(node)
        .get(from..)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn every_refusal_is_one_line_naming_pod_network_and_reason() {
    let (node, list) = node_with("log-refusals", &[]);
    let ipam = node.ipam_dir();
    node.define(
        "data.yaml",
        &nad(
            "data",
            Some("a"),
            &macvlan("1.0.0", &["192.168.90.0/24"], &ipam),
        ),
    );
    node.define(
        "broken.yaml",
        "metadata: {name: broken}\nspec: {config: '{\"type\": '}\n",
    );
    // (annotation, pod namespace, network named in the line, reason words)
    let cases: [(&str, &str, &str, &str); 5] = [
        ("nosuch", "a", "nosuch", "not found"),
        ("a/data", "b", "a/data", "\"a\""),
        (
            "[{\"name\": 5}]",
            "a",
            "unreadable networks annotation",
            "annotation",
        ),
        ("broken", "a", "broken", "broken.yaml"),
        (
            r#"[{"name":"data","mac":"02:00:00:00:00:09"}]"#,
            "a",
            "data",
            "capability",
        ),
    ];
    for (annotation, ns, network, reason) in cases {
        let before = log(&node).len();
        let (pod_ns, pod) = node.pod(ns);
        let pod = pod.networks(annotation);
        let err = node.runtime.add(&list, &pod).expect_err(annotation);
        node.assert_released(&pod_ns, annotation);
        let lines = lines_since(&node, before);
        let failed: Vec<&String> = lines.iter().filter(|l| l.contains("ADD failed")).collect();
        assert_eq!(failed.len(), 1, "{annotation}: {lines:#?}");
        let line = failed[0];
        for want in [
            format!("pod={ns}/{}", pod.name),
            network.to_string(),
            reason.to_string(),
            format!("code={}", err.code),
            format!("container={}", pod.container_id),
        ] {
            assert!(line.contains(&want), "{annotation}: {want:?} in {line}");
        }
    }
}

#[test]
fn two_teardowns_at_once_are_told_apart_and_a_second_del_says_so_once() {
    let (node, list) = node_with("log-two", &[("logLevel", json!("debug"))]);
    let ipam = node.ipam_dir();
    node.define(
        "data.yaml",
        &nad(
            "data",
            Some("a"),
            &macvlan("1.0.0", &["192.168.91.0/24"], &ipam),
        ),
    );
    let (ns1, p1) = node.pod("a");
    let (ns2, p2) = node.pod("a");
    let (p1, p2) = (p1.networks("data"), p2.networks("data"));
    node.runtime.add(&list, &p1).expect("ADD 1");
    node.runtime.add(&list, &p2).expect("ADD 2");
    let before = log(&node).len();
    std::thread::scope(|s| {
        let a = s.spawn(|| node.runtime.del(&list, &p1));
        let b = s.spawn(|| node.runtime.del(&list, &p2));
        a.join().expect("thread").expect("DEL 1");
        b.join().expect("thread").expect("DEL 2");
    });
    let lines = lines_since(&node, before);
    assert!(lines.len() >= 4, "{lines:#?}");
    let of = |p: &Pod| {
        lines
            .iter()
            .filter(|l| l.contains(&format!("container={}", p.container_id)))
            .count()
    };
    assert_eq!(
        of(&p1) + of(&p2),
        lines.len(),
        "every line names its pod: {lines:#?}"
    );
    assert!(of(&p1) >= 2 && of(&p2) >= 2, "{lines:#?}");
    for p in [&p1, &p2] {
        let done: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains(&p.container_id) && l.contains(" DEL "))
            .collect();
        assert!(
            done.iter()
                .any(|l| l.contains("outcome=\"ok\"") || l.contains("outcome=ok")),
            "{done:#?}"
        );
    }
    node.assert_released(&ns1, "DEL 1");
    node.assert_released(&ns2, "DEL 2");

    // containerd's second DEL: one line, nothing run again.
    let before = log(&node).len();
    node.runtime.del(&list, &p1).expect("second DEL");
    let lines = lines_since(&node, before);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("already detached"), "{}", lines[0]);
}

#[test]
fn a_debug_add_shows_each_delegate_ipam_netlink_and_record_step_with_durations() {
    let (node, list) = node_with("log-debug", &[("logLevel", json!("debug"))]);
    let ipam = node.ipam_dir();
    let veth = plexus_veth("pods", &["10.91.0.0/24"], &ipam);
    let mut list = list;
    list.plugins[0].insert("clusterNetwork".into(), veth);
    let data = json!({"cniVersion": "1.0.0", "type": "plexus-macvlan", "master": UPLINK,
        "mode": "bridge", "ipam": {"type": "host-local", "dataDir": ipam,
        "ranges": [[{"subnet": "192.168.92.0/24"}]]}});
    node.define("data.yaml", &nad("data", Some("a"), &data));
    let (ns, pod) = node.pod("a");
    let pod = pod.networks("data");
    let before = log(&node).len();
    node.runtime.add(&list, &pod).expect("ADD");
    let lines = lines_since(&node, before);
    let with = |words: &[&str]| {
        lines
            .iter()
            .filter(|l| words.iter().all(|w| l.contains(w)) && l.contains("duration_ms="))
            .count()
    };
    // Each delegate, and each IPAM plugin, with how it ran and how long.
    assert_eq!(
        with(&["plugin ok", "plugin=\"plexus-veth\"", "ifname=eth0"]),
        1,
        "{lines:#?}"
    );
    assert_eq!(
        with(&["plugin ok", "plugin=\"plexus-macvlan\"", "ifname=net1"]),
        1,
        "{lines:#?}"
    );
    assert_eq!(
        with(&["plugin ok", "plugin=\"host-local\"", "exec'd"]),
        2,
        "{lines:#?}"
    );
    let answers = lines.iter().filter(|l| l.contains("IPAM answered")).count();
    assert_eq!(answers, 2, "{lines:#?}");
    assert!(lines
        .iter()
        .any(|l| l.contains("IPAM answered") && l.contains("192.168.92.")));
    assert!(with(&["netlink", "create veth"]) >= 1, "{lines:#?}");
    assert!(
        with(&["netlink", "create macvlan net1 (mode bridge)"]) >= 1,
        "{lines:#?}"
    );
    assert!(with(&["netlink", "add address"]) >= 2, "{lines:#?}");
    assert!(with(&["record written"]) >= 2, "{lines:#?}");
    // And the call's own line, at info, naming both networks.
    let summary: Vec<&String> = lines.iter().filter(|l| l.contains(" INFO ")).collect();
    assert_eq!(summary.len(), 1, "{summary:#?}");
    assert!(summary[0].contains("pods@eth0") && summary[0].contains("a/data@net1"));
    assert!(
        lines.iter().all(|l| l.contains(&pod.container_id)),
        "{lines:#?}"
    );
    node.runtime.del(&list, &pod).expect("DEL");
    node.assert_released(&ns, "DEL");
}

#[test]
fn the_log_rotates_by_size_and_json_lines_parse() {
    let max = 0.002; // MB: about 2 KiB
    let (node, list) = node_with(
        "log-rotate",
        &[("logMaxSizeMB", json!(max)), ("logMaxBackups", json!(2))],
    );
    for _ in 0..20 {
        let (ns, pod) = node.pod("a");
        node.runtime.add(&list, &pod).expect("ADD");
        node.runtime.del(&list, &pod).expect("DEL");
        node.assert_released(&ns, "DEL");
    }
    let file = node.log_file();
    let size = |n: Option<u32>| {
        let mut p = file.as_os_str().to_owned();
        if let Some(n) = n {
            p.push(format!(".{n}"));
        }
        std::fs::metadata(&p).map(|m| m.len())
    };
    let limit = (max * 1024.0 * 1024.0) as u64;
    assert!(size(None).expect("log") <= limit, "{:?}", size(None));
    assert!(size(Some(1)).expect("log.1") <= limit);
    assert!(size(Some(2)).expect("log.2") > limit / 2);
    assert!(size(Some(3)).is_err(), "two backups only");

    // JSON lines: one object per line, the call's span in each.
    let (node, list) = node_with("log-json", &[("logFormat", json!("json"))]);
    let (ns, pod) = node.pod("a");
    node.runtime.add(&list, &pod).expect("ADD");
    node.runtime.del(&list, &pod).expect("DEL");
    node.assert_released(&ns, "DEL");
    let objects: Vec<Value> = log(&node)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(objects.len(), 2, "{objects:#?}");
    for (o, cmd) in objects.iter().zip(["ADD", "DEL"]) {
        assert_eq!(o["span"]["container"], pod.container_id.as_str(), "{o}");
        assert_eq!(o["span"]["cmd"], cmd, "{o}");
        assert_eq!(o["fields"]["pod"], format!("a/{}", pod.name), "{o}");
        assert!(o["fields"]["duration_ms"].is_number(), "{o}");
    }
    // A bad format is refused, naming the field.
    let mut bad = list.clone();
    bad.plugins[0].insert("logFormat".into(), json!("xml"));
    let (_ns, pod) = node.pod("a");
    let err = node.runtime.add(&bad, &pod).expect_err("xml");
    assert!(err.msg.contains("logFormat"), "{err:?}");
}

#[test]
fn multus_style_names_attach_the_cluster_definition() {
    let (node, list) = node_with("log-multus", &[]);
    let ipam = node.ipam_dir();
    node.define(
        "macnet.yaml",
        &nad(
            "macnet",
            None,
            &macvlan("1.0.0", &["192.168.93.0/24"], &ipam),
        ),
    );
    for annotation in [
        "default/macnet",
        r#"[{"name":"macnet","namespace":"default"}]"#,
    ] {
        let (ns, pod) = node.pod("tenant");
        let pod = pod.networks(annotation);
        node.runtime.add(&list, &pod).expect(annotation);
        let addrs = kernel::addrs(ns.name(), "net1").expect("net1");
        assert!(
            addrs.iter().any(|a| a.starts_with("192.168.93.")),
            "{addrs:?}"
        );
        node.runtime.del(&list, &pod).expect("DEL");
        node.assert_released(&ns, annotation);
    }
}
