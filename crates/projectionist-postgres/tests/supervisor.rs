//! The supervisor of `projectionist-runner` over the PostgreSQL store: a
//! projection held at a hole that a transaction in progress may still fill is
//! `waiting` (healthy, with the hole), not stalled and not following past
//! it; a killed connection is made again and following goes on, no event
//! lost.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::PgSchema;
use projectionist::rusqlite::Transaction;
use projectionist::{GlobalEvent, NewEvent, SchemaHandler};
use projectionist_postgres::PostgresEventStore;
use projectionist_runner::{State, Supervised, Supervisor, WaitReason};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn counter() -> impl projectionist::Handler<Value> + 'static {
    SchemaHandler::new(
        "CREATE TABLE IF NOT EXISTS seen (sequence INTEGER PRIMARY KEY)",
        |tx: &Transaction<'_>, events: &[GlobalEvent<Value>]| {
            for event in events {
                tx.execute("INSERT INTO seen VALUES (?1)", [event.sequence as i64])?;
            }
            Ok(())
        },
    )
}

fn append(store: &PostgresEventStore, stream: &str) -> u64 {
    store
        .append(stream, 0, &[NewEvent::json("Seen", &json!({})).unwrap()])
        .unwrap()
        .last_sequence
}

#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn a_supervised_projection_waits_at_a_hole_and_follows_on_after_a_killed_connection() {
    let Some(pg) = PgSchema::new("supervised") else {
        return;
    };
    // The supervisor's reads go through a connection of their own, named so
    // that only it is killed below.
    let app = format!("{}_reader", pg.schema);
    let store = Arc::new(
        PostgresEventStore::connect(&format!("{}&application_name={app}", pg.url())).unwrap(),
    );
    store.init().unwrap();
    let appender = PostgresEventStore::connect(&pg.url()).unwrap();
    append(&appender, "first");
    let tmp = tempfile::tempdir().unwrap();
    let outage_store = Arc::clone(&store);
    let supervisor = Supervisor::<Value>::builder(store.clone(), tmp.path())
        .unwrap()
        .stall_after(Duration::from_millis(500))
        .outage(move || outage_store.outage().map(|o| o.error))
        .projection(Supervised::new("seen", counter()).unwrap())
        .start()
        .unwrap();
    supervisor.wait_for("seen", 1, DEADLINE).unwrap();

    // A writer holds sequence 2; 3 commits behind it.
    let mut holder = pg.client();
    let mut tx = holder.transaction().unwrap();
    tx.execute("SELECT pg_current_xact_id()", &[]).unwrap();
    let held: i64 = tx
        .query_one(
            "INSERT INTO events (stream_id, stream_version, event_type, data) VALUES ('held', 1, 'Seen', '{}') RETURNING sequence",
            &[],
        )
        .unwrap()
        .get(0);
    let behind = append(&appender, "behind");
    wait_until("waiting at the hole", || {
        matches!(
            supervisor.status_of("seen").unwrap().state,
            State::Waiting(WaitReason::Hole { sequence, .. }) if sequence == held as u64
        )
    });
    // Until the hole has been waited at for well past the stall bound (500 ms)
    // and two looks of the head watch (1 s each): waiting at every look (a
    // hole ends by itself), healthy, nothing past the hole applied.
    loop {
        let status = supervisor.status_of("seen").unwrap();
        let State::Waiting(WaitReason::Hole { since, .. }) = status.state else {
            panic!("left waiting while the hole is held: {status:?}");
        };
        assert!(
            supervisor.unhealthy().is_empty(),
            "{:?}",
            supervisor.unhealthy()
        );
        if since.elapsed() > Duration::from_millis(2_500) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = supervisor.status_of("seen").unwrap();
    assert!(matches!(status.state, State::Waiting(_)), "{status:?}");
    assert!(
        supervisor.unhealthy().is_empty(),
        "{:?}",
        supervisor.unhealthy()
    );
    assert_eq!(status.checkpoint, 1);
    tx.commit().unwrap();
    supervisor.wait_for("seen", behind, DEADLINE).unwrap();

    // The store's connection is killed: reads connect again; nothing lost.
    let mut admin = pg.client();
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .unwrap()
        .get(0);
    assert!(killed >= 1, "the reader's connection was found");
    let last = append(&appender, "after-kill");
    supervisor.wait_for("seen", last, DEADLINE).unwrap();
    wait_until("following", || {
        supervisor.status_of("seen").unwrap().state == State::Following
    });
    drop(supervisor);
    let conn = projectionist::rusqlite::Connection::open(tmp.path().join("seen.db")).unwrap();
    let seen: i64 = conn
        .query_row("SELECT count(*) FROM seen", [], |r| r.get(0))
        .unwrap();
    assert_eq!(seen as u64, last, "every event applied exactly once");
}

/// An event committed into a hole the supervisor's reads had passed (its
/// writer broke the writer contract) is reported, and the projection that
/// lacks it is rebuilt in its shadow and published: afterwards it holds every
/// event exactly once.
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn a_late_event_is_reported_and_its_projection_rebuilt() {
    let Some(pg) = PgSchema::new("supervised_late") else {
        return;
    };
    let store = Arc::new(PostgresEventStore::connect(&pg.url()).unwrap());
    store.init().unwrap();
    let appender = PostgresEventStore::connect(&pg.url()).unwrap();
    append(&appender, "first");
    let tmp = tempfile::tempdir().unwrap();
    let late_store = Arc::clone(&store);
    let reported = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&reported);
    let supervisor = Supervisor::<Value>::builder(store.clone(), tmp.path())
        .unwrap()
        .late_events(
            move || {
                late_store
                    .late_events()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|e| (e.sequence, e.event_type))
                    .collect()
            },
            projectionist_runner::OnLateEvent::Rebuild,
        )
        .on_event(move |event| {
            if let projectionist_runner::Event::LateEvent {
                sequence,
                projections,
                rebuilding,
                ..
            } = event
            {
                seen.lock()
                    .unwrap()
                    .push((*sequence, projections.clone(), *rebuilding));
            }
        })
        .projection(Supervised::new("seen", counter()).unwrap())
        .start()
        .unwrap();
    supervisor.wait_for("seen", 1, DEADLINE).unwrap();
    // A number drawn and never used (for now): a hole the reads pass.
    let mut client = pg.client();
    let drawn: i64 = client
        .query_one(
            "SELECT nextval(pg_get_serial_sequence('events', 'sequence'))",
            &[],
        )
        .unwrap()
        .get(0);
    let after = append(&appender, "after");
    supervisor.wait_for("seen", after, DEADLINE).unwrap();
    // Its writer commits it late, into the passed hole.
    client
        .execute(
            "INSERT INTO events (sequence, stream_id, stream_version, event_type, data) \
             VALUES ($1, 'late', 1, 'Seen', '{}')",
            &[&drawn],
        )
        .unwrap();
    wait_until("the late event reported", || {
        !reported.lock().unwrap().is_empty()
    });
    assert_eq!(
        reported.lock().unwrap()[0],
        (drawn as u64, vec!["seen".to_owned()], true)
    );
    let seen_rows = || {
        let conn = projectionist::rusqlite::Connection::open(tmp.path().join("seen.db")).unwrap();
        conn.query_row("SELECT count(*) FROM seen", [], |r| r.get::<_, i64>(0))
            .unwrap()
    };
    wait_until("the rebuilt projection holds the late event", || {
        seen_rows() == 3 && supervisor.status_of("seen").unwrap().state == State::Following
    });
    assert!(
        tmp.path().join(".seen.previous.db").exists(),
        "published from a shadow"
    );
}

/// Snapshots kept in PostgreSQL, in chunks: a projection of several chunks
/// is stored, listed, fetched back byte for byte and seeds a supervisor on
/// another directory; `--keep`-style pruning deletes the older one.
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn snapshots_kept_in_postgres_round_trip_in_chunks_and_seed_a_supervisor() {
    use projectionist_postgres::{PostgresSnapshots, SNAPSHOT_CHUNK_BYTES};
    use projectionist_runner::snapshot::{SnapshotLocation, store_identity, take_snapshot};
    let Some(pg) = PgSchema::new("snapshots") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let store =
        Arc::new(projectionist::SqliteEventStore::create(tmp.path().join("events.db")).unwrap());
    let padding = "x".repeat(200);
    let events: Vec<NewEvent> = (0..20_000)
        .map(|i| NewEvent::json("Seen", &json!({"i": i, "pad": padding})).unwrap())
        .collect();
    for (k, chunk) in events.chunks(5_000).enumerate() {
        store.append(&format!("s{k}"), 0, chunk).unwrap();
    }
    let wide = || {
        SchemaHandler::new(
            "CREATE TABLE IF NOT EXISTS wide (sequence INTEGER PRIMARY KEY, pad TEXT)",
            |tx: &Transaction<'_>, events: &[GlobalEvent<Value>]| {
                for event in events {
                    tx.execute(
                        "INSERT INTO wide VALUES (?1, ?2)",
                        (event.sequence as i64, event.data["pad"].as_str()),
                    )?;
                }
                Ok(())
            },
        )
    };
    let first_dir = tmp.path().join("first");
    let first = Supervisor::<Value>::builder(store.clone(), &first_dir)
        .unwrap()
        .projection(Supervised::new("wide", wide()).unwrap().version(1))
        .start()
        .unwrap();
    first.wait_for("wide", 20_000, DEADLINE).unwrap();
    let location = PostgresSnapshots::connect_in(&pg.base_url, &pg.schema).unwrap();
    let identity = store_identity::<Value>(&*store).unwrap().unwrap();
    let older = take_snapshot(&first_dir, "wide", &location, &identity, 0).unwrap();
    assert!(
        older.bytes > 2 * SNAPSHOT_CHUNK_BYTES as u64,
        "several chunks: {} bytes",
        older.bytes
    );
    store
        .append(
            "more",
            0,
            &[NewEvent::json("Seen", &json!({"pad": "y"})).unwrap()],
        )
        .unwrap();
    first.wait_for("wide", 20_001, DEADLINE).unwrap();
    let newer = take_snapshot(&first_dir, "wide", &location, &identity, 1).unwrap();
    let listed = location.manifests("wide").unwrap();
    assert_eq!(listed, vec![newer.clone()], "keep 1 pruned the older one");
    // Fetched back byte for byte (the manifest's checksum).
    let fetched = tmp.path().join("fetched.db");
    location.fetch(&newer, &fetched).unwrap();
    assert_eq!(std::fs::metadata(&fetched).unwrap().len(), newer.bytes);
    drop(first);
    let second_dir = tmp.path().join("second");
    let seeded = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let saw = Arc::clone(&seeded);
    let second = Supervisor::<Value>::builder(store.clone(), &second_dir)
        .unwrap()
        .seed_from(location)
        .on_event(move |event| {
            if let projectionist_runner::Event::Seeded(m) = event {
                saw.store(m.checkpoint, std::sync::atomic::Ordering::SeqCst);
            }
        })
        .projection(Supervised::new("wide", wide()).unwrap().version(1))
        .start()
        .unwrap();
    second.wait_for("wide", 20_001, DEADLINE).unwrap();
    assert_eq!(seeded.load(std::sync::atomic::Ordering::SeqCst), 20_001);
    let rows = projectionist::rusqlite::Connection::open(second_dir.join("wide.db"))
        .unwrap()
        .query_row("SELECT count(*) FROM wide", [], |r| r.get::<_, i64>(0))
        .unwrap();
    assert_eq!(rows, 20_001);
}
