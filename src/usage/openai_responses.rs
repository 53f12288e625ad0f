//! OpenAI Responses API (`/v1/responses`).
//!
//! Streams: usage comes only in the terminal event (`response.completed`, also
//! `response.incomplete` and `response.failed`) as `response.usage`. The same object also
//! carries `tool_usage` (e.g. `image_gen` token counts) which is NOT the call's usage: the
//! typed parse below reads `response.usage` by path and never looks at it.
//! Non-streaming bodies carry the usage at the top level.
//!
//! Text for estimation comes from the `*.delta` events only; the `*.done` events repeat the
//! whole text and are skipped without parsing.

use llm_meter_protocol::Usage;
use serde::Deserialize;
use serde_json::Value;

use super::wire::{describe_error, from_json, Count, Text};
use super::Observed;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Event<'a> {
    #[serde(rename = "type", borrow)]
    kind: Text<'a>,
    #[serde(borrow)]
    delta: Text<'a>,
    response: Option<ResponseObject<'a>>,
    /// `error` events: `{"type":"error","code","message"}`.
    message: Option<Value>,
    code: Option<Value>,
    error: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ResponseObject<'a> {
    usage: Option<ResponsesUsage>,
    error: Option<Value>,
    #[serde(borrow)]
    status: Text<'a>,
    /// Only read for non-streaming bodies.
    #[serde(borrow)]
    output: Option<Vec<OutputItem<'a>>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct OutputItem<'a> {
    /// Message parts (`output_text`, `refusal`).
    #[serde(borrow)]
    content: Text<'a>,
    /// Function call arguments.
    #[serde(borrow)]
    arguments: Text<'a>,
    /// Reasoning summary parts.
    #[serde(borrow)]
    summary: Text<'a>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ResponsesUsage {
    input_tokens: Count,
    input_tokens_details: Option<InputDetails>,
    output_tokens: Count,
    output_tokens_details: Option<OutputDetails>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct InputDetails {
    cached_tokens: Count,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct OutputDetails {
    reasoning_tokens: Count,
}

impl ResponsesUsage {
    fn to_usage(&self) -> Usage {
        Usage {
            input_tokens: self.input_tokens.or_zero(),
            cached_input_tokens: self
                .input_tokens_details
                .as_ref()
                .map_or(0, |d| d.cached_tokens.or_zero()),
            cache_write_tokens: 0,
            output_tokens: self.output_tokens.or_zero(),
            reasoning_tokens: self
                .output_tokens_details
                .as_ref()
                .map_or(0, |d| d.reasoning_tokens.or_zero()),
            images: 0,
        }
    }
}

const TERMINAL_EVENTS: [&str; 3] = [
    "response.completed",
    "response.incomplete",
    "response.failed",
];

/// Event types that carry nothing we meter (the `.done` ones repeat text already counted).
fn is_uninteresting(event_type: &str) -> bool {
    event_type.ends_with(".done")
        || event_type.ends_with(".added")
        || event_type.ends_with(".in_progress")
        || event_type.ends_with(".searching")
        || event_type == "response.created"
        || event_type == "response.queued"
}

pub(super) fn on_event(observed: &mut Observed, event_type: &str, data: &[u8]) -> bool {
    if is_uninteresting(event_type) {
        return true;
    }
    let Ok(event) = from_json::<Event>(data) else {
        if event_type == "error" {
            observed.record_error(String::from_utf8_lossy(data).into_owned());
            return true;
        }
        return false;
    };
    let kind = event.kind.as_str().unwrap_or(event_type);
    if kind.ends_with(".delta") && !kind.starts_with("response.audio") {
        event.delta.tally_into(&mut observed.text);
    }
    if kind == "error" || event_type == "error" {
        observed.record_error(error_event_message(&event, data));
    }
    if TERMINAL_EVENTS.contains(&kind) {
        observed.terminal = true;
    }
    if let Some(response) = &event.response {
        apply_response(observed, response);
    }
    true
}

pub(super) fn on_body(observed: &mut Observed, body: &[u8]) -> bool {
    let Ok(response) = from_json::<ResponseObject>(body) else {
        return false;
    };
    for item in response.output.iter().flatten() {
        item.content.tally_into(&mut observed.text);
        item.arguments.tally_into(&mut observed.text);
        item.summary.tally_into(&mut observed.text);
    }
    apply_response(observed, &response);
    true
}

fn apply_response(observed: &mut Observed, response: &ResponseObject<'_>) {
    if let Some(usage) = &response.usage {
        observed.usage = Some(usage.to_usage());
    }
    if let Some(message) = response.error.as_ref().and_then(describe_error) {
        observed.record_error(message);
    } else if response.status.as_str() == Some("failed") {
        observed.record_error("response failed".to_string());
    }
}

fn error_event_message(event: &Event<'_>, data: &[u8]) -> String {
    let mut fields = serde_json::Map::new();
    for (key, value) in [("code", &event.code), ("message", &event.message)] {
        if let Some(value) = value {
            fields.insert(key.to_string(), value.clone());
        }
    }
    event
        .error
        .as_ref()
        .and_then(describe_error)
        .or_else(|| describe_error(&Value::Object(fields)))
        .unwrap_or_else(|| String::from_utf8_lossy(data).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completed_event_usage_ignores_tool_usage() {
        let data = r#"{"type":"response.completed","response":{"id":"r","status":"completed","tool_usage":{"image_gen":{"input_tokens":0,"output_tokens":0}},"usage":{"input_tokens":13,"input_tokens_details":{"cached_tokens":0},"output_tokens":59,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":72}},"sequence_number":40}"#;
        let mut observed = Observed::default();
        assert!(on_event(
            &mut observed,
            "response.completed",
            data.as_bytes()
        ));
        let usage = observed.usage.unwrap();
        assert_eq!((usage.input_tokens, usage.output_tokens), (13, 59));
        assert!(observed.terminal);
    }

    #[test]
    fn usage_before_tool_usage_also_wins() {
        let data = r#"{"type":"response.completed","response":{"usage":{"input_tokens":5,"output_tokens":6},"tool_usage":{"image_gen":{"input_tokens":99,"output_tokens":99}}}}"#;
        let mut observed = Observed::default();
        assert!(on_event(&mut observed, "", data.as_bytes()));
        assert_eq!(observed.usage.unwrap().total_tokens(), 11);
    }

    #[test]
    fn deltas_are_tallied_and_done_events_skipped() {
        let mut observed = Observed::default();
        let events = [
            (
                "response.output_text.delta",
                r#"{"type":"response.output_text.delta","delta":"Hello"}"#,
            ),
            (
                "response.output_text.done",
                r#"{"type":"response.output_text.done","text":"Hello"}"#,
            ),
            (
                "",
                r#"{"type":"response.function_call_arguments.delta","delta":"{}"}"#,
            ),
            ("response.reasoning_summary_text.delta", r#"{"delta":"ok"}"#),
        ];
        for (event_type, data) in events {
            assert!(on_event(&mut observed, event_type, data.as_bytes()));
        }
        assert_eq!(observed.text.chars(), 5 + 2 + 2);
        assert!(!observed.terminal);
    }

    #[test]
    fn failed_and_incomplete_are_terminal_with_usage() {
        let mut observed = Observed::default();
        let data = r#"{"type":"response.failed","response":{"status":"failed","error":{"code":"server_error","message":"boom"},"usage":{"input_tokens":3,"output_tokens":1}}}"#;
        assert!(on_event(&mut observed, "response.failed", data.as_bytes()));
        assert!(observed.terminal);
        assert_eq!(
            observed.in_band_error.as_deref(),
            Some("server_error: boom")
        );
        assert_eq!(observed.usage.unwrap().total_tokens(), 4);

        let mut observed = Observed::default();
        let data = r#"{"type":"response.incomplete","response":{"status":"incomplete","error":null,"usage":{"input_tokens":3,"output_tokens":16}}}"#;
        assert!(on_event(
            &mut observed,
            "response.incomplete",
            data.as_bytes()
        ));
        assert!(observed.terminal);
        assert_eq!(observed.in_band_error, None);
    }

    #[test]
    fn error_event_is_reported() {
        let mut observed = Observed::default();
        let data =
            r#"{"type":"error","code":"rate_limit_exceeded","message":"slow down","param":null}"#;
        assert!(on_event(&mut observed, "error", data.as_bytes()));
        assert_eq!(
            observed.in_band_error.as_deref(),
            Some("rate_limit_exceeded: slow down")
        );
    }

    #[test]
    fn body_reads_top_level_usage_and_output_text() {
        let body = r#"{"id":"r","status":"completed","error":null,"output":[{"type":"reasoning","summary":[{"type":"summary_text","text":"ab"}]},{"type":"message","content":[{"type":"output_text","text":"hello"}]},{"type":"function_call","arguments":"{}"}],"usage":{"input_tokens":1349,"input_tokens_details":{"cached_tokens":1024},"output_tokens":10,"output_tokens_details":{"reasoning_tokens":0}}}"#;
        let mut observed = Observed::default();
        assert!(on_body(&mut observed, body.as_bytes()));
        assert_eq!(observed.usage.unwrap().cached_input_tokens, 1024);
        assert_eq!(observed.text.chars(), 2 + 5 + 2);
        assert_eq!(observed.in_band_error, None);
    }
}
