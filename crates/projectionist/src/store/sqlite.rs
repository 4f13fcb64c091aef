//! `SqliteEventStore`: the embedded event log in one SQLite file, or a read-only
//! view of an existing events table through an `EventTableMapping`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, TransactionBehavior, params};
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::event::{Appended, GlobalEvent, NewEvent, decode};
use crate::limits::{
    APPEND_EVENTS_MAX, BATCH_SIZE_MAX, BUSY_TIMEOUT_MS, IDENTIFIER_LEN_MAX, STORE_READER_CACHE_KIB,
};
use crate::reader::{GlobalReader, TypedBatch};

/// Our own events table. `sequence` is the rowid, so SQLite assigns it as one past
/// the largest, and events are never deleted: sequences strictly increase from 1.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    sequence       INTEGER PRIMARY KEY,
    stream_id      TEXT    NOT NULL,
    stream_version INTEGER NOT NULL,
    event_type     TEXT    NOT NULL,
    data           TEXT    NOT NULL,
    metadata       TEXT,
    recorded_at    TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (stream_id, stream_version)
);
CREATE INDEX IF NOT EXISTS events_type ON events (event_type, sequence);
";

/// Table and column names of an events table, for reading a log that another
/// program writes.
///
/// Every name must be a plain SQL identifier (`[A-Za-z_][A-Za-z0-9_]*`); names are
/// also quoted, so they are never spliced into SQL as free text, and a missing
/// column is an error at open. The sequence
/// column must hold strictly increasing positive integers in commit order.
///
/// Built with [`EventTableMapping::new`] (or `default()`) and its setters:
///
/// ```
/// use projectionist::EventTableMapping;
///
/// let mapping = EventTableMapping::new("stored_events")
///     .sequence("id")
///     .data("payload")
///     .metadata(None);
/// assert_eq!(mapping.stream_id, "stream_id");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventTableMapping {
    /// Table name. Default `events`.
    pub table: String,
    /// Global sequence column (integer). Default `sequence`.
    pub sequence: String,
    /// Stream id column (text). Default `stream_id`.
    pub stream_id: String,
    /// Stream version column (integer). Default `stream_version`.
    pub stream_version: String,
    /// Event type column (text). Default `event_type`.
    pub event_type: String,
    /// Payload column (JSON text or blob). Default `data`.
    pub data: String,
    /// Optional metadata column. Default `Some("metadata")`.
    pub metadata: Option<String>,
    /// Optional timestamp column (text or integer). Default `Some("recorded_at")`;
    /// when `None`, events carry an empty `recorded_at`.
    pub recorded_at: Option<String>,
}

impl Default for EventTableMapping {
    fn default() -> Self {
        EventTableMapping {
            table: "events".into(),
            sequence: "sequence".into(),
            stream_id: "stream_id".into(),
            stream_version: "stream_version".into(),
            event_type: "event_type".into(),
            data: "data".into(),
            metadata: Some("metadata".into()),
            recorded_at: Some("recorded_at".into()),
        }
    }
}

impl EventTableMapping {
    /// Table `table`, with the default column names (see the fields).
    #[must_use]
    pub fn new(table: impl Into<String>) -> Self {
        EventTableMapping {
            table: table.into(),
            ..Self::default()
        }
    }

    /// The global sequence column.
    #[must_use]
    pub fn sequence(mut self, column: impl Into<String>) -> Self {
        self.sequence = column.into();
        self
    }

    /// The stream id column.
    #[must_use]
    pub fn stream_id(mut self, column: impl Into<String>) -> Self {
        self.stream_id = column.into();
        self
    }

    /// The stream version column.
    #[must_use]
    pub fn stream_version(mut self, column: impl Into<String>) -> Self {
        self.stream_version = column.into();
        self
    }

    /// The event type column.
    #[must_use]
    pub fn event_type(mut self, column: impl Into<String>) -> Self {
        self.event_type = column.into();
        self
    }

    /// The payload column.
    #[must_use]
    pub fn data(mut self, column: impl Into<String>) -> Self {
        self.data = column.into();
        self
    }

    /// The metadata column, or `None` for a table without one.
    #[must_use]
    pub fn metadata(mut self, column: Option<&str>) -> Self {
        self.metadata = column.map(str::to_owned);
        self
    }

    /// The timestamp column, or `None` for a table without one.
    #[must_use]
    pub fn recorded_at(mut self, column: Option<&str>) -> Self {
        self.recorded_at = column.map(str::to_owned);
        self
    }
}

/// Checks a name from an [`EventTableMapping`]: a plain SQL identifier
/// (`[A-Za-z_][A-Za-z0-9_]*`, at most [`IDENTIFIER_LEN_MAX`] bytes), so it can
/// be quoted into SQL without ever being free text. Every store uses this one
/// rule.
///
/// # Errors
/// [`Error::InvalidOptions`] naming the name.
pub fn plain_identifier(name: &str) -> Result<&str> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if first_ok
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= IDENTIFIER_LEN_MAX
    {
        Ok(name)
    } else {
        Err(Error::InvalidOptions(format!(
            "event table mapping: {name:?} is not a plain SQL identifier (letters, digits, '_', at most {IDENTIFIER_LEN_MAX} bytes)"
        )))
    }
}

/// One stream's part of an atomic append.
#[derive(Clone, Copy, Debug)]
pub struct StreamAppend<'a> {
    /// The stream.
    pub stream_id: &'a str,
    /// The version the caller last saw: 0 for a new stream.
    pub expected_version: u64,
    /// The events, in order.
    pub events: &'a [NewEvent],
}

/// The embedded event log: one SQLite file, WAL mode, `synchronous=FULL` (it is
/// the source of truth).
///
/// Reads and appends use separate connections, so a rebuild reading the log does
/// not block appends.
#[derive(Debug)]
pub struct SqliteEventStore {
    path: PathBuf,
    reader: Mutex<Connection>,
    /// `None` for a mapped (foreign) table: we never write another program's log.
    writer: Option<Mutex<Connection>>,
    read_sql: String,
    /// Where the read's optional columns are: absent when the table has no
    /// such column (then nothing is selected for it: a constant NULL column
    /// still costs a step and a fetch per event).
    read_columns: OptionalColumns,
    head_sql: String,
    /// The distinct event types (bounded).
    types_sql: String,
    /// The table read and its sequence column (for messages).
    table: String,
    sequence_column: String,
}

impl SqliteEventStore {
    /// Opens an event store with this crate's schema, creating it when the
    /// file is missing: what earlier versions' code calls.
    ///
    /// A mistyped path then reads as an empty log. New code says what it
    /// means: [`SqliteEventStore::create`] to make a store (or open it when it
    /// exists), [`SqliteEventStore::open_existing`] to open one that must exist.
    ///
    /// # Errors
    /// As [`SqliteEventStore::create`].
    #[deprecated(
        since = "0.1.0",
        note = "creates a missing file: use `create` to make a store, `open_existing` to open one that must exist"
    )]
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::create(path)
    }

    /// Opens an existing event store with this crate's schema, for reading and
    /// appending; a missing file is an error, nothing is created.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file when it does not exist or is a directory;
    /// as [`SqliteEventStore::create`] otherwise.
    pub fn open_existing(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(Error::Io {
                step: "open the event store",
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file (SqliteEventStore::create makes a new store)",
                ),
            });
        }
        Self::create(path)
    }

    /// Creates an event store with this crate's schema (tables and index),
    /// or opens it when the file exists (adding what is missing).
    ///
    /// # Errors
    /// [`Error::Sqlite`] naming the file when it cannot be opened or initialised.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let writer = open_connection(&path, OpenFlags::default())?;
        writer.execute_batch(SCHEMA).map_err(Error::sqlite(format!(
            "create events table in {}",
            path.display()
        )))?;
        let reader = open_connection(&path, OpenFlags::default())?;
        let mapping = EventTableMapping::default();
        Self::finish(path, reader, Some(writer), &mapping, &[])
    }

    /// Opens an existing event store with this crate's schema for reading only.
    /// Nothing in the file is created or changed: no table, no index, no journal
    /// mode (the connection is read-only). Use [`SqliteEventStore::create`] to create
    /// a store or to append.
    ///
    /// # Errors
    /// [`Error::Io`] when the file is missing or is a directory;
    /// [`Error::NotAnEventStore`] when it has no events table (or a column is
    /// missing), naming the file.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_mapped(path, &EventTableMapping::default())
    }

    /// Opens an existing events table of another program, read-only, through a
    /// column mapping. The table and columns are checked now. Nothing in the file
    /// is created or changed (the connection is read-only).
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] for a name that is not a plain identifier;
    /// [`Error::Io`] when the file is missing or a directory;
    /// [`Error::NotAnEventStore`] when the table or a column does not exist.
    pub fn open_mapped(path: impl AsRef<Path>, mapping: &EventTableMapping) -> Result<Self> {
        Self::open_mapped_where(path, mapping, &[])
    }

    /// [`open_mapped`](Self::open_mapped) for a table that also holds rows
    /// that are not events (archived streams, other kinds of messages): only
    /// the rows meeting every condition are read.
    ///
    /// # Errors
    /// As [`open_mapped`](Self::open_mapped); [`Error::InvalidOptions`] for a
    /// condition on a name that is not a plain identifier.
    pub fn open_mapped_where(
        path: impl AsRef<Path>,
        mapping: &EventTableMapping,
        conditions: &[RowCondition],
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let kind = match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => Some(std::io::ErrorKind::IsADirectory),
            Ok(_) => None,
            Err(e) => Some(e.kind()),
        };
        if let Some(kind) = kind {
            return Err(Error::Io {
                step: "open event store",
                path,
                source: kind.into(),
            });
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let step = || format!("open event store {}", path.display());
        let reader = Connection::open_with_flags(&path, flags).map_err(Error::sqlite(step()))?;
        reader
            .busy_timeout(std::time::Duration::from_millis(u64::from(BUSY_TIMEOUT_MS)))
            .map_err(Error::sqlite(step()))?;
        Self::finish(path, reader, None, mapping, conditions)
    }

    fn finish(
        path: PathBuf,
        reader: Connection,
        writer: Option<Connection>,
        mapping: &EventTableMapping,
        conditions: &[RowCondition],
    ) -> Result<Self> {
        let MappingSql {
            read_sql,
            read_columns,
            head_sql,
            types_sql,
        } = mapping_sql(mapping, conditions)?;
        refuse_unreadable_sequences(&path, &reader, mapping)?;
        let cache_kib = i64::try_from(STORE_READER_CACHE_KIB).unwrap_or(i64::MAX);
        reader
            .pragma_update(None, "cache_size", -cache_kib)
            .map_err(Error::sqlite(format!(
                "open event store {}",
                path.display()
            )))?;
        for sql in [&read_sql, &head_sql] {
            reader
                .prepare(sql)
                .map_err(|e| not_an_event_store(&path, mapping, &e))?;
        }
        Ok(SqliteEventStore {
            path,
            reader: Mutex::new(reader),
            writer: writer.map(Mutex::new),
            read_sql,
            read_columns,
            head_sql,
            types_sql,
            table: mapping.table.clone(),
            sequence_column: mapping.sequence.clone(),
        })
    }

    /// When reading the log would scan the whole table for every batch (the
    /// sequence column of a mapped table has no index, nor is it the table's
    /// rowid): the statement that adds one. `None` when reads use an index.
    /// SQLite's query planner decides, so any index it would use counts.
    ///
    /// # Errors
    /// [`Error::Sqlite`] when the plan cannot be read.
    pub fn sequence_unindexed(&self) -> Result<Option<String>> {
        let conn = self
            .reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let step = || format!("plan the read of {}", self.path.display());
        let mut plan = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {}", self.read_sql))
            .map_err(Error::sqlite(step()))?;
        let details: Vec<String> = plan
            .query_map((0, 1), |row| row.get(3))
            .and_then(|rows| rows.collect())
            .map_err(Error::sqlite(step()))?;
        let scans = details.iter().any(|d| {
            d.contains("TEMP B-TREE FOR ORDER BY")
                || (d.starts_with("SCAN") && !d.contains("USING"))
        });
        if !scans {
            return Ok(None);
        }
        Ok(Some(format!(
            "CREATE INDEX IF NOT EXISTS [{table}_by_{sequence}] ON [{table}] ([{sequence}])",
            table = self.table,
            sequence = self.sequence_column
        )))
    }

    /// The store's file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `events` to one stream, if the stream is still at `expected_version`
    /// (0 for a new stream). All or nothing.
    ///
    /// # Errors
    /// [`Error::Conflict`] when the stream moved on (nothing is written);
    /// [`Error::InvalidOptions`] for a mapped store or too many events;
    /// [`Error::Sqlite`] on a storage failure.
    pub fn append(
        &self,
        stream_id: &str,
        expected_version: u64,
        events: &[NewEvent],
    ) -> Result<Appended> {
        let appended = self.append_batch(&[StreamAppend {
            stream_id,
            expected_version,
            events,
        }])?;
        Ok(appended[0])
    }

    /// Appends to several streams in one transaction: if any stream conflicts,
    /// nothing at all is written. One commit for many streams is what makes bulk
    /// loads fast with `synchronous=FULL`.
    ///
    /// # Errors
    /// As [`SqliteEventStore::append`].
    pub fn append_batch(&self, appends: &[StreamAppend<'_>]) -> Result<Vec<Appended>> {
        let Some(writer) = &self.writer else {
            return Err(Error::InvalidOptions(format!(
                "event store {} is a mapped, read-only table",
                self.path.display()
            )));
        };
        let n_events: usize = appends.iter().map(|a| a.events.len()).sum();
        if n_events > APPEND_EVENTS_MAX {
            return Err(Error::InvalidOptions(format!(
                "append of {n_events} events exceeds the limit of {APPEND_EVENTS_MAX} per call"
            )));
        }
        let mut conn = writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let step = || format!("append to event store {}", self.path.display());
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(Error::sqlite(step()))?;
        let mut results = Vec::with_capacity(appends.len());
        for append in appends {
            results.push(append_stream(&tx, append).map_err(|e| match e {
                Error::Sqlite { source, .. } => Error::sqlite(step())(source),
                other => other,
            })?);
        }
        tx.commit().map_err(Error::sqlite(step()))?;
        Ok(results)
    }

    fn read_rows<E>(
        &self,
        after: u64,
        limit: u32,
        event_types: Option<&[String]>,
        mut decode_row: impl FnMut(u64, &str, &str, &str) -> Result<E>,
    ) -> Result<Vec<GlobalEvent<E>>> {
        if limit > BATCH_SIZE_MAX {
            return Err(Error::InvalidOptions(format!(
                "read limit {limit} exceeds {BATCH_SIZE_MAX}"
            )));
        }
        let conn = self
            .reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let step = || format!("read events after {after} from {}", self.path.display());
        // Formats the step only when there is an error: this loop runs per event.
        let sql_err = |source| Error::Sqlite {
            step: step(),
            source,
        };
        // Wanted types are filtered here, as rows are stepped, not in the
        // query: the read walks the sequence order either way (an event-type
        // index would read every later event of each type and sort them for
        // every batch), and comparing a few strings in Rust costs less than
        // SQLite's `IN` probe per row (measured: 15% of the reading thread).
        // Without a LIMIT (-1) the walk stops at the `limit`th match.
        let row_limit = match event_types {
            None => i64::from(limit),
            Some(_) => -1,
        };
        let mut stmt = conn.prepare_cached(&self.read_sql).map_err(sql_err)?;
        let mut rows = stmt
            .query(params![to_i64(after)?, row_limit])
            .map_err(sql_err)?;
        let mut events = Vec::with_capacity(limit as usize);
        let mut previous = after;
        while events.len() < limit as usize
            && let Some(row) = rows.next().map_err(sql_err)?
        {
            let sequence = column_u64(row.get_ref(0).map_err(sql_err)?, "sequence")?;
            if sequence <= previous {
                return Err(Error::CorruptStore(format!(
                    "sequence {sequence} follows {previous}; sequences must strictly increase"
                )));
            }
            previous = sequence;
            if let Some(types) = event_types {
                let event_type = row.get_ref(3).map_err(sql_err)?;
                // Every event has a type: a NULL one is not passed over silently.
                if matches!(event_type, ValueRef::Null) {
                    return Err(Error::CorruptStore(format!(
                        "event {sequence}: its event type column is NULL"
                    )));
                }
                if !type_is_one_of(event_type, types) {
                    continue;
                }
            }
            let stream_id = column_text(row.get_ref(1).map_err(sql_err)?, "stream_id")?;
            let stream_version = column_u64(row.get_ref(2).map_err(sql_err)?, "stream_version")?;
            let event_type = column_text(row.get_ref(3).map_err(sql_err)?, "event_type")?;
            // Data that is not text is this event's problem (a poison event for the
            // projections that handle its type), not the store's.
            let data = column_str(row.get_ref(4).map_err(sql_err)?, "data").map_err(|e| {
                Error::InvalidEvent {
                    sequence,
                    stream_id: stream_id.clone(),
                    event_type: event_type.clone(),
                    reason: match e {
                        Error::CorruptStore(reason) => reason,
                        other => other.to_string(),
                    },
                }
            })?;
            let metadata = match self.read_columns.metadata {
                None => None,
                Some(at) => match row.get_ref(at).map_err(sql_err)? {
                    ValueRef::Null => None,
                    value => Some(column_text(value, "metadata")?),
                },
            };
            let recorded_at = match self.read_columns.recorded_at {
                None => String::new(),
                Some(at) => match row.get_ref(at).map_err(sql_err)? {
                    ValueRef::Null => String::new(),
                    value => column_text(value, "recorded_at")?,
                },
            };
            let data = decode_row(sequence, &stream_id, &event_type, data)?;
            events.push(GlobalEvent {
                sequence,
                stream_id,
                stream_version,
                event_type,
                data,
                metadata,
                recorded_at,
            });
        }
        Ok(events)
    }
}

impl<E: DeserializeOwned> GlobalReader<E> for SqliteEventStore {
    fn read_after(&self, after: u64, limit: u32) -> Result<Vec<GlobalEvent<E>>> {
        self.read_rows(
            after,
            limit,
            None,
            |sequence, stream_id, event_type, data| decode(sequence, stream_id, event_type, data),
        )
    }

    fn read_after_types(
        &self,
        after: u64,
        limit: u32,
        event_types: &[String],
    ) -> Result<TypedBatch<E>> {
        // The head is read before the events: the later read saw at least that
        // much of the log, so a short read has scanned through it.
        let head = GlobalReader::<E>::head(self)?;
        let events = self.read_rows(
            after,
            limit,
            Some(event_types),
            |sequence, stream_id, event_type, data| decode(sequence, stream_id, event_type, data),
        )?;
        let last = events.last().map_or(after, |e| e.sequence);
        let scanned_through = if events.len() < limit as usize {
            last.max(head)
        } else {
            last
        };
        Ok(TypedBatch {
            events,
            scanned_through,
        })
    }

    fn head(&self) -> Result<u64> {
        let conn = self
            .reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let head: rusqlite::types::Value = conn
            .query_row(&self.head_sql, [], |row| row.get(0))
            .map_err(Error::sqlite(format!(
                "read head of {}",
                self.path.display()
            )))?;
        match head {
            rusqlite::types::Value::Integer(n) if n >= 0 => Ok(n.cast_unsigned()),
            other => Err(Error::NotAnEventStore {
                store: self.path.display().to_string(),
                reason: format!(
                    "the sequence column holds {other:?} at its maximum, not a non-negative integer; \
                     it must hold strictly increasing integers in commit order"
                ),
            }),
        }
    }

    fn event_types(&self) -> Result<Option<Vec<String>>> {
        let conn = self
            .reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let step = || format!("list the event types of {}", self.path.display());
        let mut statement = conn
            .prepare_cached(&self.types_sql)
            .map_err(Error::sqlite(step()))?;
        let types = statement
            .query_map([], |row| row.get::<_, rusqlite::types::Value>(0))
            .and_then(|rows| rows.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(Error::sqlite(step()))?;
        if types.len() > crate::limits::EVENT_TYPES_LISTED_MAX {
            return Ok(None);
        }
        Ok(Some(
            types
                .into_iter()
                .filter_map(|value| match value {
                    rusqlite::types::Value::Text(text) => Some(text),
                    _ => None,
                })
                .collect(),
        ))
    }

    /// `PRAGMA data_version` of the reading connection: it changes whenever
    /// another connection (any process, any program) commits to the file.
    fn change_token(&self) -> Result<Option<u64>> {
        let conn = self
            .reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let version: i64 = conn
            .prepare_cached("PRAGMA data_version")
            .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
            .map_err(Error::sqlite(format!(
                "check {} for new events",
                self.path.display()
            )))?;
        Ok(Some(version.cast_unsigned()))
    }

    fn poll_interval(&self) -> std::time::Duration {
        crate::limits::SQLITE_CHANGE_POLL_INTERVAL
    }
}

fn append_stream(tx: &rusqlite::Transaction<'_>, append: &StreamAppend<'_>) -> Result<Appended> {
    let actual: i64 = tx
        .prepare_cached("SELECT COALESCE(MAX(stream_version), 0) FROM events WHERE stream_id = ?1")
        .and_then(|mut stmt| stmt.query_row([append.stream_id], |row| row.get(0)))
        .map_err(Error::sqlite("read stream version"))?;
    let actual = u64::try_from(actual)
        .map_err(|_| Error::CorruptStore(format!("negative stream version {actual}")))?;
    if actual != append.expected_version {
        return Err(Error::Conflict {
            stream_id: append.stream_id.to_owned(),
            expected: append.expected_version,
            actual,
        });
    }
    let mut stmt = tx
        .prepare_cached(
            "INSERT INTO events (stream_id, stream_version, event_type, data, metadata)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(Error::sqlite("insert event"))?;
    let mut appended = Appended {
        first_sequence: 0,
        last_sequence: 0,
        stream_version: actual,
    };
    for event in append.events {
        appended.stream_version += 1;
        stmt.execute(params![
            append.stream_id,
            to_i64(appended.stream_version)?,
            event.event_type,
            event.data,
            event.metadata
        ])
        .map_err(Error::sqlite("insert event"))?;
        let sequence = tx.last_insert_rowid().cast_unsigned();
        if appended.first_sequence == 0 {
            appended.first_sequence = sequence;
        }
        appended.last_sequence = sequence;
    }
    Ok(appended)
}

/// Why a file cannot be read as an events table, in the user's words.
fn not_an_event_store(path: &Path, mapping: &EventTableMapping, error: &rusqlite::Error) -> Error {
    let store = path.display().to_string();
    if let Some(code @ (rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)) =
        error.sqlite_error_code()
    {
        let what = if code == rusqlite::ErrorCode::NotADatabase {
            "not an SQLite database"
        } else {
            "the file is corrupt"
        };
        return Error::NotAnEventStore {
            store,
            reason: what.into(),
        };
    }
    let message = error.to_string();
    let reason = if message.contains("no such table") {
        format!(
            "no events table {:?} (create the store with `projectionist demo` or by appending through the library, or map your own table)",
            mapping.table
        )
    } else if let Some(rest) = message.strip_prefix("no such column: ") {
        // SQLite appends the statement ("... in SELECT ... at offset N").
        let column = rest.split_whitespace().next().unwrap_or(rest);
        format!("events table {:?} has no column {column:?}", mapping.table)
    } else {
        format!("cannot read events table {:?}: {message}", mapping.table)
    };
    Error::NotAnEventStore { store, reason }
}

/// Opens a connection to the event store: WAL, busy timeout, `synchronous=FULL`.
fn open_connection(path: &Path, flags: OpenFlags) -> Result<Connection> {
    let step = || format!("open event store {}", path.display());
    let conn = Connection::open_with_flags(path, flags).map_err(Error::sqlite(step()))?;
    conn.busy_timeout(std::time::Duration::from_millis(u64::from(BUSY_TIMEOUT_MS)))
        .map_err(Error::sqlite(step()))?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(Error::sqlite(step()))?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(Error::sqlite(step()))?;
    Ok(conn)
}

/// Rows whose sequence is NULL, 0 or negative would never be read (reads
/// ask for sequences above a checkpoint of 0 or more): a named error, not a
/// silent skip. One indexed look when the column is indexed.
fn refuse_unreadable_sequences(
    path: &Path,
    reader: &Connection,
    mapping: &EventTableMapping,
) -> Result<()> {
    let ident = |name: &str| -> Result<String> { Ok(format!("[{}]", plain_identifier(name)?)) };
    let (table, sequence) = (ident(&mapping.table)?, ident(&mapping.sequence)?);
    let sql = format!(
        "SELECT count(*) FROM (SELECT 1 FROM {table} WHERE {sequence} IS NULL OR {sequence} <= 0 LIMIT 1)"
    );
    let bad: i64 = match reader.query_row(&sql, [], |r| r.get(0)) {
        Ok(bad) => bad,
        // A missing table or column is reported by the read query's check.
        Err(_) => return Ok(()),
    };
    if bad > 0 {
        return Err(Error::NotAnEventStore {
            store: path.display().to_string(),
            reason: format!(
                "table {:?} has rows whose sequence column {:?} is NULL, 0 or negative; every \
                 event needs a sequence of 1 or more (those rows would never be read)",
                mapping.table, mapping.sequence
            ),
        });
    }
    Ok(())
}

/// Where the read query's optional columns are, when the table has them.
#[derive(Clone, Copy, Debug, Default)]
struct OptionalColumns {
    metadata: Option<usize>,
    recorded_at: Option<usize>,
}

/// A mapping's queries.
struct MappingSql {
    /// Reads a batch: sequence, stream id, stream version, event type and
    /// data at 0 to 4, then the optional columns the table has.
    read_sql: String,
    read_columns: OptionalColumns,
    head_sql: String,
    types_sql: String,
}

/// The read and head queries for a mapping.
fn mapping_sql(mapping: &EventTableMapping, conditions: &[RowCondition]) -> Result<MappingSql> {
    // Brackets, not double quotes: SQLite reads a double-quoted name that
    // matches no column as a string literal, which would hide a typo.
    let ident = |name: &str| -> Result<String> { Ok(format!("[{}]", plain_identifier(name)?)) };
    let table = ident(&mapping.table)?;
    let sequence = ident(&mapping.sequence)?;
    let event_type = ident(&mapping.event_type)?;
    let mut select = format!(
        "SELECT {sequence}, {}, {}, {event_type}, {}",
        ident(&mapping.stream_id)?,
        ident(&mapping.stream_version)?,
        ident(&mapping.data)?,
    );
    let mut read_columns = OptionalColumns::default();
    let mut next = 5;
    for (column, at) in [
        (&mapping.metadata, &mut read_columns.metadata),
        (&mapping.recorded_at, &mut read_columns.recorded_at),
    ] {
        if let Some(column) = column {
            select.push_str(", ");
            select.push_str(&ident(column)?);
            *at = Some(next);
            next += 1;
        }
    }
    select.push_str(" FROM ");
    select.push_str(&table);
    let mut only = String::new();
    for condition in conditions {
        only.push_str(" AND ");
        only.push_str(&condition.sql(false)?);
    }
    let read_sql = format!("{select} WHERE {sequence} > ?1{only} ORDER BY {sequence} LIMIT ?2");
    let head_sql = format!("SELECT COALESCE(MAX({sequence}), 0) FROM {table}");
    let types_sql = format!(
        "SELECT DISTINCT {event_type} FROM {table} WHERE {event_type} IS NOT NULL{only} LIMIT {}",
        crate::limits::EVENT_TYPES_LISTED_MAX + 1
    );
    Ok(MappingSql {
        read_sql,
        read_columns,
        head_sql,
        types_sql,
    })
}

/// A condition on a mapped table's rows: only rows whose `column` holds
/// `value` are events (for tables that also keep archived streams or messages
/// that are not events). Rows that do not meet it are passed over like events
/// of a type no projection handles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowCondition {
    /// The column (a plain identifier).
    pub column: String,
    /// The value it must hold.
    pub value: ConditionValue,
}

/// The value a [`RowCondition`] compares with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConditionValue {
    /// A text value.
    Text(String),
    /// An integer.
    Integer(i64),
    /// A boolean (SQLite stores it as 0 or 1).
    Bool(bool),
}

impl RowCondition {
    /// `column = value` as SQL for SQLite or PostgreSQL: the column checked as
    /// a plain identifier, the value a literal (text quoted, its quotes
    /// doubled; no NUL).
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] for a column that is not a plain identifier
    /// or text holding NUL.
    pub fn sql(&self, postgres: bool) -> Result<String> {
        let column = plain_identifier(&self.column)?;
        let column = if postgres {
            format!("\"{column}\"")
        } else {
            format!("[{column}]")
        };
        let value = match &self.value {
            ConditionValue::Text(text) if text.contains('\0') => {
                return Err(Error::InvalidOptions(format!(
                    "condition on {}: text holds NUL",
                    self.column
                )));
            }
            ConditionValue::Text(text) => format!("'{}'", text.replace('\'', "''")),
            ConditionValue::Integer(n) => n.to_string(),
            ConditionValue::Bool(b) if postgres => b.to_string(),
            ConditionValue::Bool(b) => i64::from(*b).to_string(),
        };
        Ok(format!("{column} = {value}"))
    }
}

fn to_i64(value: u64) -> Result<i64> {
    i64::try_from(value)
        .map_err(|_| Error::InvalidOptions(format!("{value} does not fit SQLite's INTEGER")))
}

fn column_u64(value: ValueRef<'_>, column: &str) -> Result<u64> {
    match value {
        ValueRef::Integer(n) if n >= 0 => Ok(n.cast_unsigned()),
        other => Err(Error::CorruptStore(format!(
            "column {column} holds {other:?}, expected a non-negative integer"
        ))),
    }
}

fn column_str<'a>(value: ValueRef<'a>, column: &str) -> Result<&'a str> {
    match value {
        ValueRef::Text(bytes) | ValueRef::Blob(bytes) => std::str::from_utf8(bytes)
            .map_err(|_| Error::CorruptStore(format!("column {column} is not UTF-8"))),
        ValueRef::Null => Err(Error::CorruptStore(format!("column {column} is NULL"))),
        other => Err(Error::CorruptStore(format!(
            "column {column} holds {other:?}, expected text"
        ))),
    }
}

/// Whether an event-type column value is one of `types` (a NULL is none).
fn type_is_one_of(value: ValueRef<'_>, types: &[String]) -> bool {
    match value {
        ValueRef::Text(bytes) | ValueRef::Blob(bytes) => {
            types.iter().any(|t| t.as_bytes() == bytes)
        }
        ValueRef::Integer(n) => types.iter().any(|t| *t == n.to_string()),
        ValueRef::Real(x) => types.iter().any(|t| *t == x.to_string()),
        ValueRef::Null => false,
    }
}

fn column_text(value: ValueRef<'_>, column: &str) -> Result<String> {
    match value {
        ValueRef::Text(bytes) | ValueRef::Blob(bytes) => String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::CorruptStore(format!("column {column} is not UTF-8"))),
        ValueRef::Integer(n) => Ok(n.to_string()),
        ValueRef::Real(x) => Ok(x.to_string()),
        ValueRef::Null => Err(Error::CorruptStore(format!("column {column} is NULL"))),
    }
}
