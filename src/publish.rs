//! Publishing: `broker.publish(payload, topic)` with optional key, partition, headers, timestamp and
//! correlation id; it resolves once the broker has acknowledged the record ([guarantee 3.11](crate::guarantees)).

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::future::BoxFuture;

use std::sync::Arc;

use bytes::Bytes;

use crate::broker::Broker;
use crate::error::{Error, PublishError};
use crate::handler::IntoPayload;
use crate::message::{CORRELATION_ID, REPLY_TO};
use crate::publisher::{PublishDefaults, Publisher};
use crate::transport::Outgoing;
pub use crate::transport::PublishAck;

/// A publish being built; `.await` it to send.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = ferrostream::Broker::new("memory://")?;
/// let ack = broker.publish("Hello!", "test-topic").key("user-1").header("tenant", "acme").await?;
/// assert_eq!(ack.offset, 0);
/// # Ok(()) }
/// ```
#[must_use = "nothing is sent until the publish is awaited"]
pub struct Publish {
    broker: Result<Broker, PublishError>,
    record: Result<Outgoing, Error>,
    defaults: Option<Arc<PublishDefaults>>,
}

impl Publish {
    pub(crate) fn new(broker: Broker, payload: impl IntoPayload, topic: &str) -> Self {
        let record = payload.into_payload().map(|p| Outgoing::new(topic.to_owned(), p));
        Publish {
            broker: Ok(broker),
            record,
            defaults: None,
        }
    }

    pub(crate) fn from_publisher(publisher: &Publisher, payload: impl IntoPayload) -> Self {
        let record = payload.into_payload().map(|p| Outgoing::new(publisher.topic(), p));
        Publish {
            broker: publisher.core.broker(),
            record,
            defaults: Some(publisher.defaults.clone()),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Outgoing)) -> Self {
        if let Ok(r) = &mut self.record {
            f(r);
        }
        self
    }

    /// Sets the key (records with one key land in one partition, in order).
    pub fn key(self, key: impl Into<Bytes>) -> Self {
        let key = key.into();
        self.edit(|r| r.key = Some(key))
    }

    /// Sends to this partition instead of the key's.
    pub fn partition(self, partition: i32) -> Self {
        self.edit(|r| r.partition = Some(partition))
    }

    /// Adds a header.
    pub fn header(self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        let (name, value) = (name.into(), value.into());
        self.edit(|r| r.headers.insert(name, value))
    }

    /// Sets the timestamp (milliseconds since the Unix epoch; default: now).
    pub fn timestamp(self, millis: i64) -> Self {
        self.edit(|r| r.timestamp = Some(millis))
    }

    /// RabbitMQ: publishes to this exchange, with the topic as routing key (without it, to the default
    /// exchange, which routes to the queue the topic names). Log brokers refuse it with
    /// [`PublishError::Unsupported`].
    pub fn exchange(self, exchange: impl Into<String>) -> Self {
        let exchange = exchange.into();
        self.edit(|r| r.exchange = Some(exchange))
    }

    /// Sets the reply-to header: where a reply to this message should go.
    pub fn reply_to(self, topic: impl Into<String>) -> Self {
        let topic = topic.into();
        self.edit(|r| r.headers.set(REPLY_TO, topic.into_bytes()))
    }

    /// Sets the correlation id header.
    pub fn correlation_id(self, id: impl Into<String>) -> Self {
        let id = id.into();
        self.edit(|r| r.headers.set(CORRELATION_ID, id.into_bytes()))
    }
}

impl IntoFuture for Publish {
    type Output = Result<PublishAck, PublishError>;
    type IntoFuture = PublishFuture;

    fn into_future(self) -> PublishFuture {
        PublishFuture(PublishState::Unsent(self))
    }
}

/// A [`Publish`] being sent: nothing is sent until it is first polled; it then hands the record to the
/// broker's publish chain (on Kafka the record is queued in the producer there) and waits for the
/// acknowledgement in the chain's own future, so a publish allocates once.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::future::IntoFuture;
/// let broker = ferrostream::Broker::new("memory://")?;
/// let first: ferrostream::PublishFuture = broker.publish("one", "events").into_future();
/// let second = broker.publish("two", "events").into_future();
/// let (a, b) = futures::join!(first, second); // sent in the order they are first polled
/// assert_eq!((a?.offset, b?.offset), (0, 1));
/// # Ok(()) }
/// ```
#[must_use = "nothing is sent until the publish is awaited"]
pub struct PublishFuture(PublishState);

// The record travels inline until the first poll: boxing it would be the allocation this type avoids.
#[allow(clippy::large_enum_variant)]
enum PublishState {
    Unsent(Publish),
    Sent(BoxFuture<'static, Result<PublishAck, PublishError>>),
    Done,
}

impl Publish {
    /// Hands the record to the publish chain.
    fn send(self) -> BoxFuture<'static, Result<PublishAck, PublishError>> {
        let record = self.record.map_err(|e| PublishError::Encode { source: Box::new(e) });
        match (record, self.broker) {
            (Ok(mut record), Ok(broker)) => {
                if let Some(defaults) = &self.defaults {
                    defaults.apply(&mut record);
                }
                broker.send(record)
            }
            (Err(e), _) | (_, Err(e)) => Box::pin(std::future::ready(Err(e))),
        }
    }
}

impl Future for PublishFuture {
    type Output = Result<PublishAck, PublishError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let state = &mut self.0;
        if matches!(state, PublishState::Unsent(_))
            && let PublishState::Unsent(publish) = std::mem::replace(state, PublishState::Done)
        {
            *state = PublishState::Sent(publish.send());
        }
        match state {
            PublishState::Sent(sent) => {
                let out = ready!(sent.as_mut().poll(cx));
                *state = PublishState::Done;
                Poll::Ready(out)
            }
            PublishState::Unsent(_) | PublishState::Done => panic!("a publish polled after it completed"),
        }
    }
}
