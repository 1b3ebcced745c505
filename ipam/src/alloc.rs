//! The allocator of one node: claims blocks, assigns and releases addresses.
//!
//! An assignment is one transaction: the handle must not exist and every
//! block it writes must still be at the revision this node last saw; it
//! writes the blocks and the handle together. The node keeps its own blocks
//! cached (and the plugin keeps that cache across runs), so in the common
//! case an assignment is exactly one round trip; a stale cache costs one
//! failed comparison, whose answer refreshes it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::block::{
    block_cidr, block_key, claim_key, claim_prefix, node_blocks_prefix, pool_key, unix_now,
    Assigned, Block, HandleId, HandleRecord, Holder,
};
use crate::pool::{overlaps, BlockCidr, Family, Pool};
use crate::store::{Store, Txn};
use crate::Error;

/// Transactions that fail their comparison this many times in a row give up.
const MAX_ATTEMPTS: usize = 64;

/// A node looking for a block to claim reads the claims of this many
/// candidate blocks at once (one round trip), never every claim of the pool:
/// that would cost each claim O(nodes).
const PROBE_WINDOW: usize = 32;

/// Windows read, each from another start point, before a node concludes the
/// pool is nearly full and reads every claim (to claim what is left, or to
/// borrow).
const PROBES: usize = 4;

/// Addresses per family a node keeps reserved in its own blocks on etcd
/// unless its config says otherwise (`reserve`): marked used in the store
/// ahead of need, so that an ADD is answered from them without a store
/// round trip (see [`Allocator::take_reserved`]).
pub const RESERVE: usize = 2;

/// What this node knows of one pool.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PoolCache {
    /// The definition last seen equal in the store.
    #[serde(default)]
    pub def: Option<Pool>,
    /// The modification revision of the stored definition `def` was read at:
    /// assignments and claims compare it, so that a definition changed or
    /// deleted in the store (the central API's IPPool) is never used stale.
    #[serde(default)]
    pub def_rev: Option<i64>,
    /// Have this node's blocks been read from the store?
    #[serde(default)]
    pub loaded: bool,
    /// This node's blocks: key → (revision, addresses in use).
    #[serde(default)]
    pub blocks: BTreeMap<String, (i64, Block)>,
    /// Assignments handed out from the reserve whose handles the store does
    /// not hold yet, by handle id ([`HandleId::id`]). Unlike the rest of
    /// the cache this is not known to the store: the plugin replaces the
    /// file holding it whole, never in place.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unpublished: BTreeMap<String, HandleRecord>,
    /// The reserve this cache made (its own publications reserved them in
    /// the store), handed out or not. Only these are ever handed out or
    /// given back: a reserve bit in the store that no cache of this node
    /// knows (its cache lost) stays used, never handed out twice.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub reserve: BTreeSet<IpAddr>,
}

impl PoolCache {
    /// An assignment handed out from the reserve is done with (published,
    /// freed, or dropped): it waits no more, and its addresses leave the
    /// reserve.
    fn settle(&mut self, id: &str, record: &HandleRecord) {
        self.unpublished.remove(id);
        for a in &record.addresses {
            self.reserve.remove(&a.ip);
        }
    }
}

/// A free address of `family` in `blocks` under `pool`'s rules: one not
/// handed out since its block was last gone through, from any block that
/// has one, before one released since (see [`Block`]). Its block's key,
/// ordinal and address.
fn free_in(
    blocks: &BTreeMap<String, (i64, Block)>,
    pool: &Pool,
    family: Family,
) -> Option<(String, u32, IpAddr)> {
    let own = || {
        blocks.iter().filter_map(|(key, (_, block))| {
            let cidr = block_cidr(key).filter(|c| c.family() == family)?;
            Some((key, block, cidr))
        })
    };
    let found = |(key, (ord, ip)): (&String, (u32, IpAddr))| (key.clone(), ord, ip);
    own()
        .find_map(|(k, b, c)| Some((k, b.fresh(pool, c)?)))
        .or_else(|| own().find_map(|(k, b, c)| Some((k, b.free(pool, c)?))))
        .map(found)
}

/// The node's cache of every pool, kept by the plugin between runs.
pub type NodeCache = HashMap<String, PoolCache>;

/// Counters of store work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Transactions sent.
    pub txns: u64,
    /// Transactions whose comparison failed because a block or claim had
    /// changed (another node's write, or a stale cache).
    pub conflicts: u64,
    /// Blocks this node claimed.
    pub claims: u64,
    /// Addresses taken from another node's block.
    pub borrows: u64,
    /// Bytes of the values written by transactions that succeeded.
    pub written: u64,
    /// Empty blocks given back to the pool.
    pub returned: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.txns += o.txns;
        self.conflicts += o.conflicts;
        self.claims += o.claims;
        self.borrows += o.borrows;
        self.written += o.written;
        self.returned += o.returned;
    }
}

impl std::ops::Sub for Stats {
    type Output = Stats;
    /// The counts between an earlier snapshot `o` and this one.
    fn sub(self, o: Stats) -> Stats {
        Stats {
            txns: self.txns - o.txns,
            conflicts: self.conflicts - o.conflicts,
            claims: self.claims - o.claims,
            borrows: self.borrows - o.borrows,
            written: self.written - o.written,
            returned: self.returned - o.returned,
        }
    }
}

/// What reclaiming a gone node freed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reclaimed {
    /// Its handles, released.
    pub handles: Vec<HandleId>,
    /// Its blocks, given back to their pools.
    pub blocks: Vec<String>,
    /// Its blocks still holding addresses other nodes borrowed.
    pub kept: Vec<String>,
}

/// How a claim ended.
enum Claim {
    Won,
    /// Another claim got there first: its node, when the answer named it.
    Lost(Option<String>),
}

/// An address chosen for a handle, not yet written.
struct Pick {
    key: String,
    rev: i64,
    block: Block,
    ip: IpAddr,
    own: bool,
}

pub struct Allocator<S: Store> {
    store: S,
    node: String,
    cache: NodeCache,
    stats: Stats,
    /// Addresses per family kept in the node's reserve.
    reserve: usize,
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(v).map_err(|e| Error::Store(e.to_string()))
}

fn decode<T: for<'de> Deserialize<'de>>(raw: &[u8], key: &str) -> Result<T, Error> {
    serde_json::from_slice(raw).map_err(|e| Error::Store(format!("{key} is corrupt: {e}")))
}

/// The addresses a pool's cache has handed out and not published.
fn handed_out(cache: &PoolCache) -> HashSet<IpAddr> {
    cache
        .unpublished
        .values()
        .flat_map(|r| r.addresses.iter().map(|a| a.ip))
        .collect()
}

/// Whether `ip`, of the block `key`, is reserved in the cached block.
fn reserved_in(blocks: &BTreeMap<String, (i64, Block)>, key: &str, ip: IpAddr) -> bool {
    let ord = block_cidr(key).and_then(|c| c.ordinal(ip));
    matches!((blocks.get(key), ord), (Some((_, b)), Some(o)) if b.is_reserved(o))
}

/// The block key of `ip` among a pool's cached blocks.
fn block_holding(blocks: &BTreeMap<String, (i64, Block)>, ip: IpAddr) -> Option<String> {
    blocks
        .keys()
        .find(|k| block_cidr(k).and_then(|c| c.ordinal(ip)).is_some())
        .cloned()
}

/// The key of the cached block that holds `ip` in its reserve, if one does.
fn reserving(blocks: &BTreeMap<String, (i64, Block)>, ip: IpAddr) -> Option<String> {
    block_holding(blocks, ip).filter(|k| reserved_in(blocks, k, ip))
}

/// Takes `ip` out of the reserve: freed in its block (to be written).
fn out_of_reserve(
    ip: IpAddr,
    reserve: &mut BTreeSet<IpAddr>,
    blocks: &mut BTreeMap<String, (i64, Block)>,
    changed: &mut BTreeSet<String>,
    out: &mut Vec<IpAddr>,
) {
    out.push(ip);
    let key = block_holding(blocks, ip);
    let ord = key
        .as_deref()
        .and_then(block_cidr)
        .and_then(|c| c.ordinal(ip));
    if let (Some(key), Some(ord)) = (key, ord) {
        if let Some((_, b)) = blocks.get_mut(&key) {
            b.clear(ord);
        }
        changed.insert(key);
    }
    reserve.remove(&ip);
}

/// One pool's transaction of [`Allocator::publish`], made while the node
/// is locked, sent while it is not, and applied when it is again.
#[derive(Debug)]
pub struct Publication {
    pool: String,
    /// Handles written: id and record.
    pending: Vec<(String, HandleRecord)>,
    /// Blocks written: key → (revision compared, the block written).
    blocks: BTreeMap<String, (i64, Block)>,
    /// Addresses reserved anew.
    added: Vec<IpAddr>,
    /// Addresses taken out of the reserve (freed by the transaction): back
    /// in it if the transaction does not land.
    out: Vec<IpAddr>,
    /// The pool definition's revision compared, if known.
    def_rev: Option<i64>,
}

/// A stable start point per node, so nodes claim blocks far apart.
fn spread(node: &str) -> u64 {
    crate::fnv1a(&[node.as_bytes()])
}

/// The `n`-th of a node's further start points.
fn respread(node: &str, n: usize) -> u64 {
    spread(&format!("{node}#{n}"))
}

/// The bytes a transaction's writes carry.
fn written_bytes(txn: &Txn) -> u64 {
    txn.success
        .iter()
        .map(|op| match op {
            crate::store::Op::Put(k, v) => (k.len() + v.len()) as u64,
            crate::store::Op::Delete(k) => k.len() as u64,
        })
        .sum()
}

impl<S: Store> Allocator<S> {
    pub fn new(store: S, node: &str) -> Allocator<S> {
        Allocator {
            store,
            node: node.to_string(),
            cache: NodeCache::new(),
            stats: Stats::default(),
            reserve: 0,
        }
    }

    /// Keeps `n` addresses per family in the node's reserve (0, the
    /// default: none, and every assignment goes through the store).
    pub fn with_reserve(mut self, n: usize) -> Self {
        self.reserve = n;
        self
    }

    /// Starts from a cache saved by an earlier run.
    pub fn with_cache(mut self, cache: NodeCache) -> Self {
        self.cache = cache;
        self
    }

    pub fn cache(&self) -> &NodeCache {
        &self.cache
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn store(&mut self) -> &mut S {
        &mut self.store
    }

    /// Stores `pool` unless the store already holds it; a different
    /// definition under the same name, or one overlapping another pool, is
    /// refused.
    pub fn define_pool(&mut self, pool: &Pool) -> Result<(), Error> {
        let cached = self.cache.get(&pool.name);
        if cached.and_then(|c| c.def.as_ref()) == Some(pool)
            && cached.is_some_and(|c| c.def_rev.is_some())
        {
            return Ok(());
        }
        let mut stored_rev = None;
        for kv in self.store.range("pools/")? {
            let other: Pool = decode(&kv.value, &kv.key)?;
            if other.name == pool.name {
                if other == *pool {
                    stored_rev = Some(kv.mod_rev);
                }
                continue;
            }
            for a in &pool.ranges {
                if let Some(b) = other.ranges.iter().find(|b| overlaps(a.subnet, b.subnet)) {
                    return Err(Error::PoolConflict {
                        pool: pool.name.clone(),
                        reason: format!(
                            "its subnet {} overlaps {} of pool {}",
                            a.subnet, b.subnet, other.name
                        ),
                    });
                }
            }
        }
        // Defined already, as most calls find it: no write.
        let rev = match stored_rev {
            Some(rev) => rev,
            None => self.store_pool(pool)?,
        };
        let entry = self.cache.entry(pool.name.clone()).or_default();
        entry.def = Some(pool.clone());
        entry.def_rev = Some(rev);
        Ok(())
    }

    /// Writes `pool`'s definition unless one is there; the revision of
    /// what the store holds, which must be `pool`.
    fn store_pool(&mut self, pool: &Pool) -> Result<i64, Error> {
        let key = &pool_key(&pool.name);
        let out = self.store.txn(
            Txn::default()
                .when(key, 0)
                .put(key, encode(pool)?)
                .or_read(key),
        )?;
        self.stats.txns += 1;
        let mut rev = out.revision;
        if !out.succeeded {
            let stored: Pool = match out.read(key) {
                Some(kv) => {
                    rev = kv.mod_rev;
                    decode(&kv.value, key)?
                }
                None => return Err(Error::Store(format!("{key} changed while defining it"))),
            };
            if &stored != pool {
                return Err(Error::PoolConflict {
                    pool: pool.name.clone(),
                    reason: format!(
                        "{} already defines it differently: {}",
                        self.store.describe(),
                        String::from_utf8_lossy(&encode(&stored)?)
                    ),
                });
            }
        }
        Ok(rev)
    }

    /// A pool defined in the store.
    pub fn pool(&mut self, name: &str) -> Result<Pool, Error> {
        let cached = self.cache.get(name).filter(|c| c.def_rev.is_some());
        if let Some(def) = cached.and_then(|c| c.def.clone()) {
            return Ok(def);
        }
        let key = pool_key(name);
        let Some(kv) = self.store.get(&key)? else {
            return Err(Error::PoolUnknown {
                pool: name.to_string(),
                store: self.store.describe(),
            });
        };
        let pool: Pool = decode(&kv.value, &key)?;
        let entry = self.cache.entry(name.to_string()).or_default();
        entry.def = Some(pool.clone());
        entry.def_rev = Some(kv.mod_rev);
        Ok(pool)
    }

    /// The revision of `pool`'s stored definition this node works from.
    fn pool_rev(&mut self, pool: &Pool) -> Result<i64, Error> {
        if let Some(rev) = self.cache.get(&pool.name).and_then(|c| c.def_rev) {
            return Ok(rev);
        }
        let key = pool_key(&pool.name);
        let rev = self.store.get(&key)?.map_or(0, |kv| kv.mod_rev);
        self.cache.entry(pool.name.clone()).or_default().def_rev = Some(rev);
        Ok(rev)
    }

    /// The stored definition changed under this node: forget what was
    /// cached of the pool (its blocks too) and read it again.
    fn reread(&mut self, name: &str) -> Result<Pool, Error> {
        debug!(
            pool = name,
            "pool definition changed in the store; reading it again"
        );
        // What was handed out and not yet published stays, and the reserve
        // the node made: the store does not know them as such.
        let kept = self
            .cache
            .remove(name)
            .map(|c| (c.unpublished, c.reserve))
            .unwrap_or_default();
        let pool = self.pool(name);
        if !kept.0.is_empty() || !kept.1.is_empty() {
            let entry = self.cache.entry(name.to_string()).or_default();
            (entry.unpublished, entry.reserve) = kept;
        }
        pool
    }

    /// The record of `handle`, if it holds addresses.
    pub fn lookup(&mut self, handle: &HandleId) -> Result<Option<HandleRecord>, Error> {
        if let Some(record) = self.unpublished(handle) {
            return Ok(Some(record));
        }
        let key = handle.key();
        self.store
            .get(&key)?
            .map(|kv| decode(&kv.value, &key))
            .transpose()
    }

    /// Every handle of `network`.
    pub fn handles(&mut self, network: &str) -> Result<Vec<(HandleId, HandleRecord)>, Error> {
        let mut out = Vec::new();
        for kv in self.store.range(&HandleId::network_prefix(network))? {
            if let Some(id) = HandleId::from_key(&kv.key) {
                out.push((id, decode(&kv.value, &kv.key)?));
            }
        }
        Ok(out)
    }

    /// Addresses held in `pool`'s blocks, on every node.
    pub fn allocated(&mut self, pool: &Pool) -> Result<Vec<IpAddr>, Error> {
        let mut out = Vec::new();
        for kv in self
            .store
            .range(&crate::block::pool_blocks_prefix(&pool.name))?
        {
            let Some(cidr) = block_cidr(&kv.key) else {
                continue;
            };
            let block: Block = decode(&kv.value, &kv.key)?;
            out.extend(
                block
                    .used()
                    .filter(|o| !block.is_reserved(*o))
                    .map(|ord| cidr.nth(u128::from(ord))),
            );
        }
        Ok(out)
    }

    /// Gives `handle` one address of each of the pool's families (`requested`
    /// ones where given); the same addresses again if it already has them.
    pub fn assign(
        &mut self,
        pool: &Pool,
        handle: &HandleId,
        requested: &[IpAddr],
    ) -> Result<HandleRecord, Error> {
        let families = pool.families();
        for ip in requested {
            if !families.contains(&Family::of(*ip)) {
                return Err(Error::Unavailable {
                    ip: *ip,
                    reason: format!("pool {} has no {} range", pool.name, Family::of(*ip)),
                });
            }
            if requested
                .iter()
                .filter(|o| Family::of(**o) == Family::of(*ip))
                .count()
                > 1
            {
                return Err(Error::Unavailable {
                    ip: *ip,
                    reason: "one address per family may be requested".into(),
                });
            }
        }
        let hkey = handle.key();
        let pkey = pool_key(&pool.name);
        let mut current = pool.clone();
        let pool = &mut current;
        'attempt: for _ in 0..MAX_ATTEMPTS {
            let pool_rev = self.pool_rev(pool)?;
            let mut picks = Vec::new();
            for fam in &families {
                let wanted = requested.iter().find(|ip| Family::of(**ip) == *fam);
                let pick = match wanted {
                    Some(ip) => self.pick_static(pool, handle, *ip),
                    None => self.pick(pool, *fam),
                };
                match pick {
                    Ok(p) => picks.push(p),
                    Err(Error::PoolChanged { .. }) => {
                        *pool = self.reread(&pool.name)?;
                        continue 'attempt;
                    }
                    // A repeated ADD finds its addresses even when nothing is left.
                    Err(e) => return self.lookup(handle)?.ok_or(e),
                }
            }
            let record = HandleRecord {
                pool: pool.name.clone(),
                node: self.node.clone(),
                addresses: picks
                    .iter()
                    .map(|p| Assigned {
                        ip: p.ip,
                        block: p.key.clone(),
                    })
                    .collect(),
            };
            let mut txn = Txn::default()
                .when(&hkey, 0)
                .or_read(&hkey)
                .when(&pkey, pool_rev)
                .or_read(&pkey);
            for p in &picks {
                txn = txn
                    .when(&p.key, p.rev)
                    .put(&p.key, encode(&p.block)?)
                    .or_read(&p.key);
            }
            txn = txn.put(&hkey, encode(&record)?);
            let bytes = written_bytes(&txn);
            let out = self.store.txn(txn)?;
            self.stats.txns += 1;
            if out.succeeded {
                self.stats.written += bytes;
                for p in picks.into_iter().filter(|p| p.own) {
                    self.remember(pool, p.key, out.revision, p.block);
                }
                return Ok(record);
            }
            if let Some(kv) = out.read(&hkey) {
                return decode(&kv.value, &hkey);
            }
            self.stats.conflicts += 1;
            if out.read(&pkey).map_or(0, |kv| kv.mod_rev) != pool_rev {
                *pool = self.reread(&pool.name)?;
                continue;
            }
            for p in picks.iter().filter(|p| p.own) {
                match out.read(&p.key) {
                    Some(kv) => {
                        let block = decode(&kv.value, &kv.key)?;
                        self.remember(pool, p.key.clone(), kv.mod_rev, block);
                    }
                    None => self.forget(pool, &p.key),
                }
            }
            debug!(handle = %handle, "block changed under the assignment; again");
        }
        Err(Error::Contended {
            what: format!("assigning {handle} in pool {}", pool.name),
        })
    }

    /// Frees what `handle` holds; `None` when it holds nothing.
    pub fn release(&mut self, handle: &HandleId) -> Result<Option<HandleRecord>, Error> {
        let hkey = handle.key();
        if let Some(record) = self.unpublished(handle) {
            if self.release_unpublished(handle, &record)? {
                return Ok(Some(record));
            }
        }
        for _ in 0..MAX_ATTEMPTS {
            let Some(hkv) = self.store.get(&hkey)? else {
                return Ok(None);
            };
            let record: HandleRecord = decode(&hkv.value, &hkey)?;
            let mut blocks: BTreeMap<String, (i64, Block)> = BTreeMap::new();
            for a in &record.addresses {
                if !blocks.contains_key(&a.block) {
                    let Some(current) = self.current_block(&record.pool, &a.block)? else {
                        continue;
                    };
                    blocks.insert(a.block.clone(), current);
                }
                if let Some((_, block)) = blocks.get_mut(&a.block) {
                    let cidr = block_cidr(&a.block);
                    if let Some(ord) = cidr.and_then(|c| c.ordinal(a.ip)) {
                        block.clear(ord);
                    }
                }
            }
            let own = node_blocks_prefix(&record.pool, &self.node);
            // Whether an emptied block goes back depends on the node's other
            // blocks: known to a run that loaded them (a new one per call on
            // the local store reads them now). Only the giving back needs
            // them: a failed read keeps the block.
            if blocks
                .iter()
                .any(|(k, (_, b))| k.starts_with(&own) && b.is_empty())
                && !self
                    .cache
                    .get(&record.pool)
                    .is_some_and(|c| c.loaded && c.def.is_some())
            {
                if let Ok(pool) = self.pool(&record.pool) {
                    let _ = self.load(&pool, false);
                }
            }
            let mut txn = Txn::default().when(&hkey, hkv.mod_rev).delete(&hkey);
            let mut given_back = Vec::new();
            for (key, (rev, block)) in &blocks {
                txn = txn.when(key, *rev).or_read(key);
                let cidr = block_cidr(key);
                match cidr {
                    Some(cidr)
                        if key.starts_with(&own)
                            && block.is_empty()
                            && self.gives_back(&record.pool, key, cidr) =>
                    {
                        txn = txn.delete(key).put(
                            claim_key(&record.pool, cidr),
                            Holder::Returned(unix_now()).encode(),
                        );
                        given_back.push(key.clone());
                    }
                    _ => txn = txn.put(key, encode(block)?),
                }
            }
            let bytes = written_bytes(&txn);
            let out = self.store.txn(txn)?;
            self.stats.txns += 1;
            if out.succeeded {
                self.stats.written += bytes;
                for (key, (_, block)) in blocks {
                    if given_back.contains(&key) {
                        self.stats.returned += 1;
                        if let Some(c) = self.cache.get_mut(&record.pool) {
                            c.blocks.remove(&key);
                        }
                    } else if key.starts_with(&own) {
                        self.remember_in(&record.pool, key, out.revision, block);
                    }
                }
                return Ok(Some(record));
            }
            self.stats.conflicts += 1;
            for key in blocks.keys().filter(|k| k.starts_with(&own)) {
                match out.read(key) {
                    Some(kv) => {
                        let block = decode(&kv.value, &kv.key)?;
                        self.remember_in(&record.pool, key.clone(), kv.mod_rev, block);
                    }
                    None => {
                        if let Some(c) = self.cache.get_mut(&record.pool) {
                            c.blocks.remove(key);
                        }
                    }
                }
            }
        }
        Err(Error::Contended {
            what: format!("releasing {handle}"),
        })
    }

    /// Releases every handle of `network` held on this node for which
    /// `keep` is false; returns those released. Other nodes' handles are
    /// never touched: this node's runtime knows only its own attachments.
    pub fn gc(
        &mut self,
        network: &str,
        keep: impl Fn(&HandleId) -> bool,
    ) -> Result<Vec<HandleId>, Error> {
        let mut released = Vec::new();
        let mut all = self.handles(network)?;
        let prefix = HandleId::network_prefix(network);
        for c in self.cache.values() {
            for (id, record) in &c.unpublished {
                let Some(h) = HandleId::from_key(&format!("handles/{id}")) else {
                    continue;
                };
                if h.key().starts_with(&prefix) && !all.iter().any(|(o, _)| *o == h) {
                    all.push((h, record.clone()));
                }
            }
        }
        for (id, record) in all {
            if record.node == self.node && !keep(&id) && self.release(&id)?.is_some() {
                released.push(id);
            }
        }
        Ok(released)
    }

    /// Frees everything `node` held: its handles on every network, then its
    /// blocks, each given back to its pool once empty. A block that still
    /// holds an address another node borrowed stays `node`'s until that is
    /// released; a later reclaim gives it back. Only for a node gone for
    /// good: whatever still runs there loses its addresses.
    pub fn reclaim(&mut self, node: &str) -> Result<Reclaimed, Error> {
        let mut done = Reclaimed::default();
        for kv in self.store.range("handles/")? {
            let Some(id) = HandleId::from_key(&kv.key) else {
                continue;
            };
            let record: HandleRecord = decode(&kv.value, &kv.key)?;
            if record.node == node && self.release(&id)?.is_some() {
                done.handles.push(id);
            }
        }
        let pools: Vec<String> = self
            .store
            .range("pools/")?
            .into_iter()
            .filter_map(|kv| kv.key.strip_prefix("pools/").map(String::from))
            .collect();
        for pool in pools {
            for kv in self.store.range(&node_blocks_prefix(&pool, node))? {
                let mut block: Block = decode(&kv.value, &kv.key)?;
                let cidr = block_cidr(&kv.key);
                // Its reserve was for its own ADDs, which are no more.
                let dropped = block.drop_reserve() > 0;
                let (Some(cidr), true) = (cidr, block.is_empty()) else {
                    if dropped {
                        let txn = Txn::default()
                            .when(&kv.key, kv.mod_rev)
                            .put(&kv.key, encode(&block)?);
                        let out = self.store.txn(txn)?;
                        self.stats.txns += 1;
                        if !out.succeeded {
                            self.stats.conflicts += 1;
                        }
                    }
                    done.kept.push(kv.key);
                    continue;
                };
                let txn = Txn::default()
                    .when(&kv.key, kv.mod_rev)
                    .delete(&kv.key)
                    .put(
                        claim_key(&pool, cidr),
                        Holder::Returned(unix_now()).encode(),
                    );
                let out = self.store.txn(txn)?;
                self.stats.txns += 1;
                if out.succeeded {
                    self.stats.returned += 1;
                    done.blocks.push(kv.key);
                } else {
                    // Written meanwhile (a borrow): kept for the next reclaim.
                    self.stats.conflicts += 1;
                    done.kept.push(kv.key);
                }
            }
        }
        Ok(done)
    }

    /// The assignment of `handle` handed out from the reserve and not yet
    /// published, if any.
    fn unpublished(&self, handle: &HandleId) -> Option<HandleRecord> {
        let id = handle.id();
        self.cache
            .values()
            .find_map(|c| c.unpublished.get(&id).cloned())
    }

    /// Whether this node keeps a reserve here (its cache made one).
    pub fn keeps_reserve(&self) -> bool {
        self.cache.values().any(|c| !c.reserve.is_empty())
    }

    /// Whether an assignment handed out from the reserve waits to be
    /// published.
    pub fn has_unpublished(&self) -> bool {
        self.cache.values().any(|c| !c.unpublished.is_empty())
    }

    /// ADD without a store round trip: one address of each of the pool's
    /// families from this node's reserve (addresses its blocks already mark
    /// used in the store, so no other node can take them), kept as
    /// unpublished until [`Allocator::publish`] writes the handle. `None`
    /// when the reserve cannot serve it (the caller assigns through the
    /// store).
    pub fn take_reserved(&mut self, pool: &Pool, handle: &HandleId) -> Option<HandleRecord> {
        let id = handle.id();
        let node = self.node.clone();
        let keep = self.reserve;
        let cache = self.cache.get_mut(&pool.name)?;
        if let Some(record) = cache.unpublished.get(&id) {
            return Some(record.clone());
        }
        if keep == 0 || cache.def.as_ref() != Some(pool) || !cache.loaded {
            return None;
        }
        let taken = handed_out(cache);
        let mut addresses = Vec::new();
        for family in pool.families() {
            let found = cache.reserve.iter().find_map(|ip| {
                if Family::of(*ip) != family || taken.contains(ip) || !pool.usable(*ip) {
                    return None;
                }
                let block = reserving(&cache.blocks, *ip)?;
                Some(Assigned { ip: *ip, block })
            })?;
            addresses.push(found);
        }
        let record = HandleRecord {
            pool: pool.name.clone(),
            node,
            addresses,
        };
        cache.unpublished.insert(id, record.clone());
        Some(record)
    }

    /// DEL of an assignment not yet published: one transaction that finds
    /// no handle in the store and writes its blocks with its addresses
    /// free (their revisions change, so a publisher's transaction sent
    /// before cannot land after). `false` when the store holds the handle
    /// after all (a publisher wrote it and stopped before its cache was
    /// saved): it is released as any other then.
    fn release_unpublished(
        &mut self,
        handle: &HandleId,
        record: &HandleRecord,
    ) -> Result<bool, Error> {
        let (hkey, id, name) = (handle.key(), handle.id(), record.pool.clone());
        for _ in 0..MAX_ATTEMPTS {
            let mut blocks: BTreeMap<String, (i64, Block)> = BTreeMap::new();
            for a in &record.addresses {
                if !blocks.contains_key(&a.block) {
                    if let Some(c) = self.current_block(&name, &a.block)? {
                        blocks.insert(a.block.clone(), c);
                    }
                }
                let ord = block_cidr(&a.block).and_then(|c| c.ordinal(a.ip));
                if let (Some((_, b)), Some(o)) = (blocks.get_mut(&a.block), ord) {
                    // Only while reserved: one the store gave another since
                    // is not this assignment's to free.
                    if b.is_reserved(o) {
                        b.clear(o);
                    }
                }
            }
            let mut txn = Txn::default().when(&hkey, 0).or_read(&hkey);
            for (key, (rev, block)) in &blocks {
                txn = txn.when(key, *rev).put(key, encode(block)?).or_read(key);
            }
            let out = self.store.txn(txn)?;
            self.stats.txns += 1;
            if out.succeeded {
                if let Some(c) = self.cache.get_mut(&name) {
                    c.settle(&id, record);
                }
                for (key, (_, block)) in blocks {
                    self.remember_in(&name, key, out.revision, block);
                }
                return Ok(true);
            }
            self.stats.conflicts += 1;
            if out.read(&hkey).is_some() {
                if let Some(c) = self.cache.get_mut(&name) {
                    c.settle(&id, record);
                }
                return Ok(false);
            }
            self.refresh(&name, blocks.keys(), &out)?;
        }
        Err(Error::Contended {
            what: format!("releasing {handle}"),
        })
    }

    /// Block `key` of pool `pool` with its revision: as cached (once the
    /// node's blocks were read), else as the store holds it.
    fn current_block(&mut self, pool: &str, key: &str) -> Result<Option<(i64, Block)>, Error> {
        let cached = self
            .cache
            .get(pool)
            .filter(|c| c.loaded)
            .and_then(|c| c.blocks.get(key).cloned());
        if cached.is_some() {
            return Ok(cached);
        }
        match self.store.get(key)? {
            Some(kv) => Ok(Some((kv.mod_rev, decode(&kv.value, &kv.key)?))),
            None => Ok(None),
        }
    }

    /// The cached blocks `keys` of pool `name` as a failed transaction read
    /// them (a block it did not find is forgotten), unless the cache holds
    /// a newer revision.
    fn refresh<'k>(
        &mut self,
        name: &str,
        keys: impl Iterator<Item = &'k String>,
        out: &crate::store::TxnOutcome,
    ) -> Result<(), Error> {
        for key in keys {
            let cached = self
                .cache
                .get(name)
                .and_then(|c| c.blocks.get(key))
                .map(|(rev, _)| *rev);
            match out.read(key) {
                Some(kv) if cached.is_none_or(|r| r <= kv.mod_rev) => {
                    let block = decode(&kv.value, &kv.key)?;
                    self.remember_in(name, key.clone(), kv.mod_rev, block);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = self.cache.get_mut(name) {
                        c.blocks.remove(key);
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether anything waits for [`Allocator::publish`]: an unpublished
    /// handle, or (with `reserve`) a reserve to top up (from blocks with
    /// room) or to trim.
    pub fn to_publish(&self, reserve: bool) -> bool {
        self.cache.values().any(|c| {
            if !c.unpublished.is_empty() {
                return true;
            }
            if !reserve {
                return false;
            }
            let Some(def) = c.def.as_ref().filter(|_| c.loaded) else {
                return false;
            };
            def.families().iter().any(|f| {
                let have = c.reserve.iter().filter(|ip| Family::of(**ip) == *f).count();
                have > self.reserve
                    || (have < self.reserve && free_in(&c.blocks, def, *f).is_some())
            })
        })
    }

    /// Writes the handles handed out from the reserve, and brings each
    /// pool's reserve to what the node keeps ([`Allocator::with_reserve`])
    /// per family: topped up from this node's blocks (when they have room),
    /// or its surplus given back. One transaction per pool. Returns how many
    /// handles its transactions wrote (not those assigned again by name).
    /// (A caller that must not hold its lock while
    /// the store commits runs [`Allocator::prepare_publish`],
    /// [`Allocator::send`] and [`Allocator::apply_publication`] itself.)
    pub fn publish(&mut self) -> Result<usize, Error> {
        let mut written = 0;
        for _ in 0..MAX_ATTEMPTS {
            let publications = self.prepare_publish()?;
            if publications.is_empty() {
                return Ok(written);
            }
            let mut landed = true;
            for p in publications {
                let out = self.send(&p);
                let (n, ok) = self.apply_publication(p, out.as_ref().ok())?;
                out?;
                written += n;
                landed &= ok;
            }
            if landed {
                return Ok(written);
            }
        }
        Err(Error::Contended {
            what: "publishing the reserve's assignments".into(),
        })
    }

    /// What [`Allocator::publish`] would write, as one [`Publication`] per
    /// pool. What it takes out of the reserve (a surplus, or addresses the
    /// pool no longer has) leaves the cache now, before the store is
    /// asked: a cache saved meanwhile never offers an address the store may
    /// have freed. Assignments from a reserve no longer the node's (its pool
    /// changed or deleted, or the node reclaimed) are made again by name
    /// here.
    pub fn prepare_publish(&mut self) -> Result<Vec<Publication>, Error> {
        let names: Vec<String> = self.cache.keys().cloned().collect();
        let mut out = Vec::new();
        for name in names {
            if let Some(p) = self.prepare_pool(&name)? {
                out.push(p);
            }
        }
        Ok(out)
    }

    fn prepare_pool(&mut self, name: &str) -> Result<Option<Publication>, Error> {
        let Some(cache) = self.cache.get(name) else {
            return Ok(None);
        };
        if !cache.unpublished.is_empty() && cache.def.is_none() {
            // The definition first: what was handed out is judged by it.
            match self.pool(name) {
                Ok(_) => {}
                Err(Error::PoolUnknown { .. }) => {
                    self.pool_gone(name);
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
        let Some(cache) = self.cache.get(name) else {
            return Ok(None);
        };
        let stale: Vec<(String, HandleRecord)> = cache
            .unpublished
            .iter()
            .filter(|(_, r)| {
                r.addresses.iter().any(|a| {
                    !cache.reserve.contains(&a.ip)
                        || !cache.def.as_ref().is_some_and(|d| d.usable(a.ip))
                        || !reserved_in(&cache.blocks, &a.block, a.ip)
                })
            })
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect();
        for (id, record) in stale {
            self.assign_again(name, &id, &record)?;
        }
        let Some(cache) = self.cache.get_mut(name) else {
            return Ok(None);
        };
        let pending: Vec<(String, HandleRecord)> = cache
            .unpublished
            .iter()
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect();
        let handed = handed_out(cache);
        let def = cache.def.clone().filter(|_| cache.loaded);
        let mut blocks = cache.blocks.clone();
        let mut changed: BTreeSet<String> = BTreeSet::new();
        // A published address leaves the reserve: its handle holds it.
        for a in pending.iter().flat_map(|(_, r)| &r.addresses) {
            let ord = block_cidr(&a.block).and_then(|c| c.ordinal(a.ip));
            if let (Some((_, b)), Some(ord)) = (blocks.get_mut(&a.block), ord) {
                b.assign_reserved(ord);
                changed.insert(a.block.clone());
            }
        }
        // Addresses of the reserve the store no longer reserves are not
        // this node's any more.
        let lost: Vec<IpAddr> = cache
            .reserve
            .iter()
            .filter(|ip| !handed.contains(ip) && reserving(&blocks, **ip).is_none())
            .copied()
            .collect();
        for ip in &lost {
            cache.reserve.remove(ip);
        }
        let mut added = Vec::new();
        let mut taken = Vec::new();
        if let Some(def) = &def {
            // Reserved where the pool (changed since) has no address.
            let unusable: Vec<IpAddr> = cache
                .reserve
                .iter()
                .filter(|ip| !handed.contains(ip) && !def.usable(**ip))
                .copied()
                .collect();
            for ip in unusable {
                out_of_reserve(
                    ip,
                    &mut cache.reserve,
                    &mut blocks,
                    &mut changed,
                    &mut taken,
                );
            }
            for family in def.families() {
                let free: Vec<IpAddr> = cache
                    .reserve
                    .iter()
                    .filter(|ip| Family::of(**ip) == family && !handed.contains(ip))
                    .copied()
                    .collect();
                // More than kept now: the surplus goes back to the pool.
                for ip in free.iter().skip(self.reserve) {
                    out_of_reserve(
                        *ip,
                        &mut cache.reserve,
                        &mut blocks,
                        &mut changed,
                        &mut taken,
                    );
                }
                for _ in free.len()..self.reserve {
                    let Some((key, ord, ip)) = free_in(&blocks, def, family) else {
                        // Full: the next ADD claims a block through the store.
                        break;
                    };
                    if let Some((_, b)) = blocks.get_mut(&key) {
                        b.reserve(ord);
                    }
                    changed.insert(key);
                    added.push(ip);
                }
            }
        }
        if pending.is_empty() && changed.is_empty() {
            return Ok(None);
        }
        Ok(Some(Publication {
            pool: name.to_string(),
            pending,
            blocks: changed
                .into_iter()
                .filter_map(|k| blocks.remove(&k).map(|b| (k, b)))
                .collect(),
            added,
            out: taken,
            def_rev: cache.def_rev,
        }))
    }

    /// Sends `p`'s transaction; no cache is changed.
    pub fn send(&mut self, p: &Publication) -> Result<crate::store::TxnOutcome, Error> {
        let pkey = pool_key(&p.pool);
        let mut txn = Txn::default();
        if let Some(rev) = p.def_rev {
            txn = txn.when(&pkey, rev).or_read(&pkey);
        }
        for (id, record) in &p.pending {
            let hkey = format!("handles/{id}");
            txn = txn
                .when(&hkey, 0)
                .put(&hkey, encode(record)?)
                .or_read(&hkey);
        }
        for (key, (rev, block)) in &p.blocks {
            txn = txn.when(key, *rev).put(key, encode(block)?).or_read(key);
        }
        let bytes = written_bytes(&txn);
        let out = self.store.txn(txn)?;
        self.stats.txns += 1;
        if out.succeeded {
            self.stats.written += bytes;
        } else {
            self.stats.conflicts += 1;
        }
        Ok(out)
    }

    /// Applies what the store answered to `p` (`None`: it was not sent) to
    /// this cache, which may have been saved and read again since `p` was
    /// prepared. Returns the handles now in the store, and whether `p`
    /// landed.
    pub fn apply_publication(
        &mut self,
        p: Publication,
        out: Option<&crate::store::TxnOutcome>,
    ) -> Result<(usize, bool), Error> {
        let name = p.pool.clone();
        let Some(out) = out else {
            if let Some(c) = self.cache.get_mut(&name) {
                c.reserve.extend(p.out.iter().copied());
            }
            return Ok((0, false));
        };
        if out.succeeded {
            if let Some(c) = self.cache.get_mut(&name) {
                for (id, record) in &p.pending {
                    c.settle(id, record);
                }
                c.reserve.extend(p.added.iter().copied());
            }
            for (key, (_, block)) in p.blocks {
                let newer = self
                    .cache
                    .get(&name)
                    .and_then(|c| c.blocks.get(&key))
                    .is_some_and(|(rev, _)| *rev > out.revision);
                if !newer {
                    self.remember_in(&name, key, out.revision, block);
                }
            }
            return Ok((p.pending.len(), true));
        }
        let mut written = 0;
        for (id, record) in &p.pending {
            let hkey = format!("handles/{id}");
            let Some(kv) = out.read(&hkey) else { continue };
            let stored: HandleRecord = decode(&kv.value, &hkey)?;
            if stored == *record {
                // Written by a publisher that stopped before its cache was saved.
                written += 1;
            } else {
                // Another assignment of the same handle stands; the pod was
                // given these addresses all the same: they stay used, and
                // leave the reserve (never handed out twice).
                tracing::error!(handle = %id, stored = ?stored.addresses, handed = ?record.addresses,
                    "the store holds another assignment of a handle the reserve answered: \
                     its addresses stay used, held by no handle");
            }
            if let Some(c) = self.cache.get_mut(&name) {
                c.settle(id, record);
            }
        }
        let pkey = pool_key(&name);
        if p.def_rev.is_some() && out.read(&pkey).map(|kv| kv.mod_rev) != p.def_rev {
            match self.reread(&name) {
                Ok(_) => {}
                Err(Error::PoolUnknown { .. }) => self.pool_gone(&name),
                Err(e) => return Err(e),
            }
        } else {
            self.refresh(&name, p.blocks.keys(), out)?;
        }
        // Not freed after all: still the reserve's while the store says so.
        if let Some(c) = self.cache.get_mut(&name) {
            for ip in &p.out {
                if reserving(&c.blocks, *ip).is_some() {
                    c.reserve.insert(*ip);
                }
            }
        }
        Ok((written, false))
    }

    /// The pool `name` is gone from the store: what its cache handed out
    /// cannot be published (said loudly), and nothing of it is kept.
    fn pool_gone(&mut self, name: &str) {
        let dropped = self.cache.remove(name).map(|c| c.unpublished);
        for id in dropped.iter().flat_map(|u| u.keys()) {
            warn!(handle = %id, pool = name,
                "the pool is gone: an address handed out from this node's reserve cannot be published");
        }
    }

    /// Assigns the addresses of `record`, handed out from a reserve that is
    /// no longer this node's, again by name, and drops it from what waits
    /// to be published; whether that held. When it cannot be, the pod keeps
    /// addresses IPAM does not hold: said loudly. A failure to reach the
    /// store keeps it for the next publisher.
    fn assign_again(&mut self, name: &str, id: &str, record: &HandleRecord) -> Result<bool, Error> {
        let drop_it = |a: &mut Self| {
            if let Some(c) = a.cache.get_mut(name) {
                c.settle(id, record);
            }
        };
        let Some(handle) = HandleId::from_key(&format!("handles/{id}")) else {
            drop_it(self);
            return Ok(false);
        };
        let pool = match self.pool(name) {
            Ok(p) => p,
            Err(Error::PoolUnknown { .. }) => {
                self.pool_gone(name);
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        // Asked for by name, as a static request: not from the reserve.
        drop_it(self);
        let ips: Vec<IpAddr> = record.addresses.iter().map(|a| a.ip).collect();
        match self.assign(&pool, &handle, &ips) {
            Ok(_) => Ok(true),
            Err(e @ (Error::Unavailable { .. } | Error::Exhausted { .. })) => {
                tracing::error!(handle = id, error = %e,
                    "an address handed out from this node's reserve is no longer the node's \
                     (its pool changed, or the node was reclaimed), and another holds it: \
                     the pod keeps an address IPAM does not");
                Ok(false)
            }
            Err(e) => {
                // Kept for the next publisher.
                if let Some(c) = self.cache.get_mut(name) {
                    c.unpublished.insert(id.to_string(), record.clone());
                }
                Err(e)
            }
        }
    }

    /// Whether this node's block `key` (`cidr`) of `pool`, empty now, goes
    /// back to the pool: only while another of the node's blocks of its
    /// family has room, so that the node keeps one block per family and the
    /// next ADD need not claim one (no claim and give-back at every pod
    /// around a block's edge).
    fn gives_back(&self, pool: &str, key: &str, cidr: BlockCidr) -> bool {
        let Some(cache) = self.cache.get(pool).filter(|c| c.loaded) else {
            return false;
        };
        let Some(def) = &cache.def else {
            return false;
        };
        cache.blocks.iter().any(|(k, (_, b))| {
            k != key
                && block_cidr(k)
                    .is_some_and(|o| o.family() == cidr.family() && b.free(def, o).is_some())
        })
    }

    fn remember(&mut self, pool: &Pool, key: String, rev: i64, block: Block) {
        self.remember_in(&pool.name, key, rev, block);
    }

    fn remember_in(&mut self, pool: &str, key: String, rev: i64, block: Block) {
        self.cache
            .entry(pool.to_string())
            .or_default()
            .blocks
            .insert(key, (rev, block));
    }

    fn forget(&mut self, pool: &Pool, key: &str) {
        if let Some(c) = self.cache.get_mut(&pool.name) {
            c.blocks.remove(key);
        }
    }

    /// Reads this node's blocks of `pool` unless already known.
    fn load(&mut self, pool: &Pool, again: bool) -> Result<(), Error> {
        if !again && self.cache.get(&pool.name).is_some_and(|c| c.loaded) {
            return Ok(());
        }
        let kvs = self
            .store
            .range(&node_blocks_prefix(&pool.name, &self.node))?;
        let entry = self.cache.entry(pool.name.clone()).or_default();
        entry.blocks.clear();
        for kv in kvs {
            let block = decode(&kv.value, &kv.key)?;
            entry.blocks.insert(kv.key, (kv.mod_rev, block));
        }
        entry.loaded = true;
        Ok(())
    }

    /// A free address of `family` in one of this node's blocks ([`free_in`]),
    /// taken in a copy of its block.
    fn free_in_own(&self, pool: &Pool, family: Family) -> Option<Pick> {
        let cache = self.cache.get(&pool.name)?;
        let (key, ord, ip) = free_in(&cache.blocks, pool, family)?;
        let (rev, mut block) = cache.blocks.get(&key)?.clone();
        block.take(ord);
        Some(Pick {
            key,
            rev,
            block,
            ip,
            own: true,
        })
    }

    /// A dynamic address: from this node's blocks, else a newly claimed
    /// block, else borrowed from another node's block.
    fn pick(&mut self, pool: &Pool, family: Family) -> Result<Pick, Error> {
        let cached = self.cache.get(&pool.name).is_some_and(|c| c.loaded);
        self.load(pool, false)?;
        if let Some(p) = self.free_in_own(pool, family) {
            return Ok(p);
        }
        if cached {
            // Before claiming a block, the node's own as the store has them
            // (one read of its own, not of the pool's): a block an earlier
            // run claimed and crashed before it saved its cache is used, not
            // left claimed and empty.
            self.load(pool, true)?;
            if let Some(p) = self.free_in_own(pool, family) {
                return Ok(p);
            }
        }
        // A block near one of this node's start points whose claim the
        // window read shows free; which of the free ones is the node's own
        // pick, so that nodes whose start points meet rarely race.
        let mut seen: BTreeMap<BlockCidr, bool> = BTreeMap::new();
        for probe in 0..PROBES {
            let start = if probe == 0 {
                spread(&self.node)
            } else {
                respread(&self.node, probe)
            };
            let window: Vec<BlockCidr> = pool
                .blocks(family, start)
                .filter(|b| !seen.contains_key(b) && Block::default().free(pool, *b).is_some())
                .take(PROBE_WINDOW)
                .collect();
            if window.is_empty() {
                break;
            }
            let keys: Vec<String> = window.iter().map(|b| claim_key(&pool.name, *b)).collect();
            let claimed: BTreeMap<String, (Holder, i64)> = self
                .store
                .get_many(&keys)?
                .into_iter()
                .map(|kv| (kv.key, (Holder::parse(&kv.value), kv.mod_rev)))
                .collect();
            if claimed.values().any(|(h, _)| h.is(&self.node))
                && self.claimed_unknown(pool, &claimed)
            {
                // Claimed by an earlier run whose answer was lost, or by
                // another process of this node.
                self.load(pool, true)?;
                if let Some(p) = self.free_in_own(pool, family) {
                    return Ok(p);
                }
            }
            let now = unix_now();
            let mut free: Vec<(BlockCidr, i64)> = Vec::new();
            for (b, k) in window.iter().zip(&keys) {
                let rev = match claimed.get(k) {
                    None => Some(0),
                    Some((h, rev)) => h.claimable(now).then_some(*rev),
                };
                seen.insert(*b, rev.is_none());
                free.extend(rev.map(|r| (*b, r)));
            }
            while !free.is_empty() {
                let i = (respread(&self.node, PROBES + probe) % free.len() as u64) as usize;
                let (cidr, rev) = free.swap_remove(i);
                match self.claim(pool, cidr, rev)? {
                    Claim::Won => {
                        if let Some(p) = self.free_in_own(pool, family) {
                            return Ok(p);
                        }
                    }
                    Claim::Lost(Some(owner)) if owner == self.node => {
                        self.load(pool, true)?;
                        if let Some(p) = self.free_in_own(pool, family) {
                            return Ok(p);
                        }
                    }
                    Claim::Lost(_) => {
                        seen.insert(cidr, true);
                    }
                }
            }
        }
        // Wherever this node looked, blocks were claimed: the pool is nearly
        // full. Every claim decides: one left to claim, or an address to
        // borrow.
        for _ in 0..MAX_ATTEMPTS {
            let claims = self.claims(pool)?;
            let mine_unknown = claims.iter().any(|(k, (h, _))| {
                h.is(&self.node)
                    && !self.cache.get(&pool.name).is_some_and(|c| {
                        c.blocks
                            .contains_key(&block_key(&pool.name, &self.node, *k))
                    })
            });
            if mine_unknown {
                self.load(pool, true)?;
                if let Some(p) = self.free_in_own(pool, family) {
                    return Ok(p);
                }
            }
            let now = unix_now();
            let candidate = pool
                .blocks(family, spread(&self.node))
                .filter(|b| Block::default().free(pool, *b).is_some())
                .find_map(|b| match claims.get(&b) {
                    None => Some((b, 0)),
                    Some((h, rev)) => h.claimable(now).then_some((b, *rev)),
                });
            let Some((cidr, rev)) = candidate else {
                return self.borrow(pool, family, &claims);
            };
            if let Claim::Won = self.claim(pool, cidr, rev)? {
                if let Some(p) = self.free_in_own(pool, family) {
                    return Ok(p);
                }
            }
        }
        Err(Error::Contended {
            what: format!("claiming a block of pool {}", pool.name),
        })
    }

    /// Whether `claimed` (claim key → node) names a block of this node's
    /// that its cache does not hold.
    fn claimed_unknown(&self, pool: &Pool, claimed: &BTreeMap<String, (Holder, i64)>) -> bool {
        let prefix = claim_prefix(&pool.name);
        claimed.iter().any(|(k, (h, _))| {
            h.is(&self.node)
                && k.strip_prefix(&prefix)
                    .and_then(BlockCidr::parse_key)
                    .is_some_and(|b| {
                        !self.cache.get(&pool.name).is_some_and(|c| {
                            c.blocks.contains_key(&block_key(&pool.name, &self.node, b))
                        })
                    })
        })
    }

    /// Claims `cidr` for this node with an empty block; `claim_rev` is the
    /// revision of the claim as read (0: none, else one given back).
    fn claim(&mut self, pool: &Pool, cidr: BlockCidr, claim_rev: i64) -> Result<Claim, Error> {
        let ckey = claim_key(&pool.name, cidr);
        let bkey = block_key(&pool.name, &self.node, cidr);
        let pkey = pool_key(&pool.name);
        let pool_rev = self.pool_rev(pool)?;
        let txn = Txn::default()
            .when(&ckey, claim_rev)
            .when(&bkey, 0)
            .when(&pkey, pool_rev)
            .or_read(&pkey)
            .or_read(&ckey)
            .put(&ckey, self.node.as_bytes().to_vec())
            .put(&bkey, encode(&Block::default())?);
        let bytes = written_bytes(&txn);
        let out = self.store.txn(txn)?;
        self.stats.txns += 1;
        if !out.succeeded && out.read(&pkey).map_or(0, |kv| kv.mod_rev) != pool_rev {
            return Err(Error::PoolChanged {
                pool: pool.name.clone(),
            });
        }
        if out.succeeded {
            self.stats.claims += 1;
            self.stats.written += bytes;
            self.remember(pool, bkey, out.revision, Block::default());
            return Ok(Claim::Won);
        }
        self.stats.conflicts += 1;
        Ok(Claim::Lost(
            out.read(&ckey)
                .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()),
        ))
    }

    /// Every claim of `pool`: its holder and revision.
    fn claims(&mut self, pool: &Pool) -> Result<BTreeMap<BlockCidr, (Holder, i64)>, Error> {
        let prefix = claim_prefix(&pool.name);
        Ok(self
            .store
            .range(&prefix)?
            .into_iter()
            .filter_map(|kv| {
                let cidr = BlockCidr::parse_key(kv.key.strip_prefix(&prefix)?)?;
                Some((cidr, (Holder::parse(&kv.value), kv.mod_rev)))
            })
            .collect())
    }

    fn borrow(
        &mut self,
        pool: &Pool,
        family: Family,
        claims: &BTreeMap<BlockCidr, (Holder, i64)>,
    ) -> Result<Pick, Error> {
        for (cidr, (holder, _)) in claims {
            let Some(owner) = holder.node() else {
                continue;
            };
            if owner == self.node || cidr.family() != family {
                continue;
            }
            let key = block_key(&pool.name, owner, *cidr);
            let Some(kv) = self.store.get(&key)? else {
                continue;
            };
            let mut block: Block = decode(&kv.value, &key)?;
            if let Some((ord, ip)) = block.free(pool, *cidr) {
                block.take(ord);
                self.stats.borrows += 1;
                return Ok(Pick {
                    key,
                    rev: kv.mod_rev,
                    block,
                    ip,
                    own: false,
                });
            }
        }
        Err(Error::Exhausted {
            pool: pool.name.clone(),
            family,
        })
    }

    /// The requested `ip`, wherever its block is; claimed for this node if
    /// nobody has claimed it yet.
    fn pick_static(&mut self, pool: &Pool, handle: &HandleId, ip: IpAddr) -> Result<Pick, Error> {
        let (Some(cidr), true) = (pool.block_of(ip), pool.usable(ip)) else {
            return Err(Error::Unavailable {
                ip,
                reason: format!(
                    "outside pool {}'s ranges, or reserved (gateway, network, broadcast, excluded)",
                    pool.name
                ),
            });
        };
        let Some(ord) = cidr.ordinal(ip) else {
            return Err(Error::Unavailable {
                ip,
                reason: format!("not in block {}", cidr.key()),
            });
        };
        for _ in 0..MAX_ATTEMPTS {
            let ckey = claim_key(&pool.name, cidr);
            // An address asked for by name may come from a block given back
            // however recently: whoever asks knows what they ask for.
            let owner = match self.store.get(&ckey)? {
                Some(kv) => match Holder::parse(&kv.value) {
                    Holder::Node(n) => n,
                    Holder::Returned(_) => {
                        self.claim(pool, cidr, kv.mod_rev)?;
                        continue;
                    }
                },
                None => {
                    self.claim(pool, cidr, 0)?;
                    continue;
                }
            };
            let key = block_key(&pool.name, &owner, cidr);
            let Some(kv) = self.store.get(&key)? else {
                return Err(Error::Store(format!(
                    "{ckey} names {owner}, but {key} is missing"
                )));
            };
            let mut block: Block = decode(&kv.value, &key)?;
            // In this node's reserve, and not handed out: it is free to ask for.
            let reserve = owner == self.node
                && block.is_reserved(ord)
                && self
                    .cache
                    .get(&pool.name)
                    .is_some_and(|c| c.reserve.contains(&ip) && !handed_out(c).contains(&ip));
            if reserve {
                block.assign_reserved(ord);
            } else if block.is_used(ord) {
                // Ours only if this handle already holds it (a repeated ADD).
                let mine = self
                    .lookup(handle)?
                    .is_some_and(|r| r.addresses.iter().any(|a| a.ip == ip));
                if !mine {
                    return Err(Error::Unavailable {
                        ip,
                        reason: format!("already assigned (block {})", cidr.key()),
                    });
                }
            }
            block.set(ord);
            return Ok(Pick {
                own: owner == self.node,
                key,
                rev: kv.mod_rev,
                block,
                ip,
            });
        }
        Err(Error::Contended {
            what: format!("claiming the block of {ip}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::store::local::LocalStore;
    use crate::store::Kv;

    /// A store that counts reads of every claim of a pool.
    struct Counting {
        inner: LocalStore,
        claim_ranges: usize,
    }

    impl Store for Counting {
        fn get(&mut self, key: &str) -> Result<Option<Kv>, Error> {
            self.inner.get(key)
        }
        fn range(&mut self, prefix: &str) -> Result<Vec<Kv>, Error> {
            if prefix.starts_with("claims/") {
                self.claim_ranges += 1;
            }
            self.inner.range(prefix)
        }
        fn txn(&mut self, txn: Txn) -> Result<crate::store::TxnOutcome, Error> {
            self.inner.txn(txn)
        }
        fn describe(&self) -> String {
            self.inner.describe()
        }
    }

    fn pool(v4: &str, v6: &str) -> Pool {
        serde_json::from_value::<Pool>(serde_json::json!({
            "name": "pods",
            "ranges": [{"subnet": v4}, {"subnet": v6}],
            "blockSizes": {"ipv4": 26, "ipv6": 122},
        }))
        .expect("pool")
        .validated()
        .expect("valid")
    }

    /// The addresses node `node` holds in its reserve, read from the store.
    fn reserve_of(store: &mut LocalStore, node: &str) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for kv in store
            .range(&format!("blocks/pods/{node}/"))
            .expect("blocks")
        {
            let cidr = block_cidr(&kv.key).expect("a block key");
            let block: Block = serde_json::from_slice(&kv.value).expect("a block");
            out.extend(block.reserved().map(|o| cidr.nth(u128::from(o))));
        }
        out
    }

    #[test]
    fn the_reserve_answers_adds_and_a_stale_one_is_assigned_again_by_name() {
        let dir = tempfile::tempdir().expect("dir");
        let pods = pool("10.0.0.0/24", "fd00::/120");
        let open = || LocalStore::open(dir.path()).expect("store");
        let h = |n: &str| HandleId::new("pods", n, "eth0");
        let ips = |r: &HandleRecord| -> Vec<IpAddr> { r.addresses.iter().map(|a| a.ip).collect() };
        let mut a = Allocator::new(open(), "node-a").with_reserve(RESERVE);
        a.define_pool(&pods).expect("define");
        assert!(
            a.take_reserved(&pods, &h("x")).is_none(),
            "nothing reserved yet"
        );
        a.assign(&pods, &h("a0"), &[]).expect("assign");
        assert!(a.to_publish(true));
        assert_eq!(a.publish().expect("publish"), 0);
        assert!(!a.to_publish(true));
        // Two per family: used in the store, held by no handle, not allocated.
        let reserve = reserve_of(&mut open(), "node-a");
        assert_eq!(reserve.len(), 2 * RESERVE, "{reserve:?}");
        assert_eq!(a.allocated(&pods).expect("allocated").len(), 2);

        // Handed out without the store; the same again for the same handle.
        let a1 = a.take_reserved(&pods, &h("a1")).expect("from the reserve");
        assert!(ips(&a1).iter().all(|ip| reserve.contains(ip)), "{a1:?}");
        assert_eq!(a.take_reserved(&pods, &h("a1")), Some(a1.clone()));
        assert_eq!(a.lookup(&h("a1")).expect("lookup"), Some(a1.clone()));
        let mut reader = Allocator::new(open(), "reader");
        assert_eq!(
            reader.lookup(&h("a1")).expect("lookup"),
            None,
            "not published yet"
        );
        assert_eq!(a.publish().expect("publish"), 1);
        assert_eq!(reader.lookup(&h("a1")).expect("lookup"), Some(a1.clone()));
        let reserve = reserve_of(&mut open(), "node-a");
        assert_eq!(reserve.len(), 2 * RESERVE, "topped up: {reserve:?}");
        assert!(ips(&a1).iter().all(|ip| !reserve.contains(ip)));

        // Kept smaller from now on: the surplus goes back to the pool.
        let mut a = Allocator::new(open(), "node-a")
            .with_cache(a.cache().clone())
            .with_reserve(1);
        assert!(a.to_publish(true));
        assert_eq!(a.publish().expect("trim"), 0);
        assert_eq!(reserve_of(&mut open(), "node-a").len(), 2, "one per family");

        // Released before it is published: no handle is written, and its
        // addresses go back to the pool (not to the next ADD: a block hands
        // its addresses out in turn); the reserve is topped up anew.
        let a2 = a.take_reserved(&pods, &h("a2")).expect("from the reserve");
        assert_eq!(a.release(&h("a2")).expect("release"), Some(a2.clone()));
        assert!(
            a.take_reserved(&pods, &h("a3")).is_none(),
            "the reserve is spent"
        );
        assert!(reserve_of(&mut open(), "node-a").is_empty());
        assert_eq!(reader.lookup(&h("a2")).expect("lookup"), None);
        let held = reader.allocated(&pods).expect("allocated");
        assert!(ips(&a2).iter().all(|ip| !held.contains(ip)), "{held:?}");
        assert!(a.to_publish(true));
        a.publish().expect("top up");
        let a3 = a.take_reserved(&pods, &h("a3")).expect("from the reserve");
        assert!(ips(&a3).iter().all(|ip| !ips(&a2).contains(ip)), "{a3:?}");

        // Node-a reclaimed while it still runs, a3 not yet published: its
        // publisher assigns a3's addresses again, by name, in a block
        // claimed anew.
        let mut admin = Allocator::new(open(), "plexusd");
        let done = admin.reclaim("node-a").expect("reclaim");
        assert!(done.kept.is_empty(), "{done:?}");
        assert!(reserve_of(&mut open(), "node-a").is_empty());
        a.publish().expect("publish");
        assert!(!a.has_unpublished());
        let stored = reader.lookup(&h("a3")).expect("lookup").expect("published");
        assert_eq!(ips(&stored), ips(&a3));
        let held = reader.allocated(&pods).expect("allocated");
        assert!(ips(&a3).iter().all(|ip| held.contains(ip)), "{held:?}");
    }

    #[test]
    fn a_block_claimed_by_a_run_that_crashed_is_used_before_a_new_one() {
        let dir = tempfile::tempdir().expect("dir");
        // 1,024 blocks per family: a block far from the node's start point
        // is outside the windows it reads.
        let pods = pool("10.0.0.0/16", "fd00::/112");
        let open = || LocalStore::open(dir.path()).expect("store");
        let v4_claims = |store: &mut LocalStore| {
            store
                .range("claims/pods/")
                .expect("claims")
                .iter()
                .filter(|kv| kv.key.contains("claims/pods/10.") && kv.value == b"node-a")
                .count()
        };
        let mut a = Allocator::new(open(), "node-a");
        a.define_pool(&pods).expect("define");
        a.assign(&pods, &HandleId::new("pods", "c0", "eth0"), &[])
            .expect("assign");
        let saved = a.cache().clone();
        // Another run claims a block far away (a static address) and dies
        // before its cache is saved.
        let mut crashed = Allocator::new(open(), "node-a").with_cache(saved.clone());
        let far = HandleId::new("pods", "far", "eth0");
        let ip: IpAddr = "10.0.200.5".parse().expect("ip");
        crashed.assign(&pods, &far, &[ip]).expect("static");
        let before = v4_claims(&mut open());
        assert_eq!(before, 2, "the first block and the far one");
        // The next run starts from the cache saved before the crash: once its
        // first block is full it uses the far one, claiming nothing new.
        let mut next = Allocator::new(open(), "node-a").with_cache(saved);
        for i in 1..80 {
            next.assign(&pods, &HandleId::new("pods", &format!("c{i}"), "eth0"), &[])
                .expect("assign");
        }
        assert_eq!(v4_claims(&mut open()), before, "{:?}", next.stats());
    }

    #[test]
    fn nodes_claim_blocks_without_reading_every_claim_until_the_pool_is_full() {
        let dir = tempfile::tempdir().expect("dir");
        // 64 blocks per family: 48 nodes fit, the rest must borrow.
        let pods = pool("10.0.0.0/20", "fd00::/116");
        let mut claims_read = 0;
        let mut seen = HashSet::new();
        for i in 0..80 {
            let store = Counting {
                inner: LocalStore::open(dir.path()).expect("store"),
                claim_ranges: 0,
            };
            let mut a = Allocator::new(store, &format!("node-{i:03}"));
            a.define_pool(&pods).expect("define");
            let rec = a
                .assign(&pods, &HandleId::new("pods", &format!("c{i}"), "eth0"), &[])
                .expect("assign");
            for addr in &rec.addresses {
                assert!(seen.insert(addr.ip), "{} handed out twice", addr.ip);
            }
            let full = i >= 64;
            let stats = a.stats();
            if !full {
                assert_eq!(stats.borrows, 0, "node {i} claimed a block of its own");
                assert_eq!(
                    a.store().claim_ranges,
                    0,
                    "node {i} read every claim of a pool with free blocks"
                );
            }
            claims_read += a.store().claim_ranges;
        }
        // Once every block is claimed, nodes borrow, reading the claims.
        assert!(claims_read > 0, "a full pool's claims were read to borrow");
    }

    fn v4(rec: &HandleRecord) -> IpAddr {
        rec.addresses
            .iter()
            .map(|a| a.ip)
            .find(IpAddr::is_ipv4)
            .expect("an IPv4 address")
    }

    fn holders(store: &mut LocalStore) -> BTreeMap<String, Holder> {
        store
            .range("claims/pods/")
            .expect("claims")
            .into_iter()
            .map(|kv| (kv.key, Holder::parse(&kv.value)))
            .collect()
    }

    #[test]
    fn a_released_address_waits_until_the_block_has_handed_out_the_others() {
        let dir = tempfile::tempdir().expect("dir");
        // One /26 per family: 61 usable IPv4 addresses (not the network,
        // the gateway or the broadcast address).
        let pods = pool("10.0.0.0/26", "fd00::/122");
        let mut a = Allocator::new(LocalStore::open(dir.path()).expect("store"), "node-a");
        a.define_pool(&pods).expect("define");
        let h = |i: usize| HandleId::new("pods", &format!("c{i}"), "eth0");
        let first = v4(&a.assign(&pods, &h(0), &[]).expect("assign"));
        a.release(&h(0)).expect("release");
        let mut given = vec![];
        for i in 1..61 {
            given.push(v4(&a.assign(&pods, &h(i), &[]).expect("assign")));
        }
        assert!(
            !given.contains(&first),
            "{first} handed out again while never-used addresses were left"
        );
        // Only the released one is left: it is handed out now, in the same
        // block (no block claimed for it).
        let last = v4(&a.assign(&pods, &h(61), &[]).expect("assign"));
        assert_eq!(last, first);
        assert_eq!(a.stats().claims, 2, "one block per family");
        // The cursor survives a new run (it is stored with the block).
        a.release(&h(5)).expect("release");
        a.release(&h(9)).expect("release");
        let mut b = Allocator::new(LocalStore::open(dir.path()).expect("store"), "node-a");
        let again = v4(&b.assign(&pods, &h(100), &[]).expect("assign"));
        assert_eq!(
            again, given[4],
            "once wrapped, the block is gone through from its start again"
        );
    }

    #[test]
    fn a_new_allocator_per_call_gives_empty_blocks_back_too() {
        // As plexus-ipam on the local store: a new allocator per call, no
        // cache carried from one to the next.
        let dir = tempfile::tempdir().expect("dir");
        let pods = pool("10.0.0.0/25", "fd00::/121");
        let open = || LocalStore::open(dir.path()).expect("store");
        let call = || {
            let mut a = Allocator::new(open(), "node-a");
            a.define_pool(&pods).expect("define");
            a
        };
        let h = |i: usize| HandleId::new("pods", &format!("c{i}"), "eth0");
        for i in 0..66 {
            call().assign(&pods, &h(i), &[]).expect("assign");
        }
        call().release(&h(0)).expect("release");
        for i in 62..66 {
            call().release(&h(i)).expect("release");
        }
        let back = holders(&mut open())
            .values()
            .filter(|h| matches!(h, Holder::Returned(_)))
            .count();
        assert_eq!(back, 2, "the emptied second block of each family went back");
    }

    #[test]
    fn empty_blocks_go_back_keeping_one_per_family_and_wait_before_a_new_claim() {
        let dir = tempfile::tempdir().expect("dir");
        // Two /26 blocks per family.
        let pods = pool("10.0.0.0/25", "fd00::/121");
        let open = || LocalStore::open(dir.path()).expect("store");
        let mut a = Allocator::new(open(), "node-a");
        a.define_pool(&pods).expect("define");
        let h = |i: usize| HandleId::new("pods", &format!("c{i}"), "eth0");
        // 62 addresses fill the first block of each family; 4 more go to
        // a second.
        for i in 0..66 {
            a.assign(&pods, &h(i), &[]).expect("assign");
        }
        assert_eq!(a.stats().claims, 4, "two blocks per family");
        let second = holders(&mut open());
        // The first blocks get room; the second ones, emptied, go back.
        a.release(&h(0)).expect("release");
        for i in 62..66 {
            a.release(&h(i)).expect("release");
        }
        assert_eq!(a.stats().returned, 2, "{:?}", a.stats());
        let after = holders(&mut open());
        let back: Vec<_> = after
            .iter()
            .filter(|(_, h)| matches!(h, Holder::Returned(_)))
            .map(|(k, _)| k.clone())
            .collect();
        assert_eq!(back.len(), 2, "{after:?}");
        assert!(back.iter().all(|k| second[k].is("node-a")));
        let tail = |k: &str| k.rsplit('/').next().unwrap_or("-").to_string();
        let gone: Vec<String> = back.iter().map(|k| tail(k)).collect();
        assert!(open()
            .range("blocks/pods/node-a/")
            .expect("blocks")
            .iter()
            .all(|kv| !gone.contains(&tail(&kv.key))));
        // Emptied whole, the node keeps one block per family.
        for i in 1..62 {
            a.release(&h(i)).expect("release");
        }
        assert_eq!(a.stats().returned, 2, "the last block of a family stays");
        // Another node finds the given-back block in quarantine: it borrows
        // rather than claim it.
        let mut b = Allocator::new(open(), "node-b");
        let rec = b
            .assign(&pods, &HandleId::new("pods", "b0", "eth0"), &[])
            .expect("assign");
        assert!(
            rec.addresses
                .iter()
                .all(|x| !gone.contains(&tail(&x.block))),
            "{rec:?} is in the block given back"
        );
        assert_eq!(b.stats().claims, 0);
        assert!(b.stats().borrows >= 1);
    }

    #[test]
    fn a_gone_node_is_reclaimed_and_blocks_others_borrowed_from_stay() {
        let dir = tempfile::tempdir().expect("dir");
        // One block per family: node-b borrows from node-a.
        let pods = pool("10.0.0.0/26", "fd00::/122");
        let open = || LocalStore::open(dir.path()).expect("store");
        let mut a = Allocator::new(open(), "node-a");
        a.define_pool(&pods).expect("define");
        for i in 0..3 {
            a.assign(&pods, &HandleId::new("pods", &format!("a{i}"), "eth0"), &[])
                .expect("assign");
        }
        let mut b = Allocator::new(open(), "node-b");
        let bh = HandleId::new("pods", "b0", "eth0");
        let kept = b.assign(&pods, &bh, &[]).expect("assign");
        let mut admin = Allocator::new(open(), "plexusd");
        let done = admin.reclaim("node-a").expect("reclaim");
        assert_eq!(done.handles.len(), 3, "{done:?}");
        assert!(done.blocks.is_empty() && done.kept.len() == 2, "{done:?}");
        assert!(admin
            .lookup(&HandleId::new("pods", "a0", "eth0"))
            .expect("lookup")
            .is_none());
        assert_eq!(admin.lookup(&bh).expect("lookup"), Some(kept.clone()));
        let held: Vec<IpAddr> = admin.allocated(&pods).expect("allocated");
        let mut want: Vec<IpAddr> = kept.addresses.iter().map(|x| x.ip).collect();
        let mut held_sorted = held.clone();
        held_sorted.sort();
        want.sort();
        assert_eq!(held_sorted, want, "only node-b's addresses are held");
        // node-b lets go; the next reclaim gives node-a's blocks back.
        b.release(&bh).expect("release");
        let done = admin.reclaim("node-a").expect("reclaim");
        assert_eq!((done.blocks.len(), done.kept.len()), (2, 0), "{done:?}");
        assert!(holders(&mut open())
            .values()
            .all(|h| matches!(h, Holder::Returned(_))));
        assert!(open()
            .range("blocks/pods/node-a/")
            .expect("blocks")
            .is_empty());
    }
}
