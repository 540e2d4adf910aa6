//! Declaring subscribers: topic, group, ack policy, concurrency and commit cadence.

use std::sync::Arc;
use std::time::Duration;

use crate::broker::Broker;
use crate::error::ConfigError;
use crate::handler::{Erased, ErasedHandler, Handler};
use crate::settle::AckPolicy;

/// Where a group with no committed offset starts reading a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OffsetReset {
    /// From the oldest retained record.
    Earliest,
    /// From the end: only records produced after the assignment (Kafka's default).
    #[default]
    Latest,
}

/// Batch mode settings (SPEC 3.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchConfig {
    pub(crate) max_records: usize,
    pub(crate) timeout: Duration,
}

/// A subscriber's settings, as declared.
#[derive(Debug, Clone)]
pub(crate) struct SubscriberConfig {
    pub(crate) name: Option<String>,
    pub(crate) topic: String,
    pub(crate) group_id: Option<String>,
    pub(crate) auto_commit: Option<bool>,
    pub(crate) ack_policy: Option<AckPolicy>,
    pub(crate) auto_offset_reset: OffsetReset,
    pub(crate) max_in_flight: usize,
    pub(crate) max_buffered: usize,
    pub(crate) commit_interval: Duration,
    pub(crate) commit_every: usize,
    pub(crate) commit_sync_each: bool,
    pub(crate) drain_timeout: Duration,
    pub(crate) publish_to: Vec<String>,
    pub(crate) batch: Option<BatchConfig>,
    pub(crate) retry: Option<crate::RetryPolicy>,
    pub(crate) dead_letter: Option<String>,
}

/// A subscriber's settings after validation.
#[derive(Debug, Clone)]
pub(crate) struct ResolvedSubscriber {
    pub(crate) name: Arc<str>,
    pub(crate) topic: String,
    pub(crate) group_id: Option<String>,
    pub(crate) policy: AckPolicy,
    pub(crate) auto_offset_reset: OffsetReset,
    pub(crate) max_in_flight: usize,
    pub(crate) max_buffered: usize,
    pub(crate) commit_interval: Duration,
    pub(crate) commit_every: usize,
    pub(crate) commit_sync_each: bool,
    pub(crate) drain_timeout: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) publish_to: Vec<String>,
    pub(crate) batch: Option<BatchConfig>,
    pub(crate) retry: Option<crate::RetryPolicy>,
    pub(crate) dead_letter: Option<String>,
    /// Non-blocking retries: the topic failed messages go to.
    pub(crate) retry_topic: Option<String>,
    /// True for the internal subscriber that consumes `retry_topic`.
    pub(crate) retry_consumer: bool,
}

impl SubscriberConfig {
    fn new(topic: &str) -> Self {
        SubscriberConfig {
            name: None,
            topic: topic.to_owned(),
            group_id: None,
            auto_commit: None,
            ack_policy: None,
            auto_offset_reset: OffsetReset::default(),
            max_in_flight: 1,
            max_buffered: 16_384,
            commit_interval: Duration::from_millis(100),
            commit_every: 2000,
            commit_sync_each: false,
            drain_timeout: Duration::from_secs(10),
            publish_to: Vec::new(),
            batch: None,
            retry: None,
            dead_letter: None,
        }
    }

    /// The policy `auto_commit` / `ack_policy` ask for (`ack_policy` when both are set; `resolve` checks
    /// that they agree).
    pub(crate) fn policy(&self) -> AckPolicy {
        match (self.auto_commit, self.ack_policy) {
            (_, Some(p)) => p,
            (Some(false), None) => AckPolicy::NackOnError,
            (None | Some(true), None) => AckPolicy::AckFirst,
        }
    }

    /// Resolves `auto_commit` / `ack_policy` and checks every setting (SPEC section 1).
    pub(crate) fn resolve(&self) -> Result<ResolvedSubscriber, ConfigError> {
        let name: Arc<str> = match (&self.name, &self.group_id) {
            (Some(n), _) => n.as_str().into(),
            (None, Some(g)) => format!("{}@{}", self.topic, g).into(),
            (None, None) => self.topic.as_str().into(),
        };
        let policy = match (self.auto_commit, self.ack_policy) {
            (Some(auto_commit), Some(policy)) => {
                if auto_commit != (policy == AckPolicy::AckFirst) {
                    return Err(ConfigError::ConflictingAckSettings {
                        subscriber: name.to_string(),
                        auto_commit,
                        policy,
                    });
                }
                policy
            }
            _ => self.policy(),
        };
        if policy.needs_group() && self.group_id.is_none() {
            return Err(ConfigError::MissingGroup {
                subscriber: name.to_string(),
                policy,
            });
        }
        let invalid = |what: &str| ConfigError::InvalidSetting {
            subscriber: name.to_string(),
            what: what.to_owned(),
        };
        if self.topic.is_empty() {
            return Err(invalid("the topic name is empty"));
        }
        if self.max_in_flight == 0 {
            return Err(invalid("max_in_flight must be at least 1"));
        }
        if self.max_buffered < 4 {
            return Err(invalid("max_buffered must be at least 4"));
        }
        if self.commit_every == 0 {
            return Err(invalid("commit_every must be at least 1"));
        }
        if policy == AckPolicy::AckFirst && (self.retry.is_some() || self.dead_letter.is_some()) {
            return Err(invalid(
                "AckFirst commits before the handler runs, so it cannot retry or dead-letter: \
                 use an at-least-once policy (e.g. `.ack_policy(AckPolicy::NackOnError)`) with `.retry(..)`",
            ));
        }
        if self.retry.is_some_and(|r| r.non_blocking) && self.batch.is_some() {
            return Err(invalid(
                "non-blocking retries are not supported for batch subscribers; use blocking retries",
            ));
        }
        if self.retry.is_some_and(|r| r.max_attempts == 0) {
            return Err(invalid("RetryPolicy max_attempts must be at least 1"));
        }
        if self.batch.is_some_and(|b| b.max_records == 0) {
            return Err(invalid("batch max_records must be at least 1"));
        }
        if self.commit_interval.is_zero() {
            return Err(invalid(
                "commit_interval must be positive; use commit_sync_each() to commit every settle",
            ));
        }
        Ok(ResolvedSubscriber {
            name,
            topic: self.topic.clone(),
            group_id: self.group_id.clone(),
            policy,
            auto_offset_reset: self.auto_offset_reset,
            max_in_flight: self.max_in_flight,
            max_buffered: self.max_buffered,
            commit_interval: self.commit_interval,
            commit_every: self.commit_every,
            commit_sync_each: self.commit_sync_each,
            drain_timeout: self.drain_timeout,
            shutdown_timeout: Duration::from_secs(30),
            publish_to: self.publish_to.clone(),
            batch: self.batch,
            retry: self.retry,
            dead_letter: self.dead_letter.clone(),
            retry_topic: match (&self.retry, &self.group_id) {
                (Some(r), Some(g)) if r.non_blocking => Some(format!("{}.{g}.retry", self.topic)),
                _ => None,
            },
            retry_consumer: false,
        })
    }
}

/// A subscriber as registered on the broker: settings plus handler.
#[derive(Clone)]
pub(crate) struct SubscriberSpec {
    pub(crate) config: SubscriberConfig,
    pub(crate) handler: Arc<dyn ErasedHandler>,
}

/// Declares a subscriber; finish with [`handle`](SubscriberBuilder::handle).
///
/// ```
/// use ferrostream::{AckPolicy, Broker};
/// # fn main() -> Result<(), ferrostream::ConfigError> {
/// let broker = Broker::new("memory://")?;
/// // At least once, the seed's Kafka spelling:
/// broker.subscriber("test").group_id("group").auto_commit(false).handle(|body: String| async move {
///     println!("{body}");
/// });
/// // The same with the general spelling:
/// broker.subscriber("test").group_id("other").ack_policy(AckPolicy::NackOnError).handle(|_: String| async {});
/// # Ok(()) }
/// ```
#[must_use = "a subscriber is registered only by `.handle(handler)`"]
pub struct SubscriberBuilder {
    broker: Broker,
    config: SubscriberConfig,
}

impl SubscriberBuilder {
    pub(crate) fn new(broker: Broker, topic: &str) -> Self {
        SubscriberBuilder {
            broker,
            config: SubscriberConfig::new(topic),
        }
    }

    /// Names the subscriber in logs, metrics and errors (default `topic@group`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = Some(name.into());
        self
    }

    /// Joins this consumer group: partitions are shared with its other members and offsets committed.
    pub fn group_id(mut self, group: impl Into<String>) -> Self {
        self.config.group_id = Some(group.into());
        self
    }

    /// Kafka-familiar shorthand: `true` (the default) is [`AckPolicy::AckFirst`]; `false` is
    /// at least once ([`AckPolicy::NackOnError`] unless `ack_policy` says otherwise).
    pub fn auto_commit(mut self, enabled: bool) -> Self {
        self.config.auto_commit = Some(enabled);
        self
    }

    /// Chooses how messages are settled (SPEC section 1).
    pub fn ack_policy(mut self, policy: AckPolicy) -> Self {
        self.config.ack_policy = Some(policy);
        self
    }

    /// Where to start when the group has no committed offset (default [`OffsetReset::Latest`]).
    pub fn auto_offset_reset(mut self, reset: OffsetReset) -> Self {
        self.config.auto_offset_reset = reset;
        self
    }

    /// How many messages of one partition may be handled at once (default 1). Messages with the same
    /// key never run concurrently and start in offset order; messages without a key are sequential.
    /// Handler calls run on the subscriber's engine task, so what overlaps is their waiting (I/O,
    /// timers); move CPU-heavy work to `tokio::task::spawn_blocking`.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.config.max_in_flight = n;
        self
    }

    /// How many fetched records may wait per partition behind its in-flight limit before fetching of that
    /// partition pauses (default 16384); it resumes at a quarter of that. Bounds memory on a backlog.
    /// Under `AckFirst` it also bounds the records committed ahead of the handler: two runs of up to
    /// 8192, fewer when this is lower (smaller runs wait for more commits).
    pub fn max_buffered(mut self, records: usize) -> Self {
        self.config.max_buffered = records;
        self
    }

    /// Commit cadence: at most this long between a settle and its commit (default 100 ms).
    pub fn commit_interval(mut self, every: Duration) -> Self {
        self.config.commit_interval = every;
        self
    }

    /// Commit cadence: commit after this many settles even before the interval ends (default 2000).
    pub fn commit_every(mut self, settles: usize) -> Self {
        self.config.commit_every = settles;
        self
    }

    /// Commit each settle before the next message is dispatched (Spring's MANUAL_IMMEDIATE): slower,
    /// with the smallest duplicate window.
    pub fn commit_sync_each(mut self) -> Self {
        self.config.commit_sync_each = true;
        self
    }

    /// How long a revoked partition's in-flight messages may run before it is released (default 10 s).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.drain_timeout = timeout;
        self
    }

    /// Batch subscriber (SPEC 3.10): the handler receives up to `max_records` messages at once (take them
    /// with [`Batch<T>`](crate::Batch)), waiting up to `timeout` for a batch to fill. One batch runs at a
    /// time; the handler's outcome settles every message it did not settle itself.
    ///
    /// ```
    /// # let broker = ferrostream::Broker::new("memory://").unwrap();
    /// use std::time::Duration;
    /// use ferrostream::Batch;
    /// broker.subscriber("events").group_id("g").auto_commit(false)
    ///     .batch(500, Duration::from_millis(20))
    ///     .handle(|Batch(bodies): Batch<String>| async move {
    ///         println!("{} events", bodies.len());
    ///     });
    /// ```
    pub fn batch(mut self, max_records: usize, timeout: Duration) -> Self {
        self.config.batch = Some(BatchConfig { max_records, timeout });
        self
    }

    /// Retries failing messages in place with backoff, up to a budget; then rejects them (dead-letters
    /// them with [`dead_letter`](Self::dead_letter)). Not for `AckFirst`.
    ///
    /// ```
    /// # let broker = ferrostream::Broker::new("memory://").unwrap();
    /// use std::time::Duration;
    /// use ferrostream::{AckPolicy, RetryPolicy};
    /// broker.subscriber("orders").group_id("billing").ack_policy(AckPolicy::NackOnError)
    ///     .retry(RetryPolicy::new(5).backoff(Duration::from_millis(200), Duration::from_secs(10)))
    ///     .dead_letter("orders.dlt")
    ///     .handle(|_: String| async { Err::<(), _>(std::io::Error::other("payment service down")) });
    /// ```
    pub fn retry(mut self, policy: crate::RetryPolicy) -> Self {
        self.config.retry = Some(policy);
        self
    }

    /// Publishes rejected messages to this topic (original key, payload and headers, plus the
    /// [`retry::headers`](crate::retry::headers)) before their offset is committed; if that publish
    /// fails, the message stays unsettled and comes back (SPEC 3.3).
    pub fn dead_letter(mut self, topic: impl Into<String>) -> Self {
        self.config.dead_letter = Some(topic.into());
        self
    }

    /// Publishes the handler's return value to this topic (may be called several times).
    pub fn publish_to(mut self, topic: impl Into<String>) -> Self {
        self.config.publish_to.push(topic.into());
        self
    }

    /// The configuration declared so far (for engine tests that run without a broker's registry).
    #[cfg(test)]
    pub(crate) fn into_config(self) -> SubscriberConfig {
        self.config
    }

    /// Registers the subscriber with its handler. Settings are checked when the app starts.
    pub fn handle<H, Args>(self, handler: H)
    where
        H: Handler<Args>,
        Args: 'static,
    {
        self.broker.register(SubscriberSpec {
            config: self.config,
            handler: Arc::new(Erased::new(handler)),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_resolution_follows_the_spec_table() {
        let mut c = SubscriberConfig::new("t");
        assert_eq!(c.resolve().unwrap().policy, AckPolicy::AckFirst);
        c.group_id = Some("g".into());
        c.auto_commit = Some(false);
        assert_eq!(c.resolve().unwrap().policy, AckPolicy::NackOnError);
        c.ack_policy = Some(AckPolicy::Manual);
        assert_eq!(c.resolve().unwrap().policy, AckPolicy::Manual);
        c.ack_policy = Some(AckPolicy::AckFirst);
        assert!(matches!(c.resolve(), Err(ConfigError::ConflictingAckSettings { .. })));
        c.auto_commit = None;
        c.group_id = None;
        c.ack_policy = Some(AckPolicy::Ack);
        let err = c.resolve().unwrap_err();
        assert!(err.to_string().contains(".group_id("), "{err}");
    }
}
