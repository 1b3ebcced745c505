//! Security groups in the pod's netns: one nftables table (`inet plexus`)
//! per pod, written over netlink in one transaction at ADD, removed at
//! DEL, compared with the kernel's at CHECK (listed by `nft`).
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
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use cni::{code, Error};
use conf::api::{AttachmentSpec, SecurityGroupSpec, SecurityRule};
use ipnetwork::IpNetwork;
use nix::errno::Errno;
use nix::sched::CloneFlags;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::kernel::nftables::{self, Base, Batch, Expr, Hook, MetaKey, Op, Verdict};

/// The table's name, in family `inet`.
pub const TABLE: &str = "plexus";

/// One filtered interface of the pod.
pub struct Filtered<'a> {
    pub ifname: &'a str,
    pub rules: &'a [(String, SecurityGroupSpec)],
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

/// The families a rule applies to, each as a rule of its own; `None`: one
/// rule for both (no address in it tells them apart).
fn families(r: &SecurityRule) -> Vec<Option<bool>> {
    match (r.ethertype.as_deref(), r.protocol.as_deref()) {
        (Some("IPv4"), _) | (_, Some("icmp")) => vec![Some(false)],
        (Some("IPv6"), _) | (_, Some("icmpv6")) => vec![Some(true)],
        _ => match r
            .remote_ip_prefix
            .as_deref()
            .and_then(|p| p.parse::<IpNetwork>().ok())
        {
            Some(net) => vec![Some(net.is_ipv6())],
            // A remote group's members are a set per family.
            None if r.remote_group.is_some() => vec![Some(false), Some(true)],
            None => vec![None],
        },
    }
}

/// One step of the pod table's transaction. A record keeps the steps of
/// its table (without set elements), so that CHECK can write them again
/// in a scratch netns and compare what the kernel lists.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Step {
    AddTable,
    FlushTable,
    AddChain {
        name: String,
        /// `input` or `output` for a base chain.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hook: Option<String>,
    },
    AddSet {
        name: String,
        v6: bool,
    },
    FlushSet {
        name: String,
    },
    AddElements {
        set: String,
        elements: Vec<IpAddr>,
    },
    DeleteElements {
        set: String,
        elements: Vec<IpAddr>,
    },
    AddRule {
        chain: String,
        #[serde(rename = "match")]
        matches: Vec<Match>,
        verdict: Action,
    },
}

/// One condition of a rule.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Match {
    /// The packet's IP version.
    Family {
        v6: bool,
    },
    /// Its layer-4 protocol (IANA number).
    L4proto(u8),
    Iifname(String),
    Oifname(String),
    /// Any of these conntrack states (`invalid`, `established`, `related`).
    CtState(Vec<String>),
    /// The source (or destination) address is in a prefix.
    Prefix {
        source: bool,
        prefix: IpNetwork,
    },
    /// The source (or destination) address is in a set of the table.
    InSet {
        source: bool,
        v6: bool,
        set: String,
    },
    /// A field of the transport header is in `lo..=hi`: the destination
    /// port (offset 2, 2 bytes), an ICMP type (0, 1 byte) or code (1, 1).
    Transport {
        offset: u32,
        len: u32,
        lo: u16,
        hi: u16,
    },
}

/// What a rule does with what matches.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Action {
    Accept,
    Drop,
    Jump(String),
}

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

fn rule(chain: &str, matches: Vec<Match>, verdict: Action) -> Step {
    Step::AddRule {
        chain: chain.to_string(),
        matches,
        verdict,
    }
}

/// The conditions of one rule in one family (or both: `None`).
fn rule_matches(
    r: &SecurityRule,
    family: Option<bool>,
    ingress: bool,
) -> Result<Vec<Match>, Error> {
    let bad = |why: String| Error::new(code::INVALID_NETWORK_CONFIG, why);
    let source = ingress;
    let v6 = family.unwrap_or(false);
    let mut m: Vec<Match> = family.map(|v6| Match::Family { v6 }).into_iter().collect();
    if let Some(p) = &r.remote_ip_prefix {
        let prefix: IpNetwork = p
            .parse()
            .map_err(|err| bad(format!("remoteIpPrefix {p:?}: {err}")))?;
        m.push(Match::Prefix { source, prefix });
    }
    if let Some(g) = &r.remote_group {
        m.push(Match::InSet {
            source,
            v6,
            set: set_name(g, v6),
        });
    }
    let protocol = r.protocol.as_deref().unwrap_or("any");
    match protocol {
        "tcp" | "udp" | "sctp" => {
            let number = match protocol {
                "tcp" => TCP,
                "udp" => UDP,
                _ => SCTP,
            };
            m.push(Match::L4proto(number));
            if let Some(lo) = r.port_range_min {
                let hi = r.port_range_max.unwrap_or(lo).max(lo);
                m.push(Match::Transport {
                    offset: 2,
                    len: 2,
                    lo,
                    hi,
                });
            }
        }
        "icmp" | "icmpv6" => {
            m.push(Match::L4proto(if protocol == "icmp" {
                ICMP
            } else {
                ICMPV6
            }));
            if let Some(t) = r.icmp_type {
                m.push(Match::Transport {
                    offset: 0,
                    len: 1,
                    lo: t.into(),
                    hi: t.into(),
                });
                if let Some(c) = r.icmp_code {
                    m.push(Match::Transport {
                        offset: 1,
                        len: 1,
                        lo: c.into(),
                        hi: c.into(),
                    });
                }
            }
        }
        "any" => {}
        other => return Err(bad(format!("protocol {other:?} is not supported"))),
    }
    Ok(m)
}

/// What each chain starts with: what returns, and IPv6 neighbour
/// discovery (types 133-137), which no pod can do without.
fn preamble(chain: &str) -> Vec<Step> {
    vec![
        rule(
            chain,
            vec![Match::CtState(vec!["established".into(), "related".into()])],
            Action::Accept,
        ),
        rule(
            chain,
            vec![Match::CtState(vec!["invalid".into()])],
            Action::Drop,
        ),
        rule(
            chain,
            vec![
                Match::L4proto(ICMPV6),
                Match::Transport {
                    offset: 0,
                    len: 1,
                    lo: 133,
                    hi: 137,
                },
            ],
            Action::Accept,
        ),
    ]
}

/// The whole table for the pod's filtered interfaces, as one transaction
/// that replaces the rules and set elements of any table of the same name
/// (a chain or set it no longer names stays, empty and unreferenced).
/// `members`: each remote group's addresses.
pub fn ruleset(
    filtered: &[Filtered<'_>],
    members: &BTreeMap<String, Vec<IpAddr>>,
) -> Result<Vec<Step>, Error> {
    // Replaced in place: added (a no-op when there) and flushed (rules go),
    // then everything added again, in one transaction. A delete of the
    // table would make the kernel wait out an RCU grace period to unhook
    // its chains.
    let mut steps = vec![Step::AddTable, Step::FlushTable];
    for hook in ["input", "output"] {
        steps.push(Step::AddChain {
            name: hook.to_string(),
            hook: Some(hook.to_string()),
        });
    }
    let remote_groups = remote_groups(filtered.iter().flat_map(|f| f.rules.iter()));
    for g in &remote_groups {
        for v6 in [false, true] {
            let name = set_name(g, v6);
            let elements: Vec<IpAddr> = members
                .get(*g)
                .into_iter()
                .flatten()
                .filter(|a| a.is_ipv6() == v6)
                .copied()
                .collect();
            steps.push(Step::AddSet {
                name: name.clone(),
                v6,
            });
            // Flushing the table's rules keeps set elements: the set's own.
            steps.push(Step::FlushSet { name: name.clone() });
            if !elements.is_empty() {
                steps.push(Step::AddElements {
                    set: name,
                    elements,
                });
            }
        }
    }
    let mut rules = Vec::new();
    for f in filtered {
        let all: Vec<&SecurityRule> = f.rules.iter().flat_map(|(_, s)| s.rules.iter()).collect();
        let egress = all.iter().any(|r| r.direction == "egress");
        for (ingress, base, mine) in [
            (true, "input", format!("in-{}", f.ifname)),
            (false, "output", format!("out-{}", f.ifname)),
        ] {
            if !ingress && !egress {
                continue;
            }
            steps.push(Step::AddChain {
                name: mine.clone(),
                hook: None,
            });
            let on = if ingress {
                Match::Iifname(f.ifname.to_string())
            } else {
                Match::Oifname(f.ifname.to_string())
            };
            rules.push(rule(base, vec![on], Action::Jump(mine.clone())));
            rules.extend(preamble(&mine));
            let direction = if ingress { "ingress" } else { "egress" };
            for r in all.iter().filter(|r| r.direction == direction) {
                for family in families(r) {
                    rules.push(rule(
                        &mine,
                        rule_matches(r, family, ingress)?,
                        Action::Accept,
                    ));
                }
            }
            rules.push(rule(&mine, Vec::new(), Action::Drop));
        }
    }
    steps.extend(rules);
    Ok(steps)
}

/// `steps` without set elements: the shape of the table, which CHECK
/// compares (members change; the rules must not).
pub fn shape(steps: &[Step]) -> Vec<Step> {
    steps
        .iter()
        .filter(|s| !matches!(s, Step::AddElements { .. } | Step::DeleteElements { .. }))
        .cloned()
        .collect()
}

/// Each set of `steps` and the addresses they put in it.
pub fn elements(steps: &[Step]) -> BTreeMap<String, BTreeSet<IpAddr>> {
    let mut sets: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
    for step in steps {
        match step {
            Step::AddSet { name, .. } => {
                sets.entry(name.clone()).or_default();
            }
            Step::AddElements { set, elements } => {
                sets.entry(set.clone()).or_default().extend(elements);
            }
            _ => {}
        }
    }
    sets
}

/// A condition as nf_tables expressions (register 1 loaded, compared).
fn lower(m: &Match, out: &mut Vec<Expr>) {
    let eq = |v: Vec<u8>| Expr::Cmp(Op::Eq, v);
    match m {
        // NFPROTO_IPV4, NFPROTO_IPV6
        Match::Family { v6 } => out.extend([
            Expr::Meta(MetaKey::NfProto),
            eq(vec![if *v6 { 10 } else { 2 }]),
        ]),
        Match::L4proto(p) => out.extend([Expr::Meta(MetaKey::L4Proto), eq(vec![*p])]),
        Match::Iifname(name) | Match::Oifname(name) => {
            let key = if matches!(m, Match::Iifname(_)) {
                MetaKey::IifName
            } else {
                MetaKey::OifName
            };
            // IFNAMSIZ bytes, NUL-padded, as the kernel loads them.
            let mut bytes = name.as_bytes().to_vec();
            bytes.resize(16, 0);
            out.extend([Expr::Meta(key), eq(bytes)]);
        }
        Match::CtState(states) => {
            // NF_CT_STATE_INVALID_BIT, NF_CT_STATE_BIT(IP_CT_ESTABLISHED),
            // NF_CT_STATE_BIT(IP_CT_RELATED), in host order.
            let mask: u32 = states
                .iter()
                .map(|s| match s.as_str() {
                    "invalid" => 1,
                    "established" => 2,
                    "related" => 4,
                    "new" => 8,
                    _ => 0,
                })
                .fold(0, |a, b| a | b);
            out.extend([
                Expr::CtState,
                Expr::And(mask.to_ne_bytes().to_vec()),
                Expr::Cmp(Op::Neq, vec![0; 4]),
            ]);
        }
        Match::Prefix { source, prefix } => {
            if prefix.prefix() == 0 {
                return;
            }
            let (ip, mask) = match (prefix.network(), prefix.mask()) {
                (IpAddr::V4(n), IpAddr::V4(m)) => (n.octets().to_vec(), m.octets().to_vec()),
                (IpAddr::V6(n), IpAddr::V6(m)) => (n.octets().to_vec(), m.octets().to_vec()),
                _ => return,
            };
            let bits = usize::from(prefix.prefix());
            let Expr::Payload { base, offset, len } = address(*source, prefix.is_ipv6()) else {
                return;
            };
            if bits % 8 == 0 {
                // Whole bytes: only those are loaded and compared.
                let len = (bits / 8) as u32;
                out.extend([
                    Expr::Payload { base, offset, len },
                    eq(ip[..bits / 8].to_vec()),
                ]);
            } else {
                out.extend([Expr::Payload { base, offset, len }, Expr::And(mask), eq(ip)]);
            }
        }
        Match::InSet { source, v6, set } => {
            out.extend([address(*source, *v6), Expr::Lookup(set.clone())]);
        }
        Match::Transport {
            offset,
            len,
            lo,
            hi,
        } => {
            let bytes = |v: u16| {
                if *len == 1 {
                    vec![v as u8]
                } else {
                    v.to_be_bytes().to_vec()
                }
            };
            out.push(Expr::Payload {
                base: Base::Transport,
                offset: *offset,
                len: *len,
            });
            if lo == hi {
                out.push(eq(bytes(*lo)));
            } else {
                out.push(Expr::Range(bytes(*lo), bytes(*hi)));
            }
        }
    }
}

/// The load of the source or destination address of the IP header.
fn address(source: bool, v6: bool) -> Expr {
    let (offset, len) = match (v6, source) {
        (false, true) => (12, 4),
        (false, false) => (16, 4),
        (true, true) => (8, 16),
        (true, false) => (24, 16),
    };
    Expr::Payload {
        base: Base::Network,
        offset,
        len,
    }
}

/// `steps` as one nf_tables batch.
fn batch(steps: &[Step]) -> Batch {
    let mut b = Batch::new(TABLE);
    for step in steps {
        match step {
            Step::AddTable => b.add_table(),
            Step::FlushTable => b.flush_table(),
            Step::AddChain { name, hook } => b.add_chain(
                name,
                hook.as_deref().map(|h| {
                    if h == "output" {
                        Hook::Output
                    } else {
                        Hook::Input
                    }
                }),
            ),
            Step::AddSet { name, v6 } => b.add_set(name, *v6),
            Step::FlushSet { name } => b.flush_set(name),
            Step::AddElements { set, elements } => b.elements(set, true, elements),
            Step::DeleteElements { set, elements } => b.elements(set, false, elements),
            Step::AddRule {
                chain,
                matches,
                verdict,
            } => {
                let mut exprs = Vec::new();
                matches.iter().for_each(|m| lower(m, &mut exprs));
                exprs.push(Expr::Verdict(match verdict {
                    Action::Accept => Verdict::Accept,
                    Action::Drop => Verdict::Drop,
                    Action::Jump(c) => Verdict::Jump(c.clone()),
                }));
                b.add_rule(chain, &exprs);
            }
        }
    }
    b
}

/// Writes `steps` (see [`ruleset`]) in the pod's netns, in one
/// transaction: all of it or nothing.
pub fn apply(netns: &Path, steps: &[Step]) -> Result<(), Error> {
    let b = batch(steps);
    nftables::in_netns(netns, || b.send().map_err(|e| e.to_string())).map_err(|e| {
        Error::new(
            code::INTERNAL,
            format!("nf_tables in {}: {e}", netns.display()),
        )
    })
}

/// Removes the pod's table; nothing to remove is fine.
pub fn remove(netns: &Path) -> Result<(), Error> {
    let mut b = Batch::new(TABLE);
    b.delete_table();
    nftables::in_netns(netns, || match b.send() {
        Err(e) if e.errno != Errno::ENOENT => Err(e.to_string()),
        _ => Ok(()),
    })
    .map_err(|e| {
        Error::new(
            code::INTERNAL,
            format!("nf_tables in {}: {e}", netns.display()),
        )
    })
}

/// The `nft` binary, which lists tables for CHECK: Debian's, else the
/// first on `PATH`.
fn nft() -> &'static str {
    if Path::new("/usr/sbin/nft").exists() {
        "/usr/sbin/nft"
    } else {
        "nft"
    }
}

/// The table as `nft -j` lists it in this thread's netns.
fn list_here(what: &str) -> Result<Option<Value>, String> {
    let out = Command::new(nft())
        .args(["-j", "list", "table", "inet", TABLE])
        .output()
        .map_err(|e| format!("{what}: start {}: {e}", nft()))?;
    if out.status.success() {
        return canonical(&out.stdout).map(Some);
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("No such file") {
        Ok(None)
    } else {
        Err(format!("{what}: {}", err.trim()))
    }
}

/// The table of `steps` (a shape, see [`shape`]) as the kernel lists it
/// once written: written in a netns of its own that goes when done. CHECK
/// compares this with the pod's table, so that ADD need not list the
/// table it just wrote.
pub fn normalized(steps: &[Step]) -> Result<Value, Error> {
    let what = "nf_tables in a scratch netns";
    let b = batch(steps);
    let listing = std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("{what}: {e}"))?;
            b.send().map_err(|e| format!("{what}: {e}"))?;
            list_here(what)
        })
        .join()
        .unwrap_or_else(|_| Err(format!("{what}: thread panicked")))
    })
    .map_err(|e| Error::new(code::INTERNAL, e))?;
    Ok(listing.unwrap_or(Value::Null))
}

/// The table as the kernel has it, listed by `nft`, without handles and
/// set elements: what CHECK compares. `None` when there is no such table.
pub fn listed(netns: &Path) -> Result<Option<Value>, Error> {
    let what = format!("nft list table inet {TABLE} in {}", netns.display());
    nftables::in_netns(netns, || list_here(&what)).map_err(|e| Error::new(code::INTERNAL, e))
}

/// nft's JSON listing without its metainfo, handles and set elements.
fn canonical(raw: &[u8]) -> Result<Value, String> {
    let v: Value =
        serde_json::from_slice(raw).map_err(|e| format!("nft's listing does not parse: {e}"))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        let sets: Vec<&Step> = set
            .iter()
            .filter(|s| matches!(s, Step::AddElements { .. }))
            .collect();
        // Sets per family, with the members.
        assert_eq!(
            sets,
            [
                &Step::AddElements {
                    set: "g-client-v4".into(),
                    elements: vec!["10.1.0.5".parse().unwrap()]
                },
                &Step::AddElements {
                    set: "g-client-v6".into(),
                    elements: vec!["fd00::5".parse().unwrap()]
                }
            ]
        );
        let chains: Vec<&str> = set
            .iter()
            .filter_map(|s| match s {
                Step::AddChain { name, .. } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        // Only an ingress chain: no group has an egress rule.
        assert_eq!(chains, ["input", "output", "in-net1"]);
        let in_rules: Vec<&Step> = set
            .iter()
            .filter(|s| matches!(s, Step::AddRule { chain, .. } if chain == "in-net1"))
            .collect();
        // Preamble 3, tcp/80 from client in both families 2, icmp 1, udp 1, drop 1.
        assert_eq!(in_rules.len(), 8, "{in_rules:#?}");
        assert_eq!(
            in_rules.last(),
            Some(&&rule("in-net1", vec![], Action::Drop))
        );
        // The udp rule: an IPv6 prefix, then the port range.
        let mut exprs = Vec::new();
        let Step::AddRule { matches, .. } = in_rules[6] else {
            panic!("{:?}", in_rules[6])
        };
        matches.iter().for_each(|m| lower(m, &mut exprs));
        assert_eq!(
            exprs[2..],
            [
                Expr::Payload {
                    base: Base::Network,
                    offset: 8,
                    len: 1
                },
                Expr::Cmp(Op::Eq, vec![0xfd]),
                Expr::Meta(MetaKey::L4Proto),
                Expr::Cmp(Op::Eq, vec![UDP]),
                Expr::Payload {
                    base: Base::Transport,
                    offset: 2,
                    len: 2
                },
                Expr::Range(53u16.to_be_bytes().to_vec(), 54u16.to_be_bytes().to_vec()),
            ]
        );
    }
}
