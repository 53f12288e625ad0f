//! End-to-end parsing of whole response bodies through [`ResponseMeter`]:
//! - every real recording in `../shared/fixtures` (expected figures from its SOURCES.md);
//! - the hand-written fixtures in `tests/fixtures` (so a clone without ../shared tests itself).
//!
//! Each body is fed whole, in random chunks and byte by byte: all must give the same report.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use llm_meter_protocol::Usage;
use proptest::prelude::*;

use crate::estimate::estimate_tokens;
use crate::format::ProviderFormat::{self, *};
use crate::meter::{MeterLimits, MeterReport, ResponseMeter};

/// Fixture cases with the bytes of their file.
type Corpus = Vec<(Case, Vec<u8>)>;

struct Case {
    file: &'static str,
    format: ProviderFormat,
    streaming: bool,
    usage: Option<Usage>,
    images: u64,
    in_band_error: bool,
    terminal: bool,
    /// Generated text the estimate must be computed from, when checked.
    text: Option<&'static str>,
}

/// input, cached, cache_write, output, reasoning.
const fn usage(
    input: u64,
    cached: u64,
    cache_write: u64,
    output: u64,
    reasoning: u64,
) -> Option<Usage> {
    Some(Usage {
        input_tokens: input,
        cached_input_tokens: cached,
        cache_write_tokens: cache_write,
        output_tokens: output,
        reasoning_tokens: reasoning,
        images: 0,
    })
}

const fn case(
    file: &'static str,
    format: ProviderFormat,
    streaming: bool,
    usage: Option<Usage>,
) -> Case {
    Case {
        file,
        format,
        streaming,
        usage,
        images: 0,
        in_band_error: false,
        terminal: true,
        text: None,
    }
}

const fn error(file: &'static str, format: ProviderFormat, streaming: bool) -> Case {
    Case {
        in_band_error: true,
        ..case(file, format, streaming, None)
    }
}

const SSE: bool = true;
const JSON: bool = false;

/// Every recording in ../shared/fixtures with the usage SOURCES.md states for it.
fn recorded_cases() -> Vec<Case> {
    vec![
        // OpenAI Chat Completions / legacy Completions
        case(
            "openai_chat_stream_usage.sse",
            OpenAiChat,
            SSE,
            usage(12, 0, 0, 100, 100),
        ),
        case(
            "openai_chat_stream_usage_tools.sse",
            OpenAiChat,
            SSE,
            usage(53, 0, 0, 15, 0),
        ),
        case("openai_chat_stream_no_usage.sse", OpenAiChat, SSE, None),
        case(
            "openai_chat.json",
            OpenAiChat,
            JSON,
            usage(8, 0, 0, 377, 320),
        ),
        case(
            "openai_chat_reasoning.json",
            OpenAiChat,
            JSON,
            usage(27, 0, 0, 267, 192),
        ),
        case(
            "openai_chat_cached.json",
            OpenAiChat,
            JSON,
            usage(4020, 4012, 0, 4, 0),
        ),
        case(
            "azure_openai_chat.json",
            OpenAiChat,
            JSON,
            usage(8, 0, 0, 271, 192),
        ),
        case(
            "openai_completions_stream_usage.sse",
            OpenAiChat,
            SSE,
            usage(31, 0, 0, 25, 0),
        ),
        // OpenAI Responses (tool_usage trap in *_tool_usage.sse)
        case(
            "openai_responses_stream.sse",
            OpenAiResponses,
            SSE,
            usage(278, 0, 0, 9, 0),
        ),
        case(
            "openai_responses_stream_reasoning.sse",
            OpenAiResponses,
            SSE,
            usage(53, 0, 0, 469, 448),
        ),
        case(
            "openai_responses_stream_cached.sse",
            OpenAiResponses,
            SSE,
            usage(9463, 8320, 0, 582, 512),
        ),
        case(
            "openai_responses_stream_tool_usage.sse",
            OpenAiResponses,
            SSE,
            usage(13, 0, 0, 59, 0),
        ),
        case(
            "openai_responses.json",
            OpenAiResponses,
            JSON,
            usage(1349, 1024, 0, 10, 0),
        ),
        // Embeddings / images
        case(
            "openai_embeddings.json",
            OpenAiEmbeddings,
            JSON,
            usage(5, 0, 0, 0, 0),
        ),
        Case {
            images: 1,
            ..case(
                "openai_image_generation_no_usage.json",
                OpenAiImages,
                JSON,
                None,
            )
        },
        // DashScope native: cumulative usage, last event wins
        case(
            "dashscope_native_stream_text.sse",
            DashScopeNative,
            SSE,
            usage(16, 0, 0, 6, 0),
        ),
        case(
            "dashscope_native_stream_tools.sse",
            DashScopeNative,
            SSE,
            usage(250, 0, 0, 37, 0),
        ),
        case(
            "dashscope_native_stream_reasoning.sse",
            DashScopeNative,
            SSE,
            usage(723, 0, 0, 254, 150),
        ),
        case(
            "dashscope_native_stream_vl.sse",
            DashScopeNative,
            SSE,
            usage(1283, 0, 0, 85, 0),
        ),
        // Events not separated by blank lines in this capture.
        case(
            "dashscope_native_stream_message.raw.sse",
            DashScopeNative,
            SSE,
            usage(8, 0, 0, 40, 0),
        ),
        case(
            "dashscope_native.json",
            DashScopeNative,
            JSON,
            usage(12, 0, 0, 21, 20),
        ),
        case(
            "dashscope_native_text.json",
            DashScopeNative,
            JSON,
            usage(16, 0, 0, 14, 0),
        ),
        case(
            "dashscope_app_completion.json",
            DashScopeNative,
            JSON,
            usage(344, 0, 0, 311, 0),
        ),
        // DashScope compatible mode
        case(
            "dashscope_compat_stream_tools.sse",
            OpenAiChat,
            SSE,
            usage(295, 0, 0, 22, 0),
        ),
        case(
            "dashscope_compat_stream_reasoning.sse",
            OpenAiChat,
            SSE,
            usage(24, 0, 0, 1355, 1084),
        ),
        case(
            "dashscope_compat_chat.json",
            OpenAiChat,
            JSON,
            usage(18, 0, 0, 1064, 0),
        ),
        // Anthropic: input = input + cache_read + cache_creation
        case(
            "anthropic_messages_stream.sse",
            Anthropic,
            SSE,
            usage(43, 0, 0, 282, 0),
        ),
        // DECISION: compaction iterations are summed: (100+55096+0)+(181+0+0) in, 83+8 out.
        case(
            "anthropic_messages_stream_cache_read_compaction.sse",
            Anthropic,
            SSE,
            usage(55377, 55096, 0, 91, 0),
        ),
        case(
            "anthropic_messages_stream_cache_creation.sse",
            Anthropic,
            SSE,
            usage(6 + 6289 + 3337, 6289, 3337, 198, 0),
        ),
        case(
            "anthropic_messages_cache.json",
            Anthropic,
            JSON,
            usage(3 + 1111 + 418, 1111, 418, 33, 0),
        ),
        case(
            "anthropic_compatible_message_delta_input_tokens.sse",
            Anthropic,
            SSE,
            usage(61, 0, 0, 2, 0),
        ),
        // Gemini / Vertex: output = candidates + thoughts
        case(
            "gemini_stream.sse",
            Gemini,
            SSE,
            usage(18, 0, 0, 80 + 35, 35),
        ),
        case(
            "gemini_stream_thinking.sse",
            Gemini,
            SSE,
            usage(34, 0, 0, 469 + 787, 787),
        ),
        case(
            "vertex_gemini_stream.sse",
            Gemini,
            SSE,
            usage(5, 0, 0, 1 + 100, 100),
        ),
        case(
            "gemini_generate_content.json",
            Gemini,
            JSON,
            usage(8, 0, 0, 6 + 99, 99),
        ),
        case(
            "gemini_generate_content_cached.json",
            Gemini,
            JSON,
            usage(17713, 17379, 0, 68 + 821, 821),
        ),
        case(
            "gemini_generate_content_no_candidates_tokens.json",
            Gemini,
            JSON,
            usage(15, 0, 0, 2, 2),
        ),
        // DeepSeek, Zhipu, Groq, OpenRouter, Mistral, Moonshot
        case(
            "deepseek_chat_stream_reasoning.sse",
            OpenAiChat,
            SSE,
            usage(6, 0, 0, 212, 198),
        ),
        case(
            "deepseek_chat.json",
            OpenAiChat,
            JSON,
            usage(563, 512, 0, 116, 60),
        ),
        case(
            "zhipu_glm_stream.sse",
            OpenAiChat,
            SSE,
            usage(13, 0, 0, 564, 561),
        ),
        case(
            "zhipu_glm.json",
            OpenAiChat,
            JSON,
            usage(13, 0, 0, 437, 427),
        ),
        case(
            "groq_stream_x_groq_usage.sse",
            OpenAiChat,
            SSE,
            usage(210, 0, 0, 15, 0),
        ),
        case(
            "openrouter_stream_usage_comments.sse",
            OpenAiChat,
            SSE,
            usage(254, 0, 0, 5, 0),
        ),
        case(
            "mistral_stream.sse",
            OpenAiChat,
            SSE,
            usage(10, 0, 0, 232, 0),
        ),
        case(
            "moonshot_stream_final_chunk.partial.sse",
            OpenAiChat,
            SSE,
            usage(19, 0, 0, 13, 0),
        ),
        // Error bodies: no usage; a complete body counts as terminal.
        error("openai_error_400.json", OpenAiChat, JSON),
        error("openai_error_404_model_not_found.json", OpenAiChat, JSON),
        error("anthropic_error_400.json", Anthropic, JSON),
        error("gemini_error_429.json", Gemini, JSON),
        error("openrouter_error_429.json", OpenAiChat, JSON),
        error("dashscope_native_error_400.json", DashScopeNative, JSON),
        error("dashscope_native_error_401.json", DashScopeNative, JSON),
        // In-band stream errors
        Case {
            terminal: false,
            ..error("dashscope_native_stream_error.sse", DashScopeNative, SSE)
        },
        Case {
            terminal: false,
            ..error("groq_stream_error_event.sse", OpenAiChat, SSE)
        },
        // Usage in the same chunk as the error still counts; reasoning 11 > completion 10 kept.
        Case {
            usage: usage(43, 0, 0, 10, 11),
            ..error("openrouter_stream_error_chunk.sse", OpenAiChat, SSE)
        },
    ]
}

/// The hand-written fixtures in tests/fixtures.
fn handwritten_cases() -> Vec<Case> {
    vec![
        case(
            "openai_chat_crlf_nospace_usage.sse",
            OpenAiChat,
            SSE,
            usage(21, 16, 0, 8, 0),
        ),
        Case {
            text: Some("用户问候，简单回答。你好！How can I help?{\"q\":\"天气\"}"),
            ..case("openai_chat_no_usage_cjk_tools.sse", OpenAiChat, SSE, None)
        },
        Case {
            terminal: false,
            text: Some("Once upon a time there was a"),
            ..case(
                "openai_chat_truncated_no_terminal.sse",
                OpenAiChat,
                SSE,
                None,
            )
        },
        Case {
            terminal: false,
            text: Some("Partial"),
            ..error("openai_chat_stream_error_chunk.sse", OpenAiChat, SSE)
        },
        case(
            "moonshot_stream_choice_usage.sse",
            OpenAiChat,
            SSE,
            usage(120, 100, 0, 6, 0),
        ),
        Case {
            text: Some("Let me check.{\"city\": \"Paris\"}"),
            ..case(
                "anthropic_stream_tool_use_cache_read.sse",
                Anthropic,
                SSE,
                usage(2060, 2048, 0, 57, 0),
            )
        },
        Case {
            terminal: false,
            usage: usage(30, 0, 0, 1, 0),
            text: Some("Considering the request"),
            ..error("anthropic_stream_overloaded_error.sse", Anthropic, SSE)
        },
        case(
            "anthropic_message_tool_use.json",
            Anthropic,
            JSON,
            usage(1610, 0, 1200, 88, 0),
        ),
        Case {
            text: Some("Thinking about weatherIt is sunny in Paris."),
            ..case(
                "gemini_stream_cumulative.sse",
                Gemini,
                SSE,
                usage(40, 32, 0, 58, 50),
            )
        },
        case(
            "gemini_stream_array.json",
            Gemini,
            JSON,
            usage(6, 0, 0, 2, 0),
        ),
        case(
            "dashscope_native_stream_cumulative_crlf.sse",
            DashScopeNative,
            SSE,
            usage(180, 64, 0, 10, 2),
        ),
        Case {
            terminal: false,
            usage: usage(20, 0, 0, 2, 0),
            ..error(
                "dashscope_native_stream_error_after_result.sse",
                DashScopeNative,
                SSE,
            )
        },
        Case {
            text: Some("Deep learning is"),
            ..case(
                "openai_responses_stream_incomplete.sse",
                OpenAiResponses,
                SSE,
                usage(11, 0, 0, 16, 12),
            )
        },
        Case {
            usage: usage(9, 0, 0, 0, 0),
            ..error("openai_responses_stream_failed.sse", OpenAiResponses, SSE)
        },
        Case {
            images: 2,
            usage: Some(Usage {
                images: 2,
                ..Usage {
                    input_tokens: 50,
                    output_tokens: 544,
                    ..Usage::default()
                }
            }),
            ..case(
                "openai_images_gpt_image_usage.json",
                OpenAiImages,
                JSON,
                None,
            )
        },
        Case {
            images: 1,
            usage: Some(Usage {
                input_tokens: 12,
                output_tokens: 272,
                images: 1,
                ..Usage::default()
            }),
            ..case("openai_images_stream.sse", OpenAiImages, SSE, None)
        },
        case(
            "openai_embeddings_usage.json",
            OpenAiEmbeddings,
            JSON,
            usage(17, 0, 0, 0, 0),
        ),
    ]
}

fn recorded_dir() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures")).to_path_buf()
}

fn handwritten_dir() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures")).to_path_buf()
}

/// The recorded corpus, or `None` (with a note) when ../shared is absent outside CI.
fn recorded_corpus() -> Option<&'static [(Case, Vec<u8>)]> {
    static CORPUS: OnceLock<Option<Corpus>> = OnceLock::new();
    CORPUS
        .get_or_init(|| {
            let dir = recorded_dir();
            if !dir.is_dir() {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "recorded fixtures missing at {} (required under CI=true)",
                    dir.display()
                );
                eprintln!("NOTE: {} not found; recorded corpus skipped", dir.display());
                return None;
            }
            Some(load(&dir, recorded_cases()))
        })
        .as_deref()
}

fn handwritten_corpus() -> &'static [(Case, Vec<u8>)] {
    static CORPUS: OnceLock<Corpus> = OnceLock::new();
    CORPUS.get_or_init(|| load(&handwritten_dir(), handwritten_cases()))
}

fn load(dir: &Path, cases: Vec<Case>) -> Corpus {
    cases
        .into_iter()
        .map(|case| {
            let path = dir.join(case.file);
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (case, bytes)
        })
        .collect()
}

fn meter_chunks<'a>(case: &Case, chunks: impl IntoIterator<Item = &'a [u8]>) -> MeterReport {
    let mut meter = ResponseMeter::new(case.format, case.streaming, MeterLimits::default());
    for chunk in chunks {
        meter.feed(chunk);
    }
    meter.finish();
    meter.report()
}

fn check(case: &Case, report: &MeterReport) {
    let file = case.file;
    assert_eq!(report.usage, case.usage, "{file}: usage");
    assert_eq!(report.images, case.images, "{file}: images");
    assert_eq!(
        report.in_band_error.is_some(),
        case.in_band_error,
        "{file}: error {:?}",
        report.in_band_error
    );
    assert_eq!(report.terminal_seen, case.terminal, "{file}: terminal");
    assert_eq!(report.oversized_events, 0, "{file}: oversized");
    assert_eq!(report.unparsed_events, 0, "{file}: unparsed");
    assert!(!report.body_too_large, "{file}");
    if let Some(text) = case.text {
        assert_eq!(
            report.output_chars_seen,
            text.chars().count() as u64,
            "{file}: chars"
        );
        assert_eq!(
            report.estimated_output_tokens,
            estimate_tokens(text),
            "{file}: estimate"
        );
    }
}

fn check_all(corpus: &[(Case, Vec<u8>)]) {
    for (case, bytes) in corpus {
        check(case, &meter_chunks(case, [&bytes[..]]));
    }
}

fn same_report_for_any_chunking(corpus: &[(Case, Vec<u8>)], cut_seeds: &[usize]) {
    for (case, bytes) in corpus {
        let whole = meter_chunks(case, [&bytes[..]]);
        let mut cuts: Vec<usize> = cut_seeds.iter().map(|s| s % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut start = 0;
        for cut in cuts.into_iter().chain([bytes.len()]) {
            chunks.push(&bytes[start..cut]);
            start = cut;
        }
        assert_eq!(
            meter_chunks(case, chunks),
            whole,
            "{}: cuts {cut_seeds:?}",
            case.file
        );
    }
}

fn same_report_byte_by_byte(corpus: &[(Case, Vec<u8>)]) {
    for (case, bytes) in corpus {
        let whole = meter_chunks(case, [&bytes[..]]);
        assert_eq!(
            meter_chunks(case, bytes.chunks(1)),
            whole,
            "{}: 1-byte chunks",
            case.file
        );
    }
}

#[test]
fn recorded_corpus_parses_to_the_documented_usage() {
    if let Some(corpus) = recorded_corpus() {
        check_all(corpus);
    }
}

#[test]
fn recorded_corpus_table_covers_every_file() {
    let dir = recorded_dir();
    if recorded_corpus().is_none() {
        return;
    }
    let cases = recorded_cases();
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != "SOURCES.md")
        .collect();
    files.sort();
    let mut listed: Vec<String> = cases.iter().map(|c| c.file.to_string()).collect();
    listed.sort();
    assert_eq!(files, listed);
}

#[test]
fn handwritten_fixtures_parse_to_their_expected_usage() {
    check_all(handwritten_corpus());
}

#[test]
fn handwritten_table_covers_every_fixture() {
    let mut files: Vec<String> = std::fs::read_dir(handwritten_dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with('.'))
        .collect();
    files.sort();
    let mut listed: Vec<String> = handwritten_cases()
        .iter()
        .map(|c| c.file.to_string())
        .collect();
    listed.sort();
    assert_eq!(files, listed);
}

#[test]
fn byte_by_byte_feeding_gives_identical_reports() {
    same_report_byte_by_byte(handwritten_corpus());
    if let Some(corpus) = recorded_corpus() {
        same_report_byte_by_byte(corpus);
    }
}

#[test]
fn streams_without_usage_still_estimate_output() {
    let corpus = recorded_corpus()
        .into_iter()
        .flatten()
        .chain(handwritten_corpus());
    for (case, bytes) in corpus {
        if case.streaming && case.usage.is_none() && !case.in_band_error {
            let report = meter_chunks(case, [&bytes[..]]);
            assert!(report.estimated_output_tokens > 0, "{}", case.file);
        }
    }
}

#[test]
fn recorded_no_usage_stream_estimate_is_plausible() {
    let Some(corpus) = recorded_corpus() else {
        return;
    };
    let Some((case, bytes)) = corpus
        .iter()
        .find(|(c, _)| c.file == "openai_chat_stream_no_usage.sse")
    else {
        panic!("case missing");
    };
    let report = meter_chunks(case, [&bytes[..]]);
    // The content of this gpt-5-nano answer is a few hundred characters of English.
    assert!(report.output_chars_seen > 100, "{report:?}");
    assert!(
        (report.output_chars_seen / 5..=report.output_chars_seen / 3)
            .contains(&report.estimated_output_tokens)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_chunk_boundaries_give_identical_reports(cuts in prop::collection::vec(any::<usize>(), 0..24)) {
        same_report_for_any_chunking(handwritten_corpus(), &cuts);
        if let Some(corpus) = recorded_corpus() {
            same_report_for_any_chunking(corpus, &cuts);
        }
    }
}

/// Throughput of SSE parsing + usage extraction on real streams, fed in 16 KiB chunks.
/// Run: `cargo test -p llm-meter-filter --release -- --ignored --nocapture throughput`.
#[test]
#[ignore = "measurement; run in release mode"]
fn throughput() {
    let Some(corpus) = recorded_corpus() else {
        return;
    };
    let mut total_bytes = 0usize;
    let mut total_secs = 0f64;
    for (case, bytes) in corpus
        .iter()
        .filter(|(c, b)| c.streaming && b.len() > 10_000)
    {
        let rounds = (64 << 20) / bytes.len();
        let started = std::time::Instant::now();
        for _ in 0..rounds {
            let report = meter_chunks(case, bytes.chunks(16 * 1024));
            assert_eq!(report.usage, case.usage);
        }
        let secs = started.elapsed().as_secs_f64();
        let bytes_done = rounds * bytes.len();
        println!(
            "{:45} {:8.0} MB/s",
            case.file,
            bytes_done as f64 / secs / 1e6
        );
        total_bytes += bytes_done;
        total_secs += secs;
    }
    println!("overall {:.0} MB/s", total_bytes as f64 / total_secs / 1e6);
}
