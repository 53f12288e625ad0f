//! Catalog reads on the hot path (model -> quota type, price in force), cached briefly.
//!
//! Price versions are immutable, so they are cached by id for the life of the process. The
//! mapping of a (provider, model) to its model row, quota type and version spans is cached
//! for `ttl` (default 5 s): a catalog change made by another process is seen within that
//! time; [`PriceBook::invalidate`] makes it immediate in this one.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::storage::Conn;
use llm_meter_protocol::Usage;
use sqlx::Row;

use super::{load_price_version, PriceVersion, PricingError};
use crate::storage::Db;

/// Quota type used for models missing from the catalog.
pub const DEFAULT_QUOTA_TYPE: &str = "text_token";

/// How a quota type measures a call (the `measure` column of `quota_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// Input plus output tokens.
    TotalTokens,
    InputTokens,
    OutputTokens,
    Images,
    /// One unit per call.
    Requests,
    /// The call's cost in micro-units of the currency (a money "credit" balance).
    CostMicros,
}

impl Measure {
    pub fn parse(s: &str) -> Option<Measure> {
        Some(match s {
            "total_tokens" => Measure::TotalTokens,
            "input_tokens" => Measure::InputTokens,
            "output_tokens" => Measure::OutputTokens,
            "images" => Measure::Images,
            "requests" => Measure::Requests,
            "cost_micros" => Measure::CostMicros,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Measure::TotalTokens => "total_tokens",
            Measure::InputTokens => "input_tokens",
            Measure::OutputTokens => "output_tokens",
            Measure::Images => "images",
            Measure::Requests => "requests",
            Measure::CostMicros => "cost_micros",
        }
    }

    /// Units a call used. `cost_micros` is the call's cost (None when unpriced: 0 units).
    pub fn units(self, usage: &Usage, cost_micros: Option<i64>) -> u64 {
        match self {
            Measure::TotalTokens => usage.total_tokens(),
            Measure::InputTokens => usage.input_tokens,
            Measure::OutputTokens => usage.output_tokens,
            Measure::Images => usage.images,
            Measure::Requests => 1,
            Measure::CostMicros => cost_micros.map_or(0, |c| c.max(0) as u64),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaTypeDef {
    pub code: String,
    pub measure: Measure,
    pub model_type: Option<String>,
}

/// What the ledger needs to know about a model at one instant.
#[derive(Debug, Clone)]
pub struct ModelPricing {
    /// False when the model is not in the catalog (metered as `text_token`, unpriced).
    pub known: bool,
    pub enabled: bool,
    pub quota_type: String,
    pub measure: Measure,
    /// The price in force, or None when the model is unpriced.
    pub price: Option<Arc<PriceVersion>>,
}

#[derive(Clone)]
struct ModelEntry {
    row: Option<ModelRow>,
    /// Active versions: (id, effective_from, effective_to).
    spans: Vec<(i64, i64, Option<i64>)>,
    fetched: Instant,
}

#[derive(Clone)]
struct ModelRow {
    model_type: String,
    quota_type: Option<String>,
    enabled: bool,
}

struct QuotaTypes {
    by_code: HashMap<String, QuotaTypeDef>,
    fetched: Instant,
}

/// Bounded so a flood of made-up model names cannot grow memory without limit.
const MAX_CACHED_MODELS: usize = 10_000;

pub struct PriceBook {
    db: Db,
    ttl: Duration,
    models: RwLock<HashMap<(String, String), ModelEntry>>,
    versions: RwLock<HashMap<i64, Arc<PriceVersion>>>,
    quota_types: RwLock<Option<QuotaTypes>>,
}

impl PriceBook {
    pub fn new(db: Db, ttl: Duration) -> PriceBook {
        PriceBook {
            db,
            ttl,
            models: RwLock::new(HashMap::new()),
            versions: RwLock::new(HashMap::new()),
            quota_types: RwLock::new(None),
        }
    }

    /// Forgets cached catalog rows (call after changing models, prices or quota types).
    pub fn invalidate(&self) {
        if let Ok(mut models) = self.models.write() {
            models.clear();
        }
        if let Ok(mut quota_types) = self.quota_types.write() {
            *quota_types = None;
        }
    }

    /// Model, quota type and price in force at `at` (Unix ms).
    pub async fn resolve(
        &self,
        conn: &mut Conn,
        provider: &str,
        model: &str,
        at: i64,
    ) -> Result<ModelPricing, PricingError> {
        let entry = self.model_entry(conn, provider, model).await?;
        let (known, enabled, quota_type) = match &entry.row {
            Some(row) => {
                let quota_type = match &row.quota_type {
                    Some(q) => q.clone(),
                    None => self
                        .quota_type_for_model_type(conn, &row.model_type)
                        .await?
                        .unwrap_or_else(|| DEFAULT_QUOTA_TYPE.to_string()),
                };
                (true, row.enabled, quota_type)
            }
            None => (false, true, DEFAULT_QUOTA_TYPE.to_string()),
        };
        let measure = self
            .quota_type(conn, &quota_type)
            .await?
            .map_or(Measure::TotalTokens, |q| q.measure);
        // An unknown model is unpriced even if someone priced it without cataloguing it.
        let price = match in_force(&entry, at) {
            Some(id) if known => self.version(conn, id).await?,
            _ => None,
        };
        Ok(ModelPricing {
            known,
            enabled,
            quota_type,
            measure,
            price,
        })
    }

    /// Like [`PriceBook::resolve`], from the cache alone; None when anything needed is
    /// missing or stale (then call `resolve`). Lets the hot path skip taking a connection.
    pub fn resolve_cached(&self, provider: &str, model: &str, at: i64) -> Option<ModelPricing> {
        let key = (provider.to_string(), model.to_string());
        let entry = self.models.read().ok()?.get(&key).cloned()?;
        if entry.fetched.elapsed() >= self.ttl {
            return None;
        }
        let types_guard = self.quota_types.read().ok()?;
        let types = types_guard
            .as_ref()
            .filter(|c| c.fetched.elapsed() < self.ttl)?;
        let (known, enabled, quota_type) = match &entry.row {
            Some(row) => {
                let quota_type = match &row.quota_type {
                    Some(q) => q.clone(),
                    None => first_for_model_type(&types.by_code, &row.model_type)
                        .unwrap_or_else(|| DEFAULT_QUOTA_TYPE.to_string()),
                };
                (true, row.enabled, quota_type)
            }
            None => (false, true, DEFAULT_QUOTA_TYPE.to_string()),
        };
        let measure = types
            .by_code
            .get(&quota_type)
            .map_or(Measure::TotalTokens, |q| q.measure);
        let price = match in_force(&entry, at) {
            Some(id) if known => Some(self.versions.read().ok()?.get(&id).cloned()?),
            _ => None,
        };
        Some(ModelPricing {
            known,
            enabled,
            quota_type,
            measure,
            price,
        })
    }

    /// A price version by id (cached forever: versions are immutable).
    pub async fn version(
        &self,
        conn: &mut Conn,
        id: i64,
    ) -> Result<Option<Arc<PriceVersion>>, PricingError> {
        if let Some(v) = self.versions.read().ok().and_then(|m| m.get(&id).cloned()) {
            return Ok(Some(v));
        }
        let Some(version) = load_price_version(&self.db, conn, id).await? else {
            return Ok(None);
        };
        let version = Arc::new(version);
        if let Ok(mut versions) = self.versions.write() {
            versions.insert(id, version.clone());
        }
        Ok(Some(version))
    }

    /// A quota type definition by code.
    pub async fn quota_type(
        &self,
        conn: &mut Conn,
        code: &str,
    ) -> Result<Option<QuotaTypeDef>, PricingError> {
        self.with_quota_types(conn, |types| types.get(code).cloned())
            .await
    }

    async fn quota_type_for_model_type(
        &self,
        conn: &mut Conn,
        model_type: &str,
    ) -> Result<Option<String>, PricingError> {
        self.with_quota_types(conn, |types| first_for_model_type(types, model_type))
            .await
    }

    async fn with_quota_types<T>(
        &self,
        conn: &mut Conn,
        f: impl Fn(&HashMap<String, QuotaTypeDef>) -> T,
    ) -> Result<T, PricingError> {
        if let Ok(guard) = self.quota_types.read() {
            if let Some(cached) = guard.as_ref().filter(|c| c.fetched.elapsed() < self.ttl) {
                return Ok(f(&cached.by_code));
            }
        }
        let rows = sqlx::query("SELECT code, measure, model_type FROM quota_types")
            .fetch_all(&mut *conn)
            .await?;
        let mut by_code = HashMap::new();
        for row in rows {
            let code: String = row.try_get(0)?;
            let measure: String = row.try_get(1)?;
            let Some(measure) = Measure::parse(&measure) else {
                tracing::warn!(quota_type = %code, %measure, "quota type has an unknown measure; ignored");
                continue;
            };
            let model_type: Option<String> = row.try_get(2)?;
            by_code.insert(
                code.clone(),
                QuotaTypeDef {
                    code,
                    measure,
                    model_type,
                },
            );
        }
        let result = f(&by_code);
        if let Ok(mut guard) = self.quota_types.write() {
            *guard = Some(QuotaTypes {
                by_code,
                fetched: Instant::now(),
            });
        }
        Ok(result)
    }

    async fn model_entry(
        &self,
        conn: &mut Conn,
        provider: &str,
        model: &str,
    ) -> Result<ModelEntry, PricingError> {
        let key = (provider.to_string(), model.to_string());
        if let Some(entry) = self.models.read().ok().and_then(|m| m.get(&key).cloned()) {
            if entry.fetched.elapsed() < self.ttl {
                return Ok(entry);
            }
        }
        let sql = self.db.sql(
            "SELECT model_type, quota_type, status FROM models WHERE provider_code = ? AND model_code = ?",
        );
        let row = sqlx::query(&sql)
            .bind(provider)
            .bind(model)
            .fetch_optional(&mut *conn)
            .await?;
        let row = match row {
            Some(r) => Some(ModelRow {
                model_type: r.try_get(0)?,
                quota_type: r.try_get(1)?,
                enabled: r.try_get::<String, _>(2)? != "disabled",
            }),
            None => None,
        };
        let sql = self.db.sql(
            "SELECT id, effective_from, effective_to FROM price_versions \
             WHERE provider_code = ? AND model_code = ? AND status = 'active'",
        );
        let mut spans = Vec::new();
        for r in sqlx::query(&sql)
            .bind(provider)
            .bind(model)
            .fetch_all(&mut *conn)
            .await?
        {
            spans.push((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?));
        }
        let entry = ModelEntry {
            row,
            spans,
            fetched: Instant::now(),
        };
        if let Ok(mut models) = self.models.write() {
            if models.len() >= MAX_CACHED_MODELS {
                models.clear();
            }
            models.insert(key, entry.clone());
        }
        Ok(entry)
    }
}

/// The latest version whose window contains `at`.
fn in_force(entry: &ModelEntry, at: i64) -> Option<i64> {
    entry
        .spans
        .iter()
        .filter(|(_, from, to)| *from <= at && to.is_none_or(|to| to > at))
        .max_by_key(|(id, from, _)| (*from, *id))
        .map(|(id, _, _)| *id)
}

/// The quota type metering a model type (the first by code when several claim it).
fn first_for_model_type(types: &HashMap<String, QuotaTypeDef>, model_type: &str) -> Option<String> {
    types
        .values()
        .filter(|q| q.model_type.as_deref() == Some(model_type))
        .map(|q| &q.code)
        .min()
        .cloned()
}
