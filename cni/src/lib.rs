//! The CNI contract (spec 0.3.0 – 1.1.0), and nothing of Plexus.
//!
//! Config and conflist types keep unknown fields; results convert between every
//! supported version; errors carry the spec's codes; [`plugin::run`] is the entry
//! a plugin binary calls; [`exec`] runs other plugins from `CNI_PATH`; [`cache`]
//! keeps results in libcni's on-disk layout.

pub mod args;
pub mod cache;
pub mod config;
pub mod error;
pub mod exec;
pub mod plugin;
pub mod result;
pub mod version;

pub use config::{NetConf, NetConfList, RuntimeConfig};
pub use error::{code, Error};
pub use result::CniResult;
pub use version::Version;
