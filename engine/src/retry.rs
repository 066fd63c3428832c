//! Retry policy as data: how many attempts a step gets and how long to wait between them.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backoff {
    /// The same delay before every retry.
    Fixed,
    /// `delay * factor^(n-1)` before retry n, capped at `max_delay`.
    Exponential { factor: f64 },
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RetryPolicy {
    /// Total attempts, including the first. 1 means no retry.
    pub attempts: u32,
    pub backoff: Backoff,
    #[serde(with = "crate::serde_duration")]
    pub delay: Duration,
    #[serde(with = "crate::serde_duration")]
    pub max_delay: Duration,
    /// Spread each delay uniformly over [delay/2, delay] so that many hosts retrying the same
    /// API do not do it in lock-step.
    pub jitter: bool,
    /// Give up once this much time has passed since the first attempt started, whatever
    /// `attempts` says: "poll every 5s for up to 10m" is `attempts = 10000, deadline = "10m"`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::serde_duration::serialize_opt"
    )]
    pub deadline: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 1,
            backoff: Backoff::Fixed,
            delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            jitter: false,
            deadline: None,
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `next` (2 for the first retry). `unit` is a random number in
    /// [0, 1) used only when jitter is on; passing it in keeps this function pure and testable.
    pub fn delay_before(&self, next: u32, unit: f64) -> Duration {
        let retry = next.saturating_sub(1).max(1);
        let base = match self.backoff {
            Backoff::Fixed => self.delay,
            Backoff::Exponential { factor } => {
                let exp = i32::try_from(retry - 1).unwrap_or(i32::MAX);
                let secs = self.delay.as_secs_f64() * factor.powi(exp);
                if secs.is_finite() && secs < self.max_delay.as_secs_f64() {
                    Duration::from_secs_f64(secs)
                } else {
                    self.max_delay
                }
            }
        };
        let base = base.min(self.max_delay.max(self.delay));
        if self.jitter {
            let unit = unit.clamp(0.0, 1.0);
            base.mul_f64(0.5 + unit / 2.0)
        } else {
            base
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp() -> RetryPolicy {
        RetryPolicy {
            attempts: 10,
            backoff: Backoff::Exponential { factor: 2.0 },
            delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(10),
            jitter: false,
            deadline: None,
        }
    }

    #[test]
    fn exponential_doubles_and_caps() {
        let p = exp();
        let delays: Vec<u64> = (2..=7).map(|n| p.delay_before(n, 0.0).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 10, 10]);
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        let p = RetryPolicy {
            jitter: true,
            ..exp()
        };
        for i in 0..100 {
            let unit = f64::from(i) / 100.0;
            let d = p.delay_before(4, unit);
            assert!(
                d >= Duration::from_secs(2) && d <= Duration::from_secs(4),
                "{d:?}"
            );
        }
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        assert_eq!(exp().delay_before(u32::MAX, 0.0), Duration::from_secs(10));
    }
}
