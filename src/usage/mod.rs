//! Usage extraction from provider responses, one file per provider family.
//!
//! [`UsageExtractor`] receives complete SSE events (from [`crate::sse`]) or a complete JSON
//! body and accumulates what the provider reported in [`Observed`]: the usage (with each
//! format's final/cumulative rules applied), the terminal signal, an in-band error, the
//! number of images and a tally of the generated text (for estimation when no usage comes).
//!
//! Parsing is typed and borrowed: only the fields we meter are deserialised, strings borrow
//! from the event unless they contain escapes, and everything else is skipped by serde.
//! Every field tolerates `null`, absence and odd number encodings, so one strange value
//! never costs a whole event.

mod anthropic;
mod dashscope;
mod gemini;
mod openai_chat;
mod openai_media;
mod openai_responses;
mod wire;

#[cfg(test)]
mod corpus_tests;

use llm_meter_protocol::Usage;

use crate::estimate::TextTally;
use crate::format::ProviderFormat;
use crate::sse::SseEvent;

/// Longest in-band error message kept (bytes, cut at a character boundary).
const MAX_ERROR_MESSAGE_BYTES: usize = 512;

/// What the provider reported so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Provider-reported usage, figures kept as reported (no clamping).
    pub usage: Option<Usage>,
    /// The response's own end marker was seen (`[DONE]`, a finish reason, `message_stop`, ...).
    pub terminal: bool,
    /// The first in-band error (`event: error`, an `error` object in a chunk, an error body).
    pub in_band_error: Option<String>,
    /// Images produced (image generation).
    pub images: u64,
    /// Generated text seen: content, reasoning, tool-call arguments.
    pub text: TextTally,
    /// Events (or bodies) that were not JSON of the expected shape.
    pub unparsed: u64,
}

impl Observed {
    fn record_error(&mut self, message: String) {
        if self.in_band_error.is_none() {
            self.in_band_error = Some(truncate_message(message));
        }
    }
}

/// Per-format extraction state for one response.
#[derive(Debug, Clone)]
pub struct UsageExtractor {
    format: ProviderFormat,
    observed: Observed,
    anthropic: anthropic::Counts,
}

impl UsageExtractor {
    pub fn new(format: ProviderFormat) -> Self {
        UsageExtractor {
            format,
            observed: Observed::default(),
            anthropic: anthropic::Counts::default(),
        }
    }

    pub fn observed(&self) -> &Observed {
        &self.observed
    }

    /// One complete SSE event. When the joined data of a multi-line event is not JSON, each
    /// line is tried as a document of its own (captures that lost their blank lines).
    pub fn on_event(&mut self, event: SseEvent<'_>) {
        let data = event.data.trim_ascii();
        if self.on_document(event.event_type, data) {
            return;
        }
        if event.data_lines > 1 {
            for line in data.split(|&b| b == b'\n') {
                let line = line.trim_ascii();
                if !line.is_empty() && !self.on_document(event.event_type, line) {
                    self.observed.unparsed += 1;
                }
            }
            return;
        }
        self.observed.unparsed += 1;
    }

    /// A complete non-streamed body (already within the size limit).
    pub fn on_body(&mut self, body: &[u8]) {
        let body = strip_bom(body).trim_ascii();
        if body.is_empty() {
            return;
        }
        let parsed = match self.format {
            ProviderFormat::OpenAiChat => openai_chat::on_body(&mut self.observed, body),
            ProviderFormat::OpenAiResponses => openai_responses::on_body(&mut self.observed, body),
            ProviderFormat::OpenAiEmbeddings => {
                openai_media::on_embeddings_body(&mut self.observed, body)
            }
            ProviderFormat::OpenAiImages => openai_media::on_images_body(&mut self.observed, body),
            ProviderFormat::Anthropic => {
                anthropic::on_body(&mut self.observed, &mut self.anthropic, body)
            }
            ProviderFormat::Gemini => gemini::on_body(&mut self.observed, body),
            ProviderFormat::DashScopeNative => dashscope::on_body(&mut self.observed, body),
        };
        if parsed {
            self.observed.terminal = true;
        } else {
            self.observed.unparsed += 1;
        }
    }

    /// One JSON document of a stream; false when it is not JSON of the expected shape.
    fn on_document(&mut self, event_type: &str, data: &[u8]) -> bool {
        if data.is_empty() {
            return true;
        }
        if data == b"[DONE]" {
            self.observed.terminal = true;
            return true;
        }
        let observed = &mut self.observed;
        match self.format {
            ProviderFormat::OpenAiChat => openai_chat::on_event(observed, event_type, data),
            ProviderFormat::OpenAiResponses => {
                openai_responses::on_event(observed, event_type, data)
            }
            ProviderFormat::OpenAiEmbeddings => openai_media::on_embeddings_body(observed, data),
            ProviderFormat::OpenAiImages => {
                openai_media::on_images_event(observed, event_type, data)
            }
            ProviderFormat::Anthropic => {
                anthropic::on_event(observed, &mut self.anthropic, event_type, data)
            }
            ProviderFormat::Gemini => gemini::on_event(observed, event_type, data),
            ProviderFormat::DashScopeNative => dashscope::on_event(observed, event_type, data),
        }
    }
}

fn strip_bom(body: &[u8]) -> &[u8] {
    body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body)
}

fn truncate_message(mut message: String) -> String {
    if message.len() > MAX_ERROR_MESSAGE_BYTES {
        let mut cut = MAX_ERROR_MESSAGE_BYTES;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_error_messages_are_cut_at_a_char_boundary() {
        let long = "错".repeat(400);
        let cut = truncate_message(long);
        assert!(cut.len() <= MAX_ERROR_MESSAGE_BYTES);
        assert!(cut.chars().all(|c| c == '错'));
    }

    #[test]
    fn first_in_band_error_is_kept() {
        let mut observed = Observed::default();
        observed.record_error("first".into());
        observed.record_error("second".into());
        assert_eq!(observed.in_band_error.as_deref(), Some("first"));
    }

    #[test]
    fn unparsable_event_is_counted_not_fatal() {
        let mut extractor = UsageExtractor::new(ProviderFormat::OpenAiChat);
        extractor.on_event(SseEvent {
            event_type: "",
            data: b"{not json",
            data_lines: 1,
        });
        assert_eq!(extractor.observed().unparsed, 1);
        assert_eq!(extractor.observed().usage, None);
    }

    #[test]
    fn merged_json_lines_are_tried_one_by_one() {
        let mut extractor = UsageExtractor::new(ProviderFormat::OpenAiChat);
        extractor.on_event(SseEvent {
            event_type: "",
            data: b"{\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n{\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}",
            data_lines: 2,
        });
        let observed = extractor.observed();
        assert_eq!(observed.unparsed, 0);
        assert_eq!(observed.usage.map(|u| u.input_tokens), Some(3));
        assert_eq!(observed.text.chars(), 2);
    }
}
