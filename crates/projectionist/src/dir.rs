//! `ProjectionDir`: the directory of projection files, one SQLite file per
//! projection (`{dir}/{name}.db`), each with its own lock file and one shared
//! [`ProjectionDb`] while open; listing, removal and moving a corrupt file
//! aside.
//!
//! A file is a projection only when something inside it says so (see
//! [`classify_file`]); nothing else is listed, opened for writing or deleted.

use std::collections::HashMap;
use std::fs::{self, File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::db::{ProjectionDb, open_projection};
use crate::error::{Error, Result};
use crate::files::{
    DB_SUFFIX, SIDECARS, VersionFiles, refuse_symlink, refuse_symlinked_sidecars,
    remove_file_if_exists, remove_sidecars, sidecar,
};
use crate::format::{FileKind, NOT_SQLITE, classify_file};
use crate::name::ProjectionName;
use crate::stamp::recover;

/// Attempts to take a lock file that a concurrent `remove` keeps deleting; each
/// failed attempt means another process removed the projection in between.
const LOCK_ATTEMPTS_MAX: u32 = 8;

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
        recover(&self.path, &name, &conn)?;
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
        let versions = VersionFiles::of(&self.path, name);
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

/// The process id a lock holder wrote in its lock file, if any.
fn lock_holder(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}
