//! The rebuild engine: replay the global log through projection handlers in
//! bounded batches, one transaction per batch, with the checkpoint inside it.
//!
//! Reading and writing are pipelined. The calling thread reads and decodes each
//! batch once and fans it out, through a bounded channel per writer thread, to
//! at most [`WRITER_THREADS_MAX`] writer threads; up to that many projections
//! get a thread each, more are dealt out to them in turn, and a thread applies
//! each batch to its projections one after the other (each projection keeps
//! its own connection and open transaction). So one projection overlaps reading
//! with writing, many projections share one read, and a thousand projections
//! need no thousand threads.
//!
//! A writer applies each batch in a savepoint of an IMMEDIATE write transaction,
//! saving the checkpoint in the same transaction, and commits every
//! `commit_interval` (see `write.rs`). A crash at any point leaves either a batch
//! with its checkpoint, or neither (exactly-once). With an external [`Checkpoint`]
//! the checkpoint is saved after the commit, so a crash between the two replays
//! those batches (at-least-once).
//!
//! Where things live: this file has the entry points and the run itself
//! (`run`: validate, deal the projections out, spawn the writers, read);
//! `read.rs` the read
//! side (one read per batch, fanned out; poison events); `write.rs` the write side
//! (start, apply in savepoints, checkpoint, commit, record the outcome);
//! `types.rs` what both sides share. The children import `types.rs`, never this
//! file, so no two files import each other.

mod keeper;
mod read;
mod types;
mod write;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::limits::{
    BATCH_SIZE_DEFAULT, BATCH_SIZE_MAX, CHANNEL_BATCHES_MAX, COMMIT_INTERVAL_MAX,
    CONCURRENT_REBUILDS_MAX, OPEN_PROJECTIONS_MAX, WRITER_THREADS_MAX,
};
use crate::progress::CancelToken;
use crate::reader::GlobalReader;
use keeper::Keeper;
use read::{Source, read_loop};
use types::RunContext;
pub use types::{
    CheckpointLocation, ProjectionTarget, RebuildConfig, RebuildOptions, RebuildResult, Start,
};
use write::Assigned;

/// Rebuilds one projection from scratch: in one transaction, drops the
/// projection's tables and views (everything but `_checkpoint`), resets the
/// checkpoint to 0 and runs the handler's `setup`; then replays the whole log.
///
/// # Errors
/// [`Error::InvalidOptions`] before anything is touched; [`Error::Handler`],
/// [`Error::Replay`] or [`Error::Cancelled`] naming the last committed sequence,
/// from which [`resume`] continues.
pub fn rebuild<E: Send + Sync>(config: RebuildConfig<'_, E>) -> Result<RebuildResult> {
    one(config, Start::Reset)
}

/// `config`'s projection from `start`, to the log's head.
fn one<E: Send + Sync>(config: RebuildConfig<'_, E>, start: Start) -> Result<RebuildResult> {
    let options = RebuildOptions {
        follow_until: None,
        ..config.options
    };
    let mut results = run(
        config.reader,
        vec![(config.projection, start)],
        &options,
        None,
    );
    results.pop().expect("one result per projection")
}

/// Replays the log into projections: the engine's one entry point.
///
/// Every projection starts where its target says ([`ProjectionTarget::start`]:
/// [`Start::Reset`] rebuilds it from scratch, [`Start::Resume`] continues from
/// its checkpoint), and all are fed from ONE read of the log, from the
/// smallest starting checkpoint: each batch is read and decoded once and
/// handed to every projection's writer; each skips what it already has. Up
/// to [`WRITER_THREADS_MAX`] projections get a writer thread each; more share
/// that many threads (each applies a batch to its projections in turn). Every
/// batch commits with its checkpoint in the projection's file (exactly-once),
/// in commit groups of [`RebuildOptions::commit_interval`](RebuildOptions#structfield.commit_interval).
///
/// The run ends at the log's head, unless
/// [`RebuildOptions::follow_until`](RebuildOptions::follow_until) is given:
/// then it keeps the projections current as the log grows. Whenever a read
/// returns fewer events than a batch, each projection commits at once, so a
/// new event is visible to readers within milliseconds; between reads it
/// waits for the log to change (see [`GlobalReader::change_token`] and
/// [`GlobalReader::poll_interval`]) without reading it. Setting the token ends
/// the run cleanly: the batches read so far are applied and committed and
/// each result is `Ok`. `options.cancel` aborts instead ([`Error::Cancelled`],
/// the last group committed).
///
/// A poison event or a failing handler stops only its projection (recorded
/// in its file for `status`); the others go on. A read error stops all of
/// them; they resume from their checkpoints. Results come in input order.
///
/// ```
/// use projectionist::{
///     MemoryEventStore, ProjectionDir, ProjectionTarget, RebuildOptions, SchemaHandler, Start,
///     replay,
/// };
/// use serde_json::{Value, json};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryEventStore::new();
/// store.append("acc-1", 0, vec![("Deposited".into(), json!({"cents": 500}))])?;
/// let tmp = tempfile::tempdir()?;
/// let dir = ProjectionDir::open(tmp.path())?;
/// let (a, b) = (dir.db("a")?, dir.db("b")?);
/// fn count(
///     tx: &projectionist::rusqlite::Transaction<'_>,
///     events: &[projectionist::GlobalEvent<Value>],
/// ) -> Result<(), projectionist::BoxError> {
///     for _ in events {
///         tx.execute("INSERT INTO seen DEFAULT VALUES", [])?;
///     }
///     Ok(())
/// }
/// let schema = "CREATE TABLE IF NOT EXISTS seen (n INTEGER PRIMARY KEY)";
/// let (mut first, mut second) = (SchemaHandler::new(schema, count), SchemaHandler::new(schema, count));
/// let results = replay(
///     &store,
///     vec![
///         ProjectionTarget::new(&a, &mut first).start(Start::Reset),
///         ProjectionTarget::new(&b, &mut second),
///     ],
///     &RebuildOptions::new().batch_size(100),
/// );
/// assert!(results.iter().all(|r| r.as_ref().is_ok_and(|r| r.checkpoint == 1)));
/// # Ok(())
/// # }
/// ```
#[must_use]
pub fn replay<E: Send + Sync>(
    reader: &dyn GlobalReader<E>,
    projections: Vec<ProjectionTarget<'_, E>>,
    options: &RebuildOptions<'_>,
) -> Vec<Result<RebuildResult>> {
    let projections = projections
        .into_iter()
        .map(|p| {
            let start = p.start;
            (p, start)
        })
        .collect();
    run(reader, projections, options, options.follow_until)
}

/// Continues a projection from its checkpoint, without resetting it; use after an
/// interrupted [`rebuild`], or to catch up with new events.
///
/// # Errors
/// As [`rebuild`].
pub fn resume<E: Send + Sync>(config: RebuildConfig<'_, E>) -> Result<RebuildResult> {
    one(config, Start::Resume)
}

/// Rebuilds independent projections in parallel, each with its own reader, at
/// most [`CONCURRENT_REBUILDS_MAX`] (32) at a time; more wait for a free slot.
/// Returns one result per config, in input order, once all have finished; one
/// failure does not stop the others.
#[must_use]
pub fn rebuild_concurrent<E: Send + Sync>(
    configs: Vec<RebuildConfig<'_, E>>,
) -> Vec<Result<RebuildResult>> {
    let n_configs = configs.len();
    let queue = Mutex::new(configs.into_iter().enumerate().collect::<VecDeque<_>>());
    let results: Mutex<Vec<Option<Result<RebuildResult>>>> =
        Mutex::new((0..n_configs).map(|_| None).collect());
    let workers = n_configs.min(CONCURRENT_REBUILDS_MAX as usize);
    thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let next = queue
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .pop_front();
                    let Some((idx, config)) = next else { break };
                    let result = rebuild(config);
                    results.lock().unwrap_or_else(PoisonError::into_inner)[idx] = Some(result);
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(PoisonError::into_inner);
    results
        .into_iter()
        .map(|r| r.expect("every config ran"))
        .collect()
}

/// [`replay`] with every projection rebuilt from scratch.
#[deprecated(
    since = "0.1.0",
    note = "use `replay` with `ProjectionTarget::start(Start::Reset)`"
)]
#[doc(hidden)]
#[must_use]
pub fn rebuild_shared<E: Send + Sync>(
    reader: &dyn GlobalReader<E>,
    projections: Vec<ProjectionTarget<'_, E>>,
    options: &RebuildOptions<'_>,
) -> Vec<Result<RebuildResult>> {
    let projections = projections
        .into_iter()
        .map(|p| p.start(Start::Reset))
        .collect();
    replay(reader, projections, options)
}

/// [`replay`] with every projection continuing from its checkpoint.
#[deprecated(
    since = "0.1.0",
    note = "use `replay` (targets start with `Start::Resume`)"
)]
#[doc(hidden)]
#[must_use]
pub fn resume_shared<E: Send + Sync>(
    reader: &dyn GlobalReader<E>,
    projections: Vec<ProjectionTarget<'_, E>>,
    options: &RebuildOptions<'_>,
) -> Vec<Result<RebuildResult>> {
    let projections = projections
        .into_iter()
        .map(|p| p.start(Start::Resume))
        .collect();
    replay(reader, projections, options)
}

/// [`replay`] with a start given beside each target.
#[deprecated(since = "0.1.0", note = "use `replay` with `ProjectionTarget::start`")]
#[doc(hidden)]
#[must_use]
pub fn replay_shared<E: Send + Sync>(
    reader: &dyn GlobalReader<E>,
    projections: Vec<(ProjectionTarget<'_, E>, Start)>,
    options: &RebuildOptions<'_>,
) -> Vec<Result<RebuildResult>> {
    let projections = projections.into_iter().map(|(p, s)| p.start(s)).collect();
    replay(reader, projections, options)
}

/// [`replay`] following the log until `stop` is set, with a start given
/// beside each target.
#[deprecated(
    since = "0.1.0",
    note = "use `replay` with `RebuildOptions::follow_until` and `ProjectionTarget::start`"
)]
#[doc(hidden)]
#[must_use]
pub fn follow<E: Send + Sync>(
    reader: &dyn GlobalReader<E>,
    projections: Vec<(ProjectionTarget<'_, E>, Start)>,
    options: &RebuildOptions<'_>,
    stop: &CancelToken,
) -> Vec<Result<RebuildResult>> {
    let projections = projections.into_iter().map(|(p, s)| p.start(s)).collect();
    replay(reader, projections, &options.follow_until(stop))
}

/// Checks a batch size: 0 means the default; above the maximum is an error.
///
/// # Errors
/// [`Error::InvalidOptions`] naming the bound.
pub fn validate_batch_size(batch_size: u32) -> Result<u32> {
    match batch_size {
        0 => Ok(BATCH_SIZE_DEFAULT),
        n if n > BATCH_SIZE_MAX => Err(Error::InvalidOptions(format!(
            "batch size {n} exceeds the maximum of {BATCH_SIZE_MAX}"
        ))),
        n => Ok(n),
    }
}

/// Checks the options of a run; returns the batch size and commit interval to use.
fn validate_options(options: &RebuildOptions<'_>) -> Result<(u32, Duration)> {
    let batch_size = validate_batch_size(options.batch_size)?;
    if options.commit_interval > COMMIT_INTERVAL_MAX {
        return Err(Error::InvalidOptions(format!(
            "commit interval {:?} exceeds the maximum of {COMMIT_INTERVAL_MAX:?}",
            options.commit_interval
        )));
    }
    Ok((batch_size, options.commit_interval))
}

/// One projection file twice in one run would have two writer threads wait on
/// one connection forever; it is a usage error.
fn check_distinct<E>(projections: &[(ProjectionTarget<'_, E>, Start)]) -> Result<()> {
    let mut paths: Vec<&std::path::Path> = projections.iter().map(|(p, _)| p.db.path()).collect();
    paths.sort();
    match paths.windows(2).find(|pair| pair[0] == pair[1]) {
        Some(pair) => Err(Error::InvalidOptions(format!(
            "projection file {} appears twice in one run",
            pair[0].display()
        ))),
        None => Ok(()),
    }
}

/// The run, top down: validate, then one read of the log feeding the writer
/// threads (at most [`WRITER_THREADS_MAX`]; more projections share them).
fn run<E: Send + Sync>(
    reader: &dyn GlobalReader<E>,
    projections: Vec<(ProjectionTarget<'_, E>, Start)>,
    options: &RebuildOptions<'_>,
    follow: Option<&CancelToken>,
) -> Vec<Result<RebuildResult>> {
    let valid = validate_options(options).and_then(|valid| {
        check_distinct(&projections)?;
        Ok(valid)
    });
    let (batch_size, commit_interval) = match valid {
        Ok(valid) => valid,
        Err(e) => {
            let message = e.to_string();
            return projections
                .iter()
                .map(|_| Err(Error::InvalidOptions(message.clone())))
                .collect();
        }
    };
    let total = match reader.head() {
        Ok(head) => head,
        Err(e) => {
            let e = Arc::new(e);
            return projections
                .iter()
                .map(|(p, _)| Err(replay_error(p, Arc::clone(&e))))
                .collect();
        }
    };
    let n = projections.len();
    let context = RunContext {
        options,
        head: AtomicU64::new(total),
        projections_ended: AtomicUsize::new(0),
        ended: (0..n).map(|_| AtomicBool::new(false)).collect(),
        commit_interval,
        open_max: OPEN_PROJECTIONS_MAX,
        hole_wait: std::sync::Mutex::new(None),
        skips: projections
            .iter()
            .map(|(p, _)| matches!(p.handler.on_error(), crate::handler::OnError::Skip { .. }))
            .collect(),
    };
    let types_per_projection: Vec<Option<Vec<String>>> = projections
        .iter()
        .map(|(p, _)| p.handler.event_types())
        .collect();
    // Projections are dealt out to the threads in turn: thread t serves the
    // projections t, t + threads, t + 2 x threads, ...
    let threads = n.min(WRITER_THREADS_MAX as usize);
    let mut assigned: Vec<Vec<Assigned<'_, E>>> = (0..threads).map(|_| Vec::new()).collect();
    for (idx, (projection, start)) in projections.into_iter().enumerate() {
        assigned[idx % threads].push(Assigned {
            idx,
            projection,
            start,
            types: types_per_projection[idx].clone(),
        });
    }
    let mut results: Vec<Option<Result<RebuildResult>>> = (0..n).map(|_| None).collect();
    thread::scope(|scope| {
        let (start_tx, start_rx) = mpsc::channel::<Option<u64>>();
        let mut senders = Vec::with_capacity(threads);
        let mut writers = Vec::with_capacity(threads);
        for (t, assigned) in assigned.into_iter().enumerate() {
            let (batch_tx, batch_rx) = mpsc::sync_channel(CHANNEL_BATCHES_MAX);
            let start_tx = start_tx.clone();
            let context = &context;
            // Named threads show up in profilers and panic messages.
            let thread_name = match assigned.as_slice() {
                [one] => format!("pj-{}", one.projection.db.name()),
                _ => format!("pj-writer-{t}"),
            };
            let writer = thread::Builder::new()
                .name(thread_name)
                .spawn_scoped(scope, move || {
                    write::write_projections(assigned, &batch_rx, start_tx, context)
                })
                .expect("spawn a writer thread");
            writers.push(writer);
            senders.push(Some(batch_tx));
        }
        drop(start_tx);
        // Every projection reports where it starts (None if it failed to
        // start); the log is read from the smallest checkpoint.
        let position = start_rx.iter().flatten().min();
        if let Some(position) = position {
            let mut source = Source {
                reader,
                types_per_projection,
                event_types: None,
            };
            source.narrow_to(&context);
            read_loop(
                &mut source,
                &mut senders,
                position,
                batch_size,
                &context,
                follow,
            );
        }
        drop(senders);
        for writer in writers {
            let ended = writer
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            for (idx, result) in ended {
                results[idx] = Some(result);
            }
        }
    });
    results
        .into_iter()
        .map(|result| result.expect("every projection has a result"))
        .collect()
}

fn replay_error<E>(projection: &ProjectionTarget<'_, E>, source: Arc<Error>) -> Error {
    let keeper = Keeper::new(projection.checkpoint, projection.consumer_id);
    Error::Replay {
        name: projection.db.name().to_string(),
        committed: keeper.committed(projection.db).unwrap_or(0),
        source,
    }
}
