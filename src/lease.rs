//! Quota leases: admission without a round trip to the sidecar.
//!
//! A lease is a hold in the ledger, granted with an authorization, that is bigger than the
//! authorizing call needs. While it lasts, the filter admits the same caller's next calls
//! of the same model by setting aside each call's hold from the lease, exactly as the
//! sidecar would size it. Every call is still settled on its own (its own usage record,
//! exact tokens and cost); when the lease is no longer used, what is left is released.
//!
//! Why this cannot overdraw: the units in a lease are held in the ledger, so no other
//! caller, worker or sidecar can spend them, and a call is admitted locally only when its
//! whole hold fits in what the lease has left. What a call uses beyond its hold is charged
//! exactly as a per-call hold's overrun is.
//!
//! The price: admission decisions can be stale by up to the lease's time to live (a revoked
//! API key or a disabled model keeps being admitted until then), and a lease keeps units
//! out of other workers' reach until it is released (when idle, expired, or too small).
//!
//! Pure logic driven by timestamps: the host keeps one `LeaseBook` per VM (per Envoy worker).

use llm_meter_protocol::{is_storable_key, Caller, HoldMeasure, Lease, Usage, LEASE_ID_PREFIX};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Units asked for per lease (the sidecar may grant less); 0 turns leases off.
    pub units: u64,
    /// How long a lease admits calls.
    pub ttl_ms: u64,
    /// A lease unused for this long is released (its units go back to the balance).
    pub idle_ms: u64,
    /// Most leases kept at once; beyond it calls are authorized one by one.
    pub max_leases: usize,
}

impl LeaseConfig {
    pub fn enabled(&self) -> bool {
        self.units > 0
    }
}

/// A call admitted under a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub lease_id: String,
    /// Units set aside for the call from the lease.
    pub held: u64,
    /// The ledger user the lease belongs to.
    pub user_id: String,
}

/// What a request needs to be sized by a lease's hold rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallSize {
    pub estimated_input_tokens: u64,
    pub max_output_tokens: Option<u64>,
    pub requested_images: Option<u64>,
}

#[derive(Debug)]
struct LocalLease {
    key: (Caller, String),
    user_id: String,
    /// Units neither set aside for calls in flight nor consumed.
    free: u64,
    in_flight: u32,
    /// No call is admitted at or after this instant.
    admit_until_ms: u64,
    last_used_ms: u64,
    measure: HoldMeasure,
    default_max_output_tokens: u64,
    /// Too small for a call that wanted it: admits nothing more, released once drained.
    retired: bool,
}

impl LocalLease {
    fn admits(&self, now_ms: u64) -> bool {
        !self.retired && now_ms < self.admit_until_ms
    }

    fn hold_for(&self, size: &CallSize) -> u64 {
        self.measure.hold_units(
            size.estimated_input_tokens,
            size.max_output_tokens,
            size.requested_images,
            self.default_max_output_tokens,
        )
    }

    /// Whether nothing more will happen under the lease unless it is released now.
    fn is_spent(&self, now_ms: u64, idle_ms: u64) -> bool {
        self.in_flight == 0
            && (!self.admits(now_ms)
                || self.free == 0
                || now_ms.saturating_sub(self.last_used_ms) >= idle_ms)
    }
}

/// The leases of one VM, by caller and model.
#[derive(Debug)]
pub struct LeaseBook {
    config: LeaseConfig,
    leases: HashMap<String, LocalLease>,
    /// Lease ids per caller and model (usually one; a few while calls race for a lease).
    by_key: HashMap<(Caller, String), Vec<String>>,
    /// Lease asks awaiting the sidecar's answer, by caller and model, with the instant
    /// their callout times out. One ask per key at a time: every grant takes a share of
    /// what is still available, so a burst of concurrent asks would hand the whole
    /// balance out in leases and deny the burst's later calls.
    asking: HashMap<(Caller, String), u64>,
}

impl LeaseBook {
    pub fn new(config: LeaseConfig) -> LeaseBook {
        LeaseBook {
            config,
            leases: HashMap::new(),
            by_key: HashMap::new(),
            asking: HashMap::new(),
        }
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Whether an authorization should ask for a lease.
    pub fn wants_lease(&self) -> bool {
        self.config.enabled() && self.leases.len() < self.config.max_leases
    }

    /// Whether the authorization of a call of `caller` and `model` should ask for a lease;
    /// when it should, the ask is recorded until [`LeaseBook::end_ask`] or `timeout_ms`
    /// (the callout's timeout, after which no answer can arrive), and other calls of the
    /// same key are authorized on their own meanwhile.
    pub fn begin_ask(
        &mut self,
        caller: &Caller,
        model: &str,
        now_ms: u64,
        timeout_ms: u64,
    ) -> bool {
        if !self.wants_lease() {
            return false;
        }
        if self.asking.len() >= self.config.max_leases {
            self.asking.retain(|_, deadline| *deadline > now_ms);
            if self.asking.len() >= self.config.max_leases {
                return false;
            }
        }
        let key = (caller.clone(), model.to_string());
        if self
            .asking
            .get(&key)
            .is_some_and(|deadline| *deadline > now_ms)
        {
            return false;
        }
        self.asking.insert(key, now_ms.saturating_add(timeout_ms));
        true
    }

    /// The answer to a lease ask arrived (granted or not), or its call went away.
    pub fn end_ask(&mut self, caller: &Caller, model: &str) {
        self.asking.remove(&(caller.clone(), model.to_string()));
    }

    /// Admit a call from a lease of its caller and model, if one has room for its hold.
    /// A lease that is too small for the call is retired, so the next authorization asks
    /// for a fresh one rather than keep a remainder nobody can use.
    pub fn admit(
        &mut self,
        caller: &Caller,
        model: &str,
        size: &CallSize,
        now_ms: u64,
    ) -> Option<Ticket> {
        let key = (caller.clone(), model.to_string());
        let ids = self.by_key.get(&key)?;
        let mut chosen = None;
        for id in ids {
            let Some(lease) = self.leases.get_mut(id) else {
                continue;
            };
            if !lease.admits(now_ms) {
                continue;
            }
            let held = lease.hold_for(size);
            if held <= lease.free {
                chosen = Some((id.clone(), held));
                break;
            }
            lease.retired = true;
        }
        let (lease_id, held) = chosen?;
        let lease = self.leases.get_mut(&lease_id)?;
        lease.free -= held;
        lease.in_flight += 1;
        lease.last_used_ms = now_ms;
        Some(Ticket {
            lease_id,
            held,
            user_id: lease.user_id.clone(),
        })
    }

    /// Record a lease the sidecar granted with the authorization of a call that holds
    /// `held` of it; returns that call's ticket.
    pub fn granted(
        &mut self,
        caller: &Caller,
        model: &str,
        user_id: &str,
        lease: &Lease,
        held: u64,
        now_ms: u64,
    ) -> Ticket {
        let admit_until_ms = lease
            .expires_at_ms
            .min(now_ms.saturating_add(self.config.ttl_ms));
        let key = (caller.clone(), model.to_string());
        let local = LocalLease {
            key: key.clone(),
            user_id: user_id.to_string(),
            free: lease.units.saturating_sub(held),
            in_flight: 1,
            admit_until_ms,
            last_used_ms: now_ms,
            measure: lease.measure,
            default_max_output_tokens: lease.default_max_output_tokens,
            retired: false,
        };
        // A replayed grant (same lease id) must not count its call twice.
        if self.leases.insert(lease.lease_id.clone(), local).is_none() {
            self.by_key
                .entry(key)
                .or_default()
                .push(lease.lease_id.clone());
        }
        Ticket {
            lease_id: lease.lease_id.clone(),
            held,
            user_id: user_id.to_string(),
        }
    }

    /// A call admitted under `ticket` ended, having used `usage` (`None` when voided).
    /// What it did not use goes back to the lease; what it used beyond its hold is taken
    /// from the lease's free units as far as they go (the ledger does the same).
    /// True when the lease is spent by this (expired, retired or empty with nothing in
    /// flight): it left the book and the caller releases it.
    pub fn finish(&mut self, ticket: &Ticket, usage: Option<&Usage>, now_ms: u64) -> bool {
        let Some(lease) = self.leases.get_mut(&ticket.lease_id) else {
            return false;
        };
        let used = usage.map_or(0, |u| units_used(lease.measure, u));
        if used <= ticket.held {
            lease.free = lease.free.saturating_add(ticket.held - used);
        } else {
            lease.free = lease.free.saturating_sub(used - ticket.held);
        }
        lease.in_flight = lease.in_flight.saturating_sub(1);
        lease.last_used_ms = now_ms;
        let spent = lease.is_spent(now_ms, self.config.idle_ms);
        if spent {
            self.forget(&ticket.lease_id);
        }
        spent
    }

    /// New settings (the plugin was reconfigured); leases already granted are kept.
    pub fn reconfigure(&mut self, config: LeaseConfig) {
        self.config = config;
    }

    /// Leases to release now: drained and expired, retired, empty or idle. They leave the
    /// book; the caller sends a release for each.
    pub fn take_spent(&mut self, now_ms: u64) -> Vec<String> {
        let idle_ms = self.config.idle_ms;
        let spent: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.is_spent(now_ms, idle_ms))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &spent {
            self.forget(id);
        }
        spent
    }

    /// Stop admitting under every lease (the plugin is shutting down); returns the leases
    /// with no call in flight, to release now. The others are released as they drain.
    pub fn retire_all(&mut self, now_ms: u64) -> Vec<String> {
        for lease in self.leases.values_mut() {
            lease.retired = true;
        }
        self.take_spent(now_ms)
    }

    fn forget(&mut self, lease_id: &str) {
        let Some(lease) = self.leases.remove(lease_id) else {
            return;
        };
        if let Some(ids) = self.by_key.get_mut(&lease.key) {
            ids.retain(|id| id != lease_id);
            if ids.is_empty() {
                self.by_key.remove(&lease.key);
            }
        }
    }
}

/// Whether a call may be admitted under a lease at all: the sidecar would refuse its
/// settlement (and the call would go unbilled) if its keys cannot be stored, so such a call
/// is sent to the sidecar, which answers it with a clear denial instead. The request id is
/// checked before, for every metered call ([`usable_request_id`]).
pub fn keys_settleable(caller: &Caller, model: &str) -> bool {
    let caller_ok = match caller {
        Caller::UserId(user) => is_storable_key(user),
        Caller::ApiKey(_) => true,
    };
    caller_ok && is_storable_key(model)
}

/// Whether the ledger can key a call's settlement by `request_id`.
pub fn usable_request_id(request_id: &str) -> bool {
    is_storable_key(request_id) && !request_id.starts_with(LEASE_ID_PREFIX)
}

/// Units a call used, by the lease's hold rule (what the ledger will charge in units).
pub fn units_used(measure: HoldMeasure, usage: &Usage) -> u64 {
    match measure {
        HoldMeasure::TotalTokens => usage.total_tokens(),
        HoldMeasure::InputTokens => usage.input_tokens,
        HoldMeasure::OutputTokens => usage.output_tokens,
        HoldMeasure::Images => usage.images,
        HoldMeasure::Requests => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_meter_protocol::MAX_KEY_CHARS;

    const NOW: u64 = 1_000_000;

    fn config() -> LeaseConfig {
        LeaseConfig {
            units: 10_000,
            ttl_ms: 30_000,
            idle_ms: 2_000,
            max_leases: 3,
        }
    }

    fn alice() -> Caller {
        Caller::UserId("alice".into())
    }

    fn lease(id: &str, units: u64) -> Lease {
        Lease {
            lease_id: id.into(),
            units,
            expires_at_ms: NOW + 60_000,
            measure: HoldMeasure::TotalTokens,
            default_max_output_tokens: 500,
        }
    }

    fn size(input: u64, max_output: Option<u64>) -> CallSize {
        CallSize {
            estimated_input_tokens: input,
            max_output_tokens: max_output,
            requested_images: None,
        }
    }

    fn usage(input: u64, output: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            ..Usage::default()
        }
    }

    #[test]
    fn calls_are_admitted_while_their_holds_fit_and_never_beyond() {
        let mut book = LeaseBook::new(config());
        let first = book.granted(&alice(), "m", "u-alice", &lease("L1", 1_000), 300, NOW);
        assert_eq!(first.held, 300);
        // 700 free: two calls of 300 fit, the third does not.
        let a = book
            .admit(&alice(), "m", &size(100, Some(200)), NOW)
            .unwrap();
        let b = book
            .admit(&alice(), "m", &size(100, Some(200)), NOW)
            .unwrap();
        assert_eq!((a.held, b.held, a.user_id.as_str()), (300, 300, "u-alice"));
        assert_eq!(book.admit(&alice(), "m", &size(100, Some(200)), NOW), None);
        // The lease that could not fit a call is retired: nothing more is admitted from it.
        assert_eq!(book.admit(&alice(), "m", &size(1, Some(1)), NOW), None);
    }

    #[test]
    fn the_sidecars_default_output_cap_sizes_calls_without_one() {
        let mut book = LeaseBook::new(config());
        book.granted(&alice(), "m", "u", &lease("L1", 2_000), 600, NOW);
        let ticket = book.admit(&alice(), "m", &size(100, None), NOW).unwrap();
        assert_eq!(ticket.held, 600);
    }

    #[test]
    fn leases_are_per_caller_and_model() {
        let mut book = LeaseBook::new(config());
        book.granted(&alice(), "m", "u", &lease("L1", 2_000), 10, NOW);
        let bob = Caller::UserId("bob".into());
        assert_eq!(book.admit(&bob, "m", &size(1, Some(1)), NOW), None);
        assert_eq!(book.admit(&alice(), "other", &size(1, Some(1)), NOW), None);
        let key = Caller::ApiKey("alice".into());
        assert_eq!(book.admit(&key, "m", &size(1, Some(1)), NOW), None);
    }

    #[test]
    fn unused_units_return_and_overruns_are_taken_from_the_lease() {
        let mut book = LeaseBook::new(config());
        let first = book.granted(&alice(), "m", "u", &lease("L1", 1_000), 300, NOW);
        // Used 100 of 300: 900 free again.
        assert!(!book.finish(&first, Some(&usage(40, 60)), NOW));
        let big = book.admit(&alice(), "m", &size(0, Some(900)), NOW).unwrap();
        assert_eq!(big.held, 900);
        // Used 950 of its 900: nothing is free, and the 50 beyond are the ledger's overrun;
        // the empty lease is released at once.
        assert!(book.finish(&big, Some(&usage(50, 900)), NOW));
        assert_eq!(book.admit(&alice(), "m", &size(0, Some(1)), NOW), None);
    }

    #[test]
    fn a_voided_call_gives_its_whole_hold_back() {
        let mut book = LeaseBook::new(config());
        let first = book.granted(&alice(), "m", "u", &lease("L1", 500), 500, NOW);
        assert_eq!(book.admit(&alice(), "m", &size(0, Some(1)), NOW), None);
        let mut book = LeaseBook::new(config());
        let first_again = book.granted(&alice(), "m", "u", &lease("L1", 500), 500, NOW);
        assert_eq!(first, first_again);
        assert!(!book.finish(&first_again, None, NOW));
        assert!(book
            .admit(&alice(), "m", &size(0, Some(500)), NOW)
            .is_some());
    }

    #[test]
    fn nothing_is_admitted_after_the_ttl_or_the_sidecars_expiry() {
        let mut book = LeaseBook::new(config());
        book.granted(&alice(), "m", "u", &lease("L1", 5_000), 1, NOW);
        assert!(book
            .admit(&alice(), "m", &size(1, Some(1)), NOW + 29_999)
            .is_some());
        assert_eq!(
            book.admit(&alice(), "m", &size(1, Some(1)), NOW + 30_000),
            None
        );
        let mut short = lease("L2", 5_000);
        short.expires_at_ms = NOW + 10;
        book.granted(&alice(), "m2", "u", &short, 1, NOW);
        assert_eq!(
            book.admit(&alice(), "m2", &size(1, Some(1)), NOW + 10),
            None
        );
    }

    #[test]
    fn a_lease_is_released_only_once_no_call_is_in_flight() {
        let mut book = LeaseBook::new(config());
        let first = book.granted(&alice(), "m", "u", &lease("L1", 5_000), 10, NOW);
        let later = NOW + 60_000;
        assert!(
            book.take_spent(later).is_empty(),
            "a call is still in flight"
        );
        assert!(
            book.finish(&first, Some(&usage(5, 5)), later),
            "expired and drained"
        );
        assert!(book.is_empty());
        assert!(book.take_spent(later).is_empty(), "released once");
    }

    #[test]
    fn idle_retired_and_empty_leases_are_released() {
        let mut book = LeaseBook::new(config());
        let a = book.granted(&alice(), "idle", "u", &lease("idle", 5_000), 10, NOW);
        assert!(!book.finish(&a, Some(&usage(5, 5)), NOW), "still useful");
        assert!(book.take_spent(NOW + 1_999).is_empty());
        assert_eq!(book.take_spent(NOW + 2_000), vec!["idle".to_string()]);

        let b = book.granted(&alice(), "empty", "u", &lease("empty", 100), 100, NOW);
        assert!(book.finish(&b, Some(&usage(50, 50)), NOW), "nothing left");

        let c = book.granted(&alice(), "small", "u", &lease("small", 100), 10, NOW);
        assert_eq!(
            book.admit(&alice(), "small", &size(0, Some(500)), NOW),
            None
        );
        assert!(
            book.take_spent(NOW).is_empty(),
            "retired but one call in flight"
        );
        assert!(
            book.finish(&c, Some(&usage(5, 5)), NOW),
            "retired and drained"
        );
    }

    #[test]
    fn a_second_lease_for_the_same_key_is_used_when_the_first_is_full() {
        let mut book = LeaseBook::new(config());
        book.granted(&alice(), "m", "u", &lease("L1", 100), 100, NOW);
        book.granted(&alice(), "m", "u", &lease("L2", 1_000), 100, NOW);
        let ticket = book.admit(&alice(), "m", &size(0, Some(100)), NOW).unwrap();
        assert_eq!(ticket.lease_id, "L2");
    }

    #[test]
    fn the_book_stops_asking_for_leases_when_full_or_disabled() {
        let mut book = LeaseBook::new(config());
        for i in 0..3 {
            assert!(book.wants_lease());
            book.granted(
                &alice(),
                &format!("m{i}"),
                "u",
                &lease(&format!("L{i}"), 9),
                1,
                NOW,
            );
        }
        assert!(!book.wants_lease());
        let off = LeaseBook::new(LeaseConfig {
            units: 0,
            ..config()
        });
        assert!(!off.wants_lease());
    }

    #[test]
    fn one_lease_ask_per_caller_and_model_is_on_its_way_at_a_time() {
        let mut book = LeaseBook::new(config());
        let bob = Caller::UserId("bob".into());
        assert!(book.begin_ask(&alice(), "m", NOW, 500));
        assert!(
            !book.begin_ask(&alice(), "m", NOW + 10, 500),
            "second ask waits"
        );
        assert!(
            book.begin_ask(&alice(), "other", NOW, 500),
            "another model asks"
        );
        assert!(book.begin_ask(&bob, "m", NOW, 500), "another caller asks");
        book.end_ask(&alice(), "m");
        assert!(
            book.begin_ask(&alice(), "m", NOW + 20, 500),
            "answered: ask again"
        );
        // An ask whose answer never came stops counting when its callout times out.
        assert!(!book.begin_ask(&alice(), "m", NOW + 519, 500));
        assert!(book.begin_ask(&alice(), "m", NOW + 520, 500));
    }

    #[test]
    fn asks_on_their_way_are_bounded_like_leases() {
        let mut book = LeaseBook::new(config());
        for i in 0..3 {
            assert!(book.begin_ask(&alice(), &format!("m{i}"), NOW, 500));
        }
        assert!(!book.begin_ask(&alice(), "m3", NOW, 500), "full of asks");
        assert!(
            book.begin_ask(&alice(), "m3", NOW + 500, 500),
            "expired asks pruned"
        );
        let mut off = LeaseBook::new(LeaseConfig {
            units: 0,
            ..config()
        });
        assert!(!off.begin_ask(&alice(), "m", NOW, 500));
    }

    #[test]
    fn retiring_all_releases_the_drained_now_and_the_rest_as_they_drain() {
        let mut book = LeaseBook::new(config());
        let busy = book.granted(&alice(), "busy", "u", &lease("busy", 900), 10, NOW);
        let done = book.granted(&alice(), "done", "u", &lease("done", 900), 10, NOW);
        assert!(!book.finish(&done, Some(&usage(1, 1)), NOW));
        assert_eq!(book.retire_all(NOW), vec!["done".to_string()]);
        assert_eq!(book.admit(&alice(), "busy", &size(1, Some(1)), NOW), None);
        assert!(book.finish(&busy, None, NOW));
        assert!(book.is_empty());
    }

    #[test]
    fn calls_whose_settlement_the_ledger_would_refuse_are_never_leased() {
        let long = "r".repeat(MAX_KEY_CHARS + 1);
        assert!(keys_settleable(&alice(), "m"));
        assert!(!keys_settleable(&alice(), &long));
        assert!(!keys_settleable(&Caller::UserId(long.clone()), "m"));
        assert!(keys_settleable(&Caller::ApiKey(long.clone()), "m"));
        assert!(usable_request_id("r-1"));
        assert!(usable_request_id(&"r".repeat(MAX_KEY_CHARS)));
        assert!(!usable_request_id(&long));
        assert!(!usable_request_id(""));
        assert!(!usable_request_id("lease:r-1"));
    }

    #[test]
    fn units_used_follow_the_measure() {
        let u = Usage {
            input_tokens: 3,
            output_tokens: 4,
            images: 2,
            ..Usage::default()
        };
        assert_eq!(units_used(HoldMeasure::TotalTokens, &u), 7);
        assert_eq!(units_used(HoldMeasure::InputTokens, &u), 3);
        assert_eq!(units_used(HoldMeasure::OutputTokens, &u), 4);
        assert_eq!(units_used(HoldMeasure::Images, &u), 2);
        assert_eq!(units_used(HoldMeasure::Requests, &u), 1);
    }
}
