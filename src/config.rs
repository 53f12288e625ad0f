//! Plugin configuration: JSON given to the filter by Envoy, validated once at configure time
//! so that a bad field is rejected loudly (Envoy refuses the listener) instead of failing
//! per request.

use crate::format::ProviderFormat;
use serde::Deserialize;
use std::fmt;

pub const DEFAULT_SIDECAR_AUTHORITY: &str = "llm-meter-sidecar";
pub const DEFAULT_TIMEOUT_MS: u64 = 1000;
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: usize = 1024 * 1024;
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;
pub const DEFAULT_MAX_RESPONSE_JSON_BYTES: usize = 8 * 1024 * 1024;
pub const DEFAULT_SETTLE_BATCH_MAX: usize = 200;
pub const DEFAULT_SETTLE_MAX_IN_FLIGHT: usize = 2;
pub const DEFAULT_SETTLE_RETRY_INITIAL_MS: u64 = 500;
pub const DEFAULT_SETTLE_RETRY_MAX_MS: u64 = 30_000;
pub const DEFAULT_SETTLE_TICK_MS: u64 = 200;
pub const DEFAULT_OUTBOX_CAPACITY: usize = 10_000;
pub const DEFAULT_LEASE_UNITS: u64 = 100_000;
pub const DEFAULT_LEASE_TTL_MS: u64 = 30_000;
pub const DEFAULT_LEASE_IDLE_MS: u64 = 2_000;
pub const DEFAULT_MAX_LEASES: usize = 10_000;

/// Upper bound for any timeout or delay: beyond it a value is almost surely a unit mistake.
const MAX_DELAY_MS: u64 = 3_600_000;

/// What to do when the sidecar cannot be asked (error, timeout, unreachable).
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Answer 503: nothing leaves unmetered.
    #[default]
    FailClosed,
    /// Forward the call anyway and settle it later with `authorized = false`.
    FailOpen,
}

/// The validated plugin configuration.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Envoy cluster of the ledger sidecar.
    pub sidecar_cluster: String,
    /// `:authority` of calls to the sidecar.
    #[serde(default = "default_sidecar_authority")]
    pub sidecar_authority: String,
    /// Sent in `x-meter-secret` on every call to the sidecar.
    pub shared_secret: String,
    /// Timeout of each call to the sidecar.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// Header carrying an already authenticated user id (set by an authn filter or the mesh).
    #[serde(default)]
    pub user_id_header: Option<String>,
    /// Header carrying the caller's API key (`Bearer ` prefix optional), resolved by the sidecar.
    #[serde(default)]
    pub api_key_header: Option<String>,
    /// Provider code sent to the sidecar (e.g. `openai`, `dashscope`).
    pub provider: String,
    /// Wire format of every metered path; `None` detects it from the path.
    #[serde(default)]
    pub format: Option<ProviderFormat>,
    #[serde(default = "default_max_request_body_bytes")]
    pub max_request_body_bytes: usize,
    /// Ask OpenAI-compatible streams for a final usage chunk (`stream_options.include_usage`).
    #[serde(default = "default_true")]
    pub inject_include_usage: bool,
    /// Remove the usage-only chunk from what the client receives when the filter injected
    /// `include_usage` (the client did not ask for it). The meter still reads it.
    #[serde(default = "default_true")]
    pub strip_injected_usage_chunk: bool,
    /// Largest single SSE event the response meter keeps in memory.
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
    /// Largest non-streamed JSON response body the response meter parses for usage.
    #[serde(default = "default_max_response_json_bytes")]
    pub max_response_json_bytes: usize,
    /// Most settlements sent in one finalize batch.
    #[serde(default = "default_settle_batch_max")]
    pub settle_batch_max: usize,
    /// Finalize batches sent and not yet answered, at most (see `outbox`).
    #[serde(default = "default_settle_max_in_flight")]
    pub settle_max_in_flight: usize,
    #[serde(default = "default_settle_retry_initial_ms")]
    pub settle_retry_initial_ms: u64,
    #[serde(default = "default_settle_retry_max_ms")]
    pub settle_retry_max_ms: u64,
    /// How often the outbox is flushed.
    #[serde(default = "default_settle_tick_ms")]
    pub settle_tick_ms: u64,
    /// Settlements kept waiting at most; beyond it new ones are dropped and counted.
    #[serde(default = "default_outbox_capacity")]
    pub outbox_capacity: usize,
    /// Quota units asked for per lease (see `lease`); 0 authorizes every call on its own.
    #[serde(default = "default_lease_units")]
    pub lease_units: u64,
    /// How long a lease admits calls: the most an admission decision can lag the ledger
    /// (a revoked key, a disabled model).
    #[serde(default = "default_lease_ttl_ms")]
    pub lease_ttl_ms: u64,
    /// A lease unused for this long is released, so idle callers hold nothing.
    #[serde(default = "default_lease_idle_ms")]
    pub lease_idle_ms: u64,
    /// Most leases one Envoy worker keeps at once.
    #[serde(default = "default_max_leases")]
    pub max_leases: usize,
}

/// A configuration that cannot be used, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The offending field (`""` when the document as a whole is wrong).
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "invalid configuration: {}", self.message)
        } else {
            write!(
                f,
                "invalid configuration: field `{}`: {}",
                self.field, self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Parse and validate the plugin configuration bytes given by Envoy.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        let mut deserializer = serde_json::Deserializer::from_slice(bytes);
        let mut config: Config =
            serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
                let path = err.path().to_string();
                let inner = err.into_inner();
                ConfigError {
                    field: field_of(&path, &inner),
                    message: inner.to_string(),
                }
            })?;
        config.normalize();
        config.validate()?;
        Ok(config)
    }

    /// Header names are matched lowercase (HTTP/2 and Envoy's header maps are lowercase).
    fn normalize(&mut self) {
        for header in [&mut self.user_id_header, &mut self.api_key_header]
            .into_iter()
            .flatten()
        {
            *header = header.trim().to_ascii_lowercase();
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        non_empty("sidecar_cluster", &self.sidecar_cluster)?;
        non_empty("sidecar_authority", &self.sidecar_authority)?;
        non_empty("shared_secret", &self.shared_secret)?;
        non_empty("provider", &self.provider)?;
        in_range("timeout_ms", self.timeout_ms, 1, MAX_DELAY_MS)?;
        for (field, header) in [
            ("user_id_header", &self.user_id_header),
            ("api_key_header", &self.api_key_header),
        ] {
            if let Some(name) = header {
                valid_header_name(field, name)?;
            }
        }
        if self.user_id_header.is_none() && self.api_key_header.is_none() {
            return Err(error(
                "user_id_header",
                "set user_id_header and/or api_key_header: a call must name its caller",
            ));
        }
        in_range(
            "max_request_body_bytes",
            self.max_request_body_bytes as u64,
            1,
            u32::MAX as u64,
        )?;
        in_range(
            "max_event_bytes",
            self.max_event_bytes as u64,
            1024,
            u32::MAX as u64,
        )?;
        in_range(
            "max_response_json_bytes",
            self.max_response_json_bytes as u64,
            1024,
            u32::MAX as u64,
        )?;
        // A larger batch would be refused by the sidecar as a whole, every time.
        in_range(
            "settle_batch_max",
            self.settle_batch_max as u64,
            1,
            llm_meter_protocol::MAX_BATCH_ITEMS as u64,
        )?;
        in_range(
            "settle_max_in_flight",
            self.settle_max_in_flight as u64,
            1,
            16,
        )?;
        in_range(
            "settle_retry_initial_ms",
            self.settle_retry_initial_ms,
            1,
            MAX_DELAY_MS,
        )?;
        in_range(
            "settle_retry_max_ms",
            self.settle_retry_max_ms,
            self.settle_retry_initial_ms,
            MAX_DELAY_MS,
        )?;
        in_range("settle_tick_ms", self.settle_tick_ms, 10, 60_000)?;
        in_range(
            "outbox_capacity",
            self.outbox_capacity as u64,
            1,
            10_000_000,
        )?;
        in_range("lease_units", self.lease_units, 0, 1_000_000_000_000)?;
        in_range("lease_ttl_ms", self.lease_ttl_ms, 100, MAX_DELAY_MS)?;
        in_range("lease_idle_ms", self.lease_idle_ms, 10, MAX_DELAY_MS)?;
        in_range("max_leases", self.max_leases as u64, 1, 1_000_000)?;
        Ok(())
    }

    /// The lease settings, for the lease book.
    pub fn lease_config(&self) -> crate::lease::LeaseConfig {
        crate::lease::LeaseConfig {
            units: self.lease_units,
            ttl_ms: self.lease_ttl_ms,
            idle_ms: self.lease_idle_ms,
            max_leases: self.max_leases,
        }
    }
}

/// serde_path_to_error names the path of a wrong value; for a missing or unknown field the
/// path is the enclosing object, so the name is taken from serde's own message instead.
fn field_of(path: &str, err: &serde_json::Error) -> String {
    let message = err.to_string();
    for prefix in ["missing field `", "unknown field `"] {
        if let Some(rest) = message.strip_prefix(prefix) {
            if let Some((name, _)) = rest.split_once('`') {
                return name.to_string();
            }
        }
    }
    if path == "." {
        String::new()
    } else {
        path.to_string()
    }
}

fn error(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        message: message.into(),
    }
}

fn non_empty(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        Err(error(field, "must not be empty"))
    } else {
        Ok(())
    }
}

fn in_range(field: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if value < min || value > max {
        Err(error(
            field,
            format!("{value} is out of range (allowed {min}..={max})"),
        ))
    } else {
        Ok(())
    }
}

fn valid_header_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let valid = !name.is_empty()
        && !name.starts_with(':')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.!#$%&'*+^`|~".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(error(field, format!("`{name}` is not a valid header name")))
    }
}

fn default_sidecar_authority() -> String {
    DEFAULT_SIDECAR_AUTHORITY.to_string()
}
fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}
fn default_max_request_body_bytes() -> usize {
    DEFAULT_MAX_REQUEST_BODY_BYTES
}
fn default_true() -> bool {
    true
}
fn default_max_event_bytes() -> usize {
    DEFAULT_MAX_EVENT_BYTES
}
fn default_max_response_json_bytes() -> usize {
    DEFAULT_MAX_RESPONSE_JSON_BYTES
}
fn default_settle_batch_max() -> usize {
    DEFAULT_SETTLE_BATCH_MAX
}
fn default_settle_max_in_flight() -> usize {
    DEFAULT_SETTLE_MAX_IN_FLIGHT
}
fn default_settle_retry_initial_ms() -> u64 {
    DEFAULT_SETTLE_RETRY_INITIAL_MS
}
fn default_settle_retry_max_ms() -> u64 {
    DEFAULT_SETTLE_RETRY_MAX_MS
}
fn default_settle_tick_ms() -> u64 {
    DEFAULT_SETTLE_TICK_MS
}
fn default_outbox_capacity() -> usize {
    DEFAULT_OUTBOX_CAPACITY
}
fn default_lease_units() -> u64 {
    DEFAULT_LEASE_UNITS
}
fn default_lease_ttl_ms() -> u64 {
    DEFAULT_LEASE_TTL_MS
}
fn default_lease_idle_ms() -> u64 {
    DEFAULT_LEASE_IDLE_MS
}
fn default_max_leases() -> usize {
    DEFAULT_MAX_LEASES
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn minimal() -> Value {
        json!({
            "sidecar_cluster": "llm_meter_sidecar",
            "shared_secret": "s3cret",
            "provider": "openai",
            "user_id_header": "X-User-Id",
        })
    }

    fn parse(value: &Value) -> Result<Config, ConfigError> {
        Config::parse(value.to_string().as_bytes())
    }

    fn rejected_field(value: &Value) -> String {
        match parse(value) {
            Ok(config) => panic!("accepted {value}: {config:?}"),
            Err(err) => err.field,
        }
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = parse(&minimal()).unwrap();
        assert_eq!(config.sidecar_authority, "llm-meter-sidecar");
        assert_eq!(config.timeout_ms, 1000);
        assert_eq!(config.failure_mode, FailureMode::FailClosed);
        assert_eq!(config.max_request_body_bytes, 1024 * 1024);
        assert!(config.inject_include_usage);
        assert!(config.strip_injected_usage_chunk);
        assert_eq!(config.format, None);
        assert_eq!(config.api_key_header, None);
        assert_eq!(config.user_id_header.as_deref(), Some("x-user-id"));
        assert!(config.settle_retry_initial_ms <= config.settle_retry_max_ms);
        assert!(config.lease_config().enabled(), "leases are on by default");
    }

    #[test]
    fn full_config_is_read_field_by_field() {
        let value = json!({
            "sidecar_cluster": "c", "sidecar_authority": "meter.local", "shared_secret": "k",
            "timeout_ms": 250, "failure_mode": "fail_open", "api_key_header": "Authorization",
            "provider": "anthropic", "format": "anthropic", "max_request_body_bytes": 2048,
            "inject_include_usage": false, "strip_injected_usage_chunk": false,
            "max_event_bytes": 4096,
            "max_response_json_bytes": 8192, "settle_batch_max": 7, "settle_max_in_flight": 3,
            "settle_retry_initial_ms": 10, "settle_retry_max_ms": 20, "settle_tick_ms": 50,
            "outbox_capacity": 3, "lease_units": 0, "lease_ttl_ms": 500, "lease_idle_ms": 20,
            "max_leases": 9,
        });
        let config = parse(&value).unwrap();
        assert_eq!(config.failure_mode, FailureMode::FailOpen);
        assert_eq!(config.format, Some(ProviderFormat::Anthropic));
        assert_eq!(config.api_key_header.as_deref(), Some("authorization"));
        assert_eq!(config.user_id_header, None);
        assert_eq!(config.timeout_ms, 250);
        assert!(!config.inject_include_usage);
        assert!(!config.strip_injected_usage_chunk);
        assert_eq!(
            (
                config.settle_batch_max,
                config.settle_max_in_flight,
                config.outbox_capacity,
                config.settle_tick_ms
            ),
            (7, 3, 3, 50)
        );
        let lease = config.lease_config();
        assert!(!lease.enabled());
        assert_eq!(
            (lease.ttl_ms, lease.idle_ms, lease.max_leases),
            (500, 20, 9)
        );
    }

    #[test]
    fn missing_required_fields_are_named() {
        for field in ["sidecar_cluster", "shared_secret", "provider"] {
            let mut value = minimal();
            value.as_object_mut().unwrap().remove(field);
            assert_eq!(rejected_field(&value), field);
        }
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        let mut value = minimal();
        value["timeout"] = json!(5);
        let err = parse(&value).unwrap_err();
        assert_eq!(err.field, "timeout");
        assert!(err.to_string().contains("`timeout`"), "{err}");
    }

    #[test]
    fn wrong_types_and_values_name_their_field() {
        let cases = [
            ("timeout_ms", json!("fast")),
            ("timeout_ms", json!(0)),
            ("timeout_ms", json!(-1)),
            ("lease_ttl_ms", json!(0)),
            ("lease_idle_ms", json!(1)),
            ("max_leases", json!(0)),
            ("lease_units", json!(-5)),
            ("failure_mode", json!("fail_sometimes")),
            ("format", json!("cohere")),
            ("shared_secret", json!("")),
            ("shared_secret", json!("  ")),
            ("sidecar_cluster", json!("")),
            ("provider", json!("")),
            ("user_id_header", json!("bad header")),
            ("user_id_header", json!(":path")),
            ("max_request_body_bytes", json!(0)),
            ("settle_batch_max", json!(0)),
            ("settle_batch_max", json!(501)),
            ("settle_max_in_flight", json!(0)),
            ("settle_max_in_flight", json!(17)),
            ("outbox_capacity", json!(0)),
            ("inject_include_usage", json!("yes")),
            ("strip_injected_usage_chunk", json!(1)),
        ];
        for (field, bad) in cases {
            let mut value = minimal();
            value[field] = bad.clone();
            assert_eq!(rejected_field(&value), field, "{field} = {bad}");
        }
    }

    #[test]
    fn retry_max_below_initial_is_rejected() {
        let mut value = minimal();
        value["settle_retry_initial_ms"] = json!(1000);
        value["settle_retry_max_ms"] = json!(10);
        assert_eq!(rejected_field(&value), "settle_retry_max_ms");
    }

    #[test]
    fn an_identity_header_is_required() {
        let mut value = minimal();
        value.as_object_mut().unwrap().remove("user_id_header");
        let err = parse(&value).unwrap_err();
        assert!(err.message.contains("api_key_header"), "{err}");
    }

    #[test]
    fn non_json_and_non_object_documents_are_rejected() {
        for bytes in [
            &b""[..],
            b"not json",
            b"[]",
            b"42",
            b"{\"sidecar_cluster\":",
        ] {
            assert!(
                Config::parse(bytes).is_err(),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}
