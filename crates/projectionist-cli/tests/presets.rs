//! Issue 13, item 3: `[source] preset = "..."` reads another tool's event
//! store as that tool writes it, on fixtures made by the real tool (see
//! `fixtures/*/make_fixture.*`), through the real binary.

mod common;

use std::path::Path;

use common::{Env, stderr};

/// The Python `eventsourcing` library's fixture: three accounts, nine events
/// (`fixtures/eventsourcing/make_fixture.py`).
const ES_FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/eventsourcing");

/// A projection of the fixture's accounts. Event types are the library's
/// topics, `module:Class.Event`, quoted as TOML keys; `state` is the event's
/// attributes as JSON.
fn es_config(source_extra: &str) -> String {
    format!(
        r#"
[source]
preset = "eventsourcing"
{source_extra}

[[projection]]
name = "balances"
version = 1
schema = "CREATE TABLE balances (account TEXT PRIMARY KEY, owner TEXT NOT NULL, balance INTEGER NOT NULL DEFAULT 0, version INTEGER NOT NULL)"

[projection.on."bank:Account.Opened"]
sql = "INSERT INTO balances (account, owner, version) VALUES (:_stream_id, :owner!text, :_stream_version)"

[projection.on."bank:Account.Deposited"]
sql = "UPDATE balances SET balance = balance + :amount!int, version = :_stream_version WHERE account = :_stream_id"

[projection.on."bank:Account.Withdrawn"]
sql = "UPDATE balances SET balance = balance - :amount!int, version = :_stream_version WHERE account = :_stream_id"
"#
    )
}

/// Owner, balance and version of each account, by owner.
fn balances(env: &Env) -> Vec<(String, i64, i64)> {
    let conn =
        projectionist::rusqlite::Connection::open(env.path("projections/balances.db")).unwrap();
    let mut stmt = conn
        .prepare("SELECT owner, balance, version FROM balances ORDER BY owner")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn expected() -> Vec<(String, i64, i64)> {
    vec![
        ("alice".into(), 75, 4),
        ("bob".into(), 0, 3),
        ("carol".into(), 7, 2),
    ]
}

#[test]
fn eventsourcing_preset_reads_the_libraries_sqlite_store_unchanged() {
    let env = Env::new();
    let fixture = Path::new(ES_FIXTURE).join("events.db");
    std::fs::copy(&fixture, env.path("events.db")).unwrap();
    env.write_config(&es_config(""));
    let out = env.run(&["--quiet", "rebuild"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(balances(&env), expected());
    // Read-only: the store file is byte for byte what the library wrote.
    assert!(
        std::fs::read(env.path("events.db")).unwrap() == std::fs::read(&fixture).unwrap(),
        "the store file changed"
    );
    // `inspect` lists the topics through the preset.
    let out = env.run(&["inspect"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listing = common::stdout(&out);
    assert!(listing.contains("bank:Account.Deposited"), "{listing}");
}

#[test]
fn an_unknown_preset_is_a_config_error_naming_the_known_ones() {
    let env = Env::new();
    std::fs::copy(
        Path::new(ES_FIXTURE).join("events.db"),
        env.path("events.db"),
    )
    .unwrap();
    env.write_config(&es_config("").replace("\"eventsourcing\"", "\"axon\""));
    let out = env.run(&["rebuild"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unknown preset \"axon\""),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("eventsourcing"), "{}", stderr(&out));
}

#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn eventsourcing_preset_reads_the_libraries_postgres_table() {
    let schema = common::pg::Schema::new("es_preset");
    let url = schema.url();
    let dump = std::fs::read_to_string(Path::new(ES_FIXTURE).join("postgres.sql")).unwrap();
    postgres::Client::connect(&url, postgres::NoTls)
        .unwrap()
        .batch_execute(&dump)
        .unwrap();
    let env = Env::new();
    // The library names its PostgreSQL table after the application.
    env.write_config(&es_config("table = \"bank_events\""));
    let out = env
        .command_with(&url, "projections", &["--quiet", "rebuild"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(balances(&env), expected());
}
