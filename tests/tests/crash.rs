//! Plexus killed at every step of its work. The steps are not listed here:
//! a traced run of ADD and of DEL names them (`PLEXUS_CRASH_TRACE`, debug
//! builds), and each is then killed in turn (`PLEXUS_CRASH_AT`, SIGKILL)
//! under `plexus` with the cluster network `plexus-veth` and a secondary
//! `plexus-macvlan`, both on `plexus-ipam`, and again with the cluster
//! network's `plexus-ipam` on etcd (ADD answered from the node's reserve,
//! its handle published once it has answered). After each kill the runtime
//! cleans up one of three ways — DEL with the netns, DEL once the netns is
//! gone, or only GC once it is gone — and then nothing may be left: no link,
//! address, route or permanent neighbour on the node or in the pod, no IPAM
//! handle, address or journal entry (on etcd: once published, and with the
//! node's reserve full again), no Plexus record. The test prints the
//! matrix (`plexus-ipvlan`'s is in the VM's tests).

use std::path::{Path, PathBuf};

use plexus_tests::crash::*;
use plexus_tests::*;
use serde_json::json;

#[test]
fn killed_at_every_step_of_add_and_del_nothing_is_left() {
    let mut rows = Vec::new();
    let mut all = Vec::new();
    for stack in [
        Stack::Plexus,
        Stack::PlexusEtcd,
        Stack::Veth,
        Stack::Macvlan,
        Stack::Ipam,
    ] {
        matrix(&setup(stack), &mut rows, &mut all);
    }
    eprintln!("\n{}", table(&rows));
    assert!(all.is_empty(), "{}", all.join("\n"));
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
        nic: None,
        etcd: None,
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
    // No reserve: every ADD asks etcd, so an ADD with etcd down fails. One
    // answered from the reserve with etcd down is in tests/ipam.rs.
    ipam["store"]["reserve"] = json!(0);
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
