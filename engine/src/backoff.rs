//! Waiting between tries: the one source of the randomness jitter needs, and the wait a
//! [`RetryPolicy`] gives before a try. Every retry loop (a step's attempts, webhook delivery,
//! SSH handshakes and channels) sleeps what this module says; the policy's shape is data in
//! [`crate::retry`].

use std::time::Duration;

use crate::retry::{Backoff, RetryPolicy};

/// `attempts` tries, waiting `delay` after the first failure and twice as long after each
/// next one, at most `max_delay`; with `jitter`, each wait spread over its lower half.
pub const fn doubling(
    attempts: u32,
    delay: Duration,
    max_delay: Duration,
    jitter: bool,
) -> RetryPolicy {
    RetryPolicy {
        attempts,
        backoff: Backoff::Exponential { factor: 2.0 },
        delay,
        max_delay,
        jitter,
        deadline: None,
    }
}

/// A random number in [0, 1) from the operating system (0.5 if it has none to give: jitter
/// then falls back to the middle of its range rather than failing a retry).
pub fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// The wait before try `next` (2 for the first retry), jittered when the policy says so.
pub fn delay(policy: &RetryPolicy, next: u32) -> Duration {
    let unit = if policy.jitter { random_unit() } else { 0.0 };
    policy.delay_before(next, unit)
}

/// A wait spread uniformly over [0, `max`): starts that would otherwise come together (many
/// schedules firing on the same minute) come apart.
pub fn spread(max: Duration) -> Duration {
    max.mul_f64(random_unit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_units_are_in_range_and_not_all_alike() {
        let units: Vec<f64> = (0..64).map(|_| random_unit()).collect();
        assert!(units.iter().all(|u| (0.0..1.0).contains(u)), "{units:?}");
        assert!(units.iter().any(|u| (u - units[0]).abs() > f64::EPSILON));
    }

    #[test]
    fn a_jittered_delay_stays_within_the_policys_range() {
        let policy = doubling(
            8,
            Duration::from_millis(100),
            Duration::from_millis(1600),
            true,
        );
        for _ in 0..50 {
            let d = delay(&policy, 3);
            assert!(
                d >= Duration::from_millis(100) && d <= Duration::from_millis(200),
                "{d:?}"
            );
        }
        let fixed = RetryPolicy {
            jitter: false,
            ..policy
        };
        assert_eq!(delay(&fixed, 3), Duration::from_millis(200));
    }

    #[test]
    fn a_spread_stays_below_its_bound() {
        assert_eq!(spread(Duration::ZERO), Duration::ZERO);
        for _ in 0..50 {
            assert!(spread(Duration::from_secs(3)) < Duration::from_secs(3));
        }
    }
}
