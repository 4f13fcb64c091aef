//! Gap-safe reading against a real PostgreSQL server: a deterministic held
//! transaction (with a naive reader as the negative control), a rollback hole,
//! and 16 concurrent writers with random commit delays and rollbacks.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::PgSchema;
use postgres::Client;
use projectionist::{GlobalEvent, GlobalReader, NewEvent};
use projectionist_postgres::PostgresEventStore;
use serde_json::Value;

fn store(pg: &PgSchema) -> PostgresEventStore {
    let store = PostgresEventStore::connect(&pg.url()).unwrap();
    store.init().unwrap();
    store.init().unwrap(); // idempotent
    store
}

fn sequences(events: &[GlobalEvent<Value>]) -> Vec<u64> {
    events.iter().map(|e| e.sequence).collect()
}

/// Inserts one event in an open transaction, the way our appends do (transaction
/// id first), and returns its sequence.
fn insert_held(tx: &mut postgres::Transaction<'_>, stream: &str) -> u64 {
    tx.execute("SELECT pg_current_xact_id()", &[]).unwrap();
    let row = tx
        .query_one(
            "INSERT INTO events (stream_id, stream_version, event_type, data) VALUES ($1, 1, 'Held', '{}') RETURNING sequence",
            &[&stream],
        )
        .unwrap();
    row.get::<_, i64>(0) as u64
}

/// The negative control: `sequence > checkpoint`, as a naive tailer reads.
fn naive_read(client: &mut Client, after: u64) -> Vec<u64> {
    client
        .query(
            "SELECT sequence FROM events WHERE sequence > $1 ORDER BY sequence",
            &[&(after as i64)],
        )
        .unwrap()
        .iter()
        .map(|r| r.get::<_, i64>(0) as u64)
        .collect()
}

#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn held_sequence_is_not_skipped_and_rollback_holes_are_passed() {
    let Some(pg) = PgSchema::new("held") else {
        return;
    };
    let store = store(&pg);
    let mut holder = pg.client();
    let mut naive = pg.client();

    // A takes sequence 1 and holds it; B appends sequence 2 and commits.
    let mut tx = holder.transaction().unwrap();
    let held = insert_held(&mut tx, "held");
    assert_eq!(held, 1);
    let b = store
        .append(
            "b",
            0,
            &[NewEvent::json("Later", &serde_json::json!({})).unwrap()],
        )
        .unwrap();
    assert_eq!(b.first_sequence, 2);

    // The naive reader sees 2, moves its checkpoint there, and loses 1 forever.
    let naive_first = naive_read(&mut naive, 0);
    assert_eq!(naive_first, [2]);
    // Ours hands out nothing while 1 may still commit.
    let ours: Vec<GlobalEvent<Value>> = store.read_after(0, 100).unwrap();
    assert!(
        ours.is_empty(),
        "handed out {:?} while 1 was in flight",
        sequences(&ours)
    );

    tx.commit().unwrap();
    assert_eq!(
        naive_read(&mut naive, 2),
        Vec::<u64>::new(),
        "the naive reader skipped the held event"
    );
    let ours: Vec<GlobalEvent<Value>> = store.read_after(0, 100).unwrap();
    assert_eq!(sequences(&ours), [1, 2]);

    // A rolled-back transaction leaves hole 3 forever; the reader passes it once
    // nothing that could fill it is running.
    let mut tx = holder.transaction().unwrap();
    assert_eq!(insert_held(&mut tx, "doomed"), 3);
    store
        .append(
            "c",
            0,
            &[NewEvent::json("After", &serde_json::json!({})).unwrap()],
        )
        .unwrap();
    let waiting: Vec<GlobalEvent<Value>> = store.read_after(2, 100).unwrap();
    assert!(waiting.is_empty(), "3 is still in flight");
    tx.rollback().unwrap();
    let mut passed = Vec::new();
    for _ in 0..20 {
        let events: Vec<GlobalEvent<Value>> = store.read_after(2, 100).unwrap();
        if !events.is_empty() {
            passed = sequences(&events);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(passed, [4], "the reader passed the rollback hole");
}

#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn append_conflicts_write_nothing_and_mapped_tables_read() {
    let Some(pg) = PgSchema::new("append") else {
        return;
    };
    let store = store(&pg);
    let e = || NewEvent::json("E", &serde_json::json!({"n": 1})).unwrap();
    store.append("s", 0, &[e(), e()]).unwrap();
    let err = store.append("s", 1, &[e()]).unwrap_err();
    assert!(
        matches!(err, projectionist::Error::Conflict { actual: 2, .. }),
        "{err:?}"
    );
    assert_eq!(GlobalReader::<Value>::head(&store).unwrap(), 2);

    let mut client = pg.client();
    client
        .batch_execute(
            "CREATE TABLE legacy (id BIGINT PRIMARY KEY, agg TEXT, ver INT, kind TEXT, body JSON, at TIMESTAMPTZ);
             INSERT INTO legacy VALUES (1, 'a', 1, 'Made', '{\"x\": 1}', now()), (2, 'a', 2, 'Changed', '{\"x\": 2}', now());",
        )
        .unwrap();
    let mapping = projectionist::EventTableMapping::new("legacy")
        .sequence("id")
        .stream_id("agg")
        .stream_version("ver")
        .event_type("kind")
        .data("body")
        .metadata(None)
        .recorded_at(Some("at"));
    let mapped = PostgresEventStore::connect_mapped(&pg.url(), &mapping).unwrap();
    let events: Vec<GlobalEvent<Value>> = mapped.read_after(0, 10).unwrap();
    assert_eq!(
        events
            .iter()
            .map(|e| (e.sequence, e.data["x"].as_i64().unwrap()))
            .collect::<Vec<_>>(),
        [(1, 1), (2, 2)]
    );
    let bad = mapping.data("nope");
    let err = PostgresEventStore::connect_mapped(&pg.url(), &bad).unwrap_err();
    assert!(format!("{err}: {:?}", err).contains("nope"), "{err:?}");
}

#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn concurrent_writers_with_delays_and_rollbacks_lose_nothing() {
    let Some(pg) = PgSchema::new("stress") else {
        return;
    };
    let store = store(&pg);
    let seconds: u64 = std::env::var("PROJECTIONIST_PG_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("PROJECTIONIST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!(
        "stress: seed {seed} (PROJECTIONIST_SEED), {seconds}s (PROJECTIONIST_PG_STRESS_SECS), 16 writers"
    );
    let committed = Arc::new(Mutex::new(BTreeSet::new()));
    let rollbacks = Arc::new(Mutex::new(0u64));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let (url, committed, rollbacks, stop) = (pg.url(), committed.clone(), rollbacks.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(seed ^ (w as u64) << 8);
                let mut client = Client::connect(&url, postgres::NoTls).unwrap();
                let mut version = 0i64;
                while !stop.load(Ordering::SeqCst) {
                    let mut tx = client.transaction().unwrap();
                    tx.execute("SELECT pg_current_xact_id()", &[]).unwrap();
                    let n = rng.i64(1..=3);
                    let mut mine = Vec::new();
                    for i in 1..=n {
                        let row = tx
                            .query_one(
                                "INSERT INTO events (stream_id, stream_version, event_type, data) VALUES ($1, $2, 'W', '{}') RETURNING sequence",
                                &[&format!("w{w}"), &(version + i)],
                            )
                            .unwrap();
                        mine.push(row.get::<_, i64>(0) as u64);
                    }
                    std::thread::sleep(Duration::from_millis(rng.u64(0..20)));
                    if rng.u8(0..100) < 5 {
                        tx.rollback().unwrap();
                        *rollbacks.lock().unwrap() += 1;
                    } else {
                        tx.commit().unwrap();
                        version += n;
                        committed.lock().unwrap().extend(mine);
                    }
                }
            })
        })
        .collect();
    // The tailer: reads from its checkpoint as a projection would.
    let mut seen: Vec<u64> = Vec::new();
    let mut checkpoint = 0;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut writers = Some(writers);
    loop {
        let batch: Vec<GlobalEvent<Value>> = store.read_after(checkpoint, 500).unwrap();
        for e in &batch {
            assert!(
                e.sequence > checkpoint,
                "out of order: {} after {checkpoint}",
                e.sequence
            );
            checkpoint = e.sequence;
            seen.push(e.sequence);
        }
        if Instant::now() >= deadline
            && let Some(writers) = writers.take()
        {
            stop.store(true, Ordering::SeqCst);
            for w in writers {
                w.join().unwrap();
            }
        }
        if writers.is_none() && batch.is_empty() {
            let committed = committed.lock().unwrap();
            if seen.len() >= committed.len() || seen.last() >= committed.last() {
                break;
            }
        }
        if batch.is_empty() {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let committed: Vec<u64> = committed.lock().unwrap().iter().copied().collect();
    let rollbacks = *rollbacks.lock().unwrap();
    let unique: BTreeSet<u64> = seen.iter().copied().collect();
    let lost: Vec<u64> = committed
        .iter()
        .filter(|s| !unique.contains(s))
        .copied()
        .collect();
    eprintln!(
        "stress: {} committed events, {rollbacks} rolled-back transactions, {} read, {} lost, {} duplicated",
        committed.len(),
        seen.len(),
        lost.len(),
        seen.len() - unique.len()
    );
    assert!(
        rollbacks > 0,
        "some transactions rolled back, leaving holes"
    );
    assert_eq!(unique.len(), seen.len(), "duplicates");
    assert!(
        lost.is_empty(),
        "lost {} events, first {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert_eq!(seen, committed, "exactly the committed events, in order");
}

/// Issue 8, item 7: a snapshot's `xmax` is one past the latest *completed*
/// transaction, so a transaction that took its id after another one, drew the
/// lower sequence and is still running sits at or above that `xmax`, outside
/// the snapshot's running list. A reader that treats `xmax` as the bound of the
/// hole's holder skips its event; this one must not.
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn a_holder_above_the_snapshot_xmax_is_not_skipped() {
    let Some(pg) = PgSchema::new("above_xmax") else {
        return;
    };
    let store = store(&pg);
    let mut first = pg.client();
    let mut holder = pg.client();
    // `first` takes its transaction id before `holder`, `holder` draws the lower
    // sequence, and only `first` commits: the latest completed transaction is
    // then below the holder's id.
    let mut first_tx = first.transaction().unwrap();
    first_tx
        .execute("SELECT pg_current_xact_id()", &[])
        .unwrap();
    let mut held_tx = holder.transaction().unwrap();
    let held = insert_held(&mut held_tx, "held");
    let committed = first_tx
        .query_one(
            "INSERT INTO events (stream_id, stream_version, event_type, data) VALUES ('first', 1, 'Held', '{}') RETURNING sequence",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0) as u64;
    first_tx.commit().unwrap();
    assert_eq!((held, committed), (1, 2));
    // Twice, as a follower would poll: the held event is never passed.
    for _ in 0..2 {
        let events: Vec<GlobalEvent<Value>> = store.read_after(0, 100).unwrap();
        assert_eq!(sequences(&events), Vec::<u64>::new());
    }
    held_tx.commit().unwrap();
    let events: Vec<GlobalEvent<Value>> = store.read_after(0, 100).unwrap();
    assert_eq!(sequences(&events), [1, 2]);
}

/// A follower waiting for a hint wakes when an append commits in another
/// connection (our appends notify as they commit), and a rolled-back append
/// wakes nobody.
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn a_waiting_follower_wakes_on_a_committed_append_only() {
    let Some(pg) = PgSchema::new("hints") else {
        return;
    };
    let reader = store(&pg);
    let appender = store(&pg);
    // The first wait opens the listener; nothing is appended meanwhile.
    GlobalReader::<Value>::wait_for_hint(&reader, Duration::from_millis(50)).unwrap();
    let waited = std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(200));
            let event = NewEvent::json("Opened", &serde_json::json!({})).unwrap();
            appender.append("hinted", 0, &[event]).unwrap();
        });
        let started = Instant::now();
        // A bound for a broken listener, not a speed requirement.
        GlobalReader::<Value>::wait_for_hint(&reader, Duration::from_secs(30)).unwrap();
        started.elapsed()
    });
    assert!(waited < Duration::from_secs(20), "woke after {waited:?}");
    // A transaction that rolls back notifies nobody: the wait runs out. The
    // channel is the database's, so a test appending in parallel may wake
    // it: a rollback must fail to wake it in one of three tries.
    let mut client = Client::connect(&pg.url(), postgres::NoTls).unwrap();
    let mut waits = Vec::new();
    for _ in 0..3 {
        let mut tx = client.transaction().unwrap();
        tx.execute(
            "SELECT pg_notify($1, '')",
            &[&projectionist_postgres::NOTIFY_CHANNEL],
        )
        .unwrap();
        tx.rollback().unwrap();
        let started = Instant::now();
        GlobalReader::<Value>::wait_for_hint(&reader, Duration::from_millis(300)).unwrap();
        waits.push(started.elapsed());
        if started.elapsed() >= Duration::from_millis(250) {
            return;
        }
    }
    panic!("woken by a rollback each time: {waits:?}");
}

/// Another program's table with a plain `bigserial`: its writers take no
/// transaction id before drawing a number.
fn foreign_table(pg: &PgSchema) -> projectionist::EventTableMapping {
    pg.client()
        .batch_execute(
            "CREATE TABLE flog (id BIGSERIAL PRIMARY KEY, stream TEXT NOT NULL, version BIGINT NOT NULL,
                                kind TEXT NOT NULL, body JSONB NOT NULL)",
        )
        .unwrap();
    projectionist::EventTableMapping::new("flog")
        .sequence("id")
        .stream_id("stream")
        .stream_version("version")
        .event_type("kind")
        .data("body")
        .metadata(None)
        .recorded_at(None)
}

/// A plain insert by another program, committed; returns its number.
fn foreign_insert(client: &mut Client, stream: &str) -> u64 {
    let row = client
        .query_one(
            "INSERT INTO flog (stream, version, kind, body) VALUES ($1, 1, 'W', '{}') RETURNING id",
            &[&stream],
        )
        .unwrap();
    row.get::<_, i64>(0) as u64
}

/// Issue 13, item 2: a foreign writer that draws its number (`nextval()`)
/// and inserts it later in the same transaction has no transaction id while
/// the hole is first seen, so the transaction-id bound alone would pass the
/// hole and skip its event; the reader must hold it until that transaction
/// has ended. A drawn-and-rolled-back number is passed once proven, and a
/// settle time holds every hole at least that long.
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn a_foreign_writer_that_draws_its_number_first_is_not_skipped() {
    let Some(pg) = PgSchema::new("foreign") else {
        return;
    };
    let mapping = foreign_table(&pg);
    let mapped = PostgresEventStore::connect_mapped(&pg.url(), &mapping).unwrap();
    let mut client = pg.client();
    assert_eq!(foreign_insert(&mut client, "a"), 1);
    let mut drawer = pg.client();
    let mut drawing = drawer.transaction().unwrap();
    let drawn: i64 = drawing
        .query_one("SELECT nextval('flog_id_seq')", &[])
        .unwrap()
        .get(0);
    assert_eq!(drawn, 2);
    assert_eq!(foreign_insert(&mut client, "c"), 3);
    // Held for the whole of each read's wait, however often it is read.
    for _ in 0..2 {
        let events: Vec<GlobalEvent<Value>> = mapped.read_after(0, 10).unwrap();
        assert_eq!(sequences(&events), [1], "2 is drawn and not yet inserted");
    }
    drawing
        .execute(
            "INSERT INTO flog (id, stream, version, kind, body) VALUES ($1, 'b', 1, 'W', '{}')",
            &[&drawn],
        )
        .unwrap();
    drawing.commit().unwrap();
    let events: Vec<GlobalEvent<Value>> = mapped.read_after(1, 10).unwrap();
    assert_eq!(sequences(&events), [2, 3], "the late insert, then the rest");

    // A drawn number whose transaction rolls back is passed, on proof.
    let mut drawing = drawer.transaction().unwrap();
    drawing
        .query_one("SELECT nextval('flog_id_seq')", &[])
        .unwrap();
    drawing.rollback().unwrap();
    assert_eq!(foreign_insert(&mut client, "e"), 5);
    let events: Vec<GlobalEvent<Value>> = mapped.read_after(3, 10).unwrap();
    assert_eq!(sequences(&events), [5], "hole 4 passed");

    // With a settle time, even a proven hole is held that long.
    let settle = Duration::from_millis(2_500);
    let settled = PostgresEventStore::connect_mapped(&pg.url(), &mapping)
        .unwrap()
        .with_hole_settle(settle);
    let mut drawing = drawer.transaction().unwrap();
    drawing
        .query_one("SELECT nextval('flog_id_seq')", &[])
        .unwrap();
    drawing.rollback().unwrap();
    assert_eq!(foreign_insert(&mut client, "g"), 7);
    let started = Instant::now();
    let first: Vec<GlobalEvent<Value>> = settled.read_after(5, 10).unwrap();
    assert!(
        first.is_empty(),
        "a read waits at most 2 s, less than the settle time"
    );
    let mut events: Vec<GlobalEvent<Value>> = Vec::new();
    while events.is_empty() {
        events = settled.read_after(5, 10).unwrap();
    }
    assert_eq!(sequences(&events), [7]);
    assert!(started.elapsed() >= settle, "{:?}", started.elapsed());
}

/// Reads from `after` until the reader has returned `through`, or the
/// deadline passes; returns every sequence read, in order.
fn read_until(
    store: &PostgresEventStore,
    after: u64,
    through: u64,
    deadline: Duration,
) -> Vec<u64> {
    let started = Instant::now();
    let mut read = Vec::new();
    let mut position = after;
    while position < through && started.elapsed() < deadline {
        let events: Vec<GlobalEvent<Value>> = store.read_after(position, 500).unwrap();
        if let Some(last) = events.last() {
            position = last.sequence;
        }
        read.extend(sequences(&events));
    }
    read
}

/// Issue 22, finding 1 (native table): a plain program draws the next number
/// with `nextval()` in a transaction that has no transaction id yet (it has
/// written nothing), another append commits the number after it, and the
/// first inserts its number and commits later. A transaction-id bound passed
/// the hole at once (the holder had no id) and lost the event; the lock the
/// draw took on the sequence holds the hole until the holder ends.
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn a_number_drawn_before_its_transaction_has_an_id_is_not_skipped() {
    let Some(pg) = PgSchema::new("late_xid") else {
        return;
    };
    let store = store(&pg);
    let e = || NewEvent::json("E", &serde_json::json!({})).unwrap();
    store.append("a", 0, &[e()]).unwrap();
    let mut drawer = pg.client();
    let mut drawing = drawer.transaction().unwrap();
    let drawn: i64 = drawing
        .query_one(
            "SELECT nextval(pg_get_serial_sequence('events', 'sequence'))",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(drawn, 2);
    let has_id: Option<String> = drawing
        .query_one("SELECT pg_current_xact_id_if_assigned()::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(has_id, None, "the drawer has no transaction id yet");
    assert_eq!(store.append("c", 0, &[e()]).unwrap().first_sequence, 3);
    for _ in 0..2 {
        let events: Vec<GlobalEvent<Value>> = store.read_after(1, 10).unwrap();
        assert_eq!(
            sequences(&events),
            Vec::<u64>::new(),
            "2 is drawn, not inserted"
        );
        assert_eq!(store.hole_wait().map(|w| w.sequence), Some(2));
    }
    drawing
        .execute(
            "INSERT INTO events (sequence, stream_id, stream_version, event_type, data) \
             VALUES ($1, 'b', 1, 'E', '{}')",
            &[&drawn],
        )
        .unwrap();
    drawing.commit().unwrap();
    let events: Vec<GlobalEvent<Value>> = store.read_after(1, 10).unwrap();
    assert_eq!(sequences(&events), [2, 3]);
    assert_eq!(store.hole_wait(), None);
}

/// Issue 22, finding 1 (another program's table): a writer whose session has
/// `track_activities = off` shows no transaction in `pg_stat_activity`; it
/// draws a number, another writer commits the next one, and it inserts its
/// number later. The hole must hold until it commits: decided from the lock
/// table, not from a monitoring view.
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn a_writer_hidden_from_pg_stat_activity_is_not_skipped() {
    let Some(pg) = PgSchema::new("hidden") else {
        return;
    };
    let mapping = foreign_table(&pg);
    let mapped = PostgresEventStore::connect_mapped(&pg.url(), &mapping).unwrap();
    let mut client = pg.client();
    assert_eq!(foreign_insert(&mut client, "a"), 1);
    let mut drawer = pg.client();
    drawer.batch_execute("SET track_activities = off").unwrap();
    let mut drawing = drawer.transaction().unwrap();
    let drawn: i64 = drawing
        .query_one("SELECT nextval('flog_id_seq')", &[])
        .unwrap()
        .get(0);
    assert_eq!(foreign_insert(&mut client, "c"), 3);
    let events: Vec<GlobalEvent<Value>> = mapped.read_after(0, 10).unwrap();
    assert_eq!(sequences(&events), [1], "2 is drawn and not yet inserted");
    let events: Vec<GlobalEvent<Value>> = mapped.read_after(1, 10).unwrap();
    assert_eq!(sequences(&events), Vec::<u64>::new(), "still held");
    drawing
        .execute(
            "INSERT INTO flog (id, stream, version, kind, body) VALUES ($1, 'b', 1, 'W', '{}')",
            &[&drawn],
        )
        .unwrap();
    drawing.commit().unwrap();
    let events: Vec<GlobalEvent<Value>> = mapped.read_after(1, 10).unwrap();
    assert_eq!(sequences(&events), [2, 3]);
}

/// Issue 22, finding 2: rollback holes are decided together, and only the
/// transactions that could hold them are waited for. A transaction that never
/// touches the events table (with a transaction id, so it holds back every
/// snapshot's `xmin`) stays open the whole time; five rollback holes among
/// committed appends are all passed while it runs.
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn holes_pass_together_while_an_unrelated_long_transaction_runs() {
    let Some(pg) = PgSchema::new("unrelated") else {
        return;
    };
    let store = store(&pg);
    let mut other = pg.client();
    other.batch_execute("CREATE TABLE other (x INT)").unwrap();
    let mut long = other.transaction().unwrap();
    long.execute("INSERT INTO other VALUES (1)", &[]).unwrap();
    let mut writer = pg.client();
    let mut committed = Vec::new();
    for n in 0..10 {
        let mut tx = writer.transaction().unwrap();
        let sequence = insert_held(&mut tx, &format!("s{n}"));
        if n % 2 == 0 {
            tx.rollback().unwrap();
        } else {
            tx.commit().unwrap();
            committed.push(sequence);
        }
    }
    let read = read_until(&store, 0, 10, Duration::from_secs(20));
    assert_eq!(read, committed, "every committed event, in order");
    // The long transaction is still open: nothing waited for it.
    long.execute("INSERT INTO other VALUES (2)", &[]).unwrap();
    long.commit().unwrap();
}

/// Issue 22, finding 4: a log where every fifth number was rolled back long
/// ago is read batch after batch, each full, to the head, while an unrelated
/// long transaction runs (one look at the lock table decides every hole below
/// the head; later reads pass them for free).
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn permanent_holes_do_not_cut_batches_short() {
    let Some(pg) = PgSchema::new("permanent") else {
        return;
    };
    let store = store(&pg);
    let mut client = pg.client();
    client
        .batch_execute(
            "INSERT INTO events (sequence, stream_id, stream_version, event_type, data) \
             SELECT n, 's' || n, 1, 'E', '{}' FROM generate_series(1, 25000) n WHERE n % 5 <> 0;
             SELECT setval(pg_get_serial_sequence('events', 'sequence'), 25000);
             CREATE TABLE other (x INT);",
        )
        .unwrap();
    let mut long = client.transaction().unwrap();
    long.execute("INSERT INTO other VALUES (1)", &[]).unwrap();
    let mut position = 0;
    let mut batches = 0;
    while position < 24_999 {
        let events: Vec<GlobalEvent<Value>> = store.read_after(position, 500).unwrap();
        batches += 1;
        assert_eq!(
            events.len(),
            500,
            "batch {batches} after {position} is full"
        );
        assert!(events.iter().all(|e| e.sequence % 5 != 0));
        position = events.last().unwrap().sequence;
    }
    assert_eq!(batches, 40);
    assert_eq!(store.hole_wait(), None);
    long.commit().unwrap();
}

/// Issue 22, late-event detection: a writer that breaks the writer contract
/// (draws a number in one transaction, inserts it in a later one) fills a
/// hole after the reader passed it. The store reports that event once, with
/// its type, while the hole is within the window; nothing when the window is
/// zero.
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn an_event_committed_into_a_passed_hole_is_reported_once() {
    let Some(pg) = PgSchema::new("late") else {
        return;
    };
    let mapping = foreign_table(&pg);
    let mapped = PostgresEventStore::connect_mapped(&pg.url(), &mapping).unwrap();
    let unwatched = PostgresEventStore::connect_mapped(&pg.url(), &mapping)
        .unwrap()
        .with_late_event_window(Duration::ZERO);
    let mut client = pg.client();
    assert_eq!(foreign_insert(&mut client, "a"), 1);
    let drawn: i64 = client
        .query_one("SELECT nextval('flog_id_seq')", &[])
        .unwrap()
        .get(0);
    assert_eq!(foreign_insert(&mut client, "c"), 3);
    for store in [&mapped, &unwatched] {
        let events: Vec<GlobalEvent<Value>> = store.read_after(0, 10).unwrap();
        assert_eq!(sequences(&events), [1, 3], "the drawing transaction ended");
        assert_eq!(store.late_events().unwrap(), []);
    }
    client
        .execute(
            "INSERT INTO flog (id, stream, version, kind, body) VALUES ($1, 'late', 1, 'W', '{}')",
            &[&drawn],
        )
        .unwrap();
    let late = mapped.late_events().unwrap();
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!((late[0].sequence, late[0].event_type.as_str()), (2, "W"));
    assert_eq!(mapped.late_events().unwrap(), [], "reported once");
    assert_eq!(unwatched.late_events().unwrap(), [], "window zero");
}
