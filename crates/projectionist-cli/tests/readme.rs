//! The commands of README.md's tour run as written, in the directory the
//! demo leaves, and succeed: the front page cannot drift from the tool.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, sigterm, stderr};

/// The `projectionist ...` lines of the README's tour (comments dropped).
fn tour_commands() -> Vec<Vec<String>> {
    let readme = include_str!("../../../README.md");
    let tour = readme
        .split("## A five-minute tour")
        .nth(1)
        .expect("the README has a tour");
    let block = tour
        .split("```sh")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the tour has a sh block");
    block
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| l.starts_with("projectionist "))
        .map(|l| l.split_whitespace().skip(1).map(str::to_owned).collect())
        .collect()
}

#[test]
fn the_readme_tour_runs_as_written_in_the_demo_directory() {
    let env = Env::new();
    let out = env.run_bare(&["--quiet", "demo", "--events", "3000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let demo = env.path("demo");
    let commands = tour_commands();
    assert!(commands.len() >= 5, "{commands:?}");
    for args in commands {
        let mut command = Command::new(env!("CARGO_BIN_EXE_projectionist"));
        command.current_dir(&demo).args(&args);
        if args[0] == "follow" {
            // Runs until stopped: it registers, then SIGTERM commits and exits 0.
            let child = command
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let registered = demo.join("projections/.order_summary.follower");
            let started = Instant::now();
            while !registered.exists() {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "follow never started"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            sigterm(&child);
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{args:?}: {}", stderr(&out));
            continue;
        }
        let out = command.output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
}
