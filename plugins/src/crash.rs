//! Crash points, for the test that kills Plexus at every step of its work.
//!
//! In debug builds (what `make test` runs), a step named by
//! `PLEXUS_CRASH_AT=<step>#<n>` kills the process (SIGKILL: no unwinding, no
//! destructor, as a node's OOM killer or power loss would) the `n`-th time
//! the process reaches it, and with `PLEXUS_CRASH_TRACE=<file>` every step
//! reached is appended to the file as `<step>#<n>`, so that the test learns
//! the steps from a run instead of a list kept by hand. Release builds have
//! no crash point at all.

#[cfg(debug_assertions)]
pub fn point(step: &'static str) {
    use std::collections::HashMap;
    use std::io::Write;
    use std::sync::{Mutex, OnceLock, PoisonError};

    static ASKED: OnceLock<(Option<String>, Option<String>)> = OnceLock::new();
    static SEEN: Mutex<Option<HashMap<&'static str, u32>>> = Mutex::new(None);
    let (at, trace) = ASKED.get_or_init(|| {
        (
            std::env::var("PLEXUS_CRASH_AT").ok(),
            std::env::var("PLEXUS_CRASH_TRACE").ok(),
        )
    });
    if at.is_none() && trace.is_none() {
        return;
    }
    let n = {
        let mut seen = SEEN.lock().unwrap_or_else(PoisonError::into_inner);
        let count = seen
            .get_or_insert_with(HashMap::new)
            .entry(step)
            .or_insert(0);
        *count += 1;
        *count
    };
    let name = format!("{step}#{n}");
    if let Some(path) = trace {
        // One write per line: threads of one process append side by side.
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(format!("{name}\n").as_bytes());
        }
    }
    if at.as_deref() == Some(name.as_str()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn point(_step: &'static str) {}
