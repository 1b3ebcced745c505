//! The kill matrix, shared by the host's tests and the VM's (ipvlan): a
//! stack of Plexus plugins killed at every step a traced run names, each kill
//! cleaned up three ways, and whatever is left counted.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use cni::NetConfList;
use ipam::config::EtcdConf;
use ipam::store::Store;
use ipam::EtcdStore;
use netns_harness::etcd::EtcdCluster;
use netns_harness::fixtures::{ipam_published, nad, plexus_ipam_on_etcd};
use netns_harness::node::{Node, UPLINK};
use netns_harness::{kernel, Netns, Pod, Runtime};
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Cleanup {
    DelWithNetns,
    DelWithoutNetns,
    GcOnly,
}

pub const CLEANUPS: [Cleanup; 3] = [
    Cleanup::DelWithNetns,
    Cleanup::DelWithoutNetns,
    Cleanup::GcOnly,
];

pub struct Setup {
    /// The VM's SR-IOV NIC lent to the node (dropped before the node).
    pub nic: Option<crate::sriov::SriovNic>,
    /// The etcd of [`Stack::PlexusEtcd`]'s cluster network, in the node's netns.
    pub etcd: Option<EtcdCluster>,
    pub node: Node,
    pub list: NetConfList,
    pub ipam_dirs: Vec<PathBuf>,
    pub baseline: BTreeSet<String>,
    pub stack: Stack,
}

/// The node's links, addresses, routes, permanent neighbours, and the VF
/// settings its PFs hold.
pub fn kernel_state(ns: &str) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = kernel::snapshot(ns)
        .unwrap_or_else(|e| panic!("snapshot of {ns}: {e}"))
        .into_iter()
        .collect();
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
    let links = kernel::ip_json(ns, &["link", "show"]).unwrap_or_default();
    for l in &links {
        for vf in l["vfinfo_list"].as_array().into_iter().flatten() {
            out.insert(format!("vf {} {vf}", l["ifname"]));
        }
    }
    out
}

/// What the runtime runs: `plexus` with both built-ins under it, or one
/// built-in on its own (exec'd by the runtime, `plexus-ipam` in-process).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Stack {
    Plexus,
    /// `plexus` with the cluster network's `plexus-ipam` on etcd: ADD is
    /// answered from the node's reserve, its handle published after.
    PlexusEtcd,
    Veth,
    Macvlan,
    /// In the VM: the host kernel has no ipvlan.
    Ipvlan,
    /// In the VM: `plexus-sriov` on VF 1 of the VM's `igb`, every setting
    /// asked for.
    Sriov,
    /// `plexus-ipam` exec'd by the runtime as the list's plugin.
    Ipam,
}

pub fn setup(stack: Stack) -> Setup {
    let node = Node::new("crash");
    let nic = (stack == Stack::Sriov).then(|| crate::sriov::SriovNic::lend(node.ns()));
    let dir = |name: &str| node.scratch.join(name);
    let ipam = |subnets: &[&str], state: &Path| {
        let ranges: Vec<_> = subnets.iter().map(|s| json!([{"subnet": s}])).collect();
        json!({"type": "plexus-ipam", "ranges": ranges, "stateDir": state, "nodeName": "node-1"})
    };
    let (pods_dir, data_dir) = (dir("ipam-pods"), dir("ipam-data"));
    let etcd =
        (stack == Stack::PlexusEtcd).then(|| EtcdCluster::start_in(1, &node.netns).expect("etcd"));
    let pods_subnets = ["10.77.0.0/24", "fd00:77::/120"];
    let pods_ipam = match &etcd {
        Some(etcd) => plexus_ipam_on_etcd(&pods_subnets, &etcd.endpoints(), "node-1", &pods_dir),
        None => ipam(&pods_subnets, &pods_dir),
    };
    let cluster = json!({
        "cniVersion": "1.1.0", "name": "pods", "type": "plexus-veth",
        "ipam": pods_ipam,
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
        Stack::Plexus | Stack::PlexusEtcd => node.plexus_list("1.1.0", cluster),
        Stack::Veth => alone(cluster),
        Stack::Macvlan => alone(json!({"cniVersion": "1.1.0", "type": "plexus-macvlan",
            "master": UPLINK, "mode": "bridge", "ipam": ipam(&["10.78.0.0/24"], &data_dir)})),
        Stack::Ipvlan => alone(json!({"cniVersion": "1.1.0", "type": "plexus-ipvlan",
            "master": UPLINK, "mode": "l2", "ipam": ipam(&["10.78.0.0/24"], &data_dir)})),
        Stack::Sriov => alone(json!({"cniVersion": "1.1.0", "type": "plexus-sriov",
            "deviceID": nic.as_ref().map(|n| n.vfs[1].pci.clone()),
            "vlan": 10, "vlanQoS": 2, "mac": "02:5a:00:00:01:01", "spoofchk": "off",
            "trust": "on", "max_tx_rate": 50,
            "stateDir": node.plexus_cache().join("sriov"),
            "ipam": ipam(&["10.78.0.0/24"], &data_dir)})),
        Stack::Ipam => alone(json!({"cniVersion": "1.1.0", "type": "plexus-ipam",
            "ipam": ipam(&["10.78.0.0/24", "fd00:78::/120"], &data_dir)})),
    };
    // One pod first, so that what a first ADD sets once on the node
    // (forwarding, state dirs) is part of the baseline.
    let (_ns, pod) = node.pod("default");
    let pod = pod.networks("data");
    node.runtime.add(&list, &pod).expect("warm-up ADD");
    node.runtime.del(&list, &pod).expect("warm-up DEL");
    let baseline = kernel_state(node.ns());
    Setup {
        nic,
        etcd,
        node,
        list,
        ipam_dirs: vec![pods_dir, data_dir],
        baseline,
        stack,
    }
}

impl Setup {
    pub fn pod(&self) -> (Netns, Pod) {
        let (ns, pod) = self.node.pod("default");
        (ns, pod.networks("data"))
    }

    pub fn runtime(&self, env: &[(&str, &str)]) -> Runtime {
        self.node
            .runtime
            .with_env(&self.node.netns, env)
            .expect("runtime")
    }

    /// The steps a run of `what` goes through, in order.
    pub fn steps(&self, what: impl FnOnce(&Runtime)) -> Vec<String> {
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
    pub fn leaks(&self, pod: &Pod, ns: Option<&Netns>) -> Vec<String> {
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
        if let Some(etcd) = &self.etcd {
            out.extend(etcd_leaks(etcd, &self.node.netns, &self.ipam_dirs[0]));
        }
        out.extend(
            files_naming(&self.node.plexus_cache(), &pod.container_id)
                .into_iter()
                .map(|f| format!("record {f}")),
        );
        out
    }

    /// Cleans up after a kill, as the runtime would, then counts leaks.
    pub fn clean(&self, how: Cleanup, ns: Netns, pod: &Pod) -> Vec<String> {
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

/// What etcd holds of the cluster network beyond the node's reserve, once
/// the node's publisher has written what the reserve handed out and topped
/// the reserve up again: no handle, no address in use, a full reserve.
fn etcd_leaks(etcd: &EtcdCluster, netns: &Netns, state: &Path) -> Vec<String> {
    ipam_published(state);
    let endpoints = etcd.endpoints();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut out = Vec::new();
        let mut reserved = 0;
        let read = netns
            .run(|| -> Result<(), ipam::Error> {
                let conf = EtcdConf::new(endpoints.clone(), ipam::config::DEFAULT_PREFIX);
                let mut store = EtcdStore::connect(&conf)?;
                for kv in store.range("handles/")? {
                    out.push(format!("IPAM handle {} in etcd", kv.key));
                }
                for kv in store.range("blocks/")? {
                    let block: ipam::block::Block = serde_json::from_slice(&kv.value)
                        .map_err(|e| ipam::Error::Store(e.to_string()))?;
                    let kept = block.reserved().count();
                    reserved += kept;
                    if block.used().count() > kept {
                        out.push(format!("IPAM addresses in use in {} in etcd", kv.key));
                    }
                }
                Ok(())
            })
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = read {
            return vec![format!("etcd not read: {e}")];
        }
        // Two families: a full reserve of each.
        let full = 2 * ipam::alloc::RESERVE;
        if !out.is_empty() || reserved == full {
            return out;
        }
        if std::time::Instant::now() > deadline {
            return vec![format!(
                "the node's reserve holds {reserved} addresses, not {full}"
            )];
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

pub fn files_naming(dir: &Path, id: &str) -> Vec<String> {
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

/// Every step of ADD and DEL of `s`'s stack killed in turn, each cleaned
/// up the three ways; the node works afterwards.
pub fn matrix(s: &Setup, rows: &mut Vec<(String, Vec<usize>)>, all: &mut Vec<String>) {
    let name = match s.stack {
        Stack::Plexus => "plexus",
        Stack::PlexusEtcd => "plexus (IPAM on etcd)",
        Stack::Veth => "plexus-veth",
        Stack::Macvlan => "plexus-macvlan",
        Stack::Ipvlan => "plexus-ipvlan",
        Stack::Sriov => "plexus-sriov",
        Stack::Ipam => "plexus-ipam",
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
        add_steps.len() >= 2 && !del_steps.is_empty(),
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
        Stack::Plexus | Stack::PlexusEtcd => 3,
        Stack::Veth => 2,
        Stack::Macvlan | Stack::Ipvlan | Stack::Sriov => 1,
        Stack::Ipam => 2,
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

/// The matrix as a table: one row per step, leaks per cleanup.
pub fn table(rows: &[(String, Vec<usize>)]) -> String {
    let width = rows.iter().map(|(s, _)| s.len()).max().unwrap_or(0);
    let mut table = format!(
        "{:width$}  {:>14}  {:>17}  {:>7}\n",
        "killed at", "DEL with netns", "DEL without netns", "GC only"
    );
    for (step, row) in rows {
        table += &format!(
            "{step:width$}  {:>14}  {:>17}  {:>7}\n",
            row[0], row[1], row[2]
        );
    }
    table + "leaks found after each kill and cleanup (all must be 0)"
}
