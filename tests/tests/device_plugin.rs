//! `plexus device-plugin` against the kubelet fixture (kubelet's end of the
//! device plugin and PodResources APIs): registration, pools chosen by
//! selectors, health that follows the PF's link, Allocate's environment
//! and vfio devices, registration again when kubelet restarts. The VFs here
//! are a sysfs tree laid out as the kernel lays out an SR-IOV PF and its
//! VFs (`physfn`, `virtfnN`, `driver`, `iommu_group`, `net/<pf>/operstate`);
//! real VFs (qemu's igb) are in the VM's tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use netns_harness::kubelet::{Kubelet, State};
use netns_harness::scratch::{self, Scratch};
use serde_json::json;

const PF: &str = "0000:00:04.0";

fn vf(i: u32) -> String {
    format!("0000:00:10.{i}")
}

/// A PF `eth1` with 7 VFs (igbvf), the last bound to vfio-pci in IOMMU
/// group 42.
fn sysfs(root: &Path) {
    let devices = root.join("bus/pci/devices");
    let pf = devices.join(PF);
    std::fs::create_dir_all(pf.join("net/eth1")).expect("pf");
    std::fs::write(pf.join("net/eth1/operstate"), "up\n").expect("operstate");
    std::fs::write(pf.join("sriov_numvfs"), "7\n").expect("numvfs");
    for d in ["igbvf", "vfio-pci"] {
        std::fs::create_dir_all(root.join("bus/pci/drivers").join(d)).expect("driver");
    }
    std::fs::create_dir_all(root.join("kernel/iommu_groups/42")).expect("group");
    for i in 0..7 {
        let dir = devices.join(vf(i));
        std::fs::create_dir_all(&dir).expect("vf");
        std::os::unix::fs::symlink(format!("../{PF}"), dir.join("physfn")).expect("physfn");
        std::os::unix::fs::symlink(format!("../{}", vf(i)), pf.join(format!("virtfn{i}")))
            .expect("virtfn");
        std::fs::write(dir.join("vendor"), "0x8086\n").expect("vendor");
        std::fs::write(dir.join("device"), "0x10ca\n").expect("device");
        let driver = if i == 6 { "vfio-pci" } else { "igbvf" };
        std::os::unix::fs::symlink(
            root.join("bus/pci/drivers").join(driver),
            dir.join("driver"),
        )
        .expect("driver link");
        if i == 6 {
            std::os::unix::fs::symlink(
                root.join("kernel/iommu_groups/42"),
                dir.join("iommu_group"),
            )
            .expect("group link");
        }
    }
}

struct Plugin(Child);

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_plugin(scratch: &Scratch, config: &serde_json::Value) -> Plugin {
    let path: PathBuf = scratch.join("device-plugin.json");
    std::fs::write(&path, config.to_string()).expect("config");
    let log = std::fs::File::create(scratch.join("device-plugin.log")).expect("log");
    let child = Command::new(scratch::plexus_bin())
        .arg("device-plugin")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("plexus device-plugin");
    Plugin(child)
}

#[test]
fn the_device_plugin_registers_pools_follows_health_allocates_and_registers_again() {
    let scratch = Scratch::new("devplugin").expect("scratch");
    let root = scratch.join("sys");
    sysfs(&root);
    let mut kubelet = Kubelet::start(&scratch.join("kubelet")).expect("kubelet");
    let config = json!({
        "resourceList": [
            {"resourceName": "sriov_a", "selectors": {"vendors": ["8086"], "devices": ["10ca"],
                                                      "pfNames": ["eth1#0-3"]}},
            {"resourceName": "sriov_b", "selectors": {"pfNames": ["eth1#4-6"]}},
            {"resourceName": "sriov_dpdk", "selectors": {"drivers": ["vfio-pci"]}},
        ],
        "deviceDir": kubelet.device_dir(),
        "sysfs": root,
    });
    let _plugin = start_plugin(&scratch, &config);
    let log = || std::fs::read_to_string(scratch.join("device-plugin.log")).unwrap_or_default();
    let t = Duration::from_secs(10);
    fn count(r: &'static str, health: &'static str) -> impl Fn(&State) -> usize {
        move |s: &State| {
            s.devices
                .get(r)
                .map_or(0, |d| d.iter().filter(|(_, h)| h == health).count())
        }
    }
    assert!(
        kubelet.wait(t, |s| s.registrations == 3
            && count("plexus.io/sriov_a", "Healthy")(s) == 4
            && count("plexus.io/sriov_b", "Healthy")(s) == 3
            && count("plexus.io/sriov_dpdk", "Healthy")(s) == 1),
        "registered, 4 + 3 VFs by PF range, 1 by driver: {:?}\n{}",
        kubelet.with(|s| format!("{:?} {:?}", s.plugins, s.devices)),
        log()
    );
    let ids_a = kubelet.with(|s| {
        s.devices["plexus.io/sriov_a"]
            .iter()
            .map(|(id, _)| id.clone())
            .collect::<Vec<_>>()
    });
    assert_eq!(ids_a, (0..4).map(vf).collect::<Vec<_>>());

    // The PF's link goes down: every VF of it is unhealthy; back up, healthy.
    std::fs::write(
        root.join("bus/pci/devices")
            .join(PF)
            .join("net/eth1/operstate"),
        "down\n",
    )
    .expect("down");
    assert!(
        kubelet.wait(t, |s| count("plexus.io/sriov_a", "Unhealthy")(s) == 4
            && count("plexus.io/sriov_b", "Unhealthy")(s) == 3),
        "unhealthy with the PF down\n{}",
        log()
    );
    assert!(
        kubelet
            .allocate("default", "p0", "c0", "plexus.io/sriov_a", 1)
            .is_err(),
        "nothing healthy to allocate"
    );
    std::fs::write(
        root.join("bus/pci/devices")
            .join(PF)
            .join("net/eth1/operstate"),
        "up\n",
    )
    .expect("up");
    // Each resource's devices come back on its own stream: all of them.
    assert!(
        kubelet.wait(t, |s| count("plexus.io/sriov_a", "Healthy")(s) == 4
            && count("plexus.io/sriov_b", "Healthy")(s) == 3
            && count("plexus.io/sriov_dpdk", "Healthy")(s) == 1),
        "healthy with the PF up again\n{}",
        log()
    );

    // Allocate: the VFs' addresses in the environment a CNF reads.
    let (ids, resp) = kubelet
        .allocate("default", "p1", "c0", "plexus.io/sriov_a", 2)
        .expect("allocate");
    assert_eq!(ids, vec![vf(0), vf(1)], "the preferred pick: by address");
    let c = &resp.container_responses[0];
    assert_eq!(
        c.envs.get("PCIDEVICE_PLEXUS_IO_SRIOV_A"),
        Some(&format!("{},{}", vf(0), vf(1)))
    );
    assert!(c.devices.is_empty(), "igbvf VFs need no device node");
    let (ids, _) = kubelet
        .allocate("default", "p2", "c0", "plexus.io/sriov_a", 1)
        .expect("allocate");
    assert_eq!(ids, vec![vf(2)], "allocated ones are not handed out again");
    // A VF bound to vfio-pci comes with /dev/vfio's container and group.
    let (ids, resp) = kubelet
        .allocate("default", "p3", "c0", "plexus.io/sriov_dpdk", 1)
        .expect("allocate dpdk");
    assert_eq!(ids, vec![vf(6)]);
    let paths: Vec<&str> = resp.container_responses[0]
        .devices
        .iter()
        .map(|d| d.host_path.as_str())
        .collect();
    assert_eq!(paths, vec!["/dev/vfio/vfio", "/dev/vfio/42"]);

    // kubelet restarts (its sockets made anew, the plugins' removed): every
    // pool registers again and its devices come back.
    kubelet.restart().expect("restart");
    assert!(
        kubelet.wait(Duration::from_secs(15), |s| s.registrations == 6
            && count("plexus.io/sriov_a", "Healthy")(s) == 4
            && count("plexus.io/sriov_b", "Healthy")(s) == 3),
        "registered again after kubelet's restart\n{}",
        log()
    );
    let (ids, _) = kubelet
        .allocate("default", "p4", "c0", "plexus.io/sriov_b", 1)
        .expect("allocate after the restart");
    assert_eq!(ids, vec![vf(4)]);
}

/// A definition annotated `k8s.v1.cni.cncf.io/resourceName` gets, as
/// `deviceID`, the device kubelet allocated to the pod (PodResources): the
/// n-th such network the n-th device. A pod without one is refused clearly
/// and nothing is attached.
#[test]
fn a_network_naming_a_resource_gets_the_device_kubelet_allocated_to_the_pod() {
    use plexus_tests::*;
    let node = Node::new("devplugin-pod");
    let root = node.scratch.join("sys");
    sysfs(&root);
    let kubelet = Kubelet::start(&node.scratch.join("kubelet")).expect("kubelet");
    let _plugin = start_plugin(
        &node.scratch,
        &json!({"resourceList": [{"resourceName": "sriov_a", "selectors": {"pfNames": ["eth1#0-3"]}}],
                "deviceDir": kubelet.device_dir(), "sysfs": root}),
    );
    assert!(kubelet.wait(Duration::from_secs(10), |s| s
        .devices
        .get("plexus.io/sriov_a")
        .is_some_and(|d| d.len() == 4)));
    // Two networks on the resource: reference macvlan (it ignores the
    // deviceID; the record shows what each delegate was given).
    for (i, name) in ["vf-a", "vf-b"].iter().enumerate() {
        let config = macvlan(
            "1.0.0",
            &[&format!("192.168.{}.0/24", 70 + i)],
            &node.ipam_dir(),
        );
        let yaml = format!(
            "apiVersion: k8s.cni.cncf.io/v1\nkind: NetworkAttachmentDefinition\nmetadata:\n  name: {name}\n  annotations:\n    k8s.v1.cni.cncf.io/resourceName: plexus.io/sriov_a\nspec:\n  config: '{config}'\n"
        );
        node.define(&format!("{name}.yaml"), &yaml);
    }
    let mut list = node.plexus_list(
        "1.0.0",
        ptp("pods", "1.0.0", &["10.72.0.0/24"], &node.ipam_dir()),
    );
    list.plugins[0].insert(
        "podResourcesSocket".into(),
        json!(kubelet.pod_resources_socket()),
    );
    let (_ns, pod) = node.pod("default");
    let pod = pod.networks("vf-a,vf-b");
    let (ids, _) = kubelet
        .allocate("default", &pod.name, "app", "plexus.io/sriov_a", 2)
        .expect("allocate");
    node.runtime.add(&list, &pod).expect("ADD");
    let record = std::fs::read_dir(node.plexus_cache().join("results"))
        .expect("records")
        .flatten()
        .find(|e| e.file_name().to_string_lossy().contains(&pod.container_id))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .expect("the pod's record");
    for id in &ids {
        assert!(
            record.contains(&format!("\"deviceID\":\"{id}\"")),
            "{id} in {record}"
        );
    }
    node.runtime.del(&list, &pod).expect("DEL");

    // A pod kubelet gave no device: refused, nothing attached.
    let (pod_ns, other) = node.pod("default");
    let other = other.networks("vf-a");
    let before = node.snapshot();
    let err = node
        .runtime
        .add(&list, &other)
        .expect_err("no device allocated");
    assert_eq!(err.code, 7, "{err:?}");
    assert!(
        err.msg.contains("plexus.io/sriov_a") && err.msg.contains(&other.name),
        "{err:?}"
    );
    assert_eq!(node.snapshot(), before);
    assert_eq!(
        netns_harness::kernel::link_names(pod_ns.name()).expect("links"),
        vec!["lo".to_string()]
    );
    node.runtime
        .del(&list, &other)
        .expect("DEL after the failed ADD");
}
