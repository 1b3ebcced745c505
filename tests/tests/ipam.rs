//! The cluster-wide IPAM against Debian's etcd (3 members, started by the
//! harness) and against the local store: the same suite on both, plus the
//! cluster faults on etcd.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipam::config::EtcdConf;
use ipam::{Allocator, Error, EtcdStore, Family, HandleId, LocalStore, Pool, Store};
use netns_harness::etcd::EtcdCluster;
use netns_harness::scratch::Scratch;

/// Opens a store as one node would.
type Opener = Arc<dyn Fn() -> Box<dyn Store> + Send + Sync>;

fn etcd_opener(endpoints: Vec<String>, prefix: &str) -> Opener {
    let prefix = prefix.to_string();
    Arc::new(move || {
        let mut conf = EtcdConf::new(endpoints.clone(), &prefix);
        // Generous: elections on a loaded 2-core machine take their time.
        conf.timeout_seconds = Some(20.0);
        Box::new(EtcdStore::connect(&conf).expect("connect to etcd")) as Box<dyn Store>
    })
}

fn local_opener(dir: &Path) -> Opener {
    let dir = dir.to_path_buf();
    Arc::new(move || Box::new(LocalStore::open(&dir).expect("local store")) as Box<dyn Store>)
}

fn pool(json: serde_json::Value) -> Pool {
    serde_json::from_value::<Pool>(json)
        .expect("pool json")
        .validated()
        .expect("valid pool")
}

fn dual_pool(name: &str) -> Pool {
    pool(serde_json::json!({
        "name": name,
        "ranges": [{"subnet": "10.200.0.0/16"}, {"subnet": "fd00:200::/64"}],
    }))
}

/// What the concurrent run saw.
struct Run {
    assigned: BTreeMap<HandleId, Vec<IpAddr>>,
    errors: Vec<String>,
    conflicts: u64,
}

/// `nodes` nodes, each assigning `each` handles as fast as it can; `during`
/// runs once `trigger` assignments have been made in all.
fn concurrent(
    open: &Opener,
    pool: &Pool,
    nodes: usize,
    each: usize,
    trigger: usize,
    during: impl FnOnce(),
) -> Run {
    let done = Arc::new(AtomicUsize::new(0));
    let assigned = Arc::new(Mutex::new(BTreeMap::new()));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let conflicts = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for n in 0..nodes {
        let (open, pool) = (open.clone(), pool.clone());
        let (done, assigned, errors, conflicts) = (
            done.clone(),
            assigned.clone(),
            errors.clone(),
            conflicts.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut alloc = Allocator::new(open(), &format!("node-{n}"));
            for i in 0..each {
                let h = HandleId::new(&pool.name, &format!("c-{n}-{i}"), "eth0");
                match alloc.assign(&pool, &h, &[]) {
                    Ok(rec) => {
                        let ips = rec.addresses.iter().map(|a| a.ip).collect();
                        assigned.lock().expect("lock").insert(h, ips);
                    }
                    Err(e) => errors.lock().expect("lock").push(format!("{h}: {e}")),
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
            conflicts.fetch_add(alloc.stats().conflicts as usize, Ordering::SeqCst);
        }));
    }
    while done.load(Ordering::SeqCst) < trigger {
        std::thread::sleep(Duration::from_millis(5));
    }
    during();
    for t in threads {
        t.join().expect("node thread");
    }
    let assigned = std::mem::take(&mut *assigned.lock().expect("lock"));
    let errors = std::mem::take(&mut *errors.lock().expect("lock"));
    Run {
        assigned,
        errors,
        conflicts: conflicts.load(Ordering::SeqCst) as u64,
    }
}

/// Every address handed out once; the store holds exactly what was handed out.
fn assert_distinct_and_recorded(open: &Opener, pool: &Pool, run: &Run, per_family: usize) {
    for fam in [Family::V4, Family::V6] {
        let ips: Vec<IpAddr> = run
            .assigned
            .values()
            .flatten()
            .copied()
            .filter(|ip| Family::of(*ip) == fam)
            .collect();
        let distinct: HashSet<IpAddr> = ips.iter().copied().collect();
        assert_eq!(ips.len(), per_family, "{fam}: addresses handed out");
        assert_eq!(
            distinct.len(),
            ips.len(),
            "{fam}: a duplicate was handed out"
        );
    }
    let mut alloc = Allocator::new(open(), "auditor");
    let held = alloc.allocated(pool).expect("read blocks");
    let held_set: HashSet<IpAddr> = held.iter().copied().collect();
    assert_eq!(held.len(), held_set.len(), "two blocks hold one address");
    let handed: HashSet<IpAddr> = run.assigned.values().flatten().copied().collect();
    assert_eq!(held_set, handed, "blocks hold exactly what was handed out");
    for (h, ips) in &run.assigned {
        let rec = alloc.lookup(h).expect("lookup").expect("handle recorded");
        let mut stored: Vec<IpAddr> = rec.addresses.iter().map(|a| a.ip).collect();
        let mut want = ips.clone();
        stored.sort();
        want.sort();
        assert_eq!(stored, want, "{h}");
    }
}

/// Releases everything (spread over 4 nodes) and checks nothing is left.
fn release_all_and_assert_empty(open: &Opener, pool: &Pool, run: &Run) {
    let handles: Vec<HandleId> = run.assigned.keys().cloned().collect();
    let chunks: Vec<Vec<HandleId>> = handles
        .chunks(handles.len().div_ceil(4))
        .map(|c| c.to_vec())
        .collect();
    let threads: Vec<_> = chunks
        .into_iter()
        .enumerate()
        .map(|(n, chunk)| {
            let open = open.clone();
            std::thread::spawn(move || {
                let mut alloc = Allocator::new(open(), &format!("node-{n}"));
                for h in chunk {
                    assert!(
                        alloc.release(&h).expect("release").is_some(),
                        "{h} had nothing"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("release thread");
    }
    let mut alloc = Allocator::new(open(), "auditor");
    assert_eq!(
        alloc.allocated(pool).expect("blocks"),
        Vec::<IpAddr>::new(),
        "addresses left"
    );
    assert!(
        alloc.handles(&pool.name).expect("handles").is_empty(),
        "handles left"
    );
}

fn eight_nodes_250_each(open: Opener) {
    let pool = dual_pool("pods");
    Allocator::new(open(), "admin")
        .define_pool(&pool)
        .expect("define");
    let run = concurrent(&open, &pool, 8, 250, 0, || {});
    assert!(
        run.errors.is_empty(),
        "errors: {:?}",
        &run.errors[..run.errors.len().min(5)]
    );
    assert_distinct_and_recorded(&open, &pool, &run, 2000);
    eprintln!("8 nodes x 250: cross-node conflicts {}", run.conflicts);
    release_all_and_assert_empty(&open, &pool, &run);
}

/// Idempotence, GC, excludes and gateway, exhaustion, static requests, pool
/// conflicts: the semantics both stores must share.
/// A pool an admin changes or deletes in the store (the central API's
/// IPPool) is read again by a node that cached it, before its next address.
fn changed_pools_are_never_used_stale(open: &Opener) {
    let mut node = Allocator::new(open(), "node-c");
    let admin_pool = |exclude: serde_json::Value| {
        pool(
            serde_json::json!({"name": "edited", "ranges": [{"subnet": "10.210.0.0/24"}],
                                "exclude": exclude}),
        )
    };
    let v1 = admin_pool(serde_json::json!([]));
    node.define_pool(&v1).expect("define");
    let first = node
        .assign(&v1, &HandleId::new("edited", "c1", "eth0"), &[])
        .expect("assign");
    let taken = first.addresses[0].ip;
    // The admin excludes the next 16 addresses: the node must skip them
    // although its cached definition does not.
    let v2 = admin_pool(serde_json::json!(["10.210.0.0/27"]));
    let mut store = open();
    let key = "pools/edited";
    let kv = store.get(key).expect("get").expect("stored");
    let out = store
        .txn(
            ipam::store::Txn::default()
                .when(key, kv.mod_rev)
                .put(key, serde_json::to_vec(&v2).expect("encode")),
        )
        .expect("txn");
    assert!(out.succeeded);
    let next = node
        .assign(&v1, &HandleId::new("edited", "c2", "eth0"), &[])
        .expect("assign after the change");
    let ip = next.addresses[0].ip;
    assert!(
        v2.usable(ip) && ip != taken,
        "{ip} handed out from a stale definition"
    );
    // Deleted: no more addresses from it.
    let kv = store.get(key).expect("get").expect("stored");
    let out = store
        .txn(
            ipam::store::Txn::default()
                .when(key, kv.mod_rev)
                .delete(key),
        )
        .expect("txn");
    assert!(out.succeeded);
    let err = node
        .assign(&v1, &HandleId::new("edited", "c3", "eth0"), &[])
        .expect_err("a deleted pool");
    assert!(matches!(err, Error::PoolUnknown { .. }), "{err}");
}

fn semantics(open: Opener) {
    changed_pools_are_never_used_stale(&open);
    let mut a = Allocator::new(open(), "node-a");
    let mut b = Allocator::new(open(), "node-b");

    // Repeated ADD: the same addresses.
    let pods = dual_pool("pods");
    a.define_pool(&pods).expect("define");
    let h = HandleId::new("pods", "c1", "eth0");
    let first = a.assign(&pods, &h, &[]).expect("assign");
    assert_eq!(first.addresses.len(), 2, "one address per family");
    let again = a.assign(&pods, &h, &[]).expect("assign again");
    assert_eq!(first, again);
    // Even from a node with a cold cache.
    let mut a2 = Allocator::new(open(), "node-a");
    assert_eq!(a2.assign(&pods, &h, &[]).expect("assign, cold"), first);

    // GC frees exactly the stale ones, and only this node's.
    let live = HandleId::new("pods", "c2", "eth0");
    let stale = HandleId::new("pods", "c3", "eth0");
    let other_node = HandleId::new("pods", "c4", "eth0");
    a.assign(&pods, &live, &[]).expect("live");
    a.assign(&pods, &stale, &[]).expect("stale");
    b.assign(&pods, &other_node, &[]).expect("b's");
    let keep: HashSet<HandleId> = [h.clone(), live.clone()].into();
    let released = a.gc("pods", |x| keep.contains(x)).expect("gc");
    assert_eq!(released, vec![stale.clone()]);
    assert!(a.lookup(&stale).expect("lookup").is_none());
    for x in [&h, &live, &other_node] {
        assert!(a.lookup(x).expect("lookup").is_some(), "{x} survived GC");
    }

    // Excludes, gateway, network and broadcast never handed out; exhaustion named.
    let small = pool(serde_json::json!({
        "name": "small",
        "ranges": [{"subnet": "10.9.0.0/28", "gateway": "10.9.0.14"}],
        "exclude": ["10.9.0.4/31", "10.9.0.9"],
    }));
    a.define_pool(&small).expect("define small");
    let mut got = Vec::new();
    let err = loop {
        let h = HandleId::new("small", &format!("s{}", got.len()), "eth0");
        // Alternate nodes: the second borrows from the first's block.
        let alloc = if got.len() % 2 == 0 { &mut a } else { &mut b };
        match alloc.assign(&small, &h, &[]) {
            Ok(rec) => got.push(rec.addresses[0].ip),
            Err(e) => break e,
        }
        assert!(got.len() <= 16, "more addresses than the subnet holds");
    };
    let want: Vec<IpAddr> = [1, 2, 3, 6, 7, 8, 10, 11, 12, 13]
        .iter()
        .map(|o| IpAddr::from([10, 9, 0, *o]))
        .collect();
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted, want, "exactly the usable addresses");
    assert!(matches!(err, Error::Exhausted { .. }), "{err}");
    assert!(err.to_string().contains("pool small"), "{err}");

    // Static requests: given if free and usable, refused otherwise.
    let s = HandleId::new("pods", "static", "eth0");
    let want: Vec<IpAddr> = vec![
        "10.200.77.7".parse().expect("ip"),
        "fd00:200::7:7".parse().expect("ip"),
    ];
    let rec = b.assign(&pods, &s, &want).expect("static");
    assert_eq!(rec.addresses.iter().map(|a| a.ip).collect::<Vec<_>>(), want);
    let clash = a
        .assign(&pods, &HandleId::new("pods", "clash", "eth0"), &want[..1])
        .expect_err("taken");
    assert!(clash.to_string().contains("already assigned"), "{clash}");
    for bad in ["10.200.0.0", "10.201.0.5", "10.200.0.1"] {
        let e = a
            .assign(
                &pods,
                &HandleId::new("pods", "bad", "eth0"),
                &[bad.parse().expect("ip")],
            )
            .expect_err(bad);
        assert!(matches!(e, Error::Unavailable { .. }), "{bad}: {e}");
    }

    // Conflicting and malformed pools are refused.
    let overlapping =
        pool(serde_json::json!({"name": "other", "ranges": [{"subnet": "10.200.5.0/24"}]}));
    let e = a.define_pool(&overlapping).expect_err("overlap");
    assert!(
        e.to_string()
            .contains("overlaps 10.200.0.0/16 of pool pods"),
        "{e}"
    );
    let redefined =
        pool(serde_json::json!({"name": "pods", "ranges": [{"subnet": "10.210.0.0/16"}]}));
    let e = b.define_pool(&redefined).expect_err("redefined");
    assert!(e.to_string().contains("defines it differently"), "{e}");
    let malformed: Result<Pool, _> =
        serde_json::from_value::<Pool>(serde_json::json!({"name": "m", "ranges": [{"subnet": "10.0.0.0/24", "rangeStart": "10.0.1.1"}]}))
            .map_err(|e| e.to_string())
            .and_then(|p| p.validated().map_err(|e| e.to_string()));
    assert!(malformed.expect_err("malformed").contains("outside subnet"));

    // Release frees; a second release finds nothing.
    assert!(a.release(&h).expect("release").is_some());
    assert!(a.release(&h).expect("release again").is_none());
}

#[test]
fn etcd_eight_nodes_allocate_2000_distinct_addresses_per_family() {
    let etcd = EtcdCluster::start(3).expect("etcd");
    eight_nodes_250_each(etcd_opener(etcd.endpoints(), "/t/eight/"));
}

#[test]
fn local_store_eight_nodes_allocate_2000_distinct_addresses_per_family() {
    let dir = Scratch::new("ipam-local").expect("scratch");
    eight_nodes_250_each(local_opener(dir.path()));
}

#[test]
fn etcd_semantics() {
    let etcd = EtcdCluster::start(3).expect("etcd");
    semantics(etcd_opener(etcd.endpoints(), "/t/semantics/"));
}

#[test]
fn local_store_semantics() {
    let dir = Scratch::new("ipam-local").expect("scratch");
    semantics(local_opener(dir.path()));
}

#[test]
fn etcd_leader_stopped_mid_run_loses_nothing() {
    let mut etcd = EtcdCluster::start(3).expect("etcd");
    let open = etcd_opener(etcd.endpoints(), "/t/leader/");
    let pool = dual_pool("pods");
    Allocator::new(open(), "admin")
        .define_pool(&pool)
        .expect("define");
    let leader = etcd.leader().expect("a leader");
    let stopped = Mutex::new(None);
    let run = concurrent(&open, &pool, 8, 250, 600, || {
        etcd.stop_member(leader).expect("stop the leader");
        *stopped.lock().expect("lock") = Some(std::time::Instant::now());
    });
    assert!(
        stopped.lock().expect("lock").is_some(),
        "the leader was stopped mid-run"
    );
    let new_leader = etcd.leader().expect("a new leader");
    assert_ne!(new_leader, leader);
    assert!(
        run.errors.is_empty(),
        "errors: {:?}",
        &run.errors[..run.errors.len().min(5)]
    );
    assert_distinct_and_recorded(&open, &pool, &run, 2000);
    release_all_and_assert_empty(&open, &pool, &run);
}

// ---- plexus-ipam as a CNI plugin -------------------------------------------

use cni::plugin::Command;
use cni::NetConfList;
use netns_harness::fixtures::{addr_ip, ipam_cache_files, ipam_published};
use netns_harness::node::Node;
use netns_harness::relay::StoreRelay;
use netns_harness::{kernel, probe};
use std::os::unix::fs::PermissionsExt;

const T: Duration = Duration::from_secs(5);

/// An `ipam` section for plexus-ipam on `store`, this node's state in `node`.
fn ipam_section(
    node: &Node,
    store: serde_json::Value,
    ranges: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "type": "plexus-ipam",
        "ranges": ranges,
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
        "store": store,
        "nodeName": "node-1",
        "stateDir": node.scratch.join("ipam-state"),
    })
}

fn etcd_store(endpoints: &[String]) -> serde_json::Value {
    serde_json::json!({"type": "etcd", "endpoints": endpoints, "prefix": "/plexus/ipam/"})
}

/// The network conf plexus-ipam sees, as stdin for a raw call.
fn ipam_conf(name: &str, ipam: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "cniVersion": "1.0.0", "name": name, "type": "plexus-veth", "ipam": ipam,
    }))
    .expect("json")
}

fn ips_of(result: &[u8]) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(result).expect("result json");
    let mut out: Vec<String> = v["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .map(|i| i["address"].as_str().expect("address").to_string())
        .collect();
    out.sort();
    out
}

/// Containers holding addresses of `network`, and addresses held in its
/// pool, read from etcd inside the node's netns (where etcd runs).
fn audit(node: &Node, etcd: &EtcdCluster, network: &str) -> (Vec<String>, usize) {
    ipam_published(&node.scratch.join("ipam-state"));
    let endpoints = etcd.endpoints();
    node.netns
        .run(|| {
            let conf = EtcdConf::new(endpoints, "/plexus/ipam/");
            let mut a = Allocator::new(EtcdStore::connect(&conf).expect("connect"), "auditor");
            let mut holders: Vec<String> = a
                .handles(network)
                .expect("handles")
                .into_iter()
                .map(|(h, _)| h.container)
                .collect();
            holders.sort();
            let pool = a.pool(network).expect("pool stored");
            (holders, a.allocated(&pool).expect("blocks").len())
        })
        .expect("run in the node netns")
}

#[test]
fn plexus_ipam_is_a_drop_in_ipam_for_plexus_veth_on_etcd() {
    let node = Node::new("ipam-veth");
    let etcd = EtcdCluster::start_in(1, &node.netns).expect("etcd");
    let ipam = ipam_section(
        &node,
        etcd_store(&etcd.endpoints()),
        serde_json::json!([[{"subnet": "10.66.0.0/16"}], [{"subnet": "fd00:66::/64"}]]),
    );
    let list = NetConfList::parse_value(&serde_json::json!({
        "cniVersion": "1.1.0", "name": "k8s-pods",
        "plugins": [{"type": "plexus-veth", "ipam": ipam}],
    }))
    .expect("conflist");
    let (ns_a, pod_a) = node.pod("default");
    let (ns_b, pod_b) = node.pod("default");
    node.runtime.add(&list, &pod_a).expect("ADD a");
    node.runtime.add(&list, &pod_b).expect("ADD b");
    let server = probe::EchoServer::start(&ns_b).expect("server");
    let targets = kernel::addrs(ns_b.name(), "eth0").expect("addrs");
    assert_eq!(targets.len(), 2, "{targets:?}");
    for cidr in &targets {
        probe::reach(&ns_a, addr_ip(cidr), server.port(), T).unwrap_or_else(|e| panic!("{e}"));
    }
    drop(server);
    node.runtime.check(&list, &pod_a).expect("CHECK");
    node.runtime.status(&list).expect("STATUS");

    // A repeated IPAM ADD for the same container and interface: the same addresses.
    let stdin = ipam_conf("k8s-pods", &ipam);
    let once = node
        .runtime
        .raw("plexus-ipam", Command::Add, Some(&pod_a), &stdin)
        .expect("ADD");
    let twice = node
        .runtime
        .raw("plexus-ipam", Command::Add, Some(&pod_a), &stdin)
        .expect("ADD");
    assert_eq!(ips_of(&once), ips_of(&twice));
    let in_kernel: Vec<String> = kernel::addrs(ns_a.name(), "eth0").expect("addrs");
    for ip in ips_of(&once) {
        let host = ip.split('/').next().expect("ip");
        assert!(
            in_kernel.iter().any(|k| k.starts_with(&format!("{host}/"))),
            "{ip} vs {in_kernel:?}"
        );
    }

    // GC keeps pod a, releases pod b's addresses.
    let valid = [cni::config::Attachment {
        container_id: pod_a.container_id.clone(),
        ifname: "eth0".into(),
    }];
    node.runtime.gc(&list, &valid).expect("GC");
    assert_eq!(
        audit(&node, &etcd, "k8s-pods"),
        (vec![pod_a.container_id.clone()], 2)
    );

    node.runtime.del(&list, &pod_a).expect("DEL a");
    node.runtime.del(&list, &pod_b).expect("DEL b");
    assert_eq!(audit(&node, &etcd, "k8s-pods"), (vec![], 0));
}

#[test]
fn plexus_ipam_with_etcd_down_fails_add_in_time_and_journals_del() {
    let node = Node::new("ipam-down");
    let mut etcd = EtcdCluster::start_in(1, &node.netns).expect("etcd");
    let ranges = serde_json::json!([[{"subnet": "10.67.0.0/16"}]]);

    // Nothing listens: ADD fails within the default 5 s, naming the endpoint.
    let dead = format!(
        "http://127.0.0.1:{}",
        netns_harness::etcd::closed_port().expect("port")
    );
    let stdin = ipam_conf(
        "net-down",
        &ipam_section(
            &node,
            etcd_store(std::slice::from_ref(&dead)),
            ranges.clone(),
        ),
    );
    let (_ns, pod) = node.pod("default");
    let started = std::time::Instant::now();
    let err = node
        .runtime
        .raw("plexus-ipam", Command::Add, Some(&pod), &stdin)
        .expect_err("ADD with etcd down");
    let took = started.elapsed();
    // The 5 s, and a debug build's start and exit on a busy machine.
    assert!(took <= Duration::from_millis(6500), "ADD took {took:?}");
    assert_eq!(err.code, cni::code::TRY_AGAIN_LATER, "{err:?}");
    assert!(
        err.msg.contains(&dead) && err.msg.contains("unreachable"),
        "{}",
        err.msg
    );

    // With a real etcd: assign, stop etcd, DEL succeeds and is journaled.
    let stdin = ipam_conf(
        "net-down",
        &ipam_section(&node, etcd_store(&etcd.endpoints()), ranges),
    );
    let (_ns1, pod1) = node.pod("default");
    node.runtime
        .raw("plexus-ipam", Command::Add, Some(&pod1), &stdin)
        .expect("ADD");
    etcd.stop_member(0).expect("stop etcd");
    node.runtime
        .raw("plexus-ipam", Command::Del, Some(&pod1), &stdin)
        .expect("DEL succeeds with etcd down");
    let mut status_conf: serde_json::Value = serde_json::from_slice(&stdin).expect("json");
    status_conf["cniVersion"] = serde_json::json!("1.1.0");
    let status_conf = serde_json::to_vec(&status_conf).expect("json");
    let status = node
        .runtime
        .raw("plexus-ipam", Command::Status, None, &status_conf)
        .expect_err("STATUS with etcd down");
    assert_eq!(status.code, cni::code::PLUGIN_NOT_AVAILABLE, "{status:?}");
    let journal: Vec<_> = std::fs::read_dir(node.scratch.join("ipam-state/journal"))
        .expect("journal dir")
        .flatten()
        .collect();
    assert_eq!(journal.len(), 1, "one release journaled");

    // The next call that reaches etcd replays it.
    etcd.restart_member(0).expect("restart etcd");
    let (_ns2, pod2) = node.pod("default");
    node.runtime
        .raw("plexus-ipam", Command::Add, Some(&pod2), &stdin)
        .expect("ADD after restart");
    node.runtime
        .raw("plexus-ipam", Command::Status, None, &status_conf)
        .expect("STATUS with etcd back");
    assert_eq!(
        audit(&node, &etcd, "net-down"),
        (vec![pod2.container_id.clone()], 1),
        "pod1's release was replayed"
    );
    assert_eq!(
        std::fs::read_dir(node.scratch.join("ipam-state/journal"))
            .expect("journal")
            .count(),
        0
    );
}

/// The durable syncs (`fsync`, `fdatasync`, `sync_file_range`, `syncfs`,
/// `sync`, `msync`) a plugin's process tree made, as strace saw them.
fn syncs(trace: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(trace).unwrap_or_default();
    std::fs::remove_file(trace).ok();
    text.lines()
        .filter(|l| !l.contains("resumed>") && l.contains('('))
        .map(String::from)
        .collect()
}

/// A pod set up entirely by Plexus, its IPAM on the local store: once the
/// node holds a block of the pool, every ADD and every DEL makes exactly one
/// durable sync (IPAM's transaction), and the records need none of their own.
#[test]
fn the_whole_stack_syncs_once_per_add_and_once_per_del() {
    let node = Node::new("ipam-syncs");
    let trace = node.scratch.join("syncs.trace");
    let rt = node
        .runtime_wrapping(
            "plexus",
            &format!(
                "strace -f -qq -e trace=fsync,fdatasync,sync_file_range,syncfs,sync,msync -o {}",
                trace.display()
            ),
        )
        .expect("runtime under strace");
    for (name, ranges) in [
        ("syncs4", serde_json::json!([[{"subnet": "10.73.0.0/24"}]])),
        (
            "syncs6",
            serde_json::json!([[{"subnet": "10.74.0.0/24"}], [{"subnet": "fd00:74::/64"}]]),
        ),
    ] {
        let section = ipam_section(
            &node,
            serde_json::json!({"type": "local", "path": node.scratch.join("store")}),
            ranges,
        );
        let list = node.plexus_list(
            "1.0.0",
            serde_json::json!({"cniVersion": "1.0.0", "name": name, "type": "plexus-veth", "ipam": section}),
        );
        // The first ADD of a pool on a node also makes the store, defines
        // the pool and claims the node's block: transactions of their own.
        let (first, pod) = node.pod("default");
        rt.add(&list, &pod).expect("first ADD");
        assert!(
            !syncs(&trace).is_empty(),
            "{name}: the first ADD is durable"
        );
        for round in 0..3 {
            let (ns, pod) = node.pod("default");
            rt.add(&list, &pod).expect("ADD");
            let add = syncs(&trace);
            assert_eq!(
                add.len(),
                1,
                "{name} ADD {round}: one durable sync: {add:?}"
            );
            rt.del(&list, &pod).expect("DEL");
            let del = syncs(&trace);
            assert_eq!(
                del.len(),
                1,
                "{name} DEL {round}: one durable sync: {del:?}"
            );
            assert_eq!(
                kernel::link_names(ns.name()).expect("links"),
                ["lo"],
                "{name} DEL {round}: the pod holds only lo"
            );
        }
        rt.del(&list, &pod).expect("first DEL");
        syncs(&trace);
        node.assert_released(&first, name);
    }
}

#[test]
fn plexus_ipam_refuses_bad_pools_and_names_the_full_one() {
    let node = Node::new("ipam-bad");
    let local = serde_json::json!({"type": "local", "path": node.scratch.join("store")});
    let (_ns, pod) = node.pod("default");
    for (ranges, why) in [
        (
            serde_json::json!([[{"subnet": "10.70.0.0/24", "gateway": "10.71.0.1"}]]),
            "outside subnet",
        ),
        (
            serde_json::json!([[{"subnet": "10.70.0.0/24"}, {"subnet": "fd00::/64"}]]),
            "mixes IPv4 and IPv6",
        ),
        (serde_json::json!([[{"subnet": "not-a-cidr"}]]), "\"ipam\""),
    ] {
        let stdin = ipam_conf("bad", &ipam_section(&node, local.clone(), ranges));
        let err = node
            .runtime
            .raw("plexus-ipam", Command::Add, Some(&pod), &stdin)
            .expect_err(why);
        assert_eq!(err.code, cni::code::INVALID_NETWORK_CONFIG, "{err:?}");
        assert!(err.msg.contains(why), "{why}: {}", err.msg);
    }
    assert!(
        LocalStore::open(&node.scratch.join("store"))
            .expect("store")
            .range("handles/")
            .expect("handles")
            .is_empty(),
        "nothing was assigned"
    );

    // A /30 has one usable address: the second pod gets the named error.
    let stdin = ipam_conf(
        "tiny",
        &ipam_section(
            &node,
            local,
            serde_json::json!([[{"subnet": "10.72.0.0/30"}]]),
        ),
    );
    let first = node
        .runtime
        .raw("plexus-ipam", Command::Add, Some(&pod), &stdin)
        .expect("ADD");
    assert_eq!(ips_of(&first), vec!["10.72.0.2/30".to_string()]);
    let (_ns2, pod2) = node.pod("default");
    let err = node
        .runtime
        .raw("plexus-ipam", Command::Add, Some(&pod2), &stdin)
        .expect_err("full");
    assert_eq!(err.code, ipam::code::EXHAUSTED);
    assert!(
        err.msg.contains("pool tiny has no free IPv4 address"),
        "{}",
        err.msg
    );
    node.runtime
        .raw("plexus-ipam", Command::Del, Some(&pod), &stdin)
        .expect("DEL");
    node.runtime
        .raw("plexus-ipam", Command::Del, Some(&pod), &stdin)
        .expect("DEL again");
    node.runtime
        .raw("plexus-ipam", Command::Add, Some(&pod2), &stdin)
        .expect("ADD after release");
}

#[test]
fn etcd_store_speaks_tls_with_client_certificates_and_user_password() {
    let dir = Scratch::new("etcd-tls").expect("scratch");
    let (server, client) = netns_harness::etcd::Tls::generate(dir.path()).expect("certificates");
    let etcd = EtcdCluster::start_tls(1, server).expect("etcd over TLS");
    let mut conf = EtcdConf::new(etcd.endpoints(), "/t/tls/");
    conf.ca_file = Some(client.ca.to_string_lossy().into_owned());
    conf.cert_file = Some(client.cert.to_string_lossy().into_owned());
    conf.key_file = Some(client.key.to_string_lossy().into_owned());
    conf.timeout_seconds = Some(3.0);
    let pool = dual_pool("tls");
    let h = HandleId::new("tls", "c1", "eth0");
    let mut a = Allocator::new(EtcdStore::connect(&conf).expect("connect over TLS"), "n1");
    a.define_pool(&pool).expect("define over TLS");
    let rec = a.assign(&pool, &h, &[]).expect("assign over TLS");

    // Without a client certificate etcd refuses the connection.
    let mut bare = conf.clone();
    bare.cert_file = None;
    bare.key_file = None;
    let refused = EtcdStore::connect(&bare).and_then(|s| Allocator::new(s, "n2").lookup(&h));
    assert!(
        matches!(refused, Err(Error::Unreachable { .. })),
        "no client certificate: {refused:?}"
    );

    // With authentication on, the user and password are what counts.
    etcd.enable_auth("s3cret").expect("enable auth");
    let mut user = conf.clone();
    user.username = Some("root".into());
    user.password = Some("s3cret".into());
    let mut b = Allocator::new(EtcdStore::connect(&user).expect("connect as root"), "n2");
    assert_eq!(b.lookup(&h).expect("lookup as root"), Some(rec));
    let mut wrong = user.clone();
    wrong.password = Some("guess".into());
    let denied = EtcdStore::connect(&wrong).and_then(|s| Allocator::new(s, "n3").lookup(&h));
    assert!(
        matches!(&denied, Err(Error::Config(m)) if m.contains("authentication failed")),
        "wrong password: {denied:?}"
    );
}

#[test]
fn plexus_ipam_named_pools_and_static_requests() {
    let node = Node::new("ipam-named");
    let local = serde_json::json!({"type": "local", "path": node.scratch.join("store")});
    let add = |network: &str, ipam: &serde_json::Value, extra: serde_json::Value| {
        let (ns, pod) = node.pod("default");
        let mut conf = serde_json::json!({
            "cniVersion": "1.0.0", "name": network, "type": "plexus-veth", "ipam": ipam,
        });
        if let (Some(c), Some(x)) = (conf.as_object_mut(), extra.as_object()) {
            c.extend(x.clone());
        }
        let stdin = serde_json::to_vec(&conf).expect("json");
        let out = node
            .runtime
            .raw("plexus-ipam", Command::Add, Some(&pod), &stdin);
        drop(ns);
        out
    };

    // One network defines pool "shared"; another uses it by name alone.
    let mut defining = ipam_section(
        &node,
        local.clone(),
        serde_json::json!([[{"subnet": "10.73.0.0/24"}]]),
    );
    defining["pool"] = serde_json::json!("shared");
    let a = ips_of(&add("net-a", &defining, serde_json::json!({})).expect("ADD net-a"));
    let named = serde_json::json!({
        "type": "plexus-ipam", "pool": "shared", "store": local,
        "nodeName": "node-1", "stateDir": node.scratch.join("ipam-state"),
    });
    let b = ips_of(&add("net-b", &named, serde_json::json!({})).expect("ADD net-b"));
    assert!(
        b[0].starts_with("10.73.0.") && b[0].ends_with("/24") && a != b,
        "{a:?} {b:?}"
    );

    let mut unknown = named.clone();
    unknown["pool"] = serde_json::json!("nope");
    let err = add("net-c", &unknown, serde_json::json!({})).expect_err("unknown pool");
    assert_eq!(err.code, cni::code::INVALID_NETWORK_CONFIG);
    assert!(err.msg.contains("pool nope is not defined"), "{}", err.msg);

    // Static requests: the `ips` capability and `args.cni.ips`.
    let by_cap = add(
        "net-b",
        &named,
        serde_json::json!({"runtimeConfig": {"ips": ["10.73.0.77/24"]}}),
    );
    assert_eq!(
        ips_of(&by_cap.expect("ips capability")),
        vec!["10.73.0.77/24".to_string()]
    );
    let by_args = add(
        "net-b",
        &named,
        serde_json::json!({"args": {"cni": {"ips": ["10.73.0.78"]}}}),
    );
    assert_eq!(
        ips_of(&by_args.expect("args.cni.ips")),
        vec!["10.73.0.78/24".to_string()]
    );
    let taken = add(
        "net-b",
        &named,
        serde_json::json!({"runtimeConfig": {"ips": ["10.73.0.77"]}}),
    )
    .expect_err("taken");
    assert_eq!(taken.code, ipam::code::UNAVAILABLE);
    assert!(taken.msg.contains("already assigned"), "{}", taken.msg);
}

/// The node conflist with `name` (plexus-veth + plexus-ipam on `etcd`
/// through the relay at `socket`) as the cluster network; IPAM's debug
/// lines logged when `debug`.
fn relayed_list(
    node: &Node,
    etcd: &EtcdCluster,
    socket: &Path,
    name: &str,
    subnet: &str,
    debug: bool,
) -> NetConfList {
    let mut store = etcd_store(&etcd.endpoints());
    store["relay"] = serde_json::json!(socket);
    // No reserve: every ADD asks the store, and the way it takes there is
    // what these tests follow.
    store["reserve"] = serde_json::json!(0);
    let cluster = serde_json::json!({
        "cniVersion": "1.0.0", "name": name, "type": "plexus-veth",
        "ipam": ipam_section(node, store, serde_json::json!([[{"subnet": subnet}]])),
    });
    let mut list = node.plexus_list("1.0.0", cluster);
    if let Some(p) = list.plugins.first_mut().filter(|_| debug) {
        p.insert("logLevel".into(), serde_json::json!("debug"));
    }
    list
}

/// The `store="…"` of each "IPAM ADD/DEL done" line in the node's log.
fn ipam_stores(node: &Node) -> Vec<String> {
    let text = std::fs::read_to_string(node.log_file()).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("IPAM ADD done") || l.contains("IPAM DEL done"))
        .filter_map(|l| {
            l.split("store=\"")
                .nth(1)?
                .split('"')
                .next()
                .map(String::from)
        })
        .collect()
}

#[test]
fn plexus_ipam_on_etcd_goes_through_the_store_relay_while_one_answers() {
    let node = Node::new("ipam-relay");
    let etcd = EtcdCluster::start_in(1, &node.netns).expect("etcd");
    let socket = node.scratch.join("relay").join("store.sock");
    let mut relay = StoreRelay::start_in(&node.netns, &socket).expect("relay");
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the relay's socket is root's alone");
    // A second relay on the same socket refuses, and leaves the first be.
    let second = std::process::Command::new(netns_harness::scratch::plexus_bin())
        .args(["store-relay", &socket.to_string_lossy()])
        .output()
        .expect("run a second relay");
    assert!(!second.status.success(), "a second relay took the socket");
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another store relay listens there"),
        "{second:?}"
    );
    let list = relayed_list(&node, &etcd, &socket, "relayed", "10.67.0.0/24", true);
    let (_ns_a, pod_a) = node.pod("default");
    let (ns_b, pod_b) = node.pod("default");

    node.runtime
        .add(&list, &pod_a)
        .expect("ADD a through the relay");
    assert_eq!(ipam_stores(&node), ["etcd via the relay"]);
    assert_eq!(
        audit(&node, &etcd, "relayed").0,
        vec![pod_a.container_id.clone()]
    );

    // The relay dies (its socket file stays): straight to etcd.
    relay.kill();
    node.runtime
        .add(&list, &pod_b)
        .expect("ADD b without the relay");
    assert_eq!(ipam_stores(&node), ["etcd via the relay", "etcd"]);
    assert_eq!(kernel::addrs(ns_b.name(), "eth0").expect("addrs").len(), 1);
    let mut both = vec![pod_a.container_id.clone(), pod_b.container_id.clone()];
    both.sort();
    assert_eq!(audit(&node, &etcd, "relayed").0, both);

    // A relay that takes no client (stuck, or busy with another): straight
    // to etcd after a moment, never waiting out the call's time.
    let stuck_socket = node.scratch.join("stuck.sock");
    let _stuck = std::os::unix::net::UnixListener::bind(&stuck_socket).expect("bind");
    let stuck_list = relayed_list(
        &node,
        &etcd,
        &stuck_socket,
        "relayed",
        "10.67.0.0/24",
        false,
    );
    let (_ns_c, pod_c) = node.pod("default");
    let started = std::time::Instant::now();
    node.runtime
        .add(&stuck_list, &pod_c)
        .expect("ADD c past a stuck relay");
    // Far from the call's 5 s, with room for a debug build on a busy machine.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    node.runtime.del(&stuck_list, &pod_c).expect("DEL c");

    // Started again over the stale socket: DEL goes through it.
    let _relay = StoreRelay::start_in(&node.netns, &socket).expect("relay again");
    // A client that sends garbage is hung up on; the relay goes on.
    {
        use std::io::{Read, Write};
        let mut bad = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
        bad.write_all(b"not json\n").expect("write");
        let mut rest = Vec::new();
        bad.read_to_end(&mut rest).expect("hung up on");
        assert!(rest.is_empty(), "{rest:?}");
    }
    node.runtime.del(&list, &pod_a).expect("DEL a");
    node.runtime.del(&list, &pod_b).expect("DEL b");
    assert_eq!(
        ipam_stores(&node),
        [
            "etcd via the relay",
            "etcd",
            "etcd via the relay",
            "etcd via the relay"
        ]
    );
    assert_eq!(audit(&node, &etcd, "relayed"), (vec![], 0));
}

#[test]
fn the_store_relay_sends_calls_to_the_etcd_leader_and_follows_a_new_one() {
    let node = Node::new("ipam-relay-leader");
    let mut etcd = EtcdCluster::start_in(3, &node.netns).expect("etcd");
    let socket = node.scratch.join("store.sock");
    let relay = StoreRelay::start_in(&node.netns, &socket).expect("relay");
    let list = relayed_list(&node, &etcd, &socket, "led", "10.68.0.0/24", true);
    let endpoints = etcd.endpoints();
    // The relay learns the leader once a client has hung up, after its
    // answer: the line is waited for.
    let leader_named = |relay: &StoreRelay, i: usize| {
        let want = format!("leader=\"{}\"", endpoints[i]);
        relay.logged_within(Duration::from_secs(10), |l| {
            l.contains("etcd leader") && l.contains(&want)
        })
    };
    let (_a, pod_a) = node.pod("default");
    node.runtime.add(&list, &pod_a).expect("ADD a");
    let leader = etcd.leader().expect("a leader");
    assert!(leader_named(&relay, leader), "{}", relay.log_text());

    // The leader goes: the call still goes through the relay, which asks
    // any member, then learns who leads now.
    etcd.stop_member(leader).expect("stop the leader");
    let (_b, pod_b) = node.pod("default");
    node.runtime
        .add(&list, &pod_b)
        .expect("ADD b, the leader gone");
    let (_c, pod_c) = node.pod("default");
    node.runtime.add(&list, &pod_c).expect("ADD c");
    assert_eq!(ipam_stores(&node), ["etcd via the relay"; 3]);
    let now = etcd.leader().expect("a new leader");
    assert_ne!(now, leader);
    assert!(leader_named(&relay, now), "{}", relay.log_text());
    let mut held = vec![
        pod_a.container_id.clone(),
        pod_b.container_id.clone(),
        pod_c.container_id.clone(),
    ];
    held.sort();
    assert_eq!(audit(&node, &etcd, "led").0, held);
    for pod in [&pod_a, &pod_b, &pod_c] {
        node.runtime.del(&list, pod).expect("DEL");
    }
    assert_eq!(audit(&node, &etcd, "led"), (vec![], 0));
}

/// Node-1's blocks of `pool` in etcd: key → block.
fn node_blocks(node: &Node, etcd: &EtcdCluster, pool: &str) -> Vec<(String, ipam::block::Block)> {
    let endpoints = etcd.endpoints();
    let pool = pool.to_string();
    node.netns
        .run(move || {
            let mut store =
                EtcdStore::connect(&EtcdConf::new(endpoints, "/plexus/ipam/")).expect("connect");
            store
                .range(&format!("blocks/{pool}/node-1/"))
                .expect("blocks")
                .into_iter()
                .map(|kv| (kv.key, serde_json::from_slice(&kv.value).expect("a block")))
                .collect()
        })
        .expect("run in the node netns")
}

/// The addresses node-1 holds in its reserve, read from etcd.
fn reserve_in_etcd(node: &Node, etcd: &EtcdCluster, pool: &str) -> Vec<IpAddr> {
    node_blocks(node, etcd, pool)
        .into_iter()
        .flat_map(|(key, block)| {
            let cidr = ipam::block::block_cidr(&key).expect("a block key");
            block
                .reserved()
                .map(|o| cidr.nth(u128::from(o)))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The reserve node-1's cache holds for `pool`: what the next ADD hands out.
/// The file is a checksum line, then the cache.
fn reserve_in_cache(node: &Node, pool: &str) -> Vec<IpAddr> {
    ipam_cache_files(&node.scratch.join("ipam-state"))
        .into_iter()
        .filter_map(|raw| {
            let body = raw.splitn(2, |b| *b == b'\n').nth(1)?.to_vec();
            serde_json::from_slice::<ipam::alloc::NodeCache>(&body).ok()
        })
        .filter_map(|mut cache| cache.remove(pool))
        .flat_map(|c| c.reserve)
        .collect()
}

/// Node-1's reserve once the publisher has topped it up to `n` (it runs
/// after ADD answers), in etcd and then in the node's cache (the publisher
/// writes it there last); panics after 10 s.
fn reserve_filled(node: &Node, etcd: &EtcdCluster, pool: &str, n: usize) -> Vec<IpAddr> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut reserve = reserve_in_etcd(node, etcd, pool);
        reserve.sort();
        let mut cached = reserve_in_cache(node, pool);
        cached.sort();
        if reserve.len() == n && cached == reserve {
            return reserve;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "etcd {reserve:?}, cache {cached:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `store="…"` and `round_trips=…` of the last "IPAM ADD done" line.
fn last_ipam_add(node: &Node) -> (String, String) {
    let text = std::fs::read_to_string(node.log_file()).unwrap_or_default();
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("IPAM ADD done"))
        .unwrap_or_default()
        .to_string();
    let field = |name: &str| {
        line.split(&format!("{name}="))
            .nth(1)
            .map(|rest| match rest.strip_prefix('"') {
                Some(quoted) => quoted.split('"').next().unwrap_or_default().to_string(),
                None => rest.split(' ').next().unwrap_or_default().to_string(),
            })
            .unwrap_or_default()
    };
    (field("store"), field("round_trips"))
}

#[test]
fn plexus_on_etcd_answers_add_from_the_nodes_reserve_and_publishes_after() {
    let node = Node::new("ipam-reserve");
    let mut etcd = EtcdCluster::start_in(1, &node.netns).expect("etcd");
    let cluster = serde_json::json!({
        "cniVersion": "1.0.0", "name": "resv", "type": "plexus-veth",
        "ipam": ipam_section(&node, etcd_store(&etcd.endpoints()),
            serde_json::json!([[{"subnet": "10.69.0.0/24"}]])),
    });
    let mut list = node.plexus_list("1.0.0", cluster);
    if let Some(p) = list.plugins.first_mut() {
        p.insert("logLevel".into(), serde_json::json!("debug"));
    }
    let ip_of = |ns: &netns_harness::Netns| -> IpAddr {
        let addrs = kernel::addrs(ns.name(), "eth0").expect("addrs");
        assert_eq!(addrs.len(), 1, "{addrs:?}");
        addr_ip(&addrs[0])
    };

    // The node's first ADD asks etcd (nothing reserved yet); its publisher
    // then reserves the node's next two addresses in its block.
    let (ns_a, pod_a) = node.pod("default");
    node.runtime.add(&list, &pod_a).expect("ADD a");
    let (store, round_trips) = last_ipam_add(&node);
    assert_eq!(store, "etcd");
    assert_ne!(round_trips, "0");
    let reserve = reserve_filled(&node, &etcd, "resv", 2);
    let a = ip_of(&ns_a);
    assert!(!reserve.contains(&a), "{a} is pod a's, not reserved");

    // The next ADD is answered from the reserve, with no round trip; its
    // handle is in etcd once the publisher ran, and the reserve is full again.
    let (ns_b, pod_b) = node.pod("default");
    node.runtime.add(&list, &pod_b).expect("ADD b");
    assert_eq!(
        last_ipam_add(&node),
        ("the node's reserve".into(), "0".into())
    );
    let b = ip_of(&ns_b);
    assert!(reserve.contains(&b), "{b} not from the reserve {reserve:?}");
    let mut held = vec![pod_a.container_id.clone(), pod_b.container_id.clone()];
    held.sort();
    assert_eq!(audit(&node, &etcd, "resv"), (held.clone(), 2));
    let reserve = reserve_filled(&node, &etcd, "resv", 2);
    assert!(
        !reserve.contains(&a) && !reserve.contains(&b),
        "{reserve:?}"
    );

    // Another node takes every address left, borrowing from node-1's block
    // once the pool has no block to claim: never one node-1 reserved.
    let endpoints = etcd.endpoints();
    let taken: Vec<IpAddr> = node
        .netns
        .run(move || {
            let conf = EtcdConf::new(endpoints, "/plexus/ipam/");
            let mut other = Allocator::new(EtcdStore::connect(&conf).expect("connect"), "node-2");
            let pool = other.pool("resv").expect("pool");
            let mut got = Vec::new();
            for i in 0.. {
                match other.assign(
                    &pool,
                    &HandleId::new("resv", &format!("other-{i}"), "eth0"),
                    &[],
                ) {
                    Ok(r) => got.extend(r.addresses.iter().map(|a| a.ip)),
                    Err(Error::Exhausted { .. }) => break,
                    Err(e) => panic!("node-2: {e}"),
                }
            }
            let borrowed = other.stats().borrows;
            assert!(borrowed > 0, "node-2 never borrowed from node-1's block");
            for i in 0..got.len() {
                other
                    .release(&HandleId::new("resv", &format!("other-{i}"), "eth0"))
                    .expect("node-2 releases");
            }
            got
        })
        .expect("run in the node netns");
    for ip in reserve.iter().chain([&a, &b]) {
        assert!(!taken.contains(ip), "node-2 got {ip}, node-1's");
    }

    // etcd down: ADD still answers from the reserve; DEL succeeds too (its
    // release journaled), and once etcd is back the address goes back to
    // the pool with no handle ever written.
    etcd.stop_member(0).expect("stop etcd");
    let (ns_c, pod_c) = node.pod("default");
    node.runtime
        .add(&list, &pod_c)
        .expect("ADD c with etcd down");
    let c = ip_of(&ns_c);
    assert!(reserve.contains(&c), "{c} not from the reserve {reserve:?}");
    node.runtime
        .del(&list, &pod_c)
        .expect("DEL c with etcd down");
    etcd.restart_member(0).expect("etcd again");
    etcd.wait_healthy(0, Duration::from_secs(10))
        .expect("healthy");
    node.runtime.del(&list, &pod_b).expect("DEL b");
    assert_eq!(
        audit(&node, &etcd, "resv"),
        (vec![pod_a.container_id.clone()], 1)
    );
    let after = reserve_filled(&node, &etcd, "resv", 2);
    assert!(!after.contains(&c), "{c} went back to the pool: {after:?}");

    // Node-1 gone for good: reclaiming it gives its reserve back with it.
    node.runtime.del(&list, &pod_a).expect("DEL a");
    let endpoints = etcd.endpoints();
    node.netns
        .run(move || {
            let conf = EtcdConf::new(endpoints, "/plexus/ipam/");
            let mut admin = Allocator::new(EtcdStore::connect(&conf).expect("connect"), "admin");
            let pool = admin.pool("resv").expect("pool");
            let done = admin.reclaim("node-1").expect("reclaim");
            assert!(done.kept.is_empty(), "{done:?}");
            assert!(!done.blocks.is_empty(), "{done:?}");
            assert_eq!(
                admin.allocated(&pool).expect("allocated"),
                Vec::<IpAddr>::new()
            );
        })
        .expect("run in the node netns");
    assert!(node_blocks(&node, &etcd, "resv").is_empty());
}
