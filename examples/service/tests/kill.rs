//! The service binary killed (SIGKILL) at seeded random moments while
//! orders are posted to it over HTTP, then started again: its projection
//! equals what the event log says, computed with plain SQL: no event lost,
//! none applied twice. `PROJECTIONIST_SEED` repeats a run, `PROJECTIONIST_SOAK`
//! sets the number of kills.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Kills in a default run: a few seconds on two cores.
const KILLS_DEFAULT: u64 = 6;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP request; the status code, or `None` when the service is gone.
fn http(addr: &str, method: &str, path: &str, body: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

fn start(data: &Path, addr: &str) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_projectionist-example-service"))
        .arg(data)
        .arg(addr)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while http(addr, "GET", "/health", "") != Some(200) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the service never answered"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

#[test]
fn sigkills_of_the_service_while_orders_are_posted_lose_and_repeat_nothing() {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    let kills: u64 = var("PROJECTIONIST_SOAK").unwrap_or(KILLS_DEFAULT);
    let seed: u64 = var("PROJECTIONIST_SEED").unwrap_or_else(|| fastrand::u64(..));
    eprintln!(
        "service kill test: seed {seed} (PROJECTIONIST_SEED={seed} repeats it), {kills} kills"
    );
    let mut rng = fastrand::Rng::with_seed(seed);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    for kill in 0..kills {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut service = start(&data, &addr);
        let posting = Arc::new(AtomicBool::new(true));
        let (flag, target) = (Arc::clone(&posting), addr.clone());
        let order_seed = rng.u64(..);
        let poster = std::thread::spawn(move || {
            let mut rng = fastrand::Rng::with_seed(order_seed);
            while flag.load(Ordering::SeqCst) {
                let body = format!(
                    "{{\"order\": \"o-{}\", \"cents\": {}}}",
                    rng.u32(0..20),
                    rng.u32(1..1_000)
                );
                // The service may die mid-request: whatever it committed counts.
                let _ = http(&target, "POST", "/orders", &body);
            }
        });
        std::thread::sleep(Duration::from_millis(rng.u64(50..600)));
        service.kill().unwrap();
        let _ = service.wait();
        posting.store(false, Ordering::SeqCst);
        poster.join().unwrap();
        eprintln!("kill {kill} done");
    }
    // Started once more, it catches up from its checkpoint.
    let addr = format!("127.0.0.1:{}", free_port());
    let mut service = start(&data, &addr);
    assert_eq!(
        http(
            &addr,
            "POST",
            "/orders",
            "{\"order\": \"final\", \"cents\": 1}"
        ),
        Some(200)
    );
    let events = projectionist::rusqlite::Connection::open(data.join("events.db")).unwrap();
    let expected: Vec<(String, i64, i64)> = events
        .prepare(
            "SELECT json_extract(data, '$.order'), sum(json_extract(data, '$.cents')), count(*)
             FROM events GROUP BY 1 ORDER BY 1",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let projection =
        projectionist::rusqlite::Connection::open(data.join("projections/order_totals.db"))
            .unwrap();
    let actual: Vec<(String, i64, i64)> = projection
        .prepare("SELECT order_id, cents, placed FROM order_total ORDER BY 1")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    service.kill().unwrap();
    let _ = service.wait();
    assert!(expected.len() > 1, "orders were posted: {expected:?}");
    assert_eq!(actual, expected, "seed {seed}");
}
