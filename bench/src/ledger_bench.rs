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
use crate::floor::{self, FloorCell};
use crate::procs::{machine_busy_seconds, processes_cpu_seconds};
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
    /// The ledger's group-commit writers, and how many of them were applying a group on
    /// average during the cell: at the count, the writers are the bound.
    pub writers: usize,
    pub writers_busy: f64,
    /// Cores the whole machine kept busy during the cell, and of those the database
    /// server's processes (None for SQLite, which runs in this process).
    pub machine_cores: f64,
    pub server_cores: Option<f64>,
    /// Of the cell's settlements, the share made in one statement (PostgreSQL's common
    /// case; 0 on the other backends).
    pub one_statement_share: f64,
    /// Each round's pairs/s, in order (`pairs_per_s` is their median).
    pub rounds_pairs_per_s: Vec<f64>,
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
    /// `perf` summary of this process during the SQLite settlement batches: the sidecar's
    /// share of every metered call.
    pub sqlite_batch_profile: Option<String>,
    /// `perf` summary of the whole machine during the PostgreSQL, concurrency 16,
    /// many-users cell, with PostgreSQL's functions by inclusive share.
    pub postgres_profile: Option<String>,
    pub overdraw: Vec<OverdrawCheck>,
    /// Settlement batches as the filter's outbox sends them.
    pub batches: Vec<BatchCell>,
    /// PostgreSQL's floor for the pair's round trips and commits (see `floor.rs`).
    pub floor: Vec<FloorCell>,
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
    /// Settlements made in one statement (`ledger/settle_fast.rs`), of those settled.
    pub one_statement_share: f64,
    /// CPU of the database server's processes per settlement, in µs (None for SQLite,
    /// which runs in this process).
    pub server_cpu_us_per_settlement: Option<f64>,
}

/// Calls per settlement batch (the filter's default `settle_batch_max`).
pub const SETTLE_BATCH: usize = llm_meter_filter::config::DEFAULT_SETTLE_BATCH_MAX;

/// How long each cell runs, and how often.
#[derive(Debug, Clone, Copy)]
pub struct CellPlan {
    /// Rounds over all cells of a backend; a cell's figures are the medians of its rounds,
    /// so one noisy second of a shared machine does not decide a cell.
    pub rounds: usize,
    pub seconds: f64,
}

/// Run every backend × concurrency × spread cell, `plan.rounds` times each.
pub async fn run(
    dir: &std::path::Path,
    backends: &[Backend],
    concurrencies: &[usize],
    plan: CellPlan,
) -> LedgerSection {
    let mut section = LedgerSection {
        cells: Vec::new(),
        sqlite_profile: None,
        sqlite_batch_profile: None,
        postgres_profile: None,
        overdraw: Vec::new(),
        batches: Vec::new(),
        floor: Vec::new(),
        failures: Vec::new(),
    };
    for &backend in backends {
        eprintln!("bench: ledger on {}", backend.label());
        match run_backend(dir, backend, concurrencies, plan, &mut section).await {
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
    plan: CellPlan,
    section: &mut LedgerSection,
) -> Result<()> {
    let seconds = plan.seconds;
    let bench_db = BenchDb::create(backend, dir, "ledger").await?;
    let result = async {
        let db = bench_db.connect(DbOptions::default()).await?;
        let ledger = Ledger::new(db, LedgerConfig::default());
        seed::seed_catalog(&ledger).await?;
        seed::grant_users(&ledger, SPREAD_USERS, 1_000_000_000_000).await?;
        seed::grant(&ledger, "bench-hot-user", 1_000_000_000_000, "bench-hot").await?;
        let with_floor = backend == Backend::Postgres;
        if with_floor {
            floor::create_tables(ledger.db().pool()).await?;
        }
        let mut rounds: Vec<Vec<LedgerCell>> = Vec::new();
        let mut floor_rounds: Vec<Vec<FloorCell>> = Vec::new();
        for round in 0..plan.rounds.max(1) {
            let mut cells = Vec::new();
            for (index, &concurrency) in concurrencies.iter().enumerate() {
                for spread in [Spread::ManyUsers, Spread::HotUser] {
                    let label = format!(
                        "r{round}c{index}{}",
                        if spread == Spread::HotUser { "h" } else { "m" }
                    );
                    let profiled = round == 0
                        && backend == Backend::Sqlite
                        && concurrency == 16
                        && spread == Spread::ManyUsers;
                    let recording = crate::profile::start_own(dir, "ledger", profiled);
                    let server_profiled = round == 0
                        && backend == Backend::Postgres
                        && concurrency == 16
                        && spread == Spread::ManyUsers;
                    let server_recording = crate::profile::start_machine(
                        dir,
                        "ledger-postgres",
                        "postgres",
                        server_profiled,
                    );
                    let cell =
                        run_cell(&ledger, backend, concurrency, spread, seconds, &label).await;
                    if let Some(recording) = recording {
                        section.sqlite_profile = Some(recording.summary());
                    }
                    if let Some(recording) = server_recording {
                        section.postgres_profile = Some(recording.summary());
                    }
                    eprintln!(
                        "bench:   round {} c={concurrency:<3} {spread:?}: {:.0} pairs/s",
                        round + 1,
                        cell.pairs_per_s
                    );
                    cells.push(cell);
                }
            }
            rounds.push(cells);
            // After the ledger's cells: its rows and their vacuuming come after theirs.
            if with_floor {
                let mut cells = Vec::new();
                for &concurrency in concurrencies.iter().filter(|&&c| c <= 16) {
                    let label = format!("r{round}c{concurrency}");
                    let pool = ledger.db().pool();
                    let cell = floor::run_cell(pool, concurrency, seconds, &label).await;
                    eprintln!(
                        "bench:   round {} c={concurrency:<3} floor: {:.0} pairs/s",
                        round + 1,
                        cell.pairs_per_s
                    );
                    cells.push(cell);
                }
                floor_rounds.push(cells);
            }
        }
        section.cells.extend(median_cells(rounds));
        section.floor.extend(floor::median_cells(floor_rounds));
        // One longer run: a batch cell holds few batches per second.
        let batch_seconds = seconds * plan.rounds.max(1) as f64;
        let recording = crate::profile::start_own(dir, "batches", backend == Backend::Sqlite);
        let batches = settle_batches(&ledger, backend, batch_seconds).await;
        if let Some(recording) = recording {
            section.sqlite_batch_profile = Some(recording.summary());
        }
        let batches = batches?;
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
    let commits_before = ledger.group_commits();
    let server = server_processes(backend);
    let server_before = processes_cpu_seconds(server);
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
        one_statement_share: share(
            ledger.group_commits().one_statement_settlements
                - commits_before.one_statement_settlements,
            settled,
        ),
        server_cpu_us_per_settlement: (!server.is_empty() && settled > 0).then(|| {
            (processes_cpu_seconds(server) - server_before).max(0.0) * 1e6 / settled as f64
        }),
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
    let server = server_processes(backend);
    let server_before = processes_cpu_seconds(server);
    let machine_before = machine_busy_seconds().unwrap_or(0.0);
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
    let commits = ledger.group_commits();
    let machine_cores = (machine_busy_seconds().unwrap_or(0.0) - machine_before) / elapsed;
    let server_cores = (!server.is_empty())
        .then(|| (processes_cpu_seconds(server) - server_before).max(0.0) / elapsed);
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
        ops_per_group: commits.mean_size_since(commits_before),
        writers: ledger.writer_count(),
        writers_busy: commits.writers_busy_since(commits_before, Duration::from_secs_f64(elapsed)),
        machine_cores,
        server_cores,
        one_statement_share: share(
            commits.one_statement_settlements - commits_before.one_statement_settlements,
            pairs,
        ),
        rounds_pairs_per_s: Vec::new(),
    }
}

/// `part` of `whole` (0 when there is no whole).
fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Command names of the database server's processes (none for SQLite, in this process).
fn server_processes(backend: Backend) -> &'static [&'static str] {
    match backend {
        Backend::Sqlite => &[],
        Backend::Postgres => &["postgres"],
        Backend::MariaDb => &["mariadbd", "mysqld"],
    }
}

/// One cell per position of the rounds (every round runs the same cells in the same
/// order): the median of each figure over the rounds, the sums of the counts.
fn median_cells(rounds: Vec<Vec<LedgerCell>>) -> Vec<LedgerCell> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    (0..first.len())
        .map(|i| {
            let cells: Vec<&LedgerCell> = rounds.iter().filter_map(|r| r.get(i)).collect();
            let mid = |f: fn(&LedgerCell) -> f64| {
                let mut values: Vec<f64> = cells.iter().map(|c| f(c)).collect();
                values.sort_by(f64::total_cmp);
                values[values.len() / 2]
            };
            let base = cells[0];
            LedgerCell {
                backend: base.backend,
                concurrency: base.concurrency,
                spread: base.spread,
                pairs: cells.iter().map(|c| c.pairs).sum(),
                pairs_per_s: mid(|c| c.pairs_per_s),
                denied: cells.iter().map(|c| c.denied).sum(),
                errors: cells.iter().map(|c| c.errors).sum(),
                authorize_p50_us: mid(|c| c.authorize_p50_us as f64) as u64,
                authorize_p99_us: mid(|c| c.authorize_p99_us as f64) as u64,
                settle_p50_us: mid(|c| c.settle_p50_us as f64) as u64,
                settle_p99_us: mid(|c| c.settle_p99_us as f64) as u64,
                ops_per_group: mid(|c| c.ops_per_group),
                writers: base.writers,
                writers_busy: mid(|c| c.writers_busy),
                machine_cores: mid(|c| c.machine_cores),
                server_cores: base
                    .server_cores
                    .map(|_| mid(|c| c.server_cores.unwrap_or(0.0))),
                one_statement_share: mid(|c| c.one_statement_share),
                rounds_pairs_per_s: cells.iter().map(|c| c.pairs_per_s).collect(),
            }
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(concurrency: usize, pairs_per_s: f64, p99: u64) -> LedgerCell {
        LedgerCell {
            backend: "SQLite",
            concurrency,
            spread: Spread::ManyUsers,
            pairs: 10,
            pairs_per_s,
            denied: 1,
            errors: 0,
            authorize_p50_us: 100,
            authorize_p99_us: p99,
            settle_p50_us: 200,
            settle_p99_us: p99,
            ops_per_group: pairs_per_s / 100.0,
            writers: 4,
            writers_busy: pairs_per_s / 1000.0,
            machine_cores: pairs_per_s / 2000.0,
            server_cores: Some(pairs_per_s / 4000.0),
            one_statement_share: pairs_per_s / 10_000.0,
            rounds_pairs_per_s: Vec::new(),
        }
    }

    #[test]
    fn a_cell_over_rounds_is_the_median_of_each_figure_and_the_sum_of_the_counts() {
        let rounds = vec![
            vec![cell(1, 900.0, 50), cell(16, 3000.0, 700)],
            vec![cell(1, 500.0, 90), cell(16, 2000.0, 900)],
            vec![cell(1, 700.0, 10), cell(16, 4000.0, 800)],
        ];
        let cells = median_cells(rounds);
        assert_eq!(cells.len(), 2);
        let c1 = &cells[0];
        assert_eq!((c1.concurrency, c1.pairs_per_s), (1, 700.0));
        assert_eq!(c1.rounds_pairs_per_s, vec![900.0, 500.0, 700.0]);
        assert_eq!((c1.authorize_p99_us, c1.pairs, c1.denied), (50, 30, 3));
        let c16 = &cells[1];
        assert_eq!((c16.pairs_per_s, c16.settle_p99_us), (3000.0, 800));
        assert_eq!(c16.ops_per_group, 30.0);
        assert_eq!((c16.writers, c16.writers_busy), (4, 3.0));
        assert_eq!((c16.machine_cores, c16.server_cores), (1.5, Some(0.75)));
        assert_eq!(c16.one_statement_share, 0.3);
        assert!(median_cells(Vec::new()).is_empty());
    }
}
