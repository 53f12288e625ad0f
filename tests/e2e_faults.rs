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
    let quota = stack.admin.quota("judy", "text_token").await;
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
    let quota = stack.admin.quota("kate", "text_token").await;
    assert_eq!(num(&quota, "used"), 5 * 29, "{quota}");
    assert_eq!(num(&quota, "held"), 0, "{quota}");
}
