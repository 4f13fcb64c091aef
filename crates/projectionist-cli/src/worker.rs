//! `projectionist worker`: one of several processes sharing the projections of a
//! PostgreSQL store. Each projection is claimed through a lease (see
//! `projectionist_postgres::Leases`), rebuilt into this worker's own `--dir`, and
//! marked done; every commit first renews the lease, so a worker that lost its
//! lease (it hung, or was paused past the lease) commits nothing.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use projectionist::{Error, ProjectionDir};
use projectionist_postgres::{Lease, LeaseCoordinator, LeaseEvent, Leases, PostgresEventStore};
use projectionist_runner::{Supervised, Supervisor};
use projectionist_sqlview::{ProjectionsConfig, SqlProjection};

use crate::ui::json_line;
use anyhow::anyhow;
use projectionist::CancelToken;

use crate::app::{
    EXIT_CANCELLED, EXIT_CONFIG, EXIT_PROJECTION, Failure, fail, load_config, open_dir, store_spec,
};
use crate::args::Cli;

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

/// The store (through the config's `[source]`, if any), and where the lease
/// table lives.
fn connect_store(
    config: &ProjectionsConfig,
    options: &WorkerOptions<'_>,
) -> anyhow::Result<(PostgresEventStore, String)> {
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
    Ok((store, lease_url))
}

/// The store and the lease table.
fn connect(
    config: &ProjectionsConfig,
    options: &WorkerOptions<'_>,
) -> anyhow::Result<(PostgresEventStore, Leases)> {
    let (store, lease_url) = connect_store(config, options)?;
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

/// The longest wait between two attempts to reach PostgreSQL again: a server
/// that accepts connections again is used within a second.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Runs a following worker: the runner's supervisor (shared reads) keeps the
/// projections this worker holds current; the PostgreSQL crate's
/// `LeaseCoordinator` decides which those are (an even share among the live
/// workers, orphans claimed, extras handed back, lost leases let go of) and
/// fences every commit and publish. Until cancelled; then the leases and the
/// heartbeat are given up.
pub fn run_following(
    config: &ProjectionsConfig,
    dir: &ProjectionDir,
    options: &WorkerOptions<'_>,
    cancel: &CancelToken,
) -> anyhow::Result<()> {
    let (store, lease_url) = connect_store(config, options)?;
    let store = Arc::new(store);
    let wanted: Vec<String> = config
        .projections
        .iter()
        .map(|p| p.name.to_string())
        .collect();
    let coordinator = Arc::new(LeaseCoordinator::connect(
        &lease_url,
        options.worker_id,
        options.lease,
        wanted,
    )?);
    let interval = coordinator.interval(KEEPER_INTERVAL_MAX);
    let (fence, outage) = (Arc::clone(&coordinator), Arc::clone(&store));
    let reader: Arc<dyn projectionist::GlobalReader<crate::store::Payload>> = store.clone();
    let supervisor = Supervisor::builder(reader, dir.path())?
        .share_reads(true)
        .batch_size(options.batch_size)
        .commit_guard(move |name| fence.fence(name))
        .outage(move || outage.outage().map(|o| o.error))
        .start()?;
    let make = |name: &str| {
        let projection = config.get(name)?;
        if let Some(from) = options.seed_from {
            seed_claimed(&store, dir, &[projection], from, options);
        }
        Some(Supervised::sql(projection.clone()))
    };
    let mut backoff = interval;
    let mut outage = StoreOutage::default();
    while !cancel.is_cancelled() {
        let wait = match coordinator.step(&supervisor, &make) {
            Ok(events) => {
                backoff = interval;
                for event in events {
                    say_lease(options, &event);
                }
                interval
            }
            Err(error) => {
                // The server went away (restart, failover, a killed
                // connection): the leases held stay this worker's if it is
                // back within the lease.
                let text = error.to_string();
                tracing::warn!(worker = options.worker_id, error = %text, retry_in_ms = backoff.as_millis(), "PostgreSQL unreachable; reconnecting");
                if options.json {
                    json_line(&serde_json::json!({
                        "event": "reconnecting", "worker": options.worker_id, "error": text,
                        "retry_in_ms": backoff.as_millis(),
                    }));
                }
                let wait = backoff;
                backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
                wait
            }
        };
        let until = std::time::Instant::now() + wait;
        while !cancel.is_cancelled() && std::time::Instant::now() < until {
            outage.look(&store, options);
            std::thread::sleep(OUTAGE_LOOK_INTERVAL);
        }
    }
    // A reconnect shortly before the stop is said too.
    outage.look(&store, options);
    if let Some(event) = coordinator.take_reconnected() {
        say_lease(options, &event);
    }
    let left = coordinator.leave(&supervisor);
    supervisor.shutdown();
    left?;
    Ok(())
}

/// How often a following worker looks whether its store lost its
/// connection (no query: the store's own record), to say so.
const OUTAGE_LOOK_INTERVAL: Duration = Duration::from_millis(50);

/// Says when the store's own connection was lost and made again (the
/// supervisor reads on once it is back), as a lost lease connection is.
#[derive(Default)]
struct StoreOutage {
    announced: bool,
    reconnects_seen: u64,
}

impl StoreOutage {
    fn look(&mut self, store: &PostgresEventStore, options: &WorkerOptions<'_>) {
        let outage = store.outage();
        let reconnects = store.reconnects();
        if (outage.is_some() && !self.announced) || reconnects > self.reconnects_seen {
            let error = outage
                .as_ref()
                .map_or_else(|| "the connection was lost".to_owned(), |o| o.error.clone());
            say_lease(options, &LeaseEvent::reconnected(error));
        }
        self.announced = outage.is_some();
        self.reconnects_seen = reconnects;
    }
}

/// One change of the leases held, as a line.
fn say_lease(options: &WorkerOptions<'_>, event: &LeaseEvent) {
    let (name, lease, error) = match event {
        LeaseEvent::Claimed(lease) => ("claimed", lease, None),
        LeaseEvent::Released(lease) => ("released", lease, None),
        LeaseEvent::Lost(lease) => (
            "fenced",
            lease,
            Some(format!("lease epoch {} was lost", lease.epoch)),
        ),
        LeaseEvent::Failed { lease, error } => ("failed", lease, Some(error.clone())),
        LeaseEvent::Reconnected { error } => {
            tracing::warn!(worker = options.worker_id, error = %error, "the lease table's connection was lost; reconnected");
            if options.json {
                json_line(&serde_json::json!({
                    "event": "reconnecting", "worker": options.worker_id, "error": error,
                }));
            }
            return;
        }
        _ => return,
    };
    match &error {
        Some(error) => {
            tracing::warn!(worker = options.worker_id, projection = %lease.projection, epoch = lease.epoch, error = %error, "{name}");
        }
        None => {
            tracing::info!(worker = options.worker_id, projection = %lease.projection, epoch = lease.epoch, "{name}");
        }
    }
    if options.json {
        json_line(&serde_json::json!({
            "event": name, "worker": options.worker_id, "projection": lease.projection,
            "epoch": lease.epoch, "error": error,
        }));
    } else if !options.quiet {
        let why = error.map(|e| format!(": {e}")).unwrap_or_default();
        eprintln!(
            "{} {name} {} (epoch {}){why}",
            options.worker_id, lease.projection, lease.epoch
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

/// Builds `projection` anew under `lease` (in its shadow, then published,
/// when this worker's copy serves a version), every commit and the publish
/// fenced by the lease.
fn rebuild_one(
    store: &PostgresEventStore,
    dir: &ProjectionDir,
    projection: &SqlProjection,
    leases: &Leases,
    lease: &Lease,
    options: &WorkerOptions<'_>,
    cancel: &projectionist::CancelToken,
) -> Result<(), Error> {
    let mut supervised = Supervised::<crate::store::Payload>::sql(projection.clone());
    let guard = |_: &str| fence(leases, lease);
    let published = projectionist_runner::rebuild_once(
        dir,
        store,
        &mut supervised,
        options.batch_size,
        Some(&guard),
        cancel,
    )?;
    if let Some(published) = published {
        tracing::info!(
            worker = options.worker_id,
            projection = %projection.name,
            epoch = lease.epoch,
            checkpoint = published.checkpoint,
            lock_held_ms = published.lock_held.as_secs_f64() * 1e3,
            "published its rebuild"
        );
    }
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
        return run_following(&config, &dir, &options, &cancel).map_err(fail(EXIT_PROJECTION));
    }
    run(&config, &dir, &options, &cancel).map_err(fail(EXIT_PROJECTION))?;
    if cancel.is_cancelled() {
        return Err(fail(EXIT_CANCELLED)(anyhow!(
            "worker interrupted; its leases expire and other workers take over"
        )));
    }
    Ok(())
}
