//! A supervisor embedded in another program (here: this test process, with
//! the demo's declared projections) is seen and driven by the command line
//! as `follow` is: `status` shows its states, `rebuild` and `rollback` are
//! handed to it and answered, a second follower is refused without touching
//! its registration.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Env, stderr, wait_until};
use projectionist::rusqlite::Connection;
use projectionist::{NewEvent, SqliteEventStore};
use projectionist_runner::{State, Supervised, Supervisor};
use projectionist_sqlview::ProjectionsConfig;
use serde_json::value::RawValue;

const DEADLINE: Duration = Duration::from_secs(60);

fn embedded(env: &Env, stall_after: Duration) -> Supervisor<Box<RawValue>> {
    let config = ProjectionsConfig::load(&env.path("projections.toml")).unwrap();
    let store = Arc::new(SqliteEventStore::create(env.path("events.db")).unwrap());
    let mut builder = Supervisor::<Box<RawValue>>::builder(store, env.path("projections"))
        .unwrap()
        .stall_after(stall_after);
    for projection in config.projections {
        builder = builder.projection(Supervised::sql(projection));
    }
    builder.start().unwrap()
}

fn status_json(env: &Env) -> (Option<i32>, serde_json::Value) {
    let out = env.run(&["status", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let row = rows
        .into_iter()
        .find(|r| r["projection"] == "order_summary")
        .unwrap_or_else(|| panic!("no order_summary row in {text}"));
    (out.status.code(), row)
}

#[test]
fn the_command_line_sees_and_drives_an_embedded_supervisor() {
    let env = Env::new();
    env.demo_log(2_000);
    let supervisor = embedded(&env, Duration::from_secs(30));
    wait_until("following", DEADLINE, || {
        supervisor.status_of("order_summary").unwrap().state == State::Following
    });
    let (code, row) = status_json(&env);
    assert_eq!(code, Some(0), "{row}");

    // A second follower is refused, naming this process, and leaves its
    // registration alone.
    let out = env.run(&["follow"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains(&format!("process {}", std::process::id())),
        "{}",
        stderr(&out)
    );
    let registered =
        std::fs::read_to_string(env.path("projections/.order_summary.follower")).unwrap();
    assert_eq!(
        registered.lines().next().unwrap(),
        std::process::id().to_string()
    );

    // `rebuild` is handed to the supervisor, which publishes the new version.
    let out = env.run(&["rebuild", "order_summary"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("took the request"),
        "{}",
        stderr(&out)
    );
    wait_until("the published rebuild", DEADLINE, || {
        env.path("projections/.order_summary.previous.db").exists()
            && supervisor.status_of("order_summary").unwrap().state == State::Following
    });

    // `rollback` is served by it and answered with its own outcome.
    let out = env.run(&["rollback", "order_summary"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("rolled back by the follower"),
        "{}",
        stderr(&out)
    );

    // A projection that does not advance while events wait shows as stalled
    // in `status` of another process, which exits 4.
    drop(supervisor);
    let supervisor = embedded(&env, Duration::from_millis(500));
    wait_until("following again", DEADLINE, || {
        supervisor.status_of("order_summary").unwrap().state == State::Following
    });
    let holder = Connection::open(env.path("projections/order_summary.db")).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    SqliteEventStore::create(env.path("events.db"))
        .unwrap()
        .append(
            "embedded-order",
            0,
            &[NewEvent::json(
                "OrderPlaced",
                &serde_json::json!({"order_id": "embedded", "customer_id": "c"}),
            )
            .unwrap()],
        )
        .unwrap();
    wait_until("stalled", DEADLINE, || {
        matches!(
            supervisor.status_of("order_summary").unwrap().state,
            State::Stalled { .. }
        )
    });
    let (code, row) = status_json(&env);
    assert_eq!(code, Some(4), "{row}");
    assert_eq!(row["state"], "stalled", "{row}");
    holder.execute_batch("ROLLBACK").unwrap();
    wait_until("following after the stall", DEADLINE, || {
        supervisor.status_of("order_summary").unwrap().state == State::Following
    });
    drop(supervisor);
    assert!(
        !env.path("projections/.order_summary.follower").exists(),
        "the registration is taken back on shutdown"
    );
}
