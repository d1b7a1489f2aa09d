//! Log set-up: one line per event, `2026-11-26T15:04:17.123Z WARN [conn 42] ...`,
//! costing at most one `write` per line, and one per event-loop turn in a
//! worker.
//!
//! A worker formats its lines into a buffer of its own thread and writes
//! the buffer out once per turn (`flush`, before it sleeps in `poll`), with
//! the timestamp formatted once per turn (`turn`). WARN and ERROR lines are
//! written at once, as is every line of a thread that is not a worker (the
//! supervisor, an embedding program). Each write is of whole lines and
//! holds the sink's lock for its duration, so no line is ever cut or
//! interleaved with another, whether to a file or to stderr, at any number
//! of workers. (The old set-up wrote each fragment of a line on its own:
//! 47 `write` calls per connection.)

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

pub use log::LevelFilter;

/// Past this many bytes buffered, a worker writes out before its turn
/// ends: a bound on memory however busy a turn is.
const FLUSH_AT: usize = 64 * 1024;

/// Where lines go.
enum Sink {
    Stderr,
    /// The file at `path`, reopened on SIGHUP (logrotate renames it, and
    /// the next line must go to a fresh file at the configured path).
    File {
        path: PathBuf,
        file: File,
    },
}

impl Sink {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stderr => io::stderr().lock().write_all(bytes),
            Sink::File { file, .. } => file.write_all(bytes),
        }
    }
}

struct Logger {
    level: LevelFilter,
    sink: Mutex<Sink>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// A thread's lines not written yet, and its cached timestamp.
#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    /// This thread runs an event loop and flushes once per turn.
    batching: bool,
    /// The timestamp of this turn's lines, and whether a new turn has
    /// begun since it was taken (it is taken at the turn's first line, so
    /// a turn that logs nothing costs nothing).
    stamp: String,
    stale: bool,
}

thread_local! {
    static PENDING: RefCell<Pending> = RefCell::default();
}

/// Send log records at `level` and above to `file`, or to stderr.
pub fn init(level: LevelFilter, file: Option<&Path>) -> io::Result<()> {
    let sink = match file {
        Some(path) => Sink::File {
            path: path.to_path_buf(),
            file: append(path)?,
        },
        None => Sink::Stderr,
    };
    let logger = Logger {
        level,
        sink: Mutex::new(sink),
    };
    if LOGGER.set(logger).is_err() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "logging is set up already",
        ));
    }
    log::set_logger(LOGGER.get().expect("just set"))
        .map_err(|e| io::Error::new(io::ErrorKind::AlreadyExists, e))?;
    log::set_max_level(level);
    Ok(())
}

fn append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let urgent = record.level() <= log::Level::Warn;
        let out = PENDING.with_borrow_mut(|p| {
            if !p.batching || p.stale {
                p.stale = false;
                p.stamp.clear();
                let _ = std::fmt::Write::write_fmt(
                    &mut p.stamp,
                    format_args!("{}", humantime::format_rfc3339_millis(SystemTime::now())),
                );
            }
            let Pending { lines, stamp, .. } = p;
            let _ = writeln!(lines, "{stamp} {} {}", record.level(), record.args());
            (urgent || !p.batching || p.lines.len() >= FLUSH_AT)
                .then(|| std::mem::take(&mut p.lines))
        });
        if let Some(bytes) = out {
            self.write_out(bytes);
        }
    }

    fn flush(&self) {
        flush();
    }
}

impl Logger {
    /// Write whole lines under the sink's lock, then give the buffer back
    /// to the thread (no allocation per turn).
    fn write_out(&self, mut bytes: Vec<u8>) {
        if !bytes.is_empty() {
            let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
            // Nowhere left to report a failed log write: the line is lost,
            // the proxy goes on.
            let _ = sink.write_all(&bytes);
        }
        bytes.clear();
        PENDING.with_borrow_mut(|p| {
            if p.lines.is_empty() && p.lines.capacity() < bytes.capacity() {
                p.lines = bytes;
            }
        });
    }
}

/// This thread runs an event loop: from now on its lines are written once
/// per turn (`flush`), stamped once per turn (`turn`).
pub fn batch_this_thread() {
    PENDING.with_borrow_mut(|p| {
        p.batching = true;
        p.stale = true;
    });
}

/// A new turn of this thread's event loop: its lines get a new time.
pub fn turn() {
    PENDING.with_borrow_mut(|p| p.stale = true);
}

/// Write out this thread's pending lines (once per turn, before sleeping;
/// and before the thread ends).
pub fn flush() {
    let bytes = PENDING.with_borrow_mut(|p| std::mem::take(&mut p.lines));
    if let Some(logger) = LOGGER.get() {
        logger.write_out(bytes);
    }
}

/// Reopen the log file at its path. `Ok(false)` when logging to stderr.
/// On failure the old file stays in use.
pub fn reopen() -> io::Result<bool> {
    let Some(logger) = LOGGER.get() else {
        return Ok(false);
    };
    let mut sink = logger.sink.lock().unwrap_or_else(|e| e.into_inner());
    match &mut *sink {
        Sink::Stderr => Ok(false),
        Sink::File { path, file } => {
            *file = append(path)?;
            Ok(true)
        }
    }
}

/// Parse `error|warn|info|debug|trace` for `--log-level`.
pub fn parse_level(s: &str) -> Result<LevelFilter, String> {
    match s.to_ascii_lowercase().as_str() {
        "error" => Ok(LevelFilter::Error),
        "warn" => Ok(LevelFilter::Warn),
        "info" => Ok(LevelFilter::Info),
        "debug" => Ok(LevelFilter::Debug),
        "trace" => Ok(LevelFilter::Trace),
        _ => Err(format!(
            "'{s}' is not a level: expected error, warn, info, debug or trace"
        )),
    }
}

/// `2026-11-26T15:04:17.123Z`
pub fn utc_timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps() {
        let at = |s: u64, ms: u64| {
            utc_timestamp(UNIX_EPOCH + Duration::from_secs(s) + Duration::from_millis(ms))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(1_795_705_457, 123), "2026-11-26T15:04:17.123Z");
        assert_eq!(at(951_782_400, 0), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(4_107_542_399, 999), "2100-02-28T23:59:59.999Z");
    }

    #[test]
    fn levels() {
        assert_eq!(parse_level("WARN").unwrap(), LevelFilter::Warn);
        assert!(parse_level("loud").unwrap_err().contains("expected error"));
    }
}
