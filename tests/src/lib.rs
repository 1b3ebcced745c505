//! Fixtures shared by the end-to-end tests live in the harness, where the demo
//! and the bench use them too.

pub use netns_harness::fixtures::*;
pub use netns_harness::node::*;

pub mod crash;
pub use netns_harness::sriov;

use std::collections::BTreeMap;

use cni::NetConfList;
use conf::api::{attachment_name, ATTACHMENT, CLUSTER_NETWORK, NAD};
use netns_harness::etcd::EtcdCluster;
use netns_harness::Pod;
use serde_json::{json, Value};

/// The node name an [`ApiNode`] records attachments under.
pub const NODE: &str = "node-1";

/// A node with a one-member etcd in its netns, and the plexus conflist that
/// reads the API from it (`clusterNetwork` names the ClusterNetwork `pods`).
pub struct ApiNode {
    pub node: Node,
    pub etcd: EtcdCluster,
    pub list: NetConfList,
}

impl ApiNode {
    pub fn new(tag: &str) -> ApiNode {
        let node = Node::new(tag);
        let etcd = EtcdCluster::start_in(1, &node.netns).expect("etcd");
        let list = node.plexus_api_list(
            json!({"endpoints": etcd.endpoints(), "timeoutSeconds": 1}),
            NODE,
        );
        let n = ApiNode { node, etcd, list };
        let ipam = n.node.ipam_dir();
        n.cluster_network(
            "pods",
            &ptp("pods", "1.0.0", &["10.88.0.0/24"], &ipam),
            &["*"],
        );
        n
    }

    /// Stores an object as `plexusd` would: the JSON object at its key.
    pub fn put(&self, key: &str, obj: &Value) {
        self.etcd
            .put_get(0, key, &obj.to_string())
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
    }

    pub fn cluster_network(&self, name: &str, config: &Value, allowed: &[&str]) {
        self.put(
            &CLUSTER_NETWORK.key(None, name),
            &json!({"apiVersion": "plexus.io/v1", "kind": "ClusterNetwork",
                "metadata": {"name": name, "uid": format!("uid-{name}"),
                             "creationTimestamp": "2025-01-01T00:00:00Z"},
                "spec": {"config": config.to_string(), "allowedNamespaces": allowed}}),
        );
    }

    pub fn nad(&self, namespace: &str, name: &str, config: &Value) {
        self.put(
            &NAD.key(Some(namespace), name),
            &json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"),
                             "creationTimestamp": "2025-01-01T00:00:00Z"},
                "spec": {"config": config.to_string()}}),
        );
    }

    /// Every Attachment object in etcd, by key.
    pub fn attachments(&self) -> BTreeMap<String, Value> {
        assert!(
            self.node.published(),
            "an Attachment publisher is still running"
        );
        let out = self
            .etcd
            .etcdctl(0, &["get", "--prefix", &ATTACHMENT.prefix(None)])
            .expect("etcdctl get");
        let lines: Vec<&str> = out.lines().collect();
        lines
            .chunks(2)
            .map(|kv| {
                let v = serde_json::from_str(kv.get(1).copied().unwrap_or("")).expect("JSON");
                (kv[0].to_string(), v)
            })
            .collect()
    }

    pub fn key(pod: &Pod, ifname: &str) -> String {
        ATTACHMENT.key(
            Some(&pod.namespace),
            &attachment_name(&pod.name, ifname, &pod.container_id),
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.node.log_file()).unwrap_or_default()
    }
}
