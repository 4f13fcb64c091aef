//! `projectionist`: rebuild, resume, inspect and manage projections from the
//! command line, declared in a TOML config (see `examples/orders/projections.toml`).
//!
//! Exit codes: 0 success; 2 usage or config error; 3 event store error;
//! 4 a projection failed; 130 interrupted (Ctrl-C), resumable.

/// `println!` that treats a closed pipe (`status | head -1`) as the reader
/// having what it wanted: the line is dropped instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::ui::out_line(&format!($($arg)*))
    };
}

mod bench;
mod demo;
mod store;
mod ui;
mod worker;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand};
use projectionist::rusqlite::{self, Connection, OpenFlags};
use projectionist::{
    CancelToken, CheckpointLocation, Error, FileKind, GlobalReader, ProjectionDb, ProjectionDir,
    ProjectionTarget, RebuildOptions, RebuildResult, SqliteCheckpoint, SqliteEventStore, Start,
    classify_file, last_run, replay_shared,
};
use projectionist_sqlview::{ProjectionsConfig, SqlHandler, SqlProjection, stored_definition};
use store::Store;

/// The sample config the demo uses when no `--config` is given.
const DEMO_CONFIG: &str = include_str!("demo_projections.toml");

/// Exit code: usage or config error.
const EXIT_CONFIG: u8 = 2;
/// Exit code: the event store could not be opened or read.
const EXIT_STORE: u8 = 3;
/// Exit code: at least one projection failed.
const EXIT_PROJECTION: u8 = 4;
/// Exit code: interrupted by Ctrl-C at a batch boundary.
const EXIT_CANCELLED: u8 = 130;

#[derive(Parser)]
#[command(
    name = "projectionist",
    version,
    about = "Rebuild and manage the projections of an event-sourced system"
)]
struct Cli {
    /// Event store: an SQLite file, or a PostgreSQL URL (postgres://...)
    /// [default: events.db; demo: demo/events.db].
    #[arg(long, global = true)]
    store: Option<String>,
    /// Directory of projection files [default: projections; demo: demo/projections].
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    /// Projections config (TOML) [default: projectionist.toml; demo: the built-in orders config].
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Events per batch (one transaction each), 1 to 50000.
    #[arg(long, global = true, default_value_t = projectionist::limits::BATCH_SIZE_DEFAULT)]
    batch_size: u32,
    /// Machine-readable JSON lines on stdout instead of text and progress bars.
    #[arg(long, global = true)]
    json: bool,
    /// No progress bars and no summary; errors only.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a deterministic orders log and rebuild the sample projections.
    Demo {
        /// Events to generate.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Seed of the generator.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Rebuild projections from scratch (all in the config by default), reading the log once.
    Rebuild {
        /// Projections to rebuild.
        names: Vec<String>,
    },
    /// Continue projections from their checkpoints; a stale projection is rebuilt.
    Resume {
        /// Projections to resume.
        names: Vec<String>,
    },
    /// State, checkpoint, log head, lag, definition version and size per projection;
    /// exits 4 when a projection is failed, corrupt, ahead of the store or not a projection.
    Status {
        /// Also run SQLite's `PRAGMA quick_check` on every projection file (reads
        /// each file whole).
        #[arg(long)]
        check: bool,
    },
    /// Names of the projection files in the directory.
    List,
    /// Delete one projection file (data and checkpoint).
    Remove {
        /// The projection.
        name: String,
    },
    /// Delete every projection file in the directory.
    RemoveAll,
    /// Share the projections of a PostgreSQL store with other workers (leases with fencing).
    Worker {
        /// This worker's name, unique among the workers [default: host-pid].
        #[arg(long)]
        worker_id: Option<String>,
        /// How long a claimed projection stays this worker's without a commit, in milliseconds.
        #[arg(long, default_value_t = 5_000)]
        lease_ms: u64,
        /// Exit once every projection of the config is done.
        #[arg(long)]
        exit_when_done: bool,
    },
    /// Measure rebuild throughput against a hand-written rusqlite loop (see BENCHMARKS.md).
    Bench {
        /// Log sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [100_000u64, 1_000_000])]
        events: Vec<u64>,
        /// Also measure 10,000,000 events.
        #[arg(long)]
        huge: bool,
        /// Runs per variant (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Where logs and projection files go.
        #[arg(long, default_value = "target/bench")]
        work: PathBuf,
        /// Seed of the generated log.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Also rebuild from PostgreSQL (variant c-pg) on this server; the log is
        /// copied into a schema of its own.
        #[arg(long)]
        pg_url: Option<String>,
        /// Variants to run, comma-separated; the first one's digest is the reference.
        #[arg(long, value_delimiter = ',', default_values_t = bench::VARIANTS.map(String::from))]
        variants: Vec<String>,
    },
    /// One benchmark run in a child process (internal).
    #[command(hide = true)]
    BenchRun {
        #[arg(long)]
        variant: String,
        #[arg(long)]
        bench_store: PathBuf,
        #[arg(long)]
        bench_dir: PathBuf,
    },
}

/// A failure, with the exit code it maps to.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

fn fail(code: u8) -> impl FnOnce(anyhow::Error) -> Failure {
    move |error| Failure { code, error }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    if cli.batch_size == 0 || cli.batch_size > projectionist::limits::BATCH_SIZE_MAX {
        return Err(fail(EXIT_CONFIG)(anyhow!(
            "--batch-size {} is out of range: 1 to {}",
            cli.batch_size,
            projectionist::limits::BATCH_SIZE_MAX
        )));
    }
    match &cli.command {
        Command::Demo { events, seed } => run_demo(cli, *events, *seed),
        Command::Rebuild { names } => run_replay(cli, names, false).map(|_| ()),
        Command::Resume { names } => run_replay(cli, names, true).map(|_| ()),
        Command::Status { check } => run_status(cli, *check),
        Command::List => run_list(cli),
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
        Command::Bench {
            events,
            huge,
            runs,
            work,
            seed,
            variants,
            pg_url,
        } => {
            let mut sizes = events.clone();
            if *huge && !sizes.contains(&10_000_000) {
                sizes.push(10_000_000);
            }
            if *runs == 0 {
                return Err(fail(EXIT_CONFIG)(anyhow!("--runs must be at least 1")));
            }
            if let Some(unknown) = variants
                .iter()
                .find(|v| !bench::VARIANTS.contains(&v.as_str()))
            {
                return Err(fail(EXIT_CONFIG)(anyhow!(
                    "unknown bench variant {unknown:?} (known: {})",
                    bench::VARIANTS.join(", ")
                )));
            }
            bench::run_parent(&sizes, *runs, work, *seed, variants, pg_url.as_deref())
                .map_err(fail(EXIT_PROJECTION))
        }
        Command::BenchRun {
            variant,
            bench_store,
            bench_dir,
        } => bench::run_child(variant, bench_store, bench_dir).map_err(fail(EXIT_PROJECTION)),
        Command::Worker {
            worker_id,
            lease_ms,
            exit_when_done,
        } => run_worker(cli, worker_id.as_deref(), *lease_ms, *exit_when_done),
        Command::RemoveAll => run_remove_all(cli),
    }
}

/// `list`: the projections of the directory; other `*.db` files are named on
/// stderr as left alone.
fn run_list(cli: &Cli) -> Result<(), Failure> {
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
fn run_remove_all(cli: &Cli) -> Result<(), Failure> {
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

/// Opens `--dir`, which must exist (for commands that only look or remove).
fn open_existing_dir(cli: &Cli) -> Result<ProjectionDir, Failure> {
    let path = cli
        .dir
        .clone()
        .unwrap_or_else(|| default_path(false, "projections"));
    ProjectionDir::open_existing(&path)
        .with_context(|| format!("projection directory {}", path.display()))
        .map_err(fail(EXIT_CONFIG))
}

/// The error and its causes, each once: library errors already quote their
/// source in their own message, so a cause already shown is skipped.
fn error_text(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

fn code_of_error(error: &anyhow::Error) -> u8 {
    match error.downcast_ref::<Error>() {
        Some(Error::InvalidName { .. } | Error::NoSuchProjection { .. }) => EXIT_CONFIG,
        _ => EXIT_PROJECTION,
    }
}

fn open_dir(cli: &Cli, demo: bool) -> Result<ProjectionDir, Failure> {
    let path = cli
        .dir
        .clone()
        .unwrap_or_else(|| default_path(demo, "projections"));
    ProjectionDir::open(&path).map_err(|e| fail(EXIT_PROJECTION)(e.into()))
}

fn default_path(demo: bool, name: &str) -> PathBuf {
    match (demo, name) {
        (true, "events") => PathBuf::from("demo/events.db"),
        (true, _) => PathBuf::from("demo/projections"),
        (false, "events") => PathBuf::from("events.db"),
        (false, _) => PathBuf::from("projections"),
    }
}

fn load_config(cli: &Cli, demo: bool) -> Result<ProjectionsConfig, Failure> {
    let loaded = match (&cli.config, demo) {
        (Some(path), _) => ProjectionsConfig::load(path),
        (None, true) => ProjectionsConfig::parse(DEMO_CONFIG, "examples/orders/projections.toml"),
        (None, false) => ProjectionsConfig::load(Path::new("projectionist.toml")),
    };
    loaded.map_err(|e| fail(EXIT_CONFIG)(e.into()))
}

/// Opens the existing event store named by `--store`.
fn open_store(cli: &Cli, demo: bool) -> Result<Store, Failure> {
    Store::open_existing(&store_spec(cli, demo)).map_err(fail(EXIT_STORE))
}

/// `--store`, or the default file.
fn store_spec(cli: &Cli, demo: bool) -> String {
    cli.store
        .clone()
        .unwrap_or_else(|| default_path(demo, "events").display().to_string())
}

/// Which projections of the config to run: the named ones, or all.
fn select<'c>(
    config: &'c ProjectionsConfig,
    names: &[String],
) -> Result<Vec<&'c SqlProjection>, Failure> {
    if names.is_empty() {
        return Ok(config.projections.iter().collect());
    }
    // A name given twice means the same projection: run it once.
    let mut unique: Vec<&String> = Vec::with_capacity(names.len());
    for name in names {
        if !unique.contains(&name) {
            unique.push(name);
        }
    }
    unique
        .into_iter()
        .map(|name| {
            config.get(name).ok_or_else(|| {
                let known: Vec<&str> = config.projections.iter().map(|p| p.name.as_str()).collect();
                fail(EXIT_CONFIG)(anyhow!(
                    "no projection {name:?} in the config (it has: {})",
                    known.join(", ")
                ))
            })
        })
        .collect()
}

fn run_replay(cli: &Cli, names: &[String], resume: bool) -> Result<Vec<RebuildResult>, Failure> {
    let config = load_config(cli, false)?;
    let selected = select(&config, names)?;
    let store = open_store(cli, false)?;
    let dir = open_dir(cli, false)?;
    let hint = command_hint(cli, false, "resume");
    replay(cli, store.reader(), &dir, &selected, resume, &hint)
}

/// The command that continues where this one stopped, with the user's own
/// `--store`, `--dir` and `--config` (or the demo's).
fn command_hint(cli: &Cli, demo: bool, command: &str) -> String {
    let config = match (&cli.config, demo) {
        (Some(path), _) => path.display().to_string(),
        (None, true) => DEMO_CONFIG_FILE.to_owned(),
        (None, false) => "projectionist.toml".to_owned(),
    };
    let dir = cli
        .dir
        .clone()
        .unwrap_or_else(|| default_path(demo, "projections"));
    let quote = |text: &str| {
        if text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:@=".contains(c))
        {
            text.to_owned()
        } else {
            format!("'{}'", text.replace('\'', "'\\''"))
        }
    };
    format!(
        "projectionist --store {} --dir {} --config {} {command}",
        quote(&store_spec(cli, demo)),
        quote(&dir.display().to_string()),
        quote(&config)
    )
}

/// Where the demo leaves its config, so the commands it suggests find it.
const DEMO_CONFIG_FILE: &str = "demo/projectionist.toml";

/// Rebuilds (or resumes) the selected projections with one shared read per group,
/// showing progress; maps failures to exit codes.
fn replay(
    cli: &Cli,
    store: &dyn GlobalReader<serde_json::Value>,
    dir: &ProjectionDir,
    selected: &[&SqlProjection],
    resume: bool,
    hint: &str,
) -> Result<Vec<RebuildResult>, Failure> {
    // A projection that cannot be opened fails alone; the others run.
    let mut open_errors = Vec::new();
    let mut opened: Vec<(&SqlProjection, Arc<ProjectionDb>)> = Vec::new();
    for projection in selected {
        match open_for_run(cli, dir, projection) {
            Ok(db) => opened.push((projection, db)),
            Err(e) => open_errors.push(e),
        }
    }
    let selected: Vec<&SqlProjection> = opened.iter().map(|(p, _)| *p).collect();
    let dbs: Vec<Arc<ProjectionDb>> = opened.iter().map(|(_, db)| Arc::clone(db)).collect();
    // A projection built from another definition cannot be resumed: rebuild it.
    let stale: Vec<bool> = dbs
        .iter()
        .zip(&selected)
        .map(|(db, projection)| {
            let stored = db.with_connection(|conn| Ok(stored_definition(conn).ok().flatten()));
            !resume
                || stored
                    .ok()
                    .flatten()
                    .is_some_and(|s| s.hash != projection.hash)
        })
        .collect();
    let cancel = CancelToken::new();
    let handler_token = cancel.clone();
    // Ignore a failure to install the handler (e.g. one already installed in tests).
    let _ = ctrlc::set_handler(move || handler_token.cancel());
    let head = store.head().map_err(|e| fail(EXIT_STORE)(e.into()))?;
    let display = ui::Display::new(
        cli.json,
        cli.quiet,
        selected.iter().map(|p| p.name.as_str()),
        head,
    );
    let progress = |p: &projectionist::Progress| display.progress(p);
    let options = RebuildOptions {
        batch_size: cli.batch_size,
        commit_interval: projectionist::limits::COMMIT_INTERVAL_DEFAULT,
        progress: Some(&progress),
        cancel: Some(&cancel),
        step_hook: None,
        commit_guard: None,
    };
    let mut handlers: Vec<SqlHandler<'_>> = selected.iter().map(|p| SqlHandler::new(p)).collect();
    // One read of the log for all: stale projections start from scratch, the
    // others from their checkpoints.
    let targets: Vec<(ProjectionTarget<'_, serde_json::Value>, Start)> = handlers
        .iter_mut()
        .zip(&dbs)
        .zip(&selected)
        .zip(&stale)
        .map(|(((handler, db), projection), stale)| {
            let target = ProjectionTarget {
                db,
                handler: handler as &mut dyn projectionist::Handler<serde_json::Value>,
                checkpoint: CheckpointLocation::InFile,
                consumer_id: projection.name.as_str(),
            };
            (target, if *stale { Start::Reset } else { Start::Resume })
        })
        .collect();
    let started = Instant::now();
    let results = replay_shared(store, targets, &options);
    display.finish();
    report(
        cli,
        &results,
        &open_errors,
        started.elapsed().as_secs_f64(),
        hint,
    )
}

/// Opens a projection for a run. A corrupt file (SQLite cannot read it, or
/// `PRAGMA quick_check` fails) is derived data: it is moved aside, named in a
/// warning, and the projection starts afresh; nothing is deleted.
fn open_for_run(
    cli: &Cli,
    dir: &ProjectionDir,
    projection: &SqlProjection,
) -> anyhow::Result<Arc<ProjectionDb>> {
    let name = projection.name.as_str();
    let context = || format!("open projection {name}");
    let corrupt = match dir.db(name) {
        Ok(db) => match quick_check(&db) {
            Ok(None) => return Ok(db),
            Ok(Some(problem)) => problem,
            Err(e) => return Err(e).with_context(context),
        },
        Err(Error::CorruptProjection { reason, .. }) => reason,
        Err(Error::NotAProjection { reason, .. }) if reason.starts_with("not an SQLite") => reason,
        Err(e) => return Err(e).with_context(context),
    };
    let moved = dir.move_aside_corrupt(name).with_context(context)?;
    if !cli.quiet {
        eprintln!(
            "warning: projection {name} was corrupt ({}); moved it to {} and rebuilding it",
            ui::escape_controls(&corrupt),
            moved.display()
        );
    }
    dir.db(name).with_context(context)
}

/// `PRAGMA quick_check` of a projection file: `None` when it is sound. Reads
/// the whole file, so it runs only for files that exist and hold data.
fn quick_check(db: &ProjectionDb) -> projectionist::Result<Option<String>> {
    db.with_connection(|conn| {
        let result: rusqlite::Result<String> =
            conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0));
        match result {
            Ok(text) if text == "ok" => Ok(None),
            Ok(text) => Ok(Some(text)),
            Err(e) if is_corruption(&e) => Ok(Some(e.to_string())),
            Err(e) => Err(Error::Sqlite {
                step: format!("check projection {}", db.name()),
                source: e,
            }),
        }
    })
}

/// Prints each projection's outcome and picks the exit code.
fn report(
    cli: &Cli,
    results: &[projectionist::Result<RebuildResult>],
    open_errors: &[anyhow::Error],
    seconds: f64,
    hint: &str,
) -> Result<Vec<RebuildResult>, Failure> {
    let mut ok = Vec::new();
    let mut cancelled = false;
    let mut failed: Vec<String> = open_errors.iter().map(error_text).collect();
    for result in results {
        match result {
            Ok(r) => {
                ui::result_line(cli.json, cli.quiet, r);
                ok.push(r.clone());
            }
            Err(Error::Cancelled { .. }) => cancelled = true,
            Err(e) => {
                if cli.json {
                    ui::json_line(&ui::error_json(e));
                }
                failed.push(ui::escape_controls(&e.to_string()));
            }
        }
    }
    if !failed.is_empty() {
        return Err(fail(EXIT_PROJECTION)(anyhow!("{}", failed.join("\n"))));
    }
    if cancelled {
        let committed: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(|e| e.to_string())
            .collect();
        return Err(fail(EXIT_CANCELLED)(anyhow!(
            "interrupted at a batch boundary after {seconds:.1}s; nothing half-applied.\n{}\nto continue from the checkpoints, run: {hint}",
            committed.join("\n")
        )));
    }
    Ok(ok)
}

fn run_demo(cli: &Cli, n_events: u64, seed: u64) -> Result<(), Failure> {
    let config = load_config(cli, true)?;
    let spec = store_spec(cli, true);
    let store = open_demo_store(&spec)?;
    let generating = Instant::now();
    let bar = ui::generation_bar(cli.json || cli.quiet, n_events);
    demo::generate(
        &|appends| store.append_batch(appends),
        n_events,
        seed,
        &|written| {
            bar.set_position(written);
        },
    )
    .context("generate the demo log")
    .map_err(fail(EXIT_STORE))?;
    bar.finish_and_clear();
    if !cli.quiet && !cli.json {
        eprintln!(
            "generated {n_events} events in {:.1}s into {}",
            generating.elapsed().as_secs_f64(),
            spec
        );
    }
    let dir = open_dir(cli, true)?;
    dir.remove_all()
        .map_err(|e| fail(EXIT_PROJECTION)(e.into()))?;
    if cli.config.is_none() {
        write_demo_config()?;
    }
    let selected: Vec<&SqlProjection> = config.projections.iter().collect();
    let started = Instant::now();
    let hint = command_hint(cli, true, "resume");
    let results = replay(cli, store.reader(), &dir, &selected, false, &hint)?;
    let seconds = started.elapsed().as_secs_f64();
    if cli.quiet {
        return Ok(());
    }
    let rate = n_events as f64 / seconds.max(1e-9);
    if cli.json {
        ui::json_line(
            &serde_json::json!({"event": "summary", "events": n_events, "projections": results.len(), "seconds": seconds, "events_per_second": rate}),
        );
        return Ok(());
    }
    out!(
        "\nrebuilt {} projections over {n_events} events in {seconds:.2}s ({rate:.0} events/s)",
        results.len()
    );
    for projection in &selected {
        let db = dir
            .db(projection.name.as_str())
            .map_err(|e| fail(EXIT_PROJECTION)(e.into()))?;
        let conn = db
            .open_reader()
            .map_err(|e| fail(EXIT_PROJECTION)(e.into()))?;
        ui::sample_rows(&conn, projection.name.as_str()).map_err(fail(EXIT_PROJECTION))?;
    }
    out!("\nnext, for example: {}", command_hint(cli, true, "status"));
    Ok(())
}

/// Leaves the demo's config at [`DEMO_CONFIG_FILE`] for the commands that
/// follow; a file the user changed there is kept.
fn write_demo_config() -> Result<(), Failure> {
    let path = Path::new(DEMO_CONFIG_FILE);
    match std::fs::read_to_string(path) {
        Ok(text) if text == DEMO_CONFIG => return Ok(()),
        Ok(_) => {
            return Err(fail(EXIT_CONFIG)(anyhow!(
                "{DEMO_CONFIG_FILE} exists and differs from the demo's config; pass --config to use it, or move it away"
            )));
        }
        Err(_) => {}
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("create {}", parent.display()))
            .map_err(fail(EXIT_CONFIG))?;
    }
    std::fs::write(path, DEMO_CONFIG)
        .with_context(|| format!("write {DEMO_CONFIG_FILE}"))
        .map_err(fail(EXIT_CONFIG))
}

/// The demo's store, empty: an SQLite file is recreated; a PostgreSQL store gets
/// our schema and must have no events yet (the demo never deletes a server's data).
fn open_demo_store(spec: &str) -> Result<Store, Failure> {
    if Store::is_postgres(spec) {
        let store = projectionist_postgres::PostgresEventStore::connect(spec)
            .map_err(|e| fail(EXIT_STORE)(e.into()))?;
        store.init().map_err(|e| fail(EXIT_STORE)(e.into()))?;
        let head = GlobalReader::<serde_json::Value>::head(&store)
            .map_err(|e| fail(EXIT_STORE)(e.into()))?;
        if head > 0 {
            return Err(fail(EXIT_STORE)(anyhow!(
                "the demo needs an empty events table, and this PostgreSQL store holds {head} events; use a schema or database of its own"
            )));
        }
        return Ok(Store::Postgres(store));
    }
    let path = PathBuf::from(spec);
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("create {}", parent.display()))
            .map_err(fail(EXIT_STORE))?;
    }
    // The demo is deterministic and starts from an empty log, but it never
    // replaces a log it did not make: only a file carrying its mark is replaced.
    if path.exists() {
        check_replaceable_demo_store(&path, spec)?;
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.clone().into_os_string();
            file.push(suffix);
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(fail(EXIT_STORE)(anyhow!(
                        "remove old demo store {spec}: {e}"
                    )));
                }
            }
        }
    }
    let store = SqliteEventStore::open(&path)
        .with_context(|| format!("create demo store {spec}"))
        .map_err(fail(EXIT_STORE))?;
    Connection::open(&path)
        .and_then(|conn| conn.execute_batch(DEMO_MARK_SQL))
        .with_context(|| format!("mark demo store {spec}"))
        .map_err(fail(EXIT_STORE))?;
    Ok(Store::Sqlite(store))
}

/// The table that marks an event store as made by `demo`, so a later `demo` may
/// replace it (and nothing else).
const DEMO_MARK_TABLE: &str = "_projectionist_demo";
const DEMO_MARK_SQL: &str = "CREATE TABLE IF NOT EXISTS _projectionist_demo (made_by TEXT)";

/// An existing file may be replaced by the demo only when the demo made it (or
/// it is empty); anything else is refused, naming the file and what to do.
fn check_replaceable_demo_store(path: &Path, spec: &str) -> Result<(), Failure> {
    let refuse = |what: String| {
        fail(EXIT_STORE)(anyhow!(
            "{spec} already exists and {what}; the demo never replaces a log it did not make: \
             pass --store with a new file, or delete {spec} yourself if you mean to"
        ))
    };
    if path.is_dir() {
        return Err(refuse("is a directory".into()));
    }
    if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
        return Ok(());
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| refuse(format!("cannot be read ({e})")))?;
    let marked: rusqlite::Result<bool> = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE name = ?1",
        [DEMO_MARK_TABLE],
        |row| row.get(0),
    );
    match marked {
        Ok(true) => Ok(()),
        Ok(false) => {
            let events: Option<i64> = conn
                .query_row("SELECT count(*) FROM events", [], |row| row.get(0))
                .ok();
            Err(refuse(match events {
                Some(n) => format!("holds an event log of {n} events"),
                None => "is another program's database".into(),
            }))
        }
        Err(e) => Err(refuse(format!("is not an SQLite database ({e})"))),
    }
}

fn run_worker(
    cli: &Cli,
    worker_id: Option<&str>,
    lease_ms: u64,
    exit_when_done: bool,
) -> Result<(), Failure> {
    let config = load_config(cli, false)?;
    let url = store_spec(cli, false);
    worker::check_url(&url).map_err(fail(EXIT_CONFIG))?;
    if !(100..=600_000).contains(&lease_ms) {
        return Err(fail(EXIT_CONFIG)(anyhow!(
            "--lease-ms {lease_ms} is out of range: 100 to 600000"
        )));
    }
    let default_id = format!("worker-{}", std::process::id());
    let dir = open_dir(cli, false)?;
    let cancel = CancelToken::new();
    let handler_token = cancel.clone();
    let _ = ctrlc::set_handler(move || handler_token.cancel());
    let options = worker::WorkerOptions {
        url: &url,
        worker_id: worker_id.unwrap_or(&default_id),
        lease: std::time::Duration::from_millis(lease_ms),
        batch_size: cli.batch_size,
        exit_when_done,
        json: cli.json,
        quiet: cli.quiet,
    };
    worker::run(&config, &dir, &options, &cancel).map_err(fail(EXIT_PROJECTION))?;
    if cancel.is_cancelled() {
        return Err(fail(EXIT_CANCELLED)(anyhow!(
            "worker interrupted; its leases expire and other workers take over"
        )));
    }
    Ok(())
}

fn run_status(cli: &Cli, check: bool) -> Result<(), Failure> {
    let config = load_config(cli, false)?;
    let dir_path = cli
        .dir
        .clone()
        .unwrap_or_else(|| default_path(false, "projections"));
    // Without a store, status still shows the files; a store that exists but
    // cannot be read is an error.
    let spec = store_spec(cli, false);
    let head = if Store::is_postgres(&spec) || Path::new(&spec).exists() {
        let store = open_store(cli, false)?;
        Some(
            store
                .reader()
                .head()
                .map_err(|e| fail(EXIT_STORE)(e.into()))?,
        )
    } else {
        if !cli.quiet {
            eprintln!(
                "warning: event store {spec} does not exist; showing the projection files only"
            );
        }
        None
    };
    let mut names: Vec<String> = config
        .projections
        .iter()
        .map(|p| p.name.to_string())
        .collect();
    if dir_path.is_dir() {
        let dir = ProjectionDir::open(&dir_path).map_err(|e| fail(EXIT_PROJECTION)(e.into()))?;
        for name in dir.list().map_err(|e| fail(EXIT_PROJECTION)(e.into()))? {
            if !names.iter().any(|n| n == name.as_str()) {
                names.push(name.to_string());
            }
        }
    }
    let mut rows = Vec::new();
    for name in &names {
        let path = dir_path.join(format!("{name}.db"));
        rows.push(
            status_row(name, &path, config.get(name), head, check)
                .map_err(fail(EXIT_PROJECTION))?,
        );
    }
    ui::status_table(cli.json, &rows, head);
    let troubled: Vec<&str> = rows
        .iter()
        .filter(|r| STATES_FAILING_STATUS.contains(&r.state))
        .map(|r| r.name.as_str())
        .collect();
    if troubled.is_empty() {
        return Ok(());
    }
    Err(fail(EXIT_PROJECTION)(anyhow!(
        "{} need attention: {}",
        troubled.len(),
        troubled.join(", ")
    )))
}

/// States that make `status` exit with 4.
const STATES_FAILING_STATUS: [&str; 4] = ["failed", "corrupt", "ahead", "not a projection"];

/// One projection's row. States, first match wins: `not a projection`,
/// `corrupt`, `not in config`, `rebuilding`, `failed`, `interrupted`, `stale`,
/// `ahead`, `not built`, `behind`, `current`.
fn status_row(
    name: &str,
    path: &Path,
    projection: Option<&SqlProjection>,
    head: Option<u64>,
    check: bool,
) -> anyhow::Result<ui::StatusRow> {
    let mut row = ui::StatusRow {
        name: name.to_owned(),
        checkpoint: 0,
        lag: head,
        config_version: projection.map(|p| p.version),
        built_version: None,
        state: "not built",
        size: ["", "-wal"]
            .iter()
            .filter_map(|suffix| std::fs::metadata(format!("{}{suffix}", path.display())).ok())
            .map(|m| m.len())
            .sum(),
        error: None,
        last_run: None,
    };
    let troubled = |mut row: ui::StatusRow, state, reason: String| {
        row.state = state;
        row.error = Some(reason);
        Ok(row)
    };
    match classify_file(path)? {
        None | Some(FileKind::Empty) => return Ok(row),
        Some(FileKind::NotAProjection(reason)) => {
            // Where the config expects a projection, a file that is not even an
            // SQLite database is one whose header was destroyed.
            let state = if projection.is_some() && reason.starts_with("not an SQLite database") {
                "corrupt"
            } else {
                "not a projection"
            };
            return troubled(row, state, reason);
        }
        Some(FileKind::Corrupt(reason)) => return troubled(row, "corrupt", reason),
        Some(FileKind::Projection) => {}
    }
    let read = || -> rusqlite::Result<_> {
        // Read-only, without taking the lock: status works while a rebuild runs.
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let problem = if check {
            let result: String = conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0))?;
            (result != "ok").then_some(result)
        } else {
            None
        };
        let checkpoint = SqliteCheckpoint::load_in(&conn, name).unwrap_or(0);
        let stored = stored_definition(&conn)?;
        let last = last_run(&conn, name).ok().flatten();
        Ok((problem, checkpoint, stored, last))
    };
    let (problem, checkpoint, stored, last) = match read() {
        Ok(read) => read,
        Err(e) if is_corruption(&e) => return troubled(row, "corrupt", e.to_string()),
        Err(e) => {
            return Err(e).with_context(|| format!("read projection file {}", path.display()));
        }
    };
    if let Some(problem) = problem {
        return troubled(row, "corrupt", format!("quick_check: {problem}"));
    }
    row.checkpoint = checkpoint;
    row.lag = head.map(|h| h.saturating_sub(checkpoint));
    row.built_version = stored.as_ref().map(|s| s.version);
    let running = last
        .as_ref()
        .is_some_and(|l| l.state == "running" && l.pid.is_none_or(process_alive));
    let state_of_last = last.as_ref().map(|l| l.state.as_str());
    row.state = match projection {
        None => "not in config",
        Some(_) if running => "rebuilding",
        Some(_) if state_of_last == Some("failed") => "failed",
        Some(_) if matches!(state_of_last, Some("running" | "cancelled")) => "interrupted",
        Some(p) if stored.as_ref().is_some_and(|s| s.hash != p.hash) => "stale",
        Some(_) if stored.is_none() && checkpoint > 0 => "stale",
        Some(_) if head.is_some_and(|h| checkpoint > h) => "ahead",
        Some(_) if stored.is_none() => "not built",
        Some(_) if row.lag.is_some_and(|lag| lag > 0) => "behind",
        Some(_) => "current",
    };
    if row.state == "failed" {
        row.error = last.as_ref().and_then(|l| l.error.clone());
    }
    if row.state == "ahead" {
        row.error = Some(format!(
            "checkpoint {checkpoint} is beyond the store's head; built from another store?"
        ));
    }
    row.last_run = last;
    Ok(row)
}

/// Whether a SQLite error says the file is damaged or not a database.
fn is_corruption(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

/// Whether the process that recorded a run still exists (Linux: `/proc`;
/// elsewhere it is assumed to).
fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.is_dir() || proc.join(pid.to_string()).exists()
}
