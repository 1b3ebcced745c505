//! Blocks and handles as stored.
//!
//! Key layout, under the store's prefix:
//! - `pools/<pool>`: the pool definition;
//! - `claims/<pool>/<block>`: the node that claimed the block (one writer wins);
//! - `blocks/<pool>/<node>/<block>`: the block's allocations, ordinal → handle;
//! - `handles/<network>/<containerID>/<ifname>`: what a handle holds;
//! - `nodes/<node>`: a node whose agent keeps it alive in the central API,
//!   so that its addresses are reclaimed once it is gone (see [`NodeMark`]).
//!
//! A node reads and writes only its own `blocks/<pool>/<node>/` in the common
//! case, so nodes do not contend; `claims/` is touched once per new block.

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

pub const NODES_PREFIX: &str = "nodes/";

pub fn node_key(node: &str) -> String {
    format!("{NODES_PREFIX}{node}")
}

/// A node's mark: written by its agent when it starts; the reclaimer notes
/// when it first found the node gone, and deletes the mark once it has
/// reclaimed everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeMark {
    /// Unix time the node was first seen gone, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gone_since: Option<u64>,
}

/// What a claim says of its block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// Claimed by this node.
    Node(String),
    /// Given back, empty, at this Unix time: nobody claims it again until
    /// [`RETURN_QUARANTINE`] has passed, so that addresses released in it
    /// are not handed out again at once elsewhere.
    Returned(u64),
}

/// How long a block given back stays unclaimed.
pub const RETURN_QUARANTINE: std::time::Duration = std::time::Duration::from_secs(300);

const RETURNED: &str = "returned@";

impl Holder {
    pub fn parse(raw: &[u8]) -> Holder {
        let s = String::from_utf8_lossy(raw);
        match s.strip_prefix(RETURNED).and_then(|t| t.parse().ok()) {
            Some(at) => Holder::Returned(at),
            None => Holder::Node(s.into_owned()),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            Holder::Node(n) => n.as_bytes().to_vec(),
            Holder::Returned(at) => format!("{RETURNED}{at}").into_bytes(),
        }
    }

    /// Whether `node` holds the block.
    pub fn is(&self, node: &str) -> bool {
        matches!(self, Holder::Node(n) if n == node)
    }

    /// The node that holds the block, if one does.
    pub fn node(&self) -> Option<&str> {
        match self {
            Holder::Node(n) => Some(n),
            Holder::Returned(_) => None,
        }
    }

    /// Whether a node may claim the block now (Unix time `now`).
    pub fn claimable(&self, now: u64) -> bool {
        matches!(self, Holder::Returned(at) if now >= at.saturating_add(RETURN_QUARANTINE.as_secs()))
    }
}

/// The Unix time now, in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn block_key(pool: &str, node: &str, block: BlockCidr) -> String {
    format!("blocks/{pool}/{node}/{}", block.key())
}

/// The block a block key names (`blocks/<pool>/<node>/<block>`).
pub fn block_cidr(key: &str) -> Option<BlockCidr> {
    key.rsplit('/').next().and_then(BlockCidr::parse_key)
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

/// A block's allocations: one bit per address, stored as hex words
/// (`{"used": "…", "next": n}`), so that the value every assignment
/// rewrites stays a few dozen bytes. Who holds an address is the handle's
/// record, written in the same transaction.
///
/// `next` is where the next dynamic address is looked for: addresses are
/// handed out in order and the search wraps only at the block's end, so an
/// address released is not handed out again before the block's others have
/// been, once each (stale ARP/ND and conntrack entries elsewhere age out
/// meanwhile).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Block {
    words: Vec<u64>,
    next: u32,
    /// The owner's reserve: used addresses no handle holds yet, kept for
    /// the owner's next ADDs (a subset of `words`).
    reserved: Vec<u64>,
}

impl Block {
    pub fn is_used(&self, ordinal: u32) -> bool {
        is_set(&self.words, ordinal)
    }

    pub fn set(&mut self, ordinal: u32) {
        set(&mut self.words, ordinal);
    }

    /// Clears `ordinal`; whether it was set.
    pub fn clear(&mut self, ordinal: u32) -> bool {
        let was = self.is_used(ordinal);
        unset(&mut self.words, ordinal);
        unset(&mut self.reserved, ordinal);
        was
    }

    /// Takes `ordinal` as a dynamic pick for the owner's reserve: used, and
    /// held by no handle until [`Block::assign_reserved`].
    pub fn reserve(&mut self, ordinal: u32) {
        self.take(ordinal);
        set(&mut self.reserved, ordinal);
    }

    /// Whether `ordinal` is in the owner's reserve.
    pub fn is_reserved(&self, ordinal: u32) -> bool {
        is_set(&self.reserved, ordinal)
    }

    /// A reserved address is now a handle's: still used, no longer reserved.
    pub fn assign_reserved(&mut self, ordinal: u32) {
        unset(&mut self.reserved, ordinal);
    }

    /// The owner's reserve, as ordinals.
    pub fn reserved(&self) -> impl Iterator<Item = u32> + '_ {
        ordinals(&self.reserved)
    }

    /// Frees every reserved address (the owner is gone); how many.
    pub fn drop_reserve(&mut self) -> usize {
        let all: Vec<u32> = self.reserved().collect();
        for o in &all {
            self.clear(*o);
        }
        all.len()
    }

    /// The ordinals in use.
    pub fn used(&self) -> impl Iterator<Item = u32> + '_ {
        ordinals(&self.words)
    }

    /// Whether no address is in use.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The first address of `cidr` that `pool` allows and nobody holds,
    /// among `ordinals`.
    fn first(
        &self,
        pool: &Pool,
        cidr: BlockCidr,
        ordinals: std::ops::Range<u32>,
    ) -> Option<(u32, IpAddr)> {
        ordinals
            .filter(|o| !self.is_used(*o))
            .map(|o| (o, cidr.nth(u128::from(o))))
            .find(|(_, ip)| pool.usable(*ip))
    }

    fn size(cidr: BlockCidr) -> u32 {
        u32::try_from(cidr.size()).unwrap_or(u32::MAX)
    }

    /// A free address at or after the cursor: one not handed out since the
    /// block's addresses were last gone through.
    pub fn fresh(&self, pool: &Pool, cidr: BlockCidr) -> Option<(u32, IpAddr)> {
        self.first(pool, cidr, self.next..Block::size(cidr))
    }

    /// A free address: after the cursor, else (wrapping) before it.
    pub fn free(&self, pool: &Pool, cidr: BlockCidr) -> Option<(u32, IpAddr)> {
        self.fresh(pool, cidr)
            .or_else(|| self.first(pool, cidr, 0..self.next.min(Block::size(cidr))))
    }

    /// Marks `ordinal` used as a dynamic pick: the cursor moves past it.
    pub fn take(&mut self, ordinal: u32) {
        self.set(ordinal);
        self.next = ordinal.saturating_add(1);
    }
}

/// Whether bit `ordinal` of `words` is set.
fn is_set(words: &[u64], ordinal: u32) -> bool {
    let (w, b) = (ordinal as usize / 64, ordinal % 64);
    words.get(w).is_some_and(|word| word & (1 << b) != 0)
}

/// Sets bit `ordinal` of `words`, growing them as needed.
fn set(words: &mut Vec<u64>, ordinal: u32) {
    let (w, b) = (ordinal as usize / 64, ordinal % 64);
    if words.len() <= w {
        words.resize(w + 1, 0);
    }
    words[w] |= 1 << b;
}

/// Clears bit `ordinal` of `words`, dropping trailing zero words.
fn unset(words: &mut Vec<u64>, ordinal: u32) {
    if let Some(word) = words.get_mut(ordinal as usize / 64) {
        *word &= !(1u64 << (ordinal % 64));
    }
    while words.last() == Some(&0) {
        words.pop();
    }
}

/// The set bits of `words`, as ordinals.
fn ordinals(words: &[u64]) -> impl Iterator<Item = u32> + '_ {
    words.iter().enumerate().flat_map(|(w, word)| {
        (0..64u32)
            .filter(move |b| word & (1u64 << b) != 0)
            .map(move |b| w as u32 * 64 + b)
    })
}

fn hex_words(words: &[u64]) -> String {
    words.iter().map(|w| format!("{w:016x}")).collect()
}

fn parse_words<E: serde::de::Error>(raw: &str, field: &str) -> Result<Vec<u64>, E> {
    if !raw.len().is_multiple_of(16) || !raw.is_ascii() {
        return Err(E::custom(format!(
            "{field:?} is not whole 64-bit hex words"
        )));
    }
    (0..raw.len() / 16)
        .map(|i| u64::from_str_radix(&raw[i * 16..i * 16 + 16], 16))
        .collect::<Result<Vec<u64>, _>>()
        .map_err(E::custom)
}

#[derive(Serialize, Deserialize)]
struct BlockWire {
    #[serde(default)]
    used: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    next: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    reserved: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Serialize for Block {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        BlockWire {
            used: hex_words(&self.words),
            next: self.next,
            reserved: hex_words(&self.reserved),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Block {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Block, D::Error> {
        let wire = BlockWire::deserialize(d)?;
        let words = parse_words(&wire.used, "used")?;
        let mut reserved: Vec<u64> = parse_words(&wire.reserved, "reserved")?;
        // Only used addresses are reserved.
        for (i, r) in reserved.iter_mut().enumerate() {
            *r &= words.get(i).copied().unwrap_or(0);
        }
        while reserved.last() == Some(&0) {
            reserved.pop();
        }
        Ok(Block {
            words,
            next: wire.next,
            reserved,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_round_trip_through_json() {
        let mut b = Block::default();
        for o in [0, 5, 63, 64, 200] {
            b.set(o);
        }
        let raw = serde_json::to_string(&b).expect("encode");
        let back: Block = serde_json::from_str(&raw).expect("decode");
        assert_eq!(back, b);
        assert_eq!(back.used().collect::<Vec<_>>(), vec![0, 5, 63, 64, 200]);
        assert!(b.clone().clear(200) && !b.clone().clear(201));
        let mut c = b.clone();
        c.clear(200);
        assert_eq!(
            serde_json::to_string(&c).expect("encode").len(),
            43,
            "trailing zero words dropped"
        );
        assert!(serde_json::from_str::<Block>(r#"{"used":"xyz"}"#).is_err());
    }
}
