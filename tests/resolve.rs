//! `--resolve-every`: backend names looked up again, through a resolver
//! the test controls (`SPILLWAY_RESOLVE_FILE`), so that no lookup ever
//! leaves the machine.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use common::*;

const SECS_10: Duration = Duration::from_secs(10);

/// A backend that greets every connection with `name`, then echoes.
struct Greeter {
    addr: std::net::SocketAddr,
    _bg: Bg<()>,
}

fn greeter(name: &'static str) -> Greeter {
    let (listener, addr) = listen();
    listener.set_nonblocking(false).unwrap();
    let bg = spawn("greeter", move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let _ = s.write_all(name.as_bytes());
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Greeter { addr, _bg: bg }
}

/// Which backend a new connection lands on.
fn ask(proxy: &Proxy) -> String {
    let mut c = connect(proxy.addr);
    let mut buf = [0u8; 1];
    c.read_exact(&mut buf).expect("a greeting");
    String::from_utf8(buf.to_vec()).unwrap()
}

/// Write the resolver file atomically (a rename), as a DNS change lands.
fn resolves_to(file: &Path, line: &str) {
    let tmp = file.with_extension("new");
    fs::write(&tmp, format!("{line}\n")).unwrap();
    fs::rename(&tmp, file).unwrap();
}

#[test]
fn a_name_that_moves_is_followed() {
    let a = greeter("A");
    let b = greeter("B");
    let c = greeter("C");
    let work = TempDir::new("resolve");
    let file = work.path().join("names");
    resolves_to(&file, &format!("app.test:8000 {}", a.addr));
    let mut proxy = Proxy::start_with(
        &[
            "--backend",
            "app.test:8000",
            "--resolve-every",
            "100ms",
            "--workers",
            "1",
        ],
        Launch {
            env: vec![("SPILLWAY_RESOLVE_FILE".into(), file.display().to_string())],
            ..Launch::default()
        },
    );
    assert_eq!(ask(&proxy), "A");
    // A connection to A stays open through the change.
    let mut held = connect(proxy.addr);
    let mut greeting = [0u8; 1];
    held.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"A");

    // The name now says B and C: they join, A leaves.
    resolves_to(&file, &format!("app.test:8000 {} {}", b.addr, c.addr));
    proxy.wait_for_log(&format!("{} joined the pool", c.addr), SECS_10);
    let line = proxy.wait_for_log(&format!("backend {} left the pool", a.addr), SECS_10);
    assert!(line.contains(" INFO "), "{line}");
    let mut seen: Vec<String> = (0..4).map(|_| ask(&proxy)).collect();
    seen.sort();
    assert_eq!(
        seen,
        ["B", "B", "C", "C"],
        "round-robin over the new set, A out"
    );
    held.write_all(b"still here").unwrap();
    let mut echo = [0u8; 10];
    held.read_exact(&mut echo).unwrap();
    assert_eq!(
        &echo, b"still here",
        "A's open connection finishes its work"
    );

    // A lookup that fails keeps the last good set, with a WARN.
    resolves_to(&file, "other.test:1 127.0.0.1:1");
    let warn = proxy.wait_for_log("backend app.test:8000: cannot resolve it", SECS_10);
    assert!(
        warn.contains(" WARN ") && warn.contains("keeping its last addresses (2)"),
        "{warn}"
    );
    let mut seen: Vec<String> = (0..2).map(|_| ask(&proxy)).collect();
    seen.sort();
    assert_eq!(seen, ["B", "C"]);
    assert!(
        proxy.lines_containing(" left the pool").len() == 1,
        "a failed lookup changes nothing"
    );
}
