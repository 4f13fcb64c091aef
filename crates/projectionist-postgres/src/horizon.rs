//! Deciding holes in the log: which missing sequence numbers can never be
//! filled, from PostgreSQL's own lock table (what does not live here: the
//! reads themselves, in `store.rs`).
//!
//! A number is drawn from a sequence by `nextval()`, which takes a lock on the
//! sequence relation and keeps it until its transaction ends, and a row is
//! inserted under a lock on the table kept just as long. Neither depends on
//! the session's settings (`track_activities`) or on the transaction having an
//! id yet. So, in one statement (one snapshot, then the lock table read after
//! it):
//!
//! - `through`: the highest sequence visible in the snapshot. With a sequence
//!   that hands out numbers in order (`CACHE 1`, checked at connect), every
//!   number below it was drawn before the snapshot;
//! - `holders`: every transaction holding a writer's lock on the table or on
//!   its sequence. The transaction that drew a missing number below `through`
//!   either is among them, or had ended before the lock table was read (so a
//!   commit of it is visible to any later snapshot).
//!
//! Once none of those holders is left (looked up again in the lock table), a
//! snapshot taken after that look that still lacks a number below `through`
//! proves the number will never come: every hole up to `through` is passed at
//! once, by one look, however many there are. A *round* is one such listing
//! waiting for its holders to end; a round is started at every look while a
//! read is held, so a hole waits for the transactions that held the table when
//! it could first be decided, never for unrelated ones, and never one hole
//! after another.
//!
//! A prepared transaction (two-phase commit) loses its own identity in the
//! lock table when it prepares; while any prepared transaction holds such a
//! lock, no round is decided.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Rounds waiting for their holders at once. A round is started at each look
/// while a read is held at a hole (at most every [`HOLE_RETRY_PAUSE_MAX`]); an
/// older round always ends no later than a newer one, so when the list is full
/// new ones are simply not started: the oldest decide first.
///
/// [`HOLE_RETRY_PAUSE_MAX`]: crate::store::HOLE_RETRY_PAUSE_MAX
pub(crate) const ROUNDS_PENDING_MAX: usize = 64;

/// Decisions kept for reads that started before the latest one: a read may
/// use a decision only if its snapshot was taken after the decision's look.
const DECISIONS_KEPT_MAX: usize = 4;

/// What one look at the lock table found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Look {
    /// The highest sequence visible in the statement's snapshot.
    pub(crate) through: u64,
    /// The transactions (`pg_locks.virtualtransaction`) holding a writer's
    /// lock on the table or its sequence, sorted; a prepared transaction
    /// shows as `-1/xid`.
    pub(crate) holders: Vec<String>,
}

impl Look {
    fn has_prepared(&self) -> bool {
        self.holders.iter().any(|h| h.starts_with("-1/"))
    }
}

/// A listing of holders waiting for them to end.
#[derive(Debug)]
struct Round {
    through: u64,
    holders: Vec<String>,
    started: Instant,
}

/// Every hole at or below `through` is final, for reads whose snapshot was
/// taken after read ticket `after_read` was handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Decision {
    through: u64,
    after_read: u64,
}

/// The decided holes of one store, and the rounds under way.
#[derive(Debug)]
pub(crate) struct Horizon {
    /// Every hole must be at least this old before it is passed (a foreign
    /// writer that draws a number in one transaction and inserts it in a
    /// later one: see `PostgresEventStore::with_hole_settle`).
    settle: Duration,
    rounds: VecDeque<Round>,
    decisions: VecDeque<Decision>,
    /// Reads started so far: a read's ticket is the count when its snapshot
    /// was taken.
    reads_started: u64,
    /// The hole a read last stopped at, and since when.
    waiting: Option<(u64, Instant)>,
}

impl Horizon {
    pub(crate) fn new(settle: Duration) -> Self {
        Horizon {
            settle,
            rounds: VecDeque::new(),
            decisions: VecDeque::new(),
            reads_started: 0,
            waiting: None,
        }
    }

    pub(crate) fn set_settle(&mut self, settle: Duration) {
        self.settle = settle;
    }

    /// A read is about to take its snapshot: its ticket.
    pub(crate) fn start_read(&mut self) -> u64 {
        self.reads_started += 1;
        self.reads_started
    }

    /// The highest sequence below which every hole is final for a read with
    /// this ticket.
    pub(crate) fn decided_through(&self, ticket: u64) -> u64 {
        self.decisions
            .iter()
            .filter(|d| d.after_read < ticket)
            .map(|d| d.through)
            .max()
            .unwrap_or(0)
    }

    /// Takes in a look made after every read so far took its snapshot:
    /// decides the rounds whose holders are all gone, and starts a new round
    /// (or decides at once when nothing holds the table). Returns whether a
    /// decision moved.
    pub(crate) fn take_look(&mut self, look: Look, now: Instant) -> bool {
        let before = self.latest_decided();
        let prepared = look.has_prepared();
        // The newest round whose holders have all ended and that is old
        // enough; every older one is then decided too (its holders that were
        // still running at the newer round's start were among the newer's).
        let decided = if prepared {
            None
        } else {
            self.rounds
                .iter()
                .rposition(|r| self.settled(r.started, now) && disjoint(&r.holders, &look.holders))
        };
        if let Some(idx) = decided {
            let through = self.rounds[idx].through;
            self.rounds.drain(..=idx);
            self.decide(through);
        }
        let newest = self
            .rounds
            .back()
            .map_or(self.latest_decided(), |r| r.through);
        if look.through > newest {
            if look.holders.is_empty() && self.settle.is_zero() {
                self.decide(look.through);
            } else if self.rounds.len() < ROUNDS_PENDING_MAX {
                self.rounds.push_back(Round {
                    through: look.through,
                    holders: look.holders,
                    started: now,
                });
            }
        }
        self.latest_decided() > before
    }

    /// A read stopped at the hole `sequence`: remembered for reporting.
    pub(crate) fn held_at(&mut self, sequence: u64, now: Instant) {
        match self.waiting {
            Some((held, _)) if held == sequence => {}
            _ => self.waiting = Some((sequence, now)),
        }
    }

    /// A read found no hole it could not pass.
    pub(crate) fn not_held(&mut self) {
        self.waiting = None;
    }

    /// The hole reads are held at, and since when.
    pub(crate) fn waiting(&self) -> Option<(u64, Instant)> {
        self.waiting
    }

    fn settled(&self, started: Instant, now: Instant) -> bool {
        now.saturating_duration_since(started) >= self.settle
    }

    fn latest_decided(&self) -> u64 {
        self.decisions.back().map_or(0, |d| d.through)
    }

    fn decide(&mut self, through: u64) {
        if through <= self.latest_decided() {
            return;
        }
        if self.decisions.len() == DECISIONS_KEPT_MAX {
            self.decisions.pop_front();
        }
        // Reads with a ticket up to now took their snapshots before the look
        // (they ran before it on the same connection, or concurrently).
        self.decisions.push_back(Decision {
            through,
            after_read: self.reads_started,
        });
    }
}

/// Whether two sorted lists share no element.
fn disjoint(a: &[String], b: &[String]) -> bool {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn look(through: u64, holders: &[&str]) -> Look {
        let mut holders: Vec<String> = holders.iter().map(|h| (*h).to_owned()).collect();
        holders.sort();
        Look { through, holders }
    }

    #[test]
    fn a_look_with_no_holders_decides_every_hole_below_it_at_once() {
        let mut h = Horizon::new(Duration::ZERO);
        let now = Instant::now();
        let before = h.start_read();
        assert!(h.take_look(look(100, &[]), now));
        // The read that met the hole took its snapshot before the look.
        assert_eq!(h.decided_through(before), 0);
        let after = h.start_read();
        assert_eq!(h.decided_through(after), 100);
    }

    #[test]
    fn a_round_waits_for_its_own_holders_only() {
        let mut h = Horizon::new(Duration::ZERO);
        let now = Instant::now();
        assert!(!h.take_look(look(10, &["3/7", "4/9"]), now));
        // 3/7 still runs; a newcomer 5/1 does not matter to this round.
        assert!(!h.take_look(look(12, &["3/7", "5/1"]), now));
        let ticket = h.start_read();
        assert_eq!(h.decided_through(ticket), 0);
        // 3/7 ended: the first round is decided, the second still waits for 5/1.
        assert!(h.take_look(look(12, &["5/1"]), now));
        let ticket = h.start_read();
        assert_eq!(h.decided_through(ticket), 10);
        assert!(h.take_look(look(12, &[]), now));
        let ticket = h.start_read();
        assert_eq!(h.decided_through(ticket), 12);
    }

    #[test]
    fn a_prepared_transaction_holds_every_round() {
        let mut h = Horizon::new(Duration::ZERO);
        let now = Instant::now();
        h.take_look(look(10, &["3/7"]), now);
        // 3/7 prepared: it shows as -1/xid now.
        assert!(!h.take_look(look(10, &["-1/812"]), now));
        assert!(h.take_look(look(10, &[]), now));
    }

    #[test]
    fn settle_holds_a_decision_until_the_round_is_old_enough() {
        let mut h = Horizon::new(Duration::from_secs(5));
        let start = Instant::now();
        assert!(!h.take_look(look(10, &[]), start));
        assert!(!h.take_look(look(10, &[]), start + Duration::from_secs(4)));
        assert!(h.take_look(look(10, &[]), start + Duration::from_secs(5)));
    }

    #[test]
    fn pending_rounds_are_bounded_and_the_oldest_are_kept() {
        let mut h = Horizon::new(Duration::ZERO);
        let now = Instant::now();
        for n in 1..=(ROUNDS_PENDING_MAX as u64 + 10) {
            h.take_look(look(n, &["1/1"]), now);
        }
        assert_eq!(h.rounds.len(), ROUNDS_PENDING_MAX);
        assert_eq!(h.rounds.front().map(|r| r.through), Some(1));
        assert!(h.take_look(look(100, &[]), now));
        let ticket = h.start_read();
        // The pending rounds are decided, and the look itself decides 100.
        assert_eq!(h.decided_through(ticket), 100);
    }
}
