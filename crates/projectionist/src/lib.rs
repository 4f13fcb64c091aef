//! # projectionist
//!
//! Rebuild and manage the projections (read models) of an event-sourced system.
//! Each projection lives in its own SQLite file in a directory, with its
//! checkpoint inside that file; a rebuild replays the global event log through the
//! projection's handler in bounded batches, one transaction per batch, so a crash
//! never leaves a batch applied without its checkpoint (or the reverse).
//!
//! The core is synchronous: call it from async code with
//! `tokio::task::spawn_blocking` (see `docs/library.md`), or run projections inside
//! a service with the supervisor of crate `projectionist-runner`.
//!
//! ```
//! use projectionist::{
//!     GlobalEvent, NewEvent, ProjectionDir, ProjectionTarget, RebuildConfig, RebuildOptions,
//!     SchemaHandler, SqliteEventStore, rebuild,
//! };
//! use rusqlite::Transaction;
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Deposited { cents: i64 }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let tmp = tempfile::tempdir()?;
//! // The event log: an embedded SQLite store.
//! let store = SqliteEventStore::create(tmp.path().join("events.db"))?;
//! for (account, cents) in [("acc-1", 500), ("acc-2", 70), ("acc-1", 25)] {
//!     let version = if account == "acc-1" && cents == 25 { 1 } else { 0 };
//!     store.append(account, version, &[NewEvent::json("Deposited", &serde_json::json!({ "cents": cents }))?])?;
//! }
//!
//! // The projection: a table of balances, in its own file.
//! let dir = ProjectionDir::open(tmp.path().join("projections"))?;
//! let db = dir.db("balances")?;
//! let mut handler = SchemaHandler::new(
//!     "CREATE TABLE IF NOT EXISTS balance (account TEXT PRIMARY KEY, cents INTEGER NOT NULL)",
//!     |tx: &Transaction<'_>, events: &[GlobalEvent<Deposited>]| {
//!         let mut upsert = tx.prepare_cached(
//!             "INSERT INTO balance VALUES (?1, ?2)
//!              ON CONFLICT (account) DO UPDATE SET cents = cents + excluded.cents",
//!         )?;
//!         for event in events {
//!             upsert.execute((&event.stream_id, event.data.cents))?;
//!         }
//!         Ok(())
//!     },
//! );
//!
//! let result = rebuild(RebuildConfig {
//!     reader: &store,
//!     projection: ProjectionTarget::new(&db, &mut handler),
//!     options: RebuildOptions::new().batch_size(500),
//! })?;
//! assert_eq!(result.processed, 3);
//! assert_eq!(result.checkpoint, 3);
//!
//! // Query the projection through a read-only connection.
//! let reader = db.open_reader()?;
//! let cents: i64 = reader.query_row(
//!     "SELECT cents FROM balance WHERE account = 'acc-1'", [], |row| row.get(0))?;
//! assert_eq!(cents, 525);
//! # Ok(())
//! # }
//! ```

pub mod limits;

mod checkpoint;
mod db;
mod dead_letters;
mod digest;
mod dir;
mod error;
mod event;
mod files;
mod format;
mod handler;
mod memory;
mod name;
mod outcome;
mod progress;
mod reader;
mod rebuild;
mod shared_decode;
mod stamp;
mod store;
mod versions;

pub use checkpoint::{Checkpoint, SqliteCheckpoint, wait_for_checkpoint};
pub use db::ProjectionDb;
pub use dead_letters::{
    DEAD_LETTERS_TABLE, DeadLetter, Retried, Retry, dead_letter_count, dead_letters,
    retry_dead_letters,
};
pub use digest::{DigestScope, TableDifference, compare_projections, projection_digest};
pub use dir::{ProjectionDir, ScannedFile};
pub use error::{BoxError, Error, EventFailure, Result, is_transient};
pub use event::{Appended, GlobalEvent, NewEvent};
pub use files::{ProjectionFiles, VersionFiles};
pub use format::{APPLICATION_ID, FileKind, classify_file};
pub use handler::{Handler, OnError, SchemaHandler, Skipping};
pub use memory::lean_sqlite_memory;
pub use name::ProjectionName;
pub use outcome::{LastRun, last_run};
pub use progress::{BatchStep, CancelToken, CommitGuardFn, Progress, ProgressFn, StepHookFn};
pub use reader::{GlobalReader, HoleWait, TypedBatch, UpTo};
pub use rebuild::{
    CheckpointLocation, ProjectionTarget, RebuildConfig, RebuildOptions, RebuildResult, Start,
    rebuild, rebuild_concurrent, replay, resume,
};
#[allow(deprecated)]
#[doc(hidden)]
pub use rebuild::{follow, rebuild_shared, replay_shared, resume_shared};
pub use shared_decode::{Decoding, SharedDecode};
pub use stamp::{VersionInfo, version_info};
pub use store::{
    ConditionValue, EventTableMapping, MemoryEventStore, RowCondition, SqliteEventStore,
    StreamAppend,
};
pub use versions::{PublishHookFn, PublishOptions, PublishStep, Published};

// Helpers the sibling crates (sqlview, runner, postgres, the command line)
// share with this one. Public so they can reach them, hidden from the
// documentation: not part of the API users build on, and free to change.
#[doc(hidden)]
pub use files::immutable_uri;
#[doc(hidden)]
pub use format::{is_corruption, is_reserved_table, quick_check};
#[doc(hidden)]
pub use memory::{LOOKASIDE_SLOT_BYTES, LOOKASIDE_SLOTS};
#[doc(hidden)]
pub use outcome::record_failure;
#[doc(hidden)]
pub use rebuild::validate_batch_size;
#[doc(hidden)]
pub use store::plain_identifier;

/// Re-export of the SQLite driver whose `Transaction` handlers receive.
pub use rusqlite;
