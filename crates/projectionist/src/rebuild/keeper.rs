//! Where a projection's checkpoint lives, seen from the write side: one type
//! with the moments a run needs it (at the start, inside a batch's transaction,
//! after a commit, at the end of the log, for an error), so each of the two
//! locations is written once, here.

use rusqlite::{Connection, Transaction, TransactionBehavior};

use super::types::{CheckpointLocation, Start};
use crate::checkpoint::SqliteCheckpoint;
use crate::db::ProjectionDb;
use crate::error::{Error, Result};

/// A projection's checkpoint during a run.
#[derive(Clone, Copy)]
pub(super) struct Keeper<'a> {
    location: CheckpointLocation<'a>,
    consumer_id: &'a str,
}

impl<'a> Keeper<'a> {
    pub(super) fn new(location: CheckpointLocation<'a>, consumer_id: &'a str) -> Self {
        Keeper {
            location,
            consumer_id,
        }
    }

    /// Refuses the projection's own file as an external checkpoint: that is
    /// `InFile`, with exactly-once batches.
    pub(super) fn check(&self, db: &ProjectionDb) -> Result<()> {
        match self.location {
            CheckpointLocation::External(checkpoint)
                if checkpoint.projection_file() == Some(db.path()) =>
            {
                Err(Error::InvalidOptions(format!(
                    "projection {}: its own file's checkpoint is CheckpointLocation::InFile, not External",
                    db.name()
                )))
            }
            _ => Ok(()),
        }
    }

    /// Before the start transaction. An external checkpoint is reset before the
    /// tables are: a crash in between replays events onto old rows
    /// (at-least-once) instead of skipping them.
    pub(super) fn before_start(&self, start: Start) -> Result<()> {
        match (start, self.location) {
            (Start::Reset, CheckpointLocation::External(checkpoint)) => {
                checkpoint.reset(self.consumer_id)
            }
            _ => Ok(()),
        }
    }

    /// Inside the start transaction: the file's own checkpoint row is reset with
    /// the tables on a `Reset`; returns the file's checkpoint.
    pub(super) fn in_start(&self, tx: &Transaction<'_>, start: Start) -> Result<u64> {
        if start == Start::Reset {
            SqliteCheckpoint::reset_in(tx, self.consumer_id)?;
        }
        SqliteCheckpoint::load_in(tx, self.consumer_id)
    }

    /// Where the run starts, once the start transaction has committed.
    pub(super) fn start_point(&self, in_file: u64) -> Result<u64> {
        match self.location {
            CheckpointLocation::InFile => Ok(in_file),
            CheckpointLocation::External(checkpoint) => checkpoint.load(self.consumer_id),
        }
    }

    /// Inside a batch's savepoint, after the handler: the file's checkpoint moves
    /// with the rows. Returns whether it was saved here.
    pub(super) fn in_batch(&self, tx: &Transaction<'_>, last: u64) -> Result<bool> {
        match self.location {
            CheckpointLocation::InFile => {
                SqliteCheckpoint::save_in(tx, self.consumer_id, last)?;
                Ok(true)
            }
            CheckpointLocation::External(_) => Ok(false),
        }
    }

    /// When a parked projection's file is opened again: its own checkpoint
    /// must be where this run committed it, or something other than this run
    /// changed the file in between (the projection's lock keeps other
    /// projectionist processes away, not other programs).
    pub(super) fn check_in_file(
        &self,
        tx: &Transaction<'_>,
        name: &str,
        committed: u64,
    ) -> Result<()> {
        if let CheckpointLocation::InFile = self.location {
            let in_file = SqliteCheckpoint::load_in(tx, self.consumer_id)?;
            if in_file != committed {
                return Err(Error::External {
                    step: format!("projection {name}: open its file again"),
                    source: format!(
                        "its checkpoint is {in_file} where this run committed {committed}: \
                         another program changed the file meanwhile; rebuild it"
                    )
                    .into(),
                });
            }
        }
        Ok(())
    }

    /// After a commit: an external checkpoint is saved now (at-least-once).
    /// Returns whether it was saved here.
    pub(super) fn after_commit(&self, applied: u64, committed: u64) -> Result<bool> {
        match self.location {
            CheckpointLocation::InFile => Ok(false),
            CheckpointLocation::External(checkpoint) => {
                if applied > committed {
                    checkpoint.save(self.consumer_id, applied)?;
                }
                Ok(true)
            }
        }
    }

    /// At the end of the log: moves the checkpoint up to `head`.
    pub(super) fn advance(&self, conn: &Connection, name: &str, head: u64) -> Result<()> {
        match self.location {
            CheckpointLocation::InFile => {
                let label = format!("projection {name}: advance checkpoint to {head}");
                let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)
                    .map_err(Error::sqlite(label.clone()))?;
                SqliteCheckpoint::save_in(&tx, self.consumer_id, head)?;
                tx.commit().map_err(Error::sqlite(label))
            }
            CheckpointLocation::External(checkpoint) => checkpoint.save(self.consumer_id, head),
        }
    }

    /// The committed checkpoint, for an error that stops the projection.
    pub(super) fn committed(&self, db: &ProjectionDb) -> Result<u64> {
        match self.location {
            CheckpointLocation::InFile => {
                db.with_connection(|conn| SqliteCheckpoint::load_in(conn, self.consumer_id))
            }
            CheckpointLocation::External(checkpoint) => checkpoint.load(self.consumer_id),
        }
    }
}
