//! `projectionist bench-follow`: latency, idle cost, sustained throughput and
//! shutdown of `projectionist follow`, measured from outside the follower.
//!
//! The follower is the real binary in a child process, following the demo
//! projections over a copy of the demo log. This process plays the others:
//! - an appender that writes with plain SQL on its own connection (SQLite) or
//!   through the store's append (PostgreSQL), never through the engine;
//! - an observer on connections of its own that polls both projection files'
//!   checkpoints (a checkpoint commits with its rows, so it says what readers
//!   see).
//!
//! Phases: catch up; idle (the follower's CPU while nothing is appended);
//! latency (one event per transaction at a steady rate: from the append's
//! commit to the moment both projections show it); sustained (batched
//! appends at a high rate: latency of each batch, and the follower's memory);
//! shutdown (SIGTERM to exit, exit code); then the projections' digests are
//! compared with a fresh rebuild of the final log (exactly once).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use projectionist::rusqlite::Connection;
use projectionist::{
    DigestScope, GlobalReader, ProjectionDir, ProjectionTarget, Start, projection_digest, replay,
};
use projectionist_sqlview::{ProjectionsConfig, SqlHandler};

use crate::common::out;

/// The projections the demo config declares.
const PROJECTIONS: [&str; 2] = ["order_summary", "customer_stats"];

/// How often the observer reads the checkpoints: the resolution of every
/// latency measured here.
const OBSERVE_INTERVAL: Duration = Duration::from_micros(500);

/// Batches per second in the sustained phase (its rate is spread over them).
const SUSTAINED_BATCHES_PER_SECOND: u32 = 100;

/// How long the follower may take to catch up before the bench gives up.
const CATCH_UP_MAX: Duration = Duration::from_secs(600);

/// What to measure.
pub struct FollowBench {
    /// Events in the log before the follower starts.
    pub events: u64,
    /// Appends per second in the latency phase, one event each.
    pub rate: u32,
    /// Length of the latency phase.
    pub seconds: u64,
    /// Length of the idle phase.
    pub idle_seconds: u64,
    /// Events per second in the sustained phase (0 skips it).
    pub sustained_rate: u32,
    /// Length of the sustained phase.
    pub sustained_seconds: u64,
    /// Where logs and projection files go.
    pub work: PathBuf,
    /// Seed of the initial log.
    pub seed: u64,
    /// Also measure against this PostgreSQL server.
    pub pg_url: Option<String>,
}

pub fn run(bench: &FollowBench) -> anyhow::Result<()> {
    let dir = bench.work.join("follow");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let source = crate::rebuild::prepare_log(&bench.work, bench.events, bench.seed)?;
    let config = dir.join("projectionist.toml");
    std::fs::write(&config, projectionist_demo::CONFIG)?;
    let store = dir.join("events.db");
    {
        let conn = Connection::open(&source)?;
        conn.execute("VACUUM INTO ?1", [store.display().to_string()])?;
        let copy = Connection::open(&store)?;
        copy.pragma_update(None, "journal_mode", "WAL")?;
    }
    let sqlite = Target::Sqlite(store.clone());
    measure(bench, &sqlite, &dir.join("sqlite"), &config)?;
    if let Some(url) = &bench.pg_url {
        let original = crate::rebuild::prepare_pg_log(url, &source, bench.events, bench.seed)?;
        // The phases append: follow a fresh copy of the log each time.
        let fresh = copy_pg(url, &original, &format!("follow_{}", bench.seed))?;
        measure(
            bench,
            &Target::Postgres(fresh),
            &dir.join("postgres"),
            &config,
        )?;
    }
    Ok(())
}

/// The store the follower follows.
enum Target {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Target {
    fn spec(&self) -> String {
        match self {
            Target::Sqlite(path) => path.display().to_string(),
            Target::Postgres(url) => url.clone(),
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Target::Sqlite(_) => "SQLite",
            Target::Postgres(_) => "PostgreSQL",
        }
    }
}

/// Appends events for new orders, each event in its own or in a shared
/// transaction; returns the last sequence written.
enum Appender {
    Sqlite(Connection),
    Postgres(Box<projectionist_postgres::PostgresEventStore>),
}

impl Appender {
    fn open(target: &Target) -> anyhow::Result<Self> {
        Ok(match target {
            Target::Sqlite(path) => {
                let conn = Connection::open(path)?;
                conn.busy_timeout(Duration::from_secs(10))?;
                Appender::Sqlite(conn)
            }
            Target::Postgres(url) => Appender::Postgres(Box::new(
                projectionist_postgres::PostgresEventStore::connect(url)?,
            )),
        })
    }

    /// Appends `n` events (orders `live-{first}..`, one `OrderPlaced` each) in
    /// one transaction; returns the last sequence.
    fn append(&mut self, first: u64, n: u64) -> anyhow::Result<u64> {
        let event = |i: u64| {
            let data = serde_json::json!({"order_id": format!("live-{i}"), "customer_id": format!("c{}", i % 1000)});
            (format!("order-live-{i}"), data.to_string())
        };
        match self {
            Appender::Sqlite(conn) => {
                let tx = conn.transaction()?;
                for i in first..first + n {
                    let (stream, data) = event(i);
                    tx.execute(
                        "INSERT INTO events (stream_id, stream_version, event_type, data) VALUES (?1, 1, 'OrderPlaced', ?2)",
                        (stream, data),
                    )?;
                }
                let last = tx.last_insert_rowid();
                tx.commit()?;
                Ok(last.cast_unsigned())
            }
            Appender::Postgres(store) => {
                let events: Vec<(String, [projectionist::NewEvent; 1])> = (first..first + n)
                    .map(|i| {
                        let (stream, data) = event(i);
                        let new = projectionist::NewEvent {
                            event_type: "OrderPlaced".into(),
                            data,
                            metadata: None,
                        };
                        (stream, [new])
                    })
                    .collect();
                let appends: Vec<projectionist::StreamAppend<'_>> = events
                    .iter()
                    .map(|(stream_id, events)| projectionist::StreamAppend {
                        stream_id,
                        expected_version: 0,
                        events,
                    })
                    .collect();
                let appended = store.append_batch(&appends)?;
                Ok(appended.iter().map(|a| a.last_sequence).max().unwrap_or(0))
            }
        }
    }
}

/// The observer: both projections' committed checkpoints, polled on their own
/// connections, with the moment each new low-water mark was first seen.
struct Observer {
    seen: Mutex<Vec<(u64, Instant)>>,
    stop: AtomicBool,
}

impl Observer {
    fn watch(&self, dir: &Path) -> anyhow::Result<()> {
        let conns: Vec<Connection> = PROJECTIONS
            .iter()
            .map(|name| Connection::open(dir.join(format!("{name}.db"))))
            .collect::<Result<_, _>>()?;
        let mut last = 0;
        while !self.stop.load(Ordering::Relaxed) {
            let mut low = u64::MAX;
            for (conn, name) in conns.iter().zip(PROJECTIONS) {
                // Until the follower has set the file up, there is no checkpoint.
                let checkpoint = projectionist::SqliteCheckpoint::load_in(conn, name).unwrap_or(0);
                low = low.min(checkpoint);
            }
            if low > last {
                last = low;
                self.seen
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((low, Instant::now()));
            }
            std::thread::sleep(OBSERVE_INTERVAL);
        }
        Ok(())
    }

    /// When `sequence` was first seen in both projections.
    fn visible_at(&self, sequence: u64) -> Option<Instant> {
        let seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let idx = seen.partition_point(|(low, _)| *low < sequence);
        seen.get(idx).map(|(_, at)| *at)
    }

    fn low(&self) -> u64 {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .last()
            .map_or(0, |(low, _)| *low)
    }
}

fn measure(bench: &FollowBench, target: &Target, dir: &Path, config: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let log = dir.join("follower.log");
    with_follower(&target.spec(), dir, config, &log, |follower| {
        phases(bench, target, dir, follower)
    })
}

/// Runs `phases` beside a `follow` child of this binary (store `store`,
/// projections in `dir`, config `config`, its stderr in `log`); the child is
/// killed if `phases` fails.
pub(crate) fn with_follower(
    store: &str,
    dir: &Path,
    config: &Path,
    log: &Path,
    phases: impl FnOnce(&mut Child) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut follower = Command::new(crate::common::projectionist_binary()?)
        .arg("--store")
        .arg(store)
        .arg("--dir")
        .arg(dir)
        .arg("--config")
        .arg(config)
        .arg("--quiet")
        .arg("follow")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()?;
    let result = phases(&mut follower);
    if result.is_err() {
        let _ = follower.kill();
        let _ = follower.wait();
    }
    result
}

fn phases(
    bench: &FollowBench,
    target: &Target,
    dir: &Path,
    follower: &mut Child,
) -> anyhow::Result<()> {
    let label = target.label();
    let pid = follower.id();
    let started = Instant::now();
    wait_until_exists(dir, follower)?;
    let observer = Observer {
        seen: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
    };
    let mut appender = Appender::open(target)?;
    let mut next_order = 0u64;
    let mut rows: Vec<(String, String)> = Vec::new();
    let outcome = std::thread::scope(|scope| -> anyhow::Result<()> {
        let watching = scope.spawn(|| observer.watch(dir));
        let result = (|| -> anyhow::Result<()> {
            // Catch up.
            let deadline = Instant::now() + CATCH_UP_MAX;
            while observer.low() < bench.events {
                check_running(follower)?;
                if Instant::now() > deadline {
                    bail!("the follower did not catch up within {CATCH_UP_MAX:?}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            rows.push((
                "catch-up".into(),
                format!(
                    "{} events in {:.2} s",
                    bench.events,
                    started.elapsed().as_secs_f64()
                ),
            ));
            // Idle.
            rows.push(idle_cpu(pid, bench.idle_seconds)?);
            // Latency: one event per transaction at a steady rate.
            let n = u64::from(bench.rate) * bench.seconds;
            let mut committed = Vec::with_capacity(n as usize);
            let phase = Instant::now();
            for i in 0..n {
                let due = phase + Duration::from_secs_f64(i as f64 / f64::from(bench.rate));
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                let last = appender.append(next_order, 1)?;
                next_order += 1;
                committed.push((last, Instant::now()));
            }
            let latencies = wait_visible(&observer, &committed, follower)?;
            rows.push((
                format!(
                    "latency, {} events/s x {} s, 1 per transaction",
                    bench.rate, bench.seconds
                ),
                summary(&latencies),
            ));
            // Sustained: batches at a high rate.
            if bench.sustained_rate > 0 {
                let per_batch =
                    u64::from(bench.sustained_rate / SUSTAINED_BATCHES_PER_SECOND).max(1);
                let batches = u64::from(SUSTAINED_BATCHES_PER_SECOND) * bench.sustained_seconds;
                let mut committed = Vec::with_capacity(batches as usize);
                let mut rss = Vec::new();
                let phase = Instant::now();
                for b in 0..batches {
                    // An appender slower than the offered rate ends on time;
                    // the achieved rate is reported.
                    if phase.elapsed().as_secs() >= bench.sustained_seconds {
                        break;
                    }
                    let due = phase
                        + Duration::from_secs_f64(
                            b as f64 / f64::from(SUSTAINED_BATCHES_PER_SECOND),
                        );
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    let last = appender.append(next_order, per_batch)?;
                    next_order += per_batch;
                    committed.push((last, Instant::now()));
                    if b % u64::from(SUSTAINED_BATCHES_PER_SECOND) == 0 {
                        rss.push(rss_kb(pid)?);
                    }
                }
                let achieved =
                    (committed.len() as u64 * per_batch) as f64 / phase.elapsed().as_secs_f64();
                let latencies = wait_visible(&observer, &committed, follower)?;
                rows.push((
                    format!(
                        "sustained, {} events/s offered ({achieved:.0} achieved) x {} s, {per_batch} per transaction",
                        bench.sustained_rate, bench.sustained_seconds
                    ),
                    summary(&latencies),
                ));
                let first = rss.first().copied().unwrap_or(0);
                let max = rss.iter().copied().max().unwrap_or(0);
                let last = rss.last().copied().unwrap_or(0);
                let wal = |name: &str| {
                    std::fs::metadata(dir.join(format!("{name}.db-wal"))).map_or(0, |m| m.len())
                };
                rows.push((
                    "projection files' -wal after sustained".into(),
                    PROJECTIONS
                        .iter()
                        .map(|name| format!("{name} {:.1} MiB", wal(name) as f64 / 1048576.0))
                        .collect::<Vec<_>>()
                        .join(", "),
                ));
                rows.push((
                    "follower RSS during sustained".into(),
                    format!(
                        "first {:.1} MiB, max {:.1} MiB, last {:.1} MiB",
                        first as f64 / 1024.0,
                        max as f64 / 1024.0,
                        last as f64 / 1024.0
                    ),
                ));
            }
            Ok(())
        })();
        observer.stop.store(true, Ordering::Relaxed);
        let watched = watching.join().expect("observer thread");
        result.and(watched)
    });
    outcome?;
    // Shutdown.
    rows.push(terminate(follower, &dir.join("follower.log"))?);
    if let Target::Sqlite(store) = target {
        let checked = check_digests(store, dir, projectionist_demo::CONFIG, &PROJECTIONS)?;
        rows.push(("exactly once".into(), checked));
        let wal = std::fs::metadata(format!("{}-wal", store.display())).map_or(0, |m| m.len());
        rows.push((
            "event store -wal after the run".into(),
            format!("{:.1} MiB", wal as f64 / 1048576.0),
        ));
    }
    out!(
        "\n### follow, {label} store, {} events before the start\n",
        bench.events
    );
    out!("| measure | result |\n|---|---|");
    for (name, value) in rows {
        out!("| {name} | {value} |");
    }
    Ok(())
}

/// The follower's CPU while nothing is appended for `seconds`: the row
/// "idle CPU".
pub(crate) fn idle_cpu(pid: u32, seconds: u64) -> anyhow::Result<(String, String)> {
    let before = cpu_seconds(pid)?;
    std::thread::sleep(Duration::from_secs(seconds));
    let idle = (cpu_seconds(pid)? - before) / seconds as f64;
    Ok((
        "idle CPU".into(),
        format!("{:.2}% of a core over {seconds} s", idle * 100.0),
    ))
}

/// Stops the follower with SIGTERM: the row "SIGTERM to exit" (time, exit
/// code); an error unless it exited 0 (its log is at `log`).
pub(crate) fn terminate(follower: &mut Child, log: &Path) -> anyhow::Result<(String, String)> {
    let pid = follower.id();
    let term = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    if !status.success() {
        bail!("kill -TERM {pid} failed");
    }
    let exit = follower.wait()?;
    let row = (
        "SIGTERM to exit".into(),
        format!(
            "{:.0} ms, exit code {:?}",
            term.elapsed().as_secs_f64() * 1e3,
            exit.code()
        ),
    );
    if exit.code() != Some(0) {
        bail!("the follower exited with {exit} (see {})", log.display());
    }
    Ok(row)
}

/// Waits until the follower has created both projection files.
fn wait_until_exists(dir: &Path, follower: &mut Child) -> anyhow::Result<()> {
    while !PROJECTIONS
        .iter()
        .all(|name| dir.join(format!("{name}.db")).exists())
    {
        check_running(follower)?;
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn check_running(follower: &mut Child) -> anyhow::Result<()> {
    if let Some(exit) = follower.try_wait()? {
        bail!("the follower exited early with {exit}");
    }
    Ok(())
}

/// Each append's latency: from its commit to when both projections show it.
fn wait_visible(
    observer: &Observer,
    committed: &[(u64, Instant)],
    follower: &mut Child,
) -> anyhow::Result<Vec<Duration>> {
    let last = committed.last().map_or(0, |(s, _)| *s);
    let deadline = Instant::now() + CATCH_UP_MAX;
    while observer.low() < last {
        check_running(follower)?;
        if Instant::now() > deadline {
            bail!("the follower did not reach {last} within {CATCH_UP_MAX:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(committed
        .iter()
        .map(|(sequence, at)| {
            observer
                .visible_at(*sequence)
                .map_or(Duration::ZERO, |seen| seen.saturating_duration_since(*at))
        })
        .collect())
}

/// p50, p99 and max, in milliseconds.
pub(crate) fn summary(latencies: &[Duration]) -> String {
    let mut ms: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    format!(
        "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} appends)",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0),
        ms.len()
    )
}

/// CPU seconds of a process so far, over all its threads: the scheduler's
/// own nanosecond count (`/proc/<pid>/task/*/schedstat`), not the clock-tick
/// samples of `/proc/<pid>/stat`, which miss or overcount short wake-ups.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let mut nanos = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(stat) = std::fs::read_to_string(task?.path().join("schedstat")) else {
            continue; // the thread has ended
        };
        nanos += stat
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(nanos as f64 / 1e9)
}

/// Resident set size of a process now, in KiB.
fn rss_kb(pid: u32) -> anyhow::Result<u64> {
    proc_status_kb(pid, "VmRSS:")
}

/// The number on line `key` of `/proc/<pid>/status` (KiB for the `Vm` lines).
pub(crate) fn proc_status_kb(pid: u32, key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// Rebuilds projections `names` of `config` from the final log into a
/// directory of their own and compares digests with the follower's.
pub(crate) fn check_digests(
    store: &Path,
    dir: &Path,
    config: &str,
    names: &[&str],
) -> anyhow::Result<String> {
    let config = ProjectionsConfig::parse(config, "bench config")?;
    let reader = projectionist::SqliteEventStore::open_read_only(store)?;
    let reference = ProjectionDir::open(dir.join("reference"))?;
    let dbs = names
        .iter()
        .map(|name| reference.db(name))
        .collect::<Result<Vec<_>, _>>()?;
    let mut handlers = names
        .iter()
        .map(|name| {
            let projection = config
                .get(name)
                .with_context(|| format!("no projection {name}"))?;
            Ok(SqlHandler::new(projection))
        })
        .collect::<anyhow::Result<Vec<SqlHandler<'_>>>>()?;
    let targets = handlers
        .iter_mut()
        .zip(&dbs)
        .zip(names.iter().copied())
        .map(|((handler, db), name)| {
            let target = ProjectionTarget::new(
                db,
                handler as &mut dyn projectionist::Handler<serde_json::Value>,
            )
            .consumer_id(name);
            target.start(Start::Reset)
        })
        .collect();
    for result in replay(&reader, targets, &projectionist::RebuildOptions::default()) {
        result?;
    }
    let head = GlobalReader::<serde_json::Value>::head(&reader)?;
    for name in names {
        let digest = |path: PathBuf| -> anyhow::Result<String> {
            Ok(projection_digest(
                &Connection::open(path)?,
                DigestScope::ProjectionTables,
            )?)
        };
        let followed = digest(dir.join(format!("{name}.db")))?;
        let rebuilt = digest(dir.join("reference").join(format!("{name}.db")))?;
        if followed != rebuilt {
            bail!("{name}: the follower's tables differ from a rebuild of the final log");
        }
    }
    Ok(format!(
        "{} equal a rebuild of the final log ({head} events)",
        names.join(", ")
    ))
}

/// A copy of the log at `from` in schema `schema` of the server at `base`,
/// made afresh (the phases append to it); returns its URL.
fn copy_pg(base: &str, from: &str, schema: &str) -> anyhow::Result<String> {
    let mut client = postgres::Client::connect(base, postgres::NoTls)?;
    // `schema` is ours, made of a fixed prefix and a number.
    client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))?;
    let to = projectionist_postgres::url_with_schema(base, schema)?;
    let source = projectionist_postgres::PostgresEventStore::connect(from)?;
    let target = projectionist_postgres::PostgresEventStore::connect(&to)?;
    target.init()?;
    crate::rebuild::copy_into_pg(&source, &target)?;
    Ok(to)
}
