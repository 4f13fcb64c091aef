//! The command line as clap reads it: global options and one subcommand each.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "projectionist",
    version,
    about = "Rebuild and manage the projections of an event-sourced system"
)]
pub(crate) struct Cli {
    /// Event store: an SQLite file, or a PostgreSQL URL (postgres://...)
    /// [default: events.db; demo: demo/events.db].
    #[arg(long, global = true)]
    pub(crate) store: Option<String>,
    /// Directory of projection files [default: projections; demo: demo/projections].
    #[arg(long, global = true)]
    pub(crate) dir: Option<PathBuf>,
    /// Projections config (TOML) [default: projectionist.toml; demo: the built-in orders config].
    #[arg(long, global = true)]
    pub(crate) config: Option<PathBuf>,
    /// Events per batch (one transaction each), up to 50000; 0 means the default.
    #[arg(long, global = true, default_value_t = projectionist::limits::BATCH_SIZE_DEFAULT)]
    pub(crate) batch_size: u32,
    /// Machine-readable JSON lines on stdout instead of text and progress bars.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// No progress bars and no summary; errors only.
    #[arg(long, short = 'q', global = true)]
    pub(crate) quiet: bool,
    /// More log detail on stderr (-v debug, -vv trace); `RUST_LOG` overrides.
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
    /// Log lines as text or as JSON objects (for log shippers).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
    ///
    /// A projection that is already built keeps serving readers while its new
    /// version is built in a shadow file beside it; the new version replaces
    /// it in one transaction when complete, and the replaced one is kept for
    /// `rollback`.
    Rebuild {
        /// Projections to rebuild.
        names: Vec<String>,
        /// Reset and replay the live file itself: readers see the projection
        /// empty and refilling until the rebuild ends (no shadow, no extra disk).
        #[arg(long, conflicts_with_all = ["verify", "no_keep_previous"])]
        in_place: bool,
        /// Do not keep the replaced version (no rollback; saves its disk space).
        #[arg(long)]
        no_keep_previous: bool,
        /// Rebuild even when the event log is empty while a selected
        /// projection is built: it is then replaced by an empty one.
        #[arg(long)]
        force: bool,
        /// Build the shadow up to the live projection's checkpoint and compare
        /// the two table by table (rows, digests, differing rows by primary
        /// key); publish nothing. Exits 1 when they differ.
        #[arg(long)]
        verify: bool,
        /// With --verify: when nothing differs, catch the shadow up and publish it.
        #[arg(long, requires = "verify")]
        publish_if_equal: bool,
    },
    /// Restore the version a rebuild replaced (kept beside the live file), in
    /// one transaction; the replaced version is kept in turn, so a second
    /// rollback undoes the first.
    Rollback {
        /// The projection.
        name: String,
    },
    /// Keep projections current: catch up, then apply new events as they are
    /// appended, until SIGINT or SIGTERM (exits 0 after committing).
    Follow {
        /// Projections to follow [default: all in the config].
        names: Vec<String>,
        /// Serve Prometheus metrics (`/metrics`) and a health check (`/health`)
        /// over HTTP on this address, e.g. 127.0.0.1:9187.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// `/health` turns unhealthy when a projection lags more than this
        /// many events behind the head (or has failed).
        #[arg(long, default_value_t = 10_000)]
        max_lag: u64,
        /// `/health` turns unhealthy when reads have been held at a PostgreSQL
        /// hole (a missing sequence number a running transaction may still
        /// fill), or the store has been reconnecting, for longer than this,
        /// e.g. `30s`, `500ms`, `2m`.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        max_wait: std::time::Duration,
        /// A projection that has not advanced for this long while the log
        /// holds events past its checkpoint (for any reason but a PostgreSQL
        /// hole, judged by `--max-wait`) is `stalled`, and `/health` fails
        /// naming it, e.g. `30s`.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        stall_after: std::time::Duration,
        /// PostgreSQL: how long a hole that reads have passed is looked at
        /// again for an event committed into it late (a writer that broke the
        /// writer contract of docs/postgres.md); `0s` turns this off.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        late_window: std::time::Duration,
        /// What to do about such a late event: `rebuild` the projections that
        /// handle its type in their shadows (published when caught up), or
        /// only `report` it (log, `--json`, metric).
        #[arg(long, value_enum, default_value_t = OnLateEvent::Rebuild)]
        on_late_event: OnLateEvent,
        /// Restore each projection missing here from the newest snapshot in
        /// this directory that fits (same definition and store, checksum
        /// verified), then catch it up, instead of replaying the whole log.
        #[arg(long, value_name = "DIR")]
        seed_from: Option<std::path::PathBuf>,
        /// Take snapshots of the followed projections into this directory
        /// every `--snapshot-every`, for `--seed-from` on other nodes.
        #[arg(long, value_name = "DIR")]
        snapshot_to: Option<std::path::PathBuf>,
        /// How often to take them, e.g. `1h`, `10m`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration, requires = "snapshot_to")]
        snapshot_every: std::time::Duration,
        /// Keep the newest N snapshots of each projection (0: all).
        #[arg(long, default_value_t = 3, requires = "snapshot_to")]
        snapshot_keep: usize,
    },
    /// Continue projections from their checkpoints; a stale projection is rebuilt.
    Resume {
        /// Projections to resume.
        names: Vec<String>,
        /// Restore each projection missing here from the newest snapshot in
        /// this directory that fits, then catch it up.
        #[arg(long, value_name = "DIR")]
        seed_from: Option<std::path::PathBuf>,
    },
    /// Copy projections, consistently at a committed checkpoint and while they
    /// are followed, into a directory with a manifest (name, definition,
    /// checkpoint, store, size, SHA-256), for `--seed-from` on another node.
    Snapshot {
        /// Projections to copy [default: all in the config].
        names: Vec<String>,
        /// The directory of snapshots (a local one or a shared mount).
        #[arg(long, value_name = "DIR")]
        to: std::path::PathBuf,
        /// Keep only the newest N snapshots of each projection there (0: all).
        #[arg(long, default_value_t = 0)]
        keep: usize,
    },
    /// Read-your-writes: wait until a projection has applied the log up to a
    /// position (e.g. the sequence an append returned); exits 0 then, 5 on
    /// timeout.
    Wait {
        /// The projection.
        name: String,
        /// The sequence to wait for.
        #[arg(long)]
        position: u64,
        /// How long to wait at most, e.g. `500ms`, `10s`.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// State, checkpoint, log head, lag, definition version and size per projection;
    /// exits 4 when a projection is failed, stalled, corrupt, ahead of the store or not a projection.
    Status {
        /// Also run SQLite's `PRAGMA quick_check` on every projection file (reads
        /// each file whole).
        #[arg(long)]
        check: bool,
    },
    /// The events projections with `on_error = "skip"` could not apply (their
    /// dead letters): sequence, type, stream, attempts, when, error.
    DeadLetters {
        /// The projection [default: every one in the directory].
        name: Option<String>,
    },
    /// Apply a projection's dead letters again, in sequence order, under the
    /// config's (fixed) definition; those that apply are removed. Exits 4
    /// when some fail again. A running follower does it on request.
    Retry {
        /// The projection.
        name: String,
        /// The sequence of the one dead letter to retry.
        #[arg(long = "seq", value_name = "N", conflicts_with = "all")]
        sequence: Option<u64>,
        /// Retry every dead letter.
        #[arg(long)]
        all: bool,
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
    /// Event types in the store with counts, sequences and the JSON fields seen
    /// (with `--config`, through its `[source]`).
    Inspect {
        /// Print a starter config instead: one statement per event type (and
        /// the `[source]` it was read through).
        #[arg(long)]
        config_skeleton: bool,
        /// Read another tool's event store laid out as that tool writes it
        /// (`eventsourcing`, `emmett`, `marten`), as `[source] preset` does.
        #[arg(long)]
        preset: Option<String>,
    },
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
        /// Restore a claimed projection that is missing here (taken over from
        /// a worker on another machine) from the newest snapshot that fits
        /// (a directory or a postgres:// URL), then catch it up.
        #[arg(long, value_name = "LOCATION")]
        seed_from: Option<std::path::PathBuf>,
    },
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// One human-readable line per log record.
    Text,
    /// One JSON object per line.
    Json,
}

/// `follow --on-late-event`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnLateEvent {
    /// Rebuild the affected projections in their shadows and publish them.
    Rebuild,
    /// Report only.
    Report,
}
