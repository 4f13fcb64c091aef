//! Issue 22, finding 5: connecting the way production databases require,
//! against the local server as `scripts/pg-test-setup.sh` prepares it: TLS
//! with the server's certificate checked (`verify-ca`, `verify-full`), a
//! SCRAM-SHA-256 password, a client certificate; and the refusals that must
//! name the cause (a certificate from another CA, a host name the
//! certificate does not cover, an unknown `sslmode`), never the password.

mod common;

use std::path::PathBuf;

use common::PgSchema;
use projectionist::{GlobalEvent, GlobalReader, NewEvent};
use projectionist_postgres::{Leases, PostgresEventStore};
use serde_json::Value;

/// Where `scripts/pg-test-setup.sh` left the CA and the client certificate.
fn tls_dir() -> PathBuf {
    let dir = std::env::var("PROJECTIONIST_TEST_PG_TLS_DIR").unwrap_or_else(|_| {
        panic!(
            "set PROJECTIONIST_TEST_PG_TLS_DIR to the directory that scripts/pg-test-setup.sh prints"
        )
    });
    PathBuf::from(dir)
}

/// A schema owned by `role`, so it can create the events table there.
fn schema_for(pg: &PgSchema, role: &str) {
    pg.client()
        .batch_execute(&format!("ALTER SCHEMA {} OWNER TO {role}", pg.schema))
        .unwrap();
}

fn search_path(pg: &PgSchema) -> String {
    format!("options=-c%20search_path%3D{}", pg.schema)
}

#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn verify_full_with_a_scram_password_appends_and_reads() {
    let Some(pg) = PgSchema::new("tls_scram") else {
        return;
    };
    schema_for(&pg, "pj_scram");
    let ca = tls_dir().join("ca.crt");
    // pj_scram is refused without TLS (pg_hba), so a connection proves it.
    let url = format!(
        "postgres://pj_scram:pj-scram-secret@127.0.0.1:5432/test?sslmode=verify-full&sslrootcert={}&{}",
        ca.display(),
        search_path(&pg)
    );
    let store = PostgresEventStore::connect(&url).unwrap();
    store.init().unwrap();
    store
        .append(
            "s",
            0,
            &[NewEvent::json("E", &serde_json::json!({"n": 1})).unwrap()],
        )
        .unwrap();
    let events: Vec<GlobalEvent<Value>> = store.read_after(0, 10).unwrap();
    assert_eq!(events.len(), 1);
    // Leases connect the same way.
    let leases = Leases::connect(&url, "w1", std::time::Duration::from_secs(5)).unwrap();
    leases.init().unwrap();

    // `require` encrypts without checking the certificate.
    let require = format!(
        "postgres://pj_scram:pj-scram-secret@127.0.0.1:5432/test?sslmode=require&{}",
        search_path(&pg)
    );
    assert!(PostgresEventStore::connect(&require).is_ok());
    // Without TLS the server refuses this role: the message names the server,
    // never the password.
    let plain = format!(
        "postgres://pj_scram:pj-scram-secret@127.0.0.1:5432/test?sslmode=disable&{}",
        search_path(&pg)
    );
    let err = anyhow_like(PostgresEventStore::connect(&plain).unwrap_err());
    assert!(err.contains("127.0.0.1"), "{err}");
    assert!(!err.contains("pj-scram-secret"), "{err}");
    // A wrong password is refused the same way.
    let wrong = url.replace("pj-scram-secret", "not-the-password");
    let err = anyhow_like(PostgresEventStore::connect(&wrong).unwrap_err());
    assert!(err.contains("password"), "{err}");
    assert!(!err.contains("not-the-password"), "{err}");
}

/// The error and its sources, as the CLI prints them.
fn anyhow_like(err: projectionist::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn certificates_that_do_not_check_out_are_refused() {
    let Some(pg) = PgSchema::new("tls_refuse") else {
        return;
    };
    let dir = tls_dir();
    let with = |target: &str, mode: &str, root: &str| {
        format!(
            "{target} user=pj_scram password=pj-scram-secret dbname=test sslmode={mode} sslrootcert={} options='-c search_path={}'",
            dir.join(root).display(),
            pg.schema
        )
    };
    // A CA the server's certificate does not chain to.
    let err = anyhow_like(
        PostgresEventStore::connect(&with("host=127.0.0.1", "verify-ca", "other-ca.crt"))
            .unwrap_err(),
    );
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // A host name the certificate does not cover: verify-full refuses,
    // verify-ca (chain only) accepts.
    let elsewhere = "host=db.elsewhere.example hostaddr=127.0.0.1";
    let err = anyhow_like(
        PostgresEventStore::connect(&with(elsewhere, "verify-full", "ca.crt")).unwrap_err(),
    );
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert!(!err.contains("pj-scram-secret"), "{err}");
    assert!(PostgresEventStore::connect(&with(elsewhere, "verify-ca", "ca.crt")).is_ok());
    // A misspelt mode is named.
    let err = PostgresEventStore::connect(&with("host=127.0.0.1", "verify_full", "ca.crt"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("verify_full"), "{err}");
    // A root certificate file that is not there is named.
    let err = PostgresEventStore::connect(&with("host=127.0.0.1", "verify-full", "missing.crt"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.crt"), "{err}");
}

#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn a_client_certificate_logs_in_without_a_password() {
    let Some(pg) = PgSchema::new("tls_cert") else {
        return;
    };
    schema_for(&pg, "pj_cert");
    let dir = tls_dir();
    let url = format!(
        "postgres://pj_cert@127.0.0.1:5432/test?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}&{}",
        dir.join("ca.crt").display(),
        dir.join("client.crt").display(),
        dir.join("client.key").display(),
        search_path(&pg)
    );
    let store = PostgresEventStore::connect(&url).unwrap();
    store.init().unwrap();
    assert_eq!(GlobalReader::<Value>::head(&store).unwrap(), 0);
    // Without the certificate the server refuses.
    let bare = format!(
        "postgres://pj_cert@127.0.0.1:5432/test?sslmode=verify-full&sslrootcert={}&{}",
        dir.join("ca.crt").display(),
        search_path(&pg)
    );
    assert!(PostgresEventStore::connect(&bare).is_err());
}

/// A mapped table whose sequence column no index starts with is said to be
/// unindexed, with the statement that indexes it; once indexed, it is not.
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn an_unindexed_sequence_column_is_found_with_the_statement_to_index_it() {
    let Some(pg) = common::PgSchema::new("unindexed") else {
        return;
    };
    let mut client = pg.client();
    client
        .batch_execute(
            "CREATE TABLE msgs (seq BIGINT NOT NULL, stream TEXT, ver BIGINT, kind TEXT, body JSONB);
             INSERT INTO msgs VALUES (1, 's', 1, 'Added', '{}');",
        )
        .unwrap();
    let mapping = msgs_mapping();
    let store =
        projectionist_postgres::PostgresEventStore::connect_mapped(&pg.url(), &mapping).unwrap();
    let statement = store.sequence_unindexed().unwrap().expect("unindexed");
    assert!(
        statement.contains("msgs") && statement.contains("seq"),
        "{statement}"
    );
    client.batch_execute(&statement).unwrap();
    assert_eq!(store.sequence_unindexed().unwrap(), None);
}

/// Another program's table with a row whose sequence is 0 is refused by name
/// when opened (it would never be read); a row with a NULL event type fails
/// the read by name (no panic, not passed over).
#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn foreign_rows_without_a_sequence_or_a_type_are_named_errors() {
    let Some(pg) = common::PgSchema::new("nullrows") else {
        return;
    };
    let mut client = pg.client();
    client
        .batch_execute(
            "CREATE TABLE msgs (seq BIGINT PRIMARY KEY, stream TEXT, ver BIGINT, kind TEXT, body JSONB);
             INSERT INTO msgs VALUES (0, 's', 1, 'Added', '{}'), (1, 's', 2, 'Added', '{}');",
        )
        .unwrap();
    let mapping = msgs_mapping();
    let Err(err) = PostgresEventStore::connect_mapped(&pg.url(), &mapping) else {
        panic!("a table with sequence 0 was opened")
    };
    assert!(err.to_string().contains("NULL, 0 or negative"), "{err}");
    client
        .batch_execute(
            "DELETE FROM msgs WHERE seq = 0; INSERT INTO msgs VALUES (2, 's', 3, NULL, '{}');",
        )
        .unwrap();
    let store = PostgresEventStore::connect_mapped(&pg.url(), &mapping).unwrap();
    let err = GlobalReader::<Value>::read_after(&store, 0, 10).expect_err("a NULL type");
    assert!(
        err.to_string().contains("event 2 has no event type"),
        "{err}"
    );
}

/// Table `msgs` (seq, stream, ver, kind, body) as another program lays it out.
fn msgs_mapping() -> projectionist::EventTableMapping {
    projectionist::EventTableMapping::new("msgs")
        .sequence("seq")
        .stream_id("stream")
        .stream_version("ver")
        .event_type("kind")
        .data("body")
        .metadata(None)
        .recorded_at(None)
}
