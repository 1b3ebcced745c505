//! Tests that need kernel features or devices the host lacks (ipvlan, SR-IOV
//! VFs). Run by `cargo test` on the host, this binary boots one VM (Debian's
//! kernel under qemu, with qemu's `igb` NIC and its 7 VFs) and runs itself
//! inside, where every test below executes against that real kernel; its
//! report and exit code come back out.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use netns_harness::{kernel, probe, scratch, vm};
use plexus_tests::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);

#[path = "vm/sriov.rs"]
mod sriov;

type Test = (&'static str, fn());

const TESTS: [Test; 11] = [
    ("ipvlan_l2_dual_stack_between_two_pods", ipvlan_l2),
    ("ipvlan_l3_dual_stack_between_two_pods", ipvlan_l3),
    ("ipvlan_check_and_foreign_links", ipvlan_check_and_foreign),
    ("ipvlan_killed_at_every_step_nothing_is_left", ipvlan_killed),
    (
        "sriov_vf_as_net1_with_its_settings_and_back",
        sriov::vf_as_net1_and_back,
    ),
    (
        "sriov_vf_back_after_netns_gone_and_by_gc",
        sriov::vf_back_without_netns_and_by_gc,
    ),
    ("sriov_same_vf_twice_second_refused", sriov::same_vf_twice),
    ("sriov_dpdk_mode_on_vfio", sriov::dpdk_mode_on_vfio),
    ("sriov_faults_name_the_vf", sriov::faults_named),
    (
        "sriov_device_plugin_feeds_plexus_sriov",
        sriov::device_plugin_feeds_plexus_sriov,
    ),
    ("sriov_killed_at_every_step_nothing_is_left", sriov_killed),
];

/// `plexus-ipvlan` alone killed at every step of ADD and DEL (the kill
/// matrix of `tests/crash.rs`, on this kernel).
fn ipvlan_killed() {
    killed(plexus_tests::crash::Stack::Ipvlan);
}

/// `plexus-sriov` alone killed at every step of ADD and DEL: after each
/// cleanup the VF is back in the node under its name with its MAC and
/// every setting on the PF as before.
fn sriov_killed() {
    killed(plexus_tests::crash::Stack::Sriov);
}

fn killed(stack: plexus_tests::crash::Stack) {
    let (mut rows, mut all) = (Vec::new(), Vec::new());
    plexus_tests::crash::matrix(&plexus_tests::crash::setup(stack), &mut rows, &mut all);
    println!("{}", plexus_tests::crash::table(&rows));
    assert!(all.is_empty(), "{}", all.join("\n"));
}

fn main() -> ExitCode {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if std::env::var_os("PLEXUS_IN_VM").is_some() {
        return run_inside(filter.as_deref());
    }
    let run_host = || -> Result<vm::VmRun, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let cwd = std::env::current_dir().map_err(|e| e.to_string())?;
        let plexus = scratch::plexus_bin()
            .canonicalize()
            .map_err(|e| format!("plexus binary: {e}"))?;
        let mut argv = vec![exe.display().to_string()];
        argv.extend(filter.clone());
        let env = [("PLEXUS_BIN".to_string(), plexus.display().to_string())];
        let devices = vm::Devices { sriov_vfs: 7 };
        vm::run_with(&argv, &cwd, &env, Duration::from_secs(1200), devices)
            .map_err(|e| e.to_string())
    };
    match run_host() {
        Ok(run) => {
            print!("{}", run.output);
            println!(
                "vm: exit {} after {:.1} s (one boot)",
                run.exit_code,
                run.elapsed.as_secs_f64()
            );
            if run.exit_code == 0 {
                ExitCode::SUCCESS
            } else {
                let lines: Vec<&str> = run.console.lines().collect();
                println!(
                    "vm console tail:\n{}",
                    lines[lines.len().saturating_sub(30)..].join("\n")
                );
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            println!("vm: could not run: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_inside(filter: Option<&str>) -> ExitCode {
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in TESTS
        .iter()
        .filter(|(n, _)| filter.is_none_or(|f| n.contains(f)))
    {
        match catch_unwind(AssertUnwindSafe(test)) {
            Ok(()) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 && passed > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn plexus_ipvlan(mode: &str, subnets: &[&str], ipam: &Path) -> Value {
    let ranges: Vec<Value> = subnets.iter().map(|s| json!([{"subnet": s}])).collect();
    json!({
        "cniVersion": "1.0.0",
        "type": "plexus-ipvlan",
        "master": UPLINK,
        "mode": mode,
        "ipam": {"type": "host-local", "ranges": ranges, "dataDir": ipam}
    })
}

fn cluster(node: &Node, subnet: &str) -> cni::NetConfList {
    node.plexus_list("1.0.0", plexus_veth("k8s", &[subnet], &node.ipam_dir()))
}

fn two_pods_over_ipvlan(mode: &str, v4: &str, v6: &str) {
    let node = Node::new("ipv");
    node.define(
        "iv.yaml",
        &nad(
            "iv",
            None,
            &plexus_ipvlan(mode, &[v4, v6], &node.ipam_dir()),
        ),
    );
    let list = cluster(&node, "10.244.30.0/24");
    let before = node.snapshot();
    let (ns_a, pod_a) = node.pod("default");
    let (ns_b, pod_b) = node.pod("default");
    let pod_a = pod_a.networks("iv");
    let pod_b = pod_b.networks("iv");
    node.runtime.add(&list, &pod_a).expect("ADD a");
    node.runtime.add(&list, &pod_b).expect("ADD b");
    for ns in [&ns_a, &ns_b] {
        let net1 = kernel::link(ns.name(), "net1")
            .expect("link")
            .expect("net1");
        assert_eq!((net1.kind.as_str(), net1.mode.as_str()), ("ipvlan", mode));
        let addrs = kernel::addrs(ns.name(), "net1").expect("addrs");
        assert_eq!(addrs.len(), 2, "{addrs:?}");
    }
    let server = probe::EchoServer::start(&ns_b).expect("server");
    for cidr in kernel::addrs(ns_b.name(), "net1").expect("addrs") {
        let ip = addr_ip(&cidr);
        probe::reach(&ns_a, ip, server.port(), T)
            .unwrap_or_else(|e| panic!("{e} over ipvlan {mode}"));
    }
    drop(server);
    node.runtime.check(&list, &pod_a).expect("CHECK");
    node.runtime.del(&list, &pod_a).expect("DEL a");
    node.runtime.del(&list, &pod_b).expect("DEL b");
    node.assert_released(&ns_a, "pod a");
    node.assert_released(&ns_b, "pod b");
    assert_eq!(node.snapshot(), before);
}

fn ipvlan_l2() {
    two_pods_over_ipvlan("l2", "192.168.110.0/24", "fd00:110::/64");
}

fn ipvlan_l3() {
    two_pods_over_ipvlan("l3", "192.168.111.0/24", "fd00:111::/64");
}

fn ipvlan_check_and_foreign() {
    let node = Node::new("ipvc");
    node.define(
        "iv.yaml",
        &nad(
            "iv",
            None,
            &plexus_ipvlan("l3s", &["192.168.112.0/24"], &node.ipam_dir()),
        ),
    );
    let list = cluster(&node, "10.244.31.0/24");
    // Foreign parts planted before ADD: a dummy and an ipvlan of someone else.
    kernel::ip(&["-n", node.ns(), "link", "add", "foreign0", "type", "dummy"]).expect("dummy");
    kernel::up(node.ns(), "foreign0").expect("dummy up");
    kernel::ip(&[
        "-n",
        node.ns(),
        "link",
        "add",
        "link",
        UPLINK,
        "name",
        "theirs0",
        "type",
        "ipvlan",
        "mode",
        "l2",
    ])
    .expect("their ipvlan");
    kernel::ip(&[
        "-n",
        node.ns(),
        "route",
        "add",
        "10.79.0.0/24",
        "dev",
        "foreign0",
    ])
    .expect("route");
    let before = node.snapshot();
    let (ns, pod) = node.pod("default");
    let pod = pod.networks("iv");
    node.runtime.add(&list, &pod).expect("ADD");
    assert_eq!(
        kernel::link(ns.name(), "net1")
            .expect("link")
            .expect("net1")
            .mode,
        "l3s"
    );
    node.runtime.check(&list, &pod).expect("CHECK");
    let addr = kernel::addrs(ns.name(), "net1").expect("addrs").remove(0);
    kernel::ip(&["-n", ns.name(), "addr", "del", &addr, "dev", "net1"]).expect("del addr");
    let err = node
        .runtime
        .check(&list, &pod)
        .expect_err("changed address");
    assert_eq!(err.code, 100, "{err}");
    node.runtime.del(&list, &pod).expect("DEL");
    node.assert_released(&ns, "ipvlan l3s");
    assert_eq!(
        node.snapshot(),
        before,
        "foreign links and routes untouched"
    );
}
