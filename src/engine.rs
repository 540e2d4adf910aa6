//! The engine: one per subscriber member. It takes records from a [`ConsumerTransport`], dispatches them
//! to the handler under the ack policy and the concurrency rules, turns settles into offsets through the
//! [`OffsetTracker`], and commits, rewinds, drains and shuts down. It is broker-agnostic: the in-memory
//! broker and Kafka run this very code.
//!
//! Rules it keeps (SPEC section 3):
//! - a record is dispatched at most once at a time, and not at all when its offset is already settled;
//! - per partition at most `max_in_flight` handlers run; two records with the same key (or both without
//!   a key) never run at once and start in offset order;
//! - `AckFirst` records are settled on receipt and dispatched only once the broker confirmed a commit
//!   past them (at most once, for real);
//! - a nack puts the nacked record back in its partition's queue, in offset order (SPEC 3.2): it is
//!   delivered again before every later record of its lane, and nothing at or after it is committed until
//!   it is settled. The engine holds every received, unsettled record (queued, in flight, or in the
//!   handle that nacks it), so redelivery needs no seek and no re-fetch: on Kafka a seek would wait for the
//!   long-polling fetch already at the broker (`fetch.wait.max.ms`) before the record could come back.
//!   After a rebalance or a restart the next owner resumes from the committed offset, at or before it;
//! - settles of a previous assignment of a partition (older generation) are ignored;
//! - at most one commit is in flight, so commits land in order.
//!
//! Handler calls run on the engine's own task: each is polled once in place when dispatched and, if it
//! waits, parked in a `FuturesUnordered` the engine polls. A call that finishes at once costs no task, no
//! wake-up and no channel message; that is most of what makes the per-message cost small (BENCHMARKS.md).

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::broker::Broker;
use crate::error::{BrokerError, Error};
use crate::extract::{Context, StateMap};
use crate::handler::ErasedHandler;
use crate::message::{Arrival, CORRELATION_ID, Message, Record, SettleEvent, SettleSink, SettledBy, Slot};
use crate::metrics::Counters;
use crate::observe::{Event, Outcome};
use crate::offset::{Delivery, OffsetTracker, TopicPartition};
use crate::publish::Outgoing;
use crate::retry::headers;
use crate::settle::{AckPolicy, Settle};
use crate::subscriber::{BatchConfig, ResolvedSubscriber};
use crate::transport::{Commits, ConsumerEvent, ConsumerTransport};

/// `AckFirst` settles and commits the queue in runs of this many records, at most two runs ahead. A run
/// must take longer to handle than a commit takes to come back, or the handler waits for every commit:
/// 2048 measured 0.70x the raw auto-commit loop, 8192 0.93-0.95x (BENCHMARKS.md).
const ACK_FIRST_RUN: usize = 8192;
/// The least time between a nack and the redelivery of its message.
const REDELIVERY_FLOOR: Duration = Duration::from_millis(10);
/// Wait before a message whose dead-letter publish failed comes back.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);
/// Wait before retrying a failed commit.
const COMMIT_RETRY: Duration = Duration::from_millis(200);
/// How long a drain that ran out of time still waits for the commit in flight (well inside the poll
/// thread's wait for a revoke's reply, which is the drain timeout plus 5 s).
const IN_FLIGHT_COMMIT_WAIT: Duration = Duration::from_secs(2);

/// Handler calls of one subscriber member at most run inline before the engine looks at its other work.
const INLINE_BUDGET: usize = 1024;

/// What message handles and publish tasks tell the engine.
#[derive(Debug)]
pub(crate) enum EngineEvent {
    /// A settle made by user code (`msg.ack()`...), sent through the message handle.
    Settled(SettleEvent),
    /// The dead-letter or retry-topic publish of a record ended.
    Forwarded {
        tp: TopicPartition,
        generation: u64,
        offset: i64,
        record: Box<Record>,
        to: Forward,
        result: Result<(), String>,
    },
}

/// A settle the engine applies: which delivery of the offset, and how and by whom it was settled.
#[derive(Clone, Copy)]
struct Settled {
    generation: u64,
    offset: i64,
    settle: Settle,
    by: SettledBy,
}

/// A handler call that ended: its messages and what it returned.
pub(crate) enum Completion {
    One(Message, Result<(), Error>),
    Batch(Vec<Message>, Result<(), Error>),
}

/// Where a record is published before its offset is settled.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Forward {
    DeadLetter,
    Retry { delay: Duration },
}

/// The attempts a record from the retry topic has already had.
fn header_attempts(record: &Record) -> u32 {
    record
        .headers
        .get_str(headers::ATTEMPTS)
        .and_then(|a| a.parse().ok())
        .unwrap_or(0)
}

/// When a record from the retry topic is due.
fn header_due(record: &Record) -> Option<std::time::SystemTime> {
    let millis: u64 = record.headers.get_str(headers::RETRY_DUE)?.parse().ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_millis(millis))
}

/// Everything a handler task needs, shared by all tasks of one subscriber.
pub(crate) struct SubscriberRuntime {
    pub(crate) cfg: ResolvedSubscriber,
    pub(crate) handler: Arc<dyn ErasedHandler>,
    pub(crate) state: StateMap,
    pub(crate) broker: Broker,
    pub(crate) counters: Arc<Counters>,
}

impl SubscriberRuntime {
    fn observe(&self, event: impl FnOnce() -> Event) {
        if let Some(o) = self.broker.observer_if_any() {
            o.record(event());
        }
    }
}

/// A received record waiting for its handler call. Its message handle (into the [`Arrival`] it came with)
/// is made on receipt, so that dispatch moves a pointer and nothing moves the record; offset and lane are
/// kept beside it, so that scanning the queue touches no record.
struct Queued {
    offset: i64,
    /// [`lane_of`] its key.
    lane: u64,
    msg: Message,
}

impl Queued {
    fn of(msg: Message) -> Self {
        Queued {
            offset: msg.offset(),
            lane: lane_of(&msg.record().key),
            msg,
        }
    }
}

/// Admits `rec`, the `index`-th record of its arrival, for a handler: counts the attempt (continuing the
/// retry topic's count for records read from it) and wires its handle's settles back to this engine.
fn admit(rt: &SubscriberRuntime, sink: &Arc<SettleSink>, rec: &mut Record, index: usize) -> Slot {
    let pre = (rt.cfg.policy == AckPolicy::AckFirst).then_some(Settle::Ack);
    let base = if rt.cfg.retry_consumer { header_attempts(rec) } else { 0 };
    rec.attempts += 1;
    Slot::new(index, base + rec.attempts, sink.clone(), pre)
}

struct Partition {
    generation: u64,
    /// Where this assignment's messages send their settles.
    sink: Arc<SettleSink>,
    /// Received, not yet dispatched, in offset order.
    queue: VecDeque<Queued>,
    /// Dispatched and not finished: offset and key lane ([`lane_of`]). At most `max_in_flight` entries,
    /// so a scan beats a map.
    in_flight: Vec<(i64, u64)>,
    /// After a delayed nack: dispatch nothing before this instant.
    hold_until: Option<Instant>,
    paused: bool,
    /// Rejected offsets whose dead-letter publish is under way: not settled until it is acknowledged.
    dead_lettering: HashSet<i64>,
    /// Failed offsets being published to the retry topic (non-blocking retries).
    retrying: HashSet<i64>,
    /// `AckFirst`: how many records at the front of `queue` are already settled (committed ahead).
    ack_first_ahead: usize,
}

impl Partition {
    fn lane_busy(&self, lane: u64) -> bool {
        self.in_flight.iter().any(|&(_, l)| l == lane)
    }

    fn new(generation: u64, sink: Arc<SettleSink>) -> Self {
        Partition {
            generation,
            sink,
            queue: VecDeque::new(),
            in_flight: Vec::new(),
            hold_until: None,
            paused: false,
            dead_lettering: HashSet::new(),
            retrying: HashSet::new(),
            ack_first_ahead: 0,
        }
    }
}

struct InFlightCommit {
    commits: Commits,
    future: BoxFuture<'static, Result<(), BrokerError>>,
}

pub(crate) struct Engine<T: ConsumerTransport> {
    transport: T,
    rt: Arc<SubscriberRuntime>,
    tracker: OffsetTracker,
    parts: FxHashMap<TopicPartition, Partition>,
    /// The assigned partitions, in assignment order (dispatch walks them without allocating).
    order: Vec<TopicPartition>,
    /// Handler calls that did not finish on their first poll.
    running: FuturesUnordered<Call>,
    next_generation: u64,
    events_tx: mpsc::UnboundedSender<EngineEvent>,
    events_rx: mpsc::UnboundedReceiver<EngineEvent>,
    commit: Option<InFlightCommit>,
    /// Settles since the last commit was started.
    settles_since_commit: usize,
    /// When the next cadence commit is due (None: nothing to commit).
    commit_due: Option<Instant>,
    commits_enabled: bool,
    shutdown: watch::Receiver<bool>,
    /// Tells the app the first assignment (or failure) happened.
    ready: Option<tokio::sync::oneshot::Sender<()>>,
    /// Batch mode: since when records have been ready without a batch starting.
    batch_since: Option<Instant>,
}

enum Step {
    Engine(EngineEvent),
    Completed(Completion),
    Committed(Result<(), BrokerError>),
    Consumer(Option<ConsumerEvent>),
    Tick,
    /// Dispatch stopped at its budget: come back to it once the other inputs had their turn.
    Continue,
    Shutdown,
}

impl<T: ConsumerTransport> Engine<T> {
    pub(crate) fn new(
        transport: T,
        rt: Arc<SubscriberRuntime>,
        shutdown: watch::Receiver<bool>,
        ready: tokio::sync::oneshot::Sender<()>,
    ) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let commits_enabled = rt.cfg.group_id.is_some();
        Engine {
            transport,
            rt,
            tracker: OffsetTracker::default(),
            parts: FxHashMap::default(),
            order: Vec::new(),
            running: FuturesUnordered::new(),
            next_generation: 0,
            events_tx,
            events_rx,
            commit: None,
            settles_since_commit: 0,
            commit_due: None,
            commits_enabled,
            shutdown,
            ready: Some(ready),
            batch_since: None,
        }
    }

    fn policy(&self) -> AckPolicy {
        self.rt.cfg.policy
    }

    fn sink(&self, generation: u64) -> Arc<SettleSink> {
        Arc::new(SettleSink {
            events: self.events_tx.clone(),
            generation,
            subscriber: self.rt.cfg.name.clone(),
        })
    }

    /// `AckFirst`'s run: `ACK_FIRST_RUN` records, or fewer when `max_buffered` cannot hold two runs (the
    /// queue holds the run being handled and the next one, whose commit is in flight meanwhile).
    fn ack_first_run(&self) -> usize {
        ACK_FIRST_RUN.min(self.rt.cfg.max_buffered / 2)
    }

    pub(crate) async fn run(mut self) {
        let name = self.rt.cfg.name.clone();
        loop {
            let more = self.dispatch_all();
            self.maybe_commit();
            match self.next_step(more).await {
                Step::Engine(ev) => self.on_engine_event(ev),
                Step::Completed(c) => self.on_completed(c),
                Step::Committed(r) => self.on_commit_done(r),
                Step::Consumer(Some(ev)) => self.on_consumer_event(ev).await,
                Step::Consumer(None) => {
                    tracing::error!(subscriber = %name, "consumer transport ended; stopping this subscriber");
                    break;
                }
                Step::Tick => self.on_tick(),
                Step::Continue => {}
                Step::Shutdown => break,
            }
        }
        self.shutdown().await;
    }

    /// The next instant something becomes due: a delayed nack's hold expiring, or the commit cadence
    /// (only while no commit is in flight; its completion wakes the loop anyway). Expired holds are
    /// cleared on the tick, so an expired instant is never returned twice (no busy loop).
    fn next_timer(&self) -> Option<Instant> {
        let holds = self.parts.values().filter_map(|p| p.hold_until);
        let commit = if self.commit.is_none() { self.commit_due } else { None };
        // A batch can only start when none is running and no synchronous commit is pending; while one of
        // those lasts, its completion (an engine event or the commit) wakes the loop instead.
        let batch_blocked = self.parts.values().any(|p| !p.in_flight.is_empty())
            || (self.rt.cfg.commit_sync_each && (self.commit.is_some() || self.commit_due.is_some()));
        let batch = match (self.rt.cfg.batch, self.batch_since) {
            (Some(b), Some(since)) if !batch_blocked => Some(since + b.timeout),
            _ => None,
        };
        holds.chain(commit).chain(batch).min()
    }

    async fn next_step(&mut self, more: bool) -> Step {
        let timer = self.next_timer();
        // A partition that is not paused yet holds `max_buffered` records (under `AckFirst`: records waiting
        // for their commit): take no more until it drains, so memory stays bounded without a pause.
        let max = self.rt.cfg.max_buffered;
        let commit = &mut self.commit;
        let transport = &mut self.transport;
        let full = self.parts.values().any(|p| !p.paused && p.queue.len() >= max);
        let rx = &mut self.events_rx;
        let running = &mut self.running;
        let shutdown = &mut self.shutdown;
        tokio::select! {
            biased;
            ev = rx.recv() => match ev {
                Some(ev) => Step::Engine(ev),
                // Unreachable: the engine holds a sender.
                None => Step::Shutdown,
            },
            Some(c) = running.next(), if !running.is_empty() => Step::Completed(c),
            r = async { commit.as_mut().map(|c| c.future.as_mut()).expect("guarded").await }, if commit.is_some() => Step::Committed(r),
            _ = shutdown.wait_for(|stop| *stop) => Step::Shutdown,
            _ = async { tokio::time::sleep_until(timer.expect("guarded")).await }, if timer.is_some() => Step::Tick,
            // Before new records: what is queued and dispatchable goes first (and is not counted as piling
            // up behind a busy handler when the next records arrive).
            _ = std::future::ready(()), if more => Step::Continue,
            ev = transport.next(), if !full => Step::Consumer(ev),
        }
    }

    // ---- consumer events -------------------------------------------------------------------------

    async fn on_consumer_event(&mut self, ev: ConsumerEvent) {
        match ev {
            ConsumerEvent::Records(records) => self.on_records(records),
            ConsumerEvent::Assigned(tps) => {
                for tp in &tps {
                    self.next_generation += 1;
                    if self
                        .parts
                        .insert(
                            tp.clone(),
                            Partition::new(self.next_generation, self.sink(self.next_generation)),
                        )
                        .is_none()
                    {
                        self.order.push(tp.clone());
                    }
                    self.tracker.assign(tp.clone());
                    // librdkafka keeps an application pause across unassign/assign: a partition paused by
                    // flow control before a rebalance would otherwise never fetch again.
                    self.transport.resume(tp);
                }
                tracing::info!(subscriber = %self.rt.cfg.name, partitions = ?tps, "partitions assigned");
                self.rt.observe(|| Event::Assigned {
                    subscriber: self.rt.cfg.name.clone(),
                    partitions: tps,
                });
                if let Some(ready) = self.ready.take() {
                    let _ = ready.send(());
                }
            }
            ConsumerEvent::Revoked { partitions, reply } => {
                let commits = self.drain(&partitions, self.rt.cfg.drain_timeout).await;
                for tp in &partitions {
                    self.parts.remove(tp);
                    self.tracker.revoke(tp);
                }
                self.order.retain(|tp| self.parts.contains_key(tp));
                tracing::info!(subscriber = %self.rt.cfg.name, partitions = ?partitions, final_commits = ?commits, "partitions revoked");
                if self.commits_enabled {
                    self.observe_commits(&commits);
                }
                reply(if self.commits_enabled { commits } else { Vec::new() });
                self.rt.observe(|| Event::Revoked {
                    subscriber: self.rt.cfg.name.clone(),
                    partitions,
                });
            }
        }
    }

    fn on_records(&mut self, mut records: Vec<Record>) {
        // Records come in runs of one partition, and each run becomes an arrival of its own: a handle then
        // keeps alive only records of its own partition, queued after it or handled before it in its run
        // (per partition at most `max_buffered` queued records, plus one run per handle still held). The
        // last run is split off first, so the first one (on a one-partition topic, all of them) stays
        // where the transport put it.
        let mut runs: Vec<Vec<Record>> = Vec::new();
        while let Some(last) = records.last() {
            let start = records.iter().rposition(|r| r.tp != last.tp).map_or(0, |i| i + 1);
            runs.push(records.split_off(start));
        }
        for run in runs.into_iter().rev() {
            self.on_run(run);
        }
    }

    /// One partition's run of records: admits what it brings that is new and queues their handles.
    fn on_run(&mut self, mut run: Vec<Record>) {
        let Some(tp) = run.first().map(|r| r.tp.clone()) else {
            return;
        };
        let (Some(part), Some(offsets)) = (self.parts.get_mut(&tp), self.tracker.partition(&tp)) else {
            return; // not ours (revoked meanwhile)
        };
        let mut slots = Vec::with_capacity(run.len());
        for (i, rec) in run.iter_mut().enumerate() {
            match offsets.deliver(rec.offset) {
                Delivery::Fresh => {}
                Delivery::Unsettled => {
                    if part.in_flight.iter().any(|(o, _)| *o == rec.offset) {
                        continue; // still running; its own settle decides
                    }
                }
                Delivery::Settled | Delivery::Stale => continue,
            }
            slots.push(admit(&self.rt, &part.sink, rec, i));
        }
        if !slots.is_empty() {
            part.queue.extend(Arrival::new(run, slots).messages().map(Queued::of));
        }
        if !part.paused {
            self.flow_control(&tp);
        } else {
            self.rt.counters.buffered(part.queue.len());
        }
    }

    /// `AckFirst` (SPEC 3.4): settles (and asks to commit) the queue in runs of `ACK_FIRST_RUN` records,
    /// at most two runs ahead of dispatch: the run being handled and the next one, whose commit is in
    /// flight meanwhile. A crash loses at most those two runs (plus what is in flight), never more, and
    /// nothing is dispatched before its commit is confirmed.
    fn ack_first_advance(&mut self, tp: &TopicPartition) {
        if self.policy() != AckPolicy::AckFirst {
            return;
        }
        let run = self.ack_first_run();
        let Some(part) = self.parts.get_mut(tp) else { return };
        let Some(offsets) = self.tracker.partition(tp) else {
            return;
        };
        let mut settled = 0;
        while part.ack_first_ahead <= run && part.ack_first_ahead < part.queue.len() {
            let start = part.ack_first_ahead;
            let end = part.queue.len().min(start + run);
            for q in part.queue.range(start..end) {
                offsets.settle(q.offset);
                self.rt.counters.settled(Settle::Ack);
                self.rt.observe(|| Event::Settled {
                    subscriber: self.rt.cfg.name.clone(),
                    tp: q.msg.topic_partition().clone(),
                    offset: q.offset,
                    settle: Settle::Ack,
                    by: SettledBy::Receipt,
                });
            }
            settled += end - start;
            part.ack_first_ahead = end;
        }
        if settled > 0 {
            self.note_settles(settled, true);
        }
    }

    // ---- dispatch ----------------------------------------------------------------------------------

    /// Dispatches what every partition's rules allow. Returns true when the inline budget ran out with
    /// work left, so the loop comes back to it after looking at its other inputs.
    fn dispatch_all(&mut self) -> bool {
        if self.rt.cfg.commit_sync_each && (self.commit.is_some() || self.commit_due.is_some()) {
            return false; // the previous settle is not committed yet
        }
        if let Some(batch) = self.rt.cfg.batch {
            self.dispatch_batch(batch);
            return false;
        }
        let now = Instant::now();
        let mut budget = INLINE_BUDGET;
        for i in 0..self.order.len() {
            let tp = self.order[i].clone();
            budget = self.dispatch_partition(&tp, now, budget);
        }
        budget == 0
    }

    /// Dispatches the records of one partition its rules allow. A handler call that finishes on its first
    /// poll is completed right here (no task, no channel), which frees its slot for the next record; one
    /// that waits joins `running`. Returns the budget left.
    fn dispatch_partition(&mut self, tp: &TopicPartition, now: Instant, mut budget: usize) -> usize {
        self.ack_first_advance(tp);
        let max = self.rt.cfg.max_in_flight;
        let ack_first = self.policy() == AckPolicy::AckFirst && self.commits_enabled;
        // Only a finished commit moves it, and none finishes during this loop.
        let confirmed = if ack_first { self.tracker.confirmed(tp) } else { None };
        while budget > 0 {
            if self.rt.cfg.commit_sync_each && (self.commit.is_some() || self.commit_due.is_some()) {
                break; // the previous settle is not committed yet
            }
            let Some(part) = self.parts.get_mut(tp) else {
                return budget;
            };
            if part.in_flight.len() >= max || part.queue.is_empty() {
                break;
            }
            if part.hold_until.is_some_and(|h| h > now) || !part.dead_lettering.is_empty() {
                return budget; // retries are blocking: nothing passes a message being retried or dead-lettered
            }
            part.hold_until = None;
            // The retry topic's records wait until they are due (they are roughly in due order).
            if self.rt.cfg.retry_consumer
                && let Some(due) = part.queue.front().and_then(|q| header_due(q.msg.record()))
                && let Ok(wait) = due.duration_since(std::time::SystemTime::now())
            {
                part.hold_until = Some(now + wait);
                return budget;
            }
            // The first record whose key is not busy and not held back by an earlier record of its key
            // (records of one key start in offset order).
            let mut blocked: Vec<u64> = Vec::new();
            let mut pick = None;
            for (i, q) in part.queue.iter().enumerate() {
                if ack_first && confirmed.is_none_or(|c| q.offset >= c) {
                    break; // its commit is not confirmed yet: at most once means commit first
                }
                if part.lane_busy(q.lane) || blocked.contains(&q.lane) {
                    if max == 1 {
                        break;
                    }
                    blocked.push(q.lane);
                    continue;
                }
                pick = Some(i);
                break;
            }
            let picked = match pick {
                Some(0) => part.queue.pop_front(),
                Some(i) => part.queue.remove(i),
                None => None,
            };
            let Some(Queued { offset, lane, msg }) = picked else {
                break;
            };
            part.ack_first_ahead = part.ack_first_ahead.saturating_sub(1);
            part.in_flight.push((offset, lane));
            if let Some(done) = self.start(Call::new(&self.rt, Messages::One(msg))) {
                self.on_completed(done);
            }
            budget -= 1;
        }
        if self.parts.get(tp).is_some_and(|p| p.paused) {
            self.flow_control(tp);
        }
        budget
    }

    /// Polls a new handler call once, here. Most calls of a fast handler finish on that poll, and then
    /// cost no task, no wake-up and no message to the engine. The first poll uses a no-op waker: a call
    /// that is not finished goes to `running`, whose next poll registers the real one (a future must
    /// wake the waker of its latest poll, so nothing is lost).
    fn start(&mut self, mut call: Call) -> Option<Completion> {
        let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
        match Pin::new(&mut call).poll(&mut cx) {
            Poll::Ready(done) => Some(done),
            Poll::Pending => {
                self.running.push(call);
                None
            }
        }
    }

    /// Bounded memory (SPEC 3.6): a partition whose queue reaches `max_buffered` records waiting behind its
    /// in-flight limit stops fetching; it fetches again once the queue is down to a quarter of that.
    /// Under `AckFirst` only records whose commit is confirmed count: the others wait for their commit,
    /// not for a handler, and `next_step` bounds them by taking no more records while they fill the queue.
    /// (Pausing is not free: librdkafka drops what it prefetched for the partition and fetches it again on
    /// resume, so a pause must mean a handler that cannot keep up, not a commit round trip.)
    fn flow_control(&mut self, tp: &TopicPartition) {
        let max = self.rt.cfg.max_buffered;
        let buffered = self.waiting(tp);
        let Some(part) = self.parts.get_mut(tp) else { return };
        self.rt.counters.buffered(part.queue.len());
        let paused = if !part.paused && buffered >= max {
            self.transport.pause(tp);
            true
        } else if part.paused && buffered <= max / 4 {
            self.transport.resume(tp);
            false
        } else {
            return;
        };
        part.paused = paused;
        tracing::debug!(subscriber = %self.rt.cfg.name, %tp, buffered, paused, "flow control");
        self.rt.observe(|| Event::FlowControl {
            subscriber: self.rt.cfg.name.clone(),
            tp: tp.clone(),
            paused,
            buffered,
        });
    }

    /// Records of a partition waiting for a handler slot.
    fn waiting(&self, tp: &TopicPartition) -> usize {
        let Some(part) = self.parts.get(tp) else { return 0 };
        if self.policy() == AckPolicy::AckFirst && self.commits_enabled {
            let confirmed = self.tracker.confirmed(tp);
            part.queue.partition_point(|q| confirmed.is_some_and(|c| q.offset < c))
        } else {
            part.queue.len()
        }
    }

    /// Batch mode (SPEC 3.10): one batch in flight at a time, so per-partition order holds; a batch
    /// starts when `max_records` are ready or the oldest ready record has waited `timeout`.
    fn dispatch_batch(&mut self, batch: BatchConfig) {
        if self.parts.values().any(|p| !p.in_flight.is_empty()) {
            return;
        }
        let waiting: Vec<TopicPartition> = self
            .parts
            .iter()
            .filter(|(_, p)| !p.queue.is_empty())
            .map(|(tp, _)| tp.clone())
            .collect();
        for tp in &waiting {
            self.ack_first_advance(tp);
        }
        let now = Instant::now();
        let ack_first = self.policy() == AckPolicy::AckFirst && self.commits_enabled;
        // How many records of each partition may go now: held partitions none; under AckFirst only
        // those whose commit is confirmed.
        let mut ready: Vec<(TopicPartition, usize)> = Vec::new();
        for (tp, part) in &self.parts {
            if part.hold_until.is_some_and(|h| h > now) || !part.dead_lettering.is_empty() {
                continue;
            }
            let confirmed = self.tracker.confirmed(tp);
            let n = if ack_first {
                part.queue
                    .iter()
                    .take_while(|q| confirmed.is_some_and(|c| q.offset < c))
                    .count()
            } else {
                part.queue.len()
            };
            if n > 0 {
                ready.push((tp.clone(), n));
            }
        }
        let available: usize = ready.iter().map(|(_, n)| n).sum();
        if available == 0 {
            self.batch_since = None;
            return;
        }
        let since = *self.batch_since.get_or_insert(now);
        if available < batch.max_records && now < since + batch.timeout {
            return; // the timer wakes us at since + timeout
        }
        self.batch_since = None;
        ready.sort();
        let mut messages = Vec::with_capacity(available.min(batch.max_records));
        for (tp, n) in ready {
            let Some(part) = self.parts.get_mut(&tp) else { continue };
            part.hold_until = None;
            let take = n.min(batch.max_records - messages.len());
            part.ack_first_ahead = part.ack_first_ahead.saturating_sub(take);
            for q in part.queue.drain(..take) {
                part.in_flight.push((q.offset, q.lane));
                messages.push(q.msg);
            }
            let paused = part.paused;
            if paused {
                self.flow_control(&tp);
            }
            if messages.len() == batch.max_records {
                break;
            }
        }
        if let Some(done) = self.start(Call::new(&self.rt, Messages::Batch(messages))) {
            self.on_completed(done);
        }
    }

    // ---- settles -------------------------------------------------------------------------------------

    /// A handler call ended. Settles made by code (of its messages or of others it holds) are applied
    /// first, then the policy's settle for its outcome, then its in-flight slots are freed.
    fn on_completed(&mut self, done: Completion) {
        // Code may have settled any message it holds a handle of, not only this call's: every settle waiting
        // in the channel is applied before this call's slots are freed. Under `AckFirst` code settles
        // nothing (every message is settled on receipt), so nothing can be waiting.
        if self.policy() != AckPolicy::AckFirst {
            while let Ok(ev) = self.events_rx.try_recv() {
                self.on_engine_event(ev);
            }
        }
        let (messages, result) = match &done {
            Completion::One(m, r) => (std::slice::from_ref(m), r),
            Completion::Batch(v, r) => (&v[..], r),
        };
        let verdict = Verdict::of(&self.rt, messages, result);
        for msg in messages {
            self.rt.counters.handled(verdict.label);
            self.rt.observe(|| Event::Handled {
                subscriber: self.rt.cfg.name.clone(),
                tp: msg.topic_partition().clone(),
                offset: msg.offset(),
                payload: String::from_utf8_lossy(msg.payload()).into_owned(),
                outcome: verdict.outcome.clone(),
            });
            if let Some((s, by)) = verdict.settle
                && msg.claim(s).is_ok()
            {
                let settled = Settled {
                    generation: msg.generation(),
                    offset: msg.offset(),
                    settle: s,
                    by,
                };
                self.apply_settle(
                    msg.topic_partition(),
                    settled,
                    msg.record_for(s),
                    verdict.reason.clone(),
                );
            }
        }
        match &done {
            Completion::One(m, _) => {
                if let Some(part) = self
                    .parts
                    .get_mut(m.topic_partition())
                    .filter(|p| p.generation == m.generation())
                    && let Some(i) = part.in_flight.iter().position(|(o, _)| *o == m.offset())
                {
                    part.in_flight.swap_remove(i);
                }
            }
            // One batch runs at a time: its end frees every slot of the partitions it came from.
            Completion::Batch(v, _) => {
                let mut freed: Vec<(&TopicPartition, u64)> = Vec::new();
                for m in v {
                    let from = (m.topic_partition(), m.generation());
                    if freed.contains(&from) {
                        continue;
                    }
                    freed.push(from);
                    if let Some(part) = self.parts.get_mut(from.0).filter(|p| p.generation == from.1) {
                        part.in_flight.clear();
                    }
                }
            }
        }
    }

    /// A settle takes effect on the offsets (SPEC 3.1-3.3): acks complete, nacks re-queue, rejects complete
    /// or go to the dead-letter topic first.
    fn on_settled(&mut self, ev: SettleEvent) {
        let SettleEvent {
            tp,
            generation,
            offset,
            settle,
            by,
            record,
            reason,
        } = ev;
        let settled = Settled {
            generation,
            offset,
            settle,
            by,
        };
        self.apply_settle(&tp, settled, record, reason);
    }

    /// Applies a settle of the message at `offset` of `tp`, delivered in assignment `generation`.
    fn apply_settle(
        &mut self,
        tp: &TopicPartition,
        settled: Settled,
        record: Option<Box<Record>>,
        reason: Option<String>,
    ) {
        let Settled {
            generation,
            offset,
            settle,
            by,
        } = settled;
        self.rt.counters.settled(settle);
        self.rt.observe(|| Event::Settled {
            subscriber: self.rt.cfg.name.clone(),
            tp: tp.clone(),
            offset,
            settle,
            by,
        });
        if self.parts.get(tp).is_none_or(|p| p.generation != generation) {
            tracing::debug!(subscriber = %self.rt.cfg.name, %tp, offset, "settle of a revoked assignment ignored");
            return;
        }
        let non_blocking = self.rt.cfg.retry_topic.is_some() && by == SettledBy::Policy;
        match (settle, record, &self.rt.cfg.dead_letter) {
            (Settle::Reject, Some(record), Some(_)) => self.forward(generation, *record, reason, Forward::DeadLetter),
            (Settle::Ack | Settle::Reject, _, _) => self.complete(tp, offset),
            (Settle::Nack { delay }, Some(record), _) if non_blocking => {
                let delay = delay.unwrap_or_default();
                self.forward(generation, *record, reason, Forward::Retry { delay })
            }
            (Settle::Nack { delay }, Some(record), _) => self.redeliver(*record, delay),
            (Settle::Nack { .. }, None, _) => {}
        }
    }

    fn on_engine_event(&mut self, ev: EngineEvent) {
        match ev {
            EngineEvent::Settled(ev) => self.on_settled(ev),
            EngineEvent::Forwarded {
                tp,
                generation,
                offset,
                record,
                to,
                result,
            } => {
                let Some(part) = self.parts.get_mut(&tp).filter(|p| p.generation == generation) else {
                    return; // revoked meanwhile: the offset stayed uncommitted, the next owner retries
                };
                part.dead_lettering.remove(&offset);
                part.retrying.remove(&offset);
                match result {
                    Ok(()) => {
                        let subscriber = self.rt.cfg.name.clone();
                        self.rt.observe(|| match to {
                            Forward::DeadLetter => Event::DeadLettered {
                                subscriber,
                                tp: tp.clone(),
                                offset,
                            },
                            Forward::Retry { delay } => Event::RetryScheduled {
                                subscriber,
                                tp: tp.clone(),
                                offset,
                                delay,
                            },
                        });
                        self.complete(&tp, offset);
                    }
                    Err(e) => {
                        tracing::error!(subscriber = %self.rt.cfg.name, %tp, offset, error = %e,
                            "dead-letter or retry publish failed; the message stays unsettled and comes back");
                        self.redeliver(*record, Some(DEAD_LETTER_RETRY));
                    }
                }
            }
        }
    }

    /// An ack, or a reject that needs no (more) dead-lettering: the offset counts as settled.
    fn complete(&mut self, tp: &TopicPartition, offset: i64) {
        if let Some(p) = self.tracker.partition(tp) {
            p.settle(offset);
        }
        self.note_settles(1, false);
    }

    /// SPEC 3.3 / 3.12: a record given up on goes to the dead-letter topic, and a record retried
    /// non-blocking goes to the retry topic; either way its offset is settled only once the broker has
    /// acknowledged that publish. Until then its partition dispatches nothing more (blocking), except
    /// for non-blocking retries, whose whole point is that the partition moves on.
    fn forward(&mut self, generation: u64, record: Record, reason: Option<String>, to: Forward) {
        let cfg = &self.rt.cfg;
        let topic = match to {
            Forward::DeadLetter => cfg.dead_letter.clone(),
            Forward::Retry { .. } => cfg.retry_topic.clone(),
        };
        let Some(topic) = topic else { return };
        let base = if cfg.retry_consumer {
            header_attempts(&record)
        } else {
            0
        };
        let Some(part) = self.parts.get_mut(&record.tp) else {
            return;
        };
        let attempts = base + record.attempts.max(1);
        match to {
            Forward::DeadLetter => part.dead_lettering.insert(record.offset),
            Forward::Retry { .. } => part.retrying.insert(record.offset),
        };
        let mut out = Outgoing::new(topic, record.payload.clone());
        out.key = record.key.clone();
        out.headers = record.headers.clone();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let mut set = |name: &str, value: String| out.headers.set(name, value.into_bytes());
        set(
            headers::ERROR,
            reason.unwrap_or_else(|| "rejected by the handler".to_owned()),
        );
        set(headers::ATTEMPTS, attempts.to_string());
        set(headers::SUBSCRIBER, cfg.name.trim_end_matches(".retry").to_owned());
        set(headers::GROUP, cfg.group_id.clone().unwrap_or_default());
        match to {
            Forward::DeadLetter => set(headers::DEAD_LETTERED_AT, now.to_string()),
            Forward::Retry { delay } => {
                // Rounded up to the millisecond, so the retry never comes before its backoff.
                let due = std::time::SystemTime::now() + delay;
                let due = due
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros().div_ceil(1000));
                set(headers::RETRY_DUE, due.to_string())
            }
        }
        // The original coordinates: kept from the first hop when the record comes from the retry topic.
        let original = [
            (headers::SOURCE_TOPIC, record.tp.topic.to_string()),
            (headers::SOURCE_PARTITION, record.tp.partition.to_string()),
            (headers::SOURCE_OFFSET, record.offset.to_string()),
            (
                headers::SOURCE_TIMESTAMP,
                record.timestamp.map(|t| t.to_string()).unwrap_or_default(),
            ),
            (headers::FIRST_FAILURE, now.to_string()),
        ];
        for (name, value) in original {
            if out.headers.get(name).is_none() && !value.is_empty() {
                out.headers.set(name, value.into_bytes());
            }
        }
        let broker = self.rt.broker.clone();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let result = broker.send(out).await.map(|_| ()).map_err(|e| e.to_string());
            let _ = events.send(EngineEvent::Forwarded {
                tp: record.tp.clone(),
                generation,
                offset: record.offset,
                record: Box::new(record),
                to,
                result,
            });
        });
    }

    /// SPEC 3.2: nothing at or after the nacked offset is committed until it is settled (the tracker keeps
    /// it unsettled); it is delivered again from the queue, before the later records of its lane.
    fn redeliver(&mut self, mut record: Record, delay: Option<Duration>) {
        let Some(part) = self.parts.get_mut(&record.tp) else {
            return;
        };
        let at = part.queue.partition_point(|q| q.offset < record.offset);
        if part.queue.get(at).is_none_or(|q| q.offset != record.offset) {
            let slot = admit(&self.rt, &part.sink, &mut record, 0);
            part.queue.insert(at, Queued::of(Arrival::single(record, slot)));
        }
        // A floor on every redelivery: no configuration can make a failing message loop hot (SPEC 3.12).
        let until = Instant::now() + delay.unwrap_or_default().max(REDELIVERY_FLOOR);
        part.hold_until = Some(part.hold_until.map_or(until, |h| h.max(until)));
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        for part in self.parts.values_mut() {
            if part.hold_until.is_some_and(|h| h <= now) {
                part.hold_until = None;
            }
        }
        // A due commit is started by `maybe_commit` right after this.
    }

    // ---- commits -------------------------------------------------------------------------------------

    fn note_settles(&mut self, n: usize, urgent: bool) {
        if !self.commits_enabled {
            return;
        }
        self.settles_since_commit = self.settles_since_commit.saturating_add(n);
        let urgent = urgent || self.rt.cfg.commit_sync_each;
        if !urgent && self.commit_due.is_some() {
            return; // an earlier settle already set a due time, and time only moves on
        }
        let due = if urgent {
            Instant::now()
        } else {
            Instant::now() + self.rt.cfg.commit_interval
        };
        self.commit_due = Some(self.commit_due.map_or(due, |d| d.min(due)));
    }

    fn maybe_commit(&mut self) {
        if !self.commits_enabled || self.commit.is_some() {
            return;
        }
        let Some(due) = self.commit_due else { return };
        let now_due = due <= Instant::now() || self.settles_since_commit >= self.rt.cfg.commit_every;
        if !now_due {
            return;
        }
        self.commit_due = None;
        self.settles_since_commit = 0;
        let commits = self.tracker.take_commits();
        if commits.is_empty() {
            return;
        }
        let future = self.transport.commit(commits.clone());
        self.commit = Some(InFlightCommit { commits, future });
    }

    fn on_commit_done(&mut self, r: Result<(), BrokerError>) {
        let Some(done) = self.commit.take() else { return };
        match r {
            Ok(()) => {
                self.rt.counters.committed(true);
                self.tracker.confirm(&done.commits);
                self.observe_commits(&done.commits);
            }
            Err(e) => {
                self.rt.counters.committed(false);
                tracing::warn!(subscriber = %self.rt.cfg.name, error = %e, "commit failed; retrying");
                self.tracker.commit_failed(&done.commits);
                let retry = Instant::now() + COMMIT_RETRY;
                self.commit_due = Some(self.commit_due.map_or(retry, |d| d.max(retry)));
            }
        }
    }

    fn observe_commits(&self, commits: &Commits) {
        for (tp, offset) in commits {
            self.rt.observe(|| Event::Committed {
                subscriber: self.rt.cfg.name.clone(),
                tp: tp.clone(),
                offset: *offset,
            });
        }
    }

    // ---- revoke and shutdown -----------------------------------------------------------------------

    /// Stops dispatching `tps`, waits for their in-flight handlers up to the drain timeout, and returns
    /// the final offsets to commit for them (SPEC 3.7).
    async fn drain(&mut self, tps: &[TopicPartition], timeout: Duration) -> Commits {
        // Unsettled queued records are simply not dispatched: they stay uncommitted and the next owner
        // (or the next run) gets them. Under AckFirst the records committed ahead are already settled:
        // dropping them would lose them without a crash, so they are still handled, up to the deadline.
        let ack_first = self.policy() == AckPolicy::AckFirst;
        for tp in tps {
            if let Some(p) = self.parts.get_mut(tp) {
                let keep = if ack_first { p.ack_first_ahead } else { 0 };
                p.queue.truncate(keep);
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            if ack_first {
                match self.rt.cfg.batch {
                    Some(batch) => self.dispatch_batch(batch),
                    None => {
                        let now = Instant::now();
                        for tp in tps {
                            self.dispatch_partition(tp, now, INLINE_BUDGET);
                        }
                    }
                }
            }
            self.maybe_commit();
            let busy = tps.iter().any(|tp| {
                self.parts.get(tp).is_some_and(|p| {
                    !p.in_flight.is_empty()
                        || !p.dead_lettering.is_empty()
                        || !p.retrying.is_empty()
                        || (ack_first && !p.queue.is_empty())
                })
            });
            if !busy && self.commit.is_none() {
                break;
            }
            let timer = self.next_timer().map_or(deadline, |t| t.min(deadline));
            let commit = &mut self.commit;
            let rx = &mut self.events_rx;
            let running = &mut self.running;
            let step = tokio::select! {
                biased;
                ev = rx.recv() => match ev { Some(ev) => Step::Engine(ev), None => Step::Shutdown },
                Some(c) = running.next(), if !running.is_empty() => Step::Completed(c),
                r = async { commit.as_mut().map(|c| c.future.as_mut()).expect("guarded").await }, if commit.is_some() => Step::Committed(r),
                _ = tokio::time::sleep_until(timer) => Step::Tick,
            };
            match step {
                Step::Engine(ev) => self.on_engine_event(ev),
                Step::Completed(c) => self.on_completed(c),
                Step::Committed(r) => self.on_commit_done(r),
                _ if Instant::now() < deadline => self.on_tick(),
                _ => {
                    let (running, queued) = tps
                        .iter()
                        .filter_map(|tp| self.parts.get(tp))
                        .fold((0, 0), |(r, q), p| (r + p.in_flight.len(), q + p.queue.len()));
                    tracing::warn!(subscriber = %self.rt.cfg.name, in_flight = running, queued,
                        "drain deadline passed; unsettled messages stay uncommitted and will be redelivered");
                    break;
                }
            }
        }
        self.finish_commit_in_flight().await;
        let mut commits = self.tracker.watermarks(tps);
        if ack_first {
            // Records whose commit-ahead was never confirmed and that no handler saw: leave them to the
            // next owner rather than commit them now.
            for (tp, offset) in &mut commits {
                let confirmed = self.tracker.confirmed(tp);
                let unseen = self.parts.get(tp).and_then(|p| {
                    p.queue
                        .iter()
                        .map(|q| q.offset)
                        .find(|o| confirmed.is_none_or(|c| *o >= c))
                });
                if let Some(first) = unseen {
                    *offset = (*offset).min(first);
                }
            }
            commits.retain(|(tp, o)| self.tracker.confirmed(tp).is_none_or(|c| *o > c));
        }
        commits
    }

    /// A commit still in flight when a drain's deadline passed must land before the drain's final commit,
    /// or it could move the committed offset back after it. Waits for it, within `IN_FLIGHT_COMMIT_WAIT`.
    async fn finish_commit_in_flight(&mut self) {
        let Some(mut c) = self.commit.take() else { return };
        match tokio::time::timeout(IN_FLIGHT_COMMIT_WAIT, c.future.as_mut()).await {
            Ok(r) => {
                self.commit = Some(c);
                self.on_commit_done(r);
            }
            Err(_) => tracing::warn!(subscriber = %self.rt.cfg.name, wait = ?IN_FLIGHT_COMMIT_WAIT,
                "a commit is still in flight after the drain; the final commit goes out anyway"),
        }
    }

    async fn shutdown(mut self) {
        let tps: Vec<TopicPartition> = self.parts.keys().cloned().collect();
        let commits = self.drain(&tps, self.rt.cfg.shutdown_timeout).await;
        if self.commits_enabled {
            self.observe_commits(&commits);
        }
        let name = self.rt.cfg.name.clone();
        let commits = if self.commits_enabled { commits } else { Vec::new() };
        if let Err(e) = self.transport.close(commits).await {
            tracing::error!(subscriber = %name, error = %e, "final commit or close failed");
        }
        tracing::info!(subscriber = %name, "subscriber stopped");
    }
}

/// The messages of one handler call.
enum Messages {
    One(Message),
    Batch(Vec<Message>),
}

/// One handler call under way (SPEC section 2): the handler's future (panics caught, SPEC 2.3), then the
/// publish of its result (SPEC 3.11). Written out rather than as an `async fn` so that it needs no box of
/// its own and, being `Unpin`, can be polled once in place and only then, if it waits, parked in
/// `running`.
pub(crate) struct Call {
    /// Only for a subscriber that publishes its handler's results (most do not, and then a call costs no
    /// reference count on the runtime).
    publish: Option<Arc<SubscriberRuntime>>,
    messages: Option<Messages>,
    stage: Stage,
}

enum Stage {
    Handler(BoxFuture<'static, Result<Option<Bytes>, Error>>),
    Publishing(BoxFuture<'static, Result<(), Error>>),
    /// Ended before it started: the extraction or the call itself failed.
    Ended(Result<(), Error>),
}

impl Call {
    /// Extracts the arguments and starts the handler.
    fn new(rt: &Arc<SubscriberRuntime>, messages: Messages) -> Self {
        let stage = {
            let cx = match &messages {
                Messages::One(m) => Some(Context::single(m, &rt.state)),
                Messages::Batch(v) => v.first().map(|first| Context {
                    message: first,
                    batch: v,
                    state: &rt.state,
                }),
            };
            match cx.map(|cx| std::panic::catch_unwind(AssertUnwindSafe(|| rt.handler.call(&cx)))) {
                Some(Ok(fut)) => Stage::Handler(fut),
                Some(Err(panic)) => Stage::Ended(Err(Error::panic(panic_message(panic)))),
                None => Stage::Ended(Ok(())),
            }
        };
        Call {
            publish: (!rt.cfg.publish_to.is_empty()).then(|| rt.clone()),
            messages: Some(messages),
            stage,
        }
    }

    fn first(&self) -> Option<&Message> {
        match self.messages.as_ref()? {
            Messages::One(m) => Some(m),
            Messages::Batch(v) => v.first(),
        }
    }
}

impl Future for Call {
    type Output = Completion;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Completion> {
        let this = &mut *self;
        loop {
            let result = match &mut this.stage {
                Stage::Handler(fut) => match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(Ok(Some(payload)))) if this.publish.is_some() => {
                        match (this.first().cloned(), &this.publish) {
                            (Some(msg), Some(rt)) => {
                                this.stage = Stage::Publishing(Box::pin(publish_result(rt.clone(), msg, payload)));
                                continue;
                            }
                            _ => Ok(()),
                        }
                    }
                    Ok(Poll::Ready(r)) => r.map(|_| ()),
                    Err(panic) => Err(Error::panic(panic_message(panic))),
                },
                Stage::Publishing(fut) => match fut.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(r) => r,
                },
                Stage::Ended(r) => std::mem::replace(r, Ok(())),
            };
            return Poll::Ready(match this.messages.take() {
                Some(Messages::One(m)) => Completion::One(m, result),
                Some(Messages::Batch(v)) => Completion::Batch(v, result),
                // Polled again after it completed: a bug in the caller, not in the handler.
                None => Completion::Batch(Vec::new(), result),
            });
        }
    }
}

/// What a handler call's outcome means: how it is recorded and how the policy settles its messages.
struct Verdict {
    outcome: Outcome,
    /// The failure kind, for the counters.
    label: Option<&'static str>,
    settle: Option<(Settle, SettledBy)>,
    reason: Option<String>,
}

impl Verdict {
    /// Reads the outcome (logging a failure) and applies the policy and the retry budget to it.
    fn of(rt: &SubscriberRuntime, messages: &[Message], result: &Result<(), Error>) -> Self {
        let cfg = &rt.cfg;
        let outcome = match result {
            Ok(()) => Outcome::Ok,
            Err(e) => match e.interrupt() {
                Some(s) => Outcome::Interrupted(s),
                None => Outcome::Failed {
                    kind: e.label(),
                    message: e.to_string(),
                },
            },
        };
        let label = match &outcome {
            Outcome::Failed { kind, .. } => Some(*kind),
            _ => None,
        };
        if let (Err(e), Some(_), Some(first)) = (result, label, messages.first()) {
            tracing::error!(
                subscriber = %cfg.name, topic = first.topic(), partition = first.partition(), offset = first.offset(),
                attempt = first.attempt(), batch = messages.len(), kind = e.label(), error = %e, "handler failed"
            );
        }
        let (settle, reason) = match &outcome {
            Outcome::Interrupted(s) => (
                Some((*s, SettledBy::Interrupt)),
                (*s == Settle::Reject).then(|| "rejected with RejectMessage".to_owned()),
            ),
            Outcome::Ok => (cfg.policy.after_handler(true).map(|s| (s, SettledBy::Policy)), None),
            Outcome::Failed { kind, message } => {
                let settle = match &cfg.retry {
                    // SPEC 3.12: with a retry budget, a failure is retried after a backoff until the budget
                    // is spent or the failure cannot succeed; then the message is rejected.
                    Some(retry) => {
                        let attempt = messages.iter().map(Message::attempt).max().unwrap_or(1);
                        Some(if retry.retries(kind) && attempt < retry.max_attempts {
                            Settle::Nack {
                                delay: Some(retry.delay(attempt)),
                            }
                        } else {
                            Settle::Reject
                        })
                    }
                    None => cfg.policy.after_handler(false),
                };
                (
                    settle.map(|s| (s, SettledBy::Policy)),
                    Some(format!("{kind} error: {message}")),
                )
            }
        };
        Verdict {
            outcome,
            label,
            settle,
            reason,
        }
    }
}

/// The ordering lane of a key (SPEC 3.6): records of one lane never run at once and start in offset order.
/// A hash, so tracking a running record takes no reference on its key; two keys that share a hash share
/// a lane, which only orders more than needed, never less.
fn lane_of(key: &Option<Bytes>) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = rustc_hash::FxHasher::default();
    key.as_deref().hash(&mut h);
    h.finish()
}

/// SPEC 3.11: the result is published (and acknowledged) before the incoming message is settled.
async fn publish_result(rt: Arc<SubscriberRuntime>, msg: Message, payload: Bytes) -> Result<(), Error> {
    let correlation = msg
        .correlation_id()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{}-{}", msg.topic_partition(), msg.offset()));
    for topic in &rt.cfg.publish_to {
        let mut out = Outgoing::new(topic.clone(), payload.clone());
        out.key = msg.key().cloned();
        out.headers.set(CORRELATION_ID, correlation.clone().into_bytes());
        rt.broker.send(out).await.map_err(Error::handler)?;
    }
    Ok(())
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::sync::{Notify, Semaphore, oneshot};

    use super::*;
    use crate::handler::Erased;
    use crate::message::Headers;

    /// A transport the test drives: it pushes the events, and each commit finishes only when the test
    /// releases it.
    struct Scripted {
        events: mpsc::UnboundedReceiver<ConsumerEvent>,
        log: Arc<Mutex<Vec<String>>>,
        sent: Arc<Notify>,
        release: Arc<Semaphore>,
    }

    impl ConsumerTransport for Scripted {
        async fn next(&mut self) -> Option<ConsumerEvent> {
            self.events.recv().await
        }
        fn pause(&mut self, _: &TopicPartition) {}
        fn resume(&mut self, _: &TopicPartition) {}
        fn commit(&mut self, commits: Commits) -> BoxFuture<'static, Result<(), BrokerError>> {
            let (log, release) = (self.log.clone(), self.release.clone());
            self.sent.notify_one();
            Box::pin(async move {
                release.acquire().await.expect("never closed").forget();
                let offsets: Vec<i64> = commits.iter().map(|(_, o)| *o).collect();
                log.lock().expect("log").push(format!("committed {offsets:?}"));
                Ok(())
            })
        }
        async fn close(self, _: Commits) -> Result<(), BrokerError> {
            Ok(())
        }
    }

    fn record(tp: &TopicPartition, offset: i64) -> Record {
        Record {
            tp: tp.clone(),
            offset,
            key: None,
            payload: Bytes::from_static(b"x"),
            headers: Headers::new(),
            timestamp: None,
            attempts: 0,
        }
    }

    /// SPEC 3.7 with a slow broker: a revoke's drain runs out of time while a commit is in flight. The
    /// engine waits (bounded) for that commit before it hands over the final offsets, so the in-flight
    /// commit cannot land after the final one and move the committed offset back.
    #[tokio::test]
    async fn a_drain_past_its_deadline_lets_the_commit_in_flight_land_before_the_final_offsets() {
        let broker = Broker::new("memory://").expect("broker");
        let cfg = broker
            .subscriber("t")
            .group_id("g")
            .ack_policy(AckPolicy::NackOnError)
            .commit_every(1)
            .drain_timeout(Duration::from_millis(50))
            .into_config()
            .resolve()
            .expect("valid config");
        let handler = |_: Bytes| async {};
        let rt = Arc::new(SubscriberRuntime {
            cfg,
            handler: Arc::new(Erased::new(handler)),
            state: StateMap::default(),
            broker: broker.clone(),
            counters: Arc::new(Counters::default()),
        });
        let (tx, events) = mpsc::unbounded_channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (sent, release) = (Arc::new(Notify::new()), Arc::new(Semaphore::new(0)));
        let transport = Scripted {
            events,
            log: log.clone(),
            sent: sent.clone(),
            release: release.clone(),
        };
        let (_stop, stop_rx) = watch::channel(false);
        let (ready_tx, ready) = oneshot::channel();
        let engine = tokio::spawn(Engine::new(transport, rt, stop_rx, ready_tx).run());
        let wait = Duration::from_secs(5);

        let tp = TopicPartition::new("t", 0);
        assert!(
            tx.send(ConsumerEvent::Assigned(vec![tp.clone()])).is_ok(),
            "engine runs"
        );
        tokio::time::timeout(wait, ready)
            .await
            .expect("assigned")
            .expect("ready");
        assert!(
            tx.send(ConsumerEvent::Records(vec![record(&tp, 0)])).is_ok(),
            "engine runs"
        );
        tokio::time::timeout(wait, sent.notified())
            .await
            .expect("the record's commit is sent");

        let (replied_tx, mut replied) = oneshot::channel();
        let reply_log = log.clone();
        let reply = Box::new(move |commits: Commits| {
            let offsets: Vec<i64> = commits.iter().map(|(_, o)| *o).collect();
            reply_log.lock().expect("log").push(format!("final {offsets:?}"));
            let _ = replied_tx.send(());
        });
        let revoked = ConsumerEvent::Revoked {
            partitions: vec![tp.clone()],
            reply,
        };
        assert!(tx.send(revoked).is_ok(), "engine runs");
        // Well past the 50 ms drain deadline, the engine still waits for the commit in flight.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut replied)
                .await
                .is_err(),
            "the final offsets were handed over with a commit still in flight: {:?}",
            log.lock().expect("log")
        );
        release.add_permits(1);
        tokio::time::timeout(wait, replied)
            .await
            .expect("the drain ends")
            .expect("replied");
        assert_eq!(*log.lock().expect("log"), ["committed [1]", "final []"]);
        drop(tx);
        tokio::time::timeout(wait, engine)
            .await
            .expect("the engine stops")
            .expect("no panic");
    }
}
