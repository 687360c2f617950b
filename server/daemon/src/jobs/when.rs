//! When a job runs: `at` (one time) and `every` (a recurrence), read in the server's time zone
//! (`TZ`, else `/etc/localtime`; DST-correct through `jiff`).
//!
//! `at`: `now`, `+30m` / `+2h` / `+1d` (from now), `HH:MM` (the next such time), a local date
//! and time `YYYY-MM-DD HH:MM[:SS]`, or RFC 3339 with an offset (`2026-12-06T02:00:00Z`).
//! `every`: `hourly[ :MM]`, `daily HH:MM`, or days and a time — `sun 02:00`,
//! `mon,wed,fri 23:30`, `weekdays 06:00`, `weekends 03:00` (full day names work too).

use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

/// Why a time could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WhenError(String);

/// A recurrence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Every {
    /// Each hour at this minute.
    Hourly { minute: i8 },
    /// At this time on these days (all seven for `daily`).
    Days { days: Vec<Weekday>, at: Time },
}

/// The server's time zone.
pub fn local_zone() -> TimeZone {
    TimeZone::system()
}

/// Reads an `at` time; `now` is when it is asked.
pub fn parse_at(raw: &str, now: Timestamp, tz: &TimeZone) -> Result<Timestamp, WhenError> {
    let s = raw.trim();
    if s.is_empty() || s.eq_ignore_ascii_case("now") {
        return Ok(now);
    }
    if let Some(rel) = s.strip_prefix('+') {
        return relative(rel, now);
    }
    if let Ok(t) = s.parse::<Timestamp>() {
        return Ok(t);
    }
    if let Ok(t) = parse_time(s) {
        return Ok(next_time_of_day(t, now, tz));
    }
    let civil = s
        .replace(' ', "T")
        .parse::<jiff::civil::DateTime>()
        .map_err(|_| {
            WhenError(format!(
                "cannot read the time {raw:?}: use now, +30m, HH:MM, YYYY-MM-DD HH:MM (server time) or RFC 3339 (2026-12-06T02:00:00Z)"
            ))
        })?;
    civil
        .to_zoned(tz.clone())
        .map(|z| z.timestamp())
        .map_err(|e| WhenError(format!("{raw:?}: {e}")))
}

/// `30m`, `2h`, `1d`, `90s`.
fn relative(rel: &str, now: Timestamp) -> Result<Timestamp, WhenError> {
    let bad = || WhenError(format!("cannot read +{rel}: use +90s, +30m, +2h or +1d"));
    let (n, unit) = rel.split_at(rel.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: i64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60).ok_or_else(bad)?,
        "h" => n.checked_mul(3600).ok_or_else(bad)?,
        "d" => n.checked_mul(86400).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    if secs > 366 * 86400 {
        return Err(WhenError(format!("+{rel} is more than a year away")));
    }
    now.checked_add(secs.seconds()).map_err(|_| bad())
}

/// `HH:MM` or `HH:MM:SS`.
fn parse_time(s: &str) -> Result<Time, WhenError> {
    let bad = || WhenError(format!("{s:?} is not a time of day (HH:MM)"));
    let parts: Vec<&str> = s.split(':').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty() || p.len() > 2) {
        return Err(bad());
    }
    let num = |p: &str| p.parse::<i8>().map_err(|_| bad());
    let sec = parts.get(2).map_or(Ok(0), |p| num(p))?;
    Time::new(num(parts[0])?, num(parts[1])?, sec, 0).map_err(|_| bad())
}

/// The first time after `now` that the clock shows `t`.
fn next_time_of_day(t: Time, now: Timestamp, tz: &TimeZone) -> Timestamp {
    let today = now.to_zoned(tz.clone()).date();
    (0..3)
        .filter_map(|d| at_on(today.checked_add(d.days()).ok()?, t, tz))
        .find(|ts| *ts > now)
        .unwrap_or(now)
}

/// `t` on `date` in `tz` (a time skipped by DST moves on, as `jiff` does by default).
fn at_on(date: Date, t: Time, tz: &TimeZone) -> Option<Timestamp> {
    date.to_datetime(t)
        .to_zoned(tz.clone())
        .ok()
        .map(|z| z.timestamp())
}

impl Every {
    /// Reads a recurrence.
    pub fn parse(raw: &str) -> Result<Every, WhenError> {
        let s = raw.trim().to_ascii_lowercase();
        let mut words = s.split_whitespace();
        let (Some(first), rest) = (words.next(), words.next()) else {
            return Err(WhenError(
                "every: give a recurrence such as \"sun 02:00\"".into(),
            ));
        };
        if words.next().is_some() {
            return Err(usage(raw));
        }
        if first == "hourly" {
            let minute = match rest {
                None => 0,
                Some(m) => m
                    .trim_start_matches(':')
                    .parse::<i8>()
                    .ok()
                    .filter(|m| (0..60).contains(m))
                    .ok_or_else(|| usage(raw))?,
            };
            return Ok(Every::Hourly { minute });
        }
        let at = parse_time(rest.ok_or_else(|| usage(raw))?)?;
        let days = days(first).ok_or_else(|| usage(raw))?;
        Ok(Every::Days { days, at })
    }

    /// The first occurrence strictly after `after`.
    pub fn next_after(&self, after: Timestamp, tz: &TimeZone) -> Timestamp {
        let start = after.to_zoned(tz.clone());
        match self {
            Every::Hourly { minute } => {
                // Whole hours from the start of the current hour; DST never skips one.
                let hour = after.as_second() - after.as_second().rem_euclid(3600);
                let offset = i64::from(*minute) * 60;
                let mut t = hour + offset;
                while t <= after.as_second() {
                    t += 3600;
                }
                Timestamp::from_second(t).unwrap_or(after)
            }
            Every::Days { days, at } => (0..9)
                .filter_map(|d| start.date().checked_add(d.days()).ok())
                .filter(|d| days.contains(&d.weekday()))
                .filter_map(|d| at_on(d, *at, tz))
                .find(|ts| *ts > after)
                .unwrap_or(after),
        }
    }

    /// The canonical spelling, as stored and shown.
    pub fn canonical(&self) -> String {
        match self {
            Every::Hourly { minute } => format!("hourly :{minute:02}"),
            Every::Days { days, at } => {
                let names: Vec<&str> = days.iter().map(|d| short(*d)).collect();
                let days = if days.len() == 7 {
                    "daily".to_string()
                } else {
                    names.join(",")
                };
                format!("{days} {:02}:{:02}", at.hour(), at.minute())
            }
        }
    }
}

fn usage(raw: &str) -> WhenError {
    WhenError(format!(
        "cannot read the recurrence {raw:?}: use hourly, hourly :MM, daily HH:MM, or days and a time (sun 02:00, mon,wed,fri 23:30, weekdays 06:00)"
    ))
}

const WEEK: [Weekday; 7] = [
    Weekday::Monday,
    Weekday::Tuesday,
    Weekday::Wednesday,
    Weekday::Thursday,
    Weekday::Friday,
    Weekday::Saturday,
    Weekday::Sunday,
];

fn short(d: Weekday) -> &'static str {
    ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        [WEEK.iter().position(|w| *w == d).unwrap_or(0)]
}

/// `daily`, `weekdays`, `weekends` or a comma list of day names, in week order.
fn days(s: &str) -> Option<Vec<Weekday>> {
    let picked: Vec<Weekday> = match s {
        "daily" => WEEK.to_vec(),
        "weekdays" => WEEK[..5].to_vec(),
        "weekends" => WEEK[5..].to_vec(),
        list => list
            .split(',')
            .map(|name| {
                WEEK.iter().copied().find(|d| {
                    let full = format!("{d:?}").to_ascii_lowercase();
                    name.len() >= 3 && full.starts_with(name)
                })
            })
            .collect::<Option<Vec<_>>>()?,
    };
    Some(
        WEEK.iter()
            .copied()
            .filter(|d| picked.contains(d))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc() -> TimeZone {
        TimeZone::UTC
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn at_reads_now_offsets_times_and_dates() {
        let now = ts("2026-12-01T10:15:00Z");
        assert_eq!(parse_at("now", now, &utc()).unwrap(), now);
        assert_eq!(
            parse_at("+30m", now, &utc()).unwrap(),
            ts("2026-12-01T10:45:00Z")
        );
        assert_eq!(
            parse_at("09:00", now, &utc()).unwrap(),
            ts("2026-12-02T09:00:00Z")
        );
        assert_eq!(
            parse_at("23:00", now, &utc()).unwrap(),
            ts("2026-12-01T23:00:00Z")
        );
        assert_eq!(
            parse_at("2026-12-06 02:00", now, &utc()).unwrap(),
            ts("2026-12-06T02:00:00Z")
        );
        assert_eq!(
            parse_at("2026-12-06T02:00:00+01:00", now, &utc()).unwrap(),
            ts("2026-12-06T01:00:00Z")
        );
        for bad in [
            "tomorrow",
            "+5x",
            "+99999d",
            "25:00",
            "2026-13-01 00:00",
            "+",
        ] {
            assert!(parse_at(bad, now, &utc()).is_err(), "{bad}");
        }
    }

    #[test]
    fn recurrences_find_their_next_time() {
        // 2026-12-01 is a Tuesday.
        let now = ts("2026-12-01T10:15:00Z");
        let sunday = Every::parse("Sunday 02:00").unwrap();
        assert_eq!(sunday.canonical(), "sun 02:00");
        assert_eq!(sunday.next_after(now, &utc()), ts("2026-12-06T02:00:00Z"));
        let at = sunday.next_after(now, &utc());
        assert_eq!(sunday.next_after(at, &utc()), ts("2026-12-13T02:00:00Z"));
        let daily = Every::parse("daily 10:15").unwrap();
        assert_eq!(daily.canonical(), "daily 10:15");
        assert_eq!(daily.next_after(now, &utc()), ts("2026-12-02T10:15:00Z"));
        let list = Every::parse("fri,mon 23:30").unwrap();
        assert_eq!(list.canonical(), "mon,fri 23:30");
        assert_eq!(list.next_after(now, &utc()), ts("2026-12-04T23:30:00Z"));
        assert_eq!(
            Every::parse("weekdays 06:00")
                .unwrap()
                .next_after(now, &utc()),
            ts("2026-12-02T06:00:00Z")
        );
        let hourly = Every::parse("hourly :20").unwrap();
        assert_eq!(hourly.next_after(now, &utc()), ts("2026-12-01T10:20:00Z"));
        assert_eq!(
            Every::parse("hourly").unwrap().next_after(now, &utc()),
            ts("2026-12-01T11:00:00Z")
        );
        for bad in [
            "",
            "sometimes",
            "sun",
            "su 02:00",
            "sun 2",
            "hourly 61",
            "sun 02:00 x",
        ] {
            assert!(Every::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_time_zone_with_daylight_saving_keeps_the_wall_clock() {
        let tz = TimeZone::get("Europe/Berlin").unwrap();
        let sunday = Every::parse("sun 02:30").unwrap();
        // 2027-03-28: clocks jump from 02:00 to 03:00 in Berlin; 02:30 does not exist.
        let before = ts("2027-03-27T12:00:00Z");
        let t = sunday.next_after(before, &tz);
        assert!(t > before && t < ts("2027-03-28T03:00:00Z"), "{t}");
        // A week later (summer time) 02:30 is 00:30 UTC.
        assert_eq!(sunday.next_after(t, &tz), ts("2027-04-04T00:30:00Z"));
    }
}
