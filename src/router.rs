//! Routers: a group of subscribers and publishers with a topic prefix and shared defaults, included into
//! a broker or into another router.

use std::sync::{Arc, Mutex};

use crate::broker::{Broker, WeakBroker};
use crate::config::SubscriberConfig;
use crate::middleware::{HandlerLayer, HandlerMiddleware, PublishLayer, PublishMiddleware};
use crate::publisher::{Publisher, PublisherCore};
use crate::settle::AckPolicy;
use crate::subscriber::{Registry, SubscriberBuilder, SubscriberSpec};

/// Settings a router gives the subscribers that do not set their own.
#[derive(Default)]
struct Defaults {
    group_id: Option<String>,
    ack_policy: Option<AckPolicy>,
    auto_commit: Option<bool>,
    retry: Option<crate::RetryPolicy>,
    dead_letter: Option<String>,
}

#[derive(Default)]
pub(crate) struct RouterInner {
    prefix: String,
    defaults: Defaults,
    layers: Vec<HandlerLayer>,
    publish_layers: Vec<PublishLayer>,
    subscribers: Vec<SubscriberSpec>,
    publishers: Vec<Arc<PublisherCore>>,
    routers: Vec<Router>,
    /// Once included (all the way up to a broker): the broker and the prefix of the routers above.
    bound: Option<(WeakBroker, String)>,
}

impl RouterInner {
    pub(crate) fn register(&mut self, spec: SubscriberSpec) {
        self.subscribers.push(spec);
    }

    /// Gives a subscriber this router's prefix, defaults and middleware (its own settings win; the
    /// router's middleware runs outside its own).
    fn apply(&self, mut spec: SubscriberSpec) -> SubscriberSpec {
        let c: &mut SubscriberConfig = &mut spec.config;
        let prefix = &self.prefix;
        c.topic = format!("{prefix}{}", c.topic);
        for target in c.publish_to.iter_mut().filter(|t| t.core.is_none()) {
            target.topic = format!("{prefix}{}", target.topic);
        }
        if c.group_id.is_none() {
            c.group_id.clone_from(&self.defaults.group_id);
        }
        if c.auto_commit.is_none() && c.ack_policy.is_none() {
            c.auto_commit = self.defaults.auto_commit;
            c.ack_policy = self.defaults.ack_policy;
        }
        if let Some(dl) = &mut c.dead_letter {
            *dl = format!("{prefix}{dl}");
        }
        // The retry budget and dead letter wait for the final policy (an outer router may set it):
        // the innermost router that sets one wins.
        if let Some(dl) = &mut spec.inherited_dead_letter {
            *dl = format!("{prefix}{dl}");
        } else if let Some(dl) = &self.defaults.dead_letter {
            spec.inherited_dead_letter = Some(format!("{prefix}{dl}"));
        }
        if spec.inherited_retry.is_none() {
            spec.inherited_retry = self.defaults.retry;
        }
        spec.layers.splice(0..0, self.layers.iter().cloned());
        spec.publish_layers.splice(0..0, self.publish_layers.iter().cloned());
        spec
    }
}

/// A group of subscribers and publishers with a topic prefix and shared defaults (group, ack policy,
/// retry policy, dead letter, middleware). Names declared inside a router (topics, `publish_to` topics,
/// dead-letter topics) are relative to its prefix. Include it into a broker with
/// [`Broker::include_router`], or into another router (prefixes add up: the outer one first).
///
/// A subscriber's own settings win over the router's (an `AckFirst` subscriber takes neither the
/// router's retry budget nor its dead letter: it cannot use them); the router's middleware runs outside
/// the subscriber's (see [`middleware`](crate::middleware) for the whole order).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use ferrostream::{AckPolicy, App, Broker, RetryPolicy, Router};
/// let orders = Router::new("orders.")
///     .group_id("billing")
///     .ack_policy(AckPolicy::NackOnError)
///     .retry(RetryPolicy::new(3))
///     .dead_letter("dlt"); // orders.dlt
/// let billed = orders.publisher("billed"); // orders.billed
/// orders.subscriber("created") // orders.created, group billing
///     .publish_to(&billed)
///     .handle(|body: String| async move { format!("billed {body}") });
///
/// let broker = Broker::new("memory://")?;
/// broker.include_router(orders);
/// let app = App::new(broker.clone()).start().await?;
/// broker.publish("order 1", "orders.created").await?;
/// app.shutdown().await?;
/// # Ok(()) }
/// ```
#[must_use = "a router does nothing until it is included with `broker.include_router(router)`"]
pub struct Router {
    inner: Arc<Mutex<RouterInner>>,
}

impl Router {
    /// A router whose subscribers' and publishers' topics start with `prefix` (may be empty).
    pub fn new(prefix: impl Into<String>) -> Self {
        Router {
            inner: Arc::new(Mutex::new(RouterInner {
                prefix: prefix.into(),
                ..RouterInner::default()
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouterInner> {
        // Fields are replaced or pushed to whole: a panic cannot leave them half-written.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn edit(self, f: impl FnOnce(&mut RouterInner)) -> Self {
        f(&mut self.lock());
        self
    }

    /// The consumer group of its subscribers that name none.
    pub fn group_id(self, group: impl Into<String>) -> Self {
        let group = group.into();
        self.edit(|r| r.defaults.group_id = Some(group))
    }

    /// The ack policy of its subscribers that choose none (neither `ack_policy` nor `auto_commit`).
    pub fn ack_policy(self, policy: AckPolicy) -> Self {
        self.edit(|r| r.defaults.ack_policy = Some(policy))
    }

    /// `auto_commit` for its subscribers that choose no policy.
    pub fn auto_commit(self, enabled: bool) -> Self {
        self.edit(|r| r.defaults.auto_commit = Some(enabled))
    }

    /// The retry budget of its subscribers that have none.
    pub fn retry(self, policy: crate::RetryPolicy) -> Self {
        self.edit(|r| r.defaults.retry = Some(policy))
    }

    /// The dead-letter topic (relative to the prefix) of its subscribers that name none.
    pub fn dead_letter(self, topic: impl Into<String>) -> Self {
        let topic = topic.into();
        self.edit(|r| r.defaults.dead_letter = Some(topic))
    }

    /// Adds middleware around the handler calls of every subscriber of this router (and of routers
    /// included into it). See [`middleware`](crate::middleware).
    pub fn layer(self, layer: impl HandlerMiddleware) -> Self {
        let layer = layer.erase();
        self.edit(|r| r.layers.push(layer))
    }

    /// Adds middleware around what the framework publishes for this router's subscribers (results,
    /// replies, dead letters, retries).
    pub fn publish_layer(self, layer: impl PublishMiddleware) -> Self {
        let layer = layer.erase();
        self.edit(|r| r.publish_layers.push(layer))
    }

    /// Declares a subscriber to `topic` (relative to the prefix).
    pub fn subscriber(&self, topic: &str) -> SubscriberBuilder {
        SubscriberBuilder::new(Registry::Router(self.inner.clone()), topic)
    }

    /// Declares a publisher of `topic` (relative to the prefix). It can publish once the router is
    /// included into a broker (before that, a publish fails with
    /// [`PublishError::NotIncluded`](crate::PublishError::NotIncluded)).
    pub fn publisher(&self, topic: &str) -> Publisher {
        let core = Arc::new(PublisherCore::declared(topic));
        let mut inner = self.lock();
        if let Some((broker, above)) = &inner.bound
            && let Some(broker) = broker.upgrade()
        {
            core.bind(&broker, &format!("{above}{}", inner.prefix));
        }
        inner.publishers.push(core.clone());
        Publisher::new(core)
    }

    /// Includes another router: its prefix is added after this one's, and this router's defaults and
    /// middleware apply to its subscribers where its own do not say otherwise.
    pub fn include_router(&self, router: Router) {
        let mut inner = self.lock();
        if let Some((broker, above)) = &inner.bound
            && let Some(broker) = broker.upgrade()
        {
            router.bind(&broker, &format!("{above}{}", inner.prefix));
        }
        inner.routers.push(router);
    }

    /// Binds every publisher of this router (and of its routers) to the broker, with full topic names.
    pub(crate) fn bind(&self, broker: &Broker, above: &str) {
        let mut inner = self.lock();
        let prefix = format!("{above}{}", inner.prefix);
        for core in &inner.publishers {
            core.bind(broker, &prefix);
        }
        for child in &inner.routers {
            child.bind(broker, &prefix);
        }
        inner.bound = Some((broker.downgrade(), above.to_owned()));
    }

    /// Every publisher declared in this router and the routers included into it.
    pub(crate) fn publishers(&self) -> Vec<Arc<PublisherCore>> {
        let inner = self.lock();
        let mut all = inner.publishers.clone();
        for child in &inner.routers {
            all.extend(child.publishers());
        }
        all
    }

    /// The subscribers declared since the last start (of its included routers too), with this router's
    /// prefix, defaults and middleware applied.
    pub(crate) fn subscribers(&self) -> Vec<SubscriberSpec> {
        let inner = self.lock();
        let mut specs = inner.subscribers.clone();
        for child in &inner.routers {
            specs.extend(child.subscribers());
        }
        specs.into_iter().map(|s| inner.apply(s)).collect()
    }

    /// Forgets the subscribers an app started.
    pub(crate) fn clear_subscribers(&self) {
        let mut inner = self.lock();
        inner.subscribers.clear();
        for child in &inner.routers {
            child.clear_subscribers();
        }
    }
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("Router")
            .field("prefix", &inner.prefix)
            .field("subscribers", &inner.subscribers.len())
            .field("publishers", &inner.publishers.len())
            .field("routers", &inner.routers.len())
            .finish()
    }
}
