//! `plexus-veth`: the default network in Calico's routed model.
//!
//! The pod gets `eth0` with its /32 and /128 and default routes via
//! 169.254.1.1 and `fe80::ecee:eeff:feee:eeee`, both answered by the host side
//! (MAC `ee:ee:ee:ee:ee:ee`: proxy ARP, its own link-local, and permanent
//! neighbour entries in the pod). The host side, named from the container id,
//! carries a host route to each pod address. IPv6 addresses come from IPAM,
//! which guarantees them unique, so they are set without waiting for DAD.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use cni::plugin::{Plugin, Request};
use cni::result::{Interface, IpConfig, Route};
use cni::{code, CniResult, Error};
use ipnetwork::IpNetwork;
use tracing::warn;

use crate::ipam_call::{self, Ipam};
use crate::kernel::netlink::{mac_string, Link, Netns};

/// The pod's IPv4 gateway, answered by the host side.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The host side's MAC, as Calico sets it.
pub const HOST_MAC: [u8; 6] = [0xee; 6];
/// The host side's IPv6 link-local address (EUI-64 of [`HOST_MAC`]).
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);

/// The plugin.
pub struct Veth;

/// What the plugin reads from its config (besides `ipam`).
struct Conf {
    mtu: u32,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(code::INVALID_NETWORK_CONFIG, msg)
}

impl Conf {
    fn parse(req: &Request) -> Result<Conf, Error> {
        let mtu = match req.conf.extra.get("mtu") {
            None => 1500,
            Some(v) => v
                .as_u64()
                .filter(|m| (68..=65535).contains(m))
                .map(|m| m as u32)
                .ok_or_else(|| invalid(format!("mtu {v} is not a number from 68 to 65535")))?,
        };
        Ok(Conf { mtu })
    }
}

/// Host-side name: `plx` and 12 hex digits of a hash of container id and ifname.
pub fn host_name(container_id: &str, ifname: &str) -> String {
    let h = ipam::fnv1a(&[container_id.as_bytes(), b"/", ifname.as_bytes()]);
    format!("plx{:012x}", h & 0xffff_ffff_ffff)
}

/// The alias that marks a host-side veth as ours for this attachment.
fn owner_alias(container_id: &str, ifname: &str) -> String {
    format!("plexus-veth {container_id} {ifname}")
}

/// The host-side veth of this attachment, if it exists and is ours.
fn our_host_link(host: &Netns, req: &Request) -> Result<Option<Link>, Error> {
    let name = host_name(&req.container_id, &req.ifname);
    let alias = owner_alias(&req.container_id, &req.ifname);
    Ok(host.link(&name)?.filter(|l| {
        let ours = l.is_ours("veth", &alias);
        if !ours {
            warn!(link = %name, "a link with our name is not ours: left alone");
        }
        ours
    }))
}

fn single(ip: IpAddr) -> IpNetwork {
    match ip {
        IpAddr::V4(_) => IpNetwork::new(ip, 32),
        IpAddr::V6(_) => IpNetwork::new(ip, 128),
    }
    .unwrap_or_else(|_| unreachable!("32 and 128 are valid prefixes"))
}

fn default_dst(v6: bool) -> IpNetwork {
    let any = if v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    IpNetwork::new(any, 0).unwrap_or_else(|_| unreachable!("0 is a valid prefix"))
}

/// The veth pair of one attachment, made before its addresses are known.
struct Pair {
    host: Netns,
    pod: Netns,
    name: String,
    host_index: u32,
    pod_index: u32,
    pod_mac: Vec<u8>,
}

/// Makes the pair, up, with everything that does not depend on the
/// addresses; it runs while IPAM is still deciding them.
fn make_pair(req: &Request, conf: &Conf) -> Result<Pair, Error> {
    let host = Netns::host()?;
    let pod = Netns::open(Path::new(&req.netns))?;
    let name = host_name(&req.container_id, &req.ifname);
    // The pod side is born inside the pod, already named; the host side up.
    // Creation is all or nothing: a name taken on either side creates nothing.
    if let Err(e) = host.add_veth(&name, &req.ifname, &pod, conf.mtu, &HOST_MAC) {
        if pod.link(&req.ifname)?.is_some() {
            return Err(invalid(format!(
                "interface {} already exists in {}",
                req.ifname, req.netns
            )));
        }
        return Err(e);
    }
    crate::crash::point("veth.pair-created");
    host.mark(&name, &owner_alias(&req.container_id, &req.ifname))?;
    crate::crash::point("veth.pair-marked");
    // From here on a failure leaves a link behind; the caller's cleanup removes it.
    host.sysctl(&format!("net.ipv4.conf.{name}.proxy_arp"), "1")?;
    host.sysctl(&format!("net.ipv4.neigh.{name}.proxy_delay"), "0")?;
    host.sysctl(&format!("net.ipv6.conf.{name}.accept_dad"), "0")?;
    host.sysctl(&format!("net.ipv6.conf.{name}.accept_ra"), "0")?;
    let pod_link = pod.expect_link(&req.ifname)?;
    pod.up(pod_link.index)?;
    let host_index = host.expect_link(&name)?.index;
    Ok(Pair {
        host,
        pod,
        name,
        host_index,
        pod_index: pod_link.index,
        pod_mac: pod_link.mac,
    })
}

/// Puts IPAM's addresses on the pod side as /32 and /128, routes them from
/// the host, and gives the pod its gateways.
fn address(pair: &Pair, req: &Request, conf: &Conf, ipam: &CniResult) -> Result<CniResult, Error> {
    let Pair {
        host,
        pod,
        name,
        host_index,
        pod_index,
        ..
    } = pair;
    let has_v4 = ipam.ips.iter().any(|i| i.address.is_ipv4());
    let has_v6 = ipam.ips.iter().any(|i| i.address.is_ipv6());
    if has_v4 {
        host.sysctl("net.ipv4.ip_forward", "1")?;
    }
    if has_v6 {
        host.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    }
    let mut result = CniResult::default();
    for ip in &ipam.ips {
        let addr = single(ip.address.ip());
        pod.add_address(*pod_index, addr, true)?;
        crate::crash::point("veth.address-added");
        host.add_route(addr, None, *host_index)?;
        crate::crash::point("veth.host-route-added");
        let gw = if addr.is_ipv4() {
            IpAddr::V4(GATEWAY_V4)
        } else {
            IpAddr::V6(GATEWAY_V6)
        };
        result.ips.push(IpConfig {
            interface: Some(1),
            address: addr,
            gateway: Some(gw),
        });
    }
    if has_v4 {
        let gw = IpAddr::V4(GATEWAY_V4);
        pod.add_neighbour(*pod_index, gw, &HOST_MAC)?;
        pod.add_route(single(gw), None, *pod_index)?;
        pod.add_route(default_dst(false), Some(gw), *pod_index)?;
        result.routes.push(route(default_dst(false), gw));
    }
    if has_v6 {
        let gw = IpAddr::V6(GATEWAY_V6);
        pod.add_neighbour(*pod_index, gw, &HOST_MAC)?;
        pod.add_route(default_dst(true), Some(gw), *pod_index)?;
        result.routes.push(route(default_dst(true), gw));
    }
    crate::crash::point("veth.routed");
    result.interfaces = vec![
        Interface {
            name: name.clone(),
            mac: Some(mac_string(&HOST_MAC)),
            ..Default::default()
        },
        Interface {
            name: req.ifname.clone(),
            mac: Some(mac_string(&pair.pod_mac)),
            mtu: Some(conf.mtu),
            sandbox: Some(req.netns.clone()),
            ..Default::default()
        },
    ];
    result.dns = ipam.dns.clone();
    Ok(result)
}

fn route(dst: IpNetwork, gw: IpAddr) -> Route {
    Route::new(dst, Some(gw))
}

/// Removes the host side (and with it the pod side) if it is ours.
fn detach(req: &Request) -> Result<(), Error> {
    let host = Netns::host()?;
    match our_host_link(&host, req)? {
        Some(link) => {
            host.del_link_unregistered(link.index)?;
            crate::crash::point("veth.link-deleted");
            Ok(())
        }
        None => Ok(()),
    }
}

fn drift(what: String) -> Error {
    Error::new(crate::sublink::DRIFT, format!("plexus-veth: {what}"))
}

impl Plugin for Veth {
    fn add(&self, req: &Request) -> Result<CniResult, Error> {
        let conf = Conf::parse(req)?;
        let ipam = Ipam::required(req, "plexus-veth")?;
        // IPAM and the link work do not depend on each other.
        let (pair, addresses) = ipam.add_beside(|| make_pair(req, &conf));
        let attached = pair.and_then(|pair| addresses.and_then(|a| address(&pair, req, &conf, &a)));
        attached.inspect_err(|_| {
            if let Err(e) = detach(req) {
                warn!(error = %e, "cleanup after a failed ADD");
            }
            if let Err(e) = ipam.del() {
                warn!(error = %e, "IPAM release after a failed ADD");
            }
        })
    }

    fn del(&self, req: &Request) -> Result<(), Error> {
        Conf::parse(req)?;
        let ipam = Ipam::required(req, "plexus-veth")?;
        // Releasing never waits for the link: a missing netns or link must
        // not keep an address, and the kernel's link teardown is the slow part.
        let (detached, released) = ipam.del_beside(|| detach(req));
        cni::error::combine(released.err().into_iter().chain(detached.err()).collect())
    }

    /// Removes this plugin's host links of attachments the runtime no longer
    /// knows (only links carrying our mark), then lets IPAM do the same.
    fn gc(&self, req: &Request) -> Result<(), Error> {
        Conf::parse(req)?;
        let valid: Vec<String> = req
            .conf
            .valid_attachments
            .iter()
            .flatten()
            .map(|a| owner_alias(&a.container_id, &a.ifname))
            .collect();
        let host = Netns::host()?;
        let mut errors = Vec::new();
        for link in host.links()? {
            let ours = link
                .alias
                .as_deref()
                .is_some_and(|a| a.starts_with("plexus-veth ") && link.name.starts_with("plx"));
            if ours && !link.alias.as_ref().is_some_and(|a| valid.contains(a)) {
                if let Err(e) = host.del_link(link.index) {
                    errors.push(e);
                }
            }
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

    fn check(&self, req: &Request) -> Result<(), Error> {
        Conf::parse(req)?;
        let prev = ipam_call::prev_result(req)?;
        Ipam::required(req, "plexus-veth")?.check()?;
        let host = Netns::host()?;
        let pod = Netns::open(Path::new(&req.netns))?;
        let host_link = our_host_link(&host, req)?.ok_or_else(|| {
            drift(format!(
                "host veth {} is missing",
                host_name(&req.container_id, &req.ifname)
            ))
        })?;
        let pod_link = pod
            .link(&req.ifname)?
            .ok_or_else(|| drift(format!("{} is missing in {}", req.ifname, req.netns)))?;
        if pod_link.kind != "veth" {
            return Err(drift(format!(
                "{} is a {:?}, not a veth",
                req.ifname, pod_link.kind
            )));
        }
        if let Some(lack) = ipam_call::lacks(&pod, pod_link.index, &req.ifname, &prev, 1)? {
            return Err(drift(lack));
        }
        for ip in prev.ips.iter().filter(|i| i.interface == Some(1)) {
            let host_routes = host.routes(ip.address.is_ipv6())?;
            if !host_routes
                .iter()
                .any(|r| r.dst == ip.address && r.oif == Some(host_link.index))
            {
                return Err(drift(format!(
                    "host route to {} via {} is missing",
                    ip.address, host_link.name
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_fit_and_differ() {
        let a = host_name("c1", "eth0");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("plx"));
        assert_eq!(a, host_name("c1", "eth0"));
        assert_ne!(a, host_name("c1", "eth1"));
        assert_ne!(a, host_name("c2", "eth0"));
        assert_eq!(GATEWAY_V6.to_string(), "fe80::ecee:eeff:feee:eeee");
    }
}
