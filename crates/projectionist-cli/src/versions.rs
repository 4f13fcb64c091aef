//! `rebuild --verify` (a shadow built up to the live projection's checkpoint,
//! compared with it table by table) and `rollback` (the kept previous version
//! restored in one transaction).

use std::time::Instant;

use anyhow::{Context, anyhow};
use projectionist::{
    CancelToken, GlobalReader, Progress, ProjectionDir, PublishOptions, RebuildOptions,
    RebuildResult, SqliteCheckpoint, Start, TableDifference, UpTo, VersionFiles,
    compare_projections,
};
use projectionist_sqlview::{SqlHandler, SqlProjection, stored_definition};

use crate::app::{
    EXIT_CANCELLED, EXIT_DIFFERENT, EXIT_PROJECTION, Failure, code_of_error, error_text, fail,
    load_config, open_dir, open_existing_dir, open_store, select,
};
use crate::args::Cli;
use crate::replay::{ask_follower, open_for_run, publish_shadows, published_line, targets};
use crate::ui;

/// Differing rows shown per table: enough to find the pattern, few enough to read.
const EXAMPLES_MAX: usize = 5;

pub(crate) fn run_verify(
    cli: &Cli,
    names: &[String],
    publish_if_equal: bool,
    keep_previous: bool,
) -> Result<(), Failure> {
    let config = load_config(cli, false)?;
    let selected = select(&config, names)?;
    let store = open_store(cli, false, &config)?;
    let dir = open_dir(cli, false)?;
    let cancel = CancelToken::new();
    let token = cancel.clone();
    let _ = ctrlc::set_handler(move || token.cancel());
    let mut failures = Vec::new();
    let mut differing = Vec::new();
    for projection in selected {
        let name = projection.name.as_str();
        // Held by another process (a follower): its shadow is that process's
        // to build; said once, plainly, and nothing of it is touched.
        if let Err(projectionist::Error::Locked { holder, .. }) = dir.db(name) {
            let by = holder.map_or("another process".to_owned(), |pid| format!("process {pid}"));
            failures.push(anyhow!(
                "cannot verify {name}: {by} holds it (a follower?). --verify builds a shadow \
                 of the projection, which only its holder may do; stop {by}, verify, then \
                 start it again. Nothing was changed"
            ));
            continue;
        }
        match verify_one(
            cli,
            store.reader(),
            &dir,
            projection,
            keep_previous,
            &cancel,
        ) {
            Ok(true) if publish_if_equal => {
                if let Err(e) = catch_up_and_publish(
                    cli,
                    store.reader(),
                    &dir,
                    projection,
                    keep_previous,
                    &cancel,
                ) {
                    failures.push(e);
                }
            }
            Ok(true) => {}
            Ok(false) => differing.push(name.to_owned()),
            Err(e) => failures.push(e),
        }
        // Whatever happened, a verification leaves no shadow behind.
        if let Err(e) = dir.discard_shadow(name) {
            failures.push(anyhow::Error::from(e).context(format!("discard the shadow of {name}")));
        }
        if cancel.is_cancelled() {
            return Err(fail(EXIT_CANCELLED)(anyhow!(
                "interrupted; nothing was published and the live projections are unchanged"
            )));
        }
    }
    if !failures.is_empty() {
        let text: Vec<String> = failures.iter().map(error_text).collect();
        return Err(fail(EXIT_PROJECTION)(anyhow!("{}", text.join("\n"))));
    }
    if !differing.is_empty() {
        let what = if publish_if_equal {
            "nothing of them was published"
        } else {
            "nothing was published"
        };
        let verb = if differing.len() == 1 {
            "differs"
        } else {
            "differ"
        };
        return Err(fail(EXIT_DIFFERENT)(anyhow!(
            "{} {verb} from a fresh rebuild; {what}",
            differing.join(", ")
        )));
    }
    Ok(())
}

/// Builds the shadow up to the live checkpoint and compares; true when equal.
fn verify_one(
    cli: &Cli,
    store: &dyn GlobalReader<crate::store::Payload>,
    dir: &ProjectionDir,
    projection: &SqlProjection,
    keep_previous: bool,
    cancel: &CancelToken,
) -> anyhow::Result<bool> {
    let name = projection.name.as_str();
    let live = open_for_run(cli, dir, projection)?;
    let (checkpoint, live_version) = live.with_connection(|conn| {
        Ok((
            SqliteCheckpoint::load_in(conn, name).unwrap_or(0),
            stored_definition(conn).ok().flatten().map(|d| d.version),
        ))
    })?;
    if checkpoint == 0 {
        return Err(anyhow!(
            "projection {name} is not built (checkpoint 0): there is nothing to verify; run rebuild"
        ));
    }
    dir.discard_shadow(name)?;
    // Published afterwards with --publish-if-equal: the disk asked for
    // depends on whether the replaced version is kept.
    let publish = PublishOptions::new().keep_previous(keep_previous);
    let shadow = dir
        .shadow_for(name, &publish)
        .with_context(|| format!("open the shadow of {name}"))?;
    let up_to = UpTo::new(store, checkpoint);
    let result = build(cli, &up_to, &shadow, projection, Start::Reset, cancel)?;
    if result.checkpoint != checkpoint {
        return Err(anyhow!(
            "projection {name}: the rebuild reached checkpoint {}, not the live {checkpoint}",
            result.checkpoint
        ));
    }
    let reader = live.open_reader()?;
    let differences = compare_projections(&reader, shadow.path(), EXAMPLES_MAX)?;
    let note = match live_version {
        Some(v) if v != projection.version => Some(format!(
            "the live projection was built from definition v{v}, the config has v{}: \
             differences may come from the definition change",
            projection.version
        )),
        _ => None,
    };
    verify_report(cli, name, checkpoint, &differences, note.as_deref());
    Ok(differences.is_empty())
}

/// After an equal verification: the shadow goes on to the head and is published.
fn catch_up_and_publish(
    cli: &Cli,
    store: &dyn GlobalReader<crate::store::Payload>,
    dir: &ProjectionDir,
    projection: &SqlProjection,
    keep_previous: bool,
    cancel: &CancelToken,
) -> anyhow::Result<()> {
    let name = projection.name.as_str();
    let shadow = dir.shadow(name)?;
    let result = build(cli, store, &shadow, projection, Start::Resume, cancel)?;
    let results = [Ok(result)];
    let publishing = publish_shadows(dir, &[projection], &results, &[true], keep_previous);
    for p in &publishing.published {
        published_line(cli, p);
    }
    match publishing.failures.into_iter().next() {
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}

/// One projection built into `db` from `store`, with progress.
fn build(
    cli: &Cli,
    store: &dyn GlobalReader<crate::store::Payload>,
    db: &std::sync::Arc<projectionist::ProjectionDb>,
    projection: &SqlProjection,
    start: Start,
    cancel: &CancelToken,
) -> anyhow::Result<RebuildResult> {
    let display = ui::Display::new(
        cli.json,
        cli.quiet,
        std::iter::once(projection.name.as_str()),
        store.head()?,
    );
    let progress = |p: &Progress| display.progress(p);
    let options = RebuildOptions::new()
        .batch_size(cli.batch_size)
        .progress(&progress)
        .cancel(cancel);
    let mut handlers = vec![SqlHandler::new(projection)];
    let dbs = [std::sync::Arc::clone(db)];
    let targets = targets(&mut handlers, &dbs, &[projection], &[start]);
    let result = projectionist::replay(store, targets, &options)
        .pop()
        .expect("one result");
    display.finish();
    Ok(result?)
}

fn verify_report(
    cli: &Cli,
    name: &str,
    checkpoint: u64,
    differences: &[TableDifference],
    note: Option<&str>,
) {
    let side = |e: &str| {
        e.replace("only in first", "only in the live file")
            .replace("only in second", "only in the rebuild")
    };
    if cli.json {
        let tables: Vec<serde_json::Value> = differences
            .iter()
            .map(|d| {
                serde_json::json!({
                    "table": d.table, "rows_live": d.rows_first, "rows_rebuilt": d.rows_second,
                    "examples": d.examples.iter().map(|e| side(e)).collect::<Vec<_>>(),
                })
            })
            .collect();
        ui::json_line(&serde_json::json!({
            "event": "verify", "projection": name, "checkpoint": checkpoint,
            "equal": differences.is_empty(), "tables": tables, "note": note,
        }));
        return;
    }
    if differences.is_empty() {
        eprintln!("{name}: equal to a fresh rebuild at checkpoint {checkpoint}");
        return;
    }
    let rows = |n: Option<u64>| n.map_or("no table".to_owned(), |n| format!("{n} rows"));
    let mut text = format!("{name}: differs from a fresh rebuild at checkpoint {checkpoint}:");
    for d in differences {
        text.push_str(&format!(
            "\n  table {}: {} live, {} rebuilt",
            d.table,
            rows(d.rows_first),
            rows(d.rows_second)
        ));
        for example in &d.examples {
            text.push_str(&format!("\n    {}", ui::escape_controls(&side(example))));
        }
    }
    if let Some(note) = note {
        text.push_str(&format!("\n  note: {note}"));
    }
    ui::out_line(&text);
}

pub(crate) fn run_rollback(cli: &Cli, name: &str) -> Result<(), Failure> {
    let started = Instant::now();
    let dir = open_existing_dir(cli)?;
    let error = |e: anyhow::Error| fail(code_of_error(&e))(e);
    let path = dir.file_path(name).map_err(|e| error(e.into()))?;
    if !path.exists() {
        // As `remove` of an unknown projection: a usage error.
        return Err(fail(crate::app::EXIT_CONFIG)(anyhow!(
            "no projection {name} in {}",
            dir.path().display()
        )));
    }
    // A follower holding it rolls it back itself, on request.
    if let Err(projectionist::Error::Locked { .. }) = dir.db(name) {
        let request = VersionFiles::new(dir.path(), name)
            .map_err(|e| error(e.into()))?
            .rollback_request;
        if let Some(asked) = ask_follower(dir.path(), name, &request, None) {
            let (pid, id) = asked.map_err(error)?;
            return follower_rolled_back(cli, &dir, name, pid, &id);
        }
    }
    // A shadow built before the rollback must not be published over it later.
    dir.discard_shadow(name)
        .map_err(|e| error(anyhow::Error::from(e).context(format!("roll back {name}"))))?;
    let back = dir
        .rollback(name, name, &PublishOptions::default())
        .map_err(|e| error(anyhow::Error::from(e).context(format!("roll back {name}"))))?;
    let restored = dir
        .db(name)
        .and_then(|db| db.with_connection(|conn| Ok(stored_definition(conn).ok().flatten())))
        .ok()
        .flatten()
        .map(|d| d.version);
    let configured = load_config(cli, false).ok().and_then(|c| {
        c.projections
            .iter()
            .find(|p| p.name.as_str() == name)
            .map(|p| p.version)
    });
    if cli.json {
        ui::json_line(&serde_json::json!({
            "event": "rolled_back", "projection": name, "checkpoint": back.checkpoint,
            "definition_version": restored, "config_version": configured,
            "lock_held_ms": back.lock_held.as_secs_f64() * 1e3,
            "seconds": started.elapsed().as_secs_f64(),
        }));
    } else if !cli.quiet {
        let version = restored.map_or(String::new(), |v| format!(", definition v{v}"));
        eprintln!(
            "{name}: rolled back to the previous version (checkpoint {}{version}); the replaced \
             version is kept: `projectionist rollback {name}` again restores it",
            back.checkpoint
        );
        if let (Some(restored), Some(configured)) = (restored, configured)
            && restored != configured
        {
            eprintln!(
                "note: the config defines {name} as v{configured}: it shows as stale and is not \
                 rebuilt by resume or follow until you run `projectionist rebuild {name}`"
            );
        }
    }
    Ok(())
}

/// Reports a rollback done by the follower `pid` on request `id`, from the
/// follower's own answer to that request (never from the live file, which a
/// handed-off rebuild or another request may change meanwhile).
fn follower_rolled_back(
    cli: &Cli,
    dir: &ProjectionDir,
    name: &str,
    pid: u32,
    id: &str,
) -> Result<(), Failure> {
    let answer = crate::replay::await_answer(dir.path(), name, pid, id, "rollback")?;
    if answer["ok"] != true {
        return Err(fail(EXIT_PROJECTION)(anyhow!(
            "the follower (process {pid}) could not roll {name} back: {}",
            answer["error"].as_str().unwrap_or("no reason given")
        )));
    }
    let follows = answer["follows"] == true;
    if cli.json {
        ui::json_line(&serde_json::json!({
            "event": "rolled_back", "projection": name, "by_follower": pid,
            "checkpoint": answer["checkpoint"], "rolled_back_at": answer["rolled_back_at"],
            "follows": follows,
        }));
    } else if !cli.quiet {
        let at = answer["rolled_back_at"].as_str().unwrap_or("?");
        let checkpoint = &answer["checkpoint"];
        if follows {
            eprintln!(
                "{name}: rolled back by the follower (process {pid}) at {at} (checkpoint \
                 {checkpoint}); it follows the restored version on"
            );
        } else {
            eprintln!(
                "{name}: rolled back by the follower (process {pid}) at {at} (checkpoint \
                 {checkpoint}); the restored version was built from another definition than \
                 the config's, so it is left as it is (stale) until `projectionist rebuild {name}`"
            );
        }
    }
    Ok(())
}
