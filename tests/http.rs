//! `--mode http` through the real binary: requests buffered whole before a
//! backend sees them, responses read from the backend at once and fed to
//! the client at its pace, keep-alive both sides, re-framing, the errors
//! spillway answers itself, and its timeouts. (The table of malformed
//! requests is in `http_strict.rs`.)

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::http::*;
use common::*;

const SECS_10: Duration = Duration::from_secs(10);
const SECS_30: Duration = Duration::from_secs(30);

fn http_proxy(backends: &[&HttpBackend], extra: &[&str]) -> Proxy {
    let mut args = vec!["--mode", "http", "--workers", "1"];
    let addrs: Vec<String> = backends.iter().map(|b| b.arg()).collect();
    for a in &addrs {
        args.push("--backend");
        args.push(a);
    }
    args.extend_from_slice(extra);
    Proxy::start(&args)
}

/// A GET reaches the backend in a head spillway wrote: the client's
/// hop-by-hop fields gone, its address appended to X-Forwarded-For, Host as
/// it was; the response comes back as sent, and one access line says so.
#[test]
fn a_request_reaches_the_backend_in_a_head_we_wrote() {
    let backend = HttpBackend::start(|_| Reply::Bytes(ok(b"hello")));
    let mut proxy = http_proxy(&[&backend], &[]);
    let mut client = Client::connect(proxy.addr);
    let client_addr = client.stream.local_addr().unwrap();
    client.send(
        b"GET /a/b?c=d HTTP/1.1\r\nHost: Example.COM:8080\r\nConnection: keep-alive, X-Drop\r\n\
          X-Drop: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: websocket\r\n\
          X-Forwarded-For: 10.1.1.1\r\nX_Forwarded_For: 6.6.6.6\r\nX-Real-IP: 9.9.9.9\r\n\
          Accept: text/plain\r\n\r\n",
    );
    let resp = client.response(false);
    assert_eq!((resp.status, resp.body.as_slice()), (200, &b"hello"[..]));
    assert!(!resp.closes());
    let got = backend.wait_for_requests(1, SECS_10);
    let g = &got[0];
    assert_eq!(g.line(), "GET /a/b?c=d HTTP/1.1");
    assert_eq!(g.field("host").as_deref(), Some("Example.COM:8080"));
    assert_eq!(g.field("accept").as_deref(), Some("text/plain"));
    for gone in [
        "connection",
        "x-drop",
        "keep-alive",
        "te",
        "upgrade",
        "x_forwarded_for",
    ] {
        assert!(
            g.fields(gone).is_empty(),
            "{gone} reached the backend: {}",
            g.head
        );
    }
    assert_eq!(
        g.fields("x-forwarded-for"),
        ["10.1.1.1, 127.0.0.1"],
        "{}",
        g.head
    );
    assert_eq!(g.field("x-real-ip").as_deref(), Some("127.0.0.1"));
    assert_eq!(g.field("x-forwarded-proto").as_deref(), Some("http"));
    assert!(g.fields("content-length").is_empty(), "no body, no length");
    let line = proxy.wait_for_log("\"GET /a/b?c=d HTTP/1.1\" 200", SECS_10);
    assert!(line.contains(&format!("client={client_addr}")), "{line}");
    assert!(
        line.contains(&format!("backend={}", backend.addr)),
        "{line}"
    );
    eprintln!("{line}");
}

/// Keep-alive with three backends: each request of one client connection
/// is balanced on its own (round-robin a, b, c, a, b, c).
#[test]
fn keep_alive_requests_are_balanced_one_by_one() {
    let a = HttpBackend::named("a");
    let b = HttpBackend::named("b");
    let c = HttpBackend::named("c");
    let proxy = http_proxy(&[&a, &b, &c], &[]);
    let mut client = Client::connect(proxy.addr);
    let mut seen = String::new();
    for _ in 0..6 {
        client.send(&get("/"));
        let resp = client.response(false);
        seen.push_str(std::str::from_utf8(&resp.body).unwrap());
    }
    assert_eq!(seen, "abcabc");
    assert_eq!(
        (a.accepted(), b.accepted(), c.accepted()),
        (1, 1, 1),
        "each backend connection was reused"
    );
}

/// One backend connection serves requests from two client connections, one
/// after the other: it waits idle in the pool between them.
#[test]
fn an_idle_backend_connection_is_reused() {
    let backend = HttpBackend::named("x");
    let proxy = http_proxy(&[&backend], &[]);
    for _ in 0..2 {
        let mut client = Client::connect(proxy.addr);
        client.send(&get("/"));
        assert_eq!(client.response(false).body, b"x");
    }
    let got = backend.wait_for_requests(2, SECS_10);
    assert_eq!((got[0].conn, got[1].conn), (0, 0));
    assert_eq!(backend.accepted(), 1);
}

/// `--upstream-keepalive 0`: a new backend connection per request, and the
/// backend is asked to close.
#[test]
fn no_upstream_keepalive_means_a_connection_per_request() {
    let backend = HttpBackend::named("x");
    let proxy = http_proxy(&[&backend], &["--upstream-keepalive", "0"]);
    let mut client = Client::connect(proxy.addr);
    for _ in 0..3 {
        client.send(&get("/"));
        assert_eq!(client.response(false).body, b"x");
    }
    let got = backend.wait_for_requests(3, SECS_10);
    assert_eq!(backend.accepted(), 3);
    assert!(
        got.iter()
            .all(|g| g.field("connection").as_deref() == Some("close"))
    );
}

/// A slow upload costs the backend nothing until its last byte is in: the
/// backend sees no connection while the client dawdles, then gets the whole
/// request at local speed.
#[test]
fn a_slow_upload_reaches_the_backend_only_when_complete() {
    const SIZE: usize = 2 * MIB;
    let body = random_bytes(7, SIZE);
    let backend = HttpBackend::start(|g| Reply::Bytes(ok(format!("{}", g.body.len()).as_bytes())));
    let mut proxy = http_proxy(&[&backend], &[]);
    let mut client = Client::connect(proxy.addr);
    client
        .send(format!("POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: {SIZE}\r\n\r\n").as_bytes());
    let started = Instant::now();
    let (pieces, last) = body.split_at(SIZE - 128 * KIB);
    for piece in pieces.chunks(128 * KIB) {
        client.send(piece);
        thread::sleep(Duration::from_millis(40));
        // While the upload goes on, the backend must not have been dialled.
        assert_eq!(backend.accepted(), 0, "the backend was dialled mid-upload");
    }
    let last_byte = Instant::now();
    client.send(last);
    let resp = client.response(false);
    assert_eq!(resp.body, SIZE.to_string().as_bytes());
    let got = backend.wait_for_requests(1, SECS_10);
    assert_bytes_eq("the upload at the backend", &got[0].body, &body);
    assert!(
        got[0].accepted_at >= last_byte,
        "dialled before the last byte"
    );
    let held = got[0].complete_at - got[0].accepted_at;
    eprintln!(
        "upload took {:?} from the client; the backend got it in {held:?}",
        last_byte - started
    );
    assert!(
        held < last_byte - started,
        "the backend waited for the client"
    );
    let warned = proxy.wait_for_log(
        "a client request body is buffered to a temporary file",
        SECS_10,
    );
    assert!(warned.contains("WARN"), "{warned}");
}

/// A chunked request is de-chunked while buffered: the backend gets
/// `Content-Length` and never `Transfer-Encoding`; trailers are dropped.
#[test]
fn a_chunked_request_is_reframed_with_a_length() {
    let backend = HttpBackend::start(|_| Reply::Bytes(ok(b"done")));
    let proxy = http_proxy(&[&backend], &[]);
    let mut client = Client::connect(proxy.addr);
    client.send(
        b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n",
    );
    assert_eq!(client.response(false).body, b"done");
    let got = backend.wait_for_requests(1, SECS_10);
    assert_eq!(got[0].body, b"hello world");
    assert_eq!(got[0].field("content-length").as_deref(), Some("11"));
    assert!(got[0].fields("transfer-encoding").is_empty());
    assert!(got[0].fields("x-trailer").is_empty());
}

/// `Expect: 100-continue`: spillway answers it itself, when it starts
/// reading the body, and does not pass it on; over the limit, 413 at once
/// and no 100.
#[test]
fn expect_continue_is_answered_by_the_proxy() {
    let backend = HttpBackend::start(|g| Reply::Bytes(ok(&g.body)));
    let proxy = http_proxy(&[&backend], &["--max-request-body", "1KiB"]);
    let mut client = Client::connect(proxy.addr);
    client.send(b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
    let interim = client.response(false);
    assert_eq!(interim.status, 100);
    client.send(b"abcde");
    let resp = client.response(false);
    assert_eq!((resp.status, resp.body.as_slice()), (200, &b"abcde"[..]));
    let got = backend.wait_for_requests(1, SECS_10);
    assert!(got[0].fields("expect").is_empty());
    let mut big = Client::connect(proxy.addr);
    big.send(b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n");
    let resp = big.response(false);
    assert_eq!(resp.status, 413);
    assert!(resp.closes());
    big.expect_eof();
    assert_eq!(
        backend.got().len(),
        1,
        "nothing of the large one reached the backend"
    );
}

/// No backend reachable: 502. A backend that never answers: 504 after
/// `--backend-timeout`. Both small, framed, closing.
#[test]
fn unreachable_and_silent_backends_give_502_and_504() {
    let dead = dead_addr().to_string();
    let proxy = Proxy::start(&["--mode", "http", "--backend", &dead]);
    let mut client = Client::connect(proxy.addr);
    client.send(&get("/"));
    let resp = client.response(false);
    assert_eq!(resp.status, 502);
    assert!(resp.closes() && resp.field("content-length").is_some());
    client.expect_eof();

    let silent = HttpBackend::start(|_| Reply::Silence);
    let proxy = http_proxy(&[&silent], &["--backend-timeout", "300ms"]);
    let mut client = Client::connect(proxy.addr);
    let sent = Instant::now();
    client.send(&get("/slow"));
    let resp = client.response(false);
    assert_eq!(resp.status, 504);
    assert!(sent.elapsed() >= Duration::from_millis(300));
    client.expect_eof();
}

/// A backend that dies in the middle of a body: the client is reset, so a
/// truncated response never looks complete.
#[test]
fn a_backend_dying_mid_body_cuts_the_client() {
    let backend = HttpBackend::start(|_| {
        let mut r = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec();
        r.extend_from_slice(&[7u8; 5000]);
        Reply::BytesThenReset(r)
    });
    let proxy = http_proxy(&[&backend], &[]);
    let mut client = Client::connect(proxy.addr);
    client.send(&get("/"));
    match client.try_response(false) {
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
            ),
            "{e}"
        ),
        Ok(r) => panic!("a cut response looked complete: {} bytes", r.body.len()),
    }
}

/// A reused backend connection that the backend closes instead of
/// answering: the request is sent again, once, on a new connection, and
/// the client never knows.
#[test]
fn a_reused_connection_that_fails_is_retried_on_a_new_one() {
    let per_conn = Arc::new(Mutex::new(Vec::<usize>::new()));
    let counts = per_conn.clone();
    let backend = HttpBackend::start(move |g| {
        let mut c = counts.lock().unwrap();
        if c.len() <= g.conn {
            c.resize(g.conn + 1, 0);
        }
        c[g.conn] += 1;
        // The first connection answers once, then drops the next request.
        if g.conn == 0 && c[0] == 2 {
            Reply::Close
        } else {
            Reply::Bytes(ok(format!("conn{}", g.conn).as_bytes()))
        }
    });
    let proxy = http_proxy(&[&backend], &[]);
    let mut client = Client::connect(proxy.addr);
    client.send(&post("/1", b"first"));
    assert_eq!(client.response(false).body, b"conn0");
    client.send(&post("/2", b"second"));
    assert_eq!(client.response(false).body, b"conn1");
    let got = backend.wait_for_requests(3, SECS_10);
    assert_eq!(got[1].body, b"second");
    assert_eq!(got[2].body, b"second", "the same request, replayed");
    assert_eq!(backend.accepted(), 2);
}

/// The response framings: chunks passed on to an HTTP/1.1 client, decoded
/// for an HTTP/1.0 one (then close); a body ended by close; HEAD, 204 and
/// 304 without a body.
#[test]
fn responses_are_framed_for_the_client() {
    let backend = HttpBackend::start(|g| {
        let path = g.line().split(' ').nth(1).unwrap().to_string();
        match path.as_str() {
            "/chunked" => Reply::Bytes(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n5;a=b\r\npedia\r\n0\r\nT: 1\r\n\r\n".to_vec(),
            ),
            "/close" => Reply::BytesThenClose(b"HTTP/1.1 200 OK\r\n\r\nuntil the end".to_vec()),
            "/head" => Reply::Bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n".to_vec()),
            "/204" => Reply::Bytes(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()),
            "/304" => Reply::Bytes(b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n".to_vec()),
            _ => Reply::Bytes(ok(b"?")),
        }
    });
    let proxy = http_proxy(&[&backend], &[]);
    let mut client = Client::connect(proxy.addr);
    client.send(&get("/chunked"));
    let r = client.response(false);
    assert_eq!(r.body, b"wikipedia");
    assert_eq!(r.field("transfer-encoding").as_deref(), Some("chunked"));
    client.send(b"HEAD /head HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = client.response(true);
    assert_eq!(
        (r.status, r.field("content-length").as_deref()),
        (200, Some("99"))
    );
    client.send(&get("/204"));
    assert_eq!(client.response(false).status, 204);
    client.send(&get("/304"));
    assert_eq!(client.response(false).status, 304);
    client.send(&get("/close"));
    let r = client.response(false);
    assert_eq!(r.body, b"until the end");
    assert!(r.closes());

    let mut old = Client::connect(proxy.addr);
    old.send(b"GET /chunked HTTP/1.0\r\n\r\n");
    let r = old.response(false);
    assert_eq!(r.body, b"wikipedia");
    assert!(r.field("transfer-encoding").is_none() && r.closes());
}

/// Pipelined requests are answered in order, each in full.
#[test]
fn pipelined_requests_are_answered_in_order() {
    let backend = HttpBackend::start(|g| Reply::Bytes(ok(g.line().as_bytes())));
    let proxy = http_proxy(&[&backend], &[]);
    let mut client = Client::connect(proxy.addr);
    let mut all = Vec::new();
    for i in 0..5 {
        all.extend(post(&format!("/{i}"), format!("body{i}").as_bytes()));
    }
    client.send(&all);
    for i in 0..5 {
        assert_eq!(
            client.response(false).body,
            format!("POST /{i} HTTP/1.1").as_bytes()
        );
    }
    let got = backend.wait_for_requests(5, SECS_10);
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.body, format!("body{i}").as_bytes());
    }
}

/// A slow download: the backend writes 16MiB to a client that reads
/// nothing (64KiB receive window) and is done at once, the response going
/// to disk; the client then gets every byte, and the same connections carry
/// another request.
#[test]
fn a_slow_download_releases_the_backend_at_once() {
    const SIZE: usize = 16 * MIB;
    let data = Arc::new(random_bytes(21, SIZE));
    let (listener, backend_addr) = listen();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let backend = {
        let data = data.clone();
        spawn("backend", move || {
            let mut s = accept_within(&listener, SECS_10);
            let mut buf = vec![0u8; 4096];
            for _ in 0..2 {
                let mut head = Vec::new();
                while find(&head, b"\r\n\r\n").is_none() {
                    let n = std::io::Read::read(&mut s, &mut buf).expect("request");
                    assert!(n > 0, "the proxy closed the backend connection");
                    head.extend_from_slice(&buf[..n]);
                }
                s.write_all(&ok(&data)).expect("backend write");
                done_tx.send(Instant::now()).expect("report");
            }
        })
    };
    let mut proxy = Proxy::start(&[
        "--mode",
        "http",
        "--workers",
        "1",
        "--backend",
        &backend_addr.to_string(),
    ]);
    let mut client = Client::on(connect_small_window(proxy.addr, 64 * KIB));
    let asked = Instant::now();
    client.send(&get("/big"));
    let done = done_rx
        .recv_timeout(SECS_30)
        .expect("the backend wrote 16MiB to a client reading nothing");
    eprintln!("backend done {:?} after the request", done - asked);
    let resp = client.response(false);
    assert_bytes_eq("a slow download", &resp.body, &data);
    client.send(&get("/again"));
    assert_eq!(client.response(false).body.len(), SIZE);
    done_rx.recv_timeout(SECS_10).expect("second response");
    backend.join(SECS_10);
    let line = proxy.wait_for_log("\"GET /big HTTP/1.1\" 200", SECS_10);
    eprintln!("{line}");
    assert!(
        line.contains("down_spilled=") && !line.contains("down_spilled=0 "),
        "{line}"
    );
    let held = field_secs(&line, "backend_held=");
    let total = field_secs(&line, "duration=");
    assert!(
        held < total,
        "the backend was held for the whole response: {line}"
    );
}

/// `backend_held=1.234s` in `line`, as seconds.
fn field_secs(line: &str, key: &str) -> f64 {
    let at = line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len();
    line[at..].split('s').next().unwrap().parse().unwrap()
}

/// Timeouts: a head that does not complete gets 408 (slowloris); a body
/// with a long gap gets 408; an idle keep-alive connection is closed
/// quietly.
#[test]
fn client_timeouts_answer_408_or_close_quietly() {
    let backend = HttpBackend::named("x");
    let proxy = http_proxy(
        &[&backend],
        &[
            "--client-header-timeout",
            "300ms",
            "--client-body-timeout",
            "300ms",
            "--keepalive-timeout",
            "300ms",
        ],
    );
    let mut slow_head = Client::connect(proxy.addr);
    slow_head.send(b"GET / HTTP/1.1\r\nHost: t\r\n");
    let r = slow_head.response(false);
    assert_eq!(r.status, 408);
    slow_head.expect_eof();

    let mut slow_body = Client::connect(proxy.addr);
    slow_body.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc");
    assert_eq!(slow_body.response(false).status, 408);
    slow_body.expect_eof();

    let mut idle = Client::connect(proxy.addr);
    idle.send(&get("/"));
    assert_eq!(idle.response(false).status, 200);
    let quiet = Instant::now();
    idle.expect_eof();
    assert!(quiet.elapsed() >= Duration::from_millis(200));
    assert_eq!(
        backend.got().len(),
        1,
        "no timed-out request reached the backend"
    );
}

/// Bodies over `--max-request-body` get 413 and reach no backend, whether
/// their length is declared or only seen while de-chunking.
#[test]
fn bodies_over_the_limit_get_413() {
    let backend = HttpBackend::named("x");
    let proxy = http_proxy(&[&backend], &["--max-request-body", "1KiB"]);
    let mut declared = Client::connect(proxy.addr);
    declared.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1025\r\n\r\n");
    assert_eq!(declared.response(false).status, 413);
    let mut chunked = Client::connect(proxy.addr);
    let mut req = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        req.extend_from_slice(format!("200\r\n{}\r\n", "z".repeat(512)).as_bytes());
    }
    chunked.send(&req);
    assert_eq!(chunked.response(false).status, 413);
    let mut exact = Client::connect(proxy.addr);
    exact.send(&post("/", &[1u8; 1024]));
    assert_eq!(exact.response(false).status, 200);
    let got = backend.wait_for_requests(1, SECS_10);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body.len(), 1024);
    let _ = std::io::stdout().flush();
}

/// A request whose connect fails moves on to the next backend with its
/// buffered body, as in `tcp` mode.
#[test]
fn a_failed_connect_moves_the_request_to_the_next_backend() {
    let good = HttpBackend::start(|g| Reply::Bytes(ok(&g.body)));
    let dead = dead_addr().to_string();
    let proxy = Proxy::start(&[
        "--mode",
        "http",
        "--workers",
        "1",
        "--backend",
        &dead,
        "--backend",
        &good.arg(),
    ]);
    let body = random_bytes(3, 300 * KIB);
    for _ in 0..2 {
        let mut client = Client::connect(proxy.addr);
        client.send(&post("/x", &body));
        let resp = client.response(false);
        assert_eq!(resp.status, 200);
        assert_bytes_eq("the replayed body", &resp.body, &body);
    }
    assert_eq!(good.got().len(), 2);
}

/// HTTP/1.0 keeps its connection only when it asks, and is told so.
#[test]
fn http_1_0_keeps_alive_only_when_asked() {
    let backend = HttpBackend::named("x");
    let proxy = http_proxy(&[&backend], &[]);
    let mut client = Client::connect(proxy.addr);
    client.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    let r = client.response(false);
    assert_eq!(r.field("connection").as_deref(), Some("keep-alive"));
    client.send(b"GET / HTTP/1.0\r\n\r\n");
    let r = client.response(false);
    assert!(r.closes());
    client.expect_eof();
    let got = backend.wait_for_requests(2, SECS_10);
    assert!(
        got.iter().all(|g| g.line() == "GET / HTTP/1.1"),
        "backends get 1.1"
    );
}

/// A backend that answers before it has read the whole request (a 413 of
/// its own, say): the client gets that answer, and the backend connection
/// is not reused, since the rest of the request may still be in it.
#[test]
fn an_early_answer_is_passed_on_and_its_connection_not_reused() {
    let (listener, addr) = listen();
    let backend = spawn("early backend", move || {
        let mut s = accept_within(&listener, SECS_10);
        let mut buf = vec![0u8; 1024];
        let mut head = Vec::new();
        while find(&head, b"\r\n\r\n").is_none() {
            let n = std::io::Read::read(&mut s, &mut buf).expect("read");
            assert!(n > 0);
            head.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nnope")
            .expect("answer");
        // Read (and drop) the rest until the proxy closes this connection.
        let rest = read_to_eof(&mut s, 64 * MIB);
        rest.len()
    });
    let proxy = Proxy::start(&["--mode", "http", "--backend", &addr.to_string()]);
    let mut client = Client::connect(proxy.addr);
    client.send(&post("/big", &vec![1u8; 16 * MIB]));
    let r = client.response(false);
    assert_eq!((r.status, r.body.as_slice()), (413, &b"nope"[..]));
    backend.join(SECS_30);
}

/// A client that leaves in the middle of its body: nothing reaches a
/// backend.
#[test]
fn a_client_leaving_mid_body_sends_nothing_to_a_backend() {
    let backend = HttpBackend::named("x");
    let mut proxy = http_proxy(&[&backend], &[]);
    let mut client = Client::connect(proxy.addr);
    let client_addr = client.stream.local_addr().unwrap();
    client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nonly part");
    drop(client);
    let closed = proxy.wait_for_log(&format!("closed client={client_addr}"), SECS_10);
    assert!(closed.contains("reason=client closed mid-body"), "{closed}");
    holds_for(Duration::from_millis(200), || {
        assert_eq!(backend.accepted(), 0)
    });
}

/// SIGTERM: a request in flight is finished, with `Connection: close`; an
/// idle keep-alive connection is closed quietly; the process exits 0.
#[test]
fn a_graceful_shutdown_finishes_requests_in_flight() {
    let slow = HttpBackend::start(|_| {
        thread::sleep(Duration::from_millis(500));
        Reply::Bytes(ok(b"late but whole"))
    });
    let mut proxy = http_proxy(&[&slow], &[]);
    let mut idle = Client::connect(proxy.addr);
    idle.send(&get("/first"));
    assert_eq!(idle.response(false).status, 200);
    let mut busy = Client::connect(proxy.addr);
    busy.send(&get("/slow"));
    slow.wait_for_requests(2, SECS_10);
    proxy.signal(libc::SIGTERM);
    let r = busy.response(false);
    assert_eq!(r.body, b"late but whole");
    assert!(r.closes(), "no keep-alive while shutting down");
    busy.expect_eof();
    idle.expect_eof();
    let status = proxy.wait_exit(SECS_30);
    assert!(status.success(), "{status:?}");
}

/// A WebSocket handshake is passed on (`Upgrade` and `Connection:
/// upgrade` only because the client sent them); the backend's 101 makes
/// the connection a relay of bytes both ways.
#[test]
fn an_upgrade_answered_with_101_becomes_a_tunnel() {
    let (listener, addr) = listen();
    let backend = spawn("ws backend", move || {
        let mut s = accept_within(&listener, SECS_10);
        let mut buf = vec![0u8; 4096];
        let mut head = Vec::new();
        while find(&head, b"\r\n\r\n").is_none() {
            let n = std::io::Read::read(&mut s, &mut buf).expect("read");
            assert!(n > 0);
            head.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8(head).unwrap();
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: xyz\r\n\r\nhello from ws",
        )
        .expect("101");
        // Echo until the client closes its side.
        loop {
            let n = std::io::Read::read(&mut s, &mut buf).expect("echo read");
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).expect("echo write");
        }
        shutdown_write(&s);
        head
    });
    let mut proxy = Proxy::start(&["--mode", "http", "--backend", &addr.to_string()]);
    let mut client = Client::connect(proxy.addr);
    let client_addr = client.stream.local_addr().unwrap();
    client.send(
        b"GET /chat HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: abc\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    let r = client.response(false);
    assert_eq!(r.status, 101);
    assert_eq!(r.field("upgrade").as_deref(), Some("websocket"));
    assert_eq!(r.field("sec-websocket-accept").as_deref(), Some("xyz"));
    let mut got = client.leftover().to_vec();
    let frames = random_bytes(5, 300 * KIB);
    client.send(&frames);
    shutdown_write(&client.stream);
    got.extend(read_to_eof(&mut client.stream, 2 * MIB));
    assert_eq!(&got[..13], b"hello from ws");
    assert_bytes_eq("echoed through the tunnel", &got[13..], &frames);
    let head = backend.join(SECS_10);
    assert!(head.contains("Upgrade: websocket\r\n"), "{head}");
    assert!(head.contains("Connection: upgrade\r\n"), "{head}");
    let closed = proxy.wait_for_close(client_addr, SECS_10);
    assert_eq!(closed.reason, "done", "{}", closed.line);
}

/// An upgrade request answered with a plain 200 stays HTTP: what the
/// client sent after it is read as the next request, never tunnelled.
#[test]
fn an_upgrade_answered_with_200_does_not_tunnel() {
    let backend = HttpBackend::start(|g| Reply::Bytes(ok(g.line().as_bytes())));
    let proxy = http_proxy(&[&backend], &[]);
    let mut client = Client::connect(proxy.addr);
    let mut both =
        b"GET /up HTTP/1.1\r\nHost: t\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n".to_vec();
    both.extend_from_slice(b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n");
    client.send(&both);
    assert_eq!(client.response(false).body, b"GET /up HTTP/1.1");
    assert_eq!(client.response(false).body, b"GET /smuggled HTTP/1.1");
    let got = backend.wait_for_requests(2, SECS_10);
    assert_eq!(got[0].field("upgrade").as_deref(), Some("h2c"));
    assert!(got[1].fields("upgrade").is_empty());
    assert_eq!(
        got[1].line(),
        "GET /smuggled HTTP/1.1",
        "a request of its own"
    );
}

/// `X-Accel-Buffering: no` (Server-Sent Events): each event reaches the
/// client as it is sent, nothing is spilled, and the header is removed.
#[test]
fn an_unbuffered_response_streams_without_spilling() {
    let (listener, addr) = listen();
    let (next_tx, next_rx) = std::sync::mpsc::channel::<()>();
    let backend = spawn("sse backend", move || {
        let mut s = accept_within(&listener, SECS_10);
        let mut buf = vec![0u8; 4096];
        let mut head = Vec::new();
        while find(&head, b"\r\n\r\n").is_none() {
            let n = std::io::Read::read(&mut s, &mut buf).expect("read");
            head.extend_from_slice(&buf[..n]);
        }
        s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Accel-Buffering: no\r\n\
              Transfer-Encoding: chunked\r\n\r\n",
        )
        .expect("head");
        for i in 0..3 {
            let event = format!("data: event {i}\n\n");
            s.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes())
                .expect("event");
            // The next only once the client has the last.
            next_rx.recv_timeout(SECS_10).expect("client got it");
        }
        s.write_all(b"0\r\n\r\n").expect("end");
    });
    let proxy = Proxy::start(&[
        "--mode",
        "http",
        "--backend",
        &addr.to_string(),
        "--memory-buffer",
        "1KiB",
    ]);
    let mut client = Client::connect(proxy.addr);
    client.send(&get("/events"));
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    for i in 0..3 {
        let want = format!("data: event {i}\n\n");
        while find(&seen, want.as_bytes()).is_none() {
            let n = std::io::Read::read(&mut client.stream, &mut buf).expect("an event, promptly");
            assert!(n > 0, "closed before event {i}");
            seen.extend_from_slice(&buf[..n]);
        }
        next_tx.send(()).expect("backend alive");
    }
    let text = String::from_utf8_lossy(&seen).to_lowercase();
    assert!(!text.contains("x-accel-buffering"), "{text}");
    assert!(text.contains("text/event-stream"));
    backend.join(SECS_10);
    assert!(proxy.spill_files().is_empty());
    assert!(
        proxy
            .lines_containing("buffered to a temporary file")
            .is_empty(),
        "an unbuffered response spilled"
    );
}
