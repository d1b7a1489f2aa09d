//! Strictness of `--mode http`, through the real binary: the table of
//! malformed requests, the classic smuggling vectors with a second request
//! behind them, requests cut at every byte, and the head a backend gets.
//!
//! What every refusal must look like: its status, a small answer framed by
//! `Content-Length` with `Connection: close`, then EOF (an orderly close:
//! spillway lingers, so a reset never destroys the answer), an access line
//! `"<request line or ->" <status>`, and not one byte, nor even a
//! connection, at any backend. The bugs these tests found each have a
//! test of their own at the end.

mod common;

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::http::*;
use common::*;

const SECS_10: Duration = Duration::from_secs(10);

/// The request a smuggler hopes a backend reads as its own.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n";

/// The proxy under test, one worker, in front of `backend`.
fn strict_proxy(backend: &HttpBackend, extra: &[&str]) -> Proxy {
    let addr = backend.arg();
    let mut args = vec!["--mode", "http", "--workers", "1", "--backend", &addr];
    args.extend_from_slice(extra);
    Proxy::start(&args)
}

/// A backend that answers 200 with the request line as the body.
fn echo_line_backend() -> HttpBackend {
    HttpBackend::start(|g| Reply::Bytes(ok(g.line().as_bytes())))
}

/// `resp` is one of spillway's own refusals with `status`: small, framed by
/// a `Content-Length` that is right, closing, no chunks.
fn assert_refusal(resp: &Resp, status: u16, what: &str) {
    assert_eq!(resp.status, status, "{what}: {}", resp.head);
    assert!(
        resp.head.starts_with(&format!("HTTP/1.1 {status} ")),
        "{what}: {}",
        resp.head
    );
    assert!(resp.closes(), "{what}: no Connection: close: {}", resp.head);
    let length = resp
        .field("content-length")
        .unwrap_or_else(|| panic!("{what}: no Content-Length: {}", resp.head));
    assert_eq!(
        length.parse::<usize>().ok(),
        Some(resp.body.len()),
        "{what}: Content-Length {length} for a body of {}",
        resp.body.len()
    );
    assert!(resp.field("transfer-encoding").is_none(), "{what}");
    assert!(
        resp.head.len() + resp.body.len() < 512,
        "{what}: an answer of {} bytes",
        resp.head.len() + resp.body.len()
    );
}

/// After the last response, the proxy closes in order: EOF, not a reset,
/// and nothing more.
fn expect_orderly_close(client: &mut Client, what: &str) {
    assert!(
        client.leftover().is_empty(),
        "{what}: bytes after the answer: {:?}",
        String::from_utf8_lossy(client.leftover())
    );
    let mut byte = [0u8; 1];
    match client.stream.read(&mut byte) {
        Ok(0) => {}
        Ok(_) => panic!("{what}: more bytes after the answer"),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
            panic!("{what}: a reset where an orderly close was due")
        }
        Err(e) => panic!("{what}: no EOF: {}", explain(&e)),
    }
}

/// Send `request` on a new connection and check that it is refused whole:
/// the answer, the close, the access line, the close line, and nothing
/// more at the backend, no request and no connection. Returns the client's
/// address.
fn expect_refused(
    proxy: &mut Proxy,
    backend: &HttpBackend,
    request: &[u8],
    status: u16,
    line: &str,
    what: &str,
) -> SocketAddr {
    let backend_before = (backend.accepted(), backend.got().len());
    let mut client = Client::connect(proxy.addr);
    let addr = client.stream.local_addr().expect("local_addr");
    client.send(request);
    let resp = client
        .try_response(false)
        .unwrap_or_else(|e| panic!("{what}: no answer: {}", explain(&e)));
    assert_refusal(&resp, status, what);
    expect_orderly_close(&mut client, what);
    let access = proxy.wait_for_log(
        &format!("\"{line}\" {status} client={addr} backend=- "),
        SECS_10,
    );
    assert!(access.contains(" INFO [conn "), "{what}: {access}");
    drop(client);
    let closed = close_line(proxy, addr);
    assert_eq!(number(&closed, "up_bytes"), 0, "{what}: {closed}");
    assert!(
        closed.contains(&format!(" reason={status} ")),
        "{what}: {closed}"
    );
    assert_eq!(
        (backend.accepted(), backend.got().len()),
        backend_before,
        "{what}: the backend was reached"
    );
    addr
}

/// The summary line of the HTTP connection from `client` (its fields are
/// not those of a TCP one: `requests=`, no spill counts).
fn close_line(proxy: &mut Proxy, client: SocketAddr) -> String {
    let needle = format!(" closed client={client} ");
    proxy.wait_for_line(&format!("closing {client}"), SECS_10, |l| {
        l.contains(" INFO [conn ") && l.contains(&needle)
    })
}

/// The number after ` key=` in `line`.
fn number(line: &str, key: &str) -> u64 {
    let at = line
        .find(&format!(" {key}="))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
        + key.len()
        + 2;
    line[at..]
        .split(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key}= is not a number in {line}"))
}

/// One row of the table: a request, the status it gets, and the request
/// line its access line shows (`-` when the head itself was refused).
struct Bad {
    what: &'static str,
    request: Vec<u8>,
    status: u16,
    line: &'static str,
}

/// Refused on its head.
fn head(what: &'static str, request: impl AsRef<[u8]>, status: u16) -> Bad {
    Bad {
        what,
        request: request.as_ref().to_vec(),
        status,
        line: "-",
    }
}

/// `POST /` with `Transfer-Encoding: chunked`, refused on its `body`.
fn chunks(what: &'static str, body: impl AsRef<[u8]>, status: u16) -> Bad {
    let mut request = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    request.extend_from_slice(body.as_ref());
    Bad {
        what,
        request,
        status,
        line: "POST / HTTP/1.1",
    }
}

/// `GET /` on HTTP/1.1 with Host `t` and `fields` (each ending in CRLF).
fn get_with(fields: &str) -> String {
    format!("GET / HTTP/1.1\r\nHost: t\r\n{fields}\r\n")
}

/// `POST /` on HTTP/1.1 with Host `t` and `fields` (each ending in CRLF).
fn post_with(fields: &str) -> String {
    format!("POST / HTTP/1.1\r\nHost: t\r\n{fields}\r\n")
}

/// The table, one row a line so it reads as one (hence no rustfmt).
#[rustfmt::skip]
fn malformed_table() -> Vec<Bad> {
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(8193 - "GET / HTTP/1.1".len()));
    let mut long_extension = b"1;".to_vec();
    long_extension.extend(std::iter::repeat_n(b'x', 16 * KIB));
    long_extension.extend_from_slice(b"\r\na\r\n0\r\n\r\n");
    let mut split_extensions = Vec::new();
    for _ in 0..3 {
        split_extensions.extend_from_slice(format!("1;{}\r\na\r\n", "e".repeat(6000)).as_bytes());
    }
    split_extensions.extend_from_slice(b"0\r\n\r\n");
    let mut over_limit = b"200\r\n".to_vec();
    over_limit.extend(std::iter::repeat_n(b'z', 0x200));
    over_limit.extend_from_slice(b"\r\n201\r\n");
    over_limit.extend(std::iter::repeat_n(b'z', 0x201));
    over_limit.extend_from_slice(b"\r\n0\r\n\r\n");
    vec![
        // The request line.
        head("two spaces after the method", "GET  / HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        head("a tab for a space", "GET\t/ HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        head("a space before the method", " GET / HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        head("a space after the version", "GET / HTTP/1.1 \r\nHost: t\r\n\r\n", 400),
        head("no version (HTTP/0.9)", "GET /\r\n\r\n", 400),
        head("a lowercase version", "GET / http/1.1\r\nHost: t\r\n\r\n", 400),
        head("HTTP/2.0 in a request line", "GET / HTTP/2.0\r\nHost: t\r\n\r\n", 400),
        head("HTTP/1.10", "GET / HTTP/1.10\r\nHost: t\r\n\r\n", 400),
        head("NUL in the method", b"G\0T / HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        head("a control byte in the method", b"G\x01T / HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        head("'#' in the target", "GET /a#b HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        head("UTF-8 in the target", "GET /caf\u{e9} HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        head("a raw 0xff in the target", b"GET /a\xffb HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        head("DEL in the target", b"GET /a\x7fb HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        head("NUL in the target", b"GET /a\0b HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        head("a relative target", "GET index.html HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        head("'*' for a GET", "GET * HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        head("absolute-form naming another host", "GET http://other/ HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        head("absolute-form with userinfo", "GET http://u@t/ HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        head("absolute-form with no authority", "GET http:///x HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        head("a request line over 8KiB", long_target, 414),
        // Line ends and bytes in the head.
        head("a bare LF ending the request line", "GET / HTTP/1.1\nHost: t\r\n\r\n", 400),
        head("a bare LF ending a field line", "GET / HTTP/1.1\r\nHost: t\nX: y\r\n\r\n", 400),
        head("bare LFs ending the head", "GET / HTTP/1.1\r\nHost: t\n\n", 400),
        head("a bare CR in the request line", "GET /\r HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        head("a bare CR in a field value", get_with("X: a\rb\r\n"), 400),
        head("CR CR LF", "GET / HTTP/1.1\r\r\nHost: t\r\n\r\n", 400),
        head("NUL in a field value", get_with("X: a\0b\r\n"), 400),
        head("0x01 in a field value", get_with("X: a\x01b\r\n"), 400),
        head("a vertical tab in a field value", get_with("X: a\x0bb\r\n"), 400),
        head("a form feed in a field value", get_with("X: a\x0cb\r\n"), 400),
        head("DEL in a field value", get_with("X: a\x7fb\r\n"), 400),
        head("ESC in a field value", get_with("X: \x1b[31m\r\n"), 400),
        head("NUL in a field name", get_with("X\0Y: z\r\n"), 400),
        head("obs-fold", get_with("X: a\r\n b\r\n"), 400),
        head("obs-fold with a tab", get_with("X: a\r\n\tb\r\n"), 400),
        head("obs-fold on the first field line", "GET / HTTP/1.1\r\n Host: t\r\n\r\n", 400),
        head("a space before the colon", "GET / HTTP/1.1\r\nHost : t\r\n\r\n", 400),
        head("a tab before the colon", "GET / HTTP/1.1\r\nHost\t: t\r\n\r\n", 400),
        head("an empty field name", get_with(": x\r\n"), 400),
        head("a field line without a colon", get_with("just words\r\n"), 400),
        head("'(' in a field name", get_with("X(y): z\r\n"), 400),
        // Host (RFC 9112 §3.2).
        head("no Host on HTTP/1.1", "GET / HTTP/1.1\r\n\r\n", 400),
        head("Host twice", get_with("Host: t\r\n"), 400),
        head("Host twice, other case", get_with("host: u\r\n"), 400),
        head("an empty Host", "GET / HTTP/1.1\r\nHost:\r\n\r\n", 400),
        head("a space inside Host", "GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
        head("a slash in Host", "GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
        head("userinfo in Host", "GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", 400),
        head("a port that is not digits", "GET / HTTP/1.1\r\nHost: a:80x\r\n\r\n", 400),
        head("an unclosed IPv6 literal", "GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", 400),
        head("a Host on HTTP/1.0 that is invalid", "GET / HTTP/1.0\r\nHost: a b\r\n\r\n", 400),
        // Content-Length.
        head("Content-Length with Transfer-Encoding", post_with("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"), 400),
        head("Content-Length: 0 with chunked", post_with("Content-Length: 0\r\nTransfer-Encoding: chunked\r\n"), 400),
        head("Content-Length: +5", post_with("Content-Length: +5\r\n"), 400),
        head("Content-Length: -1", post_with("Content-Length: -1\r\n"), 400),
        head("Content-Length: 1 000", post_with("Content-Length: 1 000\r\n"), 400),
        head("Content-Length: 5,5", post_with("Content-Length: 5,5\r\n"), 400),
        head("Content-Length: 5, 5", post_with("Content-Length: 5, 5\r\n"), 400),
        head("Content-Length: 0x10", post_with("Content-Length: 0x10\r\n"), 400),
        head("Content-Length: 5e2", post_with("Content-Length: 5e2\r\n"), 400),
        head("a Content-Length that overflows", post_with("Content-Length: 99999999999999999999\r\n"), 400),
        head("a Content-Length of 2^64", post_with("Content-Length: 18446744073709551616\r\n"), 400),
        head("an empty Content-Length", post_with("Content-Length:\r\n"), 400),
        head("Content-Length twice, same value", post_with("Content-Length: 5\r\nContent-Length: 5\r\n"), 400),
        head("Content-Length twice, other values", post_with("Content-Length: 0\r\nContent-Length: 5\r\n"), 400),
        // Transfer-Encoding.
        head("Transfer-Encoding on HTTP/1.0", "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        head("chunked, then gzip", post_with("Transfer-Encoding: chunked, gzip\r\n"), 400),
        head("chunked, then identity on a line of its own", post_with("Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n"), 400),
        head("chunked twice in one field", post_with("Transfer-Encoding: chunked, chunked\r\n"), 400),
        head("chunked on two lines", post_with("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"), 400),
        head("an empty coding in the list", post_with("Transfer-Encoding: chunked,\r\n"), 400),
        head("an empty Transfer-Encoding", post_with("Transfer-Encoding:\r\n"), 400),
        head("a quoted chunked", post_with("Transfer-Encoding: \"chunked\"\r\n"), 400),
        head("gzip alone", post_with("Transfer-Encoding: gzip\r\n"), 501),
        head("gzip, then chunked", post_with("Transfer-Encoding: gzip, chunked\r\n"), 501),
        head("identity", post_with("Transfer-Encoding: identity\r\n"), 501),
        head("xchunked", post_with("Transfer-Encoding: xchunked\r\n"), 501),
        // Methods and expectations.
        head("CONNECT", "CONNECT t:443 HTTP/1.1\r\nHost: t:443\r\n\r\n", 405),
        head("TRACE", "TRACE / HTTP/1.1\r\nHost: t\r\n\r\n", 405),
        head("an Expect other than 100-continue", get_with("Expect: 200-ok\r\n"), 417),
        head("an Expect other than 100-continue on HTTP/1.0", "GET / HTTP/1.0\r\nExpect: x\r\n\r\n", 417),
        // Sizes (the proxy runs with --max-request-body 1KiB).
        head("a head over --max-header-size", get_with(&format!("X: {}\r\n", "h".repeat(33 * KIB))), 431),
        head("an unfinished head over --max-header-size", format!("GET / HTTP/1.1\r\nX: {}", "h".repeat(33 * KIB)), 431),
        head("129 header fields", get_with(&"X-A: 1\r\n".repeat(128)), 431),
        Bad {
            what: "a Content-Length over --max-request-body",
            request: post_with("Content-Length: 1025\r\n").into_bytes(),
            status: 413,
            line: "POST / HTTP/1.1",
        },
        chunks("chunks adding up to more than --max-request-body", over_limit, 413),
        // Chunked framing.
        chunks("a chunk size over 16 hex digits", "00000000000000001\r\na\r\n0\r\n\r\n", 400),
        chunks("a chunk size that overflows", "10000000000000001\r\na\r\n0\r\n\r\n", 400),
        chunks("a chunk size that is not hex", "zz\r\n", 400),
        chunks("a chunk size with 0x", "0x1\r\na\r\n0\r\n\r\n", 400),
        chunks("a chunk size with a sign", "+1\r\na\r\n0\r\n\r\n", 400),
        chunks("a chunk size with leading spaces", " 1\r\na\r\n0\r\n\r\n", 400),
        chunks("a chunk size with a trailing space and no extension", "1 \r\na\r\n0\r\n\r\n", 400),
        chunks("an empty chunk size line", "\r\n", 400),
        chunks("a bare LF after a chunk size", "1\na\r\n0\r\n\r\n", 400),
        chunks("a bare CR after a chunk size", "1\ra\r\n0\r\n\r\n", 400),
        chunks("a bare LF after chunk data", "1\r\na\n0\r\n\r\n", 400),
        chunks("no CRLF after chunk data", "1\r\nab\r\n0\r\n\r\n", 400),
        chunks("0 LF LF ending the body", "1\r\na\r\n0\n\n", 400),
        chunks("0 CRLF LF ending the body", "1\r\na\r\n0\r\n\n", 400),
        chunks("a bare LF in a trailer", "0\r\nX: a\nY: b\r\n\r\n", 400),
        chunks("a control byte in a trailer", "0\r\nX: a\x01\r\n\r\n", 400),
        chunks("trailers over --max-header-size", format!("0\r\nX: {}\r\n\r\n", "t".repeat(40 * KIB)), 400),
        chunks("a LF inside a chunk extension", "2;\nxx\r\n0\r\n\r\n", 400),
        chunks("NUL inside a chunk extension", b"1;a\0\r\na\r\n0\r\n\r\n", 400),
        chunks("a chunk extension over 16KiB", long_extension, 400),
        chunks("chunk extensions over 16KiB in all", split_extensions, 400),
    ]
}

/// The table of malformed requests: each is refused with its status, in a
/// small framed closing answer, then EOF; each has its access line; and no
/// backend ever sees a byte or a connection.
#[test]
fn malformed_requests_are_refused_whole_and_reach_no_backend() {
    let backend = echo_line_backend();
    let mut proxy = strict_proxy(&backend, &["--max-request-body", "1KiB"]);
    let table = malformed_table();
    for case in &table {
        expect_refused(
            &mut proxy,
            &backend,
            &case.request,
            case.status,
            case.line,
            case.what,
        );
    }
    // Nothing reached a backend late either.
    holds_for(Duration::from_millis(200), || {
        assert_eq!(backend.accepted(), 0, "the backend was dialled");
    });
    assert!(backend.got().is_empty());
    eprintln!("{} malformed requests refused", table.len());
}

/// `SMUGGLED` as one chunk, then the last chunk: what a parser that reads
/// this body as chunked takes for data.
fn smuggled_in_a_chunk() -> String {
    format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len())
}

/// The classic vectors, each with a whole second request where a lenient
/// parser (front or back) would find one: refused with a close, and the
/// backend never dialled. (Reading both framings as spillway does, every
/// one of these is ambiguous or malformed.) One row a line, hence no rustfmt.
#[rustfmt::skip]
fn refused_vectors() -> Vec<Bad> {
    let s = SMUGGLED;
    let n = s.len();
    let chunk = smuggled_in_a_chunk();
    let post = |fields: &str, body: &str| format!("POST / HTTP/1.1\r\nHost: t\r\n{fields}\r\n{body}");
    let te_cl = |te: &str| post(&format!("{te}\r\nContent-Length: 4\r\n"), &chunk);
    vec![
        head("CL.TE: the length ends after the smuggled request, chunks before it", post(&format!("Content-Length: {}\r\nTransfer-Encoding: chunked\r\n", 5 + n), &format!("0\r\n\r\n{s}")), 400),
        head("TE.CL: the chunk holds the smuggled request, the length stops before it", post("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", &chunk), 400),
        head("TE.CL, Transfer-Encoding first", te_cl("Transfer-Encoding: chunked"), 400),
        head("TE.TE: a space before the colon", te_cl("Transfer-Encoding : chunked"), 400),
        head("TE.TE: xchunked", te_cl("Transfer-Encoding: xchunked"), 400),
        head("TE.TE: a tab before chunked", te_cl("Transfer-Encoding:\tchunked"), 400),
        head("TE.TE: a vertical tab before chunked", te_cl("Transfer-Encoding:\x0bchunked"), 400),
        head("TE.TE: chunked folded onto the next line", te_cl("Transfer-Encoding:\r\n chunked"), 400),
        head("TE.TE: the field behind a bare LF", te_cl("X: y\nTransfer-Encoding: chunked"), 400),
        head("TE.TE: NUL after chunked", te_cl("Transfer-Encoding: chunked\0"), 400),
        head("TE.TE: chunked in quotes", te_cl("Transfer-Encoding: \"chunked\""), 400),
        head("TE.TE: gzip, chunked (and a length)", te_cl("Transfer-Encoding: gzip, chunked"), 400),
        head("TE.TE: chunked twice, no length", post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", &chunk), 400),
        head("TE.TE: chunked, then a bogus coding", post("Transfer-Encoding: chunked\r\nTransfer-Encoding: cow\r\n", &chunk), 400),
        head("TE.TE: gzip, chunked alone", post("Transfer-Encoding: gzip, chunked\r\n", &chunk), 501),
        head("Transfer-Encoding on HTTP/1.0", format!("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}"), 400),
        head("Transfer-Encoding and a length on HTTP/1.0", format!("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{chunk}"), 400),
        head("Content-Length twice: 0, then the smuggled request's", post(&format!("Content-Length: 0\r\nContent-Length: {n}\r\n"), s), 400),
        head("Content-Length as a list", post(&format!("Content-Length: {n}, {n}\r\n"), s), 400),
        head("Content-Length: 0 with chunks", post("Content-Length: 0\r\nTransfer-Encoding: chunked\r\n", &chunk), 400),
        chunks("a LF inside a chunk extension", format!("2;\nxx\r\n{chunk}"), 400),
        chunks("a LF ending a chunk extension, the chunk sized for the smuggled request", format!("{n:x};x\n{s}\r\n0\r\n\r\n"), 400),
        chunks("0 LF LF ending the body", format!("1\r\na\r\n0\n\n{s}"), 400),
        chunks("0 CRLF LF ending the body", format!("0\r\n\n{s}"), 400),
        chunks("a chunk size with leading spaces", format!(" {n:x}\r\n{s}\r\n0\r\n\r\n"), 400),
        chunks("a chunk size of 17 digits whose low 64 bits are 0", format!("10000000000000000\r\n\r\n{s}"), 400),
        chunks("a chunk size of 17 digits whose low 64 bits are the smuggled length", format!("1{n:016x}\r\n{s}\r\n0\r\n\r\n"), 400),
        chunks("a chunk size in 0x form", format!("0x{n:x}\r\n{s}\r\n0\r\n\r\n"), 400),
        chunks("chunk data longer than its size", format!("3\r\nabc{s}\r\n0\r\n\r\n"), 400),
        chunks("a bare CR ending a chunk size", format!("{n:x}\r{s}\r\n0\r\n\r\n"), 400),
        chunks("a bare LF ending a chunk size", format!("{n:x}\n{s}\r\n0\r\n\r\n"), 400),
        chunks("a bare LF ending chunk data", format!("1\r\na\n0\r\n\r\n{s}"), 400),
        chunks("a bare LF in the trailer section", format!("0\r\nX: y\n\r\n{s}"), 400),
    ]
}

/// Vectors a strict parser reads one way only: each is served, its body is
/// exactly what that reading says, and the backend gets one request, with a
/// length we counted, and none named `/smuggled`. One row a line.
#[rustfmt::skip]
fn served_vectors() -> Vec<(&'static str, String, String)> {
    let s = SMUGGLED;
    let n = s.len();
    let chunk = smuggled_in_a_chunk();
    let post = |fields: &str, body: &str| format!("POST / HTTP/1.1\r\nHost: t\r\n{fields}\r\n{body}");
    vec![
        ("a tab before chunked, no length", post("Transfer-Encoding:\tchunked\r\n", &chunk), s.into()),
        ("CHUNKED in capitals", post("Transfer-Encoding: CHUNKED\r\n", &chunk), s.into()),
        ("spaces after chunked", post("Transfer-Encoding: chunked  \r\n", &chunk), s.into()),
        ("Transfer_Encoding, with an underscore, and a length over all", post(&format!("Content-Length: {}\r\nTransfer_Encoding: chunked\r\n", 5 + n), &format!("0\r\n\r\n{s}")), format!("0\r\n\r\n{s}")),
        ("Content_Length, with an underscore, on chunks", post("Content_Length: 0\r\nTransfer-Encoding: chunked\r\n", &chunk), s.into()),
        ("a GET with a body by Content-Length", format!("GET / HTTP/1.1\r\nHost: t\r\nContent-Length: {n}\r\n\r\n{s}"), s.into()),
        ("trailers that name framing fields", post("Transfer-Encoding: chunked\r\n", &format!("{n:x}\r\n{s}\r\n0\r\nContent-Length: 0\r\nTransfer-Encoding: x\r\n\r\n")), s.into()),
        ("a quoted chunk extension holding what looks like a chunk", post("Transfer-Encoding: chunked\r\n", &format!("{n:x};a=\"0;b\"\r\n{s}\r\n0\r\n\r\n")), s.into()),
    ]
}

/// Smuggling: the classic vectors with a whole `GET /smuggled` where a
/// lenient parser would find it. The ambiguous and malformed ones are
/// refused with a close before any backend is dialled; the rest are served
/// with exactly the body a strict reading gives. No backend ever sees
/// `/smuggled` as a request, and the proxy never logs one.
#[test]
fn smuggling_vectors_never_put_a_request_before_a_backend() {
    let untouched = echo_line_backend();
    let mut proxy = strict_proxy(&untouched, &[]);
    let refused = refused_vectors();
    for case in &refused {
        expect_refused(
            &mut proxy,
            &untouched,
            &case.request,
            case.status,
            case.line,
            case.what,
        );
    }
    assert!(proxy.lines_containing("/smuggled").is_empty());

    let backend = echo_line_backend();
    let proxy = strict_proxy(&backend, &[]);
    let served = served_vectors();
    for (what, request, body) in &served {
        let before = backend.got().len();
        let mut client = Client::connect(proxy.addr);
        client.send(request.as_bytes());
        let resp = client.response(false);
        assert_eq!(resp.status, 200, "{what}: {}", resp.head);
        let got = backend.wait_for_requests(before + 1, SECS_10);
        let g = &got[before];
        assert_bytes_eq(what, &g.body, body.as_bytes());
        assert_eq!(
            g.fields("content-length"),
            [body.len().to_string()],
            "{what}: {}",
            g.head
        );
        for framing in ["transfer-encoding", "transfer_encoding", "content_length"] {
            assert!(g.fields(framing).is_empty(), "{what}: {}", g.head);
        }
        // Nothing else came on this connection, and it is still open.
        holds_for(Duration::from_millis(50), || {
            assert_eq!(backend.got().len(), before + 1, "{what}: a second request");
        });
        client.send(&get("/after"));
        assert_eq!(
            client.response(false).body,
            b"GET /after HTTP/1.1",
            "{what}"
        );
    }
    for g in backend.got() {
        assert!(!g.line().contains("/smuggled"), "{}", g.head);
    }
    assert!(proxy.lines_containing("/smuggled").is_empty());
    eprintln!(
        "{} vectors refused, {} served strictly",
        refused.len(),
        served.len()
    );
}

/// The probe the cuts rely on sees bytes the peer has not read, and sees
/// them go when it reads them (were it blind, every cut below would be the
/// whole request in one read, and prove nothing).
#[test]
fn the_probe_for_unread_bytes_sees_them() {
    let (listener, addr) = listen();
    let mut writer = connect(addr);
    let mut reader = accept_within(&listener, SECS_10);
    writer.write_all(b"0123456789").expect("write");
    let (near, far) = (reader.local_addr().unwrap(), reader.peer_addr().unwrap());
    wait_until("10 bytes queued", SECS_10, || {
        tcp_receive_queue(near, far) == Some(10)
    });
    let mut five = [0u8; 5];
    reader.read_exact(&mut five).expect("read");
    assert_eq!(tcp_receive_queue(near, far), Some(5));
    reader.read_exact(&mut five).expect("read");
    wait_until_peer_has_read(&writer, SECS_10);
    assert_eq!(tcp_receive_queue(far, near), Some(0), "the other way");
    assert_eq!(tcp_receive_queue(near, dead_addr()), None, "no such socket");
}

/// Send `bytes` cut at `cut`: the first part, then, once the proxy has
/// read all of it (so the rest comes in reads of its own), the rest.
fn send_cut(client: &mut Client, bytes: &[u8], cut: usize) {
    client.send(&bytes[..cut]);
    wait_until_peer_has_read(&client.stream, SECS_10);
    client.send(&bytes[cut..]);
}

/// Two pipelined requests, one chunked (with an extension, a chunk of one
/// space and a trailer) and one with a `Content-Length` body, cut at every
/// byte offset in turn: the backend gets the same head and body bytes for
/// every cut as for the whole. (A connection per cut: on one kept alive,
/// the proxy's kernel soon delays its ACKs, and waiting for each would
/// cost 40ms a cut.)
#[test]
fn requests_cut_at_every_byte_reach_the_backend_as_the_same_bytes() {
    let backend = echo_line_backend();
    let proxy = strict_proxy(&backend, &[]);
    let stream: Vec<u8> = [
        &b"POST /split?q=1 HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\
           X-A: b\r\n\r\n5;e=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nT: x\r\n\r\n"[..],
        &b"PUT /cl HTTP/1.1\r\nHost: example.test\r\nContent-Length: 11\r\n\r\nhello world"[..],
    ]
    .concat();
    let exchange = |cut: usize| -> Vec<Got> {
        let before = backend.got().len();
        let mut client = Client::connect(proxy.addr);
        send_cut(&mut client, &stream, cut);
        assert_eq!(
            client.response(false).body,
            b"POST /split?q=1 HTTP/1.1",
            "cut {cut}"
        );
        assert_eq!(
            client.response(false).body,
            b"PUT /cl HTTP/1.1",
            "cut {cut}"
        );
        // The backend records a request before it answers it.
        let got = backend.got()[before..].to_vec();
        assert_eq!(got.len(), 2, "cut {cut}");
        got
    };
    let whole = exchange(0);
    assert_eq!(whole[0].body, b"hello world");
    assert_eq!(whole[1].body, b"hello world");
    let started = Instant::now();
    for cut in 1..stream.len() {
        let got = exchange(cut);
        for (g, w) in got.iter().zip(&whole) {
            assert_bytes_eq(&format!("head, cut at {cut}"), &g.head_bytes, &w.head_bytes);
            assert_bytes_eq(&format!("body, cut at {cut}"), &g.body, &w.body);
        }
    }
    eprintln!("{} cuts in {:?}", stream.len() - 1, started.elapsed());
}

/// Malformed requests cut at every byte offset are refused the same way
/// wherever the cut falls, and the request behind them never reaches a
/// backend: a bare LF in the head, and `0 LF LF` ending a chunked body.
#[test]
fn malformed_requests_cut_at_every_byte_are_refused_alike() {
    let backend = echo_line_backend();
    let proxy = strict_proxy(&backend, &[]);
    let inputs = [
        format!("GET / HTTP/1.1\r\nHost: t\nX: y\r\n\r\n{SMUGGLED}"),
        format!(
            "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\n\n{SMUGGLED}"
        ),
    ];
    let started = Instant::now();
    for input in &inputs {
        let bytes = input.as_bytes();
        for cut in 1..bytes.len() {
            let what = format!("{input:?} cut at {cut}");
            let mut client = Client::connect(proxy.addr);
            send_cut(&mut client, bytes, cut);
            let resp = client
                .try_response(false)
                .unwrap_or_else(|e| panic!("{what}: no answer: {}", explain(&e)));
            assert_refusal(&resp, 400, &what);
            expect_orderly_close(&mut client, &what);
        }
    }
    assert_eq!(backend.accepted(), 0, "the backend was dialled");
    eprintln!("every cut refused in {:?}", started.elapsed());
}

/// Send `request` on `client` (kept alive) and check the backend got it:
/// 200, and the request as the backend saw it.
fn served(client: &mut Client, backend: &HttpBackend, request: &[u8], what: &str) -> Got {
    let before = backend.got().len();
    client.send(request);
    let resp = client
        .try_response(false)
        .unwrap_or_else(|e| panic!("{what}: no answer: {}", explain(&e)));
    assert_eq!(resp.status, 200, "{what}: {}", resp.head);
    assert!(!resp.closes(), "{what}: the connection closes");
    let got = backend.got();
    assert_eq!(got.len(), before + 1, "{what}: one request at the backend");
    got[before].clone()
}

/// Every limit holds to the byte: at the limit a request is served, one
/// byte (or field) over it is refused with its status.
#[test]
fn limits_hold_to_the_byte() {
    let backend = echo_line_backend();
    let mut proxy = strict_proxy(&backend, &["--max-request-body", "1KiB"]);
    let line_of = |len: usize| {
        format!(
            "GET /{} HTTP/1.1\r\nHost: t\r\n\r\n",
            "l".repeat(len - "GET / HTTP/1.1".len())
        )
    };
    let bare_head = "GET / HTTP/1.1\r\nHost: t\r\nX-Pad: \r\n\r\n".len();
    let head_of = |len: usize| {
        format!(
            "GET / HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\n\r\n",
            "p".repeat(len - bare_head)
        )
    };
    // Host is one of the fields.
    let fields = |n: usize| {
        format!(
            "GET / HTTP/1.1\r\nHost: t\r\n{}\r\n",
            "F: 1\r\n".repeat(n - 1)
        )
    };
    let chunked = |body: &[u8]| {
        let mut r = post_with("Transfer-Encoding: chunked\r\n").into_bytes();
        r.extend_from_slice(body);
        r
    };
    let mut extensions = b"1;".to_vec();
    extensions.extend(std::iter::repeat_n(b'x', 16 * KIB - 1));
    extensions.extend_from_slice(b"\r\na\r\n0\r\n\r\n");
    let mut full_body = b"400\r\n".to_vec();
    full_body.extend(std::iter::repeat_n(b'b', KIB));
    full_body.extend_from_slice(b"\r\n0\r\n\r\n");

    let mut client = Client::connect(proxy.addr);
    let g = served(
        &mut client,
        &backend,
        line_of(8192).as_bytes(),
        "a request line of 8KiB",
    );
    assert_eq!(g.line().len(), 8192);
    let g = served(
        &mut client,
        &backend,
        head_of(32 * KIB).as_bytes(),
        "a head of --max-header-size",
    );
    assert_eq!(
        g.field("x-pad").map(|p| p.len()),
        Some(32 * KIB - bare_head)
    );
    let g = served(&mut client, &backend, fields(128).as_bytes(), "128 fields");
    assert_eq!(g.fields("f").len(), 127);
    let g = served(
        &mut client,
        &backend,
        &chunked(b"000000000000000a\r\n0123456789\r\n0\r\n\r\n"),
        "a chunk size of 16 hex digits",
    );
    assert_eq!(g.body, b"0123456789");
    let g = served(
        &mut client,
        &backend,
        &chunked(&extensions),
        "16KiB of chunk extensions",
    );
    assert_eq!(g.body, b"a");
    let g = served(
        &mut client,
        &backend,
        &chunked(&full_body),
        "a chunked body of --max-request-body",
    );
    assert_eq!(g.body.len(), KIB);
    let g = served(
        &mut client,
        &backend,
        &post("/", &[b'c'; KIB]),
        "a length of --max-request-body",
    );
    assert_eq!(g.body.len(), KIB);

    for (what, request, status) in [
        ("a request line of 8KiB + 1", line_of(8193), 414),
        (
            "a head of --max-header-size + 1",
            head_of(32 * KIB + 1),
            431,
        ),
        ("129 fields", fields(129), 431),
    ] {
        expect_refused(&mut proxy, &backend, request.as_bytes(), status, "-", what);
    }
}

/// Floods of tiny fields are refused at once, however much room the head
/// size limit leaves: 431 for field 129.
#[test]
fn a_flood_of_tiny_fields_gets_431() {
    let backend = echo_line_backend();
    let mut proxy = strict_proxy(&backend, &["--max-header-size", "1MiB"]);
    for (what, request) in [
        ("20000 empty fields", get_with(&"a:\r\n".repeat(20_000))),
        ("5000 one-byte fields", get_with(&"a: b\r\n".repeat(5_000))),
        (
            "200 fields of one name",
            get_with(&"Cookie: c=1\r\n".repeat(200)),
        ),
    ] {
        let started = Instant::now();
        expect_refused(&mut proxy, &backend, request.as_bytes(), 431, "-", what);
        eprintln!("{what}: refused in {:?}", started.elapsed());
    }
}

/// A client still uploading when it is refused gets the whole answer and
/// then EOF, never a reset, and its upload never fails: spillway reads and
/// drops what keeps coming until the client is done (a lingering close).
#[test]
fn a_refused_client_still_sending_gets_the_answer_then_eof() {
    const UPLOAD: usize = 4 * MIB;
    let backend = echo_line_backend();
    let mut proxy = strict_proxy(&backend, &["--max-request-body", "1KiB"]);
    for (what, head, status) in [
        (
            "a declared body over the limit",
            post_with(&format!("Content-Length: {UPLOAD}\r\n")),
            413,
        ),
        ("a malformed request line", "BAD\r\n\r\n".to_string(), 400),
        (
            "a bad chunk size",
            format!("{}zz\r\n", post_with("Transfer-Encoding: chunked\r\n")),
            400,
        ),
    ] {
        let mut client = Client::connect(proxy.addr);
        let addr = client.stream.local_addr().expect("local_addr");
        let mut upload = client.stream.try_clone().expect("try_clone");
        let uploader = spawn("uploader", move || -> io::Result<std::net::TcpStream> {
            upload.write_all(head.as_bytes())?;
            let junk = vec![b'y'; 64 * KIB];
            for _ in 0..UPLOAD / junk.len() {
                upload.write_all(&junk)?;
            }
            upload.shutdown(std::net::Shutdown::Write)?;
            Ok(upload)
        });
        let resp = client
            .try_response(false)
            .unwrap_or_else(|e| panic!("{what}: no answer: {}", explain(&e)));
        assert_refusal(&resp, status, what);
        expect_orderly_close(&mut client, what);
        // The whole upload went, no write failed: nothing was reset.
        let upload = uploader
            .join(SECS_10)
            .unwrap_or_else(|e| panic!("{what}: the upload failed: {e}"));
        let closed = close_line(&mut proxy, addr);
        // (What sat in the head buffer when the refusal came is not
        // counted as dropped: at most --max-header-size.)
        assert!(
            number(&closed, "dropped") + 32 * KIB as u64 >= UPLOAD as u64,
            "{what}: the upload was not drained: {closed}"
        );
        drop(upload);
    }
    assert_eq!(backend.accepted(), 0);
}

/// Nothing a client sends after a refusal, or after a request that ends
/// the connection, is read as a request: the `GET /smuggled` behind each
/// never reaches the backend, and the proxy never logs it.
#[test]
fn nothing_after_a_refusal_or_a_last_request_is_processed() {
    let backend = echo_line_backend();
    let proxy = strict_proxy(&backend, &["--max-request-body", "1KiB"]);
    let s = SMUGGLED;
    let cases: Vec<(&str, String, &[u16])> = vec![
        (
            "after a 400 that follows a good request",
            format!(
                "GET /1 HTTP/1.1\r\nHost: t\r\n\r\n{}{s}",
                post_with("Content-Length: 1\r\nTransfer-Encoding: chunked\r\n")
            ),
            &[200, 400],
        ),
        (
            "after Connection: close",
            format!("GET /1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n{s}"),
            &[200],
        ),
        (
            "after an HTTP/1.0 request",
            format!("GET /1 HTTP/1.0\r\n\r\n{s}"),
            &[200],
        ),
        (
            "after a 400 in a chunked body",
            format!(
                "{}1\r\nab\r\n0\r\n\r\n{s}",
                post_with("Transfer-Encoding: chunked\r\n")
            ),
            &[400],
        ),
        (
            "after a 413 whose body would hold it",
            format!("{}{s}", post_with("Content-Length: 2048\r\n")),
            &[413],
        ),
        (
            "after a 417",
            format!("{}{s}", get_with("Expect: nope\r\n")),
            &[417],
        ),
        (
            "after a 405",
            format!("TRACE / HTTP/1.1\r\nHost: t\r\n\r\n{s}"),
            &[405],
        ),
        (
            "after a 501",
            format!("{}0\r\n\r\n{s}", post_with("Transfer-Encoding: gzip\r\n")),
            &[501],
        ),
        ("after a 414", format!("{}{s}", "G".repeat(9000)), &[414]),
    ];
    for (what, bytes, statuses) in &cases {
        let mut client = Client::connect(proxy.addr);
        client.send(bytes.as_bytes());
        for (i, status) in statuses.iter().enumerate() {
            let resp = client
                .try_response(false)
                .unwrap_or_else(|e| panic!("{what}: no answer {i}: {}", explain(&e)));
            assert_eq!(resp.status, *status, "{what}: {}", resp.head);
            assert_eq!(
                resp.closes(),
                i + 1 == statuses.len(),
                "{what}: {}",
                resp.head
            );
        }
        expect_orderly_close(&mut client, what);
    }
    holds_for(Duration::from_millis(100), || {
        for g in backend.got() {
            assert!(!g.line().contains("/smuggled"), "{}", g.head);
        }
    });
    assert!(proxy.lines_containing("/smuggled").is_empty());
}

/// What reaches a backend is a head spillway wrote: a body's length
/// counted by us (on a GET too), framing fields never the client's, names
/// with `_` dropped, X-Forwarded-For appended to (every line of it), our
/// own X-Real-IP and X-Forwarded-Proto, origin-form for an absolute
/// target, and exactly one Host.
#[test]
fn the_backend_gets_a_head_spillway_wrote() {
    let backend = echo_line_backend();
    let proxy = strict_proxy(&backend, &[]);
    let mut client = Client::connect(proxy.addr);
    let mut all = Vec::new();
    let mut serve = |request: &[u8], what: &str| {
        let g = served(&mut client, &backend, request, what);
        assert!(g.line().ends_with(" HTTP/1.1"), "{what}: {}", g.head);
        assert_eq!(g.fields("host").len(), 1, "{what}: {}", g.head);
        all.push(g.clone());
        g
    };
    let g = serve(
        b"GET /g HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc",
        "a GET with a body",
    );
    assert_eq!(
        (g.line(), g.body.as_slice()),
        ("GET /g HTTP/1.1", &b"abc"[..])
    );
    assert_eq!(g.fields("content-length"), ["3"]);
    let g = serve(
        b"POST /z HTTP/1.1\r\nHost: t\r\nContent-Length: 00005\r\n\r\nhello",
        "leading zeros",
    );
    assert_eq!(g.fields("content-length"), ["5"]);
    let g = serve(
        b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
        "an empty body",
    );
    assert_eq!(g.fields("content-length"), ["0"]);
    let g = serve(
        b"POST /c HTTP/1.1\r\nHost: t\r\nConnection: Content-Length, X-Gone\r\nX-Gone: 1\r\n\
          Content-Length: 4\r\n\r\nbody",
        "Connection naming Content-Length",
    );
    assert_eq!(
        (g.fields("content-length"), g.body.as_slice()),
        (vec!["4".to_string()], &b"body"[..])
    );
    assert!(
        g.fields("x-gone").is_empty() && g.fields("connection").is_empty(),
        "{}",
        g.head
    );
    let g = serve(
        b"GET /u HTTP/1.1\r\nHost: t\r\nX_Custom: 1\r\nX-Custom: 2\r\nX_Real_IP: 6.6.6.6\r\n\
          X-Real-IP: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-For: 1.1.1.1\r\n\
          x-forwarded-for: 2.2.2.2, 3.3.3.3\r\nContent_Length: 9\r\nTransfer_Encoding: chunked\r\n\r\n",
        "spoofed forwarding fields",
    );
    for gone in [
        "x_custom",
        "x_real_ip",
        "content_length",
        "transfer_encoding",
        "content-length",
    ] {
        assert!(g.fields(gone).is_empty(), "{gone}: {}", g.head);
    }
    assert_eq!(g.fields("x-custom"), ["2"]);
    assert_eq!(g.fields("x-real-ip"), ["127.0.0.1"]);
    assert_eq!(g.fields("x-forwarded-proto"), ["http"]);
    assert_eq!(
        g.fields("x-forwarded-for"),
        ["1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1"]
    );
    let g = serve(
        b"GET http://T:80/abs?x=1 HTTP/1.1\r\nHost: t:80\r\n\r\n",
        "absolute-form",
    );
    assert_eq!(
        (g.line(), g.fields("host")),
        ("GET /abs?x=1 HTTP/1.1", vec!["t:80".to_string()])
    );
    let g = serve(
        b"GET https://t?q HTTP/1.1\r\nHost: t\r\n\r\n",
        "absolute-form, no path",
    );
    assert_eq!(g.line(), "GET /?q HTTP/1.1");
    let g = serve(b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n", "OPTIONS *");
    assert_eq!(g.line(), "OPTIONS * HTTP/1.1");
    let g = serve(
        b"\r\nGET /after-crlf HTTP/1.1\r\nHost: t\r\n\r\n",
        "one empty line first",
    );
    assert_eq!(g.line(), "GET /after-crlf HTTP/1.1");
    let g = serve(
        b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
        "an IPv6 literal Host",
    );
    assert_eq!(g.fields("host"), ["[::1]:8080"]);
    for g in &all {
        for hop in [
            "connection",
            "keep-alive",
            "transfer-encoding",
            "te",
            "upgrade",
            "expect",
        ] {
            assert!(g.fields(hop).is_empty(), "{hop}: {}", g.head);
        }
    }
}

/// A backend's response that is ambiguous or malformed is a 502 for the
/// client, and the connection it came on is never given another request
/// (what is left in it could be read as the next response).
#[test]
fn ambiguous_responses_are_502_and_their_connection_is_dropped() {
    let bad: &[(&str, &[u8])] = &[
        (
            "/clte",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "/cl-twice",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ),
        (
            "/cl-sign",
            b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
        ),
        (
            "/gzip",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
        ),
        ("/bare-lf", b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\nok"),
        (
            "/fold",
            b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
        ),
        (
            "/nul",
            b"HTTP/1.1 200 OK\r\nX: a\0b\r\nContent-Length: 2\r\n\r\nok",
        ),
        (
            "/101",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        ),
    ];
    let script: Vec<(String, Vec<u8>)> = bad
        .iter()
        .map(|(p, r)| (p.to_string(), r.to_vec()))
        .collect();
    let backend = HttpBackend::start(move |g| {
        let path = g.line().split(' ').nth(1).unwrap_or("");
        match script.iter().find(|(p, _)| p == path) {
            Some((_, reply)) => Reply::Bytes(reply.clone()),
            None => Reply::Bytes(ok(format!("conn {}", g.conn).as_bytes())),
        }
    });
    let proxy = strict_proxy(&backend, &[]);
    for (path, _) in bad {
        let mut client = Client::connect(proxy.addr);
        client.send(&get(path));
        let resp = client.response(false);
        assert_refusal(&resp, 502, path);
        expect_orderly_close(&mut client, path);
        let conn = backend.got().last().map(|g| g.conn).expect("a request");
        let mut next = Client::connect(proxy.addr);
        next.send(&get("/ok"));
        let resp = next.response(false);
        assert_eq!(resp.status, 200, "after {path}");
        assert_ne!(
            resp.body,
            format!("conn {conn}").as_bytes(),
            "{path}: its connection was reused"
        );
    }
}

// ---------------------------------------------------------------------------
// Bugs these tests found, each fixed: each test says what is right.

/// A backend that sends more than its response (a second response behind
/// the first, in the same write) must not have that read as the response
/// to the next request, which may be another client's: the connection it
/// came on is not reused. The extra arrives with the body's last byte,
/// after the proxy has read all the rest, so it is still in the kernel when
/// the body is complete.
#[test]
fn bytes_a_backend_sends_past_its_response_reach_no_other_client() {
    const BODY: usize = 100 * KIB;
    let (listener, addr) = listen();
    let backend = spawn("backend", move || {
        let read_head = |s: &mut std::net::TcpStream| -> bool {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while find(&head, b"\r\n\r\n").is_none() {
                match s.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => return false,
                }
            }
            true
        };
        let mut first = accept_within(&listener, SECS_10);
        assert!(read_head(&mut first), "the first request");
        let mut response =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n").into_bytes();
        response.extend(std::iter::repeat_n(b'x', BODY - 1));
        first.write_all(&response).expect("write");
        wait_until_peer_has_read(&first, SECS_10);
        first
            .write_all(b"xHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\npoisoned")
            .expect("write the rest");
        // The second request comes on the same connection (the bug) or,
        // once the proxy has closed it, on a new one.
        let mut second = if read_head(&mut first) {
            first
        } else {
            let mut s = accept_within(&listener, SECS_10);
            assert!(read_head(&mut s), "the second request");
            s
        };
        second.write_all(&ok(b"second")).expect("write");
        let mut rest = Vec::new();
        let _ = second.read_to_end(&mut rest);
    });
    let proxy = Proxy::start(&[
        "--mode",
        "http",
        "--workers",
        "1",
        "--backend",
        &addr.to_string(),
    ]);
    let mut alice = Client::connect(proxy.addr);
    alice.send(b"GET /alice HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    assert_eq!(alice.response(false).body.len(), BODY);
    let mut bob = Client::connect(proxy.addr);
    bob.send(b"GET /bob HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let resp = bob.response(false);
    assert_eq!(
        String::from_utf8_lossy(&resp.body),
        "second",
        "bob got what the backend sent after alice's response"
    );
    drop(proxy);
    backend.join(SECS_10);
}

/// Field values with obs-text (bytes 0x80-0xff, which RFC 9110 §5.5 says
/// to treat as opaque) reach the backend byte for byte, as head.rs says.
#[test]
fn obs_text_in_a_field_value_reaches_the_backend_byte_for_byte() {
    let backend = echo_line_backend();
    let proxy = strict_proxy(&backend, &[]);
    let mut client = Client::connect(proxy.addr);
    let g = served(
        &mut client,
        &backend,
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Name: caf\xe9 \xff\r\nX-Forwarded-For: 10.0.0.1\xa0\r\n\r\n",
        "obs-text",
    );
    assert!(
        find(&g.head_bytes, b"\r\nX-Name: caf\xe9 \xff\r\n").is_some(),
        "{:?}",
        String::from_utf8_lossy(&g.head_bytes)
    );
    assert!(
        find(&g.head_bytes, b"\xef\xbf\xbd").is_none(),
        "U+FFFD reached the backend"
    );
}

/// `Connection: Host` must not make the proxy send an HTTP/1.1 request
/// without Host (RFC 9112 §3.2): refuse it, or keep Host.
#[test]
fn a_connection_option_never_strips_host() {
    let backend = echo_line_backend();
    let proxy = strict_proxy(&backend, &[]);
    for request in [
        "GET / HTTP/1.1\r\nHost: t\r\nConnection: Host\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, host\r\n\r\n",
    ] {
        let before = backend.got().len();
        let mut client = Client::connect(proxy.addr);
        client.send(request.as_bytes());
        let resp = client.response(false);
        match resp.status {
            400 => assert_eq!(backend.got().len(), before, "refused, yet sent on"),
            200 => {
                let got = backend.got();
                assert_eq!(
                    got[before].fields("host"),
                    ["t"],
                    "{request:?}: {}",
                    got[before].head
                );
            }
            other => panic!("{request:?}: {other}"),
        }
    }
}

/// An HTTP/1.0 request goes to the backend as HTTP/1.1, so it must carry a
/// Host (RFC 9112 §3.2; Go's net/http, for one, answers 400 without): the
/// authority of an absolute target when there is one (§3.2.2), some Host
/// in any case.
#[test]
fn http_1_0_requests_reach_the_backend_with_a_host() {
    let backend = echo_line_backend();
    let proxy = strict_proxy(&backend, &[]);
    for (request, host) in [
        ("GET http://a.test/x HTTP/1.0\r\n\r\n", Some("a.test")),
        ("GET /old HTTP/1.0\r\n\r\n", None),
    ] {
        let before = backend.got().len();
        let mut client = Client::connect(proxy.addr);
        client.send(request.as_bytes());
        assert_eq!(client.response(false).status, 200, "{request:?}");
        let g = &backend.got()[before];
        if g.line().ends_with("HTTP/1.1") {
            let hosts = g.fields("host");
            assert_eq!(
                hosts.len(),
                1,
                "{request:?} went on as HTTP/1.1 without Host: {}",
                g.head
            );
            if let Some(host) = host {
                assert_eq!(hosts[0], host, "{}", g.head);
            }
        }
    }
}

/// A Host whose name holds a colon is not `uri-host [":" port]` (a reg-name
/// has no ':', an IPv6 literal needs brackets): 400 (RFC 9112 §3.2), lest
/// the backend read another host or port out of it.
#[test]
fn a_host_with_a_colon_in_its_name_is_refused() {
    let backend = echo_line_backend();
    let mut proxy = strict_proxy(&backend, &[]);
    for host in ["a:b:80", "a::80", "::1", "evil.test:80:80"] {
        expect_refused(
            &mut proxy,
            &backend,
            format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
            400,
            "-",
            host,
        );
    }
}

/// A chunk whose size alone takes the body over `--max-request-body` gets
/// 413 as soon as the size is read, as a `Content-Length` over it does
/// (and as nginx does): not a connection held until the client has sent
/// the limit's worth, or until `--client-body-timeout` and a 408.
#[test]
fn a_chunk_over_the_body_limit_is_refused_when_its_size_is_read() {
    let backend = echo_line_backend();
    let mut proxy = strict_proxy(&backend, &["--max-request-body", "1KiB"]);
    for size in ["401", "FFFFFFFFFFFFFFFF"] {
        let mut client = Client::connect(proxy.addr);
        client
            .stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let addr = client.stream.local_addr().expect("local_addr");
        client.send(
            format!(
                "{}{size}\r\nabc",
                post_with("Transfer-Encoding: chunked\r\n")
            )
            .as_bytes(),
        );
        let resp = client
            .try_response(false)
            .unwrap_or_else(|e| panic!("chunk size {size}: no 413 within 3s: {}", explain(&e)));
        assert_refusal(&resp, 413, size);
        expect_orderly_close(&mut client, size);
        proxy.wait_for_log(&format!("\"POST / HTTP/1.1\" 413 client={addr} "), SECS_10);
    }
    assert_eq!(backend.accepted(), 0);
}
