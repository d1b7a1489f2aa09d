//! Log set-up: one line per event, `2026-11-26T15:04:17.123Z WARN [conn 42] ...`.
//!
//! Timestamps are UTC with milliseconds, formatted here rather than with a
//! date crate: the civil-from-days conversion is a dozen lines.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

pub use log::LevelFilter;

/// Send log records at `level` and above to `file`, or to stderr.
pub fn init(level: LevelFilter, file: Option<&Path>) -> io::Result<()> {
    let dispatch = fern::Dispatch::new()
        .level(level)
        .format(|out, message, record| {
            out.finish(format_args!(
                "{} {} {}",
                utc_timestamp(SystemTime::now()),
                record.level(),
                message
            ))
        });
    let dispatch = match file {
        Some(path) => {
            let log = Arc::new(LogFile::open(path)?);
            let _ = LOG_FILE.set(log.clone());
            dispatch.chain(Box::new(SharedLog(log)) as Box<dyn Write + Send>)
        }
        None => dispatch.chain(io::stderr()),
    };
    dispatch
        .apply()
        .map_err(|e| io::Error::new(io::ErrorKind::AlreadyExists, e))
}

/// The log file, reopened on SIGHUP: logrotate renames it, and the next
/// line must go to a fresh file at the configured path.
struct LogFile {
    path: PathBuf,
    file: Mutex<File>,
}

static LOG_FILE: OnceLock<Arc<LogFile>> = OnceLock::new();

impl LogFile {
    fn open(path: &Path) -> io::Result<LogFile> {
        Ok(LogFile {
            path: path.to_path_buf(),
            file: Mutex::new(append(path)?),
        })
    }
}

fn append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// What fern writes to: the current file behind the mutex.
struct SharedLog(Arc<LogFile>);

impl Write for SharedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0
            .file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush()
    }
}

/// Reopen the log file at its path. `Ok(false)` when logging to stderr.
/// On failure the old file stays in use.
pub fn reopen() -> io::Result<bool> {
    let Some(log) = LOG_FILE.get() else {
        return Ok(false);
    };
    let fresh = append(&log.path)?;
    *log.file.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
    Ok(true)
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
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's algorithm, counting in 400-year eras).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
