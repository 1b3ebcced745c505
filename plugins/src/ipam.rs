//! `plexus-ipam`: the cluster-wide IPAM as a CNI IPAM plugin, usable by any
//! plugin (`"ipam": {"type": "plexus-ipam", …}`).
//!
//! Per node, under `stateDir`: `lock` serialises this node's IPAM calls (so
//! they never race each other for the node's own blocks), `cache-*.json`
//! keeps the node's blocks between runs (an assignment is then one
//! transaction), and `journal/` holds releases the store could not take: DEL
//! always succeeds, and every later call that reaches the store replays them.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cni::args::CniArgs;
use cni::plugin::{Plugin, Request};
use cni::result::IpConfig;
use cni::{code, CniResult, Error};
use ipam::config::{IpamConf, StoreConf, MAX_RESERVE};
use ipam::store::relay::Relayed;
use ipam::{
    fnv1a, Allocator, EtcdStore, HandleId, HandleRecord, LocalStore, NodeCache, Pool, Store,
};
use ipnetwork::IpNetwork;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

pub struct PlexusIpam;

/// Whether this process's ADDs are of attachments the meta-plugin has
/// recorded its intent for (see [`adding_recorded_attachments`]).
static RECORDED: AtomicBool = AtomicBool::new(false);

/// Called by the meta-plugin once it has recorded its intent to add an
/// attachment and before it runs the delegates, in process. An earlier ADD
/// of the same attachment would have left a record it answers from (or
/// refuses on), so no handle of it can be in the store yet: IPAM may answer
/// from the node's reserve without asking. A runtime calling `plexus-ipam`
/// (or a plugin using it) itself may repeat an ADD, which must get the
/// addresses it got before: the store is asked.
pub fn adding_recorded_attachments() {
    RECORDED.store(true, Ordering::Relaxed);
}

/// How long a call on the local store waits for the node lock; on etcd the
/// store's timeout bounds the wait and the call together.
const LOCK_WAIT: Duration = Duration::from_secs(30);

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(code::INVALID_NETWORK_CONFIG, msg)
}

fn io(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::new(code::IO_FAILURE, format!("{what} {}: {e}", path.display()))
}

/// A release the store could not take, kept until it can.
#[derive(Serialize, Deserialize)]
struct Pending {
    network: String,
    container: String,
    ifname: String,
    /// Which store it belongs to (`Store::describe`).
    store: String,
}

/// What one call asked of its store: round trips, the writes among them
/// (each a durable sync on the local store, a raft commit on etcd), and the
/// time they took.
#[derive(Default)]
struct Counts {
    round_trips: AtomicU64,
    writes: AtomicU64,
    micros: AtomicU64,
    /// Whether the store was reached through the node's store relay.
    relayed: AtomicBool,
}

/// Opens a store when it is first asked something.
type Opener = Box<dyn FnMut() -> Result<Box<dyn Store>, ipam::Error> + Send>;

/// A store that counts what is asked of it into [`Counts`]. An etcd store
/// is opened (connected, or its relay asked) at its first call: an ADD
/// answered from the node's reserve never opens it.
struct Counted {
    inner: Option<Box<dyn Store>>,
    open: Opener,
    name: String,
    counts: Arc<Counts>,
}

impl Counted {
    /// Runs one round trip on the inner store, counted and timed.
    fn count<T>(
        &mut self,
        call: impl FnOnce(&mut dyn Store) -> Result<T, ipam::Error>,
    ) -> Result<T, ipam::Error> {
        let started = Instant::now();
        let inner = match &mut self.inner {
            Some(inner) => inner,
            None => self.inner.insert((self.open)()?),
        };
        let out = call(inner.as_mut());
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.counts.round_trips.fetch_add(1, Ordering::Relaxed);
        self.counts.micros.fetch_add(us, Ordering::Relaxed);
        out
    }
}

impl Store for Counted {
    fn get(&mut self, key: &str) -> Result<Option<ipam::store::Kv>, ipam::Error> {
        self.count(|s| s.get(key))
    }
    fn get_many(&mut self, keys: &[String]) -> Result<Vec<ipam::store::Kv>, ipam::Error> {
        self.count(|s| s.get_many(keys))
    }
    fn range(&mut self, prefix: &str) -> Result<Vec<ipam::store::Kv>, ipam::Error> {
        self.count(|s| s.range(prefix))
    }
    fn txn(&mut self, txn: ipam::store::Txn) -> Result<ipam::store::TxnOutcome, ipam::Error> {
        let out = self.count(|s| s.txn(txn));
        if out.as_ref().is_ok_and(|o| o.succeeded) {
            self.counts.writes.fetch_add(1, Ordering::Relaxed);
        }
        out
    }
    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// One call's view: the config, the node's state dir, held locked.
struct Node {
    conf: IpamConf,
    dir: PathBuf,
    _lock: Flock<File>,
    started: Instant,
    counts: Arc<Counts>,
}

/// The call's `ipam` section.
fn section(req: &Request) -> Result<&serde_json::Value, Error> {
    req.conf
        .ipam
        .as_ref()
        .ok_or_else(|| invalid("plexus-ipam needs an \"ipam\" section"))
}

impl Node {
    fn open(section: &serde_json::Value) -> Result<Node, Error> {
        let started = Instant::now();
        let conf = IpamConf::from_section(section)?;
        let dir = conf.state_dir();
        fs::create_dir_all(dir.join("journal")).map_err(|e| io("create", &dir, e))?;
        let lock_path = dir.join("lock");
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io("open", &lock_path, e))?;
        let wait = match &conf.store {
            Some(StoreConf::Etcd(etcd)) => etcd.timeout(),
            _ => LOCK_WAIT,
        };
        let lock = loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(l) => break l,
                Err((f, nix::errno::Errno::EWOULDBLOCK)) if started.elapsed() < wait => {
                    file = f;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err((_, e)) => {
                    return Err(Error::new(
                        code::TRY_AGAIN_LATER,
                        format!("node IPAM lock {} is held: {e}", lock_path.display()),
                    ))
                }
            }
        };
        Ok(Node {
            conf,
            dir,
            _lock: lock,
            started,
            counts: Arc::default(),
        })
    }

    /// The call's store, counted; an etcd one opened at its first call.
    fn store(&self) -> Result<Counted, ipam::Error> {
        let counts = self.counts.clone();
        // Open already: nothing is left to open.
        let local = |store: LocalStore| {
            Ok(Counted {
                name: store.describe(),
                inner: Some(Box::new(store)),
                open: Box::new(|| Err(ipam::Error::Store("the local store is open".into()))),
                counts: counts.clone(),
            })
        };
        match &self.conf.store {
            Some(StoreConf::Etcd(etcd)) => {
                let deadline = self.started + etcd.timeout();
                let name = ipam::store::etcd::describe(&etcd.endpoints, &etcd.prefix);
                let etcd = etcd.clone();
                let relayed = self.counts.clone();
                let open: Opener = Box::new(move || {
                    Ok(match &etcd.relay {
                        Some(socket) => {
                            let store = Relayed::open(socket, &etcd, deadline);
                            relayed
                                .relayed
                                .store(store.through_relay(), Ordering::Relaxed);
                            Box::new(store)
                        }
                        None => Box::new(EtcdStore::connect_shared(&etcd)?.with_deadline(deadline)),
                    })
                });
                Ok(Counted {
                    inner: None,
                    open,
                    name,
                    counts,
                })
            }
            Some(StoreConf::Local { path: Some(p) }) => local(LocalStore::open(p)?),
            Some(StoreConf::Local { path: None }) | None => {
                local(LocalStore::open(&self.dir.join("store"))?)
            }
        }
    }

    fn cache_path(&self, store: &str) -> PathBuf {
        self.dir
            .join(format!("cache-{:016x}.json", fnv1a(&[store.as_bytes()])))
    }

    /// The allocator for this node, its cache loaded.
    fn allocator(&self) -> Result<Allocator<Box<dyn Store>>, Error> {
        Ok(self.try_allocator()?)
    }

    fn try_allocator(&self) -> Result<Allocator<Box<dyn Store>>, ipam::Error> {
        let node = self.conf.node()?;
        let store: Box<dyn Store> = Box::new(self.store()?);
        // A local store is read from memory: no cache to keep beside it.
        let reserve = match &self.conf.store {
            Some(StoreConf::Etcd(etcd)) => etcd.reserve(),
            _ => return Ok(Allocator::new(store, &node)),
        };
        let cache: NodeCache = fs::read(self.cache_path(&store.describe()))
            .ok()
            .and_then(|raw| cache_body(&raw).and_then(|b| serde_json::from_slice(b).ok()))
            .unwrap_or_default();
        Ok(Allocator::new(store, &node)
            .with_cache(cache)
            .with_reserve(reserve.min(MAX_RESERVE)))
    }

    fn on_etcd(&self) -> bool {
        matches!(self.conf.store, Some(StoreConf::Etcd(_)))
    }

    /// Saves the node's cache. Most of it is only a cache of the store,
    /// written over in place behind its checksum: one cut short (or spliced
    /// with the one before) is not read, and the store is read instead
    /// (replacing it by rename costs the filesystem more). Assignments
    /// handed out from the reserve and not yet published are known only
    /// here: a cache holding any is replaced whole, and not saving it is an
    /// error.
    fn save(&self, alloc: &mut Allocator<Box<dyn Store>>) -> std::io::Result<()> {
        if !self.on_etcd() {
            return Ok(());
        }
        let path = self.cache_path(&alloc.store().describe());
        let whole = alloc.cache().values().any(|c| !c.unpublished.is_empty());
        let written = serde_json::to_vec(alloc.cache())
            .map_err(std::io::Error::other)
            .map(|body| {
                let mut raw = format!("{:016x}\n", fnv1a(&[&body])).into_bytes();
                raw.extend_from_slice(&body);
                raw
            })
            .and_then(|raw| {
                if whole {
                    return cni::cache::replace(&path, &raw);
                }
                let f = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)?;
                f.write_all_at(&raw, 0)?;
                f.set_len(raw.len() as u64)
            });
        if let Err(e) = &written {
            warn!(error = %e, path = %path.display(), "IPAM cache not saved");
        }
        written
    }

    fn journal_path(&self, h: &HandleId) -> PathBuf {
        let safe: String = h
            .id()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join("journal").join(format!("{safe}.json"))
    }

    /// Replays pending releases of this store; keeps what still fails.
    fn replay(&self, alloc: &mut Allocator<Box<dyn Store>>) {
        let Ok(entries) = fs::read_dir(self.dir.join("journal")) else {
            return;
        };
        let store = alloc.store().describe();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(p) = fs::read(&path)
                .ok()
                .and_then(|raw| serde_json::from_slice::<Pending>(&raw).ok())
            else {
                continue;
            };
            if p.store != store {
                continue;
            }
            match alloc.release(&HandleId::new(&p.network, &p.container, &p.ifname)) {
                Ok(_) => {
                    let _ = fs::remove_file(&path);
                }
                Err(e) => warn!(error = %e, "journaled release still fails"),
            }
        }
    }
}

/// The node cache file's body, when its checksum line matches it.
fn cache_body(raw: &[u8]) -> Option<&[u8]> {
    let nl = raw.iter().position(|b| *b == b'\n')?;
    let sum = u64::from_str_radix(std::str::from_utf8(&raw[..nl]).ok()?, 16).ok()?;
    let body = &raw[nl + 1..];
    (fnv1a(&[body]) == sum).then_some(body)
}

fn handle(req: &Request) -> HandleId {
    HandleId::new(&req.conf.name, &req.container_id, &req.ifname)
}

/// The pool of this network: defined by the config, or named and stored.
fn pool(
    conf: &IpamConf,
    network: &str,
    alloc: &mut Allocator<Box<dyn Store>>,
) -> Result<Pool, Error> {
    match conf.defined_pool(network)? {
        Some(p) => {
            alloc.define_pool(&p)?;
            Ok(p)
        }
        None => match &conf.pool {
            Some(name) => Ok(alloc.pool(name)?),
            None => Err(invalid(
                "plexus-ipam needs \"ranges\" (host-local's shape), \"subnet\", or a \"pool\" name",
            )),
        },
    }
}

/// Static addresses asked for: the `ips` capability, `args.cni.ips`, and
/// `IP=` in `CNI_ARGS` (comma-separated), each with or without a prefix.
fn requested(req: &Request) -> Result<Vec<IpAddr>, Error> {
    let mut raw: Vec<String> = Vec::new();
    if let Some(ips) = req.conf.runtime_config.as_ref().and_then(|r| r.ips.clone()) {
        raw.extend(ips);
    }
    if let Some(ips) = req
        .conf
        .extra
        .get("args")
        .and_then(|a| a.pointer("/cni/ips"))
        .and_then(|v| v.as_array())
    {
        raw.extend(ips.iter().filter_map(|v| v.as_str().map(String::from)));
    }
    if let Some(ip) = CniArgs::parse(&req.args)?.get("IP") {
        raw.extend(ip.split(',').map(String::from));
    }
    let mut out: Vec<IpAddr> = Vec::new();
    for r in raw.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let ip = r
            .parse::<IpNetwork>()
            .map(|n| n.ip())
            .or_else(|_| r.parse::<IpAddr>())
            .map_err(|_| invalid(format!("requested address {r:?} is not an IP address")))?;
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

fn result(pool: &Pool, record: &HandleRecord) -> Result<CniResult, Error> {
    let mut res = CniResult::default();
    for a in &record.addresses {
        let range = pool.range_of(a.ip).ok_or_else(|| {
            Error::new(
                code::INTERNAL,
                format!("{} is outside pool {}", a.ip, pool.name),
            )
        })?;
        let address = IpNetwork::new(a.ip, range.subnet.prefix())
            .map_err(|e| Error::new(code::INTERNAL, e.to_string()))?;
        res.ips.push(IpConfig {
            interface: None,
            address,
            gateway: Some(range.gateway()),
        });
    }
    res.routes = pool.cni_routes();
    Ok(res)
}

impl Plugin for PlexusIpam {
    fn add(&self, req: &Request) -> Result<CniResult, Error> {
        let section = section(req)?;
        let node = Node::open(section)?;
        if let Some(StoreConf::Etcd(etcd)) = &node.conf.store {
            if etcd.reserve() > MAX_RESERVE {
                return Err(invalid(format!(
                    "\"ipam\": store \"reserve\" {} is over {MAX_RESERVE}",
                    etcd.reserve()
                )));
            }
        }
        let requested = requested(req)?;
        let mut alloc = node.allocator()?;
        let h = handle(req);
        let pool = pool(&node.conf, &req.conf.name, &mut alloc)?;
        // On etcd, from the node's reserve when no earlier ADD of this
        // attachment can hold addresses ([`adding_recorded_attachments`])
        // and no release of it waits in the journal: no store round trip,
        // and the handle is published once ADD has answered.
        let fresh = RECORDED.load(Ordering::Relaxed) && !node.journal_path(&h).exists();
        let reserved = match node.on_etcd() && requested.is_empty() && fresh {
            true => alloc.take_reserved(&pool, &h),
            false => None,
        };
        let from_reserve = reserved.is_some();
        let assigned = match reserved {
            Some(record) => Ok(record),
            None => {
                node.replay(&mut alloc);
                alloc.assign(&pool, &h, &requested).map_err(Error::from)
            }
        };
        crate::crash::point("ipam.assigned");
        let saved = node.save(&mut alloc);
        crate::crash::point("ipam.cache-saved");
        if from_reserve {
            // Known nowhere else: not saved, not handed out.
            saved.map_err(|e| io("save the IPAM cache in", &node.dir, e))?;
        }
        node.report("ADD", from_reserve);
        // The reserve is kept for the meta-plugin's ADDs only.
        if node.on_etcd() && alloc.to_publish(fresh) {
            start_publisher(section);
        }
        result(&pool, &assigned?)
    }

    fn del(&self, req: &Request) -> Result<(), Error> {
        let section = section(req)?;
        let node = Node::open(section)?;
        let h = handle(req);
        let released = node.try_allocator().and_then(|mut alloc| {
            let had = alloc.has_unpublished();
            alloc.release(&h)?;
            crate::crash::point("ipam.released");
            node.replay(&mut alloc);
            // What waits to be published is known only here: a cache that
            // cannot say what DEL did fails it (the runtime tries again).
            if let Err(e) = node.save(&mut alloc) {
                if had || alloc.has_unpublished() {
                    return Err(ipam::Error::Store(format!(
                        "IPAM cache in {} not saved: {e}",
                        node.dir.display()
                    )));
                }
            }
            node.report("DEL", false);
            if node.on_etcd() && alloc.to_publish(alloc.keeps_reserve()) {
                start_publisher(section);
            }
            Ok(())
        });
        match released {
            Ok(()) => Ok(()),
            // DEL succeeds: the release waits in the journal for the store.
            Err(e @ ipam::Error::Unreachable { .. }) => journal(&node, &h, e.into()),
            Err(e) => Err(e.into()),
        }
    }

    fn check(&self, req: &Request) -> Result<(), Error> {
        let node = Node::open(section(req)?)?;
        let mut alloc = node.allocator()?;
        let h = handle(req);
        let record = alloc
            .lookup(&h)?
            .ok_or_else(|| Error::new(100, format!("no addresses are assigned to {h}")))?;
        if let Some(prev) = &req.conf.prev_result {
            let (_, prev) = CniResult::from_json(prev)?;
            let have: HashSet<IpAddr> = record.addresses.iter().map(|a| a.ip).collect();
            for ip in &prev.ips {
                if !have.contains(&ip.address.ip()) {
                    return Err(Error::new(
                        100,
                        format!(
                            "{} is not assigned to {h} (it holds {have:?})",
                            ip.address.ip()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn gc(&self, req: &Request) -> Result<(), Error> {
        let node = Node::open(section(req)?)?;
        let mut alloc = node.allocator()?;
        node.replay(&mut alloc);
        let valid = req.conf.valid_pairs();
        let released = alloc.gc(&req.conf.name, |h| {
            valid.contains(&(h.container.clone(), h.ifname.clone()))
        });
        if released.is_ok() && node.on_etcd() && alloc.to_publish(false) {
            if let Err(e) = alloc.publish() {
                warn!(error = %e, "IPAM assignments from the reserve not published");
            }
        }
        let _ = node.save(&mut alloc);
        released.map(|_| ()).map_err(Error::from)
    }

    /// Ready when the store answers and the pool is usable: a read of the
    /// pool's key, never only the node's cache.
    fn status(&self, req: &Request) -> Result<(), Error> {
        let unavailable = |e: Error| Error {
            code: code::PLUGIN_NOT_AVAILABLE,
            ..e
        };
        let node = Node::open(section(req)?)?;
        let mut alloc = node.allocator().map_err(unavailable)?;
        let pool = pool(&node.conf, &req.conf.name, &mut alloc).map_err(unavailable)?;
        alloc
            .store()
            .get(&ipam::block::pool_key(&pool.name))
            .map(|_| ())
            .map_err(|e| unavailable(e.into()))
    }
}

/// The argument that makes `plexus` the IPAM's publisher.
pub const PUBLISH_ARG: &str = "publish-ipam";

/// What the publisher reads on stdin: the call's `ipam` section, and how the
/// call logged.
#[derive(Serialize, Deserialize)]
struct PublishJob {
    ipam: serde_json::Value,
    #[serde(default)]
    log: Option<crate::log::LogConf>,
}

/// Starts `plexus publish-ipam`, which writes the handles handed out from
/// the reserve and tops the reserve up once this call has answered: the
/// runtime does not wait for an etcd commit. It takes the node lock, so it
/// runs after this call; what it cannot write waits for the next call that
/// starts one.
fn start_publisher(section: &serde_json::Value) {
    let job = PublishJob {
        ipam: section.clone(),
        log: crate::log::current(),
    };
    let Ok(raw) = serde_json::to_vec(&job) else {
        return;
    };
    let started = crate::detached::command(PUBLISH_ARG)
        .stdin(Stdio::piped())
        .spawn();
    match started {
        // Not waited for: it outlives this call.
        Ok(mut child) => {
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(&raw);
            }
        }
        Err(e) => warn!(error = %e,
            "IPAM publisher not started: the next call that starts one publishes"),
    }
}

/// `plexus publish-ipam`: publishes what the node's reserve handed out and
/// tops the reserve up (see [`start_publisher`]). One publisher works per
/// node at a time (`stateDir/publishing`, locked); one started while
/// another works leaves it the work, which it looks for again after it lets
/// go of that lock.
pub fn publish_main() -> ExitCode {
    let job: PublishJob = match crate::detached::job(PUBLISH_ARG, "plexus-ipam") {
        Ok(job) => job,
        Err(code) => return code,
    };
    if let Some(log) = &job.log {
        crate::log::init(log);
    }
    let span = tracing::info_span!("publish-ipam");
    let _entered = span.enter();
    let section = job.ipam;
    let status = publish(&section);
    // Its own high-water mark, for the bench (a Plexus process of its runs).
    debug!(peak_rss_kb = peak_rss_kb(), "IPAM publisher done");
    status
}

/// This process's peak RSS (VmHWM), in KiB.
fn peak_rss_kb() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The publisher's work (see [`publish_main`]).
fn publish(section: &serde_json::Value) -> ExitCode {
    let Ok(conf) = IpamConf::from_section(section) else {
        return ExitCode::from(2);
    };
    let path = conf.state_dir().join("publishing");
    for _ in 0..PUBLISH_ROUNDS {
        let Ok(file) = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
        else {
            return ExitCode::FAILURE;
        };
        let Ok(mine) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
            // Another publisher works, and looks again once done.
            return ExitCode::SUCCESS;
        };
        let mut failed = None;
        for _ in 0..PUBLISH_ROUNDS {
            match publish_round(section) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(mine);
        if let Some(e) = failed {
            warn!(code = e.code, error = %e.msg,
                "IPAM assignments from the reserve not published: the next publisher tries again");
            return ExitCode::FAILURE;
        }
        // Handed out while this one held the lock, by a call whose own
        // publisher left the work to it.
        let waiting = Node::open(section)
            .and_then(|node| Ok(node.allocator()?.has_unpublished()))
            .unwrap_or(false);
        if !waiting {
            return ExitCode::SUCCESS;
        }
    }
    ExitCode::SUCCESS
}

/// Rounds of publishing one publisher makes at most.
const PUBLISH_ROUNDS: usize = 8;

/// One round: what to write is prepared under the node lock (and saved),
/// the store is asked with the lock let go (calls on the node do not wait
/// for an etcd commit, nor for etcd's timeout when it is down), and its
/// answer applied under the lock again. Whether another round is wanted.
fn publish_round(section: &serde_json::Value) -> Result<bool, Error> {
    let node = Node::open(section)?;
    let mut alloc = node.allocator()?;
    node.replay(&mut alloc);
    let publications = alloc.prepare_publish()?;
    node.save(&mut alloc)
        .map_err(|e| io("save the IPAM cache in", &node.dir, e))?;
    if publications.is_empty() {
        return Ok(false);
    }
    drop(node);
    let mut answers = Vec::new();
    let mut failed = None;
    for p in &publications {
        match failed {
            // Not sent: the store is not reached.
            Some(_) => answers.push(None),
            None => match alloc.send(p) {
                Ok(out) => answers.push(Some(out)),
                Err(e) => {
                    answers.push(None);
                    failed = Some(e);
                }
            },
        }
    }
    let node = Node::open(section)?;
    let mut fresh = node.allocator()?;
    let mut again = false;
    for (p, out) in publications.into_iter().zip(answers) {
        let (_, landed) = fresh.apply_publication(p, out.as_ref())?;
        again |= !landed;
    }
    let saved = node.save(&mut fresh);
    node.report("publish", false);
    saved.map_err(|e| io("save the IPAM cache in", &node.dir, e))?;
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(again || fresh.has_unpublished()),
    }
}

/// Keeps a release the store could not take; DEL succeeds.
fn journal(node: &Node, h: &HandleId, e: Error) -> Result<(), Error> {
    let store = match node.store_name() {
        Some(s) => s,
        None => return Err(e),
    };
    let pending = Pending {
        network: h.network.clone(),
        container: h.container.clone(),
        ifname: h.ifname.clone(),
        store,
    };
    let path = node.journal_path(h);
    let raw = serde_json::to_vec(&pending).map_err(|e| io("encode", &path, e))?;
    fs::write(&path, raw).map_err(|e| io("write", &path, e))?;
    warn!(handle = %h, error = %e.msg, "store unreachable: release journaled");
    Ok(())
}

impl Node {
    /// The call's one debug line: what it asked of the store, and its time
    /// (the bench's breakdown reads these fields).
    fn report(&self, cmd: &str, from_reserve: bool) {
        let c = &self.counts;
        debug!(
            store = match (self.on_etcd(), c.relayed.load(Ordering::Relaxed)) {
                _ if from_reserve => "the node's reserve",
                (false, _) => "local",
                (true, false) => "etcd",
                (true, true) => "etcd via the relay",
            },
            round_trips = c.round_trips.load(Ordering::Relaxed),
            writes = c.writes.load(Ordering::Relaxed),
            store_ms = c.micros.load(Ordering::Relaxed) as f64 / 1e3,
            duration_ms = crate::log::ms_since(self.started),
            "IPAM {cmd} done"
        );
    }

    /// The store's description without connecting (for the journal).
    fn store_name(&self) -> Option<String> {
        match &self.conf.store {
            Some(StoreConf::Etcd(etcd)) => {
                Some(ipam::store::etcd::describe(&etcd.endpoints, &etcd.prefix))
            }
            // A local store is always reachable: nothing to journal.
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::cache_body;
    use ipam::fnv1a;

    #[test]
    fn the_node_cache_is_read_only_whole() {
        let body = br#"{"blocks":{"a":[7,{"w":[1,2]}]}}"#;
        let mut raw = format!("{:016x}\n", fnv1a(&[body])).into_bytes();
        raw.extend_from_slice(body);
        assert_eq!(cache_body(&raw), Some(&body[..]));
        // Cut short, spliced with an older one, or without its checksum.
        assert_eq!(cache_body(&raw[..raw.len() - 3]), None);
        let mut spliced = raw.clone();
        let at = spliced.len() - 6;
        spliced[at] = b'9';
        assert_eq!(cache_body(&spliced), None);
        assert_eq!(cache_body(body), None);
        assert_eq!(cache_body(b""), None);
    }
}
