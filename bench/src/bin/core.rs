//! `llm-meter-bench-core [--seconds S] [--corpus DIR]...`: times the filter's parsing core
//! and prints one JSON object per line (`{"speed": ...}` or `{"memory": ...}`). Built both
//! natively and for wasm32-wasip1, where `make bench` runs it under wasmtime.

use std::path::PathBuf;

use llm_meter_bench::alloc::CountingAlloc;
use llm_meter_bench::core::{corpus_workloads, measure, memory_results, synthetic_workloads};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn main() {
    let mut seconds = 1.5;
    let mut corpus: Vec<PathBuf> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--seconds", Some(value)) => match value.parse::<f64>() {
                Ok(s) if s > 0.0 && s <= 60.0 => seconds = s,
                _ => fail(&format!("--seconds wants a number in (0, 60], got {value}")),
            },
            ("--corpus", Some(dir)) => corpus.push(PathBuf::from(dir)),
            _ => fail(&format!("unknown argument {arg}")),
        }
    }

    for memory in memory_results() {
        println!("{}", serde_json::json!({ "memory": memory }));
    }
    let dirs: Vec<&std::path::Path> = corpus.iter().map(PathBuf::as_path).collect();
    let workloads = synthetic_workloads()
        .into_iter()
        .chain(corpus_workloads(&dirs));
    for workload in workloads {
        let result = measure(&workload, seconds);
        println!("{}", serde_json::json!({ "speed": result }));
    }
}

fn fail(message: &str) -> ! {
    eprintln!("llm-meter-bench-core: {message}");
    std::process::exit(2)
}
