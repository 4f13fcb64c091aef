//! What the end-to-end tests of the binary share: a temporary working directory
//! and the binary run inside it.
#![allow(dead_code)]

pub mod pg;

use std::path::PathBuf;
use std::process::{Command, Output};

use projectionist::rusqlite::Connection;
use projectionist::{DigestScope, projection_digest};

pub const DEMO_CONFIG: &str = include_str!("../../../../examples/orders/projections.toml");

pub struct Env {
    pub tmp: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Self {
        Env {
            tmp: tempfile::tempdir().unwrap(),
        }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
    /// The binary with `--store`, `--dir` and `--config` inside the temp dir.
    pub fn command(&self, args: &[&str]) -> Command {
        self.command_with("events.db", "projections", args)
    }
    /// The binary with this `--store` and `--dir`, and `--config
    /// projections.toml`, inside the temp dir.
    pub fn command_with(&self, store: &str, dir: &str, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_projectionist"));
        command
            .current_dir(self.tmp.path())
            .args([
                "--store",
                store,
                "--dir",
                dir,
                "--config",
                "projections.toml",
            ])
            .args(args);
        command
    }
    /// Runs the binary in the temp dir with only `args` (no default options).
    pub fn run_bare(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_projectionist"))
            .current_dir(self.tmp.path())
            .args(args)
            .output()
            .unwrap()
    }
    /// Runs the binary to completion (see [`Env::command`]).
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }
    pub fn write_config(&self, text: &str) {
        std::fs::write(self.path("projections.toml"), text).unwrap();
    }
    /// A demo log of `n` events and the demo config.
    pub fn demo_log(&self, n: u64) {
        self.write_config(DEMO_CONFIG);
        let out = self.run(&["--quiet", "demo", "--events", &n.to_string()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.write_config(DEMO_CONFIG);
    }
    /// The demo config, and a demo log of `n` events in the PostgreSQL store
    /// `url` with its projections built in `projections`.
    pub fn pg_demo_log(&self, url: &str, n: u64) {
        self.write_config(DEMO_CONFIG);
        let out = self
            .command_with(
                url,
                "projections",
                &["--quiet", "demo", "--events", &n.to_string()],
            )
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    /// The checkpoint in projection `name`'s file in directory `dir`, read
    /// through a connection of its own (0 when there is no file yet).
    pub fn checkpoint_in(&self, dir: &str, name: &str) -> u64 {
        let path = self.path(&format!("{dir}/{name}.db"));
        if !path.exists() {
            return 0;
        }
        let conn = Connection::open(path).unwrap();
        projectionist::SqliteCheckpoint::load_in(&conn, name).unwrap_or(0)
    }
    /// Whether projection `projection`'s file has an index named `index`,
    /// read through a connection of its own.
    pub fn has_index(&self, projection: &str, index: &str) -> bool {
        let conn = Connection::open(self.path(&format!("projections/{projection}.db"))).unwrap();
        conn.query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'index' AND name = ?1",
            [index],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
            == 1
    }
    pub fn digest(&self, name: &str) -> String {
        let conn = Connection::open(self.path(&format!("projections/{name}.db"))).unwrap();
        projection_digest(&conn, DigestScope::All).unwrap()
    }
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    stdout(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// A child process that is killed when dropped, so a failing test never
/// leaves a follower or a worker running.
pub struct Reaped(Option<std::process::Child>);

impl Reaped {
    pub fn new(child: std::process::Child) -> Self {
        Reaped(Some(child))
    }
    /// The child, no longer killed on drop.
    pub fn into_inner(mut self) -> std::process::Child {
        self.0.take().expect("a child")
    }
}

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("a child")
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.as_mut().expect("a child")
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sets a flag when dropped: stops a test's helper threads even when the test
/// panics (a scope would otherwise wait for them forever).
pub struct SetOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A free local port (there is a small window in which another process could
/// take it; good enough for a test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over plain HTTP/1.0: the status code and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut stream = loop {
        match std::net::TcpStream::connect(addr) {
            Ok(stream) => break stream,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "connect to {addr}: {e}"
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    };
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_owned());
    (code, body)
}

/// The value of one series of an OpenMetrics text, e.g.
/// `metric(&text, "projectionist_lag_events", "order_summary")`.
pub fn metric(text: &str, name: &str, projection: &str) -> Option<f64> {
    let prefix = format!("{name}{{projection=\"{projection}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
}

/// The demo config's projections.
pub const DEMO_PROJECTIONS: [&str; 2] = ["order_summary", "customer_stats"];

/// Sends SIGTERM to `child`.
pub fn sigterm(child: &std::process::Child) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits until `check` holds, looking every 20 ms; panics naming `what` once
/// `deadline` has passed (a bound for a broken run, not a speed requirement).
pub fn wait_until(what: &str, deadline: std::time::Duration, mut check: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + deadline;
    while !check() {
        assert!(
            std::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The seed of a randomised test: `PROJECTIONIST_SEED` replays one (a number;
/// anything else is refused), else a fresh one. Printed with `what`, so a
/// failure's output says how to repeat it.
pub fn seed(what: &str) -> u64 {
    let seed = match std::env::var("PROJECTIONIST_SEED") {
        Ok(text) => text.parse().expect("PROJECTIONIST_SEED is a number"),
        Err(_) => fastrand::u64(..),
    };
    eprintln!("{what}: seed {seed} (PROJECTIONIST_SEED={seed} repeats it)");
    seed
}

/// How many times a soak repeats its step: `PROJECTIONIST_SOAK`, else `default`.
pub fn soak(default: u64) -> u64 {
    std::env::var("PROJECTIONIST_SOAK")
        .ok()
        .map(|text| text.parse().expect("PROJECTIONIST_SOAK is a number"))
        .unwrap_or(default)
}
