//! Leases: one hold for one caller and model, from which the filter admits that caller's
//! next calls of the model by itself instead of authorizing each one.
//!
//! - **Grant** (authorize with a lease ask, quota types counted in units only): the hold
//!   row `lease:<request id>` is written first (it is the idempotency key of the grant),
//!   then the account is locked and the lease sized `max(h, min(asked, available / 4))`,
//!   `h` being the authorizing call's own hold: a low balance gives small leases, and one
//!   caller's lease never takes most of a small balance. The authorizing call has no hold
//!   of its own; the filter settles it under the lease like every other call.
//! - **Settle under a lease**: the call's units leave the lease (at most what is left of
//!   it) and the account's `held` together and are burned from the lots; an overrun beyond
//!   the lease takes free units, then becomes debt (the rule of every settlement). Price:
//!   the version in force when the lease was granted. Each call keeps its own usage record,
//!   which is its idempotency key. Once the lease is released or expired, a call is charged
//!   like a late settlement (no hold left to release).
//! - **Void under a lease** releases nothing (the call's share goes back to the filter's
//!   lease) but is recorded like any void.
//! - **Release** gives back what is left; the sweep does it for a lease forgotten past
//!   `admit_until` + the hold TTL, without a usage record (no call is behind a lease).

use crate::storage::Conn;
use llm_meter_protocol::{
    AuthorizeRequest, AuthorizeResponse, Caller, DenyCode, HoldMeasure, Lease, LeaseAsk,
    ReleaseRequest, SettleRequest, SettleResponse, SettleStatus, Usage, VoidRequest,
};
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::accounts::{
    lock_account, refresh_lots, save_account, save_account_in, write_journal, Account, Entry,
    Journal,
};
use super::authorize::{allow, quota_denial, Admission};
use super::group::{Done, Op};
use super::prefetch::Prefetched;
use super::settle::{
    load_hold, load_lease_to_charge, measure, push_usage, read_hold, usage_record_status,
    LeaseRead, Release, Settlement, UsageRow,
};
use super::{check_key, to_i64, Ledger, LedgerError};
use crate::pricing::Measure;
use crate::storage::Batch;
use llm_meter_protocol::{LEASE_ID_PREFIX, MAX_KEY_CHARS};

/// Every lease id starts with this; call request ids must not (the protocol's definition,
/// which the filter checks too).
pub const LEASE_PREFIX: &str = LEASE_ID_PREFIX;

/// The lease granted to the authorization `request_id`: deterministic (a retried authorize
/// finds its lease), within the key limit (a long request id is hashed), and never a
/// call's request id (those may not start with [`LEASE_PREFIX`]).
pub fn lease_id_for(request_id: &str) -> String {
    if LEASE_PREFIX.len() + request_id.chars().count() <= MAX_KEY_CHARS {
        format!("{LEASE_PREFIX}{request_id}")
    } else {
        let digest = hex::encode(Sha256::digest(request_id.as_bytes()));
        format!("{LEASE_PREFIX}sha256:{digest}")
    }
}

pub(super) fn is_lease_key(id: &str) -> bool {
    id.starts_with(LEASE_PREFIX)
}

/// How the filter sizes a call's share of a lease; None for money quotas, which need the
/// price book and are never leased.
pub(super) fn hold_measure(measure: Measure) -> Option<HoldMeasure> {
    match measure {
        Measure::TotalTokens => Some(HoldMeasure::TotalTokens),
        Measure::InputTokens => Some(HoldMeasure::InputTokens),
        Measure::OutputTokens => Some(HoldMeasure::OutputTokens),
        Measure::Images => Some(HoldMeasure::Images),
        Measure::Requests => Some(HoldMeasure::Requests),
        Measure::CostMicros => None,
    }
}

/// A lease ask admission accepted (the model's quota type can be leased).
#[derive(Debug, Clone, Copy)]
pub(super) struct LeaseTerms {
    pub ask: LeaseAsk,
    pub measure: HoldMeasure,
}

/// A lease row as a retried authorize reads it.
struct Granted {
    user_id: String,
    quota_type: String,
    provider: String,
    model: String,
    priced: bool,
    kind: String,
    granted: Option<i64>,
    first_held: Option<i64>,
    admit_until: Option<i64>,
}

impl Ledger {
    /// Grants a lease inside the caller's write transaction. A retry fails with the unique
    /// violation of the lease row; the group writer then answers it with
    /// [`Ledger::replay_authorization_on`].
    pub(super) async fn reserve_lease_on(
        &self,
        conn: &mut Conn,
        req: &AuthorizeRequest,
        admission: &Admission,
        terms: LeaseTerms,
    ) -> Result<AuthorizeResponse, LedgerError> {
        let db = self.db();
        let now = self.now();
        // The call is known already (settled or voided before this authorize, or held by
        // an authorize without a lease ask): answer as for a call.
        if hold_row_exists(self, conn, &req.request_id).await? {
            return self
                .replay_call_authorization_on(conn, req, admission)
                .await;
        }
        let lease_id = lease_id_for(&req.request_id);
        let user_id = admission.user_id.as_str();
        let quota_type = admission.model.quota_type.as_str();
        let hold = to_i64(admission.hold, "hold")?;
        let price_version = admission.model.price.as_ref().map(|p| p.id);
        let max_ttl = u64::try_from(self.config().max_lease_ttl.as_millis()).unwrap_or(u64::MAX);
        let ttl = i64::try_from(terms.ask.ttl_ms.min(max_ttl)).unwrap_or(i64::MAX);
        let admit_until = now.saturating_add(ttl);
        let sql = db.sql(
            "INSERT INTO ledger_holds (request_id, user_id, quota_type, provider, model, amount, \
             price_version_id, priced, status, created_at, expires_at, finalized_at, kind, \
             granted, first_held, admit_until) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'held', ?, ?, NULL, 'lease', NULL, ?, ?)",
        );
        sqlx::query(&sql)
            .bind(&lease_id)
            .bind(user_id)
            .bind(quota_type)
            .bind(&req.provider)
            .bind(&req.model)
            .bind(hold)
            .bind(price_version)
            .bind(i32::from(price_version.is_some()))
            .bind(now)
            .bind(admit_until.saturating_add(self.hold_ttl_ms()))
            .bind(hold)
            .bind(admit_until)
            .execute(&mut *conn)
            .await?;

        let mut journal = Journal::default();
        let sized = self
            .size_lease(conn, admission, terms.ask.units, &mut journal, now)
            .await?;
        let (account, units) = match sized {
            Ok(sized) => sized,
            Err(code) => {
                // Keep the lot refresh (it is true regardless), drop the lease.
                let sql = db.sql("DELETE FROM ledger_holds WHERE request_id = ?");
                sqlx::query(&sql)
                    .bind(&lease_id)
                    .execute(&mut *conn)
                    .await?;
                write_journal(db, conn, journal, now).await?;
                return Ok(quota_denial(req, admission, code));
            }
        };
        let mut batch = Batch::default();
        batch.push(
            "UPDATE ledger_holds SET amount = ?, granted = ? WHERE request_id = ?",
            vec![units.into(), units.into(), lease_id.as_str().into()],
        );
        save_account_in(&mut batch, &account, now);
        journal.push(
            &account,
            Entry {
                kind: "reserve",
                request_id: Some(lease_id.clone()),
                held_delta: units,
                memo: Some(format!("lease for {}", req.request_id)),
                ..Entry::default()
            },
        );
        journal.into_batch(&mut batch, now);
        batch.execute(db.dialect(), conn).await?;
        let lease = Lease {
            lease_id,
            units: units as u64,
            expires_at_ms: admit_until.max(0) as u64,
            measure: terms.measure,
            default_max_output_tokens: self.config().default_max_output_tokens,
        };
        let priced = price_version.is_some();
        let mut answer = allow(req, user_id, quota_type, admission.hold, priced);
        answer.lease = Some(lease);
        Ok(answer)
    }

    /// Locks the account and sizes the lease from what is available now; the account comes
    /// back with the lease added to `held` (not saved yet). Denied exactly as a call is.
    async fn size_lease(
        &self,
        conn: &mut Conn,
        admission: &Admission,
        asked: u64,
        journal: &mut Journal,
        now: i64,
    ) -> Result<Result<(Account, i64), DenyCode>, LedgerError> {
        let db = self.db();
        let user_id = admission.user_id.as_str();
        let quota_type = admission.model.quota_type.as_str();
        let Some(mut account) = lock_account(db, conn, user_id, quota_type, false, now).await?
        else {
            return Ok(Err(DenyCode::NoQuota));
        };
        let due = account.is_due(now);
        if due {
            refresh_lots(db, conn, &mut account, journal, now).await?;
        }
        let hold = to_i64(admission.hold, "hold")?;
        let available = account.balance - account.held;
        if available < hold {
            if due {
                save_account(db, conn, &account, now).await?;
            }
            return Ok(Err(DenyCode::QuotaExhausted));
        }
        let asked = i64::try_from(asked).unwrap_or(i64::MAX);
        let units = hold.max(asked.min(available / 4));
        account.held += units;
        Ok(Ok((account, units)))
    }

    /// The answer to a retried lease authorization; None when no lease was granted to it.
    pub(super) async fn replay_lease_on(
        &self,
        conn: &mut Conn,
        req: &AuthorizeRequest,
        admission: &Admission,
    ) -> Result<Option<AuthorizeResponse>, LedgerError> {
        let lease_id = lease_id_for(&req.request_id);
        let Some(lease) = read_granted(self, conn, &lease_id).await? else {
            return Ok(None);
        };
        let (Some(units), Some(first_held), Some(admit_until)) =
            (lease.granted, lease.first_held, lease.admit_until)
        else {
            return Err(LedgerError::Inconsistent(format!(
                "{lease_id} is not a complete lease ({} row)",
                lease.kind
            )));
        };
        let same = lease.kind == "lease"
            && lease.user_id == admission.user_id
            && lease.provider == req.provider
            && lease.model == req.model
            && first_held == admission.hold as i64;
        if !same {
            return Err(LedgerError::Conflict(format!(
                "request {} was already authorized with different figures \
                 ({}, {}/{}, hold {first_held})",
                req.request_id, lease.user_id, lease.provider, lease.model
            )));
        }
        // The measure of the lease's own quota type, as when it was granted.
        let measure = match self.prices().quota_type(conn, &lease.quota_type).await? {
            Some(def) => hold_measure(def.measure),
            None => admission.lease.map(|terms| terms.measure),
        };
        let Some(measure) = measure else {
            return Err(LedgerError::Conflict(format!(
                "the quota type {} of lease {lease_id} can no longer be leased",
                lease.quota_type
            )));
        };
        let mut answer = allow(
            req,
            &lease.user_id,
            &lease.quota_type,
            first_held as u64,
            lease.priced,
        );
        answer.lease = Some(Lease {
            lease_id,
            units: units as u64,
            expires_at_ms: admit_until.max(0) as u64,
            measure,
            default_max_output_tokens: self.config().default_max_output_tokens,
        });
        Ok(Some(answer))
    }

    /// Settles a call admitted under `lease_id`; None when there is no such lease (the
    /// caller then settles it like a call without a hold).
    pub(super) async fn settle_under_lease_on(
        &self,
        conn: &mut Conn,
        req: &SettleRequest,
        lease_id: &str,
        reads: &mut Prefetched,
    ) -> Result<Option<SettleResponse>, LedgerError> {
        // Read ahead, a repeat of this settlement fails on its usage record's unique key and
        // the group applies it again, reading for itself (see `prefetch.rs`).
        let loaded = reads.take(lease_id);
        let read_ahead = loaded.is_some();
        let loaded = match loaded {
            Some(loaded) => loaded,
            None => match load_lease_to_charge(self, conn, lease_id, &req.request_id).await? {
                LeaseRead::Recorded => {
                    return self.replay_settlement_on(conn, req).await.map(Some);
                }
                LeaseRead::Loaded(loaded) => loaded,
            },
        };
        let (Some(lease), account) = loaded else {
            return Ok(None);
        };
        if !lease.is_lease() {
            return Err(LedgerError::Invalid(format!("{lease_id} is not a lease")));
        }
        let caller = self.owner_of(conn, &req.caller).await?;
        if caller.as_deref() != Some(lease.user_id.as_str())
            || lease.provider != req.provider
            || lease.model != req.model
        {
            return Err(LedgerError::Conflict(format!(
                "lease {lease_id} is for {}, {}/{}: not this call's caller or model",
                lease.user_id, lease.provider, lease.model
            )));
        }
        let now = self.now();
        let open = lease.status == "held";
        let left = lease.amount;
        let mut target = self.target_of_hold(conn, lease, 0).await?;
        // The lease's start is not the call's.
        target.started_at = None;
        let measured = measure(&target, &req.usage)?;
        let mut batch = Batch::default();
        if open {
            target.release = measured.units.min(left);
            batch.push(
                "UPDATE ledger_holds SET amount = amount - ? WHERE request_id = ?",
                vec![target.release.into(), lease_id.into()],
            );
        }
        let settlement = Settlement {
            req,
            target: &target,
            account,
            measured,
            held: to_i64(req.held, "held")?,
            lease_id: Some(lease_id),
        };
        let deferred = read_ahead.then(|| reads.deferred());
        self.record_settlement(conn, settlement, batch, deferred, now)
            .await
            .map(Some)
    }

    /// Records the void of a call admitted under `lease_id`: nothing is released (its
    /// share returns to the filter's lease). Idempotent by the call's usage record.
    pub(super) async fn void_under_lease_on(
        &self,
        conn: &mut Conn,
        req: &VoidRequest,
        lease_id: &str,
    ) -> Result<Option<SettleResponse>, LedgerError> {
        let answer = |status| SettleResponse {
            request_id: req.request_id.clone(),
            status,
            charged: 0,
            debt: 0,
            cost: None,
            currency: None,
        };
        match usage_record_status(self, conn, &req.request_id)
            .await?
            .as_deref()
        {
            None => {}
            Some("voided" | "expired") => return Ok(Some(answer(SettleStatus::AlreadyVoided))),
            Some(status) => {
                return Err(LedgerError::Conflict(format!(
                    "request {} was already {status}; it cannot be voided",
                    req.request_id
                )));
            }
        }
        let Some(lease) = read_hold(self, conn, lease_id).await? else {
            // An unknown lease: void it as a call of its own (recorded, or already voided).
            return self
                .release_on(conn, &req.request_id, Release::Void(req))
                .await;
        };
        if !lease.is_lease() {
            return Err(LedgerError::Invalid(format!("{lease_id} is not a lease")));
        }
        let now = self.now();
        let priced = lease.priced;
        let mut target = self.target_of_hold(conn, lease, 0).await?;
        target.started_at = None;
        let row = UsageRow {
            request_id: &req.request_id,
            target: &target,
            outcome: "none",
            usage: Usage::default(),
            units: 0,
            charged: 0,
            debt: 0,
            cost_micros: None,
            estimated: false,
            upstream_status: req.upstream_status,
            status: "voided",
            reason: Some(&req.reason),
            ended_at: now,
            held: to_i64(req.held, "held")?,
        };
        let mut batch = Batch::default();
        push_usage(self, &mut batch, &row, !priced, now);
        let mut journal = Journal::default();
        journal.push_raw(
            &target.user_id,
            &target.quota_type,
            Entry {
                kind: "void",
                request_id: Some(req.request_id.clone()),
                memo: Some(lease_id.to_string()),
                ..Entry::default()
            },
        );
        journal.into_batch(&mut batch, now);
        batch.execute(self.db().dialect(), conn).await?;
        Ok(Some(answer(SettleStatus::Voided)))
    }

    /// Gives back what is left of a lease. `Released`, or `AlreadyReleased` when it was
    /// released or expired before; `NotFound` for an unknown lease.
    pub async fn release(&self, req: &ReleaseRequest) -> Result<SettleResponse, LedgerError> {
        check_key(&req.lease_id, "lease_id")?;
        self.retrying(|| async {
            match self.submit_one(Op::Release(req.clone())).await? {
                Done::Released(response) => Ok(response),
                _ => Err(LedgerError::Inconsistent(
                    "the writer answered a release with another result".into(),
                )),
            }
        })
        .await?
        .ok_or_else(|| LedgerError::NotFound(format!("no lease {}", req.lease_id)))
    }

    /// Releases a lease inside the caller's write transaction; None when there is none.
    pub(super) async fn release_lease_on(
        &self,
        conn: &mut Conn,
        req: &ReleaseRequest,
    ) -> Result<Option<SettleResponse>, LedgerError> {
        let lease_id = req.lease_id.as_str();
        let (Some(lease), account) = load_hold(self, conn, lease_id).await? else {
            return Ok(None);
        };
        if !lease.is_lease() {
            return Err(LedgerError::Invalid(format!(
                "{lease_id} is a call's hold, not a lease"
            )));
        }
        let answer = |status| SettleResponse {
            request_id: lease_id.to_string(),
            status,
            charged: 0,
            debt: 0,
            cost: None,
            currency: None,
        };
        if lease.status != "held" {
            return Ok(Some(answer(SettleStatus::AlreadyReleased)));
        }
        let Some(mut account) = account else {
            return Err(LedgerError::Inconsistent(format!(
                "lease {lease_id} has no account"
            )));
        };
        let now = self.now();
        account.held -= lease.amount;
        let mut journal = Journal::default();
        journal.push(
            &account,
            Entry {
                kind: "release",
                request_id: Some(lease_id.to_string()),
                held_delta: -lease.amount,
                ..Entry::default()
            },
        );
        let mut batch = Batch::default();
        batch.push(
            "UPDATE ledger_holds SET status = 'released', finalized_at = ? WHERE request_id = ?",
            vec![now.into(), lease_id.into()],
        );
        save_account_in(&mut batch, &account, now);
        journal.into_batch(&mut batch, now);
        batch.execute(self.db().dialect(), conn).await?;
        Ok(Some(answer(SettleStatus::Released)))
    }

    /// The user a settlement's caller is: an API key's owner even if the key was revoked
    /// or expired since (the call was admitted under the lease before that).
    async fn owner_of(
        &self,
        conn: &mut Conn,
        caller: &Caller,
    ) -> Result<Option<String>, LedgerError> {
        match caller {
            Caller::UserId(user) => Ok(Some(user.clone())),
            Caller::ApiKey(key) => self.api_key_owner_on(conn, key).await,
        }
    }
}

async fn hold_row_exists(
    ledger: &Ledger,
    conn: &mut Conn,
    request_id: &str,
) -> Result<bool, LedgerError> {
    let sql = ledger
        .db()
        .sql("SELECT request_id FROM ledger_holds WHERE request_id = ?");
    let row = sqlx::query(&sql)
        .bind(request_id)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.is_some())
}

async fn read_granted(
    ledger: &Ledger,
    conn: &mut Conn,
    lease_id: &str,
) -> Result<Option<Granted>, LedgerError> {
    let sql = ledger.db().sql(
        "SELECT user_id, quota_type, provider, model, priced, kind, granted, first_held, \
         admit_until FROM ledger_holds WHERE request_id = ?",
    );
    let row = sqlx::query(&sql)
        .bind(lease_id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    Ok(Some(Granted {
        user_id: row.try_get(0)?,
        quota_type: row.try_get(1)?,
        provider: row.try_get(2)?,
        model: row.try_get(3)?,
        priced: row.try_get::<i32, _>(4)? != 0,
        kind: row.try_get(5)?,
        granted: row.try_get(6)?,
        first_held: row.try_get(7)?,
        admit_until: row.try_get(8)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ids_are_deterministic_keys_apart_from_call_ids() {
        assert_eq!(lease_id_for("req-1"), "lease:req-1");
        assert!(is_lease_key(&lease_id_for("req-1")));
        let long = "x".repeat(191);
        let id = lease_id_for(&long);
        assert_eq!(id, lease_id_for(&long));
        assert!(id.starts_with("lease:sha256:") && id.chars().count() <= MAX_KEY_CHARS);
        assert_ne!(id, lease_id_for(&"x".repeat(190)));
        let fits = "y".repeat(MAX_KEY_CHARS - LEASE_PREFIX.len());
        assert_eq!(lease_id_for(&fits), format!("lease:{fits}"));
    }

    #[test]
    fn money_quotas_are_never_leased() {
        assert_eq!(hold_measure(Measure::CostMicros), None);
        assert_eq!(
            hold_measure(Measure::TotalTokens),
            Some(HoldMeasure::TotalTokens)
        );
        assert_eq!(hold_measure(Measure::Images), Some(HoldMeasure::Images));
    }
}
