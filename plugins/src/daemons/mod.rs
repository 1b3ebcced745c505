//! The node's daemons beside the plugins: the SR-IOV device plugin, the
//! store relay (the
//! security-group agent is `meta::agent`, with the records it reads).

pub mod device_plugin;
pub mod store_relay;
