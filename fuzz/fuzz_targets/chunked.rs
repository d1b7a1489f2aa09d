//! The chunked decoder: for any input, any split across two calls gives
//! what one call gives (data, bytes used, end, error); and a body it
//! accepts, chunked again our way, decodes to the same data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spillway::http::chunked::{ChunkError, ChunkedDecoder};

/// (data, consumed, done) or the error, feeding `input` cut at `cut`.
fn decode(input: &[u8], cut: usize) -> Result<(Vec<u8>, usize, bool), ChunkError> {
    let mut d = ChunkedDecoder::new(4096);
    let mut data = Vec::new();
    let mut at = 0;
    for end in [cut, input.len()] {
        while at < end && !d.is_done() {
            let r = d.decode(&input[at..end], |b| {
                data.extend_from_slice(b);
                b.len()
            })?;
            at += r.consumed;
            if r.consumed == 0 {
                break;
            }
        }
    }
    Ok((data, at, d.is_done()))
}

fuzz_target!(|bytes: &[u8]| {
    let Some((&seed, input)) = bytes.split_first() else {
        return;
    };
    let whole = decode(input, input.len());
    let cut = usize::from(seed) * input.len() / 255;
    assert_eq!(
        decode(input, cut),
        whole,
        "a split at {cut} changed the result"
    );
    if let Ok((data, consumed, true)) = whole {
        assert!(consumed <= input.len());
        // Chunked again, in pieces of the seed's size.
        let piece = usize::from(seed).max(1);
        let mut again = Vec::new();
        for chunk in data.chunks(piece) {
            again.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            again.extend_from_slice(chunk);
            again.extend_from_slice(b"\r\n");
        }
        again.extend_from_slice(b"0\r\n\r\n");
        let (same, used, done) = decode(&again, again.len()).expect("our own chunks are refused");
        assert!(done && used == again.len());
        assert_eq!(same, data);
    }
});
