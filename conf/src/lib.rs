//! Network definitions as network admins write them: NetworkAttachmentDefinition
//! objects, cluster- or tenant-scoped, validated before use.

pub mod api;
pub mod definition;
pub mod validate;

pub use definition::{Definition, Definitions, Error, Scope};
