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

mod call;
mod commits;
mod dispatch;
mod drain;
mod forward;
mod intake;
mod settling;
#[cfg(test)]
mod tests;
mod verdict;

use call::{Call, Completion, Messages};
use commits::InFlightCommit;
use dispatch::lane_of;
use forward::Forward;
use intake::{admit, header_attempts};
use verdict::Verdict;

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
}
