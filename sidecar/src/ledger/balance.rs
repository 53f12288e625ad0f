//! Balance queries.

use sqlx::Row;

use super::grant::LotStatus;
use super::{Ledger, LedgerError};

/// A user's standing in one quota type. Totals cover the lots still open (pending or
/// active); expired lots are history (see the journal).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Balance {
    pub user_id: String,
    pub quota_type: String,
    /// Sum of the open lots' amounts.
    pub granted: u64,
    /// Units of the open lots consumed (including debt repaid from them).
    pub used: u64,
    /// Units left in active lots.
    pub remaining: u64,
    /// Units reserved by calls in flight.
    pub held: u64,
    /// remaining - held (never below 0): what the next call can reserve.
    pub available: u64,
    /// Units consumed beyond the balance, paid by the next grants.
    pub debt: u64,
    /// Units of pending lots (not yet effective).
    pub pending: u64,
    pub lots: Vec<LotDetail>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LotDetail {
    pub lot_id: i64,
    pub source_type: String,
    pub source_id: String,
    pub amount: u64,
    pub remaining: u64,
    pub used: u64,
    pub expired: u64,
    pub priority: i32,
    pub effective_from: i64,
    pub expires_at: Option<i64>,
    pub status: LotStatus,
    pub remark: Option<String>,
}

impl Ledger {
    /// The balance of one quota type, or None when the user was never granted any.
    pub async fn balance(
        &self,
        user_id: &str,
        quota_type: &str,
    ) -> Result<Option<Balance>, LedgerError> {
        let now = self.now();
        let db = self.db();
        let sql = db.sql(
            "SELECT balance, held, debt, next_event_at FROM ledger_accounts \
             WHERE user_id = ? AND quota_type = ?",
        );
        let read = || {
            sqlx::query(&sql)
                .bind(user_id)
                .bind(quota_type)
                .fetch_optional(db.pool())
        };
        let Some(mut account) = read().await? else {
            return Ok(None);
        };
        let next_event_at: Option<i64> = account.try_get(3)?;
        if next_event_at.is_some_and(|t| t <= now) {
            // Apply due expiries first, so the answer never counts an expired lot.
            self.retrying(|| self.refresh_account(user_id, quota_type, now))
                .await?;
            account = read()
                .await?
                .ok_or_else(|| LedgerError::Inconsistent("account vanished".into()))?;
        }
        let balance: i64 = account.try_get(0)?;
        let held: i64 = account.try_get(1)?;
        let debt: i64 = account.try_get(2)?;
        let sql = db.sql(
            "SELECT id, source_type, source_id, amount, remaining, used, expired, priority, \
             effective_from, expires_at, status, remark FROM quota_lots \
             WHERE user_id = ? AND quota_type = ? AND status IN ('pending', 'active') \
             ORDER BY priority, CASE WHEN expires_at IS NULL THEN 1 ELSE 0 END, expires_at, created_at, id",
        );
        let mut lots = Vec::new();
        for r in sqlx::query(&sql)
            .bind(user_id)
            .bind(quota_type)
            .fetch_all(db.pool())
            .await?
        {
            let status: String = r.try_get(10)?;
            lots.push(LotDetail {
                lot_id: r.try_get(0)?,
                source_type: r.try_get(1)?,
                source_id: r.try_get(2)?,
                amount: non_negative(r.try_get(3)?),
                remaining: non_negative(r.try_get(4)?),
                used: non_negative(r.try_get(5)?),
                expired: non_negative(r.try_get(6)?),
                priority: r.try_get(7)?,
                effective_from: r.try_get(8)?,
                expires_at: r.try_get(9)?,
                status: LotStatus::parse(&status).ok_or_else(|| {
                    LedgerError::Inconsistent(format!("lot has unknown status `{status}`"))
                })?,
                remark: r.try_get(11)?,
            });
        }
        Ok(Some(Balance {
            user_id: user_id.to_string(),
            quota_type: quota_type.to_string(),
            granted: lots.iter().map(|l| l.amount).sum(),
            used: lots.iter().map(|l| l.used).sum(),
            remaining: non_negative(balance),
            held: non_negative(held),
            available: non_negative(balance - held),
            debt: non_negative(debt),
            pending: lots
                .iter()
                .filter(|l| l.status == LotStatus::Pending)
                .map(|l| l.remaining)
                .sum(),
            lots,
        }))
    }

    /// Balances of every quota type the user holds.
    pub async fn balances(&self, user_id: &str) -> Result<Vec<Balance>, LedgerError> {
        let sql = self
            .db()
            .sql("SELECT quota_type FROM ledger_accounts WHERE user_id = ? ORDER BY quota_type");
        let types: Vec<String> = sqlx::query(&sql)
            .bind(user_id)
            .fetch_all(self.db().pool())
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        let mut balances = Vec::new();
        for quota_type in types {
            if let Some(b) = self.balance(user_id, &quota_type).await? {
                balances.push(b);
            }
        }
        Ok(balances)
    }
}

fn non_negative(v: i64) -> u64 {
    v.max(0) as u64
}
