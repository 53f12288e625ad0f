//! Admission: resolve the caller and model, size the hold, reserve it.

use crate::storage::Conn;
use llm_meter_protocol::{
    AuthorizeRequest, AuthorizeResponse, Caller, Decision, Denial, DenyCode, Usage,
};
use sqlx::Row;

use super::accounts::{lock_account, refresh_lots, save_account, write_journal, Entry, Journal};
use super::group::{Done, Op};
use super::lease::{hold_measure, is_lease_key, LeaseTerms, LEASE_PREFIX};
use super::prefetch::Prefetched;
use super::{check_key, Ledger, LedgerError, UnpricedPolicy};
use crate::pricing::{Measure, ModelPricing};
use crate::storage::{bind_values, Db, Dialect, Value};

/// Larger counts in one call are rejected as `invalid_request` (no real call is that big,
/// and it keeps every sum far from integer overflow).
pub const MAX_UNITS_PER_CALL: u64 = 1_000_000_000_000;

/// What admission decided before touching the account.
#[derive(Clone)]
pub(super) struct Admission {
    pub user_id: String,
    pub model: ModelPricing,
    pub hold: u64,
    /// Set when a lease was asked for and the model's quota type can be leased.
    pub lease: Option<LeaseTerms>,
}

impl Admission {
    /// The answer to `req` once its hold is reserved.
    fn held_answer(&self, req: &AuthorizeRequest) -> AuthorizeResponse {
        let quota_type = &self.model.quota_type;
        allow(
            req,
            &self.user_id,
            quota_type,
            self.hold,
            self.model.price.is_some(),
        )
    }
}

impl Ledger {
    /// Reserves the call's estimated units, or denies it. Idempotent by `request_id`.
    pub async fn authorize(
        &self,
        req: &AuthorizeRequest,
    ) -> Result<AuthorizeResponse, LedgerError> {
        match self.admit(req, None).await? {
            Ok(admission) => self.reserve(req, &admission).await,
            Err(denied) => Ok(denied),
        }
    }

    /// Resolves caller and model and sizes the hold; `Err` is a ready denial.
    pub(super) async fn admit(
        &self,
        req: &AuthorizeRequest,
        hold_override: Option<u64>,
    ) -> Result<Result<Admission, AuthorizeResponse>, LedgerError> {
        if let Err(e) = validate(req) {
            return Ok(Err(denial(req, None, None, DenyCode::InvalidRequest, e)));
        }
        let now = self.now();
        let user_id = match &req.caller {
            Caller::UserId(user) => user.clone(),
            Caller::ApiKey(key) => match self.resolve_api_key(key).await? {
                Some(user) => user,
                None => {
                    let message = "unknown, revoked or expired API key".to_string();
                    return Ok(Err(denial(
                        req,
                        None,
                        None,
                        DenyCode::InvalidApiKey,
                        message,
                    )));
                }
            },
        };
        let model = match self.prices().resolve_cached(&req.provider, &req.model, now) {
            Some(model) => model,
            None => {
                let mut conn = Conn::from(self.db().pool().acquire().await?);
                self.prices()
                    .resolve(&mut conn, &req.provider, &req.model, now)
                    .await?
            }
        };
        let quota_type = Some(model.quota_type.clone());
        if !model.enabled {
            let message = format!("model {}/{} is disabled", req.provider, req.model);
            return Ok(Err(denial(
                req,
                Some(user_id),
                quota_type,
                DenyCode::ModelDisabled,
                message,
            )));
        }
        if model.price.is_none() {
            if self.config().unpriced_policy == UnpricedPolicy::Deny {
                let message = format!("model {}/{} has no price in force", req.provider, req.model);
                return Ok(Err(denial(
                    req,
                    Some(user_id),
                    quota_type,
                    DenyCode::ModelUnpriced,
                    message,
                )));
            }
            tracing::warn!(
                provider = %req.provider, model = %req.model, known = model.known,
                request_id = %req.request_id,
                "model has no price in force: the call is metered but not billed"
            );
        }
        let hold = match hold_override {
            Some(h) => h.max(1),
            None => match self.hold_amount(req, &model) {
                Ok(h) => h,
                Err(message) => {
                    return Ok(Err(denial(
                        req,
                        Some(user_id),
                        quota_type,
                        DenyCode::InvalidRequest,
                        message,
                    )))
                }
            },
        };
        let lease = match (req.lease, hold_override) {
            (Some(ask), None) => {
                hold_measure(model.measure).map(|measure| LeaseTerms { ask, measure })
            }
            _ => None,
        };
        Ok(Ok(Admission {
            user_id,
            model,
            hold,
            lease,
        }))
    }

    /// Units to hold: text = estimated input + output cap (the request's, or the configured
    /// default); images = requested images (default 1); money = the estimate's cost. At least 1.
    fn hold_amount(&self, req: &AuthorizeRequest, model: &ModelPricing) -> Result<u64, String> {
        let output_cap = req
            .max_output_tokens
            .unwrap_or(self.config().default_max_output_tokens);
        let input = req.estimated_input_tokens;
        let hold = match model.measure {
            Measure::TotalTokens => input.saturating_add(output_cap),
            Measure::InputTokens => input,
            Measure::OutputTokens => output_cap,
            Measure::Images => req.requested_images.unwrap_or(1),
            Measure::Requests => 1,
            Measure::CostMicros => {
                let estimate = Usage {
                    input_tokens: input,
                    output_tokens: output_cap,
                    images: req.requested_images.unwrap_or(0),
                    ..Usage::default()
                };
                match &model.price {
                    Some(price) => price
                        .cost(&estimate)
                        .map_err(|e| format!("cannot price the estimate: {e}"))?
                        .micros
                        .max(0) as u64,
                    None => 0,
                }
            }
        };
        if hold > MAX_UNITS_PER_CALL {
            return Err(format!(
                "the call would hold {hold} units, above the limit of {MAX_UNITS_PER_CALL}"
            ));
        }
        Ok(hold.max(1))
    }

    pub(super) async fn reserve(
        &self,
        req: &AuthorizeRequest,
        admission: &Admission,
    ) -> Result<AuthorizeResponse, LedgerError> {
        self.retrying(|| async {
            let op = Op::Reserve {
                req: req.clone(),
                admission: admission.clone(),
            };
            match self.submit_one(op).await? {
                Done::Authorized(response) => Ok(response),
                _ => Err(LedgerError::Inconsistent(
                    "the writer answered an authorization with another result".into(),
                )),
            }
        })
        .await
    }

    /// PostgreSQL: a plain authorization alone in its group. Its common case is one
    /// statement, atomic on its own, so it runs outside a transaction: one round trip instead
    /// of BEGIN, the statement and COMMIT. None when that did not reserve, which writes
    /// nothing (no account, not enough quota, a lot event due, a retry whose hold exists, a
    /// failed connection); the group then runs the general path in a transaction, which
    /// answers those cases.
    pub(super) async fn reserve_alone(
        &self,
        req: &AuthorizeRequest,
        admission: &Admission,
    ) -> Option<AuthorizeResponse> {
        let db = self.db();
        if db.dialect() != Dialect::Postgres || admission.lease.is_some() {
            return None;
        }
        let fast = FastReserve::new(self, req, admission);
        let mut conn = Conn::from(db.pool().acquire().await.ok()?);
        match fast.in_one_statement(db, &mut conn).await {
            Ok(true) => Some(admission.held_answer(req)),
            Ok(false) | Err(_) => None,
        }
    }

    /// Reserves inside the caller's write transaction. A retry of an authorization
    /// already held fails with the unique violation of its hold row; the group writer
    /// then undoes this operation's writes and answers it with
    /// [`Ledger::replay_authorization_on`].
    pub(super) async fn reserve_on(
        &self,
        conn: &mut Conn,
        req: &AuthorizeRequest,
        admission: &Admission,
        reads: &mut Prefetched,
    ) -> Result<AuthorizeResponse, LedgerError> {
        if let Some(terms) = admission.lease {
            return self.reserve_lease_on(conn, req, admission, terms).await;
        }
        let db = self.db();
        let fast = FastReserve::new(self, req, admission);
        let now = fast.now;
        let user_id = admission.user_id.as_str();
        let quota_type = admission.model.quota_type.as_str();
        let hold = admission.hold as i64;
        let allowed = || admission.held_answer(req);
        // Reserved by the group's merged update (see `reserve_ahead.rs`).
        if reads.take_reserved(&req.request_id) {
            return Ok(allowed());
        }
        let reserved_fast = match db.dialect() {
            Dialect::Postgres => fast.in_one_statement(db, conn).await?,
            Dialect::Sqlite => fast.in_one_call(db, conn).await?,
            Dialect::MySql => false,
        };
        if reserved_fast {
            return Ok(allowed());
        }

        // General path (MySQL, denials, due lot events). The hold row first: it is the
        // idempotency key and serialises retries of one call.
        let values = held_hold_values(req, admission, now, fast.expires_at);
        bind_values(sqlx::query(&db.sql(INSERT_HELD_HOLD)), values)
            .execute(&mut *conn)
            .await?;

        // One guarded update, valid while no lot expiry/activation is due (already tried,
        // and failed, by the single-round-trip forms on PostgreSQL and SQLite).
        let reserved = db.dialect() == Dialect::MySql
            && bind_values(sqlx::query(&db.sql(GUARDED_RESERVE)), fast.reserve_values())
                .execute(&mut *conn)
                .await?
                .rows_affected()
                == 1;
        let mut journal = Journal::default();
        let denied = if reserved {
            None
        } else {
            self.reserve_slowly(conn, user_id, quota_type, hold, &mut journal, now)
                .await?
        };
        if let Some(code) = denied {
            // Keep the lot refresh (it is true regardless), drop the hold.
            let sql = db.sql("DELETE FROM ledger_holds WHERE request_id = ?");
            sqlx::query(&sql)
                .bind(&req.request_id)
                .execute(&mut *conn)
                .await?;
            write_journal(db, conn, journal, now).await?;
            return Ok(quota_denial(req, admission, code));
        }
        journal.push_raw(
            user_id,
            quota_type,
            Entry {
                kind: "reserve",
                request_id: Some(req.request_id.clone()),
                held_delta: hold,
                ..Entry::default()
            },
        );
        write_journal(db, conn, journal, now).await?;
        Ok(allowed())
    }

    /// The account's next lot event is due (or the fast path failed for lack of quota):
    /// lock the account, apply due expiries/activations, and try again.
    async fn reserve_slowly(
        &self,
        conn: &mut Conn,
        user_id: &str,
        quota_type: &str,
        hold: i64,
        journal: &mut Journal,
        now: i64,
    ) -> Result<Option<DenyCode>, LedgerError> {
        let db = self.db();
        let Some(mut account) = lock_account(db, conn, user_id, quota_type, false, now).await?
        else {
            return Ok(Some(DenyCode::NoQuota));
        };
        let due = account.is_due(now);
        if due {
            refresh_lots(db, conn, &mut account, journal, now).await?;
        }
        let fits = account.balance - account.held >= hold;
        if fits {
            account.held += hold;
        }
        if due || fits {
            save_account(db, conn, &account, now).await?;
        }
        Ok((!fits).then_some(DenyCode::QuotaExhausted))
    }

    pub(super) fn hold_ttl_ms(&self) -> i64 {
        i64::try_from(self.config().hold_ttl.as_millis()).unwrap_or(i64::MAX)
    }

    /// A retry of an authorization already held (or leased): same figures give the same
    /// answer.
    pub(super) async fn replay_authorization_on(
        &self,
        conn: &mut Conn,
        req: &AuthorizeRequest,
        admission: &Admission,
    ) -> Result<AuthorizeResponse, LedgerError> {
        if admission.lease.is_some() {
            if let Some(answer) = self.replay_lease_on(conn, req, admission).await? {
                return Ok(answer);
            }
        }
        self.replay_call_authorization_on(conn, req, admission)
            .await
    }

    /// A retry of an authorization that holds for the call itself (or was finalized).
    pub(super) async fn replay_call_authorization_on(
        &self,
        conn: &mut Conn,
        req: &AuthorizeRequest,
        admission: &Admission,
    ) -> Result<AuthorizeResponse, LedgerError> {
        let sql = self.db().sql(
            "SELECT user_id, quota_type, provider, model, amount, priced, status \
             FROM ledger_holds WHERE request_id = ?",
        );
        let row = sqlx::query(&sql)
            .bind(&req.request_id)
            .fetch_optional(&mut *conn)
            .await?;
        let Some(row) = row else {
            return Err(LedgerError::Busy(format!(
                "authorization {} raced with a concurrent attempt",
                req.request_id
            )));
        };
        let user_id: String = row.try_get(0)?;
        let quota_type: String = row.try_get(1)?;
        let provider: String = row.try_get(2)?;
        let model: String = row.try_get(3)?;
        let amount: i64 = row.try_get(4)?;
        let priced: i32 = row.try_get(5)?;
        let status: String = row.try_get(6)?;
        if status != "held" {
            return finalized_replay(req, admission, &status, (&user_id, &provider, &model));
        }
        let same = user_id == admission.user_id
            && provider == req.provider
            && model == req.model
            && amount == admission.hold as i64;
        if !same {
            return Err(LedgerError::Conflict(format!(
                "request {} was already authorized with different figures \
                 ({user_id}, {provider}/{model}, hold {amount})",
                req.request_id
            )));
        }
        Ok(allow(
            req,
            &user_id,
            &quota_type,
            amount as u64,
            priced != 0,
        ))
    }
}

/// A call's hold row: the request's idempotency key, and what its settlement releases.
pub(super) const INSERT_HELD_HOLD: &str = "INSERT INTO ledger_holds (request_id, user_id, \
     quota_type, provider, model, amount, price_version_id, priced, status, created_at, \
     expires_at, finalized_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'held', ?, ?, NULL)";

/// The values of [`INSERT_HELD_HOLD`].
pub(super) fn held_hold_values(
    req: &AuthorizeRequest,
    admission: &Admission,
    now: i64,
    expires_at: i64,
) -> Vec<Value> {
    let price_version = admission.model.price.as_ref().map(|p| p.id);
    vec![
        req.request_id.as_str().into(),
        admission.user_id.as_str().into(),
        admission.model.quota_type.as_str().into(),
        req.provider.as_str().into(),
        req.model.as_str().into(),
        (admission.hold as i64).into(),
        price_version.into(),
        i64::from(price_version.is_some()).into(),
        now.into(),
        expires_at.into(),
    ]
}

/// The common case (account exists, enough available, no lot event due) in one round trip.
/// Nothing is written when it does not apply; the general path then decides.
struct FastReserve<'a> {
    req: &'a AuthorizeRequest,
    admission: &'a Admission,
    now: i64,
    expires_at: i64,
}

const GUARDED_RESERVE: &str = "UPDATE ledger_accounts SET held = held + ?, updated_at = ? \
     WHERE user_id = ? AND quota_type = ? AND balance - held >= ? \
     AND (next_event_at IS NULL OR next_event_at > ?)";

impl<'a> FastReserve<'a> {
    fn new(ledger: &Ledger, req: &'a AuthorizeRequest, admission: &'a Admission) -> Self {
        let now = ledger.now();
        FastReserve {
            req,
            admission,
            now,
            expires_at: now.saturating_add(ledger.hold_ttl_ms()),
        }
    }

    fn reserve_values(&self) -> Vec<Value> {
        let hold = self.admission.hold as i64;
        vec![
            hold.into(),
            self.now.into(),
            self.admission.user_id.as_str().into(),
            self.admission.model.quota_type.as_str().into(),
            hold.into(),
            self.now.into(),
        ]
    }

    fn price_version(&self) -> Option<i64> {
        self.admission.model.price.as_ref().map(|p| p.id)
    }

    /// PostgreSQL: data-modifying CTEs.
    async fn in_one_statement(&self, db: &Db, conn: &mut Conn) -> Result<bool, sqlx::Error> {
        let sql = format!(
            "WITH acc AS ({GUARDED_RESERVE} RETURNING user_id, quota_type), \
             hold AS (INSERT INTO ledger_holds (request_id, user_id, quota_type, provider, model, \
               amount, price_version_id, priced, status, created_at, expires_at, finalized_at) \
               SELECT ?, user_id, quota_type, ?, ?, ?, ?, ?, 'held', ?, ?, CAST(NULL AS BIGINT) \
               FROM acc RETURNING request_id), \
             jr AS (INSERT INTO ledger_journal (user_id, quota_type, kind, lot_id, request_id, \
               lot_delta, balance_delta, held_delta, debt_delta, memo, created_at) \
               SELECT user_id, quota_type, 'reserve', CAST(NULL AS BIGINT), ?, 0, 0, ?, 0, \
               CAST(NULL AS VARCHAR), ? FROM acc) \
             SELECT COUNT(*) FROM hold"
        );
        let hold = self.admission.hold as i64;
        let mut values = self.reserve_values();
        values.extend([
            self.req.request_id.as_str().into(),
            self.req.provider.as_str().into(),
            self.req.model.as_str().into(),
            hold.into(),
            self.price_version().into(),
            i64::from(self.price_version().is_some()).into(),
            self.now.into(),
            self.expires_at.into(),
            self.req.request_id.as_str().into(),
            hold.into(),
            self.now.into(),
        ]);
        let sql = db.sql(&sql);
        let row = bind_values(sqlx::query(&sql), values)
            .fetch_one(&mut *conn)
            .await?;
        Ok(row.try_get::<i64, _>(0)? == 1)
    }

    /// SQLite: three statements in one call inside the caller's transaction, each insert
    /// conditional on the previous statement having changed a row.
    async fn in_one_call(&self, db: &Db, conn: &mut Conn) -> Result<bool, sqlx::Error> {
        let sql = format!(
            "{GUARDED_RESERVE};
             INSERT INTO ledger_holds (request_id, user_id, quota_type, provider, model, amount, \
               price_version_id, priced, status, created_at, expires_at, finalized_at) \
               SELECT ?, ?, ?, ?, ?, ?, ?, ?, 'held', ?, ?, NULL WHERE changes() = 1;
             INSERT INTO ledger_journal (user_id, quota_type, kind, lot_id, request_id, lot_delta, \
               balance_delta, held_delta, debt_delta, memo, created_at) \
               SELECT ?, ?, 'reserve', NULL, ?, 0, 0, ?, 0, NULL, ? WHERE changes() = 1"
        );
        let hold = self.admission.hold as i64;
        let user_id = self.admission.user_id.as_str();
        let quota_type = self.admission.model.quota_type.as_str();
        let mut values = self.reserve_values();
        values.extend([
            self.req.request_id.as_str().into(),
            user_id.into(),
            quota_type.into(),
            self.req.provider.as_str().into(),
            self.req.model.as_str().into(),
            hold.into(),
            self.price_version().into(),
            i64::from(self.price_version().is_some()).into(),
            self.now.into(),
            self.expires_at.into(),
            user_id.into(),
            quota_type.into(),
            self.req.request_id.as_str().into(),
            hold.into(),
            self.now.into(),
        ]);
        let sql = db.sql(&sql);
        let done = bind_values(sqlx::query(&sql), values)
            .execute(&mut *conn)
            .await?;
        match done.rows_affected() {
            0 => Ok(false),
            3 => Ok(true),
            n => Err(sqlx::Error::Protocol(format!(
                "fast reservation changed {n} rows instead of 0 or 3"
            ))),
        }
    }
}

fn validate(req: &AuthorizeRequest) -> Result<(), String> {
    let keys = [
        (&req.request_id, "request_id"),
        (&req.provider, "provider"),
        (&req.model, "model"),
    ];
    for (value, what) in keys {
        check_key(value, what).map_err(|e| e.to_string())?;
    }
    if let Caller::UserId(user) = &req.caller {
        check_key(user, "user id").map_err(|e| e.to_string())?;
    }
    if is_lease_key(&req.request_id) {
        return Err(format!(
            "request ids starting with `{LEASE_PREFIX}` are reserved for leases"
        ));
    }
    let counts = [
        (req.estimated_input_tokens, "estimated_input_tokens"),
        (req.max_output_tokens.unwrap_or(0), "max_output_tokens"),
        (req.requested_images.unwrap_or(0), "requested_images"),
    ];
    for (value, what) in counts {
        if value > MAX_UNITS_PER_CALL {
            return Err(format!(
                "{what} {value} is above the limit of {MAX_UNITS_PER_CALL}"
            ));
        }
    }
    Ok(())
}

/// The answer to an authorize of a request already finalized (its settlement, void or
/// hold expiry came first, e.g. a fail-open settlement before its late authorize): nothing
/// is held again. Settled or expired: Allow with `held` 0 (the call was admitted and is, or
/// will be, charged by its settlement). Voided: Deny (`invalid_request`), since the call
/// was given up and a settlement of it would be refused.
fn finalized_replay(
    req: &AuthorizeRequest,
    admission: &Admission,
    status: &str,
    (user_id, provider, model): (&str, &str, &str),
) -> Result<AuthorizeResponse, LedgerError> {
    // A void before authorize does not know the user; a settlement does.
    let known = !user_id.is_empty();
    if known && (user_id != admission.user_id || provider != req.provider || model != req.model) {
        return Err(LedgerError::Conflict(format!(
            "request {} was already {status} for another caller or model \
             ({user_id}, {provider}/{model})",
            req.request_id
        )));
    }
    let quota_type = admission.model.quota_type.as_str();
    let priced = admission.model.price.is_some();
    if status == "voided" {
        let message = format!(
            "request {} was already voided; it cannot be authorized again",
            req.request_id
        );
        let mut denied = denial(
            req,
            Some(admission.user_id.clone()),
            Some(quota_type.to_string()),
            DenyCode::InvalidRequest,
            message,
        );
        denied.priced = priced;
        return Ok(denied);
    }
    Ok(allow(req, &admission.user_id, quota_type, 0, priced))
}

/// The denial of a call the account cannot hold (`no_quota` or `quota_exhausted`).
pub(super) fn quota_denial(
    req: &AuthorizeRequest,
    admission: &Admission,
    code: DenyCode,
) -> AuthorizeResponse {
    let quota_type = admission.model.quota_type.as_str();
    let message = match code {
        DenyCode::NoQuota => format!("no {quota_type} quota has ever been granted"),
        _ => format!(
            "not enough {quota_type} quota left for a hold of {}",
            admission.hold
        ),
    };
    let mut denied = denial(
        req,
        Some(admission.user_id.clone()),
        Some(quota_type.to_string()),
        code,
        message,
    );
    denied.priced = admission.model.price.is_some();
    denied
}

pub(super) fn allow(
    req: &AuthorizeRequest,
    user_id: &str,
    quota_type: &str,
    held: u64,
    priced: bool,
) -> AuthorizeResponse {
    AuthorizeResponse {
        request_id: req.request_id.clone(),
        decision: Decision::Allow,
        user_id: Some(user_id.to_string()),
        quota_type: Some(quota_type.to_string()),
        held,
        priced,
        denial: None,
        lease: None,
    }
}

fn denial(
    req: &AuthorizeRequest,
    user_id: Option<String>,
    quota_type: Option<String>,
    code: DenyCode,
    message: String,
) -> AuthorizeResponse {
    AuthorizeResponse {
        request_id: req.request_id.clone(),
        decision: Decision::Deny,
        user_id,
        quota_type,
        held: 0,
        priced: false,
        denial: Some(Denial { code, message }),
        lease: None,
    }
}
