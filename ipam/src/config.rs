//! The `ipam` section of a network config for `plexus-ipam`.
//!
//! ```json
//! "ipam": {
//!   "type": "plexus-ipam",
//!   "pool": "pods",
//!   "ranges": [[{"subnet": "10.244.0.0/16"}], [{"subnet": "fd00:244::/64"}]],
//!   "blockSizes": {"ipv4": 26, "ipv6": 122},
//!   "exclude": ["10.244.0.0/28"],
//!   "routes": [{"dst": "0.0.0.0/0"}],
//!   "store": {"type": "etcd", "endpoints": ["https://10.0.0.1:2379"],
//!             "caFile": "…", "certFile": "…", "keyFile": "…"},
//!   "nodeName": "worker-1",
//!   "stateDir": "/var/lib/plexus/ipam-node"
//! }
//! ```
//! `ranges` takes host-local's shape (a list of range sets, one family each);
//! host-local's single-range fields (`subnet`, `rangeStart`, …) work too.
//! With `ranges`, the pool is defined (named `pool`, else after the network);
//! with only `pool`, its definition is read from the store. Without `store`,
//! the local store under `stateDir` is used.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::pool::{valid_name, BlockSizes, Family, Pool, Range, RouteDef};
use crate::Error;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/plexus/ipam";
pub const DEFAULT_PREFIX: &str = "/plexus/ipam/";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamConf {
    #[serde(rename = "type")]
    pub kind: String,
    pub pool: Option<String>,
    #[serde(default)]
    pub ranges: Vec<Vec<Range>>,
    // host-local's single range.
    pub subnet: Option<IpNetwork>,
    pub range_start: Option<IpAddr>,
    pub range_end: Option<IpAddr>,
    pub gateway: Option<IpAddr>,
    #[serde(default)]
    pub routes: Vec<RouteDef>,
    /// Addresses or CIDRs never handed out.
    #[serde(default)]
    pub exclude: Vec<String>,
    pub block_sizes: Option<BlockSizes>,
    pub node_name: Option<String>,
    pub store: Option<StoreConf>,
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConf {
    Local { path: Option<PathBuf> },
    Etcd(EtcdConf),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EtcdConf {
    pub endpoints: Vec<String>,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Seconds a call may take, retries included (default 5).
    pub timeout_seconds: Option<f64>,
    /// The Unix socket of this node's store relay (`plexus store-relay`):
    /// calls go through its open connection while it answers, straight to
    /// etcd otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<PathBuf>,
    /// Addresses per family this node keeps marked used in its blocks
    /// ahead of need, so that ADD answers without waiting for an etcd
    /// commit (default [`crate::alloc::RESERVE`], at most [`MAX_RESERVE`]);
    /// 0: every ADD commits its assignment before answering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserve: Option<usize>,
}

/// The largest `reserve` taken.
pub const MAX_RESERVE: usize = 64;

fn default_prefix() -> String {
    DEFAULT_PREFIX.into()
}

impl EtcdConf {
    pub fn new(endpoints: Vec<String>, prefix: &str) -> EtcdConf {
        EtcdConf {
            endpoints,
            prefix: prefix.into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password: None,
            timeout_seconds: None,
            relay: None,
            reserve: None,
        }
    }

    /// Addresses per family kept reserved (see `reserve`; ADD refuses more
    /// than [`MAX_RESERVE`], other calls keep at most that many).
    pub fn reserve(&self) -> usize {
        self.reserve.unwrap_or(crate::alloc::RESERVE)
    }

    /// What a connection is made with (endpoints and credentials), whatever
    /// the prefix and timeout of the store using it.
    pub fn connection_key(&self) -> String {
        format!(
            "{:?}",
            (
                &self.endpoints,
                &self.ca_file,
                &self.cert_file,
                &self.key_file,
                &self.username,
                &self.password,
            )
        )
    }

    pub fn timeout(&self) -> Duration {
        self.timeout_seconds
            .filter(|s| s.is_finite() && *s > 0.0)
            .map_or(DEFAULT_TIMEOUT, Duration::from_secs_f64)
    }
}

fn cidr_or_ip(s: &str) -> Option<IpNetwork> {
    s.parse::<IpNetwork>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNetwork::from))
}

impl IpamConf {
    /// The `ipam` section of a network config.
    pub fn from_section(section: &Value) -> Result<IpamConf, Error> {
        serde_json::from_value(section.clone()).map_err(|e| Error::Config(format!("\"ipam\": {e}")))
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
    }

    /// The node this runs on: `nodeName`, else `$PLEXUS_NODE_NAME`, else the host name.
    pub fn node(&self) -> Result<String, Error> {
        let node = match &self.node_name {
            Some(n) => n.clone(),
            None => match std::env::var("PLEXUS_NODE_NAME") {
                Ok(n) if !n.is_empty() => n,
                _ => nix::unistd::gethostname()
                    .map_err(|e| Error::Config(format!("host name: {e}")))?
                    .to_string_lossy()
                    .into_owned(),
            },
        };
        if valid_name(&node) {
            Ok(node)
        } else {
            Err(Error::Config(format!(
                "node name {node:?} is not 1-253 letters, digits, '-', '_' or '.'"
            )))
        }
    }

    /// The pool the config defines, if it defines one (`network`: the
    /// network's name, the pool's name when `pool` is not given).
    pub fn defined_pool(&self, network: &str) -> Result<Option<Pool>, Error> {
        let mut sets = self.ranges.clone();
        if let Some(subnet) = self.subnet {
            sets.push(vec![Range {
                subnet,
                range_start: self.range_start,
                range_end: self.range_end,
                gateway: self.gateway,
            }]);
        }
        if sets.is_empty() {
            return Ok(None);
        }
        let name = self.pool.clone().unwrap_or_else(|| network.to_string());
        for set in &sets {
            let families: Vec<Family> = set.iter().map(|r| Family::of(r.subnet.ip())).collect();
            if families.windows(2).any(|w| w[0] != w[1]) {
                return Err(Error::PoolInvalid {
                    pool: name,
                    reason: "a range set mixes IPv4 and IPv6".into(),
                });
            }
        }
        let mut exclude = Vec::new();
        for x in &self.exclude {
            exclude.push(cidr_or_ip(x).ok_or_else(|| Error::PoolInvalid {
                pool: name.clone(),
                reason: format!("exclude {x:?} is neither an address nor a CIDR"),
            })?);
        }
        Pool {
            name,
            ranges: sets.into_iter().flatten().collect(),
            block_sizes: self.block_sizes.unwrap_or_default(),
            exclude,
            routes: self.routes.clone(),
        }
        .validated()
        .map(Some)
    }
}
