//! Prometheus text at `/metrics`: requests by resource, verb and code with
//! latency histograms, attachments per network, and per pool and node the
//! blocks claimed and the addresses in use and free.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

use super::App;

const BUCKETS: [f64; 11] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    total: u64,
}

/// The request counters.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    latency: Mutex<BTreeMap<(String, String), Histogram>>,
}

impl Metrics {
    /// Counts one answered request.
    pub fn observe(&self, resource: &str, verb: &str, code: u16, took: Duration) {
        if let Ok(mut r) = self.requests.lock() {
            *r.entry((resource.into(), verb.into(), code)).or_default() += 1;
        }
        if let Ok(mut l) = self.latency.lock() {
            let h = l.entry((resource.into(), verb.into())).or_default();
            let s = took.as_secs_f64();
            for (i, b) in BUCKETS.iter().enumerate() {
                if s <= *b {
                    h.counts[i] += 1;
                }
            }
            h.sum += s;
            h.total += 1;
        }
    }

    fn requests_text(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP plexusd_requests_total Requests answered, by resource, verb and HTTP code.\n# TYPE plexusd_requests_total counter"
        );
        if let Ok(r) = self.requests.lock() {
            for ((res, verb, code), n) in r.iter() {
                let _ = writeln!(
                    out,
                    "plexusd_requests_total{{resource=\"{res}\",verb=\"{verb}\",code=\"{code}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP plexusd_request_duration_seconds Time to answer a request.\n# TYPE plexusd_request_duration_seconds histogram"
        );
        if let Ok(l) = self.latency.lock() {
            for ((res, verb), h) in l.iter() {
                let labels = format!("resource=\"{res}\",verb=\"{verb}\"");
                for (i, b) in BUCKETS.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "plexusd_request_duration_seconds_bucket{{{labels},le=\"{b}\"}} {}",
                        h.counts[i]
                    );
                }
                let _ = writeln!(
                    out,
                    "plexusd_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}\nplexusd_request_duration_seconds_sum{{{labels}}} {}\nplexusd_request_duration_seconds_count{{{labels}}} {}",
                    h.total, h.sum, h.total
                );
            }
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The whole exposition: counters, then figures read from etcd now.
pub async fn render(app: &App) -> String {
    let mut out = String::new();
    app.metrics.requests_text(&mut out);
    let _ = writeln!(
        out,
        "# HELP plexus_attachments Interfaces attached, by network.\n# TYPE plexus_attachments gauge"
    );
    if let Ok((atts, _)) = app.store.list(&conf::api::ATTACHMENT.prefix(None)).await {
        let mut per: BTreeMap<String, u64> = BTreeMap::new();
        for a in atts {
            let net = a
                .value
                .pointer("/spec/network")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            *per.entry(net).or_default() += 1;
        }
        for (net, n) in per {
            let _ = writeln!(
                out,
                "plexus_attachments{{network=\"{}\"}} {n}",
                escape(&net)
            );
        }
    }
    let pools = app
        .store
        .raw(&format!("{}pools/", super::objects::IPAM_PREFIX))
        .await
        .unwrap_or_default();
    let mut blocks = String::new();
    let mut used = String::new();
    let mut free = String::new();
    let mut kept = String::new();
    let mut size = String::new();
    for (key, _) in pools {
        let name = key.rsplit('/').next().unwrap_or("");
        let Ok(u) = super::usage::read(app, name).await else {
            continue;
        };
        let p = escape(name);
        for (f, fam) in ["ipv4", "ipv6"].iter().enumerate() {
            let _ = writeln!(
                size,
                "plexus_ipam_pool_size{{pool=\"{p}\",family=\"{fam}\"}} {}",
                u.size[f]
            );
        }
        for (node, n) in &u.nodes {
            let node = escape(node);
            let _ = writeln!(
                blocks,
                "plexus_ipam_blocks{{pool=\"{p}\",node=\"{node}\"}} {}",
                n.blocks.len()
            );
            for (f, fam) in ["ipv4", "ipv6"].iter().enumerate() {
                let l = format!("pool=\"{p}\",node=\"{node}\",family=\"{fam}\"");
                let _ = writeln!(used, "plexus_ipam_addresses_in_use{{{l}}} {}", n.in_use[f]);
                let _ = writeln!(free, "plexus_ipam_addresses_free{{{l}}} {}", n.free[f]);
                let _ = writeln!(
                    kept,
                    "plexus_ipam_addresses_reserved{{{l}}} {}",
                    n.reserved[f]
                );
            }
        }
    }
    for (name, help, body) in [
        ("plexus_ipam_pool_size", "Usable addresses of a pool.", size),
        (
            "plexus_ipam_blocks",
            "Blocks a node has claimed in a pool.",
            blocks,
        ),
        (
            "plexus_ipam_addresses_in_use",
            "Addresses in use in a node's blocks.",
            used,
        ),
        (
            "plexus_ipam_addresses_free",
            "Free addresses in a node's blocks.",
            free,
        ),
        (
            "plexus_ipam_addresses_reserved",
            "Addresses a node keeps reserved for its next ADDs.",
            kept,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        out.push_str(&body);
    }
    out
}
