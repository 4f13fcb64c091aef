//! Snapshots and seeding through the binary: a snapshot taken while a
//! follower runs and events are appended seeds a second directory whose
//! projections, caught up, equal a fresh rebuild; a damaged, other-definition
//! or other-store snapshot is refused with why, and the projection is built
//! from the log instead.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{DEMO_CONFIG, Env, Reaped, sigterm, stderr};
use projectionist::rusqlite::Connection;
use projectionist::{DigestScope, NewEvent, SqliteEventStore, projection_digest};

fn digest_in(env: &Env, dir: &str, name: &str) -> String {
    let conn = Connection::open(env.path(&format!("{dir}/{name}.db"))).unwrap();
    projection_digest(&conn, DigestScope::All).unwrap()
}

fn append_orders(env: &Env, tag: &str, n: u64) {
    let store = SqliteEventStore::create(env.path("events.db")).unwrap();
    for i in 0..n {
        store
            .append(
                &format!("{tag}-{i}"),
                0,
                &[NewEvent::json(
                    "OrderPlaced",
                    &serde_json::json!({"order_id": format!("{tag}-{i}"), "customer_id": "c"}),
                )
                .unwrap()],
            )
            .unwrap();
    }
}

#[test]
fn a_snapshot_seeds_another_directory_and_bad_ones_are_refused() {
    let env = Env::new();
    env.demo_log(3_000);
    let follower = Reaped::new(
        env.command(&["--quiet", "follow"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    while !env.path("projections/.order_summary.follower").exists() {
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(20));
    }
    append_orders(&env, "before", 50);
    let out = env.run(&["snapshot", "--to", "snaps", "--keep", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("order_summary: snapshot at checkpoint"),
        "{}",
        stderr(&out)
    );
    append_orders(&env, "after", 30);
    let out = env.run(&["snapshot", "--to", "snaps", "--keep", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    sigterm(&follower);
    drop(follower);
    // Snapshots are single files: nothing else is left beside them.
    let strays: Vec<String> = std::fs::read_dir(env.path("snaps"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.ends_with(".db") && !name.ends_with(".json"))
        .collect();
    assert!(strays.is_empty(), "{strays:?}");
    append_orders(&env, "later", 20);

    // Seeded, then caught up: equal to a fresh rebuild.
    let out = env
        .command_with("events.db", "seeded", &["resume", "--seed-from", "snaps"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("order_summary: restored from the snapshot at checkpoint"),
        "{}",
        stderr(&out)
    );
    let fresh = env
        .command_with("events.db", "fresh", &["--quiet", "rebuild"])
        .output()
        .unwrap();
    assert!(fresh.status.success(), "{}", stderr(&fresh));
    for name in common::DEMO_PROJECTIONS {
        assert_eq!(
            digest_in(&env, "seeded", name),
            digest_in(&env, "fresh", name),
            "{name}"
        );
    }

    // A flipped byte: refused, and built from the log instead.
    let snapshot = std::fs::read_dir(env.path("snaps"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("order_summary.") && name.ends_with(".db")
        })
        .max()
        .unwrap();
    let mut bytes = std::fs::read(&snapshot).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&snapshot, bytes).unwrap();
    let out = env
        .command_with(
            "events.db",
            "damaged",
            &["resume", "order_summary", "--seed-from", "snaps"],
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("checksum does not match"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        digest_in(&env, "damaged", "order_summary"),
        digest_in(&env, "fresh", "order_summary")
    );

    // Another definition: refused.
    env.write_config(&DEMO_CONFIG.replacen("version = 1", "version = 2", 1));
    let out = env
        .command_with(
            "events.db",
            "redefined",
            &["resume", "order_summary", "--seed-from", "snaps"],
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("built from another definition"),
        "{}",
        stderr(&out)
    );
    env.write_config(DEMO_CONFIG);

    // Another store: refused.
    let other = env
        .command_with(
            "other.db",
            "other-demo",
            &["--quiet", "demo", "--events", "200", "--seed", "7"],
        )
        .output()
        .unwrap();
    assert!(other.status.success(), "{}", stderr(&other));
    env.write_config(DEMO_CONFIG);
    let out = env
        .command_with(
            "other.db",
            "foreign",
            &["resume", "customer_stats", "--seed-from", "snaps"],
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("another event store"),
        "{}",
        stderr(&out)
    );
    // --keep 2: two snapshots per projection at most.
    let kept = std::fs::read_dir(env.path("snaps"))
        .unwrap()
        .filter(|e| {
            let name = e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .into_owned();
            name.starts_with("customer_stats.") && name.ends_with(".json")
        })
        .count();
    assert_eq!(kept, 2);
}

/// A follower with `--snapshot-to` takes snapshots every `--snapshot-every`,
/// keeps `--snapshot-keep` of each, and says their time and size in its
/// metrics.
#[test]
fn a_follower_takes_periodic_snapshots_and_reports_them_in_metrics() {
    let env = Env::new();
    env.demo_log(1_000);
    let addr = format!("127.0.0.1:{}", common::free_port());
    let follower = Reaped::new(
        env.command(&[
            "--quiet",
            "follow",
            "--metrics",
            &addr,
            "--snapshot-to",
            "periodic",
            "--snapshot-every",
            "100ms",
            "--snapshot-keep",
            "2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let manifests = |name: &str| {
        std::fs::read_dir(env.path("periodic"))
            .map(|entries| {
                entries
                    .filter(|e| {
                        let file = e
                            .as_ref()
                            .unwrap()
                            .file_name()
                            .to_string_lossy()
                            .into_owned();
                        file.starts_with(&format!("{name}.")) && file.ends_with(".json")
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    let started = Instant::now();
    let mut seen_bytes = None;
    while manifests("order_summary") == 0 || seen_bytes.is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no snapshot taken"
        );
        std::thread::sleep(Duration::from_millis(50));
        let (_, text) = common::http_get(&addr, "/metrics");
        seen_bytes = common::metric(&text, "projectionist_snapshot_bytes", "order_summary");
    }
    assert!(seen_bytes.unwrap() > 0.0);
    // New events make new snapshots; only two are kept.
    append_orders(&env, "more", 5);
    let started = Instant::now();
    while projectionist_runner::snapshot::manifests(&env.path("periodic"), "order_summary")
        .unwrap()
        .first()
        .is_none_or(|m| m.checkpoint < 1_005)
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no newer snapshot"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(manifests("order_summary") <= 2);
    sigterm(&follower);
    let mut follower = follower;
    assert!(follower.wait().unwrap().success());
}

/// `--to` and `--seed-from` take a PostgreSQL URL: the snapshots go into the
/// database (in chunks) and a second directory is seeded from there.
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn snapshots_go_to_postgres_and_seed_from_there() {
    let url = std::env::var("PROJECTIONIST_TEST_PG_URL").expect("PROJECTIONIST_TEST_PG_URL");
    let env = Env::new();
    env.demo_log(2_000);
    // This test's rows only: the demo's projection names, cleared first.
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS projectionist;
             DELETE FROM projectionist.snapshots WHERE projection IN ('order_summary', 'customer_stats');
             DELETE FROM projectionist.snapshot_chunks WHERE projection IN ('order_summary', 'customer_stats');",
        )
        .unwrap_or(());
    let out = env.run(&["snapshot", "--to", &url, "--keep", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    append_orders(&env, "after", 10);
    let out = env
        .command_with("events.db", "seeded", &["resume", "--seed-from", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("order_summary: restored from the snapshot at checkpoint 2000"),
        "{}",
        stderr(&out)
    );
    let fresh = env
        .command_with("events.db", "fresh", &["--quiet", "rebuild"])
        .output()
        .unwrap();
    assert!(fresh.status.success(), "{}", stderr(&fresh));
    for name in common::DEMO_PROJECTIONS {
        assert_eq!(
            digest_in(&env, "seeded", name),
            digest_in(&env, "fresh", name),
            "{name}"
        );
    }
}
