//! What every command shares: exit codes, failures and their messages, the
//! options' defaults, and opening the config, the store and the directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use projectionist::{Error, ProjectionDir};
use projectionist_sqlview::{ProjectionsConfig, SqlProjection};

use crate::args::Cli;
use crate::store::Store;

/// The sample config the demo uses when no `--config` is given.
pub(crate) const DEMO_CONFIG: &str = projectionist_demo::CONFIG;

/// Exit code: usage or config error.
pub(crate) const EXIT_CONFIG: u8 = 2;

/// Exit code: the event store could not be opened or read.
pub(crate) const EXIT_STORE: u8 = 3;

/// Exit code: at least one projection failed.
pub(crate) const EXIT_PROJECTION: u8 = 4;

/// Exit code: `rebuild --verify` found a projection that differs from a fresh
/// rebuild (as `diff` and `cmp` exit 1 on a difference).
pub(crate) const EXIT_DIFFERENT: u8 = 1;

/// Exit code: `wait` gave up: the projection had not reached the position in
/// time.
pub(crate) const EXIT_TIMEOUT: u8 = 5;

/// Exit code: interrupted by Ctrl-C at a batch boundary.
pub(crate) const EXIT_CANCELLED: u8 = 130;

/// A failure, with the exit code it maps to.
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) error: anyhow::Error,
}

pub(crate) fn fail(code: u8) -> impl FnOnce(anyhow::Error) -> Failure {
    move |error| Failure { code, error }
}

/// The error and its causes, each once: library errors already quote their
/// source in their own message, so a cause already shown is skipped.
pub(crate) fn error_text(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

pub(crate) fn code_of_error(error: &anyhow::Error) -> u8 {
    match error.downcast_ref::<Error>() {
        Some(Error::InvalidName { .. } | Error::NoSuchProjection { .. }) => EXIT_CONFIG,
        _ => EXIT_PROJECTION,
    }
}

pub(crate) fn open_dir(cli: &Cli, demo: bool) -> Result<ProjectionDir, Failure> {
    let path = cli
        .dir
        .clone()
        .unwrap_or_else(|| default_path(demo, "projections"));
    ProjectionDir::open(&path).map_err(|e| fail(EXIT_PROJECTION)(e.into()))
}

/// Opens `--dir`, which must exist (for commands that only look or remove).
pub(crate) fn open_existing_dir(cli: &Cli) -> Result<ProjectionDir, Failure> {
    let path = cli
        .dir
        .clone()
        .unwrap_or_else(|| default_path(false, "projections"));
    ProjectionDir::open_existing(&path)
        .with_context(|| format!("projection directory {}", path.display()))
        .map_err(fail(EXIT_CONFIG))
}

pub(crate) fn default_path(demo: bool, name: &str) -> PathBuf {
    match (demo, name) {
        (true, "events") => PathBuf::from("demo/events.db"),
        (true, _) => PathBuf::from("demo/projections"),
        (false, "events") => PathBuf::from("events.db"),
        (false, _) => PathBuf::from("projections"),
    }
}

pub(crate) fn load_config(cli: &Cli, demo: bool) -> Result<ProjectionsConfig, Failure> {
    let loaded = match (&cli.config, demo) {
        (Some(path), _) => ProjectionsConfig::load(path),
        (None, true) => ProjectionsConfig::parse(DEMO_CONFIG, "examples/orders/projections.toml"),
        (None, false) => ProjectionsConfig::load(Path::new("projectionist.toml")),
    };
    loaded.map_err(|e| fail(EXIT_CONFIG)(e.into()))
}

/// Opens the existing event store named by `--store`.
pub(crate) fn open_store(
    cli: &Cli,
    demo: bool,
    config: &ProjectionsConfig,
) -> Result<Store, Failure> {
    let spec = store_spec(cli, demo);
    // A preset's table can be laid out differently in PostgreSQL.
    let mapping = if Store::is_postgres(&spec) {
        config.source_postgres.as_ref()
    } else {
        config.source.as_ref()
    };
    let store = Store::open_existing(
        &spec,
        mapping,
        config.source_settle,
        &config.source_conditions,
    )
    .map_err(fail(EXIT_STORE))?;
    if mapping.is_some() {
        warn_unindexed(cli, &store);
    }
    Ok(store)
}

/// Warns when reading another program's table scans it whole for every batch
/// (its sequence column has no index: a 100,000-event rebuild took 18.7 s
/// instead of 0.24 s), with the statement that adds the index. A look that
/// fails is not a reason to stop.
fn warn_unindexed(cli: &Cli, store: &Store) {
    let Ok(Some(statement)) = store.sequence_unindexed() else {
        return;
    };
    if cli.json {
        crate::ui::json_line(&serde_json::json!({
            "event": "warning", "unindexed_sequence": true, "add_index": statement,
        }));
    } else if !cli.quiet {
        eprintln!(
            "warning: the events table has no index on its sequence column, so every read \
             scans the whole table (a rebuild gets slower with every batch). Add one (the \
             program that writes the table is not affected):\n  {statement};"
        );
    }
}

/// `--store`, or the default file.
pub(crate) fn store_spec(cli: &Cli, demo: bool) -> String {
    cli.store
        .clone()
        .unwrap_or_else(|| default_path(demo, "events").display().to_string())
}

/// Which projections of the config to run: the named ones, or all.
pub(crate) fn select<'c>(
    config: &'c ProjectionsConfig,
    names: &[String],
) -> Result<Vec<&'c SqlProjection>, Failure> {
    if names.is_empty() {
        return Ok(config.projections.iter().collect());
    }
    // A name given twice means the same projection: run it once.
    let mut unique: Vec<&String> = Vec::with_capacity(names.len());
    for name in names {
        if !unique.contains(&name) {
            unique.push(name);
        }
    }
    unique
        .into_iter()
        .map(|name| {
            config.get(name).ok_or_else(|| {
                let known: Vec<&str> = config.projections.iter().map(|p| p.name.as_str()).collect();
                fail(EXIT_CONFIG)(anyhow!(
                    "no projection {name:?} in the config (it has: {})",
                    known.join(", ")
                ))
            })
        })
        .collect()
}

/// The command that continues where this one stopped, with the user's own
/// `--store`, `--dir` and `--config` (or the demo's).
/// How to run this program again, as printed in hints: the path it was
/// started by when that has a directory in it (`cargo run` starts
/// `target/release/projectionist`, which is not on the PATH), else
/// `projectionist`.
pub(crate) fn program_name() -> String {
    std::env::args()
        .next()
        .filter(|program| program.contains(std::path::MAIN_SEPARATOR))
        .unwrap_or_else(|| "projectionist".to_owned())
}

pub(crate) fn command_hint(cli: &Cli, demo: bool, command: &str) -> String {
    let config = match (&cli.config, demo) {
        (Some(path), _) => path.display().to_string(),
        (None, true) => DEMO_CONFIG_FILE.to_owned(),
        (None, false) => "projectionist.toml".to_owned(),
    };
    let dir = cli
        .dir
        .clone()
        .unwrap_or_else(|| default_path(demo, "projections"));
    let quote = |text: &str| {
        if text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:@=".contains(c))
        {
            text.to_owned()
        } else {
            format!("'{}'", text.replace('\'', "'\\''"))
        }
    };
    format!(
        "{} --store {} --dir {} --config {} {command}",
        quote(&program_name()),
        quote(&store_spec(cli, demo)),
        quote(&dir.display().to_string()),
        quote(&config)
    )
}

/// Where the demo leaves its config, so the commands it suggests find it.
pub(crate) const DEMO_CONFIG_FILE: &str = "demo/projectionist.toml";

/// How alike (Jaro-Winkler, 0 to 1) a store's event type must be to a
/// handled one to be suggested for it: catches a dropped, doubled or swapped
/// letter (`OrderShiped` for `OrderShipped`), not an unrelated name.
const SUGGESTION_SIMILARITY_MIN: f64 = 0.85;

/// Warns (stderr, or a `warning` JSON line) for each event type a selected
/// projection handles that the store has never seen, with the closest type it
/// has: a typo in an `[projection.on.Type]` key otherwise leaves the
/// projection silently incomplete. The exit code is not changed; a store
/// that cannot list its types cheaply is not checked.
pub(crate) fn warn_unseen_types(
    cli: &Cli,
    reader: &dyn projectionist::GlobalReader<crate::store::Payload>,
    selected: &[&projectionist_sqlview::SqlProjection],
) {
    let Ok(Some(seen)) = reader.event_types() else {
        return;
    };
    // A log with no events yet has seen nothing: no warning to give.
    if seen.is_empty() || cli.quiet {
        return;
    }
    for projection in selected {
        for handled in projection.event_types() {
            if seen.contains(&handled) {
                continue;
            }
            let suggestion = seen
                .iter()
                .map(|t| (strsim::jaro_winkler(&handled, t), t))
                .filter(|(score, _)| *score >= SUGGESTION_SIMILARITY_MIN)
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, t)| t.clone());
            let name = projection.name.as_str();
            if cli.json {
                crate::ui::json_line(&serde_json::json!({
                    "event": "warning", "projection": name, "unseen_event_type": handled,
                    "did_you_mean": suggestion,
                }));
                continue;
            }
            let hint = suggestion.map_or(String::new(), |t| format!(" (did you mean {t}?)"));
            eprintln!(
                "warning: projection {name} handles event type {}, which the store has never seen{hint}",
                crate::ui::escape_controls(&handled)
            );
        }
    }
}
