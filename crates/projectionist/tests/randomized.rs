//! Randomised model test: for random logs, batch sizes, commit intervals and
//! interruption points (cancellations and handler failures), resuming until done
//! gives exactly the tables of one uninterrupted run, and the checkpoint never
//! moves back. Prints its seed; `PROJECTIONIST_SEED` replays one,
//! `PROJECTIONIST_RANDOM_CASES` scales the number of cases (default 12).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{BankHandler, bank_store, checkpoint, config, digest, options};
use projectionist::{CancelToken, Error, ProjectionDir, rebuild, resume};

#[test]
fn interrupted_runs_resume_to_the_uninterrupted_result() {
    let seed: u64 = std::env::var("PROJECTIONIST_SEED")
        .ok()
        .map(|s| s.parse().expect("PROJECTIONIST_SEED is a number"))
        .unwrap_or_else(|| fastrand::u64(..));
    let cases: u32 = std::env::var("PROJECTIONIST_RANDOM_CASES")
        .ok()
        .map(|s| s.parse().expect("PROJECTIONIST_RANDOM_CASES is a number"))
        .unwrap_or(12);
    eprintln!("randomized: seed {seed} (replay with PROJECTIONIST_SEED={seed}), {cases} cases");
    let mut rng = fastrand::Rng::with_seed(seed);
    for case in 0..cases {
        let tmp = tempfile::tempdir().unwrap();
        let n_events = rng.u64(1..3_000);
        let store = bank_store(&tmp.path().join("events.db"), n_events, rng.u64(..));
        let dir = ProjectionDir::open(tmp.path().join("p")).unwrap();
        let reference = dir.db("reference").unwrap();
        rebuild(config(
            &store,
            &reference,
            &mut BankHandler::default(),
            options(500),
        ))
        .unwrap();

        let db = dir.db("bank").unwrap();
        let mut first = true;
        let mut last_checkpoint = 0;
        let mut attempts = 0;
        loop {
            attempts += 1;
            assert!(attempts < 100, "case {case} (seed {seed}) never finished");
            let batch_size = rng.u32(1..700);
            let commit_interval = if rng.bool() {
                Duration::ZERO
            } else {
                Duration::from_millis(rng.u64(0..50))
            };
            // Interrupt this attempt after a random number of batches, by
            // cancellation or by a failing event, or let it run to the end.
            let cancel = CancelToken::new();
            let cancel_after = rng.u64(1..12);
            let batches = AtomicU64::new(0);
            let progress = |p: &projectionist::Progress| {
                if !p.done && batches.fetch_add(1, Ordering::SeqCst) + 1 >= cancel_after {
                    cancel.cancel();
                }
            };
            let mode = rng.u8(0..3);
            let fail_at = (mode == 1).then(|| rng.u64(1..=n_events));
            let mut opts = options(batch_size)
                .commit_interval(commit_interval)
                .cancel(&cancel);
            opts.progress = (mode == 0).then_some(&progress as &projectionist::ProgressFn<'_>);
            let mut handler = BankHandler { fail_at };
            let result = if first {
                rebuild(config(&store, &db, &mut handler, opts))
            } else {
                resume(config(&store, &db, &mut handler, opts))
            };
            first = false;
            let now = checkpoint(&db, "bank");
            assert!(
                now >= last_checkpoint,
                "case {case} (seed {seed}): checkpoint went back {last_checkpoint} -> {now}"
            );
            last_checkpoint = now;
            match result {
                Ok(done) => {
                    assert_eq!(done.checkpoint, n_events);
                    break;
                }
                Err(Error::Cancelled { committed, .. } | Error::Handler { committed, .. }) => {
                    assert_eq!(
                        committed, now,
                        "case {case} (seed {seed}): the error names the committed checkpoint"
                    );
                }
                Err(other) => panic!("case {case} (seed {seed}): {other}"),
            }
        }
        assert_eq!(
            digest(&db),
            digest(&reference),
            "case {case} (seed {seed}) after {attempts} attempts"
        );
    }
}
