//! Pools: the address ranges a network draws from, cut into blocks that nodes
//! claim.
//!
//! A pool's ranges take host-local's shape (`subnet`, `rangeStart`,
//! `rangeEnd`, `gateway`); a pool with ranges of both families gives one
//! address of each per interface. The gateway (by default the subnet's first
//! address, as host-local), the IPv4 network and broadcast addresses and the
//! pool's `exclude` list are never handed out.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::Error;

/// Block prefix lengths when the pool does not say: 64 addresses a block.
pub const DEFAULT_BLOCK_V4: u8 = 26;
pub const DEFAULT_BLOCK_V6: u8 = 122;

/// An IP family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    pub fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// One range, as in host-local's `ranges`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    pub subnet: IpNetwork,
    #[serde(
        rename = "rangeStart",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub range_start: Option<IpAddr>,
    #[serde(rename = "rangeEnd", default, skip_serializing_if = "Option::is_none")]
    pub range_end: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
}

/// A route handed out with the pool's addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteDef {
    pub dst: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

/// Block prefix lengths per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockSizes {
    #[serde(default = "default_v4")]
    pub ipv4: u8,
    #[serde(default = "default_v6")]
    pub ipv6: u8,
}

fn default_v4() -> u8 {
    DEFAULT_BLOCK_V4
}
fn default_v6() -> u8 {
    DEFAULT_BLOCK_V6
}

impl Default for BlockSizes {
    fn default() -> Self {
        BlockSizes {
            ipv4: DEFAULT_BLOCK_V4,
            ipv6: DEFAULT_BLOCK_V6,
        }
    }
}

/// A pool definition, as stored (`pools/<name>`) and compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub name: String,
    pub ranges: Vec<Range>,
    #[serde(rename = "blockSizes", default)]
    pub block_sizes: BlockSizes,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<IpNetwork>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteDef>,
}

/// A block: one slice of a range's subnet, claimed whole by one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockCidr(pub IpNetwork);

impl BlockCidr {
    /// The form used in keys: `10.1.0.64-26`, `fd00::40-122`.
    pub fn key(&self) -> String {
        format!("{}-{}", self.0.network(), self.0.prefix())
    }

    pub fn parse_key(s: &str) -> Option<BlockCidr> {
        let (ip, prefix) = s.rsplit_once('-')?;
        let ip: IpAddr = ip.parse().ok()?;
        let prefix: u8 = prefix.parse().ok()?;
        IpNetwork::new(ip, prefix).ok().map(BlockCidr)
    }

    pub fn family(&self) -> Family {
        Family::of(self.0.ip())
    }

    /// Addresses in the block.
    pub fn size(&self) -> u128 {
        1u128 << (self.family().bits() - self.0.prefix())
    }

    /// The address at `ordinal`.
    pub fn nth(&self, ordinal: u128) -> IpAddr {
        from_u128(self.family(), to_u128(self.0.network()) + ordinal)
    }

    /// The ordinal of `ip`, if the block holds it.
    pub fn ordinal(&self, ip: IpAddr) -> Option<u32> {
        if !self.0.contains(ip) {
            return None;
        }
        u32::try_from(to_u128(ip) - to_u128(self.0.network())).ok()
    }
}

pub(crate) fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

pub(crate) fn from_u128(family: Family, v: u128) -> IpAddr {
    match family {
        // Truncation cannot happen: callers stay inside an IPv4 subnet.
        Family::V4 => IpAddr::V4(std::net::Ipv4Addr::from(v as u32)),
        Family::V6 => IpAddr::V6(std::net::Ipv6Addr::from(v)),
    }
}

fn invalid(pool: &str, why: impl std::fmt::Display) -> Error {
    Error::PoolInvalid {
        pool: pool.to_string(),
        reason: why.to_string(),
    }
}

/// Names that fit in a key component and a file name.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Range {
    fn family(&self) -> Family {
        Family::of(self.subnet.ip())
    }

    /// The gateway: as given, else the subnet's first address.
    pub fn gateway(&self) -> IpAddr {
        self.gateway
            .unwrap_or_else(|| from_u128(self.family(), to_u128(self.subnet.network()) + 1))
    }

    /// First and last address that may be handed out (before excludes).
    fn bounds(&self) -> (u128, u128) {
        let net = to_u128(self.subnet.network());
        let last = net + ((1u128 << (self.family().bits() - self.subnet.prefix())) - 1);
        let (lo, hi) = match self.family() {
            // No network or broadcast address.
            Family::V4 if self.subnet.prefix() < 31 => (net + 1, last - 1),
            Family::V4 => (net, last),
            // No subnet-router anycast address.
            Family::V6 => (net + 1, last),
        };
        let lo = self.range_start.map_or(lo, |s| to_u128(s).max(lo));
        let hi = self.range_end.map_or(hi, |e| to_u128(e).min(hi));
        (lo, hi)
    }
}

impl Pool {
    /// Canonicalises (subnets to their network address) and checks a pool.
    pub fn validated(mut self) -> Result<Pool, Error> {
        let name = self.name.clone();
        if !valid_name(&name) {
            return Err(invalid(
                &name,
                "a pool name is 1-253 characters of letters, digits, '-', '_' and '.'",
            ));
        }
        if self.ranges.is_empty() {
            return Err(invalid(&name, "no ranges"));
        }
        let bs = self.block_sizes;
        if !(16..=32).contains(&bs.ipv4) {
            return Err(invalid(
                &name,
                format!("IPv4 block size /{} is not within /16../32", bs.ipv4),
            ));
        }
        if !(112..=128).contains(&bs.ipv6) {
            return Err(invalid(
                &name,
                format!("IPv6 block size /{} is not within /112../128", bs.ipv6),
            ));
        }
        for r in &mut self.ranges {
            let subnet = IpNetwork::new(r.subnet.network(), r.subnet.prefix())
                .map_err(|e| invalid(&name, format!("subnet {}: {e}", r.subnet)))?;
            r.subnet = subnet;
            let max = match r.family() {
                Family::V4 => 30,
                Family::V6 => 126,
            };
            if subnet.prefix() > max {
                return Err(invalid(
                    &name,
                    format!("subnet {subnet} is too small to hand out addresses"),
                ));
            }
            for (what, ip) in [
                ("rangeStart", r.range_start),
                ("rangeEnd", r.range_end),
                ("gateway", r.gateway),
            ] {
                if let Some(ip) = ip {
                    if !subnet.contains(ip) {
                        return Err(invalid(
                            &name,
                            format!("{what} {ip} is outside subnet {subnet}"),
                        ));
                    }
                }
            }
            let (lo, hi) = r.bounds();
            if lo > hi {
                return Err(invalid(
                    &name,
                    format!("range of {subnet} is empty (rangeStart after rangeEnd)"),
                ));
            }
        }
        for (i, a) in self.ranges.iter().enumerate() {
            for b in &self.ranges[i + 1..] {
                if overlaps(a.subnet, b.subnet) {
                    return Err(invalid(
                        &name,
                        format!("subnets {} and {} overlap", a.subnet, b.subnet),
                    ));
                }
            }
        }
        Ok(self)
    }

    /// The families the pool hands out, each once, IPv4 first.
    pub fn families(&self) -> Vec<Family> {
        let mut out: Vec<Family> = self.ranges.iter().map(Range::family).collect();
        out.sort();
        out.dedup();
        out
    }

    pub fn block_prefix(&self, family: Family) -> u8 {
        match family {
            Family::V4 => self.block_sizes.ipv4,
            Family::V6 => self.block_sizes.ipv6,
        }
    }

    /// The range holding `ip`.
    pub fn range_of(&self, ip: IpAddr) -> Option<&Range> {
        self.ranges.iter().find(|r| r.subnet.contains(ip))
    }

    /// May `ip` be handed out?
    pub fn usable(&self, ip: IpAddr) -> bool {
        let Some(r) = self.range_of(ip) else {
            return false;
        };
        let (lo, hi) = r.bounds();
        let v = to_u128(ip);
        v >= lo && v <= hi && ip != r.gateway() && !self.exclude.iter().any(|x| x.contains(ip))
    }

    /// The block holding `ip` (the range's subnet if it is smaller than a block).
    pub fn block_of(&self, ip: IpAddr) -> Option<BlockCidr> {
        let r = self.range_of(ip)?;
        let prefix = self.block_prefix(r.family()).max(r.subnet.prefix());
        IpNetwork::new(ip, prefix)
            .ok()
            .and_then(|n| IpNetwork::new(n.network(), prefix).ok())
            .map(BlockCidr)
    }

    /// Every block of `family` that may hold a usable address, lazily, in
    /// order starting from the `start`-th (wrapping), so that nodes starting
    /// at different points rarely race for the same block.
    pub fn blocks(&self, family: Family, start: u64) -> impl Iterator<Item = BlockCidr> + '_ {
        let ranges: Vec<&Range> = self
            .ranges
            .iter()
            .filter(|r| r.family() == family)
            .collect();
        ranges.into_iter().flat_map(move |r| {
            let prefix = self.block_prefix(family).max(r.subnet.prefix());
            let shift = family.bits() - prefix;
            let net = to_u128(r.subnet.network());
            let (lo, hi) = r.bounds();
            let first = (lo - net) >> shift;
            let last = (hi - net) >> shift;
            let count = last - first + 1;
            let offset = u128::from(start) % count;
            (0..count).filter_map(move |i| {
                let index = first + (offset + i) % count;
                IpNetwork::new(from_u128(family, net + (index << shift)), prefix)
                    .ok()
                    .map(BlockCidr)
            })
        })
    }

    /// Routes as CNI results carry them.
    pub fn cni_routes(&self) -> Vec<cni::result::Route> {
        self.routes
            .iter()
            .map(|r| cni::result::Route::new(r.dst, r.gw))
            .collect()
    }
}

/// Do two networks share an address?
pub fn overlaps(a: IpNetwork, b: IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(json: &str) -> Result<Pool, Error> {
        serde_json::from_str::<Pool>(json)
            .map_err(|e| invalid("t", e))
            .and_then(Pool::validated)
    }

    #[test]
    fn gateway_network_broadcast_and_excludes_are_not_usable() {
        let p =
            pool(r#"{"name":"p","ranges":[{"subnet":"10.1.0.0/24"}],"exclude":["10.1.0.16/30"]}"#)
                .expect("valid");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(!p.usable(ip("10.1.0.0")));
        assert!(!p.usable(ip("10.1.0.1")), "default gateway");
        assert!(p.usable(ip("10.1.0.2")));
        assert!(!p.usable(ip("10.1.0.17")));
        assert!(!p.usable(ip("10.1.0.255")));
        assert!(!p.usable(ip("10.1.1.5")));
        assert_eq!(p.blocks(Family::V4, 0).count(), 4);
        assert_eq!(
            p.block_of(ip("10.1.0.70")).map(|b| b.key()),
            Some("10.1.0.64-26".to_string())
        );
    }

    #[test]
    fn blocks_stay_within_the_range_and_start_anywhere() {
        let p = pool(
            r#"{"name":"p","ranges":[{"subnet":"fd00::/64","rangeStart":"fd00::100","rangeEnd":"fd00::1ff"}]}"#,
        )
        .expect("valid");
        let keys: Vec<String> = p.blocks(Family::V6, 3).map(|b| b.key()).collect();
        assert_eq!(
            keys,
            [
                "fd00::1c0-122",
                "fd00::100-122",
                "fd00::140-122",
                "fd00::180-122"
            ]
        );
        assert!(p.blocks(Family::V4, 0).next().is_none());
    }

    #[test]
    fn malformed_pools_are_refused_with_the_reason() {
        for (json, why) in [
            (r#"{"name":"p","ranges":[]}"#, "no ranges"),
            (
                r#"{"name":"p/q","ranges":[{"subnet":"10.0.0.0/24"}]}"#,
                "pool name",
            ),
            (
                r#"{"name":"p","ranges":[{"subnet":"10.0.0.0/24","gateway":"10.0.1.1"}]}"#,
                "outside subnet",
            ),
            (
                r#"{"name":"p","ranges":[{"subnet":"10.0.0.0/24"},{"subnet":"10.0.0.128/25"}]}"#,
                "overlap",
            ),
            (
                r#"{"name":"p","ranges":[{"subnet":"10.0.0.0/24","rangeStart":"10.0.0.9","rangeEnd":"10.0.0.3"}]}"#,
                "empty",
            ),
            (
                r#"{"name":"p","ranges":[{"subnet":"10.0.0.0/24"}],"blockSizes":{"ipv4":8}}"#,
                "block size",
            ),
        ] {
            let err = pool(json).expect_err(json).to_string();
            assert!(err.contains(why), "{json}: {err}");
        }
    }
}
