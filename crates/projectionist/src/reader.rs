//! The `GlobalReader` trait: how the rebuild engine reads the global log.

use crate::error::Result;
use crate::event::GlobalEvent;

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
    /// of `event_types`, in increasing sequence order; fewer than `limit` means the
    /// end of the log as the read saw it. Stores should push the filter into their
    /// query; this default reads unfiltered batches and filters them, holding at
    /// most two batches in memory.
    ///
    /// # Errors
    /// As [`GlobalReader::read_after`].
    fn read_after_types(
        &self,
        after: u64,
        limit: u32,
        event_types: &[String],
    ) -> Result<Vec<GlobalEvent<E>>> {
        let mut matched = Vec::new();
        let mut position = after;
        loop {
            let batch = self.read_after(position, limit)?;
            let at_end = batch.len() < limit as usize;
            let Some(last) = batch.last() else {
                return Ok(matched);
            };
            position = last.sequence;
            matched.extend(
                batch
                    .into_iter()
                    .filter(|e| event_types.contains(&e.event_type)),
            );
            if matched.len() >= limit as usize {
                // Events past the limit are read again by the next call.
                matched.truncate(limit as usize);
                return Ok(matched);
            }
            if at_end {
                return Ok(matched);
            }
        }
    }

    /// The sequence of the last event in the log, 0 when the log is empty.
    ///
    /// # Errors
    /// Store errors.
    fn head(&self) -> Result<u64>;
}
