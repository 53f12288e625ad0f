//! The catalog: providers, models, effective-dated prices, subscription plans, token
//! packages, memberships and caller API keys — what the admin API writes and the ledger reads.
//!
//! Every write runs in one transaction together with its `admin_audit` row, so an action is
//! either applied and recorded, or not applied at all.

pub mod api_keys;
pub mod audit;
pub mod demo;
pub mod memberships;
pub mod models;
pub mod packages;
pub mod plans;
pub mod prices;
pub mod providers;
pub mod quota_types;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use audit::Actor;

/// Why a catalog action was refused.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The named thing does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The action conflicts with existing state, e.g. a duplicate code (409).
    #[error("{0}")]
    Conflict(String),
    /// The input is well-formed JSON but not acceptable (422).
    #[error("{0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

pub type CatalogResult<T> = Result<T, CatalogError>;

/// Whether a catalog entry may be used for new calls, activations or purchases.
#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    #[default]
    Enabled,
    Disabled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Enabled => "enabled",
            Status::Disabled => "disabled",
        }
    }

    pub fn parse(raw: &str) -> Self {
        if raw == "enabled" || raw == "active" {
            Status::Enabled
        } else {
            Status::Disabled
        }
    }
}

/// A code: identifier-like key of providers, plans and packages.
pub fn check_code(field: &str, code: &str) -> CatalogResult<()> {
    let ok = !code.is_empty()
        && code.len() <= 191
        && code
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(CatalogError::Invalid(format!(
            "{field} must be 1-191 characters of letters, digits, '-', '_' or '.' (got {code:?})"
        )))
    }
}

/// A free-form key (model names, user ids, order ids): non-empty, no whitespace or controls.
pub fn check_key(field: &str, value: &str) -> CatalogResult<()> {
    let ok = !value.is_empty()
        && value.len() <= 191
        && !value.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(CatalogError::Invalid(format!(
            "{field} must be 1-191 characters without spaces or control characters (got {value:?})"
        )))
    }
}

/// A display text: non-empty after trimming, bounded.
pub fn check_text(field: &str, value: &str, max: usize) -> CatalogResult<()> {
    if value.trim().is_empty() || value.chars().count() > max {
        return Err(CatalogError::Invalid(format!(
            "{field} must be 1-{max} characters"
        )));
    }
    Ok(())
}

/// An ISO-4217-like currency code.
pub fn check_currency(currency: &str) -> CatalogResult<()> {
    if currency.len() == 3 && currency.chars().all(|c| c.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(CatalogError::Invalid(format!(
            "currency must be a 3-letter upper-case code such as CNY or USD (got {currency:?})"
        )))
    }
}

/// A token/unit count as stored (BIGINT): positive and within i64.
pub fn positive_units(field: &str, value: u64) -> CatalogResult<i64> {
    match i64::try_from(value) {
        Ok(units) if units > 0 => Ok(units),
        _ => Err(CatalogError::Invalid(format!(
            "{field} must be between 1 and {}",
            i64::MAX
        ))),
    }
}

/// Reads a non-negative BIGINT column as u64 (negative values would be a ledger bug; clamp).
pub fn as_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

pub fn default_currency() -> String {
    "CNY".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_keys_are_checked() {
        assert!(check_code("code", "openai").is_ok());
        assert!(check_code("code", "open ai").is_err());
        assert!(check_code("code", "").is_err());
        assert!(check_key("model", "meta-llama/Llama-3-70b@v1").is_ok());
        assert!(check_key("model", "a b").is_err());
        assert!(check_currency("CNY").is_ok());
        assert!(check_currency("yuan").is_err());
        assert!(positive_units("amount", 0).is_err());
        assert!(positive_units("amount", u64::MAX).is_err());
        assert_eq!(positive_units("amount", 5).unwrap(), 5);
    }
}
