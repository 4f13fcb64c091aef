//! Snapshots: a consistent copy of a projection file at a committed
//! checkpoint, with a manifest, in a directory (local or a shared mount); and
//! seeding: a projection that is missing locally is restored from the newest
//! snapshot that fits (same definition, same store, not past its head,
//! checksum verified), then caught up from its checkpoint as any projection.
//!
//! A snapshot is `{name}.{checkpoint}.db` and its manifest
//! `{name}.{checkpoint}.json`, each written beside under a temporary name and
//! renamed into place (manifest last), so a half-written snapshot is never
//! taken for one.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use projectionist::rusqlite::{Connection, OpenFlags};
use projectionist::{Error, GlobalReader, Result, SqliteCheckpoint};
use projectionist_sqlview::stored_definition;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest format this version writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// Pages copied per step of the backup: small steps let the source's writer
/// commit in between (a step holds a read transaction only).
const BACKUP_PAGES_PER_STEP: i32 = 1_024;

/// What a snapshot is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// The projection.
    pub projection: String,
    /// The definition it was built from (`None`: none recorded).
    pub definition_version: Option<u32>,
    /// Its hash.
    pub definition_hash: Option<String>,
    /// The committed checkpoint the copy holds.
    pub checkpoint: u64,
    /// The identity of the event store it was built from ([`store_identity`]).
    pub store: String,
    /// Bytes of the snapshot file.
    pub bytes: u64,
    /// SHA-256 of the snapshot file, hex.
    pub sha256: String,
    /// When it was taken, seconds since the Unix epoch.
    pub created_unix: u64,
    /// The tool version that took it.
    pub tool_version: String,
}

/// A store's identity: a hash of its first event (sequence, stream, type,
/// time), the same for every copy and every reader of one log, different for
/// another log. `None` for an empty log.
///
/// # Errors
/// Store errors reading the first event.
pub fn store_identity<E>(reader: &dyn GlobalReader<E>) -> Result<Option<String>> {
    let first = reader.read_after(0, 1)?;
    Ok(first.first().map(|event| {
        let mut hasher = Sha256::new();
        for part in [
            event.sequence.to_string().as_str(),
            &event.stream_id,
            &event.event_type,
            &event.recorded_at,
        ] {
            hasher.update(part.as_bytes());
            hasher.update([0]);
        }
        hex(&hasher.finalize()[..16])
    }))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_of(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(io("read", path))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buffer).map_err(io("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn io<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        step,
        path: path.to_path_buf(),
        source,
    }
}

fn sqlite(step: String) -> impl FnOnce(projectionist::rusqlite::Error) -> Error {
    move |source| Error::Sqlite { step, source }
}

/// Where snapshots are kept: a directory ([`SnapshotDir`]), or a database
/// (the PostgreSQL crate's `PostgresSnapshots`). Files are streamed in and
/// out, so memory does not grow with a snapshot's size.
pub trait SnapshotLocation: Send + Sync {
    /// Stores the snapshot file `file` described by `manifest` (replacing
    /// one of the same projection and checkpoint), the manifest last, so a
    /// half-stored snapshot is never listed.
    ///
    /// # Errors
    /// Storage errors.
    fn put(&self, manifest: &Manifest, file: &Path) -> Result<()>;

    /// The manifests of projection `name`'s snapshots, newest (highest
    /// checkpoint) first; unreadable ones are left out.
    ///
    /// # Errors
    /// Storage errors.
    fn manifests(&self, name: &str) -> Result<Vec<Manifest>>;

    /// Writes the file of the snapshot `manifest` describes to `to`.
    ///
    /// # Errors
    /// Storage errors; a missing snapshot.
    fn fetch(&self, manifest: &Manifest, to: &Path) -> Result<()>;

    /// Deletes projection `name`'s snapshot at `checkpoint`.
    ///
    /// # Errors
    /// Storage errors.
    fn delete(&self, name: &str, checkpoint: u64) -> Result<()>;
}

/// Snapshots in a directory (local or a shared mount): `{name}.{checkpoint}.db`
/// and its manifest `{name}.{checkpoint}.json`.
#[derive(Clone, Debug)]
pub struct SnapshotDir(pub PathBuf);

impl SnapshotLocation for SnapshotDir {
    fn put(&self, manifest: &Manifest, file: &Path) -> Result<()> {
        let dir = &self.0;
        std::fs::create_dir_all(dir).map_err(io("create the snapshot directory", dir))?;
        let (target, manifest_path) = paths(dir, &manifest.projection, manifest.checkpoint);
        let temp = dir.join(format!(".{}.incoming", manifest.projection));
        let _ = std::fs::remove_file(&temp);
        std::fs::copy(file, &temp).map_err(io("copy the snapshot", &temp))?;
        std::fs::rename(&temp, &target).map_err(io("place the snapshot", &target))?;
        let manifest_temp = dir.join(format!(".{}.manifest-tmp", manifest.projection));
        let text = serde_json::to_string_pretty(manifest).expect("a manifest serializes");
        std::fs::write(&manifest_temp, text).map_err(io("write the manifest", &manifest_temp))?;
        std::fs::rename(&manifest_temp, &manifest_path)
            .map_err(io("place the manifest", &manifest_path))
    }

    fn manifests(&self, name: &str) -> Result<Vec<Manifest>> {
        manifests(&self.0, name)
    }

    fn fetch(&self, manifest: &Manifest, to: &Path) -> Result<()> {
        let (file, _) = paths(&self.0, &manifest.projection, manifest.checkpoint);
        std::fs::copy(&file, to).map_err(io("read the snapshot", &file))?;
        Ok(())
    }

    fn delete(&self, name: &str, checkpoint: u64) -> Result<()> {
        let (file, json) = paths(&self.0, name, checkpoint);
        let _ = std::fs::remove_file(json);
        let _ = std::fs::remove_file(file);
        Ok(())
    }
}

/// Takes a snapshot of projection `name` in directory `projections` into
/// location `to`: SQLite's online backup through a
/// read-only connection, so readers and the projection's writer (a follower
/// in another process) go on; `store` is the log's [`store_identity`]. Keeps
/// the newest `keep` snapshots of the projection there (0: all).
///
/// # Errors
/// [`Error::Io`] / [`Error::Sqlite`] naming the file; [`Error::Version`] for
/// a projection that is not built (checkpoint 0).
pub fn take_snapshot(
    projections: &Path,
    name: &str,
    to: &dyn SnapshotLocation,
    store: &str,
    keep: usize,
) -> Result<Manifest> {
    let name = projectionist::ProjectionName::new(name)?;
    let live = projections.join(format!("{name}.db"));
    if !live.is_file() {
        return Err(Error::NoSuchProjection {
            name: name.to_string(),
            dir: projections.to_path_buf(),
        });
    }
    let source = Connection::open_with_flags(&live, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(sqlite(format!("open {} for a snapshot", live.display())))?;
    source
        .busy_timeout(Duration::from_millis(u64::from(
            projectionist::limits::BUSY_TIMEOUT_MS,
        )))
        .map_err(sqlite("set busy timeout".into()))?;
    // Made beside the projection (the same disk), then stored.
    let temp = projections.join(format!(".{name}.snapshot-tmp"));
    let _ = std::fs::remove_file(&temp);
    {
        let mut target =
            Connection::open(&temp).map_err(sqlite(format!("create {}", temp.display())))?;
        let backup = projectionist::rusqlite::backup::Backup::new(&source, &mut target)
            .map_err(sqlite(format!("snapshot {}", live.display())))?;
        backup
            .run_to_completion(BACKUP_PAGES_PER_STEP, Duration::ZERO, None)
            .map_err(sqlite(format!("snapshot {}", live.display())))?;
        drop(backup);
        // The copy took the live file's WAL mode: back to a rollback
        // journal, so the snapshot is one self-contained file (its opener
        // sets WAL again) and no `-wal`/`-shm` is left beside it.
        target
            .query_row("PRAGMA journal_mode = DELETE", [], |_| Ok(()))
            .map_err(sqlite(format!("finish {}", temp.display())))?;
    }
    // The copy as it is: its checkpoint and definition, from the copy itself
    // (immutable: nothing is created beside it).
    let copy = Connection::open_with_flags(
        projectionist::immutable_uri(&temp),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(sqlite(format!("read {}", temp.display())))?;
    let checkpoint = SqliteCheckpoint::load_in(&copy, name.as_str()).unwrap_or(0);
    let definition = stored_definition(&copy).ok().flatten();
    drop(copy);
    if checkpoint == 0 {
        let _ = std::fs::remove_file(&temp);
        return Err(Error::Version {
            name: name.to_string(),
            reason: "it is not built (checkpoint 0): nothing to snapshot".into(),
        });
    }
    let bytes = std::fs::metadata(&temp)
        .map_err(io("measure", &temp))?
        .len();
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        projection: name.to_string(),
        definition_version: definition.as_ref().map(|d| d.version),
        definition_hash: definition.map(|d| d.hash),
        checkpoint,
        store: store.to_owned(),
        bytes,
        sha256: sha256_of(&temp)?,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        tool_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let stored = to.put(&manifest, &temp);
    let _ = std::fs::remove_file(&temp);
    stored?;
    if keep > 0 {
        for old in to.manifests(name.as_str())?.into_iter().skip(keep) {
            to.delete(name.as_str(), old.checkpoint)?;
        }
    }
    Ok(manifest)
}

fn paths(dir: &Path, name: &str, checkpoint: u64) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.{checkpoint:020}.db")),
        dir.join(format!("{name}.{checkpoint:020}.json")),
    )
}

/// The manifests of projection `name`'s snapshots in `dir`, newest
/// (highest checkpoint) first; unreadable ones are skipped.
///
/// # Errors
/// [`Error::Io`] when the directory cannot be listed.
pub fn manifests(dir: &Path, name: &str) -> Result<Vec<Manifest>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(io("list snapshots", dir)(e)),
    };
    let prefix = format!("{name}.");
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(middle) = file
            .strip_prefix(&prefix)
            .and_then(|f| f.strip_suffix(".json"))
        else {
            continue;
        };
        if middle.len() != 20 || !middle.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let parsed = std::fs::read_to_string(entry.path())
            .ok()
            .and_then(|text| serde_json::from_str::<Manifest>(&text).ok());
        if let Some(manifest) = parsed.filter(|m| m.projection == name) {
            found.push(manifest);
        }
    }
    found.sort_by_key(|m| std::cmp::Reverse(m.checkpoint));
    Ok(found)
}

/// What seeding a projection did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seeded {
    /// The snapshot restored, when one fit.
    pub restored: Option<Manifest>,
    /// Snapshots refused, newest first, each with why.
    pub refused: Vec<(u64, String)>,
}

/// Restores projection `name` into directory `projections` from the newest
/// snapshot at `from` that fits, when its file is missing there: built from
/// `definition_hash` (when given), from the store `store`, at a checkpoint
/// not past `head`, and whose file has the manifest's size and SHA-256 (also
/// checked on the copy). The copy is placed by a rename, so a killed restore
/// leaves no half projection. Refused snapshots are listed with why; with
/// none fitting, nothing is restored (the projection is built from the log).
///
/// # Errors
/// [`Error::Io`] copying or placing the file.
pub fn seed(
    projections: &Path,
    name: &str,
    from: &dyn SnapshotLocation,
    definition_hash: Option<&str>,
    store: &str,
    head: u64,
) -> Result<Seeded> {
    let name = projectionist::ProjectionName::new(name)?;
    let live = projections.join(format!("{name}.db"));
    let mut seeded = Seeded {
        restored: None,
        refused: Vec::new(),
    };
    if live.exists() {
        return Ok(seeded);
    }
    for manifest in from.manifests(name.as_str())? {
        let why = if manifest.format != MANIFEST_FORMAT {
            Some(format!(
                "manifest format {} is not {MANIFEST_FORMAT}",
                manifest.format
            ))
        } else if manifest.store != store {
            Some("taken from another event store".to_owned())
        } else if definition_hash.is_some_and(|h| manifest.definition_hash.as_deref() != Some(h)) {
            Some(format!(
                "built from another definition (version {:?})",
                manifest.definition_version
            ))
        } else if manifest.checkpoint > head {
            Some(format!(
                "its checkpoint {} is past the store's head {head}",
                manifest.checkpoint
            ))
        } else {
            None
        };
        if let Some(why) = why {
            seeded.refused.push((manifest.checkpoint, why));
            continue;
        }
        std::fs::create_dir_all(projections).map_err(io("create", projections))?;
        let temp = projections.join(format!(".{name}.seed-tmp"));
        // Whatever is there (a killed restore's leftover, or a link someone
        // planted) is removed, never written through.
        let _ = std::fs::remove_file(&temp);
        let copied = from
            .fetch(&manifest, &temp)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                std::fs::metadata(&temp)
                    .map(|m| m.len())
                    .map_err(|e| e.to_string())
            });
        let verified = match copied {
            Err(e) => Err(format!("cannot be read: {e}")),
            Ok(bytes) if bytes != manifest.bytes => Err(format!(
                "its file has {bytes} bytes, the manifest says {}",
                manifest.bytes
            )),
            Ok(_) => match sha256_of(&temp) {
                Ok(sum) if sum == manifest.sha256 => Ok(()),
                Ok(_) => Err("its checksum does not match the manifest (damaged)".to_owned()),
                Err(e) => Err(e.to_string()),
            },
        };
        if let Err(why) = verified {
            let _ = std::fs::remove_file(&temp);
            seeded.refused.push((manifest.checkpoint, why));
            continue;
        }
        std::fs::rename(&temp, &live).map_err(io("place the restored projection", &live))?;
        seeded.restored = Some(manifest);
        break;
    }
    Ok(seeded)
}

/// [`seed`] for a process that logs: the store's identity and head read from
/// `reader`, each refused snapshot logged (a warning, with why), a restore
/// logged. `None` for an empty log (nothing could have been snapshotted).
///
/// # Errors
/// Store errors; as [`seed`].
pub fn seed_logged<E>(
    projections: &Path,
    name: &str,
    from: &dyn SnapshotLocation,
    definition_hash: Option<&str>,
    reader: &dyn GlobalReader<E>,
) -> Result<Option<Seeded>> {
    let Some(identity) = store_identity(reader)? else {
        return Ok(None);
    };
    let head = reader.head()?;
    let seeded = seed(projections, name, from, definition_hash, &identity, head)?;
    for (checkpoint, why) in &seeded.refused {
        tracing::warn!(projection = name, checkpoint, reason = %why, "a snapshot is not used");
    }
    if let Some(manifest) = &seeded.restored {
        tracing::info!(
            projection = name,
            checkpoint = manifest.checkpoint,
            "restored from a snapshot"
        );
    }
    Ok(Some(seeded))
}
