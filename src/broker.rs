//! The broker handle: chosen by URL, it declares subscribers, publishes, and answers admin questions.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::engine::{Engine, SubscriberRuntime};
use crate::error::{BrokerError, ConfigError, StartError};
use crate::extract::StateMap;
use crate::handler::IntoPayload;
use crate::memory::MemoryBroker;
use crate::metrics::Metrics;
use crate::observe::Observer;
use crate::publish::{Outgoing, Publish, PublishAck};
use crate::subscriber::{ResolvedSubscriber, SubscriberBuilder, SubscriberSpec};

#[derive(Clone)]
pub(crate) enum Backend {
    Memory(MemoryBroker),
    #[cfg(feature = "kafka")]
    Kafka(crate::kafka::KafkaBackend),
}

struct Inner {
    url: String,
    backend: Backend,
    subscribers: Mutex<Vec<SubscriberSpec>>,
    state: Mutex<StateMap>,
    observer: std::sync::OnceLock<Observer>,
    default_retry: Mutex<Option<crate::RetryPolicy>>,
    metrics: Metrics,
}

/// A connection to one broker, chosen by URL: `memory://` (optionally `memory://?partitions=N`, the
/// default partition count of auto-created topics) or, with the `kafka` feature,
/// `kafka://host:port[,host:port]`. Cheap to clone.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use ferrostream::{App, Broker};
/// let broker = Broker::new("memory://")?;
/// broker.subscriber("test").group_id("group").auto_commit(false)
///     .handle(|body: String| async move { println!("got {body}") });
/// let app = App::new(broker.clone()).start().await?;
/// broker.publish("Hello!", "test").await?;
/// app.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("url", &self.inner.url).finish()
    }
}

impl Broker {
    /// Connects to the broker named by `url` (connections are made lazily).
    pub fn new(url: &str) -> Result<Self, ConfigError> {
        let invalid = |reason: &str| ConfigError::InvalidUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let backend = if let Some(rest) = url.strip_prefix("memory://") {
            let mut partitions = 1;
            if let Some(query) = rest.strip_prefix('?') {
                for kv in query.split('&') {
                    match kv.split_once('=') {
                        Some(("partitions", n)) => {
                            partitions = n
                                .parse::<i32>()
                                .ok()
                                .filter(|n| *n > 0)
                                .ok_or_else(|| invalid("`partitions` must be a positive integer"))?;
                        }
                        _ => return Err(invalid("the only memory:// option is `partitions=N`")),
                    }
                }
            } else if !rest.is_empty() {
                return Err(invalid("write `memory://` or `memory://?partitions=N`"));
            }
            Backend::Memory(MemoryBroker::new(partitions))
        } else if let Some(rest) = url.strip_prefix("kafka://") {
            Self::kafka_backend(url, rest)?
        } else {
            return Err(invalid("the scheme must be `memory://` or `kafka://`"));
        };
        Ok(Self::with_backend(url, backend))
    }

    #[cfg(feature = "kafka")]
    fn kafka_backend(url: &str, rest: &str) -> Result<Backend, ConfigError> {
        let config = crate::kafka::KafkaConfig::from_url(url, rest)?;
        Ok(Backend::Kafka(crate::kafka::KafkaBackend::new(config)?))
    }

    #[cfg(not(feature = "kafka"))]
    fn kafka_backend(url: &str, _rest: &str) -> Result<Backend, ConfigError> {
        Err(ConfigError::InvalidUrl {
            url: url.to_owned(),
            reason: "this build has no Kafka support: enable the `kafka` feature of ferrostream".to_owned(),
        })
    }

    /// Connects to Kafka with explicit client settings (security, SASL, timeouts...).
    ///
    /// ```no_run
    /// # fn main() -> Result<(), ferrostream::ConfigError> {
    /// use ferrostream::{Broker, kafka::KafkaConfig};
    /// let broker = Broker::kafka(
    ///     KafkaConfig::new("127.0.0.1:9092").set("security.protocol", "plaintext"),
    /// )?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "kafka")]
    pub fn kafka(config: crate::kafka::KafkaConfig) -> Result<Self, ConfigError> {
        let url = format!("kafka://{}", config.bootstrap_servers());
        Ok(Self::with_backend(
            &url,
            Backend::Kafka(crate::kafka::KafkaBackend::new(config)?),
        ))
    }

    fn with_backend(url: &str, backend: Backend) -> Self {
        Broker {
            inner: Arc::new(Inner {
                url: url.to_owned(),
                backend,
                subscribers: Mutex::new(Vec::new()),
                state: Mutex::new(StateMap::default()),
                observer: std::sync::OnceLock::new(),
                default_retry: Mutex::new(None),
                metrics: Metrics::default(),
            }),
        }
    }

    /// The URL this broker was created from.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Declares a subscriber to `topic`.
    pub fn subscriber(&self, topic: &str) -> SubscriberBuilder {
        SubscriberBuilder::new(self.clone(), topic)
    }

    /// Publishes a payload; add key, partition, headers... then `.await` it.
    pub fn publish(&self, payload: impl IntoPayload, topic: &str) -> Publish {
        Publish::new(self.clone(), payload, topic)
    }

    /// Publishes many records at once: they are sent concurrently (pipelined and batched on the wire)
    /// and this resolves when the broker has answered for every one, with each result in input order.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let broker = ferrostream::Broker::new("memory://")?;
    /// let acks = broker.publish_batch((0..3).map(|i| broker.publish(format!("event {i}"), "events"))).await;
    /// assert_eq!(acks.iter().filter(|a| a.is_ok()).count(), 3);
    /// # Ok(()) }
    /// ```
    pub async fn publish_batch(
        &self,
        batch: impl IntoIterator<Item = Publish>,
    ) -> Vec<Result<PublishAck, BrokerError>> {
        futures::future::join_all(batch.into_iter().map(std::future::IntoFuture::into_future)).await
    }

    /// A retry budget for every subscriber of this broker that has none of its own (`AckFirst` ones
    /// excepted: they commit before handling and cannot retry).
    ///
    /// ```
    /// use ferrostream::{Broker, RetryPolicy};
    /// let broker = Broker::new("memory://").unwrap().with_default_retry(RetryPolicy::new(3));
    /// # let _ = broker;
    /// ```
    pub fn with_default_retry(self, policy: crate::RetryPolicy) -> Self {
        *lock(&self.inner.default_retry) = Some(policy);
        self
    }

    /// Registers shared state that handlers receive with [`State<T>`](crate::State).
    pub fn with_state<T: Clone + Send + Sync + 'static>(self, value: T) -> Self {
        lock(&self.inner.state).insert(value);
        self
    }

    /// The event log of this broker's subscribers, created on first call: from then on every subscriber
    /// records into it. Until it is asked for, nothing is recorded and nothing is paid.
    pub fn observer(&self) -> Observer {
        self.inner.observer.get_or_init(Observer::default).clone()
    }

    pub(crate) fn observer_if_any(&self) -> Option<&Observer> {
        self.inner.observer.get()
    }

    /// The counters of this broker's subscribers.
    pub fn metrics(&self) -> Metrics {
        self.inner.metrics.clone()
    }

    /// Creates a topic with this many partitions (or grows an in-memory one); existing topics are kept.
    pub async fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), BrokerError> {
        match &self.inner.backend {
            Backend::Memory(m) => m.create_topic(topic, partitions),
            #[cfg(feature = "kafka")]
            Backend::Kafka(k) => k.create_topic(topic, partitions).await,
        }
    }

    /// The offsets a consumer group has committed for a topic, by partition.
    pub async fn committed_offsets(&self, group: &str, topic: &str) -> Result<BTreeMap<i32, i64>, BrokerError> {
        match &self.inner.backend {
            Backend::Memory(m) => Ok(m.committed(group, topic)),
            #[cfg(feature = "kafka")]
            Backend::Kafka(k) => k.committed(group, topic).await,
        }
    }

    /// The next offset to be written in each partition of a topic (the high watermarks).
    pub async fn end_offsets(&self, topic: &str) -> Result<BTreeMap<i32, i64>, BrokerError> {
        match &self.inner.backend {
            Backend::Memory(m) => Ok(m.end_offsets(topic)),
            #[cfg(feature = "kafka")]
            Backend::Kafka(k) => k.end_offsets(topic).await,
        }
    }

    pub(crate) async fn send(&self, out: Outgoing) -> Result<PublishAck, BrokerError> {
        match &self.inner.backend {
            Backend::Memory(m) => m.send(out),
            #[cfg(feature = "kafka")]
            Backend::Kafka(k) => k.send(out).await,
        }
    }

    pub(crate) fn register(&self, spec: SubscriberSpec) {
        lock(&self.inner.subscribers).push(spec);
    }

    /// Takes the subscribers declared since the last app started and validates them all (every error
    /// surfaces before anything starts). A later `App` on the same broker starts only newer ones, which
    /// is how a test adds a second group member to a running in-memory broker.
    pub(crate) fn take_subscribers(&self) -> Result<Vec<(ResolvedSubscriber, SubscriberSpec)>, ConfigError> {
        let specs = std::mem::take(&mut *lock(&self.inner.subscribers));
        let default_retry = *lock(&self.inner.default_retry);
        specs
            .into_iter()
            .map(|mut s| {
                // The broker's default budget covers every at-least-once subscriber without its own.
                if s.config.retry.is_none() && s.config.policy() != crate::AckPolicy::AckFirst {
                    s.config.retry = default_retry;
                }
                Ok((s.config.resolve()?, s))
            })
            .collect()
    }

    /// Starts one subscriber's engine; the receiver fires on its first assignment.
    pub(crate) fn start_subscriber(
        &self,
        cfg: ResolvedSubscriber,
        spec: &SubscriberSpec,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(JoinHandle<()>, oneshot::Receiver<()>), StartError> {
        let rt = Arc::new(SubscriberRuntime {
            counters: self.inner.metrics.counters(&cfg.name),
            cfg,
            handler: spec.handler.clone(),
            state: lock(&self.inner.state).clone(),
            broker: self.clone(),
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = match &self.inner.backend {
            Backend::Memory(m) => {
                let cfg = &rt.cfg;
                let consumer = m.join(
                    cfg.group_id.as_deref(),
                    &cfg.topic,
                    cfg.auto_offset_reset,
                    cfg.drain_timeout,
                );
                tokio::spawn(Engine::new(consumer, rt, shutdown, ready_tx).run())
            }
            #[cfg(feature = "kafka")]
            Backend::Kafka(k) => {
                let consumer = k.consumer(&rt.cfg)?;
                tokio::spawn(Engine::new(consumer, rt, shutdown, ready_tx).run())
            }
        };
        Ok((task, ready_rx))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Guarded values are only pushed to or replaced whole: a panic cannot leave them half-written.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
