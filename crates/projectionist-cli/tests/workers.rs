//! Several `projectionist worker` processes sharing six projections of a
//! PostgreSQL store: one is SIGKILLed mid-rebuild, another SIGSTOPped past its
//! lease. Their projections are taken over, every projection ends equal (by
//! digest) to a single-process rebuild, and the paused worker, once continued,
//! commits nothing more. Needs `PROJECTIONIST_TEST_PG_URL`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use projectionist::rusqlite::Connection;
use projectionist::{DigestScope, projection_digest};

const DEMO_CONFIG: &str = include_str!("../../../examples/orders/projections.toml");
const LEASE_MS: u64 = 1_500;

struct Pg {
    base: String,
    schema: String,
}

impl Pg {
    fn url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!(
            "{}{sep}options=-c%20search_path%3D{}",
            self.base, self.schema
        )
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if let Ok(mut c) = Client::connect(&self.base, NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
        }
    }
}

/// Six projections: the demo's two, three times under other names.
fn six_projections() -> String {
    let mut config = String::new();
    for copy in 1..=3 {
        config.push_str(
            &DEMO_CONFIG
                .replace(
                    "name = \"order_summary\"",
                    &format!("name = \"order_summary_{copy}\""),
                )
                .replace(
                    "name = \"customer_stats\"",
                    &format!("name = \"customer_stats_{copy}\""),
                ),
        );
        config.push('\n');
    }
    config
}

fn projectionist(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_projectionist"));
    cmd.current_dir(dir).args(args);
    cmd
}

fn digest(file: &Path) -> String {
    projection_digest(
        &Connection::open(file).unwrap(),
        DigestScope::ProjectionTables,
    )
    .unwrap()
}

fn checkpoint_of(file: &Path, name: &str) -> u64 {
    let conn = Connection::open(file).unwrap();
    projectionist::SqliteCheckpoint::load_in(&conn, name).unwrap_or(0)
}

/// (projection, owner, epoch, live, done) rows of the lease table.
fn leases(client: &mut Client) -> Vec<(String, String, i64, bool, bool)> {
    client
        .query("SELECT projection, owner, epoch, expires_at > now(), done_hash IS NOT NULL FROM projection_leases", &[])
        .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))).collect())
        // The table appears when the first worker starts.
        .unwrap_or_default()
}

fn signal(child: &Child, sig: &str) {
    assert!(
        Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
}

/// Waits until `worker` holds a live, unfinished lease; returns its projection.
fn wait_for_live_lease(client: &mut Client, worker: &str, deadline: Instant) -> (String, i64) {
    loop {
        if let Some((p, _, epoch, _, _)) = leases(client)
            .into_iter()
            .find(|(_, o, _, live, done)| o == worker && *live && !done)
        {
            return (p, epoch);
        }
        assert!(
            Instant::now() < deadline,
            "{worker} never held a lease: {:?}",
            leases(client)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn three_workers_share_six_projections_through_kill_and_pause() {
    let base = std::env::var("PROJECTIONIST_TEST_PG_URL")
        .expect("set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests");
    let pg = Pg {
        base,
        schema: format!("pj_workers_{}", std::process::id()),
    };
    let mut client = Client::connect(&pg.base, NoTls).unwrap();
    client
        .batch_execute(&format!("CREATE SCHEMA {}", pg.schema))
        .unwrap();
    let url = pg.url();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::write(root.join("projectionist.toml"), six_projections()).unwrap();

    // The log, loaded into PostgreSQL by the demo, and the single-process reference.
    let status = projectionist(
        root,
        &[
            "--quiet", "--store", &url, "--dir", "demo", "demo", "--events", "30000",
        ],
    )
    .status()
    .unwrap();
    assert!(status.success());
    let status = projectionist(
        root,
        &["--quiet", "--store", &url, "--dir", "reference", "rebuild"],
    )
    .status()
    .unwrap();
    assert!(status.success());

    let lease_ms = LEASE_MS.to_string();
    let spawn = |id: &str| {
        projectionist(
            root,
            &[
                "--json",
                "--batch-size",
                "20",
                "--store",
                &url,
                "--dir",
                id,
                "worker",
                "--worker-id",
                id,
                "--lease-ms",
                &lease_ms,
                "--exit-when-done",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
    };
    let mut workers: Vec<Child> = ["w0", "w1", "w2"].iter().map(|id| spawn(id)).collect();
    let mut monitor = Client::connect(&url, NoTls).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);

    // SIGKILL w0 while it rebuilds a projection.
    let (killed_projection, _) = wait_for_live_lease(&mut monitor, "w0", deadline);
    signal(&workers[0], "-KILL");
    workers[0].wait().unwrap();

    // SIGSTOP w1 while it rebuilds; wait until its projection is taken over.
    let (paused_projection, paused_epoch) = wait_for_live_lease(&mut monitor, "w1", deadline);
    signal(&workers[1], "-STOP");
    let paused_file = root.join("w1").join(format!("{paused_projection}.db"));
    let mut epochs_seen: HashMap<String, i64> = HashMap::new();
    loop {
        let rows = leases(&mut monitor);
        for (p, _, epoch, _, _) in &rows {
            let last = epochs_seen.entry(p.clone()).or_insert(*epoch);
            assert!(*epoch >= *last, "epoch of {p} went back");
            *last = *epoch;
        }
        if rows
            .iter()
            .any(|(p, _, epoch, _, _)| *p == paused_projection && *epoch > paused_epoch)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{paused_projection} was never taken over"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let the new owner get going, then wake the paused worker.
    std::thread::sleep(Duration::from_millis(200));
    let checkpoint_when_paused = checkpoint_of(&paused_file, &paused_projection);
    signal(&workers[1], "-CONT");

    let mut outputs = HashMap::new();
    for (id, child) in ["w1", "w2"].iter().zip(workers.drain(1..)) {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{id} exited {}", out.status);
        outputs.insert(*id, String::from_utf8_lossy(&out.stdout).into_owned());
    }
    // The paused worker committed nothing after it woke: its lease was fenced.
    assert_eq!(
        checkpoint_of(&paused_file, &paused_projection),
        checkpoint_when_paused,
        "the paused worker committed after losing its lease"
    );
    let fenced = outputs["w1"]
        .lines()
        .any(|l| l.contains("\"fenced\"") && l.contains(&format!("\"{paused_projection}\"")));
    assert!(fenced, "w1 reported the fence: {}", outputs["w1"]);

    // Every projection is done once, by a live worker, equal to the reference.
    let final_rows = leases(&mut monitor);
    assert_eq!(final_rows.len(), 6);
    let mut completed_by: HashMap<String, String> = HashMap::new();
    for (id, out) in &outputs {
        for line in out.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if v["event"] == "completed" {
                completed_by.insert(
                    v["projection"].as_str().unwrap().to_owned(),
                    (*id).to_owned(),
                );
            }
        }
    }
    for (projection, owner, _, _, done) in &final_rows {
        assert!(done, "{projection} is done");
        assert_eq!(
            completed_by.get(projection),
            Some(owner),
            "{projection} completed by its final owner"
        );
        let file: PathBuf = root.join(owner).join(format!("{projection}.db"));
        let reference = root.join("reference").join(format!("{projection}.db"));
        assert_eq!(
            digest(&file),
            digest(&reference),
            "{projection} built by {owner} equals the reference"
        );
    }
    assert_ne!(
        completed_by.get(&killed_projection).map(String::as_str),
        Some("w0")
    );
}
