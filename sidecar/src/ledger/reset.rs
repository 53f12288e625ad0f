//! Monthly reset of membership quotas, idempotent per (membership, period).
//!
//! For period `YYYY-MM` (in the configured time zone), each active membership's lots from
//! earlier periods are expired (journaled as `reset`) and its plan's quotas are granted as
//! lots with source (`membership`, `<membership id>:<period>`), effective from the start of
//! the period and expiring at the start of the next. A `reset_runs` row per (membership,
//! period) makes a second run, or a run racing another process, a no-op.

use chrono::{Datelike, NaiveDate, TimeZone};
use sqlx::Row;

use super::accounts::{
    expire_lot, lock_account, refresh_lots, save_account, write_journal, Journal,
};
use super::grant::{insert_lot, NewLot};
use super::{Ledger, LedgerError};
use crate::storage::is_unique_violation;

#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct MonthlyResetReport {
    pub period: String,
    /// Active memberships found for the period.
    pub memberships: u64,
    /// Reset by this run.
    pub reset: u64,
    /// Already reset by an earlier run.
    pub already_done: u64,
    pub lots_granted: u64,
    pub units_expired: u64,
    /// Memberships that failed, with the error (the others still ran).
    pub failed: Vec<(i64, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetOutcome {
    Reset {
        lots_granted: u64,
        units_expired: u64,
    },
    AlreadyDone,
}

const SOURCE_TYPE: &str = "membership";

/// Start and end (exclusive) of a `YYYY-MM` period in `tz`, in Unix ms.
pub fn period_bounds(period: &str, tz: chrono_tz::Tz) -> Result<(i64, i64), LedgerError> {
    let invalid = || LedgerError::Invalid(format!("period `{period}` is not YYYY-MM"));
    if period.len() != 7 {
        return Err(invalid());
    }
    let first =
        NaiveDate::parse_from_str(&format!("{period}-01"), "%Y-%m-%d").map_err(|_| invalid())?;
    let next = if first.month() == 12 {
        NaiveDate::from_ymd_opt(first.year() + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(first.year(), first.month() + 1, 1)
    }
    .ok_or_else(invalid)?;
    let start_of = |d: NaiveDate| {
        d.and_hms_opt(0, 0, 0)
            .and_then(|t| tz.from_local_datetime(&t).earliest())
            .map(|t| t.timestamp_millis())
            .ok_or_else(invalid)
    };
    Ok((start_of(first)?, start_of(next)?))
}

impl Ledger {
    /// Resets every membership active during `period` (`YYYY-MM`). Safe to run again.
    pub async fn monthly_reset(
        &self,
        period: &str,
        now: i64,
    ) -> Result<MonthlyResetReport, LedgerError> {
        let (start, end) = period_bounds(period, self.config().timezone)?;
        let sql = self.db().sql(
            "SELECT id FROM memberships WHERE status = 'active' AND starts_at < ? \
             AND (ends_at IS NULL OR ends_at > ?) ORDER BY id",
        );
        let ids: Vec<i64> = sqlx::query(&sql)
            .bind(end)
            .bind(start)
            .fetch_all(self.db().pool())
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        let mut report = MonthlyResetReport {
            period: period.to_string(),
            memberships: ids.len() as u64,
            ..MonthlyResetReport::default()
        };
        for id in ids {
            match self.reset_membership(id, period, now).await {
                Ok(ResetOutcome::Reset {
                    lots_granted,
                    units_expired,
                }) => {
                    report.reset += 1;
                    report.lots_granted += lots_granted;
                    report.units_expired += units_expired;
                }
                Ok(ResetOutcome::AlreadyDone) => report.already_done += 1,
                Err(e) => {
                    tracing::error!(membership = id, period, error = %e, "monthly reset failed");
                    report.failed.push((id, e.to_string()));
                }
            }
        }
        Ok(report)
    }

    /// Resets one membership for `period` (also usable when a membership starts mid-month).
    pub async fn reset_membership(
        &self,
        membership_id: i64,
        period: &str,
        now: i64,
    ) -> Result<ResetOutcome, LedgerError> {
        let bounds = period_bounds(period, self.config().timezone)?;
        self.retrying(|| self.reset_once(membership_id, period, bounds, now))
            .await
    }

    async fn reset_once(
        &self,
        membership_id: i64,
        period: &str,
        (start, end): (i64, i64),
        now: i64,
    ) -> Result<ResetOutcome, LedgerError> {
        let db = self.db();
        let mut tx = db.begin_write().await?;
        let sql = db.sql("SELECT user_id, plan_id, status FROM memberships WHERE id = ?");
        let Some(row) = sqlx::query(&sql)
            .bind(membership_id)
            .fetch_optional(tx.conn())
            .await?
        else {
            tx.rollback().await?;
            return Err(LedgerError::NotFound(format!("membership {membership_id}")));
        };
        let user_id: String = row.try_get(0)?;
        let plan_id: i64 = row.try_get(1)?;
        let status: String = row.try_get(2)?;
        if status != "active" {
            tx.rollback().await?;
            return Err(LedgerError::Conflict(format!(
                "membership {membership_id} is {status}, not active"
            )));
        }

        let sql = db.sql(
            "INSERT INTO reset_runs (membership_id, period, user_id, plan_id, granted_lots, \
             expired_units, created_at) VALUES (?, ?, ?, ?, 0, 0, ?)",
        );
        let claimed = sqlx::query(&sql)
            .bind(membership_id)
            .bind(period)
            .bind(&user_id)
            .bind(plan_id)
            .bind(now)
            .execute(tx.conn())
            .await;
        match claimed {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                tx.rollback().await?;
                return Ok(ResetOutcome::AlreadyDone);
            }
            Err(e) => return Err(e.into()),
        }

        let sql = db.sql("SELECT quota_type, amount, priority FROM plan_quotas WHERE plan_id = ? ORDER BY quota_type");
        let mut quotas = Vec::new();
        for r in sqlx::query(&sql).bind(plan_id).fetch_all(tx.conn()).await? {
            quotas.push((
                r.try_get::<String, _>(0)?,
                r.try_get::<i64, _>(1)?,
                r.try_get::<i32, _>(2)?,
            ));
        }

        let mut journal = Journal::default();
        let prefix = format!("{membership_id}:");
        let this_period = format!("{membership_id}:{period}");
        let units_expired = self
            .expire_earlier_periods(
                tx.conn(),
                &user_id,
                &prefix,
                &this_period,
                &mut journal,
                now,
            )
            .await?;

        let mut lots_granted = 0;
        if end > now {
            for (quota_type, amount, priority) in &quotas {
                if *amount <= 0 {
                    continue;
                }
                let lot = NewLot {
                    user_id: &user_id,
                    quota_type,
                    amount: *amount,
                    source_type: SOURCE_TYPE,
                    source_id: &this_period,
                    remark: Some("monthly membership quota"),
                    effective_from: start,
                    expires_at: Some(end),
                    priority: *priority,
                };
                insert_lot(self, tx.conn(), &lot, &mut journal, now).await?;
                lots_granted += 1;
            }
        }
        let sql = db.sql(
            "UPDATE reset_runs SET granted_lots = ?, expired_units = ? WHERE membership_id = ? AND period = ?",
        );
        sqlx::query(&sql)
            .bind(lots_granted as i32)
            .bind(units_expired)
            .bind(membership_id)
            .bind(period)
            .execute(tx.conn())
            .await?;
        write_journal(db, tx.conn(), journal, now).await?;
        tx.commit().await?;
        Ok(ResetOutcome::Reset {
            lots_granted,
            units_expired: units_expired.max(0) as u64,
        })
    }

    /// Expires this membership's still-open lots of periods before `this_period`.
    async fn expire_earlier_periods(
        &self,
        conn: &mut crate::storage::Conn,
        user_id: &str,
        prefix: &str,
        this_period: &str,
        journal: &mut Journal,
        now: i64,
    ) -> Result<i64, LedgerError> {
        let db = self.db();
        let sql = db.sql(
            "SELECT DISTINCT quota_type FROM quota_lots WHERE user_id = ? AND source_type = ? \
             AND source_id LIKE ? AND source_id < ? AND status IN ('pending', 'active')",
        );
        let quota_types: Vec<String> = sqlx::query(&sql)
            .bind(user_id)
            .bind(SOURCE_TYPE)
            .bind(format!("{prefix}%"))
            .bind(this_period)
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        let mut expired = 0;
        for quota_type in quota_types {
            let Some(mut account) =
                lock_account(db, conn, user_id, &quota_type, false, now).await?
            else {
                continue;
            };
            let sql = format!(
                "SELECT id, status, remaining FROM quota_lots WHERE user_id = ? AND quota_type = ? \
                 AND source_type = ? AND source_id LIKE ? AND source_id < ? \
                 AND status IN ('pending', 'active'){}",
                db.dialect().for_update()
            );
            let lots = sqlx::query(&db.sql(&sql))
                .bind(user_id)
                .bind(&quota_type)
                .bind(SOURCE_TYPE)
                .bind(format!("{prefix}%"))
                .bind(this_period)
                .fetch_all(&mut *conn)
                .await?;
            for lot in lots {
                let id: i64 = lot.try_get(0)?;
                let status: String = lot.try_get(1)?;
                let remaining: i64 = lot.try_get(2)?;
                expire_lot(
                    db,
                    conn,
                    &mut account,
                    journal,
                    id,
                    &status,
                    remaining,
                    "reset",
                    now,
                )
                .await?;
                expired += remaining;
            }
            // Other due lots, and a next event that no longer counts the reset lots.
            refresh_lots(db, conn, &mut account, journal, now).await?;
            save_account(db, conn, &account, now).await?;
        }
        Ok(expired)
    }
}
