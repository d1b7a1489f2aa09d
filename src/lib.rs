//! spillway: a reverse proxy and TCP load balancer that holds what a slow
//! receiver cannot take yet in memory, then in an unnamed temporary file,
//! so the sender (usually a backend with few workers) is released at once.
//!
//! The binary is a thin command line over this library; tests, benches and
//! `spillway demo` drive the proxy in-process through [`Proxy`].

pub mod balancer;
pub mod buffer_pool;
pub mod config;
pub mod connection;
pub mod demo;
pub mod demo_http;
pub mod disk;
pub mod event_loop;
pub mod health;
pub mod http;
pub mod io_error;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod proxy_header;
pub mod relay;
pub mod resolver;
pub mod shared;
pub mod slab;
pub mod spill;
pub mod stats;
pub mod tcp;
pub mod timers;
pub mod upstream;

pub use config::{Config, ConfigError};
pub use proxy::{Proxy, StartError, Stopper};

/// Bind, handle SIGINT/SIGTERM (graceful shutdown) and SIGHUP (reopen the
/// log file), and serve until shut down.
pub fn run(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let mut proxy = Proxy::bind(config)?;
    proxy.handle_signals()?;
    proxy.run()?;
    Ok(())
}
