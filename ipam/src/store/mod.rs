//! Where the model lives: a small transactional key-value interface that both
//! stores implement with the same semantics (etcd's: every key has a
//! modification revision, 0 when absent, and a transaction applies all its
//! writes at one new revision or none of them).

pub mod etcd;
pub mod local;
pub mod relay;

use serde::{Deserialize, Serialize};

use crate::Error;

/// A key, its value and the revision that last changed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_rev: i64,
}

/// A write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Put(String, Vec<u8>),
    Delete(String),
}

/// If every key in `compares` still has the given modification revision (0:
/// absent), apply `success`; otherwise read `on_failure` (keys, not prefixes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub compares: Vec<(String, i64)>,
    pub success: Vec<Op>,
    pub on_failure: Vec<String>,
}

impl Txn {
    pub fn when(mut self, key: impl Into<String>, mod_rev: i64) -> Txn {
        self.compares.push((key.into(), mod_rev));
        self
    }

    pub fn put(mut self, key: impl Into<String>, value: Vec<u8>) -> Txn {
        self.success.push(Op::Put(key.into(), value));
        self
    }

    pub fn delete(mut self, key: impl Into<String>) -> Txn {
        self.success.push(Op::Delete(key.into()));
        self
    }

    pub fn or_read(mut self, key: impl Into<String>) -> Txn {
        self.on_failure.push(key.into());
        self
    }
}

/// What a transaction did: on success the revision its writes carry; on
/// failure the `on_failure` keys that exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnOutcome {
    pub succeeded: bool,
    pub revision: i64,
    pub reads: Vec<Kv>,
}

impl TxnOutcome {
    pub fn read(&self, key: &str) -> Option<&Kv> {
        self.reads.iter().find(|kv| kv.key == key)
    }
}

/// A store. Keys are relative to the store's own prefix or directory.
pub trait Store: Send {
    fn get(&mut self, key: &str) -> Result<Option<Kv>, Error>;
    /// Those of `keys` that exist, read at one revision where the store can
    /// (etcd: one round trip).
    fn get_many(&mut self, keys: &[String]) -> Result<Vec<Kv>, Error> {
        let mut out = Vec::new();
        for k in keys {
            out.extend(self.get(k)?);
        }
        Ok(out)
    }
    /// Every key under `prefix` (which ends with `/`), in key order.
    fn range(&mut self, prefix: &str) -> Result<Vec<Kv>, Error>;
    fn txn(&mut self, txn: Txn) -> Result<TxnOutcome, Error>;
    /// For messages: `etcd at http://…` or `local store /var/lib/…`.
    fn describe(&self) -> String;
}

impl<S: Store + ?Sized> Store for Box<S> {
    fn get(&mut self, key: &str) -> Result<Option<Kv>, Error> {
        (**self).get(key)
    }
    fn get_many(&mut self, keys: &[String]) -> Result<Vec<Kv>, Error> {
        (**self).get_many(keys)
    }
    fn range(&mut self, prefix: &str) -> Result<Vec<Kv>, Error> {
        (**self).range(prefix)
    }
    fn txn(&mut self, txn: Txn) -> Result<TxnOutcome, Error> {
        (**self).txn(txn)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}
