//! Active health checks: every `--health-check` interval, a TCP connect to
//! each backend that is up (to catch one that stopped answering before a
//! client does) or whose down time is over (to bring it back without
//! sacrificing a client). A probe's verdict counts like a connection's.

use std::io;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::balancer::Backends;
use crate::io_error::is_out_of_resources;
use crate::proxy_header::{self, Version};
use crate::timers::{Timer, Timers};

struct Probe {
    stream: TcpStream,
    id: u64,
}

pub struct HealthChecks {
    interval: Duration,
    /// `--send-proxy`: a probe says it carries no client (UNKNOWN / LOCAL)
    /// before it closes, so a backend that requires the header does not
    /// count it as a protocol error.
    send_proxy: Option<Version>,
    /// Token of backend 0's probe; backend i uses `first_token + i`.
    first_token: usize,
    probes: Vec<Option<Probe>>,
    next_id: u64,
}

impl HealthChecks {
    pub fn new(
        interval: Duration,
        backends: usize,
        first_token: usize,
        send_proxy: Option<Version>,
    ) -> Self {
        HealthChecks {
            interval,
            send_proxy,
            first_token,
            probes: (0..backends).map(|_| None).collect(),
            next_id: 0,
        }
    }

    /// The backend whose probe owns `token`, if it is a probe's.
    pub fn backend_of(&self, token: Token) -> Option<usize> {
        token
            .0
            .checked_sub(self.first_token)
            .filter(|&i| i < self.probes.len())
    }

    /// Probe every backend that needs it and arm the next round.
    pub fn round(
        &mut self,
        pool: &Backends,
        registry: &Registry,
        timers: &mut Timers,
        timeout: Duration,
    ) {
        let now = Instant::now();
        for idx in 0..pool.len() {
            if self.probes[idx].is_some() || !pool.is_member(idx) {
                continue; // the last one has not answered yet, or it left
            }
            // A down backend is probed only as its one trial (a client's
            // connection in another worker may have claimed it).
            let trial = pool.start_trial(idx, now);
            if !(pool.is_up(idx) || trial) {
                continue;
            }
            let addr = pool.addr(idx);
            let started = TcpStream::connect(addr).and_then(|mut stream| {
                registry.register(
                    &mut stream,
                    Token(self.first_token + idx),
                    Interest::WRITABLE,
                )?;
                Ok(stream)
            });
            match started {
                Ok(stream) => {
                    self.next_id += 1;
                    let id = self.next_id;
                    self.probes[idx] = Some(Probe { stream, id });
                    // A probe may not outlast the round it belongs to.
                    let patience = timeout.min(self.interval);
                    timers.arm(
                        now + patience,
                        Timer::HealthTimeout {
                            backend: idx,
                            probe: id,
                        },
                    );
                }
                // Out of fds: our shortage, not the backend's failure.
                Err(e) if is_out_of_resources(&e) => {
                    log::debug!("health check of {addr} skipped: {e}");
                    if trial {
                        pool.abandoned(idx, now);
                    }
                }
                Err(e) => {
                    pool.failed(idx, now, &format!("health check: {e}"));
                }
            }
        }
        timers.arm(now + self.interval, Timer::HealthRound);
    }

    /// The probe socket of `idx` became writable or failed: judge it.
    pub fn on_event(&mut self, idx: usize, pool: &Backends, registry: &Registry) {
        let Some(probe) = &self.probes[idx] else {
            return;
        };
        let verdict = match probe.stream.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => match probe.stream.peer_addr() {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => Err(e),
            },
        };
        if let (Ok(()), Some(version), Some(probe)) = (&verdict, self.send_proxy, &self.probes[idx])
        {
            // Best effort: a fresh socket's buffer takes these few bytes.
            let _ = io::Write::write(&mut &probe.stream, &proxy_header::encode_local(version));
        }
        self.finish(idx, registry);
        match verdict {
            Ok(()) => pool.succeeded(idx),
            Err(e) => {
                let cause = format!("health check: {e}");
                log::debug!("backend {}: {cause}", pool.addr(idx));
                pool.failed(idx, Instant::now(), &cause);
            }
        }
    }

    /// Probe `probe` of `idx` ran out of time.
    pub fn on_timeout(&mut self, idx: usize, probe: u64, pool: &Backends, registry: &Registry) {
        if self.probes[idx].as_ref().is_some_and(|p| p.id == probe) {
            self.finish(idx, registry);
            let cause = "health check timed out";
            log::debug!("backend {}: {cause}", pool.addr(idx));
            pool.failed(idx, Instant::now(), cause);
        }
    }

    fn finish(&mut self, idx: usize, registry: &Registry) {
        if let Some(mut probe) = self.probes[idx].take() {
            let _ = registry.deregister(&mut probe.stream);
        }
    }
}
