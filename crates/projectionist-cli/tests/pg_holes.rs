//! Issue 8, item 7, across processes: a rolled-back append leaves a hole in a
//! PostgreSQL log. A new `projectionist` process (resume, a fresh rebuild, a
//! worker) must pass it once no transaction that could fill it is running, and
//! must say so when a still-running transaction holds events back. Issue 13,
//! item 2: another program's table, written without our cooperation, read
//! through `[source]` by `follow` and `resume` processes while 16 writers
//! append.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

use common::pg::{Schema, insert};
use common::{
    DEMO_CONFIG, Env, Reaped, SetOnDrop, free_port, http_get, json_lines, metric, sigterm, stderr,
};

fn checkpoints(env: &Env) -> Vec<u64> {
    ["order_summary", "customer_stats"]
        .iter()
        .map(|name| {
            let conn = projectionist::rusqlite::Connection::open(
                env.path(&format!("projections/{name}.db")),
            )
            .unwrap();
            projectionist::SqliteCheckpoint::load_in(&conn, name).unwrap()
        })
        .collect()
}

#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn a_new_process_passes_a_rollback_hole() {
    let schema = Schema::new("holes");
    let url = schema.url();
    let env = Env::new();
    env.write_config(DEMO_CONFIG);
    let run = |args: &[&str]| {
        let mut all = vec![
            "--store",
            url.as_str(),
            "--dir",
            "projections",
            "--config",
            "projections.toml",
        ];
        all.extend_from_slice(args);
        env.run_bare(&all)
    };
    let out = run(&["--quiet", "demo", "--events", "1000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(checkpoints(&env), [1000, 1000]);

    // A rolled-back append (sequence 1001), then a committed one (1002).
    let mut client = Client::connect(&url, NoTls).unwrap();
    let mut tx = client.transaction().unwrap();
    assert_eq!(insert(&mut tx, "rolled-back"), 1001);
    tx.rollback().unwrap();
    let mut tx = client.transaction().unwrap();
    assert_eq!(insert(&mut tx, "committed"), 1002);
    tx.commit().unwrap();

    // Each command is a new process that has never seen the hole.
    let out = run(&["resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(checkpoints(&env), [1002, 1002], "{}", stderr(&out));
    assert!(!stderr(&out).contains("below the head"), "{}", stderr(&out));
    let out = run(&["--quiet", "rebuild"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(checkpoints(&env), [1002, 1002]);

    // A transaction still running holds 1003 back; 1004 is committed. The run
    // stops at 1002 and says so; once the holder commits, the next run goes on.
    let mut holder = Client::connect(&url, NoTls).unwrap();
    let mut held = holder.transaction().unwrap();
    assert_eq!(insert(&mut held, "held"), 1003);
    let mut tx = client.transaction().unwrap();
    assert_eq!(insert(&mut tx, "after-held"), 1004);
    tx.commit().unwrap();
    let out = run(&["resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(checkpoints(&env), [1002, 1002]);
    assert!(
        stderr(&out).contains("below the head 1004"),
        "{}",
        stderr(&out)
    );
    held.commit().unwrap();
    let out = run(&["resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(checkpoints(&env), [1004, 1004]);
    let orders: i64 =
        projectionist::rusqlite::Connection::open(env.path("projections/order_summary.db"))
            .unwrap()
            .query_row(
                "SELECT count(*) FROM orders WHERE order_id IN ('committed', 'held', 'after-held')",
                [],
                |r| r.get(0),
            )
            .unwrap();
    assert_eq!(orders, 3);

    // A worker is a new process too.
    let mut tx = client.transaction().unwrap();
    insert(&mut tx, "rolled-back-2");
    tx.rollback().unwrap();
    let mut tx = client.transaction().unwrap();
    assert_eq!(insert(&mut tx, "after-2"), 1006);
    tx.commit().unwrap();
    let out = run(&["--quiet", "worker", "--exit-when-done"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(checkpoints(&env), [1006, 1006], "{}", stderr(&out));
}

/// A config reading another program's table `flog` through `[source]`: one
/// projection with a row per event, keyed by its sequence (an event applied
/// twice would fail on the key and stop the projection).
const FOREIGN_CONFIG: &str = r#"
[source]
table = "flog"
sequence = "id"
stream_id = "stream"
stream_version = "version"
event_type = "kind"
data = "body"

[[projection]]
name = "seen"
version = 1
schema = "CREATE TABLE seen (id INTEGER PRIMARY KEY, stream TEXT NOT NULL)"

[projection.on.W]
sql = "INSERT INTO seen (id, stream) VALUES (:_sequence, :_stream_id)"
"#;

/// The event ids in `{dir}/seen.db`.
fn seen_ids(env: &Env, dir: &str) -> BTreeSet<i64> {
    let path = env.path(&format!("{dir}/seen.db"));
    if !path.exists() {
        return BTreeSet::new();
    }
    let conn = projectionist::rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn.prepare("SELECT id FROM seen").unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// One foreign writer: plain inserts on the `bigserial` (no transaction id
/// before the number is drawn), some drawing the number with `nextval()`
/// first and inserting it later in the same transaction, random commit
/// delays (some draws held 100-300 ms before the insert), about 5% rolled
/// back. Returns the ids it committed and the transactions rolled back.
fn foreign_writer(url: &str, seed: u64, stop: &AtomicBool) -> (Vec<i64>, u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut client = Client::connect(url, NoTls).unwrap();
    let (mut committed, mut rollbacks) = (Vec::new(), 0);
    let mut version = 0i64;
    while !stop.load(Ordering::Relaxed) {
        let mut tx = client.transaction().unwrap();
        let stream = format!("w{seed}");
        let mut mine = Vec::new();
        for i in 0..rng.u32(1..=3) {
            version += 1;
            // A draw comes first in its transaction: before it, the
            // transaction has no id that a reader could wait for.
            let id: i64 = if i == 0 && rng.bool() {
                let drawn: i64 = tx
                    .query_one("SELECT nextval('flog_id_seq')", &[])
                    .unwrap()
                    .get(0);
                // Now and then an application that takes its time between
                // drawing the number and inserting it.
                let pause = if rng.u8(0..10) == 0 {
                    rng.u64(100..300)
                } else {
                    rng.u64(0..30)
                };
                std::thread::sleep(Duration::from_millis(pause));
                tx.execute(
                    "INSERT INTO flog (id, stream, version, kind, body) VALUES ($1, $2, $3, 'W', '{}')",
                    &[&drawn, &stream, &version],
                )
                .unwrap();
                drawn
            } else {
                tx.query_one(
                    "INSERT INTO flog (stream, version, kind, body) VALUES ($1, $2, 'W', '{}') RETURNING id",
                    &[&stream, &version],
                )
                .unwrap()
                .get(0)
            };
            mine.push(id);
        }
        std::thread::sleep(Duration::from_millis(rng.u64(0..30)));
        if rng.u8(0..100) < 5 {
            tx.rollback().unwrap();
            rollbacks += 1;
        } else {
            tx.commit().unwrap();
            committed.extend(mine);
        }
        // Between transactions, a pause: readers keep up with the head, where
        // a hole is met while the transaction that drew it still runs.
        std::thread::sleep(Duration::from_millis(rng.u64(0..50)));
    }
    (committed, rollbacks)
}

/// Issue 13, item 2, across processes: 16 writers of another program append
/// to a plain `bigserial` table (numbers drawn before any transaction id,
/// some with `nextval()` long before the insert, random commit delays, ~5%
/// rolled back) while a `follow` process and a loop of `resume` processes
/// read it through `[source]`: each ends with every committed event exactly
/// once. Seeded (`PROJECTIONIST_SEED`); length `PROJECTIONIST_PG_STRESS_SECS`
/// (default 20).
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn foreign_writers_without_our_cooperation_lose_nothing() {
    let schema = Schema::new("foreign_writers");
    let url = schema.url();
    let seconds: u64 = std::env::var("PROJECTIONIST_PG_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed = common::seed(&format!(
        "foreign writers, {seconds} s (PROJECTIONIST_PG_STRESS_SECS)"
    ));
    Client::connect(&url, NoTls)
        .unwrap()
        .batch_execute(
            "CREATE TABLE flog (id BIGSERIAL PRIMARY KEY, stream TEXT NOT NULL, version BIGINT NOT NULL,
                                kind TEXT NOT NULL, body JSONB NOT NULL)",
        )
        .unwrap();
    let env = Env::new();
    env.write_config(FOREIGN_CONFIG);
    let mut follower = Reaped::new(
        env.command_with(&url, "followed", &["--quiet", "follow"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stop = AtomicBool::new(false);
    let resumes_done = AtomicBool::new(false);
    let (committed, rollbacks, resumes) = std::thread::scope(|scope| {
        let _stop_on_panic = SetOnDrop(&stop);
        let _resumes_on_panic = SetOnDrop(&resumes_done);
        let writers: Vec<_> = (0..16u64)
            .map(|w| {
                let (url, stop) = (&url, &stop);
                scope.spawn(move || foreign_writer(url, seed.wrapping_add(w), stop))
            })
            .collect();
        // `resume` processes one after the other, each a new process that has
        // never seen the holes.
        let resumer = scope.spawn(|| {
            let mut runs = 0;
            while !resumes_done.load(Ordering::Relaxed) {
                let out = env
                    .command_with(&url, "resumed", &["--quiet", "resume"])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "resume: {}", stderr(&out));
                runs += 1;
            }
            runs
        });
        std::thread::sleep(Duration::from_secs(seconds));
        stop.store(true, Ordering::Relaxed);
        let mut committed = BTreeSet::new();
        let mut rollbacks = 0;
        for writer in writers {
            let (ids, rolled_back) = writer.join().unwrap();
            committed.extend(ids);
            rollbacks += rolled_back;
        }
        resumes_done.store(true, Ordering::Relaxed);
        (committed, rollbacks, resumer.join().unwrap())
    });
    // The follower reads past the last committed event, then stops cleanly.
    let max = *committed.last().expect("events were committed");
    let checkpoint = || {
        let path = env.path("followed/seen.db");
        let conn = projectionist::rusqlite::Connection::open(path).unwrap();
        projectionist::SqliteCheckpoint::load_in(&conn, "seen").unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while checkpoint() < max.cast_unsigned() {
        assert!(
            Instant::now() < deadline,
            "the follower is at {} of {max}",
            checkpoint()
        );
        assert!(
            follower.try_wait().unwrap().is_none(),
            "the follower exited early"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = follower.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = follower.into_inner().wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // A last resume after the writers stopped.
    let out = env
        .command_with(&url, "resumed", &["--quiet", "resume"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    eprintln!(
        "foreign writers: {} events committed (highest id {max}), {rollbacks} transactions rolled back, {resumes} resume processes",
        committed.len()
    );
    assert!(
        rollbacks > 0,
        "some transactions rolled back, leaving holes"
    );
    for dir in ["followed", "resumed"] {
        let seen = seen_ids(&env, dir);
        let lost: Vec<_> = committed.difference(&seen).take(10).collect();
        let extra: Vec<_> = seen.difference(&committed).take(10).collect();
        assert!(
            lost.is_empty() && extra.is_empty(),
            "{dir}: lost {lost:?}, not committed {extra:?}"
        );
    }
}

/// Waits, up to a deadline, until `check` holds for the follower's
/// `/metrics` text; returns that text.
fn wait_metrics(addr: &str, what: &str, check: &dyn Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, text) = http_get(addr, "/metrics");
        if code == 200 && check(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "never {what}:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue 22, finding 3: a follower held at a hole tells the truth. A writer
/// draws the next number and holds it (no row yet); five events commit after
/// it. While held, the follower's metrics count those events as lag and show
/// the wait, `/health` fails once the wait passes `--max-wait`, and its
/// `--json` lines say `waiting` with the hole; once the writer commits, all
/// is applied, lag is 0 and `/health` is ok again.
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn a_follower_held_at_a_hole_reports_waiting_lag_and_health() {
    let schema = Schema::new("held_follower");
    let url = schema.url();
    let env = Env::new();
    env.pg_demo_log(&url, 300);
    let command = |args: &[&str]| env.command_with(&url, "projections", args);
    let addr = format!("127.0.0.1:{}", free_port());
    let follower = command(&["--json", "follow", "--metrics", &addr, "--max-wait", "1s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    let following = |text: &str| {
        ["order_summary", "customer_stats"].iter().all(|p| {
            metric(text, "projectionist_following", p) == Some(1.0)
                && metric(text, "projectionist_lag_events", p) == Some(0.0)
        })
    };
    wait_metrics(&addr, "following", &following);

    let mut client = Client::connect(&url, NoTls).unwrap();
    let mut holder = Client::connect(&url, NoTls).unwrap();
    let mut held = holder.transaction().unwrap();
    let drawn: i64 = held
        .query_one(
            "SELECT nextval(pg_get_serial_sequence('events', 'sequence'))",
            &[],
        )
        .unwrap()
        .get(0);
    for i in 0..5 {
        let mut tx = client.transaction().unwrap();
        insert(&mut tx, &format!("behind-{i}"));
        tx.commit().unwrap();
    }
    let text = wait_metrics(&addr, "held with lag", &|text| {
        metric(text, "projectionist_lag_events", "order_summary").is_some_and(|lag| lag >= 5.0)
            && metric(text, "projectionist_hole_wait_seconds", "order_summary")
                .is_some_and(|s| s > 0.0)
    });
    assert_eq!(
        metric(&text, "projectionist_following", "order_summary"),
        Some(1.0),
        "{text}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = http_get(&addr, "/health");
        if code == 503 {
            assert!(body.contains(&format!("hole {drawn}")), "{body}");
            assert!(body.contains("order_summary: waiting"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/health never failed: {code} {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // `status` in another process sees the same.
    let out = command(&["--json", "status"]).output().unwrap();
    let rows = json_lines(&out);
    let row = rows
        .iter()
        .find(|r| r["projection"] == "order_summary")
        .unwrap_or_else(|| panic!("{rows:?}"));
    assert_eq!(row["state"], "waiting", "{row}");
    assert_eq!(row["waiting"]["sequence"], drawn, "{row}");
    assert!(row["lag"].as_u64().unwrap() >= 5, "{row}");

    let data = r#"{"order_id": "held", "customer_id": "c-1"}"#;
    held.execute(
        "INSERT INTO events (sequence, stream_id, stream_version, event_type, data) \
         VALUES ($1, 'held', 1, 'OrderPlaced', $2::text::jsonb)",
        &[&drawn, &data],
    )
    .unwrap();
    held.commit().unwrap();
    wait_metrics(&addr, "caught up after the commit", &|text| {
        following(text)
            && metric(text, "projectionist_hole_wait_seconds", "order_summary") == Some(0.0)
    });
    let (code, body) = http_get(&addr, "/health");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    sigterm(&follower);
    let out = follower.into_inner().wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let lines = json_lines(&out);
    let waiting = lines
        .iter()
        .find(|l| l["event"] == "state" && l["state"] == "waiting")
        .unwrap_or_else(|| panic!("no waiting state: {lines:?}"));
    assert_eq!(waiting["waiting"]["sequence"], drawn);
    assert!(waiting["lag"].as_u64().unwrap() >= 1, "{waiting}");
    let ids = checkpoints(&env);
    assert_eq!(ids, [306, 306], "every event applied, the held one too");
}

/// Issue 22, finding 4: a log where every fifth number was rolled back long
/// ago (and an unrelated transaction stays open throughout) is rebuilt to its
/// head in one run, exit 0, with nothing said of holes or of the head.
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn a_rebuild_over_permanent_holes_reaches_the_head() {
    let schema = Schema::new("permanent_holes");
    let url = schema.url();
    let env = Env::new();
    env.pg_demo_log(&url, 1000);
    let command = |args: &[&str]| env.command_with(&url, "projections", args);
    let mut client = Client::connect(&url, NoTls).unwrap();
    client
        .batch_execute(
            "INSERT INTO events (sequence, stream_id, stream_version, event_type, data)
             SELECT n, 'h-' || n, 1, 'OrderPlaced',
                    jsonb_build_object('order_id', 'h-' || n, 'customer_id', 'c-' || (n % 7))
             FROM generate_series(1001, 26000) n WHERE n % 5 <> 0;
             SELECT setval(pg_get_serial_sequence('events', 'sequence'), 26000);
             CREATE TABLE unrelated (x INT);",
        )
        .unwrap();
    let mut other = Client::connect(&url, NoTls).unwrap();
    let mut long = other.transaction().unwrap();
    long.execute("INSERT INTO unrelated VALUES (1)", &[])
        .unwrap();
    let out = command(&["--batch-size", "5000", "rebuild"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("below the head"), "{}", stderr(&out));
    assert_eq!(checkpoints(&env), [25_999, 25_999], "{}", stderr(&out));
    long.commit().unwrap();
}

/// Issue 22, late events: a writer of another program's table breaks the
/// writer contract (draws a number in one transaction, inserts it in a later
/// one, after the follower passed the hole). The follower reports the event
/// (`--json` line, metric) and, by default, rebuilds the projection in its
/// shadow and publishes it: the live file ends with every event.
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn a_late_event_is_reported_and_its_projection_rebuilt() {
    let schema = Schema::new("late_event");
    let url = schema.url();
    let mut client = Client::connect(&url, NoTls).unwrap();
    client
        .batch_execute(
            "CREATE TABLE flog (id BIGSERIAL PRIMARY KEY, stream TEXT NOT NULL, version BIGINT NOT NULL,
                                kind TEXT NOT NULL, body JSONB NOT NULL)",
        )
        .unwrap();
    let insert = |client: &mut Client, id: Option<i64>, stream: &str| {
        client
            .execute(
                "INSERT INTO flog (id, stream, version, kind, body) \
                 VALUES (COALESCE($1, nextval('flog_id_seq')), $2, 1, 'W', '{}')",
                &[&id, &stream],
            )
            .unwrap();
    };
    insert(&mut client, None, "a");
    let env = Env::new();
    env.write_config(FOREIGN_CONFIG);
    let addr = format!("127.0.0.1:{}", free_port());
    let follower = Reaped::new(
        env.command_with(
            &url,
            "projections",
            &["--json", "follow", "--metrics", &addr],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let wait_seen = |want: &[i64]| {
        let deadline = Instant::now() + Duration::from_secs(60);
        let want: BTreeSet<i64> = want.iter().copied().collect();
        while seen_ids(&env, "projections") != want {
            assert!(
                Instant::now() < deadline,
                "seen {:?}, want {want:?}",
                seen_ids(&env, "projections")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_seen(&[1]);
    let drawn: i64 = client
        .query_one("SELECT nextval('flog_id_seq')", &[])
        .unwrap()
        .get(0);
    insert(&mut client, None, "c");
    wait_seen(&[1, 3]);
    insert(&mut client, Some(drawn), "late");
    wait_seen(&[1, 2, 3]);
    wait_metrics(&addr, "the late event counted", &|text| {
        metric(text, "projectionist_late_events_total", "seen") == Some(1.0)
    });
    sigterm(&follower);
    let out = follower.into_inner().wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let lines = json_lines(&out);
    let late = lines
        .iter()
        .find(|l| l["event"] == "late_event")
        .unwrap_or_else(|| panic!("no late_event line: {lines:?}"));
    assert_eq!(late["sequence"], 2);
    assert_eq!(late["projections"], serde_json::json!(["seen"]));
    assert_eq!(late["action"], "rebuild");
}
