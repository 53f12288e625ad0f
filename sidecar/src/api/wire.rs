//! OpenAPI schemas of the filter<->sidecar wire protocol (`llm_meter_protocol`).
//!
//! The protocol crate is also compiled to wasm for the filter and carries no OpenAPI
//! dependency, so its messages are described here; the test below serialises fully
//! populated protocol values and checks that every field appears in these schemas (and no
//! other), so the description cannot drift from the protocol.
#![allow(dead_code)]

use utoipa::ToSchema;

/// Who is calling: exactly one key, `{"user_id": ".."}` or `{"api_key": ".."}`.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum Caller {
    UserId(String),
    ApiKey(String),
}

/// Admission request, sent before the upstream sees the call.
#[derive(ToSchema)]
pub struct AuthorizeRequest {
    /// Unique per call (Envoy's `x-request-id`); the idempotency key of the call.
    #[schema(min_length = 1, max_length = 191)]
    request_id: String,
    caller: Caller,
    /// Provider code, e.g. `openai`.
    #[schema(min_length = 1, max_length = 191)]
    provider: String,
    #[schema(min_length = 1, max_length = 191)]
    model: String,
    estimated_input_tokens: u64,
    max_output_tokens: Option<u64>,
    requested_images: Option<u64>,
    #[schema(default = false)]
    #[serde(default)]
    stream: bool,
    /// Ask for a lease: hold more than this call needs so the filter can admit the caller's
    /// next calls of the same model by itself.
    lease: Option<LeaseAsk>,
}

/// What the filter asks of a lease.
#[derive(ToSchema)]
pub struct LeaseAsk {
    /// Units wanted in all, this call's own hold included; the sidecar grants less when the
    /// balance is low (never less than the call's own hold).
    units: u64,
    /// How long the filter may admit calls under the lease (capped by the sidecar).
    ttl_ms: u64,
}

/// How the filter sizes a call's share of a lease (the quota type's measure).
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum HoldMeasure {
    TotalTokens,
    InputTokens,
    OutputTokens,
    Images,
    Requests,
}

/// Units held for one caller and model, from which the filter admits calls by itself.
#[derive(ToSchema)]
pub struct Lease {
    /// Key of the lease's hold (`lease:` + the authorizing request id, or its hash).
    lease_id: String,
    /// Units held in all, the authorizing call's own `held` included.
    units: u64,
    /// No call may be admitted under the lease after this instant (Unix ms).
    expires_at_ms: u64,
    measure: HoldMeasure,
    /// The output cap assumed when a request names none.
    default_max_output_tokens: u64,
}

#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Deny,
}

/// quota_exhausted (429), no_quota (402), invalid_api_key (401), model_disabled (403),
/// model_unpriced (403), invalid_request (400).
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum DenyCode {
    QuotaExhausted,
    NoQuota,
    InvalidApiKey,
    ModelDisabled,
    ModelUnpriced,
    InvalidRequest,
}

#[derive(ToSchema)]
pub struct Denial {
    code: DenyCode,
    message: String,
}

#[derive(ToSchema)]
pub struct AuthorizeResponse {
    request_id: String,
    decision: Decision,
    user_id: Option<String>,
    /// Quota type the call is metered against, e.g. `text_token`.
    quota_type: Option<String>,
    /// Units held for this call (0 when denied).
    #[serde(default)]
    held: u64,
    /// False when the model has no active price: the call runs but is not billed.
    #[serde(default)]
    priced: bool,
    denial: Option<Denial>,
    /// Granted when asked for and allowed (never for a money quota); `held` is part of it.
    lease: Option<Lease>,
}

/// Normalised usage; the cached/cache-write subsets are part of `input_tokens`, reasoning of `output_tokens`.
#[derive(ToSchema)]
pub struct Usage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    cached_input_tokens: u64,
    #[serde(default)]
    cache_write_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    reasoning_tokens: u64,
    #[serde(default)]
    images: u64,
}

#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum Outcome {
    Completed,
    Partial,
}

#[derive(ToSchema)]
pub struct SettleRequest {
    #[schema(min_length = 1, max_length = 191)]
    request_id: String,
    caller: Caller,
    #[schema(min_length = 1, max_length = 191)]
    provider: String,
    #[schema(min_length = 1, max_length = 191)]
    model: String,
    outcome: Outcome,
    usage: Usage,
    /// True when any count is estimated by the filter.
    #[schema(default = false)]
    #[serde(default)]
    estimated: bool,
    /// False when the call was forwarded without a hold (fail-open).
    #[schema(default = true)]
    #[serde(default)]
    authorized: bool,
    #[serde(default)]
    #[schema(maximum = 65535)]
    upstream_status: u16,
    /// When the call ended, Unix ms.
    ended_at_ms: Option<u64>,
    /// The call was admitted by the filter under this lease.
    #[schema(min_length = 1, max_length = 191)]
    lease_id: Option<String>,
    /// Units the filter set aside for the call from its lease.
    #[serde(default)]
    held: u64,
}

#[derive(ToSchema)]
pub struct VoidRequest {
    #[schema(min_length = 1, max_length = 191)]
    request_id: String,
    reason: String,
    #[serde(default)]
    #[schema(maximum = 65535)]
    upstream_status: u16,
    /// The call was admitted under this lease: nothing is released, the void is recorded.
    #[schema(min_length = 1, max_length = 191)]
    lease_id: Option<String>,
    /// Units the filter had set aside for the call from its lease.
    #[serde(default)]
    held: u64,
}

/// Give back what is left of a lease.
#[derive(ToSchema)]
pub struct ReleaseRequest {
    #[schema(min_length = 1, max_length = 191)]
    lease_id: String,
}

#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum SettleStatus {
    Settled,
    AlreadySettled,
    Voided,
    AlreadyVoided,
    Released,
    AlreadyReleased,
}

#[derive(ToSchema)]
pub struct SettleResponse {
    request_id: String,
    status: SettleStatus,
    /// Units charged to the caller's lots.
    #[serde(default)]
    charged: u64,
    /// Units beyond the balance, recorded as debt.
    #[serde(default)]
    debt: u64,
    /// Decimal string, absent when unpriced.
    cost: Option<String>,
    currency: Option<String>,
}

/// One outbox entry, tagged by `op`.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[serde(tag = "op")]
pub enum Finalize {
    Settle(SettleRequest),
    Void(VoidRequest),
    Release(ReleaseRequest),
}

#[derive(ToSchema)]
pub struct FinalizeBatchRequest {
    items: Vec<Finalize>,
}

/// One result per item, tagged by `result`: ok (the settle response), rejected (permanent:
/// never resend) or retry (transient).
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[serde(tag = "result")]
pub enum FinalizeResult {
    Ok(SettleResponse),
    Rejected { request_id: String, error: String },
    Retry { request_id: String, error: String },
}

#[derive(ToSchema)]
pub struct FinalizeBatchResponse {
    results: Vec<FinalizeResult>,
}

/// Answer of `POST /admin/v1/consume`.
#[derive(ToSchema)]
pub struct ConsumeResponse {
    authorization: AuthorizeResponse,
    /// Present when the call was admitted.
    settlement: Option<SettleResponse>,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use llm_meter_protocol as wire;
    use serde_json::Value;
    use utoipa::OpenApi;

    use crate::api::docs::ApiDoc;

    fn keys(value: &Value) -> BTreeSet<String> {
        value.as_object().unwrap().keys().cloned().collect()
    }

    fn schema_properties(doc: &Value, name: &str) -> BTreeSet<String> {
        let schema = &doc["components"]["schemas"][name];
        assert!(schema.is_object(), "schema {name} is not in the document");
        keys(&schema["properties"])
    }

    #[test]
    fn wire_schemas_have_exactly_the_protocol_fields() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let usage = wire::Usage {
            input_tokens: 1,
            cached_input_tokens: 1,
            cache_write_tokens: 1,
            output_tokens: 1,
            reasoning_tokens: 1,
            images: 1,
        };
        let settle = wire::SettleRequest {
            request_id: "r".into(),
            caller: wire::Caller::UserId("u".into()),
            provider: "p".into(),
            model: "m".into(),
            outcome: wire::Outcome::Completed,
            usage,
            estimated: true,
            authorized: true,
            upstream_status: 200,
            ended_at_ms: Some(1),
            lease_id: Some("lease:r".into()),
            held: 1,
        };
        let settled = wire::SettleResponse {
            request_id: "r".into(),
            status: wire::SettleStatus::Settled,
            charged: 1,
            debt: 1,
            cost: Some("0.1".into()),
            currency: Some("CNY".into()),
        };
        let authorized = wire::AuthorizeResponse {
            request_id: "r".into(),
            decision: wire::Decision::Deny,
            user_id: Some("u".into()),
            quota_type: Some("text_token".into()),
            held: 1,
            priced: true,
            denial: Some(wire::Denial {
                code: wire::DenyCode::NoQuota,
                message: "m".into(),
            }),
            lease: Some(wire::Lease {
                lease_id: "lease:r".into(),
                units: 1,
                expires_at_ms: 1,
                measure: wire::HoldMeasure::TotalTokens,
                default_max_output_tokens: 1,
            }),
        };
        let ask = wire::LeaseAsk {
            units: 1,
            ttl_ms: 1,
        };
        let release = wire::ReleaseRequest {
            lease_id: "lease:r".into(),
        };
        let samples: Vec<(&str, Value)> = vec![
            (
                "AuthorizeRequest",
                serde_json::to_value(wire::AuthorizeRequest {
                    request_id: "r".into(),
                    caller: wire::Caller::ApiKey("k".into()),
                    provider: "p".into(),
                    model: "m".into(),
                    estimated_input_tokens: 1,
                    max_output_tokens: Some(1),
                    requested_images: Some(1),
                    stream: true,
                    lease: Some(ask),
                })
                .unwrap(),
            ),
            ("LeaseAsk", serde_json::to_value(ask).unwrap()),
            (
                "Lease",
                serde_json::to_value(authorized.lease.clone().unwrap()).unwrap(),
            ),
            ("ReleaseRequest", serde_json::to_value(&release).unwrap()),
            (
                "AuthorizeResponse",
                serde_json::to_value(&authorized).unwrap(),
            ),
            (
                "Denial",
                serde_json::to_value(authorized.denial.clone().unwrap()).unwrap(),
            ),
            ("Usage", serde_json::to_value(usage).unwrap()),
            ("SettleRequest", serde_json::to_value(&settle).unwrap()),
            ("SettleResponse", serde_json::to_value(&settled).unwrap()),
            (
                "VoidRequest",
                serde_json::to_value(wire::VoidRequest {
                    request_id: "r".into(),
                    reason: "x".into(),
                    upstream_status: 1,
                    lease_id: Some("lease:r".into()),
                    held: 1,
                })
                .unwrap(),
            ),
            (
                "FinalizeBatchRequest",
                serde_json::to_value(wire::FinalizeBatchRequest {
                    items: vec![
                        wire::Finalize::Settle(settle),
                        wire::Finalize::Release(release),
                    ],
                })
                .unwrap(),
            ),
            (
                "FinalizeBatchResponse",
                serde_json::to_value(wire::FinalizeBatchResponse {
                    results: vec![wire::FinalizeResult::Ok(settled)],
                })
                .unwrap(),
            ),
        ];
        for (name, sample) in samples {
            assert_eq!(
                schema_properties(&doc, name),
                keys(&sample),
                "schema {name} drifted from the protocol"
            );
        }
    }
}
