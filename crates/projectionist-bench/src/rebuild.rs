//! `projectionist bench`: rebuild throughput of projectionist against a
//! hand-written rusqlite loop, on the demo's orders log, in one run.
//!
//! Workloads (`--workload`): `cold`, the demo's orders log (many short orders:
//! a large orders table updated at random pages, so commits dominate); `hot`,
//! 10,000 long orders (10-190 events) with about 1,000 open at a time over
//! 1,000 customers, mostly `ItemAdded`: both projection files stay small and
//! in the page cache, so the engine's own per-event cost shows. On `hot` the
//! customers projection keeps a helper table of open orders, read and deleted
//! when an order ships or is cancelled.
//!
//! Variants (each run in its own child process, so peak RSS and CPU time are
//! per variant):
//! - `a1` hand-written, single-threaded, the two projections one after the other;
//! - `a2` hand-written, one reader thread fanning batches out to a writer thread per projection;
//! - `a1-50k`, `a2-50k` the same with batches of 50,000 events (a hand-writer
//!   who batches more);
//! - `b`  projectionist with Rust handlers, one projection after the other;
//! - `b1` as `b`, but committing after every batch like the hand-written loops
//!   (`commit_interval` zero): isolates the engine's overhead from commit groups;
//! - `c`  projectionist with both at once (one read, fanned out);
//! - `c-shared` as `c`, the log read as raw JSON and decoded once per batch
//!   for both handlers by a `SharedDecode` (the path of mixed payload types);
//! - `d`  the declarative config (sqlview) through the path the CLI uses.
//!
//! The child also runs `c1` (as `c`, committing after every batch like a2:
//! the engine against the hand-written fan-out with commit groups left out),
//! which `scripts/bench-user-built.sh` pairs with a2; it is not in the report.
//!
//! Every variant's tables are digested and must equal `a1`'s; a mismatch fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use crate::common::out;
use anyhow::{Context, anyhow, bail};
use clap::ValueEnum;
use projectionist::rusqlite::{Connection, Transaction, TransactionBehavior, params};
use projectionist::{
    BoxError, DigestScope, GlobalEvent, Handler, ProjectionDir, ProjectionTarget, RebuildConfig,
    RebuildOptions, SqliteEventStore, Start, projection_digest, rebuild, replay,
};
use projectionist_sqlview::{ProjectionsConfig, SqlHandler};
use serde::Deserialize;

/// The variants, in report order.
pub(crate) const VARIANTS: [&str; 9] = [
    "a1", "a2", "a1-50k", "a2-50k", "b", "b1", "c", "c-shared", "d",
];

/// The bench's workloads (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Workload {
    /// The demo's orders log.
    Cold,
    /// Long orders, few open at a time: small, hot projection files.
    Hot,
}

impl Workload {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Workload::Cold => "cold",
            Workload::Hot => "hot",
        }
    }
}

/// Events per batch in every variant, as the hand-written loop uses.
const BENCH_BATCH_SIZE: u32 = 500;
/// Batches in flight per writer in the hand-written fan-out (same as the engine's).
const BENCH_CHANNEL_BATCHES: usize = projectionist::limits::CHANNEL_BATCHES_MAX;

/// Variant (c) reading the same log from PostgreSQL; runs when `--pg-url` is given.
pub const PG_VARIANT: &str = "c-pg";

/// Events per batch of the `-50k` hand-written variants.
const BENCH_BIG_BATCH_SIZE: u32 = 50_000;

/// The payload of every orders event, decoded with serde (`hot` item events
/// carry no customer).
#[derive(Debug, Deserialize)]
pub struct OrderData {
    order_id: String,
    #[serde(default)]
    customer_id: String,
    #[serde(default)]
    qty: i64,
    #[serde(default)]
    unit_price_cents: i64,
}

const ORDERS_SCHEMA: &str = "
CREATE TABLE orders (
  order_id    TEXT PRIMARY KEY,
  customer_id TEXT NOT NULL,
  status      TEXT NOT NULL,
  item_count  INTEGER NOT NULL DEFAULT 0,
  total_cents INTEGER NOT NULL DEFAULT 0,
  updated_seq INTEGER NOT NULL
);";

/// The orders table's index for the application's queries by customer. No
/// handler statement searches through it and its keys arrive in no order, so
/// every variant builds it once the log is applied: the engine's handlers in
/// `Handler::caught_up`, the hand-written loops after their last batch.
const ORDERS_INDEXES: &str =
    "CREATE INDEX IF NOT EXISTS orders_by_customer ON orders (customer_id);";

const CUSTOMERS_SCHEMA: &str = "
CREATE TABLE customers (
  customer_id      TEXT PRIMARY KEY,
  orders_placed    INTEGER NOT NULL DEFAULT 0,
  orders_shipped   INTEGER NOT NULL DEFAULT 0,
  orders_cancelled INTEGER NOT NULL DEFAULT 0,
  items            INTEGER NOT NULL DEFAULT 0,
  spent_cents      INTEGER NOT NULL DEFAULT 0
);";

/// `hot`: besides the customers, the orders still open with what they hold so far.
const OPEN_ORDERS_SCHEMA: &str = "
CREATE TABLE open_orders (
  order_id    TEXT PRIMARY KEY,
  customer_id TEXT NOT NULL,
  items       INTEGER NOT NULL DEFAULT 0,
  cents       INTEGER NOT NULL DEFAULT 0
);";

/// `hot`, customers: the customers table and the open orders.
static HOT_CUSTOMERS_SCHEMA: LazyLock<String> =
    LazyLock::new(|| format!("{CUSTOMERS_SCHEMA}{OPEN_ORDERS_SCHEMA}"));

/// `hot`, customers: the statements per event type (ship and cancel read the
/// open order, then delete it). Positional parameters: ?1 order, ?2 customer,
/// ?3 quantity, ?4 quantity x unit price.
const HOT_CUSTOMERS_SQL: [(&str, &[&str]); 5] = [
    (
        "OrderPlaced",
        &[
            "INSERT INTO open_orders (order_id, customer_id) VALUES (?1, ?2)",
            "INSERT INTO customers (customer_id, orders_placed) VALUES (?2, 1) ON CONFLICT (customer_id) DO UPDATE SET orders_placed = orders_placed + 1",
        ],
    ),
    (
        "ItemAdded",
        &["UPDATE open_orders SET items = items + ?3, cents = cents + ?4 WHERE order_id = ?1"],
    ),
    (
        "ItemRemoved",
        &["UPDATE open_orders SET items = items - ?3, cents = cents - ?4 WHERE order_id = ?1"],
    ),
    (
        "OrderShipped",
        &[
            "UPDATE customers SET orders_shipped = customers.orders_shipped + 1, items = customers.items + o.items, spent_cents = customers.spent_cents + o.cents FROM (SELECT customer_id, items, cents FROM open_orders WHERE order_id = ?1) AS o WHERE customers.customer_id = o.customer_id",
            "DELETE FROM open_orders WHERE order_id = ?1",
        ],
    ),
    (
        "OrderCancelled",
        &[
            "UPDATE customers SET orders_cancelled = orders_cancelled + 1 WHERE customer_id = (SELECT customer_id FROM open_orders WHERE order_id = ?1)",
            "DELETE FROM open_orders WHERE order_id = ?1",
        ],
    ),
];

/// `hot`, the declarative variant (d): the same SQL as a config, over the
/// same schemas (inserted by [`hot_config`]).
const HOT_CONFIG_TEMPLATE: &str = r#"
[[projection]]
name = "order_summary"
version = 1
schema = """{ORDERS_SCHEMA}"""
deferred_indexes = "{ORDERS_INDEXES}"
[projection.on.OrderPlaced]
sql = "INSERT INTO orders (order_id, customer_id, status, updated_seq) VALUES (:order_id!text, :customer_id!text, 'open', :_sequence)"
[projection.on.ItemAdded]
sql = "UPDATE orders SET item_count = item_count + :qty!int, total_cents = total_cents + :qty!int * :unit_price_cents!int, updated_seq = :_sequence WHERE order_id = :order_id!text"
[projection.on.ItemRemoved]
sql = "UPDATE orders SET item_count = item_count - :qty!int, total_cents = total_cents - :qty!int * :unit_price_cents!int, updated_seq = :_sequence WHERE order_id = :order_id!text"
[projection.on.OrderShipped]
sql = "UPDATE orders SET status = 'shipped', updated_seq = :_sequence WHERE order_id = :order_id!text"
[projection.on.OrderCancelled]
sql = "UPDATE orders SET status = 'cancelled', updated_seq = :_sequence WHERE order_id = :order_id!text"

[[projection]]
name = "customer_stats"
version = 1
schema = """{HOT_CUSTOMERS_SCHEMA}"""
[projection.on.OrderPlaced]
sql = [
  "INSERT INTO open_orders (order_id, customer_id) VALUES (:order_id!text, :customer_id!text)",
  "INSERT INTO customers (customer_id, orders_placed) VALUES (:customer_id!text, 1) ON CONFLICT (customer_id) DO UPDATE SET orders_placed = orders_placed + 1",
]
[projection.on.ItemAdded]
sql = "UPDATE open_orders SET items = items + :qty!int, cents = cents + :qty!int * :unit_price_cents!int WHERE order_id = :order_id!text"
[projection.on.ItemRemoved]
sql = "UPDATE open_orders SET items = items - :qty!int, cents = cents - :qty!int * :unit_price_cents!int WHERE order_id = :order_id!text"
[projection.on.OrderShipped]
sql = [
  "UPDATE customers SET orders_shipped = customers.orders_shipped + 1, items = customers.items + o.items, spent_cents = customers.spent_cents + o.cents FROM (SELECT customer_id, items, cents FROM open_orders WHERE order_id = :order_id!text) AS o WHERE customers.customer_id = o.customer_id",
  "DELETE FROM open_orders WHERE order_id = :order_id!text",
]
[projection.on.OrderCancelled]
sql = [
  "UPDATE customers SET orders_cancelled = orders_cancelled + 1 WHERE customer_id = (SELECT customer_id FROM open_orders WHERE order_id = :order_id!text)",
  "DELETE FROM open_orders WHERE order_id = :order_id!text",
]
"#;

/// The hot declarative config, with the schemas the Rust variants use.
fn hot_config() -> String {
    HOT_CONFIG_TEMPLATE
        .replace("{ORDERS_SCHEMA}", ORDERS_SCHEMA)
        .replace("{ORDERS_INDEXES}", ORDERS_INDEXES)
        .replace("{HOT_CUSTOMERS_SCHEMA}", &HOT_CUSTOMERS_SCHEMA)
}

/// The `[source]` that reads [`Layout::Foreign`]'s table, as a config declares it.
const FOREIGN_SOURCE: &str = r#"[source]
table = "stored_events"
sequence = "id"
stream_id = "originator"
stream_version = "position"
event_type = "topic"
data = "state"
"#;

/// The declarative variant's config for `workload`, reading `layout` (printed
/// by `projectionist-bench config` for runs of the command line itself).
pub(crate) fn d_config(workload: Workload, layout: Layout) -> String {
    let projections = match workload {
        Workload::Cold => projectionist_demo::CONFIG.to_owned(),
        Workload::Hot => hot_config(),
    };
    match layout {
        Layout::Own => projections,
        Layout::Foreign => format!("{FOREIGN_SOURCE}\n{projections}"),
    }
}

/// The two projections, as plain Rust: shared by the hand-written loops and the
/// projectionist handlers, so both do the same SQL work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Projection {
    /// `order_summary`.
    Orders,
    /// `customer_stats`.
    Customers,
}

impl Projection {
    const ALL: [Projection; 2] = [Projection::Orders, Projection::Customers];

    fn name(self) -> &'static str {
        match self {
            Projection::Orders => "order_summary",
            Projection::Customers => "customer_stats",
        }
    }

    /// SQL run once the whole log is applied.
    fn indexes(self) -> &'static str {
        match self {
            Projection::Orders => ORDERS_INDEXES,
            Projection::Customers => "",
        }
    }

    fn schema(self, workload: Workload) -> &'static str {
        match (self, workload) {
            (Projection::Orders, _) => ORDERS_SCHEMA,
            (Projection::Customers, Workload::Cold) => CUSTOMERS_SCHEMA,
            (Projection::Customers, Workload::Hot) => HOT_CUSTOMERS_SCHEMA.as_str(),
        }
    }

    /// Applies one event with cached prepared statements.
    fn apply(
        self,
        workload: Workload,
        conn: &Connection,
        sequence: u64,
        event_type: &str,
        d: &OrderData,
    ) -> projectionist::rusqlite::Result<()> {
        let seq = sequence as i64;
        let delta = d.qty * d.unit_price_cents;
        if (self, workload) == (Projection::Customers, Workload::Hot) {
            let Some((_, statements)) = HOT_CUSTOMERS_SQL.iter().find(|(t, _)| *t == event_type)
            else {
                return Ok(());
            };
            for sql in *statements {
                let mut stmt = conn.prepare_cached(sql)?;
                let n = stmt.parameter_count();
                let values: [&dyn projectionist::rusqlite::ToSql; 4] =
                    [&d.order_id, &d.customer_id, &d.qty, &delta];
                stmt.execute(&values[..n])?;
            }
            return Ok(());
        }
        match (self, event_type) {
            (Projection::Orders, "OrderPlaced") => conn
                .prepare_cached("INSERT INTO orders (order_id, customer_id, status, updated_seq) VALUES (?1, ?2, 'open', ?3)")?
                .execute(params![d.order_id, d.customer_id, seq]),
            (Projection::Orders, "ItemAdded") => conn
                .prepare_cached("UPDATE orders SET item_count = item_count + ?2, total_cents = total_cents + ?3, updated_seq = ?4 WHERE order_id = ?1")?
                .execute(params![d.order_id, d.qty, delta, seq]),
            (Projection::Orders, "ItemRemoved") => conn
                .prepare_cached("UPDATE orders SET item_count = item_count - ?2, total_cents = total_cents - ?3, updated_seq = ?4 WHERE order_id = ?1")?
                .execute(params![d.order_id, d.qty, delta, seq]),
            (Projection::Orders, "OrderShipped") => conn
                .prepare_cached("UPDATE orders SET status = 'shipped', updated_seq = ?2 WHERE order_id = ?1")?
                .execute(params![d.order_id, seq]),
            (Projection::Orders, "OrderCancelled") => conn
                .prepare_cached("UPDATE orders SET status = 'cancelled', updated_seq = ?2 WHERE order_id = ?1")?
                .execute(params![d.order_id, seq]),
            (Projection::Customers, "OrderPlaced") => conn
                .prepare_cached("INSERT INTO customers (customer_id, orders_placed) VALUES (?1, 1) ON CONFLICT (customer_id) DO UPDATE SET orders_placed = orders_placed + 1")?
                .execute(params![d.customer_id]),
            (Projection::Customers, "ItemAdded") => conn
                .prepare_cached("UPDATE customers SET items = items + ?2, spent_cents = spent_cents + ?3 WHERE customer_id = ?1")?
                .execute(params![d.customer_id, d.qty, delta]),
            (Projection::Customers, "ItemRemoved") => conn
                .prepare_cached("UPDATE customers SET items = items - ?2, spent_cents = spent_cents - ?3 WHERE customer_id = ?1")?
                .execute(params![d.customer_id, d.qty, delta]),
            (Projection::Customers, "OrderShipped") => conn
                .prepare_cached("UPDATE customers SET orders_shipped = orders_shipped + 1 WHERE customer_id = ?1")?
                .execute(params![d.customer_id]),
            (Projection::Customers, "OrderCancelled") => conn
                .prepare_cached("UPDATE customers SET orders_cancelled = orders_cancelled + 1 WHERE customer_id = ?1")?
                .execute(params![d.customer_id]),
            _ => Ok(0),
        }
        .map(|_| ())
    }
}

/// A projectionist handler over the same Rust code.
struct RustHandler(Projection, Workload);

impl Handler<OrderData> for RustHandler {
    fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        tx.execute_batch(self.0.schema(self.1))?;
        Ok(())
    }

    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        events: &[GlobalEvent<OrderData>],
    ) -> Result<(), BoxError> {
        for e in events {
            self.0
                .apply(self.1, tx, e.sequence, &e.event_type, &e.data)?;
        }
        Ok(())
    }

    fn caught_up(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        tx.execute_batch(self.0.indexes())?;
        Ok(())
    }
}

// ------------------------------------------------------------ hand-written

/// One decoded event of the hand-written loops.
struct RawEvent {
    sequence: u64,
    event_type: String,
    data: OrderData,
}

/// Where the log is: our own `events` table, or another program's layout
/// (`stored_events(id, originator, position, topic, state)`, a copy of the
/// same events made by `scripts/bench-user-built.sh`).
#[derive(Clone, Copy)]
pub(crate) enum Layout {
    Own,
    Foreign,
}

impl Layout {
    /// `--foreign-table` given or not.
    pub(crate) fn from_flag(foreign_table: bool) -> Self {
        if foreign_table {
            Layout::Foreign
        } else {
            Layout::Own
        }
    }

    /// The hand-written loops' read of one batch.
    fn read_sql(self) -> &'static str {
        match self {
            Layout::Own => {
                "SELECT sequence, event_type, data FROM events WHERE sequence > ?1 ORDER BY sequence LIMIT ?2"
            }
            Layout::Foreign => {
                "SELECT id, topic, state FROM stored_events WHERE id > ?1 ORDER BY id LIMIT ?2"
            }
        }
    }

    /// The same table as projectionist reads it.
    fn open(self, store: &Path) -> anyhow::Result<SqliteEventStore> {
        Ok(match self {
            Layout::Own => SqliteEventStore::create(store)?,
            Layout::Foreign => SqliteEventStore::open_mapped(
                store,
                &projectionist::EventTableMapping::new("stored_events")
                    .sequence("id")
                    .stream_id("originator")
                    .stream_version("position")
                    .event_type("topic")
                    .data("state")
                    .metadata(None)
                    .recorded_at(None),
            )?,
        })
    }
}

/// Reads and decodes one batch, the way a competent hand-written loop would.
fn read_batch(
    conn: &Connection,
    layout: Layout,
    after: u64,
    size: u32,
) -> anyhow::Result<Vec<RawEvent>> {
    let mut stmt = conn.prepare_cached(layout.read_sql())?;
    let mut rows = stmt.query(params![after as i64, i64::from(size)])?;
    let mut batch = Vec::with_capacity(size as usize);
    while let Some(row) = rows.next()? {
        let data: &str = row.get_ref(2)?.as_str()?;
        batch.push(RawEvent {
            sequence: row.get::<_, i64>(0)? as u64,
            event_type: row.get(1)?,
            data: serde_json::from_str(data)?,
        });
    }
    Ok(batch)
}

/// Opens a projection file as the hand-written loop does: WAL, NORMAL, schema, checkpoint table.
fn open_projection(
    dir: &Path,
    projection: Projection,
    workload: Workload,
) -> anyhow::Result<Connection> {
    let conn = Connection::open(dir.join(format!("{}.db", projection.name())))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(projection.schema(workload))?;
    conn.execute_batch(
        "CREATE TABLE _checkpoint (consumer_id TEXT PRIMARY KEY, sequence INTEGER NOT NULL)",
    )?;
    Ok(conn)
}

/// Applies one batch in one transaction with its checkpoint row.
fn write_batch(
    conn: &mut Connection,
    projection: Projection,
    workload: Workload,
    batch: &[RawEvent],
) -> anyhow::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for e in batch {
        projection.apply(workload, &tx, e.sequence, &e.event_type, &e.data)?;
    }
    let last = batch.last().map_or(0, |e| e.sequence) as i64;
    tx.prepare_cached("INSERT INTO _checkpoint VALUES (?1, ?2) ON CONFLICT (consumer_id) DO UPDATE SET sequence = excluded.sequence")?
        .execute(params![projection.name(), last])?;
    tx.commit()?;
    Ok(())
}

fn open_events(store: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open(store)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    Ok(conn)
}

fn run_a1(
    store: &Path,
    layout: Layout,
    dir: &Path,
    workload: Workload,
    size: u32,
) -> anyhow::Result<()> {
    let events = open_events(store)?;
    for projection in Projection::ALL {
        let mut conn = open_projection(dir, projection, workload)?;
        let mut after = 0;
        loop {
            let batch = read_batch(&events, layout, after, size)?;
            let Some(last) = batch.last() else { break };
            after = last.sequence;
            write_batch(&mut conn, projection, workload, &batch)?;
            if batch.len() < size as usize {
                break;
            }
        }
        conn.execute_batch(projection.indexes())?;
    }
    Ok(())
}

fn run_a2(
    store: &Path,
    layout: Layout,
    dir: &Path,
    workload: Workload,
    size: u32,
) -> anyhow::Result<()> {
    let events = open_events(store)?;
    std::thread::scope(|scope| {
        let mut senders = Vec::new();
        let mut writers = Vec::new();
        for projection in Projection::ALL {
            let (tx, rx) = sync_channel::<Arc<Vec<RawEvent>>>(BENCH_CHANNEL_BATCHES);
            senders.push(tx);
            writers.push(scope.spawn(move || -> anyhow::Result<()> {
                let mut conn = open_projection(dir, projection, workload)?;
                for batch in rx {
                    write_batch(&mut conn, projection, workload, &batch)?;
                }
                conn.execute_batch(projection.indexes())?;
                Ok(())
            }));
        }
        let mut after = 0;
        loop {
            let batch = Arc::new(read_batch(&events, layout, after, size)?);
            let Some(last) = batch.last() else { break };
            after = last.sequence;
            let at_end = batch.len() < size as usize;
            for sender in &senders {
                sender
                    .send(Arc::clone(&batch))
                    .map_err(|_| anyhow!("writer stopped"))?;
            }
            if at_end {
                break;
            }
        }
        drop(senders);
        for writer in writers {
            writer.join().map_err(|_| anyhow!("writer panicked"))??;
        }
        Ok(())
    })
}

// ------------------------------------------------------------ projectionist

fn options() -> RebuildOptions<'static> {
    RebuildOptions::new().batch_size(BENCH_BATCH_SIZE)
}

fn run_b(
    store: &Path,
    dir: &Path,
    workload: Workload,
    options: RebuildOptions<'_>,
) -> anyhow::Result<()> {
    let store = SqliteEventStore::create(store)?;
    let dir = ProjectionDir::open(dir)?;
    for projection in Projection::ALL {
        let db = dir.db(projection.name())?;
        let mut handler = RustHandler(projection, workload);
        rebuild(RebuildConfig {
            reader: &store,
            projection: ProjectionTarget::new(&db, &mut handler).consumer_id(projection.name()),
            options,
        })?;
    }
    Ok(())
}

/// (c) with the log in PostgreSQL: `url` already names the bench schema.
fn run_c_pg(url: &str, dir: &Path, workload: Workload) -> anyhow::Result<()> {
    run_shared(
        &projectionist_postgres::PostgresEventStore::connect(url)?,
        dir,
        workload,
        &options(),
    )
}

/// Both Rust projections at once from one read of `reader`.
fn run_shared(
    reader: &dyn projectionist::GlobalReader<OrderData>,
    dir: &Path,
    workload: Workload,
    options: &RebuildOptions<'_>,
) -> anyhow::Result<()> {
    let dir = ProjectionDir::open(dir)?;
    let dbs = Projection::ALL.map(|p| dir.db(p.name()));
    let mut handlers = Projection::ALL.map(|p| RustHandler(p, workload));
    let mut targets = Vec::new();
    for ((db, handler), projection) in dbs.iter().zip(handlers.iter_mut()).zip(Projection::ALL) {
        let db = db.as_ref().map_err(|e| anyhow!("{e}"))?;
        targets.push(
            ProjectionTarget::new(db, handler as &mut dyn Handler<OrderData>)
                .consumer_id(projection.name())
                .start(Start::Reset),
        );
    }
    for result in replay(reader, targets, options) {
        result?;
    }
    Ok(())
}

/// (c) through a `SharedDecode`: the log read as raw JSON, each batch decoded
/// into the handlers' type once for both (the path of a run whose handlers
/// take different payload types).
fn run_c_shared(store: &Path, dir: &Path, workload: Workload) -> anyhow::Result<()> {
    let store = SqliteEventStore::create(store)?;
    let dir = ProjectionDir::open(dir)?;
    let dbs = Projection::ALL.map(|p| dir.db(p.name()));
    let mut handlers = Projection::ALL.map(|p| RustHandler(p, workload));
    let shared = projectionist::SharedDecode::new();
    let mut decoding: Vec<_> = handlers
        .iter_mut()
        .map(|h| shared.handler(h as &mut dyn Handler<OrderData>))
        .collect();
    let mut targets = Vec::new();
    for ((db, handler), projection) in dbs.iter().zip(decoding.iter_mut()).zip(Projection::ALL) {
        let db = db.as_ref().map_err(|e| anyhow!("{e}"))?;
        targets.push(
            ProjectionTarget::new(
                db,
                handler as &mut dyn Handler<Box<serde_json::value::RawValue>>,
            )
            .consumer_id(projection.name())
            .start(Start::Reset),
        );
    }
    for result in replay(&store, targets, &options()) {
        result?;
    }
    Ok(())
}

/// The payload type the command line decodes events into (JSON text with its
/// members indexed, bound by sqlview without building a tree).
type Payload = projectionist_sqlview::IndexedPayload;

fn run_d(store: &Path, layout: Layout, dir: &Path, workload: Workload) -> anyhow::Result<()> {
    let config = ProjectionsConfig::parse(&d_config(workload, layout), "the bench config")?;
    // Read the way the command line reads: through the config's `[source]`
    // when it has one.
    let store = match &config.source {
        Some(mapping) => {
            SqliteEventStore::open_mapped_where(store, mapping, &config.source_conditions)?
        }
        None => SqliteEventStore::create(store)?,
    };
    let dir = ProjectionDir::open(dir)?;
    let dbs = config
        .projections
        .iter()
        .map(|p| dir.db(p.name.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut handlers: Vec<SqlHandler<'_>> =
        config.projections.iter().map(SqlHandler::new).collect();
    let targets = dbs
        .iter()
        .zip(handlers.iter_mut())
        .zip(&config.projections)
        .map(|((db, handler), p)| {
            ProjectionTarget::new(db, handler as &mut dyn Handler<Payload>)
                .consumer_id(p.name.as_str())
                .start(Start::Reset)
        })
        .collect();
    for result in replay(&store, targets, &options()) {
        result?;
    }
    Ok(())
}

// ------------------------------------------------------------ child and parent

/// The child: runs one variant once on a fresh directory and prints one JSON
/// line with its wall time, CPU time, peak RSS and table digest.
pub fn run_child(
    variant: &str,
    workload: Workload,
    store: &Path,
    layout: Layout,
    dir: &Path,
) -> anyhow::Result<()> {
    if matches!(layout, Layout::Foreign) && !["a1", "a2", "c", "c1", "d"].contains(&variant) {
        bail!("--foreign-table is for the variants a1, a2, c, c1 and d");
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    let started = Instant::now();
    let w = workload;
    match variant {
        "a1" => run_a1(store, layout, dir, w, BENCH_BATCH_SIZE),
        "a2" => run_a2(store, layout, dir, w, BENCH_BATCH_SIZE),
        "a1-50k" => run_a1(store, layout, dir, w, BENCH_BIG_BATCH_SIZE),
        "a2-50k" => run_a2(store, layout, dir, w, BENCH_BIG_BATCH_SIZE),
        "b" => run_b(store, dir, w, options()),
        "b1" => run_b(
            store,
            dir,
            w,
            options().commit_interval(std::time::Duration::ZERO),
        ),
        "c" => run_shared(&layout.open(store)?, dir, w, &options()),
        "c1" => run_shared(
            &layout.open(store)?,
            dir,
            w,
            &options().commit_interval(std::time::Duration::ZERO),
        ),
        "c-shared" => run_c_shared(store, dir, w),
        "d" => run_d(store, layout, dir, w),
        PG_VARIANT => run_c_pg(&store.display().to_string(), dir, w),
        other => bail!("unknown variant {other}"),
    }?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = cpu_seconds().unwrap_or(f64::NAN);
    let digest = digest(dir)?;
    let rss_kb = peak_rss_kb().unwrap_or(0);
    out!(
        "{}",
        serde_json::json!({
            "seconds": seconds, "cpu_seconds": cpu_seconds, "rss_kb": rss_kb, "digest": digest,
        })
    );
    Ok(())
}

/// The digest a run's projections must match: each projection's tables,
/// in report order (printed by `projectionist-bench digest` for runs of the
/// command line itself).
pub(crate) fn digest(dir: &Path) -> anyhow::Result<String> {
    let mut digest = String::new();
    for projection in Projection::ALL {
        let path = dir.join(format!("{}.db", projection.name()));
        let conn = Connection::open_with_flags(
            &path,
            projectionist::rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .with_context(|| format!("open {}", path.display()))?;
        digest.push_str(&projection_digest(&conn, DigestScope::ProjectionTables)?[..16]);
    }
    Ok(digest)
}

/// User + system CPU time of this process so far, all threads (Linux
/// `/proc/self/stat`, in clock ticks of 1/100 s).
fn cpu_seconds() -> Option<f64> {
    const TICKS_PER_SECOND: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

/// This process's peak resident set size, from /proc.
fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Measurements of one variant at one log size.
struct Measured {
    variant: &'static str,
    rates: Vec<f64>,
    seconds: Vec<f64>,
    cpu_seconds: Vec<f64>,
    rss_kb: u64,
}

impl Measured {
    fn median_cpu(&self) -> f64 {
        let mut cpu = self.cpu_seconds.clone();
        cpu.sort_by(f64::total_cmp);
        cpu[cpu.len() / 2]
    }
    fn median_rate(&self) -> f64 {
        let mut rates = self.rates.clone();
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    }
    fn median_seconds(&self) -> f64 {
        let mut seconds = self.seconds.clone();
        seconds.sort_by(f64::total_cmp);
        seconds[seconds.len() / 2]
    }
}

/// What `bench` measures.
pub struct Plan<'a> {
    pub sizes: &'a [u64],
    pub runs: u32,
    pub work: &'a Path,
    pub seed: u64,
    pub variants: &'a [String],
    pub pg_url: Option<&'a str>,
    pub workload: Workload,
}

/// The parent: generates the logs, runs every variant `runs` times per size in
/// child processes, the variants' runs interleaved (a b c, a b c, ...) so that
/// drift of a shared machine hits all alike; prints the table and checks
/// digests and targets.
pub fn run_parent(plan: &Plan<'_>) -> anyhow::Result<()> {
    let Plan {
        sizes,
        runs,
        work,
        seed,
        variants,
        pg_url,
        workload,
    } = *plan;
    std::fs::create_dir_all(work)?;
    let exe = std::env::current_exe()?;
    let mut medians: Vec<(u64, Vec<Measured>)> = Vec::new();
    for &n_events in sizes {
        let store = prepare_workload_log(work, n_events, seed, workload)?;
        eprintln!(
            "bench: {} workload, {n_events} events, {runs} runs per variant, interleaved",
            workload.as_str()
        );
        let mut reference: Option<String> = None;
        // The first variant's digest is the reference every other must match (a1
        // unless it was left out with --variants).
        let mut chosen: Vec<&'static str> = VARIANTS
            .into_iter()
            .filter(|v| variants.iter().any(|c| c == v))
            .collect();
        let pg_store = match pg_url {
            Some(url) => {
                chosen.push(PG_VARIANT);
                Some(prepare_pg_log(url, &store, n_events, seed)?)
            }
            None => None,
        };
        let mut measured: Vec<Measured> = chosen
            .iter()
            .map(|&variant| Measured {
                variant,
                rates: Vec::new(),
                seconds: Vec::new(),
                cpu_seconds: Vec::new(),
                rss_kb: 0,
            })
            .collect();
        for run in 0..runs {
            for m in &mut measured {
                let variant = m.variant;
                let dir = work.join(format!("run-{variant}"));
                let source = match (&pg_store, variant) {
                    (Some(url), PG_VARIANT) => std::ffi::OsString::from(url),
                    _ => store.clone().into_os_string(),
                };
                let out = Command::new(&exe)
                    .args(["run", "--variant", variant])
                    .args(["--workload", workload.as_str(), "--bench-store"])
                    .arg(&source)
                    .arg("--bench-dir")
                    .arg(&dir)
                    .output()?;
                if !out.status.success() {
                    bail!(
                        "variant {variant} failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                let line: serde_json::Value = serde_json::from_slice(&out.stdout)?;
                let seconds = line["seconds"].as_f64().unwrap_or(f64::NAN);
                let digest = line["digest"].as_str().unwrap_or_default().to_owned();
                match &reference {
                    None => reference = Some(digest),
                    Some(r) if *r == digest => {}
                    Some(r) => {
                        bail!("variant {variant} run {run}: digest {digest} differs from a1's {r}")
                    }
                }
                let cpu = line["cpu_seconds"].as_f64().unwrap_or(f64::NAN);
                m.rates.push(n_events as f64 / seconds);
                m.seconds.push(seconds);
                m.cpu_seconds.push(cpu);
                m.rss_kb = m.rss_kb.max(line["rss_kb"].as_u64().unwrap_or(0));
                eprintln!("  {variant} run {}: {seconds:.2}s, CPU {cpu:.2}s", run + 1);
            }
        }
        print_table(n_events, &measured);
        medians.push((n_events, measured));
    }
    print_targets(&medians);
    Ok(())
}

/// The same log in PostgreSQL, in schema `bench_{n}_{seed}`: copied once from the
/// SQLite log (so both hold identical events) and reused. Returns the URL.
pub(crate) fn prepare_pg_log(
    url: &str,
    sqlite: &Path,
    n_events: u64,
    seed: u64,
) -> anyhow::Result<String> {
    let url = projectionist_postgres::url_with_schema(url, &format!("bench_{n_events}_{seed}"))?;
    let pg = projectionist_postgres::PostgresEventStore::connect(&url)?;
    pg.init()?;
    let head = projectionist::GlobalReader::<serde_json::Value>::head(&pg)?;
    if head == n_events {
        return Ok(url);
    }
    if head != 0 {
        bail!("the PostgreSQL bench schema holds {head} events, not {n_events}; drop it");
    }
    eprintln!("bench: copying {n_events} events into PostgreSQL");
    let source = SqliteEventStore::create(sqlite)?;
    copy_into_pg(&source, &pg)?;
    Ok(url)
}

/// Appends every event of `source` to `pg`, in order, in transactions of up to
/// 10,000 events.
pub(crate) fn copy_into_pg(
    source: &dyn projectionist::GlobalReader<serde_json::Value>,
    pg: &projectionist_postgres::PostgresEventStore,
) -> anyhow::Result<()> {
    let mut after = 0;
    loop {
        let batch: Vec<GlobalEvent<serde_json::Value>> = source.read_after(after, 10_000)?;
        let Some(last) = batch.last() else { break };
        after = last.sequence;
        let events: Vec<(String, u64, [projectionist::NewEvent; 1])> = batch
            .iter()
            .map(|e| {
                let event = projectionist::NewEvent {
                    event_type: e.event_type.clone(),
                    data: e.data.to_string(),
                    metadata: None,
                };
                (e.stream_id.clone(), e.stream_version - 1, [event])
            })
            .collect();
        let appends: Vec<projectionist::StreamAppend<'_>> = events
            .iter()
            .map(
                |(stream_id, expected_version, events)| projectionist::StreamAppend {
                    stream_id,
                    expected_version: *expected_version,
                    events,
                },
            )
            .collect();
        pg.append_batch(&appends)?;
    }
    Ok(())
}

/// The log of a workload, generated once and reused.
fn prepare_workload_log(
    work: &Path,
    n_events: u64,
    seed: u64,
    workload: Workload,
) -> anyhow::Result<PathBuf> {
    if workload == Workload::Cold {
        return prepare_log(work, n_events, seed);
    }
    let path = work.join(format!("hot-{n_events}-seed{seed}.db"));
    if reusable(&path, n_events)? {
        return Ok(path);
    }
    eprintln!(
        "bench: generating {n_events} hot events into {}",
        path.display()
    );
    let store = SqliteEventStore::create(&path)?;
    generate_hot(&store, n_events, seed)?;
    Ok(path)
}

/// Orders open at once in the hot log.
const HOT_OPEN_ORDERS: usize = 1_000;
/// Customers of the hot log.
const HOT_CUSTOMERS: u64 = 1_000;

/// One open order of the hot log.
struct HotOrder {
    id: String,
    customer: String,
    /// Events written to its stream so far.
    version: u64,
    /// Item events still to come.
    items_left: u64,
}

/// The hot log: orders of 10-190 events (placed, items, shipped or
/// cancelled), about [`HOT_OPEN_ORDERS`] open at a time, their events
/// interleaved; 88% `ItemAdded`, 10% `ItemRemoved` of the items.
fn generate_hot(store: &SqliteEventStore, n_events: u64, seed: u64) -> anyhow::Result<()> {
    const EVENTS_PER_APPEND: u64 = 10_000;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut open: Vec<HotOrder> = Vec::with_capacity(HOT_OPEN_ORDERS);
    let mut next_order = 0u64;
    let mut written = 0;
    while written < n_events {
        let chunk = (n_events - written).min(EVENTS_PER_APPEND);
        let mut steps: Vec<(String, u64, [projectionist::NewEvent; 1])> = Vec::new();
        for _ in 0..chunk {
            while open.len() < HOT_OPEN_ORDERS {
                open.push(HotOrder {
                    id: format!("o{next_order:07}"),
                    customer: format!("c{:04}", rng.u64(0..HOT_CUSTOMERS)),
                    version: 0,
                    items_left: rng.u64(8..=188),
                });
                next_order += 1;
            }
            let i = rng.usize(..open.len());
            let order = &mut open[i];
            let (event_type, data) = if order.version == 0 {
                (
                    "OrderPlaced",
                    serde_json::json!({"order_id": order.id, "customer_id": order.customer}),
                )
            } else if order.items_left > 0 {
                order.items_left -= 1;
                let event_type = if rng.u8(..98) < 88 {
                    "ItemAdded"
                } else {
                    "ItemRemoved"
                };
                (
                    event_type,
                    serde_json::json!({
                        "order_id": order.id, "sku": format!("sku-{}", rng.u32(0..500)),
                        "qty": rng.i64(1..5), "unit_price_cents": rng.i64(100..5_000),
                    }),
                )
            } else {
                let event_type = if rng.u8(..10) < 8 {
                    "OrderShipped"
                } else {
                    "OrderCancelled"
                };
                (event_type, serde_json::json!({"order_id": order.id}))
            };
            let event = projectionist::NewEvent::json(event_type, &data)?;
            steps.push((format!("order-{}", order.id), order.version, [event]));
            order.version += 1;
            if event_type == "OrderShipped" || event_type == "OrderCancelled" {
                open.swap_remove(i);
            }
        }
        let appends: Vec<projectionist::StreamAppend<'_>> = steps
            .iter()
            .map(
                |(stream_id, expected_version, events)| projectionist::StreamAppend {
                    stream_id,
                    expected_version: *expected_version,
                    events,
                },
            )
            .collect();
        store.append_batch(&appends)?;
        written += chunk;
    }
    Ok(())
}

/// Whether a log generated before at `path` holds `n_events` events; one that
/// does not (an interrupted generation) is deleted.
fn reusable(path: &Path, n_events: u64) -> anyhow::Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    let store = SqliteEventStore::create(path)?;
    if projectionist::GlobalReader::<serde_json::Value>::head(&store)? == n_events {
        return Ok(true);
    }
    drop(store);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Ok(false)
}

/// The demo log of `n_events` events, generated once and reused.
pub(crate) fn prepare_log(work: &Path, n_events: u64, seed: u64) -> anyhow::Result<PathBuf> {
    let path = work.join(format!("events-{n_events}-seed{seed}.db"));
    if reusable(&path, n_events)? {
        return Ok(path);
    }
    eprintln!(
        "bench: generating {n_events} events into {}",
        path.display()
    );
    let store = SqliteEventStore::create(&path)?;
    projectionist_demo::generate(
        &|appends| store.append_batch(appends),
        n_events,
        seed,
        &|_| {},
    )?;
    Ok(path)
}

fn print_table(n_events: u64, measured: &[Measured]) {
    let rate = |v: &str| {
        measured
            .iter()
            .find(|m| m.variant == v)
            .map_or(f64::NAN, Measured::median_rate)
    };
    let (a1, a2) = (rate("a1"), rate("a2"));
    out!("\n### {n_events} events\n");
    out!(
        "| variant | events/s median | min | max | vs a1 | vs a2 | wall s (median) | CPU s (median) | peak RSS MiB |"
    );
    out!("|---|---|---|---|---|---|---|---|---|");
    for m in measured {
        let min = m.rates.iter().copied().fold(f64::INFINITY, f64::min);
        let max = m.rates.iter().copied().fold(0.0, f64::max);
        let median = m.median_rate();
        out!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.2}x | {:.2}x | {:.2} | {:.2} | {:.1} |",
            m.variant,
            median,
            min,
            max,
            median / a1,
            median / a2,
            m.median_seconds(),
            m.median_cpu(),
            m.rss_kb as f64 / 1024.0
        );
    }
}

fn print_targets(medians: &[(u64, Vec<Measured>)]) {
    out!("\n### Targets\n");
    for (n_events, m) in medians {
        let rate = |v: &str| {
            m.iter()
                .find(|x| x.variant == v)
                .map_or(f64::NAN, Measured::median_rate)
        };
        let secs = |v: &str| {
            m.iter()
                .find(|x| x.variant == v)
                .map_or(f64::NAN, Measured::median_seconds)
        };
        let check = |ok: bool| if ok { "met" } else { "MISSED" };
        out!(
            "- {n_events} events: (b)/(a1) = {:.2} (target >= 0.95: {})",
            rate("b") / rate("a1"),
            check(rate("b") / rate("a1") >= 0.95)
        );
        out!(
            "- {n_events} events: (c)/(a2) = {:.2} (target >= 0.95: {})",
            rate("c") / rate("a2"),
            check(rate("c") / rate("a2") >= 0.95)
        );
        out!(
            "- {n_events} events: wall (c)/(b) = {:.2} (target <= 0.55: {})",
            secs("c") / secs("b"),
            check(secs("c") / secs("b") <= 0.55)
        );
        out!(
            "- {n_events} events: (d)/(b) = {:.2} (target >= 0.8: {})",
            rate("d") / rate("b"),
            check(rate("d") / rate("b") >= 0.8)
        );
        let cpu = |v: &str| {
            m.iter()
                .find(|x| x.variant == v)
                .map_or(f64::NAN, Measured::median_cpu)
        };
        out!(
            "- {n_events} events: (c)/(a2) = {:.2} (engine-cost target >= 1.0: {}); (b)/(a1) = {:.2} (>= 1.0: {}); (d)/(c) = {:.2} (>= 0.9: {}); CPU (c)/(a2) = {:.2} (<= 1.1: {})",
            rate("c") / rate("a2"),
            check(rate("c") / rate("a2") >= 1.0),
            rate("b") / rate("a1"),
            check(rate("b") / rate("a1") >= 1.0),
            rate("d") / rate("c"),
            check(rate("d") / rate("c") >= 0.9),
            cpu("c") / cpu("a2"),
            check(cpu("c") / cpu("a2") <= 1.1)
        );
        let rss_c = m.iter().find(|x| x.variant == "c").map_or(0, |x| x.rss_kb);
        out!(
            "- {n_events} events: peak RSS (c) = {:.1} MiB",
            rss_c as f64 / 1024.0
        );
    }
    if let (Some((n1, m1)), Some((n2, m2))) = (
        medians.iter().find(|(n, _)| *n == 1_000_000),
        medians.iter().find(|(n, _)| *n == 10_000_000),
    ) {
        let secs = |m: &Vec<Measured>| {
            m.iter()
                .find(|x| x.variant == "c")
                .map_or(f64::NAN, Measured::median_seconds)
        };
        let ratio = secs(m2) / secs(m1);
        out!(
            "- time (c) at {n2} / at {n1} = {ratio:.1}x (target <= 11x: {})",
            if ratio <= 11.0 { "met" } else { "MISSED" }
        );
    }
}
