//! Every way a call can end is settled: upstream errors void the hold, a client that goes
//! away mid-stream pays for input plus the output it saw (marked partial), a stream with no
//! usage is estimated (marked), and a stream that stops without its terminal event is partial.

use std::time::Duration;

use futures_util::StreamExt;
use llm_meter_e2e::admin::num;
use llm_meter_e2e::stack::Stack;
use serde_json::{json, Value};

const MODEL: &str = "m-e2e";

fn stream_body() -> Value {
    json!({
        "model": MODEL,
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": 500,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
    })
}

async fn started(label: &str, user: &str) -> Stack {
    let stack = Stack::start(label).await;
    stack.seed_priced_model(MODEL, "0.002", "0.006").await;
    stack
        .admin
        .grant(user, "text_token", 100_000, &format!("grant-{user}"))
        .await;
    stack
}

async fn assert_nothing_held(stack: &Stack, user: &str) -> Value {
    let quota = stack.admin.quota_released(user, "text_token").await;
    assert_eq!(num(&quota, "held"), 0, "no hold may be left: {quota}");
    quota
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_are_not_charged() {
    let stack = started("upstream-errors", "erin").await;
    for (status, fixture) in [
        ("500", None),
        ("400", Some("openai_chat_stream_error_chunk.sse")),
    ] {
        let mut headers = vec![("x-script-status", status)];
        if let Some(fixture) = fixture {
            headers.push(("x-script-fixture", fixture));
        }
        let reply = stack
            .call(
                "/v1/chat/completions",
                Some("erin"),
                &stream_body(),
                &headers,
            )
            .await;
        assert_eq!(
            reply.status.to_string(),
            status,
            "the client sees the upstream's status"
        );
    }
    let records = stack.wait_for_usage("erin", 2).await;
    for record in &records {
        assert_eq!(record["status"], "voided", "{record}");
        assert!(
            record["cost"].is_null() || record["cost"] == "0.000000",
            "{record}"
        );
    }
    let quota = assert_nothing_held(&stack, "erin").await;
    assert_eq!(num(&quota, "used"), 0, "{quota}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_stream_bills_input_plus_output_seen() {
    let stack = started("disconnect", "frank").await;
    let response = stack
        .http
        .post(stack.envoy.url("/v1/chat/completions"))
        .header("x-user-id", "frank")
        .header("x-script-fixture", "zhipu_glm_stream.sse")
        .header("x-script-chunk-bytes", "400")
        .header("x-script-delay-ms", "100")
        .json(&stream_body())
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 200);
    let mut body = response.bytes_stream();
    let mut seen = 0;
    while seen < 1200 {
        match body.next().await {
            Some(Ok(chunk)) => seen += chunk.len(),
            _ => break,
        }
    }
    drop(body); // the client goes away with most of the stream unsent

    let records = stack.wait_for_usage("frank", 1).await;
    let record = &records[0];
    assert_eq!(record["status"], "settled", "{record}");
    assert_eq!(record["partial"], true, "{record}");
    assert_eq!(record["estimated"], true, "{record}");
    assert!(num(record, "input_tokens") > 0, "input is billed: {record}");
    let output = num(record, "output_tokens");
    assert!(output > 0, "the output seen is billed: {record}");
    assert!(
        output < 564,
        "only the output seen, not the whole answer: {record}"
    );
    assert_nothing_held(&stack, "frank").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_without_usage_or_terminal_event_are_estimated_and_flagged() {
    let stack = started("no-usage", "gina").await;
    // A complete stream that carries no usage: estimated, not partial.
    let reply = stack
        .call(
            "/v1/chat/completions",
            Some("gina"),
            &stream_body(),
            &[("x-script-fixture", "openai_chat_no_usage_cjk_tools.sse")],
        )
        .await;
    assert_eq!(reply.status, 200);
    let records = stack.wait_for_usage("gina", 1).await;
    assert_eq!(records[0]["estimated"], true, "{}", records[0]);
    assert_eq!(records[0]["partial"], false, "{}", records[0]);
    assert!(num(&records[0], "output_tokens") > 0, "{}", records[0]);

    // A stream that stops without its terminal event: partial.
    let reply = stack
        .call(
            "/v1/chat/completions",
            Some("gina"),
            &stream_body(),
            &[("x-script-fixture", "openai_chat_truncated_no_terminal.sse")],
        )
        .await;
    assert_eq!(reply.status, 200);
    let records = stack.wait_for_usage("gina", 2).await;
    let truncated = records
        .iter()
        .find(|r| r["partial"] == true)
        .unwrap_or_else(|| panic!("a partial record: {records:?}"));
    assert_eq!(truncated["estimated"], true, "{truncated}");
    assert_nothing_held(&stack, "gina").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_mid_stream_bills_what_was_seen() {
    let stack = started("upstream-reset", "hank").await;
    let response = stack
        .http
        .post(stack.envoy.url("/v1/chat/completions"))
        .header("x-user-id", "hank")
        .header("x-script-fixture", "zhipu_glm_stream.sse")
        .header("x-script-chunk-bytes", "300")
        .header("x-script-delay-ms", "30")
        .header("x-script-abort-after-bytes", "3000")
        .json(&stream_body())
        .send()
        .await
        .expect("send");
    let mut body = response.bytes_stream();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, body.next()).await {}

    let records = stack.wait_for_usage("hank", 1).await;
    let record = &records[0];
    assert_eq!(record["partial"], true, "{record}");
    assert!(num(record, "output_tokens") > 0, "{record}");
    assert_nothing_held(&stack, "hank").await;
}
