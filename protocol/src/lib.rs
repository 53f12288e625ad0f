//! The wire protocol between the metering filter (inside Envoy) and the ledger sidecar.
//!
//! This crate is the one definition of every message both sides exchange; the filter
//! serialises these types and the sidecar deserialises the same types, so a field cannot
//! drift between them. Everything is JSON over HTTP/1.1, authenticated by a shared secret
//! in [`HEADER_SECRET`].
//!
//! Token counts are integers (`u64`); money never crosses this boundary except as a decimal
//! string in responses (the sidecar owns pricing).

use serde::{Deserialize, Serialize};

/// Header that carries the shared secret on every internal call.
pub const HEADER_SECRET: &str = "x-meter-secret";

/// Reserve quota before a call is forwarded upstream.
pub const PATH_AUTHORIZE: &str = "/internal/v1/authorize";
/// Post the actual usage of one call and release the rest of its hold.
pub const PATH_SETTLE: &str = "/internal/v1/settle";
/// Release a hold with no charge (the upstream failed).
pub const PATH_VOID: &str = "/internal/v1/void";
/// Apply many settlements and voids in one request (the filter's outbox uses this).
pub const PATH_FINALIZE_BATCH: &str = "/internal/v1/finalize";
/// Most items one finalize batch may carry: the sidecar refuses a larger batch, and the
/// filter refuses a configuration whose batches could be larger.
pub const MAX_BATCH_ITEMS: usize = 500;

/// Who is calling. The filter learns it from a header set by an earlier authn filter or
/// the mesh (`UserId`), or from the caller's own API key, which the sidecar resolves.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Caller {
    UserId(String),
    ApiKey(String),
}

/// Admission request, sent before the upstream sees the call.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct AuthorizeRequest {
    /// Unique per call (Envoy's `x-request-id`); the idempotency key of the whole call.
    pub request_id: String,
    pub caller: Caller,
    /// Provider code as configured for the route (e.g. `openai`, `dashscope`).
    pub provider: String,
    /// Model as named in the request body.
    pub model: String,
    /// Prompt tokens estimated from the request body.
    pub estimated_input_tokens: u64,
    /// The request's own output cap (`max_tokens` or the provider's equivalent), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u64>,
    /// Images asked for (image generation `n`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_images: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    /// Ask for a lease: hold more than this call needs so the filter can admit the
    /// caller's next calls of the same model by itself (see [`Lease`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseAsk>,
}

/// What the filter asks of a lease.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseAsk {
    /// Units wanted in all, this call's own hold included. The sidecar grants less when the
    /// caller's balance is low (never less than the call's own hold).
    pub units: u64,
    /// How long the filter may admit calls against the lease.
    pub ttl_ms: u64,
}

/// How the filter sizes a call's hold by itself, mirroring the sidecar's own rule for the
/// lease's quota type. Only quota types measured in countable units are leased (a quota of
/// money needs the price book, so it is always authorized call by call).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HoldMeasure {
    /// Estimated input tokens plus the output cap.
    TotalTokens,
    /// Estimated input tokens.
    InputTokens,
    /// The output cap.
    OutputTokens,
    /// Requested images (1 when not given).
    Images,
    /// One per call.
    Requests,
}

impl HoldMeasure {
    /// Units to hold for one call; at least 1, like the sidecar's own holds.
    pub fn hold_units(
        self,
        estimated_input_tokens: u64,
        max_output_tokens: Option<u64>,
        requested_images: Option<u64>,
        default_max_output_tokens: u64,
    ) -> u64 {
        let output_cap = max_output_tokens.unwrap_or(default_max_output_tokens);
        let units = match self {
            HoldMeasure::TotalTokens => estimated_input_tokens.saturating_add(output_cap),
            HoldMeasure::InputTokens => estimated_input_tokens,
            HoldMeasure::OutputTokens => output_cap,
            HoldMeasure::Images => requested_images.unwrap_or(1),
            HoldMeasure::Requests => 1,
        };
        units.max(1)
    }
}

/// Every lease id starts with this; a call's request id never may.
pub const LEASE_ID_PREFIX: &str = "lease:";

/// Longest identifier the ledger stores (request ids, user ids, models: `VARCHAR(191)`).
pub const MAX_KEY_CHARS: usize = 191;

/// Whether the ledger can store `value` as a key: 1 to [`MAX_KEY_CHARS`] characters.
pub fn is_storable_key(value: &str) -> bool {
    !value.is_empty() && value.chars().count() <= MAX_KEY_CHARS
}

/// Units held in the ledger for one caller and model, from which the filter admits calls
/// without asking the sidecar again. The lease is an ordinary hold in the ledger: units in
/// it are reserved exactly as a call's hold is, so local admission can never overdraw.
/// Calls admitted under it are settled one by one (each keeps its own usage record) with
/// [`SettleRequest::lease_id`]; what is left is released with [`Finalize::Release`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Key of the lease's hold in the ledger (never the id of a call).
    pub lease_id: String,
    /// Units held in all, the authorizing call's own `held` included.
    pub units: u64,
    /// No call may be admitted under the lease after this instant (Unix ms, sidecar clock);
    /// calls admitted before it still settle against it.
    pub expires_at_ms: u64,
    /// How the filter sizes each call's share.
    pub measure: HoldMeasure,
    /// The output cap assumed when a request names none.
    pub default_max_output_tokens: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Deny,
}

/// Why a call was denied. The HTTP status the filter answers with is part of the
/// protocol so both sides agree on it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DenyCode {
    /// The caller has quota of this type, but not enough left for this call.
    QuotaExhausted,
    /// The caller has never been granted quota of this type.
    NoQuota,
    /// The API key is unknown or revoked.
    InvalidApiKey,
    /// The model exists but is disabled.
    ModelDisabled,
    /// The model has no active price and the sidecar is configured to deny unpriced calls.
    ModelUnpriced,
    /// The request itself is not acceptable (e.g. an absurd output cap).
    InvalidRequest,
}

impl DenyCode {
    pub fn http_status(self) -> u16 {
        match self {
            DenyCode::QuotaExhausted => 429,
            DenyCode::NoQuota => 402,
            DenyCode::InvalidApiKey => 401,
            DenyCode::ModelDisabled | DenyCode::ModelUnpriced => 403,
            DenyCode::InvalidRequest => 400,
        }
    }

    /// Stable machine-readable code, also used as the OpenAI-style `error.code`.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyCode::QuotaExhausted => "quota_exhausted",
            DenyCode::NoQuota => "no_quota",
            DenyCode::InvalidApiKey => "invalid_api_key",
            DenyCode::ModelDisabled => "model_disabled",
            DenyCode::ModelUnpriced => "model_unpriced",
            DenyCode::InvalidRequest => "invalid_request",
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub code: DenyCode,
    pub message: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct AuthorizeResponse {
    pub request_id: String,
    pub decision: Decision,
    /// The caller resolved to a ledger user (set when allowed; also when an API key resolved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Quota type the call is metered against (e.g. `text_token`, `image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_type: Option<String>,
    /// Units held for this call (0 when denied).
    #[serde(default)]
    pub held: u64,
    /// False when the model has no active price: the call runs but is not billed.
    #[serde(default)]
    pub priced: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denial: Option<Denial>,
    /// Granted when asked for and allowed; this call's `held` is part of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
}

/// Normalised usage of one call. Every provider format is mapped onto these fields by the
/// filter; subsets are explicit so that nothing is counted twice.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// All prompt tokens, including those read from or written to a prompt cache.
    #[serde(default)]
    pub input_tokens: u64,
    /// Of `input_tokens`: read from the provider's prompt cache.
    #[serde(default)]
    pub cached_input_tokens: u64,
    /// Of `input_tokens`: written to the provider's prompt cache (Anthropic cache creation).
    #[serde(default)]
    pub cache_write_tokens: u64,
    /// All completion tokens, including reasoning tokens.
    #[serde(default)]
    pub output_tokens: u64,
    /// Of `output_tokens`: reasoning ("thinking") tokens.
    #[serde(default)]
    pub reasoning_tokens: u64,
    /// Images produced.
    #[serde(default)]
    pub images: u64,
}

impl Usage {
    /// Input plus output tokens: what a `text_token` quota counts.
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

/// How a call ended, as the filter saw it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The response ended normally.
    Completed,
    /// The client went away, or the stream stopped without its terminal event: the usage
    /// is input plus the output seen so far.
    Partial,
}

/// Final usage of one call.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SettleRequest {
    pub request_id: String,
    /// Repeated here so a call admitted while the sidecar was unreachable (fail-open) can
    /// still be settled without a prior hold.
    pub caller: Caller,
    pub provider: String,
    pub model: String,
    pub outcome: Outcome,
    pub usage: Usage,
    /// True when any count is estimated by the filter rather than reported by the provider.
    #[serde(default)]
    pub estimated: bool,
    /// False when the call was forwarded without a hold (fail-open).
    #[serde(default = "default_true")]
    pub authorized: bool,
    #[serde(default)]
    pub upstream_status: u16,
    /// When the call ended, in Unix milliseconds (the filter's clock), so a settlement
    /// that arrives late is still booked on the right day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at_ms: Option<u64>,
    /// The call was admitted by the filter under this lease rather than held on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    /// Units the filter set aside for the call from its lease (recorded as the call's hold).
    #[serde(default)]
    pub held: u64,
}

fn default_true() -> bool {
    true
}

/// Release a hold without charge.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct VoidRequest {
    pub request_id: String,
    pub reason: String,
    #[serde(default)]
    pub upstream_status: u16,
    /// The call was admitted under this lease: nothing is released in the ledger (its
    /// share returns to the filter's lease), but the void is recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    /// Units the filter had set aside for the call from its lease.
    #[serde(default)]
    pub held: u64,
}

/// Give back what is left of a lease: no call is admitted under it any more and none is
/// in flight (a settlement that still arrives is charged like one whose hold expired).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ReleaseRequest {
    pub lease_id: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SettleStatus {
    /// Applied now.
    Settled,
    /// A retry of an identical settlement that was already applied: nothing changed.
    AlreadySettled,
    /// The hold was released without charge.
    Voided,
    /// A retry of a void that was already applied.
    AlreadyVoided,
    /// A lease's remaining units were released.
    Released,
    /// The lease was already released, or expired before the release arrived.
    AlreadyReleased,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SettleResponse {
    pub request_id: String,
    pub status: SettleStatus,
    /// Quota units charged to the caller's lots.
    #[serde(default)]
    pub charged: u64,
    /// Units the caller consumed beyond its balance, recorded as debt.
    #[serde(default)]
    pub debt: u64,
    /// Cost of the call as a decimal string (e.g. `"0.001234"`), absent when unpriced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
}

/// One entry of the filter's outbox.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Finalize {
    Settle(SettleRequest),
    Void(VoidRequest),
    Release(ReleaseRequest),
}

impl Finalize {
    /// The item's idempotency key: the call's request id, or the lease id of a release.
    pub fn request_id(&self) -> &str {
        match self {
            Finalize::Settle(s) => &s.request_id,
            Finalize::Void(v) => &v.request_id,
            Finalize::Release(r) => &r.lease_id,
        }
    }
}

/// A batch of finalize items. The receiver reads `Vec<Finalize>` (the default); a sender may
/// serialise a borrowed slice (the filter keeps the items for retries and need not copy
/// them to send them).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FinalizeBatchRequest<Items = Vec<Finalize>> {
    pub items: Items,
}

/// Outcome of one batch item. `Rejected` is permanent (e.g. a retry with other figures):
/// the filter must not send it again. `Retry` is transient.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum FinalizeResult {
    Ok(SettleResponse),
    Rejected { request_id: String, error: String },
    Retry { request_id: String, error: String },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FinalizeBatchResponse {
    pub results: Vec<FinalizeResult>,
}

/// Error body of every non-2xx answer from the sidecar (RFC 7807 problem details).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    #[serde(rename = "type", default = "about_blank")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

fn about_blank() -> String {
    "about:blank".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_is_a_single_keyed_object() {
        let json = serde_json::to_string(&Caller::UserId("alice".into())).unwrap();
        assert_eq!(json, r#"{"user_id":"alice"}"#);
        let back: Caller = serde_json::from_str(r#"{"api_key":"sk-1"}"#).unwrap();
        assert_eq!(back, Caller::ApiKey("sk-1".into()));
    }

    #[test]
    fn finalize_items_are_tagged_by_op() {
        let item = Finalize::Void(VoidRequest {
            request_id: "r1".into(),
            reason: "upstream 500".into(),
            upstream_status: 500,
            lease_id: None,
            held: 0,
        });
        let json = serde_json::to_value(&item).unwrap();
        assert_eq!(json["op"], "void");
        assert_eq!(item.request_id(), "r1");
        let back: Finalize = serde_json::from_value(json).unwrap();
        assert_eq!(back, item);
    }

    /// What the filter sends from a borrowed slice is what the sidecar reads as a batch.
    #[test]
    fn a_batch_sent_from_a_slice_reads_back_as_the_same_items() {
        let items = vec![
            Finalize::Void(VoidRequest {
                request_id: "r1".into(),
                reason: "upstream 500".into(),
                upstream_status: 500,
                lease_id: None,
                held: 0,
            }),
            Finalize::Release(ReleaseRequest {
                lease_id: "lease:abc".into(),
            }),
        ];
        let json = serde_json::to_string(&FinalizeBatchRequest {
            items: items.as_slice(),
        })
        .unwrap();
        let back: FinalizeBatchRequest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, FinalizeBatchRequest { items });
    }

    #[test]
    fn settle_defaults_to_authorized_when_field_missing() {
        let json = r#"{"request_id":"r","caller":{"user_id":"u"},"provider":"openai","model":"m",
            "outcome":"completed","usage":{"input_tokens":3,"output_tokens":4}}"#;
        let settle: SettleRequest = serde_json::from_str(json).unwrap();
        assert!(settle.authorized);
        assert!(!settle.estimated);
        assert_eq!(settle.usage.total_tokens(), 7);
    }

    #[test]
    fn lease_fields_are_optional_on_the_wire() {
        let json = r#"{"request_id":"r","caller":{"user_id":"u"},"provider":"openai","model":"m",
            "estimated_input_tokens":3}"#;
        let ask: AuthorizeRequest = serde_json::from_str(json).unwrap();
        assert_eq!(ask.lease, None);
        let release = Finalize::Release(ReleaseRequest {
            lease_id: "lease-1".into(),
        });
        let json = serde_json::to_value(&release).unwrap();
        assert_eq!(json["op"], "release");
        assert_eq!(release.request_id(), "lease-1");
    }

    #[test]
    fn hold_measures_size_a_call_like_the_sidecar() {
        assert_eq!(
            HoldMeasure::TotalTokens.hold_units(10, Some(5), None, 99),
            15
        );
        assert_eq!(HoldMeasure::TotalTokens.hold_units(10, None, None, 99), 109);
        assert_eq!(HoldMeasure::InputTokens.hold_units(0, Some(5), None, 99), 1);
        assert_eq!(
            HoldMeasure::OutputTokens.hold_units(10, Some(5), None, 99),
            5
        );
        assert_eq!(HoldMeasure::Images.hold_units(10, None, None, 99), 1);
        assert_eq!(HoldMeasure::Images.hold_units(10, None, Some(4), 99), 4);
        assert_eq!(
            HoldMeasure::Requests.hold_units(10, Some(5), Some(4), 99),
            1
        );
        let big = HoldMeasure::TotalTokens.hold_units(u64::MAX, Some(5), None, 99);
        assert_eq!(big, u64::MAX);
    }

    #[test]
    fn deny_codes_map_to_distinct_meaningful_statuses() {
        assert_eq!(DenyCode::QuotaExhausted.http_status(), 429);
        assert_eq!(DenyCode::NoQuota.http_status(), 402);
        assert_eq!(DenyCode::InvalidApiKey.http_status(), 401);
        let json = serde_json::to_string(&DenyCode::QuotaExhausted).unwrap();
        assert_eq!(json, format!("\"{}\"", DenyCode::QuotaExhausted.as_str()));
    }
}
