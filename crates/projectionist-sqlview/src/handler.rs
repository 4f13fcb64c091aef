//! `SqlHandler`: applies events to a declared projection by binding event fields
//! to its prepared statements; and the stored definition used to detect changes.

use projectionist::rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use projectionist::rusqlite::{Connection, OptionalExtension, Transaction};
use projectionist::{BoxError, EventFailure, GlobalEvent, Handler};
use serde_json::Value;

use crate::config::SqlProjection;
use crate::confine::Confinement;
use crate::params::{Envelope, Param};

/// The table in each projection file recording which definition built it.
pub const DEFINITION_TABLE: &str = "_projectionist_definition";

/// Prepared statements kept per projection connection beyond the projection's own
/// statements; rusqlite's default cache (16) would thrash on larger configs.
const STATEMENT_CACHE_SPARE: usize = 16;

/// The definition a projection file was built with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDefinition {
    /// Declared version.
    pub version: u32,
    /// Definition hash.
    pub hash: String,
}

/// The definition stored in a projection file, `None` when it has none (new file,
/// or built by a Rust handler).
///
/// # Errors
/// SQLite errors reading the table.
pub fn stored_definition(
    conn: &Connection,
) -> Result<Option<StoredDefinition>, projectionist::rusqlite::Error> {
    let exists: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE name = ?1",
        [DEFINITION_TABLE],
        |row| row.get(0),
    )?;
    if !exists {
        return Ok(None);
    }
    conn.query_row(
        &format!("SELECT version, hash FROM {DEFINITION_TABLE} LIMIT 1"),
        [],
        |row| {
            Ok(StoredDefinition {
                version: row.get(0)?,
                hash: row.get(1)?,
            })
        },
    )
    .optional()
}

/// Applies events to one declared projection. Its SQL runs confined to the
/// projection's own tables (see `confine.rs`).
#[derive(Clone, Debug)]
pub struct SqlHandler<'a> {
    projection: &'a SqlProjection,
    confinement: Confinement,
}

impl<'a> SqlHandler<'a> {
    /// A handler for `projection`.
    #[must_use]
    pub fn new(projection: &'a SqlProjection) -> Self {
        SqlHandler {
            projection,
            confinement: Confinement::default(),
        }
    }
}

impl Handler<Value> for SqlHandler<'_> {
    /// Creates the schema and records the definition, unless the file already
    /// holds this very definition (a resume). A file built from another definition
    /// is refused: it needs a rebuild.
    fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        let n_statements: usize = self.projection.on.values().map(Vec::len).sum();
        tx.set_prepared_statement_cache_capacity(n_statements + STATEMENT_CACHE_SPARE);
        self.confinement.install(tx)?;
        match stored_definition(tx)? {
            Some(stored) if stored.hash == self.projection.hash => Ok(()),
            Some(stored) => Err(format!(
                "projection {} was built from definition version {} ({}), the config has version {} ({}); rebuild it",
                self.projection.name,
                stored.version,
                &stored.hash[..12.min(stored.hash.len())],
                self.projection.version,
                &self.projection.hash[..12],
            )
            .into()),
            None => {
                {
                    let _enforced = self.confinement.enforce();
                    tx.execute_batch(&self.projection.schema).map_err(|e| {
                        format!(
                            "projection {}: schema: {}",
                            self.projection.name,
                            self.confinement.explain(&e)
                        )
                    })?;
                }
                tx.execute_batch(&format!(
                    "CREATE TABLE IF NOT EXISTS {DEFINITION_TABLE} (version INTEGER NOT NULL, hash TEXT NOT NULL)"
                ))?;
                tx.execute(
                    &format!("INSERT INTO {DEFINITION_TABLE} (version, hash) VALUES (?1, ?2)"),
                    (self.projection.version, &self.projection.hash),
                )?;
                Ok(())
            }
        }
    }

    fn event_types(&self) -> Option<Vec<String>> {
        Some(self.projection.event_types())
    }

    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        events: &[GlobalEvent<Value>],
    ) -> Result<(), BoxError> {
        let _enforced = self.confinement.enforce();
        for event in events {
            let Some(statements) = self.projection.on.get(&event.event_type) else {
                continue;
            };
            for (idx, statement) in statements.iter().enumerate() {
                // The event that failed, named for the operator and for `status`.
                let failure = |message: String| -> BoxError {
                    Box::new(EventFailure {
                        sequence: event.sequence,
                        stream_id: event.stream_id.clone(),
                        event_type: event.event_type.clone(),
                        message: format!("statement {}: {message}", idx + 1),
                    })
                };
                let sql_failure = |e: &projectionist::rusqlite::Error| {
                    failure(format!(
                        "{} in {:?}",
                        self.confinement.explain(e),
                        statement.text.trim()
                    ))
                };
                // Values borrow from the event: no copy of its strings.
                let mut values: Vec<ToSqlOutput<'_>> = Vec::with_capacity(statement.params.len());
                for param in &statement.params {
                    values.push(bind(param, event).map_err(failure)?);
                }
                let mut stmt = tx
                    .prepare_cached(&statement.sql)
                    .map_err(|e| sql_failure(&e))?;
                stmt.execute(projectionist::rusqlite::params_from_iter(values.iter()))
                    .map_err(|e| sql_failure(&e))?;
            }
        }
        Ok(())
    }
}

fn bind<'e>(param: &Param, event: &'e GlobalEvent<Value>) -> Result<ToSqlOutput<'e>, String> {
    let text = |s: &'e str| ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes()));
    let integer =
        |n: u64| ToSqlOutput::Owned(SqlValue::Integer(i64::try_from(n).unwrap_or(i64::MAX)));
    match param {
        Param::Envelope(field) => Ok(match field {
            Envelope::Sequence => integer(event.sequence),
            Envelope::StreamId => text(&event.stream_id),
            Envelope::StreamVersion => integer(event.stream_version),
            Envelope::EventType => text(&event.event_type),
            Envelope::RecordedAt => text(&event.recorded_at),
            Envelope::Metadata => event
                .metadata
                .as_deref()
                .map_or(ToSqlOutput::Owned(SqlValue::Null), text),
        }),
        Param::Field { path, required } => {
            let mut current = &event.data;
            for segment in path {
                let next = match current {
                    Value::Object(map) => map.get(segment),
                    Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
                    _ => None,
                };
                match next {
                    Some(value) => current = value,
                    None if *required => {
                        return Err(format!("required field {} is missing", path.join(".")));
                    }
                    None => return Ok(ToSqlOutput::Owned(SqlValue::Null)),
                }
            }
            if current.is_null() && *required {
                return Err(format!("required field {} is null", path.join(".")));
            }
            Ok(json_to_sql(current))
        }
    }
}

fn json_to_sql(value: &Value) -> ToSqlOutput<'_> {
    match value {
        Value::Null => ToSqlOutput::Owned(SqlValue::Null),
        Value::Bool(b) => ToSqlOutput::Owned(SqlValue::Integer(i64::from(*b))),
        Value::Number(n) => ToSqlOutput::Owned(
            n.as_i64()
                .map(SqlValue::Integer)
                .unwrap_or_else(|| SqlValue::Real(n.as_f64().unwrap_or(f64::NAN))),
        ),
        Value::String(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        Value::Array(_) | Value::Object(_) => ToSqlOutput::Owned(SqlValue::Text(value.to_string())),
    }
}
