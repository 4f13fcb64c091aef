//! Every bound the library enforces, with the reason for its value.
//!
//! Out-of-range input is an [`Error::InvalidOptions`](crate::Error::InvalidOptions)
//! at validation, never a silent clamp.

use std::time::Duration;

/// Events per replay batch when none is given (Go: `DefaultBatchSize`).
/// One batch is one SQLite transaction: large enough to amortise the commit,
/// small enough that memory stays small and a crash loses little work.
pub const BATCH_SIZE_DEFAULT: u32 = 500;

/// Upper limit on events per batch (Go: `MaxBatchSize`). Bounds the memory held per
/// batch and how long one write transaction keeps the projection file locked.
pub const BATCH_SIZE_MAX: u32 = 50_000;

/// Upper limit on projections rebuilt at once (Go: `MaxConcurrentRebuilds`). Each
/// rebuild holds a SQLite writer, a thread and an event-store connection; more
/// projections than this queue and run when a slot frees up.
pub const CONCURRENT_REBUILDS_MAX: u32 = 32;

/// Writer threads of one run. Up to this many projections each get a thread of
/// their own; more share them, each thread applying a batch to its projections
/// in turn (every projection keeps its own connection and transaction), so a
/// process following a thousand projections runs a few dozen threads, not a
/// thousand. Equal to [`CONCURRENT_REBUILDS_MAX`], so runs of up to that many
/// projections are laid out as before.
pub const WRITER_THREADS_MAX: u32 = 32;

/// Decoded batches that may wait in one writer's channel during a fan-out.
/// Two lets the reader decode batch n+1 while the writer commits batch n, which is
/// all the overlap there is to gain; memory stays O(batch size x projections).
#[doc(hidden)]
pub const CHANNEL_BATCHES_MAX: usize = 2;

/// How long a rebuild's write transaction collects batches before committing,
/// when none is given. Each commit rewrites every page the transaction touched
/// (to the WAL, and again at checkpoint), so committing a few times a second
/// instead of after every batch roughly halves rebuild time on the demo log,
/// while a crash loses at most this much work (it is replayed on resume).
pub const COMMIT_INTERVAL_DEFAULT: Duration = Duration::from_millis(250);

/// SQLite page cache (KiB) that the projections of one run may hold together.
/// Each projection's connection gets an equal share, at most
/// [`PAGE_CACHE_PER_PROJECTION_MAX_KIB`]: one or two projections get 16 MiB
/// each, 16 get SQLite's default of 2 MiB, a thousand get 32 KiB each, so a
/// follower's memory stays bounded however many projections it keeps current.
/// A share is a bound, not an allocation: a small file never fills it. Pages
/// beyond a share are read again from the file (usually from the operating
/// system's cache), and a changed page that must leave the cache before its
/// commit is written to the WAL early and read back from there.
#[doc(hidden)]
pub const PAGE_CACHE_BUDGET_KIB: u64 = 32 * 1024;

/// A projection's page cache is never more than 16 MiB. A large projection
/// whose writes land on random pages (an index on a column whose values
/// arrive in no order) is bound by the pages it must read back and write out
/// early once it outgrows its cache: on the demo log, 16 MiB instead of
/// SQLite's default 2 MiB rebuilt 10M events 30% faster and 1M events 28%
/// faster (see BENCHMARKS.md), while two such caches still fit the budget.
pub(crate) const PAGE_CACHE_PER_PROJECTION_MAX_KIB: u64 = 16 * 1024;

/// Nor less than this, so that a B-tree descent and its neighbours stay
/// cached within one statement.
#[doc(hidden)]
pub const PAGE_CACHE_PER_PROJECTION_MIN_KIB: u64 = 32;

/// Page cache (KiB) of a projection while [`Handler::caught_up`](crate::Handler::caught_up)
/// runs. SQLite sizes the buffer it sorts an index's keys in by the page
/// cache, so building an index at the end of a run would otherwise hold a
/// full share twice; the sorted runs go to temporary files and the index is
/// written in key order, which needs few pages at a time.
pub(crate) const CAUGHT_UP_CACHE_KIB: u64 = 2 * 1024;

/// Page cache (KiB) of an SQLite event store's reading connection. A run
/// reads the log once, in sequence order, so its pages are not read again:
/// this keeps the B-tree's inner pages and the pages of one read, instead of
/// SQLite's default 2 MiB of leaves already passed.
pub(crate) const STORE_READER_CACHE_KIB: u64 = 256;

/// Projections of one run whose files stay open for the whole run. A run
/// with more parks the others' connections ([`ProjectionDb::park`](crate::ProjectionDb::park))
/// and opens each file only for a message that holds events of its types,
/// committing that message on its own. An open projection costs about
/// 130 KiB (SQLite's schema, statements and page cache for the connection,
/// plus the 32 KiB `-shm` mapping) and three file descriptors, so 256 keep
/// a follower of any number of projections near 64 MiB; opening a file again
/// costs about a millisecond. Runs of up to this many projections are not
/// affected; in a larger run, the first this many projections given keep
/// their files open.
pub const OPEN_PROJECTIONS_MAX: usize = 256;

/// Batches a parked projection keeps before it opens its file to apply them
/// together (it also does when the oldest is a commit interval old, and when
/// the reader reaches the head). The batches are shared with the run's other
/// projections, so this bounds how many a run keeps alive, not a copy per
/// projection; 16 batches of 500 events cut the opens of a catch-up sixteen
/// times.
pub(crate) const PARKED_PENDING_BATCHES_MAX: usize = 16;

/// Decoded batches a [`SharedDecode`](crate::SharedDecode) keeps per payload
/// type for the other handlers of that type. Writers of one run receive the
/// same batches, at most [`CHANNEL_BATCHES_MAX`] apart, plus a parked
/// projection's kept ones; a handler further behind decodes its batch
/// itself. Bounds memory to this many batches (each at most
/// [`BATCH_SIZE_MAX`] events) per payload type of a run.
pub const DECODED_BATCHES_KEPT: usize = 32;

/// WAL pages (`PRAGMA wal_autocheckpoint`) a parked projection's file may
/// collect before a commit checkpoints it. Parked files are closed without a
/// checkpoint, and the next open reads the whole `-wal` to index it: 64 pages
/// (256 KiB with 4 KiB pages) keep that read short, and the checkpoint's two
/// `fsync`s come once per some twenty small commits instead of once per close.
pub(crate) const PARKED_WAL_PAGES_MAX: u32 = 64;

/// A parked projection that is sent nothing of its types has its checkpoint
/// moved up to the log's head at most this often while following (each move
/// opens its file); readers of its file see it that much behind, though it
/// has nothing to apply.
#[doc(hidden)]
pub const PARKED_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);

/// Page cache (KiB) that [`quick_check`](crate::quick_check) reads a whole
/// projection file through. The check visits each page once, so a small cache
/// costs it nothing, while SQLite's default (2 MiB) would stay filled with the
/// file's pages on every connection checked before a run: measured on a
/// follower of 1,000 small projections, that was most of its heap.
pub(crate) const QUICK_CHECK_CACHE_KIB: u64 = 64;

/// Upper limit on the commit interval: bounds the work a crash throws away, the
/// size of the WAL, and how stale the projection looks to readers.
pub const COMMIT_INTERVAL_MAX: Duration = Duration::from_secs(60);

/// Longest projection name, in bytes. The name becomes a file name
/// (`{name}.db` plus `-wal`/`-shm` and a lock file) and must stay well under the
/// 255-byte file-name limit of common file systems.
pub const NAME_LEN_MAX: usize = 128;

/// Longest consumer id stored in the `_checkpoint` table, in bytes.
pub const CONSUMER_ID_LEN_MAX: usize = 256;

/// How long a connection waits for another connection's lock before failing with
/// `SQLITE_BUSY`, in milliseconds. Long enough to ride out a large batch commit of
/// another writer, short enough that a stuck process surfaces as an error.
#[doc(hidden)]
pub const BUSY_TIMEOUT_MS: u32 = 10_000;

/// How long a projection waits for another connection's write lock while it
/// opens and starts a run, in milliseconds. Every projection of a run must start
/// before the shared read begins, so one file held by a foreign writer (a shell,
/// another tool) would hold back all the others for [`BUSY_TIMEOUT_MS`]; with
/// this short wait it fails alone ("database is locked") and the others go on.
#[doc(hidden)]
pub const START_BUSY_TIMEOUT_MS: u32 = 200;

/// How long a publish waits for readers to leave the old snapshot so that it
/// can move the live file's `-wal` (a whole copy of the projection after a
/// publish) into the main file and truncate it, in milliseconds. Best effort:
/// if readers stay, SQLite's automatic checkpoints do it later; a longer wait
/// would only delay the end of the publish, never a reader.
pub(crate) const PUBLISH_CHECKPOINT_BUSY_MS: u64 = 1_000;

/// Longest table or column name in an event table mapping, in bytes:
/// PostgreSQL's identifier limit (`NAMEDATALEN` - 1), so a mapping valid for
/// one store is valid for the other.
pub const IDENTIFIER_LEN_MAX: usize = 63;

/// How often a follower that is caught up asks a store without a cheap change
/// signal for new events (each ask is a read of the log). PostgreSQL's reads
/// cost a round trip and a snapshot: 20 a second keep a new event's latency
/// under a tenth of a second at a small, steady cost.
pub const FOLLOW_POLL_INTERVAL_DEFAULT: Duration = Duration::from_millis(50);

const _: () =
    assert!(FOLLOW_POLL_INTERVAL_DEFAULT.as_millis() <= FOLLOW_QUIET_POLL_MAX.as_millis());

/// How often a follower that is caught up asks an SQLite store whether another
/// connection committed (`PRAGMA data_version`: a read of the shared-memory
/// index and its locks, no query). While events flow, a new event is visible to
/// readers within a few milliseconds (BENCHMARKS.md); a quiet log is polled
/// less often (see [`FOLLOW_QUIET_POLL_DIVISOR`]).
pub(crate) const SQLITE_CHANGE_POLL_INTERVAL: Duration = Duration::from_millis(1);

/// A caught-up follower polls a quiet log every 1/`FOLLOW_QUIET_POLL_DIVISOR`
/// of the time it has been quiet (at least at the store's own interval, at
/// most [`FOLLOW_QUIET_POLL_MAX`]), so the first event after a quiet spell waits
/// at most 1% of that spell, while events that keep coming are seen at once.
/// Every poll wakes the process, which costs about 0.1 ms of CPU on the
/// standard machine whatever the poll does: at 1 ms an idle follower used
/// 10% of a core.
pub(crate) const FOLLOW_QUIET_POLL_DIVISOR: u32 = 100;

/// The longest wait between two polls of a quiet log: the latency of the first
/// event after a long quiet spell, and 20 wake-ups a second while idle
/// (about 0.2% of a core, BENCHMARKS.md).
pub(crate) const FOLLOW_QUIET_POLL_MAX: Duration = Duration::from_millis(50);

/// How often [`wait_for_checkpoint`](crate::wait_for_checkpoint) reads a
/// projection's checkpoint: a read-your-writes wait sees a commit within this
/// long; each look is one small read transaction.
pub(crate) const WAIT_POLL_INTERVAL: Duration = Duration::from_millis(2);

/// Dead letters a projection file may hold before a projection that skips
/// poison events ([`OnError::Skip`](crate::OnError::Skip)) stops when none is
/// set: a few bad events are worth skipping; a hundred mean the definition is
/// wrong, not the events.
pub const DEAD_LETTERS_MAX_DEFAULT: u32 = 100;

/// The largest bound a projection may set on its dead letters: each is a row
/// in its file, listed whole by `dead_letters`, and a retry reads each back
/// from the log.
pub const DEAD_LETTERS_MAX: u32 = 100_000;

/// The longest error message kept with a dead letter, in bytes: enough for
/// any handler's message and the statement that failed; a longer one (a
/// handler that prints a whole payload) is cut at a character boundary.
pub const DEAD_LETTER_ERROR_BYTES_MAX: usize = 4_096;

/// Events one append call may write: an append is one transaction held in memory.
pub const APPEND_EVENTS_MAX: usize = 100_000;

/// Distinct event types a store lists in
/// [`GlobalReader::event_types`](crate::GlobalReader::event_types): a config
/// handles a few dozen types; a log with more is named data, not types, and
/// is not listed.
#[doc(hidden)]
pub const EVENT_TYPES_LISTED_MAX: usize = 1_000;

const _: () = {
    assert!(0 < BATCH_SIZE_DEFAULT);
    assert!(BATCH_SIZE_DEFAULT <= BATCH_SIZE_MAX);
    assert!(0 < CONCURRENT_REBUILDS_MAX);
    assert!(0 < CHANNEL_BATCHES_MAX);
    assert!(0 < WRITER_THREADS_MAX);
    assert!(PAGE_CACHE_PER_PROJECTION_MIN_KIB <= PAGE_CACHE_PER_PROJECTION_MAX_KIB);
    assert!(NAME_LEN_MAX + 16 < 255);
    assert!(0 < BUSY_TIMEOUT_MS);
    assert!(START_BUSY_TIMEOUT_MS <= BUSY_TIMEOUT_MS);
    assert!(COMMIT_INTERVAL_DEFAULT.as_millis() <= COMMIT_INTERVAL_MAX.as_millis());
};
