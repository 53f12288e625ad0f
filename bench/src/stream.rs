//! Synthetic OpenAI Chat Completions responses shaped like real ones (field order, ids,
//! `system_fingerprint`, a final usage chunk and `[DONE]`), so parsing costs what it costs
//! on real traffic. Deterministic: the same arguments give the same bytes.

/// Model named in requests and responses.
pub const MODEL: &str = "gpt-4o-mini";
/// Prompt tokens the synthetic responses report.
pub const PROMPT_TOKENS: u64 = 25;

/// Words the content is drawn from; each counts as one token.
const WORDS: [&str; 8] = [
    " the",
    " quick",
    " metering",
    " filter",
    " counts",
    " every",
    " token",
    " twice",
];

/// The streamed answer as separate SSE events (each one body chunk as a provider sends
/// it): `chunks` content chunks of `tokens_per_chunk` words, a finish chunk, a usage
/// chunk and `data: [DONE]`.
pub fn openai_stream_events(chunks: usize, tokens_per_chunk: usize) -> Vec<Vec<u8>> {
    let head = r#"data: {"id":"chatcmpl-BnchMrk7Qh2x9ZyLm4Np0WsTv","object":"chat.completion.chunk","created":1760000000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_b376dfbbd5","choices":[{"index":0,"delta":{"#;
    let mut events = Vec::with_capacity(chunks + 3);
    let mut word = 0;
    for i in 0..chunks {
        let mut content = String::new();
        for _ in 0..tokens_per_chunk {
            content.push_str(WORDS[word % WORDS.len()]);
            word += 1;
        }
        let role = if i == 0 { r#""role":"assistant","# } else { "" };
        events.push(
            format!(
                r#"{head}{role}"content":"{content}"}},"logprobs":null,"finish_reason":null}}],"usage":null}}"#
            )
            .into_bytes(),
        );
    }
    events.push(
        format!(r#"{head}}},"logprobs":null,"finish_reason":"stop"}}],"usage":null}}"#)
            .into_bytes(),
    );
    let completion = chunks * tokens_per_chunk;
    events.push(
        format!(
            r#"data: {{"id":"chatcmpl-BnchMrk7Qh2x9ZyLm4Np0WsTv","object":"chat.completion.chunk","created":1760000000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_b376dfbbd5","choices":[],"usage":{{"prompt_tokens":{PROMPT_TOKENS},"completion_tokens":{completion},"total_tokens":{total},"prompt_tokens_details":{{"cached_tokens":0,"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}}}}"#,
            total = completion as u64 + PROMPT_TOKENS
        )
        .into_bytes(),
    );
    events.push(b"data: [DONE]".to_vec());
    for event in &mut events {
        event.extend_from_slice(b"\n\n");
    }
    events
}

/// A non-streamed chat completion with `completion_tokens` words of content.
pub fn openai_json_body(completion_tokens: usize) -> Vec<u8> {
    let content: String = (0..completion_tokens)
        .map(|i| WORDS[i % WORDS.len()])
        .collect::<String>();
    format!(
        r#"{{"id":"chatcmpl-BnchMrk7Qh2x9ZyLm4Np0WsTv","object":"chat.completion","created":1760000000,"model":"gpt-4o-mini-2024-07-18","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}","refusal":null,"annotations":[]}},"logprobs":null,"finish_reason":"stop"}}],"usage":{{"prompt_tokens":{PROMPT_TOKENS},"completion_tokens":{completion_tokens},"total_tokens":{total},"prompt_tokens_details":{{"cached_tokens":0,"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}},"service_tier":"default","system_fingerprint":"fp_b376dfbbd5"}}"#,
        total = completion_tokens as u64 + PROMPT_TOKENS
    )
    .into_bytes()
}

/// The request body the load generators send.
pub fn chat_request_body(stream: bool, max_tokens: u64) -> String {
    format!(
        r#"{{"model":"{MODEL}","stream":{stream},"max_tokens":{max_tokens},"messages":[{{"role":"system","content":"You are terse."}},{{"role":"user","content":"Say something about metering in one paragraph."}}]}}"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_meter_filter::format::ProviderFormat;
    use llm_meter_filter::meter::{MeterLimits, ResponseMeter};

    #[test]
    fn synthetic_stream_meters_to_its_declared_usage() {
        let events = openai_stream_events(100, 3);
        assert_eq!(events.len(), 103);
        let mut meter =
            ResponseMeter::new(ProviderFormat::OpenAiChat, true, MeterLimits::default());
        for event in &events {
            meter.feed(event);
        }
        meter.finish();
        let report = meter.report();
        let usage = report.usage.expect("usage chunk parsed");
        assert_eq!(usage.output_tokens, 300);
        assert_eq!(usage.input_tokens, PROMPT_TOKENS);
        assert!(report.terminal_seen);
        assert_eq!(report.unparsed_events, 0);
    }

    #[test]
    fn synthetic_body_meters_to_its_declared_usage() {
        let mut meter =
            ResponseMeter::new(ProviderFormat::OpenAiChat, false, MeterLimits::default());
        meter.feed(&openai_json_body(300));
        meter.finish();
        let usage = meter.report().usage.expect("usage parsed");
        assert_eq!(usage.output_tokens, 300);
    }

    #[test]
    fn request_body_is_json() {
        let body: serde_json::Value =
            serde_json::from_str(&chat_request_body(true, 300)).expect("valid JSON");
        assert_eq!(body["stream"], true);
    }
}
