//! The writer side of a run: one thread per projection applies the batches the
//! reader hands it.
//!
//! Batches are applied inside *commit groups*: one write transaction holds one or
//! more batches, each inside its own savepoint, and the checkpoint is saved after
//! every batch inside the same transaction. The group commits when it is older
//! than the commit interval, at the end of the log, on cancellation and on
//! failure. So a crash loses at most one group and never separates rows from
//! their checkpoint (exactly-once), and a failing batch is rolled back alone: the
//! batches before it still commit with their checkpoint. Fewer, larger commits are
//! what make a rebuild fast (each commit rewrites every page it touched).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use rusqlite::{Connection, Transaction, TransactionBehavior};

use crate::checkpoint::validate_consumer_id;
use crate::dir::drop_projection_objects;
use crate::error::{BoxError, Error, Result};
use crate::event::GlobalEvent;
use crate::handler::Handler;
use crate::limits::{BUSY_TIMEOUT_MS, START_BUSY_TIMEOUT_MS};
use crate::outcome::{record_following, record_outcome, record_running};
use crate::progress::{BatchStep, CancelToken, Progress};

use super::keeper::Keeper;
use super::types::{Message, ProjectionTarget, RebuildResult, RunContext, Start};

/// The writer thread of one projection: start, then apply batches until the end.
pub(super) fn write_projection<E>(
    mut projection: ProjectionTarget<'_, E>,
    start: Start,
    batches: &Receiver<Message<E>>,
    start_tx: Sender<Option<u64>>,
    context: &RunContext<'_>,
) -> Result<RebuildResult> {
    let started = Instant::now();
    let mut state = WriterState::default();
    let keeper = Keeper::new(projection.checkpoint, projection.consumer_id);
    let result = match begin_run(&mut projection, &keeper, start, context) {
        Ok(committed) => {
            state.committed = committed;
            state.applied = committed;
            state.started_from = committed;
            let _ = start_tx.send(Some(committed));
            drop(start_tx);
            apply_all(&mut projection, &keeper, batches, context, &mut state)
        }
        Err(e) => {
            let _ = start_tx.send(None);
            Err(e)
        }
    };
    // Best effort: the outcome is for `status`; failing to record it must not
    // hide the run's own result.
    // Waiting long for a file another connection holds would delay the run's
    // end for the others: the record waits no longer than a start does.
    let _ = projection.db.with_connection(|conn| {
        let wait = |ms: u32| Duration::from_millis(u64::from(ms));
        let _ = conn.busy_timeout(wait(START_BUSY_TIMEOUT_MS));
        let recorded = record_outcome(conn, projection.consumer_id, &result);
        let _ = conn.busy_timeout(wait(BUSY_TIMEOUT_MS));
        recorded.map_err(Error::sqlite("record the outcome"))
    });
    let name = projection.db.name().to_string();
    report(context, &name, &state, true, result.as_ref().err());
    context.writer_ended();
    result.map(|()| RebuildResult {
        projection_name: name,
        processed: state.processed,
        checkpoint: state.committed,
        total: context.head(),
        elapsed: started.elapsed(),
    })
}

#[derive(Default)]
struct WriterState {
    /// The checkpoint as committed.
    committed: u64,
    /// The checkpoint as applied in the open group (equal to `committed` between groups).
    applied: u64,
    /// Events applied in this run (committed or in the open group).
    processed: u64,
    /// Batches applied in this run; numbers the batches for the step hook.
    batches: u64,
    /// The checkpoint the run started from.
    started_from: u64,
    /// Caught up with the log in a follow run.
    following: bool,
}

/// Why the batch loop stopped.
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
}

/// One open write transaction holding one or more batches.
struct Group<'c> {
    tx: Transaction<'c>,
    started: Instant,
}

fn apply_all<E>(
    projection: &mut ProjectionTarget<'_, E>,
    keeper: &Keeper<'_>,
    batches: &Receiver<Message<E>>,
    context: &RunContext<'_>,
    state: &mut WriterState,
) -> Result<()> {
    let name = projection.db.name().to_string();
    let db = projection.db;
    let stop = db.with_connection(|conn| {
        let conn: &Connection = conn;
        let mut group: Option<Group<'_>> = None;
        let stop = loop {
            let message = batches.recv();
            if context
                .options
                .cancel
                .is_some_and(CancelToken::is_cancelled)
            {
                break Stop::Cancelled;
            }
            let batch = match message {
                Ok(Message::Batch(batch)) => batch,
                Ok(Message::End { through }) => break Stop::End { through },
                Ok(Message::CaughtUp { through }) => {
                    if let Err(e) = catch_up(
                        projection, keeper, conn, &mut group, through, state, context,
                    ) {
                        break Stop::Failed(e);
                    }
                    report(context, &name, state, false, None);
                    continue;
                }
                Ok(Message::ReadFailed(source) | Message::Poison(source)) => {
                    break Stop::ReadFailed(source);
                }
                // The reader ended without saying why (it panicked): the
                // projection stops at its last commit, like any read failure.
                Err(mpsc::RecvError) => {
                    break Stop::ReadFailed(Arc::new(Error::External {
                        step: "read the event log".into(),
                        source: "the reader stopped without finishing".into(),
                    }));
                }
            };
            // Skip what this projection already has (projections resumed from
            // different checkpoints share one read).
            let fresh_from = batch.partition_point(|e| e.sequence <= state.applied);
            let events = &batch[fresh_from..];
            if events.is_empty() {
                continue;
            }
            if group.is_none() {
                match Transaction::new_unchecked(conn, TransactionBehavior::Immediate) {
                    Ok(tx) => {
                        group = Some(Group {
                            tx,
                            started: Instant::now(),
                        })
                    }
                    Err(source) => {
                        break Stop::Failed(Error::sqlite(format!("projection {name}: begin"))(
                            source,
                        ));
                    }
                }
            }
            let open = group.as_ref().expect("a group is open");
            state.batches += 1;
            if let Err(stop) = apply_batch(projection, keeper, &open.tx, events, state, context) {
                break stop;
            }
            if open.started.elapsed() >= context.commit_interval {
                let open = group.take().expect("a group is open");
                if let Err(e) = commit_group(projection, keeper, open, state, context) {
                    break Stop::Failed(e);
                }
            }
            report(context, &name, state, false, None);
        };
        // Whatever stopped the loop, the batches applied so far are complete:
        // commit them with their checkpoint.
        if let Some(open) = group.take() {
            commit_group(projection, keeper, open, state, context)?;
        }
        Ok(stop)
    })?;
    let committed = state.committed;
    match stop {
        Stop::End { through } => finish_at_head(projection, keeper, through, state, context),
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
        Stop::ReadFailed(source) => Err(Error::Replay {
            name,
            committed,
            source,
        }),
    }
}

/// Applies one batch inside the open group, in a savepoint, and saves the
/// checkpoint (when it lives in the file) in the same transaction.
fn apply_batch<E>(
    projection: &mut ProjectionTarget<'_, E>,
    keeper: &Keeper<'_>,
    tx: &Transaction<'_>,
    events: &[GlobalEvent<E>],
    state: &mut WriterState,
    context: &RunContext<'_>,
) -> std::result::Result<(), Stop> {
    let name = projection.db.name().to_string();
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
    step(context, &name, BatchStep::Begun, state.batches);
    if let Err(source) = call_handler(&mut *projection.handler, tx, events) {
        tx.execute_batch("ROLLBACK TO batch; RELEASE batch")
            .map_err(sql_failed)?;
        return Err(Stop::Handler {
            first,
            last,
            source,
        });
    }
    step(context, &name, BatchStep::Applied, state.batches);
    if keeper.in_batch(tx, last).map_err(Stop::Failed)? {
        step(context, &name, BatchStep::CheckpointSaved, state.batches);
    }
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

/// Commits the open group; then, for an external checkpoint, saves it.
fn commit_group<E>(
    projection: &ProjectionTarget<'_, E>,
    keeper: &Keeper<'_>,
    group: Group<'_>,
    state: &mut WriterState,
    context: &RunContext<'_>,
) -> Result<()> {
    let name = projection.db.name();
    // On refusal the group is dropped, which rolls it back.
    guard(context, name.as_str(), state.committed)?;
    group.tx.commit().map_err(Error::sqlite(format!(
        "projection {name}: commit of the events up to {} failed (rolled back); committed through sequence {}",
        state.applied, state.committed
    )))?;
    step(context, name.as_str(), BatchStep::Committed, state.batches);
    if keeper.after_commit(state.applied, state.committed)? {
        step(
            context,
            name.as_str(),
            BatchStep::CheckpointSaved,
            state.batches,
        );
    }
    state.committed = state.applied;
    Ok(())
}

/// A follower reached the head: commits the open group at once (a new event
/// must not wait for the commit interval), with the checkpoint moved up to
/// where the reader scanned through; the first time, records `following`.
fn catch_up<'c, E>(
    projection: &ProjectionTarget<'_, E>,
    keeper: &Keeper<'_>,
    conn: &'c Connection,
    group: &mut Option<Group<'c>>,
    through: u64,
    state: &mut WriterState,
    context: &RunContext<'_>,
) -> Result<()> {
    let name = projection.db.name();
    let news = through > state.applied || !state.following;
    if group.is_none() && news {
        let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)
            .map_err(Error::sqlite(format!("projection {name}: begin")))?;
        *group = Some(Group {
            tx,
            started: Instant::now(),
        });
    }
    let Some(open) = group.take() else {
        return Ok(());
    };
    if through > state.applied {
        keeper.in_batch(&open.tx, through)?;
        state.applied = through;
    }
    if !state.following {
        record_following(&open.tx, projection.consumer_id).map_err(Error::sqlite(format!(
            "projection {name}: record following"
        )))?;
    }
    commit_group(projection, keeper, open, state, context)?;
    state.following = true;
    Ok(())
}

/// At the end of the log, moves the checkpoint up to where the reader scanned
/// through: with an event-type filter the last matching event can be well below
/// that, and the events in between are of types this run does not handle.
fn finish_at_head<E>(
    projection: &ProjectionTarget<'_, E>,
    keeper: &Keeper<'_>,
    head: u64,
    state: &mut WriterState,
    context: &RunContext<'_>,
) -> Result<()> {
    if head <= state.committed {
        return Ok(());
    }
    guard(context, projection.db.name().as_str(), state.committed)?;
    keeper.advance(projection.db, head)?;
    state.committed = head;
    state.applied = head;
    Ok(())
}

/// Prepares a run; returns the checkpoint it starts from.
fn begin_run<E>(
    projection: &mut ProjectionTarget<'_, E>,
    keeper: &Keeper<'_>,
    start: Start,
    context: &RunContext<'_>,
) -> Result<u64> {
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
        check_within_head(&name, checkpoint, context)?;
        guard(context, &name, checkpoint)?;
        tx.commit().map_err(Error::sqlite(label()))?;
        Ok(checkpoint)
    })?;
    let checkpoint = keeper.start_point(in_file_checkpoint)?;
    check_within_head(&name, checkpoint, context)?;
    Ok(checkpoint)
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

/// Calls the handler; a panic becomes an error, so one broken projection does not
/// take down the others.
fn call_handler<E>(
    handler: &mut dyn Handler<E>,
    tx: &Transaction<'_>,
    events: &[GlobalEvent<E>],
) -> std::result::Result<(), BoxError> {
    match catch_unwind(AssertUnwindSafe(|| handler.apply(tx, events))) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-text panic payload".to_owned());
            Err(format!("handler panicked: {message}").into())
        }
    }
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

fn step(context: &RunContext<'_>, name: &str, step: BatchStep, batch: u64) {
    if let Some(hook) = context.options.step_hook {
        hook(name, step, batch);
    }
}

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
    progress(&Progress {
        projection_name: name.to_owned(),
        processed: state.processed,
        total: context.head(),
        checkpoint: state.committed,
        started_from: state.started_from,
        done,
        err: err.map(ToString::to_string),
        following: state.following && !done,
    });
}
