//! When the monthly reset is due: pure calendar arithmetic in the configured time zone.
//!
//! A reset period is a calendar month in the configured zone; its reset is due from 00:00
//! on the 1st of that month (local time). Periods are written `YYYY-MM`.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, LocalResult, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

/// The most missed periods one catch-up runs; a longer outage is a case for an operator.
pub const MAX_CATCH_UP_PERIODS: usize = 24;

/// A calendar month in the reset time zone.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period {
    year: i32,
    month: u32,
}

impl Period {
    pub fn new(year: i32, month: u32) -> Option<Self> {
        (1..=12).contains(&month).then_some(Period { year, month })
    }

    pub fn year(self) -> i32 {
        self.year
    }

    pub fn month(self) -> u32 {
        self.month
    }

    /// The period `instant` falls in, seen from `tz`.
    pub fn containing(instant: DateTime<Utc>, tz: Tz) -> Self {
        let local = instant.with_timezone(&tz);
        Period {
            year: local.year(),
            month: local.month(),
        }
    }

    pub fn next(self) -> Self {
        if self.month == 12 {
            Period {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Period {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    pub fn previous(self) -> Self {
        if self.month == 1 {
            Period {
                year: self.year - 1,
                month: 12,
            }
        } else {
            Period {
                year: self.year,
                month: self.month - 1,
            }
        }
    }

    /// The instant the period starts: 00:00 on its 1st in `tz`. Where a zone skips local
    /// midnight (a DST jump), the period starts at the first local instant after the gap.
    pub fn starts_at(self, tz: Tz) -> DateTime<Utc> {
        let Some(midnight) =
            NaiveDate::from_ymd_opt(self.year, self.month, 1).and_then(|d| d.and_hms_opt(0, 0, 0))
        else {
            return DateTime::<Utc>::MIN_UTC;
        };
        let mut local = midnight;
        // DST gaps are at most a few hours; step forward by minutes until a valid local time.
        for _ in 0..(24 * 60) {
            match tz.from_local_datetime(&local) {
                LocalResult::Single(at) => return at.with_timezone(&Utc),
                LocalResult::Ambiguous(earliest, _) => return earliest.with_timezone(&Utc),
                LocalResult::None => local += chrono::Duration::minutes(1),
            }
        }
        midnight.and_utc()
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid period {0:?}: expected YYYY-MM")]
pub struct InvalidPeriod(pub String);

impl FromStr for Period {
    type Err = InvalidPeriod;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidPeriod(raw.to_string());
        let (year, month) = raw.split_once('-').ok_or_else(invalid)?;
        if year.len() != 4 || month.len() != 2 {
            return Err(invalid());
        }
        let year: i32 = year.parse().map_err(|_| invalid())?;
        let month: u32 = month.parse().map_err(|_| invalid())?;
        Period::new(year, month).ok_or_else(invalid)
    }
}

/// The periods whose reset is due at `now` and has not run, oldest first.
///
/// - Nothing ran yet (fresh ledger): only the current period — history before the ledger
///   existed has nothing to reset.
/// - Otherwise every period after the last completed one up to the current one: the
///   sidecar may have been down at 00:00 on the 1st, or for several months (capped at
///   [`MAX_CATCH_UP_PERIODS`], keeping the newest).
pub fn due_periods(last_completed: Option<Period>, now: DateTime<Utc>, tz: Tz) -> Vec<Period> {
    let current = Period::containing(now, tz);
    let Some(last) = last_completed else {
        return vec![current];
    };
    let mut due = Vec::new();
    let mut period = last.next();
    while period <= current {
        due.push(period);
        period = period.next();
    }
    if due.len() > MAX_CATCH_UP_PERIODS {
        due.drain(..due.len() - MAX_CATCH_UP_PERIODS);
    }
    due
}

/// The next instant strictly after `now` at which a reset becomes due.
pub fn next_reset_at(now: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
    Period::containing(now, tz).next().starts_at(tz)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Timelike;
    use chrono_tz::{Asia, UTC};

    fn utc(raw: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(raw)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn p(raw: &str) -> Period {
        raw.parse().unwrap()
    }

    #[test]
    fn period_boundary_follows_the_configured_zone() {
        // 2025-01-31T16:30Z is 00:30 on Feb 1st in Shanghai (UTC+8), still January in UTC.
        let now = utc("2025-01-31T16:30:00Z");
        assert_eq!(Period::containing(now, Asia::Shanghai), p("2025-02"));
        assert_eq!(Period::containing(now, UTC), p("2025-01"));
        assert_eq!(
            p("2025-02").starts_at(Asia::Shanghai),
            utc("2025-01-31T16:00:00Z")
        );
    }

    #[test]
    fn nothing_is_due_when_the_current_period_already_ran() {
        let now = utc("2025-03-15T12:00:00Z");
        assert!(due_periods(Some(p("2025-03")), now, Asia::Shanghai).is_empty());
    }

    #[test]
    fn the_new_period_is_due_from_local_midnight_on_the_first() {
        let tz = Asia::Shanghai;
        let just_before = utc("2025-03-31T15:59:59Z");
        let at_midnight = utc("2025-03-31T16:00:00Z");
        assert!(due_periods(Some(p("2025-03")), just_before, tz).is_empty());
        assert_eq!(
            due_periods(Some(p("2025-03")), at_midnight, tz),
            vec![p("2025-04")]
        );
    }

    #[test]
    fn missed_periods_are_caught_up_oldest_first() {
        let now = utc("2025-03-02T00:00:00Z");
        assert_eq!(
            due_periods(Some(p("2024-12")), now, Asia::Shanghai),
            vec![p("2025-01"), p("2025-02"), p("2025-03")]
        );
    }

    #[test]
    fn a_fresh_ledger_runs_only_the_current_period() {
        let now = utc("2025-07-09T08:00:00Z");
        assert_eq!(due_periods(None, now, Asia::Shanghai), vec![p("2025-07")]);
    }

    #[test]
    fn catch_up_is_capped_keeping_the_newest() {
        let now = utc("2025-06-15T00:00:00Z");
        let due = due_periods(Some(p("2019-01")), now, UTC);
        assert_eq!(due.len(), MAX_CATCH_UP_PERIODS);
        assert_eq!(due.last(), Some(&p("2025-06")));
    }

    #[test]
    fn next_reset_crosses_the_year() {
        let now = utc("2025-12-20T00:00:00Z");
        assert_eq!(
            next_reset_at(now, Asia::Shanghai),
            utc("2025-12-31T16:00:00Z")
        );
        assert!(next_reset_at(now, UTC) > now);
    }

    #[test]
    fn a_skipped_local_midnight_starts_after_the_gap() {
        // Paraguay moved clocks from 00:00 to 01:00 on 2023-10-01: that midnight never existed.
        let tz = chrono_tz::America::Asuncion;
        let midnight = NaiveDate::from_ymd_opt(2023, 10, 1)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap();
        assert!(matches!(
            tz.from_local_datetime(&midnight),
            LocalResult::None
        ));
        let start = p("2023-10").starts_at(tz).with_timezone(&tz);
        assert_eq!((start.day(), start.hour(), start.minute()), (1, 1, 0));
    }

    #[test]
    fn period_parsing_rejects_nonsense() {
        assert!("2025-13".parse::<Period>().is_err());
        assert!("2025-1".parse::<Period>().is_err());
        assert!("abc".parse::<Period>().is_err());
        assert_eq!(p("2025-01").previous(), p("2024-12"));
        assert_eq!(p("2025-01").to_string(), "2025-01");
    }
}
