//! A real etcd (Debian's `etcd-server`) for tests: 1 or 3 members on free
//! loopback ports, each with its own data dir; members can be stopped and
//! restarted to exercise elections.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
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
    /// Client URLs over TLS with client-certificate authentication.
    tls: Option<Tls>,
    /// An address of the netns clients elsewhere reach the members on too.
    also_on: Option<String>,
    _dir: Scratch,
}

/// A CA, and a certificate and key it signed (PEM files).
#[derive(Debug, Clone)]
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(args: &[&str]) -> io::Result<()> {
    let out = Command::new("openssl").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "openssl {}: {}",
            args.first().copied().unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Tls {
    /// A test CA in `dir` and two P-256 certificates it signs: one for etcd
    /// (server and client use, for 127.0.0.1) and one for a client.
    pub fn generate(dir: &Path) -> io::Result<(Tls, Tls)> {
        let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        let (ca_key, ca_pem) = (p("ca.key"), p("ca.pem"));
        ca.extend([
            "-keyout",
            &ca_key,
            "-out",
            &ca_pem,
            "-days",
            "2",
            "-subj",
            "/CN=plexus-test-ca",
        ]);
        openssl(&ca)?;
        let mut issued = Vec::new();
        for (name, usage) in [("etcd", "serverAuth,clientAuth"), ("client", "clientAuth")] {
            let (key, csr, pem, ext) = (
                p(&format!("{name}.key")),
                p(&format!("{name}.csr")),
                p(&format!("{name}.pem")),
                p(&format!("{name}.ext")),
            );
            std::fs::write(
                &ext,
                format!("subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"),
            )?;
            let mut req = vec!["req"];
            req.extend(ec);
            let subj = format!("/CN={name}");
            req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(&req)?;
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_pem,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ])?;
            issued.push(Tls {
                ca: PathBuf::from(&ca_pem),
                cert: PathBuf::from(pem),
                key: PathBuf::from(key),
            });
        }
        let client = issued
            .pop()
            .ok_or_else(|| io::Error::other("no client cert"))?;
        let server = issued
            .pop()
            .ok_or_else(|| io::Error::other("no server cert"))?;
        Ok((server, client))
    }
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdCluster {
    /// Starts `size` members and waits until every one is healthy.
    pub fn start(size: usize) -> io::Result<EtcdCluster> {
        EtcdCluster::start_with(size, None, None)
    }

    /// The same, serving clients over TLS only to clients with a
    /// certificate `server.ca` signed; `server` is etcd's own certificate.
    pub fn start_tls(size: usize, server: Tls) -> io::Result<EtcdCluster> {
        EtcdCluster::start_with(size, None, Some(server))
    }

    /// The same, with the members inside `ns` (a test node's netns, so that
    /// plugins run there reach them on its loopback).
    pub fn start_in(size: usize, ns: &Netns) -> io::Result<EtcdCluster> {
        EtcdCluster::start_with(
            size,
            Some((ns.path().to_path_buf(), ns.enter_hook()?)),
            None,
        )
    }

    /// The same as [`EtcdCluster::start_in`], the members also answering
    /// clients on `ip` (an address of `ns`, e.g. on a link to other nodes).
    pub fn start_in_on(size: usize, ns: &Netns, ip: &str) -> io::Result<EtcdCluster> {
        let mut c = EtcdCluster::start_with(
            size,
            Some((ns.path().to_path_buf(), ns.enter_hook()?)),
            None,
        )?;
        c.also_on = Some(ip.to_string());
        for i in 0..size {
            c.restart_member(i)?;
        }
        Ok(c)
    }

    /// Client endpoints on the address of [`EtcdCluster::start_in_on`].
    pub fn endpoints_on(&self) -> Vec<String> {
        let ip = self.also_on.as_deref().unwrap_or("127.0.0.1");
        self.members
            .iter()
            .map(|m| format!("http://{ip}:{}", m.client_port))
            .collect()
    }

    fn start_with(
        size: usize,
        netns: Option<(PathBuf, cni::exec::Hook)>,
        tls: Option<Tls>,
    ) -> io::Result<EtcdCluster> {
        // A port is free when chosen and taken when etcd binds it; another
        // test process may take it in between. Try again with new ports then.
        let mut tries = 0;
        loop {
            tries += 1;
            match EtcdCluster::try_start(size, netns.clone(), tls.clone()) {
                Err(e) if tries < 4 && e.to_string().contains("address already in use") => continue,
                other => return other,
            }
        }
    }

    fn try_start(
        size: usize,
        netns: Option<(PathBuf, cni::exec::Hook)>,
        tls: Option<Tls>,
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
            tls,
            also_on: None,
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
        let client = self.url(i);
        let listen = match &self.also_on {
            Some(ip) => format!("{client},http://{ip}:{}", m.client_port),
            None => client.clone(),
        };
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)?;
        let mut cmd = Command::new(etcd_bin());
        if let Some((_, enter)) = &self.netns {
            enter(&mut cmd);
        }
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args([
                "--listen-client-urls",
                &listen,
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

    /// Client endpoints, `http://127.0.0.1:<port>` (`https` with TLS), one per member.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.url(i)).collect()
    }

    fn url(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.members[i].client_port)
    }

    /// Runs Debian's `etcdctl` against member `i` (with etcd's own
    /// certificate under TLS); its stdout.
    pub fn etcdctl(&self, i: usize, args: &[&str]) -> io::Result<String> {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.url(i)));
        if let Some(tls) = &self.tls {
            cmd.arg(format!("--cacert={}", tls.ca.display()))
                .arg(format!("--cert={}", tls.cert.display()))
                .arg(format!("--key={}", tls.key.display()));
        }
        if let Some((_, enter)) = &self.netns {
            enter(&mut cmd);
        }
        let out = cmd.args(args).output()?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(io::Error::other(format!(
                "etcdctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// Turns on etcd's authentication with a `root` user of `password`.
    pub fn enable_auth(&self, password: &str) -> io::Result<()> {
        self.etcdctl(0, &["user", "add", &format!("root:{password}")])?;
        self.etcdctl(0, &["auth", "enable"]).map(|_| ())
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

    /// Whether member `i`'s process has ended although it was not stopped.
    fn exited(&self, i: usize) -> bool {
        let pid = self.members[i].child.as_ref().map(Child::id);
        pid.is_some_and(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Field 3 of stat, after the command in parentheses: Z once it died.
            match stat.rsplit_once(')') {
                Some((_, rest)) => rest.trim_start().starts_with('Z'),
                None => true,
            }
        })
    }

    /// Whether member `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// Waits until member `i` answers `/health` with `true`.
    pub fn wait_healthy(&self, i: usize, timeout: Duration) -> io::Result<()> {
        let start = Instant::now();
        loop {
            let healthy = if self.tls.is_some() {
                self.etcdctl(i, &["endpoint", "health"]).is_ok()
            } else {
                self.http(i, "GET", "/health", "")
                    .is_ok_and(|b| b.contains("\"health\":\"true\""))
            };
            if healthy {
                return Ok(());
            }
            if start.elapsed() > timeout || self.exited(i) {
                let log = std::fs::read_to_string(&self.members[i].log).unwrap_or_default();
                let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join("\n");
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "etcd member {i} not healthy after {:?}; log tail:\n{tail}",
                        start.elapsed()
                    ),
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
