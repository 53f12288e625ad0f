//! `llm-meter-sidecar`: the ledger service next to Envoy.
//!
//! Subcommands: `serve` (default), `migrate`, `reconcile` (exit 1 on drift), `seed-demo`.
//! Every setting is a flag or an environment variable; see `--help`.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use llm_meter_sidecar::api::server;
use llm_meter_sidecar::catalog::demo;
use llm_meter_sidecar::config::{Cli, Command, LogFormat, SettingsArgs};
use llm_meter_sidecar::ledger::Ledger;
use llm_meter_sidecar::storage::{redact_url, Db};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.settings.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let command = cli.command.clone().unwrap_or(Command::Serve);
    let log_format = cli.settings.log_format;
    match runtime.block_on(run(command, cli.settings)) {
        Ok(code) => code,
        Err(err) => {
            match log_format {
                LogFormat::Json => tracing::error!(error = format!("{err:#}"), "failed"),
                LogFormat::Text => eprintln!("error: {err:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, settings: SettingsArgs) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve => {
            let serve_settings = match settings.serve_settings() {
                Ok(serve_settings) => serve_settings,
                Err(err) => {
                    eprintln!("error: {err}");
                    return Ok(ExitCode::from(2));
                }
            };
            server::serve(serve_settings, server::shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let db = connect(&settings).await?;
            let report = db.migrate().await?;
            println!(
                "schema at version {} (applied now: {:?})",
                report.current, report.applied
            );
            db.close().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Reconcile => {
            let db = connect(&settings).await?;
            db.migrate().await?;
            let ledger = Ledger::new(db.clone(), settings.ledger_config());
            let report = ledger.reconcile().await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            db.close().await;
            Ok(if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::SeedDemo => {
            let db = connect(&settings).await?;
            db.migrate().await?;
            let ledger = Ledger::new(db.clone(), settings.ledger_config());
            let seeded = demo::seed(&ledger).await?;
            println!("{}", serde_json::to_string_pretty(&seeded)?);
            db.close().await;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn connect(settings: &SettingsArgs) -> anyhow::Result<Db> {
    Db::connect(&settings.database_url)
        .await
        .map_err(|err| anyhow::anyhow!("cannot open {}: {err}", redact_url(&settings.database_url)))
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only on a terminal: logs collected from a pipe or a file stay plain.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
