//! `projectionist bench-follow --many N`: one `follow` process keeping N small
//! declarative projections current (multi-tenant setups have hundreds to
//! thousands), measured from outside: catch-up time, threads, file
//! descriptors and memory of the follower, idle CPU, how long a new event takes
//! to reach the last projection, shutdown, and digests against a rebuild.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use projectionist::rusqlite::{Connection, OpenFlags};

use crate::common::out;
use crate::follow::{FollowBench, proc_status_kb, summary};

/// Events in the log before the follower starts: enough for every projection
/// to have rows, small enough that the measurement is about the many
/// projections, not the log.
const MANY_EVENTS: u64 = 10_000;

/// The event types the projections are spread over.
const MANY_TYPES: [&str; 4] = ["OrderPlaced", "ItemAdded", "ItemRemoved", "OrderShipped"];

/// Appends per second while the latency to the last projection is measured.
/// Each append (an `OrderPlaced`) is applied by every projection of that type;
/// the others' checkpoints move too, at once when their files stay open, at
/// most every `limits::PARKED_CHECKPOINT_INTERVAL` when they are parked.
const MANY_RATE: u32 = 20;

/// How long the follower may take to catch up before the bench gives up.
const CATCH_UP_MAX: Duration = Duration::from_secs(900);

/// N projections `p0000`.., each counting events of one type per stream in
/// one table, with one statement.
fn config(n: u32) -> String {
    let mut config = String::new();
    for i in 0..n {
        let event_type = MANY_TYPES[i as usize % MANY_TYPES.len()];
        config.push_str(&format!(
            "[[projection]]\nname = \"p{i:04}\"\nversion = 1\n\
             schema = \"CREATE TABLE counts (stream TEXT PRIMARY KEY, n INTEGER NOT NULL)\"\n\
             [projection.on.{event_type}]\n\
             sql = \"INSERT INTO counts VALUES (:_stream_id, 1) ON CONFLICT (stream) DO UPDATE SET n = n + 1\"\n\n"
        ));
    }
    config
}

/// The committed checkpoint of projection `name` in `dir`, 0 before it exists.
fn checkpoint(dir: &Path, name: &str) -> u64 {
    let path = dir.join(format!("{name}.db"));
    let read = || -> projectionist::rusqlite::Result<i64> {
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.query_row(
            "SELECT coalesce(max(sequence), 0) FROM _checkpoint",
            [],
            |r| r.get(0),
        )
    };
    read().map_or(0, i64::cast_unsigned)
}

/// What the follower holds now: threads, open file descriptors, RSS (KiB).
fn holdings(pid: u32) -> anyhow::Result<(u64, usize, u64)> {
    let threads = proc_status_kb(pid, "Threads:")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((threads, fds, proc_status_kb(pid, "VmRSS:")?))
}

pub fn run(bench: &FollowBench, n: u32) -> anyhow::Result<()> {
    let dir = bench.work.join("follow-many");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let source = crate::rebuild::prepare_log(&bench.work, MANY_EVENTS, bench.seed)?;
    let config_path = dir.join("many.toml");
    std::fs::write(&config_path, config(n))?;
    let store = dir.join("events.db");
    {
        let conn = Connection::open(&source)?;
        conn.execute("VACUUM INTO ?1", [store.display().to_string()])?;
        Connection::open(&store)?.pragma_update(None, "journal_mode", "WAL")?;
    }
    let projections = dir.join("projections");
    let log = dir.join("follower.log");
    let store_spec = store.display().to_string();
    crate::follow::with_follower(&store_spec, &projections, &config_path, &log, |follower| {
        phases(bench, n, &store, &projections, &config_path, follower)
    })
}

fn phases(
    bench: &FollowBench,
    n: u32,
    store: &Path,
    dir: &Path,
    config: &Path,
    follower: &mut Child,
) -> anyhow::Result<()> {
    let pid = follower.id();
    let names: Vec<String> = (0..n).map(|i| format!("p{i:04}")).collect();
    // The appends are `OrderPlaced`: the last projection of that type shows
    // how long the last of those that apply it takes.
    let last = names
        .iter()
        .enumerate()
        .rev()
        .find(|(i, _)| MANY_TYPES[i % MANY_TYPES.len()] == "OrderPlaced")
        .map(|(_, name)| name.clone())
        .expect("at least one projection");
    let all_at = |sequence: u64| names.iter().all(|name| checkpoint(dir, name) >= sequence);
    let mut rows: Vec<(String, String)> = Vec::new();
    let started = Instant::now();
    let mut peak = (0, 0, 0);
    while !all_at(MANY_EVENTS) {
        if let Some(exit) = follower.try_wait()? {
            bail!("the follower exited early with {exit}");
        }
        if started.elapsed() > CATCH_UP_MAX {
            bail!("the follower did not catch up within {CATCH_UP_MAX:?}");
        }
        let now = holdings(pid)?;
        peak = (peak.0.max(now.0), peak.1.max(now.1), peak.2.max(now.2));
        std::thread::sleep(Duration::from_millis(200));
    }
    rows.push((
        "catch-up".into(),
        format!(
            "{MANY_EVENTS} events into {n} projections in {:.1} s",
            started.elapsed().as_secs_f64()
        ),
    ));
    let (threads, fds, rss) = holdings(pid)?;
    rows.push((
        "while catching up, at most".into(),
        format!(
            "{} threads, {} file descriptors, {:.1} MiB RSS",
            peak.0,
            peak.1,
            peak.2 as f64 / 1024.0
        ),
    ));
    rows.push((
        "following, caught up".into(),
        format!(
            "{threads} threads, {fds} file descriptors, {:.1} MiB RSS",
            rss as f64 / 1024.0
        ),
    ));
    rows.push(crate::follow::idle_cpu(pid, bench.idle_seconds)?);
    // Appends, one event per transaction: the time until the last projection
    // (the last one its writer thread serves) shows each.
    let appender = Connection::open(store)?;
    appender.busy_timeout(Duration::from_secs(10))?;
    let appends = u64::from(MANY_RATE) * bench.seconds;
    let mut latencies = Vec::with_capacity(appends as usize);
    for i in 0..appends {
        let data = serde_json::json!({"order_id": format!("many-{i}"), "customer_id": "c1"});
        appender.execute(
            "INSERT INTO events (stream_id, stream_version, event_type, data) VALUES (?1, 1, 'OrderPlaced', ?2)",
            (format!("order-many-{i}"), data.to_string()),
        )?;
        let sequence = appender.last_insert_rowid().cast_unsigned();
        let committed = Instant::now();
        while checkpoint(dir, &last) < sequence {
            if committed.elapsed() > Duration::from_secs(60) {
                bail!("{last} did not reach {sequence} within 60 s");
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        latencies.push(committed.elapsed());
        std::thread::sleep(Duration::from_secs(1) / MANY_RATE);
    }
    let head = MANY_EVENTS + appends;
    let waited = Instant::now();
    while !all_at(head) {
        if waited.elapsed() > Duration::from_secs(60) {
            bail!("not every projection reached {head} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    rows.push((
        format!(
            "latency to the last projection that applies it ({last}), {MANY_RATE} appends/s x {} s",
            bench.seconds
        ),
        summary(&latencies),
    ));
    let (threads, fds, rss) = holdings(pid)?;
    rows.push((
        "after the appends".into(),
        format!(
            "{threads} threads, {fds} file descriptors, {:.1} MiB RSS (peak {:.1} MiB)",
            rss as f64 / 1024.0,
            proc_status_kb(pid, "VmHWM:")? as f64 / 1024.0
        ),
    ));
    let log = dir.parent().unwrap_or(dir).join("follower.log");
    rows.push(crate::follow::terminate(follower, &log)?);
    let checked = [
        names[0].as_str(),
        names[names.len() / 2].as_str(),
        last.as_str(),
    ];
    let config_text = std::fs::read_to_string(config)?;
    rows.push((
        "exactly once".into(),
        crate::follow::check_digests(store, dir, &config_text, &checked)?,
    ));
    out!("\n### follow, {n} projections, SQLite store\n");
    out!("| measure | result |\n|---|---|");
    for (name, value) in rows {
        out!("| {name} | {value} |");
    }
    Ok(())
}
