//! The sample domain behind `projectionist demo` and the benchmarks: a
//! deterministic orders log generated from a seed, and [`CONFIG`], the
//! declarative projections over it.
//!
//! ```
//! use projectionist::{GlobalReader, SqliteEventStore};
//!
//! # let dir = tempfile::tempdir().unwrap();
//! let store = SqliteEventStore::create(dir.path().join("events.db"))?;
//! projectionist_demo::generate(&|appends| store.append_batch(appends), 1_000, 42, &|_| {})?;
//! assert_eq!(GlobalReader::<serde_json::Value>::head(&store)?, 1_000);
//! # Ok::<(), projectionist::Error>(())
//! ```

use projectionist::{Appended, NewEvent, StreamAppend};

/// The demo's projections config (TOML): `order_summary` and `customer_stats`
/// over the generated orders log.
pub const CONFIG: &str = include_str!("projections.toml");

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
