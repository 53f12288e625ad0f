//! Leases through the real Envoy: after one authorization, a caller's next calls of the
//! same model are admitted by the filter alone, yet every call is settled on its own,
//! nothing is ever overdrawn, and what a lease has left goes back to the balance.

use std::sync::Arc;
use std::time::Duration;

use llm_meter_e2e::admin::num;
use llm_meter_e2e::procs::FilterOptions;
use llm_meter_e2e::stack::Stack;
use serde_json::{json, Value};

const MODEL: &str = "m-lease";
/// What the scripted upstream's default answer reports.
const TOKENS_PER_CALL: i64 = 6;

fn chat(max_tokens: u64) -> Value {
    json!({
        "model": MODEL,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hello"}],
    })
}

/// The sum of the sidecar's Prometheus samples whose line starts with `prefix`.
async fn sidecar_counter(stack: &Stack, prefix: &str) -> u64 {
    let url = format!("{}/metrics", stack.sidecar.base_url());
    let text = stack
        .http
        .get(url)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap_or_default();
    text.lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Authorize calls the sidecar answered.
async fn sidecar_authorizations(stack: &Stack) -> u64 {
    sidecar_counter(stack, "meter_authorize_total{").await
}

/// Finalize batches the sidecar answered.
async fn sidecar_finalize_batches(stack: &Stack) -> u64 {
    let route = format!(
        "meter_http_requests_total{{route=\"{}\"",
        llm_meter_protocol::PATH_FINALIZE_BATCH
    );
    sidecar_counter(stack, &route).await
}

/// One of the filter's counters, after the flush of its next tick (the filter hands its
/// counts to Envoy every `settle_tick_ms`, 200 ms by default).
async fn stat(stack: &Stack, name: &str) -> u64 {
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.envoy.stat(&format!("wasmcustom.llm_meter.{name}"))
}

async fn assert_reconciled(stack: &Stack) {
    let reconcile = stack
        .admin
        .must_post("/admin/v1/reconcile", json!({}))
        .await;
    assert_eq!(reconcile["clean"], true, "{reconcile}");
}

async fn started(label: &str, filter: FilterOptions, user: &str, units: i64) -> Stack {
    let stack = Stack::start_with(label, filter, &[]).await;
    stack.seed_priced_model(MODEL, "0.002", "0.006").await;
    stack
        .admin
        .grant(user, "text_token", units, &format!("grant-{user}"))
        .await;
    stack
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_under_a_lease_skip_the_sidecar_and_still_settle_one_by_one() {
    let stack = started("lease-basic", FilterOptions::default(), "lena", 1_000_000).await;
    for _ in 0..20 {
        let reply = stack
            .call("/v1/chat/completions", Some("lena"), &chat(100), &[])
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(
        sidecar_authorizations(&stack).await,
        1,
        "one authorization, then the lease"
    );
    assert_eq!(stat(&stack, "leases_granted").await, 1);
    assert_eq!(stat(&stack, "lease_admissions").await, 19);

    let records = stack.wait_for_usage("lena", 20).await;
    assert_eq!(records.len(), 20, "one usage record per call");
    for record in &records {
        assert_eq!(num(record, "units"), TOKENS_PER_CALL, "{record}");
        assert!(
            num(record, "held") >= 100,
            "the call's share is recorded: {record}"
        );
        assert_eq!(record["status"], "settled", "{record}");
        assert_eq!(record["estimated"], false, "{record}");
    }
    let quota = stack.admin.quota_released("lena", "text_token").await;
    assert_eq!(
        num(&quota, "held"),
        0,
        "the idle lease was released: {quota}"
    );
    assert_eq!(num(&quota, "used"), 20 * TOKENS_PER_CALL, "{quota}");
    assert_eq!(
        num(&quota, "remaining"),
        1_000_000 - 20 * TOKENS_PER_CALL,
        "{quota}"
    );
    assert!(stat(&stack, "leases_released").await >= 1);
    assert_reconciled(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_under_leases_never_overdraw() {
    // Enough for a few dozen calls of 200 held units each, hammered by 80 at once.
    let granted = 6_000;
    let stack = Arc::new(started("lease-race", FilterOptions::default(), "omar", granted).await);
    let mut calls = Vec::new();
    for _ in 0..80 {
        let stack = stack.clone();
        calls.push(tokio::spawn(async move {
            let script = [("x-script-delay-ms", "30")];
            stack
                .call("/v1/chat/completions", Some("omar"), &chat(190), &script)
                .await
                .status
        }));
    }
    let (mut admitted, mut denied) = (0, 0);
    for call in calls {
        match call.await.expect("task") {
            200 => admitted += 1,
            429 => denied += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(
        admitted > 0 && denied > 0,
        "the balance must bite: admitted {admitted}, denied {denied}"
    );
    let records = stack.wait_for_usage("omar", admitted).await;
    assert_eq!(records.len(), admitted, "every admitted call settled once");
    let quota = stack.admin.quota_released("omar", "text_token").await;
    assert_eq!(num(&quota, "held"), 0, "{quota}");
    assert_eq!(num(&quota, "debt"), 0, "{quota}");
    assert_eq!(num(&quota, "used"), admitted as i64 * TOKENS_PER_CALL);
    assert_eq!(
        num(&quota, "remaining"),
        granted - admitted as i64 * TOKENS_PER_CALL,
        "{quota}"
    );
    assert_reconciled(&stack).await;
}

/// A burst of first calls from one caller must not hand the balance out in leases: each
/// grant takes a share of what is left, so if every call of the burst asked for a lease,
/// a balance with room for all of them would be leased away and the later calls denied.
/// Only one ask per caller and model is on its way at a time; the others hold for
/// themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_first_calls_is_admitted_without_leasing_the_balance_away() {
    // Room for the whole burst's holds (80 x 200) two and a half times over.
    let granted = 40_000;
    let filter = FilterOptions {
        lease_units: Some(1_000_000),
        ..FilterOptions::default()
    };
    let stack = Arc::new(started("lease-burst", filter, "pia", granted).await);
    let mut calls = Vec::new();
    for _ in 0..80 {
        let stack = stack.clone();
        calls.push(tokio::spawn(async move {
            let script = [("x-script-delay-ms", "200")];
            stack
                .call("/v1/chat/completions", Some("pia"), &chat(190), &script)
                .await
                .status
        }));
    }
    let mut statuses = Vec::new();
    for call in calls {
        statuses.push(call.await.expect("task"));
    }
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(admitted, 80, "every call of the burst fits: {statuses:?}");
    let records = stack.wait_for_usage("pia", admitted).await;
    assert_eq!(records.len(), admitted, "every admitted call settled once");
    let quota = stack.admin.quota_released("pia", "text_token").await;
    assert_eq!(num(&quota, "held"), 0, "{quota}");
    assert_eq!(num(&quota, "used"), admitted as i64 * TOKENS_PER_CALL);
    assert_reconciled(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_keeps_admitting_while_the_sidecar_is_down_and_settles_after() {
    let filter = FilterOptions {
        lease_idle_ms: Some(60_000),
        ..FilterOptions::default()
    };
    let mut stack = started("lease-outage", filter, "nina", 1_000_000).await;
    let first = stack
        .call("/v1/chat/completions", Some("nina"), &chat(100), &[])
        .await;
    assert_eq!(first.status, 200, "{}", first.text());
    stack.wait_for_usage("nina", 1).await;

    stack.sidecar.kill();
    for _ in 0..5 {
        let reply = stack
            .call("/v1/chat/completions", Some("nina"), &chat(100), &[])
            .await;
        assert_eq!(
            reply.status,
            200,
            "admitted under the lease: {}",
            reply.text()
        );
    }
    // A caller without a lease is still refused (fail_closed).
    let stranger = stack
        .call("/v1/chat/completions", Some("otto"), &chat(100), &[])
        .await;
    assert_eq!(stranger.status, 503, "{}", stranger.text());

    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.sidecar.restart();
    let records = stack.wait_for_usage("nina", 6).await;
    assert_eq!(records.len(), 6);
    let quota = stack.admin.quota("nina", "text_token").await;
    assert_eq!(num(&quota, "used"), 6 * TOKENS_PER_CALL, "{quota}");
    assert!(num(&quota, "held") > 0, "the lease is still open: {quota}");
    assert_reconciled(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_admits_nothing_and_a_new_one_is_granted() {
    let filter = FilterOptions {
        lease_ttl_ms: Some(300),
        lease_idle_ms: Some(60_000),
        ..FilterOptions::default()
    };
    let stack = started("lease-ttl", filter, "pia", 1_000_000).await;
    for _ in 0..3 {
        let reply = stack
            .call("/v1/chat/completions", Some("pia"), &chat(100), &[])
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let reply = stack
        .call("/v1/chat/completions", Some("pia"), &chat(100), &[])
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        stat(&stack, "leases_granted").await,
        2,
        "renewed after the TTL"
    );
    assert_eq!(sidecar_authorizations(&stack).await, 2);
    stack.wait_for_usage("pia", 4).await;
    let quota = stack.admin.quota_released("pia", "text_token").await;
    assert_eq!(num(&quota, "held"), 0, "both leases released: {quota}");
    assert_eq!(num(&quota, "used"), 4 * TOKENS_PER_CALL, "{quota}");
    assert_reconciled(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_leases_off_every_call_is_authorized_on_its_own() {
    let filter = FilterOptions {
        lease_units: Some(0),
        ..FilterOptions::default()
    };
    let stack = started("lease-off", filter, "quin", 1_000_000).await;
    for _ in 0..3 {
        let reply = stack
            .call("/v1/chat/completions", Some("quin"), &chat(100), &[])
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(sidecar_authorizations(&stack).await, 3);
    assert_eq!(stat(&stack, "lease_admissions").await, 0);
    stack.wait_for_usage("quin", 3).await;
    let quota = stack.admin.quota("quin", "text_token").await;
    assert_eq!(num(&quota, "held"), 0, "{quota}");
    assert_reconciled(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_settlement_would_be_refused_is_never_admitted_under_a_lease() {
    let stack = started("lease-keys", FilterOptions::default(), "rita", 1_000_000).await;
    let first = stack
        .call("/v1/chat/completions", Some("rita"), &chat(100), &[])
        .await;
    assert_eq!(first.status, 200, "{}", first.text());
    // A request id the ledger cannot key a settlement by: the lease must not admit it
    // (it would run unbilled); the filter refuses it with a clear 400.
    let long_id = "x".repeat(300);
    for forged in ["lease:forged", long_id.as_str()] {
        let reply = stack
            .call(
                "/v1/chat/completions",
                Some("rita"),
                &chat(100),
                &[("x-request-id", forged)],
            )
            .await;
        assert_eq!(reply.status, 400, "{}", reply.text());
        assert_eq!(reply.json()["error"]["code"], "invalid_request_id");
    }
    assert_eq!(stack.upstream.request_count(), 1, "only the first call ran");
    assert_eq!(stat(&stack, "lease_admissions").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_refuses_new_calls_rather_than_drop_a_settlement() {
    let filter = FilterOptions {
        lease_idle_ms: Some(60_000),
        outbox_capacity: Some(10),
        ..FilterOptions::default()
    };
    let mut stack = started("lease-backlog", filter, "sara", 1_000_000).await;
    let first = stack
        .call("/v1/chat/completions", Some("sara"), &chat(100), &[])
        .await;
    assert_eq!(first.status, 200, "{}", first.text());
    stack.wait_for_usage("sara", 1).await;

    // Settlements cannot be delivered: the lease keeps admitting until the outbox is
    // nine-tenths full, then the filter refuses (fail_closed) instead of admitting calls
    // whose settlements would not fit.
    stack.sidecar.kill();
    let mut statuses = Vec::new();
    for _ in 0..15 {
        let reply = stack
            .call("/v1/chat/completions", Some("sara"), &chat(100), &[])
            .await;
        statuses.push(reply.status);
    }
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(
        served, 9,
        "nine settlements fit before the backlog mark: {statuses:?}"
    );
    assert!(
        statuses[9..].iter().all(|s| *s == 503),
        "then every call is refused: {statuses:?}"
    );

    stack.sidecar.restart();
    let records = stack.wait_for_usage("sara", 1 + served).await;
    assert_eq!(records.len(), 1 + served, "every served call settled once");
    assert_eq!(stat(&stack, "outbox_dropped").await, 0);
    // Delivered again, so new calls are admitted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = stack
        .call("/v1/chat/completions", Some("sara"), &chat(100), &[])
        .await;
    assert_eq!(after.status, 200, "{}", after.text());
    assert_reconciled(&stack).await;
}

/// Between ticks the outbox sends only whole batches; each tick sends what is left. Under
/// steady load the outbox used to send whatever was queued each time an answer came back,
/// a few settlements per batch however large `settle_batch_max` (with that code this test
/// counted 17 and 24 batches against limits of 12 and 13).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_steady_load_settlements_leave_in_whole_batches() {
    let (batch_max, tick_ms) = (500_u64, 200_u64);
    let filter = FilterOptions {
        settle_batch_max: Some(batch_max),
        settle_tick_ms: Some(tick_ms),
        ..FilterOptions::default()
    };
    let stack = Arc::new(started("lease-batches", filter, "bea", 10_000_000).await);
    // Eight callers, for ten ticks or 50 calls each (the usage listing shows 500): a
    // steady stream of settlements across several ticks, never a whole batch between two.
    let started_at = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let stack = stack.clone();
        tasks.push(tokio::spawn(async move {
            let mut made = 0_u64;
            while made < 50 && started_at.elapsed() < Duration::from_millis(10 * tick_ms) {
                let script = [("x-script-delay-ms", "30")];
                let reply = stack
                    .call("/v1/chat/completions", Some("bea"), &chat(100), &script)
                    .await;
                assert_eq!(reply.status, 200, "{}", reply.text());
                made += 1;
            }
            made
        }));
    }
    let mut calls = 0;
    for task in tasks {
        calls += task.await.expect("task");
    }
    let records = stack.wait_for_usage("bea", calls as usize).await;
    assert_eq!(records.len(), calls as usize);
    let batches = sidecar_finalize_batches(&stack).await;
    let ticks = started_at.elapsed().as_millis() as u64 / tick_ms + 1;
    // Whole batches (the settlements and a lease release or two), plus at most one
    // partial batch per tick: the tick's first batch takes every due settlement, up to
    // a whole batch.
    let most = (calls + 2).div_ceil(batch_max) + ticks;
    assert!(
        batches <= most,
        "{batches} finalize batches for {calls} settlements over {ticks} ticks (at most {most})"
    );
    assert_reconciled(&stack).await;
}
