//! Running the service: connect and migrate the database, start the ledger, the background
//! jobs and the HTTP server, and shut all of it down gracefully on SIGTERM/SIGINT.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{router, AppState, AuthSecrets};
use crate::config::ServeSettings;
use crate::jobs::{JobSettings, Jobs};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::storage::{redact_url, Db};

/// Serve until `shutdown` resolves, then stop accepting, finish in-flight requests (at most
/// `shutdown_grace`), stop the jobs and close the database.
pub async fn serve(
    settings: ServeSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let db = Db::connect(&settings.database_url).await.map_err(|err| {
        anyhow::anyhow!("cannot open {}: {err}", redact_url(&settings.database_url))
    })?;
    let report = db.migrate().await?;
    tracing::info!(schema_version = report.current, applied = ?report.applied, "database ready");
    let listener = TcpListener::bind(settings.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, timezone = %settings.timezone, "llm-meter sidecar listening");
    serve_on(listener, db, &settings, shutdown).await
}

/// [`serve`] on an already bound listener and connected database (tests bind port 0).
pub async fn serve_on(
    listener: TcpListener,
    db: Db,
    settings: &ServeSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let ledger = Ledger::new(db.clone(), settings.ledger.clone());
    let metrics = Arc::new(Metrics::new());
    let state = AppState {
        db: db.clone(),
        ledger: ledger.clone(),
        auth: Arc::new(AuthSecrets {
            shared_secret: settings.shared_secret.clone(),
            admin_token: settings.admin_token.clone(),
        }),
        metrics: metrics.clone(),
        timezone: settings.timezone,
    };
    let jobs = Jobs::spawn(
        Arc::new(ledger),
        JobSettings {
            timezone: settings.timezone,
            sweep_interval: settings.sweep_interval,
        },
        metrics,
    );

    // One signal starts both the graceful shutdown and the grace timer.
    let (stopping_tx, mut stopping_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutdown requested; finishing in-flight requests");
        let _ = stopping_tx.send(true);
    });
    let mut graceful_rx = stopping_rx.clone();
    let server = axum::serve(listener, router(state)).with_graceful_shutdown(async move {
        let _ = graceful_rx.wait_for(|stopping| *stopping).await;
    });
    let grace = settings.shutdown_grace;
    let served = tokio::select! {
        served = server => served.map_err(anyhow::Error::from),
        _ = async {
            let _ = stopping_rx.wait_for(|stopping| *stopping).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(grace_secs = grace.as_secs(), "in-flight requests did not finish in time; stopping anyway");
            Ok(())
        }
    };
    jobs.shutdown().await;
    db.close().await;
    tracing::info!("stopped");
    served
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
}
