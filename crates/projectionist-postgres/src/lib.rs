//! # projectionist-postgres
//!
//! The PostgreSQL side of projectionist, and the only crate that links a
//! PostgreSQL driver:
//!
//! - [`PostgresEventStore`]: the event log in PostgreSQL (our schema, created by
//!   an idempotent [`PostgresEventStore::init`], or an existing table through an
//!   [`EventTableMapping`](projectionist::EventTableMapping)), read **gap-safely**:
//!   a sequence is never handed out while a lower one may still commit, and a
//!   hole left by a rolled-back transaction is passed once every transaction that
//!   could have held it has ended (see `docs/postgres.md`).
//! - [`Leases`]: which worker maintains which projection, with a fencing epoch
//!   checked before every commit.
//!
//! The `postgres` client is blocking and runs its own small runtime: do not call
//! it from inside a tokio worker thread (use `spawn_blocking`).
//!
//! The example needs a server, so it is compiled, not run, by `cargo test`:
//!
//! ```no_run
//! use projectionist::{GlobalReader, NewEvent};
//! use projectionist_postgres::PostgresEventStore;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = PostgresEventStore::connect("postgres://postgres@127.0.0.1:5432/test")?;
//! store.init()?; // our events table, if it is missing
//! store.append("acc-1", 0, &[NewEvent::json("Deposited", &serde_json::json!({"cents": 5}))?])?;
//! // Gap-safe: never past a sequence that a running transaction may still commit.
//! let events = GlobalReader::<serde_json::Value>::read_after(&store, 0, 500)?;
//! assert!(!events.is_empty());
//! # Ok(())
//! # }
//! ```

mod connect;
mod coordinator;
mod horizon;
mod lease;
mod snapshots;
mod store;

pub use coordinator::{LeaseCoordinator, LeaseEvent};
pub use lease::{Lease, Leases};
pub use snapshots::{PostgresSnapshots, SNAPSHOT_CHUNK_BYTES, SNAPSHOT_SCHEMA_DEFAULT};
#[allow(deprecated)]
pub use store::FOREIGN_HOLE_SETTLE_UNPROVEN;
pub use store::{
    LATE_EVENT_WINDOW_DEFAULT, LATE_EVENTS_REPORTED_MAX, LateEvent, NOTIFY_CHANNEL, Outage,
    PASSED_HOLES_REMEMBERED_MAX, PostgresEventStore, RECONNECT_PAUSE_MAX, RECONNECT_PAUSE_MIN,
    RECONNECT_WAIT_DEFAULT, url_with_schema,
};
