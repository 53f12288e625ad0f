//! Effective-dated prices and the cost of one call.
//!
//! A price version belongs to one (provider, model) and holds one item per pricing type.
//! Versions are immutable: a price change is a new version with a later `effective_from`,
//! so the version id stored on a hold at authorize time prices its settlement exactly.
//!
//! Cost rule (documented for finance):
//! - `input_token` prices the prompt tokens that are neither cache reads nor cache writes;
//!   `cached_input_token` prices cache reads and `cache_write_token` cache writes, each
//!   falling back to the input price when the version has no such item.
//! - `output_token` prices completion tokens; reasoning tokens (clamped to the output count)
//!   use `reasoning_token` when present, otherwise the output price.
//! - `image` prices each image, `per_request` is added once per call.
//! - Units: `per_1k_tokens` = price per 1,000 tokens, `per_1m_tokens` per 1,000,000,
//!   `per_image`, `per_request`.
//! - The components are summed exactly, then rounded once per call, half-up (away from
//!   zero) to 6 decimals (1e-6 of the currency; stored as integer `cost_micros`).
//! - `min_charge` is the minimum billable cost of a call that used anything: a call with any
//!   token or image whose rounded cost is below it is charged `min_charge`. A call with no
//!   usage at all costs 0.

mod book;

pub use book::{Measure, ModelPricing, PriceBook, QuotaTypeDef, DEFAULT_QUOTA_TYPE};

use std::str::FromStr;

use crate::storage::Conn;
use llm_meter_protocol::Usage;
use rust_decimal::{Decimal, RoundingStrategy};
use sqlx::Row;

use crate::storage::{insert_returning_id, now_ms, with_returning_id, Db};

/// Decimal places kept in a cost (micro-units of the currency).
pub const COST_SCALE: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    #[error("invalid price: {0}")]
    Invalid(String),
    #[error("cost overflows the decimal range")]
    Overflow,
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PricingType {
    InputToken,
    OutputToken,
    CachedInputToken,
    CacheWriteToken,
    ReasoningToken,
    Image,
    PerRequest,
}

impl PricingType {
    pub const ALL: [PricingType; 7] = [
        PricingType::InputToken,
        PricingType::OutputToken,
        PricingType::CachedInputToken,
        PricingType::CacheWriteToken,
        PricingType::ReasoningToken,
        PricingType::Image,
        PricingType::PerRequest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PricingType::InputToken => "input_token",
            PricingType::OutputToken => "output_token",
            PricingType::CachedInputToken => "cached_input_token",
            PricingType::CacheWriteToken => "cache_write_token",
            PricingType::ReasoningToken => "reasoning_token",
            PricingType::Image => "image",
            PricingType::PerRequest => "per_request",
        }
    }

    pub fn parse(s: &str) -> Result<PricingType, PricingError> {
        PricingType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| PricingError::Invalid(format!("unknown pricing type `{s}`")))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PriceUnit {
    #[serde(rename = "per_1k_tokens")]
    Per1kTokens,
    #[serde(rename = "per_1m_tokens")]
    Per1mTokens,
    PerImage,
    PerRequest,
}

impl PriceUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            PriceUnit::Per1kTokens => "per_1k_tokens",
            PriceUnit::Per1mTokens => "per_1m_tokens",
            PriceUnit::PerImage => "per_image",
            PriceUnit::PerRequest => "per_request",
        }
    }

    pub fn parse(s: &str) -> Result<PriceUnit, PricingError> {
        [
            PriceUnit::Per1kTokens,
            PriceUnit::Per1mTokens,
            PriceUnit::PerImage,
            PriceUnit::PerRequest,
        ]
        .into_iter()
        .find(|u| u.as_str() == s)
        .ok_or_else(|| PricingError::Invalid(format!("unknown price unit `{s}`")))
    }

    /// How many items one priced unit covers.
    fn divisor(self) -> Decimal {
        match self {
            PriceUnit::Per1kTokens => Decimal::from(1_000),
            PriceUnit::Per1mTokens => Decimal::from(1_000_000),
            PriceUnit::PerImage | PriceUnit::PerRequest => Decimal::ONE,
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PriceItem {
    pub pricing_type: PricingType,
    pub unit: PriceUnit,
    #[serde(with = "rust_decimal::serde::str")]
    pub unit_price: Decimal,
}

/// One immutable, effective-dated price of a model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PriceVersion {
    pub id: i64,
    pub provider: String,
    pub model: String,
    pub currency: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub min_charge: Decimal,
    pub effective_from: i64,
    pub effective_to: Option<i64>,
    pub items: Vec<PriceItem>,
}

/// The cost of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// Rounded to [`COST_SCALE`] decimals.
    pub amount: Decimal,
    /// `amount` in micro-units (what the database stores).
    pub micros: i64,
}

impl Cost {
    pub fn from_micros(micros: i64) -> Cost {
        Cost {
            amount: Decimal::new(micros, COST_SCALE),
            micros,
        }
    }
}

/// Formats micro-units as a decimal string with 6 places (`1234` -> `"0.001234"`).
pub fn format_micros(micros: i64) -> String {
    Decimal::new(micros, COST_SCALE).to_string()
}

impl PriceVersion {
    fn item(&self, pricing_type: PricingType) -> Option<&PriceItem> {
        self.items.iter().find(|i| i.pricing_type == pricing_type)
    }

    /// The cost of `usage` under this version (see the module docs for the rule).
    pub fn cost(&self, usage: &Usage) -> Result<Cost, PricingError> {
        let input = self.item(PricingType::InputToken);
        let cached = self.item(PricingType::CachedInputToken).or(input);
        let cache_write = self.item(PricingType::CacheWriteToken).or(input);
        let output = self.item(PricingType::OutputToken);
        let reasoning_price = self.item(PricingType::ReasoningToken).or(output);

        let cached_tokens = usage.cached_input_tokens.min(usage.input_tokens);
        let write_tokens = usage
            .cache_write_tokens
            .min(usage.input_tokens - cached_tokens);
        let plain_input = usage.input_tokens - cached_tokens - write_tokens;
        let reasoning = usage.reasoning_tokens.min(usage.output_tokens);
        let plain_output = usage.output_tokens - reasoning;

        let components = [
            (input, plain_input),
            (cached, cached_tokens),
            (cache_write, write_tokens),
            (output, plain_output),
            (reasoning_price, reasoning),
            (self.item(PricingType::Image), usage.images),
            (self.item(PricingType::PerRequest), 1),
        ];
        let mut total = Decimal::ZERO;
        for (item, quantity) in components {
            if let Some(item) = item {
                total = total
                    .checked_add(component(item, quantity)?)
                    .ok_or(PricingError::Overflow)?;
            }
        }
        let mut amount =
            total.round_dp_with_strategy(COST_SCALE, RoundingStrategy::MidpointAwayFromZero);
        let used_anything = usage.total_tokens() > 0 || usage.images > 0;
        if used_anything && amount < self.min_charge {
            amount = self.min_charge;
        }
        to_cost(amount)
    }
}

fn component(item: &PriceItem, quantity: u64) -> Result<Decimal, PricingError> {
    if quantity == 0 {
        return Ok(Decimal::ZERO);
    }
    Decimal::from(quantity)
        .checked_mul(item.unit_price)
        .and_then(|v| v.checked_div(item.unit.divisor()))
        .ok_or(PricingError::Overflow)
}

fn to_cost(amount: Decimal) -> Result<Cost, PricingError> {
    let micros = amount
        .checked_mul(Decimal::from(1_000_000))
        .and_then(|m| i64::try_from(m.trunc()).ok())
        .ok_or(PricingError::Overflow)?;
    Ok(Cost {
        amount: amount.round_dp(COST_SCALE),
        micros,
    })
}

/// A new price version to store.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NewPriceVersion {
    pub provider: String,
    pub model: String,
    pub currency: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub min_charge: Decimal,
    pub effective_from: i64,
    #[serde(default)]
    pub effective_to: Option<i64>,
    pub items: Vec<PriceItem>,
    #[serde(default)]
    pub remark: Option<String>,
    #[serde(default)]
    pub created_by: Option<String>,
}

impl NewPriceVersion {
    pub fn validate(&self) -> Result<(), PricingError> {
        let invalid = |m: &str| Err(PricingError::Invalid(m.to_string()));
        if self.provider.is_empty()
            || self.model.is_empty()
            || self.provider.len() > 191
            || self.model.len() > 191
        {
            return invalid("provider and model must be 1..=191 characters");
        }
        if self.currency.is_empty() || self.currency.len() > 8 {
            return invalid("currency must be 1..=8 characters");
        }
        if self.items.is_empty() {
            return invalid("a price version needs at least one item");
        }
        if self.min_charge.is_sign_negative() {
            return invalid("min_charge must not be negative");
        }
        if let Some(to) = self.effective_to {
            if to <= self.effective_from {
                return invalid("effective_to must be after effective_from");
            }
        }
        for (i, item) in self.items.iter().enumerate() {
            if item.unit_price.is_sign_negative() {
                return invalid("unit_price must not be negative");
            }
            if self.items[..i]
                .iter()
                .any(|o| o.pricing_type == item.pricing_type)
            {
                return invalid("each pricing type may appear once per version");
            }
            let token_unit = matches!(item.unit, PriceUnit::Per1kTokens | PriceUnit::Per1mTokens);
            let consistent = match item.pricing_type {
                PricingType::Image => item.unit == PriceUnit::PerImage,
                PricingType::PerRequest => item.unit == PriceUnit::PerRequest,
                _ => token_unit,
            };
            if !consistent {
                return Err(PricingError::Invalid(format!(
                    "unit {} does not fit pricing type {}",
                    item.unit.as_str(),
                    item.pricing_type.as_str()
                )));
            }
        }
        Ok(())
    }
}

/// Stores a new price version (validated) and returns its id.
pub async fn create_price_version(db: &Db, version: &NewPriceVersion) -> Result<i64, PricingError> {
    version.validate()?;
    let mut tx = db.begin_write().await?;
    let sql = with_returning_id(
        db.dialect(),
        "INSERT INTO price_versions (provider_code, model_code, currency, min_charge, \
         effective_from, effective_to, status, remark, created_by, created_at) \
         VALUES (?, ?, ?, ?, ?, ?, 'active', ?, ?, ?)",
    );
    let sql = db.sql(&sql);
    let query = sqlx::query(&sql)
        .bind(&version.provider)
        .bind(&version.model)
        .bind(&version.currency)
        .bind(version.min_charge.to_string())
        .bind(version.effective_from)
        .bind(version.effective_to)
        .bind(version.remark.as_deref())
        .bind(version.created_by.as_deref())
        .bind(now_ms());
    let id = insert_returning_id(db.dialect(), tx.conn(), query).await?;
    let sql = db.sql(
        "INSERT INTO price_items (version_id, pricing_type, unit, unit_price) VALUES (?, ?, ?, ?)",
    );
    for item in &version.items {
        sqlx::query(&sql)
            .bind(id)
            .bind(item.pricing_type.as_str())
            .bind(item.unit.as_str())
            .bind(item.unit_price.to_string())
            .execute(tx.conn())
            .await?;
    }
    tx.commit().await?;
    Ok(id)
}

/// Loads one price version by id.
pub async fn load_price_version(
    db: &Db,
    conn: &mut Conn,
    id: i64,
) -> Result<Option<PriceVersion>, PricingError> {
    let sql = db.sql(
        "SELECT provider_code, model_code, currency, min_charge, effective_from, effective_to \
         FROM price_versions WHERE id = ?",
    );
    let Some(row) = sqlx::query(&sql)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let min_charge: String = row.try_get(3)?;
    let mut version = PriceVersion {
        id,
        provider: row.try_get(0)?,
        model: row.try_get(1)?,
        currency: row.try_get(2)?,
        min_charge: parse_decimal(&min_charge)?,
        effective_from: row.try_get(4)?,
        effective_to: row.try_get(5)?,
        items: Vec::new(),
    };
    let sql = db.sql("SELECT pricing_type, unit, unit_price FROM price_items WHERE version_id = ?");
    for row in sqlx::query(&sql).bind(id).fetch_all(&mut *conn).await? {
        let pricing_type: String = row.try_get(0)?;
        let unit: String = row.try_get(1)?;
        let unit_price: String = row.try_get(2)?;
        version.items.push(PriceItem {
            pricing_type: PricingType::parse(&pricing_type)?,
            unit: PriceUnit::parse(&unit)?,
            unit_price: parse_decimal(&unit_price)?,
        });
    }
    Ok(Some(version))
}

fn parse_decimal(s: &str) -> Result<Decimal, PricingError> {
    Decimal::from_str(s.trim())
        .map_err(|e| PricingError::Invalid(format!("stored price `{s}` is not a decimal: {e}")))
}

#[cfg(test)]
mod tests;
