//! Anthropic Messages (`/v1/messages`), also Anthropic-compatible endpoints.
//!
//! Streams: `message_start.message.usage` gives the first figures; every later
//! `message_delta.usage` REPLACES the fields it carries (its figures are cumulative; the
//! compatible endpoints even send a corrected `input_tokens` there). Normalised onto
//! [`Usage`]: input = input_tokens + cache_read_input_tokens + cache_creation_input_tokens,
//! cached = cache_read, cache_write = cache_creation.
//!
//! Server-side compaction: when the usage has `iterations[]`, the call is billed as the SUM
//! over the iterations. Anthropic documents that the top-level figures exclude the
//! compaction iterations (they describe only the final message iteration), yet every
//! iteration was processed and is charged. Example (the recorded compaction stream): top
//! level says input 181, output 8; the iterations say compaction {in 100, cache_read 55096,
//! out 83} + message {in 181, out 8}, billed as input 55377 (55096 cached), output 91.

use llm_meter_protocol::Usage;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::wire::{describe_error, from_json, Count, Text};
use super::Observed;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Document<'a> {
    #[serde(rename = "type", borrow)]
    kind: Text<'a>,
    /// `message_start`.
    #[serde(borrow)]
    message: Option<MessageBody<'a>>,
    /// `content_block_delta` and `message_delta`.
    #[serde(borrow)]
    delta: Option<Delta<'a>>,
    /// `message_delta`, or a non-streamed message.
    usage: Option<AnthropicUsage>,
    error: Option<Value>,
    /// Non-streamed message.
    #[serde(borrow)]
    content: Option<Vec<Block<'a>>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MessageBody<'a> {
    usage: Option<AnthropicUsage>,
    #[serde(borrow)]
    content: Option<Vec<Block<'a>>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Delta<'a> {
    #[serde(borrow)]
    text: Text<'a>,
    #[serde(borrow)]
    thinking: Text<'a>,
    #[serde(borrow)]
    partial_json: Text<'a>,
    /// `compaction_delta`: the summary the model wrote (billed in its iteration).
    #[serde(borrow)]
    content: Text<'a>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Block<'a> {
    #[serde(borrow)]
    text: Text<'a>,
    #[serde(borrow)]
    thinking: Text<'a>,
    /// `tool_use` input, counted as its JSON text.
    #[serde(borrow)]
    input: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AnthropicUsage {
    input_tokens: Count,
    output_tokens: Count,
    cache_creation_input_tokens: Count,
    cache_read_input_tokens: Count,
    output_tokens_details: Option<OutputDetails>,
    iterations: Option<Vec<Iteration>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct OutputDetails {
    thinking_tokens: Count,
}

#[derive(Deserialize, Default, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(default)]
struct Iteration {
    input_tokens: Count,
    output_tokens: Count,
    cache_creation_input_tokens: Count,
    cache_read_input_tokens: Count,
}

/// Raw figures of the stream so far, each replaced when a later event carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Counts {
    seen: bool,
    input: u64,
    output: u64,
    cache_read: u64,
    cache_write: u64,
    thinking: u64,
    iterations: Vec<Iteration>,
}

impl Counts {
    fn merge(&mut self, usage: &AnthropicUsage) {
        self.seen = true;
        let replace = |field: &mut u64, value: Count| {
            if let Some(value) = value.get() {
                *field = value;
            }
        };
        replace(&mut self.input, usage.input_tokens);
        replace(&mut self.output, usage.output_tokens);
        replace(&mut self.cache_read, usage.cache_read_input_tokens);
        replace(&mut self.cache_write, usage.cache_creation_input_tokens);
        if let Some(details) = &usage.output_tokens_details {
            replace(&mut self.thinking, details.thinking_tokens);
        }
        if let Some(iterations) = usage.iterations.as_ref().filter(|i| !i.is_empty()) {
            self.iterations.clone_from(iterations);
        }
    }

    fn to_usage(&self) -> Usage {
        let mut usage = if self.iterations.is_empty() {
            normalise(self.input, self.cache_read, self.cache_write, self.output)
        } else {
            self.iterations
                .iter()
                .map(|it| {
                    normalise(
                        it.input_tokens.or_zero(),
                        it.cache_read_input_tokens.or_zero(),
                        it.cache_creation_input_tokens.or_zero(),
                        it.output_tokens.or_zero(),
                    )
                })
                .fold(Usage::default(), add)
        };
        usage.reasoning_tokens = self.thinking;
        usage
    }
}

fn normalise(input: u64, cache_read: u64, cache_write: u64, output: u64) -> Usage {
    Usage {
        input_tokens: input.saturating_add(cache_read).saturating_add(cache_write),
        cached_input_tokens: cache_read,
        cache_write_tokens: cache_write,
        output_tokens: output,
        ..Usage::default()
    }
}

fn add(a: Usage, b: Usage) -> Usage {
    Usage {
        input_tokens: a.input_tokens.saturating_add(b.input_tokens),
        cached_input_tokens: a.cached_input_tokens.saturating_add(b.cached_input_tokens),
        cache_write_tokens: a.cache_write_tokens.saturating_add(b.cache_write_tokens),
        output_tokens: a.output_tokens.saturating_add(b.output_tokens),
        reasoning_tokens: a.reasoning_tokens.saturating_add(b.reasoning_tokens),
        images: a.images.saturating_add(b.images),
    }
}

/// Events that carry nothing we meter, skipped without parsing when the `event:` line
/// names them.
const SKIPPED_EVENTS: [&str; 3] = ["ping", "content_block_start", "content_block_stop"];

pub(super) fn on_event(
    observed: &mut Observed,
    counts: &mut Counts,
    event_type: &str,
    data: &[u8],
) -> bool {
    if SKIPPED_EVENTS.contains(&event_type) {
        return true;
    }
    let Ok(document) = from_json::<Document>(data) else {
        if event_type == "error" {
            observed.record_error(String::from_utf8_lossy(data).into_owned());
            return true;
        }
        return false;
    };
    let kind = document.kind.as_str().unwrap_or(event_type);
    if let Some(delta) = &document.delta {
        for text in [
            &delta.text,
            &delta.thinking,
            &delta.partial_json,
            &delta.content,
        ] {
            text.tally_into(&mut observed.text);
        }
    }
    let usage = document
        .message
        .as_ref()
        .and_then(|m| m.usage.as_ref())
        .or(document.usage.as_ref());
    if let Some(usage) = usage {
        counts.merge(usage);
        observed.usage = Some(counts.to_usage());
    }
    if kind == "error" || event_type == "error" {
        let message = document.error.as_ref().and_then(describe_error);
        observed.record_error(message.unwrap_or_else(|| String::from_utf8_lossy(data).into()));
    }
    if kind == "message_stop" {
        observed.terminal = true;
    }
    true
}

pub(super) fn on_body(observed: &mut Observed, counts: &mut Counts, body: &[u8]) -> bool {
    let Ok(document) = from_json::<Document>(body) else {
        return false;
    };
    for block in document.content.iter().flatten() {
        block.text.tally_into(&mut observed.text);
        block.thinking.tally_into(&mut observed.text);
        if let Some(input) = block.input {
            observed.text.add(input.get());
        }
    }
    if let Some(usage) = &document.usage {
        counts.merge(usage);
        observed.usage = Some(counts.to_usage());
    }
    if let Some(message) = document.error.as_ref().and_then(describe_error) {
        observed.record_error(message);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(events: &[(&str, &str)]) -> Observed {
        let mut observed = Observed::default();
        let mut counts = Counts::default();
        for (event_type, data) in events {
            assert!(on_event(
                &mut observed,
                &mut counts,
                event_type,
                data.as_bytes()
            ));
        }
        observed
    }

    #[test]
    fn message_delta_replaces_only_the_fields_it_carries() {
        let observed = stream(&[
            (
                "message_start",
                r#"{"type":"message_start","message":{"usage":{"input_tokens":2,"cache_creation_input_tokens":3068,"cache_read_input_tokens":0,"output_tokens":69}}}"#,
            ),
            (
                "message_delta",
                r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":198,"cache_read_input_tokens":6289}}"#,
            ),
            ("message_stop", r#"{"type":"message_stop"}"#),
        ]);
        let usage = observed.usage.unwrap();
        assert_eq!(usage.input_tokens, 2 + 6289 + 3068);
        assert_eq!(
            (usage.cached_input_tokens, usage.cache_write_tokens),
            (6289, 3068)
        );
        assert_eq!(usage.output_tokens, 198);
        assert!(observed.terminal);
    }

    #[test]
    fn compaction_iterations_are_summed() {
        // Decision documented in the module: bill the sum over `iterations[]`.
        let observed = stream(&[
            (
                "message_start",
                r#"{"type":"message_start","message":{"usage":{"input_tokens":100,"cache_creation_input_tokens":0,"cache_read_input_tokens":55096,"output_tokens":7}}}"#,
            ),
            (
                "message_delta",
                r#"{"type":"message_delta","usage":{"input_tokens":181,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":8,"iterations":[{"input_tokens":100,"output_tokens":83,"cache_read_input_tokens":55096,"cache_creation_input_tokens":0,"type":"compaction"},{"input_tokens":181,"output_tokens":8,"cache_read_input_tokens":0,"cache_creation_input_tokens":0,"type":"message"}]}}"#,
            ),
        ]);
        let usage = observed.usage.unwrap();
        assert_eq!(usage.input_tokens, 55377);
        assert_eq!(usage.cached_input_tokens, 55096);
        assert_eq!(usage.output_tokens, 91);
        assert!(!observed.terminal, "no message_stop yet");
    }

    #[test]
    fn deltas_of_text_thinking_and_tool_input_are_tallied() {
        let observed = stream(&[
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"abc"}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"zzzz"}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Hi"}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{\"a\":"}}"#,
            ),
            ("ping", r#"{"type": "ping"}"#),
        ]);
        assert_eq!(observed.text.chars(), 3 + 2 + 5);
        assert_eq!(observed.usage, None);
    }

    #[test]
    fn error_event_is_reported() {
        let observed = stream(&[(
            "error",
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        )]);
        assert_eq!(
            observed.in_band_error.as_deref(),
            Some("overloaded_error: Overloaded")
        );
    }

    #[test]
    fn events_without_event_lines_use_the_json_type() {
        let observed = stream(&[
            (
                "",
                r#"{"type":"message_start","message":{"usage":{"input_tokens":4,"output_tokens":1}}}"#,
            ),
            ("", r#"{"type":"message_stop"}"#),
        ]);
        assert!(observed.terminal);
        assert_eq!(observed.usage.unwrap().total_tokens(), 5);
    }

    #[test]
    fn body_normalises_cache_fields_and_counts_tool_input() {
        let body = r#"{"type":"message","content":[{"type":"text","text":"Hi"},{"type":"tool_use","id":"t","name":"f","input":{"a":1}}],"usage":{"cache_creation_input_tokens":418,"cache_read_input_tokens":1111,"input_tokens":3,"output_tokens":33}}"#;
        let mut observed = Observed::default();
        assert!(on_body(
            &mut observed,
            &mut Counts::default(),
            body.as_bytes()
        ));
        let usage = observed.usage.unwrap();
        assert_eq!(usage.input_tokens, 1532);
        assert_eq!(
            (usage.cached_input_tokens, usage.cache_write_tokens),
            (1111, 418)
        );
        assert_eq!(observed.text.chars(), 2 + 7);
    }
}
