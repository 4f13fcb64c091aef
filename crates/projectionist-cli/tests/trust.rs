//! Issue 8 ("Trust"), end to end on the real binary: no command destroys, writes
//! into or misreports what is not ours. Each test names the item it covers, and
//! checks that files that are not ours are unchanged byte for byte.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{DEMO_CONFIG, Env, stderr, stdout};
use projectionist::rusqlite::Connection;
use projectionist::{NewEvent, ProjectionDir, SqliteEventStore};

/// Every file below `root` with its bytes, to prove nothing changed.
fn snapshot(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let name = path.strip_prefix(root).unwrap().display().to_string();
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                out.push((name, std::fs::read(&path).unwrap()));
            } else {
                out.push((name, Vec::new()));
            }
        }
    }
    out.sort();
    out
}

/// [`snapshot`] without SQLite's `-shm`/`-wal` sidecars: reading a WAL database
/// may create them; the databases themselves must not change.
fn databases(root: &Path) -> Vec<(String, Vec<u8>)> {
    snapshot(root)
        .into_iter()
        .filter(|(name, _)| !name.ends_with("-shm") && !name.ends_with("-wal"))
        .collect()
}

/// Appends one event to the store file `store` (created if missing).
fn append_one(env: &Env, store: &str, stream: &str, event_type: &str, data: serde_json::Value) {
    let store = SqliteEventStore::create(env.path(store)).unwrap();
    store
        .append(stream, 0, &[NewEvent::json(event_type, &data).unwrap()])
        .unwrap();
}

fn notes_db(path: &Path) {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch("CREATE TABLE notes (text TEXT); INSERT INTO notes VALUES ('keep me');")
        .unwrap();
}

/// Item 1: with the event log and another program's database in the projection
/// directory, `list` shows only projections and `remove-all` leaves both alone.
#[test]
fn list_and_remove_all_touch_only_projections() {
    let env = Env::new();
    env.demo_log(500);
    let dir = env.path("projections");
    std::fs::copy(env.path("events.db"), dir.join("events.db")).unwrap();
    notes_db(&dir.join("notes.db"));
    let foreign = |d: &Path| {
        snapshot(d)
            .into_iter()
            .filter(|(n, _)| n.starts_with("events.db") || n.starts_with("notes.db"))
            .collect::<Vec<_>>()
    };
    let before = foreign(&dir);
    let out = env.run(&["list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "customer_stats\norder_summary\n");
    assert!(
        stderr(&out).contains("notes.db is not a projection"),
        "{}",
        stderr(&out)
    );
    let out = env.run(&["remove", "notes"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not a projection file"),
        "{}",
        stderr(&out)
    );
    let out = env.run(&["remove-all"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("removed order_summary"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("left alone"), "{}", stderr(&out));
    assert!(
        foreign(&dir) == before,
        "a file that is not a projection changed"
    );
    assert_eq!(stdout(&env.run(&["list"])), "");
}

/// Item 2: `demo --store` never replaces a log it did not make.
#[test]
fn demo_refuses_to_replace_an_existing_log() {
    let env = Env::new();
    env.write_config(DEMO_CONFIG);
    let store = SqliteEventStore::create(env.path("events.db")).unwrap();
    let event = NewEvent::json("Noted", &serde_json::json!({"n": 1})).unwrap();
    for stream in 0..100 {
        store
            .append(&format!("s-{stream}"), 0, std::slice::from_ref(&event))
            .unwrap();
    }
    drop(store);
    notes_db(&env.path("app.db"));
    let before = databases(env.tmp.path());
    for target in ["events.db", "app.db"] {
        let out = env.run_bare(&["--store", target, "--dir", "p", "demo", "--events", "1000"]);
        assert_eq!(out.status.code(), Some(3), "{target}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(target) && err.contains("never replaces"),
            "{err}"
        );
    }
    assert!(stderr(&env.run(&["demo", "--events", "10"])).contains("100 events"));
    assert!(databases(env.tmp.path()) == before, "a file changed");
}

/// Item 3: reading commands never create or alter anything in the store they
/// are given; a file without an events table is a store error; a projection
/// ahead of the store's head is an error, not "current".
#[test]
fn read_only_commands_never_write_into_the_store() {
    let env = Env::new();
    env.demo_log(2_000);
    notes_db(&env.path("app.db"));
    std::fs::write(env.path("empty.db"), b"").unwrap();
    let digest_before = env.digest("order_summary");
    for store in ["app.db", "empty.db", "projections/order_summary.db"] {
        let before = databases(env.tmp.path());
        for command in ["status", "rebuild", "resume"] {
            let out = env.run_bare(&[
                "--store",
                store,
                "--dir",
                "projections",
                "--config",
                "projections.toml",
                command,
            ]);
            assert_eq!(
                out.status.code(),
                Some(3),
                "{store} {command}: {}",
                stderr(&out)
            );
            assert!(stderr(&out).contains(store), "{}", stderr(&out));
            assert!(stderr(&out).contains("no events table"), "{}", stderr(&out));
        }
        assert!(databases(env.tmp.path()) == before, "{store} changed");
    }
    assert_eq!(env.digest("order_summary"), digest_before);
    // A store with fewer events than the projections have applied.
    append_one(&env, "short.db", "s", "OrderPlaced", serde_json::json!({}));
    let out = env.run_bare(&[
        "--store",
        "short.db",
        "--dir",
        "projections",
        "--config",
        "projections.toml",
        "resume",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("beyond the event store's head 1"),
        "{}",
        stderr(&out)
    );
    assert_eq!(env.digest("order_summary"), digest_before);
    // A directory as the store says so.
    std::fs::create_dir(env.path("a_dir")).unwrap();
    let out = env.run_bare(&["--store", "a_dir", "--config", "projections.toml", "status"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("is a directory"), "{}", stderr(&out));
}

/// Item 4: config SQL that tries to reach outside its projection is a config
/// error (exit 2) naming the place, for every command, and creates nothing.
#[test]
fn config_sql_is_confined_to_its_projection() {
    let outside = tempfile::tempdir().unwrap();
    let target = |name: &str| outside.path().join(name).display().to_string();
    let schema = "CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER);";
    let insert = "INSERT INTO t VALUES (:id, 1)";
    let cases: Vec<(String, String, &str)> = vec![
        (
            format!("{schema} ATTACH DATABASE '{}' AS x;", target("x.db")),
            insert.into(),
            "ATTACH",
        ),
        (
            format!("{schema} VACUUM INTO '{}';", target("y.db")),
            insert.into(),
            "VACUUM",
        ),
        (
            schema.into(),
            format!("VACUUM INTO '{}'", target("z.db")),
            "VACUUM is not allowed",
        ),
        (
            format!("{schema} PRAGMA writable_schema = 1;"),
            insert.into(),
            "PRAGMA writable_schema",
        ),
        (
            format!("{schema} DROP TABLE _checkpoint;"),
            insert.into(),
            "_checkpoint (reserved",
        ),
        (
            format!(
                "{schema} CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE _checkpoint SET sequence = 0; END;"
            ),
            insert.into(),
            "writing to table _checkpoint",
        ),
        (
            schema.into(),
            "UPDATE _checkpoint SET sequence = 0 WHERE consumer_id = :id".into(),
            "writing to table _checkpoint",
        ),
        (
            schema.into(),
            "DELETE FROM _projectionist_definition WHERE :id".into(),
            "_projectionist_definition",
        ),
        (
            schema.into(),
            "INSERT INTO t SELECT load_extension(:id), 1".into(),
            "load_extension",
        ),
        (schema.into(), "COMMIT".into(), "transaction control"),
        (
            format!("{schema} CREATE TABLE pragma_probe AS SELECT * FROM pragma_database_list;"),
            insert.into(),
            "PRAGMA",
        ),
    ];
    for (schema, sql, expected) in cases {
        let env = Env::new();
        env.demo_log(100);
        let config = format!(
            "[[projection]]\nname = \"p\"\nversion = 1\nschema = {}\n[projection.on.OrderPlaced]\nsql = {}\n",
            toml_string(&schema),
            toml_string(&sql)
        );
        env.write_config(&config);
        let before = snapshot(env.tmp.path());
        for command in ["status", "rebuild"] {
            let out = env.run(&[command]);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{command} {config}\n{}",
                stderr(&out)
            );
            let err = stderr(&out);
            assert!(
                err.contains(expected),
                "expected {expected:?} for\n{config}\ngot: {err}"
            );
            assert!(err.contains("projection \"p\""), "{err}");
        }
        assert!(
            snapshot(env.tmp.path()) == before,
            "{config}: files changed"
        );
        assert!(
            snapshot(outside.path()).is_empty(),
            "{config}: wrote outside"
        );
    }
}

fn toml_string(text: &str) -> String {
    serde_json::to_string(text).unwrap()
}

/// Item 5: a projection file that is a symbolic link is refused, and its target
/// is not written.
#[cfg(unix)]
#[test]
fn a_symlinked_projection_file_is_refused() {
    let env = Env::new();
    env.demo_log(300);
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim.db");
    notes_db(&victim);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(env.path(&format!("projections/order_summary.db{suffix}")));
    }
    std::os::unix::fs::symlink(&victim, env.path("projections/order_summary.db")).unwrap();
    let before = snapshot(outside.path());
    let out = env.run(&["rebuild"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("symbolic link"), "{}", stderr(&out));
    // The other projection was rebuilt all the same.
    assert!(env.path("projections/customer_stats.db").is_file());
    assert!(snapshot(outside.path()) == before);
}

/// Item 6: `remove-all` with one projection held by another process removes
/// nothing and says which one is held.
#[test]
fn remove_all_is_all_or_nothing() {
    let env = Env::new();
    env.demo_log(300);
    let held_dir = ProjectionDir::open(env.path("projections")).unwrap();
    let held = held_dir.db("customer_stats").unwrap();
    let before = snapshot(&env.path("projections"));
    let out = env.run(&["remove-all"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("customer_stats is locked") && err.contains("nothing was removed"),
        "{err}"
    );
    assert!(snapshot(&env.path("projections")) == before);
    drop(held);
    held_dir.close().unwrap();
    assert!(env.run(&["remove-all"]).status.success());
    assert_eq!(stdout(&env.run(&["list"])), "");
}

/// Item 8: a repeated name runs the projection once instead of hanging.
#[test]
fn a_repeated_name_does_not_hang() {
    let env = Env::new();
    env.demo_log(1_000);
    for command in ["rebuild", "resume"] {
        let mut child = env
            .command(&["--quiet", command, "order_summary", "order_summary"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                child.kill().unwrap();
                panic!("{command} with a repeated name hung");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{command}");
    }
}

/// Two projections over one log: `placed` handles only OrderPlaced, `items`
/// only ItemAdded.
const TWO_PROJECTIONS: &str = r#"
[[projection]]
name = "placed"
version = 1
schema = "CREATE TABLE placed (order_id TEXT PRIMARY KEY)"
[projection.on.OrderPlaced]
sql = "INSERT INTO placed VALUES (:order_id!)"

[[projection]]
name = "items"
version = 1
schema = "CREATE TABLE items (order_id TEXT, qty INTEGER)"
[projection.on.ItemAdded]
sql = "INSERT INTO items VALUES (:order_id!, :qty!)"
"#;

/// A log of `n` events alternating OrderPlaced and ItemAdded, with the raw data
/// of some events replaced (written as another program could).
fn log_with_raw_data(env: &Env, n: u64, raw: &[(u64, &str)]) {
    let store = SqliteEventStore::create(env.path("events.db")).unwrap();
    for i in 1..=n {
        let (event_type, data) = if i % 2 == 1 {
            (
                "OrderPlaced",
                serde_json::json!({"order_id": format!("o{i}")}),
            )
        } else {
            (
                "ItemAdded",
                serde_json::json!({"order_id": format!("o{}", i - 1), "qty": 1}),
            )
        };
        store
            .append(
                &format!("s{i}"),
                0,
                &[NewEvent::json(event_type, &data).unwrap()],
            )
            .unwrap();
    }
    drop(store);
    let conn = Connection::open(env.path("events.db")).unwrap();
    for (sequence, sql_value) in raw {
        conn.execute(
            &format!("UPDATE events SET data = {sql_value} WHERE sequence = ?1"),
            [i64::try_from(*sequence).unwrap()],
        )
        .unwrap();
    }
}

fn checkpoint(env: &Env, name: &str) -> u64 {
    let conn = Connection::open(env.path(&format!("projections/{name}.db"))).unwrap();
    projectionist::SqliteCheckpoint::load_in(&conn, name).unwrap()
}

/// Item 11: an undecodable event stops only the projections that handle its
/// type; the others finish, up to the last sequence read, and a later shared
/// resume does not report them failed. Non-UTF-8 data names its event too.
#[test]
fn a_poison_event_stops_only_the_projections_that_handle_it() {
    for (raw, what) in [("'{not json'", "decode event"), ("X'FFFE00'", "not UTF-8")] {
        let env = Env::new();
        env.write_config(TWO_PROJECTIONS);
        // Event 1,000 is an ItemAdded; the log ends with another ItemAdded.
        log_with_raw_data(&env, 2_000, &[(1_000, raw)]);
        for command in ["rebuild", "resume"] {
            let out = env.run(&["--batch-size", "100", command]);
            assert_eq!(out.status.code(), Some(4), "{command}: {}", stderr(&out));
            let err = stderr(&out);
            assert!(err.contains(what), "{err}");
            assert!(
                err.contains("projection items")
                    && err.contains("sequence 1000 (stream s1000, type ItemAdded)"),
                "{err}"
            );
            assert!(
                !err.contains("projection placed"),
                "placed must not fail: {err}"
            );
            assert_eq!(checkpoint(&env, "placed"), 2_000, "{command}");
            assert_eq!(checkpoint(&env, "items"), 999, "{command}");
        }
        let placed: i64 = Connection::open(env.path("projections/placed.db"))
            .unwrap()
            .query_row("SELECT count(*) FROM placed", [], |r| r.get(0))
            .unwrap();
        assert_eq!(placed, 1_000);
    }
}

fn status_json(env: &Env, extra: &[&str]) -> (Option<i32>, Vec<serde_json::Value>) {
    let mut args = vec!["--json", "status"];
    args.extend_from_slice(extra);
    let out = env.run(&args);
    let rows = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    (out.status.code(), rows)
}

fn row<'a>(rows: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["projection"] == name)
        .unwrap_or_else(|| panic!("no row for {name}: {rows:?}"))
}

/// Item 9: status tells failed, behind and current apart, from the file, in a
/// new process; `--json` prints only JSON lines with today's keys and the
/// failing event's fields.
#[test]
fn status_reports_failed_behind_and_current() {
    let env = Env::new();
    env.write_config(TWO_PROJECTIONS);
    log_with_raw_data(&env, 400, &[(200, "'{broken'")]);
    assert_eq!(env.run(&["rebuild"]).status.code(), Some(4));
    let (code, rows) = status_json(&env, &[]);
    assert_eq!(code, Some(4), "a failed projection makes status exit 4");
    let items = row(&rows, "items");
    assert_eq!(items["state"], "failed", "{items}");
    assert_eq!(items["error_sequence"], 200, "{items}");
    assert_eq!(items["error_stream"], "s200", "{items}");
    assert_eq!(items["error_event_type"], "ItemAdded", "{items}");
    assert!(
        items["error"].as_str().unwrap().contains("decode event"),
        "{items}"
    );
    for key in [
        "checkpoint",
        "head",
        "lag",
        "stale",
        "config_version",
        "built_version",
        "size_bytes",
        "last_run_at",
    ] {
        assert!(items.get(key).is_some(), "{key} missing: {items}");
    }
    assert_eq!(items["stale"], false);
    assert_eq!(row(&rows, "placed")["state"], "current");
    // A new event of a type it does not handle: nothing to apply.
    append_one(
        &env,
        "events.db",
        "other",
        "ShipmentNoted",
        serde_json::json!({"order_id": "other"}),
    );
    let (_, rows) = status_json(&env, &[]);
    let placed = row(&rows, "placed");
    assert_eq!(placed["state"], "current", "{placed}");
    assert_eq!(placed["lag"], 0, "{placed}");
    assert_eq!(placed["checkpoint"], 400, "{placed}");
    // New events of its type: behind, by every event after its checkpoint.
    append_one(
        &env,
        "events.db",
        "late",
        "OrderPlaced",
        serde_json::json!({"order_id": "late"}),
    );
    let (_, rows) = status_json(&env, &[]);
    assert_eq!(row(&rows, "placed")["state"], "behind");
    assert_eq!(row(&rows, "placed")["lag"], 2);
    // The text table says it too, with the event.
    let out = env.run(&["status"]);
    assert!(
        stdout(&out).contains("failed") && stdout(&out).contains("sequence 200"),
        "{}",
        stdout(&out)
    );
}

/// Overwrites `len` bytes of `path` at `offset`.
fn scribble(path: &Path, offset: u64, len: usize) {
    use std::io::{Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.write_all(&vec![0xA5; len]).unwrap();
}

/// Item 10: a projection whose header or pages are damaged is reported as
/// corrupt (exit 4), and `rebuild` moves it aside (named in the message) and
/// builds it anew, equal to a clean build.
#[test]
fn corrupt_projection_files_are_reported_and_replaced() {
    let env = Env::new();
    env.demo_log(20_000);
    let reference = env.digest("order_summary");
    let file = env.path("projections/order_summary.db");
    assert!(!env.path("projections/order_summary.db-wal").exists());
    let size = std::fs::metadata(&file).unwrap().len();
    for (what, offset, len, needs_check) in [
        ("header", 0, 100, false),
        ("pages", size / 2, 3 * 4096, true),
    ] {
        scribble(&file, offset, len);
        let (code, rows) = status_json(&env, &[]);
        if needs_check {
            let (code, rows) = status_json(&env, &["--check"]);
            assert_eq!(code, Some(4), "{what}");
            assert_eq!(
                row(&rows, "order_summary")["state"],
                "corrupt",
                "{what}: {rows:?}"
            );
        } else {
            assert_eq!(code, Some(4), "{what}");
            assert_eq!(
                row(&rows, "order_summary")["state"],
                "corrupt",
                "{what}: {rows:?}"
            );
        }
        assert_eq!(row(&rows, "customer_stats")["state"], "current", "{what}");
        let out = env.run(&["rebuild"]);
        assert!(out.status.success(), "{what}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("was corrupt") && err.contains("order_summary.db.corrupt-"),
            "{err}"
        );
        assert_eq!(env.digest("order_summary"), reference, "{what}");
        let kept: Vec<_> = std::fs::read_dir(env.path("projections"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
            .collect();
        assert!(!kept.is_empty(), "the corrupt file is kept, not deleted");
        for entry in kept {
            std::fs::remove_file(entry.path()).unwrap();
        }
        let (code, _) = status_json(&env, &["--check"]);
        assert_eq!(code, Some(0), "{what}");
    }
}

/// Item 13: after `demo`, the command it suggests works as printed.
#[test]
fn the_demo_leaves_what_the_next_command_needs() {
    let env = Env::new();
    let out = env.run_bare(&["demo", "--events", "2000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let hint = text
        .lines()
        .find_map(|l| l.strip_prefix("next, for example: "))
        .unwrap_or_else(|| panic!("no hint: {text}"));
    let args: Vec<&str> = hint.split_whitespace().skip(1).collect();
    let out = env.run_bare(&args);
    assert!(out.status.success(), "{hint}: {}", stderr(&out));
    assert!(stdout(&out).contains("current"), "{}", stdout(&out));
}

/// Item 14: a closed pipe on stdout is not a crash.
#[test]
fn a_closed_pipe_is_not_a_panic() {
    let env = Env::new();
    env.demo_log(500);
    for args in [&["status"][..], &["list"], &["--json", "rebuild"]] {
        let mut child = env
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert!(
            !stderr(&out).contains("panicked"),
            "{args:?}: {}",
            stderr(&out)
        );
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
    }
}

/// Item 16: removing an unknown projection is an error; lock files go with
/// their projection; `list` creates no directory.
#[test]
fn remove_and_list_create_nothing() {
    let env = Env::new();
    env.demo_log(300);
    let out = env.run(&["remove", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no projection nope"),
        "{}",
        stderr(&out)
    );
    assert!(!env.path("projections/.nope.lock").exists());
    assert!(env.run(&["remove", "order_summary"]).status.success());
    assert!(!env.path("projections/.order_summary.lock").exists());
    let out = env.run_bare(&["--dir", "missing", "list"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(!env.path("missing").exists());
}

/// Item 12: typed parameters turn a value of the wrong JSON type into a poison
/// event naming the field, both types and the event, instead of a silent 0.
#[test]
fn typed_parameters_refuse_values_of_another_type() {
    let config = r#"
[[projection]]
name = "items"
version = 1
schema = "CREATE TABLE items (order_id TEXT, qty INTEGER, note TEXT)"
[projection.on.ItemAdded]
sql = "INSERT INTO items VALUES (:order_id!text, :qty!int * 2, :note?text)"
"#;
    let cases = [
        (
            r#"'{"order_id": "o", "qty": "five"}'"#,
            "field qty must be a JSON integer (int), but is a string \"five\"",
        ),
        (
            r#"'{"order_id": "o", "qty": {"a": 1}}'"#,
            "field qty must be a JSON integer (int), but is an object",
        ),
        (
            r#"'{"order_id": "o", "qty": 1.5}'"#,
            "but is a real number 1.5",
        ),
        (
            r#"'{"order_id": "o", "qty": 1, "note": 7}'"#,
            "field note must be a JSON string (text), but is an integer 7",
        ),
        (
            r#"'[1, 2]'"#,
            "required field order_id is missing: the data holds an array [1,2], not an object",
        ),
        (
            r#"'"text"'"#,
            "the data holds a string \"text\", not an object",
        ),
        ("'null'", "the data holds null null, not an object"),
    ];
    for (raw, expected) in cases {
        let env = Env::new();
        env.write_config(config);
        log_with_raw_data(&env, 4, &[(4, raw)]);
        let out = env.run(&["--batch-size", "1", "rebuild"]);
        assert_eq!(out.status.code(), Some(4), "{raw}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(expected),
            "{raw}: expected {expected:?} in {err}"
        );
        assert!(err.contains("event 4 (stream s4, type ItemAdded)"), "{err}");
        // Event 2 (the only other ItemAdded) is committed; event 3 is not its type.
        assert_eq!(checkpoint(&env, "items"), 2, "{raw}");
    }
    // Well-typed values, and a missing optional one, apply.
    let env = Env::new();
    env.write_config(config);
    log_with_raw_data(&env, 4, &[(4, r#"'{"order_id": "o", "qty": 3}'"#)]);
    let out = env.run(&["rebuild"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let qty: i64 = Connection::open(env.path("projections/items.db"))
        .unwrap()
        .query_row("SELECT qty FROM items WHERE order_id = 'o'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(qty, 6);
}

/// Item 18: a projection file that another connection is writing fails that
/// projection quickly; the other projections of the run do not wait for it.
#[test]
fn a_locked_projection_does_not_hold_back_the_others() {
    let env = Env::new();
    env.demo_log(3_000);
    append_one(&env, "events.db", "late", "Noted", serde_json::json!({}));
    let writer = Connection::open(env.path("projections/order_summary.db")).unwrap();
    writer.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = Instant::now();
    let out = env.run(&["rebuild"]);
    let elapsed = started.elapsed();
    writer.execute_batch("ROLLBACK").unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("order_summary"), "{}", stderr(&out));
    assert!(
        elapsed < Duration::from_secs(5),
        "the run waited {elapsed:?} for a locked projection"
    );
    assert_eq!(checkpoint(&env, "customer_stats"), 3_001);
}

/// Item 15: a resume's progress measures this run's span (what the bars' rate
/// and ETA use), not the events applied before it.
#[test]
fn resume_progress_counts_only_this_run() {
    let env = Env::new();
    env.demo_log(1_000);
    append_one(
        &env,
        "events.db",
        "late",
        "OrderPlaced",
        serde_json::json!({"order_id": "late", "customer_id": "c"}),
    );
    let out = env.run(&["--json", "resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let progress: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["event"] == "progress")
        .collect();
    assert!(!progress.is_empty());
    for p in &progress {
        assert_eq!(p["started_from"], 1_000, "{p}");
        assert!(p["processed"].as_u64().unwrap() <= 1, "{p}");
    }
    assert!(
        progress
            .iter()
            .any(|p| p["done"] == true && p["checkpoint"] == 1_001)
    );
}

/// Item 17: messages name things once, escape control characters, and quote
/// the user's statement rather than its rewritten form.
#[test]
fn messages_are_plain_and_quote_what_the_user_wrote() {
    let env = Env::new();
    env.write_config(
        "[[projection]]\nname = \"p\"\nversion = 1\nschema = \"CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER CHECK (n > 0))\"\n[projection.on.\"E\\u001b[31m\"]\nsql = \"INSERT INTO t VALUES (:id, 1)\"\n",
    );
    SqliteEventStore::create(env.path("events.db")).unwrap();
    let out = env.run(&["rebuild"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        !stderr(&out).contains('\u{1b}'),
        "raw escape in {:?}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("\\u{1b}"), "{}", stderr(&out));
    // A statement that fails at run time is quoted as written.
    env.write_config(
        "[[projection]]\nname = \"p\"\nversion = 1\nschema = \"CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER CHECK (n > 0))\"\n[projection.on.E]\nsql = \"INSERT INTO t VALUES (:id!text, :n)\"\n",
    );
    append_one(
        &env,
        "events.db",
        "s",
        "E",
        serde_json::json!({"id": "a", "n": -1}),
    );
    let out = env.run(&["rebuild"]);
    assert_eq!(out.status.code(), Some(4));
    let err = stderr(&out);
    assert!(err.contains("INSERT INTO t VALUES (:id!text, :n)"), "{err}");
    assert!(!err.contains("?1"), "{err}");
    // A file that is not a database, as the store: named once, exit 3.
    std::fs::write(env.path("junk.db"), vec![b'x'; 4096]).unwrap();
    let out = env.run_bare(&[
        "--store",
        "junk.db",
        "--config",
        "projections.toml",
        "status",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).matches("junk.db").count(),
        1,
        "{}",
        stderr(&out)
    );
}

/// Issue 13 (first part): a log in a layout that is not ours, read through
/// `[source]`, rebuilds the same projections as the same log in our layout, and
/// the store file is not changed. Bad mappings are clear errors.
#[test]
fn a_foreign_events_table_is_read_through_source() {
    let env = Env::new();
    env.demo_log(3_000);
    // Another program's layout: other names, data as BLOB, integer timestamps.
    let foreign = Connection::open(env.path("foreign.db")).unwrap();
    foreign
        .execute_batch(&format!(
            "ATTACH DATABASE '{}' AS ours;
             CREATE TABLE log (seq INTEGER PRIMARY KEY, stream_id TEXT NOT NULL,
                               version INTEGER NOT NULL, type TEXT NOT NULL,
                               data BLOB NOT NULL, recorded_at INTEGER NOT NULL);
             INSERT INTO log SELECT sequence, stream_id, stream_version, event_type,
                                    CAST(data AS BLOB), 1700000000 + sequence
                             FROM ours.events ORDER BY sequence;
             DETACH DATABASE ours;",
            env.path("events.db").display()
        ))
        .unwrap();
    drop(foreign);
    let source = "\n[source]\ntable = \"log\"\nsequence = \"seq\"\nstream_id = \"stream_id\"\nstream_version = \"version\"\nevent_type = \"type\"\ndata = \"data\"\nrecorded_at = \"recorded_at\"\n";
    std::fs::write(env.path("foreign.toml"), format!("{DEMO_CONFIG}{source}")).unwrap();
    let before = std::fs::read(env.path("foreign.db")).unwrap();
    let args = |command: &'static str| {
        [
            "--store",
            "foreign.db",
            "--dir",
            "foreign-projections",
            "--config",
            "foreign.toml",
            command,
        ]
    };
    let out = env.run_bare(&args("rebuild"));
    assert!(out.status.success(), "{}", stderr(&out));
    let digest = |dir: &str, name: &str| {
        let conn = Connection::open(env.path(&format!("{dir}/{name}.db"))).unwrap();
        projectionist::projection_digest(&conn, projectionist::DigestScope::ProjectionTables)
            .unwrap()
    };
    for name in ["order_summary", "customer_stats"] {
        assert_eq!(
            digest("foreign-projections", name),
            digest("projections", name)
        );
    }
    let out = env.run_bare(&args("status"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("current"), "{}", stdout(&out));
    assert!(
        std::fs::read(env.path("foreign.db")).unwrap() == before,
        "the store changed"
    );
    // Bad mappings, each with its exit code and message: a missing column and a
    // sequence column that holds text are store errors, SQL in a name is a
    // config error, a data column of the wrong type makes each event a poison
    // event, named.
    let bad_mappings = [
        ("\"version\"", "\"ver\"", 3, "no column \"ver\""),
        (
            "\"log\"",
            "\"log; DROP TABLE log\"",
            2,
            "not a plain SQL identifier",
        ),
        (
            "sequence = \"seq\"",
            "sequence = \"type\"",
            3,
            "the sequence column holds",
        ),
        (
            "data = \"data\"",
            "data = \"version\"",
            4,
            "column data holds Integer",
        ),
    ];
    for (from, to, code, expected) in bad_mappings {
        let mapping = source.replace(from, to);
        std::fs::write(env.path("foreign.toml"), format!("{DEMO_CONFIG}{mapping}")).unwrap();
        let out = env.run_bare(&args("rebuild"));
        assert_eq!(out.status.code(), Some(code), "{to}: {}", stderr(&out));
        assert!(stderr(&out).contains(expected), "{to}: {}", stderr(&out));
    }
    let err = stderr(&env.run_bare(&args("rebuild")));
    assert!(err.contains("event at sequence 1 (stream "), "{err}");
    assert!(
        std::fs::read(env.path("foreign.db")).unwrap() == before,
        "the store changed"
    );
}

/// Issue 13 (`inspect`): event types with exact counts and their fields, an
/// undecodable event noted and passed, and a starter config that loads.
#[test]
fn inspect_lists_event_types_and_writes_a_starter_config() {
    let env = Env::new();
    env.write_config(TWO_PROJECTIONS);
    log_with_raw_data(&env, 200, &[(100, "'{broken'")]);
    let out = env.run(&["--json", "inspect"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let placed = rows
        .iter()
        .find(|r| r["event_type"] == "OrderPlaced")
        .unwrap();
    let added = rows
        .iter()
        .find(|r| r["event_type"] == "ItemAdded")
        .unwrap();
    assert_eq!(placed["count"], 100);
    assert_eq!(
        added["count"], 99,
        "the undecodable ItemAdded is not counted"
    );
    assert_eq!(added["first_sequence"], 2);
    assert_eq!(added["last_sequence"], 200);
    assert_eq!(added["fields"]["qty"]["type"], "int");
    assert_eq!(added["fields"]["order_id"]["type"], "text");
    let text = stdout(&env.run(&["inspect"]));
    assert!(
        text.contains("undecodable events (not JSON): sequences [100]"),
        "{text}"
    );
    let out = env.run(&["inspect", "--config-skeleton"]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(env.path("skeleton.toml"), stdout(&out)).unwrap();
    let out = env.run_bare(&[
        "--store",
        "events.db",
        "--dir",
        "sk",
        "--config",
        "skeleton.toml",
        "status",
    ]);
    assert!(out.status.success(), "the skeleton loads: {}", stderr(&out));
}

/// Item 9, across a crash: a run killed with SIGKILL leaves `running` with a
/// process that no longer exists; `status` in a new process says
/// `interrupted`, and `resume` in another new process finishes it. (An
/// in-place rebuild: a shadow rebuild leaves the live file whole, see
/// `versions.rs`.)
#[test]
fn a_killed_run_shows_as_interrupted_in_a_new_process() {
    let env = Env::new();
    env.demo_log(60_000);
    let mut child = env
        .command(&["--quiet", "--batch-size", "50", "rebuild", "--in-place"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let committed = Connection::open(env.path("projections/order_summary.db"))
            .ok()
            .and_then(|c| projectionist::SqliteCheckpoint::load_in(&c, "order_summary").ok())
            .unwrap_or(0);
        if (1..60_000).contains(&committed) {
            break;
        }
        assert!(Instant::now() < deadline, "the rebuild never got under way");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let (_, rows) = status_json(&env, &[]);
    let row = row(&rows, "order_summary");
    assert_eq!(row["state"], "interrupted", "{row}");
    assert_eq!(row["last_run"], "running", "{row}");
    let out = env.run(&["--quiet", "resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (code, rows) = status_json(&env, &[]);
    assert_eq!(code, Some(0));
    assert!(rows.iter().all(|r| r["state"] == "current"), "{rows:?}");
}

/// A store in rollback-journal mode that another program writes is only read:
/// rebuild, status, inspect and follow leave no `-wal`, `-shm` or journal
/// beside it, and the file itself is unchanged.
#[test]
fn reading_a_foreign_rollback_journal_store_creates_nothing_beside_it() {
    let env = Env::new();
    let conn = Connection::open(env.path("foreign.db")).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = DELETE;
         CREATE TABLE msgs (id INTEGER PRIMARY KEY, stream TEXT, ver INTEGER, kind TEXT, body TEXT);",
    )
    .unwrap();
    for i in 1..=50 {
        conn.execute(
            "INSERT INTO msgs VALUES (?1, ?2, 1, 'Added', ?3)",
            (i, format!("s{i}"), format!("{{\"n\": {i}}}")),
        )
        .unwrap();
    }
    drop(conn);
    env.write_config(
        r#"
[source]
table = "msgs"
sequence = "id"
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
    let before = std::fs::read(env.path("foreign.db")).unwrap();
    for args in [&["rebuild"][..], &["status"], &["inspect"]] {
        let out = env
            .command_with("foreign.db", "projections", args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let follower = env
        .command_with("foreign.db", "projections", &["--quiet", "follow"])
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !env.path("projections/.sums.follower").exists() {
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    common::sigterm(&follower);
    assert!(follower.wait_with_output().unwrap().status.success());
    let beside: Vec<String> = std::fs::read_dir(env.tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("foreign.db") && name != "foreign.db")
        .collect();
    assert!(beside.is_empty(), "created beside the store: {beside:?}");
    assert_eq!(std::fs::read(env.path("foreign.db")).unwrap(), before);
}
