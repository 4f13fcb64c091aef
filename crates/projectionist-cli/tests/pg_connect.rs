//! Issue 22, finding 5, through the binary: a store named only by
//! `postgres://` (plus a search path) is reached from the `PG*` environment
//! variables, over TLS with the server's certificate checked and a SCRAM
//! password, or with the password from `~/.pgpass`; a refused password is
//! never printed. Needs the server as `scripts/pg-test-setup.sh` prepares it.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::pg::Schema;
use common::{DEMO_CONFIG, Env, json_lines, stderr};

fn tls_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("PROJECTIONIST_TEST_PG_TLS_DIR").unwrap_or_else(|_| {
            panic!(
                "set PROJECTIONIST_TEST_PG_TLS_DIR to the directory scripts/pg-test-setup.sh prints"
            )
        }),
    )
}

/// The binary with `--store postgres://?options=...` and nothing of the
/// server in the URL: host, port, user, database and TLS from the
/// environment, and a home directory of the test's own.
fn command(env: &Env, schema: &Schema, password: Option<&str>, args: &[&str]) -> Command {
    let store = format!("postgres://?options=-c%20search_path%3D{}", schema.name);
    let mut command = env.command_with(&store, "projections", args);
    for var in [
        "PGPASSWORD",
        "PGSSLCERT",
        "PGSSLKEY",
        "PGPASSFILE",
        "PGSERVICE",
    ] {
        command.env_remove(var);
    }
    command
        .env("HOME", env.path("home"))
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", "5432")
        .env("PGUSER", "pj_scram")
        .env("PGDATABASE", "test")
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", tls_dir().join("ca.crt"));
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    command
}

#[test]
#[cfg_attr(
    not(pg_tests),
    ignore = "set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests"
)]
fn the_pg_environment_tls_and_pgpass_reach_a_server_that_requires_them() {
    let schema = Schema::new("pg_env");
    let mut admin = postgres::Client::connect(&schema.base, postgres::NoTls).unwrap();
    admin
        .batch_execute(&format!("ALTER SCHEMA {} OWNER TO pj_scram", schema.name))
        .unwrap();
    let env = Env::new();
    env.write_config(DEMO_CONFIG);
    std::fs::create_dir_all(env.path("home")).unwrap();

    let out = command(
        &env,
        &schema,
        Some("pj-scram-secret"),
        &["--quiet", "demo", "--events", "200"],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = command(
        &env,
        &schema,
        Some("pj-scram-secret"),
        &["--json", "status"],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = json_lines(&out);
    assert!(
        rows.iter()
            .all(|r| r["checkpoint"] == 200 && r["head"] == 200),
        "{rows:?}"
    );

    // A refused password: exit non-zero, the server named, the password not.
    let out = command(&env, &schema, Some("a-wrong-password"), &["status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(
        text.contains("127.0.0.1") || text.contains("password"),
        "{text}"
    );
    assert!(!text.contains("a-wrong-password"), "{text}");

    // No PGPASSWORD: the password file in the home directory, as libpq reads it.
    let pgpass = env.path("home/.pgpass");
    std::fs::write(&pgpass, "127.0.0.1:5432:test:pj_scram:pj-scram-secret\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let out = command(&env, &schema, None, &["--quiet", "resume"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // And without it nothing logs in.
    std::fs::remove_file(&pgpass).unwrap();
    let out = command(&env, &schema, None, &["status"]).output().unwrap();
    assert!(!out.status.success(), "{}", stderr(&out));
}
