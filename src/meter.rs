//! Metering of one response body.
//!
//! API (used by the host glue and `lifecycle`):
//!
//! ```ignore
//! let mut meter = ResponseMeter::new(format, streaming, MeterLimits::default());
//! meter.feed(chunk);          // every body chunk exactly as received, any boundary
//! meter.finish();             // end_of_stream: flushes a trailing partial event / parses JSON
//! let report = meter.report(); // callable at any time (e.g. client disconnect mid-stream)
//! ```
//!
//! - `streaming`: true when the response is `text/event-stream` (or the request asked to
//!   stream). The body itself decides when it is unambiguous: a body whose first
//!   significant byte is `{` or `[` is JSON (an error answer to a streaming request), one
//!   starting with `:` is SSE.
//! - SSE bodies are parsed incrementally with memory bounded by
//!   [`MeterLimits::max_event_bytes`]; JSON bodies are buffered up to
//!   [`MeterLimits::max_json_body_bytes`] and parsed by [`ResponseMeter::finish`] (a larger
//!   body is dropped and flagged `body_too_large`).
//! - [`MeterReport::usage`] is what the provider reported, with each format's rules applied
//!   (see `crate::usage`), figures as reported (no clamping). It is `None` when the provider
//!   reported no token usage; then `estimated_output_tokens` (from the text seen, see
//!   `crate::estimate`) is the output figure to settle with `estimated = true`. While
//!   `terminal_seen` is false the usage may be interim (Anthropic's `message_start` says 1
//!   output token): for a partial call prefer `max(usage.output_tokens, estimated_output_tokens)`.
//! - [`MeterReport::images`] counts generated images even when `usage` is `None`; when
//!   `usage` is present its `images` field carries the same count.

use llm_meter_protocol::Usage;

use crate::format::ProviderFormat;
use crate::sse::SseParser;
use crate::usage::UsageExtractor;

/// Default cap on one SSE event (streamed partial images can be a few MiB).
pub const DEFAULT_MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;
/// Default cap on a buffered non-streamed body.
pub const DEFAULT_MAX_JSON_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Leading whitespace held while deciding between SSE and JSON, at most.
const MAX_UNDECIDED_BYTES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeterLimits {
    /// Longest SSE event kept; longer events are skipped and counted.
    pub max_event_bytes: usize,
    /// Longest non-streamed body buffered for parsing.
    pub max_json_body_bytes: usize,
}

impl Default for MeterLimits {
    fn default() -> Self {
        MeterLimits {
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            max_json_body_bytes: DEFAULT_MAX_JSON_BODY_BYTES,
        }
    }
}

/// What is known about a response so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeterReport {
    /// As reported by the provider (final/cumulative rules applied); `None` if it reported none.
    pub usage: Option<Usage>,
    /// Generated characters seen (content, reasoning, tool-call arguments).
    pub output_chars_seen: u64,
    /// Output tokens estimated from the text seen.
    pub estimated_output_tokens: u64,
    /// `[DONE]`, `message_stop`, `response.completed`, a finish reason, a parsed JSON body...
    pub terminal_seen: bool,
    /// An error reported inside a 200 response (or the message of an error body).
    pub in_band_error: Option<String>,
    /// Images in an image generation response.
    pub images: u64,
    /// SSE events dropped for exceeding `max_event_bytes`.
    pub oversized_events: u64,
    /// Events or bodies that were not JSON of the expected shape.
    pub unparsed_events: u64,
    /// The non-streamed body exceeded `max_json_body_bytes` and was not parsed.
    pub body_too_large: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Only whitespace (or a BOM) seen so far.
    Undecided,
    Sse,
    Json,
}

/// Metering state of one response body.
#[derive(Debug)]
pub struct ResponseMeter {
    streaming: bool,
    limits: MeterLimits,
    mode: Mode,
    /// Leading whitespace held while `Undecided`.
    undecided: Vec<u8>,
    sse: SseParser,
    body: Vec<u8>,
    body_too_large: bool,
    extractor: UsageExtractor,
    finished: bool,
}

impl ResponseMeter {
    pub fn new(format: ProviderFormat, streaming: bool, limits: MeterLimits) -> Self {
        let sse = SseParser::new(limits.max_event_bytes)
            .with_implicit_boundaries(format == ProviderFormat::DashScopeNative);
        ResponseMeter {
            streaming,
            limits,
            mode: Mode::Undecided,
            undecided: Vec::new(),
            sse,
            body: Vec::new(),
            body_too_large: false,
            extractor: UsageExtractor::new(format),
            finished: false,
        }
    }

    /// Feed the next body chunk, exactly as received. Chunks after `finish` are ignored.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.finished || chunk.is_empty() {
            return;
        }
        if self.mode == Mode::Undecided {
            self.decide(chunk);
            return;
        }
        self.feed_decided(chunk);
    }

    /// The body ended (end_of_stream).
    pub fn finish(&mut self) {
        if self.finished {
            return;
        }
        if self.mode == Mode::Undecided {
            self.mode = if self.streaming {
                Mode::Sse
            } else {
                Mode::Json
            };
            let held = std::mem::take(&mut self.undecided);
            self.feed_decided(&held);
        }
        match self.mode {
            Mode::Sse => {
                let extractor = &mut self.extractor;
                self.sse.finish(&mut |event| extractor.on_event(event));
            }
            Mode::Json if !self.body_too_large => self.extractor.on_body(&self.body),
            _ => {}
        }
        self.body = Vec::new();
        self.finished = true;
    }

    /// What is known so far.
    pub fn report(&self) -> MeterReport {
        let observed = self.extractor.observed();
        MeterReport {
            usage: observed.usage,
            output_chars_seen: observed.text.chars(),
            estimated_output_tokens: observed.text.tokens(),
            terminal_seen: observed.terminal,
            in_band_error: observed.in_band_error.clone(),
            images: observed.images,
            oversized_events: self.sse.oversized_events(),
            unparsed_events: observed.unparsed,
            body_too_large: self.body_too_large,
        }
    }

    /// Bytes held for parsing: a partial SSE event, leading whitespace, or a JSON body.
    /// At most `max_event_bytes`, 4 KiB and `max_json_body_bytes` respectively.
    pub fn buffered_bytes(&self) -> usize {
        self.sse.buffered_bytes() + self.undecided.len() + self.body.len()
    }

    /// Pick SSE or JSON from the first significant byte; hold leading whitespace until then.
    fn decide(&mut self, chunk: &[u8]) {
        let significant = chunk
            .iter()
            .find(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n' | 0xEF | 0xBB | 0xBF));
        let Some(&first) = significant else {
            if self.undecided.len() + chunk.len() <= MAX_UNDECIDED_BYTES {
                self.undecided.extend_from_slice(chunk);
                return;
            }
            self.mode = if self.streaming {
                Mode::Sse
            } else {
                Mode::Json
            };
            self.flush_undecided(chunk);
            return;
        };
        self.mode = match first {
            b'{' | b'[' => Mode::Json,
            b':' => Mode::Sse,
            _ if self.streaming => Mode::Sse,
            _ => Mode::Json,
        };
        self.flush_undecided(chunk);
    }

    fn flush_undecided(&mut self, chunk: &[u8]) {
        let held = std::mem::take(&mut self.undecided);
        self.feed_decided(&held);
        self.feed_decided(chunk);
    }

    fn feed_decided(&mut self, chunk: &[u8]) {
        match self.mode {
            Mode::Sse => {
                let extractor = &mut self.extractor;
                self.sse.feed(chunk, &mut |event| extractor.on_event(event));
            }
            Mode::Json => self.buffer_body(chunk),
            Mode::Undecided => {}
        }
    }

    fn buffer_body(&mut self, chunk: &[u8]) {
        if self.body_too_large {
            return;
        }
        if self.body.len() + chunk.len() > self.limits.max_json_body_bytes {
            self.body_too_large = true;
            self.body = Vec::new();
            return;
        }
        self.body.extend_from_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter_all(format: ProviderFormat, streaming: bool, chunks: &[&[u8]]) -> MeterReport {
        let mut meter = ResponseMeter::new(format, streaming, MeterLimits::default());
        for chunk in chunks {
            meter.feed(chunk);
        }
        meter.finish();
        meter.report()
    }

    #[test]
    fn report_is_available_mid_stream() {
        let mut meter =
            ResponseMeter::new(ProviderFormat::OpenAiChat, true, MeterLimits::default());
        meter.feed(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"Hello there\"}}]}\n\ndata: {\"cho",
        );
        let report = meter.report();
        assert_eq!(report.usage, None);
        assert_eq!(report.output_chars_seen, 11);
        assert_eq!(report.estimated_output_tokens, 3);
        assert!(!report.terminal_seen);
    }

    #[test]
    fn json_error_answer_to_a_streaming_request_is_read_as_json() {
        let body = br#"  {"error":{"message":"bad","type":"invalid_request_error","code":"unsupported_parameter"}}"#;
        let report = meter_all(ProviderFormat::OpenAiChat, true, &[&body[..3], &body[3..]]);
        assert_eq!(
            report.in_band_error.as_deref(),
            Some("unsupported_parameter: bad")
        );
        assert_eq!(report.usage, None);
    }

    #[test]
    fn sse_comment_first_is_read_as_sse_even_if_not_flagged_streaming() {
        let body = b": keepalive\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
        let report = meter_all(ProviderFormat::OpenAiChat, false, &[body]);
        assert_eq!(report.usage.map(|u| u.total_tokens()), Some(3));
        assert!(report.terminal_seen);
    }

    #[test]
    fn json_body_split_into_many_callbacks_is_parsed_at_finish() {
        let body = br#"{"choices":[{"message":{"content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":8,"completion_tokens":1}}"#;
        let chunks: Vec<&[u8]> = body.chunks(7).collect();
        let mut meter =
            ResponseMeter::new(ProviderFormat::OpenAiChat, false, MeterLimits::default());
        for chunk in &chunks {
            meter.feed(chunk);
        }
        assert_eq!(meter.report().usage, None, "nothing before finish");
        meter.finish();
        assert_eq!(meter.report().usage.map(|u| u.total_tokens()), Some(9));
        assert!(meter.report().terminal_seen);
    }

    #[test]
    fn json_body_over_the_limit_is_flagged_not_buffered() {
        let limits = MeterLimits {
            max_event_bytes: 1024,
            max_json_body_bytes: 64,
        };
        let mut meter = ResponseMeter::new(ProviderFormat::OpenAiChat, false, limits);
        meter.feed(b"{\"choices\":[");
        for _ in 0..100 {
            meter.feed(b"{\"message\":{\"content\":\"xxxxxxxx\"}},");
        }
        meter.finish();
        let report = meter.report();
        assert!(report.body_too_large);
        assert_eq!(report.usage, None);
        assert!(meter.body.capacity() <= 64);
    }

    #[test]
    fn whitespace_only_body_reports_nothing() {
        let report = meter_all(ProviderFormat::Anthropic, true, &[b"\r\n", b"  "]);
        assert_eq!(report, MeterReport::default());
    }

    #[test]
    fn stream_without_terminal_is_reported_as_such() {
        let report = meter_all(
            ProviderFormat::OpenAiChat,
            true,
            &[b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n"],
        );
        assert!(!report.terminal_seen);
        assert_eq!(report.output_chars_seen, 3);
    }

    #[test]
    fn chunks_after_finish_are_ignored() {
        let mut meter =
            ResponseMeter::new(ProviderFormat::OpenAiChat, true, MeterLimits::default());
        meter.feed(b"data: [DONE]\n\n");
        meter.finish();
        let before = meter.report();
        meter.feed(b"data: {\"usage\":{\"prompt_tokens\":5}}\n\n");
        meter.finish();
        assert_eq!(meter.report(), before);
    }

    const ALL_FORMATS: [ProviderFormat; 7] = [
        ProviderFormat::OpenAiChat,
        ProviderFormat::OpenAiResponses,
        ProviderFormat::OpenAiEmbeddings,
        ProviderFormat::OpenAiImages,
        ProviderFormat::Anthropic,
        ProviderFormat::Gemini,
        ProviderFormat::DashScopeNative,
    ];

    /// Bytes that look like SSE/JSON often enough to reach the parsers' deeper paths.
    fn sse_like_bytes() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let pieces = prop_oneof![
            Just(b"data: ".to_vec()),
            Just(b"data:".to_vec()),
            Just(b"event: error\n".to_vec()),
            Just(b"id:1\n".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b"\n\n".to_vec()),
            Just(b"\r".to_vec()),
            Just(b": c\n".to_vec()),
            Just(br#"{"usage":{"prompt_tokens":-1,"input_tokens":1e30,"output_tokens":"7"}}"#.to_vec()),
            Just(br#"{"choices":[{"delta":{"content":"\u00e9\ud83d"},"finish_reason":"null"}]}"#.to_vec()),
            Just(br#"{"type":"message_delta","usage":{"iterations":[{"input_tokens":18446744073709551615}]}}"#.to_vec()),
            Just(b"[DONE]".to_vec()),
            Just("米饭👋".as_bytes().to_vec()),
            proptest::collection::vec(any::<u8>(), 0..16),
        ];
        proptest::collection::vec(pieces, 0..40).prop_map(|p| p.concat())
    }

    proptest::proptest! {
        #[test]
        fn any_input_any_format_never_panics_and_chunking_is_irrelevant(
            body in sse_like_bytes(),
            cut in proptest::prelude::any::<usize>(),
            streaming in proptest::prelude::any::<bool>(),
        ) {
            for format in ALL_FORMATS {
                let limits = MeterLimits { max_event_bytes: 128, max_json_body_bytes: 256 };
                let mut whole = ResponseMeter::new(format, streaming, limits);
                whole.feed(&body);
                whole.finish();
                let cut = cut % (body.len() + 1);
                let mut split = ResponseMeter::new(format, streaming, limits);
                split.feed(&body[..cut]);
                let _ = split.report();
                split.feed(&body[cut..]);
                split.finish();
                proptest::prop_assert_eq!(whole.report(), split.report());
            }
        }
    }
}
