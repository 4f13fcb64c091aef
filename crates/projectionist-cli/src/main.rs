//! `projectionist`: rebuild, resume, inspect and manage projections from the
//! command line, declared in a TOML config (see `examples/orders/projections.toml`).
//!
//! Exit codes: 0 success; 2 usage or config error; 3 event store error;
//! 4 a projection failed; 130 interrupted (Ctrl-C), resumable.

mod app;
mod args;
mod dead_letters;
mod demo;
mod follow;
mod inspect;
mod manage;
mod metrics;
mod replay;
mod snapshot;
mod status;
mod store;
mod ui;
mod versions;
mod worker;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use app::{EXIT_CONFIG, Failure, code_of_error, error_text, fail, open_existing_dir};
use args::{Cli, Command};
use demo::run_demo;
use follow::run_follow;
use inspect::run_inspect;
use manage::{run_list, run_remove_all};
use replay::{Plan, run_replay};
use status::run_status;
use versions::{run_rollback, run_verify};
use worker::run_worker;

fn main() -> ExitCode {
    // First, before any connection opens: a follower may hold a thousand.
    let lean = projectionist::lean_sqlite_memory();
    let cli = Cli::parse();
    init_logs(&cli);
    if let Err(e) = lean {
        tracing::warn!("{e}");
    }
    // Each open projection holds four file descriptors (its file, -wal, -shm
    // and lock): a follower of hundreds of projections needs more than the
    // usual soft limit of 1,024. Raised to the hard limit, as far as allowed.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(e) => tracing::debug!("cannot raise the open files limit: {e}"),
    }
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let message = error_text(&failure.error);
            if cli.json {
                ui::json_line(
                    &serde_json::json!({"event": "error", "code": failure.code, "message": message}),
                );
            }
            // Names and data can hold control characters: never echo them raw.
            eprintln!("error: {}", ui::escape_controls(&message));
            ExitCode::from(failure.code)
        }
    }
}

fn run(cli: &Cli) -> Result<(), Failure> {
    // The library's rule, once: 0 means the default, above the maximum is an error.
    projectionist::validate_batch_size(cli.batch_size)
        .map_err(|e| fail(EXIT_CONFIG)(anyhow::Error::from(e).context("--batch-size")))?;
    match &cli.command {
        Command::Demo { events, seed } => run_demo(cli, *events, *seed),
        Command::Rebuild {
            names,
            in_place,
            no_keep_previous,
            force,
            verify,
            publish_if_equal,
        } => {
            if *verify {
                run_verify(cli, names, *publish_if_equal, !*no_keep_previous)
            } else {
                let plan = Plan::Rebuild {
                    in_place: *in_place,
                    keep_previous: !*no_keep_previous,
                    force: *force,
                };
                run_replay(cli, names, plan)
            }
        }
        Command::Rollback { name } => run_rollback(cli, name),
        Command::Resume { names, seed_from } => {
            if let Some(from) = seed_from {
                snapshot::seed_missing(cli, names, from)?;
            }
            run_replay(cli, names, Plan::Resume)
        }
        Command::Snapshot { names, to, keep } => snapshot::run_snapshot(cli, names, to, *keep),
        Command::Follow {
            names,
            metrics,
            max_lag,
            max_wait,
            stall_after,
            late_window,
            on_late_event,
            seed_from,
            snapshot_to,
            snapshot_every,
            snapshot_keep,
        } => {
            if let Some(from) = seed_from {
                snapshot::seed_missing(cli, names, from)?;
            }
            run_follow(
                cli,
                names,
                &follow::FollowOptions {
                    metrics_addr: metrics.as_deref(),
                    max_lag: *max_lag,
                    max_wait: *max_wait,
                    stall_after: *stall_after,
                    late_window: *late_window,
                    on_late_event: *on_late_event,
                    snapshots: snapshot_to.as_deref().map(|to| follow::Snapshots {
                        to,
                        every: *snapshot_every,
                        keep: *snapshot_keep,
                    }),
                },
            )
        }
        Command::Status { check } => run_status(cli, *check),
        Command::Wait {
            name,
            position,
            timeout,
        } => run_wait(cli, name, *position, *timeout),
        Command::List => run_list(cli),
        Command::DeadLetters { name } => dead_letters::run_dead_letters(cli, name.as_deref()),
        Command::Retry {
            name,
            sequence,
            all,
        } => dead_letters::run_retry(cli, name, *sequence, *all),
        Command::Remove { name } => {
            let dir = open_existing_dir(cli)?;
            dir.remove(name)
                .with_context(|| format!("remove projection {name}"))
                .map_err(|e| fail(code_of_error(&e))(e))?;
            if !cli.quiet && !cli.json {
                eprintln!("removed {name}");
            }
            Ok(())
        }
        Command::Worker {
            worker_id,
            lease_ms,
            exit_when_done,
            seed_from,
        } => run_worker(
            cli,
            worker_id.as_deref(),
            *lease_ms,
            *exit_when_done,
            seed_from.as_deref(),
        ),
        Command::RemoveAll => run_remove_all(cli),
        Command::Inspect {
            config_skeleton,
            preset,
        } => run_inspect(cli, *config_skeleton, preset.as_deref()),
    }
}

/// Logs go to stderr through `tracing`. Only long-running commands (`follow`,
/// `worker`) log; the others report on their own. On a terminal, where
/// progress lines are drawn, only warnings and errors are logged by default.
fn init_logs(cli: &Cli) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let default = match (cli.quiet, cli.verbose, std::io::stderr().is_terminal()) {
        (true, _, _) => "error",
        (false, 0, true) => "warn",
        (false, 0, false) => "info",
        (false, 1, _) => "debug",
        (false, _, _) => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match cli.log_format {
        args::LogFormat::Json => logs.json().try_init(),
        args::LogFormat::Text => logs.try_init(),
    };
}

/// `wait`: polls the projection's own checkpoint (no lock taken, nothing
/// created) until it reaches the position.
fn run_wait(
    cli: &Cli,
    name: &str,
    position: u64,
    timeout: std::time::Duration,
) -> Result<(), Failure> {
    let dir = cli
        .dir
        .clone()
        .unwrap_or_else(|| app::default_path(false, "projections"));
    match projectionist::wait_for_checkpoint(&dir, name, position, timeout) {
        Ok(checkpoint) => {
            if cli.json {
                ui::json_line(&serde_json::json!({
                    "projection": name, "position": position, "checkpoint": checkpoint,
                }));
            }
            Ok(())
        }
        Err(e @ projectionist::Error::WaitTimedOut { .. }) => {
            Err(app::fail(app::EXIT_TIMEOUT)(e.into()))
        }
        Err(e @ projectionist::Error::InvalidName { .. }) => {
            Err(app::fail(app::EXIT_CONFIG)(e.into()))
        }
        Err(e) => Err(app::fail(app::EXIT_PROJECTION)(e.into())),
    }
}
