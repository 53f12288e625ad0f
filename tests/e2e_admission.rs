//! Admission through the real Envoy: quota checks before the upstream, concurrency that can
//! never overdraw, and clear answers for bad requests.

use std::sync::Arc;

use llm_meter_e2e::admin::num;
use llm_meter_e2e::procs::FilterOptions;
use llm_meter_e2e::stack::Stack;
use serde_json::json;

const MODEL: &str = "m-e2e";

fn chat(stream: bool, max_tokens: u64) -> serde_json::Value {
    let mut body = json!({
        "model": MODEL,
        "stream": stream,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hello"}],
    });
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_quota_is_denied_before_the_upstream() {
    let stack = Stack::start("deny").await;
    stack.seed_priced_model(MODEL, "0.002", "0.006").await;
    stack
        .admin
        .grant("poor", "text_token", 50, "grant-poor")
        .await;

    let reply = stack
        .call(
            "/v1/chat/completions",
            Some("poor"),
            &chat(false, 1000),
            &[],
        )
        .await;

    assert_eq!(reply.status, 429, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["error"]["code"], "quota_exhausted", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(
        stack.upstream.request_count(),
        0,
        "the upstream must not see a denied call"
    );
    let quota = stack.admin.quota("poor", "text_token").await;
    assert_eq!(num(&quota, "held"), 0, "{quota}");
    assert_eq!(num(&quota, "used"), 0, "{quota}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_any_quota_gets_402() {
    let stack = Stack::start("noquota").await;
    stack.seed_priced_model(MODEL, "0.002", "0.006").await;
    let reply = stack
        .call(
            "/v1/chat/completions",
            Some("nobody"),
            &chat(false, 10),
            &[],
        )
        .await;
    assert_eq!(reply.status, 402, "{}", reply.text());
    assert_eq!(stack.upstream.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_never_reach_the_upstream() {
    let filter = FilterOptions {
        max_request_body_bytes: 4096,
        ..FilterOptions::default()
    };
    let stack = Stack::start_with("badreq", filter, &[]).await;
    stack.seed_priced_model(MODEL, "0.002", "0.006").await;
    stack
        .admin
        .grant("alice", "text_token", 100_000, "grant-alice")
        .await;

    // No identity: 401.
    let reply = stack
        .call("/v1/chat/completions", None, &chat(false, 10), &[])
        .await;
    assert_eq!(reply.status, 401, "{}", reply.text());
    assert!(
        reply.json()["error"]["message"].is_string(),
        "{}",
        reply.text()
    );

    // Malformed JSON: 400.
    let response = stack
        .http
        .post(stack.envoy.url("/v1/chat/completions"))
        .header("x-user-id", "alice")
        .header("content-type", "application/json")
        .body("{\"model\": \"m-e2e\", \"messages\": [")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 400);
    let text = response.text().await.unwrap_or_default();
    assert!(text.contains("JSON") || text.contains("json"), "{text}");

    // Oversized body: 413.
    let big =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(10_000)}]});
    let reply = stack
        .call("/v1/chat/completions", Some("alice"), &big, &[])
        .await;
    assert_eq!(reply.status, 413, "{}", reply.text());

    assert_eq!(
        stack.upstream.request_count(),
        0,
        "nothing may be forwarded unmetered"
    );
    let quota = stack.admin.quota_released("alice", "text_token").await;
    assert_eq!(num(&quota, "held"), 0, "{quota}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_without_a_price_runs_unbilled_and_flagged() {
    let stack = Stack::start("unpriced").await;
    stack.seed_model("free-model").await;
    stack
        .admin
        .grant("carol", "text_token", 100_000, "grant-carol")
        .await;
    let body = json!({"model": "free-model", "messages": [{"role": "user", "content": "hi"}]});

    let reply = stack
        .call("/v1/chat/completions", Some("carol"), &body, &[])
        .await;

    assert_eq!(reply.status, 200, "{}", reply.text());
    let records = stack.wait_for_usage("carol", 1).await;
    assert_eq!(records[0]["unpriced"], true, "{}", records[0]);
    assert!(records[0]["cost"].is_null(), "{}", records[0]);
    // The default upstream body reports 5 prompt + 1 completion tokens: still counted.
    assert_eq!(num(&records[0], "input_tokens"), 5);
    let log = stack.sidecar.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("no price") && l.contains("free-model")),
        "a warning must be logged: {log}"
    );
}

/// 50 concurrent streams for one user whose quota covers only some of them: the admitted
/// ones never exceed the quota, every admitted one is settled, and no hold is left over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_never_overdraw_and_all_settle() {
    let stack = Arc::new(Stack::start("concurrent").await);
    stack.seed_priced_model(MODEL, "0.002", "0.006").await;
    // Each call holds estimate + 100 output tokens; the recorded stream uses 12 + 100.
    let quota_units = 2_000;
    stack
        .admin
        .grant("dave", "text_token", quota_units, "grant-dave")
        .await;

    let mut calls = Vec::new();
    for _ in 0..50 {
        let stack = stack.clone();
        calls.push(tokio::spawn(async move {
            let headers = [
                ("x-script-fixture", "openai_chat_crlf_nospace_usage.sse"),
                ("x-script-chunk-bytes", "64"),
                ("x-script-delay-ms", "20"),
            ];
            stack
                .call(
                    "/v1/chat/completions",
                    Some("dave"),
                    &chat(true, 100),
                    &headers,
                )
                .await
                .status
        }));
    }
    let mut admitted = 0;
    let mut denied = 0;
    for call in calls {
        match call.await.expect("task") {
            200 => admitted += 1,
            429 => denied += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(
        admitted > 0 && denied > 0,
        "admitted {admitted}, denied {denied}"
    );

    let records = stack.wait_for_usage("dave", admitted).await;
    assert_eq!(
        records.len(),
        admitted,
        "every admitted call settles exactly once"
    );
    let used: i64 = records.iter().map(|r| num(r, "units")).sum();
    let quota = stack.admin.quota_released("dave", "text_token").await;
    assert_eq!(num(&quota, "held"), 0, "no hold is left over: {quota}");
    assert_eq!(num(&quota, "used"), used, "{quota}");
    assert!(used <= quota_units, "used {used} > granted {quota_units}");
    assert_eq!(num(&quota, "debt"), 0, "{quota}");
    assert_eq!(stack.upstream.request_count(), admitted);
}
