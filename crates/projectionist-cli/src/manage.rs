//! `list` and `remove-all`: only projection files, all or nothing, naming what
//! was left alone.

use anyhow::Context;
use projectionist::FileKind;

use crate::app::{EXIT_PROJECTION, Failure, code_of_error, fail, open_existing_dir};
use crate::args::Cli;
use crate::ui;

/// `list`: the projections of the directory; other `*.db` files are named on
/// stderr as left alone.
pub(crate) fn run_list(cli: &Cli) -> Result<(), Failure> {
    let dir = open_existing_dir(cli)?;
    let files = dir.scan().map_err(|e| fail(EXIT_PROJECTION)(e.into()))?;
    for file in files {
        match file.kind {
            FileKind::Projection => {
                if cli.json {
                    ui::json_line(
                        &serde_json::json!({"event": "projection", "name": file.name.as_str()}),
                    );
                } else {
                    ui::out_line(file.name.as_str());
                }
            }
            FileKind::Empty => {}
            FileKind::NotAProjection(reason) | FileKind::Corrupt(reason) => {
                if !cli.quiet {
                    eprintln!(
                        "warning: {} is not a projection ({reason}); not listed",
                        file.path.display()
                    );
                }
            }
        }
    }
    Ok(())
}

/// `remove-all`: every projection or none (each lock is taken before anything is
/// deleted); says what it removed and what it left alone.
pub(crate) fn run_remove_all(cli: &Cli) -> Result<(), Failure> {
    let dir = open_existing_dir(cli)?;
    let skipped: Vec<_> = dir
        .scan()
        .map_err(|e| fail(EXIT_PROJECTION)(e.into()))?
        .into_iter()
        .filter(|f| !matches!(f.kind, FileKind::Projection | FileKind::Empty))
        .collect();
    let removed = dir
        .remove_all()
        .context("remove all projections (nothing was removed)")
        .map_err(|e| fail(code_of_error(&e))(e))?;
    for name in &removed {
        if cli.json {
            ui::json_line(&serde_json::json!({"event": "removed", "projection": name.as_str()}));
        } else if !cli.quiet {
            eprintln!("removed {name}");
        }
    }
    if !cli.quiet {
        for file in skipped {
            eprintln!("left alone: {} (not a projection)", file.path.display());
        }
    }
    Ok(())
}
