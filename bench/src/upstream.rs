//! The bench's LLM upstream: as fast as a loopback HTTP/1.1 server can be, so proxy costs
//! dominate. `POST` with `"stream":true` in the body gets the synthetic stream (one
//! chunked-encoding frame per SSE event, each flushed on its own as a provider does);
//! any other `POST` gets the non-streamed body; `GET /callout` answers a tiny JSON (the
//! target of the baseline filter's callout). Runs on its own single-threaded runtime.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::stream::{openai_json_body, openai_stream_events};

/// Content chunks of the streamed answer and tokens per chunk (300 output tokens).
pub const STREAM_CHUNKS: usize = 100;
pub const TOKENS_PER_CHUNK: usize = 3;
/// Output tokens of the non-streamed answer.
pub const JSON_TOKENS: usize = 300;

struct Canned {
    events: Vec<Bytes>,
    json: Bytes,
    callout: Bytes,
}

/// A running upstream; stops when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicU64>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    pub fn start() -> Result<Upstream> {
        let canned = Arc::new(Canned {
            events: openai_stream_events(STREAM_CHUNKS, TOKENS_PER_CHUNK)
                .into_iter()
                .map(Bytes::from)
                .collect(),
            json: Bytes::from(openai_json_body(JSON_TOKENS)),
            callout: Bytes::from_static(br#"{"ok":true}"#),
        });
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("bind the bench upstream")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let (shutdown, mut shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let counter = requests.clone();
        let thread = std::thread::Builder::new()
            .name("bench-upstream".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        eprintln!("bench upstream: no runtime: {e}");
                        return;
                    }
                };
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                        eprintln!("bench upstream: cannot adopt its listener");
                        return;
                    };
                    loop {
                        tokio::select! {
                            _ = &mut shutdown_rx => break,
                            accepted = listener.accept() => {
                                let Ok((socket, _)) = accepted else { continue };
                                let _ = socket.set_nodelay(true);
                                let canned = canned.clone();
                                let counter = counter.clone();
                                tokio::spawn(async move {
                                    let service = service_fn(move |request| {
                                        counter.fetch_add(1, Ordering::Relaxed);
                                        answer(request, canned.clone())
                                    });
                                    let _ = http1::Builder::new()
                                        .serve_connection(TokioIo::new(socket), service)
                                        .await;
                                });
                            }
                        }
                    }
                });
            })
            .context("spawn the bench upstream thread")?;
        Ok(Upstream {
            addr,
            requests,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn answer(
    request: Request<Incoming>,
    canned: Arc<Canned>,
) -> Result<Response<CannedBody>, Infallible> {
    let is_get = request.method() == hyper::Method::GET;
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let (content_type, body) = if is_get {
        (
            "application/json",
            CannedBody::whole(canned.callout.clone()),
        )
    } else if asks_to_stream(&body) {
        ("text/event-stream", CannedBody::events(canned))
    } else {
        ("application/json", CannedBody::whole(canned.json.clone()))
    };
    let response = Response::builder()
        .header("content-type", content_type)
        .body(body);
    Ok(response.unwrap_or_else(|_| Response::new(CannedBody::whole(Bytes::new()))))
}

/// `"stream":true` (with or without a space) anywhere in the request body.
fn asks_to_stream(body: &[u8]) -> bool {
    let compact = body.windows(13).any(|w| w == br#""stream":true"#);
    compact || body.windows(14).any(|w| w == br#""stream": true"#)
}

/// A whole body, or the canned events one frame at a time with a yield between frames, so
/// hyper flushes each event in its own write (the way a provider's token stream arrives).
pub struct CannedBody {
    whole: Option<Bytes>,
    canned: Option<Arc<Canned>>,
    next: usize,
    yielded: bool,
}

impl CannedBody {
    fn whole(bytes: Bytes) -> CannedBody {
        CannedBody {
            whole: Some(bytes),
            canned: None,
            next: 0,
            yielded: false,
        }
    }

    fn events(canned: Arc<Canned>) -> CannedBody {
        CannedBody {
            whole: None,
            canned: Some(canned),
            next: 0,
            yielded: true,
        }
    }
}

impl Body for CannedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(whole) = self.whole.take() {
            return Poll::Ready(Some(Ok(Frame::data(whole))));
        }
        let Some(canned) = self.canned.clone() else {
            return Poll::Ready(None);
        };
        let Some(event) = canned.events.get(self.next) else {
            return Poll::Ready(None);
        };
        if !self.yielded {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.yielded = false;
        self.next += 1;
        Poll::Ready(Some(Ok(Frame::data(event.clone()))))
    }

    fn is_end_stream(&self) -> bool {
        self.whole.is_none()
            && self
                .canned
                .as_ref()
                .is_none_or(|c| self.next >= c.events.len())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.whole {
            Some(whole) => SizeHint::with_exact(whole.len() as u64),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_flag_is_found_in_both_spellings() {
        assert!(asks_to_stream(br#"{"model":"m","stream":true}"#));
        assert!(asks_to_stream(br#"{"stream": true}"#));
        assert!(!asks_to_stream(br#"{"stream":false}"#));
    }

    #[test]
    fn serves_json_stream_and_callout() {
        let upstream = Upstream::start().expect("start");
        let port = upstream.port();
        let post = |body: &str| {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
            let req = format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            s.write_all(req.as_bytes()).expect("write");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("read");
            out
        };
        let json = post(r#"{"stream":false}"#);
        assert!(json.starts_with("HTTP/1.1 200"), "{json}");
        assert!(json.contains(r#""completion_tokens":300"#));
        let sse = post(r#"{"stream":true}"#);
        assert!(sse.contains("text/event-stream"));
        assert!(sse.contains("data: [DONE]"));
        assert_eq!(
            sse.matches("chat.completion.chunk").count(),
            STREAM_CHUNKS + 2
        );
        assert_eq!(crate::procs::http_status(port, "/callout"), Some(200));
        assert_eq!(upstream.requests.load(Ordering::Relaxed), 3);
    }
}
