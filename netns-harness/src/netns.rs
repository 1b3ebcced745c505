//! Named network namespaces under `/run/netns`, made the way `ip netns add`
//! makes them (unshare in a thread, bind-mount its netns), without `ip`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// Where named namespaces live (`ip netns` agrees).
pub const RUN_DIR: &str = "/run/netns";

/// A named network namespace, removed on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
    deleted: bool,
}

fn errno(what: &str, e: nix::Error) -> io::Error {
    io::Error::new(io::Error::from(e).kind(), format!("{what}: {e}"))
}

/// Makes `/run/netns` a shared mount point, so mounts under it propagate.
fn prepare_run_dir() -> io::Result<()> {
    std::fs::create_dir_all(RUN_DIR)?;
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    if mount(None::<&str>, RUN_DIR, None::<&str>, shared, None::<&str>).is_ok() {
        return Ok(());
    }
    let bind = MsFlags::MS_BIND | MsFlags::MS_REC;
    mount(Some(RUN_DIR), RUN_DIR, None::<&str>, bind, None::<&str>)
        .map_err(|e| errno("bind-mount /run/netns", e))?;
    mount(None::<&str>, RUN_DIR, None::<&str>, shared, None::<&str>)
        .map_err(|e| errno("make /run/netns shared", e))
}

impl Netns {
    /// Creates a new, empty network namespace named `name`.
    pub fn create(name: &str) -> io::Result<Netns> {
        crate::scratch::sweep_stale();
        let path = mount_point(name)?;
        let target = path.clone();
        let made = std::thread::spawn(move || -> io::Result<()> {
            // Only this thread moves; the bind mount keeps the netns alive after it exits.
            unshare(CloneFlags::CLONE_NEWNET).map_err(|e| errno("unshare netns", e))?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| errno("bind-mount netns", e))
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")));
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(Netns {
            name: name.to_string(),
            path,
            deleted: false,
        })
    }

    /// Names the namespace this process runs in (as `ip netns attach`
    /// does), so plugins can be run where the caller is; dropping it only
    /// takes the name away.
    pub fn name_own(name: &str) -> io::Result<Netns> {
        let path = mount_point(name)?;
        let bound = mount(
            Some("/proc/self/ns/net"),
            &path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        );
        if let Err(e) = bound {
            let _ = std::fs::remove_file(&path);
            return Err(errno("bind-mount netns", e));
        }
        Ok(Netns {
            name: name.to_string(),
            path,
            deleted: false,
        })
    }

    /// The name (`ip -n <name>` works with it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The path a runtime passes as `CNI_NETNS`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as a string.
    pub fn path_str(&self) -> String {
        self.path.display().to_string()
    }

    /// Whether a netns of this name exists.
    pub fn exists(name: &str) -> bool {
        Path::new(RUN_DIR).join(name).exists()
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it opens
    /// stay bound here after it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let file = File::open(&self.path)?;
        std::thread::scope(|s| {
            let handle = s.spawn(move || -> io::Result<T> {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| errno("setns", e))?;
                Ok(f())
            });
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// A hook that makes a child process start inside this namespace.
    pub fn enter_hook(&self) -> io::Result<cni::exec::Hook> {
        let file = Arc::new(File::open(&self.path)?);
        Ok(Arc::new(move |cmd: &mut std::process::Command| {
            let file = Arc::clone(&file);
            // SAFETY: setns is async-signal-safe; the closure allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    setns(&*file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
                });
            }
        }))
    }

    /// Unmounts and removes the namespace now; processes still inside keep it alive.
    pub fn delete(mut self) -> io::Result<()> {
        self.deleted = true;
        self.remove()
    }

    fn remove(&self) -> io::Result<()> {
        let _ = umount2(&self.path, MntFlags::MNT_DETACH);
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.deleted {
            let _ = self.remove();
        }
    }
}

/// The file a namespace named `name` is bound to, made new (a name taken
/// is an error).
fn mount_point(name: &str) -> io::Result<PathBuf> {
    prepare_run_dir()?;
    let path = Path::new(RUN_DIR).join(name);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", path.display())))?;
    Ok(path)
}
