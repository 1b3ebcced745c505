//! `make bench`, the whole stack: a pod set up entirely by Plexus (`plexus`
//! with the cluster network `plexus-veth` + `plexus-ipam`, on its local store
//! and on a 3-member etcd, straight and through the node's store relay) against Debian's `ptp` + `host-local`, IPv4 and
//! dual stack, all alternating in one loop; then `plexus-ipam` alone against
//! `host-local`, each exec'd by the runtime as an IPAM plugin.

use std::path::Path;
use std::time::Instant;

use cni::plugin::Command;
use cni::NetConfList;
use serde_json::{json, Value};

use crate::bench::{measure_rss_of, scenario, side_by_side, verdict, Variant};
use crate::etcd::EtcdCluster;
use crate::fixtures::ptp;
use crate::node::Node;
use crate::relay::StoreRelay;

/// `plexus-veth` with `plexus-ipam` (`store`: none for the local store).
fn plexus_stack(name: &str, subnets: &[&str], state: &Path, store: Option<Value>) -> Value {
    let ranges: Vec<Value> = subnets.iter().map(|s| json!([{"subnet": s}])).collect();
    let mut ipam = json!({
        "type": "plexus-ipam",
        "ranges": ranges,
        "nodeName": "bench",
        "stateDir": state,
    });
    if let Some(store) = store {
        ipam["store"] = store;
    }
    json!({"cniVersion": "1.0.0", "name": name, "type": "plexus-veth", "ipam": ipam})
}

/// Peak RSS any Plexus process may reach in these runs.
const RSS_MIB: f64 = 6.0;

pub fn run(cycles: usize) -> Result<(), String> {
    let node = Node::try_new("bench-stack").map_err(|e| format!("create node: {e}"))?;
    let etcd = EtcdCluster::start_in(3, &node.netns).map_err(|e| format!("etcd: {e}"))?;
    let ipam = node.ipam_dir();
    let state = node.scratch.join("plexus-ipam");
    let parse = |v: Value| NetConfList::parse_value(&v).map_err(|e| e.to_string());
    let on_etcd = json!({"type": "etcd", "endpoints": etcd.endpoints()});
    let relay = StoreRelay::start_in(&node.netns, &node.scratch.join("store-relay.sock"))
        .map_err(|e| format!("store relay: {e}"))?;
    let via_relay = json!({
        "type": "etcd", "endpoints": etcd.endpoints(), "relay": relay.socket(),
    });
    println!(
        "== the whole stack (release build), one node netns, {cycles} cycles per variant; \
         etcd: 3 members on this machine; the store relay in the node netns"
    );
    let mut v = [
        Variant::new(
            "ptp + host-local, IPv4 (reference)",
            parse(ptp("ref4", "1.0.0", &["10.210.0.0/24"], &ipam))?,
            "ptp",
        ),
        Variant::new(
            "plexus, IPv4, local store",
            node.plexus_list(
                "1.0.0",
                plexus_stack("local4", &["10.212.0.0/24"], &state, None),
            ),
            "plexus",
        ),
        Variant::new(
            "plexus, dual stack, local store",
            node.plexus_list(
                "1.0.0",
                plexus_stack("local6", &["10.213.0.0/24", "fd00:213::/64"], &state, None),
            ),
            "plexus",
        ),
        Variant::new(
            "plexus, IPv4, etcd (3 members)",
            node.plexus_list(
                "1.0.0",
                plexus_stack("etcd4", &["10.214.0.0/24"], &state, Some(on_etcd)),
            ),
            "plexus",
        ),
        Variant::new(
            "plexus, IPv4, etcd via the relay",
            node.plexus_list(
                "1.0.0",
                plexus_stack("relay4", &["10.217.0.0/24"], &state, Some(via_relay)),
            ),
            "plexus",
        ),
    ];
    let r = scenario(&node, "The whole stack", cycles, &mut v)?;
    let (ref4, local4, local6, etcd4, relay4) = (r[0], r[1], r[2], r[3], r[4]);
    // The reference's dual stack is not run: ptp waits out IPv6 duplicate
    // address detection (~2 s an ADD here), so the IPv4 ADD is the bar.
    println!("\ntargets (p50, against the reference's IPv4 ADD and DEL):");
    // (what, ours, which p50: 0 ADD, 2 DEL, target), against the reference's.
    for (what, ours, i, target) in [
        ("IPv4 ADD, local store", local4, 0, 0.35),
        ("dual-stack ADD, local store", local6, 0, 0.35),
        ("IPv4 ADD, etcd", etcd4, 0, 0.45),
        ("IPv4 ADD, etcd via the node's store relay", relay4, 0, 0.45),
        ("IPv4 DEL, local store", local4, 2, 0.8),
        ("dual-stack DEL, local store", local6, 2, 0.8),
        ("IPv4 DEL, etcd", etcd4, 2, 0.8),
        ("IPv4 DEL, etcd via the node's store relay", relay4, 2, 0.8),
    ] {
        verdict(what, ours[i] / ref4[i], target, false);
    }
    for variant in v.iter().filter(|v| v.entry == "plexus") {
        let mib = variant.rss_kb.unwrap_or(u64::MAX) as f64 / 1024.0;
        verdict(
            &format!("peak RSS (MiB), {}", variant.label),
            mib,
            RSS_MIB,
            false,
        );
    }
    // The IPAM's publisher, started by each ADD on etcd, is one too.
    for variant in [&v[3], &v[4]] {
        let kb = publisher_rss_kb(&node, variant)?;
        verdict(
            &format!("peak RSS (MiB), its publisher ({})", variant.label),
            kb as f64 / 1024.0,
            RSS_MIB,
            false,
        );
    }
    // The relay is a Plexus process of these runs too (it lives on).
    let relay_mib = relay.peak_rss_kb().unwrap_or(u64::MAX) as f64 / 1024.0;
    verdict("peak RSS (MiB), the store relay", relay_mib, RSS_MIB, false);
    ipam_alone(&node, cycles)?;
    drop(relay);
    drop(etcd);
    if !node.leases().is_empty() {
        return Err(format!("leases left after the bench: {:?}", node.leases()));
    }
    Ok(())
}

/// The peak RSS (KiB) of the `plexus publish-ipam` an ADD of `v` starts:
/// its own high-water mark, from its debug line (it is not exec'd by the
/// runtime, so GNU time does not see it).
fn publisher_rss_kb(node: &Node, v: &Variant) -> Result<u64, String> {
    let (list, log) = v.logging_debug(node, "publisher");
    let (_ns, pod) = v.pod(node)?;
    node.runtime
        .add(&list, &pod)
        .map_err(|e| format!("{} ADD (publisher): {e}", v.label))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let peak = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let peak = text
            .lines()
            .filter(|l| l.contains("IPAM publisher done"))
            .filter_map(|l| l.split("peak_rss_kb=").nth(1))
            .filter_map(|r| {
                r.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .max();
        if let Some(kb) = peak {
            break kb;
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "{}: no publisher's line in {}",
                v.label,
                log.display()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    node.runtime
        .del(&list, &pod)
        .map_err(|e| format!("{} DEL (publisher): {e}", v.label))?;
    Ok(peak)
}

/// `plexus-ipam` (local store) and `host-local`, each exec'd by the runtime
/// as the IPAM plugin of a network, ADD and DEL alternating.
fn ipam_alone(node: &Node, cycles: usize) -> Result<(), String> {
    let state = node.scratch.join("ipam-alone");
    let ours = json!({"cniVersion": "1.0.0", "name": "alone", "ipam": {
        "type": "plexus-ipam", "ranges": [[{"subnet": "10.215.0.0/24"}]],
        "nodeName": "bench", "stateDir": state}});
    let theirs = json!({"cniVersion": "1.0.0", "name": "alone-ref", "ipam": {
        "type": "host-local", "ranges": [[{"subnet": "10.216.0.0/24"}]],
        "dataDir": node.ipam_dir()}});
    let (_ns, pod) = node
        .try_pod("default")
        .map_err(|e| format!("pod netns: {e}"))?;
    let mut samples: [[Vec<std::time::Duration>; 2]; 2] = Default::default();
    let call = |plugin: &str, conf: &Value, cmd: Command| -> Result<std::time::Duration, String> {
        let stdin = serde_json::to_vec(conf).map_err(|e| e.to_string())?;
        let t = Instant::now();
        node.runtime
            .raw(plugin, cmd, Some(&pod), &stdin)
            .map_err(|e| format!("{plugin} {cmd:?}: {e}"))?;
        Ok(t.elapsed())
    };
    for _ in 0..cycles {
        for (i, (plugin, conf)) in [("plexus-ipam", &ours), ("host-local", &theirs)]
            .into_iter()
            .enumerate()
        {
            samples[i][0].push(call(plugin, conf, Command::Add)?);
            samples[i][1].push(call(plugin, conf, Command::Del)?);
        }
    }
    for s in samples.iter_mut().flatten() {
        s.sort();
    }
    println!("\nIPAM alone, exec'd by the runtime: {cycles} ADD/DEL cycles each, alternating");
    let ratio = side_by_side(
        "plexus-ipam (local store)",
        "host-local (reference)",
        &samples,
    );
    let rss = measure_rss_of(node, "plexus-ipam", |rt| {
        let stdin = serde_json::to_vec(&ours).map_err(|e| e.to_string())?;
        rt.raw("plexus-ipam", Command::Add, Some(&pod), &stdin)
            .and_then(|_| rt.raw("plexus-ipam", Command::Del, Some(&pod), &stdin))
            .map(|_| ())
            .map_err(|e| e.to_string())
    })?;
    verdict(
        "plexus-ipam ADD against host-local",
        ratio(0, 0.5),
        0.6,
        false,
    );
    verdict(
        "plexus-ipam DEL against host-local",
        ratio(1, 0.5),
        0.6,
        false,
    );
    verdict(
        "peak RSS (MiB), plexus-ipam",
        rss as f64 / 1024.0,
        RSS_MIB,
        false,
    );
    Ok(())
}
