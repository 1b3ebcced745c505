//! Blocks and handles as stored.
//!
//! Key layout, under the store's prefix:
//! - `pools/<pool>`: the pool definition;
//! - `claims/<pool>/<block>`: the node that claimed the block (one writer wins);
//! - `blocks/<pool>/<node>/<block>`: the block's allocations, ordinal → handle;
//! - `handles/<network>/<containerID>/<ifname>`: what a handle holds.
//!
//! A node reads and writes only its own `blocks/<pool>/<node>/` in the common
//! case, so nodes do not contend; `claims/` is touched once per new block.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::pool::{BlockCidr, Pool};

pub fn pool_key(pool: &str) -> String {
    format!("pools/{pool}")
}

pub fn claim_prefix(pool: &str) -> String {
    format!("claims/{pool}/")
}

pub fn claim_key(pool: &str, block: BlockCidr) -> String {
    format!("claims/{pool}/{}", block.key())
}

pub fn node_blocks_prefix(pool: &str, node: &str) -> String {
    format!("blocks/{pool}/{node}/")
}

pub fn block_key(pool: &str, node: &str, block: BlockCidr) -> String {
    format!("blocks/{pool}/{node}/{}", block.key())
}

pub fn pool_blocks_prefix(pool: &str) -> String {
    format!("blocks/{pool}/")
}

/// What a handle names: one interface of one container on one network.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HandleId {
    pub network: String,
    pub container: String,
    pub ifname: String,
}

impl HandleId {
    pub fn new(network: &str, container: &str, ifname: &str) -> HandleId {
        HandleId {
            network: network.into(),
            container: container.into(),
            ifname: ifname.into(),
        }
    }

    /// `network/containerID/ifname`, as blocks record it.
    pub fn id(&self) -> String {
        format!("{}/{}/{}", self.network, self.container, self.ifname)
    }

    pub fn key(&self) -> String {
        format!("handles/{}", self.id())
    }

    pub fn network_prefix(network: &str) -> String {
        format!("handles/{network}/")
    }

    /// From a key under `handles/`.
    pub fn from_key(key: &str) -> Option<HandleId> {
        let mut parts = key.strip_prefix("handles/")?.splitn(3, '/');
        Some(HandleId::new(parts.next()?, parts.next()?, parts.next()?))
    }
}

impl std::fmt::Display for HandleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.id())
    }
}

/// One address of a handle and the block key it is recorded in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assigned {
    pub ip: IpAddr,
    pub block: String,
}

/// A handle's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandleRecord {
    pub pool: String,
    pub node: String,
    pub addresses: Vec<Assigned>,
}

/// A block's allocations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// Ordinal → handle id.
    #[serde(default)]
    pub allocations: BTreeMap<u32, String>,
}

impl Block {
    /// The first address of `cidr` that `pool` allows and nobody holds.
    pub fn free(&self, pool: &Pool, cidr: BlockCidr) -> Option<(u32, IpAddr)> {
        let size = u32::try_from(cidr.size()).unwrap_or(u32::MAX);
        (0..size)
            .filter(|o| !self.allocations.contains_key(o))
            .map(|o| (o, cidr.nth(u128::from(o))))
            .find(|(_, ip)| pool.usable(*ip))
    }
}
