//! Putting a VF back as its record says it was: the netdev back in the
//! host's netns under its old name with its old MAC, the PF's settings for
//! the VF. The netdev is looked for wherever it can be: the pod's netns, the
//! host's, and the initial one, where the kernel puts the physical devices
//! of a deleted namespace (a moment after the namespace goes).

use std::path::Path;
use std::time::{Duration, Instant};

use cni::{code, Error};
use tracing::warn;

use super::device::{self, SYSFS_PCI};
use super::record::{Netdev, Record, Records};
use crate::kernel::netlink::Netns;

/// The initial network namespace (PID 1's).
const INIT_NETNS: &str = "/proc/1/ns/net";

/// How long DEL waits for a netdev the kernel is still handing back from a
/// deleted namespace.
const RETURN_WAIT: Duration = Duration::from_secs(5);

/// A netns that may be there (a path that exists and opens).
fn open_if_there(path: &str) -> Option<Netns> {
    if path.is_empty() || !Path::new(path).exists() {
        return None;
    }
    Netns::open(Path::new(path))
        .inspect_err(|e| warn!(netns = %path, error = %e, "netns not opened"))
        .ok()
}

/// Brings the VF's netdev back into the host under its old name, from the
/// pod's netns (`netns`, else the recorded one), the host's, or the initial
/// one; waits a little for one the kernel is still handing back.
fn return_netdev(r: &Record, nd: &Netdev, host: &Netns, netns: &str) -> Result<(), Error> {
    let deadline = Instant::now() + RETURN_WAIT;
    loop {
        let mut pods = vec![netns];
        if r.netns != netns {
            pods.push(&r.netns);
        }
        for ns in pods.into_iter().filter_map(open_if_there) {
            if let Some(link) = ns.link_of_device(&r.pci)? {
                return ns.move_link(link.index, host, &nd.name);
            }
        }
        if let Some(link) = host.link_of_device(&r.pci)? {
            if link.name != nd.name {
                host.down(link.index)?;
                host.rename(link.index, &nd.name)?;
            }
            return Ok(());
        }
        if let Some(init) = open_if_there(INIT_NETNS).filter(|i| !i.same_as(host)) {
            if let Some(link) = init.link_of_device(&r.pci)? {
                return init.move_link(link.index, host, &nd.name);
            }
        }
        // A VF no longer on a netdev driver has no netdev to bring back.
        let on_netdev_driver = device::resolve(Path::new(SYSFS_PCI), &r.pci)
            .is_ok_and(|vf| vf.driver.is_some() && !vf.user_space());
        if !on_netdev_driver {
            warn!(vf = %r.pci, "the VF has no netdev driver any more: no netdev to return");
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "{}: its netdev is in none of the pod's, the host's or the initial netns; try again",
                    r.pci
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Puts back what the record says ADD changed: the netdev in the host
/// under its name with its MAC, the PF's settings for the VF.
fn restore(r: &Record, netns: &str) -> Result<(), Error> {
    let host = Netns::host()?;
    let mut errors = Vec::new();
    if let Some(nd) = &r.netdev {
        // Without its netdev the VF is not back: the record stays.
        return_netdev(r, nd, &host, netns)?;
        crate::crash::point("sriov.returned");
        // The netdev's own MAC first, while the PF still lets the VF have
        // the one it was given; a driver that refuses it gets it below.
        if let Some(link) = host.link_of_device(&r.pci)?.filter(|l| l.mac != nd.mac) {
            if let Err(e) = host.set_mac(link.index, &nd.mac) {
                tracing::debug!(vf = %r.pci, error = %e, "MAC before the PF's settings");
            }
        }
    }
    match host.link_of_device(&r.pf)? {
        Some(pf) => {
            // What the VF holds already is left alone: a setting ADD was
            // refused (or killed before) was never changed.
            let now = host
                .vfs(pf.index)?
                .into_iter()
                .find_map(|(n, c)| (n == r.vf).then_some(c));
            for s in r
                .saved
                .iter()
                .filter(|s| now.as_ref().is_none_or(|c| !s.holds(c)))
            {
                if let Err(e) = host.set_vf(pf.index, r.vf, s) {
                    errors.push(
                        Error::new(
                            e.code,
                            format!("{}: put back {s} of VF {} on PF {}", r.pci, r.vf, pf.name),
                        )
                        .with_details(e.msg),
                    );
                }
            }
        }
        None if r.saved.is_empty() => {}
        None => errors.push(Error::new(
            code::TRY_AGAIN_LATER,
            format!(
                "{}: its PF {} has no netdev in the host's netns: settings not put back",
                r.pci, r.pf
            ),
        )),
    }
    crate::crash::point("sriov.vf-restored");
    if let Some(nd) = &r.netdev {
        if let Some(link) = host.link_of_device(&r.pci)? {
            if link.mac != nd.mac {
                host.set_mac(link.index, &nd.mac)?;
            }
            if nd.up && !link.up {
                host.up(link.index)?;
            }
        }
    }
    cni::error::combine(errors)
}

/// Restores every VF of the attachment and forgets it.
pub fn release(records: &Records, held: &[Record], netns: &str) -> Result<(), Error> {
    let mut errors = Vec::new();
    for r in held {
        match restore(r, netns) {
            Ok(()) => {
                if let Err(e) = records.remove(&r.pci) {
                    errors.push(e);
                }
            }
            Err(e) => errors.push(e),
        }
    }
    cni::error::combine(errors)
}
