//! The event store named by `--store`: an SQLite file (the default) or a
//! PostgreSQL URL (`postgres://...`).

use anyhow::{Context, anyhow};
use projectionist::{
    Appended, EventTableMapping, GlobalReader, RowCondition, SqliteEventStore, StreamAppend,
};
use projectionist_postgres::PostgresEventStore;
use serde_json::Value;

/// How the command line reads payloads: as JSON text, validated and its
/// top-level members indexed once when read (for every projection of the
/// run); a declarative projection decodes only the fields its statements bind.
pub type Payload = projectionist_sqlview::IndexedPayload;

/// An open event store.
// One per process (two while reconnecting): its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Store {
    /// The embedded default.
    Sqlite(SqliteEventStore),
    /// PostgreSQL.
    Postgres(PostgresEventStore),
}

impl Store {
    /// Whether `spec` names a PostgreSQL server rather than a file.
    pub fn is_postgres(spec: &str) -> bool {
        spec.starts_with("postgres://") || spec.starts_with("postgresql://")
    }

    /// A `--store` that looks like a URL of another scheme (`postgress://`,
    /// `postgre://`, `http://`) is refused, naming what is read, rather than
    /// taken for a file path.
    pub fn refuse_other_urls(spec: &str) -> anyhow::Result<()> {
        match spec.split_once("://") {
            Some((scheme, _)) if !Self::is_postgres(spec) => Err(anyhow!(
                "--store {spec:?} looks like a URL, but its scheme {scheme:?} is not one this \
                 reads: PostgreSQL is postgres:// or postgresql://, and an SQLite store is a \
                 file path"
            )),
            _ => Ok(()),
        }
    }

    /// Opens an existing store, through `mapping` when the config has a
    /// `[source]`; a missing SQLite file is an error, not a new empty log.
    /// `settle`: `[source]`'s `settle_ms` (PostgreSQL only); `conditions`:
    /// which of the table's rows are events.
    pub fn open_existing(
        spec: &str,
        mapping: Option<&EventTableMapping>,
        settle: std::time::Duration,
        conditions: &[RowCondition],
    ) -> anyhow::Result<Store> {
        Self::refuse_other_urls(spec)?;
        if Self::is_postgres(spec) {
            let store = match mapping {
                Some(mapping) => {
                    PostgresEventStore::connect_mapped_where(spec, mapping, conditions)?
                        .with_hole_settle(settle)
                }
                None => PostgresEventStore::connect(spec)?,
            };
            // Fails clearly when the events table is missing.
            GlobalReader::<Value>::head(&store)
                .context("read the events table (run `projectionist demo` or create it first)")?;
            return Ok(Store::Postgres(store));
        }
        let path = std::path::Path::new(spec);
        if path.is_dir() {
            return Err(anyhow!(
                "event store {spec} is a directory, not an SQLite file"
            ));
        }
        if !path.exists() {
            return Err(anyhow!("event store {spec} does not exist"));
        }
        // Read-only: a store opened for reading is never created or altered.
        Ok(Store::Sqlite(match mapping {
            Some(mapping) => SqliteEventStore::open_mapped_where(spec, mapping, conditions)?,
            None => SqliteEventStore::open_read_only(spec)?,
        }))
    }

    /// Events committed into holes that reads had already passed (PostgreSQL
    /// only; see `PostgresEventStore::late_events`).
    pub fn late_events(&self) -> anyhow::Result<Vec<projectionist_postgres::LateEvent>> {
        match self {
            Store::Sqlite(_) => Ok(Vec::new()),
            Store::Postgres(s) => Ok(s.late_events()?),
        }
    }

    /// While a lost PostgreSQL connection is being made again: since when and
    /// the last error.
    pub fn outage(&self) -> Option<projectionist_postgres::Outage> {
        match self {
            Store::Sqlite(_) => None,
            Store::Postgres(s) => s.outage(),
        }
    }

    /// The missing sequence number a projection at checkpoint `after` waits
    /// at (PostgreSQL only; see `PostgresEventStore::hole_after`).
    pub fn hole_after(&self, after: u64) -> anyhow::Result<Option<u64>> {
        match self {
            Store::Sqlite(_) => Ok(None),
            Store::Postgres(s) => Ok(s.hole_after(after)?),
        }
    }

    /// The statement that would index the sequence column, when reads scan
    /// the whole table for want of one (see `SqliteEventStore::sequence_unindexed`).
    pub fn sequence_unindexed(&self) -> anyhow::Result<Option<String>> {
        match self {
            Store::Sqlite(s) => Ok(s.sequence_unindexed()?),
            Store::Postgres(s) => Ok(s.sequence_unindexed()?),
        }
    }

    /// How many times a lost PostgreSQL connection was made again.
    pub fn reconnects(&self) -> u64 {
        match self {
            Store::Sqlite(_) => 0,
            Store::Postgres(s) => s.reconnects(),
        }
    }

    /// Sets how long passed holes are looked at again for late events
    /// (PostgreSQL only).
    #[must_use]
    pub fn with_late_event_window(self, window: std::time::Duration) -> Self {
        match self {
            Store::Postgres(s) => Store::Postgres(s.with_late_event_window(window)),
            other => other,
        }
    }

    /// The reader the engine uses.
    pub fn reader(&self) -> &dyn GlobalReader<Payload> {
        match self {
            Store::Sqlite(s) => s,
            Store::Postgres(s) => s,
        }
    }

    /// A reader that decodes each payload into a tree, for looking at events
    /// (`inspect`).
    pub fn value_reader(&self) -> &dyn GlobalReader<Value> {
        match self {
            Store::Sqlite(s) => s,
            Store::Postgres(s) => s,
        }
    }

    /// Appends to several streams atomically.
    pub fn append_batch(
        &self,
        appends: &[StreamAppend<'_>],
    ) -> projectionist::Result<Vec<Appended>> {
        match self {
            Store::Sqlite(s) => s.append_batch(appends),
            Store::Postgres(s) => s.append_batch(appends),
        }
    }
}
