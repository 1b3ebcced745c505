//! `plexus store-relay <socket>`: the node's store relay (see
//! `ipam::store::relay`). It listens on a Unix socket only root can use and
//! answers one client at a time: the node's IPAM calls already take turns on
//! the node lock, and each is one or two store calls.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use ipam::store::relay::Leaders;
use tracing::{debug, info, warn};

/// How long a client may stay silent before the relay hangs up on it.
const IDLE: Duration = Duration::from_secs(10);

pub fn main(socket: Option<&str>) -> ExitCode {
    let Some(socket) = socket else {
        eprintln!("usage: plexus store-relay <socket>");
        return ExitCode::from(2);
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .try_init();
    let listener = match listen(Path::new(socket)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("plexus store-relay: {socket}: {e}");
            return ExitCode::FAILURE;
        }
    };
    info!(socket, "store relay listening");
    let mut leaders = Leaders::default();
    for stream in listener.incoming() {
        match stream {
            Ok(s) => serve(s, &mut leaders),
            Err(e) => warn!(error = %e, "accept"),
        }
    }
    ExitCode::SUCCESS
}

/// Binds `socket` for root alone, replacing a socket file no relay answers
/// on any more; refuses while another relay does.
fn listen(socket: &Path) -> std::io::Result<UnixListener> {
    if socket.exists() {
        if UnixStream::connect(socket).is_ok() {
            return Err(std::io::Error::other("another store relay listens there"));
        }
        std::fs::remove_file(socket)?;
    }
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

fn serve(stream: UnixStream, leaders: &mut Leaders) {
    match ipam::store::relay::serve(stream, IDLE, leaders) {
        Ok(()) => debug!("store relay client done"),
        Err(e) => debug!(error = %e, "store relay client dropped"),
    }
}
