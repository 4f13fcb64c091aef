//! Zero-downtime rebuilds through the real binary: a reader in another process
//! holding ONE connection while a projection is rebuilt under a new definition
//! and published, rolled back and verified; SIGKILLs during shadow rebuilds.
//! The reader is this test binary again (the ignored test `reader_process`).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, Reaped, json_lines, stderr, stdout, wait_until};
use projectionist::rusqlite::{Connection, OpenFlags};

/// `path,stop-file` of the reading process.
const READER: &str = "PROJECTIONIST_TEST_READER";

/// How often the reader asks (as an application polling its read model).
const READ_EVERY: Duration = Duration::from_millis(2);

/// What the reader asks: the orders projection's size and total.
const QUESTION: &str = "SELECT count(*), total(total_cents) FROM orders";

/// Not a test: the reading process. `PROJECTIONIST_TEST_READER` holds the
/// projection file and a stop file. It opens ONE read-only connection (with a
/// busy timeout, as an application would) and prints every answer, or the
/// error, one line each, until the stop file exists.
#[test]
#[ignore = "a helper process for the tests below, not a test"]
fn reader_process() {
    let Ok(spec) = std::env::var(READER) else {
        return;
    };
    let (path, stop) = spec.split_once(',').unwrap();
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    println!("ready");
    while !std::path::Path::new(stop).exists() {
        let answer = conn.query_row(QUESTION, [], |r| {
            Ok(format!("{} {}", r.get::<_, i64>(0)?, r.get::<_, f64>(1)?))
        });
        match answer {
            Ok(answer) => println!("answer: {answer}"),
            Err(e) => println!("answer: error: {e}"),
        }
        std::thread::sleep(READ_EVERY);
    }
}

/// A reading process over `projections/order_summary.db`; stops when `stop`
/// is created, its answers then read from its output.
struct Reader {
    child: Reaped,
    stop: std::path::PathBuf,
    /// Its answers so far, read from its output as it prints them.
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    collector: std::thread::JoinHandle<()>,
}

impl Reader {
    fn start(env: &Env) -> Reader {
        let stop = env.path("stop-reader");
        let spec = format!(
            "{},{}",
            env.path("projections/order_summary.db").display(),
            stop.display()
        );
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "reader_process",
                "--ignored",
                "--quiet",
                "--nocapture",
            ])
            .env(READER, spec)
            .stdout(Stdio::piped())
            .spawn()
            .map(Reaped::new)
            .unwrap();
        // Wait for its connection to be open.
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.starts_with("ready") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "the reader died");
        }
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let collector = {
            let seen = std::sync::Arc::clone(&seen);
            std::thread::spawn(move || {
                for line in out.lines().map_while(Result::ok) {
                    if let Some(answer) = line.strip_prefix("answer: ") {
                        seen.lock().unwrap().push(answer.to_owned());
                    }
                }
            })
        };
        Reader {
            child,
            stop,
            seen,
            collector,
        }
    }

    /// Waits until the reader has answered `expected` and taken at least
    /// `reads` reads in all (it reads every `READ_EVERY` on its one
    /// connection, so it sees a new version soon).
    fn wait_for(&self, expected: &str, reads: usize) {
        wait_until(
            &format!("the reader to answer {expected} (and {reads} reads)"),
            Duration::from_secs(30),
            || {
                let seen = self.seen.lock().unwrap();
                seen.len() >= reads && seen.iter().any(|a| a == expected)
            },
        );
    }

    /// Stops the reader; its answers.
    fn answers(self) -> Vec<String> {
        std::fs::write(&self.stop, "").unwrap();
        self.child.into_inner().wait().unwrap();
        self.collector.join().unwrap();
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// The answer to [`QUESTION`] now, on a fresh connection.
fn answer(env: &Env) -> String {
    let conn = Connection::open(env.path("projections/order_summary.db")).unwrap();
    conn.query_row(QUESTION, [], |r| {
        Ok(format!("{} {}", r.get::<_, i64>(0)?, r.get::<_, f64>(1)?))
    })
    .unwrap()
}

/// Version 2 of `order_summary`: every added item costs one cent more, so
/// its totals differ from version 1's.
fn config_v2() -> String {
    let v2 = common::DEMO_CONFIG
        .replacen("version = 1", "version = 2", 1)
        .replacen(
            "total_cents = total_cents + :qty!int * :unit_price_cents!int",
            "total_cents = total_cents + :qty!int * :unit_price_cents!int + 1",
            1,
        );
    assert_ne!(v2, common::DEMO_CONFIG);
    v2
}

/// Every answer the reader got was one of the complete versions.
fn assert_whole(answers: &[String], versions: &[&str], min_reads: usize) {
    let partial: Vec<&String> = answers
        .iter()
        .filter(|a| !versions.contains(&a.as_str()))
        .collect();
    assert!(
        partial.is_empty(),
        "{} of {} reads were partial, empty or errors, e.g. {:?}; versions {versions:?}",
        partial.len(),
        answers.len(),
        &partial[..partial.len().min(5)]
    );
    assert!(
        answers.len() >= min_reads,
        "only {} reads were taken",
        answers.len()
    );
}

fn status_rows(env: &Env) -> Vec<serde_json::Value> {
    json_lines(&env.run(&["--json", "status"]))
}

fn row<'a>(rows: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    rows.iter().find(|r| r["projection"] == name).unwrap()
}

#[test]
fn a_reader_never_sees_a_partial_projection_while_a_new_version_is_built_and_published() {
    let env = Env::new();
    env.demo_log(150_000);
    let v1 = answer(&env);
    env.write_config(&config_v2());
    let reader = Reader::start(&env);
    let out = env.run(&["--batch-size", "200", "--json", "rebuild", "order_summary"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v2 = answer(&env);
    reader.wait_for(&v2, 100);
    let answers = reader.answers();
    assert_ne!(v1, v2);
    println!("{} reads, all whole", answers.len());
    // The count depends on the machine's load (each answer scans the table in
    // a debug build); what makes the test bite is that both versions were seen.
    assert_whole(&answers, &[&v1, &v2], 100);
    assert!(answers.contains(&v1), "the reader never saw v1");
    assert!(answers.contains(&v2), "the reader never saw v2");
    let published = json_lines(&out);
    let published = published
        .iter()
        .find(|l| l["event"] == "published")
        .expect("a published line");
    assert_eq!(published["previous_kept"], true);
    // The new version is live, not stale, and no shadow is left behind.
    let rows = status_rows(&env);
    let r = row(&rows, "order_summary");
    assert_eq!(
        (r["state"].as_str(), r["built_version"].as_u64()),
        (Some("current"), Some(2)),
        "{r}"
    );
    assert_eq!(r["previous_kept"], true, "{r}");
    assert_eq!(r["previous_version"], 1, "{r}");
    assert!(r["shadow_checkpoint"].is_null(), "{r}");
    assert!(!env.path("projections/.order_summary.shadow.db").exists());
    // Equal to a rebuild from scratch in another directory.
    let fresh = env.command_with(
        "events.db",
        "fresh",
        &["--quiet", "rebuild", "order_summary"],
    );
    assert!(fresh.status_ok());
    assert_eq!(
        env.digest("order_summary"),
        digest_in(&env, "fresh", "order_summary")
    );
}

trait StatusOk {
    fn status_ok(self) -> bool;
}

impl StatusOk for Command {
    fn status_ok(mut self) -> bool {
        self.status().unwrap().success()
    }
}

fn digest_in(env: &Env, dir: &str, name: &str) -> String {
    let conn = Connection::open(env.path(&format!("{dir}/{name}.db"))).unwrap();
    projectionist::projection_digest(&conn, projectionist::DigestScope::All).unwrap()
}

#[test]
fn rollback_restores_the_previous_version_for_an_open_reader_and_resume_leaves_it_alone() {
    let env = Env::new();
    env.demo_log(20_000);
    let v1 = answer(&env);
    let v1_digest = env.digest("order_summary");
    env.write_config(&config_v2());
    assert!(env.run(&["--quiet", "rebuild"]).status.success());
    let v2 = answer(&env);
    let v2_digest = env.digest("order_summary");

    let reader = Reader::start(&env);
    let out = env.run(&["rollback", "order_summary"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("rolled back"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the config defines order_summary as v2"),
        "{}",
        stderr(&out)
    );
    reader.wait_for(&v1, 10);
    assert_whole(&reader.answers(), &[&v1, &v2], 10);
    assert_eq!(env.digest("order_summary"), v1_digest);

    // Rolled back and stale: shown so, and neither resume nor follow rebuilds it.
    let rows = status_rows(&env);
    let r = row(&rows, "order_summary");
    assert_eq!(r["state"], "stale", "{r}");
    assert!(r["rolled_back_at"].is_string(), "{r}");
    assert_eq!(r["previous_version"], 2, "{r}");
    let out = env.run(&["resume"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("was rolled back"), "{}", stderr(&out));
    assert_eq!(env.digest("order_summary"), v1_digest);
    let follower = env
        .command(&["--json", "follow"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    // It says, where `status` reads it, that it leaves the projection as it is.
    follower_says(&env, "order_summary", "stopped");
    let _ = Command::new("kill")
        .args(["-TERM", &follower.id().to_string()])
        .status();
    let out = follower.into_inner().wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("was rolled back"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.digest("order_summary"), v1_digest);

    // A second rollback undoes the first; a rebuild clears the mark.
    let out = env.run(&["--quiet", "rollback", "order_summary"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(env.digest("order_summary"), v2_digest);
    let out = env.run(&["--quiet", "rollback", "order_summary"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        env.run(&["--quiet", "rebuild", "order_summary"])
            .status
            .success()
    );
    let rows = status_rows(&env);
    let r = row(&rows, "order_summary");
    assert_eq!(r["state"], "current", "{r}");
    assert!(r["rolled_back_at"].is_null(), "{r}");
    assert_eq!(env.digest("order_summary"), v2_digest);

    // Nothing to roll back to.
    let out = env.run(&["--quiet", "rebuild", "--no-keep-previous", "order_summary"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.run(&["rollback", "order_summary"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no previous version"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn verify_reports_a_row_edited_by_hand_and_publishes_nothing() {
    let env = Env::new();
    env.demo_log(10_000);
    let out = env.run(&["--json", "rebuild", "--verify"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let verdicts: Vec<_> = json_lines(&out)
        .into_iter()
        .filter(|l| l["event"] == "verify")
        .collect();
    assert_eq!(verdicts.len(), 2);
    assert!(verdicts.iter().all(|v| v["equal"] == true), "{verdicts:?}");

    // Drift: a row edited by hand, as nobody should.
    let order: String = {
        let conn = Connection::open(env.path("projections/order_summary.db")).unwrap();
        let order: String = conn
            .query_row(
                "SELECT order_id FROM orders ORDER BY order_id LIMIT 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        conn.execute(
            "UPDATE orders SET total_cents = total_cents + 1 WHERE order_id = ?1",
            [&order],
        )
        .unwrap();
        order
    };
    let edited = env.digest("order_summary");
    let out = env.run(&["rebuild", "--verify", "--publish-if-equal", "order_summary"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("differs from a fresh rebuild"), "{text}");
    assert!(
        stderr(&out).contains("order_summary differs from a fresh rebuild"),
        "{}",
        stderr(&out)
    );
    assert!(text.contains("table orders"), "{text}");
    assert!(text.contains(&format!("changed ('{order}')")), "{text}");
    // Nothing published, nothing left behind.
    assert_eq!(env.digest("order_summary"), edited);
    assert!(!env.path("projections/.order_summary.shadow.db").exists());

    // The other projection is equal: --publish-if-equal publishes it.
    let out = env.run(&[
        "--json",
        "rebuild",
        "--verify",
        "--publish-if-equal",
        "customer_stats",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        json_lines(&out).iter().any(|l| l["event"] == "published"),
        "{}",
        stdout(&out)
    );
}

/// `rebuild` and `rollback` of a projection that a follower holds, from
/// another process: the follower takes the request and does it (a rebuild in
/// its shadow, published when caught up; a rollback), while it follows on.
/// Here the rebuild repairs a row edited by hand in the live file.
#[test]
fn a_follower_rebuilds_and_rolls_back_on_request_from_another_process() {
    let env = Env::new();
    env.demo_log(5_000);
    let clean = env.digest("order_summary");
    let follower = start_following(&env);
    let deadline = Instant::now() + Duration::from_secs(60);
    // Drift: a row edited by hand behind the follower's back.
    Connection::open(env.path("projections/order_summary.db"))
        .unwrap()
        .execute_batch("UPDATE orders SET total_cents = total_cents + 1 WHERE rowid = 1")
        .unwrap();
    let edited = env.digest("order_summary");
    assert_ne!(edited, clean);

    // In place is not handed over: it would take the projection offline.
    let out = env.run(&["rebuild", "--in-place", "order_summary"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("locked by process {}", follower.id())),
        "{}",
        stderr(&out)
    );

    ask_follower_to_rebuild(&env);
    wait_for_digest(
        &env,
        &clean,
        deadline,
        "the follower never published the rebuild",
    );
    assert!(
        !env.path("projections/.order_summary.rebuild-request")
            .exists()
    );

    let out = env.run(&["rollback", "order_summary"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("rolled back by the follower"),
        "{}",
        stderr(&out)
    );
    assert_eq!(env.digest("order_summary"), edited);

    // A new definition: the follower takes up the config, but never rebuilds
    // a rolled-back projection on its own; a rebuild request does.
    follower_says(&env, "order_summary", "following");
    env.write_config(&config_v2());
    assert!(
        env.command_with("events.db", "fresh-v2", &["--quiet", "rebuild"])
            .status_ok()
    );
    let v2 = digest_in(&env, "fresh-v2", "order_summary");
    // The follower took the new definition up and left the rolled-back
    // projection as it is (stopped, with the reason).
    follower_says(&env, "order_summary", "stopped");
    assert_eq!(env.digest("order_summary"), edited, "a rollback was undone");
    ask_follower_to_rebuild(&env);
    wait_for_digest(
        &env,
        &v2,
        deadline,
        "the follower never rebuilt v2 on request",
    );

    let _ = Command::new("kill")
        .args(["-TERM", &follower.id().to_string()])
        .status();
    assert!(follower.into_inner().wait().unwrap().success());
}

/// A request file seen before its writer wrote the id into it (an asker of
/// an earlier version creates the file, then writes it) is left for its
/// writer: the follower neither acts on it nor removes it, and answers the
/// request once it is written. (It used to roll back at once, under no id,
/// so the asker waited for an answer that never came.)
#[test]
fn a_rollback_request_still_being_written_is_answered_once_written() {
    let env = Env::new();
    env.demo_log(2_000);
    let follower = start_following(&env);
    ask_follower_to_rebuild(&env);
    wait_published(&env, 1);
    let before = live_version_id(&env, "order_summary");

    let request = env.path("projections/.order_summary.rollback-request");
    std::fs::File::create_new(&request).unwrap();
    // Observably give the follower a look at it: it serves the requests it
    // finds in one listing in name order, so a second request for
    // customer_stats is taken only after the pass that took the first one
    // (and found the empty request beside it) went on to order_summary.
    for _ in 0..2 {
        let out = env.run(&["rebuild", "customer_stats"]);
        assert!(
            stderr(&out).contains("took the request"),
            "{}",
            stderr(&out)
        );
    }
    assert!(request.exists(), "the follower took an empty request");
    assert_eq!(live_version_id(&env, "order_summary"), before);
    // The writer finishes: the same file, now holding its id.
    std::io::Write::write_all(
        &mut std::fs::File::options()
            .write(true)
            .open(&request)
            .expect("the request file was removed before it was written"),
        b"77-1",
    )
    .unwrap();
    let outcome = env.path("projections/.order_summary.outcome-77-1");
    wait_until("the rollback's answer", Duration::from_secs(60), || {
        outcome.exists()
    });
    let answer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&outcome).unwrap()).unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    assert_ne!(live_version_id(&env, "order_summary"), before);
    assert!(!request.exists());

    let _ = Command::new("kill")
        .args(["-TERM", &follower.id().to_string()])
        .status();
    assert!(follower.into_inner().wait().unwrap().success());
}

/// SIGKILLs at random moments of shadow rebuilds (seeded: `PROJECTIONIST_SEED`
/// replays): the live file always holds one whole version, and the next
/// `resume` ends on the digest of a fresh rebuild.
#[test]
fn sigkills_during_shadow_rebuilds_leave_a_whole_live_version() {
    let seed = common::seed("shadow rebuild kills");
    let mut rng = fastrand::Rng::with_seed(seed);
    let env = Env::new();
    env.demo_log(30_000);
    let v1 = env.digest("order_summary");
    env.write_config(&config_v2());
    assert!(
        env.command_with("events.db", "fresh", &["--quiet", "rebuild"])
            .status_ok()
    );
    let v2 = digest_in(&env, "fresh", "order_summary");
    let started = Instant::now();
    assert!(
        env.command_with("events.db", "timing", &["--quiet", "rebuild"])
            .status_ok()
    );
    let full_ms = started.elapsed().as_millis() as u64;
    for iteration in 0..6 {
        let mut child = env
            .command(&["--quiet", "--batch-size", "100", "rebuild", "order_summary"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Reaped::new)
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.u64(0..full_ms.max(1))));
        child.kill().unwrap();
        child.wait().unwrap();
        let live = env.digest("order_summary");
        assert!(
            live == v1 || live == v2,
            "seed {seed}, iteration {iteration}: the live file is neither version"
        );
        let out = env.run(&["--quiet", "resume", "order_summary"]);
        assert!(out.status.success(), "seed {seed}: {}", stderr(&out));
        assert_eq!(
            env.digest("order_summary"),
            v2,
            "seed {seed}, iteration {iteration}"
        );
        assert!(!env.path("projections/.order_summary.shadow.db").exists());
        // Back to version 1 for the next round.
        env.write_config(common::DEMO_CONFIG);
        assert!(
            env.run(&["--quiet", "rebuild", "order_summary"])
                .status
                .success()
        );
        assert_eq!(env.digest("order_summary"), v1);
        env.write_config(&config_v2());
    }
}

/// Appends `n` late orders (placed, two items, shipped) with plain SQL, a
/// transaction each, pausing between them.
fn append_orders(store: &std::path::Path, n: u64) {
    let mut conn = Connection::open(store).unwrap();
    conn.busy_timeout(Duration::from_secs(30)).unwrap();
    for order in 0..n {
        let tx = conn.transaction().unwrap();
        let id = format!("late-{order}");
        let events = [
            (
                "OrderPlaced",
                serde_json::json!({"order_id": id, "customer_id": "c-late"}),
            ),
            (
                "ItemAdded",
                serde_json::json!({"order_id": id, "customer_id": "c-late", "sku": "s", "qty": 2, "unit_price_cents": 150}),
            ),
            (
                "ItemAdded",
                serde_json::json!({"order_id": id, "customer_id": "c-late", "sku": "t", "qty": 1, "unit_price_cents": 99}),
            ),
            (
                "OrderShipped",
                serde_json::json!({"order_id": id, "customer_id": "c-late"}),
            ),
        ];
        for (version, (event_type, data)) in events.iter().enumerate() {
            tx.execute(
                "INSERT INTO events (stream_id, stream_version, event_type, data) VALUES (?1, ?2, ?3, ?4)",
                (format!("order-{id}"), version as i64 + 1, event_type, data.to_string()),
            )
            .unwrap();
        }
        tx.commit().unwrap();
        std::thread::sleep(Duration::from_millis(3));
    }
}

/// `rebuild order_summary` from another process, taken by the follower.
fn ask_follower_to_rebuild(env: &Env) {
    let out = env.run(&["rebuild", "order_summary"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("took the request"),
        "{}",
        stderr(&out)
    );
}

/// Waits until `order_summary` has the digest `expected`.
fn wait_for_digest(env: &Env, expected: &str, deadline: Instant, what: &str) {
    while env.digest("order_summary") != expected {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn live_checkpoint(env: &Env, name: &str) -> u64 {
    file_checkpoint(env, &format!("{name}.db"), name)
}

/// The checkpoint of `name` in file `file` of the projection directory,
/// read-only (0 when it cannot be read).
fn file_checkpoint(env: &Env, file: &str, name: &str) -> u64 {
    Connection::open_with_flags(
        env.path(&format!("projections/{file}")),
        OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .ok()
    .and_then(|c| projectionist::SqliteCheckpoint::load_in(&c, name).ok())
    .unwrap_or(0)
}

/// `follow` started after a definition changed: the changed projection is
/// rebuilt in its shadow while the other keeps following the appends, its live
/// file keeps serving the old version (a reader never sees it shrink or fail),
/// the shadow is published once caught up, and at the end both projections
/// equal a fresh rebuild of the final log: nothing lost, nothing applied twice.
#[test]
fn follow_rebuilds_a_changed_projection_in_its_shadow_while_the_others_follow() {
    follow_through_a_definition_change(false);
}

/// The same, with the config edited while `follow` runs: it notices the
/// change, and goes on as if restarted with it, without a restart.
#[test]
fn follow_notices_a_changed_config_and_rebuilds_without_a_restart() {
    follow_through_a_definition_change(true);
}

fn follow_through_a_definition_change(while_running: bool) {
    let env = Env::new();
    env.demo_log(60_000);
    let v1_rows: i64 = answer(&env).split(' ').next().unwrap().parse().unwrap();
    if !while_running {
        env.write_config(&config_v2());
    }
    let reader = Reader::start(&env);
    let mut follower = env
        .command(&["--json", "--batch-size", "100", "follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let lines = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line.clone());
            all.push(line);
        }
        all
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    if while_running {
        // Following under v1 first; then the config changes under it.
        while !lines_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .contains("\"following\"")
        {}
        env.write_config(&config_v2());
    }
    let store = env.path("events.db");
    let appender = std::thread::spawn(move || append_orders(&store, 300));
    // While the shadow is built, the other projection follows the appends and
    // the changed one's live file stays where it was.
    let shadow = env.path("projections/.order_summary.shadow.db");
    while !shadow.exists() {
        assert!(Instant::now() < deadline, "no shadow was made");
        std::thread::sleep(Duration::from_millis(1));
    }
    let frozen_at = live_checkpoint(&env, "order_summary");
    let mut others_moved_while_frozen = false;
    while shadow.exists() {
        let live = live_checkpoint(&env, "order_summary");
        if live != frozen_at {
            break; // published in between
        }
        if live_checkpoint(&env, "customer_stats") > frozen_at && shadow.exists() {
            others_moved_while_frozen = true;
        }
        assert!(Instant::now() < deadline, "the shadow was never published");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        others_moved_while_frozen,
        "customer_stats did not follow while order_summary was rebuilt (frozen at {frozen_at})"
    );
    appender.join().unwrap();
    let head = 60_000 + 300 * 4;
    while live_checkpoint(&env, "order_summary") < head
        || live_checkpoint(&env, "customer_stats") < head
    {
        assert!(
            Instant::now() < deadline,
            "the follower did not reach the head"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &follower.id().to_string()])
        .status();
    assert!(follower.into_inner().wait().unwrap().success());
    let lines = lines.join().unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"event\":\"published\"") && l.contains("order_summary")),
        "no published line: {lines:?}"
    );
    // The reader never saw the projection shrink, empty or fail.
    let answers = reader.answers();
    let mut last = v1_rows;
    for a in &answers {
        let rows: i64 = a
            .split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a failed read: {a}"));
        assert!(rows >= last, "the reader saw {rows} rows after {last}");
        last = rows;
    }
    assert!(answers.len() > 20, "only {} reads", answers.len());
    // Exactly once: equal to a fresh rebuild of the final log.
    assert!(
        env.command_with("events.db", "fresh", &["--quiet", "rebuild"])
            .status_ok()
    );
    for name in ["order_summary", "customer_stats"] {
        assert_eq!(env.digest(name), digest_in(&env, "fresh", name), "{name}");
    }
    assert!(!env.path("projections/.order_summary.shadow.db").exists());
}

/// A new definition that fails on an event: the rebuild stops in its shadow,
/// the live file keeps the old version untouched, `status` says why, and a
/// fixed definition rebuilds and publishes over the failed shadow.
#[test]
fn a_failing_shadow_rebuild_leaves_the_live_version_and_status_says_why() {
    let env = Env::new();
    env.demo_log(3_000);
    let v1 = env.digest("order_summary");
    // qty is a JSON integer: `!text` makes every ItemAdded a poison event.
    let broken = config_v2().replacen(
        "total_cents = total_cents + :qty!int * :unit_price_cents!int + 1",
        "total_cents = total_cents + length(:qty!text)",
        1,
    );
    env.write_config(&broken);
    let out = env.run(&["rebuild", "order_summary"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert_eq!(env.digest("order_summary"), v1);
    let rows = status_rows(&env);
    let r = row(&rows, "order_summary");
    assert!(r["shadow_checkpoint"].is_u64(), "{r}");
    assert!(
        r["shadow_error"]
            .as_str()
            .is_some_and(|e| e.contains("qty")),
        "{r}"
    );
    let table = stdout(&env.run(&["status"]));
    assert!(
        table.contains("the rebuild failed, the live file is unchanged"),
        "{table}"
    );

    env.write_config(&config_v2());
    let out = env.run(&["--quiet", "rebuild", "order_summary"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_ne!(env.digest("order_summary"), v1);
    let rows = status_rows(&env);
    let r = row(&rows, "order_summary");
    assert!(
        r["shadow_checkpoint"].is_null() && r["state"] == "current",
        "{r}"
    );
}

/// Hostile directory: symbolic links planted where the follower registers and
/// where a request goes never make projectionist write through them.
#[test]
fn links_planted_at_the_follower_and_request_files_are_not_written_through() {
    let env = Env::new();
    env.demo_log(2_000);
    let outside = env.path("precious.txt");
    std::fs::write(&outside, "precious").unwrap();
    for planted in [".order_summary.follower", ".customer_stats.rebuild-request"] {
        std::os::unix::fs::symlink(&outside, env.path(&format!("projections/{planted}"))).unwrap();
    }
    let mut follower = env
        .command(&["--json", "follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    let mut out = BufReader::new(follower.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut line = String::new();
    while !line.contains("\"following\"") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0 && Instant::now() < deadline);
    }
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    // The follower replaced the planted link with its own registration.
    let registered = env.path("projections/.order_summary.follower");
    assert!(
        !std::fs::symlink_metadata(&registered)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "precious");
    // A request from another process replaces a planted link too.
    std::os::unix::fs::symlink(
        &outside,
        env.path("projections/.order_summary.rebuild-request"),
    )
    .unwrap();
    ask_follower_to_rebuild(&env);
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "precious");
    let _ = Command::new("kill")
        .args(["-TERM", &follower.id().to_string()])
        .status();
    assert!(follower.into_inner().wait().unwrap().success());
}

/// Hostile directory: a named pipe where the follower registers or where a
/// rollback request goes holds nothing up (opening a pipe that nobody
/// writes blocks): `status` and `rebuild` finish, and the follower still
/// takes the requests that come after it.
#[test]
fn pipes_at_the_follower_and_request_names_hold_nothing_up() {
    let env = Env::new();
    env.demo_log(2_000);
    assert!(env.run(&["--quiet", "rebuild"]).status.success());
    let mkfifo = |name: &str| {
        let made = Command::new("mkfifo")
            .arg(env.path(&format!("projections/{name}")))
            .status()
            .unwrap();
        assert!(made.success());
    };
    mkfifo(".order_summary.follower");
    for args in [
        &["status"][..],
        &["--quiet", "rebuild", "order_summary"][..],
    ] {
        let mut child = env
            .command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Reaped::new)
            .unwrap();
        let mut finished = None;
        wait_until(
            &format!("{args:?} to finish"),
            Duration::from_secs(60),
            || {
                finished = child.try_wait().unwrap();
                finished.is_some()
            },
        );
        assert!(finished.unwrap().success(), "{args:?} failed");
    }
    std::fs::remove_file(env.path("projections/.order_summary.follower")).unwrap();

    let follower = start_following(&env);
    mkfifo(".order_summary.rollback-request");
    // The first request is taken before the pipe is looked at; the second
    // only if looking at it did not block the follower.
    ask_follower_to_rebuild(&env);
    ask_follower_to_rebuild(&env);
    let _ = Command::new("kill")
        .args(["-TERM", &follower.id().to_string()])
        .status();
    assert!(follower.into_inner().wait().unwrap().success());
}

/// Issue 23, finding 4: a second `follow` of the same directory is refused,
/// and changes nothing of the first one's: its `.{name}.follower` files stay,
/// so a `rebuild` from another process is still handed to the running
/// follower instead of failing with "locked".
#[test]
fn a_refused_second_follower_leaves_the_first_ones_registration_alone() {
    let env = Env::new();
    env.demo_log(2_000);
    let follower = start_following(&env);
    let registration = env.path("projections/.order_summary.follower");
    let registered_pid = || {
        std::fs::read_to_string(&registration)
            .ok()
            .and_then(|text| text.lines().next().map(|l| l.trim().to_owned()))
    };
    let first = registered_pid();
    assert_eq!(first, Some(follower.id().to_string()));

    let second = env.run(&["follow"]);
    assert!(
        !second.status.success(),
        "the second follower was not refused"
    );
    assert!(
        stderr(&second).contains(&format!("locked by process {}", follower.id())),
        "{}",
        stderr(&second)
    );
    assert_eq!(
        registered_pid(),
        first,
        "the refused follower removed the first one's registration"
    );
    ask_follower_to_rebuild(&env);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &follower.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(follower.into_inner().wait().unwrap().success());
    assert!(
        !registration.exists(),
        "the first follower unregisters on exit"
    );
}

/// Issue 23, read-your-writes: `wait NAME --position N` in a process of its
/// own exits 0 once the follower (another process) has applied an append
/// made by a third party, and 5 naming the checkpoint when the timeout comes
/// first; a missing projection times out, a bad name is a usage error.
#[test]
fn wait_returns_once_the_follower_applied_the_position_and_times_out_otherwise() {
    let env = Env::new();
    env.demo_log(1_000);
    let _follower = env
        .command(&["follow"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    let out = env.run(&[
        "wait",
        "order_summary",
        "--position",
        "1000",
        "--timeout",
        "60s",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.run(&[
        "wait",
        "order_summary",
        "--position",
        "1001",
        "--timeout",
        "300ms",
    ]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("checkpoint 1000"), "{}", stderr(&out));

    let waiting = env
        .command(&[
            "--json",
            "wait",
            "order_summary",
            "--position",
            "1001",
            "--timeout",
            "60s",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    append_orders(&env.path("events.db"), 1);
    let out = waiting.into_inner().wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(answer["checkpoint"].as_u64().unwrap() >= 1001, "{answer}");

    let out = env.run(&["wait", "nosuch", "--position", "1", "--timeout", "100ms"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let out = env.run(&["wait", "../escape", "--position", "1", "--timeout", "100ms"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// The checkpoint in projection `name`'s shadow file (0 when there is none).
fn shadow_checkpoint(env: &Env, name: &str) -> u64 {
    file_checkpoint(env, &format!(".{name}.shadow.db"), name)
}

/// Issue 23, finding 1: a definition change of one projection never holds
/// back another. While `order_summary`'s new version is rebuilt in its shadow
/// from the start of a long log, `customer_stats` applies an event appended
/// meanwhile long before the shadow gets there (before, both shared one read
/// of the log, which started over from the shadow's position: the unchanged
/// one waited, `resuming`, until the shadow had read the whole log).
#[test]
fn a_sibling_follows_on_while_a_changed_projection_is_rebuilt_from_the_start() {
    let env = Env::new();
    env.demo_log(150_000);
    let log = env.path("follower.log");
    let mut follower = env
        .command(&["--batch-size", "50", "--json", "follow"])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    // Following under v1 (its signal handler and config watch are set).
    while !log_text().contains("\"following\"") {
        assert!(Instant::now() < deadline, "never following: {}", log_text());
        assert!(
            follower.try_wait().unwrap().is_none(),
            "exited: {}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    env.write_config(&config_v2());
    let shadow = env.path("projections/.order_summary.shadow.db");
    while !shadow.exists() {
        assert!(
            Instant::now() < deadline,
            "no shadow was made: {}",
            log_text()
        );
        assert!(
            follower.try_wait().unwrap().is_none(),
            "exited: {}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    append_orders(&env.path("events.db"), 1);
    let head = 150_004;
    while live_checkpoint(&env, "customer_stats") < head {
        assert!(
            Instant::now() < deadline,
            "customer_stats never applied the append"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let shadow_at = shadow_checkpoint(&env, "order_summary");
    assert!(
        shadow.exists() && shadow_at < head / 2,
        "customer_stats applied the append only once the shadow was at {shadow_at} of {head}"
    );
    while live_checkpoint(&env, "order_summary") < head || shadow.exists() {
        assert!(Instant::now() < deadline, "the shadow was never published");
        std::thread::sleep(Duration::from_millis(5));
    }
    common::sigterm(&follower);
    assert!(follower.into_inner().wait().unwrap().success());
    assert!(
        env.command_with("events.db", "fresh", &["--quiet", "rebuild"])
            .status_ok()
    );
    for name in ["order_summary", "customer_stats"] {
        assert_eq!(env.digest(name), digest_in(&env, "fresh", name), "{name}");
    }
}

/// The live file's version id, read without its lock.
fn live_version_id(env: &Env, name: &str) -> String {
    let conn = Connection::open_with_flags(
        env.path(&format!("projections/{name}.db")),
        OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    projectionist::version_info(&conn)
        .unwrap()
        .id
        .unwrap_or_default()
}

/// Waits until the follower has published a rebuild of `order_summary`
/// (a previous version kept, no shadow) whose definition is `version`.
fn wait_published(env: &Env, version: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = status_rows(env);
        let r = row(&rows, "order_summary");
        if r["previous_kept"] == true
            && r["shadow_checkpoint"].is_null()
            && r["built_version"] == version
        {
            return;
        }
        assert!(Instant::now() < deadline, "never published: {r}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 23, findings 3 and 5: a `rollback` handed to a running follower
/// reports its own outcome. Right after a handed-off `rebuild` it exits 0
/// (it was judged by the live file, which the rebuild's publish could change
/// meanwhile: exit 4 although the follower rolled back); two at once are
/// taken one after the other, each answered with its own swap (both exited 0
/// with one swap done); a rollback to a version built from another
/// definition says it is left stale, not that it is followed.
#[test]
fn rollbacks_handed_to_a_follower_each_get_their_own_answer() {
    let env = Env::new();
    env.demo_log(3_000);
    let follower = env
        .command(&["follow"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while row(&status_rows(&env), "order_summary")["state"] != "following" {
        assert!(Instant::now() < deadline, "never following");
        std::thread::sleep(Duration::from_millis(20));
    }
    ask_follower_to_rebuild(&env);
    wait_published(&env, 1);

    // A second handed-off rebuild, and at once a rollback.
    ask_follower_to_rebuild(&env);
    let out = env.run(&["--json", "rollback", "order_summary"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_published(&env, 1);

    // Two rollbacks at once: two swaps, each answered with its own.
    let before = live_version_id(&env, "order_summary");
    let rollback = || {
        env.command(&["--json", "rollback", "order_summary"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (rollback(), rollback());
    let answers: Vec<serde_json::Value> = [first, second]
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", stderr(&out));
            json_lines(&out).pop().unwrap()
        })
        .collect();
    assert_ne!(
        answers[0]["rolled_back_at"], answers[1]["rolled_back_at"],
        "{answers:?}"
    );
    assert_eq!(
        live_version_id(&env, "order_summary"),
        before,
        "two rollbacks are two swaps: {answers:?}"
    );

    // A new definition, published (over a fresh rebuild: a rolled-back
    // projection is left alone until rebuilt); rolling back restores the old
    // one, which the follower leaves as it is.
    ask_follower_to_rebuild(&env);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !row(&status_rows(&env), "order_summary")["rolled_back_at"].is_null() {
        assert!(Instant::now() < deadline, "the rebuild was never published");
        std::thread::sleep(Duration::from_millis(20));
    }
    env.write_config(&config_v2());
    wait_published(&env, 2);
    let out = env.run(&["rollback", "order_summary"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("left as it is"), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("follows the restored"),
        "{}",
        stderr(&out)
    );
    let out = env.run(&["--json", "rollback", "order_summary"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json_lines(&out).pop().unwrap()["follows"], true);
    common::sigterm(&follower);
    assert!(follower.into_inner().wait().unwrap().success());
}

/// Issue 23, finding 6: a rebuild whose publish fails (here a directory
/// stands where the publish copies the live file) exits 4, leaves the live
/// file as it was, and `status` shows the complete shadow with why its
/// publish failed, not an interrupted rebuild.
#[test]
fn a_failed_publish_is_shown_as_such_not_as_an_interrupted_rebuild() {
    let env = Env::new();
    env.demo_log(40_000);
    let before = env.digest("order_summary");
    let rebuild = env
        .command(&["--batch-size", "100", "rebuild", "order_summary"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    // Once the shadow is being written (the live file was opened and checked
    // already), a directory where the publish copies the live file.
    let deadline = Instant::now() + Duration::from_secs(60);
    while shadow_checkpoint(&env, "order_summary") == 0 {
        assert!(Instant::now() < deadline, "the shadow never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    let obstacle = env.path("projections/.order_summary.previous-new.db");
    std::fs::create_dir(&obstacle).unwrap();
    let out = rebuild.into_inner().wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("publish"), "{}", stderr(&out));
    assert_eq!(env.digest("order_summary"), before);
    let rows = status_rows(&env);
    let r = row(&rows, "order_summary");
    assert!(
        r["shadow_error"]
            .as_str()
            .is_some_and(|e| e.contains("publishing it failed")),
        "{r}"
    );
    assert_eq!(r["shadow_checkpoint"], 40_000, "{r}");
    let out = env.run(&["status"]);
    assert!(!stdout(&out).contains("interrupted"), "{}", stdout(&out));
    // The obstacle gone, the next rebuild publishes.
    std::fs::remove_dir(&obstacle).unwrap();
    let out = env.run(&["rebuild", "order_summary"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(row(&status_rows(&env), "order_summary")["shadow_error"].is_null());
}

/// A `--json follow` process, once it says a projection follows (its signal
/// handler and request watch are set); the rest of its output is drained.
fn start_following(env: &Env) -> Reaped {
    let mut follower = env
        .command(&["--json", "follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    let mut out = BufReader::new(follower.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut line = String::new();
    while !line.contains("\"following\"") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0 && Instant::now() < deadline);
    }
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    follower
}

/// `rebuild --verify` of a projection a follower holds says so once, naming
/// the follower's process, and changes nothing (it used to add a confusing
/// "discard the shadow ... locked").
#[test]
fn verify_beside_a_follower_names_the_follower_and_changes_nothing() {
    let env = Env::new();
    env.demo_log(1_000);
    let before = env.digest("order_summary");
    let follower = start_following(&env);
    let out = env.run(&["rebuild", "--verify", "order_summary"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains(&format!(
            "cannot verify order_summary: process {} holds it",
            follower.id()
        )),
        "{text}"
    );
    assert!(!text.contains("discard the shadow"), "{text}");
    assert!(!env.path("projections/.order_summary.shadow.db").exists());
    assert_eq!(env.digest("order_summary"), before);
    drop(follower);
}

/// Waits until the follower's state line for projection `name` (the second
/// line of `.{name}.follower`, what `status` in another process reads) says
/// `state`.
fn follower_says(env: &Env, name: &str, state: &str) {
    let path = env.path(&format!("projections/.{name}.follower"));
    wait_until(
        &format!("the follower to say {name} is {state}"),
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(&path)
                .ok()
                .and_then(|text| text.lines().nth(1).map(str::to_owned))
                .and_then(|line| serde_json::from_str::<serde_json::Value>(&line).ok())
                .is_some_and(|line| line["state"] == state)
        },
    );
}
