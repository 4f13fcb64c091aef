//! `ProjectionDir`: the directory of projection files, one SQLite file per
//! projection (`{dir}/{name}.db`), each with its own lock and writer connection;
//! and the rules that tell a projection file from anything else in the directory.
//!
//! A file is a projection only when something inside it says so (see
//! [`classify_file`]); nothing else is listed, opened for writing or deleted.

use std::collections::HashMap;
use std::fs::{self, File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};

use crate::error::{BoxError, Error, Result};
use crate::limits::{BUSY_TIMEOUT_MS, QUICK_CHECK_CACHE_KIB, START_BUSY_TIMEOUT_MS};
use crate::name::ProjectionName;
use crate::outcome::RUN_SCHEMA;

/// File-name suffix of a projection database.
const DB_SUFFIX: &str = ".db";
/// Sidecar files SQLite keeps beside a database (`-journal` only outside WAL mode).
const SIDECARS: [&str; 3] = ["-wal", "-shm", "-journal"];

/// The `_checkpoint` table, created in every projection file.
pub(crate) const CHECKPOINT_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS _checkpoint (
    consumer_id TEXT PRIMARY KEY,
    sequence    INTEGER NOT NULL CHECK (sequence >= 0)
);
";

/// `PRAGMA application_id` of every projection file: the bytes `Pjst`. Written
/// into new files before they switch to WAL (so it is in the main file's header at
/// once), and into files of earlier versions the first time they are opened.
pub const APPLICATION_ID: i32 = 0x506A_7374;

/// The first bytes of every SQLite database file.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Attempts to take a lock file that a concurrent `remove` keeps deleting; each
/// failed attempt means another process removed the projection in between.
const LOCK_ATTEMPTS_MAX: u32 = 8;

/// What a file at a projection's path is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// A projection file: its header carries [`APPLICATION_ID`], or (files of
    /// earlier versions) it has the `_checkpoint(consumer_id, sequence)` table.
    Projection,
    /// An empty file (a creation interrupted before SQLite wrote anything): holds
    /// nothing, so it may become a projection; it is never listed.
    Empty,
    /// Anything else: another program's database, a symbolic link, not a regular
    /// file. Never opened for writing, listed or deleted.
    NotAProjection(String),
    /// It says it is ours (application id), or it is where a projection should be,
    /// but SQLite cannot read it.
    Corrupt(String),
}

/// One `{name}.db` entry of the directory and what it is.
#[derive(Clone, Debug)]
pub struct ScannedFile {
    /// The name the file would have as a projection.
    pub name: ProjectionName,
    /// The file.
    pub path: PathBuf,
    /// What it is.
    pub kind: FileKind,
}

/// The directory of projection files.
///
/// `db(name)` hands out one shared [`ProjectionDb`] per projection while the
/// directory is open. Each open projection holds an exclusive lock file
/// (`.{name}.lock`), so a second process (or a second `ProjectionDir` on the same
/// path) that tries to write the projection gets [`Error::Locked`] instead of
/// interleaving writes.
#[derive(Debug)]
pub struct ProjectionDir {
    path: PathBuf,
    open: Mutex<HashMap<ProjectionName, Arc<ProjectionDb>>>,
    /// Open shadows (see `versions.rs`), each covered by its live file's lock.
    shadows: Mutex<HashMap<ProjectionName, Arc<ProjectionDb>>>,
}

impl ProjectionDir {
    /// Opens the directory, creating it (and its parents) when missing.
    ///
    /// # Errors
    /// [`Error::Io`] when the directory cannot be created or is not a directory.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        fs::create_dir_all(&path).map_err(Error::io("create projection directory", &path))?;
        Ok(ProjectionDir {
            path,
            open: Mutex::new(HashMap::new()),
            shadows: Mutex::new(HashMap::new()),
        })
    }

    /// Opens a directory that must already exist; creates nothing (for commands
    /// that only look, or remove).
    ///
    /// # Errors
    /// [`Error::Io`] (not found) when the path is missing or not a directory.
    pub fn open_existing(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if !path.is_dir() {
            let kind = if path.exists() {
                std::io::ErrorKind::NotADirectory
            } else {
                std::io::ErrorKind::NotFound
            };
            return Err(Error::io("open projection directory", &path)(kind.into()));
        }
        Ok(ProjectionDir {
            path,
            open: Mutex::new(HashMap::new()),
            shadows: Mutex::new(HashMap::new()),
        })
    }

    /// The directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file a projection lives in (whether or not it exists).
    ///
    /// # Errors
    /// [`Error::InvalidName`] for a name that is not a safe file name.
    pub fn file_path(&self, name: &str) -> Result<PathBuf> {
        let name = ProjectionName::new(name)?;
        Ok(self.db_path(&name))
    }

    /// The projection's database, created empty (with its `_checkpoint` table) when
    /// missing. Repeated calls return the same handle and so share one writer.
    ///
    /// # Errors
    /// [`Error::InvalidName`]; [`Error::Locked`] when another process holds the
    /// projection; [`Error::NotAProjection`] when the file (or its lock file or a
    /// sidecar) exists and is not a projection, e.g. another program's database or
    /// a symbolic link; [`Error::CorruptProjection`] when SQLite cannot read it;
    /// [`Error::Io`] / [`Error::Sqlite`] when the file cannot be opened.
    pub fn db(&self, name: &str) -> Result<Arc<ProjectionDb>> {
        let name = ProjectionName::new(name)?;
        let mut open = self.lock_open();
        if let Some(db) = open.get(&name) {
            return Ok(Arc::clone(db));
        }
        let path = self.db_path(&name);
        let lock = self.acquire_lock(&name)?;
        refuse_symlinked_sidecars(&path)?;
        let conn = match classify_file(&path)? {
            None => {
                // A `-wal` left beside a missing database would be replayed into the
                // new, empty file and bring old rows back. Only the lock holder gets here.
                remove_sidecars(&path)?;
                open_projection(&path, true, None)?
            }
            Some(FileKind::Empty) => open_projection(&path, true, None)?,
            Some(FileKind::Projection) => open_projection(&path, false, None)?,
            Some(FileKind::NotAProjection(reason)) => {
                return Err(Error::NotAProjection { path, reason });
            }
            Some(FileKind::Corrupt(reason)) => {
                return Err(Error::CorruptProjection { path, reason });
            }
        };
        // A publish or rollback that crashed is finished or undone before
        // anything else happens to the projection.
        crate::versions::recover(&self.path, &name, &conn)?;
        let db = Arc::new(ProjectionDb::new(name.clone(), path, conn, Some(lock)));
        open.insert(name, Arc::clone(&db));
        Ok(db)
    }

    /// The names of the projections in the directory, sorted: `{name}.db` files
    /// that are recognisably projections (see [`classify_file`]). Other databases,
    /// sidecars, lock files and strays are not listed; [`ProjectionDir::scan`]
    /// shows them too.
    ///
    /// # Errors
    /// [`Error::Io`] when the directory cannot be read.
    pub fn list(&self) -> Result<Vec<ProjectionName>> {
        Ok(self
            .scan()?
            .into_iter()
            .filter(|f| f.kind == FileKind::Projection)
            .map(|f| f.name)
            .collect())
    }

    /// Every `{name}.db` entry with a valid name, sorted, and what it is.
    ///
    /// # Errors
    /// [`Error::Io`] when the directory cannot be read.
    pub fn scan(&self) -> Result<Vec<ScannedFile>> {
        let entries =
            fs::read_dir(&self.path).map_err(Error::io("list projections in", &self.path))?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(Error::io("list projections in", &self.path))?;
            let file_name = entry.file_name();
            let Some(stem) = file_name.to_str().and_then(|f| f.strip_suffix(DB_SUFFIX)) else {
                continue;
            };
            let Ok(name) = ProjectionName::new(stem) else {
                continue;
            };
            let path = entry.path();
            let kind = if self.lock_open().contains_key(&name) {
                FileKind::Projection
            } else {
                match classify_file(&path) {
                    Ok(Some(kind)) => kind,
                    Ok(None) => continue,
                    Err(e) => FileKind::NotAProjection(e.to_string()),
                }
            };
            files.push(ScannedFile { name, path, kind });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(files)
    }

    /// Closes the projection's connection and deletes its file with its `-wal`,
    /// `-shm` and lock file, so the next `db(name)` starts empty with checkpoint 0.
    /// Handles still held elsewhere return [`Error::Closed`] from then on.
    ///
    /// Other processes must not have the file open (SQLite forbids deleting an
    /// open database); the lock keeps other `projectionist` writers away.
    ///
    /// # Errors
    /// [`Error::InvalidName`]; [`Error::NoSuchProjection`] when there is no such
    /// file; [`Error::NotAProjection`] when the file is not a projection (it is
    /// left alone); [`Error::Locked`]; [`Error::Io`].
    pub fn remove(&self, name: &str) -> Result<()> {
        let name = ProjectionName::new(name)?;
        let mut open = self.lock_open();
        let path = self.db_path(&name);
        let lock = match open.remove(&name) {
            Some(db) => db.close_inner()?,
            None => {
                if fs::symlink_metadata(&path).is_err() {
                    return Err(Error::NoSuchProjection {
                        name: name.to_string(),
                        dir: self.path.clone(),
                    });
                }
                let lock = self.acquire_lock(&name)?;
                match classify_file(&path)? {
                    Some(FileKind::Projection | FileKind::Empty) => {}
                    None => {
                        return Err(Error::NoSuchProjection {
                            name: name.to_string(),
                            dir: self.path.clone(),
                        });
                    }
                    Some(FileKind::NotAProjection(reason) | FileKind::Corrupt(reason)) => {
                        return Err(Error::NotAProjection { path, reason });
                    }
                }
                Some(lock)
            }
        };
        self.delete_files(&name)?;
        drop(lock);
        Ok(())
    }

    /// Removes every projection in the directory (see [`ProjectionDir::remove`]),
    /// all or nothing: every projection's lock is taken first, so a projection held
    /// by another process fails the call before anything is deleted. Files that are
    /// not projections are left alone. Returns the names removed.
    ///
    /// # Errors
    /// [`Error::Locked`] naming the first projection another process holds
    /// (nothing was removed); [`Error::Io`] when a deletion fails (the names
    /// before it are gone).
    pub fn remove_all(&self) -> Result<Vec<ProjectionName>> {
        let names = self.list()?;
        let mut open = self.lock_open();
        let mut locks = Vec::with_capacity(names.len());
        for name in &names {
            if !open.contains_key(name) {
                // On error the locks taken so far are dropped: nothing was deleted.
                locks.push(self.acquire_lock(name)?);
            }
        }
        for name in &names {
            if let Some(db) = open.remove(name) {
                locks.extend(db.close_inner()?);
            }
            self.delete_files(name)?;
        }
        drop(locks);
        Ok(names)
    }

    /// Moves a corrupt projection file aside, with its sidecars, to
    /// `{name}.db.corrupt-{unix seconds}` (never a projection's name), so that the
    /// next `db(name)` starts afresh and nothing is deleted. The caller has found
    /// it corrupt (SQLite cannot open it, or `PRAGMA quick_check` fails); a file
    /// that is not an SQLite database at all counts too, but another program's
    /// database and symbolic links are refused. Returns the new path.
    ///
    /// # Errors
    /// [`Error::NotAProjection`] for another program's database or a link;
    /// [`Error::Locked`]; [`Error::Io`].
    pub fn move_aside_corrupt(&self, name: &str) -> Result<PathBuf> {
        let name = ProjectionName::new(name)?;
        let mut open = self.lock_open();
        let lock = match open.remove(&name) {
            Some(db) => db.close_inner()?.ok_or_else(|| Error::Closed {
                name: name.to_string(),
            })?,
            None => self.acquire_lock(&name)?,
        };
        let path = self.db_path(&name);
        match classify_file(&path)? {
            Some(FileKind::Corrupt(_) | FileKind::Projection | FileKind::Empty) => {}
            Some(FileKind::NotAProjection(reason)) if reason.starts_with(NOT_SQLITE) => {}
            Some(FileKind::NotAProjection(reason)) => {
                return Err(Error::NotAProjection { path, reason });
            }
            None => {
                return Err(Error::NoSuchProjection {
                    name: name.to_string(),
                    dir: self.path.clone(),
                });
            }
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let target = self.path.join(format!("{name}{DB_SUFFIX}.corrupt-{stamp}"));
        for suffix in SIDECARS {
            let from = sidecar(&path, suffix);
            if from.exists() {
                let to = sidecar(&target, suffix);
                fs::rename(&from, &to).map_err(Error::io("move aside", &from))?;
            }
        }
        fs::rename(&path, &target).map_err(Error::io("move aside", &path))?;
        drop(lock);
        Ok(target)
    }

    /// Closes every open projection and releases its lock.
    ///
    /// # Errors
    /// [`Error::Sqlite`] when a connection fails to close cleanly.
    pub fn close(self) -> Result<()> {
        let mut open = self.lock_open();
        let mut first_error = None;
        let shadows: Vec<_> = self.lock_shadows().drain().collect();
        for (_, db) in shadows.into_iter().chain(open.drain()) {
            if let Err(e) = db.close_inner() {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Closes projection `name` (and its open shadow) and lets go of its
    /// lock, so that another process may take it; the directory stays open
    /// for the others. Handles to it still held elsewhere fail with
    /// [`Error::Closed`] from then on. Returns whether it was open.
    ///
    /// # Errors
    /// [`Error::InvalidName`]; [`Error::Sqlite`] when a connection fails to
    /// close cleanly (the lock is let go of either way).
    pub fn release(&self, name: &str) -> Result<bool> {
        let name = ProjectionName::new(name)?;
        let shadow = self.lock_shadows().remove(&name);
        let db = self.lock_open().remove(&name);
        let mut first_error = None;
        if let Some(shadow) = &shadow
            && let Err(e) = shadow.close_inner()
        {
            first_error = Some(e);
        }
        let was_open = db.is_some();
        if let Some(db) = db {
            match db.close_inner() {
                // The lock file's handle is dropped here: the lock is free.
                Ok(lock) => drop(lock),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(was_open), Err)
    }

    fn db_path(&self, name: &ProjectionName) -> PathBuf {
        self.path.join(format!("{name}{DB_SUFFIX}"))
    }

    fn lock_path(&self, name: &ProjectionName) -> PathBuf {
        self.path.join(format!(".{name}.lock"))
    }

    /// Deletes a projection's file, sidecars, other versions (shadow, previous)
    /// and lock file; the caller holds the lock.
    fn delete_files(&self, name: &ProjectionName) -> Result<()> {
        if let Some(shadow) = self.lock_shadows().remove(name) {
            shadow.close_inner()?;
        }
        let path = self.db_path(name);
        remove_file_if_exists(&path)?;
        remove_sidecars(&path)?;
        let versions = crate::versions::VersionFiles::of(&self.path, name);
        for other in [&versions.shadow, &versions.previous, &versions.previous_new] {
            remove_file_if_exists(other)?;
            remove_sidecars(other)?;
        }
        remove_file_if_exists(&versions.rebuild_request)?;
        remove_file_if_exists(&versions.rollback_request)?;
        remove_file_if_exists(&versions.retry_request)?;
        remove_file_if_exists(&versions.follower)?;
        remove_file_if_exists(&self.lock_path(name))
    }

    /// Takes the projection's lock file. A lock file that is a symbolic link is
    /// refused. Because `remove` deletes lock files, a lock taken on a file that
    /// was deleted in the meantime is worthless: the path is checked to still be
    /// the locked file, and the attempt repeated otherwise.
    fn acquire_lock(&self, name: &ProjectionName) -> Result<File> {
        let path = self.lock_path(name);
        for _ in 0..LOCK_ATTEMPTS_MAX {
            refuse_symlink(&path)?;
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(Error::io("open lock file", &path))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let holder = lock_holder(&path);
                    return Err(Error::Locked {
                        name: name.to_string(),
                        path,
                        holder,
                    });
                }
                Err(TryLockError::Error(e)) => return Err(Error::io("lock", path)(e)),
            }
            if same_file(&file, &path) {
                // Who holds it, for the message another process gets.
                let mut file = file;
                let _ = file.set_len(0).and_then(|()| {
                    std::io::Write::write_all(&mut file, std::process::id().to_string().as_bytes())
                });
                return Ok(file);
            }
        }
        let holder = lock_holder(&path);
        Err(Error::Locked {
            name: name.to_string(),
            path,
            holder,
        })
    }

    fn lock_open(&self) -> MutexGuard<'_, HashMap<ProjectionName, Arc<ProjectionDb>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn lock_shadows(
        &self,
    ) -> MutexGuard<'_, HashMap<ProjectionName, Arc<ProjectionDb>>> {
        self.shadows.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

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

/// The files of one projection in a directory: the database, its SQLite
/// sidecars and its lock file (whether or not they exist).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectionFiles {
    /// `{name}.db`.
    pub db: PathBuf,
    /// `{name}.db-wal`.
    pub wal: PathBuf,
    /// `{name}.db-shm`.
    pub shm: PathBuf,
    /// `.{name}.lock`.
    pub lock: PathBuf,
}

impl ProjectionFiles {
    /// The files of projection `name` in `dir`.
    ///
    /// # Errors
    /// [`Error::InvalidName`] for a name that is not a safe file name.
    pub fn new(dir: &Path, name: &str) -> Result<Self> {
        let name = ProjectionName::new(name)?;
        let db = dir.join(format!("{name}{DB_SUFFIX}"));
        Ok(ProjectionFiles {
            wal: sidecar(&db, "-wal"),
            shm: sidecar(&db, "-shm"),
            lock: dir.join(format!(".{name}.lock")),
            db,
        })
    }

    /// Bytes on disk of the database and its `-wal` (what the projection holds;
    /// the `-shm` is an index rebuilt on open).
    #[must_use]
    pub fn size_bytes(&self) -> u64 {
        [&self.db, &self.wal]
            .iter()
            .filter_map(|path| fs::metadata(path).ok())
            .map(|m| m.len())
            .sum()
    }
}

/// Whether a table name is one projectionist owns in a projection file
/// (`_checkpoint`, `_projectionist_*`): handlers and config SQL may read these,
/// never change them, and digests of a projection's own tables leave them out.
#[must_use]
pub fn is_reserved_table(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower == "_checkpoint" || lower.starts_with("_projectionist_")
}

/// Drops every table and view of the projection except `_checkpoint` and the
/// run record `_projectionist_run` (so also the other `_projectionist_*` tables,
/// which describe the content being dropped); indexes and triggers go with them.
pub(crate) fn drop_projection_objects(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    let objects: Vec<(String, String)> = tx
        .prepare(
            "SELECT type, name FROM sqlite_master
             WHERE type IN ('table', 'view')
               AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'
               AND name NOT IN ('_checkpoint', '_projectionist_run')
             ORDER BY type DESC",
        )?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (kind, name) in objects {
        let kind = if kind == "view" { "VIEW" } else { "TABLE" };
        let quoted = name.replace('"', "\"\"");
        tx.execute_batch(&format!("DROP {kind} IF EXISTS \"{quoted}\""))?;
    }
    Ok(())
}

/// What a file at a projection's path is; `None` when there is no file.
///
/// A projection file is an SQLite database whose header carries
/// [`APPLICATION_ID`], or (written by earlier versions, before the mark existed)
/// one with a `_checkpoint` table that has `consumer_id` and `sequence` columns.
/// The header is read directly; only an unmarked SQLite file is opened, read-only,
/// to look for the table. Symbolic links are never followed.
///
/// # Errors
/// [`Error::Io`] when the file cannot be read.
pub fn classify_file(path: &Path) -> Result<Option<FileKind>> {
    let metadata = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("inspect", path)(e)),
    };
    if metadata.file_type().is_symlink() {
        return Ok(Some(FileKind::NotAProjection("a symbolic link".into())));
    }
    if !metadata.is_file() {
        return Ok(Some(FileKind::NotAProjection("not a regular file".into())));
    }
    if metadata.len() == 0 {
        return Ok(Some(FileKind::Empty));
    }
    let mut header = [0u8; 100];
    let n_read = read_prefix(path, &mut header)?;
    if n_read < header.len() || header[..16] != SQLITE_MAGIC[..] {
        return Ok(Some(FileKind::NotAProjection(format!(
            "{NOT_SQLITE} (no SQLite header)"
        ))));
    }
    let application_id = i32::from_be_bytes([header[68], header[69], header[70], header[71]]);
    if application_id == APPLICATION_ID {
        return Ok(Some(FileKind::Projection));
    }
    if application_id != 0 {
        return Ok(Some(FileKind::NotAProjection(format!(
            "another program's SQLite database (application id {application_id:#x})"
        ))));
    }
    Ok(Some(classify_unmarked(path)))
}

/// The start of the reason given for a file that is not an SQLite database.
const NOT_SQLITE: &str = "not an SQLite database";

/// An SQLite file without an application id: a projection of an earlier version
/// (its mark may also still sit in its `-wal`), or someone else's database.
///
/// The file is opened `immutable`: SQLite then reads the main file only and
/// creates no `-wal`/`-shm` beside someone else's database. A projection of an
/// earlier version has its `_checkpoint` table in the main file once any
/// connection to it has closed cleanly.
fn classify_unmarked(path: &Path) -> FileKind {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let look = || -> rusqlite::Result<FileKind> {
        let uri = immutable_uri(path);
        let conn = Connection::open_with_flags(uri, flags)?;
        let application_id: i32 =
            conn.pragma_query_value(None, "application_id", |row| row.get(0))?;
        if application_id == APPLICATION_ID {
            return Ok(FileKind::Projection);
        }
        let columns: i64 = conn.query_row(
            "SELECT count(*) FROM pragma_table_info('_checkpoint')
             WHERE name IN ('consumer_id', 'sequence')",
            [],
            |row| row.get(0),
        )?;
        Ok(if columns == 2 {
            FileKind::Projection
        } else {
            FileKind::NotAProjection("an SQLite database without a _checkpoint table".into())
        })
    };
    match look() {
        Ok(kind) => kind,
        Err(e) => match corruption(&e) {
            Some(reason) => FileKind::Corrupt(reason),
            None => FileKind::NotAProjection(format!("cannot be read: {e}")),
        },
    }
}

/// Whether a SQLite error says the file is damaged or not a database.
#[must_use]
pub fn is_corruption(error: &rusqlite::Error) -> bool {
    corruption(error).is_some()
}

/// `PRAGMA quick_check` of a projection file through any connection to it:
/// `None` when it is sound, else what is wrong. Reads the whole file, through
/// a page cache of at most [`QUICK_CHECK_CACHE_KIB`] (the connection's own
/// cache size is restored afterwards), so checking a thousand files before a
/// run does not leave each connection holding the pages of its whole file.
///
/// # Errors
/// [`Error::Sqlite`] for a failure that is not the file's damage (I/O, locks).
pub fn quick_check(conn: &Connection) -> Result<Option<String>> {
    let failed = |e| Error::sqlite("check projection file")(e);
    let cache_size: i64 = conn
        .pragma_query_value(None, "cache_size", |row| row.get(0))
        .map_err(failed)?;
    let bounded = -i64::try_from(QUICK_CHECK_CACHE_KIB).unwrap_or(i64::MAX);
    let smaller = cache_kib(cache_size) > QUICK_CHECK_CACHE_KIB;
    if smaller {
        conn.pragma_update(None, "cache_size", bounded)
            .map_err(failed)?;
    }
    let checked = conn.query_row("PRAGMA quick_check(1)", [], |row| row.get::<_, String>(0));
    if smaller {
        conn.pragma_update(None, "cache_size", cache_size)
            .map_err(failed)?;
    }
    match checked {
        Ok(text) if text == "ok" => Ok(None),
        Ok(text) => Ok(Some(text)),
        Err(e) => match corruption(&e) {
            Some(reason) => Ok(Some(reason)),
            None => Err(failed(e)),
        },
    }
}

/// A `PRAGMA cache_size` value in KiB: negative values are KiB already,
/// positive ones are pages (counted at the largest page size, 64 KiB, which
/// only matters for the comparison it serves).
fn cache_kib(cache_size: i64) -> u64 {
    if cache_size < 0 {
        cache_size.unsigned_abs()
    } else {
        cache_size.unsigned_abs().saturating_mul(64)
    }
}

/// The reason, when a SQLite error says the file is damaged or not a database.
pub(crate) fn corruption(error: &rusqlite::Error) -> Option<String> {
    match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
            Some(error.to_string())
        }
        _ => None,
    }
}

/// An SQLite URI that opens `path` as `immutable` (open it with
/// `SQLITE_OPEN_URI`): read-only, without locks, creating no `-wal` or `-shm`
/// beside it. Only for files that nobody writes while they are read, such as a
/// kept previous version or someone else's database being inspected.
#[must_use]
pub fn immutable_uri(path: &Path) -> String {
    format!("file:{}?immutable=1", uri_path(path))
}

/// A path for an SQLite `file:` URI: every byte but unreserved ones escaped.
pub(crate) fn uri_path(path: &Path) -> String {
    let mut out = String::new();
    for byte in path.as_os_str().as_encoded_bytes() {
        if byte.is_ascii_alphanumeric() || b"/._-~".contains(byte) {
            out.push(char::from(*byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn read_prefix(path: &Path, buf: &mut [u8]) -> Result<usize> {
    use std::io::Read;
    let mut file = File::open(path).map_err(Error::io("read", path))?;
    let mut n_read = 0;
    while n_read < buf.len() {
        match file.read(&mut buf[n_read..]) {
            Ok(0) => break,
            Ok(n) => n_read += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read", path)(e)),
        }
    }
    Ok(n_read)
}

fn refuse_symlink(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(Error::NotAProjection {
            path: path.to_path_buf(),
            reason: "a symbolic link; projectionist does not follow links in its directory".into(),
        }),
        _ => Ok(()),
    }
}

pub(crate) fn refuse_symlinked_sidecars(db_path: &Path) -> Result<()> {
    refuse_symlink(db_path)?;
    for suffix in SIDECARS {
        refuse_symlink(&sidecar(db_path, suffix))?;
    }
    Ok(())
}

pub(crate) fn sidecar(db_path: &Path, suffix: &str) -> PathBuf {
    let mut name = db_path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Whether `path` still names the open `file` (same device and inode).
#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &File, path: &Path) -> bool {
    path.exists()
}

pub(crate) fn remove_sidecars(db_path: &Path) -> Result<()> {
    for suffix in SIDECARS {
        remove_file_if_exists(&sidecar(db_path, suffix))?;
    }
    Ok(())
}

pub(crate) fn remove_file_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path)(e)),
    }
}

/// The process id a lock holder wrote in its lock file, if any.
fn lock_holder(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}
