//! One multi-call binary: the name it runs as picks the plugin.

mod log;
mod meta;
mod netlink;

use std::process::ExitCode;

fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let name = std::path::Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.as_str() {
        "plexus" => cni::plugin::run(&meta::Meta, "Plexus meta-plugin"),
        other => {
            eprintln!("plexus: unknown plugin name {other:?}; run as \"plexus\"");
            ExitCode::from(2)
        }
    }
}
