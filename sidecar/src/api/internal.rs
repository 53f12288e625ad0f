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
use super::problem::{ApiError, ApiJson, ApiResult};
use super::routes::{Method, RouteTable};
use super::wire;
use super::{ledger_error_is_transient, AppState};
use crate::ledger::{Ledger, LedgerError};

use llm_meter_protocol::MAX_BATCH_ITEMS;

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
    if response.lease.is_some() {
        state.metrics.observe_lease("granted");
    }
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

/// Apply many settlements, voids and lease releases (the filter's outbox). Each item
/// answers on its own: `ok`, `rejected` (permanent: never resend) or `retry` (transient).
/// A release of an unknown lease is rejected.
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
    // Spawned: a filter that gives up waiting never cancels the batch half-way.
    let results = tokio::spawn(async move { finalize_all(&ledger, batch.items).await })
        .await
        .map_err(ApiError::internal)?;
    for result in &results {
        let status = match result {
            FinalizeResult::Ok(response) if response.status == SettleStatus::Released => {
                state.metrics.observe_lease("released");
                settle_status_label(response.status)
            }
            FinalizeResult::Ok(response) => settle_status_label(response.status),
            FinalizeResult::Rejected { .. } => "rejected",
            FinalizeResult::Retry { .. } => "retry",
        };
        state.metrics.observe_settlement(status);
    }
    Ok(Json(FinalizeBatchResponse { results }))
}

/// One item's result, and whether it failed because the database is unreachable.
/// Applies the valid items as one submission to the ledger (normally one transaction)
/// and answers each in order: ok, rejected (permanent: conflict, invalid ...) or retry.
async fn finalize_all(ledger: &Ledger, items: Vec<Finalize>) -> Vec<FinalizeResult> {
    let mut results: Vec<Option<FinalizeResult>> = items
        .iter()
        .map(|item| {
            check_request_id(item.request_id())
                .err()
                .map(|err| FinalizeResult::Rejected {
                    request_id: item.request_id().to_string(),
                    error: err.detail.unwrap_or(err.title),
                })
        })
        .collect();
    let (open, valid): (Vec<usize>, Vec<Finalize>) = items
        .into_iter()
        .enumerate()
        .filter(|(i, _)| results[*i].is_none())
        .unzip();
    let answers = ledger.finalize(&valid).await;
    for ((i, item), answer) in open.into_iter().zip(&valid).zip(answers) {
        results[i] = Some(finalize_result(item.request_id(), answer));
    }
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| FinalizeResult::Retry {
                request_id: String::new(),
                error: "the ledger gave no answer".into(),
            })
        })
        .collect()
}

fn finalize_result(
    request_id: &str,
    answer: Result<SettleResponse, LedgerError>,
) -> FinalizeResult {
    let request_id = request_id.to_string();
    match answer {
        Ok(response) => FinalizeResult::Ok(response),
        Err(err) if ledger_error_is_transient(&err) => {
            tracing::warn!(%request_id, error = %err, "finalize item failed transiently");
            FinalizeResult::Retry {
                request_id,
                error: err.to_string(),
            }
        }
        Err(err) => FinalizeResult::Rejected {
            request_id,
            error: err.to_string(),
        },
    }
}

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
        SettleStatus::Released => "released",
        SettleStatus::AlreadyReleased => "already_released",
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

#[cfg(test)]
mod tests {
    use llm_meter_protocol::{Caller, Outcome, Usage};

    use super::*;
    use crate::ledger::LedgerConfig;
    use crate::storage::testing::each_backend;

    fn settle(id: &str, caller: &str) -> Finalize {
        Finalize::Settle(SettleRequest {
            request_id: id.into(),
            caller: Caller::UserId(caller.into()),
            provider: "openai".into(),
            model: "unknown-model".into(),
            outcome: Outcome::Completed,
            usage: Usage {
                input_tokens: 3,
                output_tokens: 4,
                ..Usage::default()
            },
            estimated: false,
            authorized: false,
            upstream_status: 200,
            ended_at_ms: None,
            lease_id: None,
            held: 0,
        })
    }

    /// One submission for the batch; each item answered in order: a void before
    /// authorize is ok, a bad id and a conflicting replay are rejected.
    #[tokio::test]
    async fn a_batch_is_answered_item_by_item_in_order() {
        for t in each_backend().await {
            let ledger = Ledger::new(t.db.clone(), LedgerConfig::default());
            let void = |id: &str| {
                Finalize::Void(VoidRequest {
                    request_id: id.into(),
                    reason: "client left".into(),
                    upstream_status: 0,
                    lease_id: None,
                    held: 0,
                })
            };
            let items = vec![
                void("never-authorized"),
                void("\u{7}bad"),
                settle("direct-1", "ivy"),
                settle("direct-1", "ivy"),
                settle("direct-1", "mallory"),
            ];
            let results = finalize_all(&ledger, items).await;
            let backend = t.backend;
            let kinds: Vec<String> = results
                .iter()
                .map(|r| match r {
                    FinalizeResult::Ok(response) => {
                        format!("ok {}", settle_status_label(response.status))
                    }
                    FinalizeResult::Rejected { request_id, .. } => format!("rejected {request_id}"),
                    FinalizeResult::Retry { error, .. } => format!("retry {error}"),
                })
                .collect();
            assert_eq!(
                kinds,
                [
                    "ok voided",
                    "rejected \u{7}bad",
                    "ok settled",
                    "ok already_settled",
                    "rejected direct-1"
                ],
                "{backend:?}"
            );
            t.cleanup().await;
        }
    }
}
