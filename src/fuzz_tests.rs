//! Long random runs over hostile input: the stable-toolchain stand-in for `cargo fuzz`.
//!
//! Every target mutates seeds (the files of `tests/fuzz-corpus/`, the hand-written fixtures
//! of `tests/fixtures/` and the recorded fixtures of `../shared/fixtures`, required under
//! `CI=true`) and checks that nothing panics, that memory stays within the configured caps
//! and that chunk boundaries change nothing.
//!
//! `cargo test` runs a few hundred cases per target. `make fuzz` runs them long:
//! `PROPTEST_CASES` sets the cases per target and `FUZZ_SECONDS` bounds each target's time.
//! A failure prints the shrunk input and writes it to `target/fuzz-failures/`: add it to
//! `tests/fuzz-corpus/` so every later run replays it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestError, TestRunner};
use serde_json::Value;

use crate::config::Config;
use crate::format::ProviderFormat;
use crate::meter::{MeterLimits, ResponseMeter};
use crate::request::{self, RequestHints, MAX_CHOICES, MAX_MODEL_CHARS, MAX_OUTPUT_TOKENS};
use crate::sse::{SseEvent, SseParser, LINE_OVERHEAD_BYTES};
use crate::strip::InjectedUsageStripper;
use crate::usage::UsageExtractor;

const DEFAULT_CASES: u64 = 200;
/// Leading whitespace the meter holds while deciding between SSE and JSON, at most.
const MAX_UNDECIDED_BYTES: usize = 4096;

const FORMATS: [ProviderFormat; 7] = [
    ProviderFormat::OpenAiChat,
    ProviderFormat::OpenAiResponses,
    ProviderFormat::OpenAiEmbeddings,
    ProviderFormat::OpenAiImages,
    ProviderFormat::Anthropic,
    ProviderFormat::Gemini,
    ProviderFormat::DashScopeNative,
];

/// Fragments that steer mutations into the parsers' interesting paths.
const DICTIONARY: &[&[u8]] = &[
    b"data: ",
    b"data:",
    b"event: error\n",
    b"event: message_delta\n",
    b"id:7\n",
    b": c\n",
    b"\n\n",
    b"\r\n\r\n",
    b"\r",
    b"\n",
    b"\xEF\xBB\xBF",
    b"\x00",
    b"\xFF\xFE",
    b"\xC3",
    b"\\ud800",
    b"{",
    b"}",
    b"[",
    b"]",
    b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    b"\"",
    b",",
    b":",
    b"null",
    b"-1",
    b"1.5",
    b"1e999",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}",
    b"\"choices\":[]",
    b"\"model\":",
    b"\"max_tokens\":",
    b"\"n\":",
    b"\"stream\":true",
    b"\"stream_options\":{\"include_usage\":true}",
    b"[DONE]",
];

/// Raw bytes whose `Debug` is a readable byte string, not a list of numbers.
#[derive(Clone)]
struct Bytes(Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b\"{}\" ({} bytes)", self.0.escape_ascii(), self.0.len())
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Overwrite(Index, u8),
    InsertWord(Index, Index),
    InsertRandom(Index, Vec<u8>),
    Remove(Index, usize),
    Duplicate(Index, usize, Index),
    Truncate(Index),
    /// Paste a piece of another seed.
    Splice(Index, Index, usize, Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), any::<u8>()).prop_map(|(at, b)| Mutation::Overwrite(at, b)),
        (any::<Index>(), any::<Index>()).prop_map(|(at, w)| Mutation::InsertWord(at, w)),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::InsertRandom(at, bytes)),
        (any::<Index>(), 1usize..64).prop_map(|(at, len)| Mutation::Remove(at, len)),
        (any::<Index>(), 1usize..256, any::<Index>())
            .prop_map(|(from, len, to)| Mutation::Duplicate(from, len, to)),
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), any::<Index>(), 1usize..512, any::<Index>())
            .prop_map(|(seed, from, len, to)| Mutation::Splice(seed, from, len, to)),
    ]
}

fn apply(seeds: &[Vec<u8>], mut bytes: Vec<u8>, mutation: &Mutation) -> Vec<u8> {
    let at = |index: &Index, bytes: &Vec<u8>| index.index(bytes.len() + 1);
    match mutation {
        Mutation::Overwrite(index, byte) => {
            if !bytes.is_empty() {
                let i = index.index(bytes.len());
                bytes[i] = *byte;
            }
        }
        Mutation::InsertWord(index, word) => {
            let i = at(index, &bytes);
            let word = DICTIONARY[word.index(DICTIONARY.len())];
            bytes.splice(i..i, word.iter().copied());
        }
        Mutation::InsertRandom(index, random) => {
            let i = at(index, &bytes);
            bytes.splice(i..i, random.iter().copied());
        }
        Mutation::Remove(index, len) => {
            let i = at(index, &bytes);
            bytes.drain(i..(i + len).min(bytes.len()));
        }
        Mutation::Duplicate(from, len, to) => {
            let start = at(from, &bytes);
            let piece = bytes[start..(start + len).min(bytes.len())].to_vec();
            let i = at(to, &bytes);
            bytes.splice(i..i, piece);
        }
        Mutation::Truncate(index) => {
            let i = at(index, &bytes);
            bytes.truncate(i);
        }
        Mutation::Splice(seed, from, len, to) => {
            let other = &seeds[seed.index(seeds.len())];
            let start = from.index(other.len() + 1);
            let piece = &other[start..(start + len).min(other.len())];
            let i = at(to, &bytes);
            bytes.splice(i..i, piece.iter().copied());
        }
    }
    bytes
}

/// A seed (sometimes none) with a few mutations applied.
fn input(seeds: &'static [Vec<u8>]) -> impl Strategy<Value = Bytes> {
    let mutated = (any::<Index>(), prop::collection::vec(mutation(), 0..6)).prop_map(
        move |(seed, mutations)| {
            let start = seeds[seed.index(seeds.len())].clone();
            Bytes(
                mutations
                    .iter()
                    .fold(start, |bytes, m| apply(seeds, bytes, m)),
            )
        },
    );
    prop_oneof![
        12 => mutated,
        1 => prop::collection::vec(any::<u8>(), 0..1024).prop_map(Bytes),
    ]
}

/// Chunks of `bytes` cut at the given points.
fn chunks<'a>(bytes: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let mut offsets: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
    offsets.sort_unstable();
    let mut out = Vec::with_capacity(offsets.len() + 1);
    let mut start = 0;
    for cut in offsets {
        out.push(&bytes[start..cut]);
        start = cut;
    }
    out.push(&bytes[start..]);
    out
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.trim().parse().ok()
}

/// Run `test` on cases of `strategy` until `PROPTEST_CASES` cases ran or `FUZZ_SECONDS`
/// passed; a failure is shrunk, saved and reported.
fn fuzz<S>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: fmt::Debug,
{
    let cases = env_u64("PROPTEST_CASES").unwrap_or(DEFAULT_CASES);
    let deadline = env_u64("FUZZ_SECONDS").map(|s| Instant::now() + Duration::from_secs(s));
    let config = RunnerConfig {
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..RunnerConfig::default()
    };
    let mut runner = TestRunner::new(config);
    let mut ran = 0;
    while ran < cases && deadline.is_none_or(|d| Instant::now() < d) {
        let tree = match strategy.new_tree(&mut runner) {
            Ok(tree) => tree,
            Err(reason) => panic!("{name}: cannot generate a case: {reason}"),
        };
        let failure = match runner.run_one(tree, &test) {
            Ok(_) => None,
            Err(TestError::Fail(reason, value)) => Some((reason.to_string(), value)),
            Err(TestError::Abort(reason)) => panic!("{name}: aborted: {reason}"),
        };
        if let Some((reason, value)) = failure {
            let saved = save_failure(name, &format!("{value:#?}"));
            panic!("{name} failed after {ran} cases: {reason}\nminimal input (saved to {saved}):\n{value:#?}");
        }
        ran += 1;
    }
    eprintln!("fuzz {name}: {ran} cases passed");
}

fn save_failure(name: &str, text: &str) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
    let path = dir.join(format!("{name}.txt"));
    match std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, text)) {
        Ok(()) => path.display().to_string(),
        Err(err) => format!("nowhere: {err}"),
    }
}

fn read_dir_files(dir: &Path) -> Vec<Vec<u8>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e != "md"))
        .collect();
    paths.sort();
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn repo_dir(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Response bodies: the SSE/JSON corpus and every fixture.
fn response_seeds() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut seeds = read_dir_files(&repo_dir("tests/fuzz-corpus/sse"));
        seeds.extend(read_dir_files(&repo_dir("tests/fixtures")));
        let recorded = repo_dir("../shared/fixtures");
        if recorded.is_dir() {
            seeds.extend(read_dir_files(&recorded));
        } else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "recorded fixtures missing at {} (required under CI=true)",
                recorded.display()
            );
        }
        seeds
    })
}

fn request_seeds() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| read_dir_files(&repo_dir("tests/fuzz-corpus/request")))
}

#[test]
fn corpus_folders_are_not_empty() {
    assert!(response_seeds().len() >= 15);
    assert!(request_seeds().len() >= 15);
}

/// Events of a whole byte stream (with an unreachable cap), as owned values.
fn events_of(parser: &mut SseParser, chunks: &[&[u8]]) -> Vec<(String, Vec<u8>, u32)> {
    let mut events = Vec::new();
    let mut collect = |e: SseEvent<'_>| {
        events.push((e.event_type.to_string(), e.data.to_vec(), e.data_lines));
    };
    for chunk in chunks {
        parser.feed(chunk, &mut collect);
    }
    parser.finish(&mut collect);
    events
}

#[test]
fn fuzz_sse_parser() {
    let strategy = (
        input(response_seeds()),
        prop::collection::vec(any::<Index>(), 0..8),
        64usize..4096,
        any::<bool>(),
    );
    fuzz(
        "sse_parser",
        strategy,
        |(Bytes(bytes), cuts, cap, implicit)| {
            let new = || SseParser::new(cap).with_implicit_boundaries(implicit);
            let mut parser = new();
            let mut events = Vec::new();
            let mut collect = |e: SseEvent<'_>| {
                assert!(e.data.len() <= cap, "event of {} bytes", e.data.len());
                events.push((e.event_type.to_string(), e.data.to_vec(), e.data_lines));
            };
            for chunk in chunks(&bytes, &cuts) {
                parser.feed(chunk, &mut collect);
                prop_assert!(
                    parser.buffered_bytes() <= cap + LINE_OVERHEAD_BYTES,
                    "{}",
                    parser.buffered_bytes()
                );
            }
            parser.finish(&mut collect);
            prop_assert!(parser.buffered_bytes() <= cap + LINE_OVERHEAD_BYTES);
            let whole = events_of(&mut new(), &[&bytes]);
            prop_assert_eq!(events, whole, "chunking changed the events");
            Ok(())
        },
    );
}

#[test]
fn fuzz_response_meter_and_usage_extractors() {
    let strategy = (
        input(response_seeds()),
        prop::collection::vec(any::<Index>(), 0..8),
        any::<Index>(),
        any::<bool>(),
        1024usize..65536,
        1024usize..65536,
    );
    fuzz(
        "response_meter",
        strategy,
        |(Bytes(bytes), cuts, format, streaming, max_event_bytes, max_json_body_bytes)| {
            let format = FORMATS[format.index(FORMATS.len())];
            let limits = MeterLimits {
                max_event_bytes,
                max_json_body_bytes,
            };
            let bound = max_event_bytes.max(max_json_body_bytes)
                + MAX_UNDECIDED_BYTES
                + LINE_OVERHEAD_BYTES;
            let mut split = ResponseMeter::new(format, streaming, limits);
            for chunk in chunks(&bytes, &cuts) {
                split.feed(chunk);
                prop_assert!(
                    split.buffered_bytes() <= bound,
                    "{}",
                    split.buffered_bytes()
                );
                let _ = split.report();
            }
            split.finish();
            prop_assert_eq!(split.buffered_bytes(), 0);
            let mut whole = ResponseMeter::new(format, streaming, limits);
            whole.feed(&bytes);
            whole.finish();
            prop_assert_eq!(
                split.report(),
                whole.report(),
                "chunking changed the report"
            );
            // The extractors straight on the bytes, whatever their size.
            let mut extractor = UsageExtractor::new(format);
            extractor.on_body(&bytes);
            extractor.on_event(SseEvent {
                event_type: "message_delta",
                data: &bytes,
                data_lines: 2,
            });
            Ok(())
        },
    );
}

const PATHS: [&str; 9] = [
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/images/generations",
    "/v1/messages",
    "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
    "/api/v1/services/aigc/text-generation/generation",
    "/api/v1/services/aigc/text2image/image-synthesis",
    "/api/v1/apps/abc/completion",
];

#[test]
fn fuzz_request_parser() {
    let strategy = (
        input(request_seeds()),
        any::<Index>(),
        any::<Index>(),
        any::<[bool; 3]>(),
    );
    fuzz(
        "request_parser",
        strategy,
        |(Bytes(body), format, path, [sse, accept, inject])| {
            let format = FORMATS[format.index(FORMATS.len())];
            let hints = RequestHints {
                path: PATHS[path.index(PATHS.len())],
                dashscope_sse: sse,
                accepts_event_stream: accept,
            };
            match request::parse_request(format, &hints, &body, inject) {
                Ok(parsed) => check_parsed(format, &body, &parsed)?,
                Err(err) => {
                    prop_assert!(matches!(err.http_status(), 400 | 413));
                    prop_assert!(!err.to_string().is_empty());
                }
            }
            // Header values and the plugin configuration come from outside too.
            let text = String::from_utf8_lossy(&body);
            let _ = request::identify_caller(Some(&text), Some(&text));
            let _ = request::identify_caller(None, Some(&text));
            let _ = request::check_declared_length(Some(&text), 1024);
            let _ = Config::parse(&body);
            Ok(())
        },
    );
}

fn check_parsed(
    format: ProviderFormat,
    body: &[u8],
    parsed: &request::ParsedRequest,
) -> Result<(), TestCaseError> {
    let request = &parsed.request;
    let model = &request.model;
    prop_assert!(!model.is_empty() && model.chars().count() <= MAX_MODEL_CHARS);
    prop_assert!(!model.chars().any(|c| c.is_whitespace() || c.is_control()));
    let cap = request.max_output_tokens.unwrap_or(0);
    prop_assert!(cap <= MAX_OUTPUT_TOKENS * MAX_CHOICES, "cap {}", cap);
    let images = request.requested_images.unwrap_or(1);
    prop_assert!((1..=MAX_CHOICES).contains(&images), "images {}", images);
    let Some(rewritten) = &parsed.rewritten_body else {
        return Ok(());
    };
    prop_assert_eq!(format, ProviderFormat::OpenAiChat);
    let original: Value = serde_json::from_slice(body).unwrap();
    let Ok(Value::Object(mut rewritten)) = serde_json::from_slice::<Value>(rewritten) else {
        return Err(TestCaseError::fail("rewritten body is not a JSON object"));
    };
    let Value::Object(mut original) = original else {
        return Err(TestCaseError::fail("accepted a body that is not an object"));
    };
    let options = rewritten.remove("stream_options");
    prop_assert_eq!(
        options.as_ref().and_then(|o| o.get("include_usage")),
        Some(&Value::Bool(true))
    );
    original.remove("stream_options");
    prop_assert_eq!(original, rewritten, "the rewrite changed other members");
    Ok(())
}

/// The stream's events minus the usage-only ones, as a client parser sees them.
fn events_without_usage(bytes: &[u8]) -> Vec<(String, Vec<u8>, u32)> {
    events_of(&mut SseParser::new(usize::MAX / 2), &[bytes])
        .into_iter()
        .filter(|(event_type, data, _)| !(event_type.is_empty() && is_usage_only(data)))
        .collect()
}

fn is_usage_only(data: &[u8]) -> bool {
    let Ok(Value::Object(chunk)) = serde_json::from_slice::<Value>(data) else {
        return false;
    };
    matches!(chunk.get("choices"), Some(Value::Array(c)) if c.is_empty())
        && matches!(chunk.get("usage"), Some(Value::Object(_)))
}

fn strip(stripper: &mut InjectedUsageStripper, chunks: &[&[u8]], cap: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let forwarded = stripper.feed(chunk, i + 1 == chunks.len());
        out.extend_from_slice(forwarded.as_deref().unwrap_or(chunk));
        assert!(
            stripper.held_bytes() <= cap,
            "{} held",
            stripper.held_bytes()
        );
    }
    out
}

#[test]
fn fuzz_usage_chunk_stripper() {
    let strategy = (
        input(response_seeds()),
        prop::collection::vec(any::<Index>(), 0..8),
        64usize..4096,
    );
    fuzz("usage_stripper", strategy, |(Bytes(bytes), cuts, cap)| {
        let pieces = chunks(&bytes, &cuts);
        let bounded = strip(&mut InjectedUsageStripper::new(cap), &pieces, cap);
        prop_assert!(bounded.len() <= bytes.len());
        let unbounded_cap = bytes.len() + 64;
        let mut stripper = InjectedUsageStripper::new(unbounded_cap);
        let forwarded = strip(&mut stripper, &pieces, unbounded_cap);
        let whole = strip(
            &mut InjectedUsageStripper::new(unbounded_cap),
            &[&bytes],
            unbounded_cap,
        );
        prop_assert!(forwarded == whole, "chunking changed the forwarded bytes");
        // A BOM after the start is not one for the client, but would become one if the
        // events before it were removed: such streams are only checked for the above.
        let mid_stream_bom =
            memchr::memmem::find(bytes.get(1..).unwrap_or_default(), b"\xEF\xBB\xBF");
        if mid_stream_bom.is_none() {
            prop_assert_eq!(
                events_without_usage(&forwarded),
                events_without_usage(&bytes)
            );
            let removed = events_of(&mut SseParser::new(usize::MAX / 2), &[&bytes]).len()
                - events_of(&mut SseParser::new(usize::MAX / 2), &[&forwarded]).len();
            prop_assert_eq!(removed as u64, stripper.stripped_events());
        }
        Ok(())
    });
}

#[test]
fn recorded_usage_streams_lose_exactly_their_usage_chunk() {
    let with_usage_chunk: Vec<&Vec<u8>> = response_seeds()
        .iter()
        .filter(|seed| {
            events_of(&mut SseParser::new(1 << 20), &[seed])
                .iter()
                .any(|(t, data, _)| t.is_empty() && is_usage_only(data))
        })
        .collect();
    assert!(!with_usage_chunk.is_empty());
    for seed in with_usage_chunk {
        let mut meter =
            ResponseMeter::new(ProviderFormat::OpenAiChat, true, MeterLimits::default());
        let mut stripper = InjectedUsageStripper::new(1 << 20);
        let mut forwarded = Vec::new();
        for chunk in seed.chunks(37) {
            meter.feed(chunk);
            let out = stripper.feed(chunk, false);
            forwarded.extend_from_slice(out.as_deref().unwrap_or(chunk));
        }
        forwarded.extend(stripper.feed(&[], true).unwrap_or_default());
        meter.finish();
        assert!(
            meter.report().usage.is_some(),
            "the meter still reads the usage"
        );
        assert_eq!(stripper.stripped_events(), 1);
        assert_eq!(events_without_usage(&forwarded), events_without_usage(seed));
        let mut client =
            ResponseMeter::new(ProviderFormat::OpenAiChat, true, MeterLimits::default());
        client.feed(&forwarded);
        client.finish();
        let report = client.report();
        assert!(report.usage.is_none() || report.usage != meter.report().usage);
        assert_eq!(report.output_chars_seen, meter.report().output_chars_seen);
    }
}
