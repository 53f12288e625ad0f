//! Settlement, void, hold expiry and direct consumption.

use std::sync::Arc;

use llm_meter_protocol::{
    AuthorizeRequest, AuthorizeResponse, Caller, Decision, Outcome, SettleRequest, SettleResponse,
    SettleStatus, Usage, VoidRequest,
};
use sqlx::{AnyConnection, Row};

use super::accounts::{burn, lock_account, refresh_lots, save_account_in, Account, Entry, Journal};
use super::authorize::MAX_UNITS_PER_CALL;
use super::{check_key, to_i64, Ledger, LedgerError};
use crate::pricing::{format_micros, Measure, PriceVersion};
use crate::storage::{Batch, Value};

/// A hold row as read (and locked) inside a transaction.
struct Hold {
    user_id: String,
    quota_type: String,
    provider: String,
    model: String,
    amount: i64,
    price_version_id: Option<i64>,
    priced: bool,
    status: String,
    created_at: i64,
}

/// Who and what a settlement charges.
struct Target {
    user_id: String,
    quota_type: String,
    provider: String,
    model: String,
    measure: Measure,
    price: Option<Arc<PriceVersion>>,
    /// Units still held for this call (0 without a live hold).
    release: i64,
    started_at: Option<i64>,
    fail_open: bool,
}

/// One `usage_records` row.
struct UsageRow<'a> {
    request_id: &'a str,
    target: &'a Target,
    outcome: &'static str,
    usage: Usage,
    units: i64,
    charged: i64,
    debt: i64,
    cost_micros: Option<i64>,
    estimated: bool,
    upstream_status: u16,
    status: &'static str,
    reason: Option<&'a str>,
    ended_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct ExpireHoldsReport {
    pub expired: u64,
    pub units_released: u64,
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

/// Subsets clamped to their totals, so nothing is billed twice.
fn normalize(usage: &Usage) -> Usage {
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
        check_key(&req.request_id, "request_id")?;
        check_key(&req.provider, "provider")?;
        check_key(&req.model, "model")?;
        validate_usage(&req.usage)?;
        self.retrying(|| self.settle_once(req)).await
    }

    async fn settle_once(&self, req: &SettleRequest) -> Result<SettleResponse, LedgerError> {
        let db = self.db();
        let now = self.now();
        let mut tx = db.begin_write().await?;
        let (hold, account) = load_hold(self, tx.conn(), &req.request_id).await?;
        let late = hold.as_ref().is_some_and(|h| h.status == "expired");
        let target = match hold {
            Some(h) if h.status == "held" || h.status == "expired" => {
                let release = if h.status == "held" { h.amount } else { 0 };
                self.target_of_hold(tx.conn(), h, release).await?
            }
            Some(h) if h.status == "settled" => {
                tx.rollback().await?;
                return self.replay_settlement(req).await;
            }
            Some(h) => {
                tx.rollback().await?;
                return Err(LedgerError::Conflict(format!(
                    "request {} was already {}; it cannot be settled",
                    req.request_id, h.status
                )));
            }
            None => {
                if usage_record_exists(self, tx.conn(), &req.request_id).await? {
                    tx.rollback().await?;
                    return self.replay_settlement(req).await;
                }
                let Some(target) = self.direct_target(tx.conn(), req, now).await? else {
                    tx.rollback().await?;
                    return Err(LedgerError::Invalid(
                        "the API key of this fail-open settlement is unknown".into(),
                    ));
                };
                target
            }
        };

        let usage = normalize(&req.usage);
        let cost = match &target.price {
            Some(price) => Some(price.cost(&usage)?),
            None => None,
        };
        let cost_micros = cost.map(|c| c.micros);
        let units = to_i64(target.measure.units(&usage, cost_micros), "units")?;
        let mut journal = Journal::default();
        let mut batch = Batch::default();
        let to_charge = Charge {
            target: &target,
            account,
            units,
            request_id: &req.request_id,
        };
        let (charged, debt) =
            charge(self, tx.conn(), &mut batch, to_charge, &mut journal, now).await?;
        if target.started_at.is_some() {
            batch.push(
                "UPDATE ledger_holds SET status = 'settled', finalized_at = ? WHERE request_id = ?",
                vec![now.into(), req.request_id.as_str().into()],
            );
        }
        if late {
            // The hold expired unsettled and left an `expired` record; the call did run.
            let sql =
                db.sql("DELETE FROM usage_records WHERE request_id = ? AND status = 'expired'");
            sqlx::query(&sql)
                .bind(&req.request_id)
                .execute(tx.conn())
                .await?;
        }
        let ended_at = match req.ended_at_ms.and_then(|t| i64::try_from(t).ok()) {
            Some(t) if t > 0 && t <= now => t,
            _ => now,
        };
        let row = UsageRow {
            request_id: &req.request_id,
            target: &target,
            outcome: match req.outcome {
                Outcome::Completed => "completed",
                Outcome::Partial => "partial",
            },
            usage,
            units,
            charged,
            debt,
            cost_micros,
            estimated: req.estimated,
            upstream_status: req.upstream_status,
            status: "settled",
            reason: None,
            ended_at,
        };
        push_usage(self, &mut batch, &row, target.price.is_none(), now);
        push_daily_cost(self, &mut batch, &row, now);
        journal.into_batch(&mut batch, now);
        batch.execute(db.dialect(), tx.conn()).await?;
        tx.commit().await?;
        if debt > 0 {
            tracing::warn!(request_id = %req.request_id, user = %target.user_id,
                quota_type = %target.quota_type, debt, "usage exceeded the balance; recorded as debt");
        }
        Ok(SettleResponse {
            request_id: req.request_id.clone(),
            status: SettleStatus::Settled,
            charged: charged as u64,
            debt: debt as u64,
            cost: cost.map(|c| format_micros(c.micros)),
            currency: target.price.as_ref().map(|p| p.currency.clone()),
        })
    }

    async fn target_of_hold(
        &self,
        conn: &mut AnyConnection,
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
        conn: &mut AnyConnection,
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
        Ok(Some(Target {
            user_id,
            quota_type: model.quota_type,
            provider: req.provider.clone(),
            model: req.model.clone(),
            measure: model.measure,
            price: model.price,
            release: 0,
            started_at: None,
            fail_open: !req.authorized,
        }))
    }

    /// Answers a retried settlement from its usage record.
    async fn replay_settlement(&self, req: &SettleRequest) -> Result<SettleResponse, LedgerError> {
        let sql = self.db().sql(
            "SELECT status, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, \
             reasoning_tokens, images, charged, debt, cost_micros, currency \
             FROM usage_records WHERE request_id = ?",
        );
        let row = sqlx::query(&sql)
            .bind(&req.request_id)
            .fetch_optional(self.db().pool())
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
        check_key(&req.request_id, "request_id")?;
        self.retrying(|| self.release_once(&req.request_id, Release::Void(req)))
            .await?
            .ok_or_else(|| LedgerError::NotFound(format!("no hold for request {}", req.request_id)))
    }

    /// Releases every hold whose TTL passed by `now` (recorded as `expired`).
    pub async fn expire_holds(&self, now: i64) -> Result<ExpireHoldsReport, LedgerError> {
        const BATCH: i64 = 200;
        let mut report = ExpireHoldsReport::default();
        loop {
            let sql = self.db().sql(
                "SELECT request_id, amount FROM ledger_holds WHERE status = 'held' \
                 AND expires_at <= ? ORDER BY expires_at LIMIT ?",
            );
            let rows = sqlx::query(&sql)
                .bind(now)
                .bind(BATCH)
                .fetch_all(self.db().pool())
                .await?;
            for row in &rows {
                let request_id: String = row.try_get(0)?;
                let released = self
                    .retrying(|| self.release_once(&request_id, Release::Expire(now)))
                    .await?;
                if matches!(released, Some(r) if r.status == SettleStatus::Voided) {
                    report.expired += 1;
                    report.units_released += row.try_get::<i64, _>(1)?.max(0) as u64;
                    tracing::warn!(request_id = %request_id, "hold expired without settlement");
                }
            }
            if (rows.len() as i64) < BATCH {
                return Ok(report);
            }
        }
    }

    /// Void or expiry of one hold; None when there is no hold. `Voided` means released now.
    async fn release_once(
        &self,
        request_id: &str,
        release: Release<'_>,
    ) -> Result<Option<SettleResponse>, LedgerError> {
        let db = self.db();
        let now = match release {
            Release::Expire(now) => now,
            Release::Void(_) => self.now(),
        };
        let mut tx = db.begin_write().await?;
        let (Some(hold), account) = load_hold(self, tx.conn(), request_id).await? else {
            tx.rollback().await?;
            return Ok(None);
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
            ("held", _) => {}
            ("voided" | "expired", Release::Void(_)) => {
                tx.rollback().await?;
                return Ok(Some(answer(SettleStatus::AlreadyVoided)));
            }
            (status, Release::Void(_)) => {
                let message =
                    format!("request {request_id} was already {status}; it cannot be voided");
                tx.rollback().await?;
                return Err(LedgerError::Conflict(message));
            }
            // Expiry of a hold finalized meanwhile: nothing to do.
            (_, Release::Expire(_)) => {
                tx.rollback().await?;
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
        let target = self.target_of_hold(tx.conn(), hold, amount).await?;
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
        };
        push_usage(self, &mut batch, &row, !priced, now);
        journal.into_batch(&mut batch, now);
        batch.execute(db.dialect(), tx.conn()).await?;
        tx.commit().await?;
        Ok(Some(answer(SettleStatus::Voided)))
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
        };
        let units = {
            let mut conn = self.db().pool().acquire().await?;
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
        };
        let settlement = self.settle(&settle).await?;
        Ok(ConsumeResponse {
            authorization,
            settlement: Some(settlement),
        })
    }
}

enum Release<'a> {
    Void(&'a VoidRequest),
    Expire(i64),
}

/// The hold of a request and its account, both locked, in one round trip. The account is
/// None only when there is no hold.
async fn load_hold(
    ledger: &Ledger,
    conn: &mut AnyConnection,
    request_id: &str,
) -> Result<(Option<Hold>, Option<Account>), LedgerError> {
    let db = ledger.db();
    let sql = format!(
        "SELECT h.user_id, h.quota_type, h.provider, h.model, h.amount, h.price_version_id, \
         h.priced, h.status, h.created_at, a.balance, a.held, a.debt, a.next_event_at \
         FROM ledger_holds h JOIN ledger_accounts a \
         ON a.user_id = h.user_id AND a.quota_type = h.quota_type \
         WHERE h.request_id = ?{}",
        db.dialect().for_update()
    );
    let row = sqlx::query(&db.sql(&sql))
        .bind(request_id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else {
        let sql = db.sql("SELECT request_id FROM ledger_holds WHERE request_id = ?");
        let orphan = sqlx::query(&sql)
            .bind(request_id)
            .fetch_optional(&mut *conn)
            .await?;
        if orphan.is_some() {
            return Err(LedgerError::Inconsistent(format!(
                "hold {request_id} has no account"
            )));
        }
        return Ok((None, None));
    };
    let hold = Hold {
        user_id: row.try_get(0)?,
        quota_type: row.try_get(1)?,
        provider: row.try_get(2)?,
        model: row.try_get(3)?,
        amount: row.try_get(4)?,
        price_version_id: row.try_get(5)?,
        priced: row.try_get::<i32, _>(6)? != 0,
        status: row.try_get(7)?,
        created_at: row.try_get(8)?,
    };
    let account = Account {
        user_id: hold.user_id.clone(),
        quota_type: hold.quota_type.clone(),
        balance: row.try_get(9)?,
        held: row.try_get(10)?,
        debt: row.try_get(11)?,
        next_event_at: row.try_get(12)?,
    };
    Ok((Some(hold), Some(account)))
}

async fn usage_record_exists(
    ledger: &Ledger,
    conn: &mut AnyConnection,
    request_id: &str,
) -> Result<bool, LedgerError> {
    let sql = ledger
        .db()
        .sql("SELECT id FROM usage_records WHERE request_id = ?");
    let row = sqlx::query(&sql)
        .bind(request_id)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.is_some())
}

/// What [`charge`] charges.
struct Charge<'a> {
    target: &'a Target,
    /// The account when already locked together with the hold.
    account: Option<Account>,
    units: i64,
    request_id: &'a str,
}

/// Releases the call's hold and charges `units`: from the available balance in burn order,
/// the remainder as debt. Writes are queued into `batch`. Returns (charged, debt).
async fn charge(
    ledger: &Ledger,
    conn: &mut AnyConnection,
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

fn push_usage(ledger: &Ledger, batch: &mut Batch, row: &UsageRow<'_>, unpriced: bool, now: i64) {
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
        vec![
            row.request_id.into(),
            t.user_id.as_str().into(),
            t.provider.as_str().into(),
            t.model.as_str().into(),
            t.quota_type.as_str().into(),
            row.outcome.into(),
            (u.input_tokens as i64).into(),
            (u.cached_input_tokens as i64).into(),
            (u.cache_write_tokens as i64).into(),
            (u.output_tokens as i64).into(),
            (u.reasoning_tokens as i64).into(),
            (u.images as i64).into(),
            row.units.into(),
            row.charged.into(),
            row.debt.into(),
            t.release.into(),
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
        ],
    );
}

fn push_daily_cost(ledger: &Ledger, batch: &mut Batch, row: &UsageRow<'_>, now: i64) {
    let insert = "INSERT INTO daily_costs (day, provider, model, user_id, quota_type, currency, \
        requests, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, \
        reasoning_tokens, images, units, cost_micros, unpriced_requests, updated_at) \
        VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
    let sql = ledger.db().dialect().upsert_add(
        insert,
        "daily_costs",
        &["day", "provider", "model", "user_id"],
        &[
            "requests",
            "input_tokens",
            "cached_input_tokens",
            "cache_write_tokens",
            "output_tokens",
            "reasoning_tokens",
            "images",
            "units",
            "cost_micros",
            "unpriced_requests",
        ],
        &["currency", "updated_at"],
    );
    let t = row.target;
    let u = &row.usage;
    batch.push(
        sql,
        vec![
            ledger.day_of(row.ended_at).into(),
            t.provider.as_str().into(),
            t.model.as_str().into(),
            t.user_id.as_str().into(),
            t.quota_type.as_str().into(),
            t.price.as_ref().map(|p| p.currency.clone()).into(),
            (u.input_tokens as i64).into(),
            (u.cached_input_tokens as i64).into(),
            (u.cache_write_tokens as i64).into(),
            (u.output_tokens as i64).into(),
            (u.reasoning_tokens as i64).into(),
            (u.images as i64).into(),
            row.units.into(),
            row.cost_micros.unwrap_or(0).into(),
            i64::from(row.cost_micros.is_none()).into(),
            now.into(),
        ],
    );
}
