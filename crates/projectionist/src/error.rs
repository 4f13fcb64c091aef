//! The library's one error type. Variants say what the caller can act on; the
//! underlying driver error stays reachable through `source()`.

use std::path::PathBuf;

/// A boxed error, as returned by handlers and foreign stores.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A handler's error about one event: handlers return it (boxed) so that the
/// engine, the CLI and `status` can name the event that failed.
#[derive(Debug, thiserror::Error)]
#[error("event {sequence} (stream {stream_id}, type {event_type}): {message}")]
pub struct EventFailure {
    /// The event's global sequence.
    pub sequence: u64,
    /// The event's stream.
    pub stream_id: String,
    /// The event's type.
    pub event_type: String,
    /// What went wrong.
    pub message: String,
}

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A projection name that cannot be used as a file name inside the directory.
    #[error("invalid projection name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name, verbatim.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// An option or argument outside its documented range.
    #[error("invalid options: {0}")]
    InvalidOptions(String),

    /// Another process (or another `ProjectionDir` in this one) writes this projection.
    #[error(
        "projection {name} is locked by {} (lock file {})",
        holder.map_or("another process".to_owned(), |pid| format!("process {pid}")),
        path.display()
    )]
    Locked {
        /// The projection.
        name: String,
        /// The lock file.
        path: PathBuf,
        /// The process that holds the lock, as it wrote in the lock file
        /// (`None` when unknown: a holder of an earlier version).
        holder: Option<u32>,
    },

    /// A file where a projection would live that is not recognisably a projection
    /// (another program's database, a symbolic link, a stray file): it is left alone.
    #[error("{} is not a projection file ({reason}); it was left alone", path.display())]
    NotAProjection {
        /// The file.
        path: PathBuf,
        /// Why it is not taken for a projection.
        reason: String,
    },

    /// A projection file that SQLite cannot read (a damaged header or pages).
    #[error("projection file {} is corrupt: {reason}", path.display())]
    CorruptProjection {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        reason: String,
    },

    /// A projection that does not exist in the directory.
    #[error("no projection {name} in {}", dir.display())]
    NoSuchProjection {
        /// The projection.
        name: String,
        /// The directory.
        dir: PathBuf,
    },

    /// A projection whose checkpoint is past the end of the event log: it was built
    /// from another (or a longer) log, so resuming it would report a wrong state.
    #[error(
        "projection {name}: checkpoint {checkpoint} is beyond the event store's head {head}; \
         was it built from another store? rebuild it to start over"
    )]
    CheckpointBeyondHead {
        /// The projection.
        name: String,
        /// Its checkpoint.
        checkpoint: u64,
        /// The store's last sequence.
        head: u64,
    },

    /// An event whose stored data cannot be read at all (not UTF-8, not JSON text).
    #[error("event at sequence {sequence} (stream {stream_id}, type {event_type}): {reason}")]
    InvalidEvent {
        /// The event's global sequence.
        sequence: u64,
        /// The event's stream.
        stream_id: String,
        /// The event's type.
        event_type: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The event store exists but is not one this command can read (no events
    /// table, a missing column); nothing was created or changed in it.
    #[error("event store {store}: {reason}")]
    NotAnEventStore {
        /// The file or server.
        store: String,
        /// What is missing.
        reason: String,
    },

    /// The projection was removed or its directory closed while a handle was still held.
    #[error("projection {name} is closed")]
    Closed {
        /// The projection.
        name: String,
    },

    /// A file-system operation failed.
    #[error("{step} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "create projection directory".
        step: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
    },

    /// A SQLite operation failed.
    #[error("{step}: {source}")]
    Sqlite {
        /// What was being done, with the file or projection it concerns.
        step: String,
        /// The driver's error.
        #[source]
        source: rusqlite::Error,
    },

    /// An append expected a stream version that is no longer current; nothing was written.
    #[error(
        "append to stream {stream_id}: expected version {expected}, but the stream is at {actual}"
    )]
    Conflict {
        /// The stream.
        stream_id: String,
        /// The version the caller expected.
        expected: u64,
        /// The version found.
        actual: u64,
    },

    /// An event whose data could not be decoded into the projection's event type.
    #[error(
        "decode event at sequence {sequence} (stream {stream_id}, type {event_type}): {source}"
    )]
    Decode {
        /// The event's global sequence.
        sequence: u64,
        /// The event's stream.
        stream_id: String,
        /// The event's type.
        event_type: String,
        /// What the decoder said.
        #[source]
        source: serde_json::Error,
    },

    /// A store row that breaks the store's own rules (for example a sequence that
    /// does not increase, or a negative number).
    #[error("corrupt event store: {0}")]
    CorruptStore(String),

    /// The projection's handler failed on a batch; the batch was rolled back.
    #[error(
        "projection {name}: handler failed on events {first_sequence}..={last_sequence}; \
         committed through sequence {committed}: {source}"
    )]
    Handler {
        /// The projection.
        name: String,
        /// The last sequence whose effects are committed; a resume starts after it.
        committed: u64,
        /// First sequence of the failed batch.
        first_sequence: u64,
        /// Last sequence of the failed batch.
        last_sequence: u64,
        /// The handler's error.
        #[source]
        source: BoxError,
    },

    /// The handler's `setup` (creating the projection's tables) failed; nothing
    /// was applied.
    #[error("projection {name}: setup (creating its tables) failed: {source}")]
    Setup {
        /// The projection.
        name: String,
        /// The handler's error.
        #[source]
        source: BoxError,
    },

    /// [`Handler::caught_up`](crate::Handler::caught_up) failed; the events
    /// applied before it are committed.
    #[error("projection {name}: caught_up (run at the log's head) failed: {source}")]
    CaughtUp {
        /// The projection.
        name: String,
        /// The handler's error.
        #[source]
        source: BoxError,
    },

    /// [`wait_for_checkpoint`](crate::wait_for_checkpoint) gave up: the
    /// projection had not reached the position in time.
    #[error(
        "projection {name}: checkpoint {checkpoint} had not reached {position} after {waited:?}"
    )]
    WaitTimedOut {
        /// The projection.
        name: String,
        /// The position waited for.
        position: u64,
        /// The checkpoint at the end (0 when the file did not exist).
        checkpoint: u64,
        /// How long it waited.
        waited: std::time::Duration,
    },

    /// A checkpoint save that would move the checkpoint backwards.
    #[error("checkpoint of {consumer_id} would go back from {current} to {new}")]
    CheckpointBackwards {
        /// The consumer.
        consumer_id: String,
        /// The stored checkpoint.
        current: u64,
        /// The rejected value.
        new: u64,
    },

    /// A rebuild stopped by its cancellation token at a batch boundary.
    #[error(
        "projection {name}: cancelled; committed through sequence {committed}, resume continues from there"
    )]
    Cancelled {
        /// The projection.
        name: String,
        /// The last committed sequence.
        committed: u64,
    },

    /// The commit guard refused a commit (for example, the worker lost its lease):
    /// the transaction was rolled back.
    #[error("projection {name}: commit refused, committed through sequence {committed}: {source}")]
    Fenced {
        /// The projection.
        name: String,
        /// The last committed sequence.
        committed: u64,
        /// Why the guard refused.
        #[source]
        source: BoxError,
    },

    /// Reading the event log failed; the projection stopped at its last committed batch.
    #[error("projection {name}: {source}; committed through sequence {committed}")]
    Replay {
        /// The projection.
        name: String,
        /// The last committed sequence.
        committed: u64,
        /// The reader's error.
        #[source]
        source: std::sync::Arc<Error>,
    },

    /// A publish or rollback that cannot go ahead: no shadow or previous version
    /// to publish, a shadow behind the live file, or files that cannot be copied
    /// into each other. The live projection is unchanged.
    #[error("projection {name}: {reason}")]
    Version {
        /// The projection.
        name: String,
        /// What stands in the way.
        reason: String,
    },

    /// Not enough free disk space for a shadow rebuild or a publish; nothing was
    /// written.
    #[error(
        "not enough free disk space in {} to {step}: {needed} bytes needed, {available} available",
        path.display()
    )]
    DiskSpace {
        /// What needed the space.
        step: String,
        /// The directory.
        path: PathBuf,
        /// Bytes needed.
        needed: u64,
        /// Bytes free for this process.
        available: u64,
    },

    /// A projection that skips poison events ([`OnError::Skip`](crate::OnError::Skip))
    /// holds as many dead letters as its bound allows, and another event
    /// failed: so many failing events mean its definition is wrong.
    #[error(
        "projection {name} stopped: it holds {max} dead letters (its max_dead_letters) and \
         another event failed ({last_error}); so many failing events mean the definition is \
         wrong, not the events: fix it, then retry the dead letters or rebuild \
         (committed through sequence {committed})"
    )]
    DeadLettersFull {
        /// The projection.
        name: String,
        /// Its bound.
        max: u32,
        /// The last committed sequence.
        committed: u64,
        /// The error of the event that found the bound reached.
        last_error: String,
    },

    /// An error from a store or checkpoint implemented outside this crate.
    #[error("{step}: {source}")]
    External {
        /// What was being done.
        step: String,
        /// The implementation's error.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// Wraps a SQLite error with the step that failed.
    pub(crate) fn sqlite(step: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> Error {
        let step = step.into();
        move |source| Error::Sqlite { step, source }
    }

    /// Wraps an I/O error with the step and path that failed.
    pub(crate) fn io(
        step: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { step, path, source }
    }

    /// The event an error is about, when it is about one: its sequence, stream
    /// and type (a poison event, or a handler that failed on an event and said
    /// which with [`EventFailure`]).
    #[must_use]
    pub fn event(&self) -> Option<(u64, &str, &str)> {
        match self {
            Error::Decode {
                sequence,
                stream_id,
                event_type,
                ..
            }
            | Error::InvalidEvent {
                sequence,
                stream_id,
                event_type,
                ..
            } => Some((*sequence, stream_id, event_type)),
            Error::Replay { source, .. } => source.event(),
            Error::Handler { source, .. } => source
                .downcast_ref::<EventFailure>()
                .map(|f| (f.sequence, f.stream_id.as_str(), f.event_type.as_str())),
            _ => None,
        }
    }

    /// The last committed sequence, for errors that stop a projection.
    #[must_use]
    pub fn committed(&self) -> Option<u64> {
        match self {
            Error::Handler { committed, .. }
            | Error::Cancelled { committed, .. }
            | Error::Replay { committed, .. }
            | Error::Fenced { committed, .. }
            | Error::DeadLettersFull { committed, .. } => Some(*committed),
            _ => None,
        }
    }
}

/// Whether `error` (or one of its causes) comes from the environment rather
/// than from the event or the definition: a busy or locked database, a full
/// disk, an I/O failure, a file that cannot be opened, memory. Such an error
/// is worth trying again later and is never a dead letter.
#[must_use]
pub fn is_transient(error: &(dyn std::error::Error + 'static)) -> bool {
    use rusqlite::ErrorCode;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(sqlite) = e.downcast_ref::<rusqlite::Error>()
            && matches!(
                sqlite.sqlite_error_code(),
                Some(
                    ErrorCode::DatabaseBusy
                        | ErrorCode::DatabaseLocked
                        | ErrorCode::DiskFull
                        | ErrorCode::SystemIoFailure
                        | ErrorCode::CannotOpen
                        | ErrorCode::OutOfMemory
                        | ErrorCode::ReadOnly
                )
            )
        {
            return true;
        }
        if let Some(core) = e.downcast_ref::<Error>()
            && matches!(core, Error::DiskSpace { .. } | Error::Locked { .. })
        {
            return true;
        }
        cause = e.source();
    }
    false
}
