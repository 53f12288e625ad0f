//! Soak: a steady rate of mixed streaming and non-streaming calls from many users through
//! the real Envoy, filter and sidecar, with random client aborts and the sidecar SIGKILLed
//! and restarted periodically; afterwards the ledger must reconcile:
//!
//! - per user, the usage records' charges equal the quota used, their debt the recorded
//!   debt, and charge + debt = units;
//! - no balance is negative (remaining >= 0); an overrun shows as recorded debt only;
//! - no hold is left once the hold TTL has passed;
//! - the daily cost report equals the sum of the records' costs, per user and in total;
//! - every call the client saw complete with 200 is settled, no request id twice;
//! - the sidecar's own reconcile finds no drift.
//!
//! `soak_short` (20 s, 50 users) runs with the suite; `soak_long` (`make soak`: SOAK_SECONDS,
//! default 600, SOAK_USERS default 1000, SOAK_RPS default 40) is ignored by default and
//! writes its figures into BENCHMARKS.md when SOAK_REPORT names that file.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llm_meter_e2e::admin::num;
use llm_meter_e2e::procs::FilterOptions;
use llm_meter_e2e::stack::{Stack, StackOptions};
use serde_json::{json, Value};

const MODEL: &str = "m-soak";
const HOLD_TTL_SECS: u64 = 8;

struct SoakConfig {
    seconds: u64,
    users: usize,
    rps: u64,
    restart_every: Duration,
    seed: u64,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_short() {
    let figures = run_soak(SoakConfig {
        seconds: 20,
        users: 50,
        rps: 15,
        restart_every: Duration::from_secs(7),
        seed: 7,
    })
    .await;
    println!("{}", figures.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "10 minutes: run by `make soak`"]
async fn soak_long() {
    let seconds = env_u64("SOAK_SECONDS", 600);
    let figures = run_soak(SoakConfig {
        seconds,
        users: env_u64("SOAK_USERS", 1000) as usize,
        rps: env_u64("SOAK_RPS", 40),
        restart_every: Duration::from_secs(env_u64("SOAK_RESTART_SECS", 60)),
        seed: env_u64("SOAK_SEED", 20_251_125),
    })
    .await;
    println!("{}", figures.table());
    if let Ok(path) = std::env::var("SOAK_REPORT") {
        write_report(std::path::Path::new(&path), &figures);
    }
}

/// xorshift64*: reproducible from the seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One call's plan, drawn at random.
struct Plan {
    user: String,
    stream: bool,
    /// Sometimes below the real output: the call overruns its hold (debt when broke).
    max_tokens: u64,
    script: Vec<(&'static str, String)>,
    /// Drop the call after this long (a client abort), if set.
    abort_after: Option<Duration>,
}

const STREAM_FIXTURES: &[&str] = &[
    "openai_chat_crlf_nospace_usage.sse",
    "moonshot_stream_choice_usage.sse",
    "openai_chat_no_usage_cjk_tools.sse",
    "openai_chat_truncated_no_terminal.sse",
];

fn draw(rng: &mut Rng, users: usize) -> Plan {
    let user = format!("soak-{:04}", rng.below(users as u64));
    let stream = rng.below(100) < 60;
    let max_tokens = if rng.below(100) < 10 { 2 } else { 300 };
    let mut script = Vec::new();
    if stream {
        let fixture = STREAM_FIXTURES[rng.below(STREAM_FIXTURES.len() as u64) as usize];
        script.push(("x-script-fixture", fixture.to_string()));
        script.push(("x-script-chunk-bytes", (50 + rng.below(300)).to_string()));
        script.push(("x-script-delay-ms", (5 + rng.below(60)).to_string()));
    } else if rng.below(100) < 5 {
        script.push(("x-script-status", "500".to_string()));
    }
    let abort_after = (rng.below(100) < 10).then(|| Duration::from_millis(20 + rng.below(600)));
    Plan {
        user,
        stream,
        max_tokens,
        script,
        abort_after,
    }
}

#[derive(Default)]
struct ClientTally {
    statuses: HashMap<u16, u64>,
    aborted: u64,
    failed: u64,
    /// Completed 200 calls: must each be settled.
    completed_ok: u64,
    latencies_ms: Vec<u64>,
}

struct Figures {
    seconds: u64,
    users: usize,
    target_rps: u64,
    requests: u64,
    shed: u64,
    client: ClientTally,
    restarts: u64,
    records: usize,
    settled: usize,
    voided: usize,
    expired: usize,
    partial: usize,
    estimated: usize,
    debt_users: usize,
    units: i64,
    cost_micros: i64,
    settle_wait_s: f64,
}

impl Figures {
    fn percentile(&self, p: f64) -> u64 {
        let mut sorted = self.client.latencies_ms.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return 0;
        }
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[index.min(sorted.len() - 1)]
    }

    fn table(&self) -> String {
        let mut statuses: Vec<_> = self.client.statuses.iter().collect();
        statuses.sort();
        let statuses: Vec<String> = statuses.iter().map(|(s, n)| format!("{s}: {n}")).collect();
        let rows = [
            ("duration", format!("{} s", self.seconds)),
            ("users", self.users.to_string()),
            ("requests sent", self.requests.to_string()),
            (
                "rate",
                format!(
                    "{:.1} req/s (target {})",
                    self.requests as f64 / self.seconds.max(1) as f64,
                    self.target_rps
                ),
            ),
            ("shed (concurrency cap)", self.shed.to_string()),
            ("client statuses", statuses.join(", ")),
            ("client aborts", self.client.aborted.to_string()),
            ("connection failures", self.client.failed.to_string()),
            ("sidecar SIGKILL + restarts", self.restarts.to_string()),
            ("usage records", self.records.to_string()),
            ("settled", self.settled.to_string()),
            ("voided", self.voided.to_string()),
            ("expired holds", self.expired.to_string()),
            ("partial", self.partial.to_string()),
            ("estimated", self.estimated.to_string()),
            ("users with debt", self.debt_users.to_string()),
            ("units charged", self.units.to_string()),
            ("cost", format!("{} CNY", format_micros(self.cost_micros))),
            (
                "latency p50 / p99",
                format!("{} ms / {} ms", self.percentile(0.5), self.percentile(0.99)),
            ),
            (
                "time until settled and no hold",
                format!("{:.1} s", self.settle_wait_s),
            ),
            (
                "reconcile",
                "clean: records = quota used, no negative balance, no hold, cost report = records"
                    .into(),
            ),
        ];
        let mut out = String::from("| figure | value |\n|---|---|\n");
        for (name, value) in rows {
            out.push_str(&format!("| {name} | {value} |\n"));
        }
        out
    }
}

async fn run_soak(config: SoakConfig) -> Figures {
    let options = StackOptions {
        filter: FilterOptions {
            timeout_ms: 1000,
            ..FilterOptions::default()
        },
        sidecar_env: vec![
            ("METER_HOLD_TTL_SECS".into(), HOLD_TTL_SECS.to_string()),
            ("METER_SWEEP_INTERVAL_SECS".into(), "1".into()),
            ("RUST_LOG".into(), "warn".into()),
        ],
        ..StackOptions::default()
    };
    let stack = Stack::start_opts("soak", options).await;
    stack.seed_priced_model(MODEL, "0.002", "0.006").await;
    let mut rng = Rng(config.seed | 1);
    for i in 0..config.users {
        // One user in twenty gets little: denials and overruns (debt) happen too.
        let amount = if rng.below(20) == 0 { 400 } else { 10_000_000 };
        stack
            .admin
            .grant(
                &format!("soak-{i:04}"),
                "text_token",
                amount,
                &format!("soak-grant-{i}"),
            )
            .await;
    }
    let url = stack.envoy.url("/v1/chat/completions");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        .build()
        .expect("client");
    let stack = Arc::new(tokio::sync::Mutex::new(stack));

    let restarts = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(config.seconds);
    let restarter = {
        let (stack, restarts) = (stack.clone(), restarts.clone());
        let every = config.restart_every;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if Instant::now() + Duration::from_secs(2) > deadline {
                    return;
                }
                let mut stack = stack.lock().await;
                // SIGKILL, a moment down, then the same database again.
                stack.sidecar.kill();
                tokio::time::sleep(Duration::from_millis(300)).await;
                tokio::task::block_in_place(|| stack.sidecar.restart());
                restarts.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let tally = Arc::new(Mutex::new(ClientTally::default()));
    let limit = Arc::new(tokio::sync::Semaphore::new(400));
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / config.rps.max(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let (mut requests, mut shed) = (0u64, 0u64);
    let mut calls = Vec::new();
    while Instant::now() < deadline {
        ticker.tick().await;
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            shed += 1;
            continue;
        };
        requests += 1;
        let plan = draw(&mut rng, config.users);
        let (http, url, tally) = (http.clone(), url.clone(), tally.clone());
        calls.push(tokio::spawn(async move {
            one_call(&http, &url, plan, &tally).await;
            drop(permit);
        }));
    }
    for call in calls {
        let _ = call.await;
    }
    restarter.abort();
    let _ = restarter.await;
    let stack = Arc::try_unwrap(stack)
        .unwrap_or_else(|_| panic!("the restarter still holds the stack"))
        .into_inner();
    let tally = Arc::try_unwrap(tally)
        .ok()
        .and_then(|t| t.into_inner().ok())
        .expect("tally");
    let restarts = restarts.load(Ordering::Relaxed);
    reconcile(&stack, &config, tally, requests, shed, restarts).await
}

async fn one_call(http: &reqwest::Client, url: &str, plan: Plan, tally: &Mutex<ClientTally>) {
    let mut body = json!({
        "model": MODEL,
        "stream": plan.stream,
        "max_tokens": plan.max_tokens,
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
    });
    if plan.stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    let mut request = http.post(url).header("x-user-id", &plan.user).json(&body);
    for (name, value) in &plan.script {
        request = request.header(*name, value);
    }
    let start = Instant::now();
    let call = async {
        let response = request.send().await?;
        let status = response.status().as_u16();
        response.bytes().await?;
        Ok::<u16, reqwest::Error>(status)
    };
    let outcome = match plan.abort_after {
        Some(after) => tokio::time::timeout(after, call).await.ok(),
        None => Some(call.await),
    };
    let elapsed = start.elapsed().as_millis() as u64;
    let Ok(mut tally) = tally.lock() else {
        return;
    };
    match outcome {
        None => tally.aborted += 1,
        Some(Err(_)) => tally.failed += 1,
        Some(Ok(status)) => {
            *tally.statuses.entry(status).or_default() += 1;
            if status == 200 {
                tally.completed_ok += 1;
            }
            tally.latencies_ms.push(elapsed);
        }
    }
}

/// Every usage record, all pages.
async fn all_records(stack: &Stack) -> Vec<Value> {
    let mut records = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/admin/v1/usage?limit=1000&cursor={c}"),
            None => "/admin/v1/usage?limit=1000".to_string(),
        };
        let (status, page) = stack.admin.get(&path).await;
        assert_eq!(status, 200, "{page}");
        records.extend(page["items"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(next) if !next.is_empty() => cursor = Some(next.to_string()),
            _ => return records,
        }
    }
}

async fn total_held(stack: &Stack, users: usize) -> i64 {
    let mut held = 0;
    for i in 0..users {
        held += num(
            &stack
                .admin
                .quota(&format!("soak-{i:04}"), "text_token")
                .await,
            "held",
        );
    }
    held
}

/// Wait until every admitted call is settled and no hold is left (the filter's outboxes
/// drain, holds of calls the sidecar never heard the end of expire after the TTL).
async fn wait_settled(stack: &Stack, users: usize) -> f64 {
    let start = Instant::now();
    let limit = Duration::from_secs(HOLD_TTL_SECS * 3 + 30);
    loop {
        if total_held(stack, users).await == 0 {
            return start.elapsed().as_secs_f64();
        }
        assert!(
            start.elapsed() < limit,
            "holds left after {limit:?}; sidecar log tail:\n{}",
            tail(&stack.sidecar.log())
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// "0.000090" -> 90.
fn micros(cost: &Value) -> i64 {
    let Some(text) = cost.as_str() else {
        return 0;
    };
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let fraction = format!("{fraction:0<6}");
    whole.parse::<i64>().unwrap_or(0) * 1_000_000 + fraction[..6].parse::<i64>().unwrap_or(0)
}

fn format_micros(micros: i64) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

#[derive(Default)]
struct UserSums {
    charged: i64,
    debt: i64,
    units: i64,
    cost: i64,
    settled: i64,
}

async fn reconcile(
    stack: &Stack,
    config: &SoakConfig,
    client: ClientTally,
    requests: u64,
    shed: u64,
    restarts: u64,
) -> Figures {
    let settle_wait_s = wait_settled(stack, config.users).await;
    // A last look a moment later: nothing may still arrive and change the sums.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let records = all_records(stack).await;

    let mut ids: Vec<&str> = records
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    ids.sort_unstable();
    let total = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), total, "a request id recorded twice");

    let mut sums: HashMap<String, UserSums> = HashMap::new();
    let count = |status: &str| records.iter().filter(|r| r["status"] == status).count();
    for record in &records {
        let user = record["user_id"].as_str().unwrap_or_default().to_string();
        let entry = sums.entry(user).or_default();
        entry.charged += num(record, "charged");
        entry.debt += num(record, "debt");
        entry.units += num(record, "units");
        entry.cost += micros(&record["cost"]);
        if record["status"] == "settled" {
            entry.settled += 1;
        } else {
            assert_eq!(
                num(record, "units"),
                0,
                "a void/expiry charges nothing: {record}"
            );
        }
    }
    let settled = count("settled");
    assert!(
        settled as u64 >= client.completed_ok,
        "{settled} settled < {} calls completed with 200",
        client.completed_ok
    );

    let mut debt_users = 0;
    for i in 0..config.users {
        let user = format!("soak-{i:04}");
        let quota = stack.admin.quota_released(&user, "text_token").await;
        let sum = sums.remove(&user).unwrap_or_default();
        assert_eq!(num(&quota, "held"), 0, "{user}: {quota}");
        assert_eq!(
            num(&quota, "used"),
            sum.charged,
            "{user}: records' charges = used: {quota}"
        );
        assert_eq!(
            num(&quota, "debt"),
            sum.debt,
            "{user}: records' debt = debt: {quota}"
        );
        assert_eq!(
            sum.units,
            sum.charged + sum.debt,
            "{user}: units = charged + debt"
        );
        assert!(
            num(&quota, "remaining") >= 0,
            "{user}: no negative balance: {quota}"
        );
        assert_eq!(
            num(&quota, "granted") - num(&quota, "used"),
            num(&quota, "remaining"),
            "{user}: {quota}"
        );
        if num(&quota, "debt") > 0 {
            // Debt is recorded when an overrun finds the rest of the balance held by other
            // calls; those units are spendable again once the holds are released, and the
            // debt itself is paid by the next grant (see README, "Granting quota"). So a
            // debt may stand beside a remaining balance; it must equal the records' debt,
            // checked above.
            debt_users += 1;
        }
    }
    assert!(
        sums.is_empty(),
        "records of unknown users: {:?}",
        sums.keys()
    );

    // The daily cost report equals its records, per user and in total.
    let mut days: Vec<&str> = records.iter().filter_map(|r| r["day"].as_str()).collect();
    days.sort_unstable();
    days.dedup();
    let (first, last) = (
        days.first().copied().unwrap_or(""),
        days.last().copied().unwrap_or(""),
    );
    let (status, report) = stack
        .admin
        .get(&format!(
            "/admin/v1/reports/cost?from={first}&to={last}&group_by=user"
        ))
        .await;
    assert_eq!(status, 200, "{report}");
    let mut by_user: HashMap<String, (i64, i64)> = HashMap::new();
    for record in records.iter().filter(|r| r["status"] == "settled") {
        let entry = by_user
            .entry(record["user_id"].as_str().unwrap_or_default().to_string())
            .or_default();
        entry.0 += micros(&record["cost"]);
        entry.1 += 1;
    }
    let rows = report["rows"].as_array().cloned().unwrap_or_default();
    for row in &rows {
        let user = row["key"].as_str().unwrap_or_default();
        let (cost, requests) = by_user.get(user).copied().unwrap_or_default();
        assert_eq!(micros(&row["cost"]), cost, "cost of {user}: {row}");
        assert_eq!(num(row, "requests"), requests, "requests of {user}: {row}");
    }
    let users_with_cost = by_user.values().filter(|(_, n)| *n > 0).count();
    assert_eq!(
        rows.len(),
        users_with_cost,
        "one report row per billed user"
    );
    let total_cost: i64 = by_user.values().map(|(c, _)| c).sum();
    let report_total: i64 = report["totals"]
        .as_array()
        .map(|t| t.iter().map(|row| micros(&row["cost"])).sum())
        .unwrap_or(0);
    assert_eq!(
        report_total, total_cost,
        "report total = records: {}",
        report["totals"]
    );

    let reconcile = stack
        .admin
        .must_post("/admin/v1/reconcile", json!({}))
        .await;
    assert_eq!(reconcile["clean"], true, "{reconcile}");

    Figures {
        seconds: config.seconds,
        users: config.users,
        target_rps: config.rps,
        requests,
        shed,
        restarts,
        records: records.len(),
        settled,
        voided: count("voided"),
        expired: count("expired"),
        partial: records.iter().filter(|r| r["partial"] == true).count(),
        estimated: records.iter().filter(|r| r["estimated"] == true).count(),
        debt_users,
        units: records.iter().map(|r| num(r, "units")).sum(),
        cost_micros: total_cost,
        settle_wait_s,
        client,
    }
}

const BEGIN: &str = "<!-- soak:begin -->";
const END: &str = "<!-- soak:end -->";

/// Put the figures between the soak markers of BENCHMARKS.md (appending the section, with
/// its markers, when the file has none); the rest of the file is left as it is.
fn write_report(path: &std::path::Path, figures: &Figures) {
    let section = format!(
        "{BEGIN}\n## Soak\n\n`make soak`: mixed streaming/non-streaming traffic through Envoy + filter + \
         sidecar (SQLite, loopback) at a steady rate, 10% random client aborts, the sidecar \
         SIGKILLed and restarted periodically; then the ledger is reconciled (see tests/soak.rs). \
         Run of {}.\n\n{}\n{END}",
        chrono_free_now(),
        figures.table()
    );
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let updated = match (existing.find(BEGIN), existing.find(END)) {
        (Some(begin), Some(end)) if end > begin => format!(
            "{}{section}{}",
            &existing[..begin],
            &existing[end + END.len()..]
        ),
        _ if existing.is_empty() => format!("# Benchmarks\n\n{section}\n"),
        _ => format!("{}\n\n{section}\n", existing.trim_end()),
    };
    std::fs::write(path, updated).expect("write the soak report");
    println!("soak figures written to {}", path.display());
}

/// The current UTC date and time, without a date crate.
fn chrono_free_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}
