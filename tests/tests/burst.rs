//! A burst: 200 pods ADDed at once on one node, the built-ins with
//! `plexus-ipam` on a real etcd. Every ADD succeeds or fails with an error
//! the runtime retries (code 11); no address is handed out twice; the peak
//! memory of all Plexus processes together is measured and bounded; DEL of
//! all of them at once leaves no handle in etcd and no record.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;

use netns_harness::etcd::EtcdCluster;
use plexus_tests::*;
use serde_json::{json, Value};

const PODS: usize = 200;

fn addresses(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str().map(String::from))
        .collect()
}

#[test]
fn two_hundred_pods_at_once_get_distinct_addresses_or_a_retryable_error() {
    let node = Node::new("burst");
    let etcd = EtcdCluster::start_in(1, &node.netns).expect("etcd");
    let cluster = json!({
        "cniVersion": "1.0.0", "name": "pods", "type": "plexus-veth",
        "ipam": plexus_ipam_on_etcd(
            &["10.90.0.0/16", "fd00:90::/64"],
            &etcd.endpoints(),
            "node-1",
            &node.scratch.join("ipam-state"),
        )
    });
    let list = node.plexus_list("1.0.0", cluster);
    let pods: Vec<_> = (0..PODS).map(|_| node.pod("default")).collect();

    // All at once, memory sampled meanwhile.
    let done = AtomicBool::new(false);
    let barrier = Barrier::new(PODS);
    let (outcomes, peak) = std::thread::scope(|s| {
        let sampler = s.spawn(|| netns_harness::kernel::peak_plexus_pss(&done));
        let handles: Vec<_> = pods
            .iter()
            .map(|(_, pod)| {
                let (list, barrier, node) = (&list, &barrier, &node);
                s.spawn(move || {
                    barrier.wait();
                    node.runtime.add(list, pod)
                })
            })
            .collect();
        let outcomes: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("ADD thread"))
            .collect();
        done.store(true, Ordering::Relaxed);
        (outcomes, sampler.join().expect("sampler"))
    });
    let mut seen = HashSet::new();
    let mut retried = 0;
    for ((_, pod), outcome) in pods.iter().zip(outcomes) {
        let result = match outcome {
            Ok(r) => r,
            Err(mut e) => {
                // What a runtime retries, as kubelet does, until it works.
                let mut tries = 0;
                loop {
                    assert_eq!(e.code, 11, "a burst's error is one to retry: {e:?}");
                    assert!(tries < 20, "still failing after {tries} retries: {e:?}");
                    tries += 1;
                    retried += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    match node.runtime.add(&list, pod) {
                        Ok(r) => break r,
                        Err(again) => e = again,
                    }
                }
            }
        };
        let ips = addresses(&result);
        assert_eq!(ips.len(), 2, "dual stack: {result}");
        for ip in ips {
            assert!(seen.insert(ip.clone()), "{ip} handed out twice");
        }
    }
    let (peak_kib, most) = peak;
    let peak_mib = peak_kib as f64 / 1024.0;
    println!(
        "{PODS} ADDs at once: {retried} retried; peak memory of all plexus processes together \
         {peak_mib:.1} MiB, with up to {most} running at once ({:.2} MiB each)",
        peak_mib / most.max(1) as f64
    );
    assert!(most > 0, "plexus processes were seen");
    // Memory grows with the pods being set up at once and is bounded per
    // process (1.4-1.5 MiB each here, the debug build, shared pages counted
    // once): a burst cannot take a node's memory the way a daemon's can.
    assert!(
        peak_mib <= most as f64 * 8.0,
        "at most 8 MiB per plexus process: {peak_mib:.1} MiB for {most}"
    );

    // And all of them gone at once.
    std::thread::scope(|s| {
        for (_, pod) in &pods {
            let (list, node) = (&list, &node);
            s.spawn(move || {
                let mut tries = 0;
                while let Err(e) = node.runtime.del(list, pod) {
                    tries += 1;
                    assert!(e.code == 11 && tries < 20, "DEL: {e:?}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            });
        }
    });
    // etcd listens in the node's netns: etcdctl runs there.
    let handles = etcd
        .etcdctl(
            0,
            &["get", "--prefix", "/plexus/ipam/handles/", "--keys-only"],
        )
        .expect("etcdctl");
    assert!(
        handles.trim().is_empty(),
        "no handle is left in etcd: {handles}"
    );
    assert!(node.records().is_empty(), "{:?}", node.records());
    for (ns, _) in &pods {
        assert_eq!(
            netns_harness::kernel::link_names(ns.name()).expect("links"),
            ["lo"],
            "{} holds only lo",
            ns.name()
        );
    }
}
