//! `follow --metrics ADDR`: Prometheus metrics and a health endpoint over HTTP.
//!
//! `GET /metrics` answers in the OpenMetrics text format (which Prometheus
//! scrapes), encoded by `prometheus-client`; `GET /health` answers 200 `ok`,
//! or 503 naming each projection that failed, lags more than `--max-lag`
//! events behind the head, or whose reads have been held at a PostgreSQL hole
//! for longer than `--max-wait`. The server is hyper on a thread of its own,
//! with bounded headers, timeouts, a connection limit and no request body
//! ever read.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// One label: the projection's name.
type Labels = Vec<(&'static str, String)>;

/// A projection as the health check sees it.
#[derive(Clone, Default)]
struct Health {
    failed: bool,
    lag: u64,
    /// The hole its reads are held at, and since when.
    waiting: Option<(u64, Instant)>,
    /// Stalled, with why.
    stalled: Option<String>,
}

/// The follower's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    checkpoint: Family<Labels, Gauge>,
    head: Family<Labels, Gauge>,
    lag: Family<Labels, Gauge>,
    following: Family<Labels, Gauge>,
    processed: Family<Labels, Counter>,
    failures: Family<Labels, Counter>,
    last_commit: Family<Labels, Gauge<f64, AtomicU64>>,
    batch_latency: Family<Labels, Gauge<f64, AtomicU64>>,
    hole_wait: Family<Labels, Gauge<f64, AtomicU64>>,
    late_events: Family<Labels, Counter>,
    snapshot_time: Family<Labels, Gauge<f64, AtomicU64>>,
    snapshot_bytes: Family<Labels, Gauge>,
    dead_letters: Family<Labels, Gauge>,
    health: Mutex<BTreeMap<String, Health>>,
    max_lag: u64,
    max_wait: Duration,
    /// The store's connection is lost and being made again, since then.
    reconnecting: Mutex<Option<Instant>>,
}

/// What a projection reports, for the metrics.
pub(crate) struct Observed<'a> {
    pub(crate) name: &'a str,
    pub(crate) checkpoint: u64,
    pub(crate) head: u64,
    pub(crate) following: bool,
    pub(crate) failed: bool,
    /// Events processed since the last observation.
    pub(crate) processed: u64,
    /// The checkpoint moved since the last observation.
    pub(crate) committed: bool,
    /// The engine's latency of the last commit that applied events.
    pub(crate) batch_latency: Option<Duration>,
    /// Held at a hole: its sequence, and since when.
    pub(crate) hole_wait: Option<projectionist::HoleWait>,
    /// Dead letters its file holds, when the report says.
    pub(crate) dead_letters: Option<u64>,
}

impl Metrics {
    pub(crate) fn new(max_lag: u64, max_wait: Duration) -> Self {
        let mut registry = Registry::with_prefix("projectionist");
        let checkpoint = Family::<Labels, Gauge>::default();
        let head = Family::<Labels, Gauge>::default();
        let lag = Family::<Labels, Gauge>::default();
        let following = Family::<Labels, Gauge>::default();
        let processed = Family::<Labels, Counter>::default();
        let failures = Family::<Labels, Counter>::default();
        let last_commit = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let batch_latency = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let hole_wait = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let late_events = Family::<Labels, Counter>::default();
        let snapshot_time = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let snapshot_bytes = Family::<Labels, Gauge>::default();
        let dead_letters = Family::<Labels, Gauge>::default();
        registry.register(
            "dead_letters",
            "Events the projection could not apply and skipped (on_error = \"skip\"), kept in its file; `projectionist dead-letters` lists them",
            dead_letters.clone(),
        );
        registry.register(
            "last_snapshot_timestamp_seconds",
            "Unix time of the projection's last snapshot taken by this follower (--snapshot-to); its age is time() minus this",
            snapshot_time.clone(),
        );
        registry.register(
            "snapshot_bytes",
            "Size of the projection's last snapshot taken by this follower",
            snapshot_bytes.clone(),
        );
        registry.register(
            "late_events",
            "Events committed into a hole the follower had already passed, that this projection handles (it was rebuilt, or must be)",
            late_events.clone(),
        );
        registry.register(
            "hole_wait_seconds",
            "How long reads have been held at a missing sequence number that a running transaction may still fill (0 when not held)",
            hole_wait.clone(),
        );
        registry.register(
            "last_batch_latency_seconds",
            "Seconds from reading the oldest event of the last commit that applied events until that commit",
            batch_latency.clone(),
        );
        registry.register(
            "checkpoint",
            "Committed checkpoint (sequence)",
            checkpoint.clone(),
        );
        registry.register(
            "head",
            "The log's head as the follower last read it",
            head.clone(),
        );
        registry.register(
            "lag_events",
            "Events between the checkpoint and the head",
            lag.clone(),
        );
        registry.register(
            "following",
            "1 when the projection has caught up and follows the log",
            following.clone(),
        );
        registry.register(
            "events_processed",
            "Events handed to the projection by this process (of the types its run reads)",
            processed.clone(),
        );
        registry.register(
            "failures",
            "Times the projection failed and stopped",
            failures.clone(),
        );
        registry.register(
            "last_commit_timestamp_seconds",
            "Unix time of the last commit that moved the checkpoint",
            last_commit.clone(),
        );
        let info = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
        info.get_or_create(&vec![("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        registry.register("build", "The running projectionist's version", info);
        let started = Gauge::<f64, AtomicU64>::default();
        started.set(unix_now());
        registry.register(
            "start_time_seconds",
            "Unix time the process started following",
            started,
        );
        Metrics {
            registry,
            checkpoint,
            head,
            lag,
            following,
            processed,
            failures,
            last_commit,
            batch_latency,
            hole_wait,
            late_events,
            snapshot_time,
            snapshot_bytes,
            dead_letters,
            health: Mutex::new(BTreeMap::new()),
            max_lag,
            max_wait,
            reconnecting: Mutex::new(None),
        }
    }

    /// Records one projection's report.
    pub(crate) fn observe(&self, o: &Observed<'_>) {
        let labels = vec![("projection", o.name.to_owned())];
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let lag = o.head.saturating_sub(o.checkpoint);
        self.checkpoint
            .get_or_create(&labels)
            .set(gauge(o.checkpoint));
        self.head.get_or_create(&labels).set(gauge(o.head));
        self.lag.get_or_create(&labels).set(gauge(lag));
        self.following
            .get_or_create(&labels)
            .set(i64::from(o.following));
        self.processed.get_or_create(&labels).inc_by(o.processed);
        if o.committed {
            self.last_commit.get_or_create(&labels).set(unix_now());
        }
        if let Some(count) = o.dead_letters {
            self.dead_letters.get_or_create(&labels).set(gauge(count));
        }
        if let Some(latency) = o.batch_latency {
            self.batch_latency
                .get_or_create(&labels)
                .set(latency.as_secs_f64());
        }
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = health.entry(o.name.to_owned()).or_default();
        // Created at 0, so a scrape shows every projection's count.
        let failures = self.failures.get_or_create(&labels);
        if o.failed && !entry.failed {
            failures.inc();
        }
        entry.failed = o.failed;
        entry.lag = lag;
        entry.waiting = o.hole_wait.map(|w| (w.sequence, w.since));
        self.hole_wait.get_or_create(&labels).set(
            entry
                .waiting
                .map_or(0.0, |(_, since)| since.elapsed().as_secs_f64()),
        );
    }

    /// Projection `name` is stalled (with why) or no longer.
    pub(crate) fn set_stalled(&self, name: &str, reason: Option<String>) {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_owned())
            .or_default()
            .stalled = reason;
    }

    /// The store's connection is lost (`true`) or back.
    pub(crate) fn set_reconnecting(&self, reconnecting: bool) {
        let mut since = self
            .reconnecting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *since = match (reconnecting, *since) {
            (true, Some(at)) => Some(at),
            (true, None) => Some(Instant::now()),
            (false, _) => None,
        };
    }

    /// A snapshot of projection `name` of `bytes` was taken now.
    pub(crate) fn snapshot_taken(&self, name: &str, bytes: u64) {
        let labels = vec![("projection", name.to_owned())];
        self.snapshot_time.get_or_create(&labels).set(unix_now());
        self.snapshot_bytes
            .get_or_create(&labels)
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// A late event affected projection `name`.
    pub(crate) fn late_event(&self, name: &str) {
        self.late_events
            .get_or_create(&vec![("projection", name.to_owned())])
            .inc();
    }

    /// The metrics in the OpenMetrics text format.
    fn text(&self) -> String {
        // A hole wait grows between reports: measured now.
        for (name, h) in self
            .health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let seconds = h
                .waiting
                .map_or(0.0, |(_, since)| since.elapsed().as_secs_f64());
            self.hole_wait
                .get_or_create(&vec![("projection", name.clone())])
                .set(seconds);
        }
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }

    /// `None` when healthy, else what is wrong.
    fn unhealthy(&self) -> Option<String> {
        let health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        let problems: Vec<String> = health
            .iter()
            .filter_map(|(name, h)| {
                if h.failed {
                    Some(format!("{name}: failed"))
                } else if let Some(reason) = &h.stalled {
                    Some(format!("{name}: stalled ({reason})"))
                } else if let Some((sequence, since)) = h.waiting
                    && since.elapsed() > self.max_wait
                {
                    Some(format!(
                        "{name}: waiting {:.1} s > {} s at hole {sequence} (a transaction that may still commit it is running)",
                        since.elapsed().as_secs_f64(),
                        self.max_wait.as_secs_f64()
                    ))
                } else if h.lag > self.max_lag {
                    Some(format!("{name}: lag {} > {}", h.lag, self.max_lag))
                } else {
                    None
                }
            })
            .collect();
        let mut problems = problems;
        if let Some(since) = *self
            .reconnecting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            && since.elapsed() > self.max_wait
        {
            problems.push(format!(
                "event store: reconnecting for {:.1} s > {} s",
                since.elapsed().as_secs_f64(),
                self.max_wait.as_secs_f64()
            ));
        }
        (!problems.is_empty()).then(|| problems.join("\n"))
    }
}

/// Request headers read at most (hyper's read buffer; its smallest allowed
/// value): a `GET /metrics` needs a few hundred bytes, and a client that
/// sends more is cut off instead of growing memory.
const HTTP_HEADER_BYTES_MAX: usize = 8 * 1024;

/// How long a client may take to send its request headers: a client that
/// stalls (or never sends) holds a connection no longer than this.
const HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one connection may last, whatever it does: a scrape answers in
/// milliseconds.
const HTTP_CONNECTION_TIME_MAX: Duration = Duration::from_secs(10);

/// Connections served at once; more are closed at once. A Prometheus server
/// and a health checker need a few; each open connection holds a task and a
/// small buffer.
const HTTP_CONNECTIONS_MAX: usize = 64;

/// How long stopping the server may wait for connections in progress: a
/// follower's shutdown is never held longer by its clients.
const HTTP_SHUTDOWN_MAX: Duration = Duration::from_secs(1);

/// The HTTP server (hyper, on a thread and a one-thread tokio runtime of its
/// own), listening until dropped. Request bodies are never read: every path
/// is a `GET`, and a request that announces a body is answered 413 and its
/// connection closed, so no client can make the process allocate or wait.
pub(crate) struct Server {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Listens on `addr` and answers from `metrics` on a thread of its own.
    pub(crate) fn start(addr: &str, metrics: std::sync::Arc<Metrics>) -> anyhow::Result<Self> {
        // Bound here, so a taken port is this command's error, at once.
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("listen for --metrics on {addr}"))?;
        listener
            .set_nonblocking(true)
            .context("listen for --metrics")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .context("start the metrics server")?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("pj-metrics".into())
            .spawn(move || runtime.block_on(serve(listener, metrics, stopped)))
            .context("start the metrics thread")?;
        Ok(Server {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts connections until `stopped`, each served by a task of its own
/// within the limits above; then gives the ones in progress at most
/// [`HTTP_SHUTDOWN_MAX`].
async fn serve(
    listener: std::net::TcpListener,
    metrics: std::sync::Arc<Metrics>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                while connections.try_join_next().is_some() {}
                if connections.len() >= HTTP_CONNECTIONS_MAX {
                    drop(stream);
                    continue;
                }
                let metrics = std::sync::Arc::clone(&metrics);
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let response = answer(&request, &metrics);
                        async move { Ok::<_, std::convert::Infallible>(response) }
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HTTP_HEADER_TIMEOUT)
                        .max_buf_size(HTTP_HEADER_BYTES_MAX)
                        .keep_alive(false)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    let _ = tokio::time::timeout(HTTP_CONNECTION_TIME_MAX, connection).await;
                });
            }
        }
    }
    let _ = tokio::time::timeout(HTTP_SHUTDOWN_MAX, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.abort_all();
}

type Body = http_body_util::Full<hyper::body::Bytes>;

fn answer(
    request: &hyper::Request<hyper::body::Incoming>,
    metrics: &Metrics,
) -> hyper::Response<Body> {
    use hyper::body::Body as _;
    let respond = |code: u16, content_type: &str, body: String| {
        hyper::Response::builder()
            .status(code)
            .header("Content-Type", content_type)
            .header("Connection", "close")
            .body(Body::from(body))
            .expect("a valid response")
    };
    let text = "text/plain; charset=utf-8";
    // A body is never read: refused before anything else.
    if request.body().size_hint().upper() != Some(0) {
        return respond(413, text, "no request body is accepted\n".to_owned());
    }
    match (request.method(), request.uri().path()) {
        (&hyper::Method::GET, "/metrics") => respond(
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.text(),
        ),
        (&hyper::Method::GET, "/health") => match metrics.unhealthy() {
            None => respond(200, text, "ok\n".to_owned()),
            Some(problems) => respond(503, text, format!("{problems}\n")),
        },
        _ => respond(404, text, "not found: GET /metrics or /health\n".to_owned()),
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
