//! `Handler::caught_up`: run once per run at the log's head, after the last
//! events are committed, in a transaction of its own; not run by a run that
//! stops short of the head; a failure there keeps the events committed.

mod common;

use std::sync::Mutex;

use common::{BankEvent, BankHandler, bank_store, checkpoint, config, digest, options};
use projectionist::rusqlite::{Connection, Transaction};
use projectionist::{
    BoxError, CancelToken, Error, GlobalEvent, Handler, ProjectionDir, RebuildOptions, rebuild,
    resume,
};

const N_EVENTS: u64 = 5_000;
const INDEX_SQL: &str = "CREATE INDEX IF NOT EXISTS account_by_owner ON account (owner)";

/// The bank projection with an index built at the head. Records the
/// checkpoint it sees each time `caught_up` runs.
#[derive(Default)]
struct Indexed {
    bank: BankHandler,
    fail: bool,
    seen: Mutex<Vec<u64>>,
}

impl Handler<BankEvent> for Indexed {
    fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        self.bank.setup(tx)
    }

    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        events: &[GlobalEvent<BankEvent>],
    ) -> Result<(), BoxError> {
        self.bank.apply(tx, events)
    }

    fn caught_up(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        let at: i64 = tx.query_row(
            "SELECT sequence FROM _checkpoint WHERE consumer_id = 'bank'",
            [],
            |r| r.get(0),
        )?;
        self.seen.lock().unwrap().push(u64::try_from(at)?);
        tx.execute_batch(INDEX_SQL)?;
        if self.fail {
            return Err("refused after building the index".into());
        }
        Ok(())
    }
}

fn has_index(conn: &Connection) -> bool {
    conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE type = 'index' AND name = 'account_by_owner'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .unwrap()
        == 1
}

#[test]
fn caught_up_runs_once_per_run_at_the_head_and_not_before() {
    let tmp = tempfile::tempdir().unwrap();
    let store = bank_store(&tmp.path().join("events.db"), N_EVENTS, 11);
    let dir = ProjectionDir::open(tmp.path().join("projections")).unwrap();
    let plain = dir.db("plain").unwrap();
    rebuild(config(
        &store,
        &plain,
        &mut BankHandler::default(),
        options(100),
    ))
    .unwrap();

    let db = dir.db("indexed").unwrap();
    let mut handler = Indexed::default();
    // A run cancelled part way: the events so far are committed, the index
    // is not built.
    let cancel = CancelToken::new();
    let progress = |p: &projectionist::Progress| {
        if p.processed >= 1_000 {
            cancel.cancel();
        }
    };
    let cancelled = options(100).progress(&progress).cancel(&cancel);
    let err = rebuild(with(&store, &db, &mut handler, cancelled)).unwrap_err();
    assert!(matches!(err, Error::Cancelled { .. }), "{err:?}");
    let stopped_at = checkpoint(&db, "bank");
    assert!(stopped_at > 0 && stopped_at < N_EVENTS, "{stopped_at}");
    assert!(
        !has_index(&db.open_reader().unwrap()),
        "built before the head"
    );
    assert!(handler.seen.lock().unwrap().is_empty());

    // The next run reaches the head: the index is built once, after the
    // last events were committed (it sees the head's checkpoint).
    resume(with(&store, &db, &mut handler, options(100))).unwrap();
    assert!(has_index(&db.open_reader().unwrap()));
    assert_eq!(*handler.seen.lock().unwrap(), vec![N_EVENTS]);
    assert_eq!(digest(&db), digest(&plain), "rows as without the hook");

    // A run with nothing to apply reaches the head too: it runs again.
    resume(with(&store, &db, &mut handler, options(100))).unwrap();
    assert_eq!(*handler.seen.lock().unwrap(), vec![N_EVENTS, N_EVENTS]);
}

#[test]
fn a_failing_caught_up_keeps_the_events_and_rolls_back_its_own_work() {
    let tmp = tempfile::tempdir().unwrap();
    let store = bank_store(&tmp.path().join("events.db"), N_EVENTS, 12);
    let dir = ProjectionDir::open(tmp.path().join("projections")).unwrap();
    let db = dir.db("indexed").unwrap();
    let mut handler = Indexed {
        fail: true,
        ..Indexed::default()
    };
    let err = rebuild(with(&store, &db, &mut handler, options(100))).unwrap_err();
    match &err {
        Error::CaughtUp { name, source } => {
            assert_eq!(name, "indexed");
            assert!(source.to_string().contains("refused"), "{source}");
        }
        other => panic!("expected CaughtUp, got {other:?}"),
    }
    assert_eq!(checkpoint(&db, "bank"), N_EVENTS, "events stay committed");
    assert!(
        !has_index(&db.open_reader().unwrap()),
        "its transaction rolled back"
    );
}

fn with<'a>(
    store: &'a projectionist::SqliteEventStore,
    db: &'a projectionist::ProjectionDb,
    handler: &'a mut Indexed,
    options: RebuildOptions<'a>,
) -> projectionist::RebuildConfig<'a, BankEvent> {
    projectionist::RebuildConfig {
        reader: store,
        projection: projectionist::ProjectionTarget::new(db, handler).consumer_id("bank"),
        options,
    }
}
