//! The central API: `plexusd`, an HTTPS server in the Kubernetes API's
//! conventions whose state lives in etcd, and `plexusctl`, its CLI.

pub mod client;
pub mod ctl;
pub mod server;
pub mod tls;
