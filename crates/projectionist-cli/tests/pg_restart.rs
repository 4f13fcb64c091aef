//! Issue 22: a PostgreSQL restart (`pg_ctlcluster ... restart`, every
//! connection dropped, the server refusing connections for a while) during a
//! `follow`, a following `worker` and a `rebuild` loses nothing: both connect again with back-off
//! and go on; the follower says `reconnecting` and `reconnected`; the rebuild
//! exits 0 at the head; both equal a rebuild made afterwards. A test binary
//! of its own, so no other test's connections are dropped with it; it needs
//! the command that restarts the local server in
//! `PROJECTIONIST_TEST_PG_RESTART` (`.ci/run` sets it).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::Schema;
use common::{DEMO_PROJECTIONS, Env, Reaped, json_lines, sigterm, stderr, wait_until};
use postgres::{Client, NoTls};

fn digests(env: &Env, dir: &str) -> Vec<String> {
    DEMO_PROJECTIONS
        .iter()
        .map(|name| {
            let conn =
                projectionist::rusqlite::Connection::open(env.path(&format!("{dir}/{name}.db")))
                    .unwrap();
            projectionist::projection_digest(&conn, projectionist::DigestScope::ProjectionTables)
                .unwrap()
        })
        .collect()
}

/// A client once the server accepts connections again.
fn client_when_back(url: &str) -> Client {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        match Client::connect(url, NoTls) {
            Ok(client) => return client,
            Err(e) => assert!(Instant::now() < until, "the server did not come back: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn a_server_restart_during_follow_and_rebuild_loses_nothing() {
    let restart = std::env::var("PROJECTIONIST_TEST_PG_RESTART").unwrap_or_else(|_| {
        panic!("set PROJECTIONIST_TEST_PG_RESTART to the command that restarts the local server")
    });
    let schema = Schema::new("restart");
    let url = schema.url();
    let env = Env::new();
    env.pg_demo_log(&url, 300);
    let command = |dir: &str, args: &[&str]| env.command_with(&url, dir, args);
    // A log long enough that the rebuild is still reading when the server goes.
    let mut client = Client::connect(&url, NoTls).unwrap();
    client
        .batch_execute(
            "INSERT INTO events (stream_id, stream_version, event_type, data)
             SELECT 'r-' || n, 1, 'OrderPlaced',
                    jsonb_build_object('order_id', 'r-' || n, 'customer_id', 'c-' || (n % 11))
             FROM generate_series(1, 300000) n",
        )
        .unwrap();
    let head: i64 = client
        .query_one("SELECT max(sequence) FROM events", &[])
        .unwrap()
        .get(0);
    let head = head.cast_unsigned();
    let follower = Reaped::new(
        command("projections", &["--json", "follow"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let worker = Reaped::new(
        command("worker", &["--json", "worker", "--worker-id", "w1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until(
        "the worker and the follower at the head",
        Duration::from_secs(120),
        &|| {
            ["projections", "worker"].iter().all(|dir| {
                DEMO_PROJECTIONS
                    .iter()
                    .all(|name| env.checkpoint_in(dir, name) == head)
            })
        },
    );
    let mut rebuild = Reaped::new(
        command("rebuilt", &["--quiet", "--batch-size", "200", "rebuild"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_until("the rebuild under way", Duration::from_secs(60), &|| {
        env.checkpoint_in("rebuilt", "order_summary") > 0
    });
    drop(client);
    let restarted = Command::new("sh").args(["-c", &restart]).status().unwrap();
    assert!(restarted.success(), "{restart}");
    assert!(
        rebuild.try_wait().unwrap().is_none(),
        "the rebuild ended before the restart: make the log longer"
    );
    let mut client = client_when_back(&url);
    for i in 0..20 {
        let mut tx = client.transaction().unwrap();
        common::pg::insert(&mut tx, &format!("after-restart-{i}"));
        tx.commit().unwrap();
    }
    let rebuilt = rebuild.into_inner().wait_with_output().unwrap();
    assert!(rebuilt.status.success(), "{}", stderr(&rebuilt));
    for name in DEMO_PROJECTIONS {
        assert!(env.checkpoint_in("rebuilt", name) >= head, "{name}");
    }
    let new_head = head + 20;
    wait_until(
        "the follower and the worker at the new head",
        Duration::from_secs(60),
        &|| {
            ["projections", "worker"].iter().all(|dir| {
                DEMO_PROJECTIONS
                    .iter()
                    .all(|name| env.checkpoint_in(dir, name) == new_head)
            })
        },
    );
    let out = command("rebuilt", &["--quiet", "resume"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    sigterm(&follower);
    let out = follower.into_inner().wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let lines = json_lines(&out);
    let position = |event: &str| lines.iter().position(|l| l["event"] == event);
    let (down, up) = (position("reconnecting"), position("reconnected"));
    assert!(down.is_some() && up.is_some() && down < up, "{lines:?}");
    sigterm(&worker);
    let out = worker.into_inner().wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let reference = command("reference", &["--quiet", "rebuild"])
        .output()
        .unwrap();
    assert!(reference.status.success(), "{}", stderr(&reference));
    assert_eq!(digests(&env, "projections"), digests(&env, "reference"));
    assert_eq!(digests(&env, "rebuilt"), digests(&env, "reference"));
    assert_eq!(digests(&env, "worker"), digests(&env, "reference"));
}
