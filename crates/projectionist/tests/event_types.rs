//! A handler that declares its event types gets only those, and events of
//! other types are neither read nor decoded: a payload of another type that
//! would not decode into the handler's type does not stop it.

use projectionist::rusqlite::Transaction;
use projectionist::{
    BoxError, GlobalEvent, GlobalReader, NewEvent, ProjectionDir, ProjectionTarget, RebuildOptions,
    SchemaHandler, SqliteEventStore, Start, TypedBatch, replay,
};
use serde::Deserialize;

/// The payload of `Deposited` events; `Renamed` events carry none of it.
#[derive(Deserialize)]
struct Deposited {
    cents: i64,
}

/// A reader that counts how it was asked, around a real store.
struct Counting<'a> {
    inner: &'a SqliteEventStore,
    typed_reads: std::sync::atomic::AtomicUsize,
    untyped_reads: std::sync::atomic::AtomicUsize,
}

impl GlobalReader<Deposited> for Counting<'_> {
    fn read_after(
        &self,
        after: u64,
        limit: u32,
    ) -> projectionist::Result<Vec<GlobalEvent<Deposited>>> {
        self.untyped_reads
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.read_after(after, limit)
    }

    fn read_after_types(
        &self,
        after: u64,
        limit: u32,
        event_types: &[String],
    ) -> projectionist::Result<TypedBatch<Deposited>> {
        self.typed_reads
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.read_after_types(after, limit, event_types)
    }

    fn head(&self) -> projectionist::Result<u64> {
        GlobalReader::<Deposited>::head(self.inner)
    }
}

fn log(path: &std::path::Path) -> SqliteEventStore {
    let store = SqliteEventStore::create(path).unwrap();
    for version in 0..300u64 {
        let event = if version % 3 == 2 {
            NewEvent::json(
                "Renamed",
                &serde_json::json!({"name": format!("n{version}")}),
            )
        } else {
            NewEvent::json("Deposited", &serde_json::json!({"cents": 1}))
        }
        .unwrap();
        store.append("acc-1", version, &[event]).unwrap();
    }
    store
}

fn deposits(tx: &Transaction<'_>, events: &[GlobalEvent<Deposited>]) -> Result<(), BoxError> {
    for event in events {
        assert_eq!(event.event_type, "Deposited", "only declared types arrive");
        tx.execute(
            "INSERT INTO total VALUES (1, ?1) ON CONFLICT (k) DO UPDATE SET cents = cents + excluded.cents",
            [event.data.cents],
        )?;
    }
    Ok(())
}

const SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS total (k INTEGER PRIMARY KEY, cents INTEGER NOT NULL)";

#[test]
fn events_of_undeclared_types_are_neither_read_nor_decoded() {
    let tmp = tempfile::tempdir().unwrap();
    let store = log(&tmp.path().join("events.db"));
    let reader = Counting {
        inner: &store,
        typed_reads: 0.into(),
        untyped_reads: 0.into(),
    };
    let dir = ProjectionDir::open(tmp.path().join("projections")).unwrap();
    let db = dir.db("deposits").unwrap();
    let mut handler = SchemaHandler::new(SCHEMA, deposits).event_types(["Deposited"]);
    let results = replay(
        &reader,
        vec![ProjectionTarget::new(&db, &mut handler).start(Start::Reset)],
        &RebuildOptions::new().batch_size(50),
    );
    let result = results.into_iter().next().unwrap().unwrap();
    // 200 deposits applied; the checkpoint reaches the head past the renames.
    assert_eq!((result.processed, result.checkpoint), (200, 300));
    let cents: i64 = db
        .open_reader()
        .unwrap()
        .query_row("SELECT cents FROM total", [], |r| r.get(0))
        .unwrap();
    assert_eq!(cents, 200);
    assert!(reader.typed_reads.load(std::sync::atomic::Ordering::SeqCst) > 0);
    assert_eq!(
        reader
            .untyped_reads
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the read is filtered by the declared types"
    );
}

#[test]
fn without_declared_types_an_event_of_another_shape_is_a_poison_event() {
    let tmp = tempfile::tempdir().unwrap();
    let store = log(&tmp.path().join("events.db"));
    let dir = ProjectionDir::open(tmp.path().join("projections")).unwrap();
    let db = dir.db("deposits").unwrap();
    let mut handler = SchemaHandler::new(SCHEMA, deposits);
    let results = replay(
        &store,
        vec![ProjectionTarget::new(&db, &mut handler).start(Start::Reset)],
        &RebuildOptions::new().batch_size(50),
    );
    let err = results.into_iter().next().unwrap().unwrap_err();
    assert!(err.to_string().contains("Renamed"), "{err}");
    // Stopped before the first rename (sequence 3), the deposits before it kept.
    assert_eq!(
        projectionist::SqliteCheckpoint::load_in(&db.open_reader().unwrap(), "deposits").unwrap(),
        2
    );
}
