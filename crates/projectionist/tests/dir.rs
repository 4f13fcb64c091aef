//! `ProjectionDir` on real files: name validation, listing, removal (including a
//! stale `-wal` that must never bring rows back), and the per-projection lock.

mod common;

use std::fs;
use std::path::Path;

use common::{BankHandler, bank_store, checkpoint, config, digest, options};
use projectionist::{Error, ProjectionDir, rebuild};

fn strings(names: &[projectionist::ProjectionName]) -> Vec<String> {
    names.iter().map(ToString::to_string).collect()
}

/// Every file below `root`, as sorted relative paths.
fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(root).unwrap().display().to_string());
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn hostile_names_are_rejected_and_touch_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("victim.db"), b"keep me").unwrap();
    let dir = ProjectionDir::open(tmp.path().join("projections")).unwrap();
    let before = tree(tmp.path());
    let long = "a".repeat(projectionist::limits::NAME_LEN_MAX + 1);
    let hostile = [
        "",
        ".",
        "..",
        "../outside/victim",
        "../../etc/passwd",
        "/etc/passwd",
        "a/b",
        "a\\b",
        "..\\outside\\victim",
        ".hidden",
        ".orders.lock",
        "-rf",
        "nul\0byte",
        "tab\tname",
        "new\nline",
        "esc\u{1b}[31m",
        "spaced name",
        "ünïcode",
        "CON",
        "com1.db",
        "a..b",
        &long,
    ];
    assert!(hostile.len() >= 15);
    for name in hostile {
        let quoted = format!("{name:?}");
        for err in [
            dir.db(name).unwrap_err(),
            dir.remove(name).unwrap_err(),
            dir.file_path(name).unwrap_err(),
        ] {
            assert!(
                matches!(err, Error::InvalidName { .. }),
                "{quoted}: {err:?}"
            );
            assert!(
                err.to_string().contains(&quoted),
                "error quotes the name: {err}"
            );
        }
    }
    assert_eq!(tree(tmp.path()), before, "no file created or deleted");
    assert_eq!(fs::read(outside.join("victim.db")).unwrap(), b"keep me");
}

#[test]
fn list_returns_only_projection_files_sorted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = ProjectionDir::open(tmp.path()).unwrap();
    for name in ["zeta", "alpha", "mid.v2"] {
        dir.db(name)
            .unwrap()
            .write(|tx| Ok(tx.execute_batch("CREATE TABLE t (x)")?))
            .unwrap();
    }
    for stray in [
        "notes.txt",
        "alpha.db-wal-old",
        ".x.db",
        "bad name.db",
        "x.db-shm",
        "y.db-wal",
    ] {
        fs::write(tmp.path().join(stray), b"").unwrap();
    }
    fs::create_dir(tmp.path().join("sub.db")).unwrap();
    let names: Vec<String> = dir
        .list()
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(names, ["alpha", "mid.v2", "zeta"]);
}

#[test]
fn open_creates_missing_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let nested = tmp.path().join("a/b/c");
    let dir = ProjectionDir::open(&nested).unwrap();
    dir.db("p").unwrap();
    assert!(nested.join("p.db").is_file());
}

#[test]
fn open_on_a_file_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("file");
    fs::write(&file, b"x").unwrap();
    let err = ProjectionDir::open(&file).unwrap_err();
    assert!(
        err.to_string().contains("create projection directory"),
        "{err}"
    );
}

#[test]
fn db_twice_shares_one_handle() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = ProjectionDir::open(tmp.path()).unwrap();
    let a = dir.db("p").unwrap();
    let b = dir.db("p").unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b));
}

#[test]
fn projection_files_use_wal_and_readers_see_committed_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = ProjectionDir::open(tmp.path()).unwrap();
    let db = dir.db("p").unwrap();
    db.write(|tx| Ok(tx.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1)")?))
        .unwrap();
    let reader = db.open_reader().unwrap();
    let mode: String = reader
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    // A write that fails rolls back entirely.
    let err = db
        .write(|tx| {
            tx.execute("INSERT INTO t VALUES (2)", [])?;
            Err::<(), _>("changed my mind".into())
        })
        .unwrap_err();
    assert!(err.to_string().contains("changed my mind"));
    let n: i64 = reader
        .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn remove_then_db_is_empty_even_with_a_stale_hot_wal() {
    let tmp = tempfile::tempdir().unwrap();
    let store = bank_store(&tmp.path().join("events.db"), 2_000, 1);
    let dir = ProjectionDir::open(tmp.path().join("p")).unwrap();
    let db = dir.db("bank").unwrap();
    rebuild(config(
        &store,
        &db,
        &mut BankHandler::default(),
        options(100),
    ))
    .unwrap();
    let empty_digest = {
        let fresh = dir.db("fresh").unwrap();
        digest(&fresh)
    };
    assert_ne!(digest(&db), empty_digest);
    // While the writer is open, the committed rows sit in the -wal: keep a copy of
    // it, as a crashed process would leave it behind.
    let wal = tmp.path().join("p/bank.db-wal");
    let saved = tmp.path().join("saved-wal");
    assert!(
        fs::metadata(&wal).unwrap().len() > 0,
        "rows are in the hot wal"
    );
    fs::copy(&wal, &saved).unwrap();
    drop(db);

    dir.remove("bank").unwrap();
    for leftover in ["bank.db", "bank.db-wal", "bank.db-shm"] {
        assert!(
            !tmp.path().join("p").join(leftover).exists(),
            "{leftover} removed"
        );
    }
    // The stale wal comes back beside the missing database.
    fs::copy(&saved, &wal).unwrap();
    let db = dir.db("bank").unwrap();
    let reader = db.open_reader().unwrap();
    let tables: i64 = reader
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name IN ('account', 'totals')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tables, 0, "no old table came back");
    assert_eq!(checkpoint(&db, "bank"), 0);
    assert_eq!(digest(&db), empty_digest);
    let check: String = reader
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

#[test]
fn remove_closes_handles_and_remove_all_empties_the_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = ProjectionDir::open(tmp.path()).unwrap();
    let held = dir.db("a").unwrap();
    dir.db("b").unwrap();
    dir.remove("a").unwrap();
    let err = held.write(|_| Ok(())).unwrap_err();
    assert!(matches!(err, Error::Closed { .. }), "{err:?}");
    assert_eq!(dir.list().unwrap().len(), 1);
    let removed = dir.remove_all().unwrap();
    assert_eq!(removed.len(), 1);
    assert!(dir.list().unwrap().is_empty());
    // Lock files go with their projection (issue 8, item 16).
    assert_eq!(tree(tmp.path()), Vec::<String>::new());
}

/// Issue 8, item 16: removing a projection that does not exist is an error,
/// and creates no lock file.
#[test]
fn removing_an_unknown_projection_is_an_error_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = ProjectionDir::open(tmp.path()).unwrap();
    let err = dir.remove("nope").unwrap_err();
    assert!(matches!(err, Error::NoSuchProjection { .. }), "{err:?}");
    assert!(err.to_string().contains("no projection nope"), "{err}");
    assert_eq!(tree(tmp.path()), Vec::<String>::new());
    let missing = tmp.path().join("missing");
    assert!(ProjectionDir::open_existing(&missing).is_err());
    assert!(!missing.exists(), "open_existing creates nothing");
}

/// Issue 8, item 1: only files that say they are projections are listed or
/// removed; an event log and another program's database beside them are left
/// alone, byte for byte. A projection written before the application id existed
/// (only a `_checkpoint` table) still counts.
#[test]
fn files_that_are_not_projections_are_never_listed_or_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = projectionist::SqliteEventStore::create(tmp.path().join("events.db")).unwrap();
    drop(store);
    let notes = projectionist::rusqlite::Connection::open(tmp.path().join("notes.db")).unwrap();
    notes
        .execute_batch("CREATE TABLE notes (text TEXT); INSERT INTO notes VALUES ('keep me');")
        .unwrap();
    drop(notes);
    let other_app = projectionist::rusqlite::Connection::open(tmp.path().join("app.db")).unwrap();
    other_app
        .execute_batch(
            "PRAGMA application_id = 42; CREATE TABLE _checkpoint (consumer_id, sequence);",
        )
        .unwrap();
    drop(other_app);
    fs::write(
        tmp.path().join("text.db"),
        b"just some text, long enough to not be empty",
    )
    .unwrap();
    // A projection file as earlier versions wrote it: no application id.
    let legacy = projectionist::rusqlite::Connection::open(tmp.path().join("legacy.db")).unwrap();
    legacy
        .execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE _checkpoint (consumer_id TEXT PRIMARY KEY, sequence INTEGER NOT NULL);
             INSERT INTO _checkpoint VALUES ('legacy', 7);",
        )
        .unwrap();
    drop(legacy);
    let dir = ProjectionDir::open(tmp.path()).unwrap();
    dir.db("fresh").unwrap();
    assert_eq!(strings(&dir.list().unwrap()), ["fresh", "legacy"]);
    let foreign = ["events.db", "notes.db", "app.db", "text.db"];
    let read_foreign = || -> Vec<Vec<u8>> {
        foreign
            .iter()
            .map(|f| fs::read(tmp.path().join(f)).unwrap())
            .collect()
    };
    let before = read_foreign();
    for name in ["events", "notes", "app", "text"] {
        let err = dir.remove(name).unwrap_err();
        assert!(
            matches!(err, Error::NotAProjection { .. }),
            "{name}: {err:?}"
        );
        let err = dir.db(name).unwrap_err();
        assert!(
            matches!(err, Error::NotAProjection { .. }),
            "{name}: {err:?}"
        );
    }
    assert_eq!(strings(&dir.remove_all().unwrap()), ["fresh", "legacy"]);
    let after = read_foreign();
    assert!(before == after, "a file that is not a projection changed");
    // The legacy file got the mark when opened; a new file has it in its header.
    let fresh = dir.db("fresh").unwrap();
    let header = fs::read(fresh.path()).unwrap();
    assert_eq!(
        &header[68..72],
        &projectionist::APPLICATION_ID.to_be_bytes()
    );
}

/// Issue 8, item 5: a projection file, lock file or sidecar that is a symbolic
/// link is refused, and the link's target is never written.
#[cfg(unix)]
#[test]
fn symbolic_links_in_the_directory_are_refused() {
    use std::os::unix::fs::symlink;
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let victim = outside.join("victim.db");
    let conn = projectionist::rusqlite::Connection::open(&victim).unwrap();
    conn.execute_batch("CREATE TABLE v (x); INSERT INTO v VALUES (1);")
        .unwrap();
    drop(conn);
    // A victim that even looks like a projection must not be followed.
    let marked = outside.join("marked.db");
    ProjectionDir::open(&outside).unwrap().db("marked").unwrap();
    let dir_path = tmp.path().join("projections");
    fs::create_dir(&dir_path).unwrap();
    symlink(&victim, dir_path.join("a.db")).unwrap();
    symlink(&marked, dir_path.join("b.db")).unwrap();
    symlink(outside.join("lock"), dir_path.join(".c.lock")).unwrap();
    symlink(outside.join("wal"), dir_path.join("d.db-wal")).unwrap();
    let before = tree(&outside);
    let victim_bytes = fs::read(&victim).unwrap();
    let dir = ProjectionDir::open(&dir_path).unwrap();
    for name in ["a", "b", "c", "d"] {
        let err = dir.db(name).unwrap_err();
        assert!(
            matches!(err, Error::NotAProjection { .. }),
            "{name}: {err:?}"
        );
        assert!(err.to_string().contains("symbolic link"), "{err}");
    }
    assert!(dir.list().unwrap().is_empty());
    dir.remove_all().unwrap();
    assert!(dir.remove("a").is_err());
    assert_eq!(tree(&outside), before);
    assert_eq!(fs::read(&victim).unwrap(), victim_bytes);
}

/// Issue 8, item 6: with one projection held by another process, `remove_all`
/// removes nothing and names the held one.
#[test]
fn remove_all_is_all_or_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let first = ProjectionDir::open(tmp.path()).unwrap();
    for name in ["a", "b", "c"] {
        first.db(name).unwrap();
    }
    first.close().unwrap();
    let holder = ProjectionDir::open(tmp.path()).unwrap();
    let _held = holder.db("b").unwrap();
    let other = ProjectionDir::open(tmp.path()).unwrap();
    let err = other.remove_all().unwrap_err();
    assert!(
        matches!(err, Error::Locked { ref name, .. } if name == "b"),
        "{err:?}"
    );
    for name in ["a", "b", "c"] {
        assert!(
            tmp.path().join(format!("{name}.db")).is_file(),
            "{name} was removed"
        );
    }
    holder.close().unwrap();
    assert_eq!(other.remove_all().unwrap().len(), 3);
}

#[test]
fn a_second_directory_handle_gets_the_lock_error() {
    let tmp = tempfile::tempdir().unwrap();
    let first = ProjectionDir::open(tmp.path()).unwrap();
    let _db = first.db("orders").unwrap();
    let second = ProjectionDir::open(tmp.path()).unwrap();
    let err = second.db("orders").unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&format!(
            "projection orders is locked by process {}",
            std::process::id()
        )),
        "{err}"
    );
    let err = second.remove("orders").unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err:?}");
    assert!(
        tmp.path().join("orders.db").exists(),
        "a locked projection is not removed"
    );
    first.close().unwrap();
    second.db("orders").unwrap();
}
