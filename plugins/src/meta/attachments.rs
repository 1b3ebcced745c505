//! Attachment records in the central API: after ADD the node writes one
//! Attachment object per interface, all in one transaction, and DEL removes
//! exactly those. What etcd cannot take waits in the journal for the next
//! call that reaches it; GC removes this node's records of sandboxes the
//! runtime no longer has.
//!
//! Records are a view for people, never what DEL works from: no failure to
//! write or remove one fails a CNI call.

use std::collections::BTreeSet;

use cni::{code, CniResult, Error, NetConfList};
use conf::api::{attachment_name, attachment_object, AttachmentSpec, ATTACHMENT, PREFIX};
use serde_json::Value;
use tracing::{info, warn};

use super::api::Api;
use super::copy;
use super::journal::{Journal, Pending};
use super::plan::Delegate;

/// The label that names the node an Attachment is on.
const NODE_LABEL: &str = "plexus.io/node";

/// The pod, as `CNI_ARGS` names it.
pub struct Pod<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub container_id: &'a str,
}

/// The node's name: `nodeName`, else `$PLEXUS_NODE_NAME`, else the host name.
pub fn node_name(conf: Option<&str>) -> Result<String, Error> {
    let name = match conf {
        Some(n) => n.to_string(),
        None => match std::env::var("PLEXUS_NODE_NAME") {
            Ok(n) if !n.is_empty() => n,
            _ => nix::unistd::gethostname()
                .map_err(|e| Error::new(code::IO_FAILURE, format!("host name: {e}")))?
                .to_string_lossy()
                .into_owned(),
        },
    };
    if name.is_empty() {
        return Err(Error::new(
            code::INVALID_NETWORK_CONFIG,
            "the node has no name: set nodeName or PLEXUS_NODE_NAME",
        ));
    }
    Ok(name)
}

/// The full key of the pod's record of interface `ifname`.
pub fn key(pod: &Pod<'_>, ifname: &str) -> String {
    let name = attachment_name(pod.name, ifname, pod.container_id);
    ATTACHMENT.key(Some(pod.namespace), &name)
}

/// The records of an ADD's delegates: full key and JSON text each.
pub fn records(pod: &Pod<'_>, node: &str, delegates: &[Delegate]) -> Vec<(String, String)> {
    let created = conf::api::rfc3339(copy::now());
    delegates
        .iter()
        .map(|d| {
            let (addresses, mac) = d
                .result
                .as_ref()
                .map(|r| addresses(r, &d.ifname))
                .unwrap_or_default();
            let spec = AttachmentSpec {
                pod: pod.name.to_string(),
                node: node.to_string(),
                container_id: pod.container_id.to_string(),
                interface: d.ifname.clone(),
                network: d
                    .origin
                    .as_ref()
                    .map_or_else(|| d.network.clone(), |o| o.network.clone()),
                network_kind: d
                    .origin
                    .as_ref()
                    .map(|o| o.kind.to_string())
                    .unwrap_or_default(),
                addresses,
                mac,
                pool: pool(&d.list),
                security_groups: d.groups.clone(),
            };
            let value = attachment_object(pod.namespace, &spec, &created).to_string();
            (key(pod, &d.ifname), value)
        })
        .collect()
}

/// The addresses (with prefix) and MAC of the pod's interface `ifname` in a
/// delegate's result.
pub(super) fn addresses(raw: &Value, ifname: &str) -> (Vec<String>, String) {
    let Ok((_, result)) = CniResult::from_json(raw) else {
        return (Vec::new(), String::new());
    };
    let pod_side = result
        .interfaces
        .iter()
        .position(|i| i.name == ifname && i.sandbox.as_deref().is_some_and(|s| !s.is_empty()));
    let addresses = result
        .ips
        .iter()
        .filter(|ip| ip.interface.is_none() || ip.interface == pod_side)
        .map(|ip| ip.address.to_string())
        .collect();
    let mac = pod_side
        .and_then(|i| result.interfaces[i].mac.clone())
        .unwrap_or_default();
    (addresses, mac)
}

/// The `plexus-ipam` pool a list's `ipam` section names, if any.
fn pool(list: &NetConfList) -> String {
    list.plugins
        .iter()
        .find_map(|p| p.get("ipam")?.get("pool")?.as_str())
        .unwrap_or_default()
        .to_string()
}

/// ADD: writes the records, and what the journal holds, in one transaction;
/// journals them when etcd does not take them.
pub fn publish(
    api: &mut Api,
    journal: &Journal,
    container_id: &str,
    ifname: &str,
    records: Vec<(String, String)>,
) {
    if records.is_empty() {
        return;
    }
    let replay = journal.replay(Some((container_id, ifname)), None);
    let ours: BTreeSet<&str> = records.iter().map(|(k, _)| k.as_str()).collect();
    let (mut puts, deletes) = replay.split(&ours);
    puts.extend(records.iter().cloned());
    let written = match api.unreachable() {
        // Known down since earlier in this call: no second wait.
        Some(why) => Err(format!("{} is unreachable: {why}", api.describe())),
        None => api.write(puts, deletes).map_err(|e| e.to_string()),
    };
    let error = match written {
        Ok(()) => return journal.settle(replay),
        Err(e) => e,
    };
    let pending = Pending {
        container_id: container_id.to_string(),
        puts: records,
        deletes: Vec::new(),
    };
    match journal.keep(ifname, &pending) {
        Ok(()) => warn!(%error, container = %container_id,
            "Attachment records not written: journaled for the next call that reaches etcd"),
        Err(io) => warn!(%error, journal = %io, container = %container_id,
            "Attachment records not written, nor journaled"),
    }
}

/// DEL: removes `keys`, and writes and removes what the journal holds;
/// journals the removal when etcd does not take it.
pub fn withdraw(
    api: &mut Api,
    journal: &Journal,
    container_id: &str,
    ifname: &str,
    keys: &[String],
) {
    if keys.is_empty() {
        return;
    }
    let replay = journal.replay(Some((container_id, ifname)), None);
    let ours: BTreeSet<&str> = keys.iter().map(String::as_str).collect();
    let (puts, mut deletes) = replay.split(&ours);
    deletes.extend(keys.iter().cloned());
    let error = match api.write(puts, deletes) {
        Ok(()) => return journal.settle(replay),
        Err(e) => e,
    };
    let pending = Pending {
        container_id: container_id.to_string(),
        puts: Vec::new(),
        deletes: keys.to_vec(),
    };
    match journal.keep(ifname, &pending) {
        Ok(()) => warn!(%error, container = %container_id,
            "Attachment records not removed: journaled for the next call that reaches etcd"),
        Err(io) => warn!(%error, journal = %io, container = %container_id,
            "Attachment records not removed, nor journaled: GC removes them"),
    }
}

/// GC: removes this node's records whose sandbox is not in `valid`, and
/// what the journal holds. Returns how many records it removed.
pub fn collect(
    api: &mut Api,
    journal: &Journal,
    node: &str,
    valid: &BTreeSet<String>,
) -> Result<usize, ipam::Error> {
    let replay = journal.replay(None, Some(valid));
    let mut stale = BTreeSet::new();
    for kv in api.range(&ATTACHMENT.prefix(None))? {
        let Ok(obj) = serde_json::from_slice::<Value>(&kv.value) else {
            continue;
        };
        let ours = obj
            .pointer("/metadata/labels")
            .and_then(|l| l.get(NODE_LABEL))
            .and_then(Value::as_str)
            == Some(node);
        let container = obj
            .pointer("/spec/containerId")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if ours && !valid.contains(container) {
            info!(key = %kv.key, container, "GC: removing stale Attachment record");
            stale.insert(format!("{PREFIX}{}", kv.key));
        }
    }
    let (puts, mut deletes) = replay.split(&stale.iter().map(String::as_str).collect());
    let removed = stale.len();
    deletes.extend(stale);
    api.write(puts, deletes)?;
    journal.settle(replay);
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn addresses_of_the_pod_side() {
        let result = json!({"cniVersion": "1.0.0",
            "interfaces": [{"name": "veth1", "mac": "aa:aa:aa:aa:aa:aa"},
                           {"name": "net1", "mac": "02:00:00:00:00:01", "sandbox": "/run/netns/p"}],
            "ips": [{"interface": 1, "address": "10.1.0.5/24"},
                    {"interface": 1, "address": "fd00::5/64"},
                    {"interface": 0, "address": "169.254.0.1/32"}]});
        let (ips, mac) = addresses(&result, "net1");
        assert_eq!(ips, vec!["10.1.0.5/24", "fd00::5/64"]);
        assert_eq!(mac, "02:00:00:00:00:01");
    }
}
