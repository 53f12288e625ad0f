//! Models of a provider: what they are (text, image, embedding), which quota meters them,
//! and whether calls to them are allowed.

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};

use super::{
    audit, check_key, check_text, quota_types, Actor, CatalogError, CatalogResult, Status,
};
use crate::storage::{
    insert_returning_id, is_unique_violation, now_ms, with_returning_id, Db, WriteTx,
};

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct Model {
    pub id: i64,
    /// Provider code.
    pub provider: String,
    /// Model name as it appears in request bodies.
    pub model: String,
    pub display_name: Option<String>,
    /// text, image or embedding.
    pub model_type: String,
    /// Quota type override; when absent the quota type configured for `model_type` applies.
    pub quota_type: Option<String>,
    pub status: Status,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Deserialize, ToSchema, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct NewModel {
    pub provider: String,
    pub model: String,
    #[serde(default)]
    pub display_name: Option<String>,
    /// text (default), image or embedding.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    #[serde(default)]
    pub quota_type: Option<String>,
    #[serde(default)]
    pub status: Status,
}

fn default_model_type() -> String {
    "text".to_string()
}

#[derive(Deserialize, Serialize, ToSchema, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelPatch {
    pub display_name: Option<String>,
    pub model_type: Option<String>,
    pub quota_type: Option<String>,
    pub status: Option<Status>,
}

#[derive(Deserialize, IntoParams, Debug, Default)]
#[into_params(parameter_in = Query)]
pub struct ModelFilter {
    /// Only models of this provider.
    pub provider: Option<String>,
}

const COLUMNS: &str = "id, provider_code, model_code, display_name, model_type, quota_type, status, created_at, updated_at";

fn from_row(row: &AnyRow) -> Result<Model, sqlx::Error> {
    Ok(Model {
        id: row.try_get("id")?,
        provider: row.try_get("provider_code")?,
        model: row.try_get("model_code")?,
        display_name: row.try_get("display_name")?,
        model_type: row.try_get("model_type")?,
        quota_type: row.try_get("quota_type")?,
        status: Status::parse(&row.try_get::<String, _>("status")?),
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

pub async fn list(db: &Db, filter: &ModelFilter) -> CatalogResult<Vec<Model>> {
    let rows = match &filter.provider {
        Some(provider) => {
            let sql = db
                .sql(&format!("SELECT {COLUMNS} FROM models WHERE provider_code = ? ORDER BY provider_code, model_code"))
                .into_owned();
            sqlx::query(&sql)
                .bind(provider.clone())
                .fetch_all(db.pool())
                .await?
        }
        None => {
            let sql = format!("SELECT {COLUMNS} FROM models ORDER BY provider_code, model_code");
            sqlx::query(&sql).fetch_all(db.pool()).await?
        }
    };
    Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
}

pub async fn get(db: &Db, id: i64) -> CatalogResult<Model> {
    let sql = db
        .sql(&format!("SELECT {COLUMNS} FROM models WHERE id = ?"))
        .into_owned();
    let row = sqlx::query(&sql).bind(id).fetch_optional(db.pool()).await?;
    match row {
        Some(row) => Ok(from_row(&row)?),
        None => Err(CatalogError::NotFound(format!("model {id} does not exist"))),
    }
}

/// The model row of (provider, model), if configured.
pub async fn find(db: &Db, provider: &str, model: &str) -> CatalogResult<Option<Model>> {
    let sql = db
        .sql(&format!(
            "SELECT {COLUMNS} FROM models WHERE provider_code = ? AND model_code = ?"
        ))
        .into_owned();
    let row = sqlx::query(&sql)
        .bind(provider.to_string())
        .bind(model.to_string())
        .fetch_optional(db.pool())
        .await?;
    Ok(row.as_ref().map(from_row).transpose()?)
}

pub async fn create(db: &Db, actor: &Actor, input: NewModel) -> CatalogResult<Model> {
    check_key("model", &input.model)?;
    if let Some(name) = &input.display_name {
        check_text("display_name", name, 191)?;
    }
    let mut tx = db.begin_write().await?;
    ensure_provider(db, &mut tx, &input.provider).await?;
    check_metering(db, &mut tx, &input.model_type, input.quota_type.as_deref()).await?;
    let now = now_ms();
    let sql = with_returning_id(
        db.dialect(),
        &db.sql(
            "INSERT INTO models (provider_code, model_code, display_name, model_type, quota_type, status, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        ),
    );
    let query = sqlx::query(&sql)
        .bind(input.provider.clone())
        .bind(input.model.clone())
        .bind(input.display_name.clone())
        .bind(input.model_type.clone())
        .bind(input.quota_type.clone())
        .bind(input.status.as_str())
        .bind(now)
        .bind(now);
    let id = match insert_returning_id(db.dialect(), tx.conn(), query).await {
        Err(err) if is_unique_violation(&err) => {
            return Err(CatalogError::Conflict(format!(
                "model {:?} of provider {:?} already exists",
                input.model, input.provider
            )))
        }
        other => other?,
    };
    let model = Model {
        id,
        provider: input.provider,
        model: input.model,
        display_name: input.display_name,
        model_type: input.model_type,
        quota_type: input.quota_type,
        status: input.status,
        created_at: now,
        updated_at: now,
    };
    audit::record(
        tx.conn(),
        db.dialect(),
        actor,
        "model.create",
        "model",
        Some(&id.to_string()),
        &model,
    )
    .await?;
    tx.commit().await?;
    Ok(model)
}

pub async fn update(db: &Db, actor: &Actor, id: i64, patch: ModelPatch) -> CatalogResult<Model> {
    let mut model = get(db, id).await?;
    if let Some(name) = &patch.display_name {
        check_text("display_name", name, 191)?;
        model.display_name = Some(name.clone());
    }
    if let Some(model_type) = &patch.model_type {
        model.model_type = model_type.clone();
    }
    if patch.quota_type.is_some() {
        model.quota_type = patch.quota_type.clone();
    }
    if let Some(status) = patch.status {
        model.status = status;
    }
    model.updated_at = now_ms();
    let mut tx = db.begin_write().await?;
    check_metering(db, &mut tx, &model.model_type, model.quota_type.as_deref()).await?;
    let sql = db.sql(
        "UPDATE models SET display_name = ?, model_type = ?, quota_type = ?, status = ?, updated_at = ? WHERE id = ?",
    );
    let result = sqlx::query(&sql)
        .bind(model.display_name.clone())
        .bind(model.model_type.clone())
        .bind(model.quota_type.clone())
        .bind(model.status.as_str())
        .bind(model.updated_at)
        .bind(id)
        .execute(tx.conn())
        .await?;
    if result.rows_affected() == 0 {
        return Err(CatalogError::NotFound(format!("model {id} does not exist")));
    }
    audit::record(
        tx.conn(),
        db.dialect(),
        actor,
        "model.update",
        "model",
        Some(&id.to_string()),
        &patch,
    )
    .await?;
    tx.commit().await?;
    Ok(model)
}

/// Deletes a model without price versions; a priced model is disabled instead, so its
/// price history stays explainable.
pub async fn delete(db: &Db, actor: &Actor, id: i64) -> CatalogResult<()> {
    let model = get(db, id).await?;
    let mut tx = db.begin_write().await?;
    let sql =
        db.sql("SELECT COUNT(*) FROM price_versions WHERE provider_code = ? AND model_code = ?");
    let prices: i64 = sqlx::query(&sql)
        .bind(model.provider.clone())
        .bind(model.model.clone())
        .fetch_one(tx.conn())
        .await?
        .try_get(0)?;
    if prices > 0 {
        return Err(CatalogError::Conflict(format!(
            "model {id} has {prices} price version(s); disable it instead (status: disabled)"
        )));
    }
    let sql = db.sql("DELETE FROM models WHERE id = ?");
    let result = sqlx::query(&sql).bind(id).execute(tx.conn()).await?;
    if result.rows_affected() == 0 {
        return Err(CatalogError::NotFound(format!("model {id} does not exist")));
    }
    audit::record(
        tx.conn(),
        db.dialect(),
        actor,
        "model.delete",
        "model",
        Some(&id.to_string()),
        &model,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

async fn ensure_provider(db: &Db, tx: &mut WriteTx, provider: &str) -> CatalogResult<()> {
    let sql = db.sql("SELECT code FROM providers WHERE code = ?");
    if sqlx::query(&sql)
        .bind(provider.to_string())
        .fetch_optional(tx.conn())
        .await?
        .is_none()
    {
        return Err(CatalogError::Invalid(format!(
            "provider {provider:?} does not exist; create it first (POST /admin/v1/providers)"
        )));
    }
    Ok(())
}

/// A model must be meterable: its quota type override exists, or its model type has a
/// default quota type.
async fn check_metering(
    db: &Db,
    tx: &mut WriteTx,
    model_type: &str,
    quota_type: Option<&str>,
) -> CatalogResult<()> {
    if let Some(quota_type) = quota_type {
        return quota_types::ensure_exists(tx.conn(), db.dialect(), quota_type).await;
    }
    match quota_types::default_for_model_type(tx.conn(), db.dialect(), model_type).await? {
        Some(_) => Ok(()),
        None => Err(CatalogError::Invalid(format!(
            "no quota type meters model_type {model_type:?}; use text, image or embedding, or set quota_type"
        ))),
    }
}
