//! `--mode http`: HTTP/1.1 with whole requests and responses buffered, so
//! a backend is held only while a request is served locally, whatever the
//! client's link. See docs/http.md.
//!
//! `connection` is the state machine; `head` finds, judges and rewrites
//! heads; `chunked` decodes chunked bodies; `answer` holds the answers
//! spillway gives itself.

pub mod answer;
pub mod chunked;
pub mod connection;
pub mod head;

pub use connection::HttpConnection;
