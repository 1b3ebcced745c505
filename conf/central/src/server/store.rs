//! The API's state in etcd: objects as JSON under their keys, the key's
//! modification revision as `resourceVersion`, every write one transaction
//! that compares revisions, so that concurrent writers (other `plexusd`s,
//! nodes) never overwrite each other unseen.

use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, TlsOptions, Txn,
    TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use serde_json::Value;

/// One stored object and its revisions.
#[derive(Debug, Clone)]
pub struct Stored {
    pub key: String,
    pub value: Value,
    pub mod_rev: i64,
}

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("{key} changed since revision {expected}")]
    Conflict { key: String, expected: i64 },
    #[error("{0} exists")]
    Exists(String),
    #[error("{0} not found")]
    Missing(String),
    #[error("what {0} depends on changed while it was checked")]
    Guard(String),
    #[error("the object is too large for etcd: {0}")]
    TooLarge(String),
}

impl From<etcd_client::Error> for StoreError {
    fn from(e: etcd_client::Error) -> StoreError {
        let text = e.to_string();
        if text.contains("too large") {
            StoreError::TooLarge(text)
        } else {
            StoreError::Etcd(text)
        }
    }
}

/// Attempts after the first for a call etcd answered with an election in
/// progress.
const RETRIES: u64 = 5;

/// An error that an election or a restarting member causes, which the next
/// attempt does not meet.
fn transient(e: &etcd_client::Error) -> bool {
    let text = e.to_string();
    [
        "leader changed",
        "no leader",
        "unavailable",
        "Unavailable",
        "timed out",
        "transport",
    ]
    .iter()
    .any(|t| text.contains(t))
}

/// Holds when no key under `prefix` changed after revision `rev`.
pub fn unchanged_since(prefix: &str, rev: i64) -> Compare {
    Compare::mod_revision(prefix, CompareOp::Less, rev + 1).with_prefix()
}

/// What `--etcd-*` flags say.
#[derive(Debug, Clone, Default)]
pub struct EtcdFlags {
    pub servers: Vec<String>,
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

/// A handle on etcd, cheap to clone.
#[derive(Clone)]
pub struct Store {
    client: Client,
}

fn read(path: &str, what: &str) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|e| StoreError::Etcd(format!("{what} {path}: {e}")))
}

/// The end of the range of every key starting with `prefix`.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn decode(kv: &etcd_client::KeyValue) -> Option<Stored> {
    let key = kv.key_str().ok()?.to_string();
    let value = serde_json::from_slice(kv.value()).ok()?;
    Some(Stored {
        key,
        value,
        mod_rev: kv.mod_revision(),
    })
}

impl Store {
    /// Connects to the members `flags` name (TLS when a CA or certificate is given).
    pub async fn connect(flags: &EtcdFlags) -> Result<Store, StoreError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10))
            .with_require_leader(true);
        if flags.ca_file.is_some() || flags.cert_file.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &flags.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca, "etcd CA")?));
            }
            if let (Some(c), Some(k)) = (&flags.cert_file, &flags.key_file) {
                tls = tls.identity(Identity::from_pem(
                    read(c, "etcd certificate")?,
                    read(k, "etcd key")?,
                ));
            }
            options = options.with_tls(tls);
        }
        let client = Client::connect(&flags.servers, Some(options)).await?;
        Ok(Store { client })
    }

    /// A read, retried through elections (reads change nothing).
    async fn read(
        &self,
        key: &str,
        options: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse, StoreError> {
        let mut attempt = 0;
        loop {
            match self.client.kv_client().get(key, options.clone()).await {
                Ok(r) => return Ok(r),
                Err(e) if attempt < RETRIES && transient(&e) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The store's current revision.
    pub async fn revision(&self) -> Result<i64, StoreError> {
        let resp = self
            .client
            .kv_client()
            .get(
                "/plexus/revision-probe",
                Some(GetOptions::new().with_count_only()),
            )
            .await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// One object.
    pub async fn get(&self, key: &str) -> Result<Option<Stored>, StoreError> {
        let resp = self.read(key, None).await?;
        Ok(resp.kvs().first().and_then(decode))
    }

    async fn range(&self, prefix: &str) -> Result<(etcd_client::GetResponse, i64), StoreError> {
        let resp = self
            .read(prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        Ok((resp, rev))
    }

    /// Every object under `prefix`, and the revision the read saw.
    pub async fn list(&self, prefix: &str) -> Result<(Vec<Stored>, i64), StoreError> {
        let (resp, rev) = self.range(prefix).await?;
        Ok((resp.kvs().iter().filter_map(decode).collect(), rev))
    }

    /// Every value under `prefix` as stored, with its modification revision,
    /// and the revision the read saw.
    pub async fn list_bytes(&self, prefix: &str) -> Result<(Vec<(Vec<u8>, i64)>, i64), StoreError> {
        let (resp, rev) = self.range(prefix).await?;
        let items = resp
            .kvs()
            .iter()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision()))
            .collect();
        Ok((items, rev))
    }

    /// One value as stored, with its modification revision.
    pub async fn get_bytes(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        let resp = self.read(key, None).await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    /// Raw values under `prefix` (IPAM keys), with their keys.
    pub async fn raw(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let (resp, _) = self.range(prefix).await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| Some((kv.key_str().ok()?.to_string(), kv.value().to_vec())))
            .collect())
    }

    /// Writes `key` (and `also`, in the same transaction) if its revision is
    /// still `expected` (0: it must not exist). Returns the new revision.
    pub async fn put(
        &self,
        key: &str,
        value: &Value,
        expected: i64,
        also: Vec<TxnOp>,
        guards: Vec<Compare>,
    ) -> Result<i64, StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Etcd(e.to_string()))?;
        let mut compares = vec![Compare::mod_revision(key, CompareOp::Equal, expected)];
        compares.extend(guards);
        let mut ops = vec![TxnOp::put(key, bytes.clone(), None)];
        ops.extend(also);
        self.commit(key, expected, compares, ops, Some(&bytes))
            .await
    }

    /// Deletes `key` (and runs `also`) if its revision is still `expected`.
    pub async fn delete(
        &self,
        key: &str,
        expected: i64,
        also: Vec<TxnOp>,
        guards: Vec<Compare>,
    ) -> Result<i64, StoreError> {
        let mut compares = vec![Compare::mod_revision(key, CompareOp::Equal, expected)];
        compares.extend(guards);
        let mut ops = vec![TxnOp::delete(key, None)];
        ops.extend(also);
        self.commit(key, expected, compares, ops, None).await
    }

    /// Runs the transaction; retries it through leader elections. `intent`
    /// is what the key should hold afterwards (None: deleted), so that a
    /// retry after a first attempt that did commit is seen as the success
    /// it was.
    async fn commit(
        &self,
        key: &str,
        expected: i64,
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
        intent: Option<&[u8]>,
    ) -> Result<i64, StoreError> {
        let txn = Txn::new()
            .when(compares)
            .and_then(ops)
            .or_else(vec![TxnOp::get(key, None)]);
        let mut retried = false;
        let mut attempt = 0;
        let resp = loop {
            match self.client.kv_client().txn(txn.clone()).await {
                Ok(r) => break r,
                Err(e) if attempt < RETRIES && transient(&e) => {
                    attempt += 1;
                    retried = true;
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let header_rev = resp.header().map_or(0, |h| h.revision());
        if resp.succeeded() {
            return Ok(header_rev);
        }
        let current = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .map(|kv| (kv.mod_revision(), kv.value().to_vec())),
            _ => None,
        });
        if retried {
            match (&current, intent) {
                (Some((rev, value)), Some(want)) if value.as_slice() == want => return Ok(*rev),
                (None, None) => return Ok(header_rev),
                _ => {}
            }
        }
        Err(match (current.map(|c| c.0), expected) {
            (Some(_), 0) => StoreError::Exists(key.to_string()),
            (None, e) if e != 0 => StoreError::Missing(key.to_string()),
            (Some(c), e) if c == e => StoreError::Guard(key.to_string()),
            (None, 0) => StoreError::Guard(key.to_string()),
            _ => StoreError::Conflict {
                key: key.to_string(),
                expected,
            },
        })
    }

    /// Changes under `prefix` after revision `after`.
    pub async fn watch(&self, prefix: &str, after: i64) -> Result<WatchStream, StoreError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(after + 1);
        Ok(self
            .client
            .watch_client()
            .watch(prefix, Some(options))
            .await?)
    }
}

/// A put of raw bytes, for the IPAM keys written beside an object.
pub fn put_op(key: &str, value: Vec<u8>) -> TxnOp {
    TxnOp::put(key, value, None)
}

/// A delete of every key under `prefix`.
pub fn delete_prefix_op(prefix: &str) -> TxnOp {
    TxnOp::delete(
        prefix,
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
}

/// A delete, for the IPAM keys removed beside an object.
pub fn delete_op(key: &str) -> TxnOp {
    TxnOp::delete(key, None)
}
