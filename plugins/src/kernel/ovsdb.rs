//! A client of `ovsdb-server` (the OVSDB management protocol, RFC 7047:
//! JSON-RPC on its unix socket), for the `Open_vSwitch` database that
//! `ovs-vswitchd` follows. One transaction per change, no `ovs-vsctl`.
//!
//! What a caller needs beyond a transaction is waiting for `ovs-vswitchd`:
//! a transaction that bumps `Open_vSwitch.next_cfg` is in force once the
//! switch has copied it to `cur_cfg` (as `ovs-vsctl` waits).

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The database `ovs-vswitchd` reads.
pub const DB: &str = "Open_vSwitch";

/// Where `ovsdb-server` listens: `explicit`, else `$OVS_RUNDIR/db.sock`,
/// else Debian's `/var/run/openvswitch/db.sock`.
pub fn socket_path(explicit: Option<&str>) -> PathBuf {
    if let Some(p) = explicit {
        return PathBuf::from(p.strip_prefix("unix:").unwrap_or(p));
    }
    let dir = std::env::var_os("OVS_RUNDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/run/openvswitch"));
    dir.join("db.sock")
}

/// What went wrong, as a sentence naming the socket.
#[derive(Debug)]
pub enum Failure {
    /// No server answers on the socket.
    Unreachable(String),
    /// The server answered with an error, or something unexpected.
    Refused(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unreachable(s) | Failure::Refused(s) => f.write_str(s),
        }
    }
}

pub struct Ovsdb {
    path: PathBuf,
    writer: UnixStream,
    reader: serde_json::StreamDeserializer<
        'static,
        serde_json::de::IoRead<BufReader<UnixStream>>,
        Value,
    >,
    next_id: u64,
    deadline: Instant,
}

impl Ovsdb {
    /// Connects; every later call ends by `timeout` from now.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Ovsdb, Failure> {
        let unreachable = |e: std::io::Error| {
            Failure::Unreachable(format!("ovsdb-server at {}: {e}", path.display()))
        };
        let stream = UnixStream::connect(path).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(unreachable)?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(unreachable)?;
        let reader = stream.try_clone().map_err(unreachable)?;
        Ok(Ovsdb {
            path: path.to_path_buf(),
            writer: stream,
            reader: serde_json::Deserializer::from_reader(BufReader::new(reader)).into_iter(),
            next_id: 1,
            deadline: Instant::now() + timeout,
        })
    }

    fn refused(&self, what: impl std::fmt::Display) -> Failure {
        Failure::Refused(format!("ovsdb-server at {}: {what}", self.path.display()))
    }

    fn gone(&self, what: impl std::fmt::Display) -> Failure {
        Failure::Unreachable(format!("ovsdb-server at {}: {what}", self.path.display()))
    }

    /// Sends a request of `method` with a fresh id; the id.
    fn send(&mut self, method: &str, params: Value) -> Result<u64, Failure> {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"method": method, "params": params, "id": id});
        let raw = serde_json::to_vec(&request).map_err(|e| self.refused(e))?;
        self.writer.write_all(&raw).map_err(|e| self.gone(e))?;
        Ok(id)
    }

    /// Sends a request, returns its `result` (answering the server's echo
    /// requests meanwhile).
    fn call(&mut self, method: &str, params: Value) -> Result<Value, Failure> {
        let id = self.send(method, params)?;
        loop {
            if Instant::now() > self.deadline {
                return Err(self.refused(format!("no answer to {method} in time")));
            }
            let msg = self.next_message()?;
            if msg.get("id") != Some(&json!(id)) {
                continue;
            }
            if !msg["error"].is_null() {
                return Err(self.refused(format!("{method}: {}", msg["error"])));
            }
            return Ok(msg["result"].clone());
        }
    }

    /// The next message from the server, its echo requests answered.
    fn next_message(&mut self) -> Result<Value, Failure> {
        loop {
            let msg = match self.reader.next() {
                Some(Ok(v)) => v,
                Some(Err(e)) => return Err(self.gone(e)),
                None => return Err(self.gone("connection closed")),
            };
            if msg.get("method").and_then(Value::as_str) != Some("echo") {
                return Ok(msg);
            }
            let reply = json!({"result": msg["params"], "error": null, "id": msg["id"]});
            let raw = serde_json::to_vec(&reply).map_err(|e| self.refused(e))?;
            let _ = self.writer.write_all(&raw);
        }
    }

    /// One transaction of `ops`; their results. An operation's error fails
    /// the whole transaction (the server applied nothing).
    pub fn transact(&mut self, ops: Vec<Value>) -> Result<Vec<Value>, Failure> {
        let mut params = vec![json!(DB)];
        params.extend(ops);
        let result = self.call("transact", Value::Array(params))?;
        let results = result.as_array().cloned().unwrap_or_default();
        if let Some(err) = results.iter().find(|r| r.get("error").is_some()) {
            return Err(self.refused(format!(
                "transaction refused: {}{}",
                err["error"].as_str().unwrap_or("error"),
                err.get("details")
                    .and_then(Value::as_str)
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            )));
        }
        Ok(results)
    }

    /// The rows of `table` matching `conditions`, with `columns`.
    pub fn select(
        &mut self,
        table: &str,
        conditions: Value,
        columns: &[&str],
    ) -> Result<Vec<Value>, Failure> {
        let results = self.transact(vec![json!({
            "op": "select", "table": table, "where": conditions, "columns": columns,
        })])?;
        Ok(results
            .first()
            .and_then(|r| r["rows"].as_array().cloned())
            .unwrap_or_default())
    }

    /// Waits until `ovs-vswitchd` has applied configuration `cfg`
    /// (`cur_cfg >= cfg`): a monitor of `cur_cfg`, whose updates the server
    /// pushes as the switch writes them (no polling).
    pub fn wait_applied(&mut self, cfg: i64) -> Result<(), Failure> {
        let id = self.send(
            "monitor",
            json!([DB, "cur_cfg", {DB: {"columns": ["cur_cfg"]}}]),
        )?;
        let mut cur = 0;
        loop {
            if Instant::now() > self.deadline {
                return Err(self.refused(format!(
                    "ovs-vswitchd has not applied the change (cur_cfg {cur}, waiting for {cfg}): is it running?"
                )));
            }
            let msg = self.next_message()?;
            // The initial rows (the monitor's result) or an update.
            let rows = if msg.get("id") == Some(&json!(id)) {
                if !msg["error"].is_null() {
                    return Err(self.refused(format!("monitor: {}", msg["error"])));
                }
                msg["result"][DB].clone()
            } else if msg.get("method").and_then(Value::as_str) == Some("update") {
                msg["params"][1][DB].clone()
            } else {
                continue;
            };
            if let Some(rows) = rows.as_object() {
                for row in rows.values() {
                    if let Some(c) = row["new"]["cur_cfg"].as_i64() {
                        cur = c;
                    }
                }
            }
            if cur >= cfg {
                // The monitor ends with the connection.
                return Ok(());
            }
        }
    }
}

/// An OVSDB map (`["map", [[k, v], …]]`) as pairs of strings.
pub fn map(value: &Value) -> Vec<(String, String)> {
    value
        .get(1)
        .and_then(Value::as_array)
        .map(|pairs| {
            pairs
                .iter()
                .filter_map(|p| Some((p[0].as_str()?.to_string(), p[1].as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// An OVSDB map from pairs.
pub fn to_map(pairs: &[(&str, &str)]) -> Value {
    json!([
        "map",
        pairs.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>()
    ])
}

/// The UUIDs of an OVSDB set of references (one `["uuid", …]` or a
/// `["set", [...]]`).
pub fn uuids(value: &Value) -> Vec<String> {
    match value.get(0).and_then(Value::as_str) {
        Some("uuid") => value[1].as_str().map(String::from).into_iter().collect(),
        Some("set") => value[1]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|u| u[1].as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}
