//! Cron expressions of a schedule entry: parsing (5 fields, or 6 with seconds first), the fire
//! times in the entry's time zone, and the translations to systemd `OnCalendar=` and to a
//! Kubernetes CronJob `schedule`. Fire times come from `croner`, which handles DST gaps and
//! folds; the translations are built from the same parsed fields so all three agree.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

/// A parsed cron expression bound to a time zone.
#[derive(Debug, Clone)]
pub struct CronSpec {
    /// As written in the schedule file.
    pub text: String,
    pub tz: Tz,
    /// Whether the expression has a seconds field (6 fields).
    pub has_seconds: bool,
    cron: Cron,
}

/// The weekday names systemd uses, indexed like cron (0 = Sunday).
const SYSTEMD_DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];

impl CronSpec {
    pub fn parse(text: &str, tz: Tz) -> Result<Self, String> {
        let trimmed = text.trim();
        let fields = trimmed.split_whitespace().count();
        if !trimmed.starts_with('@') && !(5..=6).contains(&fields) {
            return Err(format!(
                "`{trimmed}` has {fields} field{}; a cron expression has 5 (minute hour day-of-month month day-of-week) or 6 (seconds first)",
                if fields == 1 { "" } else { "s" }
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(trimmed)
            .map_err(|e| format!("`{trimmed}` is not a cron expression: {e}"))?;
        Ok(Self {
            text: trimmed.to_owned(),
            tz,
            has_seconds: fields == 6,
            cron,
        })
    }

    /// The first fire time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The last fire time at or before `t`.
    pub fn latest_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&t.with_timezone(&self.tz), true)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The next `n` fire times after `t`.
    pub fn upcoming(&self, t: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut cursor = t;
        while out.len() < n {
            match self.next_after(cursor) {
                Some(next) => {
                    out.push(next);
                    cursor = next;
                }
                None => break,
            }
        }
        out
    }

    /// The shortest gap between consecutive fire times over the next few of them: what
    /// "one period" means for an irregular expression.
    pub fn shortest_gap(&self, from: DateTime<Utc>) -> Option<chrono::Duration> {
        let times = self.upcoming(from, 32);
        times.windows(2).map(|w| w[1] - w[0]).min()
    }

    fn refuse_modifiers(&self, target: &str) -> Result<(), String> {
        let p = &self.cron.pattern;
        if p.days.has_modifiers() || p.days_of_week.has_modifiers() {
            return Err(format!(
                "`{}` uses `L`, `W` or `#`, which {target} cannot express",
                self.text
            ));
        }
        Ok(())
    }

    /// `OnCalendar=` values for systemd (several lines are a union). Cron matches a day when
    /// its day of month *or* its weekday matches (when both are restricted); systemd matches
    /// both at once, so that case becomes two lines.
    pub fn on_calendar(&self) -> Result<Vec<String>, String> {
        self.refuse_modifiers("systemd `OnCalendar=`")?;
        let p = &self.cron.pattern;
        let time = format!(
            "{}:{}:{}",
            systemd_list(&p.hours.values(), 0, 23),
            systemd_list(&p.minutes.values(), 0, 59),
            systemd_list(&p.seconds.values(), 0, 59),
        );
        let months = systemd_list(&p.months.values(), 1, 12);
        let days = systemd_list(&p.days.values(), 1, 31);
        let weekdays = systemd_weekdays(&p.days_of_week.values());
        let tz = self.tz.name();
        let line = |dow: Option<&str>, dom: &str| {
            let prefix = dow.map(|d| format!("{d} ")).unwrap_or_default();
            format!("{prefix}*-{months}-{dom} {time} {tz}")
        };
        let dom_star = p.is_dom_wildcard();
        let dow_star = p.is_dow_wildcard();
        Ok(if p.matches_dom_and_dow() {
            vec![line(weekdays.as_deref(), &days)]
        } else if dom_star && dow_star {
            vec![line(None, "*")]
        } else if dow_star {
            vec![line(None, &days)]
        } else if dom_star {
            vec![line(weekdays.as_deref(), "*")]
        } else {
            vec![line(None, &days), line(weekdays.as_deref(), "*")]
        })
    }

    /// The 5-field `schedule` of a Kubernetes CronJob (its time zone goes in `timeZone`).
    /// Fields are written out from the parsed values so the Kubernetes parser reads exactly
    /// what `runbook schedule run` fires.
    pub fn cronjob_schedule(&self) -> Result<String, String> {
        let p = &self.cron.pattern;
        if self.has_seconds && p.seconds.values() != [0] {
            return Err(format!(
                "`{}` fires at seconds other than 0; Kubernetes CronJob schedules have minute resolution",
                self.text
            ));
        }
        self.refuse_modifiers("a Kubernetes CronJob schedule")?;
        if p.matches_dom_and_dow() {
            return Err(format!(
                "`{}` requires day of month and weekday to match together (`+`), which a Kubernetes CronJob schedule cannot express",
                self.text
            ));
        }
        // A restricted day field must stay restricted (even when it lists every value), or
        // the day-of-month/weekday "either matches" rule would change meaning.
        let dom = if p.is_dom_wildcard() {
            "*".to_owned()
        } else {
            cron_list(&p.days.values(), 1, 31, false)
        };
        let dow = if p.is_dow_wildcard() {
            "*".to_owned()
        } else {
            cron_list(&p.days_of_week.values(), 0, 6, false)
        };
        Ok(format!(
            "{} {} {dom} {} {dow}",
            cron_list(&p.minutes.values(), 0, 59, true),
            cron_list(&p.hours.values(), 0, 23, true),
            cron_list(&p.months.values(), 1, 12, true),
        ))
    }
}

/// Runs of consecutive values: `[1,2,3,5]` → `[(1,3),(5,5)]`.
fn runs(values: &[u16]) -> Vec<(u16, u16)> {
    let mut out: Vec<(u16, u16)> = Vec::new();
    for &v in values {
        match out.last_mut() {
            Some((_, end)) if *end + 1 == v => *end = v,
            _ => out.push((v, v)),
        }
    }
    out
}

fn systemd_list(values: &[u16], min: u16, max: u16) -> String {
    if values.len() == usize::from(max - min + 1) {
        return "*".into();
    }
    runs(values)
        .into_iter()
        .map(|(a, b)| match b - a {
            0 => format!("{a:02}"),
            1 => format!("{a:02},{b:02}"),
            _ => format!("{a:02}..{b:02}"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Weekdays Monday first (systemd's order, so ranges never wrap), `None` when all seven.
fn systemd_weekdays(values: &[u16]) -> Option<String> {
    let monday_first: Vec<u16> = values
        .iter()
        .map(|d| if *d == 0 { 7 } else { *d })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if monday_first.len() == 7 {
        return None;
    }
    let name = |d: u16| SYSTEMD_DAYS[usize::from(d % 7)];
    Some(
        runs(&monday_first)
            .into_iter()
            .map(|(a, b)| match b - a {
                0 => name(a).to_owned(),
                1 => format!("{},{}", name(a), name(b)),
                _ => format!("{}..{}", name(a), name(b)),
            })
            .collect::<Vec<_>>()
            .join(","),
    )
}

fn cron_list(values: &[u16], min: u16, max: u16, star_when_full: bool) -> String {
    if star_when_full && values.len() == usize::from(max - min + 1) {
        return "*".into();
    }
    runs(values)
        .into_iter()
        .map(|(a, b)| match b - a {
            0 => a.to_string(),
            1 => format!("{a},{b}"),
            _ => format!("{a}-{b}"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> CronSpec {
        CronSpec::parse(text, Tz::UTC).expect("parses")
    }

    #[test]
    fn five_and_six_fields() {
        assert!(!spec("*/5 * * * *").has_seconds);
        assert!(spec("*/1 * * * * *").has_seconds);
        assert!(CronSpec::parse("* * * *", Tz::UTC)
            .expect_err("fails")
            .contains("4 fields"));
        assert!(CronSpec::parse("* * * * * * *", Tz::UTC).is_err());
        assert!(CronSpec::parse("61 * * * *", Tz::UTC).is_err());
    }

    #[test]
    fn next_fire_in_a_time_zone() {
        let s = CronSpec::parse("30 2 * * *", chrono_tz::Europe::Berlin).expect("parses");
        let t: DateTime<Utc> = "2026-01-10T12:00:00Z".parse().expect("time");
        // 02:30 in Berlin in winter is 01:30 UTC.
        assert_eq!(
            s.next_after(t).expect("next").to_rfc3339(),
            "2026-01-11T01:30:00+00:00"
        );
        assert_eq!(
            s.latest_at_or_before(t).expect("prev").to_rfc3339(),
            "2026-01-10T01:30:00+00:00"
        );
    }

    #[test]
    fn on_calendar_lines() {
        assert_eq!(
            spec("*/15 2 * * *").on_calendar().expect("ok"),
            ["*-*-* 02:00,15,30,45:00 UTC"]
        );
        assert_eq!(
            spec("0 3 * * 1-5").on_calendar().expect("ok"),
            ["Mon..Fri *-*-* 03:00:00 UTC"]
        );
        assert_eq!(
            spec("0 3 * * 0,6").on_calendar().expect("ok"),
            ["Sat,Sun *-*-* 03:00:00 UTC"]
        );
        // Day of month OR weekday: two lines.
        assert_eq!(
            spec("0 0 1,15 * 5").on_calendar().expect("ok"),
            ["*-*-01,15 00:00:00 UTC", "Fri *-*-* 00:00:00 UTC"]
        );
        assert_eq!(
            spec("*/10 * * * * *").on_calendar().expect("ok"),
            ["*-*-* *:*:00,10,20,30,40,50 UTC"]
        );
        let berlin = CronSpec::parse("0 2 1-7 1 *", chrono_tz::Europe::Berlin).expect("parses");
        assert_eq!(
            berlin.on_calendar().expect("ok"),
            ["*-01-01..07 02:00:00 Europe/Berlin"]
        );
        assert!(spec("0 0 L * *").on_calendar().is_err());
    }

    #[test]
    fn cronjob_schedules() {
        assert_eq!(
            spec("*/15 2 * * MON-FRI").cronjob_schedule().expect("ok"),
            "0,15,30,45 2 * * 1-5"
        );
        assert_eq!(
            spec("0 30 2 * * *").cronjob_schedule().expect("ok"),
            "30 2 * * *"
        );
        assert_eq!(
            spec("0 0 * * 7").cronjob_schedule().expect("ok"),
            "0 0 * * 0"
        );
        let err = spec("*/10 * * * * *")
            .cronjob_schedule()
            .expect_err("fails");
        assert!(err.contains("minute resolution"), "{err}");
        assert!(spec("0 0 * * 5#2").cronjob_schedule().is_err());
    }

    #[test]
    fn shortest_gap_of_an_irregular_expression() {
        let t: DateTime<Utc> = "2026-01-10T12:00:00Z".parse().expect("time");
        assert_eq!(
            spec("0 0,6 * * *").shortest_gap(t),
            Some(chrono::Duration::hours(6))
        );
    }
}
