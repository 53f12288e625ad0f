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

/// Declares `Metrics` from one list of counters: the struct, `define` (named after each
/// field) and `flush`, so no counter can be defined without being flushed.
macro_rules! metrics {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        #[derive(Debug)]
        pub struct Metrics {
            $($(#[$doc])* pub $name: Counter,)*
        }

        impl Metrics {
            pub fn define() -> Metrics {
                Metrics {
                    $($name: Counter::define(stringify!($name)),)*
                }
            }

            /// Hand every counter's increments since the last flush to Envoy.
            pub fn flush(&self) {
                $(self.$name.flush();)*
            }
        }
    };
}

metrics! {
    /// Requests on a metered route that reached the authorize step.
    requests_metered,
    allowed,
    denied,
    failed_open,
    failed_closed,
    /// Answered by the filter before authorize: no identity, bad or oversized body.
    rejected_requests,
    tokens_in,
    tokens_out,
    /// Settlements with any estimated figure.
    estimated_settlements,
    /// Settlements and voids queued for delivery.
    finalized,
    voided,
    /// Items applied by the sidecar.
    settled,
    settlement_retries,
    /// Items the sidecar rejected for good.
    settlement_rejected,
    /// Items dropped because the outbox was full (or could not be drained at shutdown).
    outbox_dropped,
    /// Injected usage-only chunks removed from what clients receive.
    usage_chunks_stripped,
    /// Calls admitted under a lease, without asking the sidecar.
    lease_admissions,
    leases_granted,
    /// Releases of leases queued for delivery.
    leases_released,
}
