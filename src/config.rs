//! What the proxy is told to do: a plain struct the command line fills and
//! tests build directly. Cross-field checks live in `validate`.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

pub const DEFAULT_MEMORY_BUFFER: u64 = 64 * 1024;
pub const DEFAULT_MAX_SPILL: u64 = 1 << 30;

/// Below this the relay would make a syscall per handful of bytes.
pub const MIN_MEMORY_BUFFER: u64 = 1024;

/// Above this one connection could pin gigabytes of RAM per direction.
pub const MAX_MEMORY_BUFFER: u64 = 1 << 30;

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub backends: Vec<SocketAddr>,
    /// Bytes held in memory per direction per connection before spilling.
    pub memory_buffer: u64,
    /// Bytes waiting on disk per direction per connection before reading
    /// from the sender stops.
    pub max_spill: u64,
    pub temp_dir: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            backends: Vec::new(),
            memory_buffer: DEFAULT_MEMORY_BUFFER,
            max_spill: DEFAULT_MAX_SPILL,
            temp_dir: std::env::temp_dir(),
        }
    }
}

/// A configuration the proxy cannot run with, said the way the command line
/// would say it: the flag, then what is wrong.
#[derive(Debug)]
pub struct ConfigError {
    pub flag: &'static str,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.flag, self.problem)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.backends.is_empty() {
            return Err(ConfigError {
                flag: "--backend",
                problem: "at least one backend is needed, e.g. --backend 127.0.0.1:9000".into(),
            });
        }
        if !(MIN_MEMORY_BUFFER..=MAX_MEMORY_BUFFER).contains(&self.memory_buffer) {
            return Err(ConfigError {
                flag: "--memory-buffer",
                problem: format!(
                    "{} is out of range: expected a size from 1KiB to 1GiB, e.g. 64KiB",
                    self.memory_buffer
                ),
            });
        }
        if let Err(e) = crate::spill::check_temp_dir(&self.temp_dir) {
            return Err(ConfigError {
                flag: "--temp-dir",
                problem: format!(
                    "{} cannot hold spill files: {e}; expected a writable directory",
                    self.temp_dir.display()
                ),
            });
        }
        Ok(())
    }
}

/// Parse `host:port`, `[v6]:port` or `name:port` (resolved now, first
/// address wins), for the command line.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let expected = "expected host:port, e.g. 127.0.0.1:8080, [::1]:8080 or localhost:8080";
    if !s.contains(':') {
        return Err(format!("'{s}' has no port: {expected}"));
    }
    match s.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("'{s}' resolves to no address: {expected}")),
        Err(e) => Err(format!("'{s}' cannot be resolved ({e}): {expected}")),
    }
}

/// Parse a size such as `64KiB`, `1MiB`, `10MB` or `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|_| format!("'{s}' is not a size: expected e.g. 64KiB, 1MiB, 10MB or 4096"))
}

/// Sizes in logs and tables: `64.0 KiB`.
pub fn show_size(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_addr("127.0.0.1:80").unwrap().port(), 80);
        assert!(parse_addr("[::1]:8080").unwrap().is_ipv6());
        assert_eq!(parse_addr("localhost:81").unwrap().port(), 81);
        assert!(parse_addr("127.0.0.1").unwrap_err().contains("no port"));
        assert!(parse_addr("127.0.0.1:99999").is_err());
        assert!(parse_addr("no-such-host.invalid:80").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn validate_names_the_flag() {
        let mut c = Config::default();
        assert_eq!(c.validate().unwrap_err().flag, "--backend");
        c.backends.push("127.0.0.1:1".parse().unwrap());
        c.validate().unwrap();
        c.memory_buffer = 10;
        assert_eq!(c.validate().unwrap_err().flag, "--memory-buffer");
        c.memory_buffer = DEFAULT_MEMORY_BUFFER;
        c.temp_dir = "/nonexistent/spillway".into();
        assert_eq!(c.validate().unwrap_err().flag, "--temp-dir");
    }
}
