//! `--resolve-every`: backend names looked up again on a period, so that a
//! pool follows a name whose addresses move (a Kubernetes headless
//! Service, a DNS-balanced fleet) without a restart.
//!
//! A thread of its own (a lookup blocks) resolves every named backend;
//! addresses that appear join the pool with the name's weight, addresses
//! that vanish leave it (no new connections; those open finish, their
//! place and counts kept). Each change is one INFO line. A lookup that
//! fails, or finds nothing, keeps the name's last good addresses, with a
//! WARN.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;

use crate::balancer::Change;
use crate::config::{BackendSpec, resolve_all};
use crate::shared::Shared;

/// Room for backend addresses beyond the first resolution: at least this,
/// or four times as many as the names first gave.
pub const MIN_CAPACITY: usize = 64;

/// The pool to start with: every address each named backend resolves to
/// now (the one found at start if it no longer resolves).
pub fn initial(specs: &[BackendSpec]) -> Vec<BackendSpec> {
    specs
        .iter()
        .flat_map(|spec| {
            let addrs = match &spec.name {
                Some(name) => resolve_all(name)
                    .ok()
                    .filter(|a| !a.is_empty())
                    .unwrap_or_else(|| vec![spec.addr]),
                None => vec![spec.addr],
            };
            addrs.into_iter().map(move |addr| BackendSpec {
                addr,
                ..spec.clone()
            })
        })
        .collect()
}

pub struct Resolver {
    stop: mpsc::Sender<()>,
    thread: thread::JoinHandle<()>,
}

impl Resolver {
    /// Start resolving, if `--resolve-every` is set and a backend is named.
    pub fn start(shared: Arc<Shared>) -> Option<Resolver> {
        let every = shared.config.resolve_every?;
        if shared.config.backends.iter().all(|b| b.name.is_none()) {
            return None;
        }
        let (stop, stopped) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("spillway-resolver".into())
            .spawn(move || {
                let mut last: HashMap<String, Vec<SocketAddr>> = HashMap::new();
                for spec in initial(&shared.config.backends) {
                    if let Some(name) = spec.name {
                        last.entry(name).or_default().push(spec.addr);
                    }
                }
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    round(&shared, &mut last);
                }
            })
            .map_err(|e| {
                log::error!("cannot start the resolver thread: {e}; names are not looked up again")
            })
            .ok()?;
        Some(Resolver { stop, thread })
    }

    pub fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

/// Look every name up again and make the pool what they say now.
fn round(shared: &Shared, last: &mut HashMap<String, Vec<SocketAddr>>) {
    let mut wanted = Vec::new();
    let mut named: HashMap<SocketAddr, String> = HashMap::new();
    for spec in &shared.config.backends {
        let Some(name) = &spec.name else {
            wanted.push((spec.addr, spec.weight));
            continue;
        };
        let addrs = match resolve_all(name) {
            Ok(addrs) if !addrs.is_empty() => {
                last.insert(name.clone(), addrs.clone());
                addrs
            }
            outcome => {
                let why = match outcome {
                    Err(e) => e.to_string(),
                    Ok(_) => "no address".to_string(),
                };
                let kept = last.get(name).cloned().unwrap_or_default();
                log::warn!(
                    "backend {name}: cannot resolve it ({why}); keeping its last addresses ({})",
                    kept.len()
                );
                kept
            }
        };
        for addr in addrs {
            named.insert(addr, name.clone());
            wanted.push((addr, spec.weight));
        }
    }
    for change in shared.backends.set_members(&wanted) {
        match change {
            Change::Joined(addr) => log::info!(
                "backend {}: {addr} joined the pool",
                named.get(&addr).map_or("-", String::as_str)
            ),
            Change::Left(addr) => log::info!(
                "backend {addr} left the pool (its name no longer resolves to it): no new connections; the open ones finish"
            ),
        }
    }
}
