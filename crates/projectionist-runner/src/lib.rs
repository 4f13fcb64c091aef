//! # projectionist-runner
//!
//! Runs [projectionist](https://docs.rs/projectionist) projections inside a
//! service, as `projectionist follow` does on the command line: a
//! [`Supervisor`] catches each projection up, keeps it current as the log
//! grows, rebuilds one whose definition changed in its shadow file and
//! publishes it (the live file serving the old version until then), serves
//! rebuild and rollback requests, tries again what can go away (a file that
//! cannot be opened, a failed publish, a lost connection), and shows one
//! [`State`] per projection.
//!
//! Each projection runs on its own thread: a shadow build, a failure or a
//! lock held on one projection's file never holds back another's following.
//! With [`SupervisorBuilder::share_reads`], the projections that follow in
//! their live files share one read of the log instead (any number of them,
//! as `projectionist follow` runs them), and one that needs anything else is
//! handled alone until it follows again.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use projectionist::{NewEvent, SchemaHandler, SqliteEventStore, GlobalEvent};
//! use projectionist::rusqlite::Transaction;
//! use projectionist_runner::{Supervised, Supervisor};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let tmp = tempfile::tempdir()?;
//! let store = Arc::new(SqliteEventStore::create(tmp.path().join("events.db"))?);
//! let counts = SchemaHandler::new(
//!     "CREATE TABLE IF NOT EXISTS seen (n INTEGER NOT NULL)",
//!     |tx: &Transaction<'_>, events: &[GlobalEvent<serde_json::Value>]| {
//!         tx.execute("INSERT INTO seen VALUES (?1)", [events.len() as i64])?;
//!         Ok(())
//!     },
//! );
//! let supervisor = Supervisor::builder(store.clone(), tmp.path().join("projections"))?
//!     .projection(Supervised::new("seen", counts)?.version(1))
//!     .start()?;
//!
//! let appended = store.append("order-1", 0, &[NewEvent::json("Placed", &serde_json::json!({}))?])?;
//! // Read your write: wait until the projection has applied the event.
//! supervisor.wait_for("seen", appended.last_sequence, Duration::from_secs(10))?;
//! assert_eq!(supervisor.status_of("seen")?.state.name(), "following");
//! supervisor.shutdown();
//! # Ok(())
//! # }
//! ```

pub mod control;
mod once;
mod place;
mod projection;
pub mod snapshot;
mod state;
mod supervisor;

pub use once::rebuild_once;
pub use place::{
    Opened, Placement, Plan, is_store_failure, is_transient, open_for_run, place,
    record_publish_failure, writable_now,
};
pub use projection::Supervised;
pub use state::{Event, State, Status, WaitReason};
pub use supervisor::{
    Error, EventFn, GuardFn, LateEventsFn, OnLateEvent, OutageFn, Outcome, Request,
    STALL_AFTER_DEFAULT, SUPERVISED_MAX, Supervisor, SupervisorBuilder,
};
