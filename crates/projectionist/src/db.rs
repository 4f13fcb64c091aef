//! `ProjectionDb`: one open projection, its single writer connection (open,
//! parked to save memory and file descriptors, or closed) and its lock; how a
//! projection file is opened (WAL, busy timeouts, the engine's tables) and
//! written (IMMEDIATE transactions).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};

use crate::error::{BoxError, Error, Result};
use crate::format::{APPLICATION_ID, CHECKPOINT_SCHEMA, FileKind, classify_file, corruption};
use crate::limits::{BUSY_TIMEOUT_MS, START_BUSY_TIMEOUT_MS};
use crate::name::ProjectionName;
use crate::outcome::RUN_SCHEMA;

/// A projection's writer connection, held (see [`ProjectionDb::lock_writer`]).
pub(crate) struct WriterGuard<'a>(MutexGuard<'a, Writer>);

impl std::ops::Deref for WriterGuard<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        match &*self.0 {
            Writer::Open(conn) => conn,
            Writer::Parked | Writer::Closed => unreachable!("opened when locked"),
        }
    }
}

/// A projection's writer connection.
#[derive(Debug)]
enum Writer {
    Open(Connection),
    /// Closed to save memory and file descriptors; opened again when next
    /// used (see [`ProjectionDb::park`]).
    Parked,
    /// Closed for good (`remove`, `close`).
    Closed,
}

/// One open projection: its file, its single writer connection and its lock.
#[derive(Debug)]
pub struct ProjectionDb {
    name: ProjectionName,
    path: PathBuf,
    writer: Mutex<Writer>,
    lock: Mutex<Option<File>>,
}

impl ProjectionDb {
    pub(crate) fn new(
        name: ProjectionName,
        path: PathBuf,
        conn: Connection,
        lock: Option<File>,
    ) -> Self {
        ProjectionDb {
            name,
            path,
            writer: Mutex::new(Writer::Open(conn)),
            lock: Mutex::new(lock),
        }
    }

    /// The projection's name.
    #[must_use]
    pub fn name(&self) -> &ProjectionName {
        &self.name
    }

    /// The projection's file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with exclusive use of the writer connection (opened again
    /// first when it was parked).
    ///
    /// # Errors
    /// [`Error::Closed`] after `remove`/`close`, or whatever `f` returns.
    pub fn with_connection<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let mut guard = self.lock_open()?;
        match &mut *guard {
            Writer::Open(conn) => f(conn),
            Writer::Parked | Writer::Closed => unreachable!("opened when locked"),
        }
    }

    /// Exclusive use of the writer connection for as long as the guard lives:
    /// a run's writer thread holds those of the projections it keeps open, so
    /// each can keep a transaction open across the batches it receives.
    pub(crate) fn lock_writer(&self) -> Result<WriterGuard<'_>> {
        self.lock_open().map(WriterGuard)
    }

    /// The writer, open: a parked one is opened again, after checking that
    /// the file is still this projection (the lock keeps other projectionist
    /// processes away, not other programs).
    fn lock_open(&self) -> Result<MutexGuard<'_, Writer>> {
        let mut guard = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        match *guard {
            Writer::Open(_) => {}
            Writer::Closed => {
                return Err(Error::Closed {
                    name: self.name.to_string(),
                });
            }
            Writer::Parked => {
                let gone = |reason: String| Error::NotAProjection {
                    path: self.path.clone(),
                    reason,
                };
                match classify_file(&self.path)? {
                    Some(FileKind::Projection) => {}
                    None => {
                        return Err(gone(
                            "the file was removed while the projection was open".to_owned(),
                        ));
                    }
                    Some(FileKind::Corrupt(reason)) => {
                        return Err(Error::CorruptProjection {
                            path: self.path.clone(),
                            reason,
                        });
                    }
                    Some(FileKind::Empty) => {
                        return Err(gone(
                            "the file was emptied while the projection was open".to_owned(),
                        ));
                    }
                    Some(FileKind::NotAProjection(reason)) => return Err(gone(reason)),
                }
                *guard = Writer::Open(reopen_projection(&self.path)?);
            }
        }
        Ok(guard)
    }

    /// Closes the writer connection until it is next used, when it opens
    /// again by itself; the projection's lock stays held. An open connection
    /// costs about 130 KiB of memory (schema, statements, page cache, the
    /// 32 KiB `-shm` mapping) and three file descriptors: a process that holds
    /// many projections parks those it is not writing. Does nothing when the
    /// connection is closed already.
    pub fn park(&self) {
        let mut guard = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if matches!(*guard, Writer::Open(_)) {
            // Dropping the connection closes it; SQLite checkpoints the WAL
            // when this was the file's last connection.
            *guard = Writer::Parked;
        }
    }

    /// [`park`](Self::park) without the checkpoint SQLite runs when a file's
    /// last connection closes (two `fsync`s and the `-wal` deleted): for a
    /// file opened again soon. Its `-wal` stays, and the next connection
    /// reads it to rebuild the index; the run keeps it short (see
    /// [`PARKED_WAL_PAGES_MAX`](crate::limits::PARKED_WAL_PAGES_MAX)).
    pub(crate) fn park_quickly(&self) {
        let mut guard = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Writer::Open(conn) = &*guard {
            // Best effort: if SQLite refuses, the close checkpoints as usual.
            let _ = conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true);
            *guard = Writer::Parked;
        }
    }

    /// Runs `f` in one write transaction (begun IMMEDIATE, so it never fails with
    /// `SQLITE_BUSY` half-way) and commits when `f` succeeds; rolls back otherwise.
    ///
    /// # Errors
    /// [`Error::Closed`], [`Error::Sqlite`], or [`Error::External`] wrapping `f`'s error.
    pub fn write<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> std::result::Result<T, BoxError>,
    ) -> Result<T> {
        let label = || format!("write projection {}", self.name);
        self.with_connection(|conn| {
            write_transaction(conn, label, |tx| {
                f(tx).map_err(|source| Error::External {
                    step: label(),
                    source,
                })
            })
        })
    }

    /// A new read-only connection to the projection, for queries. Readers never
    /// block the writer, and see only committed batches.
    ///
    /// # Errors
    /// [`Error::Sqlite`] when the file cannot be opened.
    pub fn open_reader(&self) -> Result<Connection> {
        let step = || format!("open projection {} for reading", self.name);
        let conn = Connection::open_with_flags(&self.path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(Error::sqlite(step()))?;
        conn.busy_timeout(Duration::from_millis(u64::from(BUSY_TIMEOUT_MS)))
            .map_err(Error::sqlite(step()))?;
        Ok(conn)
    }

    /// Closes the writer and hands back the lock, so the caller decides when to
    /// release it (after deleting files, for `remove`).
    pub(crate) fn close_inner(&self) -> Result<Option<File>> {
        let writer = std::mem::replace(
            &mut *self.writer.lock().unwrap_or_else(PoisonError::into_inner),
            Writer::Closed,
        );
        if let Writer::Open(conn) = writer {
            conn.close().map_err(|(_, source)| Error::Sqlite {
                step: format!("close projection {}", self.name),
                source,
            })?;
        }
        Ok(self
            .lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take())
    }
}

/// Begins a write transaction IMMEDIATE: under WAL a deferred transaction that
/// upgrades from read to write fails with `SQLITE_BUSY` without waiting.
pub(crate) fn begin_immediate(conn: &mut Connection) -> rusqlite::Result<Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
}

/// Runs `f` in one IMMEDIATE write transaction and commits it; rolls back when
/// `f` fails. SQLite errors name the step with `label`.
pub(crate) fn write_transaction<T>(
    conn: &mut Connection,
    label: impl Fn() -> String,
    f: impl FnOnce(&Transaction<'_>) -> Result<T>,
) -> Result<T> {
    let tx = begin_immediate(conn).map_err(|source| Error::Sqlite {
        step: label(),
        source,
    })?;
    let value = f(&tx)?;
    tx.commit().map_err(|source| Error::Sqlite {
        step: label(),
        source,
    })?;
    Ok(value)
}

/// Opens a projection file: WAL, `synchronous=NORMAL` (a projection can be
/// rebuilt, so losing the last commits to a power cut is acceptable; a process
/// crash loses nothing), in-memory temp store, busy timeout, and the
/// `_checkpoint` table. A new file gets [`APPLICATION_ID`] before it switches to
/// WAL, so the mark is in the file's header at once; a file of an earlier version
/// gets it now. A file SQLite cannot read is [`Error::CorruptProjection`].
pub(crate) fn open_projection(
    path: &Path,
    new: bool,
    page_size: Option<i64>,
) -> Result<Connection> {
    let step = || format!("open projection file {}", path.display());
    let corrupt = |source: rusqlite::Error| match corruption(&source) {
        Some(reason) => Error::CorruptProjection {
            path: path.to_path_buf(),
            reason,
        },
        None => Error::sqlite(step())(source),
    };
    let conn = Connection::open(path).map_err(Error::sqlite(step()))?;
    conn.busy_timeout(Duration::from_millis(u64::from(START_BUSY_TIMEOUT_MS)))
        .map_err(Error::sqlite(step()))?;
    if let (true, Some(page_size)) = (new, page_size) {
        // Before the first write, which fixes the page size of the file.
        conn.pragma_update(None, "page_size", page_size)
            .map_err(Error::sqlite(step()))?;
    }
    let application_id: i32 = conn
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(corrupt)?;
    if new || application_id != APPLICATION_ID {
        conn.pragma_update(None, "application_id", APPLICATION_ID)
            .map_err(corrupt)?;
    }
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(corrupt)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(Error::sqlite(step()))?;
    // Each batch runs in a savepoint, whose undo pages go to a statement journal:
    // in memory that is a copy, on disk it was a write of every touched page
    // (measured: 144k instead of 82k page writes per 100k events).
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(Error::sqlite(step()))?;
    conn.execute_batch(CHECKPOINT_SCHEMA).map_err(corrupt)?;
    conn.execute_batch(RUN_SCHEMA).map_err(corrupt)?;
    // A cheap check that the schema and the checkpoint are readable; damaged
    // pages elsewhere are found by `PRAGMA quick_check` (`status --check`).
    conn.query_row("SELECT count(*) FROM _checkpoint", [], |_| Ok(()))
        .map_err(corrupt)?;
    conn.busy_timeout(Duration::from_millis(u64::from(BUSY_TIMEOUT_MS)))
        .map_err(Error::sqlite(step()))?;
    Ok(conn)
}

/// Opens a parked projection's file again: only what a connection needs
/// (busy timeout, `synchronous`, `temp_store`), since the file's own
/// settings (WAL, application id, the engine's tables) were made when it was
/// first opened in this process. The file must exist: it is not created.
fn reopen_projection(path: &Path) -> Result<Connection> {
    let step = || format!("open projection file {} again", path.display());
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(Error::sqlite(step()))?;
    conn.busy_timeout(Duration::from_millis(u64::from(BUSY_TIMEOUT_MS)))
        .map_err(Error::sqlite(step()))?;
    conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA temp_store = MEMORY;")
        .map_err(Error::sqlite(step()))?;
    Ok(conn)
}
