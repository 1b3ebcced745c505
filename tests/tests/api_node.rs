//! The node side of the central API: the meta-plugin reads definitions from
//! the API's etcd (a real one, inside the node netns), enforces tenant scope
//! and `allowedNamespaces`, writes and removes Attachment records, and keeps
//! working from its local copy and journal while etcd is down.

use std::collections::BTreeMap;

use cni::config::Attachment;
use conf::api::ATTACHMENT;
use netns_harness::{kernel, Netns, Pod};
use plexus_tests::*;
use serde_json::{json, Value};

/// The pod's links, sorted.
fn links(ns: &Netns) -> Vec<String> {
    let mut names = kernel::link_names(ns.name()).expect("links");
    names.sort();
    names
}

/// A MACVLAN network on the node uplink.
fn data_net(node: &Node, subnet: &str) -> Value {
    macvlan("1.0.0", &[subnet], &node.ipam_dir())
}

#[test]
fn pods_attach_from_api_definitions_and_are_recorded() {
    let n = ApiNode::new("api-add");
    n.nad("a", "data", &data_net(&n.node, "192.168.70.0/24"));
    let fast = data_net(&n.node, "192.168.71.0/24");
    n.cluster_network("fast", &fast, &["a", "c"]);

    let (ns_a, pod_a) = n.node.pod("a");
    let pod_a = pod_a.networks("data,fast@fast0");
    let (ns_c, pod_c) = n.node.pod("c");
    let pod_c = pod_c.networks("fast");
    n.node.runtime.add(&n.list, &pod_a).expect("ADD a");
    n.node.runtime.add(&n.list, &pod_c).expect("ADD c");
    let names = links(&ns_a);
    assert_eq!(names, vec!["eth0", "fast0", "lo", "net1"]);
    assert_eq!(links(&ns_c), vec!["eth0", "lo", "net1"]);

    // One record per interface, as the kernel has it.
    let records = n.attachments();
    assert_eq!(records.len(), 5, "{records:#?}");
    for (ns, pod, ifname, network, kind) in [
        (&ns_a, &pod_a, "eth0", "pods", "ClusterNetwork"),
        (
            &ns_a,
            &pod_a,
            "net1",
            "a/data",
            "NetworkAttachmentDefinition",
        ),
        (&ns_a, &pod_a, "fast0", "fast", "ClusterNetwork"),
        (&ns_c, &pod_c, "net1", "fast", "ClusterNetwork"),
    ] {
        let key = ApiNode::key(pod, ifname);
        let obj = records.get(&key).unwrap_or_else(|| panic!("no {key}"));
        assert_eq!(obj["kind"], "Attachment");
        assert_eq!(obj["metadata"]["namespace"], pod.namespace.as_str());
        assert_eq!(obj["metadata"]["labels"]["plexus.io/node"], NODE);
        let spec = &obj["spec"];
        assert_eq!(spec["pod"], pod.name.as_str());
        assert_eq!(spec["node"], NODE);
        assert_eq!(spec["containerId"], pod.container_id.as_str());
        assert_eq!(spec["interface"], ifname);
        assert_eq!(spec["network"], network, "{key}");
        assert_eq!(spec["networkKind"], kind, "{key}");
        let link = kernel::link(ns.name(), ifname)
            .expect("link")
            .expect(ifname);
        assert_eq!(spec["mac"], link.mac.as_str(), "{key}");
        assert_eq!(
            spec["addresses"],
            json!(kernel::addrs(ns.name(), ifname).expect("addrs")),
            "{key}"
        );
    }

    n.node.runtime.del(&n.list, &pod_a).expect("DEL a");
    n.node.runtime.del(&n.list, &pod_c).expect("DEL c");
    assert_eq!(n.attachments(), BTreeMap::new());
    n.node.assert_released(&ns_a, "after DEL");
    n.node.assert_released(&ns_c, "after DEL");
}

/// ADD fails with code 7, naming the network and the namespaces, and leaves
/// nothing behind: no link, lease, record or Attachment.
fn refused(n: &ApiNode, ns: &Netns, pod: &Pod, words: &[&str]) {
    let err = n.node.runtime.add(&n.list, pod).expect_err("ADD refused");
    assert_eq!(err.code, 7, "{err:?}");
    for w in words {
        assert!(err.msg.contains(w), "{w:?} in {}", err.msg);
    }
    n.node.assert_released(ns, &err.msg);
    assert_eq!(n.attachments(), BTreeMap::new());
}

#[test]
fn tenant_and_allowed_namespaces_are_enforced() {
    let n = ApiNode::new("api-scope");
    n.nad("a", "data", &data_net(&n.node, "192.168.72.0/24"));
    n.cluster_network("fast", &data_net(&n.node, "192.168.73.0/24"), &["a"]);
    let (ns, pod) = n.node.pod("b");
    refused(
        &n,
        &ns,
        &pod.clone().networks("a/data"),
        &["a/data", "\"a\"", "\"b\""],
    );
    refused(
        &n,
        &ns,
        &pod.clone().networks(r#"[{"name":"data","namespace":"a"}]"#),
        &["a/data"],
    );
    refused(&n, &ns, &pod.clone().networks("fast"), &["fast", "\"b\""]);
    // b has no "data" of its own, and a's is not a cluster network.
    refused(&n, &ns, &pod.networks("data"), &["\"data\" not found"]);
}

#[test]
fn with_etcd_down_add_uses_the_local_copy_and_records_are_replayed() {
    let mut n = ApiNode::new("api-down");
    n.nad("a", "data", &data_net(&n.node, "192.168.74.0/24"));
    let (_ns1, pod1) = n.node.pod("a");
    let pod1 = pod1.networks("data");
    let (ns2, pod2) = n.node.pod("a");
    let pod2 = pod2.networks("data");
    n.node.runtime.add(&n.list, &pod1).expect("ADD 1");
    n.node.runtime.add(&n.list, &pod2).expect("ADD 2");
    assert_eq!(n.attachments().len(), 4);

    n.etcd.stop_member(0).expect("stop etcd");
    // A pod on networks the node already read: from the local copy.
    let (ns3, pod3) = n.node.pod("a");
    let pod3 = pod3.networks("data");
    n.node
        .runtime
        .add(&n.list, &pod3)
        .expect("ADD with etcd down, from the local copy");
    assert_eq!(links(&ns3), vec!["eth0", "lo", "net1"]);
    let log = n.log();
    assert!(
        log.contains("unreachable") && log.contains("local copy") && log.contains("ago"),
        "{log}"
    );
    // A network the copy does not have: try again later, naming etcd.
    let (ns4, pod4) = n.node.pod("a");
    let err = n
        .node
        .runtime
        .add(&n.list, &pod4.networks("other"))
        .expect_err("unknown network with etcd down");
    assert_eq!(err.code, 11, "{err:?}");
    assert!(err.msg.contains(&n.etcd.endpoints()[0]), "{}", err.msg);
    assert_eq!(links(&ns4), vec!["lo"]);
    // DEL works, and keeps the removal of its records for later, as ADD kept
    // pod 3's records.
    n.node
        .runtime
        .del(&n.list, &pod2)
        .expect("DEL with etcd down");
    assert_eq!(links(&ns2), vec!["lo"]);
    let journal = n.node.plexus_cache().join("api/journal");
    assert_eq!(std::fs::read_dir(&journal).expect("journal").count(), 2);

    n.etcd.restart_member(0).expect("restart etcd");
    assert_eq!(n.attachments().len(), 4, "pod 2's records wait for replay");
    // The next call that reaches etcd replays the journal.
    n.node.runtime.del(&n.list, &pod1).expect("DEL 1");
    let left: Vec<String> = n.attachments().into_keys().collect();
    let mut pod3_keys = vec![ApiNode::key(&pod3, "eth0"), ApiNode::key(&pod3, "net1")];
    pod3_keys.sort();
    assert_eq!(left, pod3_keys);
    assert_eq!(std::fs::read_dir(&journal).expect("journal").count(), 0);
    n.node.runtime.del(&n.list, &pod3).expect("DEL 3");
    assert_eq!(n.attachments(), BTreeMap::new());
    n.node.assert_released(&ns3, "after DEL");
}

#[test]
fn gc_removes_this_nodes_stale_records_only() {
    let n = ApiNode::new("api-gc");
    let (ns1, pod1) = n.node.pod("a");
    let (ns2, pod2) = n.node.pod("a");
    n.node.runtime.add(&n.list, &pod1).expect("ADD 1");
    n.node.runtime.add(&n.list, &pod2).expect("ADD 2");
    // Another node's record of a sandbox this node never had.
    let foreign = ATTACHMENT.key(Some("a"), "elsewhere-eth0-deadbeef");
    n.put(
        &foreign,
        &json!({"apiVersion": "plexus.io/v1", "kind": "Attachment",
            "metadata": {"name": "elsewhere-eth0-deadbeef", "namespace": "a",
                         "labels": {"plexus.io/node": "node-2"}},
            "spec": {"pod": "elsewhere", "node": "node-2", "containerId": "deadbeef",
                     "interface": "eth0", "network": "pods"}}),
    );
    assert_eq!(n.attachments().len(), 3);

    let valid = [Attachment {
        container_id: pod1.container_id.clone(),
        ifname: "eth0".into(),
    }];
    n.node.runtime.gc(&n.list, &valid).expect("GC");
    let left: Vec<String> = n.attachments().into_keys().collect();
    assert_eq!(left, {
        let mut want = vec![ApiNode::key(&pod1, "eth0"), foreign];
        want.sort();
        want
    });
    assert_eq!(links(&ns2), vec!["lo"]);
    n.node.runtime.del(&n.list, &pod1).expect("DEL 1");
    n.node.assert_released(&ns1, "after DEL");
}

/// ADD answers before its Attachment records are written (a process of its
/// own writes them); the pod's DEL removes them only once they are written,
/// never before, so that none is left behind.
#[test]
fn records_are_written_after_add_answers_and_del_waits_for_them() {
    let n = ApiNode::new("api-publish");
    n.nad("a", "data", &data_net(&n.node, "192.168.75.0/24"));

    // DEL straight after ADD, nothing waited for in between.
    for _ in 0..5 {
        let (ns, pod) = n.node.pod("a");
        let pod = pod.networks("data");
        n.node.runtime.add(&n.list, &pod).expect("ADD");
        n.node.runtime.del(&n.list, &pod).expect("DEL");
        n.node.assert_released(&ns, "ADD then DEL at once");
    }
    assert_eq!(n.attachments(), BTreeMap::new());

    // A publisher that has not written yet (held here, as a stalled one
    // would hold its request): DEL waits for it, then removes the records.
    let (ns, pod) = n.node.pod("a");
    let pod = pod.networks("data");
    n.node.runtime.add(&n.list, &pod).expect("ADD");
    assert_eq!(n.attachments().len(), 2);
    let publishing = n.node.plexus_cache().join("api/publishing");
    let request = publishing.join(format!("{}-eth0.json", pod.container_id));
    let held = std::fs::File::create(&request).expect("request file");
    let held = nix::fcntl::Flock::lock(held, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock the request");
    std::thread::scope(|s| {
        let del = s.spawn(|| n.node.runtime.del(&n.list, &pod));
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert!(!del.is_finished(), "DEL did not wait for the publisher");
        let left = n
            .etcd
            .etcdctl(
                0,
                &["get", "--prefix", "--keys-only", &ATTACHMENT.prefix(None)],
            )
            .expect("etcdctl");
        assert_eq!(left.lines().filter(|l| !l.is_empty()).count(), 2, "{left}");
        drop(held);
        del.join().expect("DEL thread").expect("DEL");
    });
    assert_eq!(n.attachments(), BTreeMap::new());
    assert!(!request.exists(), "the request is removed");
    n.node.assert_released(&ns, "after DEL");
    let log = n.log();
    assert!(!log.contains("not written"), "{log}");
}

/// ADD plans from the local copy while etcd is read beside it; when etcd
/// holds something else by then, ADD undoes what it attached and attaches
/// again from etcd: a changed network, a revoked `allowedNamespaces` and a
/// network the copy has never seen all end as if ADD had waited for etcd.
#[test]
fn definitions_changed_since_the_local_copy_are_attached_from_etcd() {
    let n = ApiNode::new("api-changed");
    n.nad("a", "data", &data_net(&n.node, "192.168.76.0/24"));
    n.cluster_network("fast", &data_net(&n.node, "192.168.77.0/24"), &["a"]);
    // Pod 1 fills the copy with namespace a's definitions.
    let (_ns1, pod1) = n.node.pod("a");
    let pod1 = pod1.networks("data,fast@fast0");
    n.node.runtime.add(&n.list, &pod1).expect("ADD 1");
    assert_eq!(
        kernel::addrs(_ns1.name(), "net1").expect("addrs")[0],
        "192.168.76.2/24"
    );

    // The network changes: pod 2 gets the new subnet, nothing of the old.
    n.nad("a", "data", &data_net(&n.node, "192.168.78.0/24"));
    let (ns2, pod2) = n.node.pod("a");
    let pod2 = pod2.networks("data");
    n.node.runtime.add(&n.list, &pod2).expect("ADD 2");
    let net1: Vec<String> = kernel::addrs(ns2.name(), "net1").expect("addrs");
    assert!(
        net1.iter().any(|a| a.starts_with("192.168.78.")) && net1.len() == 1,
        "{net1:?}"
    );
    let log = n.log();
    assert!(log.contains("definitions changed during ADD"), "{log}");
    let leases = n.node.leases();
    assert_eq!(
        leases.iter().filter(|l| l.contains("192.168.76.")).count(),
        1,
        "only pod 1 holds an address of the old subnet: {leases:?}"
    );

    // The admin takes "fast" from namespace a: refused, nothing left.
    n.cluster_network("fast", &data_net(&n.node, "192.168.77.0/24"), &["c"]);
    let (ns3, pod3) = n.node.pod("a");
    let err = n
        .node
        .runtime
        .add(&n.list, &pod3.clone().networks("fast"))
        .expect_err("fast is no longer a's");
    assert_eq!(err.code, 7, "{err:?}");
    assert_eq!(links(&ns3), vec!["lo"]);

    // A network defined after the copy was made: found in etcd.
    n.nad("a", "fresh", &data_net(&n.node, "192.168.79.0/24"));
    let pod3 = pod3.networks("fresh");
    n.node
        .runtime
        .add(&n.list, &pod3)
        .expect("ADD 3 on a new network");
    assert_eq!(links(&ns3), vec!["eth0", "lo", "net1"]);

    for pod in [&pod1, &pod2, &pod3] {
        n.node.runtime.del(&n.list, pod).expect("DEL");
    }
    assert_eq!(n.attachments(), BTreeMap::new());
    n.node.assert_released(&ns2, "after DEL");
}

/// With the node's store relay named in `api`, ADD's read of the definitions
/// beside the delegates goes over the relay's open connection; with the
/// relay gone, straight to etcd, and ADD works the same.
#[test]
fn definitions_are_read_through_the_nodes_store_relay_while_one_answers() {
    let n = ApiNode::new("api-relay");
    let socket = n.node.scratch.join("store.sock");
    let mut relay =
        netns_harness::relay::StoreRelay::start_in(&n.node.netns, &socket).expect("store relay");
    let mut list = n.node.plexus_api_list(
        json!({"endpoints": n.etcd.endpoints(), "timeoutSeconds": 1, "relay": socket}),
        NODE,
    );
    if let Some(p) = list.plugins.first_mut() {
        p.insert("logLevel".into(), json!("debug"));
    }
    let last_read = |n: &ApiNode| -> String {
        n.log()
            .lines()
            .rev()
            .find(|l| l.contains("definitions read beside the delegates"))
            .unwrap_or_default()
            .to_string()
    };

    // The first ADD waits for its read (no local copy yet); the next reads
    // beside the delegates, through the relay.
    let (ns_a, pod_a) = n.node.pod("default");
    n.node.runtime.add(&list, &pod_a).expect("ADD a");
    let (ns_b, pod_b) = n.node.pod("default");
    n.node.runtime.add(&list, &pod_b).expect("ADD b");
    let read = last_read(&n);
    assert!(read.contains("store=\"etcd via the relay\""), "{read}");
    assert!(
        read.contains(&pod_b.container_id),
        "the call's own line: {read}"
    );

    // The relay gone: straight to etcd.
    relay.kill();
    let (ns_c, pod_c) = n.node.pod("default");
    n.node.runtime.add(&list, &pod_c).expect("ADD c, no relay");
    let read = last_read(&n);
    assert!(read.contains("store=\"etcd\""), "{read}");
    assert_eq!(n.attachments().len(), 3);

    for pod in [&pod_a, &pod_b, &pod_c] {
        n.node.runtime.del(&list, pod).expect("DEL");
    }
    for ns in [&ns_a, &ns_b, &ns_c] {
        n.node.assert_released(ns, "after DEL");
    }
    assert_eq!(n.attachments(), BTreeMap::new());
}
