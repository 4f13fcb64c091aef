//! The full flow on the embedded default: open a projection directory and an event
//! store, append events, rebuild a projection with progress, and query it.
//!
//! Run with `cargo run --example full_flow`.

use projectionist::rusqlite::Transaction;
use projectionist::{
    BoxError, GlobalEvent, NewEvent, ProjectionDir, ProjectionTarget, RebuildConfig,
    RebuildOptions, SchemaHandler, SqliteEventStore, StreamAppend, rebuild,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct OrderEvent {
    customer: Option<String>,
    cents: Option<i64>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let work = tempfile::tempdir()?;
    let store = SqliteEventStore::create(work.path().join("events.db"))?;

    // 10,000 orders: placed, then paid, in one atomic append per 1,000 orders.
    for chunk in 0..10 {
        let streams: Vec<(String, Vec<NewEvent>)> = (0..1_000)
            .map(|i| {
                let n = chunk * 1_000 + i;
                let placed = serde_json::json!({"customer": format!("c{}", n % 97)});
                let paid = serde_json::json!({"cents": 100 + n % 900});
                let events = vec![
                    NewEvent::json("OrderPlaced", &placed),
                    NewEvent::json("OrderPaid", &paid),
                ];
                Ok((
                    format!("order-{n}"),
                    events.into_iter().collect::<Result<_, _>>()?,
                ))
            })
            .collect::<Result<_, projectionist::Error>>()?;
        let appends: Vec<StreamAppend<'_>> = streams
            .iter()
            .map(|(stream_id, events)| StreamAppend {
                stream_id,
                expected_version: 0,
                events,
            })
            .collect();
        store.append_batch(&appends)?;
    }

    let dir = ProjectionDir::open(work.path().join("projections"))?;
    let db = dir.db("customer_totals")?;
    let mut handler = SchemaHandler::new(
        "CREATE TABLE IF NOT EXISTS orders (order_id TEXT PRIMARY KEY, customer TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS customer_totals (customer TEXT PRIMARY KEY, orders INTEGER, cents INTEGER);",
        |tx: &Transaction<'_>, events: &[GlobalEvent<OrderEvent>]| -> Result<(), BoxError> {
            for event in events {
                match event.event_type.as_str() {
                    "OrderPlaced" => {
                        let customer = event.data.customer.as_deref().ok_or("OrderPlaced without customer")?;
                        tx.prepare_cached("INSERT INTO orders VALUES (?1, ?2)")?
                            .execute((&event.stream_id, customer))?;
                        tx.prepare_cached(
                            "INSERT INTO customer_totals VALUES (?1, 1, 0)
                             ON CONFLICT (customer) DO UPDATE SET orders = orders + 1",
                        )?
                        .execute([customer])?;
                    }
                    "OrderPaid" => {
                        tx.prepare_cached(
                            "UPDATE customer_totals SET cents = cents + ?2
                             WHERE customer = (SELECT customer FROM orders WHERE order_id = ?1)",
                        )?
                        .execute((&event.stream_id, event.data.cents.unwrap_or(0)))?;
                    }
                    _ => {}
                }
            }
            Ok(())
        },
    );

    let progress = |p: &projectionist::Progress| {
        if p.done {
            println!(
                "{}: {} of {} events applied",
                p.projection_name, p.processed, p.total
            );
        }
    };
    let result = rebuild(RebuildConfig {
        reader: &store,
        projection: ProjectionTarget::new(&db, &mut handler).consumer_id("customer_totals"),
        options: RebuildOptions::new().batch_size(500).progress(&progress),
    })?;
    println!(
        "rebuilt in {:.2?}, checkpoint {}",
        result.elapsed, result.checkpoint
    );

    let reader = db.open_reader()?;
    let mut top = reader.prepare(
        "SELECT customer, orders, cents FROM customer_totals ORDER BY cents DESC, customer LIMIT 3",
    )?;
    for row in top.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })? {
        let (customer, orders, cents) = row?;
        println!("{customer}: {orders} orders, {cents} cents");
    }
    Ok(())
}
