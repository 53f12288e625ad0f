//! Ledger tests, run against SQLite, PostgreSQL and MariaDB for real.

use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llm_meter_protocol::{
    AuthorizeRequest, Caller, Decision, DenyCode, Outcome, SettleRequest, SettleStatus, Usage,
    VoidRequest,
};
use rust_decimal::Decimal;
use sqlx::Row;

use super::*;
use crate::pricing::{create_price_version, NewPriceVersion, PriceItem, PriceUnit, PricingType};
use crate::storage::testing::{each_backend, TestDb};

pub(super) const T0: i64 = 1_750_000_000_000; // 2025-06-15T15:06:40Z

pub(super) struct Fixture {
    pub ledger: Ledger,
    pub clock: Arc<AtomicI64>,
}

impl Fixture {
    pub fn set_time(&self, ms: i64) {
        self.clock.store(ms, Ordering::SeqCst);
    }

    pub fn advance(&self, by: Duration) {
        self.clock
            .fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }
}

pub(super) fn config() -> LedgerConfig {
    LedgerConfig {
        hold_ttl: Duration::from_secs(60),
        default_max_output_tokens: 100,
        catalog_cache_ttl: Duration::ZERO,
        ..LedgerConfig::default()
    }
}

pub(super) async fn fixture(t: &TestDb) -> Fixture {
    fixture_with(t.db.clone(), config()).await
}

pub(super) async fn fixture_with(db: crate::storage::Db, config: LedgerConfig) -> Fixture {
    let clock = Arc::new(AtomicI64::new(T0));
    let c = clock.clone();
    let ledger = Ledger::with_clock(db, config, Arc::new(move || c.load(Ordering::SeqCst)));
    Fixture { ledger, clock }
}

pub(super) async fn exec(db: &crate::storage::Db, sql: &str) {
    sqlx::query(&db.sql(sql))
        .execute(db.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// openai/gpt (text, priced 0.002 + 0.006 per 1k from T0 - 1 day) and openai/img (image).
pub(super) async fn seed_catalog(db: &crate::storage::Db) {
    for (model, kind) in [
        ("gpt", "text"),
        ("img", "image"),
        ("free", "text"),
        ("off", "text"),
    ] {
        let status = if model == "off" {
            "disabled"
        } else {
            "enabled"
        };
        exec(
            db,
            &format!(
                "INSERT INTO models (provider_code, model_code, model_type, status, created_at, updated_at) \
                 VALUES ('openai', '{model}', '{kind}', '{status}', 0, 0)"
            ),
        )
        .await;
    }
    price(db, "gpt", T0 - 86_400_000, "0.002", "0.006").await;
    let image = NewPriceVersion {
        provider: "openai".into(),
        model: "img".into(),
        currency: "CNY".into(),
        min_charge: Decimal::ZERO,
        effective_from: T0 - 86_400_000,
        effective_to: None,
        items: vec![PriceItem {
            pricing_type: PricingType::Image,
            unit: PriceUnit::PerImage,
            unit_price: Decimal::from_str("0.14").unwrap(),
        }],
        remark: None,
        created_by: None,
    };
    create_price_version(db, &image).await.unwrap();
}

pub(super) async fn price(
    db: &crate::storage::Db,
    model: &str,
    from: i64,
    input: &str,
    output: &str,
) -> i64 {
    let version = NewPriceVersion {
        provider: "openai".into(),
        model: model.into(),
        currency: "CNY".into(),
        min_charge: Decimal::ZERO,
        effective_from: from,
        effective_to: None,
        items: vec![
            PriceItem {
                pricing_type: PricingType::InputToken,
                unit: PriceUnit::Per1kTokens,
                unit_price: Decimal::from_str(input).unwrap(),
            },
            PriceItem {
                pricing_type: PricingType::OutputToken,
                unit: PriceUnit::Per1kTokens,
                unit_price: Decimal::from_str(output).unwrap(),
            },
        ],
        remark: None,
        created_by: None,
    };
    create_price_version(db, &version).await.unwrap()
}

pub(super) fn grant_req(user: &str, amount: u64, source_id: &str) -> GrantRequest {
    GrantRequest {
        user_id: user.into(),
        quota_type: "text_token".into(),
        amount,
        source_type: "purchase".into(),
        source_id: source_id.into(),
        remark: None,
        effective_from: None,
        expires_at: None,
        priority: 0,
    }
}

pub(super) fn auth(id: &str, user: &str, input: u64, max_output: u64) -> AuthorizeRequest {
    AuthorizeRequest {
        request_id: id.into(),
        caller: Caller::UserId(user.into()),
        provider: "openai".into(),
        model: "gpt".into(),
        estimated_input_tokens: input,
        max_output_tokens: Some(max_output),
        requested_images: None,
        stream: false,
        lease: None,
    }
}

pub(super) fn settle_req(id: &str, user: &str, input: u64, output: u64) -> SettleRequest {
    SettleRequest {
        request_id: id.into(),
        caller: Caller::UserId(user.into()),
        provider: "openai".into(),
        model: "gpt".into(),
        outcome: Outcome::Completed,
        usage: Usage {
            input_tokens: input,
            output_tokens: output,
            ..Usage::default()
        },
        estimated: false,
        authorized: true,
        upstream_status: 200,
        ended_at_ms: None,
        lease_id: None,
        held: 0,
    }
}

pub(super) async fn assert_clean(ledger: &Ledger) {
    let report = ledger.reconcile().await.unwrap();
    assert!(report.is_clean(), "drift: {:#?}", report.drifts);
}

async fn remaining_of(ledger: &Ledger, user: &str) -> Vec<(String, u64)> {
    let balance = ledger.balance(user, "text_token").await.unwrap().unwrap();
    balance
        .lots
        .into_iter()
        .map(|l| (l.source_id, l.remaining))
        .collect()
}

#[tokio::test]
async fn lots_burn_by_priority_then_soonest_expiry_then_age() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        let day = 86_400_000;
        let mut late = grant_req("u", 100, "late");
        late.expires_at = Some(T0 + 30 * day);
        let mut soon = grant_req("u", 100, "soon");
        soon.expires_at = Some(T0 + 2 * day);
        let never_old = grant_req("u", 100, "never-old");
        let mut urgent = grant_req("u", 100, "low-priority-value");
        urgent.priority = -1;
        urgent.expires_at = Some(T0 + 60 * day);
        for g in [&never_old, &late, &soon, &urgent] {
            assert!(l.grant(g).await.unwrap().created);
            f.advance(Duration::from_millis(1));
        }
        // 150 units: all of the priority -1 lot, then 50 of the soonest-expiring.
        let r = l.authorize(&auth("r1", "u", 100, 50)).await.unwrap();
        assert_eq!(r.decision, Decision::Allow, "{:?}", t.backend);
        let s = l.settle(&settle_req("r1", "u", 100, 50)).await.unwrap();
        assert_eq!((s.charged, s.debt), (150, 0));
        assert_eq!(
            remaining_of(l, "u").await,
            vec![
                ("low-priority-value".to_string(), 0),
                ("soon".to_string(), 50),
                ("late".to_string(), 100),
                ("never-old".to_string(), 100),
            ]
        );
        // 200 more: the rest of `soon`, all of `late`, 50 of the never-expiring one.
        l.authorize(&auth("r2", "u", 100, 100)).await.unwrap();
        l.settle(&settle_req("r2", "u", 100, 100)).await.unwrap();
        let b = l.balance("u", "text_token").await.unwrap().unwrap();
        assert_eq!(
            (b.granted, b.used, b.remaining, b.available),
            (400, 350, 50, 50)
        );
        assert_eq!(b.lots.last().unwrap().remaining, 50);
        assert_clean(l).await;
        t.cleanup().await;
    }
}

/// A burn first reads only the first lots in burn order; one they cannot cover reads the
/// rest, still in burn order, and nothing is charged twice.
#[tokio::test]
async fn a_settlement_burning_more_lots_than_the_first_read_takes_them_in_order() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        let lots = 40;
        // Burn order by priority, the reverse of creation order.
        for i in 0..lots {
            let mut g = grant_req("u", 10, &format!("lot-{i:02}"));
            g.priority = (lots - i) as i32;
            assert!(l.grant(&g).await.unwrap().created);
        }
        let burned = 25; // lots emptied: more than the first read holds
        assert!(burned > super::accounts::BURN_READ_LIMIT);
        let units = burned as u64 * 10;
        let r = l
            .authorize(&auth("big", "u", units - 50, 50))
            .await
            .unwrap();
        assert_eq!(r.decision, Decision::Allow, "{:?}", t.backend);
        let s = l
            .settle(&settle_req("big", "u", units - 50, 50))
            .await
            .unwrap();
        assert_eq!((s.charged, s.debt), (units, 0), "{:?}", t.backend);
        let mut remaining = remaining_of(l, "u").await;
        remaining.sort();
        let expected: Vec<(String, u64)> = (0..lots)
            .map(|i| {
                let emptied = i >= lots - burned;
                (format!("lot-{i:02}"), if emptied { 0 } else { 10 })
            })
            .collect();
        assert_eq!(remaining, expected, "{:?}", t.backend);
        // A small one after it reads only the first lots again and takes the next in order.
        l.authorize(&auth("small", "u", 3, 2)).await.unwrap();
        l.settle(&settle_req("small", "u", 3, 2)).await.unwrap();
        let remaining = remaining_of(l, "u").await;
        let next = format!("lot-{:02}", lots - burned - 1);
        assert!(
            remaining.contains(&(next.clone(), 5)),
            "{next} takes the next 5: {remaining:?}"
        );
        assert_clean(l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn expired_lots_stop_counting_and_are_journaled() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        let mut g = grant_req("u", 1_000, "p1");
        g.expires_at = Some(T0 + 10_000);
        l.grant(&g).await.unwrap();
        l.grant(&grant_req("u", 50, "p2")).await.unwrap();
        assert_eq!(
            l.authorize(&auth("a", "u", 500, 100))
                .await
                .unwrap()
                .decision,
            Decision::Allow
        );
        l.void(&VoidRequest {
            request_id: "a".into(),
            reason: "test".into(),
            upstream_status: 500,
            lease_id: None,
            held: 0,
        })
        .await
        .unwrap();
        f.set_time(T0 + 10_000);
        // Without any job run, admission already sees the lot as expired.
        let denied = l.authorize(&auth("b", "u", 500, 100)).await.unwrap();
        assert_eq!(
            denied.denial.unwrap().code,
            DenyCode::QuotaExhausted,
            "{:?}",
            t.backend
        );
        let b = l.balance("u", "text_token").await.unwrap().unwrap();
        assert_eq!((b.remaining, b.granted), (50, 50));
        let sql = "SELECT lot_delta FROM ledger_journal WHERE kind = 'expire'";
        let rows = sqlx::query(sql).fetch_all(t.db.pool()).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].get::<i64, _>(0), -1_000);
        // The batch job finds nothing left to do.
        assert_eq!(l.expire_lots(T0 + 20_000).await.unwrap().lots_expired, 0);
        assert_clean(l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn expire_lots_job_expires_every_due_account() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        for user in ["a", "b"] {
            let mut g = grant_req(user, 10, &format!("{user}-1"));
            g.expires_at = Some(T0 + 5);
            l.grant(&g).await.unwrap();
        }
        let report = l.expire_lots(T0 + 5).await.unwrap();
        assert_eq!(
            (report.accounts, report.lots_expired, report.units_expired),
            (2, 2, 20)
        );
        assert_eq!(l.expire_lots(T0 + 6).await.unwrap().accounts, 0);
        assert_clean(l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn pending_lots_become_available_when_effective() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        let mut g = grant_req("u", 500, "future");
        g.effective_from = Some(T0 + 1_000);
        assert_eq!(l.grant(&g).await.unwrap().status, LotStatus::Pending);
        let denied = l.authorize(&auth("a", "u", 100, 100)).await.unwrap();
        assert_eq!(denied.denial.unwrap().code, DenyCode::QuotaExhausted);
        f.set_time(T0 + 1_000);
        assert_eq!(
            l.authorize(&auth("b", "u", 100, 100))
                .await
                .unwrap()
                .decision,
            Decision::Allow
        );
        assert_clean(l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn retries_are_idempotent_and_conflicting_retries_are_rejected() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        l.grant(&grant_req("u", 10_000, "p")).await.unwrap();

        let first = l.authorize(&auth("r", "u", 100, 100)).await.unwrap();
        let again = l.authorize(&auth("r", "u", 100, 100)).await.unwrap();
        assert_eq!(first, again, "{:?}", t.backend);
        assert_eq!(
            l.balance("u", "text_token").await.unwrap().unwrap().held,
            200
        );
        let other = l.authorize(&auth("r", "u", 100, 999)).await;
        assert!(matches!(other, Err(LedgerError::Conflict(_))), "{other:?}");

        let settled = l.settle(&settle_req("r", "u", 90, 80)).await.unwrap();
        assert_eq!(settled.status, SettleStatus::Settled);
        assert_eq!(settled.cost.as_deref(), Some("0.000660"));
        assert_eq!(settled.currency.as_deref(), Some("CNY"));
        let retry = l.settle(&settle_req("r", "u", 90, 80)).await.unwrap();
        assert_eq!(retry.status, SettleStatus::AlreadySettled);
        assert_eq!(
            (retry.charged, retry.cost.clone()),
            (170, settled.cost.clone())
        );
        let conflicting = l.settle(&settle_req("r", "u", 90, 81)).await;
        assert!(matches!(conflicting, Err(LedgerError::Conflict(_))));
        let void = VoidRequest {
            request_id: "r".into(),
            reason: "late".into(),
            upstream_status: 0,
            lease_id: None,
            held: 0,
        };
        assert!(matches!(l.void(&void).await, Err(LedgerError::Conflict(_))));

        l.authorize(&auth("v", "u", 10, 10)).await.unwrap();
        let void = VoidRequest {
            request_id: "v".into(),
            reason: "upstream 503".into(),
            upstream_status: 503,
            lease_id: None,
            held: 0,
        };
        assert_eq!(l.void(&void).await.unwrap().status, SettleStatus::Voided);
        assert_eq!(
            l.void(&void).await.unwrap().status,
            SettleStatus::AlreadyVoided
        );
        assert!(matches!(
            l.settle(&settle_req("v", "u", 1, 1)).await,
            Err(LedgerError::Conflict(_))
        ));
        let missing = VoidRequest {
            request_id: "nope".into(),
            reason: String::new(),
            upstream_status: 0,
            lease_id: None,
            held: 0,
        };
        assert_eq!(l.void(&missing).await.unwrap().status, SettleStatus::Voided);
        assert_eq!(
            l.void(&missing).await.unwrap().status,
            SettleStatus::AlreadyVoided
        );

        let b = l.balance("u", "text_token").await.unwrap().unwrap();
        assert_eq!((b.held, b.used, b.remaining), (0, 170, 9_830));
        let statuses: Vec<String> =
            sqlx::query("SELECT status FROM usage_records ORDER BY request_id")
                .fetch_all(t.db.pool())
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
        assert_eq!(statuses, ["settled", "voided"]);
        assert_clean(l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn a_payment_callback_delivered_twice_grants_once() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        let g = grant_req("u", 1_000, "order-42");
        let first = l.grant(&g).await.unwrap();
        let second = l.grant(&g).await.unwrap();
        assert!(first.created && !second.created, "{:?}", t.backend);
        assert_eq!(first.lot_id, second.lot_id);
        let mut different = g.clone();
        different.amount = 2_000;
        assert!(matches!(
            l.grant(&different).await,
            Err(LedgerError::Conflict(_))
        ));
        // Concurrent duplicate deliveries too.
        let g2 = grant_req("u", 7, "order-43");
        let results = futures_join_all((0..8).map(|_| l.grant(&g2))).await;
        let created = results
            .iter()
            .filter(|r| r.as_ref().unwrap().created)
            .count();
        assert_eq!(created, 1);
        assert_eq!(
            l.balance("u", "text_token")
                .await
                .unwrap()
                .unwrap()
                .remaining,
            1_007
        );
        let mut bad = g.clone();
        bad.quota_type = "nonexistent".into();
        bad.source_id = "x".into();
        assert!(matches!(l.grant(&bad).await, Err(LedgerError::Invalid(_))));
        assert_clean(l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn adjustments_add_or_remove_units_once() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        l.grant(&grant_req("u", 100, "p")).await.unwrap();
        l.authorize(&auth("r", "u", 20, 20)).await.unwrap();
        let remove = AdjustRequest {
            user_id: "u".into(),
            quota_type: "text_token".into(),
            delta: -50,
            adjustment_id: "ticket-1".into(),
            remark: Some("refund reversal".into()),
        };
        assert!(l.adjust(&remove).await.unwrap().created, "{:?}", t.backend);
        assert!(!l.adjust(&remove).await.unwrap().created);
        let changed = AdjustRequest {
            delta: -10,
            ..remove.clone()
        };
        assert!(matches!(
            l.adjust(&changed).await,
            Err(LedgerError::Conflict(_))
        ));
        // 100 - 50 removed = 50, of which 40 are held: only 10 can still be removed.
        let too_much = AdjustRequest {
            delta: -11,
            adjustment_id: "ticket-2".into(),
            ..remove.clone()
        };
        assert!(matches!(
            l.adjust(&too_much).await,
            Err(LedgerError::Invalid(_))
        ));
        let add = AdjustRequest {
            delta: 25,
            adjustment_id: "ticket-3".into(),
            ..remove.clone()
        };
        assert_eq!(l.adjust(&add).await.unwrap().applied, 25);
        let b = l.balance("u", "text_token").await.unwrap().unwrap();
        assert_eq!((b.remaining, b.held, b.available), (75, 40, 35));
        assert_clean(l).await;
        t.cleanup().await;
    }
}

/// Version 4 moved the deduplication of deductions from the journal (and the index on its
/// request ids) to `ledger_adjustments`: a deduction applied before it is still applied
/// once, and the migration runs again over itself (MySQL DDL is not transactional).
#[tokio::test]
async fn deductions_applied_before_version_4_stay_applied_once() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        l.grant(&grant_req("u", 100, "p")).await.unwrap();
        let remove = AdjustRequest {
            user_id: "u".into(),
            quota_type: "text_token".into(),
            delta: -30,
            adjustment_id: "old-ticket".into(),
            remark: None,
        };
        assert!(l.adjust(&remove).await.unwrap().created);
        // As a version 3 database holds it: no adjustments table, the index still there.
        exec(&t.db, "DROP TABLE ledger_adjustments").await;
        exec(
            &t.db,
            "CREATE INDEX ix_journal_request ON ledger_journal (request_id)",
        )
        .await;
        exec(&t.db, "DELETE FROM schema_migrations WHERE version = 4").await;
        assert_eq!(t.db.migrate().await.unwrap().applied, vec![4]);
        exec(&t.db, "DELETE FROM schema_migrations WHERE version = 4").await;
        assert_eq!(
            t.db.migrate().await.unwrap().applied,
            vec![4],
            "{:?}",
            t.backend
        );

        assert!(!l.adjust(&remove).await.unwrap().created, "{:?}", t.backend);
        let b = l.balance("u", "text_token").await.unwrap().unwrap();
        assert_eq!(b.remaining, 70, "{:?}", t.backend);
        let other_account = AdjustRequest {
            user_id: "v".into(),
            ..remove.clone()
        };
        l.grant(&grant_req("v", 100, "pv")).await.unwrap();
        assert!(matches!(
            l.adjust(&other_account).await,
            Err(LedgerError::Conflict(_))
        ));
        let index: i64 = sqlx::query(&t.db.sql(match t.backend {
            crate::storage::Dialect::Sqlite => {
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'ix_journal_request'"
            }
            crate::storage::Dialect::Postgres => {
                "SELECT COUNT(*) FROM pg_indexes WHERE schemaname = current_schema() \
                 AND indexname = 'ix_journal_request'"
            }
            crate::storage::Dialect::MySql => {
                "SELECT COUNT(*) FROM information_schema.statistics \
                 WHERE table_schema = DATABASE() AND index_name = 'ix_journal_request'"
            }
        }))
        .fetch_one(t.db.pool())
        .await
        .unwrap()
        .get(0);
        assert_eq!(index, 0, "{:?}", t.backend);
        assert_clean(l).await;
        t.cleanup().await;
    }
}

/// Runs futures concurrently on the current task (no extra dependency).
async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let handles: Vec<_> = futures.map(Box::pin).collect();
    let mut outputs = Vec::new();
    let mut pending: Vec<_> = handles.into_iter().map(Some).collect();
    let mut results: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all_done = true;
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(fut) = slot {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        results[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => all_done = false,
                }
            }
        }
        if all_done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    for r in results {
        outputs.extend(r);
    }
    outputs
}

#[tokio::test]
async fn overrun_becomes_debt_and_the_next_grant_pays_it_first() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        l.grant(&grant_req("u", 100, "p1")).await.unwrap();
        assert_eq!(l.authorize(&auth("r", "u", 20, 30)).await.unwrap().held, 50);
        // The upstream used far more than the hold.
        let s = l.settle(&settle_req("r", "u", 100, 50)).await.unwrap();
        assert_eq!((s.charged, s.debt), (100, 50), "{:?}", t.backend);
        let b = l.balance("u", "text_token").await.unwrap().unwrap();
        assert_eq!((b.remaining, b.debt, b.available), (0, 50, 0));
        let denied = l.authorize(&auth("r2", "u", 1, 1)).await.unwrap();
        assert_eq!(denied.denial.unwrap().code, DenyCode::QuotaExhausted);
        let repaid = l.grant(&grant_req("u", 80, "p2")).await.unwrap();
        assert_eq!(repaid.debt_repaid, 50);
        let b = l.balance("u", "text_token").await.unwrap().unwrap();
        assert_eq!((b.remaining, b.debt), (30, 0));
        let record =
            sqlx::query("SELECT charged, debt, units FROM usage_records WHERE request_id = 'r'")
                .fetch_one(t.db.pool())
                .await
                .unwrap();
        assert_eq!(
            (
                record.get::<i64, _>(0),
                record.get::<i64, _>(1),
                record.get::<i64, _>(2)
            ),
            (100, 50, 150)
        );
        assert_clean(l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn overrun_never_takes_units_reserved_by_other_calls() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        l.grant(&grant_req("u", 100, "p")).await.unwrap();
        l.authorize(&auth("a", "u", 30, 30)).await.unwrap();
        l.authorize(&auth("b", "u", 20, 20)).await.unwrap();
        // `a` used 80 but only 60 are not held by `b`: 60 charged, 20 debt.
        let s = l.settle(&settle_req("a", "u", 50, 30)).await.unwrap();
        assert_eq!((s.charged, s.debt), (60, 20), "{:?}", t.backend);
        let s = l.settle(&settle_req("b", "u", 20, 20)).await.unwrap();
        assert_eq!((s.charged, s.debt), (40, 0));
        assert_clean(l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn holds_expire_after_their_ttl_and_late_settlements_still_charge() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        l.grant(&grant_req("u", 1_000, "p")).await.unwrap();
        l.authorize(&auth("stale", "u", 100, 100)).await.unwrap();
        l.authorize(&auth("fresh", "u", 100, 100)).await.unwrap();
        f.advance(Duration::from_secs(30));
        l.authorize(&auth("newer", "u", 100, 100)).await.unwrap();
        f.advance(Duration::from_secs(31));
        let report = l.expire_holds(l.now()).await.unwrap();
        assert_eq!(
            (report.expired, report.units_released),
            (2, 400),
            "{:?}",
            t.backend
        );
        assert_eq!(
            l.balance("u", "text_token").await.unwrap().unwrap().held,
            200
        );
        let status: String =
            sqlx::query("SELECT status FROM usage_records WHERE request_id = 'stale'")
                .fetch_one(t.db.pool())
                .await
                .unwrap()
                .get(0);
        assert_eq!(status, "expired");
        // The call did run: its settlement arrives late and is charged, not dropped.
        let s = l.settle(&settle_req("stale", "u", 100, 100)).await.unwrap();
        assert_eq!((s.status, s.charged), (SettleStatus::Settled, 200));
        let voided = l
            .void(&VoidRequest {
                request_id: "fresh".into(),
                reason: "x".into(),
                upstream_status: 0,
                lease_id: None,
                held: 0,
            })
            .await
            .unwrap();
        assert_eq!(voided.status, SettleStatus::AlreadyVoided);
        assert_eq!(l.expire_holds(l.now()).await.unwrap().expired, 0);
        let b = l.balance("u", "text_token").await.unwrap().unwrap();
        assert_eq!((b.held, b.remaining), (200, 800));
        assert_clean(l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn unpriced_and_unknown_models_are_metered_but_not_billed() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        l.grant(&grant_req("u", 1_000, "p")).await.unwrap();
        for model in ["free", "not-in-catalog"] {
            let mut a = auth(model, "u", 10, 10);
            a.model = model.into();
            let r = l.authorize(&a).await.unwrap();
            assert_eq!(
                (r.decision, r.priced),
                (Decision::Allow, false),
                "{:?}",
                t.backend
            );
            assert_eq!(r.quota_type.as_deref(), Some("text_token"));
            let mut s = settle_req(model, "u", 10, 5);
            s.model = model.into();
            let settled = l.settle(&s).await.unwrap();
            assert_eq!((settled.charged, settled.cost.clone()), (15, None));
        }
        let row = sqlx::query(
            "SELECT COUNT(*) FROM usage_records WHERE unpriced = 1 AND cost_micros IS NULL",
        )
        .fetch_one(t.db.pool())
        .await
        .unwrap();
        assert_eq!(row.get::<i64, _>(0), 2);
        let disabled = l
            .authorize(&AuthorizeRequest {
                model: "off".into(),
                ..auth("d", "u", 1, 1)
            })
            .await
            .unwrap();
        assert_eq!(disabled.denial.unwrap().code, DenyCode::ModelDisabled);

        let strict = fixture_with(
            t.db.clone(),
            LedgerConfig {
                unpriced_policy: UnpricedPolicy::Deny,
                ..config()
            },
        )
        .await;
        let mut a = auth("strict", "u", 10, 10);
        a.model = "free".into();
        let denied = strict.ledger.authorize(&a).await.unwrap();
        assert_eq!(denied.denial.unwrap().code, DenyCode::ModelUnpriced);
        assert_eq!(DenyCode::ModelUnpriced.http_status(), 403);
        assert_clean(l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn the_price_in_force_at_authorization_is_the_one_settled() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        let raise_at = T0 + 60_000;
        price(&t.db, "gpt", raise_at, "0.02", "0.06").await;
        l.grant(&grant_req("u", 100_000, "p")).await.unwrap();
        l.authorize(&auth("before", "u", 1_000, 1_000))
            .await
            .unwrap();
        f.set_time(raise_at + 1);
        l.authorize(&auth("after", "u", 1_000, 1_000))
            .await
            .unwrap();
        let old = l
            .settle(&settle_req("before", "u", 1_000, 1_000))
            .await
            .unwrap();
        let new = l
            .settle(&settle_req("after", "u", 1_000, 1_000))
            .await
            .unwrap();
        assert_eq!(old.cost.as_deref(), Some("0.008000"), "{:?}", t.backend);
        assert_eq!(new.cost.as_deref(), Some("0.080000"));
        let sum = t.db.dialect().sum_i64("cost_micros");
        let total: i64 = sqlx::query(&format!("SELECT {sum} FROM daily_costs"))
            .fetch_one(t.db.pool())
            .await
            .unwrap()
            .get(0);
        assert_eq!(total, 88_000);
        t.cleanup().await;
    }
}

#[tokio::test]
async fn daily_costs_follow_usage_records_in_the_same_transaction() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        l.grant(&grant_req("u", 100_000, "p")).await.unwrap();
        for i in 0..3 {
            let id = format!("r{i}");
            l.authorize(&auth(&id, "u", 100, 100)).await.unwrap();
            l.settle(&settle_req(&id, "u", 100, 50)).await.unwrap();
        }
        let row = sqlx::query(
            "SELECT day, requests, input_tokens, output_tokens, units, cost_micros, currency FROM daily_costs",
        )
        .fetch_one(t.db.pool())
        .await
        .unwrap();
        // T0 is 2025-06-15 23:06 in Shanghai.
        assert_eq!(row.get::<String, _>(0), "2025-06-15", "{:?}", t.backend);
        assert_eq!(row.get::<i64, _>(1), 3);
        assert_eq!(
            (
                row.get::<i64, _>(2),
                row.get::<i64, _>(3),
                row.get::<i64, _>(4)
            ),
            (300, 150, 450)
        );
        assert_eq!(row.get::<i64, _>(5), 3 * 500);
        assert_eq!(row.get::<String, _>(6), "CNY");
        t.cleanup().await;
    }
}

#[tokio::test]
async fn fail_open_settlements_charge_directly_and_may_create_debt() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        l.grant(&grant_req("u", 100, "p")).await.unwrap();
        let mut s = settle_req("fo", "u", 80, 40);
        s.authorized = false;
        let first = l.settle(&s).await.unwrap();
        assert_eq!(
            (first.status, first.charged, first.debt),
            (SettleStatus::Settled, 100, 20),
            "{:?}",
            t.backend
        );
        assert_eq!(
            l.settle(&s).await.unwrap().status,
            SettleStatus::AlreadySettled
        );
        // A user never granted anything still owes what was used.
        let mut s = settle_req("fo2", "stranger", 5, 5);
        s.authorized = false;
        assert_eq!(l.settle(&s).await.unwrap().debt, 10);
        let flags: i64 = sqlx::query("SELECT COUNT(*) FROM usage_records WHERE fail_open = 1")
            .fetch_one(t.db.pool())
            .await
            .unwrap()
            .get(0);
        assert_eq!(flags, 2);
        assert_clean(l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn admission_denies_with_the_right_codes_and_sizes_holds_per_quota_type() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        let r = l.authorize(&auth("x", "nobody", 1, 1)).await.unwrap();
        assert_eq!(r.denial.unwrap().code, DenyCode::NoQuota, "{:?}", t.backend);
        l.grant(&grant_req("u", 150, "p")).await.unwrap();
        // Positive balance, smaller than the hold: denied, nothing held.
        let r = l.authorize(&auth("big", "u", 100, 100)).await.unwrap();
        assert_eq!((r.decision, r.held), (Decision::Deny, 0));
        assert_eq!(r.denial.unwrap().code, DenyCode::QuotaExhausted);
        // A denied request leaves nothing behind: its retry is evaluated afresh.
        l.grant(&grant_req("u", 100, "p2")).await.unwrap();
        assert_eq!(
            l.authorize(&auth("big", "u", 100, 100)).await.unwrap().held,
            200
        );
        // No output cap in the request: the configured default (100) is held.
        let mut a = auth("nocap", "u", 10, 0);
        a.max_output_tokens = None;
        assert_eq!(
            l.authorize(&a).await.unwrap().denial.unwrap().code,
            DenyCode::QuotaExhausted
        );
        l.grant(&grant_req("u", 110, "p3")).await.unwrap();
        assert_eq!(l.authorize(&a).await.unwrap().held, 110);
        // Images: requested count, default 1.
        let mut g = grant_req("u", 3, "img");
        g.quota_type = "image".into();
        l.grant(&g).await.unwrap();
        let mut img = auth("i1", "u", 0, 0);
        img.model = "img".into();
        img.max_output_tokens = None;
        let r = l.authorize(&img).await.unwrap();
        assert_eq!(
            (r.quota_type.as_deref(), r.held, r.priced),
            (Some("image"), 1, true)
        );
        img.request_id = "i2".into();
        img.requested_images = Some(2);
        assert_eq!(l.authorize(&img).await.unwrap().held, 2);
        let mut s = settle_req("i2", "u", 0, 0);
        s.model = "img".into();
        s.usage.images = 2;
        let settled = l.settle(&s).await.unwrap();
        assert_eq!(
            (settled.charged, settled.cost.as_deref()),
            (2, Some("0.280000"))
        );
        let mut absurd = auth("absurd", "u", 1, u64::MAX);
        absurd.max_output_tokens = Some(u64::MAX);
        assert_eq!(
            l.authorize(&absurd).await.unwrap().denial.unwrap().code,
            DenyCode::InvalidRequest
        );
        assert_clean(l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn api_keys_resolve_to_their_user_until_revoked() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        l.grant(&grant_req("alice", 1_000, "p")).await.unwrap();
        exec(
            &t.db,
            &format!(
                "INSERT INTO api_keys (key_hash, key_prefix, user_id, status, created_at) \
                 VALUES ('{}', 'sk-live', 'alice', 'active', 0)",
                hash_api_key("sk-live-123")
            ),
        )
        .await;
        assert_eq!(
            l.resolve_api_key("sk-live-123").await.unwrap().as_deref(),
            Some("alice")
        );
        assert_eq!(l.resolve_api_key("sk-other").await.unwrap(), None);
        let mut a = auth("k1", "", 10, 10);
        a.caller = Caller::ApiKey("sk-live-123".into());
        let r = l.authorize(&a).await.unwrap();
        assert_eq!(
            (r.decision, r.user_id.as_deref()),
            (Decision::Allow, Some("alice")),
            "{:?}",
            t.backend
        );
        exec(&t.db, "UPDATE api_keys SET status = 'revoked'").await;
        a.request_id = "k2".into();
        let r = l.authorize(&a).await.unwrap();
        assert_eq!(r.denial.unwrap().code, DenyCode::InvalidApiKey);
        t.cleanup().await;
    }
}

#[tokio::test]
async fn consume_is_authorize_and_settle_in_one() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        l.grant(&grant_req("u", 100, "p")).await.unwrap();
        let req = ConsumeRequest {
            request_id: "c1".into(),
            user_id: "u".into(),
            provider: "openai".into(),
            model: "gpt".into(),
            usage: Usage {
                input_tokens: 40,
                output_tokens: 20,
                ..Usage::default()
            },
            estimated: false,
        };
        let r = l.consume(&req).await.unwrap();
        assert_eq!(
            r.settlement.as_ref().unwrap().charged,
            60,
            "{:?}",
            t.backend
        );
        let again = l.consume(&req).await.unwrap();
        assert_eq!(
            again.settlement.unwrap().status,
            SettleStatus::AlreadySettled
        );
        let too_much = ConsumeRequest {
            request_id: "c2".into(),
            ..req.clone()
        };
        let denied = l.consume(&too_much).await.unwrap();
        assert!(denied.settlement.is_none());
        assert_eq!(
            denied.authorization.denial.unwrap().code,
            DenyCode::QuotaExhausted
        );
        assert_clean(l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn monthly_reset_runs_once_per_membership_and_period() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        exec(&t.db, "INSERT INTO subscription_plans (code, name, currency, period, status, created_at, updated_at) VALUES ('pro', 'Pro', 'CNY', 'month', 'active', 0, 0)").await;
        let plan_id: i64 = sqlx::query("SELECT id FROM subscription_plans WHERE code = 'pro'")
            .fetch_one(t.db.pool())
            .await
            .unwrap()
            .get(0);
        exec(&t.db, &format!("INSERT INTO plan_quotas (plan_id, quota_type, amount, priority) VALUES ({plan_id}, 'text_token', 1000, 0), ({plan_id}, 'image', 5, 0)")).await;
        exec(&t.db, &format!("INSERT INTO memberships (user_id, plan_id, status, starts_at, ends_at, created_at, updated_at) VALUES ('m', {plan_id}, 'active', {}, NULL, 0, 0), ('gone', {plan_id}, 'cancelled', 0, NULL, 0, 0)", T0 - 86_400_000)).await;

        // June (T0 is mid-June): grant June's quota, use some.
        let june = l.monthly_reset("2025-06", T0).await.unwrap();
        assert_eq!(
            (june.memberships, june.reset, june.lots_granted),
            (1, 1, 2),
            "{:?}",
            t.backend
        );
        l.authorize(&auth("r", "m", 100, 100)).await.unwrap();
        l.settle(&settle_req("r", "m", 100, 100)).await.unwrap();
        let again = l.monthly_reset("2025-06", T0).await.unwrap();
        assert_eq!(
            (again.reset, again.already_done, again.lots_granted),
            (0, 1, 0)
        );

        // July 1st 00:00 Shanghai = June 30th 16:00 UTC.
        let (july_start, _) = super::reset::period_bounds("2025-07", config().timezone).unwrap();
        assert_eq!(july_start, 1_751_299_200_000);
        f.set_time(july_start);
        let july = l.monthly_reset("2025-07", july_start).await.unwrap();
        assert_eq!((july.reset, july.units_expired), (1, 800 + 5));
        let (twice_a, twice_b) = tokio::join!(
            l.monthly_reset("2025-07", july_start),
            l.monthly_reset("2025-07", july_start)
        );
        assert_eq!(twice_a.unwrap().reset + twice_b.unwrap().reset, 0);
        let b = l.balance("m", "text_token").await.unwrap().unwrap();
        assert_eq!((b.remaining, b.granted, b.lots.len()), (1_000, 1_000, 1));
        assert_eq!(b.lots[0].source_id.split(':').nth(1), Some("2025-07"));
        let resets: i64 = sqlx::query("SELECT COUNT(*) FROM ledger_journal WHERE kind = 'reset'")
            .fetch_one(t.db.pool())
            .await
            .unwrap()
            .get(0);
        assert_eq!(resets, 2);
        assert!(l.monthly_reset("2025-13", T0).await.is_err());
        let gone: i64 = sqlx::query("SELECT id FROM memberships WHERE user_id = 'gone'")
            .fetch_one(t.db.pool())
            .await
            .unwrap()
            .get(0);
        let refused = l.reset_membership(gone, "2025-07", july_start).await;
        assert!(
            matches!(refused, Err(LedgerError::Conflict(_))),
            "{refused:?}"
        );
        assert_clean(l).await;
        t.cleanup().await;
    }
}

/// Few connections per "process", so parallel tests stay under the servers' limits.
pub(super) fn small_pool() -> crate::storage::DbOptions {
    crate::storage::DbOptions {
        max_connections: 6,
        ..Default::default()
    }
}

/// Several "sidecar processes" (pools) hammer one user's small balance with authorize,
/// settle (some overrunning into debt), void, abandoned holds, top-up grants that repay
/// debt and hold expiry, all at once. Every unit stays accounted for and the ledger
/// reconciles afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_admission_never_exceeds_the_balance() {
    const BALANCE: u64 = 1_000;
    const TOP_UPS: u64 = 10;
    const TOP_UP: u64 = 20;
    const PROCESSES: usize = 3;
    const REQUESTS_PER_PROCESS: usize = 80;
    for t in each_backend().await {
        seed_catalog(&t.db).await;
        let mut ledgers = Vec::new();
        for p in 0..PROCESSES {
            let db = if p == 0 {
                t.db.clone()
            } else {
                t.another_process_with(small_pool()).await
            };
            ledgers.push(Ledger::new(db, config()));
        }
        let admin = ledgers[0].clone();
        admin
            .grant(&grant_req("hot", BALANCE, "seed"))
            .await
            .unwrap();

        let mut tasks = Vec::new();
        for (p, ledger) in ledgers.iter().enumerate() {
            for i in 0..REQUESTS_PER_PROCESS {
                let ledger = ledger.clone();
                tasks.push(tokio::spawn(async move {
                    let id = format!("p{p}-r{i}");
                    // Holds of 10..=39 units.
                    let hold = 10 + ((p * 31 + i * 7) % 30) as u64;
                    let r = ledger
                        .authorize(&auth(&id, "hot", hold / 2, hold - hold / 2))
                        .await?;
                    if r.decision == Decision::Deny {
                        return Ok::<_, LedgerError>((0, 0, 0));
                    }
                    let settle = |input, output| settle_req(&id, "hot", input, output);
                    let outcome = match i % 8 {
                        0 | 4 => {
                            let void = VoidRequest {
                                request_id: id.clone(),
                                reason: "x".into(),
                                upstream_status: 500,
                                lease_id: None,
                                held: 0,
                            };
                            ledger.void(&void).await?;
                            (r.held, 0, 0)
                        }
                        // Abandoned: left for hold expiry.
                        1 => (r.held, 0, 0),
                        // Overrun: twice the hold was used upstream.
                        7 => {
                            let s = ledger.settle(&settle(hold, hold)).await?;
                            (r.held, s.charged, s.debt)
                        }
                        _ => {
                            let s = ledger.settle(&settle(hold / 2, 1)).await?;
                            (r.held, s.charged, s.debt)
                        }
                    };
                    Ok(outcome)
                }));
            }
        }
        let top_ups = {
            let ledgers = ledgers.clone();
            tokio::spawn(async move {
                let mut repaid = 0;
                for k in 0..TOP_UPS {
                    let ledger = &ledgers[k as usize % PROCESSES];
                    let g = grant_req("hot", TOP_UP, &format!("top-up-{k}"));
                    repaid += ledger.grant(&g).await?.debt_repaid;
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
                Ok::<_, LedgerError>(repaid)
            })
        };
        let expirer = {
            let ledger = ledgers[1].clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    // Far in the future: every hold open at that moment expires.
                    ledger.expire_holds(ledger.now() + 3_600_000).await?;
                    tokio::time::sleep(Duration::from_millis(7)).await;
                }
                Ok::<_, LedgerError>(())
            })
        };
        let (mut charged, mut debt, mut admitted) = (0u64, 0u64, 0);
        for task in tasks {
            let (held, c, d) = task
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("{:?}: {e}", t.backend));
            charged += c;
            debt += d;
            admitted += usize::from(held > 0);
        }
        let repaid = top_ups.await.unwrap().unwrap();
        expirer.await.unwrap().unwrap();
        let granted = BALANCE + TOP_UPS * TOP_UP;
        assert!(
            admitted > 0 && admitted < PROCESSES * REQUESTS_PER_PROCESS,
            "{admitted}"
        );
        assert_clean(&admin).await;

        admin.expire_holds(admin.now() + 3_600_000).await.unwrap();
        let b = admin.balance("hot", "text_token").await.unwrap().unwrap();
        let backend = t.backend;
        assert_eq!(b.held, 0, "{backend:?}");
        // Every granted unit is either left, charged to a call, or repaid debt.
        assert_eq!(b.remaining + charged + repaid, granted, "{backend:?}");
        assert_eq!(b.debt, debt - repaid, "{backend:?}");
        assert_clean(&admin).await;
        for l in &ledgers[1..] {
            l.db().close().await;
        }
        t.cleanup().await;
    }
}

/// A burst of simultaneous holds, each exactly a slice of the balance: exactly
/// balance / slice succeed, whatever the interleaving across processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simultaneous_holds_admit_exactly_what_fits() {
    for t in each_backend().await {
        seed_catalog(&t.db).await;
        let mut ledgers = Vec::new();
        for p in 0..3 {
            let db = if p == 0 {
                t.db.clone()
            } else {
                t.another_process_with(small_pool()).await
            };
            ledgers.push(Ledger::new(db, config()));
        }
        ledgers[0]
            .grant(&grant_req("hot", 500, "seed"))
            .await
            .unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(150));
        let mut tasks = Vec::new();
        for i in 0..150 {
            let ledger = ledgers[i % 3].clone();
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                ledger.authorize(&auth(&format!("b{i}"), "hot", 5, 5)).await
            }));
        }
        let mut allowed = 0;
        for task in tasks {
            let r = task
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("{:?}: {e}", t.backend));
            allowed += usize::from(r.decision == Decision::Allow);
        }
        assert_eq!(allowed, 50, "{:?}", t.backend);
        let b = ledgers[0]
            .balance("hot", "text_token")
            .await
            .unwrap()
            .unwrap();
        assert_eq!((b.held, b.available), (500, 0));
        assert_clean(&ledgers[0]).await;
        for l in &ledgers[1..] {
            l.db().close().await;
        }
        t.cleanup().await;
    }
}

/// Throughput of authorize + settle pairs (run with `--ignored --nocapture`, in release
/// mode). `BENCH_CONCURRENCY` (default 16) tasks, each on its own user unless
/// `BENCH_SHARED_USER=1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn throughput_of_authorize_settle_pairs() {
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let concurrency = env("BENCH_CONCURRENCY", 16);
    let pairs_per_task = env("BENCH_PAIRS", 3200) / concurrency;
    let shared = env("BENCH_SHARED_USER", 0) == 1;
    for t in each_backend().await {
        seed_catalog(&t.db).await;
        let ledger = Ledger::new(t.db.clone(), LedgerConfig::default());
        for u in 0..concurrency {
            let grant = grant_req(&format!("user{u}"), 1_000_000_000, &format!("seed{u}"));
            ledger.grant(&grant).await.unwrap();
        }
        let started = std::time::Instant::now();
        let (mut authorize_time, mut settle_time) = (Duration::ZERO, Duration::ZERO);
        let mut tasks = Vec::new();
        for task in 0..concurrency {
            let ledger = ledger.clone();
            tasks.push(tokio::spawn(async move {
                let user = if shared {
                    "user0".to_string()
                } else {
                    format!("user{task}")
                };
                let (mut a, mut s) = (Duration::ZERO, Duration::ZERO);
                for i in 0..pairs_per_task {
                    let id = format!("t{task}-{i}");
                    let t0 = std::time::Instant::now();
                    let r = ledger.authorize(&auth(&id, &user, 100, 100)).await.unwrap();
                    assert_eq!(r.decision, Decision::Allow);
                    let t1 = std::time::Instant::now();
                    ledger
                        .settle(&settle_req(&id, &user, 100, 50))
                        .await
                        .unwrap();
                    a += t1 - t0;
                    s += t1.elapsed();
                }
                (a, s)
            }));
        }
        for task in tasks {
            let (a, s) = task.await.unwrap();
            authorize_time += a;
            settle_time += s;
        }
        let elapsed = started.elapsed();
        let pairs = (concurrency * pairs_per_task) as f64;
        println!(
            "{:?}: {:.0} pairs/s ({pairs} pairs in {elapsed:?}; mean authorize {:?}, settle {:?})",
            t.backend,
            pairs / elapsed.as_secs_f64(),
            authorize_time / pairs as u32,
            settle_time / pairs as u32,
        );
        assert_clean(&ledger).await;
        t.cleanup().await;
    }
}

/// One group (one transaction) holding a new authorization, its retry, a retry with other
/// figures, a denial, a void of an unknown request and a settlement of another call: each
/// gets its own answer, the failing ones fail alone, and the rest commits.
#[tokio::test]
async fn group_commit_answers_each_operation_and_replays_retries_within_the_group() {
    for t in each_backend().await {
        seed_catalog(&t.db).await;
        let f = fixture(&t).await;
        let l = &f.ledger;
        l.grant(&grant_req("gina", 1_000, "g1")).await.unwrap();
        l.authorize(&auth("earlier", "gina", 10, 10)).await.unwrap();
        let reserve = |req: AuthorizeRequest| async move {
            let admission = l.admit(&req, None).await.unwrap().unwrap();
            group::Op::Reserve { req, admission }
        };
        let ops = vec![
            reserve(auth("g-1", "gina", 100, 100)).await,
            reserve(auth("g-1", "gina", 100, 100)).await,
            reserve(auth("g-1", "gina", 100, 300)).await,
            reserve(auth("g-2", "gina", 400, 400)).await,
            group::Op::Void(VoidRequest {
                request_id: "nobody".into(),
                reason: "x".into(),
                upstream_status: 500,
                lease_id: None,
                held: 0,
            }),
            group::Op::Settle(settle_req("earlier", "gina", 5, 5)),
        ];
        let results = l.submit(ops).await;
        let backend = t.backend;
        let allowed = |r: &Result<group::Done, LedgerError>| match r {
            Ok(group::Done::Authorized(a)) => Some((a.decision, a.held)),
            _ => None,
        };
        assert_eq!(
            allowed(&results[0]),
            Some((Decision::Allow, 200)),
            "{backend:?}"
        );
        assert_eq!(
            allowed(&results[1]),
            Some((Decision::Allow, 200)),
            "{backend:?}"
        );
        assert!(
            matches!(&results[2], Err(LedgerError::Conflict(_))),
            "{backend:?}"
        );
        // 1000 - 200 (g-1) - 20 (earlier, held until settled) leaves 780 < 800.
        assert_eq!(
            allowed(&results[3]),
            Some((Decision::Deny, 0)),
            "{backend:?}"
        );
        assert!(
            matches!(&results[4], Ok(group::Done::Voided(Some(v))) if v.status == SettleStatus::Voided),
            "{backend:?}"
        );
        assert!(
            matches!(&results[5], Ok(group::Done::Settled(s)) if s.charged == 10),
            "{backend:?}"
        );
        let b = l.balance("gina", "text_token").await.unwrap().unwrap();
        assert_eq!((b.remaining, b.held), (990, 200), "{backend:?}");
        // The retry after the group committed is answered the same way.
        let again = l.authorize(&auth("g-1", "gina", 100, 100)).await.unwrap();
        assert_eq!((again.decision, again.held), (Decision::Allow, 200));
        assert_clean(l).await;
        t.cleanup().await;
    }
}

/// A finalize batch is applied together, and each item is answered as settle/void would.
#[tokio::test]
async fn finalize_batches_answer_each_item_like_single_calls() {
    use llm_meter_protocol::Finalize;
    for t in each_backend().await {
        seed_catalog(&t.db).await;
        let f = fixture(&t).await;
        let l = &f.ledger;
        l.grant(&grant_req("fin", 10_000, "g1")).await.unwrap();
        for id in ["f-1", "f-2", "f-3"] {
            l.authorize(&auth(id, "fin", 100, 100)).await.unwrap();
        }
        let void = |id: &str| {
            Finalize::Void(VoidRequest {
                request_id: id.into(),
                reason: "upstream 500".into(),
                upstream_status: 500,
                lease_id: None,
                held: 0,
            })
        };
        let items = vec![
            Finalize::Settle(settle_req("f-1", "fin", 100, 20)),
            Finalize::Settle(settle_req("f-1", "fin", 100, 20)),
            Finalize::Settle(settle_req("f-1", "fin", 100, 21)),
            void("f-2"),
            void("f-2"),
            void("f-1"),
            void("unknown"),
            Finalize::Settle(settle_req("", "fin", 1, 1)),
            Finalize::Settle(settle_req("f-3", "fin", 10, 10)),
        ];
        let results = l.finalize(&items).await;
        let backend = t.backend;
        let status = |i: usize| results[i].as_ref().map(|r| r.status).ok();
        assert_eq!(status(0), Some(SettleStatus::Settled), "{backend:?}");
        assert_eq!(status(1), Some(SettleStatus::AlreadySettled), "{backend:?}");
        assert!(
            matches!(results[2], Err(LedgerError::Conflict(_))),
            "{backend:?}"
        );
        assert_eq!(status(3), Some(SettleStatus::Voided), "{backend:?}");
        assert_eq!(status(4), Some(SettleStatus::AlreadyVoided), "{backend:?}");
        assert!(
            matches!(results[5], Err(LedgerError::Conflict(_))),
            "{backend:?}"
        );
        // Void before authorize: success, nothing released.
        assert_eq!(status(6), Some(SettleStatus::Voided), "{backend:?}");
        assert!(
            matches!(results[7], Err(LedgerError::Invalid(_))),
            "{backend:?}"
        );
        assert_eq!(status(8), Some(SettleStatus::Settled), "{backend:?}");
        let b = l.balance("fin", "text_token").await.unwrap().unwrap();
        assert_eq!((b.remaining, b.held), (10_000 - 120 - 20, 0), "{backend:?}");
        assert_clean(l).await;
        t.cleanup().await;
    }
}

/// Two settlement batches arriving together (two batches in flight from one Envoy worker,
/// or two workers) name the same users in opposite orders. Applied at once they lock those
/// users' rows in opposite orders: here MariaDB then retries (80 retries in one run without
/// `Ledger::finalize`'s one-batch-at-a-time rule; PostgreSQL's deadlocks showed under the
/// proxy bench, not at this size). One batch at a time, nothing is retried and every call
/// settles once.
#[tokio::test]
async fn concurrent_settlement_batches_settle_without_retries() {
    for t in each_backend().await {
        seed_catalog(&t.db).await;
        let f = fixture(&t).await;
        let l = &f.ledger;
        let users: Vec<String> = (0..40).map(|i| format!("cb-{i:02}")).collect();
        let mut forward = Vec::new();
        let mut backward = Vec::new();
        for (i, user) in users.iter().enumerate() {
            l.grant(&grant_req(user, 10_000, &format!("g-{user}")))
                .await
                .unwrap();
            for (batch, id) in [
                (&mut forward, format!("f-{i}")),
                (&mut backward, format!("b-{i}")),
            ] {
                l.authorize(&auth(&id, user, 10, 10)).await.unwrap();
                batch.push(llm_meter_protocol::Finalize::Settle(settle_req(
                    &id, user, 10, 10,
                )));
            }
        }
        backward.reverse();
        let before = l.transient_retries();
        let (a, b) = tokio::join!(l.finalize(&forward), l.finalize(&backward));
        let backend = t.backend;
        for result in a.iter().chain(&b) {
            let status = result.as_ref().map(|r| r.status).ok();
            assert_eq!(
                status,
                Some(SettleStatus::Settled),
                "{backend:?}: {result:?}"
            );
        }
        assert_eq!(l.transient_retries() - before, 0, "{backend:?}");
        for user in &users {
            let balance = l.balance(user, "text_token").await.unwrap().unwrap();
            assert_eq!(
                (balance.remaining, balance.held),
                (10_000 - 40, 0),
                "{backend:?}"
            );
        }
        assert_clean(l).await;
        t.cleanup().await;
    }
}

/// Fail-open: the settlement reaches the ledger before its late authorize. The authorize
/// holds nothing, and hold expiry goes on past a hold that cannot be expired.
#[tokio::test]
async fn an_authorize_after_its_settlement_holds_nothing_and_expiry_survives_bad_rows() {
    for t in each_backend().await {
        seed_catalog(&t.db).await;
        let f = fixture(&t).await;
        let l = &f.ledger;
        let backend = t.backend;
        l.grant(&grant_req("late", 1_000, "g1")).await.unwrap();
        let mut settle = settle_req("fo-1", "late", 30, 20);
        settle.authorized = false;
        assert_eq!(
            l.settle(&settle).await.unwrap().status,
            SettleStatus::Settled
        );
        let a = l.authorize(&auth("fo-1", "late", 30, 20)).await.unwrap();
        assert_eq!((a.decision, a.held), (Decision::Allow, 0), "{backend:?}");
        let again = l.authorize(&auth("fo-1", "late", 30, 20)).await.unwrap();
        assert_eq!((again.decision, again.held), (Decision::Allow, 0));
        let mut other = auth("fo-1", "late", 30, 20);
        other.caller = Caller::UserId("someone-else".into());
        assert!(
            matches!(l.authorize(&other).await, Err(LedgerError::Conflict(_))),
            "{backend:?}"
        );
        let b = l.balance("late", "text_token").await.unwrap().unwrap();
        assert_eq!((b.held, b.used), (0, 50), "{backend:?}");

        // A hold that cannot be expired (no account: a broken row) comes first, then a
        // good one: the sweep reports the first and still expires the second.
        exec(
            &t.db,
            "INSERT INTO ledger_holds (request_id, user_id, quota_type, provider, model, amount, \
             price_version_id, priced, status, created_at, expires_at, finalized_at) \
             VALUES ('broken', 'ghost', 'text_token', 'openai', 'gpt', 5, NULL, 0, 'held', 0, 1, NULL)",
        )
        .await;
        l.authorize(&auth("ok-1", "late", 10, 10)).await.unwrap();
        let report = l.expire_holds(l.now() + 3_600_000).await.unwrap();
        assert_eq!(
            (report.expired, report.failed, report.units_released),
            (1, 1, 20),
            "{backend:?}"
        );
        exec(
            &t.db,
            "DELETE FROM ledger_holds WHERE request_id = 'broken'",
        )
        .await;
        let b = l.balance("late", "text_token").await.unwrap().unwrap();
        assert_eq!((b.held, b.used), (0, 50), "{backend:?}");
        assert_clean(l).await;
        t.cleanup().await;
    }
}

/// The filter voids a call whose client left while its authorization was pending; that
/// authorization may reach the ledger later. The void succeeds (journaled), the late
/// authorize is denied and holds nothing, and a settlement of it is refused.
#[tokio::test]
async fn a_void_before_authorize_succeeds_and_blocks_a_later_hold() {
    for t in each_backend().await {
        seed_catalog(&t.db).await;
        let f = fixture(&t).await;
        let l = &f.ledger;
        let backend = t.backend;
        l.grant(&grant_req("gone", 1_000, "g1")).await.unwrap();
        let void = VoidRequest {
            request_id: "vb-1".into(),
            reason: "client disconnected".into(),
            upstream_status: 0,
            lease_id: None,
            held: 0,
        };
        assert_eq!(l.void(&void).await.unwrap().status, SettleStatus::Voided);
        assert_eq!(
            l.void(&void).await.unwrap().status,
            SettleStatus::AlreadyVoided
        );
        let a = l.authorize(&auth("vb-1", "gone", 10, 10)).await.unwrap();
        assert_eq!((a.decision, a.held), (Decision::Deny, 0), "{backend:?}");
        assert_eq!(
            a.denial.map(|d| d.code),
            Some(llm_meter_protocol::DenyCode::InvalidRequest)
        );
        assert!(
            matches!(
                l.settle(&settle_req("vb-1", "gone", 1, 1)).await,
                Err(LedgerError::Conflict(_))
            ),
            "{backend:?}"
        );
        let b = l.balance("gone", "text_token").await.unwrap().unwrap();
        assert_eq!((b.held, b.used), (0, 0), "{backend:?}");
        let memo: Option<String> = sqlx::query(
            &t.db
                .sql("SELECT memo FROM ledger_journal WHERE request_id = 'vb-1' AND kind = 'void'"),
        )
        .fetch_one(t.db.pool())
        .await
        .unwrap()
        .get(0);
        assert_eq!(memo.as_deref(), Some("void before authorize"));
        assert_eq!(
            l.expire_holds(l.now() + 3_600_000).await.unwrap(),
            ExpireHoldsReport::default()
        );
        assert_clean(l).await;
        t.cleanup().await;
    }
}

/// A replayed settlement must match who and what was settled, not only the usage.
#[tokio::test]
async fn a_replayed_settlement_for_another_caller_or_model_conflicts() {
    for t in each_backend().await {
        seed_catalog(&t.db).await;
        let f = fixture(&t).await;
        let l = &f.ledger;
        let backend = t.backend;
        l.grant(&grant_req("rp", 1_000, "g1")).await.unwrap();
        l.authorize(&auth("rp-1", "rp", 10, 10)).await.unwrap();
        let settle = settle_req("rp-1", "rp", 10, 5);
        assert_eq!(
            l.settle(&settle).await.unwrap().status,
            SettleStatus::Settled
        );
        assert_eq!(
            l.settle(&settle).await.unwrap().status,
            SettleStatus::AlreadySettled
        );
        let mut caller = settle.clone();
        caller.caller = Caller::UserId("mallory".into());
        let mut provider = settle.clone();
        provider.provider = "deepseek".into();
        let mut model = settle.clone();
        model.model = "gpt-other".into();
        for replay in [caller, provider, model] {
            assert!(
                matches!(l.settle(&replay).await, Err(LedgerError::Conflict(_))),
                "{backend:?}"
            );
        }
        let b = l.balance("rp", "text_token").await.unwrap().unwrap();
        assert_eq!(b.used, 15, "{backend:?}");
        assert_clean(l).await;
        t.cleanup().await;
    }
}

/// A grant takes the account lock before it writes its lot, like every other ledger
/// write: a transaction holding the account (a settlement) can then scan and lock the
/// user's lots without waiting for the grant's uncommitted lot, so the two never
/// deadlock. MySQL/MariaDB only: there a locking read waits for an uncommitted insert
/// (PostgreSQL does not see it, SQLite has one writer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_waits_for_the_account_before_writing_its_lot() {
    for t in each_backend().await {
        if t.backend != crate::storage::Dialect::MySql {
            t.cleanup().await;
            continue;
        }
        seed_catalog(&t.db).await;
        let f = fixture(&t).await;
        let l = f.ledger.clone();
        l.grant(&grant_req("lo", 100, "g1")).await.unwrap();
        let mut settlement = t.db.pool().begin().await.unwrap();
        sqlx::query(
            "SELECT balance FROM ledger_accounts WHERE user_id = 'lo' AND quota_type = \
             'text_token' FOR UPDATE",
        )
        .fetch_one(&mut *settlement)
        .await
        .unwrap();
        let grant = tokio::spawn({
            let l = l.clone();
            async move { l.grant(&grant_req("lo", 50, "g2")).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let lots = sqlx::query(
            "SELECT id FROM quota_lots WHERE user_id = 'lo' AND quota_type = 'text_token' \
             AND status = 'active' FOR UPDATE NOWAIT",
        )
        .fetch_all(&mut *settlement)
        .await;
        assert_eq!(lots.map(|rows| rows.len()).ok(), Some(1));
        settlement.commit().await.unwrap();
        assert!(grant.await.unwrap().unwrap().created);
        let b = l.balance("lo", "text_token").await.unwrap().unwrap();
        assert_eq!(b.remaining, 150);
        assert_clean(&l).await;
        t.cleanup().await;
    }
}

/// A burst of one user's calls, with a few of another's, shares group transactions on
/// every backend (on MySQL too, where a writer groups only one user's submissions), and
/// every call is answered and held exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_users_burst_shares_transactions_on_every_backend() {
    const CALLS: usize = 40;
    for t in each_backend().await {
        seed_catalog(&t.db).await;
        let f = fixture(&t).await;
        let l = f.ledger.clone();
        l.grant(&grant_req("hot", 1_000_000, "seed")).await.unwrap();
        // Another user's calls in the same burst.
        l.grant(&grant_req("cold", 1_000_000, "seed-cold"))
            .await
            .unwrap();
        // The hot account stays locked (on SQLite: the writer taken) until the whole burst
        // is queued. Unblocked, a writer could apply each call as it arrives, since a
        // group takes only what is queued when it starts.
        let mut blocker = t.db.begin_write().await.unwrap();
        let lock = format!(
            "SELECT balance FROM ledger_accounts WHERE user_id = ?{}",
            t.db.dialect().for_update()
        );
        sqlx::query(&t.db.sql(&lock))
            .bind("hot")
            .fetch_all(blocker.conn())
            .await
            .unwrap();
        let before = l.group_commits();
        let barrier = Arc::new(tokio::sync::Barrier::new(CALLS + 4));
        let mut tasks = Vec::new();
        for i in 0..CALLS + 4 {
            let (l, barrier) = (l.clone(), barrier.clone());
            let user = if i < CALLS { "hot" } else { "cold" };
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                l.authorize(&auth(&format!("burst-{i}"), user, 5, 5)).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        blocker.rollback().await.unwrap();
        for task in tasks {
            let answer = task.await.unwrap().unwrap();
            assert_eq!(answer.decision, Decision::Allow, "{:?}", t.backend);
        }
        let after = l.group_commits();
        let (groups, operations) = (
            after.groups - before.groups,
            after.operations - before.operations,
        );
        assert_eq!(operations, CALLS as u64 + 4, "{:?}", t.backend);
        assert!(
            groups <= operations / 2,
            "{:?}: {operations} operations in {groups} transactions",
            t.backend
        );
        // A writer applied the hot user's group while the lock was held (500 ms): that
        // wait is writer time, which is what says the writers are the bound. A group's
        // time is added just after its answers, so wait for it a moment.
        let mut busy = 0;
        for _ in 0..200 {
            busy = l.group_commits().busy_micros - before.busy_micros;
            if busy >= 250_000 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(busy >= 250_000, "{:?}: writers busy {busy} µs", t.backend);
        assert!(l.writer_count() >= 1, "{:?}", t.backend);
        let hot = l.balance("hot", "text_token").await.unwrap().unwrap();
        assert_eq!(hot.held, (CALLS * 10) as u64, "{:?}", t.backend);
        assert_clean(&l).await;
        t.cleanup().await;
    }
}

/// PostgreSQL: a lone plain authorization reserves outside a transaction when its one
/// statement applies, and writes nothing when it does not (a retry, not enough quota), so
/// the general path still answers those exactly.
#[tokio::test]
async fn a_lone_authorization_reserves_in_one_statement_on_postgres() {
    use crate::storage::testing::{fresh, selected_backends};
    if !selected_backends().contains(&crate::storage::Dialect::Postgres) {
        return;
    }
    let t = fresh(crate::storage::Dialect::Postgres).await;
    seed_catalog(&t.db).await;
    let f = fixture(&t).await;
    let l = &f.ledger;
    l.grant(&grant_req("u1", 1_000, "g1")).await.unwrap();
    let held = |user: &'static str| async move {
        let balance = l.balance(user, "text_token").await.unwrap().unwrap();
        (balance.held, balance.available)
    };
    let admitted = |req: AuthorizeRequest| async move {
        let admission = l.admit(&req, None).await.unwrap().unwrap();
        (req, admission)
    };

    let (req, admission) = admitted(auth("a1", "u1", 100, 100)).await;
    let answer = l.reserve_alone(&req, &admission).await.expect("reserved");
    assert_eq!((answer.decision, answer.held), (Decision::Allow, 200));
    assert_eq!(held("u1").await, (200, 800));

    // A retry: the hold exists, the statement fails whole, nothing changes; the general
    // path replays the first answer.
    assert!(l.reserve_alone(&req, &admission).await.is_none());
    assert_eq!(held("u1").await, (200, 800));
    let replayed = l.authorize(&req).await.unwrap();
    assert_eq!((replayed.decision, replayed.held), (Decision::Allow, 200));
    assert_eq!(held("u1").await, (200, 800));

    // Not enough quota: nothing is written, and the general path denies.
    let (big, admission) = admitted(auth("a2", "u1", 700, 200)).await;
    assert!(l.reserve_alone(&big, &admission).await.is_none());
    let denied = l.authorize(&big).await.unwrap();
    assert_eq!(denied.decision, Decision::Deny);
    assert_eq!(held("u1").await, (200, 800));

    // A user without an account: the general path answers.
    let (none, admission) = admitted(auth("a3", "nobody", 1, 1)).await;
    assert!(l.reserve_alone(&none, &admission).await.is_none());
    assert_eq!(l.authorize(&none).await.unwrap().decision, Decision::Deny);

    l.settle(&settle_req("a1", "u1", 100, 50)).await.unwrap();
    assert_eq!(held("u1").await, (0, 850));
    assert_clean(l).await;
    t.cleanup().await;
}
