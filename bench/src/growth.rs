//! Growth: authorize and settle latency as the ledger grows to 10k, 100k and 1M users, and
//! as one user accumulates 1, 100 and 1000 live lots.
//!
//! Users are added in bulk by copying a template user's rows (account, lot, journal, a
//! finalized hold, its usage record and daily cost row) with `INSERT ... SELECT` over a
//! generated series: granting a million users one call at a time would take most of the
//! time budget, and the ledger's indexes and pages grow the same way. The copies' journal
//! entries point at the template's lot, so the grown database is for timing only (it is
//! dropped afterwards, never reconciled).

use std::time::Instant;

use anyhow::{Context, Result};
use llm_meter_protocol::Decision;
use llm_meter_sidecar::ledger::{GrantRequest, Ledger, LedgerConfig};
use llm_meter_sidecar::storage::{Db, DbOptions};
use serde::Serialize;
use sqlx::Executor;

use crate::databases::{Backend, BenchDb};
use crate::seed::{self, authorize_request, settle_request};
use crate::stats::quantile;

const TEMPLATE: &str = "grow-template";

#[derive(Debug, Clone, Serialize)]
pub struct LatencyPoint {
    pub backend: &'static str,
    /// Users in the ledger, or live lots of the measured user.
    pub size: u64,
    pub pairs: u64,
    pub authorize_p50_us: u64,
    pub authorize_p99_us: u64,
    pub settle_p50_us: u64,
    pub settle_p99_us: u64,
    /// Seconds spent growing the ledger to this size.
    pub grow_seconds: f64,
    /// Authorize+settle p50 in each interleaved round.
    pub round_pair_p50_us: Vec<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GrowthSection {
    pub users: Vec<LatencyPoint>,
    pub lots: Vec<LatencyPoint>,
    pub failures: Vec<String>,
}

pub async fn run(
    dir: &std::path::Path,
    backends: &[Backend],
    user_levels: &[u64],
    lot_levels: &[u64],
    pairs: usize,
) -> GrowthSection {
    let mut section = GrowthSection {
        users: Vec::new(),
        lots: Vec::new(),
        failures: Vec::new(),
    };
    for &backend in backends {
        eprintln!("bench: growth on {}", backend.label());
        if let Err(e) =
            run_backend(dir, backend, user_levels, lot_levels, pairs, &mut section).await
        {
            section.failures.push(format!("{}: {e:#}", backend.label()));
        }
    }
    section
}

/// One ledger grown to one size, measured in every round.
struct Cell {
    bench_db: BenchDb,
    ledger: Ledger,
    size: u64,
    grow_seconds: f64,
    samples: Samples,
}

/// The latencies of one size over the interleaved rounds.
#[derive(Default)]
struct Samples {
    authorize_us: Vec<u64>,
    settle_us: Vec<u64>,
    round_pair_p50_us: Vec<u64>,
}

impl Samples {
    /// Adds one round's pairs (as [`measure`] returns them).
    fn add_round(&mut self, (authorize_us, settle_us): (Vec<u64>, Vec<u64>)) {
        let mut pair_us: Vec<u64> = (authorize_us.iter().zip(&settle_us))
            .map(|(a, s)| a + s)
            .collect();
        pair_us.sort_unstable();
        self.round_pair_p50_us.push(quantile(&pair_us, 0.5));
        self.authorize_us.extend(authorize_us);
        self.settle_us.extend(settle_us);
    }

    fn into_point(mut self, backend: Backend, size: u64) -> LatencyPoint {
        self.authorize_us.sort_unstable();
        self.settle_us.sort_unstable();
        LatencyPoint {
            backend: backend.label(),
            size,
            pairs: self.settle_us.len() as u64,
            authorize_p50_us: quantile(&self.authorize_us, 0.5),
            authorize_p99_us: quantile(&self.authorize_us, 0.99),
            settle_p50_us: quantile(&self.settle_us, 0.5),
            settle_p99_us: quantile(&self.settle_us, 0.99),
            grow_seconds: 0.0,
            round_pair_p50_us: self.round_pair_p50_us,
        }
    }
}

async fn run_backend(
    dir: &std::path::Path,
    backend: Backend,
    user_levels: &[u64],
    lot_levels: &[u64],
    pairs: usize,
    section: &mut GrowthSection,
) -> Result<()> {
    // One database per size, grown first and then measured in interleaved rounds, so the
    // machine's drift over the minutes of growing hits every size alike (measured one after
    // the other, the same build read 1.0x here and 2.0x there).
    let mut cells = Vec::new();
    let grown = grow_all(dir, backend, user_levels, &mut cells).await;
    let result = match grown {
        Ok(()) => {
            measure_users(backend, pairs, &mut cells, section).await;
            // Lots are one user's: the smallest ledger serves.
            match cells.first() {
                Some(cell) => measure_lots(&cell.ledger, backend, lot_levels, pairs, section).await,
                None => Ok(()),
            }
        }
        Err(e) => Err(e),
    };
    for cell in cells {
        cell.ledger.db().close().await;
        cell.bench_db.drop_database().await;
    }
    result
}

/// A ledger per user level, each with the catalog, the template user and its copies.
async fn grow_all(
    dir: &std::path::Path,
    backend: Backend,
    user_levels: &[u64],
    cells: &mut Vec<Cell>,
) -> Result<()> {
    for &level in user_levels {
        let bench_db = BenchDb::create(backend, dir, &format!("growth{level}")).await?;
        let db = match bench_db.connect(DbOptions::default()).await {
            Ok(db) => db,
            Err(e) => {
                bench_db.drop_database().await;
                return Err(e);
            }
        };
        let ledger = Ledger::new(db.clone(), LedgerConfig::default());
        cells.push(Cell {
            bench_db,
            ledger: ledger.clone(),
            size: level,
            grow_seconds: 0.0,
            samples: Samples::default(),
        });
        seed::seed_catalog(&ledger).await?;
        // The template: one grant and one settled call, like any active user.
        seed::grant(&ledger, TEMPLATE, 1_000_000_000, "grow-template").await?;
        ledger
            .authorize(&authorize_request("grow-template-call", TEMPLATE))
            .await?;
        ledger
            .settle(&settle_request("grow-template-call", TEMPLATE))
            .await?;
        let started = Instant::now();
        copy_template(&db, 0, level).await?;
        if let Some(cell) = cells.last_mut() {
            cell.grow_seconds = started.elapsed().as_secs_f64();
        }
        analyze(&db).await;
        eprintln!("bench:   grew a ledger of {level} users");
    }
    Ok(())
}

/// Rounds over every size: each round measures a share of the pairs on each.
async fn measure_users(
    backend: Backend,
    pairs: usize,
    cells: &mut [Cell],
    section: &mut GrowthSection,
) {
    for round in 0..ROUNDS {
        for cell in cells.iter_mut() {
            let level = cell.size;
            let label = format!("u{level}r{round}");
            let measured = measure(&cell.ledger, pairs / ROUNDS, &label, |n| {
                // A pseudo-random spread over every user, so lookups miss caches as
                // they would; each round starts elsewhere in the spread.
                let n = (n + round * pairs) as u64;
                format!("grow-{}", n.wrapping_mul(2_654_435_761) % level)
            })
            .await;
            cell.samples.add_round(measured);
        }
    }
    for cell in cells.iter_mut() {
        let mut point = std::mem::take(&mut cell.samples).into_point(backend, cell.size);
        point.grow_seconds = cell.grow_seconds;
        eprintln!(
            "bench:   {} users: authorize p50 {} us, settle p50 {} us (pair p50 per round {:?})",
            cell.size, point.authorize_p50_us, point.settle_p50_us, point.round_pair_p50_us
        );
        section.users.push(point);
    }
}

/// Rounds over one user with 1, 100 and 1000 live lots (users of one ledger).
async fn measure_lots(
    ledger: &Ledger,
    backend: Backend,
    lot_levels: &[u64],
    pairs: usize,
    section: &mut GrowthSection,
) -> Result<()> {
    for &lots in lot_levels {
        grant_lots(ledger, &format!("lots-{lots}"), lots).await?;
    }
    let mut samples: Vec<Samples> = lot_levels.iter().map(|_| Samples::default()).collect();
    for round in 0..ROUNDS {
        for (&lots, samples) in lot_levels.iter().zip(samples.iter_mut()) {
            let user = format!("lots-{lots}");
            let label = format!("l{lots}r{round}");
            samples.add_round(measure(ledger, pairs / ROUNDS, &label, |_| user.clone()).await);
        }
    }
    for (&lots, samples) in lot_levels.iter().zip(samples) {
        let point = samples.into_point(backend, lots);
        eprintln!(
            "bench:   {lots} lots: authorize p50 {} us, settle p50 {} us",
            point.authorize_p50_us, point.settle_p50_us
        );
        section.lots.push(point);
    }
    Ok(())
}

/// `lots` live lots for `user`, with distinct priorities and expiries.
async fn grant_lots(ledger: &Ledger, user: &str, lots: u64) -> Result<()> {
    for i in 0..lots {
        ledger
            .grant(&GrantRequest {
                user_id: user.to_string(),
                quota_type: seed::QUOTA_TYPE.into(),
                amount: 1_000_000_000,
                source_type: "purchase".into(),
                source_id: format!("{user}-{i}"),
                remark: None,
                effective_from: None,
                // Distinct expiries, so burn order is decided by them.
                expires_at: Some(ledger.now() + 86_400_000 * (365 + i as i64)),
                priority: (i % 3) as i32,
            })
            .await
            .with_context(|| format!("grant lot {i} of {user}"))?;
    }
    Ok(())
}

/// Interleaved rounds per size (each measures `pairs / ROUNDS` pairs on every size).
const ROUNDS: usize = 5;

/// Sequential authorize+settle pairs (concurrency 1: latency, not throughput); the
/// latencies of the pairs that were allowed and settled, in order.
async fn measure(
    ledger: &Ledger,
    pairs: usize,
    label: &str,
    user_of: impl Fn(usize) -> String,
) -> (Vec<u64>, Vec<u64>) {
    let mut authorize_us = Vec::with_capacity(pairs);
    let mut settle_us = Vec::with_capacity(pairs);
    // A short warm-up (statement caches, first page reads) is not counted.
    let warmup = pairs / 10;
    for n in 0..pairs + warmup {
        let user = user_of(n);
        let request_id = format!("grow-{label}-{n}");
        let started = Instant::now();
        let authorized = ledger
            .authorize(&authorize_request(&request_id, &user))
            .await;
        let authorize_elapsed = started.elapsed().as_micros() as u64;
        if !matches!(&authorized, Ok(r) if r.decision == Decision::Allow) {
            continue;
        }
        let started = Instant::now();
        let settled = ledger.settle(&settle_request(&request_id, &user)).await;
        let settle_elapsed = started.elapsed().as_micros() as u64;
        if settled.is_ok() && n >= warmup {
            authorize_us.push(authorize_elapsed);
            settle_us.push(settle_elapsed);
        }
    }
    (authorize_us, settle_us)
}

/// Columns copied per table, and the expression replacing each per-user column.
const COPIES: &[(&str, &str)] = &[
    (
        "ledger_accounts",
        "user_id, quota_type, balance, held, debt, next_event_at, created_at, updated_at",
    ),
    (
        "quota_lots",
        "user_id, quota_type, source_type, source_id, amount, remaining, used, expired, priority, effective_from, expires_at, status, remark, created_at, updated_at",
    ),
    (
        "ledger_journal",
        "user_id, quota_type, kind, lot_id, request_id, lot_delta, balance_delta, held_delta, debt_delta, memo, created_at",
    ),
    (
        "ledger_holds",
        "request_id, user_id, quota_type, provider, model, amount, price_version_id, priced, status, created_at, expires_at, finalized_at",
    ),
    (
        "usage_records",
        "request_id, user_id, provider, model, quota_type, outcome, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, images, units, charged, debt, held, cost_micros, currency, price_version_id, estimated, partial, unpriced, fail_open, upstream_status, status, reason, day, started_at, ended_at, created_at",
    ),
    (
        "daily_costs",
        "day, provider, model, user_id, quota_type, currency, requests, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, images, units, cost_micros, unpriced_requests, updated_at",
    ),
];

fn replacement(column: &str) -> Option<&'static str> {
    match column {
        "user_id" => Some("'grow-' || n.i"),
        "source_id" => Some("'grow-lot-' || n.i"),
        "request_id" => {
            Some("CASE WHEN t.request_id IS NULL THEN NULL ELSE 'grow-req-' || n.i END")
        }
        _ => None,
    }
}

/// Users `grow-{from}` .. `grow-{to - 1}` as copies of the template, in batches.
async fn copy_template(db: &Db, from: u64, to: u64) -> Result<()> {
    const BATCH: u64 = 250_000;
    let mut start = from;
    while start < to {
        let end = (start + BATCH).min(to);
        let mut tx = db.pool().begin().await?;
        for (table, columns) in COPIES {
            let sql = copy_sql(table, columns, start, end);
            (&mut *tx)
                .execute(sql.as_str())
                .await
                .with_context(|| format!("copy the template user into {table}"))?;
        }
        tx.commit().await?;
        start = end;
    }
    Ok(())
}

fn copy_sql(table: &str, columns: &str, from: u64, to: u64) -> String {
    let select: Vec<String> = columns
        .split(',')
        .map(str::trim)
        .map(|c| {
            replacement(c)
                .map(str::to_string)
                .unwrap_or(format!("t.{c}"))
        })
        .collect();
    format!(
        "WITH RECURSIVE n(i) AS (SELECT {from} UNION ALL SELECT i + 1 FROM n WHERE i < {last}) \
         INSERT INTO {table} ({columns}) SELECT {select} FROM n, {table} t WHERE t.user_id = '{TEMPLATE}'",
        last = to - 1,
        select = select.join(", ")
    )
}

/// Refresh planner statistics after a bulk load (what a DBA's autovacuum would do).
async fn analyze(db: &Db) {
    let _ = db.pool().execute("ANALYZE").await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_sql_rewrites_per_user_columns() {
        let sql = copy_sql("quota_lots", "user_id, source_id, amount", 10, 20);
        assert!(sql.contains("SELECT 10 UNION ALL"));
        assert!(sql.contains("WHERE i < 19"));
        assert!(sql.contains("'grow-' || n.i, 'grow-lot-' || n.i, t.amount"));
        assert!(sql.contains("t.user_id = 'grow-template'"));
    }
}
