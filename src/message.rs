//! The message handle a handler receives: coordinates, payload, headers, and the settle calls.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::offset::TopicPartition;
use crate::settle::{Settle, SettleOutcome};

/// Name of the header that carries a correlation id (on RabbitMQ also the `correlation_id` property).
pub const CORRELATION_ID: &str = "correlation_id";

/// Name of the header that says where a reply goes (on RabbitMQ also the `reply_to` property).
pub const REPLY_TO: &str = "reply_to";

/// Message headers, in the order they were sent. Names may repeat.
///
/// ```
/// let mut h = ferrostream::Headers::new();
/// h.insert("tenant", "acme");
/// assert_eq!(h.get_str("tenant"), Some("acme"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, Bytes)>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers(Vec::new())
    }

    /// Appends a header.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<Bytes>) {
        self.0.push((name.into(), value.into()));
    }

    /// Replaces every header of that name by one with this value.
    pub fn set(&mut self, name: &str, value: impl Into<Bytes>) {
        self.0.retain(|(n, _)| n != name);
        self.0.push((name.to_owned(), value.into()));
    }

    /// Removes every header of that name.
    pub fn remove(&mut self, name: &str) {
        self.0.retain(|(n, _)| n != name);
    }

    /// The last value of a header.
    pub fn get(&self, name: &str) -> Option<&Bytes> {
        self.0.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The last value of a header, when it is UTF-8.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every header in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Bytes)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v))
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A record as a transport delivers it.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) tp: TopicPartition,
    pub(crate) offset: i64,
    pub(crate) key: Option<Bytes>,
    pub(crate) payload: Bytes,
    pub(crate) headers: Headers,
    /// Milliseconds since the Unix epoch.
    pub(crate) timestamp: Option<i64>,
    /// Deliveries of this record before this one that the broker counted (a quorum queue's delivery
    /// count); 0 where the broker keeps no count (a log: the engine counts its own redeliveries).
    pub(crate) prior_attempts: u32,
    /// Handler calls this record has had in this assignment (the engine counts them; the record carries
    /// the count through nacks and re-queues).
    pub(crate) attempts: u32,
}

/// A settle taking effect: what the engine needs to apply it.
#[derive(Debug)]
pub(crate) struct SettleEvent {
    pub(crate) tp: TopicPartition,
    pub(crate) generation: u64,
    pub(crate) offset: i64,
    pub(crate) settle: Settle,
    pub(crate) by: SettledBy,
    /// For a nack, the record to deliver again; for a reject, the record to dead-letter.
    pub(crate) record: Option<Box<Record>>,
    /// Why (for a reject: what the dead-letter record says).
    pub(crate) reason: Option<String>,
}

/// Where settles go: the engine of the subscriber that delivered the message, for one assignment of one
/// partition. Shared by all the messages of that assignment (one reference count per message, not three).
#[derive(Debug)]
pub(crate) struct SettleSink {
    pub(crate) events: mpsc::UnboundedSender<SettleEvent>,
    pub(crate) generation: u64,
    pub(crate) subscriber: Arc<str>,
    /// The source is a log's partition (else a queue): which [`Coordinates`] a message has.
    pub(crate) from_log: bool,
}

/// Where a message came from, in its broker's own words.
///
/// ```
/// # fn f(msg: &ferrostream::Message) {
/// use ferrostream::Coordinates;
/// match msg.coordinates() {
///     Coordinates::Log { topic, partition, offset } => println!("{topic}[{partition}]@{offset}"),
///     Coordinates::Queue { queue, delivery_tag } => println!("{queue} #{delivery_tag}"),
///     _ => {}
/// }
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Coordinates<'a> {
    /// A log (Kafka, the in-memory broker): a partition of a topic, and an offset in it.
    Log {
        /// The topic.
        topic: &'a str,
        /// The partition.
        partition: i32,
        /// The offset in the partition.
        offset: i64,
    },
    /// A queue (RabbitMQ): the queue, and the delivery tag (numbered per channel, so a redelivery has a
    /// new one).
    Queue {
        /// The queue.
        queue: &'a str,
        /// The delivery tag.
        delivery_tag: u64,
    },
}

/// Who settled a message, for logs and the test observer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettledBy {
    /// The framework on receipt (`AckFirst`).
    Receipt,
    /// User code through [`Message::ack`], [`Message::nack`] or [`Message::reject`].
    User,
    /// An `AckMessage` / `NackMessage` / `RejectMessage` returned from the handler.
    Interrupt,
    /// The ack policy after the handler returned.
    Policy,
}

/// A run of one partition's records that arrived together, and the settle state of each one the engine
/// admitted for a handler. The handles of those records share it: one allocation per run instead of one
/// per message, and no record is moved once the transport made it. A handle kept alive keeps its whole
/// run alive, as its payload already keeps the fetched batch's byte buffer (the Kafka transport copies a
/// fetched batch into one).
pub(crate) struct Arrival {
    records: Vec<Record>,
    slots: Vec<Slot>,
}

/// One admitted record of an [`Arrival`]: which one, its attempt, and its settle state.
pub(crate) struct Slot {
    record: usize,
    attempt: u32,
    settled: Mutex<Option<Settle>>,
    sink: Arc<SettleSink>,
}

impl Slot {
    /// Admits `arrival.records[record]`, delivered for the `attempt`-th time, settled already when
    /// `pre_settled` says so (`AckFirst`), its settles going to `sink`.
    pub(crate) fn new(record: usize, attempt: u32, sink: Arc<SettleSink>, pre_settled: Option<Settle>) -> Self {
        Slot {
            record,
            attempt,
            settled: Mutex::new(pre_settled),
            sink,
        }
    }
}

impl Arrival {
    /// The records and their admitted slots; every slot names a record of `records`.
    pub(crate) fn new(records: Vec<Record>, slots: Vec<Slot>) -> Arc<Self> {
        assert!(
            slots.iter().all(|s| s.record < records.len()),
            "a slot names a record of its arrival"
        );
        Arc::new(Arrival { records, slots })
    }

    /// The record of a slot.
    pub(crate) fn record(&self, slot: usize) -> &Record {
        &self.records[self.slots[slot].record]
    }

    /// The handle of a record on its own: an arrival of one, whose `slot` names it (record 0).
    pub(crate) fn single(record: Record, slot: Slot) -> Message {
        Message {
            arrival: Arrival::new(vec![record], vec![slot]),
            slot: 0,
        }
    }

    /// The handles of every slot, in slot order.
    pub(crate) fn messages(self: &Arc<Self>) -> impl Iterator<Item = Message> + '_ {
        (0..self.slots.len()).map(|slot| Message {
            arrival: self.clone(),
            slot,
        })
    }
}

/// One delivered message and its settle calls ([guarantee 2.1](crate::guarantees)). Cheap to clone; clones share the settle state.
/// A handle keeps the records of its partition that arrived with its own (up to one fetched batch) in
/// memory until it is dropped: hold on to handles only as long as you need them.
///
/// ```
/// # async fn demo(msg: ferrostream::Message) {
/// use ferrostream::Settle;
/// assert!(msg.ack().await.took_effect());
/// // The first settle wins: this one reports that the message was already acked.
/// assert_eq!(msg.nack().await, ferrostream::SettleOutcome::AlreadySettled(Settle::Ack));
/// # }
/// ```
#[derive(Clone)]
pub struct Message {
    arrival: Arc<Arrival>,
    /// Which slot of the arrival (always one it has: see [`Arrival::new`]).
    slot: usize,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("subscriber", &self.slot().sink.subscriber)
            .field("topic", &self.topic())
            .field("partition", &self.partition())
            .field("offset", &self.offset())
            .field("settled", &self.settled())
            .finish()
    }
}

impl Message {
    fn slot(&self) -> &Slot {
        &self.arrival.slots[self.slot]
    }

    /// The record it was made of.
    pub(crate) fn record(&self) -> &Record {
        self.arrival.record(self.slot)
    }

    /// Acks the message: it counts as processed.
    pub async fn ack(&self) -> SettleOutcome {
        self.settle(Settle::Ack, SettledBy::User)
    }

    /// Nacks the message: it is delivered again (on Kafka, from this offset on; [guarantee 3.2](crate::guarantees)).
    pub async fn nack(&self) -> SettleOutcome {
        self.settle(Settle::NACK, SettledBy::User)
    }

    /// Nacks the message; it is delivered again no earlier than `delay` from now ([guarantee 2.6](crate::guarantees)).
    pub async fn nack_after(&self, delay: std::time::Duration) -> SettleOutcome {
        self.settle(Settle::Nack { delay: Some(delay) }, SettledBy::User)
    }

    /// Rejects the message: it is never delivered again.
    pub async fn reject(&self) -> SettleOutcome {
        self.settle(Settle::Reject, SettledBy::User)
    }

    /// How the message was settled, if it was.
    pub fn settled(&self) -> Option<Settle> {
        *self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Settle>> {
        // The guarded value is a plain Option: a panic elsewhere cannot leave it half-written.
        self.slot().settled.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The single place a settle takes effect: first settle wins.
    pub(crate) fn settle(&self, settle: Settle, by: SettledBy) -> SettleOutcome {
        self.settle_because(settle, by, None)
    }

    /// Settles, saying why (for a reject: the text a dead-letter record carries), and tells the engine.
    pub(crate) fn settle_because(&self, settle: Settle, by: SettledBy, reason: Option<String>) -> SettleOutcome {
        if let Err(prev) = self.claim(settle) {
            return SettleOutcome::AlreadySettled(prev);
        }
        let event = SettleEvent {
            tp: self.record().tp.clone(),
            generation: self.generation(),
            offset: self.offset(),
            settle,
            by,
            record: self.record_for(settle),
            reason,
        };
        // The engine may be gone (shutdown past its deadline); the settle then has no effect on commits,
        // which is the documented at-least-once outcome.
        let _ = self.slot().sink.events.send(event);
        SettleOutcome::Settled(settle)
    }

    /// The single place a settle takes effect (first settle wins): marks the message settled if it is not
    /// yet, or returns the earlier settle. Code's settles then go to the engine as an event
    /// ([`settle_because`](Self::settle_because)); the engine applies its own policy settles directly.
    pub(crate) fn claim(&self, settle: Settle) -> Result<(), Settle> {
        let mut slot = self.lock();
        if let Some(prev) = *slot {
            return Err(prev);
        }
        *slot = Some(settle);
        Ok(())
    }

    /// The record a settle needs: a nack to deliver it again, a reject to dead-letter it.
    pub(crate) fn record_for(&self, settle: Settle) -> Option<Box<Record>> {
        matches!(settle, Settle::Nack { .. } | Settle::Reject).then(|| Box::new(self.record().clone()))
    }

    pub(crate) fn generation(&self) -> u64 {
        self.slot().sink.generation
    }

    /// Which delivery of this message to this subscriber this is: 1 the first time, 2 after one
    /// redelivery... (counted while the partition stays assigned to this member).
    pub fn attempt(&self) -> u32 {
        self.slot().attempt
    }

    /// The subscriber that received it.
    pub fn subscriber(&self) -> &str {
        &self.slot().sink.subscriber
    }
    /// Where it came from, in its broker's own words (a Kafka partition and offset, a RabbitMQ queue and
    /// delivery tag). [`topic`](Self::topic), [`partition`](Self::partition) and [`offset`](Self::offset)
    /// are the same on every broker: on a queue, the queue, 0 and the delivery tag.
    pub fn coordinates(&self) -> Coordinates<'_> {
        let r = self.record();
        if self.slot().sink.from_log {
            Coordinates::Log {
                topic: &r.tp.topic,
                partition: r.tp.partition,
                offset: r.offset,
            }
        } else {
            Coordinates::Queue {
                queue: &r.tp.topic,
                delivery_tag: r.offset as u64,
            }
        }
    }
    /// Its topic (on RabbitMQ, its queue).
    pub fn topic(&self) -> &str {
        &self.record().tp.topic
    }
    /// Its partition.
    pub fn partition(&self) -> i32 {
        self.record().tp.partition
    }
    /// Its topic and partition.
    pub fn topic_partition(&self) -> &TopicPartition {
        &self.record().tp
    }
    /// Its offset in the partition (on RabbitMQ, its delivery tag).
    pub fn offset(&self) -> i64 {
        self.record().offset
    }
    /// Its key.
    pub fn key(&self) -> Option<&Bytes> {
        self.record().key.as_ref()
    }
    /// Its raw payload.
    pub fn payload(&self) -> &Bytes {
        &self.record().payload
    }
    /// Its headers.
    pub fn headers(&self) -> &Headers {
        &self.record().headers
    }
    /// Its timestamp, in milliseconds since the Unix epoch.
    pub fn timestamp(&self) -> Option<i64> {
        self.record().timestamp
    }
    /// Its reply-to header: where a reply should go.
    pub fn reply_to(&self) -> Option<&str> {
        self.record().headers.get_str(REPLY_TO)
    }
    /// Its correlation id header.
    pub fn correlation_id(&self) -> Option<&str> {
        self.record().headers.get_str(CORRELATION_ID)
    }
}
