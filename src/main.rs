//! The command line: parse flags, set up logging, hand over to the library,
//! and turn what went wrong into one line on stderr and an exit code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};

use spillway::config::{
    self, BackendSpec, Config, Mode, Strategy, parse_addr, parse_backend, parse_duration,
    parse_size,
};
use spillway::demo::{self, DemoOptions};
use spillway::logging::{self, LevelFilter, parse_level};
use spillway::proxy_header::Version;

const EXAMPLES: &str = "\
Examples:
  spillway --listen 0.0.0.0:8080 --backend 10.0.0.5:9000
  spillway --listen [::]:8080 --backend app1:9000 --backend app2:9000,weight=2 \\
           --balance least-conn --health-check 2s \\
           --memory-buffer 256KiB --max-spill 4GiB --temp-dir /var/cache/spillway
  spillway demo                       see what it is for, on loopback

SIZE is a byte count with an optional unit: 4096, 64KiB, 1MiB, 10MB, 1GiB.
ADDR is host:port: an IPv4 address, [IPv6], or a name resolved at start.
DUR is a whole number with a unit: 500ms, 5s, 2m, 1h.";

/// A TCP reverse proxy that buffers what slow clients cannot take yet in
/// memory, then on disk, so backends are released as soon as they are done.
#[derive(Parser, Debug)]
#[command(
    name = "spillway",
    version,
    after_help = EXAMPLES,
    subcommand_negates_reqs = true,
    allow_negative_numbers = true
)]
struct Cli {
    /// Address to accept clients on, e.g. 0.0.0.0:8080
    #[arg(long, value_name = "ADDR", value_parser = parse_addr, required = true)]
    listen: Option<SocketAddr>,

    /// Backend to relay to, e.g. 10.0.0.5:9000 or 10.0.0.6:9000,weight=3;
    /// repeat for several
    #[arg(long = "backend", value_name = "ADDR[,weight=N]", value_parser = parse_backend, required = true)]
    backends: Vec<BackendSpec>,

    /// How connections are spread over backends: round-robin (smooth,
    /// weighted), least-conn (fewest active per weight) or random2 (the
    /// less loaded of two random picks)
    #[arg(long, value_name = "STRATEGY", value_parser = Strategy::parse, default_value = "round-robin")]
    balance: Strategy,

    /// How long one connect to a backend may take, e.g. 500ms, 5s, 2m
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "5s")]
    connect_timeout: Duration,

    /// Other backends tried after a failed connect [default: all, once each]
    #[arg(long, value_name = "N")]
    connect_retries: Option<usize>,

    /// Failed connects in a row that take a backend out
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_MAX_FAILS)]
    max_fails: u32,

    /// How long a backend stays out before one connection tries it again
    /// (doubling while it keeps failing, up to 5m)
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "10s")]
    fail_timeout: Duration,

    /// Probe every backend with a TCP connect this often, e.g. 2s [default: off]
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    health_check: Option<Duration>,

    /// In-memory bytes per direction per connection before spilling to disk
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64KiB")]
    memory_buffer: u64,

    /// What a direction carrying bulk (its memory filled, or it spilled) may
    /// grow its memory to, while --max-memory has room; given back when it
    /// empties. Bytes spillway parses (HTTP framing) keep to --memory-buffer.
    /// Equal to --memory-buffer: no growth [default: 1MiB, or
    /// --memory-buffer if larger]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory_buffer_max: Option<u64>,

    /// Bytes waiting on disk per direction per connection; past it, stop
    /// reading from the sender until the receiver catches up
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "1GiB")]
    max_spill: u64,

    /// How long memory may stay full, the receiver not catching up, before
    /// bytes go to disk; meanwhile the sender is not read (backpressure),
    /// so a receiver that keeps up never costs a disk write. 0ms spills at
    /// once; at most 1s
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "5ms")]
    spill_after: Duration,

    /// Client connections held at once; beyond, new clients wait in the
    /// kernel's listen backlog (nothing is accepted and dropped)
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,

    /// Disk all spill files together may occupy (what df sees); past it,
    /// directions that would spill stop reading instead [default: unlimited]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_disk: Option<u64>,

    /// Memory all connections' buffers together may hold (vectors and
    /// pipes); past it, directions that would take more spill to disk, or
    /// where they may not, stop reading [default: unlimited]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_memory: Option<u64>,

    /// Close a connection when no byte has moved either way for this long
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "10m")]
    idle_timeout: Duration,

    /// On SIGTERM/SIGINT, how long connections in flight may finish before
    /// they are cut (a second signal exits at once)
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "30s")]
    shutdown_timeout: Duration,

    /// Event-loop threads, each accepting on its own socket bound to
    /// --listen (SO_REUSEPORT); limits and balancing stay process-wide
    /// [default: the number of cores]
    #[arg(long, value_name = "N")]
    workers: Option<usize>,

    /// Keep a backend that has ended its stream (sent EOF) connected until
    /// the client ends its own, for protocols where the server half-closes
    /// and still reads. Off: the backend is released at once and what the
    /// client sends after that is dropped
    #[arg(long)]
    keep_half_open: bool,

    /// What connections carry: tcp (bytes both ways) or http (HTTP/1.1:
    /// whole requests and responses buffered, backends per request)
    #[arg(long, value_name = "MODE", value_parser = Mode::parse, default_value = "tcp")]
    mode: Mode,

    /// HTTP: larger request bodies get 413; 0: no limit but --memory-buffer
    /// + --max-spill
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "1GiB")]
    max_request_body: u64,

    /// HTTP: a request head larger than this gets 431 (a request line over
    /// 8KiB gets 414)
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "32KiB")]
    max_header_size: u64,

    /// HTTP: the whole request head must arrive within this, else 408
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "60s")]
    client_header_timeout: Duration,

    /// HTTP: longest gap between two reads of a request body, else 408
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "60s")]
    client_body_timeout: Duration,

    /// HTTP: an idle client connection between requests is closed after this
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "75s")]
    keepalive_timeout: Duration,

    /// HTTP: longest wait for a backend's response head (then 504), and
    /// longest gap inside its body (then the client is cut)
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "60s")]
    backend_timeout: Duration,

    /// HTTP: idle backend connections kept per backend per worker for
    /// reuse (least recently used go first); 0: a new one per request
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_UPSTREAM_KEEPALIVE)]
    upstream_keepalive: usize,

    /// Serve Prometheus metrics (GET /metrics) and a health check (GET
    /// /healthz: 200, or 503 while shutting down) here, e.g. 127.0.0.1:9100
    /// [default: off]
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    metrics_listen: Option<SocketAddr>,

    /// Start every backend connection with a PROXY protocol header carrying
    /// the client's address (HAProxy's send-proxy; health checks send
    /// UNKNOWN / LOCAL): v1 (text) or v2 (binary) [default: off]
    #[arg(long, value_name = "VERSION", value_parser = Version::parse)]
    send_proxy: Option<Version>,

    /// Every client connection must start with a PROXY protocol header (v1
    /// or v2), whose address is the client's from then on; one without is
    /// closed and reaches no backend. For spillway behind an L4 balancer
    #[arg(long)]
    accept_proxy: bool,

    /// Resolve backend names again this often, e.g. 30s: new addresses join
    /// the pool with the name's weight, vanished ones take no new
    /// connections [default: off: names are resolved once, at start]
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    resolve_every: Option<Duration>,

    /// Where spill files are created (unnamed: never visible there)
    /// [default: the system temp dir, $TMPDIR or /tmp]
    #[arg(long, value_name = "DIR")]
    temp_dir: Option<PathBuf>,

    /// error|warn|info|debug|trace
    #[arg(long, value_name = "LEVEL", value_parser = parse_level, default_value = "info", global = true)]
    log_level: LevelFilter,

    /// Log to this file instead of stderr (appended to; reopened on SIGHUP)
    #[arg(long, value_name = "PATH", global = true)]
    log_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show on loopback what spillway is for: a backend writes a response,
    /// a slow client reads it, with and without spillway in between
    Demo(DemoArgs),
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Bytes the built-in backend writes
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "32MiB")]
    size: u64,

    /// Bytes per second the client reads
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "4MiB")]
    rate: u64,

    /// The proxy's in-memory bytes per direction before spilling
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64KiB")]
    memory_buffer: u64,

    /// tcp: a backend writes a response, a slow client reads it; http: a
    /// slow upload and a slow keep-alive download to an HTTP backend (use
    /// e.g. --size 8MiB --rate 4MiB)
    #[arg(long, value_name = "MODE", value_parser = Mode::parse, default_value = "tcp")]
    mode: Mode,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("spillway: {}", one_line(&e));
            return ExitCode::from(2);
        }
    };
    if let Err(e) = logging::init(cli.log_level, cli.log_file.as_deref()) {
        let path = cli.log_file.as_deref().unwrap_or("stderr".as_ref());
        eprintln!("spillway: --log-file: cannot open {}: {e}", path.display());
        return ExitCode::from(2);
    }
    match cli.command {
        Some(Command::Demo(args)) => {
            if cli.listen.is_some() || !cli.backends.is_empty() || cli.temp_dir.is_some() {
                eprintln!(
                    "spillway: demo: --listen, --backend and --temp-dir are the proxy's flags; the demo sets up its own"
                );
                return ExitCode::from(2);
            }
            run_demo(args)
        }
        None => serve(cli),
    }
}

fn serve(cli: Cli) -> ExitCode {
    let config = Config {
        listen: cli.listen.expect("clap requires --listen"),
        backends: cli.backends,
        balance: cli.balance,
        connect_timeout: cli.connect_timeout,
        connect_retries: cli.connect_retries,
        max_fails: cli.max_fails,
        fail_timeout: cli.fail_timeout,
        health_check: cli.health_check,
        memory_buffer: cli.memory_buffer,
        memory_buffer_max: cli
            .memory_buffer_max
            .unwrap_or(cli.memory_buffer.max(config::DEFAULT_MEMORY_BUFFER_MAX)),
        max_spill: cli.max_spill,
        spill_after: cli.spill_after,
        temp_dir: cli.temp_dir.unwrap_or_else(std::env::temp_dir),
        max_connections: cli.max_connections,
        max_disk: cli.max_disk,
        max_memory: cli.max_memory,
        idle_timeout: cli.idle_timeout,
        shutdown_timeout: cli.shutdown_timeout,
        workers: cli.workers.unwrap_or_else(config::default_workers),
        keep_half_open: cli.keep_half_open,
        mode: cli.mode,
        max_request_body: cli.max_request_body,
        max_header_size: cli.max_header_size,
        client_header_timeout: cli.client_header_timeout,
        client_body_timeout: cli.client_body_timeout,
        keepalive_timeout: cli.keepalive_timeout,
        backend_timeout: cli.backend_timeout,
        upstream_keepalive: cli.upstream_keepalive,
        metrics_listen: cli.metrics_listen,
        send_proxy: cli.send_proxy,
        accept_proxy: cli.accept_proxy,
        resolve_every: cli.resolve_every,
    };
    let logs_elsewhere = cli.log_file.is_some();
    match spillway::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Always on stderr: when the process will not start, that is
            // where the operator looks; in the log file too if there is one.
            if logs_elsewhere {
                log::error!("{e}");
            }
            eprintln!("spillway: {e}");
            // A bad configuration exits 2, as a bad flag does; anything
            // the system refused exits 1.
            match e.downcast_ref::<spillway::StartError>() {
                Some(spillway::StartError::Config(_)) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn run_demo(args: DemoArgs) -> ExitCode {
    if args.rate == 0 || args.size == 0 {
        eprintln!("spillway: demo: --size and --rate must be above zero");
        return ExitCode::from(2);
    }
    if args.mode == Mode::Http {
        return match spillway::demo_http::run(args.size, args.rate, args.memory_buffer) {
            Ok(report) if report.all_exact() => ExitCode::SUCCESS,
            Ok(_) => {
                eprintln!("spillway: demo: a client got different bytes than the backend sent");
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("spillway: demo: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let opts = DemoOptions {
        size: args.size,
        rate: args.rate,
        memory_buffer: args.memory_buffer,
    };
    match demo::run(&opts) {
        Ok(report) if report.direct.bytes_ok && report.proxied.bytes_ok => ExitCode::SUCCESS,
        Ok(_) => {
            eprintln!("spillway: demo: a client got different bytes than the backend sent");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("spillway: demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// clap's message without its usage and tip lines, folded onto one line:
/// "error: invalid value 'x' for '--memory-buffer <SIZE>': 'x' is not a size: ..."
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    text.lines()
        .take_while(|line| !line.trim().is_empty() && !line.starts_with("Usage:"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}
