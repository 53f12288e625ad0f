//! Quota endpoints: membership activation, package purchases, admin grants, a user's quota
//! view and direct consumption for callers outside the mesh.
//!
//! Grants go through the ledger, which makes each idempotent by its source: a membership by
//! (membership, period), a purchase by order id, an admin grant by (source_type, source_id).
//! The ledger commits a grant in its own transaction; its audit row follows right after
//! (and a repeat of the call writes it if it is still missing).

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use chrono::{Days, TimeZone, Utc};
use llm_meter_protocol::{AuthorizeResponse, Decision, Denial, DenyCode, Usage};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;

use crate::api::auth::AdminActor;
use crate::api::docs::Problem;
use crate::api::problem::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult};
use crate::api::AppState;
use crate::catalog::memberships::{self, Membership, MembershipFilter, NewMembership};
use crate::catalog::{audit, packages, Actor};
use crate::jobs::Period;
use crate::ledger::{
    Balance, ConsumeRequest, ConsumeResponse, GrantRequest, GrantResponse, LedgerError, LotDetail,
};

/// Source type of package purchases (source id = order id).
pub const PURCHASE_SOURCE: &str = "purchase";
/// Default source type of admin grants.
pub const ADMIN_GRANT_SOURCE: &str = "admin_grant";

// ---- memberships ----

#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct MembershipActivation {
    pub membership: Membership,
    /// False when this order id had already been activated (nothing new was recorded).
    pub created: bool,
    /// Period (YYYY-MM, configured time zone) whose quota was granted.
    pub period: String,
    /// Plan lots granted by this call (0 when the period had already been granted).
    pub lots_granted: u64,
}

/// Activate a membership: records it (idempotent by `order_id`) and grants the plan's
/// quotas for the current period.
#[utoipa::path(post, path = "/admin/v1/memberships", tag = "quota", security(("admin" = [])),
    request_body = NewMembership,
    responses((status = 201, body = MembershipActivation), (status = 200, description = "already activated", body = MembershipActivation),
        (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn activate_membership(
    State(state): State<AppState>,
    Extension(actor): Extension<AdminActor>,
    ApiJson(input): ApiJson<NewMembership>,
) -> ApiResult<(StatusCode, Json<MembershipActivation>)> {
    let recorded = memberships::record(&state.db, &Actor::from(&actor), &input).await?;
    let now = state.ledger.now();
    let period = Period::containing(
        Utc.timestamp_millis_opt(now).single().unwrap_or_default(),
        state.timezone,
    );
    let period_end = period.next().starts_at(state.timezone).timestamp_millis();
    let mut lots_granted = 0;
    if recorded.membership.starts_at < period_end {
        let outcome = state
            .ledger
            .reset_membership(recorded.membership.id, &period.to_string(), now)
            .await?;
        if let crate::ledger::ResetOutcome::Reset {
            lots_granted: granted,
            ..
        } = outcome
        {
            lots_granted = granted;
        }
    }
    let status = if recorded.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(MembershipActivation {
            membership: recorded.membership,
            created: recorded.created,
            period: period.to_string(),
            lots_granted,
        }),
    ))
}

/// List memberships, optionally of one user.
#[utoipa::path(get, path = "/admin/v1/memberships", tag = "quota", security(("admin" = [])), params(MembershipFilter),
    responses((status = 200, body = [Membership])))]
pub async fn list_memberships(
    State(state): State<AppState>,
    ApiQuery(filter): ApiQuery<MembershipFilter>,
) -> ApiResult<Json<Vec<Membership>>> {
    Ok(Json(memberships::list(&state.db, &filter).await?))
}

// ---- purchases ----

#[derive(Deserialize, ToSchema, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct NewPurchase {
    /// The payment system's order id: recording it again is a no-op.
    pub order_id: String,
    pub user_id: String,
    pub package_code: String,
    /// Extra units on top of the package amount (promotion), default 0.
    #[serde(default)]
    pub bonus: u64,
    #[serde(default)]
    pub remark: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct PurchaseRecorded {
    pub order_id: String,
    pub user_id: String,
    pub package_code: String,
    pub quota_type: String,
    /// Package units.
    pub amount: u64,
    pub bonus: u64,
    /// amount + bonus: the units of the lot.
    pub total: u64,
    pub lot_id: i64,
    pub expires_at: Option<i64>,
    /// False when the order had already been recorded.
    pub created: bool,
    /// Units of this purchase that paid existing debt.
    pub debt_repaid: u64,
}

/// Record a token package purchase (idempotent by `order_id`; a retry with other figures is 409).
#[utoipa::path(post, path = "/admin/v1/purchases", tag = "quota", security(("admin" = [])), request_body = NewPurchase,
    responses((status = 201, body = PurchaseRecorded), (status = 200, description = "already recorded", body = PurchaseRecorded),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn record_purchase(
    State(state): State<AppState>,
    Extension(actor): Extension<AdminActor>,
    ApiJson(input): ApiJson<NewPurchase>,
) -> ApiResult<(StatusCode, Json<PurchaseRecorded>)> {
    let package = packages::get(&state.db, &input.package_code).await?;
    let total = package
        .amount
        .checked_add(input.bonus)
        .ok_or_else(|| ApiError::unprocessable("amount + bonus is too large"))?;
    let now = state.ledger.now();
    let expires_at = package
        .valid_days
        .map(|days| purchase_expiry(now, days, state.timezone));
    let request = GrantRequest {
        user_id: input.user_id.clone(),
        quota_type: package.quota_type.clone(),
        amount: total,
        source_type: PURCHASE_SOURCE.to_string(),
        source_id: input.order_id.clone(),
        remark: Some(match &input.remark {
            Some(remark) => format!(
                "package {} ({} + bonus {}): {remark}",
                package.code, package.amount, input.bonus
            ),
            None => format!(
                "package {} ({} + bonus {})",
                package.code, package.amount, input.bonus
            ),
        }),
        effective_from: None,
        expires_at,
        priority: package.priority,
    };
    let grant = match existing_lot(&state, &request).await? {
        Some(existing) => existing,
        None => grant_or_replay(&state, &request).await?,
    };
    let recorded = PurchaseRecorded {
        order_id: input.order_id,
        user_id: input.user_id,
        package_code: package.code,
        quota_type: package.quota_type,
        amount: package.amount,
        bonus: input.bonus,
        total,
        lot_id: grant.response.lot_id,
        expires_at: grant.expires_at,
        created: grant.response.created,
        debt_repaid: grant.response.debt_repaid,
    };
    let audit = AuditOfGrant {
        action: "purchase.record",
        target_type: "order",
        target_id: &recorded.order_id,
        created: recorded.created,
    };
    audit_after_grant(&state, &actor, audit, &recorded).await?;
    Ok((created_status(recorded.created), Json(recorded)))
}

/// A purchase stays usable through the end of the day `valid_days` after today (configured
/// zone). Rounding to a day boundary also makes a redelivered order compute the same expiry.
fn purchase_expiry(now_ms: i64, valid_days: u32, tz: chrono_tz::Tz) -> i64 {
    let Some(now) = Utc.timestamp_millis_opt(now_ms).single() else {
        return now_ms;
    };
    let local_day = now.with_timezone(&tz).date_naive();
    let end_day = local_day
        .checked_add_days(Days::new(u64::from(valid_days) + 1))
        .unwrap_or(local_day);
    let midnight = end_day.and_hms_opt(0, 0, 0).unwrap_or_default();
    tz.from_local_datetime(&midnight)
        .earliest()
        .map(|at| at.timestamp_millis())
        .unwrap_or(now_ms + i64::from(valid_days) * 86_400_000)
}

// ---- admin grants ----

#[derive(Deserialize, ToSchema, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct NewGrant {
    pub user_id: String,
    pub quota_type: String,
    pub amount: u64,
    /// Lower-case letters and `_`; default `admin_grant`.
    #[serde(default = "default_grant_source")]
    pub source_type: String,
    /// With `source_type`, the idempotency key of the grant (e.g. a ticket id).
    pub source_id: String,
    #[serde(default)]
    pub remark: Option<String>,
    /// Unix ms from which the units count; default now.
    #[serde(default)]
    pub effective_from: Option<i64>,
    /// Unix ms at which the remainder expires; default never.
    #[serde(default)]
    pub expires_at: Option<i64>,
    /// Burn order among the user's lots: lower first (default 0; then soonest expiry).
    #[serde(default)]
    pub priority: i32,
}

fn default_grant_source() -> String {
    ADMIN_GRANT_SOURCE.to_string()
}

#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct GrantRecorded {
    pub lot_id: i64,
    /// False when this (source_type, source_id) had already been granted with the same figures.
    pub created: bool,
    /// pending (not yet effective), active or expired.
    pub status: String,
    pub debt_repaid: u64,
    pub user_id: String,
    pub quota_type: String,
    pub amount: u64,
    pub source_type: String,
    pub source_id: String,
    pub expires_at: Option<i64>,
}

/// Grant quota to a user (idempotent by (source_type, source_id)).
#[utoipa::path(post, path = "/admin/v1/grants", tag = "quota", security(("admin" = [])), request_body = NewGrant,
    responses((status = 201, body = GrantRecorded), (status = 200, description = "already granted", body = GrantRecorded),
        (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn grant(
    State(state): State<AppState>,
    Extension(actor): Extension<AdminActor>,
    ApiJson(input): ApiJson<NewGrant>,
) -> ApiResult<(StatusCode, Json<GrantRecorded>)> {
    let request = GrantRequest {
        user_id: input.user_id,
        quota_type: input.quota_type,
        amount: input.amount,
        source_type: input.source_type,
        source_id: input.source_id,
        remark: input.remark,
        effective_from: input.effective_from,
        expires_at: input.expires_at,
        priority: input.priority,
    };
    let response = state.ledger.grant(&request).await?;
    let recorded = GrantRecorded {
        lot_id: response.lot_id,
        created: response.created,
        status: response.status.as_str().to_string(),
        debt_repaid: response.debt_repaid,
        user_id: request.user_id,
        quota_type: request.quota_type,
        amount: request.amount,
        source_type: request.source_type,
        source_id: request.source_id,
        expires_at: request.expires_at,
    };
    let target = format!("{}:{}", recorded.source_type, recorded.source_id);
    let audit = AuditOfGrant {
        action: "grant.create",
        target_type: "grant",
        target_id: &target,
        created: recorded.created,
    };
    audit_after_grant(&state, &actor, audit, &recorded).await?;
    Ok((created_status(recorded.created), Json(recorded)))
}

struct GrantOutcome {
    response: GrantResponse,
    expires_at: Option<i64>,
}

/// The lot an earlier delivery of this grant created, if its figures match (409 if not).
async fn existing_lot(state: &AppState, request: &GrantRequest) -> ApiResult<Option<GrantOutcome>> {
    let sql = state.db.sql(
        "SELECT id, user_id, amount, status, expires_at FROM quota_lots \
         WHERE source_type = ? AND source_id = ? AND quota_type = ?",
    );
    let row = sqlx::query(&sql)
        .bind(request.source_type.clone())
        .bind(request.source_id.clone())
        .bind(request.quota_type.clone())
        .fetch_optional(state.db.pool())
        .await
        .map_err(ApiError::from)?;
    let Some(row) = row else { return Ok(None) };
    let read = |err: sqlx::Error| ApiError::internal(err);
    let user_id: String = row.try_get("user_id").map_err(read)?;
    let amount: i64 = row.try_get("amount").map_err(read)?;
    if user_id != request.user_id || u64::try_from(amount).ok() != Some(request.amount) {
        return Err(ApiError::conflict(format!(
            "{} {:?} was already recorded for user {user_id:?} with {amount} units",
            request.source_type, request.source_id
        )));
    }
    let status: String = row.try_get("status").map_err(read)?;
    Ok(Some(GrantOutcome {
        response: GrantResponse {
            lot_id: row.try_get("id").map_err(read)?,
            created: false,
            status: crate::ledger::LotStatus::parse(&status)
                .unwrap_or(crate::ledger::LotStatus::Active),
            debt_repaid: 0,
        },
        expires_at: row.try_get("expires_at").map_err(read)?,
    }))
}

/// Grants; when a concurrent delivery won the race with a slightly different expiry, the
/// winner's lot is the answer.
async fn grant_or_replay(state: &AppState, request: &GrantRequest) -> ApiResult<GrantOutcome> {
    match state.ledger.grant(request).await {
        Ok(response) => Ok(GrantOutcome {
            response,
            expires_at: request.expires_at,
        }),
        Err(LedgerError::Conflict(detail)) => match existing_lot(state, request).await? {
            Some(existing) => Ok(existing),
            None => Err(ApiError::conflict(detail)),
        },
        Err(err) => Err(err.into()),
    }
}

/// What an audit row of a grant records.
struct AuditOfGrant<'a> {
    action: &'static str,
    target_type: &'static str,
    target_id: &'a str,
    /// False when the ledger answered from an earlier delivery.
    created: bool,
}

/// The audit row of a grant the ledger already committed (in its own transaction). If it
/// cannot be written the caller gets a 503 and repeats the call: the repeat is idempotent
/// for the grant and writes the audit row that is still missing, so every grant ends up
/// recorded exactly once (no row is added when the first delivery's row exists).
async fn audit_after_grant(
    state: &AppState,
    actor: &AdminActor,
    audit: AuditOfGrant<'_>,
    detail: &impl Serialize,
) -> ApiResult<()> {
    let result = async {
        let mut tx = state.db.begin_write().await?;
        if !audit.created && audit_exists(state, &mut tx, &audit).await? {
            return tx.rollback().await;
        }
        audit::record(
            tx.conn(),
            state.db.dialect(),
            &Actor::from(actor),
            audit.action,
            audit.target_type,
            Some(audit.target_id),
            detail,
        )
        .await?;
        tx.commit().await
    }
    .await;
    result.map_err(|err| {
        tracing::error!(error = %err, action = audit.action, target_id = audit.target_id,
            "grant applied but its audit row could not be written; a repeat of the call writes it");
        ApiError::unavailable(format!(
            "the grant was applied but its audit record could not be written ({}); \
             repeat the same call to complete it (the grant is not applied twice)",
            if crate::api::problem::database_unavailable(&err) {
                "database unavailable"
            } else {
                "database error"
            }
        ))
    })
}

async fn audit_exists(
    state: &AppState,
    tx: &mut crate::storage::WriteTx,
    audit: &AuditOfGrant<'_>,
) -> Result<bool, sqlx::Error> {
    let sql = state
        .db
        .sql("SELECT id FROM admin_audit WHERE action = ? AND target_type = ? AND target_id = ?");
    let row = sqlx::query(&sql)
        .bind(audit.action)
        .bind(audit.target_type)
        .bind(audit.target_id)
        .fetch_optional(tx.conn())
        .await?;
    Ok(row.is_some())
}

fn created_status(created: bool) -> StatusCode {
    if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

// ---- quota view ----

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct LotView {
    pub lot_id: i64,
    pub source_type: String,
    pub source_id: String,
    pub amount: u64,
    pub remaining: u64,
    pub used: u64,
    pub expired: u64,
    pub priority: i32,
    pub effective_from: i64,
    pub expires_at: Option<i64>,
    /// pending, active or expired.
    pub status: String,
    pub remark: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct QuotaView {
    pub quota_type: String,
    /// Sum of the open lots' amounts.
    pub granted: u64,
    /// Units of the open lots consumed.
    pub used: u64,
    /// Units left in active lots.
    pub remaining: u64,
    /// Units reserved by calls in flight.
    pub held: u64,
    /// remaining - held: what the next call can reserve.
    pub available: u64,
    /// Units consumed beyond the balance, paid by the next grants.
    pub debt: u64,
    /// Units of lots not yet effective.
    pub pending: u64,
    pub lots: Vec<LotView>,
}

#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct UserQuotas {
    pub user_id: String,
    pub quotas: Vec<QuotaView>,
}

fn lot_view(lot: LotDetail) -> LotView {
    LotView {
        lot_id: lot.lot_id,
        source_type: lot.source_type,
        source_id: lot.source_id,
        amount: lot.amount,
        remaining: lot.remaining,
        used: lot.used,
        expired: lot.expired,
        priority: lot.priority,
        effective_from: lot.effective_from,
        expires_at: lot.expires_at,
        status: lot.status.as_str().to_string(),
        remark: lot.remark,
    }
}

fn quota_view(balance: Balance) -> QuotaView {
    QuotaView {
        quota_type: balance.quota_type,
        granted: balance.granted,
        used: balance.used,
        remaining: balance.remaining,
        held: balance.held,
        available: balance.available,
        debt: balance.debt,
        pending: balance.pending,
        lots: balance.lots.into_iter().map(lot_view).collect(),
    }
}

/// A user's quotas per quota type, with their lots. A user never granted anything has none.
#[utoipa::path(get, path = "/admin/v1/users/{user_id}/quotas", tag = "quota", security(("admin" = [])),
    params(("user_id" = String, Path)), responses((status = 200, body = UserQuotas)))]
pub async fn user_quotas(
    State(state): State<AppState>,
    ApiPath(user_id): ApiPath<String>,
) -> ApiResult<Json<UserQuotas>> {
    let balances = state.ledger.balances(&user_id).await?;
    Ok(Json(UserQuotas {
        user_id,
        quotas: balances.into_iter().map(quota_view).collect(),
    }))
}

// ---- direct consume ----

#[derive(Deserialize, ToSchema, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct DirectConsume {
    /// Idempotency key of the call.
    pub request_id: String,
    /// Who pays: a ledger user id, or ...
    #[serde(default)]
    pub user_id: Option<String>,
    /// ... one of their API keys.
    #[serde(default)]
    pub api_key: Option<String>,
    pub provider: String,
    pub model: String,
    #[schema(value_type = crate::api::wire::Usage)]
    pub usage: Usage,
    /// True when any count is estimated.
    #[serde(default)]
    pub estimated: bool,
}

/// Authorize and settle one call made outside the mesh, in one step. A denial is a 200
/// answer with `authorization.decision = deny` and no settlement.
#[utoipa::path(post, path = "/admin/v1/consume", tag = "quota", security(("admin" = [])), request_body = DirectConsume,
    responses((status = 200, body = crate::api::wire::ConsumeResponse),
        (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn consume(
    State(state): State<AppState>,
    ApiJson(input): ApiJson<DirectConsume>,
) -> ApiResult<Json<ConsumeResponse>> {
    let user_id = match (&input.user_id, &input.api_key) {
        (Some(user_id), None) => user_id.clone(),
        (None, Some(key)) => match state.ledger.resolve_api_key(key).await? {
            Some(user_id) => user_id,
            None => return Ok(Json(invalid_key(&input.request_id))),
        },
        _ => {
            return Err(ApiError::unprocessable(
                "give exactly one of user_id and api_key",
            ))
        }
    };
    let request = ConsumeRequest {
        request_id: input.request_id,
        user_id,
        provider: input.provider,
        model: input.model,
        usage: input.usage,
        estimated: input.estimated,
    };
    let ledger = state.ledger.clone();
    let response = tokio::spawn(async move { ledger.consume(&request).await })
        .await
        .map_err(ApiError::internal)??;
    match response.authorization.decision {
        Decision::Allow => state.metrics.observe_authorize("allow", ""),
        Decision::Deny => {
            let code = response
                .authorization
                .denial
                .as_ref()
                .map_or("unknown", |d| d.code.as_str());
            state.metrics.observe_authorize("deny", code);
        }
    }
    if response.settlement.is_some() {
        state.metrics.observe_settlement("settled");
    }
    Ok(Json(response))
}

fn invalid_key(request_id: &str) -> ConsumeResponse {
    ConsumeResponse {
        authorization: AuthorizeResponse {
            request_id: request_id.to_string(),
            decision: Decision::Deny,
            user_id: None,
            quota_type: None,
            held: 0,
            priced: false,
            denial: Some(Denial {
                code: DenyCode::InvalidApiKey,
                message: "the API key is unknown or revoked".into(),
            }),
            lease: None,
        },
        settlement: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purchases_last_through_the_end_of_the_last_day() {
        // 2025-03-10 15:00 in Shanghai; 30 days -> usable until 2025-04-10 00:00 local.
        let now = chrono::DateTime::parse_from_rfc3339("2025-03-10T07:00:00Z")
            .unwrap()
            .timestamp_millis();
        let expiry = purchase_expiry(now, 30, chrono_tz::Asia::Shanghai);
        let expected = chrono::DateTime::parse_from_rfc3339("2025-04-09T16:00:00Z")
            .unwrap()
            .timestamp_millis();
        assert_eq!(expiry, expected);
        // Two deliveries on the same day compute the same expiry.
        assert_eq!(
            purchase_expiry(now + 3_600_000, 30, chrono_tz::Asia::Shanghai),
            expiry
        );
    }
}
