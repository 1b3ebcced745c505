//! One multi-call binary: the name it runs as picks the plugin.

mod log;
mod meta;
mod netlink;
mod veth;

use std::process::ExitCode;
use std::sync::Arc;

/// The names this binary answers to.
pub const PLUGINS: [&str; 2] = ["plexus", "plexus-veth"];

/// An executor that runs the built-in plugins in-process and execs the rest.
pub fn executor(cni_path: &str) -> cni::exec::Executor {
    cni::exec::Executor::new(cni_path).with_builtin("plexus-veth", Arc::new(veth::Veth))
}

fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let name = std::path::Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.as_str() {
        "plexus" => cni::plugin::run(&meta::Meta, "Plexus meta-plugin"),
        "plexus-veth" => cni::plugin::run(&veth::Veth, "Plexus routed veth plugin (Calico model)"),
        other => {
            eprintln!(
                "plexus: unknown plugin name {other:?}; run as one of {:?}",
                PLUGINS
            );
            ExitCode::from(2)
        }
    }
}
