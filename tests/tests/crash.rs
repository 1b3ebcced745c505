//! Plexus killed at every step of its work. The steps are not listed here:
//! a traced run of ADD and of DEL names them (`PLEXUS_CRASH_TRACE`, debug
//! builds), and each is then killed in turn (`PLEXUS_CRASH_AT`, SIGKILL)
//! under `plexus` with the cluster network `plexus-veth` and a secondary
//! `plexus-macvlan`, both on `plexus-ipam`. After each kill the runtime
//! cleans up one of three ways — DEL with the netns, DEL once the netns is
//! gone, or only GC once it is gone — and then nothing may be left: no link,
//! address, route or permanent neighbour on the node or in the pod, no IPAM
//! handle, address or journal entry, no Plexus record. The test prints the
//! matrix.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use cni::NetConfList;
use ipam::store::Store;
use netns_harness::{kernel, Netns, Pod, Runtime};
use plexus_tests::*;
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Cleanup {
    DelWithNetns,
    DelWithoutNetns,
    GcOnly,
}

const CLEANUPS: [Cleanup; 3] = [
    Cleanup::DelWithNetns,
    Cleanup::DelWithoutNetns,
    Cleanup::GcOnly,
];

struct Setup {
    node: Node,
    list: NetConfList,
    ipam_dirs: Vec<PathBuf>,
    baseline: BTreeSet<String>,
    stack: Stack,
}

/// The node's links, addresses, routes and permanent neighbours.
fn kernel_state(ns: &str) -> BTreeSet<String> {
    // A link going away while it is listed fails the listing: again.
    let mut tries = 0;
    let snapshot = loop {
        match kernel::snapshot(ns) {
            Ok(s) => break s,
            Err(e) if tries > 50 => panic!("snapshot of {ns}: {e}"),
            Err(_) => tries += 1,
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let mut out: BTreeSet<String> = snapshot.into_iter().collect();
    for fam in ["-4", "-6"] {
        let o = std::process::Command::new("ip")
            .args(["-n", ns, fam, "neigh", "show", "nud", "permanent"])
            .output()
            .expect("ip neigh");
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| format!("neigh {l}")),
        );
    }
    out
}

/// What the runtime runs: `plexus` with both built-ins under it, or one
/// built-in on its own (exec'd by the runtime, `plexus-ipam` in-process).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stack {
    Plexus,
    Veth,
    Macvlan,
}

fn setup(stack: Stack) -> Setup {
    let node = Node::new("crash");
    let dir = |name: &str| node.scratch.join(name);
    let ipam = |subnets: &[&str], state: &Path| {
        let ranges: Vec<_> = subnets.iter().map(|s| json!([{"subnet": s}])).collect();
        json!({"type": "plexus-ipam", "ranges": ranges, "stateDir": state})
    };
    let (pods_dir, data_dir) = (dir("ipam-pods"), dir("ipam-data"));
    let cluster = json!({
        "cniVersion": "1.1.0", "name": "pods", "type": "plexus-veth",
        "ipam": ipam(&["10.77.0.0/24", "fd00:77::/120"], &pods_dir),
    });
    node.define(
        "data.yaml",
        &nad(
            "data",
            None,
            &json!({"cniVersion": "1.1.0", "type": "plexus-macvlan", "master": UPLINK,
                    "mode": "bridge", "ipam": ipam(&["10.78.0.0/24"], &data_dir)}),
        ),
    );
    let alone = |conf: serde_json::Value| {
        let mut conf = conf;
        conf["name"] = json!("alone");
        NetConfList::parse_value(&conf).expect("conflist")
    };
    let list = match stack {
        Stack::Plexus => node.plexus_list("1.1.0", cluster),
        Stack::Veth => alone(cluster),
        Stack::Macvlan => alone(json!({"cniVersion": "1.1.0", "type": "plexus-macvlan",
            "master": UPLINK, "mode": "bridge", "ipam": ipam(&["10.78.0.0/24"], &data_dir)})),
    };
    // One pod first, so that what a first ADD sets once on the node
    // (forwarding, state dirs) is part of the baseline.
    let (_ns, pod) = node.pod("default");
    let pod = pod.networks("data");
    node.runtime.add(&list, &pod).expect("warm-up ADD");
    node.runtime.del(&list, &pod).expect("warm-up DEL");
    let baseline = kernel_state(node.ns());
    Setup {
        node,
        list,
        ipam_dirs: vec![pods_dir, data_dir],
        baseline,
        stack,
    }
}

impl Setup {
    fn pod(&self) -> (Netns, Pod) {
        let (ns, pod) = self.node.pod("default");
        (ns, pod.networks("data"))
    }

    fn runtime(&self, env: &[(&str, &str)]) -> Runtime {
        self.node
            .runtime
            .with_env(&self.node.netns, env)
            .expect("runtime")
    }

    /// The steps a run of `what` goes through, in order.
    fn steps(&self, what: impl FnOnce(&Runtime)) -> Vec<String> {
        let trace = self.node.scratch.join("trace");
        let _ = std::fs::remove_file(&trace);
        let traced = trace.display().to_string();
        what(&self.runtime(&[("PLEXUS_CRASH_TRACE", &traced)]));
        let text = std::fs::read_to_string(&trace).unwrap_or_default();
        let mut seen = BTreeSet::new();
        text.lines()
            .filter(|l| seen.insert(l.to_string()))
            .map(String::from)
            .collect()
    }

    /// What is left of `pod` (whose netns may be gone).
    fn leaks(&self, pod: &Pod, ns: Option<&Netns>) -> Vec<String> {
        let mut out = Vec::new();
        // A netns deleted goes in the kernel's own time, its veths with it.
        let start = std::time::Instant::now();
        let now = loop {
            let now = kernel_state(self.node.ns());
            if now == self.baseline || start.elapsed() > std::time::Duration::from_secs(3) {
                break now;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        out.extend(now.difference(&self.baseline).map(|l| format!("node: {l}")));
        out.extend(
            self.baseline
                .difference(&now)
                .map(|l| format!("node lost: {l}")),
        );
        if let Some(ns) = ns {
            for l in kernel::snapshot(ns.name()).unwrap_or_default() {
                if !l.starts_with("link lo ") && !l.starts_with("addr lo ") && !l.contains(" lo ") {
                    out.push(format!("pod: {l}"));
                }
            }
        }
        for dir in self.ipam_dirs.iter().filter(|d| d.exists()) {
            let mut store = ipam::LocalStore::open(&dir.join("store")).expect("IPAM store");
            for kv in store.range("handles/").expect("handles") {
                out.push(format!("IPAM handle {}", kv.key));
            }
            for kv in store.range("blocks/").expect("blocks") {
                let block: ipam::block::Block = serde_json::from_slice(&kv.value).expect("block");
                if !block.is_empty() {
                    out.push(format!("IPAM addresses in {}", kv.key));
                }
            }
            let journal = std::fs::read_dir(dir.join("journal"))
                .map(|d| d.count())
                .unwrap_or(0);
            if journal > 0 {
                out.push(format!(
                    "{journal} IPAM journal entries in {}",
                    dir.display()
                ));
            }
        }
        out.extend(
            files_naming(&self.node.plexus_cache(), &pod.container_id)
                .into_iter()
                .map(|f| format!("record {f}")),
        );
        out
    }

    /// Cleans up after a kill, as the runtime would, then counts leaks.
    fn clean(&self, how: Cleanup, ns: Netns, pod: &Pod) -> Vec<String> {
        let rt = &self.node.runtime;
        let (kept, outcome) = match how {
            Cleanup::DelWithNetns => {
                let del = rt.del(&self.list, pod);
                (Some(ns), del)
            }
            Cleanup::DelWithoutNetns => {
                ns.delete().expect("delete netns");
                (None, rt.del_without_netns(&self.list, pod))
            }
            Cleanup::GcOnly => {
                ns.delete().expect("delete netns");
                (None, Ok(()))
            }
        };
        let gc = rt.gc(&self.list, &[]);
        let mut leaks = Vec::new();
        if let Err(e) = outcome {
            leaks.push(format!("DEL failed: {e}"));
        }
        if let Err(e) = gc {
            leaks.push(format!("GC failed: {e}"));
        }
        leaks.extend(self.leaks(pod, kept.as_ref()));
        leaks
    }
}

fn files_naming(dir: &Path, id: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.filter_map(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_naming(&p, id));
        } else if p.to_string_lossy().contains(id)
            || std::fs::read_to_string(&p).is_ok_and(|t| t.contains(id))
        {
            out.push(p.display().to_string());
        }
    }
    out
}

#[test]
fn killed_at_every_step_of_add_and_del_nothing_is_left() {
    let mut rows = Vec::new();
    let mut all = Vec::new();
    for stack in [Stack::Plexus, Stack::Veth, Stack::Macvlan] {
        matrix(&setup(stack), &mut rows, &mut all);
    }
    let width = rows.iter().map(|(s, _)| s.len()).max().unwrap_or(0);
    let mut table = format!(
        "\n{:width$}  {:>14}  {:>17}  {:>7}\n",
        "killed at", "DEL with netns", "DEL without netns", "GC only"
    );
    for (step, row) in &rows {
        table += &format!(
            "{step:width$}  {:>14}  {:>17}  {:>7}\n",
            row[0], row[1], row[2]
        );
    }
    eprintln!("{table}leaks found after each kill and cleanup (all must be 0)");
    assert!(all.is_empty(), "{}", all.join("\n"));
}

/// Every step of ADD and DEL of `s`'s stack killed in turn, each cleaned
/// up the three ways; the node works afterwards.
fn matrix(s: &Setup, rows: &mut Vec<(String, Vec<usize>)>, all: &mut Vec<String>) {
    let name = match s.stack {
        Stack::Plexus => "plexus",
        Stack::Veth => "plexus-veth",
        Stack::Macvlan => "plexus-macvlan",
    };
    let add_steps = s.steps(|rt| {
        let (_ns, pod) = s.pod();
        rt.add(&s.list, &pod).expect("traced ADD");
        s.node.runtime.del(&s.list, &pod).expect("DEL");
    });
    let del_steps = s.steps(|rt| {
        let (_ns, pod) = s.pod();
        s.node.runtime.add(&s.list, &pod).expect("ADD");
        rt.del(&s.list, &pod).expect("traced DEL");
    });
    assert!(
        add_steps.len() >= 4 && del_steps.len() >= 2,
        "steps: ADD {add_steps:?}, DEL {del_steps:?}"
    );
    for (cmd, steps) in [("ADD", &add_steps), ("DEL", &del_steps)] {
        for step in steps {
            let crashing = s.runtime(&[("PLEXUS_CRASH_AT", step)]);
            let mut row = Vec::new();
            for how in CLEANUPS {
                let (ns, pod) = s.pod();
                let killed = if cmd == "ADD" {
                    crashing.add(&s.list, &pod).err()
                } else {
                    s.node.runtime.add(&s.list, &pod).expect("ADD before DEL");
                    crashing.del(&s.list, &pod).err()
                };
                let mut leaks = Vec::new();
                if killed.is_none() {
                    leaks.push(format!("{cmd} was not killed at {step}"));
                }
                leaks.extend(s.clean(how, ns, &pod));
                row.push(leaks.len());
                all.extend(
                    leaks
                        .into_iter()
                        .map(|l| format!("{name} {cmd} killed at {step}, {how:?}: {l}")),
                );
            }
            rows.push((format!("{name} {cmd} {step}"), row));
        }
    }

    // And the node still works.
    let (ns, pod) = s.pod();
    let result = s
        .node
        .runtime
        .add(&s.list, &pod)
        .expect("ADD after the kills");
    let want = match s.stack {
        Stack::Plexus => 3,
        Stack::Veth => 2,
        Stack::Macvlan => 1,
    };
    assert_eq!(
        result["ips"].as_array().map(Vec::len),
        Some(want),
        "{result}"
    );
    s.node.runtime.del(&s.list, &pod).expect("DEL");
    all.extend(
        s.leaks(&pod, Some(&ns))
            .into_iter()
            .map(|l| format!("{name}: after the kills, ADD and DEL: {l}")),
    );
}

/// A tmpfs mounted for a test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&dir).expect("mount point");
        mount(
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
            &dir,
        );
        Tmpfs(dir)
    }

    fn remount(&self, how: &str) {
        mount(&["-o", &format!("remount,{how}")], &self.0);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn mount(args: &[&str], dir: &Path) {
    let st = std::process::Command::new("mount")
        .args(args)
        .arg(dir)
        .status()
        .expect("mount");
    assert!(st.success(), "mount {args:?} {}", dir.display());
}

/// Fills the filesystem of `dir`; the file that fills it.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    path
}

/// The cache filesystem (Plexus' records and `plexus-ipam`'s state on one
/// small tmpfs, as `/var/lib/plexus` on a node) read-only, then full: ADD
/// fails with a clear error and leaves nothing; a DEL that cannot write
/// fails and changes nothing, and the runtime's retry once there is room
/// cleans up; a pod ADDed before goes away whole.
#[test]
fn a_read_only_or_full_cache_filesystem_fails_add_cleanly_and_del_finishes_later() {
    let node = Node::new("crash-fs");
    let fs = Tmpfs::mount(node.plexus_cache(), "1m");
    let state = node.plexus_cache().join("ipam");
    let cluster = json!({
        "cniVersion": "1.1.0", "name": "pods", "type": "plexus-veth",
        "ipam": {"type": "plexus-ipam", "ranges": [[{"subnet": "10.79.0.0/24"}]],
                 "stateDir": state},
    });
    let list = node.plexus_list("1.1.0", cluster);
    let s = Setup {
        baseline: kernel_state(node.ns()),
        list,
        ipam_dirs: vec![state.clone()],
        stack: Stack::Plexus,
        node,
    };
    let (ns_a, pod_a) = s.node.pod("default");
    s.node
        .runtime
        .add(&s.list, &pod_a)
        .expect("ADD before the fault");
    let baseline_with_a = kernel_state(s.node.ns());

    for fault in ["read-only", "full"] {
        let filler = match fault {
            "read-only" => {
                fs.remount("ro");
                None
            }
            _ => Some(fill(&fs.0)),
        };
        let (ns, pod) = s.node.pod("default");
        let err = s
            .node
            .runtime
            .add(&s.list, &pod)
            .expect_err("ADD on a faulty cache filesystem");
        assert!(
            err.msg.contains(&fs.0.display().to_string())
                || err.details.contains("space")
                || err.details.contains("Read-only"),
            "{fault}: the error names the fault: {err:?}"
        );
        assert_eq!(
            kernel_state(s.node.ns()),
            baseline_with_a,
            "{fault}: a failed ADD left something"
        );
        // The runtime's DEL after the failed ADD succeeds.
        s.node
            .runtime
            .del(&s.list, &pod)
            .expect("DEL after failed ADD");
        drop(ns);
        match filler {
            None => fs.remount("rw"),
            Some(f) => std::fs::remove_file(f).expect("room again"),
        }
        let leaks: Vec<String> = s
            .leaks(&pod, None)
            .into_iter()
            .filter(|l| l.contains(&pod.container_id))
            .collect();
        assert_eq!(leaks, Vec::<String>::new(), "{fault}");
    }

    // DEL of pod A while nothing can be written: it fails (the runtime
    // retries) or finishes; once there is room the retry leaves nothing.
    let filler = fill(&fs.0);
    let first = s.node.runtime.del(&s.list, &pod_a);
    std::fs::remove_file(filler).expect("room again");
    if first.is_err() {
        s.node.runtime.del(&s.list, &pod_a).expect("DEL retried");
    }
    s.node.runtime.gc(&s.list, &[]).expect("GC");
    assert_eq!(s.leaks(&pod_a, Some(&ns_a)), Vec::<String>::new());
    eprintln!("DEL with the cache filesystem full: {first:?}");
}

/// etcd down for ADD, for DEL (with and without the netns) and between
/// them, under `plexus` with `plexus-ipam` on etcd: ADD fails in time with
/// code 11 and leaves nothing; DEL succeeds and journals the release, which
/// the next call that reaches etcd (here GC) replays; at the end etcd holds
/// no handle and the node is as before.
#[test]
fn etcd_down_for_add_for_del_and_between_leaves_nothing() {
    use netns_harness::etcd::EtcdCluster;
    let node = Node::new("crash-etcd");
    let mut etcd = EtcdCluster::start_in(1, &node.netns).expect("etcd");
    let state = node.scratch.join("ipam-state");
    let mut ipam = plexus_ipam_on_etcd(
        &["10.80.0.0/24", "fd00:80::/120"],
        &etcd.endpoints(),
        "node-1",
        &state,
    );
    ipam["store"]["timeoutSeconds"] = json!(1);
    let cluster = json!({"cniVersion": "1.1.0", "name": "pods", "type": "plexus-veth",
                         "ipam": ipam});
    let list = node.plexus_list("1.1.0", cluster);
    let (_warm_ns, warm) = node.pod("default");
    node.runtime.add(&list, &warm).expect("warm-up ADD");
    node.runtime.del(&list, &warm).expect("warm-up DEL");
    let baseline = kernel_state(node.ns());
    let handles = |etcd: &EtcdCluster| {
        etcd.etcdctl(
            0,
            &["get", "--prefix", "--keys-only", "/plexus/ipam/handles/"],
        )
        .expect("etcdctl")
        .lines()
        .filter(|l| !l.is_empty())
        .count()
    };

    // Down for ADD.
    etcd.stop_member(0).expect("stop");
    let (ns_a, pod_a) = node.pod("default");
    let started = std::time::Instant::now();
    let err = node
        .runtime
        .add(&list, &pod_a)
        .expect_err("ADD with etcd down");
    assert_eq!(err.code, cni::code::TRY_AGAIN_LATER, "{err:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(4));
    assert_eq!(kernel_state(node.ns()), baseline, "ADD with etcd down");
    node.runtime
        .del(&list, &pod_a)
        .expect("DEL after the failed ADD");
    drop(ns_a);
    etcd.restart_member(0).expect("restart");

    // Down between ADD and DEL: with the netns, and without it.
    let (ns_b, pod_b) = node.pod("default");
    let (ns_c, pod_c) = node.pod("default");
    node.runtime.add(&list, &pod_b).expect("ADD b");
    node.runtime.add(&list, &pod_c).expect("ADD c");
    assert_eq!(handles(&etcd), 2);
    etcd.stop_member(0).expect("stop");
    node.runtime
        .del(&list, &pod_b)
        .expect("DEL b with etcd down");
    ns_c.delete().expect("netns c gone");
    node.runtime
        .del_without_netns(&list, &pod_c)
        .expect("DEL c without netns, etcd down");
    let journaled = std::fs::read_dir(state.join("journal"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(journaled, 2, "both releases journaled");
    etcd.restart_member(0).expect("restart");
    node.runtime.gc(&list, &[]).expect("GC with etcd back");
    assert_eq!(handles(&etcd), 0, "journaled releases replayed");
    assert_eq!(
        std::fs::read_dir(state.join("journal"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
    let start = std::time::Instant::now();
    while kernel_state(node.ns()) != baseline && start.elapsed().as_secs() < 3 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(kernel_state(node.ns()), baseline);
    for pod in [&pod_a, &pod_b, &pod_c] {
        assert_eq!(
            files_naming(&node.plexus_cache(), &pod.container_id),
            Vec::<String>::new()
        );
    }
    drop(ns_b);
}
