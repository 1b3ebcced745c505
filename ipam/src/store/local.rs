//! The local store: the same model in a directory, for a single node.
//!
//! The whole store is one snapshot, kept in two files, `state.0` and
//! `state.1`. A transaction writes the new snapshot (a generation number,
//! the revision, every key with its modification revision and value, and a
//! checksum over all of it) over the file that does not hold the current
//! one, in place, and syncs that one file: one durable sync per transaction,
//! and no file created, renamed or freed. A snapshot cut short by a crash
//! fails its checksum, and the other file still holds the one before it: a
//! crash leaves all of a transaction or none of it. Every operation holds an
//! exclusive `flock` on `lock` and reads again only when the generation
//! changed.
//!
//! A directory in the earlier layout (one file per key under `kv/`, with a
//! `revision` file and a `txn.log`) is read once into the first snapshot,
//! and `kv/` set aside as `kv.imported/`. State files that hold no whole
//! snapshot though one was written are an error, never an empty store.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::Deserialize;

use super::{Kv, Op, Store, Txn, TxnOutcome};
use crate::{fnv1a, Error};

pub struct LocalStore {
    dir: PathBuf,
    lock: File,
    files: [File; 2],
    /// The snapshot last read or written (generation 0: none yet).
    state: State,
}

/// One snapshot.
#[derive(Default)]
struct State {
    generation: u64,
    revision: i64,
    /// Which of the two files holds it.
    file: usize,
    /// Its checksum (with the generation and file, what a reader compares).
    sum: u64,
    kvs: BTreeMap<String, (i64, Vec<u8>)>,
}

fn io_err(dir: &Path, what: &str, e: io::Error) -> Error {
    Error::Store(format!("local store {}: {what}: {e}", dir.display()))
}

/// A file name of the earlier layout as its key component (`%XX` escapes).
fn unescape(name: &str) -> Option<String> {
    if name == "%" {
        return Some(String::new());
    }
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A transaction of the earlier layout, as its `txn.log` holds it.
#[derive(Deserialize)]
struct Log {
    revision: i64,
    /// (key, base64 value or none for a delete)
    ops: Vec<(String, Option<String>)>,
}

const MAGIC: &[u8; 8] = b"PXIPAM01";
/// Magic, generation, revision, body length, checksum.
const HEADER: usize = 40;

fn u64_at(raw: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&raw[at..at + 8]);
    u64::from_le_bytes(b)
}

fn u32_at(raw: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = raw.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

/// The generation a file's header names, if it has one.
fn header_generation(raw: &[u8]) -> Option<u64> {
    (raw.len() >= HEADER && &raw[..8] == MAGIC).then(|| u64_at(raw, 8))
}

impl State {
    fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(64 * self.kvs.len() + 4);
        body.extend_from_slice(&(self.kvs.len() as u32).to_le_bytes());
        for (k, (rev, v)) in &self.kvs {
            body.extend_from_slice(&(k.len() as u32).to_le_bytes());
            body.extend_from_slice(k.as_bytes());
            body.extend_from_slice(&rev.to_le_bytes());
            body.extend_from_slice(&(v.len() as u32).to_le_bytes());
            body.extend_from_slice(v);
        }
        let mut out = Vec::with_capacity(HEADER + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.revision.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        let sum = fnv1a(&[&out[8..32], &body]);
        out.extend_from_slice(&sum.to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// A whole snapshot, or `None` (absent, cut short, or not one).
    fn decode(raw: &[u8], file: usize) -> Option<State> {
        header_generation(raw)?;
        let len = usize::try_from(u64_at(raw, 24)).ok()?;
        let body = raw.get(HEADER..HEADER.checked_add(len)?)?;
        if fnv1a(&[&raw[8..32], body]) != u64_at(raw, 32) {
            return None;
        }
        let mut kvs = BTreeMap::new();
        let mut at = 4;
        for _ in 0..u32_at(body, 0)? {
            let klen = u32_at(body, at)? as usize;
            let kend = at.checked_add(4)?.checked_add(klen)?;
            let key = std::str::from_utf8(body.get(at + 4..kend)?).ok()?;
            at = kend;
            let rev = i64::from_le_bytes(body.get(at..at.checked_add(8)?)?.try_into().ok()?);
            let vlen = u32_at(body, at.checked_add(8)?)? as usize;
            let vend = at.checked_add(12)?.checked_add(vlen)?;
            let value = body.get(at + 12..vend)?.to_vec();
            at = vend;
            kvs.insert(key.to_string(), (rev, value));
        }
        Some(State {
            generation: u64_at(raw, 8),
            revision: u64_at(raw, 16) as i64,
            file,
            sum: u64_at(raw, 32),
            kvs,
        })
    }

    fn kv(&self, key: &str) -> Option<Kv> {
        self.kvs.get(key).map(|(rev, value)| Kv {
            key: key.to_string(),
            value: value.clone(),
            mod_rev: *rev,
        })
    }

    fn mod_rev(&self, key: &str) -> i64 {
        self.kvs.get(key).map_or(0, |(rev, _)| *rev)
    }
}

/// Holds the store's `flock` (on the descriptor of its `lock` file) until
/// dropped.
struct Locked(RawFd);

impl Drop for Locked {
    fn drop(&mut self) {
        #[allow(deprecated)]
        let _ = nix::fcntl::flock(self.0, nix::fcntl::FlockArg::Unlock);
    }
}

impl LocalStore {
    /// Opens (creating) the store in `dir`.
    pub fn open(dir: &Path) -> Result<LocalStore, Error> {
        fs::create_dir_all(dir).map_err(|e| io_err(dir, "create", e))?;
        let open = |name: &str| {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(dir.join(name))
                .map_err(|e| io_err(dir, &format!("open {name}"), e))
        };
        // Empty until the first snapshot, which syncs their names too.
        Ok(LocalStore {
            dir: dir.to_path_buf(),
            lock: open("lock")?,
            files: [open("state.0")?, open("state.1")?],
            state: State::default(),
        })
    }

    /// The first `len` bytes of file `i`.
    fn read_all(&self, i: usize, len: u64) -> Result<Vec<u8>, Error> {
        let mut raw = vec![0u8; usize::try_from(len).unwrap_or(0)];
        self.files[i]
            .read_exact_at(&mut raw, 0)
            .map_err(|e| io_err(&self.dir, &format!("read state.{i}"), e))?;
        Ok(raw)
    }

    /// Makes the directory's entries (the files' names) outlive a crash.
    fn sync_dir(&self) -> Result<(), Error> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(&self.dir, "sync", e))
    }

    /// The current snapshot: the one held, while no other process wrote a
    /// newer one; else read again.
    fn load(&mut self) -> Result<(), Error> {
        // Each file's length, and its header's generation and checksum.
        let mut heads: [(u64, Option<(u64, u64)>); 2] = [(0, None), (0, None)];
        for (i, h) in heads.iter_mut().enumerate() {
            let f = &self.files[i];
            let len = f
                .metadata()
                .map_err(|e| io_err(&self.dir, "stat", e))?
                .len();
            let mut head = [0u8; HEADER];
            let tag = match f.read_exact_at(&mut head, 0) {
                Ok(()) => header_generation(&head).map(|g| (g, u64_at(&head, 32))),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => None,
                Err(e) => return Err(io_err(&self.dir, &format!("read state.{i}"), e)),
            };
            *h = (len, tag);
        }
        let newest = (0..2)
            .filter_map(|i| heads[i].1.map(|(g, sum)| (g, i, sum)))
            .max();
        let s = &self.state;
        if newest == Some((s.generation, s.file, s.sum)) {
            return Ok(());
        }
        let mut best: Option<State> = None;
        for (i, (len, tag)) in heads.iter().enumerate() {
            if tag.is_none() {
                continue;
            }
            if let Some(s) = State::decode(&self.read_all(i, *len)?, i) {
                if best.as_ref().is_none_or(|b| s.generation > b.generation) {
                    best = Some(s);
                }
            }
        }
        if let Some(s) = best {
            self.state = s;
            return Ok(());
        }
        // No whole snapshot. Never written, or only the first one cut short
        // (after it, each file holds one): an earlier layout's keys, if any.
        // Anything else was written and is damaged: never taken for empty.
        let fresh = heads
            .iter()
            .all(|(len, tag)| *len == 0 || matches!(tag, Some((1, _))));
        if !fresh {
            return Err(Error::Store(format!(
                "local store {}: the state files are corrupt",
                self.dir.display()
            )));
        }
        self.state = State::default();
        self.import()
    }

    /// Writes `next` over the file that does not hold the current snapshot,
    /// and syncs it.
    fn commit(&mut self, mut next: State) -> Result<(), Error> {
        let current = &self.state;
        next.generation = current.generation + 1;
        next.file = if current.generation == 0 {
            0
        } else {
            1 - current.file
        };
        let raw = next.encode();
        next.sum = u64_at(&raw, 32);
        let f = &self.files[next.file];
        f.write_all_at(&raw, 0)
            .and_then(|_| f.sync_data())
            .map_err(|e| io_err(&self.dir, &format!("write state.{}", next.file), e))?;
        if next.generation == 1 {
            // The files' names outlive a crash too, whoever made them.
            self.sync_dir()?;
        }
        self.state = next;
        Ok(())
    }

    /// The keys of the earlier layout (`kv/`, `revision`, `txn.log`),
    /// written as the first snapshot; none when there are none.
    fn import(&mut self) -> Result<(), Error> {
        let mut state = State::default();
        if !self.dir.join("kv").is_dir() {
            return Ok(());
        }
        let mut kvs = Vec::new();
        self.walk(&self.dir.join("kv"), "", &mut kvs)?;
        state.revision = match fs::read_to_string(self.dir.join("revision")) {
            Ok(s) => s.trim().parse().unwrap_or(0),
            Err(_) => 0,
        };
        for kv in kvs {
            state.revision = state.revision.max(kv.mod_rev);
            state.kvs.insert(kv.key, (kv.mod_rev, kv.value));
        }
        // A transaction its log holds happened (the log was synced first).
        if let Some(log) = fs::read(self.dir.join("txn.log"))
            .ok()
            .and_then(|raw| serde_json::from_slice::<Log>(&raw).ok())
        {
            for (key, value) in log.ops {
                match value {
                    Some(v) => {
                        let v = B64
                            .decode(v)
                            .map_err(|e| Error::Store(format!("txn.log: {key}: {e}")))?;
                        state.kvs.insert(key, (log.revision, v))
                    }
                    None => state.kvs.remove(&key),
                };
            }
            state.revision = state.revision.max(log.revision);
        }
        tracing::info!(store = %self.dir.display(), keys = state.kvs.len(),
            revision = state.revision, "local store: the earlier layout read into state files");
        self.commit(state)?;
        // Read once: the earlier layout is kept aside, never read again.
        let aside = self.dir.join("kv.imported");
        fs::rename(self.dir.join("kv"), &aside)
            .map_err(|e| io_err(&self.dir, "set kv/ aside", e))?;
        self.sync_dir()
    }

    fn read_file(&self, path: &Path, key: &str) -> Result<Option<Kv>, Error> {
        let raw = match fs::read(path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&self.dir, key, e)),
        };
        let nl = raw.iter().position(|b| *b == b'\n');
        let rev = nl
            .and_then(|n| std::str::from_utf8(&raw[..n]).ok())
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| {
                Error::Store(format!(
                    "local store {}: {key} is corrupt",
                    self.dir.display()
                ))
            })?;
        let value = raw[nl.map_or(raw.len(), |n| n + 1)..].to_vec();
        Ok(Some(Kv {
            key: key.to_string(),
            value,
            mod_rev: rev,
        }))
    }

    fn walk(&self, dir: &Path, key_prefix: &str, out: &mut Vec<Kv>) -> Result<(), Error> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&self.dir, key_prefix, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&self.dir, key_prefix, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp~") {
                continue;
            }
            let Some(component) = unescape(&name) else {
                continue;
            };
            let key = format!("{key_prefix}{component}");
            let kind = entry.file_type().map_err(|e| io_err(&self.dir, &key, e))?;
            if kind.is_dir() {
                self.walk(&entry.path(), &format!("{key}/"), out)?;
            } else if let Some(kv) = self.read_file(&entry.path(), &key)? {
                out.push(kv);
            }
        }
        Ok(())
    }
}

/// Runs `f` holding the store's lock, its snapshot current.
fn locked<T>(
    store: &mut LocalStore,
    f: impl FnOnce(&mut LocalStore) -> Result<T, Error>,
) -> Result<T, Error> {
    let fd = store.lock.as_raw_fd();
    #[allow(deprecated)]
    nix::fcntl::flock(fd, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|e| io_err(&store.dir, "flock", e.into()))?;
    let _held = Locked(fd);
    store.load()?;
    f(store)
}

impl Store for LocalStore {
    fn get(&mut self, key: &str) -> Result<Option<Kv>, Error> {
        locked(self, |s| Ok(s.state.kv(key)))
    }

    fn get_many(&mut self, keys: &[String]) -> Result<Vec<Kv>, Error> {
        locked(self, |s| {
            Ok(keys.iter().filter_map(|k| s.state.kv(k)).collect())
        })
    }

    fn range(&mut self, prefix: &str) -> Result<Vec<Kv>, Error> {
        locked(self, |s| {
            Ok(s.state
                .kvs
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, (rev, v))| Kv {
                    key: k.clone(),
                    value: v.clone(),
                    mod_rev: *rev,
                })
                .collect())
        })
    }

    fn txn(&mut self, txn: Txn) -> Result<TxnOutcome, Error> {
        locked(self, |s| {
            let state = &s.state;
            let holds = txn
                .compares
                .iter()
                .all(|(key, want)| state.mod_rev(key) == *want);
            if !holds {
                return Ok(TxnOutcome {
                    succeeded: false,
                    revision: state.revision,
                    reads: txn.on_failure.iter().filter_map(|k| state.kv(k)).collect(),
                });
            }
            let revision = state.revision + 1;
            let mut kvs = state.kvs.clone();
            for op in txn.success {
                match op {
                    Op::Put(k, v) => kvs.insert(k, (revision, v)),
                    Op::Delete(k) => kvs.remove(&k),
                };
            }
            s.commit(State {
                revision,
                kvs,
                ..State::default()
            })?;
            Ok(TxnOutcome {
                succeeded: true,
                revision,
                reads: Vec::new(),
            })
        })
    }

    fn describe(&self) -> String {
        format!("local store {}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(store: &mut LocalStore, key: &str, value: &str, when: i64) -> TxnOutcome {
        store
            .txn(Txn::default().when(key, when).put(key, value.into()))
            .expect("txn")
    }

    /// The store in `dir` refuses to read, naming the damage.
    fn assert_corrupt(dir: &Path) {
        let err = LocalStore::open(dir)
            .expect("open")
            .get("k")
            .expect_err("corrupt");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[test]
    fn one_sync_per_transaction_and_another_store_sees_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = LocalStore::open(dir.path()).expect("open");
        let mut b = LocalStore::open(dir.path()).expect("open");
        assert!(put(&mut a, "blocks/p/x", "1", 0).succeeded);
        // Written to its file before the transaction answered.
        let raw = fs::read(dir.path().join("state.0")).expect("state.0");
        assert_eq!(header_generation(&raw), Some(1));
        let kv = b.get("blocks/p/x").expect("get").expect("present");
        assert_eq!((kv.value.as_slice(), kv.mod_rev), (&b"1"[..], 1));
        // b's compare on the old revision fails and reads the key.
        let lost = b
            .txn(Txn::default().when("blocks/p/x", 0).or_read("blocks/p/x"))
            .expect("txn");
        assert!(!lost.succeeded && lost.read("blocks/p/x").is_some());
        assert!(put(&mut b, "blocks/p/x", "2", 1).succeeded);
        assert!(put(&mut b, "blocks/p/y", "3", 0).succeeded);
        let keys: Vec<(String, i64)> = a
            .range("blocks/p/")
            .expect("range")
            .into_iter()
            .map(|kv| (kv.key, kv.mod_rev))
            .collect();
        assert_eq!(keys, [("blocks/p/x".into(), 2), ("blocks/p/y".into(), 3)]);
        assert!(a.range("blocks/q/").expect("range").is_empty());
    }

    #[test]
    fn a_snapshot_cut_short_leaves_the_one_before() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = LocalStore::open(dir.path()).expect("open");
        put(&mut s, "k", "one", 0);
        put(&mut s, "k", "two", 1);
        // The newest snapshot is in state.1: cut it short, as a crash in
        // the middle of its write would.
        let newest = dir.path().join("state.1");
        let raw = fs::read(&newest).expect("read");
        fs::write(&newest, &raw[..raw.len() - 3]).expect("write");
        let mut again = LocalStore::open(dir.path()).expect("open");
        let kv = again.get("k").expect("get").expect("present");
        assert_eq!((kv.value.as_slice(), kv.mod_rev), (&b"one"[..], 1));
        // The next transaction writes over the broken file.
        assert!(put(&mut again, "k", "three", 1).succeeded);
        let kv = LocalStore::open(dir.path())
            .expect("open")
            .get("k")
            .expect("get")
            .expect("present");
        assert_eq!((kv.value.as_slice(), kv.mod_rev), (&b"three"[..], 2));
        // Both broken: an error, not an empty store.
        for f in ["state.0", "state.1"] {
            let p = dir.path().join(f);
            let raw = fs::read(&p).expect("read");
            fs::write(&p, &raw[..HEADER + 1]).expect("write");
        }
        assert_corrupt(dir.path());
    }

    #[test]
    fn only_a_first_snapshot_cut_short_reads_as_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = LocalStore::open(dir.path()).expect("open");
        put(&mut s, "k", "one", 0);
        // The first write cut short: it never happened.
        let first = dir.path().join("state.0");
        let raw = fs::read(&first).expect("read");
        fs::write(&first, &raw[..HEADER + 2]).expect("write");
        let mut again = LocalStore::open(dir.path()).expect("open");
        assert!(again.get("k").expect("get").is_none());
        assert_eq!(put(&mut again, "k", "two", 0).revision, 1);
        // Bytes that are no snapshot at all, with none beside them: damage.
        fs::write(dir.path().join("state.0"), b"not a snapshot").expect("write");
        fs::write(dir.path().join("state.1"), b"").expect("write");
        assert_corrupt(dir.path());
    }

    #[test]
    fn the_earlier_layout_is_read_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kv = dir.path().join("kv/blocks/p");
        fs::create_dir_all(&kv).expect("mkdir");
        fs::write(kv.join("10.1.0.64-26"), "3\n{\"used\":\"\"}").expect("write");
        fs::write(dir.path().join("revision"), "4").expect("write");
        // A synced log whose transaction was not applied yet.
        let log = format!(
            "{{\"revision\":5,\"ops\":[[\"handles/n/c/eth0\",\"{}\"]]}}",
            B64.encode("h")
        );
        fs::write(dir.path().join("txn.log"), log).expect("write");
        let mut s = LocalStore::open(dir.path()).expect("open");
        let block = s.get("blocks/p/10.1.0.64-26").expect("get").expect("block");
        assert_eq!(block.mod_rev, 3);
        let handle = s.get("handles/n/c/eth0").expect("get").expect("handle");
        assert_eq!((handle.value.as_slice(), handle.mod_rev), (&b"h"[..], 5));
        assert_eq!(put(&mut s, "x", "y", 0).revision, 6);
        assert!(!dir.path().join("kv").exists() && dir.path().join("kv.imported").is_dir());
    }
}
