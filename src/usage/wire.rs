//! Lenient, borrowing building blocks shared by the provider parsers.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::estimate::TextTally;

/// Parses a provider document. Valid UTF-8 (nearly every document) is checked once, in
/// bulk, so the parser does not validate each key and string again (a few % of the meter's
/// time per chunk); other bytes take the byte parser, which accepts them inside values it
/// skips, exactly as before. (Two parsers per document type: ~150 KiB of the filter's wasm.)
pub fn from_json<'a, T: Deserialize<'a>>(data: &'a [u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(data) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(data),
    }
}

/// A token count that tolerates `null`, absence, negative or fractional numbers and numeric
/// strings. Anything else reads as absent rather than failing the whole document.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count(Option<u64>);

impl Count {
    pub fn get(self) -> Option<u64> {
        self.0
    }

    pub fn or_zero(self) -> u64 {
        self.0.unwrap_or(0)
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(CountVisitor)
    }
}

struct CountVisitor;

impl<'de> Visitor<'de> for CountVisitor {
    type Value = Count;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a token count")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
        Ok(Count(Some(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
        Ok(Count(Some(u64::try_from(v).unwrap_or(0))))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Count, E> {
        // `as` saturates; NaN becomes 0.
        Ok(Count(Some(if v > 0.0 { v as u64 } else { 0 })))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Count, E> {
        Ok(Count(v.trim().parse().ok()))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Count, E> {
        Ok(Count(None))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Count, E> {
        Ok(Count(None))
    }

    fn visit_none<E: de::Error>(self) -> Result<Count, E> {
        Ok(Count(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Count(None))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Count(None))
    }
}

/// Generated text in any of the shapes providers use: a string, an array of strings or of
/// `{"text": ...}` parts, or a `{"text": ...}` object. Strings borrow from the input unless
/// they contain escapes. Numbers, booleans and `null` read as empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Text<'a> {
    #[default]
    Empty,
    One(Cow<'a, str>),
    Many(Vec<Text<'a>>),
}

impl Text<'_> {
    pub fn tally_into(&self, tally: &mut TextTally) {
        match self {
            Text::Empty => {}
            Text::One(text) => tally.add(text),
            Text::Many(parts) => parts.iter().for_each(|part| part.tally_into(tally)),
        }
    }

    /// The string value, when this is a plain string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Text::One(text) => Some(text),
            _ => None,
        }
    }

    /// A finish/stop reason that says the generation ended. DashScope native writes the
    /// string `"null"` while it has not.
    pub fn is_finish_reason(&self) -> bool {
        self.as_str()
            .is_some_and(|reason| !reason.is_empty() && reason != "null")
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TextVisitor(PhantomData))
    }
}

/// A tool call in an OpenAI-style message or delta (also DashScope's): only its arguments are
/// generated text worth tallying for an estimate.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ToolCall<'a> {
    #[serde(borrow)]
    pub function: Option<Function<'a>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct Function<'a> {
    #[serde(borrow)]
    pub arguments: Text<'a>,
}

struct TextVisitor<'a>(PhantomData<Text<'a>>);

impl<'de: 'a, 'a> Visitor<'de> for TextVisitor<'a> {
    type Value = Text<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("text")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'a>, E> {
        Ok(Text::One(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'a>, E> {
        Ok(Text::One(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'a>, E> {
        Ok(Text::One(Cow::Owned(v)))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Text<'a>, E> {
        Ok(Text::Empty)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Text<'a>, E> {
        Ok(Text::Empty)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Text<'a>, E> {
        Ok(Text::Empty)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Text<'a>, E> {
        Ok(Text::Empty)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Text<'a>, E> {
        Ok(Text::Empty)
    }

    fn visit_none<E: de::Error>(self) -> Result<Text<'a>, E> {
        Ok(Text::Empty)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text<'a>, A::Error> {
        let mut parts = Vec::new();
        while let Some(part) = seq.next_element::<Text<'a>>()? {
            if part != Text::Empty {
                parts.push(part);
            }
        }
        Ok(if parts.is_empty() {
            Text::Empty
        } else {
            Text::Many(parts)
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Text<'a>, A::Error> {
        let mut text = Text::Empty;
        while let Some(is_text) = map.next_key_seed(KeyIs("text"))? {
            if is_text {
                text = map.next_value()?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(text)
    }
}

/// Map key check without allocating the key.
struct KeyIs(&'static str);

impl<'de> DeserializeSeed<'de> for KeyIs {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

/// Counts the elements of an array without keeping them (e.g. generated images).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ElementCount(pub u64);

impl<'de> Deserialize<'de> for ElementCount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ElementCountVisitor)
    }
}

struct ElementCountVisitor;

impl<'de> Visitor<'de> for ElementCountVisitor {
    type Value = ElementCount;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ElementCount, A::Error> {
        let mut count = 0u64;
        while seq.next_element::<IgnoredAny>()?.is_some() {
            count += 1;
        }
        Ok(ElementCount(count))
    }

    fn visit_unit<E: de::Error>(self) -> Result<ElementCount, E> {
        Ok(ElementCount(0))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ElementCount, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(ElementCount(0))
    }
}

/// A readable message for an error payload (`{"message", "code", "type"}` in its usual
/// shapes, or a bare string); `None` for `null`, `false` or an empty object.
pub fn describe_error(value: &Value) -> Option<String> {
    match value {
        Value::Null | Value::Bool(false) => None,
        Value::String(text) if text.is_empty() => None,
        Value::String(text) => Some(text.clone()),
        Value::Object(fields) if fields.is_empty() => None,
        Value::Object(fields) => {
            let label = ["code", "status", "type"]
                .iter()
                .filter_map(|key| fields.get(*key))
                .find_map(scalar_text);
            let message = fields.get("message").and_then(scalar_text);
            Some(match (label, message) {
                (Some(label), Some(message)) => format!("{label}: {message}"),
                (None, Some(message)) => message,
                (Some(label), None) => label,
                (None, None) => value.to_string(),
            })
        }
        other => Some(other.to_string()),
    }
}

fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) if !text.is_empty() => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Probe<'a> {
        n: Count,
        #[serde(borrow)]
        t: Text<'a>,
        items: ElementCount,
    }

    #[test]
    fn counts_are_lenient() {
        let cases = [
            (r#"{"n":5}"#, Some(5)),
            (r#"{"n":null}"#, None),
            (r#"{}"#, None),
            (r#"{"n":-3}"#, Some(0)),
            (r#"{"n":7.9}"#, Some(7)),
            (r#"{"n":"12"}"#, Some(12)),
            (r#"{"n":"x"}"#, None),
            (r#"{"n":{"a":1}}"#, None),
            (r#"{"n":[1]}"#, None),
        ];
        for (json, want) in cases {
            let probe: Probe = serde_json::from_str(json).unwrap();
            assert_eq!(probe.n.get(), want, "{json}");
        }
    }

    #[test]
    fn text_accepts_strings_parts_and_nulls() {
        let tally = |json: &str| {
            let probe: Probe = serde_json::from_str(json).unwrap();
            let mut tally = TextTally::default();
            probe.t.tally_into(&mut tally);
            tally.chars()
        };
        assert_eq!(tally(r#"{"t":"abc"}"#), 3);
        assert_eq!(tally(r#"{"t":"a\nb"}"#), 3);
        assert_eq!(
            tally(r#"{"t":[{"text":"ab"},{"type":"image","url":"x"},"cd"]}"#),
            4
        );
        assert_eq!(tally(r#"{"t":{"type":"text","text":"xyz"}}"#), 3);
        assert_eq!(tally(r#"{"t":null}"#), 0);
        assert_eq!(tally(r#"{"t":42}"#), 0);
    }

    #[test]
    fn unescaped_text_is_borrowed() {
        let probe: Probe = serde_json::from_str(r#"{"t":"plain"}"#).unwrap();
        assert!(matches!(probe.t, Text::One(Cow::Borrowed("plain"))));
    }

    #[test]
    fn finish_reason_null_string_is_not_a_finish() {
        assert!(!Text::One("null".into()).is_finish_reason());
        assert!(!Text::One("".into()).is_finish_reason());
        assert!(!Text::Empty.is_finish_reason());
        assert!(Text::One("stop".into()).is_finish_reason());
    }

    #[test]
    fn element_count_counts_array_items() {
        let probe: Probe =
            serde_json::from_str(r#"{"items":[{"b64_json":"AAAA"},{"url":"u"}]}"#).unwrap();
        assert_eq!(probe.items, ElementCount(2));
    }

    #[test]
    fn errors_are_described_readably() {
        let describe = |json: &str| describe_error(&serde_json::from_str(json).unwrap());
        assert_eq!(describe("null"), None);
        assert_eq!(describe("{}"), None);
        assert_eq!(
            describe(r#"{"code":400,"message":"Token limit reached"}"#).as_deref(),
            Some("400: Token limit reached")
        );
        assert_eq!(
            describe(r#"{"type":"overloaded_error","message":"Overloaded"}"#).as_deref(),
            Some("overloaded_error: Overloaded")
        );
        assert_eq!(describe(r#""boom""#).as_deref(), Some("boom"));
        assert_eq!(
            describe(r#"{"detail":1}"#).as_deref(),
            Some(r#"{"detail":1}"#)
        );
    }
}
