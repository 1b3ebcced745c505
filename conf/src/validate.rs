//! Validation of an API object before anything is stored: the object shape,
//! names, unknown fields, the embedded CNI config and the built-in plugins'
//! fields, pools. Every fault carries the field path Kubernetes would name.

use std::net::IpAddr;

use ipam::pool::{BlockSizes, Range, RouteDef};
use ipam::Pool;
use ipnetwork::IpNetwork;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::api::{self, Kind};

/// One fault: the field path (`spec.config`, `metadata.name`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn fault(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// The plugin types the built-in plugins and Debian's reference plugins
/// answer to: what every Plexus node has in its `CNI_PATH`.
pub const NODE_TYPES: &[&str] = &[
    "plexus",
    "plexus-veth",
    "plexus-macvlan",
    "plexus-ipvlan",
    "plexus-sriov",
    "plexus-ipam",
    "bandwidth",
    "bridge",
    "dhcp",
    "firewall",
    "host-device",
    "host-local",
    "ipvlan",
    "loopback",
    "macvlan",
    "portmap",
    "ptp",
    "sbr",
    "static",
    "tap",
    "tuning",
    "vlan",
    "vrf",
    "dummy",
];

/// What a valid object brings with it, for the checks that need the store.
#[derive(Debug, Default)]
pub struct Valid {
    /// An IPPool's pool, as `plexus-ipam` stores it.
    pub pool: Option<Pool>,
    /// Pools a network's config names (`"ipam": {"pool": …}`), with the path
    /// of the field that names each.
    pub pools_named: Vec<(String, String)>,
    /// `plexus-ipam` sections that define their pool inline (ranges or
    /// subnet), with their path and why: fine for an admin's network, not
    /// for a tenant's.
    pub inline_pools: Vec<(String, String)>,
    /// Fields that are the node's to set (where IPAM keeps state, which
    /// store and node name it uses; the meta-plugin itself), with their
    /// path: an admin's network may set them, a tenant's may not.
    pub node_owned: Vec<String>,
}

/// ObjectMeta fields a client may send; anything else in `metadata` is refused.
const META_FIELDS: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "generation",
    "labels",
    "annotations",
    "managedFields",
    "finalizers",
    "ownerReferences",
    "generateName",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

/// Checks `obj` as an object of `kind` in `namespace` (the URL's), where
/// `types` are the plugin types nodes have.
pub fn validate(kind: &Kind, obj: &Value, types: &[String]) -> Result<Valid, Vec<FieldError>> {
    let mut errs = Vec::new();
    let Some(map) = obj.as_object() else {
        return Err(vec![fault("", "the body is not a JSON object")]);
    };
    for (k, _) in map.iter() {
        if !matches!(
            k.as_str(),
            "apiVersion" | "kind" | "metadata" | "spec" | "status"
        ) {
            errs.push(fault(k.as_str(), "unknown field"));
        }
    }
    let api_version = map.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    if api_version != kind.api_version() {
        errs.push(fault(
            "apiVersion",
            format!("must be {:?}, not {api_version:?}", kind.api_version()),
        ));
    }
    let k = map.get("kind").and_then(Value::as_str).unwrap_or("");
    if k != kind.kind {
        errs.push(fault("kind", format!("must be {:?}, not {k:?}", kind.kind)));
    }
    let name = check_metadata(kind, map.get("metadata"), &mut errs);
    let mut valid = Valid::default();
    let spec = map.get("spec").cloned().unwrap_or(Value::Null);
    if spec.is_null() {
        errs.push(fault("spec", "required"));
    } else if *kind == api::NAD {
        match api::NadSpec::deserialize(&spec) {
            Ok(s) => check_config(&s.config, &name, types, &mut valid, &mut errs),
            Err(e) => errs.push(fault("spec", e.to_string())),
        }
    } else if *kind == api::CLUSTER_NETWORK {
        match api::ClusterNetworkSpec::deserialize(&spec) {
            Ok(s) => {
                check_config(&s.config, &name, types, &mut valid, &mut errs);
                check_namespaces(&s.allowed_namespaces, &mut errs);
            }
            Err(e) => errs.push(fault("spec", e.to_string())),
        }
    } else if *kind == api::IP_POOL {
        match PoolSpec::deserialize(&spec) {
            Ok(s) => {
                check_namespaces(&s.allowed_namespaces, &mut errs);
                match s.into_pool(&name) {
                    Ok(p) => valid.pool = Some(p),
                    Err(e) => errs.push(e),
                }
            }
            Err(e) => errs.push(fault("spec", e.to_string())),
        }
    } else if *kind == api::ATTACHMENT {
        if let Err(e) = api::AttachmentSpec::deserialize(&spec) {
            errs.push(fault("spec", e.to_string()));
        }
    } else if *kind == api::SECURITY_GROUP {
        check_security_group(&spec, &mut errs);
    } else if *kind == api::NODE {
        if let Err(e) = api::NodeSpec::deserialize(&spec) {
            errs.push(fault("spec", e.to_string()));
        }
    }
    if errs.is_empty() {
        Ok(valid)
    } else {
        Err(errs)
    }
}

fn check_metadata(kind: &Kind, meta: Option<&Value>, errs: &mut Vec<FieldError>) -> String {
    let Some(meta) = meta.and_then(Value::as_object) else {
        errs.push(fault("metadata", "required"));
        return String::new();
    };
    for k in meta.keys() {
        if !META_FIELDS.contains(&k.as_str()) {
            errs.push(fault(format!("metadata.{k}"), "unknown field"));
        }
    }
    let name = meta.get("name").and_then(Value::as_str).unwrap_or("");
    let name_ok = if kind.node_written {
        api::is_dns_subdomain(name)
    } else {
        api::is_dns_label(name)
    };
    if !name_ok {
        errs.push(fault(
            "metadata.name",
            format!(
                "{name:?} is not a DNS-1123 label (at most 63 lower-case letters, digits and '-', \
                 starting and ending with a letter or digit)"
            ),
        ));
    }
    for field in ["labels", "annotations"] {
        match meta.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) if m.values().all(Value::is_string) => {}
            Some(_) => errs.push(fault(
                format!("metadata.{field}"),
                "must map strings to strings",
            )),
        }
    }
    name.to_string()
}

/// Rules a SecurityGroup may hold.
pub const MAX_RULES: usize = 1000;

/// A SecurityGroup's `spec`: `description` and `rules`, each rule in
/// OpenStack's model. Every fault names the rule's field.
fn check_security_group(spec: &Value, errs: &mut Vec<FieldError>) {
    let Some(spec) = spec.as_object() else {
        return errs.push(fault("spec", "must be an object"));
    };
    for (k, v) in spec {
        match (k.as_str(), v) {
            ("description", Value::String(_)) | ("rules", Value::Array(_)) => {}
            ("description", _) => errs.push(fault("spec.description", "must be a string")),
            ("rules", _) => errs.push(fault("spec.rules", "must be a list of rules")),
            _ => errs.push(fault(format!("spec.{k}"), "unknown field")),
        }
    }
    let rules = spec
        .get("rules")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if rules.len() > MAX_RULES {
        errs.push(fault(
            "spec.rules",
            format!("{} rules; at most {MAX_RULES}", rules.len()),
        ));
    }
    for (i, rule) in rules.iter().enumerate() {
        check_rule(&format!("spec.rules[{i}]"), rule, errs);
    }
}

/// The protocols a rule may name.
pub const PROTOCOLS: &[&str] = &["tcp", "udp", "sctp", "icmp", "icmpv6", "any"];

fn check_rule(at: &str, rule: &Value, errs: &mut Vec<FieldError>) {
    let Some(rule) = rule.as_object() else {
        return errs.push(fault(at, "must be an object"));
    };
    let field = |k: &str| format!("{at}.{k}");
    let string = |k: &str, errs: &mut Vec<FieldError>| -> Option<String> {
        match rule.get(k) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                errs.push(fault(field(k), "must be a string"));
                None
            }
        }
    };
    let number = |k: &str, max: u64, errs: &mut Vec<FieldError>| -> Option<u64> {
        match rule.get(k) {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64().filter(|n| *n <= max) {
                Some(n) => Some(n),
                None => {
                    errs.push(fault(field(k), format!("must be a whole number 0-{max}")));
                    None
                }
            },
        }
    };
    for k in rule.keys() {
        if !matches!(
            k.as_str(),
            "direction"
                | "ethertype"
                | "protocol"
                | "portRangeMin"
                | "portRangeMax"
                | "icmpType"
                | "icmpCode"
                | "remoteIpPrefix"
                | "remoteGroup"
                | "description"
        ) {
            errs.push(fault(field(k), "unknown field"));
        }
    }
    match string("direction", errs).as_deref() {
        Some("ingress" | "egress") => {}
        None => errs.push(fault(field("direction"), "required: ingress or egress")),
        Some(d) => errs.push(fault(
            field("direction"),
            format!("{d:?} is not ingress or egress"),
        )),
    }
    let family = match string("ethertype", errs).as_deref() {
        None => None,
        Some("IPv4") => Some(false),
        Some("IPv6") => Some(true),
        Some(e) => {
            errs.push(fault(
                field("ethertype"),
                format!("{e:?} is not IPv4 or IPv6"),
            ));
            None
        }
    };
    let protocol = string("protocol", errs).unwrap_or_else(|| "any".into());
    if !PROTOCOLS.contains(&protocol.as_str()) {
        errs.push(fault(
            field("protocol"),
            format!("{protocol:?} is not one of {}", PROTOCOLS.join(", ")),
        ));
    }
    match (protocol.as_str(), family) {
        ("icmp", Some(true)) => {
            errs.push(fault(field("protocol"), "icmp is IPv4's; IPv6 has icmpv6"))
        }
        ("icmpv6", Some(false)) => {
            errs.push(fault(field("protocol"), "icmpv6 is IPv6's; IPv4 has icmp"))
        }
        _ => {}
    }
    let ports = matches!(protocol.as_str(), "tcp" | "udp" | "sctp");
    let min = number("portRangeMin", 65535, errs);
    let max = number("portRangeMax", 65535, errs);
    if (min.is_some() || max.is_some()) && !ports {
        errs.push(fault(
            field("portRangeMin"),
            format!("ports need protocol tcp, udp or sctp, not {protocol}"),
        ));
    }
    match (min, max) {
        (Some(0), _) => errs.push(fault(field("portRangeMin"), "ports start at 1")),
        (Some(lo), Some(hi)) if lo > hi => errs.push(fault(
            field("portRangeMax"),
            format!("the range {lo}-{hi} runs backwards"),
        )),
        (None, Some(_)) => errs.push(fault(field("portRangeMin"), "required with portRangeMax")),
        _ => {}
    }
    let icmp_type = number("icmpType", 255, errs);
    let icmp_code = number("icmpCode", 255, errs);
    let icmp = matches!(protocol.as_str(), "icmp" | "icmpv6");
    if (icmp_type.is_some() || icmp_code.is_some()) && !icmp {
        errs.push(fault(
            field("icmpType"),
            format!("ICMP type and code need protocol icmp or icmpv6, not {protocol}"),
        ));
    }
    if icmp_code.is_some() && icmp_type.is_none() {
        errs.push(fault(field("icmpType"), "required with icmpCode"));
    }
    let prefix = string("remoteIpPrefix", errs);
    let group = string("remoteGroup", errs);
    if prefix.is_some() && group.is_some() {
        errs.push(fault(
            field("remoteGroup"),
            "a rule's remote is a CIDR or a group, not both",
        ));
    }
    if let Some(p) = prefix {
        match p.parse::<IpNetwork>() {
            Err(e) => errs.push(fault(
                field("remoteIpPrefix"),
                format!("{p:?} is not a CIDR: {e}"),
            )),
            Ok(net) => {
                if net.network() != net.ip() {
                    errs.push(fault(
                        field("remoteIpPrefix"),
                        format!(
                            "{p} has host bits set; write {}/{}",
                            net.network(),
                            net.prefix()
                        ),
                    ));
                }
                if family.is_some_and(|v6| v6 != net.is_ipv6()) {
                    errs.push(fault(
                        field("remoteIpPrefix"),
                        format!("{p} is not of the rule's ethertype"),
                    ));
                }
                if (protocol == "icmp" && net.is_ipv6()) || (protocol == "icmpv6" && net.is_ipv4())
                {
                    errs.push(fault(
                        field("remoteIpPrefix"),
                        format!("{p} is not of {protocol}'s family"),
                    ));
                }
            }
        }
    }
    if let Some(g) = group {
        if g.contains('/') {
            errs.push(fault(
                field("remoteGroup"),
                format!(
                    "{g:?}: a remote group is one of this namespace's, named without a namespace \
                     (another tenant's members are not this tenant's to name)"
                ),
            ));
        } else if !api::is_dns_label(&g) {
            errs.push(fault(
                field("remoteGroup"),
                format!("{g:?} is not a group name"),
            ));
        }
    }
}

fn check_namespaces(list: &[String], errs: &mut Vec<FieldError>) {
    for (i, ns) in list.iter().enumerate() {
        if ns != "*" && !api::is_dns_label(ns) {
            errs.push(fault(
                format!("spec.allowedNamespaces[{i}]"),
                format!("{ns:?} is not a namespace name"),
            ));
        }
    }
}

/// `spec.config`: a CNI config or conflist whose every plugin type nodes
/// have, with the built-in plugins' fields valid.
fn check_config(
    config: &str,
    name: &str,
    types: &[String],
    valid: &mut Valid,
    errs: &mut Vec<FieldError>,
) {
    let list = match crate::definition::parse_config(config, name) {
        Ok(l) => l,
        Err(e) => return errs.push(fault("spec.config", e)),
    };
    let path = |i: usize, field: &str| {
        if list.plugins.len() == 1 && !config.contains("\"plugins\"") {
            format!("spec.config.{field}")
        } else {
            format!("spec.config.plugins[{i}].{field}")
        }
    };
    for (i, plugin) in list.plugins.iter().enumerate() {
        let t = plugin.get("type").and_then(Value::as_str).unwrap_or("");
        if !types.iter().any(|k| k == t) {
            errs.push(fault(
                path(i, "type"),
                format!("no node has a CNI plugin of type {t:?}"),
            ));
            continue;
        }
        if t == "plexus" {
            valid.node_owned.push(path(i, "type"));
        }
        if t == "plexus-sriov" {
            if plugin.get("stateDir").is_some() {
                valid.node_owned.push(path(i, "stateDir"));
            }
            check_sriov(plugin, &|f| path(i, f), errs);
        } else {
            check_builtin(t, plugin, &|f| path(i, f), errs);
        }
        if let Some(ipam) = plugin.get("ipam") {
            check_ipam(ipam, types, &path(i, "ipam"), valid, errs);
        }
    }
}

fn check_builtin(
    t: &str,
    extra: &Map<String, Value>,
    path: &dyn Fn(&str) -> String,
    errs: &mut Vec<FieldError>,
) {
    if !t.starts_with("plexus-") || t == "plexus-ipam" {
        return;
    }
    if let Some(v) = extra.get("mtu").filter(|v| !v.is_null()) {
        let ok = v
            .as_u64()
            .is_some_and(|m| m == 0 || (68..=65535).contains(&m));
        if !ok {
            errs.push(fault(
                path("mtu"),
                format!("{v} is not a number from 68 to 65535"),
            ));
        }
    }
    if t == "plexus-veth" {
        return;
    }
    if let Some(v) = extra.get("master").filter(|v| !v.is_null()) {
        let ok = v
            .as_str()
            .is_some_and(|m| !m.is_empty() && m.len() < 16 && !m.contains(['/', ' ']));
        if !ok {
            errs.push(fault(
                path("master"),
                format!("{v} is not an interface name"),
            ));
        }
    }
    if let Some(v) = extra.get("linkInContainer").filter(|v| !v.is_null()) {
        if !v.is_boolean() {
            errs.push(fault(path("linkInContainer"), "must be true or false"));
        }
    }
    let modes: &[&str] = if t == "plexus-macvlan" {
        &["bridge", "private", "vepa", "passthru"]
    } else {
        &["l2", "l3", "l3s"]
    };
    if let Some(v) = extra.get("mode").filter(|v| !v.is_null()) {
        if !v.as_str().is_some_and(|m| modes.contains(&m)) {
            errs.push(fault(
                path("mode"),
                format!("{v} is not one of {}", modes.join(", ")),
            ));
        }
    }
    if t == "plexus-macvlan" {
        if let Some(v) = extra.get("mac").filter(|v| !v.is_null()) {
            if !v.as_str().is_some_and(is_mac) {
                errs.push(fault(path("mac"), format!("{v} is not a MAC address")));
            }
        }
    }
}

/// `plexus-sriov`'s fields (sriov-cni's), as the plugin reads them.
fn check_sriov(
    extra: &Map<String, Value>,
    path: &dyn Fn(&str) -> String,
    errs: &mut Vec<FieldError>,
) {
    let given = |k: &str| extra.get(k).filter(|v| !v.is_null());
    if let Some(v) = given("deviceID") {
        if !v.as_str().is_some_and(is_pci_address) {
            errs.push(fault(
                path("deviceID"),
                format!("{v} is not a PCI address (as 0000:01:10.4)"),
            ));
        }
    }
    for (key, max) in [
        ("vlan", 4094),
        ("vlanQoS", 7),
        ("min_tx_rate", u64::from(u32::MAX)),
        ("max_tx_rate", u64::from(u32::MAX)),
    ] {
        if let Some(v) = given(key) {
            if v.as_u64().is_none_or(|n| n > max) {
                errs.push(fault(
                    path(key),
                    format!("{v} is not a number from 0 to {max}"),
                ));
            }
        }
    }
    for (key, allowed) in [
        ("vlanProto", &["802.1q", "802.1ad"][..]),
        ("spoofchk", &["on", "off"][..]),
        ("trust", &["on", "off"][..]),
        ("link_state", &["auto", "enable", "disable"][..]),
    ] {
        if let Some(v) = given(key) {
            let ok = v
                .as_str()
                .is_some_and(|s| allowed.contains(&s.to_ascii_lowercase().as_str()));
            if !ok {
                errs.push(fault(
                    path(key),
                    format!("{v} is not one of {}", allowed.join(", ")),
                ));
            }
        }
    }
    if given("vlan").is_none() && (given("vlanQoS").is_some() || given("vlanProto").is_some()) {
        errs.push(fault(path("vlan"), "vlanQoS and vlanProto need a vlan"));
    }
    if let Some(v) = given("mac") {
        if !v.as_str().is_some_and(is_mac) {
            errs.push(fault(path("mac"), format!("{v} is not a MAC address")));
        }
    }
}

fn is_pci_address(s: &str) -> bool {
    let hex = |p: &str, lens: std::ops::RangeInclusive<usize>| {
        lens.contains(&p.len()) && p.bytes().all(|b| b.is_ascii_hexdigit())
    };
    let mut parts = s.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(domain), Some(bus), Some(rest)) => rest.split_once('.').is_some_and(|(dev, f)| {
            hex(domain, 4..=8)
                && hex(bus, 2..=2)
                && hex(dev, 2..=2)
                && matches!(f.as_bytes(), [b'0'..=b'7'])
        }),
        _ => false,
    }
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok())
}

fn check_ipam(
    ipam: &Value,
    types: &[String],
    path: &str,
    valid: &mut Valid,
    errs: &mut Vec<FieldError>,
) {
    let t = ipam.get("type").and_then(Value::as_str).unwrap_or("");
    if !types.iter().any(|k| k == t) {
        return errs.push(fault(
            format!("{path}.type"),
            format!("no node has an IPAM plugin of type {t:?}"),
        ));
    }
    if t != "plexus-ipam" {
        return;
    }
    for field in ["store", "stateDir", "nodeName"] {
        if ipam.get(field).is_some() {
            valid.node_owned.push(format!("{path}.{field}"));
        }
    }
    match ipam::config::IpamConf::from_section(ipam) {
        Err(e) => errs.push(fault(path, e.to_string())),
        Ok(conf) => match &conf.pool {
            Some(pool) if conf.ranges.is_empty() && conf.subnet.is_none() => valid
                .pools_named
                .push((pool.clone(), format!("{path}.pool"))),
            _ => {
                if let Err(e) = conf.defined_pool("check") {
                    errs.push(fault(path, e.to_string()));
                }
                valid.inline_pools.push((
                    path.to_string(),
                    "it defines its pool inline (ranges or subnet)".into(),
                ));
            }
        },
    }
}

/// An IPPool's `spec`: CIDRs (or host-local's ranges), block sizes,
/// excludes, routes, and the namespaces whose networks may draw from it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolSpec {
    #[serde(default)]
    pub cidrs: Vec<String>,
    #[serde(default)]
    pub ranges: Vec<Range>,
    #[serde(default)]
    pub block_sizes: Option<BlockSizes>,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub routes: Vec<RouteDef>,
    #[serde(default)]
    pub allowed_namespaces: Vec<String>,
}

fn cidr(s: &str) -> Option<IpNetwork> {
    s.parse::<IpNetwork>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNetwork::from))
}

impl PoolSpec {
    /// The pool `plexus-ipam` stores for it.
    pub fn into_pool(self, name: &str) -> Result<Pool, FieldError> {
        let mut ranges = self.ranges;
        for (i, c) in self.cidrs.iter().enumerate() {
            let subnet = cidr(c).filter(|n| n.to_string().contains('/') || c.contains('/'));
            let Some(subnet) = subnet.filter(|_| c.contains('/')) else {
                return Err(fault(
                    format!("spec.cidrs[{i}]"),
                    format!("{c:?} is not a CIDR"),
                ));
            };
            ranges.push(Range {
                subnet,
                range_start: None,
                range_end: None,
                gateway: None,
            });
        }
        if ranges.is_empty() {
            return Err(fault("spec.cidrs", "a pool needs at least one CIDR"));
        }
        let mut exclude = Vec::new();
        for (i, e) in self.exclude.iter().enumerate() {
            match cidr(e) {
                Some(n) => exclude.push(n),
                None => {
                    return Err(fault(
                        format!("spec.exclude[{i}]"),
                        format!("{e:?} is not an address or CIDR"),
                    ))
                }
            }
        }
        Pool {
            name: name.to_string(),
            ranges,
            block_sizes: self.block_sizes.unwrap_or_default(),
            exclude,
            routes: self.routes,
        }
        .validated()
        .map_err(|e| fault("spec", e.to_string()))
    }
}

/// The `spec.allowedNamespaces` of an IPPool or ClusterNetwork object.
pub fn allowed_namespaces(obj: &Value) -> Vec<String> {
    obj.pointer("/spec/allowedNamespaces")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn types() -> Vec<String> {
        NODE_TYPES.iter().map(|s| s.to_string()).collect()
    }

    fn fields(r: Result<Valid, Vec<FieldError>>) -> Vec<String> {
        r.err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    fn nad(name: &str, config: Value) -> Value {
        json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
               "metadata": {"name": name, "namespace": "red"},
               "spec": {"config": config.to_string()}})
    }

    #[test]
    fn networks() {
        let ok = nad(
            "data",
            json!({"cniVersion": "1.0.0", "type": "plexus-macvlan", "master": "eth1",
                   "mode": "bridge", "ipam": {"type": "plexus-ipam", "pool": "p1"}}),
        );
        let v = validate(&api::NAD, &ok, &types()).expect("valid");
        assert_eq!(
            v.pools_named,
            vec![("p1".to_string(), "spec.config.ipam.pool".to_string())]
        );
        let bad = nad(
            "Data_1",
            json!({"cniVersion": "1.0.0", "type": "plexus-macvlan", "mode": "fast", "mtu": 9}),
        );
        assert_eq!(
            fields(validate(&api::NAD, &bad, &types())),
            ["metadata.name", "spec.config.mtu", "spec.config.mode"]
        );
        let nobody = nad("x", json!({"cniVersion": "1.0.0", "type": "weave"}));
        assert_eq!(
            fields(validate(&api::NAD, &nobody, &types())),
            ["spec.config.type"]
        );
        let mut extra = nad("x", json!({"cniVersion": "1.0.0", "type": "bridge"}));
        extra["spec"]["color"] = json!("red");
        extra["metadata"]["colour"] = json!("red");
        assert_eq!(
            fields(validate(&api::NAD, &extra, &types())),
            ["metadata.colour", "spec"]
        );
        let sriov = nad(
            "vf",
            json!({"cniVersion": "1.1.0", "type": "plexus-sriov", "deviceID": "0000:01:10.4",
                   "vlan": 100, "vlanProto": "802.1Q", "spoofchk": "off", "trust": "on",
                   "max_tx_rate": 100, "mac": "02:00:00:00:00:01"}),
        );
        validate(&api::NAD, &sriov, &types()).expect("valid");
        let sriov = nad(
            "vf",
            json!({"cniVersion": "1.1.0", "type": "plexus-sriov", "deviceID": "01:10.4",
                   "vlan": 4095, "spoofchk": true, "link_state": "up", "mac": "x",
                   "stateDir": "/tmp"}),
        );
        assert_eq!(
            fields(validate(&api::NAD, &sriov, &types())),
            [
                "spec.config.deviceID",
                "spec.config.vlan",
                "spec.config.spoofchk",
                "spec.config.link_state",
                "spec.config.mac",
            ]
        );
        let broken = nad("x", json!("{"));
        assert_eq!(
            fields(validate(&api::NAD, &broken, &types())),
            ["spec.config"]
        );
    }

    #[test]
    fn pools() {
        let pool = |spec: Value| {
            json!({"apiVersion": "plexus.io/v1", "kind": "IPPool",
                   "metadata": {"name": "p1"}, "spec": spec})
        };
        let v = validate(
            &api::IP_POOL,
            &pool(
                json!({"cidrs": ["10.1.0.0/16", "fd00:1::/64"], "exclude": ["10.1.0.1"],
                         "blockSizes": {"ipv4": 24, "ipv6": 120}, "allowedNamespaces": ["red"]}),
            ),
            &types(),
        )
        .expect("valid");
        let p = v.pool.expect("pool");
        assert_eq!(p.ranges.len(), 2);
        assert_eq!(p.block_sizes.ipv4, 24);
        for bad in [
            json!({"cidrs": ["10.1.0.0/33"]}),
            json!({"cidrs": ["10.1.0.1"]}),
            json!({"cidrs": []}),
            json!({"cidrs": ["10.0.0.0/8"], "exclude": ["x"]}),
            json!({"cidrs": ["10.0.0.0/8"], "blockSizes": {"ipv4": 8}}),
            json!({"cidrs": ["10.0.0.0/8", "10.1.0.0/16"]}),
            json!({"cidrs": ["10.0.0.0/8"], "allowedNamespaces": ["Red"]}),
        ] {
            assert!(
                validate(&api::IP_POOL, &pool(bad.clone()), &types()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn security_groups() {
        let sg = |rules: Value| {
            json!({"apiVersion": "plexus.io/v1", "kind": "SecurityGroup",
                   "metadata": {"name": "web", "namespace": "red"},
                   "spec": {"description": "web servers", "rules": rules}})
        };
        let ok = sg(json!([
            {"direction": "ingress", "protocol": "tcp", "portRangeMin": 80, "portRangeMax": 80,
             "remoteGroup": "client"},
            {"direction": "ingress", "ethertype": "IPv6", "protocol": "icmpv6", "icmpType": 128},
            {"direction": "egress", "remoteIpPrefix": "10.0.0.0/8"},
            {"direction": "ingress", "protocol": "udp", "portRangeMin": 53}
        ]));
        validate(&api::SECURITY_GROUP, &ok, &types()).expect("valid");
        let bad = sg(json!([
            {"direction": "in"},
            {"direction": "ingress", "protocol": "tcp", "portRangeMin": 90, "portRangeMax": 80},
            {"direction": "ingress", "protocol": "gre"},
            {"direction": "ingress", "remoteGroup": "blue/client"},
            {"direction": "ingress", "remoteIpPrefix": "10.0.0.1/8"},
            {"direction": "ingress", "protocol": "udp", "icmpType": 8},
            {"direction": "egress", "ethertype": "IPv4", "protocol": "icmpv6"},
            {"direction": "egress", "remoteIpPrefix": "10.0.0.0/8", "remoteGroup": "x"},
            {"direction": "egress", "protocol": "tcp", "portRangeMax": 70000, "color": 1},
            {"protocol": "tcp"}
        ]));
        assert_eq!(
            fields(validate(&api::SECURITY_GROUP, &bad, &types())),
            [
                "spec.rules[0].direction",
                "spec.rules[1].portRangeMax",
                "spec.rules[2].protocol",
                "spec.rules[3].remoteGroup",
                "spec.rules[4].remoteIpPrefix",
                "spec.rules[5].icmpType",
                "spec.rules[6].protocol",
                "spec.rules[7].remoteGroup",
                "spec.rules[8].color",
                "spec.rules[8].portRangeMax",
                "spec.rules[9].direction",
            ]
        );
        let mut extra = sg(json!([]));
        extra["spec"]["stateless"] = json!(true);
        assert_eq!(
            fields(validate(&api::SECURITY_GROUP, &extra, &types())),
            ["spec.stateless"]
        );
    }
}
