//! The quota ledger: lots (grants), holds (reservations), settlements, debt, expiry,
//! monthly reset and reconciliation.
//!
//! Model (after TigerBeetle's two-phase transfers and Stripe/OpenMeter credit grants):
//! - A **lot** is one grant of `amount` units of a quota type to a user, from a source
//!   (membership, purchase, admin_grant, ...) identified by (source_type, source_id), which
//!   is the idempotency key: a payment callback delivered twice grants once. Consumption
//!   burns active lots by `priority` (lower first), then soonest expiry (never-expiring
//!   last), then oldest. Expired remainders stop counting and are journaled as `expire`.
//! - An **account** row per (user, quota type) carries `balance` (sum of active lots'
//!   remaining), `held` (open reservations) and `debt`. Available = balance - held.
//! - **authorize** inserts a hold keyed by request id and reserves with one guarded update
//!   (`held = held + h WHERE balance - held >= h`), so admission never exceeds the balance,
//!   whatever the number of concurrent requests or sidecar processes sharing the database.
//!   If the available balance is positive but smaller than the hold, the call is denied
//!   (`quota_exhausted`): the hold is the most the call may consume, and admitting it
//!   would let it run into debt by design.
//! - **settle** releases the hold and charges the actual units. When the actual exceeds
//!   what is available (the tokens were already consumed upstream), it charges what is
//!   available and records the rest as **debt** on the account. Later grants pay debt
//!   first (the lot is reduced by the repaid units, journaled as `repay`). A settlement
//!   without a hold (fail-open, or arriving after its hold expired) charges directly.
//! - **void** releases a hold without charge; holds never settled expire after the
//!   configured TTL (`expire_holds`).
//! - A **lease** (authorize with a lease ask) is one hold for one caller and model, sized
//!   `max(h, min(asked, available / 4))`, from which the filter admits that caller's next
//!   calls by itself until `admit_until`. Each call is settled on its own against the
//!   lease (its units leave the lease's amount and the account's `held` together; beyond
//!   the lease's amount the usual overrun rule applies); the filter releases what is left,
//!   and the sweep releases a lease forgotten past `admit_until` + the hold TTL. Money
//!   quotas (`cost_micros`) are never leased. See `lease.rs`.
//! - Every change appends to `ledger_journal` (grant, activate, reserve, release, settle,
//!   debt, repay, void, expire, reset, adjust), so balances can be rebuilt;
//!   [`Ledger::reconcile`] proves it.
//! - Lot events (expiry, a pending lot becoming effective) apply lazily: the account keeps
//!   `next_event_at`, admission's guarded update only succeeds while it is in the future,
//!   and the first write after it applies the due events. `expire_lots` does it in bulk.
//! - Idempotency: authorize / settle / void by request id (a retry returns the first result;
//!   a retry with other figures is [`LedgerError::Conflict`]), a lease's release by its id
//!   (calls under a lease by their usage record); grants by source; monthly
//!   reset by (membership, period). A denied authorization leaves nothing behind, so its
//!   retry is evaluated afresh.

mod accounts;
mod authorize;
mod balance;
mod grant;
mod group;
mod keys;
mod lease;
#[cfg(test)]
mod lease_tests;
mod prefetch;
mod reconcile;
mod reserve_ahead;
mod reset;
mod settle;
mod settle_fast;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::TimeZone;
use chrono_tz::Tz;

use crate::pricing::{PriceBook, PricingError};
use crate::storage::{is_transient, is_unique_violation, now_ms, Db};

pub use authorize::MAX_UNITS_PER_CALL;
pub use balance::{Balance, LotDetail};
pub use grant::{
    AdjustRequest, AdjustResponse, ExpireLotsReport, GrantRequest, GrantResponse, LotStatus,
};
pub use keys::hash_api_key;
pub use lease::{lease_id_for, LEASE_PREFIX};
pub use reconcile::{Drift, ReconcileReport};
pub use reset::{period_bounds, MonthlyResetReport, ResetOutcome};
pub use settle::{ConsumeRequest, ConsumeResponse, ExpireHoldsReport};

/// What to do with a call to a model that has no price in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnpricedPolicy {
    /// Allow it, meter its units, record it as unpriced (no cost) and log a warning.
    Allow,
    /// Deny it with `model_unpriced`.
    Deny,
}

#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// A hold not settled or voided within this time is released by `expire_holds`.
    pub hold_ttl: Duration,
    /// Output cap assumed for a text call whose request names none.
    pub default_max_output_tokens: u64,
    pub unpriced_policy: UnpricedPolicy,
    /// Time zone of usage days and monthly periods.
    pub timezone: Tz,
    /// How long catalog rows (models, prices, quota types) are cached in this process.
    pub catalog_cache_ttl: Duration,
    /// Longest admission window of a lease (the filter's ask is capped to it).
    pub max_lease_ttl: Duration,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            hold_ttl: Duration::from_secs(15 * 60),
            default_max_output_tokens: 4096,
            unpriced_policy: UnpricedPolicy::Allow,
            timezone: chrono_tz::Asia::Shanghai,
            catalog_cache_ttl: Duration::from_secs(5),
            max_lease_ttl: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// A retry with figures different from the first request, or an operation that
    /// contradicts the request's state (e.g. settling a voided call). Permanent.
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// Bad input (counts out of range, empty ids, unknown quota type ...). Permanent.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The stored ledger contradicts itself (e.g. lots do not cover the balance); the
    /// transaction was rolled back. Run `reconcile`.
    #[error("ledger inconsistency: {0}")]
    Inconsistent(String),
    /// Contention that survived the retries; the caller may retry later.
    #[error("busy: {0}")]
    Busy(String),
    #[error(transparent)]
    Pricing(PricingError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

impl LedgerError {
    /// True when retrying the same call later may succeed (database or contention trouble).
    pub fn is_transient(&self) -> bool {
        match self {
            LedgerError::Busy(_) => true,
            LedgerError::Db(e) => {
                is_transient(e)
                    || matches!(
                        e,
                        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed
                    )
            }
            _ => false,
        }
    }
}

impl From<PricingError> for LedgerError {
    fn from(e: PricingError) -> Self {
        match e {
            PricingError::Sql(e) => LedgerError::Db(e),
            other => LedgerError::Pricing(other),
        }
    }
}

/// Source of "now" in Unix milliseconds (replaceable in tests).
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Counters of the group-commit writers (see [`group`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupCommits {
    pub groups: u64,
    pub operations: u64,
    /// Time the writers spent applying groups, summed over writers, in microseconds.
    pub busy_micros: u64,
    /// Settlements made in one statement (PostgreSQL's common case, `settle_fast.rs`).
    pub one_statement_settlements: u64,
}

impl GroupCommits {
    /// Operations per group between `earlier` and `self`; 0 when no group ran.
    pub fn mean_size_since(&self, earlier: GroupCommits) -> f64 {
        let groups = self.groups.saturating_sub(earlier.groups);
        let operations = self.operations.saturating_sub(earlier.operations);
        if groups == 0 {
            0.0
        } else {
            operations as f64 / groups as f64
        }
    }

    /// How many writers were applying a group, on average, over the `elapsed` time
    /// between `earlier` and `self`: at the writer count, the writers are the bound
    /// (whatever their transactions wait for); below it, callers do not keep them busy.
    pub fn writers_busy_since(&self, earlier: GroupCommits, elapsed: std::time::Duration) -> f64 {
        let busy = self.busy_micros.saturating_sub(earlier.busy_micros);
        let elapsed = elapsed.as_micros();
        if elapsed == 0 {
            0.0
        } else {
            busy as f64 / elapsed as f64
        }
    }
}

/// The ledger. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    config: LedgerConfig,
    prices: PriceBook,
    clock: Clock,
    /// Started on first use (it needs the async runtime).
    writers: OnceLock<group::GroupCommit>,
    /// Settlement batches are applied one at a time in a process (see `Ledger::finalize`).
    finalize_turn: tokio::sync::Mutex<()>,
    /// Attempts that failed with a transient error (deadlock, busy, lost connection) and
    /// were tried again.
    retries: std::sync::atomic::AtomicU64,
    /// Group transactions started and the operations they held (their ratio is the
    /// group size, which is what group commit buys).
    groups: std::sync::atomic::AtomicU64,
    grouped_operations: std::sync::atomic::AtomicU64,
    group_busy_micros: std::sync::atomic::AtomicU64,
    /// PostgreSQL settles its common case in one statement (`settle_fast.rs`); tests turn
    /// it off to compare with the general path.
    one_statement_settle: std::sync::atomic::AtomicBool,
    one_statement_settlements: std::sync::atomic::AtomicU64,
}

/// The daily-cost columns a settlement adds to (and the cost report sums).
pub const DAILY_COST_SUMS: [&str; 10] = [
    "requests",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "images",
    "units",
    "cost_micros",
    "unpriced_requests",
];

const MAX_ATTEMPTS: u32 = 8;

impl Ledger {
    pub fn new(db: Db, config: LedgerConfig) -> Ledger {
        Ledger::with_clock(db, config, Arc::new(now_ms))
    }

    pub fn with_clock(db: Db, config: LedgerConfig, clock: Clock) -> Ledger {
        let prices = PriceBook::new(db.clone(), config.catalog_cache_ttl);
        Ledger {
            inner: Arc::new(Inner {
                db,
                config,
                prices,
                clock,
                writers: OnceLock::new(),
                finalize_turn: tokio::sync::Mutex::new(()),
                retries: std::sync::atomic::AtomicU64::new(0),
                groups: std::sync::atomic::AtomicU64::new(0),
                grouped_operations: std::sync::atomic::AtomicU64::new(0),
                group_busy_micros: std::sync::atomic::AtomicU64::new(0),
                one_statement_settle: std::sync::atomic::AtomicBool::new(true),
                one_statement_settlements: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    pub fn config(&self) -> &LedgerConfig {
        &self.inner.config
    }

    /// The catalog cache; call `prices().invalidate()` after changing models or prices.
    pub fn prices(&self) -> &PriceBook {
        &self.inner.prices
    }

    /// See [`Inner::one_statement_settle`].
    fn settles_in_one_statement(&self) -> bool {
        self.inner
            .one_statement_settle
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count_one_statement_settlements(&self, settled: u64) {
        self.inner
            .one_statement_settlements
            .fetch_add(settled, std::sync::atomic::Ordering::Relaxed);
    }

    /// Settles every call by the general path (tests compare the two).
    #[cfg(test)]
    fn settle_by_the_general_path(&self) {
        self.inner
            .one_statement_settle
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn now(&self) -> i64 {
        (self.inner.clock)()
    }

    /// `YYYY-MM-DD` of `ms` in the configured time zone.
    pub fn day_of(&self, ms: i64) -> String {
        match self.config().timezone.timestamp_millis_opt(ms).earliest() {
            Some(t) => t.format("%Y-%m-%d").to_string(),
            None => "1970-01-01".to_string(),
        }
    }

    /// Applies `ops` through this process's group-commit writers (see [`group`]).
    async fn submit(&self, ops: Vec<group::Op>) -> Vec<Result<group::Done, LedgerError>> {
        let writers = self.inner.writers.get_or_init(|| {
            let db = self.db();
            let max_connections = db.pool().options().get_max_connections();
            group::GroupCommit::start(Arc::downgrade(&self.inner), db.dialect(), max_connections)
        });
        writers.submit(ops).await
    }

    /// Applies one operation through the group-commit writers.
    async fn submit_one(&self, op: group::Op) -> Result<group::Done, LedgerError> {
        let mut results = self.submit(vec![op]).await;
        results
            .pop()
            .unwrap_or_else(|| Err(LedgerError::Busy("the ledger writer gave no answer".into())))
    }

    /// Runs one transaction attempt again on deadlocks, serialization failures, busy
    /// databases and lost idempotency races, with a short growing back-off.
    /// Operations tried again after a transient error (a deadlock, a busy database, a lost
    /// connection) since this ledger started.
    pub fn transient_retries(&self) -> u64 {
        self.inner
            .retries
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Group transactions run by this process's writers and the operations they held,
    /// since this ledger started.
    pub fn group_commits(&self) -> GroupCommits {
        use std::sync::atomic::Ordering::Relaxed;
        GroupCommits {
            groups: self.inner.groups.load(Relaxed),
            operations: self.inner.grouped_operations.load(Relaxed),
            busy_micros: self.inner.group_busy_micros.load(Relaxed),
            one_statement_settlements: self.inner.one_statement_settlements.load(Relaxed),
        }
    }

    /// The number of group-commit writers this process runs (0 before the first write).
    pub fn writer_count(&self) -> usize {
        self.inner
            .writers
            .get()
            .map_or(0, group::GroupCommit::writers)
    }

    fn count_group(&self, operations: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.inner.groups.fetch_add(1, Relaxed);
        self.inner
            .grouped_operations
            .fetch_add(operations as u64, Relaxed);
    }

    /// Adds a group's time at its writer (after its answers went out: a reader may see
    /// the last group's time a moment late).
    fn count_writer_busy(&self, busy: std::time::Duration) {
        let busy = u64::try_from(busy.as_micros()).unwrap_or(u64::MAX);
        self.inner
            .group_busy_micros
            .fetch_add(busy, std::sync::atomic::Ordering::Relaxed);
    }

    fn count_retry(&self) {
        self.inner
            .retries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    async fn retrying<T, F, Fut>(&self, mut attempt: F) -> Result<T, LedgerError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, LedgerError>>,
    {
        let mut tries = 0;
        loop {
            tries += 1;
            match attempt().await {
                Err(e) if tries < MAX_ATTEMPTS && retryable(&e) => {
                    self.count_retry();
                    backoff(tries).await
                }
                other => return other,
            }
        }
    }
}

/// A short growing pause before attempt `tries + 1`, with jitter.
async fn backoff(tries: u32) {
    let jitter = rand::random::<u64>() % 5;
    tokio::time::sleep(Duration::from_millis(2u64.pow(tries.min(6)) + jitter)).await;
}

/// Retrying is safe for every ledger operation: each is idempotent by its key, so an
/// attempt that did commit before its connection failed is answered as a replay.
fn retryable(e: &LedgerError) -> bool {
    match e {
        LedgerError::Busy(_) => true,
        LedgerError::Db(e) => {
            is_transient(e) || is_unique_violation(e) || matches!(e, sqlx::Error::Io(_))
        }
        _ => false,
    }
}

/// Converts a count from the wire to the database's BIGINT.
fn to_i64(value: u64, what: &str) -> Result<i64, LedgerError> {
    i64::try_from(value).map_err(|_| LedgerError::Invalid(format!("{what} is too large")))
}

/// Validates an identifier stored in a VARCHAR(191) key column.
fn check_key(value: &str, what: &str) -> Result<(), LedgerError> {
    if !llm_meter_protocol::is_storable_key(value) {
        return Err(LedgerError::Invalid(format!(
            "{what} must be 1..={} characters",
            llm_meter_protocol::MAX_KEY_CHARS
        )));
    }
    Ok(())
}

#[cfg(test)]
mod group_commit_counter_tests {
    use super::GroupCommits;
    use std::time::Duration;

    #[test]
    fn writers_busy_is_writer_time_over_wall_time() {
        let earlier = GroupCommits {
            groups: 10,
            operations: 30,
            busy_micros: 1_000_000,
            ..GroupCommits::default()
        };
        let now = GroupCommits {
            groups: 20,
            operations: 50,
            busy_micros: 9_000_000,
            ..GroupCommits::default()
        };
        // 8 s of writer time in 2 s: four writers busy all the time.
        assert_eq!(now.writers_busy_since(earlier, Duration::from_secs(2)), 4.0);
        assert_eq!(now.mean_size_since(earlier), 2.0);
        assert_eq!(now.writers_busy_since(earlier, Duration::ZERO), 0.0);
        // A counter read out of order never goes negative.
        assert_eq!(earlier.writers_busy_since(now, Duration::from_secs(1)), 0.0);
    }
}
