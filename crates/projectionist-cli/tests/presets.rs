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

/// Emmett's fixture: three shopping carts, six events
/// (`fixtures/emmett/make_fixture.mjs`).
const EMMETT_FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/emmett");

/// Cart totals from Emmett's or Marten's events (`fields` names the JSON
/// fields each tool's events carry).
fn carts_config(preset: &str, added: &str, removed: Option<&str>, fields: [&str; 2]) -> String {
    let [quantity, price] = fields;
    let mut config = format!(
        r#"
[source]
preset = "{preset}"

[[projection]]
name = "carts"
version = 1
schema = "CREATE TABLE carts (cart TEXT PRIMARY KEY, items INTEGER NOT NULL, total INTEGER NOT NULL)"

[projection.on.{added}]
sql = """INSERT INTO carts VALUES (:_stream_id, :{quantity}!int, :{quantity}!int * :{price}!int)
         ON CONFLICT (cart) DO UPDATE SET items = items + excluded.items, total = total + excluded.total"""
"#
    );
    if let Some(removed) = removed {
        config.push_str(&format!(
            r#"
[projection.on.{removed}]
sql = "UPDATE carts SET items = items - :{quantity}!int, total = total - :{quantity}!int * :{price}!int WHERE cart = :_stream_id"
"#
        ));
    }
    config
}

fn carts(env: &Env) -> Vec<(String, i64, i64)> {
    let conn = projectionist::rusqlite::Connection::open(env.path("projections/carts.db")).unwrap();
    let mut stmt = conn
        .prepare("SELECT cart, items, total FROM carts ORDER BY cart")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn emmett_preset_reads_emmetts_sqlite_store_and_only_its_live_events() {
    let env = Env::new();
    let fixture = Path::new(EMMETT_FIXTURE).join("events.db");
    std::fs::copy(&fixture, env.path("events.db")).unwrap();
    env.write_config(&carts_config(
        "emmett",
        "ProductItemAdded",
        Some("ProductItemRemoved"),
        ["quantity", "unitPrice"],
    ));
    let out = env.run(&["--quiet", "rebuild"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let all = vec![
        ("shopping_cart-1".to_owned(), 4, 210),
        ("shopping_cart-2".to_owned(), 1, 30),
        ("shopping_cart-3".to_owned(), 1, 20),
    ];
    assert_eq!(carts(&env), all);
    assert!(
        std::fs::read(env.path("events.db")).unwrap() == std::fs::read(&fixture).unwrap(),
        "the store file changed"
    );
    // Rows that are not live events are left out: a copy of the fixture with
    // cart 3's stream archived and a message of another kind (edited here by
    // hand, as Emmett would write them).
    let copy = env.path("edited.db");
    std::fs::copy(&fixture, &copy).unwrap();
    let conn = projectionist::rusqlite::Connection::open(&copy).unwrap();
    conn.execute_batch(
        "UPDATE emt_messages SET is_archived = TRUE WHERE stream_id = 'shopping_cart-3';
         INSERT INTO emt_messages (stream_id, stream_position, message_kind, message_data, message_metadata,
                                   message_schema_version, message_type, message_id)
         VALUES ('shopping_cart-2', 2, 'L', '{\"quantity\": 100, \"unitPrice\": 1}', '{}', '1', 'ProductItemAdded', 'x');",
    )
    .unwrap();
    drop(conn);
    let out = env
        .command_with("edited.db", "projections", &["--quiet", "rebuild"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        carts(&env),
        all[..2].to_vec(),
        "archived and non-event rows left out"
    );
}

#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn marten_preset_reads_mt_events_without_archived_events() {
    // Marten (.NET) cannot be installed here: the fixture is its published
    // table definition with rows written as Marten's append writes them.
    let schema = common::pg::Schema::new("marten_preset");
    let url = schema.url();
    let sql = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/marten/mt_events.sql"
    ))
    .unwrap();
    postgres::Client::connect(&url, postgres::NoTls)
        .unwrap()
        .batch_execute(&sql)
        .unwrap();
    let env = Env::new();
    env.write_config(&carts_config(
        "marten",
        "item_added",
        None,
        ["Quantity", "UnitPrice"],
    ));
    let out = env
        .command_with(&url, "projections", &["--quiet", "rebuild"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        carts(&env),
        vec![
            ("0b5f0f4e-1d4f-4a53-9b59-4a4f7c5e0001".to_owned(), 5, 215),
            ("0b5f0f4e-1d4f-4a53-9b59-4a4f7c5e0002".to_owned(), 1, 30),
        ],
        "the archived stream's events are left out"
    );
}

/// Loads the Marten fixture into `schema`.
fn load_marten(url: &str) {
    let sql = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/marten/mt_events.sql"
    ))
    .unwrap();
    postgres::Client::connect(url, postgres::NoTls)
        .unwrap()
        .batch_execute(&sql)
        .unwrap();
}

/// Issue 13: a worker reading another program's table keeps its leases and
/// heartbeats in a schema of its own (`[source] state_schema`), never beside
/// the table it reads.
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn a_worker_on_a_foreign_table_creates_nothing_beside_it() {
    let schema = common::pg::Schema::new("marten_worker");
    let url = schema.url();
    load_marten(&url);
    let state = format!("pj_state_{}", std::process::id());
    let env = Env::new();
    env.write_config(
        &carts_config("marten", "item_added", None, ["Quantity", "UnitPrice"]).replace(
            "preset = \"marten\"",
            &format!("preset = \"marten\"\nstate_schema = \"{state}\""),
        ),
    );
    let out = env
        .command_with(
            &url,
            "projections",
            &["--quiet", "worker", "--exit-when-done"],
        )
        .output()
        .unwrap();
    let mut client = postgres::Client::connect(&schema.base, postgres::NoTls).unwrap();
    let mut tables = |schema: &str| -> Vec<String> {
        client
            .query(
                "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1",
                &[&schema],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let beside = tables(&schema.name);
    let ours = tables(&state);
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {state} CASCADE"))
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(carts(&env).len(), 2, "the worker built the projection");
    assert_eq!(
        beside,
        ["mt_events", "mt_streams"],
        "nothing created beside the table read"
    );
    assert_eq!(ours, ["projection_leases", "projection_workers"]);
}

#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn emmett_preset_reads_emmetts_postgres_store_and_only_its_live_events() {
    let schema = common::pg::Schema::new("emmett_preset");
    let url = schema.url();
    let dump = std::fs::read_to_string(Path::new(EMMETT_FIXTURE).join("postgres.sql")).unwrap();
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    client.batch_execute(&dump).unwrap();
    let env = Env::new();
    env.write_config(&carts_config(
        "emmett",
        "ProductItemAdded",
        Some("ProductItemRemoved"),
        ["quantity", "unitPrice"],
    ));
    let rebuild = || {
        let out = env
            .command_with(&url, "projections", &["--quiet", "rebuild", "--in-place"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        carts(&env)
    };
    let all = vec![
        ("shopping_cart-1".to_owned(), 4, 210),
        ("shopping_cart-2".to_owned(), 1, 30),
        ("shopping_cart-3".to_owned(), 1, 20),
    ];
    assert_eq!(rebuild(), all);
    // Archiving a stream (Emmett moves its rows to the archived partition):
    // its events are left out.
    client
        .batch_execute(
            "UPDATE emt_messages SET is_archived = TRUE WHERE stream_id = 'shopping_cart-3'",
        )
        .unwrap();
    assert_eq!(rebuild(), all[..2].to_vec());
}

/// `inspect` on another tool's store: without a config it names the preset
/// whose table the file has; `--preset` reads it; a `projectionist.toml`
/// here with only `[source]` is used; and the skeleton it prints, `[source]`
/// included, runs as generated.
#[test]
fn inspect_finds_the_preset_and_its_skeleton_runs_as_generated() {
    let env = common::Env::new();
    let conn = projectionist::rusqlite::Connection::open(env.path("app.db")).unwrap();
    conn.execute_batch(
        "CREATE TABLE stored_events (originator_id TEXT, originator_version INTEGER, \
         topic TEXT, state BLOB, PRIMARY KEY (originator_id, originator_version))",
    )
    .unwrap();
    for i in 1..=20 {
        conn.execute(
            "INSERT INTO stored_events VALUES (?1, 1, 'bank:Account.Opened', ?2)",
            (
                format!("a{i}"),
                format!("{{\"owner\": \"o{i}\"}}").into_bytes(),
            ),
        )
        .unwrap();
    }
    drop(conn);
    let out = env.run_bare(&["--store", "app.db", "inspect"]);
    assert_eq!(out.status.code(), Some(3));
    let text = common::stderr(&out);
    assert!(text.contains("--preset eventsourcing"), "{text}");
    assert!(text.contains("preset = \"eventsourcing\""), "{text}");

    let out = env.run_bare(&["--store", "app.db", "inspect", "--preset", "eventsourcing"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(common::stdout(&out).contains("bank:Account.Opened"));

    std::fs::write(
        env.path("projectionist.toml"),
        "[source]\npreset = \"eventsourcing\"\n",
    )
    .unwrap();
    let out = env.run_bare(&["--store", "app.db", "inspect", "--config-skeleton"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let skeleton = common::stdout(&out);
    assert!(skeleton.contains("[source]"), "{skeleton}");
    std::fs::write(env.path("generated.toml"), &skeleton).unwrap();
    let out = env.run_bare(&[
        "--store",
        "app.db",
        "--config",
        "generated.toml",
        "--dir",
        "generated",
        "rebuild",
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let conn =
        projectionist::rusqlite::Connection::open(env.path("generated/my_projection.db")).unwrap();
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM my_table", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 20);
}

/// Another program's table whose sequence column has no index is scanned
/// whole for every batch: the run warns with the statement that adds the
/// index, and after it the warning is gone.
#[test]
fn an_unindexed_sequence_column_is_warned_with_the_index_to_add() {
    let env = common::Env::new();
    let conn = projectionist::rusqlite::Connection::open(env.path("app.db")).unwrap();
    conn.execute_batch(
        "CREATE TABLE msgs (seq INTEGER NOT NULL, stream TEXT, ver INTEGER, kind TEXT, body TEXT)",
    )
    .unwrap();
    for i in 1..=30 {
        conn.execute(
            "INSERT INTO msgs VALUES (?1, ?2, 1, 'Added', '{\"n\": 1}')",
            (i, format!("s{i}")),
        )
        .unwrap();
    }
    env.write_config(
        r#"
[source]
table = "msgs"
sequence = "seq"
stream_id = "stream"
stream_version = "ver"
event_type = "kind"
data = "body"

[[projection]]
name = "sums"
version = 1
schema = "CREATE TABLE t (n INTEGER)"
[projection.on.Added]
sql = "INSERT INTO t VALUES (:n!int)"
"#,
    );
    let out = env
        .command_with("app.db", "projections", &["rebuild"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stderr(&out);
    let statement = "CREATE INDEX IF NOT EXISTS [msgs_by_seq] ON [msgs] ([seq]);";
    assert!(text.contains("no index on its sequence column"), "{text}");
    assert!(text.contains(statement), "{text}");
    conn.execute_batch(statement).unwrap();
    let out = env
        .command_with("app.db", "projections", &["resume"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("no index"), "{}", stderr(&out));
}
