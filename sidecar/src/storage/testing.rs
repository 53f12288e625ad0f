//! Test support: fresh, migrated databases on every backend, each in its own SQLite file,
//! PostgreSQL schema or MySQL database, so tests run in parallel and repeatedly.
//!
//! Server URLs come from `METER_TEST_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`) and `METER_TEST_MYSQL_URL` (default
//! `mysql://root@127.0.0.1:3306/test`). `METER_TEST_BACKENDS=sqlite,postgres,mysql` limits the
//! set. An unreachable server fails the test: backends are never skipped silently.
//!
//! Not for production use (it panics on setup failure, which is what a test wants).

use sqlx::{AnyConnection, ConnectOptions, Connection, Executor};

use super::{Db, DbOptions, Dialect};

/// A migrated database private to one test.
pub struct TestDb {
    pub db: Db,
    pub backend: Dialect,
    /// URL of this private database (connect more pools to it with [`TestDb::another_process`]).
    pub url: String,
    cleanup: Cleanup,
}

enum Cleanup {
    File(std::path::PathBuf),
    Schema { admin_url: String, name: String },
    Database { admin_url: String, name: String },
}

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const DEFAULT_MYSQL_URL: &str = "mysql://root@127.0.0.1:3306/test";

/// Backends selected by `METER_TEST_BACKENDS` (all three by default).
pub fn selected_backends() -> Vec<Dialect> {
    let wanted = std::env::var("METER_TEST_BACKENDS").unwrap_or_default();
    let all = [Dialect::Sqlite, Dialect::Postgres, Dialect::MySql];
    if wanted.trim().is_empty() {
        return all.to_vec();
    }
    all.into_iter()
        .filter(|d| {
            let name = match d {
                Dialect::Sqlite => "sqlite",
                Dialect::Postgres => "postgres",
                Dialect::MySql => "mysql",
            };
            wanted.split(',').any(|w| w.trim() == name)
        })
        .collect()
}

/// One fresh migrated database per selected backend.
pub async fn each_backend() -> Vec<TestDb> {
    let mut dbs = Vec::new();
    for backend in selected_backends() {
        dbs.push(fresh(backend).await);
    }
    dbs
}

fn unique_name() -> String {
    format!("t_{:016x}", rand::random::<u64>())
}

/// A fresh migrated database on `backend`.
pub async fn fresh(backend: Dialect) -> TestDb {
    fresh_with(backend, DbOptions::default()).await
}

pub async fn fresh_with(backend: Dialect, options: DbOptions) -> TestDb {
    let name = unique_name();
    let (url, cleanup) = match backend {
        Dialect::Sqlite => {
            let path = std::env::temp_dir().join(format!("llm-meter-{name}.db"));
            (format!("sqlite://{}", path.display()), Cleanup::File(path))
        }
        Dialect::Postgres => {
            let admin_url = std::env::var("METER_TEST_PG_URL").unwrap_or(DEFAULT_PG_URL.into());
            admin_execute(&admin_url, &format!("CREATE SCHEMA {name}")).await;
            let separator = if admin_url.contains('?') { '&' } else { '?' };
            let url = format!("{admin_url}{separator}options[search_path]={name}");
            (url, Cleanup::Schema { admin_url, name })
        }
        Dialect::MySql => {
            let admin_url =
                std::env::var("METER_TEST_MYSQL_URL").unwrap_or(DEFAULT_MYSQL_URL.into());
            admin_execute(&admin_url, &format!("CREATE DATABASE {name}")).await;
            let base = admin_url
                .rsplit_once('/')
                .map(|(b, _)| b)
                .unwrap_or(&admin_url);
            (
                format!("{base}/{name}"),
                Cleanup::Database { admin_url, name },
            )
        }
    };
    let db = Db::connect_with(&url, options)
        .await
        .unwrap_or_else(|e| panic!("connect {backend:?} test database: {e}"));
    db.migrate()
        .await
        .unwrap_or_else(|e| panic!("migrate {backend:?} test database: {e}"));
    TestDb {
        db,
        backend,
        url,
        cleanup,
    }
}

async fn admin_execute(admin_url: &str, sql: &str) {
    sqlx::any::install_default_drivers();
    let options: sqlx::any::AnyConnectOptions = admin_url
        .parse()
        .unwrap_or_else(|e| panic!("bad test database URL {admin_url}: {e}"));
    let mut conn = AnyConnection::connect_with(&options.disable_statement_logging())
        .await
        .unwrap_or_else(|e| {
            panic!("test database at {admin_url} is unreachable ({e}); set METER_TEST_BACKENDS to skip it explicitly")
        });
    conn.execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let _ = conn.close().await;
}

impl TestDb {
    /// Another pool on the same database, as a second sidecar process would have.
    pub async fn another_process(&self) -> Db {
        self.another_process_with(DbOptions::default()).await
    }

    pub async fn another_process_with(&self, options: DbOptions) -> Db {
        Db::connect_with(&self.url, options)
            .await
            .unwrap_or_else(|e| panic!("connect second pool: {e}"))
    }

    /// Closes the pool and drops the private database.
    pub async fn cleanup(self) {
        self.db.close().await;
        match self.cleanup {
            Cleanup::File(path) => {
                for suffix in ["", "-wal", "-shm"] {
                    let mut p = path.clone().into_os_string();
                    p.push(suffix);
                    let _ = std::fs::remove_file(p);
                }
            }
            Cleanup::Schema { admin_url, name } => {
                admin_execute(&admin_url, &format!("DROP SCHEMA {name} CASCADE")).await;
            }
            Cleanup::Database { admin_url, name } => {
                admin_execute(&admin_url, &format!("DROP DATABASE {name}")).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Row;

    #[tokio::test]
    async fn migrations_apply_once_on_every_backend() {
        for t in each_backend().await {
            let again = t.db.migrate().await.unwrap();
            assert!(
                again.applied.is_empty(),
                "{:?}: second run applied {:?}",
                t.backend,
                again.applied
            );
            assert_eq!(again.current, super::super::schema::latest_version());
            let row = sqlx::query("SELECT measure FROM quota_types WHERE code = 'text_token'")
                .fetch_one(t.db.pool())
                .await
                .unwrap();
            assert_eq!(row.get::<String, _>(0), "total_tokens");
            let sum = t.db.dialect().sum_i64("balance");
            let row = sqlx::query(&format!("SELECT {sum} FROM ledger_accounts"))
                .fetch_one(t.db.pool())
                .await
                .unwrap();
            assert_eq!(row.get::<i64, _>(0), 0, "{:?}", t.backend);
            t.cleanup().await;
        }
    }

    /// MySQL commits each DDL statement: a migration interrupted after adding a column runs
    /// again over it (PostgreSQL uses IF NOT EXISTS; SQLite's migration is one transaction).
    #[tokio::test]
    async fn the_lease_columns_migration_runs_again_over_itself() {
        for t in each_backend().await {
            if t.backend == Dialect::Sqlite {
                t.cleanup().await;
                continue;
            }
            sqlx::query("DELETE FROM schema_migrations WHERE version = 3")
                .execute(t.db.pool())
                .await
                .unwrap();
            let again = t.db.migrate().await.unwrap();
            assert_eq!(again.applied, [3], "{:?}", t.backend);
            let row = sqlx::query("SELECT COUNT(*) FROM ledger_holds WHERE kind = 'call'")
                .fetch_one(t.db.pool())
                .await
                .unwrap();
            assert_eq!(row.get::<i64, _>(0), 0);
            t.cleanup().await;
        }
    }

    #[tokio::test]
    async fn concurrent_migrations_from_two_processes_agree() {
        for t in each_backend().await {
            let other = t.another_process().await;
            let (a, b) = tokio::join!(t.db.migrate(), other.migrate());
            assert!(a.unwrap().applied.is_empty() && b.unwrap().applied.is_empty());
            other.close().await;
            t.cleanup().await;
        }
    }
}
