//! The node's store relay: a long-lived process (`plexus store-relay`) that
//! keeps its etcd connections open, and the store that reaches etcd through
//! it.
//!
//! A CNI plugin is a new process per call, so a direct etcd call pays for a
//! connection (TCP, HTTP/2, TLS when configured) before its one transaction.
//! Through the relay a call pays for a Unix socket instead; the relay makes
//! the same etcd calls, with the same retries and deadline, on a connection
//! that is already up.
//!
//! Wire format, one JSON document per line over a Unix stream: the client
//! first sends the store's config ([`EtcdConf`]), which the relay answers
//! with `"ready"` once it serves this client, then one [`Request`] per store
//! call, each answered by one [`Reply`]. Nothing is kept between connections
//! but the etcd connections and which member leads.
//!
//! [`Relayed`] never depends on the relay: with no relay listening, one
//! that does not take the connection in time, one that goes away or answers
//! with an error, it makes the call straight to etcd. Repeating a call the
//! relay may already have made is safe: reads are reads, and a
//! transaction compares revisions, so one that committed fails the second
//! time and the caller reads what it wrote.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use super::etcd::{describe, EtcdStore};
use super::{Kv, Store, Txn, TxnOutcome};
use crate::config::EtcdConf;
use crate::Error;

/// One store call.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Call {
    Get(String),
    GetMany(Vec<String>),
    Range(String),
    /// Every key under each prefix, read at one revision.
    Ranges(Vec<String>),
    Txn(Txn),
}

/// A call and the milliseconds it may take.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub call: Call,
    pub ms: u64,
}

/// A call's outcome.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Reply {
    Kvs(Vec<Kv>),
    Ranges(Vec<Vec<Kv>>),
    Txn(TxnOutcome),
    Unreachable { store: String, detail: String },
    Config(String),
    Failed(String),
}

impl Reply {
    fn of_error(e: Error) -> Reply {
        match e {
            Error::Unreachable { store, detail } => Reply::Unreachable { store, detail },
            Error::Config(m) => Reply::Config(m),
            other => Reply::Failed(other.to_string()),
        }
    }
}

/// How long the relay trusts what it learned of a store's leader.
const LEADER_TTL: Duration = Duration::from_secs(10);
/// How long a call may try the leader alone before any member is asked.
const LEADER_TRY: Duration = Duration::from_secs(1);

/// What the relay knows of each store's leader: the endpoint of the member
/// that leads (none: not known, any member is asked), and when it learned
/// it. Calls go to the leader: a member that does not lead hands a write to
/// the leader and answers only once it has applied it itself.
#[derive(Default)]
pub struct Leaders(HashMap<String, (Option<String>, Instant)>);

impl Leaders {
    /// The leader's store for `conf`, if a leader is known: on a connection
    /// to it alone, whose calls give up after [`LEADER_TRY`].
    fn store(&self, conf: &EtcdConf) -> Option<Result<EtcdStore, Error>> {
        let (endpoint, _) = self.0.get(&conf.connection_key())?;
        let mut alone = conf.clone();
        alone.endpoints = vec![endpoint.clone()?];
        alone.timeout_seconds = Some(LEADER_TRY.as_secs_f64());
        Some(EtcdStore::connect_shared(&alone))
    }

    /// Whether the leader is to be learned again: none is known (an
    /// election was under way when last asked), or what was learned is
    /// older than [`LEADER_TTL`] (only for more than one endpoint).
    fn stale(&self, conf: &EtcdConf) -> bool {
        conf.endpoints.len() >= 2
            && self
                .0
                .get(&conf.connection_key())
                .is_none_or(|(leader, at)| leader.is_none() || at.elapsed() >= LEADER_TTL)
    }

    /// What [`leader_of`] learned.
    fn learned(&mut self, conf: &EtcdConf, leader: Option<String>) {
        let key = conf.connection_key();
        let before = self.0.get(&key).map(|(l, _)| l.clone());
        if before.as_ref() != Some(&leader) {
            info!(leader = leader.as_deref().unwrap_or("none known"), endpoints = ?conf.endpoints,
                "etcd leader: calls go to it");
        }
        self.0.insert(key, (leader, Instant::now()));
    }

    fn forget(&mut self, conf: &EtcdConf) {
        self.0.remove(&conf.connection_key());
    }
}

/// The longest line the relay reads: a call is a few keys or one
/// transaction.
const MAX_LINE: u64 = 1 << 20;
/// How long a client waits for the relay to take its connection (a relay
/// serving as many clients as it takes) before it goes straight to etcd.
const HELLO_WAIT: Duration = Duration::from_millis(100);
/// The relay's answer to a client's config line: it is serving this client.
const READY: &str = "\"ready\"";

/// One line of at most [`MAX_LINE`] bytes, without its newline; `None` at
/// the end of the stream.
fn read_line(reader: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = String::new();
    let n = reader.by_ref().take(MAX_LINE).read_line(&mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with('\n') {
        return Err(io::Error::other("line too long or cut short"));
    }
    line.pop();
    Ok(Some(line))
}

fn write_line(writer: &mut impl Write, value: &impl Serialize) -> io::Result<()> {
    let mut out = serde_json::to_vec(value).map_err(io::Error::other)?;
    out.push(b'\n');
    writer.write_all(&out)
}

/// Serves one client connection: its config line (answered at once, so the
/// client knows it is being served), then its calls, until it hangs up or
/// stays silent or unread for `idle`. Each call goes to the leader when one
/// is known, to any member otherwise; once the client is gone the leader is
/// learned again when what `leaders` holds is stale.
pub fn serve(stream: UnixStream, idle: Duration, leaders: &Mutex<Leaders>) -> io::Result<()> {
    stream.set_read_timeout(Some(idle))?;
    stream.set_write_timeout(Some(idle))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let Some(first) = read_line(&mut reader)? else {
        return Ok(());
    };
    let conf: EtcdConf = serde_json::from_str(&first).map_err(io::Error::other)?;
    writer.write_all(format!("{READY}\n").as_bytes())?;
    let mut any: Option<EtcdStore> = None;
    let served = serve_calls(&mut reader, &mut writer, &conf, &mut any, leaders);
    let lock = || leaders.lock().unwrap_or_else(PoisonError::into_inner);
    if lock().stale(&conf) {
        // Asked with the lock let go: other clients' calls do not wait.
        if any.is_none() {
            any = EtcdStore::connect_shared(&conf).ok();
        }
        if let Some(s) = &mut any {
            let leader = leader_of(s);
            lock().learned(&conf, leader);
        }
    }
    served
}

/// The endpoint of the member that leads, as `any` member says (within
/// [`LEADER_TRY`]); `None` when it cannot say.
fn leader_of(any: &mut EtcdStore) -> Option<String> {
    any.set_deadline(Instant::now() + LEADER_TRY);
    any.leader_endpoint().unwrap_or_else(|e| {
        debug!(error = %e, "etcd leader not learned");
        None
    })
}

fn serve_calls(
    reader: &mut impl BufRead,
    writer: &mut impl Write,
    conf: &EtcdConf,
    any: &mut Option<EtcdStore>,
    leaders: &Mutex<Leaders>,
) -> io::Result<()> {
    let leaders = || leaders.lock().unwrap_or_else(PoisonError::into_inner);
    while let Some(line) = read_line(reader)? {
        let req: Request = serde_json::from_str(&line).map_err(io::Error::other)?;
        let deadline = Instant::now() + Duration::from_millis(req.ms);
        let leader = leaders().store(conf);
        let on_leader = match leader {
            Some(Ok(mut leader)) => {
                leader.set_deadline(deadline.min(Instant::now() + LEADER_TRY));
                match try_answer(&mut leader, req.call.clone()) {
                    Err(Error::Unreachable { detail, .. }) => {
                        debug!(detail, "etcd leader unreachable: asking any member");
                        leaders().forget(conf);
                        None
                    }
                    done => Some(done.unwrap_or_else(Reply::of_error)),
                }
            }
            Some(Err(e)) => {
                debug!(error = %e, "no connection to the etcd leader: asking any member");
                leaders().forget(conf);
                None
            }
            None => None,
        };
        let reply = match on_leader {
            Some(reply) => reply,
            None => {
                let connected = match any {
                    Some(s) => Ok(s),
                    None => EtcdStore::connect_shared(conf).map(|s| any.insert(s)),
                };
                match connected {
                    Ok(s) => {
                        s.set_deadline(deadline);
                        answer(s, req.call)
                    }
                    Err(e) => Reply::of_error(e),
                }
            }
        };
        write_line(writer, &reply)?;
    }
    Ok(())
}

fn try_answer(store: &mut EtcdStore, call: Call) -> Result<Reply, Error> {
    match call {
        Call::Get(key) => store
            .get(&key)
            .map(|kv| Reply::Kvs(kv.into_iter().collect())),
        Call::GetMany(keys) => store.get_many(&keys).map(Reply::Kvs),
        Call::Range(prefix) => store.range(&prefix).map(Reply::Kvs),
        Call::Ranges(prefixes) => {
            let prefixes: Vec<&str> = prefixes.iter().map(String::as_str).collect();
            store.ranges(&prefixes).map(Reply::Ranges)
        }
        Call::Txn(txn) => store.txn(txn).map(Reply::Txn),
    }
}

fn answer(store: &mut EtcdStore, call: Call) -> Reply {
    try_answer(store, call).unwrap_or_else(Reply::of_error)
}

/// A connection to the relay that is serving it.
struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects and sends the config; the relay must take the connection
    /// within [`HELLO_WAIT`].
    fn connect(socket: &Path, conf: &EtcdConf) -> io::Result<Client> {
        let mut writer = UnixStream::connect(socket)?;
        writer.set_write_timeout(Some(HELLO_WAIT))?;
        write_line(&mut writer, conf)?;
        let mut reader = BufReader::new(writer.try_clone()?);
        reader.get_ref().set_read_timeout(Some(HELLO_WAIT))?;
        let mut ready = String::new();
        reader.read_line(&mut ready)?;
        if ready.trim_end() != READY {
            return Err(io::Error::other(format!("the relay answered {ready:?}")));
        }
        Ok(Client { reader, writer })
    }

    /// One call; `Err` when the relay could not be asked or did not answer
    /// within `left` (and a little more for the socket).
    fn call(&mut self, call: &Call, left: Duration) -> io::Result<Reply> {
        let patience = left + Duration::from_millis(100);
        let req = Request {
            call: call.clone(),
            ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
        };
        self.writer.set_write_timeout(Some(patience))?;
        write_line(&mut self.writer, &req)?;
        self.reader.get_ref().set_read_timeout(Some(patience))?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        serde_json::from_str(&answer).map_err(io::Error::other)
    }
}

/// The etcd store of `conf`, through the node's relay while it answers and
/// straight to etcd otherwise; every call ends by `deadline`.
pub struct Relayed {
    conf: EtcdConf,
    deadline: Instant,
    relay: Option<Client>,
    direct: Option<EtcdStore>,
    name: String,
}

impl Relayed {
    /// Through the relay at `socket` when one listens there; the direct
    /// connection is only made when needed.
    pub fn open(socket: &Path, conf: &EtcdConf, deadline: Instant) -> Relayed {
        let relay = Client::connect(socket, conf)
            .inspect_err(|e| debug!(socket = %socket.display(), error = %e, "no store relay: straight to etcd"))
            .ok();
        Relayed {
            conf: conf.clone(),
            deadline,
            relay,
            direct: None,
            name: describe(&conf.endpoints, &conf.prefix),
        }
    }

    /// Whether calls still go through the relay.
    pub fn through_relay(&self) -> bool {
        self.relay.is_some()
    }

    /// The call through the relay; straight to etcd, with the time left,
    /// once the relay is gone, silent, or answered with an error (a relay
    /// that cannot reach etcd, or holds an expired token, is no reason for
    /// a call that can to fail). The relay is not asked again by this call's
    /// store: after a timeout its answers could come out of turn.
    fn call(&mut self, call: Call) -> Result<Reply, Error> {
        if let Some(relay) = &mut self.relay {
            let left = self.deadline.saturating_duration_since(Instant::now());
            let failed = match relay.call(&call, left) {
                Ok(Reply::Unreachable { detail, .. }) => detail,
                Ok(Reply::Config(m) | Reply::Failed(m)) => m,
                Ok(reply) => return Ok(reply),
                Err(e) => e.to_string(),
            };
            debug!(error = %failed, "store relay failed: straight to etcd");
            self.relay = None;
            if Instant::now() >= self.deadline {
                return Err(Error::Unreachable {
                    store: self.name.clone(),
                    detail: format!("through the store relay: {failed}"),
                });
            }
        }
        let direct = match &mut self.direct {
            Some(d) => d,
            None => self
                .direct
                .insert(EtcdStore::connect_shared(&self.conf)?.with_deadline(self.deadline)),
        };
        try_answer(direct, call)
    }

    fn kvs(&mut self, call: Call) -> Result<Vec<Kv>, Error> {
        match self.call(call)? {
            Reply::Kvs(kvs) => Ok(kvs),
            _ => Err(self.out_of_turn()),
        }
    }

    /// Every key under each of `prefixes`, read at one revision
    /// ([`EtcdStore::ranges`]).
    pub fn ranges(&mut self, prefixes: &[&str]) -> Result<Vec<Vec<Kv>>, Error> {
        let call = Call::Ranges(prefixes.iter().map(|p| p.to_string()).collect());
        match self.call(call)? {
            Reply::Ranges(out) => Ok(out),
            _ => Err(self.out_of_turn()),
        }
    }

    /// An answer of the wrong kind (errors never reach here: they send the
    /// call straight to etcd, whose errors come back as errors).
    fn out_of_turn(&self) -> Error {
        Error::Store(format!(
            "{}: the store relay answered out of turn",
            self.name
        ))
    }
}

impl Store for Relayed {
    fn get(&mut self, key: &str) -> Result<Option<Kv>, Error> {
        Ok(self.kvs(Call::Get(key.to_string()))?.into_iter().next())
    }

    fn get_many(&mut self, keys: &[String]) -> Result<Vec<Kv>, Error> {
        self.kvs(Call::GetMany(keys.to_vec()))
    }

    fn range(&mut self, prefix: &str) -> Result<Vec<Kv>, Error> {
        self.kvs(Call::Range(prefix.to_string()))
    }

    fn txn(&mut self, txn: Txn) -> Result<TxnOutcome, Error> {
        match self.call(Call::Txn(txn))? {
            Reply::Txn(out) => Ok(out),
            _ => Err(self.out_of_turn()),
        }
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}
