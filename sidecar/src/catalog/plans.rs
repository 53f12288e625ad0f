//! Subscription plans and the quota each grants per monthly period.

use std::str::FromStr;

use crate::storage::Conn;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;
use utoipa::ToSchema;

use super::{
    as_u64, audit, check_code, check_currency, check_text, default_currency, positive_units,
    quota_types, Actor, CatalogError, CatalogResult, Status,
};
use crate::storage::{
    insert_returning_id, is_unique_violation, now_ms, with_returning_id, Db, Dialect, WriteTx,
};

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct PlanQuota {
    pub quota_type: String,
    /// Units granted at each period start (e.g. tokens per month).
    pub amount: u64,
    /// Consumption order among a user's lots (the ledger's rule: lower first).
    #[serde(default = "default_priority")]
    pub priority: i32,
}

/// Same default as the ledger's grants: equal priority, so soonest expiry burns first.
pub fn default_priority() -> i32 {
    0
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub id: i64,
    pub code: String,
    pub name: String,
    pub description: Option<String>,
    /// List price per period, decimal string.
    #[schema(value_type = Option<String>)]
    pub price: Option<Decimal>,
    pub currency: String,
    /// Always `month`: quotas are granted at 00:00 on the 1st in the configured time zone.
    pub period: String,
    pub status: Status,
    pub quotas: Vec<PlanQuota>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Deserialize, ToSchema, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct NewPlan {
    pub code: String,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub price: Option<Decimal>,
    #[serde(default = "default_currency")]
    pub currency: String,
    #[serde(default)]
    pub status: Status,
    pub quotas: Vec<PlanQuota>,
}

/// Fields to change. New `quotas` replace the old ones and apply from the next grant on.
#[derive(Deserialize, Serialize, ToSchema, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct PlanPatch {
    pub name: Option<String>,
    pub description: Option<String>,
    #[schema(value_type = Option<String>)]
    pub price: Option<Decimal>,
    pub status: Option<Status>,
    pub quotas: Option<Vec<PlanQuota>>,
}

const COLUMNS: &str =
    "id, code, name, description, price, currency, period, status, created_at, updated_at";

fn from_row(row: &AnyRow) -> Result<Plan, CatalogError> {
    let price: Option<String> = row.try_get("price")?;
    let price = price
        .map(|raw| {
            Decimal::from_str(&raw)
                .map_err(|_| CatalogError::Invalid(format!("stored plan price {raw:?}")))
        })
        .transpose()?;
    Ok(Plan {
        id: row.try_get("id")?,
        code: row.try_get("code")?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        price,
        currency: row.try_get("currency")?,
        period: row.try_get("period")?,
        status: Status::parse(&row.try_get::<String, _>("status")?),
        quotas: Vec::new(),
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

async fn load_quotas(
    conn: &mut Conn,
    dialect: Dialect,
    plan_id: i64,
) -> CatalogResult<Vec<PlanQuota>> {
    let sql = dialect.sql("SELECT quota_type, amount, priority FROM plan_quotas WHERE plan_id = ? ORDER BY quota_type");
    let rows = sqlx::query(&sql)
        .bind(plan_id)
        .fetch_all(&mut *conn)
        .await?;
    let mut quotas = Vec::with_capacity(rows.len());
    for row in rows {
        quotas.push(PlanQuota {
            quota_type: row.try_get("quota_type")?,
            amount: as_u64(row.try_get("amount")?),
            priority: row.try_get::<i32, _>("priority")?,
        });
    }
    Ok(quotas)
}

pub async fn list(db: &Db) -> CatalogResult<Vec<Plan>> {
    let mut conn = Conn::from(db.pool().acquire().await?);
    let sql = format!("SELECT {COLUMNS} FROM subscription_plans ORDER BY code");
    let rows = sqlx::query(&sql).fetch_all(&mut conn).await?;
    let mut plans = Vec::with_capacity(rows.len());
    for row in rows {
        let mut plan = from_row(&row)?;
        plan.quotas = load_quotas(&mut conn, db.dialect(), plan.id).await?;
        plans.push(plan);
    }
    Ok(plans)
}

/// A plan by code, read on `conn` (inside a transaction when the caller has one).
pub async fn get_on(conn: &mut Conn, dialect: Dialect, code: &str) -> CatalogResult<Plan> {
    let sql = dialect
        .sql(&format!(
            "SELECT {COLUMNS} FROM subscription_plans WHERE code = ?"
        ))
        .into_owned();
    let row = sqlx::query(&sql)
        .bind(code.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else {
        return Err(CatalogError::NotFound(format!(
            "plan {code:?} does not exist"
        )));
    };
    let mut plan = from_row(&row)?;
    plan.quotas = load_quotas(conn, dialect, plan.id).await?;
    Ok(plan)
}

pub async fn get(db: &Db, code: &str) -> CatalogResult<Plan> {
    let mut conn = Conn::from(db.pool().acquire().await?);
    get_on(&mut conn, db.dialect(), code).await
}

pub async fn create(db: &Db, actor: &Actor, input: NewPlan) -> CatalogResult<Plan> {
    check_code("code", &input.code)?;
    check_text("name", &input.name, 191)?;
    check_description(input.description.as_deref())?;
    check_currency(&input.currency)?;
    check_price(input.price)?;
    let mut tx = db.begin_write().await?;
    check_quotas(db, &mut tx, &input.quotas).await?;
    let now = now_ms();
    let sql = with_returning_id(
        db.dialect(),
        &db.sql(
            "INSERT INTO subscription_plans (code, name, description, price, currency, period, status, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, 'month', ?, ?, ?)",
        ),
    );
    let query = sqlx::query(&sql)
        .bind(input.code.clone())
        .bind(input.name.clone())
        .bind(input.description.clone())
        .bind(input.price.map(|p| p.to_string()))
        .bind(input.currency.clone())
        .bind(input.status.as_str())
        .bind(now)
        .bind(now);
    let id = match insert_returning_id(db.dialect(), tx.conn(), query).await {
        Err(err) if is_unique_violation(&err) => {
            return Err(CatalogError::Conflict(format!(
                "plan {:?} already exists",
                input.code
            )))
        }
        other => other?,
    };
    write_quotas(db, &mut tx, id, &input.quotas).await?;
    let plan = get_on(tx.conn(), db.dialect(), &input.code).await?;
    audit::record(
        tx.conn(),
        db.dialect(),
        actor,
        "plan.create",
        "plan",
        Some(&plan.code),
        &plan,
    )
    .await?;
    tx.commit().await?;
    Ok(plan)
}

pub async fn update(db: &Db, actor: &Actor, code: &str, patch: PlanPatch) -> CatalogResult<Plan> {
    if let Some(name) = &patch.name {
        check_text("name", name, 191)?;
    }
    check_description(patch.description.as_deref())?;
    check_price(patch.price)?;
    let mut tx = db.begin_write().await?;
    let mut plan = get_on(tx.conn(), db.dialect(), code).await?;
    if let Some(name) = &patch.name {
        plan.name = name.clone();
    }
    if patch.description.is_some() {
        plan.description = patch.description.clone();
    }
    if patch.price.is_some() {
        plan.price = patch.price;
    }
    if let Some(status) = patch.status {
        plan.status = status;
    }
    let sql = db.sql("UPDATE subscription_plans SET name = ?, description = ?, price = ?, status = ?, updated_at = ? WHERE id = ?");
    sqlx::query(&sql)
        .bind(plan.name.clone())
        .bind(plan.description.clone())
        .bind(plan.price.map(|p| p.to_string()))
        .bind(plan.status.as_str())
        .bind(now_ms())
        .bind(plan.id)
        .execute(tx.conn())
        .await?;
    if let Some(quotas) = &patch.quotas {
        check_quotas(db, &mut tx, quotas).await?;
        let sql = db.sql("DELETE FROM plan_quotas WHERE plan_id = ?");
        sqlx::query(&sql).bind(plan.id).execute(tx.conn()).await?;
        write_quotas(db, &mut tx, plan.id, quotas).await?;
    }
    let plan = get_on(tx.conn(), db.dialect(), code).await?;
    audit::record(
        tx.conn(),
        db.dialect(),
        actor,
        "plan.update",
        "plan",
        Some(code),
        &patch,
    )
    .await?;
    tx.commit().await?;
    Ok(plan)
}

/// Deletes a plan nobody ever subscribed to; otherwise disable it.
pub async fn delete(db: &Db, actor: &Actor, code: &str) -> CatalogResult<()> {
    let mut tx = db.begin_write().await?;
    let plan = get_on(tx.conn(), db.dialect(), code).await?;
    let sql = db.sql("SELECT COUNT(*) FROM memberships WHERE plan_id = ?");
    let members: i64 = sqlx::query(&sql)
        .bind(plan.id)
        .fetch_one(tx.conn())
        .await?
        .try_get(0)?;
    if members > 0 {
        return Err(CatalogError::Conflict(format!(
            "plan {code:?} has {members} membership(s); disable it instead (status: disabled)"
        )));
    }
    for sql in [
        "DELETE FROM plan_quotas WHERE plan_id = ?",
        "DELETE FROM subscription_plans WHERE id = ?",
    ] {
        sqlx::query(&db.sql(sql))
            .bind(plan.id)
            .execute(tx.conn())
            .await?;
    }
    audit::record(
        tx.conn(),
        db.dialect(),
        actor,
        "plan.delete",
        "plan",
        Some(code),
        &plan,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

async fn check_quotas(db: &Db, tx: &mut WriteTx, quotas: &[PlanQuota]) -> CatalogResult<()> {
    if quotas.is_empty() {
        return Err(CatalogError::Invalid(
            "a plan needs at least one quota".into(),
        ));
    }
    for (i, quota) in quotas.iter().enumerate() {
        positive_units("quotas[].amount", quota.amount)?;
        if quotas[..i]
            .iter()
            .any(|other| other.quota_type == quota.quota_type)
        {
            return Err(CatalogError::Invalid(format!(
                "quota_type {:?} appears twice in quotas",
                quota.quota_type
            )));
        }
        quota_types::ensure_exists(tx.conn(), db.dialect(), &quota.quota_type).await?;
    }
    Ok(())
}

async fn write_quotas(
    db: &Db,
    tx: &mut WriteTx,
    plan_id: i64,
    quotas: &[PlanQuota],
) -> CatalogResult<()> {
    let sql = db
        .sql("INSERT INTO plan_quotas (plan_id, quota_type, amount, priority) VALUES (?, ?, ?, ?)");
    for quota in quotas {
        sqlx::query(&sql)
            .bind(plan_id)
            .bind(quota.quota_type.clone())
            .bind(positive_units("quotas[].amount", quota.amount)?)
            .bind(quota.priority)
            .execute(tx.conn())
            .await?;
    }
    Ok(())
}

fn check_description(description: Option<&str>) -> CatalogResult<()> {
    match description {
        Some(text) if text.chars().count() > 1000 => Err(CatalogError::Invalid(
            "description must be at most 1000 characters".into(),
        )),
        _ => Ok(()),
    }
}

pub fn check_price(price: Option<Decimal>) -> CatalogResult<()> {
    match price {
        Some(price) if price.is_sign_negative() => {
            Err(CatalogError::Invalid("price must not be negative".into()))
        }
        _ => Ok(()),
    }
}
