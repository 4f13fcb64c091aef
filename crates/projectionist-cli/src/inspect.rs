//! `inspect`: what a store holds, for writing a config: per event type the
//! count, the first and last sequence, and the JSON fields seen with an example
//! value; `--config-skeleton` turns that into a starter config. Reads the whole
//! log once in batches; memory is bounded by the named limits below, whatever the
//! log's size.

use std::collections::BTreeMap;

use projectionist::limits::BATCH_SIZE_MAX;
use projectionist::{Error, GlobalEvent, GlobalReader};
use serde_json::Value;

use crate::app::{EXIT_CONFIG, EXIT_STORE, Failure, fail, store_spec};
use crate::args::Cli;
use crate::store::Store;
use crate::ui::{self, out};

/// Event types tracked; a log with more is reported as such (a config handles a
/// few dozen types, not thousands; beyond that the names are data, not types).
const EVENT_TYPES_MAX: usize = 1_000;
/// Fields tracked per event type (top-level keys of the data object).
const FIELDS_PER_TYPE_MAX: usize = 64;
/// Characters of an example value shown.
const EXAMPLE_CHARS_MAX: usize = 40;

#[derive(Default)]
struct TypeSummary {
    count: u64,
    first: u64,
    last: u64,
    /// Field name -> (JSON type, example value).
    fields: BTreeMap<String, (&'static str, String)>,
    fields_dropped: bool,
}

/// Runs `inspect`.
pub(crate) fn run_inspect(cli: &Cli, config_skeleton: bool) -> Result<(), Failure> {
    let spec = store_spec(cli, false);
    // A config, when there is one, only tells where the events are ([source]).
    let (mapping, settle, conditions) = match &cli.config {
        Some(path) => {
            let config = projectionist_sqlview::ProjectionsConfig::load(path)
                .map_err(|e| fail(EXIT_CONFIG)(e.into()))?;
            let mapping = if Store::is_postgres(&spec) {
                config.source_postgres
            } else {
                config.source
            };
            (mapping, config.source_settle, config.source_conditions)
        }
        None => (None, std::time::Duration::ZERO, Vec::new()),
    };
    let store = Store::open_existing(&spec, mapping.as_ref(), settle, &conditions)
        .map_err(fail(EXIT_STORE))?;
    let (types, undecodable) =
        scan(store.value_reader()).map_err(|e| fail(EXIT_STORE)(e.into()))?;
    if config_skeleton {
        print_skeleton(&types);
    } else if cli.json {
        for (event_type, summary) in &types {
            let fields: serde_json::Map<String, Value> = summary
                .fields
                .iter()
                .map(|(name, (kind, example))| {
                    (
                        name.clone(),
                        serde_json::json!({"type": kind, "example": example}),
                    )
                })
                .collect();
            ui::json_line(&serde_json::json!({
                "event": "event_type", "event_type": event_type, "count": summary.count,
                "first_sequence": summary.first, "last_sequence": summary.last, "fields": fields,
            }));
        }
    } else {
        print_table(&types, &undecodable);
    }
    Ok(())
}

/// Reads the whole log once. An undecodable event is noted and passed.
fn scan(
    reader: &dyn GlobalReader<Value>,
) -> projectionist::Result<(BTreeMap<String, TypeSummary>, Vec<u64>)> {
    let mut types: BTreeMap<String, TypeSummary> = BTreeMap::new();
    let mut undecodable = Vec::new();
    let mut position = 0;
    loop {
        let batch = match reader.read_after(position, BATCH_SIZE_MAX) {
            Ok(batch) => batch,
            Err(Error::Decode { sequence, .. } | Error::InvalidEvent { sequence, .. }) => {
                // Count the events before it one by one, then pass it.
                while let Ok(one) = reader.read_after(position, 1) {
                    let Some(event) = one.into_iter().next() else {
                        break;
                    };
                    if event.sequence >= sequence {
                        break;
                    }
                    position = event.sequence;
                    record(&mut types, &event);
                }
                if undecodable.len() < EVENT_TYPES_MAX {
                    undecodable.push(sequence);
                }
                position = sequence;
                continue;
            }
            Err(e) => return Err(e),
        };
        let Some(last) = batch.last() else { break };
        position = last.sequence;
        for event in &batch {
            record(&mut types, event);
        }
    }
    Ok((types, undecodable))
}

fn record(types: &mut BTreeMap<String, TypeSummary>, event: &GlobalEvent<Value>) {
    if !types.contains_key(&event.event_type) && types.len() >= EVENT_TYPES_MAX {
        return;
    }
    let summary = types.entry(event.event_type.clone()).or_default();
    if summary.count == 0 {
        summary.first = event.sequence;
    }
    summary.count += 1;
    summary.last = event.sequence;
    let Value::Object(map) = &event.data else {
        return;
    };
    for (name, value) in map {
        if summary.fields.contains_key(name) {
            continue;
        }
        if summary.fields.len() >= FIELDS_PER_TYPE_MAX {
            summary.fields_dropped = true;
            break;
        }
        let example: String = value.to_string().chars().take(EXAMPLE_CHARS_MAX).collect();
        summary
            .fields
            .insert(name.clone(), (param_type(value), example));
    }
}

/// The typed-parameter name for a JSON value (`int`, `real`, `text`, ...).
fn param_type(value: &Value) -> &'static str {
    match value {
        Value::Number(n) if n.is_i64() || n.is_u64() => "int",
        Value::Number(_) => "real",
        Value::String(_) => "text",
        Value::Bool(_) => "bool",
        Value::Array(_) | Value::Object(_) => "json",
        Value::Null => "null",
    }
}

fn print_table(types: &BTreeMap<String, TypeSummary>, undecodable: &[u64]) {
    out!(
        "{:<32} {:>10} {:>12} {:>12}  fields",
        "event type",
        "count",
        "first",
        "last"
    );
    for (event_type, summary) in types {
        let fields: Vec<String> = summary
            .fields
            .iter()
            .map(|(name, (kind, example))| format!("{name}:{kind}={example}"))
            .collect();
        let more = if summary.fields_dropped { ", ..." } else { "" };
        out!(
            "{:<32} {:>10} {:>12} {:>12}  {}{more}",
            ui::escape_controls(event_type),
            summary.count,
            summary.first,
            summary.last,
            ui::escape_controls(&fields.join(", "))
        );
    }
    if types.len() >= EVENT_TYPES_MAX {
        out!("(only the first {EVENT_TYPES_MAX} event types are shown)");
    }
    if !undecodable.is_empty() {
        out!("undecodable events (not JSON): sequences {undecodable:?}");
    }
}

/// A starter config: one projection with a table per event type's fields left
/// to the user, and one commented statement per event type.
fn print_skeleton(types: &BTreeMap<String, TypeSummary>) {
    out!("# A starter config: write the schema, keep the event types you need,");
    out!("# and turn each commented statement into one that fits your table.");
    out!("[[projection]]");
    out!("name = \"my_projection\"");
    out!("version = 1");
    out!("schema = \"\"\"\nCREATE TABLE my_table (\n  id TEXT PRIMARY KEY\n);\n\"\"\"");
    for (event_type, summary) in types {
        let params: Vec<String> = summary
            .fields
            .iter()
            .map(|(name, (kind, _))| match *kind {
                "null" => format!(":{name}"),
                kind => format!(":{name}!{kind}"),
            })
            .collect();
        let key = serde_json::to_string(event_type).unwrap_or_else(|_| format!("{event_type:?}"));
        out!(
            "\n# {} events, sequences {} to {}",
            summary.count,
            summary.first,
            summary.last
        );
        out!("[projection.on.{key}]");
        out!(
            "sql = \"INSERT INTO my_table (id) VALUES (:_stream_id)\"  # fields: {}",
            ui::escape_controls(&params.join(", "))
        );
    }
    if types.is_empty() {
        out!("# the store holds no events yet");
    }
}
