//! Ledger throughput: authorize+settle pairs per second through the sidecar's `Ledger`
//! (in process, the same code the sidecar's HTTP handlers call), at several concurrencies,
//! with calls spread over many users or all on one hot user; and a drain test proving
//! that concurrent admission never overdraws.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use llm_meter_protocol::{Decision, Finalize, LeaseAsk};
use llm_meter_sidecar::ledger::{Ledger, LedgerConfig};
use llm_meter_sidecar::storage::DbOptions;
use serde::Serialize;

use crate::databases::{Backend, BenchDb};
use crate::seed::{self, authorize_request, settle_request, units_per_call};
use crate::stats::quantile;

/// Users in the "spread" distribution.
pub const SPREAD_USERS: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Spread {
    ManyUsers,
    HotUser,
}

#[derive(Debug, Clone, Serialize)]
pub struct LedgerCell {
    pub backend: &'static str,
    pub concurrency: usize,
    pub spread: Spread,
    pub pairs: u64,
    pub pairs_per_s: f64,
    pub denied: u64,
    pub errors: u64,
    pub authorize_p50_us: u64,
    pub authorize_p99_us: u64,
    pub settle_p50_us: u64,
    pub settle_p99_us: u64,
    /// Operations per group transaction during the cell (see the sidecar's `ledger::group`).
    pub ops_per_group: f64,
}

/// The drain test: a hot user granted exactly `expected` calls, hammered by many tasks.
#[derive(Debug, Clone, Serialize)]
pub struct OverdrawCheck {
    pub backend: &'static str,
    pub concurrency: usize,
    pub expected_allowed: u64,
    pub allowed: u64,
    pub remaining_after: u64,
    pub held_after: u64,
    pub debt_after: u64,
    pub reconcile_clean: bool,
}

impl OverdrawCheck {
    pub fn holds(&self) -> bool {
        self.allowed == self.expected_allowed
            && self.remaining_after == 0
            && self.held_after == 0
            && self.debt_after == 0
            && self.reconcile_clean
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LedgerSection {
    pub cells: Vec<LedgerCell>,
    /// `perf` summary of this process during the SQLite, concurrency 16, many-users cell.
    pub sqlite_profile: Option<String>,
    pub overdraw: Vec<OverdrawCheck>,
    /// Settlement batches as the filter's outbox sends them.
    pub batches: Vec<BatchCell>,
    pub failures: Vec<String>,
}

/// The filter's settlement path: batches of calls settled under their users' leases, sent
/// one after another (the outbox keeps one batch in flight), each through `Ledger::finalize`.
#[derive(Debug, Clone, Serialize)]
pub struct BatchCell {
    pub backend: &'static str,
    pub batch_size: usize,
    pub batches: u64,
    pub settlements_per_s: f64,
    pub batch_p50_us: u64,
    pub batch_p99_us: u64,
    pub errors: u64,
}

/// Calls per settlement batch (the filter's default `settle_batch_max`).
pub const SETTLE_BATCH: usize = 100;

/// Run every backend × concurrency × spread cell for `seconds` each.
pub async fn run(
    dir: &std::path::Path,
    backends: &[Backend],
    concurrencies: &[usize],
    seconds: f64,
) -> LedgerSection {
    let mut section = LedgerSection {
        cells: Vec::new(),
        sqlite_profile: None,
        overdraw: Vec::new(),
        batches: Vec::new(),
        failures: Vec::new(),
    };
    for &backend in backends {
        eprintln!("bench: ledger on {}", backend.label());
        match run_backend(dir, backend, concurrencies, seconds, &mut section).await {
            Ok(()) => {}
            Err(e) => section.failures.push(format!("{}: {e:#}", backend.label())),
        }
    }
    section
}

async fn run_backend(
    dir: &std::path::Path,
    backend: Backend,
    concurrencies: &[usize],
    seconds: f64,
    section: &mut LedgerSection,
) -> Result<()> {
    let bench_db = BenchDb::create(backend, dir, "ledger").await?;
    let result = async {
        let db = bench_db.connect(DbOptions::default()).await?;
        let ledger = Ledger::new(db, LedgerConfig::default());
        seed::seed_catalog(&ledger).await?;
        seed::grant_users(&ledger, SPREAD_USERS, 1_000_000_000_000).await?;
        seed::grant(&ledger, "bench-hot-user", 1_000_000_000_000, "bench-hot").await?;
        for (round, &concurrency) in concurrencies.iter().enumerate() {
            for spread in [Spread::ManyUsers, Spread::HotUser] {
                let label = format!(
                    "r{round}{}",
                    if spread == Spread::HotUser { "h" } else { "m" }
                );
                let profiled = backend == Backend::Sqlite
                    && concurrency == 16
                    && spread == Spread::ManyUsers
                    && crate::profile::available();
                let recording = profiled
                    .then(|| crate::profile::start(dir, "ledger", &[std::process::id()]).ok())
                    .flatten();
                let cell = run_cell(&ledger, backend, concurrency, spread, seconds, &label).await;
                if let Some(recording) = recording {
                    section.sqlite_profile = Some(
                        recording
                            .finish()
                            .unwrap_or_else(|e| format!("profile failed: {e:#}")),
                    );
                }
                eprintln!(
                    "bench:   c={concurrency:<3} {spread:?}: {:.0} pairs/s",
                    cell.pairs_per_s
                );
                section.cells.push(cell);
            }
        }
        let batches = settle_batches(&ledger, backend, seconds).await?;
        eprintln!(
            "bench:   settlement batches of {SETTLE_BATCH}: {:.0} settlements/s",
            batches.settlements_per_s
        );
        section.batches.push(batches);
        let concurrency = concurrencies.iter().copied().max().unwrap_or(16);
        section
            .overdraw
            .push(drain(&ledger, backend, concurrency, 500).await?);
        ledger.db().close().await;
        Ok(())
    }
    .await;
    bench_db.drop_database().await;
    result
}

/// Leases for every spread user, then batches of [`SETTLE_BATCH`] calls under them, one
/// batch at a time, for `seconds`.
async fn settle_batches(ledger: &Ledger, backend: Backend, seconds: f64) -> Result<BatchCell> {
    let mut leases = Vec::with_capacity(SPREAD_USERS);
    for i in 0..SPREAD_USERS {
        let user = seed::user_name(i);
        let mut ask = authorize_request(&format!("batch-lease-{i}"), &user);
        ask.lease = Some(LeaseAsk {
            units: 100_000_000,
            ttl_ms: 60_000,
        });
        let answer = ledger.authorize(&ask).await.context("lease for a batch")?;
        let lease = answer.lease.context("no lease granted")?;
        leases.push((user, lease.lease_id));
    }
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let (mut latencies, mut settled, mut errors, mut n) = (Vec::new(), 0u64, 0u64, 0usize);
    while Instant::now() < deadline {
        let items: Vec<Finalize> = (0..SETTLE_BATCH)
            .map(|_| {
                let (user, lease_id) = &leases[(n * 7919) % SPREAD_USERS];
                n += 1;
                let mut call = settle_request(&format!("batch-call-{n}"), user);
                call.lease_id = Some(lease_id.clone());
                call.held = units_per_call();
                Finalize::Settle(call)
            })
            .collect();
        let started = Instant::now();
        let results = ledger.finalize(&items).await;
        latencies.push(started.elapsed().as_micros() as u64);
        for result in results {
            match result {
                Ok(_) => settled += 1,
                Err(_) => errors += 1,
            }
        }
    }
    let elapsed: f64 = latencies.iter().sum::<u64>() as f64 / 1e6;
    latencies.sort_unstable();
    Ok(BatchCell {
        backend: backend.label(),
        batch_size: SETTLE_BATCH,
        batches: latencies.len() as u64,
        settlements_per_s: settled as f64 / elapsed.max(1e-9),
        batch_p50_us: quantile(&latencies, 0.5),
        batch_p99_us: quantile(&latencies, 0.99),
        errors,
    })
}

struct TaskTally {
    authorize_us: Vec<u64>,
    settle_us: Vec<u64>,
    denied: u64,
    errors: u64,
}

async fn run_cell(
    ledger: &Ledger,
    backend: Backend,
    concurrency: usize,
    spread: Spread,
    seconds: f64,
    label: &str,
) -> LedgerCell {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let commits_before = ledger.group_commits();
    let mut tasks = Vec::new();
    for task in 0..concurrency {
        let ledger = ledger.clone();
        let label = label.to_string();
        tasks.push(tokio::spawn(async move {
            let mut tally = TaskTally {
                authorize_us: Vec::new(),
                settle_us: Vec::new(),
                denied: 0,
                errors: 0,
            };
            let mut n = 0usize;
            while Instant::now() < deadline {
                let user = match spread {
                    Spread::HotUser => "bench-hot-user".to_string(),
                    Spread::ManyUsers => {
                        seed::user_name((task * 7919 + n * 104_729) % SPREAD_USERS)
                    }
                };
                let request_id = format!("{label}-{task}-{n}");
                n += 1;
                let started = Instant::now();
                let authorized = ledger
                    .authorize(&authorize_request(&request_id, &user))
                    .await;
                tally
                    .authorize_us
                    .push(started.elapsed().as_micros() as u64);
                match authorized {
                    Ok(response) if response.decision == Decision::Allow => {}
                    Ok(_) => {
                        tally.denied += 1;
                        continue;
                    }
                    Err(_) => {
                        tally.errors += 1;
                        continue;
                    }
                }
                let started = Instant::now();
                let settled = ledger.settle(&settle_request(&request_id, &user)).await;
                tally.settle_us.push(started.elapsed().as_micros() as u64);
                if settled.is_err() {
                    tally.errors += 1;
                }
            }
            tally
        }));
    }
    let started = Instant::now();
    let mut authorize_us = Vec::new();
    let mut settle_us = Vec::new();
    let (mut denied, mut errors) = (0, 0);
    for task in tasks {
        if let Ok(tally) = task.await {
            authorize_us.extend(tally.authorize_us);
            settle_us.extend(tally.settle_us);
            denied += tally.denied;
            errors += tally.errors;
        } else {
            errors += 1;
        }
    }
    // Every task stops at the deadline; the elapsed time includes the last pairs in flight.
    let elapsed = seconds.max(started.elapsed().as_secs_f64());
    authorize_us.sort_unstable();
    settle_us.sort_unstable();
    let pairs = settle_us.len() as u64;
    LedgerCell {
        backend: backend.label(),
        concurrency,
        spread,
        pairs,
        pairs_per_s: pairs as f64 / elapsed,
        denied,
        errors,
        authorize_p50_us: quantile(&authorize_us, 0.5),
        authorize_p99_us: quantile(&authorize_us, 0.99),
        settle_p50_us: quantile(&settle_us, 0.5),
        settle_p99_us: quantile(&settle_us, 0.99),
        ops_per_group: ledger.group_commits().mean_size_since(commits_before),
    }
}

/// Grant a fresh user exactly `calls` calls' worth and let `concurrency` tasks authorize
/// and settle until every one is denied: exactly `calls` may be admitted, the balance
/// must end at 0 with nothing held and no debt, and the journal must reconcile.
async fn drain(
    ledger: &Ledger,
    backend: Backend,
    concurrency: usize,
    calls: u64,
) -> Result<OverdrawCheck> {
    let user = "bench-drain-user";
    seed::grant(ledger, user, calls * units_per_call(), "bench-drain").await?;
    let allowed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tasks = Vec::new();
    for task in 0..concurrency {
        let ledger = ledger.clone();
        let allowed = allowed.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            let mut consecutive_denials = 0;
            // Stop after a few denials in a row: the balance is spent.
            while consecutive_denials < 3 && Instant::now() < deadline {
                let request_id = format!("drain-{task}-{n}");
                n += 1;
                match ledger
                    .authorize(&authorize_request(&request_id, user))
                    .await
                {
                    Ok(r) if r.decision == Decision::Allow => {
                        consecutive_denials = 0;
                        allowed.fetch_add(1, Ordering::Relaxed);
                        // Retry transient trouble: a lost settlement would leave a hold.
                        for _ in 0..20 {
                            if ledger
                                .settle(&settle_request(&request_id, user))
                                .await
                                .is_ok()
                            {
                                break;
                            }
                        }
                    }
                    Ok(_) => consecutive_denials += 1,
                    Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            }
        }));
    }
    for task in tasks {
        task.await.context("drain task")?;
    }
    let Some(balance) = ledger.balance(user, seed::QUOTA_TYPE).await? else {
        bail!("the drain user has no account");
    };
    let reconcile = ledger.reconcile().await?;
    Ok(OverdrawCheck {
        backend: backend.label(),
        concurrency,
        expected_allowed: calls,
        allowed: allowed.load(Ordering::Relaxed),
        remaining_after: balance.remaining,
        held_after: balance.held,
        debt_after: balance.debt,
        reconcile_clean: reconcile.is_clean(),
    })
}
