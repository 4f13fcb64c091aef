//! The supervisor: one thread per projection running its lifecycle (open,
//! catch up, follow, build a new version in the shadow and publish it, serve
//! requests, retry what can be retried), and one watching the log's head to
//! judge stalls. Projections share nothing but the store and the directory,
//! so nothing one of them does (a shadow build, a failure, a lock held on its
//! file) holds back another's following.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use projectionist::{
    CancelToken, GlobalReader, Progress, ProjectionDb, ProjectionDir, ProjectionTarget,
    PublishOptions, Published, RebuildOptions, SqliteCheckpoint,
};

use crate::control;
use crate::place::{
    Placement, Plan, is_store_failure, is_transient, open_for_run, place, record_publish_failure,
};
use crate::projection::Supervised;
use crate::state::{Event, State, Status, WaitReason};

/// How long a projection may not advance while the log holds events past its
/// checkpoint before it is `stalled` (a hole wait or a lost connection aside):
/// far above any batch's commit time, short enough that an operator hears of
/// a stuck projection within a minute.
pub const STALL_AFTER_DEFAULT: Duration = Duration::from_secs(30);

/// The most projections one supervisor runs. Each runs alone, for isolation:
/// a thread, its own read of the log, a connection to its file and a page
/// cache of up to 16 MiB while it catches up (the engine's budget for a run of
/// one projection). Past this, memory and reads grow with the count: run
/// `projectionist follow` (one shared read, files parked past 256) or several
/// supervisors in several processes.
pub const SUPERVISED_MAX: usize = 64;

/// How often the supervisor looks up the log's head for the stall judge: one
/// cheap query per interval.
const HEAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The first wait before a cause that can go away (a file that cannot be
/// opened, a failed publish, an unreadable store) is tried again; it doubles
/// up to [`RETRY_BACKOFF_MAX`].
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(250);

/// The longest wait between two tries: a cause that went away (disk freed, an
/// obstacle removed, the server back) is noticed within this long.
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The longest wait before reading a store that could not be read again (a
/// server restart, a dropped connection): a server that accepts connections
/// again is read within a second.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How often a waiting lifecycle looks whether the supervisor stops.
const STOP_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Called with every [`Event`], on the thread that caused it.
pub type EventFn = dyn Fn(&Event) + Send + Sync;

/// Events committed into holes the store's reads had passed (PostgreSQL: see
/// `PostgresEventStore::late_events`), as `(sequence, event type)`; see
/// [`SupervisorBuilder::late_events`].
pub type LateEventsFn = dyn Fn() -> Vec<(u64, String)> + Send + Sync;

/// What the supervisor does for a late event (an event committed into a hole
/// its reads had passed: its writer broke the writer contract).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnLateEvent {
    /// Rebuild every projection it affects, in its shadow, and publish it
    /// (the default: the projection lacks the event).
    Rebuild,
    /// Only report it ([`Event::LateEvent`], an error log).
    Report,
}

/// Asked before every commit and publish of a projection (its name): an
/// error refuses it (nothing is written) and fails the projection's run; see
/// [`SupervisorBuilder::commit_guard`].
pub type GuardFn = dyn Fn(&str) -> Result<(), projectionist::BoxError> + Send + Sync;

/// Tells whether the store is cut off (a lost connection being made again),
/// with its error; see [`SupervisorBuilder::outage`].
pub type OutageFn = dyn Fn() -> Option<String> + Send + Sync;

/// What the supervisor's handle reports as wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// From the engine, the directory or a projection file.
    #[error(transparent)]
    Core(#[from] projectionist::Error),
    /// No supervised projection has this name.
    #[error("no projection named {0} is supervised")]
    NoSuchProjection(String),
    /// A thread of the supervisor could not be started.
    #[error("cannot start a supervisor thread: {0}")]
    Thread(std::io::Error),
    /// The request's action failed (the rebuild failed, a rollback came
    /// first, the projection is left as it is on purpose).
    #[error("{0}")]
    Failed(String),
    /// The supervisor stopped before the request was served.
    #[error("the supervisor stopped before projection {0}'s request was served")]
    Stopped(String),
}

/// A request to a supervised projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Request {
    /// Build it again from the start of the log (in its shadow when its live
    /// file serves a built version), publish it, and follow on.
    Rebuild,
    /// Restore the previous version kept by the last publish.
    Rollback,
    /// Apply dead letters again (after a fix of the definition), as
    /// [`projectionist::retry_dead_letters`] does.
    Retry(projectionist::Retry),
}

/// What a request did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Rebuilt: published from the shadow (`published`), or, for a file that
    /// served nothing yet, rebuilt in place up to `checkpoint`.
    Rebuilt {
        /// The live file's checkpoint when the rebuild reached the head.
        checkpoint: u64,
        /// The publish, for a rebuild in the shadow.
        published: Option<Published>,
    },
    /// Rolled back to the previous version.
    RolledBack {
        /// The restore.
        published: Published,
        /// Whether the supervisor follows the restored version on: not when it
        /// was built from another definition than the current one (it is left
        /// as it is, `stopped` with the reason, until a rebuild).
        follows: bool,
    },
    /// Dead letters applied again: those applied now, and those that failed
    /// again.
    Retried(projectionist::Retried),
}

struct Command {
    request: Request,
    reply: Sender<Result<Outcome, Error>>,
}

/// Builds a [`Supervisor`].
pub struct SupervisorBuilder<E> {
    reader: Arc<dyn GlobalReader<E>>,
    dir: ProjectionDir,
    projections: Vec<Supervised<E>>,
    batch_size: u32,
    stall_after: Duration,
    on_event: Option<Arc<EventFn>>,
    outage: Option<Arc<OutageFn>>,
    control_plane: bool,
    late_events: Option<(Arc<LateEventsFn>, OnLateEvent)>,
    seed_from: Option<Arc<dyn crate::snapshot::SnapshotLocation>>,
    share_reads: bool,
    commit_guard: Option<Arc<GuardFn>>,
}

impl<E: Send + Sync + 'static> SupervisorBuilder<E> {
    /// Whether the projections that follow in their live files share one
    /// read of the log (off by default). Off, each projection runs alone, on
    /// its own thread with its own read: nothing one does holds back
    /// another, up to [`SUPERVISED_MAX`] projections. On, they run together
    /// as the command line's `follow` runs them (one read, at most 32 writer
    /// threads, files parked past 256), for any number of projections; one
    /// that needs anything else (a shadow build, a request, a failure, a
    /// cause to wait out) is taken out of the shared run and handled alone,
    /// and comes back once it follows in its live file again. The price: a
    /// projection whose file is blocked (another program holding its write
    /// lock) holds back the shared run's following until it is let go.
    #[must_use]
    pub fn share_reads(mut self, on: bool) -> Self {
        self.share_reads = on;
        self
    }

    /// Asked before every commit (and every publish of a shadow) of a
    /// projection: an error refuses the write and fails the projection's run
    /// ([`projectionist::Error::Fenced`]). A fence for processes that share
    /// projections through leases (the PostgreSQL crate's
    /// `LeaseCoordinator::fence`): a process whose lease was taken over
    /// writes nothing more.
    #[must_use]
    pub fn commit_guard(
        mut self,
        guard: impl Fn(&str) -> Result<(), projectionist::BoxError> + Send + Sync + 'static,
    ) -> Self {
        self.commit_guard = Some(Arc::new(guard));
        self
    }

    /// Whether other processes see and drive the projections through the
    /// files of the control plane (see the `control` module docs: `status`
    /// shows this supervisor's states, `rebuild` and `rollback` are handed to
    /// it). On by default.
    #[must_use]
    pub fn control_plane(mut self, on: bool) -> Self {
        self.control_plane = on;
        self
    }

    /// Adds a projection.
    #[must_use]
    pub fn projection(mut self, projection: Supervised<E>) -> Self {
        self.projections.push(projection);
        self
    }

    /// Events per batch (0: the default, see
    /// [`validate_batch_size`](projectionist::validate_batch_size)).
    #[must_use]
    pub fn batch_size(mut self, batch_size: u32) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// How long a projection may not advance while events wait before it is
    /// `stalled` (default [`STALL_AFTER_DEFAULT`]).
    #[must_use]
    pub fn stall_after(mut self, stall_after: Duration) -> Self {
        self.stall_after = stall_after;
        self
    }

    /// Called with every [`Event`] (state changes, progress, publishes), on
    /// the supervisor's threads: keep it short.
    #[must_use]
    pub fn on_event(mut self, on_event: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        self.on_event = Some(Arc::new(on_event));
        self
    }

    /// How to tell that the store has lost its connection and is making it
    /// again (e.g. [`PostgresEventStore::outage`]), so that projections show
    /// `reconnecting` rather than `stalled` meanwhile.
    ///
    /// [`PostgresEventStore::outage`]: https://docs.rs/projectionist-postgres
    #[must_use]
    pub fn outage(mut self, outage: impl Fn() -> Option<String> + Send + Sync + 'static) -> Self {
        self.outage = Some(Arc::new(outage));
        self
    }

    /// How to find events committed into holes the reads had passed (on
    /// PostgreSQL: `move || store.late_events()` mapped to `(sequence,
    /// type)`), looked at every second, and what to do with one: every
    /// projection that handles its type and has read past it is affected.
    #[must_use]
    pub fn late_events(
        mut self,
        late_events: impl Fn() -> Vec<(u64, String)> + Send + Sync + 'static,
        action: OnLateEvent,
    ) -> Self {
        self.late_events = Some((Arc::new(late_events), action));
        self
    }

    /// Restores each projection that is missing here from the newest
    /// snapshot at `location` (a [`SnapshotDir`](crate::snapshot::SnapshotDir),
    /// or the PostgreSQL crate's `PostgresSnapshots`) that fits (see [`crate::snapshot::seed`]) before it
    /// is first opened, then catches it up from there.
    #[must_use]
    pub fn seed_from(mut self, location: impl crate::snapshot::SnapshotLocation + 'static) -> Self {
        self.seed_from = Some(Arc::new(location));
        self
    }

    /// Starts supervising: each projection's thread opens it and runs it.
    ///
    /// # Errors
    /// [`projectionist::Error::InvalidOptions`] for a batch size past the
    /// bound or two projections of one name.
    pub fn start(self) -> Result<Supervisor<E>, Error> {
        let batch_size = projectionist::validate_batch_size(self.batch_size)?;
        if !self.share_reads {
            check_count(self.projections.len())?;
        }
        let mut entries = BTreeMap::new();
        for projection in &self.projections {
            let name = projection.name().to_owned();
            if entries.contains_key(&name) {
                return Err(supervised_twice(&name));
            }
            entries.insert(name.clone(), Entry::new(name));
        }
        let shared = Arc::new(Shared {
            entries: Mutex::new(entries),
            changed: Condvar::new(),
            stop: CancelToken::new(),
            log_head: AtomicU64::new(0),
            stall_after: self.stall_after,
            on_event: self.on_event,
            outage: self.outage,
            control: self.control_plane.then(|| self.dir.path().to_path_buf()),
        });
        let (joins, door) = if self.share_reads {
            let (send, receive) = mpsc::channel();
            let round = Arc::new(Mutex::new(CancelToken::new()));
            (
                Some((receive, Arc::clone(&round))),
                Some(GroupDoor {
                    joins: Mutex::new(send),
                    round,
                }),
            )
        } else {
            (None, None)
        };
        let core = Arc::new(Core {
            shared: Arc::clone(&shared),
            dir: Arc::new(self.dir),
            reader: Arc::clone(&self.reader),
            batch_size,
            seed_from: self.seed_from,
            commands: Arc::new(Mutex::new(BTreeMap::new())),
            retirements: Mutex::new(BTreeMap::new()),
            threads: Mutex::new(Vec::new()),
            group: door,
            guard: self.commit_guard,
        });
        let mut supervisor = Supervisor {
            shared: Arc::clone(&shared),
            core: Arc::clone(&core),
            watchers: Vec::new(),
        };
        if let Some((joins, round)) = joins {
            // All in the first round: admitted one by one, each would end
            // the round the ones before it started.
            let members = self
                .projections
                .into_iter()
                .map(|projection| core.member(projection))
                .collect();
            let group = Group {
                core: Arc::clone(&core),
                joins,
                round,
                members,
                arrived: Vec::new(),
            };
            let thread = std::thread::Builder::new()
                .name("pj-shared".into())
                .spawn(move || group.run())
                .map_err(Error::Thread)?;
            lock(&core.threads).push(thread);
        } else {
            for projection in self.projections {
                let member = core.member(projection);
                core.start(member)?;
            }
        }
        if let Some(control) = &shared.control {
            let watch = RequestWatch {
                shared: Arc::clone(&shared),
                dir: control.clone(),
                projections: Arc::clone(&core.dir),
                commands: Arc::clone(&core.commands),
            };
            supervisor.watchers.push(
                std::thread::Builder::new()
                    .name("pj-requests".into())
                    .spawn(move || watch.run())
                    .map_err(Error::Thread)?,
            );
        }
        let watch = HeadWatch {
            shared: Arc::clone(&shared),
            reader: self.reader,
            late_events: self.late_events,
            commands: Arc::clone(&core.commands),
        };
        supervisor.watchers.push(
            std::thread::Builder::new()
                .name("pj-head".into())
                .spawn(move || watch.run())
                .map_err(Error::Thread)?,
        );
        Ok(supervisor)
    }
}

/// Refuses more projections than [`SUPERVISED_MAX`].
fn check_count(count: usize) -> Result<(), Error> {
    if count > SUPERVISED_MAX {
        return Err(projectionist::Error::InvalidOptions(format!(
            "{count} projections given; a supervisor runs at most {SUPERVISED_MAX} (each on a \
             thread with its own read of the log): split them between supervisors, or \
             use `projectionist follow`"
        ))
        .into());
    }
    Ok(())
}

fn supervised_twice(name: &str) -> Error {
    projectionist::Error::InvalidOptions(format!("projection {name} is supervised twice")).into()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Ends one projection's lifecycle alone (it is removed or replaced): the
/// token that asks it, and the signal that whoever ran it has let it go.
#[derive(Clone, Default)]
struct Retirement {
    token: CancelToken,
    done: Arc<(Mutex<bool>, Condvar)>,
}

impl Retirement {
    fn ask(&self) {
        self.token.cancel();
    }

    fn asked(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Whoever ran the projection has let it go.
    fn finish(&self) {
        *lock(&self.done.0) = true;
        self.done.1.notify_all();
    }

    /// Until [`Retirement::finish`], or the supervisor stops.
    fn wait(&self, stop: &CancelToken) {
        let mut done = lock(&self.done.0);
        while !*done && !stop.is_cancelled() {
            done = self
                .done
                .1
                .wait_timeout(done, STOP_POLL_INTERVAL)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// A supervised projection between lifecycles: what one hands the next.
struct Member<E> {
    projection: Supervised<E>,
    commands: Receiver<Command>,
    /// A request taken from `commands`, not acted on yet.
    pending: Option<Command>,
    retirement: Retirement,
    /// Restored from a snapshot when missing (tried once).
    seeded: bool,
    /// It failed for a cause that does not go away: wait for a request.
    failed: bool,
}

/// The door to the shared run (see [`SupervisorBuilder::share_reads`]).
struct GroupDoor<E> {
    joins: Mutex<Sender<Member<E>>>,
    /// The shared run's current round: ended to let a member in.
    round: Arc<Mutex<CancelToken>>,
}

impl<E> GroupDoor<E> {
    fn admit(&self, member: Member<E>) {
        let _ = lock(&self.joins).send(member);
        lock(&self.round).cancel();
    }
}

/// What every lifecycle of a supervisor needs to run a projection, and to
/// start another's.
struct Core<E> {
    shared: Arc<Shared>,
    dir: Arc<ProjectionDir>,
    reader: Arc<dyn GlobalReader<E>>,
    batch_size: u32,
    seed_from: Option<Arc<dyn crate::snapshot::SnapshotLocation>>,
    commands: Arc<Mutex<BTreeMap<String, Sender<Command>>>>,
    retirements: Mutex<BTreeMap<String, Retirement>>,
    /// Every thread a lifecycle ran on, joined at the stop.
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// With shared reads: the door to the shared run.
    group: Option<GroupDoor<E>>,
    /// Asked before every commit and publish.
    guard: Option<Arc<GuardFn>>,
}

impl<E: Send + Sync + 'static> Core<E> {
    /// `projection` as a member: its command channel and retirement in place.
    fn member(&self, projection: Supervised<E>) -> Member<E> {
        let name = projection.name().to_owned();
        if let Some(entry) = self.shared.lock().get_mut(&name) {
            entry.types = projection.handler.event_types();
        }
        let (send, receive) = mpsc::channel();
        lock(&self.commands).insert(name.clone(), send);
        let retirement = Retirement::default();
        lock(&self.retirements).insert(name, retirement.clone());
        Member {
            projection,
            commands: receive,
            pending: None,
            retirement,
            seeded: false,
            failed: false,
        }
    }

    /// Runs `member`: in the shared run when reads are shared, else alone.
    fn start(self: &Arc<Self>, member: Member<E>) -> Result<(), Error> {
        match &self.group {
            Some(door) => {
                door.admit(member);
                Ok(())
            }
            None => self.run_alone(member),
        }
    }

    /// Runs `member` on a thread of its own.
    fn run_alone(self: &Arc<Self>, member: Member<E>) -> Result<(), Error> {
        let name = member.projection.name().to_owned();
        let lifecycle = Lifecycle {
            shared: Arc::clone(&self.shared),
            dir: Arc::clone(&self.dir),
            reader: Arc::clone(&self.reader),
            batch_size: self.batch_size,
            commands: member.commands,
            pending: member.pending,
            rebuilds: Vec::new(),
            retire: member.retirement.token.clone(),
            retirement: member.retirement,
            seeded: member.seeded,
            failed: member.failed,
            core: Arc::clone(self),
        };
        let projection = member.projection;
        let thread = std::thread::Builder::new()
            .name(format!("pj-{name}"))
            .spawn(move || lifecycle.run(projection))
            .map_err(Error::Thread)?;
        lock(&self.threads).push(thread);
        Ok(())
    }
}

/// Runs projections in this process, as `projectionist follow` does: each is
/// caught up, then follows the log; one whose definition changed is rebuilt
/// in its shadow and published while its live file serves the old version;
/// requests ([`Supervisor::request`]) are served one at a time per projection,
/// each answered with its own outcome. Dropping it stops it as
/// [`Supervisor::shutdown`] does.
pub struct Supervisor<E: Send + Sync + 'static = serde_json::Value> {
    shared: Arc<Shared>,
    core: Arc<Core<E>>,
    /// The head and request watches.
    watchers: Vec<JoinHandle<()>>,
}

impl<E: Send + Sync + 'static> Supervisor<E> {
    /// A supervisor of projections in `dir` (created when missing), reading
    /// `reader`. Add projections with [`SupervisorBuilder::projection`], then
    /// [`SupervisorBuilder::start`].
    ///
    /// # Errors
    /// As [`ProjectionDir::open`].
    pub fn builder(
        reader: Arc<dyn GlobalReader<E>>,
        dir: impl AsRef<Path>,
    ) -> Result<SupervisorBuilder<E>, Error> {
        Ok(SupervisorBuilder {
            reader,
            dir: ProjectionDir::open(dir)?,
            projections: Vec::new(),
            batch_size: 0,
            stall_after: STALL_AFTER_DEFAULT,
            on_event: None,
            outage: None,
            control_plane: true,
            late_events: None,
            seed_from: None,
            share_reads: false,
            commit_guard: None,
        })
    }

    /// Every projection's state, by name.
    #[must_use]
    pub fn status(&self) -> Vec<Status> {
        self.shared
            .lock()
            .values()
            .map(|entry| entry.status.clone())
            .collect()
    }

    /// One projection's state.
    ///
    /// # Errors
    /// [`Error::NoSuchProjection`].
    pub fn status_of(&self, name: &str) -> Result<Status, Error> {
        self.shared
            .lock()
            .get(name)
            .map(|entry| entry.status.clone())
            .ok_or_else(|| Error::NoSuchProjection(name.to_owned()))
    }

    /// The projections that an operator must look at, with why: `stalled`,
    /// `failed` or `reconnecting` (what `/health` answers 503 for).
    #[must_use]
    pub fn unhealthy(&self) -> Vec<(String, String)> {
        self.status()
            .into_iter()
            .filter(|s| !s.state.is_healthy())
            .map(|s| {
                let reason = s.state.reason().unwrap_or_default();
                (s.name, format!("{}: {reason}", s.state.name()))
            })
            .collect()
    }

    /// The directory of the projection files (for readers:
    /// [`ProjectionDb::open_reader`] through [`ProjectionDir::db`]).
    #[must_use]
    pub fn dir(&self) -> &ProjectionDir {
        &self.core.dir
    }

    /// Waits until projection `name`'s live file has committed `position`
    /// (read-your-writes: append, then wait for the sequence the append
    /// returned before reading the projection). Returns its checkpoint.
    ///
    /// # Errors
    /// [`projectionist::Error::WaitTimedOut`] when `timeout` passes first;
    /// [`Error::NoSuchProjection`].
    pub fn wait_for(&self, name: &str, position: u64, timeout: Duration) -> Result<u64, Error> {
        let started = Instant::now();
        let mut entries = self.shared.lock();
        loop {
            let entry = entries
                .get(name)
                .ok_or_else(|| Error::NoSuchProjection(name.to_owned()))?;
            let checkpoint = entry.status.checkpoint;
            if checkpoint >= position {
                return Ok(checkpoint);
            }
            let waited = started.elapsed();
            if waited >= timeout {
                return Err(projectionist::Error::WaitTimedOut {
                    name: name.to_owned(),
                    position,
                    checkpoint,
                    waited,
                }
                .into());
            }
            entries = self
                .shared
                .changed
                .wait_timeout(entries, timeout - waited)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Starts supervising `projection` next to the others: it is opened,
    /// caught up and followed on a thread of its own.
    ///
    /// # Errors
    /// [`projectionist::Error::InvalidOptions`] when a projection of its name
    /// is supervised already, or past [`SUPERVISED_MAX`].
    pub fn add(&self, projection: Supervised<E>) -> Result<(), Error> {
        let name = projection.name().to_owned();
        {
            let mut entries = self.shared.lock();
            if entries.contains_key(&name) {
                return Err(supervised_twice(&name));
            }
            if self.core.group.is_none() {
                check_count(entries.len() + 1)?;
            }
            entries.insert(name.clone(), Entry::new(name));
        }
        let member = self.core.member(projection);
        self.core.start(member)
    }

    /// Stops supervising projection `name`: its run ends at the next batch
    /// boundary (all applied events committed), its registration in the
    /// control plane is taken back and its lock let go of (another process
    /// may take it). Returns its last state.
    ///
    /// # Errors
    /// [`Error::NoSuchProjection`]; closing its file failed.
    pub fn remove(&self, name: &str) -> Result<Status, Error> {
        self.retire(name)?;
        self.shared.unregister(name);
        let entry = self.shared.lock().remove(name);
        lock(&self.core.commands).remove(name);
        self.core.dir.release(name)?;
        self.shared.changed.notify_all();
        entry
            .map(|entry| entry.status)
            .ok_or_else(|| Error::NoSuchProjection(name.to_owned()))
    }

    /// Supervises projection `projection.name()` under a new definition (a
    /// new handler, a new version): its current run ends at the next batch
    /// boundary and it goes on under the new one (a changed definition is
    /// rebuilt in its shadow while the live file serves the old version).
    /// Its lock is kept throughout; the other projections are not touched.
    ///
    /// # Errors
    /// [`Error::NoSuchProjection`] when it is not supervised.
    pub fn replace(&self, projection: Supervised<E>) -> Result<(), Error> {
        self.retire(projection.name())?;
        let member = self.core.member(projection);
        self.core.start(member)
    }

    /// Ends projection `name`'s lifecycle and waits until it is let go of.
    fn retire(&self, name: &str) -> Result<(), Error> {
        let retirement = lock(&self.core.retirements)
            .remove(name)
            .ok_or_else(|| Error::NoSuchProjection(name.to_owned()))?;
        retirement.ask();
        if let Some(entry) = self.shared.lock().get(name) {
            entry.round.cancel();
        }
        retirement.wait(&self.shared.stop);
        Ok(())
    }

    /// Hands `request` to projection `name` and waits for its outcome: its
    /// run ends at the next batch boundary (all applied events committed),
    /// the request is served, and the projection goes on. Requests to one
    /// projection are served one at a time, in order; each gets its own
    /// answer. A rebuild answers once its new version is published (or, for
    /// a file that served nothing yet, has reached the head).
    ///
    /// # Errors
    /// [`Error::NoSuchProjection`]; [`Error::Stopped`] when the supervisor
    /// stops first; what the request failed with (no previous version to
    /// roll back to, the disk full, ...).
    pub fn request(&self, name: &str, request: Request) -> Result<Outcome, Error> {
        let answer = send_request(&self.shared, &self.core.commands, name, request)?;
        answer.recv().map_err(|_| Error::Stopped(name.to_owned()))?
    }

    /// Stops every projection at its next batch boundary (all applied events
    /// committed) and returns their last states.
    pub fn shutdown(mut self) -> Vec<Status> {
        self.stop();
        self.status()
    }

    fn stop(&mut self) {
        self.shared.stop.cancel();
        for entry in self.shared.lock().values() {
            entry.round.cancel();
        }
        if let Some(door) = &self.core.group {
            lock(&door.round).cancel();
        }
        self.shared.changed.notify_all();
        // A lifecycle may hand its projection on as it ends: joined until
        // none is left.
        loop {
            let threads = std::mem::take(&mut *lock(&self.core.threads));
            if threads.is_empty() {
                break;
            }
            for thread in threads {
                let _ = thread.join();
            }
        }
        for thread in self.watchers.drain(..) {
            let _ = thread.join();
        }
    }
}

impl<E: Send + Sync + 'static> Drop for Supervisor<E> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Hands `request` to projection `name`'s lifecycle and ends its current
/// run at the next batch boundary; the answer comes on the receiver.
fn send_request(
    shared: &Shared,
    commands: &Mutex<BTreeMap<String, Sender<Command>>>,
    name: &str,
    request: Request,
) -> Result<Receiver<Result<Outcome, Error>>, Error> {
    let (reply, answer) = mpsc::channel();
    commands
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(name)
        .ok_or_else(|| Error::NoSuchProjection(name.to_owned()))?
        .send(Command { request, reply })
        .map_err(|_| Error::Stopped(name.to_owned()))?;
    if let Some(entry) = shared.lock().get(name) {
        entry.round.cancel();
    }
    Ok(answer)
}

/// What every thread of a supervisor shares.
struct Shared {
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Notified on every change of an entry (for [`Supervisor::wait_for`]).
    changed: Condvar,
    stop: CancelToken,
    /// The log's head as last looked up.
    log_head: AtomicU64,
    stall_after: Duration,
    on_event: Option<Arc<EventFn>>,
    outage: Option<Arc<OutageFn>>,
    /// The directory whose control-plane files this supervisor keeps, when on.
    control: Option<std::path::PathBuf>,
}

/// One projection as the supervisor knows it.
struct Entry {
    /// What the handle shows (its state derived from the fields below).
    status: Status,
    /// The state its lifecycle set.
    base: State,
    /// The store is cut off (from the outage hook), with its error.
    outage: Option<String>,
    /// Behind the log without advancing since then.
    behind_since: Option<Instant>,
    stalled: Option<String>,
    /// The current run's token: a request or the stop ends the run.
    round: CancelToken,
    /// This process registered it in the control plane (it holds its lock).
    registered: bool,
    /// The event types its handler handles (`None`: all).
    types: Option<Vec<String>>,
}

impl Entry {
    fn new(name: String) -> Self {
        Entry {
            status: Status {
                name,
                state: State::Starting,
                checkpoint: 0,
                head: 0,
                shadow_checkpoint: None,
                processed: 0,
                dead_letters: 0,
            },
            base: State::Starting,
            outage: None,
            behind_since: None,
            stalled: None,
            round: CancelToken::new(),
            registered: false,
            types: None,
        }
    }

    /// The state shown: an end state as set; otherwise a lost connection, then
    /// a stall, before what the lifecycle does.
    fn derived(&self) -> State {
        match (&self.base, &self.outage, &self.stalled) {
            (State::Failed { .. } | State::Stopped { .. } | State::Publishing, _, _) => {
                self.base.clone()
            }
            (_, Some(error), _) => State::Reconnecting {
                error: error.clone(),
            },
            (_, None, Some(reason)) => State::Stalled {
                reason: reason.clone(),
            },
            _ => self.base.clone(),
        }
    }

    /// Derives the shown state again; the event to send when it changed.
    fn refresh(&mut self) -> Option<Event> {
        let state = self.derived();
        if state == self.status.state
            || (state.name() == self.status.state.name()
                && matches!(state, State::Waiting(_) | State::CatchingUp))
        {
            self.status.state = state;
            return None;
        }
        self.status.state = state;
        Some(Event::State(self.status.clone()))
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn emit(&self, event: &Event) {
        if let Some(on_event) = &self.on_event {
            on_event(event);
        }
    }

    /// Changes projection `name`'s entry with `f`, then tells listeners.
    fn update(&self, name: &str, f: impl FnOnce(&mut Entry)) {
        let (event, registered) = {
            let mut entries = self.lock();
            let Some(entry) = entries.get_mut(name) else {
                return;
            };
            f(entry);
            (entry.refresh(), entry.registered)
        };
        self.changed.notify_all();
        if let Some(event) = event {
            self.state_logged(&event);
            if let (Some(dir), true, Event::State(status)) = (&self.control, registered, &event) {
                control::tell_status(dir, status);
            }
            self.emit(&event);
        }
    }

    /// Registers projection `name` in the control plane (once its lock is
    /// held) and tells its state there.
    fn register(&self, name: &str) {
        let Some(dir) = &self.control else { return };
        let status = {
            let mut entries = self.lock();
            let Some(entry) = entries.get_mut(name) else {
                return;
            };
            if entry.registered {
                return;
            }
            entry.registered = true;
            entry.status.clone()
        };
        control::register(dir, name);
        control::tell_status(dir, &status);
    }

    /// Takes back [`Shared::register`].
    fn unregister(&self, name: &str) {
        let Some(dir) = &self.control else { return };
        let registered = self
            .lock()
            .get_mut(name)
            .is_some_and(|entry| std::mem::replace(&mut entry.registered, false));
        if registered {
            control::unregister(dir, name);
        }
    }

    fn set_state(&self, name: &str, state: State) {
        self.update(name, |entry| entry.base = state);
    }

    fn state_logged(&self, event: &Event) {
        let Event::State(status) = event else { return };
        match &status.state {
            State::Failed { error, retrying } => {
                tracing::error!(projection = %status.name, error = %error, retrying, "projection failed; the others go on");
            }
            State::Stalled { reason } => {
                tracing::warn!(projection = %status.name, reason = %reason, "projection stalled");
            }
            state => match state.reason() {
                Some(reason) => tracing::info!(
                    projection = %status.name,
                    state = state.name(),
                    checkpoint = status.checkpoint,
                    lag = status.lag(),
                    reason = %reason,
                    "projection state"
                ),
                None => tracing::info!(
                    projection = %status.name,
                    state = state.name(),
                    checkpoint = status.checkpoint,
                    lag = status.lag(),
                    "projection state"
                ),
            },
        }
    }

    /// One report from the engine about projection `name`'s run.
    fn progress(&self, name: &str, p: &Progress, in_shadow: bool) {
        self.update(name, |entry| {
            let status = &mut entry.status;
            let before = status.shadow_checkpoint.unwrap_or(status.checkpoint);
            if in_shadow {
                status.shadow_checkpoint = Some(p.checkpoint);
            } else {
                status.checkpoint = p.checkpoint;
            }
            if p.checkpoint > before {
                entry.behind_since = None;
                entry.stalled = None;
            }
            status.head = status.head.max(p.total).max(p.checkpoint);
            status.processed = status.processed.max(p.processed);
            if !in_shadow {
                status.dead_letters = p.dead_letters;
            }
            entry.base = match (&p.err, p.hole_wait) {
                (Some(error), _) => State::Failed {
                    error: error.clone(),
                    retrying: false,
                },
                (None, Some(wait)) => State::Waiting(WaitReason::Hole {
                    sequence: wait.sequence,
                    since: wait.since,
                }),
                // The run's last report (a stop, a request): the state stays
                // until the lifecycle says what comes next.
                (None, None) if p.done => entry.base.clone(),
                (None, None) if in_shadow => State::BuildingShadow,
                (None, None) if p.following => State::Following,
                (None, None) => State::CatchingUp,
            };
        });
        self.emit(&Event::Progress(p.clone()));
    }

    /// Waits `duration`, or less when the supervisor stops or `commands`
    /// has a request (taken into `pending`).
    fn pause(
        &self,
        duration: Duration,
        commands: &Receiver<Command>,
        pending: &mut Option<Command>,
        retire: &CancelToken,
    ) {
        let until = Instant::now() + duration;
        while !self.stop.is_cancelled() && !retire.is_cancelled() && pending.is_none() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match commands.recv_timeout(left.min(STOP_POLL_INTERVAL)) {
                Ok(command) => *pending = Some(command),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }
}

/// One projection's lifecycle, on its own thread.
struct Lifecycle<E> {
    shared: Arc<Shared>,
    dir: Arc<ProjectionDir>,
    reader: Arc<dyn GlobalReader<E>>,
    batch_size: u32,
    commands: Receiver<Command>,
    /// A request taken from `commands`, not acted on yet.
    pending: Option<Command>,
    /// Rebuild requests being served: answered when the rebuild is
    /// published (or reached the head in place), or failed.
    rebuilds: Vec<Sender<Result<Outcome, Error>>>,
    /// Ends this lifecycle alone (the projection is removed or replaced).
    retire: CancelToken,
    /// The same, and the signal that it has ended.
    retirement: Retirement,
    /// Restored from a snapshot already (or tried).
    seeded: bool,
    /// Handed over failed for a cause that does not go away: waits for a
    /// request first.
    failed: bool,
    /// The supervisor's, to hand the projection back to the shared run.
    core: Arc<Core<E>>,
}

/// How one run of a projection ended.
enum RunEnd {
    /// Go on: open again, serve the pending request, run again.
    Again,
    /// Wait for a request or the stop before going on.
    Parked,
    /// Try again after the backoff.
    Retry,
    /// The store could not be read: try again after the reconnect backoff.
    Reconnect,
    /// It follows in its live file and nothing else is asked of it: back
    /// to the shared run.
    Rejoin,
}

impl<E: Send + Sync + 'static> Lifecycle<E> {
    fn run(mut self, mut projection: Supervised<E>) {
        let name = projection.name().to_owned();
        if !self.seeded {
            seed(&self.core, &projection);
            self.seeded = true;
        }
        let mut backoff = RETRY_BACKOFF_MIN;
        let mut rebuild = false;
        if self.failed {
            self.wait_for_request();
        }
        loop {
            if self.stopping() {
                break;
            }
            if self.pending.is_none() {
                self.pending = self.commands.try_recv().ok();
            }
            match self.pending.take() {
                Some(Command {
                    request: Request::Rollback,
                    reply,
                }) => {
                    self.roll_back(&projection, &reply);
                    rebuild = false;
                    continue;
                }
                Some(Command {
                    request: Request::Rebuild,
                    reply,
                }) => {
                    self.rebuilds.push(reply);
                    rebuild = true;
                }
                Some(Command {
                    request: Request::Retry(which),
                    reply,
                }) => {
                    self.retry(&mut projection, which, &reply);
                    continue;
                }
                None => {}
            }
            let end = self.run_once(&mut projection, &mut rebuild);
            match end {
                RunEnd::Again => backoff = RETRY_BACKOFF_MIN,
                RunEnd::Retry => {
                    self.shared
                        .pause(backoff, &self.commands, &mut self.pending, &self.retire);
                    backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                }
                RunEnd::Reconnect => {
                    self.shared
                        .pause(backoff, &self.commands, &mut self.pending, &self.retire);
                    backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
                }
                RunEnd::Parked => self.wait_for_request(),
                RunEnd::Rejoin => {
                    if let Some(door) = &self.core.group {
                        door.admit(Member {
                            projection,
                            commands: self.commands,
                            pending: self.pending,
                            retirement: self.retirement,
                            seeded: true,
                            failed: false,
                        });
                        return;
                    }
                }
            }
        }
        let unserved = self.pending.take().map(|c| c.reply);
        for reply in self.rebuilds.drain(..).chain(unserved) {
            let _ = reply.send(Err(Error::Stopped(name.clone())));
        }
        if !self.shared.stop.is_cancelled() {
            // Retired alone (removed or replaced): whoever retired it says
            // what comes next.
            self.retirement.finish();
            return;
        }
        stopped(&self.shared, &name);
    }

    /// Waits for a request, the stop or the retirement.
    fn wait_for_request(&mut self) {
        while self.pending.is_none() && !self.stopping() {
            self.shared.pause(
                RETRY_BACKOFF_MAX,
                &self.commands,
                &mut self.pending,
                &self.retire,
            );
        }
    }

    /// The supervisor stops, or this lifecycle alone is retired.
    fn stopping(&self) -> bool {
        self.shared.stop.is_cancelled() || self.retire.is_cancelled()
    }

    /// Answers every rebuild request being served.
    fn answer_rebuilds(&mut self, outcome: &Result<Outcome, String>) {
        for reply in self.rebuilds.drain(..) {
            let _ = reply.send(match outcome {
                Ok(outcome) => Ok(outcome.clone()),
                Err(error) => Err(Error::Failed(error.clone())),
            });
        }
    }

    /// Opens the projection, decides where it runs (`rebuild`: from scratch,
    /// asked for; cleared once placed), and runs it until the stop, a
    /// request, a caught-up shadow or an error.
    fn run_once(&mut self, projection: &mut Supervised<E>, rebuild: &mut bool) -> RunEnd {
        let name = projection.name().to_owned();
        let head = self.reader.head().ok();
        let plan = Plan::Resume {
            rebuild_requested: *rebuild,
        };
        let placed = open_for_run(&self.dir, &name).and_then(|opened| {
            // Held (locked) by this process from here on.
            self.shared.register(&name);
            if let Some((reason, path)) = opened.moved_aside {
                tracing::warn!(projection = %name, reason = %reason, path = %path.display(), "the projection file was corrupt; moved it aside and rebuilding it");
                self.shared.emit(&Event::MovedAside {
                    name: name.clone(),
                    reason,
                    path,
                });
            }
            let stale = |conn: &projectionist::rusqlite::Connection| projection.is_stale(conn);
            let placement = place(&self.dir, &opened.db, &stale, plan, head)?;
            Ok((opened.db, placement))
        });
        let (live, placement) = match placed {
            Ok(placed) => placed,
            Err(e) => {
                let error = format!("{e} (tried again with backoff)");
                if let Ok(db) = self.dir.db(&name) {
                    let _ = db
                        .with_connection(|conn| projectionist::record_failure(conn, &name, &error));
                }
                self.shared.set_state(
                    &name,
                    State::Failed {
                        error,
                        retrying: true,
                    },
                );
                return RunEnd::Retry;
            }
        };
        // Placed: a rebuild asked for starts now; an interrupted one resumes.
        *rebuild = false;
        let live_checkpoint = live
            .with_connection(|conn| SqliteCheckpoint::load_in(conn, &name))
            .unwrap_or(0);
        let live_dead_letters = live
            .with_connection(|conn| projectionist::dead_letter_count(conn))
            .unwrap_or(0);
        let (writes, start, in_shadow) = match placement {
            Placement::Held { reason } => {
                self.shared.update(&name, |entry| {
                    entry.status.checkpoint = live_checkpoint;
                    entry.status.shadow_checkpoint = None;
                    entry.base = State::Stopped {
                        reason: Some(reason.clone()),
                    };
                });
                self.answer_rebuilds(&Err(reason));
                return RunEnd::Parked;
            }
            Placement::Run {
                in_shadow: false, ..
            } if self.core.group.is_some()
                && self.rebuilds.is_empty()
                && self.pending.is_none() =>
            {
                return RunEnd::Rejoin;
            }
            Placement::Run {
                writes,
                start,
                in_shadow,
            } => (writes, start, in_shadow),
        };
        self.shared.update(&name, |entry| {
            entry.status.checkpoint = live_checkpoint;
            entry.status.dead_letters = live_dead_letters;
            entry.status.shadow_checkpoint = in_shadow.then_some(0);
            entry.base = if in_shadow {
                State::BuildingShadow
            } else {
                State::CatchingUp
            };
        });
        let round = CancelToken::new();
        self.shared
            .update(&name, |entry| entry.round = round.clone());
        // A request sent before this round's token was in place.
        if self.pending.is_none() {
            self.pending = self.commands.try_recv().ok();
        }
        if self.stopping() || self.pending.is_some() {
            round.cancel();
        }
        // A rebuild in place (the file served nothing yet) is answered when
        // it reaches the head.
        let in_place = if in_shadow {
            Vec::new()
        } else {
            std::mem::take(&mut self.rebuilds)
        };
        let in_place = Mutex::new(in_place);
        let caught_up = AtomicBool::new(false);
        let shares_reads = self.core.group.is_some();
        let shared = Arc::clone(&self.shared);
        let progress = |p: &Progress| {
            shared.progress(&name, p, in_shadow);
            if !p.following || caught_up.swap(true, Ordering::SeqCst) {
                return;
            }
            if in_shadow || shares_reads {
                // Caught up: end the run to publish, or (a rebuild in place
                // answered) to go back to the shared run.
                round.cancel();
            }
            for reply in in_place
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .drain(..)
            {
                let _ = reply.send(Ok(Outcome::Rebuilt {
                    checkpoint: p.checkpoint,
                    published: None,
                }));
            }
        };
        let core = Arc::clone(&self.core);
        let guard = core
            .guard
            .as_deref()
            .map(|g| g as &projectionist::CommitGuardFn);
        let mut options = RebuildOptions::new()
            .batch_size(self.batch_size)
            .progress(&progress)
            .follow_until(&round);
        options.commit_guard = guard;
        let target = ProjectionTarget::new(&writes, &mut *projection.handler)
            .consumer_id(&name)
            .start(start);
        let result = projectionist::replay(&*self.reader, vec![target], &options)
            .pop()
            .expect("one result per projection");
        // Ended before the head: served by a later run.
        self.rebuilds.extend(
            in_place
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner),
        );
        match result {
            Ok(_) if in_shadow && caught_up.load(Ordering::SeqCst) => self.publish(&name, &writes),
            Ok(_) => RunEnd::Again,
            Err(e) if is_store_failure(&e) => {
                self.shared.update(&name, |entry| {
                    entry.base = State::Reconnecting {
                        error: e.to_string(),
                    };
                });
                RunEnd::Reconnect
            }
            Err(e) if is_transient(&e) => {
                self.shared.set_state(
                    &name,
                    State::Failed {
                        error: format!("{e} (tried again with backoff)"),
                        retrying: true,
                    },
                );
                RunEnd::Retry
            }
            Err(e) => {
                let error = e.to_string();
                self.shared.set_state(
                    &name,
                    State::Failed {
                        error: error.clone(),
                        retrying: false,
                    },
                );
                self.answer_rebuilds(&Err(error));
                RunEnd::Parked
            }
        }
    }

    /// Publishes projection `name`'s caught-up shadow (`shadow`).
    fn publish(&mut self, name: &str, shadow: &Arc<ProjectionDb>) -> RunEnd {
        if let Some(guard) = &self.core.guard
            && let Err(e) = guard(name)
        {
            let error =
                format!("publishing its rebuild was refused (the live file is unchanged): {e}");
            self.shared.set_state(
                name,
                State::Failed {
                    error: error.clone(),
                    retrying: false,
                },
            );
            self.answer_rebuilds(&Err(error));
            return RunEnd::Parked;
        }
        self.shared.set_state(name, State::Publishing);
        // The shadow's handle is let go of by the publish itself.
        let _ = shadow;
        match self.dir.publish(name, name, &PublishOptions::default()) {
            Ok(published) => {
                tracing::info!(
                    projection = name,
                    checkpoint = published.checkpoint,
                    lock_held_ms = published.lock_held.as_secs_f64() * 1e3,
                    "published its rebuild; following it in the live file"
                );
                self.shared.update(name, |entry| {
                    entry.status.checkpoint = published.checkpoint;
                    entry.status.shadow_checkpoint = None;
                    entry.base = State::Following;
                });
                self.shared.emit(&Event::Published(published.clone()));
                self.answer_rebuilds(&Ok(Outcome::Rebuilt {
                    checkpoint: published.checkpoint,
                    published: Some(published),
                }));
                RunEnd::Again
            }
            Err(e) => {
                record_publish_failure(&self.dir, name, &e);
                self.shared.set_state(
                    name,
                    State::Failed {
                        error: format!(
                            "publishing its rebuild failed (the live file is unchanged; tried again with backoff): {e}"
                        ),
                        retrying: true,
                    },
                );
                RunEnd::Retry
            }
        }
    }

    /// Serves a retry of dead letters, between two runs (this process holds
    /// the file, no run writes it meanwhile).
    fn retry(
        &mut self,
        projection: &mut Supervised<E>,
        which: projectionist::Retry,
        reply: &Sender<Result<Outcome, Error>>,
    ) {
        let name = projection.name().to_owned();
        let retried = self.dir.db(&name).and_then(|db| {
            let retried = projectionist::retry_dead_letters(
                &*self.reader,
                &db,
                &mut *projection.handler,
                which,
            )?;
            let left = db.with_connection(|conn| projectionist::dead_letter_count(conn))?;
            Ok((retried, left))
        });
        match retried {
            Ok((retried, left)) => {
                tracing::info!(projection = %name, applied = retried.applied.len(), failed = retried.failed.len(), "retried dead letters");
                self.shared
                    .update(&name, |entry| entry.status.dead_letters = left);
                let _ = reply.send(Ok(Outcome::Retried(retried)));
            }
            Err(e) => {
                let _ = reply.send(Err(e.into()));
            }
        }
    }

    /// Serves a rollback: a rebuild in progress is given up (its shadow
    /// discarded: the operator asked for the previous version, not the new
    /// one), the previous version restored.
    fn roll_back(&mut self, projection: &Supervised<E>, reply: &Sender<Result<Outcome, Error>>) {
        let name = projection.name().to_owned();
        let rolled = self
            .dir
            .discard_shadow(&name)
            .and_then(|_| self.dir.rollback(&name, &name, &PublishOptions::default()));
        let outcome = rolled.and_then(|published| {
            let follows = !self
                .dir
                .db(&name)?
                .with_connection(|conn| Ok(projection.is_stale(conn)))?;
            Ok((published, follows))
        });
        match outcome {
            Ok((published, follows)) => {
                tracing::info!(projection = %name, checkpoint = published.checkpoint, follows, "rolled back to the previous version");
                self.answer_rebuilds(&Err(format!(
                    "projection {name} was rolled back before its rebuild was published"
                )));
                self.shared.update(&name, |entry| {
                    entry.status.checkpoint = published.checkpoint;
                    entry.status.shadow_checkpoint = None;
                });
                self.shared.emit(&Event::RolledBack(published.clone()));
                let _ = reply.send(Ok(Outcome::RolledBack { published, follows }));
            }
            Err(e) => {
                let _ = reply.send(Err(e.into()));
            }
        }
    }
}

/// With shared reads (see [`SupervisorBuilder::share_reads`]): the
/// projections that follow in their live files, run together from one read
/// of the log. One that needs anything else (placed in its shadow or held, a
/// request, a failure, a file that cannot be opened) is handed to a
/// lifecycle of its own, which hands it back once it follows in its live
/// file again. Each hand-over ends the current round at a batch boundary
/// (everything applied is committed); the next round opens the members again.
struct Group<E> {
    core: Arc<Core<E>>,
    joins: Receiver<Member<E>>,
    /// The current round's token, shared with the door.
    round: Arc<Mutex<CancelToken>>,
    members: Vec<Member<E>>,
    /// Handed over during a round: taken in by the next.
    arrived: Vec<Member<E>>,
}

/// How a round of the shared run ended.
enum RoundEnd {
    Again,
    /// The store could not be read: after the backoff.
    Retry,
}

impl<E: Send + Sync + 'static> Group<E> {
    fn run(mut self) {
        let mut backoff = RETRY_BACKOFF_MIN;
        while !self.core.shared.stop.is_cancelled() {
            self.admit();
            self.sort_out();
            if self.members.is_empty() {
                if let Ok(member) = self.joins.recv_timeout(STOP_POLL_INTERVAL) {
                    self.members.push(member);
                }
                continue;
            }
            match self.run_round() {
                RoundEnd::Again => backoff = RETRY_BACKOFF_MIN,
                RoundEnd::Retry => {
                    self.pause(backoff);
                    backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
                }
            }
        }
        self.admit();
        for member in self.members.drain(..) {
            let name = member.projection.name().to_owned();
            if let Some(pending) = member.pending {
                let _ = pending.reply.send(Err(Error::Stopped(name.clone())));
            }
            stopped(&self.core.shared, &name);
        }
    }

    /// Takes in the members handed over since the last look.
    fn admit(&mut self) {
        self.members.append(&mut self.arrived);
        while let Ok(member) = self.joins.try_recv() {
            self.members.push(member);
        }
    }

    /// Lets go of retired members, and hands over those with a request.
    fn sort_out(&mut self) {
        for mut member in std::mem::take(&mut self.members) {
            if member.retirement.asked() {
                member.retirement.finish();
                continue;
            }
            if member.pending.is_none() {
                member.pending = member.commands.try_recv().ok();
            }
            if member.pending.is_some() {
                self.hand_over(member);
            } else {
                self.members.push(member);
            }
        }
    }

    /// Runs `member` alone.
    fn hand_over(&self, member: Member<E>) {
        let name = member.projection.name().to_owned();
        if let Err(e) = self.core.run_alone(member) {
            self.core.shared.set_state(
                &name,
                State::Failed {
                    error: e.to_string(),
                    retrying: false,
                },
            );
        }
    }

    /// Whether the round should end: the stop, a request, a retirement, a
    /// member handed back.
    fn anything_asked(&mut self) -> bool {
        if self.core.shared.stop.is_cancelled() {
            return true;
        }
        let mut asked = false;
        for member in &mut self.members {
            if member.pending.is_none() {
                member.pending = member.commands.try_recv().ok();
            }
            asked |= member.pending.is_some() || member.retirement.asked();
        }
        if let Ok(member) = self.joins.try_recv() {
            self.arrived.push(member);
            asked = true;
        }
        asked || !self.arrived.is_empty()
    }

    /// Waits `duration`, or less when anything is asked.
    fn pause(&mut self, duration: Duration) {
        let until = Instant::now() + duration;
        while Instant::now() < until && !self.anything_asked() {
            std::thread::sleep(STOP_POLL_INTERVAL);
        }
    }

    /// Opens and places every member; runs those that follow in their live
    /// files together until the round ends.
    fn run_round(&mut self) -> RoundEnd {
        let core = Arc::clone(&self.core);
        let shared = &core.shared;
        let head = core.reader.head().ok();
        let many = self.members.len() > projectionist::limits::OPEN_PROJECTIONS_MAX;
        let mut writes = Vec::with_capacity(self.members.len());
        for mut member in std::mem::take(&mut self.members) {
            let name = member.projection.name().to_owned();
            if !member.seeded {
                seed(&core, &member.projection);
                member.seeded = true;
            }
            let placed = open_for_run(&core.dir, &name).and_then(|opened| {
                shared.register(&name);
                if let Some((reason, path)) = opened.moved_aside {
                    tracing::warn!(projection = %name, reason = %reason, path = %path.display(), "the projection file was corrupt; moved it aside and rebuilding it");
                    shared.emit(&Event::MovedAside {
                        name: name.clone(),
                        reason,
                        path,
                    });
                }
                let stale = |conn: &projectionist::rusqlite::Connection| {
                    member.projection.is_stale(conn)
                };
                let plan = Plan::Resume {
                    rebuild_requested: false,
                };
                place(&core.dir, &opened.db, &stale, plan, head)
            });
            match placed {
                Ok(Placement::Run {
                    writes: db,
                    start,
                    in_shadow: false,
                }) => {
                    // Past the files a run keeps open, the engine's first
                    // report says where it stands: a parked file is not
                    // opened once more for it.
                    let read = (!many).then(|| {
                        db.with_connection(|conn| {
                            Ok((
                                SqliteCheckpoint::load_in(conn, &name)?,
                                projectionist::dead_letter_count(conn)?,
                            ))
                        })
                        .unwrap_or((0, 0))
                    });
                    shared.update(&name, |entry| {
                        if let Some((checkpoint, dead_letters)) = read {
                            entry.status.checkpoint = checkpoint;
                            entry.status.dead_letters = dead_letters;
                        }
                        entry.status.shadow_checkpoint = None;
                        if entry.base != State::Following {
                            entry.base = State::CatchingUp;
                        }
                    });
                    if many {
                        // Held (locked), not kept open: the run opens it.
                        db.park();
                    }
                    writes.push((db, start));
                    self.members.push(member);
                }
                // Alone, it is opened again and says why.
                _ => self.hand_over(member),
            }
        }
        if self.members.is_empty() {
            return RoundEnd::Again;
        }
        let round = CancelToken::new();
        *lock(&self.round) = round.clone();
        for member in &self.members {
            shared.update(member.projection.name(), |entry| {
                entry.round = round.clone();
            });
        }
        if self.anything_asked() {
            round.cancel();
        }
        let progress = |p: &Progress| {
            shared.progress(&p.projection_name, p, false);
            // A member failed: the round ends, so that it is handed over
            // (tried again alone, or left failed), the others go on.
            if p.done && p.err.is_some() {
                round.cancel();
            }
        };
        let guard = core
            .guard
            .as_deref()
            .map(|g| g as &projectionist::CommitGuardFn);
        let mut options = RebuildOptions::new()
            .batch_size(core.batch_size)
            .progress(&progress)
            .follow_until(&round);
        options.commit_guard = guard;
        let names: Vec<String> = self
            .members
            .iter()
            .map(|m| m.projection.name().to_owned())
            .collect();
        let targets = self
            .members
            .iter_mut()
            .zip(&writes)
            .zip(&names)
            .map(|((member, (db, start)), name)| {
                ProjectionTarget::new(db, &mut *member.projection.handler)
                    .consumer_id(name)
                    .start(*start)
            })
            .collect();
        let results = projectionist::replay(&*core.reader, targets, &options);
        drop(writes);
        assert_eq!(results.len(), self.members.len(), "one result per member");
        let mut end = RoundEnd::Again;
        for (mut member, result) in std::mem::take(&mut self.members).into_iter().zip(results) {
            let name = member.projection.name().to_owned();
            match result {
                Ok(_) => self.members.push(member),
                Err(e) if is_store_failure(&e) => {
                    shared.update(&name, |entry| {
                        entry.base = State::Reconnecting {
                            error: e.to_string(),
                        };
                    });
                    end = RoundEnd::Retry;
                    self.members.push(member);
                }
                Err(e) => {
                    let retrying = is_transient(&e);
                    let error = if retrying {
                        format!("{e} (tried again with backoff)")
                    } else {
                        e.to_string()
                    };
                    shared.set_state(&name, State::Failed { error, retrying });
                    member.failed = !retrying;
                    self.hand_over(member);
                }
            }
        }
        end
    }
}

/// Restores `projection` from a snapshot when it is missing here.
fn seed<E>(core: &Core<E>, projection: &Supervised<E>) {
    let Some(from) = &core.seed_from else { return };
    let name = projection.name();
    match crate::snapshot::seed_logged(
        core.dir.path(),
        name,
        from.as_ref(),
        projection.hash.as_deref(),
        &*core.reader,
    ) {
        Ok(Some(crate::snapshot::Seeded {
            restored: Some(manifest),
            ..
        })) => core.shared.emit(&Event::Seeded(manifest)),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(projection = name, error = %e, "cannot seed from snapshots; building from the log")
        }
    }
}

/// Projection `name` is stopped with the supervisor: its state, and the
/// control plane let go of.
fn stopped(shared: &Shared, name: &str) {
    shared.update(name, |entry| {
        if !matches!(entry.base, State::Failed { .. } | State::Stopped { .. }) {
            entry.base = State::Stopped { reason: None };
        }
        entry.outage = None;
        entry.stalled = None;
    });
    shared.unregister(name);
}

/// How often the supervisor looks for request files of other processes:
/// well within the second an asking command waits before it says the request
/// was not taken, cheap (one `stat` per projection).
const REQUEST_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Takes the requests other processes leave in the control plane (see the
/// `control` module) for the projections this process registered.
struct RequestWatch {
    shared: Arc<Shared>,
    dir: std::path::PathBuf,
    projections: Arc<ProjectionDir>,
    commands: Arc<Mutex<BTreeMap<String, Sender<Command>>>>,
}

impl RequestWatch {
    fn run(self) {
        while !self.shared.stop.is_cancelled() {
            for name in self.requested() {
                let registered = self
                    .shared
                    .lock()
                    .get(&name)
                    .is_some_and(|entry| entry.registered);
                if registered {
                    self.take(&name);
                }
            }
            let until = Instant::now() + REQUEST_POLL_INTERVAL;
            while !self.shared.stop.is_cancelled() && Instant::now() < until {
                std::thread::sleep(STOP_POLL_INTERVAL);
            }
        }
    }

    /// The projections with a request file in the directory: one listing of
    /// it (a few system calls however many projections it holds), not a look
    /// at three files per projection.
    fn requested(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(|entry| {
                let file = entry.ok()?.file_name();
                let file = file.to_str()?;
                let rest = file.strip_prefix('.')?;
                [".rebuild-request", ".rollback-request", ".retry-request"]
                    .iter()
                    .find_map(|suffix| rest.strip_suffix(suffix))
                    .map(str::to_owned)
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Serves projection `name`'s pending requests: a rebuild is handed on
    /// (the request removed once queued: the asker knows it was taken); a
    /// rollback is served and answered in its outcome file.
    fn take(&self, name: &str) {
        let Ok(files) = projectionist::VersionFiles::new(&self.dir, name) else {
            return;
        };
        if files.rebuild_request.exists()
            && send_request(&self.shared, &self.commands, name, Request::Rebuild).is_ok()
        {
            tracing::info!(projection = name, "rebuilding in its shadow on request");
            let _ = std::fs::remove_file(&files.rebuild_request);
        }
        self.take_retry(name, &files);
        let Some(id) = control::read_request(&files.rollback_request) else {
            return;
        };
        let id = id.trim().to_owned();
        if control::outcome_path(&self.dir, name, &id).is_none() {
            // No id to answer under: not one of ours; done nothing.
            tracing::warn!(
                projection = name,
                "ignored a rollback request that is not one"
            );
            let _ = std::fs::remove_file(&files.rollback_request);
            return;
        }
        let answer = match send_request(&self.shared, &self.commands, name, Request::Rollback) {
            Ok(answer) => answer,
            Err(e) => {
                let answer = serde_json::json!({"ok": false, "error": e.to_string()});
                control::answer_rollback(&self.dir, name, &id, &answer);
                return;
            }
        };
        // Taken: the asker waits for its answer from here, and the next
        // request (of any projection) is taken meanwhile.
        let _ = std::fs::remove_file(&files.rollback_request);
        let (dir, projections, name) = (
            self.dir.clone(),
            Arc::clone(&self.projections),
            name.to_owned(),
        );
        let answered = std::thread::Builder::new()
            .name(format!("pj-answer-{name}"))
            .spawn(move || {
                let outcome = answer
                    .recv()
                    .map_err(|_| Error::Stopped(name.clone()))
                    .and_then(|outcome| outcome);
                let answer = match outcome {
                    Ok(Outcome::RolledBack { published, follows }) => {
                        let rolled_back_at = projections
                            .db(&name)
                            .and_then(|db| {
                                db.with_connection(|conn| projectionist::version_info(conn))
                            })
                            .ok()
                            .and_then(|v| v.rolled_back_at);
                        serde_json::json!({
                            "ok": true, "checkpoint": published.checkpoint,
                            "rolled_back_at": rolled_back_at, "follows": follows,
                        })
                    }
                    Ok(other) => serde_json::json!({
                        "ok": false, "error": format!("unexpected answer {other:?}"),
                    }),
                    Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
                };
                control::write_outcome(&dir, &name, &id, &answer);
            });
        if let Err(e) = answered {
            tracing::error!(error = %e, "cannot wait for a rollback's answer");
        }
    }
}

impl RequestWatch {
    /// Serves projection `name`'s pending retry request, answered in its
    /// outcome file.
    fn take_retry(&self, name: &str, files: &projectionist::VersionFiles) {
        let Some(text) = control::read_request(&files.retry_request) else {
            return;
        };
        let parsed = control::parse_retry_request(&text)
            .filter(|(id, _)| control::outcome_path(&self.dir, name, id).is_some());
        let Some((id, which)) = parsed else {
            tracing::warn!(projection = name, "ignored a retry request that is not one");
            let _ = std::fs::remove_file(&files.retry_request);
            return;
        };
        let outcome = send_request(&self.shared, &self.commands, name, Request::Retry(which))
            .and_then(|answer| answer.recv().map_err(|_| Error::Stopped(name.to_owned()))?);
        let answer = match outcome {
            Ok(Outcome::Retried(retried)) => control::retry_outcome(&Ok(retried)),
            Ok(other) => control::retry_outcome(&Err(format!("unexpected answer {other:?}"))),
            Err(e) => control::retry_outcome(&Err(e.to_string())),
        };
        control::answer_retry(&self.dir, name, &id, &answer);
    }
}

/// Looks up the log's head and the store's outage, and judges stalls.
struct HeadWatch<E> {
    shared: Arc<Shared>,
    reader: Arc<dyn GlobalReader<E>>,
    late_events: Option<(Arc<LateEventsFn>, OnLateEvent)>,
    commands: Arc<Mutex<BTreeMap<String, Sender<Command>>>>,
}

impl<E> HeadWatch<E> {
    /// Reports each late event and, by the policy, asks for the rebuild of
    /// every projection it affects (handles its type, read past it).
    fn late_events(&self) {
        let Some((late_events, action)) = &self.late_events else {
            return;
        };
        for (sequence, event_type) in late_events() {
            let affected: Vec<String> = self
                .shared
                .lock()
                .iter()
                .filter(|(_, entry)| {
                    entry
                        .types
                        .as_ref()
                        .is_none_or(|types| types.contains(&event_type))
                        && entry
                            .status
                            .checkpoint
                            .max(entry.status.shadow_checkpoint.unwrap_or(0))
                            >= sequence
                })
                .map(|(name, _)| name.clone())
                .collect();
            let rebuild = *action == OnLateEvent::Rebuild && !affected.is_empty();
            tracing::error!(
                sequence,
                event_type = %event_type,
                projections = ?affected,
                rebuild,
                "an event was committed into a hole the reads had passed (its writer broke the writer contract); the projections listed lack it"
            );
            self.shared.emit(&Event::LateEvent {
                sequence,
                event_type: event_type.clone(),
                projections: affected.clone(),
                rebuilding: rebuild,
            });
            if rebuild {
                for name in &affected {
                    // Answered when published; nobody waits for it here.
                    let _ = send_request(&self.shared, &self.commands, name, Request::Rebuild);
                }
            }
        }
    }

    fn run(self) {
        while !self.shared.stop.is_cancelled() {
            self.late_events();
            let outage = self.shared.outage.as_ref().and_then(|outage| outage());
            let head = self.reader.head().ok();
            if let Some(head) = head {
                self.shared.log_head.fetch_max(head, Ordering::SeqCst);
            }
            let log_head = self.shared.log_head.load(Ordering::SeqCst);
            let names: Vec<String> = self.shared.lock().keys().cloned().collect();
            for name in names {
                self.shared.update(&name, |entry| {
                    entry.outage.clone_from(&outage);
                    entry.status.head = entry.status.head.max(log_head);
                    judge_stall(entry, log_head, self.shared.stall_after);
                });
            }
            let until = Instant::now() + HEAD_CHECK_INTERVAL;
            while !self.shared.stop.is_cancelled() && Instant::now() < until {
                std::thread::sleep(STOP_POLL_INTERVAL);
            }
        }
    }
}

/// Whether `entry` is stalled: the log holds events past the checkpoint of
/// the file it writes and it has not advanced for `stall_after`, for any
/// reason but a hole wait, a lost connection, or an end state.
fn judge_stall(entry: &mut Entry, log_head: u64, stall_after: Duration) {
    let excused = entry.outage.is_some()
        || matches!(
            entry.base,
            State::Waiting(_)
                | State::Reconnecting { .. }
                | State::Failed { .. }
                | State::Stopped { .. }
                | State::Publishing
        );
    let checkpoint = entry
        .status
        .shadow_checkpoint
        .unwrap_or(entry.status.checkpoint);
    if excused || log_head <= checkpoint {
        entry.behind_since = None;
        entry.stalled = None;
        return;
    }
    let since = *entry.behind_since.get_or_insert_with(Instant::now);
    if since.elapsed() > stall_after {
        entry.stalled = Some(format!(
            "no progress for {:.0} s with {} events of the log past its checkpoint",
            since.elapsed().as_secs_f64(),
            log_head.saturating_sub(checkpoint)
        ));
    }
}
