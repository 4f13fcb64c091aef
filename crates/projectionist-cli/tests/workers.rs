//! Several `projectionist worker` processes sharing six projections of a
//! PostgreSQL store, rebuilding once (`--exit-when-done`) or following under
//! continuous appends: one is SIGKILLed, another SIGSTOPped past its lease.
//! Their projections are taken over, every projection ends equal (by digest)
//! to a single-process rebuild, and the paused worker, once continued, commits
//! nothing more under its old lease. Needs `PROJECTIONIST_TEST_PG_URL`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

mod common;
use common::pg::Schema;
use common::{DEMO_CONFIG, Reaped, SetOnDrop};
use projectionist::rusqlite::Connection;
use projectionist::{DigestScope, projection_digest};

const LEASE_MS: u64 = 1_500;

/// Six projections: the demo's two, three times under other names.
fn six_projections() -> String {
    let mut config = String::new();
    for copy in 1..=3 {
        config.push_str(
            &DEMO_CONFIG
                .replace(
                    "name = \"order_summary\"",
                    &format!("name = \"order_summary_{copy}\""),
                )
                .replace(
                    "name = \"customer_stats\"",
                    &format!("name = \"customer_stats_{copy}\""),
                ),
        );
        config.push('\n');
    }
    config
}

/// A schema of its own holding a demo log of `events` events, and a directory
/// whose `projectionist.toml` declares six projections.
fn six_projections_over_a_log(test: &str, events: u64) -> (Schema, tempfile::TempDir) {
    let schema = Schema::new(test);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("projectionist.toml"), six_projections()).unwrap();
    let url = schema.url();
    let events = events.to_string();
    let args = [
        "--quiet", "--store", &url, "--dir", "demo", "demo", "--events", &events,
    ];
    let status = projectionist(tmp.path(), &args).status().unwrap();
    assert!(status.success());
    (schema, tmp)
}

fn projectionist(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_projectionist"));
    cmd.current_dir(dir).args(args);
    cmd
}

fn digest(file: &Path) -> String {
    projection_digest(
        &Connection::open(file).unwrap(),
        DigestScope::ProjectionTables,
    )
    .unwrap()
}

/// The checkpoint in a projection file; 0 while there is no file (read-only:
/// a test must not create a file where a worker will).
fn checkpoint_of(file: &Path, name: &str) -> u64 {
    let flags = projectionist::rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
    Connection::open_with_flags(file, flags)
        .ok()
        .and_then(|conn| projectionist::SqliteCheckpoint::load_in(&conn, name).ok())
        .unwrap_or(0)
}

/// (projection, owner, epoch, live, done) rows of the lease table.
fn leases(client: &mut Client) -> Vec<(String, String, i64, bool, bool)> {
    client
        .query("SELECT projection, owner, epoch, expires_at > now(), done_hash IS NOT NULL FROM projection_leases", &[])
        .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))).collect())
        // The table appears when the first worker starts.
        .unwrap_or_default()
}

fn signal(child: &Child, sig: &str) {
    assert!(
        Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
}

/// Waits until `worker` holds a live, unfinished lease; returns its projection.
fn wait_for_live_lease(client: &mut Client, worker: &str, deadline: Instant) -> (String, i64) {
    loop {
        if let Some((p, _, epoch, _, _)) = leases(client)
            .into_iter()
            .find(|(_, o, _, live, done)| o == worker && *live && !done)
        {
            return (p, epoch);
        }
        assert!(
            Instant::now() < deadline,
            "{worker} never held a lease: {:?}",
            leases(client)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn three_workers_share_six_projections_through_kill_and_pause() {
    // The log, loaded into PostgreSQL by the demo, and the single-process reference.
    let (schema, tmp) = six_projections_over_a_log("workers", 30_000);
    let url = schema.url();
    let root = tmp.path();
    let status = projectionist(
        root,
        &["--quiet", "--store", &url, "--dir", "reference", "rebuild"],
    )
    .status()
    .unwrap();
    assert!(status.success());

    let lease_ms = LEASE_MS.to_string();
    let spawn = |id: &str| {
        projectionist(
            root,
            &[
                "--json",
                "--batch-size",
                "20",
                "--store",
                &url,
                "--dir",
                id,
                "worker",
                "--worker-id",
                id,
                "--lease-ms",
                &lease_ms,
                "--exit-when-done",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map(Reaped::new)
        .unwrap()
    };
    let mut workers: Vec<Reaped> = ["w0", "w1", "w2"].iter().map(|id| spawn(id)).collect();
    let mut monitor = Client::connect(&url, NoTls).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);

    // SIGKILL w0 while it rebuilds a projection.
    let (killed_projection, _) = wait_for_live_lease(&mut monitor, "w0", deadline);
    signal(&workers[0], "-KILL");
    workers[0].wait().unwrap();

    // SIGSTOP w1 while it rebuilds; wait until its projection is taken over.
    let (paused_projection, paused_epoch) = wait_for_live_lease(&mut monitor, "w1", deadline);
    signal(&workers[1], "-STOP");
    let paused_file = root.join("w1").join(format!("{paused_projection}.db"));
    let mut epochs_seen: HashMap<String, i64> = HashMap::new();
    let new_owner = loop {
        let rows = leases(&mut monitor);
        for (p, _, epoch, _, _) in &rows {
            let last = epochs_seen.entry(p.clone()).or_insert(*epoch);
            assert!(*epoch >= *last, "epoch of {p} went back");
            *last = *epoch;
        }
        if let Some((_, owner, ..)) = rows
            .iter()
            .find(|(p, _, epoch, _, _)| *p == paused_projection && *epoch > paused_epoch)
        {
            break owner.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{paused_projection} was never taken over"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // Wait until the new owner has committed work of its own (in its shadow
    // or its live file) or finished, then wake the paused worker.
    let owner_dir = root.join(&new_owner);
    loop {
        let progressed = [
            owner_dir.join(format!("{paused_projection}.db")),
            owner_dir.join(format!(".{paused_projection}.shadow.db")),
        ]
        .iter()
        .any(|file| checkpoint_of(file, &paused_projection) > 0);
        let done = leases(&mut monitor)
            .iter()
            .any(|(p, _, _, _, done)| *p == paused_projection && *done);
        if progressed || done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{new_owner} never got going on {paused_projection}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let checkpoint_when_paused = checkpoint_of(&paused_file, &paused_projection);
    signal(&workers[1], "-CONT");

    let mut outputs = HashMap::new();
    for (id, child) in ["w1", "w2"].iter().zip(workers.drain(1..)) {
        let out = child.into_inner().wait_with_output().unwrap();
        assert!(out.status.success(), "{id} exited {}", out.status);
        outputs.insert(*id, String::from_utf8_lossy(&out.stdout).into_owned());
    }
    // The paused worker committed nothing after it woke: its lease was fenced.
    assert_eq!(
        checkpoint_of(&paused_file, &paused_projection),
        checkpoint_when_paused,
        "the paused worker committed after losing its lease"
    );
    let fenced = outputs["w1"]
        .lines()
        .any(|l| l.contains("\"fenced\"") && l.contains(&format!("\"{paused_projection}\"")));
    assert!(fenced, "w1 reported the fence: {}", outputs["w1"]);

    // Every projection is done once, by a live worker, equal to the reference.
    let final_rows = leases(&mut monitor);
    assert_eq!(final_rows.len(), 6);
    let mut completed_by: HashMap<String, String> = HashMap::new();
    for (id, out) in &outputs {
        for line in out.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if v["event"] == "completed" {
                completed_by.insert(
                    v["projection"].as_str().unwrap().to_owned(),
                    (*id).to_owned(),
                );
            }
        }
    }
    for (projection, owner, _, _, done) in &final_rows {
        assert!(done, "{projection} is done");
        assert_eq!(
            completed_by.get(projection),
            Some(owner),
            "{projection} completed by its final owner"
        );
        let file: PathBuf = root.join(owner).join(format!("{projection}.db"));
        let reference = root.join("reference").join(format!("{projection}.db"));
        assert_eq!(
            digest(&file),
            digest(&reference),
            "{projection} built by {owner} equals the reference"
        );
    }
    assert_ne!(
        completed_by.get(&killed_projection).map(String::as_str),
        Some("w0")
    );
}

/// Following workers (no `--exit-when-done`) keep six projections current
/// while a connection appends (some transactions rolled back): a SIGKILLed
/// worker's projections are claimed by the others within the lease plus a
/// little, even while they are busy; a worker SIGSTOPped past its lease is
/// fenced when it wakes, says so and commits nothing; in the end every
/// projection, in its final owner's directory, equals a single-process
/// rebuild of the final log.
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn following_workers_keep_six_projections_current_through_kill_and_pause() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (schema, tmp) = six_projections_over_a_log("following", 5_000);
    let url = schema.url();
    let root = tmp.path();

    let lease_ms = LEASE_MS.to_string();
    let spawn = |id: &str| {
        projectionist(
            root,
            &[
                "--json",
                "--batch-size",
                "50",
                "--store",
                &url,
                "--dir",
                id,
                "worker",
                "--worker-id",
                id,
                "--lease-ms",
                &lease_ms,
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(Reaped::new)
        .unwrap()
    };
    let stopped = AtomicBool::new(false);
    let mut monitor = Client::connect(&url, NoTls).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let (outputs, paused_projection, final_owners) = std::thread::scope(|scope| {
        let _stop_appending = SetOnDrop(&stopped);
        let appender = scope.spawn(|| {
            let mut client = Client::connect(&url, NoTls).unwrap();
            let mut order = 0u64;
            while !stopped.load(Ordering::Relaxed) {
                let mut tx = client.transaction().unwrap();
                tx.execute("SELECT pg_current_xact_id()", &[]).unwrap();
                let id = format!("live-{order}");
                let data = format!(r#"{{"order_id": "{id}", "customer_id": "c{}"}}"#, order % 9);
                tx.execute(
                    "INSERT INTO events (stream_id, stream_version, event_type, data)
                         VALUES ($1, 1, 'OrderPlaced', $2::text::jsonb)",
                    &[&format!("order-{id}"), &data],
                )
                .unwrap();
                if order.is_multiple_of(13) {
                    tx.rollback().unwrap();
                } else {
                    tx.commit().unwrap();
                }
                order += 1;
                std::thread::sleep(Duration::from_millis(3));
            }
        });
        let mut workers: Vec<Reaped> = ["w0", "w1", "w2"].iter().map(|id| spawn(id)).collect();
        let live_owners = |monitor: &mut Client| -> HashMap<String, (String, i64)> {
            leases(monitor)
                .into_iter()
                .filter(|(_, _, _, live, _)| *live)
                .map(|(p, o, e, _, _)| (p, (o, e)))
                .collect()
        };
        // Every projection held, and each worker holding some.
        let owners = loop {
            let owners = live_owners(&mut monitor);
            if owners.len() == 6
                && owners.values().any(|(o, _)| o == "w0")
                && owners.values().any(|(o, _)| o == "w1")
            {
                break owners;
            }
            assert!(
                Instant::now() < deadline,
                "projections never shared: {owners:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };

        // SIGKILL w0: its projections are claimed by the others.
        signal(&workers[0], "-KILL");
        let killed_at = Instant::now();
        workers[0].wait().unwrap();
        let orphans: Vec<String> = owners
            .iter()
            .filter(|(_, (o, _))| o == "w0")
            .map(|(p, _)| p.clone())
            .collect();
        loop {
            let now = live_owners(&mut monitor);
            if orphans
                .iter()
                .all(|p| now.get(p).is_some_and(|(o, _)| o != "w0"))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "w0's projections never taken over"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let takeover = killed_at.elapsed();
        eprintln!(
            "w0's {} projections taken over {takeover:?} after the SIGKILL (lease {LEASE_MS} ms)",
            orphans.len()
        );
        assert!(
            takeover < Duration::from_millis(LEASE_MS + 3_000),
            "takeover took {takeover:?}"
        );

        // SIGSTOP w1 past its lease; wait until one of its projections moves on.
        let now = live_owners(&mut monitor);
        let (paused_projection, (_, paused_epoch)) = now
            .iter()
            .find(|(_, (o, _))| o == "w1")
            .map(|(p, oe)| (p.clone(), oe.clone()))
            .expect("w1 holds a projection");
        signal(&workers[1], "-STOP");
        loop {
            let now = live_owners(&mut monitor);
            if now
                .get(&paused_projection)
                .is_some_and(|(_, e)| *e > paused_epoch)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{paused_projection} never taken over"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let paused_file = root.join("w1").join(format!("{paused_projection}.db"));
        let checkpoint_when_paused = checkpoint_of(&paused_file, &paused_projection);
        signal(&workers[1], "-CONT");
        // Awake, w1 holds a stale epoch: it must commit nothing to the
        // projection until it claims it again (a new epoch; the workers
        // rebalance once it is back, so it may).
        let watch = Instant::now();
        while watch.elapsed() < Duration::from_millis(1_000) {
            let reclaimed = leases(&mut monitor)
                .iter()
                .any(|(p, o, e, _, _)| *p == paused_projection && o == "w1" && *e > paused_epoch);
            if reclaimed {
                break;
            }
            assert_eq!(
                checkpoint_of(&paused_file, &paused_projection),
                checkpoint_when_paused,
                "the paused worker committed after losing its lease"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Appends go on for a second after the wake-up, then stop; the head
        // is read once the appender's last transaction has ended.
        std::thread::sleep(Duration::from_millis(1_000).saturating_sub(watch.elapsed()));
        stopped.store(true, Ordering::Relaxed);
        appender.join().unwrap();

        // Every projection reaches the head in its owner's directory.
        let head: i64 = monitor
            .query_one("SELECT max(sequence) FROM events", &[])
            .unwrap()
            .get(0);
        let final_owners = loop {
            let now = live_owners(&mut monitor);
            let done = now.len() == 6
                && now.iter().all(|(p, (o, _))| {
                    checkpoint_of(&root.join(o).join(format!("{p}.db")), p) == head.cast_unsigned()
                });
            if done {
                break now;
            }
            assert!(
                Instant::now() < deadline,
                "never all at the head {head}: {now:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut outputs = HashMap::new();
        for (id, child) in ["w1", "w2"].iter().zip(workers.drain(1..)) {
            signal(&child, "-TERM");
            let out = child.into_inner().wait_with_output().unwrap();
            assert!(out.status.success(), "{id} exited {}", out.status);
            outputs.insert(*id, String::from_utf8_lossy(&out.stdout).into_owned());
        }
        (outputs, paused_projection, final_owners)
    });
    let fenced = outputs["w1"]
        .lines()
        .any(|l| l.contains("\"fenced\"") && l.contains(&format!("\"{paused_projection}\"")));
    assert!(fenced, "w1 reported the fence: {}", outputs["w1"]);
    let status = projectionist(
        root,
        &["--quiet", "--store", &url, "--dir", "reference", "rebuild"],
    )
    .status()
    .unwrap();
    assert!(status.success());
    // The owners when every projection was at the head (on SIGTERM the
    // workers release their leases, and one stopping after the other may take
    // a projection over for its last moments, from an older copy).
    for (projection, (owner, _)) in final_owners {
        let file = root.join(&owner).join(format!("{projection}.db"));
        let reference = root.join("reference").join(format!("{projection}.db"));
        assert!(
            digest(&file) == digest(&reference),
            "{projection} followed by {owner} equals a rebuild"
        );
    }
}

/// A following worker whose PostgreSQL connections are killed (as a server
/// restart or a failover would) says so, reconnects with backoff, and goes on
/// following: the events appended meanwhile reach every projection once.
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn a_following_worker_reconnects_after_its_connections_are_killed() {
    let (schema, tmp) = six_projections_over_a_log("reconnect", 2_000);
    let root = tmp.path();
    let app = format!("pj_reconnect_{}", std::process::id());
    let url = format!("{}&application_name={app}", schema.url());
    let lease_ms = LEASE_MS.to_string();
    let worker = projectionist(
        root,
        &[
            "--json",
            "--store",
            &url,
            "--dir",
            "w",
            "worker",
            "--worker-id",
            "w",
            "--lease-ms",
            &lease_ms,
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .map(Reaped::new)
    .unwrap();
    let names: Vec<String> = ["order_summary", "customer_stats"]
        .iter()
        .flat_map(|n| (1..=3).map(move |c| format!("{n}_{c}")))
        .collect();
    let at_head = |head: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !names
            .iter()
            .all(|n| checkpoint_of(&root.join("w").join(format!("{n}.db")), n) == head)
        {
            assert!(Instant::now() < deadline, "the worker never reached {head}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    at_head(2_000);
    let mut monitor = Client::connect(&schema.url(), NoTls).unwrap();
    let killed: i64 = monitor
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .unwrap()
        .get(0);
    assert!(
        killed >= 2,
        "the worker's store and lease connections: {killed}"
    );
    for i in 0..50 {
        let mut tx = monitor.transaction().unwrap();
        tx.execute("SELECT pg_current_xact_id()", &[]).unwrap();
        let data = format!(r#"{{"order_id": "late-{i}", "customer_id": "c1"}}"#);
        tx.execute(
            "INSERT INTO events (stream_id, stream_version, event_type, data)
             VALUES ($1, 1, 'OrderPlaced', $2::text::jsonb)",
            &[&format!("order-late-{i}"), &data],
        )
        .unwrap();
        tx.commit().unwrap();
    }
    at_head(2_050);
    signal(&worker, "-TERM");
    let out = worker.into_inner().wait_with_output().unwrap();
    assert!(out.status.success(), "worker exited {}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("\"reconnecting\""), "{stdout}");
    let url = schema.url();
    let status = projectionist(
        root,
        &["--quiet", "--store", &url, "--dir", "reference", "rebuild"],
    )
    .status()
    .unwrap();
    assert!(status.success());
    for name in &names {
        let file = root.join("w").join(format!("{name}.db"));
        let reference = root.join("reference").join(format!("{name}.db"));
        assert!(
            digest(&file) == digest(&reference),
            "{name} equals a rebuild"
        );
    }
}

/// The demo config with `order_summary` at `version`: every added item costs
/// `version - 1` cents more, so each version's totals differ.
fn demo_config_version(version: u32) -> String {
    DEMO_CONFIG
        .replacen("version = 1", &format!("version = {version}"), 1)
        .replacen(
            "total_cents = total_cents + :qty!int * :unit_price_cents!int",
            &format!(
                "total_cents = total_cents + :qty!int * :unit_price_cents!int + {}",
                version - 1
            ),
            1,
        )
}

/// `SELECT count(*), total(total_cents)` of the orders projection in `file`.
fn orders_answer(conn: &Connection) -> String {
    conn.query_row("SELECT count(*), total(total_cents) FROM orders", [], |r| {
        Ok(format!("{} {}", r.get::<_, i64>(0)?, r.get::<_, f64>(1)?))
    })
    .unwrap_or_else(|e| format!("error: {e}"))
}

/// A changed definition reaches a worker's projection without downtime: in
/// batch mode (`--exit-when-done`) and following, the worker builds the new
/// version in a shadow under its lease and publishes it; a reader in this
/// process, holding one connection to the live file, sees only whole versions;
/// the replaced version is kept; the result equals a single-process rebuild.
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn a_worker_rebuilds_a_changed_projection_beside_the_live_file() {
    let schema = Schema::new("worker_shadow");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let url = schema.url();
    std::fs::write(root.join("projectionist.toml"), DEMO_CONFIG).unwrap();
    let demo = [
        "--quiet", "--store", &url, "--dir", "p", "demo", "--events", "20000",
    ];
    assert!(projectionist(root, &demo).status().unwrap().success());
    let live = root.join("p/order_summary.db");
    let mut replaced = digest(&live);
    for version in [2, 3] {
        std::fs::write(
            root.join("projectionist.toml"),
            demo_config_version(version),
        )
        .unwrap();
        let reference = format!("reference-{version}");
        let rebuild = ["--quiet", "--store", &url, "--dir", &reference, "rebuild"];
        assert!(projectionist(root, &rebuild).status().unwrap().success());
        let expected = digest(&root.join(format!("{reference}/order_summary.db")));
        let before = orders_answer(&Connection::open(&live).unwrap());
        let stop = std::sync::atomic::AtomicBool::new(false);
        let answers = std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let conn = Connection::open_with_flags(
                    &live,
                    projectionist::rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
                .unwrap();
                conn.busy_timeout(Duration::from_secs(10)).unwrap();
                let mut answers = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    answers.push(orders_answer(&conn));
                    std::thread::sleep(Duration::from_millis(2));
                }
                answers
            });
            let _stop_reader = SetOnDrop(&stop);
            let mut args = vec![
                "--quiet",
                "--store",
                &url,
                "--dir",
                "p",
                "worker",
                "--worker-id",
                "w1",
            ];
            if version == 2 {
                args.push("--exit-when-done");
                assert!(projectionist(root, &args).status().unwrap().success());
            } else {
                // Following: wait for the publish, then stop the worker.
                let worker = projectionist(root, &args).spawn().map(Reaped::new).unwrap();
                let deadline = Instant::now() + Duration::from_secs(60);
                while digest(&live) != expected {
                    assert!(
                        Instant::now() < deadline,
                        "the following worker never published v{version}"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                signal(&worker, "-TERM");
                assert!(worker.into_inner().wait().unwrap().success());
            }
            drop(_stop_reader);
            reader.join().unwrap()
        });
        let after = orders_answer(&Connection::open(&live).unwrap());
        assert_ne!(before, after);
        let partial: Vec<&String> = answers
            .iter()
            .filter(|a| **a != before && **a != after)
            .collect();
        assert!(
            partial.is_empty(),
            "v{version}: {} of {} reads partial: {:?}",
            partial.len(),
            answers.len(),
            &partial[..partial.len().min(3)]
        );
        assert!(
            answers.len() > 20,
            "v{version}: only {} reads",
            answers.len()
        );
        assert_eq!(digest(&live), expected, "v{version}");
        // The replaced version is kept, whole.
        assert_eq!(
            digest(&root.join("p/.order_summary.previous.db")),
            replaced,
            "v{version}"
        );
        assert!(!root.join("p/.order_summary.shadow.db").exists());
        replaced = expected;
    }
}

/// A following worker restores the projections it claims that are missing
/// in its directory from snapshots (`--seed-from`), then catches them up:
/// equal to the projections the snapshots were taken from.
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn a_worker_seeds_the_projections_it_claims_from_snapshots() {
    let (schema, tmp) = six_projections_over_a_log("seed", 2_000);
    let root = tmp.path();
    let url = schema.url();
    let built = projectionist(
        root,
        &["--quiet", "--store", &url, "--dir", "built", "rebuild"],
    )
    .status()
    .unwrap();
    assert!(built.success());
    let snapped = projectionist(
        root,
        &[
            "--quiet", "--store", &url, "--dir", "built", "snapshot", "--to", "snaps",
        ],
    )
    .status()
    .unwrap();
    assert!(snapped.success());
    let lease_ms = LEASE_MS.to_string();
    let mut worker = projectionist(
        root,
        &[
            "--json",
            "--store",
            &url,
            "--dir",
            "w",
            "worker",
            "--worker-id",
            "w",
            "--lease-ms",
            &lease_ms,
            "--seed-from",
            "snaps",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .map(Reaped::new)
    .unwrap();
    let mut lines = BufReader::new(worker.stdout.take().unwrap()).lines();
    let mut seeded = std::collections::BTreeSet::new();
    while seeded.len() < 6 {
        let line = lines.next().expect("the worker's output").unwrap();
        let value: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if value["event"] == "seeded" {
            assert_eq!(value["checkpoint"], 2_000, "{value}");
            seeded.insert(value["projection"].as_str().unwrap().to_owned());
        }
    }
    let names: Vec<String> = seeded.into_iter().collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !names
        .iter()
        .all(|n| checkpoint_of(&root.join("w").join(format!("{n}.db")), n) == 2_000)
    {
        assert!(Instant::now() < deadline, "the worker never followed");
        std::thread::sleep(Duration::from_millis(20));
    }
    for name in &names {
        assert_eq!(
            digest(&root.join("w").join(format!("{name}.db"))),
            digest(&root.join("built").join(format!("{name}.db"))),
            "{name}"
        );
    }
}
