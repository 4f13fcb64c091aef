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
fn first_byte(raw: &RawValue) -> Option<u8> {
    raw.get()
        .bytes()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

fn invalid(e: &serde_json::Error) -> String {
    format!("invalid JSON: {e}")
}

/// What a payload holds at one step of a field's path.
pub(crate) enum Child<'e> {
    Found(&'e RawValue),
    /// Not there; `indexable` when the holder is an object (or an array and
    /// the step a number), so the field is merely absent.
    Missing {
        indexable: bool,
    },
}

impl<'e> Child<'e> {
    /// The member `segment` of `holder` (an object's key, an array's index).
    pub(crate) fn of(holder: &'e RawValue, segment: &str) -> Result<Self, String> {
        let mut deserializer = serde_json::Deserializer::from_str(holder.get());
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
                found = Some(map.next_value::<&'de RawValue>()?);
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
                    Some(value) => found = Some(value),
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
    entries: Vec<(Cow<'e, str>, &'e RawValue)>,
    is_object: bool,
}

impl<'e> RawObject<'e> {
    /// Scans `data`, the payload whose fields are bound next.
    pub(crate) fn scan(&mut self, data: &'e RawValue) -> Result<(), String> {
        self.entries.clear();
        self.is_object = first_byte(data) == Some(b'{');
        if self.is_object {
            serde_json::Deserializer::from_str(data.get())
                .deserialize_map(Entries(&mut self.entries))
                .map_err(|e| invalid(&e))?;
        }
        Ok(())
    }

    /// The member `segment` of `data`, the payload last scanned.
    pub(crate) fn child(&self, data: &'e RawValue, segment: &str) -> Result<Child<'e>, String> {
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

struct Entries<'b, 'e>(&'b mut Vec<(Cow<'e, str>, &'e RawValue)>);

impl<'de> Visitor<'de> for Entries<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(Text(key)) = map.next_key()? {
            let value: &'de RawValue = map.next_value()?;
            self.0.push((key, value));
        }
        Ok(())
    }
}

/// A field's value: a string (borrowed when it can be), or anything else
/// decoded on its own.
pub(crate) enum Leaf<'e> {
    Text(Cow<'e, str>),
    Other(Value),
}

/// Decodes the value a field binds.
pub(crate) fn decode_leaf(raw: &RawValue) -> Result<Leaf<'_>, String> {
    if first_byte(raw) == Some(b'"') {
        // Validated JSON: a string without a backslash is its own text
        // between the quotes.
        if let Some(inner) = raw
            .get()
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            && !inner.contains('\\')
        {
            return Ok(Leaf::Text(Cow::Borrowed(inner)));
        }
        let Text(text) = serde_json::from_str(raw.get()).map_err(|e| invalid(&e))?;
        return Ok(Leaf::Text(text));
    }
    // The common case, a plain integer, without a decoder; what this does
    // not take (fractions, exponents, huge numbers) is decoded as JSON is.
    // `-0` is no integer to serde_json (it is the real -0.0).
    if let Ok(integer) = raw.get().parse::<i64>()
        && raw.get() != "-0"
    {
        return Ok(Leaf::Other(Value::from(integer)));
    }
    serde_json::from_str(raw.get())
        .map(Leaf::Other)
        .map_err(|e| invalid(&e))
}
