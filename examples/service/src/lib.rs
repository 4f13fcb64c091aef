//! An order service that appends events and serves a read model from the
//! same process: the projectionist supervisor keeps projection `order_totals`
//! current beside the HTTP handlers.
//!
//! - `POST /orders` with `{"order": "o-1", "cents": 250}` appends an
//!   `OrderPlaced` event, waits until the projection has applied it
//!   (read-your-writes), and answers with the order's total.
//! - `GET /orders/{id}` reads the projection.
//! - `GET /health` answers 503 naming any projection that is stalled, failed
//!   or reconnecting; `GET /status` lists every projection's state.
//!
//! The engine is synchronous: its calls run on tokio's blocking pool.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use projectionist::rusqlite::{OptionalExtension, Transaction};
use projectionist::{GlobalEvent, NewEvent, SchemaHandler, SqliteEventStore};
use projectionist_runner::{Supervised, Supervisor};
use serde::Deserialize;
use serde_json::json;

/// The projection this service reads.
pub const PROJECTION: &str = "order_totals";

/// How long `POST /orders` waits for the projection to apply its event
/// before answering 503: far above the supervisor's ~milliseconds, short
/// enough for an HTTP client's patience.
const READ_YOUR_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// An `OrderPlaced` event's payload (and the request body).
#[derive(Debug, Deserialize)]
pub struct OrderPlaced {
    /// The order.
    pub order: String,
    /// Its amount.
    pub cents: i64,
}

/// The service: the event store, and the supervisor keeping the projection.
pub struct App {
    store: Arc<SqliteEventStore>,
    supervisor: Supervisor<OrderPlaced>,
    placements: std::sync::atomic::AtomicU64,
}

impl App {
    /// Opens (creating them) the event store `events.db` and the projection
    /// directory `projections/` under `data`, and starts the supervisor.
    ///
    /// # Errors
    /// The store or the directory cannot be opened.
    pub fn start(data: &Path) -> Result<Arc<App>, Box<dyn std::error::Error + Send + Sync>> {
        std::fs::create_dir_all(data)?;
        let store = Arc::new(SqliteEventStore::create(data.join("events.db"))?);
        let totals = SchemaHandler::new(
            "CREATE TABLE IF NOT EXISTS order_total (
                 order_id TEXT PRIMARY KEY, cents INTEGER NOT NULL, placed INTEGER NOT NULL)",
            |tx: &Transaction<'_>, events: &[GlobalEvent<OrderPlaced>]| {
                let mut upsert = tx.prepare_cached(
                    "INSERT INTO order_total VALUES (?1, ?2, 1)
                     ON CONFLICT (order_id) DO UPDATE
                     SET cents = cents + excluded.cents, placed = placed + 1",
                )?;
                for event in events {
                    upsert.execute((&event.data.order, event.data.cents))?;
                }
                Ok(())
            },
        );
        let supervisor = Supervisor::builder(store.clone(), data.join("projections"))?
            // Change the version when the handler's logic changes: the
            // projection is rebuilt in its shadow, then published.
            .projection(Supervised::new(PROJECTION, totals)?.version(1))
            .start()?;
        let head = projectionist::GlobalReader::<OrderPlaced>::head(&*store)?;
        Ok(Arc::new(App {
            store,
            supervisor,
            placements: std::sync::atomic::AtomicU64::new(head + 1),
        }))
    }

    /// The HTTP routes.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/orders", post(place_order))
            .route("/orders/{id}", get(order_total))
            .route("/health", get(health))
            .route("/status", get(status))
            .with_state(Arc::clone(self))
    }

    /// A placement id unique across restarts: the store's head at start
    /// plus a counter.
    fn next_placement(&self) -> u64 {
        self.placements
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }

    /// The order's total and count, from the projection.
    fn total(&self, order: &str) -> Result<Option<(i64, i64)>, projectionist::Error> {
        let db = self.supervisor.dir().db(PROJECTION)?;
        let reader = db.open_reader()?;
        reader
            .query_row(
                "SELECT cents, placed FROM order_total WHERE order_id = ?1",
                [order],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(|source| projectionist::Error::Sqlite {
                step: "read order_total".into(),
                source,
            })
    }
}

fn failure(status: StatusCode, error: impl std::fmt::Display) -> Response {
    (status, Json(json!({"error": error.to_string()}))).into_response()
}

async fn place_order(State(app): State<Arc<App>>, Json(order): Json<OrderPlaced>) -> Response {
    if order.order.is_empty() {
        return failure(StatusCode::BAD_REQUEST, "order must not be empty");
    }
    let answer = tokio::task::spawn_blocking(move || {
        let failed = |status: StatusCode| move |e: projectionist::Error| (status, e.to_string());
        let event = NewEvent::json(
            "OrderPlaced",
            &json!({"order": order.order, "cents": order.cents}),
        )
        .map_err(failed(StatusCode::BAD_REQUEST))?;
        // Each placement is a stream of its own (new, so at version 0).
        let stream = format!("placement-{}-{}", order.order, app.next_placement());
        let appended = app
            .store
            .append(&stream, 0, &[event])
            .map_err(failed(StatusCode::INTERNAL_SERVER_ERROR))?;
        app.supervisor
            .wait_for(PROJECTION, appended.last_sequence, READ_YOUR_WRITE_TIMEOUT)
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        let (cents, placed) = app
            .total(&order.order)
            .map_err(failed(StatusCode::INTERNAL_SERVER_ERROR))?
            .unwrap_or_default();
        Ok(json!({
            "order": order.order, "sequence": appended.last_sequence,
            "cents": cents, "placed": placed,
        }))
    })
    .await;
    match answer {
        Ok(Ok(body)) => Json(body).into_response(),
        Ok(Err((status, error))) => failure(status, error),
        Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn order_total(State(app): State<Arc<App>>, UrlPath(id): UrlPath<String>) -> Response {
    let read = tokio::task::spawn_blocking(move || app.total(&id).map(|t| (id, t))).await;
    match read {
        Ok(Ok((id, Some((cents, placed))))) => {
            Json(json!({"order": id, "cents": cents, "placed": placed})).into_response()
        }
        Ok(Ok((id, None))) => failure(StatusCode::NOT_FOUND, format!("no order {id}")),
        Ok(Err(e)) => failure(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let unhealthy = app.supervisor.unhealthy();
    if unhealthy.is_empty() {
        return (StatusCode::OK, "ok\n").into_response();
    }
    let lines: Vec<String> = unhealthy
        .into_iter()
        .map(|(name, why)| format!("{name}: {why}"))
        .collect();
    (StatusCode::SERVICE_UNAVAILABLE, lines.join("\n") + "\n").into_response()
}

async fn status(State(app): State<Arc<App>>) -> Response {
    let states: Vec<_> = app
        .supervisor
        .status()
        .into_iter()
        .map(|s| {
            json!({
                "projection": s.name, "state": s.state.name(), "reason": s.state.reason(),
                "checkpoint": s.checkpoint, "head": s.head, "lag": s.lag(),
            })
        })
        .collect();
    Json(states).into_response()
}
