//! The engine's data: what a caller hands in (targets, options), what comes out
//! (results), and what the read side and the write side pass each other
//! (messages, the shared run context). Both sides import it; it imports
//! neither.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::checkpoint::Checkpoint;
use crate::db::ProjectionDb;
use crate::error::Error;
use crate::event::GlobalEvent;
use crate::handler::Handler;
use crate::limits::{
    BATCH_SIZE_DEFAULT, COMMIT_INTERVAL_DEFAULT, PAGE_CACHE_BUDGET_KIB,
    PAGE_CACHE_PER_PROJECTION_MAX_KIB, PAGE_CACHE_PER_PROJECTION_MIN_KIB, WRITER_THREADS_MAX,
};
use crate::progress::{CancelToken, CommitGuardFn, ProgressFn};
use crate::reader::GlobalReader;

/// Where a projection's checkpoint is kept.
#[derive(Clone, Copy)]
pub enum CheckpointLocation<'a> {
    /// In the projection's own file (table `_checkpoint`), committed in the same
    /// transaction as the batch: exactly-once. The default, and the recommended one.
    InFile,
    /// Somewhere else. The batch commits first, then the checkpoint is saved, so a
    /// crash between the two applies that batch again on resume: at-least-once.
    /// Handlers used this way must be idempotent.
    External(&'a dyn Checkpoint),
}

impl Default for RebuildOptions<'_> {
    fn default() -> Self {
        RebuildOptions {
            batch_size: BATCH_SIZE_DEFAULT,
            commit_interval: COMMIT_INTERVAL_DEFAULT,
            progress: None,
            cancel: None,
            #[cfg(feature = "testing")]
            step_hook: None,
            commit_guard: None,
            follow_until: None,
        }
    }
}

impl<'a> RebuildOptions<'a> {
    /// The defaults: batches of [`BATCH_SIZE_DEFAULT`], commit groups of
    /// [`COMMIT_INTERVAL_DEFAULT`], no progress, no cancellation, no commit
    /// guard, stop at the log's head.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Events per batch (see [`RebuildOptions::batch_size`](#structfield.batch_size)).
    #[must_use]
    pub fn batch_size(mut self, batch_size: u32) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// How long a commit group may collect batches (see the field).
    #[must_use]
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// Called after every applied batch and once at the end.
    #[must_use]
    pub fn progress(mut self, progress: &'a ProgressFn<'a>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Stops the run at the next batch boundary ([`Error::Cancelled`]).
    #[must_use]
    pub fn cancel(mut self, cancel: &'a CancelToken) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// Asked before every commit; an error rolls back and stops the projection.
    #[must_use]
    pub fn commit_guard(mut self, guard: &'a CommitGuardFn<'a>) -> Self {
        self.commit_guard = Some(guard);
        self
    }

    /// After catching up, follow the log until `stop` is set (see [`replay`](crate::replay)).
    #[must_use]
    pub fn follow_until(mut self, stop: &'a CancelToken) -> Self {
        self.follow_until = Some(stop);
        self
    }

    /// Called at every step of every batch, for fault-injection tests (crate
    /// feature `testing`).
    #[cfg(feature = "testing")]
    #[must_use]
    pub fn step_hook(mut self, hook: &'a crate::progress::StepHookFn<'a>) -> Self {
        self.step_hook = Some(hook);
        self
    }
}

impl std::fmt::Debug for CheckpointLocation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckpointLocation::InFile => f.write_str("InFile"),
            CheckpointLocation::External(_) => f.write_str("External(..)"),
        }
    }
}

/// How a run behaves; shared by all projections of a run. Built with
/// [`RebuildOptions::new`] and its setters (new options come with defaults).
#[derive(Clone, Copy)]
#[non_exhaustive]
pub struct RebuildOptions<'a> {
    /// Events per batch: one read, one handler call, one savepoint. 0 means
    /// [`BATCH_SIZE_DEFAULT`] (500); above [`BATCH_SIZE_MAX`](crate::limits::BATCH_SIZE_MAX) (50,000) is an error.
    pub batch_size: u32,
    /// How long a write transaction may keep collecting batches before it commits
    /// (it also commits at the end, on cancellation and on failure). Every batch
    /// and its checkpoint are in the same transaction either way; a longer interval
    /// means fewer commits (faster rebuilds) and more work lost to a crash.
    /// `Duration::ZERO` commits after every batch. Default
    /// [`COMMIT_INTERVAL_DEFAULT`]; above [`COMMIT_INTERVAL_MAX`](crate::limits::COMMIT_INTERVAL_MAX) is an error.
    pub commit_interval: Duration,
    /// Called after every applied batch (see [`Progress`](crate::Progress)) and
    /// once at the end. Default: none.
    pub progress: Option<&'a ProgressFn<'a>>,
    /// Stops the run at the next batch boundary. Default: none.
    pub cancel: Option<&'a CancelToken>,
    /// Called at every step of every batch; for fault-injection tests (crate
    /// feature `testing`). Default: none.
    #[cfg(feature = "testing")]
    pub step_hook: Option<&'a crate::progress::StepHookFn<'a>>,
    /// Asked before every commit; an error rolls the transaction back and stops
    /// the projection (lease fencing). Default: none.
    pub commit_guard: Option<&'a CommitGuardFn<'a>>,
    /// After catching up, keep following the log until this token is set
    /// (see [`replay`](crate::replay)). Default: none (the run ends at the
    /// log's head).
    pub follow_until: Option<&'a CancelToken>,
}

/// One projection to replay into. Built with [`ProjectionTarget::new`] and
/// its setters.
#[non_exhaustive]
pub struct ProjectionTarget<'a, E> {
    /// The projection's database (from [`ProjectionDir::db`](crate::ProjectionDir::db));
    /// it also names the projection.
    pub db: &'a ProjectionDb,
    /// Applies batches.
    pub handler: &'a mut dyn Handler<E>,
    /// Where the checkpoint lives.
    pub checkpoint: CheckpointLocation<'a>,
    /// The checkpoint's consumer id (1 to 256 bytes).
    pub consumer_id: &'a str,
    /// Where it starts: [`Start::Resume`] (the default) continues from its
    /// checkpoint, [`Start::Reset`] rebuilds it from scratch.
    pub start: Start,
}

impl<'a, E> ProjectionTarget<'a, E> {
    /// `handler` replaying into `db`, with its checkpoint in the file under
    /// the projection's name, continuing from it ([`Start::Resume`]; a new
    /// file starts at 0).
    pub fn new(db: &'a ProjectionDb, handler: &'a mut dyn Handler<E>) -> Self {
        ProjectionTarget {
            db,
            handler,
            checkpoint: CheckpointLocation::InFile,
            consumer_id: db.name().as_str(),
            start: Start::Resume,
        }
    }

    /// Where the checkpoint lives (default [`CheckpointLocation::InFile`]).
    #[must_use]
    pub fn checkpoint(mut self, checkpoint: CheckpointLocation<'a>) -> Self {
        self.checkpoint = checkpoint;
        self
    }

    /// The checkpoint's consumer id (default: the projection's name).
    #[must_use]
    pub fn consumer_id(mut self, consumer_id: &'a str) -> Self {
        self.consumer_id = consumer_id;
        self
    }

    /// Where it starts (default [`Start::Resume`]).
    #[must_use]
    pub fn start(mut self, start: Start) -> Self {
        self.start = start;
        self
    }
}

/// Everything one rebuild needs.
pub struct RebuildConfig<'a, E> {
    /// The event log.
    pub reader: &'a dyn GlobalReader<E>,
    /// The projection.
    pub projection: ProjectionTarget<'a, E>,
    /// Batch size, progress, cancellation.
    pub options: RebuildOptions<'a>,
}

/// What a successful run did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RebuildResult {
    /// The projection.
    pub projection_name: String,
    /// Events applied in this run.
    pub processed: u64,
    /// The committed checkpoint at the end.
    pub checkpoint: u64,
    /// The log's head when the run started (for a follower: when it stopped).
    pub total: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Dead letters the projection file holds at the end (see
    /// [`OnError::Skip`](crate::OnError::Skip)).
    pub dead_letters: u64,
    /// Of them, recorded by this run.
    pub dead_lettered: u64,
}

impl RebuildResult {
    /// A result for projection `name` with every count at zero: for code
    /// that reports runs of its own in the same shape; set the fields it
    /// needs.
    #[must_use]
    pub fn new(name: impl Into<String>) -> Self {
        RebuildResult {
            projection_name: name.into(),
            processed: 0,
            checkpoint: 0,
            total: 0,
            elapsed: Duration::ZERO,
            dead_letters: 0,
            dead_lettered: 0,
        }
    }
}

/// Where one projection of a run starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// From scratch: in one transaction, drop the projection's tables (all but
    /// `_checkpoint` and the run record), reset the checkpoint, run `setup`.
    Reset,
    /// From its checkpoint.
    Resume,
}

pub(crate) enum Message<E> {
    Batch {
        events: Arc<Vec<GlobalEvent<E>>>,
        /// When the reader had read them.
        read_at: Instant,
    },
    /// A follower read to the head: every event up to `through` was
    /// considered. Commit now, so readers see new events at once.
    CaughtUp {
        /// Every event up to this sequence was considered by the reader.
        through: u64,
    },
    /// The log is read to its end: every event up to `through` was considered.
    End {
        /// Every event up to this sequence was considered by the reader.
        through: u64,
    },
    /// Reading failed; every projection stops at its last committed batch.
    ReadFailed(Arc<Error>),
    /// An event of a type this projection handles cannot be decoded (a poison
    /// event): the projection stops at its last committed batch, or, when it
    /// skips poison events, records it as a dead letter; the others go on.
    Poison {
        /// What was wrong with the event.
        error: Arc<Error>,
        /// The projections (places in the run's input) that stop.
        projections: Arc<[usize]>,
    },
}

/// What every writer of one run shares.
pub(crate) struct RunContext<'a> {
    pub(crate) options: &'a RebuildOptions<'a>,
    /// The log's head: when the run started, raised by a follower's reads.
    pub(crate) head: AtomicU64,
    /// Projections of the run that have ended (a follower stops waiting for
    /// new events when none is left).
    pub(crate) projections_ended: AtomicUsize,
    /// Per projection (place in the run's input): ended, or told to stop by
    /// the reader; the reader reads only for the others.
    pub(crate) ended: Vec<AtomicBool>,
    /// Validated `options.commit_interval`.
    pub(crate) commit_interval: Duration,
    /// Projections (the first ones of the run's input) whose files stay open
    /// ([`OPEN_PROJECTIONS_MAX`](crate::limits::OPEN_PROJECTIONS_MAX)).
    pub(crate) open_max: usize,
    /// Where the reader's last read to the end of the log was held.
    pub(crate) hole_wait: std::sync::Mutex<Option<crate::reader::HoleWait>>,
    /// Per projection: it skips poison events (dead-letters them) rather
    /// than stopping at one.
    pub(crate) skips: Vec<bool>,
}

impl RunContext<'_> {
    /// The log's head as last seen.
    pub(crate) fn head(&self) -> u64 {
        self.head.load(Ordering::Relaxed)
    }

    /// Projection `idx` has ended.
    pub(crate) fn projection_ended(&self, idx: usize) {
        self.ended[idx].store(true, Ordering::SeqCst);
        self.projections_ended.fetch_add(1, Ordering::SeqCst);
    }

    /// Each projection's share of the run's page cache, in KiB (see
    /// [`PAGE_CACHE_BUDGET_KIB`]).
    pub(crate) fn page_cache_kib(&self) -> u64 {
        // Parked projections are open one per writer thread at most.
        let open = self
            .ended
            .len()
            .min(self.open_max + WRITER_THREADS_MAX as usize);
        let projections = open.max(1) as u64;
        (PAGE_CACHE_BUDGET_KIB / projections).clamp(
            PAGE_CACHE_PER_PROJECTION_MIN_KIB,
            PAGE_CACHE_PER_PROJECTION_MAX_KIB,
        )
    }

    /// Whether projection `idx` keeps its file open for the whole run.
    pub(crate) fn keeps_open(&self, idx: usize) -> bool {
        idx < self.open_max
    }

    /// Whether some projections of the run are parked between messages.
    pub(crate) fn parks_some(&self) -> bool {
        self.ended.len() > self.open_max
    }

    /// Whether every projection of the run has ended.
    pub(crate) fn all_ended(&self) -> bool {
        self.projections_ended.load(Ordering::SeqCst) >= self.ended.len()
    }

    /// The reader stops reading for projection `idx` (it was sent a poison
    /// event); its writer counts it as ended when it has ended.
    pub(crate) fn stop_reading_for(&self, idx: usize) {
        self.ended[idx].store(true, Ordering::SeqCst);
    }

    /// Whether projection `idx` dead-letters poison events (the reader reads
    /// on for it past one).
    pub(crate) fn skips(&self, idx: usize) -> bool {
        self.skips.get(idx).copied().unwrap_or(false)
    }

    /// Whether projection `idx` still runs, as far as the reader knows.
    pub(crate) fn running(&self, idx: usize) -> bool {
        !self.ended[idx].load(Ordering::SeqCst)
    }

    /// A read saw the log reach `through`.
    pub(crate) fn saw_head(&self, through: u64) {
        self.head.fetch_max(through, Ordering::Relaxed);
    }

    /// Where the reader's last read to the end of the log was held.
    pub(crate) fn hole_wait(&self) -> Option<crate::reader::HoleWait> {
        *self
            .hole_wait
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn set_hole_wait(&self, wait: Option<crate::reader::HoleWait>) {
        *self
            .hole_wait
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = wait;
    }
}
