//! Reading the proxy's log as it is written, across rotations, and sorting
//! every line: close lines go to the books, the rest are counted (the
//! proxy's own counters, to hold against the books) or, if no rule knows
//! them, reported.
//!
//! Rotation is logrotate's: the fault thread renames the file and sends
//! SIGHUP; the proxy opens a fresh file at the path. Until something is
//! written to the fresh file, the proxy may still be writing to the old
//! one; once it has, it never will again (both go through one mutex in the
//! proxy). So the old file is read to its end, then the new one from its
//! start. A line whose pieces straddled the swap would be joined again from
//! its two halves, and counted: the proxy promises whole lines.

use std::fs::{self, File};
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use crate::books::{Books, CloseLine};
use crate::common::Closed;

/// What the log said, counted.
#[derive(Default, Clone, Debug)]
pub struct LogStats {
    pub lines: u64,
    pub closes: u64,
    /// First-spill WARNs: client->backend, backend->client.
    pub spill_warns: [u64; 2],
    pub disk_full: u64,
    pub max_disk: u64,
    pub spilling_again: u64,
    pub refused: u64,
    /// Refused connects, by backend.
    pub refused_by: std::collections::HashMap<SocketAddr, u64>,
    pub no_backend: u64,
    pub marked_down: u64,
    pub back_up: u64,
    pub max_conn: u64,
    pub below_max_conn: u64,
    /// Connections the proxy closed for idleness, and "idle for ...:
    /// closing" lines beyond one per connection.
    pub idle: u64,
    pub idle_repeats: u64,
    idle_conns: std::collections::HashSet<u64>,
    pub sighup: u64,
    pub listening: u64,
    /// The lines of a graceful shutdown, in order.
    pub shutdown: Vec<String>,
    /// Lines split over a rotation and joined again.
    pub split_lines: u64,
    /// Segments (files) read.
    pub segments: u64,
    pub unexpected: u64,
}

pub struct Tailer {
    path: PathBuf,
    file: Option<File>,
    ino: u64,
    carry: Vec<u8>,
    pub stats: LogStats,
}

impl Tailer {
    pub fn new(path: PathBuf) -> Tailer {
        Tailer {
            path,
            file: None,
            ino: 0,
            carry: Vec::new(),
            stats: LogStats::default(),
        }
    }

    /// Read what is new; hand close lines to `books`.
    pub fn poll(&mut self, books: &Books) {
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(f) => {
                    self.ino = f.metadata().map(|m| m.ino()).unwrap_or(0);
                    self.file = Some(f);
                    self.stats.segments += 1;
                }
                Err(_) => return,
            }
        }
        self.read_current(books);
        // Rotated, and the proxy has written to the new file: the old one
        // is complete.
        if let Ok(meta) = fs::metadata(&self.path) {
            if meta.ino() != self.ino && meta.len() > 0 {
                self.read_current(books);
                if !self.carry.is_empty() {
                    self.stats.split_lines += 1;
                }
                match File::open(&self.path) {
                    Ok(f) => {
                        self.file = Some(f);
                        self.ino = meta.ino();
                        self.stats.segments += 1;
                        self.read_current(books);
                    }
                    Err(e) => books.note(format!("soak: cannot open the rotated log: {e}")),
                }
            }
        }
    }

    fn read_current(&mut self, books: &Books) {
        let Some(file) = self.file.as_mut() else {
            return;
        };
        let mut fresh = Vec::new();
        if let Err(e) = file.read_to_end(&mut fresh) {
            books.note(format!("soak: reading the proxy's log: {e}"));
            return;
        }
        if fresh.is_empty() {
            return;
        }
        self.carry.extend_from_slice(&fresh);
        let Some(end) = self.carry.iter().rposition(|b| *b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = self.carry.drain(..=end).collect();
        for line in String::from_utf8_lossy(&complete).lines() {
            self.line(line, books);
        }
    }

    fn line(&mut self, line: &str, books: &Books) {
        let s = &mut self.stats;
        s.lines += 1;
        // "<timestamp> <LEVEL> <message>"
        let mut parts = line.splitn(3, ' ');
        let (Some(_), Some(level), Some(msg)) = (parts.next(), parts.next(), parts.next()) else {
            s.unexpected += 1;
            books.note(format!("a log line not in the log format: {line:?}"));
            return;
        };
        let known = match level {
            "INFO" => {
                if msg.starts_with("[conn ") && msg.contains("] closed client=") {
                    s.closes += 1;
                    match parse_close(msg, line) {
                        Ok(close) => books.close_line(close),
                        Err(e) => {
                            books.note(format!("a close line the books cannot read ({e}): {line}"))
                        }
                    }
                    true
                } else if msg.starts_with("listening on ") {
                    s.listening += 1;
                    true
                } else if msg.ends_with(" spilling again") {
                    s.spilling_again += 1;
                    true
                } else if msg.contains(" idle for ") && msg.ends_with(": closing") {
                    // Once per connection: a repeat means it lingered
                    // after the idle close (counted, and a violation).
                    match conn_id(msg) {
                        Some(id) if s.idle_conns.insert(id) => s.idle += 1,
                        _ => s.idle_repeats += 1,
                    }
                    true
                } else if msg == "received SIGHUP: log file reopened" {
                    s.sighup += 1;
                    true
                } else if msg.starts_with("backend ") && msg.ends_with(" is back up") {
                    s.back_up += 1;
                    true
                } else if msg.starts_with("below --max-connections ") {
                    s.below_max_conn += 1;
                    true
                } else if msg.starts_with("received SIGTERM")
                    || msg.starts_with("stopping; ")
                    || msg.starts_with("shutdown complete: ")
                {
                    s.shutdown.push(msg.to_string());
                    true
                } else {
                    false
                }
            }
            "WARN" => {
                if msg.contains(" spilling to disk: ") {
                    if msg.contains(" client->backend ") {
                        s.spill_warns[0] += 1;
                    } else {
                        s.spill_warns[1] += 1;
                    }
                    true
                } else if msg.contains(" cannot spill to ") {
                    if msg.contains("No space left on device") || msg.contains("os error 28") {
                        s.disk_full += 1;
                        true
                    } else if msg.contains("--max-disk reached") {
                        s.max_disk += 1;
                        true
                    } else {
                        false
                    }
                } else if msg.contains(": backend ") && msg.ends_with(": connection refused") {
                    s.refused += 1;
                    let addr = msg
                        .rsplit_once(": backend ")
                        .and_then(|(_, r)| r.strip_suffix(": connection refused"))
                        .and_then(|a| a.parse().ok());
                    if let Some(addr) = addr {
                        *s.refused_by.entry(addr).or_default() += 1;
                    }
                    true
                } else if msg.contains(" marked down after ") {
                    s.marked_down += 1;
                    true
                } else if msg.starts_with("--max-connections ") && msg.contains(" reached") {
                    s.max_conn += 1;
                    true
                } else {
                    false
                }
            }
            "ERROR" if msg.contains(": no backend could be reached: ") => {
                s.no_backend += 1;
                true
            }
            _ => false,
        };
        if !known {
            s.unexpected += 1;
            books.note(format!("a log line no rule of the soak expects: {line}"));
        }
    }
}

fn conn_id(msg: &str) -> Option<u64> {
    msg.strip_prefix("[conn ")
        .and_then(|r| r.split(']').next())
        .and_then(|n| n.parse().ok())
}

/// `[conn N] closed client=A backend=B|- up_bytes=.. ... reason=...`
fn parse_close(msg: &str, line: &str) -> Result<CloseLine, String> {
    let conn = conn_id(msg).ok_or("no conn id")?;
    let field = |key: &str| -> Result<&str, String> {
        let needle = format!(" {key}=");
        let at = msg.find(&needle).ok_or(format!("no {key}="))? + needle.len();
        Ok(msg[at..].split(' ').next().unwrap_or(""))
    };
    let client: SocketAddr = field("client")?
        .parse()
        .map_err(|e| format!("client=: {e}"))?;
    let backend = match field("backend")? {
        "-" => None,
        b => Some(b.parse().map_err(|e| format!("backend=: {e}"))?),
    };
    // The numbers and the reason: the harness's parser, so that the soak
    // and the tests read the close line one way.
    let closed =
        std::panic::catch_unwind(|| Closed::parse(line)).map_err(|p| crate::panic_text(&p))?;
    Ok(CloseLine {
        conn,
        client,
        backend,
        up_bytes: closed.up_bytes,
        down_bytes: closed.down_bytes,
        up_spilled: closed.up_spilled,
        down_spilled: closed.down_spilled,
        dropped: closed.dropped,
        reason: closed.reason,
        line: line.to_string(),
    })
}
