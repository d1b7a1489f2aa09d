//! What the proxy is told to do: a plain struct the command line fills and
//! tests build directly. Cross-field checks live in `validate`.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_MEMORY_BUFFER: u64 = 64 * 1024;
pub const DEFAULT_MAX_SPILL: u64 = 1 << 30;

/// Below this the relay would make a syscall per handful of bytes.
pub const MIN_MEMORY_BUFFER: u64 = 1024;

/// Above this one connection could pin gigabytes of RAM per direction.
pub const MAX_MEMORY_BUFFER: u64 = 1 << 30;
/// `--memory-buffer-max` unless `--memory-buffer` is larger: the size at
/// which bulk throughput stopped gaining (docs/performance.md).
pub const DEFAULT_MEMORY_BUFFER_MAX: u64 = 1 << 20;

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_MAX_FAILS: u32 = 3;
/// A backend's failure count is kept in 16 bits (see `balancer`).
pub const MAX_MAX_FAILS: u32 = 10_000;
pub const MAX_WORKERS: usize = 256;
pub const DEFAULT_FAIL_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// A receiver that keeps up takes a full `--memory-buffer` in microseconds;
/// a few milliseconds ride out a scheduling hiccup on a busy machine, and
/// cost a slow client's backend no more than that before it is spilled for.
pub const DEFAULT_SPILL_AFTER: Duration = Duration::from_millis(5);

/// Longer, and a slow client would hold its backend for as long as it
/// dawdles over each `--memory-buffer`: what spilling is there to prevent.
pub const MAX_SPILL_AFTER: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub backends: Vec<BackendSpec>,
    pub balance: Strategy,
    /// How long one connect attempt may take.
    pub connect_timeout: Duration,
    /// Other backends tried after a failed connect; `None`: all, once each.
    pub connect_retries: Option<usize>,
    /// Connect failures in a row that take a backend down.
    pub max_fails: u32,
    /// How long a down backend is skipped before a trial (doubling while
    /// it keeps failing).
    pub fail_timeout: Duration,
    /// Probe every backend this often, if set.
    pub health_check: Option<Duration>,
    /// Bytes held in memory per direction per connection before spilling.
    pub memory_buffer: u64,
    /// What a direction showing bulk may grow its memory to.
    pub memory_buffer_max: u64,
    /// Bytes waiting on disk per direction per connection before reading
    /// from the sender stops.
    pub max_spill: u64,
    /// How long memory may stay full with the receiver not catching up
    /// before bytes go to disk; meanwhile the sender is not read.
    pub spill_after: Duration,
    pub temp_dir: PathBuf,
    /// Client connections held at once; beyond, accepting pauses.
    pub max_connections: usize,
    /// Disk all spill files together may occupy; `None`: unlimited.
    pub max_disk: Option<u64>,
    /// Memory all buffers together may hold; `None`: unlimited.
    pub max_memory: Option<u64>,
    /// Close a connection with no bytes moving either way for this long.
    pub idle_timeout: Duration,
    /// How long in-flight connections may drain after SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
    /// Event-loop threads, each with its own listening socket.
    pub workers: usize,
    /// Keep a backend that has sent EOF connected until the client has
    /// sent EOF too (full half-duplex), instead of releasing it at once.
    pub keep_half_open: bool,
    /// What a connection carries: bytes (`tcp`) or HTTP/1.1 messages.
    pub mode: Mode,
    /// HTTP: larger request bodies get 413; 0: no limit but what the
    /// buffer holds (`--memory-buffer` + `--max-spill`).
    pub max_request_body: u64,
    /// HTTP: a request head larger than this gets 431.
    pub max_header_size: u64,
    /// HTTP: the whole request head must arrive within this.
    pub client_header_timeout: Duration,
    /// HTTP: longest gap between two reads of a request body.
    pub client_body_timeout: Duration,
    /// HTTP: how long an idle client connection is kept between requests.
    pub keepalive_timeout: Duration,
    /// HTTP: longest wait for a response head, and longest gap in a body.
    pub backend_timeout: Duration,
    /// HTTP: idle backend connections kept per backend per worker.
    pub upstream_keepalive: usize,
    /// Serve `/metrics` and `/healthz` here, if set.
    pub metrics_listen: Option<SocketAddr>,
    /// Start every backend connection with a PROXY protocol header.
    pub send_proxy: Option<crate::proxy_header::Version>,
    /// Require a PROXY protocol header at the start of every client
    /// connection, and take the client's address from it.
    pub accept_proxy: bool,
    /// Resolve backend names again this often, if set.
    pub resolve_every: Option<Duration>,
}

/// What a connection carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Bytes, both ways, as they come.
    Tcp,
    /// HTTP/1.1: whole requests and responses, backends per request.
    Http,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode, String> {
        match s {
            "tcp" => Ok(Mode::Tcp),
            "http" => Ok(Mode::Http),
            _ => Err(format!("'{s}' is not a mode: expected tcp or http")),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Tcp => "tcp",
            Mode::Http => "http",
        })
    }
}

pub const DEFAULT_MAX_REQUEST_BODY: u64 = 1 << 30;
pub const DEFAULT_MAX_HEADER_SIZE: u64 = 32 * 1024;
/// A head must hold a request line and a Host; past a MiB it is an attack.
pub const MIN_HEADER_SIZE: u64 = 1024;
pub const MAX_HEADER_SIZE: u64 = 1 << 20;
pub const DEFAULT_CLIENT_HEADER_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(75);
pub const DEFAULT_BACKEND_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_UPSTREAM_KEEPALIVE: usize = 32;
pub const MAX_UPSTREAM_KEEPALIVE: usize = 10_000;

/// One worker per core the process may run on.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_WORKERS))
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            backends: Vec::new(),
            balance: Strategy::RoundRobin,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            connect_retries: None,
            max_fails: DEFAULT_MAX_FAILS,
            fail_timeout: DEFAULT_FAIL_TIMEOUT,
            health_check: None,
            memory_buffer: DEFAULT_MEMORY_BUFFER,
            memory_buffer_max: DEFAULT_MEMORY_BUFFER_MAX,
            max_spill: DEFAULT_MAX_SPILL,
            spill_after: DEFAULT_SPILL_AFTER,
            temp_dir: std::env::temp_dir(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_disk: None,
            max_memory: None,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            workers: 1,
            keep_half_open: false,
            mode: Mode::Tcp,
            max_request_body: DEFAULT_MAX_REQUEST_BODY,
            max_header_size: DEFAULT_MAX_HEADER_SIZE,
            client_header_timeout: DEFAULT_CLIENT_HEADER_TIMEOUT,
            client_body_timeout: DEFAULT_CLIENT_BODY_TIMEOUT,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            backend_timeout: DEFAULT_BACKEND_TIMEOUT,
            upstream_keepalive: DEFAULT_UPSTREAM_KEEPALIVE,
            metrics_listen: None,
            send_proxy: None,
            accept_proxy: false,
            resolve_every: None,
        }
    }
}

/// A configuration the proxy cannot run with, said the way the command line
/// would say it: the flag, then what is wrong.
#[derive(Debug)]
pub struct ConfigError {
    pub flag: &'static str,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.flag, self.problem)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let refuse = |flag, problem| Err(ConfigError { flag, problem });
        if self.backends.is_empty() {
            return refuse(
                "--backend",
                "at least one backend is needed, e.g. --backend 127.0.0.1:9000".into(),
            );
        }
        let positive = [
            ("--connect-timeout", self.connect_timeout),
            ("--fail-timeout", self.fail_timeout),
            ("--health-check", self.health_check.unwrap_or(Duration::MAX)),
            ("--idle-timeout", self.idle_timeout),
            ("--client-header-timeout", self.client_header_timeout),
            ("--client-body-timeout", self.client_body_timeout),
            ("--keepalive-timeout", self.keepalive_timeout),
            ("--backend-timeout", self.backend_timeout),
            (
                "--resolve-every",
                self.resolve_every.unwrap_or(Duration::MAX),
            ),
        ];
        for (flag, d) in positive {
            if d.is_zero() {
                return refuse(flag, "must be above zero, e.g. 500ms or 5s".into());
            }
        }
        if !(1..=MAX_WORKERS).contains(&self.workers) {
            return refuse(
                "--workers",
                format!(
                    "{} is out of range: expected 1 to {MAX_WORKERS}, e.g. --workers 4",
                    self.workers
                ),
            );
        }
        if self.max_connections == 0 {
            return refuse("--max-connections", "must be at least 1".into());
        }
        if !(1..=MAX_MAX_FAILS).contains(&self.max_fails) {
            return refuse(
                "--max-fails",
                format!(
                    "{} is out of range: expected 1 to {MAX_MAX_FAILS}",
                    self.max_fails
                ),
            );
        }
        if !(MIN_MEMORY_BUFFER..=MAX_MEMORY_BUFFER).contains(&self.memory_buffer) {
            return refuse(
                "--memory-buffer",
                format!(
                    "{} is out of range: expected a size from 1KiB to 1GiB, e.g. 64KiB",
                    self.memory_buffer
                ),
            );
        }
        if self.memory_buffer_max < self.memory_buffer || self.memory_buffer_max > MAX_MEMORY_BUFFER
        {
            return refuse(
                "--memory-buffer-max",
                format!(
                    "{} is out of range: expected a size from --memory-buffer ({}) to 1GiB, e.g. 1MiB",
                    self.memory_buffer_max, self.memory_buffer
                ),
            );
        }
        if let Some(max) = self.max_memory.filter(|&m| m < self.memory_buffer) {
            return refuse(
                "--max-memory",
                format!(
                    "{max} is below --memory-buffer ({}): expected at least one buffer's worth, e.g. 256MiB",
                    self.memory_buffer
                ),
            );
        }
        if !(MIN_HEADER_SIZE..=MAX_HEADER_SIZE).contains(&self.max_header_size) {
            return refuse(
                "--max-header-size",
                format!(
                    "{} is out of range: expected a size from 1KiB to 1MiB, e.g. 32KiB",
                    self.max_header_size
                ),
            );
        }
        if self.upstream_keepalive > MAX_UPSTREAM_KEEPALIVE {
            return refuse(
                "--upstream-keepalive",
                format!(
                    "{} is out of range: expected 0 to {MAX_UPSTREAM_KEEPALIVE}, e.g. 32",
                    self.upstream_keepalive
                ),
            );
        }
        if self.spill_after > MAX_SPILL_AFTER {
            return refuse(
                "--spill-after",
                format!(
                    "{:?} is too long: expected at most 1s, e.g. 5ms (0ms spills at once)",
                    self.spill_after
                ),
            );
        }
        if let Err(e) = crate::spill::check_temp_dir(&self.temp_dir) {
            return refuse(
                "--temp-dir",
                format!(
                    "{} cannot hold spill files: {e}; expected a writable directory",
                    self.temp_dir.display()
                ),
            );
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Smooth weighted round-robin (nginx's): no bursts to one backend.
    RoundRobin,
    /// Fewest active connections per unit of weight.
    LeastConn,
    /// Power of two random choices on active connections per weight.
    Random2,
}

impl Strategy {
    pub fn parse(s: &str) -> Result<Strategy, String> {
        match s {
            "round-robin" => Ok(Strategy::RoundRobin),
            "least-conn" => Ok(Strategy::LeastConn),
            "random2" => Ok(Strategy::Random2),
            _ => Err(format!(
                "'{s}' is not a strategy: expected round-robin, least-conn or random2"
            )),
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::RoundRobin => "round-robin",
            Strategy::LeastConn => "least-conn",
            Strategy::Random2 => "random2",
        })
    }
}

/// A backend as configured: `ADDR[,weight=N]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    /// The address it resolved to at start (the first, for a name).
    pub addr: SocketAddr,
    pub weight: u32,
    /// `host:port` as given, when `host` is a name rather than an address:
    /// `--resolve-every` looks it up again.
    pub name: Option<String>,
}

impl BackendSpec {
    /// A backend at a fixed address.
    pub fn at(addr: SocketAddr, weight: u32) -> BackendSpec {
        BackendSpec {
            addr,
            weight,
            name: None,
        }
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name}")?,
            None => write!(f, "{}", self.addr)?,
        }
        if self.weight != 1 {
            write!(f, ",weight={}", self.weight)?;
        }
        Ok(())
    }
}

/// Parse `ADDR` or `ADDR,weight=N` for `--backend`.
pub fn parse_backend(s: &str) -> Result<BackendSpec, String> {
    let (addr, weight) = match s.split_once(',') {
        None => (s, 1),
        Some((addr, opt)) => {
            let w = opt
                .strip_prefix("weight=")
                .and_then(|w| w.parse::<u32>().ok())
                .filter(|w| (1..=1000).contains(w))
                .ok_or_else(|| {
                    format!("'{opt}' is not a weight: expected ADDR,weight=N with N from 1 to 1000")
                })?;
            (addr, w)
        }
    };
    let name = addr
        .parse::<SocketAddr>()
        .is_err()
        .then(|| addr.to_string());
    Ok(BackendSpec {
        addr: parse_addr(addr)?,
        weight,
        name,
    })
}

/// Every address `name` (`host:port`) resolves to now.
///
/// Tests can make names resolve as they please, without a lookup ever
/// leaving the machine: with `SPILLWAY_RESOLVE_FILE` set, names are read
/// from that file (lines of `name:port address...`), and a name it does
/// not have fails to resolve.
pub fn resolve_all(name: &str) -> std::io::Result<Vec<SocketAddr>> {
    if let Some(file) = std::env::var_os("SPILLWAY_RESOLVE_FILE") {
        let text = std::fs::read_to_string(file)?;
        let line = text
            .lines()
            .map(str::split_whitespace)
            .find_map(|mut words| (words.next() == Some(name)).then_some(words))
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "not in SPILLWAY_RESOLVE_FILE")
            })?;
        return line
            .map(|a| {
                a.parse()
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            })
            .collect();
    }
    let mut all: Vec<SocketAddr> = name.to_socket_addrs()?.collect();
    all.dedup();
    Ok(all)
}

/// Parse `host:port`, `[v6]:port` or `name:port` (resolved now, first
/// address wins), for the command line.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let expected = "expected host:port, e.g. 127.0.0.1:8080, [::1]:8080 or localhost:8080";
    if !s.contains(':') {
        return Err(format!("'{s}' has no port: {expected}"));
    }
    match resolve_all(s) {
        Ok(addrs) => addrs
            .first()
            .copied()
            .ok_or_else(|| format!("'{s}' resolves to no address: {expected}")),
        Err(e) => Err(format!("'{s}' cannot be resolved ({e}): {expected}")),
    }
}

/// Parse a duration such as `500ms`, `5s`, `2m` or `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let expected = || format!("'{s}' is not a duration: expected e.g. 500ms, 5s, 2m or 1h");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(expected)?;
    let (number, unit) = t.split_at(split);
    let n: u64 = number.parse().map_err(|_| expected())?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(expected()),
    };
    n.checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(expected)
}

/// Parse a size such as `64KiB`, `1MiB`, `1.5GiB`, `10MB` or `4096`: a
/// number, then a unit (`B`, `KB`/`KiB` ... `EB`/`EiB`, case ignored). A
/// value beyond what 64 bits hold is refused, never rounded down to the
/// largest that fits.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let not_a_size = || format!("'{s}' is not a size: expected e.g. 64KiB, 1MiB, 10MB or 4096");
    let t = s.trim();
    let end = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(end);
    let unit = unit.trim_start();
    let factor: u128 = if unit.is_empty() {
        1
    } else {
        let unit: bytesize::Unit = unit.parse().map_err(|_| not_a_size())?;
        u128::from(1u64 * unit)
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    // A fraction of a byte is no size: `--max-disk 0.9` is a typo, not 0.
    let bad_fraction = number.contains('.') && unit.is_empty();
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') || bad_fraction {
        return Err(not_a_size());
    }
    let too_large = || {
        format!(
            "'{s}' is too large: expected at most {} bytes (16EiB - 1), e.g. 1GiB",
            u64::MAX
        )
    };
    // Digits only by now: a whole part that does not parse has overflowed.
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_large())?
    };
    // 10^-20 of the largest unit (2^60) is below a byte: digits past the
    // 20th cannot change a whole number of bytes (and 10^20 * 2^60 still
    // fits a u128).
    let fraction = &fraction[..fraction.len().min(20)];
    let scale = 10u128.pow(fraction.len() as u32);
    let fraction: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().map_err(|_| not_a_size())?
    };
    whole
        .checked_mul(factor)
        .and_then(|w| w.checked_add(fraction * factor / scale))
        .and_then(|bytes| u64::try_from(bytes).ok())
        .ok_or_else(too_large)
}

/// Sizes in logs and tables: `64.0 KiB`.
pub fn show_size(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_addr("127.0.0.1:80").unwrap().port(), 80);
        assert!(parse_addr("[::1]:8080").unwrap().is_ipv6());
        assert_eq!(parse_addr("localhost:81").unwrap().port(), 81);
        assert!(parse_addr("127.0.0.1").unwrap_err().contains("no port"));
        assert!(parse_addr("127.0.0.1:99999").is_err());
        assert!(parse_addr("no-such-host.invalid:80").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        for bad in ["5", "s", "1.5s", "-1s", "5 s", "5sec", ""] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1.5KiB").unwrap(), 1536);
        assert_eq!(parse_size("64 kib").unwrap(), 65536);
        assert_eq!(parse_size("15EiB").unwrap(), 15 << 60);
        assert_eq!(parse_size("18446744073709551615").unwrap(), u64::MAX);
        for bad in [
            "lots", "-1", "", "KiB", ".", "1..5KiB", "1.5.5", "5 KiBs", "0x10",
        ] {
            assert!(parse_size(bad).unwrap_err().contains("not a size"), "{bad}");
        }
    }

    /// A value that does not fit is refused, not saturated to 16EiB.
    #[test]
    fn sizes_that_overflow_are_refused() {
        for big in [
            "99999999999999999999999999KiB",
            "16EiB",
            "18446744073709551616",
            "20000000000000000000B",
            "17179869184GiB",
            "999999999999999999999999999999999999999999999",
        ] {
            let err = parse_size(big).unwrap_err();
            assert!(err.contains("too large"), "{big}: {err}");
        }
    }

    #[test]
    fn validate_names_the_flag() {
        let mut c = Config::default();
        assert_eq!(c.validate().unwrap_err().flag, "--backend");
        c.backends
            .push(BackendSpec::at("127.0.0.1:1".parse().unwrap(), 1));
        c.validate().unwrap();
        c.max_fails = 0;
        assert_eq!(c.validate().unwrap_err().flag, "--max-fails");
        c.max_fails = 1;
        c.connect_timeout = Duration::ZERO;
        assert_eq!(c.validate().unwrap_err().flag, "--connect-timeout");
        c.connect_timeout = DEFAULT_CONNECT_TIMEOUT;
        c.memory_buffer = 10;
        assert_eq!(c.validate().unwrap_err().flag, "--memory-buffer");
        c.memory_buffer = DEFAULT_MEMORY_BUFFER;
        c.spill_after = Duration::from_secs(2);
        assert_eq!(c.validate().unwrap_err().flag, "--spill-after");
        c.spill_after = Duration::ZERO;
        c.validate().unwrap();
        c.temp_dir = "/nonexistent/spillway".into();
        assert_eq!(c.validate().unwrap_err().flag, "--temp-dir");
    }

    #[test]
    fn backend_flags() {
        assert_eq!(parse_backend("127.0.0.1:80").unwrap().weight, 1);
        assert_eq!(parse_backend("127.0.0.1:80,weight=3").unwrap().weight, 3);
        assert!(parse_backend("127.0.0.1:80,weight=0").is_err());
        assert!(
            parse_backend("127.0.0.1:80,w=2")
                .unwrap_err()
                .contains("weight=N")
        );
        assert!(parse_backend("nope,weight=2").is_err());
    }
}
