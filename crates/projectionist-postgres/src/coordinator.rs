//! `LeaseCoordinator`: shares projections between processes through the
//! lease table ([`Leases`]), driving a runner `Supervisor` in each: every
//! step it sends the heartbeat, renews the leases it holds (a lost one is
//! taken out of the supervisor), hands back what is more than an even share
//! among the live workers, and claims free or expired projections up to that
//! share (added to the supervisor). Its [`fence`](LeaseCoordinator::fence) is
//! the supervisor's commit guard: a commit or a publish happens only while
//! this process still holds the projection at its epoch.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use projectionist::{BoxError, Result};
use projectionist_runner::{State, Supervised, Supervisor};

use crate::lease::{Lease, Leases};

/// What a [`LeaseCoordinator::step`] did, for the caller to show.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseEvent {
    /// A projection was claimed and is now supervised here.
    Claimed(Lease),
    /// A projection was handed back (more than an even share was held).
    Released(Lease),
    /// A lease was lost (another worker holds the projection now, or it
    /// expired): the projection is no longer supervised here.
    Lost(Lease),
    /// The connection to the lease table was lost since the last step and
    /// made again (the leases held stay this worker's while it is back
    /// within their time).
    Reconnected {
        /// What broke the connection.
        error: String,
    },
    /// A projection failed for a cause that does not go away: its lease is
    /// handed back, for another worker (or a fix) to try.
    Failed {
        /// The lease given up.
        lease: Lease,
        /// Why it failed.
        error: String,
    },
}

impl LeaseEvent {
    /// [`LeaseEvent::Reconnected`], for a caller that tells the store's own
    /// reconnects the same way.
    #[must_use]
    pub fn reconnected(error: String) -> Self {
        LeaseEvent::Reconnected { error }
    }
}

/// The leases one process holds, and how it takes more.
pub struct LeaseCoordinator {
    url: String,
    owner: String,
    ttl: Duration,
    /// The projections to share, by name.
    wanted: Vec<String>,
    leases: Mutex<Option<Leases>>,
    held: Mutex<Vec<Lease>>,
    /// The last connection was lost, with why (told by the next step).
    lost: Mutex<Option<String>>,
}

impl std::fmt::Debug for LeaseCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseCoordinator")
            .field("owner", &self.owner)
            .field("wanted", &self.wanted)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LeaseCoordinator {
    /// A coordinator for worker `owner` sharing `wanted` through the lease
    /// table at `url` (created when missing); leases last `ttl` unless
    /// renewed.
    ///
    /// # Errors
    /// [`projectionist::Error::External`] when the server cannot be reached.
    pub fn connect(url: &str, owner: &str, ttl: Duration, wanted: Vec<String>) -> Result<Self> {
        let coordinator = LeaseCoordinator {
            url: url.to_owned(),
            owner: owner.to_owned(),
            ttl,
            wanted,
            leases: Mutex::new(None),
            held: Mutex::new(Vec::new()),
            lost: Mutex::new(None),
        };
        coordinator.with_leases(|_| Ok(()))?;
        Ok(coordinator)
    }

    /// Runs `f` on the lease table, connecting first when the last
    /// connection was lost (the leases held stay this worker's while it is
    /// back within their time).
    fn with_leases<T>(&self, f: impl FnOnce(&Leases) -> Result<T>) -> Result<T> {
        let mut leases = lock(&self.leases);
        if leases.is_none() {
            let connected = Leases::connect(&self.url, &self.owner, self.ttl)?;
            connected.init()?;
            *leases = Some(connected);
        }
        let result = f(leases.as_ref().expect("connected"));
        if let Err(e) = &result {
            // Connected afresh at the next use.
            *leases = None;
            *lock(&self.lost) = Some(e.to_string());
        }
        result
    }

    /// How often [`LeaseCoordinator::step`] should run: a third of the
    /// lease, at most `max`, so a lease is renewed well before it expires.
    #[must_use]
    pub fn interval(&self, max: Duration) -> Duration {
        (self.ttl / 3).min(max)
    }

    /// The leases held now.
    #[must_use]
    pub fn held(&self) -> Vec<Lease> {
        lock(&self.held).clone()
    }

    /// The commit guard: renews the lease of projection `name` (proving this
    /// process still holds its epoch) or refuses.
    ///
    /// # Errors
    /// When this process holds no lease on it, or the lease was lost.
    pub fn fence(&self, name: &str) -> std::result::Result<(), BoxError> {
        let lease = lock(&self.held)
            .iter()
            .find(|l| l.projection == name)
            .cloned()
            .ok_or_else(|| format!("this worker holds no lease on projection {name}"))?;
        // A connection lost since the last renewal is made again once: the
        // lease is refused only when it was lost, or the server cannot be
        // reached at all.
        let renewed = self
            .with_leases(|leases| leases.renew(&lease))
            .or_else(|_| self.with_leases(|leases| leases.renew(&lease)))?;
        if renewed {
            Ok(())
        } else {
            Err(format!(
                "the lease on projection {name} (epoch {}) was lost",
                lease.epoch
            )
            .into())
        }
    }

    /// One round of coordination with `supervisor`; `make` gives the
    /// projection to supervise by name. Returns what changed.
    ///
    /// # Errors
    /// When the lease table cannot be reached (the caller tries again).
    pub fn step<E: Send + Sync + 'static>(
        &self,
        supervisor: &Supervisor<E>,
        make: &dyn Fn(&str) -> Option<Supervised<E>>,
    ) -> Result<Vec<LeaseEvent>> {
        let mut events = Vec::new();
        let live = self.with_leases(Leases::heartbeat)?;
        events.extend(self.take_reconnected());
        let share = self.wanted.len().div_ceil(live.max(1));
        // Renew what is held; a lost lease's projection is let go of.
        for lease in self.held() {
            if self.with_leases(|leases| leases.renew(&lease))? {
                continue;
            }
            self.drop_held(&lease);
            let _ = supervisor.remove(&lease.projection);
            events.push(LeaseEvent::Lost(lease));
        }
        // A projection failed for good: its lease is handed back.
        for lease in self.held() {
            if let Ok(status) = supervisor.status_of(&lease.projection)
                && let State::Failed {
                    error,
                    retrying: false,
                } = status.state
            {
                self.drop_held(&lease);
                let _ = supervisor.remove(&lease.projection);
                self.with_leases(|leases| leases.release(&lease))?;
                events.push(LeaseEvent::Failed { lease, error });
            }
        }
        // More than an even share (another worker joined): the extra back.
        let extra: Vec<Lease> = {
            let mut held = lock(&self.held);
            let keep = held.len().min(share);
            held.split_off(keep)
        };
        for lease in extra {
            let _ = supervisor.remove(&lease.projection);
            self.with_leases(|leases| leases.release(&lease))?;
            events.push(LeaseEvent::Released(lease));
        }
        // Free or expired projections, up to the share.
        for name in &self.wanted {
            {
                let held = lock(&self.held);
                if held.len() >= share || held.iter().any(|l| &l.projection == name) {
                    continue;
                }
            }
            let Some(lease) = self.with_leases(|leases| leases.try_hold(name))? else {
                continue;
            };
            let Some(projection) = make(name) else {
                self.with_leases(|leases| leases.release(&lease))?;
                continue;
            };
            lock(&self.held).push(lease.clone());
            if supervisor.add(projection).is_err() {
                // Supervised already (a lease lost and claimed again at once).
                let _ = supervisor.remove(name);
                if let Some(again) = make(name) {
                    let _ = supervisor.add(again);
                }
            }
            events.push(LeaseEvent::Claimed(lease));
        }
        Ok(events)
    }

    /// [`LeaseEvent::Reconnected`] when the lease table's connection was
    /// lost since the last look (and is made again at the next use).
    pub fn take_reconnected(&self) -> Option<LeaseEvent> {
        lock(&self.lost)
            .take()
            .map(|error| LeaseEvent::Reconnected { error })
    }

    fn drop_held(&self, lease: &Lease) {
        lock(&self.held).retain(|l| l != lease);
    }

    /// Gives up every lease held (their projections first let go of by
    /// `supervisor`) and this worker's heartbeat.
    ///
    /// # Errors
    /// When the lease table cannot be reached (the leases then expire).
    pub fn leave<E: Send + Sync + 'static>(&self, supervisor: &Supervisor<E>) -> Result<()> {
        // Taken out first: a run ending meanwhile asks the fence, which
        // locks `held`.
        let held = std::mem::take(&mut *lock(&self.held));
        for lease in held {
            let _ = supervisor.remove(&lease.projection);
            self.with_leases(|leases| leases.release(&lease))?;
        }
        self.with_leases(Leases::leave)
    }
}
