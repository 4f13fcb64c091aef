//! `lean_sqlite_memory` works only before SQLite is first used in the
//! process; afterwards it says so and changes nothing. In a test binary of its
//! own: the setting is process-wide.

use projectionist::{Error, ProjectionDir, lean_sqlite_memory};

#[test]
fn lean_memory_is_taken_before_the_first_connection_and_refused_after() {
    lean_sqlite_memory().expect("nothing has used SQLite yet in this process");
    let tmp = tempfile::tempdir().unwrap();
    let dir = ProjectionDir::open(tmp.path()).unwrap();
    let db = dir.db("counts").unwrap();
    // Connections work as before under the lean settings.
    db.write(|tx| {
        tx.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY); INSERT INTO t VALUES (1), (2);")?;
        Ok(())
    })
    .unwrap();
    let rows: i64 = db
        .open_reader()
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 2);
    match lean_sqlite_memory() {
        Err(Error::InvalidOptions(message)) => {
            assert!(
                message.contains("before opening any connection"),
                "{message}"
            );
        }
        other => panic!("expected a refusal once SQLite is in use, got {other:?}"),
    }
}
