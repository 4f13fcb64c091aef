//! Disk space, on a small filesystem of its own (a tmpfs, mounted by the
//! test: CI runs as root; elsewhere without the right to mount, the test says
//! so and does nothing, unless `CI` is set, where it fails).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Env, stderr};

/// A tmpfs mounted at a path, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, bytes: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(path.to_path_buf()))
    }

    fn resize(&self, bytes: u64) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={bytes}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount the tmpfs");
    }

    fn used(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=used", "-B1"])
            .arg(&self.0)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df prints the used bytes")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn files_bytes(dir: &Path, name: &str) -> u64 {
    ["", "-wal", "-shm"]
        .iter()
        .filter_map(|suffix| std::fs::metadata(dir.join(format!("{name}.db{suffix}"))).ok())
        .map(|m| m.len())
        .sum()
}

/// `rebuild --no-keep-previous` keeps no copy of the replaced version, so it
/// asks for about three times the live projection's size, not four: on a disk
/// with room for three and a half, it runs where `rebuild` is refused (naming
/// the space) and changes nothing.
#[test]
fn no_keep_previous_rebuilds_where_keeping_the_previous_version_has_no_room() {
    let env = Env::new();
    env.demo_log(20_000);
    let small = env.path("small");
    let Some(tmpfs) = Tmpfs::mount(&small, 256 << 20) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to mount a tmpfs (run as root)"
        );
        eprintln!("skipped: cannot mount a tmpfs here (not root?)");
        return;
    };
    let build = env
        .command_with(
            "events.db",
            "small",
            &["--quiet", "rebuild", "order_summary"],
        )
        .output()
        .unwrap();
    assert!(build.status.success(), "{}", stderr(&build));
    let live = files_bytes(&small, "order_summary");
    assert!(
        live > 256 << 10,
        "a live projection of some size: {live} bytes"
    );
    // Room for the live file and 3.5 times it more.
    let room = (tmpfs.used() + live * 7 / 2).div_ceil(4096) * 4096;
    tmpfs.resize(room);
    let before = env.checkpoint_in("small", "order_summary");

    let refused = env
        .command_with("events.db", "small", &["rebuild", "order_summary"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(4), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("about 4x its size"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(env.checkpoint_in("small", "order_summary"), before);

    let out = env
        .command_with(
            "events.db",
            "small",
            &["--quiet", "rebuild", "--no-keep-previous", "order_summary"],
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!small.join(".order_summary.previous.db").exists());
    assert!(!small.join(".order_summary.shadow.db").exists());
    assert_eq!(env.checkpoint_in("small", "order_summary"), before);
    drop(tmpfs);
}

/// A full disk is no fault of the events: a projection that skips poison
/// events stops on it (naming the disk) without dead-lettering anything, and
/// once there is room a resume completes it, equal to a build that never ran
/// out of space.
#[test]
fn a_full_disk_stops_a_skipping_projection_and_is_never_dead_lettered() {
    let env = Env::new();
    env.demo_log(20_000);
    let skipping = common::DEMO_CONFIG.replace("version = 1", "version = 1\non_error = \"skip\"");
    assert!(skipping.matches("on_error").count() >= 2, "{skipping}");
    env.write_config(&skipping);
    let reference = run_in(&env, "reference", &["rebuild"]);
    assert!(reference.status.success(), "{}", stderr(&reference));
    let small = env.path("small");
    let needed: u64 = common::DEMO_PROJECTIONS
        .iter()
        .map(|name| files_bytes(&env.path("reference"), name))
        .sum();
    // Room for a quarter of the projections: the disk fills mid-run.
    let Some(tmpfs) = Tmpfs::mount(&small, needed / 4) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to mount a tmpfs (run as root)"
        );
        eprintln!("skipped: cannot mount a tmpfs here (not root?)");
        return;
    };
    let full = run_in(&env, "small", &["rebuild"]);
    assert!(!full.status.success(), "the disk is too small");
    let text = stderr(&full);
    assert!(text.contains("full"), "{text}");
    let letters = run_in(&env, "small", &["--json", "dead-letters"]);
    assert!(letters.status.success(), "{}", stderr(&letters));
    assert_eq!(common::stdout(&letters), "", "nothing was dead-lettered");
    tmpfs.resize(256 << 20);
    let resumed = run_in(&env, "small", &["--json", "resume"]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    for line in common::json_lines(&resumed) {
        if line["event"] == "result" {
            assert_eq!(line["dead_letters"], 0, "{line}");
        }
    }
    for name in common::DEMO_PROJECTIONS {
        let digest = |dir: &str| {
            let conn =
                projectionist::rusqlite::Connection::open(env.path(&format!("{dir}/{name}.db")))
                    .unwrap();
            projectionist::projection_digest(&conn, projectionist::DigestScope::ProjectionTables)
                .unwrap()
        };
        assert_eq!(digest("small"), digest("reference"), "{name}");
    }
}

/// The binary with `--dir dir` (the store and config as [`Env::command`]).
fn run_in(env: &Env, dir: &str, args: &[&str]) -> std::process::Output {
    env.command_with("events.db", dir, args).output().unwrap()
}
