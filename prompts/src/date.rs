//! `strftime_now(format)`: Python's `datetime.now().strftime(format)` in the C locale.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// A calendar date (proleptic Gregorian).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Date {
    pub year: i32,
    pub month: u32,
    pub day: u32,
}

impl Date {
    pub(crate) fn midnight(self) -> DateTime {
        DateTime {
            date: self,
            hour: 0,
            minute: 0,
            second: 0,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct DateTime {
    date: Date,
    hour: u32,
    minute: u32,
    second: u32,
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> Date {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    Date {
        year: year as i32,
        month,
        day,
    }
}

fn days_from_civil(d: Date) -> i64 {
    let y = i64::from(d.year) - i64::from(d.month <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(d.month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d.day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The current time in UTC.
pub(crate) fn now_utc() -> DateTime {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let date = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400) as u32;
    DateTime {
        date,
        hour: s / 3600,
        minute: s / 60 % 60,
        second: s % 60,
    }
}

const DAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// `strftime(format)` for a naive datetime as CPython on glibc formats it in the C locale
/// (`%z` and `%Z` are empty for a naive datetime; the `-` flag drops padding).
pub(crate) fn strftime(format: &str, t: &DateTime) -> String {
    let d = t.date;
    let days = days_from_civil(d);
    let wday = (days + 4).rem_euclid(7) as usize; // 0 = Sunday
    let yday =
        days - days_from_civil(Date {
            year: d.year,
            month: 1,
            day: 1,
        }) + 1;
    let month_name = MONTHS[(d.month.clamp(1, 12) - 1) as usize];
    let hour12 = if t.hour.is_multiple_of(12) { 12 } else { t.hour % 12 };
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let mut no_pad = false;
        if spec == Some('-') {
            no_pad = true;
            spec = chars.next();
        }
        let num = |out: &mut String, n: i64, width: usize| {
            if no_pad {
                let _ = write!(out, "{n}");
            } else {
                let _ = write!(out, "{n:0width$}");
            }
        };
        match spec {
            Some('a') => out.push_str(&DAYS[wday][..3]),
            Some('A') => out.push_str(DAYS[wday]),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('c') => {
                let _ = write!(
                    out,
                    "{} {} {:>2} {:02}:{:02}:{:02} {}",
                    &DAYS[wday][..3],
                    &month_name[..3],
                    d.day,
                    t.hour,
                    t.minute,
                    t.second,
                    d.year
                );
            }
            Some('C') => num(&mut out, i64::from(d.year) / 100, 2),
            Some('d') => num(&mut out, i64::from(d.day), 2),
            Some('D') | Some('x') => {
                let _ = write!(out, "{:02}/{:02}/{:02}", d.month, d.day, d.year.rem_euclid(100));
            }
            Some('e') => {
                let _ = if no_pad {
                    write!(out, "{}", d.day)
                } else {
                    write!(out, "{:>2}", d.day)
                };
            }
            Some('f') => out.push_str("000000"),
            Some('F') => {
                let _ = write!(out, "{}-{:02}-{:02}", d.year, d.month, d.day);
            }
            Some('H') => num(&mut out, i64::from(t.hour), 2),
            Some('I') => num(&mut out, i64::from(hour12), 2),
            Some('j') => num(&mut out, yday, 3),
            Some('k') => {
                let _ = write!(out, "{:>2}", t.hour);
            }
            Some('l') => {
                let _ = write!(out, "{hour12:>2}");
            }
            Some('m') => num(&mut out, i64::from(d.month), 2),
            Some('M') => num(&mut out, i64::from(t.minute), 2),
            Some('n') => out.push('\n'),
            Some('p') => out.push_str(if t.hour < 12 { "AM" } else { "PM" }),
            Some('P') => out.push_str(if t.hour < 12 { "am" } else { "pm" }),
            Some('r') => {
                let _ = write!(
                    out,
                    "{hour12:02}:{:02}:{:02} {}",
                    t.minute,
                    t.second,
                    if t.hour < 12 { "AM" } else { "PM" }
                );
            }
            Some('R') => {
                let _ = write!(out, "{:02}:{:02}", t.hour, t.minute);
            }
            Some('S') => num(&mut out, i64::from(t.second), 2),
            Some('t') => out.push('\t'),
            Some('T') | Some('X') => {
                let _ = write!(out, "{:02}:{:02}:{:02}", t.hour, t.minute, t.second);
            }
            Some('u') => {
                let _ = write!(out, "{}", if wday == 0 { 7 } else { wday });
            }
            Some('w') => {
                let _ = write!(out, "{wday}");
            }
            Some('y') => num(&mut out, i64::from(d.year.rem_euclid(100)), 2),
            Some('Y') => {
                let _ = write!(out, "{}", d.year);
            }
            Some('z') | Some('Z') => {}
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_python() {
        let t = Date {
            year: 2024,
            month: 7,
            day: 26,
        }
        .midnight();
        assert_eq!(strftime("%d %b %Y", &t), "26 Jul 2024");
        assert_eq!(strftime("%B %d, %Y", &t), "July 26, 2024");
        assert_eq!(strftime("%Y-%m-%d %A %j %-d%%", &t), "2024-07-26 Friday 208 26%");
        assert_eq!(
            civil_from_days(days_from_civil(Date {
                year: 2000,
                month: 2,
                day: 29
            }))
            .day,
            29
        );
    }
}
