//! `--metrics-listen`: what a scrape of the real binary says after real
//! traffic, and `/healthz` through a graceful shutdown.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

const SECS_10: Duration = Duration::from_secs(10);

/// The metrics address, from the start-up line.
fn metrics_addr(proxy: &mut Proxy) -> SocketAddr {
    let line = proxy.wait_for_log(" metrics=", SECS_10);
    let addr = line.rsplit_once(" metrics=").unwrap().1.trim();
    addr.parse()
        .unwrap_or_else(|_| panic!("no metrics address in {line}"))
}

/// GET `path`: (status, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(SECS_10)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: m\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// The value of the sample `name{labels}` (exactly as written) in `text`.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// After 20 connections (one spilling a download), the scrape counts them
/// by outcome, the bytes each way, the spill, the backend's connects, and
/// the hold and client histograms; `/healthz` says 200.
#[test]
fn a_scrape_counts_what_went_through() {
    const SMALL: usize = 20;
    let big = random_bytes(9, 4 * MIB);
    let (listener, backend_addr) = listen();
    let backend = {
        let big = big.clone();
        spawn("backend", move || {
            for i in 0..=SMALL {
                let mut s = accept_within(&listener, SECS_10);
                let mut req = [0u8; 5];
                s.read_exact(&mut req).expect("request");
                if i == SMALL {
                    s.write_all(&big).expect("big");
                } else {
                    s.write_all(b"pong").expect("pong");
                }
            }
        })
    };
    let mut proxy = Proxy::start(&[
        "--backend",
        &backend_addr.to_string(),
        "--metrics-listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--spill-after",
        "0ms",
    ]);
    let metrics = metrics_addr(&mut proxy);
    for _ in 0..SMALL {
        let mut c = connect(proxy.addr);
        c.write_all(b"ping!").unwrap();
        assert_eq!(read_to_eof(&mut c, 64), b"pong");
    }
    let mut slow = connect_small_window(proxy.addr, 64 * KIB);
    slow.write_all(b"ping!").unwrap();
    backend.join(Duration::from_secs(30));
    let got = read_to_eof_varied(&mut slow, big.len(), Duration::from_secs(30));
    assert_bytes_eq("the big one", &got, &big);
    proxy.wait_for_closes(SMALL + 1, SECS_10);
    let started = Instant::now();
    let (status, text) = get(metrics, "/metrics");
    eprintln!("scrape took {:?}", started.elapsed());
    assert_eq!(status, 200, "{text}");
    let done = sample(&text, "spillway_connections_closed_total{outcome=\"done\"}");
    assert_eq!(done, (SMALL + 1) as f64);
    assert_eq!(
        sample(&text, "spillway_bytes_total{direction=\"up\"}"),
        (5 * (SMALL + 1)) as f64
    );
    assert_eq!(
        sample(&text, "spillway_bytes_total{direction=\"down\"}"),
        (4 * SMALL + big.len()) as f64
    );
    assert!(sample(&text, "spillway_spilled_bytes_total{direction=\"down\"}") > 0.0);
    assert_eq!(
        sample(&text, "spillway_spill_events_total{direction=\"down\"}"),
        1.0
    );
    let backend_label = format!("{{backend=\"{backend_addr}\"}}");
    assert_eq!(
        sample(
            &text,
            &format!("spillway_backend_connects_total{backend_label}")
        ),
        (SMALL + 1) as f64
    );
    assert_eq!(
        sample(&text, &format!("spillway_backend_up{backend_label}")),
        1.0
    );
    assert_eq!(
        sample(&text, "spillway_backend_hold_seconds_count"),
        (SMALL + 1) as f64
    );
    assert_eq!(
        sample(&text, "spillway_client_seconds_count"),
        (SMALL + 1) as f64
    );
    assert_eq!(sample(&text, "spillway_connections_open"), 0.0);
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_eq!(get(metrics, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(get(metrics, "/nope").0, 404);
}

/// `/healthz` answers 503 as soon as a graceful shutdown begins (while a
/// connection still finishes), so a balancer in front stops sending.
#[test]
fn healthz_says_503_while_shutting_down() {
    let (listener, backend_addr) = listen();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let backend = spawn("holding backend", move || {
        let mut s = accept_within(&listener, SECS_10);
        s.write_all(b"hi").unwrap();
        let _ = done_rx.recv_timeout(SECS_10);
    });
    let mut proxy = Proxy::start(&[
        "--backend",
        &backend_addr.to_string(),
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let metrics = metrics_addr(&mut proxy);
    let mut c = connect(proxy.addr);
    let mut hi = [0u8; 2];
    c.read_exact(&mut hi).unwrap();
    assert_eq!(get(metrics, "/healthz").0, 200);
    proxy.signal(libc::SIGTERM);
    proxy.wait_for_log("received SIGTERM", SECS_10);
    assert_eq!(get(metrics, "/healthz").0, 503);
    let (_, text) = get(metrics, "/metrics");
    assert_eq!(sample(&text, "spillway_connections_open"), 1.0);
    done_tx.send(()).unwrap();
    backend.join(SECS_10);
    drop(c);
    assert!(proxy.wait_exit(Duration::from_secs(30)).success());
}
