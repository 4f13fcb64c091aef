//! `follow`: bring the selected projections up to date, then keep them current
//! as the log grows, until SIGINT or SIGTERM; then finish the batch in hand,
//! commit, and exit 0.
//!
//! What it shows: on a terminal, one line per projection (a progress bar while
//! it catches up, then checkpoint, lag and events/s); with `--json`, a `state`
//! line on every change of a projection's state and a `status` line per
//! projection every [`STATUS_INTERVAL`]; logs (through `tracing`, on stderr)
//! for starts, state changes, failures and the stop, never one per event.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use projectionist::{
    CancelToken, Progress, ProjectionDb, ProjectionDir, PublishOptions, RebuildOptions,
    RebuildResult, Start, VersionFiles,
};
use projectionist_sqlview::{ProjectionsConfig, SqlHandler, SqlProjection};

use crate::app::{
    EXIT_CONFIG, EXIT_STORE, Failure, command_hint, fail, load_config, open_dir, open_store, select,
};
use crate::args::{Cli, OnLateEvent};
use crate::metrics::{Metrics, Observed, Server};
use crate::replay::{Opened, Plan, Shadows, open_selected, published_line, report, targets};
use crate::ui;

/// How often `--json` prints a `status` line per projection (and the terminal
/// line's events/s is measured): often enough for a dashboard, rare enough
/// that a log of a week-long run stays small.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// How often the terminal lines are redrawn while following.
const REDRAW_INTERVAL: Duration = Duration::from_millis(500);

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

pub(crate) fn run_follow(
    cli: &Cli,
    names: &[String],
    follow_options: &FollowOptions<'_>,
) -> Result<(), Failure> {
    let FollowOptions {
        metrics_addr,
        max_lag,
        max_wait,
        ..
    } = *follow_options;
    // First of all: SIGINT and SIGTERM (and SIGHUP) stop at the next batch
    // boundary, even while the follower is still opening its projections.
    // `stop` ends the follower; each round of it has its own token, which a
    // signal sets too, and which a shadow that has caught up sets to be
    // published between rounds.
    let stop = CancelToken::new();
    let round_stop = Arc::new(RoundTokens::default());
    let (token, round_token) = (stop.clone(), Arc::clone(&round_stop));
    let _ = ctrlc::set_handler(move || {
        token.cancel();
        round_token.cancel_all();
    });
    let config_path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("projectionist.toml"));
    let mut config_bytes = std::fs::read(&config_path).unwrap_or_default();
    let mut config = load_config(cli, false)?;
    select(&config, names)?;
    let dir = open_dir(cli, false)?;
    let metrics = Arc::new(Metrics::new(max_lag, max_wait));
    let _server = match metrics_addr {
        Some(addr) => {
            let server = Server::start(addr, Arc::clone(&metrics)).map_err(fail(EXIT_CONFIG))?;
            tracing::info!(addr, "serving /metrics and /health");
            Some(server)
        }
        None => None,
    };
    // Periodic snapshots, beside the run (read-only copies of the files).
    let snapshotting = match follow_options.snapshots {
        Some(snapshots) => Some(start_snapshots(
            cli,
            &config,
            names,
            dir.path(),
            snapshots,
            metrics_addr.map(|_| Arc::clone(&metrics)),
            &stop,
        )?),
        None => None,
    };
    let _snapshotting = snapshotting.map(StopOnDrop::new);
    let context = Context {
        cli,
        names,
        dir: &dir,
        metrics: metrics_addr.map(|_| metrics),
        stop: &stop,
        round_stop: &round_stop,
        config_path: &config_path,
        late_window: follow_options.late_window,
        on_late_event: follow_options.on_late_event,
        stall_after: follow_options.stall_after,
    };
    // Epochs: a changed config (its file is watched) ends one; the next opens
    // the projections again under the new definitions: a changed one is
    // rebuilt in its shadow while the others follow on.
    loop {
        let epoch = follow_epoch(&context, &config, &config_bytes);
        if !matches!(epoch, Ok(Epoch::Reload(_))) {
            let names: Vec<String> = config
                .projections
                .iter()
                .map(|p| p.name.to_string())
                .collect();
            unregister(&dir, &names);
        }
        match epoch? {
            Epoch::Stopped(outcome) => return outcome,
            Epoch::Reload(Change::Config(new_config, bytes)) => {
                tracing::info!("the config changed: following under its definitions");
                if cli.json {
                    ui::json_line(&serde_json::json!({"event": "config_reloaded"}));
                }
                config = *new_config;
                config_bytes = bytes;
            }
            Epoch::Reload(Change::Requests) => {}
        }
    }
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

/// What one epoch of following shares with the next.
struct Context<'a> {
    cli: &'a Cli,
    names: &'a [String],
    dir: &'a ProjectionDir,
    metrics: Option<Arc<Metrics>>,
    stop: &'a CancelToken,
    round_stop: &'a Arc<RoundTokens>,
    config_path: &'a Path,
    late_window: Duration,
    on_late_event: OnLateEvent,
    stall_after: Duration,
}

/// How an epoch ended.
enum Epoch {
    /// Stopped by a signal (or every projection ended): the command's outcome.
    Stopped(Result<(), Failure>),
    /// Follow on after a change.
    Reload(Change),
}

/// What ends an epoch.
enum Change {
    /// The config file changed and loads: follow on under it.
    Config(Box<ProjectionsConfig>, Vec<u8>),
    /// Another process asked for a rebuild or a rollback (request files).
    Requests,
}

/// How often `follow` reads its config file to notice a change: soon enough
/// for someone who just saved it, rare enough to cost nothing while idle (one
/// small read per interval).
const CONFIG_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Follows under one config until a signal or a change of the config file.
fn follow_epoch(
    context: &Context<'_>,
    config: &ProjectionsConfig,
    config_bytes: &[u8],
) -> Result<Epoch, Failure> {
    let Context {
        cli,
        names,
        dir,
        stop,
        round_stop,
        ..
    } = *context;
    // The last epoch's rounds were ended for a change: this one's run.
    round_stop.reset();
    let selected = select(config, names)?;
    let store = open_store(cli, false, config)?.with_late_event_window(context.late_window);
    // Once per config: an epoch that starts for a request does not repeat it.
    {
        static WARNED_FOR: Mutex<Option<Vec<u8>>> = Mutex::new(None);
        let mut warned = WARNED_FOR.lock().unwrap_or_else(PoisonError::into_inner);
        if warned.as_deref() != Some(config_bytes) {
            crate::app::warn_unseen_types(cli, store.reader(), &selected);
            *warned = Some(config_bytes.to_vec());
        }
    }
    let head = store
        .reader()
        .head()
        .map_err(|e| fail(EXIT_STORE)(e.into()))?;
    // The projections this process holds (their locks): it takes requests
    // for them, and only for them.
    let many = selected.len() > projectionist::limits::OPEN_PROJECTIONS_MAX;
    let watched: Vec<String> = selected
        .iter()
        .map(|p| p.name.to_string())
        .filter(|name| {
            dir.db(name)
                .map(|db| {
                    if many {
                        // Held (locked), not kept open: the run opens it.
                        db.park();
                    }
                })
                .is_ok()
        })
        .collect();
    register(dir, &watched);
    roll_back_on_request(cli, dir, &watched, config);
    crate::dead_letters::retry_on_request(cli, dir, &watched, config, store.reader());
    let opened = open_selected(cli, dir, &selected, Plan::Resume, Some(head));
    let Opened {
        selected,
        dbs,
        writes,
        shadowed,
        starts,
        errors,
        failed,
    } = opened;
    // Rolled back on purpose to another definition: left alone, not failed.
    let (held, failures): (Vec<_>, Vec<_>) = failed
        .into_iter()
        .zip(errors)
        .partition(|(_, e)| e.downcast_ref::<crate::replay::RolledBackStale>().is_some());
    for (projection, e) in &held {
        tracing::info!(projection = %projection.name, "{}", ui::escape_controls(&e.to_string()));
    }
    // Held by another process: refused, as a second follower is (not a
    // cause this follower can wait out by itself).
    let (locked, failures): (Vec<_>, Vec<_>) = failures.into_iter().partition(|(_, e)| {
        e.chain().any(|c| {
            matches!(
                c.downcast_ref::<projectionist::Error>(),
                Some(projectionist::Error::Locked { .. })
            )
        })
    });
    let (failed, errors): (Vec<&SqlProjection>, Vec<anyhow::Error>) = failures.into_iter().unzip();
    let locked: Vec<anyhow::Error> = locked.into_iter().map(|(_, e)| e).collect();
    take_rebuild_requests(dir, &selected);
    // A projection rebuilt in its shadow (its definition changed) follows the
    // log there while the others follow in their live files; once it has
    // caught up, the round ends and it is published (the live file kept
    // serving the old version until then).
    let shadows = Shadows::new(&selected, &shadowed);
    let live = Live::new(
        cli,
        selected.iter().chain(&failed).map(|p| p.name.as_str()),
        head,
        context.metrics.clone(),
        context.stall_after,
    )
    .telling_status(dir.path());
    // A projection that cannot be opened (its shadow blocked, the disk full)
    // is failed, visibly (state, metrics, /health, and in its file for
    // `status`), and tried again with backoff: once the cause is gone, the
    // epoch starts over and it is followed again.
    for (projection, e) in failed.iter().zip(&errors) {
        let text = crate::app::error_text(e);
        tracing::error!(projection = %projection.name, error = %ui::escape_controls(&text), "a projection cannot be opened; trying again with backoff");
        let recorded = format!("{text} (the follower tries again with backoff)");
        if let Ok(db) = dir.db(projection.name.as_str()) {
            let _ = db.with_connection(|conn| {
                projectionist::record_failure(conn, projection.name.as_str(), &recorded)
            });
        }
        live.fail(projection.name.as_str(), &recorded);
    }
    for ((projection, start), shadowed) in selected.iter().zip(&starts).zip(&shadowed) {
        tracing::info!(
            projection = %projection.name,
            start = if *start == Start::Reset { "rebuild" } else { "resume" },
            in_shadow = shadowed,
            head,
            "following starts"
        );
    }
    // Groups run independently, each its own engine run and its own read of
    // the log: the projections that follow in their live files, and each
    // projection rebuilt in its shadow, alone. A shadow that catches up up
    // ends its own group's round only (to be published and followed on in
    // the live file); the others never wait for it.
    let groups = follow_groups(&shadowed);
    let mut group_of = vec![0; selected.len()];
    for (g, members) in groups.iter().enumerate() {
        for &i in members {
            group_of[i] = g;
        }
    }
    let group_rounds: Vec<Mutex<CancelToken>> = groups
        .iter()
        .map(|_| Mutex::new(CancelToken::new()))
        .collect();
    let progress = |p: &Progress| {
        live.progress(p);
        if shadows.caught_up_now(p)
            && let Some(i) = shadows.index_of(&p.projection_name)
        {
            group_rounds[group_of[i]]
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .cancel();
        }
    };
    let options = RebuildOptions {
        batch_size: cli.batch_size,
        commit_interval: projectionist::limits::COMMIT_INTERVAL_DEFAULT,
        progress: Some(&progress),
        cancel: None,
        step_hook: None,
        commit_guard: None,
    };
    let started = Instant::now();
    let (finished, until) = std::sync::mpsc::channel::<()>();
    // The store of the current round: a reconnect replaces it, and the
    // late-event watch uses whichever is current.
    let current = Mutex::new(Arc::new(store));
    let results: Mutex<Vec<Option<projectionist::Result<RebuildResult>>>> =
        Mutex::new(selected.iter().map(|_| None).collect());
    let reload: Mutex<Option<Change>> = Mutex::new(None);
    let (watch_finished, watch_until) = std::sync::mpsc::channel::<()>();
    let (late_finished, late_until) = std::sync::mpsc::channel::<()>();
    let (retry_finished, retry_until) = std::sync::mpsc::channel::<()>();
    let runs = GroupRuns {
        cli,
        config,
        dir,
        stop,
        round_stop,
        late_window: context.late_window,
        selected: &selected,
        dbs: &dbs,
        shadows: &shadows,
        current: &current,
        results: &results,
        reload: &reload,
        options: &options,
    };
    std::thread::scope(|scope| {
        let live = &live;
        scope.spawn(move || live.tick_until(&until));
        let late = StoreWatch {
            cli,
            dir,
            selected: &selected,
            live,
            action: context.on_late_event,
        };
        let current = &current;
        scope.spawn(move || late.run(current, &late_until));
        let reload = &reload;
        let watched = &watched;
        scope.spawn(move || {
            let watch = Watch {
                cli,
                path: context.config_path,
                dir: dir.path(),
                names: watched,
            };
            watch.run(config_bytes, reload, round_stop, &watch_until);
        });
        if !failed.is_empty() {
            let retry = RetryOpen {
                cli,
                dir,
                failed: &failed,
                head,
                reload,
                round_stop,
            };
            scope.spawn(move || retry.run(&retry_until));
        }
        let group_threads: Vec<_> = groups
            .iter()
            .enumerate()
            .map(|(g, members)| {
                let (runs, writes, starts) = (&runs, &writes, &starts);
                let round = &group_rounds[g];
                scope.spawn(move || runs.run(members, round, writes, starts))
            })
            .collect();
        for thread in group_threads {
            let _ = thread.join();
        }
        // Nothing could be opened: wait for a retry to succeed, a config
        // change or a signal, rather than stop.
        while groups.is_empty()
            && !failed.is_empty()
            && !stop.is_cancelled()
            && reload
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_none()
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(finished);
        drop(watch_finished);
        drop(late_finished);
        drop(retry_finished);
    });
    let results = results.into_inner().unwrap_or_else(PoisonError::into_inner);
    if let Some(change) = reload.into_inner().unwrap_or_else(PoisonError::into_inner) {
        live.finish();
        for (projection, result) in selected.iter().zip(&results) {
            if let Some(Err(e)) = result {
                tracing::warn!(projection = %projection.name, error = %ui::escape_controls(&e.to_string()), "had stopped; tried again");
            }
        }
        return Ok(Epoch::Reload(change));
    }
    let results: Vec<projectionist::Result<RebuildResult>> = results
        .into_iter()
        .map(|r| r.expect("every projection has its result"))
        .collect();
    live.finish();
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        "following stopped"
    );
    let open_errors: Vec<anyhow::Error> = errors.into_iter().chain(locked).collect();
    let hint = command_hint(cli, false, "follow");
    let outcome = report(
        cli,
        &results,
        &[],
        &open_errors,
        started.elapsed().as_secs_f64(),
        &hint,
    )
    .map(|_| ());
    Ok(Epoch::Stopped(outcome))
}

/// The first wait before trying again to open a projection that could not be
/// opened; it doubles up to [`RETRY_OPEN_BACKOFF_MAX`].
const RETRY_OPEN_BACKOFF_MIN: Duration = Duration::from_secs(1);

/// The longest wait between two tries to open a projection that could not be
/// opened: a cause that went away (a full disk freed, an obstacle removed) is
/// noticed within this long.
const RETRY_OPEN_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Tries again to open the projections an epoch could not open; when one
/// opens, ends the epoch so that the next one follows it.
struct RetryOpen<'a, 'p> {
    cli: &'a Cli,
    dir: &'a ProjectionDir,
    failed: &'a [&'p SqlProjection],
    head: u64,
    reload: &'a Mutex<Option<Change>>,
    round_stop: &'a RoundTokens,
}

impl RetryOpen<'_, '_> {
    fn run(&self, until: &Receiver<()>) {
        let mut backoff = RETRY_OPEN_BACKOFF_MIN;
        while let Err(RecvTimeoutError::Timeout) = until.recv_timeout(backoff) {
            let opened = open_selected(
                self.cli,
                self.dir,
                self.failed,
                Plan::Resume,
                Some(self.head),
            );
            if opened.selected.is_empty() {
                backoff = (backoff * 2).min(RETRY_OPEN_BACKOFF_MAX);
                continue;
            }
            for projection in &opened.selected {
                tracing::info!(projection = %projection.name, "can be opened again; following it");
            }
            let mut reload = self.reload.lock().unwrap_or_else(PoisonError::into_inner);
            if reload.is_none() {
                *reload = Some(Change::Requests);
            }
            drop(reload);
            self.round_stop.cancel_all();
            return;
        }
    }
}

/// The groups of an epoch's projections that run independently (places in
/// the selection): those that follow in their live files, then each one
/// rebuilt in its shadow, alone.
fn follow_groups(shadowed: &[bool]) -> Vec<Vec<usize>> {
    let live: Vec<usize> = (0..shadowed.len()).filter(|&i| !shadowed[i]).collect();
    let mut groups = Vec::with_capacity(shadowed.len());
    if !live.is_empty() {
        groups.push(live);
    }
    groups.extend(
        (0..shadowed.len())
            .filter(|&i| shadowed[i])
            .map(|i| vec![i]),
    );
    groups
}

/// The stop tokens of every group's current round: a signal or a config
/// change ends them all (and any round started afterwards in this epoch).
#[derive(Default)]
pub(crate) struct RoundTokens {
    tokens: Mutex<Vec<CancelToken>>,
    cancelled: std::sync::atomic::AtomicBool,
}

impl RoundTokens {
    /// Ends every round, now and until [`RoundTokens::reset`].
    pub(crate) fn cancel_all(&self) {
        self.cancelled
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for token in self
            .tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            token.cancel();
        }
    }

    /// A round starts with `token`: ended at once if everything is ending.
    fn register(&self, token: &CancelToken) {
        let mut tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        tokens.retain(|t| !t.is_cancelled());
        tokens.push(token.clone());
        if self.cancelled.load(std::sync::atomic::Ordering::SeqCst) {
            token.cancel();
        }
    }

    /// A new epoch: rounds run again.
    fn reset(&self) {
        self.cancelled
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// What every group of an epoch shares.
struct GroupRuns<'a, 'p> {
    cli: &'a Cli,
    config: &'a ProjectionsConfig,
    dir: &'a ProjectionDir,
    stop: &'a CancelToken,
    round_stop: &'a RoundTokens,
    late_window: Duration,
    selected: &'a [&'p SqlProjection],
    dbs: &'a [Arc<ProjectionDb>],
    shadows: &'a Shadows,
    current: &'a Mutex<Arc<crate::store::Store>>,
    results: &'a Mutex<Vec<Option<projectionist::Result<RebuildResult>>>>,
    reload: &'a Mutex<Option<Change>>,
    options: &'a RebuildOptions<'a>,
}

impl GroupRuns<'_, '_> {
    fn reload_requested(&self) -> bool {
        self.reload
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    fn result_of(&self, i: usize) -> bool {
        self.results.lock().unwrap_or_else(PoisonError::into_inner)[i].is_some()
    }

    /// One group's rounds, until its projections have ended, the follower
    /// stops, or the epoch ends. A store that cannot be read (a server
    /// restart, a dropped connection) ends a round; the projections resume
    /// in the next one, with the store opened again, after a backoff. A
    /// shadow that caught up ends its round, is published, and goes on in
    /// its live file.
    fn run(
        &self,
        members: &[usize],
        round: &Mutex<CancelToken>,
        writes: &[Arc<ProjectionDb>],
        starts: &[Start],
    ) {
        let selected: Vec<&SqlProjection> = members.iter().map(|&i| self.selected[i]).collect();
        let mut handlers: Vec<SqlHandler<'_>> =
            selected.iter().map(|p| SqlHandler::new(p)).collect();
        let mut writes: Vec<Arc<ProjectionDb>> =
            members.iter().map(|&i| Arc::clone(&writes[i])).collect();
        let mut starts: Vec<Start> = members.iter().map(|&i| starts[i]).collect();
        let mut backoff = RECONNECT_BACKOFF_MIN;
        loop {
            let running: Vec<usize> = (0..members.len())
                .filter(|&p| !self.result_of(members[p]))
                .collect();
            if running.is_empty() || self.reload_requested() {
                return;
            }
            let this_round = CancelToken::new();
            *round.lock().unwrap_or_else(PoisonError::into_inner) = this_round.clone();
            self.round_stop.register(&this_round);
            if self.stop.is_cancelled() {
                this_round.cancel();
            }
            let round_targets: Vec<_> = targets(&mut handlers, &writes, &selected, &starts)
                .into_iter()
                .enumerate()
                .filter(|(p, _)| running.contains(p))
                .map(|(_, target)| target)
                .collect();
            let store = Arc::clone(&self.current.lock().unwrap_or_else(PoisonError::into_inner));
            let outcome =
                projectionist::follow(store.reader(), round_targets, self.options, &this_round);
            let mut unreachable = None;
            // A round ended to publish a shadow, or for a new epoch: go on.
            let to_publish = this_round.is_cancelled() && !self.stop.is_cancelled();
            for (&p, result) in running.iter().zip(outcome) {
                match result {
                    Err(e)
                        if projectionist_runner::is_store_failure(&e)
                            && !self.stop.is_cancelled() =>
                    {
                        starts[p] = Start::Resume;
                        unreachable = Some(e);
                    }
                    Ok(_) if to_publish => starts[p] = Start::Resume,
                    result => {
                        self.results.lock().unwrap_or_else(PoisonError::into_inner)[members[p]] =
                            Some(result);
                    }
                }
            }
            for (p, &i) in members.iter().enumerate() {
                if !self.result_of(i) && self.shadows.caught_up(i) {
                    self.publish(i);
                    writes[p] = Arc::clone(&self.dbs[i]);
                }
            }
            let Some(error) = unreachable else {
                continue;
            };
            if self.reload_requested() {
                return;
            }
            self.reconnect(&store, &error, backoff);
            backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
        }
    }

    /// Publishes the caught-up shadow of projection `i` (its result is the
    /// error when that fails: the live file is then unchanged).
    fn publish(&self, i: usize) {
        let name = self.selected[i].name.as_str();
        match self.dir.publish(name, name, &PublishOptions::default()) {
            Ok(published) => {
                tracing::info!(
                    projection = name,
                    checkpoint = published.checkpoint,
                    lock_held_ms = published.lock_held.as_secs_f64() * 1e3,
                    "published its rebuild; following it in the live file"
                );
                published_line(self.cli, &published);
            }
            Err(e) => {
                tracing::error!(projection = name, error = %ui::escape_controls(&e.to_string()), "cannot publish its rebuild; the live file is unchanged");
                projectionist_runner::record_publish_failure(self.dir, name, &e);
                self.results.lock().unwrap_or_else(PoisonError::into_inner)[i] = Some(Err(e));
            }
        }
        self.shadows.published(i);
    }

    /// After a backoff, opens the store again, unless another group already
    /// did (the store in `current` is no longer the one that failed).
    fn reconnect(
        &self,
        failed: &Arc<crate::store::Store>,
        error: &projectionist::Error,
        backoff: Duration,
    ) {
        let text = ui::escape_controls(&error.to_string());
        tracing::warn!(error = %text, retry_in_ms = backoff.as_millis(), "the event store cannot be read; reconnecting");
        if self.cli.json {
            ui::json_line(&serde_json::json!({
                "event": "reconnecting", "error": text, "retry_in_ms": backoff.as_millis(),
            }));
        }
        let until = Instant::now() + backoff;
        while Instant::now() < until && !self.stop.is_cancelled() {
            std::thread::sleep(RECONNECT_BACKOFF_MIN.min(until - Instant::now()));
        }
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if Arc::ptr_eq(&current, failed)
            && let Ok(reopened) = open_store(self.cli, false, self.config)
        {
            *current = Arc::new(reopened.with_late_event_window(self.late_window));
        }
    }
}

/// How often a PostgreSQL follower looks for events committed into holes its
/// reads passed: one query over the passed holes still in the window.
const LATE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How often the follower looks whether its store is reconnecting (no query:
/// the store's own record).
const OUTAGE_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Watches the store beside the run: its outage and reconnects, its head
/// (for the stall judge), and late events (PostgreSQL), which it acts on.
struct StoreWatch<'a> {
    cli: &'a Cli,
    dir: &'a ProjectionDir,
    selected: &'a [&'a SqlProjection],
    live: &'a Live,
    action: OnLateEvent,
}

impl StoreWatch<'_> {
    /// Until `until` closes: every [`OUTAGE_CHECK_INTERVAL`], whether the
    /// store lost its connection (says `reconnecting`, then `reconnected`);
    /// every [`LATE_CHECK_INTERVAL`], late events. A failed look is left to
    /// the next one.
    fn run(&self, current: &Mutex<Arc<crate::store::Store>>, until: &Receiver<()>) {
        let mut late_checked = Instant::now();
        let mut reconnects_seen = 0;
        let mut announced: Option<String> = None;
        let mut store_seen = Arc::as_ptr(&current.lock().unwrap_or_else(PoisonError::into_inner));
        while let Err(RecvTimeoutError::Timeout) = until.recv_timeout(OUTAGE_CHECK_INTERVAL) {
            let store = Arc::clone(&current.lock().unwrap_or_else(PoisonError::into_inner));
            // The run opened the store again (after a longer outage): the
            // new one starts afresh.
            if !std::ptr::eq(Arc::as_ptr(&store), store_seen) {
                store_seen = Arc::as_ptr(&store);
                reconnects_seen = 0;
                if let Some(error) = announced.take() {
                    self.reconnecting(&error, false);
                }
            }
            let reconnects = store.reconnects();
            match store.outage() {
                Some(outage) if announced.is_none() => {
                    self.reconnecting(&outage.error, true);
                    announced = Some(outage.error);
                }
                Some(_) => {}
                None if reconnects != reconnects_seen => {
                    // An outage shorter than a look: said after the fact.
                    let error = announced
                        .take()
                        .unwrap_or_else(|| "the connection was lost".to_owned());
                    if reconnects > reconnects_seen + 1 || !self.live.is_reconnecting() {
                        self.reconnecting(&error, true);
                    }
                    self.reconnecting(&error, false);
                    reconnects_seen = reconnects;
                }
                None => {}
            }
            if late_checked.elapsed() < LATE_CHECK_INTERVAL {
                continue;
            }
            late_checked = Instant::now();
            if let Ok(head) = store.reader().head() {
                self.live.saw_log_head(head);
            }
            let Ok(late) = store.late_events() else {
                continue;
            };
            for event in late {
                self.act(&event);
            }
        }
    }

    /// Says that the store lost its connection and is making it again
    /// (`down`), or has made it again.
    fn reconnecting(&self, error: &str, down: bool) {
        let error = ui::escape_controls(error);
        if down {
            tracing::warn!(error = %error, "the event store's connection was lost; reconnecting");
        } else {
            tracing::info!("the event store's connection is back");
        }
        if self.cli.json {
            let event = if down { "reconnecting" } else { "reconnected" };
            ui::json_line(&serde_json::json!({"event": event, "error": error}));
        }
        self.live.set_reconnecting(down);
    }

    /// Reports one late event, and asks for the rebuild of every projection
    /// that handles its type and has read past it.
    fn act(&self, event: &projectionist_postgres::LateEvent) {
        let affected: Vec<&str> = self
            .selected
            .iter()
            .filter(|p| p.event_types().contains(&event.event_type))
            .map(|p| p.name.as_str())
            .filter(|name| self.live.checkpoint(name) >= event.sequence)
            .collect();
        let rebuild = self.action == OnLateEvent::Rebuild && !affected.is_empty();
        tracing::error!(
            sequence = event.sequence,
            event_type = %ui::escape_controls(&event.event_type),
            projections = ?affected,
            action = if rebuild { "rebuild in shadow" } else { "none" },
            "an event was committed into a hole the follower had passed (its writer broke the writer contract of docs/postgres.md); the projections listed lack it"
        );
        if self.cli.json {
            ui::json_line(&serde_json::json!({
                "event": "late_event", "sequence": event.sequence,
                "event_type": event.event_type, "projections": affected,
                "action": if rebuild { "rebuild" } else { "report" },
            }));
        }
        for name in &affected {
            self.live.late_event(name);
            if !rebuild {
                continue;
            }
            // The follower's own request: its watch ends the round and the
            // projection is rebuilt in its shadow, then published.
            let requested = VersionFiles::new(self.dir.path(), name)
                .map_err(|e| e.to_string())
                .and_then(|files| {
                    std::fs::File::create(&files.rebuild_request).map_err(|e| e.to_string())
                });
            if let Err(e) = requested {
                tracing::error!(projection = name, error = %ui::escape_controls(&e), "cannot ask for the rebuild after a late event");
            }
        }
    }
}

/// What a follower watches between reads of the log: its config file and
/// the request files of its projections.
struct Watch<'a> {
    cli: &'a Cli,
    path: &'a Path,
    dir: &'a Path,
    names: &'a [String],
}

impl Watch<'_> {
    /// Every [`CONFIG_POLL_INTERVAL`] until `until` closes: when the config's
    /// content changed and it loads, or a projection has a request file, hands
    /// the change over and ends the round. A config change that does not load
    /// is logged; the follower goes on under the definitions it has.
    fn run(
        &self,
        loaded: &[u8],
        reload: &Mutex<Option<Change>>,
        round_stop: &RoundTokens,
        until: &Receiver<()>,
    ) {
        let mut seen = loaded.to_vec();
        while let Err(RecvTimeoutError::Timeout) = until.recv_timeout(CONFIG_POLL_INTERVAL) {
            let change = self.requested().or_else(|| self.config_changed(&mut seen));
            if let Some(change) = change {
                *reload.lock().unwrap_or_else(PoisonError::into_inner) = Some(change);
                round_stop.cancel_all();
                return;
            }
        }
    }

    fn requested(&self) -> Option<Change> {
        self.names
            .iter()
            .filter_map(|name| VersionFiles::new(self.dir, name).ok())
            .any(|f| {
                f.rebuild_request.exists()
                    || f.rollback_request.exists()
                    || f.retry_request.exists()
            })
            .then_some(Change::Requests)
    }

    fn config_changed(&self, seen: &mut Vec<u8>) -> Option<Change> {
        let bytes = std::fs::read(self.path).ok()?;
        if bytes == *seen {
            return None;
        }
        seen.clone_from(&bytes);
        match load_config(self.cli, false) {
            Ok(config) => Some(Change::Config(Box::new(config), bytes)),
            Err(failure) => {
                let text = ui::escape_controls(&crate::app::error_text(&failure.error));
                tracing::error!(error = %text, "the config changed but does not load; following on under the definitions loaded before");
                None
            }
        }
    }
}

/// Does the rollbacks other processes asked for (their request files), and
/// answers each in its own outcome file (`replay::outcome_path`): done or
/// not, where the restored version is, and whether this follower follows it
/// (it does not when the config defines the projection otherwise).
fn roll_back_on_request(
    cli: &Cli,
    dir: &ProjectionDir,
    names: &[String],
    config: &ProjectionsConfig,
) {
    for name in names {
        let Ok(files) = VersionFiles::new(dir.path(), name) else {
            continue;
        };
        let Ok(id) = std::fs::read_to_string(&files.rollback_request) else {
            continue;
        };
        let _ = dir.discard_shadow(name);
        let rolled_back = dir.rollback(name, name, &PublishOptions::default());
        let outcome = match &rolled_back {
            Ok(back) => {
                let follows = config.get(name).is_some_and(|projection| {
                    dir.db(name)
                        .and_then(|db| {
                            db.with_connection(|conn| {
                                Ok(!projection.needs_rebuild(conn).unwrap_or(true))
                            })
                        })
                        .unwrap_or(false)
                });
                tracing::info!(projection = %name, checkpoint = back.checkpoint, follows, "rolled back on request");
                if cli.json {
                    ui::json_line(&serde_json::json!({
                        "event": "rolled_back", "projection": name, "checkpoint": back.checkpoint,
                        "follows": follows,
                    }));
                }
                let at = dir
                    .db(name)
                    .and_then(|db| db.with_connection(|conn| projectionist::version_info(conn)))
                    .ok()
                    .and_then(|v| v.rolled_back_at);
                serde_json::json!({
                    "ok": true, "checkpoint": back.checkpoint, "rolled_back_at": at,
                    "follows": follows,
                })
            }
            Err(e) => {
                tracing::error!(projection = %name, error = %ui::escape_controls(&e.to_string()), "cannot roll back on request");
                serde_json::json!({"ok": false, "error": e.to_string()})
            }
        };
        // The answer first, then the request is gone: the asking process
        // finds its answer when it sees the request taken.
        projectionist_runner::control::answer_rollback(dir.path(), name, id.trim(), &outcome);
    }
}

/// Says, in `.{name}.follower`, that this process follows the projections
/// and takes requests for them (`rebuild`, `rollback` from other processes).
fn register(dir: &ProjectionDir, names: &[String]) {
    for name in names {
        projectionist_runner::control::register(dir.path(), name);
    }
}

/// Takes back what [`register`] said, only where it names this process.
fn unregister(dir: &ProjectionDir, names: &[String]) {
    for name in names {
        projectionist_runner::control::unregister(dir.path(), name);
    }
}

/// Takes the rebuild requests of the projections just opened (`open_selected`
/// built a requested one afresh, in its shadow): the asking process then knows
/// the rebuild has begun.
fn take_rebuild_requests(dir: &ProjectionDir, selected: &[&SqlProjection]) {
    for projection in selected {
        let name = projection.name.as_str();
        let Ok(files) = VersionFiles::new(dir.path(), name) else {
            continue;
        };
        if std::fs::remove_file(&files.rebuild_request).is_ok() {
            tracing::info!(projection = name, "rebuilding in its shadow on request");
        }
    }
}

/// The first wait before opening the store again after it could not be read;
/// it doubles up to [`RECONNECT_BACKOFF_MAX`].
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(250);

/// The longest wait between two attempts to open the store again: a server
/// that accepts connections again is used within a second.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What is known of one projection while following.
#[derive(Clone)]
struct State {
    checkpoint: u64,
    head: u64,
    processed: u64,
    following: bool,
    failed: Option<String>,
    done: bool,
    /// Reads are held at this hole (PostgreSQL), since then.
    hole_wait: Option<projectionist::HoleWait>,
    /// The store's connection is lost and being made again.
    reconnecting: bool,
    /// Since when the log has held events past its checkpoint without the
    /// checkpoint moving.
    behind_since: Option<Instant>,
    /// Behind for longer than `--stall-after`.
    stalled: bool,
    /// `processed` at the last status line, for events/s.
    processed_at_tick: u64,
    rate: f64,
}

impl State {
    fn name(&self) -> &'static str {
        match (&self.failed, self.done, self.following) {
            (Some(_), _, _) => "failed",
            (None, true, _) => "stopped",
            (None, false, _) if self.reconnecting => "reconnecting",
            (None, false, _) if self.stalled => "stalled",
            (None, false, true) if self.hole_wait.is_some() => "waiting",
            (None, false, true) => "following",
            (None, false, false) => "catching up",
        }
    }

    /// For `--json`: the hole reads are held at, and for how long.
    fn waiting_json(&self) -> serde_json::Value {
        match self.hole_wait {
            Some(wait) => serde_json::json!({
                "reason": "hole", "sequence": wait.sequence,
                "seconds": wait.since.elapsed().as_secs_f64(),
            }),
            None => serde_json::Value::Null,
        }
    }

    fn lag(&self) -> u64 {
        self.head.saturating_sub(self.checkpoint)
    }
}

/// The follower's display: bars and lines on a terminal, JSON lines, logs.
struct Live {
    json: bool,
    /// The projection directory, where states are told to `status`.
    dir: Option<PathBuf>,
    multi: MultiProgress,
    bars: HashMap<String, ProgressBar>,
    states: Mutex<HashMap<String, State>>,
    metrics: Option<Arc<Metrics>>,
    /// The log's head as the store last said (looked up every second), for
    /// telling a projection that does not advance while events wait.
    log_head: std::sync::atomic::AtomicU64,
    stall_after: Duration,
}

impl Live {
    fn new<'a>(
        cli: &Cli,
        names: impl Iterator<Item = &'a str>,
        head: u64,
        metrics: Option<Arc<Metrics>>,
        stall_after: Duration,
    ) -> Self {
        let target = if cli.json || cli.quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let multi = MultiProgress::with_draw_target(target);
        let mut bars = HashMap::new();
        let mut states = HashMap::new();
        for name in names {
            let bar = multi.add(ProgressBar::new(head));
            bar.set_style(catching_up_style());
            bar.set_prefix(name.to_owned());
            bars.insert(name.to_owned(), bar);
            states.insert(
                name.to_owned(),
                State {
                    checkpoint: 0,
                    head,
                    processed: 0,
                    following: false,
                    failed: None,
                    done: false,
                    hole_wait: None,
                    reconnecting: false,
                    behind_since: None,
                    stalled: false,
                    processed_at_tick: 0,
                    rate: 0.0,
                },
            );
        }
        Live {
            json: cli.json,
            dir: None,
            multi,
            bars,
            states: Mutex::new(states),
            metrics,
            log_head: std::sync::atomic::AtomicU64::new(head),
            stall_after,
        }
    }

    /// One report from the engine (on a writer thread): update, and announce
    /// a change of state.
    fn progress(&self, p: &Progress) {
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(state) = states.get_mut(&p.projection_name) else {
            return;
        };
        let before = state.name();
        if let Some(metrics) = &self.metrics {
            metrics.observe(&Observed {
                name: &p.projection_name,
                checkpoint: p.checkpoint,
                head: p.total.max(p.checkpoint),
                following: p.following,
                failed: p.err.is_some(),
                processed: p.processed.saturating_sub(state.processed),
                committed: p.checkpoint > state.checkpoint,
                batch_latency: p.batch_latency,
                hole_wait: p.hole_wait,
                dead_letters: Some(p.dead_letters),
            });
        }
        if p.checkpoint > state.checkpoint {
            state.behind_since = None;
            if state.stalled
                && let Some(metrics) = &self.metrics
            {
                metrics.set_stalled(&p.projection_name, None);
            }
            state.stalled = false;
        }
        state.checkpoint = p.checkpoint;
        state.head = p.total.max(p.checkpoint);
        state.processed = p.processed;
        state.following = p.following;
        state.done = p.done;
        state.hole_wait = p.hole_wait;
        state.failed.clone_from(&p.err);
        let after = state.name();
        if let Some(bar) = self.bars.get(&p.projection_name) {
            if state.following || state.done {
                bar.set_style(following_style());
                bar.set_message(line(state));
            } else {
                bar.set_length(p.total.max(p.checkpoint).saturating_sub(p.started_from));
                bar.set_position(p.checkpoint.saturating_sub(p.started_from));
            }
        }
        if before != after {
            self.announce(&p.projection_name, state);
        }
    }

    /// Projection `name` cannot run: failed, with why.
    fn fail(&self, name: &str, error: &str) {
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(state) = states.get_mut(name) else {
            return;
        };
        state.failed = Some(error.to_owned());
        if let Some(metrics) = &self.metrics {
            metrics.observe(&Observed {
                name,
                checkpoint: state.checkpoint,
                head: state.head,
                following: false,
                failed: true,
                processed: 0,
                committed: false,
                batch_latency: None,
                hole_wait: None,
                dead_letters: None,
            });
        }
        self.announce(name, state);
    }

    /// Every projection's store is reconnecting (or no longer).
    fn set_reconnecting(&self, reconnecting: bool) {
        if let Some(metrics) = &self.metrics {
            metrics.set_reconnecting(reconnecting);
        }
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        let mut names: Vec<String> = states.keys().cloned().collect();
        names.sort();
        for name in names {
            let state = states.get_mut(&name).expect("a known projection");
            let before = state.name();
            state.reconnecting = reconnecting;
            if before != state.name() {
                self.announce(&name, state);
            }
        }
    }

    fn is_reconnecting(&self) -> bool {
        self.states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .any(|s| s.reconnecting)
    }

    /// A projection's committed checkpoint as last reported.
    fn checkpoint(&self, name: &str) -> u64 {
        self.states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .map_or(0, |s| s.checkpoint)
    }

    /// A late event affected `name`.
    fn late_event(&self, name: &str) {
        if let Some(metrics) = &self.metrics {
            metrics.late_event(name);
        }
    }

    fn announce(&self, name: &str, state: &State) {
        match &state.failed {
            Some(error) => tracing::error!(
                projection = name,
                checkpoint = state.checkpoint,
                error = %ui::escape_controls(error),
                "projection failed; the others go on"
            ),
            None => tracing::info!(
                projection = name,
                state = state.name(),
                checkpoint = state.checkpoint,
                lag = state.lag(),
                "projection state"
            ),
        }
        if self.json {
            ui::json_line(&serde_json::json!({
                "event": "state", "projection": name, "state": state.name(),
                "checkpoint": state.checkpoint, "head": state.head, "lag": state.lag(),
                "error": state.failed, "waiting": state.waiting_json(),
            }));
        }
        self.tell_status(name, state);
    }

    /// Writes the projection's state where `status` in another process reads
    /// it: the second line of its `.{name}.follower` file (the first is this
    /// process's id), replaced whole (a reader never sees it half written or
    /// missing). Only for a projection this process registered.
    fn tell_status(&self, name: &str, state: &State) {
        let Some(dir) = &self.dir else { return };
        let reason = match (&state.failed, state.stalled) {
            (Some(error), _) => Some(error.clone()),
            (None, true) => state.behind_since.map(|since| {
                format!(
                    "no progress for {:.0} s while the log holds events past its checkpoint",
                    since.elapsed().as_secs_f64()
                )
            }),
            _ => None,
        };
        let line = serde_json::json!({
            "state": state.name(), "reason": reason, "checkpoint": state.checkpoint,
            "waiting": state.waiting_json(),
        });
        projectionist_runner::control::tell_state(dir, name, &line);
    }

    /// States are also written for `status` in other processes.
    fn telling_status(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_path_buf());
        self
    }

    /// The store says the log's head is `head`.
    fn saw_log_head(&self, head: u64) {
        self.log_head
            .fetch_max(head, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether projection `name` is stalled: the log holds events past its
    /// checkpoint and it has not advanced for `--stall-after`, for any
    /// reason but a hole wait (judged by `--max-wait`) or a lost connection.
    fn judge_stall(&self, name: &str, state: &mut State) {
        let log_head = self.log_head.load(std::sync::atomic::Ordering::Relaxed);
        let excused =
            state.failed.is_some() || state.done || state.reconnecting || state.hole_wait.is_some();
        if excused || log_head <= state.checkpoint {
            state.behind_since = None;
        } else if state.behind_since.is_none() {
            state.behind_since = Some(Instant::now());
        }
        let stalled = state
            .behind_since
            .is_some_and(|since| since.elapsed() > self.stall_after);
        if stalled == state.stalled {
            return;
        }
        let before = state.name();
        state.stalled = stalled;
        let reason = stalled.then(|| {
            format!(
                "no progress for {:.0} s with {} events of the log past its checkpoint",
                state
                    .behind_since
                    .map_or(0.0, |s| s.elapsed().as_secs_f64()),
                log_head.saturating_sub(state.checkpoint)
            )
        });
        if let Some(metrics) = &self.metrics {
            metrics.set_stalled(name, reason.clone());
        }
        if let Some(reason) = &reason {
            tracing::warn!(projection = name, reason = %reason, "projection stalled");
        }
        if before != state.name() {
            self.announce(name, state);
        }
    }

    /// Redraws the lines and prints the periodic status, until the other end
    /// of `finished` is dropped.
    fn tick_until(&self, finished: &Receiver<()>) {
        let mut last_status = Instant::now();
        while let Err(RecvTimeoutError::Timeout) = finished.recv_timeout(REDRAW_INTERVAL) {
            let elapsed = last_status.elapsed();
            let status_due = elapsed >= STATUS_INTERVAL;
            let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
            let mut names: Vec<&String> = states.keys().collect();
            names.sort();
            let names: Vec<String> = names.into_iter().cloned().collect();
            for name in names {
                let state = states.get_mut(&name).expect("a known projection");
                self.judge_stall(&name, state);
                if status_due {
                    let applied = state.processed.saturating_sub(state.processed_at_tick);
                    state.rate = applied as f64 / elapsed.as_secs_f64();
                    state.processed_at_tick = state.processed;
                    if self.json {
                        ui::json_line(&serde_json::json!({
                            "event": "status", "projection": name, "state": state.name(),
                            "checkpoint": state.checkpoint, "head": state.head,
                            "lag": state.lag(), "events_per_second": state.rate,
                            "waiting": state.waiting_json(),
                        }));
                    }
                }
                if state.following
                    && let Some(bar) = self.bars.get(&name)
                {
                    bar.set_message(line(state));
                }
            }
            if status_due {
                last_status = Instant::now();
            }
        }
    }

    fn finish(&self) {
        let _ = self.multi.clear();
    }
}

/// A following projection's terminal line.
fn line(state: &State) -> String {
    let waiting = state.hole_wait.map_or(String::new(), |wait| {
        format!(
            "  at hole {} for {:.0} s",
            wait.sequence,
            wait.since.elapsed().as_secs_f64()
        )
    });
    format!(
        "{:<11} checkpoint {:>10}  lag {:>8}  {:>8.0} events/s{waiting}",
        state.name(),
        state.checkpoint,
        state.lag(),
        state.rate
    )
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
