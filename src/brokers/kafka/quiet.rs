//! A broker that is down must not flood the log: librdkafka reports the same failure several times a
//! second per client. Each distinct failure is logged once, then kept quiet for [`QUIET`], after which it
//! is logged again with how many times it repeated meanwhile.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;

/// How long a repeated failure stays quiet.
pub(super) const QUIET: Duration = Duration::from_secs(30);

/// Which failures were logged lately.
#[derive(Default)]
pub(super) struct Throttle {
    seen: Mutex<Vec<(String, Instant, u64)>>,
}

impl Throttle {
    /// Whether to log the failure keyed `key` now; `Some(n)`: yes, and it repeated `n` times unlogged since
    /// it last was.
    pub(super) fn admit(&self, key: &str) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match seen.iter_mut().find(|(k, ..)| k == key) {
            Some((_, at, quiet)) if now.duration_since(*at) < QUIET => {
                *quiet += 1;
                None
            }
            Some((_, at, quiet)) => {
                *at = now;
                Some(std::mem::take(quiet))
            }
            None => {
                // A handful of distinct failures at most; forget the oldest beyond that.
                if seen.len() >= 32 {
                    seen.remove(0);
                }
                seen.push((key.to_owned(), now, 0));
                Some(0)
            }
        }
    }
}

/// The client context of ferrostream's own Kafka clients (producer, metadata): librdkafka's errors and
/// warnings through `tracing`, repeats kept quiet.
#[derive(Clone)]
pub(crate) struct QuietContext {
    client: &'static str,
    throttle: Arc<Throttle>,
}

impl QuietContext {
    pub(crate) fn new(client: &'static str) -> Self {
        QuietContext {
            client,
            throttle: Arc::default(),
        }
    }
}

/// Logs a librdkafka log line, repeats kept quiet.
pub(super) fn log(throttle: &Throttle, client: &str, level: RDKafkaLogLevel, fac: &str, message: &str) {
    let serious = matches!(
        level,
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error
    );
    if !serious && !matches!(level, RDKafkaLogLevel::Warning) {
        tracing::debug!(client, fac, "librdkafka: {message}");
        return;
    }
    let Some(repeated) = throttle.admit(fac) else { return };
    if serious {
        tracing::error!(client, fac, repeated, "librdkafka: {message}");
    } else {
        tracing::warn!(client, fac, repeated, "librdkafka: {message}");
    }
}

/// Logs a librdkafka client error, repeats kept quiet.
pub(super) fn error(throttle: &Throttle, client: &str, error: &KafkaError, reason: &str) {
    let key = error
        .rdkafka_error_code()
        .map_or_else(|| error.to_string(), |c| format!("{c:?}"));
    if let Some(repeated) = throttle.admit(&key) {
        tracing::error!(client, repeated, error = %error, "Kafka client error: {reason}");
    }
}

impl ClientContext for QuietContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log(&self.throttle, self.client, level, fac, message);
    }

    fn error(&self, e: KafkaError, reason: &str) {
        error(&self.throttle, self.client, &e, reason);
    }
}

impl ConsumerContext for QuietContext {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_failure_is_logged_once_per_quiet_period_with_its_count() {
        let t = Throttle::default();
        assert_eq!(t.admit("AllBrokersDown"), Some(0));
        for _ in 0..100 {
            assert_eq!(t.admit("AllBrokersDown"), None);
        }
        assert_eq!(t.admit("Transport"), Some(0), "another failure is logged at once");
        // Once the quiet period is over, it is logged again with how often it repeated.
        t.seen.lock().unwrap()[0].1 -= QUIET;
        assert_eq!(t.admit("AllBrokersDown"), Some(100));
    }
}
