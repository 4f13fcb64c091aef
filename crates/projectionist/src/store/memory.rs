//! `MemoryEventStore`: an in-memory event log for unit tests and examples.
//! It forgets everything when dropped; use `SqliteEventStore` for real logs.

use std::collections::HashMap;
use std::sync::RwLock;

use crate::error::{Error, Result};
use crate::event::{Appended, GlobalEvent};
use crate::limits::BATCH_SIZE_MAX;
use crate::reader::GlobalReader;

/// An in-memory event log holding already-decoded events.
#[derive(Debug, Default)]
pub struct MemoryEventStore<E> {
    inner: RwLock<Inner<E>>,
}

#[derive(Debug)]
struct Inner<E> {
    events: Vec<GlobalEvent<E>>,
    versions: HashMap<String, u64>,
}

impl<E> Default for Inner<E> {
    fn default() -> Self {
        Inner {
            events: Vec::new(),
            versions: HashMap::new(),
        }
    }
}

impl<E: Clone + Send + Sync> MemoryEventStore<E> {
    /// An empty log.
    #[must_use]
    pub fn new() -> Self {
        MemoryEventStore {
            inner: RwLock::new(Inner::default()),
        }
    }

    /// Appends `(event_type, data)` pairs to a stream if it is still at
    /// `expected_version` (0 for a new stream). All or nothing.
    ///
    /// # Errors
    /// [`Error::Conflict`] when the stream moved on; nothing is written.
    pub fn append(
        &self,
        stream_id: &str,
        expected_version: u64,
        events: Vec<(String, E)>,
    ) -> Result<Appended> {
        let mut inner = self
            .inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let actual = inner.versions.get(stream_id).copied().unwrap_or(0);
        if actual != expected_version {
            return Err(Error::Conflict {
                stream_id: stream_id.to_owned(),
                expected: expected_version,
                actual,
            });
        }
        let mut appended = Appended {
            first_sequence: 0,
            last_sequence: 0,
            stream_version: actual,
        };
        for (event_type, data) in events {
            let sequence = inner.events.len() as u64 + 1;
            appended.stream_version += 1;
            if appended.first_sequence == 0 {
                appended.first_sequence = sequence;
            }
            appended.last_sequence = sequence;
            inner.events.push(GlobalEvent {
                sequence,
                stream_id: stream_id.to_owned(),
                stream_version: appended.stream_version,
                event_type,
                data,
                metadata: None,
                recorded_at: String::new(),
            });
        }
        inner
            .versions
            .insert(stream_id.to_owned(), appended.stream_version);
        Ok(appended)
    }
}

impl<E: Clone + Send + Sync> GlobalReader<E> for MemoryEventStore<E> {
    fn read_after(&self, after: u64, limit: u32) -> Result<Vec<GlobalEvent<E>>> {
        if limit > BATCH_SIZE_MAX {
            return Err(Error::InvalidOptions(format!(
                "read limit {limit} exceeds {BATCH_SIZE_MAX}"
            )));
        }
        let inner = self
            .inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Sequences are dense from 1, so event `s` sits at index `s - 1`.
        let start = usize::try_from(after)
            .unwrap_or(usize::MAX)
            .min(inner.events.len());
        let end = start.saturating_add(limit as usize).min(inner.events.len());
        Ok(inner.events[start..end].to_vec())
    }

    fn head(&self) -> Result<u64> {
        let inner = self
            .inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(inner.events.len() as u64)
    }

    /// Events are never removed, so the head is a change signal.
    fn change_token(&self) -> Result<Option<u64>> {
        GlobalReader::<E>::head(self).map(Some)
    }

    fn poll_interval(&self) -> std::time::Duration {
        crate::limits::SQLITE_CHANGE_POLL_INTERVAL
    }
}
