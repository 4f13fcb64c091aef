//! The demo's deterministic orders log: customers place orders, add and remove
//! items, and orders are shipped or cancelled, with many streams interleaved.

use projectionist::{Appended, NewEvent, StreamAppend};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, anyhow};
use projectionist::rusqlite::{self, Connection, OpenFlags};
use projectionist::{GlobalReader, SqliteEventStore};
use projectionist_sqlview::SqlProjection;

use crate::app::{
    DEMO_CONFIG, DEMO_CONFIG_FILE, EXIT_CONFIG, EXIT_PROJECTION, EXIT_STORE, Failure, command_hint,
    fail, load_config, open_dir, store_spec,
};
use crate::args::Cli;
use crate::replay::replay;
use crate::store::Store;
use crate::ui::{self, out};

/// Customers in the demo domain.
const CUSTOMERS: u64 = 10_000;
/// Orders open at once; bounds the generator's memory.
const OPEN_ORDERS_MAX: usize = 5_000;
/// Events per append transaction while generating.
const EVENTS_PER_APPEND: u64 = 10_000;

struct Order {
    id: String,
    customer_id: String,
    version: u64,
    /// (sku, unit price, quantity) per line.
    lines: Vec<(u32, i64, i64)>,
}

/// Appends `n_events` events generated from `seed` through `append_batch`;
/// calls `progress` with the number written after every append.
///
/// # Errors
/// Store errors.
pub fn generate(
    append_batch: &dyn Fn(&[StreamAppend<'_>]) -> projectionist::Result<Vec<Appended>>,
    n_events: u64,
    seed: u64,
    progress: &dyn Fn(u64),
) -> projectionist::Result<()> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut open: Vec<Order> = Vec::new();
    let mut next_order = 0u64;
    let mut written = 0;
    while written < n_events {
        let chunk = (n_events - written).min(EVENTS_PER_APPEND);
        let mut steps: Vec<(String, u64, [NewEvent; 1])> = Vec::with_capacity(chunk as usize);
        for _ in 0..chunk {
            let (stream, expected, event) = step(&mut rng, &mut open, &mut next_order)?;
            steps.push((stream, expected, [event]));
        }
        let appends: Vec<StreamAppend<'_>> = steps
            .iter()
            .map(|(stream_id, expected_version, events)| StreamAppend {
                stream_id,
                expected_version: *expected_version,
                events,
            })
            .collect();
        append_batch(&appends)?;
        written += chunk;
        progress(written);
    }
    Ok(())
}

/// One event: a new order, or the next step of an open one.
fn step(
    rng: &mut fastrand::Rng,
    open: &mut Vec<Order>,
    next_order: &mut u64,
) -> projectionist::Result<(String, u64, NewEvent)> {
    if open.len() < 50 || (open.len() < OPEN_ORDERS_MAX && rng.u8(0..100) < 22) {
        *next_order += 1;
        let order = Order {
            id: format!("order-{:08}", *next_order),
            customer_id: format!("cust-{:05}", rng.u64(1..=CUSTOMERS)),
            version: 1,
            lines: Vec::new(),
        };
        let event = NewEvent::json(
            "OrderPlaced",
            &serde_json::json!({"order_id": order.id, "customer_id": order.customer_id}),
        )?;
        let stream = order.id.clone();
        open.push(order);
        return Ok((stream, 0, event));
    }
    let idx = rng.usize(0..open.len());
    let roll = rng.u8(0..100);
    let order = &mut open[idx];
    let base = serde_json::json!({"order_id": order.id, "customer_id": order.customer_id});
    let with = |mut value: serde_json::Value, extra: serde_json::Value| {
        value
            .as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        value
    };
    let expected = order.version;
    order.version += 1;
    let stream = order.id.clone();
    let has_items = order.lines.iter().any(|l| l.2 > 0);
    let event = if roll < 62 || !has_items {
        let (sku, price, qty) = (rng.u32(1..2_000), rng.i64(100..20_000), rng.i64(1..=5));
        order.lines.push((sku, price, qty));
        NewEvent::json(
            "ItemAdded",
            &with(
                base,
                serde_json::json!({"sku": format!("sku-{sku}"), "qty": qty, "unit_price_cents": price}),
            ),
        )?
    } else if roll < 72 {
        let line = order.lines.iter_mut().find(|l| l.2 > 0).expect("has items");
        line.2 -= 1;
        let (sku, price) = (line.0, line.1);
        NewEvent::json(
            "ItemRemoved",
            &with(
                base,
                serde_json::json!({"sku": format!("sku-{sku}"), "qty": 1, "unit_price_cents": price}),
            ),
        )?
    } else {
        let event_type = if roll < 92 {
            "OrderShipped"
        } else {
            "OrderCancelled"
        };
        open.swap_remove(idx);
        NewEvent::json(event_type, &base)?
    };
    Ok((stream, expected, event))
}

// The `demo` command: the sample store (never replacing a log it did not
// make), its config for the commands that follow, and a rebuild.

pub(crate) fn run_demo(cli: &Cli, n_events: u64, seed: u64) -> Result<(), Failure> {
    let config = load_config(cli, true)?;
    let spec = store_spec(cli, true);
    let store = open_demo_store(&spec)?;
    let generating = Instant::now();
    let bar = ui::generation_bar(cli.json || cli.quiet, n_events);
    generate(
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
    let plan = crate::replay::Plan::Rebuild {
        in_place: false,
        keep_previous: true,
        force: false,
    };
    let results = replay(cli, store.reader(), &dir, &selected, plan, &hint)?;
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
    if crate::app::program_name() != "projectionist" {
        out!("(to run it as `projectionist`: cargo install --path crates/projectionist-cli)");
    }
    Ok(())
}

/// Leaves the demo's config at [`DEMO_CONFIG_FILE`] for the commands that
/// follow; a file the user changed there is kept.
pub(crate) fn write_demo_config() -> Result<(), Failure> {
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
pub(crate) fn open_demo_store(spec: &str) -> Result<Store, Failure> {
    Store::refuse_other_urls(spec).map_err(fail(EXIT_STORE))?;
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
    let store = SqliteEventStore::create(&path)
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
pub(crate) const DEMO_MARK_TABLE: &str = "_projectionist_demo";

pub(crate) const DEMO_MARK_SQL: &str =
    "CREATE TABLE IF NOT EXISTS _projectionist_demo (made_by TEXT)";

/// An existing file may be replaced by the demo only when the demo made it (or
/// it is empty); anything else is refused, naming the file and what to do.
pub(crate) fn check_replaceable_demo_store(path: &Path, spec: &str) -> Result<(), Failure> {
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
