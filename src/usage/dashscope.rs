//! Alibaba DashScope native API (`/api/v1/services/aigc/...`, `/api/v1/apps/{id}/completion`).
//!
//! Every event carries the CUMULATIVE usage so far and the last one wins; input may grow
//! mid-stream (tool round-trips are folded in), so no earlier figure is authoritative.
//! Fields: input_tokens, output_tokens, prompt_tokens_details.cached_tokens,
//! output_tokens_details.reasoning_tokens (multimodal responses have no total). The apps
//! API reports `usage.models[]`, one entry per model used: their sum is the call's usage.
//! Errors: `event:error` in streams, `{"code","message"}` without `output` as a body.
//! `finish_reason` is the string `"null"` until the generation ends.
//!
//! Text for estimation assumes `incremental_output=true` (each event carries new text),
//! which every recorded stream uses; the usage is always reported anyway.

use llm_meter_protocol::Usage;
use serde::Deserialize;
use serde_json::Value;

use super::wire::{from_json, Count, Text, ToolCall};
use super::Observed;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Document<'a> {
    #[serde(borrow)]
    output: Option<Output<'a>>,
    usage: Option<DashScopeUsage>,
    code: Option<Value>,
    message: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Output<'a> {
    /// `result_format=text` and the apps API.
    #[serde(borrow)]
    text: Text<'a>,
    #[serde(borrow)]
    finish_reason: Text<'a>,
    #[serde(borrow)]
    choices: Option<Vec<Choice<'a>>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Choice<'a> {
    #[serde(borrow)]
    message: Option<Message<'a>>,
    #[serde(borrow)]
    finish_reason: Text<'a>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Message<'a> {
    /// A string, or an array of `{"text": ...}` parts (multimodal).
    #[serde(borrow)]
    content: Text<'a>,
    #[serde(borrow)]
    reasoning_content: Text<'a>,
    #[serde(borrow)]
    tool_calls: Option<Vec<ToolCall<'a>>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct DashScopeUsage {
    input_tokens: Count,
    output_tokens: Count,
    prompt_tokens_details: Option<CachedDetails>,
    output_tokens_details: Option<ReasoningDetails>,
    models: Option<Vec<ModelUsage>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CachedDetails {
    cached_tokens: Count,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ReasoningDetails {
    reasoning_tokens: Count,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ModelUsage {
    input_tokens: Count,
    output_tokens: Count,
}

impl DashScopeUsage {
    fn to_usage(&self) -> Usage {
        let has_top_level = self.input_tokens.get().is_some() || self.output_tokens.get().is_some();
        let (input, output) = match &self.models {
            Some(models) if !has_top_level => models.iter().fold((0u64, 0u64), |(i, o), m| {
                (
                    i.saturating_add(m.input_tokens.or_zero()),
                    o.saturating_add(m.output_tokens.or_zero()),
                )
            }),
            _ => (self.input_tokens.or_zero(), self.output_tokens.or_zero()),
        };
        Usage {
            input_tokens: input,
            cached_input_tokens: self
                .prompt_tokens_details
                .as_ref()
                .map_or(0, |d| d.cached_tokens.or_zero()),
            cache_write_tokens: 0,
            output_tokens: output,
            reasoning_tokens: self
                .output_tokens_details
                .as_ref()
                .map_or(0, |d| d.reasoning_tokens.or_zero()),
            images: 0,
        }
    }
}

pub(super) fn on_event(observed: &mut Observed, event_type: &str, data: &[u8]) -> bool {
    let Ok(document) = from_json::<Document>(data) else {
        if event_type == "error" {
            observed.record_error(String::from_utf8_lossy(data).into_owned());
            return true;
        }
        return false;
    };
    if event_type == "error" {
        let message = error_message(&document);
        observed.record_error(message.unwrap_or_else(|| String::from_utf8_lossy(data).into()));
    }
    apply(observed, &document);
    true
}

pub(super) fn on_body(observed: &mut Observed, body: &[u8]) -> bool {
    let Ok(document) = from_json::<Document>(body) else {
        return false;
    };
    if document.output.is_none() {
        if let Some(message) = error_message(&document) {
            observed.record_error(message);
        }
    }
    apply(observed, &document);
    true
}

fn apply(observed: &mut Observed, document: &Document<'_>) {
    if let Some(output) = &document.output {
        output.text.tally_into(&mut observed.text);
        let mut finished = output.finish_reason.is_finish_reason();
        for choice in output.choices.iter().flatten() {
            if let Some(message) = &choice.message {
                message.content.tally_into(&mut observed.text);
                message.reasoning_content.tally_into(&mut observed.text);
                for call in message.tool_calls.iter().flatten() {
                    if let Some(function) = &call.function {
                        function.arguments.tally_into(&mut observed.text);
                    }
                }
            }
            finished |= choice.finish_reason.is_finish_reason();
        }
        observed.terminal |= finished;
    }
    if let Some(usage) = &document.usage {
        observed.usage = Some(usage.to_usage());
    }
}

/// `code: message` of an error document; `None` when it has neither.
fn error_message(document: &Document<'_>) -> Option<String> {
    let text = |value: &Option<Value>| match value {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    match (text(&document.code), text(&document.message)) {
        (Some(code), Some(message)) => Some(format!("{code}: {message}")),
        (code, message) => code.or(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cumulative_usage_last_wins_even_when_input_grows() {
        let mut observed = Observed::default();
        let events = [
            r#"{"output":{"choices":[{"message":{"content":"","reasoning_content":"嗯","role":"assistant"},"finish_reason":"null"}]},"usage":{"input_tokens":281,"output_tokens":3}}"#,
            r#"{"output":{"choices":[{"message":{"content":"好","role":"assistant"},"finish_reason":"stop"}]},"usage":{"input_tokens":723,"output_tokens":254,"output_tokens_details":{"reasoning_tokens":150},"prompt_tokens_details":{"cached_tokens":0}}}"#,
        ];
        assert!(on_event(&mut observed, "result", events[0].as_bytes()));
        assert!(!observed.terminal, "\"null\" is not a finish reason");
        assert!(on_event(&mut observed, "result", events[1].as_bytes()));
        let usage = observed.usage.unwrap();
        assert_eq!(
            (
                usage.input_tokens,
                usage.output_tokens,
                usage.reasoning_tokens
            ),
            (723, 254, 150)
        );
        assert!(observed.terminal);
        assert_eq!(observed.text.chars(), 2);
    }

    #[test]
    fn apps_usage_sums_models() {
        let mut observed = Observed::default();
        let body = r#"{"output":{"finish_reason":"stop","text":"米饭"},"usage":{"models":[{"output_tokens":311,"model_id":"qwen-plus","input_tokens":344},{"output_tokens":1,"model_id":"x","input_tokens":2}]}}"#;
        assert!(on_body(&mut observed, body.as_bytes()));
        let usage = observed.usage.unwrap();
        assert_eq!((usage.input_tokens, usage.output_tokens), (346, 312));
        assert!(observed.terminal);
        assert_eq!(observed.text.chars(), 2);
    }

    #[test]
    fn multimodal_content_parts_are_tallied() {
        let mut observed = Observed::default();
        let data = r#"{"output":{"choices":[{"message":{"content":[{"text":"这是一个"}],"role":"assistant"},"finish_reason":"null"}]},"usage":{"input_tokens":1283,"output_tokens":1,"image_tokens":1247}}"#;
        assert!(on_event(&mut observed, "result", data.as_bytes()));
        assert_eq!(observed.text.chars(), 4);
        assert_eq!(observed.usage.unwrap().input_tokens, 1283);
    }

    #[test]
    fn error_event_and_error_body() {
        let mut observed = Observed::default();
        let data = r#"{"code":"InvalidParameter","message":"Role must be user or assistant","request_id":"x"}"#;
        assert!(on_event(&mut observed, "error", data.as_bytes()));
        assert_eq!(
            observed.in_band_error.as_deref(),
            Some("InvalidParameter: Role must be user or assistant")
        );

        let mut observed = Observed::default();
        assert!(on_body(
            &mut observed,
            br#"{"code":"InvalidApiKey","message":"Invalid API-key provided.","request_id":"y"}"#
        ));
        assert_eq!(
            observed.in_band_error.as_deref(),
            Some("InvalidApiKey: Invalid API-key provided.")
        );
        assert_eq!(observed.usage, None);
    }

    #[test]
    fn success_body_with_empty_code_is_not_an_error() {
        let mut observed = Observed::default();
        let body = r#"{"code":"","output":{"text":"hi","finish_reason":"stop"},"usage":{"input_tokens":16,"output_tokens":14}}"#;
        assert!(on_body(&mut observed, body.as_bytes()));
        assert_eq!(observed.in_band_error, None);
        assert_eq!(observed.usage.unwrap().total_tokens(), 30);
    }
}
