//! Snapshots of projections kept in PostgreSQL, the database teams already
//! run for the events: no new infrastructure for a node that seeds from
//! them. A snapshot is its manifest (one row) and its file in chunks of
//! [`SNAPSHOT_CHUNK_BYTES`] (rows of their own), streamed both ways: memory
//! holds one chunk, whatever the snapshot's size.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use postgres::Client;
use postgres::types::Type;
use projectionist::{Error, Result, plain_identifier};
use projectionist_runner::snapshot::{Manifest, SnapshotLocation};

use crate::connect::{connect_client, redact};
use crate::store::{init_schema, pg_error};

/// Bytes per stored chunk: large enough that a 1 GiB snapshot is a thousand
/// rows, small enough that a chunk in memory (once read, once sent) is
/// nothing next to the 64 MiB a restore may use.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// The schema the snapshot tables live in unless told otherwise (the one the
/// workers keep their leases in).
pub const SNAPSHOT_SCHEMA_DEFAULT: &str = "projectionist";

/// Snapshots in tables `{schema}.snapshots` (manifests) and
/// `{schema}.snapshot_chunks` (files), created when missing.
pub struct PostgresSnapshots {
    client: Mutex<Client>,
    schema: String,
    url_for_errors: String,
}

impl PostgresSnapshots {
    /// Connects (as `psql` does, see `docs/postgres.md`) and creates the
    /// tables in [`SNAPSHOT_SCHEMA_DEFAULT`] when missing.
    ///
    /// # Errors
    /// Connection errors; a role that may not create them.
    pub fn connect(url: &str) -> Result<Self> {
        Self::connect_in(url, SNAPSHOT_SCHEMA_DEFAULT)
    }

    /// [`PostgresSnapshots::connect`] with the tables in `schema`.
    ///
    /// # Errors
    /// As [`PostgresSnapshots::connect`]; [`Error::InvalidOptions`] for a
    /// schema that is not a plain identifier.
    pub fn connect_in(url: &str, schema: &str) -> Result<Self> {
        let schema = plain_identifier(schema)?.to_owned();
        let mut client = connect_client(url)?;
        let ddl = format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {schema}.snapshots (
                 projection TEXT NOT NULL, checkpoint BIGINT NOT NULL, manifest JSONB NOT NULL,
                 PRIMARY KEY (projection, checkpoint));
             CREATE TABLE IF NOT EXISTS {schema}.snapshot_chunks (
                 projection TEXT NOT NULL, checkpoint BIGINT NOT NULL, n INTEGER NOT NULL,
                 bytes BYTEA NOT NULL, PRIMARY KEY (projection, checkpoint, n));"
        );
        init_schema(&mut client, &ddl).map_err(pg_error("create the snapshot tables"))?;
        Ok(PostgresSnapshots {
            client: Mutex::new(client),
            schema,
            url_for_errors: redact(url),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Client> {
        self.client.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn checkpoint(value: u64) -> i64 {
        i64::try_from(value).unwrap_or(i64::MAX)
    }
}

impl SnapshotLocation for PostgresSnapshots {
    fn put(&self, manifest: &Manifest, file: &Path) -> Result<()> {
        let schema = &self.schema;
        let step = || format!("store a snapshot in {}", self.url_for_errors);
        let (name, checkpoint) = (&manifest.projection, Self::checkpoint(manifest.checkpoint));
        let mut reader = std::fs::File::open(file).map_err(|source| Error::Io {
            step: "read the snapshot",
            path: file.to_path_buf(),
            source,
        })?;
        let mut client = self.lock();
        let mut tx = client.transaction().map_err(pg_error(step()))?;
        for table in ["snapshots", "snapshot_chunks"] {
            tx.query_typed(
                &format!("DELETE FROM {schema}.{table} WHERE projection = $1 AND checkpoint = $2"),
                &[(name, Type::TEXT), (&checkpoint, Type::INT8)],
            )
            .map_err(pg_error(step()))?;
        }
        let mut buffer = vec![0u8; SNAPSHOT_CHUNK_BYTES];
        let mut n: i32 = 0;
        loop {
            let mut filled = 0;
            while filled < buffer.len() {
                let read = reader
                    .read(&mut buffer[filled..])
                    .map_err(|source| Error::Io {
                        step: "read the snapshot",
                        path: file.to_path_buf(),
                        source,
                    })?;
                if read == 0 {
                    break;
                }
                filled += read;
            }
            if filled == 0 {
                break;
            }
            let chunk = &buffer[..filled];
            tx.query_typed(
                &format!(
                    "INSERT INTO {schema}.snapshot_chunks (projection, checkpoint, n, bytes) \
                     VALUES ($1, $2, $3, $4)"
                ),
                &[
                    (name, Type::TEXT),
                    (&checkpoint, Type::INT8),
                    (&n, Type::INT4),
                    (&chunk, Type::BYTEA),
                ],
            )
            .map_err(pg_error(step()))?;
            n += 1;
            if filled < buffer.len() {
                break;
            }
        }
        // The manifest last: a snapshot is listed only once whole.
        let text = serde_json::to_string(manifest).expect("a manifest serializes");
        tx.query_typed(
            &format!(
                "INSERT INTO {schema}.snapshots (projection, checkpoint, manifest) \
                 VALUES ($1, $2, $3::text::jsonb)"
            ),
            &[
                (name, Type::TEXT),
                (&checkpoint, Type::INT8),
                (&text, Type::TEXT),
            ],
        )
        .map_err(pg_error(step()))?;
        tx.commit().map_err(pg_error(step()))
    }

    fn manifests(&self, name: &str) -> Result<Vec<Manifest>> {
        let rows = self
            .lock()
            .query_typed(
                &format!(
                    "SELECT manifest::text FROM {}.snapshots WHERE projection = $1 \
                     ORDER BY checkpoint DESC",
                    self.schema
                ),
                &[(&name, Type::TEXT)],
            )
            .map_err(pg_error(format!(
                "list snapshots in {}",
                self.url_for_errors
            )))?;
        Ok(rows
            .iter()
            .filter_map(|row| serde_json::from_str(row.get::<_, &str>(0)).ok())
            .collect())
    }

    fn fetch(&self, manifest: &Manifest, to: &Path) -> Result<()> {
        let io = |source| Error::Io {
            step: "write the fetched snapshot",
            path: to.to_path_buf(),
            source,
        };
        let mut out = std::fs::File::create(to).map_err(io)?;
        let checkpoint = Self::checkpoint(manifest.checkpoint);
        let sql = format!(
            "SELECT bytes FROM {}.snapshot_chunks WHERE projection = $1 AND checkpoint = $2 AND n = $3",
            self.schema
        );
        let mut client = self.lock();
        // One chunk per query: memory holds one chunk, not the snapshot.
        for n in 0.. {
            let n: i32 = n;
            let row = client
                .query_typed_opt(
                    &sql,
                    &[
                        (&manifest.projection, Type::TEXT),
                        (&checkpoint, Type::INT8),
                        (&n, Type::INT4),
                    ],
                )
                .map_err(pg_error(format!(
                    "fetch a snapshot from {}",
                    self.url_for_errors
                )))?;
            let Some(row) = row else { break };
            out.write_all(row.get::<_, &[u8]>(0)).map_err(io)?;
        }
        out.sync_all().map_err(io)
    }

    fn delete(&self, name: &str, checkpoint: u64) -> Result<()> {
        let checkpoint = Self::checkpoint(checkpoint);
        let mut client = self.lock();
        for table in ["snapshots", "snapshot_chunks"] {
            client
                .query_typed(
                    &format!(
                        "DELETE FROM {}.{table} WHERE projection = $1 AND checkpoint = $2",
                        self.schema
                    ),
                    &[(&name, Type::TEXT), (&checkpoint, Type::INT8)],
                )
                .map_err(pg_error(format!(
                    "delete a snapshot in {}",
                    self.url_for_errors
                )))?;
        }
        Ok(())
    }
}
