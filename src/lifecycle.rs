//! Decisions of a metered call's life, free of host calls: what the sidecar's answer to
//! `authorize` means under the configured failure mode, and which `Finalize` (if any) ends
//! the call given how its response went.

use crate::config::FailureMode;
use crate::errors::{Rejection, CODE_DENIED, CODE_METERING_UNAVAILABLE};
use crate::lease::Ticket;
use llm_meter_protocol::{
    AuthorizeResponse, Caller, Decision, Finalize, Lease, Outcome, SettleRequest, Usage,
    VoidRequest,
};

/// How the sidecar answered an authorize call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorizeOutcome {
    Allowed(AuthorizeResponse),
    Denied(Rejection),
    /// No usable answer (timeout, connection failure, error status, unreadable body).
    Unavailable(String),
}

/// Read the sidecar's answer. `status` is `None` when the call failed without a response.
pub fn read_authorize_reply(
    status: Option<u16>,
    body: &[u8],
    request_id: &str,
) -> AuthorizeOutcome {
    let Some(status) = status else {
        return AuthorizeOutcome::Unavailable("no answer (timeout or connection failure)".into());
    };
    let parsed = serde_json::from_slice::<AuthorizeResponse>(body);
    match parsed {
        Ok(response) if response.request_id != request_id => {
            AuthorizeOutcome::Unavailable(format!("answer names request `{}`", response.request_id))
        }
        Ok(response) if response.decision == Decision::Deny => {
            AuthorizeOutcome::Denied(match &response.denial {
                Some(denial) => Rejection::new(
                    denial.code.http_status(),
                    denial.code.as_str(),
                    denial.message.clone(),
                ),
                None => Rejection::new(403, CODE_DENIED, "denied by the metering service"),
            })
        }
        Ok(response) if (200..300).contains(&status) => AuthorizeOutcome::Allowed(response),
        Ok(_) => AuthorizeOutcome::Unavailable(format!("status {status} with an allow decision")),
        Err(err) if (200..300).contains(&status) => {
            AuthorizeOutcome::Unavailable(format!("unreadable answer: {err}"))
        }
        Err(_) => {
            AuthorizeOutcome::Unavailable(format!("status {status}: {}", problem_summary(body)))
        }
    }
}

/// The title/detail of an RFC 7807 body, or its first bytes.
fn problem_summary(body: &[u8]) -> String {
    match serde_json::from_slice::<llm_meter_protocol::Problem>(body) {
        Ok(problem) => match problem.detail {
            Some(detail) => format!("{}: {detail}", problem.title),
            None => problem.title,
        },
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
    }
}

/// What the filter does with the call after asking the sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Forward; the sidecar holds quota for it. `resolved_user` is the ledger user the
    /// caller resolved to, when the sidecar said. `lease` is the lease granted with the
    /// call, of which the call holds `held`.
    Allow {
        resolved_user: Option<String>,
        lease: Option<Lease>,
        held: u64,
    },
    /// Forward; admitted by the filter under a lease of the caller (no sidecar call).
    Leased(Ticket),
    /// Forward without a hold (fail-open); settle later with `authorized = false`.
    FailOpen { reason: String },
    /// Answer with the sidecar's denial.
    Deny(Rejection),
    /// Answer 503 (fail-closed).
    FailClosed {
        reason: String,
        rejection: Rejection,
    },
}

pub fn admission(outcome: AuthorizeOutcome, mode: FailureMode) -> Admission {
    match outcome {
        AuthorizeOutcome::Allowed(response) => Admission::Allow {
            resolved_user: response.user_id.filter(|u| !u.is_empty()),
            lease: response.lease,
            held: response.held,
        },
        AuthorizeOutcome::Denied(rejection) => Admission::Deny(rejection),
        AuthorizeOutcome::Unavailable(reason) => match mode {
            FailureMode::FailOpen => Admission::FailOpen { reason },
            FailureMode::FailClosed => Admission::FailClosed {
                reason,
                rejection: Rejection::new(
                    503,
                    CODE_METERING_UNAVAILABLE,
                    "the metering service is unavailable; the call was not forwarded",
                ),
            },
        },
    }
}

/// What settlement needs to know about a forwarded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    pub request_id: String,
    /// As identified from the request headers.
    pub caller: Caller,
    /// The ledger user the sidecar resolved the caller to, if it said.
    pub resolved_user: Option<String>,
    pub provider: String,
    pub model: String,
    pub estimated_input_tokens: u64,
    /// False when forwarded under fail-open without a hold.
    pub authorized: bool,
    /// Admitted under a lease rather than with a hold of its own.
    pub lease: Option<Ticket>,
}

/// What the response meter saw (a host-independent copy of its report).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedResponse {
    pub usage: Option<Usage>,
    pub estimated_output_tokens: u64,
    pub terminal_seen: bool,
    pub in_band_error: Option<String>,
    pub images: u64,
}

/// How the response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The whole response body arrived (end of stream).
    Complete,
    /// The stream was cut first: client disconnect, reset, or the filter's context was
    /// destroyed before the end.
    Cut,
}

/// The settlement of a call, or `None` when there is nothing to settle (an upstream failure
/// of a call that holds nothing).
///
/// - Upstream status outside 2xx: void (no charge).
/// - No response seen at all (client gone while waiting): the prompt was sent, so the
///   estimated input is settled as `Partial`.
/// - 2xx: provider usage when reported, otherwise estimates (flagged). `Completed` only
///   when the body ended normally and, for streams, the terminal event was seen.
pub fn finalize(
    call: &CallRecord,
    upstream_status: Option<u16>,
    streaming: bool,
    observed: &ObservedResponse,
    ending: Ending,
    now_ms: u64,
) -> Option<Finalize> {
    match upstream_status {
        Some(status) if !(200..300).contains(&status) => {
            void(call, format!("upstream status {status}"), status)
        }
        None => Some(Finalize::Settle(settle(
            call,
            Outcome::Partial,
            Usage {
                input_tokens: call.estimated_input_tokens,
                ..Usage::default()
            },
            true,
            0,
            now_ms,
        ))),
        Some(status) => {
            let nothing_produced = observed.usage.is_none()
                && observed.estimated_output_tokens == 0
                && observed.images == 0;
            if let (Some(error), true) = (&observed.in_band_error, nothing_produced) {
                return void(call, format!("in-band error: {error}"), status);
            }
            let complete = ending == Ending::Complete
                && (observed.terminal_seen || !streaming)
                && observed.in_band_error.is_none();
            let outcome = if complete {
                Outcome::Completed
            } else {
                Outcome::Partial
            };
            let (usage, estimated) = settled_usage(call, observed, outcome);
            Some(Finalize::Settle(settle(
                call, outcome, usage, estimated, status, now_ms,
            )))
        }
    }
}

/// Usage to settle, and whether any figure in it is the filter's estimate.
fn settled_usage(
    call: &CallRecord,
    observed: &ObservedResponse,
    outcome: Outcome,
) -> (Usage, bool) {
    let mut estimated = false;
    let mut usage = match observed.usage {
        Some(usage) => usage,
        None => {
            estimated = true;
            Usage {
                input_tokens: call.estimated_input_tokens,
                output_tokens: observed.estimated_output_tokens,
                ..Usage::default()
            }
        }
    };
    // Every prompt has tokens: a reported 0 means the count never arrived.
    if usage.input_tokens == 0 && call.estimated_input_tokens > 0 {
        usage.input_tokens = call.estimated_input_tokens;
        estimated = true;
    }
    // A cut stream may carry only an early, partial count: charge what was seen.
    if outcome == Outcome::Partial && observed.estimated_output_tokens > usage.output_tokens {
        usage.output_tokens = observed.estimated_output_tokens;
        estimated = true;
    }
    if usage.images == 0 {
        usage.images = observed.images;
    }
    (usage, estimated)
}

fn void(call: &CallRecord, reason: String, upstream_status: u16) -> Option<Finalize> {
    // A fail-open call holds nothing: there is nothing to release.
    call.authorized.then(|| {
        Finalize::Void(VoidRequest {
            request_id: call.request_id.clone(),
            reason,
            upstream_status,
            lease_id: call.lease.as_ref().map(|t| t.lease_id.clone()),
            held: call.lease.as_ref().map_or(0, |t| t.held),
        })
    })
}

fn settle(
    call: &CallRecord,
    outcome: Outcome,
    usage: Usage,
    estimated: bool,
    upstream_status: u16,
    now_ms: u64,
) -> SettleRequest {
    let caller = match &call.resolved_user {
        Some(user) => Caller::UserId(user.clone()),
        None => call.caller.clone(),
    };
    SettleRequest {
        request_id: call.request_id.clone(),
        caller,
        provider: call.provider.clone(),
        model: call.model.clone(),
        outcome,
        usage,
        estimated,
        authorized: call.authorized,
        upstream_status,
        ended_at_ms: Some(now_ms),
        lease_id: call.lease.as_ref().map(|t| t.lease_id.clone()),
        held: call.lease.as_ref().map_or(0, |t| t.held),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_meter_protocol::{Denial, DenyCode};
    use serde_json::json;

    fn call(authorized: bool) -> CallRecord {
        CallRecord {
            request_id: "r1".into(),
            caller: Caller::ApiKey("sk-1".into()),
            resolved_user: None,
            provider: "openai".into(),
            model: "gpt-4o".into(),
            estimated_input_tokens: 40,
            authorized,
            lease: None,
        }
    }

    fn leased_call() -> CallRecord {
        CallRecord {
            resolved_user: Some("alice".into()),
            lease: Some(Ticket {
                lease_id: "lease:r0".into(),
                held: 4_140,
                user_id: "alice".into(),
            }),
            ..call(true)
        }
    }

    fn reported(input: u64, output: u64) -> ObservedResponse {
        ObservedResponse {
            usage: Some(Usage {
                input_tokens: input,
                output_tokens: output,
                ..Usage::default()
            }),
            estimated_output_tokens: output,
            terminal_seen: true,
            ..ObservedResponse::default()
        }
    }

    fn settled(finalize: Option<Finalize>) -> SettleRequest {
        match finalize {
            Some(Finalize::Settle(settle)) => settle,
            other => panic!("expected a settlement, got {other:?}"),
        }
    }

    fn allow_body(request_id: &str) -> Vec<u8> {
        json!({"request_id": request_id, "decision": "allow", "user_id": "alice",
               "quota_type": "text_token", "held": 100, "priced": true})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn allowed_reply_forwards_with_the_resolved_user() {
        let outcome = read_authorize_reply(Some(200), &allow_body("r1"), "r1");
        assert!(matches!(outcome, AuthorizeOutcome::Allowed(_)));
        assert_eq!(
            admission(outcome, FailureMode::FailClosed),
            Admission::Allow {
                resolved_user: Some("alice".into()),
                lease: None,
                held: 100,
            }
        );
    }

    #[test]
    fn a_granted_lease_comes_with_the_admission() {
        let body = json!({"request_id": "r1", "decision": "allow", "user_id": "alice",
            "quota_type": "text_token", "held": 100, "priced": true,
            "lease": {"lease_id": "lease:r1", "units": 5000, "expires_at_ms": 99,
                      "measure": "total_tokens", "default_max_output_tokens": 4096}});
        let outcome = read_authorize_reply(Some(200), body.to_string().as_bytes(), "r1");
        let Admission::Allow { lease, held, .. } = admission(outcome, FailureMode::FailClosed)
        else {
            panic!("allowed");
        };
        assert_eq!(held, 100);
        let lease = lease.expect("lease");
        assert_eq!((lease.lease_id.as_str(), lease.units), ("lease:r1", 5000));
    }

    #[test]
    fn calls_under_a_lease_settle_and_void_naming_it() {
        let settle = settled(finalize(
            &leased_call(),
            Some(200),
            false,
            &reported(40, 60),
            Ending::Complete,
            7,
        ));
        assert_eq!(settle.lease_id.as_deref(), Some("lease:r0"));
        assert_eq!(settle.held, 4_140);
        assert_eq!(settle.caller, Caller::UserId("alice".into()));
        let void = finalize(
            &leased_call(),
            Some(503),
            false,
            &ObservedResponse::default(),
            Ending::Complete,
            7,
        );
        let Some(Finalize::Void(void)) = void else {
            panic!("expected a void, got {void:?}");
        };
        assert_eq!(
            (void.lease_id.as_deref(), void.held),
            (Some("lease:r0"), 4_140)
        );
        let unleased = settled(finalize(
            &call(true),
            Some(200),
            false,
            &reported(1, 1),
            Ending::Complete,
            7,
        ));
        assert_eq!((unleased.lease_id, unleased.held), (None, 0));
    }

    #[test]
    fn denial_carries_the_protocol_status_regardless_of_failure_mode() {
        let response = AuthorizeResponse {
            request_id: "r1".into(),
            decision: Decision::Deny,
            user_id: None,
            quota_type: None,
            held: 0,
            priced: false,
            denial: Some(Denial {
                code: DenyCode::QuotaExhausted,
                message: "no tokens left".into(),
            }),
            lease: None,
        };
        let body = serde_json::to_vec(&response).unwrap();
        for mode in [FailureMode::FailClosed, FailureMode::FailOpen] {
            let outcome = read_authorize_reply(Some(200), &body, "r1");
            assert_eq!(
                admission(outcome, mode),
                Admission::Deny(Rejection::new(429, "quota_exhausted", "no tokens left"))
            );
        }
        let bare = json!({"request_id": "r1", "decision": "deny"}).to_string();
        match read_authorize_reply(Some(200), bare.as_bytes(), "r1") {
            AuthorizeOutcome::Denied(rejection) => assert_eq!(rejection.status, 403),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn failures_follow_the_failure_mode() {
        let failures: [(Option<u16>, &[u8]); 5] = [
            (None, b""),
            (Some(500), br#"{"title":"database down","status":500}"#),
            (Some(401), br#"{"title":"bad secret","status":401}"#),
            (Some(200), b"<html>"),
            (Some(503), b"upstream connect error"),
        ];
        for (status, body) in failures {
            let outcome = read_authorize_reply(status, body, "r1");
            let AuthorizeOutcome::Unavailable(reason) = &outcome else {
                panic!("{status:?} {outcome:?}");
            };
            assert!(!reason.is_empty());
            assert!(matches!(
                admission(outcome.clone(), FailureMode::FailOpen),
                Admission::FailOpen { .. }
            ));
            match admission(outcome, FailureMode::FailClosed) {
                Admission::FailClosed { rejection, .. } => assert_eq!(rejection.status, 503),
                other => panic!("{other:?}"),
            }
        }
        let problem = read_authorize_reply(
            Some(500),
            br#"{"title":"database down","status":500,"detail":"pool"}"#,
            "r1",
        );
        assert_eq!(
            problem,
            AuthorizeOutcome::Unavailable("status 500: database down: pool".into())
        );
    }

    #[test]
    fn answer_for_another_request_is_not_trusted() {
        let outcome = read_authorize_reply(Some(200), &allow_body("other"), "r1");
        assert!(matches!(outcome, AuthorizeOutcome::Unavailable(_)));
    }

    #[test]
    fn completed_call_settles_reported_usage() {
        let settle = settled(finalize(
            &call(true),
            Some(200),
            true,
            &reported(12, 30),
            Ending::Complete,
            77,
        ));
        assert_eq!(settle.outcome, Outcome::Completed);
        assert_eq!(
            (settle.usage.input_tokens, settle.usage.output_tokens),
            (12, 30)
        );
        assert!(!settle.estimated);
        assert!(settle.authorized);
        assert_eq!(settle.upstream_status, 200);
        assert_eq!(settle.ended_at_ms, Some(77));
        assert_eq!(settle.caller, Caller::ApiKey("sk-1".into()));
    }

    #[test]
    fn settlement_names_the_resolved_user_instead_of_the_key() {
        let mut record = call(true);
        record.resolved_user = Some("alice".into());
        let settle = settled(finalize(
            &record,
            Some(200),
            false,
            &reported(1, 2),
            Ending::Complete,
            0,
        ));
        assert_eq!(settle.caller, Caller::UserId("alice".into()));
    }

    #[test]
    fn missing_usage_is_estimated_and_flagged() {
        let observed = ObservedResponse {
            estimated_output_tokens: 25,
            terminal_seen: true,
            ..ObservedResponse::default()
        };
        let settle = settled(finalize(
            &call(true),
            Some(200),
            true,
            &observed,
            Ending::Complete,
            0,
        ));
        assert_eq!(settle.outcome, Outcome::Completed);
        assert_eq!(
            (settle.usage.input_tokens, settle.usage.output_tokens),
            (40, 25)
        );
        assert!(settle.estimated);
    }

    #[test]
    fn upstream_errors_void_the_hold() {
        for status in [400, 429, 500, 503, 302] {
            match finalize(
                &call(true),
                Some(status),
                true,
                &reported(5, 5),
                Ending::Complete,
                0,
            ) {
                Some(Finalize::Void(void)) => {
                    assert_eq!(void.upstream_status, status);
                    assert!(void.reason.contains(&status.to_string()));
                }
                other => panic!("{status}: {other:?}"),
            }
        }
    }

    #[test]
    fn fail_open_calls_with_upstream_errors_need_nothing() {
        assert_eq!(
            finalize(
                &call(false),
                Some(500),
                false,
                &ObservedResponse::default(),
                Ending::Complete,
                0
            ),
            None
        );
    }

    #[test]
    fn fail_open_successes_settle_unauthorized() {
        let settle = settled(finalize(
            &call(false),
            Some(200),
            false,
            &reported(3, 4),
            Ending::Complete,
            0,
        ));
        assert!(!settle.authorized);
        assert_eq!(settle.outcome, Outcome::Completed);
    }

    #[test]
    fn client_disconnect_mid_stream_settles_what_was_seen() {
        // Anthropic-like: message_start reported input and a token of output, then 60
        // tokens of text streamed before the client left.
        let observed = ObservedResponse {
            usage: Some(Usage {
                input_tokens: 35,
                output_tokens: 1,
                ..Usage::default()
            }),
            estimated_output_tokens: 60,
            terminal_seen: false,
            ..ObservedResponse::default()
        };
        let settle = settled(finalize(
            &call(true),
            Some(200),
            true,
            &observed,
            Ending::Cut,
            0,
        ));
        assert_eq!(settle.outcome, Outcome::Partial);
        assert_eq!(
            (settle.usage.input_tokens, settle.usage.output_tokens),
            (35, 60)
        );
        assert!(settle.estimated);
    }

    #[test]
    fn stream_without_terminal_event_is_partial() {
        let observed = ObservedResponse {
            estimated_output_tokens: 9,
            ..ObservedResponse::default()
        };
        let settle = settled(finalize(
            &call(true),
            Some(200),
            true,
            &observed,
            Ending::Complete,
            0,
        ));
        assert_eq!(settle.outcome, Outcome::Partial);
        assert_eq!(
            (settle.usage.input_tokens, settle.usage.output_tokens),
            (40, 9)
        );
        assert!(settle.estimated);
    }

    #[test]
    fn non_streamed_body_needs_no_terminal_event() {
        let mut observed = reported(10, 20);
        observed.terminal_seen = false;
        let settle = settled(finalize(
            &call(true),
            Some(200),
            false,
            &observed,
            Ending::Complete,
            0,
        ));
        assert_eq!(settle.outcome, Outcome::Completed);
        assert!(!settle.estimated);
    }

    #[test]
    fn client_gone_before_any_response_settles_the_prompt_estimate() {
        let settle = settled(finalize(
            &call(true),
            None,
            true,
            &ObservedResponse::default(),
            Ending::Cut,
            5,
        ));
        assert_eq!(settle.outcome, Outcome::Partial);
        assert_eq!(
            (settle.usage.input_tokens, settle.usage.output_tokens),
            (40, 0)
        );
        assert!(settle.estimated);
        assert_eq!(settle.upstream_status, 0);
    }

    #[test]
    fn reported_zero_input_is_replaced_by_the_estimate() {
        let settle = settled(finalize(
            &call(true),
            Some(200),
            true,
            &reported(0, 8),
            Ending::Complete,
            0,
        ));
        assert_eq!(settle.usage.input_tokens, 40);
        assert_eq!(settle.usage.output_tokens, 8);
        assert!(settle.estimated);
    }

    #[test]
    fn in_band_errors() {
        let failed = ObservedResponse {
            in_band_error: Some("overloaded".into()),
            ..ObservedResponse::default()
        };
        match finalize(&call(true), Some(200), true, &failed, Ending::Complete, 0) {
            Some(Finalize::Void(void)) => assert!(void.reason.contains("overloaded")),
            other => panic!("{other:?}"),
        }
        let mid_stream = ObservedResponse {
            in_band_error: Some("overloaded".into()),
            estimated_output_tokens: 12,
            ..ObservedResponse::default()
        };
        let settle = settled(finalize(
            &call(true),
            Some(200),
            true,
            &mid_stream,
            Ending::Complete,
            0,
        ));
        assert_eq!(settle.outcome, Outcome::Partial);
        assert_eq!(settle.usage.output_tokens, 12);
    }

    #[test]
    fn images_seen_are_settled_when_usage_has_none() {
        let observed = ObservedResponse {
            images: 2,
            ..ObservedResponse::default()
        };
        let settle = settled(finalize(
            &call(true),
            Some(200),
            false,
            &observed,
            Ending::Complete,
            0,
        ));
        assert_eq!(settle.usage.images, 2);
        assert_eq!(settle.outcome, Outcome::Completed);
    }
}
