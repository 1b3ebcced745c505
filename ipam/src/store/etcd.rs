//! The etcd store (v3 API over gRPC): endpoints, a key prefix, TLS client
//! certificates, user and password.
//!
//! Every call is retried through leader elections and dead members until its
//! time runs out (per call, and never past the store's deadline when one is
//! set), then fails naming the endpoints. Retrying a transaction is safe: the
//! model's transactions compare revisions, so one that did commit before its
//! answer was lost fails the second time and the caller reads what it wrote.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn as EtcdTxn, TxnOp, TxnOpResponse,
};
use tracing::debug;

use super::{Kv, Op, Store, Txn, TxnOutcome};
use crate::config::EtcdConf;
use crate::Error;

/// How long a watch waits for an event before it ends (see [`EtcdStore::watch`]).
const WATCH_IDLE: Duration = Duration::from_secs(10);

pub struct EtcdStore {
    /// Shared with the other stores of a shared connection.
    rt: Arc<tokio::runtime::Runtime>,
    client: Client,
    prefix: String,
    endpoints: Vec<String>,
    timeout: Duration,
    deadline: Option<Instant>,
}

/// How the store names itself in messages and journals.
pub fn describe(endpoints: &[String], prefix: &str) -> String {
    format!("etcd at {} (prefix {prefix})", endpoints.join(", "))
}

/// Errors that retrying cannot cure.
fn is_final(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        // gRPC codes: invalid argument, permission denied, failed
        // precondition, out of range, unauthenticated.
        E::GRpcStatus(s) => matches!(s.code() as i32, 3 | 7 | 9 | 11 | 16),
        E::InvalidArgs(_) | E::InvalidUri(_) | E::EndpointError(_) => true,
        _ => false,
    }
}

fn read_pem(path: &str, what: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::Config(format!("etcd {what} {path}: {e}")))
}

impl EtcdStore {
    /// Connects; fails within the configured timeout when no endpoint answers.
    pub fn connect(conf: &EtcdConf) -> Result<EtcdStore, Error> {
        if conf.endpoints.is_empty() {
            return Err(Error::Config("etcd store: no endpoints".into()));
        }
        let timeout = conf.timeout();
        let mut options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_require_leader(true);
        if let (Some(user), Some(password)) = (&conf.username, &conf.password) {
            // A long-lived client (the agent, the store relay) outlives
            // its token: etcd's expire.
            options = options
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        if conf.ca_file.is_some() || conf.cert_file.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &conf.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read_pem(ca, "CA")?));
            }
            match (&conf.cert_file, &conf.key_file) {
                (Some(cert), Some(key)) => {
                    tls = tls.identity(Identity::from_pem(
                        read_pem(cert, "certificate")?,
                        read_pem(key, "key")?,
                    ));
                }
                (None, None) => {}
                _ => {
                    return Err(Error::Config(
                        "etcd TLS: certFile and keyFile go together".into(),
                    ))
                }
            }
            options = options.with_tls(tls);
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Store(format!("tokio runtime: {e}")))?;
        let endpoints = conf.endpoints.clone();
        let connected = rt.block_on(async {
            tokio::time::timeout(timeout, Client::connect(&endpoints, Some(options))).await
        });
        let unreachable = |detail: String| Error::Unreachable {
            store: describe(&endpoints, &conf.prefix),
            detail,
        };
        let client = match connected {
            Ok(Ok(c)) => c,
            Ok(Err(e)) if is_final(&e) => return Err(Error::Config(format!("etcd: {e}"))),
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Err(_) => return Err(unreachable(format!("no answer within {timeout:?}"))),
        };
        Ok(EtcdStore {
            rt: Arc::new(rt),
            client,
            prefix: conf.prefix.clone(),
            endpoints,
            timeout,
            deadline: None,
        })
    }

    /// The same as [`EtcdStore::connect`], but reusing the connection an
    /// earlier call of this process made with the same endpoints and
    /// credentials (whatever its prefix and timeout: each store still bounds
    /// its own calls): the meta-plugin and the in-process IPAM of one CNI
    /// call then share one TCP (and TLS) handshake. Only for callers on one
    /// thread at a time: the connection lives on one current-thread runtime.
    pub fn connect_shared(conf: &EtcdConf) -> Result<EtcdStore, Error> {
        /// Connections made so far, by what they were made with.
        type Shared = Vec<(String, Arc<tokio::runtime::Runtime>, Client)>;
        static SHARED: Mutex<Shared> = Mutex::new(Vec::new());
        let how = conf.connection_key();
        let mut shared = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, rt, client)) = shared.iter().find(|(h, ..)| *h == how) {
            return Ok(EtcdStore {
                rt: rt.clone(),
                client: client.clone(),
                prefix: conf.prefix.clone(),
                endpoints: conf.endpoints.clone(),
                timeout: conf.timeout(),
                deadline: None,
            });
        }
        let store = EtcdStore::connect(conf)?;
        shared.push((how, store.rt.clone(), store.client.clone()));
        Ok(store)
    }

    /// Another store on this one's connection (one thread at a time, as
    /// for [`EtcdStore::connect_shared`]): many simulated nodes of one
    /// bench thread, each an allocator of its own.
    pub fn share(&self) -> EtcdStore {
        EtcdStore {
            rt: self.rt.clone(),
            client: self.client.clone(),
            prefix: self.prefix.clone(),
            endpoints: self.endpoints.clone(),
            timeout: self.timeout,
            deadline: self.deadline,
        }
    }

    /// The same connection under another key prefix.
    pub fn under(&self, prefix: &str) -> EtcdStore {
        let mut s = self.share();
        s.prefix = prefix.to_string();
        s
    }

    /// Puts `key` = `value` bound to `lease` unless `key` exists; whether
    /// it was put.
    pub fn put_leased(&mut self, key: &str, value: &[u8], lease: i64) -> Result<bool, Error> {
        let full = self.full(key);
        let value = value.to_vec();
        let resp = self.retry("put with lease", |mut c| {
            let t = EtcdTxn::new()
                .when([Compare::version(full.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    full.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            async move { c.txn(t).await }
        })?;
        Ok(resp.succeeded())
    }

    /// A new lease that lasts `ttl` unless renewed.
    pub fn grant(&mut self, ttl: Duration) -> Result<i64, Error> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let resp = self.retry("lease grant", |mut c| async move {
            c.lease_grant(secs, None).await
        })?;
        Ok(resp.id())
    }

    /// Renews `lease`; false when it has expired (or never was).
    pub fn renew(&mut self, lease: i64) -> Result<bool, Error> {
        let resp = self.retry("lease keep-alive", |mut c| async move {
            let (mut keeper, mut answers) = c.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            answers.message().await
        })?;
        Ok(resp.is_some_and(|r| r.ttl() > 0))
    }

    /// Revokes `lease`: the keys bound to it go at once.
    pub fn revoke(&mut self, lease: i64) -> Result<(), Error> {
        self.retry("lease revoke", |mut c| async move {
            c.lease_revoke(lease).await
        })
        .map(|_| ())
    }

    /// No call returns later than `deadline`.
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.set_deadline(deadline);
        self
    }

    /// Bounds this store's calls from now on by `deadline`.
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = Some(deadline);
    }

    /// Every key under each of `prefixes` (each ending with `/`), read at one
    /// revision in one round trip: a transaction of range reads.
    ///
    /// Serializable: the member asked answers from what it has applied,
    /// without a quorum round, so it may be a moment behind the leader. For
    /// data read far more often than it changes (the API's definitions),
    /// where a moment late is harmless and a round trip per read is not.
    pub fn ranges(&mut self, prefixes: &[&str]) -> Result<Vec<Vec<Kv>>, Error> {
        self.ranges_at(prefixes).map(|(out, _)| out)
    }

    /// [`EtcdStore::ranges`], and the revision the reads saw.
    pub fn ranges_at(&mut self, prefixes: &[&str]) -> Result<(Vec<Vec<Kv>>, i64), Error> {
        let gets: Vec<TxnOp> = prefixes
            .iter()
            .map(|p| {
                let options = GetOptions::new().with_prefix().with_serializable();
                TxnOp::get(self.full(p), Some(options))
            })
            .collect();
        let resp = self.retry("ranges", |mut c| {
            let t = EtcdTxn::new().and_then(gets.clone());
            async move { c.txn(t).await }
        })?;
        let out: Vec<Vec<Kv>> = resp
            .op_responses()
            .iter()
            .filter_map(|op| match op {
                TxnOpResponse::Get(g) => Some(g.kvs().iter().map(|kv| self.kv(kv)).collect()),
                _ => None,
            })
            .collect();
        if out.len() != prefixes.len() {
            return Err(Error::Store(format!(
                "{}: ranges: {} answers to {} reads",
                self.describe(),
                out.len(),
                prefixes.len()
            )));
        }
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok((out, revision))
    }

    /// Watches every key under `prefix` from `revision` on, calling
    /// `changed` with each batch's revision until it returns false; returns
    /// when the watch ends (etcd gone, the revision compacted, or no event
    /// for a while): the caller reads again and watches from there.
    pub fn watch(
        &mut self,
        prefix: &str,
        revision: i64,
        mut changed: impl FnMut(i64) -> bool,
    ) -> Result<(), Error> {
        let key = self.full(prefix);
        let client = self.client.clone();
        let store = self.describe();
        let failed = |e: etcd_client::Error| Error::Unreachable {
            store: store.clone(),
            detail: format!("watch {key}: {e}"),
        };
        self.rt.block_on(async {
            let mut client = client;
            let options = etcd_client::WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision);
            let mut stream = client
                .watch(key.clone(), Some(options))
                .await
                .map_err(failed)?;
            loop {
                // A quiet watch ends now and then, so that the caller reads
                // everything again (what a lost event would have missed).
                let Ok(message) = tokio::time::timeout(WATCH_IDLE, stream.message()).await else {
                    return Ok(());
                };
                match message {
                    Ok(Some(resp)) => {
                        if resp.canceled() || resp.compact_revision() > 0 {
                            return Ok(());
                        }
                        let rev = resp.header().map_or(revision, |h| h.revision());
                        if !resp.events().is_empty() && !changed(rev) {
                            return Ok(());
                        }
                    }
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(failed(e)),
                }
            }
        })
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn strip(&self, key: &[u8]) -> String {
        let k = String::from_utf8_lossy(key);
        k.strip_prefix(&self.prefix).unwrap_or(&k).to_string()
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> Kv {
        Kv {
            key: self.strip(kv.key()),
            value: kv.value().to_vec(),
            mod_rev: kv.mod_revision(),
        }
    }

    /// The configured endpoint of the member that leads now, if etcd names
    /// one among them (its members' advertised client URLs against this
    /// store's endpoints).
    pub fn leader_endpoint(&mut self) -> Result<Option<String>, Error> {
        let leader = self
            .retry("status", |mut c| async move { c.status().await })?
            .leader();
        let members = self.retry("member list", |mut c| async move { c.member_list().await })?;
        let trim = |u: &str| u.trim_end_matches('/').to_string();
        let ours: Vec<String> = self.endpoints.iter().map(|e| trim(e)).collect();
        Ok(members
            .members()
            .iter()
            .filter(|m| m.id() == leader)
            .flat_map(|m| m.client_urls().iter().map(|u| trim(u)))
            .find(|u| ours.contains(u)))
    }

    /// Runs `call` until it answers, cannot be cured, or time runs out.
    fn retry<T, F, Fut>(&mut self, what: &str, mut call: F) -> Result<T, Error>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut end = Instant::now() + self.timeout;
        if let Some(d) = self.deadline {
            end = end.min(d);
        }
        let mut pause = Duration::from_millis(20);
        let mut last = String::from("no attempt made before the deadline");
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Unreachable {
                    store: self.describe(),
                    detail: format!("{what}: {last}"),
                });
            }
            let client = self.client.clone();
            match self
                .rt
                .block_on(async { tokio::time::timeout(left, call(client)).await })
            {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if is_final(&e) => {
                    return Err(Error::Store(format!("{}: {what}: {e}", self.describe())))
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "timed out".into(),
            }
            debug!(what, error = %last, "etcd call failed; retrying");
            let left = end.saturating_duration_since(Instant::now());
            std::thread::sleep(pause.min(left));
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }
}

impl Store for EtcdStore {
    fn get(&mut self, key: &str) -> Result<Option<Kv>, Error> {
        let full = self.full(key);
        let resp = self.retry("get", |mut c| {
            let full = full.clone();
            async move { c.get(full, None).await }
        })?;
        Ok(resp.kvs().first().map(|kv| self.kv(kv)))
    }

    fn get_many(&mut self, keys: &[String]) -> Result<Vec<Kv>, Error> {
        let gets: Vec<TxnOp> = keys
            .iter()
            .map(|k| TxnOp::get(self.full(k), None))
            .collect();
        let resp = self.retry("gets", |mut c| {
            let t = EtcdTxn::new().and_then(gets.clone());
            async move { c.txn(t).await }
        })?;
        Ok(resp
            .op_responses()
            .iter()
            .filter_map(|op| match op {
                TxnOpResponse::Get(g) => {
                    Some(g.kvs().iter().map(|kv| self.kv(kv)).collect::<Vec<_>>())
                }
                _ => None,
            })
            .flatten()
            .collect())
    }

    fn range(&mut self, prefix: &str) -> Result<Vec<Kv>, Error> {
        let full = self.full(prefix);
        let resp = self.retry("range", |mut c| {
            let full = full.clone();
            async move { c.get(full, Some(GetOptions::new().with_prefix())).await }
        })?;
        Ok(resp.kvs().iter().map(|kv| self.kv(kv)).collect())
    }

    fn txn(&mut self, txn: Txn) -> Result<TxnOutcome, Error> {
        let compares: Vec<Compare> = txn
            .compares
            .iter()
            .map(|(k, rev)| Compare::mod_revision(self.full(k), CompareOp::Equal, *rev))
            .collect();
        let success: Vec<TxnOp> = txn
            .success
            .iter()
            .map(|op| match op {
                Op::Put(k, v) => TxnOp::put(self.full(k), v.clone(), None),
                Op::Delete(k) => TxnOp::delete(self.full(k), None),
            })
            .collect();
        let failure: Vec<TxnOp> = txn
            .on_failure
            .iter()
            .map(|k| TxnOp::get(self.full(k), None))
            .collect();
        let resp = self.retry("transaction", |mut c| {
            let t = EtcdTxn::new()
                .when(compares.clone())
                .and_then(success.clone())
                .or_else(failure.clone());
            async move { c.txn(t).await }
        })?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut reads = Vec::new();
        if !resp.succeeded() {
            for op in resp.op_responses() {
                if let TxnOpResponse::Get(g) = op {
                    reads.extend(g.kvs().iter().map(|kv| self.kv(kv)));
                }
            }
        }
        Ok(TxnOutcome {
            succeeded: resp.succeeded(),
            revision,
            reads,
        })
    }

    fn describe(&self) -> String {
        describe(&self.endpoints, &self.prefix)
    }
}
