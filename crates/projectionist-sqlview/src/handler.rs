//! `SqlHandler`: applies events to a declared projection by binding event fields
//! to its prepared statements; and the stored definition used to detect changes.

use std::borrow::Cow;

use projectionist::rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use projectionist::rusqlite::{CachedStatement, Transaction};
use projectionist::{BoxError, EventFailure, GlobalEvent, Handler};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::payload::{Child, IndexedPayload, Leaf, RawObject, decode_leaf};

use crate::config::{SqlProjection, Statement};
use crate::confine::Confinement;
use crate::definition::{record_definition, stored_definition};
use crate::params::{Envelope, Param, ValueKind};

/// Prepared statements kept per projection connection beyond the projection's own
/// statements; rusqlite's default cache (16) would thrash on larger configs.
const STATEMENT_CACHE_SPARE: usize = 16;

/// Applies events to one declared projection. Its SQL runs confined to the
/// projection's own tables (see `confine.rs`).
#[derive(Clone, Debug)]
pub struct SqlHandler<'a> {
    projection: Cow<'a, SqlProjection>,
    confinement: Confinement,
}

impl<'a> SqlHandler<'a> {
    /// A handler for `projection`.
    #[must_use]
    pub fn new(projection: &'a SqlProjection) -> Self {
        SqlHandler {
            projection: Cow::Borrowed(projection),
            confinement: Confinement::default(),
        }
    }
}

impl SqlHandler<'static> {
    /// A handler that owns its projection: for a handler moved into a thread
    /// of its own (as the supervisor of `projectionist-runner` does).
    #[must_use]
    pub fn owned(projection: SqlProjection) -> Self {
        SqlHandler {
            projection: Cow::Owned(projection),
            confinement: Confinement::default(),
        }
    }
}

impl SqlHandler<'_> {
    /// Creates the schema and records the definition, unless the file already
    /// holds this very definition (a resume). A file built from another definition
    /// is refused: it needs a rebuild.
    /// The config's `deferred_indexes`, under the same confinement as the schema.
    fn build_deferred_indexes(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        if self.projection.deferred_indexes.trim().is_empty() {
            return Ok(());
        }
        let _enforced = self.confinement.enforce_indexes_only();
        tx.execute_batch(&self.projection.deferred_indexes)
            .map_err(|e| format!("deferred_indexes: {}", self.confinement.explain(&e)).into())
    }

    fn setup_file(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
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
                record_definition(tx, self.projection.version, &self.projection.hash)?;
                Ok(())
            }
        }
    }

    /// Applies `events`, reading each statement's fields through `fields`.
    fn apply_with<'e, E, F: Fields<'e, E>>(
        &mut self,
        tx: &Transaction<'_>,
        events: &'e [GlobalEvent<E>],
        fields: &mut F,
    ) -> Result<(), BoxError> {
        let _enforced = self.confinement.enforce();
        // Each statement is taken from the connection's cache once per batch,
        // not looked up by its text for every event.
        // A projection has a handful of statements: a short list searched by
        // address beats hashing one per execution.
        let mut prepared: Vec<(*const Statement, CachedStatement<'_>)> = Vec::new();
        // One buffer of bound values for the whole batch.
        let mut values: Vec<ToSqlOutput<'e>> = Vec::new();
        for event in events {
            let Some(statements) = self.projection.on.get(&event.event_type) else {
                continue;
            };
            // The event that failed, named for the operator and for `status`.
            let failure = |message: String| -> BoxError {
                Box::new(EventFailure {
                    sequence: event.sequence,
                    stream_id: event.stream_id.clone(),
                    event_type: event.event_type.clone(),
                    message,
                })
            };
            fields
                .event(event)
                .map_err(|message| failure(format!("data: {message}")))?;
            for (idx, statement) in statements.iter().enumerate() {
                let failure =
                    |message: String| failure(format!("statement {}: {message}", idx + 1));
                let sql_failure = |e: projectionist::rusqlite::Error| -> BoxError {
                    // A busy or full disk is no fault of the event: kept as
                    // SQLite's own error, so the engine tries it again later
                    // rather than dead-letter it.
                    if projectionist::is_transient(&e) {
                        return Box::new(e);
                    }
                    failure(format!(
                        "{} in {:?}",
                        self.confinement.explain(&e),
                        statement.text.trim()
                    ))
                };
                // Values borrow from the event: no copy of its strings.
                values.clear();
                for param in &statement.params {
                    let value = match param {
                        Param::Envelope(field) => bind_envelope(*field, event),
                        Param::Field {
                            path,
                            required,
                            kind,
                        } => fields.field(event, path, *required, *kind),
                    };
                    values.push(value.map_err(failure)?);
                }
                let key = std::ptr::from_ref(statement);
                let at = match prepared.iter().position(|(k, _)| *k == key) {
                    Some(at) => at,
                    None => {
                        let stmt = tx.prepare_cached(&statement.sql).map_err(sql_failure)?;
                        prepared.push((key, stmt));
                        prepared.len() - 1
                    }
                };
                let stmt = &mut prepared[at].1;
                stmt.execute(projectionist::rusqlite::params_from_iter(values.iter()))
                    .map_err(sql_failure)?;
            }
        }
        Ok(())
    }
}

/// One `Handler` impl per payload type: the same file setup, types and
/// deferred indexes; only how fields are read from a payload differs.
macro_rules! payload_handler {
    ($(#[$doc:meta])* $payload:ty, $fields:expr) => {
        $(#[$doc])*
        impl Handler<$payload> for SqlHandler<'_> {
            fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
                self.setup_file(tx)
            }

            fn event_types(&self) -> Option<Vec<String>> {
                Some(self.projection.event_types())
            }

            fn caught_up(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
                self.build_deferred_indexes(tx)
            }

            fn on_error(&self) -> projectionist::OnError {
                self.projection.on_error
            }

            fn apply(
                &mut self,
                tx: &Transaction<'_>,
                events: &[GlobalEvent<$payload>],
            ) -> Result<(), BoxError> {
                self.apply_with(tx, events, &mut $fields)
            }
        }
    };
}

payload_handler!(
    /// Payloads decoded into a `serde_json::Value` tree (the library's default
    /// payload type).
    Value,
    TreeFields
);

payload_handler!(
    /// Payloads kept as JSON text (validated when read): only the fields a
    /// statement binds are decoded, borrowed from the text where they can be;
    /// no tree is built per event. Each projection scans a payload's
    /// top-level members again: [`IndexedPayload`] scans them once.
    Box<RawValue>,
    RawFields::default()
);

payload_handler!(
    /// Payloads kept as JSON text with their top-level members indexed when
    /// read, once for every projection of a run: binds what [`RawValue`]
    /// payloads bind, without a scan per projection. This is what the
    /// command line reads.
    IndexedPayload,
    IndexedFields
);

/// Where a statement's `:field` parameters come from, for one payload type.
trait Fields<'e, E> {
    /// Called once for each event that has statements, before they are bound.
    ///
    /// # Errors
    /// What is wrong with the payload.
    fn event(&mut self, event: &'e GlobalEvent<E>) -> Result<(), String>;

    /// The value of the field at `path` in the event last given to `event`.
    ///
    /// # Errors
    /// A required field that is missing or null, or a value of the wrong kind.
    fn field(
        &self,
        event: &'e GlobalEvent<E>,
        path: &[String],
        required: bool,
        kind: Option<ValueKind>,
    ) -> Result<ToSqlOutput<'e>, String>;
}

/// Fields of a decoded `Value` tree.
struct TreeFields;

/// Fields of a payload kept as text: its top-level object is scanned once per
/// event into `object` (a buffer reused across the batch).
#[derive(Default)]
struct RawFields<'e> {
    object: RawObject<'e>,
}

/// An envelope field of any event.
#[allow(clippy::unnecessary_wraps)] // the same shape as a payload field's binding
fn bind_envelope<E>(field: Envelope, event: &GlobalEvent<E>) -> Result<ToSqlOutput<'_>, String> {
    let text = |s| ToSqlOutput::Borrowed(ValueRef::Text(s));
    let integer =
        |n: u64| ToSqlOutput::Owned(SqlValue::Integer(i64::try_from(n).unwrap_or(i64::MAX)));
    Ok(match field {
        Envelope::Sequence => integer(event.sequence),
        Envelope::StreamId => text(event.stream_id.as_bytes()),
        Envelope::StreamVersion => integer(event.stream_version),
        Envelope::EventType => text(event.event_type.as_bytes()),
        Envelope::RecordedAt => text(event.recorded_at.as_bytes()),
        Envelope::Metadata => event
            .metadata
            .as_deref()
            .map_or(ToSqlOutput::Owned(SqlValue::Null), |m| text(m.as_bytes())),
    })
}

impl<'e> Fields<'e, Value> for TreeFields {
    fn event(&mut self, _event: &'e GlobalEvent<Value>) -> Result<(), String> {
        Ok(())
    }

    fn field(
        &self,
        event: &'e GlobalEvent<Value>,
        path: &[String],
        required: bool,
        kind: Option<ValueKind>,
    ) -> Result<ToSqlOutput<'e>, String> {
        let mut current = &event.data;
        for (depth, segment) in path.iter().enumerate() {
            let next = match current {
                Value::Object(map) => map.get(segment),
                Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
                _ => None,
            };
            match next {
                Some(value) => current = value,
                None if required => {
                    let indexable = match current {
                        Value::Object(_) => true,
                        Value::Array(_) => segment.parse::<usize>().is_ok(),
                        _ => false,
                    };
                    return Err(missing(path, depth, (!indexable).then_some(current)));
                }
                None => return Ok(ToSqlOutput::Owned(SqlValue::Null)),
            }
        }
        if current.is_null() {
            return null(path, required);
        }
        match kind {
            None => Ok(json_to_sql(current)),
            Some(kind) => typed(current, kind).ok_or_else(|| wrong_kind(path, kind, current)),
        }
    }
}

impl<'e> Fields<'e, Box<RawValue>> for RawFields<'e> {
    fn event(&mut self, event: &'e GlobalEvent<Box<RawValue>>) -> Result<(), String> {
        self.object.scan(event.data.get())
    }

    fn field(
        &self,
        event: &'e GlobalEvent<Box<RawValue>>,
        path: &[String],
        required: bool,
        kind: Option<ValueKind>,
    ) -> Result<ToSqlOutput<'e>, String> {
        let data = event.data.get();
        text_field(
            data,
            |segment| self.object.child(data, segment),
            path,
            required,
            kind,
        )
    }
}

/// Fields of a payload whose members were indexed when it was decoded.
struct IndexedFields;

impl<'e> Fields<'e, IndexedPayload> for IndexedFields {
    fn event(&mut self, _event: &'e GlobalEvent<IndexedPayload>) -> Result<(), String> {
        Ok(())
    }

    fn field(
        &self,
        event: &'e GlobalEvent<IndexedPayload>,
        path: &[String],
        required: bool,
        kind: Option<ValueKind>,
    ) -> Result<ToSqlOutput<'e>, String> {
        let data = &event.data;
        text_field(
            data.get(),
            |segment| data.child(segment),
            path,
            required,
            kind,
        )
    }
}

/// The field at `path` of `data`, a payload's validated JSON text; `top`
/// finds a top-level member (from a scan or an index of the payload).
fn text_field<'e>(
    data: &'e str,
    top: impl Fn(&str) -> Result<Child<'e>, String>,
    path: &[String],
    required: bool,
    kind: Option<ValueKind>,
) -> Result<ToSqlOutput<'e>, String> {
    let mut current: &'e str = data;
    for (depth, segment) in path.iter().enumerate() {
        let child = if depth == 0 {
            top(segment)?
        } else {
            Child::of(current, segment)?
        };
        match child {
            Child::Found(value) => current = value,
            Child::Missing { indexable } if required => {
                let holder = if indexable {
                    None
                } else {
                    Some(decode(current)?)
                };
                return Err(missing(path, depth, holder.as_ref()));
            }
            Child::Missing { .. } => return Ok(ToSqlOutput::Owned(SqlValue::Null)),
        }
    }
    if current == "null" {
        return null(path, required);
    }
    // A string is bound as text borrowed from the payload (copied only
    // when it holds escapes); anything else is decoded on its own.
    match (kind, decode_leaf(current)?) {
        (None | Some(ValueKind::Text), Leaf::Text(text)) => Ok(match text {
            Cow::Borrowed(text) => ToSqlOutput::Borrowed(ValueRef::Text(text.as_bytes())),
            Cow::Owned(text) => ToSqlOutput::Owned(SqlValue::Text(text)),
        }),
        (None, Leaf::Other(value)) => Ok(owned(json_to_sql(&value))),
        (Some(kind), Leaf::Text(text)) => {
            Err(wrong_kind(path, kind, &Value::String(text.into_owned())))
        }
        (Some(kind), Leaf::Other(value)) => typed(&value, kind)
            .map(owned)
            .ok_or_else(|| wrong_kind(path, kind, &value)),
    }
}

/// A JSON value of a payload kept as text, decoded (for a message or a leaf).
fn decode(raw: &str) -> Result<Value, String> {
    serde_json::from_str(raw).map_err(|e| format!("invalid JSON: {e}"))
}

/// A bound value that borrows nothing.
fn owned(value: ToSqlOutput<'_>) -> ToSqlOutput<'static> {
    match value {
        ToSqlOutput::Borrowed(value) => ToSqlOutput::Owned(match value {
            ValueRef::Null => SqlValue::Null,
            ValueRef::Integer(i) => SqlValue::Integer(i),
            ValueRef::Real(x) => SqlValue::Real(x),
            ValueRef::Text(text) => SqlValue::Text(String::from_utf8_lossy(text).into_owned()),
            ValueRef::Blob(blob) => SqlValue::Blob(blob.to_vec()),
        }),
        ToSqlOutput::Owned(value) => ToSqlOutput::Owned(value),
        // `ToSqlOutput` is non-exhaustive; nothing here makes other kinds.
        _ => ToSqlOutput::Owned(SqlValue::Null),
    }
}

/// A required field is missing at `path[depth]`; `holder` is what holds the
/// place instead when it is not an object (or an array indexed by number).
fn missing(path: &[String], depth: usize, holder: Option<&Value>) -> String {
    let field = path.join(".");
    let Some(value) = holder else {
        return format!("required field {field} is missing");
    };
    let holder = if depth == 0 {
        "the data".to_owned()
    } else {
        format!("field {}", path[..depth].join("."))
    };
    format!(
        "required field {field} is missing: {holder} holds {} {}, not an object",
        json_kind(value),
        short(value)
    )
}

/// A null field: NULL, or an error when it is required.
fn null(path: &[String], required: bool) -> Result<ToSqlOutput<'static>, String> {
    if required {
        return Err(format!("required field {} is null", path.join(".")));
    }
    Ok(ToSqlOutput::Owned(SqlValue::Null))
}

fn wrong_kind(path: &[String], kind: ValueKind, value: &Value) -> String {
    format!(
        "field {} must be {} ({}), but is {} {}",
        path.join("."),
        kind_article(kind),
        kind.name(),
        json_kind(value),
        short(value)
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn event<E>(data: E) -> GlobalEvent<E> {
        GlobalEvent {
            sequence: 7,
            stream_id: "s-1".to_owned(),
            stream_version: 1,
            event_type: "Happened".to_owned(),
            data,
            metadata: None,
            recorded_at: "2026-01-01T00:00:00Z".to_owned(),
        }
    }

    fn plain(bound: Result<ToSqlOutput<'_>, String>) -> Result<SqlValue, String> {
        bound.map(|value| match owned(value) {
            ToSqlOutput::Owned(value) => value,
            _ => unreachable!("owned() returns owned values"),
        })
    }

    /// Payloads kept as text, scanned per projection or indexed once, bind
    /// exactly what decoded trees bind, and fail with the same messages, for
    /// every path, kind and requirement.
    #[test]
    fn text_payloads_bind_what_trees_bind() {
        let payloads = [
            r#"{"a": 1, "b": "x", "c": null, "d": {"e": [10, "y", {"f": true}]}, "g": 1.5,
                "h": -0, "i": 18446744073709551615, "j": "esc\"aped\\n\u00e9", "k": [1, 2],
                "l": {"m": 1}, "dup": 1, "dup": "second", "big": 1e300, "neg": -42,
                "t": true, "esc\u0061ped key": 3, "": "empty key"}"#,
            "[1, \"two\", {\"a\": 3}]",
            "\"just a string\"",
            "42",
            "-0",
            "null",
            "{}",
            "[]",
        ];
        let paths = [
            "a",
            "b",
            "c",
            "d",
            "d.e",
            "d.e.0",
            "d.e.1",
            "d.e.2.f",
            "d.e.5",
            "d.x",
            "d.e.x",
            "g",
            "h",
            "i",
            "j",
            "k",
            "k.1",
            "l",
            "l.m",
            "dup",
            "big",
            "neg",
            "t",
            "escaped key",
            "",
            "missing",
            "a.b",
            "b.0",
            "0",
            "1",
            "2.a",
            "7",
            "x.y",
        ];
        let kinds = [
            None,
            Some(ValueKind::Int),
            Some(ValueKind::Real),
            Some(ValueKind::Text),
            Some(ValueKind::Bool),
            Some(ValueKind::Json),
        ];
        let mut compared = 0;
        for payload in payloads {
            let tree = event(serde_json::from_str::<Value>(payload).unwrap());
            let text = event(serde_json::from_str::<Box<RawValue>>(payload).unwrap());
            let indexed = event(serde_json::from_str::<IndexedPayload>(payload).unwrap());
            assert_eq!(indexed.data.get(), text.data.get());
            let mut raw = RawFields::default();
            raw.event(&text).unwrap();
            for path in paths {
                let path: Vec<String> = path.split('.').map(str::to_owned).collect();
                for kind in kinds {
                    for required in [false, true] {
                        let from_tree = plain(TreeFields.field(&tree, &path, required, kind));
                        let from_text = plain(raw.field(&text, &path, required, kind));
                        let from_index =
                            plain(IndexedFields.field(&indexed, &path, required, kind));
                        assert_eq!(
                            from_tree, from_text,
                            "payload {payload}, path {path:?}, kind {kind:?}, required {required}"
                        );
                        assert_eq!(
                            from_tree, from_index,
                            "indexed payload {payload}, path {path:?}, kind {kind:?}, required {required}"
                        );
                        compared += 1;
                    }
                }
            }
        }
        assert_eq!(compared, payloads.len() * paths.len() * kinds.len() * 2);
    }

    /// An indexed object's members are found without scanning its text
    /// again: keys with escapes are matched unescaped, a repeated key finds
    /// its last value, and text that is not an object has no index.
    #[test]
    fn indexed_payloads_find_members_as_a_tree_does() {
        let payload: IndexedPayload = serde_json::from_str(
            r#" { "a" : 1, "k\u0065y": "v", "dup": 1, "nested": {"x": [1, 2]}, "dup": "last" } "#,
        )
        .unwrap();
        assert_eq!(payload.member("a"), Some("1"));
        assert_eq!(payload.member("key"), Some(r#""v""#));
        assert_eq!(payload.member("dup"), Some(r#""last""#));
        assert_eq!(payload.member("nested"), Some(r#"{"x": [1, 2]}"#));
        assert_eq!(payload.member("k\\u0065y"), None);
        assert_eq!(payload.member("x"), None);
        let array: IndexedPayload = serde_json::from_str("[10, 20]").unwrap();
        assert_eq!(array.member("1"), Some("20"));
        assert!(serde_json::from_str::<IndexedPayload>(r#"{"a": }"#).is_err());
        assert_eq!(
            serde_json::to_string(&payload).unwrap(),
            r#"{ "a" : 1, "k\u0065y": "v", "dup": 1, "nested": {"x": [1, 2]}, "dup": "last" }"#
        );
    }

    /// Strings without escapes are bound borrowed from the payload's text.
    #[test]
    fn plain_strings_are_borrowed_from_the_payload() {
        let text =
            event(serde_json::from_str::<Box<RawValue>>(r#"{"b": "x y", "e": "a\"b"}"#).unwrap());
        let mut raw = RawFields::default();
        raw.event(&text).unwrap();
        let plain_string = raw.field(&text, &["b".to_owned()], true, None).unwrap();
        assert!(matches!(
            plain_string,
            ToSqlOutput::Borrowed(ValueRef::Text(b"x y"))
        ));
        let escaped = raw.field(&text, &["e".to_owned()], true, None).unwrap();
        assert!(matches!(escaped, ToSqlOutput::Owned(SqlValue::Text(ref s)) if s == "a\"b"));
    }
}
