//! Dead letters: the events a projection that skips poison events
//! ([`OnError::Skip`](crate::OnError::Skip)) could not apply, kept in its own
//! file (`_projectionist_dead_letters`), written in the transaction of the
//! batch they came in, with its checkpoint: a crash never loses nor doubles
//! one. A rebuild from scratch starts with none. [`retry_dead_letters`]
//! applies them again after a fix.

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::db::ProjectionDb;
use crate::error::{BoxError, Error, Result};
use crate::event::GlobalEvent;
use crate::handler::Handler;
use crate::limits::DEAD_LETTER_ERROR_BYTES_MAX;
use crate::reader::GlobalReader;

/// The table of a projection file's dead letters.
pub const DEAD_LETTERS_TABLE: &str = "_projectionist_dead_letters";

/// One event a projection could not apply and skipped.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    /// The event's global sequence: where to read it in the log (its payload
    /// stays there).
    pub sequence: u64,
    /// The event's stream.
    pub stream_id: String,
    /// The event's version in its stream, when it was read (a payload that
    /// did not decode is known by its sequence, stream and type only).
    pub stream_version: Option<u64>,
    /// The event's type.
    pub event_type: String,
    /// Why it could not be applied (the last try's error).
    pub error: String,
    /// When it last failed (UTC, RFC 3339).
    pub failed_at: String,
    /// How often it was tried: 1 when first skipped, one more per retry that
    /// failed again.
    pub attempts: u64,
    /// The projection's definition when it last failed (`version N (hash)`),
    /// when the file records one (config projections and versioned handlers).
    pub definition: Option<String>,
}

/// The event of a new dead letter and its error.
pub(crate) struct Failed<'a> {
    pub(crate) sequence: u64,
    pub(crate) stream_id: &'a str,
    pub(crate) stream_version: Option<u64>,
    pub(crate) event_type: &'a str,
    pub(crate) error: &'a str,
}

fn table_exists(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [DEAD_LETTERS_TABLE],
        |row| row.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

/// `error` cut to [`DEAD_LETTER_ERROR_BYTES_MAX`] at a character boundary.
fn bounded(error: &str) -> &str {
    if error.len() <= DEAD_LETTER_ERROR_BYTES_MAX {
        return error;
    }
    let mut end = DEAD_LETTER_ERROR_BYTES_MAX;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    &error[..end]
}

/// The definition the file records, as `version N (hash)`.
fn definition(conn: &Connection) -> rusqlite::Result<Option<String>> {
    let exists: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '_projectionist_definition'",
        [],
        |row| row.get(0),
    )?;
    if exists == 0 {
        return Ok(None);
    }
    conn.query_row(
        "SELECT version, hash FROM _projectionist_definition LIMIT 1",
        [],
        |row| {
            let (version, hash): (i64, String) = (row.get(0)?, row.get(1)?);
            Ok(format!(
                "version {version} ({})",
                &hash[..12.min(hash.len())]
            ))
        },
    )
    .optional()
}

/// Records `failed` in the transaction at hand (a second failure of the same
/// event counts one more attempt).
pub(crate) fn record(conn: &Connection, failed: &Failed<'_>) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {DEAD_LETTERS_TABLE} (
             sequence INTEGER PRIMARY KEY,
             stream_id TEXT NOT NULL,
             stream_version INTEGER,
             event_type TEXT NOT NULL,
             error TEXT NOT NULL,
             failed_at TEXT NOT NULL,
             attempts INTEGER NOT NULL,
             definition TEXT
         )"
    ))?;
    let definition = definition(conn)?;
    let sequence = i64::try_from(failed.sequence).unwrap_or(i64::MAX);
    let version = failed
        .stream_version
        .map(|v| i64::try_from(v).unwrap_or(i64::MAX));
    conn.execute(
        &format!(
            "INSERT INTO {DEAD_LETTERS_TABLE}
                 (sequence, stream_id, stream_version, event_type, error, failed_at, attempts, definition)
             VALUES (?1, ?2, ?3, ?4, ?5, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), 1, ?6)
             ON CONFLICT (sequence) DO UPDATE SET
                 error = excluded.error, failed_at = excluded.failed_at,
                 attempts = attempts + 1, definition = excluded.definition"
        ),
        rusqlite::params![
            sequence,
            failed.stream_id,
            version,
            failed.event_type,
            bounded(failed.error),
            definition
        ],
    )?;
    Ok(())
}

/// How many dead letters the file behind `conn` holds (0 when it has none).
///
/// # Errors
/// [`Error::Sqlite`] when the file cannot be read.
pub fn dead_letter_count(conn: &Connection) -> Result<u64> {
    let step = || "count dead letters".to_owned();
    if !table_exists(conn).map_err(Error::sqlite(step()))? {
        return Ok(0);
    }
    conn.query_row(
        &format!("SELECT count(*) FROM {DEAD_LETTERS_TABLE}"),
        [],
        |row| row.get::<_, i64>(0),
    )
    .map(|n| u64::try_from(n).unwrap_or(0))
    .map_err(Error::sqlite(step()))
}

/// The dead letters of the file behind `conn`, in sequence order.
///
/// # Errors
/// [`Error::Sqlite`] when the file cannot be read.
pub fn dead_letters(conn: &Connection) -> Result<Vec<DeadLetter>> {
    let step = || "read dead letters".to_owned();
    if !table_exists(conn).map_err(Error::sqlite(step()))? {
        return Ok(Vec::new());
    }
    let mut stmt = conn
        .prepare(&format!(
            "SELECT sequence, stream_id, stream_version, event_type, error, failed_at, attempts, definition
             FROM {DEAD_LETTERS_TABLE} ORDER BY sequence"
        ))
        .map_err(Error::sqlite(step()))?;
    let rows = stmt
        .query_map([], |row| {
            let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
            Ok(DeadLetter {
                sequence: unsigned(row.get(0)?),
                stream_id: row.get(1)?,
                stream_version: row.get::<_, Option<i64>>(2)?.map(unsigned),
                event_type: row.get(3)?,
                error: row.get(4)?,
                failed_at: row.get(5)?,
                attempts: unsigned(row.get(6)?),
                definition: row.get(7)?,
            })
        })
        .map_err(Error::sqlite(step()))?;
    rows.collect::<rusqlite::Result<_>>()
        .map_err(Error::sqlite(step()))
}

/// Which dead letters [`retry_dead_letters`] tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Every one, in sequence order.
    All,
    /// The one at this sequence.
    Sequence(u64),
}

/// What [`retry_dead_letters`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Retried {
    /// The sequences applied now (their dead letters removed).
    pub applied: Vec<u64>,
    /// The sequences that failed again, with the error (kept, one more
    /// attempt counted).
    pub failed: Vec<(u64, String)>,
}

/// Applies a projection's dead letters again (after a fix of its handler or
/// definition), each read back from the log by its sequence and applied in a
/// savepoint of one transaction, in sequence order: those that apply now are
/// removed; the others stay, with their new error and one more attempt. The
/// checkpoint does not move (the events are behind it).
///
/// An event applied now comes after events that followed it in the log: the
/// result equals a rebuild's when the projection's rows for it do not depend
/// on order (an insert of its own row, a sum), not when later events of its
/// stream already overwrote what it sets; rebuild then.
///
/// The handler's `setup` runs first, in the same transaction. The caller
/// holds the projection (through [`ProjectionDir::db`](crate::ProjectionDir::db)):
/// no run may write it meanwhile.
///
/// # Errors
/// [`Error::InvalidOptions`] for a sequence that is not a dead letter; a
/// read of the log that fails ([`Error::Replay`] is not used: nothing was
/// changed); an error of the environment (a busy or full disk) rolls every
/// change of the retry back.
pub fn retry_dead_letters<E>(
    reader: &dyn GlobalReader<E>,
    db: &ProjectionDb,
    handler: &mut dyn Handler<E>,
    which: Retry,
) -> Result<Retried> {
    let name = db.name().to_string();
    db.with_connection(|conn| {
        let label = || format!("projection {name}: retry dead letters");
        let letters = dead_letters(conn)?;
        let letters: Vec<DeadLetter> = match which {
            Retry::All => letters,
            Retry::Sequence(sequence) => {
                let found: Vec<DeadLetter> = letters
                    .into_iter()
                    .filter(|l| l.sequence == sequence)
                    .collect();
                if found.is_empty() {
                    return Err(Error::InvalidOptions(format!(
                        "projection {name} has no dead letter at sequence {sequence}"
                    )));
                }
                found
            }
        };
        let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)
            .map_err(Error::sqlite(label()))?;
        handler.setup(&tx).map_err(|source| Error::Setup {
            name: name.clone(),
            source,
        })?;
        let mut retried = Retried::default();
        for letter in letters {
            let event = reader.read_after(letter.sequence - 1, 1);
            let outcome: std::result::Result<(), BoxError> = match event {
                Ok(events) => match events.first() {
                    Some(event) if event.sequence == letter.sequence => {
                        apply_one(&tx, handler, event)
                    }
                    _ => Err(format!("event {} is no longer in the log", letter.sequence).into()),
                },
                Err(e) if e.event().is_some() => Err(Box::new(e)),
                Err(e) => return Err(e),
            };
            match outcome {
                Ok(()) => {
                    tx.execute(
                        &format!("DELETE FROM {DEAD_LETTERS_TABLE} WHERE sequence = ?1"),
                        [i64::try_from(letter.sequence).unwrap_or(i64::MAX)],
                    )
                    .map_err(Error::sqlite(label()))?;
                    retried.applied.push(letter.sequence);
                }
                Err(source) if crate::error::is_transient(&*source) => {
                    return Err(Error::External {
                        step: label(),
                        source,
                    });
                }
                Err(source) => {
                    let error = error_text(&*source);
                    record(
                        &tx,
                        &Failed {
                            sequence: letter.sequence,
                            stream_id: &letter.stream_id,
                            stream_version: letter.stream_version,
                            event_type: &letter.event_type,
                            error: &error,
                        },
                    )
                    .map_err(Error::sqlite(label()))?;
                    retried.failed.push((letter.sequence, error));
                }
            }
        }
        tx.commit().map_err(Error::sqlite(label()))?;
        Ok(retried)
    })
}

/// Applies one event in a savepoint of its own: rolled back alone when it fails.
fn apply_one<E>(
    tx: &Transaction<'_>,
    handler: &mut dyn Handler<E>,
    event: &GlobalEvent<E>,
) -> std::result::Result<(), BoxError> {
    tx.execute_batch("SAVEPOINT dead_letter")?;
    match crate::handler::call_handler(handler, tx, std::slice::from_ref(event)) {
        Ok(()) => {
            tx.execute_batch("RELEASE dead_letter")?;
            Ok(())
        }
        Err(e) => {
            tx.execute_batch("ROLLBACK TO dead_letter; RELEASE dead_letter")?;
            Err(e)
        }
    }
}

/// An error and its causes, as one line.
pub(crate) fn error_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = e.source();
    }
    text
}
