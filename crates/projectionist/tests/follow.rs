//! `follow` through the public API on real SQLite files: a follower catches up,
//! applies appends made through another connection, stops cleanly and equals a
//! fresh rebuild; a poison event stops only the projections that handle it;
//! more projections than writer threads follow at once.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    BankEvent, BankHandler, CancelOnDrop, OpenedOnly, bank_store, checkpoint, digest, options,
};
use projectionist::{
    CancelToken, Error, GlobalEvent, GlobalReader, Handler, NewEvent, ProjectionDb, ProjectionDir,
    ProjectionTarget, RebuildConfig, SqliteEventStore, Start, last_run, rebuild, replay,
};

/// How long a test waits for the follower to reach a sequence: a bound for a
/// broken follower, not a speed requirement.
const WAIT_MAX: Duration = Duration::from_secs(30);

/// Waits until the projection's committed checkpoint reaches `sequence`.
fn wait_for(db: &ProjectionDb, consumer_id: &str, sequence: u64) {
    let deadline = Instant::now() + WAIT_MAX;
    while checkpoint(db, consumer_id) < sequence {
        assert!(
            Instant::now() < deadline,
            "{consumer_id} did not reach {sequence}; at {}",
            checkpoint(db, consumer_id)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Appends `n` events, one transaction each, to new accounts `late-{tag}-i`.
fn append_late(store: &SqliteEventStore, tag: &str, n: u64) {
    for i in 0..n {
        let stream_id = format!("late-{tag}-{}", i / 2);
        let event = if i % 2 == 0 {
            NewEvent::json("Opened", &serde_json::json!({"owner": tag}))
        } else {
            NewEvent::json("Deposited", &serde_json::json!({"cents": i}))
        }
        .unwrap();
        store.append(&stream_id, i % 2, &[event]).unwrap();
    }
}

fn target<'a>(
    db: &'a ProjectionDb,
    handler: &'a mut dyn Handler<BankEvent>,
    consumer_id: &'a str,
) -> ProjectionTarget<'a, BankEvent> {
    ProjectionTarget::new(db, handler).consumer_id(consumer_id)
}

/// The reference: a rebuild of the whole log into a file of its own.
fn fresh_digest(store: &SqliteEventStore, dir: &ProjectionDir, name: &str) -> String {
    let db = dir.db(name).unwrap();
    let mut handler = BankHandler::default();
    rebuild(RebuildConfig {
        reader: store,
        projection: target(&db, &mut handler, "bank"),
        options: options(0),
    })
    .unwrap();
    digest(&db)
}

#[test]
fn a_follower_applies_appends_from_another_connection_and_stops_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("events.db");
    let store = bank_store(&path, 2_000, 11);
    // Another connection to the same file, as another program would append.
    let appender = SqliteEventStore::create(&path).unwrap();
    let dir = ProjectionDir::open(tmp.path().join("projections")).unwrap();
    let built = dir.db("built").unwrap();
    let fresh = dir.db("fresh").unwrap();
    // `built` is half done: the follower resumes it; `fresh` is rebuilt.
    {
        let cut = projectionist::MemoryEventStore::<BankEvent>::new();
        let events: Vec<GlobalEvent<BankEvent>> = store.read_after(0, 1_000).unwrap();
        for e in events {
            cut.append(
                &e.stream_id,
                e.stream_version - 1,
                vec![(e.event_type, e.data)],
            )
            .unwrap();
        }
        let mut handler = BankHandler::default();
        rebuild(RebuildConfig {
            reader: &cut,
            projection: target(&built, &mut handler, "bank"),
            options: options(0),
        })
        .unwrap();
        assert_eq!(checkpoint(&built, "bank"), 1_000);
    }
    let stop = CancelToken::new();
    let results = std::thread::scope(|scope| {
        let _stop_on_panic = CancelOnDrop(&stop);
        let follower = scope.spawn(|| {
            let (mut a, mut b) = (BankHandler::default(), BankHandler::default());
            let targets = vec![
                target(&built, &mut a, "bank").start(Start::Resume),
                target(&fresh, &mut b, "bank").start(Start::Reset),
            ];
            replay(&store, targets, &options(0).follow_until(&stop))
        });
        wait_for(&built, "bank", 2_000);
        wait_for(&fresh, "bank", 2_000);
        let run = last_run(&built.open_reader().unwrap(), "bank")
            .unwrap()
            .unwrap();
        assert_eq!(run.state, "following", "status sees a caught-up follower");
        // Appends one event per transaction; each is applied without a restart.
        append_late(&appender, "a", 41);
        let head = GlobalReader::<BankEvent>::head(&appender).unwrap();
        assert_eq!(head, 2_041);
        wait_for(&built, "bank", head);
        wait_for(&fresh, "bank", head);
        stop.cancel();
        follower.join().unwrap()
    });
    for result in &results {
        let result = result.as_ref().unwrap();
        assert_eq!(result.checkpoint, 2_041);
        assert_eq!(result.total, 2_041, "the head as the follower last saw it");
    }
    assert_eq!(results[0].as_ref().unwrap().processed, 1_041);
    assert_eq!(results[1].as_ref().unwrap().processed, 2_041);
    let reference = fresh_digest(&store, &dir, "reference");
    assert!(digest(&built) == reference, "resumed follower = rebuild");
    assert!(digest(&fresh) == reference, "rebuilt follower = rebuild");
    let run = last_run(&built.open_reader().unwrap(), "bank")
        .unwrap()
        .unwrap();
    assert_eq!(run.state, "done", "a clean stop is recorded");
}

#[test]
fn a_poison_event_while_following_stops_only_the_projections_that_handle_it() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("events.db");
    let store = bank_store(&path, 500, 3);
    let appender = SqliteEventStore::create(&path).unwrap();
    let dir = ProjectionDir::open(tmp.path().join("projections")).unwrap();
    let bank = dir.db("bank").unwrap();
    let opened = dir.db("opened").unwrap();
    let stop = CancelToken::new();
    let results = std::thread::scope(|scope| {
        let _stop_on_panic = CancelOnDrop(&stop);
        let follower = scope.spawn(|| {
            let mut a = BankHandler::default();
            let mut b = OpenedOnly;
            let targets = vec![
                target(&bank, &mut a, "bank").start(Start::Reset),
                target(&opened, &mut b, "opened").start(Start::Reset),
            ];
            replay(&store, targets, &options(0).follow_until(&stop))
        });
        wait_for(&bank, "bank", 500);
        wait_for(&opened, "opened", 500);
        // A `Deposited` whose cents are text cannot decode into `BankEvent`.
        let poison = NewEvent {
            event_type: "Deposited".into(),
            data: r#"{"cents": "lots"}"#.into(),
            metadata: None,
        };
        appender.append("poisoned", 0, &[poison]).unwrap();
        append_late(&appender, "after", 10);
        // The projection that does not handle `Deposited` goes on to the head.
        wait_for(&opened, "opened", 511);
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            let run = last_run(&bank.open_reader().unwrap(), "bank")
                .unwrap()
                .unwrap();
            if run.state == "failed" {
                let (sequence, stream, event_type) = run.event.unwrap();
                assert_eq!(
                    (sequence, stream.as_str(), event_type.as_str()),
                    (501, "poisoned", "Deposited")
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "bank never recorded the poison event"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        append_late(&appender, "later", 4);
        wait_for(&opened, "opened", 515);
        stop.cancel();
        follower.join().unwrap()
    });
    match &results[0] {
        Err(Error::Replay { committed, .. }) => assert_eq!(*committed, 500),
        other => panic!("bank: expected the poison event's error, got {other:?}"),
    }
    assert_eq!(
        checkpoint(&bank, "bank"),
        500,
        "nothing past the poison event"
    );
    let opened_result = results[1].as_ref().unwrap();
    assert_eq!(opened_result.checkpoint, 515);
    let rows: i64 = opened
        .open_reader()
        .unwrap()
        .query_row(
            "SELECT count(*) FROM opened WHERE sequence > 500",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 7, "the Opened events after the poison event: 5 + 2");
}

#[test]
fn more_projections_than_writer_threads_follow_at_once() {
    let n = projectionist::limits::WRITER_THREADS_MAX as usize + 3;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("events.db");
    let store = bank_store(&path, 300, 5);
    let appender = SqliteEventStore::create(&path).unwrap();
    let dir = ProjectionDir::open(tmp.path().join("projections")).unwrap();
    let dbs: Vec<Arc<ProjectionDb>> = (0..n).map(|i| dir.db(&format!("p{i}")).unwrap()).collect();
    let stop = CancelToken::new();
    let results = std::thread::scope(|scope| {
        let _stop_on_panic = CancelOnDrop(&stop);
        let follower = scope.spawn(|| {
            let mut handlers: Vec<BankHandler> = (0..n).map(|_| BankHandler::default()).collect();
            let targets = handlers
                .iter_mut()
                .zip(&dbs)
                .map(|(h, db)| target(db, h, "bank").start(Start::Reset))
                .collect();
            replay(&store, targets, &options(0).follow_until(&stop))
        });
        append_late(&appender, "x", 6);
        for db in &dbs {
            wait_for(db, "bank", 306);
        }
        stop.cancel();
        follower.join().unwrap()
    });
    let reference = fresh_digest(&store, &dir, "reference");
    for (result, db) in results.iter().zip(&dbs) {
        assert_eq!(result.as_ref().unwrap().checkpoint, 306);
        assert!(digest(db) == reference, "{} = rebuild", db.name());
    }
}

#[test]
fn a_stop_before_anything_new_ends_with_the_projection_current() {
    let tmp = tempfile::tempdir().unwrap();
    let store = bank_store(&tmp.path().join("events.db"), 100, 9);
    let dir = ProjectionDir::open(tmp.path().join("projections")).unwrap();
    let db = dir.db("bank").unwrap();
    let stop = CancelToken::new();
    stop.cancel();
    let mut handler = BankHandler::default();
    let results = replay(
        &store,
        vec![target(&db, &mut handler, "bank").start(Start::Reset)],
        &options(0).follow_until(&stop),
    );
    // Stopped before its first read: nothing is applied, nothing is lost.
    let result = results[0].as_ref().unwrap();
    assert_eq!(result.checkpoint, 0);
    assert_eq!(checkpoint(&db, "bank"), 0);
}
