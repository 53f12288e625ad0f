//! Open loop at a fixed rate (wrk2's method): `connections` keep-alive connections, each
//! with its own fixed schedule, so the offered rate does not drop when the server slows.
//! A request whose connection was still busy at its scheduled time is timed from that
//! scheduled time (its queueing counts: no coordinated omission); a request sent on a free
//! connection is timed from the moment it was written (so the runtime's 1 ms timer grain
//! is not counted as server latency). Every response body is read to its end.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Serialize;

use crate::envoy::USER_HEADER;
use crate::stats::quantile;
use crate::stream::chat_request_body;

/// Raw outcome of one open-loop run (runs of one variant are pooled with [`summarize`]).
#[derive(Debug, Clone, Default)]
pub struct OpenLoopSamples {
    pub target_rate: f64,
    pub seconds: f64,
    pub latencies_us: Vec<u64>,
    pub failed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OpenLoop {
    pub target_rate: f64,
    pub achieved_rate: f64,
    pub ok: u64,
    pub failed: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// A request not answered by then counts as failed (and its connection is replaced).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
pub struct OpenLoopPlan {
    pub port: u16,
    pub stream: bool,
    pub users: usize,
    pub rate: f64,
    pub seconds: f64,
    pub connections: usize,
}

/// Percentiles over every sample of `runs`.
pub fn summarize(runs: &[OpenLoopSamples]) -> OpenLoop {
    let mut latencies: Vec<u64> = runs
        .iter()
        .flat_map(|r| r.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    let seconds: f64 = runs.iter().map(|r| r.seconds).sum();
    OpenLoop {
        target_rate: runs.first().map_or(0.0, |r| r.target_rate),
        achieved_rate: latencies.len() as f64 / seconds.max(1e-9),
        ok: latencies.len() as u64,
        failed: runs.iter().map(|r| r.failed).sum(),
        p50_us: quantile(&latencies, 0.50),
        p99_us: quantile(&latencies, 0.99),
        p999_us: quantile(&latencies, 0.999),
        max_us: latencies.last().copied().unwrap_or(0),
    }
}

/// Run the plan on a single-threaded runtime of its own (the generator stays on one core).
pub fn run(plan: OpenLoopPlan) -> Result<OpenLoopSamples> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("open-loop runtime")?;
    runtime.block_on(run_async(plan))
}

struct ConnectionOutcome {
    latencies_us: Vec<u64>,
    failed: u64,
}

async fn run_async(plan: OpenLoopPlan) -> Result<OpenLoopSamples> {
    let rate = plan.rate.max(1.0);
    let connections = plan.connections.max(1);
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs_f64(plan.seconds);
    let mut tasks = Vec::with_capacity(connections);
    for c in 0..connections {
        let offset = Duration::from_secs_f64(c as f64 / rate);
        let interval = Duration::from_secs_f64(connections as f64 / rate);
        tasks.push(tokio::spawn(drive_connection(
            plan,
            c,
            start + offset,
            interval,
            end,
        )));
    }
    let mut latencies = Vec::new();
    let mut failed = 0;
    for task in tasks {
        let outcome = task.await.context("open-loop connection task")?;
        latencies.extend(outcome.latencies_us);
        failed += outcome.failed;
    }
    let elapsed = Instant::now()
        .saturating_duration_since(start)
        .as_secs_f64();
    Ok(OpenLoopSamples {
        target_rate: plan.rate,
        seconds: elapsed.max(plan.seconds),
        latencies_us: latencies,
        failed,
    })
}

async fn drive_connection(
    plan: OpenLoopPlan,
    index: usize,
    first: Instant,
    interval: Duration,
    end: Instant,
) -> ConnectionOutcome {
    let body = Bytes::from(chat_request_body(plan.stream, 300));
    let mut outcome = ConnectionOutcome {
        latencies_us: Vec::with_capacity(
            ((end - first).as_secs_f64() / interval.as_secs_f64()) as usize + 1,
        ),
        failed: 0,
    };
    let mut sender = None;
    let mut scheduled = first;
    let mut n = 0usize;
    while scheduled < end {
        let now = Instant::now();
        let timed_from = if now >= scheduled {
            scheduled // the previous call overran this slot: its queueing counts
        } else {
            tokio::time::sleep_until(scheduled.into()).await;
            Instant::now()
        };
        if sender.is_none() {
            sender = connect(plan.port).await.ok();
        }
        let user = format!("bench-user-{}", (index + n * 7919) % plan.users.max(1));
        let ok = match sender.as_mut() {
            Some(s) => {
                tokio::time::timeout(REQUEST_TIMEOUT, send(s, plan.port, &user, body.clone()))
                    .await
                    .unwrap_or(false)
            }
            None => false,
        };
        if ok {
            outcome
                .latencies_us
                .push(timed_from.elapsed().as_micros() as u64);
        } else {
            outcome.failed += 1;
            sender = None;
        }
        n += 1;
        scheduled = first + interval * n as u32;
    }
    outcome
}

type Sender = http1::SendRequest<Full<Bytes>>;

async fn connect(port: u16) -> Result<Sender> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

async fn send(sender: &mut Sender, port: u16, user: &str, body: Bytes) -> bool {
    let request = Request::post("/v1/chat/completions")
        .header("host", format!("127.0.0.1:{port}"))
        .header("content-type", "application/json")
        .header(USER_HEADER, user)
        .body(Full::new(body));
    let Ok(request) = request else {
        return false;
    };
    if sender.ready().await.is_err() {
        return false;
    }
    let Ok(response) = sender.send_request(request).await else {
        return false;
    };
    let status = response.status();
    let complete = response.into_body().collect().await.is_ok();
    complete && status.is_success()
}
