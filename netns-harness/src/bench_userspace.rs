//! `make bench`, user-space networking: a vhost-user port for a pod on a
//! real OVS-DPDK, `plexus-userspace` (one OVSDB transaction, in-process
//! IPAM call) against what Intel's userspace CNI does for the same port:
//! `host-local` exec'd, then an `ovs-vsctl add-port` process, which waits
//! until `ovs-vswitchd` has the port (as plexus-userspace does). DEL
//! likewise (`ovs-vsctl del-port`, which waits for the switch, then
//! `host-local` DEL; plexus-userspace's DEL ends once the port is out of
//! the database, with the address released meanwhile). Alternating, one run.

use std::process::Command;
use std::time::{Duration, Instant};

use cni::exec::{Executor, Invocation};
use cni::plugin::Command as CniCommand;
use cni::NetConfList;
use serde_json::json;

use crate::bench::{side_by_side, verdict};
use crate::node::Node;
use crate::ovs::{Dpdk, OvsDpdk};

fn vsctl(ovs: &OvsDpdk, args: &[&str]) -> Result<(), String> {
    let out = Command::new("ovs-vsctl")
        .arg(format!("--db=unix:{}", ovs.db_socket().display()))
        .args(args)
        .output()
        .map_err(|e| format!("ovs-vsctl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ovs-vsctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub fn run(cycles: usize) -> Result<(), String> {
    let node = Node::try_new("bench-us").map_err(|e| format!("create node: {e}"))?;
    let ovs = OvsDpdk::start(&node.scratch, Dpdk::On).map_err(|e| format!("OVS-DPDK: {e}"))?;
    let ipam = node.ipam_dir();
    let sockets = ovs.dir().join("vhost");
    let ipam_conf = |subnet: &str| json!({"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": ipam});
    let plexus = NetConfList::parse_value(&json!({
        "cniVersion": "1.0.0", "name": "us-plexus",
        "plugins": [{
            "type": "plexus-userspace",
            "host": {"engine": "ovs-dpdk", "iftype": "vhostuser", "netType": "bridge",
                     "vhost": {"mode": "client"}, "bridge": {"bridgeName": "br-bench"}},
            "container": {"engine": "ovs-dpdk", "iftype": "vhostuser", "netType": "interface",
                          "vhost": {"mode": "server"}},
            "ovsdbSocket": ovs.db_socket(), "ovsRunDir": ovs.run_dir(), "socketDir": sockets,
            "ipam": ipam_conf("10.70.0.0/16"),
        }]
    }))
    .map_err(|e| e.to_string())?;
    // The reference: host-local as its own process, then ovs-vsctl.
    let reference_ipam = serde_json::to_vec(&json!({
        "cniVersion": "1.0.0", "name": "us-ref", "ipam": ipam_conf("10.71.0.0/16")
    }))
    .map_err(|e| e.to_string())?;
    let exec = Executor::new(node.bin.display().to_string());
    vsctl(
        &ovs,
        &[
            "add-br",
            "br-bench",
            "--",
            "set",
            "bridge",
            "br-bench",
            "datapath_type=netdev",
        ],
    )?;
    let (ns, pod) = node.try_pod("default").map_err(|e| e.to_string())?;
    let mut samples: [[Vec<Duration>; 2]; 2] = Default::default();
    for i in 0..cycles {
        // plexus-userspace
        let t = Instant::now();
        node.runtime
            .add(&plexus, &pod)
            .map_err(|e| format!("plexus-userspace ADD {i}: {e}"))?;
        samples[0][0].push(t.elapsed());
        let t = Instant::now();
        node.runtime
            .del(&plexus, &pod)
            .map_err(|e| format!("plexus-userspace DEL {i}: {e}"))?;
        samples[0][1].push(t.elapsed());
        // host-local + ovs-vsctl
        let inv = Invocation {
            container_id: format!("ref{i}"),
            netns: ns.path_str(),
            ifname: "net1".into(),
            args: String::new(),
        };
        let port = format!("vhuref{i}");
        let path = format!(
            "options:vhost-server-path={}",
            sockets.join(format!("ref{i}.sock")).display()
        );
        let t = Instant::now();
        exec.exec("host-local", CniCommand::Add, &inv, &reference_ipam)
            .map_err(|e| format!("host-local ADD: {e}"))?;
        vsctl(
            &ovs,
            &[
                "add-port",
                "br-bench",
                &port,
                "--",
                "set",
                "Interface",
                &port,
                "type=dpdkvhostuserclient",
                &path,
            ],
        )?;
        samples[1][0].push(t.elapsed());
        let t = Instant::now();
        vsctl(&ovs, &["del-port", "br-bench", &port])?;
        exec.exec("host-local", CniCommand::Del, &inv, &reference_ipam)
            .map_err(|e| format!("host-local DEL: {e}"))?;
        samples[1][1].push(t.elapsed());
    }
    for side in samples.iter_mut() {
        for s in side.iter_mut() {
            s.sort();
        }
    }
    println!(
        "\nUser-space networking: a vhost-user port (client mode) on a real OVS-DPDK bridge, \
         with an address from host-local, {cycles} ADD/DEL cycles each, alternating; both ADDs \
         wait until ovs-vswitchd has the port; ovs-vsctl del-port waits for the switch too, \
         plexus-userspace's DEL until the port is out of OVS's database"
    );
    let ratio = side_by_side(
        "plexus-userspace",
        "host-local + ovs-vsctl add-port (reference)",
        &samples,
    );
    verdict(
        "plexus-userspace ADD p50 against the reference",
        ratio(0, 0.5),
        0.7,
        false,
    );
    verdict(
        "plexus-userspace ADD p99 against the reference",
        ratio(0, 0.99),
        0.7,
        false,
    );
    verdict(
        "plexus-userspace DEL p50 against the reference",
        ratio(1, 0.5),
        0.7,
        false,
    );
    verdict(
        "plexus-userspace DEL p99 against the reference",
        ratio(1, 0.99),
        0.7,
        false,
    );
    if !node.leases().is_empty() {
        return Err(format!("leases left: {:?}", node.leases()));
    }
    drop(ns);
    Ok(())
}
