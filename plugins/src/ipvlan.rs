//! `plexus-ipvlan`: an IPVLAN sub-interface per pod (modes l2, l3, l3s), with
//! the reference plugin's config fields (`master`, `mode`, `mtu`,
//! `linkInContainer`, `ipam`).

use cni::plugin::{Plugin, Request};
use cni::{code, CniResult, Error};
use serde_json::Value;

use crate::netlink::SubLink;
use crate::sublink::{self, Conf};

/// The plugin.
pub struct Ipvlan;

fn conf(req: &Request) -> Result<Conf, Error> {
    let (master, mtu, link_in_container) = sublink::common(req)?;
    let mode = match req
        .conf
        .extra
        .get("mode")
        .and_then(Value::as_str)
        .unwrap_or("l2")
    {
        "l2" => SubLink::IpvlanL2,
        "l3" => SubLink::IpvlanL3,
        "l3s" => SubLink::IpvlanL3s,
        other => {
            return Err(Error::new(
                code::INVALID_NETWORK_CONFIG,
                format!("ipvlan mode {other:?} is not l2, l3 or l3s"),
            ))
        }
    };
    Ok(Conf {
        master,
        mtu,
        link_in_container,
        kind: mode,
        kernel_kind: "ipvlan",
        mac: None,
    })
}

impl Plugin for Ipvlan {
    fn add(&self, req: &Request) -> Result<CniResult, Error> {
        sublink::add(req, &conf(req)?)
    }
    fn del(&self, req: &Request) -> Result<(), Error> {
        sublink::del(req, &conf(req)?)
    }
    fn check(&self, req: &Request) -> Result<(), Error> {
        sublink::check(req, &conf(req)?)
    }
    fn gc(&self, req: &Request) -> Result<(), Error> {
        conf(req)?;
        sublink::ipam_gc(req)
    }
}
