//! Memory of snapshots through PostgreSQL, whatever their size: builds a
//! projection file of SIZE_MIB (incompressible rows), stores its snapshot in
//! PostgreSQL and restores it into another directory, and prints each step's
//! time and peak resident memory (reset before each step).
//!
//! `cargo run --release -p projectionist-postgres --example snapshot_memory -- URL [SIZE_MIB]`
//! (default 1024). Tables go into schema `projectionist_bench`, dropped at
//! the end.

use std::time::Instant;

use projectionist::{ProjectionDir, SqliteCheckpoint};
use projectionist_postgres::PostgresSnapshots;
use projectionist_runner::snapshot::{seed, take_snapshot};

/// Bytes per row of the generated projection.
const ROW_BYTES: usize = 64 << 10;

/// Peak resident memory since the last reset, in MiB (Linux).
fn peak_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args.next().ok_or("usage: snapshot_memory URL [SIZE_MIB]")?;
    let size_mib: usize = args.next().map_or(Ok(1024), |a| a.parse())?;
    let tmp = tempfile::tempdir()?;
    let dir = ProjectionDir::open(tmp.path().join("projections"))?;
    let db = dir.db("big")?;
    let started = Instant::now();
    db.with_connection(|conn| {
        let step = |e| projectionist::Error::Sqlite {
            step: "fill".into(),
            source: e,
        };
        let tx = conn.transaction().map_err(step)?;
        tx.execute_batch("CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
            .map_err(step)?;
        let mut rng = fastrand::Rng::with_seed(7);
        let mut row = vec![0u8; ROW_BYTES];
        for id in 0..(size_mib << 20) / ROW_BYTES {
            rng.fill(&mut row);
            tx.execute("INSERT INTO blobs VALUES (?1, ?2)", (id as i64, &row))
                .map_err(step)?;
        }
        SqliteCheckpoint::save_in(&tx, "big", 1)?;
        tx.commit().map_err(step)
    })?;
    drop(db);
    dir.close()?;
    println!(
        "built a {size_mib} MiB projection in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let location = PostgresSnapshots::connect_in(&url, "projectionist_bench")?;

    reset_peak();
    let started = Instant::now();
    let manifest = take_snapshot(
        &tmp.path().join("projections"),
        "big",
        &location,
        "bench",
        1,
    )?;
    println!(
        "snapshot into PostgreSQL: {} bytes in {:.1} s, peak RSS {:.1} MiB",
        manifest.bytes,
        started.elapsed().as_secs_f64(),
        peak_mib()
    );

    reset_peak();
    let started = Instant::now();
    let seeded = seed(
        &tmp.path().join("restored"),
        "big",
        &location,
        None,
        "bench",
        u64::MAX,
    )?;
    println!(
        "restore from PostgreSQL: {} in {:.1} s, peak RSS {:.1} MiB",
        if seeded.restored.is_some() {
            "restored"
        } else {
            "REFUSED"
        },
        started.elapsed().as_secs_f64(),
        peak_mib()
    );
    let mut client = postgres::Client::connect(&url, postgres::NoTls)?;
    client.batch_execute("DROP SCHEMA projectionist_bench CASCADE")?;
    Ok(())
}
