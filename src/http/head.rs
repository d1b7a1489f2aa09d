//! Request and response heads: found, parsed, judged and written anew.
//!
//! `httparse` splits a head into its parts; everything it is lenient about
//! that the smuggling literature exploits is checked here, before it: lines
//! end in CRLF only (no bare LF, no lone CR), a target is visible ASCII
//! without `#`, `Content-Length` is plain digits and appears once, it never
//! comes with `Transfer-Encoding`, and `Transfer-Encoding` is `chunked` and
//! nothing else. What reaches a backend is never the client's head: it is
//! a head we write (`Request::upstream_head`), with hop-by-hop fields
//! removed, `X-Forwarded-*` set, and our own `Content-Length`, counted from
//! the body we buffered. A response gets the same treatment on its way back.

use std::fmt::Write as _;
use std::net::SocketAddr;

use memchr::memmem;

/// Most header fields in a head: beyond, 431 (or 502 from a backend).
pub const MAX_FIELDS: usize = 128;

/// A request line longer than this gets 414.
pub const MAX_REQUEST_LINE: usize = 8 * 1024;

/// Fields that describe one hop, never forwarded (RFC 9110 §7.6.1, and
/// `Proxy-Connection`, which some clients still send).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "trailer",
];

/// Why a head is refused: the status to answer with and what to log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    pub status: u16,
    pub why: &'static str,
}

fn reject<T>(status: u16, why: &'static str) -> Result<T, Reject> {
    Err(Reject { status, why })
}

/// How a message's body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    None,
    Length(u64),
    Chunked,
    /// Until the sender closes (responses only).
    UntilClose,
}

/// Where the end of a head is looked for, so that bytes arriving one at a
/// time are each scanned once, not once per arrival (a slowloris would
/// otherwise cost quadratic time).
#[derive(Clone, Copy, Debug, Default)]
pub struct HeadScan {
    /// Bytes already checked for bare LFs and lone CRs.
    checked: usize,
}

/// What looking for a head found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// Not all there yet.
    Partial,
    /// The head is the first `len` bytes.
    Complete(usize),
}

impl HeadScan {
    /// Look for the end of a head in `buf` (which only grows between
    /// calls, until `reset`), at most `max` bytes long. Up to that end,
    /// every LF must follow a CR and every CR precede an LF; what follows
    /// the head (a body) is not looked at.
    pub fn find(&mut self, buf: &[u8], max: usize) -> Result<Found, Reject> {
        let from = self.checked.saturating_sub(3);
        let end = memmem::find(&buf[from..], b"\r\n\r\n").map(|at| from + at + 4);
        // A trailing CR is judged when the byte after it comes.
        let upto = end.unwrap_or(if buf.last() == Some(&b'\r') {
            buf.len() - 1
        } else {
            buf.len()
        });
        if upto > self.checked {
            let after_cr = self.checked > 0 && buf[self.checked - 1] == b'\r';
            check_line_ends(&buf[self.checked..upto], after_cr)?;
            self.checked = upto;
        }
        match end {
            Some(end) if end > max => reject(431, "request head too large"),
            Some(end) => Ok(Found::Complete(end)),
            None if buf.len() >= max || request_line_too_long(buf) => {
                if request_line_too_long(buf) {
                    reject(414, "request line too long")
                } else {
                    reject(431, "request head too large")
                }
            }
            None => Ok(Found::Partial),
        }
    }

    pub fn reset(&mut self) {
        self.checked = 0;
    }
}

/// More than `MAX_REQUEST_LINE` bytes and the first line (after any empty
/// ones) has not ended.
fn request_line_too_long(buf: &[u8]) -> bool {
    let leading = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    let line = &buf[leading..];
    line.len() > MAX_REQUEST_LINE && memchr::memchr(b'\n', line).is_none()
}

/// Every LF in `bytes` follows a CR, every CR precedes an LF (`after_cr`:
/// the byte before `bytes` was a CR, which the first byte must answer).
fn check_line_ends(bytes: &[u8], after_cr: bool) -> Result<(), Reject> {
    let mut prev_cr = after_cr;
    for &b in bytes {
        match b {
            b'\n' if !prev_cr => return reject(400, "bare LF in the head"),
            b'\n' => prev_cr = false,
            _ if prev_cr => return reject(400, "CR not followed by LF in the head"),
            b'\r' => prev_cr = true,
            _ => {}
        }
    }
    Ok(())
}

/// A request whose head was judged acceptable.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// Origin-form (or `*` for OPTIONS), as it goes to the backend.
    pub target: String,
    /// 0 or 1: HTTP/1.0 or HTTP/1.1.
    pub minor: u8,
    pub framing: Framing,
    /// The client will keep the connection for another request.
    pub keep_alive: bool,
    /// `Expect: 100-continue` was asked.
    pub expect_continue: bool,
    /// The protocol the client asks to switch to (`Upgrade` with
    /// `Connection: upgrade`, HTTP/1.1 only): passed on, and only a 101
    /// from the backend makes the connection a tunnel.
    pub upgrade: Option<String>,
    /// Our head for the backend: the request line, and the fields, without
    /// a `Content-Length` or the final CRLF (`upstream_head` finishes it
    /// once the body's length and the backend are known).
    request_line: String,
    /// The fields, byte for byte as received (obs-text included).
    head: Vec<u8>,
    /// An HTTP/1.0 request without `Host`: the backend (HTTP/1.1) is sent
    /// the authority of an absolute target, else its own address (as nginx
    /// sends `$proxy_host`).
    host_missing: bool,
    authority: Option<String>,
}

impl Request {
    /// A HEAD request: its response has no body, whatever it says.
    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }

    /// The head for the backend at `backend`, for a body of `body_len`
    /// bytes (if the request had a body at all), asking the backend to
    /// close after it if `close`.
    pub fn upstream_head(&self, body_len: u64, close: bool, backend: SocketAddr) -> Vec<u8> {
        let mut head = self.request_line.clone();
        if self.host_missing {
            match &self.authority {
                Some(authority) => {
                    let _ = write!(head, "Host: {authority}\r\n");
                }
                None => {
                    let _ = write!(head, "Host: {backend}\r\n");
                }
            }
        }
        let mut head = head.into_bytes();
        head.extend_from_slice(&self.head);
        let mut head = TailWriter(head);
        if self.framing != Framing::None {
            let _ = write!(head, "Content-Length: {body_len}\r\n");
        }
        if let Some(protocol) = &self.upgrade {
            let _ = write!(head, "Upgrade: {protocol}\r\nConnection: upgrade\r\n");
        } else if close {
            let _ = head.write_str("Connection: close\r\n");
        }
        let _ = head.write_str("\r\n");
        head.0
    }

    /// `GET /path HTTP/1.1`, for logs.
    pub fn line(&self) -> String {
        format!("{} {} HTTP/1.{}", self.method, self.target, self.minor)
    }
}

/// A byte buffer that `write!` can append text to.
struct TailWriter(Vec<u8>);

impl TailWriter {
    fn push_str(&mut self, s: &str) {
        self.0.extend_from_slice(s.as_bytes());
    }

    fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl std::fmt::Write for TailWriter {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Parse and judge the request head `head` (ending in CRLF CRLF) from
/// `client`.
pub fn parse_request(head: &[u8], client: SocketAddr) -> Result<Request, Reject> {
    let line_end = memmem::find(head, b"\r\n").unwrap_or(head.len());
    let leading = head
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    if line_end.saturating_sub(leading) > MAX_REQUEST_LINE {
        return reject(414, "request line too long");
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut fields);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return reject(400, "incomplete request head"),
        Err(httparse::Error::TooManyHeaders) => return reject(431, "too many header fields"),
        Err(httparse::Error::Version) => return reject(400, "not HTTP/1.0 or HTTP/1.1"),
        Err(httparse::Error::HeaderName) => {
            return reject(
                400,
                "malformed header field name (whitespace before the colon, obs-fold?)",
            );
        }
        Err(httparse::Error::HeaderValue) => return reject(400, "control byte in a header value"),
        Err(_) => return reject(400, "malformed request line"),
    }
    let method = req.method.expect("complete").to_string();
    let raw_target = req.path.expect("complete");
    let minor = req.version.expect("complete");
    if method == "CONNECT" || method == "TRACE" {
        return reject(405, "CONNECT and TRACE are not proxied");
    }
    if raw_target.contains('#') {
        return reject(400, "'#' in the request target");
    }
    if !raw_target.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return reject(400, "non-ASCII or control byte in the request target");
    }
    let (target, authority) = split_target(&method, raw_target)?;
    let fields = Fields::read(req.headers, true)?;
    if minor == 0 && fields.transfer_encoding.is_some() {
        return reject(400, "Transfer-Encoding in an HTTP/1.0 request");
    }
    let host = match (fields.hosts.as_slice(), minor) {
        ([], 1) => return reject(400, "no Host in an HTTP/1.1 request"),
        ([], _) => None,
        ([host], _) => Some(*host),
        _ => return reject(400, "more than one Host"),
    };
    if let Some(host) = host {
        if !valid_host(host) {
            return reject(400, "invalid Host");
        }
        if authority.is_some_and(|a| !a.eq_ignore_ascii_case(host)) {
            return reject(400, "Host differs from the authority of an absolute target");
        }
    }
    let framing = fields.framing()?;
    let keep_alive = if minor == 1 {
        !fields.connection_close
    } else {
        fields.connection_keep_alive && !fields.connection_close
    };
    let upgrade = match fields.upgrade {
        Some(value) if minor == 1 && fields.connection_upgrade => {
            Some(protocols(value).ok_or(Reject {
                status: 400,
                why: "malformed Upgrade",
            })?)
        }
        _ => None,
    };
    let expect_continue = match fields.expect {
        None => false,
        Some(v) if v.eq_ignore_ascii_case(b"100-continue") => minor == 1,
        Some(_) => return reject(417, "an Expect other than 100-continue"),
    };
    let request_line = format!("{method} {target} HTTP/1.1\r\n");
    // Sized once: the fields passed on are at most the head, and ours
    // (X-Forwarded-For, X-Real-IP, X-Forwarded-Proto) fit in 128 bytes.
    let mut head = Vec::with_capacity(head.len() + 128);
    fields.write_forwarded(&mut head);
    let ip = client.ip();
    head.extend_from_slice(b"X-Forwarded-For: ");
    if let Some(before) = &fields.forwarded_for {
        head.extend_from_slice(before);
        head.extend_from_slice(b", ");
    }
    let mut head = TailWriter(head);
    let _ = write!(
        head,
        "{ip}\r\nX-Real-IP: {ip}\r\nX-Forwarded-Proto: http\r\n"
    );
    let head = head.0;
    Ok(Request {
        method,
        target,
        minor,
        framing,
        keep_alive,
        expect_continue,
        upgrade,
        request_line,
        head,
        host_missing: host.is_none(),
        authority: authority.map(str::to_string),
    })
}

/// An `Upgrade` value: protocols (`token[/token]`), comma-separated.
fn protocols(value: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(value).ok()?;
    let ok = text.split(',').all(|p| {
        let p = p.trim_matches([' ', '\t']);
        !p.is_empty()
            && p.split('/').count() <= 2
            && p.split('/').all(|t| {
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
            })
    });
    ok.then(|| text.trim().to_string())
}

/// The target in origin-form for the backend, and the authority of an
/// absolute-form target (which the Host must match).
fn split_target<'a>(method: &str, target: &'a str) -> Result<(String, Option<&'a str>), Reject> {
    if target.starts_with('/') {
        return Ok((target.to_string(), None));
    }
    if target == "*" && method == "OPTIONS" {
        return Ok((target.to_string(), None));
    }
    let lower = target
        .get(..8)
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let rest = if lower.starts_with("http://") {
        &target[7..]
    } else if lower.starts_with("https://") {
        &target[8..]
    } else {
        return reject(400, "request target is not origin-form or absolute-form");
    };
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if authority.is_empty() || authority.contains('@') || !valid_host(authority) {
        return reject(400, "invalid authority in an absolute target");
    }
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    Ok((path, Some(authority)))
}

/// `host[:port]`: a reg-name or IPv4 address, or an IPv6 literal in
/// brackets; no spaces, slashes, `@` or anything else that could make two
/// parsers read two different hosts.
fn valid_host(host: &str) -> bool {
    let port_ok =
        |port: &str| (1..=5).contains(&port.len()) && port.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = host.strip_prefix('[') {
        let Some((literal, after)) = rest.split_once(']') else {
            return false;
        };
        let literal_ok = !literal.is_empty()
            && literal
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        return literal_ok && (after.is_empty() || after.strip_prefix(':').is_some_and(port_ok));
    }
    // A reg-name or IPv4 address has no ':' of its own: one ':' at most,
    // and what follows it is the port.
    let (name, port) = match host.split_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    let name_ok = !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                        | b'%'
                )
        });
    name_ok && port.is_none_or(port_ok)
}

/// What the header fields of a head say, read in two passes: `Connection`
/// names fields to drop, and may come after them.
struct Fields<'h, 'b> {
    all: &'h [httparse::Header<'b>],
    content_length: Option<u64>,
    transfer_encoding: Option<Vec<String>>,
    hosts: Vec<&'b str>,
    expect: Option<&'b [u8]>,
    upgrade: Option<&'b [u8]>,
    /// `X-Accel-Buffering: no` (responses).
    unbuffered: bool,
    connection_close: bool,
    connection_upgrade: bool,
    connection_keep_alive: bool,
    /// Field names `Connection` lists (lowercase): hop-by-hop too.
    connection_names: Vec<String>,
    /// The `X-Forwarded-For` values received, joined, byte for byte.
    forwarded_for: Option<Vec<u8>>,
    /// Judged as a request (else a response: errors are the backend's).
    request: bool,
}

impl<'h, 'b> Fields<'h, 'b> {
    fn read(all: &'h [httparse::Header<'b>], request: bool) -> Result<Self, Reject> {
        let bad = if request { 400 } else { 502 };
        let mut f = Fields {
            all,
            content_length: None,
            transfer_encoding: None,
            hosts: Vec::new(),
            expect: None,
            upgrade: None,
            unbuffered: false,
            connection_close: false,
            connection_upgrade: false,
            connection_keep_alive: false,
            connection_names: Vec::new(),
            forwarded_for: None,
            request,
        };
        for h in all {
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length") {
                if f.content_length.is_some() {
                    return reject(bad, "Content-Length appears twice");
                }
                f.content_length = Some(parse_length(h.value).ok_or(Reject {
                    status: bad,
                    why: "Content-Length is not plain digits",
                })?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                let codings = f.transfer_encoding.get_or_insert_with(Vec::new);
                for coding in list(h.value).ok_or(Reject {
                    status: bad,
                    why: "malformed Transfer-Encoding",
                })? {
                    codings.push(coding.to_ascii_lowercase());
                }
            } else if name.eq_ignore_ascii_case("host") && request {
                let host = std::str::from_utf8(h.value).map_err(|_| Reject {
                    status: 400,
                    why: "invalid Host",
                })?;
                f.hosts.push(host);
            } else if name.eq_ignore_ascii_case("expect") && request {
                f.expect = Some(h.value);
            } else if name.eq_ignore_ascii_case("upgrade") {
                f.upgrade = Some(h.value);
            } else if name.eq_ignore_ascii_case("x-accel-buffering") && !request {
                f.unbuffered = h.value.eq_ignore_ascii_case(b"no");
            } else if name.eq_ignore_ascii_case("connection") {
                for token in list(h.value).ok_or(Reject {
                    status: bad,
                    why: "malformed Connection",
                })? {
                    let token = token.to_ascii_lowercase();
                    match token.as_str() {
                        "close" => f.connection_close = true,
                        "keep-alive" => f.connection_keep_alive = true,
                        "upgrade" => f.connection_upgrade = true,
                        _ => f.connection_names.push(token),
                    }
                }
            } else if name.eq_ignore_ascii_case("x-forwarded-for") && request {
                let joined = f.forwarded_for.get_or_insert_with(Vec::new);
                if !joined.is_empty() {
                    joined.extend_from_slice(b", ");
                }
                joined.extend_from_slice(h.value);
            }
        }
        Ok(f)
    }

    /// How the body is framed, from `Content-Length` and
    /// `Transfer-Encoding` (for a request: none means no body).
    fn framing(&self) -> Result<Framing, Reject> {
        let bad = if self.request { 400 } else { 502 };
        match (&self.transfer_encoding, self.content_length) {
            (Some(_), Some(_)) => reject(bad, "Content-Length together with Transfer-Encoding"),
            (Some(codings), None) => {
                let last_chunked = codings.last().is_some_and(|c| c == "chunked");
                let chunked_count = codings.iter().filter(|c| *c == "chunked").count();
                if chunked_count > 0 && !last_chunked {
                    reject(bad, "Transfer-Encoding whose last coding is not chunked")
                } else if chunked_count > 1 {
                    reject(bad, "chunked applied twice")
                } else if codings.len() == 1 && last_chunked {
                    Ok(Framing::Chunked)
                } else if self.request {
                    reject(501, "a Transfer-Encoding other than chunked")
                } else {
                    reject(502, "a Transfer-Encoding other than chunked")
                }
            }
            (None, Some(n)) => Ok(Framing::Length(n)),
            (None, None) if self.request => Ok(Framing::None),
            (None, None) => Ok(Framing::UntilClose),
        }
    }

    /// Is this field passed on? Not hop-by-hop ones, nor those
    /// `Connection` names, nor framing (we write our own), nor names with
    /// `_` (which CGI and WSGI servers fold into `-`, so that
    /// `X_Forwarded_For` could pose as `X-Forwarded-For`), nor the
    /// `X-Forwarded-*` and `X-Real-IP` we set ourselves.
    fn forwarded(&self, name: &str) -> bool {
        let lower = name.to_ascii_lowercase();
        // Host is never hop-by-hop, whatever `Connection` says: an HTTP/1.1
        // request without it must be refused by the backend.
        if lower == "host" {
            return true;
        }
        !(HOP_BY_HOP.contains(&lower.as_str())
            || lower == "content-length"
            || name.contains('_')
            || self.connection_names.contains(&lower)
            || (self.request
                && matches!(
                    lower.as_str(),
                    "x-forwarded-for" | "x-real-ip" | "x-forwarded-proto" | "expect"
                ))
            || (!self.request && lower == "x-accel-buffering"))
    }

    /// Write each field that is passed on, as received.
    fn write_forwarded(&self, out: &mut Vec<u8>) {
        for h in self.all.iter().filter(|h| self.forwarded(h.name)) {
            out.extend_from_slice(h.name.as_bytes());
            out.extend_from_slice(b": ");
            // Byte for byte: obs-text (0x80-0xFF) is the sender's business.
            out.extend_from_slice(h.value);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// A field value that is a comma-separated list of tokens; `None` if an
/// element is empty or not a token.
fn list(value: &[u8]) -> Option<Vec<&str>> {
    let text = std::str::from_utf8(value).ok()?;
    text.split(',')
        .map(|item| {
            let item = item.trim_matches([' ', '\t']);
            let token = !item.is_empty()
                && item
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            token.then_some(item)
        })
        .collect()
}

/// `Content-Length`: plain digits only (no sign, no spaces, no commas),
/// and a value that fits.
pub fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// A response whose head was judged acceptable.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// The body as the backend frames it.
    pub framing: Framing,
    /// The backend will take another request on this connection.
    pub reusable: bool,
    /// `X-Accel-Buffering: no`: pass the body on as it comes, never
    /// spilled, holding the backend back to the client's pace.
    pub streaming: bool,
    /// A 101: the protocol switched to, and the connection becomes a
    /// tunnel.
    pub switched_to: Option<String>,
    /// `Content-Length` as received, for a response that has no body but
    /// describes one (HEAD, 304).
    declared_length: Option<u64>,
    reason: String,
    fields: Vec<u8>,
}

/// What reading a response head gave.
#[derive(Debug)]
pub enum ResponseHead {
    /// A 1xx to skip (`len` bytes): the final response follows.
    Interim(usize),
    Final(Response),
}

/// Parse and judge the response head `head` (ending in CRLF CRLF) to a
/// request (`head_request`: it was a HEAD).
pub fn parse_response(
    head: &[u8],
    head_request: bool,
    upgrade_asked: bool,
) -> Result<ResponseHead, Reject> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut resp = httparse::Response::new(&mut fields);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return reject(502, "incomplete response head"),
        Err(_) => return reject(502, "malformed response head"),
    }
    let status = resp.code.expect("complete");
    let minor = resp.version.expect("complete");
    if !(100..=599).contains(&status) {
        return reject(502, "status code out of range");
    }
    if status == 101 && !upgrade_asked {
        return reject(
            502,
            "101 Switching Protocols to a request that asked for no upgrade",
        );
    }
    if status < 200 && status != 101 {
        return Ok(ResponseHead::Interim(head.len()));
    }
    let f = Fields::read(resp.headers, false)?;
    let switched_to = if status == 101 {
        let to = f.upgrade.and_then(protocols).ok_or(Reject {
            status: 502,
            why: "a 101 without a valid Upgrade",
        })?;
        Some(to)
    } else {
        None
    };
    let backend_framing = if switched_to.is_some() {
        Framing::None
    } else {
        f.framing()?
    };
    let no_body = head_request || status == 204 || status == 304;
    let framing = if no_body {
        Framing::None
    } else {
        backend_framing
    };
    let reusable = minor == 1
        && !f.connection_close
        && framing != Framing::UntilClose
        && !(status == 204 && f.content_length.is_some_and(|n| n > 0));
    let mut out = Vec::with_capacity(head.len());
    f.write_forwarded(&mut out);
    let reason = resp.reason.unwrap_or("").to_string();
    Ok(ResponseHead::Final(Response {
        status,
        framing,
        reusable: reusable && switched_to.is_none(),
        streaming: f.unbuffered,
        switched_to,
        declared_length: f.content_length.filter(|_| no_body && status != 204),
        reason,
        fields: out,
    }))
}

/// How a response's body goes to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientFraming {
    /// As the backend framed it: none, a length, or validated chunks.
    AsSent,
    /// De-chunked, ended by closing the connection (an HTTP/1.0 client
    /// cannot take chunks).
    Dechunked,
}

impl Response {
    /// The head for the client: the status line, the fields passed on,
    /// our framing, and whether the connection stays open.
    pub fn client_head(&self, client_minor: u8, keep_alive: bool) -> (Vec<u8>, ClientFraming) {
        // Sized once: the status line, the fields, and ours (a length,
        // the connection's fate) in 96 bytes.
        let mut head = Vec::with_capacity(self.reason.len() + self.fields.len() + 96);
        head.extend_from_slice(b"HTTP/1.1 ");
        // Three digits: httparse takes no other status.
        let s = self.status;
        head.extend_from_slice(&[
            b'0' + (s / 100 % 10) as u8,
            b'0' + (s / 10 % 10) as u8,
            b'0' + (s % 10) as u8,
        ]);
        head.push(b' ');
        head.extend_from_slice(self.reason.as_bytes());
        head.extend_from_slice(b"\r\n");
        head.extend_from_slice(&self.fields);
        let mut head = TailWriter(head);
        if let Some(protocol) = &self.switched_to {
            let _ = write!(head, "Upgrade: {protocol}\r\nConnection: upgrade\r\n\r\n");
            return (head.into_bytes(), ClientFraming::AsSent);
        }
        let mut how = ClientFraming::AsSent;
        match self.framing {
            Framing::None => {
                if let Some(n) = self.declared_length {
                    let _ = write!(head, "Content-Length: {n}\r\n");
                }
            }
            Framing::Length(n) => {
                let _ = write!(head, "Content-Length: {n}\r\n");
            }
            Framing::Chunked if client_minor == 1 => {
                head.push_str("Transfer-Encoding: chunked\r\n")
            }
            Framing::Chunked => how = ClientFraming::Dechunked,
            Framing::UntilClose => {}
        }
        if keep_alive && self.keeps_client(client_minor) {
            if client_minor == 0 {
                head.push_str("Connection: keep-alive\r\n");
            }
        } else {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        (head.into_bytes(), how)
    }

    /// Can the client's connection carry another request after this
    /// response? Not if the body ends with the connection.
    pub fn keeps_client(&self, client_minor: u8) -> bool {
        match self.framing {
            Framing::UntilClose => false,
            Framing::Chunked => client_minor == 1,
            Framing::None | Framing::Length(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> SocketAddr {
        "192.0.2.7:4242".parse().unwrap()
    }

    fn request(head: &str) -> Result<Request, Reject> {
        let bytes = head.as_bytes();
        let mut scan = HeadScan::default();
        match scan.find(bytes, 32 * 1024)? {
            Found::Complete(n) => parse_request(&bytes[..n], client()),
            Found::Partial => panic!("incomplete: {head:?}"),
        }
    }

    fn status_of(head: &str) -> u16 {
        match request(head) {
            Ok(_) => 200,
            Err(r) => r.status,
        }
    }

    /// The smuggling table: each of these is refused with its status.
    #[test]
    fn malformed_requests_are_refused_with_their_status() {
        let table: &[(&str, u16)] = &[
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", 200),
            ("GET / HTTP/1.0\r\n\r\n", 200),
            ("GET / HTTP/1.1\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost:\r\n\r\n", 400),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
                400,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1 000\r\n\r\n",
                400,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5,5\r\n\r\n",
                400,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                400,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
                400,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
                400,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n",
                400,
            ),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\n b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", 400),
            ("GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", 400),
            ("GET /#frag HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET /caf\u{e9} HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 400),
            ("GET index.html HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                400,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n",
                400,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
                400,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
                501,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                501,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
                501,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked,\r\n\r\n",
                400,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \"chunked\"\r\n\r\n",
                400,
            ),
            ("CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 405),
            ("TRACE / HTTP/1.1\r\nHost: a\r\n\r\n", 405),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nExpect: something\r\n\r\n",
                417,
            ),
            ("GET http://b/x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n", 200),
            ("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", 200),
            ("GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", 200),
            ("GET / HTTP/1.1\r\nHost: example.com:8080\r\n\r\n", 200),
            ("GET / HTTP/1.1\r\nHost: example.com:80x\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a:b:80\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: ::1\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a:\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: 10.0.0.1:8080\r\n\r\n", 200),
            ("\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 200),
        ];
        for (head, status) in table {
            assert_eq!(status_of(head), *status, "{head:?}");
        }
    }

    #[test]
    fn long_lines_and_heads_get_414_and_431() {
        let long_target = format!(
            "GET /{} HTTP/1.1\r\nHost: a\r\n\r\n",
            "a".repeat(MAX_REQUEST_LINE)
        );
        assert_eq!(status_of(&long_target), 414);
        let many = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            "X-A: 1\r\n".repeat(MAX_FIELDS)
        );
        assert_eq!(status_of(&many), 431);
        let mut scan = HeadScan::default();
        let big = format!("GET / HTTP/1.1\r\nX: {}", "b".repeat(100));
        assert_eq!(scan.find(big.as_bytes(), 64).unwrap_err().status, 431);
    }

    /// What the backend gets is a head we wrote: hop-by-hop fields, fields
    /// Connection names, names with `_`, Expect and the client's own
    /// X-Real-IP/X-Forwarded-Proto are gone; X-Forwarded-For is appended
    /// to; Host is as received; the body's length is ours.
    #[test]
    fn the_upstream_head_is_ours() {
        let r = request(
            "POST /up?x=1 HTTP/1.1\r\nHost: Example.com\r\nConnection: keep-alive, X-Secret\r\n\
             X-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade: websocket\r\nProxy-Connection: x\r\n\
             X_Forwarded_For: 6.6.6.6\r\nX-Forwarded-For: 10.0.0.1\r\nX-Real-IP: 1.1.1.1\r\n\
             X-Forwarded-Proto: https\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\
             Accept: */*\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.framing, Framing::Chunked);
        assert!(r.expect_continue && r.keep_alive);
        let backend: SocketAddr = "10.0.0.9:8000".parse().unwrap();
        let head = String::from_utf8(r.upstream_head(11, false, backend)).unwrap();
        assert_eq!(
            head,
            "POST /up?x=1 HTTP/1.1\r\nHost: Example.com\r\nAccept: */*\r\n\
             X-Forwarded-For: 10.0.0.1, 192.0.2.7\r\nX-Real-IP: 192.0.2.7\r\n\
             X-Forwarded-Proto: http\r\nContent-Length: 11\r\n\r\n"
        );
        let get = request("GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!(
            String::from_utf8(get.upstream_head(0, true, backend)).unwrap(),
            "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 192.0.2.7\r\nX-Real-IP: 192.0.2.7\r\n\
             X-Forwarded-Proto: http\r\nConnection: close\r\n\r\n"
        );
    }

    /// Found by the request fuzz target: a head at the field limit is
    /// passed on whole, with our fields on top of it (the backend's own
    /// limits decide; nginx counts none), so a second spillway behind this
    /// one would answer 431.
    #[test]
    fn a_head_at_the_field_limit_is_passed_on_whole() {
        let fields = "X-A: 1\r\n".repeat(MAX_FIELDS - 1);
        let r = request(&format!(
            "PUT / HTTP/1.1\r\nHost: a\r\n{fields}Content-Length: 3\r\n\r\n"
        ));
        assert_eq!(r.unwrap_err().status, 431, "129 fields");
        let r = request(&format!("PUT / HTTP/1.1\r\nHost: a\r\n{fields}\r\n")).unwrap();
        let backend: SocketAddr = "10.0.0.9:8000".parse().unwrap();
        let head = String::from_utf8(r.upstream_head(0, true, backend)).unwrap();
        assert_eq!(head.matches("X-A: 1\r\n").count(), MAX_FIELDS - 1);
        assert_eq!(head.matches("\r\n").count() - 2, MAX_FIELDS + 4, "{head}");
        assert_eq!(status_of(&head), 431);
    }

    /// HTTP/1.0 may come without Host; HTTP/1.1 to the backend may not:
    /// it gets the backend's address.
    #[test]
    fn a_request_without_host_gets_the_backends() {
        let r = request("GET / HTTP/1.0\r\n\r\n").unwrap();
        let backend: SocketAddr = "10.0.0.9:8000".parse().unwrap();
        let head = String::from_utf8(r.upstream_head(0, false, backend)).unwrap();
        assert!(
            head.starts_with("GET / HTTP/1.1\r\nHost: 10.0.0.9:8000\r\n"),
            "{head}"
        );
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        let ka = |h: &str| request(h).unwrap().keep_alive;
        assert!(ka("GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!ka(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        ));
        assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
        assert!(ka("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    }

    /// A head found in pieces, split anywhere, is found at the same place,
    /// and a bare LF is refused wherever the split falls.
    #[test]
    fn heads_are_found_whatever_the_split() {
        let text = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBODY";
        for cut in 0..text.len() {
            let mut scan = HeadScan::default();
            let first = scan.find(&text[..cut], 1024);
            if let Ok(Found::Complete(n)) = first {
                assert_eq!(n, 27);
                continue;
            }
            assert_eq!(first, Ok(Found::Partial), "cut {cut}");
            assert_eq!(scan.find(text, 1024), Ok(Found::Complete(27)), "cut {cut}");
        }
        let bare = b"GET / HTTP/1.1\r\nHost: a\n\r\n\r\n";
        for cut in 0..bare.len() {
            let mut scan = HeadScan::default();
            let outcome = scan
                .find(&bare[..cut], 1024)
                .and_then(|_| scan.find(bare, 1024));
            assert_eq!(outcome.unwrap_err().status, 400, "cut {cut}");
        }
    }

    fn response(head: &str, head_request: bool) -> Result<Response, Reject> {
        match parse_response(head.as_bytes(), head_request, false)? {
            ResponseHead::Final(r) => Ok(r),
            ResponseHead::Interim(_) => panic!("interim"),
        }
    }

    #[test]
    fn responses_are_framed_and_judged() {
        let r = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: y\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!((r.framing, r.reusable), (Framing::Length(5), true));
        let (head, how) = r.client_head(1, true);
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "HTTP/1.1 200 OK\r\nX: y\r\nContent-Length: 5\r\n\r\n"
        );
        assert_eq!(how, ClientFraming::AsSent);
        let r = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(r.framing, Framing::Chunked);
        assert_eq!(r.client_head(0, true).1, ClientFraming::Dechunked);
        assert!(!r.keeps_client(0));
        let r = response("HTTP/1.1 200 OK\r\n\r\n", false).unwrap();
        assert_eq!((r.framing, r.reusable), (Framing::UntilClose, false));
        assert!(
            String::from_utf8(r.client_head(1, true).0)
                .unwrap()
                .contains("Connection: close")
        );
        let r = response("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true).unwrap();
        assert_eq!(r.framing, Framing::None);
        assert!(
            String::from_utf8(r.client_head(1, true).0)
                .unwrap()
                .contains("Content-Length: 9")
        );
        let r = response("HTTP/1.1 304 Not Modified\r\n\r\n", false).unwrap();
        assert_eq!(r.framing, Framing::None);
        let r = response("HTTP/1.1 204 No Content\r\n\r\n", false).unwrap();
        assert_eq!(r.framing, Framing::None);
        let r = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(!r.reusable);
        let r = response("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false).unwrap();
        assert!(!r.reusable);
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 600 Nope\r\n\r\n",
        ] {
            assert_eq!(response(bad, false).unwrap_err().status, 502, "{bad:?}");
        }
        assert!(matches!(
            parse_response(b"HTTP/1.1 100 Continue\r\n\r\n", false, false),
            Ok(ResponseHead::Interim(25))
        ));
    }
}
