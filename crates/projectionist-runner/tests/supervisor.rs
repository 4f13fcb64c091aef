//! The supervisor in-process, on real SQLite files: isolation of projections,
//! one state per projection, exact answers to requests, read-your-writes.
//! Every wait is on observable state with a deadline; no fixed sleeps decide
//! an outcome.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use projectionist::rusqlite::{Connection, Transaction};
use projectionist::{
    GlobalEvent, Handler, NewEvent, SchemaHandler, SqliteEventStore, StreamAppend,
};
use projectionist_runner::{Event, Outcome, Request, State, Supervised, Supervisor};
use serde_json::{Value, json};

/// Generous bound for anything that happens within a second on a quiet
/// machine: these machines are shared.
const DEADLINE: Duration = Duration::from_secs(30);

fn store(dir: &Path) -> Arc<SqliteEventStore> {
    Arc::new(SqliteEventStore::create(dir.join("events.db")).expect("open the store"))
}

/// Appends `count` events of type `Added` with `n = 1` to streams `s-0..`;
/// returns the last sequence.
fn append(store: &SqliteEventStore, count: usize) -> u64 {
    let events: Vec<NewEvent> = (0..count)
        .map(|_| NewEvent::json("Added", &json!({"n": 1})).expect("event"))
        .collect();
    let stream = format!("s-{}", fastrand_id());
    let appended = store
        .append_batch(&[StreamAppend {
            stream_id: &stream,
            expected_version: 0,
            events: &events,
        }])
        .expect("append");
    appended[0].last_sequence
}

fn fastrand_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::SeqCst)
}

/// A projection summing `n` times `factor` into `total`; each batch first
/// sleeps `pause` (to make a rebuild take a while).
fn totals(name: &str, factor: i64, pause: Duration) -> impl Handler<Value> + 'static {
    let _ = name;
    SchemaHandler::new(
        "CREATE TABLE IF NOT EXISTS total (id INTEGER PRIMARY KEY CHECK (id = 1), sum INTEGER NOT NULL);
         INSERT OR IGNORE INTO total VALUES (1, 0);",
        move |tx: &Transaction<'_>, events: &[GlobalEvent<Value>]| {
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
            let sum: i64 = events.iter().map(|e| e.data["n"].as_i64().unwrap_or(0)).sum();
            tx.execute("UPDATE total SET sum = sum + ?1", [sum * factor])?;
            Ok(())
        },
    )
}

/// Projection `name` summing `n` times `factor`, declared at `version`.
fn versioned(name: &str, factor: i64, version: u32) -> Supervised<Value> {
    Supervised::new(name, totals(name, factor, Duration::ZERO))
        .unwrap()
        .version(version)
}

fn total_in(dir: &Path, name: &str) -> i64 {
    let conn = Connection::open(dir.join(format!("{name}.db"))).expect("open the projection");
    conn.query_row("SELECT sum FROM total", [], |row| row.get(0))
        .expect("read the total")
}

/// Waits until `check` holds, or panics naming `what` after [`DEADLINE`].
fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A supervisor's builder; with `shared`, its live projections share one
/// read of the log.
fn builder(
    store: &Arc<SqliteEventStore>,
    projections: &Path,
    shared: bool,
) -> projectionist_runner::SupervisorBuilder<Value> {
    Supervisor::builder(store.clone(), projections)
        .unwrap()
        .share_reads(shared)
}

fn state_of(supervisor: &Supervisor, name: &str) -> State {
    supervisor
        .status_of(name)
        .expect("a supervised projection")
        .state
}

#[test]
fn follows_appends_and_wait_for_returns_once_the_event_is_applied() {
    follows_appends_and_wait_for_returns_once_the_event_is_applied_in(false);
}

#[test]
fn follows_appends_and_wait_for_returns_once_the_event_is_applied_with_shared_reads() {
    follows_appends_and_wait_for_returns_once_the_event_is_applied_in(true);
}

fn follows_appends_and_wait_for_returns_once_the_event_is_applied_in(shared: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    append(&store, 10);
    let projections = tmp.path().join("projections");
    let supervisor = builder(&store, &projections, shared)
        .projection(Supervised::new("totals", totals("totals", 1, Duration::ZERO)).unwrap())
        .start()
        .unwrap();
    let last = append(&store, 5);
    let checkpoint = supervisor
        .wait_for("totals", last, DEADLINE)
        .expect("reaches the append");
    assert!(checkpoint >= last);
    // What wait_for promised is what a reader of the file sees.
    assert_eq!(total_in(&projections, "totals"), 15);
    wait_until("following", || {
        state_of(&supervisor, "totals") == State::Following
    });
    let err = supervisor
        .wait_for("totals", last + 100, Duration::from_millis(200))
        .expect_err("a position past the log is not reached");
    assert!(err.to_string().contains("totals"), "{err}");
    let last_states = supervisor.shutdown();
    assert_eq!(last_states[0].state.name(), "stopped");
    assert_eq!(last_states[0].checkpoint, last);
}

#[test]
fn a_changed_definition_is_built_in_the_shadow_while_a_sibling_follows_each_append() {
    a_changed_definition_is_built_in_the_shadow_while_a_sibling_follows_each_append_in(false);
}

#[test]
fn a_changed_definition_is_built_in_the_shadow_while_a_sibling_follows_each_append_with_shared_reads()
 {
    a_changed_definition_is_built_in_the_shadow_while_a_sibling_follows_each_append_in(true);
}

fn a_changed_definition_is_built_in_the_shadow_while_a_sibling_follows_each_append_in(
    shared: bool,
) {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    append(&store, 2_000);
    let projections = tmp.path().join("projections");
    // Version 1 of both, built once.
    let first = builder(&store, &projections, shared)
        .projection(versioned("changed", 1, 1))
        .projection(Supervised::new("sibling", totals("sibling", 1, Duration::ZERO)).unwrap())
        .start()
        .unwrap();
    let head = first.wait_for("changed", 2_000, DEADLINE).unwrap();
    first.wait_for("sibling", head, DEADLINE).unwrap();
    drop(first);
    // Version 2 of `changed` multiplies by 10; its shadow build is slow
    // (10 events per batch, 20 ms each: about 4 s for the log).
    let published = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&published);
    let supervisor = builder(&store, &projections, shared)
        .batch_size(10)
        .projection(
            Supervised::new("changed", totals("changed", 10, Duration::from_millis(20)))
                .unwrap()
                .version(2),
        )
        .projection(Supervised::new("sibling", totals("sibling", 1, Duration::ZERO)).unwrap())
        .on_event(move |event| {
            if let Event::Published(p) = event {
                seen.store(p.checkpoint, Ordering::SeqCst);
            }
        })
        .start()
        .unwrap();
    wait_until("the shadow build", || {
        state_of(&supervisor, "changed") == State::BuildingShadow
    });
    // While the shadow is far from the head, every append reaches the
    // sibling within a second, and the sibling never leaves following.
    for _ in 0..3 {
        let last = append(&store, 1);
        let asked = Instant::now();
        supervisor
            .wait_for("sibling", last, DEADLINE)
            .expect("the sibling applies the append");
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "the sibling took {:?} to apply an append",
            asked.elapsed()
        );
        assert_eq!(state_of(&supervisor, "sibling"), State::Following);
        let changed = supervisor.status_of("changed").unwrap();
        assert_eq!(changed.state, State::BuildingShadow, "{changed:?}");
        // The live file still serves version 1.
        assert_eq!(total_in(&projections, "changed"), 2_000);
    }
    wait_until("the publish", || published.load(Ordering::SeqCst) > 0);
    let last = append(&store, 1);
    supervisor.wait_for("changed", last, DEADLINE).unwrap();
    supervisor.wait_for("sibling", last, DEADLINE).unwrap();
    assert_eq!(total_in(&projections, "changed"), 2_004 * 10);
    assert_eq!(total_in(&projections, "sibling"), 2_004);
    assert_eq!(state_of(&supervisor, "changed"), State::Following);
}

#[test]
fn a_projection_whose_shadow_cannot_be_opened_is_failed_retried_and_then_followed() {
    a_projection_whose_shadow_cannot_be_opened_is_failed_retried_and_then_followed_in(false);
}

#[test]
fn a_projection_whose_shadow_cannot_be_opened_is_failed_retried_and_then_followed_with_shared_reads()
 {
    a_projection_whose_shadow_cannot_be_opened_is_failed_retried_and_then_followed_in(true);
}

fn a_projection_whose_shadow_cannot_be_opened_is_failed_retried_and_then_followed_in(shared: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    append(&store, 50);
    let projections = tmp.path().join("projections");
    let first = builder(&store, &projections, shared)
        .projection(versioned("blocked", 1, 1))
        .start()
        .unwrap();
    first.wait_for("blocked", 50, DEADLINE).unwrap();
    drop(first);
    // A directory where the shadow goes: the new version cannot be built.
    let obstacle = projections.join(".blocked.shadow.db");
    std::fs::create_dir(&obstacle).unwrap();
    let supervisor = builder(&store, &projections, shared)
        .projection(versioned("blocked", 2, 2))
        .projection(Supervised::new("other", totals("other", 1, Duration::ZERO)).unwrap())
        .start()
        .unwrap();
    wait_until("the failure", || {
        matches!(
            state_of(&supervisor, "blocked"),
            State::Failed { retrying: true, .. }
        )
    });
    let unhealthy = supervisor.unhealthy();
    assert_eq!(unhealthy.len(), 1, "{unhealthy:?}");
    assert_eq!(unhealthy[0].0, "blocked");
    assert!(unhealthy[0].1.starts_with("failed: "), "{unhealthy:?}");
    // The other projection is not held back.
    supervisor.wait_for("other", 50, DEADLINE).unwrap();
    std::fs::remove_dir(&obstacle).unwrap();
    let last = append(&store, 1);
    supervisor.wait_for("blocked", last, DEADLINE).unwrap();
    wait_until("following", || {
        state_of(&supervisor, "blocked") == State::Following
    });
    assert_eq!(total_in(&projections, "blocked"), 51 * 2);
    assert!(supervisor.unhealthy().is_empty());
}

#[test]
fn a_poison_event_fails_only_its_projection_and_a_rebuild_request_after_the_fix_answers() {
    a_poison_event_fails_only_its_projection_and_a_rebuild_request_after_the_fix_answers_in(false);
}

#[test]
fn a_poison_event_fails_only_its_projection_and_a_rebuild_request_after_the_fix_answers_with_shared_reads()
 {
    a_poison_event_fails_only_its_projection_and_a_rebuild_request_after_the_fix_answers_in(true);
}

fn a_poison_event_fails_only_its_projection_and_a_rebuild_request_after_the_fix_answers_in(
    shared: bool,
) {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    append(&store, 20);
    let projections = tmp.path().join("projections");
    let picky = |tx: &Transaction<'_>,
                 events: &[GlobalEvent<Value>]|
     -> Result<(), projectionist::BoxError> {
        for event in events {
            if event.data["poison"].as_bool() == Some(true) {
                return Err(format!("poison at {}", event.sequence).into());
            }
        }
        tx.execute_batch("CREATE TABLE IF NOT EXISTS seen (n INTEGER)")?;
        Ok(())
    };
    let supervisor = builder(&store, &projections, shared)
        .projection(Supervised::new("picky", picky).unwrap())
        .projection(Supervised::new("calm", totals("calm", 1, Duration::ZERO)).unwrap())
        .start()
        .unwrap();
    supervisor.wait_for("picky", 20, DEADLINE).unwrap();
    let poison = store
        .append(
            "bad",
            0,
            &[NewEvent::json("Added", &json!({"poison": true, "n": 1})).unwrap()],
        )
        .unwrap()
        .last_sequence;
    wait_until("the failure", || {
        matches!(
            state_of(&supervisor, "picky"),
            State::Failed {
                retrying: false,
                ..
            }
        )
    });
    let State::Failed { error, .. } = state_of(&supervisor, "picky") else {
        unreachable!()
    };
    assert!(error.contains(&format!("poison at {poison}")), "{error}");
    let last = append(&store, 3);
    supervisor.wait_for("calm", last, DEADLINE).unwrap();
    assert_eq!(total_in(&projections, "calm"), 24);
    // A rebuild request is answered with its own outcome: the same handler
    // fails again, and says so.
    let answer = supervisor.request("picky", Request::Rebuild);
    let err = answer.expect_err("the poison is still there");
    assert!(err.to_string().contains("poison"), "{err}");
    assert!(matches!(
        supervisor.request("nosuch", Request::Rebuild),
        Err(projectionist_runner::Error::NoSuchProjection(_))
    ));
}

#[test]
fn rebuild_then_two_concurrent_rollbacks_each_get_their_own_outcome() {
    rebuild_then_two_concurrent_rollbacks_each_get_their_own_outcome_in(false);
}

#[test]
fn rebuild_then_two_concurrent_rollbacks_each_get_their_own_outcome_with_shared_reads() {
    rebuild_then_two_concurrent_rollbacks_each_get_their_own_outcome_in(true);
}

fn rebuild_then_two_concurrent_rollbacks_each_get_their_own_outcome_in(shared: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    append(&store, 30);
    let projections = tmp.path().join("projections");
    let supervisor = builder(&store, &projections, shared)
        .projection(Supervised::new("totals", totals("totals", 1, Duration::ZERO)).unwrap())
        .start()
        .unwrap();
    supervisor.wait_for("totals", 30, DEADLINE).unwrap();
    // Nothing kept yet: refused, named.
    let err = supervisor
        .request("totals", Request::Rollback)
        .expect_err("no previous version");
    assert!(err.to_string().contains("no previous version"), "{err}");
    let rebuilt = supervisor.request("totals", Request::Rebuild).unwrap();
    let Outcome::Rebuilt {
        checkpoint,
        published: Some(published),
    } = rebuilt
    else {
        panic!("a built projection is rebuilt in its shadow: {rebuilt:?}")
    };
    assert_eq!(checkpoint, 30);
    assert!(published.previous_kept);
    let last = append(&store, 5);
    supervisor.wait_for("totals", last, DEADLINE).unwrap();
    // Two rollbacks at once: served one after the other, each its own swap.
    let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
        let a = scope.spawn(|| supervisor.request("totals", Request::Rollback));
        let b = scope.spawn(|| supervisor.request("totals", Request::Rollback));
        vec![a.join().unwrap().unwrap(), b.join().unwrap().unwrap()]
    });
    let checkpoints: Vec<u64> = outcomes
        .iter()
        .map(|o| match o {
            Outcome::RolledBack { published, follows } => {
                assert!(follows);
                published.checkpoint
            }
            other => panic!("a rollback answered {other:?}"),
        })
        .collect();
    // One restored the version at 30, the other swapped back the one at 35.
    let mut sorted = checkpoints.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![30, 35], "{checkpoints:?}");
    let last = append(&store, 1);
    supervisor.wait_for("totals", last, DEADLINE).unwrap();
    assert_eq!(total_in(&projections, "totals"), 36);
}

#[test]
fn a_projection_whose_file_another_connection_holds_is_stalled_then_follows_again() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    append(&store, 10);
    let projections = tmp.path().join("projections");
    let supervisor = Supervisor::builder(store.clone(), &projections)
        .unwrap()
        .stall_after(Duration::from_millis(500))
        .projection(Supervised::new("held", totals("held", 1, Duration::ZERO)).unwrap())
        .start()
        .unwrap();
    supervisor.wait_for("held", 10, DEADLINE).unwrap();
    // Another program takes the file's write lock and keeps it.
    let other = Connection::open(projections.join("held.db")).unwrap();
    other.busy_timeout(DEADLINE).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let last = append(&store, 2);
    wait_until("stalled", || {
        matches!(state_of(&supervisor, "held"), State::Stalled { .. })
    });
    let unhealthy = supervisor.unhealthy();
    assert_eq!(unhealthy.len(), 1);
    assert!(
        unhealthy[0]
            .1
            .contains("events of the log past its checkpoint"),
        "{unhealthy:?}"
    );
    other.execute_batch("ROLLBACK").unwrap();
    supervisor.wait_for("held", last, DEADLINE).unwrap();
    wait_until("following again", || {
        state_of(&supervisor, "held") == State::Following
    });
    assert_eq!(total_in(&projections, "held"), 12);
}

#[test]
fn more_projections_than_the_bound_and_a_name_given_twice_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    let mut builder = Supervisor::builder(store.clone(), tmp.path().join("p")).unwrap();
    for i in 0..=projectionist_runner::SUPERVISED_MAX {
        builder = builder
            .projection(Supervised::new(&format!("p{i}"), totals("p", 1, Duration::ZERO)).unwrap());
    }
    let Err(err) = builder.start() else {
        panic!("started past the bound")
    };
    assert!(
        err.to_string()
            .contains(&format!("at most {}", projectionist_runner::SUPERVISED_MAX)),
        "{err}"
    );
    let twice = Supervisor::builder(store, tmp.path().join("q"))
        .unwrap()
        .projection(Supervised::new("same", totals("same", 1, Duration::ZERO)).unwrap())
        .projection(Supervised::new("same", totals("same", 1, Duration::ZERO)).unwrap())
        .start();
    let Err(err) = twice else {
        panic!("started with a name twice")
    };
    assert!(
        err.to_string().contains("same is supervised twice"),
        "{err}"
    );
}

/// Projections come and go while the others follow: `replace` under a new
/// version rebuilds that one in its shadow (its lock kept), `add` catches a
/// new one up, `remove` lets go of one's lock so another process (here a
/// second directory handle) may take it.
#[test]
fn projections_are_replaced_added_and_removed_while_the_others_follow() {
    projections_are_replaced_added_and_removed_while_the_others_follow_in(false);
}

#[test]
fn projections_are_replaced_added_and_removed_while_the_others_follow_with_shared_reads() {
    projections_are_replaced_added_and_removed_while_the_others_follow_in(true);
}

fn projections_are_replaced_added_and_removed_while_the_others_follow_in(shared: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    append(&store, 40);
    let projections = tmp.path().join("projections");
    let supervisor = builder(&store, &projections, shared)
        .projection(versioned("changed", 1, 1))
        .projection(Supervised::new("steady", totals("steady", 1, Duration::ZERO)).unwrap())
        .start()
        .unwrap();
    supervisor.wait_for("changed", 40, DEADLINE).unwrap();
    supervisor.wait_for("steady", 40, DEADLINE).unwrap();

    // A new version: rebuilt in the shadow and published; the lock is kept
    // throughout (another handle never gets it).
    supervisor.replace(versioned("changed", 10, 2)).unwrap();
    let other = projectionist::ProjectionDir::open(&projections).unwrap();
    assert!(matches!(
        other.db("changed"),
        Err(projectionist::Error::Locked { .. })
    ));
    wait_until("the new version", || {
        projections.join(".changed.previous.db").exists()
            && state_of(&supervisor, "changed") == State::Following
    });
    let last = append(&store, 2);
    supervisor.wait_for("changed", last, DEADLINE).unwrap();
    assert_eq!(total_in(&projections, "changed"), 42 * 10);

    // A new projection catches up beside the others.
    supervisor
        .add(Supervised::new("late", totals("late", 1, Duration::ZERO)).unwrap())
        .unwrap();
    supervisor.wait_for("late", last, DEADLINE).unwrap();
    assert_eq!(total_in(&projections, "late"), 42);
    assert!(
        supervisor
            .add(Supervised::new("late", totals("late", 1, Duration::ZERO)).unwrap())
            .is_err()
    );

    // Removed: its lock is free, its registration gone; the others go on.
    let removed = supervisor.remove("steady").unwrap();
    assert_eq!(removed.checkpoint, last);
    assert!(!projections.join(".steady.follower").exists());
    other
        .db("steady")
        .expect("the removed projection's lock is free");
    assert!(matches!(
        supervisor.status_of("steady"),
        Err(projectionist_runner::Error::NoSuchProjection(_))
    ));
    let last = append(&store, 1);
    supervisor.wait_for("late", last, DEADLINE).unwrap();
    supervisor.wait_for("changed", last, DEADLINE).unwrap();
    assert_eq!(supervisor.status().len(), 2);
}

/// A snapshot taken while a supervisor follows seeds a supervisor on another
/// directory: the projection is restored (not replayed from the start), then
/// caught up, and equals the original.
#[test]
fn a_supervisor_seeds_a_missing_projection_from_a_snapshot_and_catches_up() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    append(&store, 200);
    let first_dir = tmp.path().join("first");
    let first = Supervisor::builder(store.clone(), &first_dir)
        .unwrap()
        .projection(versioned("totals", 1, 1))
        .start()
        .unwrap();
    first.wait_for("totals", 200, DEADLINE).unwrap();
    let identity = projectionist_runner::snapshot::store_identity::<Value>(&*store)
        .unwrap()
        .unwrap();
    let snaps = tmp.path().join("snaps");
    let manifest = projectionist_runner::snapshot::take_snapshot(
        &first_dir,
        "totals",
        &projectionist_runner::snapshot::SnapshotDir(snaps.clone()),
        &identity,
        0,
    )
    .unwrap();
    assert_eq!(manifest.checkpoint, 200);
    let last = append(&store, 25);
    let seeded = Arc::new(AtomicU64::new(0));
    let saw = Arc::clone(&seeded);
    let second_dir = tmp.path().join("second");
    let second = Supervisor::builder(store.clone(), &second_dir)
        .unwrap()
        .seed_from(projectionist_runner::snapshot::SnapshotDir(snaps.clone()))
        .on_event(move |event| {
            if let Event::Seeded(manifest) = event {
                saw.store(manifest.checkpoint, Ordering::SeqCst);
            }
        })
        .projection(versioned("totals", 1, 1))
        .start()
        .unwrap();
    second.wait_for("totals", last, DEADLINE).unwrap();
    first.wait_for("totals", last, DEADLINE).unwrap();
    assert_eq!(
        seeded.load(Ordering::SeqCst),
        200,
        "restored from the snapshot"
    );
    assert_eq!(
        total_in(&second_dir, "totals"),
        total_in(&first_dir, "totals")
    );
    assert_eq!(total_in(&second_dir, "totals"), 225);
}

/// A location that dies part way through a fetch (as a killed restore
/// would): half a file is written and the fetch fails.
struct DiesMidFetch(projectionist_runner::snapshot::SnapshotDir);

impl projectionist_runner::snapshot::SnapshotLocation for DiesMidFetch {
    fn put(
        &self,
        manifest: &projectionist_runner::snapshot::Manifest,
        file: &Path,
    ) -> projectionist::Result<()> {
        self.0.put(manifest, file)
    }

    fn manifests(
        &self,
        name: &str,
    ) -> projectionist::Result<Vec<projectionist_runner::snapshot::Manifest>> {
        self.0.manifests(name)
    }

    fn fetch(
        &self,
        manifest: &projectionist_runner::snapshot::Manifest,
        to: &Path,
    ) -> projectionist::Result<()> {
        self.0.fetch(manifest, to)?;
        let half = std::fs::read(to).unwrap();
        std::fs::write(to, &half[..half.len() / 2]).unwrap();
        Err(projectionist::Error::CorruptStore("died mid-fetch".into()))
    }

    fn delete(&self, name: &str, checkpoint: u64) -> projectionist::Result<()> {
        self.0.delete(name, checkpoint)
    }
}

/// A restore that dies part way leaves no projection file (never half a
/// one): the projection is then built from the log, and a later restore
/// from a sound location works.
#[test]
fn a_restore_that_dies_part_way_leaves_no_half_projection() {
    use projectionist_runner::snapshot::{SnapshotDir, seed, store_identity, take_snapshot};
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    append(&store, 100);
    let built = tmp.path().join("built");
    let first = Supervisor::builder(store.clone(), &built)
        .unwrap()
        .projection(versioned("totals", 1, 1))
        .start()
        .unwrap();
    first.wait_for("totals", 100, DEADLINE).unwrap();
    let identity = store_identity::<Value>(&*store).unwrap().unwrap();
    let snaps = SnapshotDir(tmp.path().join("snaps"));
    let manifest = take_snapshot(&built, "totals", &snaps, &identity, 0).unwrap();
    let target = tmp.path().join("target");
    let dying = DiesMidFetch(snaps.clone());
    let seeded = seed(
        &target,
        "totals",
        &dying,
        manifest.definition_hash.as_deref(),
        &identity,
        100,
    )
    .unwrap();
    assert!(seeded.restored.is_none());
    assert_eq!(seeded.refused.len(), 1, "{seeded:?}");
    assert!(seeded.refused[0].1.contains("died mid-fetch"), "{seeded:?}");
    assert!(!target.join("totals.db").exists(), "no half projection");
    let seeded = seed(
        &target,
        "totals",
        &snaps,
        manifest.definition_hash.as_deref(),
        &identity,
        100,
    )
    .unwrap();
    assert_eq!(seeded.restored.map(|m| m.checkpoint), Some(100));
    assert_eq!(total_in(&target, "totals"), 100);
}

/// A link planted where a restore writes its copy is removed, not written
/// through: the file it points at is unchanged.
#[test]
fn a_link_planted_at_the_restore_copy_is_not_written_through() {
    use projectionist_runner::snapshot::{SnapshotDir, seed, store_identity, take_snapshot};
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    append(&store, 10);
    let built = tmp.path().join("built");
    let first = Supervisor::builder(store.clone(), &built)
        .unwrap()
        .projection(versioned("totals", 1, 1))
        .start()
        .unwrap();
    first.wait_for("totals", 10, DEADLINE).unwrap();
    let identity = store_identity::<Value>(&*store).unwrap().unwrap();
    let snaps = SnapshotDir(tmp.path().join("snaps"));
    take_snapshot(&built, "totals", &snaps, &identity, 0).unwrap();
    let target = tmp.path().join("target");
    std::fs::create_dir_all(&target).unwrap();
    let victim = tmp.path().join("victim.txt");
    std::fs::write(&victim, "keep me").unwrap();
    std::os::unix::fs::symlink(&victim, target.join(".totals.seed-tmp")).unwrap();
    let seeded = seed(&target, "totals", &snaps, None, &identity, 10).unwrap();
    assert!(seeded.restored.is_some(), "{seeded:?}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
    assert_eq!(total_in(&target, "totals"), 10);
}

/// Sums `n`, refusing a negative one (its handler error is the poison).
fn refusing_negatives() -> impl Handler<Value> + 'static {
    SchemaHandler::new(
        "CREATE TABLE IF NOT EXISTS total (id INTEGER PRIMARY KEY CHECK (id = 1), sum INTEGER NOT NULL);
         INSERT OR IGNORE INTO total VALUES (1, 0);",
        |tx: &Transaction<'_>, events: &[GlobalEvent<Value>]| {
            for event in events {
                let n = event.data["n"].as_i64().unwrap_or(0);
                if n < 0 {
                    return Err(format!("negative n {n} in event {}", event.sequence).into());
                }
                tx.execute("UPDATE total SET sum = sum + ?1", [n])?;
            }
            Ok(())
        },
    )
}

#[test]
fn a_skipping_projection_dead_letters_a_poison_event_follows_on_and_a_retry_applies_it_once_fixed()
{
    a_skipping_projection_dead_letters_a_poison_event_follows_on_and_a_retry_applies_it_once_fixed_in(false);
}

#[test]
fn a_skipping_projection_dead_letters_a_poison_event_follows_on_and_a_retry_applies_it_once_fixed_with_shared_reads()
 {
    a_skipping_projection_dead_letters_a_poison_event_follows_on_and_a_retry_applies_it_once_fixed_in(true);
}

fn a_skipping_projection_dead_letters_a_poison_event_follows_on_and_a_retry_applies_it_once_fixed_in(
    shared: bool,
) {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    append(&store, 10);
    let bad = store
        .append(
            "bad",
            0,
            &[NewEvent::json("Added", &json!({"n": -5})).unwrap()],
        )
        .unwrap()
        .first_sequence;
    let projections = tmp.path().join("projections");
    let supervisor = builder(&store, &projections, shared)
        .projection(
            Supervised::new("totals", projectionist::Skipping::new(refusing_negatives())).unwrap(),
        )
        .start()
        .unwrap();
    let last = append(&store, 5);
    supervisor
        .wait_for("totals", last, DEADLINE)
        .expect("follows past the poison event");
    assert_eq!(total_in(&projections, "totals"), 15);
    let status = supervisor.status_of("totals").unwrap();
    assert_eq!(status.dead_letters, 1, "{status:?}");
    assert_eq!(status.state, State::Following);
    // Still poison: the retry fails again and keeps it.
    let Outcome::Retried(again) = supervisor
        .request("totals", Request::Retry(projectionist::Retry::All))
        .unwrap()
    else {
        panic!("a retry answers with what it retried");
    };
    assert_eq!(again.applied, Vec::<u64>::new());
    assert_eq!(again.failed.len(), 1);
    assert!(again.failed[0].1.contains("negative n -5"), "{again:?}");
    // Fixed in the log: applied, removed, and the projection follows on.
    Connection::open(tmp.path().join("events.db"))
        .unwrap()
        .execute(
            "UPDATE events SET data = '{\"n\": 5}' WHERE sequence = ?1",
            [bad as i64],
        )
        .unwrap();
    let Outcome::Retried(fixed) = supervisor
        .request(
            "totals",
            Request::Retry(projectionist::Retry::Sequence(bad)),
        )
        .unwrap()
    else {
        panic!("a retry answers with what it retried");
    };
    assert_eq!(fixed.applied, vec![bad]);
    assert_eq!(total_in(&projections, "totals"), 20);
    assert_eq!(supervisor.status_of("totals").unwrap().dead_letters, 0);
    let last = append(&store, 1);
    supervisor
        .wait_for("totals", last, DEADLINE)
        .expect("follows on after the retry");
    assert_eq!(total_in(&projections, "totals"), 21);
    supervisor.shutdown();
}

/// With shared reads, more projections than [`SUPERVISED_MAX`] (and more
/// than the engine keeps open: the rest are parked between batches) follow
/// from one read; a request to one of them is served alone, and it goes back
/// to the shared run.
#[test]
fn with_shared_reads_hundreds_of_projections_follow_and_one_is_rebuilt_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    append(&store, 100);
    let projections = tmp.path().join("projections");
    let n = projectionist::limits::OPEN_PROJECTIONS_MAX + 44;
    assert!(n > projectionist_runner::SUPERVISED_MAX);
    let names: Vec<String> = (0..n).map(|i| format!("p{i:03}")).collect();
    let mut building = builder(&store, &projections, true);
    for name in &names {
        building = building.projection(versioned(name, 1, 1));
    }
    let supervisor = building.start().unwrap();
    let last = append(&store, 3);
    for name in &names {
        supervisor.wait_for(name, last, DEADLINE).unwrap();
    }
    assert_eq!(total_in(&projections, "p299"), 103);
    let rebuilt = supervisor.request("p299", Request::Rebuild).unwrap();
    let Outcome::Rebuilt {
        published: Some(published),
        ..
    } = rebuilt
    else {
        panic!("a built projection is rebuilt in its shadow and published: {rebuilt:?}");
    };
    assert_eq!(published.checkpoint, last);
    wait_until("back to following", || {
        state_of(&supervisor, "p299") == State::Following
    });
    let last = append(&store, 1);
    for name in &names {
        supervisor.wait_for(name, last, DEADLINE).unwrap();
    }
    assert_eq!(total_in(&projections, "p299"), 104);
    assert_eq!(total_in(&projections, "p000"), 104);
    let states = supervisor.shutdown();
    assert!(
        states
            .iter()
            .all(|s| s.state == State::Stopped { reason: None }),
        "{states:?}"
    );
}
