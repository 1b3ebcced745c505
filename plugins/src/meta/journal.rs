//! Attachment record writes and removals etcd did not take, kept in
//! `cacheDir/api/journal` until a call reaches it: one file per sandbox and
//! interface, holding the last thing that sandbox asked for (a DEL's removal
//! replaces an ADD's pending writes, an ADD's writes a DEL's removal).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What one sandbox still owes etcd.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pending {
    pub container_id: String,
    /// Records to write: full key and JSON text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub puts: Vec<(String, String)>,
    /// Full keys to remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deletes: Vec<String>,
}

/// The file name of what one sandbox's interface owes etcd (or asks of
/// anything else kept per sandbox and interface): `<container>-<ifname>.json`,
/// every character but ASCII letters, digits and `-` made `_`.
pub fn file_name(container_id: &str, ifname: &str) -> String {
    let safe: String = format!("{container_id}-{ifname}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}.json")
}

/// The journal's directory.
pub struct Journal {
    dir: PathBuf,
}

/// Journal files read at the start of a replay, removed once etcd took them.
pub struct Replay {
    files: Vec<PathBuf>,
    /// What they ask for, one operation per key: `Some` writes, `None` removes.
    pub ops: BTreeMap<String, Option<String>>,
}

impl Replay {
    /// The writes and the removals, leaving out the keys in `skip` (the
    /// caller's own, which supersede what was journaled for them).
    pub fn split(&self, skip: &BTreeSet<&str>) -> (Vec<(String, String)>, Vec<String>) {
        let mut puts = Vec::new();
        let mut deletes = Vec::new();
        for (key, op) in self.ops.iter().filter(|(k, _)| !skip.contains(k.as_str())) {
            match op {
                Some(value) => puts.push((key.clone(), value.clone())),
                None => deletes.push(key.clone()),
            }
        }
        (puts, deletes)
    }
}

impl Journal {
    pub fn new(cache_dir: &Path) -> Journal {
        Journal {
            dir: cache_dir.join("api").join("journal"),
        }
    }

    fn file(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.dir.join(file_name(container_id, ifname))
    }

    /// Replaces what the sandbox owes with `pending`.
    pub fn keep(&self, ifname: &str, pending: &Pending) -> io::Result<()> {
        let path = self.file(&pending.container_id, ifname);
        let raw = serde_json::to_vec(pending).map_err(io::Error::other)?;
        super::copy::replace_file(&self.dir, &path, &raw)
    }

    /// Everything journaled, but what `(container_id, ifname)` owes (its
    /// call is about to settle that itself). A GC passes `valid` to drop the
    /// writes of sandboxes that are gone.
    pub fn replay(&self, own: Option<(&str, &str)>, valid: Option<&BTreeSet<String>>) -> Replay {
        let own = own.map(|(c, i)| self.file(c, i));
        let mut replay = Replay {
            files: own.iter().cloned().collect(),
            ops: BTreeMap::new(),
        };
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return replay;
        };
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            // Not another process's file being written (`.<pid>.<name>`).
            .filter(|p| {
                p.extension().is_some_and(|x| x == "json")
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                    && Some(p) != own.as_ref()
            })
            .collect();
        files.sort();
        for path in files {
            let Some(p) = fs::read(&path)
                .ok()
                .and_then(|raw| serde_json::from_slice::<Pending>(&raw).ok())
            else {
                continue;
            };
            let gone = valid.is_some_and(|v| !v.contains(&p.container_id));
            for (key, value) in p.puts {
                replay.ops.insert(key, (!gone).then_some(value));
            }
            for key in p.deletes {
                replay.ops.insert(key, None);
            }
            replay.files.push(path);
        }
        replay
    }

    /// Etcd took `replay`: its files go.
    pub fn settle(&self, replay: Replay) {
        for path in replay.files {
            let _ = fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(c: &str, key: &str) -> Pending {
        Pending {
            container_id: c.into(),
            puts: vec![(key.into(), "{}".into())],
            deletes: Vec::new(),
        }
    }

    #[test]
    fn the_last_word_per_sandbox_wins_and_replays_settle() {
        let dir = tempfile::Builder::new()
            .prefix("plexus-journal-test-")
            .tempdir()
            .unwrap();
        let j = Journal::new(dir.path());
        assert!(j.replay(None, None).ops.is_empty());
        j.keep("eth0", &put("c1", "k1")).unwrap();
        j.keep("eth0", &put("c2", "k2")).unwrap();
        // c2's DEL replaces its pending write.
        let del = Pending {
            container_id: "c2".into(),
            puts: Vec::new(),
            deletes: vec!["k2".into()],
        };
        j.keep("eth0", &del).unwrap();
        let all = j.replay(None, None);
        assert_eq!(all.ops.get("k1"), Some(&Some("{}".to_string())));
        assert_eq!(all.ops.get("k2"), Some(&None));
        // c1's own call leaves its file out; a GC without c1 drops its write.
        assert!(!j.replay(Some(("c1", "eth0")), None).ops.contains_key("k1"));
        let gc = j.replay(None, Some(&BTreeSet::from(["c3".to_string()])));
        assert_eq!(gc.ops.get("k1"), Some(&None));
        let (puts, deletes) = all.split(&BTreeSet::from(["k2"]));
        assert_eq!((puts.len(), deletes.len()), (1, 0));
        j.settle(all);
        assert!(j.replay(None, None).ops.is_empty());
        assert_eq!(
            fs::read_dir(dir.path().join("api/journal"))
                .unwrap()
                .count(),
            0
        );
    }
}
