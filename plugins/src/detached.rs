//! Processes a CNI call starts to finish its work once it has answered
//! (`plexus publish-attachments`, `plexus publish-ipam`): started from this
//! binary, outside the runtime's view, and given their job on stdin.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};

use serde::de::DeserializeOwned;

/// Their niceness: they yield the CPU to CNI calls, and still get a share
/// of it on a busy node (a pod's DEL may wait for them).
const NICE: nix::libc::c_int = 10;

/// `plexus <arg>`, to be given its stdin: no stdout or stderr (the
/// runtime's pipes are not held open), and in a process group of its own
/// (a signal to the runtime's plugin group is not its).
pub fn command(arg: &str) -> Command {
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("plexus")
        .arg(arg)
        .env_remove("CNI_COMMAND")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    cmd
}

/// Lets this process run on any CPU its cgroup allows: a publisher may be
/// started from an IPAM thread kept off its caller's CPU
/// (`ipam_call::elsewhere`), whose affinity it inherits.
fn any_cpu() {
    use nix::libc;
    // SAFETY: a cpu_set_t filled within its size; the kernel keeps the
    // CPUs of it this process may use.
    unsafe {
        let mut every: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..libc::CPU_SETSIZE as usize {
            libc::CPU_SET(cpu, &mut every);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &every);
    }
}

/// In the started process: lowers its priority, then reads its job from
/// stdin. `Err` is the exit code when there is none: stdin unreadable, or
/// not a job (the process was not started by `starter`).
pub fn job<T: DeserializeOwned>(arg: &str, starter: &str) -> Result<T, ExitCode> {
    // SAFETY: setpriority(2) on this process; no memory is involved.
    let _ = unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, NICE) };
    any_cpu();
    let mut raw = Vec::new();
    if std::io::stdin().lock().read_to_end(&mut raw).is_err() {
        return Err(ExitCode::FAILURE);
    }
    serde_json::from_slice(&raw).map_err(|_| {
        eprintln!("plexus {arg}: stdin is not a publishing job; only {starter} starts this");
        ExitCode::from(2)
    })
}
