//! A request as spillway reads it: the head found in pieces, judged, and
//! its body (by length or chunked) taken. For any input, any split across
//! two reads gives the same outcome; and a request it accepts, framed again
//! as spillway sends it to a backend, parses again to the same method,
//! target and body, with a `Content-Length` of that body.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use spillway::http::chunked::ChunkedDecoder;
use spillway::http::head::{Found, Framing, HeadScan, MAX_FIELDS, parse_request};

const MAX_HEAD: usize = 4096;

#[derive(Debug, PartialEq)]
enum Outcome {
    Refused(u16),
    Incomplete,
    Accepted {
        method: String,
        target: String,
        framing: Framing,
        body: Vec<u8>,
        /// Bytes of the input the request took (the rest is the next one).
        used: usize,
        upstream: Vec<u8>,
    },
}

fn client() -> SocketAddr {
    "192.0.2.1:1000".parse().unwrap()
}

/// Read `input` as two reads, cut at `cut`, with heads of at most `max`.
fn read(input: &[u8], cut: usize, max: usize) -> Outcome {
    let mut scan = HeadScan::default();
    let mut head_len = None;
    for end in [cut, input.len()] {
        match scan.find(&input[..end], max) {
            Err(r) => return Outcome::Refused(r.status),
            Ok(Found::Complete(n)) => {
                head_len = Some(n);
                break;
            }
            Ok(Found::Partial) => {}
        }
    }
    let Some(n) = head_len else {
        return Outcome::Incomplete;
    };
    let request = match parse_request(&input[..n], client()) {
        Ok(r) => r,
        Err(r) => return Outcome::Refused(r.status),
    };
    let rest = &input[n..];
    let (body, body_used) = match request.framing {
        Framing::None => (Vec::new(), 0),
        Framing::Length(len) => {
            let Some(body) = usize::try_from(len).ok().and_then(|l| rest.get(..l)) else {
                return Outcome::Incomplete;
            };
            (body.to_vec(), body.len())
        }
        Framing::Chunked => {
            let mut d = ChunkedDecoder::new(MAX_HEAD);
            let mut data = Vec::new();
            let mut at = 0;
            let rest_cut = cut.saturating_sub(n).min(rest.len());
            for end in [rest_cut, rest.len()] {
                while at < end && !d.is_done() {
                    match d.decode(&rest[at..end], |b| {
                        data.extend_from_slice(b);
                        b.len()
                    }) {
                        Ok(r) => {
                            at += r.consumed;
                            if r.consumed == 0 {
                                break;
                            }
                        }
                        Err(_) => return Outcome::Refused(400),
                    }
                }
            }
            if !d.is_done() {
                return Outcome::Incomplete;
            }
            (data, at)
        }
        Framing::UntilClose => unreachable!("requests are never framed by close"),
    };
    let upstream = request.upstream_head(body.len() as u64, false, client());
    Outcome::Accepted {
        method: request.method.clone(),
        target: request.target.clone(),
        framing: request.framing,
        body,
        used: n + body_used,
        upstream,
    }
}

fuzz_target!(|bytes: &[u8]| {
    let Some((&seed, input)) = bytes.split_first() else {
        return;
    };
    let whole = read(input, input.len(), MAX_HEAD);
    let cut = usize::from(seed) * input.len() / 255;
    assert_eq!(
        read(input, cut, MAX_HEAD),
        whole,
        "a split at {cut} changed the outcome"
    );
    let Outcome::Accepted {
        method,
        target,
        framing,
        body,
        upstream,
        ..
    } = whole
    else {
        return;
    };
    // Our fields (X-Forwarded-For, X-Real-IP, X-Forwarded-Proto, a Host
    // for HTTP/1.0, Content-Length, Connection: at most six more than the
    // client's) may take a head of nearly MAX_FIELDS past the limit our own
    // parser sets: then, and only then, it is 431 the second time.
    let fields = |head: &[u8]| head.windows(2).filter(|w| w == b"\r\n").count() - 2;
    let ours = fields(&upstream);
    let mut again = upstream;
    again.extend_from_slice(&body);
    if ours > MAX_FIELDS {
        let theirs = fields(&input[..input.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4]);
        assert!(ours <= theirs + 6, "{theirs} fields became {ours}");
        assert_eq!(
            read(&again, again.len(), 2 * MAX_HEAD),
            Outcome::Refused(431)
        );
        return;
    }
    // Our head adds X-Forwarded-* (and maybe Host): room for them.
    match read(&again, again.len(), 2 * MAX_HEAD) {
        Outcome::Accepted {
            method: m2,
            target: t2,
            framing: f2,
            body: b2,
            used,
            ..
        } => {
            assert_eq!((m2, t2), (method, target));
            assert_eq!(b2, body);
            assert_eq!(
                used,
                again.len(),
                "the re-framed request has nothing after it"
            );
            let expected = if framing == Framing::None {
                Framing::None
            } else {
                Framing::Length(body.len() as u64)
            };
            assert_eq!(f2, expected);
        }
        other => panic!(
            "our own request was not accepted: {other:?}\n{}",
            String::from_utf8_lossy(&again)
        ),
    }
});
