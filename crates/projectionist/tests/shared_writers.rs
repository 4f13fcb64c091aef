//! Many projections in one run share a bounded number of writer threads, and
//! each still stops alone: a handler failure or a poison event stops only the
//! projections it concerns, also when they share a thread with others that go
//! on following. In a test binary of its own, so the writer threads counted
//! are this test's.

mod common;

use std::time::{Duration, Instant};

use common::{BankHandler, CancelOnDrop, OpenedOnly, bank_store, checkpoint, options};
use projectionist::limits::{
    PAGE_CACHE_BUDGET_KIB, PAGE_CACHE_PER_PROJECTION_MIN_KIB, WRITER_THREADS_MAX,
};
use projectionist::{
    CancelToken, Error, GlobalReader, Handler, NewEvent, ProjectionDb, ProjectionDir,
    ProjectionTarget, SqliteEventStore, Start, last_run, replay,
};

/// A bound for a broken follower, not a speed requirement.
const WAIT_MAX: Duration = Duration::from_secs(60);

/// Projections in the run: three per writer thread and some, so every thread
/// serves projections of all three kinds below.
const PROJECTIONS: usize = 3 * WRITER_THREADS_MAX as usize + 5;

/// Waits until `done` holds, failing with `what` after [`WAIT_MAX`].
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT_MAX;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The engine's writer threads in this process, by their names.
fn writer_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("pj-"))
        .count()
}

fn state(db: &ProjectionDb, consumer_id: &str) -> String {
    last_run(&db.open_reader().unwrap(), consumer_id)
        .unwrap()
        .map(|run| run.state)
        .unwrap_or_default()
}

/// What projection `i` is: 0 handles everything (stops at the poison event),
/// 1 handles only `Opened` (follows to the end), 2 fails on event 301.
fn kind(i: usize) -> usize {
    i % 3
}

fn consumer(i: usize) -> &'static str {
    ["bank", "opened", "bank"][kind(i)]
}

#[test]
fn many_projections_share_bounded_writer_threads_and_each_stops_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("events.db");
    let store = bank_store(&path, 300, 21);
    let appender = SqliteEventStore::create(&path).unwrap();
    let dir = ProjectionDir::open(tmp.path().join("projections")).unwrap();
    let dbs: Vec<_> = (0..PROJECTIONS)
        .map(|i| dir.db(&format!("p{i:03}")).unwrap())
        .collect();
    let reached = |i: usize, sequence: u64| checkpoint(&dbs[i], consumer(i)) >= sequence;
    let stop = CancelToken::new();
    let (results, threads_while_following) = std::thread::scope(|scope| {
        let _stop_on_panic = CancelOnDrop(&stop);
        let follower = scope.spawn(|| {
            let mut handlers: Vec<Box<dyn Handler<_>>> = (0..PROJECTIONS)
                .map(|i| -> Box<dyn Handler<_>> {
                    match kind(i) {
                        0 => Box::new(BankHandler::default()),
                        1 => Box::new(OpenedOnly),
                        _ => Box::new(BankHandler { fail_at: Some(301) }),
                    }
                })
                .collect();
            let targets = handlers
                .iter_mut()
                .zip(&dbs)
                .enumerate()
                .map(|(i, (handler, db))| {
                    ProjectionTarget::new(db, &mut **handler)
                        .consumer_id(consumer(i))
                        .start(Start::Reset)
                })
                .collect();
            replay(&store, targets, &options(0).follow_until(&stop))
        });
        wait_until("every projection at 300", || {
            (0..PROJECTIONS).all(|i| reached(i, 300))
        });
        let threads = writer_threads();
        // 301: an ordinary event, refused by the kind-2 handlers.
        let opened = NewEvent::json("Opened", &serde_json::json!({"owner": "x"})).unwrap();
        appender.append("late-x", 0, &[opened]).unwrap();
        wait_until("kinds 0 and 1 at 301", || {
            (0..PROJECTIONS).all(|i| kind(i) == 2 || reached(i, 301))
        });
        // A failure is recorded while the run goes on, for `status`.
        wait_until("kind 2 recorded as failed", || {
            (0..PROJECTIONS)
                .filter(|&i| kind(i) == 2)
                .all(|i| state(&dbs[i], "bank") == "failed")
        });
        // 302: a `Deposited` that cannot decode: poison for kind 0 only.
        let poison = NewEvent {
            event_type: "Deposited".into(),
            data: r#"{"cents": "lots"}"#.into(),
            metadata: None,
        };
        appender.append("poisoned", 0, &[poison]).unwrap();
        for n in 0..4 {
            let event = NewEvent::json("Opened", &serde_json::json!({"owner": "y"})).unwrap();
            appender
                .append(&format!("late-y-{n}"), 0, &[event])
                .unwrap();
        }
        let head = GlobalReader::<common::BankEvent>::head(&appender).unwrap();
        assert_eq!(head, 306);
        wait_until("kind 1 at the head", || {
            (0..PROJECTIONS).all(|i| kind(i) != 1 || reached(i, head))
        });
        stop.cancel();
        (follower.join().unwrap(), threads)
    });
    assert!(
        (1..=WRITER_THREADS_MAX as usize).contains(&threads_while_following),
        "{threads_while_following} writer threads for {PROJECTIONS} projections"
    );
    for (i, (result, db)) in results.iter().zip(&dbs).enumerate() {
        match (kind(i), result) {
            (0, Err(Error::Replay { committed, .. })) => {
                assert_eq!(*committed, 301, "{}", db.name());
                assert_eq!(checkpoint(db, "bank"), 301, "{}", db.name());
            }
            (1, Ok(result)) => {
                assert_eq!(result.checkpoint, 306, "{}", db.name());
                let rows: i64 = db
                    .open_reader()
                    .unwrap()
                    .query_row(
                        "SELECT count(*) FROM opened WHERE sequence > 300",
                        [],
                        |r| r.get(0),
                    )
                    .unwrap();
                assert_eq!(rows, 5, "{}: the Opened events 301, 303-306", db.name());
            }
            (
                2,
                Err(Error::Handler {
                    committed,
                    first_sequence,
                    ..
                }),
            ) => {
                assert_eq!((*committed, *first_sequence), (300, 301), "{}", db.name());
                assert_eq!(checkpoint(db, "bank"), 300, "{}", db.name());
            }
            (kind, other) => panic!("{} (kind {kind}): unexpected {other:?}", db.name()),
        }
    }
    // Each projection's page cache was its share of the run's budget.
    let share = (PAGE_CACHE_BUDGET_KIB / PROJECTIONS as u64).max(PAGE_CACHE_PER_PROJECTION_MIN_KIB);
    let cache_size: i64 = dbs[1]
        .with_connection(|conn| Ok(conn.pragma_query_value(None, "cache_size", |r| r.get(0))))
        .unwrap()
        .unwrap();
    assert_eq!(cache_size, -(share as i64), "KiB, as a negative cache_size");
}
