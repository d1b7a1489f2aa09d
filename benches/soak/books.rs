//! The books: for every connection, what the client did and saw, what the
//! backend that served it did and saw (joined by the id in the hello), and
//! what the proxy's close line says (joined by the client's address, which
//! names the id). Each connection is checked as soon as all three are in,
//! and then forgotten but for the sums, so an hour's run keeps only the
//! connections in flight.
//!
//! The identity behind the checks, per direction:
//!
//! ```text
//!   sender wrote S  =  proxy read R  +  lost in the proxy's socket when it closed
//!   proxy read   R  =  proxy wrote W (up_bytes/down_bytes)  +  dropped (its share of dropped=)
//!   proxy wrote  W  =  receiver read  +  lost in the receiver's socket when it was reset
//! ```
//!
//! The kernel loses bytes only when a socket on the path is reset, or is
//! closed with bytes unread (which sends a reset). So where the ends saw
//! no reset the identity is exact: sent = received + dropped. Where a reset
//! makes the kernel's share unknowable, the bounds still hold: what arrived
//! is a byte-exact prefix of what was sent, and received <= written <= sent.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::backend::{Backend, BackendRecord, Kind};
use crate::client::{ClientRecord, ReadEnd};
use crate::data::{HEAD, Writer};
use crate::net;
use crate::plan::Cut;

/// How long after its close line a connection waits for its backend's
/// record before the books take it that no backend read a hello for it
/// (a flapper reset it in the listen backlog, or it was cut before its
/// hello went out).
const BACKEND_GRACE: Duration = Duration::from_secs(10);

/// Violation messages kept in full; the rest are counted.
const KEEP_MESSAGES: usize = 40;

/// One `[conn N] closed ...` line.
#[derive(Clone, Debug)]
pub struct CloseLine {
    pub conn: u64,
    pub client: SocketAddr,
    pub backend: Option<SocketAddr>,
    pub up_bytes: u64,
    pub down_bytes: u64,
    pub up_spilled: u64,
    pub down_spilled: u64,
    pub dropped: u64,
    pub reason: String,
    pub line: String,
}

#[derive(Default)]
struct Entry {
    client: Option<ClientRecord>,
    backends: Vec<BackendRecord>,
    /// Backend threads that read this id's hello and have not finished.
    open_backends: u32,
    close: Option<CloseLine>,
    close_seen: Option<Instant>,
}

/// Sums over every connection checked: the figures line.
#[derive(Default, Clone, Debug)]
pub struct Figures {
    pub connections: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub spilled: u64,
    pub spilled_up_conns: u64,
    pub spilled_down_conns: u64,
    pub dropped: u64,
    pub dropping_conns: u64,
    /// Connections whose sum came out exact in both directions, and those
    /// only bounded (a reset on the path).
    pub exact: u64,
    pub bounded: u64,
    /// Exact connections with bytes dropped: the proxy's drop count
    /// checked to the byte (a client that kept sending after its backend
    /// finished, a vanished client's response).
    pub exact_dropping: u64,
    /// Bytes sent that are neither received nor dropped where the books
    /// say they must be: must be 0.
    pub losses: u64,
    pub client_reset: u64,
    pub vanish: u64,
    pub backend_reset: u64,
    pub no_backend: u64,
    pub idle_timeouts: u64,
    pub kept_sending: u64,
    pub kept_sending_exact: u64,
    pub by_backend: Vec<u64>,
    /// The close lines' sums, as the proxy's metrics count them.
    pub up_bytes: u64,
    pub down_bytes: u64,
    pub up_spilled: u64,
    pub down_spilled: u64,
    pub outcomes: [u64; OUTCOMES.len()],
}

/// The outcomes `spillway_connections_closed_total` counts, in its order.
pub const OUTCOMES: [&str; 7] = [
    "done",
    "client_reset",
    "backend_reset",
    "no_backend",
    "timeout",
    "cut_at_shutdown",
    "error",
];

/// The outcome the proxy's metrics give a close line's `reason=` (as its
/// `metrics::Outcome::of_reason` does, for the reasons of tcp mode).
fn outcome(reason: &str) -> usize {
    if reason == "done" || reason == "shutdown: quiet" {
        0
    } else if reason.starts_with("client") {
        1
    } else if reason.starts_with("backend") {
        2
    } else if reason.starts_with("no backend") {
        3
    } else if reason.contains("timeout") {
        4
    } else if reason.starts_with("shutdown") {
        5
    } else {
        6
    }
}

struct Inner {
    entries: HashMap<u64, Entry>,
    finalized: HashSet<u64>,
    conn_ids: HashSet<u64>,
    /// Backend records with no whole hello, per backend; and connections
    /// checked whose close line named a backend that left no record.
    anonymous: Vec<u64>,
    unrecorded: Vec<u64>,
    figures: Figures,
    violations: Vec<String>,
    violation_count: u64,
}

pub struct Books {
    inner: Mutex<Inner>,
    backends: Mutex<Vec<(SocketAddr, Kind)>>,
}

impl Books {
    pub fn new() -> Books {
        Books {
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                finalized: HashSet::new(),
                conn_ids: HashSet::new(),
                anonymous: Vec::new(),
                unrecorded: Vec::new(),
                figures: Figures::default(),
                violations: Vec::new(),
                violation_count: 0,
            }),
            backends: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_backends(&self, list: &[std::sync::Arc<Backend>]) {
        *self.backends.lock().unwrap_or_else(|e| e.into_inner()) =
            list.iter().map(|b| (b.addr, b.kind)).collect();
        let mut inner = self.lock();
        inner.anonymous = vec![0; list.len()];
        inner.unrecorded = vec![0; list.len()];
        inner.figures.by_backend = vec![0; list.len()];
    }

    /// A violation found outside the per-connection checks.
    pub fn note(&self, what: String) {
        self.lock().violation(what);
    }

    pub fn client_done(&self, record: ClientRecord) {
        let mut inner = self.lock();
        let id = record.id;
        inner.entries.entry(id).or_default().client = Some(record);
    }

    pub fn backend_open(&self, id: u64) {
        let mut inner = self.lock();
        if inner.finalized.contains(&id) {
            inner.violation(format!(
                "books: a backend read the hello of conn id {id} after its books were closed (more than {BACKEND_GRACE:?} after its close line)"
            ));
            return;
        }
        inner.entries.entry(id).or_default().open_backends += 1;
    }

    pub fn backend_done(&self, record: BackendRecord) {
        let mut inner = self.lock();
        let Some(id) = record.id else {
            if let Some(wrong) = &record.wrong {
                inner.violation(format!(
                    "a {} backend got {} bytes that start no hello: {wrong}",
                    record.kind.name(),
                    record.received
                ));
            }
            if record.read_end == ReadEnd::Eof && record.received == 0 {
                // Nothing at all, then a clean EOF: the proxy connected and
                // closed gently without passing on a byte, though every
                // client sends its hello first.
                inner.violation(format!(
                    "a {} backend got a connection that ended with a clean EOF before any byte",
                    record.kind.name()
                ));
            }
            inner.anonymous[record.backend] += 1;
            return;
        };
        if inner.finalized.contains(&id) {
            return; // reported by backend_open
        }
        let entry = inner.entries.entry(id).or_default();
        entry.open_backends = entry.open_backends.saturating_sub(1);
        entry.backends.push(record);
    }

    pub fn close_line(&self, close: CloseLine) {
        let mut inner = self.lock();
        if !inner.conn_ids.insert(close.conn) {
            inner.violation(format!(
                "two close lines for [conn {}]: {}",
                close.conn, close.line
            ));
            return;
        }
        let Some(id) = net::client_id(close.client) else {
            inner.violation(format!(
                "a close line for a client that is not ours: {}",
                close.line
            ));
            return;
        };
        if inner.finalized.contains(&id) {
            inner.violation(format!(
                "a second close line for client id {id}: {}",
                close.line
            ));
            return;
        }
        let entry = inner.entries.entry(id).or_default();
        if entry.close.is_some() {
            let line = close.line.clone();
            inner.violation(format!("a second close line for client id {id}: {line}"));
            return;
        }
        entry.close = Some(close);
        entry.close_seen = Some(Instant::now());
    }

    /// Check every connection whose books are complete. `last`: the run is
    /// over and every thread has finished; whatever is still open is
    /// checked as it is, or reported as missing.
    pub fn settle(&self, last: bool) {
        let kinds = self
            .backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut inner = self.lock();
        let now = Instant::now();
        let ready: Vec<u64> = inner
            .entries
            .iter()
            .filter(|(_, e)| {
                let Some(client) = &e.client else {
                    return false;
                };
                if client.connect_error.is_some() {
                    return true;
                }
                let Some(seen) = e.close_seen else {
                    return false;
                };
                // Less than a hello's worth relayed: no backend can come
                // to know this id, so there is nothing to wait for.
                let hello_relayed = e.close.as_ref().is_some_and(|c| c.up_bytes >= HEAD as u64);
                last || e.open_backends == 0
                    && (!e.backends.is_empty()
                        || !hello_relayed
                        || now.duration_since(seen) >= BACKEND_GRACE)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            let entry = inner.entries.remove(&id).expect("listed");
            inner.finalized.insert(id);
            let books = &mut *inner;
            let found = check(
                id,
                &entry,
                &kinds,
                &mut books.figures,
                &mut books.unrecorded,
            );
            for v in found {
                inner.violation(v);
            }
        }
        if last {
            let left: Vec<(u64, Entry)> = inner.entries.drain().collect();
            for (id, e) in left {
                let what = match (&e.client, &e.close) {
                    (None, Some(close)) => {
                        format!(
                            "a close line for client id {id}, which never finished: {}",
                            close.line
                        )
                    }
                    (Some(_), None) => {
                        format!("client id {id} finished but the proxy logged no close line for it")
                    }
                    _ => format!("backend records for id {id} and no client"),
                };
                inner.violation(what);
            }
            for (b, (anon, unrecorded)) in inner
                .anonymous
                .clone()
                .into_iter()
                .zip(inner.unrecorded.clone())
                .enumerate()
            {
                // A backend connection with no whole hello must be one of
                // the connections the proxy says went to that backend and
                // no backend recorded.
                if anon > unrecorded {
                    let name = kinds.get(b).map_or("?", |k| k.1.name());
                    inner.violation(format!(
                        "backend {b} ({name}) had {anon} connections without a whole hello, but only {unrecorded} connections to it went unrecorded"
                    ));
                }
            }
        }
    }

    /// Has the proxy logged the close of client `id`'s connection?
    pub fn is_closed(&self, id: u64) -> bool {
        let inner = self.lock();
        inner.finalized.contains(&id) || inner.entries.get(&id).is_some_and(|e| e.close.is_some())
    }

    /// Backend connections without a whole hello, per backend.
    pub fn anonymous(&self) -> Vec<u64> {
        self.lock().anonymous.clone()
    }

    pub fn figures(&self) -> Figures {
        self.lock().figures.clone()
    }

    pub fn conn_ids(&self) -> (usize, u64) {
        let inner = self.lock();
        (
            inner.conn_ids.len(),
            inner.conn_ids.iter().copied().max().unwrap_or(0),
        )
    }

    pub fn open_entries(&self) -> usize {
        self.lock().entries.len()
    }

    /// How many violations, and the first few in full.
    pub fn violations(&self) -> (u64, Vec<String>) {
        let inner = self.lock();
        (inner.violation_count, inner.violations.clone())
    }
}

impl Inner {
    fn violation(&mut self, what: String) {
        self.violation_count += 1;
        if self.violations.len() < KEEP_MESSAGES {
            eprintln!("soak: VIOLATION: {what}");
            self.violations.push(what);
        }
    }
}

/// Which kind of backend writes which header.
fn writer_of(kind: Kind) -> Option<Writer> {
    match kind {
        Kind::Echo => Some(Writer::Echo),
        Kind::Responder => Some(Writer::Responder),
        Kind::SlowReader => Some(Writer::SlowReader),
        Kind::HalfCloser => Some(Writer::HalfCloser),
        Kind::Resetter => Some(Writer::Resetter),
        Kind::Flapper => Some(Writer::Flapper),
        Kind::Blackhole | Kind::Refuser => None,
    }
}

/// An interval for a direction's share of `dropped=`.
#[derive(Clone, Copy, Debug)]
struct Share {
    lo: u64,
    hi: u64,
}

/// Check one connection; add it to the figures. Returns what is wrong.
fn check(
    id: u64,
    e: &Entry,
    kinds: &[(SocketAddr, Kind)],
    f: &mut Figures,
    unrecorded: &mut [u64],
) -> Vec<String> {
    let mut bad = Vec::new();
    let c = e.client.as_ref().expect("settled with a client");
    if let Some(err) = &c.connect_error {
        bad.push(format!(
            "client id {id} could not connect to the proxy ({err}): beyond --max-connections clients must wait in the backlog, never be refused"
        ));
        return bad;
    }
    let Some(l) = e.close.as_ref() else {
        return bad;
    };
    let ctx = |what: String| -> String {
        format!(
            "conn id {id} ({}): {what}\n    client: sent={} received={} read_end={:?} fin={:?} fin_acked={:?} write_error={:?} cut={:?} kept_sending={}\n    backend: {}\n    proxy: {}",
            l.client,
            c.sent,
            c.received,
            c.read_end,
            c.fin,
            c.fin_acked,
            c.write_error,
            c.cut,
            c.sent_after_eof,
            e.backends
                .first()
                .map_or("no record".to_string(), |b| format!(
                    "{} sent={} received={} read_end={:?} fin={:?} fin_before_eof={} fin_acked={:?} write_error={:?} reset_by_us={}",
                    b.kind.name(),
                    b.sent,
                    b.received,
                    b.read_end,
                    b.fin,
                    b.fin_before_eof,
                    b.fin_acked,
                    b.write_error,
                    b.reset_by_us
                )),
            l.line
        )
    };

    f.up_bytes += l.up_bytes;
    f.down_bytes += l.down_bytes;
    f.up_spilled += l.up_spilled;
    f.down_spilled += l.down_spilled;
    f.outcomes[outcome(&l.reason)] += 1;
    f.connections += 1;
    f.bytes_up += c.sent;
    f.bytes_down += c.received;
    f.spilled += l.up_spilled + l.down_spilled;
    f.spilled_up_conns += u64::from(l.up_spilled > 0);
    f.spilled_down_conns += u64::from(l.down_spilled > 0);
    f.dropped += l.dropped;
    f.dropping_conns += u64::from(l.dropped > 0);
    f.kept_sending += u64::from(c.sent_after_eof);
    match c.cut {
        Some(Cut::ResetAtUpload(_)) => f.client_reset += 1,
        Some(Cut::VanishAtDownload(_)) => f.vanish += 1,
        _ => {}
    }
    let idle = l.reason == "idle timeout";
    f.idle_timeouts += u64::from(idle);
    let no_backend = l.reason.starts_with("no backend reached");
    f.no_backend += u64::from(no_backend);

    if c.gave_up {
        bad.push(ctx(format!(
            "nothing ended the connection within the client's patience ({:?}): hung",
            c.elapsed
        )));
    }
    if c.aborted {
        bad.push(ctx(
            "the run was aborted with the client still running".into()
        ));
    }
    if let Some(wrong) = &c.wrong {
        bad.push(ctx(format!("the client received wrong bytes: {wrong}")));
    }
    if c.local != Some(l.client) {
        bad.push(ctx(format!("matched to a close line for {}", l.client)));
    }
    if e.backends.len() > 1 {
        bad.push(ctx(format!(
            "{} backends read this connection's hello",
            e.backends.len()
        )));
    }
    let b = e.backends.first();
    if let Some(b) = b {
        if let Some(wrong) = &b.wrong {
            bad.push(ctx(format!("the backend received wrong bytes: {wrong}")));
        }
        if b.gave_up || b.aborted {
            bad.push(ctx("the backend's side never ended: hung".into()));
        }
        if b.reset_by_us {
            f.backend_reset += 1;
        }
    }

    // Which backend: the close line names the one used (or last tried).
    let named = l
        .backend
        .and_then(|addr| kinds.iter().position(|(a, _)| *a == addr));
    if let Some(i) = named {
        f.by_backend[i] += 1;
    }
    match (b, named) {
        (Some(b), Some(i)) if b.backend != i => bad.push(ctx(format!(
            "the close line names backend {i} but backend {} ({}) served it",
            b.backend,
            b.kind.name()
        ))),
        (Some(_), None) => bad.push(ctx(
            "a backend served it, but the close line names none".into()
        )),
        (None, Some(i)) if !no_backend && kinds[i].1 != Kind::Refuser => unrecorded[i] += 1,
        _ => {}
    }
    // A close line names the backend used, or the one being tried when
    // the client left: a refuser may be named, but can have relayed nothing.
    if let Some(i) = named {
        if kinds[i].1 == Kind::Refuser && (l.up_bytes > 0 || l.down_bytes > 0) {
            bad.push(ctx(
                "bytes relayed through a backend that refuses every connect".into(),
            ));
        }
    }
    if let (Some(kind), Some(i)) = (c.kind, named) {
        if writer_of(kinds[i].1) != Some(kind) {
            bad.push(ctx(format!(
                "the response came from a {kind:?} backend, not the {} named",
                kinds[i].1.name()
            )));
        }
    }
    if no_backend {
        // Every connect failed: the client is reset, nothing was relayed.
        if b.is_some() || l.up_bytes != 0 || l.down_bytes != 0 || c.received != 0 {
            bad.push(ctx("no backend reached, yet bytes were relayed".into()));
        }
        if c.read_end == ReadEnd::Eof {
            bad.push(ctx(
                "no backend reached, yet the client got a clean EOF, not a reset".into(),
            ));
        }
    }

    let (cs, cr) = (c.sent, c.received);
    let (bs, br) = b.map_or((0, 0), |b| (b.sent, b.received));
    let (up, down, dropped) = (l.up_bytes, l.down_bytes, l.dropped);

    // Bounds, always: nobody receives more than was written to it, and the
    // proxy writes no more than it was sent.
    if !(br <= up && up <= cs) {
        bad.push(ctx(format!(
            "upstream out of bounds: need backend received {br} <= up_bytes {up} <= client sent {cs}"
        )));
    }
    if !(cr <= down && down <= bs) {
        bad.push(ctx(format!(
            "downstream out of bounds: need client received {cr} <= down_bytes {down} <= backend sent {bs}"
        )));
    }

    // Downstream. A clean EOF at the client means the proxy delivered the
    // whole stream and then shut its write half: everything it wrote
    // arrived (the FIN comes after the data), and it writes the FIN only
    // once the backend's own EOF was read and everything held was
    // delivered, so nothing was dropped or lost on the way either. The
    // one exception is the idle timeout's gentle close, which ends a
    // stream the backend never finished, with nothing held.
    let backend_finished = b.is_some_and(|b| matches!(b.fin, Some(Ok(()))));
    let down_share = if c.read_end == ReadEnd::Eof {
        if cr != down {
            bad.push(ctx(format!(
                "a clean EOF after {cr} bytes, but the proxy wrote {down}"
            )));
        }
        if idle {
            Share {
                lo: 0,
                hi: bs.saturating_sub(down),
            }
        } else {
            if !backend_finished || cr != bs {
                bad.push(ctx(format!(
                    "a cut stream reached the client as a clean EOF: {cr} of the {bs} bytes the backend sent (backend FIN: {})",
                    backend_finished
                )));
            }
            Share { lo: 0, hi: 0 }
        }
    } else {
        // The backend's side is clean when it wrote everything, sent its
        // FIN and saw it taken without a reset, and read the proxy's EOF:
        // then the proxy read all it sent (it closes that socket only
        // after reading its EOF, else with a reset the backend would see).
        let backend_clean = b.is_some_and(|b| {
            matches!(b.fin, Some(Ok(())))
                && matches!(b.fin_acked, Some(Ok(())))
                && b.write_error.is_none()
                && !b.reset_by_us
                && b.read_end == ReadEnd::Eof
        });
        let most = bs.saturating_sub(down);
        Share {
            lo: if backend_clean { most } else { 0 },
            hi: most,
        }
    };

    // Upstream, the same from the other side. A clean EOF at the backend
    // before it sent its own FIN means the client's stream was delivered
    // whole: the client sent its FIN and the proxy read it. After its own
    // FIN the backend may see the proxy close early (it drops what the
    // client still sends), and the idle timeout closes gently too: then
    // only what the proxy wrote must have arrived.
    let up_share = match b {
        Some(b) if b.read_end == ReadEnd::Eof => {
            if br != up {
                bad.push(ctx(format!(
                    "the backend got a clean EOF after {br} bytes, but the proxy wrote {up}"
                )));
            }
            if !b.fin_before_eof && !idle {
                if br != cs || !matches!(c.fin, Some(Ok(()))) {
                    bad.push(ctx(format!(
                        "a cut stream reached the backend as a clean EOF: {br} of the {cs} bytes the client sent (client FIN: {:?})",
                        c.fin
                    )));
                }
                Share { lo: 0, hi: 0 }
            } else {
                client_share(c, cs, up)
            }
        }
        _ => client_share(c, cs, up),
    };

    // dropped= covers both directions: it must lie in the sum of the two
    // intervals; when both are exact, it is exactly what was sent and not
    // written.
    let (lo, hi) = (up_share.lo + down_share.lo, up_share.hi + down_share.hi);
    let exact = lo == hi;
    if exact {
        f.exact += 1;
        f.exact_dropping += u64::from(dropped > 0);
        f.kept_sending_exact += u64::from(c.sent_after_eof);
    } else {
        f.bounded += 1;
    }
    if dropped < lo {
        let lost = lo - dropped;
        f.losses += lost;
        bad.push(ctx(format!(
            "{lost} bytes lost: sent = received + dropped needs dropped={lo}{}, the proxy says {dropped}",
            if exact { String::new() } else { format!("..{hi}") }
        )));
    } else if dropped > hi {
        bad.push(ctx(format!(
            "dropped={dropped} is more than the {hi} bytes the proxy read and did not write"
        )));
    }
    bad
}

/// The upstream's share of dropped=: exact when the client's side is
/// clean (it sent its FIN, saw it taken without a reset, and never saw a
/// reset): the proxy then read everything the client sent, up to that FIN.
fn client_share(c: &ClientRecord, cs: u64, up: u64) -> Share {
    let clean = matches!(c.fin, Some(Ok(())))
        && matches!(c.fin_acked, Some(Ok(())))
        && c.write_error.is_none()
        && c.cut.is_none()
        && !matches!(c.read_end, ReadEnd::Failed(_));
    let most = cs.saturating_sub(up);
    Share {
        lo: if clean { most } else { 0 },
        hi: most,
    }
}
