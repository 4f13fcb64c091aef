//! One state per projection, the same wherever it is shown: the handle's
//! [`Supervisor::status`](crate::Supervisor::status), the events it sends, and
//! (through the command line) `status`, `--json`, metrics and `/health`.

use std::time::Instant;

use projectionist::{Progress, Published};

/// What a supervised projection is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum State {
    /// Being opened.
    Starting,
    /// Applying the log up to its head, in the live file.
    CatchingUp,
    /// At the head; each new event is applied as it is committed.
    Following,
    /// A new version (a changed definition, a requested rebuild) is built in
    /// the shadow file; the live file serves the previous one meanwhile.
    BuildingShadow,
    /// The caught-up shadow is being copied into the live file.
    Publishing,
    /// Reads are held, for a reason that ends by itself.
    Waiting(WaitReason),
    /// The event store cannot be read; it is tried again with backoff.
    Reconnecting {
        /// The store's error.
        error: String,
    },
    /// The log holds events past its checkpoint and it has not advanced for
    /// longer than the stall bound, for no reason that ends by itself.
    Stalled {
        /// What was seen.
        reason: String,
    },
    /// It stopped on an error.
    Failed {
        /// The error.
        error: String,
        /// Whether the supervisor tries again by itself, with backoff (a cause
        /// that can go away: disk space, an obstacle, a failed publish); when
        /// not, a rebuild request or a restart does.
        retrying: bool,
    },
    /// Not running: the supervisor stopped, or (with a reason) it is left as
    /// it is on purpose.
    Stopped {
        /// Why it is left as it is, when it is.
        reason: Option<String>,
    },
}

/// Why reads are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WaitReason {
    /// A PostgreSQL sequence hole that may still be filled by a transaction
    /// in progress.
    Hole {
        /// The missing sequence.
        sequence: u64,
        /// Since when.
        since: Instant,
    },
}

impl State {
    /// Its name as every surface shows it: `starting`, `catching up`,
    /// `following`, `building shadow`, `publishing`, `waiting`,
    /// `reconnecting`, `stalled`, `failed`, `stopped`.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::CatchingUp => "catching up",
            State::Following => "following",
            State::BuildingShadow => "building shadow",
            State::Publishing => "publishing",
            State::Waiting(_) => "waiting",
            State::Reconnecting { .. } => "reconnecting",
            State::Stalled { .. } => "stalled",
            State::Failed { .. } => "failed",
            State::Stopped { .. } => "stopped",
        }
    }

    /// Why, for the states that have a reason.
    #[must_use]
    pub fn reason(&self) -> Option<String> {
        match self {
            State::Waiting(WaitReason::Hole { sequence, since }) => Some(format!(
                "at sequence hole {sequence} for {:.0} s",
                since.elapsed().as_secs_f64()
            )),
            State::Reconnecting { error } => Some(error.clone()),
            State::Stalled { reason } => Some(reason.clone()),
            State::Failed { error, .. } => Some(error.clone()),
            State::Stopped { reason } => reason.clone(),
            _ => None,
        }
    }

    /// Whether an operator need not look: it advances, or waits for a cause
    /// that ends by itself. `stalled`, `failed` and `reconnecting` are not.
    #[must_use]
    pub fn is_healthy(&self) -> bool {
        !matches!(
            self,
            State::Stalled { .. } | State::Failed { .. } | State::Reconnecting { .. }
        )
    }
}

/// One projection's state and positions.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// The projection.
    pub name: String,
    /// What it is doing.
    pub state: State,
    /// The live file's committed checkpoint: what its readers see.
    pub checkpoint: u64,
    /// The log's head as last seen.
    pub head: u64,
    /// While a new version is built in the shadow: the shadow's checkpoint.
    pub shadow_checkpoint: Option<u64>,
    /// Events applied by this supervisor since it started.
    pub processed: u64,
    /// Dead letters the live file holds (events it skipped, see
    /// [`projectionist::OnError::Skip`]).
    pub dead_letters: u64,
}

impl Status {
    /// Projection `name`, `starting`, with the log's head at `head` and
    /// nothing applied yet (for a display that shows projections before
    /// their first report).
    #[must_use]
    pub fn new(name: &str, head: u64) -> Self {
        Status {
            name: name.to_owned(),
            state: State::Starting,
            checkpoint: 0,
            head,
            shadow_checkpoint: None,
            processed: 0,
            dead_letters: 0,
        }
    }

    /// Events of the log past the checkpoint of the file being written.
    #[must_use]
    pub fn lag(&self) -> u64 {
        self.head
            .saturating_sub(self.shadow_checkpoint.unwrap_or(self.checkpoint))
    }
}

/// What a supervisor tells whoever listens (see
/// [`SupervisorBuilder::on_event`](crate::SupervisorBuilder::on_event)).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Event {
    /// A projection's state changed (its name, or its reason).
    State(Status),
    /// The engine's report after a batch (or when it reaches the head).
    Progress(Progress),
    /// A shadow was published: the live file serves the new version.
    Published(Published),
    /// A projection was rolled back to its previous version.
    RolledBack(Published),
    /// An event was committed into a hole the reads had passed (see
    /// [`SupervisorBuilder::late_events`](crate::SupervisorBuilder::late_events)).
    LateEvent {
        /// Its sequence.
        sequence: u64,
        /// Its type.
        event_type: String,
        /// The projections that had read past it and handle its type.
        projections: Vec<String>,
        /// Whether they are rebuilt.
        rebuilding: bool,
    },
    /// A missing projection was restored from a snapshot (see
    /// [`SupervisorBuilder::seed_from`](crate::SupervisorBuilder::seed_from)).
    Seeded(crate::snapshot::Manifest),
    /// A corrupt projection file was moved aside; the projection starts afresh.
    MovedAside {
        /// The projection.
        name: String,
        /// What was wrong with the file.
        reason: String,
        /// Where it is now.
        path: std::path::PathBuf,
    },
}
