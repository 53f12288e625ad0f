//! Authentication of the two API surfaces.
//!
//! - Internal API (the filter): shared secret in `x-meter-secret`.
//! - Admin API: `Authorization: Bearer <admin token>`.
//!
//! Missing credentials answer 401, wrong ones 403. Secrets are compared through their SHA-256
//! digests in constant time, so neither content nor length leaks through timing.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use llm_meter_protocol::HEADER_SECRET;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::problem::ApiError;
use super::AppState;
use crate::config::Secret;

/// Optional header naming the person or system behind an admin call, for the audit trail.
pub const HEADER_ADMIN_ACTOR: &str = "x-admin-actor";

/// Who performed an admin action (recorded in the audit journal).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminActor(pub String);

/// Equality of a presented credential and the configured secret, in constant time.
pub fn secret_matches(presented: &str, expected: &Secret) -> bool {
    let presented = Sha256::digest(presented.as_bytes());
    let expected = Sha256::digest(expected.expose().as_bytes());
    presented.ct_eq(&expected).into()
}

pub async fn require_shared_secret(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    match check_shared_secret(request.headers(), &state.auth.shared_secret) {
        Ok(()) => next.run(request).await,
        Err(err) => err.into_response(),
    }
}

pub async fn require_admin(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    match check_admin_token(request.headers(), &state.auth.admin_token) {
        Ok(()) => {
            let actor = admin_actor(request.headers());
            request.extensions_mut().insert(actor);
            next.run(request).await
        }
        Err(err) => {
            let mut response = err.clone().into_response();
            if err.status == axum::http::StatusCode::UNAUTHORIZED {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            response
        }
    }
}

fn check_shared_secret(headers: &HeaderMap, expected: &Secret) -> Result<(), ApiError> {
    let presented = headers
        .get(HEADER_SECRET)
        .ok_or_else(|| ApiError::unauthorized(format!("missing `{HEADER_SECRET}` header")))?;
    let presented = presented
        .to_str()
        .map_err(|_| ApiError::forbidden(format!("`{HEADER_SECRET}` does not match")))?;
    if secret_matches(presented, expected) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "`{HEADER_SECRET}` does not match"
        )))
    }
}

fn check_admin_token(headers: &HeaderMap, expected: &Secret) -> Result<(), ApiError> {
    let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::unauthorized("missing `Authorization: Bearer <admin token>` header")
    })?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::unauthorized("`Authorization` header is not a bearer token"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| ApiError::unauthorized("`Authorization` header is not a bearer token"))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ApiError::unauthorized(
            "`Authorization` header is not a bearer token",
        ));
    }
    if secret_matches(token.trim(), expected) {
        Ok(())
    } else {
        Err(ApiError::forbidden("admin token does not match"))
    }
}

fn admin_actor(headers: &HeaderMap) -> AdminActor {
    let named = headers
        .get(HEADER_ADMIN_ACTOR)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|name| !name.is_empty() && name.len() <= 200);
    AdminActor(named.unwrap_or("admin").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn secrets_compare_by_content() {
        let secret = Secret::new("s3cret");
        assert!(secret_matches("s3cret", &secret));
        assert!(!secret_matches("s3cret ", &secret));
        assert!(!secret_matches("", &secret));
    }

    #[test]
    fn admin_token_missing_is_401_wrong_is_403() {
        let token = Secret::new("tok");
        assert_eq!(
            check_admin_token(&headers(&[]), &token).unwrap_err().status,
            401
        );
        assert_eq!(
            check_admin_token(&headers(&[("authorization", "Basic dG9r")]), &token)
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(
            check_admin_token(&headers(&[("authorization", "Bearer nope")]), &token)
                .unwrap_err()
                .status,
            403
        );
        assert!(check_admin_token(&headers(&[("authorization", "bearer tok")]), &token).is_ok());
    }

    #[test]
    fn shared_secret_missing_is_401_wrong_is_403() {
        let secret = Secret::new("s");
        assert_eq!(
            check_shared_secret(&headers(&[]), &secret)
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(
            check_shared_secret(&headers(&[(HEADER_SECRET, "x")]), &secret)
                .unwrap_err()
                .status,
            403
        );
        assert!(check_shared_secret(&headers(&[(HEADER_SECRET, "s")]), &secret).is_ok());
    }

    #[test]
    fn actor_defaults_to_admin() {
        assert_eq!(admin_actor(&headers(&[])).0, "admin");
        assert_eq!(
            admin_actor(&headers(&[(HEADER_ADMIN_ACTOR, "ops-bot")])).0,
            "ops-bot"
        );
    }
}
