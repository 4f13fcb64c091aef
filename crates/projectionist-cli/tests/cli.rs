//! End-to-end tests of the `projectionist` binary on temporary directories: the
//! demo, every subcommand, `--json` output, bad configs, hostile event data,
//! Ctrl-C then resume, and stale definitions.

mod common;

use std::process::Command;

use common::{DEMO_CONFIG, Env, json_lines, stderr, stdout};
use projectionist::rusqlite::Connection;
use projectionist::{NewEvent, SqliteEventStore};

#[test]
fn demo_generates_rebuilds_and_summarises() {
    let env = Env::new();
    env.write_config(DEMO_CONFIG);
    let out = env.run(&["demo", "--events", "3000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("rebuilt 2 projections over 3000 events"),
        "{text}"
    );
    assert!(
        text.contains("order_summary (top 3)") && text.contains("customer_stats (top 3)"),
        "{text}"
    );
    let conn = Connection::open(env.path("projections/order_summary.db")).unwrap();
    let orders: i64 = conn
        .query_row("SELECT COUNT(*) FROM orders", [], |r| r.get(0))
        .unwrap();
    assert!(orders > 100, "{orders} orders");
    // Issue 26, item 1: the printed next command works as printed (the binary
    // was started by its path, as `cargo run` does), and says how to install.
    let next = text
        .lines()
        .find_map(|l| l.strip_prefix("next, for example: "))
        .unwrap_or_else(|| panic!("{text}"));
    let args: Vec<&str> = next.split_whitespace().collect();
    assert_eq!(args[0], env!("CARGO_BIN_EXE_projectionist"), "{next}");
    let again = Command::new(args[0])
        .current_dir(env.path(""))
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(again.status.success(), "{next}: {}", stderr(&again));
    assert!(
        text.contains("cargo install --path crates/projectionist-cli"),
        "{text}"
    );
    // The config's deferred index is built when the run reaches the head.
    assert!(env.has_index("order_summary", "orders_by_customer"));
    // Deterministic: the same seed gives the same projections.
    let first = env.digest("customer_stats");
    assert!(
        env.run(&["--quiet", "demo", "--events", "3000"])
            .status
            .success()
    );
    assert_eq!(env.digest("customer_stats"), first);
}

#[test]
fn subcommands_and_json_output() {
    let env = Env::new();
    env.demo_log(2000);
    let out = env.run(&["--json", "rebuild"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = json_lines(&out);
    let progress: Vec<_> = lines.iter().filter(|l| l["event"] == "progress").collect();
    assert!(
        progress
            .iter()
            .any(|l| l["done"] == true && l["projection"] == "order_summary")
    );
    let results: Vec<_> = lines.iter().filter(|l| l["event"] == "result").collect();
    assert_eq!(results.len(), 2);
    // Issue 26, item 5: progress lines are rate-limited (at most two a second
    // per projection, and the last one): here far fewer than one per batch
    // (4 batches of 500 per projection).
    let per_projection = progress
        .iter()
        .filter(|l| l["projection"] == "order_summary")
        .count();
    assert!((1..4).contains(&per_projection), "{progress:?}");
    assert!(
        results
            .iter()
            .all(|r| r["checkpoint"] == 2000 && r["head"] == 2000),
        "{results:?}"
    );

    let out = env.run(&["--json", "status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = json_lines(&out);
    assert_eq!(status.len(), 2);
    for row in &status {
        assert_eq!(row["lag"], 0, "{row}");
        assert_eq!(row["stale"], false);
        assert_eq!(row["config_version"], 1);
        assert!(row["size_bytes"].as_u64().unwrap() > 0);
    }
    let out = env.run(&["list"]);
    assert_eq!(stdout(&out), "customer_stats\norder_summary\n");
    let out = env.run(&["remove", "order_summary"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&env.run(&["list"])), "customer_stats\n");
    let out = env.run(&["status"]);
    assert!(stdout(&out).contains("not built"), "{}", stdout(&out));
    let out = env.run(&["resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&env.run(&["list"])),
        "customer_stats\norder_summary\n"
    );
    assert!(env.run(&["remove-all"]).status.success());
    assert_eq!(stdout(&env.run(&["list"])), "");
    let out = env.run(&["rebuild", "no_such"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no projection \"no_such\""),
        "{}",
        stderr(&out)
    );
    let out = env.run(&["--batch-size", "50001", "rebuild"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn missing_store_is_a_store_error() {
    let env = Env::new();
    env.write_config(DEMO_CONFIG);
    let out = env.run(&["rebuild"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("events.db does not exist"));
    assert!(!env.path("events.db").exists());
}

/// Issue 26, item 6: `status` with a `--store` that does not exist fails
/// (exit 3) and creates nothing; without `--store`, a missing default store
/// still shows the files with a warning. `rollback` of an unknown projection
/// is a usage error (exit 2), as `remove` of one is.
#[test]
fn a_named_missing_store_fails_status_and_an_unknown_rollback_is_a_usage_error() {
    let env = Env::new();
    env.demo_log(100);
    let out = env.run_bare(&[
        "--store",
        "mistyped.db",
        "--dir",
        "projections",
        "--config",
        "projections.toml",
        "status",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("mistyped.db does not exist"),
        "{}",
        stderr(&out)
    );
    assert!(!env.path("mistyped.db").exists());
    std::fs::rename(env.path("events.db"), env.path("moved.db")).unwrap();
    let out = env.run_bare(&[
        "--dir",
        "projections",
        "--config",
        "projections.toml",
        "status",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("showing the projection files only"),
        "{}",
        stderr(&out)
    );
    let out = env.run(&["rollback", "nosuch"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // Item 7: a misspelt URL is not taken for a file path (nothing created).
    for command in ["status", "demo", "rebuild"] {
        let out = env.run_bare(&[
            "--store",
            "postgress://user@host/db",
            "--config",
            "projections.toml",
            command,
        ]);
        assert_eq!(out.status.code(), Some(3), "{command}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("looks like a URL"),
            "{}",
            stderr(&out)
        );
    }
    assert!(!env.path("postgress:").exists());
    let out = env.run(&["remove", "nosuch"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

const GOOD_SCHEMA: &str = "schema = \"CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER)\"";

#[test]
fn bad_configs_fail_clearly_and_create_nothing() {
    // The full table of bad configs lives in projectionist-sqlview
    // (config.rs tests); here, that the binary maps them to exit 2 and
    // creates nothing.
    let cases: Vec<(String, &str)> = vec![
        ("[[projection]\nname = ".into(), "TOML parse error"),
        (
            format!(
                "[[projection]]\nname = \"p\"\nversion = 1\n{GOOD_SCHEMA}\n[projection.on.E]\nsql = \"INSERT INTO t VALUE (:id)\"\n"
            ),
            "projection \"p\", event E, statement 1",
        ),
    ];
    for (config, expected) in cases {
        let env = Env::new();
        env.write_config(&config);
        SqliteEventStore::create(env.path("events.db")).unwrap();
        let before: Vec<_> = std::fs::read_dir(env.tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let out = env.run(&["rebuild"]);
        assert_eq!(out.status.code(), Some(2), "{config}\n{}", stderr(&out));
        assert!(
            stderr(&out).contains(expected),
            "expected {expected:?} for\n{config}\ngot: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("projections.toml"),
            "the error names the file: {}",
            stderr(&out)
        );
        let after: Vec<_> = std::fs::read_dir(env.tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            before.len(),
            after.len(),
            "no file created for {config}: {after:?}"
        );
    }
}

#[test]
fn sql_text_in_event_data_is_stored_verbatim() {
    let env = Env::new();
    let store = SqliteEventStore::create(env.path("events.db")).unwrap();
    let evil = "'); DROP TABLE orders; --";
    let placed = serde_json::json!({"order_id": "o1", "customer_id": evil});
    store
        .append("o1", 0, &[NewEvent::json("OrderPlaced", &placed).unwrap()])
        .unwrap();
    env.write_config(DEMO_CONFIG);
    let out = env.run(&["rebuild"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let conn = Connection::open(env.path("projections/order_summary.db")).unwrap();
    let customer: String = conn
        .query_row(
            "SELECT customer_id FROM orders WHERE order_id = 'o1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(customer, evil);
}

#[test]
fn poison_event_stops_the_projection_with_its_sequence() {
    let env = Env::new();
    let store = SqliteEventStore::create(env.path("events.db")).unwrap();
    store
        .append(
            "o1",
            0,
            &[NewEvent::json(
                "OrderPlaced",
                &serde_json::json!({"order_id": "o1", "customer_id": "c"}),
            )
            .unwrap()],
        )
        .unwrap();
    store
        .append(
            "o2",
            0,
            &[NewEvent::json("OrderPlaced", &serde_json::json!({"order_id": "o2"})).unwrap()],
        )
        .unwrap();
    env.write_config(DEMO_CONFIG);
    let out = env.run(&["--batch-size", "1", "rebuild"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("event 2 (stream o2, type OrderPlaced)")
            && err.contains("required field customer_id is missing"),
        "{err}"
    );
    assert!(err.contains("committed through sequence 1"), "{err}");
}

#[test]
fn changed_version_is_stale_and_rebuild_fixes_it() {
    let env = Env::new();
    env.demo_log(1000);
    assert!(env.run(&["--quiet", "rebuild"]).status.success());
    env.write_config(&DEMO_CONFIG.replacen("version = 1", "version = 2", 1));
    let status = json_lines(&env.run(&["--json", "status"]));
    let summary = status
        .iter()
        .find(|r| r["projection"] == "order_summary")
        .unwrap();
    assert_eq!(summary["stale"], true, "{summary}");
    assert_eq!(
        (
            summary["config_version"].as_u64(),
            summary["built_version"].as_u64()
        ),
        (Some(2), Some(1))
    );
    let stats = status
        .iter()
        .find(|r| r["projection"] == "customer_stats")
        .unwrap();
    assert_eq!(stats["stale"], false);
    // resume rebuilds the stale one and leaves the current one alone.
    let out = env.run(&["--json", "resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let results = json_lines(&out);
    let processed = |name: &str| {
        results
            .iter()
            .find(|r| r["event"] == "result" && r["projection"] == name)
            .unwrap()["processed"]
            .as_u64()
    };
    assert_eq!(processed("order_summary"), Some(1000));
    assert_eq!(processed("customer_stats"), Some(0));
    let status = json_lines(&env.run(&["--json", "status"]));
    assert!(
        status
            .iter()
            .all(|r| r["stale"] == false && r["built_version"].as_u64().is_some()),
        "{status:?}"
    );
}

#[test]
fn sigint_stops_at_a_batch_boundary_and_resume_matches() {
    sigint_then_resume(true);
}

/// A rebuild of a served projection builds in its shadow: interrupted, the
/// live file is untouched (the old version, whole), and `resume` continues
/// the shadow and publishes it.
#[test]
fn sigint_of_a_shadow_rebuild_leaves_the_live_file_and_resume_publishes() {
    sigint_then_resume(false);
}

fn sigint_then_resume(in_place: bool) {
    let env = Env::new();
    env.demo_log(60_000);
    assert!(env.run(&["--quiet", "rebuild"]).status.success());
    let reference = (env.digest("order_summary"), env.digest("customer_stats"));
    let mut args = vec!["--batch-size", "50", "--json", "rebuild"];
    if in_place {
        args.push("--in-place");
    }
    // Where the rebuild writes.
    let written = if in_place {
        "projections/order_summary.db"
    } else {
        "projections/.order_summary.shadow.db"
    };
    let child = env
        .command(&args)
        // Not piped: nobody reads it until the end, and a full pipe would stall
        // the progress callback before the first commit.
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the rebuild is under way.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let conn = Connection::open_with_flags(
            env.path(written),
            projectionist::rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .ok();
        let checkpoint = conn
            .and_then(|c| projectionist::SqliteCheckpoint::load_in(&c, "order_summary").ok())
            .unwrap_or(0);
        if (1..60_000).contains(&checkpoint) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rebuild never got under way"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    // The hint carries the user's own options (issue 8, item 13).
    assert!(
        stderr(&out).contains(&format!(
            "run: {} --store events.db --dir projections --config projections.toml resume",
            env!("CARGO_BIN_EXE_projectionist")
        )),
        "{}",
        stderr(&out)
    );
    let status = json_lines(&env.run(&["--json", "status"]));
    if in_place {
        // Status, in a new process, does not call it current (issue 8, item 9).
        assert!(
            status
                .iter()
                .all(|r| r["state"] == "interrupted" && r["last_run"] == "cancelled"),
            "{status:?}"
        );
    } else {
        // The live files still serve the whole old version; the interrupted
        // shadows are shown, and nothing was published.
        assert_eq!(
            (env.digest("order_summary"), env.digest("customer_stats")),
            reference
        );
        assert!(
            status.iter().all(|r| r["state"] == "current"
                && r["shadow_checkpoint"].as_u64().is_some_and(|c| c < 60_000)),
            "{status:?}"
        );
    }
    let out = env.run(&["--quiet", "resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        (env.digest("order_summary"), env.digest("customer_stats")),
        reference
    );
    let status = json_lines(&env.run(&["--json", "status"]));
    assert!(
        status
            .iter()
            .all(|r| r["state"] == "current" && r["shadow_checkpoint"].is_null()),
        "{status:?}"
    );
    assert!(!env.path(written).exists() || in_place);
}

/// Each open projection holds four file descriptors (file, -wal, -shm,
/// lock): under the usual soft limit a run of many projections would fail
/// with "too many open files"; the binary raises its soft limit to the hard
/// one first. Here 100 projections (400 descriptors) under a soft limit of 256.
#[test]
fn many_projections_run_under_a_low_soft_open_files_limit() {
    let env = Env::new();
    env.demo_log(300);
    let mut config = String::new();
    for i in 0..100 {
        config.push_str(&format!(
            "[[projection]]\nname = \"p{i:03}\"\nversion = 1\n\
             schema = \"CREATE TABLE placed (order_id TEXT PRIMARY KEY)\"\n\
             [projection.on.OrderPlaced]\n\
             sql = \"INSERT INTO placed VALUES (:order_id!text)\"\n\n"
        ));
    }
    env.write_config(&config);
    let out = std::process::Command::new("sh")
        .current_dir(env.tmp.path())
        .arg("-c")
        .arg("ulimit -Sn 256 && exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_projectionist"))
        .args([
            "--store",
            "events.db",
            "--dir",
            "many",
            "--config",
            "projections.toml",
        ])
        .args(["--quiet", "rebuild"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for i in [0, 57, 99] {
        let conn = projectionist::rusqlite::Connection::open(env.path(&format!("many/p{i:03}.db")))
            .unwrap();
        let placed: i64 = conn
            .query_row("SELECT count(*) FROM placed", [], |r| r.get(0))
            .unwrap();
        assert!(placed > 0, "p{i:03} holds the placed orders");
    }
}

/// SIGKILLs of an in-place rebuild whose config defers an index (the demo's
/// `orders_by_customer`), at checkpoints drawn from the seed, each followed by a `resume` in
/// a new process: a projection short of the head never has the index, and
/// every resume ends with it and with the rows of an uninterrupted rebuild.
/// `PROJECTIONIST_SEED` repeats a run; `PROJECTIONIST_SOAK=N` kills N times.
#[test]
fn sigkilled_rebuilds_build_the_deferred_index_only_at_the_head() {
    const EVENTS: u64 = 150_000;
    let kills = common::soak(3);
    let seed = common::seed("deferred index kill test");
    let mut rng = fastrand::Rng::with_seed(seed);
    let env = Env::new();
    env.demo_log(EVENTS);
    let reference = env.digest("order_summary");
    let has_index = |env: &Env| env.has_index("order_summary", "orders_by_customer");
    assert!(has_index(&env), "the demo's rebuild built it");
    for kill in 0..kills {
        let batch = rng.u32(10..200).to_string();
        let mut child = env
            .command(&["--quiet", "--batch-size", &batch, "rebuild", "--in-place"])
            .spawn()
            .unwrap();
        // The kill point is drawn from the seed as a checkpoint: the child
        // is SIGKILLed once its file says it got there (or once it ends),
        // wherever its work then is; the last draws land at the head, where
        // the index is built.
        let kill_at = rng.u64(EVENTS / 20..=EVENTS);
        common::wait_until(
            &format!("kill {kill} (seed {seed}): the rebuild at {kill_at} or its end"),
            std::time::Duration::from_secs(120),
            || {
                env.checkpoint_in("projections", "order_summary") >= kill_at
                    || child.try_wait().unwrap().is_some()
            },
        );
        let _ = Command::new("kill")
            .args(["-KILL", &child.id().to_string()])
            .status();
        let _ = child.wait();
        let conn = Connection::open(env.path("projections/order_summary.db")).unwrap();
        let at = projectionist::SqliteCheckpoint::load_in(&conn, "order_summary").unwrap_or(0);
        drop(conn);
        eprintln!("kill {kill}: drawn at {kill_at}, checkpoint {at}");
        let pending = || -> serde_json::Value {
            json_lines(&env.run(&["--json", "status"]))
                .into_iter()
                .find(|l| l["projection"] == "order_summary")
                .unwrap()["pending_indexes"]
                .clone()
        };
        if at < EVENTS {
            assert!(
                !has_index(&env),
                "kill {kill} (seed {seed}): index present at checkpoint {at} < {EVENTS}"
            );
            if at > 0 {
                // `status`, in another process, says what is missing.
                assert_eq!(
                    pending(),
                    serde_json::json!(["orders_by_customer"]),
                    "kill {kill} (seed {seed})"
                );
            }
        }
        let out = env.run(&["--quiet", "resume"]);
        assert!(
            out.status.success(),
            "kill {kill} (seed {seed}): {}",
            stderr(&out)
        );
        assert!(
            has_index(&env),
            "kill {kill} (seed {seed}): resume built no index"
        );
        assert_eq!(
            pending(),
            serde_json::json!([]),
            "kill {kill} (seed {seed})"
        );
        assert_eq!(
            env.digest("order_summary"),
            reference,
            "kill {kill} (seed {seed}): rows differ from an uninterrupted rebuild"
        );
    }
}

/// A deferred index that fails on the data (an expression index over text
/// that is not JSON passes the empty scratch database): the events stay
/// committed, the run fails with exit 4 naming the cause, `status` shows it,
/// and a shadow rebuild that fails so is not published over the live file.
#[test]
fn a_failing_deferred_index_keeps_the_rows_and_publishes_nothing() {
    let env = Env::new();
    env.demo_log(2_000);
    env.write_config(
        r#"
[[projection]]
name = "jx"
version = 1
schema = "CREATE TABLE t (id TEXT PRIMARY KEY, payload TEXT)"
deferred_indexes = "CREATE INDEX IF NOT EXISTS t_a ON t (json_extract(payload, '$.a'))"
[projection.on.OrderPlaced]
sql = "INSERT INTO t VALUES (:order_id!text, :customer_id)"
"#,
    );
    let cause =
        "projection jx: caught_up (run at the log's head) failed: deferred_indexes: malformed JSON";
    let out = env.run(&["rebuild"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains(cause), "{}", stderr(&out));
    let conn = Connection::open(env.path("projections/jx.db")).unwrap();
    let at = projectionist::SqliteCheckpoint::load_in(&conn, "jx").unwrap();
    assert_eq!(at, 2_000, "the events are committed");
    drop(conn);
    assert!(!env.has_index("jx", "t_a"));
    let live = env.digest("jx");
    let status = stdout(&env.run(&["status"]));
    assert!(
        status.contains("failed") && status.contains(cause),
        "{status}"
    );
    // A shadow rebuild fails the same way and leaves the live file alone.
    let out = env.run(&["rebuild"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(env.path("projections/.jx.shadow.db").exists());
    assert_eq!(
        env.digest("jx"),
        live,
        "nothing published over the live file"
    );
}

/// A rebuild from an empty log would replace every built projection with an
/// empty one (most often: the wrong store). Refused by name, nothing touched,
/// unless `--force`.
#[test]
fn rebuild_from_an_empty_log_over_built_projections_is_refused_unless_forced() {
    let env = Env::new();
    env.demo_log(500);
    let before = env.digest("order_summary");
    drop(SqliteEventStore::create(env.path("empty.db")).unwrap());
    let out = env
        .command_with("empty.db", "projections", &["rebuild"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(text.contains("order_summary (checkpoint 500)"), "{text}");
    assert!(text.contains("--force"), "{text}");
    assert_eq!(env.digest("order_summary"), before, "nothing touched");
    let out = env
        .command_with(
            "empty.db",
            "projections",
            &["--quiet", "rebuild", "--force"],
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(env.checkpoint_in("projections", "order_summary"), 0);
}

/// A typo in an event-type key (`OrderShiped`) leaves the projection silently
/// incomplete: the run warns, naming the projection, the type and the closest
/// type the store has; the exit code is unchanged.
#[test]
fn a_handled_event_type_the_store_never_saw_is_warned_with_a_suggestion() {
    let env = Env::new();
    env.demo_log(500);
    env.write_config(&DEMO_CONFIG.replace(
        "[projection.on.OrderShipped]",
        "[projection.on.OrderShiped]",
    ));
    let out = env.run(&["rebuild", "order_summary"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains(
            "warning: projection order_summary handles event type OrderShiped, which the store \
             has never seen (did you mean OrderShipped?)"
        ),
        "{text}"
    );
    let out = env.run(&["--json", "resume", "order_summary"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let warning = json_lines(&out)
        .into_iter()
        .find(|l| l["event"] == "warning")
        .expect("a warning line");
    assert_eq!(warning["unseen_event_type"], "OrderShiped");
    assert_eq!(warning["did_you_mean"], "OrderShipped");
    // The correct config warns of nothing.
    env.write_config(DEMO_CONFIG);
    let out = env.run(&["rebuild"]);
    assert!(!stderr(&out).contains("never seen"), "{}", stderr(&out));
}

/// `inspect` with a config checks its statements' `:field` parameters
/// against the fields the events of each type have, and suggests the closest.
#[test]
fn inspect_warns_about_a_parameter_naming_a_field_no_event_has() {
    let env = Env::new();
    env.demo_log(300);
    env.write_config(
        &DEMO_CONFIG.replace(":customer_id!text, 'open'", ":customer_idd!text, 'open'"),
    );
    let out = env.run(&["inspect"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains(
            "warning: projection order_summary, event OrderPlaced: parameter :customer_idd names \
             a field no such event has (did you mean :customer_id?)"
        ),
        "{text}"
    );
    env.write_config(DEMO_CONFIG);
    let out = env.run(&["inspect"]);
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
}
