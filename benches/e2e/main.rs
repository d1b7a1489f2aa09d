//! End-to-end benchmark: the same work through a direct connection,
//! spillway, and — when installed — nginx `stream` and HAProxy `mode tcp`,
//! side by side in one run, printed as one table of ratios.
//!
//! ```sh
//! apt-get install -y nginx haproxy     # optional peers; skipped if absent
//! cargo bench --bench e2e              # full run
//! cargo bench --bench e2e -- --smoke   # seconds, for CI: checks it works
//! ```
//!
//! So far it measures **bulk**: one connection, 1GiB backend->client as fast
//! as it goes: MB/s and the proxy's CPU-seconds per GiB (all its processes,
//! from /proc). Every peer is configured alike: one worker, logs off, 64KiB
//! per-direction buffers. Each figure is the median of `RUNS` runs.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const RUNS: usize = 3;
const CHUNK: usize = 1 << 20;

struct Options {
    bulk_bytes: u64,
    runs: usize,
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let opts = if smoke {
        Options {
            bulk_bytes: 64 << 20,
            runs: 1,
        }
    } else {
        Options {
            bulk_bytes: 1 << 30,
            runs: RUNS,
        }
    };
    let work = std::env::temp_dir().join(format!("spillway-e2e-{}", std::process::id()));
    fs::create_dir_all(&work).expect("work dir");

    let backend = bulk_backend(opts.bulk_bytes);
    let mut rows = Vec::new();
    rows.push((
        "direct (no proxy)".to_string(),
        measure(&opts, backend, None),
    ));
    for peer in [Peer::Spillway, Peer::NginxStream, Peer::Haproxy] {
        match peer.start(backend, &work) {
            Ok(proxy) => {
                let figures = measure(&opts, proxy.addr, Some(&proxy));
                rows.push((peer.name().to_string(), figures));
            }
            Err(why) => println!("skipped {}: {why}", peer.name()),
        }
    }
    print_table(&opts, &rows);
    let _ = fs::remove_dir_all(&work);
}

/// MB/s and CPU seconds per GiB (None for the direct connection).
#[derive(Clone, Copy)]
struct Figures {
    mb_per_s: f64,
    cpu_s_per_gib: Option<f64>,
}

fn measure(opts: &Options, addr: SocketAddr, proxy: Option<&Running>) -> Figures {
    let mut speeds = Vec::new();
    let mut cpus = Vec::new();
    for _ in 0..opts.runs {
        let cpu_before = proxy.map(Running::cpu_seconds);
        let started = Instant::now();
        let got = read_all(addr);
        let elapsed = started.elapsed().as_secs_f64();
        assert_eq!(got, opts.bulk_bytes, "short read through {addr}");
        speeds.push(got as f64 / elapsed / 1e6);
        if let (Some(p), Some(before)) = (proxy, cpu_before) {
            let gib = got as f64 / (1u64 << 30) as f64;
            cpus.push((p.cpu_seconds() - before) / gib);
        }
    }
    Figures {
        mb_per_s: median(&mut speeds),
        cpu_s_per_gib: (!cpus.is_empty()).then(|| median(&mut cpus)),
    }
}

fn print_table(opts: &Options, rows: &[(String, Figures)]) {
    let direct = rows[0].1.mb_per_s;
    println!(
        "\nbulk: one connection, {} MiB backend->client, median of {} run(s)\n",
        opts.bulk_bytes >> 20,
        opts.runs
    );
    println!(
        "  {:<22} {:>10} {:>10} {:>16}",
        "", "MB/s", "x direct", "CPU s per GiB"
    );
    for (name, f) in rows {
        let cpu = f
            .cpu_s_per_gib
            .map_or("-".to_string(), |c| format!("{c:.2}"));
        println!(
            "  {:<22} {:>10.0} {:>10.2} {:>16}",
            name,
            f.mb_per_s,
            f.mb_per_s / direct,
            cpu
        );
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A backend that writes `bytes` to every connection that asks (one byte),
/// then closes. Connections that ask nothing (readiness probes) get nothing.
fn bulk_backend(bytes: u64) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let mut ask = [0u8; 1];
                if !matches!(stream.read(&mut ask), Ok(1)) {
                    return;
                }
                let chunk = vec![0x5Au8; CHUNK];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    if stream.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            });
        }
    });
    addr
}

/// Read from `addr` until EOF (bounded by a read timeout); bytes read.
fn read_all(addr: SocketAddr) -> u64 {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"G").expect("ask");
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read from {addr}: {e}"),
        }
    }
}

#[derive(Clone, Copy)]
enum Peer {
    Spillway,
    NginxStream,
    Haproxy,
}

struct Running {
    child: Child,
    addr: SocketAddr,
}

impl Running {
    /// User + system CPU of the process and all its children, in seconds.
    fn cpu_seconds(&self) -> f64 {
        let root = self.child.id();
        let tick = 100.0; // USER_HZ on Linux
        let mut total = 0u64;
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // Fields after the command name, which is in parentheses.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let pid: u32 = entry.file_name().to_string_lossy().parse().unwrap_or(0);
            let ppid: u32 = fields.get(1).and_then(|p| p.parse().ok()).unwrap_or(0);
            if pid == root || ppid == root {
                let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
                let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
                total += utime + stime;
            }
        }
        total as f64 / tick
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // nginx's workers outlive a killed master only briefly; reap by port.
    }
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Spillway => "spillway",
            Peer::NginxStream => "nginx 'stream'",
            Peer::Haproxy => "HAProxy 'mode tcp'",
        }
    }

    fn start(self, backend: SocketAddr, work: &Path) -> Result<Running, String> {
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = match self {
            Peer::Spillway => Command::new(env!("CARGO_BIN_EXE_spillway"))
                .args(["--listen", &addr.to_string()])
                .args(["--backend", &backend.to_string()])
                .args(["--memory-buffer", "64KiB", "--log-level", "error"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| e.to_string())?,
            Peer::NginxStream => {
                let nginx = which("nginx").ok_or("not installed (apt-get install nginx)")?;
                let conf = work.join("nginx-stream.conf");
                fs::write(
                    &conf,
                    format!(
                        "{load}worker_processes 1;\ndaemon off;\nmaster_process off;\nerror_log /dev/null crit;\npid {pid};\n\
                         events {{ worker_connections 4096; }}\n\
                         stream {{ server {{ listen {addr}; proxy_pass {backend}; proxy_buffer_size 64k; }} }}\n",
                        pid = work.join("nginx.pid").display(),
                        load = stream_module()
                    ),
                )
                .map_err(|e| e.to_string())?;
                Command::new(nginx)
                    .arg("-c")
                    .arg(&conf)
                    .arg("-p")
                    .arg(work)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .map_err(|e| e.to_string())?
            }
            Peer::Haproxy => {
                let haproxy = which("haproxy").ok_or("not installed (apt-get install haproxy)")?;
                let conf = work.join("haproxy.cfg");
                fs::write(
                    &conf,
                    format!(
                        "global\n  nbthread 1\n  tune.bufsize 65536\n  maxconn 4000\n\
                         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
                         listen bench\n  bind {addr}\n  server backend {backend}\n"
                    ),
                )
                .map_err(|e| e.to_string())?;
                Command::new(haproxy)
                    .arg("-f")
                    .arg(&conf)
                    .arg("-db")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .map_err(|e| e.to_string())?
            }
        };
        let mut running = Running { child, addr };
        wait_listening(addr, &mut running.child)?;
        Ok(running)
    }
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

fn which(name: &str) -> Option<PathBuf> {
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

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("probe port");
    l.local_addr().unwrap().port()
}

/// Wait (bounded) until something accepts on `addr`.
fn wait_listening(addr: SocketAddr, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited at start: {status}"));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Err(format!("not listening on {addr} within 10s"))
}
