//! Request context: admission before the call is forwarded, metering while the response
//! passes, and exactly one settlement however the call ends.

use super::root::Shared;
use super::unix_ms;
use crate::errors::{Rejection, CODE_INVALID_REQUEST_ID, CODE_MISSING_IDENTITY};
use crate::format::ProviderFormat;
use crate::lease::{self, CallSize};
use crate::lifecycle::{self, Admission, CallRecord, Ending, ObservedResponse};
use crate::meter::{MeterLimits, ResponseMeter};
use crate::request::{self, MeteredRequest, RequestError, RequestHints};
use crate::strip::InjectedUsageStripper;
use llm_meter_protocol::{
    AuthorizeRequest, Caller, Finalize, LeaseAsk, VoidRequest, HEADER_SECRET, PATH_AUTHORIZE,
};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::rc::Rc;
use std::time::Duration;

enum Phase {
    /// Not a metered call (or the plugin is not configured): untouched.
    PassThrough,
    /// Buffering the request body (bytes buffered so far).
    ReadingBody(Pending, usize),
    /// Waiting for the sidecar's answer.
    Authorizing(Pending, MeteredRequest),
    /// Forwarded upstream; metering the response.
    Forwarded(Box<Forwarded>),
    /// Answered by the filter itself, or settled: nothing more to do.
    Closed,
}

/// A metered call before admission.
struct Pending {
    format: ProviderFormat,
    request_id: String,
    caller: Caller,
    /// This call's authorization carries the lease ask of its caller and model.
    lease_asked: bool,
}

struct Forwarded {
    format: ProviderFormat,
    record: CallRecord,
    stream_requested: bool,
    /// The filter set `include_usage`; the client did not ask for it.
    usage_injected: bool,
    status: Option<u16>,
    streaming: bool,
    meter: Option<ResponseMeter>,
    /// Removes the injected usage chunk from what the client receives.
    stripper: Option<InjectedUsageStripper>,
}

pub struct MeterHttp {
    context_id: u32,
    shared: Option<Rc<Shared>>,
    phase: Phase,
}

impl MeterHttp {
    pub fn new(context_id: u32, shared: Option<Rc<Shared>>) -> MeterHttp {
        MeterHttp {
            context_id,
            shared,
            phase: Phase::PassThrough,
        }
    }

    fn now_ms(&self) -> u64 {
        unix_ms(self.get_current_time())
    }

    /// Answer the call from the filter in the provider's error shape.
    fn reject(&mut self, format: ProviderFormat, request_id: &str, rejection: &Rejection) {
        let body = rejection.body(format, request_id);
        let headers = rejection.headers();
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.send_http_response(u32::from(rejection.status), headers, Some(&body));
        self.phase = Phase::Closed;
    }

    fn reject_request(&mut self, shared: &Shared, pending: &Pending, error: &RequestError) {
        shared.metrics.rejected_requests.inc();
        log::info!("llm-meter: {} rejected: {error}", pending.request_id);
        let rejection = Rejection::new(error.http_status(), error.code(), error.to_string());
        self.reject(pending.format, &pending.request_id, &rejection);
    }

    fn request_id(&self) -> String {
        match self.get_http_request_header("x-request-id") {
            Some(id) if !id.trim().is_empty() => id.trim().to_string(),
            // Envoy sets x-request-id unless told not to; this fallback is unique enough
            // (random per VM, time, context) to serve as an idempotency key.
            _ => format!(
                "llm-meter-{:x}-{:x}-{}",
                RandomState::new().hash_one(self.context_id),
                self.now_ms(),
                self.context_id
            ),
        }
    }

    /// Parse the buffered body and ask the sidecar.
    fn authorize(&mut self, shared: &Shared, mut pending: Pending, body_size: usize) -> Action {
        let config = &shared.config;
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let dashscope_sse = self.get_http_request_header("x-dashscope-sse");
        let accept = self.get_http_request_header("accept");
        let hints = RequestHints {
            path: &path,
            dashscope_sse: dashscope_sse.is_some_and(|v| v.trim().eq_ignore_ascii_case("enable")),
            accepts_event_stream: accept.is_some_and(|v| v.contains("text/event-stream")),
        };
        let parsed = match request::parse_request(
            pending.format,
            &hints,
            &body,
            config.inject_include_usage,
        ) {
            Ok(parsed) => parsed,
            Err(error) => {
                self.reject_request(shared, &pending, &error);
                return Action::Pause;
            }
        };
        if let Some(rewritten) = &parsed.rewritten_body {
            self.set_http_request_body(0, body_size, rewritten);
            let length = rewritten.len().to_string();
            self.set_http_request_header("content-length", Some(&length));
        }
        shared.metrics.requests_metered.inc();
        let request = parsed.request;
        if shared.settlements_backlogged() {
            // Settlements are not being delivered fast enough: admitting more calls now
            // would eventually overflow the outbox and lose what they owe.
            let outcome = lifecycle::AuthorizeOutcome::Unavailable(
                "settlement backlog: the outbox is nearly full".into(),
            );
            let admission = lifecycle::admission(outcome, config.failure_mode);
            return self.admit(shared, pending, request, admission, false);
        }
        let size = CallSize {
            estimated_input_tokens: request.estimated_input_tokens,
            max_output_tokens: request.max_output_tokens,
            requested_images: request.requested_images,
        };
        let now = self.now_ms();
        let leasable = lease::keys_settleable(&pending.caller, &request.model);
        let ticket = leasable
            .then(|| shared.admit_from_lease(&pending.caller, &request.model, &size, now))
            .flatten();
        if let Some(ticket) = ticket {
            return self.admit(shared, pending, request, Admission::Leased(ticket), false);
        }
        pending.lease_asked =
            leasable && shared.begin_lease_ask(&pending.caller, &request.model, now);
        let lease = pending.lease_asked.then_some(LeaseAsk {
            units: config.lease_units,
            ttl_ms: config.lease_ttl_ms,
        });
        let message = AuthorizeRequest {
            request_id: pending.request_id.clone(),
            caller: pending.caller.clone(),
            provider: config.provider.clone(),
            model: request.model.clone(),
            estimated_input_tokens: request.estimated_input_tokens,
            max_output_tokens: request.max_output_tokens,
            requested_images: request.requested_images,
            stream: request.stream,
            lease,
        };
        let dispatched = serde_json::to_vec(&message)
            .map_err(|e| format!("cannot serialise: {e}"))
            .and_then(|body| {
                self.dispatch_http_call(
                    &config.sidecar_cluster,
                    vec![
                        (":method", "POST"),
                        (":path", PATH_AUTHORIZE),
                        (":authority", &config.sidecar_authority),
                        ("content-type", "application/json"),
                        (HEADER_SECRET, &config.shared_secret),
                        ("x-request-id", &pending.request_id),
                    ],
                    Some(&body),
                    vec![],
                    Duration::from_millis(config.timeout_ms),
                )
                .map_err(|status| format!("dispatch failed: {status:?}"))
            });
        match dispatched {
            Ok(_token) => {
                self.phase = Phase::Authorizing(pending, request);
                Action::Pause
            }
            Err(reason) => {
                if pending.lease_asked {
                    shared.end_lease_ask(&pending.caller, &request.model);
                }
                let outcome = lifecycle::AuthorizeOutcome::Unavailable(reason);
                let admission = lifecycle::admission(outcome, config.failure_mode);
                self.admit(shared, pending, request, admission, false)
            }
        }
    }

    /// Act on the admission decision. `paused` tells whether the request is waiting for
    /// `resume_http_request` (an answer arrived) or for our return value (dispatch failed).
    fn admit(
        &mut self,
        shared: &Shared,
        pending: Pending,
        request: MeteredRequest,
        admission: Admission,
        paused: bool,
    ) -> Action {
        let metrics = &shared.metrics;
        let (authorized, resolved_user, lease) = match admission {
            Admission::Allow {
                resolved_user,
                lease,
                held,
            } => {
                metrics.allowed.inc();
                let ticket = lease.and_then(|lease| {
                    let user = resolved_user.as_deref().unwrap_or_default();
                    let now = self.now_ms();
                    shared.lease_granted(&pending.caller, &request.model, user, &lease, held, now)
                });
                (true, resolved_user, ticket)
            }
            Admission::Leased(ticket) => {
                metrics.allowed.inc();
                let user = Some(ticket.user_id.clone()).filter(|u| !u.is_empty());
                (true, user, Some(ticket))
            }
            Admission::FailOpen { reason } => {
                metrics.failed_open.inc();
                log::warn!(
                    "llm-meter: {} forwarded unmetered-for-now (fail-open): sidecar {reason}",
                    pending.request_id
                );
                (false, None, None)
            }
            Admission::Deny(rejection) => {
                metrics.denied.inc();
                log::info!(
                    "llm-meter: {} denied: {} {}",
                    pending.request_id,
                    rejection.code,
                    rejection.message
                );
                self.reject(pending.format, &pending.request_id, &rejection);
                return Action::Pause;
            }
            Admission::FailClosed { reason, rejection } => {
                metrics.failed_closed.inc();
                log::warn!(
                    "llm-meter: {} refused (fail-closed): sidecar {reason}",
                    pending.request_id
                );
                self.reject(pending.format, &pending.request_id, &rejection);
                return Action::Pause;
            }
        };
        let record = CallRecord {
            request_id: pending.request_id,
            caller: pending.caller,
            resolved_user,
            provider: shared.config.provider.clone(),
            model: request.model,
            estimated_input_tokens: request.estimated_input_tokens,
            authorized,
            lease,
        };
        self.phase = Phase::Forwarded(Box::new(Forwarded {
            format: pending.format,
            record,
            stream_requested: request.stream,
            usage_injected: request.usage_injected,
            status: None,
            streaming: request.stream,
            meter: None,
            stripper: None,
        }));
        if paused {
            self.resume_http_request();
        }
        Action::Continue
    }

    /// Settle the call once; later calls do nothing.
    fn finalize(&mut self, ending: Ending) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let now = self.now_ms();
        match std::mem::replace(&mut self.phase, Phase::Closed) {
            Phase::Forwarded(mut call) => {
                let observed = match call.meter.as_mut() {
                    Some(meter) => {
                        if ending == Ending::Complete {
                            meter.finish();
                        }
                        observed(meter, &call.record.request_id)
                    }
                    None => ObservedResponse::default(),
                };
                let item = lifecycle::finalize(
                    &call.record,
                    call.status,
                    call.streaming,
                    &observed,
                    ending,
                    now,
                );
                if let Some(item) = item {
                    count_finalize(&shared, &item);
                    let usage = match &item {
                        Finalize::Settle(settle) => Some(settle.usage),
                        _ => None,
                    };
                    shared.enqueue(item, now);
                    if let Some(ticket) = &call.record.lease {
                        shared.lease_call_ended(ticket, usage.as_ref(), now);
                    }
                }
            }
            Phase::Authorizing(pending, request) => {
                if pending.lease_asked {
                    shared.end_lease_ask(&pending.caller, &request.model);
                }
                // The client left while the sidecar decided: release any hold it made.
                shared.enqueue(
                    Finalize::Void(VoidRequest {
                        request_id: pending.request_id,
                        reason: "client left before the call was forwarded".into(),
                        upstream_status: 0,
                        // Had the answer granted a lease, the sidecar releases it with
                        // this void: the filter never admitted a call under it.
                        lease_id: None,
                        held: 0,
                    }),
                    now,
                );
            }
            other => self.phase = other,
        }
    }
}

fn observed(meter: &ResponseMeter, request_id: &str) -> ObservedResponse {
    let report = meter.report();
    if report.oversized_events > 0 || report.body_too_large {
        log::warn!(
            "llm-meter: {request_id}: response exceeded the meter's limits \
             ({} oversized events, body too large: {}); usage may be estimated",
            report.oversized_events,
            report.body_too_large
        );
    }
    ObservedResponse {
        usage: report.usage,
        estimated_output_tokens: report.estimated_output_tokens,
        terminal_seen: report.terminal_seen,
        in_band_error: report.in_band_error,
        images: report.images,
    }
}

fn count_finalize(shared: &Shared, item: &Finalize) {
    let metrics = &shared.metrics;
    match item {
        Finalize::Settle(settle) => {
            metrics.tokens_in.add(settle.usage.input_tokens);
            metrics.tokens_out.add(settle.usage.output_tokens);
            if settle.estimated {
                metrics.estimated_settlements.inc();
            }
        }
        Finalize::Void(_) => metrics.voided.inc(),
        Finalize::Release(_) => {}
    }
}

impl Context for MeterHttp {
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let Phase::Authorizing(pending, request) =
            std::mem::replace(&mut self.phase, Phase::Closed)
        else {
            return;
        };
        let status = self
            .get_http_call_response_header(":status")
            .and_then(|s| s.parse::<u16>().ok());
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        if pending.lease_asked {
            shared.end_lease_ask(&pending.caller, &request.model);
        }
        let outcome = lifecycle::read_authorize_reply(status, &body, &pending.request_id);
        let admission = lifecycle::admission(outcome, shared.config.failure_mode);
        self.admit(&shared, pending, request, admission, true);
    }

    fn on_done(&mut self) -> bool {
        self.finalize(Ending::Cut);
        true
    }
}

impl HttpContext for MeterHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            return Action::Continue;
        };
        let config = &shared.config;
        if self.get_http_request_header(":method").as_deref() != Some("POST") {
            return Action::Continue;
        }
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let Some(format) = config.format.or_else(|| ProviderFormat::detect(&path)) else {
            return Action::Continue;
        };
        let request_id = self.request_id();
        if !lease::usable_request_id(&request_id) {
            // The ledger could not key this call's settlement: it would run unbilled.
            shared.metrics.rejected_requests.inc();
            let rejection = Rejection::new(
                400,
                CODE_INVALID_REQUEST_ID,
                "x-request-id must be 1-191 characters and must not start with `lease:`",
            );
            self.reject(format, "", &rejection);
            return Action::Pause;
        }
        let user_id = config
            .user_id_header
            .as_deref()
            .and_then(|h| self.get_http_request_header(h));
        let api_key = config
            .api_key_header
            .as_deref()
            .and_then(|h| self.get_http_request_header(h));
        let Some(caller) = request::identify_caller(user_id.as_deref(), api_key.as_deref()) else {
            shared.metrics.rejected_requests.inc();
            let rejection = Rejection::new(
                401,
                CODE_MISSING_IDENTITY,
                "the caller is not identified: send an API key or an authenticated user",
            );
            self.reject(format, &request_id, &rejection);
            return Action::Pause;
        };
        let pending = Pending {
            format,
            request_id,
            caller,
            lease_asked: false,
        };
        let content_length = self.get_http_request_header("content-length");
        let declared = request::check_declared_length(
            content_length.as_deref(),
            config.max_request_body_bytes,
        );
        if let Err(error) = declared {
            self.reject_request(&shared, &pending, &error);
            return Action::Pause;
        }
        if end_of_stream {
            self.reject_request(&shared, &pending, &RequestError::EmptyBody);
            return Action::Pause;
        }
        // The meter must read the response: ask for it uncompressed.
        self.set_http_request_header("accept-encoding", None);
        self.phase = Phase::ReadingBody(pending, 0);
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            return Action::Continue;
        };
        let Phase::ReadingBody(pending, _) = std::mem::replace(&mut self.phase, Phase::Closed)
        else {
            return Action::Continue;
        };
        let limit = shared.config.max_request_body_bytes;
        if body_size > limit {
            self.reject_request(&shared, &pending, &RequestError::TooLarge { limit });
            return Action::Pause;
        }
        if !end_of_stream {
            self.phase = Phase::ReadingBody(pending, body_size);
            return Action::Pause;
        }
        self.authorize(&shared, pending, body_size)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        // A body ended by trailers: take what was buffered as the whole body.
        let Some(shared) = self.shared.clone() else {
            return Action::Continue;
        };
        let Phase::ReadingBody(pending, body_size) =
            std::mem::replace(&mut self.phase, Phase::Closed)
        else {
            return Action::Continue;
        };
        match self.authorize(&shared, pending, body_size) {
            Action::Continue => Action::Continue,
            _ => Action::Pause,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            return Action::Continue;
        };
        if !matches!(self.phase, Phase::Forwarded(_)) {
            return Action::Continue;
        }
        let status = self
            .get_http_response_header(":status")
            .and_then(|s| s.parse::<u16>().ok());
        let event_stream = self
            .get_http_response_header("content-type")
            .is_some_and(|t| t.trim_start().starts_with("text/event-stream"));
        let Phase::Forwarded(call) = &mut self.phase else {
            return Action::Continue;
        };
        call.status = status;
        call.streaming = call.stream_requested || event_stream;
        let config = &shared.config;
        call.meter = Some(ResponseMeter::new(
            call.format,
            call.streaming,
            MeterLimits {
                max_event_bytes: config.max_event_bytes,
                max_json_body_bytes: config.max_response_json_bytes,
            },
        ));
        let success = status.is_some_and(|s| (200..300).contains(&s));
        if config.strip_injected_usage_chunk && call.usage_injected && event_stream && success {
            call.stripper = Some(InjectedUsageStripper::new(config.max_event_bytes));
            // The client receives fewer bytes than the provider sent.
            self.set_http_response_header("content-length", None);
        }
        if end_of_stream {
            self.finalize(Ending::Complete);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Phase::Forwarded(_) = &self.phase else {
            return Action::Continue;
        };
        let chunk = if body_size > 0 {
            self.get_http_response_body(0, body_size)
        } else {
            None
        };
        let mut replacement = None;
        if let Phase::Forwarded(call) = &mut self.phase {
            let chunk = chunk.unwrap_or_default();
            if let Some(meter) = call.meter.as_mut() {
                meter.feed(&chunk);
            }
            if let Some(stripper) = call.stripper.as_mut() {
                let stripped_before = stripper.stripped_events();
                replacement = stripper.feed(&chunk, end_of_stream);
                if let Some(shared) = &self.shared {
                    let stripped = stripper.stripped_events() - stripped_before;
                    shared.metrics.usage_chunks_stripped.add(stripped);
                }
            }
        }
        if let Some(bytes) = replacement {
            self.set_http_response_body(0, body_size, &bytes);
        }
        if end_of_stream {
            self.finalize(Ending::Complete);
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        if let Phase::Forwarded(call) = &self.phase {
            let held = call.stripper.as_ref().map_or(0, |s| s.held_bytes());
            if held > 0 {
                // Body bytes cannot be added once trailers arrive: an event without its
                // closing blank line (which SSE clients discard anyway) is not delivered.
                log::warn!(
                    "llm-meter: {}: {held} bytes of an unterminated last event withheld",
                    call.record.request_id
                );
            }
        }
        self.finalize(Ending::Complete);
        Action::Continue
    }

    fn on_log(&mut self) {
        self.finalize(Ending::Cut);
    }
}
