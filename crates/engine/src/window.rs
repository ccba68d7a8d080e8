//! Maintenance windows: is one open now, and when does it next open.

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use leasehold_api::{MaintenanceWindow, Weekday};

/// `(open_now, next_opening)` for `window` at `now` (UTC). No window: always open.
pub fn window_state(
    window: Option<&MaintenanceWindow>,
    now: Timestamp,
) -> (bool, Option<Timestamp>) {
    let Some(w) = window else {
        return (true, None);
    };
    let Some((h, m)) = w.start.split_once(':') else {
        return (true, None);
    };
    let (Ok(h), Ok(m)) = (h.parse::<i8>(), m.parse::<i8>()) else {
        return (true, None);
    };
    let length = SignedDuration::try_from(std::time::Duration::from(w.duration))
        .unwrap_or(SignedDuration::ZERO);
    let today = now.to_zoned(TimeZone::UTC).date();
    let mut next: Option<Timestamp> = None;
    for offset in -8i32..=8 {
        let Ok(day) = today.checked_add(jiff::Span::new().days(offset)) else {
            continue;
        };
        let weekday = match day.weekday() {
            jiff::civil::Weekday::Monday => Weekday::Monday,
            jiff::civil::Weekday::Tuesday => Weekday::Tuesday,
            jiff::civil::Weekday::Wednesday => Weekday::Wednesday,
            jiff::civil::Weekday::Thursday => Weekday::Thursday,
            jiff::civil::Weekday::Friday => Weekday::Friday,
            jiff::civil::Weekday::Saturday => Weekday::Saturday,
            jiff::civil::Weekday::Sunday => Weekday::Sunday,
        };
        if !w.days.is_empty() && !w.days.contains(&weekday) {
            continue;
        }
        let Ok(open) = day
            .at(h, m, 0, 0)
            .to_zoned(TimeZone::UTC)
            .map(|z| z.timestamp())
        else {
            continue;
        };
        let Ok(close) = open.checked_add(length) else {
            continue;
        };
        if open <= now && now < close {
            return (true, None);
        }
        if open > now && next.is_none_or(|n| open < n) {
            next = Some(open);
        }
    }
    (false, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_inside_and_next_opening_outside() {
        let w = MaintenanceWindow {
            days: vec![Weekday::Saturday],
            start: "02:00".into(),
            duration: std::time::Duration::from_secs(7200).into(),
        };
        // 2026-11-28 is a Saturday.
        let inside: Timestamp = "2026-11-28T03:00:00Z".parse().unwrap();
        assert_eq!(window_state(Some(&w), inside), (true, None));
        let before: Timestamp = "2026-11-26T12:00:00Z".parse().unwrap();
        let want: Timestamp = "2026-11-28T02:00:00Z".parse().unwrap();
        assert_eq!(window_state(Some(&w), before), (false, Some(want)));
        assert_eq!(window_state(None, before), (true, None));
    }
}
