//! RabbitMQ (`amqp://user:password@host:port/vhost`, feature `amqp`), on [lapin](https://docs.rs/lapin):
//! pure Rust, tokio-native, with publisher confirms and `basic.return` for unroutable publishes.
//!
//! A subscriber consumes one queue, named by its topic, declared at start with its [`Queue`] settings
//! (durable or not, classic or quorum, bound to an [`Exchange`] with a routing key or header arguments).
//! Settles are per delivery: `ack` is `basic.ack`, `reject` is `basic.reject(requeue=false)` and `nack`
//! puts the message back (a quorum queue's `basic.nack(requeue=true)`, which counts deliveries; on a
//! classic queue, which counts nothing, a confirmed re-publish with an attempt header and then an ack).
//! The prefetch ([`Queue::prefetch`]) bounds what is delivered and not yet acked; `max_in_flight(n)` of
//! those run at once. Publishing waits for the broker's confirm and fails on an
//! unroutable record (published `mandatory`). A lost connection is re-opened with backoff; what was not
//! acked comes back from the broker.
//!
//! What differs from a log: `AckFirst` acks on receipt, but RabbitMQ confirms no ack, so a connection lost
//! the instant after an ack was written can have the broker deliver it again (at most once holds for
//! crashes of the consumer, not for that instant); a nack's delay is waited out in the consumer, the
//! delivery still unacked and holding a prefetch slot (keep delays well under the broker's
//! `consumer_timeout`, 30 minutes by default); the commit settings (`commit_interval`, `commit_every`,
//! `commit_sync_each`) mean nothing here, as settles go out at once.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use ferrostream::{AckPolicy, Broker};
//! use ferrostream::amqp::{Exchange, Queue};
//!
//! let broker = Broker::new("amqp://guest:guest@127.0.0.1:5672/%2f")?;
//! broker
//!     .subscriber("billing")
//!     .queue(Queue::durable().quorum().bind(Exchange::topic("orders"), "order.*"))
//!     .ack_policy(AckPolicy::NackOnError)
//!     .handle(|body: String| async move { println!("{body}") });
//! broker.publish("order 1", "order.created").exchange("orders").await?;
//! # Ok(()) }
//! ```

mod consumer;
mod convert;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use lapin::Confirmation;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use super::Backend;
use crate::config::ResolvedSubscriber;
use crate::engine::Launch;
use crate::error::{AdminError, BoxError, BrokerError, ConfigError, PublishError, StartError};
use crate::transport::{Outgoing, PublishAck, Publisher};

/// How long a publish waits for the broker's confirm.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting and declaring may take before the operation fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The kind of an exchange: how it routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    /// To the queues whose binding key equals the routing key.
    Direct,
    /// To the queues whose binding pattern (`*` one word, `#` any) matches the routing key.
    Topic,
    /// To every bound queue.
    Fanout,
    /// By header values (the binding's arguments, with `x-match` `all` or `any`).
    Headers,
}

/// An exchange a subscriber's queue is bound to; declared (durable) at start if it does not exist.
///
/// ```
/// use ferrostream::amqp::Exchange;
/// let events = Exchange::topic("events");
/// # let _ = events;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    name: String,
    kind: ExchangeKind,
    durable: bool,
}

impl Exchange {
    /// An exchange of this kind.
    pub fn new(name: impl Into<String>, kind: ExchangeKind) -> Self {
        Exchange {
            name: name.into(),
            kind,
            durable: true,
        }
    }
    /// A direct exchange.
    pub fn direct(name: impl Into<String>) -> Self {
        Self::new(name, ExchangeKind::Direct)
    }
    /// A topic exchange.
    pub fn topic(name: impl Into<String>) -> Self {
        Self::new(name, ExchangeKind::Topic)
    }
    /// A fanout exchange.
    pub fn fanout(name: impl Into<String>) -> Self {
        Self::new(name, ExchangeKind::Fanout)
    }
    /// A headers exchange.
    pub fn headers(name: impl Into<String>) -> Self {
        Self::new(name, ExchangeKind::Headers)
    }
    /// Declared transient (gone when the broker restarts); exchanges are durable by default.
    pub fn transient(mut self) -> Self {
        self.durable = false;
        self
    }
}

/// The type of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// A classic queue.
    #[default]
    Classic,
    /// A replicated quorum queue (always durable); it counts deliveries, which is where a redelivered
    /// message's attempt number comes from.
    Quorum,
}

/// A binding of a subscriber's queue to an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Binding {
    exchange: Exchange,
    routing_key: String,
    arguments: Vec<(String, String)>,
}

/// How a subscriber's queue (named by its topic) is declared at start. Without one, the queue is durable,
/// classic, and reached through the default exchange by its name.
///
/// ```
/// use ferrostream::amqp::{Exchange, Queue};
/// let q = Queue::durable().quorum().bind(Exchange::topic("orders"), "order.*");
/// let h = Queue::transient().bind_headers(Exchange::headers("docs"), [("kind", "invoice")], true);
/// # let _ = (q, h);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    durable: bool,
    auto_delete: bool,
    kind: QueueType,
    bindings: Vec<Binding>,
    prefetch: Option<u16>,
}

impl Queue {
    /// A queue that survives a broker restart (with persistent messages, so do they).
    pub fn durable() -> Self {
        Queue {
            durable: true,
            auto_delete: false,
            kind: QueueType::Classic,
            bindings: Vec::new(),
            prefetch: None,
        }
    }

    /// A queue that does not survive a broker restart.
    pub fn transient() -> Self {
        Queue {
            durable: false,
            ..Self::durable()
        }
    }

    /// Deleted by the broker when its last consumer goes away (a reply queue, a temporary subscription);
    /// messages that arrive while it has no consumer are lost.
    pub fn auto_delete(mut self) -> Self {
        self.auto_delete = true;
        self
    }

    /// A quorum queue (always durable).
    pub fn quorum(mut self) -> Self {
        self.kind = QueueType::Quorum;
        self.durable = true;
        self
    }

    /// Binds the queue to `exchange` with a routing key (a pattern on a topic exchange; ignored by fanout).
    pub fn bind(mut self, exchange: Exchange, routing_key: impl Into<String>) -> Self {
        self.bindings.push(Binding {
            exchange,
            routing_key: routing_key.into(),
            arguments: Vec::new(),
        });
        self
    }

    /// Binds the queue to a headers exchange: messages whose headers match `all` (or `any`) of these.
    pub fn bind_headers<K: Into<String>, V: Into<String>>(
        mut self,
        exchange: Exchange,
        headers: impl IntoIterator<Item = (K, V)>,
        all: bool,
    ) -> Self {
        let mut arguments: Vec<(String, String)> = vec![("x-match".into(), if all { "all" } else { "any" }.into())];
        arguments.extend(headers.into_iter().map(|(k, v)| (k.into(), v.into())));
        self.bindings.push(Binding {
            exchange,
            routing_key: String::new(),
            arguments,
        });
        self
    }

    /// The prefetch: how many messages the broker delivers before waiting for acks. `max_in_flight` of
    /// them run at once and the rest wait, in order; a message a `Manual` handler has not settled yet
    /// still counts. Default: twice `max_in_flight`, at least 64.
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = Some(n.max(1));
        self
    }

    pub(crate) fn kind(&self) -> QueueType {
        self.kind
    }

    /// The AsyncAPI AMQP channel binding of the queue `name` (the exchanges it is bound to as an
    /// extension: the binding has no field for them).
    pub(crate) fn describe(&self, name: &str, binding_version: &str) -> serde_json::Value {
        let bindings: Vec<serde_json::Value> = self
            .bindings
            .iter()
            .map(|b| {
                serde_json::json!({
                    "exchange": b.exchange.name,
                    "type": format!("{:?}", b.exchange.kind).to_lowercase(),
                    "routingKey": b.routing_key,
                    "arguments": b.arguments.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                })
            })
            .collect();
        serde_json::json!({
            "is": "queue",
            "queue": {
                "name": name,
                "durable": self.durable,
                "exclusive": false,
                "autoDelete": self.auto_delete,
            },
            "x-bindings": bindings,
            "bindingVersion": binding_version,
        })
    }

    /// The prefetch for a subscriber running `max_in_flight` handlers at once.
    pub(crate) fn prefetch_for(&self, max_in_flight: usize) -> u16 {
        self.prefetch
            .unwrap_or_else(|| u16::try_from(max_in_flight.saturating_mul(2).max(64)).unwrap_or(u16::MAX))
    }
}

impl Default for Queue {
    fn default() -> Self {
        Queue::durable()
    }
}

fn client_error(op: &'static str, e: impl Into<BoxError>) -> BrokerError {
    BrokerError::Client { op, source: e.into() }
}

/// Connects, within [`CONNECT_TIMEOUT`]. The name shows in RabbitMQ's connection list (`rabbitmqctl
/// list_connections client_properties`, the management UI).
async fn connect(uri: &str, name: String) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(uri, props)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(client_error("connect", e)),
        Err(_) => Err(BrokerError::Timeout {
            op: "connect",
            timeout: CONNECT_TIMEOUT,
        }),
    }
}

/// Declares `queue` as `decl` says, with its exchanges and bindings.
async fn declare(channel: &Channel, queue: &str, decl: &Queue) -> Result<(), BrokerError> {
    let mut args = FieldTable::default();
    if decl.kind == QueueType::Quorum {
        args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    }
    let opts = QueueDeclareOptions {
        durable: decl.durable,
        auto_delete: decl.auto_delete,
        ..Default::default()
    };
    channel
        .queue_declare(queue.into(), opts, args)
        .await
        .map_err(|e| client_error("declare queue", e))?;
    for b in &decl.bindings {
        let kind = match b.exchange.kind {
            ExchangeKind::Direct => lapin::ExchangeKind::Direct,
            ExchangeKind::Topic => lapin::ExchangeKind::Topic,
            ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
            ExchangeKind::Headers => lapin::ExchangeKind::Headers,
        };
        let opts = ExchangeDeclareOptions {
            durable: b.exchange.durable,
            ..Default::default()
        };
        channel
            .exchange_declare(b.exchange.name.as_str().into(), kind, opts, FieldTable::default())
            .await
            .map_err(|e| client_error("declare exchange", e))?;
        let mut args = FieldTable::default();
        for (k, v) in &b.arguments {
            args.insert(k.as_str().into(), AMQPValue::LongString(LongString::from(v.as_str())));
        }
        channel
            .queue_bind(
                queue.into(),
                b.exchange.name.as_str().into(),
                b.routing_key.as_str().into(),
                QueueBindOptions::default(),
                args,
            )
            .await
            .map_err(|e| client_error("bind queue", e))?;
    }
    Ok(())
}

/// A channel whose publishes the broker confirms.
async fn confirming_channel(conn: &Connection) -> Result<Channel, BrokerError> {
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| client_error("open channel", e))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| client_error("enable publisher confirms", e))?;
    Ok(channel)
}

/// The publishing side: one connection and one confirming channel, opened on first use and again after
/// they fail.
struct PublishChannel {
    conn: Connection,
    channel: Channel,
}

/// A RabbitMQ broker.
pub(crate) struct AmqpBackend {
    uri: Arc<str>,
    publishing: Arc<Mutex<Option<PublishChannel>>>,
}

/// `amqp://user:password@host:port/vhost` (lapin's URI syntax; `%2f` is the default vhost `/`).
pub(crate) fn open(url: &str, _rest: &str) -> Result<Arc<dyn Backend>, ConfigError> {
    url.parse::<lapin::uri::AMQPUri>()
        .map_err(|e| ConfigError::InvalidUrl {
            url: crate::redact::url(url),
            reason: format!(
                "{e}; write amqp://user:password@host:port/vhost (e.g. amqp://guest:guest@127.0.0.1:5672/%2f)"
            ),
        })?;
    Ok(Arc::new(AmqpBackend {
        uri: url.into(),
        publishing: Arc::new(Mutex::new(None)),
    }))
}

impl AmqpBackend {
    /// The publishing channel, (re)opened when there is none or it failed: a new channel on the same
    /// connection while that is alive (a failed declaration closes only its channel), else a new
    /// connection.
    async fn channel(publishing: &Mutex<Option<PublishChannel>>, uri: &str) -> Result<Channel, BrokerError> {
        let mut slot = publishing.lock().await;
        if let Some(p) = slot.as_mut()
            && p.conn.status().connected()
        {
            if !p.channel.status().connected() {
                p.channel = confirming_channel(&p.conn).await?;
            }
            return Ok(p.channel.clone());
        }
        let conn = connect(uri, format!("ferrostream publisher {}", std::process::id())).await?;
        let channel = confirming_channel(&conn).await?;
        *slot = Some(PublishChannel {
            conn,
            channel: channel.clone(),
        });
        Ok(channel)
    }

    async fn publish(
        publishing: &Mutex<Option<PublishChannel>>,
        uri: &str,
        out: Outgoing,
    ) -> Result<PublishAck, PublishError> {
        if out.partition.is_some() {
            return Err(PublishError::Unsupported {
                what: "publishing to a partition",
                url: crate::redact::url(uri),
            });
        }
        let exchange = out.exchange.clone().unwrap_or_default();
        let props = convert::properties(&out);
        // One retry on a fresh channel: a connection lost since the last publish is re-opened at once.
        let mut attempt = 0;
        let confirm = loop {
            attempt += 1;
            let channel = Self::channel(publishing, uri).await?;
            let opts = BasicPublishOptions {
                mandatory: out.mandatory,
                ..Default::default()
            };
            let sent = channel
                .basic_publish(
                    exchange.as_str().into(),
                    out.topic.as_str().into(),
                    opts,
                    &out.payload,
                    props.clone(),
                )
                .await;
            let confirmed = match sent {
                Ok(c) => match tokio::time::timeout(PUBLISH_TIMEOUT, c).await {
                    Ok(r) => r,
                    Err(_) => {
                        return Err(PublishError::Timeout {
                            timeout: PUBLISH_TIMEOUT,
                        });
                    }
                },
                Err(e) => Err(e),
            };
            match confirmed {
                Ok(c) => break c,
                Err(e) if attempt >= 2 => return Err(client_error("publish", e).into()),
                Err(e) => tracing::debug!(error = %e, "publish failed; re-opening the publishing channel"),
            }
        };
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(PublishAck {
                topic: out.topic,
                partition: 0,
                offset: -1,
            }),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => Err(PublishError::Unroutable {
                exchange,
                routing_key: out.topic,
                reason: returned.reply_text.to_string(),
            }),
            Confirmation::Nack(None) => Err(PublishError::Refused {
                reason: "basic.nack (a queue that rejects publishes when full, or an internal broker error)".to_owned(),
            }),
        }
    }
}

impl Publisher for AmqpBackend {
    fn send(&self, out: Outgoing) -> BoxFuture<'static, Result<PublishAck, PublishError>> {
        let (publishing, uri) = (self.publishing.clone(), self.uri.clone());
        Box::pin(async move { Self::publish(&publishing, &uri, out).await })
    }
}

impl Backend for AmqpBackend {
    fn has_groups(&self) -> bool {
        false
    }

    fn check_topic(&self, topic: &str) -> Result<(), String> {
        match topic.len() {
            0 => Err("a queue name cannot be empty here (the broker would name it)".to_owned()),
            n if n > 255 => Err(format!("a queue name has at most 255 bytes; this one has {n}")),
            _ => Ok(()),
        }
    }

    fn check(&self, cfg: &ResolvedSubscriber) -> Result<(), ConfigError> {
        if cfg.retry_topic.is_some() {
            return Err(ConfigError::InvalidSetting {
                subscriber: cfg.name.to_string(),
                what: "non-blocking retries (a retry topic) are for log brokers; on RabbitMQ a nack puts the \
                       message back in its queue: use `RetryPolicy::new(n)` without `.non_blocking()`"
                    .to_owned(),
            });
        }
        Ok(())
    }

    fn start(&self, launch: Launch) -> BoxFuture<'_, Result<JoinHandle<()>, StartError>> {
        Box::pin(async move {
            let cfg = &launch.rt.cfg;
            let decl = cfg.queue.clone().unwrap_or_default();
            let mut consumer = consumer::AmqpConsumer::new(self.uri.clone(), cfg, decl);
            consumer.open_first().await?;
            if let Some(dlt) = &cfg.dead_letter {
                // The dead-letter queue must exist for its (mandatory) publish to be routed.
                let declared = async {
                    let channel = Self::channel(&self.publishing, &self.uri).await?;
                    declare(&channel, dlt, &Queue::durable()).await
                };
                tokio::time::timeout(CONNECT_TIMEOUT, declared)
                    .await
                    .unwrap_or(Err(BrokerError::Timeout {
                        op: "declare the dead-letter queue",
                        timeout: CONNECT_TIMEOUT,
                    }))?;
            }
            Ok(launch.spawn(consumer))
        })
    }

    fn declare_topic<'a>(&'a self, topic: &'a str, partitions: i32) -> BoxFuture<'a, Result<(), AdminError>> {
        let topic = topic.to_owned();
        Box::pin(async move {
            if partitions != 1 {
                return Err(AdminError::Unsupported {
                    op: "a queue with several partitions",
                    url: crate::redact::url(&self.uri),
                });
            }
            let channel = Self::channel(&self.publishing, &self.uri).await?;
            Ok(declare(&channel, &topic, &Queue::durable()).await?)
        })
    }

    fn queue_depth(&self, queue: &str) -> Option<BoxFuture<'_, Result<u64, AdminError>>> {
        let queue = queue.to_owned();
        Some(Box::pin(async move {
            let channel = Self::channel(&self.publishing, &self.uri).await?;
            let opts = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let q = channel
                .queue_declare(queue.as_str().into(), opts, FieldTable::default())
                .await
                .map_err(|e| {
                    let missing = matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
                        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)));
                    match missing {
                        true => AdminError::UnknownTopic { topic: queue.clone() },
                        false => client_error("queue depth", e).into(),
                    }
                })?;
            Ok(u64::from(q.message_count()))
        }))
    }
}
