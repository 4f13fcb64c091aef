//! The last run's outcome, kept in the projection file (table
//! `_projectionist_run`, one row per consumer), so that a later `status` in
//! another process can tell a failed, interrupted or running projection from a
//! current one. Written by the engine: `running` in the transaction that starts
//! a run, the outcome in a small transaction at its end. A crash leaves
//! `running` behind, with the process id that can no longer be found.

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{Error, Result};

/// The table, created in every projection file.
pub(crate) const RUN_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS _projectionist_run (
    consumer_id TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    pid         INTEGER,
    error       TEXT,
    sequence    INTEGER,
    stream_id   TEXT,
    event_type  TEXT,
    updated_at  TEXT NOT NULL
);
";

/// The table's name: the engine keeps it through a rebuild.
pub(crate) const RUN_TABLE: &str = "_projectionist_run";

/// How the last run of a projection ended, as recorded in its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastRun {
    /// `running` (from scratch), `resuming`, `following`, `done`, `cancelled`
    /// or `failed`.
    pub state: String,
    /// The process that ran it.
    pub pid: Option<u32>,
    /// The error, for a failed run.
    pub error: Option<String>,
    /// The event that failed it, when one did: sequence, stream and type.
    pub event: Option<(u64, String, String)>,
    /// When the state was recorded (UTC, ISO 8601).
    pub updated_at: String,
}

/// The last run recorded for `consumer_id`; `None` in a file that has none
/// (never run, or written by an earlier version).
///
/// # Errors
/// [`Error::Sqlite`] when the file cannot be read.
pub fn last_run(conn: &Connection, consumer_id: &str) -> Result<Option<LastRun>> {
    let step = || format!("read the last run of {consumer_id}");
    let exists: bool = conn
        .query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE name = ?1",
            [RUN_TABLE],
            |row| row.get(0),
        )
        .map_err(Error::sqlite(step()))?;
    if !exists {
        return Ok(None);
    }
    conn.query_row(
        "SELECT state, pid, error, sequence, stream_id, event_type, updated_at
         FROM _projectionist_run WHERE consumer_id = ?1",
        [consumer_id],
        |row| {
            let sequence: Option<i64> = row.get(3)?;
            let stream_id: Option<String> = row.get(4)?;
            let event_type: Option<String> = row.get(5)?;
            Ok(LastRun {
                state: row.get(0)?,
                pid: row
                    .get::<_, Option<i64>>(1)?
                    .and_then(|p| u32::try_from(p).ok()),
                error: row.get(2)?,
                event: match (sequence, stream_id, event_type) {
                    (Some(s), Some(id), Some(t)) => Some((s.cast_unsigned(), id, t)),
                    _ => None,
                },
                updated_at: row.get(6)?,
            })
        },
    )
    .optional()
    .map_err(Error::sqlite(step()))
}

/// Records that a run of `consumer_id` starts, inside the caller's transaction:
/// `running` for a rebuild from scratch (a crash leaves it half-built:
/// `interrupted`), `resuming` for a run from the checkpoint (a crash leaves it
/// complete up to its checkpoint, only behind).
pub(crate) fn record_running(
    conn: &Connection,
    consumer_id: &str,
    from_scratch: bool,
) -> rusqlite::Result<()> {
    let state = if from_scratch { "running" } else { "resuming" };
    record(conn, consumer_id, state, None)
}

/// Records that a follower caught up and follows the log, inside the caller's
/// transaction. A follower that dies leaves this behind: its projection is
/// complete up to its checkpoint, not half-built.
pub(crate) fn record_following(conn: &Connection, consumer_id: &str) -> rusqlite::Result<()> {
    record(conn, consumer_id, "following", None)
}

/// Records that projection `consumer_id` cannot run, with why (for example:
/// its shadow cannot be opened), where `status` in another process reads it:
/// its last run is `failed` with this error, until a run starts again. For
/// supervisors that fail a projection outside the engine.
///
/// # Errors
/// [`Error::Sqlite`] when the file cannot be written.
pub fn record_failure(conn: &Connection, consumer_id: &str, error: &str) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO _projectionist_run
             (consumer_id, state, pid, error, sequence, stream_id, event_type, updated_at)
         VALUES (?1, 'failed', ?2, ?3, NULL, NULL, NULL, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
         ON CONFLICT (consumer_id) DO UPDATE SET
             state = excluded.state, pid = excluded.pid, error = excluded.error,
             sequence = NULL, stream_id = NULL, event_type = NULL,
             updated_at = excluded.updated_at",
    )
    .and_then(|mut stmt| stmt.execute(params![consumer_id, std::process::id(), error]))
    .map_err(Error::sqlite(format!(
        "record the failure of {consumer_id}"
    )))?;
    Ok(())
}

/// Records how a run ended: `done`, `cancelled`, or `failed` with its error.
pub(crate) fn record_outcome(
    conn: &Connection,
    consumer_id: &str,
    outcome: &Result<()>,
) -> rusqlite::Result<()> {
    match outcome {
        Ok(()) => record(conn, consumer_id, "done", None),
        Err(Error::Cancelled { .. }) => record(conn, consumer_id, "cancelled", None),
        Err(e) => record(conn, consumer_id, "failed", Some(e)),
    }
}

fn record(
    conn: &Connection,
    consumer_id: &str,
    state: &str,
    error: Option<&Error>,
) -> rusqlite::Result<()> {
    let event = error.and_then(Error::event);
    conn.prepare_cached(
        "INSERT INTO _projectionist_run
             (consumer_id, state, pid, error, sequence, stream_id, event_type, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
         ON CONFLICT (consumer_id) DO UPDATE SET
             state = excluded.state, pid = excluded.pid, error = excluded.error,
             sequence = excluded.sequence, stream_id = excluded.stream_id,
             event_type = excluded.event_type, updated_at = excluded.updated_at",
    )?
    .execute(params![
        consumer_id,
        state,
        std::process::id(),
        error.map(ToString::to_string),
        event.map(|e| i64::try_from(e.0).unwrap_or(i64::MAX)),
        event.map(|e| e.1),
        event.map(|e| e.2),
    ])?;
    Ok(())
}
