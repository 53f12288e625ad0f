//! DEMO upstream for `make run` when no real provider is configured. It answers
//! `POST /v1/chat/completions` like an OpenAI-compatible provider: a JSON completion, or an
//! SSE stream (with a final usage chunk when `stream_options.include_usage` is set), so the
//! quickstart works offline. Every answer says it comes from the demo.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Response, StatusCode};
use axum::routing::post;
use axum::Json;
use futures_util::{stream, StreamExt};
use serde_json::{json, Value};

const REPLY: &str = "This answer comes from the llm-meter DEMO upstream, not a real model: \
every token you see was counted by the Envoy filter and settled in the ledger.";

#[tokio::main]
async fn main() {
    let listen = std::env::var("DEMO_UPSTREAM_LISTEN").unwrap_or_else(|_| "127.0.0.1:8090".into());
    let app = axum::Router::new().route("/v1/chat/completions", post(chat));
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("demo upstream: cannot listen on {listen}: {err}");
            std::process::exit(1);
        }
    };
    eprintln!("demo upstream (OpenAI-compatible, DEMO ONLY) listening on http://{listen}");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    if let Err(err) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        eprintln!("demo upstream: {err}");
    }
}

/// Deterministic token counts: about four characters per token, at least one.
fn approx_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}

fn prompt_text(body: &Value) -> String {
    body.get("messages")
        .and_then(Value::as_array)
        .map(|messages| {
            messages
                .iter()
                .filter_map(|m| m.get("content").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

async fn chat(Json(body): Json<Value>) -> Response<Body> {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("demo-model")
        .to_string();
    let prompt_tokens = approx_tokens(&prompt_text(&body));
    let words: Vec<String> = REPLY.split_inclusive(' ').map(str::to_string).collect();
    let completion_tokens = words.len() as u64;
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });
    let streaming = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if !streaming {
        let reply = json!({
            "id": "chatcmpl-demo",
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY}, "finish_reason": "stop"}],
            "usage": usage,
        });
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(reply.to_string()))
            .unwrap_or_default();
    }
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut events: Vec<String> = words
        .iter()
        .map(|word| {
            json!({"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": model,
                   "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": null}]})
            .to_string()
        })
        .collect();
    events.push(
        json!({"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": model,
               "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        .to_string(),
    );
    if include_usage {
        events.push(
            json!({"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": model,
                   "choices": [], "usage": usage})
            .to_string(),
        );
    }
    events.push("[DONE]".to_string());
    let frames = stream::iter(events).then(|event| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok::<Bytes, std::io::Error>(Bytes::from(format!("data: {event}\n\n")))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(frames))
        .unwrap_or_default()
}
