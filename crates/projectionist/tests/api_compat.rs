//! Code written against the README and the crate docs of earlier versions must
//! keep compiling: struct literals of `ProjectionTarget` with its four fields,
//! an eight-field `EventTableMapping`, options from `..RebuildOptions::default()`,
//! `rebuild_shared` and `open_mapped`. This file is that code; it also runs.

use projectionist::rusqlite::Transaction;
use projectionist::{
    BoxError, CheckpointLocation, EventTableMapping, GlobalEvent, NewEvent, ProjectionDir,
    ProjectionTarget, RebuildOptions, SchemaHandler, SqliteEventStore, rebuild_shared,
};

#[test]
fn code_written_for_earlier_versions_compiles_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    // Deprecated (it creates a missing file), and still working as before.
    #[allow(deprecated)]
    let store = SqliteEventStore::open(tmp.path().join("events.db")).unwrap();
    store
        .append(
            "acc-1",
            0,
            &[NewEvent::json("Deposited", &serde_json::json!({"cents": 5})).unwrap()],
        )
        .unwrap();
    let mapping = EventTableMapping {
        table: "events".into(),
        sequence: "sequence".into(),
        stream_id: "stream_id".into(),
        stream_version: "stream_version".into(),
        event_type: "event_type".into(),
        data: "data".into(),
        metadata: Some("metadata".into()),
        recorded_at: Some("recorded_at".into()),
    };
    let mapped = SqliteEventStore::open_mapped(tmp.path().join("events.db"), &mapping).unwrap();
    let dir = ProjectionDir::open(tmp.path().join("projections")).unwrap();
    let db = dir.db("count").unwrap();
    let mut handler = SchemaHandler::new(
        "CREATE TABLE IF NOT EXISTS n (k INTEGER PRIMARY KEY, v INTEGER NOT NULL)",
        |tx: &Transaction<'_>, events: &[GlobalEvent<serde_json::Value>]| -> Result<(), BoxError> {
            tx.execute(
                "INSERT INTO n VALUES (1, ?1) ON CONFLICT (k) DO UPDATE SET v = v + excluded.v",
                [events.len() as i64],
            )?;
            Ok(())
        },
    );
    let options = RebuildOptions {
        batch_size: 100,
        ..RebuildOptions::default()
    };
    let results = rebuild_shared(
        &mapped,
        vec![ProjectionTarget {
            db: &db,
            handler: &mut handler,
            checkpoint: CheckpointLocation::InFile,
            consumer_id: "count",
        }],
        &options,
    );
    assert_eq!(results[0].as_ref().unwrap().checkpoint, 1);
}
