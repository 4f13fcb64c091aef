//! The writer side of a run: at most `WRITER_THREADS_MAX` writer threads, each
//! serving one or more projections in turn, apply the batches the reader hands
//! them. A projection past `OPEN_PROJECTIONS_MAX` is parked: its file is opened
//! only for the batches of its types, kept and applied a few at a time.
//!
//! Batches are applied inside *commit groups*: one write transaction holds one or
//! more batches, each inside its own savepoint, and the checkpoint is saved after
//! every batch inside the same transaction. The group commits when it is older
//! than the commit interval, at the end of the log, on cancellation and on
//! failure. So a crash loses at most one group and never separates rows from
//! their checkpoint (exactly-once), and a failing batch is rolled back alone: the
//! batches before it still commit with their checkpoint. Fewer, larger commits are
//! what make a rebuild fast (each commit rewrites every page it touched).
//!
//! A projection that skips poison events (`OnError::Skip`) has a failing batch
//! applied again one event at a time, each in a savepoint of its own: the
//! events that fail are rolled back alone and recorded as dead letters in the
//! same transaction (`dead_letters.rs`); an event whose payload did not decode
//! is recorded with the checkpoint moved past it.

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use rusqlite::{Connection, Transaction, TransactionBehavior};

use crate::checkpoint::validate_consumer_id;
use crate::db::ProjectionDb;
use crate::dead_letters::{Failed, error_text};
use crate::error::{BoxError, Error, Result};
use crate::event::GlobalEvent;
use crate::format::drop_projection_objects;
use crate::handler::{Handler, OnError, call_handler};
use crate::limits::{
    BUSY_TIMEOUT_MS, CAUGHT_UP_CACHE_KIB, PARKED_CHECKPOINT_INTERVAL, PARKED_PENDING_BATCHES_MAX,
    PARKED_WAL_PAGES_MAX, START_BUSY_TIMEOUT_MS,
};
use crate::outcome::{record_following, record_outcome, record_running};
use crate::progress::{BatchStep, CancelToken, Progress};

use super::keeper::Keeper;
use super::types::{Message, ProjectionTarget, RebuildResult, RunContext, Start};

/// One projection a writer thread serves: its place in the run's input and
/// where it starts.
pub(super) struct Assigned<'p, E> {
    pub(super) idx: usize,
    pub(super) projection: ProjectionTarget<'p, E>,
    pub(super) start: Start,
    /// The event types its handler declares (`None`: all).
    pub(super) types: Option<Vec<String>>,
}

/// A projection its writer thread has started: where it stands before the
/// batch loop.
struct Begun<'p, E> {
    idx: usize,
    projection: ProjectionTarget<'p, E>,
    keeper: Keeper<'p>,
    /// Its committed checkpoint.
    committed: u64,
    /// Dead letters its file holds.
    dead_letters: u64,
    started: Instant,
    /// The event types its handler declares (`None`: all).
    types: Option<Vec<String>>,
}

/// A writer thread: starts each of its projections, then applies every
/// message to each projection still running, in turn, until none is left.
/// Returns each projection's result with its place in the run's input.
pub(super) fn write_projections<E>(
    assigned: Vec<Assigned<'_, E>>,
    batches: &Receiver<Message<E>>,
    start_tx: Sender<Option<u64>>,
    context: &RunContext<'_>,
) -> Vec<(usize, Result<RebuildResult>)> {
    let mut results = Vec::with_capacity(assigned.len());
    let mut begun = Vec::with_capacity(assigned.len());
    for Assigned {
        idx,
        mut projection,
        start,
        types,
    } in assigned
    {
        let started = Instant::now();
        let keeper = Keeper::new(projection.checkpoint, projection.consumer_id);
        match begin_run(&mut projection, &keeper, start, context) {
            Ok((committed, dead_letters)) => {
                let _ = start_tx.send(Some(committed));
                if !context.keeps_open(idx) {
                    // At once: a thread starts all its projections before
                    // serving any, and they must not all be open together.
                    projection.db.park_quickly();
                }
                begun.push(Begun {
                    idx,
                    projection,
                    keeper,
                    committed,
                    dead_letters,
                    started,
                    types,
                });
            }
            Err(e) => {
                let _ = start_tx.send(None);
                let name = projection.db.name().to_string();
                let result = Err(e);
                let _ = projection.db.with_connection(|conn| {
                    record(conn, projection.consumer_id, &result);
                    Ok(())
                });
                let state = WriterState::default();
                let result = conclude(context, idx, name, &state, started, result);
                results.push((idx, result));
            }
        }
    }
    drop(start_tx);
    // The writer connection of each projection the run keeps open is held
    // for the whole run, so it can keep its commit group open across
    // messages; the others are parked between the messages that concern them.
    let guards: Vec<_> = begun
        .iter()
        .map(|b| {
            context
                .keeps_open(b.idx)
                .then(|| b.projection.db.lock_writer())
        })
        .collect();
    let mut slots = Vec::with_capacity(begun.len());
    for (begun, guard) in begun.into_iter().zip(&guards) {
        let Begun {
            idx,
            projection,
            keeper,
            committed,
            dead_letters,
            started,
            types,
        } = begun;
        let name = projection.db.name().to_string();
        let conn = match guard {
            Some(Ok(conn)) => Some(&**conn),
            None => None,
            Some(Err(_)) => {
                let state = WriterState::default();
                let closed = Err(Error::Closed { name: name.clone() });
                results.push((idx, conclude(context, idx, name, &state, started, closed)));
                continue;
            }
        };
        let on_error = projection.handler.on_error();
        slots.push(Slot {
            idx,
            name,
            projection,
            on_error,
            keeper,
            mode: match conn {
                Some(conn) => Mode::Held { conn, group: None },
                None => Mode::Parked(Parked {
                    visited: Instant::now(),
                    pending: Vec::new(),
                    pending_since: Instant::now(),
                }),
            },
            types,
            state: WriterState {
                committed,
                applied: committed,
                written: committed,
                started_from: committed,
                parked: conn.is_none(),
                dead_letters,
                ..WriterState::default()
            },
            started,
            result: None,
        });
    }
    serve(&mut slots, batches, context);
    results.extend(slots.into_iter().map(|slot| {
        let result = slot.result.expect("every projection ended");
        (slot.idx, result)
    }));
    results
}

/// The batch loop of a writer thread.
fn serve<E>(
    slots: &mut [Slot<'_, '_, E>],
    batches: &Receiver<Message<E>>,
    context: &RunContext<'_>,
) {
    while slots.iter().any(Slot::running) {
        let message = batches.recv();
        let running = slots.iter_mut().filter(|slot| slot.running());
        if context
            .options
            .cancel
            .is_some_and(CancelToken::is_cancelled)
        {
            running.for_each(|slot| slot.end(Stop::Cancelled, context));
            return;
        }
        match message {
            Ok(Message::Batch { events, read_at }) => {
                for slot in running {
                    match slot.apply(&events, read_at, context) {
                        Ok(true) => slot.report(context, None),
                        Ok(false) => {}
                        Err(stop) => slot.end(stop, context),
                    }
                }
            }
            Ok(Message::CaughtUp { through }) => {
                for slot in running {
                    match slot.catch_up(through, context) {
                        Ok(()) => slot.report(context, None),
                        Err(stop) => slot.end(stop, context),
                    }
                }
            }
            Ok(Message::End { through }) => {
                running.for_each(|slot| slot.end(Stop::End { through }, context));
            }
            Ok(Message::ReadFailed(source)) => {
                running.for_each(|slot| slot.end(Stop::ReadFailed(Arc::clone(&source)), context));
            }
            Ok(Message::Poison { error, projections }) => {
                for slot in running.filter(|slot| projections.contains(&slot.idx)) {
                    match slot.skip_poison(&error, context) {
                        Ok(true) => slot.report(context, None),
                        Ok(false) => {}
                        Err(stop) => slot.end(stop, context),
                    }
                }
            }
            // The reader ended without saying why (it panicked): the
            // projections stop at their last commits, like any read failure.
            Err(mpsc::RecvError) => {
                let source = Arc::new(Error::External {
                    step: "read the event log".into(),
                    source: "the reader stopped without finishing".into(),
                });
                running.for_each(|slot| slot.end(Stop::ReadFailed(Arc::clone(&source)), context));
            }
        }
    }
}

#[derive(Default)]
struct WriterState {
    /// The checkpoint as committed.
    committed: u64,
    /// The checkpoint as applied in the open group (equal to `committed` between groups).
    applied: u64,
    /// The checkpoint as saved in the open transaction (`committed` when it
    /// began); below `applied` when a parked projection skipped batches.
    written: u64,
    /// Events applied in this run (committed or in the open group).
    processed: u64,
    /// Batches applied in this run; numbers the batches for the step hook.
    batches: u64,
    /// The checkpoint the run started from.
    started_from: u64,
    /// Caught up with the log in a follow run.
    following: bool,
    /// When the oldest batch of the open group was read.
    oldest_read: Option<Instant>,
    /// The projection's connection is parked between the messages that
    /// concern it: it has no open group, and `applied` may run ahead of
    /// `committed` over events of types it does not handle.
    parked: bool,
    /// From the read of the last committed group's oldest batch to its commit.
    batch_latency: Option<Duration>,
    /// `Handler::caught_up` ran in this run.
    caught_up: bool,
    /// Dead letters in the file (committed or in the open group).
    dead_letters: u64,
    /// Of them, recorded in this run.
    dead_lettered: u64,
}

/// Why a projection stopped.
enum Stop {
    End {
        through: u64,
    },
    Cancelled,
    Handler {
        first: u64,
        last: u64,
        source: BoxError,
    },
    Failed(Error),
    ReadFailed(Arc<Error>),
    /// The file holds its bound of dead letters and another event failed.
    DeadLettersFull {
        max: u32,
        last_error: String,
    },
}

/// One open write transaction holding one or more batches.
struct Group<'c> {
    tx: Transaction<'c>,
    started: Instant,
}

/// How a projection's file is written during the batch loop.
enum Mode<'c, E> {
    /// Its writer connection is held for the whole run; batches go into the
    /// open commit group, committed once it is a commit interval old.
    Held {
        conn: &'c Connection,
        group: Option<Group<'c>>,
    },
    /// Its connection is parked between the messages that concern it;
    /// batches are kept and applied together when its file is next opened
    /// (a visit, see `visit_batch`).
    Parked(Parked<E>),
}

/// A parked projection's kept batches.
struct Parked<E> {
    /// When its file was last opened.
    visited: Instant,
    /// Batches not applied yet.
    pending: Vec<Arc<Vec<GlobalEvent<E>>>>,
    /// When the oldest of them arrived.
    pending_since: Instant,
}

/// A projection during the batch loop: how its file is written (held or
/// parked), where it stands; its result once it has ended.
struct Slot<'p, 'c, E> {
    idx: usize,
    name: String,
    projection: ProjectionTarget<'p, E>,
    /// What it does with an event it cannot apply.
    on_error: OnError,
    keeper: Keeper<'p>,
    mode: Mode<'c, E>,
    /// The event types its handler declares (`None`: all).
    types: Option<Vec<String>>,
    state: WriterState,
    started: Instant,
    result: Option<Result<RebuildResult>>,
}

impl<'c, E> Slot<'_, 'c, E> {
    fn running(&self) -> bool {
        self.result.is_none()
    }

    /// The writer connection, when it is held for the run.
    fn held_conn(&self) -> Option<&'c Connection> {
        match &self.mode {
            Mode::Held { conn, .. } => Some(*conn),
            Mode::Parked(_) => None,
        }
    }

    /// Runs `f` in the open group of a held projection (opened if none is).
    fn in_group<T>(&mut self, f: impl FnOnce(&mut Self, &Transaction<'c>) -> T) -> Result<T> {
        self.open_group()?;
        let Mode::Held { group, .. } = &mut self.mode else {
            unreachable!("only a held projection has groups")
        };
        let open = group.take().expect("a group is open");
        let value = f(self, &open.tx);
        if let Mode::Held { group, .. } = &mut self.mode {
            *group = Some(open);
        }
        Ok(value)
    }

    /// Whether the open group is a commit interval old.
    fn group_due(&self, context: &RunContext<'_>) -> bool {
        match &self.mode {
            Mode::Held {
                group: Some(open), ..
            } => open.started.elapsed() >= context.commit_interval,
            _ => false,
        }
    }

    /// Applies the part of `batch` this projection does not have yet, in the
    /// open group (opened if none is), and commits the group once it is older
    /// than the commit interval. Returns whether there was anything to apply.
    fn apply(
        &mut self,
        batch: &Arc<Vec<GlobalEvent<E>>>,
        read_at: Instant,
        context: &RunContext<'_>,
    ) -> std::result::Result<bool, Stop> {
        // Skip what this projection already has (projections resumed from
        // different checkpoints share one read).
        let fresh_from = batch.partition_point(|e| e.sequence <= self.state.applied);
        let events = &batch[fresh_from..];
        if events.is_empty() {
            return Ok(false);
        }
        if matches!(self.mode, Mode::Parked(_)) {
            return self.visit_batch(batch, fresh_from, read_at, context);
        }
        self.state.oldest_read = Some(self.state.oldest_read.unwrap_or(read_at).min(read_at));
        self.state.batches += 1;
        self.in_group(|slot, tx| slot.apply_batch(tx, events, context))
            .map_err(Stop::Failed)??;
        if self.group_due(context) {
            self.commit_group(context).map_err(Stop::Failed)?;
        }
        Ok(true)
    }

    /// A parked projection's share of a batch. It is kept (the batch is
    /// shared with the other projections) until [`PARKED_PENDING_BATCHES_MAX`]
    /// are, or the oldest is a commit interval old, or the reader reaches the
    /// head; then the file is opened and they are applied and committed
    /// together, as a commit group. A batch with nothing of its types, while
    /// none is kept, leaves the file alone (its checkpoint catches up later,
    /// see `catch_up`). Returns whether anything was committed.
    fn visit_batch(
        &mut self,
        batch: &Arc<Vec<GlobalEvent<E>>>,
        fresh_from: usize,
        read_at: Instant,
        context: &RunContext<'_>,
    ) -> std::result::Result<bool, Stop> {
        let events = &batch[fresh_from..];
        let Mode::Parked(parked) = &mut self.mode else {
            unreachable!("only a parked projection keeps batches")
        };
        if parked.pending.is_empty()
            && let Some(types) = &self.types
            && !events.iter().any(|e| types.contains(&e.event_type))
        {
            self.state.applied = events.last().expect("batch is not empty").sequence;
            return Ok(false);
        }
        if parked.pending.is_empty() {
            parked.pending_since = Instant::now();
        }
        parked.pending.push(Arc::clone(batch));
        self.state.oldest_read = Some(self.state.oldest_read.unwrap_or(read_at).min(read_at));
        let full = parked.pending.len() >= PARKED_PENDING_BATCHES_MAX;
        if full || parked.pending_since.elapsed() >= context.commit_interval {
            self.flush_pending(context, None)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Applies a parked projection's kept batches in one visit; with
    /// `through`, also moves its checkpoint up to it (a follower at the head).
    fn flush_pending(
        &mut self,
        context: &RunContext<'_>,
        through: Option<u64>,
    ) -> std::result::Result<(), Stop> {
        let pending = match &mut self.mode {
            Mode::Parked(parked) => std::mem::take(&mut parked.pending),
            Mode::Held { .. } => Vec::new(),
        };
        if pending.is_empty() && through.is_none() {
            return Ok(());
        }
        self.visit(context, |slot, tx| {
            for batch in &pending {
                let from = batch.partition_point(|e| e.sequence <= slot.state.applied);
                let events = &batch[from..];
                if !events.is_empty() {
                    slot.state.batches += 1;
                    slot.apply_batch(tx, events, context)?;
                }
            }
            if let Some(through) = through {
                slot.move_checkpoint(tx, through).map_err(Stop::Failed)?;
            }
            Ok(())
        })
    }

    /// Opens a parked projection's file, runs `f` in one write transaction
    /// (after the handler's `setup`, which a new connection needs: it may
    /// configure the connection), commits, and parks the file again.
    fn visit<T>(
        &mut self,
        context: &RunContext<'_>,
        f: impl FnOnce(&mut Self, &Transaction<'_>) -> std::result::Result<T, Stop>,
    ) -> std::result::Result<T, Stop> {
        let db = self.projection.db;
        let result = self.visit_open(db, context, f);
        db.park_quickly();
        if let Mode::Parked(parked) = &mut self.mode {
            parked.visited = Instant::now();
        }
        result
    }

    fn visit_open<T>(
        &mut self,
        db: &ProjectionDb,
        context: &RunContext<'_>,
        f: impl FnOnce(&mut Self, &Transaction<'_>) -> std::result::Result<T, Stop>,
    ) -> std::result::Result<T, Stop> {
        let conn = db.lock_writer().map_err(Stop::Failed)?;
        let label = format!("projection {}: open its file again", self.name);
        let cache_kib = i64::try_from(context.page_cache_kib()).unwrap_or(i64::MAX);
        conn.pragma_update(None, "cache_size", -cache_kib)
            .and_then(|()| conn.pragma_update(None, "wal_autocheckpoint", PARKED_WAL_PAGES_MAX))
            .map_err(|e| Stop::Failed(Error::sqlite(label.clone())(e)))?;
        let tx = Transaction::new_unchecked(&conn, TransactionBehavior::Immediate)
            .map_err(|e| Stop::Failed(Error::sqlite(label.clone())(e)))?;
        self.projection.handler.setup(&tx).map_err(|source| {
            Stop::Failed(Error::Setup {
                name: self.name.clone(),
                source,
            })
        })?;
        self.keeper
            .check_in_file(&tx, &self.name, self.state.committed)
            .map_err(Stop::Failed)?;
        self.state.written = self.state.committed;
        match f(self, &tx) {
            Ok(value) => {
                self.commit(tx, context).map_err(Stop::Failed)?;
                Ok(value)
            }
            // The batches before the one that failed commit with their
            // checkpoint, as a commit group's do.
            Err(stop) => {
                let _ = self.commit(tx, context);
                Err(stop)
            }
        }
    }

    fn open_group(&mut self) -> Result<()> {
        let Mode::Held { conn, group } = &mut self.mode else {
            unreachable!("only a held projection has groups")
        };
        if group.is_none() {
            let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)
                .map_err(Error::sqlite(format!("projection {}: begin", self.name)))?;
            *group = Some(Group {
                tx,
                started: Instant::now(),
            });
            self.state.written = self.state.committed;
        }
        Ok(())
    }

    /// Applies one batch inside the open group, in a savepoint, and saves the
    /// checkpoint (when it lives in the file) in the same transaction.
    fn apply_batch(
        &mut self,
        tx: &Transaction<'_>,
        events: &[GlobalEvent<E>],
        context: &RunContext<'_>,
    ) -> std::result::Result<(), Stop> {
        let Slot {
            name,
            projection,
            keeper,
            state,
            on_error,
            ..
        } = self;
        let first = events.first().expect("batch is not empty").sequence;
        let last = events.last().expect("batch is not empty").sequence;
        assert!(
            first > state.applied,
            "batch starts at {first}, at or below the checkpoint {}",
            state.applied
        );
        let sql_failed = |source| {
            Stop::Failed(Error::sqlite(format!(
                "projection {name}: events {first}..={last}"
            ))(source))
        };
        tx.execute_batch("SAVEPOINT batch").map_err(sql_failed)?;
        step(context, name, BatchStep::Begun, state.batches);
        if let Err(source) = call_handler(&mut *projection.handler, tx, events) {
            let skip = match *on_error {
                OnError::Skip { max_dead_letters } if !crate::error::is_transient(&*source) => {
                    Some(max_dead_letters)
                }
                _ => None,
            };
            let Some(max_dead_letters) = skip else {
                tx.execute_batch("ROLLBACK TO batch; RELEASE batch")
                    .map_err(sql_failed)?;
                return Err(Stop::Handler {
                    first,
                    last,
                    source,
                });
            };
            // Applied again one event at a time, each in a savepoint of its
            // own: those that fail are rolled back alone and dead-lettered.
            tx.execute_batch("ROLLBACK TO batch").map_err(sql_failed)?;
            let skipped = apply_skipping(
                tx,
                &mut *projection.handler,
                events,
                name,
                state,
                max_dead_letters,
            );
            if let Err(stop) = skipped {
                tx.execute_batch("ROLLBACK TO batch; RELEASE batch")
                    .map_err(sql_failed)?;
                return Err(stop);
            }
        }
        step(context, name, BatchStep::Applied, state.batches);
        if keeper.in_batch(tx, last).map_err(Stop::Failed)? {
            step(context, name, BatchStep::CheckpointSaved, state.batches);
        }
        state.written = last;
        tx.execute_batch("RELEASE batch").map_err(sql_failed)?;
        assert!(
            last > state.applied,
            "checkpoint went back: {} -> {last}",
            state.applied
        );
        state.applied = last;
        state.processed += events.len() as u64;
        Ok(())
    }

    /// A poison event (its payload does not decode) of a type this projection
    /// handles: with [`OnError::Skip`], recorded as a dead letter with the
    /// checkpoint moved past it, in the open group (a parked projection's
    /// kept batches first); otherwise, or past the bound, the stop. Returns
    /// whether anything was recorded.
    fn skip_poison(
        &mut self,
        error: &Arc<Error>,
        context: &RunContext<'_>,
    ) -> std::result::Result<bool, Stop> {
        let OnError::Skip { max_dead_letters } = self.on_error else {
            return Err(Stop::ReadFailed(Arc::clone(error)));
        };
        let Some((sequence, stream_id, event_type)) = error.event() else {
            return Err(Stop::ReadFailed(Arc::clone(error)));
        };
        if sequence <= self.state.applied {
            return Ok(false);
        }
        if self.state.dead_letters >= u64::from(max_dead_letters) {
            return Err(Stop::DeadLettersFull {
                max: max_dead_letters,
                last_error: error_text(&**error),
            });
        }
        let text = error_text(&**error);
        let failed = Failed {
            sequence,
            stream_id,
            stream_version: None,
            event_type,
            error: &text,
        };
        let name = self.name.clone();
        let record = |slot: &mut Self, tx: &Transaction<'_>| -> std::result::Result<(), Stop> {
            crate::dead_letters::record(tx, &failed).map_err(|e| {
                Stop::Failed(Error::sqlite(format!(
                    "projection {name}: record dead letter {sequence}"
                ))(e))
            })?;
            slot.keeper.in_batch(tx, sequence).map_err(Stop::Failed)?;
            slot.state.written = sequence;
            slot.state.applied = sequence;
            slot.state.dead_letters += 1;
            slot.state.dead_lettered += 1;
            Ok(())
        };
        if matches!(self.mode, Mode::Parked(_)) {
            self.flush_pending(context, None)?;
            self.visit(context, record)?;
            return Ok(true);
        }
        self.in_group(record).map_err(Stop::Failed)??;
        if self.group_due(context) {
            self.commit_group(context).map_err(Stop::Failed)?;
        }
        Ok(true)
    }

    /// Commits the open group, if any; then, for an external checkpoint, saves it.
    fn commit_group(&mut self, context: &RunContext<'_>) -> Result<()> {
        let open = match &mut self.mode {
            Mode::Held { group, .. } => group.take(),
            Mode::Parked(_) => None,
        };
        let Some(open) = open else {
            return Ok(());
        };
        self.commit(open.tx, context)
    }

    /// Commits `tx`, which holds what was applied since the last commit.
    fn commit(&mut self, tx: Transaction<'_>, context: &RunContext<'_>) -> Result<()> {
        let (name, state) = (&self.name, &mut self.state);
        // On refusal the transaction is dropped, which rolls it back.
        guard(context, name, state.committed)?;
        tx.commit().map_err(Error::sqlite(format!(
            "projection {name}: commit of the events up to {} failed (rolled back); committed through sequence {}",
            state.applied, state.committed
        )))?;
        step(context, name, BatchStep::Committed, state.batches);
        if let Some(read_at) = state.oldest_read.take() {
            state.batch_latency = Some(read_at.elapsed());
        }
        if self.keeper.after_commit(state.applied, state.committed)? {
            step(context, name, BatchStep::CheckpointSaved, state.batches);
        }
        state.committed = state.applied;
        Ok(())
    }

    /// A follower reached the head: commits the open group at once (a new
    /// event must not wait for the commit interval), with the checkpoint moved
    /// up to where the reader scanned through; the first time, records
    /// `following`.
    ///
    /// A parked projection's file is opened for this only the first time, and
    /// then when its checkpoint has fallen behind over events of other types
    /// and it was last opened [`PARKED_CHECKPOINT_INTERVAL`] ago: a new event
    /// must not open every file of the run.
    fn catch_up(
        &mut self,
        through: u64,
        context: &RunContext<'_>,
    ) -> std::result::Result<(), Stop> {
        if let Mode::Parked(parked) = &self.mode {
            let first = !self.state.following;
            let behind = self.state.applied.max(through) > self.state.committed
                && parked.visited.elapsed() >= PARKED_CHECKPOINT_INTERVAL;
            if first || behind || !parked.pending.is_empty() {
                self.flush_pending(context, Some(through))?;
            } else {
                self.state.applied = self.state.applied.max(through);
            }
            self.state.following = true;
            return self.run_caught_up(context).map_err(Stop::Failed);
        }
        let news = through > self.state.applied || !self.state.following;
        let open = matches!(self.mode, Mode::Held { group: Some(_), .. });
        if !open && !news {
            return Ok(());
        }
        self.in_group(|slot, tx| slot.move_checkpoint(tx, through))
            .map_err(Stop::Failed)?
            .map_err(Stop::Failed)?;
        self.commit_group(context).map_err(Stop::Failed)?;
        self.state.following = true;
        self.run_caught_up(context).map_err(Stop::Failed)
    }

    /// Once per run, at the log's head, after the commit:
    /// [`Handler::caught_up`] in a transaction of its own.
    fn run_caught_up(&mut self, context: &RunContext<'_>) -> Result<()> {
        if self.state.caught_up {
            return Ok(());
        }
        let held = self.held_conn();
        let name = &self.name;
        let committed = self.state.committed;
        let handler = &mut *self.projection.handler;
        let mut run = |conn: &Connection, reopened: bool| -> Result<()> {
            let label = || format!("projection {name}: caught_up (run at the log's head)");
            // Building an index sorts the whole table: its sorted runs go to
            // temporary files, not memory (`temp_store=MEMORY` is for the
            // batches' savepoint journals, which a batch bounds), and SQLite
            // sizes its sort buffer by the page cache, so both are kept
            // small meanwhile: the pages are written in key order.
            let cache_kib = i64::try_from(context.page_cache_kib()).unwrap_or(i64::MAX);
            let sort_kib = i64::try_from(CAUGHT_UP_CACHE_KIB).unwrap_or(i64::MAX);
            conn.pragma_update(None, "temp_store", "FILE")
                .and_then(|()| conn.pragma_update(None, "cache_size", -sort_kib.min(cache_kib)))
                .map_err(Error::sqlite(label()))?;
            let done = (|| {
                let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)
                    .map_err(Error::sqlite(label()))?;
                // A parked projection's file is opened anew: its handler
                // configures the connection first, as in every visit.
                if reopened {
                    handler.setup(&tx).map_err(|source| Error::Setup {
                        name: name.clone(),
                        source,
                    })?;
                }
                handler.caught_up(&tx).map_err(|source| Error::CaughtUp {
                    name: name.clone(),
                    source,
                })?;
                // On refusal the transaction is dropped, which rolls it back.
                guard(context, name, committed)?;
                tx.commit().map_err(Error::sqlite(label()))
            })();
            let restored = conn
                .pragma_update(None, "temp_store", "MEMORY")
                .and_then(|()| conn.pragma_update(None, "cache_size", -cache_kib))
                .map_err(Error::sqlite(label()));
            // The hook's own failure is the one to report.
            done.and(restored)
        };
        match held {
            Some(conn) => run(conn, false)?,
            None => {
                let db = self.projection.db;
                let done = db.with_connection(|conn| run(conn, true));
                db.park();
                done?;
            }
        }
        self.state.caught_up = true;
        Ok(())
    }

    /// In the transaction about to commit: the checkpoint moves up to
    /// `through` (events of other types in between), and the first time the
    /// projection is recorded as `following`.
    fn move_checkpoint(&mut self, tx: &Transaction<'_>, through: u64) -> Result<()> {
        if through > self.state.written {
            self.keeper.in_batch(tx, through)?;
            self.state.written = through;
            self.state.applied = self.state.applied.max(through);
        }
        if !self.state.following {
            record_following(tx, self.projection.consumer_id).map_err(Error::sqlite(format!(
                "projection {}: record following",
                self.name
            )))?;
        }
        Ok(())
    }

    /// At the end of the log, moves the checkpoint up to where the reader
    /// scanned through: with an event-type filter the last matching event can
    /// be well below that, and the events in between are of types this run
    /// does not handle.
    fn finish_at_head(&mut self, head: u64, context: &RunContext<'_>) -> Result<()> {
        if head <= self.state.committed {
            return Ok(());
        }
        guard(context, &self.name, self.state.committed)?;
        match self.held_conn() {
            Some(conn) => self.keeper.advance(conn, &self.name, head)?,
            None => {
                let db = self.projection.db;
                let advanced =
                    db.with_connection(|conn| self.keeper.advance(conn, &self.name, head));
                db.park();
                advanced?;
            }
        }
        self.state.committed = head;
        self.state.applied = head;
        Ok(())
    }

    /// Ends the projection: whatever stopped it, the batches applied so far
    /// are complete, so they commit with their checkpoint; then the outcome is
    /// recorded in the file and reported.
    fn end(&mut self, stop: Stop, context: &RunContext<'_>) {
        // A parked projection's kept batches were received: they are applied
        // as an open group is committed (a failure among them is the stop).
        let stop = match self.flush_pending(context, None) {
            Ok(()) => stop,
            Err(failed) => failed,
        };
        let result = self
            .commit_group(context)
            .and_then(|()| self.outcome(stop, context));
        match self.held_conn() {
            Some(conn) => record(conn, self.projection.consumer_id, &result),
            None => {
                let db = self.projection.db;
                let _ = db.with_connection(|conn| {
                    record(conn, self.projection.consumer_id, &result);
                    Ok(())
                });
                db.park();
            }
        }
        let name = self.name.clone();
        self.result = Some(conclude(
            context,
            self.idx,
            name,
            &self.state,
            self.started,
            result,
        ));
    }

    fn outcome(&mut self, stop: Stop, context: &RunContext<'_>) -> Result<()> {
        let name = self.name.clone();
        let committed = self.state.committed;
        match stop {
            Stop::End { through } => self
                .finish_at_head(through, context)
                .and_then(|()| self.run_caught_up(context)),
            Stop::Cancelled => Err(Error::Cancelled { name, committed }),
            Stop::Handler {
                first,
                last,
                source,
            } => Err(Error::Handler {
                name,
                committed,
                first_sequence: first,
                last_sequence: last,
                source,
            }),
            Stop::Failed(e) => Err(e),
            Stop::DeadLettersFull { max, last_error } => Err(Error::DeadLettersFull {
                name,
                max,
                committed,
                last_error,
            }),
            Stop::ReadFailed(source) => Err(Error::Replay {
                name,
                committed,
                source,
            }),
        }
    }

    fn report(&self, context: &RunContext<'_>, err: Option<&Error>) {
        report(context, &self.name, &self.state, false, err);
    }
}

/// Records a projection's outcome in its file, for `status`. Best effort:
/// failing to record it must not hide the run's own result; and waiting long
/// for a file another connection holds would delay the run's end for the
/// others, so the record waits no longer than a start does.
fn record(conn: &Connection, consumer_id: &str, result: &Result<()>) {
    let wait = |ms: u32| Duration::from_millis(u64::from(ms));
    let _ = conn.busy_timeout(wait(START_BUSY_TIMEOUT_MS));
    let _ = record_outcome(conn, consumer_id, result);
    let _ = conn.busy_timeout(wait(BUSY_TIMEOUT_MS));
}

/// A projection has ended: reports it, counts it, and makes its result.
fn conclude(
    context: &RunContext<'_>,
    idx: usize,
    name: String,
    state: &WriterState,
    started: Instant,
    result: Result<()>,
) -> Result<RebuildResult> {
    report(context, &name, state, true, result.as_ref().err());
    context.projection_ended(idx);
    result.map(|()| RebuildResult {
        projection_name: name,
        processed: state.processed,
        checkpoint: state.committed,
        total: context.head(),
        elapsed: started.elapsed(),
        dead_letters: state.dead_letters,
        dead_lettered: state.dead_lettered,
    })
}

/// Prepares a run; returns the checkpoint it starts from and the dead letters
/// its file holds.
fn begin_run<E>(
    projection: &mut ProjectionTarget<'_, E>,
    keeper: &Keeper<'_>,
    start: Start,
    context: &RunContext<'_>,
) -> Result<(u64, u64)> {
    validate_consumer_id(projection.consumer_id)?;
    let name = projection.db.name().to_string();
    let consumer_id = projection.consumer_id;
    let handler = &mut *projection.handler;
    keeper.check(projection.db)?;
    keeper.before_start(start)?;
    let in_file_checkpoint = projection.db.with_connection(|conn| {
        let label = || format!("projection {name}: start");
        // A file another connection is writing fails this projection quickly
        // instead of holding back every projection of the run.
        let wait = |ms: u32| Duration::from_millis(u64::from(ms));
        conn.busy_timeout(wait(START_BUSY_TIMEOUT_MS))
            .map_err(Error::sqlite(label()))?;
        // A negative cache size is in KiB; pages beyond it are let go now.
        let cache_kib = i64::try_from(context.page_cache_kib()).unwrap_or(i64::MAX);
        conn.pragma_update(None, "cache_size", -cache_kib)
            .map_err(Error::sqlite(label()))?;
        let conn: &Connection = conn;
        let began = Transaction::new_unchecked(conn, TransactionBehavior::Immediate);
        conn.busy_timeout(wait(BUSY_TIMEOUT_MS))
            .map_err(Error::sqlite(label()))?;
        let tx = began.map_err(Error::sqlite(format!(
            "projection {name}: start (another connection is writing to its file)"
        )))?;
        if start == Start::Reset {
            drop_projection_objects(&tx).map_err(Error::sqlite(label()))?;
        }
        let checkpoint = keeper.in_start(&tx, start)?;
        handler.setup(&tx).map_err(|source| Error::Setup {
            name: name.clone(),
            source,
        })?;
        record_running(&tx, consumer_id, start == Start::Reset).map_err(Error::sqlite(label()))?;
        let dead_letters = crate::dead_letters::dead_letter_count(&tx)?;
        check_within_head(&name, checkpoint, context)?;
        guard(context, &name, checkpoint)?;
        tx.commit().map_err(Error::sqlite(label()))?;
        Ok((checkpoint, dead_letters))
    })?;
    let (in_file_checkpoint, dead_letters) = in_file_checkpoint;
    let checkpoint = keeper.start_point(in_file_checkpoint)?;
    check_within_head(&name, checkpoint, context)?;
    Ok((checkpoint, dead_letters))
}

/// A checkpoint past the log's head means the projection was built from another
/// (or a longer) log: resuming would call it current when it is not.
fn check_within_head(name: &str, checkpoint: u64, context: &RunContext<'_>) -> Result<()> {
    if checkpoint > context.head() {
        return Err(Error::CheckpointBeyondHead {
            name: name.to_owned(),
            checkpoint,
            head: context.head(),
        });
    }
    Ok(())
}

/// Applies `events` one at a time, each in a savepoint of its own (inside the
/// batch's savepoint, rolled back to its start): one that fails is rolled
/// back alone and recorded as a dead letter, unless its error comes from the
/// environment (tried again later, never dead-lettered) or the file holds
/// `max_dead_letters` already; both stop the projection (the caller rolls the
/// batch back).
fn apply_skipping<E>(
    tx: &Transaction<'_>,
    handler: &mut dyn Handler<E>,
    events: &[GlobalEvent<E>],
    name: &str,
    state: &mut WriterState,
    max_dead_letters: u32,
) -> std::result::Result<(), Stop> {
    let (dead_letters, dead_lettered) = (state.dead_letters, state.dead_lettered);
    let applied = (|| {
        for event in events {
            let sql_failed = |source| {
                Stop::Failed(Error::sqlite(format!(
                    "projection {name}: event {}",
                    event.sequence
                ))(source))
            };
            tx.execute_batch("SAVEPOINT event").map_err(sql_failed)?;
            let Err(source) = call_handler(handler, tx, std::slice::from_ref(event)) else {
                tx.execute_batch("RELEASE event").map_err(sql_failed)?;
                continue;
            };
            tx.execute_batch("ROLLBACK TO event; RELEASE event")
                .map_err(sql_failed)?;
            let text = error_text(&*source);
            if crate::error::is_transient(&*source) {
                return Err(Stop::Handler {
                    first: event.sequence,
                    last: event.sequence,
                    source,
                });
            }
            if state.dead_letters >= u64::from(max_dead_letters) {
                return Err(Stop::DeadLettersFull {
                    max: max_dead_letters,
                    last_error: text,
                });
            }
            let failed = Failed {
                sequence: event.sequence,
                stream_id: &event.stream_id,
                stream_version: Some(event.stream_version),
                event_type: &event.event_type,
                error: &text,
            };
            crate::dead_letters::record(tx, &failed).map_err(sql_failed)?;
            state.dead_letters += 1;
            state.dead_lettered += 1;
        }
        Ok(())
    })();
    if applied.is_err() {
        // Rolled back with the batch.
        state.dead_letters = dead_letters;
        state.dead_lettered = dead_lettered;
    }
    applied
}

/// Asks the commit guard, if any, whether this projection may commit.
fn guard(context: &RunContext<'_>, name: &str, committed: u64) -> Result<()> {
    let Some(guard) = context.options.commit_guard else {
        return Ok(());
    };
    guard(name).map_err(|source| Error::Fenced {
        name: name.to_owned(),
        committed,
        source,
    })
}

#[cfg(feature = "testing")]
fn step(context: &RunContext<'_>, name: &str, step: BatchStep, batch: u64) {
    if let Some(hook) = context.options.step_hook {
        hook(name, step, batch);
    }
}

/// Without the `testing` feature there is no step hook: nothing to call.
#[cfg(not(feature = "testing"))]
#[inline(always)]
fn step(_context: &RunContext<'_>, _name: &str, _step: BatchStep, _batch: u64) {}

fn report(
    context: &RunContext<'_>,
    name: &str,
    state: &WriterState,
    done: bool,
    err: Option<&Error>,
) {
    let Some(progress) = context.options.progress else {
        return;
    };
    // A parked projection is current through `applied`: what lies beyond its
    // committed checkpoint is events of types it does not handle.
    let checkpoint = if state.parked && !done {
        state.applied
    } else {
        state.committed
    };
    progress(&Progress {
        projection_name: name.to_owned(),
        processed: state.processed,
        total: context.head(),
        checkpoint,
        started_from: state.started_from,
        done,
        err: err.map(ToString::to_string),
        following: state.following && !done,
        batch_latency: state.batch_latency,
        hole_wait: if state.following && !done {
            context.hole_wait()
        } else {
            None
        },
        dead_letters: state.dead_letters,
    });
}
