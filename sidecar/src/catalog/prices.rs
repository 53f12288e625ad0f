//! Effective-dated price versions of a model.
//!
//! A version is immutable once it is in force: a price change is a new version with a
//! later `effective_from`, which supersedes the older one from that instant. A version that
//! is not yet in force may still be withdrawn (deleted). Prices cannot be backdated, so the
//! cost of a call already made never changes.

use crate::storage::Conn;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};

use super::{audit, check_currency, default_currency, Actor, CatalogError, CatalogResult};
use crate::pricing::{self, NewPriceVersion, PriceItem, PriceUnit, PricingError, PricingType};
use crate::storage::{now_ms, Db};

/// Clock skew tolerated for an `effective_from` slightly in the past.
const BACKDATE_TOLERANCE_MS: i64 = 60_000;

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct PriceItemView {
    /// input_token, output_token, cached_input_token, cache_write_token, reasoning_token,
    /// image or per_request.
    pub pricing_type: String,
    /// per_1k_tokens, per_1m_tokens (token types), per_image (image), per_request (per_request).
    pub unit: String,
    /// Price of one unit as a decimal string, e.g. "0.002".
    #[schema(value_type = String)]
    pub unit_price: Decimal,
}

#[derive(Deserialize, ToSchema, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct NewPrice {
    pub provider: String,
    pub model: String,
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Minimum cost of a call that used anything; decimal string, default "0".
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub min_charge: Option<Decimal>,
    /// Unix milliseconds; default now. Must not be in the past.
    #[serde(default)]
    pub effective_from: Option<i64>,
    pub items: Vec<PriceItemView>,
    #[serde(default)]
    pub remark: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct PriceVersionView {
    pub id: i64,
    pub provider: String,
    pub model: String,
    pub currency: String,
    #[schema(value_type = String)]
    pub min_charge: Decimal,
    pub effective_from: i64,
    pub effective_to: Option<i64>,
    /// active or retired.
    pub status: String,
    pub remark: Option<String>,
    pub created_by: Option<String>,
    pub created_at: i64,
    pub items: Vec<PriceItemView>,
}

#[derive(Deserialize, IntoParams, Debug, Default)]
#[into_params(parameter_in = Query)]
pub struct PriceFilter {
    pub provider: Option<String>,
    pub model: Option<String>,
}

fn to_pricing_items(items: &[PriceItemView]) -> CatalogResult<Vec<PriceItem>> {
    items
        .iter()
        .map(|item| {
            Ok(PriceItem {
                pricing_type: PricingType::parse(&item.pricing_type).map_err(invalid)?,
                unit: PriceUnit::parse(&item.unit).map_err(invalid)?,
                unit_price: item.unit_price,
            })
        })
        .collect()
}

fn invalid(err: PricingError) -> CatalogError {
    match err {
        PricingError::Sql(err) => CatalogError::Db(err),
        other => CatalogError::Invalid(other.to_string()),
    }
}

pub async fn create(db: &Db, actor: &Actor, input: NewPrice) -> CatalogResult<PriceVersionView> {
    check_currency(&input.currency)?;
    let now = now_ms();
    let effective_from = input.effective_from.unwrap_or(now);
    if effective_from < now - BACKDATE_TOLERANCE_MS {
        return Err(CatalogError::Invalid(format!(
            "effective_from {effective_from} is in the past; prices cannot be backdated (omit it for \"now\")"
        )));
    }
    ensure_model(db, &input.provider, &input.model).await?;
    let version = NewPriceVersion {
        provider: input.provider,
        model: input.model,
        currency: input.currency,
        min_charge: input.min_charge.unwrap_or(Decimal::ZERO),
        effective_from,
        effective_to: None,
        items: to_pricing_items(&input.items)?,
        remark: input.remark,
        created_by: Some(actor.0.clone()),
    };
    version.validate().map_err(invalid)?;
    // The pricing module writes the version in its own transaction; the audit row follows.
    let id = pricing::create_price_version(db, &version)
        .await
        .map_err(invalid)?;
    let view = get(db, id).await?;
    let mut tx = db.begin_write().await?;
    audit::record(
        tx.conn(),
        db.dialect(),
        actor,
        "price.create",
        "price_version",
        Some(&id.to_string()),
        &view,
    )
    .await?;
    tx.commit().await?;
    Ok(view)
}

const COLUMNS: &str =
    "id, provider_code, model_code, currency, min_charge, effective_from, effective_to, status, remark, created_by, created_at";

pub async fn list(db: &Db, filter: &PriceFilter) -> CatalogResult<Vec<PriceVersionView>> {
    let mut sql = format!("SELECT {COLUMNS} FROM price_versions WHERE 1 = 1");
    let mut binds = Vec::new();
    if let Some(provider) = &filter.provider {
        sql.push_str(" AND provider_code = ?");
        binds.push(provider.clone());
    }
    if let Some(model) = &filter.model {
        sql.push_str(" AND model_code = ?");
        binds.push(model.clone());
    }
    sql.push_str(" ORDER BY provider_code, model_code, effective_from DESC, id DESC");
    let sql = db.sql(&sql).into_owned();
    let mut query = sqlx::query(&sql);
    for bind in binds {
        query = query.bind(bind);
    }
    let mut conn = Conn::from(db.pool().acquire().await?);
    let rows = query.fetch_all(&mut conn).await?;
    let mut versions = Vec::with_capacity(rows.len());
    for row in rows {
        let mut view = view_from_row(&row)?;
        view.items = load_items(db, &mut conn, view.id).await?;
        versions.push(view);
    }
    Ok(versions)
}

pub async fn get(db: &Db, id: i64) -> CatalogResult<PriceVersionView> {
    let mut conn = Conn::from(db.pool().acquire().await?);
    let sql = db
        .sql(&format!(
            "SELECT {COLUMNS} FROM price_versions WHERE id = ?"
        ))
        .into_owned();
    let Some(row) = sqlx::query(&sql).bind(id).fetch_optional(&mut conn).await? else {
        return Err(CatalogError::NotFound(format!(
            "price version {id} does not exist"
        )));
    };
    let mut view = view_from_row(&row)?;
    view.items = load_items(db, &mut conn, id).await?;
    Ok(view)
}

/// Withdraws a version that is not yet in force. One in force is immutable (409).
pub async fn delete(db: &Db, actor: &Actor, id: i64) -> CatalogResult<()> {
    let view = get(db, id).await?;
    let now = now_ms();
    if view.effective_from <= now {
        return Err(CatalogError::Conflict(format!(
            "price version {id} is in force since {}; prices are never changed once effective — create a new version instead",
            view.effective_from
        )));
    }
    let mut tx = db.begin_write().await?;
    // Guarded by effective_from so a version that came into force meanwhile is kept.
    let sql = db.sql("DELETE FROM price_versions WHERE id = ? AND effective_from > ?");
    let deleted = sqlx::query(&sql)
        .bind(id)
        .bind(now)
        .execute(tx.conn())
        .await?;
    if deleted.rows_affected() == 0 {
        return Err(CatalogError::Conflict(format!(
            "price version {id} came into force; it can no longer be deleted"
        )));
    }
    sqlx::query(&db.sql("DELETE FROM price_items WHERE version_id = ?"))
        .bind(id)
        .execute(tx.conn())
        .await?;
    audit::record(
        tx.conn(),
        db.dialect(),
        actor,
        "price.delete",
        "price_version",
        Some(&id.to_string()),
        &view,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

fn view_from_row(row: &sqlx::any::AnyRow) -> CatalogResult<PriceVersionView> {
    let min_charge: String = row.try_get("min_charge")?;
    Ok(PriceVersionView {
        id: row.try_get("id")?,
        provider: row.try_get("provider_code")?,
        model: row.try_get("model_code")?,
        currency: row.try_get("currency")?,
        min_charge: parse_stored(&min_charge)?,
        effective_from: row.try_get("effective_from")?,
        effective_to: row.try_get("effective_to")?,
        status: row.try_get("status")?,
        remark: row.try_get("remark")?,
        created_by: row.try_get("created_by")?,
        created_at: row.try_get("created_at")?,
        items: Vec::new(),
    })
}

async fn load_items(db: &Db, conn: &mut Conn, id: i64) -> CatalogResult<Vec<PriceItemView>> {
    let sql = db.sql("SELECT pricing_type, unit, unit_price FROM price_items WHERE version_id = ? ORDER BY pricing_type");
    let rows = sqlx::query(&sql).bind(id).fetch_all(&mut *conn).await?;
    let mut items = Vec::with_capacity(rows.len());
    for row in rows {
        let unit_price: String = row.try_get("unit_price")?;
        items.push(PriceItemView {
            pricing_type: row.try_get("pricing_type")?,
            unit: row.try_get("unit")?,
            unit_price: parse_stored(&unit_price)?,
        });
    }
    Ok(items)
}

fn parse_stored(raw: &str) -> CatalogResult<Decimal> {
    Decimal::from_str(raw.trim())
        .map_err(|_| CatalogError::Invalid(format!("stored price {raw:?} is not a decimal")))
}

async fn ensure_model(db: &Db, provider: &str, model: &str) -> CatalogResult<()> {
    let sql = db.sql("SELECT id FROM models WHERE provider_code = ? AND model_code = ?");
    let found = sqlx::query(&sql)
        .bind(provider.to_string())
        .bind(model.to_string())
        .fetch_optional(db.pool())
        .await?;
    if found.is_none() {
        return Err(CatalogError::Invalid(format!(
            "model {model:?} of provider {provider:?} is not in the catalog; create it first (POST /admin/v1/models)"
        )));
    }
    Ok(())
}
