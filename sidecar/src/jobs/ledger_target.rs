//! The ledger as the target of the background jobs, and the monthly reset shared by the
//! scheduler and `POST /admin/v1/resets`.
//!
//! A period counts as done once every active membership was reset for it; that fact is
//! recorded as an `admin_audit` row (`monthly_reset.completed`, target = the period), which
//! is also how the scheduler finds the last completed period after a restart.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{JobTarget, Period};
use crate::catalog::{audit, Actor};
use crate::ledger::{Ledger, LedgerError, MonthlyResetReport};

/// Audit action marking a period's reset as complete.
pub const RESET_COMPLETED: &str = "monthly_reset.completed";

/// Runs the reset of `period` (idempotent per membership) and, when no membership failed,
/// records the period as completed by `actor`.
pub async fn run_monthly_reset(
    ledger: &Ledger,
    period: Period,
    actor: &Actor,
) -> Result<MonthlyResetReport, LedgerError> {
    let report = ledger
        .monthly_reset(&period.to_string(), ledger.now())
        .await?;
    if report.failed.is_empty() {
        let db = ledger.db();
        let mut tx = db.begin_write().await?;
        audit::record(
            tx.conn(),
            db.dialect(),
            actor,
            RESET_COMPLETED,
            "period",
            Some(&period.to_string()),
            &report,
        )
        .await?;
        tx.commit().await?;
    }
    Ok(report)
}

/// The newest period recorded as completed.
pub async fn last_completed_period(ledger: &Ledger) -> Result<Option<Period>, LedgerError> {
    let db = ledger.db();
    let sql = db.sql("SELECT MAX(target_id) FROM admin_audit WHERE action = ?");
    let row = sqlx::query(&sql)
        .bind(RESET_COMPLETED)
        .fetch_one(db.pool())
        .await?;
    let last: Option<String> = row.try_get(0)?;
    Ok(last.and_then(|raw| raw.parse().ok()))
}

impl JobTarget for Ledger {
    async fn last_reset_period(&self) -> anyhow::Result<Option<Period>> {
        Ok(last_completed_period(self).await?)
    }

    async fn monthly_reset(&self, period: Period, _now: DateTime<Utc>) -> anyhow::Result<()> {
        let report = run_monthly_reset(self, period, &Actor("scheduler".into())).await?;
        if !report.failed.is_empty() {
            anyhow::bail!(
                "{} membership(s) failed: {:?}",
                report.failed.len(),
                report.failed
            );
        }
        tracing::info!(
            %period,
            memberships = report.memberships,
            reset = report.reset,
            already_done = report.already_done,
            lots_granted = report.lots_granted,
            units_expired = report.units_expired,
            "monthly reset report"
        );
        Ok(())
    }

    async fn expire_holds(&self, now: DateTime<Utc>) -> anyhow::Result<u64> {
        Ok(Ledger::expire_holds(self, now.timestamp_millis())
            .await?
            .expired)
    }

    async fn expire_lots(&self, now: DateTime<Utc>) -> anyhow::Result<u64> {
        Ok(Ledger::expire_lots(self, now.timestamp_millis())
            .await?
            .lots_expired)
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::jobs::run_due_resets;
    use crate::ledger::LedgerConfig;
    use crate::metrics::Metrics;
    use crate::storage::testing::each_backend;

    #[tokio::test]
    async fn completed_periods_are_remembered_across_restarts() {
        for test_db in each_backend().await {
            let config = LedgerConfig {
                timezone: chrono_tz::Asia::Shanghai,
                ..LedgerConfig::default()
            };
            let ledger = Ledger::new(test_db.db.clone(), config);
            assert_eq!(last_completed_period(&ledger).await.unwrap(), None);
            let metrics = Metrics::new();
            let now = Utc::now();
            let current = Period::containing(now, chrono_tz::Asia::Shanghai);
            let done = run_due_resets(&ledger, now, chrono_tz::Asia::Shanghai, &metrics).await;
            assert_eq!(done, vec![current], "{:?}", test_db.backend);
            // A restarted process reads the mark and has nothing to do.
            let restarted = Ledger::new(test_db.db.clone(), LedgerConfig::default());
            assert_eq!(
                last_completed_period(&restarted).await.unwrap(),
                Some(current)
            );
            assert!(
                run_due_resets(&restarted, now, chrono_tz::Asia::Shanghai, &metrics)
                    .await
                    .is_empty()
            );
            // Older marks never hide a newer one.
            run_monthly_reset(&ledger, current.previous(), &Actor("test".into()))
                .await
                .unwrap();
            assert_eq!(last_completed_period(&ledger).await.unwrap(), Some(current));
            test_db.cleanup().await;
        }
    }
}
