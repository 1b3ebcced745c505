//! `plexus-macvlan`: a MACVLAN sub-interface per pod, with the reference
//! plugin's config fields (`master`, `mode`, `mtu`, `mac`, `linkInContainer`,
//! `ipam`), so existing definitions work unchanged.

use cni::plugin::Request;
use cni::{code, Error};
use serde_json::Value;

use crate::kernel::netlink::SubLink;
use crate::sublink::{self, Conf, SubLinkPlugin};

/// The plugin.
pub const MACVLAN: SubLinkPlugin = SubLinkPlugin(conf);

fn conf(req: &Request) -> Result<Conf, Error> {
    let (master, mtu, link_in_container) = sublink::common(req)?;
    let mode = match req
        .conf
        .extra
        .get("mode")
        .and_then(Value::as_str)
        .unwrap_or("bridge")
    {
        "bridge" => SubLink::MacvlanBridge,
        "private" => SubLink::MacvlanPrivate,
        "vepa" => SubLink::MacvlanVepa,
        "passthru" => SubLink::MacvlanPassthru,
        other => {
            return Err(Error::new(
                code::INVALID_NETWORK_CONFIG,
                format!("macvlan mode {other:?} is not bridge, private, vepa or passthru"),
            ))
        }
    };
    Ok(Conf {
        master,
        mtu,
        link_in_container,
        kind: mode,
        kernel_kind: "macvlan",
        mac: sublink::requested_mac(req)?,
    })
}
