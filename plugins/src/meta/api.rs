//! The central API's etcd as a node uses it: definitions read in one
//! transaction per ADD (the local copy stands in when etcd is unreachable),
//! and writes of the node's own Attachment records.
//!
//! One call connects at most once, and only when it needs etcd. Once etcd has
//! not answered within `timeoutSeconds`, the rest of the call does not wait
//! for it again. What a read returned is kept in the local copy after the
//! read, not on its path (see [`PendingCopy`]).
//!
//! ADD does not wait for its read when the local copy has every part it
//! needs: it plans from the copy while the read runs beside the delegates,
//! and [`Api::confirm`] compares the two before ADD answers. When they differ
//! ADD undoes what it attached and starts again from what etcd holds, so an
//! ADD's outcome is always that of definitions read during it. Until it
//! answers, the pod runs nothing that could use what it briefly had.

use std::path::Path;

use cni::{code, Error};
use conf::api::{CLUSTER_NETWORK, NAD, PREFIX, SECURITY_GROUP};
use conf::Definitions;
use ipam::config::EtcdConf;
use ipam::store::etcd::{describe, EtcdStore};
use ipam::store::relay::Relayed;
use ipam::store::{Kv, Store, Txn};
use serde_json::Value;
use tracing::{debug, warn};

use super::copy::{self, LocalCopy};
use super::plan::Source;

/// Operations per transaction: etcd refuses more than 128 by default.
const MAX_TXN_OPS: usize = 128;

/// One call's access to the API's etcd.
pub struct Api {
    conf: EtcdConf,
    copy: LocalCopy,
    /// What was read and not yet kept in the local copy.
    unsaved: PendingCopy,
    store: Option<EtcdStore>,
    /// Why etcd did not answer earlier in this call.
    unreachable: Option<String>,
    /// Set when the definitions came from the local copy: why, for errors.
    stale: Option<String>,
    /// Never ask etcd for definitions (DEL without a record).
    offline: bool,
    /// Plan from the local copy while etcd is read (ADD; see the module).
    speculate: bool,
    /// No etcd call of this `Api` returns later (connection included).
    deadline: Option<std::time::Instant>,
    /// That read, running.
    pending: Option<Speculation>,
}

/// A read of etcd running beside an ADD planned from the local copy.
struct Speculation {
    /// The parts read, as the copy names them (`None`: the ClusterNetworks).
    parts: Vec<Option<String>>,
    /// What the copy held of each.
    copied: Vec<Vec<Value>>,
    /// When the oldest of them was read (seconds since the epoch).
    read_at: u64,
    read: std::thread::JoinHandle<Result<Vec<Vec<Kv>>, ipam::Error>>,
}

/// What etcd said of definitions an ADD was planned from.
pub enum Confirmed {
    /// The same.
    Same,
    /// They changed meanwhile: ADD starts again from etcd.
    Changed,
    /// Etcd is unreachable: the copy stands, as it would have had ADD
    /// waited for the read.
    Unreachable,
}

/// A key under [`PREFIX`] as the store takes it.
fn relative(key: &str) -> &str {
    key.strip_prefix(PREFIX).unwrap_or(key)
}

fn store_error(e: ipam::Error) -> Error {
    match e {
        ipam::Error::Config(msg) => Error::new(code::INVALID_NETWORK_CONFIG, format!("api: {msg}")),
        e => e.into(),
    }
}

impl Api {
    pub fn new(conf: &EtcdConf, cache_dir: &Path) -> Api {
        let copy = LocalCopy::new(cache_dir);
        Api {
            conf: conf.clone(),
            unsaved: PendingCopy::new(&copy),
            copy,
            store: None,
            unreachable: None,
            stale: None,
            offline: false,
            speculate: false,
            pending: None,
            deadline: None,
        }
    }

    /// No etcd call returns after `deadline`.
    pub fn with_deadline(mut self, deadline: std::time::Instant) -> Api {
        self.deadline = Some(deadline);
        self
    }

    /// ADD: plan from the local copy while etcd is read, when the copy has
    /// what is needed (see the module).
    pub fn speculative(&mut self) {
        self.speculate = true;
    }

    /// What this call read and has not kept in the local copy yet, for the
    /// caller to save when it has a moment (else it is saved when the call's
    /// `Api` goes).
    pub fn take_copy(&mut self) -> PendingCopy {
        std::mem::replace(&mut self.unsaved, PendingCopy::new(&self.copy))
    }

    /// From now on, definitions come from the local copy only.
    pub fn offline(&mut self) {
        self.offline = true;
    }

    /// `etcd at <endpoints> (prefix /plexus/api/)`.
    pub fn describe(&self) -> String {
        describe(&self.conf.endpoints, &self.conf.prefix)
    }

    /// Why etcd did not answer in this call, if it did not.
    pub fn unreachable(&self) -> Option<&str> {
        self.unreachable.as_deref()
    }

    /// Runs `op` on the connection (made on first use); remembers when etcd
    /// is unreachable so that no later step of the call waits for it again.
    fn run<T>(
        &mut self,
        op: impl FnOnce(&mut EtcdStore) -> Result<T, ipam::Error>,
    ) -> Result<T, ipam::Error> {
        if let Some(why) = &self.unreachable {
            return Err(ipam::Error::Unreachable {
                store: self.describe(),
                detail: why.clone(),
            });
        }
        let store = match self.store.take() {
            Some(s) => s,
            None => match EtcdStore::connect_shared(&self.conf) {
                Ok(s) => match self.deadline {
                    Some(d) => s.with_deadline(d),
                    None => s,
                },
                Err(e) => {
                    self.note(&e);
                    return Err(e);
                }
            },
        };
        let done = op(self.store.insert(store));
        if let Err(e) = &done {
            self.note(e);
        }
        done
    }

    fn note(&mut self, e: &ipam::Error) {
        if let ipam::Error::Unreachable { detail, .. } = e {
            self.unreachable = Some(detail.clone());
        }
    }

    /// Every key under `prefix` (a full key under [`PREFIX`]).
    pub fn range(&mut self, prefix: &str) -> Result<Vec<Kv>, ipam::Error> {
        self.run(|s| s.range(relative(prefix)))
    }

    /// Puts (full key, JSON text) then deletes (full keys), in as few
    /// transactions as etcd takes; no key may come twice.
    pub fn write(
        &mut self,
        puts: Vec<(String, String)>,
        deletes: Vec<String>,
    ) -> Result<(), ipam::Error> {
        let mut txns: Vec<Txn> = Vec::new();
        for (key, value) in puts {
            next(&mut txns).success.push(ipam::store::Op::Put(
                relative(&key).to_string(),
                value.into_bytes(),
            ));
        }
        for key in deletes {
            next(&mut txns)
                .success
                .push(ipam::store::Op::Delete(relative(&key).to_string()));
        }
        for txn in txns {
            self.run(|s| s.txn(txn))?;
        }
        Ok(())
    }

    /// The store keys of the ClusterNetworks, and of the NADs and
    /// SecurityGroups of `namespaces` (`None`: all).
    fn prefixes(namespaces: Option<&[String]>) -> Vec<String> {
        let of: Vec<Option<&str>> = match namespaces {
            Some(list) => list.iter().map(|ns| Some(ns.as_str())).collect(),
            None => vec![None],
        };
        // Per namespace, its NADs and its SecurityGroups: one part of the
        // copy (see [`parts`]).
        std::iter::once(CLUSTER_NETWORK.prefix(None))
            .chain(
                of.into_iter()
                    .flat_map(|ns| [NAD.prefix(ns), SECURITY_GROUP.prefix(ns)]),
            )
            .map(|p| relative(&p).to_string())
            .collect()
    }

    /// Starts reading the ClusterNetworks and `namespaces`' NADs and
    /// SecurityGroups on a thread
    /// of its own (and a connection of its own: the in-process IPAM uses the
    /// shared one meanwhile), when the copy has each of them; returns the
    /// copy's.
    fn start_speculation(&mut self, namespaces: &[String]) -> Option<copy::Read> {
        let parts: Vec<Option<String>> = std::iter::once(None)
            .chain(namespaces.iter().cloned().map(Some))
            .collect();
        let loaded: Vec<(u64, Vec<Value>)> = parts
            .iter()
            .map(|p| self.copy.load_one(p.as_deref()))
            .collect::<Option<_>>()?;
        let read_at = loaded.iter().map(|(t, _)| *t).min().unwrap_or_default();
        let copied: Vec<Vec<Value>> = loaded.into_iter().map(|(_, o)| o).collect();
        let conf = self.conf.clone();
        let prefixes = Api::prefixes(Some(namespaces));
        let span = tracing::Span::current();
        let read = std::thread::Builder::new()
            .name("api-read".into())
            .spawn(move || {
                let _entered = span.enter();
                let prefixes: Vec<&str> = prefixes.iter().map(String::as_str).collect();
                let started = std::time::Instant::now();
                let (read, via) = match &conf.relay {
                    // The node's relay has a connection open already.
                    Some(socket) => {
                        let mut relayed = Relayed::open(socket, &conf, started + conf.timeout());
                        let read = relayed.ranges(&prefixes);
                        let via = if relayed.through_relay() {
                            "etcd via the relay"
                        } else {
                            "etcd"
                        };
                        (read, via)
                    }
                    None => (
                        EtcdStore::connect(&conf).and_then(|mut s| s.ranges(&prefixes)),
                        "etcd",
                    ),
                };
                debug!(
                    store = via,
                    duration_ms = crate::log::ms_since(started),
                    "definitions read beside the delegates"
                );
                read
            })
            .ok()?;
        let mut out = copy::Read {
            cluster_networks: copied[0].clone(),
            ..Default::default()
        };
        for objects in &copied[1..] {
            out.nads.extend(objects.iter().cloned());
        }
        self.pending = Some(Speculation {
            parts,
            copied,
            read_at,
            read,
        });
        Some(out)
    }

    /// Whether the definitions ADD was planned from are what etcd holds
    /// (always, when it was not planned from the copy). An error is one no
    /// retry cures (a refused TLS identity, say), as a read's would be.
    pub fn confirm(&mut self) -> Result<Confirmed, Error> {
        let Some(spec) = self.pending.take() else {
            return Ok(Confirmed::Same);
        };
        let read = spec.read.join().unwrap_or_else(|_| {
            Err(ipam::Error::Store(
                "the read of the definitions panicked".into(),
            ))
        });
        match read {
            Ok(ranges) => {
                let fresh = parts(ranges);
                let same = fresh == spec.copied;
                self.unsaved.parts.extend(spec.parts.into_iter().zip(fresh));
                if !same {
                    // The copy is stale: the next plan falls back on what
                    // was just read, should etcd go away in between.
                    self.unsaved.flush();
                }
                Ok(if same {
                    Confirmed::Same
                } else {
                    Confirmed::Changed
                })
            }
            Err(e @ ipam::Error::Unreachable { .. }) => {
                let age = copy::now().saturating_sub(spec.read_at);
                warn!(error = %e, copy = %self.copy.dir().display(), age = %format!("read {age}s ago"),
                    "etcd of the API is unreachable: using the local copy of the definitions");
                self.note(&e);
                self.stale = Some(e.to_string());
                Ok(Confirmed::Unreachable)
            }
            Err(e) => Err(store_error(e).context("reading network definitions")),
        }
    }

    /// ClusterNetworks and the NADs of `namespaces` (`None`: all), in one
    /// transaction; what was read of a namespace is kept in the local copy.
    fn read(&mut self, namespaces: Option<&[String]>) -> Result<copy::Read, ipam::Error> {
        let prefixes = Api::prefixes(namespaces);
        let prefixes: Vec<&str> = prefixes.iter().map(String::as_str).collect();
        let mut ranges = parts(self.run(|s| s.ranges(&prefixes))?).into_iter();
        let cluster_networks = ranges.next().unwrap_or_default();
        self.unsaved.parts.push((None, cluster_networks.clone()));
        let mut read = copy::Read {
            cluster_networks,
            read_at: Some(copy::now()),
            ..Default::default()
        };
        for (i, nads) in ranges.enumerate() {
            // A read of every namespace is GC's; it keeps no copy (an absent
            // namespace would leave its old file behind).
            if let Some(ns) = namespaces.and_then(|list| list.get(i)) {
                self.unsaved.parts.push((Some(ns.clone()), nads.clone()));
            }
            read.nads.extend(nads);
        }
        Ok(read)
    }
}

/// Definitions read from etcd, to be kept in the local copy: off the path
/// of the read (the copy is only the fallback of later calls), saved by
/// [`PendingCopy::save`] or when dropped.
pub struct PendingCopy {
    copy: LocalCopy,
    /// The ClusterNetworks (`None`) and the NADs of each namespace read.
    parts: Vec<(Option<String>, Vec<Value>)>,
}

impl PendingCopy {
    fn new(copy: &LocalCopy) -> PendingCopy {
        PendingCopy {
            copy: copy.clone(),
            parts: Vec::new(),
        }
    }

    /// Keeps what was read in the local copy.
    pub fn save(mut self) {
        self.flush();
    }

    fn flush(&mut self) {
        for (namespace, objects) in self.parts.drain(..) {
            self.copy.save(namespace.as_deref(), &objects);
        }
    }
}

impl Drop for PendingCopy {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The ranges of [`Api::prefixes`] as the parts the copy keeps: the
/// ClusterNetworks, then per namespace its NADs and SecurityGroups together.
fn parts(ranges: Vec<Vec<Kv>>) -> Vec<Vec<Value>> {
    let mut ranges = ranges.into_iter();
    let mut out = vec![objects(ranges.next().unwrap_or_default())];
    while let Some(nads) = ranges.next() {
        let mut part = objects(nads);
        part.extend(objects(ranges.next().unwrap_or_default()));
        out.push(part);
    }
    out
}

/// The next transaction with room for one more operation.
fn next(txns: &mut Vec<Txn>) -> &mut Txn {
    if !matches!(txns.last(), Some(t) if t.success.len() < MAX_TXN_OPS) {
        txns.push(Txn::default());
    }
    let last = txns.len() - 1;
    &mut txns[last]
}

/// The JSON objects of a range; a value that is not one is skipped, loudly
/// (`plexusd` validates what it stores, so it was written by hand).
fn objects(kvs: Vec<Kv>) -> Vec<Value> {
    kvs.into_iter()
        .filter_map(|kv| match serde_json::from_slice::<Value>(&kv.value) {
            Ok(v @ Value::Object(_)) => Some(v),
            _ => {
                warn!(key = %kv.key, "API object is not a JSON object: ignored");
                None
            }
        })
        .collect()
}

impl Source for Api {
    fn load(&mut self, namespaces: Option<&[String]>) -> Result<Definitions, Error> {
        for ns in namespaces.unwrap_or_default() {
            // Namespaces name keys and copy files: nothing but DNS labels.
            if !conf::api::is_dns_label(ns) {
                return Err(Error::new(
                    code::INVALID_NETWORK_CONFIG,
                    format!("namespace {ns:?} is not a Kubernetes namespace name"),
                ));
            }
        }
        if self.speculate && !self.offline {
            // Once per call: a second plan (definitions changed) reads.
            self.speculate = false;
            if let Some(copied) = namespaces.and_then(|ns| self.start_speculation(ns)) {
                return Ok(Definitions::from_api(
                    &copied.nads,
                    &copied.cluster_networks,
                    &self.describe(),
                ));
            }
        }
        let read = if self.offline {
            Err(ipam::Error::Unreachable {
                store: self.describe(),
                detail: "not asked (DEL never waits for etcd)".into(),
            })
        } else {
            self.read(namespaces)
        };
        let (read, source) = match read {
            Ok(read) => (read, self.describe()),
            Err(e @ ipam::Error::Unreachable { .. }) => {
                let copy = self.copy.load(namespaces);
                let age = match copy.read_at {
                    Some(t) => format!("read {}s ago", copy::now().saturating_sub(t)),
                    None => "empty: nothing was ever read".into(),
                };
                if !self.offline {
                    warn!(error = %e, copy = %self.copy.dir().display(), %age,
                        "etcd of the API is unreachable: using the local copy of the definitions");
                }
                self.stale = Some(e.to_string());
                let source = format!(
                    "local copy {} of {}",
                    self.copy.dir().display(),
                    self.describe()
                );
                (copy, source)
            }
            Err(e) => return Err(store_error(e).context("reading network definitions")),
        };
        Ok(Definitions::from_api(
            &read.nads,
            &read.cluster_networks,
            &source,
        ))
    }

    /// A network missing from the local copy may exist in etcd: try again
    /// later, rather than "not found".
    fn explain(&self, e: conf::Error) -> Error {
        match (&self.stale, &e) {
            (Some(why), conf::Error::NotFound { .. }) => Error::new(
                code::TRY_AGAIN_LATER,
                format!("{e} in the local copy of the definitions, and {why}"),
            ),
            _ => e.into(),
        }
    }
}
