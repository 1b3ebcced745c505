//! What MACVLAN and IPVLAN share: a sub-interface of a master link, made on
//! the master's side, moved into the pod, renamed, addressed by IPAM. Only a
//! link marked as ours (by its alias) is ever deleted.

use std::path::Path;

use cni::plugin::{Plugin, Request};
use cni::result::Interface;
use cni::{code, CniResult, Error};
use serde_json::Value;
use tracing::warn;

use crate::ipam_call::{self, Ipam};
use crate::kernel::netlink::{mac_string, Link, Netns, SubLink};

/// A CHECK that finds the attachment different from what ADD made.
pub const DRIFT: u32 = 100;

/// The config fields both plugins take, as the reference plugins name them.
pub struct Conf {
    /// `master`; the host's default-route interface when absent.
    pub master: Option<String>,
    pub mtu: Option<u32>,
    /// `linkInContainer`: the master lives in the pod's netns.
    pub link_in_container: bool,
    pub kind: SubLink,
    /// The kind as the kernel names it (`macvlan`, `ipvlan`).
    pub kernel_kind: &'static str,
    /// A requested MAC (macvlan): `mac` field or the `mac` capability.
    pub mac: Option<[u8; 6]>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(code::INVALID_NETWORK_CONFIG, msg)
}

/// Reads `master`, `mtu` and `linkInContainer`.
pub fn common(req: &Request) -> Result<(Option<String>, Option<u32>, bool), Error> {
    let extra = &req.conf.extra;
    let master = match extra.get("master") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) if !m.is_empty() => Some(m.clone()),
        Some(v) => return Err(invalid(format!("master {v} is not an interface name"))),
    };
    let mtu = match extra.get("mtu") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(0) => None,
            Some(m) if (68..=65535).contains(&m) => Some(m as u32),
            _ => return Err(invalid(format!("mtu {v} is not a number from 68 to 65535"))),
        },
    };
    let lic = match extra.get("linkInContainer") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(invalid(format!("linkInContainer {v} is not true or false"))),
    };
    Ok((master, mtu, lic))
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], Error> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(invalid(format!("mac {s:?} is not a MAC address")));
    }
    for (i, p) in parts.iter().enumerate() {
        mac[i] = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| p.len() == 2)
            .ok_or_else(|| invalid(format!("mac {s:?} is not a MAC address")))?;
    }
    Ok(mac)
}

fn owner_alias(kind: &str, req: &Request) -> String {
    format!("plexus-{kind} {} {}", req.container_id, req.ifname)
}

/// The host's default-route interface, the master when none is named.
fn default_master(host: &Netns) -> Result<String, Error> {
    let routes = host.routes(false)?;
    let index = routes
        .iter()
        .find(|r| r.dst.prefix() == 0)
        .and_then(|r| r.oif)
        .ok_or_else(|| invalid("no master given and the host has no default route"))?;
    host.link_by_index(index)?
        .map(|l| l.name)
        .ok_or_else(|| invalid("no master given and the default route's link is gone"))
}

/// ADD: IPAM first, then the link; undone on failure.
pub fn add(req: &Request, conf: &Conf) -> Result<CniResult, Error> {
    let ipam = Ipam::of(req)?;
    let addresses = match &ipam {
        Some(i) => i.add()?,
        None => CniResult::default(),
    };
    attach(req, conf, &addresses).inspect_err(|_| {
        if let Err(e) = detach(req, conf) {
            warn!(error = %e, "cleanup after a failed ADD");
        }
        if let Some(Err(e)) = ipam.as_ref().map(Ipam::del) {
            warn!(error = %e, "IPAM release after a failed ADD");
        }
    })
}

fn attach(req: &Request, conf: &Conf, ipam: &CniResult) -> Result<CniResult, Error> {
    let host = Netns::host()?;
    let pod = Netns::open(Path::new(&req.netns))?;
    if pod.link(&req.ifname)?.is_some() {
        return Err(invalid(format!(
            "interface {} already exists in {}",
            req.ifname, req.netns
        )));
    }
    let side = if conf.link_in_container { &pod } else { &host };
    let master_name = match &conf.master {
        Some(m) => m.clone(),
        None => default_master(side)?,
    };
    let master = side.link(&master_name)?.ok_or_else(|| {
        let where_ = if conf.link_in_container {
            format!("the pod's netns {}", req.netns)
        } else {
            "the host's netns".to_string()
        };
        let there: Vec<String> = side
            .links()
            .unwrap_or_default()
            .into_iter()
            .map(|l| l.name)
            .collect();
        invalid(format!("master {master_name:?} is not a link in {where_}"))
            .with_details(format!("links there: {}", there.join(", ")))
    })?;
    // Created directly inside the pod, already named: no move, no rename.
    let into = if conf.link_in_container {
        None
    } else {
        Some(&pod)
    };
    side.add_sublink(
        &req.ifname,
        master.index,
        &conf.kind,
        conf.mtu,
        conf.mac.as_ref(),
        into,
    )?;
    crate::crash::point("sublink.created");
    pod.mark(&req.ifname, &owner_alias(conf.kernel_kind, req))?;
    crate::crash::point("sublink.marked");
    let index = pod.expect_link(&req.ifname)?.index;
    pod.up(index)?;
    let routes = ipam_call::configure(&pod, index, ipam)?;
    crate::crash::point("sublink.addressed");
    let link = pod.expect_link(&req.ifname)?;
    let interface = Interface {
        name: req.ifname.clone(),
        mac: Some(mac_string(&link.mac)),
        mtu: Some(link.mtu),
        sandbox: Some(req.netns.clone()),
        ..Default::default()
    };
    Ok(ipam_call::on_interface(interface, ipam, routes))
}

/// The pod's link of this attachment, if it exists and is ours.
fn our_link(pod: &Netns, req: &Request, conf: &Conf) -> Result<Option<Link>, Error> {
    let alias = owner_alias(conf.kernel_kind, req);
    Ok(pod.link(&req.ifname)?.filter(|l| {
        let ours = l.is_ours(conf.kernel_kind, &alias);
        if !ours {
            warn!(link = %req.ifname, netns = %req.netns, "not ours: left alone");
        }
        ours
    }))
}

fn detach(req: &Request, conf: &Conf) -> Result<(), Error> {
    if req.netns.is_empty() || !Path::new(&req.netns).exists() {
        return Ok(());
    }
    let pod = Netns::open(Path::new(&req.netns))?;
    if let Some(link) = our_link(&pod, req, conf)? {
        pod.del_link(link.index)?;
        crate::crash::point("sublink.link-deleted");
    }
    Ok(())
}

/// DEL: release the addresses, then remove the link if it is still ours.
pub fn del(req: &Request, conf: &Conf) -> Result<(), Error> {
    let released = match Ipam::of(req)? {
        Some(i) => i.del(),
        None => Ok(()),
    };
    let detached = detach(req, conf);
    cni::error::combine(released.err().into_iter().chain(detached.err()).collect())
}

/// CHECK: the link is there, of our kind and mode, with its addresses and routes.
pub fn check(req: &Request, conf: &Conf) -> Result<(), Error> {
    let prev = ipam_call::prev_result(req)?;
    if let Some(ipam) = Ipam::of(req)? {
        ipam.check()?;
    }
    let drift = |what: String| Error::new(DRIFT, format!("plexus-{}: {what}", conf.kernel_kind));
    let pod = Netns::open(Path::new(&req.netns))?;
    let link = our_link(&pod, req, conf)?
        .ok_or_else(|| drift(format!("{} is missing in {}", req.ifname, req.netns)))?;
    let want_mode = conf.kind.mode_name();
    if link.mode != want_mode {
        return Err(drift(format!(
            "{} is in mode {:?}, not {want_mode:?}",
            req.ifname, link.mode
        )));
    }
    if let Some(lack) = ipam_call::lacks(&pod, link.index, &req.ifname, &prev, 0)? {
        return Err(drift(lack));
    }
    Ok(())
}

/// Reads the requested MAC from the config or the `mac` capability.
pub fn requested_mac(req: &Request) -> Result<Option<[u8; 6]>, Error> {
    let from_rt = req
        .conf
        .runtime_config
        .as_ref()
        .and_then(|rt| rt.mac.clone());
    let from_conf = req
        .conf
        .extra
        .get("mac")
        .and_then(Value::as_str)
        .map(str::to_string);
    from_rt.or(from_conf).map(|m| parse_mac(&m)).transpose()
}

/// A sub-link plugin (`plexus-macvlan`, `plexus-ipvlan`): its config
/// reader picks the kind; everything else is shared.
pub struct SubLinkPlugin(pub fn(&Request) -> Result<Conf, Error>);

impl Plugin for SubLinkPlugin {
    fn add(&self, req: &Request) -> Result<CniResult, Error> {
        add(req, &(self.0)(req)?)
    }
    fn del(&self, req: &Request) -> Result<(), Error> {
        del(req, &(self.0)(req)?)
    }
    fn check(&self, req: &Request) -> Result<(), Error> {
        check(req, &(self.0)(req)?)
    }
    /// The links live in pod netns that go with their pods; what outlives
    /// them is IPAM's, so IPAM gets the GC.
    fn gc(&self, req: &Request) -> Result<(), Error> {
        (self.0)(req)?;
        match Ipam::of(req)? {
            Some(ipam) => ipam.gc(),
            None => Ok(()),
        }
    }
}
