//! # projectionist-sqlview
//!
//! Declarative projections: a TOML file declares, per projection, a name, a
//! version, a schema and SQL statements per event type. Loading goes
//! file → [`RawConfig`](raw) → validated [`SqlProjection`]s; [`SqlHandler`] then
//! applies events through the core's rebuild engine.
//!
//! Statement parameters are `:field` (a field of the event's JSON data, nested
//! with dots: `:customer.address.city`, array items by index: `:items.0.sku`),
//! `:field!` (required: an event without it is a poison event), and envelope
//! fields `:_sequence`, `:_stream_id`, `:_stream_version`, `:_event_type`,
//! `:_recorded_at`, `:_metadata`. Parameters are always bound, never spliced into
//! SQL. Every statement is prepared against the schema when the file loads.
//! A type after the marker checks the value: `:qty!int`, `:price!real`,
//! `:name!text`, `:flag!bool`, `:doc!json`, and optional typed `:note?text`.
//! Config SQL may change only its own projection's tables (SQLite's authorizer).
//!
//! ```
//! use projectionist::{
//!     MemoryEventStore, ProjectionDir, ProjectionTarget, RebuildOptions, Start, replay,
//! };
//! use projectionist_sqlview::{ProjectionsConfig, SqlHandler};
//! use serde_json::json;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ProjectionsConfig::parse(r#"
//!     [[projection]]
//!     name = "totals"
//!     version = 1
//!     schema = "CREATE TABLE totals (account TEXT PRIMARY KEY, cents INTEGER NOT NULL)"
//!     [projection.on.Deposited]
//!     sql = """INSERT INTO totals VALUES (:_stream_id, :cents!int)
//!              ON CONFLICT (account) DO UPDATE SET cents = cents + excluded.cents"""
//! "#, "example")?;
//!
//! let store = MemoryEventStore::new();
//! store.append("acc-1", 0, vec![("Deposited".into(), json!({"cents": 500}))])?;
//! store.append("acc-1", 1, vec![("Deposited".into(), json!({"cents": 25}))])?;
//!
//! let tmp = tempfile::tempdir()?;
//! let dir = ProjectionDir::open(tmp.path())?;
//! let projection = &config.projections[0];
//! let db = dir.db(projection.name.as_str())?;
//! let mut handler = SqlHandler::new(projection);
//! for result in replay(
//!     &store,
//!     vec![ProjectionTarget::new(&db, &mut handler).start(Start::Reset)],
//!     &RebuildOptions::new(),
//! ) {
//!     result?;
//! }
//! let cents: i64 = db.open_reader()?.query_row("SELECT cents FROM totals", [], |r| r.get(0))?;
//! assert_eq!(cents, 525);
//! # Ok(())
//! # }
//! ```

mod config;
mod confine;
mod definition;
mod handler;
mod params;
mod payload;

pub use config::{ConfigError, ProjectionsConfig, SqlProjection, Statement};
pub use definition::DEFINITION_TABLE;

// Helpers the runner and the command line share with this crate: public so
// they can reach them, hidden from the documentation (not part of the API
// users build on, and free to change).
#[doc(hidden)]
pub use config::{PRESETS, SOURCE_SETTLE_MAX, preset_source, source_section};
#[doc(hidden)]
pub use definition::{StoredDefinition, record_definition, stored_definition};
pub use handler::SqlHandler;
pub use params::{Envelope, Param, ValueKind};
pub use payload::IndexedPayload;

/// The raw, unvalidated shape of the file, as serde reads it.
pub mod raw {
    pub use crate::config::{RawConfig, RawHandler, RawProjection, RawSource, RawStatements};
}
