//! Settlements waiting to be delivered to the sidecar.
//!
//! Pure logic driven by timestamps and results: the root context pushes `Finalize` items in,
//! asks for the next batch on each tick (and for the next full one when an answer frees a
//! slot), and reports how the batch went. Items are retried
//! with exponential backoff until the sidecar applies them (or rejects them for good); the
//! queue is bounded, and what does not fit is dropped and counted rather than growing the
//! VM's memory without limit. At most `max_in_flight` batches are in flight at a time: one
//! batch per round trip bounds the settlement rate by the round trip's latency, and a second
//! one lets the sidecar parse the next batch while it applies this one. Batches in flight
//! together may be applied in either order, as retried items already could be: every item
//! is idempotent, and a call's settlement that arrives after its lease's release is charged
//! in full as a settlement without a hold.

use llm_meter_protocol::{Finalize, FinalizeResult};
use std::collections::VecDeque;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxConfig {
    pub batch_max: usize,
    /// Batches sent and not yet answered, at most.
    pub max_in_flight: usize,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    pub capacity: usize,
    /// A batch with no answer after this long is treated as failed (the host normally
    /// reports a timeout itself; this guards against a lost callback).
    pub in_flight_deadline_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    item: Finalize,
    attempts: u32,
    not_before_ms: u64,
}

#[derive(Debug)]
struct InFlight {
    id: u64,
    entries: Vec<Entry>,
    deadline_ms: u64,
}

/// A batch handed to the host for sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub id: u64,
    pub items: Vec<Finalize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushResult {
    Queued,
    /// The outbox is full: the item was dropped.
    Dropped,
}

/// What became of a batch's items, for logs and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Applied by the sidecar (including idempotent repeats).
    pub settled: u64,
    /// Scheduled again.
    pub retried: u64,
    /// Refused for good: `(request_id, error)`; never sent again.
    pub rejected: Vec<(String, String)>,
    /// Results that named no item of the batch (ignored).
    pub unmatched_results: u64,
    /// The answer was for a batch no longer in flight (ignored).
    pub stale: bool,
}

#[derive(Debug)]
pub struct Outbox {
    config: OutboxConfig,
    queue: VecDeque<Entry>,
    in_flight: Vec<InFlight>,
    next_batch_id: u64,
}

impl Outbox {
    pub fn new(config: OutboxConfig) -> Outbox {
        Outbox {
            config,
            queue: VecDeque::new(),
            in_flight: Vec::new(),
            next_batch_id: 1,
        }
    }

    /// Items waiting or in flight.
    pub fn len(&self) -> usize {
        self.queue.len()
            + self
                .in_flight
                .iter()
                .map(|f| f.entries.len())
                .sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once the outbox is nine-tenths full. New calls are then refused (or, under
    /// fail-open, forwarded without a hold) so that the settlements of calls already admitted
    /// still fit: a full outbox would have to drop a settlement, and a dropped settlement is
    /// a call nobody pays for.
    pub fn is_backlogged(&self) -> bool {
        self.len() >= self.backlog_threshold()
    }

    fn backlog_threshold(&self) -> usize {
        (self.config.capacity - self.config.capacity / 10).max(1)
    }

    pub fn has_in_flight(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Whether batch `batch_id` was sent and is not yet answered, failed or expired.
    pub fn is_in_flight(&self, batch_id: u64) -> bool {
        self.in_flight.iter().any(|f| f.id == batch_id)
    }

    /// New settings (the plugin was reconfigured), except that the capacity never shrinks
    /// while the VM runs: calls admitted under the old capacity must still find room for
    /// their settlements. A smaller `outbox_capacity` takes effect when Envoy restarts.
    pub fn reconfigure(&mut self, config: OutboxConfig) {
        self.config = OutboxConfig {
            capacity: config.capacity.max(self.config.capacity),
            ..config
        };
    }

    pub fn push(&mut self, item: Finalize, now_ms: u64) -> PushResult {
        if self.len() >= self.config.capacity {
            return PushResult::Dropped;
        }
        self.queue.push_back(Entry {
            item,
            attempts: 0,
            not_before_ms: now_ms,
        });
        PushResult::Queued
    }

    /// The next batch to send, if fewer than `max_in_flight` are in flight and something is
    /// due. Items whose backoff has not elapsed stay queued; order among due items is
    /// preserved.
    pub fn next_batch(&mut self, now_ms: u64) -> Option<Batch> {
        self.take_batch(now_ms, 1)
    }

    /// Like `next_batch`, but only when a whole batch is queued. Between ticks a batch
    /// leaves only full: sending whatever is queued the moment an answer arrives made
    /// batches as small as the sidecar was fast, and each batch costs the sidecar a
    /// request and a commit, and Envoy a callout, whatever its size. What is left waits
    /// for the next tick, at most `settle_tick_ms`.
    pub fn next_full_batch(&mut self, now_ms: u64) -> Option<Batch> {
        self.take_batch(now_ms, self.config.batch_max)
    }

    fn take_batch(&mut self, now_ms: u64, min_queued: usize) -> Option<Batch> {
        if self.in_flight.len() >= self.config.max_in_flight.max(1) {
            return None;
        }
        if self.queue.len() < min_queued {
            return None;
        }
        // Take due entries from the front until the batch is full; entries still backing
        // off go back in front, in their order. The rest of the queue is not touched: under
        // load it holds thousands of settlements, and moving them all for every batch cost
        // Envoy's worker memory traffic per call.
        let mut popped = Vec::with_capacity(self.config.batch_max.min(self.queue.len()));
        let mut due = 0;
        while due < self.config.batch_max {
            let Some(entry) = self.queue.pop_front() else {
                break;
            };
            due += usize::from(entry.not_before_ms <= now_ms);
            popped.push(entry);
        }
        if due < min_queued.max(1) {
            // Too few are due (retries still backing off count for nothing): everything
            // goes back as it was.
            for entry in popped.into_iter().rev() {
                self.queue.push_front(entry);
            }
            return None;
        }
        let (taken, backing_off): (Vec<Entry>, Vec<Entry>) = popped
            .into_iter()
            .partition(|entry| entry.not_before_ms <= now_ms);
        for entry in backing_off.into_iter().rev() {
            self.queue.push_front(entry);
        }
        let id = self.next_batch_id;
        self.next_batch_id += 1;
        let items = taken.iter().map(|e| e.item.clone()).collect();
        self.in_flight.push(InFlight {
            id,
            entries: taken,
            deadline_ms: now_ms.saturating_add(self.config.in_flight_deadline_ms),
        });
        Some(Batch { id, items })
    }

    /// The sidecar answered the batch with per-item results. Items without a result are
    /// retried: silence is not success.
    pub fn on_batch_results(
        &mut self,
        batch_id: u64,
        results: &[FinalizeResult],
        now_ms: u64,
    ) -> BatchReport {
        let Some(entries) = self.take_in_flight(batch_id) else {
            return BatchReport {
                stale: true,
                ..BatchReport::default()
            };
        };
        let mut pending: Vec<Option<Entry>> = entries.into_iter().map(Some).collect();
        let mut report = BatchReport::default();
        for result in results {
            let slot = pending.iter_mut().find(|slot| {
                slot.as_ref()
                    .is_some_and(|e| e.item.request_id() == result_request_id(result))
            });
            let Some(entry) = slot.and_then(Option::take) else {
                report.unmatched_results += 1;
                continue;
            };
            match result {
                FinalizeResult::Ok(_) => report.settled += 1,
                FinalizeResult::Rejected { request_id, error } => {
                    report.rejected.push((request_id.clone(), error.clone()));
                }
                FinalizeResult::Retry { .. } => {
                    self.requeue(entry, now_ms);
                    report.retried += 1;
                }
            }
        }
        for entry in pending.into_iter().flatten() {
            self.requeue(entry, now_ms);
            report.retried += 1;
        }
        report
    }

    /// The batch could not be delivered (dispatch error, timeout, non-2xx, unreadable
    /// answer): every item is retried. Returns how many.
    pub fn on_batch_failed(&mut self, batch_id: u64, now_ms: u64) -> u64 {
        let Some(entries) = self.take_in_flight(batch_id) else {
            return 0;
        };
        let count = entries.len() as u64;
        for entry in entries {
            self.requeue(entry, now_ms);
        }
        count
    }

    /// Fail every in-flight batch whose deadline passed. Returns the items retried.
    pub fn expire_in_flight(&mut self, now_ms: u64) -> u64 {
        let expired: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|f| f.deadline_ms <= now_ms)
            .map(|f| f.id)
            .collect();
        expired
            .into_iter()
            .map(|id| self.on_batch_failed(id, now_ms))
            .sum()
    }

    fn take_in_flight(&mut self, batch_id: u64) -> Option<Vec<Entry>> {
        let at = self.in_flight.iter().position(|f| f.id == batch_id)?;
        Some(self.in_flight.remove(at).entries)
    }

    fn requeue(&mut self, mut entry: Entry, now_ms: u64) {
        entry.attempts = entry.attempts.saturating_add(1);
        entry.not_before_ms = now_ms.saturating_add(self.backoff_ms(entry.attempts));
        self.queue.push_back(entry);
    }

    /// When the earliest queued item becomes due, if any is queued.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.queue.iter().map(|e| e.not_before_ms).min()
    }

    /// Delay before attempt `attempts + 1`: initial, doubling, capped at the maximum.
    pub fn backoff_ms(&self, attempts: u32) -> u64 {
        let doublings = attempts.saturating_sub(1).min(63);
        self.config
            .retry_initial_ms
            .saturating_mul(1u64 << doublings)
            .min(self.config.retry_max_ms)
    }
}

fn result_request_id(result: &FinalizeResult) -> &str {
    match result {
        FinalizeResult::Ok(response) => &response.request_id,
        FinalizeResult::Rejected { request_id, .. } | FinalizeResult::Retry { request_id, .. } => {
            request_id
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_meter_protocol::{SettleResponse, SettleStatus, VoidRequest};

    fn config() -> OutboxConfig {
        OutboxConfig {
            batch_max: 2,
            max_in_flight: 1,
            retry_initial_ms: 100,
            retry_max_ms: 1000,
            capacity: 4,
            in_flight_deadline_ms: 5000,
        }
    }

    fn item(id: &str) -> Finalize {
        Finalize::Void(VoidRequest {
            request_id: id.into(),
            reason: "test".into(),
            upstream_status: 500,
            lease_id: None,
            held: 0,
        })
    }

    fn ok(id: &str) -> FinalizeResult {
        FinalizeResult::Ok(SettleResponse {
            request_id: id.into(),
            status: SettleStatus::Voided,
            charged: 0,
            debt: 0,
            cost: None,
            currency: None,
        })
    }

    fn ids(batch: &Batch) -> Vec<&str> {
        batch.items.iter().map(Finalize::request_id).collect()
    }

    #[test]
    fn batches_respect_the_size_limit_and_order() {
        let mut outbox = Outbox::new(config());
        for id in ["a", "b", "c"] {
            assert_eq!(outbox.push(item(id), 0), PushResult::Queued);
        }
        let first = outbox.next_batch(0).unwrap();
        assert_eq!(ids(&first), ["a", "b"]);
        assert!(
            outbox.next_batch(0).is_none(),
            "one batch in flight at a time"
        );
        let report = outbox.on_batch_results(first.id, &[ok("a"), ok("b")], 1);
        assert_eq!(report.settled, 2);
        let second = outbox.next_batch(1).unwrap();
        assert_eq!(ids(&second), ["c"]);
        outbox.on_batch_results(second.id, &[ok("c")], 2);
        assert!(outbox.is_empty());
        assert!(outbox.next_batch(3).is_none());
    }

    /// A reconfigured outbox batches by its new settings, keeps everything it held, and
    /// does not shrink under the calls admitted before.
    #[test]
    fn reconfiguring_applies_new_settings_and_loses_nothing() {
        let mut outbox = Outbox::new(OutboxConfig {
            capacity: 10,
            ..config()
        });
        for id in ["a", "b", "c", "d", "e"] {
            outbox.push(item(id), 0);
        }
        outbox.reconfigure(OutboxConfig {
            batch_max: 4,
            capacity: 2,
            ..config()
        });
        assert_eq!(outbox.len(), 5, "nothing queued is dropped");
        assert!(!outbox.is_backlogged(), "the capacity stays 10");
        assert_eq!(outbox.push(item("f"), 0), PushResult::Queued);
        let batch = outbox.next_batch(0).expect("due");
        assert_eq!(ids(&batch), ["a", "b", "c", "d"], "the new batch size");
        outbox.reconfigure(OutboxConfig {
            capacity: 20,
            ..config()
        });
        for n in 0..14 {
            assert_eq!(outbox.push(item(&format!("g{n}")), 0), PushResult::Queued);
        }
        assert_eq!(
            outbox.push(item("full"), 0),
            PushResult::Dropped,
            "grown to 20"
        );
    }

    /// Between ticks only whole batches leave; the tick takes what is left.
    #[test]
    fn full_batches_only_until_the_tick() {
        let mut outbox = Outbox::new(OutboxConfig {
            max_in_flight: 2,
            capacity: 10,
            ..config()
        });
        outbox.push(item("a"), 0);
        assert!(outbox.next_full_batch(0).is_none(), "one item is no batch");
        outbox.push(item("b"), 0);
        outbox.push(item("c"), 0);
        let full = outbox.next_full_batch(0).expect("two queued make a batch");
        assert_eq!(ids(&full), ["a", "b"]);
        assert!(outbox.next_full_batch(0).is_none(), "c alone waits");
        assert_eq!(ids(&outbox.next_batch(0).expect("the tick")), ["c"]);
        outbox.push(item("d"), 0);
        outbox.push(item("e"), 0);
        assert!(
            outbox.next_full_batch(0).is_none(),
            "a whole batch still waits for a free slot"
        );
    }

    /// Retries still backing off do not make a batch whole: between ticks only a batch of
    /// items due now leaves, and the queue keeps its order when none does.
    #[test]
    fn retries_backing_off_do_not_count_toward_a_full_batch() {
        let mut outbox = Outbox::new(OutboxConfig {
            batch_max: 3,
            capacity: 10,
            ..config()
        });
        for id in ["a", "b"] {
            outbox.push(item(id), 0);
        }
        let failed = outbox.next_batch(0).unwrap();
        assert_eq!(
            outbox.on_batch_failed(failed.id, 0),
            2,
            "a, b back off until 100"
        );
        for id in ["c", "d"] {
            outbox.push(item(id), 10);
        }
        assert!(
            outbox.next_full_batch(10).is_none(),
            "four queued, but only c and d are due"
        );
        outbox.push(item("e"), 10);
        let full = outbox.next_full_batch(10).expect("c, d, e are due");
        assert_eq!(ids(&full), ["c", "d", "e"]);
        assert_eq!(outbox.on_batch_failed(full.id, 10), 3);
        let retry = outbox.next_batch(100).expect("a and b are due again");
        assert_eq!(ids(&retry), ["a", "b"], "the queue kept its order");
    }

    /// Two batches may be in flight; answers may come back in either order, each frees its
    /// own slot, and an expired one is retried without touching the other.
    #[test]
    fn batches_in_flight_are_answered_in_any_order() {
        let mut outbox = Outbox::new(OutboxConfig {
            max_in_flight: 2,
            capacity: 10,
            ..config()
        });
        for id in ["a", "b", "c", "d", "e", "f"] {
            outbox.push(item(id), 0);
        }
        let first = outbox.next_batch(0).unwrap();
        let second = outbox.next_batch(0).unwrap();
        assert_eq!(
            (ids(&first), ids(&second)),
            (vec!["a", "b"], vec!["c", "d"])
        );
        assert!(outbox.next_batch(0).is_none(), "two in flight at most");
        assert_eq!(outbox.len(), 6, "in flight still counts");

        let report = outbox.on_batch_results(second.id, &[ok("c"), ok("d")], 1);
        assert_eq!((report.settled, report.stale), (2, false));
        assert!(outbox.is_in_flight(first.id) && !outbox.is_in_flight(second.id));
        let third = outbox.next_batch(1).unwrap();
        assert_eq!(ids(&third), ["e", "f"]);

        // The first batch's deadline passes: it alone is retried.
        assert_eq!(outbox.expire_in_flight(5000), 2);
        assert!(!outbox.is_in_flight(first.id) && outbox.is_in_flight(third.id));
        let stale = outbox.on_batch_results(first.id, &[ok("a"), ok("b")], 5001);
        assert!(stale.stale);
        outbox.on_batch_results(third.id, &[ok("e"), ok("f")], 5001);
        let retried = outbox.next_batch(5100).unwrap();
        assert_eq!(ids(&retried), ["a", "b"]);
        outbox.on_batch_results(retried.id, &[ok("a"), ok("b")], 5101);
        assert!(outbox.is_empty());
    }

    #[test]
    fn failed_batches_back_off_exponentially_up_to_the_cap() {
        let mut outbox = Outbox::new(config());
        outbox.push(item("a"), 0);
        let mut now: u64 = 0;
        let mut delays = Vec::new();
        for _ in 0..6 {
            if now > 0 {
                assert!(outbox.next_batch(now - 1).is_none(), "not due before {now}");
            }
            let batch = outbox.next_batch(now).expect("due");
            assert_eq!(outbox.on_batch_failed(batch.id, now), 1);
            let due = outbox.next_due_ms().expect("still queued");
            delays.push(due - now);
            now = due;
        }
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn backoff_formula() {
        let outbox = Outbox::new(config());
        let got: Vec<u64> = (1..=6).map(|a| outbox.backoff_ms(a)).collect();
        assert_eq!(got, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(outbox.backoff_ms(u32::MAX), 1000);
    }

    #[test]
    fn results_are_matched_by_request_id_not_position() {
        let mut outbox = Outbox::new(config());
        outbox.push(item("a"), 0);
        outbox.push(item("b"), 0);
        let batch = outbox.next_batch(0).unwrap();
        let results = [
            FinalizeResult::Retry {
                request_id: "b".into(),
                error: "busy".into(),
            },
            FinalizeResult::Rejected {
                request_id: "a".into(),
                error: "different figures".into(),
            },
            ok("zzz"),
        ];
        let report = outbox.on_batch_results(batch.id, &results, 0);
        assert_eq!(report.settled, 0);
        assert_eq!(report.retried, 1);
        assert_eq!(
            report.rejected,
            [("a".to_string(), "different figures".to_string())]
        );
        assert_eq!(report.unmatched_results, 1);
        assert_eq!(outbox.len(), 1, "rejected item is gone, retried one kept");
        assert!(
            outbox.next_batch(50).is_none(),
            "retry waits for its backoff"
        );
        assert_eq!(ids(&outbox.next_batch(100).unwrap()), ["b"]);
    }

    #[test]
    fn items_missing_from_the_answer_are_retried() {
        let mut outbox = Outbox::new(config());
        outbox.push(item("a"), 0);
        outbox.push(item("b"), 0);
        let batch = outbox.next_batch(0).unwrap();
        let report = outbox.on_batch_results(batch.id, &[ok("a")], 0);
        assert_eq!((report.settled, report.retried), (1, 1));
        assert_eq!(ids(&outbox.next_batch(100).unwrap()), ["b"]);
    }

    #[test]
    fn full_outbox_drops_and_in_flight_items_count() {
        let mut outbox = Outbox::new(config());
        for id in ["a", "b", "c", "d"] {
            assert_eq!(outbox.push(item(id), 0), PushResult::Queued);
        }
        assert_eq!(outbox.push(item("e"), 0), PushResult::Dropped);
        let batch = outbox.next_batch(0).unwrap();
        assert_eq!(outbox.len(), 4);
        assert_eq!(outbox.push(item("e"), 0), PushResult::Dropped);
        outbox.on_batch_results(batch.id, &[ok("a"), ok("b")], 0);
        assert_eq!(outbox.push(item("e"), 0), PushResult::Queued);
    }

    #[test]
    fn stale_and_unknown_batch_answers_are_ignored() {
        let mut outbox = Outbox::new(config());
        outbox.push(item("a"), 0);
        let batch = outbox.next_batch(0).unwrap();
        assert!(outbox.on_batch_results(batch.id + 1, &[ok("a")], 0).stale);
        assert_eq!(outbox.on_batch_failed(batch.id + 1, 0), 0);
        assert!(outbox.has_in_flight());
        outbox.on_batch_results(batch.id, &[ok("a")], 0);
        assert!(outbox.on_batch_results(batch.id, &[ok("a")], 0).stale);
        assert!(outbox.is_empty());
    }

    #[test]
    fn lost_callbacks_expire_the_batch() {
        let mut outbox = Outbox::new(config());
        outbox.push(item("a"), 0);
        let batch = outbox.next_batch(0).unwrap();
        assert_eq!(outbox.expire_in_flight(4999), 0);
        assert_eq!(outbox.expire_in_flight(5000), 1);
        assert!(!outbox.has_in_flight());
        // A late answer to the expired batch changes nothing.
        assert!(outbox.on_batch_results(batch.id, &[ok("a")], 5001).stale);
        assert_eq!(outbox.len(), 1);
        assert_eq!(ids(&outbox.next_batch(5100).unwrap()), ["a"]);
    }

    #[test]
    fn not_yet_due_items_do_not_block_due_ones() {
        let mut outbox = Outbox::new(config());
        outbox.push(item("a"), 0);
        let batch = outbox.next_batch(0).unwrap();
        outbox.on_batch_failed(batch.id, 0); // "a" due at 100
        outbox.push(item("b"), 10);
        assert_eq!(ids(&outbox.next_batch(10).unwrap()), ["b"]);
    }

    #[test]
    fn backing_off_items_keep_their_place_and_order() {
        let mut outbox = Outbox::new(OutboxConfig {
            capacity: 10,
            ..config()
        });
        outbox.push(item("a"), 0);
        outbox.push(item("b"), 0);
        let failed = outbox.next_batch(0).unwrap();
        outbox.on_batch_failed(failed.id, 0); // "a" and "b" due at 100, in front
        for id in ["c", "d", "e"] {
            outbox.push(item(id), 10);
        }
        let mut sent = Vec::new();
        for now in [10, 10, 100] {
            let batch = outbox.next_batch(now).unwrap();
            let names: Vec<String> = ids(&batch).iter().map(|s| s.to_string()).collect();
            let results: Vec<FinalizeResult> = names.iter().map(|id| ok(id)).collect();
            outbox.on_batch_results(batch.id, &results, now);
            sent.push(names.join(","));
        }
        assert_eq!(sent, ["c,d", "e", "a,b"]);
        assert!(outbox.is_empty());
    }

    #[test]
    fn backlog_is_signalled_before_anything_would_be_dropped() {
        let mut outbox = Outbox::new(OutboxConfig {
            capacity: 10,
            ..config()
        });
        for i in 0..8 {
            assert!(!outbox.is_backlogged(), "at {i}");
            assert_eq!(outbox.push(item(&format!("r{i}")), 0), PushResult::Queued);
        }
        assert!(!outbox.is_backlogged());
        assert_eq!(outbox.push(item("r8"), 0), PushResult::Queued);
        assert!(outbox.is_backlogged(), "nine of ten: refuse new calls");
        // The calls already admitted can still settle.
        assert_eq!(outbox.push(item("r9"), 0), PushResult::Queued);
    }
}
