//! Group commit: authorize, settle, void and release calls that arrive together are
//! applied by a few writer tasks per process, many to ONE transaction, and each caller is
//! answered on its own once that transaction has committed.
//!
//! Why: every commit costs a WAL flush (PostgreSQL, MySQL) or the single SQLite write lock
//! plus its BEGIN/COMMIT round trips; sharing one commit among the calls waiting at that
//! moment multiplies throughput without changing what each call does. Nothing waits for a
//! window to fill: a writer takes whatever is queued (up to [`MAX_GROUP`]) as soon as it
//! is free, so a lone call costs what it did before.
//!
//! Isolation of failures: a group first runs without savepoints (no extra round trips).
//! When one operation fails, the whole transaction is rolled back and the group runs
//! again with a savepoint around each operation, so the failing one is answered with its
//! own error and the others still commit. A retried request inside the same group sees
//! the first one's uncommitted rows on the group's connection and gets the same answer.
//! Submissions are sorted by user so that groups of different processes lock accounts in
//! the same order (PostgreSQL/MySQL row locks), which keeps deadlocks between them rare;
//! a deadlock that still happens fails an attempt and is retried like any transient error.

use std::sync::{Arc, Weak};

use llm_meter_protocol::{
    AuthorizeRequest, AuthorizeResponse, ReleaseRequest, SettleResponse, VoidRequest,
};
use llm_meter_protocol::{Caller, SettleRequest};
use sqlx::{AnyConnection, Executor};
use tokio::sync::{mpsc, oneshot, Mutex};

use super::authorize::Admission;
use super::prefetch::Prefetched;
use super::{Inner, Ledger, LedgerError};
use crate::storage::{is_unique_violation, CommitError, Dialect};

/// Most operations one transaction applies (also keeps PostgreSQL under its 64 cached
/// subtransactions when a group has to run with savepoints).
pub(super) const MAX_GROUP: usize = 48;

/// A ledger write applied inside a group transaction.
pub(super) enum Op {
    Reserve {
        req: AuthorizeRequest,
        admission: Admission,
    },
    Settle(SettleRequest),
    Void(VoidRequest),
    Release(ReleaseRequest),
}

pub(super) enum Done {
    Authorized(AuthorizeResponse),
    Settled(SettleResponse),
    /// None when there is no hold to void.
    Voided(Option<SettleResponse>),
    /// None when there is no such lease.
    Released(Option<SettleResponse>),
}

type Reply = oneshot::Sender<Result<Done, LedgerError>>;

struct Pending {
    op: Op,
    reply: Reply,
}

/// The queue in front of this process's writer tasks.
pub(super) struct GroupCommit {
    queue: mpsc::UnboundedSender<Vec<Pending>>,
}

/// Most operations per transaction on `dialect`. MySQL runs one: a deadlock there rolls
/// back the whole transaction, and with one hot user grouped writers of several
/// processes deadlocked often enough against grants to exhaust their retries.
fn max_group(dialect: Dialect) -> usize {
    match dialect {
        Dialect::MySql => 1,
        Dialect::Sqlite | Dialect::Postgres => MAX_GROUP,
    }
}

impl Op {
    /// Groups apply operations in this order: one user's account row is the lock every
    /// one of its writes takes, so a common order avoids lock cycles between groups.
    fn lock_key(&self) -> &str {
        match self {
            Op::Reserve { admission, .. } => &admission.user_id,
            Op::Settle(SettleRequest {
                caller: Caller::UserId(user),
                ..
            }) => user,
            Op::Settle(_) | Op::Void(_) | Op::Release(_) => "",
        }
    }

    async fn apply(
        &self,
        ledger: &Ledger,
        conn: &mut AnyConnection,
        reads: &mut Prefetched,
    ) -> Result<Done, LedgerError> {
        match self {
            Op::Reserve { req, admission } => ledger
                .reserve_on(conn, req, admission, reads)
                .await
                .map(Done::Authorized),
            Op::Settle(req) => ledger.settle_on(conn, req, reads).await.map(Done::Settled),
            Op::Void(req) => ledger.void_on(conn, req).await.map(Done::Voided),
            Op::Release(req) => ledger.release_lease_on(conn, req).await.map(Done::Released),
        }
    }

    /// The answer to an operation whose idempotency key already exists (a retry), read on
    /// `conn` after its own writes were undone. None: the error stands.
    async fn replay(
        &self,
        ledger: &Ledger,
        conn: &mut AnyConnection,
        error: &LedgerError,
    ) -> Option<Result<Done, LedgerError>> {
        let unique = matches!(error, LedgerError::Db(e) if is_unique_violation(e));
        match self {
            Op::Reserve { req, admission } if unique => Some(
                ledger
                    .replay_authorization_on(conn, req, admission)
                    .await
                    .map(Done::Authorized),
            ),
            _ => None,
        }
    }
}

impl GroupCommit {
    /// Starts the writer tasks: one on SQLite (one writer at a time anyway); on PostgreSQL a
    /// quarter of the pool, so groups of different users commit in parallel (half the pool
    /// measured slower: more groups of fewer operations, more commits and lock waits); on
    /// MySQL, whose groups hold one operation, the whole pool. `LLM_METER_LEDGER_WRITERS`
    /// overrides the PostgreSQL/MySQL figure (for measurements).
    pub(super) fn start(inner: Weak<Inner>, dialect: Dialect, max_connections: u32) -> Self {
        let default = match dialect {
            Dialect::Sqlite => 1,
            Dialect::MySql => max_connections,
            Dialect::Postgres => max_connections / 4,
        };
        let writers = match dialect {
            Dialect::Sqlite => 1,
            Dialect::MySql | Dialect::Postgres => std::env::var("LLM_METER_LEDGER_WRITERS")
                .ok()
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(default)
                .clamp(1, max_connections.max(1)),
        };
        let (queue, receiver) = mpsc::unbounded_channel();
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..writers {
            let limit = max_group(dialect);
            tokio::spawn(writer(receiver.clone(), inner.clone(), limit));
        }
        GroupCommit { queue }
    }

    /// Queues `ops` (applied in one group) and waits for their answers, in order.
    pub(super) async fn submit(&self, ops: Vec<Op>) -> Vec<Result<Done, LedgerError>> {
        let mut answers = Vec::with_capacity(ops.len());
        let mut pending = Vec::with_capacity(ops.len());
        for op in ops {
            let (reply, answer) = oneshot::channel();
            pending.push(Pending { op, reply });
            answers.push(answer);
        }
        // A send error means the writers are gone (runtime shutting down): the answers
        // below then report it.
        let _ = self.queue.send(pending);
        let mut results = Vec::with_capacity(answers.len());
        for answer in answers {
            results.push(
                answer
                    .await
                    .unwrap_or_else(|_| Err(LedgerError::Busy("the ledger writer stopped".into()))),
            );
        }
        results
    }
}

async fn writer(
    receiver: Arc<Mutex<mpsc::UnboundedReceiver<Vec<Pending>>>>,
    inner: Weak<Inner>,
    limit: usize,
) {
    loop {
        let mut submissions = Vec::new();
        {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut size = first.len();
            submissions.push(first);
            while size < limit {
                match receiver.try_recv() {
                    Ok(more) => {
                        size += more.len();
                        submissions.push(more);
                    }
                    Err(_) => break,
                }
            }
        }
        // A submission keeps its own order (a batch may settle then void one call).
        submissions.sort_by(|a, b| lock_key(a).cmp(lock_key(b)));
        let group: Vec<Pending> = submissions.into_iter().flatten().collect();
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let ledger = Ledger { inner };
        ledger.count_group(group.len());
        run_group(&ledger, group).await;
    }
}

/// Why an attempt at a group failed.
enum Failure {
    /// One operation failed; the transaction was rolled back.
    Op(LedgerError),
    /// Beginning or committing failed: every operation shares the error.
    Group(LedgerError),
}

fn lock_key(submission: &[Pending]) -> &str {
    submission.first().map_or("", |p| p.op.lock_key())
}

async fn run_group(ledger: &Ledger, group: Vec<Pending>) {
    let (ops, replies): (Vec<Op>, Vec<Reply>) = group.into_iter().map(|p| (p.op, p.reply)).unzip();
    let results = match attempt(ledger, &ops, false).await {
        Ok(results) => results,
        Err(Failure::Op(error)) if ops.len() == 1 => vec![alone(ledger, &ops[0], error).await],
        Err(Failure::Op(_)) => match attempt(ledger, &ops, true).await {
            Ok(results) => results,
            Err(Failure::Op(error) | Failure::Group(error)) => shared(error, ops.len()),
        },
        Err(Failure::Group(error)) => shared(error, ops.len()),
    };
    for (reply, result) in replies.into_iter().zip(results) {
        // The caller may have gone away; its operation stands (it is idempotent).
        let _ = reply.send(result);
    }
}

/// One transaction for all of `ops`; with `savepoints`, a failing operation is undone and
/// answered alone, otherwise it fails the attempt.
async fn attempt(
    ledger: &Ledger,
    ops: &[Op],
    savepoints: bool,
) -> Result<Vec<Result<Done, LedgerError>>, Failure> {
    let mut tx = ledger
        .db()
        .begin_write()
        .await
        .map_err(|e| Failure::Group(e.into()))?;
    // With savepoints (after a failure) every operation reads for itself.
    let mut reads = if savepoints {
        Prefetched::default()
    } else {
        match Prefetched::read(ledger, tx.conn(), ops).await {
            Ok(reads) => reads,
            Err(e) => {
                let _ = tx.rollback().await;
                return Err(Failure::Group(e));
            }
        }
    };
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        if savepoints {
            if let Err(e) = tx.conn().execute("SAVEPOINT ledger_op").await {
                let _ = tx.rollback().await;
                return Err(Failure::Group(e.into()));
            }
        }
        let result = op.apply(ledger, tx.conn(), &mut reads).await;
        let result = match result {
            Ok(done) if savepoints => {
                match tx.conn().execute("RELEASE SAVEPOINT ledger_op").await {
                    Ok(_) => Ok(done),
                    Err(e) => {
                        let _ = tx.rollback().await;
                        return Err(Failure::Group(e.into()));
                    }
                }
            }
            Ok(done) => Ok(done),
            Err(error) if !savepoints => {
                let _ = tx.rollback().await;
                return Err(Failure::Op(error));
            }
            Err(error) => {
                // Fails when the server already rolled the whole transaction back
                // (a MySQL deadlock): then nothing of the group stands.
                if tx
                    .conn()
                    .execute("ROLLBACK TO SAVEPOINT ledger_op")
                    .await
                    .is_err()
                {
                    let _ = tx.rollback().await;
                    let message = format!("the group transaction was lost: {error}");
                    return Err(Failure::Group(LedgerError::Busy(message)));
                }
                match op.replay(ledger, tx.conn(), &error).await {
                    Some(replayed) => replayed,
                    None => Err(error),
                }
            }
        };
        results.push(result);
    }
    // The read-ahead settlements' writes, then COMMIT (one call on SQLite). A failed write
    // names no one operation, so the group runs again with savepoints (and no read-ahead),
    // as for any failing operation; so does a failed COMMIT sent with the writes on SQLite.
    let deferred = reads.take_deferred();
    match tx.commit_with(ledger.db().dialect(), deferred).await {
        Ok(()) => Ok(results),
        Err(CommitError::Writes(e)) => Err(Failure::Op(e.into())),
        Err(CommitError::Commit(e)) => Err(Failure::Group(e.into())),
    }
}

/// The answer of an operation that failed alone (its transaction is rolled back).
async fn alone(ledger: &Ledger, op: &Op, error: LedgerError) -> Result<Done, LedgerError> {
    if let Op::Reserve { .. } = op {
        if matches!(&error, LedgerError::Db(e) if is_unique_violation(e)) {
            let mut conn = ledger.db().pool().acquire().await?;
            if let Some(replayed) = op.replay(ledger, &mut conn, &error).await {
                return replayed;
            }
        }
    }
    Err(error)
}

/// The error of a failed group, for each of its `n` operations.
fn shared(error: LedgerError, n: usize) -> Vec<Result<Done, LedgerError>> {
    let mut results: Vec<Result<Done, LedgerError>> =
        (1..n).map(|_| Err(copy_error(&error))).collect();
    results.insert(0, Err(error));
    results
}

/// A copy of a group's error for another operation of the group (sqlx errors cannot be
/// cloned; those that cannot be rebuilt become `Busy`, which callers retry).
fn copy_error(error: &LedgerError) -> LedgerError {
    use sqlx::Error as E;
    match error {
        LedgerError::Db(E::PoolTimedOut) => LedgerError::Db(E::PoolTimedOut),
        LedgerError::Db(E::PoolClosed) => LedgerError::Db(E::PoolClosed),
        LedgerError::Db(E::WorkerCrashed) => LedgerError::Db(E::WorkerCrashed),
        LedgerError::Db(E::Io(io)) => {
            LedgerError::Db(E::Io(std::io::Error::new(io.kind(), io.to_string())))
        }
        LedgerError::Db(E::Protocol(message)) => LedgerError::Db(E::Protocol(message.clone())),
        LedgerError::Busy(message) => LedgerError::Busy(message.clone()),
        other => LedgerError::Busy(format!("the group transaction failed: {other}")),
    }
}
