//! Google Gemini and Vertex AI (`generateContent`, `streamGenerateContent`).
//!
//! `usageMetadata` is cumulative on every chunk: the last one wins. Normalised:
//! input = promptTokenCount + toolUsePromptTokenCount (tool-use prompts are billed as
//! input), cached = cachedContentTokenCount, output = candidatesTokenCount (absent when
//! the model only thought: 0) + thoughtsTokenCount, reasoning = thoughtsTokenCount.
//! A body may be one response object or, for `streamGenerateContent` without `alt=sse`, a
//! JSON array of chunks.

use llm_meter_protocol::Usage;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::wire::{describe_error, from_json, Count, Text};
use super::Observed;

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct Chunk<'a> {
    #[serde(borrow)]
    candidates: Option<Vec<Candidate<'a>>>,
    usage_metadata: Option<UsageMetadata>,
    prompt_feedback: Option<PromptFeedback<'a>>,
    error: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct Candidate<'a> {
    #[serde(borrow)]
    content: Option<Content<'a>>,
    #[serde(borrow)]
    finish_reason: Text<'a>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Content<'a> {
    #[serde(borrow)]
    parts: Option<Vec<Part<'a>>>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct Part<'a> {
    /// Answer text and, with `thought: true`, thought summaries.
    #[serde(borrow)]
    text: Text<'a>,
    #[serde(borrow)]
    function_call: Option<FunctionCall<'a>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct FunctionCall<'a> {
    #[serde(borrow)]
    args: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct PromptFeedback<'a> {
    #[serde(borrow)]
    block_reason: Text<'a>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct UsageMetadata {
    prompt_token_count: Count,
    cached_content_token_count: Count,
    candidates_token_count: Count,
    thoughts_token_count: Count,
    tool_use_prompt_token_count: Count,
}

impl UsageMetadata {
    fn to_usage(&self) -> Usage {
        let thoughts = self.thoughts_token_count.or_zero();
        Usage {
            input_tokens: self
                .prompt_token_count
                .or_zero()
                .saturating_add(self.tool_use_prompt_token_count.or_zero()),
            cached_input_tokens: self.cached_content_token_count.or_zero(),
            cache_write_tokens: 0,
            output_tokens: self
                .candidates_token_count
                .or_zero()
                .saturating_add(thoughts),
            reasoning_tokens: thoughts,
            images: 0,
        }
    }
}

pub(super) fn on_event(observed: &mut Observed, event_type: &str, data: &[u8]) -> bool {
    let Ok(chunk) = from_json::<Chunk>(data) else {
        if event_type == "error" {
            observed.record_error(String::from_utf8_lossy(data).into_owned());
            return true;
        }
        return false;
    };
    apply(observed, &chunk);
    true
}

pub(super) fn on_body(observed: &mut Observed, body: &[u8]) -> bool {
    if body.starts_with(b"[") {
        let Ok(chunks) = from_json::<Vec<Chunk>>(body) else {
            return false;
        };
        chunks.iter().for_each(|chunk| apply(observed, chunk));
        return true;
    }
    on_event(observed, "", body)
}

fn apply(observed: &mut Observed, chunk: &Chunk<'_>) {
    for candidate in chunk.candidates.iter().flatten() {
        let parts = candidate.content.as_ref().and_then(|c| c.parts.as_ref());
        for part in parts.into_iter().flatten() {
            part.text.tally_into(&mut observed.text);
            if let Some(args) = part.function_call.as_ref().and_then(|f| f.args) {
                observed.text.add(args.get());
            }
        }
        if candidate.finish_reason.is_finish_reason() {
            observed.terminal = true;
        }
    }
    if let Some(feedback) = &chunk.prompt_feedback {
        if feedback.block_reason.is_finish_reason() {
            observed.terminal = true;
        }
    }
    if let Some(usage) = &chunk.usage_metadata {
        observed.usage = Some(usage.to_usage());
    }
    if let Some(message) = chunk.error.as_ref().and_then(describe_error) {
        observed.record_error(message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cumulative_usage_last_wins_and_thoughts_are_output() {
        let mut observed = Observed::default();
        let chunks = [
            r#"{"candidates":[{"content":{"parts":[{"text":"ab","thought":true}],"role":"model"}}],"usageMetadata":{"promptTokenCount":34,"thoughtsTokenCount":100,"totalTokenCount":134}}"#,
            r#"{"candidates":[{"content":{"parts":[{"text":"cd"}]},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":34,"candidatesTokenCount":469,"thoughtsTokenCount":787}}"#,
        ];
        assert!(on_event(&mut observed, "", chunks[0].as_bytes()));
        let first = observed.usage.unwrap();
        assert_eq!((first.output_tokens, first.reasoning_tokens), (100, 100));
        assert!(!observed.terminal);
        assert!(on_event(&mut observed, "", chunks[1].as_bytes()));
        let usage = observed.usage.unwrap();
        assert_eq!(
            (
                usage.input_tokens,
                usage.output_tokens,
                usage.reasoning_tokens
            ),
            (34, 1256, 787)
        );
        assert!(observed.terminal);
        assert_eq!(observed.text.chars(), 4);
    }

    #[test]
    fn cached_and_tool_use_prompt_tokens() {
        let mut observed = Observed::default();
        let body = r#"{"usageMetadata":{"promptTokenCount":17713,"cachedContentTokenCount":17379,"candidatesTokenCount":68,"thoughtsTokenCount":821,"toolUsePromptTokenCount":10}}"#;
        assert!(on_body(&mut observed, body.as_bytes()));
        let usage = observed.usage.unwrap();
        assert_eq!(
            (usage.input_tokens, usage.cached_input_tokens),
            (17723, 17379)
        );
        assert_eq!(usage.output_tokens, 889);
    }

    #[test]
    fn array_body_of_chunks_is_read_in_order() {
        let mut observed = Observed::default();
        let body = r#"[{"candidates":[{"content":{"parts":[{"text":"a"}]}}],"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":1}},
                       {"candidates":[{"content":{"parts":[{"functionCall":{"name":"f","args":{"x":1}}}]},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":9}}]"#;
        assert!(on_body(&mut observed, body.as_bytes()));
        assert_eq!(observed.usage.unwrap().output_tokens, 9);
        assert!(observed.terminal);
        assert_eq!(observed.text.chars(), 1 + 7);
    }

    #[test]
    fn error_object_and_blocked_prompt() {
        let mut observed = Observed::default();
        let body = r#"{"error":{"code":429,"message":"Resource exhausted","status":"RESOURCE_EXHAUSTED"}}"#;
        assert!(on_body(&mut observed, body.as_bytes()));
        assert_eq!(
            observed.in_band_error.as_deref(),
            Some("429: Resource exhausted")
        );

        let mut observed = Observed::default();
        let body =
            r#"{"promptFeedback":{"blockReason":"SAFETY"},"usageMetadata":{"promptTokenCount":7}}"#;
        assert!(on_event(&mut observed, "", body.as_bytes()));
        assert!(observed.terminal);
        assert_eq!(observed.usage.unwrap().input_tokens, 7);
    }
}
