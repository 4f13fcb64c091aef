//! Where a projection's run writes and from where it starts: the policy that
//! keeps a live file serving while a new version is built beside it.
//!
//! Shared by the supervisor and the command line's one-shot runs, so both
//! decide alike.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use projectionist::limits::{BUSY_TIMEOUT_MS, START_BUSY_TIMEOUT_MS};
use projectionist::rusqlite::Connection;
use projectionist::{
    Error, ProjectionDb, ProjectionDir, Result, SqliteCheckpoint, Start, VersionFiles, quick_check,
    version_info,
};

/// What a run is asked to do with a projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Build it again from the start of the log: in its shadow when the live
    /// file serves a built projection (unless `in_place`).
    Rebuild {
        /// Rebuild the live file itself (readers see it empty meanwhile).
        in_place: bool,
        /// Keep the replaced version for a rollback (its disk space is asked
        /// for when the shadow is made).
        keep_previous: bool,
    },
    /// Bring it up to date: from its checkpoint, or in its shadow when its
    /// definition changed, or when a rebuild was asked for (`rebuild_requested`).
    Resume {
        /// Another party asked for a rebuild (a request file, a handle's request).
        rebuild_requested: bool,
    },
}

/// Where a projection's run goes.
#[derive(Debug)]
pub enum Placement {
    /// Run it: write `writes` (the live file, or its shadow), from `start`.
    Run {
        /// The file the run writes.
        writes: Arc<ProjectionDb>,
        /// From scratch or from the file's checkpoint.
        start: Start,
        /// Whether `writes` is the shadow (published once complete).
        in_shadow: bool,
    },
    /// Leave it as it is: it was rolled back on purpose to a version built from
    /// another definition, until someone rebuilds it.
    Held {
        /// Why, for the operator.
        reason: String,
    },
}

/// Decides where a run of projection `name` (its live file `live`) writes and
/// from where it starts. `stale` tells whether a file was built from another
/// definition than the one at hand; `head` is the store's head, when known.
///
/// A live file that serves a built projection (checkpoint > 0) is never
/// emptied: the new version goes into the shadow, published when complete.
/// An interrupted shadow is continued (or started over when it is stale). A
/// live file whose checkpoint is past the head was built from another log and
/// is rebuilt in place by a rebuild.
///
/// # Errors
/// Opening the shadow (disk space, an obstacle in its place), a live file
/// whose write lock another connection holds, SQLite errors.
pub fn place(
    dir: &ProjectionDir,
    live: &Arc<ProjectionDb>,
    stale: &dyn Fn(&Connection) -> bool,
    plan: Plan,
    head: Option<u64>,
) -> Result<Placement> {
    let name = live.name().as_str().to_owned();
    let (checkpoint, live_stale, rolled_back) = live.with_connection(|conn| {
        Ok((
            SqliteCheckpoint::load_in(conn, &name).unwrap_or(0),
            stale(conn),
            version_info(conn).is_ok_and(|v| v.rolled_back_at.is_some()),
        ))
    })?;
    let files = VersionFiles::new(dir.path(), &name)?;
    let has_shadow = files.shadow.exists();
    let ahead = head.is_some_and(|h| checkpoint > h);
    let keep_previous = !matches!(
        plan,
        Plan::Rebuild {
            keep_previous: false,
            ..
        }
    );
    let open_shadow = || -> Result<Arc<ProjectionDb>> {
        writable_now(live)?;
        dir.shadow_for(
            &name,
            &projectionist::PublishOptions::new().keep_previous(keep_previous),
        )
    };
    let in_shadow = |start| -> Result<Placement> {
        Ok(Placement::Run {
            writes: open_shadow()?,
            start,
            in_shadow: true,
        })
    };
    let in_live = |start| Placement::Run {
        writes: Arc::clone(live),
        start,
        in_shadow: false,
    };
    match plan {
        Plan::Rebuild { in_place, .. } if in_place || checkpoint == 0 || ahead => {
            if has_shadow {
                dir.discard_shadow(&name)?;
            }
            Ok(in_live(Start::Reset))
        }
        Plan::Rebuild { .. } => in_shadow(Start::Reset),
        Plan::Resume {
            rebuild_requested: true,
        } if checkpoint > 0 && !ahead => in_shadow(Start::Reset),
        Plan::Resume {
            rebuild_requested: true,
        } => Ok(in_live(Start::Reset)),
        Plan::Resume { .. } if has_shadow => {
            let shadow = open_shadow()?;
            let shadow_stale = shadow.with_connection(|conn| Ok(stale(conn)))?;
            let start = if shadow_stale {
                Start::Reset
            } else {
                Start::Resume
            };
            Ok(Placement::Run {
                writes: shadow,
                start,
                in_shadow: true,
            })
        }
        _ if live_stale && rolled_back => Ok(Placement::Held {
            reason: format!(
                "projection {name} was rolled back to a version built from another definition \
                 than the current one; it is left as it is until you rebuild it"
            ),
        }),
        Plan::Resume { .. } if live_stale && checkpoint > 0 && !ahead => in_shadow(Start::Reset),
        _ => Ok(in_live(if live_stale {
            Start::Reset
        } else {
            Start::Resume
        })),
    }
}

/// A projection opened for a run.
#[derive(Debug)]
pub struct Opened {
    /// Its live file.
    pub db: Arc<ProjectionDb>,
    /// When its file was corrupt: why, and where it was moved (it starts afresh).
    pub moved_aside: Option<(String, PathBuf)>,
}

/// Opens projection `name` for a run. A corrupt file (SQLite cannot read it,
/// or `PRAGMA quick_check` fails) is derived data: it is moved aside (said in
/// [`Opened::moved_aside`]) and the projection starts afresh; nothing is
/// deleted.
///
/// # Errors
/// As [`ProjectionDir::db`] (locked by another process, not a projection).
pub fn open_for_run(dir: &ProjectionDir, name: &str) -> Result<Opened> {
    let corrupt = match dir.db(name) {
        Ok(db) => match db.with_connection(|conn| quick_check(conn))? {
            None => {
                return Ok(Opened {
                    db,
                    moved_aside: None,
                });
            }
            Some(problem) => problem,
        },
        Err(Error::CorruptProjection { reason, .. }) => reason,
        Err(Error::NotAProjection { reason, .. }) if reason.starts_with("not an SQLite") => reason,
        Err(e) => return Err(e),
    };
    let moved = dir.move_aside_corrupt(name)?;
    Ok(Opened {
        db: dir.db(name)?,
        moved_aside: Some((corrupt, moved)),
    })
}

/// Fails at once when another connection holds the live file's write lock
/// (a shell, another tool), as a run that writes the live file does at its
/// start: a shadow rebuild would otherwise find out only when it publishes.
///
/// # Errors
/// [`Error::Sqlite`] naming the check.
pub fn writable_now(db: &ProjectionDb) -> Result<()> {
    db.with_connection(|conn| {
        let wait = |ms: u32| conn.busy_timeout(Duration::from_millis(u64::from(ms)));
        let sqlite = |e| Error::Sqlite {
            step: "check that the live file can be published to".into(),
            source: e,
        };
        wait(START_BUSY_TIMEOUT_MS).map_err(sqlite)?;
        let probe = conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;");
        wait(BUSY_TIMEOUT_MS).map_err(sqlite)?;
        probe.map_err(sqlite)
    })
}

/// A shadow that could not be published says why, in its own file, where
/// `status` reads it (`shadow_error`): not an interrupted rebuild, a complete
/// one whose publish failed. Best effort (a full disk may refuse this too; the
/// caller reports the error either way).
pub fn record_publish_failure(dir: &ProjectionDir, name: &str, error: &Error) {
    let text = format!("complete, but publishing it failed (the live file is unchanged): {error}");
    if let Ok(shadow) = dir.shadow(name) {
        let _ = shadow.with_connection(|conn| projectionist::record_failure(conn, name, &text));
    }
}

/// Whether a run ended because the log could not be read (a lost connection, a
/// server restart), not because of an event in it: a cause that goes away.
#[must_use]
pub fn is_store_failure(error: &Error) -> bool {
    matches!(error, Error::Replay { source, .. } if source.event().is_none())
}

/// Whether `error` has a cause that goes away by itself: another connection
/// holding the file's lock, a full disk, too little free space for a shadow,
/// another process holding the projection. Such a failure is tried again with
/// backoff; any other (a poison event, a handler's error) is not.
#[must_use]
pub fn is_transient(error: &Error) -> bool {
    projectionist::is_transient(error)
}
