//! `plexus-sriov` on real VFs: qemu's `igb` (82576) in the VM, its PF and
//! VFs lent to a test node whose netns stands in for the host. Every
//! setting is read back from the PF over netlink (`ip -j link`).

use netns_harness::{kernel, Netns, Pod};
use plexus_tests::crash::files_naming;
use plexus_tests::sriov::SriovNic;
use plexus_tests::*;
use serde_json::{json, Value};

/// The network's subnets, one per family.
const V4: &str = "10.79.0.0/24";
const V6: &str = "fd00:79::/120";

struct SriovNode {
    // Dropped first: the NIC goes back before the node's netns does.
    nic: SriovNic,
    node: Node,
    list: cni::NetConfList,
}

impl SriovNode {
    /// A node with the NIC, the cluster network, and the network `sr`
    /// giving VF `vf` with `settings` (sriov-cni's fields).
    fn new(tag: &str, vf: usize, settings: Value) -> SriovNode {
        let node = Node::new(tag);
        let nic = SriovNic::lend(node.ns());
        node.define(
            "sr.yaml",
            &nad("sr", None, &sriov_conf(&node, &nic.vfs[vf].pci, settings)),
        );
        let list = node.plexus_list(
            "1.1.0",
            plexus_veth("k8s", &["10.244.40.0/24"], &node.ipam_dir()),
        );
        SriovNode { nic, node, list }
    }

    fn pod(&self) -> (Netns, Pod) {
        let (ns, pod) = self.node.pod("default");
        (ns, pod.networks("sr"))
    }

    /// No record of plexus-sriov, no address of the network held.
    fn assert_nothing_held(&self, what: &str) {
        assert_eq!(
            vf_records(&self.node),
            Vec::<String>::new(),
            "{what}: VF records left"
        );
        let mut store = ipam::LocalStore::open(&self.node.scratch.join("ipam-sr").join("store"))
            .expect("store");
        use ipam::store::Store;
        let handles = store.range("handles/").expect("handles");
        assert!(handles.is_empty(), "{what}: IPAM handles left: {handles:?}");
    }
}

/// plexus-sriov's records on the node.
fn vf_records(node: &Node) -> Vec<String> {
    std::fs::read_dir(node.scratch.join("sriov"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".json"))
                .collect()
        })
        .unwrap_or_default()
}

/// The network's config: VF `pci`, `plexus-ipam` on a local store.
fn sriov_conf(node: &Node, pci: &str, settings: Value) -> Value {
    let mut conf = json!({
        "cniVersion": "1.1.0",
        "type": "plexus-sriov",
        "deviceID": pci,
        "stateDir": node.scratch.join("sriov"),
        "ipam": {"type": "plexus-ipam", "ranges": [[{"subnet": V4}], [{"subnet": V6}]],
                 "stateDir": node.scratch.join("ipam-sr"), "nodeName": "node-1"},
    });
    for (k, v) in settings.as_object().into_iter().flatten() {
        conf[k] = v.clone();
    }
    conf
}

/// What a DEL must give back: VF `n`'s netdev in the node under its old
/// name with its old MAC, and its settings on the PF.
fn vf_state(s: &SriovNode, n: usize) -> (Option<String>, Option<String>, Value) {
    let netdev = s.nic.vf_netdev(n, Some(s.node.ns()));
    let field = |k: &str| {
        netdev
            .as_ref()
            .and_then(|l| l[k].as_str())
            .map(String::from)
    };
    (field("ifname"), field("address"), s.nic.vf_settings(n))
}

/// VF 2 as `net1` with its addresses, vlan 100, the requested MAC,
/// spoofchk off and trust on, all read back; DEL gives all of it back.
pub fn vf_as_net1_and_back() {
    let mac = "02:5a:00:00:02:02";
    let s = SriovNode::new(
        "sriov",
        2,
        json!({"vlan": 100, "mac": mac, "spoofchk": "off", "trust": "on"}),
    );
    let before = vf_state(&s, 2);
    assert!(before.0.is_some(), "VF 2 has a netdev on the node");
    let snapshot = s.node.snapshot();
    let (ns, pod) = s.pod();
    let result = s.node.runtime.add(&s.list, &pod).expect("ADD");

    let net1 = s
        .nic
        .vf_netdev(2, Some(ns.name()))
        .expect("VF 2's netdev is in the pod");
    assert_eq!(net1["ifname"], "net1", "{net1}");
    assert_eq!(net1["address"], mac, "{net1}");
    assert!(
        net1["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "UP")),
        "{net1}"
    );
    let addrs = kernel::addrs(ns.name(), "net1").expect("addrs");
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    assert!(addrs.iter().any(|a| a.starts_with("10.79.0.")), "{addrs:?}");
    assert!(
        addrs.iter().any(|a| a.starts_with("fd00:79::")),
        "{addrs:?}"
    );
    let vf = s.nic.vf_settings(2);
    assert_eq!(vf["address"], mac, "{vf}");
    assert_eq!(vf["vlan_list"][0]["vlan"], 100, "{vf}");
    assert_eq!(vf["spoofchk"], false, "{vf}");
    assert_eq!(vf["trust"], true, "{vf}");
    let ifaces = result["interfaces"].as_array().cloned().unwrap_or_default();
    assert!(
        ifaces
            .iter()
            .any(|i| i["name"] == "net1" && i["pciID"] == s.nic.vfs[2].pci.as_str()),
        "the result names the VF: {result}"
    );

    s.node.runtime.check(&s.list, &pod).expect("CHECK");
    // VF 2's trust set on the PF, behind Plexus' back.
    let trust = |state: &str| {
        let pf = s.nic.pf.name.as_deref().unwrap_or_default();
        kernel::ip(&[
            "-n",
            s.node.ns(),
            "link",
            "set",
            "dev",
            pf,
            "vf",
            "2",
            "trust",
            state,
        ])
        .unwrap_or_else(|e| panic!("trust {state}: {e}"));
    };
    trust("off");
    let err = s
        .node
        .runtime
        .check(&s.list, &pod)
        .expect_err("CHECK sees the change");
    assert!(err.to_string().contains("trust"), "{err}");
    trust("on");

    s.node.runtime.del(&s.list, &pod).expect("DEL");
    assert_eq!(vf_state(&s, 2), before, "VF 2 back as it was");
    assert_eq!(
        kernel::link_names(ns.name()).expect("links"),
        vec!["lo".to_string()]
    );
    assert_eq!(
        s.node
            .settled_snapshot(&snapshot, std::time::Duration::from_secs(3)),
        snapshot
    );
    s.assert_nothing_held("after DEL");
    s.node.runtime.del(&s.list, &pod).expect("DEL again");
}

/// The pod's netns deleted before DEL: the kernel hands the VF to the
/// initial netns, DEL finds it there. Then the attachment's record lost
/// (no DEL will come): GC finds the VF from its own record.
pub fn vf_back_without_netns_and_by_gc() {
    let s = SriovNode::new(
        "sriov-gone",
        3,
        json!({"vlan": 42, "vlanQoS": 3, "mac": "02:5a:00:00:03:03", "spoofchk": "off",
               "trust": "on", "max_tx_rate": 100}),
    );
    let before = vf_state(&s, 3);
    let snapshot = s.node.snapshot();

    let (ns, pod) = s.pod();
    s.node.runtime.add(&s.list, &pod).expect("ADD");
    let vf = s.nic.vf_settings(3);
    assert_eq!(
        (
            &vf["vlan_list"][0]["vlan"],
            &vf["vlan_list"][0]["qos"],
            &vf["rate"]["max_tx"]
        ),
        (&json!(42), &json!(3), &json!(100)),
        "{vf}"
    );
    ns.delete().expect("delete the pod's netns");
    s.node
        .runtime
        .del(&s.list, &pod)
        .expect("DEL without the netns");
    assert_eq!(vf_state(&s, 3), before, "VF 3 back after DEL");
    s.assert_nothing_held("after DEL");

    let (ns, pod) = s.pod();
    s.node.runtime.add(&s.list, &pod).expect("ADD again");
    assert_ne!(vf_state(&s, 3), before);
    ns.delete().expect("delete the pod's netns");
    for f in files_naming(&s.node.plexus_cache(), &pod.container_id) {
        std::fs::remove_file(&f).expect("lose the record");
    }
    s.node.runtime.gc(&s.list, &[]).expect("GC");
    assert_eq!(vf_state(&s, 3), before, "VF 3 back after GC");
    s.assert_nothing_held("after GC");
    assert_eq!(
        s.node
            .settled_snapshot(&snapshot, std::time::Duration::from_secs(3)),
        snapshot
    );
}

/// Two pods asking for the same VF: the second is refused, naming the VF
/// and its holder, and the first keeps everything.
pub fn same_vf_twice() {
    let mac = "02:5a:00:00:04:04";
    let s = SriovNode::new(
        "sriov-twice",
        4,
        json!({"vlan": 7, "mac": mac, "trust": "on"}),
    );
    let (ns_a, pod_a) = s.pod();
    s.node.runtime.add(&s.list, &pod_a).expect("ADD a");
    let held = (
        s.nic.vf_netdev(4, Some(ns_a.name())),
        kernel::addrs(ns_a.name(), "net1").expect("addrs"),
        s.nic.vf_settings(4),
    );
    let (ns_b, pod_b) = s.pod();
    let err = s
        .node
        .runtime
        .add(&s.list, &pod_b)
        .expect_err("the VF is taken");
    let pci = &s.nic.vfs[4].pci;
    assert_eq!(err.code, 120, "{err}");
    assert!(
        err.msg.contains(pci.as_str()) && err.msg.contains("in use by another pod"),
        "{err}"
    );
    assert!(err.msg.contains(&pod_a.container_id), "{err}");
    assert_eq!(
        kernel::link_names(ns_b.name()).expect("links"),
        vec!["lo".to_string()],
        "pod b got nothing"
    );
    assert_eq!(
        (
            s.nic.vf_netdev(4, Some(ns_a.name())),
            kernel::addrs(ns_a.name(), "net1").expect("addrs"),
            s.nic.vf_settings(4),
        ),
        held,
        "pod a untouched"
    );
    s.node.runtime.check(&s.list, &pod_a).expect("CHECK a");
    s.node.runtime.del(&s.list, &pod_b).expect("DEL b");
    assert!(
        s.nic.vf_netdev(4, Some(ns_a.name())).is_some(),
        "DEL b leaves a's VF"
    );
    s.node.runtime.del(&s.list, &pod_a).expect("DEL a");
    s.assert_nothing_held("after both DELs");
}

/// DPDK mode: VF 5 bound to vfio-pci; nothing moves, the address is
/// allocated, the result names the device, the VF's vlan is set and put back.
pub fn dpdk_mode_on_vfio() {
    let node = Node::new("sriov-dpdk");
    let nic = SriovNic::lend(node.ns());
    nic.bind(5, "vfio-pci");
    let unbind = Rebind(&nic, 5);
    let pci = nic.vfs[5].pci.clone();
    let mut conf = sriov_conf(&node, &pci, json!({"vlan": 200, "spoofchk": "off"}));
    conf["name"] = json!("dpdk");
    let list = cni::NetConfList::parse_value(&conf).expect("conflist");
    let before = nic.vf_settings(5);
    let snapshot = node.snapshot();
    let (ns, pod) = node.pod("default");
    let result = node.runtime.add(&list, &pod).expect("ADD");
    assert_eq!(result["interfaces"][0]["pciID"], pci.as_str(), "{result}");
    assert_eq!(result["interfaces"][0]["name"], "eth0", "{result}");
    assert_eq!(result["ips"].as_array().map(Vec::len), Some(2), "{result}");
    assert_eq!(
        kernel::link_names(ns.name()).expect("links"),
        vec!["lo".to_string()],
        "nothing moved into the pod"
    );
    assert_eq!(node.snapshot(), snapshot, "nothing moved on the node");
    let vf = nic.vf_settings(5);
    assert_eq!(
        (&vf["vlan_list"][0]["vlan"], &vf["spoofchk"]),
        (&json!(200), &json!(false)),
        "{vf}"
    );
    node.runtime.check(&list, &pod).expect("CHECK");
    node.runtime.del(&list, &pod).expect("DEL");
    assert_eq!(nic.vf_settings(5), before, "VF 5's settings back");
    drop(unbind);
}

/// Gives a VF back to igbvf when dropped.
struct Rebind<'a>(&'a SriovNic, usize);

impl Drop for Rebind<'_> {
    fn drop(&mut self) {
        self.0.bind(self.1, "igbvf");
    }
}

/// Faults name the PCI address and the fault, and change nothing.
pub fn faults_named() {
    let node = Node::new("sriov-faults");
    let nic = SriovNic::lend(node.ns());
    let snapshot = node.snapshot();
    let settings = nic.vf_settings(1);
    let not_sriov = std::fs::read_dir("/sys/bus/pci/devices")
        .expect("pci")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|d| {
            let dir = std::path::Path::new("/sys/bus/pci/devices").join(d);
            !dir.join("physfn").exists() && !dir.join("sriov_totalvfs").exists()
        })
        .expect("a device without SR-IOV");
    let vf1 = nic.vfs[1].pci.clone();
    let missing = format!("{}7", &vf1[..vf1.len() - 1]);
    let cases = [
        (
            nic.pf.pci.clone(),
            json!({}),
            7,
            "a PF (up to 7 VFs), not a VF",
        ),
        (missing.clone(), json!({}), 7, "no such VF"),
        (not_sriov.clone(), json!({}), 7, "PF without SR-IOV"),
        (vf1.clone(), json!({"vlan": 4095}), 7, "vlan 4095 is not"),
        (
            vf1.clone(),
            json!({"vlan": 10, "vlanProto": "802.1ad"}),
            7,
            "refuses vlan 10 qos 0 proto 802.1ad",
        ),
        (
            vf1.clone(),
            json!({"trust": "on", "link_state": "disable"}),
            7,
            "refuses link_state disable",
        ),
    ];
    for (pci, settings_asked, code, want) in cases {
        let mut conf = sriov_conf(&node, &pci, settings_asked.clone());
        conf["name"] = json!("faulty");
        let list = cni::NetConfList::parse_value(&conf).expect("conflist");
        let (ns, pod) = node.pod("default");
        let err = node.runtime.add(&list, &pod).expect_err("a fault");
        assert_eq!(err.code, code, "{settings_asked}: {err}");
        assert!(
            err.msg.contains(&pci) && err.msg.contains(want),
            "{pci} {settings_asked}: {err}"
        );
        assert_eq!(
            kernel::link_names(ns.name()).expect("links"),
            vec!["lo".to_string()]
        );
        node.runtime
            .del(&list, &pod)
            .expect("DEL after the failed ADD");
    }
    assert_eq!(nic.vf_settings(1), settings, "VF 1 unchanged");
    assert_eq!(node.snapshot(), snapshot, "nothing changed on the node");
    assert_eq!(vf_records(&node), Vec::<String>::new(), "no record");
}

/// `plexus device-plugin` on the VM's igb, run in the node's netns (its
/// own sysfs, as on a node) and registered with the harness's kubelet: 7
/// VFs in two pools by selector, unhealthy while the PF is down; kubelet
/// allocates one to a pod, and the pod's ADD through `plexus`, whose
/// definition names the resource, gets exactly that VF.
pub fn device_plugin_feeds_plexus_sriov() {
    use netns_harness::kubelet::{Kubelet, State};
    use std::time::Duration;
    let node = Node::new("sriov-dp");
    let nic = SriovNic::lend(node.ns());
    let pf = nic.pf.name.clone().expect("the PF's netdev");
    let kubelet = Kubelet::start(&node.scratch.join("kubelet")).expect("kubelet");
    let config = json!({
        "resourceList": [
            {"resourceName": "vf_low", "selectors": {"vendors": ["8086"], "drivers": ["igbvf"],
                                                     "pfNames": [format!("{pf}#0-3")]}},
            {"resourceName": "vf_high", "selectors": {"pfNames": [format!("{pf}#4-6")]}},
        ],
        "deviceDir": kubelet.device_dir(),
    });
    let conf_path = node.scratch.join("device-plugin.json");
    std::fs::write(&conf_path, config.to_string()).expect("config");
    let log_path = node.scratch.join("device-plugin.log");
    let log = std::fs::File::create(&log_path).expect("log");
    // `ip netns exec` mounts a sysfs of the node's netns: the PF's netdev
    // shows under its PCI device, as on a node.
    let mut plugin = std::process::Command::new("ip")
        .args(["netns", "exec", node.ns()])
        .arg(netns_harness::scratch::plexus_bin())
        .arg("device-plugin")
        .arg(&conf_path)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("plexus device-plugin");
    let plugin_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    fn count(r: &'static str, health: &'static str) -> impl Fn(&State) -> usize {
        move |s: &State| {
            s.devices
                .get(r)
                .map_or(0, |d| d.iter().filter(|(_, h)| h == health).count())
        }
    }
    let t = Duration::from_secs(20);
    let ok = kubelet.wait(t, |s| {
        s.registrations == 2
            && count("plexus.io/vf_low", "Healthy")(s) == 4
            && count("plexus.io/vf_high", "Healthy")(s) == 3
    });
    let seen = kubelet.with(|s| format!("{:?}", s.devices));
    if !ok {
        let _ = plugin.kill();
        panic!("7 VFs in two pools: {seen}\n{}", plugin_log());
    }
    let low: Vec<String> = (0..4).map(|n| nic.vfs[n].pci.clone()).collect();
    let listed = kubelet.with(|s| {
        s.devices["plexus.io/vf_low"]
            .iter()
            .map(|(id, _)| id.clone())
            .collect::<Vec<_>>()
    });
    assert_eq!(listed, low, "VFs 0-3 by their PCI addresses");

    // The PF's link down: its VFs unhealthy; up again: healthy.
    kernel::ip(&["-n", node.ns(), "link", "set", "dev", &pf, "down"]).expect("PF down");
    let down = kubelet.wait(t, |s| {
        count("plexus.io/vf_low", "Unhealthy")(s) == 4
            && count("plexus.io/vf_high", "Unhealthy")(s) == 3
    });
    kernel::ip(&["-n", node.ns(), "link", "set", "dev", &pf, "up"]).expect("PF up");
    let up = kubelet.wait(t, |s| count("plexus.io/vf_low", "Healthy")(s) == 4);
    if !(down && up) {
        let _ = plugin.kill();
        panic!(
            "health follows the PF (down {down}, up {up})\n{}",
            plugin_log()
        );
    }

    // kubelet allocates a VF to the pod; its ADD gets that VF.
    let res = "apiVersion: k8s.cni.cncf.io/v1\nkind: NetworkAttachmentDefinition\nmetadata:\n  name: sr-res\n  annotations:\n    k8s.v1.cni.cncf.io/resourceName: plexus.io/vf_high\nspec:\n  config: '";
    let mut conf = sriov_conf(&node, "", json!({}));
    if let Some(m) = conf.as_object_mut() {
        m.remove("deviceID");
    }
    node.define("sr-res.yaml", &format!("{res}{conf}'\n"));
    let mut list = node.plexus_list(
        "1.1.0",
        plexus_veth("k8s", &["10.244.41.0/24"], &node.ipam_dir()),
    );
    list.plugins[0].insert(
        "podResourcesSocket".into(),
        json!(kubelet.pod_resources_socket()),
    );
    let (ns, pod) = node.pod("default");
    let pod = pod.networks("sr-res");
    let (ids, resp) = kubelet
        .allocate("default", &pod.name, "app", "plexus.io/vf_high", 1)
        .expect("allocate");
    assert_eq!(
        resp.container_responses[0]
            .envs
            .get("PCIDEVICE_PLEXUS_IO_VF_HIGH"),
        Some(&ids[0])
    );
    let n = nic
        .vfs
        .iter()
        .position(|f| f.pci == ids[0])
        .expect("an allocated VF of the NIC");
    assert!(n >= 4, "vf_high is VFs 4-6, got {n}");
    let result = node.runtime.add(&list, &pod).expect("ADD");
    let net1 = nic
        .vf_netdev(n, Some(ns.name()))
        .expect("the allocated VF's netdev is in the pod");
    assert_eq!(net1["ifname"], "net1", "{net1}");
    assert!(
        result["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|i| i["pciID"] == ids[0].as_str()),
        "{result}"
    );
    node.runtime.del(&list, &pod).expect("DEL");
    assert!(
        nic.vf_netdev(n, Some(node.ns())).is_some(),
        "the VF is back on the node"
    );
    let _ = plugin.kill();
    let _ = plugin.wait();
    drop(nic);
}
