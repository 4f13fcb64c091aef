//! `follow`: the command line of the runner's supervisor. It keeps the
//! selected projections current as the log grows, until SIGINT or SIGTERM;
//! then every projection finishes the batch in hand, commits, and it exits 0.
//!
//! The run policy (catching up, following from one shared read, a changed
//! definition built in its shadow and published, requests from other
//! processes, retries with backoff, reconnects, stalls, late events) is the
//! supervisor's (`projectionist_runner::Supervisor` with shared reads). What
//! lives here is the glue: which projections (the config, `NAME...`), a
//! changed config file handed on as `add` / `replace` / `remove`, and what is
//! shown: on a terminal, one line per projection (a progress bar while it
//! catches up, then its state, checkpoint, lag and events/s); with `--json`,
//! a `state` line on every change of a projection's state and a `status`
//! line per projection every [`STATUS_INTERVAL`]; metrics and `/health`;
//! logs (through `tracing`, on stderr) for starts, state changes, failures
//! and the stop, never one per event.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use projectionist::{CancelToken, GlobalReader, Progress, ProjectionDir, RebuildResult};
use projectionist_runner::{Event, State, Status, Supervised, Supervisor};
use projectionist_sqlview::{ProjectionsConfig, SqlProjection};

use crate::app::{
    EXIT_CONFIG, EXIT_PROJECTION, EXIT_STORE, Failure, fail, load_config, open_dir, open_store,
    select,
};
use crate::args::{Cli, OnLateEvent};
use crate::metrics::{Metrics, Observed, Server};
use crate::store::{Payload, Store};
use crate::ui;

/// How often `--json` prints a `status` line per projection (and the terminal
/// line's events/s is measured): often enough for a dashboard, rare enough
/// that a log of a week-long run stays small.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// How often the terminal lines are redrawn while following.
const REDRAW_INTERVAL: Duration = Duration::from_millis(500);

/// How often `follow` reads its config file to notice a change: soon enough
/// for someone who just saved it, rare enough to cost nothing while idle (one
/// small read per interval).
const CONFIG_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// How often the follower looks whether its store is reconnecting (no query:
/// the store's own record), to say so.
const OUTAGE_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// `follow`'s own options.
pub(crate) struct FollowOptions<'a> {
    pub(crate) metrics_addr: Option<&'a str>,
    pub(crate) max_lag: u64,
    pub(crate) max_wait: Duration,
    pub(crate) stall_after: Duration,
    pub(crate) late_window: Duration,
    pub(crate) on_late_event: OnLateEvent,
    pub(crate) snapshots: Option<Snapshots<'a>>,
}

/// `--snapshot-to`, `--snapshot-every`, `--snapshot-keep`.
#[derive(Clone, Copy)]
pub(crate) struct Snapshots<'a> {
    pub(crate) to: &'a Path,
    pub(crate) every: Duration,
    pub(crate) keep: usize,
}

/// The store as the supervisor reads it: every read through the CLI's store.
struct Reader(Arc<Store>);

impl GlobalReader<Payload> for Reader {
    fn read_after(
        &self,
        after: u64,
        limit: u32,
    ) -> projectionist::Result<Vec<projectionist::GlobalEvent<Payload>>> {
        self.0.reader().read_after(after, limit)
    }
    fn read_after_types(
        &self,
        after: u64,
        limit: u32,
        event_types: &[String],
    ) -> projectionist::Result<projectionist::TypedBatch<Payload>> {
        self.0.reader().read_after_types(after, limit, event_types)
    }
    fn head(&self) -> projectionist::Result<u64> {
        self.0.reader().head()
    }
    fn change_token(&self) -> projectionist::Result<Option<u64>> {
        self.0.reader().change_token()
    }
    fn wait_for_hint(&self, timeout: Duration) -> projectionist::Result<()> {
        self.0.reader().wait_for_hint(timeout)
    }
    fn poll_interval(&self) -> Duration {
        self.0.reader().poll_interval()
    }
    fn hole_wait(&self) -> Option<projectionist::HoleWait> {
        self.0.reader().hole_wait()
    }
    fn event_types(&self) -> projectionist::Result<Option<Vec<String>>> {
        self.0.reader().event_types()
    }
}

pub(crate) fn run_follow(
    cli: &Cli,
    names: &[String],
    follow_options: &FollowOptions<'_>,
) -> Result<(), Failure> {
    // First of all: SIGINT and SIGTERM (and SIGHUP) stop at the next batch
    // boundary, even while the follower is still starting.
    let stop = CancelToken::new();
    let token = stop.clone();
    let _ = ctrlc::set_handler(move || token.cancel());
    let config_path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("projectionist.toml"));
    let config_bytes = std::fs::read(&config_path).unwrap_or_default();
    let config = load_config(cli, false)?;
    let selected = select(&config, names)?;
    let dir = open_dir(cli, false)?;
    let metrics = Arc::new(Metrics::new(
        follow_options.max_lag,
        follow_options.max_wait,
    ));
    let _server = match follow_options.metrics_addr {
        Some(addr) => {
            let server = Server::start(addr, Arc::clone(&metrics)).map_err(fail(EXIT_CONFIG))?;
            tracing::info!(addr, "serving /metrics and /health");
            Some(server)
        }
        None => None,
    };
    let metrics = follow_options.metrics_addr.map(|_| metrics);
    // Periodic snapshots, beside the run (read-only copies of the files).
    let snapshotting = match follow_options.snapshots {
        Some(snapshots) => Some(start_snapshots(
            cli,
            &config,
            names,
            dir.path(),
            snapshots,
            metrics.clone(),
            &stop,
        )?),
        None => None,
    };
    let _snapshotting = snapshotting.map(StopOnDrop::new);
    let store = Arc::new(
        open_store(cli, false, &config)?.with_late_event_window(follow_options.late_window),
    );
    crate::app::warn_unseen_types(cli, store.reader(), &selected);
    let head = store
        .reader()
        .head()
        .map_err(|e| fail(EXIT_STORE)(e.into()))?;
    // Held by another process (a second follower): refused, and the other's
    // registration and files left as they are.
    let locked = held_elsewhere(&dir, &selected);
    drop(dir);
    let followed: Vec<&SqlProjection> = selected
        .iter()
        .copied()
        .filter(|p| !locked.iter().any(|(name, _)| name == p.name.as_str()))
        .collect();
    let started = Instant::now();
    let live = Arc::new(Live::new(
        cli,
        followed.iter().map(|p| p.name.as_str()),
        head,
        metrics.clone(),
    ));
    let mut outcome = Ok(Vec::new());
    if !followed.is_empty() {
        let supervisor = supervise(cli, &store, &live, follow_options, &followed)?;
        outcome = follow_until_stopped(
            cli,
            &supervisor,
            &live,
            &store,
            &Watched {
                path: &config_path,
                names,
                bytes: config_bytes,
                config,
            },
            &stop,
        );
        let last = supervisor.shutdown();
        if let Ok(states) = &mut outcome {
            *states = last;
        }
    }
    live.finish();
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        "following stopped"
    );
    report(cli, &outcome?, &locked, head, started.elapsed())
}

/// The projections of `selected` another process holds, with the error
/// naming it.
fn held_elsewhere(dir: &ProjectionDir, selected: &[&SqlProjection]) -> Vec<(String, String)> {
    let mut locked = Vec::new();
    for projection in selected {
        let name = projection.name.as_str();
        match dir.db(name) {
            Err(e @ projectionist::Error::Locked { .. }) => {
                tracing::error!(projection = name, error = %ui::escape_controls(&e.to_string()), "held by another process: not followed here");
                locked.push((name.to_owned(), e.to_string()));
            }
            // Let go of: the supervisor takes it.
            Ok(_) => {
                let _ = dir.release(name);
            }
            // The supervisor says why, and tries again with backoff.
            Err(_) => {}
        }
    }
    locked
}

/// Starts the supervisor of `followed`.
fn supervise(
    cli: &Cli,
    store: &Arc<Store>,
    live: &Arc<Live>,
    options: &FollowOptions<'_>,
    followed: &[&SqlProjection],
) -> Result<Supervisor<Payload>, Failure> {
    let dir = cli
        .dir
        .clone()
        .unwrap_or_else(|| crate::app::default_path(false, "projections"));
    let reader: Arc<dyn GlobalReader<Payload>> = Arc::new(Reader(Arc::clone(store)));
    let (shown, outage, late) = (Arc::clone(live), Arc::clone(store), Arc::clone(store));
    let action = match options.on_late_event {
        OnLateEvent::Rebuild => projectionist_runner::OnLateEvent::Rebuild,
        OnLateEvent::Report => projectionist_runner::OnLateEvent::Report,
    };
    let mut builder = Supervisor::builder(reader, dir)
        .map_err(|e| fail(EXIT_PROJECTION)(e.into()))?
        .share_reads(true)
        .batch_size(cli.batch_size)
        .stall_after(options.stall_after)
        .on_event(move |event| shown.event(event))
        .outage(move || outage.outage().map(|o| o.error));
    if options.late_window > Duration::ZERO {
        builder = builder.late_events(
            move || {
                late.late_events()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|e| (e.sequence, e.event_type))
                    .collect()
            },
            action,
        );
    }
    for projection in followed {
        tracing::info!(projection = %projection.name, "following starts");
        builder = builder.projection(Supervised::sql((*projection).clone()));
    }
    builder.start().map_err(|e| match e {
        projectionist_runner::Error::Core(e) => fail(EXIT_CONFIG)(e.into()),
        other => fail(EXIT_PROJECTION)(other.into()),
    })
}

/// The config file as the follower watches it.
struct Watched<'a> {
    path: &'a Path,
    names: &'a [String],
    /// Its content as last loaded.
    bytes: Vec<u8>,
    config: ProjectionsConfig,
}

/// Until the stop: redraws, prints the periodic status, says when the store
/// reconnects, and hands a changed config on to the supervisor. Returns the
/// last states.
fn follow_until_stopped(
    cli: &Cli,
    supervisor: &Supervisor<Payload>,
    live: &Live,
    store: &Store,
    watched: &Watched<'_>,
    stop: &CancelToken,
) -> Result<Vec<Status>, Failure> {
    let mut watched = Watched {
        path: watched.path,
        names: watched.names,
        bytes: watched.bytes.clone(),
        config: watched.config.clone(),
    };
    let mut outage = OutageWatch::default();
    let (mut redrawn, mut told, mut read) = (Instant::now(), Instant::now(), Instant::now());
    while !stop.is_cancelled() {
        std::thread::sleep(OUTAGE_CHECK_INTERVAL);
        outage.look(cli, store, live);
        if redrawn.elapsed() >= REDRAW_INTERVAL {
            redrawn = Instant::now();
            let status_due = told.elapsed() >= STATUS_INTERVAL;
            live.tick(status_due.then(|| told.elapsed()));
            if status_due {
                told = Instant::now();
            }
        }
        if read.elapsed() >= CONFIG_POLL_INTERVAL {
            read = Instant::now();
            reload(cli, supervisor, live, store, &mut watched);
        }
    }
    Ok(supervisor.status())
}

/// Says when the store's connection is lost and when it is back.
#[derive(Default)]
struct OutageWatch {
    announced: Option<String>,
    reconnects_seen: u64,
}

impl OutageWatch {
    fn look(&mut self, cli: &Cli, store: &Store, live: &Live) {
        let reconnects = store.reconnects();
        match store.outage() {
            Some(outage) if self.announced.is_none() => {
                reconnecting(cli, live, &outage.error, true);
                self.announced = Some(outage.error);
            }
            Some(_) => {}
            None if reconnects != self.reconnects_seen || self.announced.is_some() => {
                // An outage shorter than a look: said after the fact.
                let error = self
                    .announced
                    .take()
                    .unwrap_or_else(|| "the connection was lost".to_owned());
                if reconnects > self.reconnects_seen {
                    reconnecting(cli, live, &error, true);
                }
                reconnecting(cli, live, &error, false);
                self.reconnects_seen = reconnects;
            }
            None => {}
        }
    }
}

/// Says that the store lost its connection and is making it again (`down`),
/// or has made it again.
fn reconnecting(cli: &Cli, live: &Live, error: &str, down: bool) {
    let error = ui::escape_controls(error);
    if down {
        tracing::warn!(error = %error, "the event store's connection was lost; reconnecting");
    } else {
        tracing::info!("the event store's connection is back");
    }
    if cli.json {
        let event = if down { "reconnecting" } else { "reconnected" };
        ui::json_line(&serde_json::json!({"event": event, "error": error}));
    }
    if let Some(metrics) = &live.metrics {
        metrics.set_reconnecting(down);
    }
}

/// When the config file's content changed and it loads, hands the changes
/// on: a new projection is added, a changed one replaced (rebuilt in its
/// shadow when its definition changed), a removed one let go of. A config
/// that does not load is logged; the follower goes on under what it has.
fn reload(
    cli: &Cli,
    supervisor: &Supervisor<Payload>,
    live: &Live,
    store: &Store,
    watched: &mut Watched<'_>,
) {
    let Ok(bytes) = std::fs::read(watched.path) else {
        return;
    };
    if bytes == watched.bytes {
        return;
    }
    watched.bytes.clone_from(&bytes);
    let loaded = load_config(cli, false).and_then(|config| {
        let names: Vec<String> = select(&config, watched.names)?
            .iter()
            .map(|p| p.name.to_string())
            .collect();
        Ok((config, names))
    });
    let (config, names) = match loaded {
        Ok(loaded) => loaded,
        Err(failure) => {
            let text = ui::escape_controls(&crate::app::error_text(&failure.error));
            tracing::error!(error = %text, "the config changed but does not load; following on under the definitions loaded before");
            return;
        }
    };
    tracing::info!("the config changed: following under its definitions");
    if cli.json {
        ui::json_line(&serde_json::json!({"event": "config_reloaded"}));
    }
    let before: BTreeMap<String, &SqlProjection> = watched
        .config
        .projections
        .iter()
        .filter(|p| supervisor.status_of(p.name.as_str()).is_ok())
        .map(|p| (p.name.to_string(), p))
        .collect();
    for name in &names {
        let projection = config.get(name).expect("selected from this config");
        let changed = match before.get(name) {
            None => {
                live.add(name);
                supervisor.add(Supervised::sql(projection.clone()))
            }
            Some(old) if differs(old, projection) => {
                supervisor.replace(Supervised::sql(projection.clone()))
            }
            Some(_) => Ok(()),
        };
        if let Err(e) = changed {
            tracing::error!(projection = %name, error = %ui::escape_controls(&e.to_string()), "cannot follow it under the changed config");
        }
    }
    for name in before.keys().filter(|name| !names.contains(name)) {
        match supervisor.remove(name) {
            Ok(_) => {
                tracing::info!(projection = %name, "no longer in the config: no longer followed");
                live.remove(name);
            }
            Err(e) => {
                tracing::error!(projection = %name, error = %ui::escape_controls(&e.to_string()), "cannot stop following it");
            }
        }
    }
    let selected: Vec<&SqlProjection> = names.iter().filter_map(|n| config.get(n)).collect();
    crate::app::warn_unseen_types(cli, store.reader(), &selected);
    watched.config = config;
}

/// Whether a projection's declaration changed in anything the run uses.
fn differs(old: &SqlProjection, new: &SqlProjection) -> bool {
    old.hash != new.hash
        || old.deferred_indexes != new.deferred_indexes
        || old.on_error != new.on_error
}

/// The last word: one result line per projection that stopped cleanly; exit
/// 4 naming every one that failed or was held by another process.
fn report(
    cli: &Cli,
    states: &[Status],
    locked: &[(String, String)],
    head: u64,
    elapsed: Duration,
) -> Result<(), Failure> {
    let mut failed: Vec<String> = locked.iter().map(|(_, e)| e.clone()).collect();
    for status in states {
        match &status.state {
            State::Failed { error, .. } => {
                if cli.json {
                    ui::json_line(&serde_json::json!({
                        "event": "error", "projection": status.name, "error": error,
                        "checkpoint": status.checkpoint,
                    }));
                }
                failed.push(format!(
                    "projection {}: {} (committed through sequence {})",
                    status.name,
                    ui::escape_controls(error),
                    status.checkpoint
                ));
            }
            _ => {
                let mut result = RebuildResult::new(status.name.clone());
                result.processed = status.processed;
                result.checkpoint = status.checkpoint;
                result.total = status.head.max(head);
                result.elapsed = elapsed;
                result.dead_letters = status.dead_letters;
                ui::result_line(cli.json, cli.quiet, &result);
            }
        }
    }
    if failed.is_empty() {
        return Ok(());
    }
    Err(fail(EXIT_PROJECTION)(anyhow!("{}", failed.join("\n"))))
}

/// One projection as the display knows it.
struct Row {
    status: Status,
    /// Events processed as last reported (for the metrics' counter).
    processed: u64,
    /// Where its run started (for the bar).
    started_from: u64,
    /// `processed` at the last status line, for events/s.
    processed_at_tick: u64,
    rate: f64,
}

impl Row {
    fn new(name: &str, head: u64) -> Self {
        Row {
            status: Status::new(name, head),
            processed: 0,
            started_from: 0,
            processed_at_tick: 0,
            rate: 0.0,
        }
    }

    /// For `--json`: the hole reads are held at, and for how long.
    fn waiting_json(&self) -> serde_json::Value {
        match &self.status.state {
            State::Waiting(projectionist_runner::WaitReason::Hole { sequence, since }) => {
                serde_json::json!({
                    "reason": "hole", "sequence": sequence,
                    "seconds": since.elapsed().as_secs_f64(),
                })
            }
            _ => serde_json::Value::Null,
        }
    }
}

/// The follower's display: bars and lines on a terminal, JSON lines, logs,
/// metrics. Fed by the supervisor's events (on its threads) and a tick.
struct Live {
    json: bool,
    quiet: bool,
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
    rows: Mutex<BTreeMap<String, Row>>,
    metrics: Option<Arc<Metrics>>,
    head: u64,
}

impl Live {
    fn new<'a>(
        cli: &Cli,
        names: impl Iterator<Item = &'a str>,
        head: u64,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        let target = if cli.json || cli.quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let live = Live {
            json: cli.json,
            quiet: cli.quiet,
            multi: MultiProgress::with_draw_target(target),
            bars: Mutex::new(HashMap::new()),
            rows: Mutex::new(BTreeMap::new()),
            metrics,
            head,
        };
        for name in names {
            live.add(name);
        }
        live
    }

    fn add(&self, name: &str) {
        let bar = self.multi.add(ProgressBar::new(self.head));
        bar.set_style(catching_up_style());
        bar.set_prefix(name.to_owned());
        lock(&self.bars).insert(name.to_owned(), bar);
        lock(&self.rows).insert(name.to_owned(), Row::new(name, self.head));
    }

    fn remove(&self, name: &str) {
        if let Some(bar) = lock(&self.bars).remove(name) {
            bar.finish_and_clear();
            self.multi.remove(&bar);
        }
        lock(&self.rows).remove(name);
    }

    /// One event of the supervisor.
    fn event(&self, event: &Event) {
        match event {
            Event::State(status) => self.state(status),
            Event::Progress(p) => self.progress(p),
            Event::Published(p) => crate::replay::published_line_as(self.json, self.quiet, p),
            Event::RolledBack(p) if self.json => {
                ui::json_line(&serde_json::json!({
                    "event": "rolled_back", "projection": p.name, "checkpoint": p.checkpoint,
                }));
            }
            Event::LateEvent {
                sequence,
                event_type,
                projections,
                rebuilding,
            } => {
                if self.json {
                    ui::json_line(&serde_json::json!({
                        "event": "late_event", "sequence": sequence,
                        "event_type": event_type, "projections": projections,
                        "action": if *rebuilding { "rebuild" } else { "report" },
                    }));
                }
                if let Some(metrics) = &self.metrics {
                    for name in projections {
                        metrics.late_event(name);
                    }
                }
            }
            _ => {}
        }
    }

    /// A projection's state changed: logged (by the supervisor), announced
    /// as a `state` line, its metrics and line updated.
    fn state(&self, status: &Status) {
        let mut rows = lock(&self.rows);
        let Some(row) = rows.get_mut(&status.name) else {
            return;
        };
        row.status = status.clone();
        if let Some(metrics) = &self.metrics {
            let stalled = match &status.state {
                State::Stalled { reason } => Some(reason.clone()),
                _ => None,
            };
            metrics.set_stalled(&status.name, stalled);
            if let State::Failed { .. } = status.state {
                metrics.observe(&Observed {
                    name: &status.name,
                    checkpoint: status.checkpoint,
                    head: status.head,
                    following: false,
                    failed: true,
                    processed: 0,
                    committed: false,
                    batch_latency: None,
                    hole_wait: None,
                    dead_letters: Some(status.dead_letters),
                });
            }
        }
        if self.json {
            ui::json_line(&serde_json::json!({
                "event": "state", "projection": status.name, "state": status.state.name(),
                "checkpoint": status.checkpoint, "head": status.head, "lag": status.lag(),
                "error": status.state.reason(), "waiting": row.waiting_json(),
            }));
        }
        if let Some(bar) = lock(&self.bars).get(&status.name)
            && !matches!(status.state, State::CatchingUp | State::BuildingShadow)
        {
            bar.set_style(following_style());
            bar.set_message(line(row));
        }
    }

    /// The engine's report after a batch.
    fn progress(&self, p: &Progress) {
        let mut rows = lock(&self.rows);
        let Some(row) = rows.get_mut(&p.projection_name) else {
            return;
        };
        if let Some(metrics) = &self.metrics {
            metrics.observe(&Observed {
                name: &p.projection_name,
                checkpoint: p.checkpoint,
                head: p.total.max(p.checkpoint),
                following: p.following,
                failed: p.err.is_some(),
                // A new run (a restart of the shared run, a shadow build)
                // counts from 0 again.
                processed: if p.processed >= row.processed {
                    p.processed - row.processed
                } else {
                    p.processed
                },
                committed: p.checkpoint > row.status.checkpoint,
                batch_latency: p.batch_latency,
                hole_wait: p.hole_wait,
                dead_letters: Some(p.dead_letters),
            });
        }
        if p.processed < row.processed {
            // A new run (a restart of the shared run, a shadow build).
            row.processed_at_tick = 0;
        }
        row.processed = p.processed;
        row.started_from = p.started_from;
        row.status.head = row.status.head.max(p.total).max(p.checkpoint);
        if let Some(bar) = lock(&self.bars).get(&p.projection_name)
            && !p.following
            && !p.done
        {
            bar.set_style(catching_up_style());
            bar.set_length(p.total.max(p.checkpoint).saturating_sub(p.started_from));
            bar.set_position(p.checkpoint.saturating_sub(p.started_from));
        }
    }

    /// Redraws the following lines; with the time since the last one, prints
    /// the periodic `status` lines.
    fn tick(&self, status_due: Option<Duration>) {
        let mut rows = lock(&self.rows);
        let bars = lock(&self.bars);
        for (name, row) in rows.iter_mut() {
            if let Some(elapsed) = status_due {
                let applied = row.processed.saturating_sub(row.processed_at_tick);
                row.rate = applied as f64 / elapsed.as_secs_f64();
                row.processed_at_tick = row.processed;
                if self.json {
                    ui::json_line(&serde_json::json!({
                        "event": "status", "projection": name, "state": row.status.state.name(),
                        "checkpoint": row.status.checkpoint, "head": row.status.head,
                        "lag": row.status.lag(), "events_per_second": row.rate,
                        "waiting": row.waiting_json(),
                    }));
                }
            }
            if let Some(bar) = bars.get(name)
                && !matches!(row.status.state, State::CatchingUp | State::BuildingShadow)
            {
                bar.set_message(line(row));
            }
        }
    }

    fn finish(&self) {
        let _ = self.multi.clear();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A following projection's terminal line.
fn line(row: &Row) -> String {
    let reason = row
        .status
        .state
        .reason()
        .map_or(String::new(), |r| format!("  {}", ui::escape_controls(&r)));
    format!(
        "{:<11} checkpoint {:>10}  lag {:>8}  {:>8.0} events/s{reason}",
        row.status.state.name(),
        row.status.checkpoint,
        row.status.lag(),
        row.rate
    )
}

/// A thread that runs until its token is cancelled; cancelled and joined
/// when dropped.
struct StopOnDrop {
    token: CancelToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StopOnDrop {
    fn new((token, thread): (CancelToken, std::thread::JoinHandle<()>)) -> Self {
        StopOnDrop {
            token,
            thread: Some(thread),
        }
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.token.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts the thread that snapshots the selected projections every
/// `snapshots.every` (the first one after a full interval).
fn start_snapshots(
    cli: &Cli,
    config: &ProjectionsConfig,
    names: &[String],
    dir: &Path,
    snapshots: Snapshots<'_>,
    metrics: Option<Arc<Metrics>>,
    stop: &CancelToken,
) -> Result<(CancelToken, std::thread::JoinHandle<()>), Failure> {
    let store = open_store(cli, false, config)?;
    let identity = projectionist_runner::snapshot::store_identity(store.reader())
        .map_err(|e| fail(EXIT_STORE)(e.into()))?;
    drop(store);
    let selected: Vec<String> = select(config, names)?
        .iter()
        .map(|p| p.name.to_string())
        .collect();
    let to = crate::snapshot::location(snapshots.to)?;
    let (dir, json) = (dir.to_path_buf(), cli.json);
    let (every, keep) = (snapshots.every, snapshots.keep);
    let token = CancelToken::new();
    let (mine, global) = (token.clone(), stop.clone());
    let thread = std::thread::spawn(move || {
        let mut next = Instant::now() + every;
        while !mine.is_cancelled() && !global.is_cancelled() {
            let now = Instant::now();
            if now < next {
                std::thread::sleep(Duration::from_millis(50).min(next - now));
                continue;
            }
            next = now + every;
            // An empty log has nothing to snapshot yet.
            let Some(identity) = identity.as_deref() else {
                continue;
            };
            for name in &selected {
                match projectionist_runner::snapshot::take_snapshot(
                    &dir,
                    name,
                    to.as_ref(),
                    identity,
                    keep,
                ) {
                    Ok(manifest) => {
                        tracing::info!(projection = %name, checkpoint = manifest.checkpoint, bytes = manifest.bytes, "snapshot taken");
                        if json {
                            ui::json_line(&serde_json::json!({
                                "event": "snapshot", "projection": name,
                                "checkpoint": manifest.checkpoint, "bytes": manifest.bytes,
                            }));
                        }
                        if let Some(metrics) = &metrics {
                            metrics.snapshot_taken(name, manifest.bytes);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(projection = %name, error = %ui::escape_controls(&e.to_string()), "cannot take a snapshot; tried again at the next interval");
                    }
                }
            }
        }
    });
    Ok((token, thread))
}

fn catching_up_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{prefix:>16} [{bar:30}] {pos}/{len} events {per_sec} eta {eta} catching up",
    )
    .expect("valid template")
    .progress_chars("=> ")
}

fn following_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>16} {msg}").expect("valid template")
}
