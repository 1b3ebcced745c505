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
    use nix::sched::{sched_setaffinity, CpuSet};
    let mut every = CpuSet::new();
    for cpu in 0..CpuSet::count() {
        let _ = every.set(cpu);
    }
    // The kernel keeps the CPUs of it this process may use.
    let _ = sched_setaffinity(nix::unistd::Pid::from_raw(0), &every);
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;

    /// The CPUs the calling thread may run on.
    pub(crate) fn allowed() -> Vec<usize> {
        let set = sched_getaffinity(Pid::from_raw(0)).expect("affinity");
        (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect()
    }

    #[test]
    fn a_thread_kept_to_one_cpu_may_use_them_all_again() {
        let all = allowed();
        let back = std::thread::spawn(|| {
            let mut one = CpuSet::new();
            one.set(allowed()[0]).expect("cpu");
            sched_setaffinity(Pid::from_raw(0), &one).expect("narrow");
            assert_eq!(allowed().len(), 1);
            any_cpu();
            allowed()
        })
        .join()
        .expect("thread");
        assert_eq!(back, all);
    }
}
