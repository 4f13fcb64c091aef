//! Shadow rebuilds, publish and rollback on real files: what a reader holding
//! one connection sees across a publish, what is kept, what is refused.
//! Crash points and SIGKILLs of a publish are in `crash.rs` (child processes).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use common::{BankHandler, bank_store, checkpoint, config, digest, options};
use projectionist::rusqlite::Connection;
use projectionist::{
    DigestScope, Error, ProjectionDir, PublishOptions, SqliteEventStore, projection_digest,
    rebuild, resume, version_info,
};

/// The answer a reader gets from the bank projection in one query.
fn snapshot(conn: &Connection) -> (i64, i64, i64) {
    conn.query_row(
        "SELECT (SELECT count(*) FROM account), (SELECT total(balance) FROM account),
                (SELECT sequence FROM _checkpoint WHERE consumer_id = 'bank')",
        [],
        |row| Ok((row.get(0)?, row.get::<_, f64>(1)? as i64, row.get(2)?)),
    )
    .unwrap()
}

/// A store with `first` events, a live projection built from them, then
/// `more` events appended: a shadow rebuilt now differs from the live file.
struct TwoVersions {
    tmp: tempfile::TempDir,
    store: SqliteEventStore,
}

fn two_versions(first: u64, more: u64) -> TwoVersions {
    let tmp = tempfile::tempdir().unwrap();
    // The same seed: the longer log starts with the shorter one.
    let short = bank_store(&tmp.path().join("short.db"), first, 5);
    {
        let dir = ProjectionDir::open(tmp.path().join("p")).unwrap();
        let db = dir.db("bank").unwrap();
        rebuild(config(
            &short,
            &db,
            &mut BankHandler::default(),
            options(100),
        ))
        .unwrap();
    }
    let store = bank_store(&tmp.path().join("events.db"), first + more, 5);
    TwoVersions { tmp, store }
}

/// The projection's shadow, rebuilt from the whole log (a new version).
fn build_shadow(dir: &ProjectionDir, store: &SqliteEventStore) -> Arc<projectionist::ProjectionDb> {
    let shadow = dir.shadow("bank").unwrap();
    rebuild(config(
        store,
        &shadow,
        &mut BankHandler::default(),
        options(100),
    ))
    .unwrap();
    shadow
}

/// Publishes the bank projection's shadow with the default options.
fn publish(dir: &ProjectionDir) -> projectionist::Published {
    dir.publish("bank", "bank", &PublishOptions::default())
        .unwrap()
}

#[test]
fn publish_is_atomic_for_a_reader_holding_one_connection() {
    let t = two_versions(3_000, 3_000);
    let dir = ProjectionDir::open(t.tmp.path().join("p")).unwrap();
    let live = dir.db("bank").unwrap();
    let reader = live.open_reader().unwrap();
    let old = snapshot(&reader);
    let shadow = build_shadow(&dir, &t.store);
    let new = snapshot(&shadow.open_reader().unwrap());
    assert_ne!(old, new);
    // The live file kept serving the old version while the shadow was built.
    assert_eq!(snapshot(&reader), old);

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let (mut reads, mut seen_new) = (0u64, 0u64);
            while !stop.load(Ordering::SeqCst) {
                let got = snapshot(&reader);
                assert!(got == old || got == new, "a mixed read: {got:?}");
                reads += 1;
                seen_new += u64::from(got == new);
            }
            (reads, seen_new)
        })
    };
    // Publish, roll back and publish again while the reader polls.
    let published = dir
        .publish("bank", "bank", &PublishOptions::default())
        .unwrap();
    assert_eq!(published.checkpoint, 6_000);
    assert!(published.previous_kept);
    dir.rollback("bank", "bank", &PublishOptions::default())
        .unwrap();
    dir.rollback("bank", "bank", &PublishOptions::default())
        .unwrap();
    thread::sleep(std::time::Duration::from_millis(50));
    stop.store(true, Ordering::SeqCst);
    let (reads, seen_new) = watcher.join().unwrap();
    assert!(reads > 10, "only {reads} reads");
    assert!(seen_new > 0, "the reader never saw the new version");
    assert_eq!(snapshot(&live.open_reader().unwrap()), new);
    let files = projectionist::VersionFiles::new(&t.tmp.path().join("p"), "bank").unwrap();
    assert!(!files.shadow.exists(), "the shadow is left behind");
    assert!(!files.previous_new.exists());
    assert!(files.previous.exists());
}

#[test]
fn rollback_restores_the_previous_digest_and_a_second_one_undoes_it() {
    let t = two_versions(1_000, 1_000);
    let dir = ProjectionDir::open(t.tmp.path().join("p")).unwrap();
    let live = dir.db("bank").unwrap();
    let old = digest(&live);
    let shadow = build_shadow(&dir, &t.store);
    let new = digest(&shadow);
    publish(&dir);
    assert_eq!(digest(&live), new);
    let stamp = version_info(&live.open_reader().unwrap()).unwrap();
    assert!(stamp.id.is_some() && stamp.rolled_back_at.is_none());

    let back = dir
        .rollback("bank", "bank", &PublishOptions::default())
        .unwrap();
    assert_eq!(digest(&live), old);
    assert_eq!(back.checkpoint, 1_000);
    assert_eq!(checkpoint(&live, "bank"), 1_000);
    let stamp = version_info(&live.open_reader().unwrap()).unwrap();
    assert!(stamp.rolled_back_at.is_some(), "{stamp:?}");
    // The live projection resumes from the restored checkpoint.
    resume(config(
        &t.store,
        &live,
        &mut BankHandler::default(),
        options(100),
    ))
    .unwrap();
    assert_eq!(digest(&live), new);

    // Without keeping the previous version, a publish leaves none.
    build_shadow(&dir, &t.store);
    dir.publish("bank", "bank", &PublishOptions::new().keep_previous(false))
        .unwrap();
    let err = dir
        .rollback("bank", "bank", &PublishOptions::default())
        .unwrap_err();
    assert!(
        matches!(err, Error::Version { .. }) && err.to_string().contains("no previous version"),
        "{err}"
    );
}

#[test]
fn a_shadow_behind_the_live_file_or_none_at_all_is_not_published() {
    let t = two_versions(1_000, 0);
    let dir = ProjectionDir::open(t.tmp.path().join("p")).unwrap();
    let live = dir.db("bank").unwrap();
    let before = digest(&live);
    let err = dir
        .publish("bank", "bank", &PublishOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("no shadow"), "{err}");
    // An empty shadow (checkpoint 0) is behind the live file (1,000).
    dir.shadow("bank").unwrap();
    let err = dir
        .publish("bank", "bank", &PublishOptions::default())
        .unwrap_err();
    assert!(
        err.to_string().contains("behind the live file's 1000"),
        "{err}"
    );
    assert_eq!(digest(&live), before);
    assert!(dir.discard_shadow("bank").unwrap());
    assert!(!dir.discard_shadow("bank").unwrap());
}

#[test]
fn versions_are_never_listed_and_remove_takes_them_too() {
    let t = two_versions(500, 500);
    let path = t.tmp.path().join("p");
    let dir = ProjectionDir::open(&path).unwrap();
    build_shadow(&dir, &t.store);
    publish(&dir);
    build_shadow(&dir, &t.store);
    let files = projectionist::VersionFiles::new(&path, "bank").unwrap();
    assert!(files.shadow.exists() && files.previous.exists());
    let names: Vec<String> = dir.list().unwrap().iter().map(|n| n.to_string()).collect();
    assert_eq!(names, ["bank"]);
    dir.remove("bank").unwrap();
    let left: Vec<_> = std::fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The hazard a publish must never fall into: a file renamed over a database
/// whose stale `-wal` is still there brings old pages back while
/// `integrity_check` says ok. Here a stale `-wal` (from another database) is
/// planted beside the previous version before a publish renames the copy of
/// the live file into place; the kept version must be exactly the old live
/// content, compared row by row.
#[test]
fn a_stale_wal_beside_the_previous_version_is_never_replayed() {
    let t = two_versions(1_000, 1_000);
    let path = t.tmp.path().join("p");
    let files = projectionist::VersionFiles::new(&path, "bank").unwrap();
    let dir = ProjectionDir::open(&path).unwrap();
    let live = dir.db("bank").unwrap();
    let old = digest(&live);
    // A first publish keeps a previous version.
    let shadow = build_shadow(&dir, &t.store);
    let new = digest(&shadow);
    publish(&dir);
    // A stale -wal with other rows: made by a writer that stops before any checkpoint.
    let other = t.tmp.path().join("other.db");
    {
        let conn = Connection::open(&other).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;
             CREATE TABLE account (id TEXT); INSERT INTO account VALUES ('resurrected');",
        )
        .unwrap();
        std::fs::copy(
            format!("{}-wal", other.display()),
            format!("{}-wal", files.previous.display()),
        )
        .unwrap();
        std::mem::forget(conn); // never checkpointed
    }
    // A second publish: the previous version becomes the (new) live content.
    build_shadow(&dir, &t.store);
    publish(&dir);
    let kept = Connection::open(&files.previous).unwrap();
    assert_eq!(
        projection_digest(&kept, DigestScope::ProjectionTables).unwrap(),
        new
    );
    assert_ne!(new, old);
    let ok: String = kept
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
}

#[test]
fn a_shadow_gets_the_live_files_page_size() {
    let t = two_versions(300, 300);
    let path = t.tmp.path().join("p");
    // A live file with an unusual page size (as VACUUM can leave it).
    {
        let conn = Connection::open(path.join("bank.db")).unwrap();
        conn.execute_batch("PRAGMA journal_mode = DELETE; PRAGMA page_size = 8192; VACUUM; PRAGMA journal_mode = WAL;")
            .unwrap();
    }
    let dir = ProjectionDir::open(&path).unwrap();
    let live = dir.db("bank").unwrap();
    let shadow = dir.shadow("bank").unwrap();
    let size = |db: &projectionist::ProjectionDb| -> i64 {
        db.open_reader()
            .unwrap()
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(size(&shadow), 8192);
    rebuild(config(
        &t.store,
        &shadow,
        &mut BankHandler::default(),
        options(100),
    ))
    .unwrap();
    let new = digest(&shadow);
    publish(&dir);
    assert_eq!(digest(&live), new);
}

#[test]
fn a_shadow_built_up_to_the_live_checkpoint_compares_equal_until_a_row_is_edited() {
    let t = two_versions(1_000, 1_000);
    let dir = ProjectionDir::open(t.tmp.path().join("p")).unwrap();
    let live = dir.db("bank").unwrap();
    let shadow = dir.shadow("bank").unwrap();
    let up_to = projectionist::UpTo::new(&t.store, checkpoint(&live, "bank"));
    let mut handler = BankHandler::default();
    let config = projectionist::RebuildConfig {
        reader: &up_to,
        projection: projectionist::ProjectionTarget::new(&shadow, &mut handler).consumer_id("bank"),
        options: options(64),
    };
    rebuild(config).unwrap();
    assert_eq!(checkpoint(&shadow, "bank"), 1_000);
    let conn = live.open_reader().unwrap();
    let same = projectionist::compare_projections(&conn, shadow.path(), 5).unwrap();
    assert!(same.is_empty(), "{same:?}");

    // A hand edit in the live file: one changed row, one extra row.
    live.with_connection(|c| {
        c.execute_batch(
            "UPDATE account SET balance = balance + 1 WHERE id = 'acc-3';
             INSERT INTO totals VALUES ('planted', 1, 1);",
        )
        .unwrap();
        Ok(())
    })
    .unwrap();
    let diff = projectionist::compare_projections(&conn, shadow.path(), 5).unwrap();
    let tables: Vec<&str> = diff.iter().map(|d| d.table.as_str()).collect();
    assert_eq!(tables, ["account", "totals"], "{diff:?}");
    assert_eq!(diff[0].examples, ["changed ('acc-3')"]);
    assert_eq!(diff[1].examples, ["only in first ('planted')"]);
    assert_eq!(diff[1].rows_first, diff[1].rows_second.map(|n| n + 1));
}

/// Views and triggers are part of a projection: a view in only one file, or a
/// trigger defined differently, is a difference even when every table's rows
/// are equal.
#[test]
fn compare_projections_sees_views_and_triggers() {
    let tmp = tempfile::tempdir().unwrap();
    let make = |name: &str, extra: &str| {
        let path = tmp.path().join(name);
        let conn = projectionist::rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(&format!(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER);
             INSERT INTO t VALUES (1, 10);
             CREATE TABLE log (n INTEGER);
             {extra}"
        ))
        .unwrap();
        (conn, path)
    };
    let (first, _) = make(
        "first.db",
        "CREATE VIEW big AS SELECT * FROM t WHERE n > 5;
         CREATE TRIGGER keep AFTER INSERT ON t BEGIN INSERT INTO log VALUES (new.n); END;",
    );
    let (_, second) = make(
        "second.db",
        "CREATE TRIGGER keep AFTER INSERT ON t BEGIN INSERT INTO log VALUES (0); END;",
    );
    let differences = projectionist::compare_projections(&first, &second, 5).unwrap();
    let named: Vec<(&str, Option<u64>, Option<u64>)> = differences
        .iter()
        .map(|d| (d.table.as_str(), d.rows_first, d.rows_second))
        .collect();
    assert_eq!(
        named,
        [
            ("trigger keep", Some(0), Some(0)),
            ("view big", Some(0), None)
        ],
        "{differences:?}"
    );
    assert_eq!(differences[0].examples, ["defined differently"]);
    let same = projectionist::compare_projections(&first, &first_path(&tmp), 5).unwrap();
    assert!(same.is_empty(), "{same:?}");
}

fn first_path(tmp: &tempfile::TempDir) -> std::path::PathBuf {
    tmp.path().join("first.db")
}
