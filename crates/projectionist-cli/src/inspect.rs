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

/// Where `inspect` reads the events: `--preset`, else the config's
/// `[source]` (the config named by `--config`, or `projectionist.toml` here
/// when it exists; a config with no projection yet is fine), else our own
/// layout. Also the `[source]` section a skeleton repeats.
struct Source {
    mapping: Option<projectionist::EventTableMapping>,
    settle: std::time::Duration,
    conditions: Vec<projectionist::RowCondition>,
    section: Option<String>,
    /// The config's projections, when it declares any (their parameters are
    /// checked against the fields the events have).
    projections: Vec<projectionist_sqlview::SqlProjection>,
}

fn source(cli: &Cli, spec: &str, preset: Option<&str>) -> Result<Source, Failure> {
    let postgres = Store::is_postgres(spec);
    if let Some(preset) = preset {
        let (sqlite, pg, conditions) = projectionist_sqlview::preset_source(preset)
            .map_err(|e| fail(EXIT_CONFIG)(anyhow::anyhow!("--preset: {e}")))?;
        return Ok(Source {
            mapping: Some(if postgres { pg } else { sqlite }),
            settle: std::time::Duration::ZERO,
            conditions,
            section: Some(format!("[source]\npreset = {preset:?}\n")),
            projections: Vec::new(),
        });
    }
    let path = cli.config.clone().or_else(|| {
        let here = std::path::PathBuf::from("projectionist.toml");
        here.is_file().then_some(here)
    });
    let Some(path) = path else {
        return Ok(Source {
            mapping: None,
            settle: std::time::Duration::ZERO,
            conditions: Vec::new(),
            section: None,
            projections: Vec::new(),
        });
    };
    let config = projectionist_sqlview::ProjectionsConfig::load_source_only(&path)
        .map_err(|e| fail(EXIT_CONFIG)(e.into()))?;
    let section = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| projectionist_sqlview::source_section(&text));
    Ok(Source {
        mapping: if postgres {
            config.source_postgres
        } else {
            config.source
        },
        settle: config.source_settle,
        conditions: config.source_conditions,
        section,
        projections: config.projections,
    })
}

/// For a store that is not in our layout: the presets whose table the file
/// has, named in the error with how to use them. Read through an immutable
/// connection: nothing is created beside the file.
fn preset_hint(spec: &str) -> String {
    if Store::is_postgres(spec) {
        return format!(
            "; if another tool wrote it, try --preset ({})",
            projectionist_sqlview::PRESETS.join(", ")
        );
    }
    let uri = projectionist::immutable_uri(std::path::Path::new(spec));
    let flags = projectionist::rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
        | projectionist::rusqlite::OpenFlags::SQLITE_OPEN_URI;
    let tables: Vec<String> = projectionist::rusqlite::Connection::open_with_flags(uri, flags)
        .and_then(|conn| {
            let mut statement =
                conn.prepare("SELECT name FROM sqlite_schema WHERE type = 'table'")?;
            let names = statement
                .query_map([], |row| row.get(0))?
                .collect::<Result<Vec<String>, _>>()?;
            Ok(names)
        })
        .unwrap_or_default();
    let matching: Vec<&str> = projectionist_sqlview::PRESETS
        .into_iter()
        .filter(|preset| {
            projectionist_sqlview::preset_source(preset)
                .is_ok_and(|(sqlite, _, _)| tables.contains(&sqlite.table))
        })
        .collect();
    match matching.as_slice() {
        [] => format!(
            "; its tables: {}. Describe the events table in the config's [source] (see docs/own-store.md)",
            if tables.is_empty() {
                "none".to_owned()
            } else {
                tables.join(", ")
            }
        ),
        presets => format!(
            "; it looks like a store of {}: run `inspect --preset {}`, and put `[source]` \
             `preset = \"{}\"` in the config",
            presets.join(" or "),
            presets[0],
            presets[0]
        ),
    }
}

/// Runs `inspect`.
pub(crate) fn run_inspect(
    cli: &Cli,
    config_skeleton: bool,
    preset: Option<&str>,
) -> Result<(), Failure> {
    let spec = store_spec(cli, false);
    let source = source(cli, &spec, preset)?;
    let store = Store::open_existing(
        &spec,
        source.mapping.as_ref(),
        source.settle,
        &source.conditions,
    )
    .map_err(|e| {
        let hint = if source.mapping.is_none() && is_not_ours(&e) {
            preset_hint(&spec)
        } else {
            String::new()
        };
        fail(EXIT_STORE)(e.context(format!("inspect {spec}{hint}")))
    })?;
    let (types, undecodable) =
        scan(store.value_reader()).map_err(|e| fail(EXIT_STORE)(e.into()))?;
    warn_unknown_fields(cli, &source.projections, &types);
    if config_skeleton {
        print_skeleton(&types, source.section.as_deref());
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
fn print_skeleton(types: &BTreeMap<String, TypeSummary>, source: Option<&str>) {
    out!("# A starter config: write the schema, keep the event types you need,");
    out!("# and turn each commented statement into one that fits your table.");
    if let Some(source) = source {
        out!("{}", source.trim_end());
        out!("");
    }
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

/// Whether opening the store failed because the file is not in the layout
/// read (no events table, a missing column), not for a reason of its own.
fn is_not_ours(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<Error>(),
            Some(Error::NotAnEventStore { .. })
        )
    })
}

/// How alike a field the events have must be to a parameter's to be
/// suggested for it (Jaro-Winkler): a dropped, doubled or swapped letter.
const FIELD_SIMILARITY_MIN: f64 = 0.85;

/// Warns (stderr, or a `warning` JSON line) for each `:field` parameter of
/// the config's statements that names a top-level field no event of its type
/// has, with the closest field they do have: the statement would bind NULL
/// (or stop the projection, for a required one).
fn warn_unknown_fields(
    cli: &Cli,
    projections: &[projectionist_sqlview::SqlProjection],
    types: &BTreeMap<String, TypeSummary>,
) {
    for projection in projections {
        for (event_type, statements) in &projection.on {
            let Some(summary) = types.get(event_type) else {
                continue;
            };
            if summary.fields_dropped {
                continue;
            }
            let mut named: Vec<&str> = statements
                .iter()
                .flat_map(|s| &s.params)
                .filter_map(|p| match p {
                    projectionist_sqlview::Param::Field { path, .. } => {
                        path.first().map(String::as_str)
                    }
                    projectionist_sqlview::Param::Envelope(_) => None,
                })
                .collect();
            named.sort_unstable();
            named.dedup();
            for field in named {
                if summary.fields.contains_key(field) {
                    continue;
                }
                let suggestion = summary
                    .fields
                    .keys()
                    .map(|f| (strsim::jaro_winkler(field, f), f))
                    .filter(|(score, _)| *score >= FIELD_SIMILARITY_MIN)
                    .max_by(|a, b| a.0.total_cmp(&b.0))
                    .map(|(_, f)| f.clone());
                if cli.json {
                    ui::json_line(&serde_json::json!({
                        "event": "warning", "projection": projection.name.as_str(),
                        "event_type": event_type, "unseen_field": field,
                        "did_you_mean": suggestion,
                    }));
                } else if !cli.quiet {
                    let hint =
                        suggestion.map_or(String::new(), |f| format!(" (did you mean :{f}?)"));
                    eprintln!(
                        "warning: projection {}, event {}: parameter :{} names a field no such event has{hint}",
                        projection.name,
                        ui::escape_controls(event_type),
                        ui::escape_controls(field)
                    );
                }
            }
        }
    }
}
