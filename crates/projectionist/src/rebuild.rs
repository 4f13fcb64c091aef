//! The rebuild engine: replay the global log through projection handlers in
//! bounded batches, one transaction per batch, with the checkpoint inside it.
//!
//! Reading and writing are pipelined. The calling thread reads and decodes each
//! batch once and fans it out, through a bounded channel per projection, to one
//! writer thread per projection; each writer owns its projection file. So one
//! projection overlaps reading with writing, and many projections share one read.
//!
//! A writer applies each batch in a savepoint of an IMMEDIATE write transaction,
//! saving the checkpoint in the same transaction, and commits every
//! `commit_interval` (see `writer.rs`). A crash at any point leaves either a batch
//! with its checkpoint, or neither (exactly-once). With an external [`Checkpoint`]
//! the checkpoint is saved after the commit, so a crash between the two replays
//! those batches (at-least-once).

use std::collections::VecDeque;
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use crate::checkpoint::{Checkpoint, SqliteCheckpoint};
use crate::dir::ProjectionDb;
use crate::error::{Error, Result};
use crate::event::GlobalEvent;
use crate::handler::Handler;
use crate::limits::{
    BATCH_SIZE_DEFAULT, BATCH_SIZE_MAX, CHANNEL_BATCHES_MAX, COMMIT_INTERVAL_DEFAULT,
    COMMIT_INTERVAL_MAX, CONCURRENT_REBUILDS_MAX,
};
use crate::progress::{CancelToken, CommitGuardFn, ProgressFn, StepHookFn};
use crate::reader::GlobalReader;

/// Where a projection's checkpoint is kept.
#[derive(Clone, Copy)]
pub enum CheckpointLocation<'a> {
    /// In the projection's own file (table `_checkpoint`), committed in the same
    /// transaction as the batch: exactly-once. The default, and the recommended one.
    InFile,
    /// Somewhere else. The batch commits first, then the checkpoint is saved, so a
    /// crash between the two applies that batch again on resume: at-least-once.
    /// Handlers used this way must be idempotent.
    External(&'a dyn Checkpoint),
}

impl Default for RebuildOptions<'_> {
    fn default() -> Self {
        RebuildOptions {
            batch_size: BATCH_SIZE_DEFAULT,
            commit_interval: COMMIT_INTERVAL_DEFAULT,
            progress: None,
            cancel: None,
            step_hook: None,
            commit_guard: None,
        }
    }
}

impl std::fmt::Debug for CheckpointLocation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckpointLocation::InFile => f.write_str("InFile"),
            CheckpointLocation::External(_) => f.write_str("External(..)"),
        }
    }
}

/// How a run behaves; shared by all projections of a run.
#[derive(Clone, Copy)]
pub struct RebuildOptions<'a> {
    /// Events per batch: one read, one handler call, one savepoint. 0 means
    /// [`BATCH_SIZE_DEFAULT`] (500); above [`BATCH_SIZE_MAX`] (50,000) is an error.
    pub batch_size: u32,
    /// How long a write transaction may keep collecting batches before it commits
    /// (it also commits at the end, on cancellation and on failure). Every batch
    /// and its checkpoint are in the same transaction either way; a longer interval
    /// means fewer commits (faster rebuilds) and more work lost to a crash.
    /// `Duration::ZERO` commits after every batch. Default
    /// [`COMMIT_INTERVAL_DEFAULT`]; above [`COMMIT_INTERVAL_MAX`] is an error.
    pub commit_interval: Duration,
    /// Called after every committed batch and once at the end. Default: none.
    pub progress: Option<&'a ProgressFn<'a>>,
    /// Stops the run at the next batch boundary. Default: none.
    pub cancel: Option<&'a CancelToken>,
    /// Called at every step of every batch; for fault-injection tests. Default: none.
    pub step_hook: Option<&'a StepHookFn<'a>>,
    /// Asked before every commit; an error rolls the transaction back and stops
    /// the projection (lease fencing). Default: none.
    pub commit_guard: Option<&'a CommitGuardFn<'a>>,
}

/// One projection to replay into.
pub struct ProjectionTarget<'a, E> {
    /// The projection's database (from [`ProjectionDir::db`](crate::ProjectionDir::db));
    /// it also names the projection.
    pub db: &'a ProjectionDb,
    /// Applies batches.
    pub handler: &'a mut dyn Handler<E>,
    /// Where the checkpoint lives.
    pub checkpoint: CheckpointLocation<'a>,
    /// The checkpoint's consumer id (1 to 256 bytes).
    pub consumer_id: &'a str,
}

/// Everything one rebuild needs.
pub struct RebuildConfig<'a, E> {
    /// The event log.
    pub reader: &'a dyn GlobalReader<E>,
    /// The projection.
    pub projection: ProjectionTarget<'a, E>,
    /// Batch size, progress, cancellation.
    pub options: RebuildOptions<'a>,
}

/// What a successful run did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebuildResult {
    /// The projection.
    pub projection_name: String,
    /// Events applied in this run.
    pub processed: u64,
    /// The committed checkpoint at the end.
    pub checkpoint: u64,
    /// The log's head when the run started.
    pub total: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// Rebuilds one projection from scratch: in one transaction, drops the
/// projection's tables and views (everything but `_checkpoint`), resets the
/// checkpoint to 0 and runs the handler's `setup`; then replays the whole log.
///
/// # Errors
/// [`Error::InvalidOptions`] before anything is touched; [`Error::Handler`],
/// [`Error::Replay`] or [`Error::Cancelled`] naming the last committed sequence,
/// from which [`resume`] continues.
pub fn rebuild<E: Send + Sync>(config: RebuildConfig<'_, E>) -> Result<RebuildResult> {
    let mut results = run(
        config.reader,
        vec![config.projection],
        &config.options,
        Start::Reset,
    );
    results.pop().expect("one result per projection")
}

/// Continues a projection from its checkpoint, without resetting it; use after an
/// interrupted [`rebuild`], or to catch up with new events.
///
/// # Errors
/// As [`rebuild`].
pub fn resume<E: Send + Sync>(config: RebuildConfig<'_, E>) -> Result<RebuildResult> {
    let mut results = run(
        config.reader,
        vec![config.projection],
        &config.options,
        Start::Resume,
    );
    results.pop().expect("one result per projection")
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
    assert!(
        workers <= CONCURRENT_REBUILDS_MAX as usize,
        "too many workers: {workers}"
    );
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

/// Rebuilds several projections from ONE read of the log: each batch is read and
/// decoded once and handed to every projection's writer thread. At most
/// [`CONCURRENT_REBUILDS_MAX`] writers run at once; more projections run in
/// further passes. Results come in input order.
#[must_use]
pub fn rebuild_shared<E: Send + Sync>(
    reader: &dyn GlobalReader<E>,
    projections: Vec<ProjectionTarget<'_, E>>,
    options: &RebuildOptions<'_>,
) -> Vec<Result<RebuildResult>> {
    run(reader, projections, options, Start::Reset)
}

/// Like [`rebuild_shared`], but each projection continues from its checkpoint.
/// The log is read from the smallest checkpoint; each projection skips what it
/// already has.
#[must_use]
pub fn resume_shared<E: Send + Sync>(
    reader: &dyn GlobalReader<E>,
    projections: Vec<ProjectionTarget<'_, E>>,
    options: &RebuildOptions<'_>,
) -> Vec<Result<RebuildResult>> {
    run(reader, projections, options, Start::Resume)
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
fn check_distinct<E>(projections: &[ProjectionTarget<'_, E>]) -> Result<()> {
    let mut paths: Vec<&std::path::Path> = projections.iter().map(|p| p.db.path()).collect();
    paths.sort();
    match paths.windows(2).find(|pair| pair[0] == pair[1]) {
        Some(pair) => Err(Error::InvalidOptions(format!(
            "projection file {} appears twice in one run",
            pair[0].display()
        ))),
        None => Ok(()),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    Reset,
    Resume,
}

pub(crate) enum Message<E> {
    Batch(Arc<Vec<GlobalEvent<E>>>),
    /// The log is read to its end: every event up to `through` was considered.
    End {
        /// Every event up to this sequence was considered by the reader.
        through: u64,
    },
    /// Reading failed; every projection stops at its last committed batch.
    Failed(Arc<Error>),
    /// An event of a type this projection handles cannot be decoded (a poison
    /// event): the projection stops at its last committed batch; the others go on.
    Poison(Arc<Error>),
}

/// What every writer of one run shares.
pub(crate) struct RunContext<'a> {
    pub(crate) options: &'a RebuildOptions<'a>,
    pub(crate) start: Start,
    pub(crate) total: u64,
    /// Validated `options.commit_interval`.
    pub(crate) commit_interval: Duration,
}

fn run<E: Send + Sync>(
    reader: &dyn GlobalReader<E>,
    mut projections: Vec<ProjectionTarget<'_, E>>,
    options: &RebuildOptions<'_>,
    start: Start,
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
    let mut results = Vec::with_capacity(projections.len());
    while !projections.is_empty() {
        let rest = projections.split_off(projections.len().min(CONCURRENT_REBUILDS_MAX as usize));
        let group = std::mem::replace(&mut projections, rest);
        results.extend(run_group(
            reader,
            group,
            batch_size,
            commit_interval,
            options,
            start,
        ));
    }
    results
}

/// One pass: up to [`CONCURRENT_REBUILDS_MAX`] writer threads fed by one reader.
fn run_group<E: Send + Sync>(
    reader: &dyn GlobalReader<E>,
    group: Vec<ProjectionTarget<'_, E>>,
    batch_size: u32,
    commit_interval: Duration,
    options: &RebuildOptions<'_>,
    start: Start,
) -> Vec<Result<RebuildResult>> {
    assert!(
        group.len() <= CONCURRENT_REBUILDS_MAX as usize,
        "group of {}",
        group.len()
    );
    let total = match reader.head() {
        Ok(head) => head,
        Err(e) => {
            let e = Arc::new(e);
            return group
                .iter()
                .map(|p| Err(replay_error(p, Arc::clone(&e))))
                .collect();
        }
    };
    let context = RunContext {
        options,
        start,
        total,
        commit_interval,
    };
    let types_per_writer: Vec<Option<Vec<String>>> =
        group.iter().map(|p| p.handler.event_types()).collect();
    thread::scope(|scope| {
        let (start_tx, start_rx) = mpsc::channel::<Option<u64>>();
        let mut senders = Vec::with_capacity(group.len());
        let mut writers = Vec::with_capacity(group.len());
        for projection in group {
            let (batch_tx, batch_rx) = mpsc::sync_channel(CHANNEL_BATCHES_MAX);
            let start_tx = start_tx.clone();
            let context = &context;
            // Named threads show up in profilers and panic messages.
            let thread_name = format!("pj-{}", projection.db.name());
            let writer = thread::Builder::new()
                .name(thread_name)
                .spawn_scoped(scope, move || {
                    crate::writer::write_projection(projection, &batch_rx, start_tx, context)
                })
                .expect("spawn a writer thread");
            writers.push(writer);
            senders.push(Some(batch_tx));
        }
        drop(start_tx);
        // Every writer reports where it starts (None if it failed to start); the
        // log is read from the smallest checkpoint.
        let position = start_rx.iter().flatten().min();
        if let Some(position) = position {
            let mut source = Source {
                reader,
                types_per_writer,
                event_types: None,
            };
            source.narrow_to(&senders);
            read_loop(
                &mut source,
                &mut senders,
                position,
                batch_size,
                options.cancel,
            );
        }
        drop(senders);
        writers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// The log as a run reads it: everything, or only the event types its live
/// projections handle.
struct Source<'a, E> {
    reader: &'a dyn GlobalReader<E>,
    /// What each writer's handler asked for (`None`: every event).
    types_per_writer: Vec<Option<Vec<String>>>,
    /// The union over the writers still running, or `None` when one of them
    /// wants all events.
    event_types: Option<Vec<String>>,
}

impl<E> Source<'_, E> {
    /// One batch, and the sequence through which the log was scanned.
    fn read(&self, after: u64, limit: u32) -> Result<(Vec<GlobalEvent<E>>, u64)> {
        match &self.event_types {
            None => {
                let events = self.reader.read_after(after, limit)?;
                let through = events.last().map_or(after, |e| e.sequence);
                Ok((events, through))
            }
            Some(types) => {
                let batch = self.reader.read_after_types(after, limit, types)?;
                Ok((batch.events, batch.scanned_through))
            }
        }
    }

    /// Reads only what the writers still running handle.
    fn narrow_to<S>(&mut self, senders: &[Option<S>]) {
        let mut union: Vec<String> = Vec::new();
        for (slot, types) in senders.iter().zip(&self.types_per_writer) {
            if slot.is_none() {
                continue;
            }
            let Some(types) = types else {
                self.event_types = None;
                return;
            };
            union.extend(types.iter().cloned());
        }
        union.sort();
        union.dedup();
        self.event_types = Some(union);
    }

    /// Whether writer `idx` handles events of `event_type`.
    fn handles(&self, idx: usize, event_type: &str) -> bool {
        self.types_per_writer[idx]
            .as_ref()
            .is_none_or(|types| types.iter().any(|t| t == event_type))
    }

    /// The events before a poison event: the longest batch from `after` that
    /// reads without error (a binary search on the batch size; a poison event
    /// is rare, so the extra reads do not matter).
    fn read_before_poison(&self, after: u64, limit: u32) -> Result<(Vec<GlobalEvent<E>>, u64)> {
        let (mut good, mut bad) = (0u32, limit);
        let mut best = (Vec::new(), after);
        while bad - good > 1 {
            let mid = good + (bad - good) / 2;
            match self.read(after, mid) {
                Ok(read) => {
                    good = mid;
                    best = read;
                }
                Err(e) if poison(&e).is_some() => bad = mid,
                Err(e) => return Err(e),
            }
        }
        Ok(best)
    }
}

/// The sequence and type of a poison event, when `error` is one.
fn poison(error: &Error) -> Option<(u64, &str)> {
    match error {
        Error::Decode {
            sequence,
            event_type,
            ..
        }
        | Error::InvalidEvent {
            sequence,
            event_type,
            ..
        } => Some((*sequence, event_type)),
        _ => None,
    }
}

/// Reads batches from `position` and hands each to every live writer, until the
/// log ends, the run is cancelled, reading fails, or no writer is left. A poison
/// event stops only the writers that handle its type.
fn read_loop<E>(
    reader: &mut Source<'_, E>,
    senders: &mut [Option<SyncSender<Message<E>>>],
    mut position: u64,
    batch_size: u32,
    cancel: Option<&CancelToken>,
) {
    loop {
        if senders.iter().all(Option::is_none) || cancel.is_some_and(CancelToken::is_cancelled) {
            return;
        }
        let read = reader.read(position, batch_size).and_then(|read| {
            check_batch(position, batch_size, &read.0)?;
            Ok(read)
        });
        let (events, through) = match read {
            Ok(read) => read,
            Err(e) if poison(&e).is_some() => {
                match pass_poison(reader, senders, position, batch_size, e) {
                    Ok(after_poison) => position = after_poison,
                    Err(e) => {
                        broadcast(senders, &Message::Failed(Arc::new(e)));
                        return;
                    }
                }
                continue;
            }
            Err(e) => {
                broadcast(senders, &Message::Failed(Arc::new(e)));
                return;
            }
        };
        let at_end = events.len() < batch_size as usize;
        if let Some(last) = events.last() {
            position = last.sequence;
            broadcast(senders, &Message::Batch(Arc::new(events)));
        }
        if at_end {
            broadcast(senders, &Message::End { through });
            return;
        }
    }
}

/// Hands every writer the events before a poison event, stops the writers that
/// handle its type, and narrows the read to the others. Returns the poison
/// event's sequence, from which the others read on.
fn pass_poison<E>(
    reader: &mut Source<'_, E>,
    senders: &mut [Option<SyncSender<Message<E>>>],
    position: u64,
    batch_size: u32,
    error: Error,
) -> Result<u64> {
    let (sequence, event_type) = poison(&error).expect("a poison event");
    let event_type = event_type.to_owned();
    let (before, _) = reader.read_before_poison(position, batch_size)?;
    check_batch(position, batch_size, &before)?;
    if !before.is_empty() {
        broadcast(senders, &Message::Batch(Arc::new(before)));
    }
    let error = Arc::new(error);
    for (idx, slot) in senders.iter_mut().enumerate() {
        if slot.is_some()
            && reader.handles(idx, &event_type)
            && let Some(sender) = slot.take()
        {
            let _ = sender.send(Message::Poison(Arc::clone(&error)));
        }
    }
    reader.narrow_to(senders);
    Ok(sequence)
}

/// A reader's batch is input: check it rather than trust it.
fn check_batch<E>(after: u64, batch_size: u32, events: &[GlobalEvent<E>]) -> Result<()> {
    if events.len() > batch_size as usize {
        return Err(Error::CorruptStore(format!(
            "reader returned {} events for a batch of {batch_size}",
            events.len()
        )));
    }
    let mut previous = after;
    for event in events {
        if event.sequence <= previous {
            return Err(Error::CorruptStore(format!(
                "event sequence {} follows {previous}; sequences must strictly increase",
                event.sequence
            )));
        }
        previous = event.sequence;
    }
    Ok(())
}

fn broadcast<E>(senders: &mut [Option<SyncSender<Message<E>>>], message: &Message<E>) {
    for slot in senders.iter_mut() {
        let Some(sender) = slot else { continue };
        let copy = match message {
            Message::Batch(batch) => Message::Batch(Arc::clone(batch)),
            Message::End { through } => Message::End { through: *through },
            Message::Failed(e) => Message::Failed(Arc::clone(e)),
            Message::Poison(e) => Message::Poison(Arc::clone(e)),
        };
        // A writer that stopped (error or cancel) dropped its receiver.
        if sender.send(copy).is_err() {
            *slot = None;
        }
    }
}

fn replay_error<E>(projection: &ProjectionTarget<'_, E>, source: Arc<Error>) -> Error {
    let committed = match projection.checkpoint {
        CheckpointLocation::InFile => projection
            .db
            .with_connection(|conn| SqliteCheckpoint::load_in(conn, projection.consumer_id)),
        CheckpointLocation::External(checkpoint) => checkpoint.load(projection.consumer_id),
    };
    Error::Replay {
        name: projection.db.name().to_string(),
        committed: committed.unwrap_or(0),
        source,
    }
}
