//! What the node's plugins and daemons share to reach the kernel and the
//! switch: rtnetlink (links, addresses, routes, neighbours), nf_tables, and
//! OVSDB (Open vSwitch's database).

pub mod netlink;
pub mod nftables;
pub mod ovsdb;
