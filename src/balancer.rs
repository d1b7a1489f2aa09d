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

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::config::{BackendSpec, Strategy};

/// However often a backend keeps failing, it is retried at least this often.
pub const MAX_FAIL_TIMEOUT: Duration = Duration::from_secs(300);

/// How failures are judged.
#[derive(Clone, Copy, Debug)]
pub struct FailPolicy {
    pub max_fails: u32,
    pub fail_timeout: Duration,
}

/// Where a backend stands. Packed into one `AtomicU64` per backend
/// (see `State`), so that every worker thread reads and changes it without
/// a lock: a change is one compare-and-swap, and the thread whose swap
/// made the change is the one that logs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Standing {
    Up,
    /// Skipped until `until` (milliseconds since the pool's epoch); then
    /// one trial decides.
    Down {
        until: u64,
    },
    /// A trial connection (or health check) is under way.
    Trial,
}

/// A backend's standing with its failure count and how many times its
/// down time has doubled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    standing: Standing,
    /// Connect failures in a row (saturating).
    fails: u32,
    /// The next time down lasts `--fail-timeout` times 2^doublings.
    doublings: u32,
}

impl State {
    const UP: State = State {
        standing: Standing::Up,
        fails: 0,
        doublings: 0,
    };

    // Layout: bits 0-1 standing, 2-7 doublings, 8-23 fails, 24-63 until.
    fn pack(self) -> u64 {
        let (kind, until) = match self.standing {
            Standing::Up => (0, 0),
            Standing::Down { until } => (1, until.min((1 << 40) - 1)),
            Standing::Trial => (2, 0),
        };
        kind | u64::from(self.doublings.min(63)) << 2
            | u64::from(self.fails.min(0xffff)) << 8
            | until << 24
    }

    fn unpack(bits: u64) -> State {
        let until = bits >> 24;
        State {
            standing: match bits & 3 {
                0 => Standing::Up,
                1 => Standing::Down { until },
                _ => Standing::Trial,
            },
            doublings: ((bits >> 2) & 63) as u32,
            fails: ((bits >> 8) & 0xffff) as u32,
        }
    }
}

struct Backend {
    spec: BackendSpec,
    /// Connections holding this backend now, in every worker.
    active: AtomicU32,
    state: AtomicU64,
}

/// What `Backends::pick_claiming` chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Picked {
    pub idx: usize,
    /// The backend was down and this connection is its one trial.
    pub trial: bool,
}

/// The backends one connection may still try, in the strategy's order:
/// each at most once, at most `max` in all. "Pick, fail, pick the next" is
/// one loop over it. Every backend it yields is claimed (counted active,
/// and its trial owned if it was down) until `Backends::release`. `tried`
/// is the caller's, so that it outlives a connect in flight.
pub struct Candidates<'a> {
    backends: &'a Backends,
    tried: &'a mut Vec<usize>,
    max: usize,
}

impl Iterator for Candidates<'_> {
    type Item = Picked;

    fn next(&mut self) -> Option<Picked> {
        if self.tried.len() >= self.max {
            return None;
        }
        let picked = self.backends.pick_claiming(Instant::now(), self.tried)?;
        self.tried.push(picked.idx);
        Some(picked)
    }
}

/// The pool is shared by every worker thread; all of its state is atomics.
pub struct Backends {
    backends: Vec<Backend>,
    strategy: Strategy,
    policy: FailPolicy,
    /// One period of smooth weighted round-robin over every backend,
    /// computed once: a shared cursor walks it, so the rotation is exact
    /// across workers, and a backend that is out is stepped over.
    order: Vec<usize>,
    /// Where round-robin is in `order`, and where least-conn starts looking
    /// (so that ties rotate).
    cursor: AtomicUsize,
    rng: AtomicU64,
    /// Down times are kept as milliseconds since this moment.
    epoch: Instant,
}

impl Backends {
    pub fn new(
        specs: &[BackendSpec],
        strategy: Strategy,
        policy: FailPolicy,
        seed: u64,
    ) -> Backends {
        assert!(!specs.is_empty(), "validated: at least one backend");
        Backends {
            backends: specs
                .iter()
                .map(|&spec| Backend {
                    spec,
                    active: AtomicU32::new(0),
                    state: AtomicU64::new(State::UP.pack()),
                })
                .collect(),
            strategy,
            policy,
            order: smooth_order(specs),
            cursor: AtomicUsize::new(0),
            rng: AtomicU64::new(seed),
            epoch: Instant::now(),
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
        self.backends[idx].active.load(Ordering::Relaxed)
    }

    pub fn is_up(&self, idx: usize) -> bool {
        self.state(idx).standing == Standing::Up
    }

    /// The backends a connection that has tried `tried` may try next, at
    /// most `max` tries in all (see `Candidates`).
    pub fn candidates<'a>(&'a self, tried: &'a mut Vec<usize>, max: usize) -> Candidates<'a> {
        Candidates {
            backends: self,
            tried,
            max,
        }
    }

    /// Choose a backend for a connection that has already tried `tried`.
    /// `None` when every backend has been tried. The choice is counted as
    /// an active connection until `release`.
    pub fn pick(&self, now: Instant, tried: &[usize]) -> Option<usize> {
        self.pick_claiming(now, tried).map(|p| p.idx)
    }

    /// `pick`, saying also whether the connection owns the backend's trial
    /// (then it, and only it, may call `abandoned`).
    pub fn pick_claiming(&self, now: Instant, tried: &[usize]) -> Option<Picked> {
        let now = self.millis(now);
        let n = self.backends.len();
        let untried = |i: usize| !tried.contains(&i);
        let take = |i: usize| self.claim(i, now).map(|trial| Picked { idx: i, trial });
        let chosen = match self.strategy {
            Strategy::RoundRobin => self.round_robin(now, &untried),
            // Another worker may claim a trial between the look and the
            // claim: then look again (each failed claim means a backend
            // left the eligible set, so n + 1 looks suffice).
            Strategy::LeastConn => (0..=n).find_map(|_| take(self.least_conn(now, &untried)?)),
            Strategy::Random2 => (0..=n).find_map(|_| take(self.random2(now, &untried)?)),
        };
        let picked = match chosen {
            Some(p) => p,
            // Nothing left is eligible: try one anyway. An up one first (a
            // race with another worker can get here), then the one down that
            // comes back soonest; one on trial last.
            None => {
                let idx = (0..n).filter(|&i| untried(i)).min_by_key(|&i| {
                    match self.state(i).standing {
                        Standing::Up => 0,
                        Standing::Down { until } => until.saturating_add(1),
                        Standing::Trial => u64::MAX,
                    }
                })?;
                let trial = self.claim(idx, u64::MAX) == Some(true);
                Picked { idx, trial }
            }
        };
        self.backends[picked.idx]
            .active
            .fetch_add(1, Ordering::Relaxed);
        Some(picked)
    }

    /// A connection chosen by `pick` no longer holds `idx`.
    pub fn release(&self, idx: usize) {
        let released =
            self.backends[idx]
                .active
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| a.checked_sub(1));
        debug_assert!(released.is_ok(), "release without pick");
    }

    /// A connect (or health check) to `idx` succeeded. Brings a down
    /// backend back up, with an INFO line.
    pub fn succeeded(&self, idx: usize) {
        // Only a change is written: every pick reads this word, and a
        // store on each connect would bounce its cache line between cores.
        let old = self.update(idx, |s| (s != State::UP).then_some(State::UP));
        if old.standing != Standing::Up {
            log::info!("backend {} is back up", self.addr(idx));
        }
    }

    /// A connect (or health check) to `idx` failed because of `cause`.
    /// Takes the backend down, with a WARN line, at `--max-fails` failures
    /// in a row, or at once if it was on trial; a failed trial doubles the
    /// time it stays down. Returns how long it is down for, if it went down.
    pub fn failed(&self, idx: usize, now: Instant, cause: &str) -> Option<Duration> {
        let now_ms = self.millis(now);
        let max_fails = self.policy.max_fails;
        let next = |s: State| {
            let fails = s.fails.saturating_add(1);
            let doublings = match s.standing {
                Standing::Up if fails >= max_fails => s.doublings,
                Standing::Trial => {
                    s.doublings + u32::from(self.backoff(s.doublings) < MAX_FAIL_TIMEOUT)
                }
                Standing::Up | Standing::Down { .. } => return State { fails, ..s },
            };
            let until = now_ms + self.backoff(doublings).as_millis() as u64;
            State {
                standing: Standing::Down { until },
                fails,
                doublings,
            }
        };
        // `next` is pure, so what was stored is `next` of what it replaced.
        let old = self.update(idx, |s| Some(next(s)));
        let new = next(old);
        let backoff = self.backoff(new.doublings);
        match (old.standing, new.standing) {
            (Standing::Up, Standing::Down { .. }) => log::warn!(
                "backend {} marked down after {} failed connects in a row (last: {cause}); next try in {backoff:?}",
                self.addr(idx),
                new.fails,
            ),
            (Standing::Trial, Standing::Down { .. }) => log::debug!(
                "backend {} still down ({cause}); next try in {backoff:?}",
                self.addr(idx),
            ),
            _ => return None,
        }
        Some(backoff)
    }

    /// A trial's connection went away before its connect was decided (the
    /// client left): let the next connection or health check decide.
    pub fn abandoned(&self, idx: usize, now: Instant) {
        let until = self.millis(now);
        self.update(idx, |s| match s.standing {
            Standing::Trial => Some(State {
                standing: Standing::Down { until },
                ..s
            }),
            _ => None,
        });
    }

    /// A health check wants to decide for `idx`: true if it may (the
    /// backend is down, its down time over by `now`, and no trial under
    /// way); it then owns the trial. One claim, so that a trial failed by
    /// another worker in between cannot be followed by an early probe.
    pub fn start_trial(&self, idx: usize, now: Instant) -> bool {
        self.claim(idx, self.millis(now)) == Some(true)
    }

    /// Backends whose down time is over and that have no trial under way.
    #[cfg(test)]
    fn due_for_trial(&self, idx: usize, now: Instant) -> bool {
        matches!(self.state(idx).standing, Standing::Down { until } if self.millis(now) >= until)
    }

    fn state(&self, idx: usize) -> State {
        State::unpack(self.backends[idx].state.load(Ordering::Acquire))
    }

    /// Apply `change` atomically; returns the state it replaced (the
    /// current one if `change` declined).
    fn update(&self, idx: usize, change: impl Fn(State) -> Option<State>) -> State {
        let bits =
            self.backends[idx]
                .state
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |bits| {
                    change(State::unpack(bits)).map(State::pack)
                });
        State::unpack(bits.unwrap_or_else(|current| current))
    }

    fn eligible(&self, idx: usize, now: u64) -> bool {
        match self.state(idx).standing {
            Standing::Up => true,
            Standing::Down { until } => now >= until,
            Standing::Trial => false,
        }
    }

    /// Take `idx` for a connection: an up backend always, a down one whose
    /// time is over (by `now`) only as its one trial. `None` if it may not
    /// be taken; `Some(true)` if this caller now owns its trial.
    fn claim(&self, idx: usize, now: u64) -> Option<bool> {
        let old = self.update(idx, |s| match s.standing {
            Standing::Down { until } if now >= until => Some(State {
                standing: Standing::Trial,
                ..s
            }),
            _ => None,
        });
        match old.standing {
            Standing::Up => Some(false),
            Standing::Down { until } => (now >= until).then_some(true),
            Standing::Trial => None,
        }
    }

    fn backoff(&self, doublings: u32) -> Duration {
        self.policy
            .fail_timeout
            .saturating_mul(1 << doublings.min(31))
            .min(MAX_FAIL_TIMEOUT.max(self.policy.fail_timeout))
    }

    fn millis(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// The next backend in the smooth order that this connection may use,
    /// stepping over those that are out (each step taken from the shared
    /// cursor, so a backend that is out does not send its share to the one
    /// after it). Other workers take steps meanwhile, so one period of
    /// steps may miss every usable backend: then one more period is looked
    /// through without taking steps.
    fn round_robin(&self, now: u64, untried: &impl Fn(usize) -> bool) -> Option<Picked> {
        let len = self.order.len();
        let usable = |i: usize| untried(i) && self.eligible(i, now);
        let mut at = 0;
        for _ in 0..len {
            at = self.cursor.fetch_add(1, Ordering::Relaxed) % len;
            let i = self.order[at];
            if usable(i) {
                if let Some(trial) = self.claim(i, now) {
                    return Some(Picked { idx: i, trial });
                }
            }
        }
        (1..=len).find_map(|k| {
            let i = self.order[(at + k) % len];
            if !usable(i) {
                return None;
            }
            let trial = self.claim(i, now)?;
            Some(Picked { idx: i, trial })
        })
    }

    /// Fewest active connections per weight; ties go round the pool.
    fn least_conn(&self, now: u64, untried: &impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.backends.len();
        let start = self.cursor.load(Ordering::Relaxed);
        let best = (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| untried(i) && self.eligible(i, now))
            .reduce(|a, b| if self.lighter(b, a) { b } else { a })?;
        self.cursor.store(best + 1, Ordering::Relaxed);
        Some(best)
    }

    /// Two distinct random candidates; the less loaded wins.
    fn random2(&self, now: u64, untried: &impl Fn(usize) -> bool) -> Option<usize> {
        let usable = |i: &usize| untried(*i) && self.eligible(*i, now);
        let n = self.backends.len();
        let k = (0..n).filter(usable).count() as u64;
        let nth = |m: u64| (0..n).filter(usable).nth(m as usize);
        match k {
            0 => None,
            1 => nth(0),
            _ => {
                let a = self.next_random() % k;
                let b = (a + 1 + self.next_random() % (k - 1)) % k;
                let (a, b) = (nth(a)?, nth(b)?);
                Some(if self.lighter(b, a) { b } else { a })
            }
        }
    }

    /// Is `a` strictly less loaded than `b`, per unit of weight?
    fn lighter(&self, a: usize, b: usize) -> bool {
        let (wa, wb) = (self.backends[a].spec.weight, self.backends[b].spec.weight);
        u64::from(self.active(a)) * u64::from(wb) < u64::from(self.active(b)) * u64::from(wa)
    }

    fn next_random(&self) -> u64 {
        // splitmix64 over a shared counter: one atomic add, no lock, and
        // seedable for tests.
        let mut z = self
            .rng
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// nginx's smooth weighted round-robin, run for one period (the sum of the
/// weights): every backend's score grows by its weight, the highest wins
/// and pays back the total. Weights 5,1,1 give a,a,b,a,c,a,a rather than
/// a,a,a,a,a,b,c. The sequence then repeats.
fn smooth_order(specs: &[BackendSpec]) -> Vec<usize> {
    let total: i64 = specs.iter().map(|s| i64::from(s.weight)).sum();
    let mut score = vec![0i64; specs.len()];
    (0..total)
        .map(|_| {
            let mut best = 0;
            for (i, s) in specs.iter().enumerate() {
                score[i] += i64::from(s.weight);
                if score[i] > score[best] {
                    best = i;
                }
            }
            score[best] -= total;
            best
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(weights: &[u32], strategy: Strategy) -> Backends {
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
        Backends::new(&specs, strategy, policy, 42)
    }

    /// `--max-fails` (3) failed connects in a row: `idx` goes down at `at`.
    fn take_down(p: &Backends, idx: usize, at: Instant) {
        for _ in 0..3 {
            p.failed(idx, at, "refused");
        }
        assert!(!p.is_up(idx));
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
            let p = pool(weights, Strategy::RoundRobin);
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
        let p = pool(&[5, 1, 1], Strategy::RoundRobin);
        let now = Instant::now();
        let seq: Vec<usize> = (0..7).map(|_| p.pick(now, &[]).unwrap()).collect();
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn least_conn_prefers_the_idle_backend() {
        let p = pool(&[1, 1, 1], Strategy::LeastConn);
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
        let p = pool(&[1, 1], Strategy::Random2);
        let now = Instant::now();
        for _ in 0..50 {
            let i = p.pick(now, &[]).unwrap();
            let other = 1 - i;
            assert!(p.active(i) - 1 <= p.active(other), "picked the busier one");
        }
    }

    #[test]
    fn down_after_max_fails_then_one_trial_decides() {
        let p = pool(&[1, 1], Strategy::RoundRobin);
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
        let p = pool(&[1, 1], Strategy::RoundRobin);
        let t0 = Instant::now();
        take_down(&p, 0, t0);
        let t1 = t0 + Duration::from_secs(11);
        let trial = (0..2).map(|_| p.pick(t1, &[]).unwrap()).find(|&i| i == 0);
        assert_eq!(trial, Some(0));
        p.release(0);
        p.abandoned(0, t1);
        assert!(p.due_for_trial(0, t1));
        // A health check takes it; its trial fails: down for 20s, and the
        // next trial is only to be had once they are over, and only once.
        assert!(p.start_trial(0, t1));
        assert_eq!(p.failed(0, t1, "refused"), Some(Duration::from_secs(20)));
        assert!(!p.start_trial(0, t1 + Duration::from_secs(5)));
        assert!(p.start_trial(0, t1 + Duration::from_secs(21)));
        assert!(!p.start_trial(0, t1 + Duration::from_secs(21)), "one trial");
    }

    #[test]
    fn backoff_is_capped() {
        let p = pool(&[1], Strategy::RoundRobin);
        let mut now = Instant::now();
        take_down(&p, 0, now);
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
        let p = pool(&[1, 1, 1], Strategy::RoundRobin);
        let now = Instant::now();
        let mut tried = Vec::new();
        while let Some(i) = p.pick(now, &tried) {
            tried.push(i);
        }
        tried.sort();
        assert_eq!(tried, [0, 1, 2]);
    }

    /// Candidates yield each backend once, in round-robin order, up to the
    /// connection's tries, and remember them across calls.
    #[test]
    fn candidates_are_each_backend_once_up_to_max() {
        let p = pool(&[1, 1, 1], Strategy::RoundRobin);
        let mut tried = Vec::new();
        let first: Vec<usize> = p.candidates(&mut tried, 2).map(|c| c.idx).collect();
        assert_eq!(first.len(), 2);
        assert!(p.candidates(&mut tried, 2).next().is_none(), "max reached");
        let rest: Vec<usize> = p.candidates(&mut tried, 5).map(|c| c.idx).collect();
        assert_eq!(rest.len(), 1);
        let mut all = [first, rest].concat();
        all.sort();
        assert_eq!(all, [0, 1, 2]);
        (0..3).for_each(|i| p.release(i));
        assert!((0..3).all(|i| p.active(i) == 0));
    }

    /// Exactly one connection owns a returning backend's trial, and knows
    /// it: only the owner may hand it back.
    #[test]
    fn one_pick_owns_the_trial() {
        let p = pool(&[1, 1], Strategy::RoundRobin);
        let t0 = Instant::now();
        take_down(&p, 0, t0);
        let t1 = t0 + Duration::from_secs(11);
        let picks: Vec<Picked> = (0..4).map(|_| p.pick_claiming(t1, &[]).unwrap()).collect();
        assert_eq!(picks.iter().filter(|p| p.trial).count(), 1, "{picks:?}");
        assert!(picks.iter().all(|p| p.trial == (p.idx == 0)), "{picks:?}");
        assert!(!p.start_trial(0, t1), "a health check may not take it too");
        // With the up backend tried already, the one on trial is still
        // offered rather than nothing, but not as a second trial.
        let last = p.pick_claiming(t1, &[1]).unwrap();
        assert_eq!((last.idx, last.trial), (0, false));
    }

    #[test]
    fn state_survives_packing() {
        let states = [
            State::UP,
            State {
                standing: Standing::Down { until: 123_456_789 },
                fails: 9999,
                doublings: 5,
            },
            State {
                standing: Standing::Trial,
                fails: 3,
                doublings: 63,
            },
        ];
        for s in states {
            assert_eq!(State::unpack(s.pack()), s);
        }
    }

    /// Four threads picking at once (as four workers do) share one
    /// rotation: 1200 picks with weights 1,2,3 split exactly 200/400/600,
    /// and every active count returns to zero.
    #[test]
    fn round_robin_is_exact_under_concurrent_picks() {
        let p = std::sync::Arc::new(pool(&[1, 2, 3], Strategy::RoundRobin));
        let counts: Vec<[u32; 3]> = (0..4)
            .map(|_| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let mut c = [0u32; 3];
                    for _ in 0..300 {
                        let i = p.pick(Instant::now(), &[]).unwrap();
                        c[i] += 1;
                        p.release(i);
                    }
                    c
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let total: Vec<u32> = (0..3).map(|i| counts.iter().map(|c| c[i]).sum()).collect();
        assert_eq!(total, [200, 400, 600]);
        assert!((0..3).all(|i| p.active(i) == 0));
    }
}
