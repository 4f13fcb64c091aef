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

mod config;
mod confine;
mod handler;
mod params;

pub use config::{ConfigError, ProjectionsConfig, SqlProjection, Statement};
pub use handler::{DEFINITION_TABLE, SqlHandler, StoredDefinition, stored_definition};
pub use params::{Envelope, Param, ValueKind};

/// The raw, unvalidated shape of the file, as serde reads it.
pub mod raw {
    pub use crate::config::{RawConfig, RawHandler, RawProjection, RawStatements};
}
