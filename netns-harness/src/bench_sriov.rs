//! `make bench`, SR-IOV, in the VM (qemu's `igb`, whose VFs only the VM
//! has): `plexus-sriov` moving VF 6's netdev into a pod with an address from
//! `plexus-ipam` (local store, in process) against Debian's reference
//! `host-device` moving the same VF with `host-local` (exec'd), ADD and DEL
//! alternating, one run.
//!
//! Both run in the VM's own netns: `host-device` finds a VF's netdev under
//! `/sys/bus/pci/devices/<VF>/net/`, which shows only the netdevs of the
//! namespace sysfs was mounted in.

use std::path::Path;
use std::time::{Duration, Instant};

use cni::NetConfList;
use serde_json::json;

use crate::bench::{side_by_side, verdict};
use crate::scratch::{self, Scratch};
use crate::{kernel, sriov, vm, Netns, Runtime};

/// The VF both move.
const VF: usize = 6;

/// Boots the VM with the SR-IOV NIC and runs this bench inside.
pub fn run(cycles: usize) -> Result<(), String> {
    if std::env::var_os("PLEXUS_IN_VM").is_some() {
        return inside(cycles);
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let cwd = std::env::current_dir().map_err(|e| e.to_string())?;
    let plexus = scratch::plexus_bin()
        .canonicalize()
        .map_err(|e| format!("plexus binary: {e}"))?;
    let argv = vec![
        exe.display().to_string(),
        "bench-sriov".to_string(),
        cycles.to_string(),
    ];
    let env = [("PLEXUS_BIN".to_string(), plexus.display().to_string())];
    let devices = vm::Devices { sriov_vfs: 7 };
    let run = vm::run_with(&argv, &cwd, &env, Duration::from_secs(1800), devices)
        .map_err(|e| format!("VM: {e}"))?;
    print!("{}", run.output);
    if run.exit_code != 0 {
        return Err(format!(
            "the SR-IOV bench failed in the VM (exit {})",
            run.exit_code
        ));
    }
    Ok(())
}

fn inside(cycles: usize) -> Result<(), String> {
    let scratch = Scratch::new("bench-sriov").map_err(|e| e.to_string())?;
    let here = Netns::name_own(&scratch::unique("pxvm")).map_err(|e| e.to_string())?;
    let bin = scratch::bin_dir(&scratch).map_err(|e| e.to_string())?;
    let runtime = Runtime::new(&bin, &scratch.join("libcni"), &here).map_err(|e| e.to_string())?;
    let pf = sriov::igb_pf().ok_or("the VM has no igb PF")?;
    let pf_name = sriov::netdevs(None)
        .into_iter()
        .find(|(d, _)| *d == pf)
        .and_then(|(_, l)| l["ifname"].as_str().map(String::from))
        .ok_or("the PF has no netdev")?;
    kernel::ip(&["link", "set", "dev", &pf_name, "up"]).map_err(|e| e.to_string())?;
    let vf = std::fs::read_link(
        Path::new("/sys/bus/pci/devices")
            .join(&pf)
            .join(format!("virtfn{VF}")),
    )
    .ok()
    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    .ok_or(format!("the PF has no VF {VF}"))?;
    let parse = |v: serde_json::Value| NetConfList::parse_value(&v).map_err(|e| e.to_string());
    let plexus = parse(json!({
        "cniVersion": "1.0.0", "name": "sr-plexus",
        "plugins": [{"type": "plexus-sriov", "deviceID": vf, "stateDir": scratch.join("sriov"),
            "ipam": {"type": "plexus-ipam", "ranges": [[{"subnet": "10.72.0.0/16"}]],
                     "stateDir": scratch.join("ipam-plexus"), "nodeName": "bench"}}]
    }))?;
    let reference = parse(json!({
        "cniVersion": "1.0.0", "name": "sr-ref",
        "plugins": [{"type": "host-device", "pciBusID": vf,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.73.0.0/16"}]],
                     "dataDir": scratch.join("ipam-ref")}}]
    }))?;
    let pod_ns = Netns::create(&scratch::unique("pxp")).map_err(|e| e.to_string())?;
    let mut samples: [[Vec<Duration>; 2]; 2] = Default::default();
    for i in 0..cycles {
        for (side, list) in [&plexus, &reference].into_iter().enumerate() {
            let mut pod = crate::Pod::new(&format!("c{side}x{i}"), &pod_ns, "default");
            pod.ifname = "net1".into();
            let t = Instant::now();
            runtime
                .add(list, &pod)
                .map_err(|e| format!("{} ADD {i}: {e}", list.name))?;
            samples[side][0].push(t.elapsed());
            let t = Instant::now();
            runtime
                .del(list, &pod)
                .map_err(|e| format!("{} DEL {i}: {e}", list.name))?;
            samples[side][1].push(t.elapsed());
        }
    }
    for side in samples.iter_mut() {
        for s in side.iter_mut() {
            s.sort();
        }
    }
    println!(
        "\nSR-IOV (in the VM, qemu's igb under TCG): VF {VF}'s netdev moved into a pod as net1 \
         with an IPv4 address and back, {cycles} ADD/DEL cycles each, alternating"
    );
    let ratio = side_by_side(
        "plexus-sriov + plexus-ipam (local store)",
        "host-device + host-local (reference)",
        &samples,
    );
    verdict(
        "plexus-sriov ADD p50 against the reference",
        ratio(0, 0.5),
        0.7,
        false,
    );
    drop(pod_ns);
    let back = sriov::netdevs(None).into_iter().any(|(d, _)| d == vf);
    if !back {
        return Err(format!("VF {VF} ({vf}) is not back in the VM's netns"));
    }
    Ok(())
}
