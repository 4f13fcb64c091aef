//! SQLite's per-connection memory, for processes that keep many projections
//! open.
//!
//! Every SQLite connection sets aside memory when it opens, whatever it will
//! do: a lookaside pool for small allocations (120 KiB by default) and a first
//! block of page-cache slots (20 pages, about 88 KiB with 4 KiB pages), each
//! touched at once, so each counts in the process's resident memory. For a few
//! projections that is nothing; a follower of a thousand projections holds a
//! thousand connections, and those defaults alone came to about 200 MiB.
//! [`lean_sqlite_memory`] makes them small before the first connection opens:
//! pages are then allocated as a connection uses them, and the lookaside pool
//! is [`LOOKASIDE_SLOTS`] slots of [`LOOKASIDE_SLOT_BYTES`]. It also turns off
//! SQLite's memory statistics, which take a process-wide mutex on every
//! allocation (SQLite's own advice for speed; nothing here reads them).

#![allow(unsafe_code)]

use std::ffi::c_void;

use rusqlite::ffi;

use crate::error::{Error, Result};

/// Bytes per lookaside slot: SQLite's own default size, which fits the small
/// objects a prepared statement allocates while it runs.
pub const LOOKASIDE_SLOT_BYTES: i32 = 1200;

/// Lookaside slots per connection (SQLite's default is 100): enough for the
/// engine's statements between commits; SQLite falls back to the heap when
/// they run out.
pub const LOOKASIDE_SLOTS: i32 = 16;

/// Configures SQLite, for this whole process, to set aside little memory per
/// connection (see the module documentation); connections behave as before.
/// Call it first, before anything in the process opens an SQLite connection:
/// SQLite takes such settings only before it initialises.
///
/// # Errors
/// [`Error::InvalidOptions`] when SQLite was already initialised in this
/// process (nothing is changed then).
pub fn lean_sqlite_memory() -> Result<()> {
    let too_late = || {
        Error::InvalidOptions(
            "SQLite is already in use in this process: call lean_sqlite_memory before opening any connection"
                .to_owned(),
        )
    };
    // SAFETY: `sqlite3_config` is variadic; each call passes exactly the
    // arguments its option takes (SQLITE_CONFIG_PAGECACHE: void*, int, int;
    // SQLITE_CONFIG_LOOKASIDE: int, int). A null buffer makes SQLite allocate
    // page-cache memory itself. Called after SQLite initialised, it returns
    // SQLITE_MISUSE and changes nothing; it is not safe to call while another
    // thread initialises SQLite, which is why this is for the start of `main`.
    let page_cache = unsafe {
        ffi::sqlite3_config(
            ffi::SQLITE_CONFIG_PAGECACHE,
            std::ptr::null_mut::<c_void>(),
            0,
            0,
        )
    };
    if page_cache != ffi::SQLITE_OK {
        return Err(too_late());
    }
    // SAFETY: as above.
    let lookaside = unsafe {
        ffi::sqlite3_config(
            ffi::SQLITE_CONFIG_LOOKASIDE,
            LOOKASIDE_SLOT_BYTES,
            LOOKASIDE_SLOTS,
        )
    };
    if lookaside != ffi::SQLITE_OK {
        return Err(too_late());
    }
    // SAFETY: as above (SQLITE_CONFIG_MEMSTATUS: int).
    let memstatus = unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_MEMSTATUS, 0) };
    if memstatus != ffi::SQLITE_OK {
        return Err(too_late());
    }
    Ok(())
}
