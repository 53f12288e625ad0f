//! Removal of the usage chunk the filter itself asked for.
//!
//! When a client streams an OpenAI-compatible chat completion without
//! `stream_options.include_usage`, the filter sets it so the provider reports usage (see
//! `crate::request`). The provider then sends one extra event the client never asked for:
//! `data: {..., "choices": [], "usage": {...}}`. [`InjectedUsageStripper`] removes exactly
//! that event from the bytes forwarded to the client, so the client sees what it would have
//! seen without the filter. The meter reads the original bytes, before stripping.
//!
//! The stream is cut into blocks, each ending with a blank line (the SSE event boundary,
//! with CRLF, LF or lone CR line ends). A complete block is forwarded at once unless it
//! carries exactly one event whose data is a JSON object with `choices: []` and a `usage`
//! object; then it is dropped (with the LF of a CRLF blank line split across chunks).
//! Only the current incomplete block is held back, and at most `max_event_bytes` of it:
//! a longer block cannot be judged (the meter skips it too) and is forwarded as it comes.
//! At the end of the stream a held block without its blank line is judged as it stands.

use crate::sse::SseParser;
use memchr::memmem::Finder;
use serde_json::Value;
use std::sync::LazyLock;

const BOM: &[u8] = b"\xEF\xBB\xBF";
// Built once: building a searcher costs more than searching one event.
static USAGE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));
static CHOICES_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"choices\""));
static ESCAPE_U00: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\\u00"));
/// The held buffer is shrunk back to this after a large block.
const RETAINED_CAPACITY: usize = 64 * 1024;
/// Smallest accepted cap (the SSE parser's own minimum).
const MIN_HELD_BYTES: usize = 64;

/// Whose an LF is when the previous chunk ended with a CR (a CRLF split across chunks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TrailingCr {
    None,
    /// The CR ended a line inside the current block: the LF belongs to the block.
    InBlock,
    /// The CR ended a forwarded block: the LF is forwarded.
    Forwarded,
    /// The CR ended a dropped block: the LF is dropped with it.
    Dropped,
}

/// Strips the injected usage-only event from a streamed response, chunk by chunk.
#[derive(Debug)]
pub struct InjectedUsageStripper {
    max_held_bytes: usize,
    /// Bytes of the current incomplete block.
    held: Vec<u8>,
    /// The current block outgrew the cap: it is forwarded unjudged until its end.
    oversized: bool,
    /// No byte since the last line end (true at the stream start).
    line_empty: bool,
    trailing_cr: TrailingCr,
    /// No block has been completed yet (where a BOM may stand).
    first_block: bool,
    stripped: u64,
    finished: bool,
}

impl InjectedUsageStripper {
    pub fn new(max_event_bytes: usize) -> Self {
        InjectedUsageStripper {
            max_held_bytes: max_event_bytes.max(MIN_HELD_BYTES),
            held: Vec::new(),
            oversized: false,
            line_empty: true,
            trailing_cr: TrailingCr::None,
            first_block: true,
            stripped: 0,
            finished: false,
        }
    }

    /// Events removed so far.
    pub fn stripped_events(&self) -> u64 {
        self.stripped
    }

    /// Bytes held back; never above `max_event_bytes`.
    pub fn held_bytes(&self) -> usize {
        self.held.len()
    }

    /// Take the next chunk. Returns the bytes to forward in its place, or `None` when they
    /// are the chunk itself. With `end_of_stream` everything still held is released.
    /// Chunks after the end are forwarded untouched.
    pub fn feed(&mut self, chunk: &[u8], end_of_stream: bool) -> Option<Vec<u8>> {
        if self.finished {
            return None;
        }
        let mut out = Vec::with_capacity(self.held.len() + chunk.len());
        let mut changed = !self.held.is_empty();
        let mut block_start = 0;
        let mut pos = 0;
        if chunk.first() == Some(&b'\n') {
            match self.trailing_cr {
                TrailingCr::Forwarded => {
                    out.push(b'\n');
                    (block_start, pos) = (1, 1);
                }
                TrailingCr::Dropped => {
                    changed = true;
                    (block_start, pos) = (1, 1);
                }
                TrailingCr::InBlock => pos = 1,
                TrailingCr::None => {}
            }
        }
        if !chunk.is_empty() {
            self.trailing_cr = TrailingCr::None;
        }
        while let Some(offset) = memchr::memchr2(b'\n', b'\r', &chunk[pos..]) {
            let line_end = pos + offset;
            let blank = self.line_empty && line_end == pos;
            let mut next = line_end + 1;
            let mut cr_at_chunk_end = false;
            if chunk[line_end] == b'\r' {
                match chunk.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => cr_at_chunk_end = true,
                }
            }
            self.line_empty = true;
            pos = next;
            if !blank {
                if cr_at_chunk_end {
                    self.trailing_cr = TrailingCr::InBlock;
                }
                continue;
            }
            let kept = self.close_block(&chunk[block_start..next], &mut out);
            changed |= !kept;
            block_start = next;
            if cr_at_chunk_end {
                self.trailing_cr = if kept {
                    TrailingCr::Forwarded
                } else {
                    TrailingCr::Dropped
                };
            }
        }
        if pos < chunk.len() {
            self.line_empty = false;
        }
        changed |= self.hold_rest(&chunk[block_start..], &mut out);
        if end_of_stream {
            self.finished = true;
            if !self.held.is_empty() {
                changed |= !self.close_block(&[], &mut out);
            }
        }
        changed.then_some(out)
    }

    /// Keep the start of the incomplete block, or forward it when it outgrew the cap.
    /// Returns whether any byte was held back.
    fn hold_rest(&mut self, rest: &[u8], out: &mut Vec<u8>) -> bool {
        if self.oversized {
            out.extend_from_slice(rest);
            return false;
        }
        if self.held.len() + rest.len() > self.max_held_bytes {
            out.append(&mut self.held);
            out.extend_from_slice(rest);
            self.oversized = true;
            self.release_capacity();
            return false;
        }
        self.held.extend_from_slice(rest);
        !rest.is_empty()
    }

    /// The current block ends with `tail`: forward it or drop it. Returns whether it was kept.
    fn close_block(&mut self, tail: &[u8], out: &mut Vec<u8>) -> bool {
        let first_block = std::mem::replace(&mut self.first_block, false);
        if self.oversized || self.held.len() + tail.len() > self.max_held_bytes {
            self.oversized = false;
            out.append(&mut self.held);
            out.extend_from_slice(tail);
            self.release_capacity();
            return true;
        }
        let drop = if self.held.is_empty() {
            is_injected_usage_block(tail, first_block)
        } else {
            self.held.extend_from_slice(tail);
            is_injected_usage_block(&self.held, first_block)
        };
        if drop {
            self.stripped = self.stripped.saturating_add(1);
            let block = if self.held.is_empty() {
                tail
            } else {
                &self.held
            };
            if first_block && block.starts_with(BOM) {
                out.extend_from_slice(BOM);
            }
        } else if self.held.is_empty() {
            out.extend_from_slice(tail);
        } else {
            out.extend_from_slice(&self.held);
        }
        self.held.clear();
        self.release_capacity();
        !drop
    }

    fn release_capacity(&mut self) {
        if self.held.capacity() > RETAINED_CAPACITY {
            self.held.shrink_to(RETAINED_CAPACITY);
        }
    }
}

/// Whether a complete block is exactly one unnamed event whose data is the usage-only
/// chunk: a JSON object with an empty `choices` array and a `usage` object.
fn is_injected_usage_block(block: &[u8], first_block: bool) -> bool {
    // The data of a one-line block is its text after `data:`, so the textual test of the
    // data holds for the block as it stands: content chunks (each says `"usage":null`) are
    // decided without SSE parsing. A longer block may split the JSON across data lines, so
    // it only has to mention the key.
    let one_line = memchr::memchr2(b'\n', b'\r', block.trim_ascii_end()).is_none();
    let may_be = if one_line {
        could_be_usage_only(block)
    } else {
        USAGE_KEY.find(block).is_some() || has_escaped_letter(block)
    };
    if !may_be {
        return false;
    }
    let mut parser = SseParser::new(block.len());
    let mut ignore = |_: crate::sse::SseEvent<'_>| {};
    if !first_block {
        // A BOM counts only at the stream start; a blank line first ends that state.
        parser.feed(b"\n", &mut ignore);
    }
    let mut events = 0u32;
    let mut usage_only = false;
    let mut judge = |event: crate::sse::SseEvent<'_>| {
        events += 1;
        usage_only = event.event_type.is_empty() && is_usage_only_chunk(event.data);
    };
    parser.feed(block, &mut judge);
    parser.finish(&mut judge);
    events == 1 && usage_only
}

fn is_usage_only_chunk(data: &[u8]) -> bool {
    if !could_be_usage_only(data) {
        return false;
    }
    let Ok(Value::Object(chunk)) = serde_json::from_slice::<Value>(data) else {
        return false;
    };
    let no_choices = matches!(chunk.get("choices"), Some(Value::Array(c)) if c.is_empty());
    no_choices && matches!(chunk.get("usage"), Some(Value::Object(_)))
}

/// A textual necessary condition for JSON `text` to be the usage-only chunk: `"choices"`
/// opens an empty array and `"usage"` opens an object. It decides every content chunk of a
/// stream with usage (each carries `"usage":null`) without building a JSON tree.
fn could_be_usage_only(text: &[u8]) -> bool {
    has_escaped_letter(text)
        || (key_then(text, &CHOICES_KEY, b":[]") && key_then(text, &USAGE_KEY, b":{"))
}

/// Whether some occurrence of `key` is followed by `tokens`, each after optional JSON
/// whitespace: a textual necessary condition for the key to hold such a value.
fn key_then(data: &[u8], key: &Finder<'_>, tokens: &[u8]) -> bool {
    key.find_iter(data).any(|at| {
        let mut rest = &data[at + key.needle().len()..];
        tokens.iter().all(|&token| {
            let start = rest
                .iter()
                .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(rest.len());
            match rest[start..].split_first() {
                Some((&first, tail)) if first == token => {
                    rest = tail;
                    true
                }
                _ => false,
            }
        })
    })
}

/// A `\u0061`-`\u007F` escape can spell a key's lower-case letters, which defeats any textual
/// search for the key: such text always goes to the JSON parser. (Escaped accented letters,
/// `\u00e9`, and CJK, `\u4e2d`, cannot, and leave the fast path alone.)
fn has_escaped_letter(text: &[u8]) -> bool {
    ESCAPE_U00
        .find_iter(text)
        .any(|at| matches!(text.get(at + 4), Some(b'6' | b'7')))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const USAGE: &str = r#"{"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#;
    const CONTENT: &str = r#"{"id":"c","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}],"usage":null}"#;

    /// Feed `chunks` in order (the last one ends the stream) and join what is forwarded.
    fn forward(stripper: &mut InjectedUsageStripper, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            match stripper.feed(chunk, last) {
                Some(replacement) => out.extend_from_slice(&replacement),
                None => out.extend_from_slice(chunk),
            }
            assert!(stripper.held_bytes() <= stripper.max_held_bytes);
        }
        out
    }

    fn strip_whole(stream: &[u8]) -> Vec<u8> {
        forward(&mut InjectedUsageStripper::new(1 << 20), &[stream])
    }

    #[test]
    fn the_usage_only_event_is_removed_and_nothing_else() {
        let stream = format!("data: {CONTENT}\n\ndata: {USAGE}\n\ndata: [DONE]\n\n");
        let expected = format!("data: {CONTENT}\n\ndata: [DONE]\n\n");
        let mut stripper = InjectedUsageStripper::new(1024);
        assert_eq!(
            forward(&mut stripper, &[stream.as_bytes()]),
            expected.as_bytes()
        );
        assert_eq!(stripper.stripped_events(), 1);
    }

    #[test]
    fn chunks_ending_on_event_boundaries_are_forwarded_untouched() {
        let mut stripper = InjectedUsageStripper::new(1024);
        let content = format!("data: {CONTENT}\n\n");
        assert_eq!(stripper.feed(content.as_bytes(), false), None);
        assert_eq!(stripper.feed(b": keep-alive\n\n", false), None);
        let usage = format!("data: {USAGE}\n\n");
        assert_eq!(stripper.feed(usage.as_bytes(), false), Some(Vec::new()));
        assert_eq!(stripper.feed(b"data: [DONE]\n\n", true), None);
    }

    #[test]
    fn only_the_incomplete_event_is_held_back() {
        let mut stripper = InjectedUsageStripper::new(1024);
        let got = stripper.feed(b"data: {\"a\":1}\n\ndata: {\"b\"", false);
        assert_eq!(got.as_deref(), Some(&b"data: {\"a\":1}\n\n"[..]));
        assert_eq!(stripper.held_bytes(), 10);
        let got = stripper.feed(b":2}\n\n", false);
        assert_eq!(got.as_deref(), Some(&b"data: {\"b\":2}\n\n"[..]));
        assert_eq!(stripper.held_bytes(), 0);
    }

    #[test]
    fn usage_reported_in_a_choice_or_named_event_is_kept() {
        let kept = [
            r#"data: {"choices":[{"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":1}}"#,
            r#"data: {"choices":[],"usage":null}"#,
            r#"data: {"usage":{"prompt_tokens":1}}"#,
            "event: usage\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}",
        ];
        for block in kept {
            let stream = format!("{block}\n\ndata: [DONE]\n\n");
            assert_eq!(strip_whole(stream.as_bytes()), stream.as_bytes(), "{block}");
        }
    }

    #[test]
    fn the_usage_event_is_recognised_however_its_json_is_spelled() {
        let spelled = [
            r#"{ "choices" : [ ] , "usage" :
            {"prompt_tokens":1} }"#,
            r#"{"usage":{"prompt_tokens":1},"id":"x","choices":[]}"#,
            r#"{"\u0063hoices":[],"\u0075sage":{"prompt_tokens":1}}"#,
            r#"{"choices":{"nested":1},"choices":[],"usage":null,"usage":{}}"#,
            r#"{"\u0063hoices":[],"usage":{"note":"caf\u00e9 \u4e2d"}}"#,
        ];
        for json in spelled {
            let block = format!("data: {}\n\n", json.replace('\n', ""));
            assert!(is_injected_usage_block(block.as_bytes(), false), "{json}");
        }
        let kept = [
            r#"{"choices":[{"delta":{}}],"usage":{"prompt_tokens":1}}"#,
            r#"{"choices":[],"usage":null,"note":"\"usage\":{}"}"#,
            r#"{"choices":[],"usage":[{}]}"#,
            r#"{"choices":[{"delta":{"content":"caf\u00e9"}}],"usage":null}"#,
        ];
        for json in kept {
            let block = format!("data: {json}\n\n");
            assert!(!is_injected_usage_block(block.as_bytes(), false), "{json}");
        }
    }

    #[test]
    fn two_events_in_one_block_are_not_stripped() {
        // A block without a blank line between two data lines is one event for the client.
        let stream = format!("data: {USAGE}\ndata: {USAGE}\n\n");
        assert_eq!(strip_whole(stream.as_bytes()), stream.as_bytes());
    }

    #[test]
    fn crlf_and_lone_cr_streams_split_anywhere() {
        for ending in ["\r\n", "\r", "\n"] {
            let e = ending;
            let stream = format!("data: {CONTENT}{e}{e}data: {USAGE}{e}{e}data: [DONE]{e}{e}");
            let expected = format!("data: {CONTENT}{e}{e}data: [DONE]{e}{e}");
            let bytes = stream.as_bytes();
            for cut in 0..=bytes.len() {
                let mut stripper = InjectedUsageStripper::new(1024);
                let got = forward(&mut stripper, &[&bytes[..cut], &bytes[cut..]]);
                assert_eq!(got, expected.as_bytes(), "{ending:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn final_usage_event_without_blank_line_is_stripped_at_the_end() {
        let stream = format!("data: {CONTENT}\n\ndata: {USAGE}\n");
        let expected = format!("data: {CONTENT}\n\n");
        assert_eq!(strip_whole(stream.as_bytes()), expected.as_bytes());
        let mut stripper = InjectedUsageStripper::new(1024);
        let usage = format!("data: {USAGE}");
        assert_eq!(stripper.feed(usage.as_bytes(), false), Some(Vec::new()));
        assert_eq!(stripper.feed(b"", true), Some(Vec::new()));
        assert_eq!(stripper.stripped_events(), 1);
    }

    #[test]
    fn oversized_events_pass_through_with_bounded_memory() {
        let mut stripper = InjectedUsageStripper::new(256);
        let mut stream = b"data: \"".to_vec();
        let mut out = stripper
            .feed(&stream, false)
            .unwrap_or_else(|| stream.clone());
        for _ in 0..1000 {
            let piece = [b'x'; 100];
            stream.extend_from_slice(&piece);
            let forwarded = stripper.feed(&piece, false);
            out.extend_from_slice(forwarded.as_deref().unwrap_or(&piece));
            assert!(stripper.held_bytes() <= 256);
        }
        let tail = format!("\"\n\ndata: {USAGE}\n\n");
        stream.extend_from_slice(b"\"\n\n");
        out.extend_from_slice(&forward(&mut stripper, &[tail.as_bytes()]));
        assert_eq!(out, stream);
        assert_eq!(stripper.stripped_events(), 1);
    }

    #[test]
    fn a_leading_bom_survives_a_stripped_first_event() {
        let stream = format!("\u{FEFF}data: {USAGE}\n\ndata: [DONE]\n\n");
        assert_eq!(
            strip_whole(stream.as_bytes()),
            "\u{FEFF}data: [DONE]\n\n".as_bytes()
        );
    }

    #[test]
    fn chunks_after_the_end_are_untouched() {
        let mut stripper = InjectedUsageStripper::new(1024);
        assert_eq!(stripper.feed(b"data: 1\n\n", true), None);
        let usage = format!("data: {USAGE}\n\n");
        assert_eq!(stripper.feed(usage.as_bytes(), false), None);
    }

    /// One SSE block of a synthetic stream, and whether it is the injected usage event.
    fn block() -> impl Strategy<Value = (String, bool)> {
        let line_end = prop_oneof![Just("\n"), Just("\r\n"), Just("\r")];
        let body = prop_oneof![
            3 => Just((format!("data: {CONTENT}"), false)),
            1 => Just((format!("data:{USAGE}"), true)),
            1 => Just((format!(": ping\ndata: {USAGE}"), true)),
            1 => Just(("data: [DONE]".to_string(), false)),
            1 => Just((": keep-alive".to_string(), false)),
            1 => Just(("data: {\"choices\":[],\"usage\":null}".to_string(), false)),
            1 => Just(("event: x\ndata: {\"choices\":[],\"usage\":{}}".to_string(), false)),
            1 => "[a-z\u{4e00}-\u{4e10}\"{}:, ]{0,40}".prop_map(|s| (format!("data: {s}"), false)),
        ];
        (body, line_end).prop_map(|((text, is_usage), end)| {
            (format!("{}{end}{end}", text.replace('\n', end)), is_usage)
        })
    }

    proptest! {
        #[test]
        fn forwarded_bytes_are_the_stream_minus_exactly_the_usage_events(
            blocks in prop::collection::vec(block(), 0..12),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
            cap in 200usize..2048,
        ) {
            let stream: String = blocks.iter().map(|(b, _)| b.as_str()).collect();
            let expected: String = blocks.iter().filter(|(_, u)| !u).map(|(b, _)| b.as_str()).collect();
            let bytes = stream.as_bytes();
            let mut offsets: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            offsets.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for cut in offsets {
                chunks.push(&bytes[start..cut]);
                start = cut;
            }
            chunks.push(&bytes[start..]);
            let mut stripper = InjectedUsageStripper::new(cap);
            let got = forward(&mut stripper, &chunks);
            prop_assert_eq!(String::from_utf8_lossy(&got), expected);
            let usage_events = blocks.iter().filter(|(_, u)| *u).count() as u64;
            prop_assert_eq!(stripper.stripped_events(), usage_events);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_stay_bounded(
            bytes in prop::collection::vec(any::<u8>(), 0..600),
            cut in any::<prop::sample::Index>(),
        ) {
            let cut = cut.index(bytes.len() + 1);
            let mut stripper = InjectedUsageStripper::new(64);
            let got = forward(&mut stripper, &[&bytes[..cut], &bytes[cut..]]);
            prop_assert!(got.len() <= bytes.len());
        }
    }
}
