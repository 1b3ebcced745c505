//! `make demo`: two pods on one node, each with the cluster network (the
//! built-in routed veth, addresses from the cluster IPAM on a real etcd) and
//! a MACVLAN secondary network from a definition file (Debian's reference
//! plugins as delegates), probed over both, then removed, with proof that
//! nothing is left.

use std::net::SocketAddr;
use std::time::Duration;

use ipam::config::EtcdConf;
use ipam::{Allocator, EtcdStore};
use serde_json::json;

use crate::etcd::EtcdCluster;
use crate::fixtures::{addr_ip, macvlan, nad, plexus_ipam_on_etcd};
use crate::node::{Node, UPLINK};
use crate::{kernel, probe, Netns};

type Res<T> = Result<T, String>;

fn step<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> Res<T> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// Runs the demo; prints what it does; an error says which step failed.
pub fn run() -> Res<()> {
    println!(
        "== Plexus demo: the plexus meta-plugin, its built-in routed veth and cluster IPAM, \
         and Debian's reference plugins as delegates\n"
    );
    let node = step("create node", Node::try_new("demo"))?;
    let ipam = node.ipam_dir();
    println!(
        "node      netns {} (stands in for the host), uplink {UPLINK}",
        node.ns()
    );
    let etcd = step("start etcd", EtcdCluster::start_in(1, &node.netns))?;
    let endpoints = etcd.endpoints();
    println!(
        "etcd      {} (Debian's etcd, inside the node netns)",
        endpoints.join(", ")
    );
    let cluster = json!({
        "cniVersion": "1.0.0", "name": "k8s-pods", "type": "plexus-veth",
        "ipam": plexus_ipam_on_etcd(
            &["10.244.0.0/16", "fd00:10:244::/64"],
            &endpoints,
            "demo-node",
            &node.scratch.join("plexus-ipam"),
        ),
    });
    let data = macvlan("1.0.0", &["192.168.100.0/24", "fd00:100::/64"], &ipam);
    node.define("data-net.yaml", &nad("data-net", None, &data));
    let list = node.plexus_list("1.0.0", cluster);
    println!(
        "cluster   k8s-pods = plexus-veth (built in, Calico's routed model) + plexus-ipam on etcd,\n          \
         10.244.0.0/16 and fd00:10:244::/64 cut into /26 and /122 blocks per node"
    );
    println!("secondary data-net = macvlan bridge on {UPLINK} + host-local (reference plugins), 192.168.100.0/24 and fd00:100::/64");
    println!(
        "          from {}\n",
        node.conf_dir().join("data-net.yaml").display()
    );
    let before = node.snapshot();

    let mut pods = Vec::new();
    for name in ["pod-a", "pod-b"] {
        let (ns, pod) = step("create pod netns", node.try_pod("default"))?;
        let pod = pod.networks("data-net");
        let result = step(&format!("ADD {name}"), node.runtime.add(&list, &pod))?;
        let ifaces = result["interfaces"].as_array().map(Vec::len).unwrap_or(0);
        println!(
            "ADD {name} ({}): result lists {ifaces} interfaces",
            ns.path_str()
        );
        for dev in ["eth0", "net1"] {
            let link = step("read link", kernel::link(ns.name(), dev))?
                .ok_or_else(|| format!("{name} has no {dev}"))?;
            let addrs = step("read addresses", kernel::addrs(ns.name(), dev))?;
            println!("    {dev:5} {:8} {}", link.kind, addrs.join("  "));
        }
        pods.push((name, ns, pod));
    }

    println!("\nprobes from pod-a to pod-b:");
    let server = step("start echo server", probe::EchoServer::start(&pods[1].1))?;
    let t = Duration::from_secs(5);
    for dev in ["eth0", "net1"] {
        for cidr in step("read addresses", kernel::addrs(pods[1].1.name(), dev))? {
            let ip = addr_ip(&cidr);
            let rtt = step(&format!("ping {ip}"), probe::ping(&pods[0].1, ip, t))?;
            let sa = SocketAddr::new(ip, server.port());
            step(&format!("tcp {sa}"), probe::tcp(&pods[0].1, sa, t))?;
            step(&format!("udp {sa}"), probe::udp(&pods[0].1, sa, t))?;
            println!(
                "    {dev:5} {ip:<36} icmp {:>6.2} ms   tcp echo ok   udp echo ok",
                rtt.as_secs_f64() * 1e3
            );
        }
    }
    drop(server);

    println!();
    let mut names = Vec::new();
    for (name, ns, pod) in pods {
        step(&format!("DEL {name}"), node.runtime.del(&list, &pod))?;
        let left: Vec<String> = step("read links", kernel::link_names(ns.name()))?
            .into_iter()
            .filter(|n| n != "lo")
            .collect();
        if !left.is_empty() {
            return Err(format!("{name}: interfaces left after DEL: {left:?}"));
        }
        println!("DEL {name}: pod holds only lo");
        names.push(ns.name().to_string());
        step("delete pod netns", ns.delete())?;
    }
    let after = node.snapshot();
    let leases = node.leases();
    let held = step(
        "read the IPAM in etcd",
        node.netns
            .run(|| -> Result<(usize, usize), ipam::Error> {
                let conf = EtcdConf::new(endpoints.clone(), ipam::config::DEFAULT_PREFIX);
                let mut a = Allocator::new(EtcdStore::connect(&conf)?, "demo-audit");
                let pool = a.pool("k8s-pods")?;
                Ok((a.handles("k8s-pods")?.len(), a.allocated(&pool)?.len()))
            })
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string())),
    )?;
    let records = node.records();
    let netns_left: Vec<&String> = names.iter().filter(|n| Netns::exists(n)).collect();
    println!("\nleft behind on the node:");
    println!(
        "    links, addresses, routes changed: {}",
        if after == before { "none" } else { "SOME" }
    );
    println!("    host-local leases:                {}", leases.len());
    println!(
        "    plexus-ipam handles, addresses:   {}, {}",
        held.0, held.1
    );
    println!("    plexus attachment records:        {}", records.len());
    println!("    pod netns:                        {}", netns_left.len());
    if after != before
        || !leases.is_empty()
        || !records.is_empty()
        || !netns_left.is_empty()
        || held != (0, 0)
    {
        return Err(format!(
            "leftovers: node diff {:?}, leases {leases:?}, records {records:?}, netns {netns_left:?}, \
             IPAM handles and addresses {held:?}",
            after.iter().filter(|l| !before.contains(l)).collect::<Vec<_>>()
        ));
    }
    println!("\ndemo OK");
    Ok(())
}
