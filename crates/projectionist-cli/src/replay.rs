//! `rebuild` and `resume`: open the selected projections (a corrupt one is moved
//! aside and rebuilt), decide each one's start, run them from one read of the
//! log with progress, and report.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, anyhow};
use projectionist::{
    CancelToken, CheckpointLocation, Error, GlobalReader, ProjectionDb, ProjectionDir,
    ProjectionTarget, RebuildOptions, RebuildResult, Start, quick_check, replay_shared,
};
use projectionist_sqlview::{SqlHandler, SqlProjection};

use crate::app::{
    EXIT_CANCELLED, EXIT_PROJECTION, EXIT_STORE, Failure, command_hint, error_text, fail,
    load_config, open_dir, open_store, select,
};
use crate::args::Cli;
use crate::ui;

pub(crate) fn run_replay(
    cli: &Cli,
    names: &[String],
    resume: bool,
) -> Result<Vec<RebuildResult>, Failure> {
    let config = load_config(cli, false)?;
    let selected = select(&config, names)?;
    let store = open_store(cli, false, &config)?;
    let dir = open_dir(cli, false)?;
    let hint = command_hint(cli, false, "resume");
    replay(cli, store.reader(), &dir, &selected, resume, &hint)
}

/// Rebuilds (or resumes) the selected projections with one shared read per group,
/// showing progress; maps failures to exit codes.
pub(crate) fn replay(
    cli: &Cli,
    store: &dyn GlobalReader<serde_json::Value>,
    dir: &ProjectionDir,
    selected: &[&SqlProjection],
    resume: bool,
    hint: &str,
) -> Result<Vec<RebuildResult>, Failure> {
    let Opened {
        selected,
        dbs,
        starts,
        errors: open_errors,
    } = open_selected(cli, dir, selected, resume);
    let cancel = CancelToken::new();
    let handler_token = cancel.clone();
    // Ignore a failure to install the handler (e.g. one already installed in tests).
    let _ = ctrlc::set_handler(move || handler_token.cancel());
    let head = store.head().map_err(|e| fail(EXIT_STORE)(e.into()))?;
    let display = ui::Display::new(
        cli.json,
        cli.quiet,
        selected.iter().map(|p| p.name.as_str()),
        head,
    );
    let progress = |p: &projectionist::Progress| display.progress(p);
    let options = RebuildOptions {
        batch_size: cli.batch_size,
        commit_interval: projectionist::limits::COMMIT_INTERVAL_DEFAULT,
        progress: Some(&progress),
        cancel: Some(&cancel),
        step_hook: None,
        commit_guard: None,
    };
    let mut handlers: Vec<SqlHandler<'_>> = selected.iter().map(|p| SqlHandler::new(p)).collect();
    // One read of the log for all: stale projections start from scratch, the
    // others from their checkpoints.
    let targets = targets(&mut handlers, &dbs, &selected, &starts);
    let started = Instant::now();
    let results = replay_shared(store, targets, &options);
    display.finish();
    report(
        cli,
        &results,
        &open_errors,
        started.elapsed().as_secs_f64(),
        hint,
    )
}

/// The projections of a run, opened, each with where it starts.
pub(crate) struct Opened<'a> {
    pub(crate) selected: Vec<&'a SqlProjection>,
    pub(crate) dbs: Vec<Arc<ProjectionDb>>,
    pub(crate) starts: Vec<Start>,
    /// The projections that could not be opened: they fail alone.
    pub(crate) errors: Vec<anyhow::Error>,
}

/// Opens the selected projections. Each starts from scratch for a rebuild, or,
/// resuming, when it was built from another definition (or never); otherwise
/// from its checkpoint.
pub(crate) fn open_selected<'a>(
    cli: &Cli,
    dir: &ProjectionDir,
    selected: &[&'a SqlProjection],
    resume: bool,
) -> Opened<'a> {
    let mut opened = Opened {
        selected: Vec::new(),
        dbs: Vec::new(),
        starts: Vec::new(),
        errors: Vec::new(),
    };
    for projection in selected {
        let db = match open_for_run(cli, dir, projection) {
            Ok(db) => db,
            Err(e) => {
                opened.errors.push(e);
                continue;
            }
        };
        let stale = !resume
            || db
                .with_connection(|conn| Ok(projection.needs_rebuild(conn).unwrap_or(true)))
                .unwrap_or(true);
        opened.selected.push(projection);
        opened.dbs.push(db);
        opened
            .starts
            .push(if stale { Start::Reset } else { Start::Resume });
    }
    opened
}

/// The engine's targets: each opened projection with its handler (one per
/// projection, in order), where it starts, and its checkpoint in its file.
pub(crate) fn targets<'a, 'p: 'a>(
    handlers: &'a mut [SqlHandler<'p>],
    dbs: &'a [Arc<ProjectionDb>],
    selected: &[&'a SqlProjection],
    starts: &[Start],
) -> Vec<(ProjectionTarget<'a, serde_json::Value>, Start)> {
    handlers
        .iter_mut()
        .zip(dbs)
        .zip(selected)
        .zip(starts)
        .map(|(((handler, db), projection), start)| {
            let target = ProjectionTarget {
                db,
                handler: handler as &mut dyn projectionist::Handler<serde_json::Value>,
                checkpoint: CheckpointLocation::InFile,
                consumer_id: projection.name.as_str(),
            };
            (target, *start)
        })
        .collect()
}

/// Opens a projection for a run. A corrupt file (SQLite cannot read it, or
/// `PRAGMA quick_check` fails) is derived data: it is moved aside, named in a
/// warning, and the projection starts afresh; nothing is deleted.
pub(crate) fn open_for_run(
    cli: &Cli,
    dir: &ProjectionDir,
    projection: &SqlProjection,
) -> anyhow::Result<Arc<ProjectionDb>> {
    let name = projection.name.as_str();
    let context = || format!("open projection {name}");
    let corrupt = match dir.db(name) {
        Ok(db) => match db.with_connection(|conn| quick_check(conn)) {
            Ok(None) => return Ok(db),
            Ok(Some(problem)) => problem,
            Err(e) => return Err(e).with_context(context),
        },
        Err(Error::CorruptProjection { reason, .. }) => reason,
        Err(Error::NotAProjection { reason, .. }) if reason.starts_with("not an SQLite") => reason,
        Err(e) => return Err(e).with_context(context),
    };
    let moved = dir.move_aside_corrupt(name).with_context(context)?;
    if !cli.quiet {
        eprintln!(
            "warning: projection {name} was corrupt ({}); moved it to {} and rebuilding it",
            ui::escape_controls(&corrupt),
            moved.display()
        );
    }
    dir.db(name).with_context(context)
}

/// Prints each projection's outcome and picks the exit code.
pub(crate) fn report(
    cli: &Cli,
    results: &[projectionist::Result<RebuildResult>],
    open_errors: &[anyhow::Error],
    seconds: f64,
    hint: &str,
) -> Result<Vec<RebuildResult>, Failure> {
    let mut ok = Vec::new();
    let mut cancelled = false;
    let mut failed: Vec<String> = open_errors.iter().map(error_text).collect();
    for result in results {
        match result {
            Ok(r) => {
                ui::result_line(cli.json, cli.quiet, r);
                ok.push(r.clone());
            }
            Err(Error::Cancelled { .. }) => cancelled = true,
            Err(e) => {
                if cli.json {
                    ui::json_line(&ui::error_json(e));
                }
                failed.push(ui::escape_controls(&e.to_string()));
            }
        }
    }
    if !failed.is_empty() {
        return Err(fail(EXIT_PROJECTION)(anyhow!("{}", failed.join("\n"))));
    }
    if cancelled {
        let committed: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(|e| e.to_string())
            .collect();
        return Err(fail(EXIT_CANCELLED)(anyhow!(
            "interrupted at a batch boundary after {seconds:.1}s; nothing half-applied.\n{}\nto continue from the checkpoints, run: {hint}",
            committed.join("\n")
        )));
    }
    Ok(ok)
}
