//! The brokers: each folder implements the transport contract ([`crate::transport`]) and its own
//! administration; this is the only place a broker's words appear. A broker is chosen by the scheme of
//! its URL through [`SCHEMES`]: adding one is a new folder and one line there.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::task::JoinHandle;

use crate::config::ResolvedSubscriber;
use crate::engine::Launch;
use crate::error::{AdminError, ConfigError, StartError};
use crate::transport::Publisher;

#[cfg(feature = "amqp")]
pub mod amqp;
#[cfg(feature = "kafka")]
pub mod kafka;
pub(crate) mod memory;

/// One broker connection behind a [`Broker`](crate::Broker) handle.
pub(crate) trait Backend: Publisher {
    /// Whether subscribers share work through consumer groups whose committed position the ack policy
    /// needs (a log). On a queue broker the queue itself is what consumers share.
    fn has_groups(&self) -> bool;

    /// Checks a subscriber's settings against what this broker can do (every error surfaces at start).
    fn check(&self, cfg: &ResolvedSubscriber) -> Result<(), ConfigError> {
        let _ = cfg;
        Ok(())
    }

    /// Whether this broker accepts `topic` as a name; the error says why not and what to change.
    fn check_topic(&self, topic: &str) -> Result<(), String> {
        let _ = topic;
        Ok(())
    }

    /// Starts a subscriber's engine over a transport of this broker. A broker that connects per consumer
    /// connects (and declares what the subscriber consumes) here, so a wrong URL or a refused connection
    /// fails the app's start at once, with the broker's own words.
    fn start(&self, launch: Launch) -> BoxFuture<'_, Result<JoinHandle<()>, StartError>>;

    /// Creates a topic (RabbitMQ: declares a durable queue of that name); existing ones are kept.
    fn declare_topic<'a>(&'a self, topic: &'a str, partitions: i32) -> BoxFuture<'a, Result<(), AdminError>> {
        match self.log_admin() {
            Some(admin) => admin.create_topic(topic, partitions),
            None => Box::pin(std::future::ready(Ok(()))),
        }
    }

    /// Messages waiting in a queue, on brokers that keep queues.
    fn queue_depth(&self, queue: &str) -> Option<BoxFuture<'_, Result<u64, AdminError>>> {
        let _ = queue;
        None
    }

    /// Topics with partitions and committed offsets, on the brokers that have them.
    fn log_admin(&self) -> Option<&dyn LogAdmin> {
        None
    }
}

/// Administration of a log broker (Kafka, the in-memory broker).
pub(crate) trait LogAdmin: Send + Sync {
    fn create_topic<'a>(&'a self, topic: &'a str, partitions: i32) -> BoxFuture<'a, Result<(), AdminError>>;
    fn committed<'a>(&'a self, group: &'a str, topic: &'a str)
    -> BoxFuture<'a, Result<BTreeMap<i32, i64>, AdminError>>;
    fn end_offsets<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<BTreeMap<i32, i64>, AdminError>>;
}

/// Starts a subscriber's engine over a log broker's consumer.
pub(crate) fn spawn_log<C: crate::log::LogConsumer>(launch: Launch, consumer: C) -> JoinHandle<()> {
    let rt = &launch.rt;
    let transport = crate::log::LogTransport::new(consumer, &rt.cfg, rt.hooks.clone(), rt.counters.clone());
    launch.spawn(transport)
}

/// Opens a backend from the part of its URL after `scheme://`.
type Open = fn(url: &str, rest: &str) -> Result<Arc<dyn Backend>, ConfigError>;

/// The URL schemes, and the feature a build needs for each.
pub(crate) const SCHEMES: &[(&str, &str, Option<Open>)] = &[
    ("memory", "", Some(memory::open)),
    #[cfg(feature = "kafka")]
    ("kafka", "kafka", Some(kafka::open)),
    #[cfg(not(feature = "kafka"))]
    ("kafka", "kafka", None),
    #[cfg(feature = "amqp")]
    ("amqp", "amqp", Some(amqp::open)),
    #[cfg(not(feature = "amqp"))]
    ("amqp", "amqp", None),
];

/// The backend a URL names.
pub(crate) fn open(url: &str) -> Result<Arc<dyn Backend>, ConfigError> {
    let invalid = |reason: String| ConfigError::InvalidUrl {
        url: crate::redact::url(url),
        reason,
    };
    let known = || {
        SCHEMES
            .iter()
            .map(|(s, ..)| format!("`{s}://`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(invalid(format!("no scheme; write one of {}", known())));
    };
    match SCHEMES.iter().find(|(s, ..)| *s == scheme) {
        Some((_, _, Some(open))) => open(url, rest),
        Some((_, feature, None)) => Err(invalid(format!(
            "this build has no `{scheme}://` support: enable the `{feature}` feature of ferrostream"
        ))),
        None => Err(invalid(format!(
            "unknown scheme `{scheme}://`; the scheme must be one of {}",
            known()
        ))),
    }
}
