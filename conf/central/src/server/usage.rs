//! What a pool holds, read from `plexus-ipam`'s keys: the blocks each node
//! claimed, the addresses in use and free, per family. Served as
//! `ippools/{name}/usage` and exported in `/metrics`.

use std::collections::BTreeMap;

use ipam::block::{pool_blocks_prefix, Block};
use ipam::pool::{BlockCidr, Family};
use ipam::Pool;
use serde_json::{json, Value};

use super::http::ApiError;
use super::objects::IPAM_PREFIX;
use super::App;

/// One node's share of a pool.
#[derive(Debug, Default, Clone)]
pub struct NodeUsage {
    pub blocks: Vec<BlockCidr>,
    pub in_use: [u64; 2],
    /// Addresses the node keeps reserved for its next ADDs: held by no pod
    /// yet, and not free to others.
    pub reserved: [u64; 2],
    /// Usable addresses in the node's blocks neither in use nor reserved.
    pub free: [u128; 2],
}

/// A pool's usage.
#[derive(Debug, Clone)]
pub struct Usage {
    pub pool: Pool,
    pub nodes: BTreeMap<String, NodeUsage>,
    pub size: [u128; 2],
    pub in_use: [u64; 2],
    pub reserved: [u64; 2],
}

fn fam(f: Family) -> usize {
    match f {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

/// Usable addresses of a block under `pool`'s rules (large blocks estimated
/// by their size less the pool's reserved addresses they hold).
fn usable_in(pool: &Pool, cidr: BlockCidr) -> u128 {
    let size = cidr.size();
    if size <= 4096 {
        (0..size).filter(|o| pool.usable(cidr.nth(*o))).count() as u128
    } else {
        size
    }
}

/// Usable addresses of the whole pool.
fn pool_size(pool: &Pool) -> [u128; 2] {
    let mut size = [0u128; 2];
    for r in &pool.ranges {
        let f = Family::of(r.subnet.ip());
        let total = 1u128 << (f.bits() - r.subnet.prefix()).min(127);
        let reserved: u128 = match f {
            Family::V4 if r.subnet.prefix() < 31 => 3,
            Family::V4 => 1,
            Family::V6 => 2,
        };
        size[fam(f)] += total.saturating_sub(reserved);
    }
    size
}

/// Reads the usage of pool `name`.
pub async fn read(app: &App, name: &str) -> Result<Usage, ApiError> {
    let key = format!("{IPAM_PREFIX}{}", ipam::block::pool_key(name));
    let Some((value, _)) = app.store.get_bytes(&key).await? else {
        return Err(ApiError::not_found(format!("pool {name:?} not found")));
    };
    let pool: Pool =
        serde_json::from_slice(&value).map_err(|e| ApiError::internal(format!("{key}: {e}")))?;
    let prefix = format!("{IPAM_PREFIX}{}", pool_blocks_prefix(name));
    let mut nodes: BTreeMap<String, NodeUsage> = BTreeMap::new();
    let mut in_use = [0u64; 2];
    let mut reserved = [0u64; 2];
    for (k, v) in app.store.raw(&prefix).await? {
        let mut parts = k[prefix.len()..].splitn(2, '/');
        let (Some(node), Some(block)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Some(cidr) = BlockCidr::parse_key(block) else {
            continue;
        };
        let (used, kept) = serde_json::from_slice::<Block>(&v)
            .map(|b| (b.used().count() as u64, b.reserved().count() as u64))
            .unwrap_or((0, 0));
        let f = fam(cidr.family());
        let n = nodes.entry(node.to_string()).or_default();
        n.blocks.push(cidr);
        n.in_use[f] += used - kept;
        n.reserved[f] += kept;
        n.free[f] += usable_in(&pool, cidr).saturating_sub(u128::from(used));
        in_use[f] += used - kept;
        reserved[f] += kept;
    }
    Ok(Usage {
        size: pool_size(&pool),
        pool,
        nodes,
        in_use,
        reserved,
    })
}

impl Usage {
    /// The `IPPoolUsage` object.
    pub fn to_json(&self) -> Value {
        let pair = |a: [u64; 2]| json!({"ipv4": a[0], "ipv6": a[1]});
        let big = |a: [u128; 2]| json!({"ipv4": a[0].to_string(), "ipv6": a[1].to_string()});
        let free = [0, 1]
            .map(|f| self.size[f].saturating_sub(u128::from(self.in_use[f] + self.reserved[f])));
        let nodes: Vec<Value> = self
            .nodes
            .iter()
            .map(|(node, u)| {
                json!({"node": node,
                       "blocks": u.blocks.iter().map(|b| b.0.to_string()).collect::<Vec<_>>(),
                       "inUse": pair(u.in_use), "reserved": pair(u.reserved),
                       "free": big(u.free)})
            })
            .collect();
        json!({
            "apiVersion": conf::api::IP_POOL.api_version(),
            "kind": "IPPoolUsage",
            "metadata": {"name": self.pool.name},
            "cidrs": self.pool.ranges.iter().map(|r| r.subnet.to_string()).collect::<Vec<_>>(),
            "nodes": nodes,
            "inUse": pair(self.in_use),
            "reserved": pair(self.reserved),
            "size": big(self.size),
            "free": big(free),
        })
    }
}
