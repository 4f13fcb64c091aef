//! `Leases`: which worker maintains which projection. A lease row is claimed
//! with compare-and-set when free or expired, and every claim bumps the
//! projection's fencing epoch. A worker renews its lease (and so proves it still
//! holds that epoch) right before every commit; a worker that was paused past its
//! lease finds the epoch moved on and commits nothing.
//!
//! Time is PostgreSQL's `now()` only, so workers on several machines need no
//! synchronised clocks. Session-level advisory locks are not used: they break
//! behind transaction-pooling proxies and die silently with a connection.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use postgres::Client;
use postgres::types::Type;
use projectionist::{Error, Result};

use crate::connect::connect_client;
use crate::store::{init_schema, pg_error};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS projection_leases (
    projection TEXT        PRIMARY KEY,
    owner      TEXT        NOT NULL,
    epoch      BIGINT      NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    done_hash  TEXT
);
CREATE TABLE IF NOT EXISTS projection_workers (
    owner      TEXT        PRIMARY KEY,
    expires_at TIMESTAMPTZ NOT NULL
);
";

/// A held lease: the projection and the fencing epoch it was claimed at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The projection.
    pub projection: String,
    /// The fencing epoch; any later claim has a larger one.
    pub epoch: i64,
}

/// The lease table, as one worker sees it.
pub struct Leases {
    client: Mutex<Client>,
    owner: String,
    ttl: Duration,
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases")
            .field("owner", &self.owner)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Leases {
    /// Connects as worker `owner`; leases last `ttl` unless renewed.
    ///
    /// # Errors
    /// [`Error::External`] when the server cannot be reached.
    pub fn connect(url: &str, owner: &str, ttl: Duration) -> Result<Self> {
        Ok(Leases {
            client: Mutex::new(connect_client(url)?),
            owner: owner.to_owned(),
            ttl,
        })
    }

    /// Creates the lease table if missing; idempotent.
    ///
    /// # Errors
    /// Server errors.
    pub fn init(&self) -> Result<()> {
        init_schema(&mut self.lock(), SCHEMA).map_err(pg_error("create projection_leases"))
    }

    /// This worker's name.
    #[must_use]
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Claims `projection` if it is unclaimed or its lease expired, and it is not
    /// done with definition `hash`. Returns the lease with its new epoch.
    ///
    /// # Errors
    /// Server errors.
    pub fn try_claim(&self, projection: &str, hash: &str) -> Result<Option<Lease>> {
        self.claim(projection, Some(hash))
    }

    /// Claims `projection` to keep it current (a following worker): like
    /// [`Leases::try_claim`], but a projection marked done is claimed too (a
    /// finished rebuild goes stale as the log grows), and the mark is cleared.
    ///
    /// # Errors
    /// Server errors.
    pub fn try_hold(&self, projection: &str) -> Result<Option<Lease>> {
        self.claim(projection, None)
    }

    /// Claims `projection` when free or expired, and, given a `done` hash, not
    /// done with it; clears the done mark.
    fn claim(&self, projection: &str, done: Option<&str>) -> Result<Option<Lease>> {
        let ttl_ms = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
        let row = self
            .lock()
            .query_typed_opt(
                "INSERT INTO projection_leases AS l (projection, owner, epoch, expires_at)
                 VALUES ($1, $2, 1, now() + $3::bigint * interval '1 millisecond')
                 ON CONFLICT (projection) DO UPDATE
                    SET owner = excluded.owner, epoch = l.epoch + 1, expires_at = excluded.expires_at, done_hash = NULL
                  WHERE l.expires_at < now()
                    AND ($4::text IS NULL OR l.done_hash IS DISTINCT FROM $4::text)
                 RETURNING epoch",
                &[
                    (&projection, Type::TEXT),
                    (&self.owner, Type::TEXT),
                    (&ttl_ms, Type::INT8),
                    (&done, Type::TEXT),
                ],
            )
            .map_err(pg_error(format!("claim projection {projection}")))?;
        Ok(row.map(|r| Lease {
            projection: projection.to_owned(),
            epoch: r.get(0),
        }))
    }

    /// Extends the lease, if this worker still holds it at its epoch and it has
    /// not expired. `Ok(false)` means the lease is lost: commit nothing.
    ///
    /// # Errors
    /// Server errors.
    pub fn renew(&self, lease: &Lease) -> Result<bool> {
        let ttl_ms = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
        let n = self
            .lock()
            .query_typed(
                "UPDATE projection_leases SET expires_at = now() + $4::bigint * interval '1 millisecond'
                 WHERE projection = $1 AND owner = $2 AND epoch = $3 AND expires_at > now()
                 RETURNING 1",
                &[
                    (&lease.projection, Type::TEXT),
                    (&self.owner, Type::TEXT),
                    (&lease.epoch, Type::INT8),
                    (&ttl_ms, Type::INT8),
                ],
            )
            .map_err(pg_error(format!("renew lease on {}", lease.projection)))?
            .len();
        Ok(n == 1)
    }

    /// Marks the projection done with definition `hash` and lets the lease go; no
    /// worker claims it again until the definition changes.
    ///
    /// # Errors
    /// [`Error::External`] when the lease was lost before this.
    pub fn complete(&self, lease: &Lease, hash: &str) -> Result<()> {
        let n = self
            .lock()
            .query_typed(
                "UPDATE projection_leases SET done_hash = $4, expires_at = now()
                 WHERE projection = $1 AND owner = $2 AND epoch = $3
                 RETURNING 1",
                &[
                    (&lease.projection, Type::TEXT),
                    (&self.owner, Type::TEXT),
                    (&lease.epoch, Type::INT8),
                    (&hash, Type::TEXT),
                ],
            )
            .map_err(pg_error(format!("complete {}", lease.projection)))?
            .len();
        if n == 1 {
            Ok(())
        } else {
            Err(Error::External {
                step: format!("complete {}", lease.projection),
                source: format!("lease epoch {} was taken over", lease.epoch).into(),
            })
        }
    }

    /// Gives a lease up early (after a failure), so another worker may claim it.
    ///
    /// # Errors
    /// Server errors.
    pub fn release(&self, lease: &Lease) -> Result<()> {
        self.lock()
            .query_typed(
                "UPDATE projection_leases SET expires_at = now() - interval '1 millisecond'
                 WHERE projection = $1 AND owner = $2 AND epoch = $3",
                &[
                    (&lease.projection, Type::TEXT),
                    (&self.owner, Type::TEXT),
                    (&lease.epoch, Type::INT8),
                ],
            )
            .map_err(pg_error(format!("release {}", lease.projection)))?;
        Ok(())
    }

    /// Says this worker is alive for another lease period, and returns how many
    /// workers are alive (this one included): following workers share the
    /// projections evenly among the live ones.
    ///
    /// # Errors
    /// Server errors.
    pub fn heartbeat(&self) -> Result<usize> {
        let ttl_ms = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
        let mut client = self.lock();
        client
            .query_typed(
                "INSERT INTO projection_workers (owner, expires_at)
                 VALUES ($1, now() + $2::bigint * interval '1 millisecond')
                 ON CONFLICT (owner) DO UPDATE SET expires_at = excluded.expires_at",
                &[(&self.owner, Type::TEXT), (&ttl_ms, Type::INT8)],
            )
            .map_err(pg_error("heartbeat"))?;
        let live: i64 = client
            .query_typed_one(
                "SELECT count(*) FROM projection_workers WHERE expires_at > now()",
                &[],
            )
            .map_err(pg_error("count live workers"))?
            .get(0);
        Ok(usize::try_from(live).unwrap_or(1).max(1))
    }

    /// Says this worker is gone (on a clean stop), so the others rebalance at once.
    ///
    /// # Errors
    /// Server errors.
    pub fn leave(&self) -> Result<()> {
        self.lock()
            .query_typed(
                "DELETE FROM projection_workers WHERE owner = $1",
                &[(&self.owner, Type::TEXT)],
            )
            .map_err(pg_error("leave"))?;
        Ok(())
    }

    /// Whether every projection in `wanted` (name, hash) is done.
    ///
    /// # Errors
    /// Server errors.
    pub fn all_done(&self, wanted: &[(String, String)]) -> Result<bool> {
        let rows = self
            .lock()
            .query_typed(
                "SELECT projection, done_hash FROM projection_leases WHERE done_hash IS NOT NULL",
                &[],
            )
            .map_err(pg_error("read leases"))?;
        Ok(wanted.iter().all(|(name, hash)| {
            rows.iter()
                .any(|r| r.get::<_, String>(0) == *name && r.get::<_, String>(1) == *hash)
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Client> {
        self.client.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
