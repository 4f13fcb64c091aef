//! Confinement of config SQL: a declared projection may read and write only its
//! own tables in its own file. SQLite's authorizer, consulted while statements
//! are prepared (and, for `VACUUM INTO`, while they run), denies everything else;
//! the connection also allows no attached database and runs in defensive mode.
//! No SQL text is parsed here: SQLite says what each statement does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use projectionist::rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use projectionist::rusqlite::limits::Limit;
use projectionist::rusqlite::{self, Connection, config::DbConfig};

/// Tables the engine owns: config SQL may read them, never change them.
/// (SQLite's own `sqlite_*` tables change with every `CREATE`; SQLite itself
/// keeps them from direct writes while `writable_schema` is off, and defensive
/// mode keeps it off.)
fn is_reserved_table(name: &str) -> bool {
    projectionist::is_reserved_table(name)
}

/// The confinement of one connection: the authorizer is installed once per run
/// (installing it expires every prepared statement, so it is not done per batch)
/// and enforced only while config SQL runs, so the engine's own statements (the
/// checkpoint, savepoints) are prepared unhindered.
#[derive(Clone, Debug, Default)]
pub(crate) struct Confinement {
    enforcing: Arc<AtomicBool>,
    /// Narrower still, for `deferred_indexes`: nothing but creating indexes.
    indexes_only: Arc<AtomicBool>,
    refused: Arc<Mutex<Option<String>>>,
}

impl Confinement {
    /// Installs the authorizer on `conn` and allows it no attached database and
    /// defensive mode (no writes to the schema table, no corrupting pragmas).
    ///
    /// # Errors
    /// SQLite errors setting the limits.
    pub(crate) fn install(&self, conn: &Connection) -> rusqlite::Result<()> {
        conn.set_limit(Limit::SQLITE_LIMIT_ATTACHED, 0)?;
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
        let enforcing = Arc::clone(&self.enforcing);
        let indexes_only = Arc::clone(&self.indexes_only);
        let refused = Arc::clone(&self.refused);
        conn.authorizer(Some(move |context: AuthContext<'_>| {
            if !enforcing.load(Ordering::Relaxed) {
                return Authorization::Allow;
            }
            let message = match refusal(&context) {
                Some(reason) => format!(
                    "{reason} is not allowed: projection SQL may only change its own tables"
                ),
                None if indexes_only.load(Ordering::Relaxed) => {
                    match not_index_creation(&context) {
                        Some(what) => format!(
                            "{what} is not allowed: deferred_indexes may only create indexes"
                        ),
                        None => return Authorization::Allow,
                    }
                }
                None => return Authorization::Allow,
            };
            *refused.lock().unwrap_or_else(PoisonError::into_inner) = Some(message);
            Authorization::Deny
        }))?;
        Ok(())
    }

    /// Enforces the confinement until the guard is dropped.
    pub(crate) fn enforce(&self) -> Enforced<'_> {
        self.enforcing.store(true, Ordering::Relaxed);
        Enforced(self)
    }

    /// Enforces the confinement and allows nothing but creating indexes
    /// (and the reads that takes) until the guard is dropped, which restores
    /// the enforcement as it was.
    pub(crate) fn enforce_indexes_only(&self) -> IndexesOnly<'_> {
        let was_enforcing = self.enforcing.swap(true, Ordering::Relaxed);
        self.indexes_only.store(true, Ordering::Relaxed);
        IndexesOnly {
            confinement: self,
            was_enforcing,
        }
    }

    /// Turns a SQLite error into a message, naming what was refused.
    pub(crate) fn explain(&self, error: &rusqlite::Error) -> String {
        let refused = self
            .refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match (refused, error.sqlite_error_code()) {
            (Some(message), Some(rusqlite::ErrorCode::AuthorizationForStatementDenied)) => message,
            _ => error.to_string(),
        }
    }
}

/// While alive, the authorizer refuses what config SQL may not do.
pub(crate) struct Enforced<'a>(&'a Confinement);

impl Drop for Enforced<'_> {
    fn drop(&mut self) {
        self.0.enforcing.store(false, Ordering::Relaxed);
    }
}

/// While alive, the authorizer allows only index creation.
pub(crate) struct IndexesOnly<'a> {
    confinement: &'a Confinement,
    was_enforcing: bool,
}

impl Drop for IndexesOnly<'_> {
    fn drop(&mut self) {
        self.confinement
            .indexes_only
            .store(false, Ordering::Relaxed);
        self.confinement
            .enforcing
            .store(self.was_enforcing, Ordering::Relaxed);
    }
}

/// What an action does, when it is not part of creating an index: SQLite
/// reports `CREATE INDEX` as the creation, a row added to its schema table,
/// the index's filling (a reindex), and the reads and functions of an
/// expression or partial index.
fn not_index_creation(context: &AuthContext<'_>) -> Option<String> {
    match context.action {
        AuthAction::CreateIndex { .. }
        | AuthAction::Reindex { .. }
        | AuthAction::Read { .. }
        | AuthAction::Select
        | AuthAction::Function { .. } => None,
        AuthAction::Insert { table_name }
            if table_name.eq_ignore_ascii_case("sqlite_master")
                || table_name.eq_ignore_ascii_case("sqlite_schema") =>
        {
            None
        }
        AuthAction::Insert { table_name } => Some(format!("writing to table {table_name}")),
        AuthAction::Delete { table_name } => Some(format!("deleting from table {table_name}")),
        AuthAction::Update { table_name, .. } => Some(format!("updating table {table_name}")),
        AuthAction::CreateTable { table_name } | AuthAction::CreateTempTable { table_name } => {
            Some(format!("creating table {table_name}"))
        }
        AuthAction::DropTable { table_name } | AuthAction::DropTempTable { table_name } => {
            Some(format!("dropping table {table_name}"))
        }
        AuthAction::DropIndex { index_name, .. } | AuthAction::DropTempIndex { index_name, .. } => {
            Some(format!("dropping index {index_name}"))
        }
        other => Some(format!("{other:?}")),
    }
}

/// Why an action is refused, or `None` when it is allowed.
fn refusal(context: &AuthContext<'_>) -> Option<String> {
    if let Some(database) = context.database_name
        && database != "main"
        && database != "temp"
    {
        return Some(format!("access to database {database:?}"));
    }
    let reserved = |table: &str, what: &str| {
        is_reserved_table(table)
            .then(|| format!("{what} table {table} (reserved for projectionist)"))
    };
    match context.action {
        AuthAction::Attach { .. } => Some("ATTACH (or VACUUM INTO)".into()),
        AuthAction::Detach { .. } => Some("DETACH".into()),
        AuthAction::Pragma { pragma_name, .. } => Some(format!("PRAGMA {pragma_name}")),
        AuthAction::Transaction { .. } | AuthAction::Savepoint { .. } => {
            Some("transaction control (the engine owns the transaction)".into())
        }
        AuthAction::Function { function_name }
            if function_name.eq_ignore_ascii_case("load_extension") =>
        {
            Some("load_extension".into())
        }
        AuthAction::Insert { table_name }
        | AuthAction::Delete { table_name }
        | AuthAction::Update { table_name, .. } => reserved(table_name, "writing to"),
        AuthAction::CreateTable { table_name } | AuthAction::CreateTempTable { table_name } => {
            reserved(table_name, "creating")
        }
        AuthAction::DropTable { table_name }
        | AuthAction::DropTempTable { table_name }
        | AuthAction::AlterTable { table_name, .. } => reserved(table_name, "dropping or altering"),
        AuthAction::CreateIndex { table_name, .. }
        | AuthAction::CreateTempIndex { table_name, .. }
        | AuthAction::DropIndex { table_name, .. }
        | AuthAction::DropTempIndex { table_name, .. }
        | AuthAction::CreateTrigger { table_name, .. }
        | AuthAction::CreateTempTrigger { table_name, .. }
        | AuthAction::DropTrigger { table_name, .. }
        | AuthAction::DropTempTrigger { table_name, .. } => {
            reserved(table_name, "indexes or triggers on")
        }
        _ => None,
    }
}

/// Whether a prepared statement would run `VACUUM` (SQLite reports `VACUUM INTO`
/// to the authorizer only when it runs, so it is found in the statement's
/// bytecode at load time instead).
pub(crate) fn vacuums(conn: &Connection, sql: &str) -> rusqlite::Result<bool> {
    let mut stmt = conn.prepare(&format!("EXPLAIN {sql}"))?;
    // EXPLAIN lists the bytecode without running it; parameters stay unbound.
    let mut rows = stmt.raw_query();
    while let Some(row) = rows.next()? {
        let opcode: String = row.get(1)?;
        if opcode == "Vacuum" {
            return Ok(true);
        }
    }
    Ok(false)
}
