//! Database access shared by the ledger, pricing and catalog: one [`Db`] handle over the
//! sqlx `Any` driver, the [`Dialect`] differences between SQLite, PostgreSQL and
//! MySQL/MariaDB, and the versioned migrations (see [`schema`] for every table).
//!
//! Portable column types only (the `Any` driver cannot decode DECIMAL, TEXT on MySQL or
//! TINYINT): integers are BIGINT, flags are INTEGER 0/1, timestamps are BIGINT Unix
//! milliseconds, strings are VARCHAR, prices are decimal strings and costs BIGINT micros.
//!
//! SQL is written once with `?` placeholders; [`Db::sql`] rewrites it to `$n` for PostgreSQL.

mod conn;
mod direct;
pub mod schema;
#[doc(hidden)]
pub mod testing;

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyConnection, AnyPool, ConnectOptions, Connection, Executor};
use tokio::sync::{Mutex, OwnedMutexGuard};

pub use conn::Conn;
use direct::DirectConn;
pub use direct::DirectSqliteError;

/// Errors from connecting and migrating.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("unsupported DATABASE_URL scheme in `{0}` (use sqlite://, postgres:// or mysql://)")]
    UnsupportedUrl(String),
    #[error("cannot create the database directory {path}: {source}")]
    CreateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("migration {version} ({name}) failed: {source}")]
    Migration {
        version: i64,
        name: &'static str,
        source: sqlx::Error,
    },
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// The SQL dialect behind a [`Db`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
    MySql,
}

impl Dialect {
    /// Picks the dialect from a connection URL.
    pub fn from_url(url: &str) -> Result<Dialect, StorageError> {
        let scheme = url.split(':').next().unwrap_or_default();
        match scheme {
            "sqlite" => Ok(Dialect::Sqlite),
            "postgres" | "postgresql" => Ok(Dialect::Postgres),
            "mysql" | "mariadb" => Ok(Dialect::MySql),
            _ => Err(StorageError::UnsupportedUrl(redact_url(url))),
        }
    }

    /// Rewrites `?` placeholders to `$1, $2, ...` for PostgreSQL (outside string literals).
    pub fn sql<'a>(self, sql: &'a str) -> Cow<'a, str> {
        if self != Dialect::Postgres || !sql.contains('?') {
            return Cow::Borrowed(sql);
        }
        Cow::Owned(number_placeholders(sql, 0, "$").0)
    }

    /// `SUM(expr)` as a BIGINT the `Any` driver can decode (PG sums to NUMERIC, MySQL to DECIMAL).
    pub fn sum_i64(self, expr: &str) -> String {
        match self {
            Dialect::MySql => format!("CAST(COALESCE(SUM({expr}), 0) AS SIGNED)"),
            Dialect::Sqlite | Dialect::Postgres => {
                format!("CAST(COALESCE(SUM({expr}), 0) AS BIGINT)")
            }
        }
    }

    /// Row-lock suffix for a `SELECT` inside a write transaction (SQLite locks the whole
    /// database at `BEGIN IMMEDIATE`, so it needs none).
    pub fn for_update(self) -> &'static str {
        match self {
            Dialect::Sqlite => "",
            Dialect::Postgres | Dialect::MySql => " FOR UPDATE",
        }
    }

    /// An `INSERT` that does nothing when the key already exists. `insert` is the whole
    /// `INSERT INTO t (..) VALUES (..)` statement; `key_column` any column of the conflicting key.
    pub fn insert_ignore(self, insert: &str, key_column: &str) -> String {
        match self {
            Dialect::Sqlite | Dialect::Postgres => format!("{insert} ON CONFLICT DO NOTHING"),
            // Not INSERT IGNORE: that would also turn real errors (truncation) into warnings.
            Dialect::MySql => {
                format!("{insert} ON DUPLICATE KEY UPDATE {key_column} = {key_column}")
            }
        }
    }

    /// An upsert that adds `add_columns` to the existing row and overwrites `set_columns`
    /// (keeping the old value when the new one is NULL).
    pub fn upsert_add(
        self,
        insert: &str,
        table: &str,
        key_columns: &[&str],
        add_columns: &[&str],
        set_columns: &[&str],
    ) -> String {
        let mut sets: Vec<String> = Vec::new();
        match self {
            Dialect::Sqlite | Dialect::Postgres => {
                for c in add_columns {
                    sets.push(format!("{c} = {table}.{c} + excluded.{c}"));
                }
                for c in set_columns {
                    sets.push(format!("{c} = COALESCE(excluded.{c}, {table}.{c})"));
                }
                format!(
                    "{insert} ON CONFLICT ({}) DO UPDATE SET {}",
                    key_columns.join(", "),
                    sets.join(", ")
                )
            }
            Dialect::MySql => {
                for c in add_columns {
                    sets.push(format!("{c} = {c} + VALUES({c})"));
                }
                for c in set_columns {
                    sets.push(format!("{c} = COALESCE(VALUES({c}), {c})"));
                }
                format!("{insert} ON DUPLICATE KEY UPDATE {}", sets.join(", "))
            }
        }
    }

    /// True when inserting with `RETURNING id` is the way to learn a generated key.
    pub fn has_returning(self) -> bool {
        matches!(self, Dialect::Sqlite | Dialect::Postgres)
    }
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct DbOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// SQLite only: how long a writer waits for another process's lock.
    pub busy_timeout: Duration,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(10),
            busy_timeout: Duration::from_secs(10),
        }
    }
}

/// The database handle: a connection pool plus its dialect. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    dialect: Dialect,
    /// SQLite: this process's one writer connection, behind its gate (see [`WriteTx`]).
    writer: Option<Arc<Mutex<Option<Conn>>>>,
    connect_options: AnyConnectOptions,
    /// SQLite: the database file the writer opens directly; None for an in-memory database
    /// (another connection would see another database), whose writer goes through sqlx.
    writer_file: Option<std::path::PathBuf>,
    busy_ms: u128,
    /// SQLite: the background WAL checkpoints, stopped with the last clone of this `Db`.
    _checkpointer: Option<Arc<AbortOnDrop>>,
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A write transaction.
///
/// On SQLite every write of the process goes through ONE connection, kept open between
/// transactions behind a gate: SQLite allows one writer at a time anyway, and queueing
/// writers here is much faster than letting them spin on the file lock (other processes
/// still wait, see [`DirectConn::begin_immediate`]). Keeping the same connection matters
/// too: a connection whose view of the file another connection changed must re-read every
/// page it cached, so rotating writes over the pool re-read the hot pages on nearly every
/// transaction. That connection is driven directly on the calling thread (see
/// [`direct`]). It begins with `BEGIN IMMEDIATE`, so a read followed by a write can never
/// hit the lock-upgrade deadlock. A transaction dropped unfinished closes the connection,
/// which rolls it back; the next one opens a fresh connection.
pub struct WriteTx {
    conn: Conn,
    /// SQLite: the writer's slot, where the connection goes back once the transaction ends.
    slot: Option<OwnedMutexGuard<Option<Conn>>>,
}

impl WriteTx {
    /// The connection to run statements on.
    pub fn conn(&mut self) -> &mut Conn {
        &mut self.conn
    }

    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.end("COMMIT").await
    }

    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.end("ROLLBACK").await
    }

    async fn end(self, statement: &str) -> Result<(), sqlx::Error> {
        let WriteTx { conn, slot } = self;
        match (conn, slot) {
            (Conn::Tx(tx), _) if statement == "COMMIT" => tx.commit().await,
            (Conn::Tx(tx), _) => tx.rollback().await,
            (mut conn, Some(mut slot)) => {
                // On failure the connection is dropped (closed: SQLite rolls back what is
                // left open) and the next transaction opens another.
                conn.execute(statement).await?;
                *slot = Some(conn);
                Ok(())
            }
            (_, None) => Err(sqlx::Error::Protocol(
                "a write transaction without its connection's slot".into(),
            )),
        }
    }

    /// Applies `writes`, then commits; on any failure the transaction is rolled back. On
    /// SQLite's writer the writes and the COMMIT go out in one call: through sqlx every
    /// call is a hand-off between threads (a futex wake-up each way).
    pub async fn commit_with(self, dialect: Dialect, mut writes: Batch) -> Result<(), CommitError> {
        match self {
            WriteTx {
                mut conn,
                slot: Some(mut slot),
            } if !writes.is_empty() => {
                writes.push("COMMIT", Vec::new());
                match writes.execute(dialect, &mut conn).await {
                    Ok(()) => {
                        *slot = Some(conn);
                        Ok(())
                    }
                    Err(e) => {
                        // A failed write or COMMIT leaves the transaction open: roll it back
                        // (or close the connection, which does).
                        let tx = WriteTx {
                            conn,
                            slot: Some(slot),
                        };
                        let _ = tx.rollback().await;
                        Err(CommitError::Writes(e))
                    }
                }
            }
            mut tx => {
                if let Err(e) = writes.execute(dialect, tx.conn()).await {
                    let _ = tx.rollback().await;
                    return Err(CommitError::Writes(e));
                }
                tx.commit().await.map_err(CommitError::Commit)
            }
        }
    }
}

/// Why [`WriteTx::commit_with`] failed. Nothing was committed either way.
#[derive(Debug)]
pub enum CommitError {
    /// A write failed (on SQLite's writer, also a failed COMMIT sent with them).
    Writes(sqlx::Error),
    /// The writes applied and the COMMIT failed.
    Commit(sqlx::Error),
}

impl Db {
    /// Connects with default pool settings. SQLite files (and their directory) are created.
    pub async fn connect(url: &str) -> Result<Db, StorageError> {
        Db::connect_with(url, DbOptions::default()).await
    }

    pub async fn connect_with(url: &str, options: DbOptions) -> Result<Db, StorageError> {
        sqlx::any::install_default_drivers();
        let dialect = Dialect::from_url(url)?;
        let url = match dialect {
            Dialect::Sqlite => prepare_sqlite_url(url)?,
            _ => url.to_string(),
        };
        let connect_options: AnyConnectOptions = url.parse()?;
        let connect_options = connect_options.disable_statement_logging();
        if dialect == Dialect::Sqlite {
            // WAL is a property of the file: set it once, not racing from every connection.
            let mut conn = AnyConnection::connect_with(&connect_options).await?;
            conn.execute("PRAGMA journal_mode=WAL").await?;
            conn.close().await?;
        }
        let busy_ms = options.busy_timeout.as_millis();
        let pool = AnyPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            // No ping before every checkout (a round trip per operation): a connection found
            // dead fails its operation with an I/O error, and ledger operations are
            // idempotent and retried.
            .test_before_acquire(false)
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    for statement in session_setup(dialect, busy_ms) {
                        conn.execute(statement.as_str()).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(connect_options.clone())
            .await?;
        let writer = (dialect == Dialect::Sqlite).then(|| Arc::new(Mutex::new(None)));
        let writer_file = match dialect {
            Dialect::Sqlite => sqlite_file(&url)?,
            _ => None,
        };
        let checkpointer = (dialect == Dialect::Sqlite).then(|| {
            let task = tokio::spawn(checkpoint_wal(pool.clone()));
            Arc::new(AbortOnDrop(task.abort_handle()))
        });
        Ok(Db {
            pool,
            dialect,
            writer,
            connect_options,
            writer_file,
            busy_ms,
            _checkpointer: checkpointer,
        })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// See [`Dialect::sql`].
    pub fn sql<'a>(&self, sql: &'a str) -> Cow<'a, str> {
        self.dialect.sql(sql)
    }

    /// Begins a write transaction (see [`WriteTx`]).
    pub async fn begin_write(&self) -> Result<WriteTx, sqlx::Error> {
        let Some(writer) = &self.writer else {
            let tx = self.pool.begin().await?;
            return Ok(WriteTx {
                conn: Conn::Tx(tx),
                slot: None,
            });
        };
        let mut slot = writer.clone().lock_owned().await;
        if self.pool.is_closed() {
            // Closed (shutting down): the writer connection closes with the pool.
            return Err(sqlx::Error::PoolClosed);
        }
        let mut conn = match slot.take() {
            Some(conn) => conn,
            None => self.connect_writer().await?,
        };
        // On failure the connection is dropped; the next transaction opens another.
        match &mut conn {
            Conn::Direct(direct) => direct.begin_immediate().await?,
            other => {
                other.execute("BEGIN IMMEDIATE").await?;
            }
        }
        Ok(WriteTx {
            conn,
            slot: Some(slot),
        })
    }

    /// A connection of its own for this process's writes (SQLite), set up like the pool's.
    async fn connect_writer(&self) -> Result<Conn, sqlx::Error> {
        // Checkpoints are [`checkpoint_wal`]'s job: the writer checkpoints itself only if
        // the WAL grows far past SQLite's default (the background job stopped, or fell
        // behind), so no commit waits for a checkpoint's copy and fsync in the normal case.
        let limit = WRITER_AUTOCHECKPOINT_PAGES;
        let mut setup = session_setup(self.dialect, self.busy_ms);
        setup.push(format!("PRAGMA wal_autocheckpoint = {limit}"));
        if let Some(file) = &self.writer_file {
            let busy = Duration::from_millis(self.busy_ms.try_into().unwrap_or(u64::MAX));
            return DirectConn::open(file, busy, &setup).map(Conn::Direct);
        }
        let mut conn = AnyConnection::connect_with(&self.connect_options).await?;
        for statement in setup {
            conn.execute(statement.as_str()).await?;
        }
        Ok(Conn::Sqlx(conn))
    }

    /// Applies pending migrations; safe to run concurrently from several processes and again.
    pub async fn migrate(&self) -> Result<schema::MigrationReport, StorageError> {
        schema::migrate(self).await
    }

    pub async fn close(&self) {
        if let Some(writer) = &self.writer {
            // The direct writer closes when dropped.
            if let Some(Conn::Sqlx(conn)) = writer.lock().await.take() {
                let _ = conn.close().await;
            }
        }
        self.pool.close().await;
    }
}

/// WAL pages at which the SQLite writer checkpoints by itself (SQLite's default is 1,000).
const WRITER_AUTOCHECKPOINT_PAGES: u32 = 20_000;

/// How often the WAL is checkpointed in the background.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);

/// SQLite: copies the WAL back into the database file from a reader connection every
/// [`CHECKPOINT_INTERVAL`] (passive: it never blocks the writer or readers), until the
/// pool closes. Left to SQLite, the commit that crosses 1,000 WAL pages runs the
/// checkpoint itself, and that call waits for the copy and an fsync: tens of ms in the
/// p99 of settlements. Once a checkpoint has copied everything, the writer starts the
/// WAL over from its beginning, so the file stays small.
async fn checkpoint_wal(pool: AnyPool) {
    let mut failures_logged = 0u32;
    loop {
        tokio::time::sleep(CHECKPOINT_INTERVAL).await;
        if pool.is_closed() {
            return;
        }
        if let Err(e) = pool.execute("PRAGMA wal_checkpoint(PASSIVE)").await {
            if pool.is_closed() {
                return;
            }
            // The writer still checkpoints past WRITER_AUTOCHECKPOINT_PAGES meanwhile.
            if failures_logged < 10 {
                failures_logged += 1;
                tracing::warn!(error = %e, "background WAL checkpoint failed");
            }
        }
    }
}

fn session_setup(dialect: Dialect, busy_ms: u128) -> Vec<String> {
    match dialect {
        Dialect::Sqlite => vec![
            format!("PRAGMA busy_timeout = {busy_ms}"),
            "PRAGMA synchronous = NORMAL".to_string(),
        ],
        // READ COMMITTED: no gap locks, so concurrent inserts of distinct keys do not deadlock.
        Dialect::MySql => vec![
            "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED".to_string(),
            "SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ZERO_DATE,NO_ENGINE_SUBSTITUTION'"
                .to_string(),
        ],
        Dialect::Postgres => vec![],
    }
}

/// The file a SQLite URL names; None for an in-memory database.
fn sqlite_file(url: &str) -> Result<Option<std::path::PathBuf>, StorageError> {
    use std::str::FromStr;
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?;
    let file = options.get_filename();
    let in_memory = file.as_os_str().is_empty()
        || file
            .to_str()
            .is_some_and(|f| f.starts_with(':') || f.contains("mode=memory"));
    Ok((!in_memory).then(|| file.to_path_buf()))
}

/// Adds `mode=rwc` (create if missing) and creates the parent directory of a file database.
fn prepare_sqlite_url(url: &str) -> Result<String, StorageError> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    if !path.is_empty() && !path.starts_with(':') {
        if let Some(dir) = Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|source| StorageError::CreateDir {
                path: dir.display().to_string(),
                source,
            })?;
        }
    }
    Ok(match query {
        Some(q) if q.contains("mode=") => url.to_string(),
        Some(_) => format!("{url}&mode=rwc"),
        None => format!("{url}?mode=rwc"),
    })
}

/// The URL without its password, for error messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// True for errors worth retrying the whole transaction: deadlocks, serialization
/// failures, lock timeouts and SQLite busy.
pub fn is_transient(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = error else {
        return false;
    };
    if let Some(mysql) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return matches!(mysql.number(), 1213 | 1205);
    }
    match db.code().as_deref() {
        // PostgreSQL serialization failure / deadlock detected.
        Some("40001") | Some("40P01") => true,
        // SQLite BUSY, LOCKED and their extended codes (BUSY_SNAPSHOT = 517, ...).
        Some(code) if is_sqlite_error(db.as_ref()) => {
            matches!(code.parse::<i64>().map(|c| c & 0xff), Ok(5) | Ok(6))
        }
        _ => false,
    }
}

fn is_sqlite_error(db: &dyn sqlx::error::DatabaseError) -> bool {
    db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some()
        || db.try_downcast_ref::<DirectSqliteError>().is_some()
}

/// True when the error is a unique / primary key violation.
pub fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Runs an `INSERT` (written without `RETURNING`) and returns the generated `id`.
pub async fn insert_returning_id<'q>(
    dialect: Dialect,
    conn: &mut Conn,
    query: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
) -> Result<i64, sqlx::Error> {
    if dialect.has_returning() {
        use sqlx::Row;
        let row = query.fetch_one(&mut *conn).await?;
        row.try_get::<i64, _>(0)
    } else {
        let result = query.execute(&mut *conn).await?;
        result
            .last_insert_id()
            .ok_or_else(|| sqlx::Error::Protocol("the database returned no insert id".into()))
    }
}

/// `sql` plus ` RETURNING id` where the dialect supports it (pair with [`insert_returning_id`]).
pub fn with_returning_id(dialect: Dialect, sql: &str) -> String {
    if dialect.has_returning() {
        format!("{sql} RETURNING id")
    } else {
        sql.to_string()
    }
}

/// A value bound to a [`Batch`] statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(Option<i64>),
    Text(Option<String>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(Some(v))
    }
}

impl From<Option<i64>> for Value {
    fn from(v: Option<i64>) -> Self {
        Value::Int(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(Some(v.to_string()))
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(Some(v))
    }
}

impl From<Option<String>> for Value {
    fn from(v: Option<String>) -> Self {
        Value::Text(v)
    }
}

impl From<Option<&str>> for Value {
    fn from(v: Option<&str>) -> Self {
        Value::Text(v.map(str::to_string))
    }
}

/// Write statements applied together at the end of a transaction, in as few round trips
/// as the dialect allows: one call per statement on SQLite's direct writer (no hand-off to
/// save), one multi-statement call on SQLite through sqlx, one statement of
/// data-modifying CTEs on PostgreSQL, one call per statement on MySQL. The statements must
/// not depend on each other's effects (PostgreSQL runs them on one snapshot) and must not
/// change the same row twice.
#[derive(Debug, Default)]
pub struct Batch {
    statements: Vec<(String, Vec<Value>)>,
    /// Merged statements (see [`Batch::merged`]) with many rows have a new text for nearly
    /// every group and are large once prepared: they are prepared for one use and not kept
    /// in the connection's statement cache. Small ones repeat (see [`CACHED_MERGE_ROWS`]).
    one_off: bool,
    /// Set by [`Batch::mergeable`]: may be merged before it runs.
    merge: bool,
}

impl Batch {
    /// Adds a statement written with `?` placeholders.
    pub fn push(&mut self, sql: impl Into<String>, values: Vec<Value>) {
        self.statements.push((sql.into(), values));
    }

    pub fn is_empty(&self) -> bool {
        self.statements.is_empty()
    }

    pub async fn execute(self, dialect: Dialect, conn: &mut Conn) -> Result<(), sqlx::Error> {
        if self.statements.is_empty() {
            return Ok(());
        }
        let batch = if self.merges_before_running(matches!(conn, Conn::Direct(_))) {
            self.merged()
        } else {
            self
        };
        if let Conn::Direct(direct) = conn {
            let statements = batch
                .statements
                .iter()
                .map(|(sql, values)| (sql.as_str(), any_values(values)));
            return direct.execute_each(statements, !batch.one_off);
        }
        batch.execute_combined(dialect, conn).await
    }

    async fn execute_combined(self, dialect: Dialect, conn: &mut Conn) -> Result<(), sqlx::Error> {
        let combined = match dialect {
            Dialect::MySql => {
                for (sql, values) in self.statements {
                    bind_values(sqlx::query(&sql).persistent(!self.one_off), values)
                        .execute(&mut *conn)
                        .await?;
                }
                return Ok(());
            }
            Dialect::Sqlite => {
                let sql: Vec<&str> = self.statements.iter().map(|(s, _)| s.as_str()).collect();
                sql.join(";\n")
            }
            Dialect::Postgres => {
                let parts: Vec<String> = self
                    .statements
                    .iter()
                    .enumerate()
                    .map(|(i, (s, _))| format!("w{i} AS ({s})"))
                    .collect();
                format!("WITH {} SELECT 1", parts.join(", "))
            }
        };
        let sql = dialect.sql(&combined);
        let values = self.statements.into_iter().flat_map(|(_, v)| v).collect();
        bind_values(sqlx::query(&sql).persistent(!self.one_off), values)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

/// Most values one merged statement binds (SQLite allows 32,766).
const MAX_MERGED_VALUES: usize = 30_000;

/// Most rows of any merged statement for a batch to stay in the statement cache. A
/// group at moderate load merges a few rows per statement, so the same texts come back
/// and preparing them anew cost about as much as running them (c16 in the full ledger
/// section, three rounds: 3,899 -> 4,624 pairs/s; peak RSS 21 -> 44 MB). Batches of many
/// rows (the filter's settlement batches) have a new text nearly every time and a large
/// prepared form: kept, they grew the sidecar to 0.8-1.6 GB.
const CACHED_MERGE_ROWS: usize = 8;

impl Batch {
    /// Moves `other`'s statements to the end of this batch.
    pub fn append(&mut self, other: Batch) {
        self.statements.extend(other.statements);
    }

    /// Marks the batch to be [merged](Batch::merged) when it runs, where merging pays (see
    /// [`Batch::merges_before_running`]). Statements pushed afterwards (a COMMIT) keep their
    /// place at the end.
    pub fn mergeable(mut self) -> Batch {
        self.merge = true;
        self
    }

    /// Whether a [mergeable](Batch::mergeable) batch is merged before it runs. On the
    /// direct writer a statement costs no hand-off, only its run, so merging pays only
    /// while the merged texts repeat and stay cached: a large merged text is parsed anew
    /// nearly every time and costs more than its statements run one by one from the cache
    /// (settlement batches of 100 calls, two interleaved pairs: 16,837 / 15,083 -> 19,946 /
    /// 19,839 per s), while groups of 8 hot-user authorizations ran ~10% slower unmerged.
    fn merges_before_running(&self, direct: bool) -> bool {
        self.merge && (!direct || self.most_rows_of_one_text() <= CACHED_MERGE_ROWS)
    }

    /// How many statements share the most common text.
    fn most_rows_of_one_text(&self) -> usize {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for (sql, _) in &self.statements {
            *counts.entry(sql.as_str()).or_default() += 1;
        }
        counts.into_values().max().unwrap_or(0)
    }

    /// The same writes in far fewer statements (SQLite): statements of the same text become
    /// one, an INSERT with a VALUES row each, an UPDATE joined to a VALUES list
    /// (`UPDATE .. FROM`, SQLite 3.33+). Every statement is a round trip's worth of work in
    /// sqlx's SQLite driver, so a group's writes cost a handful of statements, not several
    /// per call.
    ///
    /// Only for writes that read none of each other's rows (a group's settlements that share
    /// no account, see `ledger::prefetch`): statements of different texts may run in another
    /// order. UPDATEs of one text naming the same row twice are not merged (UPDATE .. FROM
    /// would apply one of them), and keep their order.
    pub fn merged(self) -> Batch {
        let mut shapes: Vec<(String, Vec<Vec<Value>>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for (sql, values) in self.statements {
            match index.get(&sql) {
                Some(&i) => shapes[i].1.push(values),
                None => {
                    index.insert(sql.clone(), shapes.len());
                    shapes.push((sql, vec![values]));
                }
            }
        }
        let most_rows = shapes.iter().map(|(_, rows)| rows.len()).max().unwrap_or(0);
        let mut merged = Batch {
            one_off: most_rows > CACHED_MERGE_ROWS,
            ..Batch::default()
        };
        for (sql, rows) in shapes {
            let statements = if rows.len() < 2 {
                None
            } else if sql.starts_with("INSERT INTO ") {
                merge_insert(&sql, &rows)
            } else if sql.starts_with("UPDATE ") {
                merge_update(&sql, &rows)
            } else {
                None
            };
            match statements {
                Some(statements) => merged.statements.extend(statements),
                None => merged
                    .statements
                    .extend(rows.into_iter().map(|values| (sql.clone(), values))),
            }
        }
        merged
    }
}

/// `INSERT INTO t (..) VALUES (..)[, (..)][ tail]` split into the part before the rows,
/// the rows and the tail (`ON CONFLICT ..`). None when the tail binds values.
fn split_insert(sql: &str) -> Option<(&str, &str, &str)> {
    let at = sql.find(" VALUES ")?;
    let (head, after) = (&sql[..at], &sql[at + " VALUES ".len()..]);
    let bytes = after.as_bytes();
    let mut end = 0;
    loop {
        let mut i = end;
        while bytes.get(i) == Some(&b' ') {
            i += 1;
        }
        if bytes.get(i) != Some(&b'(') {
            return None;
        }
        let mut depth = 0;
        let mut quoted = false;
        loop {
            match bytes.get(i)? {
                b'\'' => quoted = !quoted,
                b'(' if !quoted => depth += 1,
                b')' if !quoted => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        end = i + 1;
        let mut next = end;
        while bytes.get(next) == Some(&b' ') {
            next += 1;
        }
        if bytes.get(next) != Some(&b',') {
            break;
        }
        end = next + 1;
    }
    let (rows, tail) = after.split_at(end);
    (placeholders(tail) == 0).then_some((head, rows, tail))
}

fn merge_insert(sql: &str, rows: &[Vec<Value>]) -> Option<Vec<(String, Vec<Value>)>> {
    let (head, tuple, tail) = split_insert(sql)?;
    let per_statement = rows[0].len();
    if placeholders(tuple) != per_statement {
        return None;
    }
    let chunk = (MAX_MERGED_VALUES / per_statement.max(1)).max(1);
    let statements = rows
        .chunks(chunk)
        .map(|chunk| {
            let tuples = vec![tuple.trim(); chunk.len()].join(", ");
            (format!("{head} VALUES {tuples}{tail}"), chunk.concat())
        })
        .collect();
    Some(statements)
}

/// `UPDATE t SET .. WHERE ..` with the i-th placeholder read from column i of a VALUES
/// list, one row per statement. None for other shapes and when two statements name the
/// same row (the same values bound in WHERE).
fn merge_update(sql: &str, rows: &[Vec<Value>]) -> Option<Vec<(String, Vec<Value>)>> {
    let rest = sql.strip_prefix("UPDATE ")?;
    let (table, rest) = rest.split_once(" SET ")?;
    let (assignments, condition) = rest.split_once(" WHERE ")?;
    let lowered = rest.to_ascii_lowercase();
    if table.contains(' ') || lowered.contains("select") || lowered.contains(" from ") {
        return None;
    }
    let per_statement = rows[0].len();
    let in_condition = placeholders(condition);
    if placeholders(assignments) + in_condition != per_statement || in_condition == 0 {
        return None;
    }
    let mut keys = std::collections::HashSet::new();
    for row in rows {
        if !keys.insert(format!("{:?}", &row[per_statement - in_condition..])) {
            return None;
        }
    }
    let (assignments, last) = number_placeholders(assignments, 0, "v.column");
    let (condition, _) = number_placeholders(condition, last, "v.column");
    let tuple = format!("({})", vec!["?"; per_statement].join(", "));
    let chunk = (MAX_MERGED_VALUES / per_statement).max(1);
    let statements = rows
        .chunks(chunk)
        .map(|chunk| {
            let tuples = vec![tuple.as_str(); chunk.len()].join(", ");
            (
                format!(
                    "UPDATE {table} SET {assignments} FROM (VALUES {tuples}) AS v WHERE {condition}"
                ),
                chunk.concat(),
            )
        })
        .collect();
    Some(statements)
}

/// Placeholders (`?`) outside string literals.
fn placeholders(sql: &str) -> usize {
    number_placeholders(sql, 0, "").1
}

/// `sql` with each `?` outside string literals replaced by `prefix` and its number, counting
/// on from `after`; and the last number given.
fn number_placeholders(sql: &str, after: usize, prefix: &str) -> (String, usize) {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = after;
    let mut in_literal = false;
    for ch in sql.chars() {
        match ch {
            '\'' => {
                in_literal = !in_literal;
                out.push(ch);
            }
            '?' if !in_literal => {
                n += 1;
                out.push_str(prefix);
                out.push_str(&n.to_string());
            }
            _ => out.push(ch),
        }
    }
    (out, n)
}

/// Binds `values` in order to `query`.
/// `values` as the `Any` driver's arguments.
fn any_values(values: &[Value]) -> Vec<sqlx_core::any::AnyValueKind<'_>> {
    use sqlx::any::AnyTypeInfoKind;
    use sqlx_core::any::AnyValueKind;
    values
        .iter()
        .map(|value| match value {
            Value::Int(Some(v)) => AnyValueKind::BigInt(*v),
            Value::Int(None) => AnyValueKind::Null(AnyTypeInfoKind::BigInt),
            Value::Text(Some(v)) => AnyValueKind::Text(Cow::Borrowed(v.as_str())),
            Value::Text(None) => AnyValueKind::Null(AnyTypeInfoKind::Text),
        })
        .collect()
}

pub fn bind_values<'q>(
    mut query: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    values: Vec<Value>,
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>> {
    for value in values {
        query = match value {
            Value::Int(v) => query.bind(v),
            Value::Text(v) => query.bind(v),
        };
    }
    query
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_for_postgres_only() {
        let sql = "SELECT a FROM t WHERE b = ? AND c = '?' AND d = ?";
        assert_eq!(Dialect::Sqlite.sql(sql), sql);
        assert_eq!(
            Dialect::Postgres.sql(sql),
            "SELECT a FROM t WHERE b = $1 AND c = '?' AND d = $2"
        );
    }

    #[test]
    fn dialect_is_chosen_by_url_scheme() {
        assert_eq!(Dialect::from_url("sqlite://x.db").unwrap(), Dialect::Sqlite);
        assert_eq!(
            Dialect::from_url("postgres://h/db").unwrap(),
            Dialect::Postgres
        );
        assert_eq!(Dialect::from_url("mysql://h/db").unwrap(), Dialect::MySql);
        assert!(Dialect::from_url("oracle://h").is_err());
    }

    #[test]
    fn sqlite_url_gets_create_mode_and_directory() {
        let dir = std::env::temp_dir().join(format!("meter-url-{}", rand::random::<u32>()));
        let url = format!("sqlite://{}/sub/a.db", dir.display());
        let prepared = prepare_sqlite_url(&url).unwrap();
        assert!(prepared.ends_with("?mode=rwc"));
        assert!(dir.join("sub").is_dir());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("mysql://root:secret@h:3306/db"),
            "mysql://root:***@h:3306/db"
        );
        assert_eq!(redact_url("sqlite://a.db"), "sqlite://a.db");
    }

    #[tokio::test]
    async fn batches_apply_every_statement_on_every_backend() {
        for t in testing::each_backend().await {
            let mut batch = Batch::default();
            for code in ["a", "b"] {
                batch.push(
                    "INSERT INTO providers (code, name, status, created_at, updated_at) VALUES (?, ?, 'enabled', ?, ?)",
                    vec![code.into(), format!("provider {code}").into(), 1i64.into(), 2i64.into()],
                );
            }
            // On a pooled connection and in a write transaction (SQLite's direct writer).
            let mut conn = Conn::from(t.db.pool().acquire().await.unwrap());
            batch.execute(t.db.dialect(), &mut conn).await.unwrap();
            let n: i64 = sqlx::query("SELECT COUNT(*) FROM providers")
                .fetch_one(&mut conn)
                .await
                .map(|r| sqlx::Row::get(&r, 0))
                .unwrap();
            assert_eq!(n, 2, "{:?}", t.backend);
            drop(conn);
            let tx = t.db.begin_write().await.unwrap();
            let mut batch = Batch::default();
            batch.push(
                "UPDATE providers SET name = ? WHERE code = ?",
                vec!["renamed".into(), "a".into()],
            );
            batch.push("DELETE FROM providers WHERE code = ?", vec!["b".into()]);
            tx.commit_with(t.db.dialect(), batch).await.unwrap();
            let names: Vec<String> = sqlx::query("SELECT name FROM providers")
                .fetch_all(t.db.pool())
                .await
                .unwrap()
                .iter()
                .map(|r| sqlx::Row::get(r, 0))
                .collect();
            assert_eq!(names, ["renamed"], "{:?}", t.backend);
            t.cleanup().await;
        }
    }

    /// Merging keeps what a batch writes: same-text INSERTs (an upsert naming one key twice
    /// included) become one, UPDATEs of distinct rows one `UPDATE .. FROM`, and UPDATEs of
    /// one row twice stay apart and in order; a `?` inside a literal binds nothing.
    #[tokio::test]
    async fn merged_batches_write_what_their_statements_would() {
        let t = testing::fresh(Dialect::Sqlite).await;
        let mut tx = t.db.begin_write().await.unwrap();
        let conn = tx.conn();
        assert!(
            matches!(conn, Conn::Direct(_)),
            "SQLite writes go through the direct writer"
        );
        conn.execute("CREATE TABLE m (k TEXT PRIMARY KEY, n INTEGER NOT NULL, note TEXT)")
            .await
            .unwrap();
        let mut batch = Batch::default();
        for (k, n) in [("x", 1i64), ("y", 2), ("x", 3)] {
            batch.push(
                "INSERT INTO m (k, n, note) VALUES (?, ?, 'why?') \
                 ON CONFLICT (k) DO UPDATE SET n = m.n + excluded.n",
                vec![k.into(), n.into()],
            );
        }
        for (k, note) in [("x", "n1"), ("y", "n2")] {
            batch.push(
                "UPDATE m SET n = n * ?, note = ? WHERE k = ?",
                vec![10i64.into(), note.into(), k.into()],
            );
        }
        for by in [1i64, 2] {
            batch.push(
                "UPDATE m SET n = n - ? WHERE k = ?",
                vec![by.into(), "x".into()],
            );
        }
        let merged = batch.merged();
        let texts: Vec<&str> = merged.statements.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(texts.len(), 4, "{texts:#?}");
        assert!(texts[0].contains("VALUES (?, ?, 'why?'), (?, ?, 'why?'), (?, ?, 'why?') ON"));
        assert!(texts[1].contains("FROM (VALUES (?, ?, ?), (?, ?, ?)) AS v WHERE k = v.column3"));
        assert_eq!(texts[2], texts[3], "one row twice: not merged");
        merged.execute(Dialect::Sqlite, conn).await.unwrap();
        let rows: Vec<(String, i64, String)> = sqlx::query("SELECT k, n, note FROM m ORDER BY k")
            .fetch_all(&mut *conn)
            .await
            .unwrap()
            .iter()
            .map(|r| {
                use sqlx::Row;
                (r.get(0), r.get(1), r.get(2))
            })
            .collect();
        assert_eq!(
            rows,
            [("x".into(), 37, "n1".into()), ("y".into(), 20, "n2".into())]
        );
        tx.commit().await.unwrap();
        t.cleanup().await;
    }

    /// A merged batch of a few rows per statement is kept in the statement cache (its texts
    /// come back); one with more rows than [`CACHED_MERGE_ROWS`] in any statement is
    /// prepared for one use.
    #[test]
    fn only_small_merged_batches_are_cached() {
        let batch_of = |rows: usize| {
            let mut batch = Batch::default();
            for i in 0..rows {
                batch.push("INSERT INTO t (k) VALUES (?)", vec![(i as i64).into()]);
            }
            batch.push("UPDATE u SET n = n + 1 WHERE k = ?", vec!["x".into()]);
            batch.merged()
        };
        assert!(!batch_of(CACHED_MERGE_ROWS).one_off);
        assert!(batch_of(CACHED_MERGE_ROWS + 1).one_off);
        assert!(!Batch::default().merged().one_off);
    }

    /// The direct writer merges only batches whose merged texts stay cached; other
    /// drivers merge every mergeable batch. Merged or not, the writes are the same.
    #[tokio::test]
    async fn large_batches_run_unmerged_on_the_direct_writer() {
        let batch_of = |rows: i64| {
            let mut batch = Batch::default();
            for i in 0..rows {
                batch.push(
                    "INSERT INTO w (k, n) VALUES (?, ?)",
                    vec![i.into(), i.into()],
                );
                batch.push(
                    "UPDATE c SET n = n + ? WHERE k = ?",
                    vec![i.into(), (i % 2).into()],
                );
            }
            batch.mergeable()
        };
        let small = CACHED_MERGE_ROWS as i64;
        assert!(batch_of(small).merges_before_running(true));
        assert!(!batch_of(small + 1).merges_before_running(true));
        assert!(batch_of(small + 1).merges_before_running(false));
        assert!(!Batch::default().merges_before_running(false));

        let t = testing::fresh(Dialect::Sqlite).await;
        for rows in [small, 5 * small] {
            let mut tx = t.db.begin_write().await.unwrap();
            let conn = tx.conn();
            for ddl in [
                "DROP TABLE IF EXISTS w",
                "DROP TABLE IF EXISTS c",
                "CREATE TABLE w (k INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
                "CREATE TABLE c (k INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
                "INSERT INTO c VALUES (0, 0), (1, 0)",
            ] {
                conn.execute(ddl).await.unwrap();
            }
            tx.commit_with(Dialect::Sqlite, batch_of(rows))
                .await
                .unwrap();
            let (count, sum): (i64, i64) = sqlx::query_as("SELECT COUNT(*), SUM(n) FROM w")
                .fetch_one(t.db.pool())
                .await
                .unwrap();
            assert_eq!((count, sum), (rows, rows * (rows - 1) / 2));
            let (total,): (i64,) = sqlx::query_as("SELECT SUM(n) FROM c")
                .fetch_one(t.db.pool())
                .await
                .unwrap();
            assert_eq!(
                total,
                rows * (rows - 1) / 2,
                "every update applied, in order"
            );
        }
        t.cleanup().await;
    }

    async fn provider_count(db: &Db) -> i64 {
        sqlx::query("SELECT COUNT(*) FROM providers")
            .fetch_one(db.pool())
            .await
            .map(|r| sqlx::Row::get(&r, 0))
            .unwrap()
    }

    async fn insert_provider(tx: &mut WriteTx, code: &str) {
        let mut batch = Batch::default();
        batch.push(
            "INSERT INTO providers (code, name, status, created_at, updated_at) VALUES (?, ?, 'enabled', 1, 1)",
            vec![code.into(), code.into()],
        );
        batch.execute(Dialect::Sqlite, tx.conn()).await.unwrap();
    }

    /// SQLite's one writer connection outlives its transactions: committed writes are seen
    /// by the pool, a rolled-back or abandoned (dropped) transaction leaves nothing, and the
    /// next transaction still works; once the pool is closed no writer reconnects.
    #[tokio::test]
    async fn the_sqlite_writer_survives_rollbacks_and_abandoned_transactions() {
        let t = testing::fresh(Dialect::Sqlite).await;
        let mut tx = t.db.begin_write().await.unwrap();
        insert_provider(&mut tx, "kept").await;
        tx.commit().await.unwrap();
        assert_eq!(provider_count(&t.db).await, 1);

        let mut tx = t.db.begin_write().await.unwrap();
        insert_provider(&mut tx, "rolled-back").await;
        tx.rollback().await.unwrap();
        let mut tx = t.db.begin_write().await.unwrap();
        insert_provider(&mut tx, "abandoned").await;
        drop(tx);
        assert_eq!(provider_count(&t.db).await, 1);

        let mut tx = t.db.begin_write().await.unwrap();
        insert_provider(&mut tx, "after").await;
        tx.commit().await.unwrap();
        assert_eq!(provider_count(&t.db).await, 2);

        t.db.close().await;
        assert!(matches!(
            t.db.begin_write().await.err(),
            Some(sqlx::Error::PoolClosed)
        ));
        t.cleanup().await;
    }

    /// Pages the main SQLite file says it has (header bytes 28-31): it changes only when a
    /// checkpoint copies the WAL back into the file.
    fn pages_in_main_file(url: &str) -> u32 {
        let path = url.trim_start_matches("sqlite://");
        let bytes = std::fs::read(path).unwrap();
        u32::from_be_bytes([bytes[28], bytes[29], bytes[30], bytes[31]])
    }

    /// Commits never wait for a checkpoint below the writer's own high limit, yet the WAL
    /// reaches the database file within a few background intervals.
    #[tokio::test]
    async fn the_sqlite_wal_is_checkpointed_in_the_background() {
        let t = testing::fresh(Dialect::Sqlite).await;
        tokio::time::sleep(CHECKPOINT_INTERVAL * 2).await;
        let before = pages_in_main_file(&t.url);
        let mut tx = t.db.begin_write().await.unwrap();
        let mut batch = Batch::default();
        for i in 0..400 {
            batch.push(
                "INSERT INTO providers (code, name, status, created_at, updated_at) VALUES (?, ?, 'enabled', 1, 1)",
                vec![format!("p{i}").into(), "x".repeat(2000).into()],
            );
        }
        batch.execute(Dialect::Sqlite, tx.conn()).await.unwrap();
        tx.commit().await.unwrap();
        // Hundreds of pages, far below the writer's limit: only the background copies them.
        let mut after = before;
        for _ in 0..40 {
            tokio::time::sleep(CHECKPOINT_INTERVAL).await;
            after = pages_in_main_file(&t.url);
            if after > before + 200 {
                break;
            }
        }
        assert!(after > before + 200, "main file {before} -> {after} pages");
        t.cleanup().await;
    }

    #[test]
    fn upserts_add_per_dialect() {
        let ins = "INSERT INTO d (k, n) VALUES (?, ?)";
        let pg = Dialect::Postgres.upsert_add(ins, "d", &["k"], &["n"], &[]);
        assert!(pg.ends_with("ON CONFLICT (k) DO UPDATE SET n = d.n + excluded.n"));
        let my = Dialect::MySql.upsert_add(ins, "d", &["k"], &["n"], &[]);
        assert!(my.ends_with("ON DUPLICATE KEY UPDATE n = n + VALUES(n)"));
    }
}
