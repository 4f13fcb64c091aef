//! The `GlobalReader` trait: how the rebuild engine reads the global log.

use std::time::{Duration, Instant};

use crate::error::Result;
use crate::event::GlobalEvent;
use crate::limits::FOLLOW_POLL_INTERVAL_DEFAULT;

/// The answer to a filtered read: the matching events, and the sequence through
/// which the log was scanned (so a projection's checkpoint can move past events
/// of types it does not handle).
#[derive(Clone, Debug, PartialEq)]
pub struct TypedBatch<E> {
    /// Matching events, in increasing sequence order.
    pub events: Vec<GlobalEvent<E>>,
    /// Every event up to this sequence was considered by the read.
    pub scanned_through: u64,
}

/// Reads the global, ordered event log.
///
/// Implementations must be safe to call from another thread: the rebuild engine
/// reads on one thread and writes projections on others.
pub trait GlobalReader<E>: Send + Sync {
    /// Up to `limit` events with a sequence greater than `after`, in increasing
    /// sequence order. Fewer than `limit` events means the end of the log as the
    /// read saw it.
    ///
    /// # Errors
    /// Store errors, and [`Error::Decode`](crate::Error::Decode) for an event whose
    /// payload does not decode into `E`.
    fn read_after(&self, after: u64, limit: u32) -> Result<Vec<GlobalEvent<E>>>;

    /// Up to `limit` events with a sequence greater than `after` whose type is one
    /// of `event_types`, in increasing sequence order, and how far the read looked:
    /// every event (of any type) up to `scanned_through` was considered. Fewer than
    /// `limit` events means the end of the log as the read saw it. Stores should
    /// push the filter into their query; this default reads unfiltered batches and
    /// filters them, holding at most two batches in memory.
    ///
    /// # Errors
    /// As [`GlobalReader::read_after`].
    fn read_after_types(
        &self,
        after: u64,
        limit: u32,
        event_types: &[String],
    ) -> Result<TypedBatch<E>> {
        let mut events = Vec::new();
        let mut position = after;
        loop {
            let batch = self.read_after(position, limit)?;
            let at_end = batch.len() < limit as usize;
            for event in batch {
                if events.len() == limit as usize {
                    // Events past the limit are read again by the next call.
                    return Ok(TypedBatch {
                        events,
                        scanned_through: position,
                    });
                }
                position = event.sequence;
                if event_types.contains(&event.event_type) {
                    events.push(event);
                }
            }
            if at_end || events.len() == limit as usize {
                return Ok(TypedBatch {
                    events,
                    scanned_through: position,
                });
            }
        }
    }

    /// The sequence of the last event in the log, 0 when the log is empty.
    ///
    /// # Errors
    /// Store errors.
    fn head(&self) -> Result<u64>;

    /// A cheap value that changes whenever the log may have changed (SQLite:
    /// `PRAGMA data_version`, which moves when another connection commits), or
    /// `None` when the store has no such signal. A follower that is caught up
    /// asks for it every [`poll_interval`](GlobalReader::poll_interval) and
    /// reads only when it moved; without it, it reads every interval. A false
    /// alarm costs one empty read; a missed change is a bug.
    ///
    /// # Errors
    /// Store errors.
    fn change_token(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Waits until the store has a hint that the log may have grown (for
    /// example a PostgreSQL notification), or until `timeout` passes. A hint is
    /// only a hint: the follower checks the log either way. Default: sleeps
    /// `timeout`.
    ///
    /// # Errors
    /// Store errors (a store should rather fall back to sleeping).
    fn wait_for_hint(&self, timeout: Duration) -> Result<()> {
        std::thread::sleep(timeout);
        Ok(())
    }

    /// How often a caught-up follower checks for new events: asks for the
    /// [`change_token`](GlobalReader::change_token), or reads when there is none.
    /// Default [`FOLLOW_POLL_INTERVAL_DEFAULT`].
    fn poll_interval(&self) -> Duration {
        FOLLOW_POLL_INTERVAL_DEFAULT
    }

    /// Where reads are held, for a store whose reads stop at a missing
    /// sequence number that a running transaction may still fill (PostgreSQL):
    /// that number and since when. `None` when the last read passed every
    /// hole it met, and always for stores without holes (the default). A
    /// follower that is held reports the log's real head, so its lag counts
    /// the committed events waiting behind the hole.
    fn hole_wait(&self) -> Option<HoleWait> {
        None
    }

    /// The distinct event types in the log, when the store can list them with
    /// one query (a config's checks warn about handled types never seen);
    /// `None` when it cannot (the default), or when the log holds more than
    /// [`EVENT_TYPES_LISTED_MAX`](crate::limits::EVENT_TYPES_LISTED_MAX).
    ///
    /// # Errors
    /// Store errors.
    fn event_types(&self) -> Result<Option<Vec<String>>> {
        Ok(None)
    }
}

/// A missing sequence number where a gap-safe store's reads are held (see
/// [`GlobalReader::hole_wait`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HoleWait {
    /// The missing sequence number.
    pub sequence: u64,
    /// When a read first stopped there.
    pub since: Instant,
}

impl HoleWait {
    /// A hole wait at `sequence`, first met at `since`.
    #[must_use]
    pub fn new(sequence: u64, since: Instant) -> Self {
        HoleWait { sequence, since }
    }
}

/// The log as it was at sequence `last`: reads never return a later event and
/// the head is at most `last`. Replaying through it builds a projection as it
/// stood at that checkpoint, e.g. to compare a rebuild with a live projection
/// at the live one's checkpoint (`rebuild --verify`).
pub struct UpTo<'a, E> {
    inner: &'a dyn GlobalReader<E>,
    last: u64,
}

impl<'a, E> UpTo<'a, E> {
    /// `inner`, ending at sequence `last`.
    #[must_use]
    pub fn new(inner: &'a dyn GlobalReader<E>, last: u64) -> Self {
        UpTo { inner, last }
    }
}

impl<E: Send + Sync> GlobalReader<E> for UpTo<'_, E> {
    fn read_after(&self, after: u64, limit: u32) -> Result<Vec<GlobalEvent<E>>> {
        if after >= self.last {
            return Ok(Vec::new());
        }
        let mut events = self.inner.read_after(after, limit)?;
        events.retain(|e| e.sequence <= self.last);
        Ok(events)
    }

    fn read_after_types(
        &self,
        after: u64,
        limit: u32,
        event_types: &[String],
    ) -> Result<TypedBatch<E>> {
        if after >= self.last {
            return Ok(TypedBatch {
                events: Vec::new(),
                scanned_through: after,
            });
        }
        let mut batch = self.inner.read_after_types(after, limit, event_types)?;
        batch.events.retain(|e| e.sequence <= self.last);
        batch.scanned_through = batch.scanned_through.min(self.last);
        Ok(batch)
    }

    fn head(&self) -> Result<u64> {
        Ok(self.inner.head()?.min(self.last))
    }
}
