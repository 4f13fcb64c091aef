//! `status`: each projection's state, read from its file in a process of its
//! own (it works while a run goes on), with the precedence documented in
//! `docs/commands.md` ("Status").

use std::path::Path;

use anyhow::anyhow;
use projectionist::rusqlite::{Connection, OpenFlags};
use projectionist::{
    FileKind, ProjectionDir, ProjectionFiles, SqliteCheckpoint, VersionFiles, classify_file,
    is_corruption, last_run, quick_check, version_info,
};
use projectionist_sqlview::{SqlProjection, stored_definition};

use crate::app::{
    EXIT_PROJECTION, EXIT_STORE, Failure, default_path, fail, load_config, open_store, store_spec,
};
use crate::args::Cli;
use crate::store::Store;
use crate::ui;

pub(crate) fn run_status(cli: &Cli, check: bool) -> Result<(), Failure> {
    let config = load_config(cli, false)?;
    let dir_path = cli
        .dir
        .clone()
        .unwrap_or_else(|| default_path(false, "projections"));
    // Without a store, status still shows the files; a store that exists but
    // cannot be read is an error, and so is a `--store` named but missing (a
    // mistyped path must not look like a fine status).
    let spec = store_spec(cli, false);
    Store::refuse_other_urls(&spec).map_err(fail(EXIT_STORE))?;
    if cli.store.is_some() && !Store::is_postgres(&spec) && !Path::new(&spec).exists() {
        return Err(fail(EXIT_STORE)(anyhow!(
            "event store {spec} does not exist (nothing was created)"
        )));
    }
    let store = if Store::is_postgres(&spec) || Path::new(&spec).exists() {
        Some(open_store(cli, false, &config)?)
    } else {
        None
    };
    let head = if let Some(store) = &store {
        Some(
            store
                .reader()
                .head()
                .map_err(|e| fail(EXIT_STORE)(e.into()))?,
        )
    } else {
        if !cli.quiet {
            eprintln!(
                "warning: event store {spec} does not exist; showing the projection files only"
            );
        }
        None
    };
    let mut names: Vec<String> = config
        .projections
        .iter()
        .map(|p| p.name.to_string())
        .collect();
    if dir_path.is_dir() {
        let dir = ProjectionDir::open(&dir_path).map_err(|e| fail(EXIT_PROJECTION)(e.into()))?;
        for name in dir.list().map_err(|e| fail(EXIT_PROJECTION)(e.into()))? {
            if !names.iter().any(|n| n == name.as_str()) {
                names.push(name.to_string());
            }
        }
    }
    let mut rows = Vec::new();
    for name in &names {
        let files =
            ProjectionFiles::new(&dir_path, name).map_err(|e| fail(EXIT_PROJECTION)(e.into()))?;
        let mut row = status_row(name, &files, config.get(name), head, check)
            .map_err(fail(EXIT_PROJECTION))?;
        if let (Some(store), Some(projection)) = (&store, config.get(name)) {
            discount_other_types(&mut row, store, projection)
                .map_err(|e| fail(EXIT_STORE)(e.into()))?;
            held_at_hole(&mut row, store).map_err(fail(EXIT_STORE))?;
        }
        follower_said(&mut row, &dir_path, name);
        rows.push(row);
    }
    ui::status_table(cli.json, &rows, head);
    let troubled: Vec<&str> = rows
        .iter()
        .filter(|r| STATES_FAILING_STATUS.contains(&r.state))
        .map(|r| r.name.as_str())
        .collect();
    if troubled.is_empty() {
        return Ok(());
    }
    Err(fail(EXIT_PROJECTION)(anyhow!(
        "{} need attention: {}",
        troubled.len(),
        troubled.join(", ")
    )))
}

/// Events after a checkpoint that `status` reads through to see whether any is
/// of the projection's types. A follower moves a parked projection's
/// checkpoint over events of other types only every
/// `PARKED_CHECKPOINT_INTERVAL` (10 s), so its file can trail the head by that
/// many events while it has nothing to apply; a larger lag is shown as it is
/// (reading through it would make `status` slow).
const OTHER_TYPES_LAG_MAX: u64 = 100_000;

/// A projection whose checkpoint trails the head only by events of types it
/// does not handle has nothing to apply: its lag is 0 (and `behind` is
/// `current`). One typed read of at most one event, for lags up to
/// [`OTHER_TYPES_LAG_MAX`].
fn discount_other_types(
    row: &mut ui::StatusRow,
    store: &Store,
    projection: &SqlProjection,
) -> projectionist::Result<()> {
    let Some(lag) = row.lag else { return Ok(()) };
    if lag == 0 || lag > OTHER_TYPES_LAG_MAX || !matches!(row.state, "behind" | "following") {
        return Ok(());
    }
    let read = store
        .reader()
        .read_after_types(row.checkpoint, 1, &projection.event_types())?;
    if read.events.is_empty() && read.scanned_through >= row.checkpoint + lag {
        row.lag = Some(0);
        if row.state == "behind" {
            row.state = "current";
        }
    }
    Ok(())
}

/// A projection that lags because the log's next number after its checkpoint
/// is a hole that a running transaction may still fill (PostgreSQL) is
/// `waiting`, with the hole: nothing it could apply is there yet.
fn held_at_hole(row: &mut ui::StatusRow, store: &Store) -> anyhow::Result<()> {
    if row.lag.is_none_or(|lag| lag == 0) || !matches!(row.state, "behind" | "following") {
        return Ok(());
    }
    if let Some(hole) = store.hole_after(row.checkpoint)? {
        row.state = "waiting";
        row.waiting_at = Some(hole);
    }
    Ok(())
}

/// A running follower's own word on a projection it follows (the second line
/// of `.{name}.follower`): `stalled`, `reconnecting` and `failed` are known
/// only to it, and override what the file alone suggests.
fn follower_said(row: &mut ui::StatusRow, dir: &Path, name: &str) {
    if !matches!(row.state, "following" | "behind" | "current" | "waiting") {
        return;
    }
    let Some(registration) = projectionist_runner::control::read_registration(dir, name) else {
        return;
    };
    let (true, Some(said)) = (process_alive(registration.pid), registration.state) else {
        return;
    };
    let state = match said["state"].as_str() {
        Some("stalled") => "stalled",
        Some("reconnecting") => "reconnecting",
        Some("failed") => "failed",
        _ => return,
    };
    row.state = state;
    row.error = said["reason"].as_str().map(str::to_owned);
}

/// States that make `status` exit with 4.
pub(crate) const STATES_FAILING_STATUS: [&str; 5] =
    ["failed", "corrupt", "ahead", "not a projection", "stalled"];

/// What `status` reads from a projection file.
struct FileRead {
    /// What `quick_check` found (with `--check`).
    problem: Option<String>,
    checkpoint: u64,
    /// The definition the file was built from.
    stored: Option<projectionist_sqlview::StoredDefinition>,
    /// The last run recorded in it.
    last: Option<projectionist::LastRun>,
    /// Built from another definition than the config's.
    needs_rebuild: bool,
    /// The config's deferred indexes it lacks.
    pending: Vec<String>,
}

/// One projection's row. States, first match wins: `not a projection`,
/// `corrupt`, `not in config`, `rebuilding`, `resuming`, `following`, `failed`,
/// `interrupted`, `stale`,
/// `ahead`, `not built`, `behind`, `current`.
pub(crate) fn status_row(
    name: &str,
    files: &ProjectionFiles,
    projection: Option<&SqlProjection>,
    head: Option<u64>,
    check: bool,
) -> anyhow::Result<ui::StatusRow> {
    let mut row = ui::StatusRow {
        name: name.to_owned(),
        checkpoint: 0,
        lag: head,
        config_version: projection.map(|p| p.version),
        built_version: None,
        state: "not built",
        size: files.size_bytes(),
        error: None,
        last_run: None,
        versions: ui::VersionsRow::default(),
        pending_indexes: Vec::new(),
        waiting_at: None,
        dead_letters: 0,
    };
    let path = files.db.as_path();
    let troubled = |mut row: ui::StatusRow, state, reason: String| {
        row.state = state;
        row.error = Some(reason);
        Ok(row)
    };
    match classify_file(path)? {
        None | Some(FileKind::Empty) => return Ok(row),
        Some(FileKind::NotAProjection(reason)) => {
            // Where the config expects a projection, a file that is not even an
            // SQLite database is one whose header was destroyed.
            let state = if projection.is_some() && reason.starts_with("not an SQLite database") {
                "corrupt"
            } else {
                "not a projection"
            };
            return troubled(row, state, reason);
        }
        Some(FileKind::Corrupt(reason)) => return troubled(row, "corrupt", reason),
        Some(FileKind::Projection) => {}
    }
    let read = || -> projectionist::Result<_> {
        let sqlite = |e| projectionist::Error::Sqlite {
            step: format!("read projection file {}", path.display()),
            source: e,
        };
        // Read-only, without taking the lock: status works while a rebuild runs.
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sqlite)?;
        let checkpoint = SqliteCheckpoint::load_in(&conn, name).unwrap_or(0);
        let stored = stored_definition(&conn).map_err(sqlite)?;
        // The same question the run asks before resuming.
        let needs_rebuild = match projection {
            Some(p) => p.needs_rebuild(&conn).map_err(sqlite)?,
            None => false,
        };
        let last = last_run(&conn, name).ok().flatten();
        let problem = if check { quick_check(&conn)? } else { None };
        let pending = match (projection, &stored) {
            (Some(p), Some(_)) if !needs_rebuild => {
                p.missing_deferred_indexes(&conn).map_err(sqlite)?
            }
            _ => Vec::new(),
        };
        Ok(FileRead {
            problem,
            checkpoint,
            stored,
            last,
            needs_rebuild,
            pending,
        })
    };
    let FileRead {
        problem,
        checkpoint,
        stored,
        last,
        needs_rebuild,
        pending,
    } = match read() {
        Ok(read) => read,
        Err(projectionist::Error::Sqlite { source, .. }) if is_corruption(&source) => {
            return troubled(row, "corrupt", source.to_string());
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(problem) = problem {
        return troubled(row, "corrupt", format!("quick_check: {problem}"));
    }
    row.checkpoint = checkpoint;
    row.pending_indexes = pending;
    row.dead_letters = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .ok()
        .and_then(|conn| projectionist::dead_letter_count(&conn).ok())
        .unwrap_or(0);
    row.lag = head.map(|h| h.saturating_sub(checkpoint));
    row.built_version = stored.as_ref().map(|s| s.version);
    let alive_in = |state: &str| {
        last.as_ref()
            .is_some_and(|l| l.state == state && l.pid.is_none_or(process_alive))
    };
    let (running, resuming, following) = (
        alive_in("running"),
        alive_in("resuming"),
        alive_in("following"),
    );
    let state_of_last = last.as_ref().map(|l| l.state.as_str());
    row.state = match projection {
        None => "not in config",
        Some(_) if running => "rebuilding",
        Some(_) if resuming => "resuming",
        // A follower that died left its projection complete up to its
        // checkpoint: that is `behind` or `current`, not `interrupted`.
        Some(_) if following => "following",
        Some(_) if state_of_last == Some("failed") => "failed",
        Some(_) if matches!(state_of_last, Some("running" | "cancelled")) => "interrupted",
        Some(_) if needs_rebuild => "stale",
        Some(_) if stored.is_none() && checkpoint > 0 => "stale",
        Some(_) if head.is_some_and(|h| checkpoint > h) => "ahead",
        Some(_) if stored.is_none() => "not built",
        Some(_) if row.lag.is_some_and(|lag| lag > 0) => "behind",
        Some(_) => "current",
    };
    if row.state == "failed" {
        row.error = last.as_ref().and_then(|l| l.error.clone());
    }
    if row.state == "ahead" {
        row.error = Some(format!(
            "checkpoint {checkpoint} is beyond the store's head; built from another store?"
        ));
    }
    row.last_run = last;
    row.versions = versions_row(files, name);
    if row.versions.shadow_alive && matches!(row.state, "current" | "behind" | "stale") {
        row.state = "rebuilding";
    }
    Ok(row)
}

/// The projection's other versions: the kept previous one and a shadow
/// rebuild, read without locks (a publish may be under way: what cannot be
/// read is shown as absent).
fn versions_row(files: &ProjectionFiles, name: &str) -> ui::VersionsRow {
    let mut row = ui::VersionsRow::default();
    let Some(dir) = files.db.parent() else {
        return row;
    };
    let Ok(versions) = VersionFiles::new(dir, name) else {
        return row;
    };
    if let Ok(Some(FileKind::Projection)) = classify_file(&versions.previous) {
        // `immutable`: no -wal or -shm is created beside it; a previous version
        // is written whole, under the projection's lock, never in place.
        let uri = projectionist::immutable_uri(&versions.previous);
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI;
        if let Ok(conn) = Connection::open_with_flags(uri, flags) {
            row.previous = Some(ui::PreviousRow {
                checkpoint: SqliteCheckpoint::load_in(&conn, name).unwrap_or(0),
                built_version: stored_definition(&conn).ok().flatten().map(|d| d.version),
            });
        }
    }
    if let Ok(Some(FileKind::Projection)) = classify_file(&versions.shadow)
        && let Ok(conn) =
            Connection::open_with_flags(&versions.shadow, OpenFlags::SQLITE_OPEN_READ_ONLY)
    {
        row.shadow_checkpoint = Some(SqliteCheckpoint::load_in(&conn, name).unwrap_or(0));
        let run = last_run(&conn, name).ok().flatten();
        row.shadow_alive = run.as_ref().is_some_and(|l| {
            matches!(l.state.as_str(), "running" | "resuming" | "following")
                && l.pid.is_none_or(process_alive)
        });
        row.shadow_error = run
            .filter(|l| l.state == "failed")
            .map(|l| l.error.unwrap_or_else(|| "failed".to_owned()));
    }
    if let Ok(conn) = Connection::open_with_flags(&files.db, OpenFlags::SQLITE_OPEN_READ_ONLY) {
        row.rolled_back_at = version_info(&conn).ok().and_then(|v| v.rolled_back_at);
    }
    row
}

/// Whether the process that recorded a run still exists (Linux: `/proc`;
/// elsewhere it is assumed to).
pub(crate) fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.is_dir() || proc.join(pid.to_string()).exists()
}
