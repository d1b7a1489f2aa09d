//! The command line: bad flags are refused with exit code 2 and one line on
//! stderr naming the flag, and the process exits (so nothing is left
//! listening); --help lists every flag; SIGTERM stops a running proxy.

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Run the binary with `args` and wait (bounded) for it to exit.
fn run(args: &[&str]) -> Outcome {
    run_with_fds(args, None)
}

/// `run`, with at most `fd_limit` file descriptors if given.
fn run_with_fds(args: &[&str], fd_limit: Option<u64>) -> Outcome {
    let work = TempDir::new("cli");
    let out_path = work.path().join("stdout");
    let err_path = work.path().join("stderr");
    let mut command = Command::new(bin());
    if let Some(limit) = fd_limit {
        limit_open_files(&mut command, limit);
    }
    let mut child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("spawn spillway");
    let status = match wait_with_deadline(&mut child, EXIT_TIMEOUT) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("spillway {args:?} still running after {EXIT_TIMEOUT:?}");
        }
    };
    let read = |p| {
        let mut s = String::new();
        std::fs::File::open(p)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        s
    };
    Outcome {
        code: status.code(),
        stdout: read(&out_path),
        stderr: read(&err_path),
    }
}

/// `args` must be refused: the process exits within `EXIT_TIMEOUT` (so it
/// leaves nothing listening) with code 2 and exactly one stderr line,
/// starting `spillway: ` and naming `flag`. (Probing the port afterwards
/// would prove nothing more, and could meet another test's listener.)
/// Returns that line.
fn assert_refused(args: &[&str], flag: &str) -> String {
    let out = run(args);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(
        out.code,
        Some(2),
        "spillway {args:?}: exit code; stderr: {}",
        out.stderr
    );
    assert_eq!(
        lines.len(),
        1,
        "spillway {args:?}: one stderr line, got {:?}",
        out.stderr
    );
    assert!(
        lines[0].starts_with("spillway: "),
        "spillway {args:?}: {:?}",
        lines[0]
    );
    assert!(
        lines[0].contains(flag),
        "spillway {args:?}: the error should name {flag}: {:?}",
        lines[0]
    );
    assert!(
        out.stdout.is_empty(),
        "spillway {args:?}: stdout {:?}",
        out.stdout
    );
    lines[0].to_string()
}

/// A valid --listen: any free port on loopback.
const LISTEN: &str = "127.0.0.1:0";

/// A backend address that is syntactically fine (nothing needs to run there).
fn some_backend() -> String {
    dead_addr().to_string()
}

#[test]
fn missing_listen_is_refused() {
    assert_refused(&["--backend", &some_backend()], "--listen");
}

#[test]
fn missing_backend_is_refused() {
    assert_refused(&["--listen", LISTEN], "--backend");
}

#[test]
fn bad_backend_is_refused() {
    for bad in ["127.0.0.1", "127.0.0.1:99999", "127.0.0.1:port", ""] {
        assert_refused(&["--listen", LISTEN, "--backend", bad], "--backend");
    }
}

#[test]
fn bad_listen_is_refused() {
    assert_refused(
        &["--listen", "localhost", "--backend", &some_backend()],
        "--listen",
    );
}

/// `args` followed by each of `bad` in turn must be refused, naming `flag`.
fn assert_each_refused(flag: &str, bad: &[&[&str]]) {
    let backend = some_backend();
    for extra in bad {
        let mut args = vec!["--listen", LISTEN, "--backend", &backend];
        args.extend_from_slice(extra);
        assert_refused(&args, flag);
    }
}

#[test]
fn bad_balancing_flags_are_refused() {
    assert_each_refused("--balance", &[&["--balance", "fastest"]]);
    for flag in ["--connect-timeout", "--fail-timeout", "--health-check"] {
        let no_unit = format!("{flag}=5");
        let zero = format!("{flag}=0s");
        let fraction = format!("{flag}=1.5s");
        assert_each_refused(flag, &[&[&no_unit], &[&zero], &[&fraction]]);
    }
    assert_each_refused(
        "--max-fails",
        &[
            &["--max-fails", "0"],
            &["--max-fails", "10001"],
            &["--max-fails", "many"],
        ],
    );
    assert_each_refused("--connect-retries", &[&["--connect-retries", "-1"]]);
}

#[test]
fn bad_limit_flags_are_refused() {
    assert_each_refused(
        "--max-connections",
        &[&["--max-connections", "0"], &["--max-connections", "lots"]],
    );
    assert_each_refused(
        "--max-disk",
        &[&["--max-disk", "lots"], &["--max-disk", "-1"]],
    );
    assert_each_refused(
        "--memory-buffer-max",
        &[
            &["--memory-buffer-max", "lots"],
            &["--memory-buffer-max", "32KiB"],
            &["--memory-buffer-max", "2GiB"],
        ],
    );
    // Less than one buffer could never hold a byte in memory.
    assert_each_refused(
        "--max-memory",
        &[
            &["--max-memory", "lots"],
            &["--max-memory", "32KiB"],
            &["--max-memory", "1MiB", "--memory-buffer", "2MiB"],
        ],
    );
    assert_each_refused(
        "--idle-timeout",
        &[&["--idle-timeout", "0s"], &["--idle-timeout", "10"]],
    );
    assert_each_refused("--shutdown-timeout", &[&["--shutdown-timeout", "5"]]);
    assert_each_refused(
        "--workers",
        &[
            &["--workers", "0"],
            &["--workers", "257"],
            &["--workers", "two"],
        ],
    );
    assert_each_refused(
        "--spill-after",
        &[
            &["--spill-after", "2s"],
            &["--spill-after", "soon"],
            &["--spill-after", "0.5ms"],
        ],
    );
}

#[test]
fn bad_http_flags_are_refused() {
    assert_each_refused("--mode", &[&["--mode", "udp"], &["--mode", "HTTP"]]);
    assert_each_refused(
        "--max-header-size",
        &[
            &["--max-header-size", "100"],
            &["--max-header-size", "2MiB"],
            &["--max-header-size", "big"],
        ],
    );
    assert_each_refused(
        "--max-request-body",
        &[
            &["--max-request-body", "-1"],
            &["--max-request-body", "1.5"],
        ],
    );
    for flag in [
        "--client-header-timeout",
        "--client-body-timeout",
        "--keepalive-timeout",
        "--backend-timeout",
    ] {
        let zero = format!("{flag}=0s");
        let no_unit = format!("{flag}=60");
        assert_each_refused(flag, &[&[&zero], &[&no_unit]]);
    }
    assert_each_refused(
        "--upstream-keepalive",
        &[
            &["--upstream-keepalive", "10001"],
            &["--upstream-keepalive", "-1"],
        ],
    );
}

/// A bad `--metrics-listen` is refused like any bad flag, and so is one
/// that cannot be bound.
#[test]
fn bad_metrics_listen_is_refused() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let in_use = taken.local_addr().unwrap().to_string();
    assert_each_refused(
        "--metrics-listen",
        &[
            &["--metrics-listen", "9100"],
            &["--metrics-listen", "localhost"],
            &["--metrics-listen", &in_use],
        ],
    );
    assert_each_refused(
        "--send-proxy",
        &[&["--send-proxy", "v3"], &["--send-proxy", "yes"]],
    );
    assert_each_refused(
        "--resolve-every",
        &[&["--resolve-every", "0s"], &["--resolve-every", "often"]],
    );
}

#[test]
fn bad_backend_weight_is_refused() {
    for weight in ["weight=0", "weight=1001", "weight=x", "w=2"] {
        let backend = format!("{},{weight}", some_backend());
        assert_refused(&["--listen", LISTEN, "--backend", &backend], "--backend");
    }
}

#[test]
fn bad_memory_buffer_is_refused() {
    assert_each_refused(
        "--memory-buffer",
        &[
            &["--memory-buffer", "lots"],
            &["--memory-buffer", "64KiBs"],
            &["--memory-buffer=-1"],
            &["--memory-buffer", "-1"],
            // Below the 1KiB minimum and above the 1GiB maximum.
            &["--memory-buffer", "10"],
            &["--memory-buffer", "2GiB"],
        ],
    );
}

#[test]
fn bad_max_spill_is_refused() {
    assert_each_refused(
        "--max-spill",
        &[
            &["--max-spill", "lots"],
            &["--max-spill", "1 parsec"],
            &["--max-spill=-5MiB"],
        ],
    );
}

/// A SIZE that does not fit in 64 bits is refused like any bad value, and
/// the message says why: it used to be saturated, and
/// `--max-spill 99999999999999999999999999KiB` started with 16EiB.
#[test]
fn sizes_that_do_not_fit_are_refused() {
    for flag in [
        "--max-spill",
        "--max-disk",
        "--max-memory",
        "--memory-buffer",
        "--memory-buffer-max",
    ] {
        for value in [
            "99999999999999999999999999KiB",
            "16EiB",
            "18446744073709551616",
        ] {
            let arg = format!("{flag}={value}");
            let line = assert_refused(
                &["--listen", LISTEN, "--backend", &some_backend(), &arg],
                flag,
            );
            assert!(line.contains("too large"), "{arg}: {line:?}");
        }
    }
}

#[test]
fn unusable_temp_dir_is_refused() {
    let work = TempDir::new("cli-temp");
    let file = work.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    assert_each_refused(
        "--temp-dir",
        &[
            &["--temp-dir", "/nonexistent/spillway-test"],
            &["--temp-dir", file.to_str().unwrap()],
        ],
    );
}

#[test]
fn bad_log_level_is_refused() {
    assert_refused(
        &[
            "--listen",
            LISTEN,
            "--backend",
            &some_backend(),
            "--log-level",
            "loud",
        ],
        "--log-level",
    );
}

/// A start-up failure that is the system's, not the operator's (here: no
/// fd left for a listening socket, an epoll instance or a waker) exits 1,
/// with one line saying what could not be had; exit 2 means a bad flag.
#[test]
fn running_out_of_fds_at_start_exits_1() {
    for limit in [4, 5, 6] {
        let args = [
            "--listen",
            LISTEN,
            "--backend",
            &some_backend(),
            "--workers",
            "2",
        ];
        let out = run_with_fds(&args, Some(limit));
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(out.code, Some(1), "{limit} fds: {}", out.stderr);
        assert_eq!(lines.len(), 1, "{limit} fds: {:?}", out.stderr);
        assert!(
            lines[0].starts_with("spillway: cannot start: ")
                && lines[0].contains("Too many open files"),
            "{limit} fds: {:?}",
            lines[0]
        );
    }
}

#[test]
fn listen_on_a_port_in_use_is_refused() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    assert_refused(
        &["--listen", &addr.to_string(), "--backend", &some_backend()],
        "--listen",
    );
    // With a log file too: stderr still gets exactly the one line.
    let work = TempDir::new("cli-log");
    let log = work.path().join("log");
    assert_refused(
        &[
            "--listen",
            &addr.to_string(),
            "--backend",
            &some_backend(),
            "--log-file",
            log.to_str().unwrap(),
        ],
        "--listen",
    );
    // Our listener still owns the port.
    let probe = TcpStream::connect(addr).expect("the test's listener still accepts");
    let accepted = accept_within(&taken, Duration::from_secs(5));
    assert_eq!(accepted.peer_addr().unwrap(), probe.local_addr().unwrap());
}

#[test]
fn help_lists_every_flag() {
    let out = run(&["--help"]);
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    for flag in [
        "--listen",
        "--backend",
        "--balance",
        "--connect-timeout",
        "--connect-retries",
        "--max-fails",
        "--fail-timeout",
        "--health-check",
        "--memory-buffer",
        "--memory-buffer-max",
        "--max-spill",
        "--max-connections",
        "--max-disk",
        "--max-memory",
        "--idle-timeout",
        "--shutdown-timeout",
        "--workers",
        "--spill-after",
        "--temp-dir",
        "--log-level",
        "--log-file",
        "--keep-half-open",
        "--mode",
        "--max-request-body",
        "--max-header-size",
        "--client-header-timeout",
        "--client-body-timeout",
        "--keepalive-timeout",
        "--backend-timeout",
        "--upstream-keepalive",
        "--metrics-listen",
        "--send-proxy",
        "--accept-proxy",
        "--resolve-every",
        "--help",
    ] {
        assert!(
            out.stdout.contains(flag),
            "--help does not mention {flag}:\n{}",
            out.stdout
        );
    }
}

#[test]
fn sigterm_stops_a_running_proxy() {
    let (_backend, backend_addr) = listen();
    let mut proxy = Proxy::start(&[
        "--backend",
        &backend_addr.to_string(),
        "--log-level",
        "debug",
    ]);
    // A connection is open (accepted, its backend connected) when the
    // signal comes.
    let mut client = connect(proxy.addr);
    let client_addr = client.local_addr().unwrap();
    proxy.wait_for_log(&format!("accepted client {client_addr}"), EXIT_TIMEOUT);
    let status = proxy.signal_and_wait(libc::SIGTERM, EXIT_TIMEOUT);
    assert!(status.success(), "exit after SIGTERM: {status}");
    proxy.wait_for_log(" INFO received SIGTERM", Duration::from_secs(1));
    // Nothing was in flight: the connection is closed as quiet, not cut.
    proxy.wait_for_log(
        "shutdown complete: 0 connection(s) finished, 1 closed while quiet, 0 cut",
        Duration::from_secs(1),
    );
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Ok(0) => {}
        other => panic!("the quiet connection should end with EOF: {other:?}"),
    }
}
