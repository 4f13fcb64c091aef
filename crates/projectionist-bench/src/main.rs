//! `projectionist-bench`: the benchmarks of BENCHMARKS.md, out of the user's
//! binary. `rebuild` measures rebuild throughput against hand-written rusqlite
//! programs, `follow` measures the real `projectionist follow` from outside (a
//! child process of the `projectionist` binary built beside this one), and
//! `publish` measures publishing a shadow.

mod common;
mod follow;
mod many;
mod publish;
mod rebuild;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::{Parser, Subcommand};

use rebuild::{VARIANTS, Workload};

/// The benchmarks of projectionist (see BENCHMARKS.md).
#[derive(Parser, Debug)]
#[command(name = "projectionist-bench", version)]
struct Cli {
    /// The `projectionist` binary the follow benchmarks run [default: the one
    /// beside this binary].
    #[arg(long, global = true)]
    projectionist: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure rebuild throughput against a hand-written rusqlite loop (see BENCHMARKS.md).
    Rebuild {
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
        #[arg(long, value_delimiter = ',', default_values_t = VARIANTS.map(String::from))]
        variants: Vec<String>,
        /// The log and projections: `cold` (the demo's orders, a large orders
        /// table updated at random pages) or `hot` (10,000 long orders, about
        /// 1,000 open at a time: small projection files that stay in the page
        /// cache, so the engine's own cost shows).
        #[arg(long, value_enum, default_value = "cold")]
        workload: Workload,
    },
    /// Measure `follow` from outside: catch-up, idle CPU, event-to-reader
    /// latency, sustained appends, shutdown (see BENCHMARKS.md).
    Follow {
        /// Events in the log before the follower starts.
        #[arg(long, default_value_t = 100_000)]
        events: u64,
        /// Appends per second in the latency phase, one event per transaction.
        #[arg(long, default_value_t = 500)]
        rate: u32,
        /// Seconds of the latency phase.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Seconds of the idle phase (CPU of a follower with nothing to do).
        #[arg(long, default_value_t = 3)]
        idle_seconds: u64,
        /// Events per second in the sustained phase (batched appends); 0 skips it.
        #[arg(long, default_value_t = 20_000)]
        sustained_rate: u32,
        /// Seconds of the sustained phase.
        #[arg(long, default_value_t = 60)]
        sustained_seconds: u64,
        /// Where logs and projection files go.
        #[arg(long, default_value = "target/bench")]
        work: PathBuf,
        /// Seed of the initial log.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Also measure against this PostgreSQL server (the log is copied into
        /// schemas of its own).
        #[arg(long)]
        pg_url: Option<String>,
        /// Instead of the phases above, measure one follower keeping this many
        /// small declarative projections current (threads, file descriptors,
        /// memory, latency to the last one).
        #[arg(long, default_value_t = 0)]
        many: u32,
    },
    /// Measure publishing a shadow: time, write-lock hold and extra disk by
    /// projection size, with a reader polling the live file (see BENCHMARKS.md).
    Publish {
        /// Projection sizes in MiB, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [10u64, 100])]
        sizes: Vec<u64>,
        /// Runs per size (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Where the projection files go.
        #[arg(long, default_value = "target/bench")]
        work: PathBuf,
    },
    /// One benchmark run in a child process (internal).
    #[command(hide = true)]
    Run {
        #[arg(long)]
        variant: String,
        #[arg(long, value_enum, default_value = "cold")]
        workload: Workload,
        #[arg(long)]
        bench_store: PathBuf,
        #[arg(long)]
        bench_dir: PathBuf,
        /// Read the log from `stored_events(id, originator, position, topic,
        /// state)`, another program's layout (variants a1, a2, c and d).
        #[arg(long)]
        foreign_table: bool,
    },
    /// Print the declarative variant's config, for runs of `projectionist`
    /// itself (internal).
    #[command(hide = true)]
    Config {
        #[arg(long, value_enum, default_value = "cold")]
        workload: Workload,
        /// With a `[source]` reading `stored_events` (see `run`).
        #[arg(long)]
        foreign_table: bool,
    },
    /// Print the digest of a run's projection files (internal).
    #[command(hide = true)]
    Digest {
        #[arg(long)]
        bench_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(path) = &cli.projectionist {
        // Read by `projectionist_binary`; set before any thread starts.
        common::PROJECTIONIST.set(path.clone()).expect("set once");
    }
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Rebuild {
            events,
            huge,
            runs,
            work,
            seed,
            variants,
            pg_url,
            workload,
        } => {
            let mut sizes = events.clone();
            if *huge && !sizes.contains(&10_000_000) {
                sizes.push(10_000_000);
            }
            if *runs == 0 {
                bail!("--runs must be at least 1");
            }
            if let Some(unknown) = variants.iter().find(|v| !VARIANTS.contains(&v.as_str())) {
                bail!(
                    "unknown bench variant {unknown:?} (known: {})",
                    VARIANTS.join(", ")
                );
            }
            let plan = rebuild::Plan {
                sizes: &sizes,
                runs: *runs,
                work,
                seed: *seed,
                variants,
                pg_url: pg_url.as_deref(),
                workload: *workload,
            };
            rebuild::run_parent(&plan)
        }
        Command::Follow {
            events,
            rate,
            seconds,
            idle_seconds,
            sustained_rate,
            sustained_seconds,
            work,
            seed,
            pg_url,
            many,
        } => {
            if *rate == 0 || *seconds == 0 {
                bail!("--rate and --seconds must be at least 1");
            }
            let bench = follow::FollowBench {
                events: *events,
                rate: *rate,
                seconds: *seconds,
                idle_seconds: *idle_seconds,
                sustained_rate: *sustained_rate,
                sustained_seconds: *sustained_seconds,
                work: work.clone(),
                seed: *seed,
                pg_url: pg_url.clone(),
            };
            if *many > 0 {
                many::run(&bench, *many)
            } else {
                follow::run(&bench)
            }
        }
        Command::Publish { sizes, runs, work } => publish::run(sizes, *runs, work),
        Command::Run {
            variant,
            workload,
            bench_store,
            bench_dir,
            foreign_table,
        } => rebuild::run_child(
            variant,
            *workload,
            bench_store,
            rebuild::Layout::from_flag(*foreign_table),
            bench_dir,
        ),
        Command::Config {
            workload,
            foreign_table,
        } => {
            common::out!(
                "{}",
                rebuild::d_config(*workload, rebuild::Layout::from_flag(*foreign_table))
            );
            Ok(())
        }
        Command::Digest { bench_dir } => {
            common::out!("{}", rebuild::digest(bench_dir)?);
            Ok(())
        }
    }
}
