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
    use std::io::Write;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(path)?
        .write_all(contents.as_bytes())
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

/// Where the holder answers request `id` for projection `name`:
/// `.{name}.outcome-{id}`. `None` for an id that is not one of ours (only
/// digits and `-`, at most 64 bytes).
#[must_use]
pub fn outcome_path(dir: &Path, name: &str, id: &str) -> Option<PathBuf> {
    let valid =
        !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_digit() || b == b'-');
    valid.then(|| dir.join(format!(".{name}.outcome-{id}")))
}

/// Whether the first line of `text` names this process.
fn names_this_process(text: &str) -> bool {
    let own = std::process::id().to_string();
    text.lines().next().is_some_and(|pid| pid.trim() == own)
}

/// Says, in `.{name}.follower`, that this process holds projection `name`
/// and takes requests for it. Call only while holding its lock.
pub fn register(dir: &Path, name: &str) {
    if let Ok(files) = VersionFiles::new(dir, name) {
        let _ = write_own_file(&files.follower, &std::process::id().to_string());
    }
}

/// Takes back what [`register`] said, only when the file names this process
/// (a process refused a projection another one holds leaves that one's file
/// alone).
pub fn unregister(dir: &Path, name: &str) {
    if let Ok(files) = VersionFiles::new(dir, name)
        && std::fs::read_to_string(&files.follower).is_ok_and(|text| names_this_process(&text))
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
    let registered =
        std::fs::read_to_string(&files.follower).is_ok_and(|text| names_this_process(&text));
    if registered {
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
