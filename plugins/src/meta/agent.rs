//! `plexus agent <conflist>`: the node agent that keeps the security groups
//! of this node's pods current. It reads the API's SecurityGroups and
//! Attachment records of the namespaces its pods are in, watches the API's
//! etcd, and after each change:
//!
//! - a pod whose groups' rules changed gets its table written again, whole,
//!   in one transaction (never a moment unfiltered);
//! - a pod whose remote groups' members changed gets only the set elements
//!   that differ added and deleted.
//!
//! It knows the pods from this node's records (`cacheDir`), never touches a
//! netns whose pod has no Plexus record with groups, and never removes a
//! table (DEL does). Started again, or after etcd was away, it writes every
//! pod's table once, then goes on with elements. What it wrote last for a
//! pod is kept in `cacheDir/agent/filters`, which CHECK accepts as well as
//! what ADD wrote.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use cni::cache::Cache;
use cni::{Error, NetConfList};
use conf::api::{node_object, NodeSpec, SecurityGroupSpec, ATTACHMENT, NODE, SECURITY_GROUP};
use ipam::block::{node_key, NodeMark};
use ipam::store::etcd::EtcdStore;
use ipam::store::{Store, Txn};
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use super::groups::{self, Filtered, Step};
use super::journal::file_name;
use super::node::NodeConf;
use super::plan::Record;

/// A pod of this node with groups on some interface.
struct LocalPod {
    /// `container-ifname`, as the node's record names it.
    key: String,
    netns: PathBuf,
    namespace: String,
    /// Filtered interfaces and their groups.
    interfaces: Vec<(String, Vec<String>)>,
}

/// What the agent last put in a pod's table.
struct Applied {
    /// The table without set elements, as the agent generated it.
    rules: String,
    /// Each set's elements.
    elements: BTreeMap<String, BTreeSet<IpAddr>>,
}

struct Agent {
    node: NodeConf,
    network: String,
    applied: HashMap<String, Applied>,
}

/// Where the agent keeps what it last wrote of a pod's table, for CHECK.
pub fn filter_file(cache_dir: &Path, container_id: &str, ifname: &str) -> PathBuf {
    filters(cache_dir).join(file_name(container_id, ifname))
}

/// The directory of those files, one per pod: `<container>-<ifname>.json`.
fn filters(cache_dir: &Path) -> PathBuf {
    cache_dir.join("agent").join("filters")
}

impl Agent {
    fn pods(&self) -> Vec<LocalPod> {
        Cache::new(&self.node.cache_dir)
            .list(&self.network)
            .into_iter()
            .filter_map(|entry| {
                let record = Record::of(&entry)?;
                let interfaces: Vec<(String, Vec<String>)> = record
                    .delegates
                    .iter()
                    .filter(|d| !d.groups.is_empty())
                    .map(|d| (d.ifname.clone(), d.groups.clone()))
                    .collect();
                if interfaces.is_empty() || entry.netns.is_empty() {
                    return None;
                }
                let namespace = entry
                    .cni_args
                    .iter()
                    .find(|[k, _]| k == "K8S_POD_NAMESPACE")
                    .map_or_else(|| "default".to_string(), |[_, v]| v.clone());
                Some(LocalPod {
                    key: file_name(&entry.container_id, &entry.ifname),
                    netns: PathBuf::from(&entry.netns),
                    namespace,
                    interfaces,
                })
            })
            .collect()
    }

    /// One pass: reads what the pods' namespaces hold, brings every pod's
    /// table there. Returns the revision read.
    fn pass(&mut self, store: &mut EtcdStore) -> Result<i64, ipam::Error> {
        let pods = self.pods();
        let namespaces: BTreeSet<&str> = pods.iter().map(|p| p.namespace.as_str()).collect();
        let prefixes: Vec<String> = namespaces
            .iter()
            .flat_map(|ns| [SECURITY_GROUP.prefix(Some(ns)), ATTACHMENT.prefix(Some(ns))])
            .map(|p| p.strip_prefix(conf::api::PREFIX).unwrap_or(&p).to_string())
            .collect();
        let refs: Vec<&str> = prefixes.iter().map(String::as_str).collect();
        let (ranges, revision) = store.ranges_at(&refs)?;
        let mut specs: BTreeMap<(String, String), SecurityGroupSpec> = BTreeMap::new();
        // Per namespace, each group's members.
        let mut members: BTreeMap<String, BTreeMap<String, Vec<IpAddr>>> = BTreeMap::new();
        for (ns, pair) in namespaces.iter().zip(ranges.chunks(2)) {
            for kv in pair.first().into_iter().flatten() {
                let obj: Option<Value> = serde_json::from_slice(&kv.value).ok();
                let name = obj
                    .as_ref()
                    .and_then(|o| o.pointer("/metadata/name")?.as_str().map(String::from));
                let spec = obj.and_then(|o| serde_json::from_value(o.get("spec")?.clone()).ok());
                if let (Some(name), Some(spec)) = (name, spec) {
                    specs.insert((ns.to_string(), name), spec);
                }
            }
            let of_ns = members.entry(ns.to_string()).or_default();
            for spec in pair
                .get(1)
                .into_iter()
                .flatten()
                .filter_map(|kv| groups::attachment(&kv.value))
            {
                groups::add_members(of_ns, &spec.security_groups, &spec.addresses);
            }
        }
        let present: BTreeSet<String> = pods.iter().map(|p| p.key.clone()).collect();
        for pod in &pods {
            if let Err(e) = self.bring(pod, &specs, &members) {
                warn!(pod = %pod.key, error = %e, "security groups not brought up to date");
                self.applied.remove(&pod.key);
            }
        }
        let gone: Vec<String> = self
            .applied
            .keys()
            .filter(|k| !present.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            self.applied.remove(&key);
            let _ = std::fs::remove_file(filters(&self.node.cache_dir).join(&key));
        }
        Ok(revision)
    }

    fn bring(
        &mut self,
        pod: &LocalPod,
        specs: &BTreeMap<(String, String), SecurityGroupSpec>,
        members: &BTreeMap<String, BTreeMap<String, Vec<IpAddr>>>,
    ) -> Result<(), Error> {
        if !pod.netns.exists() {
            return Ok(());
        }
        let rules: Vec<Vec<(String, SecurityGroupSpec)>> = pod
            .interfaces
            .iter()
            .map(|(_, groups)| {
                groups
                    .iter()
                    .map(|g| {
                        let spec = specs
                            .get(&(pod.namespace.clone(), g.clone()))
                            .cloned()
                            .unwrap_or_default();
                        (g.clone(), spec)
                    })
                    .collect()
            })
            .collect();
        let filtered: Vec<Filtered<'_>> = pod
            .interfaces
            .iter()
            .zip(&rules)
            .map(|((ifname, _), rules)| Filtered { ifname, rules })
            .collect();
        let remote = groups::remote_groups(rules.iter().flatten());
        let by_group: BTreeMap<String, Vec<IpAddr>> = remote
            .iter()
            .map(|g| {
                let addrs = members
                    .get(&pod.namespace)
                    .and_then(|m| m.get(*g))
                    .cloned()
                    .unwrap_or_default();
                (g.to_string(), addrs)
            })
            .collect();
        let ruleset = groups::ruleset(&filtered, &by_group)?;
        let elements = groups::elements(&ruleset);
        let shape = serde_json::to_string(&groups::shape(&ruleset))
            .map_err(|e| Error::new(cni::code::INTERNAL, e.to_string()))?;
        let same_rules = self.applied.get(&pod.key).is_some_and(|a| a.rules == shape);
        if !same_rules {
            groups::apply(&pod.netns, &ruleset)?;
            // What CHECK accepts from now on (members aside).
            let dir = filters(&self.node.cache_dir);
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(dir.join(&pod.key), &shape);
            info!(pod = %pod.key, "security groups written");
            self.applied.insert(
                pod.key.clone(),
                Applied {
                    rules: shape,
                    elements,
                },
            );
            return Ok(());
        }
        let Some(applied) = self.applied.get_mut(&pod.key) else {
            return Ok(());
        };
        let mut steps = Vec::new();
        for (set, want) in &elements {
            let have = applied.elements.get(set).cloned().unwrap_or_default();
            let add: Vec<IpAddr> = want.difference(&have).copied().collect();
            let del: Vec<IpAddr> = have.difference(want).copied().collect();
            if !add.is_empty() {
                steps.push(Step::AddElements {
                    set: set.clone(),
                    elements: add,
                });
            }
            if !del.is_empty() {
                steps.push(Step::DeleteElements {
                    set: set.clone(),
                    elements: del,
                });
            }
        }
        if steps.is_empty() {
            return Ok(());
        }
        groups::apply(&pod.netns, &steps)?;
        debug!(pod = %pod.key, changes = steps.len(), "security group members updated");
        applied.elements = elements;
        Ok(())
    }
}

/// `plexus agent <conflist>`: runs until killed.
pub fn main(conflist: Option<&str>) -> ExitCode {
    let Some(path) = conflist else {
        eprintln!("usage: plexus agent /etc/cni/net.d/<plexus conflist>");
        return ExitCode::from(2);
    };
    let (network, node) = match read_conf(Path::new(path)) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("plexus agent: {e}");
            return ExitCode::from(2);
        }
    };
    crate::log::init(&node.log);
    let span = tracing::info_span!("agent");
    let _entered = span.enter();
    let Some(conf) = node.api.clone() else {
        eprintln!("plexus agent: {path} has no \"api\": the agent follows the central API");
        return ExitCode::from(2);
    };
    info!(conflist = %path, "agent started");
    match super::attachments::node_name(node.node_name.as_deref()) {
        Ok(name) => {
            let (conf, lease) = (conf.clone(), node.node_lease);
            std::thread::spawn(move || keep_node_alive(&conf, &name, lease));
        }
        Err(e) => {
            warn!(error = %e, "no node name: no Node object, this node's addresses are never reclaimed")
        }
    }
    let mut agent = Agent {
        node,
        network,
        applied: HashMap::new(),
    };
    loop {
        let mut store = match EtcdStore::connect(&conf) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "etcd of the API unreachable; trying again");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        loop {
            let revision = match agent.pass(&mut store) {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "reading the API failed; trying again");
                    // Everything is written again once etcd is back.
                    agent.applied.clear();
                    std::thread::sleep(Duration::from_secs(1));
                    break;
                }
            };
            // Until something changes (or a while passes): then again.
            if let Err(e) = store.watch("", revision + 1, |_| false) {
                warn!(error = %e, "watch ended");
                agent.applied.clear();
                std::thread::sleep(Duration::from_millis(500));
                break;
            }
            // Changes come in bursts: one pass for the burst.
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Keeps this node's Node object in the API, bound to a lease renewed at a
/// third of its time (written again if an admin deletes it while the agent
/// runs), and its mark in the IPAM store: `plexusd` reclaims the node's
/// addresses only once the object has been gone for its grace period.
fn keep_node_alive(conf: &ipam::config::EtcdConf, node: &str, ttl: Duration) {
    let spec = NodeSpec {
        agent_started: conf::api::now_rfc3339(),
        lease_seconds: ttl.as_secs(),
    };
    let object = node_object(node, &spec).to_string().into_bytes();
    let key = format!("{}/{node}", NODE.plural);
    let mark = serde_json::to_vec(&NodeMark::default()).unwrap_or_default();
    loop {
        let run = || -> Result<(), ipam::Error> {
            let mut api = EtcdStore::connect(conf)?;
            let mut marks = api.under(ipam::config::DEFAULT_PREFIX);
            let lease = api.grant(ttl)?;
            marks.txn(Txn::default().put(node_key(node), mark.clone()))?;
            api.put_leased(&key, &object, lease)?;
            info!(
                node,
                lease,
                ttl_seconds = ttl.as_secs(),
                "Node object alive in the API"
            );
            loop {
                std::thread::sleep(ttl / 3);
                if !api.renew(lease)? {
                    warn!(
                        node,
                        lease, "the Node object's lease expired; writing it again"
                    );
                    return Ok(());
                }
                if api.put_leased(&key, &object, lease)? {
                    warn!(
                        node,
                        "the Node object was deleted while this agent runs; written again"
                    );
                }
            }
        };
        if let Err(e) = run() {
            warn!(node, error = %e, "keeping the Node object alive failed; trying again");
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

fn read_conf(path: &Path) -> Result<(String, NodeConf), String> {
    let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value: Value =
        serde_json::from_slice(&raw).map_err(|e| format!("{}: {e}", path.display()))?;
    let list = NetConfList::parse_value(&value).map_err(|e| format!("{}: {e}", path.display()))?;
    let plexus = list
        .plugins
        .iter()
        .find(|p| p.get("type").and_then(Value::as_str) == Some("plexus"))
        .ok_or_else(|| format!("{}: no plugin of type plexus", path.display()))?;
    // The plugin's config as the runtime would hand it over: the spec's
    // fields apart, Plexus' own in `extra`.
    let mut conf = plexus.clone();
    conf.insert("cniVersion".into(), json!(list.cni_version));
    conf.insert("name".into(), json!(list.name));
    let raw = serde_json::to_vec(&conf).map_err(|e| e.to_string())?;
    let (conf, _) = cni::config::NetConf::parse(&raw).map_err(|e| e.to_string())?;
    let node = NodeConf::parse(&conf.extra).map_err(|e| e.to_string())?;
    Ok((list.name.clone(), node))
}
