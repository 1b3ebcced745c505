//! `make bench`: Plexus against the reference plugins, side by side in one run.
//!
//! The same pod is attached and detached over and over, alternating between
//! `ptp` + `host-local` run directly and the same network run through
//! `plexus`; each ADD and DEL is timed and the medians and p99s are compared.

use std::time::{Duration, Instant};

use cni::NetConfList;
use serde_json::json;

use crate::fixtures::ptp;
use crate::node::Node;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

struct Series {
    add: Vec<Duration>,
    del: Vec<Duration>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs `cycles` ADD/DEL cycles of each variant and prints the comparison.
pub fn run(cycles: usize) -> Result<(), String> {
    let node = Node::try_new("bench").map_err(|e| format!("create node: {e}"))?;
    let ipam = node.ipam_dir();
    let direct = NetConfList::parse_value(&ptp("direct", "1.0.0", &["10.200.0.0/24"], &ipam))
        .map_err(|e| e.to_string())?;
    let via = node.plexus_list(
        "1.0.0",
        ptp("via-plexus", "1.0.0", &["10.201.0.0/24"], &ipam),
    );
    let (_ns, pod) = node
        .try_pod("default")
        .map_err(|e| format!("pod netns: {e}"))?;
    let mut series = [
        (
            "ptp + host-local (reference)",
            &direct,
            Series {
                add: vec![],
                del: vec![],
            },
        ),
        (
            "plexus -> ptp + host-local",
            &via,
            Series {
                add: vec![],
                del: vec![],
            },
        ),
    ];
    println!("== make bench: {cycles} ADD/DEL cycles each, IPv4, alternating, one node netns\n");
    for i in 0..cycles {
        for (name, list, s) in series.iter_mut() {
            let t = Instant::now();
            node.runtime
                .add(list, &pod)
                .map_err(|e| format!("{name} ADD {i}: {e}"))?;
            s.add.push(t.elapsed());
            let t = Instant::now();
            node.runtime
                .del(list, &pod)
                .map_err(|e| format!("{name} DEL {i}: {e}"))?;
            s.del.push(t.elapsed());
        }
    }
    println!(
        "{:<30} {:>12} {:>12} {:>12} {:>12}",
        "", "ADD p50 ms", "ADD p99 ms", "DEL p50 ms", "DEL p99 ms"
    );
    let mut stats = Vec::new();
    for (name, _, s) in series.iter_mut() {
        s.add.sort();
        s.del.sort();
        let row = [
            percentile(&s.add, 0.5),
            percentile(&s.add, 0.99),
            percentile(&s.del, 0.5),
            percentile(&s.del, 0.99),
        ];
        println!(
            "{name:<30} {:>12.2} {:>12.2} {:>12.2} {:>12.2}",
            ms(row[0]),
            ms(row[1]),
            ms(row[2]),
            ms(row[3])
        );
        stats.push(row);
    }
    let ratio = |i: usize| ms(stats[1][i]) / ms(stats[0][i]).max(1e-9);
    println!(
        "{:<30} {:>12.2} {:>12.2} {:>12.2} {:>12.2}",
        "ratio plexus / reference",
        ratio(0),
        ratio(1),
        ratio(2),
        ratio(3)
    );
    let out = json!({
        "cycles": cycles,
        "reference_ms": stats[0].iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        "plexus_ms": stats[1].iter().map(|d| ms(*d)).collect::<Vec<_>>(),
    });
    println!("\n{out}");
    if !node.leases().is_empty() {
        return Err(format!("leases left after the bench: {:?}", node.leases()));
    }
    Ok(())
}
