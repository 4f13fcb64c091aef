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

    /// The sequence of the last event in the log, 0 when the log is empty.
    ///
    /// # Errors
    /// Store errors.
    fn head(&self) -> Result<u64>;
}
