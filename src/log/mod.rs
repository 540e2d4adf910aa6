//! What log brokers share (Kafka and the in-memory broker): settles become offsets, and offsets become
//! watermark commits on a cadence.
//!
//! A log broker's consumer implements the small [`LogConsumer`] contract (records, partition
//! assignments, pause/resume, commits); [`LogTransport`] wraps it into the engine's
//! [`Transport`](crate::transport::Transport). It owns the [`offset`] tracker (the SPEC 3.1 invariant and
//! its property test live there) and the commit cadence ([`commits`]): at most one commit in flight, so
//! commits land in order; a settle of a later offset never commits past an unsettled earlier one;
//! `AckFirst` receipt settles are committed at once and the engine dispatches only what the broker
//! confirmed; revoked partitions and the subscriber's end get a final, synchronous commit.
//!
//! A log cannot take one record back without rewinding everything after it, so this transport does not
//! redeliver: the engine keeps a nacked record and delivers it again in process (SPEC 3.2).

use std::future::Future;
use std::time::Duration;

use futures::future::BoxFuture;
use std::sync::Arc;
use tokio::time::Instant;

use crate::config::ResolvedSubscriber;
use crate::error::BrokerError;
use crate::hooks::{HookEvent, Hooks};
use crate::message::Record;
use crate::metrics::Counters;
use crate::settle::Settle;
use crate::transport::{Capabilities, Pending, Transport, TransportEvent};

mod commits;
pub mod offset;

use commits::Cadence;
use offset::{Delivery, OffsetTracker, TopicPartition};

/// The largest record a log broker takes by default: librdkafka's producer `message.max.bytes` (payload,
/// key and headers together, near enough).
pub(crate) const MAX_MESSAGE_BYTES: usize = 1_000_000;

/// Kafka's rules for a topic name (the in-memory broker keeps them too, so a test that passes on it does
/// not fail on Kafka for a name): 1 to 249 characters of ASCII letters, digits, `.`, `_` and `-`, and not
/// `.` or `..`.
pub(crate) fn check_topic_name(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("a topic name cannot be empty".to_owned());
    }
    if topic.len() > 249 {
        return Err(format!(
            "a topic name has at most 249 characters; this one has {}",
            topic.len()
        ));
    }
    if topic == "." || topic == ".." {
        return Err("`.` and `..` are not topic names".to_owned());
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{c:?} is not allowed in a topic name: use ASCII letters, digits, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

/// The size a log broker counts for a record: payload, key and headers.
pub(crate) fn record_size(out: &crate::transport::Outgoing) -> usize {
    let headers: usize = out.headers.iter().map(|(n, v)| n.len() + v.len()).sum();
    out.payload.len() + out.key.as_ref().map_or(0, |k| k.len()) + headers
}

/// Offsets to commit: the next offset to consume, per partition (Kafka's convention).
pub(crate) type Commits = Vec<(TopicPartition, i64)>;

/// Called once when the engine has drained revoked partitions, with the offsets to commit before the
/// partitions are released.
pub(crate) type RevokeReply = Box<dyn FnOnce(Commits) + Send>;

/// What a log consumer tells its [`LogTransport`].
pub(crate) enum LogEvent {
    /// Records, in offset order per partition.
    Records(Vec<Record>),
    /// Partitions now owned, positioned at the committed offset (or the reset policy).
    Assigned(Vec<TopicPartition>),
    /// Sent before `Assigned` by a consumer that keeps attempt counts in its commits: for each newly
    /// assigned partition whose committed offset is a record that had failed, that offset and its failed
    /// attempts so far.
    PriorAttempts(Vec<(TopicPartition, i64, u32)>),
    /// Partitions being taken away. Nothing more arrives for them; `reply` gets the final offsets, which
    /// the consumer commits before it releases the partitions.
    Revoked {
        partitions: Vec<TopicPartition>,
        reply: RevokeReply,
    },
}

/// One consumer-group member of a log broker.
pub(crate) trait LogConsumer: Send + 'static {
    /// The next event. Must be cancel-safe. `None` means the consumer has failed for good or was closed.
    fn next(&mut self) -> impl Future<Output = Option<LogEvent>> + Send;

    /// Stops fetching a partition (records already fetched may still arrive).
    fn pause(&mut self, tp: &TopicPartition);

    /// Fetches a paused partition again.
    fn resume(&mut self, tp: &TopicPartition);

    /// Commits offsets; the future resolves when the broker has acknowledged them. At most one commit is
    /// in flight per consumer, so commits land in order.
    fn commit(&mut self, commits: Commits) -> BoxFuture<'static, Result<(), BrokerError>>;

    /// The record at `offset` of `tp` failed `attempts` calls so far: a consumer that can, commits this with
    /// that offset (Kafka: the commit's metadata) and reports it back as [`LogEvent::PriorAttempts`] when
    /// the partition is assigned again.
    fn note_attempts(&mut self, _tp: &TopicPartition, _offset: i64, _attempts: u32) {}

    /// Commits `final_commits` synchronously, then leaves the group and releases every resource.
    fn close(self, final_commits: Commits) -> impl Future<Output = Result<(), BrokerError>> + Send;
}

/// A [`LogConsumer`] with the offset tracker and the commit cadence: the engine's transport on a log.
pub(crate) struct LogTransport<C> {
    consumer: C,
    tracker: OffsetTracker,
    cadence: Cadence,
    /// Without a consumer group nothing is committed (and nothing waits for a commit).
    commits_enabled: bool,
    subscriber: Arc<str>,
    hooks: Hooks,
    counters: Arc<Counters>,
    /// Partitions whose front offset is unsettled while later ones were settled: since when, and whether
    /// that was said. Empty while settles come in order (the usual case costs one `is_empty`).
    stalls: rustc_hash::FxHashMap<TopicPartition, Stall>,
    stall_warning: Duration,
    /// When the positions the metrics show were last refreshed.
    positions_shown: Instant,
    /// Failed attempts the broker kept for records not yet fetched again: given to them on arrival.
    prior_attempts: rustc_hash::FxHashMap<TopicPartition, (i64, u32)>,
}

/// How often the positions the metrics show (consumer lag) are refreshed while records come in.
const POSITIONS_EVERY: Duration = Duration::from_secs(1);

/// An unsettled offset holding a partition's commit back.
struct Stall {
    offset: i64,
    since: Instant,
    warned: bool,
}

impl<C: LogConsumer> LogTransport<C> {
    pub(crate) fn new(consumer: C, cfg: &ResolvedSubscriber, hooks: Hooks, counters: Arc<Counters>) -> Self {
        LogTransport {
            consumer,
            tracker: OffsetTracker::default(),
            cadence: Cadence::new(cfg),
            commits_enabled: cfg.group_id.is_some(),
            subscriber: cfg.name.clone(),
            hooks,
            counters,
            stalls: rustc_hash::FxHashMap::default(),
            stall_warning: cfg.stall_warning,
            positions_shown: Instant::now(),
            prior_attempts: rustc_hash::FxHashMap::default(),
        }
    }

    /// Shows the tracker's positions and confirmed commits to the metrics (consumer lag).
    fn show_positions(&mut self) {
        self.positions_shown = Instant::now();
        let positions = self
            .tracker
            .positions()
            .map(|(tp, position, committed)| {
                (
                    tp.clone(),
                    crate::metrics::PartitionPosition {
                        committed,
                        position,
                        end: None,
                    },
                )
            })
            .collect();
        self.counters.set_positions(positions);
    }

    /// A settle behind an unsettled `front` offset: says so once when `front` has held the partition's
    /// commit back for longer than the warning threshold.
    fn note_stall(&mut self, tp: &TopicPartition, front: i64) {
        let now = Instant::now();
        let stall = match self.stalls.get_mut(tp) {
            Some(s) if s.offset == front => s,
            _ => {
                self.stalls.insert(
                    tp.clone(),
                    Stall {
                        offset: front,
                        since: now,
                        warned: false,
                    },
                );
                return;
            }
        };
        let stalled_for = now - stall.since;
        if stall.warned || stalled_for < self.stall_warning {
            return;
        }
        stall.warned = true;
        tracing::warn!(subscriber = %self.subscriber, topic = %tp.topic, partition = tp.partition, offset = front,
            stalled_for = ?stalled_for,
            "the partition's committed offset has not moved: this offset is unsettled while later messages were \
             settled (a Manual handler that never settles it, or a handle kept by user code?)");
        let subscriber = &self.subscriber;
        self.hooks.emit(|| HookEvent::Stalled {
            subscriber,
            tp,
            offset: front,
            stalled_for,
        });
    }

    /// The offsets to commit last for `tps`: their watermarks, held back at each `holdback` offset, and
    /// only where they move past what the broker confirmed.
    fn final_commits<'a>(
        &self,
        tps: impl IntoIterator<Item = &'a TopicPartition>,
        holdback: &[(TopicPartition, i64)],
    ) -> Commits {
        let mut commits = self.tracker.watermarks(tps);
        for (tp, offset) in &mut commits {
            if let Some((_, h)) = holdback.iter().find(|(t, _)| t == tp) {
                *offset = (*offset).min(*h);
            }
        }
        commits.retain(|(tp, o)| self.tracker.confirmed(tp).is_none_or(|c| *o > c));
        commits
    }

    /// What to commit last for `tps` (nothing without a group), once the commit in flight has landed.
    async fn last_commits(&mut self, tps: &[TopicPartition], holdback: &[(TopicPartition, i64)]) -> Commits {
        if let Some(c) = self
            .cadence
            .finish_in_flight(&mut self.tracker, &self.subscriber, &self.counters, &self.hooks)
            .await
        {
            self.observe_commits(&c);
        }
        if !self.commits_enabled {
            return Vec::new();
        }
        let commits = self.final_commits(tps, holdback);
        self.observe_commits(&commits);
        commits
    }

    fn observe_commits(&self, commits: &Commits) {
        for (tp, offset) in commits {
            self.hooks.emit(|| HookEvent::Committed {
                subscriber: &self.subscriber,
                tp,
                offset: *offset,
            });
        }
    }
}

impl<C: LogConsumer> LogTransport<C> {
    /// One step of [`Transport::next`]: `None` for an event the engine need not see (kept here), else the
    /// engine's event. Cancel-safe, as `next` must be.
    async fn next_event(&mut self, intake: bool) -> Option<Option<TransportEvent<RevokeReply>>> {
        enum Step {
            Committed(Result<(), BrokerError>),
            Consumer(Option<LogEvent>),
        }
        let in_flight = self.cadence.in_flight();
        let consumer = &mut self.consumer;
        let step = tokio::select! {
            biased;
            // (A disabled branch's expression is still evaluated: hence the async block.)
            r = async { in_flight.expect("guarded").await }, if in_flight.is_some() => Step::Committed(r),
            ev = consumer.next(), if intake => Step::Consumer(ev),
            else => std::future::pending().await,
        };
        Some(match step {
            Step::Committed(r) => {
                if let Some(commits) =
                    self.cadence
                        .done(&mut self.tracker, r, &self.subscriber, &self.counters, &self.hooks)
                {
                    self.observe_commits(&commits);
                }
                self.show_positions();
                Some(TransportEvent::Settled)
            }
            Step::Consumer(None) => None,
            Step::Consumer(Some(LogEvent::Records(mut records))) => {
                if !self.prior_attempts.is_empty() {
                    self.give_prior_attempts(&mut records);
                }
                Some(TransportEvent::Records(records))
            }
            Step::Consumer(Some(LogEvent::PriorAttempts(prior))) => {
                for (tp, offset, attempts) in prior {
                    self.prior_attempts.insert(tp, (offset, attempts));
                }
                return None;
            }
            Step::Consumer(Some(LogEvent::Assigned(tps))) => {
                for tp in &tps {
                    self.tracker.assign(tp.clone());
                    // librdkafka keeps an application pause across unassign/assign: a partition paused by
                    // flow control before a rebalance would otherwise never fetch again.
                    self.consumer.resume(tp);
                }
                self.show_positions();
                Some(TransportEvent::Assigned(tps))
            }
            Step::Consumer(Some(LogEvent::Revoked { partitions, reply })) => {
                for tp in &partitions {
                    self.prior_attempts.remove(tp);
                }
                Some(TransportEvent::Revoked {
                    sources: partitions,
                    release: reply,
                })
            }
        })
    }

    /// The failed attempts the broker kept for a record go to it when it arrives again; a partition whose
    /// records arrive past that offset has nothing more to give.
    fn give_prior_attempts(&mut self, records: &mut [Record]) {
        for r in records {
            let Some(&(offset, attempts)) = self.prior_attempts.get(&r.tp) else {
                continue;
            };
            if r.offset == offset {
                r.prior_attempts = r.prior_attempts.max(attempts);
            }
            if r.offset >= offset {
                self.prior_attempts.remove(&r.tp);
            }
        }
    }
}

impl<C: LogConsumer> Transport for LogTransport<C> {
    type Release = RevokeReply;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            redelivers: false,
            ordered: true,
        }
    }

    async fn next(&mut self, intake: bool) -> Option<TransportEvent<RevokeReply>> {
        loop {
            if let Some(event) = self.next_event(intake).await {
                return event;
            }
        }
    }

    fn receive(&mut self, source: &TopicPartition, seqs: impl Iterator<Item = i64>, mut each: impl FnMut(Delivery)) {
        match self.tracker.partition(source) {
            Some(offsets) => seqs.for_each(|o| each(offsets.deliver(o))),
            None => seqs.for_each(|_| each(Delivery::Stale)), // not ours (revoked meanwhile)
        }
        if self.positions_shown.elapsed() >= POSITIONS_EVERY {
            self.show_positions();
        }
    }

    fn settle(&mut self, source: &TopicPartition, seq: i64, settle: Settle) {
        if !settle.completes() {
            return; // the engine redelivers it; its offset stays unsettled
        }
        if let Some(p) = self.tracker.partition(source) {
            if p.settle(seq) {
                if !self.stalls.is_empty() {
                    self.stalls.remove(source);
                }
            } else if let Some(front) = p.watermark().filter(|&front| front < seq) {
                self.note_stall(source, front);
            }
        }
        if self.commits_enabled {
            self.cadence.note(1, false);
        }
    }

    fn nack(&mut self, _: Record, _: Duration) {
        // Not called: a log does not redeliver (see `capabilities`); the engine keeps the record.
    }

    fn attempted(&mut self, source: &TopicPartition, seq: i64, attempts: u32) {
        if !self.commits_enabled || self.tracker.partition(source).is_none() {
            return;
        }
        // Committed with the record's offset at the next commit (within the interval), even where the
        // offset did not move: a process killed during the record's retries resumes its count.
        self.consumer.note_attempts(source, seq, attempts);
        self.tracker.request_again(source);
        self.cadence.note(0, false);
    }

    fn settle_on_receipt(&mut self, source: &TopicPartition, seqs: impl Iterator<Item = i64>) {
        let Some(offsets) = self.tracker.partition(source) else {
            return;
        };
        let mut n = 0;
        for o in seqs {
            offsets.settle(o);
            n += 1;
        }
        if n > 0 && self.commits_enabled {
            self.cadence.note(n, true);
        }
    }

    fn confirmed(&self, source: &TopicPartition) -> Option<i64> {
        if self.commits_enabled {
            self.tracker.confirmed(source)
        } else {
            Some(i64::MAX) // nothing is committed, so nothing waits for a commit
        }
    }

    fn pending(&self) -> Pending {
        self.cadence.pending()
    }

    fn due(&self) -> Option<Instant> {
        self.cadence.due()
    }

    fn flush(&mut self) {
        if self.commits_enabled {
            self.cadence.start(&mut self.tracker, &mut self.consumer);
        }
    }

    fn flow(&mut self, source: &TopicPartition, open: bool) {
        if open {
            self.consumer.resume(source);
        } else {
            self.consumer.pause(source);
        }
    }

    async fn release(&mut self, sources: &[TopicPartition], holdback: &[(TopicPartition, i64)], reply: RevokeReply) {
        let commits = self.last_commits(sources, holdback).await;
        for tp in sources {
            self.tracker.revoke(tp);
        }
        self.show_positions();
        tracing::info!(subscriber = %self.subscriber, partitions = %offset::Shown(sources), final_commits = %offset::Shown(&commits[..]), "partitions revoked");
        reply(commits);
    }

    async fn close(mut self, holdback: Vec<(TopicPartition, i64)>) -> Result<(), BrokerError> {
        let commits = self.last_commits(&self.tracker.partitions(), &holdback).await;
        self.consumer.close(commits).await
    }
}
