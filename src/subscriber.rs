//! Declaring subscribers: topic, group, ack policy, concurrency and commit cadence.

use std::sync::Arc;
use std::time::Duration;

use std::sync::Mutex;

use crate::broker::Broker;
use crate::config::{BatchConfig, PublishTarget, SubscriberConfig};
pub use crate::config::{OffsetReset, OnDecodeError};
#[cfg(test)]
use crate::error::ConfigError;
use crate::filter::{Route, Routed};
use crate::handler::{Erased, ErasedHandler, Handler};
use crate::message::Message;
use crate::middleware::{HandlerLayer, HandlerMiddleware, PublishLayer, PublishMiddleware};
use crate::router::RouterInner;
use crate::settle::AckPolicy;

/// A destination for a subscriber's results: a topic name or a [`Publisher`](crate::Publisher).
pub struct PublishTo(pub(crate) PublishTarget);

impl From<&str> for PublishTo {
    fn from(topic: &str) -> Self {
        PublishTo(PublishTarget::topic(topic.to_owned()))
    }
}

impl From<&String> for PublishTo {
    fn from(topic: &String) -> Self {
        PublishTo(PublishTarget::topic(topic.clone()))
    }
}

impl From<String> for PublishTo {
    fn from(topic: String) -> Self {
        PublishTo(PublishTarget::topic(topic))
    }
}

impl From<&crate::Publisher> for PublishTo {
    fn from(p: &crate::Publisher) -> Self {
        PublishTo(p.target())
    }
}

impl From<crate::Publisher> for PublishTo {
    fn from(p: crate::Publisher) -> Self {
        PublishTo(p.target())
    }
}

/// A subscriber as registered on the broker: settings plus handler.
#[derive(Clone)]
pub(crate) struct SubscriberSpec {
    pub(crate) config: SubscriberConfig,
    pub(crate) handler: Arc<dyn ErasedHandler>,
    /// Handler middleware, outermost first.
    pub(crate) layers: Vec<HandlerLayer>,
    /// Publish middleware, outermost first.
    pub(crate) publish_layers: Vec<PublishLayer>,
    /// The innermost router's retry budget and dead letter (full topic name), for a subscriber without
    /// its own: applied once the ack policy is final (all routers applied), unless that is `AckFirst`.
    pub(crate) inherited_retry: Option<crate::RetryPolicy>,
    pub(crate) inherited_dead_letter: Option<String>,
}

/// Where a declared subscriber is registered: on a broker, or on a router to be included into one.
pub(crate) enum Registry {
    Broker(Broker),
    Router(Arc<Mutex<RouterInner>>),
}

impl Registry {
    fn register(&self, spec: SubscriberSpec) {
        match self {
            Registry::Broker(b) => b.register(spec),
            Registry::Router(r) => r.lock().unwrap_or_else(|p| p.into_inner()).register(spec),
        }
    }
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
    registry: Registry,
    config: SubscriberConfig,
    layers: Vec<HandlerLayer>,
    publish_layers: Vec<PublishLayer>,
    routes: Vec<Route>,
}

impl SubscriberBuilder {
    pub(crate) fn new(registry: Registry, topic: &str) -> Self {
        SubscriberBuilder {
            registry,
            config: SubscriberConfig::new(topic),
            layers: Vec::new(),
            publish_layers: Vec::new(),
            routes: Vec::new(),
        }
    }

    /// Adds middleware around this subscriber's handler calls (inside the broker's and its routers';
    /// the first added runs first). See [`middleware`](crate::middleware).
    ///
    /// ```
    /// # let broker = ferrostream::Broker::new("memory://").unwrap();
    /// use std::time::Duration;
    /// broker.subscriber("orders").group_id("g").auto_commit(false)
    ///     // A call that takes longer than 5 s fails (and is settled by the policy).
    ///     .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(5)))
    ///     .handle(|body: String| async move { println!("{body}") });
    /// ```
    pub fn layer(mut self, layer: impl HandlerMiddleware) -> Self {
        self.layers.push(layer.erase());
        self
    }

    /// Adds middleware around what the framework publishes for this subscriber: its results, replies,
    /// dead letters and retries (inside the broker's and its routers' publish middleware).
    pub fn publish_layer(mut self, layer: impl PublishMiddleware) -> Self {
        self.publish_layers.push(layer.erase());
        self
    }

    /// Filters (FastStream's `filter=`): messages for which `accepts` is true go to `handler`. Several
    /// `when`s are tried in the order given and the first that accepts a message handles it; finish with
    /// [`handle`](Self::handle) for the messages none accepts, or with
    /// [`otherwise_reject`](Self::otherwise_reject). Not for batch subscribers.
    ///
    /// ```
    /// # let broker = ferrostream::Broker::new("memory://").unwrap();
    /// use ferrostream::{Json, Message};
    /// #[derive(serde::Deserialize, schemars::JsonSchema)]
    /// struct Created { id: u64 }
    /// let kind = |k: &'static str| move |m: &Message| m.headers().get_str("kind") == Some(k);
    /// broker.subscriber("orders").group_id("g").auto_commit(false)
    ///     .when(kind("created"), |Json(order): Json<Created>| async move { println!("new {}", order.id) })
    ///     .when(kind("cancelled"), |body: String| async move { println!("cancelled: {body}") })
    ///     .handle(|msg: Message| async move { println!("other kind at {:?}", msg.coordinates()) });
    /// ```
    pub fn when<H, Args>(mut self, accepts: impl Fn(&Message) -> bool + Send + Sync + 'static, handler: H) -> Self
    where
        H: Handler<Args>,
        Args: 'static,
    {
        self.routes.push(Route {
            accepts: Arc::new(accepts),
            handler: Arc::new(Erased::new(handler)),
        });
        self
    }

    /// Registers a filtered subscriber without a default handler: a message that no
    /// [`when`](Self::when) accepts is rejected (dead-lettered if the subscriber has a dead-letter topic),
    /// under every policy, with a warning naming it.
    pub fn otherwise_reject(self) {
        self.register(None);
    }

    /// Names the subscriber in logs, metrics and errors (default `topic@group`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = Some(name.into());
        self
    }

    /// What this subscriber does, in a sentence or two: the description of its operation in the service's
    /// AsyncAPI document and docs page (its [`name`](Self::name) is the title).
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.config.description = Some(text.into());
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

    /// Chooses how messages are settled ([guarantees](crate::guarantees) §1).
    pub fn ack_policy(mut self, policy: AckPolicy) -> Self {
        self.config.ack_policy = Some(policy);
        self
    }

    /// Where to start when the group has no committed offset (default [`OffsetReset::Latest`]).
    pub fn auto_offset_reset(mut self, reset: OffsetReset) -> Self {
        self.config.auto_offset_reset = reset;
        self
    }

    /// How many messages of one partition (on RabbitMQ: of the queue) may be handled at once (default 1).
    /// On a log, messages with the same key never run concurrently and start in offset order, and
    /// messages without a key are sequential; a queue has no keys and keeps no order across redeliveries,
    /// so there any `n` messages run at once.
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

    /// Batch subscriber ([guarantee 3.10](crate::guarantees)): the handler receives up to `max_records` messages at once (take them
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

    /// What to do with a message whose payload does not decode ([guarantee 2.4](crate::guarantees)):
    /// by default it is rejected (dead-lettered where a dead-letter topic is set) under every policy,
    /// since delivering it again cannot help; [`OnDecodeError::AsHandlerError`] hands it to the ack policy
    /// and retry budget like any handler error (for users who prefer to block the partition).
    pub fn on_decode_error(mut self, what: OnDecodeError) -> Self {
        self.config.decode_errors = what;
        self
    }

    /// Creates the subscribed topic with this many partitions when the app starts, if it does not
    /// exist yet (an existing topic is kept as it is). Without it, a topic that does not exist fails
    /// the start on Kafka with [`StartError::MissingTopic`](crate::StartError::MissingTopic) (Kafka creates
    /// no topic for a consumer, which would wait forever); `memory://` creates topics on first use, and
    /// RabbitMQ declares the subscriber's queue either way.
    pub fn create_topic(mut self, partitions: i32) -> Self {
        self.config.create_partitions = Some(partitions);
        self
    }

    /// On a log: how long an unsettled message may hold its partition's commit back, while later
    /// messages were settled, before a warning names its offset (default 60 s; the observer and hooks
    /// see it as a `Stalled` event). A `Manual` handler that forgets to settle is the usual cause.
    pub fn stall_warning(mut self, after: Duration) -> Self {
        self.config.stall_warning = after;
        self
    }

    /// Publishes rejected messages to this topic (original key, payload and headers, plus the
    /// [`retry::headers`](crate::retry::headers)) before their offset is committed; if that publish
    /// fails, the message stays unsettled and comes back ([guarantee 3.3](crate::guarantees)).
    pub fn dead_letter(mut self, topic: impl Into<String>) -> Self {
        self.config.dead_letter = Some(topic.into());
        self
    }

    /// Publishes the handler's return value to this topic, or through this [`Publisher`](crate::Publisher)
    /// with its defaults (may be called several times: the result goes to each, in order, before the
    /// message is settled).
    pub fn publish_to(mut self, to: impl Into<PublishTo>) -> Self {
        self.config.publish_to.push(to.into().0);
        self
    }

    /// RabbitMQ: how the subscriber's queue (named by its topic) is declared at start: durability, type,
    /// exchange bindings. See [`amqp::Queue`](crate::amqp::Queue).
    #[cfg(feature = "amqp")]
    pub fn queue(mut self, queue: crate::amqp::Queue) -> Self {
        self.config.queue = Some(queue);
        self
    }

    /// Registers the subscriber with its handler (with [`when`](Self::when) filters: the handler of the
    /// messages no filter accepts). Settings are checked when the app starts.
    pub fn handle<H, Args>(self, handler: H)
    where
        H: Handler<Args>,
        Args: 'static,
    {
        self.register(Some(Arc::new(Erased::new(handler))));
    }

    fn register(self, fallback: Option<Arc<dyn ErasedHandler>>) {
        let mut config = self.config;
        config.filtered = !self.routes.is_empty();
        let handler: Arc<dyn ErasedHandler> = match (self.routes.is_empty(), fallback) {
            (true, Some(handler)) => handler,
            (_, fallback) => Arc::new(Routed::new(self.routes, fallback)),
        };
        self.registry.register(SubscriberSpec {
            config,
            handler,
            layers: self.layers,
            publish_layers: self.publish_layers,
            inherited_retry: None,
            inherited_dead_letter: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_resolution_follows_the_spec_table() {
        let mut c = SubscriberConfig::new("t");
        assert_eq!(c.resolve(true).unwrap().policy, AckPolicy::AckFirst);
        c.group_id = Some("g".into());
        c.auto_commit = Some(false);
        assert_eq!(c.resolve(true).unwrap().policy, AckPolicy::NackOnError);
        c.ack_policy = Some(AckPolicy::Manual);
        assert_eq!(c.resolve(true).unwrap().policy, AckPolicy::Manual);
        c.ack_policy = Some(AckPolicy::AckFirst);
        assert!(matches!(
            c.resolve(true),
            Err(ConfigError::ConflictingAckSettings { .. })
        ));
        c.auto_commit = None;
        c.group_id = None;
        c.ack_policy = Some(AckPolicy::Ack);
        let err = c.resolve(true).unwrap_err();
        assert!(err.to_string().contains(".group_id("), "{err}");
    }
}
