//! What an I/O error means for spillway: one place that sorts the kernel's
//! answers into the few cases the rest of the code acts on, and says them
//! in words for the logs.

use std::io;

/// The process (or the system) is out of fds or memory: no fault of the
/// peer's, and likely to pass as connections close.
pub fn is_out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Resets and broken pipes are how peers end connections every day.
pub fn is_normal_close(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
    )
}

/// An accept error after which the next accept may well succeed at once.
pub fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionReset
    ) || e.raw_os_error() == Some(libc::EPROTO)
}

/// The kernel will not splice or send a file between these two: it says
/// so before touching either, so nothing was consumed, and plain reads and
/// writes can take over.
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::ESPIPE)
    )
}

/// `sendfile` failed reading the file rather than writing the socket.
pub fn is_file_read_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EFBIG | libc::EOVERFLOW | libc::ENXIO)
    )
}

/// A failed connect, for the log and the close line.
pub fn describe_connect_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
        io::ErrorKind::TimedOut => "connect timed out".to_string(),
        _ => format!("connect failed: {e}"),
    }
}

/// A failed read or write, for the close line: "reset", "closed (broken
/// pipe)" or the error.
pub fn describe(e: &io::Error) -> String {
    match e.kind() {
        // ENOTCONN: a shutdown or write on a socket the peer already reset
        // (counted as a reset in the metrics too).
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::NotConnected
        | io::ErrorKind::ConnectionAborted => "reset".to_string(),
        io::ErrorKind::BrokenPipe => "closed (broken pipe)".to_string(),
        _ => format!("error: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every error counted as a normal close reads as one in the close
    /// line: no "error: Transport endpoint is not connected" for a client
    /// that reset before its shutdown.
    #[test]
    fn normal_closes_are_described_as_such() {
        for kind in [
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::NotConnected,
        ] {
            let e = io::Error::from(kind);
            assert!(is_normal_close(&e));
            assert!(
                !describe(&e).starts_with("error"),
                "{kind:?}: {}",
                describe(&e)
            );
        }
    }
}
