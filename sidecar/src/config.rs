//! Settings from command-line flags and environment variables.
//!
//! Every flag has an environment variable of the same meaning (`METER_*`, `DATABASE_URL`);
//! flags win. Secrets come from a variable or from a file (`*_FILE`, for container secrets),
//! never both, and are never printed: [`Secret`] redacts itself in `Debug`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use chrono_tz::Tz;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::ledger::{self, LedgerConfig};

/// Command line of the `llm-meter-sidecar` binary.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "llm-meter-sidecar",
    version,
    about = "Ledger sidecar for the LLM metering Envoy filter"
)]
pub struct Cli {
    #[command(flatten)]
    pub settings: SettingsArgs,
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run the HTTP service (internal API, admin API, metrics) and background jobs.
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Check the ledger's books; prints a report and exits non-zero on drift.
    Reconcile,
    /// Create (idempotently) a demo provider, priced model and user with quota, and print them.
    SeedDemo,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// What authorize does when a model has no active price.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum UnpricedPolicy {
    /// Let the call run, meter its tokens, book no cost.
    Allow,
    /// Deny the call with `model_unpriced`.
    Deny,
}

/// Raw flags/environment, before secrets are read and checked.
#[derive(Args, Debug, Clone)]
pub struct SettingsArgs {
    /// Address to listen on (loopback by default: only the local Envoy should reach it).
    #[arg(
        long,
        env = "METER_LISTEN",
        default_value = "127.0.0.1:8081",
        global = true
    )]
    pub listen: SocketAddr,
    /// Database URL: sqlite://path, postgres://..., mysql://...
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://./data/ledger.db",
        global = true,
        hide_env_values = true
    )]
    pub database_url: String,
    /// Shared secret the filter sends in `x-meter-secret`.
    #[arg(
        long,
        env = "METER_SHARED_SECRET",
        global = true,
        hide_env_values = true
    )]
    pub shared_secret: Option<Secret>,
    /// File holding the shared secret (alternative to METER_SHARED_SECRET).
    #[arg(long, env = "METER_SHARED_SECRET_FILE", global = true)]
    pub shared_secret_file: Option<PathBuf>,
    /// Bearer token for the admin API.
    #[arg(long, env = "METER_ADMIN_TOKEN", global = true, hide_env_values = true)]
    pub admin_token: Option<Secret>,
    /// File holding the admin token (alternative to METER_ADMIN_TOKEN).
    #[arg(long, env = "METER_ADMIN_TOKEN_FILE", global = true)]
    pub admin_token_file: Option<PathBuf>,
    /// IANA time zone of the monthly reset (00:00 on the 1st) and of report days.
    #[arg(long, env = "METER_TIMEZONE", default_value = "Asia/Shanghai", value_parser = parse_timezone, global = true)]
    pub timezone: Tz,
    /// Seconds a hold lives before the sweep releases it.
    #[arg(
        long,
        env = "METER_HOLD_TTL_SECS",
        default_value_t = 600,
        global = true
    )]
    pub hold_ttl_secs: u64,
    /// Longest time, in seconds, the filter may admit calls under one lease (its ask is
    /// capped to this).
    #[arg(
        long,
        env = "METER_MAX_LEASE_TTL_SECS",
        default_value_t = 60,
        global = true
    )]
    pub max_lease_ttl_secs: u64,
    /// What to do with calls to models without an active price.
    #[arg(
        long,
        env = "METER_UNPRICED_POLICY",
        value_enum,
        default_value = "allow",
        global = true
    )]
    pub unpriced_policy: UnpricedPolicy,
    /// Output tokens held when a request sets no output cap.
    #[arg(
        long,
        env = "METER_DEFAULT_MAX_OUTPUT_TOKENS",
        default_value_t = 4096,
        global = true
    )]
    pub default_max_output_tokens: u64,
    /// Log format.
    #[arg(
        long,
        env = "METER_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// Seconds between hold-expiry and lot-expiry sweeps.
    #[arg(
        long,
        env = "METER_SWEEP_INTERVAL_SECS",
        default_value_t = 30,
        global = true
    )]
    pub sweep_interval_secs: u64,
    /// Seconds to wait for in-flight requests on shutdown before giving up.
    #[arg(
        long,
        env = "METER_SHUTDOWN_GRACE_SECS",
        default_value_t = 30,
        global = true
    )]
    pub shutdown_grace_secs: u64,
}

fn parse_timezone(raw: &str) -> Result<Tz, String> {
    Tz::from_str(raw.trim())
        .map_err(|_| format!("unknown IANA time zone {raw:?} (e.g. Asia/Shanghai, UTC)"))
}

/// A secret value; `Debug` never shows it and it has no `Display`, so it cannot reach a
/// log line or an error message by accident (even through `Debug` of the parsed flags).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Settings the running service needs, validated.
#[derive(Clone, Debug)]
pub struct ServeSettings {
    pub listen: SocketAddr,
    pub database_url: String,
    pub shared_secret: Secret,
    pub admin_token: Secret,
    pub timezone: Tz,
    pub ledger: LedgerConfig,
    pub sweep_interval: Duration,
    pub shutdown_grace: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{name} is required: set {name} or {name}_FILE")]
    Missing { name: &'static str },
    #[error("set only one of {name} and {name}_FILE")]
    Both { name: &'static str },
    #[error("{name} is empty")]
    Empty { name: &'static str },
    #[error("cannot read {name}_FILE {path}: {reason}")]
    Unreadable {
        name: &'static str,
        path: String,
        reason: String,
    },
    #[error("{name} must be greater than zero")]
    NotPositive { name: &'static str },
}

impl SettingsArgs {
    /// Validate everything `serve` needs; secrets are read from their files here.
    pub fn serve_settings(&self) -> Result<ServeSettings, ConfigError> {
        let shared_secret = resolve_secret(
            "METER_SHARED_SECRET",
            self.shared_secret.as_ref(),
            self.shared_secret_file.as_deref(),
        )?;
        let admin_token = resolve_secret(
            "METER_ADMIN_TOKEN",
            self.admin_token.as_ref(),
            self.admin_token_file.as_deref(),
        )?;
        positive("METER_HOLD_TTL_SECS", self.hold_ttl_secs)?;
        positive("METER_MAX_LEASE_TTL_SECS", self.max_lease_ttl_secs)?;
        positive("METER_SWEEP_INTERVAL_SECS", self.sweep_interval_secs)?;
        positive(
            "METER_DEFAULT_MAX_OUTPUT_TOKENS",
            self.default_max_output_tokens,
        )?;
        Ok(ServeSettings {
            listen: self.listen,
            database_url: self.database_url.clone(),
            shared_secret,
            admin_token,
            timezone: self.timezone,
            ledger: self.ledger_config(),
            sweep_interval: Duration::from_secs(self.sweep_interval_secs),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
        })
    }
}

impl SettingsArgs {
    /// Ledger behaviour (no secrets needed; also used by `reconcile` and `seed-demo`).
    pub fn ledger_config(&self) -> LedgerConfig {
        LedgerConfig {
            hold_ttl: Duration::from_secs(self.hold_ttl_secs.max(1)),
            default_max_output_tokens: self.default_max_output_tokens.max(1),
            unpriced_policy: match self.unpriced_policy {
                UnpricedPolicy::Allow => ledger::UnpricedPolicy::Allow,
                UnpricedPolicy::Deny => ledger::UnpricedPolicy::Deny,
            },
            timezone: self.timezone,
            max_lease_ttl: Duration::from_secs(self.max_lease_ttl_secs.max(1)),
            ..LedgerConfig::default()
        }
    }
}

fn positive(name: &'static str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::NotPositive { name });
    }
    Ok(())
}

/// A secret from its variable or its file; trailing newlines of files are not part of it.
fn resolve_secret(
    name: &'static str,
    value: Option<&Secret>,
    file: Option<&Path>,
) -> Result<Secret, ConfigError> {
    let raw = match (value, file) {
        (Some(_), Some(_)) => return Err(ConfigError::Both { name }),
        (None, None) => return Err(ConfigError::Missing { name }),
        (Some(value), None) => value.expose().to_string(),
        (None, Some(path)) => {
            std::fs::read_to_string(path).map_err(|err| ConfigError::Unreadable {
                name,
                path: path.display().to_string(),
                reason: err.to_string(),
            })?
        }
    };
    let trimmed = raw.trim_end_matches(['\r', '\n']);
    if trimmed.trim().is_empty() {
        return Err(ConfigError::Empty { name });
    }
    Ok(Secret(trimmed.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let mut full = vec!["llm-meter-sidecar"];
        full.extend_from_slice(args);
        Cli::try_parse_from(full).unwrap()
    }

    #[test]
    fn serve_is_the_default_and_listen_is_loopback() {
        let cli = parse(&["--shared-secret", "s", "--admin-token", "a"]);
        assert_eq!(cli.command, None);
        let settings = cli.settings.serve_settings().unwrap();
        assert!(settings.listen.ip().is_loopback());
        assert_eq!(settings.timezone, chrono_tz::Asia::Shanghai);
        assert_eq!(settings.ledger.hold_ttl, Duration::from_secs(600));
        assert_eq!(settings.ledger.max_lease_ttl, Duration::from_secs(60));
        assert_eq!(
            settings.ledger.unpriced_policy,
            ledger::UnpricedPolicy::Allow
        );
    }

    #[test]
    fn flags_after_the_subcommand_are_accepted() {
        let cli = parse(&["serve", "--timezone", "UTC", "--unpriced-policy", "deny"]);
        assert_eq!(cli.command, Some(Command::Serve));
        assert_eq!(cli.settings.timezone, chrono_tz::UTC);
        assert_eq!(
            cli.settings.ledger_config().unpriced_policy,
            ledger::UnpricedPolicy::Deny
        );
    }

    #[test]
    fn bad_timezone_is_refused_with_a_hint() {
        let err = Cli::try_parse_from(["x", "--timezone", "Mars/Olympus"]).unwrap_err();
        assert!(err.to_string().contains("Mars/Olympus"), "{err}");
    }

    #[test]
    fn secrets_are_required_and_not_both() {
        let cli = parse(&["--shared-secret", "s"]);
        assert_eq!(
            cli.settings.serve_settings().unwrap_err(),
            ConfigError::Missing {
                name: "METER_ADMIN_TOKEN"
            }
        );
        let dir = std::env::temp_dir().join(format!("meter-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let both = parse(&[
            "--shared-secret",
            "s",
            "--admin-token",
            "a",
            "--admin-token-file",
            file.to_str().unwrap(),
        ]);
        assert_eq!(
            both.settings.serve_settings().unwrap_err(),
            ConfigError::Both {
                name: "METER_ADMIN_TOKEN"
            }
        );
        let from_file = parse(&[
            "--shared-secret",
            "s",
            "--admin-token-file",
            file.to_str().unwrap(),
        ]);
        let settings = from_file.settings.serve_settings().unwrap();
        assert_eq!(settings.admin_token.expose(), "from-file");
        assert_eq!(format!("{:?}", settings.admin_token), "Secret(***)");
        assert!(!format!("{settings:?}").contains("from-file"));
        let from_flags = parse(&[
            "--shared-secret",
            "flag-secret-1",
            "--admin-token",
            "flag-token-2",
        ]);
        let printed = format!("{from_flags:?}");
        assert!(
            !printed.contains("flag-secret-1") && !printed.contains("flag-token-2"),
            "{printed}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn lease_ttl_is_configurable_and_positive() {
        let cli = parse(&["--shared-secret", "s", "--admin-token", "a"]);
        let mut settings = cli.settings;
        settings.max_lease_ttl_secs = 5;
        assert_eq!(
            settings.serve_settings().unwrap().ledger.max_lease_ttl,
            Duration::from_secs(5)
        );
        settings.max_lease_ttl_secs = 0;
        assert_eq!(
            settings.serve_settings().unwrap_err(),
            ConfigError::NotPositive {
                name: "METER_MAX_LEASE_TTL_SECS"
            }
        );
        let flag = parse(&["--max-lease-ttl-secs", "7"]);
        assert_eq!(
            flag.settings.ledger_config().max_lease_ttl,
            Duration::from_secs(7)
        );
    }

    #[test]
    fn empty_secret_is_refused() {
        let cli = parse(&["--shared-secret", "  ", "--admin-token", "a"]);
        assert_eq!(
            cli.settings.serve_settings().unwrap_err(),
            ConfigError::Empty {
                name: "METER_SHARED_SECRET"
            }
        );
    }
}
