//! Network definitions as network admins write them: NetworkAttachmentDefinition
//! objects, cluster- or tenant-scoped, validated before use.

pub mod definition;

pub use definition::{Definition, Definitions, Error, Scope};
