//! What the kernel holds, read with iproute2's JSON output, and small topology
//! steps (veth pairs, links up) for building test nodes.

use std::io;
use std::process::Command;

use serde_json::Value;

/// Runs `ip <args>`; fails with its stderr.
pub fn ip(args: &[&str]) -> io::Result<String> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -j -d -n <ns> <args>` parsed; an empty answer is an empty list.
pub fn ip_json(ns: &str, args: &[&str]) -> io::Result<Vec<Value>> {
    let mut full = vec!["-j", "-d", "-n", ns];
    full.extend_from_slice(args);
    let text = ip(&full)?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    match serde_json::from_str(&text) {
        Ok(Value::Array(items)) => Ok(items),
        Ok(_) => Ok(Vec::new()),
        Err(e) => Err(io::Error::other(format!(
            "ip {}: bad JSON: {e}",
            full.join(" ")
        ))),
    }
}

/// One link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    /// `veth`, `macvlan`, `bridge`, … (empty for plain devices such as `lo`).
    pub kind: String,
    pub mac: String,
    pub mtu: u64,
    pub up: bool,
    /// `linkinfo.info_data.mode` when the kind has one (macvlan, ipvlan).
    pub mode: String,
}

/// The links of a namespace.
pub fn links(ns: &str) -> io::Result<Vec<Link>> {
    Ok(ip_json(ns, &["link", "show"])?
        .iter()
        .map(|l| Link {
            name: str_of(l, &["ifname"]),
            kind: str_of(l, &["linkinfo", "info_kind"]),
            mac: str_of(l, &["address"]),
            mtu: l.get("mtu").and_then(Value::as_u64).unwrap_or(0),
            up: l
                .get("flags")
                .and_then(Value::as_array)
                .is_some_and(|f| f.iter().any(|x| x == "UP")),
            mode: str_of(l, &["linkinfo", "info_data", "mode"]),
        })
        .collect())
}

/// The names of a namespace's links.
pub fn link_names(ns: &str) -> io::Result<Vec<String>> {
    Ok(links(ns)?.into_iter().map(|l| l.name).collect())
}

/// One link by name.
pub fn link(ns: &str, name: &str) -> io::Result<Option<Link>> {
    Ok(links(ns)?.into_iter().find(|l| l.name == name))
}

/// Global addresses on `dev` as `addr/prefix` (link-local ones left out).
pub fn addrs(ns: &str, dev: &str) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for l in ip_json(ns, &["addr", "show", "dev", dev])? {
        for a in l
            .get("addr_info")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if a.get("scope").and_then(Value::as_str) == Some("link") {
                continue;
            }
            let local = str_of(a, &["local"]);
            let prefix = a.get("prefixlen").and_then(Value::as_u64).unwrap_or(0);
            out.push(format!("{local}/{prefix}"));
        }
    }
    Ok(out)
}

/// Routes of one family (`-4` or `-6`) as `dst via gw dev`, main table.
pub fn routes(ns: &str, family: &str) -> io::Result<Vec<String>> {
    Ok(ip_json(ns, &[family, "route", "show"])?
        .iter()
        .map(|r| {
            let mut s = str_of(r, &["dst"]);
            let gw = str_of(r, &["gateway"]);
            if !gw.is_empty() {
                s.push_str(&format!(" via {gw}"));
            }
            s.push_str(&format!(" dev {}", str_of(r, &["dev"])));
            s
        })
        .collect())
}

fn str_of(v: &Value, path: &[&str]) -> String {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(next) => cur = next,
            None => return String::new(),
        }
    }
    cur.as_str().unwrap_or_default().to_string()
}

/// A veth pair `a`@`ns_a` — `b`@`ns_b`, both up.
pub fn veth(ns_a: &str, a: &str, ns_b: &str, b: &str) -> io::Result<()> {
    ip(&[
        "-n", ns_a, "link", "add", a, "type", "veth", "peer", "name", b, "netns", ns_b,
    ])?;
    ip(&["-n", ns_a, "link", "set", a, "up"])?;
    ip(&["-n", ns_b, "link", "set", b, "up"])?;
    Ok(())
}

/// Brings `dev` up.
pub fn up(ns: &str, dev: &str) -> io::Result<()> {
    ip(&["-n", ns, "link", "set", dev, "up"]).map(|_| ())
}

/// Everything a namespace holds that a plugin might leave behind: links,
/// addresses and routes of both families, one line each, sorted.
pub fn snapshot(ns: &str) -> io::Result<Vec<String>> {
    // A link going away while it is listed (a netns torn down in the
    // kernel's own time takes its veths) fails the listing: again.
    let mut tries = 0;
    loop {
        match snapshot_once(ns) {
            Err(_) if tries < 50 => tries += 1,
            done => return done,
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn snapshot_once(ns: &str) -> io::Result<Vec<String>> {
    let mut lines = Vec::new();
    for l in links(ns)? {
        lines.push(format!("link {} {} {}", l.name, l.kind, l.mac));
        for a in addrs(ns, &l.name)? {
            lines.push(format!("addr {} {a}", l.name));
        }
    }
    for fam in ["-4", "-6"] {
        for r in routes(ns, fam)? {
            lines.push(format!("route {r}"));
        }
    }
    lines.sort();
    Ok(lines)
}

/// Plexus' table in `ns` as `nft -j` lists it, without handles and set
/// elements: its chains, rules and sets. `Null` when there is none.
pub fn nft_table_shape(ns: &str) -> serde_json::Value {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("handle");
                m.remove("elem");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let out = ip(&[
        "netns", "exec", ns, "nft", "-j", "list", "table", "inet", "plexus",
    ])
    .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let mut items: Vec<serde_json::Value> = v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i.get("metainfo").is_none())
        .cloned()
        .collect();
    items.iter_mut().for_each(strip);
    if items.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::Value::Array(items)
    }
}

/// The elements of set `set` of Plexus' table (`inet plexus`) in netns
/// `ns`, sorted; none when there is no such set.
pub fn nft_set_elements(ns: &str, set: &str) -> Vec<String> {
    let out = ip(&[
        "netns", "exec", ns, "nft", "-j", "list", "set", "inet", "plexus", set,
    ])
    .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let mut elems: Vec<String> = v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["set"]["elem"].as_array())
        .flatten()
        .filter_map(|e| e.as_str().map(String::from))
        .collect();
    elems.sort();
    elems
}

/// The memory of every running `plexus` process together, in KiB (their
/// proportional set sizes: pages they share, the binary's above all, counted
/// once), and how many there are.
pub fn plexus_pss_kib() -> (u64, u64) {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return (0, 0);
    };
    procs
        .flatten()
        .filter_map(|p| {
            let comm = std::fs::read_to_string(p.path().join("comm")).ok()?;
            if comm.trim() != "plexus" {
                return None;
            }
            let rollup = std::fs::read_to_string(p.path().join("smaps_rollup")).ok()?;
            rollup
                .lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .fold((0, 0), |(kib, n), rss| (kib + rss, n + 1))
}

/// Samples [`plexus_pss_kib`] every 5 ms until `done`: the largest total
/// (KiB) and the most processes seen at once.
pub fn peak_plexus_pss(done: &std::sync::atomic::AtomicBool) -> (u64, u64) {
    let mut peak = (0, 0);
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        let (kib, n) = plexus_pss_kib();
        peak = (peak.0.max(kib), peak.1.max(n));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    peak
}
