//! Security groups in the pod's netns: one nftables table (`inet plexus`)
//! per pod, written by `nft -j` in one transaction at ADD, removed at DEL,
//! compared with the kernel's at CHECK.
//!
//! The table has two base chains (`input`, `output`) that send each
//! attachment's traffic to chains of its own (`in-<ifname>`, `out-<ifname>`),
//! so a group filters the interface it is on and nothing else. An
//! interface with groups admits what returns (established, related),
//! IPv6 neighbour discovery, and what an ingress rule allows; the rest is
//! dropped. Egress is open unless a group has an egress rule; then it is
//! filtered the same way. A rule's remote group is a named set of its
//! members' addresses (`g-<group>-v4`, `g-<group>-v6`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use cni::{code, Error};
use conf::api::{AttachmentSpec, SecurityGroupSpec, SecurityRule};
use ipnetwork::IpNetwork;
use nix::sched::{setns, CloneFlags};
use serde_json::{json, Value};

/// The table's name, in family `inet`.
pub const TABLE: &str = "plexus";

/// One filtered interface of the pod.
pub struct Filtered<'a> {
    pub ifname: &'a str,
    pub rules: &'a [(String, SecurityGroupSpec)],
}

fn table() -> Value {
    json!({"family": "inet", "name": TABLE})
}

fn chain(name: &str) -> Value {
    json!({"family": "inet", "table": TABLE, "name": name})
}

fn rule(chain: &str, expr: Vec<Value>) -> Value {
    json!({"add": {"rule": {"family": "inet", "table": TABLE, "chain": chain, "expr": expr}}})
}

fn matches(left: Value, right: Value) -> Value {
    json!({"match": {"op": "==", "left": left, "right": right}})
}

fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

/// The groups `rules` name as remotes.
pub fn remote_groups<'a>(
    rules: impl IntoIterator<Item = &'a (String, SecurityGroupSpec)>,
) -> BTreeSet<&'a str> {
    rules
        .into_iter()
        .flat_map(|(_, spec)| spec.rules.iter())
        .filter_map(|r| r.remote_group.as_deref())
        .collect()
}

/// The Attachment object stored as `raw`: its `spec`.
pub fn attachment(raw: &[u8]) -> Option<AttachmentSpec> {
    let obj: Value = serde_json::from_slice(raw).ok()?;
    serde_json::from_value(obj.get("spec")?.clone()).ok()
}

/// Adds an interface's `addresses` (with or without prefix) to the members
/// of each of its `groups`.
pub fn add_members(
    members: &mut BTreeMap<String, Vec<IpAddr>>,
    groups: &[String],
    addresses: &[String],
) {
    let ips: Vec<IpAddr> = addresses
        .iter()
        .filter_map(|a| a.parse::<IpNetwork>().ok())
        .map(|n| n.ip())
        .collect();
    for g in groups {
        members.entry(g.clone()).or_default().extend(&ips);
    }
}

/// The set of `group`'s members of one family.
pub fn set_name(group: &str, v6: bool) -> String {
    format!("g-{group}-{}", if v6 { "v6" } else { "v4" })
}

/// The families a rule applies to.
fn families(r: &SecurityRule) -> Vec<bool> {
    match (r.ethertype.as_deref(), r.protocol.as_deref()) {
        (Some("IPv4"), _) | (_, Some("icmp")) => vec![false],
        (Some("IPv6"), _) | (_, Some("icmpv6")) => vec![true],
        _ => match r
            .remote_ip_prefix
            .as_deref()
            .and_then(|p| p.parse::<IpNetwork>().ok())
        {
            Some(net) => vec![net.is_ipv6()],
            None => vec![false, true],
        },
    }
}

/// The expressions of one rule in one family, ending in `accept`.
fn rule_expr(r: &SecurityRule, v6: bool, ingress: bool) -> Result<Vec<Value>, Error> {
    let bad = |why: String| Error::new(code::INVALID_NETWORK_CONFIG, why);
    let (ip, nfproto) = if v6 { ("ip6", "ipv6") } else { ("ip", "ipv4") };
    let remote = if ingress { "saddr" } else { "daddr" };
    let mut e = vec![matches(meta("nfproto"), json!(nfproto))];
    if let Some(p) = &r.remote_ip_prefix {
        let net: IpNetwork = p
            .parse()
            .map_err(|err| bad(format!("remoteIpPrefix {p:?}: {err}")))?;
        e.push(matches(
            payload(ip, remote),
            json!({"prefix": {"addr": net.network().to_string(), "len": net.prefix()}}),
        ));
    }
    if let Some(g) = &r.remote_group {
        e.push(matches(
            payload(ip, remote),
            json!(format!("@{}", set_name(g, v6))),
        ));
    }
    let protocol = r.protocol.as_deref().unwrap_or("any");
    match protocol {
        "tcp" | "udp" | "sctp" => match (r.port_range_min, r.port_range_max) {
            (Some(lo), Some(hi)) if hi > lo => e.push(matches(
                payload(protocol, "dport"),
                json!({"range": [lo, hi]}),
            )),
            (Some(port), _) => e.push(matches(payload(protocol, "dport"), json!(port))),
            _ => e.push(matches(meta("l4proto"), json!(protocol))),
        },
        "icmp" | "icmpv6" => {
            let l4 = if protocol == "icmp" {
                "icmp"
            } else {
                "ipv6-icmp"
            };
            match r.icmp_type {
                Some(t) => {
                    e.push(matches(payload(protocol, "type"), json!(t)));
                    if let Some(c) = r.icmp_code {
                        e.push(matches(payload(protocol, "code"), json!(c)));
                    }
                }
                None => e.push(matches(meta("l4proto"), json!(l4))),
            }
        }
        "any" => {}
        other => return Err(bad(format!("protocol {other:?} is not supported"))),
    }
    e.push(json!({"accept": null}));
    Ok(e)
}

/// What each chain starts with: what returns, and IPv6 neighbour
/// discovery (types 133-137), which no pod can do without.
fn preamble(chain: &str) -> Vec<Value> {
    vec![
        rule(
            chain,
            vec![
                json!({"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                 "right": ["established", "related"]}}),
                json!({"accept": null}),
            ],
        ),
        rule(
            chain,
            vec![
                json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "invalid"}}),
                json!({"drop": null}),
            ],
        ),
        rule(
            chain,
            vec![
                matches(meta("l4proto"), json!("ipv6-icmp")),
                matches(
                    payload("icmpv6", "type"),
                    json!({"set": [133, 134, 135, 136, 137]}),
                ),
                json!({"accept": null}),
            ],
        ),
    ]
}

/// The whole table for the pod's filtered interfaces, as one `nft -j`
/// transaction that replaces the rules and set elements of any table of the
/// same name (a chain or set it no longer names stays, empty and
/// unreferenced). `members`: each
/// remote group's addresses.
pub fn ruleset(
    filtered: &[Filtered<'_>],
    members: &BTreeMap<String, Vec<IpAddr>>,
) -> Result<Value, Error> {
    // Replaced in place: added (a no-op when there) and flushed (rules and
    // set elements go), then everything added again, in one transaction. A
    // delete of the table would make the kernel wait out an RCU grace
    // period (some 15 ms) to unhook its chains.
    let mut cmds = vec![
        json!({"add": {"table": table()}}),
        json!({"flush": {"table": table()}}),
    ];
    for (name, hook) in [("input", "input"), ("output", "output")] {
        let mut c = chain(name);
        c["type"] = json!("filter");
        c["hook"] = json!(hook);
        c["prio"] = json!(0);
        c["policy"] = json!("accept");
        cmds.push(json!({"add": {"chain": c}}));
    }
    let remote_groups = remote_groups(filtered.iter().flat_map(|f| f.rules.iter()));
    for g in &remote_groups {
        for v6 in [false, true] {
            let elems: Vec<Value> = members
                .get(*g)
                .into_iter()
                .flatten()
                .filter(|a| a.is_ipv6() == v6)
                .map(|a| json!(a.to_string()))
                .collect();
            let name = set_name(g, v6);
            let set = json!({"family": "inet", "table": TABLE, "name": name,
                             "type": if v6 { "ipv6_addr" } else { "ipv4_addr" }});
            // `flush table` keeps set elements: the set's own flush.
            cmds.push(json!({"add": {"set": set}}));
            cmds.push(json!({"flush": {"set": {"family": "inet", "table": TABLE, "name": name}}}));
            if !elems.is_empty() {
                cmds.push(json!({"add": {"element": {"family": "inet", "table": TABLE,
                                                     "name": name, "elem": elems}}}));
            }
        }
    }
    let mut rules = Vec::new();
    for f in filtered {
        let all: Vec<&SecurityRule> = f.rules.iter().flat_map(|(_, s)| s.rules.iter()).collect();
        let egress = all.iter().any(|r| r.direction == "egress");
        for (ingress, base, key, mine) in [
            (true, "input", "iifname", format!("in-{}", f.ifname)),
            (false, "output", "oifname", format!("out-{}", f.ifname)),
        ] {
            if !ingress && !egress {
                continue;
            }
            cmds.push(json!({"add": {"chain": chain(&mine)}}));
            rules.push(rule(
                base,
                vec![
                    matches(meta(key), json!(f.ifname)),
                    json!({"jump": {"target": mine}}),
                ],
            ));
            rules.extend(preamble(&mine));
            let direction = if ingress { "ingress" } else { "egress" };
            for r in all.iter().filter(|r| r.direction == direction) {
                for v6 in families(r) {
                    rules.push(rule(&mine, rule_expr(r, v6, ingress)?));
                }
            }
            rules.push(rule(&mine, vec![json!({"drop": null})]));
        }
    }
    cmds.extend(rules);
    Ok(json!({"nftables": cmds}))
}

/// The `nft` binary: Debian's, else the first on `PATH`.
fn nft() -> &'static str {
    if Path::new("/usr/sbin/nft").exists() {
        "/usr/sbin/nft"
    } else {
        "nft"
    }
}

/// Runs `nft args` with `stdin` in this thread's netns; its stdout.
fn run_here(what: &str, args: &[&str], stdin: &[u8]) -> Result<Vec<u8>, Error> {
    let fail = |e: String| Error::new(code::INTERNAL, format!("{what}: {e}"));
    let mut child = Command::new(nft())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("start: {e}")))?;
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin)
            .map_err(|e| fail(format!("stdin: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("wait: {e}")))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Runs `nft args` inside the netns at `netns` with `stdin`; its stdout.
fn run_in(netns: &Path, args: &[&str], stdin: &[u8]) -> Result<Vec<u8>, Error> {
    let what = format!("nft {} in {}", args.join(" "), netns.display());
    let fail = |e: String| Error::new(code::INTERNAL, format!("{what}: {e}"));
    let file = std::fs::File::open(netns).map_err(|e| fail(e.to_string()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // A process started from this thread is in the pod's netns.
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| fail(e.to_string()))?;
            run_here(&what, args, stdin)
        })
        .join()
        .unwrap_or_else(|_| Err(fail("thread panicked".into())))
    })
}

/// `ruleset` as the kernel lists it once written (see [`listed`]): written
/// in a netns of its own that goes when done. CHECK compares this with the
/// pod's table, so that ADD need not list the table it just wrote.
pub fn normalized(ruleset: &Value) -> Result<Value, Error> {
    let raw = serde_json::to_vec(ruleset).map_err(|e| Error::new(code::INTERNAL, e.to_string()))?;
    let what = "nft in a scratch netns";
    let fail = |e: String| Error::new(code::INTERNAL, format!("{what}: {e}"));
    let listing = std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|e| fail(e.to_string()))?;
            run_here(what, &["-j", "-f", "-"], &raw)?;
            run_here(what, &["-j", "list", "table", "inet", TABLE], b"")
        })
        .join()
        .unwrap_or_else(|_| Err(fail("thread panicked".into())))
    })?;
    canonical(&listing)
}

/// Writes `ruleset` (see [`ruleset`]) in one transaction.
pub fn apply(netns: &Path, ruleset: &Value) -> Result<(), Error> {
    let raw = serde_json::to_vec(ruleset).map_err(|e| Error::new(code::INTERNAL, e.to_string()))?;
    run_in(netns, &["-j", "-f", "-"], &raw).map(|_| ())
}

/// The table as the kernel has it, without handles and set elements (the
/// members change; the rules must not): what CHECK compares. `None` when
/// there is no such table.
pub fn listed(netns: &Path) -> Result<Option<Value>, Error> {
    match run_in(netns, &["-j", "list", "table", "inet", TABLE], b"") {
        Ok(raw) => canonical(&raw).map(Some),
        Err(e) if e.msg.contains("No such file") => Ok(None),
        Err(e) => Err(e),
    }
}

/// nft's JSON listing without its metainfo, handles and set elements.
fn canonical(raw: &[u8]) -> Result<Value, Error> {
    let v: Value = serde_json::from_slice(raw)
        .map_err(|e| Error::new(code::INTERNAL, format!("nft's listing does not parse: {e}")))?;
    let items = v
        .get("nftables")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let kept: Vec<Value> = items
        .into_iter()
        .filter(|i| i.get("metainfo").is_none())
        .map(|mut i| {
            strip(&mut i);
            i
        })
        .collect();
    Ok(Value::Array(kept))
}

fn strip(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("handle");
            if m.contains_key("type") && m.contains_key("table") {
                m.remove("elem");
            }
            m.values_mut().for_each(strip);
        }
        Value::Array(a) => a.iter_mut().for_each(strip),
        _ => {}
    }
}

/// Removes the pod's table; nothing to remove is fine.
pub fn remove(netns: &Path) -> Result<(), Error> {
    match run_in(netns, &["delete", "table", "inet", TABLE], b"") {
        Err(e) if !e.msg.contains("No such file") => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_become_chains_per_interface_with_sets_for_remote_groups() {
        let web: SecurityGroupSpec = serde_json::from_value(json!({"rules": [
            {"direction": "ingress", "protocol": "tcp", "portRangeMin": 80, "portRangeMax": 80,
             "remoteGroup": "client"},
            {"direction": "ingress", "protocol": "icmp", "icmpType": 8},
            {"direction": "ingress", "remoteIpPrefix": "fd00::/8", "protocol": "udp",
             "portRangeMin": 53, "portRangeMax": 54}
        ]}))
        .unwrap();
        let rules = vec![("web".to_string(), web)];
        let members = BTreeMap::from([(
            "client".to_string(),
            vec!["10.1.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
        )]);
        let set = ruleset(
            &[Filtered {
                ifname: "net1",
                rules: &rules,
            }],
            &members,
        )
        .unwrap();
        let cmds = set["nftables"].as_array().unwrap();
        let text = set.to_string();
        // Sets per family, with the members.
        assert!(text.contains(r#""name":"g-client-v4""#) && text.contains(r#""10.1.0.5""#));
        assert!(text.contains(r#""name":"g-client-v6""#) && text.contains(r#""fd00::5""#));
        // Only an ingress chain: no group has an egress rule.
        assert!(text.contains(r#""in-net1""#) && !text.contains(r#""out-net1""#));
        let in_rules: Vec<&Value> = cmds
            .iter()
            .filter(|c| c["add"]["rule"]["chain"] == "in-net1")
            .collect();
        // Preamble 3, tcp/80 from client in both families 2, icmp 1, udp 1, drop 1.
        assert_eq!(in_rules.len(), 8, "{in_rules:#?}");
        assert_eq!(
            in_rules.last().unwrap()["add"]["rule"]["expr"],
            json!([{"drop": null}])
        );
    }
}
