//! Dead letters through the binary: a config projection with
//! `on_error = "skip"` skips each kind of poison event (a payload that is not
//! JSON, a value of the wrong type for a STRICT column, a missing required
//! field, a duplicate key), records it, and goes on; `dead-letters` lists
//! them, `status` and the metrics count them; `retry` applies them after the
//! events are fixed, directly and through a running follower; a bound stops
//! a flood.

mod common;

use std::time::Duration;

use common::{
    Env, Reaped, free_port, http_get, json_lines, metric, sigterm, stderr, stdout, wait_until,
};
use projectionist::rusqlite::Connection;
use projectionist::{NewEvent, SqliteEventStore};

/// A bound for a broken run, not a speed requirement.
const WAIT_MAX: Duration = Duration::from_secs(60);

const CONFIG: &str = r#"
[[projection]]
name = "orders"
version = 1
on_error = "skip"
schema = "CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, total INTEGER NOT NULL) STRICT"

[projection.on.OrderPlaced]
sql = "INSERT INTO orders (id, total) VALUES (:order_id, :total)"
"#;

fn placed(id: &str, total: i64) -> NewEvent {
    NewEvent::json(
        "OrderPlaced",
        &serde_json::json!({"order_id": id, "total": total}),
    )
    .unwrap()
}

fn raw(data: &str) -> NewEvent {
    NewEvent {
        event_type: "OrderPlaced".into(),
        data: data.into(),
        metadata: None,
    }
}

/// A log of 40 good orders with four poison events among them; returns their
/// sequences: not JSON, a text total, no total, a duplicate id.
fn poisoned_log(env: &Env) -> Vec<u64> {
    let store = SqliteEventStore::create(env.path("events.db")).unwrap();
    let mut poison = Vec::new();
    let bad = [
        raw("{not json"),
        raw(r#"{"order_id": "t", "total": "abc"}"#),
        raw(r#"{"order_id": "m"}"#),
        raw(r#"{"order_id": "o3", "total": 1}"#),
    ];
    let mut bad = bad.into_iter();
    for i in 0..40 {
        store
            .append(&format!("order-{i}"), 0, &[placed(&format!("o{i}"), i)])
            .unwrap();
        if i % 10 == 5 {
            let appended = store
                .append(&format!("bad-{i}"), 0, &[bad.next().unwrap()])
                .unwrap();
            poison.push(appended.first_sequence);
        }
    }
    poison
}

fn rows(env: &Env) -> i64 {
    let conn = Connection::open(env.path("projections/orders.db")).unwrap();
    conn.query_row("SELECT count(*) FROM orders", [], |r| r.get(0))
        .unwrap()
}

fn letters(env: &Env) -> Vec<serde_json::Value> {
    let out = env.run(&["--json", "dead-letters", "orders"]);
    assert!(out.status.success(), "{}", stderr(&out));
    json_lines(&out)
}

/// Replaces the payload of the event at `sequence` in the store.
fn fix_event(env: &Env, sequence: u64, data: &str) {
    let conn = Connection::open(env.path("events.db")).unwrap();
    conn.execute(
        "UPDATE events SET data = ?1 WHERE sequence = ?2",
        (data, sequence as i64),
    )
    .unwrap();
}

#[test]
fn a_skipping_projection_dead_letters_each_kind_of_poison_and_retry_applies_them_once_fixed() {
    let env = Env::new();
    env.write_config(CONFIG);
    let poison = poisoned_log(&env);
    let out = env.run(&["--json", "rebuild"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let result = json_lines(&out)
        .into_iter()
        .find(|l| l["event"] == "result")
        .unwrap();
    assert_eq!(result["dead_letters"], 4, "{result}");
    assert_eq!(result["dead_lettered"], 4, "{result}");
    assert_eq!(result["checkpoint"], 44, "{result}");
    assert_eq!(rows(&env), 40);

    let listed = letters(&env);
    let sequences: Vec<u64> = listed
        .iter()
        .map(|l| l["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(sequences, poison);
    let errors: Vec<&str> = listed
        .iter()
        .map(|l| l["error"].as_str().unwrap())
        .collect();
    assert!(
        errors[0].contains("decode") || errors[0].contains("JSON"),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].contains("cannot store TEXT value in INTEGER column"),
        "{}",
        errors[1]
    );
    assert!(errors[2].contains("total"), "{}", errors[2]);
    assert!(
        errors[3].contains("UNIQUE constraint failed"),
        "{}",
        errors[3]
    );
    assert!(
        listed
            .iter()
            .all(|l| l["attempts"] == 1 && l["projection"] == "orders")
    );

    // The text listing and the summary name the count.
    let out = env.run(&["dead-letters"]);
    assert!(out.status.success());
    assert_eq!(stdout(&out).lines().count(), 4, "{}", stdout(&out));
    assert!(stderr(&out).contains("4 dead letters"), "{}", stderr(&out));

    // status counts them and is not failing for it.
    let out = env.run(&["--json", "status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = json_lines(&out).remove(0);
    assert_eq!(status["dead_letters"], 4, "{status}");

    // The events are fixed in the log: one retried alone, then all.
    fix_event(&env, poison[0], r#"{"order_id": "j", "total": 7}"#);
    fix_event(&env, poison[1], r#"{"order_id": "t", "total": 8}"#);
    let out = env.run(&["retry", "orders", "--seq", &poison[0].to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("1 dead letters applied"),
        "{}",
        stderr(&out)
    );
    let out = env.run(&["retry", "orders", "--all"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "some fail again: {}",
        stderr(&out)
    );
    let text = stderr(&out);
    assert!(
        text.contains("1 dead letters applied and removed, 2 failed again"),
        "{text}"
    );
    assert!(text.contains(&format!("event {}", poison[2])), "{text}");
    assert_eq!(rows(&env), 42);
    let left = letters(&env);
    let sequences: Vec<u64> = left
        .iter()
        .map(|l| l["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(sequences, poison[2..].to_vec());
    assert!(left.iter().all(|l| l["attempts"] == 2), "{left:?}");

    // Asking for one that is not a dead letter is a usage error.
    let out = env.run(&["retry", "orders", "--seq", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no dead letter at sequence 1"),
        "{}",
        stderr(&out)
    );

    // A rebuild starts with none: the unfixed events are dead-lettered again.
    let out = env.run(&["--json", "rebuild"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let again: Vec<u64> = letters(&env)
        .iter()
        .map(|l| l["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(again, poison[2..].to_vec());
    assert!(letters(&env).iter().all(|l| l["attempts"] == 1));
}

#[test]
fn past_max_dead_letters_the_run_fails_naming_the_bound() {
    let env = Env::new();
    env.write_config(&CONFIG.replace(
        "on_error = \"skip\"",
        "on_error = \"skip\"\nmax_dead_letters = 2",
    ));
    let poison = poisoned_log(&env);
    // One event per batch: the batch that finds the bound reached holds
    // only the event that does.
    let out = env.run(&["--batch-size", "1", "rebuild"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(text.contains("max_dead_letters"), "{text}");
    assert!(text.contains("definition is wrong"), "{text}");
    let sequences: Vec<u64> = letters(&env)
        .iter()
        .map(|l| l["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(sequences, poison[..2].to_vec());
    assert_eq!(
        env.checkpoint_in("projections", "orders"),
        poison[2] - 1,
        "stopped just before the event past the bound"
    );
}

#[test]
fn an_unknown_on_error_policy_is_refused_naming_it() {
    let env = Env::new();
    env.write_config(&CONFIG.replace("on_error = \"skip\"", "on_error = \"ignore\""));
    poisoned_log(&env);
    let out = env.run(&["rebuild"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(text.contains("on_error = \"ignore\""), "{text}");
    assert!(
        text.contains("\"stop\"") && text.contains("\"skip\""),
        "{text}"
    );
    assert!(!env.path("projections/orders.db").exists());
}

#[test]
fn a_follower_dead_letters_a_new_poison_event_follows_on_and_retries_on_request() {
    let env = Env::new();
    env.write_config(CONFIG);
    poisoned_log(&env);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut follower = Reaped::new(
        env.command(&["follow", "--metrics", &addr])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("the follower catches up", WAIT_MAX, || {
        env.checkpoint_in("projections", "orders") == 44
    });
    let store = SqliteEventStore::open_existing(env.path("events.db")).unwrap();
    let bad = store
        .append("late-bad", 0, &[raw(r#"{"order_id": "late"}"#)])
        .unwrap()
        .first_sequence;
    let good = store
        .append("late-good", 0, &[placed("late-good", 5)])
        .unwrap()
        .first_sequence;
    wait_until("the follower passes the poison", WAIT_MAX, || {
        env.checkpoint_in("projections", "orders") >= good
    });
    assert_eq!(rows(&env), 41);
    assert!(letters(&env).iter().any(|l| l["sequence"] == bad));
    wait_until("the metric counts five", WAIT_MAX, || {
        let (code, text) = http_get(&addr, "/metrics");
        code == 200 && metric(&text, "projectionist_dead_letters", "orders") == Some(5.0)
    });
    let (code, body) = http_get(&addr, "/health");
    assert_eq!(code, 200, "dead letters alone are not unhealthy: {body}");

    // Fixed in the log, then retried through the follower that holds it.
    fix_event(&env, bad, r#"{"order_id": "late", "total": 9}"#);
    let out = env.run(&["retry", "orders", "--seq", &bad.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("1 dead letters applied"),
        "{}",
        stderr(&out)
    );
    assert_eq!(rows(&env), 42);
    assert!(!letters(&env).iter().any(|l| l["sequence"] == bad));
    // It follows on.
    let last = store
        .append("after-retry", 0, &[placed("after-retry", 1)])
        .unwrap()
        .first_sequence;
    wait_until("the follower follows on", WAIT_MAX, || {
        env.checkpoint_in("projections", "orders") >= last
    });
    sigterm(&follower);
    let status = follower.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// A worker (PostgreSQL, leases) honours the policy as `rebuild` does.
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn a_worker_dead_letters_poison_events_of_a_postgres_log() {
    use postgres::{Client, NoTls};
    let schema = common::pg::Schema::new("dead_letters_worker");
    let env = Env::new();
    let url = schema.url();
    // The demo creates the store's tables; its own events are of other types.
    env.pg_demo_log(&url, 1);
    env.write_config(&CONFIG.replace("OrderPlaced", "Placed"));
    let mut client = Client::connect(&url, NoTls).unwrap();
    let mut poison = Vec::new();
    for i in 0..20 {
        let mut data = format!(r#"{{"order_id": "o{i}", "total": {i}}}"#);
        if i == 7 {
            data = r#"{"order_id": "t", "total": "abc"}"#.to_owned();
        } else if i == 13 {
            data = r#"{"order_id": "m"}"#.to_owned();
        }
        let sequence: i64 = client
            .query_one(
                "INSERT INTO events (stream_id, stream_version, event_type, data)
                 VALUES ($1, 1, 'Placed', $2::text::jsonb) RETURNING sequence",
                &[&format!("order-{i}"), &data],
            )
            .unwrap()
            .get(0);
        if i == 7 || i == 13 {
            poison.push(sequence as u64);
        }
    }
    let out = env
        .command_with(&url, "projections", &["worker", "--exit-when-done"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(rows(&env), 18);
    let sequences: Vec<u64> = letters(&env)
        .iter()
        .map(|l| l["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(sequences, poison);
}
