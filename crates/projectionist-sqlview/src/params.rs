//! Statement parameters: finding `:name` parameters in SQL text (outside string
//! literals, quoted identifiers and comments) and rewriting them to numbered
//! `?N` placeholders.

/// An envelope field, bound by a reserved parameter name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Envelope {
    /// `:_sequence`, the global sequence (integer).
    Sequence,
    /// `:_stream_id` (text).
    StreamId,
    /// `:_stream_version` (integer).
    StreamVersion,
    /// `:_event_type` (text).
    EventType,
    /// `:_recorded_at` (text).
    RecordedAt,
    /// `:_metadata` (JSON text or NULL).
    Metadata,
}

const ENVELOPE: [(&str, Envelope); 6] = [
    ("_sequence", Envelope::Sequence),
    ("_stream_id", Envelope::StreamId),
    ("_stream_version", Envelope::StreamVersion),
    ("_event_type", Envelope::EventType),
    ("_recorded_at", Envelope::RecordedAt),
    ("_metadata", Envelope::Metadata),
];

/// The JSON type a typed parameter demands (`:qty!int`, `:note?text`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueKind {
    /// `int`: a JSON integer (bound as INTEGER).
    Int,
    /// `real`: any JSON number (bound as REAL).
    Real,
    /// `text`: a JSON string (bound as TEXT).
    Text,
    /// `bool`: `true` or `false` (bound as 1 or 0).
    Bool,
    /// `json`: an object or an array (bound as its JSON text).
    Json,
}

impl ValueKind {
    const ALL: [(&'static str, ValueKind); 5] = [
        ("int", ValueKind::Int),
        ("real", ValueKind::Real),
        ("text", ValueKind::Text),
        ("bool", ValueKind::Bool),
        ("json", ValueKind::Json),
    ];

    /// The name used in the config.
    #[must_use]
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, kind)| *kind == self)
            .map_or("?", |(name, _)| name)
    }
}

/// What one placeholder is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Param {
    /// A field of the event's JSON data, by path. Absent (or null) binds NULL,
    /// unless `required`, when it is a poison-event error. With a `kind`, a value
    /// of another JSON type is a poison event too.
    Field {
        /// Path segments: object keys, or array indexes.
        path: Vec<String>,
        /// Marked with `!`.
        required: bool,
        /// The JSON type after the marker (`!int`, `?text`); `None` for plain
        /// `:field` and `:field!`, which bind whatever the value is.
        kind: Option<ValueKind>,
    },
    /// An envelope field.
    Envelope(Envelope),
}

/// Rewrites `:name` parameters to `?1`, `?2`, ... (one number per distinct
/// parameter) and returns the rewritten SQL with the parameters in number order.
///
/// # Errors
/// A message naming the offending parameter: an unknown envelope field, a
/// malformed path, or a `?`/`$`/`@` placeholder (only `:name` is supported).
pub(crate) fn rewrite(sql: &str) -> Result<(String, Vec<Param>), String> {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = String::with_capacity(sql.len());
    let mut names: Vec<String> = Vec::new();
    let mut params: Vec<Param> = Vec::new();
    let mut idx = 0;
    while idx < chars.len() {
        let c = chars[idx];
        let quoted_end = match c {
            '\'' | '"' | '`' => Some(c),
            '[' => Some(']'),
            _ => None,
        };
        if let Some(end) = quoted_end {
            let close = chars[idx + 1..]
                .iter()
                .position(|&x| x == end)
                .map_or(chars.len(), |p| idx + 1 + p);
            out.extend(&chars[idx..(close + 1).min(chars.len())]);
            idx = close + 1;
        } else if c == '-' && chars.get(idx + 1) == Some(&'-') {
            let close = chars[idx..]
                .iter()
                .position(|&x| x == '\n')
                .map_or(chars.len(), |p| idx + p);
            out.extend(&chars[idx..close]);
            idx = close;
        } else if c == '/' && chars.get(idx + 1) == Some(&'*') {
            let close = (idx + 2..chars.len().saturating_sub(1))
                .find(|&p| chars[p] == '*' && chars[p + 1] == '/')
                .map_or(chars.len(), |p| p + 2);
            out.extend(&chars[idx..close]);
            idx = close;
        } else if c == ':'
            && chars
                .get(idx + 1)
                .is_some_and(|n| n.is_ascii_alphabetic() || *n == '_')
        {
            let start = idx + 1;
            let mut end = start;
            while end < chars.len()
                && (chars[end].is_ascii_alphanumeric() || chars[end] == '_' || chars[end] == '.')
            {
                end += 1;
            }
            let name: String = chars[start..end].iter().collect();
            // `!` (required) or `?` (optional), then an optional type word.
            let marker = chars.get(end).copied().filter(|c| matches!(c, '!' | '?'));
            let required = marker == Some('!');
            let type_start = end + usize::from(marker.is_some());
            let mut type_end = type_start;
            if marker.is_some() {
                while type_end < chars.len() && chars[type_end].is_ascii_alphabetic() {
                    type_end += 1;
                }
            }
            let type_word: String = chars[type_start..type_end].iter().collect();
            let kind = parse_kind(&name, marker, &type_word)?;
            let param = parse_param(&name, required, kind)?;
            let key: String = chars[start..type_end].iter().collect();
            let number = match names.iter().position(|n| *n == key) {
                Some(p) => p + 1,
                None => {
                    names.push(key);
                    params.push(param);
                    params.len()
                }
            };
            out.push_str(&format!("?{number}"));
            idx = type_end;
        } else if matches!(c, '?' | '$' | '@') {
            return Err(format!(
                "placeholder '{c}' at character {idx}: only :name parameters are supported"
            ));
        } else if c == ':' {
            return Err(format!(
                "':' at character {idx} does not start a :name parameter"
            ));
        } else {
            out.push(c);
            idx += 1;
        }
    }
    Ok((out, params))
}

/// The type after a `!` or `?` marker.
fn parse_kind(name: &str, marker: Option<char>, word: &str) -> Result<Option<ValueKind>, String> {
    let known = || {
        ValueKind::ALL
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (marker, word) {
        (None, _) | (Some('!'), "") => Ok(None),
        (Some(marker), "") => Err(format!(
            "parameter :{name}{marker} needs a type ({}), e.g. :{name}?text",
            known()
        )),
        (Some(marker), word) => ValueKind::ALL
            .iter()
            .find(|(n, _)| *n == word)
            .map(|(_, kind)| Some(*kind))
            .ok_or_else(|| {
                format!(
                    "unknown type {word:?} in :{name}{marker}{word} (known: {})",
                    known()
                )
            }),
    }
}

fn parse_param(name: &str, required: bool, kind: Option<ValueKind>) -> Result<Param, String> {
    if name.starts_with('_') {
        if kind.is_some() {
            return Err(format!(
                "envelope parameter :{name} takes no type: its type is fixed"
            ));
        }
        return ENVELOPE
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, e)| Param::Envelope(*e))
            .ok_or_else(|| {
                let known: Vec<&str> = ENVELOPE.iter().map(|(n, _)| *n).collect();
                format!(
                    "unknown envelope parameter :{name} (known: :{})",
                    known.join(", :")
                )
            });
    }
    let path: Vec<String> = name.split('.').map(str::to_owned).collect();
    if path.iter().any(String::is_empty) {
        return Err(format!("parameter :{name} has an empty path segment"));
    }
    Ok(Param::Field {
        path,
        required,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(sql: &str, expect: &str) {
        let got = match rewrite(sql) {
            Ok((text, params)) => format!("{text} {params:?}"),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(got, expect, "{sql}");
    }

    #[test]
    fn rewrites_names_and_skips_quotes_and_comments() {
        check(
            "INSERT INTO t VALUES (:a, :b.c!, :a)",
            r#"INSERT INTO t VALUES (?1, ?2, ?1) [Field { path: ["a"], required: false, kind: None }, Field { path: ["b", "c"], required: true, kind: None }]"#,
        );
        check(
            "SELECT ':x', \":y\", [:z] -- :w\n/* :v */ , :_sequence",
            "SELECT ':x', \":y\", [:z] -- :w\n/* :v */ , ?1 [Envelope(Sequence)]",
        );
        check(
            "SELECT :items.0.sku",
            r#"SELECT ?1 [Field { path: ["items", "0", "sku"], required: false, kind: None }]"#,
        );
    }

    #[test]
    fn typed_parameters() {
        check(
            "VALUES (:qty!int, :price!real * :qty!int, :note?text, :qty, :doc!json, :f?bool)",
            r#"VALUES (?1, ?2 * ?1, ?3, ?4, ?5, ?6) [Field { path: ["qty"], required: true, kind: Some(Int) }, Field { path: ["price"], required: true, kind: Some(Real) }, Field { path: ["note"], required: false, kind: Some(Text) }, Field { path: ["qty"], required: false, kind: None }, Field { path: ["doc"], required: true, kind: Some(Json) }, Field { path: ["f"], required: false, kind: Some(Bool) }]"#,
        );
        check(
            "VALUES (:qty!integer)",
            r#"error: unknown type "integer" in :qty!integer (known: int, real, text, bool, json)"#,
        );
        check(
            "VALUES (:note?)",
            "error: parameter :note? needs a type (int, real, text, bool, json), e.g. :note?text",
        );
        check(
            "VALUES (:_sequence!int)",
            "error: envelope parameter :_sequence takes no type: its type is fixed",
        );
    }

    #[test]
    fn rejects_foreign_placeholders_and_unknown_envelope() {
        check(
            "SELECT ?",
            "error: placeholder '?' at character 7: only :name parameters are supported",
        );
        check(
            "SELECT $x",
            "error: placeholder '$' at character 7: only :name parameters are supported",
        );
        check(
            "SELECT :_seq",
            "error: unknown envelope parameter :_seq (known: :_sequence, :_stream_id, :_stream_version, :_event_type, :_recorded_at, :_metadata)",
        );
        check(
            "SELECT :a..b",
            "error: parameter :a..b has an empty path segment",
        );
    }
}
