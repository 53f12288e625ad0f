//! Proxy overhead: the same load through Envoy in each variant, side by side in one run.
//!
//! Every variant ("stand": plain Envoy, the empty wasm filter, the bare-callout filter, the
//! metering filter with a sidecar on each backend) is started once and stays up (idle
//! stands cost nothing). Loads then run in interleaved rounds — round 1 visits every
//! stand, then round 2, ... — so a slow drift of the machine (other processes) hits every
//! variant alike, and each variant's ratio to plain Envoy is taken within a round (the
//! median over rounds is reported). Open-loop samples of all rounds are pooled.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use llm_meter_sidecar::ledger::{Ledger, LedgerConfig};
use llm_meter_sidecar::storage::DbOptions;
use serde::Serialize;

use crate::databases::{Backend, BenchDb};
use crate::envoy::{Envoy, Variant, SHARED_SECRET, USER_HEADER};
use crate::openloop::{self, OpenLoop, OpenLoopPlan, OpenLoopSamples};
use crate::procs::{
    cpu_seconds, free_port, http_get_body, http_post, machine_busy_seconds, repo_root, rss_bytes,
    scratch_dir, Proc,
};
use crate::seed;
use crate::stats::median;
use crate::stream::chat_request_body;
use crate::upstream::Upstream;
use crate::wrk::{self, ClosedLoop};

#[derive(Debug, Clone)]
pub struct ProxyPlan {
    pub rounds: usize,
    pub closed_seconds: u64,
    pub warmup_seconds: u64,
    pub open_seconds: f64,
    pub connections: usize,
    pub open_connections: usize,
    pub users: usize,
    pub backends: Vec<Backend>,
}

/// Seconds of unmeasured load on a stand right before each measured run of it (see `measure`).
pub const REWARM_SECONDS: u64 = 1;

/// Figures of one load shape (non-streamed or streamed) through one stand.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ShapeFigures {
    /// Closed-loop requests per second, per round.
    pub closed_rps: Vec<f64>,
    /// Closed-loop throughput over plain Envoy's in the same round, per round.
    pub ratio_to_plain: Vec<f64>,
    /// Median over rounds of wrk's own percentiles.
    pub closed_p50_us: u64,
    pub closed_p99_us: u64,
    /// Non-2xx answers and socket errors, all rounds.
    pub errors: u64,
    /// CPU time per request of each process (µs) over all closed-loop rounds.
    pub envoy_cpu_us: f64,
    pub sidecar_cpu_us: Option<f64>,
    /// CPU time per request of the whole machine (µs): these two, the load generator, the
    /// upstream, the database and the kernel's network work.
    pub machine_cpu_us: f64,
    /// Cores the machine kept busy on average during the closed loops.
    pub machine_busy_cores: f64,
    /// Pooled open-loop figures at the common rate.
    pub open: Option<OpenLoop>,
}

impl ShapeFigures {
    pub fn median_rps(&self) -> f64 {
        median(&self.closed_rps)
    }

    pub fn median_ratio(&self) -> f64 {
        median(&self.ratio_to_plain)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StandRun {
    pub label: String,
    pub backend: Option<&'static str>,
    pub json: ShapeFigures,
    pub stream: ShapeFigures,
    /// The filter's own counters after the run (metering stands).
    pub filter_stats: Vec<(String, u64)>,
    /// The sidecar's counters after the run (metering stands): see [`sidecar_stats`].
    pub sidecar_stats: Vec<(String, u64)>,
    pub envoy_rss_bytes: Option<u64>,
    pub sidecar_rss_bytes: Option<u64>,
}

impl StandRun {
    pub fn is_plain(&self) -> bool {
        self.label == Variant::Plain.label()
    }

    pub fn shape(&self, stream: bool) -> &ShapeFigures {
        if stream {
            &self.stream
        } else {
            &self.json
        }
    }
}

/// A `perf` summary taken while one stand ran a closed loop.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub label: String,
    pub summary: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProxySection {
    pub runs: Vec<StandRun>,
    pub profiles: Vec<Profile>,
    pub rounds: usize,
    pub json_rate: f64,
    pub stream_rate: f64,
    pub failures: Vec<String>,
}

/// A running variant: Envoy, and for metering its sidecar and database.
struct Stand {
    label: String,
    backend: Option<Backend>,
    envoy: Envoy,
    sidecar: Option<SidecarProc>,
    database: Option<BenchDb>,
    dir: PathBuf,
    cpu: [CpuTally; 2],
    closed: [Vec<ClosedLoop>; 2],
    open: [Vec<OpenLoopSamples>; 2],
}

#[derive(Default, Clone, Copy)]
struct CpuTally {
    envoy_seconds: f64,
    sidecar_seconds: f64,
    machine_seconds: f64,
    wall_seconds: f64,
    requests: u64,
}

pub async fn run(plan: &ProxyPlan) -> Result<ProxySection> {
    let upstream = Upstream::start()?;
    let mut failures = Vec::new();
    let mut stands = Vec::new();
    for variant in [Variant::Plain, Variant::EmptyWasm, Variant::CalloutWasm] {
        match start_stand(variant, &upstream) {
            Ok(stand) => stands.push(stand),
            Err(e) if variant == Variant::Plain => return Err(e.context("plain Envoy")),
            Err(e) => failures.push(format!("{}: {e:#}", variant.label())),
        }
    }
    // Every backend with the default configuration, and the first one (SQLite) once more
    // with leases off, to show what admission by lease is worth.
    let mut metering: Vec<(Backend, bool)> = plan.backends.iter().map(|&b| (b, true)).collect();
    if let Some(&first) = plan.backends.first() {
        metering.push((first, false));
    }
    for (backend, leases) in metering {
        match start_metering_stand(plan, &upstream, backend, leases).await {
            Ok(stand) => stands.push(stand),
            Err(e) => failures.push(format!("metering on {}: {e:#}", backend.label())),
        }
    }
    let result = measure(plan, &mut stands).await;
    let profiles = if result.is_ok() {
        profile_stands(plan, &stands)
    } else {
        Vec::new()
    };
    let mut runs = Vec::new();
    for stand in &stands {
        runs.push(summarize(stand));
    }
    for stand in stands {
        stop_stand(stand).await;
    }
    let (json_rate, stream_rate) = result?;
    add_ratios(&mut runs);
    Ok(ProxySection {
        runs,
        profiles,
        rounds: plan.rounds,
        json_rate,
        stream_rate,
        failures,
    })
}

/// One non-streamed and one streamed call must come back complete through the stand
/// before any load runs: a broken variant is reported, not measured as fast failures.
fn smoke(port: u16, envoy: &Envoy) -> Result<()> {
    for stream in [false, true] {
        let body = chat_request_body(stream, 300);
        let answer = http_post(
            port,
            "/v1/chat/completions",
            &[(USER_HEADER, &seed::user_name(0))],
            &body,
            Duration::from_secs(10),
        );
        let expected = if stream {
            "[DONE]"
        } else {
            "completion_tokens"
        };
        match answer {
            Some((200, text)) if text.contains(expected) => {}
            Some((status, text)) => bail!(
                "a {} call answered {status}: {}\nEnvoy log tail:\n{}",
                if stream { "streamed" } else { "non-streamed" },
                text.chars().take(600).collect::<String>(),
                envoy.proc.log_tail(20)
            ),
            None => bail!(
                "a {} call got no complete answer within 10 s\nEnvoy log tail:\n{}",
                if stream { "streamed" } else { "non-streamed" },
                envoy.proc.log_tail(20)
            ),
        }
    }
    Ok(())
}

/// Unmeasured closed-loop load on `stand` for `seconds`: the first warm-up (V8 tiers the
/// module up, connection pools fill, the sidecar's caches load), and again right before
/// each measured run. The other stands ran meanwhile, and the filter releases the lease of
/// a caller idle for `lease_idle_ms` (2 s): without the second, every measured window would
/// begin with all 1,000 users asking for a lease again, a cold start, not the steady state.
fn warm_up(plan: &ProxyPlan, stand: &Stand, stream: bool, seconds: u64) -> Result<()> {
    closed_loop(plan, stand, stream, seconds)
        .with_context(|| format!("warm-up of {}", stand.label))?;
    Ok(())
}

/// `wrk` against `stand` for `seconds` with the plan's users and connections.
fn closed_loop(
    plan: &ProxyPlan,
    stand: &Stand,
    stream: bool,
    seconds: u64,
) -> Result<wrk::ClosedLoop> {
    wrk::run(
        &stand.dir,
        stand.envoy.port,
        stream,
        plan.users,
        plan.connections,
        seconds,
    )
}

/// Warm-up, closed-loop rounds, then open-loop rounds at half of plain Envoy's capacity,
/// each measured run right after a short unmeasured one of the same load.
async fn measure(plan: &ProxyPlan, stands: &mut [Stand]) -> Result<(f64, f64)> {
    for stand in stands.iter() {
        eprintln!("bench: proxy warm-up, {}", stand.label);
        for stream in [false, true] {
            warm_up(plan, stand, stream, plan.warmup_seconds)?;
        }
    }
    for round in 0..plan.rounds {
        eprintln!(
            "bench: proxy closed loop, round {}/{}",
            round + 1,
            plan.rounds
        );
        for (shape, stream) in [false, true].into_iter().enumerate() {
            for stand in stands.iter_mut() {
                warm_up(plan, stand, stream, REWARM_SECONDS)?;
                let envoy_before = cpu_seconds(stand.envoy.proc.pid()).unwrap_or(0.0);
                let sidecar_pid = stand.sidecar.as_ref().map(|s| s.proc.pid());
                let sidecar_before = sidecar_pid.and_then(cpu_seconds).unwrap_or(0.0);
                let machine_before = machine_busy_seconds().unwrap_or(0.0);
                let started = std::time::Instant::now();
                let closed = closed_loop(plan, stand, stream, plan.closed_seconds)?;
                let tally = &mut stand.cpu[shape];
                tally.wall_seconds += started.elapsed().as_secs_f64();
                tally.machine_seconds += machine_busy_seconds().unwrap_or(0.0) - machine_before;
                tally.envoy_seconds +=
                    cpu_seconds(stand.envoy.proc.pid()).unwrap_or(0.0) - envoy_before;
                tally.sidecar_seconds +=
                    sidecar_pid.and_then(cpu_seconds).unwrap_or(0.0) - sidecar_before;
                tally.requests += closed.requests;
                stand.closed[shape].push(closed);
            }
        }
    }
    let plain_rps = |shape: usize| -> f64 {
        let rates: Vec<f64> = stands[0].closed[shape]
            .iter()
            .map(|c| c.requests_per_s)
            .collect();
        (median(&rates) / 2.0).floor().max(1.0)
    };
    let rates = [plain_rps(0), plain_rps(1)];
    for round in 0..plan.rounds {
        eprintln!(
            "bench: proxy open loop at {:.0} / {:.0} req/s, round {}/{}",
            rates[0],
            rates[1],
            round + 1,
            plan.rounds
        );
        for (shape, stream) in [false, true].into_iter().enumerate() {
            for (index, stand) in stands.iter_mut().enumerate() {
                // A stand whose closed loop served less than the rate cannot hold it: its
                // queue would only grow, and its latencies would measure the run's length.
                if index > 0 && stand.capacity(shape) < rates[shape] {
                    continue;
                }
                let open_plan = OpenLoopPlan {
                    port: stand.envoy.port,
                    stream,
                    users: plan.users,
                    rate: rates[shape],
                    seconds: REWARM_SECONDS as f64,
                    connections: plan.open_connections,
                };
                tokio::task::spawn_blocking(move || openloop::run(open_plan)).await??;
                let open_plan = OpenLoopPlan {
                    seconds: plan.open_seconds,
                    ..open_plan
                };
                let samples =
                    tokio::task::spawn_blocking(move || openloop::run(open_plan)).await??;
                stand.open[shape].push(samples);
            }
        }
    }
    Ok((rates[0], rates[1]))
}

impl Stand {
    /// Median closed-loop requests per second of one shape (0 non-streamed, 1 streamed).
    fn capacity(&self, shape: usize) -> f64 {
        let rates: Vec<f64> = self.closed[shape]
            .iter()
            .map(|c| c.requests_per_s)
            .collect();
        median(&rates)
    }
}

/// Profiles of plain Envoy and of the first metering stand (Envoy and sidecar together)
/// under the closed loop, when `perf` is usable here.
fn profile_stands(plan: &ProxyPlan, stands: &[Stand]) -> Vec<Profile> {
    if !crate::profile::available() {
        return vec![Profile {
            label: "no profile".into(),
            summary: "`perf` is not installed or not permitted here (apt-get install linux-perf)"
                .into(),
        }];
    }
    let mut profiles = Vec::new();
    let metering = stands
        .iter()
        .find(|s| s.sidecar.is_some() && s.label == crate::envoy::METERING_LABEL);
    let plain = stands
        .iter()
        .find(|s| s.backend.is_none() && s.label == Variant::Plain.label());
    let targets = [(plain, false), (metering, false), (metering, true)];
    for (stand, stream) in targets {
        let Some(stand) = stand else { continue };
        let mut pids = vec![stand.envoy.proc.pid()];
        pids.extend(stand.sidecar.as_ref().map(|s| s.proc.pid()));
        let label = format!(
            "{}{}, {} closed loop",
            stand.label,
            stand
                .backend
                .map_or(String::new(), |b| format!(" ({})", b.label())),
            if stream { "streamed" } else { "non-streamed" }
        );
        eprintln!("bench: profiling {label}");
        let summary = crate::profile::start(&stand.dir, "proxy", &pids).and_then(|recording| {
            closed_loop(plan, stand, stream, plan.closed_seconds)?;
            recording.finish()
        });
        profiles.push(Profile {
            label,
            summary: summary.unwrap_or_else(|e| format!("profile failed: {e:#}")),
        });
    }
    profiles
}

fn summarize(stand: &Stand) -> StandRun {
    let shape = |i: usize| -> ShapeFigures {
        let closed = &stand.closed[i];
        let p50: Vec<f64> = closed.iter().map(|c| c.p50_us as f64).collect();
        let p99: Vec<f64> = closed.iter().map(|c| c.p99_us as f64).collect();
        let cpu = stand.cpu[i];
        let per_request = |seconds: f64| seconds * 1e6 / cpu.requests.max(1) as f64;
        ShapeFigures {
            closed_rps: closed.iter().map(|c| c.requests_per_s).collect(),
            ratio_to_plain: Vec::new(),
            closed_p50_us: median(&p50) as u64,
            closed_p99_us: median(&p99) as u64,
            errors: closed.iter().map(|c| c.non_2xx + c.socket_errors).sum(),
            envoy_cpu_us: per_request(cpu.envoy_seconds),
            sidecar_cpu_us: stand
                .sidecar
                .as_ref()
                .map(|_| per_request(cpu.sidecar_seconds)),
            machine_cpu_us: per_request(cpu.machine_seconds),
            machine_busy_cores: cpu.machine_seconds / cpu.wall_seconds.max(1e-9),
            open: (!stand.open[i].is_empty()).then(|| openloop::summarize(&stand.open[i])),
        }
    };
    StandRun {
        label: stand.label.clone(),
        backend: stand.backend.map(Backend::label),
        json: shape(0),
        stream: shape(1),
        filter_stats: if stand.sidecar.is_some() {
            stand.envoy.stats_matching("wasmcustom.llm_meter.")
        } else {
            Vec::new()
        },
        sidecar_stats: stand
            .sidecar
            .as_ref()
            .map_or_else(Vec::new, |s| sidecar_stats(s.port)),
        envoy_rss_bytes: rss_bytes(stand.envoy.proc.pid()),
        sidecar_rss_bytes: stand.sidecar.as_ref().and_then(|s| rss_bytes(s.proc.pid())),
    }
}

/// Each stand's throughput over plain Envoy's in the same round.
fn add_ratios(runs: &mut [StandRun]) {
    let Some(plain) = runs.iter().find(|r| r.is_plain()).cloned() else {
        return;
    };
    for run in runs.iter_mut() {
        for stream in [false, true] {
            let base = plain.shape(stream).closed_rps.clone();
            let figures = if stream {
                &mut run.stream
            } else {
                &mut run.json
            };
            figures.ratio_to_plain = figures
                .closed_rps
                .iter()
                .zip(&base)
                .map(|(rps, base)| rps / base.max(1e-9))
                .collect();
        }
    }
}

fn start_stand(variant: Variant, upstream: &Upstream) -> Result<Stand> {
    let dir = scratch_dir("proxy")?;
    let envoy = Envoy::start(&dir, variant, upstream.port())?;
    smoke(envoy.port, &envoy)?;
    Ok(Stand {
        label: variant.label().to_string(),
        backend: None,
        envoy,
        sidecar: None,
        database: None,
        dir,
        cpu: Default::default(),
        closed: Default::default(),
        open: Default::default(),
    })
}

async fn start_metering_stand(
    plan: &ProxyPlan,
    upstream: &Upstream,
    backend: Backend,
    leases: bool,
) -> Result<Stand> {
    let dir = scratch_dir("proxy-meter")?;
    let database = BenchDb::create(backend, &dir, "proxy").await?;
    let started = async {
        let db = database.connect(DbOptions::default()).await?;
        let ledger = Ledger::new(db.clone(), LedgerConfig::default());
        seed::seed_catalog(&ledger).await?;
        seed::grant_users(&ledger, plan.users, 1_000_000_000_000).await?;
        db.close().await;
        let sidecar = start_sidecar(&dir, &database.url)?;
        let envoy = Envoy::start(
            &dir,
            Variant::Metering {
                sidecar_port: sidecar.port,
                leases,
            },
            upstream.port(),
        )?;
        smoke(envoy.port, &envoy)
            .map_err(|e| e.context(format!("sidecar log tail:\n{}", sidecar.proc.log_tail(20))))?;
        Ok::<_, anyhow::Error>((sidecar, envoy))
    }
    .await;
    match started {
        Ok((sidecar, envoy)) => Ok(Stand {
            label: Variant::Metering {
                sidecar_port: 0,
                leases,
            }
            .label()
            .to_string(),
            backend: Some(backend),
            envoy,
            sidecar: Some(sidecar),
            database: Some(database),
            dir,
            cpu: Default::default(),
            closed: Default::default(),
            open: Default::default(),
        }),
        Err(e) => {
            database.drop_database().await;
            crate::procs::remove_scratch(&dir);
            Err(e)
        }
    }
}

async fn stop_stand(stand: Stand) {
    let Stand {
        envoy,
        sidecar,
        database,
        dir,
        ..
    } = stand;
    drop(envoy);
    drop(sidecar);
    if let Some(database) = database {
        database.drop_database().await;
    }
    crate::procs::remove_scratch(&dir);
}

/// From the sidecar's `/metrics`: finalize batches answered, settlements in them, and
/// those made in one statement (their ratio is the batch size the filter's outbox sent).
fn sidecar_stats(port: u16) -> Vec<(String, u64)> {
    let Some(text) = http_get_body(port, "/metrics") else {
        return Vec::new();
    };
    let finalize_route = format!(
        "meter_http_requests_total{{route=\"{}\"",
        llm_meter_protocol::PATH_FINALIZE_BATCH
    );
    let sum = |prefix: &str| -> u64 {
        text.lines()
            .filter(|line| line.starts_with(prefix))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    vec![
        ("finalize_batches".into(), sum(&finalize_route)),
        (
            "settlements".into(),
            sum("meter_settlements_total{status=\"settled\"}"),
        ),
        (
            "one_statement_settlements".into(),
            sum("meter_ledger_one_statement_settlements_total"),
        ),
    ]
}

/// The sidecar process on a seeded database.
struct SidecarProc {
    port: u16,
    proc: Proc,
}

fn sidecar_binary() -> PathBuf {
    std::env::var("LLM_METER_SIDECAR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target/release/llm-meter-sidecar"))
}

fn start_sidecar(dir: &Path, database_url: &str) -> Result<SidecarProc> {
    let binary = sidecar_binary();
    if !binary.is_file() {
        bail!("{} is not built (make bench builds it)", binary.display());
    }
    let port = free_port()?;
    let mut command = Command::new(binary);
    command
        .arg("serve")
        .env("METER_LISTEN", format!("127.0.0.1:{port}"))
        .env("DATABASE_URL", database_url)
        .env("METER_SHARED_SECRET", SHARED_SECRET)
        .env("METER_ADMIN_TOKEN", "bench-admin-token")
        .env("RUST_LOG", "warn");
    let mut proc = Proc::spawn("sidecar", command, &dir.join("sidecar.log"))?;
    proc.wait_ready(port, "/readyz", Duration::from_secs(30))?;
    Ok(SidecarProc { port, proc })
}
