//! `SqlHandler`: applies events to a declared projection by binding event fields
//! to its prepared statements; and the stored definition used to detect changes.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use projectionist::rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use projectionist::rusqlite::{CachedStatement, Transaction};
use projectionist::{BoxError, EventFailure, GlobalEvent, Handler};
use serde_json::Value;

use crate::config::{SqlProjection, Statement};
use crate::confine::Confinement;
use crate::definition::{DEFINITION_TABLE, stored_definition};
use crate::params::{Envelope, Param, ValueKind};

/// Prepared statements kept per projection connection beyond the projection's own
/// statements; rusqlite's default cache (16) would thrash on larger configs.
const STATEMENT_CACHE_SPARE: usize = 16;

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
        // Each statement is taken from the connection's cache once per batch,
        // not looked up by its text for every event.
        let mut prepared: HashMap<*const Statement, CachedStatement<'_>> = HashMap::new();
        // One buffer of bound values for the whole batch.
        let mut values: Vec<ToSqlOutput<'_>> = Vec::new();
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
                values.clear();
                for param in &statement.params {
                    values.push(bind(param, event).map_err(failure)?);
                }
                let stmt = match prepared.entry(std::ptr::from_ref(statement)) {
                    Entry::Occupied(entry) => entry.into_mut(),
                    Entry::Vacant(entry) => entry.insert(
                        tx.prepare_cached(&statement.sql)
                            .map_err(|e| sql_failure(&e))?,
                    ),
                };
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
        Param::Field {
            path,
            required,
            kind,
        } => {
            // Only for messages: built when something is wrong, not per event.
            let field = || path.join(".");
            let mut current = &event.data;
            for (depth, segment) in path.iter().enumerate() {
                let next = match current {
                    Value::Object(map) => map.get(segment),
                    Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
                    _ => None,
                };
                match next {
                    Some(value) => current = value,
                    None if *required => {
                        let indexable = match current {
                            Value::Object(_) => true,
                            Value::Array(_) => segment.parse::<usize>().is_ok(),
                            _ => false,
                        };
                        if indexable {
                            return Err(format!("required field {} is missing", field()));
                        }
                        let holder = if depth == 0 {
                            "the data".to_owned()
                        } else {
                            format!("field {}", path[..depth].join("."))
                        };
                        return Err(format!(
                            "required field {} is missing: {holder} holds {} {}, not an object",
                            field(),
                            json_kind(current),
                            short(current)
                        ));
                    }
                    None => return Ok(ToSqlOutput::Owned(SqlValue::Null)),
                }
            }
            if current.is_null() {
                if *required {
                    return Err(format!("required field {} is null", field()));
                }
                return Ok(ToSqlOutput::Owned(SqlValue::Null));
            }
            match kind {
                None => Ok(json_to_sql(current)),
                Some(kind) => typed(current, *kind).ok_or_else(|| {
                    format!(
                        "field {} must be {} ({}), but is {} {}",
                        field(),
                        kind_article(*kind),
                        kind.name(),
                        json_kind(current),
                        short(current)
                    )
                }),
            }
        }
    }
}

/// `value` bound as `kind` demands, or `None` when it is of another JSON type.
fn typed(value: &Value, kind: ValueKind) -> Option<ToSqlOutput<'_>> {
    let owned = |v: SqlValue| Some(ToSqlOutput::Owned(v));
    match (kind, value) {
        (ValueKind::Int, Value::Number(n)) => n.as_i64().and_then(|i| owned(SqlValue::Integer(i))),
        (ValueKind::Real, Value::Number(n)) => n.as_f64().and_then(|x| owned(SqlValue::Real(x))),
        (ValueKind::Text, Value::String(s)) => {
            Some(ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())))
        }
        (ValueKind::Bool, Value::Bool(b)) => owned(SqlValue::Integer(i64::from(*b))),
        (ValueKind::Json, Value::Object(_) | Value::Array(_)) => {
            owned(SqlValue::Text(value.to_string()))
        }
        _ => None,
    }
}

fn kind_article(kind: ValueKind) -> &'static str {
    match kind {
        ValueKind::Int => "a JSON integer",
        ValueKind::Real => "a JSON number",
        ValueKind::Text => "a JSON string",
        ValueKind::Bool => "a JSON boolean",
        ValueKind::Json => "a JSON object or array",
    }
}

/// The JSON type of a value, in words.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a real number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value for a message: its JSON text, cut at [`VALUE_IN_MESSAGE_MAX`] characters.
fn short(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() <= VALUE_IN_MESSAGE_MAX {
        return text;
    }
    let cut: String = text.chars().take(VALUE_IN_MESSAGE_MAX).collect();
    format!("{cut}...")
}

/// Longest value quoted in a poison-event message: enough to recognise it,
/// short enough for one line (and for no secret-sized payload in a log).
const VALUE_IN_MESSAGE_MAX: usize = 40;

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
