//! The rebuild engine through the public API, on real SQLite files: batch-size
//! independence, exactly-once failure handling, cancellation and resume,
//! bounded concurrency, the shared (fan-out) read and option validation.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{BankEvent, BankHandler, OpenedOnly, bank_store, checkpoint, config, digest, options};
use projectionist::rusqlite::Transaction;
use projectionist::{
    BoxError, CancelToken, Checkpoint, CheckpointLocation, Error, GlobalEvent, GlobalReader,
    Handler, ProjectionDir, ProjectionTarget, RebuildConfig, RebuildOptions, SqliteCheckpoint,
    Start, limits, rebuild, rebuild_concurrent, replay, resume,
};

const N_EVENTS: u64 = 10_000;

struct Fixture {
    _tmp: tempfile::TempDir,
    store: projectionist::SqliteEventStore,
    dir: ProjectionDir,
}

fn fixture(n_events: u64) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let store = bank_store(&tmp.path().join("events.db"), n_events, 7);
    let dir = ProjectionDir::open(tmp.path().join("projections")).unwrap();
    Fixture {
        _tmp: tmp,
        store,
        dir,
    }
}

/// A projection rebuilt without interruption, as the reference for a test.
fn rebuilt(
    f: &Fixture,
    name: &str,
    batch_size: u32,
) -> std::sync::Arc<projectionist::ProjectionDb> {
    let db = f.dir.db(name).unwrap();
    let mut handler = BankHandler::default();
    rebuild(config(&f.store, &db, &mut handler, options(batch_size))).unwrap();
    db
}

/// The reference: every event applied on its own, in its own transaction,
/// without the engine.
fn one_by_one_digest(f: &Fixture) -> String {
    let db = f.dir.db("one_by_one").unwrap();
    let mut handler = BankHandler::default();
    let events: Vec<GlobalEvent<BankEvent>> = {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let batch: Vec<GlobalEvent<BankEvent>> = f.store.read_after(after, 1000).unwrap();
            let Some(last) = batch.last() else { break };
            after = last.sequence;
            all.extend(batch);
        }
        all
    };
    assert_eq!(events.len() as u64, N_EVENTS);
    db.write(|tx| handler.setup(tx)).unwrap();
    for event in &events {
        db.write(|tx| handler.apply(tx, std::slice::from_ref(event)))
            .unwrap();
    }
    digest(&db)
}

#[test]
fn digest_is_independent_of_batch_size_and_equals_one_by_one() {
    let f = fixture(N_EVENTS);
    let reference = one_by_one_digest(&f);
    for batch_size in [1, 7, 500, 50_000] {
        let db = f.dir.db(&format!("bank_{batch_size}")).unwrap();
        let mut handler = BankHandler::default();
        let result = rebuild(config(&f.store, &db, &mut handler, options(batch_size))).unwrap();
        assert_eq!(result.processed, N_EVENTS, "batch size {batch_size}");
        assert_eq!(result.checkpoint, N_EVENTS);
        assert_eq!(result.total, N_EVENTS);
        assert_eq!(checkpoint(&db, "bank"), N_EVENTS);
        assert_eq!(digest(&db), reference, "batch size {batch_size}");
    }
}

#[test]
fn rebuild_twice_starts_from_scratch() {
    let f = fixture(2_000);
    let db = f.dir.db("bank").unwrap();
    let mut handler = BankHandler::default();
    rebuild(config(&f.store, &db, &mut handler, options(100))).unwrap();
    let first = digest(&db);
    let result = rebuild(config(&f.store, &db, &mut handler, options(333))).unwrap();
    assert_eq!(
        result.processed, 2_000,
        "a rebuild replays everything again"
    );
    assert_eq!(
        digest(&db),
        first,
        "old rows were dropped before the replay"
    );
}

#[test]
fn handler_error_leaves_previous_batch_committed() {
    let f = fixture(3_000);
    let batch_size = 100;
    // The event at 1_250 is in batch 13 (1_201..=1_300).
    let failing = 1_250;
    let reference_db = f.dir.db("reference").unwrap();
    {
        // The state after batch 12, built by a rebuild of a log cut at 1_200.
        let cut = projectionist::MemoryEventStore::<BankEvent>::new();
        let mut after = 0;
        while after < 1_200 {
            let batch: Vec<GlobalEvent<BankEvent>> = f.store.read_after(after, 100).unwrap();
            for e in batch {
                // Append keeps each event's stream; versions in the memory store are its own.
                let version = cut_version(&cut, &e.stream_id);
                cut.append(
                    &e.stream_id,
                    version,
                    vec![(e.event_type.clone(), e.data.clone())],
                )
                .unwrap();
                after = e.sequence;
            }
        }
        let mut handler = BankHandler::default();
        rebuild(RebuildConfig {
            reader: &cut,
            projection: ProjectionTarget::new(&reference_db, &mut handler).consumer_id("bank"),
            options: options(batch_size),
        })
        .unwrap();
    }
    for commit_interval in [
        Duration::ZERO,
        projectionist::limits::COMMIT_INTERVAL_DEFAULT,
    ] {
        handler_error_case(&f, &reference_db, failing, commit_interval);
    }
}

/// A handler failing at `failing` (batch 13 of 100 events) leaves exactly the
/// state after batch 12, whether batches commit one by one or in groups.
fn handler_error_case(
    f: &Fixture,
    reference_db: &projectionist::ProjectionDb,
    failing: u64,
    commit_interval: Duration,
) {
    let batch_size = 100;
    let db = f
        .dir
        .db(&format!("bank-{}", commit_interval.as_millis()))
        .unwrap();
    let opts = options(batch_size).commit_interval(commit_interval);
    let mut handler = BankHandler {
        fail_at: Some(failing),
    };
    let err = rebuild(config(&f.store, &db, &mut handler, opts)).unwrap_err();
    match &err {
        Error::Handler {
            name,
            committed,
            first_sequence,
            last_sequence,
            ..
        } => {
            assert_eq!(*name, format!("bank-{}", commit_interval.as_millis()));
            assert_eq!(*committed, 1_200);
            assert_eq!((*first_sequence, *last_sequence), (1_201, 1_300));
        }
        other => panic!("expected a handler error, got {other:?}"),
    }
    assert!(err.to_string().contains("refusing event 1250"), "{err}");
    assert_eq!(checkpoint(&db, "bank"), 1_200);
    assert_eq!(
        digest(&db),
        digest(reference_db),
        "tables are exactly as after batch 12"
    );

    // Fixing the handler and resuming completes the projection.
    handler.fail_at = None;
    let resumed = resume(config(&f.store, &db, &mut handler, options(batch_size))).unwrap();
    assert_eq!(resumed.processed, 1_800);
    let clean = rebuilt(
        f,
        &format!("clean-{}", commit_interval.as_millis()),
        batch_size,
    );
    assert_eq!(digest(&db), digest(&clean));
}

fn cut_version(store: &projectionist::MemoryEventStore<BankEvent>, stream_id: &str) -> u64 {
    let all: Vec<GlobalEvent<BankEvent>> = store.read_after(0, 50_000).unwrap();
    all.iter().filter(|e| e.stream_id == stream_id).count() as u64
}

#[test]
fn handler_panic_is_an_error_and_rolls_back() {
    let f = fixture(500);
    let db = f.dir.db("bank").unwrap();
    let mut calls = 0;
    let mut handler =
        |tx: &Transaction<'_>, events: &[GlobalEvent<BankEvent>]| -> Result<(), BoxError> {
            tx.execute_batch("CREATE TABLE IF NOT EXISTS seen (n INTEGER)")?;
            tx.execute("INSERT INTO seen VALUES (?1)", [events.len() as i64])?;
            calls += 1;
            assert!(calls < 3, "boom in batch {calls}");
            Ok(())
        };
    let err = rebuild(RebuildConfig {
        reader: &f.store,
        projection: ProjectionTarget::new(&db, &mut handler).consumer_id("bank"),
        options: options(100),
    })
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("handler panicked: boom in batch 3"),
        "{err}"
    );
    assert_eq!(err.committed(), Some(200));
    let rows: i64 = db
        .open_reader()
        .unwrap()
        .query_row("SELECT COUNT(*) FROM seen", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 2, "the panicking batch rolled back");
}

#[test]
fn cancel_stops_within_one_batch_and_resume_matches() {
    let f = fixture(N_EVENTS);
    let clean = rebuilt(&f, "clean", 250);
    // Commit after every batch, and in commit groups (the default).
    for commit_interval in [
        Duration::ZERO,
        projectionist::limits::COMMIT_INTERVAL_DEFAULT,
    ] {
        let db = f
            .dir
            .db(&format!("bank-{}", commit_interval.as_millis()))
            .unwrap();
        let cancel = CancelToken::new();
        let cancelled_at = Mutex::new(None);
        let progress = |p: &projectionist::Progress| {
            if !p.done && p.processed >= 2_000 && !cancel.is_cancelled() {
                *cancelled_at.lock().unwrap() = Some(p.processed);
                cancel.cancel();
            }
        };
        let opts = RebuildOptions::new()
            .batch_size(250)
            .commit_interval(commit_interval)
            .progress(&progress)
            .cancel(&cancel);
        let err = rebuild(config(&f.store, &db, &mut BankHandler::default(), opts)).unwrap_err();
        // The log is dense from 1, so after n events the checkpoint is n.
        let at = cancelled_at.lock().unwrap().unwrap();
        match err {
            Error::Cancelled { committed, .. } => {
                assert_eq!(
                    committed, at,
                    "every applied batch committed, none after the cancel"
                );
            }
            other => panic!("expected cancellation, got {other:?}"),
        }
        assert_eq!(checkpoint(&db, "bank"), at);
        let resumed = resume(config(
            &f.store,
            &db,
            &mut BankHandler::default(),
            options(250),
        ))
        .unwrap();
        assert_eq!(resumed.processed, N_EVENTS - at);
        assert_eq!(digest(&db), digest(&clean));
    }
}

#[test]
fn progress_reports_every_batch_and_the_end() {
    let f = fixture(1_000);
    let db = f.dir.db("bank").unwrap();
    let seen = Mutex::new(Vec::new());
    let progress = |p: &projectionist::Progress| seen.lock().unwrap().push(p.clone());
    let opts = options(300).progress(&progress);
    rebuild(config(&f.store, &db, &mut BankHandler::default(), opts)).unwrap();
    let seen = seen.into_inner().unwrap();
    let processed: Vec<(u64, bool)> = seen.iter().map(|p| (p.processed, p.done)).collect();
    assert_eq!(
        processed,
        [
            (300, false),
            (600, false),
            (900, false),
            (1_000, false),
            (1_000, true)
        ]
    );
    assert!(
        seen.iter()
            .all(|p| p.total == 1_000 && p.projection_name == "bank" && p.err.is_none())
    );
}

#[test]
fn failed_run_reports_err_in_last_progress() {
    let f = fixture(1_000);
    let db = f.dir.db("bank").unwrap();
    let last = Mutex::new(None);
    let progress = |p: &projectionist::Progress| *last.lock().unwrap() = Some(p.clone());
    let opts = options(300).progress(&progress);
    let mut handler = BankHandler { fail_at: Some(700) };
    rebuild(config(&f.store, &db, &mut handler, opts)).unwrap_err();
    let last = last.into_inner().unwrap().unwrap();
    assert!(last.done);
    assert_eq!(last.checkpoint, 600);
    assert!(last.err.unwrap().contains("refusing event 700"));
}

#[test]
fn batch_size_zero_means_default_and_over_max_is_an_error() {
    let f = fixture(1_200);
    let db = f.dir.db("bank").unwrap();
    let batches = AtomicUsize::new(0);
    let progress = |p: &projectionist::Progress| {
        if !p.done {
            batches.fetch_add(1, Ordering::SeqCst);
        }
    };
    let opts = options(0).progress(&progress);
    rebuild(config(&f.store, &db, &mut BankHandler::default(), opts)).unwrap();
    assert_eq!(
        batches.load(Ordering::SeqCst),
        3,
        "1,200 events in batches of 500"
    );

    let before = digest(&db);
    let err = rebuild(config(
        &f.store,
        &db,
        &mut BankHandler::default(),
        options(limits::BATCH_SIZE_MAX + 1),
    ))
    .unwrap_err();
    assert!(matches!(err, Error::InvalidOptions(_)), "{err:?}");
    assert!(
        err.to_string().contains("50001") && err.to_string().contains("50000"),
        "{err}"
    );
    assert_eq!(digest(&db), before, "an invalid rebuild touches nothing");
    assert_eq!(checkpoint(&db, "bank"), 1_200);
}

#[test]
fn invalid_consumer_id_is_rejected_before_anything_changes() {
    let f = fixture(100);
    let db = rebuilt(&f, "bank", 10);
    let before = digest(&db);
    let mut handler = BankHandler::default();
    let err = rebuild(RebuildConfig {
        reader: &f.store,
        projection: ProjectionTarget::new(&db, &mut handler).consumer_id(""),
        options: options(10),
    })
    .unwrap_err();
    assert!(err.to_string().contains("consumer id is empty"), "{err}");
    assert_eq!(digest(&db), before);
}

/// Counts how many rebuilds are between `setup` and their final progress report.
struct Gauge {
    active: AtomicUsize,
    max: AtomicUsize,
}

struct GaugedHandler<'a> {
    gauge: &'a Gauge,
}

impl Handler<BankEvent> for GaugedHandler<'_> {
    fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        let now = self.gauge.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.gauge.max.fetch_max(now, Ordering::SeqCst);
        tx.execute_batch("CREATE TABLE IF NOT EXISTS n (events INTEGER)")?;
        Ok(())
    }

    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        events: &[GlobalEvent<BankEvent>],
    ) -> Result<(), BoxError> {
        // Long enough that all admitted rebuilds overlap.
        std::thread::sleep(Duration::from_millis(20));
        tx.execute("INSERT INTO n VALUES (?1)", [events.len() as i64])?;
        Ok(())
    }
}

#[test]
fn rebuild_concurrent_caps_parallelism_and_keeps_order() {
    let f = fixture(300);
    let gauge = Gauge {
        active: AtomicUsize::new(0),
        max: AtomicUsize::new(0),
    };
    let done = |p: &projectionist::Progress| {
        if p.done {
            gauge.active.fetch_sub(1, Ordering::SeqCst);
        }
    };
    let dbs: Vec<_> = (0..40)
        .map(|i| f.dir.db(&format!("p{i:02}")).unwrap())
        .collect();
    let mut handlers: Vec<GaugedHandler<'_>> =
        (0..40).map(|_| GaugedHandler { gauge: &gauge }).collect();
    let configs: Vec<RebuildConfig<'_, BankEvent>> = dbs
        .iter()
        .zip(handlers.iter_mut())
        .map(|(db, handler)| RebuildConfig {
            reader: &f.store,
            projection: ProjectionTarget::new(db, handler).consumer_id("c"),
            options: options(100).progress(&done),
        })
        .collect();
    let results = rebuild_concurrent(configs);
    assert_eq!(results.len(), 40);
    for (i, result) in results.iter().enumerate() {
        let result = result.as_ref().unwrap();
        assert_eq!(
            result.projection_name,
            format!("p{i:02}"),
            "results in input order"
        );
        assert_eq!(result.processed, 300);
    }
    let max = gauge.max.load(Ordering::SeqCst);
    assert!(
        max <= limits::CONCURRENT_REBUILDS_MAX as usize,
        "{max} rebuilds ran at once"
    );
    assert!(max > 1, "rebuilds ran in parallel (max {max})");
}

#[test]
fn rebuild_concurrent_one_failure_does_not_stop_the_others() {
    let f = fixture(1_000);
    let dbs: Vec<_> = (0..3)
        .map(|i| f.dir.db(&format!("p{i}")).unwrap())
        .collect();
    let mut handlers = [
        BankHandler::default(),
        BankHandler { fail_at: Some(10) },
        BankHandler::default(),
    ];
    let configs = dbs
        .iter()
        .zip(handlers.iter_mut())
        .map(|(db, handler)| config(&f.store, db, handler, options(100)))
        .collect();
    let results = rebuild_concurrent(configs);
    assert!(results[0].is_ok() && results[2].is_ok());
    assert_eq!(results[1].as_ref().unwrap_err().committed(), Some(0));
    assert_eq!(digest(&dbs[0]), digest(&dbs[2]));
}

/// Counts reads, to prove the shared rebuild reads the log once.
struct CountingReader<'a> {
    inner: &'a projectionist::SqliteEventStore,
    reads: AtomicUsize,
}

impl GlobalReader<BankEvent> for CountingReader<'_> {
    fn read_after(
        &self,
        after: u64,
        limit: u32,
    ) -> projectionist::Result<Vec<GlobalEvent<BankEvent>>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_after(after, limit)
    }
    fn head(&self) -> projectionist::Result<u64> {
        GlobalReader::<BankEvent>::head(self.inner)
    }
}

#[test]
fn shared_rebuild_reads_once_and_matches_separate_rebuilds() {
    let f = fixture(5_000);
    let separate = rebuilt(&f, "separate", 500);
    let reader = CountingReader {
        inner: &f.store,
        reads: AtomicUsize::new(0),
    };
    let dbs: Vec<_> = (0..4)
        .map(|i| f.dir.db(&format!("shared{i}")).unwrap())
        .collect();
    let mut handlers: Vec<BankHandler> = (0..4).map(|_| BankHandler::default()).collect();
    let targets = dbs
        .iter()
        .zip(handlers.iter_mut())
        .map(|(db, handler)| {
            ProjectionTarget::new(db, handler as &mut dyn Handler<BankEvent>)
                .consumer_id("bank")
                .start(Start::Reset)
        })
        .collect();
    let results = replay(&reader, targets, &options(500));
    for (db, result) in dbs.iter().zip(&results) {
        assert_eq!(result.as_ref().unwrap().processed, 5_000);
        assert_eq!(digest(db), digest(&separate));
    }
    // 10 full batches, then one empty read that finds the end.
    assert_eq!(
        reader.reads.load(Ordering::SeqCst),
        11,
        "the log was read once for all four"
    );
}

#[test]
fn shared_resume_continues_each_projection_from_its_own_checkpoint() {
    let f = fixture(4_000);
    let clean = rebuilt(&f, "clean", 500);
    // Stop two projections at different places with failing handlers.
    let a = f.dir.db("a").unwrap();
    let b = f.dir.db("b").unwrap();
    rebuild(config(
        &f.store,
        &a,
        &mut BankHandler {
            fail_at: Some(1_100),
        },
        options(500),
    ))
    .unwrap_err();
    rebuild(config(
        &f.store,
        &b,
        &mut BankHandler {
            fail_at: Some(3_100),
        },
        options(500),
    ))
    .unwrap_err();
    assert_eq!(
        (checkpoint(&a, "bank"), checkpoint(&b, "bank")),
        (1_000, 3_000)
    );
    let mut handlers = [BankHandler::default(), BankHandler::default()];
    let [ha, hb] = &mut handlers;
    let targets = vec![
        ProjectionTarget::new(&a, ha as &mut dyn Handler<BankEvent>).consumer_id("bank"),
        ProjectionTarget::new(&b, hb as &mut dyn Handler<BankEvent>).consumer_id("bank"),
    ];
    let results = replay(&f.store, targets, &options(500));
    assert_eq!(results[0].as_ref().unwrap().processed, 3_000);
    assert_eq!(results[1].as_ref().unwrap().processed, 1_000);
    assert_eq!(digest(&a), digest(&clean));
    assert_eq!(digest(&b), digest(&clean));
}

#[test]
fn decode_error_stops_at_last_committed_batch_and_names_the_event() {
    let tmp = tempfile::tempdir().unwrap();
    let store = bank_store(&tmp.path().join("events.db"), 250, 3);
    store
        .append(
            "acc-bad",
            0,
            &[projectionist::NewEvent {
                event_type: "Opened".into(),
                data: "{\"owner\": 42}".into(),
                metadata: None,
            }],
        )
        .unwrap();
    let dir = ProjectionDir::open(tmp.path().join("p")).unwrap();
    let db = dir.db("bank").unwrap();
    let err = rebuild(config(
        &store,
        &db,
        &mut BankHandler::default(),
        options(100),
    ))
    .unwrap_err();
    let text = err.to_string();
    // The events before the poison event (201..=250) are applied as a batch of
    // their own; the projection stops just before it.
    assert_eq!(err.committed(), Some(250), "{text}");
    assert!(
        text.contains("sequence 251") && text.contains("acc-bad") && text.contains("Opened"),
        "{text}"
    );
    assert_eq!(checkpoint(&db, "bank"), 250);
}

#[test]
fn external_checkpoint_is_saved_after_each_batch() {
    /// Records every value saved, so the test sees each save, not only the last.
    struct Recording<'a> {
        inner: SqliteCheckpoint,
        saved: &'a Mutex<Vec<u64>>,
    }
    impl Checkpoint for Recording<'_> {
        fn load(&self, consumer_id: &str) -> projectionist::Result<u64> {
            self.inner.load(consumer_id)
        }
        fn save(&self, consumer_id: &str, sequence: u64) -> projectionist::Result<()> {
            self.saved.lock().unwrap().push(sequence);
            self.inner.save(consumer_id, sequence)
        }
        fn reset(&self, consumer_id: &str) -> projectionist::Result<()> {
            self.inner.reset(consumer_id)
        }
    }
    let f = fixture(1_000);
    let db = f.dir.db("bank").unwrap();
    let checkpoint_db = f.dir.db("checkpoints").unwrap();
    let saved = Mutex::new(Vec::new());
    let external = Recording {
        inner: SqliteCheckpoint::new(checkpoint_db.clone()),
        saved: &saved,
    };
    let mut handler = BankHandler::default();
    let result = rebuild(RebuildConfig {
        reader: &f.store,
        projection: ProjectionTarget::new(&db, &mut handler)
            .checkpoint(CheckpointLocation::External(&external))
            .consumer_id("bank"),
        options: options(300).commit_interval(Duration::ZERO),
    })
    .unwrap();
    assert_eq!(result.checkpoint, 1_000);
    assert_eq!(external.load("bank").unwrap(), 1_000);
    assert_eq!(*saved.lock().unwrap(), [300, 600, 900, 1_000]);
    assert_eq!(
        checkpoint(&db, "bank"),
        0,
        "the projection file's own checkpoint is untouched"
    );
    let clean = rebuilt(&f, "clean", 300);
    assert_eq!(digest(&db), digest(&clean));
}

#[test]
fn sync_api_runs_from_async_code_via_spawn_blocking() {
    let f = Arc::new(fixture(1_000));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let fixture = Arc::clone(&f);
    let result = runtime.block_on(async move {
        tokio::task::spawn_blocking(move || {
            let db = fixture.dir.db("bank").unwrap();
            rebuild(config(
                &fixture.store,
                &db,
                &mut BankHandler::default(),
                options(100),
            ))
        })
        .await
        .unwrap()
    });
    assert_eq!(result.unwrap().processed, 1_000);
    assert_eq!(checkpoint(&f.dir.db("bank").unwrap(), "bank"), 1_000);
}

#[test]
fn commit_interval_over_max_and_own_file_as_external_checkpoint_are_rejected() {
    let f = fixture(100);
    let db = f.dir.db("bank").unwrap();
    let too_long = options(10)
        .commit_interval(projectionist::limits::COMMIT_INTERVAL_MAX + Duration::from_millis(1));
    let err = rebuild(config(&f.store, &db, &mut BankHandler::default(), too_long)).unwrap_err();
    assert!(err.to_string().contains("commit interval"), "{err}");

    let own = SqliteCheckpoint::new(db.clone());
    let mut handler = BankHandler::default();
    let err = rebuild(RebuildConfig {
        reader: &f.store,
        projection: ProjectionTarget::new(&db, &mut handler)
            .checkpoint(CheckpointLocation::External(&own))
            .consumer_id("bank"),
        options: options(10),
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("CheckpointLocation::InFile"),
        "{err}"
    );
    assert_eq!(checkpoint(&db, "bank"), 0, "nothing ran");
}

#[test]
fn filtered_reads_apply_only_declared_types_and_reach_the_head() {
    let f = fixture(3_000);
    let memory = projectionist::MemoryEventStore::<BankEvent>::new();
    let all: Vec<GlobalEvent<BankEvent>> = f.store.read_after(0, 50_000).unwrap();
    for e in &all {
        let version = e.stream_version - 1;
        memory
            .append(
                &e.stream_id,
                version,
                vec![(e.event_type.clone(), e.data.clone())],
            )
            .unwrap();
    }
    let n_opened = all.iter().filter(|e| e.event_type == "Opened").count();
    let last_opened = all
        .iter()
        .rev()
        .find(|e| e.event_type == "Opened")
        .unwrap()
        .sequence;
    assert!(last_opened < 3_000, "the log ends with other types");
    // SQLite pushes the filter into its query; the memory store uses the default.
    let readers: [(&str, &dyn GlobalReader<BankEvent>); 2] =
        [("sqlite", &f.store), ("memory", &memory)];
    for (label, reader) in readers {
        let db = f.dir.db(&format!("opened-{label}")).unwrap();
        let result = rebuild(RebuildConfig {
            reader,
            projection: ProjectionTarget::new(&db, &mut OpenedOnly).consumer_id("opened"),
            options: options(64),
        })
        .unwrap();
        assert_eq!(result.processed as usize, n_opened, "{label}");
        assert_eq!(
            result.checkpoint, 3_000,
            "{label}: the checkpoint reached the head"
        );
        assert_eq!(checkpoint(&db, "opened"), 3_000, "{label}");
        let rows: i64 = db
            .open_reader()
            .unwrap()
            .query_row("SELECT COUNT(*) FROM opened", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows as usize, n_opened, "{label}");
    }
}

#[test]
fn commit_guard_refusal_rolls_back_and_stops_the_projection() {
    let f = fixture(1_000);
    let db = f.dir.db("bank").unwrap();
    let calls = AtomicUsize::new(0);
    // The start transaction and the first three batch commits are allowed.
    let guard = |_: &str| -> Result<(), BoxError> {
        if calls.fetch_add(1, Ordering::SeqCst) < 4 {
            Ok(())
        } else {
            Err("lease lost".into())
        }
    };
    let opts = options(100)
        .commit_interval(Duration::ZERO)
        .commit_guard(&guard);
    let err = rebuild(config(&f.store, &db, &mut BankHandler::default(), opts)).unwrap_err();
    assert!(
        matches!(err, Error::Fenced { committed: 300, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("lease lost"), "{err}");
    assert_eq!(checkpoint(&db, "bank"), 300);
    let n: i64 = db
        .open_reader()
        .unwrap()
        .query_row("SELECT SUM(n) FROM totals", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 300, "the refused batch was rolled back");
}

/// Issue 9: a mixed run, one projection rebuilt from scratch and one resumed
/// from its checkpoint, reads the log once (as many reads as a rebuild of one
/// projection alone), and both end equal to a rebuild from scratch.
#[test]
fn a_mixed_run_reads_the_log_once() {
    let tmp = tempfile::tempdir().unwrap();
    let store = bank_store(&tmp.path().join("events.db"), N_EVENTS, 7);
    let dir = ProjectionDir::open(tmp.path().join("p")).unwrap();
    let (fresh, behind) = (dir.db("fresh").unwrap(), dir.db("behind").unwrap());
    let reference = dir.db("reference").unwrap();
    rebuild(config(
        &store,
        &reference,
        &mut BankHandler::default(),
        options(500),
    ))
    .unwrap();
    // `behind` got half way before.
    let mut cut = BankHandler {
        fail_at: Some(N_EVENTS / 2 + 1),
    };
    rebuild(config(&store, &behind, &mut cut, options(500))).unwrap_err();
    assert!(checkpoint(&behind, "bank") > 0);
    let counting = CountingReader {
        inner: &store,
        reads: AtomicUsize::new(0),
    };
    let run_options = options(500);
    let (mut h1, mut h2) = (BankHandler::default(), BankHandler::default());
    let target = |db, handler, name| ProjectionTarget::new(db, handler).consumer_id(name);
    let results = replay(
        &counting,
        vec![
            target(&fresh, &mut h1, "bank").start(Start::Reset),
            target(&behind, &mut h2, "bank").start(Start::Resume),
        ],
        &run_options,
    );
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let mixed_reads = counting.reads.swap(0, Ordering::SeqCst);
    let mut h3 = BankHandler::default();
    rebuild(RebuildConfig {
        reader: &counting,
        projection: target(&fresh, &mut h3, "bank"),
        options: options(500),
    })
    .unwrap();
    let alone_reads = counting.reads.load(Ordering::SeqCst);
    assert_eq!(
        mixed_reads, alone_reads,
        "a mixed run read the log more than once"
    );
    assert_eq!(digest(&fresh), digest(&reference));
    assert_eq!(digest(&behind), digest(&reference));
}
