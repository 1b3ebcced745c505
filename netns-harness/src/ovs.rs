//! A real OVS-DPDK for the tests: Debian's `ovsdb-server` and the DPDK
//! build of `ovs-vswitchd` (`openvswitch-switch-dpdk`) with a database, run
//! and log directory of their own, `dpdk-init`, `--no-pci`, small socket
//! memory and one PMD thread that sleeps when idle; the 2 MiB huge pages it
//! and its pods need are reserved while it runs and given back after.
//!
//! Pods stand in as `dpdk-testpmd` (Debian's `dpdk-dev`) in a netns, on a
//! `virtio_user` device at the pod's vhost-user socket, `--in-memory` so no
//! huge-page file outlives them.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::scratch::{unique, Scratch};
use crate::Netns;

const HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
/// Pages each running fixture adds: OVS's 128 MiB and two 64 MiB pods, with room.
const PAGES: u64 = 256;
const VSWITCHD: &str = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk";

/// Fixtures running in this process, which share the pages they added.
static RESERVED: Mutex<u64> = Mutex::new(0);

fn run(cmd: &mut Command) -> io::Result<String> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn pages() -> u64 {
    std::fs::read_to_string(HUGEPAGES)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn reserve(delta: i64) -> io::Result<()> {
    let mut held = RESERVED.lock().unwrap_or_else(|e| e.into_inner());
    let want = (pages() as i64 + delta).max(0) as u64;
    std::fs::write(HUGEPAGES, want.to_string())?;
    *held = (*held as i64 + delta).max(0) as u64;
    Ok(())
}

/// How the switch starts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dpdk {
    /// `dpdk-init=true`, huge pages reserved.
    On,
    /// No DPDK (`dpdk-init=false`): as on a node without huge pages.
    Off,
}

pub struct OvsDpdk {
    dir: PathBuf,
    reserved: bool,
    /// The netns ovs-vswitchd runs in: the tap devices of its user-space
    /// datapath (`ovs-netdev`, one per bridge) are named alike in every
    /// switch, so switches side by side in one netns refuse each other's.
    /// Its vhost-user and OVSDB sockets are files, reachable from anywhere.
    _netns: Netns,
}

impl OvsDpdk {
    pub fn start(scratch: &Scratch, dpdk: Dpdk) -> io::Result<OvsDpdk> {
        // Short paths: sockets live under them.
        let dir = PathBuf::from("/tmp").join(unique("ovs"));
        std::fs::create_dir_all(dir.join("run"))?;
        std::fs::create_dir_all(dir.join("log"))?;
        let _ = scratch;
        let mut ovs = OvsDpdk {
            dir,
            reserved: false,
            _netns: Netns::create(&unique("pxo"))?,
        };
        if dpdk == Dpdk::On {
            reserve(PAGES as i64)?;
            ovs.reserved = true;
        }
        run(Command::new("ovsdb-tool").args([
            "create",
            &ovs.dir.join("conf.db").display().to_string(),
            "/usr/share/openvswitch/vswitch.ovsschema",
        ]))?;
        ovs.start_db()?;
        ovs.vsctl(&["--no-wait", "init"])?;
        let init = if dpdk == Dpdk::On { "true" } else { "false" };
        ovs.vsctl(&[
            "--no-wait",
            "set",
            "Open_vSwitch",
            ".",
            &format!("other_config:dpdk-init={init}"),
            &format!(
                "other_config:dpdk-extra=--no-pci --file-prefix={}",
                unique("ovsdpdk")
            ),
            "other_config:dpdk-socket-mem=128",
            "other_config:dpdk-socket-limit=128",
            "other_config:pmd-cpu-mask=0x2",
            "other_config:pmd-maxsleep=500",
        ])?;
        let d = |f: &str| ovs.dir.join(f).display().to_string();
        let mut vswitchd = Command::new(VSWITCHD);
        (ovs._netns.enter_hook()?)(&mut vswitchd);
        run(vswitchd.env("OVS_RUNDIR", ovs.run_dir()).args([
            format!("unix:{}", d("run/db.sock")),
            format!("--unixctl={}", d("run/vswitchd.ctl")),
            format!("--pidfile={}", d("run/vswitchd.pid")),
            "--detach".into(),
            format!("--log-file={}", d("log/vswitchd.log")),
        ]))?;
        Ok(ovs)
    }

    /// Starts `ovsdb-server` (again) on the fixture's database.
    pub fn start_db(&self) -> io::Result<()> {
        let d = |f: &str| self.dir.join(f).display().to_string();
        run(Command::new("ovsdb-server")
            .env("OVS_RUNDIR", self.run_dir())
            .args([
                d("conf.db"),
                format!("--remote=punix:{}", d("run/db.sock")),
                format!("--unixctl={}", d("run/ovsdb.ctl")),
                format!("--pidfile={}", d("run/ovsdb-server.pid")),
                "--detach".into(),
                format!("--log-file={}", d("log/ovsdb.log")),
            ]))
        .map(|_| ())
    }

    fn kill_pidfile(&self, name: &str) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("run").join(name)) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
                let end = Instant::now() + Duration::from_secs(5);
                while Instant::now() < end
                    && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// Stops `ovsdb-server` (the switch keeps running).
    pub fn stop_db(&self) {
        self.kill_pidfile("ovsdb-server.pid");
        let _ = std::fs::remove_file(self.db_socket());
    }

    pub fn db_socket(&self) -> PathBuf {
        self.dir.join("run/db.sock")
    }

    /// The run directory, where `dpdkvhostuser` sockets appear.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// `ovs-vsctl` against this switch.
    pub fn vsctl(&self, args: &[&str]) -> io::Result<String> {
        run(Command::new("ovs-vsctl")
            .arg(format!("--db=unix:{}", self.db_socket().display()))
            .arg("--timeout=10")
            .args(args))
    }

    /// The ports of `bridge`.
    pub fn ports(&self, bridge: &str) -> Vec<String> {
        self.vsctl(&["list-ports", bridge])
            .map(|s| s.lines().map(String::from).collect())
            .unwrap_or_default()
    }

    /// An interface's statistics (`rx_packets`, `tx_packets`, …).
    pub fn stats(&self, iface: &str) -> BTreeMap<String, u64> {
        let raw = self
            .vsctl(&["get", "Interface", iface, "statistics"])
            .unwrap_or_default();
        raw.trim_matches(|c| c == '{' || c == '}')
            .split(", ")
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    /// The fixture's directory (for sockets of the tests' pods).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for OvsDpdk {
    fn drop(&mut self) {
        self.kill_pidfile("vswitchd.pid");
        self.kill_pidfile("ovsdb-server.pid");
        if self.reserved {
            let _ = reserve(-(PAGES as i64));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A DPDK application of a pod: `dpdk-testpmd` in the pod's netns on a
/// `virtio_user` device at its vhost-user socket, forwarding what it gets
/// back to `peer` (MAC forwarding) after a first burst of its own.
pub struct Testpmd {
    child: Child,
    log: PathBuf,
}

/// A testpmd's port counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PortCounters {
    pub rx: u64,
    pub tx: u64,
}

impl Testpmd {
    /// `server`: the pod is the vhost-user server (it makes the socket).
    pub fn start(
        ns: &Netns,
        socket: &Path,
        server: bool,
        mac: &str,
        peer: &str,
    ) -> io::Result<Testpmd> {
        let log = PathBuf::from("/tmp").join(format!("{}.log", unique("testpmd")));
        let out = std::fs::File::create(&log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "dpdk-testpmd"])
            .args([
                "-l",
                "0,1",
                "-m",
                "64",
                "--no-pci",
                "--in-memory",
                "--single-file-segments",
                &format!("--file-prefix={}", unique("pmd")),
                &format!(
                    "--vdev=virtio_user0,path={},server={},queues=1,mac={mac}",
                    socket.display(),
                    u8::from(server)
                ),
                "--",
                "--no-mlockall",
                "--total-num-mbufs=2048",
                "--forward-mode=mac",
                &format!("--eth-peer=0,{peer}"),
                "--tx-first",
                "-a",
                "--nb-cores=1",
                "--stats-period=1",
            ])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        Ok(Testpmd { child, log })
    }

    /// The counters testpmd printed last.
    pub fn counters(&self) -> PortCounters {
        let raw = std::fs::read(&self.log).unwrap_or_default();
        let text = String::from_utf8_lossy(&raw);
        let last = |key: &str| {
            text.rsplit(key)
                .next()
                .filter(|_| text.contains(key))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        PortCounters {
            rx: last("RX-packets:"),
            tx: last("TX-packets:"),
        }
    }

    /// Its output so far, for failure messages.
    pub fn output(&self) -> String {
        let raw = std::fs::read(&self.log).unwrap_or_default();
        let text = String::from_utf8_lossy(&raw);
        text.chars()
            .filter(|c| !c.is_control() || *c == '\n')
            .collect()
    }

    /// Waits until `what` holds of the counters (at most `limit`).
    pub fn wait(&self, limit: Duration, what: impl Fn(PortCounters) -> bool) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if what(self.counters()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        what(self.counters())
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}
