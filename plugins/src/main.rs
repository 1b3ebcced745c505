//! One multi-call binary: the name it runs as picks the plugin.
//!
//! Entered from the C runtime, without std's start-up: that reads
//! `/proc/self/maps` for the main thread's stack guard, sets up an alternate
//! signal stack and checks descriptors 0-2, a tenth of a millisecond of
//! every exec of a plugin that lives a few. The arguments and environment
//! still reach std (glibc hands them over); SIGPIPE is ignored and closed
//! descriptors 0-2 opened on /dev/null here as std would, so a reader that
//! went away is an error to report, not a death.

#![cfg_attr(not(test), no_main)]

mod crash;
mod daemons;
mod detached;
mod ipam;
mod ipam_call;
mod ipvlan;
mod kernel;
mod kubelet;
mod log;
mod macvlan;
mod meta;
mod sriov;
mod sublink;
mod userspace;
mod veth;

use std::process::ExitCode;
use std::sync::Arc;

/// The names this binary answers to.
pub const PLUGINS: [&str; 7] = [
    "plexus",
    "plexus-veth",
    "plexus-ipvlan",
    "plexus-macvlan",
    "plexus-userspace",
    "plexus-sriov",
    "plexus-ipam",
];

/// An executor that runs the built-in plugins in-process and execs the rest.
pub fn executor(cni_path: &str) -> cni::exec::Executor {
    cni::exec::Executor::new(cni_path)
        .with_builtin("plexus-veth", Arc::new(veth::Veth))
        .with_builtin("plexus-ipvlan", Arc::new(ipvlan::IPVLAN))
        .with_builtin("plexus-macvlan", Arc::new(macvlan::MACVLAN))
        .with_builtin("plexus-userspace", Arc::new(userspace::Userspace))
        .with_builtin("plexus-sriov", Arc::new(sriov::Sriov))
        .with_builtin("plexus-ipam", Arc::new(ipam::PlexusIpam))
}

#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn main(
    _argc: std::ffi::c_int,
    _argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    // SAFETY: ignoring a signal installs no handler of ours; nothing else
    // runs yet.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigIgn,
        )
    };
    // As std would: descriptors 0-2 closed by whoever started us are
    // opened on /dev/null, so no file or socket of ours takes their place.
    for fd in 0..3 {
        if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD) == Err(nix::errno::Errno::EBADF) {
            // Opened, it takes the lowest free descriptor: this one.
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                std::mem::forget(null);
            }
        }
    }
    let code = dispatch();
    // std::process::exit flushes stdout, as returning from std's main would.
    std::process::exit(status(code))
}

/// The test harness brings its own entry; this keeps what `main` calls in use.
#[cfg(test)]
fn main() -> ExitCode {
    dispatch()
}

/// The exit status `code` stands for (std keeps it private).
#[cfg(not(test))]
fn status(code: ExitCode) -> i32 {
    (0..=u8::MAX)
        .find(|n| ExitCode::from(*n) == code)
        .map_or(1, i32::from)
}

fn dispatch() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let name = std::path::Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.as_str() {
        "plexus" if std::env::args().nth(1).as_deref() == Some(meta::publisher::ARG) => {
            meta::publisher::main()
        }
        "plexus" if std::env::args().nth(1).as_deref() == Some(ipam::PUBLISH_ARG) => {
            ipam::publish_main()
        }
        "plexus" if std::env::args().nth(1).as_deref() == Some("agent") => {
            meta::agent::main(std::env::args().nth(2).as_deref())
        }
        "plexus" if std::env::args().nth(1).as_deref() == Some("store-relay") => {
            daemons::store_relay::main(std::env::args().nth(2).as_deref())
        }
        "plexus" if std::env::args().nth(1).as_deref() == Some("device-plugin") => {
            daemons::device_plugin::main(std::env::args().nth(2).as_deref())
        }
        "plexus" => cni::plugin::run(&meta::Meta, "Plexus meta-plugin"),
        "plexus-veth" => cni::plugin::run(&veth::Veth, "Plexus routed veth plugin (Calico model)"),
        "plexus-ipvlan" => cni::plugin::run(&ipvlan::IPVLAN, "Plexus IPVLAN plugin"),
        "plexus-macvlan" => cni::plugin::run(&macvlan::MACVLAN, "Plexus MACVLAN plugin"),
        "plexus-userspace" => cni::plugin::run(
            &userspace::Userspace,
            "Plexus user-space (vhost-user on OVS-DPDK) plugin",
        ),
        "plexus-sriov" => cni::plugin::run(&sriov::Sriov, "Plexus SR-IOV VF plugin"),
        "plexus-ipam" => cni::plugin::run(&ipam::PlexusIpam, "Plexus cluster-wide IPAM"),
        other => {
            eprintln!(
                "plexus: unknown plugin name {other:?}; run as one of {:?}",
                PLUGINS
            );
            ExitCode::from(2)
        }
    }
}
