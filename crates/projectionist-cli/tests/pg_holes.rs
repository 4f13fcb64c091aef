//! Issue 8, item 7, across processes: a rolled-back append leaves a hole in a
//! PostgreSQL log. A new `projectionist` process (resume, a fresh rebuild, a
//! worker) must pass it once no transaction that could fill it is running, and
//! must say so when a still-running transaction holds events back.

mod common;

use postgres::{Client, NoTls};

use common::pg::{Schema, insert};
use common::{DEMO_CONFIG, Env, stderr};

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
fn r8_7_a_new_process_passes_a_rollback_hole() {
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
