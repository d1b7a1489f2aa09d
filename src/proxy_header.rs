//! The PROXY protocol (HAProxy's spec, versions 1 and 2): a header at the
//! very start of a connection that says who the client really is, for a
//! server behind a proxy or a balancer that would otherwise see only the
//! proxy's address.
//!
//! `--send-proxy v1|v2` writes one at the start of every backend
//! connection; `--accept-proxy` requires one at the start of every client
//! connection and takes the client's address from it. Parsing is sans-IO
//! and strict: a header that does not follow the spec to the byte (or
//! says an IPv4 family and carries IPv6, or declares a length too short
//! for its addresses) is refused, and the connection with it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12 bytes every version 2 header starts with.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// A version 1 header is one line of at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;

/// The most a version 2 header may take here (the fixed 16 bytes, the
/// addresses and whatever TLVs follow): more is refused, not read.
pub const V2_MAX: usize = 16 + 2048;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn parse(s: &str) -> Result<Version, String> {
        match s {
            "v1" => Ok(Version::V1),
            "v2" => Ok(Version::V2),
            _ => Err(format!(
                "'{s}' is not a PROXY protocol version: expected v1 or v2"
            )),
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        })
    }
}

/// The header for a connection from `client` that arrived at `local`.
/// (The two are of one family, as any one TCP connection's ends are.)
pub fn encode(version: Version, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (client, local) = same_family(client, local);
    match version {
        Version::V1 => {
            let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                client.ip(),
                local.ip(),
                client.port(),
                local.port()
            )
            .into_bytes()
        }
        Version::V2 => {
            let mut out = V2_SIGNATURE.to_vec();
            out.push(0x21); // version 2, PROXY
            match (client.ip(), local.ip()) {
                (IpAddr::V4(c), IpAddr::V4(l)) => {
                    out.push(0x11); // TCP over IPv4
                    out.extend_from_slice(&12u16.to_be_bytes());
                    out.extend_from_slice(&c.octets());
                    out.extend_from_slice(&l.octets());
                }
                (c, l) => {
                    out.push(0x21); // TCP over IPv6
                    out.extend_from_slice(&36u16.to_be_bytes());
                    out.extend_from_slice(&v6(c).octets());
                    out.extend_from_slice(&v6(l).octets());
                }
            }
            out.extend_from_slice(&client.port().to_be_bytes());
            out.extend_from_slice(&local.port().to_be_bytes());
            out
        }
    }
}

/// The header of a connection that carries no client (a health check):
/// `PROXY UNKNOWN`, or version 2's LOCAL.
pub fn encode_local(version: Version) -> Vec<u8> {
    match version {
        Version::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        Version::V2 => {
            let mut out = V2_SIGNATURE.to_vec();
            out.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
            out
        }
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// An IPv4 address to a peer on an IPv6 socket shows as mapped: say both
/// in one family.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    if a.is_ipv4() == b.is_ipv4() {
        return (a, b);
    }
    let six = |s: SocketAddr| SocketAddr::new(IpAddr::V6(v6(s.ip())), s.port());
    (six(a), six(b))
}

/// What reading a header found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not all there yet.
    Partial,
    /// The header is the first `len` bytes; `client` is who it names and
    /// `local` where that client connected to (`None`: UNKNOWN or LOCAL,
    /// keep the connection's own addresses).
    Complete {
        len: usize,
        client: Option<SocketAddr>,
        local: Option<SocketAddr>,
    },
}

/// Why a header is refused.
pub type Invalid = &'static str;

/// Read a header from the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, Invalid> {
    if buf.is_empty() {
        return Ok(Parsed::Partial);
    }
    if buf[0] == b'\r' {
        let n = buf.len().min(V2_SIGNATURE.len());
        if buf[..n] != V2_SIGNATURE[..n] {
            return Err("not a PROXY protocol header");
        }
        return parse_v2(buf);
    }
    let n = buf.len().min(6);
    if buf[..n] != b"PROXY "[..n] {
        return Err("not a PROXY protocol header");
    }
    parse_v1(buf)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, Invalid> {
    let Some(end) = buf.windows(2).take(V1_MAX - 1).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Err("a v1 line over 107 bytes");
        }
        if buf.contains(&b'\n') {
            return Err("a v1 line not ended by CRLF");
        }
        return Ok(Parsed::Partial);
    };
    let line = std::str::from_utf8(&buf[6..end]).map_err(|_| "non-ASCII in a v1 line")?;
    let len = end + 2;
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.as_slice() {
        ["UNKNOWN", ..] => Ok(Parsed::Complete {
            len,
            client: None,
            local: None,
        }),
        [family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let v4 = *family == "TCP4";
            let ip = |s: &str| -> Result<IpAddr, Invalid> {
                if v4 {
                    s.parse::<Ipv4Addr>()
                        .map(IpAddr::V4)
                        .map_err(|_| "a bad IPv4 address in a TCP4 line")
                } else {
                    s.parse::<Ipv6Addr>()
                        .map(IpAddr::V6)
                        .map_err(|_| "a bad IPv6 address in a TCP6 line")
                }
            };
            let src = ip(src)?;
            let dst = ip(dst)?;
            let port = |s: &str| -> Result<u16, Invalid> {
                let plain = !s.is_empty()
                    && s.bytes().all(|b| b.is_ascii_digit())
                    && (s == "0" || !s.starts_with('0'));
                plain
                    .then(|| s.parse::<u16>().ok())
                    .flatten()
                    .ok_or("a bad port in a v1 line")
            };
            let sport = port(sport)?;
            let dport = port(dport)?;
            Ok(Parsed::Complete {
                len,
                client: Some(SocketAddr::new(src, sport)),
                local: Some(SocketAddr::new(dst, dport)),
            })
        }
        _ => Err("a malformed v1 line"),
    }
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, Invalid> {
    if buf.len() < 16 {
        return Ok(Parsed::Partial);
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 {
        return Err("a v2 header of another version");
    }
    let family = buf[13];
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + body;
    if len > V2_MAX {
        return Err("a v2 header over its limit");
    }
    let need = match family {
        0x11 => 12,
        0x21 => 36,
        0x00 => 0,
        _ if command == 0 => 0,
        _ => return Err("a v2 family other than TCP over IPv4 or IPv6"),
    };
    if body < need {
        return Err("a v2 length too short for its addresses");
    }
    if buf.len() < len {
        return Ok(Parsed::Partial);
    }
    let a = &buf[16..];
    let port = |at: usize| u16::from_be_bytes([a[at], a[at + 1]]);
    let (client, local) = match (command, family) {
        (0, _) => (None, None),
        (1, 0x11) => {
            let ip = |at: usize| IpAddr::V4(Ipv4Addr::new(a[at], a[at + 1], a[at + 2], a[at + 3]));
            (
                Some(SocketAddr::new(ip(0), port(8))),
                Some(SocketAddr::new(ip(4), port(10))),
            )
        }
        (1, 0x21) => {
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            (
                Some(SocketAddr::new(ip(0), port(32))),
                Some(SocketAddr::new(ip(16), port(34))),
            )
        }
        (1, _) => return Err("a v2 PROXY command without addresses"),
        _ => return Err("a v2 command other than LOCAL or PROXY"),
    };
    Ok(Parsed::Complete { len, client, local })
}

/// When the last refusal was logged at WARN (ms since the process began
/// counting): one WARN per burst of bad headers, the rest at DEBUG.
static LAST_WARN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How long a burst lasts for the log.
const BURST: std::time::Duration = std::time::Duration::from_secs(10);

/// Log that connection `id` from `peer` had no valid header: at WARN if
/// none was logged in the last `BURST`, else at DEBUG.
pub fn log_refusal(id: &dyn std::fmt::Display, peer: SocketAddr, why: &str) {
    use std::sync::atomic::Ordering;
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let now = EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1;
    let last = LAST_WARN.load(Ordering::Relaxed);
    let warn = (last == 0 || now.saturating_sub(last) >= BURST.as_millis() as u64)
        && LAST_WARN
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
    if warn {
        log::warn!(
            "{id} client {peer}: no valid PROXY protocol header ({why}); closing it (more in the next {BURST:?} are logged at debug)"
        );
    } else {
        log::debug!("{id} client {peer}: no valid PROXY protocol header ({why}); closing it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// What we write, we read back as the same client, in every cut.
    #[test]
    fn encoded_headers_parse_back_whatever_the_cut() {
        let pairs = [
            (addr("203.0.113.7:5555"), addr("198.51.100.1:80")),
            (addr("[2001:db8::7]:5555"), addr("[2001:db8::1]:443")),
        ];
        for version in [Version::V1, Version::V2] {
            for (client, local) in pairs {
                let mut bytes = encode(version, client, local);
                let len = bytes.len();
                bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
                for cut in 0..len {
                    assert_eq!(
                        parse(&bytes[..cut]),
                        Ok(Parsed::Partial),
                        "{version} cut {cut}"
                    );
                }
                assert_eq!(
                    parse(&bytes),
                    Ok(Parsed::Complete {
                        len,
                        client: Some(client),
                        local: Some(local),
                    })
                );
            }
            let local = encode_local(version);
            assert_eq!(
                parse(&local),
                Ok(Parsed::Complete {
                    len: local.len(),
                    client: None,
                    local: None,
                })
            );
        }
        assert_eq!(
            String::from_utf8(encode(Version::V1, pairs[0].0, pairs[0].1)).unwrap(),
            "PROXY TCP4 203.0.113.7 198.51.100.1 5555 80\r\n"
        );
        // A mapped IPv4 client on an IPv6 listener: said as IPv6.
        let mixed = encode(Version::V1, addr("10.0.0.1:1"), addr("[::1]:2"));
        assert!(
            String::from_utf8(mixed)
                .unwrap()
                .starts_with("PROXY TCP6 ::ffff:10.0.0.1 ::1 ")
        );
    }

    #[test]
    fn lying_and_malformed_headers_are_refused() {
        let mut short_v2 = V2_SIGNATURE.to_vec();
        short_v2.extend_from_slice(&[0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
        let mut v1_family = V2_SIGNATURE.to_vec();
        v1_family.extend_from_slice(&[0x11, 0x11, 0x00, 0x0c]);
        let mut udp = V2_SIGNATURE.to_vec();
        udp.extend_from_slice(&[0x21, 0x12, 0x00, 0x0c]);
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        let bad: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 70000 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n",
            b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n",
            b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXYTCP4",
            &short_v2,
            &v1_family,
            &udp,
            &huge,
        ];
        for b in bad {
            assert!(parse(b).is_err(), "{:?}", String::from_utf8_lossy(b));
        }
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.extend(std::iter::repeat_n(b'x', 200));
        assert!(parse(&long).is_err(), "a v1 line with no end in 107 bytes");
    }

    #[test]
    fn v2_tlvs_are_skipped() {
        let mut h = encode(Version::V2, addr("1.2.3.4:5"), addr("6.7.8.9:10"));
        h[15] += 5; // a TLV of 5 bytes follows the addresses
        h.extend_from_slice(&[0x04, 0x00, 0x02, b'o', b'k']);
        assert_eq!(
            parse(&h),
            Ok(Parsed::Complete {
                len: h.len(),
                client: Some(addr("1.2.3.4:5")),
                local: Some(addr("6.7.8.9:10")),
            })
        );
    }
}
