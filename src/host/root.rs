//! Root context: configuration, and delivery of the settlement outbox.

use super::http::MeterHttp;
use super::metrics::Metrics;
use super::unix_ms;
use crate::config::Config;
use crate::lease::{CallSize, LeaseBook, Ticket};
use crate::outbox::{Batch, Outbox, OutboxConfig, PushResult};
use llm_meter_protocol::{
    Caller, Finalize, FinalizeBatchRequest, FinalizeBatchResponse, Lease, ReleaseRequest, Usage,
    HEADER_SECRET, PATH_FINALIZE_BATCH,
};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

/// State shared by the root context and the request contexts of one plugin in one VM
/// (one thread: `Rc`/`RefCell` suffice).
pub struct Shared {
    pub config: Config,
    /// Kept across reconfigurations: calls still in flight under the previous
    /// configuration count into the same counters, which this root keeps flushing.
    pub metrics: Rc<Metrics>,
    outbox: RefCell<Outbox>,
    leases: RefCell<LeaseBook>,
}

impl Shared {
    /// Whether the outbox is too full to admit another call (see `Outbox::is_backlogged`).
    pub fn settlements_backlogged(&self) -> bool {
        self.outbox
            .try_borrow()
            .map(|outbox| outbox.is_backlogged())
            .unwrap_or(false)
    }

    /// Settlements still to deliver, plus leases whose calls are still in flight (each
    /// will yield a settlement and a release).
    fn pending_work(&self) -> usize {
        let queued = self.outbox.try_borrow().map_or(1, |outbox| outbox.len());
        let leases = self.leases.try_borrow().map_or(1, |book| book.len());
        queued + leases
    }

    /// Whether this call's authorization should ask for a lease (at most one ask per
    /// caller and model is on its way at a time).
    pub fn begin_lease_ask(&self, caller: &Caller, model: &str, now_ms: u64) -> bool {
        let timeout_ms = self.config.timeout_ms;
        self.leases
            .try_borrow_mut()
            .map(|mut book| book.begin_ask(caller, model, now_ms, timeout_ms))
            .unwrap_or(false)
    }

    /// The answer to this call's lease ask arrived, or the call went away.
    pub fn end_lease_ask(&self, caller: &Caller, model: &str) {
        if let Ok(mut book) = self.leases.try_borrow_mut() {
            book.end_ask(caller, model);
        }
    }

    /// Admit a call under a lease of its caller and model, if one has room.
    pub fn admit_from_lease(
        &self,
        caller: &Caller,
        model: &str,
        size: &CallSize,
        now_ms: u64,
    ) -> Option<Ticket> {
        let mut book = self.leases.try_borrow_mut().ok()?;
        let ticket = book.admit(caller, model, size, now_ms)?;
        self.metrics.lease_admissions.inc();
        Some(ticket)
    }

    /// Record a lease granted with the authorization of a call that holds `held` of it.
    pub fn lease_granted(
        &self,
        caller: &Caller,
        model: &str,
        user_id: &str,
        lease: &Lease,
        held: u64,
        now_ms: u64,
    ) -> Option<Ticket> {
        let mut book = self.leases.try_borrow_mut().ok()?;
        self.metrics.leases_granted.inc();
        Some(book.granted(caller, model, user_id, lease, held, now_ms))
    }

    /// A call admitted under a lease ended; releases the lease if that spent it.
    pub fn lease_call_ended(&self, ticket: &Ticket, usage: Option<&Usage>, now_ms: u64) {
        let spent = match self.leases.try_borrow_mut() {
            Ok(mut book) => book.finish(ticket, usage, now_ms),
            Err(_) => false,
        };
        if spent {
            self.release_lease(ticket.lease_id.clone(), now_ms);
        }
    }

    /// Release every lease that is idle, expired, retired or empty.
    fn release_spent_leases(&self, now_ms: u64) {
        let spent = match self.leases.try_borrow_mut() {
            Ok(mut book) => book.take_spent(now_ms),
            Err(_) => Vec::new(),
        };
        for lease_id in spent {
            self.release_lease(lease_id, now_ms);
        }
    }

    /// Queue the release of a lease's remaining units. The outbox keeps order, so the
    /// settlements of its calls reach the sidecar first.
    pub fn release_lease(&self, lease_id: String, now_ms: u64) {
        self.metrics.leases_released.inc();
        self.enqueue(Finalize::Release(ReleaseRequest { lease_id }), now_ms);
    }

    /// Queue a settlement or void for delivery by the root context.
    pub fn enqueue(&self, item: Finalize, now_ms: u64) {
        let request_id = item.request_id().to_string();
        let pushed = match self.outbox.try_borrow_mut() {
            Ok(mut outbox) => outbox.push(item, now_ms),
            Err(_) => PushResult::Dropped,
        };
        match pushed {
            PushResult::Queued => self.metrics.finalized.inc(),
            PushResult::Dropped => {
                self.metrics.outbox_dropped.inc();
                log::error!("llm-meter: outbox full, settlement of {request_id} dropped");
            }
        }
    }
}

pub struct MeterRoot {
    context_id: u32,
    shared: Option<Rc<Shared>>,
    /// HTTP call token and batch id of each batch in flight.
    in_flight: Vec<(u32, u64)>,
    /// The plugin is shutting down (e.g. its listener was reloaded and drained): keep
    /// delivering, retries included, until the outbox is empty or this deadline (Unix ms)
    /// passes, then signal `done`. The VM outlives the plugin, so its ticks keep coming.
    draining_until: Option<u64>,
}

/// How long a plugin being shut down keeps retrying undelivered settlements (the sidecar
/// may be restarting at the same moment as the configuration).
const DRAIN_LIMIT_MS: u64 = 10 * 60 * 1000;

impl MeterRoot {
    pub fn new(context_id: u32) -> MeterRoot {
        MeterRoot {
            context_id,
            shared: None,
            in_flight: Vec::new(),
            draining_until: None,
        }
    }

    fn now_ms(&self) -> u64 {
        unix_ms(self.get_current_time())
    }

    /// Send due batches while fewer than `settle_max_in_flight` are in flight; with
    /// `only_full`, only whole batches (see `Outbox::next_full_batch`).
    fn flush(&mut self, shared: &Shared, only_full: bool) {
        loop {
            let now = self.now_ms();
            let Ok(mut outbox) = shared.outbox.try_borrow_mut() else {
                return;
            };
            let next = if only_full {
                outbox.next_full_batch(now)
            } else {
                outbox.next_batch(now)
            };
            let Some(batch) = next else {
                return;
            };
            // Never hold the borrow across a host call.
            drop(outbox);
            match self.send_batch(shared, &batch) {
                Ok(token) => self.in_flight.push((token, batch.id)),
                Err(reason) => {
                    log::warn!(
                        "llm-meter: finalize batch of {} not sent: {reason}",
                        batch.items.len()
                    );
                    self.batch_failed(shared, batch.id);
                    return;
                }
            }
        }
    }

    fn send_batch(&self, shared: &Shared, batch: &Batch) -> Result<u32, String> {
        let config = &shared.config;
        let body = serde_json::to_vec(&FinalizeBatchRequest {
            items: batch.items.as_slice(),
        })
        .map_err(|e| format!("cannot serialise: {e}"))?;
        self.dispatch_http_call(
            &config.sidecar_cluster,
            vec![
                (":method", "POST"),
                (":path", PATH_FINALIZE_BATCH),
                (":authority", &config.sidecar_authority),
                ("content-type", "application/json"),
                (HEADER_SECRET, &config.shared_secret),
            ],
            Some(&body),
            vec![],
            Duration::from_millis(config.timeout_ms),
        )
        .map_err(|status| {
            format!(
                "dispatch to cluster `{}` failed: {status:?}",
                config.sidecar_cluster
            )
        })
    }

    fn batch_failed(&mut self, shared: &Shared, batch_id: u64) {
        let now = self.now_ms();
        let retried = match shared.outbox.try_borrow_mut() {
            Ok(mut outbox) => outbox.on_batch_failed(batch_id, now),
            Err(_) => 0,
        };
        shared.metrics.settlement_retries.add(retried);
    }

    fn on_batch_answer(&mut self, shared: &Shared, batch_id: u64, body_size: usize) {
        let status = self
            .get_http_call_response_header(":status")
            .and_then(|s| s.parse::<u16>().ok());
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        let parsed = match status {
            Some(200) => serde_json::from_slice::<FinalizeBatchResponse>(&body)
                .map_err(|e| format!("unreadable answer: {e}")),
            Some(status) => Err(format!(
                "status {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            )),
            None => Err("no answer (timeout or connection failure)".to_string()),
        };
        let response = match parsed {
            Ok(response) => response,
            Err(reason) => {
                log::warn!("llm-meter: finalize batch failed, will retry: {reason}");
                self.batch_failed(shared, batch_id);
                return;
            }
        };
        let now = self.now_ms();
        let Ok(mut outbox) = shared.outbox.try_borrow_mut() else {
            return;
        };
        let report = outbox.on_batch_results(batch_id, &response.results, now);
        drop(outbox);
        let metrics = &shared.metrics;
        metrics.settled.add(report.settled);
        metrics.settlement_retries.add(report.retried);
        metrics
            .settlement_rejected
            .add(report.rejected.len() as u64);
        for (request_id, error) in &report.rejected {
            log::error!("llm-meter: sidecar rejected the settlement of {request_id}: {error}");
        }
        if report.unmatched_results > 0 {
            log::warn!(
                "llm-meter: {} finalize results named no item of the batch",
                report.unmatched_results
            );
        }
    }

    /// While draining: signal `done` once everything is delivered, or give up on what is
    /// left at the deadline. True when done was signalled.
    fn check_drained(&mut self, shared: &Shared) -> bool {
        let Some(deadline) = self.draining_until else {
            return false;
        };
        let left = shared.pending_work();
        if left > 0 && self.now_ms() < deadline {
            return false;
        }
        if left > 0 {
            // Only queued items are lost here; a lease still open is swept by the sidecar.
            let queued = shared.outbox.try_borrow().map_or(0, |outbox| outbox.len());
            shared.metrics.outbox_dropped.add(queued as u64);
            log::error!(
                "llm-meter: shutting down with {queued} undelivered settlements and {} open leases",
                left - queued.min(left)
            );
        } else {
            log::info!("llm-meter: plugin shut down after delivering every settlement");
        }
        self.draining_until = None;
        shared.metrics.flush();
        self.done();
        true
    }
}

impl Context for MeterRoot {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let Some(at) = self.in_flight.iter().position(|(t, _)| *t == token_id) else {
            log::debug!("llm-meter: answer to an expired finalize call ignored");
            return;
        };
        let (_, batch_id) = self.in_flight.remove(at);
        self.on_batch_answer(&shared, batch_id, body_size);
        if self.check_drained(&shared) {
            return;
        }
        // A whole batch may be waiting: keep the pipe busy rather than wait for the next
        // tick. A plugin shutting down sends whatever is left at once.
        let only_full = self.draining_until.is_none();
        self.flush(&shared, only_full);
    }

    fn on_done(&mut self) -> bool {
        let Some(shared) = self.shared.clone() else {
            return true;
        };
        let now = self.now_ms();
        let drained = match shared.leases.try_borrow_mut() {
            Ok(mut book) => book.retire_all(now),
            Err(_) => Vec::new(),
        };
        for lease_id in drained {
            shared.release_lease(lease_id, now);
        }
        let left = shared.pending_work();
        if left == 0 {
            shared.metrics.flush();
            return true;
        }
        log::info!("llm-meter: plugin shutting down: delivering {left} settlements first");
        self.draining_until = Some(self.now_ms().saturating_add(DRAIN_LIMIT_MS));
        self.flush(&shared, false);
        false
    }
}

impl RootContext for MeterRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let config = match Config::parse(&bytes) {
            Ok(config) => config,
            Err(err) => {
                log::error!("llm-meter: {err}");
                return false;
            }
        };
        let outbox_config = OutboxConfig {
            batch_max: config.settle_batch_max,
            max_in_flight: config.settle_max_in_flight,
            retry_initial_ms: config.settle_retry_initial_ms,
            retry_max_ms: config.settle_retry_max_ms,
            capacity: config.outbox_capacity,
            in_flight_deadline_ms: config.timeout_ms.saturating_mul(2).saturating_add(1000),
        };
        // A reconfiguration keeps what is still waiting to be delivered, and the leases
        // calls in flight were admitted under.
        let lease_config = config.lease_config();
        let metrics = match &self.shared {
            Some(previous) => previous.metrics.clone(),
            None => Rc::new(Metrics::define()),
        };
        let (outbox, leases) = match self.shared.take().map(Rc::try_unwrap) {
            Some(Ok(previous)) => {
                let mut leases = previous.leases.into_inner();
                leases.reconfigure(lease_config);
                let mut outbox = previous.outbox.into_inner();
                outbox.reconfigure(outbox_config);
                (outbox, leases)
            }
            _ => (Outbox::new(outbox_config), LeaseBook::new(lease_config)),
        };
        self.set_tick_period(Duration::from_millis(config.settle_tick_ms));
        log::info!(
            "llm-meter: configured (root {}, sidecar cluster `{}`, provider `{}`, {:?}); \
             Envoy must set allow_on_headers_stop_iteration: true for this plugin",
            self.context_id,
            config.sidecar_cluster,
            config.provider,
            config.failure_mode
        );
        self.shared = Some(Rc::new(Shared {
            config,
            metrics,
            outbox: RefCell::new(outbox),
            leases: RefCell::new(leases),
        }));
        true
    }

    fn on_tick(&mut self) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        shared.metrics.flush();
        let now = self.now_ms();
        let expired = match shared.outbox.try_borrow_mut() {
            Ok(mut outbox) => {
                let expired = outbox.expire_in_flight(now);
                self.in_flight.retain(|(_, id)| outbox.is_in_flight(*id));
                expired
            }
            Err(_) => 0,
        };
        if expired > 0 {
            log::warn!("llm-meter: finalize batch unanswered past its deadline, will retry");
            shared.metrics.settlement_retries.add(expired);
        }
        shared.release_spent_leases(now);
        if self.check_drained(&shared) {
            return;
        }
        self.flush(&shared, false);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(MeterHttp::new(context_id, self.shared.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
