//! Netlink inside a network namespace. This is the one place that enters a
//! namespace: the calling thread `setns`es into it for as long as opening the
//! netlink socket takes and comes straight back (sysctls: a short-lived
//! thread), so the socket stays bound to that namespace while every later
//! request runs from a thread in its own.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Instant;

use cni::{code, Error};
use futures_util::TryStreamExt;
use ipnetwork::IpNetwork;
use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{
    InfoData, InfoIpVlan, InfoMacVlan, InfoVeth, IpVlanMode, LinkAttribute, LinkFlags, LinkInfo,
    LinkMessage, MacVlanMode,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope, RouteType,
};
use rtnetlink::{Handle, LinkIpVlan, LinkMacVlan, LinkUnspec, LinkVeth, RouteMessageBuilder};
use tokio::runtime::Runtime;

mod detached;
mod vf;
pub use vf::{VfConfig, VfLink, VfSetting, VlanProto};

/// A netlink handle bound to one network namespace.
pub struct Netns {
    rt: Runtime,
    handle: Handle,
    file: File,
    path: String,
    /// False for the namespace this process already runs in.
    foreign: bool,
}

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `veth`, `macvlan`, … (empty for plain devices).
    pub kind: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub up: bool,
    pub alias: Option<String>,
    /// `macvlan`/`ipvlan` mode as `ip -d link` names it; empty otherwise.
    pub mode: String,
    /// The link's group ([`PLEXUS_GROUP`] for links Plexus made).
    pub group: u32,
    /// The device the netdev belongs to (a PCI address for a NIC's
    /// function), as the kernel names it; `None` for virtual links.
    pub parent: Option<String>,
}

/// The link group Plexus creates its links in. Unlike the alias (set by a
/// second message), the group is part of the message that creates the
/// link: a link whose creator died before marking it is still known as
/// Plexus' by its name, kind and group.
pub const PLEXUS_GROUP: u32 = 0x0070_6c78;

impl Link {
    /// Whether this is the link Plexus marked with `alias`, or made (in its
    /// group) and did not get to mark.
    pub fn is_ours(&self, kind: &str, alias: &str) -> bool {
        self.kind == kind
            && match &self.alias {
                Some(a) => a == alias,
                None => self.group == PLEXUS_GROUP,
            }
    }
}

/// A sub-interface kind and mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubLink {
    MacvlanBridge,
    MacvlanPrivate,
    MacvlanVepa,
    MacvlanPassthru,
    IpvlanL2,
    IpvlanL3,
    IpvlanL3s,
}

impl SubLink {
    /// The mode as `ip -d link` prints it.
    pub fn mode_name(self) -> &'static str {
        match self {
            SubLink::MacvlanBridge => "bridge",
            SubLink::MacvlanPrivate => "private",
            SubLink::MacvlanVepa => "vepa",
            SubLink::MacvlanPassthru => "passthru",
            SubLink::IpvlanL2 => "l2",
            SubLink::IpvlanL3 => "l3",
            SubLink::IpvlanL3s => "l3s",
        }
    }

    /// `macvlan` or `ipvlan`.
    pub fn kind_name(self) -> &'static str {
        match self {
            SubLink::MacvlanBridge
            | SubLink::MacvlanPrivate
            | SubLink::MacvlanVepa
            | SubLink::MacvlanPassthru => "macvlan",
            _ => "ipvlan",
        }
    }
}

/// A route of the main table, as far as Plexus looks at routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub dst: IpNetwork,
    pub gw: Option<IpAddr>,
    pub oif: Option<u32>,
}

fn nl_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error::new(code::INTERNAL, format!("{what}: {e}"))
}

/// Runs `f` with this thread in the network namespace `ns` (its file), then
/// back in its own. Only for calls that bind something to the namespace
/// (a socket): nothing else runs on this thread meanwhile. Coming back cannot
/// fail short of the kernel losing a namespace this thread holds open; if it
/// did, the process ends rather than go on in the pod's namespace.
fn in_netns<T>(ns: &File, shown: &str, f: impl FnOnce() -> T) -> Result<T, Error> {
    /// Brings the thread back to its own namespace, `f` unwinding or not.
    struct Back<'a>(File, &'a str);
    impl Drop for Back<'_> {
        fn drop(&mut self) {
            if let Err(e) = setns(&self.0, CloneFlags::CLONE_NEWNET) {
                tracing::error!(error = %e, netns = %self.1, "cannot leave the pod's netns: exiting");
                std::process::exit(1);
            }
        }
    }
    let own = File::open("/proc/thread-self/ns/net")
        .map_err(|e| nl_err("open this thread's netns", e))?;
    setns(ns, CloneFlags::CLONE_NEWNET).map_err(|e| nl_err(format!("enter netns {shown}"), e))?;
    let _back = Back(own, shown);
    Ok(f())
}

/// Formats a MAC address as `aa:bb:…`.
pub fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Netns {
    /// Opens a netlink socket inside the namespace at `path`.
    pub fn open(path: &Path) -> Result<Netns, Error> {
        Self::open_file(path, true)
    }

    /// The namespace this process runs in (the host's, for a plugin).
    pub fn host() -> Result<Netns, Error> {
        Self::open_file(Path::new("/proc/thread-self/ns/net"), false)
    }

    fn open_file(path: &Path, enter: bool) -> Result<Netns, Error> {
        let shown = path.display().to_string();
        let file = File::open(path).map_err(|e| {
            Error::new(code::IO_FAILURE, format!("open netns {shown}")).with_details(e.to_string())
        })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| nl_err("start netlink runtime", e))?;
        // The socket is bound to the namespace of the thread that makes it:
        // for another namespace, this thread steps in for that one call.
        let (conn, handle, _) = if enter {
            in_netns(&file, &shown, || {
                let _guard = rt.enter();
                rtnetlink::new_connection().map_err(|e| nl_err(format!("netlink in {shown}"), e))
            })??
        } else {
            let _guard = rt.enter();
            rtnetlink::new_connection().map_err(|e| nl_err("netlink socket", e))?
        };
        rt.spawn(conn);
        Ok(Netns {
            rt,
            handle,
            file,
            path: shown,
            foreign: enter,
        })
    }

    /// Writes `/proc/sys/<key>` as seen from inside this namespace (from a
    /// thread that entered it, unless it is this process's own).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), Error> {
        let file = format!("/proc/sys/{}", key.replace('.', "/"));
        let what = || format!("sysctl {key}={value} in {}", self.path);
        if !self.foreign {
            return std::fs::write(&file, value).map_err(|e| nl_err(what(), e));
        }
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(|e| nl_err(what(), e))?;
                std::fs::write(&file, value).map_err(|e| nl_err(what(), e))
            })
            .join()
            .unwrap_or_else(|_| Err(nl_err(what(), "thread panicked")))
        })
    }

    /// The link named `name`, if any.
    pub fn link(&self, name: &str) -> Result<Option<Link>, Error> {
        self.rt.block_on(async {
            let mut links = self
                .handle
                .link()
                .get()
                .match_name(name.to_string())
                .execute();
            match links.try_next().await {
                Ok(Some(msg)) => Ok(Some(link_of(&msg))),
                Ok(None) => Ok(None),
                // The kernel answers ENODEV for a name it does not know.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(None),
                Err(e) => Err(nl_err(format!("link {name} in {}", self.path), e)),
            }
        })
    }

    /// Every link of this namespace.
    pub fn links(&self) -> Result<Vec<Link>, Error> {
        self.rt.block_on(async {
            let mut out = Vec::new();
            let mut links = self.handle.link().get().execute();
            while let Some(msg) = links
                .try_next()
                .await
                .map_err(|e| nl_err(format!("links of {}", self.path), e))?
            {
                out.push(link_of(&msg));
            }
            Ok(out)
        })
    }

    /// A link that must exist.
    pub fn expect_link(&self, name: &str) -> Result<Link, Error> {
        self.link(name)?
            .ok_or_else(|| nl_err(format!("link {name} in {}", self.path), "not found"))
    }

    /// Creates a veth pair, `name` up (the kernel cannot open the peer before
    /// the pair is joined, so `peer` is down): `name` here with `mac`, `peer`
    /// directly inside `peer_ns` (creating it there is far cheaper than moving
    /// it, which waits for an RCU grace period). Both get `mtu`.
    pub fn add_veth(
        &self,
        name: &str,
        peer: &str,
        peer_ns: &Netns,
        mtu: u32,
        mac: &[u8],
    ) -> Result<(), Error> {
        let mut msg = LinkVeth::new(name, peer)
            .mtu(mtu)
            .address(mac.to_vec())
            .up()
            .build();
        // One queue each, asked for: veth otherwise makes one per CPU and
        // then cuts the pair down to one, an expedited RCU grace period each.
        let one_queue = [LinkAttribute::NumTxQueues(1), LinkAttribute::NumRxQueues(1)];
        msg.attributes.push(LinkAttribute::Group(PLEXUS_GROUP));
        msg.attributes.extend(one_queue.clone());
        for attr in &mut msg.attributes {
            if let LinkAttribute::LinkInfo(infos) = attr {
                for info in infos {
                    if let LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))) = info {
                        p.attributes
                            .push(LinkAttribute::NetNsFd(peer_ns.file.as_raw_fd()));
                        p.attributes.push(LinkAttribute::Mtu(mtu));
                        p.attributes.push(LinkAttribute::Group(PLEXUS_GROUP));
                        p.attributes.extend(one_queue.clone());
                    }
                }
            }
        }
        let started = Instant::now();
        let done = self.rt.block_on(async {
            self.handle.link().add(msg).execute().await.map_err(|e| {
                nl_err(
                    format!("create veth {name} with peer {peer} in {}", peer_ns.path),
                    e,
                )
            })
        });
        changed(
            || {
                format!(
                    "create veth {name} (peer {peer} in {}) in {}",
                    peer_ns.path, self.path
                )
            },
            started,
            done,
        )
    }

    /// Creates a macvlan or ipvlan link on `master` (in this namespace), down;
    /// with `into`, the link is created directly inside that namespace.
    pub fn add_sublink(
        &self,
        name: &str,
        master: u32,
        kind: &SubLink,
        mtu: Option<u32>,
        mac: Option<&[u8; 6]>,
        into: Option<&Netns>,
    ) -> Result<(), Error> {
        let mut msg = match kind {
            SubLink::IpvlanL2 => LinkIpVlan::new(name, master, IpVlanMode::L2).build(),
            SubLink::IpvlanL3 => LinkIpVlan::new(name, master, IpVlanMode::L3).build(),
            SubLink::IpvlanL3s => LinkIpVlan::new(name, master, IpVlanMode::L3S).build(),
            SubLink::MacvlanBridge => LinkMacVlan::new(name, master, MacVlanMode::Bridge).build(),
            SubLink::MacvlanPrivate => LinkMacVlan::new(name, master, MacVlanMode::Private).build(),
            SubLink::MacvlanVepa => LinkMacVlan::new(name, master, MacVlanMode::Vepa).build(),
            SubLink::MacvlanPassthru => {
                LinkMacVlan::new(name, master, MacVlanMode::Passthrough).build()
            }
        };
        msg.attributes.push(LinkAttribute::Group(PLEXUS_GROUP));
        if let Some(mtu) = mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(mac) = mac {
            msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        if let Some(ns) = into {
            msg.attributes
                .push(LinkAttribute::NetNsFd(ns.file.as_raw_fd()));
        }
        let started = Instant::now();
        let done = self.rt.block_on(async {
            self.handle.link().add(msg).execute().await.map_err(|e| {
                nl_err(
                    format!(
                        "create {} {name} (mode {}) in {}",
                        kind.kind_name(),
                        kind.mode_name(),
                        self.path
                    ),
                    e,
                )
            })
        });
        changed(
            || {
                format!(
                    "create {} {name} (mode {}) in {}",
                    kind.kind_name(),
                    kind.mode_name(),
                    self.path
                )
            },
            started,
            done,
        )
    }

    /// Sets the alias that marks a new link as ours (the kernel ignores an
    /// alias at creation); deletes the link if that fails, since it could not
    /// be told ours later.
    pub fn mark(&self, name: &str, alias: &str) -> Result<(), Error> {
        let marked = self.set(
            LinkUnspec::new_with_name(name).alias(alias).build(),
            format!("set alias of {name}"),
        );
        if marked.is_err() {
            if let Ok(Some(link)) = self.link(name) {
                let _ = self.del_link(link.index);
            }
        }
        marked
    }

    /// The link with index `index`, if any.
    pub fn link_by_index(&self, index: u32) -> Result<Option<Link>, Error> {
        self.rt.block_on(async {
            let mut links = self.handle.link().get().match_index(index).execute();
            match links.try_next().await {
                Ok(Some(msg)) => Ok(Some(link_of(&msg))),
                Ok(None) => Ok(None),
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(None),
                Err(e) => Err(nl_err(format!("link {index} in {}", self.path), e)),
            }
        })
    }

    /// Brings a link up.
    pub fn up(&self, index: u32) -> Result<(), Error> {
        self.set(
            LinkUnspec::new_with_index(index).up().build(),
            format!("set link {index} up"),
        )
    }

    fn set(&self, msg: LinkMessage, what: String) -> Result<(), Error> {
        let started = Instant::now();
        let done = self.rt.block_on(async {
            self.handle
                .link()
                .set(msg)
                .execute()
                .await
                .map_err(|e| nl_err(format!("{what} in {}", self.path), e))
        });
        changed(|| format!("{what} in {}", self.path), started, done)
    }

    /// Deletes a link.
    pub fn del_link(&self, index: u32) -> Result<(), Error> {
        let started = Instant::now();
        let done = self.rt.block_on(async {
            match self.handle.link().del(index).execute().await {
                // Gone meanwhile (its peer's netns torn down by the kernel
                // while this ran): what was asked holds.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(()),
                done => {
                    done.map_err(|e| nl_err(format!("delete link {index} in {}", self.path), e))
                }
            }
        });
        changed(
            || format!("delete link {index} in {}", self.path),
            started,
            done,
        )
    }

    /// Deletes a link and returns once the kernel unregistered it, without
    /// waiting for the kernel's reclaim of it (see [`detached`]); in a
    /// namespace this thread is not in, or when no child can be made, as
    /// [`Netns::del_link`].
    pub fn del_link_unregistered(&self, index: u32) -> Result<(), Error> {
        // The child deletes in this thread's netns: this one's, checked.
        let here = || -> std::io::Result<bool> {
            let (h, m) = (
                std::fs::metadata("/proc/thread-self/ns/net")?,
                self.file.metadata()?,
            );
            Ok((h.dev(), h.ino()) == (m.dev(), m.ino()))
        };
        if self.foreign || !here().unwrap_or(false) {
            return self.del_link(index);
        }
        let started = Instant::now();
        let Some(done) = detached::del_link(index) else {
            return self.del_link(index);
        };
        changed(
            || format!("delete link {index} in {} (unregistered)", self.path),
            started,
            done,
        )
    }

    /// Adds an address; `nodad` skips duplicate address detection (IPv6).
    pub fn add_address(&self, index: u32, net: IpNetwork, nodad: bool) -> Result<(), Error> {
        let started = Instant::now();
        let done = self.rt.block_on(async {
            let mut req = self.handle.address().add(index, net.ip(), net.prefix());
            if nodad {
                req.message_mut()
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            req.execute()
                .await
                .map_err(|e| nl_err(format!("add address {net} in {}", self.path), e))
        });
        changed(
            || format!("add address {net} to link {index} in {}", self.path),
            started,
            done,
        )
    }

    /// The addresses of a link, link-local ones left out.
    pub fn addresses(&self, index: u32) -> Result<Vec<IpNetwork>, Error> {
        self.rt.block_on(async {
            let msgs: Vec<_> = self
                .handle
                .address()
                .get()
                .set_link_index_filter(index)
                .execute()
                .try_collect()
                .await
                .map_err(|e| nl_err(format!("addresses in {}", self.path), e))?;
            Ok(msgs
                .iter()
                .filter_map(|m| {
                    let ip = m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })?;
                    let net = IpNetwork::new(ip, m.header.prefix_len).ok()?;
                    let link_local =
                        matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
                    (!link_local).then_some(net)
                })
                .collect())
        })
    }

    /// Adds a route of the main table; without a gateway it is a link-scope route.
    pub fn add_route(&self, dst: IpNetwork, gw: Option<IpAddr>, index: u32) -> Result<(), Error> {
        let what = format!("add route {dst} in {}", self.path);
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.ip(), dst.prefix())
            .map_err(|e| nl_err(&what, e))?
            .output_interface(index);
        match gw {
            Some(gw) => b = b.gateway(gw).map_err(|e| nl_err(&what, e))?,
            None => b = b.scope(RouteScope::Link),
        }
        let msg = b.build();
        let started = Instant::now();
        let done = self.rt.block_on(async {
            self.handle
                .route()
                .add(msg)
                .execute()
                .await
                .map_err(|e| nl_err(&what, e))
        });
        changed(|| what.clone(), started, done)
    }

    /// Unicast routes of the main table, one family.
    pub fn routes(&self, v6: bool) -> Result<Vec<RouteEntry>, Error> {
        Ok(self
            .route_messages(v6)?
            .iter()
            .filter_map(|r| {
                let dst_ip = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(d) => addr(d),
                    _ => None,
                });
                let any = if v6 {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                } else {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                };
                let dst = IpNetwork::new(dst_ip.unwrap_or(any), r.header.destination_prefix_length)
                    .ok()?;
                let gw = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Gateway(g) => addr(g),
                    _ => None,
                });
                let oif = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                });
                Some(RouteEntry { dst, gw, oif })
            })
            .collect())
    }

    fn route_messages(&self, v6: bool) -> Result<Vec<RouteMessage>, Error> {
        let dump = if v6 {
            RouteMessageBuilder::<Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<Ipv4Addr>::new().build()
        };
        self.rt.block_on(async {
            let all: Vec<RouteMessage> = self
                .handle
                .route()
                .get(dump)
                .execute()
                .try_collect()
                .await
                .map_err(|e| nl_err(format!("routes in {}", self.path), e))?;
            Ok(all
                .into_iter()
                .filter(|r| {
                    r.header.table == RouteHeader::RT_TABLE_MAIN
                        && r.header.kind == RouteType::Unicast
                })
                .collect())
        })
    }

    /// Adds a permanent neighbour entry.
    pub fn add_neighbour(&self, index: u32, ip: IpAddr, mac: &[u8]) -> Result<(), Error> {
        let started = Instant::now();
        let done = self.rt.block_on(async {
            self.handle
                .neighbours()
                .add(index, ip)
                .link_layer_address(mac)
                .replace()
                .execute()
                .await
                .map_err(|e| nl_err(format!("add neighbour {ip} in {}", self.path), e))
        });
        changed(
            || format!("add neighbour {ip} on link {index} in {}", self.path),
            started,
            done,
        )
    }

    /// Makes `gw` on `ifname` the only default route of its family in the
    /// main table (the annotation's `default-route`).
    pub fn replace_default_route(&self, ifname: &str, gw: IpAddr) -> Result<(), Error> {
        let index = self.expect_link(ifname)?.index;
        let what = format!("default route via {gw} dev {ifname} in {}", self.path);
        for r in self.route_messages(gw.is_ipv6())? {
            if r.header.destination_prefix_length == 0 {
                self.rt
                    .block_on(async { self.handle.route().del(r).execute().await })
                    .map_err(|e| nl_err(&what, e))?;
            }
        }
        let any = match gw {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let dst = IpNetwork::new(any, 0).map_err(|e| nl_err(&what, e))?;
        self.add_route(dst, Some(gw), index)
            .map_err(|e| nl_err(&what, e.msg))
    }
}

/// The debug line of one change to the kernel (what, how long, how it
/// ended); passes its result on.
fn changed<T>(
    what: impl FnOnce() -> String,
    started: Instant,
    done: Result<T, Error>,
) -> Result<T, Error> {
    if tracing::enabled!(tracing::Level::DEBUG) {
        let ms = crate::log::ms_since(started);
        match &done {
            Ok(_) => tracing::debug!(change = %what(), duration_ms = ms, "netlink"),
            Err(e) => tracing::debug!(change = %what(), duration_ms = ms, error = %e.msg,
                "netlink change failed"),
        }
    }
    done
}

fn addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn mode_of(data: &InfoData) -> String {
    let name = match data {
        InfoData::MacVlan(attrs) => attrs.iter().find_map(|a| match a {
            InfoMacVlan::Mode(MacVlanMode::Bridge) => Some("bridge"),
            InfoMacVlan::Mode(MacVlanMode::Private) => Some("private"),
            InfoMacVlan::Mode(MacVlanMode::Vepa) => Some("vepa"),
            InfoMacVlan::Mode(MacVlanMode::Passthrough) => Some("passthru"),
            _ => None,
        }),
        InfoData::IpVlan(attrs) => attrs.iter().find_map(|a| match a {
            InfoIpVlan::Mode(IpVlanMode::L2) => Some("l2"),
            InfoIpVlan::Mode(IpVlanMode::L3) => Some("l3"),
            InfoIpVlan::Mode(IpVlanMode::L3S) => Some("l3s"),
            _ => None,
        }),
        _ => None,
    };
    name.unwrap_or_default().to_string()
}

fn link_of(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        kind: String::new(),
        mac: Vec::new(),
        mtu: 0,
        up: msg.header.flags.contains(LinkFlags::Up),
        alias: None,
        mode: String::new(),
        group: 0,
        parent: None,
    };
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Address(m) => link.mac = m.clone(),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::IfAlias(s) => link.alias = Some(s.clone()),
            LinkAttribute::Group(g) => link.group = *g,
            LinkAttribute::ParentDevName(p) => link.parent = Some(p.clone()),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => link.kind = k.to_string(),
                        LinkInfo::Data(data) => link.mode = mode_of(data),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link
}
