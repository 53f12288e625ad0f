//! Counters visible in Envoy's `/stats` (Envoy prefixes custom Wasm metrics with
//! `wasmcustom.`), e.g. `wasmcustom.llm_meter.requests_metered`.

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use std::cell::Cell;

/// A counter; `None` when the host refused to define it (metering goes on without it).
/// Increments add up in the VM and reach Envoy on `flush` (each root tick): a host call
/// per increment cost Envoy's worker most of a microsecond, several per request.
#[derive(Debug)]
pub struct Counter {
    id: Option<u32>,
    pending: Cell<u64>,
}

impl Counter {
    fn define(name: &str) -> Counter {
        let id = hostcalls::define_metric(MetricType::Counter, &format!("llm_meter.{name}"))
            .map_err(|status| log::warn!("llm-meter: cannot define metric {name}: {status:?}"))
            .ok();
        Counter {
            id,
            pending: Cell::new(0),
        }
    }

    pub fn add(&self, value: u64) {
        self.pending.set(self.pending.get().saturating_add(value));
    }

    /// Hand what was counted since the last flush to Envoy.
    fn flush(&self) {
        let value = self.pending.replace(0);
        if let (Some(id), true) = (self.id, value > 0) {
            let offset = value.min(i64::MAX as u64) as i64;
            let _ = hostcalls::increment_metric(id, offset);
        }
    }

    pub fn inc(&self) {
        self.add(1);
    }
}

#[derive(Debug)]
pub struct Metrics {
    /// Requests on a metered route that reached the authorize step.
    pub requests_metered: Counter,
    pub allowed: Counter,
    pub denied: Counter,
    pub failed_open: Counter,
    pub failed_closed: Counter,
    /// Answered by the filter before authorize: no identity, bad or oversized body.
    pub rejected_requests: Counter,
    pub tokens_in: Counter,
    pub tokens_out: Counter,
    /// Settlements with any estimated figure.
    pub estimated_settlements: Counter,
    /// Settlements and voids queued for delivery.
    pub finalized: Counter,
    pub voided: Counter,
    /// Items applied by the sidecar.
    pub settled: Counter,
    pub settlement_retries: Counter,
    /// Items the sidecar rejected for good.
    pub settlement_rejected: Counter,
    /// Items dropped because the outbox was full (or could not be drained at shutdown).
    pub outbox_dropped: Counter,
    /// Injected usage-only chunks removed from what clients receive.
    pub usage_chunks_stripped: Counter,
    /// Calls admitted under a lease, without asking the sidecar.
    pub lease_admissions: Counter,
    pub leases_granted: Counter,
    /// Releases of leases queued for delivery.
    pub leases_released: Counter,
}

impl Metrics {
    pub fn define() -> Metrics {
        Metrics {
            requests_metered: Counter::define("requests_metered"),
            allowed: Counter::define("allowed"),
            denied: Counter::define("denied"),
            failed_open: Counter::define("failed_open"),
            failed_closed: Counter::define("failed_closed"),
            rejected_requests: Counter::define("rejected_requests"),
            tokens_in: Counter::define("tokens_in"),
            tokens_out: Counter::define("tokens_out"),
            estimated_settlements: Counter::define("estimated_settlements"),
            finalized: Counter::define("finalized"),
            voided: Counter::define("voided"),
            settled: Counter::define("settled"),
            settlement_retries: Counter::define("settlement_retries"),
            settlement_rejected: Counter::define("settlement_rejected"),
            outbox_dropped: Counter::define("outbox_dropped"),
            usage_chunks_stripped: Counter::define("usage_chunks_stripped"),
            lease_admissions: Counter::define("lease_admissions"),
            leases_granted: Counter::define("leases_granted"),
            leases_released: Counter::define("leases_released"),
        }
    }

    /// Hand every counter's increments since the last flush to Envoy. The pattern names
    /// every field, so a counter added to `Metrics` cannot be left out of the flush.
    pub fn flush(&self) {
        let Metrics {
            requests_metered,
            allowed,
            denied,
            failed_open,
            failed_closed,
            rejected_requests,
            tokens_in,
            tokens_out,
            estimated_settlements,
            finalized,
            voided,
            settled,
            settlement_retries,
            settlement_rejected,
            outbox_dropped,
            usage_chunks_stripped,
            lease_admissions,
            leases_granted,
            leases_released,
        } = self;
        let all = [
            requests_metered,
            allowed,
            denied,
            failed_open,
            failed_closed,
            rejected_requests,
            tokens_in,
            tokens_out,
            estimated_settlements,
            finalized,
            voided,
            settled,
            settlement_retries,
            settlement_rejected,
            outbox_dropped,
            usage_chunks_stripped,
            lease_admissions,
            leases_granted,
            leases_released,
        ];
        for counter in all {
            counter.flush();
        }
    }
}
