//! Crash and process tests: the test binary re-runs itself as a child process
//! (role chosen by `PROJECTIONIST_CHILD`) and the parent aborts or SIGKILLs it.
//!
//! What they prove:
//! - named crash points: the child aborts (no unwinding, so nothing rolls back
//!   politely) at every step of the first, a middle and the last batch; after each
//!   crash the checkpoint matches the rows, and a resume ends with exactly the
//!   tables and checkpoint of an uninterrupted rebuild;
//! - the same named crash points for a projection parked behind
//!   `OPEN_PROJECTIONS_MAX` others, whose batches are applied in visits of up
//!   to 16: a crash loses the visit, never part of it;
//! - the negative control: the same test on a deliberately broken variant (the
//!   checkpoint committed in a separate transaction) must find a mismatch;
//! - the same named crash points over a log with poison events that the
//!   projection dead-letters (`Skipping`): the resume leaves the same rows and
//!   the same dead letters as an uninterrupted run;
//! - random SIGKILLs (seeded; `PROJECTIONIST_SEED` replays, and
//!   `PROJECTIONIST_KILL_ITERATIONS` scales the soak, default 50), every other
//!   one in a run that dead-letters poison events; each kill point is drawn
//!   from the seed as (batch, step): the child says when it gets there and is
//!   SIGKILLed at once, wherever its work then is;
//! - a second process cannot open a projection for writing while one holds it;
//! - a projection left with a hot `-wal` by a crashed writer is removed cleanly;
//! - a publish (and a rollback) aborted after each of its steps, and SIGKILLed
//!   at points of back-to-back rollbacks drawn from the seed as (swap, step):
//!   the next open leaves the live file exactly the old or the new version
//!   (digests), the kept previous version the other one, and no half-made
//!   copy behind.
//!
//! `harness = false`: this file has its own `main`, and prints the runner's
//! closing line itself.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{BankHandler, bank_store, config};
use projectionist::{
    BatchStep, CheckpointLocation, DigestScope, Error, ProjectionDir, ProjectionTarget,
    PublishOptions, PublishStep, RebuildConfig, RebuildOptions, SqliteCheckpoint, SqliteEventStore,
    VersionFiles, projection_digest, rebuild, resume,
};

const CHILD_ENV: &str = "PROJECTIONIST_CHILD";
/// Commit interval of the random-kill children: commit groups of a few batches,
/// so kills land both inside groups and between them.
const KILL_INTERVAL_MS: &str = "20";
/// The signal `std::process::abort` raises.
const SIGABRT: i32 = 6;
/// Exit code of a child that found the projection locked.
const EXIT_LOCKED: i32 = 3;

type TestFn = fn() -> Result<(), String>;

fn main() {
    if let Ok(role) = std::env::var(CHILD_ENV) {
        child(&role);
        return;
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let tests: [(&str, TestFn); 10] = [
        (
            "crash_points_over_dead_letters_resume_to_the_same_digest_and_letters",
            crash_points_over_dead_letters_resume_to_the_same_digest_and_letters,
        ),
        (
            "second_process_gets_the_lock_error",
            second_process_gets_the_lock_error,
        ),
        (
            "hot_wal_of_a_crashed_writer_is_removed",
            hot_wal_of_a_crashed_writer_is_removed,
        ),
        (
            "crash_points_resume_to_the_same_digest",
            crash_points_resume_to_the_same_digest,
        ),
        (
            "crash_points_in_commit_groups_resume_to_the_same_digest",
            crash_points_in_commit_groups_resume_to_the_same_digest,
        ),
        (
            "crash_points_catch_a_torn_batch",
            crash_points_catch_a_torn_batch,
        ),
        (
            "crash_points_of_a_parked_projection_resume_to_the_same_digest",
            crash_points_of_a_parked_projection_resume_to_the_same_digest,
        ),
        (
            "random_sigkills_resume_to_the_same_digest",
            random_sigkills_resume_to_the_same_digest,
        ),
        (
            "publish_and_rollback_crash_points_leave_one_whole_version",
            publish_and_rollback_crash_points_leave_one_whole_version,
        ),
        (
            "random_sigkills_of_swaps_leave_one_whole_version",
            random_sigkills_of_swaps_leave_one_whole_version,
        ),
    ];
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in tests {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let started = Instant::now();
        match test() {
            Ok(()) => {
                passed += 1;
                println!(
                    "test {name} ... ok ({:.1}s)",
                    started.elapsed().as_secs_f64()
                );
            }
            Err(why) => {
                failed += 1;
                println!("test {name} ... FAILED\n    {why}");
            }
        }
    }
    println!("\n{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------- the child

/// Child roles:
/// - `hold-lock DIR NAME`: opens the projection, prints `locked`, waits for stdin EOF;
/// - `write-abort DIR NAME`: commits rows into the projection, then aborts;
/// - `rebuild|resume STORE DIR BATCH CHECKPOINT [STEP BATCH_NO]`: runs the bank
///   projection (CHECKPOINT `in-file` or `separate`, the broken variant), aborting
///   at the named step of the numbered batch when given.
fn child(role: &str) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match role {
        "hold-lock" => {
            let dir = ProjectionDir::open(&args[0]).unwrap();
            match dir.db(&args[1]) {
                Ok(_db) => {
                    println!("locked");
                    std::io::stdout().flush().unwrap();
                    let mut sink = String::new();
                    while std::io::stdin().read_line(&mut sink).unwrap_or(0) > 0 {}
                }
                Err(Error::Locked { .. }) => std::process::exit(EXIT_LOCKED),
                Err(e) => panic!("{e}"),
            }
        }
        "write-abort" => {
            let dir = ProjectionDir::open(&args[0]).unwrap();
            let db = dir.db(&args[1]).unwrap();
            db.write(|tx| {
                tx.execute_batch("CREATE TABLE old (x); INSERT INTO old VALUES ('old row');")?;
                projectionist::SqliteCheckpoint::save_in(tx, "c", 42)?;
                Ok(())
            })
            .unwrap();
            std::process::abort();
        }
        "rebuild" | "resume" | "rebuild-skipping" | "resume-skipping" => {
            run_bank_child(role, &args);
        }
        "rebuild-parked" => run_parked_bank_child(&args),
        "publish" | "rollback" => {
            let dir = ProjectionDir::open(&args[0]).unwrap();
            let crash_at = args[1].clone();
            let hook = move |_: &str, step: PublishStep| {
                if step.as_str() == crash_at {
                    std::process::abort();
                }
            };
            let options = PublishOptions::new().step_hook(&hook);
            if role == "publish" {
                dir.shadow("bank").unwrap();
                dir.publish("bank", "bank", &options).unwrap();
            } else {
                dir.rollback("bank", "bank", &options).unwrap();
            }
        }
        "swap-forever" => {
            // `swap-forever DIR STEP SWAP_NO`: rollbacks back to back; at the
            // named step of the numbered one, says so on stdout and goes on.
            let dir = ProjectionDir::open(&args[0]).unwrap();
            let (signal_step, signal_swap): (String, u64) =
                (args[1].clone(), args[2].parse().unwrap());
            let swap = std::sync::atomic::AtomicU64::new(0);
            let hook = |_: &str, step: PublishStep| {
                if step.as_str() == signal_step
                    && swap.load(std::sync::atomic::Ordering::SeqCst) == signal_swap
                {
                    println!("{REACHED}");
                    std::io::stdout().flush().unwrap();
                }
            };
            let options = PublishOptions::new().step_hook(&hook);
            loop {
                dir.rollback("bank", "bank", &options).unwrap();
                swap.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        other => panic!("unknown child role {other}"),
    }
}

fn run_bank_child(role: &str, args: &[String]) {
    let store = SqliteEventStore::create(&args[0]).unwrap();
    let dir = ProjectionDir::open(&args[1]).unwrap();
    let batch_size: u32 = args[2].parse().unwrap();
    let separate = args[3] == "separate";
    let commit_interval = Duration::from_millis(args[4].parse().unwrap());
    let crash_at: Option<(String, u64)> = args
        .get(5)
        .map(|step| (step.clone(), args[6].parse().unwrap()));
    // `signal`: at that point, say so on stdout (the parent SIGKILLs the
    // child then) and go on; otherwise abort there.
    let signal = args.get(7).is_some_and(|a| a == "signal");
    let hook = move |_: &str, step: BatchStep, batch: u64| {
        if let Some((name, at)) = &crash_at
            && step.as_str() == name
            && batch == *at
        {
            if signal {
                println!("{REACHED}");
                std::io::stdout().flush().unwrap();
                return;
            }
            // abort, not panic: a crash runs no destructors and no rollback.
            std::process::abort();
        }
    };
    let db = dir.db("bank").unwrap();
    // The broken variant: the checkpoint lives in another file, committed after
    // the batch, in a separate transaction.
    let external = SqliteCheckpoint::new(dir.db("checkpoints").unwrap());
    let checkpoint = if separate {
        CheckpointLocation::External(&external)
    } else {
        CheckpointLocation::InFile
    };
    // `-skipping`: the log holds poison events, which it dead-letters.
    let mut bank = BankHandler::default();
    let mut skipping = projectionist::Skipping::new(BankHandler::default()).max_dead_letters(1_000);
    let handler: &mut dyn projectionist::Handler<common::BankEvent> = if role.ends_with("-skipping")
    {
        &mut skipping
    } else {
        &mut bank
    };
    let config = RebuildConfig {
        reader: &store,
        projection: ProjectionTarget::new(&db, handler)
            .checkpoint(checkpoint)
            .consumer_id("bank"),
        options: RebuildOptions::new()
            .batch_size(batch_size)
            .commit_interval(commit_interval)
            .step_hook(&hook),
    };
    let result = if role.starts_with("rebuild") {
        rebuild(config)
    } else {
        resume(config)
    };
    result.unwrap();
}

/// `rebuild-parked STORE DIR BATCH INTERVAL_MS STEP BATCH_NO`: one shared
/// rebuild of `OPEN_PROJECTIONS_MAX` fillers and then the bank projection
/// (so parked), aborting at the named step of the bank's numbered batch.
fn run_parked_bank_child(args: &[String]) {
    let store = SqliteEventStore::create(&args[0]).unwrap();
    let dir = ProjectionDir::open(&args[1]).unwrap();
    let batch_size: u32 = args[2].parse().unwrap();
    let commit_interval = Duration::from_millis(args[3].parse().unwrap());
    let (crash_step, crash_batch): (String, u64) = (args[4].clone(), args[5].parse().unwrap());
    let hook = move |name: &str, step: BatchStep, batch: u64| {
        if name == "bank" && step.as_str() == crash_step && batch == crash_batch {
            std::process::abort();
        }
    };
    let options = RebuildOptions::new()
        .batch_size(batch_size)
        .commit_interval(commit_interval)
        .step_hook(&hook);
    common::rebuild_parked(&store, &dir, &mut BankHandler::default(), &options).unwrap();
}

// ---------------------------------------------------------------- helpers

/// The seed (`PROJECTIONIST_SEED` replays one; else from the clock) and the
/// number of kills (`PROJECTIONIST_KILL_ITERATIONS` scales a soak; else `default`).
fn seed_and_iterations(default: u32) -> (u64, u32) {
    let seed = std::env::var("PROJECTIONIST_SEED")
        .ok()
        .map(|s| s.parse().expect("PROJECTIONIST_SEED is a number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let iterations = std::env::var("PROJECTIONIST_KILL_ITERATIONS")
        .ok()
        .map(|s| {
            s.parse()
                .expect("PROJECTIONIST_KILL_ITERATIONS is a number")
        })
        .unwrap_or(default);
    (seed, iterations)
}

fn spawn_child(role: &str, args: &[&str]) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .env(CHILD_ENV, role)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// What a child prints when it reaches the point drawn for its kill.
const REACHED: &str = "reached";

/// Waits until `child` says it reached its kill point (or ends without), then
/// SIGKILLs it. Returns whether it was still running when killed.
fn kill_when_reached(mut child: Child) -> bool {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let reached = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line == REACHED);
        let _ = tx.send(reached);
    });
    // A deadline, not a guess: a child that neither reaches its point nor
    // ends in this long is hung.
    let reached = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the child reached its kill point or ended");
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill(); // SIGKILL
    child.wait().unwrap();
    reached && running
}

fn run_child(role: &str, args: &[&str]) -> ExitStatus {
    let mut child = spawn_child(role, args);
    drop(child.stdin.take());
    child.wait().unwrap()
}

struct Bank {
    _tmp: tempfile::TempDir,
    store: PathBuf,
    /// Digest of the tables of an uninterrupted rebuild (whose checkpoint is `n_events`).
    reference: String,
    /// The events in the log (and so the checkpoint at its end).
    n_events: u64,
    /// The log holds poison events, dead-lettered by the `-skipping` roles;
    /// the dead letters of an uninterrupted run.
    skipping: Option<String>,
    /// Batches an uninterrupted run applies.
    batches: u64,
}

/// In a list of crash points: the last batch of the run.
const LAST_BATCH: u64 = u64::MAX;

fn bank(n_events: u64, batch_size: u32) -> Bank {
    bank_of(n_events, batch_size, false)
}

/// A bank log, with poison events when `skipping` (every 170 events: about
/// one in every other batch of 100), and an uninterrupted run's result.
fn bank_of(n_events: u64, batch_size: u32, skipping: bool) -> Bank {
    let tmp = tempfile::tempdir().unwrap();
    let store_path = tmp.path().join("events.db");
    let store = SqliteEventStore::create(&store_path).unwrap();
    let poison = skipping.then_some(common::Poison::Every(170));
    let poisoned = common::write_bank_log_poisoned(&store, n_events, 200, 11, poison);
    let dir = ProjectionDir::open(tmp.path().join("reference")).unwrap();
    let db = dir.db("bank").unwrap();
    let batches = std::sync::atomic::AtomicU64::new(0);
    let count = |_: &str, _: BatchStep, batch: u64| {
        batches.fetch_max(batch, std::sync::atomic::Ordering::SeqCst);
    };
    let options = RebuildOptions::new()
        .batch_size(batch_size)
        .step_hook(&count);
    if skipping {
        let mut handler =
            projectionist::Skipping::new(BankHandler::default()).max_dead_letters(1_000);
        rebuild(RebuildConfig {
            reader: &store,
            projection: ProjectionTarget::new(&db, &mut handler).consumer_id("bank"),
            options,
        })
        .unwrap();
    } else {
        rebuild(config(&store, &db, &mut BankHandler::default(), options)).unwrap();
    }
    let reference = tables_digest(&tmp.path().join("reference")).unwrap();
    let letters = dead_letters_of(&tmp.path().join("reference")).unwrap();
    assert_eq!(letters.lines().count(), poisoned.len());
    Bank {
        _tmp: tmp,
        store: store_path,
        reference,
        n_events: n_events + poisoned.len() as u64,
        skipping: skipping.then_some(letters),
        batches: batches.into_inner(),
    }
}

/// The dead letters of the bank projection in `dir`, one line each, without
/// when they failed (the one thing a run after a crash does differently).
fn dead_letters_of(dir: &Path) -> Result<String, String> {
    let path = dir.join("bank.db");
    if !path.exists() {
        return Ok(String::new());
    }
    let conn = projectionist::rusqlite::Connection::open(path).map_err(|e| e.to_string())?;
    let letters = projectionist::dead_letters(&conn).map_err(|e| e.to_string())?;
    Ok(letters
        .iter()
        .map(|l| {
            format!(
                "{} {} {:?} {} {} {}\n",
                l.sequence, l.stream_id, l.stream_version, l.event_type, l.attempts, l.error
            )
        })
        .collect())
}

/// Digest of the projection's tables, opened afresh (as a new process would, so
/// a hot wal is recovered first).
fn tables_digest(dir: &Path) -> Result<String, String> {
    let conn = projectionist::rusqlite::Connection::open(dir.join("bank.db"))
        .map_err(|e| e.to_string())?;
    projection_digest(&conn, DigestScope::ProjectionTables).map_err(|e| e.to_string())
}

/// The bank consumer's checkpoint, wherever the variant keeps it (0 when the
/// file or its table does not exist yet).
fn read_checkpoint(dir: &Path, checkpoint: &str) -> Result<u64, String> {
    let file = if checkpoint == "separate" {
        "checkpoints.db"
    } else {
        "bank.db"
    };
    if !dir.join(file).exists() {
        return Ok(0);
    }
    let conn =
        projectionist::rusqlite::Connection::open(dir.join(file)).map_err(|e| e.to_string())?;
    // Killed between creating the file and creating `_checkpoint`: nothing applied
    // yet; the next `ProjectionDir::db` creates the table.
    let has_table: bool = conn
        .query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE name = '_checkpoint'",
            [],
            |r| r.get(0),
        )
        .map_err(|e| e.to_string())?;
    if !has_table {
        return Ok(0);
    }
    SqliteCheckpoint::load_in(&conn, "bank").map_err(|e| e.to_string())
}

/// After any crash: the checkpoint must equal the number of events in the rows
/// (every event bumps `totals.n` once), i.e. no torn batch.
fn check_torn(dir: &Path, checkpoint_kind: &str) -> Result<(), String> {
    let checkpoint = read_checkpoint(dir, checkpoint_kind)?;
    if !dir.join("bank.db").exists() {
        return if checkpoint == 0 {
            Ok(())
        } else {
            Err(format!("checkpoint {checkpoint} without rows"))
        };
    }
    let conn = projectionist::rusqlite::Connection::open(dir.join("bank.db"))
        .map_err(|e| e.to_string())?;
    let has_totals: bool = conn
        .query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE name = 'totals'",
            [],
            |r| r.get(0),
        )
        .map_err(|e| e.to_string())?;
    let applied: i64 = if has_totals {
        conn.query_row("SELECT COALESCE(SUM(n), 0) FROM totals", [], |r| r.get(0))
            .map_err(|e| e.to_string())?
    } else {
        0
    };
    let skipped = projectionist::dead_letter_count(&conn).map_err(|e| e.to_string())?;
    if applied as u64 + skipped == checkpoint {
        Ok(())
    } else {
        Err(format!(
            "torn batch: rows hold {applied} events and {skipped} dead letters but the checkpoint says {checkpoint}"
        ))
    }
}

/// Resumes in a child, then compares tables and checkpoint with the reference.
fn resume_and_compare(
    bank: &Bank,
    dir: &Path,
    batch: &str,
    checkpoint: &str,
    interval_ms: &str,
) -> Result<(), String> {
    let role = if bank.skipping.is_some() {
        "resume-skipping"
    } else {
        "resume"
    };
    let status = run_child(
        role,
        &[
            path_str(&bank.store),
            path_str(dir),
            batch,
            checkpoint,
            interval_ms,
        ],
    );
    if !status.success() {
        return Err(format!("resume failed: {status}"));
    }
    let digest = tables_digest(dir)?;
    if digest != bank.reference {
        return Err(format!(
            "digest after resume {digest} differs from the uninterrupted {}",
            bank.reference
        ));
    }
    if let Some(expected) = &bank.skipping {
        let letters = dead_letters_of(dir)?;
        if letters != *expected {
            return Err(format!(
                "dead letters after resume:\n{letters}differ from the uninterrupted run's:\n{expected}"
            ));
        }
    }
    let at = read_checkpoint(dir, checkpoint)?;
    if at != bank.n_events {
        return Err(format!(
            "checkpoint after resume is {at}, expected {}",
            bank.n_events
        ));
    }
    Ok(())
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

// ---------------------------------------------------------------- the tests

fn second_process_gets_the_lock_error() -> Result<(), String> {
    let tmp = tempfile::tempdir().unwrap();
    let dir_path = path_str(tmp.path());
    let mut holder = spawn_child("hold-lock", &[dir_path, "orders"]);
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let result = refused_while_held(tmp.path(), &line);
    drop(holder.stdin.take());
    holder.wait().unwrap();
    result?;
    let dir = ProjectionDir::open(tmp.path()).unwrap();
    dir.db("orders")
        .map(|_| ())
        .map_err(|e| format!("after the holder exited: {e}"))
}

/// While the holder lives, this process and a third one are refused.
fn refused_while_held(dir_path: &Path, holder_said: &str) -> Result<(), String> {
    if holder_said.trim() != "locked" {
        return Err(format!("holder said {holder_said:?}"));
    }
    let dir = ProjectionDir::open(dir_path).unwrap();
    match dir.db("orders") {
        // The message names the holder's process (it wrote it in the lock file).
        Err(
            e @ Error::Locked {
                holder: Some(pid), ..
            },
        ) if pid != std::process::id()
            && e.to_string()
                .contains(&format!("projection orders is locked by process {pid}")) => {}
        other => return Err(format!("expected the lock error, got {other:?}")),
    }
    let third = run_child("hold-lock", &[path_str(dir_path), "orders"]);
    if third.code() != Some(EXIT_LOCKED) {
        return Err(format!(
            "third process exited {third}, expected the lock error"
        ));
    }
    Ok(())
}

fn hot_wal_of_a_crashed_writer_is_removed() -> Result<(), String> {
    let tmp = tempfile::tempdir().unwrap();
    let status = run_child("write-abort", &[path_str(tmp.path()), "p"]);
    if status.success() {
        return Err("writer did not crash".into());
    }
    let wal = tmp.path().join("p.db-wal");
    if std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) == 0 {
        return Err("the crashed writer left no hot wal".into());
    }
    let dir = ProjectionDir::open(tmp.path()).unwrap();
    dir.remove("p").map_err(|e| e.to_string())?;
    let db = dir.db("p").map_err(|e| e.to_string())?;
    let conn = db.open_reader().map_err(|e| e.to_string())?;
    let old: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'old'",
            [],
            |r| r.get(0),
        )
        .map_err(|e| e.to_string())?;
    let checkpoint = SqliteCheckpoint::load_in(&conn, "c").map_err(|e| e.to_string())?;
    if old != 0 || checkpoint != 0 {
        return Err(format!(
            "old data came back: table old {old}, checkpoint {checkpoint}"
        ));
    }
    Ok(())
}

/// Crashes at each of `points` (step, batch number) in a fresh rebuild, checks
/// for a torn batch, resumes and compares; returns the points that failed.
fn crash_point_failures(
    checkpoint: &str,
    interval_ms: &str,
    points: &[(BatchStep, u64)],
) -> Vec<String> {
    crash_point_failures_of("rebuild", checkpoint, interval_ms, points)
}

/// As [`crash_point_failures`], the crashing run made by child `role`
/// (`rebuild`, or `rebuild-parked` for the bank parked among fillers).
fn crash_point_failures_of(
    role: &str,
    checkpoint: &str,
    interval_ms: &str,
    points: &[(BatchStep, u64)],
) -> Vec<String> {
    let bank = bank_of(3_000, 100, role.ends_with("-skipping"));
    let mut failures = Vec::new();
    for (step, batch_no) in points {
        let batch_no = if *batch_no == LAST_BATCH {
            &bank.batches
        } else {
            batch_no
        };
        let dir = bank._tmp.path().join(format!(
            "{role}-{checkpoint}-{interval_ms}-{}-{batch_no}",
            step.as_str()
        ));
        let batch_text = batch_no.to_string();
        // The parked child keeps its checkpoint in the file: no such argument.
        let mut args = vec![path_str(&bank.store), path_str(&dir), "100"];
        if !role.starts_with("rebuild-parked") {
            args.push(checkpoint);
        }
        args.extend([interval_ms, step.as_str(), &batch_text]);
        let status = run_child(role, &args);
        let point = format!("{} of batch {batch_no}", step.as_str());
        // SIGABRT from the crash point; a panic (exit 101) or success is not a crash.
        if status.signal() != Some(SIGABRT) {
            failures.push(format!("{point}: the child did not crash ({status})"));
            continue;
        }
        let outcome = check_torn(&dir, checkpoint)
            .and_then(|()| resume_and_compare(&bank, &dir, "100", checkpoint, interval_ms));
        if let Err(why) = outcome {
            failures.push(format!("{point}: {why}"));
        }
    }
    failures
}

/// Every step of the first, a middle and the last of the 30 batches.
fn every_step_of(batches: &[u64]) -> Vec<(BatchStep, u64)> {
    batches
        .iter()
        .flat_map(|&b| BatchStep::ALL.map(|s| (s, b)))
        .collect()
}

fn crash_points_resume_to_the_same_digest() -> Result<(), String> {
    // Commit after every batch: every step of every chosen batch is a crash point.
    let failures = crash_point_failures("in-file", "0", &every_step_of(&[1, 15, 30]));
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n    "))
    }
}

/// The bank projection parked behind `OPEN_PROJECTIONS_MAX` others: its
/// batches are kept and applied in visits (up to 16 per transaction, or a
/// commit interval's worth), so a crash at any step of a batch inside a visit
/// must lose the whole visit and nothing else. Resumed alone afterwards, it
/// must end equal to an uninterrupted rebuild.
fn crash_points_of_a_parked_projection_resume_to_the_same_digest() -> Result<(), String> {
    // Without a commit interval to end them, visits hold 16 batches: batches
    // 1-16 commit together, then 17-30 at the end of the log.
    let mut points = every_step_of(&[1, 15, 16, 30]);
    points.retain(|(step, batch)| *step != BatchStep::Committed || [16, 30].contains(batch));
    let failures = crash_point_failures_of("rebuild-parked", "in-file", "60000", &points);
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n    "))
    }
}

/// The log holds poison events that the projection dead-letters: a crash at
/// any step of a batch (whether it held a poison event or not, committed
/// alone or in a group) and a resume leave the same rows and the same dead
/// letters as an uninterrupted run.
fn crash_points_over_dead_letters_resume_to_the_same_digest_and_letters() -> Result<(), String> {
    let mut failures = crash_point_failures_of(
        "rebuild-skipping",
        "in-file",
        "0",
        &every_step_of(&[1, 2, 15, LAST_BATCH]),
    );
    let mut grouped = every_step_of(&[2, 15, LAST_BATCH]);
    grouped.retain(|(step, batch)| *step != BatchStep::Committed || *batch == LAST_BATCH);
    failures.extend(crash_point_failures_of(
        "rebuild-skipping",
        "in-file",
        "60000",
        &grouped,
    ));
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n    "))
    }
}

fn crash_points_in_commit_groups_resume_to_the_same_digest() -> Result<(), String> {
    // One commit group for the whole run: crashes inside it lose the group; the
    // commit happens once, after the last batch.
    let mut points: Vec<(BatchStep, u64)> = every_step_of(&[1, 15, 30]);
    points.retain(|(step, batch)| *step != BatchStep::Committed || *batch == 30);
    let failures = crash_point_failures("in-file", "60000", &points);
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n    "))
    }
}

fn crash_points_catch_a_torn_batch() -> Result<(), String> {
    // The broken variant commits the batch, then the checkpoint in a separate
    // transaction in another file. A crash between the two must be caught.
    let failures = crash_point_failures("separate", "0", &every_step_of(&[1, 15, 30]));
    let caught = failures
        .iter()
        .filter(|f| f.starts_with("committed of batch"))
        .count();
    if caught == 3 {
        println!("    negative control caught: {}", failures.join("; "));
        Ok(())
    } else {
        Err(format!(
            "the broken variant was caught at {caught} of 3 crash points: {failures:?}"
        ))
    }
}

fn random_sigkills_resume_to_the_same_digest() -> Result<(), String> {
    let (seed, iterations) = seed_and_iterations(50);
    println!(
        "    random kills: seed {seed} (replay with PROJECTIONIST_SEED={seed}), {iterations} iterations"
    );
    let mut rng = fastrand::Rng::with_seed(seed);
    let plain = bank(20_000, 50);
    // Every other kill lands in a run that dead-letters poison events.
    let skipping = bank_of(20_000, 50, true);
    // 20,000 events in batches of 50. The kill point is drawn from the seed
    // as (batch, step): the child says when it gets there and is SIGKILLed
    // at once, wherever its work then is (inside SQLite, between batches, in
    // a commit), so a seed replays the same kill points.
    let batches = 20_000 / 50;
    let steps = [
        BatchStep::Begun,
        BatchStep::Applied,
        BatchStep::CheckpointSaved,
    ];
    let mut mid_run = 0;
    for iteration in 0..iterations {
        let (bank, role) = if iteration % 2 == 1 {
            (&skipping, "rebuild-skipping")
        } else {
            (&plain, "rebuild")
        };
        let dir = bank._tmp.path().join(format!("kill-{iteration}"));
        let batch = rng.u64(1..=batches);
        let step = steps[rng.usize(..steps.len())].as_str();
        let child = spawn_child(
            role,
            &[
                path_str(&bank.store),
                path_str(&dir),
                "50",
                "in-file",
                KILL_INTERVAL_MS,
                step,
                &batch.to_string(),
                "signal",
            ],
        );
        if kill_when_reached(child) {
            mid_run += 1;
        }
        let outcome = check_torn(&dir, "in-file")
            .and_then(|()| resume_and_compare(bank, &dir, "50", "in-file", KILL_INTERVAL_MS));
        if let Err(why) = outcome {
            return Err(format!(
                "seed {seed}, iteration {iteration}, kill at {step} of batch {batch}: {why}"
            ));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("    {mid_run} of {iterations} kills landed mid-rebuild");
    if mid_run * 2 < iterations {
        return Err(format!(
            "only {mid_run} of {iterations} kills landed mid-rebuild"
        ));
    }
    Ok(())
}

// ------------------------------------------------------- publish and rollback

/// A directory with the bank projection built from the first 1,500 events
/// (the old version) and a finished shadow built from all 3,000 (the new one),
/// and the digests of both.
struct Versions {
    _tmp: tempfile::TempDir,
    template: PathBuf,
    old: String,
    new: String,
}

fn versions() -> Versions {
    let tmp = tempfile::tempdir().unwrap();
    // The same seed: the longer log starts with the shorter one.
    let short = bank_store(&tmp.path().join("short.db"), 1_500, 3);
    let full = bank_store(&tmp.path().join("full.db"), 3_000, 3);
    let template = tmp.path().join("template");
    let dir = ProjectionDir::open(&template).unwrap();
    let live = dir.db("bank").unwrap();
    rebuild(config(
        &short,
        &live,
        &mut BankHandler::default(),
        options100(),
    ))
    .unwrap();
    let shadow = dir.shadow("bank").unwrap();
    rebuild(config(
        &full,
        &shadow,
        &mut BankHandler::default(),
        options100(),
    ))
    .unwrap();
    let old = common::digest(&live);
    let new = common::digest(&shadow);
    assert_ne!(old, new);
    drop((live, shadow));
    dir.close().unwrap();
    Versions {
        _tmp: tmp,
        template,
        old,
        new,
    }
}

fn options100() -> RebuildOptions<'static> {
    common::options(100)
}

/// Copies the files of a closed projection directory.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Digest of a version file's projection tables, opened afresh; `None` when
/// the file does not exist.
fn file_digest(path: &Path) -> Option<String> {
    if !path.exists() {
        return None;
    }
    let conn = projectionist::rusqlite::Connection::open(path).unwrap();
    Some(projection_digest(&conn, DigestScope::ProjectionTables).unwrap())
}

/// Opens the directory as the next process would (finishing or undoing what a
/// crash left) and returns the digests of the live file, the previous version
/// and the shadow; fails if a half-made copy is left.
fn after_crash(path: &Path) -> Result<Left, String> {
    let dir = ProjectionDir::open(path).map_err(|e| e.to_string())?;
    let live = dir.db("bank").map_err(|e| e.to_string())?;
    let files = VersionFiles::new(path, "bank").unwrap();
    if files.previous_new.exists() {
        return Err("the copy of the live file was left behind".into());
    }
    let digests = (
        common::digest(&live),
        file_digest(&files.previous),
        file_digest(&files.shadow),
    );
    Ok(digests)
}

/// Live, previous and shadow digests.
type Left = (String, Option<String>, Option<String>);

/// What is wrong with a directory after a child `what` aborted at `step`:
/// nothing when it crashed there and left `expected`.
fn crash_left(
    what: &str,
    step: PublishStep,
    status: ExitStatus,
    path: &Path,
    expected: &Left,
) -> Option<String> {
    let step = step.as_str();
    match after_crash(path) {
        _ if status.signal() != Some(SIGABRT) => {
            Some(format!("{what} {step}: no crash ({status})"))
        }
        Ok(got) if got == *expected => None,
        Ok(got) => Some(format!(
            "{what} {step}: live/previous/shadow {got:?}, expected {expected:?}"
        )),
        Err(why) => Some(format!("{what} {step}: {why}")),
    }
}

fn publish_and_rollback_crash_points_leave_one_whole_version() -> Result<(), String> {
    let v = versions();
    let mut failures = Vec::new();
    let (old, new) = (Some(v.old.clone()), Some(v.new.clone()));
    for step in PublishStep::ALL {
        // Publish: before the copy commits, the old version stays live and the
        // shadow stays publishable; after it, the new one is live, the old one kept.
        let path = v._tmp.path().join(format!("publish-{}", step.as_str()));
        copy_dir(&v.template, &path);
        let status = run_child("publish", &[path_str(&path), step.as_str()]);
        let published = !matches!(step, PublishStep::Stamped | PublishStep::PreviousCopied);
        let expected = if published {
            (v.new.clone(), old.clone(), None)
        } else {
            (v.old.clone(), None, new.clone())
        };
        failures.extend(crash_left("publish", step, status, &path, &expected));
        if !published {
            // What was left can still be published.
            let dir = ProjectionDir::open(&path).unwrap();
            dir.shadow("bank").unwrap();
            dir.publish("bank", "bank", &PublishOptions::default())
                .unwrap();
            let live = dir.db("bank").unwrap();
            if common::digest(&live) != v.new {
                failures.push(format!("publish {}: republish differs", step.as_str()));
            }
        }
        if step == PublishStep::ShadowRemoved {
            continue; // a rollback has no shadow to remove
        }
        // Rollback of a published directory: live new, previous old.
        let path = v._tmp.path().join(format!("rollback-{}", step.as_str()));
        copy_dir(&v.template, &path);
        {
            let dir = ProjectionDir::open(&path).unwrap();
            dir.shadow("bank").unwrap();
            dir.publish("bank", "bank", &PublishOptions::default())
                .unwrap();
        }
        let status = run_child("rollback", &[path_str(&path), step.as_str()]);
        let expected = if published {
            (v.old.clone(), new.clone(), None)
        } else {
            (v.new.clone(), old.clone(), None)
        };
        failures.extend(crash_left("rollback", step, status, &path, &expected));
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n    "))
    }
}

fn random_sigkills_of_swaps_leave_one_whole_version() -> Result<(), String> {
    let (seed, iterations) = seed_and_iterations(30);
    println!(
        "    swap kills: seed {seed} (replay with PROJECTIONIST_SEED={seed}), {iterations} iterations"
    );
    let mut rng = fastrand::Rng::with_seed(seed);
    let v = versions();
    let path = v._tmp.path().join("swaps");
    copy_dir(&v.template, &path);
    {
        let dir = ProjectionDir::open(&path).unwrap();
        dir.shadow("bank").unwrap();
        dir.publish("bank", "bank", &PublishOptions::default())
            .unwrap();
    }
    let both = [v.old.clone(), v.new.clone()];
    for iteration in 0..iterations {
        // The same directory throughout: every kill's leftovers meet the next
        // run. The kill point is drawn from the seed as (swap, step).
        // A rollback passes these steps (a publish also removes a shadow).
        let steps = [
            PublishStep::Stamped,
            PublishStep::PreviousCopied,
            PublishStep::Published,
            PublishStep::PreviousKept,
        ];
        let step = steps[rng.usize(..steps.len())].as_str();
        let swap = rng.u64(0..4);
        let child = spawn_child("swap-forever", &[path_str(&path), step, &swap.to_string()]);
        if !kill_when_reached(child) {
            return Err(format!(
                "seed {seed}, iteration {iteration}: the swaps ended before {step} of swap {swap}"
            ));
        }
        let (live, previous, shadow) = after_crash(&path)
            .map_err(|why| format!("seed {seed}, iteration {iteration}: {why}"))?;
        let previous = previous.unwrap_or_default();
        if !both.contains(&live)
            || !both.contains(&previous)
            || live == previous
            || shadow.is_some()
        {
            return Err(format!(
                "seed {seed}, iteration {iteration}: live {live}, previous {previous}, shadow {shadow:?}"
            ));
        }
    }
    Ok(())
}
