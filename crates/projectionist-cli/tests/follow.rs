//! `projectionist follow` end to end, across processes: appends made with plain
//! SQL by other processes are applied while `status` in another process says
//! `following`; SIGTERM exits 0 with everything committed; a poison event stops
//! only the projection that handles it; and seeded SIGKILLs of the follower
//! while two processes append leave the projections equal to a fresh rebuild.
//!
//! The appending processes are this test binary started again in helper mode
//! (the ignored test `appender_process`): they write with rusqlite and plain
//! SQL, as any other program would, never through our library.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, Reaped, SetOnDrop, free_port, http_get, json_lines, stderr};
use projectionist::rusqlite::Connection;

/// How long a test waits for the follower: a bound for a broken follower, not
/// a speed requirement.
const WAIT_MAX: Duration = Duration::from_secs(60);

/// SIGKILLs of the follower in the crash test; `PROJECTIONIST_SOAK=N` runs N.
const KILLS_DEFAULT: u64 = 30;

/// The environment variable that turns this binary into an appender.
const APPENDER: &str = "PROJECTIONIST_TEST_APPENDER";

/// Not a test: the appending process. `PROJECTIONIST_TEST_APPENDER` holds
/// `store,tag,count,seed`: append `count` order events for orders
/// `{tag}-{i}`, mostly one per transaction, some in small batches, with
/// plain SQL, pausing a little between transactions.
#[test]
#[ignore = "a helper process that the follow tests start"]
fn appender_process() {
    let Ok(spec) = std::env::var(APPENDER) else {
        return;
    };
    let parts: Vec<&str> = spec.split(',').collect();
    let (store, tag) = (parts[0], parts[1]);
    let count: u64 = parts[2].parse().unwrap();
    let mut rng = fastrand::Rng::with_seed(parts[3].parse().unwrap());
    let mut conn = Connection::open(store).unwrap();
    conn.busy_timeout(Duration::from_secs(30)).unwrap();
    let mut written = 0;
    let mut order = 0;
    while written < count {
        let in_tx = if rng.u8(..10) == 0 { rng.u64(2..20) } else { 1 }.min(count - written);
        let tx = conn.transaction().unwrap();
        for _ in 0..in_tx {
            let (stream, version, event_type, data) = order_event(tag, order, written, &mut rng);
            tx.execute(
                "INSERT INTO events (stream_id, stream_version, event_type, data) VALUES (?1, ?2, ?3, ?4)",
                (stream, version, event_type, data),
            )
            .unwrap();
            written += 1;
            if version == 4 {
                order += 1;
            }
        }
        tx.commit().unwrap();
        std::thread::sleep(Duration::from_micros(rng.u64(0..6_000)));
    }
}

/// The `n`th event of the appender `tag`: orders of four events each.
fn order_event(
    tag: &str,
    order: u64,
    n: u64,
    rng: &mut fastrand::Rng,
) -> (String, i64, &'static str, String) {
    let order_id = format!("{tag}-{order}");
    let customer = format!("c{}", order % 7);
    let version = (n % 4) as i64 + 1;
    let (event_type, data) = match version {
        1 => (
            "OrderPlaced",
            serde_json::json!({"order_id": order_id, "customer_id": customer}),
        ),
        2 | 3 => (
            "ItemAdded",
            serde_json::json!({"order_id": order_id, "customer_id": customer,
                "sku": "s", "qty": rng.i64(1..5), "unit_price_cents": rng.i64(100..900)}),
        ),
        _ => (
            "OrderShipped",
            serde_json::json!({"order_id": order_id, "customer_id": customer}),
        ),
    };
    (
        format!("order-{order_id}"),
        version,
        event_type,
        data.to_string(),
    )
}

/// Starts an appending process.
fn appender(env: &Env, tag: &str, count: u64, seed: u64) -> Reaped {
    let spec = format!("{},{tag},{count},{seed}", env.path("events.db").display());
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "appender_process", "--ignored", "--quiet"])
        .env(APPENDER, spec)
        .stdout(Stdio::null())
        .spawn()
        .map(Reaped::new)
        .unwrap()
}

fn head(env: &Env) -> u64 {
    let conn = Connection::open(env.path("events.db")).unwrap();
    conn.query_row("SELECT coalesce(max(sequence), 0) FROM events", [], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap()
    .cast_unsigned()
}

fn checkpoint(env: &Env, name: &str) -> u64 {
    Connection::open(env.path(&format!("projections/{name}.db")))
        .ok()
        .and_then(|c| projectionist::SqliteCheckpoint::load_in(&c, name).ok())
        .unwrap_or(0)
}

/// Waits until every named projection's checkpoint reaches `sequence`.
fn wait_for(env: &Env, names: &[&str], sequence: u64) {
    let deadline = Instant::now() + WAIT_MAX;
    for name in names {
        while checkpoint(env, name) < sequence {
            assert!(
                Instant::now() < deadline,
                "{name} did not reach {sequence}; at {}",
                checkpoint(env, name)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn status(env: &Env) -> Vec<serde_json::Value> {
    json_lines(&env.run(&["--json", "status"]))
}

fn row<'a>(rows: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["projection"] == name)
        .unwrap_or_else(|| panic!("no row for {name}: {rows:?}"))
}

/// A `follow` process in the background (its output discarded).
fn start_follower(env: &Env) -> Reaped {
    env.command(&["--quiet", "follow"])
        .stdout(Stdio::null())
        .spawn()
        .map(Reaped::new)
        .unwrap()
}

fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits until `status` in another process reports every named projection
/// `following` (the follower is past its start: its signal handler is set).
fn wait_following(env: &Env, names: &[&str]) {
    wait_following_by(&|args: &[&str]| env.command(args), names);
}

/// As [`wait_following`], with `status` run by `command`.
fn wait_following_by(command: &dyn Fn(&[&str]) -> Command, names: &[&str]) {
    let deadline = Instant::now() + WAIT_MAX;
    while !names
        .iter()
        .all(|name| status_of(command, name) == "following")
    {
        assert!(Instant::now() < deadline, "never following");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts a follower, lets it run for `alive`, and SIGKILLs it; it must not
/// have exited on its own.
fn run_and_kill(mut follower: Command, alive: Duration, kill: u64, seed: u64) {
    let mut follower = follower
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    std::thread::sleep(alive);
    if let Some(exit) = follower.try_wait().unwrap() {
        let out = follower.into_inner().wait_with_output().unwrap();
        panic!(
            "kill {kill} (seed {seed}): the follower exited early with {exit}: {}",
            stderr(&out)
        );
    }
    follower.kill().unwrap();
    follower.wait().unwrap();
}

/// Waits for a child to exit, within `WAIT_MAX`.
fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the process did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The digests of the demo projections rebuilt from scratch from `store` into
/// a directory of their own, from the log as it is now.
fn fresh_digests(env: &Env, store: &str) -> Vec<String> {
    let out = env
        .command_with(store, "reference", &["--quiet", "rebuild"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    digests_in(env, "reference")
}

/// The digests of the demo projections the follower built.
fn digests(env: &Env) -> Vec<String> {
    digests_in(env, "projections")
}

/// The digests of the demo projections' own tables in directory `dir`.
fn digests_in(env: &Env, dir: &str) -> Vec<String> {
    DEMO.iter()
        .map(|name| {
            let conn = Connection::open(env.path(&format!("{dir}/{name}.db"))).unwrap();
            projectionist::projection_digest(&conn, projectionist::DigestScope::ProjectionTables)
                .unwrap()
        })
        .collect()
}

const DEMO: [&str; 2] = ["order_summary", "customer_stats"];

#[test]
fn follow_applies_appends_of_another_process_and_sigterm_exits_0() {
    let env = Env::new();
    env.demo_log(3_000);
    let mut follower = env
        .command(&["--json", "follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    wait_for(&env, &DEMO, 3_000);
    let mut writer = appender(&env, "a", 400, 1);
    assert!(wait_exit(&mut writer).success());
    let head = head(&env);
    assert_eq!(head, 3_400);
    wait_for(&env, &DEMO, head);
    // Another process sees the follower at work.
    let rows = status(&env);
    for name in DEMO {
        let r = row(&rows, name);
        assert_eq!(r["state"], "following", "{r}");
        assert_eq!(r["lag"], 0, "{r}");
    }
    // The config's deferred index was built when the follower caught up,
    // and is there for another process while it keeps following.
    assert!(
        env.has_index("order_summary", "orders_by_customer"),
        "deferred index built at the first catch-up"
    );
    signal(&follower, "-TERM");
    let exit = wait_exit(&mut follower);
    let out = follower.into_inner().wait_with_output().unwrap();
    assert_eq!(exit.code(), Some(0), "{}", stderr(&out));
    let lines = json_lines(&out);
    for name in DEMO {
        let states: Vec<&str> = lines
            .iter()
            .filter(|l| l["event"] == "state" && l["projection"] == name)
            .map(|l| l["state"].as_str().unwrap())
            .collect();
        // Announced from the start (`catching up` until the first report
        // that it is at the head), then following until the stop.
        let states = match states.split_first() {
            Some((&"catching up", rest)) => rest.to_vec(),
            _ => states,
        };
        assert_eq!(states, ["following", "stopped"], "{name}");
        let result = lines
            .iter()
            .find(|l| l["event"] == "result" && l["projection"] == name)
            .unwrap();
        assert_eq!(result["checkpoint"], head);
    }
    assert!(
        digests(&env) == fresh_digests(&env, "events.db"),
        "follower = rebuild"
    );
    let rows = status(&env);
    assert!(rows.iter().all(|r| r["state"] == "current"), "{rows:?}");
}

#[test]
fn seeded_sigkills_of_the_follower_while_two_processes_append_lose_and_repeat_nothing() {
    let kills = common::soak(KILLS_DEFAULT);
    let seed = common::seed(&format!("follow crash test, {kills} kills"));
    let mut rng = fastrand::Rng::with_seed(seed);
    let env = Env::new();
    env.demo_log(2_000);
    let per_writer = 600 + kills * 40;
    let mut writers = [
        appender(&env, "w1", per_writer, seed ^ 1),
        appender(&env, "w2", per_writer, seed ^ 2),
    ];
    for kill in 0..kills {
        let batch = rng.u32(1..200).to_string();
        let follower = env.command(&["--quiet", "--batch-size", &batch, "follow"]);
        run_and_kill(
            follower,
            Duration::from_millis(rng.u64(20..250)),
            kill,
            seed,
        );
        // A killed follower leaves complete projections, never `interrupted`
        // unless it died while rebuilding from scratch (never here).
        let rows = status(&env);
        for name in DEMO {
            let state = row(&rows, name)["state"].as_str().unwrap().to_owned();
            assert!(
                ["behind", "current"].contains(&state.as_str()),
                "kill {kill} (seed {seed}): {name} is {state}"
            );
        }
    }
    for writer in &mut writers {
        assert!(wait_exit(writer).success());
    }
    let head = head(&env);
    assert_eq!(head, 2_000 + 2 * per_writer);
    let mut follower = start_follower(&env);
    wait_for(&env, &DEMO, head);
    wait_following(&env, &DEMO);
    signal(&follower, "-TERM");
    assert_eq!(wait_exit(&mut follower).code(), Some(0));
    assert!(
        digests(&env) == fresh_digests(&env, "events.db"),
        "after {kills} kills (seed {seed}) the projections differ from a rebuild"
    );
}

/// SIGKILLs of the follower of many projections (each restart opens them
/// all); `PROJECTIONIST_SOAK=N` runs N.
const MANY_KILLS_DEFAULT: u64 = 6;

/// The event types the many projections are spread over; the appenders
/// write no `ItemRemoved`, so its projections only ever skip new events.
const MANY_TYPES: [&str; 4] = ["OrderPlaced", "ItemAdded", "ItemRemoved", "OrderShipped"];

/// `n` projections counting the events of one type per stream.
fn many_config(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "[[projection]]\nname = \"p{i:04}\"\nversion = 1\n\
                 schema = \"CREATE TABLE counts (stream TEXT PRIMARY KEY, n INTEGER NOT NULL)\"\n\
                 deferred_indexes = \"CREATE INDEX IF NOT EXISTS counts_by_n ON counts (n)\"\n\
                 [projection.on.{}]\n\
                 sql = \"INSERT INTO counts VALUES (:_stream_id, 1) ON CONFLICT (stream) DO UPDATE SET n = n + 1\"\n\n",
                MANY_TYPES[i % MANY_TYPES.len()]
            )
        })
        .collect()
}

/// The follower's open files that are projection `name`'s database.
fn open_files_of(pid: u32, names: &[String]) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let file = target.file_name()?.to_str()?.to_owned();
            names
                .iter()
                .any(|name| file == format!("{name}.db"))
                .then_some(file)
        })
        .collect()
}

/// A run of more than `limits::OPEN_PROJECTIONS_MAX` projections parks the
/// files of the others: they are opened for the messages that hold events of
/// their types and closed again, so a following process does not hold them
/// open. Seeded SIGKILLs of such a follower while another process appends
/// lose and repeat nothing: every projection's table equals what the events
/// table says, counted with plain SQL.
#[test]
fn many_projections_park_their_files_and_survive_sigkills() {
    let open_max = projectionist::limits::OPEN_PROJECTIONS_MAX;
    let n = open_max + 44;
    let kills = common::soak(MANY_KILLS_DEFAULT);
    let seed = common::seed(&format!("many-projections crash test, {kills} kills"));
    let mut rng = fastrand::Rng::with_seed(seed);
    let env = Env::new();
    env.demo_log(1_000);
    env.write_config(&many_config(n));
    let mut writer = appender(&env, "w1", 300 + kills * 60, seed);
    for kill in 0..kills {
        let follower = env.command(&["--quiet", "follow"]);
        run_and_kill(
            follower,
            Duration::from_millis(rng.u64(100..1_500)),
            kill,
            seed,
        );
    }
    assert!(wait_exit(&mut writer).success());
    // More than the last follower read, so that the run below ends with
    // batches its parked projections still keep (small batches: many of them).
    let store = Connection::open(env.path("events.db")).unwrap();
    for n in 0..200 {
        let (stream, version, event_type, data) = order_event("late", n / 4, n, &mut rng);
        store
            .execute(
                "INSERT INTO events (stream_id, stream_version, event_type, data) VALUES (?1, ?2, ?3, ?4)",
                (stream, version, event_type, data),
            )
            .unwrap();
    }
    let head = head(&env);
    // One run to the end of the log: every projection finishes at the head.
    let out = env.run(&["--quiet", "--batch-size", "7", "resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let names: Vec<String> = (0..n).map(|i| format!("p{i:04}")).collect();
    for (i, name) in names.iter().enumerate() {
        let expected: Vec<(String, i64)> = store
            .prepare("SELECT stream_id, count(*) FROM events WHERE event_type = ?1 GROUP BY stream_id ORDER BY stream_id")
            .unwrap()
            .query_map([MANY_TYPES[i % MANY_TYPES.len()]], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let projection = Connection::open(env.path(&format!("projections/{name}.db"))).unwrap();
        let counted: Vec<(String, i64)> = projection
            .prepare("SELECT stream, n FROM counts ORDER BY stream")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            expected == counted,
            "after {kills} kills (seed {seed}) {name} differs from the events table"
        );
        assert_eq!(checkpoint(&env, name), head, "{name} (seed {seed})");
        // Its deferred index was built at the head, parked or not.
        assert!(
            env.has_index(name, "counts_by_n"),
            "{name} has no deferred index (seed {seed})"
        );
    }
    // A follower at rest: the kept files are open, the parked ones are not.
    let mut follower = start_follower(&env);
    let (kept, parked) = names.split_at(open_max);
    wait_following(&env, &[kept[0].as_str(), parked[0].as_str()]);
    for _ in 0..3 {
        let open = open_files_of(follower.id(), parked);
        assert!(open.is_empty(), "parked projections held open: {open:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(open_files_of(follower.id(), kept).len(), open_max);
    // Appends of other types: a parked `ItemRemoved` projection's file keeps
    // its checkpoint (it is moved at most every 10 s), and `status`, reading
    // that file in another process, counts what it trails by as no lag.
    let mut late = appender(&env, "late2", 60, seed ^ 9);
    assert!(wait_exit(&mut late).success());
    let new_head = self::head(&env);
    wait_for(&env, &[names[0].as_str()], new_head);
    let rows = status(&env);
    for (i, name) in names.iter().enumerate().skip(open_max) {
        if MANY_TYPES[i % MANY_TYPES.len()] != "ItemRemoved" {
            continue;
        }
        let r = row(&rows, name);
        assert_eq!(r["state"], "following", "{r}");
        assert_eq!(
            r["lag"], 0,
            "{name} has nothing to apply (seed {seed}): {r}"
        );
    }
    signal(&follower, "-TERM");
    assert_eq!(wait_exit(&mut follower).code(), Some(0));
}

/// Two projections: only `placed` handles `OrderPlaced`.
const SPLIT_CONFIG: &str = r#"
[[projection]]
name = "placed"
version = 1
schema = "CREATE TABLE placed (order_id TEXT PRIMARY KEY, seq INTEGER NOT NULL);"
[projection.on.OrderPlaced]
sql = "INSERT INTO placed VALUES (:order_id!text, :_sequence)"

[[projection]]
name = "items"
version = 1
schema = "CREATE TABLE items (n INTEGER NOT NULL); INSERT INTO items VALUES (0);"
[projection.on.ItemAdded]
sql = "UPDATE items SET n = n + :qty!int"
"#;

#[test]
fn a_poison_event_stops_only_its_projection_and_a_fix_recovers_it() {
    let env = Env::new();
    env.demo_log(1_000);
    env.write_config(SPLIT_CONFIG);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut follower = env
        .command(&[
            "--json",
            "follow",
            "--metrics",
            &addr,
            "--max-lag",
            "100000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    wait_for(&env, &["placed", "items"], 1_000);
    wait_following(&env, &["placed", "items"]);
    let (code, body) = http_get(&addr, "/health");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let conn = Connection::open(env.path("events.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    // An order id that is a number, where the projection requires text.
    conn.execute(
        "INSERT INTO events (stream_id, stream_version, event_type, data) VALUES ('bad', 1, 'OrderPlaced', '{\"order_id\": 7}')",
        [],
    )
    .unwrap();
    for version in 2..=4 {
        conn.execute(
            "INSERT INTO events (stream_id, stream_version, event_type, data) VALUES ('bad', ?1, 'ItemAdded', '{\"qty\": 1}')",
            [version],
        )
        .unwrap();
    }
    wait_for(&env, &["items"], 1_004);
    let deadline = Instant::now() + WAIT_MAX;
    let failed = loop {
        let rows = status(&env);
        let placed = row(&rows, "placed").clone();
        if placed["state"] == "failed" {
            assert_eq!(row(&rows, "items")["state"], "following");
            break placed;
        }
        assert!(Instant::now() < deadline, "placed never failed: {placed}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(failed["error_sequence"], 1_001, "{failed}");
    assert_eq!(failed["error_stream"], "bad", "{failed}");
    assert_eq!(failed["error_event_type"], "OrderPlaced", "{failed}");
    assert_eq!(
        checkpoint(&env, "placed"),
        1_000,
        "nothing past the poison event"
    );
    let (code, body) = http_get(&addr, "/health");
    assert_eq!(code, 503, "{body}");
    assert_eq!(body, "placed: failed\n");
    let (code, body) = http_get(&addr, "/metrics");
    assert_eq!(code, 200);
    // Both types are read for both projections through the poison event
    // (valid JSON that `placed`'s statement refuses); after it, `items` alone
    // reads its three events.
    let read_before: i64 = conn
        .query_row(
            "SELECT count(*) FROM events WHERE sequence <= 1001 AND event_type IN ('ItemAdded', 'OrderPlaced')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let processed = format!(
        "projectionist_events_processed_total{{projection=\"items\"}} {}",
        read_before + 3
    );
    for line in [
        processed.as_str(),
        "projectionist_failures_total{projection=\"placed\"} 1",
        "projectionist_failures_total{projection=\"items\"} 0",
        "projectionist_checkpoint{projection=\"items\"} 1004",
        "projectionist_following{projection=\"items\"} 1",
        "projectionist_lag_events{projection=\"items\"} 0",
    ] {
        assert!(body.lines().any(|l| l == line), "no {line:?} in:\n{body}");
    }
    // The engine's latency of the last commit: read to visible, in seconds;
    // a bound for a broken measure, not a speed requirement.
    let latency: f64 = body
        .lines()
        .find_map(|l| {
            l.strip_prefix("projectionist_last_batch_latency_seconds{projection=\"items\"} ")
        })
        .unwrap_or_else(|| panic!("no batch latency for items in:\n{body}"))
        .parse()
        .unwrap();
    assert!(latency > 0.0 && latency < 30.0, "{latency}");
    signal(&follower, "-TERM");
    let exit = wait_exit(&mut follower);
    let out = follower.into_inner().wait_with_output().unwrap();
    assert_eq!(
        exit.code(),
        Some(4),
        "a failed projection: {}",
        stderr(&out)
    );
    let lines = json_lines(&out);
    assert!(
        lines.iter().any(|l| l["event"] == "state"
            && l["projection"] == "placed"
            && l["state"] == "failed"),
        "{lines:?}"
    );
    // The user fixes the event; the next follower recovers the projection.
    conn.execute(
        "UPDATE events SET data = '{\"order_id\": \"7\"}' WHERE sequence = 1001",
        [],
    )
    .unwrap();
    let mut follower = start_follower(&env);
    wait_for(&env, &["placed", "items"], 1_004);
    wait_following(&env, &["placed", "items"]);
    signal(&follower, "-TERM");
    assert_eq!(wait_exit(&mut follower).code(), Some(0));
    let placed: i64 = Connection::open(env.path("projections/placed.db"))
        .unwrap()
        .query_row("SELECT seq FROM placed WHERE order_id = '7'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(placed, 1_001);
}

/// SIGKILLs of a PostgreSQL follower while several connections append, some
/// transactions rolled back, some committing late: afterwards the projections
/// equal a fresh rebuild (no event skipped at a hole, none applied twice).
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn postgres_follower_sigkilled_beside_late_and_rolled_back_appends_loses_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let kills = common::soak(KILLS_DEFAULT);
    let seed = common::seed(&format!("PostgreSQL follow crash test, {kills} kills"));
    let schema = common::pg::Schema::new("follow_kills");
    let url = schema.url();
    let env = Env::new();
    env.write_config(common::DEMO_CONFIG);
    let command = |args: &[&str]| env.command_with(&url, "projections", args);
    let out = command(&["--quiet", "demo", "--events", "500"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let stop = AtomicBool::new(false);
    let mut rng = fastrand::Rng::with_seed(seed);
    std::thread::scope(|scope| {
        let _stop_writers = SetOnDrop(&stop);
        for writer in 0..4u64 {
            let (url, stop) = (&url, &stop);
            let mut rng = fastrand::Rng::with_seed(seed ^ (writer + 1));
            scope.spawn(move || {
                let mut client = postgres::Client::connect(url, postgres::NoTls).unwrap();
                let mut order = 0;
                while !stop.load(Ordering::Relaxed) {
                    let mut tx = client.transaction().unwrap();
                    // The transaction id first, as appends to our layout do.
                    tx.execute("SELECT pg_current_xact_id()", &[]).unwrap();
                    let order_id = format!("w{writer}-{order}");
                    order += 1;
                    let placed = format!(r#"{{"order_id": "{order_id}", "customer_id": "c{}"}}"#, order % 5);
                    let item = format!(
                        r#"{{"order_id": "{order_id}", "customer_id": "c{}", "qty": {}, "unit_price_cents": 100}}"#,
                        order % 5,
                        rng.u8(1..9)
                    );
                    tx.execute(
                        "INSERT INTO events (stream_id, stream_version, event_type, data)
                         VALUES ($1, 1, 'OrderPlaced', $2::text::jsonb), ($1, 2, 'ItemAdded', $3::text::jsonb)",
                        &[&format!("order-{order_id}"), &placed, &item],
                    )
                    .unwrap();
                    match rng.u8(..10) {
                        0 => tx.rollback().unwrap(),
                        1 | 2 => {
                            // Committing late: others commit above it meanwhile.
                            std::thread::sleep(Duration::from_millis(rng.u64(20..150)));
                            tx.commit().unwrap();
                        }
                        _ => tx.commit().unwrap(),
                    }
                    std::thread::sleep(Duration::from_millis(rng.u64(0..10)));
                }
            });
        }
        for kill in 0..kills {
            let batch = rng.u32(1..100).to_string();
            let follower = command(&["--quiet", "--batch-size", &batch, "follow"]);
            run_and_kill(
                follower,
                Duration::from_millis(rng.u64(50..400)),
                kill,
                seed,
            );
        }
        stop.store(true, Ordering::Relaxed);
    });
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let head: i64 = client
        .query_one("SELECT max(sequence) FROM events", &[])
        .unwrap()
        .get(0);
    let rolled_back: i64 = client
        .query_one("SELECT $1 - count(*) FROM events", &[&head])
        .unwrap()
        .get(0);
    eprintln!("{head} sequences drawn, {rolled_back} of them rolled back");
    let mut follower = command(&["--quiet", "follow"])
        .stdout(Stdio::null())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    wait_for(&env, &DEMO, head.cast_unsigned());
    wait_following_by(&command, &DEMO);
    signal(&follower, "-TERM");
    assert_eq!(wait_exit(&mut follower).code(), Some(0));
    assert!(
        digests(&env) == fresh_digests(&env, &url),
        "after {kills} kills (seed {seed}) the follower differs from a rebuild"
    );
}

/// A projection's state as `status --json` in another process reports it.
fn status_of(command: &dyn Fn(&[&str]) -> Command, name: &str) -> String {
    let out = command(&["--json", "status"]).output().unwrap();
    json_lines(&out)
        .iter()
        .find(|r| r["projection"] == name)
        .map(|r| r["state"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

/// A PostgreSQL follower whose connection is killed (as a server restart or a
/// failover would) says `reconnecting`, opens the store again and goes on:
/// the events appended meanwhile are applied once, and SIGTERM exits 0.
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn a_postgres_follower_reconnects_after_its_connection_is_killed() {
    let schema = common::pg::Schema::new("follow_reconnect");
    let url = schema.url();
    let app = format!("pj_follow_reconnect_{}", std::process::id());
    let follower_url = format!("{url}&application_name={app}");
    let env = Env::new();
    env.write_config(common::DEMO_CONFIG);
    let command = |url: &str, args: &[&str]| env.command_with(url, "projections", args);
    let out = command(&url, &["--quiet", "demo", "--events", "300"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let mut follower = command(&follower_url, &["--json", "follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    wait_following_by(&|args: &[&str]| command(&url, args), &DEMO);
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let killed: i64 = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .unwrap()
        .get(0);
    assert!(killed >= 1, "the follower's connections: {killed}");
    for i in 0..20 {
        let mut tx = client.transaction().unwrap();
        common::pg::insert(&mut tx, &format!("late-{i}"));
        tx.commit().unwrap();
    }
    wait_for(&env, &DEMO, 320);
    signal(&follower, "-TERM");
    let exit = wait_exit(&mut follower);
    let out = follower.into_inner().wait_with_output().unwrap();
    assert_eq!(exit.code(), Some(0), "{}", stderr(&out));
    let lines = json_lines(&out);
    assert!(
        lines.iter().any(|l| l["event"] == "reconnecting"),
        "{lines:?}"
    );
    assert!(
        digests(&env) == fresh_digests(&env, &url),
        "the follower equals a rebuild"
    );
}

/// Sends `request` on a new connection and reads the answer's first line
/// (within a deadline); `None` when the server closed without answering.
fn raw_request(addr: &str, request: &[u8]) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT_MAX)).unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    answer.lines().next().map(str::to_owned)
}

/// Issue 23, finding 7: the metrics endpoint survives hostile clients. A
/// request announcing a 1 TB body is refused (413) and the follower lives on
/// (it aborted on an allocation before); a client that stalls in its headers
/// or its body holds nobody else up; SIGTERM with such clients connected
/// exits 0 (it hung for minutes before).
#[test]
fn the_metrics_endpoint_survives_hostile_clients_and_never_delays_shutdown() {
    use std::io::Write;
    let env = Env::new();
    env.demo_log(500);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut follower = env
        .command(&["--quiet", "follow", "--metrics", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    wait_following(&env, &DEMO);
    assert_eq!(http_get(&addr, "/health").0, 200);

    let huge = raw_request(
        &addr,
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\nabc",
    );
    assert!(
        huge.as_deref().is_some_and(|line| line.contains("413")),
        "{huge:?}"
    );
    assert!(follower.try_wait().unwrap().is_none(), "the follower died");

    // Stalled clients, left open: one in its headers, one in its body.
    let mut stalled_headers = std::net::TcpStream::connect(&addr).unwrap();
    stalled_headers
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut stalled_body = std::net::TcpStream::connect(&addr).unwrap();
    stalled_body
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
        .unwrap();
    let (code, body) = http_get(&addr, "/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("projectionist_checkpoint"), "{body}");

    signal(&follower, "-TERM");
    let exit = wait_exit(&mut follower);
    let out = follower.into_inner().wait_with_output().unwrap();
    assert_eq!(exit.code(), Some(0), "{}", stderr(&out));
    drop((stalled_headers, stalled_body));
}

/// Issue 23, finding 2: a projection that cannot be opened at a config
/// reload (a directory stands where its shadow goes) is shown failed
/// everywhere — `/health` 503 naming it, the failure counted, `status` in
/// another process `failed` with the cause and exit 4 — while the other
/// follows on; once the obstacle is removed, the follower tries again, builds
/// it and publishes it, and all is healthy.
#[test]
fn a_projection_blocked_at_reload_is_failed_visibly_and_recovers_when_unblocked() {
    let env = Env::new();
    env.demo_log(2_000);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut follower = env
        .command(&["--quiet", "follow", "--metrics", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    wait_following(&env, &DEMO);
    let obstacle = env.path("projections/.order_summary.shadow.db");
    std::fs::create_dir(&obstacle).unwrap();
    let changed = common::DEMO_CONFIG.replacen("version = 1", "version = 2", 1);
    assert_ne!(changed, common::DEMO_CONFIG);
    env.write_config(&changed);
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        let (code, body) = http_get(&addr, "/health");
        if code == 503 && body.contains("order_summary: failed") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/health never failed: {code} {body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, text) = http_get(&addr, "/metrics");
    assert_eq!(
        common::metric(&text, "projectionist_failures_total", "order_summary"),
        Some(1.0),
        "{text}"
    );
    let out = env.run(&["--json", "status"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let rows = status(&env);
    let blocked = row(&rows, "order_summary");
    assert_eq!(blocked["state"], "failed", "{blocked}");
    assert!(
        blocked["error"]
            .as_str()
            .is_some_and(|e| e.contains("shadow")),
        "{blocked}"
    );
    assert_eq!(row(&rows, "customer_stats")["state"], "following");

    std::fs::remove_dir(&obstacle).unwrap();
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        let rows = status(&env);
        let fixed = row(&rows, "order_summary");
        if fixed["state"] == "following" && fixed["built_version"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {fixed}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(http_get(&addr, "/health"), (200, "ok\n".to_owned()));
    signal(&follower, "-TERM");
    assert_eq!(wait_exit(&mut follower).code(), Some(0));
}

/// Issue 23: a projection that stops advancing while the log holds events
/// for it is `stalled`, and `/health` names it, after `--stall-after`; here
/// another connection holds its file's write lock (well within the busy
/// timeout). Once the lock goes, it catches up and all is healthy; nothing is
/// lost.
#[test]
fn a_projection_that_does_not_advance_is_stalled_and_health_names_it() {
    use projectionist::rusqlite::Connection;
    let env = Env::new();
    env.demo_log(1_000);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut follower = env
        .command(&[
            "--quiet",
            "follow",
            "--metrics",
            &addr,
            "--stall-after",
            "1s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    wait_following(&env, &DEMO);
    assert_eq!(http_get(&addr, "/health").0, 200);
    let blocker = Connection::open(env.path("projections/order_summary.db")).unwrap();
    // A commit of the follower's may be under way: wait for it, then hold.
    blocker.busy_timeout(Duration::from_secs(5)).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    Connection::open(env.path("events.db"))
        .unwrap()
        .execute(
            "INSERT INTO events (stream_id, stream_version, event_type, data) \
             VALUES ('order-stall', 1, 'OrderPlaced', '{\"order_id\": \"stall\", \"customer_id\": \"c\"}')",
            [],
        )
        .unwrap();
    let deadline = Instant::now() + WAIT_MAX;
    let body = loop {
        let (code, body) = http_get(&addr, "/health");
        if code == 503 && body.contains("order_summary: stalled") {
            break body;
        }
        assert!(Instant::now() < deadline, "never stalled: {code} {body}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!body.contains("customer_stats"), "{body}");
    // `status` in another process says the same, and exits 4.
    let out = env.run(&["--json", "status"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let rows = json_lines(&out);
    let stalled = row(&rows, "order_summary");
    assert_eq!(stalled["state"], "stalled", "{stalled}");
    assert!(
        stalled["error"]
            .as_str()
            .is_some_and(|e| e.contains("no progress")),
        "{stalled}"
    );
    assert_eq!(row(&rows, "customer_stats")["state"], "following");
    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        let (code, body) = http_get(&addr, "/health");
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {code} {body}");
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&follower, "-TERM");
    assert_eq!(wait_exit(&mut follower).code(), Some(0));
    assert!(digests(&env) == fresh_digests(&env, "events.db"));
}
