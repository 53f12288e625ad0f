//! The sidecar going away: fail_closed refuses, fail_open forwards and the settlement lands
//! once the sidecar is back (the filter's outbox retries), and a sidecar restarted in the
//! middle of a stream loses nothing and doubles nothing.

use std::sync::Arc;
use std::time::Duration;

use llm_meter_e2e::admin::num;
use llm_meter_e2e::procs::FilterOptions;
use llm_meter_e2e::stack::Stack;
use serde_json::{json, Value};

const MODEL: &str = "m-e2e";

fn body(stream: bool) -> Value {
    let mut body = json!({
        "model": MODEL,
        "stream": stream,
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "hello"}],
    });
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

async fn started(label: &str, failure_mode: &'static str, user: &str) -> Stack {
    let filter = FilterOptions {
        failure_mode,
        timeout_ms: 500,
        ..FilterOptions::default()
    };
    let stack = Stack::start_with(label, filter, &[]).await;
    stack.seed_priced_model(MODEL, "0.002", "0.006").await;
    stack
        .admin
        .grant(user, "text_token", 100_000, &format!("grant-{user}"))
        .await;
    stack
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_down_with_fail_closed_answers_503_and_forwards_nothing() {
    let mut stack = started("fail-closed", "fail_closed", "ivan").await;
    stack.sidecar.kill();

    let reply = stack
        .call("/v1/chat/completions", Some("ivan"), &body(false), &[])
        .await;

    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(
        reply.json()["error"]["message"].is_string(),
        "{}",
        reply.text()
    );
    assert_eq!(stack.upstream.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_down_with_fail_open_forwards_and_settles_after_it_returns() {
    let mut stack = started("fail-open", "fail_open", "judy").await;
    stack.sidecar.kill();

    let reply = stack
        .call(
            "/v1/chat/completions",
            Some("judy"),
            &body(true),
            &[("x-script-fixture", "openai_chat_crlf_nospace_usage.sse")],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(stack.upstream.request_count(), 1);

    // Let the outbox fail a few times, then bring the sidecar back.
    tokio::time::sleep(Duration::from_millis(800)).await;
    stack.sidecar.restart();

    let records = stack.wait_for_usage("judy", 1).await;
    let record = &records[0];
    assert_eq!(record["fail_open"], true, "{record}");
    assert_eq!(num(record, "input_tokens"), 21, "{record}");
    assert_eq!(num(record, "output_tokens"), 8, "{record}");
    let quota = stack.admin.quota_released("judy", "text_token").await;
    assert_eq!(num(&quota, "used"), 29, "{quota}");
    assert_eq!(num(&quota, "held"), 0, "{quota}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_restarted_mid_stream_loses_and_doubles_nothing() {
    let stack = Arc::new(tokio::sync::Mutex::new(
        started("restart-mid-stream", "fail_closed", "kate").await,
    ));
    let streams: Vec<_> = (0..5)
        .map(|_| {
            let stack = stack.clone();
            tokio::spawn(async move {
                let (url, http) = {
                    let stack = stack.lock().await;
                    (stack.envoy.url("/v1/chat/completions"), stack.http.clone())
                };
                let response = http
                    .post(url)
                    .header("x-user-id", "kate")
                    .header("x-script-fixture", "openai_chat_crlf_nospace_usage.sse")
                    .header("x-script-chunk-bytes", "50")
                    .header("x-script-delay-ms", "60")
                    .json(&body(true))
                    .send()
                    .await
                    .expect("send");
                let status = response.status().as_u16();
                let _ = response.bytes().await;
                status
            })
        })
        .collect();

    // All five are admitted and streaming; restart the sidecar under them.
    tokio::time::sleep(Duration::from_millis(400)).await;
    stack.lock().await.sidecar.restart();

    for stream in streams {
        assert_eq!(stream.await.expect("task"), 200);
    }
    let stack = stack.lock().await;
    let records = stack.wait_for_usage("kate", 5).await;
    // A few more ticks: a doubled settlement would show up as a sixth record.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let records_later = stack.admin.usage_of("kate").await;
    assert_eq!(records_later.len(), 5, "exactly once: {records_later:?}");
    for record in &records {
        assert_eq!(record["status"], "settled", "{record}");
        assert_eq!(num(record, "input_tokens"), 21, "{record}");
    }
    let quota = stack.admin.quota_released("kate", "text_token").await;
    assert_eq!(num(&quota, "used"), 5 * 29, "{quota}");
    assert_eq!(num(&quota, "held"), 0, "{quota}");
}

/// SIGKILL the sidecar under 200 in-flight streams and restart it: every admitted call is
/// settled exactly once, no hold is left, and reconcile finds zero drift.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_killed_under_200_streams_settles_every_admitted_call_once() {
    let filter = FilterOptions {
        timeout_ms: 2000,
        ..FilterOptions::default()
    };
    let stack = Stack::start_with("kill-200", filter, &[]).await;
    stack.seed_priced_model(MODEL, "0.002", "0.006").await;
    stack
        .admin
        .grant("liam", "text_token", 10_000_000, "grant-liam")
        .await;
    let stack = Arc::new(tokio::sync::Mutex::new(stack));

    let (url, http) = {
        let stack = stack.lock().await;
        (stack.envoy.url("/v1/chat/completions"), stack.http.clone())
    };
    let streams: Vec<_> = (0..200)
        .map(|_| {
            let (url, http) = (url.clone(), http.clone());
            tokio::spawn(async move {
                let response = http
                    .post(url)
                    .header("x-user-id", "liam")
                    .header("x-script-fixture", "openai_chat_crlf_nospace_usage.sse")
                    .header("x-script-chunk-bytes", "40")
                    .header("x-script-delay-ms", "40")
                    .json(&body(true))
                    .send()
                    .await;
                match response {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let _ = response.bytes().await;
                        status
                    }
                    Err(_) => 0,
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(600)).await;
    stack.lock().await.sidecar.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stack.lock().await.sidecar.restart();

    let (mut admitted, mut refused) = (0, 0);
    for stream in streams {
        match stream.await.expect("task") {
            200 => admitted += 1,
            503 => refused += 1, // arrived while the sidecar was down: refused (fail_closed)
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(admitted > 0, "some calls were admitted before the kill");
    let stack = stack.lock().await;
    let is_settled = |r: &&Value| r["status"] == "settled";
    let mut records = stack.admin.usage_of("liam").await;
    for _ in 0..200 {
        if records.iter().filter(is_settled).count() >= admitted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        records = stack.admin.usage_of("liam").await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let records_later = stack.admin.usage_of("liam").await;
    assert_eq!(records_later.len(), records.len(), "no settlement doubled");
    // A call refused with 503 may still have been forwarded (the upstream's own error, e.g.
    // a reset while the machine is loaded): it is voided, charging nothing.
    let settled = records.iter().filter(is_settled).count();
    let others: Vec<&Value> = records.iter().filter(|r| !is_settled(r)).collect();
    assert_eq!(
        settled, admitted,
        "every admitted call settled exactly once; not settled: {others:?}"
    );
    for record in &others {
        assert_eq!(record["status"], "voided", "{record}");
        assert_eq!(num(record, "charged"), 0, "{record}");
    }
    assert!(
        others.len() <= refused,
        "{} voided for {refused} refused",
        others.len()
    );
    let quota = stack.admin.quota("liam", "text_token").await;
    assert_eq!(num(&quota, "held"), 0, "{quota}");
    assert_eq!(num(&quota, "used"), 29 * admitted as i64, "{quota}");
    let reconcile = stack
        .admin
        .must_post("/admin/v1/reconcile", json!({}))
        .await;
    assert_eq!(reconcile["clean"], true, "{reconcile}");
}

/// A call whose settlement can never arrive (Envoy itself dies mid-stream) has its hold
/// expire after the TTL, recorded as such, and the ledger stays consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_of_calls_that_never_complete_expire() {
    let env = [
        ("METER_HOLD_TTL_SECS", "2"),
        ("METER_SWEEP_INTERVAL_SECS", "1"),
    ];
    // Per-call holds: a lease's expiry is covered by the ledger's lease tests (a lease is
    // swept a hold TTL after its admission window, with no per-call record).
    let filter = FilterOptions {
        lease_units: Some(0),
        ..FilterOptions::default()
    };
    let mut stack = Stack::start_with("hold-ttl", filter, &env).await;
    stack.seed_priced_model(MODEL, "0.002", "0.006").await;
    stack
        .admin
        .grant("mona", "text_token", 100_000, "grant-mona")
        .await;

    let request = stack
        .http
        .post(stack.envoy.url("/v1/chat/completions"))
        .header("x-user-id", "mona")
        .header("x-script-fixture", "zhipu_glm_stream.sse")
        .header("x-script-chunk-bytes", "100")
        .header("x-script-delay-ms", "200")
        .json(&body(true))
        .send();
    let call = tokio::spawn(request);
    // Wait until the hold exists, then kill Envoy (and its outbox) mid-stream.
    let mut held = 0;
    for _ in 0..100 {
        held = num(&stack.admin.quota("mona", "text_token").await, "held");
        if held > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(held > 0, "the call holds quota while it streams");
    stack.envoy.kill();
    let _ = call.await;

    let records = stack.wait_for_usage("mona", 1).await;
    assert_eq!(records[0]["status"], "expired", "{}", records[0]);
    let quota = stack.admin.quota_released("mona", "text_token").await;
    assert_eq!(num(&quota, "held"), 0, "{quota}");
    assert_eq!(num(&quota, "used"), 0, "{quota}");
    let reconcile = stack
        .admin
        .must_post("/admin/v1/reconcile", json!({}))
        .await;
    assert_eq!(reconcile["clean"], true, "{reconcile}");
}
