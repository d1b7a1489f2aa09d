//! The backend pool: which backend a new connection tries next, and what
//! failures do to a backend's standing.
//!
//! A backend is *up* until `--max-fails` connects in a row fail; then it is
//! *down* for `--fail-timeout` (doubling while it keeps failing, capped at
//! `MAX_FAIL_TIMEOUT`). When that runs out, one trial connection is let
//! through: if it connects the backend is up again, if not it stays down
//! for twice as long. A health check's verdict counts like a connection's.
//! When every backend is down, they are all tried anyway: refusing
//! everyone helps nobody (nginx does the same).

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// However often a backend keeps failing, it is retried at least this often.
pub const MAX_FAIL_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Smooth weighted round-robin (nginx's): no bursts to one backend.
    RoundRobin,
    /// Fewest active connections per unit of weight.
    LeastConn,
    /// Power of two random choices on active connections per weight.
    Random2,
}

impl Strategy {
    pub fn parse(s: &str) -> Result<Strategy, String> {
        match s {
            "round-robin" => Ok(Strategy::RoundRobin),
            "least-conn" => Ok(Strategy::LeastConn),
            "random2" => Ok(Strategy::Random2),
            _ => Err(format!(
                "'{s}' is not a strategy: expected round-robin, least-conn or random2"
            )),
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::RoundRobin => "round-robin",
            Strategy::LeastConn => "least-conn",
            Strategy::Random2 => "random2",
        })
    }
}

/// A backend as configured: `ADDR[,weight=N]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: SocketAddr,
    pub weight: u32,
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.weight == 1 {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{},weight={}", self.addr, self.weight)
        }
    }
}

/// How failures are judged.
#[derive(Clone, Copy, Debug)]
pub struct FailPolicy {
    pub max_fails: u32,
    pub fail_timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Standing {
    Up,
    /// Skipped until `until`; then one trial decides.
    Down {
        until: Instant,
    },
    /// A trial connection (or health check) is under way.
    Trial,
}

struct Backend {
    spec: BackendSpec,
    /// Smooth weighted round-robin's running score.
    current: i64,
    /// Connections holding this backend now.
    active: u32,
    /// Connect failures in a row.
    fails: u32,
    standing: Standing,
    /// How long the next time down lasts.
    backoff: Duration,
}

pub struct Pool {
    backends: Vec<Backend>,
    strategy: Strategy,
    policy: FailPolicy,
    rng: u64,
    /// Where least-conn starts looking, so ties rotate.
    cursor: usize,
}

impl Pool {
    pub fn new(specs: &[BackendSpec], strategy: Strategy, policy: FailPolicy, seed: u64) -> Pool {
        assert!(!specs.is_empty(), "validated: at least one backend");
        Pool {
            backends: specs
                .iter()
                .map(|&spec| Backend {
                    spec,
                    current: 0,
                    active: 0,
                    fails: 0,
                    standing: Standing::Up,
                    backoff: policy.fail_timeout,
                })
                .collect(),
            strategy,
            policy,
            rng: seed | 1,
            cursor: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.backends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    pub fn addr(&self, idx: usize) -> SocketAddr {
        self.backends[idx].spec.addr
    }

    pub fn active(&self, idx: usize) -> u32 {
        self.backends[idx].active
    }

    pub fn is_up(&self, idx: usize) -> bool {
        self.backends[idx].standing == Standing::Up
    }

    /// Choose a backend for a connection that has already tried `tried`.
    /// `None` when every backend has been tried. The choice is counted as
    /// an active connection until `release`.
    pub fn pick(&mut self, now: Instant, tried: &[usize]) -> Option<usize> {
        let untried = |i: &usize| !tried.contains(i);
        let eligible: Vec<usize> = (0..self.backends.len())
            .filter(untried)
            .filter(|&i| self.eligible(i, now))
            .collect();
        let candidates = if eligible.is_empty() {
            // Everything left is down: try it anyway, soonest-back first.
            let mut rest: Vec<usize> = (0..self.backends.len()).filter(untried).collect();
            rest.sort_by_key(|&i| match self.backends[i].standing {
                Standing::Down { until } => until,
                _ => now,
            });
            rest.truncate(1);
            rest
        } else {
            eligible
        };
        let idx = match candidates.as_slice() {
            [] => return None,
            [only] => *only,
            _ => match self.strategy {
                Strategy::RoundRobin => self.smooth_round_robin(&candidates),
                Strategy::LeastConn => self.least_conn(&candidates),
                Strategy::Random2 => self.random2(&candidates),
            },
        };
        let b = &mut self.backends[idx];
        if let Standing::Down { .. } = b.standing {
            b.standing = Standing::Trial;
        }
        b.active += 1;
        Some(idx)
    }

    /// A connection chosen by `pick` no longer holds `idx`.
    pub fn release(&mut self, idx: usize) {
        let b = &mut self.backends[idx];
        debug_assert!(b.active > 0, "release without pick");
        b.active = b.active.saturating_sub(1);
    }

    /// A connect (or health check) to `idx` succeeded. Brings a down
    /// backend back up, with an INFO line.
    pub fn succeeded(&mut self, idx: usize) {
        let fail_timeout = self.policy.fail_timeout;
        let b = &mut self.backends[idx];
        if b.standing != Standing::Up {
            log::info!("backend {} is back up", b.spec.addr);
        }
        b.fails = 0;
        b.standing = Standing::Up;
        b.backoff = fail_timeout;
    }

    /// A connect (or health check) to `idx` failed because of `cause`.
    /// Takes the backend down, with a WARN line, at `--max-fails` failures
    /// in a row, or at once if it was on trial; a failed trial doubles the
    /// time it stays down. Returns how long it is down for, if it went down.
    pub fn failed(&mut self, idx: usize, now: Instant, cause: &str) -> Option<Duration> {
        let max_fails = self.policy.max_fails;
        let b = &mut self.backends[idx];
        b.fails = b.fails.saturating_add(1);
        match b.standing {
            Standing::Up if b.fails >= max_fails => {
                log::warn!(
                    "backend {} marked down after {} failed connects in a row (last: {cause}); next try in {:?}",
                    b.spec.addr,
                    b.fails,
                    b.backoff
                );
            }
            Standing::Trial => {
                b.backoff = (b.backoff * 2).min(MAX_FAIL_TIMEOUT);
                log::debug!(
                    "backend {} still down ({cause}); next try in {:?}",
                    b.spec.addr,
                    b.backoff
                );
            }
            Standing::Up | Standing::Down { .. } => return None,
        }
        b.standing = Standing::Down {
            until: now + b.backoff,
        };
        Some(b.backoff)
    }

    /// A trial's connection went away before its connect was decided (the
    /// client left): let the next connection or health check decide.
    pub fn abandoned(&mut self, idx: usize, now: Instant) {
        let b = &mut self.backends[idx];
        if b.standing == Standing::Trial {
            b.standing = Standing::Down { until: now };
        }
    }

    /// A health check is about to decide for `idx`.
    pub fn start_trial(&mut self, idx: usize) {
        let b = &mut self.backends[idx];
        if let Standing::Down { .. } = b.standing {
            b.standing = Standing::Trial;
        }
    }

    /// Backends whose down time is over and that have no trial under way:
    /// a health check may decide for them instead of a client.
    pub fn due_for_trial(&self, idx: usize, now: Instant) -> bool {
        matches!(self.backends[idx].standing, Standing::Down { until } if now >= until)
    }

    fn eligible(&self, idx: usize, now: Instant) -> bool {
        match self.backends[idx].standing {
            Standing::Up => true,
            Standing::Down { until } => now >= until,
            Standing::Trial => false,
        }
    }

    /// nginx's smooth weighted round-robin: every candidate's score grows
    /// by its weight, the highest wins and pays back the total. Weights
    /// 5,1,1 give a,a,b,a,c,a,a rather than a,a,a,a,a,b,c.
    fn smooth_round_robin(&mut self, candidates: &[usize]) -> usize {
        let mut total = 0i64;
        let mut best = candidates[0];
        for &i in candidates {
            let b = &mut self.backends[i];
            b.current += i64::from(b.spec.weight);
            total += i64::from(b.spec.weight);
            if b.current > self.backends[best].current {
                best = i;
            }
        }
        self.backends[best].current -= total;
        best
    }

    /// Fewest active connections per weight; ties go round the pool.
    fn least_conn(&mut self, candidates: &[usize]) -> usize {
        let n = self.backends.len();
        let start = self.cursor;
        let mut ordered: Vec<usize> = candidates.to_vec();
        ordered.sort_by_key(|&i| (i + n - start) % n);
        let best = ordered
            .into_iter()
            .reduce(|a, b| if self.lighter(b, a) { b } else { a })
            .expect("candidates is not empty");
        self.cursor = (best + 1) % n;
        best
    }

    /// Two distinct random candidates; the less loaded wins.
    fn random2(&mut self, candidates: &[usize]) -> usize {
        let n = candidates.len() as u64;
        let a = self.next_random() % n;
        let b = (a + 1 + self.next_random() % (n - 1)) % n;
        let (a, b) = (candidates[a as usize], candidates[b as usize]);
        if self.lighter(b, a) { b } else { a }
    }

    /// Is `a` strictly less loaded than `b`, per unit of weight?
    fn lighter(&self, a: usize, b: usize) -> bool {
        let (a, b) = (&self.backends[a], &self.backends[b]);
        u64::from(a.active) * u64::from(b.spec.weight)
            < u64::from(b.active) * u64::from(a.spec.weight)
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64: plenty for spreading load, and seedable for tests.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
}

/// Parse `ADDR` or `ADDR,weight=N` for `--backend`.
pub fn parse_backend(s: &str) -> Result<BackendSpec, String> {
    let (addr, weight) = match s.split_once(',') {
        None => (s, 1),
        Some((addr, opt)) => {
            let w = opt
                .strip_prefix("weight=")
                .and_then(|w| w.parse::<u32>().ok())
                .filter(|w| (1..=1000).contains(w))
                .ok_or_else(|| {
                    format!("'{opt}' is not a weight: expected ADDR,weight=N with N from 1 to 1000")
                })?;
            (addr, w)
        }
    };
    Ok(BackendSpec {
        addr: crate::config::parse_addr(addr)?,
        weight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(weights: &[u32], strategy: Strategy) -> Pool {
        let specs: Vec<BackendSpec> = weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| BackendSpec {
                addr: SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
                weight,
            })
            .collect();
        let policy = FailPolicy {
            max_fails: 3,
            fail_timeout: Duration::from_secs(10),
        };
        Pool::new(&specs, strategy, policy, 42)
    }

    /// Every prefix of the sequence is within one of its ideal share.
    fn assert_smooth(seq: &[usize], weights: &[u32]) {
        let total: u32 = weights.iter().sum();
        let mut counts = vec![0u32; weights.len()];
        for (k, &i) in seq.iter().enumerate() {
            counts[i] += 1;
            for (j, &w) in weights.iter().enumerate() {
                let ideal = (k + 1) as f64 * f64::from(w) / f64::from(total);
                assert!(
                    (f64::from(counts[j]) - ideal).abs() <= 1.0,
                    "after {} picks backend {j} has {} (ideal {ideal:.2}): {seq:?}",
                    k + 1,
                    counts[j]
                );
            }
        }
    }

    #[test]
    fn smooth_round_robin_follows_the_weights_without_bursts() {
        for weights in [&[1, 1, 1][..], &[1, 2, 3], &[5, 1, 1]] {
            let mut p = pool(weights, Strategy::RoundRobin);
            let now = Instant::now();
            let seq: Vec<usize> = (0..300)
                .map(|_| {
                    let i = p.pick(now, &[]).unwrap();
                    p.release(i);
                    i
                })
                .collect();
            assert_smooth(&seq, weights);
        }
        let mut p = pool(&[5, 1, 1], Strategy::RoundRobin);
        let now = Instant::now();
        let seq: Vec<usize> = (0..7).map(|_| p.pick(now, &[]).unwrap()).collect();
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn least_conn_prefers_the_idle_backend() {
        let mut p = pool(&[1, 1, 1], Strategy::LeastConn);
        let now = Instant::now();
        let a = p.pick(now, &[]).unwrap();
        let b = p.pick(now, &[]).unwrap();
        let c = p.pick(now, &[]).unwrap();
        assert_eq!(
            [a, b, c]
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len(),
            3
        );
        p.release(b);
        assert_eq!(p.pick(now, &[]), Some(b));
    }

    #[test]
    fn random2_never_picks_the_busier_of_two() {
        let mut p = pool(&[1, 1], Strategy::Random2);
        let now = Instant::now();
        for _ in 0..50 {
            let i = p.pick(now, &[]).unwrap();
            let other = 1 - i;
            assert!(p.active(i) - 1 <= p.active(other), "picked the busier one");
        }
    }

    #[test]
    fn down_after_max_fails_then_one_trial_decides() {
        let mut p = pool(&[1, 1], Strategy::RoundRobin);
        let t0 = Instant::now();
        assert_eq!(p.failed(0, t0, "refused"), None);
        assert_eq!(p.failed(0, t0, "refused"), None);
        assert_eq!(p.failed(0, t0, "refused"), Some(Duration::from_secs(10)));
        assert!(!p.is_up(0));
        for _ in 0..10 {
            let i = p.pick(t0, &[]).unwrap();
            assert_eq!(i, 1, "a down backend is skipped");
            p.release(i);
        }
        // After the fail timeout: one trial, and only one.
        let t1 = t0 + Duration::from_secs(11);
        let picks: Vec<usize> = (0..4).map(|_| p.pick(t1, &[]).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 1, "{picks:?}");
        // The trial fails: down for twice as long.
        assert_eq!(p.failed(0, t1, "refused"), Some(Duration::from_secs(20)));
        assert!(!p.due_for_trial(0, t1 + Duration::from_secs(19)));
        assert!(p.due_for_trial(0, t1 + Duration::from_secs(21)));
        // With the only other backend excluded (tried), a down one is still
        // tried rather than nothing; and when it connects, it is back up.
        assert_eq!(p.pick(t1 + Duration::from_secs(15), &[1]), Some(0));
        p.succeeded(0);
        assert!(p.is_up(0));
    }

    #[test]
    fn an_abandoned_trial_lets_the_next_one_decide() {
        let mut p = pool(&[1, 1], Strategy::RoundRobin);
        let t0 = Instant::now();
        for _ in 0..3 {
            p.failed(0, t0, "refused");
        }
        let t1 = t0 + Duration::from_secs(11);
        let trial = (0..2).map(|_| p.pick(t1, &[]).unwrap()).find(|&i| i == 0);
        assert_eq!(trial, Some(0));
        p.release(0);
        p.abandoned(0, t1);
        assert!(p.due_for_trial(0, t1));
    }

    #[test]
    fn backoff_is_capped() {
        let mut p = pool(&[1], Strategy::RoundRobin);
        let mut now = Instant::now();
        for _ in 0..3 {
            p.failed(0, now, "refused");
        }
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            now += MAX_FAIL_TIMEOUT;
            assert_eq!(p.pick(now, &[]), Some(0));
            last = p.failed(0, now, "refused").unwrap();
            p.release(0);
        }
        assert_eq!(last, MAX_FAIL_TIMEOUT);
    }

    #[test]
    fn every_backend_once_then_none() {
        let mut p = pool(&[1, 1, 1], Strategy::RoundRobin);
        let now = Instant::now();
        let mut tried = Vec::new();
        while let Some(i) = p.pick(now, &tried) {
            tried.push(i);
        }
        tried.sort();
        assert_eq!(tried, [0, 1, 2]);
    }

    #[test]
    fn backend_flags() {
        assert_eq!(parse_backend("127.0.0.1:80").unwrap().weight, 1);
        assert_eq!(parse_backend("127.0.0.1:80,weight=3").unwrap().weight, 3);
        assert!(parse_backend("127.0.0.1:80,weight=0").is_err());
        assert!(
            parse_backend("127.0.0.1:80,w=2")
                .unwrap_err()
                .contains("weight=N")
        );
        assert!(parse_backend("nope,weight=2").is_err());
    }
}
