//! The demo crate: its config is the example users read, and its log is the
//! same for the same seed.

use projectionist::rusqlite::Connection;
use projectionist::{GlobalReader, SqliteEventStore};

/// The crate embeds its own copy of the demo config (a packaged crate cannot
/// reach outside its directory); it must stay equal to the example users read.
#[test]
fn the_embedded_demo_config_equals_the_example() {
    assert_eq!(
        projectionist_demo::CONFIG,
        include_str!("../../../examples/orders/projections.toml"),
        "copy examples/orders/projections.toml to crates/projectionist-demo/src/projections.toml"
    );
}

fn log_of(seed: u64, events: u64) -> Vec<(String, i64, String, String)> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = SqliteEventStore::create(&path).unwrap();
    let written = std::cell::Cell::new(0);
    projectionist_demo::generate(&|appends| store.append_batch(appends), events, seed, &|n| {
        written.set(n)
    })
    .unwrap();
    assert_eq!(written.get(), events, "progress reports every event");
    assert_eq!(
        GlobalReader::<serde_json::Value>::head(&store).unwrap(),
        events
    );
    let conn = Connection::open(&path).unwrap();
    let mut stmt = conn
        .prepare("SELECT stream_id, stream_version, event_type, CAST(data AS TEXT) FROM events ORDER BY sequence")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn the_same_seed_generates_the_same_log_and_another_seed_another() {
    let first = log_of(7, 25_000);
    assert_eq!(first, log_of(7, 25_000));
    assert_ne!(first, log_of(8, 25_000));
    // Every event type the log holds has a statement in the demo config.
    let config = projectionist_demo::CONFIG;
    for (_, _, event_type, _) in &first {
        assert!(
            config.contains(&format!(".on.{event_type}]")),
            "the demo config handles {event_type}"
        );
    }
}
