//! Closed loop with `wrk`: a fixed number of connections, each sending its next request as
//! soon as the previous answer is complete; gives the maximum throughput.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::envoy::USER_HEADER;
use crate::stream::chat_request_body;

#[derive(Debug, Clone, Serialize)]
pub struct ClosedLoop {
    pub requests: u64,
    pub seconds: f64,
    /// Answers served (2xx/3xx) per second: a refusal (e.g. the filter's 503 under
    /// backpressure) is fast and must not count as throughput.
    pub requests_per_s: f64,
    /// Answers that were not 2xx/3xx.
    pub non_2xx: u64,
    /// Connect, read, write errors and timeouts.
    pub socket_errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

/// One run of `wrk -t1 -c<connections> -d<seconds>s` against `port`, POSTing chat requests
/// spread over `users` callers.
pub fn run(
    dir: &Path,
    port: u16,
    stream: bool,
    users: usize,
    connections: usize,
    seconds: u64,
) -> Result<ClosedLoop> {
    let script = dir.join(format!(
        "wrk-{}.lua",
        if stream { "stream" } else { "json" }
    ));
    std::fs::write(&script, lua_script(stream, users))?;
    let output = Command::new("wrk")
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s")])
        .args(["--timeout", "10s", "-s"])
        .arg(&script)
        .arg(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .output()
        .context("run wrk (make bench installs it with apt-get)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed: {}\n{stdout}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_summary(&stdout).with_context(|| format!("no BENCH line in wrk output:\n{stdout}"))
}

/// Requests are formatted once per user in `init`, then cycled.
fn lua_script(stream: bool, users: usize) -> String {
    let body = chat_request_body(stream, 300)
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    format!(
        r#"local requests = {{}}
local users = {users}
local counter = 0
init = function(args)
  for i = 1, users do
    requests[i] = wrk.format("POST", nil, {{["Content-Type"] = "application/json", ["{USER_HEADER}"] = "bench-user-" .. (i - 1)}}, "{body}")
  end
end
request = function()
  counter = counter + 1
  return requests[(counter % users) + 1]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH requests=%d duration_us=%d non2xx=%d socket_errors=%d p50=%d p99=%d\n",
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"#
    )
}

fn parse_summary(stdout: &str) -> Option<ClosedLoop> {
    let line = stdout.lines().find(|l| l.starts_with("BENCH "))?;
    let field = |name: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
    };
    let requests = field("requests")?;
    let seconds = field("duration_us")? as f64 / 1e6;
    let non_2xx = field("non2xx")?;
    let socket_errors = field("socket_errors")?;
    let served = requests.saturating_sub(non_2xx);
    Some(ClosedLoop {
        requests,
        seconds,
        requests_per_s: served as f64 / seconds.max(1e-9),
        non_2xx,
        socket_errors,
        p50_us: field("p50")?,
        p99_us: field("p99")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_done_line() {
        let out = "Running 1s test\nBENCH requests=1500 duration_us=1000000 non2xx=3 socket_errors=1 p50=800 p99=2100\n";
        let parsed = parse_summary(out).expect("parsed");
        assert_eq!(parsed.requests, 1500);
        assert_eq!(parsed.requests_per_s, 1497.0, "refusals are not throughput");
        assert_eq!(parsed.non_2xx, 3);
        assert_eq!(parsed.p99_us, 2100);
    }

    #[test]
    fn script_embeds_escaped_body_and_users() {
        let script = lua_script(true, 10);
        assert!(script.contains("local users = 10"));
        assert!(script.contains(r#"\"stream\":true"#));
    }
}
