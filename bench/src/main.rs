//! `llm-meter-bench`: runs every section of `make bench` and writes BENCHMARKS.md.
//!
//! ```text
//! llm-meter-bench [--quick] [--sections core,proxy,ledger,growth] [--out BENCHMARKS.md]
//!                 [--backends sqlite,postgres,mariadb]
//!                 [--json target/bench/results.json]
//! ```
//!
//! `BENCH_FILTER_EXTRA='{"lease_idle_ms": 60000}'` replaces metering filter settings for a
//! trial against the defaults; the report's header then says so.
//!
//! Expects the release builds `make bench` makes first: the sidecar, the filter and the
//! baseline filters (wasm32-wasip1), and `llm-meter-bench-core` natively and in wasm.
//! Every load is bounded in time; every process it starts is stopped when it ends.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use llm_meter_bench::core::{MemoryResult, SpeedResult};
use llm_meter_bench::databases::Backend;
use llm_meter_bench::procs::{repo_root, scratch_dir};
use llm_meter_bench::report::{CoreRun, Meta, Results};
use llm_meter_bench::{growth, ledger_bench, proxy, report};

struct Args {
    quick: bool,
    sections: Vec<String>,
    /// Databases the sections measure (MariaDB only in the ledger section).
    backends: Vec<Backend>,
    out: PathBuf,
    json: PathBuf,
}

fn parse_args() -> Result<Args> {
    // Checked now, not when the proxy section starts its first Envoy.
    llm_meter_bench::envoy::filter_overrides()?;
    let root = repo_root();
    let mut args = Args {
        quick: false,
        sections: ["core", "proxy", "ledger", "growth"]
            .map(String::from)
            .to_vec(),
        backends: vec![Backend::Sqlite, Backend::Postgres, Backend::MariaDb],
        out: root.join("BENCHMARKS.md"),
        json: root.join("target/bench/results.json"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--sections" => {
                let value = it.next().context("--sections wants a list")?;
                args.sections = value.split(',').map(|s| s.trim().to_string()).collect();
            }
            "--backends" => {
                let value = it.next().context("--backends wants a list")?;
                args.backends = value
                    .split(',')
                    .map(|b| match b.trim() {
                        "sqlite" => Ok(Backend::Sqlite),
                        "postgres" => Ok(Backend::Postgres),
                        "mariadb" => Ok(Backend::MariaDb),
                        other => bail!("unknown backend {other} (sqlite, postgres, mariadb)"),
                    })
                    .collect::<Result<_>>()?;
            }
            "--out" => args.out = it.next().context("--out wants a path")?.into(),
            "--json" => args.json = it.next().context("--json wants a path")?.into(),
            other => bail!("unknown argument {other} (see the doc comment of bench/src/main.rs)"),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("llm-meter-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("llm-meter-bench: no runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llm-meter-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    let wants = |s: &str| args.sections.iter().any(|x| x == s);
    let mut results = Results {
        meta: Meta::collect(args.quick),
        ..Results::default()
    };
    let dir = scratch_dir("run")?;

    if wants("core") {
        eprintln!("bench: filter core, native and wasm");
        let seconds = if args.quick { 0.6 } else { 1.2 };
        results.core_native = Some(run_core(false, seconds).map_err(|e| format!("{e:#}")));
        results.core_wasm = Some(run_core(true, seconds).map_err(|e| format!("{e:#}")));
    }
    if wants("proxy") {
        let plan = proxy::ProxyPlan {
            rounds: if args.quick { 2 } else { 3 },
            closed_seconds: if args.quick { 2 } else { 3 },
            warmup_seconds: if args.quick { 1 } else { 2 },
            open_seconds: if args.quick { 2.0 } else { 3.0 },
            connections: 32,
            open_connections: 64,
            users: 1000,
            backends: (args.backends.iter().copied())
                .filter(|b| *b != Backend::MariaDb)
                .collect(),
        };
        results.proxy = Some(proxy::run(&plan).await.map_err(|e| format!("{e:#}")));
    }
    if wants("ledger") {
        let plan = ledger_bench::CellPlan {
            rounds: if args.quick { 1 } else { 3 },
            seconds: 1.0,
        };
        results.ledger = Some(ledger_bench::run(&dir, &args.backends, &[1, 16, 64], plan).await);
    }
    if wants("growth") {
        let (levels, pairs): (&[u64], usize) = if args.quick {
            (&[10_000, 100_000], 300)
        } else {
            (&[10_000, 100_000, 1_000_000], 500)
        };
        let backends: Vec<Backend> = (args.backends.iter().copied())
            .filter(|b| *b != Backend::MariaDb)
            .collect();
        results.growth = Some(growth::run(&dir, &backends, levels, &[1, 100, 1000], pairs).await);
    }
    llm_meter_bench::procs::remove_scratch(&dir);

    results.meta.finish(started.elapsed().as_secs_f64());
    if let Some(parent) = args.json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("write {}", args.json.display()))?;
    let markdown = report::render(&results);
    std::fs::write(&args.out, &markdown)
        .with_context(|| format!("write {}", args.out.display()))?;
    eprintln!(
        "bench: wrote {} and {} in {:.0} s",
        args.out.display(),
        args.json.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Run `llm-meter-bench-core` natively or in wasm and collect its JSON lines.
fn run_core(wasm: bool, seconds: f64) -> Result<CoreRun> {
    let root = repo_root();
    let mut corpus: Vec<PathBuf> = vec![root.join("tests/fixtures")];
    let shared = root.join("../shared/fixtures");
    if shared.is_dir() {
        corpus.push(shared.canonicalize().unwrap_or(shared));
    }
    let mut command = if wasm {
        let module = root.join("target/wasm32-wasip1/release/llm-meter-bench-core.wasm");
        let mut c = Command::new("python3");
        c.arg(root.join("bench/scripts/run_wasm.py")).arg(module);
        c
    } else {
        Command::new(root.join("target/release/llm-meter-bench-core"))
    };
    command.arg("--seconds").arg(seconds.to_string());
    for dir in &corpus {
        command.arg("--corpus").arg(dir);
    }
    let output = command.output().context("run the core bench")?;
    if !output.status.success() {
        bail!(
            "core bench failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_core_output(&String::from_utf8_lossy(&output.stdout), &corpus)
}

fn parse_core_output(stdout: &str, corpus: &[PathBuf]) -> Result<CoreRun> {
    let mut run = CoreRun {
        speeds: Vec::new(),
        memory: Vec::new(),
        corpus: corpus.iter().map(|p| display(p)).collect(),
    };
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("core bench line {line}"))?;
        if let Some(speed) = value.get("speed") {
            run.speeds
                .push(serde_json::from_value::<SpeedResult>(speed.clone())?);
        } else if let Some(memory) = value.get("memory") {
            run.memory
                .push(serde_json::from_value::<MemoryResult>(memory.clone())?);
        }
    }
    Ok(run)
}

fn display(path: &Path) -> String {
    let root = repo_root();
    path.strip_prefix(&root)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| path.display().to_string())
}
