//! `projection_digest`: a content hash of a projection's tables, for comparing two
//! projections row by row (tests, benchmarks, `status`). Integrity checks are not
//! enough: a stale `-wal` can bring back old rows that `PRAGMA integrity_check`
//! calls fine.

use rusqlite::Connection;
use rusqlite::types::ValueRef;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Which tables a digest covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DigestScope {
    /// Every table, including `_checkpoint` (but not the run record
    /// `_projectionist_run` nor the version stamp `_projectionist_version`:
    /// when and by which process a run or publish happened is not content).
    All,
    /// The projection's own tables: everything but `_checkpoint` and internal
    /// `_projectionist_*` tables.
    ProjectionTables,
}

/// SHA-256 (hex) over the schema-independent content of the tables: each table's
/// name, column names, and rows in sorted order with typed values. Two databases
/// with the same rows give the same digest whatever their page layout.
///
/// # Errors
/// [`Error::Sqlite`] when a table cannot be read.
pub fn projection_digest(conn: &Connection, scope: DigestScope) -> Result<String> {
    let step = || "digest projection tables".to_owned();
    let tables: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table'
             AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name",
        )
        .and_then(|mut stmt| stmt.query_map([], |row| row.get(0))?.collect())
        .map_err(Error::sqlite(step()))?;
    let mut hasher = Sha256::new();
    for table in tables {
        if table == crate::outcome::RUN_TABLE || table == crate::versions::VERSION_TABLE {
            continue;
        }
        let internal = crate::dir::is_reserved_table(&table);
        if internal && scope == DigestScope::ProjectionTables {
            continue;
        }
        hash_table(conn, &table, &mut hasher).map_err(Error::sqlite(step()))?;
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn hash_table(conn: &Connection, table: &str, hasher: &mut Sha256) -> rusqlite::Result<()> {
    let quoted = table.replace('"', "\"\"");
    let n_columns = conn
        .prepare(&format!("SELECT * FROM \"{quoted}\""))?
        .column_count();
    let order: Vec<String> = (1..=n_columns).map(|i| i.to_string()).collect();
    let sql = if n_columns == 0 {
        format!("SELECT * FROM \"{quoted}\"")
    } else {
        format!("SELECT * FROM \"{quoted}\" ORDER BY {}", order.join(", "))
    };
    let mut stmt = conn.prepare(&sql)?;
    hash_field(hasher, b'T', table.as_bytes());
    for name in stmt.column_names() {
        hash_field(hasher, b'C', name.as_bytes());
    }
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        hasher.update(b"R");
        for idx in 0..n_columns {
            match row.get_ref(idx)? {
                ValueRef::Null => hasher.update(b"N"),
                ValueRef::Integer(n) => hash_field(hasher, b'I', &n.to_le_bytes()),
                ValueRef::Real(x) => hash_field(hasher, b'F', &x.to_bits().to_le_bytes()),
                ValueRef::Text(t) => hash_field(hasher, b'S', t),
                ValueRef::Blob(b) => hash_field(hasher, b'B', b),
            }
        }
    }
    Ok(())
}

/// Tag, length, bytes: no two different sequences of fields hash the same input.
fn hash_field(hasher: &mut Sha256, tag: u8, bytes: &[u8]) {
    hasher.update([tag]);
    hasher.update((bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}
