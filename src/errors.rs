//! Answers the filter gives itself (denied, unidentified, bad body, metering unavailable),
//! in the error shape of the provider the client talks to, so its SDK surfaces them as it
//! would the provider's own.

use crate::format::ProviderFormat;
use serde_json::{json, Value};

/// A reply the filter sends instead of forwarding the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    /// Stable machine-readable code (a `DenyCode` string or one of the filter's own).
    pub code: String,
    pub message: String,
}

/// Code of the filter's own rejections.
pub const CODE_MISSING_IDENTITY: &str = "missing_identity";
pub const CODE_METERING_UNAVAILABLE: &str = "metering_unavailable";
pub const CODE_DENIED: &str = "denied";
pub const CODE_INVALID_REQUEST_ID: &str = "invalid_request_id";

/// Header naming the rejection code, so operators can tell the filter's answers apart from
/// the provider's.
pub const HEADER_REJECTION: &str = "x-llm-meter-rejected";

impl Rejection {
    pub fn new(status: u16, code: impl Into<String>, message: impl Into<String>) -> Rejection {
        Rejection {
            status,
            code: code.into(),
            message: message.into(),
        }
    }

    /// The response body in `format`'s error shape.
    pub fn body(&self, format: ProviderFormat, request_id: &str) -> Vec<u8> {
        error_value(format, self, request_id)
            .to_string()
            .into_bytes()
    }

    /// Response headers to send with [`Rejection::body`].
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        vec![
            ("content-type", "application/json".to_string()),
            (HEADER_REJECTION, self.code.clone()),
        ]
    }
}

fn error_value(format: ProviderFormat, rejection: &Rejection, request_id: &str) -> Value {
    let Rejection {
        status,
        code,
        message,
    } = rejection;
    match format {
        ProviderFormat::OpenAiChat
        | ProviderFormat::OpenAiResponses
        | ProviderFormat::OpenAiEmbeddings
        | ProviderFormat::OpenAiImages => json!({
            "error": {"message": message, "type": openai_type(*status), "code": code}
        }),
        ProviderFormat::Anthropic => json!({
            "type": "error",
            "error": {"type": anthropic_type(*status), "message": message},
        }),
        ProviderFormat::Gemini => json!({
            "error": {"code": status, "message": message, "status": google_status(*status)}
        }),
        ProviderFormat::DashScopeNative => json!({
            "code": code, "message": message, "request_id": request_id
        }),
    }
}

fn openai_type(status: u16) -> &'static str {
    match status {
        400 | 413 => "invalid_request_error",
        401 => "authentication_error",
        402 | 429 => "insufficient_quota",
        403 => "permission_error",
        _ => "server_error",
    }
}

fn anthropic_type(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        _ => "api_error",
    }
}

/// Google's canonical status names for the HTTP statuses the filter answers with.
fn google_status(status: u16) -> &'static str {
    match status {
        400 | 413 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        402 => "FAILED_PRECONDITION",
        403 => "PERMISSION_DENIED",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        _ => "INTERNAL",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_meter_protocol::DenyCode;

    fn quota_exhausted() -> Rejection {
        let code = DenyCode::QuotaExhausted;
        Rejection::new(
            code.http_status(),
            code.as_str(),
            "text_token quota exhausted",
        )
    }

    fn body(format: ProviderFormat, rejection: &Rejection) -> Value {
        serde_json::from_slice(&rejection.body(format, "req-1")).unwrap()
    }

    #[test]
    fn openai_compatible_shape() {
        for format in [
            ProviderFormat::OpenAiChat,
            ProviderFormat::OpenAiResponses,
            ProviderFormat::OpenAiEmbeddings,
            ProviderFormat::OpenAiImages,
        ] {
            assert_eq!(
                body(format, &quota_exhausted()),
                json!({"error": {"message": "text_token quota exhausted",
                                 "type": "insufficient_quota", "code": "quota_exhausted"}})
            );
        }
    }

    #[test]
    fn anthropic_shape() {
        assert_eq!(
            body(ProviderFormat::Anthropic, &quota_exhausted()),
            json!({"type": "error", "error": {"type": "rate_limit_error",
                                               "message": "text_token quota exhausted"}})
        );
    }

    #[test]
    fn gemini_shape() {
        assert_eq!(
            body(ProviderFormat::Gemini, &quota_exhausted()),
            json!({"error": {"code": 429, "message": "text_token quota exhausted",
                             "status": "RESOURCE_EXHAUSTED"}})
        );
    }

    #[test]
    fn dashscope_shape_carries_the_request_id() {
        assert_eq!(
            body(ProviderFormat::DashScopeNative, &quota_exhausted()),
            json!({"code": "quota_exhausted", "message": "text_token quota exhausted",
                   "request_id": "req-1"})
        );
    }

    #[test]
    fn every_status_the_filter_uses_has_a_specific_type() {
        for status in [400, 401, 402, 403, 413, 429] {
            assert_ne!(openai_type(status), "server_error", "{status}");
            assert_ne!(anthropic_type(status), "api_error", "{status}");
            assert_ne!(google_status(status), "INTERNAL", "{status}");
        }
        assert_eq!(google_status(503), "UNAVAILABLE");
    }

    #[test]
    fn messages_are_json_escaped() {
        let rejection = Rejection::new(400, "invalid_request_body", "bad \"quote\"\n");
        let value = body(ProviderFormat::OpenAiChat, &rejection);
        assert_eq!(value["error"]["message"], "bad \"quote\"\n");
        assert_eq!(
            rejection.headers(),
            [
                ("content-type", "application/json".to_string()),
                (HEADER_REJECTION, "invalid_request_body".to_string())
            ]
        );
    }
}
