//! One subscriber's RabbitMQ consumer: a channel consuming its queue with manual acks, and a settler task
//! that realises the engine's settles on that channel in order.
//!
//! The source is the queue (partition 0); a record's sequence is its delivery tag, which is per channel:
//! a re-opened channel is a new assignment of the source (the engine fences settles of the old one), and
//! the broker delivers again whatever the old channel had not acked.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use lapin::Confirmation;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::convert::{self, ATTEMPTS};
use super::{Queue, QueueType, client_error, connect, declare};
use crate::config::ResolvedSubscriber;
use crate::error::BrokerError;
use crate::message::Record;
use crate::offset::{Delivery, TopicPartition};
use crate::settle::Settle;
use crate::transport::{Capabilities, Outgoing, Pending, Transport, TransportEvent};

/// How long connecting, declaring and starting to consume may take together.
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);
/// Records handed to the engine at most per event.
const BATCH_MAX: usize = 512;
/// Reconnect backoff: from this, doubling, up to the cap.
const RECONNECT_FLOOR: Duration = Duration::from_millis(100);
const RECONNECT_CAP: Duration = Duration::from_secs(5);
/// Settles sent together at most.
const SETTLE_BATCH: usize = 256;
/// How long closing waits for the settles still queued to reach the broker.
const CLOSE_FLUSH: Duration = Duration::from_secs(5);

/// What the settler task does on the channel.
enum SettleOp {
    Ack(u64),
    /// `AckFirst`: every delivery up to this tag, on receipt.
    AckUpTo(u64),
    Reject(u64),
    /// Deliver again after `delay`; `props`: the delivery's own properties (a classic queue re-publishes it
    /// with them).
    Nack {
        record: Box<Record>,
        props: Option<Box<BasicProperties>>,
        delay: Duration,
    },
}

/// A live channel consuming the queue.
struct Session {
    conn: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
    consumer_tag: String,
    settles: mpsc::UnboundedSender<SettleOp>,
    settler: JoinHandle<()>,
    /// `AckFirst`: deliveries below this tag have their receipt ack written.
    confirmed: watch::Receiver<i64>,
    settler_gone: bool,
}

/// A RabbitMQ consumer: the engine's transport for one subscriber.
pub(crate) struct AmqpConsumer {
    uri: Arc<str>,
    queue: String,
    decl: Queue,
    prefetch: u16,
    source: TopicPartition,
    subscriber: Arc<str>,
    session: Option<Session>,
    /// The session is new and its assignment not reported yet.
    announce: bool,
    /// The channel failed after the records last handed over: report the loss (and why) next.
    lost: Option<String>,
    /// `AckFirst`: what the lost session had confirmed, until the engine has drained its source (records
    /// acked on receipt are still handled: they are gone from the broker).
    confirmed_at_loss: Option<i64>,
    /// Classic queues: the properties of each delivery not settled yet, for a nack's re-publish.
    held: rustc_hash::FxHashMap<u64, BasicProperties>,
    reconnect: Option<BoxFuture<'static, Result<Session, BrokerError>>>,
    failures: u32,
}

impl AmqpConsumer {
    pub(super) fn new(uri: Arc<str>, cfg: &ResolvedSubscriber, decl: Queue) -> Self {
        AmqpConsumer {
            uri,
            prefetch: decl.prefetch_for(cfg.max_in_flight),
            queue: cfg.topic.clone(),
            decl,
            source: TopicPartition::new(cfg.topic.as_str(), 0),
            subscriber: cfg.name.clone(),
            session: None,
            announce: false,
            lost: None,
            confirmed_at_loss: None,
            held: Default::default(),
            reconnect: None,
            failures: 0,
        }
    }

    /// Opens the first session at start, so a wrong URL or a refused declaration fails the app's start.
    pub(super) async fn open_first(&mut self) -> Result<(), BrokerError> {
        let session = open_session(
            self.uri.clone(),
            self.queue.clone(),
            self.decl.clone(),
            self.prefetch,
            self.subscriber.clone(),
        )
        .await?;
        self.session = Some(session);
        self.announce = true;
        Ok(())
    }

    /// The channel is gone: drop it (the broker redelivers what it had not acked) and reconnect later.
    fn lose(&mut self, why: &str) -> Option<TransportEvent<()>> {
        self.confirmed_at_loss = self.session.as_ref().map(|s| *s.confirmed.borrow());
        self.held.clear();
        tracing::warn!(subscriber = %self.subscriber, queue = %self.queue, error = why,
            "RabbitMQ channel lost; unacked messages go back to the queue; reconnecting");
        if let Some(s) = self.session.take() {
            s.settler.abort();
            // Usually already closed by the broker; if not (the consumer alone was cancelled), close it.
            tokio::spawn(async move {
                let _ = s.conn.close(200, "channel lost".into()).await;
            });
        }
        self.lost = None;
        Some(TransportEvent::Revoked {
            sources: vec![self.source.clone()],
            release: (),
        })
    }

    fn send(&self, op: SettleOp) {
        match &self.session {
            // A closed settler means the channel is gone: the broker delivers the message again.
            Some(s) => {
                let _ = s.settles.send(op);
            }
            None => {
                tracing::debug!(subscriber = %self.subscriber, "settle after the channel was lost: the broker redelivers")
            }
        }
    }
}

/// [`open_session_now`] within [`OPEN_TIMEOUT`]: a broker that accepts the connection and then stalls
/// (booting, under a resource alarm) fails the attempt instead of hanging it.
async fn open_session(
    uri: Arc<str>,
    queue: String,
    decl: Queue,
    prefetch: u16,
    subscriber: Arc<str>,
) -> Result<Session, BrokerError> {
    tokio::time::timeout(OPEN_TIMEOUT, open_session_now(uri, queue, decl, prefetch, subscriber))
        .await
        .unwrap_or(Err(BrokerError::Timeout {
            op: "open a consuming channel",
            timeout: OPEN_TIMEOUT,
        }))
}

/// Connects, declares the queue, sets the prefetch and starts consuming.
async fn open_session_now(
    uri: Arc<str>,
    queue: String,
    decl: Queue,
    prefetch: u16,
    subscriber: Arc<str>,
) -> Result<Session, BrokerError> {
    let conn = connect(&uri, format!("ferrostream {subscriber} {}", std::process::id())).await?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| client_error("open channel", e))?;
    declare(&channel, &queue, &decl).await?;
    // Confirms on the consuming channel too: a classic queue's nack is a confirmed re-publish.
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| client_error("enable publisher confirms", e))?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| client_error("set prefetch", e))?;
    let consumer_tag = format!("ferrostream-{subscriber}-{}", std::process::id());
    let consumer = channel
        .basic_consume(
            queue.as_str().into(),
            consumer_tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| client_error("consume", e))?;
    let (settles, rx) = mpsc::unbounded_channel();
    let (confirmed_tx, confirmed) = watch::channel(0);
    let settler = tokio::spawn(settler(
        channel.clone(),
        queue,
        decl.kind(),
        rx,
        confirmed_tx,
        subscriber,
    ));
    Ok(Session {
        conn,
        channel,
        consumer,
        consumer_tag,
        settles,
        settler,
        confirmed,
        settler_gone: false,
    })
}

/// Reconnects, with backoff, until it works.
async fn reopen(
    uri: Arc<str>,
    queue: String,
    decl: Queue,
    prefetch: u16,
    subscriber: Arc<str>,
    failures: u32,
) -> Result<Session, BrokerError> {
    let wait = RECONNECT_FLOOR.saturating_mul(1 << failures.min(10)).min(RECONNECT_CAP);
    tokio::time::sleep(wait).await;
    open_session(uri, queue, decl, prefetch, subscriber).await
}

/// Realises settles on the channel. What is waiting is sent together: each settle's frame is queued when
/// its future is first polled, in the order the engine made them, and the batch waits for the socket once.
/// When the consumer closes (the engine dropped its sender), nacks still waiting out their delay are put
/// back at once, and the settler ends when they are done.
async fn settler(
    channel: Channel,
    queue: String,
    kind: QueueType,
    mut ops: mpsc::UnboundedReceiver<SettleOp>,
    confirmed: watch::Sender<i64>,
    subscriber: Arc<str>,
) {
    let (closing, closing_rx) = watch::channel(false);
    let mut put_backs = tokio::task::JoinSet::new();
    let mut batch = Vec::new();
    while let Some(first) = ops.recv().await {
        batch.push(first);
        while batch.len() < SETTLE_BATCH {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let mut sends = Vec::with_capacity(batch.len());
        for op in batch.drain(..) {
            match op {
                SettleOp::Nack { record, props, delay } => {
                    let back = PutBack {
                        channel: channel.clone(),
                        queue: queue.clone(),
                        kind,
                        record,
                        props,
                        subscriber: subscriber.clone(),
                    };
                    put_backs.spawn(back.after(delay, closing_rx.clone()));
                }
                op => sends.push(settle_one(&channel, &confirmed, op)),
            }
        }
        for r in futures::future::join_all(sends).await {
            if let Err(e) = r {
                tracing::debug!(subscriber = %subscriber, error = %e, "settle not sent: the channel is gone, the broker redelivers");
            }
        }
        while put_backs.try_join_next().is_some() {}
    }
    closing.send_replace(true);
    while put_backs.join_next().await.is_some() {}
}

async fn settle_one(channel: &Channel, confirmed: &watch::Sender<i64>, op: SettleOp) -> lapin::Result<()> {
    match op {
        SettleOp::Ack(tag) => channel.basic_ack(tag, BasicAckOptions::default()).await,
        SettleOp::AckUpTo(tag) => {
            channel.basic_ack(tag, BasicAckOptions { multiple: true }).await?;
            let upto = tag as i64 + 1;
            confirmed.send_if_modified(|c| {
                let moved = upto > *c;
                *c = (*c).max(upto);
                moved
            });
            Ok(())
        }
        SettleOp::Reject(tag) => channel.basic_reject(tag, BasicRejectOptions { requeue: false }).await,
        SettleOp::Nack { .. } => Ok(()), // put back by the settler itself
    }
}

/// A nacked delivery going back to its queue.
struct PutBack {
    channel: Channel,
    queue: String,
    kind: QueueType,
    record: Box<Record>,
    /// The delivery's own properties (classic queues), to re-publish it whole.
    props: Option<Box<BasicProperties>>,
    subscriber: Arc<str>,
}

impl PutBack {
    /// After `delay` (or at once when the consumer closes), the delivery goes back: on a quorum queue with
    /// `basic.reject(requeue)`, which the queue counts as a delivery (RabbitMQ 4.3 counts rejects only, not
    /// nacks); on a classic queue, which counts nothing, as a confirmed re-publish of the same message with
    /// the attempt count in a header, then an ack of the original (a crash between the two duplicates,
    /// never loses).
    async fn after(self, delay: Duration, mut closing: watch::Receiver<bool>) {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = closing.wait_for(|c| *c) => {}
        }
        let PutBack {
            channel,
            queue,
            kind,
            record,
            props,
            subscriber,
        } = self;
        let tag = record.offset as u64;
        let requeue = BasicRejectOptions { requeue: true };
        let r = match kind {
            QueueType::Quorum => channel.basic_reject(tag, requeue).await,
            QueueType::Classic => {
                let mut props = match props {
                    Some(p) => *p,
                    None => {
                        let mut out = Outgoing::new(queue.clone(), record.payload.clone());
                        out.key = record.key.clone();
                        out.headers = record.headers.clone();
                        out.timestamp = record.timestamp;
                        convert::properties(&out)
                    }
                };
                let mut headers = props.headers().clone().unwrap_or_default();
                let delivered = record.prior_attempts.saturating_add(record.attempts.max(1));
                headers.insert(
                    ATTEMPTS.into(),
                    AMQPValue::LongString(LongString::from(delivered.to_string())),
                );
                props = props.with_headers(headers);
                let opts = BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                };
                let published = match channel
                    .basic_publish("".into(), queue.as_str().into(), opts, &record.payload, props)
                    .await
                {
                    Ok(confirm) => confirm.await,
                    Err(e) => Err(e),
                };
                match published {
                    Ok(Confirmation::Ack(None)) => channel.basic_ack(tag, BasicAckOptions::default()).await,
                    // Not taken: requeue the original instead (it loses its count, never itself).
                    _ => channel.basic_reject(tag, requeue).await,
                }
            }
        };
        if let Err(e) = r {
            tracing::debug!(subscriber = %subscriber, error = %e, "nack not sent: the channel is gone, the broker redelivers");
        }
    }
}

impl Transport for AmqpConsumer {
    type Release = ();

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            redelivers: true,
            ordered: false,
        }
    }

    async fn next(&mut self, intake: bool) -> Option<TransportEvent<()>> {
        loop {
            if let Some(why) = self.lost.take().filter(|_| intake) {
                return self.lose(&why);
            }
            if self.session.is_none() {
                if !intake {
                    return std::future::pending().await;
                }
                let reopening = self.reconnect.get_or_insert_with(|| {
                    Box::pin(reopen(
                        self.uri.clone(),
                        self.queue.clone(),
                        self.decl.clone(),
                        self.prefetch,
                        self.subscriber.clone(),
                        self.failures,
                    ))
                });
                let r = reopening.await;
                self.reconnect = None;
                match r {
                    Ok(s) => {
                        tracing::info!(subscriber = %self.subscriber, queue = %self.queue, "RabbitMQ channel re-opened");
                        self.session = Some(s);
                        self.failures = 0;
                        self.announce = true;
                    }
                    Err(e) => {
                        self.failures = self.failures.saturating_add(1);
                        tracing::warn!(subscriber = %self.subscriber, error = %e, attempt = self.failures, "RabbitMQ reconnect failed; retrying");
                        continue;
                    }
                }
            }
            if self.announce && intake {
                self.announce = false;
                self.confirmed_at_loss = None;
                return Some(TransportEvent::Assigned(vec![self.source.clone()]));
            }
            let s = self.session.as_mut().expect("checked above");
            let settler_gone = s.settler_gone;
            let confirmed = &mut s.confirmed;
            let consumer = &mut s.consumer;
            let intake = intake && !self.announce;
            tokio::select! {
                biased;
                changed = confirmed.changed(), if !settler_gone => {
                    if changed.is_err() {
                        // The settler ended on its own: nothing would reach the broker any more.
                        s.settler_gone = true;
                        return self.lose("the settle task ended");
                    }
                    return Some(TransportEvent::Settled);
                }
                d = consumer.next(), if intake => match d {
                    Some(Ok(d)) => {
                        let classic = self.decl.kind() == QueueType::Classic;
                        let mut records = Vec::with_capacity(8);
                        let (source, held) = (&self.source, &mut self.held);
                        let mut take = |d, records: &mut Vec<Record>| {
                            let (record, props) = convert::record(source, d);
                            if classic {
                                held.insert(record.offset as u64, props);
                            }
                            records.push(record);
                        };
                        take(d, &mut records);
                        while records.len() < BATCH_MAX {
                            match consumer.next().now_or_never() {
                                Some(Some(Ok(d))) => take(d, &mut records),
                                Some(Some(Err(e))) => {
                                    self.lost = Some(e.to_string());
                                    break;
                                }
                                Some(None) => {
                                    self.lost = Some("the broker cancelled the consumer".to_owned());
                                    break;
                                }
                                None => break,
                            }
                        }
                        return Some(TransportEvent::Records(records));
                    }
                    Some(Err(e)) => return self.lose(&e.to_string()),
                    None => return self.lose("the broker cancelled the consumer"),
                },
                else => return std::future::pending().await,
            }
        }
    }

    fn receive(&mut self, _: &TopicPartition, seqs: impl Iterator<Item = i64>, mut each: impl FnMut(Delivery)) {
        // A queue delivers each message once per delivery: every record is new.
        seqs.for_each(|_| each(Delivery::Fresh));
    }

    fn settle(&mut self, _: &TopicPartition, seq: i64, settle: Settle) {
        let tag = seq as u64;
        self.held.remove(&tag);
        match settle {
            Settle::Ack => self.send(SettleOp::Ack(tag)),
            Settle::Reject => self.send(SettleOp::Reject(tag)),
            // The engine hands nacks to `nack` with their record.
            Settle::Nack { .. } => {}
        }
    }

    fn nack(&mut self, record: Record, delay: Duration) {
        let props = self.held.remove(&(record.offset as u64)).map(Box::new);
        self.send(SettleOp::Nack {
            record: Box::new(record),
            props,
            delay,
        });
    }

    fn settle_on_receipt(&mut self, _: &TopicPartition, seqs: impl Iterator<Item = i64>) {
        if let Some(last) = seqs.max() {
            self.send(SettleOp::AckUpTo(last as u64));
        }
    }

    fn confirmed(&self, _: &TopicPartition) -> Option<i64> {
        self.session
            .as_ref()
            .map(|s| *s.confirmed.borrow())
            .or(self.confirmed_at_loss)
    }

    fn pending(&self) -> Pending {
        Pending::None
    }

    fn due(&self) -> Option<Instant> {
        None
    }

    fn flush(&mut self) {}

    fn flow(&mut self, _: &TopicPartition, _: bool) {
        // The prefetch bounds what the broker sends: nothing to pause.
    }

    async fn release(&mut self, _: &[TopicPartition], _: &[(TopicPartition, i64)], _: ()) {}

    async fn close(mut self, _: Vec<(TopicPartition, i64)>) -> Result<(), BrokerError> {
        let Some(s) = self.session.take() else {
            return Ok(());
        };
        let _ = s
            .channel
            .basic_cancel(s.consumer_tag.as_str().into(), BasicCancelOptions::default())
            .await;
        // Settles made before the end reach the broker first; what was never acked goes back to the queue
        // when the channel closes.
        drop(s.settles);
        if tokio::time::timeout(CLOSE_FLUSH, s.settler).await.is_err() {
            tracing::warn!(subscriber = %self.subscriber, "settles still queued at close; the broker redelivers them");
        }
        let _ = s.channel.close(200, "shutdown".into()).await;
        s.conn
            .close(200, "shutdown".into())
            .await
            .map_err(|e| client_error("close", e))
    }
}
