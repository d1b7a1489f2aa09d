//! A chunked-body decoder (RFC 9112 §7.1), sans-IO and strict: bytes in,
//! data out, nothing allocated, every length bounded. Written by hand
//! because a lenient decoder is a request-smuggling hole: a proxy and its
//! backend that disagree on where a chunked body ends see two different
//! requests. So anything that is not exactly the grammar is an error, at
//! the byte it is seen:
//!
//! ```text
//! chunked-body = *chunk last-chunk trailer-section CRLF
//! chunk        = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
//! chunk-size   = 1*16HEXDIG            (more than 16 digits: an error)
//! chunk-ext    = *( BWS ";" ... )     (visible bytes and tabs; 16KiB at most in all)
//! last-chunk   = 1*("0") [ chunk-ext ] CRLF
//! ```
//!
//! Lines end in CRLF only: a bare LF, or a CR not followed by LF, is an
//! error, as is anything but CRLF after a chunk's data. Trailer fields are
//! read (each line checked for control bytes, their total bounded) and
//! dropped: a proxy that re-frames a body with `Content-Length` has nowhere
//! to put them. The same input gives the same data and the same verdict
//! however it is split across calls (tests check every split).

/// Most hex digits of a chunk size: 16 fill a `u64`.
pub const MAX_SIZE_DIGITS: u8 = 16;

/// Most bytes of chunk extensions in one body, all chunks together.
pub const MAX_EXTENSIONS: usize = 16 * 1024;

/// Why a chunked body is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkError {
    /// Not a hex digit where a chunk size was expected.
    BadSize,
    /// A chunk size of more than 16 hex digits.
    SizeTooLong,
    /// Chunk extensions over `MAX_EXTENSIONS`, or a control byte in one.
    BadExtension,
    /// A line that does not end in CRLF (a bare LF, a lone CR), or data
    /// not followed by CRLF.
    BadLineEnd,
    /// A control byte in a trailer, or trailers over their bound.
    BadTrailer,
}

impl std::fmt::Display for ChunkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChunkError::BadSize => "invalid chunk size",
            ChunkError::SizeTooLong => "chunk size over 16 hex digits",
            ChunkError::BadExtension => "invalid or oversized chunk extension",
            ChunkError::BadLineEnd => "bare LF or missing CRLF in chunked framing",
            ChunkError::BadTrailer => "invalid or oversized trailer",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading a chunk size: `digits` so far, worth `size`.
    Size {
        digits: u8,
        size: u64,
    },
    /// Spaces or tabs after the size: only a `;` may follow.
    SizeSpace {
        size: u64,
    },
    /// Inside a chunk extension, until CR.
    Extension {
        size: u64,
    },
    /// Read the CR ending the size line.
    SizeCr {
        size: u64,
    },
    /// `left` bytes of chunk data to go.
    Data {
        left: u64,
    },
    /// Data done: CR, then LF.
    DataCr,
    DataLf,
    /// In the trailer section: at the start of a line (an empty line ends
    /// the body), inside a field line, or after a CR.
    TrailerStart,
    TrailerLine,
    TrailerCr {
        empty: bool,
    },
    Done,
}

/// What one call to `decode` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Input bytes used up (the rest belongs to the next call, or, once
    /// `done`, to whatever follows the body).
    pub consumed: usize,
    /// The body's last byte was read: nothing after `consumed` is its.
    pub done: bool,
}

/// Decodes one chunked body.
#[derive(Clone, Debug)]
pub struct ChunkedDecoder {
    state: State,
    /// Extension bytes seen so far, all chunks together.
    extensions: usize,
    /// Trailer bytes seen so far, and the most allowed.
    trailers: usize,
    max_trailers: usize,
    /// Data bytes given out so far.
    data: u64,
}

impl ChunkedDecoder {
    /// A decoder whose trailer section may take at most `max_trailers`
    /// bytes (the head size limit is a fair choice).
    pub fn new(max_trailers: usize) -> ChunkedDecoder {
        ChunkedDecoder {
            state: State::Size { digits: 0, size: 0 },
            extensions: 0,
            trailers: 0,
            max_trailers,
            data: 0,
        }
    }

    /// Data bytes given out so far: the body's length once `done`.
    pub fn data_len(&self) -> u64 {
        self.data
    }

    /// Data bytes announced so far: those given out, and the rest of the
    /// chunk under way. A body limit can be judged on this as soon as a
    /// chunk's size is read, without waiting for its bytes.
    pub fn announced(&self) -> u64 {
        match self.state {
            State::Data { left } => self.data.saturating_add(left),
            _ => self.data,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decode from `input`, handing each piece of chunk data to `sink`,
    /// which returns how much of it it took: when it takes less than it
    /// was given (no room), decoding stops there and the rest of the
    /// input is left for the next call.
    pub fn decode(
        &mut self,
        input: &[u8],
        mut sink: impl FnMut(&[u8]) -> usize,
    ) -> Result<Decoded, ChunkError> {
        let mut at = 0;
        while at < input.len() && self.state != State::Done {
            if let State::Data { left } = self.state {
                let n = (input.len() - at).min(left.min(usize::MAX as u64) as usize);
                let took = sink(&input[at..at + n]);
                debug_assert!(took <= n, "a sink took more than it was given");
                at += took;
                self.data += took as u64;
                let left = left - took as u64;
                self.state = if left == 0 {
                    State::DataCr
                } else {
                    State::Data { left }
                };
                if took < n {
                    break;
                }
                continue;
            }
            self.state = self.step(input[at])?;
            at += 1;
        }
        Ok(Decoded {
            consumed: at,
            done: self.state == State::Done,
        })
    }

    /// The state after one framing byte.
    fn step(&mut self, b: u8) -> Result<State, ChunkError> {
        Ok(match self.state {
            State::Size { digits, size } => match (b, hex(b)) {
                (_, Some(v)) if digits < MAX_SIZE_DIGITS => State::Size {
                    digits: digits + 1,
                    size: size << 4 | u64::from(v),
                },
                (_, Some(_)) => return Err(ChunkError::SizeTooLong),
                _ if digits == 0 => return Err(ChunkError::BadSize),
                (b'\r', _) => State::SizeCr { size },
                (b';', _) => self.extension(size)?,
                (b' ' | b'\t', _) => State::SizeSpace { size },
                (b'\n', _) => return Err(ChunkError::BadLineEnd),
                _ => return Err(ChunkError::BadSize),
            },
            State::SizeSpace { size } => match b {
                b' ' | b'\t' => State::SizeSpace { size },
                b';' => self.extension(size)?,
                _ => return Err(ChunkError::BadSize),
            },
            State::Extension { size } => match b {
                b'\r' => State::SizeCr { size },
                b'\t' | 0x20..=0x7e | 0x80..=0xff => self.extension(size)?,
                _ => return Err(ChunkError::BadExtension),
            },
            State::SizeCr { size } => match b {
                b'\n' if size == 0 => State::TrailerStart,
                b'\n' => State::Data { left: size },
                _ => return Err(ChunkError::BadLineEnd),
            },
            State::Data { .. } => unreachable!("data is taken in bulk"),
            State::DataCr => match b {
                b'\r' => State::DataLf,
                _ => return Err(ChunkError::BadLineEnd),
            },
            State::DataLf => match b {
                b'\n' => State::Size { digits: 0, size: 0 },
                _ => return Err(ChunkError::BadLineEnd),
            },
            State::TrailerStart => match b {
                b'\r' => State::TrailerCr { empty: true },
                _ => self.trailer(b)?,
            },
            State::TrailerLine => match b {
                b'\r' => State::TrailerCr { empty: false },
                _ => self.trailer(b)?,
            },
            State::TrailerCr { empty } => match b {
                b'\n' if empty => State::Done,
                b'\n' => State::TrailerStart,
                _ => return Err(ChunkError::BadLineEnd),
            },
            State::Done => State::Done,
        })
    }

    /// One more byte of chunk extension.
    fn extension(&mut self, size: u64) -> Result<State, ChunkError> {
        self.extensions += 1;
        if self.extensions > MAX_EXTENSIONS {
            return Err(ChunkError::BadExtension);
        }
        Ok(State::Extension { size })
    }

    /// One more byte of a trailer field line (not CR).
    fn trailer(&mut self, b: u8) -> Result<State, ChunkError> {
        self.trailers += 1;
        match b {
            _ if self.trailers > self.max_trailers => Err(ChunkError::BadTrailer),
            b'\n' => Err(ChunkError::BadLineEnd),
            b'\t' | 0x20..=0x7e | 0x80..=0xff => Ok(State::TrailerLine),
            _ => Err(ChunkError::BadTrailer),
        }
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Write `data` as one chunk: `{len:x}\r\n{data}\r\n` (for re-framing a
/// response to a client); `data` empty writes the last chunk and the end.
pub fn chunk_header(len: usize) -> String {
    if len == 0 {
        "0\r\n\r\n".to_string()
    } else {
        format!("{len:x}\r\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decode `input` whole, in one call: (data, consumed) or the error.
    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, usize, bool), ChunkError> {
        let mut d = ChunkedDecoder::new(1024);
        let mut out = Vec::new();
        let r = d.decode(input, |b| {
            out.extend_from_slice(b);
            b.len()
        })?;
        Ok((out, r.consumed, r.done))
    }

    /// Decode `input` fed in pieces cut at `cuts`.
    fn decode_split(input: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, usize, bool), ChunkError> {
        let mut d = ChunkedDecoder::new(1024);
        let mut out = Vec::new();
        let mut at = 0;
        let mut bounds = cuts.to_vec();
        bounds.push(input.len());
        for end in bounds {
            while at < end && !d.is_done() {
                let r = d.decode(&input[at..end], |b| {
                    out.extend_from_slice(b);
                    b.len()
                })?;
                at += r.consumed;
                if r.consumed == 0 {
                    break;
                }
            }
        }
        Ok((out, at, d.is_done()))
    }

    const GOOD: &[(&[u8], &[u8])] = &[
        (b"0\r\n\r\n", b""),
        (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
        (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
        (b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
        (b"a;name=value\r\n0123456789\r\n0;x\r\n\r\n", b"0123456789"),
        (b"3 ;ext\r\nabc\r\n0\r\n\r\n", b"abc"),
        (
            b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\nOther: two words\r\n\r\n",
            b"abc",
        ),
        (b"0000000000000003\r\nabc\r\n000\r\n\r\n", b"abc"),
    ];

    const BAD: &[(&[u8], ChunkError)] = &[
        (b"\r\n", ChunkError::BadSize),
        (b"x\r\n", ChunkError::BadSize),
        (b"+5\r\nhello\r\n0\r\n\r\n", ChunkError::BadSize),
        (b"-1\r\n", ChunkError::BadSize),
        (b"0x5\r\nhello\r\n0\r\n\r\n", ChunkError::BadSize),
        (b"00000000000000005\r\nhello\r\n", ChunkError::SizeTooLong),
        (b"10000000000000000\r\n", ChunkError::SizeTooLong),
        (b"5\nhello\r\n0\r\n\r\n", ChunkError::BadLineEnd),
        (b"5\r\nhello\n0\r\n\r\n", ChunkError::BadLineEnd),
        (b"5\r\nhelloX\r\n0\r\n\r\n", ChunkError::BadLineEnd),
        (b"5\r\nhello\r\n0\n\r\n", ChunkError::BadLineEnd),
        (b"5\r\nhello\r\n0\r\n\n", ChunkError::BadLineEnd),
        (b"5 \r\nhello\r\n0\r\n\r\n", ChunkError::BadSize),
        (b"5;a\nb\r\nhello\r\n", ChunkError::BadExtension),
        (b"5;a\0\r\nhello\r\n", ChunkError::BadExtension),
        (b"5\r\r\nhello\r\n", ChunkError::BadLineEnd),
        (b"0\r\nX: a\nY: b\r\n\r\n", ChunkError::BadLineEnd),
        (b"0\r\nX: a\x01\r\n\r\n", ChunkError::BadTrailer),
        (b"0\r\nX: a\rb\r\n\r\n", ChunkError::BadLineEnd),
    ];

    #[test]
    fn well_formed_bodies_decode_to_their_data() {
        for (input, data) in GOOD {
            let (got, consumed, done) = decode_all(input).unwrap();
            assert_eq!(got, *data, "{:?}", String::from_utf8_lossy(input));
            assert_eq!(consumed, input.len());
            assert!(done);
        }
    }

    #[test]
    fn malformed_framing_is_refused_at_the_byte_it_is_seen() {
        for (input, expected) in BAD {
            assert_eq!(
                decode_all(input).unwrap_err(),
                *expected,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    /// Every split of every case, good or bad, gives what one call gives:
    /// the same data, the same end, the same error.
    #[test]
    fn every_split_gives_the_same_result() {
        let mut cases: Vec<&[u8]> = GOOD.iter().map(|(i, _)| *i).collect();
        cases.extend(BAD.iter().map(|(i, _)| *i));
        for input in cases {
            let whole = decode_all(input);
            for a in 0..=input.len() {
                for b in a..=input.len() {
                    assert_eq!(
                        decode_split(input, &[a, b]),
                        whole,
                        "{:?} cut at {a} and {b}",
                        String::from_utf8_lossy(input)
                    );
                }
            }
        }
    }

    /// Bytes after the body are not its: decoding stops at its end.
    #[test]
    fn decoding_stops_at_the_end_of_the_body() {
        let input = b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
        let (data, consumed, done) = decode_all(input).unwrap();
        assert_eq!((data.as_slice(), consumed, done), (&b"abc"[..], 13, true));
    }

    /// A sink that takes only part of what it is given stops decoding
    /// there; the next call goes on from that byte.
    #[test]
    fn a_full_sink_stops_decoding_where_it_stopped_taking() {
        let input = b"a\r\n0123456789\r\n0\r\n\r\n";
        let mut d = ChunkedDecoder::new(64);
        let mut out = Vec::new();
        let r = d
            .decode(input, |b| {
                let n = b.len().min(4);
                out.extend_from_slice(&b[..n]);
                n
            })
            .unwrap();
        assert_eq!(
            (r.consumed, r.done, out.as_slice()),
            (7, false, &b"0123"[..])
        );
        let r2 = d
            .decode(&input[r.consumed..], |b| {
                out.extend_from_slice(b);
                b.len()
            })
            .unwrap();
        assert!(r2.done);
        assert_eq!(out, b"0123456789");
        assert_eq!(d.data_len(), 10);
    }

    /// A chunk's size counts as soon as it is read.
    #[test]
    fn a_chunk_is_announced_before_its_bytes() {
        let mut d = ChunkedDecoder::new(64);
        d.decode(b"3\r\nabc\r\nFFFFFFFFFFFFFFFF\r\nx", |b| b.len())
            .unwrap();
        assert_eq!(d.data_len(), 4);
        assert_eq!(d.announced(), u64::MAX, "saturates");
    }

    #[test]
    fn extensions_and_trailers_are_bounded() {
        let mut body = b"1;".to_vec();
        body.extend(std::iter::repeat_n(b'x', MAX_EXTENSIONS));
        body.extend_from_slice(b"\r\na\r\n0\r\n\r\n");
        assert_eq!(decode_all(&body).unwrap_err(), ChunkError::BadExtension);
        let mut trailers = b"0\r\n".to_vec();
        trailers.extend(std::iter::repeat_n(b'y', 2000));
        trailers.extend_from_slice(b"\r\n\r\n");
        assert_eq!(decode_all(&trailers).unwrap_err(), ChunkError::BadTrailer);
    }
}
