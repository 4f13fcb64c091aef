//! Checkpoints: the trait `Checkpoint`, and `SqliteCheckpoint`, whose
//! `_checkpoint` table lives in the projection's own file.

use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::db::{ProjectionDb, write_transaction};
use crate::error::{Error, Result};
use crate::limits::CONSUMER_ID_LEN_MAX;

/// Where a consumer has got to in the global log: the sequence of the last event
/// whose effects are committed. 0 means nothing has been applied.
///
/// A checkpoint moves forward only; [`Checkpoint::reset`] is the one way back.
pub trait Checkpoint: Send + Sync {
    /// The consumer's checkpoint, 0 when it has none.
    ///
    /// # Errors
    /// Storage errors.
    fn load(&self, consumer_id: &str) -> Result<u64>;

    /// Moves the consumer's checkpoint forward to `sequence`.
    ///
    /// # Errors
    /// [`Error::CheckpointBackwards`] when `sequence` is not greater than the stored
    /// one; storage errors.
    fn save(&self, consumer_id: &str, sequence: u64) -> Result<()>;

    /// Sets the consumer's checkpoint back to 0.
    ///
    /// # Errors
    /// Storage errors.
    fn reset(&self, consumer_id: &str) -> Result<()>;

    /// The projection file this checkpoint lives in, if it lives in one. The
    /// engine refuses a projection's own file as an external checkpoint: that is
    /// `CheckpointLocation::InFile`, with exactly-once batches.
    fn projection_file(&self) -> Option<&std::path::Path> {
        None
    }
}

/// A checkpoint kept in the projection's own file, table `_checkpoint`.
///
/// Its static functions work inside a transaction the caller holds, which is how
/// the rebuild engine commits a batch and its checkpoint together.
#[derive(Clone, Debug)]
pub struct SqliteCheckpoint {
    db: Arc<ProjectionDb>,
}

impl SqliteCheckpoint {
    /// The checkpoints of this projection file.
    #[must_use]
    pub fn new(db: Arc<ProjectionDb>) -> Self {
        SqliteCheckpoint { db }
    }

    /// Reads a checkpoint through any connection to the projection file.
    ///
    /// # Errors
    /// [`Error::Sqlite`]; [`Error::InvalidOptions`] for a bad consumer id.
    pub fn load_in(conn: &Connection, consumer_id: &str) -> Result<u64> {
        validate_consumer_id(consumer_id)?;
        let sequence: Option<i64> = conn
            .prepare_cached("SELECT sequence FROM _checkpoint WHERE consumer_id = ?1")
            .and_then(|mut stmt| stmt.query_row([consumer_id], |row| row.get(0)).optional())
            .map_err(Error::sqlite(format!("load checkpoint of {consumer_id}")))?;
        let sequence = sequence.unwrap_or(0);
        u64::try_from(sequence).map_err(|_| {
            Error::CorruptStore(format!(
                "checkpoint of {consumer_id} is negative ({sequence})"
            ))
        })
    }

    /// Moves a checkpoint forward inside the caller's transaction.
    ///
    /// # Errors
    /// [`Error::CheckpointBackwards`] when `sequence` is not greater than the stored
    /// value (nothing is written); [`Error::Sqlite`].
    pub fn save_in(tx: &Transaction<'_>, consumer_id: &str, sequence: u64) -> Result<()> {
        validate_consumer_id(consumer_id)?;
        let new = i64::try_from(sequence)
            .map_err(|_| Error::InvalidOptions(format!("checkpoint {sequence} is too large")))?;
        let changed = tx
            .prepare_cached(
                "INSERT INTO _checkpoint (consumer_id, sequence) VALUES (?1, ?2)
                 ON CONFLICT (consumer_id) DO UPDATE SET sequence = excluded.sequence
                 WHERE excluded.sequence > _checkpoint.sequence",
            )
            .and_then(|mut stmt| stmt.execute(params![consumer_id, new]))
            .map_err(Error::sqlite(format!("save checkpoint of {consumer_id}")))?;
        if changed == 1 {
            return Ok(());
        }
        let current = Self::load_in(tx, consumer_id)?;
        Err(Error::CheckpointBackwards {
            consumer_id: consumer_id.to_owned(),
            current,
            new: sequence,
        })
    }

    /// Sets a checkpoint back to 0 inside the caller's transaction.
    ///
    /// # Errors
    /// [`Error::Sqlite`].
    pub fn reset_in(tx: &Transaction<'_>, consumer_id: &str) -> Result<()> {
        validate_consumer_id(consumer_id)?;
        tx.execute(
            "DELETE FROM _checkpoint WHERE consumer_id = ?1",
            [consumer_id],
        )
        .map_err(Error::sqlite(format!("reset checkpoint of {consumer_id}")))?;
        Ok(())
    }
}

impl Checkpoint for SqliteCheckpoint {
    fn load(&self, consumer_id: &str) -> Result<u64> {
        self.db
            .with_connection(|conn| Self::load_in(conn, consumer_id))
    }

    fn save(&self, consumer_id: &str, sequence: u64) -> Result<()> {
        let label = || format!("save checkpoint of {consumer_id}");
        self.db.with_connection(|conn| {
            write_transaction(conn, label, |tx| Self::save_in(tx, consumer_id, sequence))
        })
    }

    fn projection_file(&self) -> Option<&std::path::Path> {
        Some(self.db.path())
    }

    fn reset(&self, consumer_id: &str) -> Result<()> {
        let label = || format!("reset checkpoint of {consumer_id}");
        self.db.with_connection(|conn| {
            write_transaction(conn, label, |tx| Self::reset_in(tx, consumer_id))
        })
    }
}

/// Checks a consumer id: 1 to [`CONSUMER_ID_LEN_MAX`] bytes, no control characters.
pub(crate) fn validate_consumer_id(consumer_id: &str) -> Result<()> {
    if consumer_id.is_empty() {
        return Err(Error::InvalidOptions("consumer id is empty".into()));
    }
    if consumer_id.len() > CONSUMER_ID_LEN_MAX {
        return Err(Error::InvalidOptions(format!(
            "consumer id is longer than {CONSUMER_ID_LEN_MAX} bytes"
        )));
    }
    if consumer_id.chars().any(char::is_control) {
        return Err(Error::InvalidOptions(format!(
            "consumer id {consumer_id:?} contains a control character"
        )));
    }
    Ok(())
}

/// Read-your-writes: waits until projection `name` in directory `dir` has
/// applied the log up to `position` (an event's sequence, e.g. the
/// `last_sequence` an append returned), and returns its checkpoint. Reads the
/// checkpoint in the projection's own file every
/// `WAIT_POLL_INTERVAL` (2 ms), without taking
/// its lock, so it works beside the process that keeps the projection current
/// (a follower, another program). A file that does not exist yet counts as
/// checkpoint 0 (it may be being built); nothing is created.
///
/// A reader that wants the answer and its query to agree reads
/// `SELECT sequence FROM _checkpoint WHERE consumer_id = ?` in the same read
/// transaction as the query instead.
///
/// # Errors
/// [`Error::WaitTimedOut`] when `timeout` passes first; [`Error::InvalidName`]
/// for a name that is not a projection name; [`Error::Sqlite`] for a file that
/// is not a readable projection.
pub fn wait_for_checkpoint(
    dir: &std::path::Path,
    name: &str,
    position: u64,
    timeout: std::time::Duration,
) -> Result<u64> {
    let name = crate::name::ProjectionName::new(name)?;
    let path = dir.join(format!("{}.db", name.as_str()));
    let started = std::time::Instant::now();
    let mut conn: Option<Connection> = None;
    loop {
        if conn.is_none() && path.exists() {
            // Not created when missing, never written.
            let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
            let opened = Connection::open_with_flags(&path, flags)
                .map_err(Error::sqlite(format!("open {}", path.display())))?;
            opened
                .busy_timeout(std::time::Duration::from_millis(u64::from(
                    crate::limits::BUSY_TIMEOUT_MS,
                )))
                .map_err(Error::sqlite("set busy timeout"))?;
            conn = Some(opened);
        }
        let checkpoint = match &conn {
            Some(conn) => match SqliteCheckpoint::load_in(conn, name.as_str()) {
                Ok(checkpoint) => checkpoint,
                // A file still being created has no table yet.
                Err(Error::Sqlite { .. }) if started.elapsed() < timeout => 0,
                Err(e) => return Err(e),
            },
            None => 0,
        };
        if checkpoint >= position {
            return Ok(checkpoint);
        }
        if started.elapsed() >= timeout {
            return Err(Error::WaitTimedOut {
                name: name.as_str().to_owned(),
                position,
                checkpoint,
                waited: started.elapsed(),
            });
        }
        std::thread::sleep(crate::limits::WAIT_POLL_INTERVAL);
    }
}
