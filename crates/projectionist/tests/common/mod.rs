//! Shared fixtures for the integration tests: a small bank domain with a
//! deliberately non-idempotent projection (balances are summed, so applying a
//! batch twice changes the digest), a deterministic log generator, and helpers.

#![allow(dead_code)]

use std::path::Path;

use projectionist::rusqlite::Transaction;
use projectionist::{
    BoxError, DigestScope, GlobalEvent, Handler, NewEvent, ProjectionDb, ProjectionTarget,
    RebuildConfig, RebuildOptions, SqliteEventStore, StreamAppend, projection_digest,
};
use serde::Deserialize;

/// Payload of every bank event; which fields are set depends on the type.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct BankEvent {
    pub owner: Option<String>,
    pub cents: Option<i64>,
}

pub const BANK_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS account (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, balance INTEGER NOT NULL, n_tx INTEGER NOT NULL,
    last_sequence INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS totals (k TEXT PRIMARY KEY, n INTEGER NOT NULL, cents INTEGER NOT NULL);
";

/// The bank projection. `fail_at` makes it fail on the event with that sequence.
#[derive(Default)]
pub struct BankHandler {
    pub fail_at: Option<u64>,
}

impl Handler<BankEvent> for BankHandler {
    fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        tx.execute_batch(BANK_SCHEMA)?;
        Ok(())
    }

    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        events: &[GlobalEvent<BankEvent>],
    ) -> Result<(), BoxError> {
        for event in events {
            if self.fail_at == Some(event.sequence) {
                return Err(format!("refusing event {}", event.sequence).into());
            }
            apply_one(tx, event)?;
        }
        Ok(())
    }
}

fn apply_one(tx: &Transaction<'_>, event: &GlobalEvent<BankEvent>) -> Result<(), BoxError> {
    let seq = event.sequence as i64;
    match event.event_type.as_str() {
        "Opened" => {
            tx.prepare_cached("INSERT INTO account VALUES (?1, ?2, 0, 0, ?3)")?
                .execute((
                    &event.stream_id,
                    event.data.owner.as_deref().unwrap_or("?"),
                    seq,
                ))?;
        }
        "Deposited" | "Withdrawn" => {
            let cents = event.data.cents.unwrap_or(0);
            let signed = if event.event_type == "Deposited" {
                cents
            } else {
                -cents
            };
            tx.prepare_cached(
                "UPDATE account SET balance = balance + ?2, n_tx = n_tx + 1, last_sequence = ?3
                 WHERE id = ?1",
            )?
            .execute((&event.stream_id, signed, seq))?;
        }
        other => return Err(format!("unknown event type {other}").into()),
    }
    tx.prepare_cached(
        "INSERT INTO totals VALUES (?1, 1, ?2)
         ON CONFLICT (k) DO UPDATE SET n = n + 1, cents = cents + excluded.cents",
    )?
    .execute((&event.event_type, event.data.cents.unwrap_or(0)))?;
    Ok(())
}

/// Writes a deterministic bank log of `n_events` events over `n_accounts` accounts.
pub fn write_bank_log(store: &SqliteEventStore, n_events: u64, n_accounts: u64, seed: u64) {
    write_bank_log_poisoned(store, n_events, n_accounts, seed, None);
}

/// Poison events in a bank log.
#[derive(Clone, Copy, Debug)]
pub enum Poison {
    /// After every this many bank events, one poison event: alternately one
    /// the bank handler refuses (type `Bogus`) and one whose payload does not
    /// decode (`Opened` with a number for an owner), each in a stream of its own.
    Every(u64),
    /// The same places taken by harmless `Noted` events instead: the same
    /// sequences for the bank events, for a reference run.
    Placeholders(u64),
}

/// As [`write_bank_log`], with poison events (or their placeholders).
/// Returns the sequences of the poison events (or placeholders).
pub fn write_bank_log_poisoned(
    store: &SqliteEventStore,
    n_events: u64,
    n_accounts: u64,
    seed: u64,
    poison: Option<Poison>,
) -> Vec<u64> {
    let poison_every = poison.map(|p| match p {
        Poison::Every(n) | Poison::Placeholders(n) => n,
    });
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut versions = vec![0u64; n_accounts as usize];
    let mut written = 0;
    let mut poisoned = Vec::new();
    while written < n_events {
        let chunk = (n_events - written).min(poison_every.unwrap_or(1000));
        let mut per_stream: Vec<(String, u64, Vec<NewEvent>)> = Vec::new();
        for _ in 0..chunk {
            let account = rng.u64(0..n_accounts) as usize;
            let stream_id = format!("acc-{account}");
            let event = if versions[account] == 0 {
                NewEvent::json(
                    "Opened",
                    &serde_json::json!({"owner": format!("owner-{}", account % 17)}),
                )
            } else if rng.bool() {
                NewEvent::json(
                    "Deposited",
                    &serde_json::json!({"cents": rng.i64(1..10_000)}),
                )
            } else {
                NewEvent::json(
                    "Withdrawn",
                    &serde_json::json!({"cents": rng.i64(1..5_000)}),
                )
            }
            .unwrap();
            versions[account] += 1;
            match per_stream.iter_mut().find(|(s, _, _)| *s == stream_id) {
                Some((_, _, events)) => events.push(event),
                None => per_stream.push((stream_id, versions[account] - 1, vec![event])),
            }
        }
        let appends: Vec<StreamAppend<'_>> = per_stream
            .iter()
            .map(|(stream_id, expected, events)| StreamAppend {
                stream_id,
                expected_version: *expected,
                events,
            })
            .collect();
        store.append_batch(&appends).unwrap();
        written += chunk;
        if poison_every.is_some() && written < n_events {
            let k = poisoned.len();
            let poison = if matches!(poison, Some(Poison::Placeholders(_))) {
                NewEvent::json("Noted", &serde_json::json!({})).unwrap()
            } else if k % 2 == 0 {
                NewEvent::json("Bogus", &serde_json::json!({"cents": 1})).unwrap()
            } else {
                NewEvent {
                    event_type: "Opened".into(),
                    data: "{\"owner\": 42}".into(),
                    metadata: None,
                }
            };
            let appended = store.append(&format!("poison-{k}"), 0, &[poison]).unwrap();
            poisoned.push(appended.first_sequence);
        }
    }
    poisoned
}

/// A store at `path` holding a bank log.
pub fn bank_store(path: &Path, n_events: u64, seed: u64) -> SqliteEventStore {
    let store = SqliteEventStore::create(path).unwrap();
    write_bank_log(&store, n_events, 200, seed);
    store
}

/// Digest of a projection's own tables, read through a fresh connection.
pub fn digest(db: &ProjectionDb) -> String {
    projection_digest(&db.open_reader().unwrap(), DigestScope::ProjectionTables).unwrap()
}

/// The checkpoint of consumer `consumer_id`, read through a fresh connection.
pub fn checkpoint(db: &ProjectionDb, consumer_id: &str) -> u64 {
    projectionist::SqliteCheckpoint::load_in(&db.open_reader().unwrap(), consumer_id).unwrap()
}

/// Options with every field given, as our own call sites do.
pub fn options(batch_size: u32) -> RebuildOptions<'static> {
    RebuildOptions::new().batch_size(batch_size)
}

/// A rebuild config for the bank handler with the checkpoint in the file.
pub fn config<'a>(
    store: &'a SqliteEventStore,
    db: &'a ProjectionDb,
    handler: &'a mut BankHandler,
    options: RebuildOptions<'a>,
) -> RebuildConfig<'a, BankEvent> {
    RebuildConfig {
        reader: store,
        projection: ProjectionTarget::new(db, handler).consumer_id("bank"),
        options,
    }
}

/// Handles only `Opened` events and says so, so the read is filtered for it
/// when it runs alone: one row per `Opened` event in table `opened`. Sharing a
/// read with projections that want more, it is handed other events too, and
/// skips them (as every handler must).
pub struct OpenedOnly;

impl Handler<BankEvent> for OpenedOnly {
    fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        tx.execute_batch("CREATE TABLE IF NOT EXISTS opened (sequence INTEGER PRIMARY KEY)")?;
        Ok(())
    }
    fn event_types(&self) -> Option<Vec<String>> {
        Some(vec!["Opened".to_owned()])
    }
    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        events: &[GlobalEvent<BankEvent>],
    ) -> Result<(), BoxError> {
        for e in events.iter().filter(|e| e.event_type == "Opened") {
            tx.execute("INSERT INTO opened VALUES (?1)", [e.sequence as i64])?;
        }
        Ok(())
    }
}

/// Sets a token when dropped: a follower thread stops even when the test that
/// runs it panics (its scope would otherwise wait for it forever).
pub struct CancelOnDrop<'a>(pub &'a projectionist::CancelToken);

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Handles a type no event has: the projections that fill a run up to
/// `OPEN_PROJECTIONS_MAX`, so that a projection after them is parked.
pub struct Filler;

impl Handler<BankEvent> for Filler {
    fn event_types(&self) -> Option<Vec<String>> {
        Some(vec!["NoSuchType".to_owned()])
    }
    fn apply(
        &mut self,
        _tx: &Transaction<'_>,
        _events: &[GlobalEvent<BankEvent>],
    ) -> Result<(), BoxError> {
        Ok(())
    }
}

/// One shared rebuild of `OPEN_PROJECTIONS_MAX` fillers and then projection
/// `bank` of `dir` with `handler` (so parked between the batches it gets);
/// the bank's result.
pub fn rebuild_parked(
    store: &SqliteEventStore,
    dir: &projectionist::ProjectionDir,
    handler: &mut dyn Handler<BankEvent>,
    options: &RebuildOptions<'_>,
) -> projectionist::Result<projectionist::RebuildResult> {
    let n_fillers = projectionist::limits::OPEN_PROJECTIONS_MAX;
    let mut dbs: Vec<_> = (0..n_fillers)
        .map(|i| dir.db(&format!("filler{i:03}")).unwrap())
        .collect();
    dbs.push(dir.db("bank").unwrap());
    let mut fillers: Vec<Filler> = (0..n_fillers).map(|_| Filler).collect();
    let mut handlers: Vec<&mut dyn Handler<BankEvent>> = fillers
        .iter_mut()
        .map(|f| f as &mut dyn Handler<BankEvent>)
        .collect();
    handlers.push(handler);
    let names: Vec<String> = dbs.iter().map(|db| db.name().to_string()).collect();
    let targets = dbs
        .iter()
        .zip(handlers)
        .zip(&names)
        .map(|((db, handler), name)| {
            ProjectionTarget::new(db, handler)
                .consumer_id(name.as_str())
                .start(projectionist::Start::Reset)
        })
        .collect();
    let mut results = projectionist::replay(store, targets, options);
    for result in &results[..n_fillers] {
        assert!(result.is_ok(), "{result:?}");
    }
    results.pop().expect("the bank's result")
}
