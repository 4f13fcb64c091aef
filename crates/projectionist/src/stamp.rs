//! The version stamp of a projection file (table `_projectionist_version`:
//! which publish made it live, whether a rollback restored it), and the
//! recovery that reads the stamps after a crashed publish or rollback (see
//! `versions.rs` for the protocol).

use std::fs;
use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::error::{Error, Result};
use crate::files::{VersionFiles, remove_file_if_exists, remove_sidecars};
use crate::format::{FileKind, classify_file};
use crate::name::ProjectionName;

/// The table that names a projection file's version (one row).
pub(crate) const VERSION_TABLE: &str = "_projectionist_version";

const VERSION_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS _projectionist_version (
    id             TEXT NOT NULL,
    published_at   TEXT NOT NULL,
    rolled_back_at TEXT
);
";

/// A projection file's version, as stamped by the publish that made it live.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VersionInfo {
    /// Unique per publish; `None` for a file built in place (never published).
    pub id: Option<String>,
    /// When it was published (UTC, ISO 8601).
    pub published_at: Option<String>,
    /// When a rollback restored it (UTC, ISO 8601): a follower must not rebuild
    /// it on its own even when its definition differs from the configured one.
    pub rolled_back_at: Option<String>,
}

/// Reads a projection file's version stamp through any connection to it.
///
/// # Errors
/// [`Error::Sqlite`] when the file cannot be read.
pub fn version_info(conn: &Connection) -> Result<VersionInfo> {
    let step = || "read projection version".to_owned();
    let exists: bool = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [VERSION_TABLE],
            |row| row.get::<_, i64>(0),
        )
        .map_err(Error::sqlite(step()))?
        > 0;
    if !exists {
        return Ok(VersionInfo::default());
    }
    let row = conn
        .query_row(
            "SELECT id, published_at, rolled_back_at FROM _projectionist_version LIMIT 1",
            [],
            |row| {
                Ok(VersionInfo {
                    id: row.get(0)?,
                    published_at: row.get(1)?,
                    rolled_back_at: row.get(2)?,
                })
            },
        )
        .optional()
        .map_err(Error::sqlite(step()))?;
    Ok(row.unwrap_or_default())
}

/// Finishes or undoes what a crashed publish or rollback left, from the
/// version stamps (see the module docs). Called with the projection's lock
/// held, when the live file is opened.
pub(crate) fn recover(dir: &Path, name: &ProjectionName, live: &Connection) -> Result<()> {
    let files = VersionFiles::of(dir, name);
    let have_copy = fs::symlink_metadata(&files.previous_new).is_ok();
    let have_shadow = fs::symlink_metadata(&files.shadow).is_ok();
    if !have_copy && !have_shadow {
        return Ok(());
    }
    let live_id = version_info(live)?.id;
    if have_copy {
        let copy_id = read_id(&files.previous_new);
        match copy_id {
            Some(copy_id) if copy_id != live_id => {
                remove_sidecars(&files.previous)?;
                fs::rename(&files.previous_new, &files.previous)
                    .map_err(Error::io("keep previous version", &files.previous_new))?;
            }
            // The publish did not happen, or the copy is incomplete.
            _ => {
                remove_file_if_exists(&files.previous_new)?;
                remove_sidecars(&files.previous_new)?;
            }
        }
    }
    if have_shadow && live_id.is_some() && read_id(&files.shadow) == Some(live_id) {
        remove_file_if_exists(&files.shadow)?;
        remove_sidecars(&files.shadow)?;
    }
    Ok(())
}

/// The version id of a file of ours: `Some(None)` for a readable file without
/// a stamp, `None` when it cannot be read (an interrupted copy).
fn read_id(path: &Path) -> Option<Option<String>> {
    if classify_file(path).ok().flatten() != Some(FileKind::Projection) {
        return None;
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE).ok()?;
    // A copy that crashed half-way is rolled back (its journal) to a database
    // without the engine's tables: it is no version at all.
    let complete: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '_checkpoint'",
            [],
            |row| row.get(0),
        )
        .ok()?;
    if complete == 0 {
        return None;
    }
    version_info(&conn).ok().map(|v| v.id)
}

/// Gives the file a new version stamp (a publish), or marks it rolled back.
pub(crate) fn stamp(conn: &Connection, rolled_back: bool) -> Result<()> {
    let step = || "stamp projection version".to_owned();
    conn.execute_batch(VERSION_SCHEMA)
        .map_err(Error::sqlite(step()))?;
    let sql = if rolled_back {
        "UPDATE _projectionist_version
            SET rolled_back_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now');
         INSERT INTO _projectionist_version (id, published_at, rolled_back_at)
         SELECT lower(hex(randomblob(16))), strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
                strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
         WHERE NOT EXISTS (SELECT 1 FROM _projectionist_version);"
    } else {
        "DELETE FROM _projectionist_version;
         INSERT INTO _projectionist_version (id, published_at)
         VALUES (lower(hex(randomblob(16))), strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));"
    };
    conn.execute_batch(&format!("BEGIN IMMEDIATE; {sql} COMMIT;"))
        .map_err(Error::sqlite(step()))
}
