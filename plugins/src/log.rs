//! Logging: structured lines to the file the conf names; stdout is the CNI
//! result's alone. Without a file, warnings and errors go to stderr, which the
//! runtime keeps in its own log.
//!
//! Every line of a CNI call is written inside that call's span, so it carries
//! the command and the container id (text: `cni{cmd=ADD container=…}:`,
//! JSON: a `span` object). The file is rotated by size: many `plexus`
//! processes write it at once, so each line is written under an `flock` on
//! `<file>.lock`, after checking that the file is still the one at the path
//! and that the line fits; when it does not, `<file>` becomes `<file>.1`,
//! `<file>.1` becomes `<file>.2`, and so on up to `logMaxBackups`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::fcntl::FlockArg;
use serde::{Deserialize, Serialize};
use tracing::level_filters::LevelFilter;

/// Default size at which the log file is rotated (as Multus' default).
pub const DEFAULT_MAX_SIZE_MB: f64 = 100.0;
/// Default number of rotated files kept.
pub const DEFAULT_MAX_BACKUPS: u32 = 5;

/// How and where a node logs: the node conf's `log*` fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogConf {
    pub file: Option<PathBuf>,
    /// `error`, `warn`, `info` or `debug`.
    pub level: String,
    /// JSON lines instead of text.
    pub json: bool,
    /// Bytes at which the file is rotated; 0: never.
    pub max_size: u64,
    pub max_backups: u32,
}

impl Default for LogConf {
    fn default() -> Self {
        LogConf {
            file: None,
            level: "info".into(),
            json: false,
            max_size: (DEFAULT_MAX_SIZE_MB * 1024.0 * 1024.0) as u64,
            max_backups: DEFAULT_MAX_BACKUPS,
        }
    }
}

/// Milliseconds since `t`, to 0.01 ms: the `duration_ms` of log lines.
pub fn ms_since(t: std::time::Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1e5).round() / 100.0
}

/// The conf the subscriber was installed with, for processes this one
/// starts to log alike.
static CURRENT: std::sync::OnceLock<LogConf> = std::sync::OnceLock::new();

/// What [`init`] installed, if it was called.
pub fn current() -> Option<LogConf> {
    CURRENT.get().cloned()
}

/// Installs the subscriber once per process; later calls do nothing.
pub fn init(conf: &LogConf) {
    if CURRENT.set(conf.clone()).is_err() {
        return;
    }
    let level = match conf.level.as_str() {
        "error" => LevelFilter::ERROR,
        "warn" => LevelFilter::WARN,
        "debug" => LevelFilter::DEBUG,
        _ => LevelFilter::INFO,
    };
    let opened = conf
        .file
        .as_deref()
        .and_then(|p| Rotating::open(p, conf.max_size, conf.max_backups).ok());
    let builder = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_target(false);
    let _ = match (opened, conf.json) {
        (Some(f), true) => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_max_level(level)
            .with_writer(Mutex::new(f))
            .try_init(),
        (Some(f), false) => builder
            .with_max_level(level)
            .with_writer(Mutex::new(f))
            .try_init(),
        (None, _) => builder
            .with_max_level(LevelFilter::WARN)
            .with_writer(std::io::stderr)
            .try_init(),
    };
}

/// The log file, rotated by size, shared with other processes.
pub struct Rotating {
    path: PathBuf,
    file: File,
    lock: File,
    max_size: u64,
    max_backups: u32,
}

fn append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl Rotating {
    pub fn open(path: &Path, max_size: u64, max_backups: u32) -> io::Result<Rotating> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        Ok(Rotating {
            path: path.to_path_buf(),
            file: append(path)?,
            lock: append(Path::new(&lock_path))?,
            max_size,
            max_backups,
        })
    }

    fn backup(&self, n: u32) -> PathBuf {
        let mut p = self.path.as_os_str().to_owned();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    /// With the lock held: reopens the file when another process rotated it,
    /// and rotates it when `len` more bytes would take it past its size.
    fn make_room(&mut self, len: usize) -> io::Result<()> {
        let mine = self.file.metadata()?;
        match std::fs::metadata(&self.path) {
            Ok(now) if now.ino() == mine.ino() && now.dev() == mine.dev() => {}
            _ => self.file = append(&self.path)?,
        }
        let size = self.file.metadata()?.len();
        if self.max_size == 0 || size == 0 || size + len as u64 <= self.max_size {
            return Ok(());
        }
        if self.max_backups == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            for n in (1..self.max_backups).rev() {
                let from = self.backup(n);
                if from.exists() {
                    std::fs::rename(&from, self.backup(n + 1))?;
                }
            }
            std::fs::rename(&self.path, self.backup(1))?;
        }
        self.file = append(&self.path)?;
        Ok(())
    }
}

impl Write for Rotating {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.max_size == 0 {
            return self.file.write(buf);
        }
        // Held until the line is written (unlocked when dropped).
        let _held = nix::fcntl::Flock::lock(self.lock.try_clone()?, FlockArg::LockExclusive);
        // A log that cannot rotate still takes the line.
        let _ = self.make_room(buf.len());
        self.file.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_the_backups_asked_for() {
        let dir = tempfile::Builder::new()
            .prefix("plexus-log-test-")
            .tempdir()
            .unwrap();
        let path = dir.path().join("plexus.log");
        let mut a = Rotating::open(&path, 1000, 2).unwrap();
        // A second writer, as another process would be.
        let mut b = Rotating::open(&path, 1000, 2).unwrap();
        let mut line = vec![b'x'; 99];
        line.push(b'\n');
        for i in 0..100 {
            let w = if i % 2 == 0 { &mut a } else { &mut b };
            w.write_all(&line).unwrap();
        }
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let backup = |n: u32| {
            let mut p = path.as_os_str().to_owned();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        assert!(size(&path) <= 1000, "{}", size(&path));
        assert!(size(&path) > 0);
        assert_eq!(size(&backup(1)), 1000);
        assert_eq!(size(&backup(2)), 1000);
        assert!(!backup(3).exists(), "only 2 backups");
    }
}
