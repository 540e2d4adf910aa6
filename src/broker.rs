//! The broker handle: chosen by URL, it declares subscribers, publishes, and answers admin questions.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::asyncapi::{Declarations, DescribedPublisher, DescribedSubscriber};
use crate::brokers::{self, Backend};
use crate::config::ResolvedSubscriber;
use crate::engine::{Launch, SubscriberRuntime};
use crate::error::{AdminError, ConfigError, PublishError, StartError};
use crate::extract::StateMap;
use crate::handler::IntoPayload;
use crate::hooks::{Hook, Hooks};
use crate::metrics::Metrics;
use crate::middleware::{self, HandlerLayer, HandlerMiddleware, Outgoing, PublishAck, PublishLayer, PublishMiddleware};
use crate::observe::Observer;
use crate::publish::Publish;
use crate::publisher::{Publisher, PublisherCore};
use crate::request::{PendingRequest, Replies};
use crate::router::Router;
use crate::subscriber::{SubscriberBuilder, SubscriberSpec};
use crate::transport::Publisher as Sender;

struct Inner {
    /// The URL the broker was created with, and the one [`Broker::reconnect`] replaced it with (once,
    /// before an app starts), with the backend it chose.
    url: String,
    reconnected: OnceLock<String>,
    backend: RwLock<Arc<dyn Backend>>,
    subscribers: Mutex<Vec<SubscriberSpec>>,
    state: Mutex<StateMap>,
    observer: Arc<OnceLock<Observer>>,
    hooks: Mutex<Vec<Arc<dyn Hook>>>,
    default_retry: Mutex<Option<crate::RetryPolicy>>,
    /// Kafka static membership: this process's stable name in its groups.
    instance_id: Mutex<Option<String>>,
    metrics: Metrics,
    /// Handler middleware of every subscriber, outermost first.
    layers: Mutex<Vec<HandlerLayer>>,
    /// Publish middleware of every publish, outermost first.
    publish_layers: Mutex<Vec<PublishLayer>>,
    /// The backend wrapped in the publish middleware (the backend itself without any).
    sender: RwLock<Arc<dyn Sender>>,
    /// The innermost publish layer, next to the broker: the test client's recorder.
    tap: Mutex<Option<PublishLayer>>,
    routers: Mutex<Vec<Router>>,
    publishers: Mutex<Vec<Arc<PublisherCore>>>,
    /// The reply topic and its consumer, started by the first request.
    replies: tokio::sync::OnceCell<Arc<Replies>>,
    /// The subscribers apps have started, as the service's description shows them.
    started: Mutex<Vec<Arc<DescribedSubscriber>>>,
}

/// A connection to one broker, chosen by URL: `memory://` (optionally `memory://?partitions=N`, the
/// default partition count of auto-created topics, and `session.timeout.ms=MS`, how long a crashed
/// member keeps its partitions, 10 s by default) or, with the `kafka` feature,
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

/// A broker handle that does not keep the broker alive: what publishers and routers hold, so that the
/// broker (its connections, its reply consumer) goes away with the last `Broker` the user holds.
#[derive(Clone, Debug, Default)]
pub(crate) struct WeakBroker(std::sync::Weak<Inner>);

impl WeakBroker {
    pub(crate) fn upgrade(&self) -> Option<Broker> {
        self.0.upgrade().map(|inner| Broker { inner })
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("url", self.reconnected.get().unwrap_or(&self.url))
            .finish()
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("url", &self.url()).finish()
    }
}

impl Broker {
    /// Connects to the broker named by `url` (connections are made lazily). The scheme chooses the
    /// broker: `memory://`, `kafka://` (feature `kafka`), `amqp://` (feature `amqp`).
    pub fn new(url: &str) -> Result<Self, ConfigError> {
        Ok(Self::with_backend(url, brokers::open(url)?))
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
            Arc::new(crate::kafka::KafkaBackend::new(config)?),
        ))
    }

    fn with_backend(url: &str, backend: Arc<dyn Backend>) -> Self {
        let broker = Broker {
            inner: Arc::new(Inner {
                url: crate::redact::url(url),
                reconnected: OnceLock::new(),
                backend: RwLock::new(backend.clone()),
                subscribers: Mutex::new(Vec::new()),
                state: Mutex::new(StateMap::default()),
                observer: Arc::new(OnceLock::new()),
                hooks: Mutex::new(Vec::new()),
                default_retry: Mutex::new(None),
                instance_id: Mutex::new(None),
                metrics: Metrics::default(),
                layers: Mutex::new(Vec::new()),
                publish_layers: Mutex::new(Vec::new()),
                sender: RwLock::new(backend.clone()),
                tap: Mutex::new(None),
                routers: Mutex::new(Vec::new()),
                publishers: Mutex::new(Vec::new()),
                replies: tokio::sync::OnceCell::new(),
                started: Mutex::new(Vec::new()),
            }),
        };
        // Every publish is counted, with or without middleware.
        broker.rebuild_sender();
        broker
    }

    pub(crate) fn downgrade(&self) -> WeakBroker {
        WeakBroker(Arc::downgrade(&self.inner))
    }

    /// The URL this broker was created from, with any password or secret setting shown as `***` (this is
    /// what logs, errors and `Debug` show).
    pub fn url(&self) -> &str {
        self.inner.reconnected.get().unwrap_or(&self.inner.url)
    }

    /// Points this broker at another URL (the command line's `--broker`): what it declared stays, the
    /// connections go to the new broker. Only before an app starts; calls made earlier went to the old
    /// one.
    #[cfg(feature = "cli")]
    pub(crate) fn reconnect(&self, url: &str) -> Result<(), ConfigError> {
        let backend = brokers::open(url)?;
        if self.inner.reconnected.set(crate::redact::url(url)).is_err() {
            return Err(ConfigError::InvalidUrl {
                url: crate::redact::url(url),
                reason: "this broker was already pointed at another URL (the command line's --broker does it once)"
                    .to_owned(),
            });
        }
        *self.inner.backend.write().unwrap_or_else(|p| p.into_inner()) = backend;
        self.rebuild_sender();
        Ok(())
    }

    fn backend(&self) -> Arc<dyn Backend> {
        read(&self.inner.backend).clone()
    }

    /// Declares a subscriber to `topic`.
    pub fn subscriber(&self, topic: &str) -> SubscriberBuilder {
        SubscriberBuilder::new(crate::subscriber::Registry::Broker(self.clone()), topic)
    }

    /// Declares a publisher of `topic`: its defaults (key, partition, headers) apply to every record it
    /// sends, and the service's description lists it. See [`Publisher`].
    pub fn publisher(&self, topic: &str) -> Publisher {
        let mut publishers = lock(&self.inner.publishers);
        // Declared again (e.g. in a handler): the same publisher, with fresh defaults.
        if let Some(core) = publishers.iter().find(|c| c.topic() == topic) {
            return Publisher::new(core.clone());
        }
        let core = Arc::new(PublisherCore::declared(topic));
        core.bind(self, "");
        publishers.push(core.clone());
        Publisher::new(core)
    }

    /// Includes a router: its subscribers start with the app, its publishers publish through this
    /// broker. See [`Router`].
    pub fn include_router(&self, router: Router) {
        router.bind(self, "");
        lock(&self.inner.routers).push(router);
    }

    /// The topics of every publisher declared on this broker and its routers.
    pub fn publisher_topics(&self) -> Vec<String> {
        let mut cores = lock(&self.inner.publishers).clone();
        for router in lock(&self.inner.routers).iter() {
            cores.extend(router.publishers());
        }
        cores.iter().map(|c| c.topic()).collect()
    }

    /// Adds middleware around the handler calls of every subscriber of this broker (outside routers'
    /// and subscribers' middleware; the first added runs first). See [`middleware`](crate::middleware).
    ///
    /// ```
    /// use ferrostream::{Broker, middleware::{self, Next, Request}};
    /// let broker = Broker::new("memory://").unwrap().layer(middleware::from_fn(
    ///     |req: Request, next: Next| async move {
    ///         let topic = req.message().topic().to_owned();
    ///         let result = next.run(req).await;
    ///         if let Err(e) = &result {
    ///             eprintln!("{topic}: {e}");
    ///         }
    ///         result
    ///     },
    /// ));
    /// # let _ = broker;
    /// ```
    pub fn layer(self, layer: impl HandlerMiddleware) -> Self {
        lock(&self.inner.layers).push(layer.erase());
        self
    }

    /// Adds middleware around every publish made through this broker: `publish`, publishers, handler
    /// results, replies, dead letters (outermost first). See [`middleware`](crate::middleware).
    pub fn publish_layer(self, layer: impl PublishMiddleware) -> Self {
        lock(&self.inner.publish_layers).push(layer.erase());
        self.rebuild_sender();
        self
    }

    /// Puts a publish layer innermost, next to the broker, where it sees every record as it is sent
    /// (after every other middleware).
    pub(crate) fn set_publish_tap(&self, layer: PublishLayer) {
        *lock(&self.inner.tap) = Some(layer);
        self.rebuild_sender();
    }

    fn rebuild_sender(&self) {
        let sender = self.publish_chain(&[]);
        *self.inner.sender.write().unwrap_or_else(|p| p.into_inner()) = sender;
    }

    /// The backend wrapped in the broker's publish middleware, then `inner` (a router's or subscriber's),
    /// then the tap.
    fn publish_chain(&self, inner: &[PublishLayer]) -> Arc<dyn Sender> {
        let mut layers = lock(&self.inner.publish_layers).clone();
        layers.extend(inner.iter().cloned());
        layers.extend(lock(&self.inner.tap).iter().cloned());
        let metered = Arc::new(crate::metrics::Metered {
            inner: self.backend(),
            publishes: self.inner.metrics.publishes().clone(),
            system: crate::metrics::system_of(self.url()),
        });
        middleware::layered_sender(metered, &layers)
    }

    /// Publishes a payload; add key, partition, headers... then `.await` it.
    pub fn publish(&self, payload: impl IntoPayload, topic: &str) -> Publish {
        Publish::new(self.clone(), payload, topic)
    }

    /// Sends a request and resolves to its reply: publishes `payload` to `topic` with a `reply_to` naming
    /// this broker handle's reply topic and a fresh correlation id, and waits (30 s by default) for the
    /// reply that carries that id. A subscriber replies with its handler's result to any message that
    /// carries `reply_to`. Works on every broker, Kafka included. See [`PendingRequest`].
    pub fn request(&self, payload: impl IntoPayload, topic: &str) -> PendingRequest {
        PendingRequest::new(self.clone(), payload, topic)
    }

    /// The reply topic and its consumer, started on first use.
    pub(crate) async fn replies(&self) -> Result<Arc<Replies>, PublishError> {
        self.inner
            .replies
            .get_or_try_init(|| Replies::start(self))
            .await
            .cloned()
    }

    /// How many requests wait for their reply now (for tests and metrics: a request that ends in any
    /// way, reply, timeout or dropped, stops waiting).
    pub fn waiting_requests(&self) -> usize {
        self.inner.replies.get().map_or(0, |r| r.waiting())
    }

    /// Starts a consumer of the framework's own (the reply topic): it reads `topic` from its start in a
    /// group of its own, acks on receipt, and runs until `stop` says so or its sender is dropped.
    pub(crate) async fn start_internal<H, Args>(
        &self,
        topic: &str,
        stop: watch::Receiver<bool>,
        handler: H,
    ) -> Result<(), PublishError>
    where
        H: crate::Handler<Args>,
        Args: 'static,
    {
        let failed =
            |op: &'static str, e: String| PublishError::Broker(crate::BrokerError::Client { op, source: e.into() });
        let mut config = crate::config::SubscriberConfig::new(topic);
        if self.backend().log_admin().is_some() {
            self.backend()
                .declare_topic(topic, 1)
                .await
                .map_err(|e| failed("create the reply topic", e.to_string()))?;
        } else {
            // A queue broker: the consumer declares it, gone with the consumer (no queue left behind).
            #[cfg(feature = "amqp")]
            {
                config.queue = Some(crate::amqp::Queue::transient().auto_delete());
            }
        }
        config.group_id = Some(topic.to_owned());
        config.auto_commit = Some(true);
        config.auto_offset_reset = crate::OffsetReset::Earliest;
        let cfg = config
            .resolve(self.backend().has_groups())
            .map_err(|e| failed("configure the reply consumer", e.to_string()))?;
        let spec = SubscriberSpec {
            config,
            handler: Arc::new(crate::handler::Erased::new(handler)),
            layers: Vec::new(),
            publish_layers: Vec::new(),
            inherited_retry: None,
            inherited_dead_letter: None,
        };
        let (task, ready) = self
            .start_subscriber(cfg, &spec, stop)
            .await
            .map_err(|e| failed("start the reply consumer", e.to_string()))?;
        match tokio::time::timeout(Duration::from_secs(30), ready).await {
            Ok(Ok(())) => Ok(()),
            _ => {
                task.abort();
                Err(failed(
                    "start the reply consumer",
                    "no assignment within 30 s".to_owned(),
                ))
            }
        }
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
    ) -> Vec<Result<PublishAck, PublishError>> {
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

    /// Kafka static membership: names this process in its consumer groups with a stable id (a pod name
    /// of a StatefulSet, a host name), so that a restarted process takes its partitions back at once,
    /// without waiting out the dead instance's session (`session.timeout.ms`, 10 s by default) and
    /// without a rebalance of the other members.
    ///
    /// Each subscriber with a group joins as `group.instance.id` = `<id>-<subscriber name>` (characters
    /// Kafka refuses become `_`). The trade-off: a static member that stops, even gracefully, does not
    /// leave its group; its partitions wait for it to come back and move to the other members only after
    /// the session timeout. Use it for restarts and rolling deploys, not for a service whose members
    /// come and go for good. Two processes running with the same id fence each other: give every
    /// instance its own. Other brokers ignore it.
    ///
    /// ```
    /// let broker = ferrostream::Broker::new("memory://").unwrap().with_instance_id("orders-0");
    /// # let _ = broker;
    /// ```
    pub fn with_instance_id(self, id: impl Into<String>) -> Self {
        self.set_instance_id(id.into());
        self
    }

    /// [`with_instance_id`](Self::with_instance_id) on a shared handle: every clone sees it.
    pub(crate) fn set_instance_id(&self, id: String) {
        *lock(&self.inner.instance_id) = Some(id);
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

    /// Adds a hook that sees every event of this broker's subscribers started from now on (see
    /// [`hooks`](crate::hooks)).
    pub fn with_hook(self, hook: impl Hook) -> Self {
        lock(&self.inner.hooks).push(Arc::new(hook));
        self
    }

    fn unsupported(&self, op: &'static str) -> AdminError {
        AdminError::Unsupported {
            op,
            url: self.url().to_string(),
        }
    }

    /// The counters of this broker's subscribers.
    pub fn metrics(&self) -> Metrics {
        self.inner.metrics.clone()
    }

    /// Creates a topic with this many partitions (or grows an in-memory one); existing topics are kept.
    /// On RabbitMQ it declares a durable classic queue of that name (one partition only).
    pub async fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), AdminError> {
        self.backend().declare_topic(topic, partitions).await
    }

    /// How many messages wait in a queue (RabbitMQ; ready ones, not those delivered and unacked). Log
    /// brokers answer [`AdminError::Unsupported`]: ask [`committed_offsets`](Self::committed_offsets).
    pub async fn queue_depth(&self, queue: &str) -> Result<u64, AdminError> {
        match self.backend().queue_depth(queue) {
            Some(depth) => depth.await,
            None => Err(AdminError::Unsupported {
                op: "queue_depth",
                url: self.url().to_string(),
            }),
        }
    }

    /// The offsets a consumer group has committed for a topic, by partition.
    pub async fn committed_offsets(&self, group: &str, topic: &str) -> Result<BTreeMap<i32, i64>, AdminError> {
        let backend = self.backend();
        let admin = backend
            .log_admin()
            .ok_or_else(|| self.unsupported("committed_offsets"))?;
        admin.committed(group, topic).await
    }

    /// The next offset to be written in each partition of a topic (the high watermarks).
    pub async fn end_offsets(&self, topic: &str) -> Result<BTreeMap<i32, i64>, AdminError> {
        let backend = self.backend();
        let admin = backend.log_admin().ok_or_else(|| self.unsupported("end_offsets"))?;
        admin.end_offsets(topic).await
    }

    /// Sends through the publish chain (middleware, metering, the backend).
    pub(crate) fn send(&self, out: Outgoing) -> futures::future::BoxFuture<'static, Result<PublishAck, PublishError>> {
        // The future owns what it needs: no clone of the chain per publish.
        self.inner.sender.read().unwrap_or_else(|p| p.into_inner()).send(out)
    }

    pub(crate) fn register(&self, spec: SubscriberSpec) {
        lock(&self.inner.subscribers).push(spec);
    }

    /// Takes the subscribers declared since the last app started and validates them all (every error
    /// surfaces before anything starts). A later `App` on the same broker starts only newer ones, which
    /// is how a test adds a second group member to a running in-memory broker.
    pub(crate) fn take_subscribers(&self) -> Result<Vec<(ResolvedSubscriber, SubscriberSpec)>, ConfigError> {
        let (resolved, own) = self.pending_subscribers()?;
        lock(&self.inner.subscribers).drain(..own);
        for router in lock(&self.inner.routers).iter() {
            router.clear_subscribers();
        }
        lock(&self.inner.started).extend(resolved.iter().map(|(cfg, spec)| {
            Arc::new(DescribedSubscriber {
                cfg: cfg.clone(),
                handler: spec.handler.clone(),
            })
        }));
        Ok(resolved)
    }

    /// What the service's description is made from: the subscribers started and declared, the
    /// publishers declared.
    pub(crate) fn declarations(&self) -> Result<Declarations, ConfigError> {
        let started = lock(&self.inner.started).clone();
        let pending = self.pending_subscribers()?.0;
        let mut subscribers: Vec<DescribedSubscriber> = started
            .iter()
            .map(|s| DescribedSubscriber {
                cfg: s.cfg.clone(),
                handler: s.handler.clone(),
            })
            .collect();
        subscribers.extend(pending.into_iter().map(|(cfg, spec)| DescribedSubscriber {
            cfg,
            handler: spec.handler,
        }));
        let mut cores = lock(&self.inner.publishers).clone();
        for router in lock(&self.inner.routers).iter() {
            cores.extend(router.publishers());
        }
        let publishers = cores
            .iter()
            .map(|c| DescribedPublisher {
                topic: c.topic(),
                exchange: None,
                description: c.description(),
            })
            .collect();
        Ok(Declarations {
            url: self.url().to_string(),
            subscribers,
            publishers,
        })
    }

    /// The subscribers declared since the last start, validated (on copies: a start that fails keeps
    /// every declaration for the next try), and how many of them the broker itself holds (the rest are
    /// its routers').
    #[allow(clippy::type_complexity)]
    fn pending_subscribers(&self) -> Result<(Vec<(ResolvedSubscriber, SubscriberSpec)>, usize), ConfigError> {
        let mut specs = lock(&self.inner.subscribers).clone();
        let own = specs.len();
        for router in lock(&self.inner.routers).iter() {
            specs.extend(router.subscribers());
        }
        let layers = lock(&self.inner.layers).clone();
        for spec in &mut specs {
            spec.layers.splice(0..0, layers.iter().cloned());
        }
        let default_retry = *lock(&self.inner.default_retry);
        let instance_id = lock(&self.inner.instance_id).clone();
        let backend = &self.backend();
        let state = lock(&self.inner.state).clone();
        let mut names = std::collections::HashSet::new();
        specs
            .into_iter()
            .map(|mut s| {
                // A router's budget and dead letter, then the broker's default budget, cover every
                // at-least-once subscriber without its own (AckFirst cannot retry or dead-letter).
                if s.config.policy() == crate::AckPolicy::AckFirst {
                    if s.inherited_retry.is_some() || s.inherited_dead_letter.is_some() {
                        tracing::warn!(topic = %s.config.topic,
                            "an AckFirst subscriber takes neither its router's retry budget nor its dead letter; \
                             give it an at-least-once policy (e.g. `.ack_policy(AckPolicy::NackOnError)`) to use them");
                    }
                } else {
                    if s.config.retry.is_none() {
                        s.config.retry = s.inherited_retry.or(default_retry);
                    }
                    if s.config.dead_letter.is_none() {
                        // Not for the subscriber that reads the dead-letter topic itself.
                        s.config.dead_letter = s.inherited_dead_letter.clone().filter(|dl| *dl != s.config.topic);
                    }
                }
                let mut cfg = s.config.resolve(backend.has_groups())?;
                if let (Some(id), Some(_)) = (&instance_id, &cfg.group_id) {
                    cfg.group_instance_id = Some(crate::config::group_instance_id(id, &cfg.name));
                }
                if !names.insert(cfg.name.clone()) {
                    return Err(ConfigError::DuplicateSubscriber {
                        name: cfg.name.to_string(),
                    });
                }
                let topics = [Some(&cfg.topic), cfg.dead_letter.as_ref(), cfg.retry_topic.as_ref()];
                for topic in topics
                    .into_iter()
                    .flatten()
                    .chain(cfg.publish_to.iter().map(|t| &t.topic))
                {
                    backend.check_topic(topic).map_err(|reason| ConfigError::InvalidTopic {
                        subscriber: cfg.name.to_string(),
                        topic: topic.clone(),
                        reason,
                    })?;
                }
                if let Some((_, missing)) = s
                    .handler
                    .required_state()
                    .into_iter()
                    .find(|(t, _)| !state.contains(*t))
                {
                    return Err(ConfigError::MissingState {
                        subscriber: cfg.name.to_string(),
                        state: missing,
                    });
                }
                backend.check(&cfg)?;
                Ok((cfg, s))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|resolved| (resolved, own))
    }

    /// Starts one subscriber's engine; the receiver fires on its first assignment.
    pub(crate) async fn start_subscriber(
        &self,
        cfg: ResolvedSubscriber,
        spec: &SubscriberSpec,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(JoinHandle<()>, oneshot::Receiver<()>), StartError> {
        let counters = self.inner.metrics.counters(&cfg.name);
        let _ = counters.labels.set(crate::metrics::SubscriberLabels {
            system: crate::metrics::system_of(self.url()),
            topic: cfg.topic.clone(),
            group: cfg.group_id.clone(),
        });
        let rt = Arc::new(SubscriberRuntime {
            counters,
            cfg,
            handler: spec.handler.clone(),
            service: middleware::handler_service(spec.handler.clone(), &spec.layers),
            state: Arc::new(lock(&self.inner.state).clone()),
            // The broker's publish middleware outside the subscriber's (and its routers').
            publisher: self.publish_chain(&spec.publish_layers),
            hooks: Hooks::new(lock(&self.inner.hooks).clone(), self.inner.observer.clone()),
        });
        let (ready, ready_rx) = oneshot::channel();
        let task = self.backend().start(Launch { rt, shutdown, ready }).await?;
        Ok((task, ready_rx))
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // Replaced whole, never half-written.
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Guarded values are only pushed to or replaced whole: a panic cannot leave them half-written.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
