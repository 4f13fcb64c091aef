//! `projectionist worker`: one of several processes sharing the projections of a
//! PostgreSQL store. Each projection is claimed through a lease (see
//! `projectionist_postgres::Leases`), rebuilt into this worker's own `--dir`, and
//! marked done; every commit first renews the lease, so a worker that lost its
//! lease (it hung, or was paused past the lease) commits nothing.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use projectionist::{
    CheckpointLocation, Error, ProjectionDir, ProjectionTarget, RebuildOptions, rebuild_shared,
};
use projectionist_postgres::{Lease, Leases, PostgresEventStore};
use projectionist_sqlview::{ProjectionsConfig, SqlHandler, SqlProjection};

use crate::ui::json_line;
use anyhow::anyhow;
use projectionist::{CancelToken, Progress, PublishOptions, SqliteCheckpoint};

use crate::app::{
    EXIT_CANCELLED, EXIT_CONFIG, EXIT_PROJECTION, Failure, fail, load_config, open_dir, store_spec,
};
use crate::args::Cli;
use crate::replay::{Plan, Shadows, open_selected, targets};

/// How long a worker waits before looking for work again when it found none.
const IDLE_POLL: Duration = Duration::from_millis(200);

/// What a worker is told to do.
pub struct WorkerOptions<'a> {
    pub url: &'a str,
    pub worker_id: &'a str,
    pub lease: Duration,
    pub batch_size: u32,
    pub exit_when_done: bool,
    pub json: bool,
    pub quiet: bool,
    /// `--seed-from`: where a claimed projection missing here is restored from.
    pub seed_from: Option<&'a dyn projectionist_runner::snapshot::SnapshotLocation>,
}

/// Where workers reading another program's table keep their leases and
/// heartbeats when `[source]` names no `state_schema`.
pub const STATE_SCHEMA_DEFAULT: &str = "projectionist";

/// The store (through the config's `[source]`, if any) and the lease table.
fn connect(
    config: &ProjectionsConfig,
    options: &WorkerOptions<'_>,
) -> anyhow::Result<(PostgresEventStore, Leases)> {
    let store = match &config.source_postgres {
        Some(mapping) => PostgresEventStore::connect_mapped_where(
            options.url,
            mapping,
            &config.source_conditions,
        )?
        .with_hole_settle(config.source_settle),
        None => PostgresEventStore::connect(options.url)?,
    };
    // Reading another program's table, our own state goes in a schema of our
    // own: nothing is created beside the table read.
    let lease_url = match &config.source_postgres {
        Some(_) => projectionist_postgres::url_with_schema(
            options.url,
            config
                .source_state_schema
                .as_deref()
                .unwrap_or(STATE_SCHEMA_DEFAULT),
        )?,
        None => options.url.to_owned(),
    };
    let leases = Leases::connect(&lease_url, options.worker_id, options.lease)?;
    leases.init()?;
    Ok((store, leases))
}

/// Runs the worker loop: claim a free projection, rebuild it, mark it done;
/// until cancelled, or (with `exit_when_done`) until every projection is done.
pub fn run(
    config: &ProjectionsConfig,
    dir: &ProjectionDir,
    options: &WorkerOptions<'_>,
    cancel: &projectionist::CancelToken,
) -> anyhow::Result<()> {
    let (store, leases) = connect(config, options)?;
    let wanted: Vec<(String, String)> = config
        .projections
        .iter()
        .map(|p| (p.name.to_string(), p.hash.clone()))
        .collect();
    // Start at a different projection per worker, so workers spread out.
    let offset =
        options.worker_id.bytes().map(usize::from).sum::<usize>() % config.projections.len().max(1);
    while !cancel.is_cancelled() {
        let mut worked = false;
        for idx in 0..config.projections.len() {
            let projection = &config.projections[(idx + offset) % config.projections.len()];
            let Some(lease) = leases.try_claim(projection.name.as_str(), &projection.hash)? else {
                continue;
            };
            worked = true;
            say(options, "claimed", projection, &lease, None);
            match rebuild_one(&store, dir, projection, &leases, &lease, options, cancel) {
                Ok(()) => {
                    leases.complete(&lease, &projection.hash)?;
                    say(options, "completed", projection, &lease, None);
                }
                Err(e @ Error::Fenced { .. }) => {
                    say(options, "fenced", projection, &lease, Some(&e))
                }
                Err(e) => {
                    say(options, "failed", projection, &lease, Some(&e));
                    leases.release(&lease)?;
                }
            }
            if cancel.is_cancelled() {
                break;
            }
        }
        if options.exit_when_done && leases.all_done(&wanted)? {
            return Ok(());
        }
        if !worked {
            std::thread::sleep(IDLE_POLL);
        }
    }
    Ok(())
}

/// How often a following worker renews the leases it holds and looks for
/// projections that nobody holds (a dead or paused worker's): a third of the
/// lease, at most this, so an orphan is claimed within the lease plus this.
const KEEPER_INTERVAL_MAX: Duration = Duration::from_millis(500);

/// Runs a following worker: holds as many projections as it can claim, keeps
/// them all current from one shared read (`projectionist::follow`), renews its
/// leases between commits as well as at every commit, and claims projections
/// whose lease expired, even while it is busy. Its set of projections changes
/// by stopping the run (each projection commits its batch in hand) and
/// starting it again with the new set, each from its checkpoint. Until
/// cancelled.
pub fn run_following(
    cli: &Cli,
    config: &ProjectionsConfig,
    dir: &ProjectionDir,
    options: &WorkerOptions<'_>,
    cancel: &CancelToken,
) -> anyhow::Result<()> {
    let interval = (options.lease / 3).min(KEEPER_INTERVAL_MAX);
    let held: Mutex<Vec<Lease>> = Mutex::new(Vec::new());
    let mut backoff = interval;
    while !cancel.is_cancelled() {
        let started = std::time::Instant::now();
        let session = connect(config, options).and_then(|(store, leases)| {
            follow_session(cli, config, dir, options, cancel, &store, &leases, &held)
        });
        let Err(error) = session else {
            return Ok(());
        };
        // The server went away (restart, failover, a killed connection): the
        // leases held so far stay this worker's if it is back within the lease.
        if started.elapsed() > RECONNECT_BACKOFF_MAX {
            backoff = interval;
        }
        let text = crate::app::error_text(&error);
        tracing::warn!(worker = options.worker_id, error = %text, retry_in_ms = backoff.as_millis(), "PostgreSQL unreachable; reconnecting");
        if options.json {
            json_line(&serde_json::json!({
                "event": "reconnecting", "worker": options.worker_id, "error": text,
                "retry_in_ms": backoff.as_millis(),
            }));
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
    }
    Ok(())
}

/// The longest wait between two attempts to reach PostgreSQL again: a server
/// that accepts connections again is used within a second.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// One connection's worth of following: until cancelled (then the leases and
/// the heartbeat are given up: `Ok`), or until the store or the lease table
/// cannot be reached (`Err`: reconnect and go on).
#[allow(clippy::too_many_arguments)]
fn follow_session(
    cli: &Cli,
    config: &ProjectionsConfig,
    dir: &ProjectionDir,
    options: &WorkerOptions<'_>,
    cancel: &CancelToken,
    store: &PostgresEventStore,
    leases: &Leases,
    held: &Mutex<Vec<Lease>>,
) -> anyhow::Result<()> {
    let interval = (options.lease / 3).min(KEEPER_INTERVAL_MAX);
    let by_name = |name: &str| config.get(name).expect("a projection of the config");
    while !cancel.is_cancelled() {
        let share = fair_share(config, leases)?;
        claim_free(config, leases, held, share, options)?;
        let current: Vec<Lease> = held.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if current.is_empty() {
            std::thread::sleep(interval);
            continue;
        }
        let stop = CancelToken::new();
        let results = std::thread::scope(|scope| {
            scope.spawn(|| keep(config, leases, held, options, interval, &stop, cancel));
            let results = follow_held(cli, store, dir, &current, &by_name, leases, options, &stop);
            stop.cancel();
            results
        });
        let mut unreachable = None;
        for (lease, result) in current.iter().zip(results) {
            let projection = by_name(&lease.projection);
            let error = match result {
                Ok(()) => continue,
                Err(e) => e,
            };
            if is_store_failure(&error) {
                // Not the projection's fault: keep its lease, reconnect.
                unreachable = Some(error);
                continue;
            }
            let fenced = matches!(error.downcast_ref::<Error>(), Some(Error::Fenced { .. }));
            let event = if fenced { "fenced" } else { "failed" };
            let mut held = held.lock().unwrap_or_else(PoisonError::into_inner);
            if !held.contains(lease) {
                continue; // the keeper found it lost and said so
            }
            held.retain(|l| l != lease);
            drop(held);
            say_error(options, event, projection, lease, &error);
            if !fenced {
                leases.release(lease)?;
            }
        }
        if let Some(error) = unreachable {
            return Err(error);
        }
    }
    for lease in std::mem::take(&mut *held.lock().unwrap_or_else(PoisonError::into_inner)) {
        leases.release(&lease)?;
    }
    leases.leave()?;
    Ok(())
}

/// A run that stopped because the log could not be read (not because of an
/// event in it).
fn is_store_failure(error: &anyhow::Error) -> bool {
    match error.downcast_ref::<Error>() {
        Some(Error::Replay { source, .. }) => source.event().is_none(),
        _ => false,
    }
}

/// How many projections this worker should hold: an even share among the live
/// workers, rounded up.
fn fair_share(config: &ProjectionsConfig, leases: &Leases) -> anyhow::Result<usize> {
    let live = leases.heartbeat()?;
    Ok(config.projections.len().div_ceil(live))
}

/// Claims projections that nobody holds, up to `share` held in all; true
/// when it claimed one.
fn claim_free(
    config: &ProjectionsConfig,
    leases: &Leases,
    held: &Mutex<Vec<Lease>>,
    share: usize,
    options: &WorkerOptions<'_>,
) -> anyhow::Result<bool> {
    let mut claimed = false;
    for projection in &config.projections {
        let name = projection.name.as_str();
        {
            let held = held.lock().unwrap_or_else(PoisonError::into_inner);
            if held.len() >= share || held.iter().any(|l| l.projection == name) {
                continue;
            }
        }
        if let Some(lease) = leases.try_hold(name)? {
            say(options, "claimed", projection, &lease, None);
            held.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(lease);
            claimed = true;
        }
    }
    Ok(claimed)
}

/// Beside a run: renews the held leases every `interval` and claims free
/// projections; stops the run when the set changes (a lease lost, one
/// claimed) or the worker is cancelled.
fn keep(
    config: &ProjectionsConfig,
    leases: &Leases,
    held: &Mutex<Vec<Lease>>,
    options: &WorkerOptions<'_>,
    interval: Duration,
    stop: &CancelToken,
    cancel: &CancelToken,
) {
    while !stop.is_cancelled() {
        if cancel.is_cancelled() {
            stop.cancel();
            return;
        }
        std::thread::sleep(interval);
        let current: Vec<Lease> = held.lock().unwrap_or_else(PoisonError::into_inner).clone();
        for lease in current {
            // A lost lease also fails the projection's next commit (the
            // guard); stopping the run sets the others going without it.
            if !matches!(leases.renew(&lease), Ok(true)) {
                held.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .retain(|l| *l != lease);
                let error = anyhow!("lease epoch {} was lost", lease.epoch);
                if let Some(projection) = config.get(&lease.projection) {
                    say_error(options, "fenced", projection, &lease, &error);
                }
                stop.cancel();
            }
        }
        let Ok(share) = fair_share(config, leases) else {
            continue;
        };
        // More than a fair share (another worker joined): hand the extra back.
        let extra: Vec<Lease> = {
            let mut held = held.lock().unwrap_or_else(PoisonError::into_inner);
            let keep = held.len().min(share);
            held.split_off(keep)
        };
        for lease in &extra {
            if leases.release(lease).is_ok()
                && let Some(projection) = config.get(&lease.projection)
            {
                say(options, "released", projection, lease, None);
            }
            stop.cancel();
        }
        if matches!(claim_free(config, leases, held, share, options), Ok(true)) {
            stop.cancel();
        }
    }
}

/// Follows the held projections until `stop`; one result per lease.
#[allow(clippy::too_many_arguments)]
fn follow_held<'c>(
    cli: &Cli,
    store: &PostgresEventStore,
    dir: &ProjectionDir,
    current: &[Lease],
    by_name: &dyn Fn(&str) -> &'c SqlProjection,
    leases: &Leases,
    options: &WorkerOptions<'_>,
    stop: &CancelToken,
) -> Vec<anyhow::Result<()>> {
    let selected: Vec<&SqlProjection> = current.iter().map(|l| by_name(&l.projection)).collect();
    if let Some(from) = options.seed_from {
        seed_claimed(store, dir, &selected, from, options);
    }
    let opened = open_selected(cli, dir, &selected, Plan::Resume, None);
    let mut errors = opened.errors.into_iter();
    // A changed projection is rebuilt in its shadow (its live file keeps
    // serving); once caught up the run stops, and it is published under its
    // lease before the next run follows it in the live file.
    let shadows = Shadows::new(&opened.selected, &opened.shadowed);
    let progress = |p: &Progress| {
        if shadows.caught_up_now(p) {
            stop.cancel();
        }
    };
    // Renewing the lease is the fence: a commit happens only while this worker
    // still holds the projection at its epoch.
    let guard = |name: &str| -> Result<(), projectionist::BoxError> {
        let lease = current
            .iter()
            .find(|l| l.projection == name)
            .ok_or("no lease")?;
        fence(leases, lease)
    };
    let follow_options = RebuildOptions {
        batch_size: options.batch_size,
        commit_interval: projectionist::limits::COMMIT_INTERVAL_DEFAULT,
        progress: Some(&progress),
        cancel: None,
        step_hook: None,
        commit_guard: Some(&guard),
    };
    let mut handlers: Vec<SqlHandler<'_>> =
        opened.selected.iter().map(|p| SqlHandler::new(p)).collect();
    let targets = targets(
        &mut handlers,
        &opened.writes,
        &opened.selected,
        &opened.starts,
    );
    let results = projectionist::follow(store, targets, &follow_options, stop);
    let results: Vec<_> = results
        .into_iter()
        .zip(&opened.selected)
        .enumerate()
        .map(|(i, (result, projection))| {
            result.map_err(anyhow::Error::from)?;
            if shadows.caught_up(i) {
                let name = projection.name.as_str();
                let lease = current
                    .iter()
                    .find(|l| l.projection == name)
                    .expect("a held projection");
                publish_fenced(dir, projection, leases, lease, options)?;
            }
            Ok(())
        })
        .collect();
    let mut results = results.into_iter();
    // In lease order: a projection that could not be opened has its error.
    current
        .iter()
        .map(|lease| {
            if opened
                .selected
                .iter()
                .any(|p| p.name.as_str() == lease.projection)
            {
                results.next().expect("one result per opened projection")
            } else {
                Err(errors
                    .next()
                    .unwrap_or_else(|| anyhow!("could not be opened")))
            }
        })
        .collect()
}

fn say_error(
    options: &WorkerOptions<'_>,
    event: &str,
    projection: &SqlProjection,
    lease: &Lease,
    error: &anyhow::Error,
) {
    let text = crate::app::error_text(error);
    tracing::warn!(worker = options.worker_id, projection = %projection.name, epoch = lease.epoch, error = %text, "{event}");
    if options.json {
        json_line(&serde_json::json!({
            "event": event, "worker": options.worker_id, "projection": projection.name.as_str(),
            "epoch": lease.epoch, "error": text,
        }));
    } else if !options.quiet {
        eprintln!(
            "{} {event} {} (epoch {}): {text}",
            options.worker_id, projection.name, lease.epoch
        );
    }
}

/// Restores each claimed projection missing here from the newest snapshot
/// that fits (a projection taken over from a worker on another machine), so
/// it is caught up from the snapshot's checkpoint, not from the start.
fn seed_claimed(
    store: &PostgresEventStore,
    dir: &ProjectionDir,
    selected: &[&SqlProjection],
    from: &dyn projectionist_runner::snapshot::SnapshotLocation,
    options: &WorkerOptions<'_>,
) {
    for projection in selected {
        let name = projection.name.as_str();
        let seeded = projectionist_runner::snapshot::seed_logged::<serde_json::Value>(
            dir.path(),
            name,
            from,
            Some(&projection.hash),
            store,
        );
        match seeded {
            Ok(Some(projectionist_runner::snapshot::Seeded {
                restored: Some(manifest),
                ..
            })) if options.json => json_line(&serde_json::json!({
                "event": "seeded", "projection": name, "checkpoint": manifest.checkpoint,
            })),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(projection = name, error = %e, "cannot seed from snapshots; building from the log");
            }
        }
    }
}

fn rebuild_one(
    store: &PostgresEventStore,
    dir: &ProjectionDir,
    projection: &SqlProjection,
    leases: &Leases,
    lease: &Lease,
    options: &WorkerOptions<'_>,
    cancel: &projectionist::CancelToken,
) -> Result<(), Error> {
    let name = projection.name.as_str();
    let live = dir.db(name)?;
    // A built projection keeps serving while it is rebuilt beside it.
    let serving = live.with_connection(|conn| SqliteCheckpoint::load_in(conn, name))? > 0;
    let db = if serving {
        dir.discard_shadow(name)?;
        dir.shadow(name)?
    } else {
        live
    };
    let mut handler = SqlHandler::new(projection);
    // Renewing the lease is the fence: it succeeds only while this worker still
    // holds the projection at this epoch.
    let guard = |_: &str| fence(leases, lease);
    let rebuild_options = RebuildOptions {
        batch_size: options.batch_size,
        commit_interval: projectionist::limits::COMMIT_INTERVAL_DEFAULT,
        progress: None,
        cancel: Some(cancel),
        step_hook: None,
        commit_guard: Some(&guard),
    };
    let target = ProjectionTarget {
        db: &db,
        handler: &mut handler as &mut dyn projectionist::Handler<crate::store::Payload>,
        checkpoint: CheckpointLocation::InFile,
        consumer_id: projection.name.as_str(),
    };
    let mut results = rebuild_shared(store, vec![target], &rebuild_options);
    results.pop().expect("one result")?;
    if serving {
        publish_fenced(dir, projection, leases, lease, options)?;
    }
    Ok(())
}

/// Publishes a projection's finished shadow, only while this worker still
/// holds its lease (renewed right before, as every commit is).
fn publish_fenced(
    dir: &ProjectionDir,
    projection: &SqlProjection,
    leases: &Leases,
    lease: &Lease,
    options: &WorkerOptions<'_>,
) -> Result<(), Error> {
    let name = projection.name.as_str();
    fence(leases, lease).map_err(|source| Error::Fenced {
        name: name.to_owned(),
        committed: 0,
        source,
    })?;
    let published = dir.publish(name, name, &PublishOptions::default())?;
    tracing::info!(
        worker = options.worker_id,
        projection = name,
        epoch = lease.epoch,
        checkpoint = published.checkpoint,
        lock_held_ms = published.lock_held.as_secs_f64() * 1e3,
        "published its rebuild"
    );
    Ok(())
}

/// The commit guard: renews the lease, which succeeds only while this worker
/// still holds the projection at this epoch.
fn fence(leases: &Leases, lease: &Lease) -> Result<(), projectionist::BoxError> {
    match leases.renew(lease) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!("lease epoch {} was lost", lease.epoch).into()),
        Err(e) => Err(Box::new(e)),
    }
}

fn say(
    options: &WorkerOptions<'_>,
    event: &str,
    projection: &SqlProjection,
    lease: &Lease,
    error: Option<&Error>,
) {
    if options.json {
        json_line(&serde_json::json!({
            "event": event, "worker": options.worker_id, "projection": projection.name.as_str(),
            "epoch": lease.epoch, "error": error.map(ToString::to_string),
        }));
    } else if !options.quiet {
        let why = error.map(|e| format!(": {e}")).unwrap_or_default();
        eprintln!(
            "{} {event} {} (epoch {}){why}",
            options.worker_id, projection.name, lease.epoch
        );
    }
}

/// Checks the worker's arguments.
pub fn check_url(url: &str) -> anyhow::Result<()> {
    if crate::store::Store::is_postgres(url) {
        Ok(())
    } else {
        Err(anyhow::anyhow!("worker needs --store postgres://...; an SQLite store has one machine and needs no coordination"))
            .context("worker")
    }
}

pub(crate) fn run_worker(
    cli: &Cli,
    worker_id: Option<&str>,
    lease_ms: u64,
    exit_when_done: bool,
    seed_from: Option<&std::path::Path>,
) -> Result<(), Failure> {
    let config = load_config(cli, false)?;
    let url = store_spec(cli, false);
    check_url(&url).map_err(fail(EXIT_CONFIG))?;
    if !(100..=600_000).contains(&lease_ms) {
        return Err(fail(EXIT_CONFIG)(anyhow!(
            "--lease-ms {lease_ms} is out of range: 100 to 600000"
        )));
    }
    let default_id = format!("worker-{}", std::process::id());
    let dir = open_dir(cli, false)?;
    let cancel = CancelToken::new();
    let handler_token = cancel.clone();
    let _ = ctrlc::set_handler(move || handler_token.cancel());
    let seed_from = seed_from.map(crate::snapshot::location).transpose()?;
    let options = WorkerOptions {
        seed_from: seed_from.as_deref(),
        url: &url,
        worker_id: worker_id.unwrap_or(&default_id),
        lease: std::time::Duration::from_millis(lease_ms),
        batch_size: cli.batch_size,
        exit_when_done,
        json: cli.json,
        quiet: cli.quiet,
    };
    if !exit_when_done {
        // A following worker stopped by a signal has committed its batches and
        // released its leases: a clean stop.
        return run_following(cli, &config, &dir, &options, &cancel).map_err(fail(EXIT_PROJECTION));
    }
    run(&config, &dir, &options, &cancel).map_err(fail(EXIT_PROJECTION))?;
    if cancel.is_cancelled() {
        return Err(fail(EXIT_CANCELLED)(anyhow!(
            "worker interrupted; its leases expire and other workers take over"
        )));
    }
    Ok(())
}
