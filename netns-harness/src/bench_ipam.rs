//! `make bench`, IPAM part: allocations per second and latency with 1, 4 and
//! 8 concurrent nodes against a 3-member etcd, beside the raw rate of
//! single-key compare-and-swap transactions on the same etcd in the same
//! run: one transaction per allocation is the physical limit.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use ipam::config::EtcdConf;
use ipam::store::Txn;
use ipam::{Allocator, EtcdStore, HandleId, Pool, Store};

use crate::bench::percentile;
use crate::etcd::EtcdCluster;

/// Operations per node (or client) in each run.
const PER_NODE: usize = 250;

struct Measured {
    rate: f64,
    p50: Duration,
    p99: Duration,
    conflicts: u64,
    txns: u64,
}

fn connect(endpoints: &[String], prefix: &str) -> Result<EtcdStore, String> {
    EtcdStore::connect(&EtcdConf::new(endpoints.to_vec(), prefix)).map_err(|e| e.to_string())
}

/// Runs `work(i)` on `n` threads released together; each returns its
/// latencies and counters. Returns the combined measurement.
fn parallel<F>(n: usize, work: F) -> Result<Measured, String>
where
    F: Fn(usize, &Barrier) -> Result<(Vec<Duration>, u64, u64), String> + Send + Sync + 'static,
{
    let work = Arc::new(work);
    let barrier = Arc::new(Barrier::new(n + 1));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let (work, barrier) = (work.clone(), barrier.clone());
            std::thread::spawn(move || work(i, &barrier))
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut all = Vec::new();
    let (mut conflicts, mut txns) = (0, 0);
    for t in threads {
        let (lat, c, x) = t
            .join()
            .map_err(|_| "bench thread panicked".to_string())??;
        all.extend(lat);
        conflicts += c;
        txns += x;
    }
    let wall = start.elapsed();
    all.sort();
    Ok(Measured {
        rate: all.len() as f64 / wall.as_secs_f64(),
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        conflicts,
        txns,
    })
}

/// `n` clients, each compare-and-swapping its own key `PER_NODE` times.
fn raw_cas(endpoints: &[String], run: &str, n: usize) -> Result<Measured, String> {
    let endpoints = endpoints.to_vec();
    let prefix = format!("/bench/{run}/cas/");
    parallel(n, move |i, barrier| {
        let mut store = connect(&endpoints, &prefix)?;
        let key = format!("k{i}");
        let mut rev = 0;
        let mut lat = Vec::with_capacity(PER_NODE);
        barrier.wait();
        for v in 0..PER_NODE {
            let t = Instant::now();
            let out = store
                .txn(
                    Txn::default()
                        .when(&key, rev)
                        .put(&key, v.to_string().into_bytes()),
                )
                .map_err(|e| e.to_string())?;
            lat.push(t.elapsed());
            if !out.succeeded {
                return Err(format!("CAS on {key} failed: nobody else writes it"));
            }
            rev = out.revision;
        }
        Ok((lat, 0, PER_NODE as u64))
    })
}

/// `n` nodes, each assigning `PER_NODE` dual-stack handles; then released.
fn allocations(endpoints: &[String], run: &str, n: usize, pool: &Pool) -> Result<Measured, String> {
    let endpoints = endpoints.to_vec();
    let prefix = format!("/bench/{run}/ipam/");
    let pool = pool.clone();
    {
        let mut admin = Allocator::new(connect(&endpoints, &prefix)?, "admin");
        admin.define_pool(&pool).map_err(|e| e.to_string())?;
    }
    let (endpoints2, prefix2, pool2) = (endpoints.clone(), prefix.clone(), pool.clone());
    let measured = parallel(n, move |i, barrier| {
        let mut alloc = Allocator::new(connect(&endpoints, &prefix)?, &format!("node-{i}"));
        let mut lat = Vec::with_capacity(PER_NODE);
        barrier.wait();
        for c in 0..PER_NODE {
            let h = HandleId::new(&pool.name, &format!("c{i}-{c}"), "eth0");
            let t = Instant::now();
            alloc
                .assign(&pool, &h, &[])
                .map_err(|e| format!("{h}: {e}"))?;
            lat.push(t.elapsed());
        }
        let s = alloc.stats();
        Ok((lat, s.conflicts, s.txns))
    })?;
    let mut alloc = Allocator::new(connect(&endpoints2, &prefix2)?, "node-0");
    for (h, _) in alloc.handles(&pool2.name).map_err(|e| e.to_string())? {
        alloc.release(&h).map_err(|e| e.to_string())?;
    }
    if !alloc
        .allocated(&pool2)
        .map_err(|e| e.to_string())?
        .is_empty()
    {
        return Err("addresses left after the IPAM bench".into());
    }
    Ok(measured)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn pool(name: &str, ranges: serde_json::Value) -> Result<Pool, String> {
    serde_json::from_value::<Pool>(serde_json::json!({"name": name, "ranges": ranges}))
        .map_err(|e| e.to_string())
        .and_then(|p| p.validated().map_err(|e| e.to_string()))
}

/// The IPAM part of `make bench`.
pub fn run() -> Result<(), String> {
    let etcd = EtcdCluster::start(3).map_err(|e| format!("etcd: {e}"))?;
    let endpoints = etcd.endpoints();
    let v4 = pool("bench4", serde_json::json!([{"subnet": "10.128.0.0/12"}]))?;
    let dual = pool(
        "bench46",
        serde_json::json!([{"subnet": "10.144.0.0/12"}, {"subnet": "fd00:128::/64"}]),
    )?;
    println!(
        "\nIPAM on a 3-member etcd (Debian's), {PER_NODE} allocations per node, each node its own \
         client; raw = single-key compare-and-swap transactions, one key per client, same etcd, \
         same run, before and after each allocation run, averaged (one transaction per \
         allocation is the limit)"
    );
    println!(
        "{:>5} {:>6}  {:>9} {:>9} {:>9}   {:>9} {:>9} {:>9}  {:>6}  {:>6} {:>9}",
        "nodes",
        "pool",
        "raw tx/s",
        "raw p50",
        "raw p99",
        "alloc/s",
        "p50",
        "p99",
        "ratio",
        "txns",
        "conflicts"
    );
    let mut at8 = None;
    let runs = [(1usize, &v4), (4, &v4), (8, &v4), (8, &dual)];
    for (i, (n, pool)) in runs.into_iter().enumerate() {
        // The raw rate before and after the allocations, averaged: both see
        // the same etcd state and load on either side.
        let before = raw_cas(&endpoints, &format!("r{i}a"), n)?;
        let a = allocations(&endpoints, &format!("r{i}"), n, pool)?;
        let after = raw_cas(&endpoints, &format!("r{i}b"), n)?;
        let raw = Measured {
            rate: (before.rate + after.rate) / 2.0,
            p50: (before.p50 + after.p50) / 2,
            p99: (before.p99 + after.p99) / 2,
            conflicts: 0,
            txns: before.txns + after.txns,
        };
        let ratio = a.rate / raw.rate;
        let kind = if pool.families().len() == 2 {
            "dual"
        } else {
            "IPv4"
        };
        println!(
            "{n:>5} {kind:>6}  {:>9.0} {:>7.2}ms {:>7.2}ms   {:>9.0} {:>7.2}ms {:>7.2}ms  {ratio:>6.3}  {:>6} {:>9}",
            raw.rate,
            ms(raw.p50),
            ms(raw.p99),
            a.rate,
            ms(a.p50),
            ms(a.p99),
            a.txns,
            a.conflicts
        );
        if n == 8 && kind == "IPv4" {
            at8 = Some((ratio, a.conflicts));
        }
    }
    if let Some((ratio, conflicts)) = at8 {
        crate::bench::verdict(
            "IPAM allocation rate / raw CAS rate, 8 nodes",
            ratio,
            0.8,
            true,
        );
        println!(
            "  cross-node conflicts with 8 nodes: {conflicts} ({})",
            if conflicts == 0 { "none" } else { "SOME" }
        );
    }
    Ok(())
}
