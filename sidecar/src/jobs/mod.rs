//! Background work inside the sidecar: the monthly reset (00:00 on the 1st in the configured
//! time zone, with catch-up of missed periods on start) and the periodic hold and lot
//! expiry sweeps. Every job stops when shutdown is signalled.
//!
//! The jobs drive a [`JobTarget`] (the ledger in production); the ledger's idempotency makes
//! running a period twice harmless, so the scheduler only has to make sure nothing is missed.

mod ledger_target;
pub mod schedule;

pub use ledger_target::{last_completed_period, run_monthly_reset, RESET_COMPLETED};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use schedule::{due_periods, next_reset_at, Period};

use crate::metrics::Metrics;

/// Longest single sleep of the reset job: it re-reads the clock at least this often, so a
/// wall-clock jump (NTP, suspended VM) delays a reset by at most this much.
const MAX_RESET_SLEEP: Duration = Duration::from_secs(300);

/// What the jobs act on. Implemented by the ledger; tests use a recorder.
pub trait JobTarget: Send + Sync + 'static {
    /// The newest period whose monthly reset completed, if any.
    fn last_reset_period(&self) -> impl Future<Output = anyhow::Result<Option<Period>>> + Send;
    /// Run the monthly reset of `period`; running it again must change nothing.
    fn monthly_reset(
        &self,
        period: Period,
        now: DateTime<Utc>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Release holds whose TTL passed; returns how many.
    fn expire_holds(&self, now: DateTime<Utc>) -> impl Future<Output = anyhow::Result<u64>> + Send;
    /// Expire lots past their `expires_at`; returns how many.
    fn expire_lots(&self, now: DateTime<Utc>) -> impl Future<Output = anyhow::Result<u64>> + Send;
}

#[derive(Clone, Debug)]
pub struct JobSettings {
    pub timezone: Tz,
    pub sweep_interval: Duration,
}

/// Running jobs; [`Jobs::shutdown`] stops them and waits until they are done.
pub struct Jobs {
    stop: watch::Sender<bool>,
    handles: Vec<JoinHandle<()>>,
}

impl Jobs {
    pub fn spawn<T: JobTarget>(
        target: Arc<T>,
        settings: JobSettings,
        metrics: Arc<Metrics>,
    ) -> Jobs {
        let (stop, stopped) = watch::channel(false);
        let reset = tokio::spawn(reset_loop(
            target.clone(),
            settings.timezone,
            metrics.clone(),
            stopped.clone(),
        ));
        let sweep = tokio::spawn(sweep_loop(
            target,
            settings.sweep_interval,
            metrics,
            stopped,
        ));
        Jobs {
            stop,
            handles: vec![reset, sweep],
        }
    }

    /// Signal every job to stop and wait for the one in progress to finish its step.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for handle in self.handles {
            if let Err(err) = handle.await {
                tracing::error!(error = %err, "background job ended abnormally");
            }
        }
    }
}

/// Run every due period's reset (catch-up included), oldest first. Stops at the first
/// failure so a later period never runs before an earlier one; the next tick retries.
pub async fn run_due_resets<T: JobTarget>(
    target: &T,
    now: DateTime<Utc>,
    tz: Tz,
    metrics: &Metrics,
) -> Vec<Period> {
    let last = match target.last_reset_period().await {
        Ok(last) => last,
        Err(err) => {
            metrics.observe_job("monthly_reset", "error");
            tracing::error!(error = %err, "monthly reset: cannot read the last completed period");
            return Vec::new();
        }
    };
    let mut done = Vec::new();
    for period in due_periods(last, now, tz) {
        match target.monthly_reset(period, now).await {
            Ok(()) => {
                metrics.observe_job("monthly_reset", "ok");
                tracing::info!(%period, "monthly reset done");
                done.push(period);
            }
            Err(err) => {
                metrics.observe_job("monthly_reset", "error");
                tracing::error!(%period, error = %err, "monthly reset failed; will retry");
                break;
            }
        }
    }
    done
}

async fn reset_loop<T: JobTarget>(
    target: Arc<T>,
    tz: Tz,
    metrics: Arc<Metrics>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let now = Utc::now();
        let done = run_due_resets(target.as_ref(), now, tz, &metrics).await;
        let failed_or_pending = done.is_empty() && needs_retry(target.as_ref(), now, tz).await;
        let sleep = if failed_or_pending {
            Duration::from_secs(60)
        } else {
            until(next_reset_at(now, tz), now).min(MAX_RESET_SLEEP)
        };
        if wait_or_stop(&mut stopped, sleep).await {
            return;
        }
    }
}

/// Whether a due reset is still outstanding (it failed), so the loop retries soon.
async fn needs_retry<T: JobTarget>(target: &T, now: DateTime<Utc>, tz: Tz) -> bool {
    match target.last_reset_period().await {
        Ok(last) => !due_periods(last, now, tz).is_empty(),
        Err(_) => true,
    }
}

async fn sweep_loop<T: JobTarget>(
    target: Arc<T>,
    interval: Duration,
    metrics: Arc<Metrics>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        run_sweeps(target.as_ref(), Utc::now(), &metrics).await;
        if wait_or_stop(&mut stopped, interval).await {
            return;
        }
    }
}

/// One pass of the hold-TTL and lot-expiry sweeps.
pub async fn run_sweeps<T: JobTarget>(target: &T, now: DateTime<Utc>, metrics: &Metrics) {
    match target.expire_holds(now).await {
        Ok(count) => {
            metrics.observe_job("expire_holds", "ok");
            if count > 0 {
                tracing::info!(count, "expired holds released");
            }
        }
        Err(err) => {
            metrics.observe_job("expire_holds", "error");
            tracing::error!(error = %err, "hold expiry sweep failed");
        }
    }
    match target.expire_lots(now).await {
        Ok(count) => {
            metrics.observe_job("expire_lots", "ok");
            if count > 0 {
                tracing::info!(count, "lots expired");
            }
        }
        Err(err) => {
            metrics.observe_job("expire_lots", "error");
            tracing::error!(error = %err, "lot expiry sweep failed");
        }
    }
}

fn until(at: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (at - now)
        .to_std()
        .unwrap_or(Duration::ZERO)
        .max(Duration::from_millis(10))
}

/// Sleep `duration` unless shutdown comes first; true when the job must stop.
async fn wait_or_stop(stopped: &mut watch::Receiver<bool>, duration: Duration) -> bool {
    if *stopped.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(duration) => *stopped.borrow(),
        changed = stopped.changed() => changed.is_err() || *stopped.borrow(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what the jobs asked for and keeps the last completed period like a ledger.
    #[derive(Default)]
    struct Recorder {
        last: Mutex<Option<Period>>,
        resets: Mutex<Vec<Period>>,
        fail_period: Option<Period>,
        sweeps: Mutex<u32>,
    }

    impl JobTarget for Recorder {
        async fn last_reset_period(&self) -> anyhow::Result<Option<Period>> {
            Ok(*self.last.lock().unwrap())
        }
        async fn monthly_reset(&self, period: Period, _now: DateTime<Utc>) -> anyhow::Result<()> {
            if Some(period) == self.fail_period {
                anyhow::bail!("database unavailable");
            }
            self.resets.lock().unwrap().push(period);
            *self.last.lock().unwrap() = Some(period);
            Ok(())
        }
        async fn expire_holds(&self, _now: DateTime<Utc>) -> anyhow::Result<u64> {
            *self.sweeps.lock().unwrap() += 1;
            Ok(0)
        }
        async fn expire_lots(&self, _now: DateTime<Utc>) -> anyhow::Result<u64> {
            Ok(0)
        }
    }

    fn p(raw: &str) -> Period {
        raw.parse().unwrap()
    }

    fn at(raw: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(raw)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[tokio::test]
    async fn catch_up_runs_missed_periods_once() {
        let target = Recorder {
            last: Mutex::new(Some(p("2025-01"))),
            ..Default::default()
        };
        let metrics = Metrics::new();
        let now = at("2025-03-05T00:00:00Z");
        let first = run_due_resets(&target, now, chrono_tz::Asia::Shanghai, &metrics).await;
        assert_eq!(first, vec![p("2025-02"), p("2025-03")]);
        let second = run_due_resets(&target, now, chrono_tz::Asia::Shanghai, &metrics).await;
        assert!(second.is_empty());
        assert_eq!(
            *target.resets.lock().unwrap(),
            vec![p("2025-02"), p("2025-03")]
        );
    }

    #[tokio::test]
    async fn a_failed_period_stops_later_ones() {
        let target = Recorder {
            last: Mutex::new(Some(p("2025-01"))),
            fail_period: Some(p("2025-02")),
            ..Default::default()
        };
        let metrics = Metrics::new();
        let done = run_due_resets(
            &target,
            at("2025-03-05T00:00:00Z"),
            chrono_tz::UTC,
            &metrics,
        )
        .await;
        assert!(done.is_empty());
        assert!(target.resets.lock().unwrap().is_empty());
        assert!(metrics
            .render()
            .contains("job=\"monthly_reset\",result=\"error\""));
    }

    #[tokio::test]
    async fn jobs_catch_up_on_start_and_stop_on_shutdown() {
        let target = Arc::new(Recorder::default());
        let settings = JobSettings {
            timezone: chrono_tz::UTC,
            sweep_interval: Duration::from_millis(20),
        };
        let jobs = Jobs::spawn(target.clone(), settings, Arc::new(Metrics::new()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        tokio::time::timeout(Duration::from_secs(5), jobs.shutdown())
            .await
            .unwrap();
        assert_eq!(
            *target.resets.lock().unwrap(),
            vec![Period::containing(Utc::now(), chrono_tz::UTC)]
        );
        let sweeps = *target.sweeps.lock().unwrap();
        assert!(sweeps >= 2, "sweeps ran {sweeps} times");
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(
            *target.sweeps.lock().unwrap(),
            sweeps,
            "a sweep ran after shutdown"
        );
    }
}
