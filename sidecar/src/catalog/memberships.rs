//! Memberships: a user's subscription to a plan, keyed by the membership system's order id.
//!
//! Activation records the membership (idempotent by order id); the plan's quotas for the
//! current period are then granted by the ledger's per-membership reset, which is itself
//! idempotent per (membership, period) — so a retried activation converges.

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};

use super::{audit, check_key, Actor, CatalogError, CatalogResult, Status};
use crate::storage::{insert_returning_id, now_ms, with_returning_id, Db};

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub id: i64,
    pub user_id: String,
    pub plan_id: i64,
    pub plan_code: String,
    /// active, cancelled or expired.
    pub status: String,
    pub starts_at: i64,
    pub ends_at: Option<i64>,
    /// The membership/order id of the system that sold it (idempotency key).
    pub order_id: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Deserialize, ToSchema, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct NewMembership {
    /// Membership or order id from the selling system; activating it again is a no-op.
    #[serde(alias = "membership_id")]
    pub order_id: String,
    pub user_id: String,
    pub plan_code: String,
    /// Unix ms; default now.
    #[serde(default)]
    pub starts_at: Option<i64>,
    /// Unix ms; default open-ended.
    #[serde(default)]
    pub ends_at: Option<i64>,
}

#[derive(Deserialize, IntoParams, Debug, Default)]
#[into_params(parameter_in = Query)]
pub struct MembershipFilter {
    pub user_id: Option<String>,
}

/// Outcome of recording a membership.
pub struct Recorded {
    pub membership: Membership,
    /// False when the order id was already recorded with the same user and plan.
    pub created: bool,
}

const COLUMNS: &str =
    "m.id, m.user_id, m.plan_id, p.code AS plan_code, m.status, m.starts_at, m.ends_at, \
    m.external_ref, m.created_at, m.updated_at";
const FROM: &str = "memberships m JOIN subscription_plans p ON p.id = m.plan_id";

fn from_row(row: &AnyRow) -> Result<Membership, sqlx::Error> {
    Ok(Membership {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        plan_id: row.try_get("plan_id")?,
        plan_code: row.try_get("plan_code")?,
        status: row.try_get("status")?,
        starts_at: row.try_get("starts_at")?,
        ends_at: row.try_get("ends_at")?,
        order_id: row.try_get("external_ref")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

pub async fn list(db: &Db, filter: &MembershipFilter) -> CatalogResult<Vec<Membership>> {
    let rows = match &filter.user_id {
        Some(user) => {
            let sql = db
                .sql(&format!(
                    "SELECT {COLUMNS} FROM {FROM} WHERE m.user_id = ? ORDER BY m.id"
                ))
                .into_owned();
            sqlx::query(&sql)
                .bind(user.clone())
                .fetch_all(db.pool())
                .await?
        }
        None => {
            let sql = format!("SELECT {COLUMNS} FROM {FROM} ORDER BY m.id");
            sqlx::query(&sql).fetch_all(db.pool()).await?
        }
    };
    Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
}

/// Records a membership once per order id (with its audit row, in one transaction).
pub async fn record(db: &Db, actor: &Actor, input: &NewMembership) -> CatalogResult<Recorded> {
    check_key("order_id", &input.order_id)?;
    check_key("user_id", &input.user_id)?;
    let now = now_ms();
    let starts_at = input.starts_at.unwrap_or(now);
    if let Some(ends_at) = input.ends_at {
        if ends_at <= starts_at || ends_at <= now {
            return Err(CatalogError::Invalid(
                "ends_at must be after starts_at and in the future".into(),
            ));
        }
    }
    let mut tx = db.begin_write().await?;
    // Locking the plan row serialises concurrent activations of one order on PG/MySQL.
    let sql = db
        .sql(&format!(
            "SELECT id, status FROM subscription_plans WHERE code = ?{}",
            db.dialect().for_update()
        ))
        .into_owned();
    let Some(plan) = sqlx::query(&sql)
        .bind(input.plan_code.clone())
        .fetch_optional(tx.conn())
        .await?
    else {
        return Err(CatalogError::Invalid(format!(
            "plan {:?} does not exist",
            input.plan_code
        )));
    };
    let plan_id: i64 = plan.try_get("id")?;
    let sql = db
        .sql(&format!(
            "SELECT {COLUMNS} FROM {FROM} WHERE m.external_ref = ? ORDER BY m.id"
        ))
        .into_owned();
    if let Some(row) = sqlx::query(&sql)
        .bind(input.order_id.clone())
        .fetch_optional(tx.conn())
        .await?
    {
        let existing = from_row(&row)?;
        if existing.user_id != input.user_id || existing.plan_id != plan_id {
            return Err(CatalogError::Conflict(format!(
                "order {:?} already activated plan {:?} for user {:?}",
                input.order_id, existing.plan_code, existing.user_id
            )));
        }
        tx.rollback().await?;
        return Ok(Recorded {
            membership: existing,
            created: false,
        });
    }
    if Status::parse(&plan.try_get::<String, _>("status")?) == Status::Disabled {
        return Err(CatalogError::Invalid(format!(
            "plan {:?} is disabled",
            input.plan_code
        )));
    }
    let sql = with_returning_id(
        db.dialect(),
        &db.sql(
            "INSERT INTO memberships (user_id, plan_id, status, starts_at, ends_at, external_ref, created_at, updated_at) \
             VALUES (?, ?, 'active', ?, ?, ?, ?, ?)",
        ),
    );
    let query = sqlx::query(&sql)
        .bind(input.user_id.clone())
        .bind(plan_id)
        .bind(starts_at)
        .bind(input.ends_at)
        .bind(input.order_id.clone())
        .bind(now)
        .bind(now);
    let id = insert_returning_id(db.dialect(), tx.conn(), query).await?;
    let membership = Membership {
        id,
        user_id: input.user_id.clone(),
        plan_id,
        plan_code: input.plan_code.clone(),
        status: "active".into(),
        starts_at,
        ends_at: input.ends_at,
        order_id: Some(input.order_id.clone()),
        created_at: now,
        updated_at: now,
    };
    audit::record(
        tx.conn(),
        db.dialect(),
        actor,
        "membership.activate",
        "membership",
        Some(&id.to_string()),
        &membership,
    )
    .await?;
    tx.commit().await?;
    Ok(Recorded {
        membership,
        created: true,
    })
}
