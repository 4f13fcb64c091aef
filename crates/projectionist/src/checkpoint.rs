//! Checkpoints: the trait `Checkpoint`, and `SqliteCheckpoint`, whose
//! `_checkpoint` table lives in the projection's own file.

use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::dir::{ProjectionDb, write_transaction};
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
