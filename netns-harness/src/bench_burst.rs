//! `make bench`, a burst: 200 pod ADDs at once on one node (plexus-veth and
//! plexus-ipam on a one-member etcd), then 200 DELs at once: wall time,
//! retries, and the peak memory of all plexus processes together
//! (proportional set sizes, sampled every 5 ms).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::Instant;

use serde_json::json;

use crate::etcd::EtcdCluster;
use crate::fixtures::plexus_ipam_on_etcd;
use crate::kernel::peak_plexus_pss;
use crate::node::Node;

const PODS: usize = 200;

pub fn run() -> Result<(), String> {
    let node = Node::try_new("bench-burst").map_err(|e| format!("create node: {e}"))?;
    let etcd = EtcdCluster::start_in(1, &node.netns).map_err(|e| format!("etcd: {e}"))?;
    let cluster = json!({
        "cniVersion": "1.0.0", "name": "pods", "type": "plexus-veth",
        "ipam": plexus_ipam_on_etcd(
            &["10.91.0.0/16", "fd00:91::/64"],
            &etcd.endpoints(),
            "node-1",
            &node.scratch.join("ipam-state"),
        )
    });
    let list = node.plexus_list("1.0.0", cluster);
    let pods = (0..PODS)
        .map(|_| node.try_pod("default"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("pod netns: {e}"))?;
    let done = AtomicBool::new(false);
    let barrier = Barrier::new(PODS + 1);
    let (add_wall, retried, peak, del_wall) = std::thread::scope(|s| {
        let sampler = s.spawn(|| peak_plexus_pss(&done));
        let adds: Vec<_> = pods
            .iter()
            .map(|(_, pod)| {
                let (list, barrier, node) = (&list, &barrier, &node);
                s.spawn(move || {
                    barrier.wait();
                    let mut retried = 0;
                    loop {
                        match node.runtime.add(list, pod) {
                            Ok(_) => return Ok(retried),
                            Err(e) if e.code == 11 && retried < 5 => retried += 1,
                            Err(e) => return Err(format!("ADD: {e}")),
                        }
                    }
                })
            })
            .collect();
        barrier.wait();
        let t = Instant::now();
        let mut retried = 0;
        let mut failed = None;
        for h in adds {
            match h.join() {
                Ok(Ok(r)) => retried += r,
                Ok(Err(e)) => failed = Some(e),
                Err(_) => failed = Some("ADD thread panicked".into()),
            }
        }
        let add_wall = t.elapsed();
        let t = Instant::now();
        let dels: Vec<_> = pods
            .iter()
            .map(|(_, pod)| {
                let (list, node) = (&list, &node);
                s.spawn(move || node.runtime.del(list, pod))
            })
            .collect();
        for h in dels {
            if !matches!(h.join(), Ok(Ok(()))) {
                failed.get_or_insert_with(|| "a DEL failed".into());
            }
        }
        let del_wall = t.elapsed();
        done.store(true, Ordering::Relaxed);
        let peak = sampler.join().unwrap_or((0, 0));
        match failed {
            Some(e) => Err(e),
            None => Ok((add_wall, retried, peak, del_wall)),
        }
    })?;
    let (kib, most) = peak;
    let mib = kib as f64 / 1024.0;
    println!(
        "\nBurst: {PODS} pod ADDs at once on one node (plexus-veth + plexus-ipam on etcd), then \
         {PODS} DELs at once"
    );
    println!(
        "  ADDs {:.2} s ({retried} retried), DELs {:.2} s; peak memory of all plexus processes \
         together {mib:.1} MiB (proportional set sizes), up to {most} at once, {:.2} MiB each",
        add_wall.as_secs_f64(),
        del_wall.as_secs_f64(),
        mib / most.max(1) as f64
    );
    Ok(())
}
