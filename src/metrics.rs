//! Metrics: counters each worker keeps for itself, added up when
//! Prometheus scrapes `--metrics-listen` (`GET /metrics`, in the text
//! format the `prometheus-client` crate encodes), and `GET /healthz`.
//!
//! The hot path does not pay for them: a worker's counters are written
//! by that worker alone, so an update is a plain load and store of its own
//! cache line (no lock, no locked instruction), made once per connection
//! turn or per event, never per read or write. The scraper reads them
//! with relaxed loads; a figure may be a turn old, never torn.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::shared::Shared;

/// A counter or gauge written by one thread only.
#[derive(Default, Debug)]
pub struct Cell(AtomicU64);

impl Cell {
    pub fn add(&self, n: u64) {
        // One writer: a load and a store, no read-modify-write needed.
        self.0
            .store(self.0.load(Ordering::Relaxed) + n, Ordering::Relaxed);
    }

    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Bucket bounds, in seconds, of every time histogram: from a local
/// request to a slow client's download.
pub const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A histogram of durations written by one thread.
#[derive(Default, Debug)]
pub struct Histogram {
    /// One count per bound, then one for +Inf.
    counts: [Cell; BUCKETS.len() + 1],
    sum_micros: Cell,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let at = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[at].add(1);
        self.sum_micros.add(d.as_micros() as u64);
    }
}

/// How a connection ended, for `spillway_connections_closed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    ClientReset,
    BackendReset,
    NoBackend,
    Timeout,
    CutAtShutdown,
    Error,
}

impl Outcome {
    const ALL: [Outcome; 7] = [
        Outcome::Done,
        Outcome::ClientReset,
        Outcome::BackendReset,
        Outcome::NoBackend,
        Outcome::Timeout,
        Outcome::CutAtShutdown,
        Outcome::Error,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::ClientReset => "client_reset",
            Outcome::BackendReset => "backend_reset",
            Outcome::NoBackend => "no_backend",
            Outcome::Timeout => "timeout",
            Outcome::CutAtShutdown => "cut_at_shutdown",
            Outcome::Error => "error",
        }
    }

    /// From a close line's `reason=`.
    pub fn of_reason(reason: &str) -> Outcome {
        if reason == "done" || reason == "shutdown: quiet" {
            Outcome::Done
        } else if reason.starts_with("client") {
            Outcome::ClientReset
        } else if reason.starts_with("backend") || reason.starts_with("bad response") {
            Outcome::BackendReset
        } else if reason.starts_with("no backend") {
            Outcome::NoBackend
        } else if reason.contains("timeout")
            || reason.starts_with("408")
            || reason.starts_with("504")
        {
            Outcome::Timeout
        } else if reason.starts_with("shutdown") {
            Outcome::CutAtShutdown
        } else {
            Outcome::Error
        }
    }
}

/// Why a direction stopped reading its sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backpressure {
    MaxSpill,
    MaxDisk,
    DiskError,
    MaxMemory,
}

/// Why a connect to a backend failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectFailure {
    Refused,
    Timeout,
    Error,
}

/// One backend's counters in one worker.
#[derive(Default, Debug)]
pub struct BackendCells {
    pub connects: Cell,
    /// Refused, timed out, any other error.
    pub failures: [Cell; 3],
}

/// Everything one worker counts.
#[derive(Debug)]
pub struct WorkerMetrics {
    closed: [Cell; Outcome::ALL.len()],
    /// Relayed, and spilled, per direction: [up, down].
    pub bytes: [Cell; 2],
    pub spilled: [Cell; 2],
    /// Directions that began to spill: [up, down].
    pub spill_events: [Cell; 2],
    backpressure: [Cell; 4],
    pub backend_hold: Histogram,
    pub client_time: Histogram,
    /// Memory buffers and pipes this worker holds now.
    pub memory: Cell,
    pub backends: Vec<BackendCells>,
    /// HTTP: requests by status class (1xx..5xx), their time, bodies spilled.
    http_requests: [Cell; 5],
    pub http_request_time: Histogram,
    pub http_bodies_spilled: Cell,
}

impl WorkerMetrics {
    pub fn new(backends: usize) -> WorkerMetrics {
        WorkerMetrics {
            closed: Default::default(),
            bytes: Default::default(),
            spilled: Default::default(),
            spill_events: Default::default(),
            backpressure: Default::default(),
            backend_hold: Histogram::default(),
            client_time: Histogram::default(),
            memory: Cell::default(),
            backends: (0..backends).map(|_| BackendCells::default()).collect(),
            http_requests: Default::default(),
            http_request_time: Histogram::default(),
            http_bodies_spilled: Cell::default(),
        }
    }

    pub fn closed(&self, outcome: Outcome) {
        self.closed[outcome as usize].add(1);
    }

    pub fn backpressure(&self, why: Backpressure) {
        self.backpressure[why as usize].add(1);
    }

    pub fn connect_failed(&self, backend: usize, why: ConnectFailure) {
        self.backends[backend].failures[why as usize].add(1);
    }

    pub fn http_request(&self, status: u16, took: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.http_requests[class].add(1);
        self.http_request_time.observe(took);
    }
}

/// What a scrape reads: every worker's counters and the shared state.
struct Scrape(Arc<Shared>);

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

type Enc<'a> = DescriptorEncoder<'a>;

fn gauge(enc: &mut Enc, name: &str, help: &str, v: i64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A counter family with one label: (label value, value) each.
fn counters(
    enc: &mut Enc,
    name: &str,
    help: &str,
    key: &str,
    values: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (label, v) in values {
        m.encode_family(&[(key, *label)])?
            .encode_counter::<NoLabelSet, u64, u64>(v, None)?;
    }
    Ok(())
}

fn histogram(
    enc: &mut Enc,
    name: &str,
    help: &str,
    of: &[&Histogram],
) -> Result<(), std::fmt::Error> {
    let mut buckets: Vec<(f64, u64)> = BUCKETS.iter().map(|&b| (b, 0)).collect();
    buckets.push((f64::INFINITY, 0));
    let mut sum = 0.0;
    for h in of {
        for (b, c) in buckets.iter_mut().zip(&h.counts) {
            b.1 += c.get();
        }
        sum += h.sum_micros.get() as f64 / 1e6;
    }
    let count = buckets.iter().map(|b| b.1).sum();
    enc.encode_descriptor(name, help, None, MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let shared = &self.0;
        let w = &shared.metrics;
        let sum = |f: &dyn Fn(&WorkerMetrics) -> u64| w.iter().map(f).sum::<u64>();
        gauge(
            &mut enc,
            "spillway_connections_open",
            "Client connections open now",
            // The places taken under --max-connections: one count for
            // every worker, so a scrape never adds one worker's figure from
            // before its turn closed connections to another's that took
            // their places (a sum over the limit).
            shared.limit.open() as i64,
        )?;
        let closed: Vec<(&str, u64)> = Outcome::ALL
            .iter()
            .map(|&o| (o.label(), sum(&|m| m.closed[o as usize].get())))
            .collect();
        counters(
            &mut enc,
            "spillway_connections_closed",
            "Client connections closed, by outcome",
            "outcome",
            &closed,
        )?;
        let dirs = ["up", "down"];
        let bytes: Vec<(&str, u64)> = (0..2)
            .map(|d| (dirs[d], sum(&|m| m.bytes[d].get())))
            .collect();
        counters(
            &mut enc,
            "spillway_bytes",
            "Bytes relayed, by direction (up: client to backend)",
            "direction",
            &bytes,
        )?;
        let spilled: Vec<(&str, u64)> = (0..2)
            .map(|d| (dirs[d], sum(&|m| m.spilled[d].get())))
            .collect();
        counters(
            &mut enc,
            "spillway_spilled_bytes",
            "Bytes written to spill files, by direction",
            "direction",
            &spilled,
        )?;
        let events: Vec<(&str, u64)> = (0..2)
            .map(|d| (dirs[d], sum(&|m| m.spill_events[d].get())))
            .collect();
        counters(
            &mut enc,
            "spillway_spill_events",
            "Directions that began to spill, by direction",
            "direction",
            &events,
        )?;
        let causes = ["max_spill", "max_disk", "disk_error", "max_memory"];
        let pressure: Vec<(&str, u64)> = (0..4)
            .map(|c| (causes[c], sum(&|m| m.backpressure[c].get())))
            .collect();
        counters(
            &mut enc,
            "spillway_backpressure_events",
            "Times a direction stopped reading its sender, by cause",
            "cause",
            &pressure,
        )?;
        gauge(
            &mut enc,
            "spillway_memory_bytes",
            "Bytes of memory buffers and pipes held now",
            sum(&|m| m.memory.get()) as i64,
        )?;
        gauge(
            &mut enc,
            "spillway_disk_bytes",
            "Disk held by spill files now (what df sees)",
            shared.plan.disk.used() as i64,
        )?;
        let disk_limit = shared.config.max_disk.map_or(-1, |d| d as i64);
        gauge(
            &mut enc,
            "spillway_disk_limit_bytes",
            "--max-disk (-1: unlimited)",
            disk_limit,
        )?;
        let memory_budget = &shared.plan.memory_budget;
        gauge(
            &mut enc,
            "spillway_memory_charged_bytes",
            "Memory charged to --max-memory now (a whole --memory-buffer per direction holding any)",
            memory_budget.used() as i64,
        )?;
        gauge(
            &mut enc,
            "spillway_memory_limit_bytes",
            "--max-memory (-1: unlimited)",
            memory_budget.limit().map_or(-1, |l| l as i64),
        )?;
        let holds: Vec<&Histogram> = w.iter().map(|m| &m.backend_hold).collect();
        histogram(
            &mut enc,
            "spillway_backend_hold_seconds",
            "How long a backend connection was held (per connection in tcp mode, per request in http mode)",
            &holds,
        )?;
        let clients: Vec<&Histogram> = w.iter().map(|m| &m.client_time).collect();
        histogram(
            &mut enc,
            "spillway_client_seconds",
            "How long a client connection lasted",
            &clients,
        )?;
        self.encode_backends(&mut enc)?;
        if shared.config.mode == crate::config::Mode::Http {
            let classes = ["1xx", "2xx", "3xx", "4xx", "5xx"];
            let requests: Vec<(&str, u64)> = (0..5)
                .map(|c| (classes[c], sum(&|m| m.http_requests[c].get())))
                .collect();
            counters(
                &mut enc,
                "spillway_http_requests",
                "HTTP requests answered, by status class",
                "class",
                &requests,
            )?;
            let times: Vec<&Histogram> = w.iter().map(|m| &m.http_request_time).collect();
            histogram(
                &mut enc,
                "spillway_http_request_seconds",
                "HTTP request time, head in to response delivered",
                &times,
            )?;
            counters(
                &mut enc,
                "spillway_http_request_bodies_spilled",
                "HTTP request bodies that went to disk",
                "direction",
                &[("up", sum(&|m| m.http_bodies_spilled.get()))],
            )?;
        }
        Ok(())
    }
}

impl Scrape {
    fn encode_backends(&self, enc: &mut Enc) -> Result<(), std::fmt::Error> {
        let shared = &self.0;
        let backends = &shared.backends;
        // In the pool, or still holding connections.
        let shown: Vec<usize> = (0..backends.len())
            .filter(|&i| backends.is_member(i) || backends.active(i) > 0)
            .collect();
        let names: Vec<(usize, String)> = shown
            .iter()
            .map(|&i| (i, backends.addr(i).to_string()))
            .collect();
        let mut up = enc.encode_descriptor(
            "spillway_backend_up",
            "1 if the backend is up, 0 if marked down",
            None,
            MetricType::Gauge,
        )?;
        for (i, name) in names.iter().map(|(i, n)| (*i, n)) {
            up.encode_family(&[("backend", name.as_str())])?
                .encode_gauge(&i64::from(backends.is_up(i)))?;
        }
        let mut active = enc.encode_descriptor(
            "spillway_backend_active",
            "Connections holding the backend now",
            None,
            MetricType::Gauge,
        )?;
        for (i, name) in names.iter().map(|(i, n)| (*i, n)) {
            active
                .encode_family(&[("backend", name.as_str())])?
                .encode_gauge(&i64::from(backends.active(i)))?;
        }
        let mut connects = enc.encode_descriptor(
            "spillway_backend_connects",
            "Connects to the backend that succeeded",
            None,
            MetricType::Counter,
        )?;
        for (i, name) in names.iter().map(|(i, n)| (*i, n)) {
            let v: u64 = shared
                .metrics
                .iter()
                .map(|m| m.backends[i].connects.get())
                .sum();
            connects
                .encode_family(&[("backend", name.as_str())])?
                .encode_counter::<NoLabelSet, u64, u64>(&v, None)?;
        }
        let mut failures = enc.encode_descriptor(
            "spillway_backend_connect_failures",
            "Connects to the backend that failed, by cause",
            None,
            MetricType::Counter,
        )?;
        for (i, name) in names.iter().map(|(i, n)| (*i, n)) {
            for (c, cause) in ["refused", "timeout", "error"].iter().enumerate() {
                let v: u64 = shared
                    .metrics
                    .iter()
                    .map(|m| m.backends[i].failures[c].get())
                    .sum();
                failures
                    .encode_family(&[("backend", name.as_str()), ("cause", *cause)])?
                    .encode_counter::<NoLabelSet, u64, u64>(&v, None)?;
            }
        }
        Ok(())
    }
}

/// The text of a scrape.
pub fn render(shared: &Arc<Shared>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(shared.clone())));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        let _ = writeln!(out, "# encoding failed: {e}");
    }
    out
}

const LISTENER: Token = Token(0);
const STOP: Token = Token(1);

/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The thread that answers scrapes, and how to stop it.
pub struct MetricsServer {
    waker: Arc<Waker>,
    thread: Option<thread::JoinHandle<()>>,
}

impl MetricsServer {
    /// Serve `listener` on a thread of its own until stopped.
    pub fn start(listener: TcpListener, shared: Arc<Shared>) -> io::Result<MetricsServer> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), STOP)?);
        let mut listener = listener;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let thread = thread::Builder::new()
            .name("spillway-metrics".into())
            .spawn(move || serve(poll, listener, shared))?;
        Ok(MetricsServer {
            waker,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut poll: Poll, listener: TcpListener, shared: Arc<Shared>) {
    let mut events = Events::with_capacity(8);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("metrics: poll failed: {e}; no more scrapes");
            return;
        }
        for event in events.iter() {
            if event.token() == STOP {
                return;
            }
        }
        // Scrapes are few and small: each is served whole, blocking, with
        // a timeout, on this thread of its own.
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    if let Err(e) = answer(stream, &shared) {
                        log::debug!("metrics: scrape from {peer}: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("metrics: accept failed: {e}");
                    break;
                }
            }
        }
    }
}

/// Read one request and answer it: `/metrics`, `/healthz`, or 404.
fn answer(stream: mio::net::TcpStream, shared: &Arc<Shared>) -> io::Result<()> {
    let stream: std::net::TcpStream = stream.into();
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut stream = stream;
    let started = Instant::now();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 || head.len() > 8192 || started.elapsed() > REQUEST_TIMEOUT {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head[..head.iter().position(|&b| b == b'\r').unwrap_or(0)])
        .into_owned();
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, kind, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(shared),
        ),
        ("GET", "/healthz") => {
            let lifecycle = &shared.lifecycle;
            if lifecycle.shutdown_deadline().is_some() || lifecycle.stopping() {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "shutting down\n".to_string(),
                )
            } else {
                ("200 OK", "text/plain", "ok\n".to_string())
            }
        }
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /healthz\n".to_string(),
        ),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}
