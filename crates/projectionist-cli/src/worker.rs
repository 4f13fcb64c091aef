//! `projectionist worker`: one of several processes sharing the projections of a
//! PostgreSQL store. Each projection is claimed through a lease (see
//! `projectionist_postgres::Leases`), rebuilt into this worker's own `--dir`, and
//! marked done; every commit first renews the lease, so a worker that lost its
//! lease (it hung, or was paused past the lease) commits nothing.

use std::time::Duration;

use anyhow::Context;
use projectionist::{
    CheckpointLocation, Error, ProjectionDir, ProjectionTarget, RebuildOptions, rebuild_shared,
};
use projectionist_postgres::{Lease, Leases, PostgresEventStore};
use projectionist_sqlview::{ProjectionsConfig, SqlHandler, SqlProjection};

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
}

/// Runs the worker loop: claim a free projection, rebuild it, mark it done;
/// until cancelled, or (with `exit_when_done`) until every projection is done.
pub fn run(
    config: &ProjectionsConfig,
    dir: &ProjectionDir,
    options: &WorkerOptions<'_>,
    cancel: &projectionist::CancelToken,
) -> anyhow::Result<()> {
    let store = match &config.source {
        Some(mapping) => PostgresEventStore::connect_mapped(options.url, mapping)?,
        None => PostgresEventStore::connect(options.url)?,
    };
    let leases = Leases::connect(options.url, options.worker_id, options.lease)?;
    leases.init()?;
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

fn rebuild_one(
    store: &PostgresEventStore,
    dir: &ProjectionDir,
    projection: &SqlProjection,
    leases: &Leases,
    lease: &Lease,
    options: &WorkerOptions<'_>,
    cancel: &projectionist::CancelToken,
) -> Result<(), Error> {
    let db = dir.db(projection.name.as_str())?;
    let mut handler = SqlHandler::new(projection);
    // Renewing the lease is the fence: it succeeds only while this worker still
    // holds the projection at this epoch.
    let guard = |_: &str| -> Result<(), projectionist::BoxError> {
        match leases.renew(lease) {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("lease epoch {} was lost", lease.epoch).into()),
            Err(e) => Err(Box::new(e)),
        }
    };
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
        handler: &mut handler,
        checkpoint: CheckpointLocation::InFile,
        consumer_id: projection.name.as_str(),
    };
    let mut results = rebuild_shared(store, vec![target], &rebuild_options);
    results.pop().expect("one result").map(|_| ())
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
    let options = WorkerOptions {
        url: &url,
        worker_id: worker_id.unwrap_or(&default_id),
        lease: std::time::Duration::from_millis(lease_ms),
        batch_size: cli.batch_size,
        exit_when_done,
        json: cli.json,
        quiet: cli.quiet,
    };
    run(&config, &dir, &options, &cancel).map_err(fail(EXIT_PROJECTION))?;
    if cancel.is_cancelled() {
        return Err(fail(EXIT_CANCELLED)(anyhow!(
            "worker interrupted; its leases expire and other workers take over"
        )));
    }
    Ok(())
}
