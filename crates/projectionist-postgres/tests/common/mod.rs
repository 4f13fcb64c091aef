//! Test fixtures: each test gets its own PostgreSQL schema on the server named by
//! `PROJECTIONIST_TEST_PG_URL`, dropped when the fixture is dropped.

#![allow(dead_code)]

use postgres::{Client, NoTls};

/// The variable that points the tests at a server.
pub const PG_URL_ENV: &str = "PROJECTIONIST_TEST_PG_URL";

/// A schema of its own for one test.
pub struct PgSchema {
    pub base_url: String,
    pub schema: String,
}

impl PgSchema {
    /// A fresh schema. The tests that call this are ignored unless the build saw
    /// the variable (`cfg(pg_tests)`, see build.rs); run without it (for example
    /// with `--include-ignored`) they fail instead of passing silently.
    pub fn new(test: &str) -> Option<PgSchema> {
        let base_url = std::env::var(PG_URL_ENV).unwrap_or_else(|_| {
            panic!(
                "{test}: set {PG_URL_ENV} (e.g. postgres://postgres@127.0.0.1:5432/test) to run the PostgreSQL tests"
            )
        });
        let schema = format!("pj_{test}_{}", fastrand::u32(..));
        let mut client = Client::connect(&base_url, NoTls).expect("PostgreSQL is reachable");
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .unwrap();
        Some(PgSchema { base_url, schema })
    }

    /// The URL with the schema as the search path.
    pub fn url(&self) -> String {
        let sep = if self.base_url.contains('?') {
            '&'
        } else {
            '?'
        };
        format!(
            "{}{sep}options=-c%20search_path%3D{}",
            self.base_url, self.schema
        )
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.url(), NoTls).unwrap()
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        if let Ok(mut client) = Client::connect(&self.base_url, NoTls) {
            let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
        }
    }
}
