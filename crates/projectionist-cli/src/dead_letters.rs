//! `dead-letters` (list the events a projection with `on_error = "skip"`
//! could not apply) and `retry` (apply them again after a fix, directly or
//! through the follower that holds the projection: its supervisor serves
//! the request).

use anyhow::anyhow;
use projectionist::rusqlite::{Connection, OpenFlags};
use projectionist::{DeadLetter, ProjectionDir, Retried, Retry, VersionFiles};
use projectionist_sqlview::SqlHandler;

use crate::app::{
    EXIT_CONFIG, EXIT_PROJECTION, EXIT_STORE, Failure, fail, load_config, open_existing_dir,
    open_store,
};
use crate::args::Cli;
use crate::ui;

/// `projectionist dead-letters [NAME]`: one line per dead letter (sequence,
/// type, stream, attempts, when, error), of one projection or of every one
/// in the directory; `--json`, one `dead_letter` line each. Read-only (a
/// follower may hold the files).
pub(crate) fn run_dead_letters(cli: &Cli, name: Option<&str>) -> Result<(), Failure> {
    let dir = open_existing_dir(cli)?;
    let names: Vec<String> = match name {
        Some(name) => {
            existing(&dir, name)?;
            vec![name.to_owned()]
        }
        None => dir
            .list()
            .map_err(|e| fail(EXIT_PROJECTION)(e.into()))?
            .iter()
            .map(ToString::to_string)
            .collect(),
    };
    let mut total = 0;
    for name in &names {
        let path = dir
            .file_path(name)
            .map_err(|e| fail(EXIT_CONFIG)(e.into()))?;
        let letters = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(anyhow::Error::from)
            .and_then(|conn| {
                conn.busy_timeout(std::time::Duration::from_secs(5))?;
                Ok(projectionist::dead_letters(&conn)?)
            })
            .map_err(|e| fail(EXIT_PROJECTION)(e.context(format!("read {}", path.display()))))?;
        total += letters.len();
        for letter in &letters {
            print_letter(cli, name, letter);
        }
    }
    if !cli.json && !cli.quiet {
        let whose = name.map_or_else(
            || "the projections".to_owned(),
            |n| format!("projection {n}"),
        );
        eprintln!(
            "{total} dead letters in {whose}{}",
            if total > 0 {
                "; after fixing the definition, `projectionist retry NAME --all` applies them again"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// Projection `name`'s file in `dir`, which must exist (a usage error
/// otherwise, as for `remove`).
fn existing(dir: &ProjectionDir, name: &str) -> Result<std::path::PathBuf, Failure> {
    let path = dir
        .file_path(name)
        .map_err(|e| fail(EXIT_CONFIG)(e.into()))?;
    if !path.exists() {
        return Err(fail(EXIT_CONFIG)(anyhow!(
            "no projection {name} in {}",
            dir.path().display()
        )));
    }
    Ok(path)
}

fn print_letter(cli: &Cli, name: &str, letter: &DeadLetter) {
    if cli.json {
        let mut line = serde_json::to_value(letter).unwrap_or_default();
        line["event"] = "dead_letter".into();
        line["projection"] = name.into();
        ui::json_line(&line);
    } else {
        println!(
            "{name}\t{}\t{}\t{}\tattempts {}\t{}\t{}",
            letter.sequence,
            ui::escape_controls(&letter.event_type),
            ui::escape_controls(&letter.stream_id),
            letter.attempts,
            letter.failed_at,
            ui::escape_controls(&letter.error)
        );
    }
}

/// `projectionist retry NAME (--seq N | --all)`: applies the dead letters
/// again under the config's definition, in sequence order, removing those
/// that apply now. A follower holding the projection does it on request.
/// Exits 0 when every one tried applied, 4 when some failed again (they
/// stay, with one more attempt counted).
pub(crate) fn run_retry(
    cli: &Cli,
    name: &str,
    sequence: Option<u64>,
    all: bool,
) -> Result<(), Failure> {
    let which = match (sequence, all) {
        (Some(sequence), false) => Retry::Sequence(sequence),
        (None, true) => Retry::All,
        _ => {
            return Err(fail(EXIT_CONFIG)(anyhow!(
                "say which dead letters to retry: --seq N for one, or --all"
            )));
        }
    };
    let config = load_config(cli, false)?;
    let projection = config.get(name).ok_or_else(|| {
        fail(EXIT_CONFIG)(anyhow!(
            "projection {name} is not in the config: retry applies dead letters with the \
             config's definition"
        ))
    })?;
    let dir = open_existing_dir(cli)?;
    existing(&dir, name)?;
    let retried = match dir.db(name) {
        Ok(db) => {
            let store = open_store(cli, false, &config)?;
            let mut handler = SqlHandler::new(projection);
            projectionist::retry_dead_letters(store.reader(), &db, &mut handler, which)
                .map_err(|e| fail(retry_exit_code(&e))(e.into()))?
        }
        // A follower holding it retries them itself, on request.
        Err(projectionist::Error::Locked { holder, .. }) => {
            retried_by_follower(&dir, name, which, holder)?
        }
        Err(e) => return Err(fail(EXIT_PROJECTION)(e.into())),
    };
    report(cli, name, &retried)
}

fn retry_exit_code(error: &projectionist::Error) -> u8 {
    match error {
        projectionist::Error::InvalidOptions(_) => EXIT_CONFIG,
        projectionist::Error::Replay { .. } | projectionist::Error::External { .. } => EXIT_STORE,
        _ => EXIT_PROJECTION,
    }
}

/// Hands the retry to the follower holding `name` and waits for its answer.
fn retried_by_follower(
    dir: &ProjectionDir,
    name: &str,
    which: Retry,
    holder: Option<u32>,
) -> Result<Retried, Failure> {
    let request = VersionFiles::new(dir.path(), name)
        .map_err(|e| fail(EXIT_CONFIG)(e.into()))?
        .retry_request;
    let body = match which {
        Retry::All => "all".to_owned(),
        Retry::Sequence(sequence) => sequence.to_string(),
    };
    let Some(asked) = crate::replay::ask_follower(dir.path(), name, &request, Some(&body)) else {
        let holder = holder.map_or_else(String::new, |pid| format!(" by process {pid}"));
        return Err(fail(EXIT_PROJECTION)(anyhow!(
            "projection {name} is held{holder}, which takes no requests; stop it, then retry"
        )));
    };
    let (pid, id) = asked.map_err(fail(EXIT_PROJECTION))?;
    let answer = crate::replay::await_answer(dir.path(), name, pid, &id, "retry")?;
    if answer["ok"] != true {
        return Err(fail(EXIT_PROJECTION)(anyhow!(
            "the follower (process {pid}) could not retry the dead letters of {name}: {}",
            answer["error"].as_str().unwrap_or("no reason given")
        )));
    }
    let applied = answer["applied"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
        .unwrap_or_default();
    let failed = answer["failed"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|pair| Some((pair[0].as_u64()?, pair[1].as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    Ok(Retried { applied, failed })
}

fn report(cli: &Cli, name: &str, retried: &Retried) -> Result<(), Failure> {
    if cli.json {
        ui::json_line(&serde_json::json!({
            "event": "retried", "projection": name, "applied": retried.applied,
            "failed": retried.failed,
        }));
    } else if !cli.quiet {
        eprintln!(
            "{name}: {} dead letters applied and removed, {} failed again",
            retried.applied.len(),
            retried.failed.len()
        );
    }
    if retried.failed.is_empty() {
        return Ok(());
    }
    let failures: Vec<String> = retried
        .failed
        .iter()
        .map(|(sequence, error)| format!("event {sequence}: {}", ui::escape_controls(error)))
        .collect();
    Err(fail(EXIT_PROJECTION)(anyhow!(
        "{} dead letters of {name} failed again (kept, one more attempt counted):\n{}",
        retried.failed.len(),
        failures.join("\n")
    )))
}
