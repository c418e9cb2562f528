//! Calendar buckets in `APP_TZ`: the day `2026-11-27` and the month `2026-11`.
//! Days follow DST (23 h and 25 h days); reset instants are the next local
//! midnight and the first of the next month, as UTC instants.

use std::sync::{
    atomic::{AtomicI64, Ordering},
    Arc,
};

use chrono::{DateTime, Datelike, Days, LocalResult, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

/// The two periods an instant falls into, with their bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Periods {
    /// `YYYY-MM-DD`
    pub day: String,
    /// `YYYY-MM`
    pub month: String,
    pub day_start: DateTime<Utc>,
    pub day_reset: DateTime<Utc>,
    pub month_start: DateTime<Utc>,
    pub month_reset: DateTime<Utc>,
}

/// The first instant of a local calendar date. Midnight can fall into a DST
/// gap in some zones (e.g. America/Santiago); then the day starts at the first
/// local time that exists.
pub fn start_of(date: NaiveDate, tz: Tz) -> DateTime<Utc> {
    let mut t = date.and_hms_opt(0, 0, 0).expect("midnight exists");
    for _ in 0..4 {
        match tz.from_local_datetime(&t) {
            LocalResult::Single(d) => return d.with_timezone(&Utc),
            LocalResult::Ambiguous(a, _) => return a.with_timezone(&Utc),
            LocalResult::None => t += chrono::Duration::minutes(30),
        }
    }
    Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).expect("midnight exists"))
}

fn first_of_next_month(d: NaiveDate) -> NaiveDate {
    let (y, m) = if d.month() == 12 { (d.year() + 1, 1) } else { (d.year(), d.month() + 1) };
    NaiveDate::from_ymd_opt(y, m, 1).expect("first of month exists")
}

pub fn periods(now: DateTime<Utc>, tz: Tz) -> Periods {
    let date = now.with_timezone(&tz).date_naive();
    let month_first = date.with_day(1).expect("first of month exists");
    let next_day = date.checked_add_days(Days::new(1)).expect("date in range");
    Periods {
        day: date.format("%Y-%m-%d").to_string(),
        month: date.format("%Y-%m").to_string(),
        day_start: start_of(date, tz),
        day_reset: start_of(next_day, tz),
        month_start: start_of(month_first, tz),
        month_reset: start_of(first_of_next_month(date), tz),
    }
}

/// `2026-11-28 00:00 Europe/Berlin`
pub fn local_display(t: DateTime<Utc>, tz: Tz) -> String {
    format!("{} {}", t.with_timezone(&tz).format("%Y-%m-%d %H:%M"), tz.name())
}

/// Where "now" comes from; tests turn the hands.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that stands still until set.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn new(at: DateTime<Utc>) -> Self {
        ManualClock(Arc::new(AtomicI64::new(at.timestamp_micros())))
    }
    pub fn set(&self, at: DateTime<Utc>) {
        self.0.store(at.timestamp_micros(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(self.0.load(Ordering::SeqCst)).expect("valid instant")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::Europe::Berlin;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn ordinary_day_in_berlin_winter() {
        let p = periods(utc("2026-11-27T21:49:00Z"), Berlin);
        assert_eq!(p.day, "2026-11-27");
        assert_eq!(p.month, "2026-11");
        assert_eq!(p.day_start, utc("2026-11-26T23:00:00Z"));
        assert_eq!(p.day_reset, utc("2026-11-27T23:00:00Z"));
        assert_eq!(p.month_start, utc("2026-10-31T23:00:00Z"));
        assert_eq!(p.month_reset, utc("2026-11-30T23:00:00Z"));
        assert_eq!(local_display(p.day_reset, Berlin), "2026-11-28 00:00 Europe/Berlin");
    }

    #[test]
    fn late_utc_evening_is_already_tomorrow_in_berlin() {
        let p = periods(utc("2026-11-27T23:30:00Z"), Berlin);
        assert_eq!(p.day, "2026-11-28");
    }

    #[test]
    fn spring_forward_day_has_23_hours() {
        let p = periods(utc("2026-03-29T12:00:00Z"), Berlin);
        assert_eq!(p.day, "2026-03-29");
        assert_eq!(p.day_start, utc("2026-03-28T23:00:00Z"));
        assert_eq!(p.day_reset, utc("2026-03-29T22:00:00Z"));
        assert_eq!((p.day_reset - p.day_start).num_hours(), 23);
        // the instant before the switch (01:59:59 CET) and after (03:00 CEST) are the same day
        assert_eq!(periods(utc("2026-03-29T00:59:59Z"), Berlin).day, "2026-03-29");
        assert_eq!(periods(utc("2026-03-29T01:00:00Z"), Berlin).day, "2026-03-29");
        assert_eq!(periods(utc("2026-03-29T21:59:59Z"), Berlin).day, "2026-03-29");
        assert_eq!(periods(utc("2026-03-29T22:00:00Z"), Berlin).day, "2026-03-30");
    }

    #[test]
    fn fall_back_day_has_25_hours() {
        let p = periods(utc("2026-10-25T12:00:00Z"), Berlin);
        assert_eq!(p.day, "2026-10-25");
        assert_eq!(p.day_start, utc("2026-10-24T22:00:00Z"));
        assert_eq!(p.day_reset, utc("2026-10-25T23:00:00Z"));
        assert_eq!((p.day_reset - p.day_start).num_hours(), 25);
        // 02:30 happens twice; both are 2026-10-25
        assert_eq!(periods(utc("2026-10-25T00:30:00Z"), Berlin).day, "2026-10-25");
        assert_eq!(periods(utc("2026-10-25T01:30:00Z"), Berlin).day, "2026-10-25");
        assert_eq!(periods(utc("2026-10-25T22:59:59Z"), Berlin).day, "2026-10-25");
        assert_eq!(periods(utc("2026-10-25T23:00:00Z"), Berlin).day, "2026-10-26");
    }

    #[test]
    fn month_end_and_year_end() {
        let p = periods(utc("2026-12-31T22:59:59Z"), Berlin);
        assert_eq!((p.day.as_str(), p.month.as_str()), ("2026-12-31", "2026-12"));
        assert_eq!(p.day_reset, utc("2026-12-31T23:00:00Z"));
        assert_eq!(p.month_reset, utc("2026-12-31T23:00:00Z"));
        let p = periods(utc("2026-12-31T23:00:00Z"), Berlin);
        assert_eq!((p.day.as_str(), p.month.as_str()), ("2027-01-01", "2027-01"));
        assert_eq!(p.month_start, utc("2026-12-31T23:00:00Z"));
        assert_eq!(p.month_reset, utc("2027-01-31T23:00:00Z"));
        // February in a non-leap year, and a month that starts in summer time and ends in winter time
        let p = periods(utc("2027-02-15T12:00:00Z"), Berlin);
        assert_eq!(p.month_reset, utc("2027-02-28T23:00:00Z"));
        let p = periods(utc("2026-10-15T12:00:00Z"), Berlin);
        assert_eq!(p.month_start, utc("2026-09-30T22:00:00Z"));
        assert_eq!(p.month_reset, utc("2026-10-31T23:00:00Z"));
        // March: starts in winter time, resets in summer time
        let p = periods(utc("2026-03-15T12:00:00Z"), Berlin);
        assert_eq!(p.month_reset, utc("2026-03-31T22:00:00Z"));
    }

    #[test]
    fn other_zones_and_utc() {
        let p = periods(utc("2026-11-27T12:00:00Z"), chrono_tz::UTC);
        assert_eq!(p.day_reset, utc("2026-11-28T00:00:00Z"));
        let p = periods(utc("2026-11-27T12:00:00Z"), chrono_tz::America::New_York);
        assert_eq!(p.day_reset, utc("2026-11-28T05:00:00Z"));
        // Santiago springs forward at local midnight (2026-09-06): the day starts at 01:00 local
        let p = periods(utc("2026-09-06T12:00:00Z"), chrono_tz::America::Santiago);
        assert_eq!(p.day, "2026-09-06");
        assert_eq!(p.day_start, utc("2026-09-06T04:00:00Z"));
    }

    #[test]
    fn manual_clock_turns() {
        let c = ManualClock::new(utc("2026-11-27T10:00:00Z"));
        assert_eq!(c.now(), utc("2026-11-27T10:00:00Z"));
        c.set(utc("2026-11-28T10:00:00Z"));
        assert_eq!(c.now(), utc("2026-11-28T10:00:00Z"));
    }
}
