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

/// What one placeholder is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Param {
    /// A field of the event's JSON data, by path. Absent (or null) binds NULL,
    /// unless `required`, when it is a poison-event error.
    Field {
        /// Path segments: object keys, or array indexes.
        path: Vec<String>,
        /// Marked with `!`.
        required: bool,
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
            let required = chars.get(end) == Some(&'!');
            let param = parse_param(&name, required)?;
            let key = format!("{name}{}", if required { "!" } else { "" });
            let number = match names.iter().position(|n| *n == key) {
                Some(p) => p + 1,
                None => {
                    names.push(key);
                    params.push(param);
                    params.len()
                }
            };
            out.push_str(&format!("?{number}"));
            idx = end + usize::from(required);
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

fn parse_param(name: &str, required: bool) -> Result<Param, String> {
    if name.starts_with('_') {
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
    Ok(Param::Field { path, required })
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
            r#"INSERT INTO t VALUES (?1, ?2, ?1) [Field { path: ["a"], required: false }, Field { path: ["b", "c"], required: true }]"#,
        );
        check(
            "SELECT ':x', \":y\", [:z] -- :w\n/* :v */ , :_sequence",
            "SELECT ':x', \":y\", [:z] -- :w\n/* :v */ , ?1 [Envelope(Sequence)]",
        );
        check(
            "SELECT :items.0.sku",
            r#"SELECT ?1 [Field { path: ["items", "0", "sku"], required: false }]"#,
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
