//! Logs go to stderr (human-readable) and, with `logFile`, to a file as JSON lines. Never to
//! stdout, which carries the CNI result.

use std::fs::OpenOptions;
use std::sync::Mutex;

use tracing::warn;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogLevel, PluginConfig};

fn level(l: LogLevel) -> LevelFilter {
    match l {
        LogLevel::Off => LevelFilter::OFF,
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    }
}

/// Installs the process-wide subscriber. A log file that cannot be opened is reported on
/// stderr and otherwise ignored: logging never fails a pod.
pub fn init(cfg: &PluginConfig) {
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false);
    let (file, open_error) = match &cfg.log_file {
        None => (None, None),
        Some(path) => match OpenOptions::new().create(true).append(true).open(path) {
            Ok(f) => (
                Some(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .with_writer(Mutex::new(f))
                        .with_target(false),
                ),
                None,
            ),
            Err(e) => (None, Some((path.clone(), e))),
        },
    };
    let _ = tracing_subscriber::registry()
        .with(level(cfg.log_level))
        .with(stderr)
        .with(file)
        .try_init();
    if let Some((path, error)) = open_error {
        warn!(path = %path.display(), %error, "cannot open logFile; logging to stderr only");
    }
}
