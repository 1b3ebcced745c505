//! What the node's plugins and daemons share to reach the kernel: rtnetlink
//! (links, addresses, routes, neighbours) and nf_tables.

pub mod netlink;
pub mod nftables;
