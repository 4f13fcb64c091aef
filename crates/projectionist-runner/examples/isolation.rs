//! Measures the supervisor's isolation: while one projection's new version is
//! rebuilt in its shadow over a large log, how soon does a sibling apply each
//! new event, and does it ever leave `following`?
//!
//! `cargo run --release -p projectionist-runner --example isolation -- [EVENTS] [INTERVAL_MS]`
//! (default 1,000,000 events, an append every 100 ms). Prints the shadow
//! build's time and the sibling's apply latency (median, 95th percentile,
//! max) over the appends made while the shadow was being built.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use projectionist::rusqlite::Transaction;
use projectionist::{GlobalEvent, NewEvent, SchemaHandler, SqliteEventStore, StreamAppend};
use projectionist_runner::{Event, State, Supervised, Supervisor};
use serde::Deserialize;

/// Events appended per transaction while the log is generated.
const GENERATE_CHUNK: usize = 10_000;

#[derive(Deserialize)]
struct Added {
    n: i64,
}

/// Sums `n` times `factor` per stream.
fn sums(factor: i64) -> impl projectionist::Handler<Added> + 'static {
    SchemaHandler::new(
        "CREATE TABLE IF NOT EXISTS sums (stream TEXT PRIMARY KEY, total INTEGER NOT NULL)",
        move |tx: &Transaction<'_>, events: &[GlobalEvent<Added>]| {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO sums VALUES (?1, ?2)
                 ON CONFLICT (stream) DO UPDATE SET total = total + excluded.total",
            )?;
            for event in events {
                upsert.execute((&event.stream_id, event.data.n * factor))?;
            }
            Ok(())
        },
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let events: usize = args.next().map_or(Ok(1_000_000), |a| a.parse())?;
    let interval = Duration::from_millis(args.next().map_or(Ok(100), |a| a.parse())?);
    let tmp = tempfile::tempdir()?;
    let store = Arc::new(SqliteEventStore::create(tmp.path().join("events.db"))?);
    let generated = Instant::now();
    let payload = NewEvent::json("Added", &serde_json::json!({"n": 1}))?;
    let mut appended = 0;
    let mut stream = 0u64;
    while appended < events {
        let chunk = GENERATE_CHUNK.min(events - appended);
        // Ten events per stream.
        let streams: Vec<(String, Vec<NewEvent>)> = (0..chunk.div_ceil(10))
            .map(|i| {
                stream += 1;
                let n = 10.min(chunk - i * 10);
                (format!("s-{stream}"), vec![payload.clone(); n])
            })
            .collect();
        let appends: Vec<StreamAppend<'_>> = streams
            .iter()
            .map(|(id, events)| StreamAppend {
                stream_id: id,
                expected_version: 0,
                events,
            })
            .collect();
        store.append_batch(&appends)?;
        appended += chunk;
    }
    eprintln!(
        "generated {events} events in {:.1} s",
        generated.elapsed().as_secs_f64()
    );
    let dir = tmp.path().join("projections");
    let first = Supervisor::builder(store.clone(), &dir)?
        .projection(Supervised::new("rebuilt", sums(1))?.version(1))
        .projection(Supervised::new("sibling", sums(1))?.version(1))
        .start()?;
    let head = events as u64;
    first.wait_for("rebuilt", head, Duration::from_secs(3_600))?;
    first.wait_for("sibling", head, Duration::from_secs(3_600))?;
    drop(first);

    // The sibling's state changes while the shadow is built.
    let sibling_changes = Arc::new(AtomicU64::new(0));
    let changes = Arc::clone(&sibling_changes);
    let started = Instant::now();
    let supervisor = Supervisor::builder(store.clone(), &dir)?
        .projection(Supervised::new("rebuilt", sums(10))?.version(2))
        .projection(Supervised::new("sibling", sums(1))?.version(1))
        .on_event(move |event| {
            if let Event::State(status) = event
                && status.name == "sibling"
            {
                changes.fetch_add(1, Ordering::SeqCst);
            }
        })
        .start()?;
    while supervisor.status_of("rebuilt")?.state != State::BuildingShadow {
        std::thread::sleep(Duration::from_millis(1));
    }
    supervisor.wait_for("sibling", head, Duration::from_secs(60))?;
    while supervisor.status_of("sibling")?.state != State::Following {
        std::thread::sleep(Duration::from_millis(1));
    }
    let changes_before = sibling_changes.load(Ordering::SeqCst);
    let mut latencies = Vec::new();
    let mut left_following = false;
    let mut n = 0;
    while supervisor.status_of("rebuilt")?.state == State::BuildingShadow {
        n += 1;
        let sequence = store
            .append(&format!("late-{n}"), 0, std::slice::from_ref(&payload))?
            .last_sequence;
        let asked = Instant::now();
        supervisor.wait_for("sibling", sequence, Duration::from_secs(60))?;
        latencies.push(asked.elapsed());
        left_following |= supervisor.status_of("sibling")?.state != State::Following;
        std::thread::sleep(interval);
    }
    let shadow_seconds = started.elapsed().as_secs_f64();
    while supervisor.status_of("rebuilt")?.state != State::Following {
        std::thread::sleep(Duration::from_millis(1));
    }
    left_following |= sibling_changes.load(Ordering::SeqCst) != changes_before;
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "events {events}; shadow of 'rebuilt' built and published in {shadow_seconds:.1} s; \
         {} appends meanwhile: sibling applied each in median {:.1} ms, p95 {:.1} ms, max {:.1} ms; \
         sibling left following: {left_following}",
        latencies.len(),
        at(0.5),
        at(0.95),
        at(1.0),
    );
    Ok(())
}
