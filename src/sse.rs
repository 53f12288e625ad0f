//! Incremental Server-Sent Events parser with bounded memory.
//!
//! Bytes are fed exactly as they arrive; a chunk may end anywhere (inside a line, a field
//! name, a CRLF pair or a UTF-8 character). The parser works on bytes only: it never
//! decodes text, so a split UTF-8 character is simply reassembled with its line. Complete
//! events are handed to a callback with their data borrowed from the parser's buffer.
//!
//! Framing follows the WHATWG SSE rules: lines end in CRLF, LF or a lone CR; `:` starts a
//! comment; `field: value` with one optional space after the colon; data lines of one event
//! are joined with `\n`; a blank line dispatches the event; a leading UTF-8 BOM is dropped.
//! Two deliberate additions:
//! - [`SseParser::finish`] dispatches a last event that lacks its closing blank line
//!   (providers and proxies sometimes omit it; a metering filter must not lose the usage).
//! - With [`SseParser::with_implicit_boundaries`], an `id:` or `event:` line that follows a
//!   `data:` line starts a new event. Used for DashScope native streams, which some captures
//!   show without blank lines between events.
//!
//! Memory: the current event's data never exceeds `max_event_bytes`, and the partial line
//! adds at most [`LINE_OVERHEAD_BYTES`] (a data line's `data: ` prefix, or the head of
//! another line: only its first bytes can matter). Allocated capacity is shrunk back to
//! 64 KiB after a large event. An event whose data would exceed the cap is skipped (its
//! bytes are discarded as they arrive) and counted in [`SseParser::oversized_events`].
//! The cap applies to the joined data, so where chunks are cut never changes the events.

/// One dispatched event. `data` holds the joined `data:` lines (not necessarily UTF-8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// Value of the `event:` field; empty when the event had none (the spec's "message").
    pub event_type: &'a str,
    pub data: &'a [u8],
    /// Number of `data:` lines joined into `data`.
    pub data_lines: u32,
}

/// Smallest accepted cap.
const MIN_EVENT_BYTES: usize = 64;
/// Longest `event:` value kept; longer names cannot match any known type anyway.
const MAX_EVENT_TYPE_BYTES: usize = 128;
/// What a partial line may hold beyond the cap: a BOM, `event: ` and the longest kept
/// event type (a data line's BOM and `data: ` prefix is shorter).
pub const LINE_OVERHEAD_BYTES: usize = BOM.len() + b"event: ".len() + MAX_EVENT_TYPE_BYTES;
/// Enough of a line to tell a data line (and its prefix) from any other.
const CLASSIFY_BYTES: usize = 16;
/// Buffers grown by one large event are shrunk back to this after it is dispatched.
const RETAINED_CAPACITY: usize = 64 * 1024;
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// What the start of a line says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineKind {
    /// Too short to tell (a prefix of an optional BOM and `data`).
    Undetermined,
    /// A `data` field whose value starts after `prefix` bytes.
    Data { prefix: usize },
    /// A comment or another field: only its head matters.
    Other,
}

/// The partial line held across chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartialLine {
    /// Its bytes so far are in `partial_line`.
    Open,
    /// Not a data line and longer than its head: the head is kept, the rest ignored.
    Truncated,
    /// A data line that overflowed the cap: its event is already marked oversized and
    /// the rest of the line is ignored.
    Consumed,
}

#[derive(Debug)]
pub struct SseParser {
    max_event_bytes: usize,
    implicit_boundaries: bool,
    /// Bytes of a line whose end has not arrived yet.
    partial_line: Vec<u8>,
    partial_state: PartialLine,
    /// The previous chunk ended with CR: an LF at the start of the next one ends no line.
    pending_cr: bool,
    /// No line has been completed yet (where a BOM may stand).
    at_stream_start: bool,
    data: Vec<u8>,
    data_lines: u32,
    event_type: Vec<u8>,
    /// The current event outgrew the cap: it is dropped at its end.
    event_oversized: bool,
    oversized_events: u64,
}

impl SseParser {
    pub fn new(max_event_bytes: usize) -> Self {
        SseParser {
            max_event_bytes: max_event_bytes.max(MIN_EVENT_BYTES),
            implicit_boundaries: false,
            partial_line: Vec::new(),
            partial_state: PartialLine::Open,
            pending_cr: false,
            at_stream_start: true,
            data: Vec::new(),
            data_lines: 0,
            event_type: Vec::new(),
            event_oversized: false,
            oversized_events: 0,
        }
    }

    /// Treat an `id:` or `event:` line after a `data:` line as the start of a new event.
    pub fn with_implicit_boundaries(mut self, enabled: bool) -> Self {
        self.implicit_boundaries = enabled;
        self
    }

    /// Events skipped because they exceeded `max_event_bytes`.
    pub fn oversized_events(&self) -> u64 {
        self.oversized_events
    }

    /// Bytes currently held (partial line + current event data); never above
    /// `max_event_bytes + LINE_OVERHEAD_BYTES`.
    pub fn buffered_bytes(&self) -> usize {
        self.partial_line.len() + self.data.len()
    }

    /// Feed the next chunk; `on_event` is called for every event it completes.
    pub fn feed(&mut self, chunk: &[u8], on_event: &mut impl FnMut(SseEvent<'_>)) {
        let mut rest = chunk;
        if self.pending_cr && !rest.is_empty() {
            self.pending_cr = false;
            if let Some(after_lf) = rest.strip_prefix(b"\n") {
                rest = after_lf;
            }
        }
        while let Some(end) = memchr::memchr2(b'\n', b'\r', rest) {
            let (line, tail) = rest.split_at(end);
            rest = match tail {
                [b'\r', b'\n', after @ ..] => after,
                [b'\r'] => {
                    self.pending_cr = true;
                    &[]
                }
                [_, after @ ..] => after,
                [] => &[],
            };
            self.complete_line(line, on_event);
        }
        self.keep_partial(rest);
    }

    /// The body ended: a last line without terminator and a last event without its blank
    /// line are processed as if they had been terminated.
    pub fn finish(&mut self, on_event: &mut impl FnMut(SseEvent<'_>)) {
        if !self.partial_line.is_empty() || self.partial_state != PartialLine::Open {
            self.complete_line(&[], on_event);
        }
        self.pending_cr = false;
        self.dispatch(on_event);
    }

    /// Hold the start of a line whose end has not arrived, as little of it as matters.
    fn keep_partial(&mut self, bytes: &[u8]) {
        if bytes.is_empty() || self.partial_state != PartialLine::Open {
            return;
        }
        let total = self.partial_line.len() + bytes.len();
        match self.classify(&self.line_head(bytes)) {
            LineKind::Undetermined => self.partial_line.extend_from_slice(bytes),
            LineKind::Data { prefix } => {
                if self.data_overflows(total - prefix) {
                    self.overflow_data_line();
                    self.partial_line.clear();
                    self.partial_state = PartialLine::Consumed;
                } else {
                    self.partial_line.extend_from_slice(bytes);
                }
            }
            LineKind::Other => {
                let room = LINE_OVERHEAD_BYTES.saturating_sub(self.partial_line.len());
                self.partial_line
                    .extend_from_slice(&bytes[..bytes.len().min(room)]);
                if total > LINE_OVERHEAD_BYTES {
                    self.partial_state = PartialLine::Truncated;
                }
            }
        }
    }

    /// The first bytes of the held partial line followed by `more`.
    fn line_head(&self, more: &[u8]) -> Vec<u8> {
        self.partial_line
            .iter()
            .chain(more)
            .take(CLASSIFY_BYTES)
            .copied()
            .collect()
    }

    fn classify(&self, head: &[u8]) -> LineKind {
        let body = if self.at_stream_start {
            if BOM.starts_with(head) {
                return LineKind::Undetermined;
            }
            head.strip_prefix(BOM).unwrap_or(head)
        } else {
            head
        };
        if b"data".starts_with(body) {
            return LineKind::Undetermined;
        }
        match body.strip_prefix(b"data:") {
            Some(value) => LineKind::Data {
                prefix: head.len() - body.len() + 5 + usize::from(value.first() == Some(&b' ')),
            },
            None => LineKind::Other,
        }
    }

    /// Whether appending a data value of `value_len` bytes would exceed the cap.
    fn data_overflows(&self, value_len: usize) -> bool {
        if self.event_oversized {
            return true;
        }
        let separator = usize::from(self.data_lines > 0);
        self.data.len() + separator + value_len > self.max_event_bytes
    }

    /// A data line too long for the cap: its event is lost (as `append_data` would decide).
    fn overflow_data_line(&mut self) {
        self.data_lines = self.data_lines.saturating_add(1);
        self.event_oversized = true;
        self.data.clear();
    }

    fn complete_line(&mut self, tail: &[u8], on_event: &mut impl FnMut(SseEvent<'_>)) {
        match self.partial_state {
            PartialLine::Consumed => {}
            PartialLine::Truncated => self.process_partial(&[], on_event),
            PartialLine::Open if self.partial_line.is_empty() => self.process_line(tail, on_event),
            PartialLine::Open => {
                let total = self.partial_line.len() + tail.len();
                match self.classify(&self.line_head(tail)) {
                    LineKind::Data { prefix } if self.data_overflows(total - prefix) => {
                        self.overflow_data_line();
                        self.partial_line.clear();
                    }
                    LineKind::Other if total > LINE_OVERHEAD_BYTES => {
                        let room = LINE_OVERHEAD_BYTES.saturating_sub(self.partial_line.len());
                        self.process_partial(&tail[..tail.len().min(room)], on_event);
                    }
                    _ => self.process_partial(tail, on_event),
                }
            }
        }
        self.partial_state = PartialLine::Open;
        self.at_stream_start = false;
    }

    /// Process the held partial line followed by `tail`, then keep its buffer for reuse.
    fn process_partial(&mut self, tail: &[u8], on_event: &mut impl FnMut(SseEvent<'_>)) {
        let mut line = std::mem::take(&mut self.partial_line);
        line.extend_from_slice(tail);
        self.process_line(&line, on_event);
        line.clear();
        self.partial_line = line;
    }

    fn strip_bom<'l>(&self, line: &'l [u8]) -> &'l [u8] {
        if self.at_stream_start {
            line.strip_prefix(BOM).unwrap_or(line)
        } else {
            line
        }
    }

    fn process_line(&mut self, line: &[u8], on_event: &mut impl FnMut(SseEvent<'_>)) {
        let line = self.strip_bom(line);
        if line.is_empty() {
            self.dispatch(on_event);
            return;
        }
        if line.first() == Some(&b':') {
            return; // comment
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(colon) => {
                let (field, rest) = line.split_at(colon);
                let value = rest.get(1..).unwrap_or_default();
                (field, value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match field {
            b"data" => self.append_data(value),
            b"event" => {
                if self.implicit_boundaries && self.has_data() {
                    self.dispatch(on_event);
                }
                self.event_type.clear();
                self.event_type
                    .extend_from_slice(&value[..value.len().min(MAX_EVENT_TYPE_BYTES)]);
            }
            b"id" if self.implicit_boundaries && self.has_data() => self.dispatch(on_event),
            _ => {} // id, retry and unknown fields carry nothing we meter
        }
    }

    fn has_data(&self) -> bool {
        self.data_lines > 0 || self.event_oversized
    }

    fn append_data(&mut self, value: &[u8]) {
        if self.data_overflows(value.len()) {
            self.overflow_data_line();
            return;
        }
        if self.data_lines > 0 {
            self.data.push(b'\n');
        }
        self.data_lines = self.data_lines.saturating_add(1);
        self.data.extend_from_slice(value);
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(SseEvent<'_>)) {
        if self.event_oversized {
            self.oversized_events = self.oversized_events.saturating_add(1);
        } else if self.data_lines > 0 {
            on_event(SseEvent {
                event_type: std::str::from_utf8(&self.event_type).unwrap_or_default(),
                data: &self.data,
                data_lines: self.data_lines,
            });
        }
        self.data.clear();
        self.data_lines = 0;
        self.event_type.clear();
        self.event_oversized = false;
        if self.data.capacity() > RETAINED_CAPACITY {
            self.data.shrink_to(RETAINED_CAPACITY);
        }
        if self.partial_line.capacity() > RETAINED_CAPACITY {
            self.partial_line.shrink_to(RETAINED_CAPACITY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Owned {
        event_type: String,
        data: String,
        data_lines: u32,
    }

    fn parse_chunks(parser: &mut SseParser, chunks: &[&[u8]]) -> Vec<Owned> {
        let mut out = Vec::new();
        let mut collect = |ev: SseEvent<'_>| {
            out.push(Owned {
                event_type: ev.event_type.to_string(),
                data: String::from_utf8(ev.data.to_vec()).unwrap(),
                data_lines: ev.data_lines,
            })
        };
        for chunk in chunks {
            parser.feed(chunk, &mut collect);
        }
        parser.finish(&mut collect);
        out
    }

    fn parse(input: &[u8]) -> Vec<Owned> {
        parse_chunks(&mut SseParser::new(1 << 20), &[input])
    }

    fn ev(event_type: &str, data: &str) -> Owned {
        Owned {
            event_type: event_type.into(),
            data: data.into(),
            data_lines: data.split('\n').count() as u32,
        }
    }

    fn every_split(input: &[u8]) {
        let whole = parse(input);
        for cut in 0..=input.len() {
            let (a, b) = input.split_at(cut);
            let got = parse_chunks(&mut SseParser::new(1 << 20), &[a, b]);
            assert_eq!(got, whole, "split at {cut}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(parse_chunks(&mut SseParser::new(1 << 20), &bytes), whole);
    }

    #[test]
    fn basic_events_with_and_without_space() {
        let got = parse(b"data: {\"a\":1}\n\ndata:{\"b\":2}\n\n");
        assert_eq!(got, vec![ev("", "{\"a\":1}"), ev("", "{\"b\":2}")]);
    }

    #[test]
    fn only_one_leading_space_is_removed() {
        assert_eq!(parse(b"data:  x\n\n"), vec![ev("", " x")]);
    }

    #[test]
    fn lf_crlf_and_lone_cr_line_endings_are_equivalent() {
        let lf = parse(b"event: a\ndata: 1\n\nevent: b\ndata: 2\n\n");
        assert_eq!(lf, vec![ev("a", "1"), ev("b", "2")]);
        assert_eq!(
            parse(b"event: a\r\ndata: 1\r\n\r\nevent: b\r\ndata: 2\r\n\r\n"),
            lf
        );
        assert_eq!(parse(b"event: a\rdata: 1\r\revent: b\rdata: 2\r\r"), lf);
        assert_eq!(parse(b"event: a\r\ndata: 1\n\revent: b\rdata: 2\r\n\n"), lf);
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_end() {
        let mut parser = SseParser::new(1024);
        let got = parse_chunks(&mut parser, &[b"data: 1\r", b"\ndata: 2\r", b"\n\r", b"\n"]);
        assert_eq!(got, vec![ev("", "1\n2")]);
    }

    #[test]
    fn every_chunk_boundary_gives_the_same_events() {
        every_split(
            b"event: x\r\ndata: {\"t\":\"\xE4\xBD\xA0\xE5\xA5\xBD\"}\r\n\r\n: c\rdata:[DONE]\n\n",
        );
        every_split(b"\xEF\xBB\xBFid:1\nevent:result\n:HTTP_STATUS/200\ndata:{\"x\":\"\xF0\x9F\x91\x8B\"}\n\n");
    }

    #[test]
    fn utf8_split_inside_a_character_is_reassembled() {
        let text = "data: {\"t\":\"米饭👋\"}\n\n".as_bytes();
        let cut = text.iter().position(|&b| b >= 0x80).unwrap() + 1;
        let got = parse_chunks(&mut SseParser::new(1024), &[&text[..cut], &text[cut..]]);
        assert_eq!(got, vec![ev("", "{\"t\":\"米饭👋\"}")]);
    }

    #[test]
    fn comments_ids_and_retry_are_ignored() {
        let got =
            parse(b": OPENROUTER PROCESSING\n\n:HTTP_STATUS/200\nid: 7\nretry: 10\ndata: x\n\n");
        assert_eq!(got, vec![ev("", "x")]);
    }

    #[test]
    fn multiple_data_lines_join_with_newline() {
        let got = parse(b"data: {\"a\":\ndata: 1}\n\n");
        assert_eq!(got, vec![ev("", "{\"a\":\n1}")]);
        assert_eq!(got[0].data_lines, 2);
    }

    #[test]
    fn event_without_data_is_not_dispatched_and_type_resets() {
        let got = parse(b"event: ping\n\ndata: 1\n\n");
        assert_eq!(got, vec![ev("", "1")]);
    }

    #[test]
    fn empty_data_line_dispatches_empty_data() {
        assert_eq!(parse(b"data\n\n"), vec![ev("", "")]);
    }

    #[test]
    fn last_event_without_blank_line_is_flushed_at_finish() {
        assert_eq!(parse(b"data: 1\n\ndata: 2"), vec![ev("", "1"), ev("", "2")]);
        assert_eq!(parse(b"event: e\ndata: 3\r\n"), vec![ev("e", "3")]);
        assert_eq!(parse(b"data: 4\r"), vec![ev("", "4")]);
    }

    #[test]
    fn leading_bom_is_dropped_only_at_stream_start() {
        let got = parse(b"\xEF\xBB\xBFdata: 1\n\n");
        assert_eq!(got, vec![ev("", "1")]);
        let got = parse_chunks(
            &mut SseParser::new(64),
            &[b"\xEF", b"\xBB", b"\xBFdata: 1\n\n"],
        );
        assert_eq!(got, vec![ev("", "1")]);
    }

    #[test]
    fn implicit_boundaries_split_events_lacking_blank_lines() {
        let input = b"id:1\nevent:result\n:HTTP_STATUS/200\ndata:{\"n\":1}\nid:2\nevent:result\ndata:{\"n\":2}\nid:3\nevent:error\ndata:{\"n\":3}\n";
        let strict = parse(input);
        assert_eq!(strict.len(), 1, "strict SSE merges them");
        let got = parse_chunks(
            &mut SseParser::new(1024).with_implicit_boundaries(true),
            &[&input[..]],
        );
        assert_eq!(
            got,
            vec![
                ev("result", "{\"n\":1}"),
                ev("result", "{\"n\":2}"),
                ev("error", "{\"n\":3}")
            ]
        );
    }

    #[test]
    fn oversized_event_is_skipped_counted_and_memory_stays_bounded() {
        let cap = 256;
        let mut parser = SseParser::new(cap);
        let mut got = Vec::new();
        let mut collect = |ev: SseEvent<'_>| got.push(ev.data.to_vec());
        parser.feed(b"data: small\n\nevent: big\ndata: ", &mut collect);
        for _ in 0..10_000 {
            parser.feed(&[b'x'; 100], &mut collect);
            assert!(parser.buffered_bytes() <= cap + LINE_OVERHEAD_BYTES);
        }
        parser.feed(
            b"\ndata: more of the big event\n\ndata: after\n\n",
            &mut collect,
        );
        parser.finish(&mut collect);
        assert_eq!(got, vec![b"small".to_vec(), b"after".to_vec()]);
        assert_eq!(parser.oversized_events(), 1);
    }

    #[test]
    fn many_data_lines_exceeding_the_cap_skip_the_event() {
        let mut parser = SseParser::new(100);
        let mut input = Vec::new();
        for _ in 0..50 {
            input.extend_from_slice(b"data: 0123456789\n");
        }
        input.extend_from_slice(b"\ndata: ok\n\n");
        let got = parse_chunks(&mut parser, &[&input]);
        assert_eq!(got, vec![ev("", "ok")]);
        assert_eq!(parser.oversized_events(), 1);
    }

    #[test]
    fn oversized_comment_does_not_drop_the_event() {
        let mut parser = SseParser::new(64);
        let mut input = b"data: keep\n: ".to_vec();
        input.extend_from_slice(&[b'c'; 500]);
        input.extend_from_slice(b"\n\n");
        let got = parse_chunks(&mut parser, &[&input[..10], &input[10..]]);
        assert_eq!(got, vec![ev("", "keep")]);
        assert_eq!(parser.oversized_events(), 0);
    }

    #[test]
    fn oversized_line_within_one_chunk_is_skipped() {
        let mut parser = SseParser::new(64);
        let mut input = b"data: ".to_vec();
        input.extend_from_slice(&[b'y'; 1000]);
        input.extend_from_slice(b"\n\ndata: ok\n\n");
        let got = parse_chunks(&mut parser, &[&input]);
        assert_eq!(got, vec![ev("", "ok")]);
        assert_eq!(parser.oversized_events(), 1);
    }

    #[test]
    fn oversized_partial_line_at_finish_is_counted() {
        let mut parser = SseParser::new(64);
        let mut input = b"data: ".to_vec();
        input.extend_from_slice(&[b'z'; 1000]);
        let got = parse_chunks(&mut parser, &[&input[..30], &input[30..]]);
        assert!(got.is_empty());
        assert_eq!(parser.oversized_events(), 1);
    }

    #[test]
    fn events_near_the_cap_do_not_depend_on_chunking() {
        // The cap counts the joined data, not the `data: ` prefix nor a BOM, however the
        // line is cut; a long event name keeps its first 128 bytes either way.
        let cap = 64;
        let long_type = "t".repeat(300);
        for value_len in [cap - 2, cap, cap + 1] {
            let value = "v".repeat(value_len);
            let input = format!("\u{FEFF}event: {long_type}\ndata: {value}\n\ndata: ok\n\n");
            let whole = parse_chunks(&mut SseParser::new(cap), &[input.as_bytes()]);
            if value_len <= cap {
                assert_eq!(whole.len(), 2);
                assert_eq!(whole[0].event_type, "t".repeat(128));
            } else {
                assert_eq!(whole, vec![ev("", "ok")]);
            }
            let bytes = input.as_bytes();
            for cut in 0..=bytes.len() {
                let got = parse_chunks(&mut SseParser::new(cap), &[&bytes[..cut], &bytes[cut..]]);
                assert_eq!(got, whole, "value {value_len}, cut at {cut}");
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let junk: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        let mut parser = SseParser::new(64);
        let _ = parse_chunks(&mut parser, &[&junk[..1234], &junk[1234..]]);
        assert!(parser.buffered_bytes() <= 64 + LINE_OVERHEAD_BYTES);
    }
}
