//! Logging: structured lines to the file the conf names; stdout is the CNI
//! result's alone. Without a file, warnings and errors go to stderr, which the
//! runtime keeps in its own log.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Mutex;

use tracing::level_filters::LevelFilter;

/// Installs the subscriber once per process; later calls do nothing.
pub fn init(file: Option<&Path>, level: &str) {
    let level = match level {
        "error" => LevelFilter::ERROR,
        "warn" => LevelFilter::WARN,
        "debug" => LevelFilter::DEBUG,
        _ => LevelFilter::INFO,
    };
    let builder = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_target(false);
    let opened = file.and_then(|p| {
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        OpenOptions::new().create(true).append(true).open(p).ok()
    });
    let _ = match opened {
        Some(f) => builder
            .with_max_level(level)
            .with_writer(Mutex::new(f))
            .try_init(),
        None => builder
            .with_max_level(LevelFilter::WARN)
            .with_writer(std::io::stderr)
            .try_init(),
    };
}
