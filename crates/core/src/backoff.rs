//! Capped exponential backoff.

use std::time::Duration;

/// Backoff settings: `base * 2^attempt`, capped at `cap`, then jittered by up to
/// `jitter_percent` of the delay (downwards, so the cap is never exceeded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    pub jitter_percent: u32,
}

impl Backoff {
    /// Revocation retries: 1 s doubling up to 5 minutes.
    pub const REVOCATION: Backoff = Backoff {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(300),
        jitter_percent: 10,
    };
    /// Verification failures: 10 s doubling up to 10 minutes.
    pub const VERIFICATION: Backoff = Backoff {
        base: Duration::from_secs(10),
        cap: Duration::from_secs(600),
        jitter_percent: 10,
    };

    /// Delay before retry number `attempt` (0 = the first retry). `seed` makes the jitter
    /// deterministic per caller (for example a hash of the lease and version), so the
    /// same inputs give the same answer and many leases do not retry in lockstep.
    pub fn delay(&self, attempt: u32, seed: u64) -> Duration {
        let exp = 1u64.checked_shl(attempt.min(40)).unwrap_or(u64::MAX);
        let raw = self
            .base
            .saturating_mul(u32::try_from(exp).unwrap_or(u32::MAX));
        let capped = raw.min(self.cap);
        if self.jitter_percent == 0 {
            return capped;
        }
        let span_ms = capped.as_millis() as u64 * u64::from(self.jitter_percent) / 100;
        if span_ms == 0 {
            return capped;
        }
        let jitter = splitmix(seed ^ u64::from(attempt)) % span_ms;
        capped.saturating_sub(Duration::from_millis(jitter))
    }
}

/// A small mixing function for deterministic jitter.
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A stable 64-bit hash of a string (FNV-1a), for seeding jitter.
pub fn seed_of(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let b = Backoff {
            jitter_percent: 0,
            ..Backoff::REVOCATION
        };
        assert_eq!(b.delay(0, 1), Duration::from_secs(1));
        assert_eq!(b.delay(3, 1), Duration::from_secs(8));
        assert_eq!(b.delay(9, 1), Duration::from_secs(300));
        assert_eq!(b.delay(1000, 1), Duration::from_secs(300));
    }

    #[test]
    fn jitter_stays_below_cap_and_is_deterministic() {
        let b = Backoff::REVOCATION;
        for attempt in 0..50 {
            let d = b.delay(attempt, 42);
            assert!(d <= b.cap);
            assert_eq!(d, b.delay(attempt, 42));
        }
        assert_ne!(b.delay(20, 1), b.delay(20, 2));
    }
}
