//! `make bench-scale`: `plexus-ipam` in clusters of 8 to 5,000 nodes,
//! simulated against one real 3-member etcd (Debian's). Each node is an
//! `Allocator` of its own (its own name and cache), driven in-process by a
//! few threads; a pod has two networks, each a dual-stack pool of a /12 and a
//! /64 cut into /26 and /122 blocks.
//!
//! Per cluster size, each under an etcd prefix of its own:
//! 1. cold start: every node, none with a cache or a block, adds its first
//!    pod at once (64 threads), as after a cluster-wide restart; every
//!    address is checked distinct;
//! 2. churn: 8 threads add and delete pods on random nodes of theirs (as
//!    many ADDs as DELs, about), at the same concurrency whatever the size.
//!
//! It prints allocation rates, latencies, conflicts, claims, borrows, etcd's
//! keys and database size and the bytes an allocation writes, then the
//! targets: the 5,000-node rate and p99 against the 8-node ones, cold-start
//! conflicts per allocation, bytes per allocation as the cluster grows.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use ipam::config::EtcdConf;
use ipam::{Allocator, EtcdStore, HandleId, Pool, Stats};

use crate::bench::{ms, percentile, verdict};
use crate::etcd::EtcdCluster;

/// The networks of every pod, each with a pool of its own.
const NETWORKS: [(&str, &str, &str); 2] = [
    ("net-a", "10.0.0.0/12", "fd00:a::/64"),
    ("net-b", "10.16.0.0/12", "fd00:b::/64"),
];
/// Threads of the cold start and of the churn.
const COLD_THREADS: usize = 64;
const CHURN_THREADS: usize = 8;
/// Pod ADDs and DELs of the churn, all threads together.
const CHURN_OPS: usize = 4000;

fn pool(name: &str, v4: &str, v6: &str) -> Result<Pool, String> {
    serde_json::from_value::<Pool>(serde_json::json!({
        "name": name,
        "ranges": [{"subnet": v4}, {"subnet": v6}],
        "blockSizes": {"ipv4": 26, "ipv6": 122},
    }))
    .map_err(|e| e.to_string())?
    .validated()
    .map_err(|e| e.to_string())
}

/// Fixed-width node names: keys (and so the bytes written) do not grow
/// with the node count.
fn node_name(i: usize) -> String {
    format!("node-{i:05}")
}

/// What one phase measured, all threads together.
#[derive(Default)]
struct Phase {
    /// Pod ADD latencies (every network of the pod).
    adds: Vec<Duration>,
    /// Allocations: one per network of each pod ADD.
    allocations: u64,
    dels: u64,
    wall: Duration,
    stats: Stats,
    /// Bytes the allocations' transactions wrote (claims they made included).
    alloc_bytes: u64,
    /// Every address handed out, for the duplicate check.
    addresses: Vec<IpAddr>,
}

impl Phase {
    fn merge(&mut self, other: Phase) {
        self.adds.extend(other.adds);
        self.allocations += other.allocations;
        self.dels += other.dels;
        self.stats += other.stats;
        self.alloc_bytes += other.alloc_bytes;
        self.addresses.extend(other.addresses);
    }

    fn rate(&self) -> f64 {
        self.allocations as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// One simulated node: its allocator and its pods (container ids).
struct SimNode {
    alloc: Allocator<EtcdStore>,
    pods: Vec<String>,
    next: usize,
}

impl SimNode {
    /// ADDs a pod: an address pair from each network's pool.
    fn add(&mut self, pools: &[Pool], phase: &mut Phase) -> Result<(), String> {
        let id = format!("{}-{}", self.alloc.node(), self.next);
        self.next += 1;
        let t = Instant::now();
        for pool in pools {
            let before = self.alloc.stats().written;
            let rec = self
                .alloc
                .assign(pool, &HandleId::new(&pool.name, &id, "eth0"), &[])
                .map_err(|e| format!("{}: ADD {id}: {e}", self.alloc.node()))?;
            phase.alloc_bytes += self.alloc.stats().written - before;
            phase.allocations += 1;
            phase.addresses.extend(rec.addresses.iter().map(|a| a.ip));
        }
        phase.adds.push(t.elapsed());
        self.pods.push(id);
        Ok(())
    }

    /// DELs its `i`-th pod.
    fn del(&mut self, pools: &[Pool], i: usize, phase: &mut Phase) -> Result<(), String> {
        let id = self.pods.swap_remove(i);
        for pool in pools {
            self.alloc
                .release(&HandleId::new(&pool.name, &id, "eth0"))
                .map_err(|e| format!("{}: DEL {id}: {e}", self.alloc.node()))?;
        }
        phase.dels += 1;
        Ok(())
    }
}

/// A small deterministic generator (xorshift), one per thread.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Runs `work` on `threads` threads, each with the nodes `i` where
/// `i % threads` is its number, released together; the phase's wall time
/// is from the release to the last thread's end.
fn phase<F>(
    nodes: &Arc<Mutex<Vec<Option<SimNode>>>>,
    threads: usize,
    work: F,
) -> Result<Phase, String>
where
    F: Fn(usize, &mut [SimNode]) -> Result<Phase, String> + Send + Sync + 'static,
{
    let work = Arc::new(work);
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (work, barrier, nodes) = (work.clone(), barrier.clone(), nodes.clone());
            std::thread::spawn(move || -> Result<Phase, String> {
                let mut mine: Vec<SimNode> = {
                    let mut all = nodes.lock().map_err(|_| "poisoned")?;
                    all.iter_mut()
                        .enumerate()
                        .filter(|(i, _)| i % threads == t)
                        .filter_map(|(_, n)| n.take())
                        .collect()
                };
                barrier.wait();
                let out = work(t, &mut mine);
                // Back in their places for the next phase.
                let mut back = mine.into_iter();
                let mut all = nodes.lock().map_err(|_| "poisoned")?;
                for (i, slot) in all.iter_mut().enumerate() {
                    if i % threads == t {
                        *slot = back.next();
                    }
                }
                out
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut total = Phase::default();
    let mut first_error = None;
    for h in handles {
        match h.join().map_err(|_| "bench thread panicked".to_string())? {
            Ok(p) => total.merge(p),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    total.wall = start.elapsed();
    match first_error {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

/// The row printed for one cluster size.
struct Row {
    n: usize,
    cold: Phase,
    churn: Phase,
    keys: u64,
    db_bytes: u64,
}

/// Keys under `prefix` and the largest member database, from etcdctl.
fn etcd_size(etcd: &EtcdCluster, prefix: &str) -> (u64, u64) {
    let keys = etcd
        .etcdctl(
            0,
            &[
                "get",
                "--prefix",
                prefix,
                "--keys-only",
                "--limit=1",
                "-w",
                "json",
            ],
        )
        .ok()
        .and_then(|out| serde_json::from_str::<serde_json::Value>(&out).ok())
        .and_then(|v| v["count"].as_u64())
        .unwrap_or(0);
    let db = etcd
        .etcdctl(0, &["endpoint", "status", "--cluster", "-w", "json"])
        .ok()
        .and_then(|out| serde_json::from_str::<serde_json::Value>(&out).ok())
        .and_then(|v| {
            v.as_array()?
                .iter()
                .filter_map(|m| m["Status"]["dbSize"].as_u64())
                .max()
        })
        .unwrap_or(0);
    (keys, db)
}

fn cluster(etcd: &EtcdCluster, n: usize) -> Result<Row, String> {
    let prefix = format!("/scale/{n}/");
    let conf = EtcdConf::new(etcd.endpoints(), &prefix);
    let pools: Vec<Pool> = NETWORKS
        .iter()
        .map(|(name, v4, v6)| pool(name, v4, v6))
        .collect::<Result<_, _>>()?;
    {
        let mut admin = Allocator::new(
            EtcdStore::connect(&conf).map_err(|e| e.to_string())?,
            "admin",
        );
        for p in &pools {
            admin.define_pool(p).map_err(|e| e.to_string())?;
        }
    }
    // Every node cold: a fresh allocator, no cache, no block in the store.
    // The threads of the cold start each connect once; their nodes share it.
    let cold_threads = COLD_THREADS.min(n);
    let mut connections = Vec::new();
    for _ in 0..cold_threads {
        connections.push(EtcdStore::connect(&conf).map_err(|e| e.to_string())?);
    }
    let nodes: Vec<Option<SimNode>> = (0..n)
        .map(|i| {
            Some(SimNode {
                alloc: Allocator::new(connections[i % cold_threads].share(), &node_name(i)),
                pods: Vec::new(),
                next: 0,
            })
        })
        .collect();
    let nodes = Arc::new(Mutex::new(nodes));
    let p = pools.clone();
    let cold = phase(&nodes, cold_threads, move |_, mine| {
        let mut out = Phase::default();
        let before: Vec<Stats> = mine.iter().map(|s| s.alloc.stats()).collect();
        for node in mine.iter_mut() {
            node.add(&p, &mut out)?;
        }
        out.stats = delta(mine, &before);
        Ok(out)
    })?;
    let distinct: HashSet<&IpAddr> = cold.addresses.iter().collect();
    if distinct.len() != cold.addresses.len() {
        return Err(format!(
            "{n} nodes, cold start: {} addresses handed out twice",
            cold.addresses.len() - distinct.len()
        ));
    }
    // The churn: the same 8 threads whatever the size, each on its own
    // connection; the nodes are rehomed (a node's store is its thread's).
    let churn_threads = CHURN_THREADS.min(n);
    let mut churn_conns = Vec::new();
    for _ in 0..churn_threads {
        churn_conns.push(EtcdStore::connect(&conf).map_err(|e| e.to_string())?);
    }
    {
        let mut all = nodes.lock().map_err(|_| "poisoned")?;
        for (i, slot) in all.iter_mut().enumerate() {
            if let Some(node) = slot.take() {
                let cache = node.alloc.cache().clone();
                *slot = Some(SimNode {
                    alloc: Allocator::new(churn_conns[i % churn_threads].share(), &node_name(i))
                        .with_cache(cache),
                    ..node
                });
            }
        }
    }
    let p = pools.clone();
    let per_thread = CHURN_OPS / churn_threads;
    let churn = phase(&nodes, churn_threads, move |t, mine| {
        let mut out = Phase::default();
        let before: Vec<Stats> = mine.iter().map(|s| s.alloc.stats()).collect();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1));
        for _ in 0..per_thread {
            let node = &mut mine[rng.below(mine.len())];
            if !node.pods.is_empty() && rng.below(2) == 0 {
                let i = rng.below(node.pods.len());
                node.del(&p, i, &mut out)?;
            } else {
                node.add(&p, &mut out)?;
            }
        }
        out.stats = delta(mine, &before);
        Ok(out)
    })?;
    let (keys, db_bytes) = etcd_size(etcd, &prefix);
    Ok(Row {
        n,
        cold,
        churn,
        keys,
        db_bytes,
    })
}

/// The counters `nodes` added since `before`.
fn delta(nodes: &[SimNode], before: &[Stats]) -> Stats {
    let mut d = Stats::default();
    for (node, b) in nodes.iter().zip(before) {
        d += node.alloc.stats() - *b;
    }
    d
}

/// `bench-scale [N…]`: the cluster sizes (default 8, 64, 512, 5000).
pub fn run(sizes: &[usize]) -> Result<(), String> {
    let sizes: Vec<usize> = if sizes.is_empty() {
        vec![8, 64, 512, 5000]
    } else {
        sizes.to_vec()
    };
    let etcd = EtcdCluster::start(3).map_err(|e| format!("etcd: {e}"))?;
    println!(
        "== make bench-scale: plexus-ipam, simulated nodes (one Allocator and cache each, \
         in-process) against one 3-member etcd (Debian's); pods of {} networks, each a \
         dual-stack pool of a /12 and a /64 in /26 and /122 blocks",
        NETWORKS.len()
    );
    println!(
        "   cold start: every node adds its first pod at once ({COLD_THREADS} threads); churn: \
         {CHURN_OPS} pod ADDs and DELs on random nodes ({CHURN_THREADS} threads, whatever the size)"
    );
    let mut rows = Vec::new();
    for &n in &sizes {
        let t = Instant::now();
        let row = cluster(&etcd, n)?;
        println!(
            "   {n} nodes simulated in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        rows.push(row);
    }
    println!(
        "\n{:>6} | {:>9} {:>8} {:>8} {:>9} {:>7} | {:>9} {:>8} {:>8} {:>9} {:>7} {:>7} | {:>7} {:>9} {:>8}",
        "nodes",
        "cold al/s",
        "ADD p50",
        "ADD p99",
        "confl/al",
        "claims",
        "churn al/s",
        "ADD p50",
        "ADD p99",
        "confl/al",
        "claims",
        "borrows",
        "keys",
        "etcd db",
        "B/alloc"
    );
    for r in rows.iter_mut() {
        for p in [&mut r.cold, &mut r.churn] {
            p.adds.sort();
        }
        let (c, h) = (&r.cold, &r.churn);
        println!(
            "{:>6} | {:>9.0} {:>6.2}ms {:>6.2}ms {:>9.3} {:>7} | {:>10.0} {:>6.2}ms {:>6.2}ms {:>9.3} {:>7} {:>7} | {:>7} {:>7.1}MiB {:>8.0}",
            r.n,
            c.rate(),
            ms(percentile(&c.adds, 0.5)),
            ms(percentile(&c.adds, 0.99)),
            c.stats.conflicts as f64 / c.allocations.max(1) as f64,
            c.stats.claims,
            h.rate(),
            ms(percentile(&h.adds, 0.5)),
            ms(percentile(&h.adds, 0.99)),
            h.stats.conflicts as f64 / h.allocations.max(1) as f64,
            h.stats.claims,
            h.stats.borrows + c.stats.borrows,
            r.keys,
            r.db_bytes as f64 / (1024.0 * 1024.0),
            h.alloc_bytes as f64 / h.allocations.max(1) as f64,
        );
    }
    println!(
        "  (al/s: allocations per second, one per network of a pod ADD; ADD: a pod's ADD, every \
         network; confl/al: transactions that lost a comparison, per allocation; B/alloc: bytes \
         of keys and values one allocation writes in the churn, claims included; etcd db: the \
         largest member's database, all sizes so far)"
    );
    let (Some(small), Some(big)) = (rows.first(), rows.last()) else {
        return Ok(());
    };
    if rows.len() > 1 {
        let label = format!("{} nodes against {}", big.n, small.n);
        verdict(
            &format!("churn allocation rate, {label}"),
            big.churn.rate() / small.churn.rate(),
            0.8,
            true,
        );
        verdict(
            &format!("churn ADD p99, {label}"),
            ms(percentile(&big.churn.adds, 0.99)) / ms(percentile(&small.churn.adds, 0.99)),
            2.0,
            false,
        );
        let bytes = |r: &Row| r.churn.alloc_bytes as f64 / r.churn.allocations.max(1) as f64;
        verdict(
            &format!("bytes per allocation, {label}"),
            bytes(big) / bytes(small),
            1.1,
            false,
        );
    }
    println!(
        "  cold start of {} nodes: every node has its first addresses ({} allocations), 0 duplicates",
        big.n, big.cold.allocations
    );
    verdict(
        &format!("cold-start conflicts per allocation, {} nodes", big.n),
        big.cold.stats.conflicts as f64 / big.cold.allocations.max(1) as f64,
        0.05,
        false,
    );
    Ok(())
}
