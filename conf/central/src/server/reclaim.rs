//! Reclaiming the addresses of nodes that are gone.
//!
//! A node's agent keeps its Node object alive (bound to an etcd lease) and
//! marks the node in the IPAM store (`nodes/<node>`). Every `period`, this
//! looks at each marked node: one whose Node object is missing (its lease
//! expired, or an admin deleted it) is noted gone, with the time; one gone
//! for the whole `grace` period has its handles released, its blocks given
//! back to their pools and its Attachment records deleted. A node whose
//! object comes back is no longer gone. A node without an agent has no
//! mark and is never reclaimed here: nothing would tell whether it lives.
//!
//! Any number of `plexusd` may run this side by side: every write is a
//! transaction on what was read.

use std::collections::BTreeSet;
use std::time::Duration;

use conf::api::{AttachmentSpec, ATTACHMENT, NODE, PREFIX};
use ipam::block::{node_key, unix_now, NodeMark, NODES_PREFIX};
use ipam::config::{EtcdConf, DEFAULT_PREFIX};
use ipam::store::{Store, Txn};
use ipam::{Allocator, EtcdStore};
use tracing::{info, warn};

/// How gone nodes are found and when they are reclaimed.
#[derive(Debug, Clone)]
pub struct Reclaim {
    /// The IPAM store of the API's pools (`/plexus/ipam/`).
    pub etcd: EtcdConf,
    /// How long a node stays gone before its addresses are reclaimed.
    pub grace: Duration,
    /// How often nodes are looked at.
    pub period: Duration,
}

/// What one look found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    pub gone: Vec<String>,
    pub reclaimed: Vec<String>,
}

impl Reclaim {
    /// Looks at the nodes every period, for ever (a thread of its own: the
    /// IPAM store's calls block).
    pub fn run(self) {
        let mut store: Option<EtcdStore> = None;
        loop {
            std::thread::sleep(self.period);
            let s = match store.take() {
                Some(s) => s,
                None => match EtcdStore::connect(&self.etcd) {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(error = %e, "node reclaim: etcd unreachable");
                        continue;
                    }
                },
            };
            let mut s = s;
            match self.pass(&mut s) {
                Ok(_) => store = Some(s),
                Err(e) => warn!(error = %e, "node reclaim: a look at the nodes failed"),
            }
        }
    }

    /// One look at every marked node.
    pub fn pass(&self, marks: &mut EtcdStore) -> Result<Pass, ipam::Error> {
        let mut api = marks.under(PREFIX);
        let objects = format!("{}/", NODE.plural);
        let alive: BTreeSet<String> = api
            .range(&objects)?
            .into_iter()
            .filter_map(|kv| kv.key.strip_prefix(&objects).map(String::from))
            .collect();
        let now = unix_now();
        let mut pass = Pass::default();
        for kv in marks.range(NODES_PREFIX)? {
            let Some(node) = kv.key.strip_prefix(NODES_PREFIX).map(String::from) else {
                continue;
            };
            let mark: NodeMark = serde_json::from_slice(&kv.value).unwrap_or_default();
            let rewrite = |m: &NodeMark| {
                Txn::default()
                    .when(&kv.key, kv.mod_rev)
                    .put(&kv.key, serde_json::to_vec(m).unwrap_or_default())
            };
            if alive.contains(&node) {
                if mark.gone_since.is_some() && marks.txn(rewrite(&NodeMark::default()))?.succeeded
                {
                    info!(
                        node,
                        "node back before its grace period ended: nothing reclaimed"
                    );
                }
                continue;
            }
            pass.gone.push(node.clone());
            let Some(since) = mark.gone_since else {
                let gone = NodeMark {
                    gone_since: Some(now),
                };
                if marks.txn(rewrite(&gone))?.succeeded {
                    warn!(
                        node,
                        grace_seconds = self.grace.as_secs(),
                        "node gone (no Node object): its addresses are reclaimed after the grace period unless it comes back"
                    );
                }
                continue;
            };
            // Whole seconds: the mark may be up to a second older than the
            // node's going, so the whole grace period has passed only once
            // `now` is past its end.
            if now <= since.saturating_add(self.grace.as_secs()) {
                continue;
            }
            // A last look: the node may have come back a moment ago.
            if api.get(&format!("{objects}{node}"))?.is_some() {
                continue;
            }
            let done = Allocator::new(marks.share(), "plexusd").reclaim(&node)?;
            let attachments = delete_attachments(&mut api, &node)?;
            info!(
                node,
                handles = done.handles.len(),
                blocks = done.blocks.len(),
                kept = done.kept.len(),
                attachments,
                "reclaimed the addresses of a node gone for its grace period"
            );
            if done.kept.is_empty() {
                marks.txn(Txn::default().when(&kv.key, kv.mod_rev).delete(&kv.key))?;
                pass.reclaimed.push(node);
            } else {
                info!(
                    node,
                    "some of its blocks hold addresses other nodes borrowed: given back once those are released"
                );
            }
        }
        Ok(pass)
    }
}

/// Deletes the Attachment records of `node`; how many.
fn delete_attachments(api: &mut EtcdStore, node: &str) -> Result<usize, ipam::Error> {
    let prefix = format!("{}/", ATTACHMENT.plural);
    let mut deleted = 0;
    for kv in api.range(&prefix)? {
        let spec = serde_json::from_slice::<serde_json::Value>(&kv.value)
            .ok()
            .and_then(|o| serde_json::from_value::<AttachmentSpec>(o.get("spec")?.clone()).ok());
        if spec.is_some_and(|s| s.node == node)
            && api
                .txn(Txn::default().when(&kv.key, kv.mod_rev).delete(&kv.key))?
                .succeeded
        {
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// The IPAM store of the API's pools on the etcd `plexusd` uses.
pub fn ipam_etcd(flags: &super::store::EtcdFlags) -> EtcdConf {
    EtcdConf {
        endpoints: flags.servers.clone(),
        prefix: DEFAULT_PREFIX.into(),
        ca_file: flags.ca_file.clone(),
        cert_file: flags.cert_file.clone(),
        key_file: flags.key_file.clone(),
        username: None,
        password: None,
        timeout_seconds: None,
        relay: None,
        reserve: None,
    }
}

/// The mark's key of `node` (for tests and tools).
pub fn mark_key(node: &str) -> String {
    format!("{DEFAULT_PREFIX}{}", node_key(node))
}
