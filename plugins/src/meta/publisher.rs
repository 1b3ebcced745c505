//! Attachment records written after ADD has answered: ADD journals them and
//! hands their write to a process of its own (`plexus publish-attachments`),
//! so that the runtime does not wait for an etcd commit that only serves
//! people's view of the cluster (see [`super::attachments`]).
//!
//! The hand-off is a request file per sandbox and interface,
//! `cacheDir/api/publishing/<container>-<ifname>.json`, that ADD locks
//! (`flock`) before it starts the publisher and passes it as the publisher's
//! stdin: the lock belongs to the open file both share, so it is held from
//! before ADD answers until the publisher exits. The sandbox's DEL takes the
//! lock before it removes the records, so it never removes them before they
//! are written. What the publisher cannot write stays in the journal for the
//! next call that reaches etcd, as any record etcd did not take.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use ipam::config::EtcdConf;
use nix::errno::Errno;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::api::Api;
use super::journal::{self, Journal, Pending};
use crate::log::LogConf;

/// The argument that makes `plexus` a publisher.
pub const ARG: &str = "publish-attachments";

/// What the publisher is asked to do: write what the journal holds for one
/// sandbox's interface to the API's etcd.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Job {
    container_id: String,
    ifname: String,
    cache_dir: PathBuf,
    log: LogConf,
    api: EtcdConf,
    /// The records to write: full key and JSON text. Only this process
    /// has them until it wrote them (or journaled them, failing): other
    /// calls replaying the journal never race it for them.
    records: Vec<(String, String)>,
}

fn request(cache_dir: &Path, container_id: &str, ifname: &str) -> PathBuf {
    cache_dir
        .join("api")
        .join("publishing")
        .join(journal::file_name(container_id, ifname))
}

/// `flock` on `f`'s open file; the lock stays with every descriptor of that
/// open file (the publisher's stdin), not with this handle.
/// Tries until `deadline` (at least once), never blocking for long.
fn lock(f: &File, deadline: Instant) -> Result<(), Errno> {
    loop {
        // `Flock` would unlock when dropped, taking the lock from the publisher.
        #[allow(deprecated)]
        match nix::fcntl::flock(f.as_raw_fd(), nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Err(Errno::EWOULDBLOCK | Errno::EINTR) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            done => return done,
        }
    }
}

/// A publisher ready to start: its records journaled, its request written
/// and locked.
pub struct Handoff {
    path: PathBuf,
    request: File,
}

/// ADD: journals `records` and prepares the publisher that writes them;
/// `Err` when it cannot be: the caller writes them itself.
#[allow(clippy::too_many_arguments)]
pub fn prepare(
    api: &EtcdConf,
    cache_dir: &Path,
    log: &LogConf,
    container_id: &str,
    ifname: &str,
    records: &[(String, String)],
) -> Result<Handoff, String> {
    let job = Job {
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
        cache_dir: cache_dir.to_path_buf(),
        log: log.clone(),
        api: api.clone(),
        records: records.to_vec(),
    };
    let path = request(cache_dir, container_id, ifname);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut request = locked(&path, api.timeout())?;
    let raw = serde_json::to_vec(&job).map_err(|e| e.to_string())?;
    let written = request
        .set_len(0)
        .and_then(|_| request.write_all(&raw))
        .and_then(|_| request.seek(SeekFrom::Start(0)));
    if let Err(e) = written {
        let _ = fs::remove_file(&path);
        return Err(format!("{}: {e}", path.display()));
    }
    Ok(Handoff { path, request })
}

impl Handoff {
    /// Not started after all (ADD failed): the request goes.
    pub fn cancel(self) {
        let _ = fs::remove_file(&self.path);
    }

    /// Starts the publisher, last thing before ADD answers: it competes for
    /// no CPU with the ADD. `Err` when it did not start (the records stay
    /// journaled for the caller to write).
    pub fn start(self) -> Result<(), String> {
        let started = self
            .request
            .try_clone()
            .map_err(|e| e.to_string())
            .and_then(|stdin| {
                crate::detached::command(ARG)
                    .stdin(Stdio::from(stdin))
                    .spawn()
                    .map_err(|e| format!("start the publisher: {e}"))
            });
        if started.is_err() {
            let _ = fs::remove_file(&self.path);
        }
        started.map(|_| ())
    }
}

/// The request file at `path`, locked. Only a publisher still writing this
/// interface's records of an earlier ADD holds it: that one is waited for,
/// and when it removed the file meanwhile, a new one is made.
fn locked(path: &Path, limit: Duration) -> Result<File, String> {
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let deadline = Instant::now() + limit;
    loop {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| fail(&e))?;
        // Never an unbounded wait on a stuck publisher: after `limit`, the
        // caller writes the records itself.
        lock(&f, deadline).map_err(|e| fail(&format!("locked by an earlier publisher: {e}")))?;
        let mine = f.metadata().map_err(|e| fail(&e))?;
        match fs::metadata(path) {
            Ok(now) if now.ino() == mine.ino() && now.dev() == mine.dev() => return Ok(f),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(fail(&e)),
        }
    }
}

/// DEL: waits (at most `limit`) for the publisher of this sandbox's
/// interface, if one is still writing, and removes its request.
pub fn wait(cache_dir: &Path, container_id: &str, ifname: &str, limit: Duration) {
    let path = request(cache_dir, container_id, ifname);
    let Ok(f) = File::open(&path) else {
        return;
    };
    if let Err(e) = lock(&f, Instant::now() + limit) {
        warn!(container = %container_id, error = %e,
            "the Attachment records' publisher did not finish in time: removing them anyway");
    }
    let _ = fs::remove_file(&path);
}

/// GC: removes the requests of sandboxes not in `valid` whose publisher is
/// gone (their lock is free): what a crash between ADD's hand-off and the
/// publisher's end leaves. Returns how many.
pub fn sweep(cache_dir: &Path, valid: &std::collections::BTreeSet<String>) -> usize {
    let dir = cache_dir.join("api").join("publishing");
    let Ok(entries) = fs::read_dir(&dir) else {
        return 0;
    };
    let mut removed = 0;
    for path in entries.flatten().map(|e| e.path()) {
        let Ok(f) = File::open(&path) else { continue };
        let container = fs::read(&path)
            .ok()
            .and_then(|raw| serde_json::from_slice::<Job>(&raw).ok())
            .map(|j| j.container_id);
        if container.is_some_and(|c| valid.contains(&c)) || lock(&f, Instant::now()).is_err() {
            continue;
        }
        if fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// `plexus publish-attachments`: the job on stdin (locked by ADD for it);
/// the records journaled for it go to etcd, or stay journaled.
pub fn main() -> ExitCode {
    // Off the pods' path: the runtime's next calls go first.
    let job: Job = match crate::detached::job(ARG, "plexus ADD") {
        Ok(job) => job,
        Err(code) => return code,
    };
    crate::log::init(&job.log);
    let span = tracing::info_span!("publish", container = %job.container_id, ifname = %job.ifname);
    let _entered = span.enter();
    // One deadline for all of it, connection included: the pod's DEL waits
    // for this process at most twice as long.
    let deadline = Instant::now() + job.api.timeout();
    let mut api = Api::new(&job.api, &job.cache_dir).with_deadline(deadline);
    if let Err(e) = api.write(job.records.clone(), Vec::new()) {
        let pending = Pending {
            container_id: job.container_id.clone(),
            puts: job.records,
            deletes: Vec::new(),
        };
        match Journal::new(&job.cache_dir).keep(&job.ifname, &pending) {
            Ok(()) => warn!(error = %e,
                "Attachment records not written: journaled for the next call that reaches etcd"),
            Err(io) => warn!(error = %e, journal = %io,
                "Attachment records not written, nor journaled"),
        }
    }
    // Gone before the lock (held by stdin, until exit) is: a DEL that finds
    // it waits for this process; one that does not has nothing to wait for.
    let _ = fs::remove_file(request(&job.cache_dir, &job.container_id, &job.ifname));
    ExitCode::SUCCESS
}
