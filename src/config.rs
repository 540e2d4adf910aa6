//! A subscriber's settings: as declared, and resolved (validated) at start. Plain data, shared by the
//! builder that declares them and the engine that runs them.

use std::sync::Arc;
use std::time::Duration;

use crate::error::ConfigError;
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

/// What a subscriber does with a message whose payload does not decode into its handler's argument
/// ([guarantee 2.4](crate::guarantees)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnDecodeError {
    /// Rejects it (dead-letters it where a dead-letter topic is set) under every policy, with an ERROR
    /// naming its coordinates: decoding is deterministic, so delivering it again cannot help.
    #[default]
    Reject,
    /// Treats it as any handler error: the ack policy and the retry budget settle it (under
    /// `NackOnError` without a budget it comes back, and on a log blocks its partition, until code changes).
    AsHandlerError,
}

/// Batch mode settings (SPEC 3.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchConfig {
    pub(crate) max_records: usize,
    pub(crate) timeout: Duration,
}

/// Where a subscriber publishes its handler's results: a topic, or a publisher object (whose topic its
/// router's prefix may still change), with the publisher's defaults.
#[derive(Debug, Clone)]
pub(crate) struct PublishTarget {
    pub(crate) topic: String,
    pub(crate) core: Option<Arc<crate::publisher::PublisherCore>>,
    pub(crate) defaults: Arc<crate::publisher::PublishDefaults>,
}

impl PublishTarget {
    pub(crate) fn topic(topic: String) -> Self {
        PublishTarget {
            topic,
            core: None,
            defaults: Arc::default(),
        }
    }

    /// The topic as it is now (a publisher's, with its router's prefix once included).
    pub(crate) fn resolved(&self) -> Self {
        let mut t = self.clone();
        if let Some(core) = &self.core {
            t.topic = core.topic();
        }
        t
    }
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
    pub(crate) publish_to: Vec<PublishTarget>,
    pub(crate) batch: Option<BatchConfig>,
    pub(crate) retry: Option<crate::RetryPolicy>,
    pub(crate) dead_letter: Option<String>,
    /// Handlers chosen by filters (`when`).
    pub(crate) filtered: bool,
    pub(crate) decode_errors: OnDecodeError,
    pub(crate) stall_warning: Duration,
    /// Creates the topic with this many partitions at start if it does not exist.
    pub(crate) create_partitions: Option<i32>,
    /// What the service's description says it does.
    pub(crate) description: Option<String>,
    /// RabbitMQ: how the queue is declared.
    #[cfg(feature = "amqp")]
    pub(crate) queue: Option<crate::amqp::Queue>,
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
    pub(crate) publish_to: Vec<PublishTarget>,
    pub(crate) batch: Option<BatchConfig>,
    pub(crate) retry: Option<crate::RetryPolicy>,
    pub(crate) dead_letter: Option<String>,
    /// Non-blocking retries: the topic failed messages go to.
    pub(crate) retry_topic: Option<String>,
    /// True for the internal subscriber that consumes `retry_topic`.
    pub(crate) retry_consumer: bool,
    pub(crate) decode_errors: OnDecodeError,
    /// How long an unsettled offset may hold a partition's commit back, while later ones are settled,
    /// before a warning names it.
    pub(crate) stall_warning: Duration,
    /// Creates the topic with this many partitions at start if it does not exist.
    pub(crate) create_partitions: Option<i32>,
    /// What the service's description says it does.
    pub(crate) description: Option<String>,
    /// Kafka static membership: the consumer's `group.instance.id`.
    pub(crate) group_instance_id: Option<String>,
    /// RabbitMQ: how the queue is declared.
    #[cfg(feature = "amqp")]
    pub(crate) queue: Option<crate::amqp::Queue>,
}

impl ResolvedSubscriber {
    /// How long a revocation may wait for this subscriber to drain: one can come while it drains for its
    /// shutdown, which answers it only with its final commit, so the longer of the two drains.
    pub(crate) fn revocation_drain(&self) -> Duration {
        self.drain_timeout.max(self.shutdown_timeout)
    }
}

impl SubscriberConfig {
    pub(crate) fn new(topic: &str) -> Self {
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
            filtered: false,
            decode_errors: OnDecodeError::default(),
            stall_warning: Duration::from_secs(60),
            create_partitions: None,
            description: None,
            #[cfg(feature = "amqp")]
            queue: None,
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

    /// Resolves `auto_commit` / `ack_policy` and checks every setting (SPEC section 1). `has_groups`: the
    /// broker shares work through consumer groups, whose committed offsets the at-least-once policies need.
    pub(crate) fn resolve(&self, has_groups: bool) -> Result<ResolvedSubscriber, ConfigError> {
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
        if has_groups && policy.needs_group() && self.group_id.is_none() {
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
        if self.create_partitions.is_some_and(|n| n < 1) {
            return Err(invalid("create_topic needs at least 1 partition"));
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
        if self.filtered && self.batch.is_some() {
            return Err(invalid(
                "filters (`when`) choose a handler per message, so they cannot serve a batch subscriber; \
                 filter inside the batch handler instead",
            ));
        }
        if self.batch.is_some_and(|b| b.max_records == 0) {
            return Err(invalid("batch max_records must be at least 1"));
        }
        if self.dead_letter.as_ref() == Some(&self.topic) {
            return Err(invalid(
                "the dead-letter topic is the subscriber's own topic: a rejected message would come straight \
                 back; use another topic, e.g. `<topic>.dlt`",
            ));
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
            publish_to: self.publish_to.iter().map(PublishTarget::resolved).collect(),
            batch: self.batch,
            retry: self.retry,
            dead_letter: self.dead_letter.clone(),
            retry_topic: match (&self.retry, &self.group_id) {
                (Some(r), Some(g)) if r.non_blocking => Some(format!("{}.{g}.retry", self.topic)),
                _ => None,
            },
            retry_consumer: false,
            decode_errors: self.decode_errors,
            stall_warning: self.stall_warning,
            create_partitions: self.create_partitions,
            description: self.description.clone(),
            group_instance_id: None,
            #[cfg(feature = "amqp")]
            queue: self.queue.clone(),
        })
    }
}

/// The `group.instance.id` of a subscriber's consumer under
/// [`Broker::with_instance_id`](crate::Broker::with_instance_id): `<id>-<subscriber name>`, with every
/// character Kafka refuses (outside `[A-Za-z0-9._-]`) as `_`, at most 249 characters.
pub(crate) fn group_instance_id(id: &str, subscriber: &str) -> String {
    format!("{id}-{subscriber}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(249)
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_group_instance_id_is_one_kafka_accepts() {
        assert_eq!(
            super::group_instance_id("pod-0", "orders@billing"),
            "pod-0-orders_billing"
        );
        assert_eq!(super::group_instance_id("a b", "t.x_y-z"), "a_b-t.x_y-z");
        assert_eq!(super::group_instance_id(&"x".repeat(300), "s").len(), 249);
    }
}
