//! `get`'s table: NAME (NAMESPACE first with `-A`), each kind's own columns,
//! AGE, then the `-o wide` extras.

use serde_json::Value;

use conf::api::{Kind, ATTACHMENT, CLUSTER_NETWORK, IP_POOL, NAD, NODE, SECURITY_GROUP};
use ipam::pool::{DEFAULT_BLOCK_V4, DEFAULT_BLOCK_V6};

use super::kinds::{name, namespace, strings, text};
use super::table::{age, Table};

/// How the table is laid out.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Add the NAMESPACE column (namespaced kinds only).
    pub all_namespaces: bool,
    /// Add the wide columns.
    pub wide: bool,
    /// Seconds since the epoch, for AGE.
    pub now: i64,
}

/// The table of `items` of one kind.
pub fn table(kind: &Kind, items: &[Value], layout: Layout) -> Table {
    let (own, wide) = headers(kind);
    let ns = layout.all_namespaces && kind.namespaced;
    let mut h: Vec<&str> = Vec::new();
    if ns {
        h.push("NAMESPACE");
    }
    h.push("NAME");
    h.extend(own);
    h.push("AGE");
    if layout.wide {
        h.extend(wide);
    }
    let mut t = Table::new(&h);
    for item in items {
        let (cells, extra) = cells(kind, item);
        let mut row = Vec::new();
        if ns {
            row.push(namespace(item).to_string());
        }
        row.push(name(item).to_string());
        row.extend(cells);
        row.push(age(text(item, "/metadata/creationTimestamp"), layout.now));
        if layout.wide {
            row.extend(extra);
        }
        t.push(row);
    }
    t
}

/// A kind's own columns and its wide ones.
fn headers(kind: &Kind) -> (&'static [&'static str], &'static [&'static str]) {
    if *kind == NAD {
        (&["TYPE"], &["CNI VERSION"])
    } else if *kind == CLUSTER_NETWORK {
        (&["TYPE", "ALLOWED NAMESPACES"], &["CNI VERSION"])
    } else if *kind == IP_POOL {
        (&["CIDRS", "BLOCK SIZES", "ALLOWED"], &["EXCLUDE"])
    } else if *kind == ATTACHMENT {
        (
            &["POD", "NODE", "INTERFACE", "NETWORK", "ADDRESSES", "MAC"],
            &["CONTAINER", "POOL"],
        )
    } else if *kind == SECURITY_GROUP {
        (&["RULES", "REMOTE GROUPS"], &["DESCRIPTION"])
    } else if *kind == NODE {
        (&["LEASE"], &[])
    } else {
        (&[], &[])
    }
}

fn cells(kind: &Kind, o: &Value) -> (Vec<String>, Vec<String>) {
    let s = |p: &str| or_none(text(o, p).to_string());
    let list = |p: &str| or_none(strings(o, p).join(","));
    let config = text(o, "/spec/config");
    if *kind == NAD {
        (vec![config_types(config)], vec![cni_version(config)])
    } else if *kind == CLUSTER_NETWORK {
        (
            vec![config_types(config), list("/spec/allowedNamespaces")],
            vec![cni_version(config)],
        )
    } else if *kind == IP_POOL {
        let cidrs = pool_cidrs(o);
        let sizes = block_sizes(o, &cidrs);
        (
            vec![
                or_none(cidrs.join(",")),
                sizes,
                list("/spec/allowedNamespaces"),
            ],
            vec![list("/spec/exclude")],
        )
    } else if *kind == ATTACHMENT {
        let container: String = text(o, "/spec/containerId").chars().take(12).collect();
        (
            vec![
                s("/spec/pod"),
                s("/spec/node"),
                s("/spec/interface"),
                s("/spec/network"),
                list("/spec/addresses"),
                s("/spec/mac"),
            ],
            vec![or_none(container), s("/spec/pool")],
        )
    } else if *kind == SECURITY_GROUP {
        let rules = o
            .pointer("/spec/rules")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut groups: Vec<&str> = rules
            .iter()
            .filter_map(|r| r.get("remoteGroup")?.as_str())
            .collect();
        groups.sort_unstable();
        groups.dedup();
        (
            vec![rules.len().to_string(), or_none(groups.join(","))],
            vec![s("/spec/description")],
        )
    } else if *kind == NODE {
        let lease = o.pointer("/spec/leaseSeconds").and_then(Value::as_u64);
        (
            vec![or_none(lease.map(|l| format!("{l}s")).unwrap_or_default())],
            Vec::new(),
        )
    } else {
        (Vec::new(), Vec::new())
    }
}

fn or_none(s: String) -> String {
    if s.is_empty() {
        "<none>".to_string()
    } else {
        s
    }
}

/// The plugin types of a CNI config (`plugins[].type`, or `type`), comma-separated.
pub fn config_types(config: &str) -> String {
    if config.trim().is_empty() {
        return "<none>".into();
    }
    let Ok(v) = serde_json::from_str::<Value>(config) else {
        return "<invalid>".into();
    };
    let types = match v.get("plugins").and_then(Value::as_array) {
        Some(plugins) => plugins
            .iter()
            .map(|p| text(p, "/type"))
            .collect::<Vec<_>>()
            .join(","),
        None => text(&v, "/type").to_string(),
    };
    or_none(types)
}

fn cni_version(config: &str) -> String {
    let v: Value = serde_json::from_str(config).unwrap_or(Value::Null);
    or_none(text(&v, "/cniVersion").to_string())
}

/// A pool's subnets: `cidrs` then host-local style `ranges[].subnet`.
pub fn pool_cidrs(o: &Value) -> Vec<String> {
    let mut all = strings(o, "/spec/cidrs");
    if let Some(ranges) = o.pointer("/spec/ranges").and_then(Value::as_array) {
        all.extend(ranges.iter().map(|r| text(r, "/subnet").to_string()));
    }
    all
}

/// The block prefix lengths of the families a pool has: `/26,/122`.
pub fn block_sizes(o: &Value, cidrs: &[String]) -> String {
    let size = |fam: &str, default: u8| {
        o.pointer(&format!("/spec/blockSizes/{fam}"))
            .and_then(Value::as_u64)
            .map_or(default.to_string(), |n| n.to_string())
    };
    let mut out = Vec::new();
    if cidrs.iter().any(|c| !c.contains(':')) {
        out.push(format!("/{}", size("ipv4", DEFAULT_BLOCK_V4)));
    }
    if cidrs.iter().any(|c| c.contains(':')) {
        out.push(format!("/{}", size("ipv6", DEFAULT_BLOCK_V6)));
    }
    or_none(out.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_700_000_000;
    const T: &str = "2023-11-14T22:10:00Z"; // NOW - 200 s

    fn layout(all_namespaces: bool, wide: bool) -> Layout {
        Layout {
            all_namespaces,
            wide,
            now: NOW,
        }
    }

    #[test]
    fn networks() {
        let conflist =
            r#"{"cniVersion":"1.0.0","name":"d","plugins":[{"type":"macvlan"},{"type":"tuning"}]}"#;
        let nads = [
            json!({"metadata": {"name": "data", "namespace": "red", "creationTimestamp": T},
                   "spec": {"config": conflist}}),
            json!({"metadata": {"name": "x", "namespace": "blue"}, "spec": {"config": "{"}}),
        ];
        let t = table(&NAD, &nads, layout(true, true)).render();
        assert_eq!(
            t,
            "NAMESPACE   NAME   TYPE             AGE         CNI VERSION\n\
             red         data   macvlan,tuning   3m20s       1.0.0\n\
             blue        x      <invalid>        <unknown>   <none>\n"
        );
        let cnet = json!({"metadata": {"name": "storage", "creationTimestamp": T},
            "spec": {"config": r#"{"type":"ipvlan"}"#, "allowedNamespaces": ["red", "blue"]}});
        let t = table(&CLUSTER_NETWORK, &[cnet], layout(true, false)).render();
        assert_eq!(
            t,
            "NAME      TYPE     ALLOWED NAMESPACES   AGE\n\
             storage   ipvlan   red,blue             3m20s\n"
        );
    }

    #[test]
    fn pools_and_attachments() {
        let pools = [
            json!({"metadata": {"name": "p1", "creationTimestamp": T},
                   "spec": {"cidrs": ["10.1.0.0/16", "fd00:1::/64"], "blockSizes": {"ipv4": 24}}}),
            json!({"metadata": {"name": "p2", "creationTimestamp": T},
                   "spec": {"ranges": [{"subnet": "10.2.0.0/16"}], "allowedNamespaces": ["*"]}}),
        ];
        let t = table(&IP_POOL, &pools, layout(true, false)).render();
        assert_eq!(
            t,
            "NAME   CIDRS                     BLOCK SIZES   ALLOWED   AGE\n\
             p1     10.1.0.0/16,fd00:1::/64   /24,/122      <none>    3m20s\n\
             p2     10.2.0.0/16               /26           *         3m20s\n"
        );
        let att = json!({"metadata": {"name": "web-net1-abcdef01", "namespace": "red", "creationTimestamp": T},
            "spec": {"pod": "web", "node": "n1", "containerId": "abcdef0123456789", "interface": "net1",
                     "network": "red/data", "addresses": ["10.1.0.5/16", "fd00:1::5/64"], "mac": "02:00:00:00:00:01"}});
        let t = table(&ATTACHMENT, &[att], layout(false, true)).render();
        assert_eq!(
            t,
            "NAME                POD   NODE   INTERFACE   NETWORK    ADDRESSES                  MAC                 AGE     CONTAINER      POOL\n\
             web-net1-abcdef01   web   n1     net1        red/data   10.1.0.5/16,fd00:1::5/64   02:00:00:00:00:01   3m20s   abcdef012345   <none>\n"
        );
    }

    #[test]
    fn plugin_types() {
        assert_eq!(config_types(r#"{"type": "bridge"}"#), "bridge");
        assert_eq!(config_types(""), "<none>");
        assert_eq!(config_types("{}"), "<none>");
    }
}
