//! Lease tests (see `lease.rs`), run against SQLite, PostgreSQL and MariaDB for real.

use std::time::Duration;

use llm_meter_protocol::{
    AuthorizeRequest, AuthorizeResponse, Caller, Decision, DenyCode, Finalize, HoldMeasure,
    LeaseAsk, ReleaseRequest, SettleRequest, SettleStatus, VoidRequest,
};
use sqlx::Row;

use super::tests::{
    assert_clean, auth, config, exec, fixture, grant_req, price, seed_catalog, settle_req,
    small_pool, T0,
};
use super::*;
use crate::storage::testing::each_backend;
use crate::storage::Db;

const DAY: i64 = 86_400_000;

pub(super) fn lease_auth(
    id: &str,
    user: &str,
    input: u64,
    output: u64,
    units: u64,
) -> AuthorizeRequest {
    AuthorizeRequest {
        lease: Some(LeaseAsk {
            units,
            ttl_ms: 30_000,
        }),
        ..auth(id, user, input, output)
    }
}

/// A settlement of a call the filter admitted under `lease_id` with a share of `held`.
pub(super) fn under(lease_id: &str, held: u64, settle: SettleRequest) -> SettleRequest {
    SettleRequest {
        lease_id: Some(lease_id.into()),
        held,
        ..settle
    }
}

fn lease_void(id: &str, lease_id: &str, held: u64) -> VoidRequest {
    VoidRequest {
        request_id: id.into(),
        reason: "upstream 503".into(),
        upstream_status: 503,
        lease_id: Some(lease_id.into()),
        held,
    }
}

pub(super) fn release(lease_id: &str) -> ReleaseRequest {
    ReleaseRequest {
        lease_id: lease_id.into(),
    }
}

fn lease_of(answer: &AuthorizeResponse) -> &llm_meter_protocol::Lease {
    answer.lease.as_ref().expect("a lease was granted")
}

/// (amount, status, granted, expires_at) of a lease row.
async fn lease_row(db: &Db, lease_id: &str) -> (i64, String, Option<i64>, i64) {
    let sql = db.sql(
        "SELECT amount, status, granted, expires_at FROM ledger_holds \
         WHERE request_id = ? AND kind = 'lease'",
    );
    let row = sqlx::query(&sql)
        .bind(lease_id)
        .fetch_one(db.pool())
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

/// (status, held, charged, debt, started_at) of a call's usage record.
async fn usage_of(db: &Db, request_id: &str) -> Option<(String, i64, i64, i64, Option<i64>)> {
    let sql = db.sql(
        "SELECT status, held, charged, debt, started_at FROM usage_records WHERE request_id = ?",
    );
    sqlx::query(&sql)
        .bind(request_id)
        .fetch_optional(db.pool())
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
}

async fn count(db: &Db, sql: &str) -> i64 {
    sqlx::query(sql)
        .fetch_one(db.pool())
        .await
        .unwrap()
        .get::<i64, _>(0)
}

async fn balance(ledger: &Ledger, user: &str) -> Balance {
    ledger.balance(user, "text_token").await.unwrap().unwrap()
}

#[tokio::test]
async fn leases_are_sized_from_the_available_balance() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        let b = t.backend;
        // Big balance: what was asked for. The call's own hold (h = 200) is part of it.
        l.grant(&grant_req("big", 1_000_000, "big")).await.unwrap();
        let big = l
            .authorize(&lease_auth("r-big", "big", 100, 100, 10_000))
            .await
            .unwrap();
        assert_eq!((big.decision, big.held), (Decision::Allow, 200), "{b:?}");
        let lease = lease_of(&big);
        assert_eq!(
            (lease.lease_id.as_str(), lease.units, lease.measure),
            ("lease:r-big", 10_000, HoldMeasure::TotalTokens)
        );
        assert_eq!(
            (lease.expires_at_ms, lease.default_max_output_tokens),
            ((T0 + 30_000) as u64, 100)
        );
        assert_eq!(balance(l, "big").await.held, 10_000);
        // The authorizing call holds nothing of its own.
        let own = "SELECT COUNT(*) FROM ledger_holds WHERE request_id = 'r-big'";
        assert_eq!(count(&t.db, own).await, 0);
        // The sweep releases it a hold TTL (60 s here) after admission ends.
        let (amount, status, granted, expires_at) = lease_row(&t.db, "lease:r-big").await;
        assert_eq!(
            (amount, status.as_str(), granted, expires_at),
            (10_000, "held", Some(10_000), T0 + 30_000 + 60_000)
        );

        // Small balance: a quarter of what is available; then a quarter of what is left.
        l.grant(&grant_req("small", 4_000, "small")).await.unwrap();
        let first = l
            .authorize(&lease_auth("s1", "small", 100, 100, 10_000))
            .await
            .unwrap();
        assert_eq!(lease_of(&first).units, 1_000);
        let second = l
            .authorize(&lease_auth("s2", "small", 100, 100, 10_000))
            .await
            .unwrap();
        assert_eq!(lease_of(&second).units, 750);
        assert_eq!(balance(l, "small").await.held, 1_750);

        // Never below the call's own hold; denied exactly as a call when that does not fit.
        l.grant(&grant_req("tiny", 500, "tiny")).await.unwrap();
        let tiny = l
            .authorize(&lease_auth("t1", "tiny", 100, 100, 10_000))
            .await
            .unwrap();
        assert_eq!((tiny.held, lease_of(&tiny).units), (200, 200));
        let small_ask = l
            .authorize(&lease_auth("t2", "tiny", 10, 10, 5))
            .await
            .unwrap();
        assert_eq!(lease_of(&small_ask).units, 20);
        let denied = l
            .authorize(&lease_auth("t3", "tiny", 200, 100, 10_000))
            .await
            .unwrap();
        assert_eq!(
            (denied.decision, denied.denial.map(|d| d.code), denied.lease),
            (Decision::Deny, Some(DenyCode::QuotaExhausted), None)
        );
        let none = l
            .authorize(&lease_auth("n1", "nobody", 1, 1, 100))
            .await
            .unwrap();
        assert_eq!(none.denial.unwrap().code, DenyCode::NoQuota);
        let leftovers =
            "SELECT COUNT(*) FROM ledger_holds WHERE request_id IN ('lease:t3', 'lease:n1')";
        assert_eq!(count(&t.db, leftovers).await, 0);

        // The admission window is capped by the configuration (60 s by default).
        let mut long = lease_auth("r-long", "big", 1, 1, 10);
        long.lease = Some(LeaseAsk {
            units: 10,
            ttl_ms: 3_600_000,
        });
        let capped = l.authorize(&long).await.unwrap();
        assert_eq!(lease_of(&capped).expires_at_ms, (T0 + 60_000) as u64);

        // A request id may not look like a lease.
        let forged = l
            .authorize(&lease_auth("lease:x", "big", 1, 1, 10))
            .await
            .unwrap();
        assert_eq!(forged.denial.unwrap().code, DenyCode::InvalidRequest);
        assert_clean(l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn a_retried_lease_authorize_replays_its_first_answer() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        l.grant(&grant_req("u", 100_000, "p")).await.unwrap();
        let ask = lease_auth("r", "u", 100, 100, 5_000);
        let first = l.authorize(&ask).await.unwrap();
        // Calls settled under it change the lease, not the answer.
        l.settle(&under("lease:r", 200, settle_req("r", "u", 100, 50)))
            .await
            .unwrap();
        f.advance(Duration::from_secs(5));
        let again = l.authorize(&ask).await.unwrap();
        assert_eq!(first, again, "{:?}", t.backend);
        assert_eq!(balance(l, "u").await.held, 5_000 - 150);
        let other = l.authorize(&lease_auth("r", "u", 100, 999, 5_000)).await;
        assert!(matches!(other, Err(LedgerError::Conflict(_))), "{other:?}");
        let mut stranger = ask.clone();
        stranger.caller = Caller::UserId("v".into());
        let stranger = l.authorize(&stranger).await;
        assert!(matches!(stranger, Err(LedgerError::Conflict(_))));

        // A call settled (fail-open) before its lease authorize arrives holds nothing.
        l.settle(&settle_req("early", "u", 10, 10)).await.unwrap();
        let late = l
            .authorize(&lease_auth("early", "u", 10, 10, 5_000))
            .await
            .unwrap();
        assert_eq!(
            (late.decision, late.held, late.lease),
            (Decision::Allow, 0, None)
        );
        assert_eq!(balance(l, "u").await.held, 5_000 - 150);
        assert_clean(l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn money_quotas_are_authorized_call_by_call() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        exec(
            &t.db,
            "INSERT INTO quota_types (code, name, measure, model_type, unit_label, created_at) \
             VALUES ('credit', 'Credit', 'cost_micros', NULL, 'micros', 0)",
        )
        .await;
        exec(
            &t.db,
            "INSERT INTO models (provider_code, model_code, model_type, quota_type, status, \
             created_at, updated_at) VALUES ('openai', 'paid', 'text', 'credit', 'enabled', 0, 0)",
        )
        .await;
        price(&t.db, "paid", T0 - DAY, "0.002", "0.006").await;
        let mut credit = grant_req("u", 1_000_000, "p");
        credit.quota_type = "credit".into();
        l.grant(&credit).await.unwrap();
        let mut ask = lease_auth("m1", "u", 1_000, 1_000, 500_000);
        ask.model = "paid".into();
        let answer = l.authorize(&ask).await.unwrap();
        // 1k in + 1k out = 0.008 = 8000 micros, held for the call itself.
        assert_eq!(
            (answer.decision, answer.held, answer.lease.clone()),
            (Decision::Allow, 8_000, None),
            "{:?}",
            t.backend
        );
        let own = "SELECT COUNT(*) FROM ledger_holds WHERE request_id = 'm1' AND kind = 'call'";
        assert_eq!(count(&t.db, own).await, 1);
        assert_eq!(l.authorize(&ask).await.unwrap(), answer);
        assert_clean(l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn calls_settle_one_by_one_under_a_lease() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        let b = t.backend;
        l.grant(&grant_req("u", 100_000, "p")).await.unwrap();
        exec(
            &t.db,
            &format!(
                "INSERT INTO api_keys (key_hash, key_prefix, user_id, status, created_at) \
                 VALUES ('{}', 'sk-u', 'u', 'active', 0)",
                hash_api_key("sk-u-1")
            ),
        )
        .await;
        let granted = l
            .authorize(&lease_auth("a", "u", 100, 100, 10_000))
            .await
            .unwrap();
        let lease_id = lease_of(&granted).lease_id.clone();

        // The authorizing call: 100 in + 50 out = 150 units, 0.0002 + 0.0003.
        let a = l
            .settle(&under(&lease_id, 200, settle_req("a", "u", 100, 50)))
            .await
            .unwrap();
        assert_eq!(
            (a.status, a.charged, a.debt, a.cost.as_deref()),
            (SettleStatus::Settled, 150, 0, Some("0.000500")),
            "{b:?}"
        );
        // A call the filter admitted by itself.
        let c = l
            .settle(&under(&lease_id, 300, settle_req("c", "u", 200, 100)))
            .await
            .unwrap();
        assert_eq!((c.charged, c.debt), (300, 0));
        assert_eq!(lease_row(&t.db, &lease_id).await.0, 10_000 - 450);
        let after = balance(l, "u").await;
        assert_eq!(
            (after.held, after.remaining, after.used),
            (9_550, 99_550, 450)
        );
        assert_eq!(
            usage_of(&t.db, "a").await,
            Some(("settled".into(), 200, 150, 0, None))
        );
        assert_eq!(usage_of(&t.db, "c").await.unwrap().1, 300);
        let days = "SELECT requests FROM daily_costs WHERE user_id = 'u'";
        assert_eq!(count(&t.db, days).await, 2);

        // Replays: identical answers, other figures refused.
        let replay = l
            .settle(&under(&lease_id, 200, settle_req("a", "u", 100, 50)))
            .await
            .unwrap();
        assert_eq!(
            (replay.status, replay.charged, replay.cost),
            (SettleStatus::AlreadySettled, 150, a.cost.clone())
        );
        let changed = l
            .settle(&under(&lease_id, 200, settle_req("a", "u", 100, 51)))
            .await;
        assert!(
            matches!(changed, Err(LedgerError::Conflict(_))),
            "{changed:?}"
        );

        // Another caller or model cannot settle under this lease.
        let stranger = l
            .settle(&under(&lease_id, 10, settle_req("x1", "v", 1, 1)))
            .await;
        assert!(
            matches!(stranger, Err(LedgerError::Conflict(_))),
            "{stranger:?}"
        );
        let mut image = under(&lease_id, 1, settle_req("x2", "u", 0, 0));
        image.model = "img".into();
        let image = l.settle(&image).await;
        assert!(matches!(image, Err(LedgerError::Conflict(_))), "{image:?}");
        assert_eq!(usage_of(&t.db, "x1").await, None);
        assert_eq!(usage_of(&t.db, "x2").await, None);
        // An unknown lease: the call did run, so it is charged directly.
        let unknown = l
            .settle(&under("lease:unknown", 2, settle_req("x3", "u", 1, 1)))
            .await
            .unwrap();
        assert_eq!(
            (unknown.status, unknown.charged),
            (SettleStatus::Settled, 2)
        );

        // The caller's API key identifies the lease's user, even once revoked.
        let mut by_key = under(&lease_id, 20, settle_req("k1", "", 10, 10));
        by_key.caller = Caller::ApiKey("sk-u-1".into());
        assert_eq!(l.settle(&by_key).await.unwrap().charged, 20);
        exec(&t.db, "UPDATE api_keys SET status = 'revoked'").await;
        by_key.request_id = "k2".into();
        assert_eq!(l.settle(&by_key).await.unwrap().charged, 20);

        // The price in force when the lease was granted, not a newer one.
        price(&t.db, "gpt", T0 + 1_000, "1", "1").await;
        l.prices().invalidate();
        f.advance(Duration::from_secs(2));
        let old_price = l
            .settle(&under(&lease_id, 200, settle_req("p", "u", 100, 50)))
            .await
            .unwrap();
        assert_eq!(old_price.cost.as_deref(), Some("0.000500"));
        assert_eq!(lease_row(&t.db, &lease_id).await.0, 10_000 - 640);
        assert_eq!(balance(l, "u").await.used, 640 + 2);
        assert_clean(l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn an_overrun_beyond_the_lease_takes_free_units_then_debt() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        let b = t.backend;
        l.grant(&grant_req("u", 2_000, "p")).await.unwrap();
        let granted = l
            .authorize(&lease_auth("a", "u", 50, 50, 1_000))
            .await
            .unwrap();
        assert_eq!(lease_of(&granted).units, 500, "{b:?}");
        // Another call of the user holds 1,400 on its own: 100 units are free.
        l.authorize(&auth("other", "u", 1_000, 400)).await.unwrap();
        assert_eq!(balance(l, "u").await.available, 100);
        // 800 used: the lease's 500, the 100 free units, 200 of debt; the other hold stays.
        let a = l
            .settle(&under("lease:a", 100, settle_req("a", "u", 700, 100)))
            .await
            .unwrap();
        assert_eq!((a.charged, a.debt), (600, 200), "{b:?}");
        assert_eq!(lease_row(&t.db, "lease:a").await.0, 0);
        let after = balance(l, "u").await;
        assert_eq!(
            (after.remaining, after.held, after.debt),
            (1_400, 1_400, 200)
        );
        // An empty lease still charges further calls like an overrun.
        let more = l
            .settle(&under("lease:a", 50, settle_req("b", "u", 30, 20)))
            .await
            .unwrap();
        assert_eq!((more.charged, more.debt), (0, 50));
        let other = l
            .settle(&settle_req("other", "u", 1_000, 400))
            .await
            .unwrap();
        assert_eq!((other.charged, other.debt), (1_400, 0));
        let released = l.release(&release("lease:a")).await.unwrap();
        assert_eq!(
            (released.status, released.charged),
            (SettleStatus::Released, 0)
        );
        assert_eq!(
            l.grant(&grant_req("u", 1_000, "top-up"))
                .await
                .unwrap()
                .debt_repaid,
            250
        );
        assert_clean(l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn voids_and_releases_close_a_lease() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        let b = t.backend;
        l.grant(&grant_req("u", 100_000, "p")).await.unwrap();
        l.authorize(&lease_auth("a", "u", 100, 100, 10_000))
            .await
            .unwrap();
        l.settle(&under("lease:a", 200, settle_req("a", "u", 100, 100)))
            .await
            .unwrap();

        // A void under the lease releases nothing in the ledger but is recorded.
        let void = lease_void("v", "lease:a", 300);
        assert_eq!(
            l.void(&void).await.unwrap().status,
            SettleStatus::Voided,
            "{b:?}"
        );
        assert_eq!(
            usage_of(&t.db, "v").await,
            Some(("voided".into(), 300, 0, 0, None))
        );
        assert_eq!(balance(l, "u").await.held, 9_800);
        assert_eq!(
            l.void(&void).await.unwrap().status,
            SettleStatus::AlreadyVoided
        );
        let settle_voided = l
            .settle(&under("lease:a", 300, settle_req("v", "u", 1, 1)))
            .await;
        assert!(matches!(settle_voided, Err(LedgerError::Conflict(_))));
        let void_settled = l.void(&lease_void("a", "lease:a", 200)).await;
        assert!(matches!(void_settled, Err(LedgerError::Conflict(_))));

        // Release gives back the remainder, once.
        let released = l.release(&release("lease:a")).await.unwrap();
        assert_eq!(
            (released.request_id.as_str(), released.status),
            ("lease:a", SettleStatus::Released)
        );
        let after = balance(l, "u").await;
        assert_eq!((after.held, after.remaining), (0, 99_800));
        assert_eq!(lease_row(&t.db, "lease:a").await.1, "released");
        assert_eq!(
            l.release(&release("lease:a")).await.unwrap().status,
            SettleStatus::AlreadyReleased
        );
        let unknown = l.release(&release("lease:nope")).await;
        assert!(
            matches!(unknown, Err(LedgerError::NotFound(_))),
            "{unknown:?}"
        );
        l.authorize(&auth("call", "u", 1, 1)).await.unwrap();
        let a_call = l.release(&release("call")).await;
        assert!(matches!(a_call, Err(LedgerError::Invalid(_))), "{a_call:?}");

        // A settlement that arrives after the release is charged like a late one.
        let late = l
            .settle(&under("lease:a", 200, settle_req("late", "u", 100, 100)))
            .await
            .unwrap();
        assert_eq!((late.charged, late.debt), (200, 0));
        let after = balance(l, "u").await;
        assert_eq!((after.held, after.remaining), (2, 99_600));
        assert_eq!(usage_of(&t.db, "late").await.unwrap().1, 200);

        // The outbox's batch answers each kind of item.
        l.authorize(&lease_auth("b", "u", 10, 10, 1_000))
            .await
            .unwrap();
        let items = vec![
            Finalize::Settle(under("lease:b", 20, settle_req("b", "u", 10, 10))),
            Finalize::Void(lease_void("b2", "lease:b", 20)),
            Finalize::Release(release("lease:b")),
            Finalize::Release(release("lease:b")),
            Finalize::Release(release("lease:missing")),
            Finalize::Void(lease_void("lease:forged", "lease:b", 1)),
        ];
        let results = l.finalize(&items).await;
        let statuses: Vec<_> = results
            .iter()
            .map(|r| r.as_ref().map(|s| s.status))
            .collect();
        assert!(
            matches!(
                statuses.as_slice(),
                [
                    Ok(SettleStatus::Settled),
                    Ok(SettleStatus::Voided),
                    Ok(SettleStatus::Released),
                    Ok(SettleStatus::AlreadyReleased),
                    Err(_),
                    Err(_)
                ]
            ),
            "{b:?}: {results:?}"
        );
        assert!(matches!(results[4], Err(LedgerError::NotFound(_))));
        assert!(matches!(results[5], Err(LedgerError::Invalid(_))));
        assert_eq!(balance(l, "u").await.held, 2);
        assert_clean(l).await;
        t.cleanup().await;
    }
}

#[tokio::test]
async fn the_sweep_expires_a_forgotten_lease_without_a_usage_record() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        let b = t.backend;
        l.grant(&grant_req("u", 100_000, "p")).await.unwrap();
        l.authorize(&lease_auth("a", "u", 100, 100, 10_000))
            .await
            .unwrap();
        l.settle(&under("lease:a", 200, settle_req("a", "u", 100, 100)))
            .await
            .unwrap();
        // Admission ended, but a call admitted just before may still be streaming.
        f.set_time(T0 + 30_000 + 59_999);
        assert_eq!(
            l.expire_holds(l.now()).await.unwrap(),
            ExpireHoldsReport::default(),
            "{b:?}"
        );
        f.set_time(T0 + 30_000 + 60_000);
        let report = l.expire_holds(l.now()).await.unwrap();
        assert_eq!(
            (report.expired, report.leases_expired, report.units_released),
            (1, 1, 9_800),
            "{b:?}"
        );
        assert_eq!(lease_row(&t.db, "lease:a").await.1, "expired");
        assert_eq!(balance(l, "u").await.held, 0);
        let records = "SELECT COUNT(*) FROM usage_records";
        assert_eq!(count(&t.db, records).await, 1);
        assert_eq!(
            l.release(&release("lease:a")).await.unwrap().status,
            SettleStatus::AlreadyReleased
        );
        let late = l
            .settle(&under("lease:a", 200, settle_req("late", "u", 50, 50)))
            .await
            .unwrap();
        assert_eq!((late.charged, late.debt), (100, 0));
        assert_eq!(balance(l, "u").await.remaining, 100_000 - 300);
        assert_clean(l).await;
        t.cleanup().await;
    }
}

/// Several "sidecar processes" settle many calls under one lease at once (more than the
/// lease holds, so the last ones overrun into free units) while the same user's own
/// calls and other users' leases are authorized and settled: nothing is overdrawn, every
/// unit is accounted for, and the ledger reconciles.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_settles_under_one_lease_never_overdraw() {
    const PROCESSES: usize = 3;
    const LEASE_CALLS: usize = 40;
    const OWN_CALLS: usize = 20;
    const OTHER_USERS: usize = 4;
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
        admin.grant(&grant_req("hot", 40_000, "p")).await.unwrap();
        for u in 0..OTHER_USERS {
            let user = format!("other-{u}");
            admin.grant(&grant_req(&user, 5_000, &user)).await.unwrap();
        }
        let granted = admin
            .authorize(&lease_auth("hot-lease", "hot", 100, 200, 20_000))
            .await
            .unwrap();
        assert_eq!(lease_of(&granted).units, 10_000, "{:?}", t.backend);

        let mut tasks = Vec::new();
        for i in 0..LEASE_CALLS {
            let ledger = ledgers[i % PROCESSES].clone();
            tasks.push(tokio::spawn(async move {
                let id = if i == 0 {
                    "hot-lease".to_string()
                } else {
                    format!("hot-{i}")
                };
                let s = under("lease:hot-lease", 300, settle_req(&id, "hot", 200, 100));
                let first = ledger.settle(&s).await?;
                // The outbox may send it twice.
                let again = ledger.settle(&s).await?;
                assert_eq!(again.status, SettleStatus::AlreadySettled);
                Ok::<_, LedgerError>((first.charged, first.debt))
            }));
        }
        for i in 0..OWN_CALLS {
            let ledger = ledgers[(i + 1) % PROCESSES].clone();
            tasks.push(tokio::spawn(async move {
                let id = format!("own-{i}");
                let r = ledger.authorize(&auth(&id, "hot", 500, 500)).await?;
                assert_eq!(r.decision, Decision::Allow);
                let s = ledger.settle(&settle_req(&id, "hot", 300, 200)).await?;
                Ok((s.charged, s.debt))
            }));
        }
        for u in 0..OTHER_USERS {
            let ledger = ledgers[u % PROCESSES].clone();
            tasks.push(tokio::spawn(async move {
                let user = format!("other-{u}");
                let id = format!("{user}-0");
                let r = ledger
                    .authorize(&lease_auth(&id, &user, 100, 100, 4_000))
                    .await?;
                let lease_id = lease_of(&r).lease_id.clone();
                for k in 0..5 {
                    let call = format!("{user}-{k}");
                    let s = under(&lease_id, 200, settle_req(&call, &user, 100, 100));
                    ledger.settle(&s).await?;
                }
                let released = ledger.release(&release(&lease_id)).await?;
                assert_eq!(released.status, SettleStatus::Released);
                Ok((0, 0))
            }));
        }
        let (mut charged, mut debt) = (0u64, 0u64);
        for task in tasks {
            let (c, d) = task
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("{:?}: {e}", t.backend));
            charged += c;
            debt += d;
        }
        let backend = t.backend;
        // 40 x 300 under the lease + 20 x 500 of its own: all charged, no debt.
        assert_eq!((charged, debt), (22_000, 0), "{backend:?}");
        let hot = balance(&admin, "hot").await;
        assert_eq!(
            (hot.remaining, hot.held, hot.debt),
            (18_000, 0, 0),
            "{backend:?}"
        );
        assert_eq!(lease_row(&t.db, "lease:hot-lease").await.0, 0);
        assert_eq!(
            admin
                .release(&release("lease:hot-lease"))
                .await
                .unwrap()
                .status,
            SettleStatus::Released
        );
        for u in 0..OTHER_USERS {
            let other = balance(&admin, &format!("other-{u}")).await;
            assert_eq!((other.remaining, other.held), (4_000, 0), "{backend:?}");
        }
        let records = "SELECT COUNT(*) FROM usage_records";
        let expected = LEASE_CALLS + OWN_CALLS + OTHER_USERS * 5;
        assert_eq!(count(&t.db, records).await, expected as i64);
        assert_clean(&admin).await;
        for l in &ledgers[1..] {
            l.db().close().await;
        }
        t.cleanup().await;
    }
}

#[tokio::test]
async fn a_void_of_an_authorization_whose_answer_was_lost_releases_its_lease() {
    for t in each_backend().await {
        let f = fixture(&t).await;
        let l = &f.ledger;
        seed_catalog(&t.db).await;
        l.grant(&grant_req("gone", 1_000_000, "gone"))
            .await
            .unwrap();
        let answer = l
            .authorize(&lease_auth("r-gone", "gone", 100, 100, 10_000))
            .await
            .unwrap();
        assert_eq!(balance(l, "gone").await.held, lease_of(&answer).units);
        // The client left while the filter waited: the filter voids the call by its
        // request id alone, never having seen the lease.
        let void = VoidRequest {
            request_id: "r-gone".into(),
            reason: "client left before the call was forwarded".into(),
            upstream_status: 0,
            lease_id: None,
            held: 0,
        };
        l.void(&void).await.unwrap();
        assert_eq!(balance(l, "gone").await.held, 0, "{:?}", t.backend);
        let (_, status, _, _) = lease_row(&t.db, "lease:r-gone").await;
        assert_eq!(status, "released");
        // Repeating the void changes nothing.
        l.void(&void).await.unwrap();
        assert_eq!(balance(l, "gone").await.held, 0);
        assert_clean(l).await;
    }
}
