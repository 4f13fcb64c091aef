//! PostgreSQL helpers for the end-to-end tests: a schema of their own, and an
//! append written by hand as an application would.

use postgres::{Client, NoTls};

/// A schema of its own, dropped at the end.
pub struct Schema {
    pub base: String,
    pub name: String,
}

impl Schema {
    pub fn new(test: &str) -> Schema {
        let base = std::env::var("PROJECTIONIST_TEST_PG_URL")
            .expect("set PROJECTIONIST_TEST_PG_URL to run the PostgreSQL tests");
        let name = format!("pj_{test}_{}", std::process::id());
        let mut client = Client::connect(&base, NoTls).unwrap();
        client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"
            ))
            .unwrap();
        Schema { base, name }
    }
    pub fn url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!("{}{sep}options=-c%20search_path%3D{}", self.base, self.name)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        if let Ok(mut client) = Client::connect(&self.base, NoTls) {
            let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
        }
    }
}

/// An append as an application would write it by hand: the transaction id first
/// (as projectionist's own appends do), then the row; returns its sequence.
pub fn insert(tx: &mut postgres::Transaction<'_>, stream: &str) -> i64 {
    tx.execute("SELECT pg_current_xact_id()", &[]).unwrap();
    let data = format!(r#"{{"order_id": "{stream}", "customer_id": "c-1"}}"#);
    tx.query_one(
        "INSERT INTO events (stream_id, stream_version, event_type, data)
         VALUES ($1, 1, 'OrderPlaced', $2::text::jsonb) RETURNING sequence",
        &[&stream, &data],
    )
    .unwrap()
    .get(0)
}
