//! Plexus under a real container runtime: Debian's containerd 1.6 and runc,
//! Plexus' conflist its only CNI config, driven through the CRI API as the
//! kubelet drives it (RunPodSandbox, PodSandboxStatus, StopPodSandbox,
//! RemovePodSandbox). containerd runs in a test node's netns, which plays
//! the host: the plugins it execs make their host-side links there. What
//! the pods hold is read from the kernel; after removal, nothing is left:
//! no host-side link or route, no address held in IPAM (plexus-ipam or
//! host-local), no Plexus record, no entry in containerd's CNI result
//! cache, no shim, no pod process, no pod netns.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipam::{Allocator, LocalStore};
use netns_harness::containerd::{Containerd, PodConfig, SandboxStatus, LIBCNI_CACHE};
use netns_harness::kernel;
use plexus_tests::*;
use serde_json::{json, Value};

/// The networks pods attach to, by the names IPAM keeps their handles under:
/// the cluster network, `plexus-macvlan` on the node uplink, Debian's
/// `macvlan` (exec'd from containerd's CNI bin dir) with `host-local`, and a
/// `plexus-macvlan` whose master does not exist.
const CLUSTER: &str = "k8s-pods";
const DATA: &str = "data";
const REF: &str = "ref";
const BROKEN: &str = "broken";
/// How long the kernel and containerd may take to let go of what a removed
/// pod held (a netns is torn down after an RCU grace period; a shim exits
/// after its task is deleted).
const SETTLE: Duration = Duration::from_secs(10);

/// A node with containerd on it. Fields drop in order: containerd (and
/// whatever pods it still runs) before the node netns it runs in.
struct CriNode {
    containerd: Containerd,
    node: Node,
    /// The node's links, addresses and routes before any pod.
    before: Vec<String>,
}

impl CriNode {
    /// A node whose cluster network is dual-stack (`plexus-veth` +
    /// `plexus-ipam` on the node's local store, `10.<k>.0.0/24` and
    /// `fd00:<k>::/64`), with the secondary networks above defined.
    fn new(tag: &str, k: u8) -> CriNode {
        let node = Node::new(tag);
        let cluster = json!({
            "cniVersion": "1.0.0",
            "name": CLUSTER,
            "type": "plexus-veth",
            "ipam": ipam(&node, &[&format!("10.{k}.0.0/24"), &format!("fd00:{k}::/64")]),
        });
        let plexus_macvlan = |master: &str, subnet: &str| {
            json!({
                "cniVersion": "1.0.0",
                "type": "plexus-macvlan",
                "master": master,
                "mode": "bridge",
                "ipam": ipam(&node, &[subnet]),
            })
        };
        let data = plexus_macvlan(UPLINK, &format!("192.168.{k}.0/24"));
        node.define("data.yaml", &nad(DATA, None, &data));
        let reference = macvlan("1.0.0", &[&format!("172.16.{k}.0/24")], &node.ipam_dir());
        node.define("ref.yaml", &nad(REF, None, &reference));
        let broken = plexus_macvlan("nosuchdev", &format!("172.17.{k}.0/24"));
        node.define("broken.yaml", &nad(BROKEN, None, &broken));
        // containerd 1.6 takes results up to CNI 1.0.0 only.
        let list = node.plexus_list("1.0.0", cluster);
        let before = node.snapshot();
        let containerd = Containerd::start_in(&node.netns, &node.bin, &list)
            .unwrap_or_else(|e| panic!("containerd: {e}"));
        CriNode {
            containerd,
            node,
            before,
        }
    }

    fn run(&self, pod: &PodConfig) -> String {
        self.containerd
            .cri()
            .run_pod(pod)
            .unwrap_or_else(|e| panic!("RunPodSandbox {}: {e}\n{}", pod.name, self.logs()))
    }

    fn status(&self, id: &str) -> SandboxStatus {
        self.containerd
            .cri()
            .status(id)
            .unwrap_or_else(|e| panic!("PodSandboxStatus {id}: {e}"))
    }

    /// StopPodSandbox and RemovePodSandbox of every pod, each step for all
    /// pods at once, as the kubelet does for pods deleted together.
    fn remove(&self, ids: &[String]) {
        let cri = self.containerd.cri();
        for (step, answers) in [
            ("StopPodSandbox", cri.stop_pods(ids)),
            ("RemovePodSandbox", cri.remove_pods(ids)),
        ] {
            for (id, answer) in ids.iter().zip(answers) {
                answer.unwrap_or_else(|e| panic!("{step} {id}: {e}\n{}", self.logs()));
            }
        }
    }

    /// The plexus log and the tail of containerd's, for failure messages.
    fn logs(&self) -> String {
        let plexus = std::fs::read_to_string(self.node.log_file()).unwrap_or_default();
        let containerd = self.containerd.log();
        let tail: Vec<&str> = containerd.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "plexus log:\n{plexus}\ncontainerd log (tail):\n{}",
            tail.join("\n")
        )
    }

    /// Handles (`network/container/ifname`) in the node's IPAM store, and
    /// the addresses its pools hold.
    fn ipam_state(&self) -> (Vec<String>, Vec<IpAddr>) {
        let store = LocalStore::open(&self.node.scratch.join("store")).expect("IPAM store");
        let mut a = Allocator::new(store, "auditor");
        let mut handles = Vec::new();
        let mut held = Vec::new();
        for network in [CLUSTER, DATA, BROKEN] {
            for (h, _) in a.handles(network).expect("handles") {
                handles.push(format!("{}/{}/{}", h.network, h.container, h.ifname));
            }
            // A pool is defined by its first allocation.
            if let Ok(pool) = a.pool(network) {
                held.extend(a.allocated(&pool).expect("allocated"));
            }
        }
        handles.sort();
        (handles, held)
    }

    /// The addresses IPAM gave `ifname` of sandbox `id` on `network`.
    fn ipam_addresses(&self, network: &str, id: &str, ifname: &str) -> Vec<String> {
        let store = LocalStore::open(&self.node.scratch.join("store")).expect("IPAM store");
        let handle = ipam::HandleId::new(network, id, ifname);
        let record = Allocator::new(store, "auditor")
            .lookup(&handle)
            .expect("lookup")
            .unwrap_or_else(|| panic!("no IPAM handle {network}/{id}/{ifname}"));
        let mut ips: Vec<String> = record.addresses.iter().map(|a| a.ip.to_string()).collect();
        ips.sort();
        ips
    }

    /// Asserts that nothing of the removed sandboxes `ids` is left.
    fn assert_nothing_left(&self, ids: &[String], netns: &[PathBuf]) {
        let now = self.node.settled_snapshot(&self.before, SETTLE);
        assert_eq!(
            now, self.before,
            "the node holds no pod link, address or route"
        );
        assert_eq!(
            self.ipam_state(),
            (Vec::new(), Vec::new()),
            "no IPAM handle, no address held"
        );
        assert_eq!(
            self.node.leases(),
            Vec::<String>::new(),
            "no host-local lease"
        );
        let journal = self.node.scratch.join("ipam-state/journal");
        let pending = std::fs::read_dir(&journal).map_or(0, |d| d.count());
        assert_eq!(pending, 0, "no release waits in IPAM's journal");
        assert_eq!(
            self.node.records(),
            Vec::<String>::new(),
            "no Plexus record"
        );
        let cached: Vec<String> = std::fs::read_dir(LIBCNI_CACHE)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|f| ids.iter().any(|id| f.contains(id.as_str())))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(cached, Vec::<String>::new(), "no libcni cache entry");
        for ns in netns {
            assert!(!ns.exists(), "pod netns {} is gone", ns.display());
        }
        let listed = self.containerd.cri().list().expect("ListPodSandbox");
        assert_eq!(listed, Vec::<String>::new(), "containerd knows no sandbox");
        let start = Instant::now();
        while !(self.containerd.shims().is_empty() && self.containerd.pod_processes().is_empty())
            && start.elapsed() < SETTLE
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(self.containerd.shims(), Vec::<i32>::new(), "no shim runs");
        assert_eq!(
            self.containerd.pod_processes(),
            Vec::<i32>::new(),
            "no pod process runs"
        );
    }
}

fn ipam(node: &Node, subnets: &[&str]) -> Value {
    let ranges: Vec<Value> = subnets.iter().map(|s| json!([{"subnet": s}])).collect();
    json!({
        "type": "plexus-ipam",
        "ranges": ranges,
        "store": {"type": "local", "path": node.scratch.join("store")},
        "nodeName": "node-1",
        "stateDir": node.scratch.join("ipam-state"),
    })
}

/// The name `ip -n` knows a pod netns by (containerd puts them in /var/run/netns).
fn ns_name(netns: &Path) -> String {
    assert_eq!(
        netns.parent(),
        Some(Path::new("/var/run/netns")),
        "containerd's netns place"
    );
    netns
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// The id of the sandbox a failed RunPodSandbox names in its message.
fn failed_sandbox(message: &str) -> String {
    message
        .split("sandbox \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no sandbox id in {message:?}"))
        .to_string()
}

/// The addresses of `a.b.c.d/nn` CIDRs, sorted.
fn ips(cidrs: Vec<String>) -> Vec<String> {
    sorted(
        cidrs
            .iter()
            .map(|c| addr_ip(c).to_string())
            .collect::<Vec<_>>(),
    )
}

#[test]
fn pods_with_and_without_the_networks_annotation() {
    let n = CriNode::new("cri-ann", 92);
    // The annotation's short form, and its JSON form naming the interfaces.
    let json_form =
        r#"[{"name": "data", "interface": "data0"}, {"name": "ref", "interface": "ref0"}]"#;
    let pods = [
        (PodConfig::new("plain", "default"), vec!["eth0", "lo"]),
        (
            PodConfig::new("multi", "default").networks(DATA),
            vec!["eth0", "lo", "net1"],
        ),
        (
            PodConfig::new("named", "default").networks(json_form),
            vec!["data0", "eth0", "lo", "ref0"],
        ),
    ];
    let configs: Vec<PodConfig> = pods.iter().map(|(p, _)| p.clone()).collect();
    let ids: Vec<String> = n
        .containerd
        .cri()
        .run_pods(&configs)
        .into_iter()
        .zip(&configs)
        .map(|(r, pod)| {
            r.unwrap_or_else(|e| panic!("RunPodSandbox {}: {e}\n{}", pod.name, n.logs()))
        })
        .collect();

    let mut netns = Vec::new();
    for (id, (_, want)) in ids.iter().zip(&pods) {
        let st = n.status(id);
        assert!(st.ready, "{id}: ready");
        let path = st.netns.clone().expect("the sandbox's netns path");
        let ns = ns_name(&path);
        let names = sorted(kernel::link_names(&ns).expect("links"));
        assert_eq!(&names, want, "{id}: the pod's links");
        let lo = kernel::link(&ns, "lo").expect("lo").expect("lo");
        assert!(lo.up, "containerd's loopback plugin set lo up");

        // PodSandboxStatus reports eth0's addresses, both families, exactly
        // the ones IPAM gave and the kernel holds.
        let given = n.ipam_addresses(CLUSTER, id, "eth0");
        let eth0 = ips(kernel::addrs(&ns, "eth0").expect("addrs"));
        assert_eq!(eth0, given, "{id}: eth0 holds what IPAM gave");
        let mut reported = vec![st.ip.clone()];
        reported.extend(st.additional_ips.clone());
        assert_eq!(sorted(reported), given, "{id}: PodSandboxStatus IPs");
        assert!(st.ip.starts_with("10.92.0."), "{id}: IPv4 first: {st:?}");
        for cidr in kernel::addrs(&ns, "eth0").expect("addrs") {
            assert!(
                cidr.ends_with("/32") || cidr.ends_with("/128"),
                "{id}: routed /32 and /128: {cidr}"
            );
        }
        // The host side: a route to each pod address on the node.
        let routes = n.node.snapshot();
        for ip in &given {
            assert!(
                routes
                    .iter()
                    .any(|l| l.starts_with(&format!("route {ip} dev plx"))),
                "{id}: a node route to {ip}: {routes:#?}"
            );
        }
        netns.push(path);
    }

    // The secondary interfaces: macvlans on the uplink, addressed from their
    // networks' IPAM (plexus-ipam for `data`, host-local for `ref`).
    for (pod, ifname, network, subnet) in [
        (1, "net1", DATA, "192.168.92."),
        (2, "data0", DATA, "192.168.92."),
        (2, "ref0", REF, "172.16.92."),
    ] {
        let ns = ns_name(&netns[pod]);
        let link = kernel::link(&ns, ifname).expect("link").expect(ifname);
        assert_eq!(
            (link.kind.as_str(), link.mode.as_str()),
            ("macvlan", "bridge"),
            "{ifname}"
        );
        let held = ips(kernel::addrs(&ns, ifname).expect("addrs"));
        assert_eq!(held.len(), 1, "{ifname}: {held:?}");
        assert!(held[0].starts_with(subnet), "{ifname}: {held:?}");
        if network == DATA {
            assert_eq!(held, n.ipam_addresses(DATA, &ids[pod], ifname));
        } else {
            assert_eq!(n.node.leases(), held, "host-local's lease");
        }
    }

    n.remove(&ids);
    n.assert_nothing_left(&ids, &netns);
}

#[test]
fn pod_naming_an_unknown_network_fails_and_leaves_nothing() {
    let n = CriNode::new("cri-unk", 93);
    let pod = PodConfig::new("lost", "default").networks(&format!("{DATA},nope"));
    let err = n
        .containerd
        .cri()
        .run_pod(&pod)
        .expect_err("a pod naming an unknown network does not start");
    assert!(
        err.message()
            .contains(r#"network "nope" not found for namespace "default""#),
        "Plexus' message reaches the kubelet: {}",
        err.message()
    );
    n.assert_nothing_left(&[failed_sandbox(err.message())], &[]);

    // A network that fails once the ones before it are attached: Plexus
    // undoes them, containerd's DEL after it finds nothing to do.
    let pod = PodConfig::new("half", "default").networks(&format!("{DATA},{REF},{BROKEN}"));
    let err = n
        .containerd
        .cri()
        .run_pod(&pod)
        .expect_err("a pod whose third network fails does not start");
    assert!(
        err.message().contains(&format!(
            r#"network "{BROKEN}" (net3): master "nosuchdev" is not a link"#
        )),
        "{}",
        err.message()
    );
    n.assert_nothing_left(&[failed_sandbox(err.message())], &[]);

    // The runtime is not stuck: the next pod starts and goes.
    let id = n.run(&PodConfig::new("next", "default").networks(DATA));
    let path = n.status(&id).netns.expect("netns");
    n.remove(std::slice::from_ref(&id));
    n.assert_nothing_left(&[id], &[path]);
}

#[test]
fn twenty_pods_at_once() {
    let n = CriNode::new("cri-20", 94);
    let pods: Vec<PodConfig> = (0..20)
        .map(|i| {
            let pod = PodConfig::new("burst", "default");
            if i % 2 == 0 {
                pod.networks(DATA)
            } else {
                pod
            }
        })
        .collect();
    let started = Instant::now();
    let ids: Vec<String> = n
        .containerd
        .cri()
        .run_pods(&pods)
        .into_iter()
        .zip(&pods)
        .map(|(r, pod)| {
            r.unwrap_or_else(|e| panic!("RunPodSandbox {}: {e}\n{}", pod.name, n.logs()))
        })
        .collect();
    eprintln!("20 RunPodSandbox at once: {:?}", started.elapsed());

    let mut seen = BTreeSet::new();
    let mut netns = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let st = n.status(id);
        assert!(st.ready, "{id}: ready");
        let ns = st.netns.clone().expect("netns");
        let name = ns_name(&ns);
        let mut want = vec!["eth0", "lo"];
        if i % 2 == 0 {
            want.push("net1");
            for ip in ips(kernel::addrs(&name, "net1").expect("addrs")) {
                assert!(seen.insert(ip.clone()), "{ip} given twice");
            }
        }
        assert_eq!(sorted(kernel::link_names(&name).expect("links")), want);
        let given = n.ipam_addresses(CLUSTER, id, "eth0");
        assert_eq!(ips(kernel::addrs(&name, "eth0").expect("addrs")), given);
        assert_eq!(given.len(), 2, "{id}: one address of each family");
        assert!(given.contains(&st.ip), "{id}: {st:?} {given:?}");
        for ip in given {
            assert!(seen.insert(ip.clone()), "{ip} given twice");
        }
        netns.push(ns);
    }
    assert_eq!(seen.len(), 20 * 2 + 10, "every address distinct");
    let (handles, held) = n.ipam_state();
    assert_eq!((handles.len(), held.len()), (30, 50), "{handles:#?}");
    let host_veths = kernel::links(n.node.ns())
        .expect("node links")
        .into_iter()
        .filter(|l| l.kind == "veth" && l.name.starts_with("plx"))
        .count();
    assert_eq!(host_veths, 20, "one host-side veth per pod");

    let started = Instant::now();
    n.remove(&ids);
    eprintln!("20 Stop+RemovePodSandbox at once: {:?}", started.elapsed());
    n.assert_nothing_left(&ids, &netns);
}

#[test]
fn containerd_restarted_under_a_running_pod() {
    let mut n = CriNode::new("cri-rst", 95);
    let id = n.run(&PodConfig::new("survivor", "default").networks(DATA));
    let before = n.status(&id);
    let path = before.netns.clone().expect("netns");
    let ns = ns_name(&path);
    let links = kernel::snapshot(&ns).expect("pod snapshot");
    let shims = n.containerd.shims();
    assert_eq!(shims.len(), 1, "one shim for the sandbox");

    n.containerd
        .restart()
        .unwrap_or_else(|e| panic!("restart: {e}"));
    assert_eq!(n.containerd.shims(), shims, "the shim outlived containerd");
    assert_eq!(n.status(&id), before, "the pod is as it was");
    assert_eq!(
        kernel::snapshot(&ns).expect("pod snapshot"),
        links,
        "the pod's links, addresses and routes are untouched"
    );

    // A pod started by the new containerd, and both removed by it.
    let other = n.run(&PodConfig::new("newcomer", "default"));
    let other_ns = n.status(&other).netns.expect("netns");
    let ids = [id, other];
    n.remove(&ids);
    n.assert_nothing_left(&ids, &[path, other_ns]);
}
