//! Everything the CLI shows: progress bars on stderr (only on a terminal), JSON
//! lines on stdout with `--json`, summaries and the status table.

use std::collections::HashMap;
use std::io::Write;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use projectionist::rusqlite::Connection;
use projectionist::{Progress, RebuildResult};

/// `println!` that treats a closed pipe (`status | head -1`) as the reader
/// having what it wanted: the line is dropped instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::ui::out_line(&format!($($arg)*))
    };
}
pub(crate) use out;

/// Writes one JSON line to stdout; a closed pipe is not an error.
pub fn json_line(value: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
}

/// Writes one line of text to stdout; a closed pipe is not an error (the
/// reader has what it wanted, as with `status | head -1`).
pub fn out_line(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
}

/// A failed projection as a JSON `error` event, with the event that failed it
/// (sequence, stream, type) and the last committed sequence when known.
pub fn error_json(error: &projectionist::Error) -> serde_json::Value {
    let event = error.event();
    let projection = match error {
        projectionist::Error::Handler { name, .. }
        | projectionist::Error::Replay { name, .. }
        | projectionist::Error::Fenced { name, .. }
        | projectionist::Error::Setup { name, .. }
        | projectionist::Error::CheckpointBeyondHead { name, .. }
        | projectionist::Error::CaughtUp { name, .. }
        | projectionist::Error::Cancelled { name, .. }
        | projectionist::Error::Version { name, .. }
        | projectionist::Error::Locked { name, .. }
        | projectionist::Error::Closed { name, .. }
        | projectionist::Error::NoSuchProjection { name, .. }
        | projectionist::Error::WaitTimedOut { name, .. } => Some(name.as_str()),
        _ => None,
    };
    serde_json::json!({
        "event": "error", "projection": projection, "committed": error.committed(),
        "sequence": event.map(|e| e.0), "stream": event.map(|e| e.1),
        "event_type": event.map(|e| e.2), "message": error.to_string(),
    })
}

/// The shortest time between two `--json` progress lines of one projection
/// (its last line, `done`, is always printed): a 1M-event rebuild made 2,000
/// lines at one per batch; two a second tell a machine as much.
const JSON_PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// Progress of a run: one bar per projection, or JSON lines, or nothing.
pub struct Display {
    json: bool,
    multi: MultiProgress,
    bars: HashMap<String, ProgressBar>,
    /// When each projection's last `--json` progress line was printed.
    printed: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    /// The run's Ctrl-C token: a projection that ends with it set was
    /// interrupted, not failed.
    cancel: Option<projectionist::CancelToken>,
}

impl Display {
    /// Bars for `names`, each `total` events long. Hidden when stderr is not a
    /// terminal, with `--quiet`, or with `--json`.
    pub fn new<'a>(
        json: bool,
        quiet: bool,
        names: impl Iterator<Item = &'a str>,
        total: u64,
    ) -> Self {
        let target = if json || quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let multi = MultiProgress::with_draw_target(target);
        let style = bar_style("{prefix:>16} [{bar:30}] {pos}/{len} events {rate} eta {eta} {msg}");
        let bars = names
            .map(|name| {
                let bar = multi.add(ProgressBar::new(total));
                bar.set_style(style.clone());
                bar.set_prefix(name.to_owned());
                (name.to_owned(), bar)
            })
            .collect();
        Display {
            json,
            multi,
            bars,
            printed: std::sync::Mutex::new(HashMap::new()),
            cancel: None,
        }
    }

    /// Bars of projections that end after `cancel` was set say `interrupted`.
    #[must_use]
    pub fn interrupted_by(mut self, cancel: &projectionist::CancelToken) -> Self {
        self.cancel = Some(cancel.clone());
        self
    }

    /// One progress report from the engine.
    pub fn progress(&self, p: &Progress) {
        if self.json {
            let now = std::time::Instant::now();
            let mut printed = self
                .printed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = printed
                .get(&p.projection_name)
                .is_none_or(|at| now.duration_since(*at) >= JSON_PROGRESS_INTERVAL);
            if !(due || p.done) {
                return;
            }
            printed.insert(p.projection_name.clone(), now);
            drop(printed);
            json_line(&serde_json::json!({
                "event": "progress", "projection": p.projection_name, "processed": p.processed,
                "checkpoint": p.checkpoint, "started_from": p.started_from, "total": p.total,
                "done": p.done, "err": p.err,
            }));
            return;
        }
        if let Some(bar) = self.bars.get(&p.projection_name) {
            // This run's span only: a resume's rate and ETA must not count the
            // events applied before it.
            bar.set_length(p.total.max(p.checkpoint).saturating_sub(p.started_from));
            bar.set_position(p.checkpoint.saturating_sub(p.started_from));
            if p.done {
                let interrupted = self
                    .cancel
                    .as_ref()
                    .is_some_and(projectionist::CancelToken::is_cancelled);
                bar.finish_with_message(match (&p.err, interrupted) {
                    (None, _) => "done",
                    // Ctrl-C: stopped at a batch boundary, not failed.
                    (Some(_), true) => "interrupted",
                    (Some(_), false) => "failed",
                });
            }
        }
    }

    /// Clears the bars.
    pub fn finish(&self) {
        let _ = self.multi.clear();
    }
}

/// One line per finished projection.
pub fn result_line(json: bool, quiet: bool, r: &RebuildResult) {
    let seconds = r.elapsed.as_secs_f64();
    let rate = r.processed as f64 / seconds.max(1e-9);
    let below_head = r.checkpoint < r.total;
    if json {
        json_line(&serde_json::json!({
            "event": "result", "projection": r.projection_name, "processed": r.processed,
            "checkpoint": r.checkpoint, "head": r.total, "seconds": seconds,
            "below_head": below_head, "dead_letters": r.dead_letters,
            "dead_lettered": r.dead_lettered,
        }));
    } else if !quiet {
        eprintln!(
            "{}: {} events in {seconds:.2}s ({rate:.0} events/s), checkpoint {}{}",
            r.projection_name,
            r.processed,
            r.checkpoint,
            dead_letters_note(r)
        );
    }
    if below_head && !json {
        // A run never ends below the head silently (a PostgreSQL hole whose
        // transaction is still running holds the events after it back).
        eprintln!(
            "warning: {} stopped at {}, below the head {}: the event after it is held by a \
             transaction that is still running; run resume again once it has ended",
            r.projection_name, r.checkpoint, r.total
        );
    }
}

/// `, N events dead-lettered (M in all; see ...)` when the run skipped
/// events or the file holds dead letters; empty otherwise.
fn dead_letters_note(r: &RebuildResult) -> String {
    match (r.dead_lettered, r.dead_letters) {
        (0, 0) => String::new(),
        (0, all) => format!(
            ", {all} dead letters held (projectionist dead-letters {})",
            r.projection_name
        ),
        (new, all) => format!(
            ", {new} events dead-lettered by this run, {all} held (projectionist dead-letters {})",
            r.projection_name
        ),
    }
}

/// The demo's log-generation bar.
pub fn generation_bar(hidden: bool, n_events: u64) -> ProgressBar {
    let target = if hidden {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    };
    let bar = ProgressBar::with_draw_target(Some(n_events), target);
    bar.set_style(bar_style(
        "{prefix:>16} [{bar:30}] {pos}/{len} events {rate} eta {eta}",
    ));
    bar.set_prefix("generating log");
    bar
}

/// A few rows of a demo projection.
pub fn sample_rows(conn: &Connection, name: &str) -> anyhow::Result<()> {
    let sql = match name {
        "order_summary" => {
            "SELECT order_id, customer_id, status, item_count, total_cents FROM orders ORDER BY total_cents DESC, order_id LIMIT 3"
        }
        "customer_stats" => {
            "SELECT customer_id, orders_placed, orders_shipped, orders_cancelled, items, spent_cents FROM customers ORDER BY spent_cents DESC, customer_id LIMIT 3"
        }
        _ => return Ok(()),
    };
    let mut stmt = conn.prepare(sql)?;
    let columns: Vec<String> = stmt
        .column_names()
        .iter()
        .map(|c| (*c).to_owned())
        .collect();
    out!("\n{name} (top 3):\n  {}", columns.join(" | "));
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let values: Vec<String> = (0..columns.len())
            .map(|i| match row.get_ref(i) {
                Ok(v) => match v {
                    projectionist::rusqlite::types::ValueRef::Text(t) => {
                        String::from_utf8_lossy(t).into_owned()
                    }
                    projectionist::rusqlite::types::ValueRef::Integer(n) => n.to_string(),
                    other => format!("{other:?}"),
                },
                Err(e) => e.to_string(),
            })
            .collect();
        out!("  {}", values.join(" | "));
    }
    Ok(())
}

/// One projection in `status`.
pub struct StatusRow {
    pub name: String,
    pub checkpoint: u64,
    pub lag: Option<u64>,
    pub config_version: Option<u32>,
    pub built_version: Option<u32>,
    /// See `status_row` in main.rs for the states and their precedence.
    pub state: &'static str,
    pub size: u64,
    /// Why the projection is failed, corrupt, ahead or not a projection.
    pub error: Option<String>,
    /// The last run recorded in the file.
    pub last_run: Option<projectionist::LastRun>,
    /// The projection's other versions (shadow, previous).
    pub versions: VersionsRow,
    /// Its config's deferred indexes that the file lacks (built when a run
    /// reaches the head).
    pub pending_indexes: Vec<String>,
    /// `waiting`: the missing sequence number (PostgreSQL) its reads wait at.
    pub waiting_at: Option<u64>,
    /// Events it skipped (`on_error = "skip"`), kept in its file.
    pub dead_letters: u64,
}

/// A projection's other versions, in `status`.
#[derive(Default)]
pub struct VersionsRow {
    /// The version kept for `rollback`.
    pub previous: Option<PreviousRow>,
    /// The checkpoint of a shadow rebuild, running or interrupted.
    pub shadow_checkpoint: Option<u64>,
    /// A process is building the shadow now.
    pub shadow_alive: bool,
    /// Why the shadow's rebuild failed, when it did.
    pub shadow_error: Option<String>,
    /// When the live version was restored by `rollback`.
    pub rolled_back_at: Option<String>,
}

/// The kept previous version.
pub struct PreviousRow {
    pub checkpoint: u64,
    pub built_version: Option<u32>,
}

/// Prints the status rows.
pub fn status_table(json: bool, rows: &[StatusRow], head: Option<u64>) {
    if json {
        for r in rows {
            let event = r.last_run.as_ref().and_then(|l| l.event.as_ref());
            json_line(&serde_json::json!({
                "event": "status", "projection": r.name, "checkpoint": r.checkpoint, "head": head,
                "lag": r.lag, "config_version": r.config_version, "built_version": r.built_version,
                "stale": r.state == "stale", "state": r.state, "size_bytes": r.size,
                "error": r.error,
                "error_sequence": event.map(|e| e.0),
                "error_stream": event.map(|e| &e.1),
                "error_event_type": event.map(|e| &e.2),
                "last_run": r.last_run.as_ref().map(|l| &l.state),
                "last_run_at": r.last_run.as_ref().map(|l| &l.updated_at),
                "previous_kept": r.versions.previous.is_some(),
                "previous_version": r.versions.previous.as_ref().and_then(|p| p.built_version),
                "previous_checkpoint": r.versions.previous.as_ref().map(|p| p.checkpoint),
                "rolled_back_at": r.versions.rolled_back_at,
                "shadow_checkpoint": r.versions.shadow_checkpoint,
                "shadow_error": r.versions.shadow_error,
                "pending_indexes": r.pending_indexes,
                "dead_letters": r.dead_letters,
                "waiting": r.waiting_at.map(|sequence| serde_json::json!({
                    "reason": "hole", "sequence": sequence,
                })),
            }));
        }
        return;
    }
    let head_text = head.map_or("no store".to_owned(), |h| h.to_string());
    out_line(&format!(
        "{:<24} {:>12} {:>12} {:>10} {:>8} {:>8} {:<16} {:>12}",
        "projection", "checkpoint", "head", "lag", "config", "built", "state", "bytes"
    ));
    for r in rows {
        let opt = |v: Option<u32>| v.map_or("-".to_owned(), |v| format!("v{v}"));
        out_line(&format!(
            "{:<24} {:>12} {:>12} {:>10} {:>8} {:>8} {:<16} {:>12}",
            r.name,
            r.checkpoint,
            head_text,
            r.lag.map_or("-".to_owned(), |l| l.to_string()),
            opt(r.config_version),
            opt(r.built_version),
            r.state,
            r.size
        ));
        if let Some(error) = &r.error {
            let when = r
                .last_run
                .as_ref()
                .filter(|_| r.state == "failed")
                .map(|l| format!(" (at {})", l.updated_at))
                .unwrap_or_default();
            out_line(&format!("  {}{when}: {}", r.state, escape_controls(error)));
        }
        if r.dead_letters > 0 {
            out_line(&format!(
                "  {} dead letters (events it skipped): projectionist dead-letters {}",
                r.dead_letters, r.name
            ));
        }
        if let Some(hole) = r.waiting_at {
            out_line(&format!(
                "  waiting at hole {hole}: a transaction that may still commit it is running"
            ));
        }
        if !r.pending_indexes.is_empty() {
            out_line(&format!(
                "  deferred indexes not built yet (a run that reaches the head builds them): {}",
                r.pending_indexes.join(", ")
            ));
        }
        let v = &r.versions;
        if let Some(at) = &v.rolled_back_at {
            out_line(&format!("  rolled back at {at}"));
        }
        if let Some(checkpoint) = v.shadow_checkpoint {
            let what = match (&v.shadow_error, v.shadow_alive) {
                (Some(error), _) => format!(
                    "the rebuild failed, the live file is unchanged: {}",
                    escape_controls(error)
                ),
                (None, true) => "being rebuilt beside the live file".to_owned(),
                (None, false) => {
                    "an interrupted rebuild (resume continues it, rebuild starts it over)"
                        .to_owned()
                }
            };
            out_line(&format!("  shadow at checkpoint {checkpoint}: {what}"));
        }
        if let Some(p) = &v.previous {
            out_line(&format!(
                "  previous version kept: {} at checkpoint {} (rollback restores it)",
                opt(p.built_version),
                p.checkpoint
            ));
        }
    }
}

/// Text from data (events, files) with control characters escaped, so it
/// cannot garble the terminal.
pub fn escape_controls(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() && c != '\n' {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// A bar style with a whole-number `{rate}` ("12345 events/s").
fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("valid template")
        .with_key(
            "rate",
            |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0}/s", state.per_sec());
            },
        )
        .progress_chars("=> ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(name: &str, err: Option<&str>) -> Progress {
        let mut progress = Progress::new(name);
        progress.processed = 10;
        progress.total = 20;
        progress.checkpoint = 10;
        progress.done = true;
        progress.err = err.map(str::to_owned);
        progress
    }

    /// Ctrl-C ends every projection with an error at a batch boundary: their
    /// bars say `interrupted`; a projection that failed on its own says
    /// `failed`, one that finished says `done`.
    #[test]
    fn bars_of_an_interrupted_run_say_interrupted_not_failed() {
        let cancel = projectionist::CancelToken::new();
        let display =
            Display::new(false, false, ["a", "b", "c"].into_iter(), 20).interrupted_by(&cancel);
        display.progress(&ended("a", Some("handler failed")));
        display.progress(&ended("b", None));
        cancel.cancel();
        display.progress(&ended("c", Some("cancelled")));
        let message = |name: &str| display.bars[name].message().to_string();
        assert_eq!(message("a"), "failed");
        assert_eq!(message("b"), "done");
        assert_eq!(message("c"), "interrupted");
    }
}
