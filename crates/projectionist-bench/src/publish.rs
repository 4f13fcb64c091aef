//! `projectionist bench-publish`: what publishing a shadow costs, by size.
//!
//! For each size, a live projection and a finished shadow of about that size
//! (one table of 1 KiB rows, written through the library) are made in the work
//! directory; then the shadow is published while a reader on a connection of
//! its own (busy timeout as an application's) asks the live file every 2 ms.
//! Reported per size (median of the runs): the whole publish, the live file's
//! write-lock hold (the copy's transaction), the extra disk it needed at its
//! peak (shadow + the copy of the live file kept as previous + the live
//! file's `-wal` holding the new version), and the reader's longest answer
//! and errors during the publish.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use projectionist::rusqlite::{Connection, OpenFlags};
use projectionist::{ProjectionDb, ProjectionDir, PublishOptions, PublishStep, SqliteCheckpoint};

use crate::common::out;

/// Bytes per row of the synthetic projection.
const ROW_BYTES: usize = 1024;

/// Rows per write transaction while the files are made.
const ROWS_PER_TX: u64 = 20_000;

/// How often the reader asks the live file.
const READ_EVERY: Duration = Duration::from_millis(2);

const MIB: u64 = 1024 * 1024;

pub(crate) fn run(sizes_mib: &[u64], runs: u32, work: &Path) -> anyhow::Result<()> {
    if runs == 0 || sizes_mib.is_empty() {
        bail!("--runs and --sizes must not be empty or 0");
    }
    std::fs::create_dir_all(work).with_context(|| format!("create {}", work.display()))?;
    out!(
        "{:>9} {:>5} {:>12} {:>14} {:>14} {:>16} {:>14} {:>12} {:>8}",
        "size MiB",
        "runs",
        "publish ms",
        "lock held ms",
        "lock ms/GiB",
        "peak extra MiB",
        "live wal MiB",
        "read max ms",
        "errors"
    );
    for &size in sizes_mib {
        let mut measured = Vec::new();
        for run in 0..runs {
            let dir = work.join(format!("publish-{size}-{run}"));
            let _ = std::fs::remove_dir_all(&dir);
            let one = publish_once(&dir, size * MIB);
            let _ = std::fs::remove_dir_all(&dir);
            measured.push(one?);
        }
        let median = |f: fn(&Measured) -> f64| {
            let mut values: Vec<f64> = measured.iter().map(f).collect();
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        let lock_ms = median(|m| m.lock_held.as_secs_f64() * 1e3);
        let bytes = median(|m| m.bytes as f64);
        out!(
            "{:>9} {:>5} {:>12.1} {:>14.1} {:>14.1} {:>16.1} {:>14.1} {:>12.1} {:>8}",
            size,
            runs,
            median(|m| m.elapsed.as_secs_f64() * 1e3),
            lock_ms,
            lock_ms / (bytes / (1024.0 * MIB as f64)),
            median(|m| m.peak_extra as f64) / MIB as f64,
            median(|m| m.live_wal as f64) / MIB as f64,
            median(|m| m.read_max.as_secs_f64() * 1e3),
            measured.iter().map(|m| m.read_errors).sum::<u64>()
        );
    }
    Ok(())
}

struct Measured {
    elapsed: Duration,
    lock_held: Duration,
    bytes: u64,
    peak_extra: u64,
    /// The live file's `-wal` right after the copy committed.
    live_wal: u64,
    read_max: Duration,
    read_errors: u64,
}

fn publish_once(path: &Path, bytes: u64) -> anyhow::Result<Measured> {
    let dir = ProjectionDir::open(path)?;
    let live = dir.db("p")?;
    fill(&live, bytes, 1, 1)?;
    let before = dir_bytes(path);
    let shadow = dir.shadow("p")?;
    fill(&shadow, bytes, 2, 2)?;
    // The peak: the shadow (with its `-wal`), the copy of the live file, and
    // the live file's `-wal` holding the new version, all there right after
    // the copy commits; less what the live projection took before.
    let peak = Mutex::new((0u64, 0u64));
    let wal = {
        let mut name = live.path().as_os_str().to_owned();
        name.push("-wal");
        std::path::PathBuf::from(name)
    };
    let hook = |_: &str, step: PublishStep| {
        if step == PublishStep::Published {
            let wal_bytes = std::fs::metadata(&wal).map_or(0, |m| m.len());
            *peak.lock().unwrap() = (dir_bytes(path).saturating_sub(before), wal_bytes);
        }
    };
    let stop = AtomicBool::new(false);
    let live_path = live.path().to_path_buf();
    let (published, reads) = std::thread::scope(|scope| {
        let reader = scope.spawn(|| read_while(&live_path, &stop));
        std::thread::sleep(Duration::from_millis(50));
        let published = dir.publish("p", "p", &PublishOptions::new().step_hook(&hook));
        std::thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::SeqCst);
        (published, reader.join().expect("the reader"))
    });
    let published = published?;
    let (read_max, read_errors, answers) = reads?;
    if answers
        .iter()
        .any(|&a| a != answers[0] && a != answers[answers.len() - 1])
    {
        bail!("the reader saw an answer of neither version");
    }
    let (peak_extra, live_wal) = *peak.lock().unwrap();
    Ok(Measured {
        elapsed: published.elapsed,
        lock_held: published.lock_held,
        bytes: published.bytes,
        peak_extra,
        live_wal,
        read_max,
        read_errors,
    })
}

/// Bytes of the files in a directory.
fn dir_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Writes about `bytes` of rows (distinct per `salt`), and checkpoint `checkpoint`.
fn fill(db: &ProjectionDb, bytes: u64, salt: u64, checkpoint: u64) -> anyhow::Result<()> {
    let rows = bytes / ROW_BYTES as u64;
    let mut written = 0;
    while written < rows {
        let until = (written + ROWS_PER_TX).min(rows);
        db.write(|tx| {
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)",
            )?;
            let mut insert = tx.prepare_cached("INSERT INTO rows VALUES (?1, randomblob(?2))")?;
            for id in written..until {
                insert.execute((id.cast_signed(), ROW_BYTES as i64))?;
            }
            if until == rows {
                tx.execute("DELETE FROM rows WHERE id = ?1", [salt.cast_signed()])?;
                SqliteCheckpoint::save_in(tx, "p", checkpoint)?;
            }
            Ok(())
        })?;
        written = until;
    }
    Ok(())
}

type Reads = (Duration, u64, Vec<i64>);

/// Asks the live file every [`READ_EVERY`] until `stop`: the longest answer,
/// the errors, and the row counts seen.
fn read_while(path: &Path, stop: &AtomicBool) -> anyhow::Result<Reads> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_millis(u64::from(
        projectionist::limits::BUSY_TIMEOUT_MS,
    )))?;
    let mut longest = Duration::ZERO;
    let mut errors = 0;
    let mut answers = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let asked = Instant::now();
        // Cheap (an index lookup), so its time is waiting, not scanning.
        let question =
            "SELECT (SELECT sequence FROM _checkpoint) * 1000000000 + (SELECT max(id) FROM rows)";
        match conn.query_row(question, [], |r| r.get::<_, i64>(0)) {
            Ok(rows) => answers.push(rows),
            Err(_) => errors += 1,
        }
        longest = longest.max(asked.elapsed());
        std::thread::sleep(READ_EVERY);
    }
    Ok((longest, errors, answers))
}
