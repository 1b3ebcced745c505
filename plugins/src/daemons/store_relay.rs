//! `plexus store-relay <socket>`: the node's store relay (see
//! `ipam::store::relay`). It listens on a Unix socket only root can use and
//! answers each client on a thread of its own (at most [`CLIENTS`] at once:
//! one more is hung up on, and goes straight to etcd): the node's CNI calls
//! take turns on the node lock, but the IPAM's publisher runs beside them.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipam::store::relay::Leaders;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::stat::{umask, Mode};
use tracing::{debug, info, warn};

/// How long a client may stay silent before the relay hangs up on it.
const IDLE: Duration = Duration::from_secs(10);

/// Clients served at once.
const CLIENTS: usize = 32;

pub fn main(socket: Option<&str>) -> ExitCode {
    let Some(socket) = socket else {
        eprintln!("usage: plexus store-relay <socket>");
        return ExitCode::from(2);
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .try_init();
    // The lock is held until the process ends.
    let (listener, _lock) = match listen(Path::new(socket)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("plexus store-relay: {socket}: {e}");
            return ExitCode::FAILURE;
        }
    };
    info!(socket, "store relay listening");
    let leaders: Arc<Mutex<Leaders>> = Arc::default();
    let serving = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "accept");
                continue;
            }
        };
        if serving.fetch_add(1, Ordering::SeqCst) >= CLIENTS {
            serving.fetch_sub(1, Ordering::SeqCst);
            debug!("store relay busy: client hung up on");
            continue;
        }
        let (leaders, done) = (leaders.clone(), serving.clone());
        let spawned = std::thread::Builder::new().spawn(move || {
            serve(stream, &leaders);
            done.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            serving.fetch_sub(1, Ordering::SeqCst);
            warn!(error = %e, "no thread for a store relay client");
        }
    }
    ExitCode::SUCCESS
}

/// Binds `socket` for root alone (created under umask 077), holding
/// `<socket>.lock` for as long as the relay runs: a second relay refuses,
/// and a socket file left by one that died is replaced (nothing else is).
fn listen(socket: &Path) -> std::io::Result<(UnixListener, Flock<File>)> {
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut lock_path = socket.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)?;
    let lock = Flock::lock(lock, FlockArg::LockExclusiveNonblock)
        .map_err(|_| std::io::Error::other("another store relay listens there"))?;
    match std::fs::symlink_metadata(socket) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(socket)?,
        Ok(_) => return Err(std::io::Error::other("exists and is not a socket")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let before = umask(Mode::from_bits_truncate(0o077));
    let bound = UnixListener::bind(socket);
    umask(before);
    let listener = bound?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok((listener, lock))
}

fn serve(stream: UnixStream, leaders: &Mutex<Leaders>) {
    match ipam::store::relay::serve(stream, IDLE, leaders) {
        Ok(()) => debug!("store relay client done"),
        Err(e) => debug!(error = %e, "store relay client dropped"),
    }
}
