//! A fresh, migrated ledger database per measurement: a SQLite file in the scratch
//! directory, a PostgreSQL database or a MariaDB database created for the run and dropped
//! afterwards. Server URLs: `BENCH_PG_URL` (default `postgres://postgres@127.0.0.1:5432/test`)
//! and `BENCH_MYSQL_URL` (default `mysql://root@127.0.0.1:3306/test`).

use std::path::Path;

use anyhow::{Context, Result};
use llm_meter_sidecar::storage::{Db, DbOptions};
use sqlx::{AnyConnection, ConnectOptions, Connection, Executor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    MariaDb,
}

impl Backend {
    pub fn label(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
            Backend::MariaDb => "MariaDB",
        }
    }
}

/// A database private to one measurement.
pub struct BenchDb {
    pub backend: Backend,
    pub url: String,
    drop_sql: Option<(String, String)>,
}

fn server_url(backend: Backend) -> String {
    match backend {
        Backend::Sqlite => String::new(),
        Backend::Postgres => std::env::var("BENCH_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
        Backend::MariaDb => std::env::var("BENCH_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into()),
    }
}

impl BenchDb {
    /// Create (and migrate) a fresh database; `dir` holds SQLite files.
    pub async fn create(backend: Backend, dir: &Path, label: &str) -> Result<BenchDb> {
        sqlx::any::install_default_drivers();
        let name = format!(
            "llm_meter_bench_{label}_{}_{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros())
                .unwrap_or(0)
        );
        let (url, drop_sql) = match backend {
            Backend::Sqlite => (
                format!(
                    "sqlite://{}?mode=rwc",
                    dir.join(format!("{name}.db")).display()
                ),
                None,
            ),
            Backend::Postgres | Backend::MariaDb => {
                let admin = server_url(backend);
                execute(&admin, &format!("CREATE DATABASE {name}"))
                    .await
                    .with_context(|| format!("{} at {admin}", backend.label()))?;
                let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
                let drop = match backend {
                    Backend::Postgres => format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                    _ => format!("DROP DATABASE IF EXISTS {name}"),
                };
                (format!("{base}/{name}"), Some((admin.clone(), drop)))
            }
        };
        let db = BenchDb {
            backend,
            url,
            drop_sql,
        };
        let pool = db.connect(DbOptions::default()).await?;
        pool.migrate().await.context("migrate the bench database")?;
        pool.close().await;
        Ok(db)
    }

    pub async fn connect(&self, options: DbOptions) -> Result<Db> {
        Db::connect_with(&self.url, options)
            .await
            .with_context(|| format!("connect {}", self.backend.label()))
    }

    /// Drop the server database (SQLite files go with the scratch directory).
    pub async fn drop_database(self) {
        if crate::procs::keep_scratch() {
            eprintln!("bench: kept database {}", self.url);
            return;
        }
        if let Some((admin, sql)) = self.drop_sql {
            if let Err(e) = execute(&admin, &sql).await {
                eprintln!("bench: could not drop a bench database ({sql}): {e:#}");
            }
        }
    }
}

async fn execute(url: &str, sql: &str) -> Result<()> {
    let options: sqlx::any::AnyConnectOptions = url.parse()?;
    let mut conn = AnyConnection::connect_with(&options.disable_statement_logging()).await?;
    conn.execute(sql).await?;
    let _ = conn.close().await;
    Ok(())
}
