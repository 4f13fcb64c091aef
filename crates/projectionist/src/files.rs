//! Where a projection's files are: the live database with its SQLite sidecars
//! and lock file ([`ProjectionFiles`]), its other versions and the files other
//! processes use to reach its holder ([`VersionFiles`]), and the filesystem
//! helpers every module that touches them shares. Paths only: nothing here
//! opens a database.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::name::ProjectionName;

/// File-name suffix of a projection database.
pub(crate) const DB_SUFFIX: &str = ".db";
/// Sidecar files SQLite keeps beside a database (`-journal` only outside WAL mode).
pub(crate) const SIDECARS: [&str; 3] = ["-wal", "-shm", "-journal"];

/// The files of one projection in a directory: the database, its SQLite
/// sidecars and its lock file (whether or not they exist).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectionFiles {
    /// `{name}.db`.
    pub db: PathBuf,
    /// `{name}.db-wal`.
    pub wal: PathBuf,
    /// `{name}.db-shm`.
    pub shm: PathBuf,
    /// `.{name}.lock`.
    pub lock: PathBuf,
}

impl ProjectionFiles {
    /// The files of projection `name` in `dir`.
    ///
    /// # Errors
    /// [`Error::InvalidName`] for a name that is not a safe file name.
    pub fn new(dir: &Path, name: &str) -> Result<Self> {
        let name = ProjectionName::new(name)?;
        let db = dir.join(format!("{name}{DB_SUFFIX}"));
        Ok(ProjectionFiles {
            wal: sidecar(&db, "-wal"),
            shm: sidecar(&db, "-shm"),
            lock: dir.join(format!(".{name}.lock")),
            db,
        })
    }

    /// Bytes on disk of the database and its `-wal` (what the projection holds;
    /// the `-shm` is an index rebuilt on open).
    #[must_use]
    pub fn size_bytes(&self) -> u64 {
        [&self.db, &self.wal]
            .iter()
            .filter_map(|path| fs::metadata(path).ok())
            .map(|m| m.len())
            .sum()
    }
}

/// The files that hold a projection's other versions (whether or not they exist).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VersionFiles {
    /// `.{name}.shadow.db`: a rebuild beside the live file.
    pub shadow: PathBuf,
    /// `.{name}.previous.db`: the version before the last publish or rollback.
    pub previous: PathBuf,
    /// `.{name}.previous-new.db`: a publish's copy of the live file, in flight.
    pub previous_new: PathBuf,
    /// `.{name}.rebuild-request`: another process asks the one holding the
    /// projection (a follower) to rebuild it in its shadow and publish it.
    pub rebuild_request: PathBuf,
    /// `.{name}.rollback-request`: another process asks the one holding the
    /// projection to roll it back.
    pub rollback_request: PathBuf,
    /// `.{name}.retry-request`: another process asks the one holding the
    /// projection to apply its dead letters again.
    pub retry_request: PathBuf,
    /// `.{name}.follower`: the process id of the follower that holds the
    /// projection and takes requests (written by the follower).
    pub follower: PathBuf,
}

impl VersionFiles {
    /// The version files of projection `name` in `dir`.
    ///
    /// # Errors
    /// [`Error::InvalidName`] for a name that is not a safe file name.
    pub fn new(dir: &Path, name: &str) -> Result<Self> {
        let name = ProjectionName::new(name)?;
        Ok(Self::of(dir, &name))
    }

    pub(crate) fn of(dir: &Path, name: &ProjectionName) -> Self {
        VersionFiles {
            shadow: dir.join(format!(".{name}.shadow.db")),
            previous: dir.join(format!(".{name}.previous.db")),
            previous_new: dir.join(format!(".{name}.previous-new.db")),
            rebuild_request: dir.join(format!(".{name}.rebuild-request")),
            rollback_request: dir.join(format!(".{name}.rollback-request")),
            retry_request: dir.join(format!(".{name}.retry-request")),
            follower: dir.join(format!(".{name}.follower")),
        }
    }

    /// Bytes on disk of a version file and its `-wal` (0 when missing).
    #[must_use]
    pub fn size_bytes(path: &Path) -> u64 {
        let wal = sidecar(path, "-wal");
        [path, wal.as_path()]
            .iter()
            .filter_map(|p| fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }
}

/// An SQLite URI that opens `path` as `immutable` (open it with
/// `SQLITE_OPEN_URI`): read-only, without locks, creating no `-wal` or `-shm`
/// beside it. Only for files that nobody writes while they are read, such as a
/// kept previous version or someone else's database being inspected.
#[must_use]
pub fn immutable_uri(path: &Path) -> String {
    format!("file:{}?immutable=1", uri_path(path))
}

/// A path for an SQLite `file:` URI: every byte but unreserved ones escaped.
pub(crate) fn uri_path(path: &Path) -> String {
    let mut out = String::new();
    for byte in path.as_os_str().as_encoded_bytes() {
        if byte.is_ascii_alphanumeric() || b"/._-~".contains(byte) {
            out.push(char::from(*byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

pub(crate) fn read_prefix(path: &Path, buf: &mut [u8]) -> Result<usize> {
    use std::io::Read;
    let mut file = File::open(path).map_err(Error::io("read", path))?;
    let mut n_read = 0;
    while n_read < buf.len() {
        match file.read(&mut buf[n_read..]) {
            Ok(0) => break,
            Ok(n) => n_read += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read", path)(e)),
        }
    }
    Ok(n_read)
}

pub(crate) fn refuse_symlink(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(Error::NotAProjection {
            path: path.to_path_buf(),
            reason: "a symbolic link; projectionist does not follow links in its directory".into(),
        }),
        _ => Ok(()),
    }
}

pub(crate) fn refuse_symlinked_sidecars(db_path: &Path) -> Result<()> {
    refuse_symlink(db_path)?;
    for suffix in SIDECARS {
        refuse_symlink(&sidecar(db_path, suffix))?;
    }
    Ok(())
}

pub(crate) fn sidecar(db_path: &Path, suffix: &str) -> PathBuf {
    let mut name = db_path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

pub(crate) fn remove_sidecars(db_path: &Path) -> Result<()> {
    for suffix in SIDECARS {
        remove_file_if_exists(&sidecar(db_path, suffix))?;
    }
    Ok(())
}

pub(crate) fn remove_file_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path)(e)),
    }
}
