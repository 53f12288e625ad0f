//! Reconciliation: rebuild every balance from the journal and compare with the stored state.
//!
//! Checks, per account: sum of journal balance/held/debt deltas = stored balance/held/debt;
//! stored balance = remaining of its active lots; stored held = amounts of its open holds.
//! Per lot: sum of its journal lot deltas = remaining, and amount = remaining + used + expired.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::Row;

use super::accounts::sum;
use super::{Ledger, LedgerError};

/// One disagreement between the journal (or a derived total) and the stored state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Drift {
    pub user_id: String,
    pub quota_type: String,
    /// Set for lot-level drifts.
    pub lot_id: Option<i64>,
    /// What was compared, e.g. `balance vs journal`.
    pub check: &'static str,
    pub expected: i64,
    pub actual: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct ReconcileReport {
    pub accounts_checked: u64,
    pub lots_checked: u64,
    pub journal_entries: u64,
    pub drifts: Vec<Drift>,
}

impl ReconcileReport {
    pub fn is_clean(&self) -> bool {
        self.drifts.is_empty()
    }
}

type Key = (String, String);

#[derive(Default, Clone, Copy)]
struct Totals {
    balance: i64,
    held: i64,
    debt: i64,
}

impl Ledger {
    /// Proves every stored balance from the journal; returns any drift found.
    pub async fn reconcile(&self) -> Result<ReconcileReport, LedgerError> {
        let db = self.db();
        let d = db.dialect();
        let pool = db.pool();
        let mut report = ReconcileReport::default();

        let mut journal: BTreeMap<Key, Totals> = BTreeMap::new();
        let sql = format!(
            "SELECT user_id, quota_type, {}, {}, {}, COUNT(*) FROM ledger_journal GROUP BY user_id, quota_type",
            sum(d, "balance_delta"),
            sum(d, "held_delta"),
            sum(d, "debt_delta")
        );
        for r in sqlx::query(&sql).fetch_all(pool).await? {
            let totals = Totals {
                balance: r.try_get(2)?,
                held: r.try_get(3)?,
                debt: r.try_get(4)?,
            };
            report.journal_entries += r.try_get::<i64, _>(5)? as u64;
            journal.insert((r.try_get(0)?, r.try_get(1)?), totals);
        }

        let mut stored: BTreeMap<Key, Totals> = BTreeMap::new();
        for r in sqlx::query("SELECT user_id, quota_type, balance, held, debt FROM ledger_accounts")
            .fetch_all(pool)
            .await?
        {
            let totals = Totals {
                balance: r.try_get(2)?,
                held: r.try_get(3)?,
                debt: r.try_get(4)?,
            };
            stored.insert((r.try_get(0)?, r.try_get(1)?), totals);
        }
        let active_lots = grouped_sum(
            self,
            &format!(
                "SELECT user_id, quota_type, {} FROM quota_lots WHERE status = 'active' GROUP BY user_id, quota_type",
                sum(d, "remaining")
            ),
        )
        .await?;
        let open_holds = grouped_sum(
            self,
            &format!(
                "SELECT user_id, quota_type, {} FROM ledger_holds WHERE status = 'held' GROUP BY user_id, quota_type",
                sum(d, "amount")
            ),
        )
        .await?;

        let keys: BTreeSet<&Key> = journal.keys().chain(stored.keys()).collect();
        for key in keys {
            report.accounts_checked += 1;
            let j = journal.get(key).copied().unwrap_or_default();
            let s = stored.get(key).copied().unwrap_or_default();
            let mut check = |check, expected, actual| {
                if expected != actual {
                    report.drifts.push(Drift {
                        user_id: key.0.clone(),
                        quota_type: key.1.clone(),
                        lot_id: None,
                        check,
                        expected,
                        actual,
                    });
                }
            };
            check("balance vs journal", j.balance, s.balance);
            check("held vs journal", j.held, s.held);
            check("debt vs journal", j.debt, s.debt);
            check(
                "balance vs active lots",
                active_lots.get(key).copied().unwrap_or(0),
                s.balance,
            );
            check(
                "held vs open holds",
                open_holds.get(key).copied().unwrap_or(0),
                s.held,
            );
        }

        let sql = format!(
            "SELECT lot_id, {} FROM ledger_journal WHERE lot_id IS NOT NULL GROUP BY lot_id",
            sum(d, "lot_delta")
        );
        let mut lot_journal: BTreeMap<i64, i64> = BTreeMap::new();
        for r in sqlx::query(&sql).fetch_all(pool).await? {
            lot_journal.insert(r.try_get(0)?, r.try_get(1)?);
        }
        for r in sqlx::query(
            "SELECT id, user_id, quota_type, amount, remaining, used, expired FROM quota_lots",
        )
        .fetch_all(pool)
        .await?
        {
            report.lots_checked += 1;
            let id: i64 = r.try_get(0)?;
            let (amount, remaining, used, expired): (i64, i64, i64, i64) =
                (r.try_get(3)?, r.try_get(4)?, r.try_get(5)?, r.try_get(6)?);
            let drift = |check, expected, actual| Drift {
                user_id: r.try_get(1).unwrap_or_default(),
                quota_type: r.try_get(2).unwrap_or_default(),
                lot_id: Some(id),
                check,
                expected,
                actual,
            };
            let from_journal = lot_journal.get(&id).copied().unwrap_or(0);
            if from_journal != remaining {
                report
                    .drifts
                    .push(drift("lot remaining vs journal", from_journal, remaining));
            }
            if amount != remaining + used + expired {
                report.drifts.push(drift(
                    "lot amount vs remaining + used + expired",
                    amount,
                    remaining + used + expired,
                ));
            }
        }
        if !report.is_clean() {
            tracing::error!(
                drifts = report.drifts.len(),
                "ledger reconciliation found drift"
            );
        }
        Ok(report)
    }
}

async fn grouped_sum(ledger: &Ledger, sql: &str) -> Result<BTreeMap<Key, i64>, LedgerError> {
    let mut out = BTreeMap::new();
    for r in sqlx::query(sql).fetch_all(ledger.db().pool()).await? {
        out.insert((r.try_get(0)?, r.try_get(1)?), r.try_get(2)?);
    }
    Ok(out)
}
