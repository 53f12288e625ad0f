//! OpenAI Chat Completions, legacy Completions and every OpenAI-compatible API
//! (DashScope compatible mode, DeepSeek, Zhipu, Groq, OpenRouter, Mistral, Moonshot, ...).
//!
//! Usage is read wherever these providers put it, last one wins:
//! - top-level `usage` of the final `choices: []` chunk (OpenAI `include_usage`), or of the
//!   last content chunk (DeepSeek, Zhipu, Mistral); `"usage": null` is ignored;
//! - `choices[i].usage` (Moonshot);
//! - `x_groq.usage` when the chunk has no top-level usage (older Groq).
//!
//! Cached input is `prompt_tokens_details.cached_tokens`, else DeepSeek's
//! `prompt_cache_hit_tokens`, else Moonshot's top-level `usage.cached_tokens`. Figures are
//! kept as reported even when inconsistent (OpenRouter reports reasoning > completion).

use llm_meter_protocol::Usage;
use serde::Deserialize;
use serde_json::Value;

use super::wire::{describe_error, from_json, Count, Function, Text, ToolCall};
use super::Observed;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Document<'a> {
    #[serde(borrow)]
    choices: Option<Vec<Choice<'a>>>,
    // Boxed: present in one chunk of a stream at most, and a small document is moved
    // several times while it is built.
    usage: Option<Box<ChatUsage>>,
    x_groq: Option<Box<XGroq>>,
    error: Option<Box<Value>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Choice<'a> {
    #[serde(borrow)]
    delta: Option<Message<'a>>,
    /// Non-streamed responses only (boxed, as the rare fields below).
    #[serde(borrow)]
    message: Option<Box<Message<'a>>>,
    /// Legacy Completions.
    #[serde(borrow)]
    text: Option<Box<Text<'a>>>,
    #[serde(borrow)]
    finish_reason: Text<'a>,
    usage: Option<Box<ChatUsage>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Message<'a> {
    #[serde(borrow)]
    content: Text<'a>,
    // The rest is boxed: most chunks carry none of it (or `null`), and a small message is
    // moved several times while a chunk is parsed.
    #[serde(borrow)]
    reasoning_content: Option<Box<Text<'a>>>,
    /// OpenRouter, Groq (`reasoning_details` repeats it and is not counted).
    #[serde(borrow)]
    reasoning: Option<Box<Text<'a>>>,
    #[serde(borrow)]
    refusal: Option<Box<Text<'a>>>,
    #[serde(borrow)]
    tool_calls: Option<Vec<ToolCall<'a>>>,
    #[serde(borrow)]
    function_call: Option<Box<Function<'a>>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct XGroq {
    usage: Option<ChatUsage>,
}

/// The `usage` object of Chat Completions and its compatible variants (also embeddings).
#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct ChatUsage {
    prompt_tokens: Count,
    completion_tokens: Count,
    prompt_tokens_details: Option<PromptDetails>,
    completion_tokens_details: Option<CompletionDetails>,
    /// DeepSeek.
    prompt_cache_hit_tokens: Count,
    /// Moonshot.
    cached_tokens: Count,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PromptDetails {
    cached_tokens: Count,
    cache_write_tokens: Count,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CompletionDetails {
    reasoning_tokens: Count,
}

impl ChatUsage {
    pub(super) fn to_usage(&self) -> Usage {
        let details = self.prompt_tokens_details.as_ref();
        let cached = details
            .and_then(|d| d.cached_tokens.get())
            .or(self.prompt_cache_hit_tokens.get())
            .or(self.cached_tokens.get());
        Usage {
            input_tokens: self.prompt_tokens.or_zero(),
            cached_input_tokens: cached.unwrap_or(0),
            cache_write_tokens: details.map_or(0, |d| d.cache_write_tokens.or_zero()),
            output_tokens: self.completion_tokens.or_zero(),
            reasoning_tokens: self
                .completion_tokens_details
                .as_ref()
                .map_or(0, |d| d.reasoning_tokens.or_zero()),
            images: 0,
        }
    }
}

/// One streamed chunk (`event: error` marks an in-band error whatever its shape).
pub(super) fn on_event(observed: &mut Observed, event_type: &str, data: &[u8]) -> bool {
    let Ok(document) = from_json::<Document>(data) else {
        if event_type == "error" {
            observed.record_error(String::from_utf8_lossy(data).into_owned());
            return true;
        }
        return false;
    };
    if event_type == "error" && document.error.is_none() {
        observed.record_error(String::from_utf8_lossy(data).into_owned());
    }
    apply(observed, &document);
    true
}

/// A complete non-streamed response (or error) body.
pub(super) fn on_body(observed: &mut Observed, body: &[u8]) -> bool {
    match from_json::<Document>(body) {
        Ok(document) => {
            apply(observed, &document);
            true
        }
        Err(_) => false,
    }
}

fn apply(observed: &mut Observed, document: &Document<'_>) {
    if let Some(message) = document.error.as_deref().and_then(describe_error) {
        observed.record_error(message);
    }
    for choice in document.choices.iter().flatten() {
        for message in [choice.delta.as_ref(), choice.message.as_deref()]
            .into_iter()
            .flatten()
        {
            tally_message(observed, message);
        }
        if let Some(text) = &choice.text {
            text.tally_into(&mut observed.text);
        }
        if choice.finish_reason.is_finish_reason() {
            observed.terminal = true;
        }
        if let Some(usage) = &choice.usage {
            observed.usage = Some(usage.to_usage());
        }
    }
    let top_level = document
        .usage
        .as_deref()
        .or_else(|| document.x_groq.as_ref()?.usage.as_ref());
    if let Some(usage) = top_level {
        observed.usage = Some(usage.to_usage());
    }
}

fn tally_message(observed: &mut Observed, message: &Message<'_>) {
    let tally = &mut observed.text;
    message.content.tally_into(tally);
    let rare = [
        &message.reasoning_content,
        &message.reasoning,
        &message.refusal,
    ];
    rare.into_iter()
        .flatten()
        .for_each(|text| text.tally_into(tally));
    for call in message.tool_calls.iter().flatten() {
        if let Some(function) = &call.function {
            function.arguments.tally_into(tally);
        }
    }
    if let Some(function) = &message.function_call {
        function.arguments.tally_into(tally);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&str]) -> Observed {
        let mut observed = Observed::default();
        for chunk in chunks {
            assert!(on_event(&mut observed, "", chunk.as_bytes()), "{chunk}");
        }
        observed
    }

    #[test]
    fn usage_null_is_ignored_and_final_usage_chunk_wins() {
        let observed = run(&[
            r#"{"choices":[{"delta":{"content":"Hi"},"finish_reason":null}],"usage":null}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"stop"}],"usage":null}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":100,"prompt_tokens_details":{"cached_tokens":2},"completion_tokens_details":{"reasoning_tokens":90}}}"#,
        ]);
        let usage = observed.usage.unwrap();
        assert_eq!((usage.input_tokens, usage.output_tokens), (12, 100));
        assert_eq!((usage.cached_input_tokens, usage.reasoning_tokens), (2, 90));
        assert!(observed.terminal);
        assert_eq!(observed.text.chars(), 2);
    }

    #[test]
    fn cached_tokens_fall_back_to_deepseek_then_moonshot_fields() {
        let deepseek = run(&[r#"{"usage":{"prompt_tokens":563,"prompt_cache_hit_tokens":512}}"#]);
        assert_eq!(deepseek.usage.unwrap().cached_input_tokens, 512);
        let moonshot = run(&[r#"{"usage":{"prompt_tokens":90,"cached_tokens":64}}"#]);
        assert_eq!(moonshot.usage.unwrap().cached_input_tokens, 64);
        let both = run(&[
            r#"{"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":5},"prompt_cache_hit_tokens":7}}"#,
        ]);
        assert_eq!(both.usage.unwrap().cached_input_tokens, 5);
    }

    #[test]
    fn cache_write_tokens_are_read() {
        let observed = run(&[
            r#"{"usage":{"prompt_tokens":10,"prompt_tokens_details":{"cached_tokens":0,"cache_write_tokens":8}}}"#,
        ]);
        assert_eq!(observed.usage.unwrap().cache_write_tokens, 8);
    }

    #[test]
    fn moonshot_usage_inside_the_choice() {
        let observed = run(&[
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop","usage":{"prompt_tokens":19,"completion_tokens":13,"total_tokens":32}}]}"#,
        ]);
        assert_eq!(observed.usage.unwrap().total_tokens(), 32);
    }

    #[test]
    fn x_groq_usage_is_a_fallback_only() {
        let fallback = run(&[
            r#"{"choices":[],"x_groq":{"usage":{"prompt_tokens":5,"completion_tokens":6}}}"#,
        ]);
        assert_eq!(fallback.usage.unwrap().total_tokens(), 11);
        let both = run(&[
            r#"{"x_groq":{"usage":{"prompt_tokens":1,"completion_tokens":1}},"usage":{"prompt_tokens":5,"completion_tokens":6}}"#,
        ]);
        assert_eq!(both.usage.unwrap().total_tokens(), 11);
    }

    #[test]
    fn error_chunk_is_reported_and_its_usage_still_counts() {
        let observed = run(&[
            r#"{"error":{"code":400,"message":"Token limit reached"},"choices":[{"delta":{"content":""},"finish_reason":null}],"usage":{"prompt_tokens":43,"completion_tokens":10,"completion_tokens_details":{"reasoning_tokens":11}}}"#,
        ]);
        assert_eq!(
            observed.in_band_error.as_deref(),
            Some("400: Token limit reached")
        );
        let usage = observed.usage.unwrap();
        assert_eq!((usage.output_tokens, usage.reasoning_tokens), (10, 11));
    }

    #[test]
    fn error_event_with_unexpected_payload_is_still_an_error() {
        let mut observed = Observed::default();
        assert!(on_event(&mut observed, "error", b"upstream overloaded"));
        assert_eq!(
            observed.in_band_error.as_deref(),
            Some("upstream overloaded")
        );
    }

    #[test]
    fn text_of_content_reasoning_tools_and_legacy_completions_is_tallied() {
        let observed = run(&[
            r#"{"choices":[{"delta":{"reasoning_content":"ab","content":null}}]}"#,
            r#"{"choices":[{"delta":{"reasoning":"cd"}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"f","arguments":"{\"x\":1}"}}]}}]}"#,
            r#"{"choices":[{"text":"efg","index":0,"finish_reason":null}]}"#,
            r#"{"choices":[{"delta":{"content":[{"type":"text","text":"hi"}]}}]}"#,
        ]);
        assert_eq!(observed.text.chars(), 2 + 2 + 7 + 3 + 2);
        assert!(!observed.terminal);
        assert_eq!(observed.usage, None);
    }

    #[test]
    fn null_everywhere_is_tolerated() {
        let observed = run(&[
            r#"{"choices":null,"usage":null,"x_groq":null,"error":null}"#,
            r#"{"choices":[{"delta":null,"message":null,"finish_reason":null,"usage":null}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":null,"content":null}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"function":null}]}}]}"#,
        ]);
        assert_eq!(observed, Observed::default());
    }

    #[test]
    fn non_json_is_refused() {
        let mut observed = Observed::default();
        assert!(!on_event(&mut observed, "", b"<html>"));
        assert!(!on_body(&mut observed, b"[1,2"));
    }
}
