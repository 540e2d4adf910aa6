//! Retries and dead letters ([guarantee 3.12](crate::guarantees)): how often a failing message is tried again, how long to wait in
//! between, and where it goes when it is given up on.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::FailureKind;

/// Header names ferrostream adds to a dead-lettered record (next to the original headers).
pub mod headers {
    /// Why the message was given up on (the last error, or who rejected it).
    pub const ERROR: &str = "x-ferrostream-error";
    /// How many times it was handled.
    pub const ATTEMPTS: &str = "x-ferrostream-attempts";
    /// The topic it was consumed from.
    pub const SOURCE_TOPIC: &str = "x-ferrostream-source-topic";
    /// Its partition there.
    pub const SOURCE_PARTITION: &str = "x-ferrostream-source-partition";
    /// Its offset there.
    pub const SOURCE_OFFSET: &str = "x-ferrostream-source-offset";
    /// Its original timestamp, in milliseconds since the Unix epoch (when it had one).
    pub const SOURCE_TIMESTAMP: &str = "x-ferrostream-source-timestamp";
    /// Non-blocking retries: when the message is due for its next attempt (milliseconds since the epoch).
    pub const RETRY_DUE: &str = "x-ferrostream-retry-due";
    /// Non-blocking retries: when it first failed (milliseconds since the epoch).
    pub const FIRST_FAILURE: &str = "x-ferrostream-first-failure";
    /// The subscriber that gave up on it.
    pub const SUBSCRIBER: &str = "x-ferrostream-subscriber";
    /// The subscriber's consumer group.
    pub const GROUP: &str = "x-ferrostream-group";
    /// When it was dead-lettered, in milliseconds since the Unix epoch.
    pub const DEAD_LETTERED_AT: &str = "x-ferrostream-dead-lettered-at";
    /// A dead letter's original `reply_to` (a dead letter answers nobody, so the header is renamed).
    pub const ORIGINAL_REPLY_TO: &str = "x-ferrostream-original-reply-to";
}

/// A retry budget with exponential backoff, jitter and a cap.
///
/// A failing message is delivered again after `delay(attempt)` until it has been handled
/// `max_attempts` times; then it is rejected (and dead-lettered when the subscriber has a dead-letter
/// topic). Redelivery is blocking: the message is retried in place, so later messages of its partition
/// wait and per-key order holds. Decode failures are not retried by default: they cannot succeed.
///
/// ```
/// use std::time::Duration;
/// use ferrostream::RetryPolicy;
/// let policy = RetryPolicy::new(5).backoff(Duration::from_millis(100), Duration::from_secs(10)).jitter(0.0);
/// assert_eq!(policy.delay(1), Duration::from_millis(100));
/// assert_eq!(policy.delay(3), Duration::from_millis(400));
/// assert_eq!(policy.delay(20), Duration::from_secs(10));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub(crate) max_attempts: u32,
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
    pub(crate) retry_panics: bool,
    pub(crate) retry_decode_errors: bool,
    pub(crate) non_blocking: bool,
}

impl RetryPolicy {
    /// At most `max_attempts` handler calls per message (the first included); backoff 100 ms doubling
    /// up to 30 s, jitter ±20 %; handler errors and panics are retried, decode failures are not.
    pub fn new(max_attempts: u32) -> Self {
        RetryPolicy {
            max_attempts,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.2,
            retry_panics: true,
            retry_decode_errors: false,
            non_blocking: false,
        }
    }

    /// The first delay and the cap.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial = initial;
        self.max = max.max(initial);
        self
    }

    /// How much each delay grows (default 2.0; 1.0 for a constant delay).
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier.max(1.0);
        self
    }

    /// Random spread of each delay, as a fraction (default 0.2: ±20 %), so failing consumers do not retry
    /// in lockstep.
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction.clamp(0.0, 1.0);
        self
    }

    /// Non-blocking retries: a failed message is published to the subscriber's retry topic
    /// (`<topic>.<group>.retry`, never the source topic) with its attempt count and due time, its source
    /// offset is committed once that publish is acknowledged, and the source partition moves on. The
    /// subscriber also consumes the retry topic (as `<name>.retry`, same group, same handler) and handles
    /// each message once it is due. Per-key order is not kept across retries.
    pub fn non_blocking(mut self) -> Self {
        self.non_blocking = true;
        self
    }

    /// Whether panics are retried (default true).
    pub fn retry_panics(mut self, retry: bool) -> Self {
        self.retry_panics = retry;
        self
    }

    /// Whether decode failures are retried (default false).
    pub fn retry_decode_errors(mut self, retry: bool) -> Self {
        self.retry_decode_errors = retry;
        self
    }

    /// The wait before delivery number `attempt + 1`, after `attempt` failed handler calls.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.multiplier.powi(attempt.saturating_sub(1).min(64) as i32);
        let base = self.initial.as_secs_f64() * exp;
        let capped = base.min(self.max.as_secs_f64());
        let spread = if self.jitter > 0.0 {
            (unit_random() * 2.0 - 1.0) * self.jitter
        } else {
            0.0
        };
        Duration::from_secs_f64((capped * (1.0 + spread)).max(0.0))
    }

    /// Whether a failure of this kind may be retried.
    pub(crate) fn retries(&self, kind: FailureKind) -> bool {
        match kind {
            FailureKind::Panic => self.retry_panics,
            FailureKind::Decode => self.retry_decode_errors,
            FailureKind::Handler => true,
        }
    }
}

/// A number in [0, 1): good enough to spread retries, not for anything secret.
fn unit_random() -> f64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let mut x = nanos.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_its_spread_and_the_cap() {
        let p = RetryPolicy::new(10)
            .backoff(Duration::from_millis(100), Duration::from_secs(1))
            .jitter(0.5);
        for attempt in 1..12 {
            let d = p.delay(attempt);
            let base = (100.0 * 2f64.powi(attempt as i32 - 1)).min(1000.0);
            assert!(d.as_secs_f64() * 1000.0 >= base * 0.5 - 1e-6, "{attempt}: {d:?}");
            assert!(d.as_secs_f64() * 1000.0 <= base * 1.5 + 1e-6, "{attempt}: {d:?}");
        }
    }
}
