//! Many pods at once, as a busy node sees them.

use std::collections::BTreeSet;

use netns_harness::kernel;
use plexus_tests::*;

const PODS: usize = 50;

#[test]
fn fifty_pods_added_concurrently_get_distinct_addresses_and_leave_nothing() {
    let node = Node::new("scale");
    let ipam = node.ipam_dir();
    node.define(
        "data.yaml",
        &nad("data", None, &macvlan("1.0.0", &["192.168.80.0/24"], &ipam)),
    );
    let list = node.plexus_list("1.0.0", ptp("k8s", "1.0.0", &["10.251.0.0/24"], &ipam));
    let before = node.snapshot();
    let pods: Vec<_> = (0..PODS)
        .map(|_| {
            let (ns, pod) = node.pod("default");
            (ns, pod.networks("data"))
        })
        .collect();

    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|(_, pod)| s.spawn(|| node.runtime.add(&list, pod)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    for (i, r) in results.iter().enumerate() {
        assert!(r.is_ok(), "pod {i}: {:?}", r.as_ref().err());
    }
    let mut seen = BTreeSet::new();
    for (ns, _) in &pods {
        for dev in ["eth0", "net1"] {
            let addrs = kernel::addrs(ns.name(), dev).expect("addrs");
            assert_eq!(addrs.len(), 1, "{dev} in {}: {addrs:?}", ns.name());
            assert!(
                seen.insert(addrs[0].clone()),
                "duplicate address {}",
                addrs[0]
            );
        }
    }
    assert_eq!(seen.len(), 2 * PODS);
    assert_eq!(node.leases().len(), 2 * PODS);

    std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|(_, pod)| s.spawn(|| node.runtime.del(&list, pod)))
            .collect();
        for h in handles {
            h.join().expect("thread").expect("DEL");
        }
    });
    assert_eq!(node.snapshot(), before, "the node is as it was");
    assert_eq!(node.leases(), Vec::<String>::new());
    assert_eq!(node.records(), Vec::<String>::new());
    for (ns, _) in &pods {
        let names = kernel::link_names(ns.name()).expect("links");
        assert_eq!(names, vec!["lo".to_string()]);
    }
}
