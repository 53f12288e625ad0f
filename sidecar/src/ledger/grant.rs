//! Grants (lots) and lot expiry.

use crate::storage::Conn;
use sqlx::Row;

use super::accounts::{
    burn, lock_account, refresh_lots, repay_debt, save_account, save_account_in, schedule_event,
    write_journal, Entry, Journal,
};
use super::{check_key, to_i64, Ledger, LedgerError};
use crate::storage::{insert_returning_id, is_unique_violation, with_returning_id, Batch, Db};

/// Grant `amount` units of a quota type to a user. (source_type, source_id) is the
/// idempotency key (per quota type): the same grant delivered twice creates one lot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GrantRequest {
    pub user_id: String,
    pub quota_type: String,
    pub amount: u64,
    /// `membership`, `purchase`, `admin_grant`, ... (lower-case letters and `_`).
    pub source_type: String,
    /// The source's own id (order id, membership period, admin ticket ...).
    pub source_id: String,
    #[serde(default)]
    pub remark: Option<String>,
    /// Unix ms from which the lot counts (default: now).
    #[serde(default)]
    pub effective_from: Option<i64>,
    /// Unix ms at which the lot's remainder expires (default: never).
    #[serde(default)]
    pub expires_at: Option<i64>,
    /// Burn order: lower burns first (default 0).
    #[serde(default)]
    pub priority: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LotStatus {
    /// Not yet effective.
    Pending,
    Active,
    Expired,
}

impl LotStatus {
    pub fn parse(s: &str) -> Option<LotStatus> {
        match s {
            "pending" => Some(LotStatus::Pending),
            "active" => Some(LotStatus::Active),
            "expired" => Some(LotStatus::Expired),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LotStatus::Pending => "pending",
            LotStatus::Active => "active",
            LotStatus::Expired => "expired",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GrantResponse {
    pub lot_id: i64,
    /// False when this grant had already been applied (a duplicate delivery).
    pub created: bool,
    pub status: LotStatus,
    /// Units of this lot that paid the account's debt.
    pub debt_repaid: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct ExpireLotsReport {
    pub accounts: u64,
    pub lots_expired: u64,
    pub units_expired: u64,
}

/// An administrative correction. A positive `delta` is a grant (source `admin_adjust`); a
/// negative one removes units from the user's available balance in burn order (journaled
/// as `adjust`) and fails when less is available. Idempotent by `adjustment_id`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AdjustRequest {
    pub user_id: String,
    pub quota_type: String,
    pub delta: i64,
    pub adjustment_id: String,
    #[serde(default)]
    pub remark: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AdjustResponse {
    /// Units added (positive) or removed (negative).
    pub applied: i64,
    /// False when this adjustment had already been applied.
    pub created: bool,
}

/// A lot to insert inside a transaction.
pub(super) struct NewLot<'a> {
    pub user_id: &'a str,
    pub quota_type: &'a str,
    pub amount: i64,
    pub source_type: &'a str,
    pub source_id: &'a str,
    pub remark: Option<&'a str>,
    pub effective_from: i64,
    pub expires_at: Option<i64>,
    pub priority: i32,
}

impl Ledger {
    /// Creates a lot (or returns the existing one for a duplicate delivery). An effective
    /// lot pays the account's debt first.
    pub async fn grant(&self, req: &GrantRequest) -> Result<GrantResponse, LedgerError> {
        let now = self.now();
        self.validate_grant(req, now).await?;
        self.retrying(|| self.grant_once(req, now)).await
    }

    async fn validate_grant(&self, req: &GrantRequest, now: i64) -> Result<(), LedgerError> {
        check_key(&req.user_id, "user_id")?;
        check_key(&req.source_id, "source_id")?;
        let source_ok = !req.source_type.is_empty()
            && req.source_type.len() <= 32
            && req
                .source_type
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_');
        if !source_ok {
            return Err(LedgerError::Invalid(
                "source_type must be 1..=32 lower-case letters or `_`".into(),
            ));
        }
        if req.amount == 0 {
            return Err(LedgerError::Invalid("amount must be positive".into()));
        }
        to_i64(req.amount, "amount")?;
        if req
            .remark
            .as_ref()
            .is_some_and(|r| r.chars().count() > 1000)
        {
            return Err(LedgerError::Invalid(
                "remark is longer than 1000 characters".into(),
            ));
        }
        let from = req.effective_from.unwrap_or(now);
        if let Some(expires_at) = req.expires_at {
            if expires_at <= from || expires_at <= now {
                return Err(LedgerError::Invalid(
                    "expires_at must be after effective_from and in the future".into(),
                ));
            }
        }
        let sql = self.db().sql("SELECT code FROM quota_types WHERE code = ?");
        let known = sqlx::query(&sql)
            .bind(&req.quota_type)
            .fetch_optional(self.db().pool())
            .await?
            .is_some();
        if !known {
            return Err(LedgerError::Invalid(format!(
                "unknown quota type `{}`",
                req.quota_type
            )));
        }
        Ok(())
    }

    async fn grant_once(&self, req: &GrantRequest, now: i64) -> Result<GrantResponse, LedgerError> {
        let db = self.db();
        let mut tx = db.begin_write().await?;
        let lot = NewLot {
            user_id: &req.user_id,
            quota_type: &req.quota_type,
            amount: to_i64(req.amount, "amount")?,
            source_type: &req.source_type,
            source_id: &req.source_id,
            remark: req.remark.as_deref(),
            effective_from: req.effective_from.unwrap_or(now),
            expires_at: req.expires_at,
            priority: req.priority,
        };
        let mut journal = Journal::default();
        match insert_lot(self, tx.conn(), &lot, &mut journal, now).await {
            Ok(response) => {
                write_journal(db, tx.conn(), journal, now).await?;
                tx.commit().await?;
                Ok(response)
            }
            Err(LedgerError::Db(e)) if is_unique_violation(&e) => {
                tx.rollback().await?;
                self.replay_grant(req).await
            }
            Err(e) => Err(e),
        }
    }

    /// A duplicate delivery: the same figures return the existing lot, others conflict.
    async fn replay_grant(&self, req: &GrantRequest) -> Result<GrantResponse, LedgerError> {
        let sql = self.db().sql(
            "SELECT id, user_id, amount, effective_from, expires_at, status FROM quota_lots \
             WHERE source_type = ? AND source_id = ? AND quota_type = ?",
        );
        let row = sqlx::query(&sql)
            .bind(&req.source_type)
            .bind(&req.source_id)
            .bind(&req.quota_type)
            .fetch_optional(self.db().pool())
            .await?
            .ok_or_else(|| LedgerError::Busy("grant raced with a concurrent attempt".into()))?;
        let user_id: String = row.try_get(1)?;
        let amount: i64 = row.try_get(2)?;
        let expires_at: Option<i64> = row.try_get(4)?;
        let effective_from: i64 = row.try_get(3)?;
        let same = user_id == req.user_id
            && amount as u64 == req.amount
            && expires_at == req.expires_at
            && req.effective_from.is_none_or(|f| f == effective_from);
        if !same {
            return Err(LedgerError::Conflict(format!(
                "grant {}/{} already exists with other figures (user {user_id}, amount {amount})",
                req.source_type, req.source_id
            )));
        }
        let status: String = row.try_get(5)?;
        Ok(GrantResponse {
            lot_id: row.try_get(0)?,
            created: false,
            status: LotStatus::parse(&status).unwrap_or(LotStatus::Active),
            debt_repaid: 0,
        })
    }

    /// Applies an administrative correction (see [`AdjustRequest`]).
    pub async fn adjust(&self, req: &AdjustRequest) -> Result<AdjustResponse, LedgerError> {
        check_key(&req.adjustment_id, "adjustment_id")?;
        if req.delta == 0 || req.delta == i64::MIN {
            return Err(LedgerError::Invalid(
                "delta must be a non-zero amount".into(),
            ));
        }
        if req.delta > 0 {
            let grant = GrantRequest {
                user_id: req.user_id.clone(),
                quota_type: req.quota_type.clone(),
                amount: req.delta as u64,
                source_type: "admin_adjust".into(),
                source_id: req.adjustment_id.clone(),
                remark: req.remark.clone(),
                effective_from: None,
                expires_at: None,
                priority: 0,
            };
            let granted = self.grant(&grant).await?;
            return Ok(AdjustResponse {
                applied: req.delta,
                created: granted.created,
            });
        }
        check_key(&req.user_id, "user_id")?;
        let now = self.now();
        self.retrying(|| self.deduct_once(req, now)).await
    }

    async fn deduct_once(
        &self,
        req: &AdjustRequest,
        now: i64,
    ) -> Result<AdjustResponse, LedgerError> {
        let db = self.db();
        let units = -req.delta;
        let key = format!("adjust:{}", req.adjustment_id);
        let mut tx = db.begin_write().await?;
        let Some(mut account) =
            lock_account(db, tx.conn(), &req.user_id, &req.quota_type, false, now).await?
        else {
            tx.rollback().await?;
            return Err(LedgerError::NotFound(format!(
                "{} has no {} quota",
                req.user_id, req.quota_type
            )));
        };
        // Under the account lock, so a duplicate delivery cannot slip in between.
        if let Some(applied) = applied_adjustment(db, tx.conn(), req).await? {
            tx.rollback().await?;
            return applied.map(|applied| AdjustResponse {
                applied,
                created: false,
            });
        }
        let mut journal = Journal::default();
        if account.is_due(now) {
            refresh_lots(db, tx.conn(), &mut account, &mut journal, now).await?;
        }
        if account.available() < units {
            tx.rollback().await?;
            return Err(LedgerError::Invalid(format!(
                "only {} units are available to remove",
                account.available()
            )));
        }
        let mut batch = Batch::default();
        let entry = ("adjust", key.as_str());
        burn(
            db,
            tx.conn(),
            &mut batch,
            &mut account,
            &mut journal,
            units,
            entry,
            now,
        )
        .await?;
        save_account_in(&mut batch, &account, now);
        journal.into_batch(&mut batch, now);
        batch.push(
            "INSERT INTO ledger_adjustments (adjustment_id, user_id, quota_type, delta, \
             created_at) VALUES (?, ?, ?, ?, ?)",
            vec![
                req.adjustment_id.as_str().into(),
                req.user_id.as_str().into(),
                req.quota_type.as_str().into(),
                req.delta.into(),
                now.into(),
            ],
        );
        match batch.execute(db.dialect(), tx.conn()).await {
            Err(e) if is_unique_violation(&e) => {
                tx.rollback().await?;
                return Err(LedgerError::Conflict(format!(
                    "adjustment {} was applied concurrently to another account",
                    req.adjustment_id
                )));
            }
            done => done?,
        }
        tx.commit().await?;
        Ok(AdjustResponse {
            applied: req.delta,
            created: true,
        })
    }

    /// Expires lots past their expiry and activates lots now effective, for every account
    /// with a due event. Admission and settlement also do this lazily per account.
    pub async fn expire_lots(&self, now: i64) -> Result<ExpireLotsReport, LedgerError> {
        const BATCH: i64 = 200;
        let mut report = ExpireLotsReport::default();
        loop {
            let sql = self.db().sql(
                "SELECT user_id, quota_type FROM ledger_accounts \
                 WHERE next_event_at IS NOT NULL AND next_event_at <= ? LIMIT ?",
            );
            let rows = sqlx::query(&sql)
                .bind(now)
                .bind(BATCH)
                .fetch_all(self.db().pool())
                .await?;
            for row in &rows {
                let user_id: String = row.try_get(0)?;
                let quota_type: String = row.try_get(1)?;
                let (units, lots) = self
                    .retrying(|| self.refresh_account(&user_id, &quota_type, now))
                    .await?;
                report.accounts += 1;
                report.lots_expired += lots;
                report.units_expired += units.max(0) as u64;
            }
            if (rows.len() as i64) < BATCH {
                return Ok(report);
            }
        }
    }

    /// Applies due lot events of one account; returns (units expired, lots expired).
    pub(super) async fn refresh_account(
        &self,
        user_id: &str,
        quota_type: &str,
        now: i64,
    ) -> Result<(i64, u64), LedgerError> {
        let db = self.db();
        let mut tx = db.begin_write().await?;
        let Some(mut account) =
            lock_account(db, tx.conn(), user_id, quota_type, false, now).await?
        else {
            tx.rollback().await?;
            return Ok((0, 0));
        };
        if !account.is_due(now) {
            tx.rollback().await?;
            return Ok((0, 0));
        }
        let mut journal = Journal::default();
        let expired = refresh_lots(db, tx.conn(), &mut account, &mut journal, now).await?;
        save_account(db, tx.conn(), &account, now).await?;
        write_journal(db, tx.conn(), journal, now).await?;
        tx.commit().await?;
        Ok(expired)
    }
}

/// Inserts a lot, then applies it to its account (balance, debt repayment, next event).
/// A duplicate source fails with a unique violation before anything else is written.
pub(super) async fn insert_lot(
    ledger: &Ledger,
    conn: &mut Conn,
    lot: &NewLot<'_>,
    journal: &mut Journal,
    now: i64,
) -> Result<GrantResponse, LedgerError> {
    let db = ledger.db();
    // The account first, as every other ledger write does: inserting the lot first would
    // hold the new lot row while waiting for the account, and a settlement holding the
    // account while scanning the lots (MySQL locks the uncommitted row) would deadlock.
    let mut account = lock_account(db, conn, lot.user_id, lot.quota_type, true, now)
        .await?
        .ok_or_else(|| LedgerError::Inconsistent("account vanished after insert".into()))?;
    let status = if lot.effective_from > now {
        LotStatus::Pending
    } else {
        LotStatus::Active
    };
    let sql = with_returning_id(
        db.dialect(),
        "INSERT INTO quota_lots (user_id, quota_type, source_type, source_id, amount, remaining, \
         used, expired, priority, effective_from, expires_at, status, remark, created_at, \
         updated_at) VALUES (?, ?, ?, ?, ?, ?, 0, 0, ?, ?, ?, ?, ?, ?, ?)",
    );
    let sql = db.sql(&sql);
    let query = sqlx::query(&sql)
        .bind(lot.user_id)
        .bind(lot.quota_type)
        .bind(lot.source_type)
        .bind(lot.source_id)
        .bind(lot.amount)
        .bind(lot.amount)
        .bind(lot.priority)
        .bind(lot.effective_from)
        .bind(lot.expires_at)
        .bind(status.as_str())
        .bind(lot.remark)
        .bind(now)
        .bind(now);
    let lot_id = insert_returning_id(db.dialect(), conn, query).await?;
    let active = status == LotStatus::Active;
    journal.push(
        &account,
        Entry {
            kind: "grant",
            lot_id: Some(lot_id),
            lot_delta: lot.amount,
            balance_delta: if active { lot.amount } else { 0 },
            memo: Some(format!("{}:{}", lot.source_type, lot.source_id)),
            ..Entry::default()
        },
    );
    let mut debt_repaid = 0;
    if active {
        account.balance += lot.amount;
        debt_repaid = repay_debt(db, conn, &mut account, journal, lot_id, lot.amount, now).await?;
        if debt_repaid < lot.amount {
            schedule_event(&mut account, lot.expires_at);
        }
    } else {
        schedule_event(&mut account, Some(lot.effective_from));
    }
    save_account(db, conn, &account, now).await?;
    Ok(GrantResponse {
        lot_id,
        created: true,
        status,
        debt_repaid: debt_repaid as u64,
    })
}

/// A deduction already applied under `req.adjustment_id`: `Ok(delta)` when it is this one
/// again, `Err(Conflict)` when the id was used for another account or amount.
async fn applied_adjustment(
    db: &Db,
    conn: &mut Conn,
    req: &AdjustRequest,
) -> Result<Option<Result<i64, LedgerError>>, LedgerError> {
    let sql =
        db.sql("SELECT user_id, quota_type, delta FROM ledger_adjustments WHERE adjustment_id = ?");
    let Some(row) = sqlx::query(&sql)
        .bind(&req.adjustment_id)
        .fetch_optional(conn)
        .await?
    else {
        return Ok(None);
    };
    let user_id: String = row.try_get(0)?;
    let quota_type: String = row.try_get(1)?;
    let delta: i64 = row.try_get(2)?;
    if (user_id.as_str(), quota_type.as_str(), delta)
        != (req.user_id.as_str(), req.quota_type.as_str(), req.delta)
    {
        return Ok(Some(Err(LedgerError::Conflict(format!(
            "adjustment {} was already applied: {delta} to {user_id}'s {quota_type}",
            req.adjustment_id
        )))));
    }
    Ok(Some(Ok(delta)))
}
