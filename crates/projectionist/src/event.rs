//! `GlobalEvent`, one event of the global log, and `NewEvent`, one event to append.

use serde::Serialize;

use crate::error::{Error, Result};

/// One event of the global, ordered log.
#[derive(Clone, Debug, PartialEq)]
pub struct GlobalEvent<E> {
    /// Position in the global log: strictly increasing, the first event is 1.
    pub sequence: u64,
    /// The stream (aggregate) the event belongs to.
    pub stream_id: String,
    /// Version of the stream after this event: 1 for a stream's first event.
    pub stream_version: u64,
    /// The event's type name, e.g. `OrderPlaced`.
    pub event_type: String,
    /// The decoded payload.
    pub data: E,
    /// Optional metadata, as JSON text.
    pub metadata: Option<String>,
    /// When the event was recorded, as the store keeps it (ISO-8601 UTC text for
    /// the stores of this crate).
    pub recorded_at: String,
}

/// An event to append to a stream.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    /// The event's type name.
    pub event_type: String,
    /// The payload as JSON text.
    pub data: String,
    /// Optional metadata as JSON text.
    pub metadata: Option<String>,
}

impl NewEvent {
    /// An event whose payload is `data` encoded as JSON.
    ///
    /// # Errors
    /// [`Error::External`] when `data` cannot be encoded.
    pub fn json<T: Serialize + ?Sized>(event_type: &str, data: &T) -> Result<Self> {
        let data = serde_json::to_string(data).map_err(|source| Error::External {
            step: format!("encode {event_type} event"),
            source: Box::new(source),
        })?;
        Ok(NewEvent {
            event_type: event_type.to_owned(),
            data,
            metadata: None,
        })
    }
}

/// What an append wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// Global sequence of the first appended event (0 when nothing was appended).
    pub first_sequence: u64,
    /// Global sequence of the last appended event (0 when nothing was appended).
    pub last_sequence: u64,
    /// The stream's version after the append.
    pub stream_version: u64,
}

/// Decodes a JSON payload, naming the event when it fails.
pub(crate) fn decode<E: serde::de::DeserializeOwned>(
    sequence: u64,
    stream_id: &str,
    event_type: &str,
    data: &str,
) -> Result<E> {
    serde_json::from_str(data).map_err(|source| Error::Decode {
        sequence,
        stream_id: stream_id.to_owned(),
        event_type: event_type.to_owned(),
        source,
    })
}
