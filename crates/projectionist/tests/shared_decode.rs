//! One run of projections whose handlers take different payload types: the
//! log is read once as raw JSON and each batch decoded once per type, shared
//! by every handler of that type; a payload that does not decode into one
//! type fails only the handlers of that type.

use std::sync::atomic::{AtomicUsize, Ordering};

use projectionist::rusqlite::Transaction;
use projectionist::{
    BoxError, DeadLetter, GlobalEvent, NewEvent, ProjectionDb, ProjectionDir, ProjectionTarget,
    RebuildOptions, SchemaHandler, SharedDecode, Skipping, SqliteEventStore, Start, replay,
};
use serde::{Deserialize, Deserializer};

static AMOUNTS_DECODED: AtomicUsize = AtomicUsize::new(0);
static OWNERS_DECODED: AtomicUsize = AtomicUsize::new(0);

/// Counts its decodes.
fn counted_i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    AMOUNTS_DECODED.fetch_add(1, Ordering::SeqCst);
    i64::deserialize(d)
}

fn counted_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    OWNERS_DECODED.fetch_add(1, Ordering::SeqCst);
    String::deserialize(d)
}

#[derive(Deserialize)]
struct Amount {
    #[serde(deserialize_with = "counted_i64")]
    cents: i64,
}

#[derive(Deserialize)]
struct Owner {
    #[serde(deserialize_with = "counted_string")]
    owner: String,
}

const EVENTS: u64 = 1_000;
/// Sequences whose payload has no `owner`: poison for `Owner`, fine for `Amount`.
const OWNERLESS_EVERY: u64 = 97;

fn log(path: &std::path::Path) -> SqliteEventStore {
    let store = SqliteEventStore::create(path).unwrap();
    for version in 0..EVENTS {
        let sequence = version + 1;
        let payload = if sequence % OWNERLESS_EVERY == 0 {
            serde_json::json!({"cents": 1})
        } else {
            serde_json::json!({"cents": 1, "owner": format!("o{}", sequence % 7)})
        };
        store
            .append(
                "acc",
                version,
                &[NewEvent::json("Moved", &payload).unwrap()],
            )
            .unwrap();
    }
    store
}

fn sums(tx: &Transaction<'_>, events: &[GlobalEvent<Amount>]) -> Result<(), BoxError> {
    for e in events {
        tx.execute(
            "INSERT INTO t VALUES (1, ?1) ON CONFLICT (k) DO UPDATE SET v = v + excluded.v",
            [e.data.cents],
        )?;
    }
    Ok(())
}

fn owners(tx: &Transaction<'_>, events: &[GlobalEvent<Owner>]) -> Result<(), BoxError> {
    for e in events {
        tx.execute(
            "INSERT INTO o VALUES (?1, 1) ON CONFLICT (owner) DO UPDATE SET n = n + 1",
            [&e.data.owner],
        )?;
    }
    Ok(())
}

fn one(db: &ProjectionDb, sql: &str) -> i64 {
    db.open_reader()
        .unwrap()
        .query_row(sql, [], |r| r.get(0))
        .unwrap()
}

#[test]
fn each_batch_is_decoded_once_per_payload_type_for_all_its_handlers() {
    let tmp = tempfile::tempdir().unwrap();
    let store = log(&tmp.path().join("events.db"));
    let dir = ProjectionDir::open(tmp.path().join("projections")).unwrap();
    let (first, second, third) = (
        dir.db("sums-1").unwrap(),
        dir.db("sums-2").unwrap(),
        dir.db("owners").unwrap(),
    );
    let schema = "CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v INTEGER NOT NULL)";
    let mut sums_1 = SchemaHandler::new(schema, sums);
    let mut sums_2 = SchemaHandler::new(schema, sums);
    let mut by_owner = Skipping::new(SchemaHandler::new(
        "CREATE TABLE IF NOT EXISTS o (owner TEXT PRIMARY KEY, n INTEGER NOT NULL)",
        owners,
    ))
    .max_dead_letters(100);
    let shared = SharedDecode::new();
    let (mut a, mut b, mut c) = (
        shared.handler(&mut sums_1),
        shared.handler(&mut sums_2),
        shared.handler(&mut by_owner),
    );
    let results = replay(
        &store,
        vec![
            ProjectionTarget::new(&first, &mut a).start(Start::Reset),
            ProjectionTarget::new(&second, &mut b).start(Start::Reset),
            ProjectionTarget::new(&third, &mut c).start(Start::Reset),
        ],
        &RebuildOptions::new().batch_size(100),
    );
    for result in &results {
        assert_eq!(result.as_ref().unwrap().checkpoint, EVENTS, "{result:?}");
    }
    // Two handlers of `Amount`, one decode of each payload.
    assert_eq!(AMOUNTS_DECODED.load(Ordering::SeqCst) as u64, EVENTS);
    assert_eq!(one(&first, "SELECT v FROM t"), EVENTS as i64);
    assert_eq!(one(&second, "SELECT v FROM t"), EVENTS as i64);
    // The ownerless payloads fail only `Owner`'s handler, which skips them.
    let poisoned: Vec<u64> = (1..=EVENTS).filter(|s| s % OWNERLESS_EVERY == 0).collect();
    let letters: Vec<DeadLetter> =
        projectionist::dead_letters(&third.open_reader().unwrap()).unwrap();
    assert_eq!(
        letters.iter().map(|l| l.sequence).collect::<Vec<_>>(),
        poisoned
    );
    assert!(
        letters[0].error.contains("does not decode into") && letters[0].error.contains("owner"),
        "{}",
        letters[0].error
    );
    assert_eq!(
        one(&third, "SELECT sum(n) FROM o"),
        (EVENTS - poisoned.len() as u64) as i64
    );
    assert!(OWNERS_DECODED.load(Ordering::SeqCst) as u64 >= EVENTS - poisoned.len() as u64);
}
