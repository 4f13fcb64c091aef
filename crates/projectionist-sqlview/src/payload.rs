//! Payloads kept as JSON text (`Box<RawValue>`): the values a statement binds
//! are found and decoded without building a tree of the whole payload.
//!
//! The text was validated when the event was read, so these scans only fail
//! on what decoding a tree would also have refused.

use std::borrow::Cow;
use std::fmt;

use serde::Deserializer as _;
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

/// A JSON string, borrowed from the payload when it holds no escapes.
struct Text<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Text<'de> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Strings;
        impl<'de> Visitor<'de> for Strings {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(Strings)
    }
}

/// The first byte of a JSON value's text, past any whitespace.
fn first_byte(text: &str) -> Option<u8> {
    let text = text.as_bytes();
    text.get(skip_space(text, 0)).copied()
}

fn invalid(e: &serde_json::Error) -> String {
    format!("invalid JSON: {e}")
}

/// What a payload holds at one step of a field's path.
pub(crate) enum Child<'e> {
    /// The member's JSON text (validated).
    Found(&'e str),
    /// Not there; `indexable` when the holder is an object (or an array and
    /// the step a number), so the field is merely absent.
    Missing { indexable: bool },
}

impl<'e> Child<'e> {
    /// The member `segment` of `holder`, validated JSON text (an object's
    /// key, an array's index).
    pub(crate) fn of(holder: &'e str, segment: &str) -> Result<Self, String> {
        let mut deserializer = serde_json::Deserializer::from_str(holder);
        match (first_byte(holder), segment.parse::<usize>()) {
            (Some(b'{'), _) => deserializer
                .deserialize_map(FindKey(segment))
                .map_err(|e| invalid(&e)),
            (Some(b'['), Ok(index)) => deserializer
                .deserialize_seq(FindIndex(index))
                .map_err(|e| invalid(&e)),
            _ => Ok(Child::Missing { indexable: false }),
        }
    }
}

/// Finds a key in an object; the last of duplicate keys wins, as when the
/// payload is decoded into a tree.
struct FindKey<'s>(&'s str);

impl<'de> Visitor<'de> for FindKey<'_> {
    type Value = Child<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Child<'de>, A::Error> {
        let mut found = None;
        while let Some(Text(key)) = map.next_key()? {
            if key == self.0 {
                found = Some(map.next_value::<&'de RawValue>()?.get());
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found.map_or(Child::Missing { indexable: true }, Child::Found))
    }
}

/// Finds an element of an array by its index.
struct FindIndex(usize);

impl<'de> Visitor<'de> for FindIndex {
    type Value = Child<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Child<'de>, A::Error> {
        let mut found = None;
        let mut index = 0;
        loop {
            if index == self.0 {
                match seq.next_element::<&'de RawValue>()? {
                    Some(value) => found = Some(value.get()),
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            index += 1;
        }
        Ok(found.map_or(Child::Missing { indexable: true }, Child::Found))
    }
}

/// The top-level members of one event's payload, scanned once for all its
/// statements: keys and values borrowed, the buffer reused across a batch.
#[derive(Default)]
pub(crate) struct RawObject<'e> {
    entries: Vec<(Cow<'e, str>, &'e str)>,
    is_object: bool,
}

impl<'e> RawObject<'e> {
    /// Scans `data`, the payload whose fields are bound next.
    pub(crate) fn scan(&mut self, data: &'e str) -> Result<(), String> {
        self.entries.clear();
        self.is_object = first_byte(data) == Some(b'{');
        if self.is_object {
            serde_json::Deserializer::from_str(data)
                .deserialize_map(Entries(&mut self.entries))
                .map_err(|e| invalid(&e))?;
        }
        Ok(())
    }

    /// The member `segment` of `data`, the payload last scanned.
    pub(crate) fn child(&self, data: &'e str, segment: &str) -> Result<Child<'e>, String> {
        if !self.is_object {
            return Child::of(data, segment);
        }
        Ok(self
            .entries
            .iter()
            .rev()
            .find(|(key, _)| key == segment)
            .map_or(Child::Missing { indexable: true }, |(_, value)| {
                Child::Found(value)
            }))
    }
}

struct Entries<'b, 'e>(&'b mut Vec<(Cow<'e, str>, &'e str)>);

impl<'de> Visitor<'de> for Entries<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(Text(key)) = map.next_key()? {
            let value: &'de RawValue = map.next_value()?;
            self.0.push((key, value.get()));
        }
        Ok(())
    }
}

/// A payload kept as its JSON text, with the members of its top-level object
/// found once, when the event is decoded (by the reader, for every projection
/// of a run): a projection binds a statement's fields by looking them up,
/// without scanning the text again. What the command line reads events into.
///
/// It decodes from any JSON value. Payloads that are not objects, and the
/// rare object with an escape in a key, keep no index: their fields are found
/// by decoding the text when bound, as for [`RawValue`] payloads.
///
/// ```
/// use projectionist_sqlview::IndexedPayload;
///
/// let payload: IndexedPayload = serde_json::from_str(r#"{"qty": 2, "sku": "a-1"}"#)?;
/// assert_eq!(payload.get(), r#"{"qty": 2, "sku": "a-1"}"#);
/// assert_eq!(payload.member("sku"), Some(r#""a-1""#));
/// assert_eq!(payload.member("price"), None);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct IndexedPayload {
    raw: Box<RawValue>,
    /// The top-level members in text order, when the payload is an object
    /// the byte scan indexes (exactly as long as the object: 16 bytes a
    /// member, whatever the batch size).
    members: Option<Box<[Member]>>,
}

/// One member of an indexed object: byte offsets of its key (between the
/// quotes, without escapes) and of its value's text.
#[derive(Clone, Copy, Debug)]
struct Member {
    key: (u32, u32),
    value: (u32, u32),
}

impl Member {
    fn key<'t>(&self, text: &'t str) -> Option<&'t [u8]> {
        text.as_bytes()
            .get(self.key.0 as usize..self.key.1 as usize)
    }

    fn value<'t>(&self, text: &'t str) -> Option<&'t str> {
        text.get(self.value.0 as usize..self.value.1 as usize)
    }
}

impl IndexedPayload {
    /// Indexes `raw`'s top-level members.
    #[must_use]
    pub fn new(raw: Box<RawValue>) -> Self {
        let members = index_object(raw.get().as_bytes());
        IndexedPayload { raw, members }
    }

    /// The payload's JSON text.
    #[must_use]
    pub fn get(&self) -> &str {
        self.raw.get()
    }

    /// The payload as a [`RawValue`].
    #[must_use]
    pub fn raw(&self) -> &RawValue {
        &self.raw
    }

    /// The JSON text of the top-level member `key` (the last one, when a key
    /// repeats, as when decoded into a tree); `None` when the payload is not
    /// an object or has no such member.
    #[must_use]
    pub fn member(&self, key: &str) -> Option<&str> {
        match self.child(key) {
            Ok(Child::Found(text)) => Some(text),
            _ => None,
        }
    }

    /// The member `segment` of the payload (an index into an array payload).
    pub(crate) fn child(&self, segment: &str) -> Result<Child<'_>, String> {
        let text = self.raw.get();
        let Some(members) = &self.members else {
            return Child::of(text, segment);
        };
        let found = members
            .iter()
            .rev()
            .find(|member| member.key(text) == Some(segment.as_bytes()));
        Ok(match found.and_then(|member| member.value(text)) {
            Some(value) => Child::Found(value),
            None => Child::Missing { indexable: true },
        })
    }
}

impl<'de> serde::Deserialize<'de> for IndexedPayload {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(deserializer).map(IndexedPayload::new)
    }
}

impl serde::Serialize for IndexedPayload {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(serializer)
    }
}

impl PartialEq for IndexedPayload {
    /// Equal when the texts are.
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

/// Room for the members of the objects a thread indexes, reused: each index
/// is then allocated once, at its exact length.
const INDEX_SCRATCH_START: usize = 16;

thread_local! {
    static INDEX_SCRATCH: std::cell::RefCell<Vec<Member>> =
        std::cell::RefCell::new(Vec::with_capacity(INDEX_SCRATCH_START));
}

/// The members of `text`, a validated JSON object (leading whitespace
/// allowed), found by its bytes; `None` for anything else, for an object with
/// an escape in a key, and should the scan meet what valid JSON cannot hold.
fn index_object(text: &[u8]) -> Option<Box<[Member]>> {
    let mut at = skip_space(text, 0);
    if text.get(at) != Some(&b'{') {
        return None;
    }
    let offset = |at: usize| u32::try_from(at).ok();
    INDEX_SCRATCH.with_borrow_mut(|members| {
        members.clear();
        at = skip_space(text, at + 1);
        if text.get(at) == Some(&b'}') {
            return Some(Box::default());
        }
        loop {
            if text.get(at) != Some(&b'"') {
                return None;
            }
            let (end, escaped) = string_end(text, at)?;
            if escaped {
                return None;
            }
            let key = (offset(at + 1)?, offset(end - 1)?);
            at = skip_space(text, end);
            if text.get(at) != Some(&b':') {
                return None;
            }
            let start = skip_space(text, at + 1);
            let end = value_end(text, start)?;
            members.push(Member {
                key,
                value: (offset(start)?, offset(end)?),
            });
            at = skip_space(text, end);
            match text.get(at) {
                Some(b',') => at = skip_space(text, at + 1),
                Some(b'}') => return Some(members.as_slice().into()),
                _ => return None,
            }
        }
    })
}

/// The first byte at or after `at` that is not JSON whitespace.
fn skip_space(text: &[u8], mut at: usize) -> usize {
    while matches!(text.get(at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        at += 1;
    }
    at
}

/// Just past the string that opens at `at` (a quote), and whether it holds
/// escapes.
fn string_end(text: &[u8], at: usize) -> Option<(usize, bool)> {
    let mut escaped = false;
    let mut i = at + 1;
    loop {
        match text.get(i)? {
            b'"' => return Some((i + 1, escaped)),
            b'\\' => {
                escaped = true;
                i += 2;
            }
            _ => i += 1,
        }
    }
}

/// Just past the value that starts at `at`.
fn value_end(text: &[u8], at: usize) -> Option<usize> {
    match text.get(at)? {
        b'"' => string_end(text, at).map(|(end, _)| end),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = at;
            loop {
                match text.get(i)? {
                    b'"' => {
                        i = string_end(text, i)?.0;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        // A number, `true`, `false` or `null`: up to what ends a value.
        _ => {
            let mut i = at;
            while !matches!(
                text.get(i),
                None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            ) {
                i += 1;
            }
            (i > at).then_some(i)
        }
    }
}

/// A field's value: a string (borrowed when it can be), or anything else
/// decoded on its own.
pub(crate) enum Leaf<'e> {
    Text(Cow<'e, str>),
    Other(Value),
}

/// Decodes the value a field binds (validated JSON text).
pub(crate) fn decode_leaf(raw: &str) -> Result<Leaf<'_>, String> {
    if first_byte(raw) == Some(b'"') {
        // Validated JSON: a string without a backslash is its own text
        // between the quotes.
        if let Some(inner) = raw.strip_prefix('"').and_then(|s| s.strip_suffix('"'))
            && !inner.contains('\\')
        {
            return Ok(Leaf::Text(Cow::Borrowed(inner)));
        }
        let Text(text) = serde_json::from_str(raw).map_err(|e| invalid(&e))?;
        return Ok(Leaf::Text(text));
    }
    // The common case, a plain integer, without a decoder; what this does
    // not take (fractions, exponents, huge numbers) is decoded as JSON is.
    // `-0` is no integer to serde_json (it is the real -0.0).
    if let Ok(integer) = raw.parse::<i64>()
        && raw != "-0"
    {
        return Ok(Leaf::Other(Value::from(integer)));
    }
    serde_json::from_str(raw)
        .map(Leaf::Other)
        .map_err(|e| invalid(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The members as (key, value text), as the byte scan found them.
    fn by_bytes(text: &str) -> Option<Vec<(String, String)>> {
        let members = index_object(text.as_bytes())?;
        Some(
            members
                .iter()
                .map(|m| {
                    let key = String::from_utf8(m.key(text).unwrap().to_vec()).unwrap();
                    (key, m.value(text).unwrap().to_owned())
                })
                .collect(),
        )
    }

    /// The members as (key, value text), as serde_json finds them.
    fn by_serde(text: &str) -> Vec<(String, String)> {
        let mut object = RawObject::default();
        object.scan(text).unwrap();
        object
            .entries
            .iter()
            .map(|(key, value)| (key.to_string(), (*value).to_owned()))
            .collect()
    }

    /// The byte scan finds exactly the members serde_json finds, in compact,
    /// spaced and pretty text, with strings that hold brackets, quotes,
    /// backslashes and non-ASCII text, nesting and repeated keys.
    #[test]
    fn the_byte_scan_finds_what_serde_json_finds() {
        let objects = [
            r#"{}"#,
            r#"{"a":1}"#,
            r#"{"a": "x,}]", "b": [1, {"c": "}"}, []], "d": {"e": {"f": [[]]}}}"#,
            r#"{"q": "say \"hi\" {", "bs": "c:\\dir\\", "u": "\u00e9t\u00e9 ☃", "n": null}"#,
            r#"{"ké": true, "dup": 1, "dup": -2.5e-3, "": 0, "f": false}"#,
            r#"{"deep": [[[[{"a": [1, "]"]}]]]], "last": 18446744073709551615}"#,
            " {\t\"a\" :\r\n1 ,\"b\"\n:\t[ 1 , 2 ] ,\"c\" : { \"d\" : null } \n} ",
        ];
        for object in objects {
            let value: Value = serde_json::from_str(object).unwrap();
            let compact = serde_json::to_string(&value).unwrap();
            let pretty = serde_json::to_string_pretty(&value).unwrap();
            for text in [object.to_owned(), compact, pretty] {
                assert_eq!(by_bytes(&text), Some(by_serde(&text)), "{text}");
            }
        }
    }

    /// Random JSON text (keys and strings with escapes, brackets, commas and
    /// colons inside strings, nesting, repeated keys, any whitespace): the
    /// byte scan finds what serde_json finds, or keeps no index when a key
    /// holds an escape. Seeded: `PROJECTIONIST_SEED` replays a run.
    #[test]
    fn the_byte_scan_agrees_with_serde_json_on_random_objects() {
        const CASES: usize = 3_000;
        let seed = std::env::var("PROJECTIONIST_SEED").map_or_else(
            |_| fastrand::u64(..),
            |s| s.parse().expect("PROJECTIONIST_SEED is a number"),
        );
        eprintln!("seed {seed} (PROJECTIONIST_SEED replays it)");
        let mut rng = fastrand::Rng::with_seed(seed);
        for case in 0..CASES {
            let mut text = String::new();
            let escaped_key = random_object(&mut rng, &mut text, 0);
            let expected = serde_json::from_str::<Value>(&text)
                .map(|_| ())
                .map_err(|e| format!("seed {seed}, case {case}: generated {text:?}: {e}"));
            expected.unwrap();
            if escaped_key {
                assert_eq!(by_bytes(&text), None, "seed {seed}, case {case}: {text}");
            } else {
                assert_eq!(
                    by_bytes(&text),
                    Some(by_serde(&text)),
                    "seed {seed}, case {case}: {text}"
                );
            }
        }
    }

    fn space(rng: &mut fastrand::Rng, out: &mut String) {
        for _ in 0..rng.usize(0..3) {
            out.push([' ', '\t', '\n', '\r'][rng.usize(0..4)]);
        }
    }

    /// Writes a random JSON string; whether it holds an escape.
    fn random_string(rng: &mut fastrand::Rng, out: &mut String) -> bool {
        const PIECES: [&str; 14] = [
            "a", "key", "é", "☃", " ", "}", "]", ",", ":", "{", "[", "\\\"", "\\\\", "\\u00e9",
        ];
        let mut escaped = false;
        out.push('"');
        for _ in 0..rng.usize(0..4) {
            let piece = PIECES[rng.usize(0..PIECES.len())];
            escaped |= piece.starts_with('\\');
            out.push_str(piece);
        }
        out.push('"');
        escaped
    }

    fn random_value(rng: &mut fastrand::Rng, out: &mut String, depth: usize) {
        let kinds = if depth >= 4 { 6 } else { 8 };
        match rng.usize(0..kinds) {
            0 => out.push_str(["0", "-0", "12", "-3.5", "1e5", "2E-3"][rng.usize(0..6)]),
            1 => out.push_str(["true", "false"][rng.usize(0..2)]),
            2 => out.push_str("null"),
            3..=5 => {
                random_string(rng, out);
            }
            6 => {
                out.push('[');
                for i in 0..rng.usize(0..4) {
                    if i > 0 {
                        out.push(',');
                    }
                    space(rng, out);
                    random_value(rng, out, depth + 1);
                    space(rng, out);
                }
                out.push(']');
            }
            _ => {
                random_object(rng, out, depth + 1);
            }
        }
    }

    /// Writes a random object; whether one of its own keys holds an escape.
    fn random_object(rng: &mut fastrand::Rng, out: &mut String, depth: usize) -> bool {
        let mut escaped = false;
        space(rng, out);
        out.push('{');
        for i in 0..rng.usize(0..6) {
            if i > 0 {
                out.push(',');
            }
            space(rng, out);
            escaped |= random_string(rng, out);
            space(rng, out);
            out.push(':');
            space(rng, out);
            random_value(rng, out, depth);
            space(rng, out);
        }
        space(rng, out);
        out.push('}');
        space(rng, out);
        escaped
    }

    /// Text that is not an object, or an object with an escaped key, is not
    /// indexed (its fields are then found by decoding), and never makes the
    /// scan panic.
    #[test]
    fn the_byte_scan_indexes_only_plain_objects() {
        for text in [
            "",
            "{",
            "[1]",
            "\"s\"",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":1,}",
            "{\"a\":1 \"b\":2}",
            "{\"a\":[}",
            "{\"a\":]}",
            "{\"a\":\"x}",
            "{1:2}",
            r#"{"k\u0065y": 1}"#,
            r#"{"a": 1, "b\"c": 2}"#,
        ] {
            assert!(by_bytes(text).is_none(), "{text}");
        }
    }
}
