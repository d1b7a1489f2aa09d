//! What each connection does, drawn from the seed and its id alone, so that
//! the client and whichever backend the proxy picks agree on it without
//! talking, and a failing run can be replayed from its seed.
//!
//! Sizes are bounded by pace: a slow end moves at most a few seconds' worth,
//! so every connection ends in seconds and a 60 s run on two cores is
//! comfortable. The big responses (up to 64 MiB) go to fast readers, or to
//! slow readers that vanish part-way: those are the ones the proxy spills.

use std::time::Duration;

use crate::data::{HEAD, splitmix};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// A slow writer uploads at most this many seconds' worth.
const UP_SECS: u64 = 6;
/// A slow reader is sent at most this many seconds' worth (unless it
/// vanishes part-way, which it then does within this time).
const DOWN_SECS: u64 = 8;

/// A seeded generator (splitmix64): one per connection, per fault schedule.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        splitmix(&mut self.0)
    }

    /// In `0..n` (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// In `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    pub fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    /// In `lo..=hi`, uniform in the logarithm: as many small as large.
    pub fn log_range(&mut self, lo: u64, hi: u64) -> u64 {
        let (l, h) = ((lo.max(1) as f64).ln(), (hi.max(1) as f64).ln());
        let x = l + (h - l) * (self.next_u64() as f64 / u64::MAX as f64);
        (x.exp() as u64).clamp(lo, hi)
    }

    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

/// How a client ends its connection early, if it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    None,
    /// Reset (linger 0) once this many upstream bytes, hello included, are
    /// written: a stream cut short.
    ResetAtUpload(u64),
    /// Reset once this many downstream bytes are read: a client that
    /// vanishes without a FIN.
    VanishAtDownload(u64),
}

/// What the resetting backend does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendReset {
    /// Write this many downstream bytes (header included), then reset.
    MidResponse(u64),
    /// Read this many upstream bytes (hello included), then reset.
    MidUpload(u64),
    /// Write the whole response and a FIN, wait, then reset: the response
    /// is complete, and arrives whole or (if the reset overtook the FIN in
    /// the proxy) is cut.
    AfterFin(Duration),
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub id: u64,
    /// Upload body bytes after the hello.
    pub upload: u64,
    /// Bytes per second; `None` is as fast as it goes.
    pub write_rate: Option<u64>,
    pub read_rate: Option<u64>,
    /// How long a slow reader keeps its pace before it reads as fast as it
    /// can (`None`: throughout). Such a reader may get a big response: the
    /// proxy spills what it cannot take meanwhile.
    pub slow_for: Option<Duration>,
    /// SO_RCVBUF of a slow reader, so that its kernel cannot quietly absorb
    /// what it has not read.
    pub rcvbuf: Option<usize>,
    pub write_chunk: usize,
    pub read_chunk: usize,
    /// Half-close as soon as the upload is written; otherwise only after
    /// the response's EOF has been read (a client that keeps its write
    /// half open while it reads).
    pub early_half_close: bool,
    pub cut: Cut,
    /// Response body bytes of the responder, half-closer, flapper and
    /// resetter.
    pub response: u64,
    /// The slow-reading backend's response, once it has read the upload.
    pub slow_response: u64,
    /// How fast the slow-reading backend reads the upload.
    pub backend_read_rate: u64,
    pub backend_reset: BackendReset,
}

impl Plan {
    pub fn new(seed: u64, id: u64) -> Plan {
        let mut state = seed ^ id.wrapping_mul(0xa076_1d64_78bd_642f);
        let mut rng = Rng::new(splitmix(&mut state));
        let write_rate = rng.percent(25).then(|| rng.log_range(KIB, 256 * KIB));
        let read_rate = rng.percent(30).then(|| rng.log_range(KIB, 256 * KIB));
        let slow_for = read_rate
            .filter(|_| rng.percent(50))
            .map(|_| rng.millis(1_000, 5_000));
        let mut upload = match rng.below(100) {
            0..35 => 0,
            35..65 => rng.range(1, 4 * KIB),
            65..93 => rng.log_range(4 * KIB, MIB),
            _ => rng.log_range(MIB, 8 * MIB),
        };
        let mut response = match rng.below(1000) {
            0..80 => 0,
            80..450 => rng.range(1, 4 * KIB),
            450..925 => rng.log_range(4 * KIB, MIB),
            925..993 => rng.log_range(MIB, 16 * MIB),
            _ => rng.log_range(16 * MIB, 64 * MIB),
        };
        // A reader that is slow for a while, then fast: often a big
        // response, most of which the proxy must keep on disk meanwhile.
        if slow_for.is_some() && rng.percent(30) {
            response = response.max(rng.log_range(4 * MIB, 32 * MIB));
        }
        // The kind of cut first: whether it vanishes decides whether its
        // response is capped by its reading pace.
        let cut_kind = rng.below(100);
        if let Some(rate) = write_rate {
            upload = upload.min(rate * UP_SECS);
        }
        let vanishes = (8..16).contains(&cut_kind);
        if let (Some(rate), false, None) = (read_rate, vanishes, slow_for) {
            // The echo sends the upload back: it is a response too.
            response = response.min(rate * DOWN_SECS);
            upload = upload.min(rate * DOWN_SECS);
        }
        let cut = match cut_kind {
            0..8 => Cut::ResetAtUpload(HEAD as u64 + rng.below(upload + 1)),
            // It vanishes somewhere in what it would read within DOWN_SECS,
            // from a response that may be far larger: the case spilling is
            // for, and the one that leaves most on disk to drop.
            8..16 => {
                let reach = HEAD as u64 + response.max(upload);
                let reach = match (read_rate, slow_for) {
                    (Some(r), None) => reach.min(r * DOWN_SECS),
                    _ => reach,
                };
                Cut::VanishAtDownload(rng.below(reach + 1))
            }
            _ => Cut::None,
        };
        let chunk = |rng: &mut Rng, total: u64| match rng.below(100) {
            0..55 => 64 * KIB as usize,
            55..80 => 16 * KIB as usize,
            80..95 => 1500,
            // Tiny pieces only where they cost few syscalls.
            _ if total <= 64 * KIB => 7,
            _ => 4096,
        };
        let write_chunk = chunk(&mut rng, upload);
        let read_chunk = chunk(&mut rng, response.max(upload));
        let rcvbuf = read_rate.map(|r| (r / 4).clamp(4 * KIB, 64 * KIB) as usize);
        let early_half_close = rng.percent(70);
        let slow_response = response.min(rng.log_range(1, 256 * KIB));
        let backend_read_rate = rng
            .log_range(16 * KIB, 256 * KIB)
            .max((HEAD as u64 + upload).div_ceil(UP_SECS));
        let backend_reset = match rng.below(100) {
            0..40 => BackendReset::MidResponse(rng.below(HEAD as u64 + response)),
            40..65 => BackendReset::MidUpload(HEAD as u64 + rng.below(upload + 1)),
            _ => BackendReset::AfterFin(rng.millis(0, 50)),
        };
        Plan {
            id,
            upload,
            write_rate,
            read_rate,
            slow_for,
            rcvbuf,
            write_chunk,
            read_chunk,
            early_half_close,
            cut,
            response,
            slow_response,
            backend_read_rate,
            backend_reset,
        }
    }

    /// Upstream bytes, hello included.
    pub fn upstream_len(&self) -> u64 {
        HEAD as u64 + self.upload
    }

    /// How long this connection should take at its paces, at most, were
    /// nothing else going on: the base of every deadline.
    pub fn nominal(&self) -> Duration {
        let up = self
            .write_rate
            .map_or(0.0, |r| self.upstream_len() as f64 / r as f64);
        let biggest = HEAD as u64 + self.response.max(self.upload);
        let down = match (self.read_rate, self.slow_for) {
            (Some(_), Some(slow)) => slow.as_secs_f64(),
            (Some(r), None) => biggest as f64 / r as f64,
            (None, _) => 0.0,
        };
        let backend = self.upstream_len() as f64 / self.backend_read_rate as f64;
        Duration::from_secs_f64(up + down + backend)
    }

    /// When a client or backend stops waiting and calls the connection
    /// hung: generous, since the machine is shared and clients may wait in
    /// the listen backlog behind --max-connections first. Only reached if
    /// something is stuck (the proxy's idle timeout ends every quiet one).
    pub fn patience(&self) -> Duration {
        self.nominal() * 3 + Duration::from_secs(60)
    }
}
