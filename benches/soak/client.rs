//! One client: connect from its own address, send the hello and its upload
//! at its pace, read and check the response at its pace, and end as its
//! plan says (half-close early or late, reset at a byte, vanish), keeping
//! the books of what it did and saw.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use crate::World;
use crate::data::{self, DownCheck, HEAD, Writer};
use crate::net::{self, Pace, Step, TICK};
use crate::plan::{Cut, Plan};

/// How a stream ended for the end that read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadEnd {
    /// A clean EOF.
    Eof,
    /// An error (a reset, mostly), described.
    Failed(String),
    /// We stopped reading first: our own cut, giving up, or the run's abort.
    Stopped,
}

/// What one client did and saw.
#[derive(Clone, Debug)]
pub struct ClientRecord {
    pub id: u64,
    pub local: Option<SocketAddr>,
    pub connect_error: Option<String>,
    /// Upstream bytes its kernel took, hello included.
    pub sent: u64,
    /// Its FIN: `None` if it never sent one.
    pub fin: Option<Result<(), String>>,
    /// After its FIN and the response's end: taken without a reset?
    pub fin_acked: Option<Result<(), String>>,
    pub write_error: Option<String>,
    pub received: u64,
    /// Which kind of backend the response header named.
    pub kind: Option<Writer>,
    pub wrong: Option<String>,
    pub read_end: ReadEnd,
    /// It reset its socket, by plan (`ResetAtUpload`/`VanishAtDownload`).
    pub cut: Option<Cut>,
    /// Nothing ended the connection within its patience: it reset it.
    pub gave_up: bool,
    pub aborted: bool,
    /// Upload done after the response's EOF arrived: a client that kept
    /// sending after the backend finished.
    pub sent_after_eof: bool,
    /// When the last upstream byte or the FIN went out (wall clock, for
    /// comparing with the proxy's log).
    pub last_sent_at: Option<SystemTime>,
    pub elapsed: Duration,
}

pub fn run(world: &World, plan: &Plan) -> ClientRecord {
    let started = Instant::now();
    let mut record = ClientRecord {
        id: plan.id,
        local: None,
        connect_error: None,
        sent: 0,
        fin: None,
        fin_acked: None,
        write_error: None,
        received: 0,
        kind: None,
        wrong: None,
        read_end: ReadEnd::Stopped,
        cut: None,
        gave_up: false,
        aborted: false,
        sent_after_eof: false,
        last_sent_at: None,
        elapsed: Duration::ZERO,
    };
    let (local, connected) = net::connect_from(plan.id, world.proxy(), plan.rcvbuf);
    let mut stream = match connected {
        Ok(s) => s,
        // Accepted, then reset before connect() returned: a connection
        // the proxy ended at once (no backend to be had), to be booked
        // against its close line like any other.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            record.local = Some(local);
            record.read_end = ReadEnd::Failed(format!("reset during connect: {e}"));
            record.elapsed = started.elapsed();
            return record;
        }
        Err(e) => {
            record.connect_error = Some(e.to_string());
            record.elapsed = started.elapsed();
            return record;
        }
    };
    record.local = Some(local);
    let outcome = drive(world, plan, &mut stream, &mut record, started);
    match outcome {
        Outcome::Done => {
            if matches!(record.fin, Some(Ok(()))) {
                record.fin_acked = Some(net::fin_acknowledged(&stream, Duration::from_secs(3)));
            }
            drop(stream);
        }
        Outcome::Reset => net::reset(stream),
    }
    record.elapsed = started.elapsed();
    record
}

enum Outcome {
    /// Both halves ended; close normally.
    Done,
    /// Close with a reset: a cut, giving up, or the run's abort.
    Reset,
}

fn drive(
    world: &World,
    plan: &Plan,
    stream: &mut TcpStream,
    record: &mut ClientRecord,
    started: Instant,
) -> Outcome {
    let hello = data::hello(plan.id);
    let total = plan.upstream_len();
    // The hello goes first and whole, whatever the pace, so that a backend
    // that gets anything at all learns which connection it serves.
    let limit = match plan.cut {
        Cut::ResetAtUpload(k) => k.min(total),
        _ => total,
    };
    let deadline = started + plan.patience();
    let mut check = DownCheck::new(plan.id);
    let mut buf = vec![0u8; plan.read_chunk.max(1)];
    let wpace = Pace::new(plan.write_rate);
    let rpace = Pace::for_a_while(plan.read_rate, plan.slow_for);
    let mut read_end: Option<ReadEnd> = None;
    loop {
        if world.abort.load(Ordering::Relaxed) {
            record.aborted = true;
            return finish(record, &check, ReadEnd::Stopped, Outcome::Reset);
        }
        if Instant::now() >= deadline {
            record.gave_up = true;
            return finish(record, &check, ReadEnd::Stopped, Outcome::Reset);
        }
        let mut progressed = false;
        let mut want_write = false;
        let mut want_read = false;
        let mut sleep = TICK;

        // Write: the hello at once, the body at its pace, up to a cut.
        if record.write_error.is_none() && record.sent < limit {
            let (n, allowed) = if record.sent < HEAD as u64 {
                (HEAD as u64 - record.sent, true)
            } else {
                let body = record.sent - HEAD as u64;
                let piece = (wpace.piece(plan.write_chunk) as u64).min(limit - record.sent);
                let allowed = wpace.allowance(body) >= piece;
                if !allowed {
                    sleep = sleep.min(wpace.wait_for(body, piece));
                }
                (piece, allowed)
            };
            if allowed {
                let bytes = data::upstream(plan.id, &hello, record.sent, n as usize);
                match net::write_step(stream, bytes) {
                    Step::Moved(m) => {
                        record.sent += m as u64;
                        record.last_sent_at = Some(SystemTime::now());
                        if read_end.is_some() {
                            record.sent_after_eof = true;
                        }
                        progressed = true;
                    }
                    Step::WouldBlock => want_write = true,
                    Step::Failed(e) => record.write_error = Some(e.to_string()),
                    Step::Eof => {}
                }
            }
        }
        if let Cut::ResetAtUpload(k) = plan.cut {
            if record.sent >= k.min(total) && record.write_error.is_none() {
                record.cut = Some(plan.cut);
                return finish(record, &check, ReadEnd::Stopped, Outcome::Reset);
            }
        }

        // The FIN: once the upload is written, early or after the EOF.
        let upload_done = record.sent == total;
        if upload_done
            && record.fin.is_none()
            && record.write_error.is_none()
            && (plan.early_half_close || read_end.is_some())
        {
            record.fin = Some(net::shut_write(stream).map_err(|e| e.to_string()));
            record.last_sent_at = Some(SystemTime::now());
            progressed = true;
        }

        // Read and check, at its pace, up to a vanishing point.
        if read_end.is_none() {
            let cap = match plan.cut {
                Cut::VanishAtDownload(j) => j.saturating_sub(record.received),
                _ => u64::MAX,
            };
            if cap == 0 {
                record.cut = Some(plan.cut);
                return finish(record, &check, ReadEnd::Stopped, Outcome::Reset);
            }
            let piece = (rpace.piece(plan.read_chunk) as u64).min(cap);
            let allowed = rpace.allowance(record.received);
            if allowed >= piece {
                match net::read_step(stream, &mut buf[..piece as usize]) {
                    Step::Moved(m) => {
                        check.feed(&buf[..m]);
                        record.received += m as u64;
                        progressed = true;
                    }
                    // A write that failed took the socket's error: after
                    // a reset the kernel reports the end of the stream as
                    // a plain EOF, which must not pass for one.
                    Step::Eof => {
                        read_end = Some(match &record.write_error {
                            Some(e) => ReadEnd::Failed(format!("EOF after a write failed: {e}")),
                            None => ReadEnd::Eof,
                        });
                        progressed = true;
                    }
                    Step::WouldBlock => want_read = true,
                    Step::Failed(e) => {
                        read_end = Some(ReadEnd::Failed(e.to_string()));
                        progressed = true;
                    }
                }
            } else {
                sleep = sleep.min(rpace.wait_for(record.received, piece));
            }
        }

        // A reset seen by the reader ends the connection: nothing written
        // after it would arrive.
        let writing_over = record.write_error.is_some()
            || record.fin.is_some()
            || matches!(read_end, Some(ReadEnd::Failed(_)));
        if let Some(end) = &read_end {
            if writing_over {
                let end = end.clone();
                return finish(record, &check, end, Outcome::Done);
            }
        }
        if !progressed {
            let left = deadline.saturating_duration_since(Instant::now());
            net::wait(stream, want_read, want_write, sleep.min(left));
        }
    }
}

fn finish(record: &mut ClientRecord, check: &DownCheck, end: ReadEnd, outcome: Outcome) -> Outcome {
    record.read_end = end;
    record.kind = check.kind;
    record.wrong = check.wrong.clone();
    debug_assert_eq!(check.bytes, record.received);
    outcome
}
