//! The filter's parsing core timed in a loop: SSE framing plus usage extraction, exactly
//! as `ResponseMeter` runs inside Envoy (one `feed` per body chunk, then `finish` and
//! `report`). The same functions run natively and in wasm32-wasip1.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use llm_meter_filter::format::ProviderFormat;
use llm_meter_filter::meter::{MeterLimits, ResponseMeter};
use llm_meter_filter::strip::InjectedUsageStripper;
use serde::{Deserialize, Serialize};

use crate::alloc;
use crate::stats::median;
use crate::stream::{openai_json_body, openai_stream_events};

/// Throughput of one case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpeedResult {
    pub case: String,
    /// Body bytes of one response.
    pub bytes: usize,
    /// Body chunks (`feed` calls) of one response.
    pub chunks: usize,
    pub mb_per_s: f64,
    pub chunks_per_s: f64,
    pub responses_per_s: f64,
}

/// Heap figure of one memory case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryResult {
    pub case: String,
    pub bytes: usize,
}

/// Responses of one format to meter, each as its body chunks; one "iteration" meters
/// every response once, each with a fresh meter.
pub struct Workload {
    pub case: String,
    pub format: ProviderFormat,
    pub streaming: bool,
    /// The filter set `include_usage` itself, so it also removes the usage chunk from what
    /// the client receives (an `InjectedUsageStripper` fed every chunk beside the meter).
    pub strips_injected_usage: bool,
    pub responses: Vec<Vec<Vec<u8>>>,
}

impl Workload {
    fn single(case: &str, streaming: bool, chunks: Vec<Vec<u8>>) -> Workload {
        Workload {
            case: case.into(),
            format: ProviderFormat::OpenAiChat,
            streaming,
            strips_injected_usage: false,
            responses: vec![chunks],
        }
    }

    fn stripping(mut self) -> Workload {
        self.strips_injected_usage = true;
        self
    }

    fn bytes(&self) -> usize {
        self.responses.iter().flatten().map(Vec::len).sum()
    }

    fn chunks(&self) -> usize {
        self.responses.iter().map(Vec::len).sum()
    }
}

/// Meter one response the way the filter does.
pub fn meter_once(format: ProviderFormat, streaming: bool, chunks: &[Vec<u8>]) -> u64 {
    let mut meter = ResponseMeter::new(format, streaming, MeterLimits::default());
    for chunk in chunks {
        meter.feed(black_box(chunk));
    }
    meter.finish();
    let report = meter.report();
    report.usage.map(|u| u.output_tokens).unwrap_or(0) + report.estimated_output_tokens
}

/// Remove the injected usage chunk from one response the way the filter does; returns the
/// bytes forwarded.
pub fn strip_once(chunks: &[Vec<u8>]) -> usize {
    let mut stripper = InjectedUsageStripper::new(MeterLimits::default().max_event_bytes);
    let mut forwarded = 0;
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        forwarded += stripper
            .feed(black_box(chunk), last)
            .map_or(chunk.len(), |replacement| replacement.len());
    }
    forwarded
}

/// Run `workload` repeatedly for `seconds` per round, three rounds, median rate.
pub fn measure(workload: &Workload, seconds: f64) -> SpeedResult {
    let round = Duration::from_secs_f64(seconds / 3.0);
    let mut rates = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let mut iterations = 0u64;
        while start.elapsed() < round || iterations == 0 {
            for response in &workload.responses {
                black_box(meter_once(workload.format, workload.streaming, response));
                if workload.strips_injected_usage {
                    black_box(strip_once(response));
                }
            }
            iterations += 1;
        }
        rates.push(iterations as f64 / start.elapsed().as_secs_f64());
    }
    let iterations_per_s = median(&rates);
    SpeedResult {
        case: workload.case.clone(),
        bytes: workload.bytes(),
        chunks: workload.chunks(),
        mb_per_s: iterations_per_s * workload.bytes() as f64 / 1e6,
        chunks_per_s: iterations_per_s * workload.chunks() as f64,
        responses_per_s: iterations_per_s * workload.responses.len() as f64,
    }
}

/// The synthetic workloads (no files needed).
pub fn synthetic_workloads() -> Vec<Workload> {
    let stream = openai_stream_events(100, 3);
    let joined: Vec<u8> = stream.concat();
    vec![
        Workload::single("openai_stream_300tok_100chunks", true, stream.clone()),
        Workload::single("openai_stream_300tok_100chunks_stripped", true, stream).stripping(),
        Workload::single(
            "openai_stream_300tok_16KiB_reads",
            true,
            joined.chunks(16 * 1024).map(<[u8]>::to_vec).collect(),
        ),
        Workload::single(
            "openai_stream_6000tok_20chunks",
            true,
            openai_stream_events(20, 300),
        ),
        Workload::single("openai_json_300tok", false, vec![openai_json_body(300)]),
    ]
}

/// Which format a recorded fixture speaks, from its file name.
pub fn fixture_format(name: &str) -> Option<ProviderFormat> {
    let lower = name.to_ascii_lowercase();
    if lower.starts_with("dashscope_native") {
        Some(ProviderFormat::DashScopeNative)
    } else if lower.starts_with("anthropic") {
        Some(ProviderFormat::Anthropic)
    } else if lower.starts_with("gemini") {
        Some(ProviderFormat::Gemini)
    } else if lower.starts_with("openai_responses") {
        Some(ProviderFormat::OpenAiResponses)
    } else if [
        "openai_chat",
        "openai_completions",
        "deepseek",
        "mistral",
        "groq",
        "moonshot",
        "dashscope_compat",
    ]
    .iter()
    .any(|p| lower.starts_with(p))
    {
        Some(ProviderFormat::OpenAiChat)
    } else {
        None
    }
}

/// Split a recorded SSE body after each blank line: one chunk per event, as providers flush.
pub fn split_events(body: &[u8]) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < body.len() {
        let end = if body[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if body[i..].starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        };
        match end {
            Some(end) => {
                chunks.push(body[start..end].to_vec());
                start = end;
                i = end;
            }
            None => i += 1,
        }
    }
    if start < body.len() {
        chunks.push(body[start..].to_vec());
    }
    chunks
}

/// Recorded streams from `dirs` grouped by format: one workload per format, whose
/// "response" is every stream of that format in turn (so rates weigh real event mixes).
pub fn corpus_workloads(dirs: &[&Path]) -> Vec<Workload> {
    let mut by_format: Vec<(ProviderFormat, Vec<Vec<Vec<u8>>>)> = Vec::new();
    let mut names_seen = std::collections::HashSet::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            // A file in both corpora (same name) counts once.
            if !name.ends_with(".sse") || !names_seen.insert(name.to_string()) {
                continue;
            }
            let (Some(format), Ok(body)) = (fixture_format(name), std::fs::read(&path)) else {
                continue;
            };
            let streams = match by_format.iter_mut().find(|(f, _)| *f == format) {
                Some((_, streams)) => streams,
                None => {
                    by_format.push((format, Vec::new()));
                    &mut by_format.last_mut().expect("just pushed").1
                }
            };
            streams.push(split_events(&body));
        }
    }
    by_format
        .into_iter()
        .map(|(format, streams)| Workload {
            strips_injected_usage: false,
            case: format!("corpus_{}_{}streams", format_name(format), streams.len()),
            format,
            streaming: true,
            responses: streams,
        })
        .collect()
}

fn format_name(format: ProviderFormat) -> &'static str {
    match format {
        ProviderFormat::OpenAiChat => "openai_chat",
        ProviderFormat::OpenAiResponses => "openai_responses",
        ProviderFormat::OpenAiEmbeddings => "openai_embeddings",
        ProviderFormat::OpenAiImages => "openai_images",
        ProviderFormat::Anthropic => "anthropic",
        ProviderFormat::Gemini => "gemini",
        ProviderFormat::DashScopeNative => "dashscope_native",
    }
}

/// Heap held by in-flight streams, and peaks that show memory follows the longest event,
/// not the stream's length.
pub fn memory_results() -> Vec<MemoryResult> {
    let mut results = Vec::new();

    // 1000 streams stopped mid-event (the worst point: a partial event is buffered).
    let events = openai_stream_events(100, 3);
    let half_event = &events[50][..events[50].len() / 2];
    let before = alloc::live_bytes();
    let mut meters: Vec<Box<ResponseMeter>> = (0..1000)
        .map(|_| {
            let mut meter = Box::new(ResponseMeter::new(
                ProviderFormat::OpenAiChat,
                true,
                MeterLimits::default(),
            ));
            for event in &events[..50] {
                meter.feed(event);
            }
            meter.feed(half_event);
            meter
        })
        .collect();
    let per_stream = (alloc::live_bytes().saturating_sub(before)) / meters.len();
    black_box(&mut meters);
    drop(meters);
    results.push(MemoryResult {
        case: "in_flight_stream_mid_event".into(),
        bytes: per_stream,
    });

    for chunks in [10, 10_000] {
        let events = openai_stream_events(chunks, 3);
        results.push(MemoryResult {
            case: format!("peak_stream_{chunks}_chunks"),
            bytes: peak_while_metering(&events),
        });
    }

    for (label, content_bytes) in [("1KiB", 1024), ("1MiB", 1024 * 1024)] {
        let mut events = openai_stream_events(100, 3);
        let big = format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
            "x".repeat(content_bytes)
        );
        events.insert(50, big.into_bytes());
        // Delivered in 16 KiB reads, so the long event arrives in pieces.
        let joined = events.concat();
        let reads: Vec<Vec<u8>> = joined.chunks(16 * 1024).map(<[u8]>::to_vec).collect();
        results.push(MemoryResult {
            case: format!("peak_stream_longest_event_{label}"),
            bytes: peak_while_metering(&reads),
        });
    }
    results
}

/// Peak heap above the starting point while one stream is metered (the chunks themselves
/// are allocated before the measurement starts).
fn peak_while_metering(chunks: &[Vec<u8>]) -> usize {
    let before = alloc::live_bytes();
    alloc::reset_peak();
    let mut meter = ResponseMeter::new(ProviderFormat::OpenAiChat, true, MeterLimits::default());
    for chunk in chunks {
        meter.feed(chunk);
    }
    meter.finish();
    black_box(meter.report());
    let peak = alloc::peak_bytes().saturating_sub(before);
    drop(meter);
    peak
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_events_keeps_every_byte() {
        let body = b"data: a\n\ndata: b\r\n\r\ndata: c";
        let chunks = split_events(body);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks.concat(), body.to_vec());
    }

    #[test]
    fn fixture_names_map_to_formats() {
        assert_eq!(
            fixture_format("dashscope_native_stream_text.sse"),
            Some(ProviderFormat::DashScopeNative)
        );
        assert_eq!(
            fixture_format("dashscope_compat_stream_tools.sse"),
            Some(ProviderFormat::OpenAiChat)
        );
        assert_eq!(fixture_format("SOURCES.md"), None);
    }

    /// The `_stripped` case does the stripper's real work: it removes exactly the usage
    /// event of the synthetic stream, so its rate measures what the filter runs.
    #[test]
    fn the_stripped_case_removes_exactly_the_usage_event() {
        let workload = synthetic_workloads()
            .into_iter()
            .find(|w| w.strips_injected_usage)
            .expect("a stripping workload");
        let stream = &workload.responses[0];
        let usage_event = &stream[stream.len() - 2];
        assert!(
            usage_event.starts_with(br#"data: {"id""#)
                && usage_event.windows(12).any(|w| w == br#""choices":[]"#)
        );
        let total: usize = stream.iter().map(Vec::len).sum();
        assert_eq!(strip_once(stream), total - usage_event.len());
    }

    #[test]
    fn measure_reports_consistent_rates() {
        let workload = &synthetic_workloads()[0];
        let result = measure(workload, 0.03);
        assert!(result.responses_per_s > 0.0);
        let expected = result.responses_per_s * workload.chunks() as f64;
        assert!((result.chunks_per_s - expected).abs() < 1e-6 * expected);
    }
}
