//! `plexus-ipvlan`: an IPVLAN sub-interface per pod (modes l2, l3, l3s), with
//! the reference plugin's config fields (`master`, `mode`, `mtu`,
//! `linkInContainer`, `ipam`).

use cni::plugin::Request;
use cni::{code, Error};
use serde_json::Value;

use crate::kernel::netlink::SubLink;
use crate::sublink::{self, Conf, SubLinkPlugin};

/// The plugin.
pub const IPVLAN: SubLinkPlugin = SubLinkPlugin(conf);

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
