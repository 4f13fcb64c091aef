//! `SharedDecode`: one run of projections whose handlers take different
//! payload types. The log is read once as raw JSON (`Box<RawValue>`); each
//! batch is decoded once per payload type, and every handler of that type
//! gets the same decoded batch.
//!
//! A run of one payload type needs none of this: [`replay`](crate::replay)
//! with a typed reader already decodes each payload once for all its
//! projections.

use std::any::{Any, TypeId};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use rusqlite::Transaction;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use crate::error::BoxError;
use crate::event::GlobalEvent;
use crate::handler::{Handler, OnError};
use crate::limits::DECODED_BATCHES_KEPT;

/// Which batch: the raw batch's first and last sequence and length
/// (sequences are unique in a log).
type Key = (u64, u64, usize);

/// A batch decoded into one type, or why it did not decode.
type Decoded = Arc<OnceLock<Result<Arc<dyn Any + Send + Sync>, String>>>;

/// Decodes each batch of a run once per payload type, for every handler made
/// by [`SharedDecode::handler`]. Use one per run over one log: batches are
/// known by their sequences, so one shared between runs over different logs
/// could hand out another log's events.
///
/// ```
/// use projectionist::{
///     GlobalEvent, NewEvent, ProjectionDir, ProjectionTarget, RebuildOptions, SchemaHandler,
///     SharedDecode, SqliteEventStore, replay,
/// };
/// use projectionist::rusqlite::Transaction;
/// use serde::Deserialize;
///
/// #[derive(Deserialize)]
/// struct Amount { cents: i64 }
/// #[derive(Deserialize)]
/// struct Account { owner: String }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let tmp = tempfile::tempdir()?;
/// let store = SqliteEventStore::create(tmp.path().join("events.db"))?;
/// store.append("acc-1", 0, &[NewEvent::json("Opened", &serde_json::json!({"owner": "ann", "cents": 0}))?])?;
/// let dir = ProjectionDir::open(tmp.path().join("projections"))?;
/// let (balances, owners) = (dir.db("balances")?, dir.db("owners")?);
/// let mut by_amount = SchemaHandler::new(
///     "CREATE TABLE IF NOT EXISTS b (cents INTEGER)",
///     |tx: &Transaction<'_>, events: &[GlobalEvent<Amount>]| {
///         for e in events { tx.execute("INSERT INTO b VALUES (?1)", [e.data.cents])?; }
///         Ok(())
///     },
/// );
/// let mut by_owner = SchemaHandler::new(
///     "CREATE TABLE IF NOT EXISTS o (owner TEXT)",
///     |tx: &Transaction<'_>, events: &[GlobalEvent<Account>]| {
///         for e in events { tx.execute("INSERT INTO o VALUES (?1)", [&e.data.owner])?; }
///         Ok(())
///     },
/// );
/// let shared = SharedDecode::new();
/// let (mut a, mut b) = (shared.handler(&mut by_amount), shared.handler(&mut by_owner));
/// let results = replay(
///     &store, // read once, as raw JSON
///     vec![ProjectionTarget::new(&balances, &mut a), ProjectionTarget::new(&owners, &mut b)],
///     &RebuildOptions::new(),
/// );
/// assert!(results.iter().all(Result::is_ok));
/// # Ok(())
/// # }
/// ```
#[derive(Default)]
pub struct SharedDecode {
    /// Per payload type, the batches decoded most recently, oldest first, at
    /// most [`DECODED_BATCHES_KEPT`] (per type, so one type's batches, such
    /// as a skipping handler's events decoded one by one, never push out
    /// another's): a handler further behind (a parked projection, a resume
    /// from another checkpoint) decodes its batch itself, the same way.
    decoded: Mutex<HashMap<TypeId, VecDeque<(Key, Decoded)>>>,
}

impl std::fmt::Debug for SharedDecode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept: usize = self
            .decoded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(VecDeque::len)
            .sum();
        f.debug_struct("SharedDecode")
            .field("batches_kept", &kept)
            .finish()
    }
}

impl SharedDecode {
    /// A decoder for one run, keeping nothing yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// `handler`, taking raw payloads: each batch is decoded into `T` once
    /// for all the handlers of this `SharedDecode` that take `T`. A payload
    /// that does not decode into `T` is that handler's failing event (it
    /// stops the projection, or is dead-lettered when the handler skips
    /// them), not the others'.
    pub fn handler<'h, T>(&'h self, handler: &'h mut dyn Handler<T>) -> Decoding<'h, T> {
        Decoding {
            shared: self,
            handler,
        }
    }

    /// `events` decoded into `T`: the batch decoded for another handler of
    /// `T`, or decoded now (and kept for the others).
    fn decoded<T>(
        &self,
        events: &[GlobalEvent<Box<RawValue>>],
    ) -> Result<Arc<Vec<GlobalEvent<T>>>, BoxError>
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return Ok(Arc::new(Vec::new()));
        };
        let key: Key = (first.sequence, last.sequence, events.len());
        let slot = {
            let mut by_type = self.decoded.lock().unwrap_or_else(PoisonError::into_inner);
            let decoded = by_type.entry(TypeId::of::<T>()).or_default();
            match decoded.iter().find(|(k, _)| *k == key) {
                Some((_, slot)) => Arc::clone(slot),
                None => {
                    if decoded.len() >= DECODED_BATCHES_KEPT {
                        decoded.pop_front();
                    }
                    let slot: Decoded = Arc::new(OnceLock::new());
                    decoded.push_back((key, Arc::clone(&slot)));
                    slot
                }
            }
        };
        // One handler decodes; another of the same type waits for it here.
        let batch = slot.get_or_init(|| {
            decode_batch::<T>(events).map(|batch| Arc::new(batch) as Arc<dyn Any + Send + Sync>)
        });
        match batch {
            Ok(batch) => Ok(Arc::clone(batch)
                .downcast::<Vec<GlobalEvent<T>>>()
                .expect("keyed by its type")),
            Err(message) => Err(message.clone().into()),
        }
    }
}

/// Decodes every payload of `events` into `T`; the first that does not
/// decode is the error, naming it.
fn decode_batch<T: DeserializeOwned>(
    events: &[GlobalEvent<Box<RawValue>>],
) -> Result<Vec<GlobalEvent<T>>, String> {
    events
        .iter()
        .map(|event| {
            let data = serde_json::from_str(event.data.get()).map_err(|e| {
                format!(
                    "event {} ({}, stream {}): its payload does not decode into {}: {e}",
                    event.sequence,
                    event.event_type,
                    event.stream_id,
                    std::any::type_name::<T>()
                )
            })?;
            Ok(GlobalEvent {
                sequence: event.sequence,
                stream_id: event.stream_id.clone(),
                stream_version: event.stream_version,
                event_type: event.event_type.clone(),
                data,
                metadata: event.metadata.clone(),
                recorded_at: event.recorded_at.clone(),
            })
        })
        .collect()
}

/// A handler of `T` fed from raw payloads through a [`SharedDecode`] (see
/// [`SharedDecode::handler`]).
pub struct Decoding<'h, T> {
    shared: &'h SharedDecode,
    handler: &'h mut dyn Handler<T>,
}

impl<T> std::fmt::Debug for Decoding<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoding")
            .field("payload", &std::any::type_name::<T>())
            .finish_non_exhaustive()
    }
}

impl<T> Handler<Box<RawValue>> for Decoding<'_, T>
where
    T: DeserializeOwned + Send + Sync + 'static,
{
    fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        self.handler.setup(tx)
    }

    fn event_types(&self) -> Option<Vec<String>> {
        self.handler.event_types()
    }

    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        events: &[GlobalEvent<Box<RawValue>>],
    ) -> Result<(), BoxError> {
        let decoded = self.shared.decoded::<T>(events)?;
        self.handler.apply(tx, &decoded)
    }

    fn caught_up(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        self.handler.caught_up(tx)
    }

    fn on_error(&self) -> OnError {
        self.handler.on_error()
    }
}
