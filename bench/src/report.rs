//! BENCHMARKS.md from one run's results: the targets first (each with its verdict), then
//! every section's tables, then what bounds the figures that miss.

use std::fmt::Write as _;

use serde::Serialize;

use crate::core::{MemoryResult, SpeedResult};
use crate::growth::{GrowthSection, LatencyPoint};
use crate::ledger_bench::{LedgerCell, LedgerSection, Spread};
use crate::proxy::{ProxySection, ShapeFigures, StandRun, REWARM_SECONDS};
use crate::upstream::{JSON_TOKENS, STREAM_CHUNKS, TOKENS_PER_CHUNK};

/// Body chunks of one streamed answer: content chunks + finish + usage + `[DONE]`.
pub const CHUNKS_PER_STREAM: usize = STREAM_CHUNKS + 3;
/// The core bench case that stands for "a typical streamed answer".
pub const HEADLINE_CORE_CASE: &str = "openai_stream_300tok_100chunks";

#[derive(Debug, Clone, Serialize, Default)]
pub struct Meta {
    pub date: String,
    pub commit: String,
    pub cpu: String,
    pub cores: usize,
    pub envoy: String,
    pub load_before: String,
    pub load_after: String,
    pub seconds: f64,
    pub quick: bool,
    /// Median 4 KiB write + fdatasync on the scratch disk (µs).
    pub fsync_us: Option<u64>,
    /// Filter settings this run replaced (`BENCH_FILTER_EXTRA`), as JSON; empty for none.
    pub filter_overrides: String,
}

impl Meta {
    pub fn collect(quick: bool) -> Meta {
        Meta {
            date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            commit: command_line("git", &["rev-parse", "--short", "HEAD"]),
            cpu: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|c| {
                    c.lines()
                        .find(|l| l.starts_with("model name"))
                        .and_then(|l| l.split_once(':'))
                        .map(|(_, v)| v.trim().to_string())
                })
                .unwrap_or_default(),
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            envoy: command_line("envoy", &["--version"])
                .split("version:")
                .nth(1)
                .and_then(|v| v.trim().split('/').nth(1))
                .unwrap_or("?")
                .to_string(),
            load_before: load_average(),
            load_after: String::new(),
            seconds: 0.0,
            quick,
            fsync_us: crate::procs::fsync_probe_us(&std::env::temp_dir()),
            filter_overrides: crate::envoy::filter_overrides()
                .ok()
                .filter(|settings| !settings.is_empty())
                .map(|settings| serde_json::Value::Object(settings).to_string())
                .unwrap_or_default(),
        }
    }

    pub fn finish(&mut self, seconds: f64) {
        self.seconds = seconds;
        self.load_after = load_average();
    }
}

fn command_line(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct CoreRun {
    pub speeds: Vec<SpeedResult>,
    pub memory: Vec<MemoryResult>,
    pub corpus: Vec<String>,
}

impl CoreRun {
    fn speed(&self, case: &str) -> Option<&SpeedResult> {
        self.speeds.iter().find(|s| s.case == case)
    }

    fn memory(&self, case: &str) -> Option<usize> {
        self.memory.iter().find(|m| m.case == case).map(|m| m.bytes)
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Results {
    pub meta: Meta,
    pub core_native: Option<Result<CoreRun, String>>,
    pub core_wasm: Option<Result<CoreRun, String>>,
    pub proxy: Option<Result<ProxySection, String>>,
    pub ledger: Option<LedgerSection>,
    pub growth: Option<GrowthSection>,
}

/// One target and how it came out.
struct Verdict {
    target: String,
    measured: String,
    met: Option<bool>,
}

impl Verdict {
    fn new(target: &str, measured: String, met: Option<bool>) -> Verdict {
        Verdict {
            target: target.into(),
            measured,
            met,
        }
    }

    fn mark(&self) -> &'static str {
        match self.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "not measured",
        }
    }
}

pub fn render(results: &Results) -> String {
    let mut out = String::new();
    let meta = &results.meta;
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Written by `make bench` ({}) on {}, commit `{}`: {} cores ({}), Envoy {}, {:.0} s end to end. \
         Load average {} before, {} after; one 4 KiB write + fdatasync takes {} µs on this disk (median). Every ratio compares figures measured side by side in this \
         one run on the same machine; absolute figures move with the machine, ratios much less.\n",
        if meta.quick { "quick mode" } else { "full" },
        meta.date,
        meta.commit,
        meta.cores,
        meta.cpu,
        meta.envoy,
        meta.seconds,
        meta.load_before,
        meta.load_after,
        meta.fsync_us.map_or("?".into(), |u| u.to_string()),
    );
    if !meta.filter_overrides.is_empty() {
        let _ = writeln!(
            out,
            "**Not the defaults:** the metering filter ran with `{}` (`BENCH_FILTER_EXTRA`).\n",
            meta.filter_overrides
        );
    }
    let proxy = results.proxy.as_ref().and_then(|p| p.as_ref().ok());
    let native = results.core_native.as_ref().and_then(|c| c.as_ref().ok());
    let wasm = results.core_wasm.as_ref().and_then(|c| c.as_ref().ok());

    let verdicts = verdicts(results, proxy, native, wasm);
    let _ = writeln!(out, "## Targets\n");
    let _ = writeln!(out, "| target | measured | verdict |\n|---|---|---|");
    for v in &verdicts {
        let _ = writeln!(out, "| {} | {} | {} |", v.target, v.measured, v.mark());
    }
    out.push('\n');

    render_proxy(&mut out, results);
    render_ledger(&mut out, results.ledger.as_ref());
    render_core(&mut out, results);
    render_growth(&mut out, results.growth.as_ref(), native, wasm);
    render_bounds(&mut out, proxy, &verdicts);
    render_method(&mut out);
    out
}

// ---------------------------------------------------------------------------- targets

fn plain(proxy: &ProxySection) -> Option<&StandRun> {
    proxy.runs.iter().find(|r| r.is_plain())
}

fn metering<'a>(proxy: &'a ProxySection, backend: &str) -> Option<&'a StandRun> {
    proxy
        .runs
        .iter()
        .find(|r| r.backend == Some(backend) && r.label == crate::envoy::METERING_LABEL)
}

/// Added latency (µs) of `run` over plain Envoy in the open loop: p50, p99, p99.9.
fn added_latency(proxy: &ProxySection, run: &StandRun, stream: bool) -> Option<(i64, i64, i64)> {
    let base = plain(proxy)?.shape(stream).open.as_ref()?;
    let this = run.shape(stream).open.as_ref()?;
    Some((
        this.p50_us as i64 - base.p50_us as i64,
        this.p99_us as i64 - base.p99_us as i64,
        this.p999_us as i64 - base.p999_us as i64,
    ))
}

fn ledger_cell<'a>(
    ledger: &'a LedgerSection,
    backend: &str,
    concurrency: usize,
    spread: Spread,
) -> Option<&'a LedgerCell> {
    ledger
        .cells
        .iter()
        .find(|c| c.backend == backend && c.concurrency == concurrency && c.spread == spread)
}

fn verdicts(
    results: &Results,
    proxy: Option<&ProxySection>,
    native: Option<&CoreRun>,
    wasm: Option<&CoreRun>,
) -> Vec<Verdict> {
    let mut v = Vec::new();
    let sqlite_meter = proxy.and_then(|p| Some((p, metering(p, "SQLite")?)));

    let ratio = |stream: bool| {
        sqlite_meter
            .map(|(_, m)| m.shape(stream).median_ratio())
            .filter(|r| *r > 0.0)
    };
    let json_ratio = ratio(false);
    v.push(Verdict::new(
        "Non-streaming throughput, metering on SQLite >= 0.5x plain Envoy",
        json_ratio.map_or("-".into(), |r| format!("{r:.2}x")),
        json_ratio.map(|r| r >= 0.5),
    ));
    for stream in [false, true] {
        let added = sqlite_meter.and_then(|(p, m)| added_latency(p, m, stream));
        let rate = proxy.map(|p| if stream { p.stream_rate } else { p.json_rate });
        let capacity = sqlite_meter.map(|(_, m)| m.shape(stream).median_rps());
        let target = format!(
            "p99 added latency at half load <= 1 ms ({}, SQLite)",
            if stream {
                "streaming, to the last byte"
            } else {
                "non-streaming"
            }
        );
        match (added, rate, capacity) {
            (_, Some(rate), Some(capacity)) if capacity < rate => v.push(Verdict::new(
                &target,
                format!("overloaded: capacity {capacity:.0} req/s < {rate:.0} req/s"),
                Some(false),
            )),
            (Some((_, p99, _)), Some(rate), _) => v.push(Verdict::new(
                &target,
                format!("{p99:+} µs at {rate:.0} req/s"),
                Some(p99 <= 1000),
            )),
            _ => v.push(Verdict::new(&target, "-".into(), None)),
        }
    }
    let stream_ratio = ratio(true);
    v.push(Verdict::new(
        "Streaming chunk throughput, metering on SQLite >= 0.8x plain Envoy",
        stream_ratio.map_or("-".into(), |r| format!("{r:.2}x")),
        stream_ratio.map(|r| r >= 0.8),
    ));

    let ledger = results.ledger.as_ref();
    for (backend, floor) in [("SQLite", 5000.0), ("PostgreSQL", 3000.0)] {
        let cell = ledger.and_then(|l| ledger_cell(l, backend, 16, Spread::ManyUsers));
        v.push(Verdict::new(
            &format!("Ledger on {backend}, concurrency 16, many users >= {floor:.0} pairs/s"),
            cell.map_or("-".into(), |c| format!("{:.0} pairs/s", c.pairs_per_s)),
            cell.map(|c| c.pairs_per_s >= floor && c.errors == 0),
        ));
    }
    for backend in ["SQLite", "PostgreSQL", "MariaDB"] {
        let cell = ledger.and_then(|l| ledger_cell(l, backend, 16, Spread::HotUser));
        let drain = ledger.and_then(|l| l.overdraw.iter().find(|o| o.backend == backend));
        let measured = match (cell, drain) {
            (Some(c), Some(d)) => format!(
                "{:.0} pairs/s; drain: {} of {} admitted, {} left, {} held, {} debt, reconcile {}",
                c.pairs_per_s,
                d.allowed,
                d.expected_allowed,
                d.remaining_after,
                d.held_after,
                d.debt_after,
                if d.reconcile_clean { "clean" } else { "DRIFT" }
            ),
            (Some(c), None) => format!("{:.0} pairs/s; drain not run", c.pairs_per_s),
            _ => "-".into(),
        };
        v.push(Verdict::new(
            &format!("Hot user on {backend}, concurrency 16 >= 1,000 pairs/s, zero overdraw"),
            measured,
            cell.zip(drain)
                .map(|(c, d)| c.pairs_per_s >= 1000.0 && c.errors == 0 && d.holds()),
        ));
    }

    for (label, run, floor) in [("native", native, 300.0), ("wasm", wasm, 100.0)] {
        let headline = run.and_then(|r| r.speed(HEADLINE_CORE_CASE));
        let slowest = run.and_then(|r| {
            r.speeds
                .iter()
                .min_by(|a, b| a.mb_per_s.total_cmp(&b.mb_per_s))
        });
        v.push(Verdict::new(
            &format!("SSE core {label} >= {floor:.0} MB/s (300-token stream in 100 chunks)"),
            match (headline, slowest) {
                (Some(h), Some(s)) => format!(
                    "{:.0} MB/s, {:.2} M chunks/s (slowest case: {} at {:.0} MB/s)",
                    h.mb_per_s,
                    h.chunks_per_s / 1e6,
                    s.case,
                    s.mb_per_s
                ),
                _ => "-".into(),
            },
            headline.map(|h| h.mb_per_s >= floor),
        ));
    }
    let memory = native.and_then(|n| {
        Some((
            n.memory("peak_stream_10_chunks")?,
            n.memory("peak_stream_10000_chunks")?,
            n.memory("peak_stream_longest_event_1MiB")?,
            n.memory("in_flight_stream_mid_event")?,
        ))
    });
    v.push(Verdict::new(
        "Memory per stream bounded by the longest event, not the stream",
        memory.map_or("-".into(), |(short, long, big, inflight)| {
            format!(
                "{inflight} B per in-flight stream; peak {short} B (10 chunks) vs {long} B (10,000 chunks); {} KiB with one 1 MiB event",
                big / 1024
            )
        }),
        memory.map(|(short, long, big, _)| {
            long as f64 <= short as f64 * 1.1 && big <= 3 * 1024 * 1024
        }),
    ));

    let growth = results.growth.as_ref();
    for backend in ["SQLite", "PostgreSQL"] {
        let points: Vec<&LatencyPoint> = growth
            .map(|g| g.users.iter().filter(|p| p.backend == backend).collect())
            .unwrap_or_default();
        let small = points.iter().find(|p| p.size == 10_000);
        let large = points.iter().find(|p| p.size == 1_000_000);
        let pair = |p: &LatencyPoint| (p.authorize_p50_us + p.settle_p50_us) as f64;
        let ratio = small.zip(large).map(|(s, l)| pair(l) / pair(s).max(1.0));
        v.push(Verdict::new(
            &format!("Growth on {backend}: authorize+settle p50 at 1M users within 1.5x of 10k"),
            match (small, large, ratio) {
                (Some(s), Some(l), Some(r)) => {
                    format!("{:.0} µs vs {:.0} µs: {r:.2}x", pair(l), pair(s))
                }
                _ => "-".into(),
            },
            ratio.map(|r| r <= 1.5),
        ));
    }
    v
}

// ---------------------------------------------------------------------------- sections

fn render_proxy(out: &mut String, results: &Results) {
    let _ = writeln!(out, "## 1. Proxy overhead\n");
    let proxy = match &results.proxy {
        None => {
            let _ = writeln!(out, "Not run (section not selected).\n");
            return;
        }
        Some(Err(e)) => {
            let _ = writeln!(out, "Failed: `{e}`\n");
            return;
        }
        Some(Ok(p)) => p,
    };
    let _ = writeln!(
        out,
        "Envoy with one worker (`--concurrency 1`) in front of the bench upstream; every variant runs at \
         once and the loads visit them in {} interleaved rounds, so drift hits all alike; each measured run \
         follows a {REWARM_SECONDS} s unmeasured run of the same load on the same variant, so it measures the \
         steady state (the other variants ran meanwhile, and the filter releases the lease of a caller idle \
         for 2 s: without it every window would start with every user's lease to ask again). {JSON_TOKENS}-token \
         non-streamed answers, and streamed answers of {} tokens in {STREAM_CHUNKS} SSE chunks \
         ({CHUNKS_PER_STREAM} body chunks with the finish, usage and `[DONE]` events, each flushed on its own). \
         Closed loop: `wrk`, 1 thread, 32 connections, requests spread over 1000 users. Open loop: a fixed \
         rate of half of plain Envoy's closed-loop capacity ({:.0} req/s non-streamed, {:.0} req/s streamed) on \
         64 connections, latency to the last byte, coordinated omission corrected; a variant whose closed \
         loop served less than that rate is not run open loop (it cannot hold the rate: its queue only grows). \
         CPU per request is each \
         process's user+system time during the closed loop divided by the requests served. Throughput counts \
         only answers served (2xx): a call the filter refuses (503 when its settlement outbox is nearly full) \
         is in the errors column, not in the rate.\n",
        proxy.rounds,
        STREAM_CHUNKS * TOKENS_PER_CHUNK,
        proxy.json_rate,
        proxy.stream_rate
    );
    for stream in [false, true] {
        let _ = writeln!(
            out,
            "### {}\n",
            if stream { "Streaming" } else { "Non-streaming" }
        );
        let unit = if stream { "chunks/s" } else { "req/s" };
        let per_request = if stream {
            CHUNKS_PER_STREAM as f64
        } else {
            1.0
        };
        let _ = writeln!(
            out,
            "| variant | closed loop {unit} served (median) | vs plain (median of per-round ratios) | wrk p50 / p99 | open loop p50 / p99 / p99.9 | added p50 / p99 / p99.9 | errors | Envoy CPU/req | sidecar CPU/req |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
        for run in &proxy.runs {
            let figures = run.shape(stream);
            let rate = figures.median_rps() * per_request;
            let ratio = if run.is_plain() {
                "1".to_string()
            } else {
                format!(
                    "**{:.2}x** ({})",
                    figures.median_ratio(),
                    figures
                        .ratio_to_plain
                        .iter()
                        .map(|r| format!("{r:.2}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            let target_rate = if stream {
                proxy.stream_rate
            } else {
                proxy.json_rate
            };
            let open = figures.open.as_ref().map_or_else(
                || {
                    if run.is_plain() || figures.median_rps() >= target_rate {
                        return "-".to_string();
                    }
                    format!(
                        "overloaded: capacity {:.0} req/s < {:.0} req/s (not run)",
                        figures.median_rps(),
                        target_rate
                    )
                },
                |o| {
                    if figures.median_rps() < o.target_rate {
                        return format!(
                            "overloaded: capacity {:.0} req/s < {:.0} req/s (p50 {} ms)",
                            figures.median_rps(),
                            o.target_rate,
                            o.p50_us / 1000
                        );
                    }
                    if o.achieved_rate < 0.9 * o.target_rate {
                        return format!(
                        "did not hold {:.0} req/s: {:.0} req/s answered 2xx, {} refused or failed",
                        o.target_rate, o.achieved_rate, o.failed
                    );
                    }
                    format!(
                        "{} / {} / {} µs{}",
                        o.p50_us,
                        o.p99_us,
                        o.p999_us,
                        if o.failed > 0 {
                            format!(" ({} failed)", o.failed)
                        } else {
                            String::new()
                        }
                    )
                },
            );
            let overloaded = figures.open.as_ref().is_some_and(|o| {
                figures.median_rps() < o.target_rate || o.achieved_rate < 0.9 * o.target_rate
            });
            let added = added_latency(proxy, run, stream)
                .filter(|_| !run.is_plain() && !overloaded)
                .map_or("-".into(), |(a, b, c)| format!("{a:+} / {b:+} / {c:+} µs"));
            let name = match run.backend {
                Some(b) => format!("{} ({b})", run.label),
                None => run.label.clone(),
            };
            let _ = writeln!(
                out,
                "| {name} | {rate:.0} | {ratio} | {} / {} µs | {open} | {added} | {} | {:.0} µs | {} |",
                figures.closed_p50_us,
                figures.closed_p99_us,
                figures.errors,
                figures.envoy_cpu_us,
                figures.sidecar_cpu_us.map_or("-".into(), |c| format!("{c:.0} µs")),
            );
        }
        if let Some(plain) = plain(proxy) {
            let rounds: Vec<String> = plain
                .shape(stream)
                .closed_rps
                .iter()
                .map(|r| format!("{:.0}", r * per_request))
                .collect();
            let _ = writeln!(
                out,
                "\nPlain Envoy per round: {} {unit} (the spread is the machine's noise during the run).",
                rounds.join(", ")
            );
        }
        out.push('\n');
    }
    for run in proxy.runs.iter().filter(|r| !r.filter_stats.is_empty()) {
        let stats: Vec<String> = run
            .filter_stats
            .iter()
            .map(|(k, v)| format!("{}={v}", k.trim_start_matches("wasmcustom.llm_meter.")))
            .collect();
        let sidecar = if run.sidecar_stats.is_empty() {
            String::new()
        } else {
            let stats: Vec<String> = run
                .sidecar_stats
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!(" Sidecar: {}.", stats.join(", "))
        };
        let _ = writeln!(
            out,
            "Filter counters after the {} ({}) run: {}.{} Envoy RSS {} MiB, sidecar RSS {} MiB.\n",
            run.label,
            run.backend.unwrap_or("?"),
            stats.join(", "),
            sidecar,
            run.envoy_rss_bytes.map_or(0, |b| b / 1024 / 1024),
            run.sidecar_rss_bytes.map_or(0, |b| b / 1024 / 1024),
        );
    }
    for failure in &proxy.failures {
        let _ = writeln!(out, "- Not measured: {failure}");
    }
    if !proxy.failures.is_empty() {
        out.push('\n');
    }
}

fn render_ledger(out: &mut String, ledger: Option<&LedgerSection>) {
    let _ = writeln!(out, "## 2. Ledger\n");
    let Some(ledger) = ledger else {
        let _ = writeln!(out, "Not run (section not selected).\n");
        return;
    };
    let rounds = ledger
        .cells
        .first()
        .map_or(1, |c| c.rounds_pairs_per_s.len().max(1));
    let timing = if rounds > 1 {
        format!(
            "each cell runs {rounds} times for a fixed time, in rounds over all cells of a backend; a \
             figure is the median of its rounds (in parentheses: each round's pairs/s, which shows \
             the machine's noise)"
        )
    } else {
        "each cell once for a fixed time".to_string()
    };
    let _ = writeln!(
        out,
        "authorize + settle pairs per second through the sidecar's `Ledger` in process (the code its HTTP \
         handlers call; HTTP itself is in section 1), default pool of 16 connections; {timing}. Many \
         users: calls spread over 1000 users. Hot user: every call on one user. Latencies are per \
         operation. Ops/group: operations per group transaction (many users / hot user), which is what \
         group commit buys.\n"
    );
    let _ = writeln!(
        out,
        "| backend | concurrency | many users pairs/s | hot user pairs/s | authorize p50 / p99 (many) | settle p50 / p99 (many) | authorize p50 / p99 (hot) | ops/group | errors |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    let mut keys: Vec<(&str, usize)> = ledger
        .cells
        .iter()
        .map(|c| (c.backend, c.concurrency))
        .collect();
    keys.dedup();
    for (backend, concurrency) in keys {
        let many = ledger_cell(ledger, backend, concurrency, Spread::ManyUsers);
        let hot = ledger_cell(ledger, backend, concurrency, Spread::HotUser);
        let rate = |c: Option<&LedgerCell>| {
            c.map_or("-".into(), |c| {
                if c.rounds_pairs_per_s.len() < 2 {
                    return format!("{:.0}", c.pairs_per_s);
                }
                let rounds: Vec<String> = c
                    .rounds_pairs_per_s
                    .iter()
                    .map(|r| format!("{r:.0}"))
                    .collect();
                format!("{:.0} ({})", c.pairs_per_s, rounds.join(", "))
            })
        };
        let errors = many.map_or(0, |c| c.errors) + hot.map_or(0, |c| c.errors);
        let _ = writeln!(
            out,
            "| {backend} | {concurrency} | {} | {} | {} | {} | {} | {} / {} | {errors} |",
            rate(many),
            rate(hot),
            many.map_or("-".into(), |c| format!(
                "{} / {} µs",
                c.authorize_p50_us, c.authorize_p99_us
            )),
            many.map_or("-".into(), |c| format!(
                "{} / {} µs",
                c.settle_p50_us, c.settle_p99_us
            )),
            hot.map_or("-".into(), |c| format!(
                "{} / {} µs",
                c.authorize_p50_us, c.authorize_p99_us
            )),
            group_size(many),
            group_size(hot),
        );
    }
    out.push('\n');
    if !ledger.overdraw.is_empty() {
        let _ = writeln!(
            out,
            "Zero overdraw: one user granted exactly 500 calls' worth, then hammered by concurrent tasks until \
             every call is denied.\n"
        );
        let _ = writeln!(
            out,
            "| backend | tasks | admitted / expected | remaining | held | debt | reconcile |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
        for d in &ledger.overdraw {
            let _ = writeln!(
                out,
                "| {} | {} | {} / {} | {} | {} | {} | {} |",
                d.backend,
                d.concurrency,
                d.allowed,
                d.expected_allowed,
                d.remaining_after,
                d.held_after,
                d.debt_after,
                if d.reconcile_clean { "clean" } else { "DRIFT" }
            );
        }
        out.push('\n');
    }
    if !ledger.batches.is_empty() {
        let _ = writeln!(
            out,
            "Settlement batches as the filter sends them: {} calls of {} users per batch, each settled \
             under its user's lease, one batch in flight at a time (the outbox's rule), each through \
             `Ledger::finalize` (the sidecar's `/v1/finalize` without HTTP). One statement: the share \
             settled in one statement (PostgreSQL's common case); server CPU: the database server's \
             processes' CPU per settlement (SQLite runs in this process).\n",
            crate::ledger_bench::SETTLE_BATCH,
            crate::ledger_bench::SPREAD_USERS
        );
        let _ = writeln!(
            out,
            "| backend | settlements/s | batch p50 / p99 | batches | errors | one statement | server CPU |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
        for b in &ledger.batches {
            let _ = writeln!(
                out,
                "| {} | {:.0} | {} / {} µs | {} | {} | {:.0}% | {} |",
                b.backend,
                b.settlements_per_s,
                b.batch_p50_us,
                b.batch_p99_us,
                b.batches,
                b.errors,
                b.one_statement_share * 100.0,
                b.server_cpu_us_per_settlement
                    .map_or("-".into(), |us| format!("{us:.0} µs"))
            );
        }
        out.push('\n');
    }
    render_ledger_bounds(out, ledger);
    if let Some(profile) = &ledger.sqlite_profile {
        let _ = writeln!(
            out,
            "<details><summary>perf profile: ledger on SQLite, concurrency 16, many users (this process)</summary>\n\n```text\n{profile}\n```\n</details>\n"
        );
    }
    if let Some(profile) = &ledger.postgres_profile {
        let _ = writeln!(
            out,
            "<details><summary>perf profile: ledger on PostgreSQL, concurrency 16, many users (whole machine; PostgreSQL's functions)</summary>\n\n```text\n{profile}\n```\n</details>\n"
        );
    }
    if let Some(profile) = &ledger.sqlite_batch_profile {
        let _ = writeln!(
            out,
            "<details><summary>perf profile: settlement batches on SQLite (this process)</summary>\n\n```text\n{profile}\n```\n</details>\n"
        );
    }
    for failure in &ledger.failures {
        let _ = writeln!(out, "- Not measured: {failure}");
    }
    if !ledger.failures.is_empty() {
        out.push('\n');
    }
}

fn render_core(out: &mut String, results: &Results) {
    let _ = writeln!(out, "## 3. Filter core\n");
    let (native, wasm) = match (&results.core_native, &results.core_wasm) {
        (None, None) => {
            let _ = writeln!(out, "Not run (section not selected).\n");
            return;
        }
        (n, w) => (n.as_ref(), w.as_ref()),
    };
    for (label, run) in [("native", native), ("wasm", wasm)] {
        if let Some(Err(e)) = run {
            let _ = writeln!(out, "- The {label} core bench failed: `{e}`");
        }
    }
    let native = native.and_then(|r| r.as_ref().ok());
    let wasm = wasm.and_then(|r| r.as_ref().ok());
    let _ = writeln!(
        out,
        "`ResponseMeter` (SSE framing + usage extraction) exactly as the filter drives it: one `feed` per body \
         chunk, then `finish` and `report`, a fresh meter per response. The same `llm-meter-bench-core` code \
         runs natively and as a wasm32-wasip1 module under wasmtime (Cranelift; Envoy runs the filter in V8). \
         The `_stripped` case also feeds every chunk to the `InjectedUsageStripper`, as the filter does when it \
         set `stream_options.include_usage` itself (the client did not ask for usage, so the usage chunk is \
         removed from what the client receives): what the filter's wasm does per chunk of the proxy bench's \
         streams. Corpus cases meter every recorded stream of one format ({}), one chunk per event.\n",
        native
            .or(wasm)
            .map_or(String::new(), |r| r.corpus.join(", "))
    );
    let _ = writeln!(
        out,
        "| case | bytes / chunks | native MB/s | native chunks/s | wasm MB/s | wasm chunks/s | wasm / native |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    let cases: Vec<&SpeedResult> = native
        .or(wasm)
        .map(|r| r.speeds.iter().collect())
        .unwrap_or_default();
    for case in cases {
        let n = native.and_then(|r| r.speed(&case.case));
        let w = wasm.and_then(|r| r.speed(&case.case));
        let mb = |s: Option<&SpeedResult>| s.map_or("-".into(), |s| format!("{:.0}", s.mb_per_s));
        let chunks = |s: Option<&SpeedResult>| {
            s.map_or("-".into(), |s| format!("{:.2} M", s.chunks_per_s / 1e6))
        };
        let ratio = n.zip(w).map_or("-".into(), |(n, w)| {
            format!("{:.2}", w.mb_per_s / n.mb_per_s)
        });
        let _ = writeln!(
            out,
            "| {} | {} B / {} | {} | {} | {} | {} | {ratio} |",
            case.case,
            case.bytes,
            case.chunks,
            mb(n),
            chunks(n),
            mb(w),
            chunks(w)
        );
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "Memory (heap bytes counted by a global allocator, so the figures are exact):\n"
    );
    let _ = writeln!(out, "| case | native | wasm |\n|---|---|---|");
    let memory_cases: Vec<&MemoryResult> = native
        .or(wasm)
        .map(|r| r.memory.iter().collect())
        .unwrap_or_default();
    for m in memory_cases {
        let get = |r: Option<&CoreRun>| {
            r.and_then(|r| r.memory(&m.case))
                .map_or("-".into(), |b| format!("{b} B"))
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            describe_memory(&m.case),
            get(native),
            get(wasm)
        );
    }
    out.push('\n');
}

fn describe_memory(case: &str) -> String {
    match case {
        "in_flight_stream_mid_event" => {
            "per in-flight stream, stopped mid-event (1000 streams, mean)".into()
        }
        "peak_stream_10_chunks" => "peak while metering a 10-chunk stream".into(),
        "peak_stream_10000_chunks" => "peak while metering a 10,000-chunk stream".into(),
        "peak_stream_longest_event_1KiB" => "peak, stream whose longest event is 1 KiB".into(),
        "peak_stream_longest_event_1MiB" => "peak, stream whose longest event is 1 MiB".into(),
        other => other.into(),
    }
}

fn render_growth(
    out: &mut String,
    growth: Option<&GrowthSection>,
    native: Option<&CoreRun>,
    wasm: Option<&CoreRun>,
) {
    let _ = writeln!(out, "## 4. Growth\n");
    let Some(growth) = growth else {
        let _ = writeln!(out, "Not run (section not selected).\n");
        return;
    };
    let _ = writeln!(
        out,
        "Sequential authorize + settle (concurrency 1) on users picked across the whole ledger. Users are \
         added in bulk as copies of a template user (account, lot, journal, a settled hold, its usage record \
         and daily cost row), so every table and index grows with the user count. Each size is a database \
         of its own, grown first; then the sizes are measured in interleaved rounds (a share of the pairs \
         on each size per round), so the machine's drift hits all sizes alike; the last column shows each \
         round's authorize+settle p50.\n"
    );
    let _ = writeln!(
        out,
        "| backend | users | authorize p50 / p99 | settle p50 / p99 | pairs | time to add the users | pair p50 per round |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for p in &growth.users {
        let _ = writeln!(
            out,
            "| {} | {} | {} / {} µs | {} / {} µs | {} | {:.1} s | {} µs |",
            p.backend,
            p.size,
            p.authorize_p50_us,
            p.authorize_p99_us,
            p.settle_p50_us,
            p.settle_p99_us,
            p.pairs,
            p.grow_seconds,
            join_figures(&p.round_pair_p50_us)
        );
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "One user with many live lots (distinct priorities and expiries):\n"
    );
    let _ = writeln!(
        out,
        "| backend | live lots | authorize p50 / p99 | settle p50 / p99 | pairs | pair p50 per round |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for p in &growth.lots {
        let _ = writeln!(
            out,
            "| {} | {} | {} / {} µs | {} / {} µs | {} | {} µs |",
            p.backend,
            p.size,
            p.authorize_p50_us,
            p.authorize_p99_us,
            p.settle_p50_us,
            p.settle_p99_us,
            p.pairs,
            join_figures(&p.round_pair_p50_us)
        );
    }
    out.push('\n');
    for (label, run) in [("native", native), ("wasm", wasm)] {
        if let Some(run) = run {
            if let (Some(short), Some(long)) = (
                run.memory("peak_stream_10_chunks"),
                run.memory("peak_stream_10000_chunks"),
            ) {
                let _ = writeln!(
                    out,
                    "- Stream length ({label}): peak heap {short} B for a 10-chunk stream, {long} B for a 10,000-chunk one."
                );
            }
        }
    }
    for failure in &growth.failures {
        let _ = writeln!(out, "- Not measured: {failure}");
    }
    out.push('\n');
}

fn render_bounds(out: &mut String, proxy: Option<&ProxySection>, verdicts: &[Verdict]) {
    let _ = writeln!(out, "## What bounds the figures\n");
    if let Some(proxy) = proxy {
        for stream in [false, true] {
            let shape = if stream { "streamed" } else { "non-streamed" };
            let parts: Vec<String> = proxy
                .runs
                .iter()
                .filter(|r| !r.is_plain())
                .map(|r| {
                    let f: &ShapeFigures = r.shape(stream);
                    format!(
                        "{}{}: {:.2}x plain, Envoy {:.0} µs CPU/req{}",
                        r.label,
                        r.backend.map_or(String::new(), |b| format!(" ({b})")),
                        f.median_ratio(),
                        f.envoy_cpu_us,
                        f.sidecar_cpu_us
                            .map_or(String::new(), |c| format!(" + sidecar {c:.0} µs"))
                    )
                })
                .collect();
            let plain_cpu = plain(proxy).map_or(0.0, |p| p.shape(stream).envoy_cpu_us);
            let _ = writeln!(
                out,
                "- CPU profile per {shape} request (plain Envoy {plain_cpu:.0} µs): {}.",
                parts.join("; ")
            );
        }
        render_cpu_budget(out, proxy);
        out.push('\n');
    }
    if let Some(proxy) = proxy {
        for profile in &proxy.profiles {
            let _ = writeln!(
                out,
                "<details><summary>perf profile: {}</summary>\n\n```text\n{}\n```\n</details>\n",
                profile.label, profile.summary
            );
        }
    }
    let missed: Vec<&Verdict> = verdicts.iter().filter(|v| v.met == Some(false)).collect();
    if missed.is_empty() {
        let _ = writeln!(out, "Every measured target is met in this run.\n");
    } else {
        let _ = writeln!(
            out,
            "Missed in this run: {}.\n",
            missed
                .iter()
                .map(|v| v.target.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    let notes = crate::procs::repo_root().join("bench/ANALYSIS.md");
    if let Ok(text) = std::fs::read_to_string(notes) {
        out.push_str(text.trim());
        out.push_str("\n\n");
    }
}

/// What the non-streamed target would cost in CPU: Envoy runs one worker, so its CPU per
/// request times the target rate must fit in one core, and the sidecar shares the other
/// core with the load generator and the upstream.
fn render_cpu_budget(out: &mut String, proxy: &ProxySection) {
    let Some(plain) = plain(proxy) else {
        return;
    };
    let target_rate = plain.shape(false).median_rps() * 0.5;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for run in proxy
        .runs
        .iter()
        .filter(|r| r.shape(false).sidecar_cpu_us.is_some())
    {
        let figures = run.shape(false);
        let envoy_cores = figures.envoy_cpu_us * target_rate / 1e6;
        let sidecar_cores = figures.sidecar_cpu_us.unwrap_or(0.0) * target_rate / 1e6;
        let machine_cores = figures.machine_cpu_us * target_rate / 1e6;
        let _ = writeln!(
            out,
            "- CPU budget of the non-streamed target for {}{}: at 0.5x plain Envoy ({target_rate:.0} req/s) \
             Envoy's single worker would need {envoy_cores:.2} of a core ({:.0} µs/req) and the sidecar \
             {sidecar_cores:.2} of a core beside the load generator and the upstream; the worker's \
             budget is {:.0} µs/req. The whole machine (every process and the kernel) spent {:.0} µs \
             of CPU per served request ({:.2} of {cpus} cores busy during the closed loops; plain \
             Envoy {:.0} µs, {:.2} cores busy), so 0.5x would need {machine_cores:.2} cores.",
            run.label,
            run.backend.map_or(String::new(), |b| format!(" ({b})")),
            figures.envoy_cpu_us,
            1e6 / target_rate.max(1.0),
            figures.machine_cpu_us,
            figures.machine_busy_cores,
            plain.shape(false).machine_cpu_us,
            plain.shape(false).machine_busy_cores,
        );
    }
    out.push('\n');
}

fn render_method(out: &mut String) {
    let _ = writeln!(
        out,
        "## How to reproduce\n\n`make bench` (about 8 minutes on 2 cores after the build, 14 with a fresh release build; `BENCH_ARGS=--quick make bench` \
         for a short run). It installs `wrk` (apt) and `wasmtime` (pip) when missing, builds the sidecar, the filter \
         and the bench in release, then runs `target/release/llm-meter-bench`, which writes this file and \
         `target/bench/results.json`. PostgreSQL and MariaDB are the ones of `make test` (127.0.0.1:5432 and :3306); \
         every run creates its own databases and drops them. Sources: `bench/`."
    );
}

/// What bounds each many-users cell: the writers' occupancy, the machine's cores and the
/// database server's share; then PostgreSQL's floor (see `floor.rs`) beside the ledger.
fn render_ledger_bounds(out: &mut String, ledger: &LedgerSection) {
    let many: Vec<&LedgerCell> = ledger
        .cells
        .iter()
        .filter(|c| c.spread == Spread::ManyUsers)
        .collect();
    if many.is_empty() {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let _ = writeln!(
        out,
        "What bounds the many-users cells: writers busy is how many of the ledger's group-commit writers \
         were applying a group, on average (at their count the writers are the bound, whatever their \
         transactions wait for); machine is the cores the whole machine kept busy (of {cpus}), server those of \
         the database server's processes (SQLite runs in this process); one statement is the share of \
         settlements made in one statement (PostgreSQL's common case, the sidecar's \
         `ledger/settle_fast.rs`).\n"
    );
    let _ = writeln!(
        out,
        "| backend | concurrency | pairs/s | writers busy | machine cores | server cores | one statement |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for c in &many {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.2} of {} | {:.2} | {} | {:.0}% |",
            c.backend,
            c.concurrency,
            c.pairs_per_s,
            c.writers_busy,
            c.writers,
            c.machine_cores,
            c.server_cores.map_or("-".into(), |s| format!("{s:.2}")),
            c.one_statement_share * 100.0,
        );
    }
    out.push('\n');
    if ledger.floor.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "PostgreSQL floor: the ledger pair's round trips and commits at their fewest (an autocommit \
         guarded `UPDATE .. RETURNING`; then one autocommit statement that locks its row and holds the \
         writes) with one-row statements on two small tables, through the same pool and driver, in the \
         same rounds (`bench/src/floor.rs`). What the ledger does beyond that (holds, lots, journal, \
         usage record, daily costs, and its writers' grouping) is the difference.\n"
    );
    let _ = writeln!(
        out,
        "| concurrency | floor pairs/s | ledger pairs/s (many users) | ledger / floor | machine cores, floor / ledger | server CPU per pair, floor / ledger |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for f in &ledger.floor {
        let cell = ledger_cell(ledger, f.backend, f.concurrency, Spread::ManyUsers);
        let per_pair = |cores: f64, rate: f64| format!("{:.0}", cores * 1e6 / rate.max(1e-9));
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {} | {:.2} / {} | {} / {} µs |",
            f.concurrency,
            f.pairs_per_s,
            cell.map_or("-".into(), |c| format!("{:.0}", c.pairs_per_s)),
            cell.map_or("-".into(), |c| format!(
                "{:.2}",
                c.pairs_per_s / f.pairs_per_s.max(1e-9)
            )),
            f.machine_cores,
            cell.map_or("-".into(), |c| format!("{:.2}", c.machine_cores)),
            per_pair(f.server_cores, f.pairs_per_s),
            cell.and_then(|c| Some(per_pair(c.server_cores?, c.pairs_per_s)))
                .unwrap_or_else(|| "-".into()),
        );
    }
    out.push('\n');
}

/// A cell's operations per group transaction, one decimal.
fn group_size(cell: Option<&LedgerCell>) -> String {
    cell.map_or("-".into(), |c| format!("{:.1}", c.ops_per_group))
}

/// `a / b / c`, or `-` for none.
fn join_figures(figures: &[u64]) -> String {
    if figures.is_empty() {
        return "-".into();
    }
    let parts: Vec<String> = figures.iter().map(u64::to_string).collect();
    parts.join(" / ")
}
