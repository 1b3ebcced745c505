//! What one pod gets: the ordered delegates (cluster network first), built and
//! checked before anything is touched, and recorded so DEL can undo them.

use std::collections::BTreeSet;
use std::net::IpAddr;

use cni::{code, Error, NetConfList, RuntimeConfig};
use conf::api::{SecurityGroupSpec, CLUSTER_NETWORK, NAD, SECURITY_GROUPS_ANNOTATION};
use conf::{Definition, Definitions, Scope};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::node::{ClusterNetwork, NodeConf};
use super::selection::{self, Selection, NETWORKS_ANNOTATION};

/// One network to attach: a conflist run on one interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delegate {
    /// The network as the pod named it (`name` or `ns/name`), or the cluster list's name.
    pub network: String,
    /// Interface name in the pod.
    pub ifname: String,
    pub list: NetConfList,
    /// Capability arguments offered to the list's plugins.
    #[serde(default)]
    pub caps: Map<String, Value>,
    /// Gateways this network's interface becomes the default route through.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub default_route: Vec<IpAddr>,
    /// Result of ADD, once it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The definition it came from (none for an inline cluster network);
    /// only ADD needs it, for the Attachment records.
    #[serde(skip)]
    pub origin: Option<Origin>,
    /// Its security groups (the network's and the pod's), of the pod's
    /// namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Those groups' rules, when ADD planned them.
    #[serde(skip)]
    pub rules: Vec<(String, SecurityGroupSpec)>,
    /// The device resource its definition names, whose device kubelet
    /// allocated to the pod becomes `deviceID` (see `meta::devices`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
}

/// A definition in the central API's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    /// `namespace/name` of a NetworkAttachmentDefinition, or a cluster network's name.
    pub network: String,
    /// `NetworkAttachmentDefinition` or `ClusterNetwork`.
    pub kind: &'static str,
    /// The definition's default security groups.
    pub security_groups: Vec<String>,
    /// Whether pods may add groups.
    pub pod_security_groups: bool,
}

impl Origin {
    fn of(def: &Definition) -> Origin {
        Origin {
            network: match &def.namespace {
                Some(ns) => format!("{ns}/{}", def.name),
                None => def.name.clone(),
            },
            kind: match def.scope {
                Scope::Allowed(_) => CLUSTER_NETWORK.kind,
                _ => NAD.kind,
            },
            security_groups: def.security_groups.clone(),
            pod_security_groups: def.pod_security_groups,
        }
    }
}

/// What the cache keeps for one pod attachment, under the key `plexus`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    pub delegates: Vec<Delegate>,
    /// The etcd keys of the Attachment records ADD wrote, which DEL removes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<String>,
    /// The pod's security-group ruleset as ADD wrote it, without set
    /// elements (`nft -j` input), for CHECK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Value>,
}

/// The key of the record in a cache entry's extra fields.
pub const RECORD_KEY: &str = "plexus";

impl Record {
    /// The record a cache entry holds, if it holds one that reads.
    pub fn of(entry: &cni::cache::CacheEntry) -> Option<Record> {
        serde_json::from_value(entry.extra.get(RECORD_KEY)?.clone()).ok()
    }
}

/// Where one call's network definitions come from: `confDir`, or the central API.
pub trait Source {
    /// The definitions pods of `namespaces` may ask for, cluster networks
    /// included (`None`: every namespace's).
    fn load(&mut self, namespaces: Option<&[String]>) -> Result<Definitions, Error>;

    /// The CNI error for a network that cannot be used.
    fn explain(&self, e: conf::Error) -> Error {
        e.into()
    }
}

/// `confDir`: every file there, whatever the namespaces.
pub struct Dir<'a>(pub &'a NodeConf);

impl Source for Dir<'_> {
    fn load(&mut self, _: Option<&[String]>) -> Result<Definitions, Error> {
        match &self.0.conf_dir {
            Some(dir) => Ok(Definitions::load_dir(dir, &self.0.cluster_namespaces)?),
            None => Ok(Definitions::default()),
        }
    }
}

/// The pod's namespace from `CNI_ARGS`, `default` when absent.
pub fn pod_namespace(args: &cni::args::CniArgs) -> String {
    args.get("K8S_POD_NAMESPACE")
        .filter(|ns| !ns.is_empty())
        .unwrap_or("default")
        .to_string()
}

/// The selections the pod's annotation asks for.
pub fn selections(rt: Option<&RuntimeConfig>) -> Result<Vec<Selection>, Error> {
    let annotation = rt
        .and_then(|rt| rt.pod_annotations.as_ref())
        .and_then(|a| a.get(NETWORKS_ANNOTATION));
    match annotation {
        Some(text) => selection::parse(text),
        None => Ok(Vec::new()),
    }
}

/// The cluster network's conflist, and the definition it came from.
pub fn cluster_list(
    node: &NodeConf,
    source: &dyn Source,
    defs: &Definitions,
    pod_ns: &str,
) -> Result<(NetConfList, Option<Origin>), Error> {
    match &node.cluster {
        ClusterNetwork::Inline(list) => Ok((list.clone(), None)),
        ClusterNetwork::Named(name) => {
            let def = defs
                .resolve_cluster(name, pod_ns)
                .map_err(|e| source.explain(e).context("clusterNetwork"))?;
            Ok((def.list.clone(), Some(Origin::of(def))))
        }
    }
}

/// Builds every delegate for one pod. `lenient` (DEL without a record) skips
/// secondaries that no longer resolve instead of failing.
pub fn build(
    node: &NodeConf,
    source: &mut dyn Source,
    rt: Option<&RuntimeConfig>,
    pod_ns: &str,
    ifname: &str,
    lenient: bool,
) -> Result<Vec<Delegate>, Error> {
    let wanted = match selections(rt) {
        Ok(s) => s,
        Err(_) if lenient => Vec::new(),
        Err(e) => return Err(e),
    };
    let need_defs = !wanted.is_empty() || matches!(node.cluster, ClusterNetwork::Named(_));
    let defs = if need_defs {
        // The pod's own namespace, and any it names: a reference to another
        // namespace's network must find it to say it is forbidden.
        let mut namespaces: Vec<String> = Vec::new();
        if !wanted.is_empty() {
            namespaces.push(pod_ns.to_string());
        }
        for ns in wanted.iter().filter_map(|s| s.namespace.as_ref()) {
            if !namespaces.contains(ns) {
                namespaces.push(ns.clone());
            }
        }
        let mut defs = source.load(Some(&namespaces))?;
        defs.set_cluster_namespaces(&node.cluster_namespaces);
        defs
    } else {
        Definitions::default()
    };
    let (mut cluster, origin) = cluster_list(node, source, &defs, pod_ns)?;
    node_ipam_settings(node, &mut cluster);
    // The cluster network gets the runtime's capability args as they came.
    let mut cluster_caps = match rt {
        Some(rt) => match serde_json::to_value(rt) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        },
        None => Map::new(),
    };
    cluster_caps.retain(|_, v| !v.is_null());
    let mut delegates = vec![Delegate {
        network: cluster.name.clone(),
        ifname: ifname.to_string(),
        list: cluster,
        caps: cluster_caps,
        default_route: Vec::new(),
        result: None,
        origin,
        groups: Vec::new(),
        rules: Vec::new(),
        resource: None,
    }];
    let mut used: BTreeSet<String> = BTreeSet::from([ifname.to_string()]);
    for (i, sel) in wanted.iter().enumerate() {
        let reference = match &sel.namespace {
            Some(ns) => format!("{ns}/{}", sel.name),
            None => sel.name.clone(),
        };
        let def = match defs.resolve(sel.namespace.as_deref(), &sel.name, pod_ns) {
            Ok(d) => d,
            Err(_) if lenient => continue,
            Err(e) => return Err(source.explain(e)),
        };
        let iface = sel
            .interface
            .clone()
            .unwrap_or_else(|| format!("net{}", i + 1));
        if !used.insert(iface.clone()) && !lenient {
            return Err(Error::new(
                code::INVALID_NETWORK_CONFIG,
                format!("interface {iface:?} is asked for twice"),
            )
            .with_details(format!("network {reference:?} in {NETWORKS_ANNOTATION}")));
        }
        let mut list = def.list.clone();
        node_ipam_settings(node, &mut list);
        let delegate = secondary(sel, &reference, iface, list);
        match delegate {
            Ok(d) => delegates.push(Delegate {
                origin: Some(Origin::of(def)),
                resource: def.resource_name.clone(),
                ..d
            }),
            Err(_) if lenient => continue,
            Err(e) => return Err(e),
        }
    }
    if !lenient {
        security_groups(&mut delegates, &defs, rt, pod_ns)?;
        for v6 in [false, true] {
            let asking: Vec<&str> = delegates
                .iter()
                .filter(|d| d.default_route.iter().filter(|g| g.is_ipv6() == v6).count() > 0)
                .map(|d| d.network.as_str())
                .collect();
            let per_net = delegates
                .iter()
                .any(|d| d.default_route.iter().filter(|g| g.is_ipv6() == v6).count() > 1);
            if asking.len() > 1 || per_net {
                let family = if v6 { "IPv6" } else { "IPv4" };
                return Err(Error::new(
                    code::INVALID_NETWORK_CONFIG,
                    format!("more than one {family} default-route is asked for"),
                )
                .with_details(format!("networks {asking:?} in {NETWORKS_ANNOTATION}")));
            }
        }
    }
    Ok(delegates)
}

/// Plugin types whose interface in the pod is a kernel netdev that nftables
/// filters: security groups are refused on anything else (a vhost-user
/// socket, a VF bound to a user-space driver), never silently unenforced.
pub const FILTERABLE: &[&str] = &[
    "plexus-veth",
    "plexus-macvlan",
    "plexus-ipvlan",
    "ptp",
    "bridge",
    "macvlan",
    "ipvlan",
    "vlan",
    "host-device",
];

/// The pod's own groups from its `plexus.io/security-groups` annotation:
/// the same list for every network that lets pods add groups, or a JSON
/// object from a network (as the pod names it, or as defined) or an
/// interface to its list.
enum PodGroups {
    None,
    Every(Vec<String>),
    Per(std::collections::BTreeMap<String, Vec<String>>),
}

fn pod_groups(rt: Option<&RuntimeConfig>) -> Result<PodGroups, Error> {
    let Some(text) = rt
        .and_then(|rt| rt.pod_annotations.as_ref())
        .and_then(|a| a.get(SECURITY_GROUPS_ANNOTATION))
    else {
        return Ok(PodGroups::None);
    };
    let text = text.trim();
    if text.starts_with('{') {
        return serde_json::from_str(text).map(PodGroups::Per).map_err(|e| {
            Error::new(
                code::INVALID_NETWORK_CONFIG,
                format!("the pod's {SECURITY_GROUPS_ANNOTATION} annotation does not parse"),
            )
            .with_details(format!(
                "{e}; write \"g1,g2\" or {{\"network or interface\": [\"g1\"]}}"
            ))
        });
    }
    Ok(PodGroups::Every(
        text.split(',')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(String::from)
            .collect(),
    ))
}

/// Each delegate's security groups: its network's, and the pod's where the
/// network lets pods add groups; each must exist in the pod's namespace. A
/// pod never gets a network its groups cannot be applied to.
fn security_groups(
    delegates: &mut [Delegate],
    defs: &Definitions,
    rt: Option<&RuntimeConfig>,
    pod_ns: &str,
) -> Result<(), Error> {
    let refused = |msg: String| Error::new(code::INVALID_NETWORK_CONFIG, msg);
    let pods = pod_groups(rt)?;
    let mut used_keys: BTreeSet<String> = BTreeSet::new();
    let mut any_allows = false;
    for d in delegates.iter_mut() {
        let (mut groups, allows) = match &d.origin {
            Some(o) => (o.security_groups.clone(), o.pod_security_groups),
            None => (Vec::new(), false),
        };
        any_allows |= allows;
        let names: Vec<&str> = [Some(d.network.as_str()), Some(d.ifname.as_str())]
            .into_iter()
            .chain(std::iter::once(
                d.origin.as_ref().map(|o| o.network.as_str()),
            ))
            .flatten()
            .collect();
        let own: Vec<String> = match &pods {
            PodGroups::None => Vec::new(),
            PodGroups::Every(list) if allows => list.clone(),
            PodGroups::Every(_) => Vec::new(),
            PodGroups::Per(map) => {
                let mut own = Vec::new();
                for n in &names {
                    if let Some(list) = map.get(*n) {
                        used_keys.insert(n.to_string());
                        own.extend(list.iter().cloned());
                    }
                }
                if !own.is_empty() && !allows {
                    return Err(refused(format!(
                        "network {:?} does not let pods choose security groups ({SECURITY_GROUPS_ANNOTATION} names {own:?} for it)",
                        d.network
                    ))
                    .with_details(format!(
                        "its definition would need the annotation {}: \"true\"",
                        conf::api::POD_GROUPS_ANNOTATION
                    )));
                }
                own
            }
        };
        for g in own {
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        if !groups.is_empty() {
            let kind = d.list.plugin_type(0);
            if !FILTERABLE.contains(&kind) {
                return Err(refused(format!(
                    "network {:?} has security groups {groups:?}, and its interface ({kind}) is not one the kernel can filter",
                    d.network
                ))
                .with_details(format!(
                    "groups are enforced on kernel interfaces: {}",
                    FILTERABLE.join(", ")
                )));
            }
        }
        let mut rules = Vec::new();
        for g in &groups {
            let spec = defs
                .security_group(pod_ns, g)
                .map_err(|e| refused(format!("network {:?} ({}): {e}", d.network, d.ifname)))?;
            rules.push((g.clone(), spec.clone()));
        }
        d.groups = groups;
        d.rules = rules;
    }
    match &pods {
        PodGroups::Every(list) if !list.is_empty() && !any_allows => Err(refused(format!(
            "the pod asks for security groups {list:?}, and none of its networks lets pods choose them"
        ))),
        PodGroups::Per(map) => match map.keys().find(|k| !used_keys.contains(*k)) {
            Some(k) => Err(refused(format!(
                "{SECURITY_GROUPS_ANNOTATION} names {k:?}, which is none of the pod's networks or interfaces"
            ))),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

/// With the central API, a network's `plexus-ipam` gets what is the node's
/// to say from the node: the store (the API's etcd, IPAM prefix), the node
/// name and the state dir. A definition that names them keeps its own (an
/// admin's); a tenant's may not name them (plexusd refuses it).
fn node_ipam_settings(node: &NodeConf, list: &mut NetConfList) {
    let Some(api) = &node.api else {
        return;
    };
    for plugin in &mut list.plugins {
        let Some(Value::Object(ipam)) = plugin.get_mut("ipam") else {
            continue;
        };
        if ipam.get("type").and_then(Value::as_str) != Some("plexus-ipam") {
            continue;
        }
        if !ipam.contains_key("store") {
            let mut store = serde_json::json!({
                "type": "etcd",
                "endpoints": api.endpoints,
                "prefix": ipam::config::DEFAULT_PREFIX,
            });
            for (field, value) in [
                ("caFile", &api.ca_file),
                ("certFile", &api.cert_file),
                ("keyFile", &api.key_file),
                ("username", &api.username),
                ("password", &api.password),
            ] {
                if let Some(v) = value {
                    store[field] = Value::String(v.clone());
                }
            }
            if let Some(t) = api.timeout_seconds {
                store["timeoutSeconds"] = serde_json::json!(t);
            }
            if let Some(relay) = &api.relay {
                store["relay"] = serde_json::json!(relay);
            }
            ipam.insert("store".into(), store);
        }
        if let Some(name) = &node.node_name {
            ipam.entry("nodeName")
                .or_insert_with(|| Value::String(name.clone()));
        }
        ipam.entry("stateDir")
            .or_insert_with(|| Value::String(node.cache_dir.join("ipam").display().to_string()));
    }
}

fn declares(list: &NetConfList, cap: &str) -> bool {
    list.plugins.iter().any(|p| {
        p.get("capabilities")
            .and_then(|c| c.get(cap))
            .and_then(Value::as_bool)
            == Some(true)
    })
}

/// A secondary network's delegate: capability args from the selection, which
/// the network's plugins must declare, and `cni-args` as `args.cni`.
fn secondary(
    sel: &Selection,
    reference: &str,
    ifname: String,
    mut list: NetConfList,
) -> Result<Delegate, Error> {
    let mut caps = Map::new();
    let mut offer = |cap: &str, value: Option<Value>| -> Result<(), Error> {
        let Some(value) = value else { return Ok(()) };
        if !declares(&list, cap) {
            return Err(Error::new(
                code::UNSUPPORTED_FIELD,
                format!("network {reference:?} does not declare the {cap:?} capability"),
            )
            .with_details(format!(
                "the pod asks for {cap} {value} in {NETWORKS_ANNOTATION}"
            )));
        }
        caps.insert(cap.to_string(), value);
        Ok(())
    };
    offer(
        "ips",
        (!sel.ips.is_empty()).then(|| serde_json::json!(sel.ips)),
    )?;
    offer("mac", sel.mac.clone().map(Value::String))?;
    offer(
        "portMappings",
        sel.port_mappings
            .as_ref()
            .and_then(|p| serde_json::to_value(p).ok()),
    )?;
    offer(
        "bandwidth",
        sel.bandwidth
            .as_ref()
            .and_then(|b| serde_json::to_value(b).ok()),
    )?;
    if let Some(args) = &sel.cni_args {
        for plugin in &mut list.plugins {
            let entry = plugin
                .entry("args")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(a) = entry {
                a.insert("cni".into(), Value::Object(args.clone()));
            }
        }
    }
    Ok(Delegate {
        network: reference.to_string(),
        ifname,
        list,
        caps,
        default_route: sel.default_route.clone(),
        result: None,
        origin: None,
        groups: Vec::new(),
        rules: Vec::new(),
        resource: None,
    })
}
