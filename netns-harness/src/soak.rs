//! `make soak`: pods churned on two simulated nodes for a set time (default
//! 10 minutes). Each node is a netns of its own running `plexus` with the
//! cluster network `plexus-veth` and, for every other pod, a secondary
//! `plexus-macvlan`, all addresses from `plexus-ipam` on one etcd both nodes
//! reach over a link between them. A node keeps 16 pods: it adds one, then
//! removes its oldest as containerd does (DEL with the netns, the netns
//! deleted, DEL again without it).
//!
//! Every minute the churn pauses between calls and the state is audited:
//! every IPAM handle belongs to a live pod, no address is held twice, each
//! node has one host veth and one record per live pod, no release waits in
//! a journal. The minute's ADD and DEL p50/p99, the peak memory of all
//! `plexus` processes together and the leaks and duplicates found are
//! printed; at the end every pod goes and nothing may be left. Any leak or
//! duplicate fails the run.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use cni::NetConfList;
use serde_json::{json, Value};

use crate::etcd::EtcdCluster;
use crate::fixtures::{nad, plexus_ipam_on_etcd};
use crate::kernel;
use crate::netns::Netns;
use crate::node::{Node, UPLINK};
use crate::runtime::Pod;

/// Pods each node keeps.
const LIVE: usize = 16;

/// One call's kind and how long it took.
type Sample = (bool, Duration);

struct SimNode {
    name: String,
    node: Node,
    list: NetConfList,
    /// Live pods, oldest first.
    pods: Mutex<VecDeque<(Netns, Pod)>>,
}

pub fn run(minutes: f64) -> Result<(), String> {
    if !(minutes.is_finite() && minutes > 0.0) {
        return Err(format!("soak: {minutes} minutes is not a duration"));
    }
    let n1 = Node::try_new("soak-1").map_err(|e| format!("node: {e}"))?;
    let n2 = Node::try_new("soak-2").map_err(|e| format!("node: {e}"))?;
    kernel::veth(n1.ns(), "under0", n2.ns(), "under0").map_err(|e| format!("link: {e}"))?;
    for (n, v4) in [(&n1, "192.0.2.1/24"), (&n2, "192.0.2.2/24")] {
        kernel::ip(&["-n", n.ns(), "addr", "add", v4, "dev", "under0"])
            .and_then(|_| kernel::ip(&["-n", n.ns(), "link", "set", "under0", "up"]))
            .map_err(|e| format!("address: {e}"))?;
    }
    let etcd =
        EtcdCluster::start_in_on(1, &n1.netns, "192.0.2.1").map_err(|e| format!("etcd: {e}"))?;
    let endpoints = etcd.endpoints_on();
    let nodes: Vec<SimNode> = [("node-1", n1), ("node-2", n2)]
        .into_iter()
        .map(|(name, node)| {
            let ipam = |subnets: &[&str], pool: &str| {
                let mut i = plexus_ipam_on_etcd(
                    subnets,
                    &endpoints,
                    name,
                    &node.scratch.join(format!("ipam-{pool}")),
                );
                i["pool"] = json!(pool);
                i
            };
            node.define(
                "data.yaml",
                &nad(
                    "data",
                    None,
                    &json!({"cniVersion": "1.0.0", "type": "plexus-macvlan", "master": UPLINK,
                            "mode": "bridge", "ipam": ipam(&["10.96.0.0/16"], "data")}),
                ),
            );
            let cluster = json!({"cniVersion": "1.0.0", "name": "pods", "type": "plexus-veth",
                "ipam": ipam(&["10.95.0.0/16", "fd00:95::/64"], "pods")});
            let list = node.plexus_list("1.0.0", cluster);
            SimNode {
                name: name.to_string(),
                node,
                list,
                pods: Mutex::new(VecDeque::new()),
            }
        })
        .collect();
    let baselines: Vec<Vec<String>> = nodes.iter().map(|n| n.node.snapshot()).collect();

    println!(
        "soak: {minutes} min, 2 nodes x {LIVE} pods (plexus-veth, plexus-macvlan on every other pod, plexus-ipam on etcd)"
    );
    println!(
        "{:>4} {:>6} {:>9} {:>9} {:>6} {:>9} {:>9} {:>10} {:>6} {:>6}",
        "min",
        "ADDs",
        "ADD p50",
        "ADD p99",
        "DELs",
        "DEL p50",
        "DEL p99",
        "plexus PSS",
        "procs",
        "leaks"
    );
    let end = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    let gate = RwLock::new(());
    let samples: Mutex<Vec<Sample>> = Mutex::new(Vec::new());
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let mut found = Vec::new();
    std::thread::scope(|s| {
        for n in &nodes {
            let (gate, samples, failures, stop) = (&gate, &samples, &failures, &stop);
            s.spawn(move || {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let _open = gate.read().unwrap_or_else(PoisonError::into_inner);
                    if let Err(e) = churn(n, i, samples) {
                        failures
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(e);
                        stop.store(true, Ordering::Relaxed);
                    }
                    i += 1;
                }
            });
        }
        let mut minute = 0;
        while !stop.load(Ordering::Relaxed) {
            minute += 1;
            let until = (Instant::now() + Duration::from_secs(60)).min(end);
            let sampling = AtomicBool::new(false);
            let (pss, procs) = std::thread::scope(|t| {
                let sampler = t.spawn(|| kernel::peak_plexus_pss(&sampling));
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                sampling.store(true, Ordering::Relaxed);
                sampler.join().unwrap_or((0, 0))
            });
            let leaks = {
                let _closed = gate.write().unwrap_or_else(PoisonError::into_inner);
                audit(&nodes, &etcd)
            };
            let taken: Vec<Sample> =
                std::mem::take(&mut *samples.lock().unwrap_or_else(PoisonError::into_inner));
            let (adds, dels): (Vec<Sample>, Vec<Sample>) = taken.into_iter().partition(|s| s.0);
            let ms = |v: &[Sample], q: f64| pct(v, q).as_secs_f64() * 1000.0;
            println!(
                "{minute:>4} {:>6} {:>7.2}ms {:>7.2}ms {:>6} {:>7.2}ms {:>7.2}ms {:>6.1} MiB {:>6} {:>6}",
                adds.len(),
                ms(&adds, 0.5),
                ms(&adds, 0.99),
                dels.len(),
                ms(&dels, 0.5),
                ms(&dels, 0.99),
                pss as f64 / 1024.0,
                procs,
                leaks.len()
            );
            for l in &leaks {
                println!("     {l}");
            }
            found.extend(leaks);
            if Instant::now() >= end || !found.is_empty() {
                stop.store(true, Ordering::Relaxed);
            }
        }
    });
    let failed = failures
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    // Every pod goes; then nothing may be left.
    for n in &nodes {
        let pods: Vec<(Netns, Pod)> = n
            .pods
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        for (ns, pod) in pods {
            remove(n, ns, &pod).map_err(|e| format!("{}: final DEL: {e}", n.name))?;
        }
    }
    let mut left = audit(&nodes, &etcd);
    for (n, before) in nodes.iter().zip(&baselines) {
        let start = Instant::now();
        let mut now = n.node.snapshot();
        while &now != before && start.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(50));
            now = n.node.snapshot();
        }
        for l in now.iter().filter(|l| !before.contains(l)) {
            left.push(format!("{}: after every pod went: {l}", n.name));
        }
    }
    for l in &left {
        println!("     {l}");
    }
    println!(
        "soak: {} leaks or duplicates during the run, {} after it",
        found.len(),
        left.len()
    );
    if let Some(e) = failed.first() {
        return Err(format!("soak: a call failed: {e}"));
    }
    if !found.is_empty() || !left.is_empty() {
        return Err("soak: leaks or duplicates found".into());
    }
    Ok(())
}

/// One step of a node's churn: a new pod, then the oldest goes if there
/// are more than [`LIVE`].
fn churn(n: &SimNode, i: usize, samples: &Mutex<Vec<Sample>>) -> Result<(), String> {
    let (ns, pod) = n
        .node
        .try_pod("default")
        .map_err(|e| format!("netns: {e}"))?;
    let pod = if i & 1 == 0 {
        pod.networks("data")
    } else {
        pod
    };
    let t = Instant::now();
    n.node
        .runtime
        .add(&n.list, &pod)
        .map_err(|e| format!("{}: ADD: {e}", n.name))?;
    let took = t.elapsed();
    samples
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((true, took));
    let oldest = {
        let mut pods = n.pods.lock().unwrap_or_else(PoisonError::into_inner);
        pods.push_back((ns, pod));
        if pods.len() > LIVE {
            pods.pop_front()
        } else {
            None
        }
    };
    if let Some((ns, pod)) = oldest {
        let t = Instant::now();
        remove(n, ns, &pod).map_err(|e| format!("{}: DEL: {e}", n.name))?;
        samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((false, t.elapsed()));
    }
    Ok(())
}

/// What containerd does when a pod goes: DEL with the netns, the netns
/// deleted, DEL again without it.
fn remove(n: &SimNode, ns: Netns, pod: &Pod) -> Result<(), String> {
    n.node
        .runtime
        .del(&n.list, pod)
        .map_err(|e| e.to_string())?;
    ns.delete().map_err(|e| e.to_string())?;
    n.node
        .runtime
        .del_without_netns(&n.list, pod)
        .map_err(|e| e.to_string())
}

fn pct(v: &[Sample], q: f64) -> Duration {
    let mut d: Vec<Duration> = v.iter().map(|s| s.1).collect();
    d.sort();
    if d.is_empty() {
        return Duration::ZERO;
    }
    let i = ((d.len() as f64 * q).ceil() as usize).clamp(1, d.len()) - 1;
    d[i]
}

/// Leaks and duplicates, with every node between calls.
fn audit(nodes: &[SimNode], etcd: &EtcdCluster) -> Vec<String> {
    let mut out = Vec::new();
    let live: BTreeMap<String, &str> = nodes
        .iter()
        .flat_map(|n| {
            n.pods
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|(_, p)| (p.container_id.clone(), n.name.as_str()))
                .collect::<Vec<_>>()
        })
        .collect();
    let dump = match etcd.etcdctl(0, &["get", "--prefix", "/plexus/ipam/handles/"]) {
        Ok(d) => d,
        Err(e) => return vec![format!("etcd not read: {e}")],
    };
    let lines: Vec<&str> = dump.lines().collect();
    let mut held: BTreeSet<String> = BTreeSet::new();
    for kv in lines.chunks(2) {
        let (key, value) = (kv[0], kv.get(1).copied().unwrap_or(""));
        let container = key.split('/').nth(5).unwrap_or("");
        let record: Value = serde_json::from_str(value).unwrap_or(Value::Null);
        let node = record["node"].as_str().unwrap_or("");
        match live.get(container) {
            None => out.push(format!("handle of a pod that is gone: {key}")),
            Some(n) if *n != node => out.push(format!("handle {key} held by {node}, pod on {n}")),
            Some(_) => {}
        }
        for a in record["addresses"].as_array().into_iter().flatten() {
            let ip = a["ip"].as_str().unwrap_or("").to_string();
            if !held.insert(ip.clone()) {
                out.push(format!("duplicate: {ip} held twice ({key})"));
            }
        }
    }
    for n in nodes {
        let pods = n.pods.lock().unwrap_or_else(PoisonError::into_inner);
        let ids: BTreeSet<&str> = pods.iter().map(|(_, p)| p.container_id.as_str()).collect();
        let veths = kernel::links(n.node.ns())
            .map(|l| {
                l.iter()
                    .filter(|l| l.kind == "veth" && l.name.starts_with("plx"))
                    .count()
            })
            .unwrap_or(usize::MAX);
        if veths != pods.len() {
            out.push(format!(
                "{}: {veths} host veths for {} pods",
                n.name,
                pods.len()
            ));
        }
        let records = n.node.plexus_cache().join("results");
        for f in std::fs::read_dir(&records).into_iter().flatten().flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if !ids.iter().any(|id| name.contains(id)) {
                out.push(format!("{}: record of a pod that is gone: {name}", n.name));
            }
        }
        for pool in ["pods", "data"] {
            let journal = n.node.scratch.join(format!("ipam-{pool}")).join("journal");
            let waiting = std::fs::read_dir(&journal).map(|d| d.count()).unwrap_or(0);
            if waiting > 0 {
                out.push(format!(
                    "{}: {waiting} releases waiting in {}",
                    n.name,
                    journal.display()
                ));
            }
        }
    }
    out
}
