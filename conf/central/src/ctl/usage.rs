//! `ipam usage`: an `IPPoolUsage` as a table of nodes and their blocks, then
//! the totals per family.

use serde_json::Value;

use super::kinds::{strings, text};
use super::table::Table;

const FAMILIES: [(&str, &str); 2] = [("ipv4", "IPv4"), ("ipv6", "IPv6")];

/// The families a usage object counts: those with a size, else with a count.
fn families(u: &Value) -> Vec<(&'static str, &'static str)> {
    let has = |f: &str| u.pointer(&format!("/size/{f}")).is_some();
    let counted = |f: &str| u.pointer(&format!("/inUse/{f}")).is_some();
    let mut fams: Vec<_> = FAMILIES.into_iter().filter(|(f, _)| has(f)).collect();
    if fams.is_empty() {
        fams = FAMILIES.into_iter().filter(|(f, _)| counted(f)).collect();
    }
    fams
}

/// A count that may be a number or a decimal string.
fn count(u: &Value, pointer: &str) -> String {
    match u.pointer(pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => "-".to_string(),
    }
}

/// The heading of one pool in `ipam usage`.
pub fn heading(u: &Value) -> String {
    let cidrs = strings(u, "/cidrs");
    match cidrs.is_empty() {
        true => format!("Pool {}\n", text(u, "/metadata/name")),
        false => format!(
            "Pool {} ({})\n",
            text(u, "/metadata/name"),
            cidrs.join(", ")
        ),
    }
}

/// The nodes table (one row per block) and the totals table.
pub fn render(u: &Value) -> String {
    let fams = families(u);
    let mut h = vec!["NODE".to_string(), "BLOCK".to_string()];
    h.extend(
        fams.iter()
            .map(|(_, n)| format!("{} IN USE", n.to_ascii_uppercase())),
    );
    let mut nodes = Table::new(&h);
    let empty = Vec::new();
    let list = u.get("nodes").and_then(Value::as_array).unwrap_or(&empty);
    for n in list {
        let blocks = strings(n, "/blocks");
        let mut first = vec![text(n, "/node").to_string()];
        first.push(blocks.first().cloned().unwrap_or_else(|| "<none>".into()));
        first.extend(fams.iter().map(|(f, _)| count(n, &format!("/inUse/{f}"))));
        nodes.push(first);
        for b in blocks.iter().skip(1) {
            nodes.push(vec![String::new(), b.clone()]);
        }
    }
    let mut out = if nodes.is_empty() {
        "No blocks claimed.\n".to_string()
    } else {
        nodes.render()
    };
    // Reserved: kept by nodes for their next ADDs, in use by no pod yet.
    let mut totals = Table::new(&["FAMILY", "IN USE", "RESERVED", "FREE", "SIZE"]);
    for (f, name) in &fams {
        totals.push(vec![
            name.to_string(),
            count(u, &format!("/inUse/{f}")),
            count(u, &format!("/reserved/{f}")),
            count(u, &format!("/free/{f}")),
            count(u, &format!("/size/{f}")),
        ]);
    }
    out.push('\n');
    out.push_str(&totals.render());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nodes_blocks_and_totals() {
        let u = json!({"apiVersion": "plexus.io/v1", "kind": "IPPoolUsage", "metadata": {"name": "p1"},
            "cidrs": ["10.1.0.0/16", "fd00:1::/64"],
            "nodes": [
                {"node": "n1", "blocks": ["10.1.0.0/26", "fd00:1::/122"], "inUse": {"ipv4": 3, "ipv6": 3}},
                {"node": "node-2", "blocks": [], "inUse": {"ipv4": 0, "ipv6": 0}}],
            "inUse": {"ipv4": 3, "ipv6": 3},
            "reserved": {"ipv4": 2, "ipv6": 2},
            "size": {"ipv4": "65534", "ipv6": "18446744073709551615"},
            "free": {"ipv4": "65529", "ipv6": "18446744073709551610"}});
        assert_eq!(heading(&u), "Pool p1 (10.1.0.0/16, fd00:1::/64)\n");
        assert_eq!(
            render(&u),
            "NODE     BLOCK          IPV4 IN USE   IPV6 IN USE\n\
             n1       10.1.0.0/26    3             3\n\
             \x20        fd00:1::/122\n\
             node-2   <none>         0             0\n\
             \n\
             FAMILY   IN USE   RESERVED   FREE                   SIZE\n\
             IPv4     3        2          65529                  65534\n\
             IPv6     3        2          18446744073709551610   18446744073709551615\n"
        );
    }

    #[test]
    fn single_family_without_nodes() {
        let u = json!({"metadata": {"name": "v4"}, "nodes": [],
            "inUse": {"ipv4": 0}, "size": {"ipv4": "254"}, "free": {"ipv4": "254"}});
        assert_eq!(
            render(&u),
            "No blocks claimed.\n\nFAMILY   IN USE   RESERVED   FREE   SIZE\nIPv4     0        -          254    254\n"
        );
    }
}
