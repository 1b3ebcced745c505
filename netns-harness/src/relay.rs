//! A real `plexus store-relay` for tests and the bench: started inside a
//! netns (where its etcd is), its log in the scratch dir, stopped on drop.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::scratch::plexus_bin;

pub struct StoreRelay {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl StoreRelay {
    /// Starts a relay listening on `socket`, inside `netns`; its log beside
    /// the socket. Returns once the socket accepts connections.
    pub fn start_in(netns: &Netns, socket: &Path) -> io::Result<StoreRelay> {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let log = socket.with_extension("log");
        let mut cmd = Command::new(plexus_bin());
        cmd.args(["store-relay", &socket.to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        (netns.enter_hook()?)(&mut cmd);
        let mut relay = StoreRelay {
            child: Some(cmd.spawn()?),
            socket: socket.to_path_buf(),
            log,
        };
        let started = Instant::now();
        while UnixStream::connect(socket).is_err() {
            if let Some(status) = relay
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(io::Error::other(format!(
                    "store relay exited ({status}): {}",
                    relay.log_text()
                )));
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(io::Error::other("store relay did not listen within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(relay)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// What the relay logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `limit` for a line of the relay's log that `matches`;
    /// whether one came. What the relay does once a client has hung up
    /// (learning a leader) is logged after that client's answer.
    pub fn logged_within(&self, limit: Duration, matches: impl Fn(&str) -> bool) -> bool {
        let started = Instant::now();
        loop {
            if self.log_text().lines().any(&matches) {
                return true;
            }
            if started.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The relay's peak resident memory so far (KiB), from the kernel.
    pub fn peak_rss_kb(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Kills the relay (its socket file stays, as after a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for StoreRelay {
    fn drop(&mut self) {
        self.kill();
    }
}
