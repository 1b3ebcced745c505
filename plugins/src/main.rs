//! One multi-call binary: the name it runs as picks the plugin.
//!
//! Entered from the C runtime, without std's start-up: that reads
//! `/proc/self/maps` for the main thread's stack guard, sets up an alternate
//! signal stack and checks descriptors 0-2, a tenth of a millisecond of
//! every exec of a plugin that lives a few. The arguments are read from
//! `main`'s own (glibc hands them to std too, musl does not), the
//! environment reaches std from either; SIGPIPE is ignored and closed
//! descriptors 0-2 opened on /dev/null here as std would, so a reader that
//! went away is an error to report, not a death.

#![cfg_attr(not(test), no_main)]

#[cfg(target_env = "musl")]
mod alloc;
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

/// # Safety
/// Called by the C runtime alone, with the process's `argc` and `argv`.
#[cfg(not(test))]
#[no_mangle]
pub unsafe extern "C" fn main(
    argc: std::ffi::c_int,
    argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    // Taken from the C runtime: only glibc hands them to std as well.
    let args = (0..usize::try_from(argc).unwrap_or(0))
        .map_while(|i| {
            // SAFETY: the C runtime's argv holds `argc` pointers, each to a
            // NUL-terminated string that lives as long as the process.
            let arg = unsafe { *argv.add(i) };
            (!arg.is_null()).then(|| {
                use std::os::unix::ffi::OsStrExt;
                // SAFETY: as above.
                let bytes = unsafe { std::ffi::CStr::from_ptr(arg) }.to_bytes();
                std::ffi::OsStr::from_bytes(bytes).to_os_string()
            })
        })
        .collect();
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
    let code = dispatch(args);
    // std::process::exit flushes stdout, as returning from std's main would.
    std::process::exit(status(code))
}

/// The test harness brings its own entry; this keeps what `main` calls in use.
#[cfg(test)]
fn main() -> ExitCode {
    dispatch(std::env::args_os().collect())
}

/// The exit status `code` stands for (std keeps it private).
#[cfg(not(test))]
fn status(code: ExitCode) -> i32 {
    (0..=u8::MAX)
        .find(|n| ExitCode::from(*n) == code)
        .map_or(1, i32::from)
}

/// Runs what the name this binary runs as (`args[0]`) and, for `plexus`,
/// its first argument pick.
fn dispatch(args: Vec<std::ffi::OsString>) -> ExitCode {
    let arg = |n: usize| args.get(n).and_then(|a| a.to_str());
    let name = std::path::Path::new(args.first().map_or("".as_ref(), |a| a.as_os_str()))
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.as_str() {
        "plexus" if arg(1) == Some(meta::publisher::ARG) => meta::publisher::main(),
        "plexus" if arg(1) == Some(ipam::PUBLISH_ARG) => ipam::publish_main(),
        "plexus" if arg(1) == Some("agent") => meta::agent::main(arg(2)),
        "plexus" if arg(1) == Some("store-relay") => daemons::store_relay::main(arg(2)),
        "plexus" if arg(1) == Some("device-plugin") => daemons::device_plugin::main(arg(2)),
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
