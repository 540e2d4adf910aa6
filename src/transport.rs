//! The contract between the broker-agnostic engine and one broker: a consumer [`Transport`] that delivers
//! records and realises settles, and a [`Publisher`] that sends records.
//!
//! The engine decides; the transport realises. Each record arrives from a *source* (a Kafka partition, an
//! AMQP consumer's queue) with a *sequence* (a Kafka offset, an AMQP delivery tag): together they are the
//! record's settle token. The engine tells the transport the one final decision for a token
//! ([`Transport::settle`]) and the transport makes the broker do it: on a log (Kafka, the in-memory broker)
//! the offset machinery of [`crate::log`] turns settles into watermark commits on a cadence; on RabbitMQ a
//! settle is a `basic.ack` / `basic.nack` / `basic.reject` of that delivery, so one slow message never holds
//! back the acks of later ones. [`Capabilities`] say what the broker does itself, so the engine never asks
//! which broker it runs on.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::time::Instant;

use crate::error::{BrokerError, PublishError};
use crate::message::{Headers, Record};
use crate::offset::{Delivery, TopicPartition};
use crate::settle::Settle;

/// What a broker does itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Capabilities {
    /// The broker delivers a nacked record again itself (AMQP `basic.nack(requeue)`), honouring a nack's
    /// delay. Otherwise the engine keeps the record and delivers it again in process (a log cannot take
    /// one record back without rewinding everything after it).
    pub(crate) redelivers: bool,
    /// A source's records are an ordered log with keys (Kafka partitions): records of one key never run
    /// at once and start in order, and a record being retried or dead-lettered holds its source back.
    /// Otherwise every record is its own lane (a queue keeps no order across redeliveries anyway).
    pub(crate) ordered: bool,
}

/// Whether settles are waiting for the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pending {
    /// Everything settled has reached the broker.
    None,
    /// Settles are waiting to be sent (on a cadence).
    Due,
    /// Settles are on their way and not confirmed yet.
    InFlight,
}

/// What a transport tells the engine.
pub(crate) enum TransportEvent<R> {
    /// Records, in sequence order per source.
    Records(Vec<Record>),
    /// Sources now owned (Kafka partitions assigned, positioned at the committed offset; a queue consumed).
    Assigned(Vec<TopicPartition>),
    /// Sources being taken away. Nothing more arrives from them; the engine drains them and then hands
    /// `release` back through [`Transport::release`].
    Revoked { sources: Vec<TopicPartition>, release: R },
    /// Settles reached the broker (a commit was confirmed): what waited for them may go on.
    Settled,
}

/// One consumer of one subscriber, as a broker backend provides it.
pub(crate) trait Transport: Send + 'static {
    /// What a revocation hands back once the engine has drained the revoked sources.
    type Release: Send + 'static;

    /// What the broker does itself.
    fn capabilities(&self) -> Capabilities;

    /// The next event. Records only come when `intake` is true (the engine is not full and not draining);
    /// settles in flight make progress either way. Must be cancel-safe: the engine drops this future
    /// whenever another input wins. `None` means the transport has failed for good or was closed.
    fn next(&mut self, intake: bool) -> impl Future<Output = Option<TransportEvent<Self::Release>>> + Send;

    /// Records of `source` were received, in order: `each` learns, per sequence, whether the record is new
    /// to this consumer. A log filters what it fetched again after a rewind; a queue's records are all new.
    fn receive(&mut self, source: &TopicPartition, seqs: impl Iterator<Item = i64>, each: impl FnMut(Delivery));

    /// The final decision about one record: ack or reject (a nack only when the broker redelivers).
    fn settle(&mut self, source: &TopicPartition, seq: i64, settle: Settle);

    /// Where the broker redelivers ([`Capabilities::redelivers`]): a nacked record goes back to the broker,
    /// to be delivered again no earlier than `delay`.
    fn nack(&mut self, record: Record, delay: Duration);

    /// Where the engine redelivers: the record at `seq` failed and will be handed over again; it has had
    /// `attempts` calls so far. A transport that can keep this with the broker (a log, in its commit's
    /// metadata) gives it back as the record's `prior_attempts` after a restart, so a retry budget is
    /// spent once, not once per process life.
    fn attempted(&mut self, _source: &TopicPartition, _seq: i64, _attempts: u32) {}

    /// `AckFirst`: acks these received records before their handlers run, and asks the broker to confirm
    /// at once.
    fn settle_on_receipt(&mut self, source: &TopicPartition, seqs: impl Iterator<Item = i64>);

    /// Records of `source` below this sequence have their receipt acks realised (`AckFirst` dispatches
    /// nothing else: at most once means settled first). On a log the broker confirmed the commit; on
    /// RabbitMQ, which confirms no ack, the ack frame was written: if the connection drops before the
    /// broker reads it, the broker delivers those messages again.
    fn confirmed(&self, source: &TopicPartition) -> Option<i64>;

    /// Whether settles are waiting for the broker.
    fn pending(&self) -> Pending;

    /// When settles waiting on a cadence are due (the engine wakes then and calls [`flush`](Self::flush)).
    fn due(&self) -> Option<Instant>;

    /// Sends the settles that are due. Called by the engine after every step.
    fn flush(&mut self);

    /// Stops (`open == false`) or restarts taking records from a source.
    fn flow(&mut self, source: &TopicPartition, open: bool);

    /// The engine has drained revoked sources: makes what was settled of them final (held back from each
    /// `holdback` sequence on: records settled on receipt that no handler saw), then lets them go.
    fn release(
        &mut self,
        sources: &[TopicPartition],
        holdback: &[(TopicPartition, i64)],
        release: Self::Release,
    ) -> impl Future<Output = ()> + Send;

    /// Makes every settle final (with `holdback` as in [`release`](Self::release)), then leaves and releases
    /// every resource.
    fn close(self, holdback: Vec<(TopicPartition, i64)>) -> impl Future<Output = Result<(), BrokerError>> + Send;
}

/// A record to publish, as publish middleware sees it ([`middleware`](crate::middleware)).
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The topic; on RabbitMQ the routing key (the queue's name on the default exchange).
    pub(crate) topic: String,
    /// RabbitMQ: the exchange to publish to (None: the default exchange). Log brokers refuse one.
    pub(crate) exchange: Option<String>,
    pub(crate) partition: Option<i32>,
    pub(crate) key: Option<Bytes>,
    pub(crate) payload: Bytes,
    pub(crate) headers: Headers,
    pub(crate) timestamp: Option<i64>,
    /// RabbitMQ: a record no queue takes is an error (`mandatory`); false for replies, which a requester
    /// that went away no longer takes (and whose returns lapin could credit to another publish of the
    /// channel acknowledged by the same `multiple` ack).
    pub(crate) mandatory: bool,
}

impl Outgoing {
    /// The topic (on RabbitMQ: the routing key).
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Replaces the payload.
    pub fn set_payload(&mut self, payload: impl Into<Bytes>) {
        self.payload = payload.into();
    }

    /// The key.
    pub fn key(&self) -> Option<&Bytes> {
        self.key.as_ref()
    }

    /// Sets the key.
    pub fn set_key(&mut self, key: impl Into<Bytes>) {
        self.key = Some(key.into());
    }

    /// The partition asked for, if any.
    pub fn partition(&self) -> Option<i32> {
        self.partition
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The headers, to edit.
    pub fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }

    pub(crate) fn new(topic: String, payload: Bytes) -> Self {
        Outgoing {
            topic,
            exchange: None,
            partition: None,
            key: None,
            payload,
            headers: Headers::new(),
            timestamp: None,
            mandatory: true,
        }
    }
}

/// Where the broker stored a published record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishAck {
    /// The topic (on RabbitMQ: the routing key).
    pub topic: String,
    /// The partition it landed in (0 on brokers without partitions).
    pub partition: i32,
    /// Its offset there (-1 on brokers that do not number records).
    pub offset: i64,
}

/// A log broker's answer to a publish that names an exchange.
pub(crate) fn no_exchanges(out: &Outgoing) -> Result<(), PublishError> {
    match &out.exchange {
        Some(_) => Err(PublishError::Unsupported {
            what: "publishing to an exchange",
            url: "a log broker (exchanges are RabbitMQ's)".to_owned(),
        }),
        None => Ok(()),
    }
}

/// Where the outcomes of publishes are counted (the metrics layer above implements it per destination).
pub(crate) trait PublishOutcomes: Send + Sync + 'static {
    /// One publish ended, acknowledged (`ok`) or failed, `took` after it was handed over.
    fn record(&self, ok: bool, took: std::time::Duration);
}

/// One publish being counted and timed: where its outcome goes, and when it was handed over (quanta's
/// TSC clock: two reads per publish, at a fraction of the system clock's cost).
pub(crate) struct Meter {
    outcomes: std::sync::Arc<dyn PublishOutcomes>,
    started: quanta::Instant,
}

impl Meter {
    pub(crate) fn start(outcomes: std::sync::Arc<dyn PublishOutcomes>) -> Self {
        Meter {
            outcomes,
            started: quanta::Instant::now(),
        }
    }

    /// Reports the publish's outcome and how long the broker took.
    pub(crate) fn record<T, E>(self, outcome: &Result<T, E>) {
        self.outcomes.record(outcome.is_ok(), self.started.elapsed());
    }
}

/// Sends records; resolves once the broker has acknowledged each one.
pub(crate) trait Publisher: Send + Sync + 'static {
    fn send(&self, out: Outgoing) -> BoxFuture<'static, Result<PublishAck, PublishError>>;

    /// Sends and reports the outcome to `meter` once the broker has answered. A backend may fold the
    /// report into its own future: one allocation per publish instead of a second one around it.
    fn send_metered(&self, out: Outgoing, meter: Meter) -> BoxFuture<'static, Result<PublishAck, PublishError>> {
        let sent = self.send(out);
        Box::pin(async move {
            let r = sent.await;
            meter.record(&r);
            r
        })
    }
}
