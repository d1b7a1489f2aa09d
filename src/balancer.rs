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
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

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

/// One backend address's place. Places are never reused for another
/// address, so an index held by a connection stays valid for its life.
struct Backend {
    /// Set once, when the place is taken.
    addr: OnceLock<SocketAddr>,
    weight: AtomicU32,
    /// Connections holding this backend now, in every worker.
    active: AtomicU32,
    state: AtomicU64,
}

/// Which places are in the pool now, and one period of the smooth
/// round-robin over them. Replaced whole when names resolve anew.
#[derive(Debug, Default)]
struct Members {
    idx: Vec<usize>,
    order: Vec<usize>,
}

/// A change `set_members` made: an address that joined or left.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Joined(SocketAddr),
    Left(SocketAddr),
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

/// The pool is shared by every worker thread; all of its state is atomics
/// (and one snapshot of who is in it, swapped whole, never locked).
pub struct Backends {
    /// Places for every address the pool may ever hold: a fixed table, so
    /// that readers never see it move.
    backends: Box<[Backend]>,
    /// Places taken so far (they are taken in order).
    used: AtomicUsize,
    members: ArcSwap<Members>,
    strategy: Strategy,
    policy: FailPolicy,
    /// Where round-robin is in the members' order, and where least-conn
    /// starts looking (so that ties rotate).
    cursor: AtomicUsize,
    rng: AtomicU64,
    /// Down times are kept as milliseconds since this moment.
    epoch: Instant,
}

impl Backends {
    /// A pool of `specs`, with room for `capacity` addresses in all (names
    /// that resolve anew may bring more).
    pub fn new(
        specs: &[BackendSpec],
        strategy: Strategy,
        policy: FailPolicy,
        seed: u64,
    ) -> Backends {
        Self::with_capacity(specs, strategy, policy, seed, specs.len())
    }

    pub fn with_capacity(
        specs: &[BackendSpec],
        strategy: Strategy,
        policy: FailPolicy,
        seed: u64,
        capacity: usize,
    ) -> Backends {
        assert!(!specs.is_empty(), "validated: at least one backend");
        let capacity = capacity.max(specs.len());
        let pool = Backends {
            backends: (0..capacity)
                .map(|_| Backend {
                    addr: OnceLock::new(),
                    weight: AtomicU32::new(1),
                    active: AtomicU32::new(0),
                    state: AtomicU64::new(State::UP.pack()),
                })
                .collect(),
            used: AtomicUsize::new(0),
            members: ArcSwap::default(),
            strategy,
            policy,
            cursor: AtomicUsize::new(0),
            rng: AtomicU64::new(seed),
            epoch: Instant::now(),
        };
        let all: Vec<(SocketAddr, u32)> = specs.iter().map(|s| (s.addr, s.weight)).collect();
        pool.set_members(&all);
        pool
    }

    /// Places there are: every index is below this.
    pub fn capacity(&self) -> usize {
        self.backends.len()
    }

    /// Places taken: addresses the pool holds or held.
    pub fn len(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn addr(&self, idx: usize) -> SocketAddr {
        *self.backends[idx]
            .addr
            .get()
            .expect("a place in use has an address")
    }

    /// Is `idx` in the pool now (new connections may go to it)?
    pub fn is_member(&self, idx: usize) -> bool {
        self.members.load().idx.contains(&idx)
    }

    /// Make the pool exactly `wanted` (address, weight): addresses new to
    /// it join (a place of their own, kept for them forever), those not in
    /// it leave (no new connections; those open finish). Returns what
    /// changed. One caller at a time (the resolver).
    pub fn set_members(&self, wanted: &[(SocketAddr, u32)]) -> Vec<Change> {
        let before = self.members.load_full();
        let mut idx = Vec::with_capacity(wanted.len());
        for &(addr, weight) in wanted {
            let used = self.len();
            let place = (0..used).find(|&i| self.backends[i].addr.get() == Some(&addr));
            let place = match place {
                Some(i) => i,
                None if used < self.capacity() => {
                    let _ = self.backends[used].addr.set(addr);
                    self.used.store(used + 1, Ordering::Release);
                    used
                }
                None => {
                    log::error!(
                        "backend {addr}: no room for another backend address (at most {}); not added",
                        self.capacity()
                    );
                    continue;
                }
            };
            self.backends[place].weight.store(weight, Ordering::Relaxed);
            if !idx.contains(&place) {
                idx.push(place);
            }
        }
        let weights: Vec<(usize, u32)> = idx
            .iter()
            .map(|&i| (i, self.backends[i].weight.load(Ordering::Relaxed)))
            .collect();
        let order = smooth_order(&weights);
        let mut changes: Vec<Change> = idx
            .iter()
            .filter(|i| !before.idx.contains(i))
            .map(|&i| Change::Joined(self.addr(i)))
            .collect();
        changes.extend(
            before
                .idx
                .iter()
                .filter(|i| !idx.contains(i))
                .map(|&i| Change::Left(self.addr(i))),
        );
        self.members.store(Arc::new(Members { idx, order }));
        changes
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
        let members = self.members.load();
        let n = members.idx.len();
        let untried = |i: usize| !tried.contains(&i);
        let take = |i: usize| self.claim(i, now).map(|trial| Picked { idx: i, trial });
        let chosen = match self.strategy {
            Strategy::RoundRobin => self.round_robin(&members.order, now, &untried),
            // Another worker may claim a trial between the look and the
            // claim: then look again (each failed claim means a backend
            // left the eligible set, so n + 1 looks suffice).
            Strategy::LeastConn => {
                (0..=n).find_map(|_| take(self.least_conn(&members.idx, now, &untried)?))
            }
            Strategy::Random2 => {
                (0..=n).find_map(|_| take(self.random2(&members.idx, now, &untried)?))
            }
        };
        let picked = match chosen {
            Some(p) => p,
            // Nothing left is eligible: try one anyway. An up one first (a
            // race with another worker can get here), then the one down that
            // comes back soonest; one on trial last.
            None => {
                let idx = members
                    .idx
                    .iter()
                    .copied()
                    .filter(|&i| untried(i))
                    .min_by_key(|&i| match self.state(i).standing {
                        Standing::Up => 0,
                        Standing::Down { until } => until.saturating_add(1),
                        Standing::Trial => u64::MAX,
                    })?;
                // Not a trial: this try was forced, not due, so its failure
                // must not double the time out. Claiming it as one did, and
                // clients arriving during an outage of every backend took
                // them from 2s out to 5min out within half a second.
                Picked { idx, trial: false }
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
    fn round_robin(
        &self,
        order: &[usize],
        now: u64,
        untried: &impl Fn(usize) -> bool,
    ) -> Option<Picked> {
        let len = order.len();
        if len == 0 {
            return None;
        }
        let usable = |i: usize| untried(i) && self.eligible(i, now);
        let mut at = 0;
        for _ in 0..len {
            at = self.cursor.fetch_add(1, Ordering::Relaxed) % len;
            let i = order[at];
            if usable(i) {
                if let Some(trial) = self.claim(i, now) {
                    return Some(Picked { idx: i, trial });
                }
            }
        }
        (1..=len).find_map(|k| {
            let i = order[(at + k) % len];
            if !usable(i) {
                return None;
            }
            let trial = self.claim(i, now)?;
            Some(Picked { idx: i, trial })
        })
    }

    /// Fewest active connections per weight; ties go round the pool.
    fn least_conn(
        &self,
        members: &[usize],
        now: u64,
        untried: &impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = members.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.load(Ordering::Relaxed);
        let best = (0..n)
            .map(|k| members[(start + k) % n])
            .filter(|&i| untried(i) && self.eligible(i, now))
            .reduce(|a, b| if self.lighter(b, a) { b } else { a })?;
        let at = members.iter().position(|&i| i == best).unwrap_or(0);
        self.cursor.store(at + 1, Ordering::Relaxed);
        Some(best)
    }

    /// Two distinct random candidates; the less loaded wins.
    fn random2(
        &self,
        members: &[usize],
        now: u64,
        untried: &impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let usable = |i: &usize| untried(*i) && self.eligible(*i, now);
        let k = members.iter().copied().filter(usable).count() as u64;
        let nth = |m: u64| members.iter().copied().filter(usable).nth(m as usize);
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
        let weight = |i: usize| self.backends[i].weight.load(Ordering::Relaxed);
        let (wa, wb) = (weight(a), weight(b));
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
/// weights) over `(place, weight)`: every backend's score grows by its
/// weight, the highest wins and pays back the total. Weights 5,1,1 give
/// a,a,b,a,c,a,a rather than a,a,a,a,a,b,c. The sequence then repeats.
fn smooth_order(weights: &[(usize, u32)]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&(_, w)| i64::from(w)).sum();
    let mut score = vec![0i64; weights.len()];
    (0..total)
        .map(|_| {
            let mut best = 0;
            for (i, &(_, w)) in weights.iter().enumerate() {
                score[i] += i64::from(w);
                if score[i] > score[best] {
                    best = i;
                }
            }
            score[best] -= total;
            weights[best].0
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
            .map(|(i, &weight)| {
                BackendSpec::at(SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)), weight)
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

    /// Names that resolve anew: an address that appears joins (a place of
    /// its own, after the others), one that vanishes leaves (never picked
    /// again, its place and counts kept for the connections it still has),
    /// and comes back to the same place.
    #[test]
    fn members_join_and_leave() {
        let specs = [BackendSpec::at(SocketAddr::from(([10, 0, 0, 1], 80)), 1)];
        let policy = FailPolicy {
            max_fails: 3,
            fail_timeout: Duration::from_secs(10),
        };
        let p = Backends::with_capacity(&specs, Strategy::RoundRobin, policy, 1, 4);
        let a = SocketAddr::from(([10, 0, 0, 1], 80));
        let b = SocketAddr::from(([10, 0, 0, 2], 80));
        assert_eq!(p.set_members(&[(a, 1), (b, 1)]), [Change::Joined(b)]);
        let now = Instant::now();
        let picks: Vec<usize> = (0..4).map(|_| p.pick(now, &[]).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 2, "{picks:?}");
        assert_eq!(p.set_members(&[(b, 1)]), [Change::Left(a)]);
        assert!((0..10).all(|_| p.pick(now, &[]) == Some(1)), "a is out");
        assert!(!p.is_member(0) && p.is_member(1));
        assert_eq!(p.active(0), 2, "a's open connections are still counted");
        assert_eq!(p.set_members(&[(a, 1), (b, 1)]), [Change::Joined(a)]);
        assert_eq!(p.addr(0), a, "the same place again");
        assert_eq!(p.len(), 2);
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

    /// Clients that keep coming while every backend is down for half a
    /// second (each forcing a try of the one due back soonest) must not
    /// keep the backends out for minutes: once they are back, every one
    /// serves again after the usual time out. (Found by the soak test.)
    #[test]
    fn a_short_outage_of_every_backend_does_not_keep_them_out_for_minutes() {
        let p = pool(&[1, 1, 1], Strategy::RoundRobin);
        let t0 = Instant::now();
        for k in 0..30 {
            let now = t0 + Duration::from_millis(k * 16);
            let mut tried = Vec::new();
            while let Some(i) = p.pick(now, &tried) {
                p.failed(i, now, "connection refused");
                p.release(i);
                tried.push(i);
            }
        }
        let back = t0 + Duration::from_millis(500) + 3 * Duration::from_secs(10);
        let mut served = [0u32; 3];
        for _ in 0..30 {
            let i = p.pick(back, &[]).expect("a backend");
            p.succeeded(i);
            p.release(i);
            served[i] += 1;
        }
        assert!(
            served.iter().all(|&n| n > 0),
            "served after the outage: {served:?}"
        );
    }
}
