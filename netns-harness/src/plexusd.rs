//! A real `plexusd` for tests: TLS on a free loopback port with a
//! certificate the test's CA signed, a static token file, etcd from the
//! caller; stopped on drop. Also runs the clients people use against it:
//! `kubectl` (whatever is on `PATH`) and `plexusctl`.

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::etcd::Tls;
use crate::scratch::Scratch;

/// A binary of the workspace (`plexusd`, `plexusctl`): beside the `plexus`
/// under test, else beside this program or its parent directory (a test's
/// `deps/`). The musl `plexus` is built alone under its own target
/// directory, `plexusd` with the rest of the workspace.
pub fn sibling_bin(name: &str) -> PathBuf {
    let plexus_dir = crate::scratch::plexus_bin().parent().map(Path::to_path_buf);
    let own = std::env::current_exe().ok();
    let own_dir = own.as_deref().and_then(Path::parent);
    let found = [
        plexus_dir.as_deref(),
        own_dir,
        own_dir.and_then(Path::parent),
    ]
    .into_iter()
    .flatten()
    .map(|d| d.join(name))
    .find(|p| p.is_file());
    found
        .or_else(|| plexus_dir.map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// One user of the token file: token, name, groups.
pub type TokenUser<'a> = (&'a str, &'a str, &'a [&'a str]);

/// A running plexusd.
pub struct Plexusd {
    child: Option<Child>,
    port: u16,
    args: Vec<String>,
    /// The CA that signed its certificate (clients trust it).
    pub ca: PathBuf,
    pub log: PathBuf,
    dir: PathBuf,
    /// Enters the netns it and its clients run in (a test node's).
    netns: Option<cni::exec::Hook>,
}

impl Plexusd {
    /// Starts plexusd against `etcd` (client URLs), serving with `tls`'s
    /// certificate (issued for 127.0.0.1), with `users` in its token file;
    /// `extra` are more flags. Files go under `scratch`.
    pub fn start(
        scratch: &Scratch,
        etcd: &[String],
        tls: &Tls,
        users: &[TokenUser<'_>],
        extra: &[&str],
    ) -> io::Result<Plexusd> {
        Plexusd::start_in(scratch, etcd, tls, users, extra, None)
    }

    /// The same, with plexusd and the clients run here inside `netns`.
    pub fn start_in(
        scratch: &Scratch,
        etcd: &[String],
        tls: &Tls,
        users: &[TokenUser<'_>],
        extra: &[&str],
        netns: Option<&crate::Netns>,
    ) -> io::Result<Plexusd> {
        let dir = scratch.join(crate::scratch::unique("plexusd"));
        std::fs::create_dir_all(&dir)?;
        let tokens = dir.join("tokens.csv");
        let lines: Vec<String> = users
            .iter()
            .enumerate()
            .map(|(i, (t, u, g))| format!("{t},{u},{i},\"{}\"", g.join(",")))
            .collect();
        std::fs::write(&tokens, lines.join("\n") + "\n")?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut args: Vec<String> = vec![
            "--etcd-servers".into(),
            etcd.join(","),
            "--bind-address".into(),
            "127.0.0.1".into(),
            "--secure-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            tls.cert.display().to_string(),
            "--tls-private-key-file".into(),
            tls.key.display().to_string(),
            "--token-auth-file".into(),
            tokens.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut d = Plexusd {
            child: None,
            port,
            args,
            ca: tls.ca.clone(),
            log: dir.join("plexusd.log"),
            dir,
            netns: match netns {
                Some(ns) => Some(ns.enter_hook()?),
                None => None,
            },
        };
        d.spawn()?;
        Ok(d)
    }

    fn spawn(&mut self) -> io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let served_before = self.times_served();
        let bin = sibling_bin("plexusd");
        let mut cmd = Command::new(&bin);
        self.enter(&mut cmd);
        let child = cmd
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("start {}: {e}", bin.display())))?;
        self.child = Some(child);
        self.wait_ready(served_before, Duration::from_secs(20))
    }

    fn times_served(&self) -> usize {
        std::fs::read_to_string(&self.log).map_or(0, |l| l.matches("plexusd serving").count())
    }

    fn enter(&self, cmd: &mut Command) {
        if let Some(hook) = &self.netns {
            hook(cmd);
        }
    }

    /// Waits until it says it serves (its log line after the bind).
    fn wait_ready(&mut self, before: usize, timeout: Duration) -> io::Result<()> {
        let start = Instant::now();
        loop {
            if self.times_served() > before {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || start.elapsed() > timeout {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                return Err(io::Error::other(format!(
                    "plexusd not serving on port {} ({exited:?}): {log}",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Kills it (a crash, for the tests of a restart).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again with the same flags and port.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        self.spawn()
    }

    /// Runs `kubectl` against it as the user of `token`.
    pub fn kubectl(&self, token: &str, args: &[&str]) -> io::Result<Output> {
        let mut cmd = Command::new("kubectl");
        self.enter(&mut cmd);
        cmd.arg("--server")
            .arg(self.url())
            .arg("--token")
            .arg(token)
            .arg("--certificate-authority")
            .arg(&self.ca)
            // No kubeconfig of the machine's may change what the test sees.
            .env("KUBECONFIG", self.dir.join("no-kubeconfig"))
            .env("HOME", &self.dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
    }

    /// Runs `plexusctl` against it as the user of `token`.
    pub fn plexusctl(&self, token: &str, args: &[&str], stdin: Option<&str>) -> io::Result<Output> {
        let mut cmd = Command::new(sibling_bin("plexusctl"));
        self.enter(&mut cmd);
        cmd.env("PLEXUS_SERVER", self.url())
            .env("PLEXUS_TOKEN", token)
            .env("PLEXUS_CA", &self.ca)
            .env("HOME", &self.dir)
            .env_remove("PLEXUSCONFIG")
            .args(args);
        match stdin {
            None => cmd.stdin(Stdio::null()).output(),
            Some(text) => {
                use std::io::Write as _;
                cmd.stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                let mut child = cmd.spawn()?;
                if let Some(mut i) = child.stdin.take() {
                    i.write_all(text.as_bytes())?;
                }
                child.wait_with_output()
            }
        }
    }

    /// The directory of its files (token file, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Plexusd {
    fn drop(&mut self) {
        self.kill();
    }
}
