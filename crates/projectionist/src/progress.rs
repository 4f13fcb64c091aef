//! Progress values handed to a callback, the cancellation token, and the batch
//! step hook used by fault-injection tests. Nothing here prints.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// One progress report: after every applied batch (committed, or in the open
/// commit group; `checkpoint` is what is committed), and once at the end.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// The projection.
    pub projection_name: String,
    /// Events applied to the projection in this run.
    pub processed: u64,
    /// The log's head sequence when the run started; for a follower, as of its
    /// latest read.
    pub total: u64,
    /// The projection's committed checkpoint.
    pub checkpoint: u64,
    /// The checkpoint this run started from (0 for a rebuild): rates and ETAs
    /// over `checkpoint - started_from` measure this run alone.
    pub started_from: u64,
    /// True for the last report of the run.
    pub done: bool,
    /// The error that ended the run, on the last report of a failed run.
    pub err: Option<String>,
    /// The projection has caught up with the log and follows it
    /// ([`follow`](crate::follow) only; a report is also made each time it
    /// catches up, even when nothing was applied).
    pub following: bool,
    /// How long the events of the last commit that applied any waited, from
    /// the read of the oldest of them to the commit (the time a new event
    /// takes to become visible to readers, less the read itself); `None`
    /// before the first such commit of the run.
    pub batch_latency: Option<std::time::Duration>,
    /// A following projection whose reads are held at a missing sequence
    /// number that a running transaction may still fill (PostgreSQL): the
    /// number and since when. `total` is then the log's real head, so the lag
    /// counts the committed events behind the hole.
    pub hole_wait: Option<crate::reader::HoleWait>,
    /// Dead letters the projection file holds (see
    /// [`OnError::Skip`](crate::OnError::Skip)), committed or in the open
    /// commit group.
    pub dead_letters: u64,
}

impl Progress {
    /// A report for projection `name` with every count at zero, nothing done
    /// and no error: for code that makes reports of its own (a supervisor,
    /// tests of a progress display); set the fields it needs.
    #[must_use]
    pub fn new(name: impl Into<String>) -> Self {
        Progress {
            projection_name: name.into(),
            processed: 0,
            total: 0,
            checkpoint: 0,
            started_from: 0,
            done: false,
            err: None,
            following: false,
            batch_latency: None,
            hole_wait: None,
            dead_letters: 0,
        }
    }
}

/// A progress callback. It runs on the projection's writer thread, between
/// batches: keep it quick.
pub type ProgressFn<'a> = dyn Fn(&Progress) + Send + Sync + 'a;

/// A cheap, clonable cancellation token. Rebuilds check it at batch boundaries
/// and stop with [`Error::Cancelled`](crate::Error::Cancelled), their last batch
/// committed.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every run holding this token to stop at its next batch boundary.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether [`CancelToken::cancel`] was called.
    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The steps of one batch, in the order they happen when the checkpoint is in the
/// projection file: `Begun`, `Applied`, `CheckpointSaved`, `Committed`. With an
/// external checkpoint the batch commits first and the checkpoint is saved after:
/// `Begun`, `Applied`, `Committed`, `CheckpointSaved`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BatchStep {
    /// The batch's savepoint has begun (inside the commit group's write
    /// transaction).
    Begun,
    /// The handler has applied the batch (not yet committed).
    Applied,
    /// The checkpoint advance is written.
    CheckpointSaved,
    /// The projection's transaction is committed.
    Committed,
}

impl BatchStep {
    /// All steps.
    pub const ALL: [BatchStep; 4] = [
        BatchStep::Begun,
        BatchStep::Applied,
        BatchStep::CheckpointSaved,
        BatchStep::Committed,
    ];

    /// The step's name, as used by crash-point tests.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            BatchStep::Begun => "begun",
            BatchStep::Applied => "applied",
            BatchStep::CheckpointSaved => "checkpoint-saved",
            BatchStep::Committed => "committed",
        }
    }
}

/// Called at every [`BatchStep`] with the projection name and the batch number
/// (1 for the run's first batch). For fault injection in tests: a hook that aborts
/// the process simulates a crash at exactly that step.
pub type StepHookFn<'a> = dyn Fn(&str, BatchStep, u64) + Send + Sync + 'a;

/// Called right before every commit of a projection's transaction, with the
/// projection name. An error aborts the commit: the transaction rolls back and the
/// projection stops with [`Error::Fenced`](crate::Error::Fenced). Used to check a
/// lease's fencing epoch, so a worker that lost its lease commits nothing.
pub type CommitGuardFn<'a> = dyn Fn(&str) -> Result<(), crate::BoxError> + Send + Sync + 'a;
