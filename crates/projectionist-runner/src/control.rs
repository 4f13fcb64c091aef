//! The control plane other processes use, as files in the projection
//! directory (no socket, no server: the directory is what every party
//! already shares, and a file's presence survives any crash for the next
//! holder to see):
//!
//! - `.{name}.follower`: the holder's process id on the first line, its state
//!   of the projection as JSON on the second (`state`, `reason`,
//!   `checkpoint`, `waiting`), replaced whole on every change; written only
//!   by the process that holds the projection's lock, removed by it when it
//!   lets go.
//! - `.{name}.rebuild-request`: asks the holder for a rebuild; removed when
//!   the holder took it.
//! - `.{name}.rollback-request`, holding a request id: asks for a rollback;
//!   removed by the holder once it took it, then answered in
//!   `.{name}.outcome-{id}` (JSON: `ok`, `checkpoint`, `rolled_back_at`,
//!   `follows`, or `error`). An asker creates
//!   a request file only when none is pending, so requests are served one at
//!   a time and each answer is its own.
//! - `.{name}.retry-request`, holding a request id and, on a second line,
//!   `all` or the sequence of one dead letter: asks the holder to apply the
//!   projection's dead letters again; answered in `.{name}.outcome-{id}`
//!   (JSON: `ok`, `applied`, `failed` as `[sequence, error]` pairs, or
//!   `error`), then removed.
//!
//! Askers place a request whole ([`place_request`]), so the holder never
//! takes one before its id is in it; an empty request file (an asker of an
//! earlier version writing it) is left alone for a while ([`read_request`]).

use std::path::{Path, PathBuf};

use projectionist::VersionFiles;
use serde_json::json;

use crate::state::{State, Status, WaitReason};

/// Writes a small file of ours in the projection directory afresh: whatever
/// is at `path` (also a symbolic link someone planted) is removed, not
/// followed, and the file is created exclusively, so nothing outside the
/// directory is ever written through it.
///
/// # Errors
/// I/O errors removing or creating the file.
pub fn write_own_file(path: &Path, contents: &str) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    create_then_write(path, contents)
}

/// Replaces `path` whole with `contents` (written beside it, then renamed):
/// a reader sees the old or the new file, never half of one.
fn replace_own_file(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut temp = path.as_os_str().to_owned();
    temp.push("-new");
    let temp = PathBuf::from(temp);
    let written = write_own_file(&temp, contents).and_then(|()| std::fs::rename(&temp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

/// Places a request file at `path` holding `contents`, only when none is
/// there: the contents are written beside it first and then linked in
/// whole, so the holder never reads a request half written (a file created
/// and then written can be seen empty in between, and an empty request has
/// no id to answer). On a file system without hard links the file is
/// created exclusively and then written, as earlier versions did; a holder
/// leaves it alone while it is empty ([`read_request`]).
///
/// # Errors
/// [`std::io::ErrorKind::AlreadyExists`] when a request is pending at `path`;
/// other I/O errors writing the file.
pub fn place_request(path: &Path, contents: &str) -> std::io::Result<()> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!("-{}-{nanos}.new", std::process::id()));
    let temp = PathBuf::from(temp);
    write_own_file(&temp, contents)?;
    let linked = std::fs::hard_link(&temp, path);
    let _ = std::fs::remove_file(&temp);
    match linked {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            tracing::debug!(error = %e, "no hard link: the request is created, then written");
            create_then_write(path, contents)
        }
        linked => linked,
    }
}

/// Creates `path` exclusively (never through a link planted there), then
/// writes `contents` into it.
fn create_then_write(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(path)?
        .write_all(contents.as_bytes())
}

/// How long the holder leaves an empty request file alone, taking it for
/// one still being written (by an asker of an earlier version, which created
/// the file and then wrote it) before removing it as abandoned.
pub const UNWRITTEN_REQUEST_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The most a request file holds: an id of at most 64 bytes and a line
/// naming `all` or one sequence; anything longer is not a request of ours
/// (and is never read whole into memory).
pub const REQUEST_MAX_BYTES: u64 = 256;

/// What is at the name of one of our small files, read without following a
/// link and at most `max` bytes of it.
enum OwnFile {
    Missing,
    /// A regular file: its first `max` bytes, whether there were more, and
    /// when it was last written.
    Read {
        bytes: Vec<u8>,
        truncated: bool,
        modified: Option<std::time::SystemTime>,
    },
    /// A symbolic link: never ours (we write files, never links).
    Link,
    /// A directory, a pipe, a socket or a device: never opened (a pipe with
    /// no writer would block the open).
    Other,
}

fn read_own(path: &Path, max: u64) -> OwnFile {
    use std::io::Read;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return OwnFile::Missing;
    };
    if meta.file_type().is_symlink() {
        return OwnFile::Link;
    }
    if !meta.is_file() {
        return OwnFile::Other;
    }
    let mut bytes = Vec::new();
    let read =
        std::fs::File::open(path).and_then(|file| file.take(max + 1).read_to_end(&mut bytes));
    if read.is_err() {
        return OwnFile::Missing;
    }
    let truncated = bytes.len() as u64 > max;
    bytes.truncate(usize::try_from(max).unwrap_or(usize::MAX));
    OwnFile::Read {
        bytes,
        truncated,
        modified: meta.modified().ok(),
    }
}

/// The text of the request file at `path`, as the holder takes it: `None`
/// when there is none, or when it is empty and younger than
/// [`UNWRITTEN_REQUEST_GRACE`] (its writer is not done: it is left for the
/// next look). An older empty file is removed, with a warning; so is what is
/// not a request of ours (a symbolic link planted there, whatever it points
/// to; a file over [`REQUEST_MAX_BYTES`] or not UTF-8). Something else in its
/// place (a directory, a pipe) is left alone and never opened.
#[must_use]
pub fn read_request(path: &Path) -> Option<String> {
    let not_ours = |what: &str| {
        tracing::warn!(file = %path.display(), "removed a request file that is {what}");
        let _ = std::fs::remove_file(path);
        None
    };
    let (bytes, modified) = match read_own(path, REQUEST_MAX_BYTES) {
        OwnFile::Missing | OwnFile::Other => return None,
        OwnFile::Link => return not_ours("a symbolic link"),
        OwnFile::Read {
            truncated: true, ..
        } => return not_ours("too long"),
        OwnFile::Read {
            bytes, modified, ..
        } => (bytes, modified),
    };
    let Ok(text) = String::from_utf8(bytes) else {
        return not_ours("not text");
    };
    if !text.trim().is_empty() {
        return Some(text);
    }
    let age = modified.and_then(|m| m.elapsed().ok());
    if age.is_some_and(|age| age > UNWRITTEN_REQUEST_GRACE) {
        return not_ours("empty and abandoned");
    }
    None
}

/// The most of `.{name}.follower` that is read: a process id and a state
/// line, whose `reason` holds an error's text. Past it the process id still
/// counts; the state line does not.
pub const REGISTRATION_MAX_BYTES: u64 = 64 * 1024;

/// What `.{name}.follower` says: the process that holds the projection and
/// takes requests for it, and its state of the projection (the JSON line of
/// [`state_line`], `None` until it said one).
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// The process that holds the projection.
    pub pid: u32,
    /// Its state line (`state`, `reason`, `checkpoint`, `waiting`).
    pub state: Option<serde_json::Value>,
}

/// Reads projection `name`'s registration in `dir`: `None` when there is
/// none, or what is there is not ours (a link, not a regular file, no
/// process id on its first line). Whether that process lives is the
/// caller's question.
#[must_use]
pub fn read_registration(dir: &Path, name: &str) -> Option<Registration> {
    let files = VersionFiles::new(dir, name).ok()?;
    let OwnFile::Read {
        bytes, truncated, ..
    } = read_own(&files.follower, REGISTRATION_MAX_BYTES)
    else {
        return None;
    };
    let text = String::from_utf8_lossy(&bytes);
    let mut lines = text.lines();
    let pid = lines.next()?.trim().parse().ok()?;
    let state = if truncated {
        None
    } else {
        lines
            .next()
            .and_then(|line| serde_json::from_str(line).ok())
    };
    Some(Registration { pid, state })
}

/// Whether projection `name`'s registration names this process.
fn registered_here(dir: &Path, name: &str) -> bool {
    read_registration(dir, name).is_some_and(|r| r.pid == std::process::id())
}

/// Where the holder answers request `id` for projection `name`:
/// `.{name}.outcome-{id}`. `None` for an id that is not one of ours (only
/// digits and `-`, at most 64 bytes).
#[must_use]
pub fn outcome_path(dir: &Path, name: &str, id: &str) -> Option<PathBuf> {
    let valid =
        !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_digit() || b == b'-');
    valid.then(|| dir.join(format!(".{name}.outcome-{id}")))
}

/// Says, in `.{name}.follower`, that this process holds projection `name`
/// and takes requests for it. Call only while holding its lock.
pub fn register(dir: &Path, name: &str) {
    if let Ok(files) = VersionFiles::new(dir, name) {
        // Whole, as every later state line: an asker reading it in between
        // would find no process id and take the projection for unheld.
        let _ = replace_own_file(&files.follower, &std::process::id().to_string());
    }
}

/// Takes back what [`register`] said, only when the file names this process
/// (a process refused a projection another one holds leaves that one's file
/// alone).
pub fn unregister(dir: &Path, name: &str) {
    if let Ok(files) = VersionFiles::new(dir, name)
        && registered_here(dir, name)
    {
        let _ = std::fs::remove_file(&files.follower);
    }
}

/// The state line of `.{name}.follower` for `state` at `checkpoint`.
#[must_use]
pub fn state_line(state: &State, checkpoint: u64) -> serde_json::Value {
    let waiting = match state {
        State::Waiting(WaitReason::Hole { sequence, since }) => json!({
            "reason": "hole", "sequence": sequence, "seconds": since.elapsed().as_secs_f64(),
        }),
        _ => serde_json::Value::Null,
    };
    json!({
        "state": state.name(), "reason": state.reason(), "checkpoint": checkpoint,
        "waiting": waiting,
    })
}

/// Writes `line` as the state of projection `name` in `.{name}.follower`,
/// when this process registered it.
pub fn tell_state(dir: &Path, name: &str, line: &serde_json::Value) {
    let Ok(files) = VersionFiles::new(dir, name) else {
        return;
    };
    if registered_here(dir, name) {
        let own = std::process::id();
        let _ = replace_own_file(&files.follower, &format!("{own}\n{line}\n"));
    }
}

/// [`tell_state`] for a supervisor's status.
pub(crate) fn tell_status(dir: &Path, status: &Status) {
    let checkpoint = status.checkpoint;
    tell_state(dir, &status.name, &state_line(&status.state, checkpoint));
}

/// Answers rollback request `id` for projection `name` with `outcome`, then
/// removes the request: the asker finds its answer when it sees the request
/// taken.
pub fn answer_rollback(dir: &Path, name: &str, id: &str, outcome: &serde_json::Value) {
    answer(dir, name, id, outcome, |files| &files.rollback_request);
}

/// Answers retry request `id` for projection `name` with `outcome`, then
/// removes the request, as [`answer_rollback`] does.
pub fn answer_retry(dir: &Path, name: &str, id: &str, outcome: &serde_json::Value) {
    answer(dir, name, id, outcome, |files| &files.retry_request);
}

/// Writes the answer to request `id` for projection `name` (the request
/// file was removed when the request was taken).
pub fn write_outcome(dir: &Path, name: &str, id: &str, outcome: &serde_json::Value) {
    if let Some(path) = outcome_path(dir, name, id)
        && let Err(e) = replace_own_file(&path, &outcome.to_string())
    {
        tracing::error!(projection = name, error = %e, "cannot answer a request");
    }
}

fn answer(
    dir: &Path,
    name: &str,
    id: &str,
    outcome: &serde_json::Value,
    request: impl Fn(&VersionFiles) -> &PathBuf,
) {
    if let Some(path) = outcome_path(dir, name, id)
        && let Err(e) = replace_own_file(&path, &outcome.to_string())
    {
        tracing::error!(projection = name, error = %e, "cannot answer a request");
    }
    if let Ok(files) = VersionFiles::new(dir, name) {
        let _ = std::fs::remove_file(request(&files));
    }
}

/// A retry request as written in `.{name}.retry-request`: its id, and which
/// dead letters (`None` when the file is not a valid request).
#[must_use]
pub fn parse_retry_request(text: &str) -> Option<(String, projectionist::Retry)> {
    let mut lines = text.lines();
    let id = lines.next()?.trim().to_owned();
    let which = match lines.next().map(str::trim) {
        None | Some("all") => projectionist::Retry::All,
        Some(sequence) => projectionist::Retry::Sequence(sequence.parse().ok()?),
    };
    Some((id, which))
}

/// The outcome file's JSON for a retry.
#[must_use]
pub fn retry_outcome(retried: &Result<projectionist::Retried, String>) -> serde_json::Value {
    match retried {
        Ok(r) => json!({"ok": true, "applied": r.applied, "failed": r.failed}),
        Err(e) => json!({"ok": false, "error": e}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another process reading a request file while it is placed sees no
    /// file or the whole request, never an empty or partial one.
    #[test]
    fn a_placed_request_is_never_seen_half_written() {
        const PLACEMENTS: usize = 2_000;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".p.rollback-request");
        let request = "4242-1234567890123456789\nall\n";
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (path, done) = (path.clone(), std::sync::Arc::clone(&done));
            std::thread::spawn(move || {
                let (mut seen, mut torn) = (0, Vec::new());
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    match std::fs::read_to_string(&path) {
                        Ok(text) if text == request => seen += 1,
                        Ok(text) => torn.push(text),
                        Err(_) => {}
                    }
                }
                (seen, torn)
            })
        };
        for _ in 0..PLACEMENTS {
            place_request(&path, request).unwrap();
            std::fs::remove_file(&path).unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let (seen, torn) = reader.join().unwrap();
        assert!(
            torn.is_empty(),
            "read {} half-written requests, the first {:?}",
            torn.len(),
            torn.first()
        );
        // Nothing but the request is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        eprintln!("the reader saw the whole request {seen} times");
    }

    #[test]
    fn a_request_is_placed_only_when_none_is_pending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".p.retry-request");
        place_request(&path, "1-1\nall\n").unwrap();
        let second = place_request(&path, "2-2\n7\n").unwrap_err();
        assert_eq!(second.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1-1\nall\n");
        // A planted link counts as pending and is not written through.
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "precious").unwrap();
        let link = dir.path().join(".q.rollback-request");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        assert!(place_request(&link, "3-3").is_err());
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "precious");
    }

    /// An empty request file is one its writer has not finished (an asker of
    /// an earlier version creates it, then writes it): the holder leaves it
    /// for a later look, and removes it only once it is old.
    #[test]
    fn an_empty_request_is_left_for_its_writer_and_removed_once_abandoned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".p.rollback-request");
        std::fs::write(&path, "").unwrap();
        assert_eq!(read_request(&path), None);
        assert!(path.exists(), "a request being written was removed");
        std::fs::write(&path, "12-34").unwrap();
        assert_eq!(read_request(&path).as_deref(), Some("12-34"));

        std::fs::write(&path, "").unwrap();
        let long_ago = std::time::SystemTime::now() - UNWRITTEN_REQUEST_GRACE * 2;
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        assert_eq!(read_request(&path), None);
        assert!(!path.exists(), "an abandoned empty request was left");
        assert_eq!(read_request(&path), None);
    }

    /// What is not a request of ours is never taken for one: a link planted
    /// at a request's name (even to a file holding a valid request) is
    /// removed and what it points to left alone; an oversized or binary
    /// file is removed unread; a directory or a pipe there is never opened.
    #[test]
    fn what_is_not_a_request_of_ours_is_never_taken_for_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".p.rollback-request");
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "12-34").unwrap();
        std::os::unix::fs::symlink(&outside, &path).unwrap();
        assert_eq!(read_request(&path), None);
        assert!(std::fs::symlink_metadata(&path).is_err(), "the link stayed");
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "12-34");

        let limit = usize::try_from(REQUEST_MAX_BYTES).unwrap();
        std::fs::write(&path, "1".repeat(limit)).unwrap();
        assert!(read_request(&path).is_some(), "a request at the limit");
        std::fs::write(&path, "1".repeat(limit + 1)).unwrap();
        assert_eq!(read_request(&path), None);
        assert!(!path.exists(), "an oversized request stayed");
        std::fs::write(&path, [0xff, 0xfe, b'1']).unwrap();
        assert_eq!(read_request(&path), None);
        assert!(!path.exists(), "a binary request stayed");

        std::fs::create_dir(&path).unwrap();
        assert_eq!(read_request(&path), None);
        assert!(path.is_dir());
        std::fs::remove_dir(&path).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        // Opening a pipe with no writer would block: returning at all is the check.
        assert_eq!(read_request(&path), None);
    }

    #[test]
    fn a_registration_is_read_bounded_and_never_through_a_link_or_a_pipe() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".p.follower");
        assert_eq!(read_registration(dir.path(), "p"), None);
        std::fs::write(&path, "4242").unwrap();
        let only_pid = read_registration(dir.path(), "p").unwrap();
        assert_eq!((only_pid.pid, only_pid.state), (4242, None));
        std::fs::write(&path, "4242\n{\"state\":\"stalled\",\"reason\":\"x\"}\n").unwrap();
        let said = read_registration(dir.path(), "p").unwrap();
        assert_eq!(said.state.unwrap()["state"], "stalled");
        std::fs::write(&path, "not a pid\n{}\n").unwrap();
        assert_eq!(read_registration(dir.path(), "p"), None);

        // Past the bound the process id still counts, the state line not.
        let limit = usize::try_from(REGISTRATION_MAX_BYTES).unwrap();
        let reason = "r".repeat(limit);
        std::fs::write(
            &path,
            format!("4242\n{{\"state\":\"failed\",\"reason\":\"{reason}\"}}\n"),
        )
        .unwrap();
        let long = read_registration(dir.path(), "p").unwrap();
        assert_eq!((long.pid, long.state), (4242, None));

        std::fs::remove_file(&path).unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "4242\n").unwrap();
        std::os::unix::fs::symlink(&outside, &path).unwrap();
        assert_eq!(read_registration(dir.path(), "p"), None);
        std::fs::remove_file(&path).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        assert_eq!(read_registration(dir.path(), "p"), None);
        // A registration is replaced whole over whatever is there.
        register(dir.path(), "p");
        assert_eq!(
            read_registration(dir.path(), "p").map(|r| r.pid),
            Some(std::process::id())
        );
    }
}
