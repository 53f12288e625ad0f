//! Prometheus metrics in the text exposition format (version 0.0.4).
//!
//! A handful of counters and one histogram do not justify a metrics framework; this module
//! keeps them in maps behind mutexes (updates are a map lookup, far cheaper than the
//! database work each request does) and renders them on `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use crate::ledger::GroupCommits;

/// Upper bounds (seconds) of the request latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Default, Clone, Debug)]
struct Histogram {
    /// Cumulative count per bucket of [`LATENCY_BUCKETS`].
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum_seconds: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bucket, bound) in self.buckets.iter_mut().zip(LATENCY_BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
        self.count += 1;
        self.sum_seconds += seconds;
    }
}

type Labels = Vec<(&'static str, String)>;

#[derive(Default)]
struct Counter(Mutex<BTreeMap<Labels, u64>>);

impl Counter {
    fn inc(&self, labels: Labels) {
        if let Ok(mut map) = self.0.lock() {
            *map.entry(labels).or_default() += 1;
        }
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        if let Ok(map) = self.0.lock() {
            for (labels, value) in map.iter() {
                let _ = writeln!(out, "{name}{} {value}", format_labels(labels, None));
            }
        }
    }
}

/// All metrics of the process. Cheap to share behind an `Arc`.
#[derive(Default)]
pub struct Metrics {
    requests: Counter,
    latency: Mutex<BTreeMap<String, Histogram>>,
    authorize: Counter,
    settlements: Counter,
    leases: Counter,
    jobs: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// One HTTP request answered; `route` is the matched route template, not the raw path.
    pub fn observe_request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        self.requests.inc(vec![
            ("route", route.to_string()),
            ("method", method.to_string()),
            ("status", status.to_string()),
        ]);
        if let Ok(mut map) = self.latency.lock() {
            map.entry(route.to_string())
                .or_default()
                .observe(elapsed.as_secs_f64());
        }
    }

    /// One admission decision: `decision` is allow|deny, `code` the deny code or "" when allowed.
    pub fn observe_authorize(&self, decision: &str, code: &str) {
        self.authorize.inc(vec![
            ("decision", decision.to_string()),
            ("code", code.to_string()),
        ]);
    }

    /// One settlement or void outcome (settled, already_settled, voided, rejected, retry, ...).
    pub fn observe_settlement(&self, status: &str) {
        self.settlements.inc(vec![("status", status.to_string())]);
    }

    /// One lease event: `granted` (an authorize answered with a lease) or `released`.
    pub fn observe_lease(&self, event: &str) {
        self.leases.inc(vec![("event", event.to_string())]);
    }

    /// One run of a background job, `result` ok|error.
    pub fn observe_job(&self, job: &str, result: &str) {
        self.jobs.inc(vec![
            ("job", job.to_string()),
            ("result", result.to_string()),
        ]);
    }

    /// The exposition text served on `/metrics`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.requests.render(
            &mut out,
            "meter_http_requests_total",
            "HTTP requests answered, by route, method and status.",
        );
        self.render_latency(&mut out);
        self.authorize.render(
            &mut out,
            "meter_authorize_total",
            "Admission decisions, by decision and deny code.",
        );
        self.settlements.render(
            &mut out,
            "meter_settlements_total",
            "Settlement and void outcomes, by status.",
        );
        self.leases.render(
            &mut out,
            "meter_leases_total",
            "Leases granted and released, by event.",
        );
        self.jobs.render(
            &mut out,
            "meter_job_runs_total",
            "Background job runs, by job and result.",
        );
        out
    }

    /// The ledger writers' counters, read from the ledger when `/metrics` is served.
    pub fn render_ledger(out: &mut String, commits: GroupCommits, transient_retries: u64) {
        let counters = [
            (
                "meter_ledger_groups_total",
                "Group transactions run by the ledger writers.",
                commits.groups,
            ),
            (
                "meter_ledger_group_operations_total",
                "Operations applied in group transactions (divided by groups: the group size).",
                commits.operations,
            ),
            (
                "meter_ledger_one_statement_settlements_total",
                "Settlements made in one statement (PostgreSQL: own hold, one lot, no debt).",
                commits.one_statement_settlements,
            ),
            (
                "meter_ledger_transient_retries_total",
                "Ledger attempts tried again after a deadlock, busy database or lost connection.",
                transient_retries,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        // Its rate is the number of writers busy: at the writer count they are the bound.
        let name = "meter_ledger_writer_busy_seconds_total";
        let _ = writeln!(
            out,
            "# HELP {name} Time the ledger writers spent applying groups, summed over writers.\n\
             # TYPE {name} counter\n{name} {}.{:06}",
            commits.busy_micros / 1_000_000,
            commits.busy_micros % 1_000_000
        );
    }

    fn render_latency(&self, out: &mut String) {
        let name = "meter_http_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} HTTP request latency, by route.\n# TYPE {name} histogram"
        );
        let Ok(map) = self.latency.lock() else { return };
        for (route, histogram) in map.iter() {
            let route_label = vec![("route", route.clone())];
            for (bound, count) in LATENCY_BUCKETS.iter().zip(histogram.buckets) {
                let le = format!("{bound}");
                let _ = writeln!(
                    out,
                    "{name}_bucket{} {count}",
                    format_labels(&route_label, Some(&le))
                );
            }
            let _ = writeln!(
                out,
                "{name}_bucket{} {}",
                format_labels(&route_label, Some("+Inf")),
                histogram.count
            );
            let labels = format_labels(&route_label, None);
            let _ = writeln!(out, "{name}_sum{labels} {}", histogram.sum_seconds);
            let _ = writeln!(out, "{name}_count{labels} {}", histogram.count);
        }
    }
}

fn format_labels(labels: &[(&'static str, String)], le: Option<&str>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(name, value)| format!("{name}=\"{}\"", escape_label(value)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_histogram_render_in_exposition_format() {
        let metrics = Metrics::new();
        metrics.observe_request(
            "/internal/v1/authorize",
            "POST",
            200,
            Duration::from_millis(3),
        );
        metrics.observe_request(
            "/internal/v1/authorize",
            "POST",
            200,
            Duration::from_millis(700),
        );
        metrics.observe_authorize("deny", "quota_exhausted");
        metrics.observe_settlement("settled");
        metrics.observe_lease("granted");
        let text = metrics.render();
        assert!(text.contains(
            "meter_http_requests_total{route=\"/internal/v1/authorize\",method=\"POST\",status=\"200\"} 2"
        ));
        assert!(text.contains(
            "meter_http_request_duration_seconds_bucket{route=\"/internal/v1/authorize\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "meter_http_request_duration_seconds_bucket{route=\"/internal/v1/authorize\",le=\"+Inf\"} 2"
        ));
        assert!(text.contains(
            "meter_http_request_duration_seconds_count{route=\"/internal/v1/authorize\"} 2"
        ));
        assert!(
            text.contains("meter_authorize_total{decision=\"deny\",code=\"quota_exhausted\"} 1")
        );
        assert!(text.contains("meter_settlements_total{status=\"settled\"} 1"));
        assert!(text.contains("meter_leases_total{event=\"granted\"} 1"));
        assert!(text.contains("# TYPE meter_http_request_duration_seconds histogram"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
