//! What flows through the proxy: every byte either end sends is a pure
//! function of the connection id, so each end checks what it receives as it
//! arrives and nothing is stored.
//!
//! - Upstream (client->backend): a 16-byte hello naming the id, then
//!   `upload` bytes of the id's up stream.
//! - Downstream (backend->client): a 16-byte header naming the backend's
//!   kind and the id, then either the echo of the up stream (echo backend)
//!   or the id's body stream.
//!
//! Streams are windows into one pseudo-random cycle whose period is a prime,
//! so it lines up with no buffer size; each stream starts at an offset
//! derived from its key. A byte lost, doubled, reordered or delivered to the
//! wrong connection does not compare equal.

use std::sync::OnceLock;

/// Bytes in the hello and in the header.
pub const HEAD: usize = 16;

/// The largest slice handed out or compared at once.
pub const WINDOW: usize = 64 * 1024;

/// The cycle's period: a prime, so it lines up with no buffer size.
const PERIOD: usize = 1_048_583;

const HELLO_MAGIC: &[u8; 4] = b"SOAK";
const HEADER_MAGIC: &[u8; 4] = b"SPWB";

/// The kinds of backend that write, as the header names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    Echo = 1,
    Responder = 2,
    SlowReader = 3,
    HalfCloser = 4,
    Resetter = 5,
    Flapper = 6,
}

const WRITERS: [Writer; 6] = [
    Writer::Echo,
    Writer::Responder,
    Writer::SlowReader,
    Writer::HalfCloser,
    Writer::Resetter,
    Writer::Flapper,
];

impl Writer {
    fn from_code(code: u8) -> Option<Writer> {
        WRITERS.iter().copied().find(|w| *w as u8 == code)
    }
}

/// PERIOD + WINDOW bytes of the cycle, so that any window of up to WINDOW
/// bytes starting inside the period is one slice.
fn pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| {
        let mut state = 0x534f_414b_5350_5742u64;
        let mut bytes = Vec::with_capacity(PERIOD + WINDOW + 8);
        while bytes.len() < PERIOD {
            bytes.extend_from_slice(&splitmix(&mut state).to_le_bytes());
        }
        bytes.truncate(PERIOD);
        let head = bytes[..WINDOW].to_vec();
        bytes.extend_from_slice(&head);
        bytes
    })
}

pub fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The key of the client's up stream (what an echo backend sends back).
pub fn up_key(id: u64) -> u64 {
    id << 1
}

/// The key of the body a responding backend sends.
pub fn body_key(id: u64) -> u64 {
    (id << 1) | 1
}

fn start_of(key: u64) -> usize {
    let mut state = key ^ 0x5eed_5eed_5eed_5eed;
    (splitmix(&mut state) % PERIOD as u64) as usize
}

/// Up to `max` (at most WINDOW) bytes of stream `key` from offset `at`.
pub fn slice(key: u64, at: u64, max: usize) -> &'static [u8] {
    let start = ((start_of(key) as u64 + at) % PERIOD as u64) as usize;
    &pattern()[start..start + max.min(WINDOW)]
}

/// The client's first 16 bytes: magic, id, and a check of the id.
pub fn hello(id: u64) -> [u8; HEAD] {
    let mut out = [0u8; HEAD];
    out[..4].copy_from_slice(HELLO_MAGIC);
    out[4..12].copy_from_slice(&id.to_le_bytes());
    out[12..].copy_from_slice(&hello_check(id).to_le_bytes());
    out
}

fn hello_check(id: u64) -> u32 {
    let mut state = id ^ 0xc0ff_ee00_c0ff_ee00;
    splitmix(&mut state) as u32
}

/// A writing backend's first 16 bytes: magic, its kind, the id it serves.
pub fn header(kind: Writer, id: u64) -> [u8; HEAD] {
    let mut out = [0u8; HEAD];
    out[..4].copy_from_slice(HEADER_MAGIC);
    out[4] = kind as u8;
    out[8..].copy_from_slice(&id.to_le_bytes());
    out
}

/// Compares bytes, as they arrive in pieces, with one stream from offset 0.
struct StreamCheck {
    key: u64,
    at: u64,
    first_wrong: Option<u64>,
}

impl StreamCheck {
    fn new(key: u64) -> StreamCheck {
        StreamCheck {
            key,
            at: 0,
            first_wrong: None,
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let want = slice(self.key, self.at, bytes.len());
            let n = want.len();
            // memcmp first; the search for where they differ runs only once
            // they do, so checking costs little next to the copy.
            if self.first_wrong.is_none() && want != &bytes[..n] {
                let i = want.iter().zip(bytes).position(|(a, b)| a != b);
                self.first_wrong = Some(self.at + i.unwrap_or(0) as u64);
            }
            self.at += n as u64;
            bytes = &bytes[n..];
        }
    }
}

/// The client's check of what arrives from the proxy: the header names the
/// backend's kind (which says which stream follows) and must name this id.
pub struct DownCheck {
    id: u64,
    head: [u8; HEAD],
    head_len: usize,
    pub kind: Option<Writer>,
    body: Option<StreamCheck>,
    /// Bytes received, header included.
    pub bytes: u64,
    /// The first thing found wrong, if any.
    pub wrong: Option<String>,
}

impl DownCheck {
    pub fn new(id: u64) -> DownCheck {
        DownCheck {
            id,
            head: [0; HEAD],
            head_len: 0,
            kind: None,
            body: None,
            bytes: 0,
            wrong: None,
        }
    }

    pub fn feed(&mut self, mut bytes: &[u8]) {
        self.bytes += bytes.len() as u64;
        if self.head_len < HEAD {
            let n = bytes.len().min(HEAD - self.head_len);
            self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
            self.head_len += n;
            bytes = &bytes[n..];
            if self.head_len < HEAD {
                self.check_partial_head();
                return;
            }
            let kind = Writer::from_code(self.head[4]).filter(|k| self.head == header(*k, self.id));
            match kind {
                Some(kind) => {
                    self.kind = Some(kind);
                    let key = match kind {
                        Writer::Echo => up_key(self.id),
                        _ => body_key(self.id),
                    };
                    self.body = Some(StreamCheck::new(key));
                }
                None => {
                    self.note_wrong(format!(
                        "the response header is {:02x?}, not one for conn id {}",
                        self.head, self.id
                    ));
                    return;
                }
            }
        }
        if let Some(body) = &mut self.body {
            body.feed(bytes);
            if let Some(at) = body.first_wrong {
                self.note_wrong(format!(
                    "response body byte {at} (after the {HEAD}-byte header) differs from what a {:?} backend sends",
                    self.kind
                ));
            }
        }
    }

    /// A header cut short must still be the start of one a backend sends.
    fn check_partial_head(&mut self) {
        let got = &self.head[..self.head_len];
        if !WRITERS.iter().any(|k| header(*k, self.id).starts_with(got)) {
            self.note_wrong(format!(
                "the first {} response bytes {got:02x?} start no header for conn id {}",
                self.head_len, self.id
            ));
        }
    }

    fn note_wrong(&mut self, what: String) {
        self.wrong.get_or_insert(what);
    }
}

/// A backend's check of what arrives from the proxy: the hello says which
/// connection it serves, then the client's up stream must follow.
pub struct UpCheck {
    head: [u8; HEAD],
    head_len: usize,
    pub id: Option<u64>,
    body: Option<StreamCheck>,
    /// Bytes received, hello included.
    pub bytes: u64,
    pub wrong: Option<String>,
}

impl UpCheck {
    pub fn new() -> UpCheck {
        UpCheck {
            head: [0; HEAD],
            head_len: 0,
            id: None,
            body: None,
            bytes: 0,
            wrong: None,
        }
    }

    pub fn feed(&mut self, mut bytes: &[u8]) {
        self.bytes += bytes.len() as u64;
        if self.head_len < HEAD {
            let n = bytes.len().min(HEAD - self.head_len);
            self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
            self.head_len += n;
            bytes = &bytes[n..];
            if self.head_len < HEAD {
                let magic = self.head_len.min(HELLO_MAGIC.len());
                if self.head[..magic] != HELLO_MAGIC[..magic] {
                    self.note_wrong(format!(
                        "the first {} bytes {:02x?} start no hello",
                        self.head_len,
                        &self.head[..self.head_len]
                    ));
                }
                return;
            }
            let id = u64::from_le_bytes(self.head[4..12].try_into().expect("8 bytes"));
            if self.head != hello(id) {
                self.note_wrong(format!("a garbled hello: {:02x?}", self.head));
                return;
            }
            self.id = Some(id);
            self.body = Some(StreamCheck::new(up_key(id)));
        }
        if let Some(body) = &mut self.body {
            body.feed(bytes);
            if let Some(at) = body.first_wrong {
                self.note_wrong(format!(
                    "upload byte {at} (after the {HEAD}-byte hello) differs from what the client sends"
                ));
            }
        }
    }

    fn note_wrong(&mut self, what: String) {
        self.wrong.get_or_insert(what);
    }
}

/// The `n`th to `n + max` bytes of the client's upstream: hello, then body.
pub fn upstream(id: u64, hello: &[u8; HEAD], at: u64, max: usize) -> &[u8] {
    if at < HEAD as u64 {
        let at = at as usize;
        &hello[at..(at + max).min(HEAD)]
    } else {
        slice(up_key(id), at - HEAD as u64, max)
    }
}

/// The same for a writing backend's downstream: header, then `key`'s body.
pub fn downstream(header: &[u8; HEAD], key: u64, at: u64, max: usize) -> &[u8] {
    if at < HEAD as u64 {
        let at = at as usize;
        &header[at..(at + max).min(HEAD)]
    } else {
        slice(key, at - HEAD as u64, max)
    }
}
