//! The definition a projection file was built from (table
//! `_projectionist_definition`): written by the handler's setup, read to tell a
//! stale projection from a current one.

use projectionist::rusqlite::{Connection, OptionalExtension};

/// The table in each projection file recording which definition built it.
pub const DEFINITION_TABLE: &str = "_projectionist_definition";

/// The definition a projection file was built with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDefinition {
    /// Declared version.
    pub version: u32,
    /// Definition hash.
    pub hash: String,
}

/// The definition stored in a projection file, `None` when it has none (new file,
/// or built by a Rust handler).
///
/// # Errors
/// SQLite errors reading the table.
pub fn stored_definition(
    conn: &Connection,
) -> Result<Option<StoredDefinition>, projectionist::rusqlite::Error> {
    let exists: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE name = ?1",
        [DEFINITION_TABLE],
        |row| row.get(0),
    )?;
    if !exists {
        return Ok(None);
    }
    conn.query_row(
        &format!("SELECT version, hash FROM {DEFINITION_TABLE} LIMIT 1"),
        [],
        |row| {
            Ok(StoredDefinition {
                version: row.get(0)?,
                hash: row.get(1)?,
            })
        },
    )
    .optional()
}

/// Records in the projection file behind `conn` that it is built from
/// definition `version` with `hash` (replacing any record): what
/// [`stored_definition`] reads back. A declared projection's handler records
/// its own; a Rust handler's supervisor records the version its code declares.
///
/// # Errors
/// SQLite errors writing the table.
pub fn record_definition(
    conn: &Connection,
    version: u32,
    hash: &str,
) -> Result<(), projectionist::rusqlite::Error> {
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {DEFINITION_TABLE} (version INTEGER NOT NULL, hash TEXT NOT NULL);
         DELETE FROM {DEFINITION_TABLE};"
    ))?;
    conn.execute(
        &format!("INSERT INTO {DEFINITION_TABLE} (version, hash) VALUES (?1, ?2)"),
        (version, hash),
    )?;
    Ok(())
}
