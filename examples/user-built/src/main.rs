//! Two projections of the hot-key orders log, as a user writes them:
//! `user-built STORE DIR [foreign]` rebuilds them from one read and prints a
//! JSON line with the digest of their tables (the bench compares it with its
//! own (c)); `foreign` reads the copy of the log in another program's layout
//! (`stored_events`) that `scripts/bench-user-built.sh` makes.

use std::error::Error;

use projectionist::rusqlite::{Connection, Transaction};
use projectionist::{
    BoxError, DigestScope, EventTableMapping, GlobalEvent, Handler, ProjectionDir,
    ProjectionTarget, RebuildOptions, SqliteEventStore, Start, projection_digest, replay,
};
use serde::Deserialize;

/// Every orders event's payload (item events carry no customer).
#[derive(Deserialize)]
struct Order {
    order_id: String,
    #[serde(default)]
    customer_id: String,
    #[serde(default)]
    qty: i64,
    #[serde(default)]
    unit_price_cents: i64,
}

struct Orders;

impl Handler<Order> for Orders {
    fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS orders (
               order_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, status TEXT NOT NULL,
               item_count INTEGER NOT NULL DEFAULT 0, total_cents INTEGER NOT NULL DEFAULT 0,
               updated_seq INTEGER NOT NULL);",
        )?;
        Ok(())
    }

    // For the application's queries by customer; no statement below searches
    // by it, so it is built once the log is applied, not row by row.
    fn caught_up(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        tx.execute_batch("CREATE INDEX IF NOT EXISTS orders_by_customer ON orders (customer_id);")?;
        Ok(())
    }

    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        events: &[GlobalEvent<Order>],
    ) -> Result<(), BoxError> {
        for e in events {
            let (d, seq) = (&e.data, e.sequence as i64);
            let delta = d.qty * d.unit_price_cents;
            match e.event_type.as_str() {
                "OrderPlaced" => tx
                    .prepare_cached("INSERT INTO orders (order_id, customer_id, status, updated_seq) VALUES (?1, ?2, 'open', ?3)")?
                    .execute((&d.order_id, &d.customer_id, seq))?,
                "ItemAdded" => tx
                    .prepare_cached("UPDATE orders SET item_count = item_count + ?2, total_cents = total_cents + ?3, updated_seq = ?4 WHERE order_id = ?1")?
                    .execute((&d.order_id, d.qty, delta, seq))?,
                "ItemRemoved" => tx
                    .prepare_cached("UPDATE orders SET item_count = item_count - ?2, total_cents = total_cents - ?3, updated_seq = ?4 WHERE order_id = ?1")?
                    .execute((&d.order_id, d.qty, delta, seq))?,
                "OrderShipped" => tx
                    .prepare_cached("UPDATE orders SET status = 'shipped', updated_seq = ?2 WHERE order_id = ?1")?
                    .execute((&d.order_id, seq))?,
                "OrderCancelled" => tx
                    .prepare_cached("UPDATE orders SET status = 'cancelled', updated_seq = ?2 WHERE order_id = ?1")?
                    .execute((&d.order_id, seq))?,
                _ => 0,
            };
        }
        Ok(())
    }
}

struct Customers;

impl Handler<Order> for Customers {
    fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS customers (
               customer_id TEXT PRIMARY KEY, orders_placed INTEGER NOT NULL DEFAULT 0,
               orders_shipped INTEGER NOT NULL DEFAULT 0, orders_cancelled INTEGER NOT NULL DEFAULT 0,
               items INTEGER NOT NULL DEFAULT 0, spent_cents INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE IF NOT EXISTS open_orders (
               order_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL,
               items INTEGER NOT NULL DEFAULT 0, cents INTEGER NOT NULL DEFAULT 0);",
        )?;
        Ok(())
    }

    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        events: &[GlobalEvent<Order>],
    ) -> Result<(), BoxError> {
        for e in events {
            let d = &e.data;
            let delta = d.qty * d.unit_price_cents;
            match e.event_type.as_str() {
                "OrderPlaced" => {
                    tx.prepare_cached(
                        "INSERT INTO open_orders (order_id, customer_id) VALUES (?1, ?2)",
                    )?
                    .execute((&d.order_id, &d.customer_id))?;
                    tx.prepare_cached("INSERT INTO customers (customer_id, orders_placed) VALUES (?1, 1) ON CONFLICT (customer_id) DO UPDATE SET orders_placed = orders_placed + 1")?
                        .execute([&d.customer_id])?;
                }
                "ItemAdded" => {
                    tx.prepare_cached("UPDATE open_orders SET items = items + ?2, cents = cents + ?3 WHERE order_id = ?1")?
                        .execute((&d.order_id, d.qty, delta))?;
                }
                "ItemRemoved" => {
                    tx.prepare_cached("UPDATE open_orders SET items = items - ?2, cents = cents - ?3 WHERE order_id = ?1")?
                        .execute((&d.order_id, d.qty, delta))?;
                }
                "OrderShipped" => {
                    tx.prepare_cached("UPDATE customers SET orders_shipped = customers.orders_shipped + 1, items = customers.items + o.items, spent_cents = customers.spent_cents + o.cents FROM (SELECT customer_id, items, cents FROM open_orders WHERE order_id = ?1) AS o WHERE customers.customer_id = o.customer_id")?
                        .execute([&d.order_id])?;
                    tx.prepare_cached("DELETE FROM open_orders WHERE order_id = ?1")?
                        .execute([&d.order_id])?;
                }
                "OrderCancelled" => {
                    tx.prepare_cached("UPDATE customers SET orders_cancelled = orders_cancelled + 1 WHERE customer_id = (SELECT customer_id FROM open_orders WHERE order_id = ?1)")?
                        .execute([&d.order_id])?;
                    tx.prepare_cached("DELETE FROM open_orders WHERE order_id = ?1")?
                        .execute([&d.order_id])?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (store, dir, layout) = match args.as_slice() {
        [_, store, dir] => (store, dir, None),
        [_, store, dir, layout] => (store, dir, Some(layout.as_str())),
        _ => return Err("usage: user-built STORE DIR [foreign]".into()),
    };
    // `foreign`: another program's table of the same events.
    let mapping = match layout {
        None => EventTableMapping::default(),
        Some("foreign") => EventTableMapping::new("stored_events")
            .sequence("id")
            .stream_id("originator")
            .stream_version("position")
            .event_type("topic")
            .data("state")
            .metadata(None)
            .recorded_at(None),
        Some(other) => return Err(format!("unknown layout {other:?} (known: foreign)").into()),
    };
    let store = SqliteEventStore::open_mapped(store, &mapping)?;
    let dir = ProjectionDir::open(dir)?;
    let names = ["order_summary", "customer_stats"];
    let (orders_db, customers_db) = (dir.db(names[0])?, dir.db(names[1])?);
    let (mut orders, mut customers) = (Orders, Customers);
    let targets = vec![
        ProjectionTarget::new(&orders_db, &mut orders as &mut dyn Handler<Order>)
            .start(Start::Reset),
        ProjectionTarget::new(&customers_db, &mut customers).start(Start::Reset),
    ];
    for result in replay(&store, targets, &RebuildOptions::new()) {
        result?;
    }
    let mut digest = String::new();
    for name in names {
        let conn = Connection::open(dir.path().join(format!("{name}.db")))?;
        digest.push_str(&projection_digest(&conn, DigestScope::ProjectionTables)?[..16]);
    }
    println!("{}", serde_json::json!({ "digest": digest }));
    Ok(())
}
