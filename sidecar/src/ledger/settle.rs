//! Settlement, void, hold expiry and direct consumption.

use std::sync::Arc;

use crate::storage::Conn;
use llm_meter_protocol::{
    AuthorizeRequest, AuthorizeResponse, Caller, Decision, Finalize, Outcome, ReleaseRequest,
    SettleRequest, SettleResponse, SettleStatus, Usage, VoidRequest,
};
use sqlx::Row;

use super::accounts::{
    burn, lock_account, refresh_lots, save_account_in, Account, Entry, Journal, LotRow,
    BURNABLE_OF_L, BURN_ORDER_OF_L, BURN_READ_LIMIT, LOTS_OF_H,
};
use super::authorize::MAX_UNITS_PER_CALL;
use super::group::{Done, Op};
use super::lease::{is_lease_key, LEASE_PREFIX};
use super::prefetch::Prefetched;
use super::{backoff, check_key, retryable, to_i64, Ledger, LedgerError, MAX_ATTEMPTS};
use crate::pricing::{format_micros, Cost, Measure, ModelPricing, PriceVersion};
use crate::storage::{Batch, Dialect, Value};

/// A hold row as read (and locked) inside a transaction.
pub(super) struct Hold {
    pub user_id: String,
    pub quota_type: String,
    pub provider: String,
    pub model: String,
    pub amount: i64,
    pub price_version_id: Option<i64>,
    pub priced: bool,
    pub status: String,
    pub created_at: i64,
    /// `call`, or `lease` (see [`super::lease`]).
    pub kind: String,
}

impl Hold {
    pub fn is_lease(&self) -> bool {
        self.kind == "lease"
    }
}

/// Who and what a settlement charges.
pub(super) struct Target {
    pub user_id: String,
    pub quota_type: String,
    pub provider: String,
    pub model: String,
    pub measure: Measure,
    pub price: Option<Arc<PriceVersion>>,
    /// Units still held for this call (0 without a live hold).
    pub release: i64,
    pub started_at: Option<i64>,
    pub fail_open: bool,
}

impl Target {
    /// A target priced by what the catalog gives the model now (no hold's price to keep).
    pub(super) fn by_catalog(
        req: &SettleRequest,
        model: ModelPricing,
        user_id: String,
        fail_open: bool,
    ) -> Target {
        Target {
            user_id,
            quota_type: model.quota_type,
            provider: req.provider.clone(),
            model: req.model.clone(),
            measure: model.measure,
            price: model.price,
            release: 0,
            started_at: None,
            fail_open,
        }
    }
}

/// A settlement's outcome as `usage_records.outcome` spells it.
pub(super) fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Completed => "completed",
        Outcome::Partial => "partial",
    }
}

/// One `usage_records` row.
pub(super) struct UsageRow<'a> {
    pub request_id: &'a str,
    pub target: &'a Target,
    pub outcome: &'static str,
    pub usage: Usage,
    pub units: i64,
    pub charged: i64,
    pub debt: i64,
    pub cost_micros: Option<i64>,
    pub estimated: bool,
    pub upstream_status: u16,
    pub status: &'static str,
    pub reason: Option<&'a str>,
    pub ended_at: i64,
    /// Units the call held (its own hold, or its share of a lease).
    pub held: i64,
}

/// A settlement's usage, normalized, with its cost and the units it consumes.
pub(super) struct Measured {
    pub usage: Usage,
    pub cost: Option<Cost>,
    pub units: i64,
}

/// What [`Ledger::record_settlement`] charges and records.
pub(super) struct Settlement<'a> {
    pub req: &'a SettleRequest,
    pub target: &'a Target,
    /// The account when already locked together with the hold.
    pub account: Option<Account>,
    pub measured: Measured,
    /// Units the call held, for its usage record.
    pub held: i64,
    /// The lease the call ran under, noted on its release journal row.
    pub lease_id: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct ExpireHoldsReport {
    /// Holds expired, leases included.
    pub expired: u64,
    /// Of `expired`: leases the filter never released.
    pub leases_expired: u64,
    pub units_released: u64,
    /// Holds that could not be expired (logged; the next sweep tries them again).
    pub failed: u64,
}

/// A call made outside the mesh, reported after the fact: authorize + settle in one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsumeRequest {
    pub request_id: String,
    pub user_id: String,
    pub provider: String,
    pub model: String,
    pub usage: Usage,
    #[serde(default)]
    pub estimated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsumeResponse {
    pub authorization: AuthorizeResponse,
    /// Present when the consumption was admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settlement: Option<SettleResponse>,
}

/// The checks [`Ledger::finalize`] makes before queueing.
fn check_finalize(item: &Finalize) -> Result<(), LedgerError> {
    match item {
        Finalize::Settle(req) => check_settle(req),
        Finalize::Void(req) => check_void(req),
        Finalize::Release(req) => check_key(&req.lease_id, "lease_id"),
    }
}

fn check_settle(req: &SettleRequest) -> Result<(), LedgerError> {
    check_call_id(&req.request_id)?;
    check_key(&req.provider, "provider")?;
    check_key(&req.model, "model")?;
    if let Some(lease_id) = &req.lease_id {
        check_key(lease_id, "lease_id")?;
    }
    to_i64(req.held, "held")?;
    validate_usage(&req.usage)
}

fn check_void(req: &VoidRequest) -> Result<(), LedgerError> {
    check_call_id(&req.request_id)?;
    if let Some(lease_id) = &req.lease_id {
        check_key(lease_id, "lease_id")?;
    }
    to_i64(req.held, "held").map(drop)
}

/// A call's request id: a valid key, and never one of the keys leases use.
fn check_call_id(request_id: &str) -> Result<(), LedgerError> {
    check_key(request_id, "request_id")?;
    if is_lease_key(request_id) {
        return Err(LedgerError::Invalid(format!(
            "request ids starting with `{LEASE_PREFIX}` are reserved for leases"
        )));
    }
    Ok(())
}

/// Subsets clamped to their totals, so nothing is billed twice.
pub(super) fn normalize(usage: &Usage) -> Usage {
    let cached = usage.cached_input_tokens.min(usage.input_tokens);
    Usage {
        input_tokens: usage.input_tokens,
        cached_input_tokens: cached,
        cache_write_tokens: usage.cache_write_tokens.min(usage.input_tokens - cached),
        output_tokens: usage.output_tokens,
        reasoning_tokens: usage.reasoning_tokens.min(usage.output_tokens),
        images: usage.images,
    }
}

fn validate_usage(usage: &Usage) -> Result<(), LedgerError> {
    let counts = [
        usage.input_tokens,
        usage.cached_input_tokens,
        usage.cache_write_tokens,
        usage.output_tokens,
        usage.reasoning_tokens,
        usage.images,
    ];
    if counts.iter().any(|c| *c > MAX_UNITS_PER_CALL) {
        return Err(LedgerError::Invalid(format!(
            "a usage count is above the limit of {MAX_UNITS_PER_CALL}"
        )));
    }
    Ok(())
}

impl Ledger {
    /// Charges the actual usage of a call and releases the rest of its hold. Idempotent by
    /// request id: an identical retry answers `AlreadySettled`, a different one `Conflict`.
    pub async fn settle(&self, req: &SettleRequest) -> Result<SettleResponse, LedgerError> {
        check_settle(req)?;
        self.retrying(|| async {
            match self.submit_one(Op::Settle(req.clone())).await? {
                Done::Settled(response) => Ok(response),
                _ => Err(LedgerError::Inconsistent(
                    "the writer answered a settlement with another result".into(),
                )),
            }
        })
        .await
    }

    /// Settles inside the caller's write transaction (see [`Ledger::settle`]).
    pub(super) async fn settle_on(
        &self,
        conn: &mut Conn,
        req: &SettleRequest,
        reads: &mut Prefetched,
    ) -> Result<SettleResponse, LedgerError> {
        if let Some(lease_id) = &req.lease_id {
            if let Some(answer) = self
                .settle_under_lease_on(conn, req, lease_id, reads)
                .await?
            {
                return Ok(answer);
            }
            // An unknown lease: the call did run, so it is charged like one without a hold.
            tracing::warn!(request_id = %req.request_id, %lease_id,
                "settlement under an unknown lease; charging directly");
        }
        if let Some(answer) = self.settle_in_one_statement(conn, req).await? {
            reads.settled_in_one_statement();
            return Ok(answer);
        }
        let db = self.db();
        let now = self.now();
        let loaded = reads.take(&req.request_id);
        let read_ahead = loaded.is_some();
        let (hold, account) = match loaded {
            Some(loaded) => loaded,
            None => load_hold_to_charge(self, conn, &req.request_id).await?,
        };
        let late = hold.as_ref().is_some_and(|h| h.status == "expired");
        let target = match hold {
            Some(h) if h.is_lease() => {
                return Err(LedgerError::Invalid(format!(
                    "{} is a lease, not a call",
                    req.request_id
                )));
            }
            Some(h) if h.status == "held" || h.status == "expired" => {
                let release = if h.status == "held" { h.amount } else { 0 };
                self.target_of_hold(conn, h, release).await?
            }
            Some(h) if h.status == "settled" => {
                return self.replay_settlement_on(conn, req).await;
            }
            Some(h) => {
                return Err(LedgerError::Conflict(format!(
                    "request {} was already {}; it cannot be settled",
                    req.request_id, h.status
                )));
            }
            None => {
                if usage_record_exists(self, conn, &req.request_id).await? {
                    return self.replay_settlement_on(conn, req).await;
                }
                let Some(target) = self.direct_target(conn, req, now).await? else {
                    return Err(LedgerError::Invalid(
                        "the API key of this fail-open settlement is unknown".into(),
                    ));
                };
                target
            }
        };

        let measured = measure(&target, &req.usage)?;
        let mut batch = Batch::default();
        if target.started_at.is_some() {
            batch.push(
                "UPDATE ledger_holds SET status = 'settled', finalized_at = ? WHERE request_id = ?",
                vec![now.into(), req.request_id.as_str().into()],
            );
        } else {
            // No hold: leave a finalized one (amount 0) as the request's key, so a late
            // authorize of this request (fail-open) replays instead of holding again.
            push_tombstone(&mut batch, &req.request_id, &target, "settled", now);
        }
        if late {
            // The hold expired unsettled and left an `expired` record; the call did run.
            let sql =
                db.sql("DELETE FROM usage_records WHERE request_id = ? AND status = 'expired'");
            sqlx::query(&sql)
                .bind(&req.request_id)
                .execute(&mut *conn)
                .await?;
        }
        let settlement = Settlement {
            req,
            target: &target,
            account,
            measured,
            held: target.release,
            lease_id: None,
        };
        let deferred = read_ahead.then(|| reads.deferred());
        self.record_settlement(conn, settlement, batch, deferred, now)
            .await
    }

    /// Charges a measured settlement and records it (usage record, daily costs, journal),
    /// applying `batch` (the settlement's other writes) with it, or leaving them all in
    /// `deferred` (a group's read-ahead settlement, see `prefetch.rs`).
    pub(super) async fn record_settlement(
        &self,
        conn: &mut Conn,
        settlement: Settlement<'_>,
        mut batch: Batch,
        deferred: Option<&mut Batch>,
        now: i64,
    ) -> Result<SettleResponse, LedgerError> {
        let Settlement {
            req,
            target,
            account,
            measured,
            held,
            lease_id,
        } = settlement;
        let mut journal = Journal::default();
        let to_charge = Charge {
            target,
            account,
            units: measured.units,
            request_id: &req.request_id,
            memo: lease_id,
        };
        let (charged, debt) = charge(self, conn, &mut batch, to_charge, &mut journal, now).await?;
        let ended_at = match req.ended_at_ms.and_then(|t| i64::try_from(t).ok()) {
            Some(t) if t > 0 && t <= now => t,
            _ => now,
        };
        let cost_micros = measured.cost.map(|c| c.micros);
        let row = UsageRow {
            request_id: &req.request_id,
            target,
            outcome: outcome_name(req.outcome),
            usage: measured.usage,
            units: measured.units,
            charged,
            debt,
            cost_micros,
            estimated: req.estimated,
            upstream_status: req.upstream_status,
            status: "settled",
            reason: None,
            ended_at,
            held,
        };
        push_usage(self, &mut batch, &row, target.price.is_none(), now);
        push_daily_cost(self, &mut batch, &row, now);
        journal.into_batch(&mut batch, now);
        match deferred {
            Some(deferred) => deferred.append(batch),
            None => batch.execute(self.db().dialect(), conn).await?,
        }
        if debt > 0 {
            tracing::warn!(request_id = %req.request_id, user = %target.user_id,
                quota_type = %target.quota_type, debt, "usage exceeded the balance; recorded as debt");
        }
        Ok(SettleResponse {
            request_id: req.request_id.clone(),
            status: SettleStatus::Settled,
            charged: charged as u64,
            debt: debt as u64,
            cost: cost_micros.map(format_micros),
            currency: target.price.as_ref().map(|p| p.currency.clone()),
        })
    }

    pub(super) async fn target_of_hold(
        &self,
        conn: &mut Conn,
        hold: Hold,
        release: i64,
    ) -> Result<Target, LedgerError> {
        let measure = self
            .prices()
            .quota_type(conn, &hold.quota_type)
            .await?
            .map_or(Measure::TotalTokens, |q| q.measure);
        // The price in force when the call was authorized.
        let price = match hold.price_version_id {
            Some(id) => self.prices().version(conn, id).await?,
            None => None,
        };
        Ok(Target {
            user_id: hold.user_id,
            quota_type: hold.quota_type,
            provider: hold.provider,
            model: hold.model,
            measure,
            price,
            release,
            started_at: Some(hold.created_at),
            fail_open: false,
        })
    }

    /// A settlement with no hold: fail-open, or a hold that was never written.
    async fn direct_target(
        &self,
        conn: &mut Conn,
        req: &SettleRequest,
        now: i64,
    ) -> Result<Option<Target>, LedgerError> {
        let user_id = match &req.caller {
            Caller::UserId(user) => {
                check_key(user, "user id")?;
                user.clone()
            }
            Caller::ApiKey(key) => match self.resolve_api_key_on(conn, key).await? {
                Some(user) => user,
                None => return Ok(None),
            },
        };
        if req.authorized {
            tracing::warn!(request_id = %req.request_id,
                "settlement for an authorized call without a hold; charging directly");
        }
        let at = req
            .ended_at_ms
            .and_then(|t| i64::try_from(t).ok())
            .filter(|t| *t > 0 && *t <= now)
            .unwrap_or(now);
        let model = self
            .prices()
            .resolve(conn, &req.provider, &req.model, at)
            .await?;
        if model.price.is_none() {
            tracing::warn!(provider = %req.provider, model = %req.model,
                request_id = %req.request_id, "settling a call to a model with no price in force");
        }
        Ok(Some(Target::by_catalog(
            req,
            model,
            user_id,
            !req.authorized,
        )))
    }

    /// Answers a retried settlement from its usage record.
    pub(super) async fn replay_settlement_on(
        &self,
        conn: &mut Conn,
        req: &SettleRequest,
    ) -> Result<SettleResponse, LedgerError> {
        let sql = self.db().sql(
            "SELECT status, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, \
             reasoning_tokens, images, charged, debt, cost_micros, currency, user_id, provider, \
             model FROM usage_records WHERE request_id = ?",
        );
        let row = sqlx::query(&sql)
            .bind(&req.request_id)
            .fetch_optional(&mut *conn)
            .await?;
        let Some(row) = row else {
            return Err(LedgerError::Busy(format!(
                "settlement {} raced with a concurrent attempt",
                req.request_id
            )));
        };
        let status: String = row.try_get(0)?;
        if status != "settled" {
            return Err(LedgerError::Conflict(format!(
                "request {} was already {status}",
                req.request_id
            )));
        }
        let stored = Usage {
            input_tokens: row.try_get::<i64, _>(1)? as u64,
            cached_input_tokens: row.try_get::<i64, _>(2)? as u64,
            cache_write_tokens: row.try_get::<i64, _>(3)? as u64,
            output_tokens: row.try_get::<i64, _>(4)? as u64,
            reasoning_tokens: row.try_get::<i64, _>(5)? as u64,
            images: row.try_get::<i64, _>(6)? as u64,
        };
        if stored != normalize(&req.usage) {
            return Err(LedgerError::Conflict(format!(
                "request {} was already settled with other usage ({stored:?})",
                req.request_id
            )));
        }
        let user_id: String = row.try_get(11)?;
        let provider: String = row.try_get(12)?;
        let model: String = row.try_get(13)?;
        let caller = match &req.caller {
            Caller::UserId(user) => Some(user.clone()),
            Caller::ApiKey(key) => self.resolve_api_key_on(conn, key).await?,
        };
        if caller.as_deref() != Some(user_id.as_str())
            || provider != req.provider
            || model != req.model
        {
            return Err(LedgerError::Conflict(format!(
                "request {} was already settled for another caller or model \
                 ({user_id}, {provider}/{model})",
                req.request_id
            )));
        }
        let cost_micros: Option<i64> = row.try_get(9)?;
        Ok(SettleResponse {
            request_id: req.request_id.clone(),
            status: SettleStatus::AlreadySettled,
            charged: row.try_get::<i64, _>(7)? as u64,
            debt: row.try_get::<i64, _>(8)? as u64,
            cost: cost_micros.map(format_micros),
            currency: row.try_get(10)?,
        })
    }

    /// Releases a hold without charge. Idempotent; voiding a settled call is a conflict.
    pub async fn void(&self, req: &VoidRequest) -> Result<SettleResponse, LedgerError> {
        check_void(req)?;
        self.retrying(|| async {
            match self.submit_one(Op::Void(req.clone())).await? {
                Done::Voided(response) => Ok(response),
                _ => Err(LedgerError::Inconsistent(
                    "the writer answered a void with another result".into(),
                )),
            }
        })
        .await?
        .ok_or_else(|| LedgerError::NotFound(format!("no hold for request {}", req.request_id)))
    }

    /// Settles and voids calls and releases leases (the filter's outbox) in as few
    /// transactions as the group writers allow: the whole batch is queued at once, so it
    /// normally commits as one. Each item is answered on its own, in order, exactly as
    /// [`Ledger::settle`] / [`Ledger::void`] / [`Ledger::release`] would answer it; a failing
    /// item never fails the others.
    pub async fn finalize(&self, items: &[Finalize]) -> Vec<Result<SettleResponse, LedgerError>> {
        // One batch at a time: a batch's operations keep their order (a lease's release comes
        // after its calls' settlements), so two batches applied at once by different writers
        // lock their users' rows in different orders: PostgreSQL deadlocked (18,200
        // settlement retries in a bench run with two batches in flight from one Envoy worker)
        // and MariaDB retried (see `concurrent_settlement_batches_settle_without_retries`).
        // SQLite has one writer anyway; the next batch's HTTP and parsing still overlap with
        // this one's transaction.
        let _turn = self.inner.finalize_turn.lock().await;
        let mut results: Vec<Option<Result<SettleResponse, LedgerError>>> = items
            .iter()
            .map(|item| check_finalize(item).err().map(Err))
            .collect();
        let mut tries = 0;
        loop {
            tries += 1;
            let open: Vec<usize> = (0..items.len()).filter(|i| results[*i].is_none()).collect();
            if open.is_empty() {
                break;
            }
            let ops = open
                .iter()
                .map(|&i| match &items[i] {
                    Finalize::Settle(req) => Op::Settle(req.clone()),
                    Finalize::Void(req) => Op::Void(req.clone()),
                    Finalize::Release(req) => Op::Release(req.clone()),
                })
                .collect();
            let answers = self.submit(ops).await;
            let mut again = false;
            for (i, answer) in open.into_iter().zip(answers) {
                let answer = match answer {
                    Ok(Done::Settled(r))
                    | Ok(Done::Voided(Some(r)))
                    | Ok(Done::Released(Some(r))) => Ok(r),
                    Ok(Done::Voided(None)) => Err(LedgerError::NotFound(format!(
                        "no hold for request {}",
                        items[i].request_id()
                    ))),
                    Ok(Done::Released(None)) => Err(LedgerError::NotFound(format!(
                        "no lease {}",
                        items[i].request_id()
                    ))),
                    Ok(Done::Authorized(_)) => Err(LedgerError::Inconsistent(
                        "the writer answered a finalization with an authorization".into(),
                    )),
                    Err(e) if tries < MAX_ATTEMPTS && retryable(&e) => {
                        self.count_retry();
                        again = true;
                        continue;
                    }
                    Err(e) => Err(e),
                };
                results[i] = Some(answer);
            }
            if again {
                backoff(tries).await;
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(LedgerError::Busy("not finalized".into()))))
            .collect()
    }

    /// Voids inside the caller's write transaction; None when there is no hold.
    pub(super) async fn void_on(
        &self,
        conn: &mut Conn,
        req: &VoidRequest,
    ) -> Result<Option<SettleResponse>, LedgerError> {
        if let Some(lease_id) = &req.lease_id {
            return self.void_under_lease_on(conn, req, lease_id).await;
        }
        let answer = self
            .release_on(conn, &req.request_id, Release::Void(req))
            .await?;
        // A void that names no lease for a call whose authorization granted one: the
        // client left before the filter read the answer, so the filter never admitted a
        // call under that lease and will never release it. Release it now rather than
        // leave the units held until the sweep.
        let lease = ReleaseRequest {
            lease_id: super::lease_id_for(&req.request_id),
        };
        let released = self.release_lease_on(conn, &lease).await?;
        if released.is_some_and(|r| r.status == SettleStatus::Released) {
            tracing::info!(request_id = %req.request_id,
                "void of an authorization whose lease was never used: lease released");
        }
        Ok(answer)
    }

    /// Releases every hold whose TTL passed by `now` (recorded as `expired`), leases past
    /// their admission window plus the hold TTL included. A hold that fails is logged and
    /// counted, and the sweep goes on with the others.
    pub async fn expire_holds(&self, now: i64) -> Result<ExpireHoldsReport, LedgerError> {
        const BATCH: i64 = 200;
        let mut report = ExpireHoldsReport::default();
        // Keyset cursor (expires_at, request_id): failed rows stay `held` and must not be
        // fetched again in this sweep.
        let mut after: (i64, String) = (i64::MIN, String::new());
        loop {
            let sql = self.db().sql(
                "SELECT request_id, amount, expires_at, kind FROM ledger_holds \
                 WHERE status = 'held' AND expires_at <= ? \
                 AND (expires_at > ? OR (expires_at = ? AND request_id > ?)) \
                 ORDER BY expires_at, request_id LIMIT ?",
            );
            let rows = sqlx::query(&sql)
                .bind(now)
                .bind(after.0)
                .bind(after.0)
                .bind(&after.1)
                .bind(BATCH)
                .fetch_all(self.db().pool())
                .await?;
            for row in &rows {
                let request_id: String = row.try_get(0)?;
                let amount: i64 = row.try_get(1)?;
                after = (row.try_get(2)?, request_id.clone());
                let lease = row.try_get::<String, _>(3)? == "lease";
                let released = self
                    .retrying(|| self.release_once(&request_id, Release::Expire(now)))
                    .await;
                match released {
                    Ok(Some(r)) if r.status == SettleStatus::Voided => {
                        report.expired += 1;
                        report.units_released += amount.max(0) as u64;
                        if lease {
                            report.leases_expired += 1;
                            tracing::warn!(lease_id = %request_id, "lease expired unreleased");
                        } else {
                            tracing::warn!(%request_id, "hold expired without settlement");
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        report.failed += 1;
                        tracing::error!(request_id = %request_id, %error,
                            "cannot expire this hold; continuing with the others");
                    }
                }
            }
            if (rows.len() as i64) < BATCH {
                return Ok(report);
            }
        }
    }

    /// Expiry of one hold in its own transaction.
    async fn release_once(
        &self,
        request_id: &str,
        release: Release<'_>,
    ) -> Result<Option<SettleResponse>, LedgerError> {
        let mut tx = self.db().begin_write().await?;
        match self.release_on(tx.conn(), request_id, release).await {
            Ok(answer) => {
                tx.commit().await?;
                Ok(answer)
            }
            Err(e) => {
                tx.rollback().await?;
                Err(e)
            }
        }
    }

    /// Void or expiry of one hold; None when there is no hold. `Voided` means released now.
    pub(super) async fn release_on(
        &self,
        conn: &mut Conn,
        request_id: &str,
        release: Release<'_>,
    ) -> Result<Option<SettleResponse>, LedgerError> {
        let db = self.db();
        let now = match release {
            Release::Expire(now) => now,
            Release::Void(_) => self.now(),
        };
        let (Some(hold), account) = load_hold(self, conn, request_id).await? else {
            return match release {
                Release::Void(void) => self.void_before_authorize(conn, void, now).await,
                Release::Expire(_) => Ok(None),
            };
        };
        let answer = |status| SettleResponse {
            request_id: request_id.to_string(),
            status,
            charged: 0,
            debt: 0,
            cost: None,
            currency: None,
        };
        match (hold.status.as_str(), &release) {
            (_, Release::Void(_)) if hold.is_lease() => {
                let message = format!("{request_id} is a lease; release it instead");
                return Err(LedgerError::Invalid(message));
            }
            ("held", _) => {}
            ("voided" | "expired", Release::Void(_)) => {
                return Ok(Some(answer(SettleStatus::AlreadyVoided)));
            }
            (status, Release::Void(_)) => {
                let message =
                    format!("request {request_id} was already {status}; it cannot be voided");
                return Err(LedgerError::Conflict(message));
            }
            // Expiry of a hold finalized meanwhile: nothing to do.
            (_, Release::Expire(_)) => {
                return Ok(Some(answer(SettleStatus::AlreadyVoided)));
            }
        }
        let (status, kind, reason, upstream_status) = match release {
            Release::Void(v) => ("voided", "void", v.reason.as_str(), v.upstream_status),
            Release::Expire(_) => ("expired", "expire", "hold expired without settlement", 0),
        };
        let mut batch = Batch::default();
        batch.push(
            "UPDATE ledger_holds SET status = ?, finalized_at = ? WHERE request_id = ?",
            vec![status.into(), now.into(), request_id.into()],
        );
        let mut journal = Journal::default();
        let Some(mut account) = account else {
            return Err(LedgerError::Inconsistent(format!(
                "hold {request_id} has no account {}/{}",
                hold.user_id, hold.quota_type
            )));
        };
        account.held -= hold.amount;
        journal.push(
            &account,
            Entry {
                kind,
                request_id: Some(request_id.to_string()),
                held_delta: -hold.amount,
                ..Entry::default()
            },
        );
        save_account_in(&mut batch, &account, now);
        let amount = hold.amount;
        let priced = hold.priced;
        let lease = hold.is_lease();
        let target = self.target_of_hold(conn, hold, amount).await?;
        let row = UsageRow {
            request_id,
            target: &target,
            outcome: "none",
            usage: Usage::default(),
            units: 0,
            charged: 0,
            debt: 0,
            cost_micros: None,
            estimated: false,
            upstream_status,
            status,
            reason: Some(reason),
            ended_at: now,
            held: target.release,
        };
        // No call is behind a lease (its calls have their own records). A hold left by an
        // authorize that arrived after its settlement (before that authorize replayed
        // finalized requests) has a usage record already: keep it.
        let recorded = lease
            || (matches!(release, Release::Expire(_))
                && usage_record_exists(self, conn, request_id).await?);
        if !recorded {
            push_usage(self, &mut batch, &row, !priced, now);
        }
        journal.into_batch(&mut batch, now);
        batch.execute(db.dialect(), conn).await?;
        Ok(Some(answer(SettleStatus::Voided)))
    }

    /// A void that found no hold: the filter voids a call whose client left while its
    /// authorization was pending, and that authorization may not have reached the ledger
    /// (yet). Success with nothing released, journaled (memo `void before authorize`), and
    /// a finalized hold row (user unknown: empty) so that a late authorize of this request
    /// replays it as denied instead of holding.
    pub(super) async fn void_before_authorize(
        &self,
        conn: &mut Conn,
        void: &VoidRequest,
        now: i64,
    ) -> Result<Option<SettleResponse>, LedgerError> {
        let request_id = void.request_id.as_str();
        tracing::info!(request_id = %request_id, reason = %void.reason,
            "void before authorize: nothing held; later authorizations are refused");
        let mut batch = Batch::default();
        let unknown = Target {
            user_id: String::new(),
            quota_type: String::new(),
            provider: String::new(),
            model: String::new(),
            measure: Measure::TotalTokens,
            price: None,
            release: 0,
            started_at: None,
            fail_open: false,
        };
        push_tombstone(&mut batch, request_id, &unknown, "voided", now);
        let mut journal = Journal::default();
        journal.push_raw(
            "",
            "",
            Entry {
                kind: "void",
                request_id: Some(request_id.to_string()),
                memo: Some("void before authorize".into()),
                ..Entry::default()
            },
        );
        journal.into_batch(&mut batch, now);
        batch.execute(self.db().dialect(), conn).await?;
        Ok(Some(SettleResponse {
            request_id: request_id.to_string(),
            status: SettleStatus::Voided,
            charged: 0,
            debt: 0,
            cost: None,
            currency: None,
        }))
    }

    /// Authorizes and settles a call already made, in one step. Denied when the balance
    /// does not cover the usage; idempotent by request id like authorize and settle.
    pub async fn consume(&self, req: &ConsumeRequest) -> Result<ConsumeResponse, LedgerError> {
        validate_usage(&req.usage)?;
        let authorize = AuthorizeRequest {
            request_id: req.request_id.clone(),
            caller: Caller::UserId(req.user_id.clone()),
            provider: req.provider.clone(),
            model: req.model.clone(),
            estimated_input_tokens: req.usage.input_tokens,
            max_output_tokens: Some(req.usage.output_tokens),
            requested_images: Some(req.usage.images),
            stream: false,
            lease: None,
        };
        let units = {
            let mut conn = Conn::from(self.db().pool().acquire().await?);
            let model = self
                .prices()
                .resolve(&mut conn, &req.provider, &req.model, self.now())
                .await?;
            let usage = normalize(&req.usage);
            let cost = match &model.price {
                Some(p) => Some(p.cost(&usage)?.micros),
                None => None,
            };
            model.measure.units(&usage, cost)
        };
        let authorization = match self.admit(&authorize, Some(units)).await? {
            Ok(admission) => self.reserve(&authorize, &admission).await?,
            Err(denied) => denied,
        };
        if authorization.decision == Decision::Deny {
            return Ok(ConsumeResponse {
                authorization,
                settlement: None,
            });
        }
        let settle = SettleRequest {
            request_id: req.request_id.clone(),
            caller: Caller::UserId(req.user_id.clone()),
            provider: req.provider.clone(),
            model: req.model.clone(),
            outcome: Outcome::Completed,
            usage: req.usage,
            estimated: req.estimated,
            authorized: true,
            upstream_status: 200,
            ended_at_ms: None,
            lease_id: None,
            held: 0,
        };
        let settlement = self.settle(&settle).await?;
        Ok(ConsumeResponse {
            authorization,
            settlement: Some(settlement),
        })
    }
}

pub(super) enum Release<'a> {
    Void(&'a VoidRequest),
    Expire(i64),
}

/// The hold of a request and its account, both locked, in one round trip. The account is
/// None only when there is no hold.
pub(super) async fn load_hold(
    ledger: &Ledger,
    conn: &mut Conn,
    request_id: &str,
) -> Result<(Option<Hold>, Option<Account>), LedgerError> {
    let db = ledger.db();
    if db.dialect() == Dialect::Sqlite {
        return load_hold_and_lots(ledger, conn, request_id).await;
    }
    let sql = format!(
        "SELECT {HOLD_AND_ACCOUNT_OF_H_A} FROM ledger_holds h JOIN ledger_accounts a \
         ON a.user_id = h.user_id AND a.quota_type = h.quota_type \
         WHERE h.request_id = ?{}",
        db.dialect().for_update()
    );
    let row = sqlx::query(&db.sql(&sql))
        .bind(request_id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else {
        return load_orphan_hold(ledger, conn, request_id).await;
    };
    let hold = hold_of(&row)?;
    let account = account_of(&hold, &row, None)?;
    Ok((Some(hold), Some(account)))
}

/// The account read with `hold`: columns 10-13 of a hold query.
pub(super) fn account_of(
    hold: &Hold,
    row: &sqlx::any::AnyRow,
    burnable_lots: Option<Vec<LotRow>>,
) -> Result<Account, LedgerError> {
    Ok(Account {
        user_id: hold.user_id.clone(),
        quota_type: hold.quota_type.clone(),
        balance: row.try_get(10)?,
        held: row.try_get(11)?,
        debt: row.try_get(12)?,
        next_event_at: row.try_get(13)?,
        burnable_lots,
    })
}

/// [`load_hold`] for a settlement, which burns lots: with the account's first burnable
/// lots, in burn order, in the same round trip where the dialect allows (SQLite,
/// PostgreSQL); MySQL reads the lots when it burns.
pub(super) async fn load_hold_to_charge(
    ledger: &Ledger,
    conn: &mut Conn,
    request_id: &str,
) -> Result<(Option<Hold>, Option<Account>), LedgerError> {
    match ledger.db().dialect() {
        Dialect::Sqlite | Dialect::Postgres => load_hold_and_lots(ledger, conn, request_id).await,
        Dialect::MySql => load_hold(ledger, conn, request_id).await,
    }
}

/// The hold and account columns of [`hold_of`] and [`account_of`], from `h` and `a`.
const HOLD_AND_ACCOUNT_OF_H_A: &str = "h.user_id, h.quota_type, h.provider, h.model, h.amount, \
    h.price_version_id, h.priced, h.status, h.created_at, h.kind, a.balance, a.held, a.debt, \
    a.next_event_at";

/// The hold, its account and the account's first burnable lots in burn order, one row per
/// lot (columns as [`hold_of`], [`account_of`] and [`lot_of`] read them). SQLite has no row
/// locks to take (its single writer holds the whole database): one join. PostgreSQL locks
/// the hold and account rows first, then the lots, the order every other writer takes them
/// in: the lots' query reads the materialized hold, so it cannot run before it. MySQL never
/// reads this way ([`load_hold_to_charge`] locks its lots when it burns them); it shares
/// SQLite's text only so that the match is whole.
pub(super) fn hold_and_lots_sql(dialect: Dialect) -> String {
    hold_and_lots_sql_with(dialect, "")
}

/// [`hold_and_lots_sql`] with `extra` appended to the selected columns (after the lots').
fn hold_and_lots_sql_with(dialect: Dialect, extra: &str) -> String {
    match dialect {
        Dialect::Postgres => format!(
            "WITH h AS MATERIALIZED (SELECT {HOLD_AND_ACCOUNT_OF_H_A} \
             FROM ledger_holds h JOIN ledger_accounts a \
             ON a.user_id = h.user_id AND a.quota_type = h.quota_type \
             WHERE h.request_id = ? FOR UPDATE), \
             l AS MATERIALIZED (SELECT l.id, l.status, l.remaining, l.effective_from, \
             l.expires_at, l.priority, l.created_at FROM quota_lots l \
             WHERE {LOTS_OF_H} AND {BURNABLE_OF_L} \
             ORDER BY {BURN_ORDER_OF_L} LIMIT {BURN_READ_LIMIT} FOR UPDATE OF l) \
             SELECT h.*, l.id, l.status, l.remaining, l.effective_from, l.expires_at{extra} \
             FROM h LEFT JOIN l ON TRUE ORDER BY {BURN_ORDER_OF_L}"
        ),
        Dialect::Sqlite | Dialect::MySql => format!(
            "SELECT {HOLD_AND_ACCOUNT_OF_H_A}, \
             l.id, l.status, l.remaining, l.effective_from, l.expires_at{extra} \
             FROM ledger_holds h JOIN ledger_accounts a \
             ON a.user_id = h.user_id AND a.quota_type = h.quota_type \
             LEFT JOIN quota_lots l ON l.user_id = h.user_id AND l.quota_type = h.quota_type \
             AND {BURNABLE_OF_L} \
             WHERE h.request_id = ? ORDER BY {BURN_ORDER_OF_L} LIMIT {BURN_READ_LIMIT}"
        ),
    }
}

/// See [`hold_and_lots_sql`]. Every round trip costs thread hand-offs in sqlx's SQLite
/// driver and a network round trip on PostgreSQL, and a settlement needs the lots anyway.
async fn load_hold_and_lots(
    ledger: &Ledger,
    conn: &mut Conn,
    request_id: &str,
) -> Result<(Option<Hold>, Option<Account>), LedgerError> {
    let db = ledger.db();
    let text = hold_and_lots_sql(db.dialect());
    let sql = db.sql(&text);
    let rows = sqlx::query(&sql)
        .bind(request_id)
        .fetch_all(&mut *conn)
        .await?;
    if rows.is_empty() {
        return load_orphan_hold(ledger, conn, request_id).await;
    }
    hold_with_lots(&rows)
}

/// The hold, account and lots of the (non-empty) rows of a [`hold_and_lots_sql`] query.
fn hold_with_lots(
    rows: &[sqlx::any::AnyRow],
) -> Result<(Option<Hold>, Option<Account>), LedgerError> {
    let Some(first) = rows.first() else {
        return Err(LedgerError::Inconsistent(
            "a hold read returned no row".into(),
        ));
    };
    let hold = hold_of(first)?;
    let mut lots = Vec::with_capacity(rows.len());
    for row in rows {
        lots.extend(lot_of(row)?);
    }
    let account = account_of(&hold, first, Some(lots))?;
    Ok((Some(hold), Some(account)))
}

/// What a settlement under a lease finds when it reads for itself. Returned once and taken
/// apart at once, so the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
pub(super) enum LeaseRead {
    /// The call already has a usage record: a repeat, answered by replaying it.
    Recorded,
    /// The lease (None when unknown) and its account, as [`load_hold_to_charge`] reads them.
    Loaded((Option<Hold>, Option<Account>)),
}

/// For a settlement of call `call_id` under lease `lease_id`: whether the call is already
/// recorded, else the lease, account and first lots. PostgreSQL asks both in one round trip
/// (the filter's settlement batches are mostly such calls, one after another); the others
/// ask in turn, as before.
pub(super) async fn load_lease_to_charge(
    ledger: &Ledger,
    conn: &mut Conn,
    lease_id: &str,
    call_id: &str,
) -> Result<LeaseRead, LedgerError> {
    let db = ledger.db();
    if db.dialect() != Dialect::Postgres {
        if usage_record_exists(ledger, conn, call_id).await? {
            return Ok(LeaseRead::Recorded);
        }
        return Ok(LeaseRead::Loaded(
            load_hold_to_charge(ledger, conn, lease_id).await?,
        ));
    }
    let text = hold_and_lots_sql_with(
        db.dialect(),
        ", EXISTS (SELECT 1 FROM usage_records u WHERE u.request_id = ?)",
    );
    let sql = db.sql(&text);
    let rows = sqlx::query(&sql)
        .bind(lease_id)
        .bind(call_id)
        .fetch_all(&mut *conn)
        .await?;
    let Some(first) = rows.first() else {
        // No such lease: the call may still be recorded (settled once as a direct call).
        if usage_record_exists(ledger, conn, call_id).await? {
            return Ok(LeaseRead::Recorded);
        }
        return Ok(LeaseRead::Loaded(
            load_orphan_hold(ledger, conn, lease_id).await?,
        ));
    };
    if first.try_get::<bool, _>(19)? {
        return Ok(LeaseRead::Recorded);
    }
    Ok(LeaseRead::Loaded(hold_with_lots(&rows)?))
}

/// The lot columns (14-18) of a hold row read with lots (SQLite); None for a hold with no
/// burnable lot.
pub(super) fn lot_of(row: &sqlx::any::AnyRow) -> Result<Option<LotRow>, LedgerError> {
    let Some(id) = row.try_get::<Option<i64>, _>(14)? else {
        return Ok(None);
    };
    Ok(Some(LotRow {
        id,
        status: row.try_get(15)?,
        remaining: row.try_get(16)?,
        effective_from: row.try_get(17)?,
        expires_at: row.try_get(18)?,
    }))
}

/// The columns [`hold_of`] reads.
const HOLD_COLUMNS: &str = "user_id, quota_type, provider, model, amount, price_version_id, \
    priced, status, created_at, kind";

/// A hold row read without locking it (for its immutable columns).
pub(super) async fn read_hold(
    ledger: &Ledger,
    conn: &mut Conn,
    request_id: &str,
) -> Result<Option<Hold>, LedgerError> {
    let db = ledger.db();
    let sql = format!("SELECT {HOLD_COLUMNS} FROM ledger_holds WHERE request_id = ?");
    let row = sqlx::query(&db.sql(&sql))
        .bind(request_id)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(hold_of).transpose()
}

/// A hold row with no account: only a finalized one is legitimate (a void before
/// authorize leaves one for an unknown user); an open one means the ledger is broken.
async fn load_orphan_hold(
    ledger: &Ledger,
    conn: &mut Conn,
    request_id: &str,
) -> Result<(Option<Hold>, Option<Account>), LedgerError> {
    let db = ledger.db();
    let sql = format!(
        "SELECT {HOLD_COLUMNS} FROM ledger_holds WHERE request_id = ?{}",
        db.dialect().for_update()
    );
    let row = sqlx::query(&db.sql(&sql))
        .bind(request_id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else {
        return Ok((None, None));
    };
    let hold = hold_of(&row)?;
    if hold.status == "held" {
        return Err(LedgerError::Inconsistent(format!(
            "hold {request_id} has no account"
        )));
    }
    Ok((Some(hold), None))
}

/// The first ten columns of a hold query.
pub(super) fn hold_of(row: &sqlx::any::AnyRow) -> Result<Hold, LedgerError> {
    Ok(Hold {
        user_id: row.try_get(0)?,
        quota_type: row.try_get(1)?,
        provider: row.try_get(2)?,
        model: row.try_get(3)?,
        amount: row.try_get(4)?,
        price_version_id: row.try_get(5)?,
        priced: row.try_get::<i32, _>(6)? != 0,
        status: row.try_get(7)?,
        created_at: row.try_get(8)?,
        kind: row.try_get(9)?,
    })
}

/// A finalized hold row of amount 0 for a request that never held (direct settlement,
/// void before authorize): it keys the request, so a late authorize replays it.
fn push_tombstone(batch: &mut Batch, request_id: &str, target: &Target, status: &str, now: i64) {
    batch.push(
        "INSERT INTO ledger_holds (request_id, user_id, quota_type, provider, model, amount, \
         price_version_id, priced, status, created_at, expires_at, finalized_at) \
         VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?)",
        vec![
            request_id.into(),
            target.user_id.as_str().into(),
            target.quota_type.as_str().into(),
            target.provider.as_str().into(),
            target.model.as_str().into(),
            target.price.as_ref().map(|p| p.id).into(),
            i64::from(target.price.is_some()).into(),
            status.into(),
            now.into(),
            now.into(),
            now.into(),
        ],
    );
}

pub(super) async fn usage_record_exists(
    ledger: &Ledger,
    conn: &mut Conn,
    request_id: &str,
) -> Result<bool, LedgerError> {
    Ok(usage_record_status(ledger, conn, request_id)
        .await?
        .is_some())
}

/// The status of a request's usage record (settled, voided, expired), if it has one.
pub(super) async fn usage_record_status(
    ledger: &Ledger,
    conn: &mut Conn,
    request_id: &str,
) -> Result<Option<String>, LedgerError> {
    let sql = ledger
        .db()
        .sql("SELECT status FROM usage_records WHERE request_id = ?");
    let row = sqlx::query(&sql)
        .bind(request_id)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}

/// What [`charge`] charges.
struct Charge<'a> {
    target: &'a Target,
    /// The account when already locked together with the hold.
    account: Option<Account>,
    units: i64,
    request_id: &'a str,
    /// Noted on the release journal row (the lease the units came from).
    memo: Option<&'a str>,
}

/// The usage of a settlement measured for `target`: normalized, priced, in quota units.
pub(super) fn measure(target: &Target, usage: &Usage) -> Result<Measured, LedgerError> {
    let usage = normalize(usage);
    let cost = match &target.price {
        Some(price) => Some(price.cost(&usage)?),
        None => None,
    };
    let units = target.measure.units(&usage, cost.map(|c| c.micros));
    Ok(Measured {
        usage,
        cost,
        units: to_i64(units, "units")?,
    })
}

/// Releases the call's hold and charges `units`: from the available balance in burn order,
/// the remainder as debt. Writes are queued into `batch`. Returns (charged, debt).
async fn charge(
    ledger: &Ledger,
    conn: &mut Conn,
    batch: &mut Batch,
    charge: Charge<'_>,
    journal: &mut Journal,
    now: i64,
) -> Result<(i64, i64), LedgerError> {
    let db = ledger.db();
    let Charge {
        target,
        account,
        units,
        request_id,
        memo,
    } = charge;
    let mut account = match account {
        Some(account) => account,
        None => lock_account(db, conn, &target.user_id, &target.quota_type, true, now)
            .await?
            .ok_or_else(|| LedgerError::Inconsistent("account vanished after insert".into()))?,
    };
    if account.is_due(now) {
        refresh_lots(db, conn, &mut account, journal, now).await?;
    }
    if target.release > 0 {
        account.held -= target.release;
        journal.push(
            &account,
            Entry {
                kind: "release",
                request_id: Some(request_id.to_string()),
                held_delta: -target.release,
                memo: memo.map(str::to_string),
                ..Entry::default()
            },
        );
    }
    let charged = units.min(account.available());
    let debt = units - charged;
    let entry = ("settle", request_id);
    burn(db, conn, batch, &mut account, journal, charged, entry, now).await?;
    if debt > 0 {
        account.debt += debt;
        journal.push(
            &account,
            Entry {
                kind: "debt",
                request_id: Some(request_id.to_string()),
                debt_delta: debt,
                ..Entry::default()
            },
        );
    }
    save_account_in(batch, &account, now);
    Ok((charged, debt))
}

pub(super) fn push_usage(
    ledger: &Ledger,
    batch: &mut Batch,
    row: &UsageRow<'_>,
    unpriced: bool,
    now: i64,
) {
    let t = row.target;
    let u = &row.usage;
    let flag = |b: bool| Value::from(i64::from(b));
    batch.push(
        "INSERT INTO usage_records (request_id, user_id, provider, model, quota_type, outcome, \
         input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, \
         images, units, charged, debt, held, cost_micros, currency, price_version_id, estimated, \
         partial, unpriced, fail_open, upstream_status, status, reason, day, started_at, \
         ended_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, \
         ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            row.request_id.into(),
            t.user_id.as_str().into(),
            t.provider.as_str().into(),
            t.model.as_str().into(),
            t.quota_type.as_str().into(),
            row.outcome.into(),
        ]
        .into_iter()
        .chain(token_columns(u))
        .chain([
            row.units.into(),
            row.charged.into(),
            row.debt.into(),
            row.held.into(),
            row.cost_micros.into(),
            t.price.as_ref().map(|p| p.currency.clone()).into(),
            t.price.as_ref().map(|p| p.id).into(),
            flag(row.estimated),
            flag(row.outcome == "partial"),
            flag(unpriced),
            flag(t.fail_open),
            i64::from(row.upstream_status).into(),
            row.status.into(),
            row.reason.into(),
            ledger.day_of(row.ended_at).into(),
            t.started_at.into(),
            row.ended_at.into(),
            now.into(),
        ])
        .collect(),
    );
}

pub(super) fn push_daily_cost(ledger: &Ledger, batch: &mut Batch, row: &UsageRow<'_>, now: i64) {
    let insert = "INSERT INTO daily_costs (day, provider, model, user_id, quota_type, currency, \
        requests, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, \
        reasoning_tokens, images, units, cost_micros, unpriced_requests, updated_at) \
        VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
    let sql = ledger.db().dialect().upsert_add(
        insert,
        "daily_costs",
        &["day", "provider", "model", "user_id"],
        &super::DAILY_COST_SUMS,
        &["currency", "updated_at"],
    );
    let t = row.target;
    let u = &row.usage;
    batch.push(
        sql,
        [
            ledger.day_of(row.ended_at).into(),
            t.provider.as_str().into(),
            t.model.as_str().into(),
            t.user_id.as_str().into(),
            t.quota_type.as_str().into(),
            t.price.as_ref().map(|p| p.currency.clone()).into(),
        ]
        .into_iter()
        .chain(token_columns(u))
        .chain([
            row.units.into(),
            row.cost_micros.unwrap_or(0).into(),
            i64::from(row.cost_micros.is_none()).into(),
            now.into(),
        ])
        .collect(),
    );
}

/// The six token columns of a usage record and a daily cost, in their column order.
pub(super) fn token_columns(u: &Usage) -> [Value; 6] {
    [
        (u.input_tokens as i64).into(),
        (u.cached_input_tokens as i64).into(),
        (u.cache_write_tokens as i64).into(),
        (u.output_tokens as i64).into(),
        (u.reasoning_tokens as i64).into(),
        (u.images as i64).into(),
    ]
}
