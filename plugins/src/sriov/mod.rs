//! `plexus-sriov`: an SR-IOV VF per attachment, with sriov-cni's config
//! fields (`deviceID`, `vlan`, `vlanQoS`, `vlanProto`, `mac`, `spoofchk`,
//! `trust`, `link_state`, `min_tx_rate`, `max_tx_rate`, `ipam`).
//!
//! Netdev mode (the VF bound to a kernel driver): the VF's netdev moves into
//! the pod under the attachment's name, with the requested MAC and IPAM's
//! addresses. DPDK mode (bound to `vfio-pci` or another user-space driver):
//! nothing moves; the addresses are allocated and the result names the
//! device. Either way the VF's settings are set on its PF over netlink.
//!
//! Before changing anything, ADD records what it will change and how it was
//! (see [`record`]); DEL and GC put back exactly that ([`restore`]), finding the netdev in
//! whatever namespace holds it: the pod's, the host's, or the initial one,
//! where the kernel puts a deleted namespace's physical devices.

mod conf;
mod device;
mod record;
mod restore;

use std::path::Path;

use cni::plugin::{Plugin, Request};
use cni::result::Interface;
use cni::{code, CniResult, Error};
use tracing::{info, warn};

use crate::ipam_call::{self, Ipam};
use crate::kernel::netlink::{mac_string, Link, Netns, VfConfig, VfSetting};
use conf::Conf;
use device::{Vf, SYSFS_PCI};
use record::{Netdev, Record, Records};
use restore::release;

/// The plugin.
pub struct Sriov;

/// The VF asked for is held by another attachment.
pub const IN_USE: u32 = 120;

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(code::INVALID_NETWORK_CONFIG, msg)
}

fn drift(msg: impl Into<String>) -> Error {
    Error::new(
        crate::sublink::DRIFT,
        format!("plexus-sriov: {}", msg.into()),
    )
}

/// What ADD found and will change, checked before anything changes.
struct Claim {
    record: Record,
    /// The settings the VF does not hold yet.
    apply: Vec<VfSetting>,
    host: Netns,
    /// The PF's netdev in the host.
    pf: Link,
    /// The pod's netns, in netdev mode.
    pod: Option<Netns>,
}

/// The PF's netdev and the VF's settings on it.
fn pf_and_config(host: &Netns, pci: &str, pf: &str, vf: u32) -> Result<(Link, VfConfig), Error> {
    let link = host.link_of_device(pf)?.ok_or_else(|| {
        invalid(format!(
            "{pci}: its PF {pf} has no netdev in the host's netns"
        ))
    })?;
    let config = host
        .vfs(link.index)?
        .into_iter()
        .find_map(|(n, c)| (n == vf).then_some(c))
        .ok_or_else(|| invalid(format!("{pci}: PF {} ({pf}) reports no VF {vf}", link.name)))?;
    Ok((link, config))
}

fn claim(req: &Request, conf: &Conf, vf: &Vf) -> Result<Claim, Error> {
    let host = Netns::host()?;
    let (pf, current) = pf_and_config(&host, &vf.pci, &vf.pf, vf.index)?;
    let (netdev, pod) = if vf.user_space() {
        (None, None)
    } else {
        if vf.driver.is_none() {
            return Err(invalid(format!(
                "{}: no driver is bound to the VF (neither a netdev driver nor vfio-pci)",
                vf.pci
            )));
        }
        let link = host.link_of_device(&vf.pci)?.ok_or_else(|| {
            Error::new(
                IN_USE,
                format!(
                    "{}: VF in use: its netdev is not in the host's netns",
                    vf.pci
                ),
            )
        })?;
        let pod = Netns::open(Path::new(&req.netns))?;
        if pod.link(&req.ifname)?.is_some() {
            return Err(invalid(format!(
                "interface {} already exists in {}",
                req.ifname, req.netns
            )));
        }
        let netdev = Netdev {
            name: link.name,
            mac: link.mac,
            up: link.up,
        };
        (Some(netdev), Some(pod))
    };
    let apply: Vec<VfSetting> = conf
        .settings
        .iter()
        .filter(|s| !s.holds(&current))
        .copied()
        .collect();
    let record = Record {
        network: req.conf.name.clone(),
        container_id: req.container_id.clone(),
        ifname: req.ifname.clone(),
        netns: req.netns.clone(),
        pci: vf.pci.clone(),
        pf: vf.pf.clone(),
        vf: vf.index,
        netdev,
        saved: apply.iter().map(|s| s.current(&current)).collect(),
    };
    Ok(Claim {
        record,
        apply,
        host,
        pf,
        pod,
    })
}

/// Sets the VF's settings on its PF and, in netdev mode, moves the netdev
/// into the pod, named, with its MAC, up; its link there is returned.
fn attach(c: &Claim, conf: &Conf) -> Result<Option<Link>, Error> {
    let r = &c.record;
    for s in &c.apply {
        c.host.set_vf(c.pf.index, r.vf, s).map_err(|e| {
            invalid(format!(
                "{}: PF {} ({}) refuses {s} for VF {}",
                r.pci, c.pf.name, r.pf, r.vf
            ))
            .with_details(e.msg)
        })?;
    }
    crate::crash::point("sriov.vf-configured");
    let Some(pod) = &c.pod else {
        return Ok(None);
    };
    let link = c
        .host
        .link_of_device(&r.pci)?
        .ok_or_else(|| Error::new(IN_USE, format!("{}: its netdev left the host", r.pci)))?;
    c.host.move_link(link.index, pod, &r.ifname)?;
    crate::crash::point("sriov.moved");
    let moved = pod.link_of_device(&r.pci)?.ok_or_else(|| {
        Error::new(
            code::INTERNAL,
            format!("{}: its netdev is not in {} after the move", r.pci, r.netns),
        )
    })?;
    if let Some(mac) = &conf.mac {
        pod.set_mac(moved.index, mac)?;
    }
    pod.up(moved.index)?;
    Ok(Some(pod.expect_link(&r.ifname)?))
}

/// Puts IPAM's addresses on the netdev (netdev mode) and writes the result.
fn address(
    c: &Claim,
    conf: &Conf,
    link: Option<Link>,
    ipam: &CniResult,
) -> Result<CniResult, Error> {
    let r = &c.record;
    let (routes, mac, mtu) = match (&c.pod, &link) {
        (Some(pod), Some(link)) => {
            let routes = ipam_call::configure(pod, link.index, ipam)?;
            crate::crash::point("sriov.addressed");
            (routes, Some(mac_string(&link.mac)), Some(link.mtu))
        }
        _ => (ipam.routes.clone(), conf.mac.map(|m| mac_string(&m)), None),
    };
    let interface = Interface {
        name: r.ifname.clone(),
        mac,
        mtu,
        sandbox: Some(r.netns.clone()),
        pci_id: Some(r.pci.clone()),
        ..Default::default()
    };
    Ok(ipam_call::on_interface(interface, ipam, routes))
}

impl Plugin for Sriov {
    fn add(&self, req: &Request) -> Result<CniResult, Error> {
        let conf = Conf::parse(req)?;
        let pci = conf.device()?;
        let vf = device::resolve(Path::new(SYSFS_PCI), pci)?;
        let records = Records::lock(&conf.state_dir)?;
        if let Some(held) = records.get(pci)? {
            if !held.is(&req.container_id, &req.ifname) {
                return Err(Error::new(
                    IN_USE,
                    format!(
                        "{pci}: VF in use by another pod (container {}, interface {})",
                        held.container_id, held.ifname
                    ),
                ));
            }
            // This attachment's own, from an ADD that did not finish.
            release(&records, &[held], &req.netns)?;
        }
        let c = claim(req, &conf, &vf)?;
        records.put(&c.record)?;
        crate::crash::point("sriov.recorded");
        let ipam = Ipam::of(req)?;
        let attached = match &ipam {
            // IPAM and the VF do not depend on each other.
            Some(ipam) => {
                let (link, addresses) = ipam.add_beside(|| attach(&c, &conf));
                link.and_then(|link| addresses.and_then(|a| address(&c, &conf, link, &a)))
            }
            None => {
                attach(&c, &conf).and_then(|link| address(&c, &conf, link, &CniResult::default()))
            }
        };
        attached.inspect_err(|_| {
            let Claim { record, .. } = &c;
            if let Err(e) = release(&records, std::slice::from_ref(record), &req.netns) {
                warn!(error = %e, "cleanup after a failed ADD");
            }
            if let Some(Err(e)) = ipam.as_ref().map(Ipam::del) {
                warn!(error = %e, "IPAM release after a failed ADD");
            }
        })
    }

    /// Needs no valid setting: a config ADD refused is DEL'd all the same.
    fn del(&self, req: &Request) -> Result<(), Error> {
        let records = Records::lock(&conf::state_dir(req)?)?;
        let held: Vec<Record> = records
            .all()?
            .into_iter()
            .filter(|r| r.is(&req.container_id, &req.ifname))
            .collect();
        let (released, ipam) = match Ipam::of(req)? {
            Some(ipam) => ipam.del_beside(|| release(&records, &held, &req.netns)),
            None => (release(&records, &held, &req.netns), Ok(())),
        };
        cni::error::combine(released.err().into_iter().chain(ipam.err()).collect())
    }

    fn check(&self, req: &Request) -> Result<(), Error> {
        let conf = Conf::parse(req)?;
        let pci = conf.device()?;
        let prev = ipam_call::prev_result(req)?;
        if let Some(ipam) = Ipam::of(req)? {
            ipam.check()?;
        }
        let r = Records::lock(&conf.state_dir)?
            .get(pci)?
            .filter(|r| r.is(&req.container_id, &req.ifname))
            .ok_or_else(|| drift(format!("{pci} is not held by this attachment")))?;
        let host = Netns::host()?;
        let (pf, config) = pf_and_config(&host, pci, &r.pf, r.vf)?;
        for s in &conf.settings {
            if !s.holds(&config) {
                return Err(drift(format!(
                    "{pci}: PF {} holds {} for VF {}, not {s}",
                    pf.name,
                    s.current(&config),
                    r.vf
                )));
            }
        }
        if r.netdev.is_none() {
            let vf = device::resolve(Path::new(SYSFS_PCI), pci)?;
            if !vf.user_space() {
                return Err(drift(format!(
                    "{pci} is no longer on a user-space driver (now {})",
                    vf.driver.as_deref().unwrap_or("none")
                )));
            }
            return Ok(());
        }
        let pod = Netns::open(Path::new(&req.netns))?;
        let link = pod
            .link_of_device(pci)?
            .filter(|l| l.name == req.ifname)
            .ok_or_else(|| {
                drift(format!(
                    "{} ({pci}) is missing in {}",
                    req.ifname, req.netns
                ))
            })?;
        if let Some(lack) = ipam_call::lacks(&pod, link.index, &req.ifname, &prev, 0)? {
            return Err(drift(lack));
        }
        Ok(())
    }

    /// Puts back the VFs this network holds for attachments the runtime
    /// no longer knows, then lets IPAM do the same.
    fn gc(&self, req: &Request) -> Result<(), Error> {
        let valid = req.conf.valid_pairs();
        let records = Records::lock(&conf::state_dir(req)?)?;
        let stale: Vec<Record> = records
            .all()?
            .into_iter()
            .filter(|r| r.network == req.conf.name)
            .filter(|r| !valid.contains(&(r.container_id.clone(), r.ifname.clone())))
            .collect();
        let mut errors = Vec::new();
        for r in &stale {
            info!(vf = %r.pci, container = %r.container_id, ifname = %r.ifname,
                "GC: putting back a VF of a gone attachment");
            errors.extend(release(&records, std::slice::from_ref(r), "").err());
        }
        if let Some(ipam) = Ipam::of(req)? {
            errors.extend(ipam.gc().err());
        }
        cni::error::combine(errors)
    }

    fn status(&self, req: &Request) -> Result<(), Error> {
        Conf::parse(req)?;
        ipam_call::status(req)
    }
}
