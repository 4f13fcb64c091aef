//! The projections a supervisor runs: a name, a handler, and the definition
//! it is built from (to tell a file built by older code from a current one).

use projectionist::rusqlite::{Connection, Transaction};
use projectionist::{BoxError, GlobalEvent, Handler, ProjectionName};
use projectionist_sqlview::{SqlHandler, SqlProjection, record_definition, stored_definition};

/// One projection for a [`Supervisor`](crate::Supervisor): its name (also
/// its file's and checkpoint's), its handler, and, when declared, the
/// definition it is built from. A projection file built from another
/// definition is rebuilt in its shadow while the live file goes on serving,
/// then published.
pub struct Supervised<E> {
    pub(crate) name: ProjectionName,
    pub(crate) handler: Box<dyn Handler<E>>,
    /// The definition's hash, when declared: a file recording another is stale.
    pub(crate) hash: Option<String>,
}

impl<E: 'static> Supervised<E> {
    /// Projection `name` applied by `handler` (a [`SchemaHandler`](projectionist::SchemaHandler),
    /// a closure, any [`Handler`]). Without [`Supervised::version`], a file is
    /// never judged stale: change the version when the handler's logic changes.
    ///
    /// # Errors
    /// [`projectionist::Error::InvalidName`] for a name that is not a
    /// projection name.
    pub fn new(name: &str, handler: impl Handler<E> + 'static) -> projectionist::Result<Self> {
        Ok(Supervised {
            name: ProjectionName::new(name)?,
            handler: Box::new(handler),
            hash: None,
        })
    }

    /// Declares the version of the handler's logic. It is recorded in the
    /// projection file; a file recording another version (or a declared
    /// projection's definition) is rebuilt in its shadow and published, the
    /// live file serving the old version until then.
    #[must_use]
    pub fn version(self, version: u32) -> Self {
        let hash = format!("rust handler version {version}");
        Supervised {
            name: self.name,
            handler: Box::new(Versioned {
                inner: self.handler,
                version,
                hash: hash.clone(),
            }),
            hash: Some(hash),
        }
    }
}

impl<E> Supervised<E>
where
    SqlHandler<'static>: Handler<E>,
{
    /// A declared projection (from a `projectionist.toml` loaded with
    /// [`ProjectionsConfig`](projectionist_sqlview::ProjectionsConfig)): its
    /// definition hash tells a stale file.
    #[must_use]
    pub fn sql(projection: SqlProjection) -> Self {
        let hash = projection.hash.clone();
        Supervised {
            name: projection.name.clone(),
            handler: Box::new(SqlHandler::owned(projection)),
            hash: Some(hash),
        }
    }
}

impl<E> Supervised<E> {
    /// Its name.
    #[must_use]
    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// Whether the file behind `conn` was built from another definition than
    /// this one (a file that cannot be read counts as stale).
    pub(crate) fn is_stale(&self, conn: &Connection) -> bool {
        let Some(hash) = &self.hash else {
            return false;
        };
        stored_definition(conn).map_or(true, |stored| stored.is_some_and(|s| &s.hash != hash))
    }
}

/// A Rust handler with a declared version: records it at setup.
struct Versioned<E> {
    inner: Box<dyn Handler<E>>,
    version: u32,
    hash: String,
}

impl<E> Handler<E> for Versioned<E> {
    fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        self.inner.setup(tx)?;
        let recorded = stored_definition(tx)?.is_some_and(|s| s.hash == self.hash);
        if !recorded {
            record_definition(tx, self.version, &self.hash)?;
        }
        Ok(())
    }

    fn event_types(&self) -> Option<Vec<String>> {
        self.inner.event_types()
    }

    fn apply(&mut self, tx: &Transaction<'_>, events: &[GlobalEvent<E>]) -> Result<(), BoxError> {
        self.inner.apply(tx, events)
    }

    fn caught_up(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        self.inner.caught_up(tx)
    }

    fn on_error(&self) -> projectionist::OnError {
        self.inner.on_error()
    }
}
