//! The proxies under test, configured alike: each is started afresh for
//! every run, from a config written into a directory of its own (config,
//! logs, pid file, temp files), and is stopped with everything it forked
//! when its [`Running`] guard goes, panics included (see `process`).
//!
//! What "alike" means here: the same worker count (one unless a workload
//! says otherwise), the peers' logs off (errors only), 64KiB per direction
//! in memory, and for HTTP proxying the same upstream keep-alive pool
//! ([`UPSTREAM_KEEPALIVE`]). spillway runs as shipped, INFO logs to a file
//! included, unless a row's [`Variant`] says otherwise. The exact texts are
//! in [`Proxy::command`] and the `*_conf` functions; docs/performance.md
//! quotes them.

use std::fmt::Write as _;
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use crate::process::{Kind, Running};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Peer {
    Spillway,
    NginxStream,
    Haproxy,
    /// nginx `http` with `proxy_buffering on`: it reads the whole response
    /// into memory and a temp file as fast as the backend sends, which is
    /// what spillway does for any TCP stream. It needs HTTP, so it is a
    /// peer of the HTTP workloads only (all three are HTTP here).
    NginxHttp,
}

/// The peers in the order their rows are printed.
pub const ALL: [Peer; 4] = [
    Peer::Spillway,
    Peer::NginxStream,
    Peer::Haproxy,
    Peer::NginxHttp,
];

/// Throughput ratios are quoted against the better of these: the TCP
/// proxies spillway replaces.
pub const TCP_PEERS: [Peer; 2] = [Peer::NginxStream, Peer::Haproxy];

/// Idle backend connections an HTTP proxy keeps for reuse: nginx's
/// upstream `keepalive`, spillway's `--upstream-keepalive`, HAProxy's
/// `pool-max-conn`. At least wrk's 50 connections: with 32, nginx opened a
/// new backend connection for about one request in five.
pub const UPSTREAM_KEEPALIVE: usize = 64;

/// How a spillway row differs from spillway as shipped. The peers have one
/// way to run each: they take [`Variant::Shipped`] only.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Variant {
    /// Its defaults: INFO logs (a line per connection in `tcp` mode, per
    /// request in `http` mode), no metrics listener.
    Shipped,
    /// `--log-level warn`: as quiet as the peers, so that the ratio of the
    /// two rows is what the INFO lines cost.
    Warn,
    /// `--metrics-listen` on a free port, scraped while the work runs: the
    /// ratio to [`Variant::Shipped`] is what metrics cost.
    Metrics,
}

/// One proxy row of a table: a peer, and for spillway how it is set up.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Proxy {
    pub peer: Peer,
    pub variant: Variant,
}

/// What a workload asks of every proxy in its table.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Setup {
    pub workers: usize,
    /// Proxy HTTP as HTTP: spillway `--mode http`, HAProxy `mode http`
    /// with `option http-buffer-request`. nginx `http` is the same either
    /// way; nginx `stream` cannot take part.
    pub http: bool,
}

impl Setup {
    pub fn tcp(workers: usize) -> Setup {
        Setup {
            workers,
            http: false,
        }
    }

    pub fn http(workers: usize) -> Setup {
        Setup {
            workers,
            http: true,
        }
    }
}

/// The rows for `peers` (in their order), each peer followed by the
/// spillway `variants` asked for; the peers other than spillway get one
/// row each, as shipped. With `http`, nginx `stream` has no row.
pub fn rows(peers: &[Peer], variants: &[Variant], http: bool) -> Vec<Proxy> {
    let mut out = Vec::new();
    for &peer in peers {
        if http && peer == Peer::NginxStream {
            continue;
        }
        if peer == Peer::Spillway {
            out.extend(variants.iter().map(|&variant| Proxy { peer, variant }));
        } else {
            out.push(Proxy {
                peer,
                variant: Variant::Shipped,
            });
        }
    }
    out
}

impl Peer {
    /// What `--peers` calls it.
    pub fn key(self) -> &'static str {
        match self {
            Peer::Spillway => "spillway",
            Peer::NginxStream => "nginx-stream",
            Peer::Haproxy => "haproxy",
            Peer::NginxHttp => "nginx-http",
        }
    }

    /// The peers named in a `--peers` list (comma-separated keys), in
    /// row order.
    pub fn parse_list(list: &str) -> Result<Vec<Peer>, String> {
        let mut wanted = Vec::new();
        for key in list.split(',') {
            let peer = ALL.into_iter().find(|p| p.key() == key).ok_or_else(|| {
                let keys: Vec<_> = ALL.iter().map(|p| p.key()).collect();
                format!("--peers {list}: {key:?} is none of {}", keys.join(", "))
            })?;
            wanted.push(peer);
        }
        Ok(ALL.into_iter().filter(|p| wanted.contains(p)).collect())
    }

    pub fn name(self) -> &'static str {
        match self {
            Peer::Spillway => "spillway",
            Peer::NginxStream => "nginx stream",
            Peer::Haproxy => "HAProxy tcp",
            Peer::NginxHttp => "nginx http buffering",
        }
    }
}

impl Proxy {
    /// The row's label: the peer, `http` for the HTTP proxies in an HTTP
    /// table, and the variant.
    pub fn label(self, http: bool) -> String {
        let base = match (self.peer, http) {
            (Peer::Spillway, true) => "spillway http",
            (Peer::Haproxy, true) => "HAProxy http",
            (Peer::NginxHttp, true) => "nginx http",
            (peer, _) => peer.name(),
        };
        match self.variant {
            Variant::Shipped => base.to_string(),
            Variant::Warn => format!("{base} warn"),
            Variant::Metrics => format!("{base} +metrics"),
        }
    }

    /// Start this proxy in front of `backend`, in a fresh directory under
    /// `work`, and wait until it accepts connections (and scrapes, with
    /// metrics on).
    pub fn start(self, backend: SocketAddr, setup: Setup, work: &Path) -> Result<Running, String> {
        let dir = fresh_dir(work, self.peer.key())?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let metrics = match self.variant {
            Variant::Metrics => Some(SocketAddr::from(([127, 0, 0, 1], free_port()?))),
            _ => None,
        };
        let (cmd, kind) = self.command(backend, addr, metrics, setup, &dir)?;
        let mut running = Running::spawn(cmd, kind, addr, dir)?;
        running.wait_listening()?;
        if let Some(at) = metrics {
            running.wait_metrics(at)?;
        }
        if self.peer == Peer::NginxHttp {
            // Responses to proxy_temp, request bodies to client_body_temp.
            let temp = ["proxy_temp", "client_body_temp"].map(|d| running.dir.join(d));
            running.watch_temp_files(temp.to_vec());
        }
        Ok(running)
    }

    fn command(
        self,
        backend: SocketAddr,
        addr: SocketAddr,
        metrics: Option<SocketAddr>,
        setup: Setup,
        dir: &Path,
    ) -> Result<(Command, Kind), String> {
        let workers = setup.workers;
        match self.peer {
            Peer::Spillway => {
                let spill = dir.join("spill");
                fs::create_dir_all(&spill).map_err(|e| format!("{}: {e}", spill.display()))?;
                let mut cmd = Command::new(spillway_bin());
                cmd.args(["--listen", &addr.to_string()])
                    .args(["--backend", &backend.to_string()])
                    .args(["--memory-buffer", "64KiB"])
                    .arg("--temp-dir")
                    .arg(&spill)
                    .arg("--log-file")
                    .arg(dir.join("spillway.log"))
                    .args(["--workers", &workers.to_string()]);
                if setup.http {
                    cmd.args(["--mode", "http"])
                        .args(["--upstream-keepalive", &UPSTREAM_KEEPALIVE.to_string()]);
                }
                match self.variant {
                    Variant::Shipped => {}
                    Variant::Warn => {
                        cmd.args(["--log-level", "warn"]);
                    }
                    Variant::Metrics => {
                        let at = metrics.ok_or("a metrics row without a metrics port")?;
                        cmd.args(["--metrics-listen", &at.to_string()]);
                    }
                }
                Ok((cmd, Kind::Spillway))
            }
            Peer::NginxStream => {
                if setup.http {
                    return Err("nginx stream is no HTTP proxy".into());
                }
                let body = format!(
                    "stream {{\n  server {{\n    listen {addr};\n    proxy_pass {backend};\n    proxy_buffer_size 64k;\n  }}\n}}\n"
                );
                let conf = nginx_conf(dir, workers, true, &body);
                Ok((nginx_command(dir, &conf)?, Kind::Nginx))
            }
            Peer::NginxHttp => {
                let conf = nginx_conf(dir, workers, false, &nginx_http_proxy(dir, addr, backend));
                Ok((nginx_command(dir, &conf)?, Kind::Nginx))
            }
            Peer::Haproxy => {
                let haproxy = which("haproxy").ok_or("not installed (apt-get install haproxy)")?;
                let conf = haproxy_conf(addr, backend, setup);
                let path = dir.join("haproxy.cfg");
                fs::write(&path, conf).map_err(|e| format!("{}: {e}", path.display()))?;
                let mut cmd = Command::new(haproxy);
                // -db: stay in the foreground, one process.
                cmd.arg("-f").arg(&path).arg("-db");
                Ok((cmd, Kind::Haproxy))
            }
        }
    }
}

/// nginx's HTTP proxy, buffering both ways, as an HTTP proxy in front of
/// an HTTP backend would be set up:
/// - a response: 64KiB in memory (a 16k buffer for the head and the first
///   bytes, three more of 16k), the rest in a temp file in its directory,
///   up to 2GiB;
/// - a request body: read whole before the backend is chosen
///   (`proxy_request_buffering on`), 64KiB in memory, the rest in a temp
///   file; up to 1GiB, spillway's default `--max-request-body`;
/// - upstream connections kept alive: HTTP/1.1, [`UPSTREAM_KEEPALIVE`]
///   idle ones per worker, none cut after a number of requests;
/// - client connections never cut after a number of requests either
///   (`keepalive_requests`), so wrk's stay up for the whole run.
fn nginx_http_proxy(dir: &Path, addr: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "http {{
  access_log off;
{temp}  keepalive_requests 1000000;
  client_max_body_size 1g;
  client_body_buffer_size 64k;
  upstream backend {{
    server {backend};
    keepalive {UPSTREAM_KEEPALIVE};
    keepalive_requests 1000000;
  }}
  server {{
    listen {addr};
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_buffering on;
      proxy_request_buffering on;
      proxy_buffer_size 16k;
      proxy_buffers 3 16k;
      proxy_busy_buffers_size 32k;
      proxy_max_temp_file_size 2048m;
    }}
  }}
}}
",
        temp = nginx_temp_paths(dir)
    )
}

/// An nginx config: the `main` context every nginx here shares, then `body`
/// (a `stream` or `http` block).
///
/// One worker runs as one process (`master_process off`), as spillway and
/// HAProxy do. Several need the master, which as root would run them as
/// `nobody`, unable to write temp files in this directory: hence `user`.
pub fn nginx_conf(dir: &Path, workers: usize, stream: bool, body: &str) -> String {
    let mut conf = String::new();
    if stream {
        conf.push_str(&stream_module());
    }
    let _ = writeln!(conf, "worker_processes {workers};");
    conf.push_str("daemon off;\n");
    if workers == 1 {
        conf.push_str("master_process off;\n");
    } else if let Some(user) = root_user() {
        let _ = writeln!(conf, "user {user};");
    }
    let _ = writeln!(conf, "pid {};", dir.join("nginx.pid").display());
    let _ = writeln!(conf, "error_log {} warn;", dir.join("error.log").display());
    conf.push_str("events {\n  worker_connections 4096;\n}\n");
    conf.push_str(body);
    conf
}

/// Every temp path an `http` block may create, inside `dir`, so nginx
/// writes nothing outside the bench's work dir.
pub fn nginx_temp_paths(dir: &Path) -> String {
    let mut out = String::new();
    for (directive, sub) in [
        ("client_body_temp_path", "client_body_temp"),
        ("proxy_temp_path", "proxy_temp"),
        ("fastcgi_temp_path", "fastcgi_temp"),
        ("uwsgi_temp_path", "uwsgi_temp"),
        ("scgi_temp_path", "scgi_temp"),
    ] {
        let _ = writeln!(out, "  {directive} {};", dir.join(sub).display());
    }
    out
}

/// Write `conf` into `dir` and return the command that runs it.
pub fn nginx_command(dir: &Path, conf: &str) -> Result<Command, String> {
    let nginx =
        which("nginx").ok_or("not installed (apt-get install nginx libnginx-mod-stream)")?;
    let path = dir.join("nginx.conf");
    fs::write(&path, conf).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut cmd = Command::new(nginx);
    cmd.arg("-c").arg(&path).arg("-p").arg(dir);
    Ok(cmd)
}

/// HAProxy, no `log` line (logs off), 64KiB buffers. In `mode http`:
/// - `option http-buffer-request`: it waits for the request body before
///   choosing a server, as far as one buffer (64KiB) holds;
/// - `http-reuse always`: an idle server connection serves any client's
///   request, as nginx's and spillway's pools do (the default, `safe`,
///   gives every client connection's first request a connection of its
///   own, so with `Connection: close` no connection would ever be reused);
/// - `pool-max-conn` (idle connections to the server, in all):
///   [`UPSTREAM_KEEPALIVE`] per thread, as nginx and spillway keep per
///   worker.
fn haproxy_conf(addr: SocketAddr, backend: SocketAddr, setup: Setup) -> String {
    let workers = setup.workers;
    let (mode, options, server) = if setup.http {
        (
            "http",
            "  option http-buffer-request\n  http-reuse always\n".to_string(),
            format!(" pool-max-conn {}", UPSTREAM_KEEPALIVE * workers),
        )
    } else {
        ("tcp", String::new(), String::new())
    };
    format!(
        "global
  nbthread {workers}
  tune.bufsize 65536
  maxconn 4000
defaults
  mode {mode}
{options}  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen bench
  bind {addr}
  server backend {backend}{server}
"
    )
}

/// Debian builds nginx's stream proxy as a module (libnginx-mod-stream):
/// load it when it is there.
fn stream_module() -> String {
    let module = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
    if module.exists() {
        format!("load_module {};\n", module.display())
    } else {
        String::new()
    }
}

/// The name to give nginx's `user` when the bench runs as root.
fn root_user() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    (unsafe { libc::geteuid() } == 0).then_some("root")
}

fn spillway_bin() -> &'static str {
    // Cargo builds the binary (bench profile) before the bench and says
    // where it put it.
    env!("CARGO_BIN_EXE_spillway")
}

pub fn cores() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn which(name: &str) -> Option<PathBuf> {
    [
        "/usr/sbin",
        "/usr/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
        "/sbin",
    ]
    .iter()
    .map(|d| Path::new(d).join(name))
    .find(|p| p.exists())
}

/// A port nothing listens on now. nginx and HAProxy need one in their
/// config, so the race with another process taking it is accepted.
pub fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

/// A new directory under `work` named after `tag`.
pub fn fresh_dir(work: &Path, tag: &str) -> Result<PathBuf, String> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = work.join(format!("{tag}-{}", SEQ.fetch_add(1, Ordering::Relaxed)));
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}
