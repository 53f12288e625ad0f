//! The internal API the filter calls: authorize before forwarding, settle or void after,
//! and the outbox's batched finalize. Authenticated by the shared secret (see `auth`).
//!
//! Ledger work runs in a spawned task, so a filter that gives up waiting (or a client that
//! disconnects) never cancels a settlement half-way; graceful shutdown waits for it.

use axum::extract::State;
use axum::Json;
use llm_meter_protocol::{
    AuthorizeRequest, AuthorizeResponse, Decision, Finalize, FinalizeBatchRequest,
    FinalizeBatchResponse, FinalizeResult, SettleRequest, SettleResponse, SettleStatus,
    VoidRequest, PATH_AUTHORIZE, PATH_FINALIZE_BATCH, PATH_SETTLE, PATH_VOID,
};

use super::docs::Problem;
use super::problem::{database_unavailable, ApiError, ApiJson, ApiResult};
use super::routes::{Method, RouteTable};
use super::wire;
use super::{ledger_error_is_transient, AppState};
use crate::ledger::{Ledger, LedgerError};

/// Most items one finalize batch may carry.
pub const MAX_BATCH_ITEMS: usize = 500;

pub fn routes() -> RouteTable<AppState> {
    RouteTable::new()
        .add(Method::Post, PATH_AUTHORIZE, authorize)
        .add(Method::Post, PATH_SETTLE, settle)
        .add(Method::Post, PATH_VOID, void)
        .add(Method::Post, PATH_FINALIZE_BATCH, finalize)
}

/// Reserve quota for one call (protocol `AuthorizeRequest` -> `AuthorizeResponse`).
/// A denial is a 200 answer with `decision: deny`; the filter maps it to the client status.
#[utoipa::path(post, path = "/internal/v1/authorize", tag = "internal", security(("shared_secret" = [])),
    request_body = wire::AuthorizeRequest,
    responses(
        (status = 200, description = "allow or deny", body = wire::AuthorizeResponse),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 422, body = Problem),
        (status = 500, body = Problem),
        (status = 503, description = "database unavailable: apply the failure mode", body = Problem)))]
pub async fn authorize(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<AuthorizeRequest>,
) -> ApiResult<Json<AuthorizeResponse>> {
    check_request_id(&request.request_id)?;
    let ledger = state.ledger.clone();
    let response = run_to_completion(async move { ledger.authorize(&request).await }).await?;
    match response.decision {
        Decision::Allow => state.metrics.observe_authorize("allow", ""),
        Decision::Deny => {
            let code = response
                .denial
                .as_ref()
                .map_or("unknown", |denial| denial.code.as_str());
            state.metrics.observe_authorize("deny", code);
        }
    }
    Ok(Json(response))
}

/// Post the final usage of one call (protocol `SettleRequest` -> `SettleResponse`).
#[utoipa::path(post, path = "/internal/v1/settle", tag = "internal", security(("shared_secret" = [])),
    request_body = wire::SettleRequest,
    responses(
        (status = 200, body = wire::SettleResponse),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 409, description = "a retry with other figures", body = Problem),
        (status = 422, body = Problem), (status = 500, body = Problem),
        (status = 503, description = "database unavailable: retry later", body = Problem)))]
pub async fn settle(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<SettleRequest>,
) -> ApiResult<Json<SettleResponse>> {
    check_request_id(&request.request_id)?;
    let ledger = state.ledger.clone();
    let result = run_to_completion(async move { ledger.settle(&request).await }).await;
    observe_settlement(&state, &result);
    Ok(Json(result?))
}

/// Release a hold without charge (protocol `VoidRequest` -> `SettleResponse`).
#[utoipa::path(post, path = "/internal/v1/void", tag = "internal", security(("shared_secret" = [])),
    request_body = wire::VoidRequest,
    responses(
        (status = 200, body = wire::SettleResponse),
        (status = 404, description = "no hold for this request id", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 409, body = Problem),
        (status = 422, body = Problem), (status = 500, body = Problem),
        (status = 503, description = "database unavailable: retry later", body = Problem)))]
pub async fn void(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<VoidRequest>,
) -> ApiResult<Json<SettleResponse>> {
    check_request_id(&request.request_id)?;
    let ledger = state.ledger.clone();
    let result = run_to_completion(async move { ledger.void(&request).await }).await;
    observe_settlement(&state, &result);
    Ok(Json(result?))
}

/// Apply many settlements and voids (the filter's outbox). Each item answers on its own:
/// `ok`, `rejected` (permanent: never resend) or `retry` (transient).
#[utoipa::path(post, path = "/internal/v1/finalize", tag = "internal", security(("shared_secret" = [])),
    request_body = wire::FinalizeBatchRequest,
    responses(
        (status = 200, description = "one result per item, in order", body = wire::FinalizeBatchResponse),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 422, body = Problem)))]
pub async fn finalize(
    State(state): State<AppState>,
    ApiJson(batch): ApiJson<FinalizeBatchRequest>,
) -> ApiResult<Json<FinalizeBatchResponse>> {
    if batch.items.len() > MAX_BATCH_ITEMS {
        return Err(ApiError::unprocessable(format!(
            "a batch carries at most {MAX_BATCH_ITEMS} items (got {})",
            batch.items.len()
        )));
    }
    let ledger = state.ledger.clone();
    let results = tokio::spawn(async move {
        let mut results = Vec::with_capacity(batch.items.len());
        let mut unreachable: Option<String> = None;
        for item in batch.items {
            // Once the database is found unreachable, the rest of the batch is not tried
            // (each would wait for the pool's acquire timeout): it all comes back later.
            if let Some(error) = &unreachable {
                results.push(FinalizeResult::Retry {
                    request_id: item.request_id().to_string(),
                    error: error.clone(),
                });
                continue;
            }
            let (result, down) = finalize_one(&ledger, item).await;
            if down {
                if let FinalizeResult::Retry { error, .. } = &result {
                    unreachable = Some(error.clone());
                }
            }
            results.push(result);
        }
        results
    })
    .await
    .map_err(ApiError::internal)?;
    for result in &results {
        let status = match result {
            FinalizeResult::Ok(response) => settle_status_label(response.status),
            FinalizeResult::Rejected { .. } => "rejected",
            FinalizeResult::Retry { .. } => "retry",
        };
        state.metrics.observe_settlement(status);
    }
    Ok(Json(FinalizeBatchResponse { results }))
}

/// One item's result, and whether it failed because the database is unreachable.
async fn finalize_one(ledger: &Ledger, item: Finalize) -> (FinalizeResult, bool) {
    let request_id = item.request_id().to_string();
    if let Err(err) = check_request_id(&request_id) {
        let rejected = FinalizeResult::Rejected {
            request_id,
            error: err.detail.unwrap_or(err.title),
        };
        return (rejected, false);
    }
    let result = match &item {
        Finalize::Settle(settle) => ledger.settle(settle).await,
        Finalize::Void(void) => ledger.void(void).await,
    };
    match result {
        Ok(response) => (FinalizeResult::Ok(response), false),
        Err(err) if ledger_error_is_transient(&err) => {
            tracing::warn!(%request_id, error = %err, "finalize item failed transiently");
            let retry = FinalizeResult::Retry {
                request_id,
                error: err.to_string(),
            };
            (retry, database_unreachable(&err))
        }
        Err(err) => {
            let rejected = FinalizeResult::Rejected {
                request_id,
                error: err.to_string(),
            };
            (rejected, false)
        }
    }
}

/// The database cannot be reached at all (as opposed to contention on some rows).
fn database_unreachable(err: &LedgerError) -> bool {
    matches!(err, LedgerError::Db(db_err)
        if database_unavailable(db_err) && !crate::storage::is_transient(db_err))
}

/// Runs ledger work on its own task so that dropping the request does not cancel it.
async fn run_to_completion<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, LedgerError>> + Send + 'static,
) -> ApiResult<T> {
    match tokio::spawn(work).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(join_error) => Err(ApiError::internal(join_error)),
    }
}

fn observe_settlement(state: &AppState, result: &ApiResult<SettleResponse>) {
    let label = match result {
        Ok(response) => settle_status_label(response.status),
        Err(err) if err.status.is_server_error() => "retry",
        Err(_) => "rejected",
    };
    state.metrics.observe_settlement(label);
}

fn settle_status_label(status: SettleStatus) -> &'static str {
    match status {
        SettleStatus::Settled => "settled",
        SettleStatus::AlreadySettled => "already_settled",
        SettleStatus::Voided => "voided",
        SettleStatus::AlreadyVoided => "already_voided",
    }
}

fn check_request_id(request_id: &str) -> ApiResult<()> {
    if request_id.is_empty() || request_id.len() > 191 || request_id.chars().any(char::is_control) {
        return Err(ApiError::unprocessable(
            "request_id must be 1-191 characters without control characters",
        ));
    }
    Ok(())
}
