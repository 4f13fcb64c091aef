//! The `Handler` trait: how a projection applies a batch of events inside the
//! transaction that also advances its checkpoint.

use std::panic::{AssertUnwindSafe, catch_unwind};

use rusqlite::Transaction;

use crate::error::BoxError;
use crate::event::GlobalEvent;

/// Applies batches of events to one projection.
///
/// A closure `FnMut(&Transaction, &[GlobalEvent<E>]) -> Result<(), BoxError>` is a
/// handler with no tables of its own; [`SchemaHandler`] pairs a closure with the
/// SQL that creates its tables.
pub trait Handler<E>: Send {
    /// Creates the projection's tables. Called in a write transaction at the start
    /// of every run (after the reset of a rebuild, before a resume), so it must be
    /// idempotent (`CREATE TABLE IF NOT EXISTS ...`). The default does nothing.
    /// In a run of more than [`OPEN_PROJECTIONS_MAX`](crate::limits::OPEN_PROJECTIONS_MAX)
    /// projections, a parked projection's connection is opened anew for the
    /// batches that concern it, and `setup` runs again first, in the same
    /// transaction as those batches: it may configure the connection.
    ///
    /// # Errors
    /// Any error stops the run before it applies anything (for a parked
    /// projection: before it applies the batches at hand).
    fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        let _ = tx;
        Ok(())
    }

    /// The event types this projection handles, or `None` for all. When every
    /// projection of a run declares its types, the store is asked only for those
    /// (the filter is pushed into its query); the handler may still receive other
    /// types when it shares a read with other projections, and must ignore them.
    fn event_types(&self) -> Option<Vec<String>> {
        None
    }

    /// Applies one batch, in sequence order, inside `tx`. The engine commits `tx`
    /// together with the checkpoint advance, or rolls it back when this fails.
    ///
    /// # Errors
    /// Any error rolls the batch back and stops the projection at the previous
    /// batch; the error names the batch's sequences.
    fn apply(&mut self, tx: &Transaction<'_>, events: &[GlobalEvent<E>]) -> Result<(), BoxError>;

    /// Called once per run when the projection has applied the whole log:
    /// when a rebuild or resume ends at the log's head (also when there was
    /// nothing to apply), and when a follower first catches up; in a write
    /// transaction of its own, after the last events are committed. The
    /// default does nothing.
    ///
    /// It is the place for secondary indexes that `apply` never reads
    /// through, such as an index for the application's queries on a column
    /// whose values arrive in no order: created here (`CREATE INDEX IF NOT
    /// EXISTS ...`) instead of in `setup`, a rebuild from an empty file
    /// inserts its rows without keeping the index up to date at random pages,
    /// and the index is then built in one sorted pass. Once it exists, later
    /// runs keep it current as usual. An index that `apply`'s statements
    /// search through belongs in `setup`: without it they scan the table.
    /// Readers of a projection rebuilt in place lack the index until the
    /// run reaches the head. It must be idempotent: it runs in every run.
    ///
    /// # Errors
    /// Any error rolls this transaction back (the events stay committed) and
    /// ends the projection's run with [`Error::CaughtUp`](crate::Error::CaughtUp).
    fn caught_up(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        let _ = tx;
        Ok(())
    }

    /// What the engine does with an event this projection cannot apply (a
    /// payload that does not decode, a handler error, a panic): stop the
    /// projection at its last committed batch ([`OnError::Stop`], the
    /// default), or record the event as a dead letter and go on
    /// ([`OnError::Skip`]). Errors of the environment (a busy or full disk,
    /// an I/O error) are never dead-lettered: they stop the run, to be tried
    /// again. Wrap any handler in [`Skipping`] to skip.
    fn on_error(&self) -> OnError {
        OnError::Stop
    }
}

/// What a projection does with an event it cannot apply; see
/// [`Handler::on_error`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnError {
    /// Stop the projection at its last committed batch, naming the event
    /// (right for a batch rebuild: the definition or the event needs a fix).
    #[default]
    Stop,
    /// Roll the event back alone, record it in the projection file's
    /// dead-letter table (`_projectionist_dead_letters`, in the same
    /// transaction as the batch and its checkpoint), and apply the rest of
    /// the batch. Past `max_dead_letters` in the file, the projection stops
    /// as with [`OnError::Stop`]: a flood means the definition is wrong.
    Skip {
        /// Dead letters the file may hold before the projection stops.
        max_dead_letters: u32,
    },
}

impl OnError {
    /// [`OnError::Skip`] with the default bound,
    /// [`DEAD_LETTERS_MAX_DEFAULT`](crate::limits::DEAD_LETTERS_MAX_DEFAULT).
    #[must_use]
    pub const fn skip() -> Self {
        OnError::Skip {
            max_dead_letters: crate::limits::DEAD_LETTERS_MAX_DEFAULT,
        }
    }
}

/// A handler whose poison events are dead-lettered instead of stopping it
/// (see [`OnError::Skip`]); everything else is the wrapped handler's.
#[derive(Clone, Debug)]
pub struct Skipping<H> {
    handler: H,
    max_dead_letters: u32,
}

impl<H> Skipping<H> {
    /// `handler`, skipping up to
    /// [`DEAD_LETTERS_MAX_DEFAULT`](crate::limits::DEAD_LETTERS_MAX_DEFAULT)
    /// poison events.
    pub fn new(handler: H) -> Self {
        Skipping {
            handler,
            max_dead_letters: crate::limits::DEAD_LETTERS_MAX_DEFAULT,
        }
    }

    /// The dead letters the projection file may hold before it stops.
    #[must_use]
    pub fn max_dead_letters(mut self, max: u32) -> Self {
        self.max_dead_letters = max;
        self
    }

    /// The wrapped handler.
    pub fn into_inner(self) -> H {
        self.handler
    }
}

impl<E, H: Handler<E>> Handler<E> for Skipping<H> {
    fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        self.handler.setup(tx)
    }

    fn event_types(&self) -> Option<Vec<String>> {
        self.handler.event_types()
    }

    fn apply(&mut self, tx: &Transaction<'_>, events: &[GlobalEvent<E>]) -> Result<(), BoxError> {
        self.handler.apply(tx, events)
    }

    fn caught_up(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        self.handler.caught_up(tx)
    }

    fn on_error(&self) -> OnError {
        OnError::Skip {
            max_dead_letters: self.max_dead_letters,
        }
    }
}

impl<E, F> Handler<E> for F
where
    F: FnMut(&Transaction<'_>, &[GlobalEvent<E>]) -> Result<(), BoxError> + Send,
{
    fn apply(&mut self, tx: &Transaction<'_>, events: &[GlobalEvent<E>]) -> Result<(), BoxError> {
        self(tx, events)
    }
}

/// A handler made of a schema (SQL run by `setup`) and a closure applying
/// batches; with [`event_types`](SchemaHandler::event_types), it declares the
/// types it handles, so events of other types are neither read nor decoded
/// (when every projection of the run declares its types).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SchemaHandler<F> {
    /// SQL statements that create the projection's tables; must be idempotent.
    pub schema: String,
    /// The batch-applying closure.
    pub apply: F,
    /// The event types it handles (`None`: all).
    pub event_types: Option<Vec<String>>,
}

impl<F> SchemaHandler<F> {
    /// A handler with this schema and closure, handling every event type.
    pub fn new(schema: impl Into<String>, apply: F) -> Self {
        SchemaHandler {
            schema: schema.into(),
            apply,
            event_types: None,
        }
    }

    /// Handles only these event types: the run reads and decodes no others
    /// for it (see [`Handler::event_types`]).
    #[must_use]
    pub fn event_types<T: Into<String>>(mut self, types: impl IntoIterator<Item = T>) -> Self {
        self.event_types = Some(types.into_iter().map(Into::into).collect());
        self
    }
}

impl<E, F> Handler<E> for SchemaHandler<F>
where
    F: FnMut(&Transaction<'_>, &[GlobalEvent<E>]) -> Result<(), BoxError> + Send,
{
    fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        tx.execute_batch(&self.schema)?;
        Ok(())
    }

    fn event_types(&self) -> Option<Vec<String>> {
        self.event_types.clone()
    }

    fn apply(&mut self, tx: &Transaction<'_>, events: &[GlobalEvent<E>]) -> Result<(), BoxError> {
        (self.apply)(tx, events)
    }
}

/// Calls the handler; a panic becomes an error, so one broken projection does not
/// take down the others.
pub(crate) fn call_handler<E>(
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
