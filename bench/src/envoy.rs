//! Envoy in the bench's variants, one worker (`--concurrency 1`), on ephemeral ports. Every
//! variant has the same listener, route and upstream cluster; only the HTTP filter chain
//! differs, so differences in the figures are the filter's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::procs::{free_port, http_get_body, repo_root, Proc};

/// Shared secret between the metering filter and the sidecar in the bench.
pub const SHARED_SECRET: &str = "bench-shared-secret";
/// Header carrying the caller.
pub const USER_HEADER: &str = "x-user-id";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Router only.
    Plain,
    /// A proxy-wasm filter (same SDK) whose callbacks all return `Continue`.
    EmptyWasm,
    /// A proxy-wasm filter that makes one HTTP callout per request and waits for it.
    CalloutWasm,
    /// The metering filter, talking to a sidecar; `leases: false` authorizes every call
    /// with the sidecar (`lease_units: 0`), for comparison with the default.
    Metering { sidecar_port: u16, leases: bool },
}

impl Variant {
    pub fn label(&self) -> &'static str {
        match self {
            Variant::Plain => "plain Envoy",
            Variant::EmptyWasm => "empty wasm filter",
            Variant::CalloutWasm => "wasm filter + 1 callout",
            Variant::Metering { leases: true, .. } => METERING_LABEL,
            Variant::Metering { leases: false, .. } => "metering, no leases (per-call authorize)",
        }
    }
}

/// The metering filter with its default configuration (leases on).
pub const METERING_LABEL: &str = "metering filter + sidecar";

/// Built modules.
pub fn metering_wasm() -> PathBuf {
    repo_root().join("target/wasm32-wasip1/release/llm_meter_filter.wasm")
}

pub fn baseline_wasm() -> PathBuf {
    repo_root().join("target/wasm32-wasip1/release/llm_meter_bench_filter.wasm")
}

pub struct Envoy {
    pub port: u16,
    pub admin_port: u16,
    pub proc: Proc,
}

impl Envoy {
    pub fn start(dir: &Path, variant: Variant, upstream_port: u16) -> Result<Envoy> {
        for module in [metering_wasm(), baseline_wasm()] {
            if variant != Variant::Plain && !module.is_file() {
                bail!("{} is not built (make bench builds it)", module.display());
            }
        }
        let port = free_port()?;
        let admin_port = free_port()?;
        let config = render(variant, port, admin_port, upstream_port);
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, config)?;
        let mut command =
            Command::new(std::env::var("ENVOY_BIN").unwrap_or_else(|_| "envoy".into()));
        command
            .arg("-c")
            .arg(&config_path)
            .args(["--disable-hot-restart", "--concurrency", "1", "-l"])
            .arg(std::env::var("BENCH_ENVOY_LOG").unwrap_or_else(|_| "warn".into()));
        let mut proc = Proc::spawn("envoy", command, &dir.join("envoy.log"))?;
        proc.wait_ready(admin_port, "/ready", Duration::from_secs(60))?;
        Ok(Envoy {
            port,
            admin_port,
            proc,
        })
    }

    /// Counters whose name contains `needle`, from the admin `/stats`.
    pub fn stats_matching(&self, needle: &str) -> Vec<(String, u64)> {
        let Some(body) = http_get_body(self.admin_port, "/stats") else {
            return Vec::new();
        };
        body.lines()
            .filter_map(|line| {
                let (name, value) = line.split_once(": ")?;
                if !name.contains(needle) {
                    return None;
                }
                Some((name.to_string(), value.trim().parse().ok()?))
            })
            .collect()
    }
}

fn render(variant: Variant, port: u16, admin_port: u16, upstream_port: u16) -> String {
    let (wasm_filter, extra_cluster) = match variant {
        Variant::Plain => (String::new(), String::new()),
        Variant::EmptyWasm => (
            wasm_filter_yaml("bench_empty", &baseline_wasm(), ""),
            String::new(),
        ),
        Variant::CalloutWasm => (
            wasm_filter_yaml("bench_callout", &baseline_wasm(), "callout:bench_callout"),
            cluster_yaml("bench_callout", upstream_port),
        ),
        Variant::Metering {
            sidecar_port,
            leases,
        } => {
            let mut config = serde_json::json!({
                "sidecar_cluster": "llm_meter_sidecar",
                "shared_secret": SHARED_SECRET,
                "timeout_ms": 2000,
                "failure_mode": "fail_closed",
                "user_id_header": USER_HEADER,
                "provider": "openai",
            });
            if !leases {
                config["lease_units"] = 0.into();
            }
            // Checked when the bench starts (see `filter_overrides`).
            for (key, value) in filter_overrides().unwrap_or_default() {
                config[key] = value;
            }
            (
                wasm_filter_yaml("llm_meter", &metering_wasm(), &config.to_string()),
                cluster_yaml("llm_meter_sidecar", sidecar_port),
            )
        }
    };
    let upstream_cluster = cluster_yaml("llm_upstream", upstream_port);
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}
static_resources:
  listeners:
  - name: bench
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          generate_request_id: true
          route_config:
            virtual_hosts:
            - name: llm
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: llm_upstream, timeout: 60s }}
          http_filters:
{wasm_filter}          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
{upstream_cluster}{extra_cluster}"#
    )
}

fn wasm_filter_yaml(name: &str, module: &Path, configuration: &str) -> String {
    // Single-quoted YAML scalar: only `'` needs escaping (doubled).
    let configuration = configuration.replace('\'', "''");
    format!(
        r#"          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {name}
                root_id: {name}
                allow_on_headers_stop_iteration: true
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{configuration}'
                vm_config:
                  vm_id: {name}
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: "{module}" }} }}
"#,
        module = module.display()
    )
}

fn cluster_yaml(name: &str, port: u16) -> String {
    format!(
        r#"  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }}] }}]
"#
    )
}

/// Filter settings that replace the metering filter's defaults in this run, from the
/// environment variable `BENCH_FILTER_EXTRA` (a JSON object, e.g.
/// `{"lease_idle_ms": 60000}`): for trials of a setting against the defaults. A run that
/// uses them says so in its report's header.
pub fn filter_overrides() -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    parse_overrides(std::env::var("BENCH_FILTER_EXTRA").ok().as_deref())
}

fn parse_overrides(
    text: Option<&str>,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let Some(text) = text else {
        return Ok(serde_json::Map::new());
    };
    match serde_json::from_str(text) {
        Ok(serde_json::Value::Object(settings)) => Ok(settings),
        _ => anyhow::bail!(
            "BENCH_FILTER_EXTRA must be a JSON object of filter settings, got {text:?}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_filter_chain_differs_between_variants() {
        let plain = render(Variant::Plain, 1, 2, 3);
        let metering = render(
            Variant::Metering {
                sidecar_port: 4,
                leases: true,
            },
            1,
            2,
            3,
        );
        assert!(!plain.contains("envoy.filters.http.wasm"));
        assert!(metering.contains("llm_meter_filter.wasm"));
        assert!(metering.contains("port_value: 4"));
        assert!(metering.contains(r#""user_id_header":"x-user-id""#));
        let callout = render(Variant::CalloutWasm, 1, 2, 3);
        assert!(callout.contains("callout:bench_callout"));
    }

    #[test]
    fn filter_overrides_must_be_a_json_object() {
        assert!(parse_overrides(None).unwrap().is_empty());
        let settings = parse_overrides(Some(r#"{"lease_idle_ms": 60000}"#)).unwrap();
        assert_eq!(settings["lease_idle_ms"], 60000);
        for bad in ["[1]", "60000", "{lease_idle_ms: 1}", ""] {
            let error = parse_overrides(Some(bad)).unwrap_err().to_string();
            assert!(error.contains("BENCH_FILTER_EXTRA"), "{bad}: {error}");
        }
    }
}
