//! The public API as users write it, and what stays from earlier versions.
//!
//! The structs users build (`ProjectionTarget`, `RebuildOptions`,
//! `EventTableMapping`) are `#[non_exhaustive]`: they are built with `new` and
//! setters, so a later version can add a field with a default without
//! breaking anyone. Runs go through one entry point, `replay`, each target
//! saying where it starts and the options saying whether to follow; the seed's
//! `rebuild`, `resume` and `rebuild_concurrent` stay as thin wrappers, and the
//! older shared-run functions still compile (deprecated, hidden from the docs).

use std::sync::Mutex;

use projectionist::rusqlite::Transaction;
use projectionist::{
    BoxError, CancelToken, CheckpointLocation, EventTableMapping, GlobalEvent, NewEvent, Progress,
    ProjectionDir, ProjectionTarget, RebuildConfig, RebuildOptions, SchemaHandler,
    SqliteCheckpoint, SqliteEventStore, Start, rebuild, rebuild_concurrent, replay, resume,
};

type Payload = serde_json::Value;

/// A handler as users write it: a schema and a closure.
type Counter = SchemaHandler<fn(&Transaction<'_>, &[GlobalEvent<Payload>]) -> Result<(), BoxError>>;

fn counter() -> Counter {
    SchemaHandler::new(
        "CREATE TABLE IF NOT EXISTS n (k INTEGER PRIMARY KEY, v INTEGER NOT NULL)",
        |tx: &Transaction<'_>, events: &[GlobalEvent<Payload>]| -> Result<(), BoxError> {
            tx.execute(
                "INSERT INTO n VALUES (1, ?1) ON CONFLICT (k) DO UPDATE SET v = v + excluded.v",
                [events.len() as i64],
            )?;
            Ok(())
        },
    )
}

fn counted(db: &projectionist::ProjectionDb) -> i64 {
    db.open_reader()
        .unwrap()
        .query_row("SELECT v FROM n", [], |row| row.get(0))
        .unwrap()
}

fn store_with(tmp: &tempfile::TempDir, events: usize) -> SqliteEventStore {
    let store = SqliteEventStore::create(tmp.path().join("events.db")).unwrap();
    for version in 0..events as u64 {
        store
            .append(
                "acc-1",
                version,
                &[NewEvent::json("Deposited", &serde_json::json!({"cents": 5})).unwrap()],
            )
            .unwrap();
    }
    store
}

#[test]
fn the_one_entry_point_replays_each_target_from_its_own_start() {
    let tmp = tempfile::tempdir().unwrap();
    store_with(&tmp, 7);
    // A mapping of our own layout, built with setters.
    let mapping = EventTableMapping::new("events")
        .sequence("sequence")
        .metadata(Some("metadata"))
        .recorded_at(None);
    assert_eq!(
        mapping.stream_id, "stream_id",
        "a column left out keeps its default"
    );
    let mapped = SqliteEventStore::open_mapped(tmp.path().join("events.db"), &mapping).unwrap();
    let dir = ProjectionDir::open(tmp.path().join("projections")).unwrap();
    let (fresh, continued) = (dir.db("fresh").unwrap(), dir.db("continued").unwrap());
    let (mut a, mut b) = (counter(), counter());
    // `continued` first applies three events: a resume continues from there.
    let up_to_3 = projectionist::UpTo::new(&mapped, 3);
    replay(
        &up_to_3,
        vec![ProjectionTarget::new(&continued, &mut b)],
        &RebuildOptions::new(),
    )
    .pop()
    .unwrap()
    .unwrap();
    let reports = Mutex::new(Vec::new());
    let progress = |p: &Progress| reports.lock().unwrap().push(p.clone());
    let results = replay(
        &mapped,
        vec![
            ProjectionTarget::new(&fresh, &mut a).start(Start::Reset),
            ProjectionTarget::new(&continued, &mut b),
        ],
        &RebuildOptions::new().batch_size(2).progress(&progress),
    );
    let results: Vec<_> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        results
            .iter()
            .map(|r| (r.processed, r.checkpoint))
            .collect::<Vec<_>>(),
        [(7, 7), (4, 7)],
        "one read for both, each from its start"
    );
    assert_eq!((counted(&fresh), counted(&continued)), (7, 7));
    assert!(reports.lock().unwrap().iter().any(|p| p.done));
}

#[test]
fn following_is_an_option_of_the_same_entry_point() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_with(&tmp, 3);
    let dir = ProjectionDir::open(tmp.path().join("projections")).unwrap();
    let db = dir.db("live").unwrap();
    let stop = CancelToken::new();
    let results = std::thread::scope(|scope| {
        let follower = scope.spawn(|| {
            let mut handler = counter();
            replay(
                &store,
                vec![ProjectionTarget::new(&db, &mut handler)],
                &RebuildOptions::new().follow_until(&stop),
            )
        });
        let appended = store
            .append(
                "acc-1",
                3,
                &[NewEvent::json("Deposited", &serde_json::json!({"cents": 5})).unwrap()],
            )
            .unwrap();
        assert_eq!(appended.last_sequence, 4);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while SqliteCheckpoint::load_in(&db.open_reader().unwrap(), "live").unwrap() < 4 {
            assert!(
                std::time::Instant::now() < deadline,
                "the follower applies the new event"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        stop.cancel();
        follower.join().unwrap()
    });
    assert_eq!(results[0].as_ref().unwrap().checkpoint, 4);
}

#[test]
fn the_seeds_wrappers_and_the_deprecated_shared_runs_still_work() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store_with(&tmp, 5);
    let dir = ProjectionDir::open(tmp.path().join("projections")).unwrap();
    let (one, two, three) = (
        dir.db("one").unwrap(),
        dir.db("two").unwrap(),
        dir.db("three").unwrap(),
    );
    let mut handler = counter();
    let config = RebuildConfig {
        reader: &store,
        projection: ProjectionTarget::new(&one, &mut handler)
            .checkpoint(CheckpointLocation::InFile)
            .consumer_id("one"),
        options: RebuildOptions::default(),
    };
    assert_eq!(rebuild(config).unwrap().checkpoint, 5);
    let mut handler = counter();
    let config = RebuildConfig {
        reader: &store,
        projection: ProjectionTarget::new(&one, &mut handler),
        options: RebuildOptions::new(),
    };
    assert_eq!(resume(config).unwrap().processed, 0, "nothing new");
    let (mut a, mut b) = (counter(), counter());
    let concurrent = rebuild_concurrent(vec![
        RebuildConfig {
            reader: &store,
            projection: ProjectionTarget::new(&two, &mut a),
            options: RebuildOptions::new(),
        },
        RebuildConfig {
            reader: &store,
            projection: ProjectionTarget::new(&three, &mut b),
            options: RebuildOptions::new(),
        },
    ]);
    assert!(
        concurrent
            .iter()
            .all(|r| r.as_ref().unwrap().checkpoint == 5)
    );
    #[allow(deprecated)]
    let shared = {
        let (mut a, mut b) = (counter(), counter());
        projectionist::rebuild_shared(
            &store,
            vec![
                ProjectionTarget::new(&two, &mut a),
                ProjectionTarget::new(&three, &mut b),
            ],
            &RebuildOptions::new(),
        )
    };
    assert!(
        shared.iter().all(|r| r.as_ref().unwrap().processed == 5),
        "rebuilt from scratch"
    );
    assert_eq!((counted(&two), counted(&three)), (5, 5));
}
