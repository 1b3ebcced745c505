//! plexusctl
fn main() {}
