//! A scripted LLM upstream. Each request says, in headers that the client sets and Envoy
//! forwards, what the upstream must answer:
//!
//! | header | meaning | default |
//! |---|---|---|
//! | `x-script-fixture` | file name of the body to replay (see [`crate::fixtures::locate`]) | a small OpenAI chat body |
//! | `x-script-status` | HTTP status | 200 |
//! | `x-script-chunk-bytes` | bytes per body chunk | whole body in one chunk |
//! | `x-script-delay-ms` | pause before each chunk | 0 |
//! | `x-script-abort-after-bytes` | reset the connection after this many body bytes | never |
//! | `x-script-content-type` | content type | by extension (`.sse` → `text/event-stream`) |
//! | `x-script-body` | name of a body given to [`ScriptedUpstream::register_body`] (instead of a fixture) | none |
//! | `x-script-headers-delay-ms` | pause before the response headers | 0 |
//! | `x-script-stall-after-bytes` | after this many body bytes, send nothing more (the body never ends) | never |
//! | `x-script-end-delay-ms` | pause after the last chunk before the body ends | 0 |
//!
//! Every request is recorded (path, headers, body) so a test can assert what the upstream
//! saw, e.g. that a denied call never reached it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, Response, StatusCode};
use futures_util::stream;

#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl SeenRequest {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Bodies registered by a test, by name: (content type, bytes).
type Bodies = Arc<Mutex<HashMap<String, (String, Bytes)>>>;

pub struct ScriptedUpstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    bodies: Bodies,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

const DEFAULT_BODY: &str = r#"{"id":"chatcmpl-e2e","object":"chat.completion","model":"e2e-model","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;

impl ScriptedUpstream {
    pub async fn start() -> ScriptedUpstream {
        let seen: Arc<Mutex<Vec<SeenRequest>>> = Arc::default();
        let recorder = seen.clone();
        let bodies: Bodies = Arc::default();
        let registered = bodies.clone();
        let app = axum::Router::new().fallback(move |req: Request<Body>| {
            let recorder = recorder.clone();
            let registered = registered.clone();
            async move { Ok::<_, Infallible>(answer(req, recorder, registered).await) }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        ScriptedUpstream {
            addr,
            seen,
            bodies,
            shutdown: Some(tx),
        }
    }

    /// Make `bytes` answerable as `x-script-body: <name>` (for generated, e.g. hostile, bodies).
    pub fn register_body(&self, name: &str, content_type: &str, bytes: impl Into<Bytes>) {
        if let Ok(mut bodies) = self.bodies.lock() {
            bodies.insert(name.to_string(), (content_type.to_string(), bytes.into()));
        }
    }

    pub fn requests(&self) -> Vec<SeenRequest> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub fn request_count(&self) -> usize {
        self.seen.lock().map(|v| v.len()).unwrap_or(0)
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

async fn answer(
    req: Request<Body>,
    recorder: Arc<Mutex<Vec<SeenRequest>>>,
    bodies: Bodies,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let headers = parts.headers.clone();
    if let Ok(mut seen) = recorder.lock() {
        seen.push(SeenRequest {
            path: parts.uri.to_string(),
            headers: parts.headers,
            body,
        });
    }

    let fixture = headers
        .get("x-script-fixture")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let registered = headers
        .get("x-script-body")
        .and_then(|v| v.to_str().ok())
        .and_then(|name| bodies.lock().ok()?.get(name).cloned());
    let (payload, default_type) = match (&fixture, registered) {
        (_, Some((kind, bytes))) => (bytes.to_vec(), kind),
        (Some(name), None) => {
            match crate::fixtures::locate(name).and_then(|p| std::fs::read(p).ok()) {
                Some(bytes) => {
                    let kind = if name.ends_with(".sse") {
                        "text/event-stream"
                    } else {
                        "application/json"
                    };
                    (bytes, kind.to_string())
                }
                None => {
                    return Response::builder()
                        .status(StatusCode::NOT_IMPLEMENTED)
                        .body(Body::from(format!("scripted upstream: no fixture {name}")))
                        .unwrap_or_default()
                }
            }
        }
        (None, None) => (
            DEFAULT_BODY.as_bytes().to_vec(),
            "application/json".to_string(),
        ),
    };
    let status = header_u64(&headers, "x-script-status")
        .and_then(|s| StatusCode::from_u16(s as u16).ok())
        .unwrap_or(StatusCode::OK);
    let content_type = headers
        .get("x-script-content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or(default_type);
    let chunk = header_u64(&headers, "x-script-chunk-bytes")
        .unwrap_or(payload.len() as u64)
        .max(1) as usize;
    let delay = Duration::from_millis(header_u64(&headers, "x-script-delay-ms").unwrap_or(0));
    let abort_after = header_u64(&headers, "x-script-abort-after-bytes").map(|n| n as usize);
    let stall_after = header_u64(&headers, "x-script-stall-after-bytes").map(|n| n as usize);
    let end_delay =
        Duration::from_millis(header_u64(&headers, "x-script-end-delay-ms").unwrap_or(0));
    let headers_delay =
        Duration::from_millis(header_u64(&headers, "x-script-headers-delay-ms").unwrap_or(0));
    if !headers_delay.is_zero() {
        tokio::time::sleep(headers_delay).await;
    }

    let pieces: Vec<Bytes> = payload.chunks(chunk).map(Bytes::copy_from_slice).collect();
    let body_stream = stream::unfold(
        (pieces.into_iter(), 0usize),
        move |(mut rest, sent)| async move {
            if let Some(limit) = abort_after {
                if sent >= limit {
                    // An error item makes hyper reset the connection mid-body.
                    return Some((Err(std::io::Error::other("scripted abort")), (rest, sent)));
                }
            }
            if stall_after.is_some_and(|limit| sent >= limit) {
                // Stalled: the body neither continues nor ends (until the peer gives up).
                std::future::pending::<()>().await;
            }
            let Some(mut piece) = rest.next() else {
                if !end_delay.is_zero() {
                    tokio::time::sleep(end_delay).await;
                }
                return None;
            };
            if let Some(limit) = stall_after {
                if sent + piece.len() > limit {
                    piece = piece.slice(..limit - sent);
                }
            }
            if let Some(limit) = abort_after {
                if sent + piece.len() > limit {
                    piece = piece.slice(..limit - sent);
                }
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let sent = sent + piece.len();
            Some((Ok::<Bytes, std::io::Error>(piece), (rest, sent)))
        },
    );
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Body::from_stream(body_stream))
        .unwrap_or_default()
}
