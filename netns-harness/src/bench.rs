//! `make bench`: Plexus against Debian's reference plugins, side by side in
//! one run, on one node netns.
//!
//! Each scenario attaches and detaches one pod over and over, alternating
//! between its variants so that they share whatever noise the machine has;
//! every ADD and DEL is timed, and each variant's p50 and p99 are compared
//! with the reference (the first variant). Peak RSS is GNU time's `%M` over
//! one ADD and one DEL: the largest process of the plugin's tree.

use std::time::{Duration, Instant};

use cni::NetConfList;

use crate::node::Node;
use crate::runtime::Runtime;

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) struct Variant {
    pub(crate) label: &'static str,
    list: NetConfList,
    /// The pod's `k8s.v1.cni.cncf.io/networks` annotation, if any.
    networks: Option<&'static str>,
    /// The binary the runtime execs, for the RSS measurement.
    pub(crate) entry: &'static str,
    add: Vec<Duration>,
    del: Vec<Duration>,
    /// Peak RSS over one ADD and one DEL.
    pub(crate) rss_kb: Option<u64>,
}

impl Variant {
    pub(crate) fn new(label: &'static str, list: NetConfList, entry: &'static str) -> Variant {
        Variant {
            label,
            list,
            networks: None,
            entry,
            add: Vec::new(),
            del: Vec::new(),
            rss_kb: None,
        }
    }

    /// The pod asks for these secondary networks (the annotation's value).
    pub(crate) fn networks(mut self, annotation: &'static str) -> Variant {
        self.networks = Some(annotation);
        self
    }

    /// A new pod netns and the pod as this variant's runtime describes it.
    /// Its list with `logLevel: debug`, logging to a file of its own
    /// (named after `what`), and that file.
    pub(crate) fn logging_debug(
        &self,
        node: &Node,
        what: &str,
    ) -> (NetConfList, std::path::PathBuf) {
        let log = node
            .scratch
            .join(format!("{}.log", crate::scratch::unique(what)));
        let mut list = self.list.clone();
        if let Some(p) = list.plugins.first_mut() {
            p.insert("logLevel".into(), serde_json::json!("debug"));
            p.insert("logFile".into(), serde_json::json!(log));
        }
        (list, log)
    }

    pub(crate) fn pod(&self, node: &Node) -> Result<(crate::Netns, crate::Pod), String> {
        let (ns, pod) = node
            .try_pod("default")
            .map_err(|e| format!("pod netns: {e}"))?;
        Ok(match self.networks {
            Some(n) => (ns, pod.networks(n)),
            None => (ns, pod),
        })
    }
}

/// Where one call's time went, from its debug log lines (their
/// `duration_ms`): the call's own span, plugins, IPAM, netlink, records.
#[derive(Default)]
struct Spans {
    call: f64,
    /// Config, definitions and the plan.
    plan: f64,
    ipam: f64,
    netlink: f64,
    records: f64,
    execd: f64,
    /// Written or removed on a thread of its own while the delegates attach.
    groups_beside: f64,
    /// `plexus-ipam`'s own account: time in its store, round trips, writes.
    store: f64,
    round_trips: f64,
    writes: f64,
}

fn field(line: &str, name: &str) -> f64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn duration_of(line: &str) -> f64 {
    field(line, "duration_ms")
}

fn spans(log: &str, cmd: &str) -> Spans {
    let mut s = Spans::default();
    for line in log
        .lines()
        .filter(|l| l.contains(&format!("cmd=\"{cmd}\"")))
    {
        let d = duration_of(line);
        if line.contains(&format!("}}: {cmd} pod=")) {
            s.call = d;
        } else if line.contains("plugin ok") {
            let ipam = ["host-local", "plexus-ipam", "static", "dhcp"]
                .iter()
                .any(|p| line.contains(&format!("plugin=\"{p}\"")));
            if ipam {
                s.ipam += d;
            } else if line.contains("run=\"exec'd\"") {
                s.execd += d;
            }
        } else if line.contains("}: planned") {
            s.plan += d;
        } else if line.contains(&format!("IPAM {cmd} done")) {
            s.store += field(line, "store_ms");
            s.round_trips += field(line, "round_trips");
            s.writes += field(line, "writes");
        } else if line.contains("}: netlink") {
            s.netlink += d;
        } else if line.contains("record written") {
            s.records += d;
        } else if line.contains("security groups applied beside")
            || line.contains("security groups removed")
        {
            s.groups_beside += d;
        }
    }
    s
}

/// One ADD and one DEL of a `plexus` variant with `logLevel: debug`: the
/// wall time against the call's own spans, printed as a breakdown.
fn breakdown(node: &Node, v: &Variant) -> Result<(), String> {
    let (list, log) = v.logging_debug(node, "breakdown");
    let (_ns, pod) = v.pod(node)?;
    let t = Instant::now();
    node.runtime
        .add(&list, &pod)
        .map_err(|e| format!("{} ADD (debug): {e}", v.label))?;
    let add = ms(t.elapsed());
    let t = Instant::now();
    node.runtime
        .del(&list, &pod)
        .map_err(|e| format!("{} DEL (debug): {e}", v.label))?;
    let del = ms(t.elapsed());
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    for (cmd, wall) in [("ADD", add), ("DEL", del)] {
        let s = spans(&text, cmd);
        let rest = s.call - s.plan - s.netlink - s.records - s.execd;
        println!(
            "  {:<32} {cmd} {wall:>6.2}ms = process start/exit {:.2} + call {:.2} (plan {:.2}, netlink {:.2}, \
             records {:.2}, exec'd delegates {:.2}, rest {:.2}; IPAM {:.2} with its store {:.2} \
             in {} round trips, {} writes; security groups {:.2} beside)",
            v.label,
            wall - s.call,
            s.call,
            s.plan,
            s.netlink,
            s.records,
            s.execd,
            rest.max(0.0),
            s.ipam,
            s.store,
            s.round_trips,
            s.writes,
            s.groups_beside
        );
    }
    Ok(())
}

/// The peak RSS (KiB) of any run of `entry` while `calls` runs the
/// runtime it is given, whose `entry` runs under GNU time.
pub(crate) fn measure_rss_of(
    node: &Node,
    entry: &str,
    calls: impl FnOnce(&Runtime) -> Result<(), String>,
) -> Result<u64, String> {
    let out = node
        .scratch
        .join(format!("{}.txt", crate::scratch::unique("rss")));
    let rt = node
        .runtime_wrapping(
            entry,
            &format!("/usr/bin/time -a -f %M -o {}", out.display()),
        )
        .map_err(|e| e.to_string())?;
    calls(&rt)?;
    let text = std::fs::read_to_string(&out).map_err(|e| e.to_string())?;
    text.lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .max()
        .ok_or_else(|| format!("no peak RSS of {entry} in {}", out.display()))
}

fn measure_rss(node: &Node, v: &mut Variant) -> Result<(), String> {
    let (_ns, pod) = v.pod(node)?;
    let (list, label) = (&v.list, v.label);
    let kb = measure_rss_of(node, v.entry, |rt| {
        rt.add(list, &pod)
            .map_err(|e| format!("{label} ADD under time: {e}"))?;
        rt.del(list, &pod)
            .map_err(|e| format!("{label} DEL under time: {e}"))
    })?;
    v.rss_kb = Some(kb);
    Ok(())
}

/// The order the variants run in, repeated: a closed walk through every
/// ordered pair of distinct variants once (an Eulerian circuit of the
/// complete directed graph, found by Hierholzer's algorithm). Repeated, every
/// variant comes directly after every other equally often, across the
/// repeats too, and each runs `n - 1` times a round.
pub(crate) fn balanced_sequence(n: usize) -> Vec<usize> {
    if n < 2 {
        return vec![0; n];
    }
    // The variants each has yet to be followed by.
    let mut next: Vec<Vec<usize>> = (0..n)
        .map(|v| (0..n).rev().filter(|&u| u != v).collect())
        .collect();
    let (mut walk, mut circuit) = (vec![0], Vec::new());
    while let Some(&v) = walk.last() {
        match next[v].pop() {
            Some(u) => walk.push(u),
            None => circuit.extend(walk.pop()),
        }
    }
    circuit.reverse();
    // It ends where it began: the repeat starts there.
    circuit.pop();
    circuit
}

/// Each variant's ADD and DEL `cycles` times, alternating in the order
/// [`balanced_sequence`] gives, then its peak RSS; prints the table and
/// returns each variant's ADD and DEL p50 and p99.
pub(crate) fn scenario(
    node: &Node,
    title: &str,
    cycles: usize,
    variants: &mut [Variant],
) -> Result<Vec<[f64; 4]>, String> {
    // One pod netns per variant, made before any timing.
    let pods = variants
        .iter()
        .map(|v| v.pod(node))
        .collect::<Result<Vec<_>, String>>()?;
    // A call pays for what the kernel still does after the one before (a
    // deleted veth's reclaim): in this order every variant directly follows
    // every other equally often.
    let order = balanced_sequence(variants.len());
    for j in order.iter().cycle().copied() {
        if variants.iter().all(|v| v.add.len() >= cycles) {
            break;
        }
        if variants[j].add.len() >= cycles {
            continue;
        }
        let (v, (_ns, pod)) = (&mut variants[j], &pods[j]);
        let i = v.add.len();
        let t = Instant::now();
        node.runtime
            .add(&v.list, pod)
            .map_err(|e| format!("{} ADD {i}: {e}", v.label))?;
        v.add.push(t.elapsed());
        let t = Instant::now();
        node.runtime
            .del(&v.list, pod)
            .map_err(|e| format!("{} DEL {i}: {e}", v.label))?;
        v.del.push(t.elapsed());
    }
    for v in variants.iter_mut() {
        measure_rss(node, v)?;
    }
    println!("\n{title}: {cycles} ADD/DEL cycles per variant, alternating");
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "", "ADD p50", "ADD p99", "DEL p50", "DEL p99", "peak RSS"
    );
    let mut rows = Vec::new();
    for v in variants.iter_mut() {
        v.add.sort();
        v.del.sort();
        let row = [
            ms(percentile(&v.add, 0.5)),
            ms(percentile(&v.add, 0.99)),
            ms(percentile(&v.del, 0.5)),
            ms(percentile(&v.del, 0.99)),
        ];
        let rss = v
            .rss_kb
            .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
            .unwrap_or_default();
        println!(
            "{:<34} {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>12}",
            v.label, row[0], row[1], row[2], row[3], rss
        );
        rows.push(row);
    }
    for (v, row) in variants.iter().zip(&rows).skip(1) {
        let r: Vec<String> = (0..4)
            .map(|i| format!("{:.3}", row[i] / rows[0][i].max(1e-9)))
            .collect();
        println!(
            "  ratio {:<26} {:>10} {:>10} {:>10} {:>10}",
            v.label, r[0], r[1], r[2], r[3]
        );
    }
    let plexus: Vec<&Variant> = variants.iter().filter(|v| v.entry == "plexus").collect();
    if !plexus.is_empty() {
        println!("  one ADD and one DEL with logLevel debug, from the call's own timing spans:");
        for v in plexus {
            breakdown(node, v)?;
        }
    }
    Ok(rows)
}

/// Prints whether `ratio` meets `target` (at most it, or with `at_least`, at least it).
pub(crate) fn verdict(what: &str, ratio: f64, target: f64, at_least: bool) {
    let (met, sign) = if at_least {
        (ratio >= target, ">=")
    } else {
        (ratio <= target, "<=")
    };
    let ok = if met { "met" } else { "MISSED" };
    println!("  target {what}: {ratio:.3} ({sign} {target}) {ok}");
}

/// Runs every scenario with `cycles` cycles each and prints the comparison.
pub fn run(cycles: usize) -> Result<(), String> {
    println!("== make bench (release build), {cycles} cycles per variant");
    crate::bench_stack::run(cycles)?;
    crate::bench_ipam::run()?;
    crate::bench_api::run()?;
    crate::bench_nodeapi::run(cycles)?;
    crate::bench_groups::run(cycles)?;
    crate::bench_userspace::run(cycles)?;
    crate::bench_sriov::run(cycles)?;
    crate::bench_burst::run()
}

/// A percentile of sorted samples, in ms.
pub fn pct(sorted: &[Duration], p: f64) -> f64 {
    ms(percentile(sorted, p))
}

/// Ours against the reference, ADD and DEL p50/p99 side by side
/// (`samples[0]` ours, `samples[1]` the reference, each `[ADD, DEL]`
/// sorted), and the ratios; returns `ratio(command, percentile)`.
pub fn side_by_side<'s>(
    ours: &str,
    reference: &str,
    samples: &'s [[Vec<Duration>; 2]; 2],
) -> impl Fn(usize, f64) -> f64 + 's {
    println!(
        "{:<46} {:>10} {:>10} {:>10} {:>10}",
        "", "ADD p50", "ADD p99", "DEL p50", "DEL p99"
    );
    let row = |label: &str, s: &[Vec<Duration>; 2]| {
        println!(
            "{label:<46} {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>8.2}ms",
            pct(&s[0], 0.5),
            pct(&s[0], 0.99),
            pct(&s[1], 0.5),
            pct(&s[1], 0.99)
        );
    };
    row(reference, &samples[1]);
    row(ours, &samples[0]);
    let ratio = move |cmd: usize, p: f64| pct(&samples[0][cmd], p) / pct(&samples[1][cmd], p);
    println!(
        "{:<46} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
        format!("  ratio {}", ours.split(' ').next().unwrap_or(ours)),
        ratio(0, 0.5),
        ratio(0, 0.99),
        ratio(1, 0.5),
        ratio(1, 0.99)
    );
    ratio
}

#[cfg(test)]
mod tests {
    use super::balanced_sequence;

    #[test]
    fn every_variant_directly_follows_every_other_equally_often() {
        for n in 1..=7 {
            let seq = balanced_sequence(n);
            let want = if n < 2 { n } else { n * (n - 1) };
            assert_eq!(seq.len(), want, "n={n}: {seq:?}");
            let mut pairs = std::collections::HashMap::new();
            // Repeated: the pair across the repeat counts too.
            for k in 0..seq.len() {
                *pairs.entry((seq[k], seq[(k + 1) % seq.len()])).or_insert(0) += 1;
            }
            if n >= 2 {
                assert_eq!(pairs.len(), n * (n - 1), "n={n}: {seq:?}");
                assert!(pairs.keys().all(|(a, b)| a != b), "n={n}: {seq:?}");
                assert!(pairs.values().all(|&c| c == 1), "n={n}: {seq:?}");
            }
            for v in 0..n {
                let runs = seq.iter().filter(|&&x| x == v).count();
                assert_eq!(runs, (n - 1).max(1), "n={n}: {seq:?}");
            }
        }
    }
}
