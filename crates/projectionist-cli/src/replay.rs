//! `rebuild` and `resume`: open the selected projections (a corrupt one is moved
//! aside and rebuilt), decide each one's start and which file it is built in
//! (a projection that serves readers is rebuilt in its shadow and published
//! when complete), run them from one read of the log with progress, publish,
//! and report. `rebuild --verify` compares a shadow with the live file.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, anyhow};
use projectionist::limits::OPEN_PROJECTIONS_MAX;
use projectionist::{
    CancelToken, Error, GlobalReader, ProjectionDb, ProjectionDir, ProjectionTarget,
    PublishOptions, Published, RebuildOptions, RebuildResult, Start, VersionFiles,
};
use projectionist_sqlview::{SqlHandler, SqlProjection};

use crate::app::{
    EXIT_CANCELLED, EXIT_PROJECTION, EXIT_STORE, Failure, command_hint, error_text, fail,
    load_config, open_dir, open_store, select,
};

use crate::args::Cli;
use crate::status::process_alive;
use crate::ui;

/// How a run treats projections that must be built from scratch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// `rebuild`: every projection from scratch. One whose live file serves a
    /// built projection is built in its shadow and published when complete,
    /// unless `in_place`.
    /// `force`: even from an empty log over a built projection.
    Rebuild {
        in_place: bool,
        keep_previous: bool,
        force: bool,
    },
    /// `resume`, `follow`, `worker`: from the checkpoints. A stale projection
    /// is rebuilt in its shadow; an interrupted shadow rebuild continues.
    Resume,
}

pub(crate) fn run_replay(cli: &Cli, names: &[String], plan: Plan) -> Result<(), Failure> {
    let config = load_config(cli, false)?;
    let selected = select(&config, names)?;
    let store = open_store(cli, false, &config)?;
    let dir = open_dir(cli, false)?;
    let hint = command_hint(cli, false, "resume");
    // A projection that a follower holds is rebuilt by the follower, on request.
    let mut local = Vec::new();
    let mut refused = Vec::new();
    for projection in selected {
        let name = projection.name.as_str();
        let held = matches!(dir.db(name), Err(Error::Locked { .. }));
        if !held
            || !matches!(
                plan,
                Plan::Rebuild {
                    in_place: false,
                    ..
                }
            )
        {
            local.push(projection);
            continue;
        }
        let request = VersionFiles::new(dir.path(), name)
            .map_err(|e| fail(EXIT_PROJECTION)(e.into()))?
            .rebuild_request;
        match ask_follower(dir.path(), name, &request, None) {
            None => local.push(projection),
            Some(Ok((pid, _))) => {
                if cli.json {
                    ui::json_line(&serde_json::json!({
                        "event": "handed_to_follower", "projection": name, "pid": pid,
                    }));
                } else if !cli.quiet {
                    eprintln!(
                        "{name}: the follower (process {pid}) holds it and took the request: it \
                         rebuilds it in its shadow and publishes it when caught up \
                         (`projectionist status` shows the shadow)"
                    );
                }
            }
            Some(Err(e)) => refused.push(e),
        }
    }
    let outcome = if local.is_empty() {
        Ok(())
    } else {
        replay(cli, store.reader(), &dir, &local, plan, &hint).map(|_| ())
    };
    if refused.is_empty() {
        return outcome;
    }
    let text: Vec<String> = refused.iter().map(error_text).collect();
    outcome.and(Err(fail(EXIT_PROJECTION)(anyhow!("{}", text.join("\n")))))
}

/// How long a request to a follower waits to be taken (a follower looks for
/// requests every second, and takes one between two reads of the log).
const REQUEST_TAKEN_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// When a follower holds projection `name` (it registered in
/// `.{name}.follower`, and that process lives), asks it through `request` (a
/// file holding this request's id) and waits until it took it; returns the
/// follower's process id and the request's id. Requests are serialised: the
/// file is created only when no other request for the projection is pending,
/// so each request is taken, and answered, as itself. `None`: no follower
/// holds it.
pub(crate) fn ask_follower(
    dir: &std::path::Path,
    name: &str,
    request: &std::path::Path,
    body: Option<&str>,
) -> Option<anyhow::Result<(u32, String)>> {
    let pid = projectionist_runner::control::read_registration(dir, name)?.pid;
    if !process_alive(pid) {
        return None;
    }
    let id = request_id();
    let asked = Instant::now();
    loop {
        let text = match body {
            Some(body) => format!("{id}\n{body}\n"),
            None => id.clone(),
        };
        match projectionist_runner::control::place_request(request, &text) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if asked.elapsed() > REQUEST_TAKEN_WITHIN * 3 || !process_alive(pid) {
                    return Some(Err(anyhow!(
                        "another request for projection {name} is still pending with the \
                         follower (process {pid}); try again"
                    )));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => {
                return Some(Err(anyhow::Error::from(e)
                    .context(format!("ask the follower of {name} (process {pid})"))));
            }
        }
    }
    let asked = Instant::now();
    while request.exists() {
        if asked.elapsed() > REQUEST_TAKEN_WITHIN || !process_alive(pid) {
            let _ = std::fs::remove_file(request);
            return Some(Err(anyhow!(
                "projection {name} is held by process {pid}, which did not take the request \
                 (only `follow` takes requests); stop it first"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Some(Ok((pid, id)))
}

/// How long the asking process waits for the follower's answer once the
/// follower took the request: a rollback is one swap of small files; a retry
/// reads each dead letter back from the log (at most `DEAD_LETTERS_MAX`).
const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(120);

/// Waits for the follower `pid`'s answer to request `id` (a `what`) about
/// projection `name`, in its outcome file; the file is removed once read.
pub(crate) fn await_answer(
    dir: &std::path::Path,
    name: &str,
    pid: u32,
    id: &str,
    what: &str,
) -> Result<serde_json::Value, Failure> {
    let path = projectionist_runner::control::outcome_path(dir, name, id)
        .ok_or_else(|| fail(EXIT_PROJECTION)(anyhow!("request id {id:?} is not ours")))?;
    let asked = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            let _ = std::fs::remove_file(&path);
            if let Ok(answer) = serde_json::from_str::<serde_json::Value>(&text) {
                return Ok(answer);
            }
            break;
        }
        if asked.elapsed() > ANSWER_WITHIN || !crate::status::process_alive(pid) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(fail(EXIT_PROJECTION)(anyhow!(
        "the follower (process {pid}) took the {what} request for {name} but gave no \
         answer; `projectionist status` shows where it is"
    )))
}

/// A request's id: this process and the time, unique on this machine; only
/// digits and `-`, so it can name a file.
fn request_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}", std::process::id())
}

/// Rebuilds (or resumes) the selected projections with one shared read per group,
/// showing progress; maps failures to exit codes.
pub(crate) fn replay(
    cli: &Cli,
    store: &dyn GlobalReader<crate::store::Payload>,
    dir: &ProjectionDir,
    selected: &[&SqlProjection],
    plan: Plan,
    hint: &str,
) -> Result<Vec<RebuildResult>, Failure> {
    let head = store.head().map_err(|e| fail(EXIT_STORE)(e.into()))?;
    crate::app::warn_unseen_types(cli, store, selected);
    if let Plan::Rebuild { force: false, .. } = plan
        && head == 0
    {
        refuse_empty_log(dir, selected)?;
    }
    let Opened {
        selected,
        dbs: _,
        writes,
        shadowed,
        starts,
        errors: mut open_errors,
        failed: _,
    } = open_selected(cli, dir, selected, plan, Some(head));
    let cancel = CancelToken::new();
    let handler_token = cancel.clone();
    // Ignore a failure to install the handler (e.g. one already installed in tests).
    let _ = ctrlc::set_handler(move || handler_token.cancel());
    let display = ui::Display::new(
        cli.json,
        cli.quiet,
        selected.iter().map(|p| p.name.as_str()),
        head,
    )
    .interrupted_by(&cancel);
    let progress = |p: &projectionist::Progress| display.progress(p);
    let options = RebuildOptions::new()
        .batch_size(cli.batch_size)
        .progress(&progress)
        .cancel(&cancel);
    let mut handlers: Vec<SqlHandler<'_>> = selected.iter().map(|p| SqlHandler::new(p)).collect();
    // One read of the log for all: stale projections start from scratch, the
    // others from their checkpoints.
    let targets = targets(&mut handlers, &writes, &selected, &starts);
    let started = Instant::now();
    let results = projectionist::replay(store, targets, &options);
    display.finish();
    let keep_previous = match plan {
        Plan::Rebuild { keep_previous, .. } => keep_previous,
        Plan::Resume => true,
    };
    let publishing = publish_shadows(dir, &selected, &results, &shadowed, keep_previous);
    open_errors.extend(publishing.failures.into_iter().map(|(_, e)| e));
    report(
        cli,
        &results,
        &publishing.published,
        &open_errors,
        started.elapsed().as_secs_f64(),
        hint,
    )
}

/// A rebuild from an empty log would replace every built projection with an
/// empty one: most often the log is not the one meant (a store file of the
/// same name elsewhere, a new database). Refused, naming the built ones,
/// unless `--force`.
fn refuse_empty_log(dir: &ProjectionDir, selected: &[&SqlProjection]) -> Result<(), Failure> {
    let built: Vec<String> = selected
        .iter()
        .filter_map(|p| {
            let name = p.name.as_str();
            let checkpoint = dir
                .db(name)
                .and_then(|db| {
                    db.with_connection(|conn| projectionist::SqliteCheckpoint::load_in(conn, name))
                })
                .unwrap_or(0);
            (checkpoint > 0).then(|| format!("{name} (checkpoint {checkpoint})"))
        })
        .collect();
    if built.is_empty() {
        return Ok(());
    }
    Err(fail(EXIT_STORE)(anyhow!(
        "the event log (--store) is empty, but {} {} built from events: a rebuild would replace \
         {} with an empty one. Check --store; pass --force to rebuild from the empty log anyway",
        built.join(", "),
        if built.len() == 1 { "is" } else { "are" },
        if built.len() == 1 { "it" } else { "each" },
    )))
}

/// The projections of a run, opened, each with where it starts.
pub(crate) struct Opened<'a> {
    pub(crate) selected: Vec<&'a SqlProjection>,
    /// The live files.
    pub(crate) dbs: Vec<Arc<ProjectionDb>>,
    /// The files the run writes: the live file, or its shadow.
    pub(crate) writes: Vec<Arc<ProjectionDb>>,
    /// Whether each is built in its shadow (to be published when complete).
    pub(crate) shadowed: Vec<bool>,
    pub(crate) starts: Vec<Start>,
    /// The projections that could not be opened: they fail alone.
    pub(crate) errors: Vec<anyhow::Error>,
    /// Their names, in the same order.
    pub(crate) failed: Vec<&'a SqlProjection>,
}

/// Opens the selected projections and decides, by `plan`, where each starts
/// and which file it is built in (`head`: the store's, when known).
pub(crate) fn open_selected<'a>(
    cli: &Cli,
    dir: &ProjectionDir,
    selected: &[&'a SqlProjection],
    plan: Plan,
    head: Option<u64>,
) -> Opened<'a> {
    let mut opened = Opened {
        selected: Vec::new(),
        dbs: Vec::new(),
        writes: Vec::new(),
        shadowed: Vec::new(),
        starts: Vec::new(),
        errors: Vec::new(),
        failed: Vec::new(),
    };
    for projection in selected {
        let decided = open_for_run(cli, dir, projection)
            .and_then(|db| decide(dir, projection, &db, plan, head).map(|d| (db, d)));
        let (db, (writes, start, shadowed)) = match decided {
            Ok(decided) => decided,
            Err(e) => {
                opened.errors.push(e);
                opened.failed.push(projection);
                continue;
            }
        };
        if selected.len() > OPEN_PROJECTIONS_MAX {
            // The run opens each file again when it needs it: a thousand
            // projections are not all held open at once.
            db.park();
            writes.park();
        }
        opened.selected.push(projection);
        opened.dbs.push(db);
        opened.writes.push(writes);
        opened.shadowed.push(shadowed);
        opened.starts.push(start);
    }
    opened
}

/// Which file a projection is built in (live or shadow), and from where: the
/// supervisor's policy ([`projectionist_runner::place`]); a projection rolled
/// back on purpose to another definition is [`RolledBackStale`].
fn decide(
    dir: &ProjectionDir,
    projection: &SqlProjection,
    db: &Arc<ProjectionDb>,
    plan: Plan,
    head: Option<u64>,
) -> anyhow::Result<(Arc<ProjectionDb>, Start, bool)> {
    let name = projection.name.as_str();
    let requested = VersionFiles::new(dir.path(), name)?
        .rebuild_request
        .exists();
    let plan = match plan {
        Plan::Rebuild {
            in_place,
            keep_previous,
            ..
        } => projectionist_runner::Plan::Rebuild {
            in_place,
            keep_previous,
        },
        // Another process asked the follower holding it for a rebuild.
        Plan::Resume => projectionist_runner::Plan::Resume {
            rebuild_requested: requested,
        },
    };
    let stale =
        |conn: &projectionist::rusqlite::Connection| projection.needs_rebuild(conn).unwrap_or(true);
    let placement = projectionist_runner::place(dir, db, &stale, plan, head)
        .with_context(|| format!("open projection {name} for its run"))?;
    match placement {
        projectionist_runner::Placement::Run {
            writes,
            start,
            in_shadow,
        } => Ok((writes, start, in_shadow)),
        projectionist_runner::Placement::Held { .. } => {
            Err(anyhow::Error::new(RolledBackStale(name.to_owned())))
        }
    }
}

/// A projection rolled back to a version built from another definition than
/// the config's: left as it is, on purpose, until a `rebuild` (not a
/// failure: nothing is retried).
#[derive(Debug)]
pub(crate) struct RolledBackStale(pub(crate) String);

impl std::fmt::Display for RolledBackStale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "projection {} was rolled back to a version built from another definition than \
             the config's; it is left as it is until you rebuild it",
            self.0
        )
    }
}

impl std::error::Error for RolledBackStale {}

/// What publishing the shadows of a run did.
pub(crate) struct Publishing {
    pub(crate) published: Vec<Published>,
    /// The projections that could not be published (their live files are
    /// unchanged), with why.
    pub(crate) failures: Vec<(String, anyhow::Error)>,
}

/// Publishes every shadow whose build succeeded.
pub(crate) fn publish_shadows(
    dir: &ProjectionDir,
    selected: &[&SqlProjection],
    results: &[projectionist::Result<RebuildResult>],
    shadowed: &[bool],
    keep_previous: bool,
) -> Publishing {
    let mut publishing = Publishing {
        published: Vec::new(),
        failures: Vec::new(),
    };
    for ((projection, result), shadowed) in selected.iter().zip(results).zip(shadowed) {
        if *shadowed && result.is_ok() {
            let name = projection.name.as_str();
            let options = PublishOptions::new().keep_previous(keep_previous);
            match dir.publish(name, name, &options) {
                Ok(published) => publishing.published.push(published),
                Err(e) => {
                    projectionist_runner::record_publish_failure(dir, name, &e);
                    publishing.failures.push((
                        name.to_owned(),
                        anyhow::Error::from(e)
                            .context(format!("publish {name} (the live file is unchanged)")),
                    ));
                }
            }
        }
    }
    publishing
}

/// One line per publish.
pub(crate) fn published_line(cli: &Cli, p: &Published) {
    published_line_as(cli.json, cli.quiet, p);
}

/// [`published_line`] with `--json` and `--quiet` as given.
pub(crate) fn published_line_as(json: bool, quiet: bool, p: &Published) {
    if json {
        ui::json_line(&serde_json::json!({
            "event": "published", "projection": p.name, "checkpoint": p.checkpoint,
            "bytes": p.bytes, "lock_held_ms": p.lock_held.as_secs_f64() * 1e3,
            "seconds": p.elapsed.as_secs_f64(), "previous_kept": p.previous_kept,
        }));
    } else if !quiet {
        let kept = if p.previous_kept {
            format!(
                "; the replaced version is kept (projectionist rollback {})",
                p.name
            )
        } else {
            String::new()
        };
        eprintln!(
            "{}: published (checkpoint {}, {} bytes, write lock held {:.1} ms){kept}",
            p.name,
            p.checkpoint,
            p.bytes,
            p.lock_held.as_secs_f64() * 1e3
        );
    }
}

/// The engine's targets: each opened projection with its handler (one per
/// projection, in order), where it starts, and its checkpoint in its file.
pub(crate) fn targets<'a, 'p: 'a>(
    handlers: &'a mut [SqlHandler<'p>],
    dbs: &'a [Arc<ProjectionDb>],
    selected: &[&'a SqlProjection],
    starts: &[Start],
) -> Vec<ProjectionTarget<'a, crate::store::Payload>> {
    handlers
        .iter_mut()
        .zip(dbs)
        .zip(selected)
        .zip(starts)
        .map(|(((handler, db), projection), start)| {
            ProjectionTarget::new(
                db,
                handler as &mut dyn projectionist::Handler<crate::store::Payload>,
            )
            .consumer_id(projection.name.as_str())
            .start(*start)
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
    let opened = projectionist_runner::open_for_run(dir, name)
        .with_context(|| format!("open projection {name}"))?;
    if let Some((corrupt, moved)) = &opened.moved_aside
        && !cli.quiet
    {
        eprintln!(
            "warning: projection {name} was corrupt ({}); moved it to {} and rebuilding it",
            ui::escape_controls(corrupt),
            moved.display()
        );
    }
    Ok(opened.db)
}

/// Prints each projection's outcome and picks the exit code.
pub(crate) fn report(
    cli: &Cli,
    results: &[projectionist::Result<RebuildResult>],
    published: &[Published],
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
                if let Some(p) = published.iter().find(|p| p.name == r.projection_name) {
                    published_line(cli, p);
                }
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
