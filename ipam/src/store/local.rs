//! The local store: the same model in a directory, for a single node.
//!
//! One file per key under `kv/` (the key's components are its path), holding
//! the key's modification revision on the first line and the value after it.
//! Every operation holds an exclusive `flock` on `lock`. A transaction is
//! first written whole to `txn.log` and synced, then applied file by file
//! (each written beside its target and renamed over it, then synced), then
//! the log is removed; a log found on the next operation is applied again,
//! so a crash leaves all of a transaction or none of it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::{Kv, Op, Store, Txn, TxnOutcome};
use crate::Error;

pub struct LocalStore {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Log {
    revision: i64,
    /// (key, base64 value or none for a delete)
    ops: Vec<(String, Option<String>)>,
}

fn io_err(dir: &Path, what: &str, e: io::Error) -> Error {
    Error::Store(format!("local store {}: {what}: {e}", dir.display()))
}

/// A key component as a file name: anything but `[A-Za-z0-9._:-]`, and a
/// leading dot, as `%XX`.
fn escape(component: &str) -> String {
    let mut out = String::with_capacity(component.len());
    for (i, b) in component.bytes().enumerate() {
        let plain =
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'-') || (b == b'.' && i > 0);
        if plain {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push('%');
    }
    out
}

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

impl LocalStore {
    /// Opens (creating) the store in `dir`.
    pub fn open(dir: &Path) -> Result<LocalStore, Error> {
        fs::create_dir_all(dir.join("kv")).map_err(|e| io_err(dir, "create", e))?;
        Ok(LocalStore {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        let mut p = self.dir.join("kv");
        for c in key.split('/') {
            p.push(escape(c));
        }
        p
    }

    fn lock(&self) -> Result<Flock<File>, Error> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("lock"))
            .map_err(|e| io_err(&self.dir, "open lock", e))?;
        let locked = Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| io_err(&self.dir, "flock", e.into()))?;
        self.recover()?;
        Ok(locked)
    }

    /// Applies a transaction log left by a crash.
    fn recover(&self) -> Result<(), Error> {
        let log_path = self.dir.join("txn.log");
        let raw = match fs::read(&log_path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&self.dir, "read txn.log", e)),
        };
        // A log that is not whole was never synced: its transaction did not happen.
        if let Ok(log) = serde_json::from_slice::<Log>(&raw) {
            self.apply(&log)?;
        }
        fs::remove_file(&log_path).map_err(|e| io_err(&self.dir, "remove txn.log", e))
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

    fn revision(&self) -> Result<i64, Error> {
        match fs::read_to_string(self.dir.join("revision")) {
            Ok(s) => s.trim().parse().map_err(|_| {
                Error::Store(format!(
                    "local store {}: revision is corrupt",
                    self.dir.display()
                ))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io_err(&self.dir, "read revision", e)),
        }
    }

    fn write_synced(&self, path: &Path, data: &[u8]) -> Result<(), Error> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp~");
        let tmp = PathBuf::from(tmp);
        let mut f = File::create(&tmp).map_err(|e| io_err(&self.dir, "write", e))?;
        f.write_all(data)
            .and_then(|_| f.sync_data())
            .and_then(|_| fs::rename(&tmp, path))
            .map_err(|e| io_err(&self.dir, "write", e))
    }

    fn apply(&self, log: &Log) -> Result<(), Error> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for (key, value) in &log.ops {
            let path = self.path(key);
            let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
            match value {
                Some(v) => {
                    let v = B64
                        .decode(v)
                        .map_err(|e| Error::Store(format!("txn.log: {e}")))?;
                    fs::create_dir_all(&parent).map_err(|e| io_err(&self.dir, key, e))?;
                    let mut data = format!("{}\n", log.revision).into_bytes();
                    data.extend_from_slice(&v);
                    self.write_synced(&path, &data)?;
                }
                None => match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&self.dir, key, e)),
                },
            }
            if !dirs.contains(&parent) {
                dirs.push(parent);
            }
        }
        self.write_synced(
            &self.dir.join("revision"),
            log.revision.to_string().as_bytes(),
        )?;
        dirs.push(self.dir.clone());
        for d in dirs {
            if let Ok(f) = File::open(&d) {
                f.sync_all().map_err(|e| io_err(&self.dir, "sync", e))?;
            }
        }
        Ok(())
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

impl Store for LocalStore {
    fn get(&mut self, key: &str) -> Result<Option<Kv>, Error> {
        let _lock = self.lock()?;
        self.read_file(&self.path(key), key)
    }

    fn range(&mut self, prefix: &str) -> Result<Vec<Kv>, Error> {
        let _lock = self.lock()?;
        let dir = self.path(prefix.trim_end_matches('/'));
        let mut out = Vec::new();
        self.walk(&dir, prefix, &mut out)?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn txn(&mut self, txn: Txn) -> Result<TxnOutcome, Error> {
        let _lock = self.lock()?;
        let revision = self.revision()?;
        let mut holds = true;
        for (key, want) in &txn.compares {
            let have = self
                .read_file(&self.path(key), key)?
                .map_or(0, |kv| kv.mod_rev);
            if have != *want {
                holds = false;
                break;
            }
        }
        if !holds {
            let mut reads = Vec::new();
            for key in &txn.on_failure {
                reads.extend(self.read_file(&self.path(key), key)?);
            }
            return Ok(TxnOutcome {
                succeeded: false,
                revision,
                reads,
            });
        }
        let log = Log {
            revision: revision + 1,
            ops: txn
                .success
                .iter()
                .map(|op| match op {
                    Op::Put(k, v) => (k.clone(), Some(B64.encode(v))),
                    Op::Delete(k) => (k.clone(), None),
                })
                .collect(),
        };
        let raw = serde_json::to_vec(&log).map_err(|e| Error::Store(e.to_string()))?;
        let log_path = self.dir.join("txn.log");
        self.write_synced(&log_path, &raw)?;
        self.apply(&log)?;
        fs::remove_file(&log_path).map_err(|e| io_err(&self.dir, "remove txn.log", e))?;
        Ok(TxnOutcome {
            succeeded: true,
            revision: log.revision,
            reads: Vec::new(),
        })
    }

    fn describe(&self) -> String {
        format!("local store {}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_round_trips_and_stays_one_component() {
        for s in ["10.1.0.64-26", "fd00::40-122", "..", ".", "a/b", "", "x%y"] {
            let e = escape(s);
            assert!(!e.contains('/') && e != "." && e != "..", "{s} -> {e}");
            assert_eq!(unescape(&e).as_deref(), Some(s));
        }
    }
}
