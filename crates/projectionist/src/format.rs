//! The projection file format's marks: what tells a projection file from
//! anything else ([`APPLICATION_ID`], [`classify_file`]), the engine's tables
//! in every file (`_checkpoint`, the reserved `_projectionist_*` names), and
//! whether a file is damaged ([`quick_check`], [`is_corruption`]).

use std::fs;
use std::path::Path;

use rusqlite::{Connection, OpenFlags, Transaction};

use crate::error::{Error, Result};
use crate::files::{immutable_uri, read_prefix};
use crate::limits::QUICK_CHECK_CACHE_KIB;

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
pub(crate) const NOT_SQLITE: &str = "not an SQLite database";

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
/// a page cache of at most `QUICK_CHECK_CACHE_KIB` (64 KiB) (the connection's own
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
