//! Publisher objects: a topic declared once with its defaults (key, partition, headers, exchange),
//! reused from handlers and as a subscriber's result destination, and listed for the service's
//! description.

use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;

use crate::broker::{Broker, WeakBroker};
use crate::error::{BrokerError, PublishError};
use crate::handler::IntoPayload;
use crate::message::Headers;
use crate::publish::Publish;
use crate::transport::Outgoing;

/// What a publisher adds to every record it sends.
#[derive(Debug, Clone, Default)]
pub(crate) struct PublishDefaults {
    pub(crate) key: Option<Bytes>,
    pub(crate) partition: Option<i32>,
    pub(crate) headers: Headers,
    pub(crate) exchange: Option<String>,
}

impl PublishDefaults {
    /// Applies the defaults to a record (a record's own key, partition and exchange win; headers add).
    pub(crate) fn apply(&self, out: &mut Outgoing) {
        if out.key.is_none() {
            out.key.clone_from(&self.key);
        }
        if out.partition.is_none() {
            out.partition = self.partition;
        }
        if out.exchange.is_none() {
            out.exchange.clone_from(&self.exchange);
        }
        for (name, value) in self.headers.iter() {
            if out.headers.get(name).is_none() {
                out.headers.insert(name, value.clone());
            }
        }
    }
}

/// A publisher as a broker or router holds it: its topic (a router's prefixes are added when the router
/// is included into a broker) and the broker it sends through (set then).
#[derive(Debug, Default)]
pub(crate) struct PublisherCore {
    /// The topic as declared.
    declared: String,
    /// The full topic.
    topic: Mutex<String>,
    broker: OnceLock<WeakBroker>,
    /// What the service's description says about it.
    description: Mutex<Option<String>>,
}

impl PublisherCore {
    pub(crate) fn declared(topic: &str) -> Self {
        PublisherCore {
            declared: topic.to_owned(),
            topic: Mutex::new(topic.to_owned()),
            ..PublisherCore::default()
        }
    }

    pub(crate) fn topic(&self) -> String {
        self.topic.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn description(&self) -> Option<String> {
        self.description.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The broker it publishes through: not yet included (a router's), or gone.
    pub(crate) fn broker(&self) -> Result<Broker, PublishError> {
        match self.broker.get() {
            None => Err(PublishError::NotIncluded { topic: self.topic() }),
            Some(weak) => weak.upgrade().ok_or(PublishError::Broker(BrokerError::Closed)),
        }
    }

    /// Sends through `broker`, to the declared topic under `prefix`.
    pub(crate) fn bind(&self, broker: &Broker, prefix: &str) {
        *self.topic.lock().unwrap_or_else(|p| p.into_inner()) = format!("{prefix}{}", self.declared);
        let _ = self.broker.set(broker.downgrade());
    }
}

/// A publisher of one topic, declared once with [`Broker::publisher`] or
/// [`Router::publisher`](crate::Router::publisher), with the defaults every record it sends gets. Cheap
/// to clone: hand it to handlers as state, or make it a subscriber's result destination with
/// [`publish_to`](crate::SubscriberBuilder::publish_to). It does not keep its broker alive: once every
/// `Broker` handle (and the app) is gone, its publishes fail with
/// [`BrokerError::Closed`](crate::BrokerError::Closed).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use ferrostream::{Broker, Publisher, State};
/// let broker = Broker::new("memory://")?;
/// let audit = broker.publisher("audit").header("service", "billing");
/// let broker = broker.with_state(audit.clone());
/// broker.subscriber("orders").group_id("billing").auto_commit(false)
///     .publish_to(&broker.publisher("invoices").key("fixed-key"))
///     .handle(|body: String, State(audit): State<Publisher>| async move {
///         audit.publish(format!("billing {body}")).await?;
///         Ok::<_, ferrostream::PublishError>(format!("invoice for {body}"))
///     });
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Publisher {
    pub(crate) core: Arc<PublisherCore>,
    pub(crate) defaults: Arc<PublishDefaults>,
}

impl Publisher {
    pub(crate) fn new(core: Arc<PublisherCore>) -> Self {
        Publisher {
            core,
            defaults: Arc::default(),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut PublishDefaults)) -> Self {
        f(Arc::make_mut(&mut self.defaults));
        self
    }

    /// Every record gets this key unless the publish sets its own.
    pub fn key(self, key: impl Into<Bytes>) -> Self {
        let key = key.into();
        self.edit(|d| d.key = Some(key))
    }

    /// Every record goes to this partition unless the publish says otherwise.
    pub fn partition(self, partition: i32) -> Self {
        self.edit(|d| d.partition = Some(partition))
    }

    /// Every record gets this header (a publish's own header of that name wins).
    pub fn header(self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        let (name, value) = (name.into(), value.into());
        self.edit(|d| d.headers.insert(name, value))
    }

    /// RabbitMQ: publishes through this exchange, with the topic as routing key.
    pub fn exchange(self, exchange: impl Into<String>) -> Self {
        let exchange = exchange.into();
        self.edit(|d| d.exchange = Some(exchange))
    }

    /// What it publishes, in a sentence or two: the description of its operation in the service's
    /// AsyncAPI document and docs page.
    pub fn description(self, text: impl Into<String>) -> Self {
        *self.core.description.lock().unwrap_or_else(|p| p.into_inner()) = Some(text.into());
        self
    }

    /// The topic it publishes to (with its routers' prefixes once included).
    pub fn topic(&self) -> String {
        self.core.topic()
    }

    /// Publishes a payload with this publisher's defaults; add a key, headers... then `.await` it.
    pub fn publish(&self, payload: impl IntoPayload) -> Publish {
        Publish::from_publisher(self, payload)
    }

    pub(crate) fn target(&self) -> crate::config::PublishTarget {
        crate::config::PublishTarget {
            topic: self.topic(),
            core: Some(self.core.clone()),
            defaults: self.defaults.clone(),
        }
    }
}
