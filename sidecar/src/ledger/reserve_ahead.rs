//! Reserves ahead for a whole group (see `group.rs`): the group's plain authorizations
//! reserve in ONE guarded `UPDATE .. FROM (VALUES ..) RETURNING` right after BEGIN, and
//! their hold and journal rows join the group's deferred writes (see `prefetch.rs`).
//!
//! Why: alone, an authorization costs one call into sqlx's SQLite thread (its three
//! statements); a group of many then pays as many hand-offs as it has authorizations, and
//! hand-offs, not work, bound the ledger. Ahead, they cost one call together.
//!
//! What stays the same: each reservation is the same guarded update as alone
//! (`balance - held >= hold`, no lot event due), so admission never exceeds the balance.
//! An authorization whose update did not apply (no account, not enough quota, a lot event
//! due) is left to the classic path when its turn comes, which decides as it always did.
//!
//! Which ones: SQLite only (one writer, so nothing changes the accounts between BEGIN and
//! an operation's turn but the group itself). Plain calls, not leases. At most one per
//! account (a merged update applies one row per account), and none whose request id or hold
//! another operation of the group names (a retry, or a settlement racing its own
//! authorization, must see the operations before it in order). Reserving one earlier than
//! its turn reorders it only against other callers' concurrent operations, whose order was
//! never fixed. A retry of an authorization held by an earlier group fails the deferred
//! hold insert on its key: the group then runs again with savepoints and the classic path
//! answers it as a replay.

use std::collections::{HashMap, HashSet};

use crate::storage::Conn;
use sqlx::Row;

use super::accounts::{Entry, Journal};
use super::authorize::{held_hold_values, INSERT_HELD_HOLD};
use super::group::Op;
use super::prefetch::{touched, Prefetched};
use super::{Ledger, LedgerError};
use crate::storage::{bind_values, Dialect, Value};

/// Most authorizations one merged update names (larger groups reserve in several).
const ROWS_PER_UPDATE: usize = 64;

/// Reserves ahead for the group's eligible authorizations and records in `reads` which
/// ones are reserved, with their hold and journal rows deferred.
pub(super) async fn reserve_ahead(
    ledger: &Ledger,
    conn: &mut Conn,
    ops: &[Op],
    reads: &mut Prefetched,
) -> Result<(), LedgerError> {
    let authorizations = ops.iter().filter(|op| matches!(op, Op::Reserve { .. }));
    // A lone one is no cheaper merged (and most groups at low load hold one or none).
    if ledger.db().dialect() != Dialect::Sqlite || authorizations.count() < 2 {
        return Ok(());
    }
    let candidates = eligible(ops);
    // A lone one is no cheaper merged.
    if candidates.len() < 2 {
        return Ok(());
    }
    let now = ledger.now();
    let expires_at = now.saturating_add(ledger.hold_ttl_ms());
    let mut journal = Journal::default();
    for chunk in candidates.chunks(ROWS_PER_UPDATE) {
        for (user_id, quota_type) in reserve_accounts(conn, chunk, now).await? {
            let Some(&(req, admission)) = chunk
                .iter()
                .find(|(_, a)| a.user_id == user_id && a.model.quota_type == quota_type)
            else {
                return Err(LedgerError::Inconsistent(format!(
                    "a merged reservation changed account {user_id}/{quota_type}, \
                     which it did not name"
                )));
            };
            let hold = admission.hold as i64;
            reads.deferred().push(
                INSERT_HELD_HOLD,
                held_hold_values(req, admission, now, expires_at),
            );
            journal.push_raw(
                &user_id,
                &quota_type,
                Entry {
                    kind: "reserve",
                    request_id: Some(req.request_id.clone()),
                    held_delta: hold,
                    ..Entry::default()
                },
            );
            reads.mark_reserved(&req.request_id);
        }
    }
    journal.into_batch(reads.deferred(), now);
    Ok(())
}

type Candidate<'a> = (
    &'a llm_meter_protocol::AuthorizeRequest,
    &'a super::authorize::Admission,
);

/// The plain authorizations that may reserve ahead: the first of each account whose
/// request id and holds no other operation of the group names.
fn eligible(ops: &[Op]) -> Vec<Candidate<'_>> {
    let nothing_read = HashMap::new();
    let touched: Vec<Vec<String>> = ops.iter().map(|op| touched(op, &nothing_read)).collect();
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for key in touched.iter().flatten() {
        *uses.entry(key.as_str()).or_default() += 1;
    }
    let mut accounts = HashSet::new();
    let mut candidates = Vec::new();
    for (op, keys) in ops.iter().zip(&touched) {
        let Op::Reserve { req, admission } = op else {
            continue;
        };
        if admission.lease.is_some() {
            continue;
        }
        let alone = keys
            .iter()
            .filter(|k| !k.starts_with("a:"))
            .all(|k| uses[k.as_str()] == 1);
        let account = (
            admission.user_id.as_str(),
            admission.model.quota_type.as_str(),
        );
        if alone && accounts.insert(account) {
            candidates.push((req, admission));
        }
    }
    candidates
}

/// One guarded update for `chunk`'s accounts; the accounts it changed.
async fn reserve_accounts(
    conn: &mut Conn,
    chunk: &[Candidate<'_>],
    now: i64,
) -> Result<Vec<(String, String)>, LedgerError> {
    // A few fixed row counts (unused rows are NULLs, which match no account), so the
    // statement is prepared once per count and cached.
    let slots = chunk.len().next_power_of_two().max(4);
    let rows = vec!["(?, ?, ?, ?)"; slots].join(", ");
    let sql = format!(
        "UPDATE ledger_accounts SET held = held + v.column1, updated_at = v.column2 \
         FROM (VALUES {rows}) AS v \
         WHERE user_id = v.column3 AND quota_type = v.column4 \
         AND balance - held >= v.column1 \
         AND (next_event_at IS NULL OR next_event_at > v.column2) \
         RETURNING user_id, quota_type"
    );
    let mut values: Vec<Value> = Vec::with_capacity(slots * 4);
    for slot in 0..slots {
        match chunk.get(slot) {
            Some((_, admission)) => values.extend([
                (admission.hold as i64).into(),
                now.into(),
                admission.user_id.as_str().into(),
                admission.model.quota_type.as_str().into(),
            ]),
            None => values.extend([
                Value::Int(None),
                Value::Int(None),
                Value::Text(None),
                Value::Text(None),
            ]),
        }
    }
    let changed = bind_values(sqlx::query(&sql), values)
        .fetch_all(&mut *conn)
        .await?;
    changed
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use llm_meter_protocol::{AuthorizeRequest, Decision, DenyCode};

    use super::super::group::Done;
    use super::super::lease_tests::lease_auth;
    use super::super::tests::{assert_clean, auth, fixture, grant_req, seed_catalog};
    use super::*;
    use crate::storage::testing::{each_backend, fresh};

    async fn reserve(ledger: &Ledger, req: AuthorizeRequest) -> Op {
        let admission = ledger.admit(&req, None).await.unwrap().unwrap();
        Op::Reserve { req, admission }
    }

    /// u1 twice (one account), u2 without quota, u3 without enough, u4, a retry of u5's
    /// authorization held by an earlier group, a lease of u6.
    async fn the_mix(ledger: &Ledger) -> Vec<Op> {
        for (user, units) in [("u1", 1_000), ("u3", 100), ("u4", 1_000), ("u5", 1_000)] {
            ledger.grant(&grant_req(user, units, user)).await.unwrap();
        }
        ledger.grant(&grant_req("u6", 1_000, "u6")).await.unwrap();
        ledger.authorize(&auth("e5", "u5", 10, 10)).await.unwrap();
        vec![
            reserve(ledger, auth("a1", "u1", 100, 100)).await,
            reserve(ledger, auth("a2", "u1", 50, 50)).await,
            reserve(ledger, auth("a3", "u2", 10, 10)).await,
            reserve(ledger, auth("a4", "u3", 100, 100)).await,
            reserve(ledger, auth("a5", "u4", 30, 30)).await,
            reserve(ledger, auth("e5", "u5", 10, 10)).await,
            reserve(ledger, lease_auth("a7", "u6", 10, 10, 400)).await,
        ]
    }

    #[tokio::test]
    async fn the_first_plain_authorization_of_each_account_reserves_ahead_when_it_fits() {
        let t = fresh(Dialect::Sqlite).await;
        seed_catalog(&t.db).await;
        let f = fixture(&t).await;
        let ops = the_mix(&f.ledger).await;
        let chosen: Vec<&str> = eligible(&ops)
            .iter()
            .map(|(req, _)| req.request_id.as_str())
            .collect();
        assert_eq!(chosen, ["a1", "a3", "a4", "a5", "e5"]);

        let mut tx = t.db.begin_write().await.unwrap();
        let mut reads = Prefetched::default();
        reserve_ahead(&f.ledger, tx.conn(), &ops, &mut reads)
            .await
            .unwrap();
        // u2 has no account and u3 not enough: their turn decides.
        for (id, reserved) in [("a1", true), ("a3", false), ("a4", false), ("a5", true)] {
            assert_eq!(reads.take_reserved(id), reserved, "{id}");
        }
        assert!(reads.take_reserved("e5"), "the retry's key fails later");
        assert!(!reads.take_reserved("a1"), "answered once");
        tx.rollback().await.unwrap();
        t.cleanup().await;
    }

    /// The same group on every backend (reserved ahead on SQLite only) gets the answers a
    /// classic group gets, and leaves balances that reconcile.
    #[tokio::test]
    async fn a_group_reserved_ahead_answers_and_holds_exactly() {
        for t in each_backend().await {
            seed_catalog(&t.db).await;
            let f = fixture(&t).await;
            let l = &f.ledger;
            let b = t.backend;
            let ops = the_mix(l).await;
            let answers: Vec<(Decision, u64, Option<DenyCode>)> = l
                .submit(ops)
                .await
                .into_iter()
                .map(|r| match r {
                    Ok(Done::Authorized(a)) => (a.decision, a.held, a.denial.map(|d| d.code)),
                    Ok(_) => panic!("{b:?}: not an authorization"),
                    Err(e) => panic!("{b:?}: {e}"),
                })
                .collect();
            let allow = |held| (Decision::Allow, held, None);
            let deny = |code| (Decision::Deny, 0, Some(code));
            assert_eq!(
                answers,
                [
                    allow(200),
                    allow(100),
                    deny(DenyCode::NoQuota),
                    deny(DenyCode::QuotaExhausted),
                    allow(60),
                    allow(20),
                    // The call's share; the lease holds 250 (a quarter of what is left).
                    allow(20),
                ],
                "{b:?}"
            );
            for (user, held) in [("u1", 300), ("u3", 0), ("u4", 60), ("u5", 20), ("u6", 250)] {
                let balance = l.balance(user, "text_token").await.unwrap().unwrap();
                assert_eq!(balance.held, held, "{b:?} {user}");
            }
            assert_clean(l).await;
            t.cleanup().await;
        }
    }
}
