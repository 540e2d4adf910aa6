//! One Kafka group member: a `BaseConsumer` polled on its own OS thread.
//!
//! Why a thread: librdkafka runs rebalance callbacks inside `poll`, and SPEC 3.7 needs the revoke
//! callback to wait until the engine has drained the revoked partitions and their final offsets are
//! committed, before librdkafka releases them. Blocking the poll thread for that is exactly right; blocking
//! an async worker would not be. The thread also owns the consumer's teardown, which can hang inside
//! rdkafka's `Drop` (rust-rdkafka #597 / #611): the engine waits for it with a deadline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{BorrowedMessage, Headers as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};

use super::commit_queue::CommitQueue;
use super::fetch_queue::{FetchQueue, Fetched};
use super::quiet::{self, Throttle};
use super::{KafkaConfig, client_error, kafka_error};
use crate::config::ResolvedSubscriber;
use crate::error::BrokerError;
use crate::log::{Commits, LogConsumer, LogEvent};
use crate::message::{Headers, Record};
use crate::offset::TopicPartition;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, KafkaResult};

/// How long the poll thread waits for records before checking whether it should stop.
const POLL_WAIT: Duration = Duration::from_millis(100);
/// Records handed to the engine per batch, at most.
const BATCH_MAX: usize = 1024;
/// Batches the poll thread may run ahead of the engine. Bounded, so records the engine has not taken stay
/// in librdkafka, where pausing a partition stops them (memory on a backlog, SPEC 3.6); not fewer, or the
/// two threads wait on each other: 2 measured 0.88x the raw loop's throughput, 8 1.01x (BENCHMARKS.md).
const CHANNEL_BATCHES: usize = 8;
/// How long teardown (final commit, leaving the group) may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(15);

struct Ctx {
    name: Arc<str>,
    /// The subscribed topic's name, shared with the poll thread's records ([`Partitions`]): the engine
    /// finds a record's partition by pointer equality of the names, not by comparing them.
    topic: Arc<str>,
    events: mpsc::Sender<LogEvent>,
    /// Set once the engine has made its final commit: later revocations need no drain.
    closing: Arc<AtomicBool>,
    revoke_wait: Duration,
    /// Where assigned partitions' messages go (set once the consumer exists).
    fetch: OnceLock<FetchQueue>,
    /// The group's rebalance protocol is cooperative (incremental), known from the first assignment.
    cooperative: OnceLock<bool>,
    /// Repeated client errors (a broker that is down) are logged once per quiet period.
    throttle: Arc<Throttle>,
    /// Where a partition without a committed offset starts: resolved when it is assigned.
    reset: crate::OffsetReset,
    /// Records that failed and wait for their next attempt: committed with their offset's metadata.
    attempts: Notes,
}

/// Per partition, the record that failed and its failed attempts so far ([`LogConsumer::note_attempts`]),
/// shared by the engine's commits and the final commit of a revocation.
type Notes = Arc<std::sync::Mutex<rustc_hash::FxHashMap<TopicPartition, (i64, u32)>>>;

/// How a commit's metadata carries a record's failed attempts: `ferrostream:attempts=<n>`.
const ATTEMPTS_METADATA: &str = "ferrostream:attempts=";

/// How long resolving an assigned partition's start position may take before librdkafka is left to do it.
const POSITION_TIMEOUT: Duration = Duration::from_secs(5);

impl Ctx {
    /// Resolves now, before the assignment takes effect, where each newly assigned partition without a
    /// committed offset starts under `Latest`: its end offset at this moment. librdkafka would resolve it
    /// only once fetching starts, so a record published right after the app reported ready could fall
    /// before that position and never be seen by a new group ("ready means ready").
    fn resolve_latest(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &mut TopicPartitionList,
        committed: Option<&TopicPartitionList>,
    ) {
        if self.reset != crate::OffsetReset::Latest {
            return;
        }
        let Some(committed) = committed else { return };
        let mut resolved = TopicPartitionList::new();
        for e in committed.elements() {
            if matches!(e.offset(), Offset::Offset(_)) {
                continue; // the group's committed offset is where it starts
            }
            match consumer.fetch_watermarks(e.topic(), e.partition(), POSITION_TIMEOUT) {
                Ok((_, high)) => {
                    let _ = tpl.set_partition_offset(e.topic(), e.partition(), Offset::Offset(high));
                    let _ = resolved.add_partition_offset(e.topic(), e.partition(), Offset::Offset(high));
                }
                Err(err) => tracing::debug!(subscriber = %self.name, topic = %e.topic(), partition = e.partition(),
                    error = %err, "end offset unknown; librdkafka resolves the position"),
            }
        }
        // Where the group starts is committed at once: a rebalance before the first commit (another
        // member of the group joining) would otherwise resolve `Latest` again and skip what was published
        // in between.
        if resolved.count() > 0
            && let Err(e) = consumer.commit(&resolved, rdkafka::consumer::CommitMode::Async)
        {
            tracing::debug!(subscriber = %self.name, error = %e, "could not commit the resolved start positions");
        }
    }

    /// The group's committed offsets of newly assigned partitions (their metadata included), read once
    /// per assignment; `None` when the broker does not say (librdkafka then resolves positions itself).
    fn committed(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) -> Option<TopicPartitionList> {
        if tpl.count() == 0 {
            return None;
        }
        consumer
            .committed_offsets(tpl.clone(), POSITION_TIMEOUT)
            .map_err(|e| {
                tracing::debug!(subscriber = %self.name, error = %e, "committed offsets unknown; librdkafka resolves positions");
            })
            .ok()
    }

    /// Tells the engine, before the assignment, of committed offsets whose record had failed: its next
    /// delivery continues their attempt count.
    fn send_prior_attempts(&self, committed: &TopicPartitionList) {
        let prior: Vec<(TopicPartition, i64, u32)> = committed
            .elements()
            .iter()
            .filter_map(|e| {
                let Offset::Offset(offset) = e.offset() else {
                    return None;
                };
                let attempts = e.metadata().strip_prefix(ATTEMPTS_METADATA)?.parse().ok()?;
                let tp = partitions_of_one(e.topic(), e.partition(), &self.topic);
                Some((tp, offset, attempts))
            })
            .collect();
        if !prior.is_empty() {
            tracing::debug!(subscriber = %self.name, ?prior, "committed attempt counts");
            let _ = self.events.blocking_send(LogEvent::PriorAttempts(prior));
        }
    }
}

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        quiet::log(&self.throttle, &self.name, level, fac, message);
    }

    fn error(&self, e: KafkaError, reason: &str) {
        quiet::error(&self.throttle, &self.name, &e, reason);
    }
}

/// Takes an assignment: the partitions added under the incremental protocol, the whole assignment under
/// the eager one.
fn take(consumer: &BaseConsumer<Ctx>, tpl: &TopicPartitionList, cooperative: bool) -> KafkaResult<()> {
    if cooperative {
        consumer.incremental_assign(tpl)
    } else {
        consumer.assign(tpl)
    }
}

impl ConsumerContext for Ctx {
    /// rdkafka's own sequence (pre-rebalance, assign or unassign, post-rebalance), with the start positions
    /// of `Latest` partitions resolved before the assignment (see [`Ctx::resolve_latest`]).
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::consumer::RebalanceProtocol;
        use rdkafka::types::RDKafkaRespErr;
        // Asked once, at the first assignment: it follows from the configured assignors, and asking
        // while the consumer closes (a revocation from rdkafka's `Drop`) blocks forever on librdkafka's
        // group thread, which no longer answers.
        let cooperative = match self.cooperative.get() {
            Some(c) => *c,
            None if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => *self
                .cooperative
                .get_or_init(|| matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative)),
            None => false, // nothing was ever assigned
        };
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS if self.closing.load(Ordering::Acquire) => {
                // The subscriber is stopping and will consume nothing more: the assignment is answered
                // (librdkafka's group waits for the call) without looking up positions, and released
                // by the unsubscribe that follows.
                tracing::debug!(subscriber = %self.name, "partitions assigned while stopping; releasing them");
                if let Err(e) = take(consumer, tpl, cooperative) {
                    tracing::debug!(subscriber = %self.name, error = %e, "assigning partitions while stopping failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let committed = self.committed(consumer, tpl);
                if let Some(c) = &committed {
                    self.send_prior_attempts(c);
                }
                self.resolve_latest(consumer, tpl, committed.as_ref());
                self.pre_rebalance(consumer, &Rebalance::Assign(tpl));
                if let Err(e) = take(consumer, tpl, cooperative) {
                    tracing::error!(subscriber = %self.name, error = %e, "assigning partitions failed");
                }
                self.post_rebalance(consumer, &Rebalance::Assign(tpl));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.pre_rebalance(consumer, &Rebalance::Revoke(tpl));
                let unassigned = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = unassigned {
                    tracing::error!(subscriber = %self.name, error = %e, "releasing partitions failed");
                }
                self.post_rebalance(consumer, &Rebalance::Revoke(tpl));
            }
            other => {
                let code: rdkafka::error::RDKafkaErrorCode = other.into();
                tracing::warn!(subscriber = %self.name, error = %code, "rebalance error");
                let _ = consumer.unassign();
                self.post_rebalance(consumer, &Rebalance::Error(KafkaError::Rebalance(code)));
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let (Rebalance::Assign(tpl), Some(fetch)) = (rebalance, self.fetch.get()) {
            // Before librdkafka starts fetching them: every message of these partitions then comes
            // through the fetch queue, in order.
            for e in tpl.elements() {
                if !fetch.route(consumer, e.topic(), e.partition()) {
                    tracing::debug!(subscriber = %self.name, topic = %e.topic(), partition = e.partition(),
                        "partition not routed to the fetch queue; its messages come through the consumer queue");
                }
            }
            return;
        }
        let Rebalance::Revoke(tpl) = rebalance else { return };
        let partitions = partitions_of(tpl, &self.topic);
        if partitions.is_empty() || self.closing.load(Ordering::Acquire) {
            return;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let reply = Box::new(move |commits: Commits| {
            let _ = tx.send(commits);
        });
        if self
            .events
            .blocking_send(LogEvent::Revoked { partitions, reply })
            .is_err()
        {
            return; // the engine is gone: nothing to drain
        }
        tracing::debug!(subscriber = %self.name, "partitions revoked; waiting for the engine to drain them");
        match rx.recv_timeout(self.revoke_wait) {
            Ok(commits) if !commits.is_empty() => {
                if let Err(e) = consumer.commit(&tpl_of(&commits, &self.attempts), CommitMode::Sync) {
                    tracing::warn!(subscriber = %self.name, error = %e, "final commit on revoke failed; the new owner may redeliver");
                }
            }
            Ok(_) => {}
            // The subscriber is stopping: its shutdown drained every partition and made the final commit
            // before it let the revocation go (`close` sets `closing` after that commit).
            Err(RecvTimeoutError::Disconnected) if self.closing.load(Ordering::Acquire) => {
                tracing::debug!(subscriber = %self.name, "revoked partitions released after the subscriber's final commit");
            }
            Err(RecvTimeoutError::Disconnected) => {
                tracing::warn!(subscriber = %self.name, "the subscriber stopped before it drained revoked partitions; releasing them uncommitted");
            }
            Err(RecvTimeoutError::Timeout) => {
                tracing::warn!(subscriber = %self.name, wait = ?self.revoke_wait,
                    "engine did not drain revoked partitions in time; releasing them uncommitted");
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let _ = self
                .events
                .blocking_send(LogEvent::Assigned(partitions_of(tpl, &self.topic)));
        }
    }
}

/// The partitions of a list, named by `topic` itself where it is theirs.
fn partitions_of(tpl: &TopicPartitionList, topic: &Arc<str>) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| partitions_of_one(e.topic(), e.partition(), topic))
        .collect()
}

fn partitions_of_one(name: &str, partition: i32, topic: &Arc<str>) -> TopicPartition {
    if name == &**topic {
        TopicPartition::new(topic.clone(), partition)
    } else {
        TopicPartition::new(name, partition)
    }
}

/// The commits as a partition list; a commit at the offset of a record that failed carries its failed
/// attempts in its metadata. A note the commits have moved past is dropped.
fn tpl_of(commits: &Commits, notes: &Notes) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(commits.len());
    let mut notes = notes.lock().unwrap_or_else(|p| p.into_inner());
    for (tp, o) in commits {
        let mut e = tpl.add_partition(&tp.topic, tp.partition);
        // Only an invalid offset is refused, which commits never hold.
        let _ = e.set_offset(Offset::Offset(*o));
        match notes.get(tp) {
            Some(&(offset, attempts)) if offset == *o => e.set_metadata(format!("{ATTEMPTS_METADATA}{attempts}")),
            Some(&(offset, _)) if offset < *o => {
                notes.remove(tp);
            }
            _ => {}
        }
    }
    tpl
}

fn single(tp: &TopicPartition) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(1);
    tpl.add_partition(&tp.topic, tp.partition);
    tpl
}

/// A [`LogConsumer`] over a Kafka consumer group member.
pub(crate) struct KafkaConsumer {
    name: Arc<str>,
    /// Declared before `consumer`, so a drop closes it first: a queue must not outlive its client.
    commits: CommitQueue,
    consumer: Arc<BaseConsumer<Ctx>>,
    events: mpsc::Receiver<LogEvent>,
    closing: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread_done: oneshot::Receiver<()>,
    attempts: Notes,
}

impl KafkaConsumer {
    pub(crate) fn start(config: &KafkaConfig, cfg: &ResolvedSubscriber) -> Result<Self, BrokerError> {
        let group = match &cfg.group_id {
            Some(g) => g.clone(),
            // No group: a private one, never committed to (the engine commits nothing without a group).
            None => {
                let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
                format!("ferrostream-private-{}-{}-{nanos}", cfg.name, std::process::id())
            }
        };
        let (tx, rx) = mpsc::channel(CHANNEL_BATCHES);
        let closing = Arc::new(AtomicBool::new(false));
        let topic: Arc<str> = cfg.topic.as_str().into();
        let ctx = Ctx {
            name: cfg.name.clone(),
            topic: topic.clone(),
            events: tx.clone(),
            closing: closing.clone(),
            // Plus room for the final commit.
            revoke_wait: cfg.revocation_drain() + Duration::from_secs(5),
            fetch: OnceLock::new(),
            cooperative: OnceLock::new(),
            throttle: Arc::default(),
            reset: cfg.auto_offset_reset,
            attempts: Notes::default(),
        };
        let attempts = ctx.attempts.clone();
        let throttle = ctx.throttle.clone();
        let mut consumer: BaseConsumer<Ctx> = config
            .consumer_config(&group, cfg.group_instance_id.as_deref(), cfg.auto_offset_reset)
            .create_with_context(ctx)
            .map_err(|e| kafka_error("create consumer", e))?;
        let fetch = FetchQueue::new(&consumer).ok_or_else(|| client_error("create fetch queue", "no queue"))?;
        let _ = consumer.context().fetch.set(fetch.clone());
        // An event (a rebalance, an error) ends the poll thread's wait on the fetch queue.
        let wake = fetch.clone();
        consumer.set_nonempty_callback(move || wake.wake());
        consumer
            .subscribe(&[&cfg.topic])
            .map_err(|e| kafka_error("subscribe", e))?;
        let consumer = Arc::new(consumer);
        // Declared after the consumer, so an early return drops (closes) it first.
        let commits = CommitQueue::new(&consumer).ok_or_else(|| client_error("create commit queue", "no queue"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = oneshot::channel();
        let fetch_if_unspawned = fetch.clone();
        let thread = PollThread {
            name: cfg.name.clone(),
            partitions: Partitions::new(topic),
            consumer: consumer.clone(),
            fetch,
            events: tx,
            stop: stop.clone(),
            throttle,
        };
        std::thread::Builder::new()
            .name(format!("ferrostream-poll-{}", cfg.name))
            .spawn(move || {
                thread.run();
                let _ = done_tx.send(());
            })
            .map_err(|e| {
                // No poll thread to close it: close it here, while the client still exists.
                fetch_if_unspawned.close();
                client_error("spawn poll thread", e)
            })?;
        Ok(KafkaConsumer {
            name: cfg.name.clone(),
            commits,
            consumer,
            events: rx,
            closing,
            stop,
            thread_done: done_rx,
            attempts,
        })
    }
}

struct PollThread {
    name: Arc<str>,
    partitions: Partitions,
    consumer: Arc<BaseConsumer<Ctx>>,
    fetch: FetchQueue,
    events: mpsc::Sender<LogEvent>,
    stop: Arc<AtomicBool>,
    throttle: Arc<Throttle>,
}

impl PollThread {
    fn run(mut self) {
        {
            let consumer = &*self.consumer;
            // Messages that came through the consumer queue (partitions the fetch queue does not get).
            let mut stray: Vec<BorrowedMessage<'_>> = Vec::new();
            let mut fetched = Fetched::default();
            while !self.stop.load(Ordering::Acquire) {
                // Events first: rebalance callbacks run inside this poll (and wake the wait below).
                while stray.len() < BATCH_MAX {
                    match consumer.poll(Duration::ZERO) {
                        Some(Ok(m)) => stray.push(m),
                        Some(Err(e)) => quiet::error(&self.throttle, &self.name, &e, "consumer error"),
                        None => break,
                    }
                }
                let batch = if !stray.is_empty() {
                    let batch = to_records(stray.iter(), &mut self.partitions, &self.name);
                    stray.clear();
                    batch
                } else {
                    self.fetch.consume(POLL_WAIT, BATCH_MAX, &mut fetched);
                    let batch = to_records(fetched.iter(), &mut self.partitions, &self.name);
                    fetched.clear();
                    batch
                };
                if !batch.is_empty() && self.events.blocking_send(LogEvent::Records(batch)).is_err() {
                    break;
                }
            }
        }
        // Leave the group from this thread: rdkafka's Drop polls until the consumer is closed. The fetch
        // queue is destroyed first: a queue must not outlive its client.
        self.consumer.unsubscribe();
        self.fetch.close();
        drop(self.consumer);
    }
}

/// What the poll thread reads of a fetched message, whichever queue it came through.
pub(super) trait FetchedMessage {
    fn error(&self) -> Option<String>;
    fn topic(&self) -> String;
    fn partition(&self) -> i32;
    fn offset(&self) -> i64;
    fn key(&self) -> Option<&[u8]>;
    fn payload(&self) -> &[u8];
    fn timestamp(&self) -> Option<i64>;
    fn headers(&self) -> Headers;
}

impl FetchedMessage for &BorrowedMessage<'_> {
    fn error(&self) -> Option<String> {
        None // `poll` reports errors itself
    }
    fn topic(&self) -> String {
        rdkafka::message::Message::topic(*self).to_owned()
    }
    fn partition(&self) -> i32 {
        rdkafka::message::Message::partition(*self)
    }
    fn offset(&self) -> i64 {
        rdkafka::message::Message::offset(*self)
    }
    fn key(&self) -> Option<&[u8]> {
        rdkafka::message::Message::key(*self)
    }
    fn payload(&self) -> &[u8] {
        rdkafka::message::Message::payload(*self).unwrap_or_default()
    }
    fn timestamp(&self) -> Option<i64> {
        rdkafka::message::Message::timestamp(*self).to_millis()
    }
    fn headers(&self) -> Headers {
        let mut headers = Headers::new();
        if let Some(h) = rdkafka::message::Message::headers(*self) {
            for header in h.iter() {
                headers.insert(header.key, Bytes::copy_from_slice(header.value.unwrap_or_default()));
            }
        }
        headers
    }
}

/// The `TopicPartition` of each partition of the subscribed topic, made once: reading the topic name of
/// every message from librdkafka (a C string, checked as UTF-8) costs more than the rest of a record.
struct Partitions {
    topic: Arc<str>,
    /// A `^regex` subscription can deliver several topics: then the name is read per message.
    pattern: bool,
    by_partition: Vec<Option<TopicPartition>>,
}

impl Partitions {
    fn new(topic: Arc<str>) -> Self {
        Partitions {
            pattern: topic.starts_with('^'),
            topic,
            by_partition: Vec::new(),
        }
    }

    fn of(&mut self, m: &impl FetchedMessage) -> TopicPartition {
        let p = m.partition();
        if self.pattern || p < 0 {
            return TopicPartition::new(m.topic(), p);
        }
        let i = p as usize;
        if i >= self.by_partition.len() {
            self.by_partition.resize(i + 1, None);
        }
        self.by_partition[i]
            .get_or_insert_with(|| TopicPartition::new(self.topic.clone(), p))
            .clone()
    }
}

/// Copies a batch out of librdkafka into one buffer (one allocation per batch, not two per message); each
/// record's key and payload are slices of it. A record kept alive keeps its batch's buffer alive. A
/// message that reports a fetch error instead of data is logged and skipped (librdkafka fetches on).
fn to_records<M: FetchedMessage>(
    fetched: impl Iterator<Item = M> + Clone,
    partitions: &mut Partitions,
    name: &str,
) -> Vec<Record> {
    let total: usize = fetched
        .clone()
        .map(|m| m.key().map_or(0, <[u8]>::len) + m.payload().len())
        .sum();
    let mut buf = BytesMut::with_capacity(total);
    let mut spans = Vec::with_capacity(fetched.size_hint().0);
    for m in fetched.clone() {
        let key = m.key().map(|k| {
            let start = buf.len();
            buf.extend_from_slice(k);
            start..buf.len()
        });
        let start = buf.len();
        buf.extend_from_slice(m.payload());
        spans.push((key, start..buf.len()));
    }
    let buf = buf.freeze();
    fetched
        .zip(spans)
        .filter_map(|(m, (key, payload))| {
            if let Some(e) = m.error() {
                tracing::warn!(subscriber = %name, partition = m.partition(), error = %e, "fetch error");
                return None;
            }
            Some(Record {
                tp: partitions.of(&m),
                offset: m.offset(),
                key: key.map(|r| buf.slice(r)),
                payload: buf.slice(payload),
                headers: m.headers(),
                timestamp: m.timestamp(),
                prior_attempts: 0,
                attempts: 0,
            })
        })
        .collect()
}

impl LogConsumer for KafkaConsumer {
    async fn next(&mut self) -> Option<LogEvent> {
        self.events.recv().await
    }

    fn pause(&mut self, tp: &TopicPartition) {
        if let Err(e) = self.consumer.pause(&single(tp)) {
            tracing::warn!(subscriber = %self.name, %tp, error = %e, "pause failed");
        }
    }

    fn resume(&mut self, tp: &TopicPartition) {
        if let Err(e) = self.consumer.resume(&single(tp)) {
            tracing::warn!(subscriber = %self.name, %tp, error = %e, "resume failed");
        }
    }

    fn commit(&mut self, commits: Commits) -> BoxFuture<'static, Result<(), BrokerError>> {
        Box::pin(self.commits.commit(&self.consumer, &tpl_of(&commits, &self.attempts)))
    }

    fn note_attempts(&mut self, tp: &TopicPartition, offset: i64, attempts: u32) {
        self.attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tp.clone(), (offset, attempts));
    }

    async fn close(self, final_commits: Commits) -> Result<(), BrokerError> {
        let mut result = Ok(());
        // Before taking `self` apart: if this future is dropped while it waits, `self` drops whole, in
        // field order (the commit queue before the consumer).
        if !final_commits.is_empty() {
            let commit = self
                .commits
                .commit(&self.consumer, &tpl_of(&final_commits, &self.attempts));
            result = match tokio::time::timeout(CLOSE_TIMEOUT, commit).await {
                Ok(r) => r,
                Err(_) => Err(BrokerError::Timeout {
                    op: "final commit",
                    timeout: CLOSE_TIMEOUT,
                }),
            };
        }
        let KafkaConsumer {
            name,
            commits,
            consumer,
            events,
            closing,
            stop,
            thread_done,
            attempts: _,
        } = self;
        closing.store(true, Ordering::Release);
        stop.store(true, Ordering::Release);
        commits.close();
        drop(consumer);
        drop(events);
        if tokio::time::timeout(CLOSE_TIMEOUT, thread_done).await.is_err() {
            tracing::warn!(subscriber = %name, "consumer did not close within {CLOSE_TIMEOUT:?}; abandoning its thread");
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assigned_partitions_share_the_subscribed_topics_name() {
        let topic: Arc<str> = "orders".into();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("orders", 0);
        tpl.add_partition("audit", 1);
        let tps = partitions_of(&tpl, &topic);
        assert_eq!(tps, [TopicPartition::new("orders", 0), TopicPartition::new("audit", 1)]);
        assert!(
            Arc::ptr_eq(&tps[0].topic, &topic),
            "the engine's lookups compare names by pointer first"
        );
        assert!(!Arc::ptr_eq(&tps[1].topic, &topic));
    }
}
