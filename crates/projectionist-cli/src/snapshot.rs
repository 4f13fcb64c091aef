//! `snapshot` and `--seed-from`: copies of projections for other nodes, and
//! projections restored from them (the policy is the runner's
//! `snapshot` module; this is its command line).

use std::path::Path;

use anyhow::anyhow;
use projectionist::GlobalReader;
use projectionist_runner::snapshot::{
    SnapshotDir, SnapshotLocation, seed, store_identity, take_snapshot,
};

use crate::app::{
    EXIT_PROJECTION, EXIT_STORE, Failure, default_path, fail, load_config, open_store, select,
};
use crate::args::Cli;
use crate::ui;

/// Where snapshots go or come from: a directory, or a PostgreSQL URL
/// (tables `projectionist.snapshots` and `projectionist.snapshot_chunks`).
pub(crate) fn location(spec: &Path) -> Result<Box<dyn SnapshotLocation>, Failure> {
    let text = spec.to_string_lossy();
    if crate::store::Store::is_postgres(&text) {
        let snapshots = projectionist_postgres::PostgresSnapshots::connect(&text)
            .map_err(|e| fail(EXIT_STORE)(e.into()))?;
        return Ok(Box::new(snapshots));
    }
    crate::store::Store::refuse_other_urls(&text).map_err(fail(crate::app::EXIT_CONFIG))?;
    Ok(Box::new(SnapshotDir(spec.to_path_buf())))
}

fn projections_path(cli: &Cli) -> std::path::PathBuf {
    cli.dir
        .clone()
        .unwrap_or_else(|| default_path(false, "projections"))
}

/// The log's identity, from its first event; an empty log has none.
fn identity(reader: &dyn GlobalReader<crate::store::Payload>) -> Result<Option<String>, Failure> {
    store_identity(reader).map_err(|e| fail(EXIT_STORE)(e.into()))
}

/// `snapshot [NAME...] --to DIR [--keep N]`.
pub(crate) fn run_snapshot(
    cli: &Cli,
    names: &[String],
    to: &Path,
    keep: usize,
) -> Result<(), Failure> {
    let config = load_config(cli, false)?;
    let selected = select(&config, names)?;
    let store = open_store(cli, false, &config)?;
    let Some(identity) = identity(store.reader())? else {
        return Err(fail(EXIT_STORE)(anyhow!(
            "the event log is empty: there is nothing a snapshot could be built from"
        )));
    };
    let dir = projections_path(cli);
    let target = location(to)?;
    let mut failures = Vec::new();
    for projection in selected {
        let name = projection.name.as_str();
        match take_snapshot(&dir, name, target.as_ref(), &identity, keep) {
            Ok(manifest) if cli.json => ui::json_line(&serde_json::json!({
                "event": "snapshot", "projection": name, "checkpoint": manifest.checkpoint,
                "bytes": manifest.bytes, "sha256": manifest.sha256,
            })),
            Ok(manifest) if !cli.quiet => eprintln!(
                "{name}: snapshot at checkpoint {} ({} bytes) in {}",
                manifest.checkpoint,
                manifest.bytes,
                to.display()
            ),
            Ok(_) => {}
            Err(e) => failures.push(format!("{name}: {}", ui::escape_controls(&e.to_string()))),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(fail(EXIT_PROJECTION)(anyhow!("{}", failures.join("\n"))))
    }
}

/// `--seed-from DIR`: each selected projection missing locally is restored
/// from the newest snapshot that fits; refused snapshots are said, with why.
pub(crate) fn seed_missing(cli: &Cli, names: &[String], from: &Path) -> Result<(), Failure> {
    let config = load_config(cli, false)?;
    let selected = select(&config, names)?;
    let store = open_store(cli, false, &config)?;
    let Some(identity) = identity(store.reader())? else {
        return Ok(());
    };
    let head = store
        .reader()
        .head()
        .map_err(|e| fail(EXIT_STORE)(e.into()))?;
    let dir = projections_path(cli);
    let source = location(from)?;
    for projection in selected {
        let name = projection.name.as_str();
        let seeded = seed(
            &dir,
            name,
            source.as_ref(),
            Some(&projection.hash),
            &identity,
            head,
        )
        .map_err(|e| fail(EXIT_PROJECTION)(e.into()))?;
        for (checkpoint, why) in &seeded.refused {
            if cli.json {
                ui::json_line(&serde_json::json!({
                    "event": "snapshot_refused", "projection": name,
                    "checkpoint": checkpoint, "reason": why,
                }));
            } else if !cli.quiet {
                eprintln!("{name}: the snapshot at checkpoint {checkpoint} is not used: {why}");
            }
        }
        if let Some(manifest) = &seeded.restored {
            if cli.json {
                ui::json_line(&serde_json::json!({
                    "event": "seeded", "projection": name, "checkpoint": manifest.checkpoint,
                }));
            } else if !cli.quiet {
                eprintln!(
                    "{name}: restored from the snapshot at checkpoint {} (of {head}); catching up from there",
                    manifest.checkpoint
                );
            }
        }
    }
    Ok(())
}
