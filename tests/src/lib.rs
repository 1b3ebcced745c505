//! Fixtures shared by the end-to-end tests live in the harness, where the demo
//! and the bench use them too.

pub use netns_harness::fixtures::*;
pub use netns_harness::node::*;
