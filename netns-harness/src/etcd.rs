//! A real etcd (Debian's `etcd-server`) for tests: 1 or 3 members on free
//! loopback ports, each with its own data dir; members can be stopped and
//! restarted to exercise elections.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::Value;

use crate::scratch::Scratch;
use crate::Netns;

/// The etcd binary: `$ETCD_BIN`, else `etcd` on `PATH`.
fn etcd_bin() -> String {
    std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into())
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster, killed and wiped on drop.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    /// The netns the members run in (its path, and a hook that enters it).
    netns: Option<(PathBuf, cni::exec::Hook)>,
    _dir: Scratch,
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdCluster {
    /// Starts `size` members and waits until every one is healthy.
    pub fn start(size: usize) -> io::Result<EtcdCluster> {
        EtcdCluster::start_with(size, None)
    }

    /// The same, with the members inside `ns` (a test node's netns, so that
    /// plugins run there reach them on its loopback).
    pub fn start_in(size: usize, ns: &Netns) -> io::Result<EtcdCluster> {
        EtcdCluster::start_with(size, Some((ns.path().to_path_buf(), ns.enter_hook()?)))
    }

    fn start_with(
        size: usize,
        netns: Option<(PathBuf, cni::exec::Hook)>,
    ) -> io::Result<EtcdCluster> {
        let dir = Scratch::new("etcd")?;
        // Hold every listener until all ports are chosen so none repeats.
        let mut held = Vec::new();
        let mut members = Vec::new();
        for i in 0..size {
            let c = TcpListener::bind("127.0.0.1:0")?;
            let p = TcpListener::bind("127.0.0.1:0")?;
            members.push(Member {
                name: format!("m{i}"),
                client_port: c.local_addr()?.port(),
                peer_port: p.local_addr()?.port(),
                data_dir: dir.join(format!("m{i}.etcd")),
                log: dir.join(format!("m{i}.log")),
                child: None,
            });
            held.push((c, p));
        }
        drop(held);
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("plexus-{}", dir.path().display()).replace('/', "-");
        let mut cluster = EtcdCluster {
            members,
            initial_cluster,
            token,
            netns,
            _dir: dir,
        };
        for i in 0..size {
            cluster.spawn(i)?;
        }
        for i in 0..size {
            cluster.wait_healthy(i, Duration::from_secs(30))?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> io::Result<()> {
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)?;
        let mut cmd = Command::new(etcd_bin());
        if let Some((_, enter)) = &self.netns {
            enter(&mut cmd);
        }
        let child = cmd
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("start {}: {e}", etcd_bin())))?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Client endpoints, `http://127.0.0.1:<port>`, one per member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false: a cluster has at least one member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Kills member `i` (its data stays).
    pub fn stop_member(&mut self, i: usize) -> io::Result<()> {
        if let Some(mut child) = self.members[i].child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Restarts a stopped member from its data and waits for it to be healthy.
    pub fn restart_member(&mut self, i: usize) -> io::Result<()> {
        self.stop_member(i)?;
        self.spawn(i)?;
        self.wait_healthy(i, Duration::from_secs(30))
    }

    /// Whether member `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// Waits until member `i` answers `/health` with `true`.
    pub fn wait_healthy(&self, i: usize, timeout: Duration) -> io::Result<()> {
        let start = Instant::now();
        loop {
            if let Ok(body) = self.http(i, "GET", "/health", "") {
                if body.contains("\"health\":\"true\"") {
                    return Ok(());
                }
            }
            if start.elapsed() > timeout {
                let log = std::fs::read_to_string(&self.members[i].log).unwrap_or_default();
                let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join("\n");
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("etcd member {i} not healthy after {timeout:?}; log tail:\n{tail}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index of the current leader, asked of any running member.
    pub fn leader(&self) -> Option<usize> {
        for i in (0..self.members.len()).filter(|i| self.is_running(*i)) {
            let Ok(body) = self.http(i, "POST", "/v3/maintenance/status", "{}") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(&body) else {
                continue;
            };
            let leader = v.get("leader").and_then(Value::as_str).unwrap_or("");
            let me = v
                .pointer("/header/member_id")
                .and_then(Value::as_str)
                .unwrap_or("");
            if leader.is_empty() || leader == "0" {
                continue;
            }
            if leader == me {
                return Some(i);
            }
            // Ask the others which of them is the one named.
            for j in (0..self.members.len()).filter(|j| *j != i && self.is_running(*j)) {
                let Ok(b) = self.http(j, "POST", "/v3/maintenance/status", "{}") else {
                    continue;
                };
                if b.contains(&format!("\"member_id\":\"{leader}\"")) {
                    return Some(j);
                }
            }
        }
        None
    }

    /// `PUT` then `GET` of one key through the v3 JSON gateway of member `i`;
    /// returns the value read back.
    pub fn put_get(&self, i: usize, key: &str, value: &str) -> io::Result<String> {
        let put = format!(
            r#"{{"key":"{}","value":"{}"}}"#,
            B64.encode(key),
            B64.encode(value)
        );
        self.http(i, "POST", "/v3/kv/put", &put)?;
        self.get(i, key)
    }

    /// Linearizable `GET` of one key from member `i` (empty when absent).
    pub fn get(&self, i: usize, key: &str) -> io::Result<String> {
        let body = self.http(
            i,
            "POST",
            "/v3/kv/range",
            &format!(r#"{{"key":"{}"}}"#, B64.encode(key)),
        )?;
        let v: Value = serde_json::from_str(&body).map_err(io::Error::other)?;
        let got = v
            .pointer("/kvs/0/value")
            .and_then(Value::as_str)
            .unwrap_or("");
        let raw = B64.decode(got).map_err(io::Error::other)?;
        Ok(String::from_utf8_lossy(&raw).into_owned())
    }

    fn http(&self, i: usize, method: &str, path: &str, body: &str) -> io::Result<String> {
        let Some((ns, _)) = &self.netns else {
            return self.http_here(i, method, path, body);
        };
        let file = std::fs::File::open(ns)?;
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
                self.http_here(i, method, path, body)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("etcd probe thread panicked")))
        })
    }

    fn http_here(&self, i: usize, method: &str, path: &str, body: &str) -> io::Result<String> {
        let port = self.members[i].client_port;
        let mut s = TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(1),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            return Err(io::Error::other(format!(
                "etcd {method} {path}: {}",
                head.lines().next().unwrap_or("")
            )));
        }
        Ok(body.to_string())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            let _ = self.stop_member(i);
        }
    }
}

/// A port nothing listens on (for "etcd is down" tests).
pub fn closed_port() -> io::Result<u16> {
    free_port()
}
