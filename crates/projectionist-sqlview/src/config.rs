//! The config file: raw TOML shape, validation against a scratch database, and
//! the validated `SqlProjection`s.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use projectionist::rusqlite::Connection;
use projectionist::{
    ConditionValue, EventTableMapping, ProjectionName, RowCondition, plain_identifier,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::confine::{Confinement, vacuums};
use crate::params::{Param, rewrite};

/// Longest config file read, in bytes: a config is hand-written text; anything
/// larger is a mistake (a log file passed as `--config`), not a config.
const CONFIG_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// A config that cannot be used. Every message names the file and the place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("read config {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, or not the expected shape.
    #[error("config {origin}: {message}")]
    Syntax {
        /// The file.
        origin: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A value that is well-formed but not acceptable.
    #[error("config {origin}: {place}: {message}")]
    Invalid {
        /// The file.
        origin: String,
        /// Where: `projection "x"`, `projection "x", event OrderPlaced, statement 1`.
        place: String,
        /// What is wrong.
        message: String,
    },
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The `[[projection]]` tables.
    #[serde(default)]
    pub projection: Vec<RawProjection>,
    /// `[source]`: the events table to read, when it is not ours.
    #[serde(default)]
    pub source: Option<RawSource>,
}

/// `[source]` as written: the events table and its columns. A key left out
/// names our own column (`sequence`, `stream_id`, ...); `metadata` and
/// `recorded_at` left out mean the table has no such column.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    /// Another tool's event store whose layout to start from (see
    /// [`PRESETS`]); the other keys, when given, override its columns.
    pub preset: Option<String>,
    /// Table name. Default `events`.
    pub table: Option<String>,
    /// Global sequence column. Default `sequence`.
    pub sequence: Option<String>,
    /// Stream id column. Default `stream_id`.
    pub stream_id: Option<String>,
    /// Stream version column. Default `stream_version`.
    pub stream_version: Option<String>,
    /// Event type column. Default `event_type`.
    pub event_type: Option<String>,
    /// Payload column (JSON as text or blob). Default `data`.
    pub data: Option<String>,
    /// Metadata column, if any.
    pub metadata: Option<String>,
    /// Timestamp column (text or integer), if any.
    pub recorded_at: Option<String>,
    /// PostgreSQL only: the schema where workers keep their leases and
    /// heartbeats, created if missing, so that nothing is created in the
    /// schemas of the table read. Default `projectionist`.
    pub state_schema: Option<String>,
    /// PostgreSQL only: how long a hole in the sequence is held at least, in
    /// milliseconds, for writers that draw a number in one transaction and
    /// insert it in a later one (see docs/postgres.md). Default 0.
    pub settle_ms: Option<u64>,
}

/// One `[[projection]]` as written. Read from a file, or built with
/// [`RawProjection::new`] and its setters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RawProjection {
    /// The projection (and file) name.
    pub name: String,
    /// Definition version; changing it marks the projection stale.
    pub version: u32,
    /// SQL creating the projection's tables.
    pub schema: String,
    /// `CREATE INDEX IF NOT EXISTS` statements built once a run has applied
    /// the whole log (see [`SqlProjection::deferred_indexes`]).
    #[serde(default)]
    pub deferred_indexes: Option<String>,
    /// Statements per event type.
    #[serde(default)]
    pub on: BTreeMap<String, RawHandler>,
    /// What to do with an event that cannot be applied: `"stop"` (the
    /// default) or `"skip"` (record it as a dead letter and go on).
    #[serde(default)]
    pub on_error: Option<String>,
    /// With `on_error = "skip"`: dead letters the file may hold before the
    /// projection stops (default 100).
    #[serde(default)]
    pub max_dead_letters: Option<u32>,
}

impl RawProjection {
    /// Projection `name` at `version` with `schema`, handling no event type
    /// yet (see [`on`](Self::on)), stopping at an event it cannot apply.
    #[must_use]
    pub fn new(name: impl Into<String>, version: u32, schema: impl Into<String>) -> Self {
        RawProjection {
            name: name.into(),
            version,
            schema: schema.into(),
            deferred_indexes: None,
            on: BTreeMap::new(),
            on_error: None,
            max_dead_letters: None,
        }
    }

    /// Runs `sql` for each event of `event_type` (statements added for the
    /// same type run in order).
    #[must_use]
    pub fn on(mut self, event_type: impl Into<String>, sql: impl Into<String>) -> Self {
        let sql = sql.into();
        match self.on.entry(event_type.into()) {
            std::collections::btree_map::Entry::Vacant(entry) => {
                entry.insert(RawHandler {
                    sql: RawStatements::One(sql),
                });
            }
            std::collections::btree_map::Entry::Occupied(mut entry) => {
                let handler = entry.get_mut();
                let mut all =
                    match std::mem::replace(&mut handler.sql, RawStatements::Many(Vec::new())) {
                        RawStatements::One(one) => vec![one],
                        RawStatements::Many(many) => many,
                    };
                all.push(sql);
                handler.sql = RawStatements::Many(all);
            }
        }
        self
    }

    /// Indexes built once a run has applied the whole log.
    #[must_use]
    pub fn deferred_indexes(mut self, sql: impl Into<String>) -> Self {
        self.deferred_indexes = Some(sql.into());
        self
    }

    /// `"stop"` or `"skip"` (see the field).
    #[must_use]
    pub fn on_error(mut self, policy: impl Into<String>) -> Self {
        self.on_error = Some(policy.into());
        self
    }

    /// With `on_error = "skip"`: dead letters the file may hold.
    #[must_use]
    pub fn max_dead_letters(mut self, max: u32) -> Self {
        self.max_dead_letters = Some(max);
        self
    }
}

/// `[projection.on.EventType]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHandler {
    /// One statement, or a list run in order.
    pub sql: RawStatements,
}

/// One statement or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawStatements {
    /// `sql = "..."`.
    One(String),
    /// `sql = ["...", "..."]`.
    Many(Vec<String>),
}

/// A validated config.
#[derive(Clone, Debug)]
pub struct ProjectionsConfig {
    /// The projections, in file order.
    pub projections: Vec<SqlProjection>,
    /// The events table to read, from `[source]`; `None` for our own layout.
    /// With a preset, the table as that tool lays it out in SQLite.
    pub source: Option<EventTableMapping>,
    /// The same for a PostgreSQL store: differs from `source` only for a
    /// preset whose tool lays its table out differently there.
    pub source_postgres: Option<EventTableMapping>,
    /// `[source]`'s `settle_ms`: how long a PostgreSQL reader holds a hole in
    /// that table at least (zero when not given).
    pub source_settle: std::time::Duration,
    /// Rows of the `[source]` table that are events (a preset's: e.g. not
    /// archived); empty means every row.
    pub source_conditions: Vec<RowCondition>,
    /// `[source]`'s `state_schema`, when given.
    pub source_state_schema: Option<String>,
}

/// One validated projection, from [`ProjectionsConfig`] (its fields can be
/// read, and grow in later versions).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SqlProjection {
    /// Its name.
    pub name: ProjectionName,
    /// Its declared version.
    pub version: u32,
    /// Its schema SQL.
    pub schema: String,
    /// Statements per event type, in order.
    pub on: BTreeMap<String, Vec<Statement>>,
    /// SHA-256 (hex) of version, schema and statements: any change is detected.
    pub hash: String,
    /// Indexes (`CREATE INDEX IF NOT EXISTS ...`, empty for none) built when a
    /// run reaches the log's head, not kept up to date during a rebuild: for
    /// indexes the application queries through but no statement of `on`
    /// searches by. Not part of `hash`: adding one to a built projection
    /// builds it at the next run's end, without a rebuild.
    pub deferred_indexes: String,
    /// What to do with an event that cannot be applied (`on_error` and
    /// `max_dead_letters`). Not part of `hash`: the rows of a log without
    /// poison do not depend on it.
    pub on_error: projectionist::OnError,
}

/// One statement, as written and as prepared.
#[derive(Clone, Debug)]
pub struct Statement {
    /// As written in the file.
    pub text: String,
    /// With `?N` placeholders.
    pub sql: String,
    /// What `?1`, `?2`, ... bind.
    pub params: Vec<Param>,
}

impl ProjectionsConfig {
    /// Reads and validates a config file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and the place.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read_error = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let size = std::fs::metadata(path).map_err(read_error)?.len();
        if size > CONFIG_BYTES_MAX {
            return Err(ConfigError::Invalid {
                origin: path.display().to_string(),
                place: "file".into(),
                message: format!("{size} bytes is larger than the {CONFIG_BYTES_MAX}-byte limit"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `origin` names it in errors.
    ///
    /// # Errors
    /// [`ConfigError`] naming the place.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        Self::parse_with(text, origin, true)
    }

    /// Loads a config that may declare no projection, for what needs only
    /// its `[source]` (`inspect`).
    ///
    /// # Errors
    /// As [`ProjectionsConfig::load`], but for a missing `[[projection]]`.
    pub fn load_source_only(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_with(&text, &path.display().to_string(), false)
    }

    fn parse_with(
        text: &str,
        origin: &str,
        require_projections: bool,
    ) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            origin: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |place: String, message: String| ConfigError::Invalid {
            origin: origin.to_owned(),
            place,
            message,
        };
        if require_projections && raw.projection.is_empty() {
            return Err(invalid("file".into(), "declares no [[projection]]".into()));
        }
        let mut projections: Vec<SqlProjection> = Vec::new();
        for raw_projection in raw.projection {
            let projection = validate_projection(raw_projection)
                .map_err(|(place, message)| invalid(place, message))?;
            if projections.iter().any(|p| p.name == projection.name) {
                return Err(invalid(
                    format!("projection {:?}", projection.name.as_str()),
                    "is declared twice".into(),
                ));
            }
            projections.push(projection);
        }
        let source_settle = std::time::Duration::from_millis(
            raw.source.as_ref().and_then(|s| s.settle_ms).unwrap_or(0),
        );
        if source_settle > SOURCE_SETTLE_MAX {
            return Err(invalid(
                "[source]".into(),
                format!(
                    "settle_ms exceeds the maximum of {}",
                    SOURCE_SETTLE_MAX.as_millis()
                ),
            ));
        }
        let source_state_schema = raw.source.as_ref().and_then(|s| s.state_schema.clone());
        if let Some(schema) = &source_state_schema {
            plain_identifier(schema).map_err(|e| invalid("[source]".into(), e.to_string()))?;
        }
        let (source, source_postgres, source_conditions) = match raw.source {
            Some(raw_source) => {
                let conditions = raw_source.conditions();
                let (sqlite, postgres) =
                    validate_source(raw_source).map_err(|m| invalid("[source]".into(), m))?;
                (Some(sqlite), Some(postgres), conditions)
            }
            None => (None, None, Vec::new()),
        };
        Ok(ProjectionsConfig {
            projections,
            source,
            source_postgres,
            source_settle,
            source_conditions,
            source_state_schema,
        })
    }

    /// The projection called `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&SqlProjection> {
        self.projections.iter().find(|p| p.name.as_str() == name)
    }
}

impl SqlProjection {
    /// Validates one projection built in code (see [`RawProjection::new`])
    /// the way a config file's are: its statements prepared against its
    /// schema, its SQL confined to its own tables.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the place and what is wrong (origin
    /// `code`).
    pub fn from_raw(raw: RawProjection) -> Result<Self, ConfigError> {
        validate_projection(raw).map_err(|(place, message)| ConfigError::Invalid {
            origin: "code".to_owned(),
            place,
            message,
        })
    }

    /// Whether the projection file behind `conn` was built from another
    /// definition of this projection (version or content) and so must be
    /// rebuilt rather than resumed. A file with no recorded definition (new, or
    /// built by a Rust handler) does not: setting it up records this one.
    ///
    /// # Errors
    /// SQLite errors reading the file.
    pub fn needs_rebuild(
        &self,
        conn: &projectionist::rusqlite::Connection,
    ) -> Result<bool, projectionist::rusqlite::Error> {
        Ok(crate::definition::stored_definition(conn)?
            .is_some_and(|stored| stored.hash != self.hash))
    }

    /// The indexes that `deferred_indexes` creates, by name (found by running
    /// the schema and it on an empty in-memory database, as the config check
    /// does), and which of them the projection file behind `conn` lacks: a
    /// run that stopped short of the log's head has not built them yet.
    ///
    /// # Errors
    /// SQLite errors running the schema or reading the file.
    pub fn missing_deferred_indexes(
        &self,
        conn: &projectionist::rusqlite::Connection,
    ) -> Result<Vec<String>, projectionist::rusqlite::Error> {
        if self.deferred_indexes.trim().is_empty() {
            return Ok(Vec::new());
        }
        let scratch = Connection::open_in_memory()?;
        scratch.execute_batch(SCRATCH_ENGINE_TABLES)?;
        scratch.execute_batch(&self.schema)?;
        let before = index_names(&scratch)?;
        scratch.execute_batch(&self.deferred_indexes)?;
        let in_file = index_names(conn)?;
        Ok(index_names(&scratch)?
            .into_iter()
            .filter(|name| !before.contains(name) && !in_file.contains(name))
            .collect())
    }

    /// The event types this projection handles.
    #[must_use]
    pub fn event_types(&self) -> Vec<String> {
        self.on.keys().cloned().collect()
    }
}

type Failure = (String, String);

/// Upper limit on `[source]`'s `settle_ms`: every hole in the log is held this
/// long, so a larger value would stall followers for minutes.
pub const SOURCE_SETTLE_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// The presets `[source] preset = "..."` knows: another tool's event store,
/// laid out as that tool writes it.
///
/// - `emmett`: Emmett's SQLite and PostgreSQL event stores: table
///   `emt_messages`, global order `global_position`, streams `stream_id`,
///   versions `stream_position`, types `message_type`, payloads
///   `message_data`, metadata `message_metadata`, times `created`; only its
///   events (`message_kind = 'E'`) that are not archived.
/// - `marten`: Marten's `mt_events` (PostgreSQL): global order `seq_id`,
///   streams `stream_id`, versions `version`, types `type` (Marten's alias,
///   e.g. `order_placed`), payloads `data`, times `timestamp`; archived events
///   left out. Every tenant's events are read.
/// - `eventsourcing`: the Python `eventsourcing` library's application
///   recorders. SQLite: table `stored_events`, global order its `rowid`;
///   PostgreSQL: the table is named after the application
///   (`{name}_events`: give `table`), global order `notification_id`. Streams
///   are `originator_id`, versions `originator_version`, event types the
///   `topic` (`module:Class.Event`: quote it as a TOML key), payloads `state`
///   (JSON as a BLOB or `bytea`; a recorder that compresses or encrypts its
///   state cannot be read).
pub const PRESETS: [&str; 3] = ["eventsourcing", "emmett", "marten"];

/// The mappings of `[source] preset = "{preset}"` with no other key: for
/// SQLite, for PostgreSQL, and the rows that are events.
///
/// # Errors
/// An unknown preset, naming the known ones.
pub fn preset_source(
    preset: &str,
) -> Result<(EventTableMapping, EventTableMapping, Vec<RowCondition>), String> {
    let raw = RawSource {
        preset: Some(preset.to_owned()),
        table: None,
        sequence: None,
        stream_id: None,
        stream_version: None,
        event_type: None,
        data: None,
        metadata: None,
        recorded_at: None,
        state_schema: None,
        settle_ms: None,
    };
    let conditions = raw.conditions();
    let (sqlite, postgres) = validate_source(raw)?;
    Ok((sqlite, postgres, conditions))
}

/// The `[source]` section of config `text`, as TOML (to repeat it in a
/// generated config), or `None` when there is none or the text is not TOML.
#[must_use]
pub fn source_section(text: &str) -> Option<String> {
    let value: toml::Table = toml::from_str(text).ok()?;
    let source = value.get("source")?.as_table()?;
    let mut section = toml::Table::new();
    section.insert("source".into(), toml::Value::Table(source.clone()));
    toml::to_string(&section).ok()
}

impl RawSource {
    /// The mapping for one store kind: the preset's (or our own layout's)
    /// columns, overridden by the keys given.
    fn mapping(&self, postgres: bool) -> Result<EventTableMapping, String> {
        let base = match self.preset.as_deref() {
            None => EventTableMapping::default(),
            Some("eventsourcing") => EventTableMapping::new("stored_events")
                .sequence(if postgres { "notification_id" } else { "rowid" })
                .stream_id("originator_id")
                .stream_version("originator_version")
                .event_type("topic")
                .data("state")
                .metadata(None)
                .recorded_at(None),
            Some("emmett") => EventTableMapping::new("emt_messages")
                .sequence("global_position")
                .stream_version("stream_position")
                .event_type("message_type")
                .data("message_data")
                .metadata(Some("message_metadata"))
                .recorded_at(Some("created")),
            Some("marten") => EventTableMapping::new("mt_events")
                .sequence("seq_id")
                .stream_version("version")
                .event_type("type")
                .metadata(None)
                .recorded_at(Some("timestamp")),
            Some(other) => {
                return Err(format!(
                    "unknown preset {other:?}; known: {}",
                    PRESETS.join(", ")
                ));
            }
        };
        let preset = self.preset.is_some();
        let mut mapping = base.clone();
        let given = |key: &Option<String>, base: &String| key.clone().unwrap_or(base.clone());
        mapping.table = given(&self.table, &base.table);
        mapping.sequence = given(&self.sequence, &base.sequence);
        mapping.stream_id = given(&self.stream_id, &base.stream_id);
        mapping.stream_version = given(&self.stream_version, &base.stream_version);
        mapping.event_type = given(&self.event_type, &base.event_type);
        mapping.data = given(&self.data, &base.data);
        // Without a preset, left out means the table has no such column.
        mapping.metadata = self
            .metadata
            .clone()
            .or(if preset { base.metadata } else { None });
        mapping.recorded_at =
            self.recorded_at
                .clone()
                .or(if preset { base.recorded_at } else { None });
        Ok(mapping)
    }
}

impl RawSource {
    /// The rows of a preset's table that are events.
    fn conditions(&self) -> Vec<RowCondition> {
        let is = |column: &str, value: ConditionValue| RowCondition {
            column: column.to_owned(),
            value,
        };
        match self.preset.as_deref() {
            Some("emmett") => vec![
                is("message_kind", ConditionValue::Text("E".into())),
                is("is_archived", ConditionValue::Bool(false)),
            ],
            Some("marten") => vec![is("is_archived", ConditionValue::Bool(false))],
            _ => Vec::new(),
        }
    }
}

/// `[source]` to its mappings for SQLite and for PostgreSQL; every name must
/// be a plain identifier.
fn validate_source(raw: RawSource) -> Result<(EventTableMapping, EventTableMapping), String> {
    let sqlite = raw.mapping(false)?;
    let postgres = raw.mapping(true)?;
    check_names(&postgres)?;
    check_names(&sqlite)?;
    Ok((sqlite, postgres))
}

fn check_names(mapping: &EventTableMapping) -> Result<(), String> {
    let names = [
        &mapping.table,
        &mapping.sequence,
        &mapping.stream_id,
        &mapping.stream_version,
        &mapping.event_type,
        &mapping.data,
    ];
    for name in names
        .into_iter()
        .chain(mapping.metadata.as_ref())
        .chain(mapping.recorded_at.as_ref())
    {
        plain_identifier(name).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn validate_projection(raw: RawProjection) -> Result<SqlProjection, Failure> {
    let place = format!("projection {:?}", raw.name);
    let name = ProjectionName::new(&raw.name).map_err(|e| (place.clone(), e.to_string()))?;
    if raw.schema.trim().is_empty() {
        return Err((place, "schema is empty".into()));
    }
    if raw.on.is_empty() {
        return Err((
            place,
            "handles no event type (add [projection.on.EventType])".into(),
        ));
    }
    // The scratch database looks like a projection file (the engine's tables
    // exist) and runs the schema inside a transaction under the same confinement
    // as at run time, so what would fail there fails here, before any replay.
    let scratch = Connection::open_in_memory().map_err(|e| (place.clone(), e.to_string()))?;
    scratch
        .execute_batch(SCRATCH_ENGINE_TABLES)
        .map_err(|e| (place.clone(), e.to_string()))?;
    let confinement = Confinement::default();
    confinement
        .install(&scratch)
        .map_err(|e| (place.clone(), e.to_string()))?;
    let enforced = confinement.enforce();
    scratch
        .execute_batch(&raw.schema)
        .map_err(|e| (format!("{place}, schema"), confinement.explain(&e)))?;
    let deferred_indexes = raw.deferred_indexes.unwrap_or_default();
    check_deferred_indexes(&scratch, &confinement, &deferred_indexes)
        .map_err(|message| (format!("{place}, deferred_indexes"), message))?;
    let mut on = BTreeMap::new();
    for (event_type, handler) in raw.on {
        let event_place = format!("{place}, event {}", escape_controls(&event_type));
        if event_type.is_empty()
            || !event_type
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c))
        {
            return Err((
                event_place,
                "event type may contain only ASCII letters, digits, '_', '.', ':' and '-'".into(),
            ));
        }
        let texts = match handler.sql {
            RawStatements::One(text) => vec![text],
            RawStatements::Many(texts) => texts,
        };
        if texts.is_empty() {
            return Err((event_place, "has no statement".into()));
        }
        let mut statements = Vec::with_capacity(texts.len());
        for (idx, text) in texts.into_iter().enumerate() {
            let statement_place = format!("{event_place}, statement {}", idx + 1);
            statements.push(
                prepare(&scratch, &confinement, text)
                    .map_err(|message| (statement_place, message))?,
            );
        }
        on.insert(event_type, statements);
    }
    drop(enforced);
    let on_error = on_error(raw.on_error.as_deref(), raw.max_dead_letters)
        .map_err(|message| (place.clone(), message))?;
    let hash = definition_hash(raw.version, &raw.schema, &on);
    Ok(SqlProjection {
        name,
        version: raw.version,
        schema: raw.schema,
        on,
        hash,
        deferred_indexes,
        on_error,
    })
}

/// `on_error` and `max_dead_letters` as written.
fn on_error(
    on_error: Option<&str>,
    max_dead_letters: Option<u32>,
) -> Result<projectionist::OnError, String> {
    use projectionist::limits::DEAD_LETTERS_MAX;
    match (on_error, max_dead_letters) {
        (None | Some("stop"), None) => Ok(projectionist::OnError::Stop),
        (None | Some("stop"), Some(_)) => Err(
            "max_dead_letters is set but on_error is not \"skip\": set on_error = \"skip\" or remove it"
                .into(),
        ),
        (Some("skip"), max) => {
            let max = max.unwrap_or(projectionist::limits::DEAD_LETTERS_MAX_DEFAULT);
            if max > DEAD_LETTERS_MAX {
                return Err(format!(
                    "max_dead_letters = {max} is above the maximum of {DEAD_LETTERS_MAX}"
                ));
            }
            Ok(projectionist::OnError::Skip {
                max_dead_letters: max,
            })
        }
        (Some(other), _) => Err(format!(
            "on_error = {other:?}: must be \"stop\" (the default) or \"skip\""
        )),
    }
}

/// The names of the indexes in `conn`'s main database.
fn index_names(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt =
        conn.prepare("SELECT name FROM sqlite_schema WHERE type = 'index' ORDER BY name")?;
    let names = stmt.query_map([], |r| r.get(0))?;
    names.collect()
}

/// `deferred_indexes` runs on the scratch database twice, as at the end of
/// two runs, with the authorizer allowing nothing but index creation: it
/// must be idempotent, and none of its indexes unique (a unique index decides
/// what the statements' conflicts do, so it must exist while they run).
fn check_deferred_indexes(
    scratch: &Connection,
    confinement: &Confinement,
    sql: &str,
) -> Result<(), String> {
    if sql.trim().is_empty() {
        return Ok(());
    }
    let before = index_names(scratch).map_err(|e| e.to_string())?;
    {
        let _only = confinement.enforce_indexes_only();
        for round in ["", " (run a second time: use CREATE INDEX IF NOT EXISTS)"] {
            scratch
                .execute_batch(sql)
                .map_err(|e| format!("{}{round}", confinement.explain(&e)))?;
        }
    }
    for name in index_names(scratch).map_err(|e| e.to_string())? {
        if before.contains(&name) {
            continue;
        }
        // SQLite keeps the statement with single spaces after its first two
        // keywords. (The index-list pragma is what the confinement refuses.)
        let text: String = scratch
            .query_row(
                "SELECT sql FROM sqlite_schema WHERE name = ?1",
                [&name],
                |r| r.get(0),
            )
            .map_err(|e| e.to_string())?;
        if text
            .get(..13)
            .is_some_and(|start| start.eq_ignore_ascii_case("CREATE UNIQUE"))
        {
            return Err(format!(
                "index {name} is UNIQUE: it decides what the statements' conflicts do, so it belongs in schema"
            ));
        }
    }
    Ok(())
}

/// The engine's own tables, as a projection file has them.
const SCRATCH_ENGINE_TABLES: &str = "
BEGIN;
CREATE TABLE _checkpoint (consumer_id TEXT PRIMARY KEY, sequence INTEGER NOT NULL);
CREATE TABLE _projectionist_definition (version INTEGER NOT NULL, hash TEXT NOT NULL);
";

/// Rewrites the parameters and prepares the statement against the schema.
fn prepare(
    scratch: &Connection,
    confinement: &Confinement,
    text: String,
) -> Result<Statement, String> {
    let quoted = escape(text.trim());
    let (sql, params) = rewrite(&text).map_err(|e| format!("{e} in {quoted}"))?;
    let stmt = scratch.prepare(&sql).map_err(|e| match &e {
        // SQLite points at a token of the rewritten statement (`?1` for
        // `:field`): say where it is in the statement as written.
        projectionist::rusqlite::Error::SqlInputError { msg, offset, .. } => {
            let offset = usize::try_from(*offset).unwrap_or(0);
            format!(
                "{msg} at {} of {quoted}",
                position_as_written(&text, &sql, offset)
            )
        }
        _ => format!("{} in {quoted}", confinement.explain(&e)),
    })?;
    // Anything left over would run unchecked, or not at all.
    if stmt.parameter_count() != params.len() {
        return Err(format!("unexpected parameters in {quoted}"));
    }
    if stmt.readonly() {
        return Err(format!("statement changes nothing (a SELECT?): {quoted}"));
    }
    drop(stmt);
    if vacuums(scratch, &sql).map_err(|e| format!("{e} in {quoted}"))? {
        return Err(format!(
            "VACUUM is not allowed: projection SQL may only change its own tables, in {quoted}"
        ));
    }
    Ok(Statement { text, sql, params })
}

/// Where byte `offset` of `sql` (the statement rewritten with `?N`
/// placeholders) is in `text` (the statement as written), as "line L, column
/// C". Both are walked together: they differ only where a `:name` parameter
/// (with its `!type` or `?type` marker) became `?N`.
fn position_as_written(text: &str, sql: &str, offset: usize) -> String {
    let (text_bytes, sql_bytes) = (text.as_bytes(), sql.as_bytes());
    let (mut i, mut j) = (0, 0);
    while j < offset.min(sql_bytes.len()) && i < text_bytes.len() {
        if text_bytes[i] == sql_bytes[j] {
            i += 1;
            j += 1;
        } else if sql_bytes[j] == b'?' && text_bytes[i] == b':' {
            j += 1;
            while j < sql_bytes.len() && sql_bytes[j].is_ascii_digit() {
                j += 1;
            }
            i += 1;
            while i < text_bytes.len()
                && (text_bytes[i].is_ascii_alphanumeric() || b"_.!?".contains(&text_bytes[i]))
            {
                i += 1;
            }
        } else {
            break;
        }
    }
    let mut i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    let before = &text[..i];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}")
}

/// Text from the config, quoted with control characters escaped, for messages.
pub(crate) fn escape(text: &str) -> String {
    format!("{text:?}")
}

/// A name from the config as is, unless it holds control characters, which
/// would garble a terminal: then quoted and escaped.
pub(crate) fn escape_controls(text: &str) -> String {
    if text.chars().any(char::is_control) {
        escape(text)
    } else {
        text.to_owned()
    }
}

fn definition_hash(version: u32, schema: &str, on: &BTreeMap<String, Vec<Statement>>) -> String {
    let mut hasher = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    field(&version.to_le_bytes());
    field(schema.as_bytes());
    for (event_type, statements) in on {
        field(event_type.as_bytes());
        for statement in statements {
            field(statement.text.as_bytes());
        }
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD_SCHEMA: &str = "schema = \"CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER)\"";

    /// A statement that SQLite refuses at a token is reported at the line and
    /// column of the statement as written, with its `:field` parameters, not
    /// as the rewritten `?N` text with a byte offset.
    #[test]
    fn a_refused_statement_is_shown_as_written_with_line_and_column() {
        let text = format!(
            "[[projection]]\nname = \"p\"\nversion = 1\n{GOOD_SCHEMA}\n[projection.on.E]\nsql = \"\"\"INSERT INTO t (id, n)\n  VALUES (:id!text, :n!int) ON CONFLICT DO UPDAT SET n = 1\"\"\"\n"
        );
        let err = ProjectionsConfig::parse(&text, "test.toml")
            .expect_err("a syntax error")
            .to_string();
        assert!(err.contains("line 2, column 44"), "{err}");
        assert!(err.contains(":n!int"), "{err}");
        assert!(!err.contains("?2"), "{err}");
        assert!(!err.contains("offset"), "{err}");
        assert_eq!(position_as_written(":a, x", "?1, x", 4), "line 1, column 5");
        assert_eq!(
            position_as_written("a\nb :c!int d", "a\nb ?1 d", 7),
            "line 2, column 10"
        );
    }

    /// Bad configs, each with a piece of the message it must give (which names
    /// the place).
    #[test]
    fn bad_configs_are_refused_with_the_place_named() {
        let cases: Vec<(String, &str)> = vec![
        ("[[projection]\nname = ".into(), "TOML parse error"),
        (
            format!(
                "[[projection]]\nname = \"p\"\nversion = 1\n{GOOD_SCHEMA}\n[projection.on.E]\nsql = \"INSERT INTO t VALUES (:id, :n)\"\nextra = 1\n"
            ),
            "unknown field `extra`",
        ),
        (
            format!(
                "[[projection]]\nname = \"p\"\nversion = 1\n{GOOD_SCHEMA}\n[projection.on.E]\nsql = \"INSERT INTO t VALUE (:id)\"\n"
            ),
            "projection \"p\", event E, statement 1",
        ),
        (
            format!(
                "[[projection]]\nname = \"p\"\nversion = 1\n{GOOD_SCHEMA}\n[projection.on.E]\nsql = \"INSERT INTO t (id, nope) VALUES (:id, :n)\"\n"
            ),
            "no column named nope",
        ),
        (
            format!(
                "[[projection]]\nname = \"p\"\nversion = 1\n{GOOD_SCHEMA}\n[projection.on.E]\nsql = \"INSERT INTO missing VALUES (:id)\"\n"
            ),
            "no such table: missing",
        ),
        (
            format!(
                "[[projection]]\nname = \"p\"\nversion = 1\n{GOOD_SCHEMA}\n[projection.on.E]\nsql = \"INSERT INTO t VALUES (:id, 1)\"\n[[projection]]\nname = \"p\"\nversion = 1\n{GOOD_SCHEMA}\n[projection.on.E]\nsql = \"INSERT INTO t VALUES (:id, 1)\"\n"
            ),
            "is declared twice",
        ),
        (
            format!(
                "[[projection]]\nname = \"../evil\"\nversion = 1\n{GOOD_SCHEMA}\n[projection.on.E]\nsql = \"INSERT INTO t VALUES (:id, 1)\"\n"
            ),
            "invalid projection name \"../evil\"",
        ),
        (
            "[[projection]]\nname = \"p\"\nversion = 1\n[projection.on.E]\nsql = \"SELECT 1\"\n"
                .into(),
            "missing field `schema`",
        ),
        (
            format!(
                "[[projection]]\nname = \"p\"\nversion = 1\n{GOOD_SCHEMA}\n[projection.on.E]\nsql = \"INSERT INTO t VALUES (:_seq, 1)\"\n"
            ),
            "unknown envelope parameter :_seq",
        ),
        (
            format!(
                "[[projection]]\nname = \"p\"\nversion = 1\n{GOOD_SCHEMA}\n[projection.on.E]\nsql = \"INSERT INTO t VALUES (?, 1)\"\n"
            ),
            "only :name parameters are supported",
        ),
        (
            format!(
                "[[projection]]\nname = \"p\"\nversion = 1\n{GOOD_SCHEMA}\n[projection.on.E]\nsql = \"INSERT INTO t VALUES (:id, 1); DROP TABLE t\"\n"
            ),
            "projection \"p\", event E, statement 1",
        ),
        (
            format!(
                "[[projection]]\nname = \"p\"\nversion = 1\n{GOOD_SCHEMA}\n[projection.on.\"E; DROP TABLE t\"]\nsql = \"INSERT INTO t VALUES (:id, 1)\"\n"
            ),
            "event type may contain only",
        ),
        (
            "[[projection]]\nname = \"p\"\nversion = 1\nschema = \"CREATE TABLE _checkpoint (x)\"\n[projection.on.E]\nsql = \"INSERT INTO _checkpoint VALUES (:id)\"\n".to_string(),
            "reserved for projectionist",
        ),
        (
            format!(
                "[[projection]]\nname = \"p\"\nversion = 1\n{GOOD_SCHEMA}\n[projection.on.E]\nsql = \"SELECT * FROM t WHERE id = :id\"\n"
            ),
            "changes nothing",
        ),
        (
            format!(
                "[[projection]]\nname = \"p\"\nversion = 1\n{GOOD_SCHEMA}\ndeferred_indexes = \"CREATE INDEX t_n ON t (n)\"\n[projection.on.E]\nsql = \"INSERT INTO t VALUES (:id, 1)\"\n"
            ),
            "projection \"p\", deferred_indexes: index t_n already exists (run a second time: use CREATE INDEX IF NOT EXISTS)",
        ),
        (
            format!(
                "[[projection]]\nname = \"p\"\nversion = 1\n{GOOD_SCHEMA}\ndeferred_indexes = \"CREATE UNIQUE INDEX IF NOT EXISTS t_n ON t (n)\"\n[projection.on.E]\nsql = \"INSERT INTO t VALUES (:id, 1)\"\n"
            ),
            "index t_n is UNIQUE",
        ),
        (
            format!(
                "[[projection]]\nname = \"p\"\nversion = 1\n{GOOD_SCHEMA}\ndeferred_indexes = \"CREATE TABLE IF NOT EXISTS u (x)\"\n[projection.on.E]\nsql = \"INSERT INTO t VALUES (:id, 1)\"\n"
            ),
            "creating table u is not allowed: deferred_indexes may only create indexes",
        ),
        (
            format!(
                "[[projection]]\nname = \"p\"\nversion = 1\n{GOOD_SCHEMA}\ndeferred_indexes = \"CREATE INDEX IF NOT EXISTS t_n ON t (n); DELETE FROM t\"\n[projection.on.E]\nsql = \"INSERT INTO t VALUES (:id, 1)\"\n"
            ),
            "deleting from table t is not allowed: deferred_indexes may only create indexes",
        ),
        (
            format!(
                "[[projection]]\nname = \"p\"\nversion = 1\n{GOOD_SCHEMA}\ndeferred_indexes = \"CREATE INDEX IF NOT EXISTS t_n ON t (n); UPDATE t SET n = 0\"\n[projection.on.E]\nsql = \"INSERT INTO t VALUES (:id, 1)\"\n"
            ),
            "updating table t is not allowed",
        ),
        (
            format!(
                "[[projection]]\nname = \"p\"\nversion = 1\n{GOOD_SCHEMA}\ndeferred_indexes = \"DROP TABLE t\"\n[projection.on.E]\nsql = \"INSERT INTO t VALUES (:id, 1)\"\n"
            ),
            "deferred_indexes may only create indexes",
        ),
        (
            format!(
                "[[projection]]\nname = \"p\"\nversion = 1\n{GOOD_SCHEMA}\ndeferred_indexes = \"CREATE INDEX IF NOT EXISTS t_n ON t (n)\"\n[projection.on.E]\nsql = \"INSERT INTO _checkpoint VALUES (:id, 1)\"\n"
            ),
            "writing to table _checkpoint (reserved for projectionist) is not allowed",
        ),
        (
            format!(
                "[[projection]]\nname = \"p\"\nversion = 1\n{GOOD_SCHEMA}\ndeferred_indexes = \"CREATE INDEX IF NOT EXISTS t_x ON t (nope)\"\n[projection.on.E]\nsql = \"INSERT INTO t VALUES (:id, 1)\"\n"
            ),
            "deferred_indexes: no such column: nope",
        ),
        ("".into(), "declares no [[projection]]"),
        (
            format!("[[projection]]\nname = \"p\"\nversion = -1\n{GOOD_SCHEMA}\n"),
            "version",
        ),
    ];
        for (text, expected) in cases {
            let err = ProjectionsConfig::parse(&text, "projections.toml")
                .expect_err(&text)
                .to_string();
            assert!(
                err.contains(expected),
                "expected {expected:?} for\n{text}\ngot: {err}"
            );
            assert!(err.contains("projections.toml"), "the file is named: {err}");
        }
    }

    #[test]
    fn the_demo_config_loads() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/orders/projections.toml");
        let config = ProjectionsConfig::load(&path).unwrap();
        let names: Vec<&str> = config.projections.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["order_summary", "customer_stats"]);
        assert_eq!(config.projections[0].event_types().len(), 5);
    }
}
