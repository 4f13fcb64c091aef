//! `projection_digest`: a content hash of a projection's tables, for comparing two
//! projections row by row (tests, benchmarks, `status`). Integrity checks are not
//! enough: a stale `-wal` can bring back old rows that `PRAGMA integrity_check`
//! calls fine.

use rusqlite::Connection;
use rusqlite::types::ValueRef;
use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Which tables a digest covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DigestScope {
    /// Every table, including `_checkpoint` (but not the run record
    /// `_projectionist_run`, the version stamp `_projectionist_version` nor
    /// the dead letters `_projectionist_dead_letters`: when and by which
    /// process a run, a publish or a failure happened is not content; list
    /// dead letters with [`dead_letters`](crate::dead_letters)).
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
        if table == crate::outcome::RUN_TABLE
            || table == crate::stamp::VERSION_TABLE
            || table == crate::dead_letters::DEAD_LETTERS_TABLE
        {
            continue;
        }
        let internal = crate::format::is_reserved_table(&table);
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
    hash_table_in(conn, "main", table, hasher)
}

fn hash_table_in(
    conn: &Connection,
    schema: &str,
    table: &str,
    hasher: &mut Sha256,
) -> rusqlite::Result<()> {
    let quoted = table.replace('"', "\"\"");
    let n_columns = conn
        .prepare(&format!("SELECT * FROM {schema}.\"{quoted}\""))?
        .column_count();
    let order: Vec<String> = (1..=n_columns).map(|i| i.to_string()).collect();
    let sql = if n_columns == 0 {
        format!("SELECT * FROM {schema}.\"{quoted}\"")
    } else {
        format!(
            "SELECT * FROM {schema}.\"{quoted}\" ORDER BY {}",
            order.join(", ")
        )
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

/// How one table differs between two projection files.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TableDifference {
    /// The table.
    pub table: String,
    /// Rows in the first file (`None`: the table is not there).
    pub rows_first: Option<u64>,
    /// Rows in the second file (`None`: the table is not there).
    pub rows_second: Option<u64>,
    /// A few differing rows, by primary key (or whole row when the table has
    /// none): `changed (k)`, `only in first (k)`, `only in second (k)`.
    pub examples: Vec<String>,
}

/// Compares the projection's own tables (not `_checkpoint` nor the internal
/// `_projectionist_*` tables) of the file open on `first` with the file at
/// `second`: row counts and content digests per table, and for each table that
/// differs up to `examples_max` differing rows named by primary key. Returns
/// only the tables that differ; empty means equal. `second` is attached
/// read-only to `first` for the row comparison.
///
/// # Errors
/// [`Error::Sqlite`] when a file cannot be read.
pub fn compare_projections(
    first: &Connection,
    second: &std::path::Path,
    examples_max: usize,
) -> Result<Vec<TableDifference>> {
    let step = || format!("compare with {}", second.display());
    let uri = format!("file:{}?mode=ro", crate::files::uri_path(second));
    first
        .execute("ATTACH DATABASE ?1 AS other", [uri])
        .map_err(Error::sqlite(step()))?;
    let result = compare_attached(first, examples_max).map_err(Error::sqlite(step()));
    let _ = first.execute_batch("DETACH DATABASE other");
    result
}

fn compare_attached(
    conn: &Connection,
    examples_max: usize,
) -> rusqlite::Result<Vec<TableDifference>> {
    let tables_of = |schema: &str| -> rusqlite::Result<Vec<String>> {
        let mut stmt = conn.prepare(&format!(
            "SELECT name FROM {schema}.sqlite_master WHERE type = 'table'
             AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name"
        ))?;
        let names: Vec<String> = stmt
            .query_map([], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(names
            .into_iter()
            .filter(|t| !crate::format::is_reserved_table(t))
            .collect())
    };
    let (first, second) = (tables_of("main")?, tables_of("other")?);
    let mut all: Vec<&String> = first.iter().chain(&second).collect();
    all.sort();
    all.dedup();
    let mut differences = Vec::new();
    for table in all {
        let quoted = table.replace('"', "\"\"");
        let count = |schema: &str, present: bool| -> rusqlite::Result<Option<u64>> {
            if !present {
                return Ok(None);
            }
            conn.query_row(
                &format!("SELECT count(*) FROM {schema}.\"{quoted}\""),
                [],
                |row| row.get::<_, i64>(0),
            )
            .map(|n| Some(n.max(0) as u64))
        };
        let rows_first = count("main", first.contains(table))?;
        let rows_second = count("other", second.contains(table))?;
        if rows_first.is_none() || rows_second.is_none() {
            differences.push(TableDifference {
                table: table.clone(),
                rows_first,
                rows_second,
                examples: Vec::new(),
            });
            continue;
        }
        let digest_of = |schema: &str| -> rusqlite::Result<Vec<u8>> {
            let mut hasher = Sha256::new();
            hash_table_in(conn, schema, table, &mut hasher)?;
            Ok(hasher.finalize().to_vec())
        };
        if digest_of("main")? == digest_of("other")? {
            continue;
        }
        differences.push(TableDifference {
            table: table.clone(),
            rows_first,
            rows_second,
            examples: differing_rows(conn, &quoted, examples_max)?,
        });
    }
    differences.extend(schema_objects_differing(conn)?);
    Ok(differences)
}

/// Views and triggers are part of what a projection serves: one that is in
/// only one file, or defined differently, is a difference (named `view v` or
/// `trigger t`; `rows_*` say where it is: `Some(0)` present, `None` absent).
fn schema_objects_differing(conn: &Connection) -> rusqlite::Result<Vec<TableDifference>> {
    let objects_of = |schema: &str| -> rusqlite::Result<BTreeMap<String, Option<String>>> {
        let mut stmt = conn.prepare(&format!(
            "SELECT type || ' ' || name, sql FROM {schema}.sqlite_master
             WHERE type IN ('view', 'trigger') ORDER BY 1"
        ))?;
        stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect()
    };
    let (first, second) = (objects_of("main")?, objects_of("other")?);
    let mut names: Vec<&String> = first.keys().chain(second.keys()).collect();
    names.sort();
    names.dedup();
    Ok(names
        .into_iter()
        .filter(|name| first.get(*name) != second.get(*name))
        .map(|name| TableDifference {
            table: name.clone(),
            rows_first: first.contains_key(name).then_some(0),
            rows_second: second.contains_key(name).then_some(0),
            examples: if first.contains_key(name) && second.contains_key(name) {
                vec!["defined differently".to_owned()]
            } else {
                Vec::new()
            },
        })
        .collect())
}

/// Up to `max` rows that differ, named by primary key (whole row without one).
fn differing_rows(conn: &Connection, quoted: &str, max: usize) -> rusqlite::Result<Vec<String>> {
    let mut key: Vec<(i64, String)> = conn
        .prepare(&format!(
            "SELECT pk, name FROM main.pragma_table_info('{}') WHERE pk > 0",
            quoted.replace('\'', "''")
        ))?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    key.sort();
    let key_sql = if key.is_empty() {
        "*".to_owned()
    } else {
        key.iter()
            .map(|(_, name)| format!("\"{}\"", name.replace('"', "\"\"")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let keys_of = |from: &str, to: &str| -> rusqlite::Result<Vec<String>> {
        let sql = format!(
            "SELECT {key_sql} FROM (SELECT * FROM {from}.\"{quoted}\" EXCEPT SELECT * FROM {to}.\"{quoted}\") LIMIT {limit}",
            limit = max.saturating_mul(4).max(1)
        );
        let mut stmt = conn.prepare(&sql)?;
        let n = stmt.column_count();
        let rows = stmt
            .query_map([], |row| {
                let parts: Vec<String> = (0..n)
                    .map(|i| row.get_ref(i).map(show_value))
                    .collect::<rusqlite::Result<_>>()?;
                Ok(parts.join(", "))
            })?
            .collect::<rusqlite::Result<Vec<String>>>()?;
        Ok(rows)
    };
    let only_first = keys_of("main", "other")?;
    let only_second = keys_of("other", "main")?;
    let mut examples = Vec::new();
    for k in &only_first {
        if only_second.contains(k) && !key.is_empty() {
            examples.push(format!("changed ({k})"));
        } else {
            examples.push(format!("only in first ({k})"));
        }
    }
    for k in &only_second {
        if !only_first.contains(k) || key.is_empty() {
            examples.push(format!("only in second ({k})"));
        }
    }
    examples.truncate(max);
    Ok(examples)
}

fn show_value(value: ValueRef<'_>) -> String {
    match value {
        ValueRef::Null => "NULL".to_owned(),
        ValueRef::Integer(n) => n.to_string(),
        ValueRef::Real(x) => x.to_string(),
        ValueRef::Text(t) => format!("'{}'", String::from_utf8_lossy(t)),
        ValueRef::Blob(b) => format!("blob of {} bytes", b.len()),
    }
}
