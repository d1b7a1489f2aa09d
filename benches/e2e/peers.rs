//! The proxies under test, configured alike: each is started afresh for
//! every run, from a config written into a directory of its own (config,
//! logs, pid file, temp files), and is stopped with everything it forked
//! when its [`Running`] guard goes, panics included (see `process`).
//!
//! What "alike" means here: the same worker count (one unless a workload
//! says otherwise), logs off or at warnings only, 64KiB per direction in
//! memory. The exact texts are in [`Peer::command`] and the `*_conf`
//! functions; docs/performance.md quotes them.

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

/// Where spillway reads its log level from for a run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Logs {
    /// `--log-level info`: one summary line per connection, which carries
    /// `up_spilled=`/`down_spilled=`. For workloads with few connections.
    PerConnection,
    /// `--log-level warn`: as quiet as the peers' logs, for rps, where a
    /// line per connection would be work the peers do not do.
    Problems,
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

    /// Start this peer in front of `backend`, in a fresh directory under
    /// `work`, and wait until it accepts connections.
    pub fn start(
        self,
        backend: SocketAddr,
        workers: usize,
        logs: Logs,
        work: &Path,
    ) -> Result<Running, String> {
        let dir = fresh_dir(work, self.key())?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let (cmd, kind) = self.command(backend, addr, workers, logs, &dir)?;
        let mut running = Running::spawn(cmd, kind, addr, dir)?;
        running.wait_listening()?;
        if self == Peer::NginxHttp {
            let temp = running.dir.join("proxy_temp");
            running.watch_temp_files(temp);
        }
        Ok(running)
    }

    fn command(
        self,
        backend: SocketAddr,
        addr: SocketAddr,
        workers: usize,
        logs: Logs,
        dir: &Path,
    ) -> Result<(Command, Kind), String> {
        match self {
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
                    .args([
                        "--log-level",
                        match logs {
                            Logs::PerConnection => "info",
                            Logs::Problems => "warn",
                        },
                    ]);
                cmd.args(["--workers", &workers.to_string()]);
                Ok((cmd, Kind::Spillway))
            }
            Peer::NginxStream => {
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
                let conf = haproxy_conf(addr, backend, workers);
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

/// nginx's HTTP proxy, buffering on, with 64KiB in memory per response
/// (a 16k buffer for the head and the first bytes, three more of 16k) and
/// the rest in a temp file in its directory, up to 2GiB. Upstream
/// connections are kept alive (HTTP/1.1, `keepalive 32`), as an HTTP
/// proxy in front of an HTTP backend would be set up.
fn nginx_http_proxy(dir: &Path, addr: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "http {{
  access_log off;
{temp}  keepalive_requests 1000000;
  upstream backend {{
    server {backend};
    keepalive 32;
  }}
  server {{
    listen {addr};
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_buffering on;
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

fn haproxy_conf(addr: SocketAddr, backend: SocketAddr, workers: usize) -> String {
    format!(
        "global
  nbthread {workers}
  tune.bufsize 65536
  maxconn 4000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen bench
  bind {addr}
  server backend {backend}
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
