//! The real sidecar and the real Envoy as child processes on ephemeral loopback ports.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SHARED_SECRET: &str = "e2e-shared-secret";
pub const ADMIN_TOKEN: &str = "e2e-admin-token";

/// Path of a workspace binary, built by `make test` before the suite runs.
fn binary(name: &str, env_override: &str) -> PathBuf {
    if let Ok(path) = std::env::var(env_override) {
        return PathBuf::from(path);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| crate::repo_root().join("target"));
    for profile in ["debug", "release"] {
        let path = target.join(profile).join(name);
        if path.is_file() {
            return path;
        }
    }
    panic!("{name} is not built: run `make test` (or `cargo build -p llm-meter-sidecar`) first")
}

/// The filter module, built by `make wasm`.
pub fn wasm_path() -> PathBuf {
    let path = crate::repo_root()
        .join("target")
        .join("wasm32-wasip1")
        .join("release")
        .join("llm_meter_filter.wasm");
    assert!(
        path.is_file(),
        "the filter is not built at {}: run `make test` (it builds the wasm first)",
        path.display()
    );
    path
}

/// Blocking wait until `probe` says yes, or panic with `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut probe: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if probe() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

fn http_ok(url: &str) -> bool {
    // A tiny blocking GET with std only, so waiting needs no runtime.
    use std::io::{Read, Write};
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let Ok(mut stream) = std::net::TcpStream::connect(host) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200")
}

/// The ledger sidecar process.
pub struct Sidecar {
    pub port: u16,
    pub database_url: String,
    pub log_path: PathBuf,
    extra_env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Sidecar {
    pub fn start(database_url: &str, dir: &Path, extra_env: &[(&str, &str)]) -> Sidecar {
        let mut sidecar = Sidecar {
            port: crate::free_port(),
            database_url: database_url.to_string(),
            log_path: dir.join("sidecar.log"),
            extra_env: extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        sidecar.spawn();
        sidecar
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open sidecar log");
        let log_err = log.try_clone().expect("clone log handle");
        let mut cmd = Command::new(binary("llm-meter-sidecar", "LLM_METER_SIDECAR_BIN"));
        cmd.arg("serve")
            .env("METER_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("DATABASE_URL", &self.database_url)
            .env("METER_SHARED_SECRET", SHARED_SECRET)
            .env("METER_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn sidecar"));
        let url = format!("{}/readyz", self.base_url());
        let log_path = self.log_path.clone();
        wait_until(Duration::from_secs(30), "sidecar /readyz", || {
            http_ok(&url) || {
                // Fail fast with its log if it died.
                if let Some(child) = self.child.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!(
                            "sidecar exited with {status}: {}",
                            std::fs::read_to_string(&log_path).unwrap_or_default()
                        );
                    }
                }
                false
            }
        });
    }

    /// SIGKILL: no graceful shutdown, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same port and database.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How the filter is configured for a test's Envoy.
#[derive(Debug, Clone)]
pub struct FilterOptions {
    pub failure_mode: &'static str,
    pub timeout_ms: u64,
    pub max_request_body_bytes: u64,
    pub provider: &'static str,
    pub user_id_header: Option<&'static str>,
    pub api_key_header: Option<&'static str>,
    /// Cap of the outbox's retry backoff, so fault tests don't wait long.
    pub settle_retry_max_ms: u64,
}

impl Default for FilterOptions {
    fn default() -> Self {
        FilterOptions {
            failure_mode: "fail_closed",
            timeout_ms: 2000,
            max_request_body_bytes: 1024 * 1024,
            provider: "openai",
            user_id_header: Some("x-user-id"),
            api_key_header: None,
            settle_retry_max_ms: 1000,
        }
    }
}

impl FilterOptions {
    pub fn to_json(&self) -> String {
        let mut config = serde_json::json!({
            "sidecar_cluster": "llm_meter_sidecar",
            "shared_secret": SHARED_SECRET,
            "timeout_ms": self.timeout_ms,
            "failure_mode": self.failure_mode,
            "provider": self.provider,
            "max_request_body_bytes": self.max_request_body_bytes,
            "settle_retry_initial_ms": 100,
            "settle_retry_max_ms": self.settle_retry_max_ms,
        });
        if let Some(header) = self.user_id_header {
            config["user_id_header"] = header.into();
        }
        if let Some(header) = self.api_key_header {
            config["api_key_header"] = header.into();
        }
        config.to_string()
    }
}

/// The real Envoy with the built filter in front of `upstream_port`.
pub struct Envoy {
    pub port: u16,
    pub admin_port: u16,
    pub log_path: PathBuf,
    child: Option<Child>,
}

impl Envoy {
    pub fn start(
        dir: &Path,
        sidecar_port: u16,
        upstream_port: u16,
        filter: &FilterOptions,
    ) -> Envoy {
        let port = crate::free_port();
        let admin_port = crate::free_port();
        let config = envoy_config(port, admin_port, sidecar_port, upstream_port, filter);
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, config).expect("write envoy config");
        let log_path = dir.join("envoy.log");
        let child = Command::new(std::env::var("ENVOY_BIN").unwrap_or_else(|_| "envoy".into()))
            .arg("-c")
            .arg(&config_path)
            .args(["--disable-hot-restart", "--concurrency", "1", "-l", "info"])
            .arg("--log-path")
            .arg(&log_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn envoy (is it on PATH? make test installs it)");
        let mut envoy = Envoy {
            port,
            admin_port,
            log_path,
            child: Some(child),
        };
        let ready = format!("http://127.0.0.1:{admin_port}/ready");
        let log_path = envoy.log_path.clone();
        let child = envoy.child.as_mut().expect("child");
        wait_until(Duration::from_secs(30), "envoy /ready", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "envoy exited with {status}: {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            http_ok(&ready)
        });
        envoy
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// One counter or gauge from Envoy's admin `/stats`, 0 when absent.
    pub fn stat(&self, name: &str) -> u64 {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.admin_port)) else {
            return 0;
        };
        let request =
            format!("GET /stats?filter={name}$ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        if stream.write_all(request.as_bytes()).is_err() {
            return 0;
        }
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(": ")?;
                (key == name).then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGKILL: Envoy dies with whatever its filter still held in memory.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.kill();
    }
}

fn envoy_config(
    port: u16,
    admin_port: u16,
    sidecar_port: u16,
    upstream_port: u16,
    filter: &FilterOptions,
) -> String {
    let wasm = wasm_path();
    let filter_json = filter.to_json();
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}
static_resources:
  listeners:
  - name: llm_ingress
    per_connection_buffer_limit_bytes: 4194304
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: llm_ingress
          generate_request_id: true
          route_config:
            virtual_hosts:
            - name: llm
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: llm_upstream, timeout: 60s }}
          http_filters:
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: llm_meter
                root_id: llm_meter
                allow_on_headers_stop_iteration: true
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{filter_json}'
                vm_config:
                  vm_id: llm_meter
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: "{wasm}" }} }}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: llm_meter_sidecar
    type: STATIC
    connect_timeout: 0.25s
    load_assignment:
      cluster_name: llm_meter_sidecar
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {sidecar_port} }} }} }} }}] }}]
  - name: llm_upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: llm_upstream
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {upstream_port} }} }} }} }}] }}]
"#,
        wasm = wasm.display()
    )
}
