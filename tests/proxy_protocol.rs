//! The PROXY protocol through the real binary: `--send-proxy v1|v2` on
//! backend connections, `--accept-proxy` on client ones (hand-made
//! headers, both versions, IPv4 and IPv6, in pieces, truncated, lying),
//! in tcp and http mode.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use common::http::*;
use common::*;

const SECS_10: Duration = Duration::from_secs(10);

/// What a recording backend got: the PROXY header, then the rest.
type Recorded = (Vec<u8>, Vec<u8>);

/// A backend that reads everything until the client's EOF, and returns it
/// split after the PROXY header, if one came.
fn recording_backend() -> (SocketAddr, Bg<Recorded>) {
    let (listener, addr) = listen();
    let bg = spawn("backend", move || {
        let mut s = accept_within(&listener, SECS_10);
        let mut all = Vec::new();
        s.read_to_end(&mut all).expect("read");
        let split = if all.starts_with(b"PROXY ") {
            all.windows(2)
                .position(|w| w == b"\r\n")
                .map_or(0, |p| p + 2)
        } else if all.starts_with(b"\r\n\r\n\0\r\nQUIT\n") {
            16 + usize::from(u16::from_be_bytes([all[14], all[15]]))
        } else {
            0
        };
        let payload = all.split_off(split);
        (all, payload)
    });
    (addr, bg)
}

/// v2 header bytes for TCP over IPv4, by hand (not by spillway's encoder).
fn v2_ipv4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0x00, 12]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h
}

#[test]
fn send_proxy_v1_and_v2_name_the_client_to_the_backend() {
    for version in ["v1", "v2"] {
        let (backend_addr, backend) = recording_backend();
        let proxy = Proxy::start(&[
            "--backend",
            &backend_addr.to_string(),
            "--send-proxy",
            version,
        ]);
        let mut c = connect(proxy.addr);
        let client = c.local_addr().unwrap();
        c.write_all(b"payload").unwrap();
        shutdown_write(&c);
        let (header, payload) = backend.join(SECS_10);
        assert_eq!(payload, b"payload");
        let expected = if version == "v1" {
            format!(
                "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n",
                client.port(),
                proxy.addr.port()
            )
            .into_bytes()
        } else {
            v2_ipv4(
                [127, 0, 0, 1],
                [127, 0, 0, 1],
                client.port(),
                proxy.addr.port(),
            )
        };
        assert_eq!(header, expected, "{version}");
    }
}

/// `--accept-proxy`: the client's header (v1, v2; IPv4, IPv6; in pieces)
/// names the client everywhere: the close line, and the header spillway
/// sends on with `--send-proxy`.
#[test]
fn accept_proxy_takes_the_client_from_the_header() {
    let mut v6 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v6.extend_from_slice(&[0x21, 0x21, 0x00, 36]);
    let src6: std::net::Ipv6Addr = "2001:db8::7".parse().unwrap();
    let dst6: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
    v6.extend_from_slice(&src6.octets());
    v6.extend_from_slice(&dst6.octets());
    v6.extend_from_slice(&4444u16.to_be_bytes());
    v6.extend_from_slice(&443u16.to_be_bytes());
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (
            b"PROXY TCP4 203.0.113.7 198.51.100.1 5555 80\r\n".to_vec(),
            "203.0.113.7:5555",
            "PROXY TCP4 203.0.113.7 198.51.100.1 5555 80\r\n",
        ),
        (
            v2_ipv4([192, 0, 2, 9], [192, 0, 2, 1], 6000, 8080),
            "192.0.2.9:6000",
            "PROXY TCP4 192.0.2.9 192.0.2.1 6000 8080\r\n",
        ),
        (
            v6,
            "[2001:db8::7]:4444",
            "PROXY TCP6 2001:db8::7 2001:db8::1 4444 443\r\n",
        ),
    ];
    for (header, client, forwarded) in cases {
        let (backend_addr, backend) = recording_backend();
        let mut proxy = Proxy::start(&[
            "--backend",
            &backend_addr.to_string(),
            "--accept-proxy",
            "--send-proxy",
            "v1",
        ]);
        let mut c = connect(proxy.addr);
        c.set_nodelay(true).unwrap();
        // In three pieces: a header may arrive in bits.
        let third = header.len() / 3;
        for piece in [
            &header[..third],
            &header[third..2 * third],
            &header[2 * third..],
        ] {
            c.write_all(piece).unwrap();
            thread::sleep(Duration::from_millis(20));
        }
        c.write_all(b"after the header").unwrap();
        shutdown_write(&c);
        let (sent_on, payload) = backend.join(SECS_10);
        assert_eq!(payload, b"after the header");
        assert_eq!(String::from_utf8(sent_on).unwrap(), forwarded);
        let client: SocketAddr = client.parse().unwrap();
        let closed = proxy.wait_for_close(client, SECS_10);
        assert_eq!(closed.reason, "done", "{}", closed.line);
    }
}

/// No valid header (garbage, a lying family, a bad port, a v2 length too
/// short for its addresses, a truncated header that never completes): the
/// connection is closed, no backend is ever dialled, and the burst is one
/// WARN.
#[test]
fn connections_without_a_valid_header_reach_no_backend() {
    let backend = HttpBackend::named("x");
    let proxy = Proxy::start(&[
        "--backend",
        &backend.arg(),
        "--accept-proxy",
        "--client-header-timeout",
        "300ms",
    ]);
    let mut short_v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    short_v2.extend_from_slice(&[0x21, 0x11, 0x00, 4, 1, 2, 3, 4]);
    let bad: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"PROXY TCP4 ::1 ::1 1 2\r\n".to_vec(),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 80\r\n".to_vec(),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 80\n".to_vec(),
        short_v2,
        b"PROXY TCP4 1.2.3.4 5.6".to_vec(),
    ];
    for bytes in &bad {
        let mut c = connect(proxy.addr);
        c.write_all(bytes).unwrap();
        c.set_read_timeout(Some(SECS_10)).unwrap();
        let mut buf = [0u8; 64];
        match c.read(&mut buf) {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("{:?}: got {n} bytes back", String::from_utf8_lossy(bytes)),
        }
    }
    holds_for(Duration::from_millis(100), || {
        assert_eq!(backend.accepted(), 0)
    });
    let warns = proxy.lines_containing("no valid PROXY protocol header");
    let warn_count = warns.iter().filter(|l| l.contains(" WARN ")).count();
    assert_eq!(warn_count, 1, "one WARN per burst: {warns:#?}");
    assert!(
        proxy.lines_containing(" INFO [conn").is_empty(),
        "no INFO close lines for them"
    );
    // A good one still goes through.
    let mut c = connect(proxy.addr);
    c.write_all(b"PROXY TCP4 10.9.8.7 10.0.0.1 1234 80\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let got = backend.wait_for_requests(1, SECS_10);
    assert_eq!(
        got[0].line(),
        "GET / HTTP/1.1",
        "nothing of the header went on"
    );
}

/// HTTP mode: the header's client is the one X-Forwarded-For and X-Real-IP
/// name; with `--send-proxy` too, an idle backend connection is only reused
/// by the client it was opened for.
#[test]
fn http_mode_uses_the_header_everywhere() {
    let backend = HttpBackend::start(|g| {
        Reply::Bytes(ok(g.field("x-real-ip").unwrap_or_default().as_bytes()))
    });
    let proxy = Proxy::start(&[
        "--mode",
        "http",
        "--workers",
        "1",
        "--backend",
        &backend.arg(),
        "--accept-proxy",
        "--send-proxy",
        "v1",
    ]);
    let ask = |client_ip: &str| {
        let mut c = Client::connect(proxy.addr);
        c.send(format!("PROXY TCP4 {client_ip} 10.0.0.1 40000 80\r\n").as_bytes());
        c.send(&get("/"));
        String::from_utf8(c.response(false).body).unwrap()
    };
    assert_eq!(ask("198.51.100.10"), "198.51.100.10");
    assert_eq!(ask("198.51.100.20"), "198.51.100.20");
    assert_eq!(ask("198.51.100.10"), "198.51.100.10");
    let got = backend.wait_for_requests(3, SECS_10);
    assert_eq!(
        got[0].field("x-forwarded-for").as_deref(),
        Some("198.51.100.10")
    );
    assert_eq!(backend.accepted(), 2, "one backend connection per client");
    assert_eq!(
        got[2].conn, got[0].conn,
        "the first client's connection, reused for it"
    );
}
