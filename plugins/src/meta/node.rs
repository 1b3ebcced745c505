//! The node conf: what the `plexus` entry of `/etc/cni/net.d/*.conflist` holds.

use std::path::PathBuf;

use cni::{code, Error, NetConfList};
use ipam::config::EtcdConf;
use serde::Deserialize;

use crate::log::{self, LogConf};
use serde_json::{Map, Value};

/// Where the cluster network's definition comes from.
#[derive(Debug, Clone)]
pub enum ClusterNetwork {
    /// Written inline: a plugin config or a conflist.
    Inline(NetConfList),
    /// The name of a cluster-scoped definition in `confDir`, or of a
    /// ClusterNetwork in the central API.
    Named(String),
}

/// The validated node conf.
#[derive(Debug, Clone)]
pub struct NodeConf {
    pub cluster: ClusterNetwork,
    /// Network definitions (NetworkAttachmentDefinition files).
    pub conf_dir: Option<PathBuf>,
    /// Where attachments are recorded so DEL can undo them.
    pub cache_dir: PathBuf,
    /// Where and how to log (`logFile`, `logLevel`, `logFormat`,
    /// `logMaxSizeMB`, `logMaxBackups`).
    pub log: LogConf,
    /// Namespaces whose definitions are cluster networks.
    pub cluster_namespaces: Vec<String>,
    /// The central API's etcd (its prefix is the API's): definitions come
    /// from there instead of `confDir`, and attachments are recorded there.
    pub api: Option<EtcdConf>,
    /// This node's name in Attachment records; default `$PLEXUS_NODE_NAME`,
    /// else the host name.
    pub node_name: Option<String>,
    /// How long the agent's Node object outlives the agent
    /// (`api.leaseSeconds`).
    pub node_lease: std::time::Duration,
    /// kubelet's PodResources socket, asked for the devices of networks
    /// that need one (`podResourcesSocket`).
    pub pod_resources_socket: PathBuf,
}

/// Default `api.leaseSeconds`.
pub const DEFAULT_NODE_LEASE_SECONDS: u64 = 10;

/// Default place of the attachment records.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/plexus";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(rename = "clusterNetwork")]
    cluster_network: Option<Value>,
    #[serde(rename = "confDir")]
    conf_dir: Option<PathBuf>,
    #[serde(rename = "cacheDir")]
    cache_dir: Option<PathBuf>,
    #[serde(rename = "logFile")]
    log_file: Option<PathBuf>,
    #[serde(rename = "logLevel")]
    log_level: Option<String>,
    #[serde(rename = "logFormat")]
    log_format: Option<String>,
    #[serde(rename = "logMaxSizeMB")]
    log_max_size_mb: Option<f64>,
    #[serde(rename = "logMaxBackups")]
    log_max_backups: Option<u32>,
    #[serde(rename = "clusterNamespaces", default)]
    cluster_namespaces: Vec<String>,
    api: Option<RawApi>,
    #[serde(rename = "nodeName")]
    node_name: Option<String>,
    #[serde(rename = "podResourcesSocket")]
    pod_resources_socket: Option<PathBuf>,
}

/// The `api` field: how to reach the central API's etcd.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawApi {
    endpoints: Vec<String>,
    ca_file: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
    username: Option<String>,
    password: Option<String>,
    timeout_seconds: Option<f64>,
    lease_seconds: Option<u64>,
    /// The node's store relay (`plexus store-relay`), as in `plexus-ipam`'s
    /// etcd store.
    relay: Option<PathBuf>,
}

impl RawApi {
    fn etcd(self) -> Result<EtcdConf, Error> {
        if self.endpoints.is_empty() {
            return Err(invalid("api.endpoints is empty"));
        }
        if self
            .timeout_seconds
            .is_some_and(|t| !(t.is_finite() && t > 0.0))
        {
            return Err(invalid("api.timeoutSeconds must be a positive number"));
        }
        Ok(EtcdConf {
            endpoints: self.endpoints,
            prefix: conf::api::PREFIX.into(),
            ca_file: self.ca_file,
            cert_file: self.cert_file,
            key_file: self.key_file,
            username: self.username,
            password: self.password,
            timeout_seconds: self.timeout_seconds,
            relay: self.relay,
            reserve: None,
        })
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(code::INVALID_NETWORK_CONFIG, msg)
}

impl NodeConf {
    /// Reads Plexus' own fields from the conf's extra fields; anything the
    /// spec does not define and Plexus does not know is refused (code 2).
    pub fn parse(extra: &Map<String, Value>) -> Result<NodeConf, Error> {
        let raw: Raw = serde_json::from_value(Value::Object(extra.clone())).map_err(|e| {
            let code = if e.to_string().contains("unknown field") {
                code::UNSUPPORTED_FIELD
            } else {
                code::INVALID_NETWORK_CONFIG
            };
            Error::new(code, "invalid plexus configuration").with_details(e.to_string())
        })?;
        let cluster = match raw.cluster_network {
            None => return Err(invalid("clusterNetwork is missing")),
            Some(Value::String(name)) if !name.is_empty() => ClusterNetwork::Named(name),
            Some(v @ Value::Object(_)) => ClusterNetwork::Inline(
                NetConfList::parse_value(&v).map_err(|e| e.context("clusterNetwork"))?,
            ),
            Some(_) => {
                return Err(invalid(
                    "clusterNetwork must be a network name or a CNI config object",
                ))
            }
        };
        if raw.api.is_some() && raw.conf_dir.is_some() {
            // Two sources of definitions would make "which one won" a question.
            return Err(invalid(
                "api and confDir exclude each other: definitions come from one place",
            ));
        }
        if matches!(cluster, ClusterNetwork::Named(_))
            && raw.conf_dir.is_none()
            && raw.api.is_none()
        {
            return Err(invalid(
                "clusterNetwork names a definition but neither confDir nor api is set",
            ));
        }
        let lease = raw.api.as_ref().and_then(|a| a.lease_seconds);
        if lease == Some(0) {
            return Err(invalid("api.leaseSeconds must be at least 1"));
        }
        let node_lease =
            std::time::Duration::from_secs(lease.unwrap_or(DEFAULT_NODE_LEASE_SECONDS));
        let api = raw.api.map(RawApi::etcd).transpose()?;
        if raw.node_name.as_deref() == Some("") {
            return Err(invalid("nodeName is empty"));
        }
        let log_level = raw.log_level.unwrap_or_else(|| "info".into());
        if !matches!(log_level.as_str(), "error" | "warn" | "info" | "debug") {
            return Err(invalid(format!(
                "logLevel {log_level:?} is not error, warn, info or debug"
            )));
        }
        let json = match raw.log_format.as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => return Err(invalid(format!("logFormat {other:?} is not text or json"))),
        };
        let max_size_mb = raw.log_max_size_mb.unwrap_or(log::DEFAULT_MAX_SIZE_MB);
        if !(max_size_mb.is_finite() && max_size_mb >= 0.0) {
            return Err(invalid(
                "logMaxSizeMB must be a number of megabytes, 0 for no rotation",
            ));
        }
        Ok(NodeConf {
            cluster,
            conf_dir: raw.conf_dir,
            cache_dir: raw
                .cache_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR)),
            log: LogConf {
                file: raw.log_file,
                level: log_level,
                json,
                max_size: (max_size_mb * 1024.0 * 1024.0) as u64,
                max_backups: raw.log_max_backups.unwrap_or(log::DEFAULT_MAX_BACKUPS),
            },
            cluster_namespaces: raw.cluster_namespaces,
            api,
            node_name: raw.node_name,
            node_lease,
            pod_resources_socket: raw
                .pod_resources_socket
                .unwrap_or_else(|| PathBuf::from(crate::kubelet::POD_RESOURCES_SOCKET)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<NodeConf, Error> {
        NodeConf::parse(v.as_object().unwrap())
    }

    #[test]
    fn inline_and_named() {
        let c = parse(
            json!({"clusterNetwork": {"cniVersion":"1.0.0","name":"k8s","type":"ptp"},
                             "cacheDir": "/tmp/x"}),
        )
        .unwrap();
        assert!(matches!(c.cluster, ClusterNetwork::Inline(ref l) if l.name == "k8s"));
        assert_eq!(c.cache_dir, PathBuf::from("/tmp/x"));
        let c = parse(json!({"clusterNetwork": "k8s", "confDir": "/etc/plexus/net.d"})).unwrap();
        assert!(matches!(c.cluster, ClusterNetwork::Named(ref n) if n == "k8s"));
    }

    #[test]
    fn refuses_bad_confs() {
        assert_eq!(parse(json!({})).unwrap_err().code, 7);
        assert_eq!(parse(json!({"clusterNetwork": "k8s"})).unwrap_err().code, 7);
        assert_eq!(parse(json!({"clusterNetwork": 3})).unwrap_err().code, 7);
        let typo = json!({"clusterNetwork": "k", "confDir": "/x", "cachedir": "/y"});
        assert_eq!(parse(typo).unwrap_err().code, 2);
        let bad_inline = json!({"clusterNetwork": {"cniVersion":"1.0.0","name":"k"}});
        assert_eq!(parse(bad_inline).unwrap_err().code, 7);
    }

    #[test]
    fn api() {
        let c = parse(json!({"clusterNetwork": "k8s", "nodeName": "n1",
            "api": {"endpoints": ["http://10.0.0.1:2379"], "timeoutSeconds": 1}}))
        .unwrap();
        let etcd = c.api.unwrap();
        assert_eq!(etcd.prefix, "/plexus/api/");
        assert_eq!(etcd.timeout(), std::time::Duration::from_secs(1));
        assert_eq!(c.node_name.as_deref(), Some("n1"));
        assert_eq!(etcd.relay, None);
        let relayed = parse(json!({"clusterNetwork": "k8s",
            "api": {"endpoints": ["x"], "relay": "/run/plexus/store.sock"}}))
        .unwrap();
        assert_eq!(
            relayed.api.and_then(|a| a.relay),
            Some(std::path::PathBuf::from("/run/plexus/store.sock"))
        );
        let typo = json!({"clusterNetwork": "k", "api": {"endpoints": ["x"], "caFil": "/c"}});
        assert_eq!(parse(typo).unwrap_err().code, 2);
        let both = json!({"clusterNetwork": "k", "confDir": "/x", "api": {"endpoints": ["x"]}});
        assert_eq!(parse(both).unwrap_err().code, 7);
        let none = json!({"clusterNetwork": "k", "api": {"endpoints": []}});
        assert_eq!(parse(none).unwrap_err().code, 7);
    }
}
