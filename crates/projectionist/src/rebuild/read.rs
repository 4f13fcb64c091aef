//! The read side of a run: read each batch once, check it, and hand it to every
//! writer thread; at a poison event, stop only the projections that handle its
//! type.

use std::sync::Arc;
use std::sync::mpsc::SyncSender;
use std::time::Instant;

use super::types::{Message, RunContext};
use crate::error::{Error, Result};
use crate::event::GlobalEvent;
use crate::limits::{FOLLOW_QUIET_POLL_DIVISOR, FOLLOW_QUIET_POLL_MAX, PARKED_CHECKPOINT_INTERVAL};
use crate::progress::CancelToken;
use crate::reader::GlobalReader;

/// The log as a run reads it: everything, or only the event types its running
/// projections handle.
pub(super) struct Source<'a, E> {
    pub(super) reader: &'a dyn GlobalReader<E>,
    /// What each projection's handler asked for (`None`: every event), by
    /// place in the run's input.
    pub(super) types_per_projection: Vec<Option<Vec<String>>>,
    /// The union over the projections still running, or `None` when one of
    /// them wants all events.
    pub(super) event_types: Option<Vec<String>>,
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

    /// Reads only what the projections still running handle.
    pub(super) fn narrow_to(&mut self, context: &RunContext<'_>) {
        let mut union: Vec<String> = Vec::new();
        for (idx, types) in self.types_per_projection.iter().enumerate() {
            if !context.running(idx) {
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

    /// Whether projection `idx` handles events of `event_type`.
    fn handles(&self, idx: usize, event_type: &str) -> bool {
        self.types_per_projection[idx]
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

/// Reads batches from `position` and hands each to every writer thread, until
/// the log ends, the run is cancelled, reading fails, or no writer is left. A
/// poison event stops only the projections that handle its type.
///
/// With `follow`, the end of the log is not the end of the run: the writers are
/// told they caught up (so they commit at once), the loop waits for the log to
/// change, and reads on, until `follow` is set; then the writers get the end.
pub(super) fn read_loop<E>(
    reader: &mut Source<'_, E>,
    senders: &mut [Option<SyncSender<Message<E>>>],
    mut position: u64,
    batch_size: u32,
    context: &RunContext<'_>,
    follow: Option<&CancelToken>,
) {
    let cancel = context.options.cancel;
    // When the log last grew, as far as this follower saw: a quiet log is
    // polled less often.
    let mut news_at = Instant::now();
    loop {
        if senders.iter().all(Option::is_none) || cancel.is_some_and(CancelToken::is_cancelled) {
            return;
        }
        if follow.is_some_and(CancelToken::is_cancelled) {
            broadcast(senders, &Message::End { through: position });
            return;
        }
        // Taken before the read, so a commit after the read moves it.
        let token = match follow.map(|_| reader.reader.change_token()).transpose() {
            Ok(token) => token.flatten(),
            Err(e) => {
                broadcast(senders, &Message::ReadFailed(Arc::new(e)));
                return;
            }
        };
        let read = reader.read(position, batch_size).and_then(|read| {
            check_batch(position, batch_size, &read.0)?;
            Ok(read)
        });
        let (events, through) = match read {
            Ok(read) => read,
            Err(e) if poison(&e).is_some() => {
                match pass_poison(reader, senders, position, batch_size, context, e) {
                    Ok(after_poison) => position = after_poison,
                    Err(e) => {
                        broadcast(senders, &Message::ReadFailed(Arc::new(e)));
                        return;
                    }
                }
                continue;
            }
            Err(e) => {
                broadcast(senders, &Message::ReadFailed(Arc::new(e)));
                return;
            }
        };
        let at_end = events.len() < batch_size as usize;
        if through > position {
            news_at = Instant::now();
        }
        if let Some(last) = events.last() {
            position = last.sequence;
            let read_at = Instant::now();
            let events = Arc::new(events);
            broadcast(senders, &Message::Batch { events, read_at });
        }
        if !at_end {
            continue;
        }
        let Some(stop) = follow else {
            broadcast(senders, &Message::End { through });
            return;
        };
        position = position.max(through);
        context.saw_head(through);
        // Held at a hole: the committed events behind it count as lag.
        let hole_wait = reader.reader.hole_wait();
        if hole_wait.is_some()
            && let Ok(head) = reader.reader.head()
        {
            context.saw_head(head);
        }
        context.set_hole_wait(hole_wait);
        broadcast(senders, &Message::CaughtUp { through });
        let all_ended = || context.all_ended();
        // Parked projections move their checkpoints over events of other
        // types only when told the head again (see `Slot::catch_up`): a quiet
        // log is re-read that often.
        let retell = context
            .parks_some()
            .then(|| Instant::now() + PARKED_CHECKPOINT_INTERVAL);
        let waited = wait_for_change(
            reader.reader,
            token,
            news_at,
            retell,
            stop,
            cancel,
            &all_ended,
        );
        if let Err(e) = waited {
            broadcast(senders, &Message::ReadFailed(Arc::new(e)));
            return;
        }
    }
}

/// Waits, without reading the log, until it may have changed since `token`
/// was taken, or until the follower is stopped or cancelled, or no writer is
/// left, or `until` has passed.
fn wait_for_change<E>(
    reader: &dyn GlobalReader<E>,
    token: Option<u64>,
    news_at: Instant,
    until: Option<Instant>,
    stop: &CancelToken,
    cancel: Option<&CancelToken>,
    all_ended: &dyn Fn() -> bool,
) -> Result<()> {
    let busy = reader.poll_interval();
    loop {
        // A poll waits a hundredth of the quiet so far (bounded): the first
        // event after a quiet spell is delayed by at most 1% of it.
        let quiet = news_at.elapsed() / FOLLOW_QUIET_POLL_DIVISOR;
        let interval = busy.max(quiet.min(FOLLOW_QUIET_POLL_MAX));
        let late = until.is_some_and(|until| Instant::now() >= until);
        if late
            || stop.is_cancelled()
            || cancel.is_some_and(CancelToken::is_cancelled)
            || all_ended()
        {
            return Ok(());
        }
        reader.wait_for_hint(interval)?;
        match (token, reader.change_token()?) {
            (Some(before), Some(now)) if before == now => {}
            _ => return Ok(()),
        }
    }
}

/// Hands every writer the events before a poison event, stops the projections
/// that handle its type, and narrows the read to the others. Returns the
/// poison event's sequence, from which the others read on.
fn pass_poison<E>(
    reader: &mut Source<'_, E>,
    senders: &mut [Option<SyncSender<Message<E>>>],
    position: u64,
    batch_size: u32,
    context: &RunContext<'_>,
    error: Error,
) -> Result<u64> {
    let (sequence, event_type) = poison(&error).expect("a poison event");
    let event_type = event_type.to_owned();
    let (before, _) = reader.read_before_poison(position, batch_size)?;
    check_batch(position, batch_size, &before)?;
    if !before.is_empty() {
        let (events, read_at) = (Arc::new(before), Instant::now());
        broadcast(senders, &Message::Batch { events, read_at });
    }
    let projections: Arc<[usize]> = (0..reader.types_per_projection.len())
        .filter(|&idx| context.running(idx) && reader.handles(idx, &event_type))
        .collect();
    // Those that skip poison events dead-letter it and read on.
    for &idx in projections.iter().filter(|&&idx| !context.skips(idx)) {
        context.stop_reading_for(idx);
    }
    if !projections.is_empty() {
        let error = Arc::new(error);
        broadcast(senders, &Message::Poison { error, projections });
    }
    reader.narrow_to(context);
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
            Message::Batch { events, read_at } => Message::Batch {
                events: Arc::clone(events),
                read_at: *read_at,
            },
            Message::End { through } => Message::End { through: *through },
            Message::CaughtUp { through } => Message::CaughtUp { through: *through },
            Message::ReadFailed(e) => Message::ReadFailed(Arc::clone(e)),
            Message::Poison { error, projections } => Message::Poison {
                error: Arc::clone(error),
                projections: Arc::clone(projections),
            },
        };
        // A writer thread whose projections all ended dropped its receiver.
        if sender.send(copy).is_err() {
            *slot = None;
        }
    }
}
