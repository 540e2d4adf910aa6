//! The engine: one per subscriber member. It takes records from a [`Transport`], dispatches them to the
//! handler under the ack policy and the concurrency rules, turns each call's outcome into one settle per
//! message, and drains and shuts down. It knows no broker and no `Broker`: every broker runs this very
//! code, and what differs between them (who redelivers a nack, whether a source is an ordered log, how a
//! settle reaches the broker) is the transport's [`Capabilities`] and [`Transport::settle`]. On a log
//! (Kafka, the in-memory broker) settles become watermark commits in [`crate::log`].
//!
//! Rules it keeps (SPEC section 3):
//! - a record is dispatched at most once at a time, and not at all when its offset is already settled;
//! - per partition at most `max_in_flight` handlers run; two records with the same key (or both without
//!   a key) never run at once and start in offset order;
//! - `AckFirst` records are settled on receipt and dispatched only once that settle is realised (on a
//!   log: the broker confirmed a commit past them, at most once for real; on RabbitMQ: the ack was
//!   written, which a connection lost at that instant can undo);
//! - where the broker does not redeliver (a log), a nack puts the nacked record back in its partition's queue, in offset order (SPEC 3.2): it is
//!   delivered again before every later record of its lane, and nothing at or after it is committed until
//!   it is settled. The engine holds every received, unsettled record (queued, in flight, or in the
//!   handle that nacks it), so redelivery needs no seek and no re-fetch: on Kafka a seek would wait for the
//!   long-polling fetch already at the broker (`fetch.wait.max.ms`) before the record could come back.
//!   After a rebalance or a restart the next owner resumes from the committed offset, at or before it;
//! - settles of a previous assignment of a partition (older generation) are ignored.
//!
//! Handler calls run on the engine's own task: each is polled once in place when dispatched and, if it
//! waits, parked in a `FuturesUnordered` the engine polls. A call that finishes at once costs no task, no
//! wake-up and no channel message; that is most of what makes the per-message cost small (BENCHMARKS.md).

mod call;
mod dispatch;
mod drain;
mod forward;
mod intake;
mod pace;
mod panics;
mod settling;
#[cfg(test)]
mod tests;
mod verdict;

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::ResolvedSubscriber;
use crate::extract::StateMap;
use crate::handler::ErasedHandler;
use crate::hooks::Hooks;
use crate::message::{Message, SettleEvent, SettleSink, SettledBy};
use crate::metrics::Counters;
use crate::offset::TopicPartition;
use crate::settle::{AckPolicy, Settle};
use crate::transport::{Capabilities, Pending, Publisher, Transport, TransportEvent};
use call::{Call, Completion};
use dispatch::lane_of;
use forward::Forwarded;

/// `AckFirst` settles and commits the queue in runs of at most this many records, at most two runs ahead;
/// a run is what the handler gets through in half a commit interval ([`pace`]), up to this cap. A run
/// must take longer to handle than a commit takes to come back, or the handler waits for every commit:
/// 2048 measured 0.70x the raw auto-commit loop, 8192 0.93-0.95x (BENCHMARKS.md).
const ACK_FIRST_RUN: usize = 8192;

/// Handler calls of one subscriber member at most run inline before the engine looks at its other work
/// (settles, commits, completions, records)...
const INLINE_BUDGET: usize = 1024;
/// ...and the time they may take at most: a CPU-bound handler still lets the commit cadence run on time.
const INLINE_SLICE: std::time::Duration = std::time::Duration::from_millis(5);

/// A settle the engine applies: which delivery of the offset, and how and by whom it was settled.
#[derive(Clone, Copy)]
struct Settled {
    generation: u64,
    offset: i64,
    settle: Settle,
    by: SettledBy,
}

/// Everything a subscriber's engine needs besides its transport: settings, handler, state, where its
/// results and dead letters are published, its hooks and counters.
pub(crate) struct SubscriberRuntime {
    pub(crate) cfg: ResolvedSubscriber,
    pub(crate) handler: Arc<dyn ErasedHandler>,
    /// The handler wrapped in its middleware; `None` without middleware (the handler is called directly).
    pub(crate) service: Option<crate::middleware::Next>,
    pub(crate) state: Arc<StateMap>,
    pub(crate) publisher: Arc<dyn Publisher>,
    pub(crate) hooks: Hooks,
    pub(crate) counters: Arc<Counters>,
}

impl SubscriberRuntime {
    /// Whether a call of these messages publishes anything after the handler: a result to `publish_to`,
    /// or a reply to a request.
    pub(crate) fn publishes(&self, messages: &[Message]) -> bool {
        !self.cfg.publish_to.is_empty() || messages.iter().any(|m| m.reply_to().is_some())
    }
}

/// Starts one subscriber's engine over the transport its broker makes.
pub(crate) struct Launch {
    pub(crate) rt: Arc<SubscriberRuntime>,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Fires on the first assignment.
    pub(crate) ready: oneshot::Sender<()>,
}

impl Launch {
    pub(crate) fn spawn<T: Transport>(self, transport: T) -> JoinHandle<()> {
        tokio::spawn(Engine::new(transport, self.rt, self.shutdown, self.ready).run())
    }
}

/// A received record waiting for its handler call. Its message handle (into the [`Arrival`] it came with)
/// is made on receipt, so that dispatch moves a pointer and nothing moves the record; offset and lane are
/// kept beside it, so that scanning the queue touches no record.
///
/// [`Arrival`]: crate::message::Arrival
struct Queued {
    offset: i64,
    /// Its ordering lane: [`lane_of`] its key on an ordered source, its own offset otherwise.
    lane: u64,
    msg: Message,
}

impl Queued {
    fn of(msg: Message, caps: Capabilities) -> Self {
        let offset = msg.offset();
        Queued {
            offset,
            lane: if caps.ordered {
                lane_of(&msg.record().key)
            } else {
                offset as u64
            },
            msg,
        }
    }
}

/// One assigned source (a partition; a consumed queue).
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
    /// `AckFirst`: the handler's pace, which sizes the runs committed ahead.
    pace: pace::Pace,
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
            pace: pace::Pace::new(Instant::now()),
        }
    }
}

pub(crate) struct Engine<T: Transport> {
    transport: T,
    caps: Capabilities,
    rt: Arc<SubscriberRuntime>,
    parts: FxHashMap<TopicPartition, Partition>,
    /// The assigned partitions, in assignment order (dispatch walks them without allocating).
    order: Vec<TopicPartition>,
    /// Where in `order` the next dispatch round starts.
    first_partition: usize,
    /// Handler calls that did not finish on their first poll.
    running: FuturesUnordered<Call>,
    next_generation: u64,
    /// Settles made by code through message handles.
    settles_tx: mpsc::UnboundedSender<SettleEvent>,
    settles_rx: mpsc::UnboundedReceiver<SettleEvent>,
    /// Ends of dead-letter and retry-topic publishes.
    forwards_tx: mpsc::UnboundedSender<Forwarded>,
    forwards_rx: mpsc::UnboundedReceiver<Forwarded>,
    shutdown: watch::Receiver<bool>,
    /// Tells the app the first assignment (or failure) happened.
    ready: Option<oneshot::Sender<()>>,
    /// Batch mode: since when records have been ready without a batch starting.
    batch_since: Option<Instant>,
}

enum Step<R> {
    Settle(SettleEvent),
    Forwarded(Forwarded),
    Completed(Completion),
    Transport(Option<TransportEvent<R>>),
    Tick,
    /// Dispatch stopped at its budget: come back to it once the other inputs had their turn.
    Continue,
    Shutdown,
}

impl<T: Transport> Engine<T> {
    pub(crate) fn new(
        transport: T,
        rt: Arc<SubscriberRuntime>,
        shutdown: watch::Receiver<bool>,
        ready: oneshot::Sender<()>,
    ) -> Self {
        panics::install_hook();
        let (settles_tx, settles_rx) = mpsc::unbounded_channel();
        let (forwards_tx, forwards_rx) = mpsc::unbounded_channel();
        Engine {
            caps: transport.capabilities(),
            transport,
            rt,
            parts: FxHashMap::default(),
            order: Vec::new(),
            first_partition: 0,
            running: FuturesUnordered::new(),
            next_generation: 0,
            settles_tx,
            settles_rx,
            forwards_tx,
            forwards_rx,
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
            events: self.settles_tx.clone(),
            generation,
            subscriber: self.rt.cfg.name.clone(),
            from_log: self.caps.ordered,
        })
    }

    /// The largest `AckFirst` run: `ACK_FIRST_RUN` records, or fewer when `max_buffered` cannot hold two
    /// runs (the queue holds the run being handled and the next one, whose commit is in flight meanwhile).
    fn ack_first_cap(&self) -> usize {
        ACK_FIRST_RUN.min(self.rt.cfg.max_buffered / 2)
    }

    /// `commit_sync_each`: nothing starts while the previous settle has not reached the broker.
    fn sync_settle_pending(&self) -> bool {
        self.rt.cfg.commit_sync_each && self.transport.pending() != Pending::None
    }

    pub(crate) async fn run(mut self) {
        let name = self.rt.cfg.name.clone();
        loop {
            let more = self.dispatch_all();
            self.transport.flush();
            match self.next_step(more).await {
                Step::Settle(ev) => self.on_settled(ev),
                Step::Forwarded(f) => self.on_forwarded(f),
                Step::Completed(c) => self.on_completed(c),
                Step::Transport(Some(ev)) => self.on_transport_event(ev).await,
                Step::Transport(None) => {
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

    /// The next instant something becomes due: a delayed nack's hold expiring, the transport's settle
    /// cadence, or a batch's timeout. Expired holds are cleared on the tick, so an expired instant is
    /// never returned twice (no busy loop).
    fn next_timer(&self) -> Option<Instant> {
        let holds = self.parts.values().filter_map(|p| p.hold_until);
        // A batch can only start when none is running and no synchronous commit is pending; while one of
        // those lasts, its completion (an engine event or the commit) wakes the loop instead.
        let batch_blocked = self.parts.values().any(|p| !p.in_flight.is_empty()) || self.sync_settle_pending();
        let batch = match (self.rt.cfg.batch, self.batch_since) {
            (Some(b), Some(since)) if !batch_blocked => Some(since + b.timeout),
            _ => None,
        };
        holds.chain(self.transport.due()).chain(batch).min()
    }

    /// Waits for the next input. `intake`: whether the transport may deliver records now; settles in
    /// flight make progress either way.
    async fn next_input(&mut self, timer: Option<Instant>, intake: bool, shutdown: bool) -> Step<T::Release> {
        let settles = &mut self.settles_rx;
        let forwards = &mut self.forwards_rx;
        let running = &mut self.running;
        let stop = &mut self.shutdown;
        let transport = &mut self.transport;
        tokio::select! {
            biased;
            ev = settles.recv() => match ev {
                Some(ev) => Step::Settle(ev),
                // Unreachable: the engine holds a sender.
                None => Step::Shutdown,
            },
            Some(f) = forwards.recv() => Step::Forwarded(f),
            Some(c) = running.next(), if !running.is_empty() => Step::Completed(c),
            _ = stop.wait_for(|stop| *stop), if shutdown => Step::Shutdown,
            _ = async { tokio::time::sleep_until(timer.expect("guarded")).await }, if timer.is_some() => Step::Tick,
            ev = transport.next(intake) => Step::Transport(ev),
        }
    }

    async fn next_step(&mut self, more: bool) -> Step<T::Release> {
        // A partition that is not paused yet holds `max_buffered` records (under `AckFirst`: records waiting
        // for their commit): take no more until it drains, so memory stays bounded without a pause.
        let max = self.rt.cfg.max_buffered;
        let full = self.parts.values().any(|p| !p.paused && p.queue.len() >= max);
        if more {
            // What is queued and dispatchable goes before new records (and is not counted as piling up
            // behind a busy handler when the next records arrive); every other input is looked at first.
            let timer = self.next_timer();
            return tokio::select! {
                biased;
                step = self.next_input(timer, false, true) => step,
                _ = std::future::ready(()) => Step::Continue,
            };
        }
        let timer = self.next_timer();
        self.next_input(timer, !full, true).await
    }
}
