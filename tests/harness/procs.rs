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
    let response = http_get(url);
    response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200")
}

/// A tiny blocking GET with std only, so waiting needs no runtime: the raw response, or
/// an empty string when the server cannot be reached.
fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let Some(rest) = url.strip_prefix("http://") else {
        return String::new();
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let Ok(mut stream) = std::net::TcpStream::connect(host) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return String::new();
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
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
    /// Lease settings; `None` keeps the filter's defaults (`lease_units: Some(0)` turns
    /// leases off, so every call is authorized on its own).
    pub lease_units: Option<u64>,
    pub lease_ttl_ms: Option<u64>,
    pub lease_idle_ms: Option<u64>,
    /// Settlements the filter's outbox keeps at most (`None`: the filter's default).
    pub outbox_capacity: Option<u64>,
    /// The outbox's batch size and flush tick (`None`: the filter's defaults).
    pub settle_batch_max: Option<u64>,
    pub settle_tick_ms: Option<u64>,
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
            lease_units: None,
            lease_ttl_ms: None,
            // Idle leases are released quickly so tests see the balance settle soon.
            lease_idle_ms: Some(300),
            outbox_capacity: None,
            settle_batch_max: None,
            settle_tick_ms: None,
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
        let leases = [
            ("lease_units", self.lease_units),
            ("lease_ttl_ms", self.lease_ttl_ms),
            ("lease_idle_ms", self.lease_idle_ms),
            ("outbox_capacity", self.outbox_capacity),
            ("settle_batch_max", self.settle_batch_max),
            ("settle_tick_ms", self.settle_tick_ms),
        ];
        for (field, value) in leases {
            if let Some(value) = value {
                config[field] = value.into();
            }
        }
        config.to_string()
    }
}

/// How a test's Envoy is run and configured beyond the filter (all off by default).
#[derive(Debug, Clone, Default)]
pub struct EnvoyOptions {
    /// Stream idle timeout (HCM and route) in ms: an upstream that stalls mid-stream is cut.
    pub idle_timeout_ms: Option<u64>,
    /// Also open an "external" listener (`Envoy::external_port`) that strips identity headers
    /// sent from outside the mesh before the filter runs; callers there are identified by
    /// their API key (`x-api-key`), which the sidecar maps to the user.
    pub external_listener: bool,
    /// Serve the listeners from a watched file (LDS) so [`Envoy::reload`] can change them
    /// while streams are in flight.
    pub file_lds: bool,
    /// Run with hot restart enabled under this base id (see [`Envoy::hot_restart`]).
    pub hot_restart_base_id: Option<u32>,
    /// `--drain-time-s` (Envoy's default is 600 s).
    pub drain_time_s: Option<u32>,
}

/// The real Envoy with the built filter in front of `upstream_port`.
pub struct Envoy {
    pub port: u16,
    pub admin_port: u16,
    /// The external listener's port when [`EnvoyOptions::external_listener`] is set.
    pub external_port: Option<u16>,
    pub log_path: PathBuf,
    child: Option<Child>,
    /// Parents of a hot restart, still draining (killed on drop).
    parents: Vec<Child>,
    restart_epoch: u32,
    config_path: PathBuf,
    lds_dir: PathBuf,
    options: EnvoyOptions,
    ports: ConfigPorts,
}

#[derive(Debug, Clone, Copy)]
struct ConfigPorts {
    listener: u16,
    external: Option<u16>,
    admin: u16,
    sidecar: u16,
    upstream: u16,
}

impl Envoy {
    pub fn start(
        dir: &Path,
        sidecar_port: u16,
        upstream_port: u16,
        filter: &FilterOptions,
    ) -> Envoy {
        Envoy::start_with(
            dir,
            sidecar_port,
            upstream_port,
            filter,
            &EnvoyOptions::default(),
        )
    }

    pub fn start_with(
        dir: &Path,
        sidecar_port: u16,
        upstream_port: u16,
        filter: &FilterOptions,
        options: &EnvoyOptions,
    ) -> Envoy {
        let ports = ConfigPorts {
            listener: crate::free_port(),
            external: options.external_listener.then(crate::free_port),
            admin: crate::free_port(),
            sidecar: sidecar_port,
            upstream: upstream_port,
        };
        let lds_dir = dir.join("lds");
        let config_path = dir.join("envoy.yaml");
        let mut envoy = Envoy {
            port: ports.listener,
            admin_port: ports.admin,
            external_port: ports.external,
            log_path: dir.join("envoy.log"),
            child: None,
            parents: Vec::new(),
            restart_epoch: 0,
            config_path,
            lds_dir,
            options: options.clone(),
            ports,
        };
        if options.file_lds {
            std::fs::create_dir_all(&envoy.lds_dir).expect("create lds dir");
            envoy.write_lds(filter);
        }
        let config = envoy_config(&ports, filter, options, &envoy.lds_dir);
        std::fs::write(&envoy.config_path, config).expect("write envoy config");
        envoy.spawn();
        envoy
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(std::env::var("ENVOY_BIN").unwrap_or_else(|_| "envoy".into()));
        cmd.arg("-c").arg(&self.config_path);
        match self.options.hot_restart_base_id {
            Some(base_id) => cmd
                .args(["--base-id", &base_id.to_string()])
                .args(["--restart-epoch", &self.restart_epoch.to_string()])
                .args(["--parent-shutdown-time-s", "30"]),
            None => cmd.arg("--disable-hot-restart"),
        };
        if let Some(drain) = self.options.drain_time_s {
            cmd.args(["--drain-time-s", &drain.to_string()]);
        }
        let child = cmd
            .args(["--concurrency", "1", "-l", "info"])
            .arg("--log-path")
            .arg(&self.log_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn envoy (is it on PATH? make test installs it)");
        self.child = Some(child);
        let epoch = self.restart_epoch;
        let ready = format!("http://127.0.0.1:{}/ready", self.admin_port);
        let server_info = format!("http://127.0.0.1:{}/server_info", self.admin_port);
        let epoch_marker = format!("\"restart_epoch\": {epoch}");
        let log_path = self.log_path.clone();
        let child = self.child.as_mut().expect("child");
        wait_until(Duration::from_secs(30), "envoy /ready", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "envoy (epoch {epoch}) exited with {status}: {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            http_ok(&ready) && (epoch == 0 || http_get(&server_info).contains(&epoch_marker))
        });
    }

    /// Hot restart: start the next epoch with the same config and base id; it takes over
    /// the listeners while the parent drains its in-flight streams and then exits.
    pub fn hot_restart(&mut self) {
        assert!(
            self.options.hot_restart_base_id.is_some(),
            "hot restart needs EnvoyOptions::hot_restart_base_id"
        );
        if let Some(parent) = self.child.take() {
            self.parents.push(parent);
        }
        self.restart_epoch += 1;
        self.spawn();
    }

    /// Whether every parent of a hot restart has exited (drained and shut down).
    pub fn parents_exited(&mut self) -> bool {
        self.parents
            .iter_mut()
            .all(|p| matches!(p.try_wait(), Ok(Some(_))))
    }

    /// Replace the listeners' configuration (file LDS) with `filter`: Envoy builds new
    /// filter chains and drains the old ones, whose streams finish on the old plugin.
    pub fn reload(&mut self, filter: &FilterOptions) {
        assert!(self.options.file_lds, "reload needs EnvoyOptions::file_lds");
        let before = self.stat("listener_manager.lds.update_success");
        self.write_lds(filter);
        let admin_port = self.admin_port;
        wait_until(Duration::from_secs(20), "the LDS update", || {
            Envoy::stat_at(admin_port, "listener_manager.lds.update_success") > before
        });
    }

    /// Write the listeners file and move it into place atomically (Envoy watches the folder).
    fn write_lds(&self, filter: &FilterOptions) {
        let mut resources = String::from("resources:\n");
        for listener in listeners(&self.ports, filter, &self.options) {
            resources.push_str(&indent(
                &format!(
                    "\"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n{listener}"
                ),
                "- ",
                "  ",
            ));
        }
        let staging = self.lds_dir.join(".lds.yaml.tmp");
        std::fs::write(&staging, resources).expect("write lds");
        std::fs::rename(&staging, self.lds_dir.join("lds.yaml")).expect("move lds into place");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// A URL on the external listener (identity headers stripped).
    pub fn external_url(&self, path: &str) -> String {
        let port = self
            .external_port
            .expect("EnvoyOptions::external_listener is not set");
        format!("http://127.0.0.1:{port}{path}")
    }

    /// One counter or gauge from Envoy's admin `/stats`, 0 when absent.
    pub fn stat(&self, name: &str) -> u64 {
        Envoy::stat_at(self.admin_port, name)
    }

    fn stat_at(admin_port: u16, name: &str) -> u64 {
        let response = http_get(&format!(
            "http://127.0.0.1:{admin_port}/stats?filter={name}$"
        ));
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
        for mut child in self.child.take().into_iter().chain(self.parents.drain(..)) {
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

/// Prefix the first line of `text` with `first` and the others with `rest`.
fn indent(text: &str, first: &str, rest: &str) -> String {
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let prefix = if i == 0 { first } else { rest };
            if line.is_empty() {
                "\n".to_string()
            } else {
                format!("{prefix}{line}\n")
            }
        })
        .collect()
}

fn envoy_config(
    ports: &ConfigPorts,
    filter: &FilterOptions,
    options: &EnvoyOptions,
    lds_dir: &Path,
) -> String {
    let admin_port = ports.admin;
    let listeners_section = if options.file_lds {
        format!(
            "node: {{ id: llm-meter-e2e, cluster: llm-meter-e2e }}\ndynamic_resources:\n  lds_config:\n    path_config_source:\n      path: {lds}\n      watched_directory: {{ path: {dir} }}\n",
            lds = lds_dir.join("lds.yaml").display(),
            dir = lds_dir.display()
        )
    } else {
        let mut section = String::from("  listeners:\n");
        for listener in listeners(ports, filter, options) {
            section.push_str(&indent(&listener, "  - ", "    "));
        }
        section
    };
    let (dynamic, static_listeners) = if options.file_lds {
        (listeners_section, String::new())
    } else {
        (String::new(), listeners_section)
    };
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}
{dynamic}static_resources:
{static_listeners}  clusters:
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
        sidecar_port = ports.sidecar,
        upstream_port = ports.upstream,
    )
}

/// The listeners (as YAML mappings at column 0): the usual one, and the external one.
fn listeners(ports: &ConfigPorts, filter: &FilterOptions, options: &EnvoyOptions) -> Vec<String> {
    let mut all = vec![listener(
        "llm_ingress",
        ports.listener,
        filter,
        options,
        false,
    )];
    if let Some(external) = ports.external {
        let external_filter = FilterOptions {
            api_key_header: Some("x-api-key"),
            ..filter.clone()
        };
        all.push(listener(
            "llm_external",
            external,
            &external_filter,
            options,
            true,
        ));
    }
    all
}

fn listener(
    name: &str,
    port: u16,
    filter: &FilterOptions,
    options: &EnvoyOptions,
    strip_identity: bool,
) -> String {
    let wasm = wasm_path();
    let filter_json = filter.to_json();
    let (hcm_idle, route_idle) = match options.idle_timeout_ms {
        Some(ms) => (
            format!("\n      stream_idle_timeout: {}s", ms as f64 / 1000.0),
            format!(", idle_timeout: {}s", ms as f64 / 1000.0),
        ),
        None => (String::new(), String::new()),
    };
    // Stripping must happen before the metering filter reads the identity: route-level
    // `request_headers_to_remove` would only apply when the router forwards upstream.
    let strip = if strip_identity {
        r#"
      - name: envoy.filters.http.header_mutation
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
          mutations:
            request_mutations:
            - remove: x-user-id"#
    } else {
        ""
    };
    format!(
        r#"name: {name}
per_connection_buffer_limit_bytes: 4194304
address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: {name}
      generate_request_id: true{hcm_idle}
      route_config:
        virtual_hosts:
        - name: llm
          domains: ["*"]
          routes:
          - match: {{ prefix: "/" }}
            route: {{ cluster: llm_upstream, timeout: 60s{route_idle} }}
      http_filters:{strip}
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
"#,
        wasm = wasm.display()
    )
}
