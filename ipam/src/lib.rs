//! Cluster-wide dual-stack IPAM: pools cut into blocks that nodes claim,
//! addresses assigned to handles (`network/containerID/ifname`) by one
//! compare-and-swap transaction each, behind two stores with the same
//! semantics: etcd for a cluster, a local directory under `flock` for one node.

pub mod alloc;
pub mod block;
pub mod config;
pub mod pool;
pub mod store;

use std::net::IpAddr;

pub use alloc::{Allocator, NodeCache, Stats};
pub use block::{HandleId, HandleRecord};
pub use pool::{Family, Pool};
pub use store::{etcd::EtcdStore, local::LocalStore, Store};

/// FNV-1a, 64 bits, over `parts` one after the other: a stable hash for
/// names and a checksum for files, not for anything an attacker chooses.
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    parts
        .iter()
        .flat_map(|p| p.iter())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// Plugin-specific CNI error codes (the spec leaves 100 and up to plugins).
pub mod code {
    /// No free address of a family in the pool.
    pub const EXHAUSTED: u32 = 110;
    /// A requested address cannot be given (taken, reserved, outside the pool).
    pub const UNAVAILABLE: u32 = 111;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{store} is unreachable: {detail}")]
    Unreachable { store: String, detail: String },
    #[error("{0}")]
    Store(String),
    #[error("{0}")]
    Config(String),
    #[error("pool {pool} is invalid: {reason}")]
    PoolInvalid { pool: String, reason: String },
    #[error("pool {pool} conflicts: {reason}")]
    PoolConflict { pool: String, reason: String },
    #[error("pool {pool} is not defined in {store}")]
    PoolUnknown { pool: String, store: String },
    #[error("pool {pool} has no free {family} address")]
    Exhausted { pool: String, family: Family },
    #[error("address {ip} cannot be assigned: {reason}")]
    Unavailable { ip: IpAddr, reason: String },
    #[error("pool {pool} was changed in the store while in use; read it again")]
    PoolChanged { pool: String },
    #[error("gave up {what}: the store kept changing under it")]
    Contended { what: String },
}

impl From<Error> for cni::Error {
    fn from(e: Error) -> cni::Error {
        use cni::code as c;
        let code = match &e {
            Error::Unreachable { .. } | Error::Contended { .. } | Error::PoolChanged { .. } => {
                c::TRY_AGAIN_LATER
            }
            Error::Store(_) => c::IO_FAILURE,
            Error::Config(_)
            | Error::PoolInvalid { .. }
            | Error::PoolConflict { .. }
            | Error::PoolUnknown { .. } => c::INVALID_NETWORK_CONFIG,
            Error::Exhausted { .. } => code::EXHAUSTED,
            Error::Unavailable { .. } => code::UNAVAILABLE,
        };
        cni::Error::new(code, e.to_string())
    }
}
