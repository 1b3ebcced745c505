//! Netlink inside a pod's network namespace. This is the one place that
//! enters a namespace: a short-lived thread `setns`es into it and opens the
//! netlink socket there, so the socket stays bound to the pod while every
//! later request runs from the calling thread, which never leaves its netns.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use cni::{code, Error};
use futures_util::TryStreamExt;
use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_route::route::{RouteHeader, RouteMessage, RouteType};
use rtnetlink::{Handle, RouteMessageBuilder};
use tokio::runtime::Runtime;

/// A netlink handle bound to one network namespace.
pub struct Netns {
    rt: Runtime,
    handle: Handle,
    path: String,
}

fn nl_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error::new(code::INTERNAL, format!("{what}: {e}"))
}

impl Netns {
    /// Opens a netlink socket inside the namespace at `path`.
    pub fn open(path: &Path) -> Result<Netns, Error> {
        let shown = path.display().to_string();
        let file = File::open(path).map_err(|e| {
            Error::new(code::IO_FAILURE, format!("open netns {shown}")).with_details(e.to_string())
        })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| nl_err("start netlink runtime", e))?;
        let rt_handle = rt.handle().clone();
        let opened = std::thread::scope(|s| {
            s.spawn(|| {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| nl_err(format!("enter netns {shown}"), e))?;
                let _guard = rt_handle.enter();
                rtnetlink::new_connection()
                    .map_err(|e| nl_err(format!("netlink socket in {shown}"), e))
            })
            .join()
            .unwrap_or_else(|_| Err(nl_err("netns thread", "panicked")))
        });
        let (conn, handle, _) = opened?;
        rt.spawn(conn);
        Ok(Netns {
            rt,
            handle,
            path: shown,
        })
    }

    /// The index of link `name`.
    pub fn link_index(&self, name: &str) -> Result<u32, Error> {
        self.rt.block_on(async {
            let mut links = self
                .handle
                .link()
                .get()
                .match_name(name.to_string())
                .execute();
            match links.try_next().await {
                Ok(Some(link)) => Ok(link.header.index),
                Ok(None) => Err(nl_err(format!("link {name} in {}", self.path), "not found")),
                Err(e) => Err(nl_err(format!("link {name} in {}", self.path), e)),
            }
        })
    }

    /// Makes `gw` on `ifname` the only default route of its family in the
    /// main table (the annotation's `default-route`).
    pub fn replace_default_route(&self, ifname: &str, gw: IpAddr) -> Result<(), Error> {
        let index = self.link_index(ifname)?;
        let what = format!("default route via {gw} dev {ifname} in {}", self.path);
        self.rt.block_on(async {
            let dump = match gw {
                IpAddr::V4(_) => RouteMessageBuilder::<Ipv4Addr>::new().build(),
                IpAddr::V6(_) => RouteMessageBuilder::<Ipv6Addr>::new().build(),
            };
            let routes: Vec<RouteMessage> = self
                .handle
                .route()
                .get(dump)
                .execute()
                .try_collect()
                .await
                .map_err(|e| nl_err(&what, e))?;
            for r in routes.into_iter().filter(|r| {
                r.header.destination_prefix_length == 0
                    && r.header.table == RouteHeader::RT_TABLE_MAIN
                    && r.header.kind == RouteType::Unicast
            }) {
                self.handle
                    .route()
                    .del(r)
                    .execute()
                    .await
                    .map_err(|e| nl_err(&what, e))?;
            }
            let unspecified = match gw {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            let route = RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix(unspecified, 0)
                .and_then(|b| b.gateway(gw))
                .map_err(|e| nl_err(&what, e))?
                .output_interface(index)
                .build();
            self.handle
                .route()
                .add(route)
                .execute()
                .await
                .map_err(|e| nl_err(&what, e))
        })
    }
}
