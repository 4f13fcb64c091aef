//! Dead letters: a projection that skips poison events (`Skipping`) records
//! each event it cannot apply in its own file and goes on; the result equals
//! a run over the log without those events, whatever the batch size or the
//! run (rebuild, shared and parked, follow); errors of the environment are
//! not dead-lettered; a bound stops a flood; a retry after a fix applies them.

mod common;

use common::{BANK_SCHEMA, BankEvent, BankHandler, Poison, digest, options};
use std::time::{Duration, Instant};

use projectionist::rusqlite::{Connection, Transaction};
use projectionist::{
    BoxError, CancelToken, Error, GlobalEvent, Handler, ProjectionDb, ProjectionDir,
    ProjectionTarget, RebuildConfig, Retry, Skipping, SqliteEventStore, Start, dead_letters,
    rebuild, retry_dead_letters,
};

const N_EVENTS: u64 = 3_000;
const POISON_EVERY: u64 = 170;

struct Fixture {
    tmp: tempfile::TempDir,
    store: SqliteEventStore,
    poisoned: Vec<u64>,
    dir: ProjectionDir,
}

fn fixture(poison: Poison) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let store = SqliteEventStore::create(tmp.path().join("events.db")).unwrap();
    let poisoned = common::write_bank_log_poisoned(&store, N_EVENTS, 200, 5, Some(poison));
    let dir = ProjectionDir::open(tmp.path().join("p")).unwrap();
    Fixture {
        tmp,
        store,
        poisoned,
        dir,
    }
}

/// The bank handler over a log whose poison events were replaced by `Noted`
/// placeholders, which it passes over: the projection of the log without them.
struct PassingNoted(BankHandler);

impl Handler<BankEvent> for PassingNoted {
    fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        self.0.setup(tx)
    }
    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        events: &[GlobalEvent<BankEvent>],
    ) -> Result<(), BoxError> {
        for event in events.iter().filter(|e| e.event_type != "Noted") {
            self.0.apply(tx, std::slice::from_ref(event))?;
        }
        Ok(())
    }
}

/// The digest of the bank projection built from the log without poison.
fn reference() -> String {
    let f = fixture(Poison::Placeholders(POISON_EVERY));
    let db = f.dir.db("bank").unwrap();
    let mut handler = PassingNoted(BankHandler::default());
    rebuild(RebuildConfig {
        reader: &f.store,
        projection: target(&db, &mut handler),
        options: options(500),
    })
    .unwrap();
    digest(&db)
}

fn target<'a>(
    db: &'a ProjectionDb,
    handler: &'a mut dyn Handler<BankEvent>,
) -> ProjectionTarget<'a, BankEvent> {
    ProjectionTarget::new(db, handler).consumer_id("bank")
}

fn letters(db: &ProjectionDb) -> Vec<projectionist::DeadLetter> {
    dead_letters(&db.open_reader().unwrap()).unwrap()
}

fn sequences(letters: &[projectionist::DeadLetter]) -> Vec<u64> {
    letters.iter().map(|l| l.sequence).collect()
}

#[test]
fn a_skipping_projection_equals_the_log_without_its_poison_and_lists_exactly_it() {
    let expected = reference();
    let f = fixture(Poison::Every(POISON_EVERY));
    assert!(f.poisoned.len() >= 10, "{:?}", f.poisoned);
    for batch_size in [1, 64, 500] {
        let db = f.dir.db(&format!("bank{batch_size}")).unwrap();
        let mut handler = Skipping::new(BankHandler::default()).max_dead_letters(1_000);
        let result = rebuild(RebuildConfig {
            reader: &f.store,
            projection: target(&db, &mut handler),
            options: options(batch_size),
        })
        .unwrap_or_else(|e| panic!("batch {batch_size}: {e}"));
        let n = f.poisoned.len() as u64;
        assert_eq!(
            (result.dead_letters, result.dead_lettered),
            (n, n),
            "batch {batch_size}"
        );
        assert_eq!(
            result.checkpoint,
            N_EVENTS + n,
            "batch {batch_size}: the checkpoint passes the poison"
        );
        assert_eq!(digest(&db), expected, "batch {batch_size}");
        let letters = letters(&db);
        assert_eq!(sequences(&letters), f.poisoned, "batch {batch_size}");
        for (k, letter) in letters.iter().enumerate() {
            assert_eq!(letter.stream_id, format!("poison-{k}"));
            assert_eq!(letter.attempts, 1);
            if k % 2 == 0 {
                assert_eq!(letter.event_type, "Bogus");
                assert!(
                    letter.error.contains("unknown event type Bogus"),
                    "{}",
                    letter.error
                );
                assert_eq!(letter.stream_version, Some(1), "{letter:?}");
            } else {
                assert_eq!(letter.event_type, "Opened");
                assert!(letter.error.contains("invalid type"), "{}", letter.error);
            }
        }
    }
}

#[test]
fn a_projection_that_stops_on_error_still_stops_at_the_first_poison_event() {
    let f = fixture(Poison::Every(POISON_EVERY));
    let db = f.dir.db("bank").unwrap();
    let mut handler = BankHandler::default();
    let err = rebuild(RebuildConfig {
        reader: &f.store,
        projection: target(&db, &mut handler),
        options: options(100),
    })
    .unwrap_err();
    // The batch holding it is rolled back whole; the ones before commit.
    let committed = err.committed().unwrap();
    assert!(
        committed < f.poisoned[0] && committed + 100 >= f.poisoned[0],
        "{err}"
    );
    assert!(letters(&db).is_empty());
}

#[test]
fn past_max_dead_letters_the_projection_stops_as_failed() {
    let f = fixture(Poison::Every(POISON_EVERY));
    let db = f.dir.db("bank").unwrap();
    let mut handler = Skipping::new(BankHandler::default()).max_dead_letters(3);
    let err = rebuild(RebuildConfig {
        reader: &f.store,
        projection: target(&db, &mut handler),
        options: options(100),
    })
    .unwrap_err();
    assert!(
        matches!(err, Error::DeadLettersFull { max: 3, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("definition is wrong"), "{err}");
    let committed = err.committed().unwrap();
    assert!(
        committed >= f.poisoned[2] && committed < f.poisoned[3],
        "committed {committed}, poison at {:?}",
        &f.poisoned[..4]
    );
    assert_eq!(sequences(&letters(&db)), f.poisoned[..3].to_vec());
}

/// The bank handler fixed to accept `Bogus` events: each one is a row of
/// table `bogus`.
struct Fixed(BankHandler);

impl Handler<BankEvent> for Fixed {
    fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        tx.execute_batch(BANK_SCHEMA)?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS bogus (sequence INTEGER PRIMARY KEY)")?;
        Ok(())
    }
    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        events: &[GlobalEvent<BankEvent>],
    ) -> Result<(), BoxError> {
        for event in events {
            if event.event_type == "Bogus" {
                tx.execute("INSERT INTO bogus VALUES (?1)", [event.sequence as i64])?;
            } else {
                self.0.apply(tx, std::slice::from_ref(event))?;
            }
        }
        Ok(())
    }
}

#[test]
fn retry_after_a_fix_applies_the_dead_letters_that_now_succeed_and_keeps_the_others() {
    let f = fixture(Poison::Every(POISON_EVERY));
    let db = f.dir.db("bank").unwrap();
    let mut handler = Skipping::new(BankHandler::default()).max_dead_letters(1_000);
    rebuild(RebuildConfig {
        reader: &f.store,
        projection: target(&db, &mut handler),
        options: options(100),
    })
    .unwrap();
    let bank_before = bank_rows(&db.open_reader().unwrap());
    let bogus: Vec<u64> = f.poisoned.iter().copied().step_by(2).collect();
    let undecodable: Vec<u64> = f.poisoned.iter().copied().skip(1).step_by(2).collect();
    // One alone first, then all.
    let mut fixed = Fixed(BankHandler::default());
    let one = retry_dead_letters(&f.store, &db, &mut fixed, Retry::Sequence(bogus[0])).unwrap();
    assert_eq!(one.applied, vec![bogus[0]]);
    assert!(one.failed.is_empty());
    let all = retry_dead_letters(&f.store, &db, &mut fixed, Retry::All).unwrap();
    assert_eq!(all.applied, bogus[1..].to_vec());
    let failed: Vec<u64> = all.failed.iter().map(|(s, _)| *s).collect();
    assert_eq!(failed, undecodable);
    let left = letters(&db);
    assert_eq!(sequences(&left), undecodable);
    assert!(left.iter().all(|l| l.attempts == 2), "{left:?}");
    let conn = db.open_reader().unwrap();
    let rows: Vec<u64> = conn
        .prepare("SELECT sequence FROM bogus ORDER BY sequence")
        .unwrap()
        .query_map([], |r| r.get::<_, i64>(0))
        .unwrap()
        .map(|r| r.unwrap() as u64)
        .collect();
    assert_eq!(rows, bogus, "every Bogus event applied once");
    assert_eq!(
        bank_rows(&conn),
        bank_before,
        "the bank's rows are untouched"
    );
    let err = retry_dead_letters(&f.store, &db, &mut fixed, Retry::Sequence(1)).unwrap_err();
    assert!(
        err.to_string().contains("no dead letter at sequence 1"),
        "{err}"
    );
}

/// The rows of the bank's tables, as text.
fn bank_rows(conn: &Connection) -> String {
    let mut text = String::new();
    for table in ["account", "totals"] {
        let mut stmt = conn
            .prepare(&format!("SELECT * FROM {table} ORDER BY 1"))
            .unwrap();
        let n = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            for i in 0..n {
                let v: projectionist::rusqlite::types::Value = row.get(i).unwrap();
                text.push_str(&format!("{v:?},"));
            }
            text.push('\n');
        }
    }
    text
}

#[test]
fn a_parked_skipping_projection_in_a_shared_run_equals_the_log_without_its_poison() {
    let expected = reference();
    let f = fixture(Poison::Every(POISON_EVERY));
    let mut bank = Skipping::new(BankHandler::default()).max_dead_letters(1_000);
    let bank_result = common::rebuild_parked(&f.store, &f.dir, &mut bank, &options(100)).unwrap();
    assert_eq!(bank_result.dead_letters, f.poisoned.len() as u64);
    let bank_db = f.dir.db("bank").unwrap();
    assert_eq!(digest(&bank_db), expected);
    assert_eq!(sequences(&letters(&bank_db)), f.poisoned);
}

#[test]
fn a_follower_dead_letters_a_new_poison_event_and_follows_on() {
    let f = fixture(Poison::Every(POISON_EVERY));
    let db = f.dir.db("bank").unwrap();
    let stop = CancelToken::new();
    std::thread::scope(|scope| {
        let following = scope.spawn(|| {
            let mut handler = Skipping::new(BankHandler::default()).max_dead_letters(1_000);
            projectionist::replay(
                &f.store,
                vec![target(&db, &mut handler).start(Start::Reset)],
                &options(100).follow_until(&stop),
            )
        });
        let wait_for = |sequence: u64| {
            let deadline = Instant::now() + Duration::from_secs(30);
            while common::checkpoint(&db, "bank") < sequence {
                assert!(Instant::now() < deadline, "never reached {sequence}");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        wait_for(projectionist::GlobalReader::<BankEvent>::head(&f.store).unwrap());
        let bad = f
            .store
            .append(
                "late-poison",
                0,
                &[projectionist::NewEvent::json("Bogus", &serde_json::json!({})).unwrap()],
            )
            .unwrap()
            .first_sequence;
        let good = f
            .store
            .append(
                "acc-late",
                0,
                &[
                    projectionist::NewEvent::json("Opened", &serde_json::json!({"owner": "late"}))
                        .unwrap(),
                ],
            )
            .unwrap()
            .first_sequence;
        wait_for(good);
        stop.cancel();
        let result = following.join().unwrap().pop().unwrap().unwrap();
        assert_eq!(result.dead_letters, f.poisoned.len() as u64 + 1);
        let mut expected = f.poisoned.clone();
        expected.push(bad);
        assert_eq!(sequences(&letters(&db)), expected);
        let owner: String = db
            .open_reader()
            .unwrap()
            .query_row("SELECT owner FROM account WHERE id = 'acc-late'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(owner, "late");
    });
}

/// Reads a lookup database beside the projection for every event: while
/// another connection holds that database's write lock exclusively, every
/// read fails with SQLite's "database is locked", an error of the
/// environment.
struct LooksUp {
    bank: BankHandler,
    lookup: std::path::PathBuf,
}

impl Handler<BankEvent> for LooksUp {
    fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        self.bank.setup(tx)
    }
    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        events: &[GlobalEvent<BankEvent>],
    ) -> Result<(), BoxError> {
        let lookup = Connection::open(&self.lookup)?;
        lookup.busy_timeout(Duration::ZERO)?;
        lookup.query_row("SELECT count(*) FROM rates", [], |r| r.get::<_, i64>(0))?;
        self.bank.apply(tx, events)
    }
}

#[test]
fn an_error_of_the_environment_stops_the_run_and_is_never_dead_lettered() {
    let f = fixture(Poison::Every(POISON_EVERY));
    let lookup = f.tmp.path().join("lookup.db");
    let holder = Connection::open(&lookup).unwrap();
    holder
        .execute_batch("PRAGMA journal_mode = DELETE; CREATE TABLE rates (r); BEGIN EXCLUSIVE;")
        .unwrap();
    let db = f.dir.db("bank").unwrap();
    let mut handler = Skipping::new(LooksUp {
        bank: BankHandler::default(),
        lookup: lookup.clone(),
    });
    let err = rebuild(RebuildConfig {
        reader: &f.store,
        projection: target(&db, &mut handler),
        options: options(100),
    })
    .unwrap_err();
    assert!(projectionist::is_transient(&err), "{err}");
    assert!(err.to_string().contains("locked"), "{err}");
    assert!(letters(&db).is_empty(), "nothing dead-lettered");
    assert_eq!(err.committed(), Some(0));
    // Once the lock is gone, the same run goes through, and dead-letters
    // only the poison.
    holder.execute_batch("COMMIT").unwrap();
    let result = projectionist::resume(RebuildConfig {
        reader: &f.store,
        projection: target(&db, &mut handler),
        options: options(100),
    })
    .unwrap();
    assert_eq!(sequences(&letters(&db)), f.poisoned);
    assert_eq!(result.dead_letters, f.poisoned.len() as u64);
}

/// The bank handler, panicking on `Bogus` events.
struct Panicking(BankHandler);

impl Handler<BankEvent> for Panicking {
    fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        self.0.setup(tx)
    }
    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        events: &[GlobalEvent<BankEvent>],
    ) -> Result<(), BoxError> {
        for event in events {
            assert!(event.event_type != "Bogus", "no Bogus in my bank");
            self.0.apply(tx, std::slice::from_ref(event))?;
        }
        Ok(())
    }
}

#[test]
fn a_handler_that_panics_on_an_event_has_it_dead_lettered_like_an_error() {
    let expected = reference();
    let f = fixture(Poison::Every(POISON_EVERY));
    let db = f.dir.db("bank").unwrap();
    let mut handler = Skipping::new(Panicking(BankHandler::default())).max_dead_letters(1_000);
    rebuild(RebuildConfig {
        reader: &f.store,
        projection: target(&db, &mut handler),
        options: options(100),
    })
    .unwrap();
    assert_eq!(digest(&db), expected);
    let letters = letters(&db);
    assert_eq!(sequences(&letters), f.poisoned);
    let bogus = &letters[0];
    assert_eq!(bogus.event_type, "Bogus");
    assert!(
        bogus
            .error
            .contains("handler panicked: no Bogus in my bank"),
        "{}",
        bogus.error
    );
}
