//! Issue 22: through PgBouncer in transaction pooling mode (no session state
//! survives a transaction: no named prepared statements, no `LISTEN`),
//! `demo`, `rebuild`, `follow` and `worker` work: every statement is sent
//! unprepared, a follower polls, leases are rows. Needs the pooler that
//! `scripts/pg-test-setup.sh` starts (`PROJECTIONIST_TEST_PG_POOLER_URL`,
//! whose role's search path is the schema `pj_bouncer`).

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{DEMO_CONFIG, DEMO_PROJECTIONS, Env, Reaped, sigterm, stderr};
use postgres::{Client, NoTls};

#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn demo_rebuild_follow_and_worker_work_through_a_transaction_pooler() {
    let pooler = std::env::var("PROJECTIONIST_TEST_PG_POOLER_URL").unwrap_or_else(|_| {
        panic!("set PROJECTIONIST_TEST_PG_POOLER_URL (scripts/pg-test-setup.sh starts PgBouncer)")
    });
    let direct = std::env::var("PROJECTIONIST_TEST_PG_URL").unwrap();
    let mut admin = Client::connect(&direct, NoTls).unwrap();
    admin
        .batch_execute(
            "DROP SCHEMA IF EXISTS pj_bouncer CASCADE; CREATE SCHEMA pj_bouncer AUTHORIZATION pj_bouncer",
        )
        .unwrap();
    let env = Env::new();
    env.write_config(DEMO_CONFIG);
    let command = |dir: &str, args: &[&str]| env.command_with(&pooler, dir, args);
    let run = |dir: &str, args: &[&str]| {
        let out = command(dir, args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    };
    run("projections", &["--quiet", "demo", "--events", "2000"]);
    run("rebuilt", &["--quiet", "rebuild"]);
    for name in DEMO_PROJECTIONS {
        assert_eq!(env.checkpoint_in("rebuilt", name), 2000);
    }
    let follower = Reaped::new(
        command("projections", &["--quiet", "follow"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Another program appends (directly; the writer is not under test).
    let mut writer = Client::connect(
        &format!("{direct}?options=-c%20search_path%3Dpj_bouncer"),
        NoTls,
    )
    .unwrap();
    for i in 0..50 {
        let mut tx = writer.transaction().unwrap();
        common::pg::insert(&mut tx, &format!("pooled-{i}"));
        tx.commit().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !DEMO_PROJECTIONS
        .iter()
        .all(|name| env.checkpoint_in("projections", name) == 2050)
    {
        assert!(Instant::now() < deadline, "the follower never reached 2050");
        std::thread::sleep(Duration::from_millis(20));
    }
    sigterm(&follower);
    let out = follower.into_inner().wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    run("worker", &["--quiet", "worker", "--exit-when-done"]);
    for name in DEMO_PROJECTIONS {
        assert_eq!(env.checkpoint_in("worker", name), 2050, "{name}");
    }
}
