//! Versions of a projection beside its live file: the **shadow** a rebuild
//! builds while the live file keeps serving readers, and the **previous**
//! version kept after a publish so that a rollback can restore it.
//!
//! Files, all covered by the projection's lock (`.{name}.lock`):
//!
//! | file | what it is |
//! |---|---|
//! | `{name}.db` | the live projection; readers open this one |
//! | `.{name}.shadow.db` | a rebuild in progress, or finished and not yet published |
//! | `.{name}.previous.db` | the version before the last publish (or rollback) |
//! | `.{name}.previous-new.db` | a copy of the live file being made by a publish; renamed to `.previous.db` once the publish has happened |
//! | `.{name}.rebuild-request`, `.{name}.rollback-request`, `.{name}.retry-request` | files by which another process asks the holder of the projection (a follower) to rebuild it, roll it back, or apply its dead letters again |
//! | `.{name}.follower` | the process id of the follower holding the projection, which takes such requests |
//!
//! Their names start with a dot, which a projection name never does, so `list`,
//! `remove` and `status` never take them for projections.
//!
//! **Publishing never renames a file over the live one.** SQLite's online
//! backup API copies the shadow into the live database through the live
//! file's own connection, as ONE write transaction: in WAL mode readers keep
//! their snapshot (the old version, complete) until their read transaction
//! ends, and the next one sees the new version, complete. A crash before the
//! commit leaves the old version, after it the new one (the WAL decides, as for
//! any commit). Renaming a file over a live database is what can resurrect old
//! rows from a stale `-wal`; it is never done here.
//!
//! **Which step happened is written in the files.** A publish stamps the
//! shadow with a new version id (table `_projectionist_version`) before copying
//! it; the copy of the old live file carries the old id. After a crash the next
//! open of the projection compares ids: a `previous-new` copy whose id differs
//! from the live one means the publish happened (the copy becomes the previous
//! version), an equal id means it did not (the copy is deleted); a shadow whose
//! id equals the live one was published (it is deleted).

use std::fs::{self, File};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OptionalExtension};

use crate::db::{ProjectionDb, open_projection};
use crate::dir::ProjectionDir;
use crate::error::{Error, Result};
use crate::files::{
    ProjectionFiles, VersionFiles, refuse_symlinked_sidecars, remove_file_if_exists,
    remove_sidecars,
};
use crate::format::{FileKind, classify_file};
use crate::limits::{BUSY_TIMEOUT_MS, PUBLISH_CHECKPOINT_BUSY_MS};
use crate::stamp::stamp;

/// The steps of a publish (and of a rollback, which publishes the previous
/// version), in order, for fault-injection tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PublishStep {
    /// The version to publish has its new stamp.
    Stamped,
    /// The live file is copied to `.{name}.previous-new.db` (when keeping it).
    PreviousCopied,
    /// The new version is live (the copy's transaction committed).
    Published,
    /// The copy of the old version is now `.{name}.previous.db`.
    PreviousKept,
    /// The shadow's files are deleted (publish only).
    ShadowRemoved,
}

impl PublishStep {
    /// All steps, in order.
    pub const ALL: [PublishStep; 5] = [
        PublishStep::Stamped,
        PublishStep::PreviousCopied,
        PublishStep::Published,
        PublishStep::PreviousKept,
        PublishStep::ShadowRemoved,
    ];

    /// The step's name, as used by crash-point tests.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            PublishStep::Stamped => "stamped",
            PublishStep::PreviousCopied => "previous-copied",
            PublishStep::Published => "published",
            PublishStep::PreviousKept => "previous-kept",
            PublishStep::ShadowRemoved => "shadow-removed",
        }
    }
}

/// Called after every [`PublishStep`] with the projection name (fault injection).
pub type PublishHookFn<'a> = dyn Fn(&str, PublishStep) + Send + Sync + 'a;

/// How to publish.
#[derive(Clone, Copy)]
#[non_exhaustive]
pub struct PublishOptions<'a> {
    /// Keep the replaced version as `.{name}.previous.db` for a rollback
    /// (default: yes). Off, no previous version is kept, and one kept by an
    /// earlier publish is deleted (it would no longer be the one before).
    pub keep_previous: bool,
    /// Fault injection: called after each step (crate feature `testing`).
    #[cfg(feature = "testing")]
    pub step_hook: Option<&'a PublishHookFn<'a>>,
    #[cfg(not(feature = "testing"))]
    step_hook: std::marker::PhantomData<&'a ()>,
}

impl Default for PublishOptions<'_> {
    fn default() -> Self {
        PublishOptions {
            keep_previous: true,
            #[cfg(feature = "testing")]
            step_hook: None,
            #[cfg(not(feature = "testing"))]
            step_hook: std::marker::PhantomData,
        }
    }
}

impl<'a> PublishOptions<'a> {
    /// The defaults: keep the previous version.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether to keep the replaced version for a rollback.
    #[must_use]
    pub fn keep_previous(mut self, keep: bool) -> Self {
        self.keep_previous = keep;
        self
    }

    /// Calls `hook` after each step (fault injection; crate feature `testing`).
    #[cfg(feature = "testing")]
    #[must_use]
    pub fn step_hook(mut self, hook: &'a PublishHookFn<'a>) -> Self {
        self.step_hook = Some(hook);
        self
    }

    #[cfg(feature = "testing")]
    fn step(&self, name: &str, step: PublishStep) {
        if let Some(hook) = self.step_hook {
            hook(name, step);
        }
    }

    #[cfg(not(feature = "testing"))]
    #[allow(clippy::unused_self)]
    fn step(&self, _name: &str, _step: PublishStep) {}
}

impl std::fmt::Debug for PublishOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut debug = f.debug_struct("PublishOptions");
        debug.field("keep_previous", &self.keep_previous);
        #[cfg(feature = "testing")]
        debug.field("step_hook", &self.step_hook.is_some());
        debug.finish()
    }
}

/// What a publish or rollback did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Published {
    /// The projection.
    pub name: String,
    /// The live file's checkpoint now.
    pub checkpoint: u64,
    /// Bytes copied into the live file.
    pub bytes: u64,
    /// How long the live file's write lock was held (the copy's transaction).
    /// Readers are never blocked by it; another writer of the live file waits
    /// this long.
    pub lock_held: Duration,
    /// The whole publish, copies and clean-up included.
    pub elapsed: Duration,
    /// Whether the replaced version is kept as `.{name}.previous.db`.
    pub previous_kept: bool,
}

impl ProjectionDir {
    /// The projection's shadow (`.{name}.shadow.db`): a file beside the live one
    /// for a rebuild that must not disturb the live file's readers. Build it as
    /// any projection (its handle goes into a [`ProjectionTarget`](crate::ProjectionTarget)
    /// like the live one), then [`ProjectionDir::publish`] it.
    ///
    /// Takes the projection's lock (opening the live file, see
    /// [`ProjectionDir::db`]), so no other process writes the projection while
    /// its shadow is built. An existing shadow (an interrupted rebuild) is
    /// opened as it is: start it with [`Start::Reset`](crate::Start) to build
    /// afresh, or [`Start::Resume`](crate::Start) to continue it. A new shadow
    /// gets the live file's page size (the publish's copy needs equal page sizes)
    /// and needs free disk of about four times the live projection (the
    /// shadow, its copy through the live file's WAL, the kept previous
    /// version): that is checked first.
    ///
    /// # Errors
    /// As [`ProjectionDir::db`]; [`Error::DiskSpace`] naming the bytes needed;
    /// [`Error::NotAProjection`] when another program's file sits at the
    /// shadow's path.
    pub fn shadow(&self, name: &str) -> Result<Arc<ProjectionDb>> {
        self.shadow_for(name, &PublishOptions::default())
    }

    /// [`ProjectionDir::shadow`] for a rebuild that will be published with
    /// `options`: without [`PublishOptions::keep_previous`], a new shadow asks
    /// for about three times the live projection's size, not four (no copy of
    /// the replaced version is kept).
    ///
    /// # Errors
    /// As [`ProjectionDir::shadow`].
    pub fn shadow_for(
        &self,
        name: &str,
        options: &PublishOptions<'_>,
    ) -> Result<Arc<ProjectionDb>> {
        let live = self.db(name)?;
        let name = live.name().clone();
        if let Some(shadow) = self.lock_shadows().get(&name) {
            return Ok(Arc::clone(shadow));
        }
        let path = VersionFiles::of(self.path(), &name).shadow;
        refuse_symlinked_sidecars(&path)?;
        let existing = match classify_file(&path)? {
            Some(FileKind::Projection) => true,
            Some(FileKind::Corrupt(_) | FileKind::Empty) | None => false,
            Some(FileKind::NotAProjection(reason)) => {
                return Err(Error::NotAProjection { path, reason });
            }
        };
        let conn = if existing {
            match open_projection(&path, false, None) {
                Ok(conn) => Some(conn),
                // An unreadable shadow is derived data of our own: start it afresh.
                Err(Error::CorruptProjection { .. }) => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let conn = match conn {
            Some(conn) => conn,
            None => {
                let live_bytes = ProjectionFiles::new(self.path(), name.as_str())?.size_bytes();
                let (factor, step) = if options.keep_previous {
                    (
                        SHADOW_SPACE_FACTOR,
                        "build a shadow beside the live projection (about 4x its size)",
                    )
                } else {
                    (
                        SHADOW_SPACE_FACTOR - 1,
                        "build a shadow beside the live projection, keeping no previous version (about 3x its size)",
                    )
                };
                check_space(self.path(), step, live_bytes.saturating_mul(factor))?;
                remove_file_if_exists(&path)?;
                remove_sidecars(&path)?;
                let page_size = live.with_connection(|conn| page_size(conn))?;
                open_projection(&path, true, Some(page_size))?
            }
        };
        let shadow = Arc::new(ProjectionDb::new(name.clone(), path, conn, None));
        self.lock_shadows().insert(name, Arc::clone(&shadow));
        Ok(shadow)
    }

    /// Deletes the projection's shadow, if there is one (an abandoned or
    /// unwanted rebuild). Returns whether there was one.
    ///
    /// # Errors
    /// As [`ProjectionDir::db`] (the projection's lock is taken); [`Error::Io`].
    pub fn discard_shadow(&self, name: &str) -> Result<bool> {
        let live = self.db(name)?;
        let path = VersionFiles::of(self.path(), live.name()).shadow;
        if let Some(shadow) = self.lock_shadows().remove(live.name()) {
            shadow.close_inner()?;
        }
        let existed = fs::symlink_metadata(&path).is_ok();
        remove_file_if_exists(&path)?;
        remove_sidecars(&path)?;
        Ok(existed)
    }

    /// Publishes the projection's shadow (opened with [`ProjectionDir::shadow`]
    /// in this directory): copies it into the live file as ONE write
    /// transaction through SQLite's backup API, so a reader with an open
    /// connection sees the old version or the new one, each complete, never a
    /// mix, never an empty projection and never an error. Keeps the replaced
    /// version as `.{name}.previous.db` unless told not to, then deletes the
    /// shadow. Only a shadow whose checkpoint (`consumer_id`'s) is at or past the
    /// live one is published.
    ///
    /// Every step is safe to crash at: the next open of the projection
    /// finishes or undoes what was left (see the module docs of `versions`).
    ///
    /// # Errors
    /// [`Error::Version`] when there is no open shadow, it is behind the live
    /// file, or the page sizes differ; [`Error::DiskSpace`] (nothing written);
    /// [`Error::Sqlite`] / [`Error::Io`]. On any error the live file is unchanged.
    pub fn publish(
        &self,
        name: &str,
        consumer_id: &str,
        options: &PublishOptions<'_>,
    ) -> Result<Published> {
        let started = Instant::now();
        let live = self.db(name)?;
        let name = live.name().clone();
        let version_error = |reason: String| Error::Version {
            name: name.to_string(),
            reason,
        };
        let shadow = self.lock_shadows().get(&name).cloned().ok_or_else(|| {
            version_error(
                "no shadow is open to publish (build one with ProjectionDir::shadow)".into(),
            )
        })?;
        let files = VersionFiles::of(self.path(), &name);
        let shadow_checkpoint = shadow.with_connection(|conn| checkpoint_of(conn, consumer_id))?;
        let live_checkpoint = live.with_connection(|conn| checkpoint_of(conn, consumer_id))?;
        if shadow_checkpoint < live_checkpoint {
            return Err(version_error(format!(
                "the shadow is at checkpoint {shadow_checkpoint}, behind the live file's \
                 {live_checkpoint}; catch it up before publishing"
            )));
        }
        // The shadow's `-wal` holds its last commits: move them into its main
        // file first, so the disk is not held twice while the copy runs.
        shadow.with_connection(|conn| {
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .map_err(Error::sqlite("checkpoint the shadow"))
        })?;
        let shadow_bytes = VersionFiles::size_bytes(&files.shadow);
        let live_bytes = ProjectionFiles::new(self.path(), name.as_str())?.size_bytes();
        let needed =
            wal_copy_bytes(shadow_bytes) + if options.keep_previous { live_bytes } else { 0 };
        check_space(self.path(), "publish the shadow", needed)?;
        shadow.with_connection(|conn| stamp(conn, false))?;
        options.step(name.as_str(), PublishStep::Stamped);
        let swapped = swap_in(self, &live, &shadow, &files, options);
        if swapped.is_err() && shadow.with_connection(|_| Ok(())).is_err() {
            // Failed after the copy (the shadow is closed): the next `shadow`
            // opens the file again, and the next open of the projection
            // finishes what the version stamps say happened.
            self.lock_shadows().remove(&name);
        }
        let lock_held = swapped?;
        self.lock_shadows().remove(&name);
        remove_file_if_exists(&files.shadow)?;
        remove_sidecars(&files.shadow)?;
        options.step(name.as_str(), PublishStep::ShadowRemoved);
        truncate_wal(&live);
        Ok(Published {
            name: name.to_string(),
            checkpoint: shadow_checkpoint,
            bytes: shadow_bytes,
            lock_held,
            elapsed: started.elapsed(),
            previous_kept: options.keep_previous,
        })
    }

    /// Restores the previous version (`.{name}.previous.db`) into the live file,
    /// atomically for open readers as a publish is; the replaced version becomes
    /// the previous one (unless `options.keep_previous` is off), so a second
    /// rollback undoes the first. The restored version is marked rolled back
    /// ([`VersionInfo::rolled_back_at`](crate::VersionInfo::rolled_back_at)): a follower must not rebuild it on its
    /// own.
    ///
    /// # Errors
    /// [`Error::Version`] when no previous version is kept;
    /// [`Error::DiskSpace`]; as [`ProjectionDir::publish`].
    pub fn rollback(
        &self,
        name: &str,
        consumer_id: &str,
        options: &PublishOptions<'_>,
    ) -> Result<Published> {
        let started = Instant::now();
        let live = self.db(name)?;
        let name = live.name().clone();
        let files = VersionFiles::of(self.path(), &name);
        if classify_file(&files.previous)? != Some(FileKind::Projection) {
            return Err(Error::Version {
                name: name.to_string(),
                reason: format!(
                    "no previous version is kept ({} does not exist)",
                    files.previous.display()
                ),
            });
        }
        let previous_bytes = VersionFiles::size_bytes(&files.previous);
        let live_bytes = ProjectionFiles::new(self.path(), name.as_str())?.size_bytes();
        let needed =
            wal_copy_bytes(previous_bytes) + if options.keep_previous { live_bytes } else { 0 };
        check_space(self.path(), "roll back", needed)?;
        let conn = open_projection(&files.previous, false, None)?;
        stamp(&conn, true)?;
        let checkpoint = checkpoint_of(&conn, consumer_id)?;
        let previous = ProjectionDb::new(name.clone(), files.previous.clone(), conn, None);
        options.step(name.as_str(), PublishStep::Stamped);
        let lock_held = swap_in(self, &live, &previous, &files, options);
        // Closed by `swap_in` once copied; closed here when it failed before.
        previous.close_inner()?;
        let lock_held = lock_held?;
        truncate_wal(&live);
        Ok(Published {
            name: name.to_string(),
            checkpoint,
            bytes: previous_bytes,
            lock_held,
            elapsed: started.elapsed(),
            previous_kept: options.keep_previous,
        })
    }
}

/// The heart of publish and rollback: keep a copy of the live file (when
/// asked), copy `source` into the live file in one transaction, close `source`,
/// then make the copy the previous version. Returns how long the live file's
/// write lock was held.
fn swap_in(
    dir: &ProjectionDir,
    live: &ProjectionDb,
    source: &ProjectionDb,
    files: &VersionFiles,
    options: &PublishOptions<'_>,
) -> Result<Duration> {
    let name = live.name().as_str();
    let live_page = live.with_connection(|conn| page_size(conn))?;
    let source_page = source.with_connection(|conn| page_size(conn))?;
    if live_page != source_page {
        return Err(Error::Version {
            name: name.to_owned(),
            reason: format!(
                "page sizes differ (live file {live_page} bytes, {} {source_page} bytes); \
                 rebuild it with --in-place",
                source.path().display()
            ),
        });
    }
    if options.keep_previous {
        remove_file_if_exists(&files.previous_new)?;
        remove_sidecars(&files.previous_new)?;
        let mut copy = Connection::open(&files.previous_new).map_err(Error::sqlite(format!(
            "create {}",
            files.previous_new.display()
        )))?;
        live.with_connection(|conn| copy_database(conn, &mut copy, &files.previous_new))?;
        copy.close().map_err(|(_, source)| Error::Sqlite {
            step: format!("close {}", files.previous_new.display()),
            source,
        })?;
        sync_file(&files.previous_new)?;
    }
    options.step(name, PublishStep::PreviousCopied);
    let locked = Instant::now();
    source
        .with_connection(|from| live.with_connection(|to| copy_database(from, to, live.path())))?;
    let lock_held = locked.elapsed();
    options.step(name, PublishStep::Published);
    // Closed before any file is moved: no connection of ours may outlive its file.
    source.close_inner()?;
    if options.keep_previous {
        // No connection is open on the previous version (the lock keeps other
        // processes away, and ours are closed): its sidecars can go before the
        // rename, so no stale `-wal` is ever replayed into the new file.
        remove_sidecars(&files.previous)?;
        fs::rename(&files.previous_new, &files.previous)
            .map_err(Error::io("keep previous version", &files.previous_new))?;
        sync_dir(dir.path())?;
    } else {
        for path in [&files.previous, &files.previous_new] {
            remove_file_if_exists(path)?;
            remove_sidecars(path)?;
        }
    }
    options.step(name, PublishStep::PreviousKept);
    Ok(lock_held)
}

/// Copies every page of `from` into `to` in one step, so one write transaction
/// on `to`.
fn copy_database(from: &Connection, to: &mut Connection, to_path: &Path) -> Result<()> {
    let step = || format!("copy into {}", to_path.display());
    let backup = Backup::new(from, to).map_err(Error::sqlite(step()))?;
    match backup.step(-1).map_err(Error::sqlite(step()))? {
        StepResult::Done => Ok(()),
        // The destination's busy timeout ran out (another writer), or the source
        // is written by this process: nothing was copied.
        other => Err(Error::Sqlite {
            step: step(),
            source: rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                Some(format!("the copy could not take its locks ({other:?})")),
            ),
        }),
    }
}

/// After a publish the live file's `-wal` holds a whole copy of the projection:
/// move it into the main file and truncate it, if readers allow it soon; if
/// not, SQLite's automatic checkpoints get there later.
fn truncate_wal(live: &ProjectionDb) {
    let _ = live.with_connection(|conn| {
        let _ = conn.busy_timeout(Duration::from_millis(PUBLISH_CHECKPOINT_BUSY_MS));
        let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        let _ = conn.busy_timeout(Duration::from_millis(u64::from(BUSY_TIMEOUT_MS)));
        Ok(())
    });
}

fn page_size(conn: &Connection) -> Result<i64> {
    conn.pragma_query_value(None, "page_size", |row| row.get(0))
        .map_err(Error::sqlite("read page size"))
}

fn checkpoint_of(conn: &Connection, consumer_id: &str) -> Result<u64> {
    let value: Option<i64> = conn
        .query_row(
            "SELECT sequence FROM _checkpoint WHERE consumer_id = ?1",
            [consumer_id],
            |row| row.get(0),
        )
        .optional()
        .map_err(Error::sqlite("read checkpoint"))?;
    Ok(value.map_or(0, |v| u64::try_from(v).unwrap_or(0)))
}

/// Free disk a new shadow asks for, in multiples of the live projection: the
/// shadow itself, its copy through the live file's `-wal` (measured at 1.35x
/// the bytes copied, see BENCHMARKS.md), and the kept previous version.
const SHADOW_SPACE_FACTOR: u64 = 4;

/// What copying `bytes` into the live file takes in its `-wal`: measured at
/// 1.35x (frame headers, pages spilled from the cache), asked as 1.5x.
fn wal_copy_bytes(bytes: u64) -> u64 {
    bytes.saturating_add(bytes / 2)
}

/// Fails with [`Error::DiskSpace`] unless `needed` bytes are free in `dir`.
pub(crate) fn check_space(dir: &Path, step: &str, needed: u64) -> Result<()> {
    let available = fs4::available_space(dir).map_err(Error::io("measure free space", dir))?;
    if available < needed {
        return Err(Error::DiskSpace {
            step: step.to_owned(),
            path: dir.to_path_buf(),
            needed,
            available,
        });
    }
    Ok(())
}

fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(Error::io("sync", path))
}

/// Makes a rename durable (Unix; elsewhere the rename itself is what we have).
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(Error::io("sync", dir))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_little_disk_is_an_error_naming_the_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let err = check_space(tmp.path(), "publish the shadow", u64::MAX).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(
                err,
                Error::DiskSpace {
                    needed: u64::MAX,
                    ..
                }
            ),
            "{text}"
        );
        assert!(
            text.contains(&format!("{} bytes needed", u64::MAX)) && text.contains("available"),
            "{text}"
        );
        check_space(tmp.path(), "publish the shadow", 1).unwrap();
    }
}
