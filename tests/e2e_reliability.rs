//! Faults, hostile input and configuration changes through the real Envoy, filter and
//! sidecar: a sidecar slower than the filter's timeout, an upstream that stalls or sends
//! garbage, clients that leave at every point of a call, a listener reload and an Envoy hot
//! restart under load, forged identity headers, absurd requests and replayed settlements.
//! After each, every call is settled or voided exactly once and no hold is left.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use llm_meter_e2e::admin::num;
use llm_meter_e2e::procs::{EnvoyOptions, FilterOptions, SHARED_SECRET};
use llm_meter_e2e::stack::{Stack, StackOptions};
use llm_meter_protocol::{Caller, Outcome, SettleRequest, Usage, HEADER_SECRET, PATH_SETTLE};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MODEL: &str = "m-e2e";
/// 21 input + 8 output tokens, with usage and `[DONE]`.
const SMALL_STREAM: &str = "openai_chat_crlf_nospace_usage.sse";

/// A chat body. Streams ask for usage themselves, so the filter injects and strips nothing
/// and the client must receive the upstream's bytes unchanged.
fn chat(stream: bool) -> Value {
    let mut body = json!({
        "model": MODEL,
        "stream": stream,
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "hello there"}],
    });
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

async fn started(label: &str, options: StackOptions, users: &[&str]) -> Stack {
    let stack = Stack::start_opts(label, options).await;
    stack.seed_priced_model(MODEL, "0.002", "0.006").await;
    for user in users {
        stack
            .admin
            .grant(user, "text_token", 1_000_000, &format!("grant-{user}"))
            .await;
    }
    stack
}

fn short_ttl() -> Vec<(String, String)> {
    vec![
        ("METER_HOLD_TTL_SECS".into(), "3".into()),
        ("METER_SWEEP_INTERVAL_SECS".into(), "1".into()),
    ]
}

/// Poll until `user` holds nothing (holds may legitimately wait for their TTL), then return
/// the quota view.
async fn wait_nothing_held(stack: &Stack, user: &str, limit: Duration) -> Value {
    let start = Instant::now();
    loop {
        let quota = stack.admin.quota(user, "text_token").await;
        if num(&quota, "held") == 0 {
            return quota;
        }
        assert!(
            start.elapsed() < limit,
            "{user} still holds quota after {limit:?}: {quota}\nsidecar log:\n{}",
            stack.sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn assert_reconcile_clean(stack: &Stack) {
    let reconcile = stack
        .admin
        .must_post("/admin/v1/reconcile", json!({}))
        .await;
    assert_eq!(reconcile["clean"], true, "{reconcile}");
}

/// No request id appears twice among `records` (settled or voided exactly once).
fn assert_once_each(records: &[Value]) {
    let mut ids: Vec<&str> = records
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    ids.sort_unstable();
    let before = ids.len();
    ids.dedup();
    assert_eq!(
        before,
        ids.len(),
        "a request id recorded twice: {records:?}"
    );
}

/// Settlement is asynchronous: wait, then make sure no late duplicate shows up.
async fn settled_records(stack: &Stack, user: &str, n: usize) -> Vec<Value> {
    stack.wait_for_usage(user, n).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let records = stack.admin.usage_of(user).await;
    assert_eq!(
        records.len(),
        n,
        "exactly {n} records for {user}: {records:?}"
    );
    assert_once_each(&records);
    records
}

fn slow_sidecar(failure_mode: &'static str) -> StackOptions {
    StackOptions {
        filter: FilterOptions {
            failure_mode,
            timeout_ms: 500,
            ..FilterOptions::default()
        },
        sidecar_env: short_ttl(),
        slow_sidecar_proxy: true,
        ..StackOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sidecar_with_fail_closed_answers_503_within_the_timeout() {
    let stack = started("slow-closed", slow_sidecar("fail_closed"), &["sam"]).await;
    let proxy = stack.sidecar_proxy.as_ref().expect("proxy");
    proxy.set_delay(Duration::from_millis(1500));

    let start = Instant::now();
    let reply = stack
        .call("/v1/chat/completions", Some("sam"), &chat(false), &[])
        .await;
    let waited = start.elapsed();
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(
        waited < Duration::from_millis(1400),
        "answered within the filter's timeout, not the sidecar's pace: {waited:?}"
    );
    assert_eq!(stack.upstream.request_count(), 0, "nothing forwarded");
    proxy.set_delay(Duration::ZERO);

    // The late authorize still reaches the sidecar and makes a hold nobody will settle (the
    // filter answered 503 and forgot the call): it is released by the hold TTL.
    let quota = wait_nothing_held(&stack, "sam", Duration::from_secs(10)).await;
    assert_eq!(num(&quota, "used"), 0, "{quota}");
    let records = stack.admin.usage_of("sam").await;
    assert!(records.len() <= 1, "{records:?}");
    for record in &records {
        assert_eq!(record["status"], "expired", "{record}");
        assert_eq!(num(record, "units"), 0, "{record}");
    }
    // The sidecar answers at its normal pace again: calls go through.
    let reply = stack
        .call("/v1/chat/completions", Some("sam"), &chat(false), &[])
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_reconcile_clean(&stack).await;
}

/// Regression: the fail-open settlement (or its retry) may reach the sidecar before the
/// late authorize of the same call. That authorize used to create a hold for the settled
/// request whose expiry failed on every sweep and stopped it; it now holds nothing, and
/// a hold that cannot be expired no longer stops the sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sidecar_with_fail_open_forwards_and_settles_exactly_once() {
    let stack = started("slow-open", slow_sidecar("fail_open"), &["tess", "uma"]).await;
    let proxy = stack.sidecar_proxy.as_ref().expect("proxy");

    // 1. The settlement is sent while the sidecar is still slow: it lands after the late
    //    authorize, settling against that hold.
    proxy.set_delay(Duration::from_millis(1500));
    let script = [("x-script-fixture", SMALL_STREAM)];
    let start = Instant::now();
    let reply = stack
        .call("/v1/chat/completions", Some("tess"), &chat(true), &script)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        start.elapsed() < Duration::from_millis(1400),
        "forwarded after the timeout"
    );

    // 2. The sidecar recovers before the settlement is sent: the fail-open settlement can
    //    overtake the late authorize of the same call.
    let reply = stack
        .call("/v1/chat/completions", Some("uma"), &chat(true), &script)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    proxy.set_delay(Duration::ZERO);

    for user in ["tess", "uma"] {
        let records = settled_records(&stack, user, 1).await;
        assert_eq!(records[0]["status"], "settled", "{}", records[0]);
        assert_eq!(num(&records[0], "input_tokens"), 21, "{}", records[0]);
        assert_eq!(num(&records[0], "output_tokens"), 8, "{}", records[0]);
        // A hold made by a late authorize ends with the TTL at most; nothing is charged twice.
        let quota = wait_nothing_held(&stack, user, Duration::from_secs(10)).await;
        assert_eq!(num(&quota, "used"), 29, "{user}: {quota}");
        // After the TTL sweep, still exactly one record.
        let records = stack.admin.usage_of(user).await;
        assert_eq!(records.len(), 1, "{user}: {records:?}");
        assert_eq!(records[0]["status"], "settled", "{}", records[0]);
    }
    assert_reconcile_clean(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_stalling_mid_stream_is_cut_and_settled_partial() {
    let options = StackOptions {
        envoy: EnvoyOptions {
            idle_timeout_ms: Some(1000),
            ..EnvoyOptions::default()
        },
        ..StackOptions::default()
    };
    let stack = started("stall", options, &["vera"]).await;
    let fixture = "moonshot_stream_choice_usage.sse";
    let response = stack
        .http
        .post(stack.envoy.url("/v1/chat/completions"))
        .header("x-user-id", "vera")
        .header("x-script-fixture", fixture)
        .header("x-script-chunk-bytes", "100")
        .header("x-script-stall-after-bytes", "400")
        .json(&chat(true))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 200);
    let start = Instant::now();
    let mut received = Vec::new();
    let mut body = response.bytes_stream();
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout(Duration::from_secs(10), body.next()).await
    {
        received.extend_from_slice(&chunk);
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "the idle timeout cut the stream"
    );
    let whole = std::fs::read(llm_meter_e2e::fixtures::locate(fixture).expect("fixture"))
        .expect("read fixture");
    assert_eq!(received, whole[..400], "the bytes seen before the stall");

    let records = settled_records(&stack, "vera", 1).await;
    let record = &records[0];
    assert_eq!(record["status"], "settled", "{record}");
    assert_eq!(record["partial"], true, "{record}");
    assert_eq!(record["estimated"], true, "{record}");
    assert!(
        num(record, "output_tokens") > 0,
        "output seen is billed: {record}"
    );
    let quota = wait_nothing_held(&stack, "vera", Duration::from_secs(2)).await;
    assert_eq!(num(&quota, "used"), num(record, "units"), "{quota}");
    assert_reconcile_clean(&stack).await;
}

/// Hostile bodies an upstream (or something impersonating one) might send.
fn garbage_bodies() -> Vec<(&'static str, Vec<u8>)> {
    // A fixed xorshift so a failure reproduces.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect()
    };
    let mut invalid_json = Vec::new();
    for i in 0..200 {
        invalid_json.extend_from_slice(
            format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"x{i}\"}}\n\n").as_bytes(),
        );
        invalid_json.extend_from_slice(b"data: {\"usage\": [1,2,\n\nevent: \xff\xfe\n\n");
    }
    invalid_json.extend_from_slice(b"data: [DONE]\n\n");
    let mut huge_line = b"data: {\"choices\":[{\"delta\":{\"content\":\"".to_vec();
    huge_line.extend(std::iter::repeat_n(b'a', 3 * 1024 * 1024));
    huge_line.extend_from_slice(b"\"}}]}\n\ndata: [DONE]\n\n");
    let mut deep = b"data: ".to_vec();
    deep.extend(std::iter::repeat_n(b'[', 200_000));
    deep.extend_from_slice(b"\n\n");
    let mut framed_random = Vec::new();
    for _ in 0..100 {
        framed_random.extend_from_slice(b"data: ");
        framed_random.extend(random(300));
        framed_random.extend_from_slice(b"\n\n");
    }
    vec![
        ("random-bytes", random(64 * 1024)),
        ("invalid-json-events", invalid_json),
        ("huge-line", huge_line),
        ("deep-nesting", deep),
        ("framed-random", framed_random),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_sse_passes_unchanged_and_is_settled_estimated() {
    let stack = started("garbage", StackOptions::default(), &["walt"]).await;
    let bodies = garbage_bodies();
    for (name, bytes) in &bodies {
        stack
            .upstream
            .register_body(name, "text/event-stream", bytes.clone());
    }
    let mut calls = 0;
    for (name, bytes) in &bodies {
        for chunk in ["1000000000", "7"] {
            if *chunk == *"7" && bytes.len() > 100_000 {
                continue; // byte-sized chunks of megabytes only test patience
            }
            let reply = stack
                .call(
                    "/v1/chat/completions",
                    Some("walt"),
                    &chat(true),
                    &[("x-script-body", name), ("x-script-chunk-bytes", chunk)],
                )
                .await;
            calls += 1;
            assert_eq!(reply.status, 200, "{name}");
            assert!(
                reply.body == *bytes,
                "{name}: the client receives the upstream's bytes unchanged ({} vs {} bytes)",
                reply.body.len(),
                bytes.len()
            );
            // The filter (its VM) still serves the next, ordinary call.
            let reply = stack
                .call(
                    "/v1/chat/completions",
                    Some("walt"),
                    &chat(true),
                    &[("x-script-fixture", SMALL_STREAM)],
                )
                .await;
            calls += 1;
            assert_eq!(reply.status, 200, "after {name}: {}", reply.text());
        }
    }
    let records = settled_records(&stack, "walt", calls).await;
    let garbage: Vec<&Value> = records
        .iter()
        .filter(|r| num(r, "input_tokens") != 21 || num(r, "output_tokens") != 8)
        .collect();
    assert_eq!(garbage.len(), calls / 2, "{records:?}");
    for record in garbage {
        assert_eq!(record["status"], "settled", "{record}");
        assert_eq!(record["estimated"], true, "{record}");
    }
    let log = stack.envoy.log();
    assert!(
        !log.contains("panicked") && !log.contains("wasm trap"),
        "the filter must not crash: {log}"
    );
    wait_nothing_held(&stack, "walt", Duration::from_secs(2)).await;
    assert_reconcile_clean(&stack).await;
}

/// Raw HTTP/1.1 request bytes for a chat call.
fn raw_request(
    user: &str,
    body: &[u8],
    declared_length: usize,
    script: &[(&str, &str)],
) -> Vec<u8> {
    let mut head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: llm\r\ncontent-type: application/json\r\n\
         x-user-id: {user}\r\ncontent-length: {declared_length}\r\n"
    );
    for (name, value) in script {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Open a connection, send `bytes`, optionally read until `read_until` bytes arrived, then
/// go away (close the socket).
async fn send_and_leave(port: u16, bytes: &[u8], linger: Duration, read_until: usize) {
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect envoy");
    socket.write_all(bytes).await.expect("write");
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 8192];
    while received.len() < read_until {
        match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => received.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    tokio::time::sleep(linger).await;
    drop(socket);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_leaving_at_every_point_are_settled_or_voided_once() {
    let options = StackOptions {
        sidecar_env: short_ttl(),
        slow_sidecar_proxy: true,
        ..StackOptions::default()
    };
    let users = ["p-body", "p-auth", "p-wait", "p-headers", "p-mid", "p-end"];
    let stack = started("leave", options, &users).await;
    let port = stack.envoy.port;
    let body = serde_json::to_vec(&chat(true)).expect("body");
    let fixture = std::fs::read(llm_meter_e2e::fixtures::locate(SMALL_STREAM).expect("fixture"))
        .expect("read fixture");

    // 1. Before the request body is complete: nothing was asked, nothing forwarded.
    let partial_body = raw_request("p-body", &body[..body.len() / 2], body.len(), &[]);
    send_and_leave(port, &partial_body, Duration::from_millis(300), 0).await;

    // 2. While the sidecar is deciding (it is slow): the filter voids what it may hold.
    let proxy = stack.sidecar_proxy.as_ref().expect("proxy");
    proxy.set_delay(Duration::from_millis(1000));
    let whole = raw_request(
        "p-auth",
        &body,
        body.len(),
        &[("x-script-fixture", SMALL_STREAM)],
    );
    send_and_leave(port, &whole, Duration::from_millis(300), 0).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    proxy.set_delay(Duration::ZERO);
    let forwarded_so_far = stack.upstream.request_count();
    assert_eq!(forwarded_so_far, 0, "neither call reached the upstream");

    // 3. Forwarded, before the response headers.
    let script = [
        ("x-script-fixture", SMALL_STREAM),
        ("x-script-headers-delay-ms", "1500"),
    ];
    let request = raw_request("p-wait", &body, body.len(), &script);
    send_and_leave(port, &request, Duration::from_millis(500), 0).await;

    // 4. After the response headers, before any body byte.
    let script = [
        ("x-script-fixture", SMALL_STREAM),
        ("x-script-chunk-bytes", "200"),
        ("x-script-delay-ms", "1500"),
    ];
    let request = raw_request("p-headers", &body, body.len(), &script);
    send_and_leave(port, &request, Duration::ZERO, 12).await;

    // 5. Mid-stream.
    let script = [
        ("x-script-fixture", SMALL_STREAM),
        ("x-script-chunk-bytes", "300"),
        ("x-script-delay-ms", "300"),
    ];
    let request = raw_request("p-mid", &body, body.len(), &script);
    send_and_leave(port, &request, Duration::from_millis(400), 200).await;

    // 6. Right at the end: every byte received, the end of the body not yet.
    let script = [
        ("x-script-fixture", SMALL_STREAM),
        ("x-script-end-delay-ms", "1500"),
    ];
    let request = raw_request("p-end", &body, body.len(), &script);
    // Response head (~150 bytes) + chunk framing + the whole fixture.
    send_and_leave(
        port,
        &request,
        Duration::from_millis(300),
        fixture.len() + 100,
    )
    .await;

    // Every call ends exactly once and nothing stays held (the TTL is 3 s; only the call
    // that left during authorize may need it, when its void overtakes the late authorize).
    for user in users {
        wait_nothing_held(&stack, user, Duration::from_secs(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let record_of = |records: Vec<Value>| records.into_iter().next();
    assert!(
        stack.admin.usage_of("p-body").await.is_empty(),
        "nothing to settle"
    );
    let auth = stack.admin.usage_of("p-auth").await;
    assert!(auth.len() <= 1, "{auth:?}");
    for record in &auth {
        assert!(
            record["status"] == "voided" || record["status"] == "expired",
            "{record}"
        );
    }
    assert_eq!(
        num(&stack.admin.quota("p-auth", "text_token").await, "used"),
        0
    );
    for (user, output) in [
        ("p-wait", None),
        ("p-headers", None),
        ("p-mid", None),
        ("p-end", Some(8)),
    ] {
        let records = settled_records(&stack, user, 1).await;
        let record = record_of(records).expect("record");
        assert_eq!(record["status"], "settled", "{user}: {record}");
        assert_eq!(record["partial"], true, "{user}: {record}");
        assert!(num(&record, "input_tokens") > 0, "{user}: {record}");
        if let Some(output) = output {
            assert_eq!(num(&record, "output_tokens"), output, "{user}: {record}");
            assert_eq!(num(&record, "input_tokens"), 21, "{user}: {record}");
        }
        let quota = stack.admin.quota(user, "text_token").await;
        assert_eq!(
            num(&quota, "used"),
            num(&record, "units"),
            "{user}: {quota}"
        );
    }
    assert_reconcile_clean(&stack).await;
}

/// Launch `n` slow streams for `user` through `url`; each task returns the HTTP status (0
/// when the connection failed).
fn launch_streams(
    stack: &Stack,
    url: String,
    user: &'static str,
    n: usize,
) -> Vec<tokio::task::JoinHandle<u16>> {
    // A connection per call: a pooled one may be closed by a draining Envoy just as it is
    // reused, which would be a client artefact rather than a lost call.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let _ = stack;
    (0..n)
        .map(|_| {
            let http = http.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let response = http
                    .post(url)
                    .header("x-user-id", user)
                    .header("x-script-fixture", SMALL_STREAM)
                    .header("x-script-chunk-bytes", "100")
                    .header("x-script-delay-ms", "150")
                    .json(&chat(true))
                    .send()
                    .await;
                match response {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        match response.bytes().await {
                            Ok(_) => status,
                            Err(_) => 0,
                        }
                    }
                    Err(_) => 0,
                }
            })
        })
        .collect()
}

async fn all_ok(streams: Vec<tokio::task::JoinHandle<u16>>) -> usize {
    let mut ok = 0;
    for stream in streams {
        let status = stream.await.expect("task");
        assert_eq!(status, 200, "every stream completes");
        ok += 1;
    }
    ok
}

/// A listener reload (file LDS) while streams are in flight, with the sidecar down during
/// the drain: the old plugin's outbox is kept until it delivered everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_reload_under_load_loses_no_settlement() {
    let options = StackOptions {
        envoy: EnvoyOptions {
            file_lds: true,
            drain_time_s: Some(2),
            ..EnvoyOptions::default()
        },
        ..StackOptions::default()
    };
    let mut stack = started("reload", options, &["xena"]).await;
    let url = stack.envoy.url("/v1/chat/completions");
    let before = launch_streams(&stack, url.clone(), "xena", 20);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A changed filter configuration: new filter chains, the old ones drain.
    let reloaded = FilterOptions {
        settle_retry_max_ms: 800,
        ..FilterOptions::default()
    };
    stack.envoy.reload(&reloaded);
    // The sidecar goes away while the old chains finish and their plugin is torn down.
    stack.sidecar.kill();
    let done = all_ok(before).await;
    tokio::time::sleep(Duration::from_secs(4)).await; // past the drain: old plugin gone
    stack.sidecar.restart();

    let after = launch_streams(&stack, url, "xena", 10);
    let done = done + all_ok(after).await;
    let records = settled_records(&stack, "xena", done).await;
    for record in &records {
        assert_eq!(record["status"], "settled", "{record}");
        assert_eq!(num(record, "units"), 29, "{record}");
    }
    let quota = wait_nothing_held(&stack, "xena", Duration::from_secs(2)).await;
    assert_eq!(num(&quota, "used"), 29 * done as i64, "{quota}");
    assert_reconcile_clean(&stack).await;
}

/// A base id of its own per test process, so parallel runs never share Envoy's shared memory.
fn base_id() -> u32 {
    10_000 + std::process::id() % 50_000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_hot_restart_under_load_loses_no_settlement() {
    let options = StackOptions {
        envoy: EnvoyOptions {
            hot_restart_base_id: Some(base_id()),
            drain_time_s: Some(3),
            ..EnvoyOptions::default()
        },
        ..StackOptions::default()
    };
    let mut stack = started("hot-restart", options, &["yuri"]).await;
    let url = stack.envoy.url("/v1/chat/completions");
    let before = launch_streams(&stack, url.clone(), "yuri", 20);
    tokio::time::sleep(Duration::from_millis(500)).await;

    stack.envoy.hot_restart();
    let during = launch_streams(&stack, url.clone(), "yuri", 10);
    let done = all_ok(before).await + all_ok(during).await;
    let start = Instant::now();
    while !stack.envoy.parents_exited() {
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "the parent exits"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = launch_streams(&stack, url, "yuri", 5);
    let done = done + all_ok(after).await;

    let records = settled_records(&stack, "yuri", done).await;
    for record in &records {
        assert_eq!(record["status"], "settled", "{record}");
        assert_eq!(num(record, "units"), 29, "{record}");
    }
    let quota = wait_nothing_held(&stack, "yuri", Duration::from_secs(2)).await;
    assert_eq!(num(&quota, "used"), 29 * done as i64, "{quota}");
    assert_reconcile_clean(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_identity_from_outside_cannot_bill_another_user() {
    let options = StackOptions {
        envoy: EnvoyOptions {
            external_listener: true,
            ..EnvoyOptions::default()
        },
        ..StackOptions::default()
    };
    let stack = started("forged", options, &["victim", "mallory"]).await;
    let issued = stack
        .admin
        .must_post(
            "/admin/v1/api-keys",
            json!({"user_id": "mallory", "name": "e2e"}),
        )
        .await;
    let key = issued["key"].as_str().expect("key").to_string();
    let external = stack.envoy.external_url("/v1/chat/completions");

    // Only a forged user header: stripped at the edge, so the caller is unidentified.
    let response = stack
        .http
        .post(&external)
        .header("x-user-id", "victim")
        .json(&chat(false))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 401);
    assert_eq!(stack.upstream.request_count(), 0);

    // A forged user header next to the caller's own key: the key decides who pays.
    let response = stack
        .http
        .post(&external)
        .header("x-user-id", "victim")
        .header("x-api-key", &key)
        .json(&chat(false))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 200);
    let seen = stack.upstream.requests();
    assert!(
        seen[0].headers.get("x-user-id").is_none(),
        "the forged header does not travel on"
    );
    let records = settled_records(&stack, "mallory", 1).await;
    assert_eq!(num(&records[0], "input_tokens"), 5, "{}", records[0]);
    assert!(stack.admin.usage_of("victim").await.is_empty());
    assert_eq!(
        num(&stack.admin.quota("victim", "text_token").await, "used"),
        0
    );

    // Inside the mesh (the internal listener) the same header is trusted: that is why the
    // edge must strip it.
    let reply = stack
        .call("/v1/chat/completions", Some("victim"), &chat(false), &[])
        .await;
    assert_eq!(reply.status, 200);
    settled_records(&stack, "victim", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_clear_errors_and_hold_nothing() {
    let stack = started("hostile", StackOptions::default(), &["zoe"]).await;
    let mut deep = String::from(r#"{"model":"m-e2e","messages":"#);
    deep.push_str(&"[".repeat(100_000));
    deep.push_str(&"]".repeat(100_000));
    deep.push('}');
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("deep JSON", deep.into_bytes()),
        (
            "negative max_tokens",
            br#"{"model":"m-e2e","max_tokens":-1,"messages":[]}"#.to_vec(),
        ),
        (
            "fractional max_tokens",
            br#"{"model":"m-e2e","max_tokens":0.5,"messages":[]}"#.to_vec(),
        ),
        (
            "absurd max_tokens",
            br#"{"model":"m-e2e","max_tokens":1e300,"messages":[]}"#.to_vec(),
        ),
        (
            "max_tokens beyond u64",
            br#"{"model":"m-e2e","max_tokens":99999999999999999999999,"messages":[]}"#.to_vec(),
        ),
        (
            "string max_tokens",
            br#"{"model":"m-e2e","max_tokens":"10","messages":[]}"#.to_vec(),
        ),
        ("not an object", b"[1,2,3]".to_vec()),
        ("no model", br#"{"messages":[]}"#.to_vec()),
    ];
    for (what, body) in cases {
        let response = stack
            .http
            .post(stack.envoy.url("/v1/chat/completions"))
            .header("x-user-id", "zoe")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("send");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        assert_eq!(status, 400, "{what}: {text}");
        let error: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert!(
            error["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: a clear message: {text}"
        );
    }

    // The largest max_tokens the filter accepts is still bounded by the balance: denied.
    let greedy = json!({"model": MODEL, "max_tokens": 1_000_000_000u64, "messages": []});
    let reply = stack
        .call("/v1/chat/completions", Some("zoe"), &greedy, &[])
        .await;
    assert!(
        matches!(reply.status, 400 | 429),
        "{}: {}",
        reply.status,
        reply.text()
    );

    // A huge body (16 MiB, beyond the filter's 1 MiB limit), declared and chunked.
    let huge = vec![b'x'; 16 * 1024 * 1024];
    let response = stack
        .http
        .post(stack.envoy.url("/v1/chat/completions"))
        .header("x-user-id", "zoe")
        .header("content-type", "application/json")
        .body(huge.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 413);
    let stream = futures_util::stream::iter(
        huge.chunks(64 * 1024)
            .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    );
    let response = stack
        .http
        .post(stack.envoy.url("/v1/chat/completions"))
        .header("x-user-id", "zoe")
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await;
    // Envoy may answer 413 and close before reading it all.
    if let Ok(response) = response {
        assert_eq!(response.status().as_u16(), 413);
    }

    assert_eq!(stack.upstream.request_count(), 0, "nothing forwarded");
    let quota = stack.admin.quota_released("zoe", "text_token").await;
    assert_eq!(num(&quota, "held"), 0, "{quota}");
    assert_eq!(num(&quota, "used"), 0, "{quota}");
    // Still serving.
    let reply = stack
        .call("/v1/chat/completions", Some("zoe"), &chat(false), &[])
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_settlement_with_other_figures_is_rejected_and_changes_nothing() {
    let stack = started("replay", StackOptions::default(), &["yves"]).await;
    let reply = stack
        .call(
            "/v1/chat/completions",
            Some("yves"),
            &chat(true),
            &[("x-script-fixture", SMALL_STREAM)],
        )
        .await;
    assert_eq!(reply.status, 200);
    let records = settled_records(&stack, "yves", 1).await;
    let original = records[0].clone();
    let quota_before = stack.admin.quota("yves", "text_token").await;
    let request_id = original["request_id"]
        .as_str()
        .expect("request id")
        .to_string();

    let settle = |input_tokens: u64, cached_input_tokens: u64, output_tokens: u64| SettleRequest {
        request_id: request_id.clone(),
        caller: Caller::UserId("yves".into()),
        provider: "openai".into(),
        model: MODEL.into(),
        outcome: Outcome::Completed,
        usage: Usage {
            input_tokens,
            cached_input_tokens,
            output_tokens,
            ..Usage::default()
        },
        estimated: false,
        authorized: true,
        upstream_status: 200,
        ended_at_ms: None,
        lease_id: None,
        held: 0,
    };
    let http = reqwest::Client::new();
    let url = format!("{}{PATH_SETTLE}", stack.sidecar.base_url());
    let replay = http
        .post(&url)
        .header(HEADER_SECRET, SHARED_SECRET)
        .json(&settle(1, 0, 1))
        .send()
        .await
        .expect("send");
    assert_eq!(
        replay.status().as_u16(),
        409,
        "other figures are a conflict"
    );
    // The identical settlement is an idempotent retry, not a second charge.
    let retry = http
        .post(&url)
        .header(HEADER_SECRET, SHARED_SECRET)
        .json(&settle(21, 16, 8))
        .send()
        .await
        .expect("send");
    let retry_status = retry.status().as_u16();
    let retry_body = retry.text().await.unwrap_or_default();
    assert_eq!(retry_status, 200, "{retry_body}\noriginal: {original}");
    // Without the shared secret, nothing.
    let forged = http
        .post(&url)
        .json(&settle(0, 0, 0))
        .send()
        .await
        .expect("send");
    assert_eq!(forged.status().as_u16(), 401);

    let records = stack.admin.usage_of("yves").await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0], original, "the record is unchanged");
    let quota_after = stack.admin.quota("yves", "text_token").await;
    assert_eq!(quota_after, quota_before, "the balance is unchanged");
    assert_reconcile_clean(&stack).await;
}
