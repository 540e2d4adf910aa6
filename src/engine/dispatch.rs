//! Dispatch: which queued records start a handler call now (in-flight limit, key lanes, holds, batches), and flow control.

use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::config::BatchConfig;
use crate::hooks::HookEvent;
use crate::message::Record;
use crate::retry::headers;
use call::Messages;

impl<T: Transport> Engine<T> {
    // ---- dispatch ----------------------------------------------------------------------------------

    /// Dispatches what every partition's rules allow. Returns true when the inline budget (calls or time)
    /// ran out with work left, so the loop comes back to it after looking at its other inputs (the commit
    /// cadence among them).
    pub(super) fn dispatch_all(&mut self) -> bool {
        if self.sync_settle_pending() {
            return false; // the previous settle is not committed yet
        }
        if let Some(batch) = self.rt.cfg.batch {
            self.dispatch_batch(batch);
            return false;
        }
        let now = Instant::now();
        let mut budget = Budget::new(INLINE_BUDGET);
        // Round robin: the round after one that ran out of budget starts with the partition after the one
        // that spent it, so a busy partition with a long queue does not keep the others waiting.
        let n = self.order.len();
        let first = self.first_partition;
        for k in 0..n {
            let i = (first + k) % n;
            let had_budget = !budget.spent();
            let tp = self.order[i].clone();
            self.dispatch_partition(&tp, now, &mut budget);
            if had_budget && budget.spent() {
                self.first_partition = (i + 1) % n;
            }
        }
        budget.spent()
    }

    /// Dispatches the records of one partition its rules allow. A handler call that finishes on its first
    /// poll is completed right here (no task, no channel), which frees its slot for the next record; one
    /// that waits joins `running`. Spends `budget`.
    pub(super) fn dispatch_partition(&mut self, tp: &TopicPartition, now: Instant, budget: &mut Budget) {
        self.ack_first_advance(tp, now);
        let max = self.rt.cfg.max_in_flight;
        let ack_first = self.policy() == AckPolicy::AckFirst;
        // Only a finished commit moves it, and none finishes during this loop.
        let confirmed = if ack_first { self.transport.confirmed(tp) } else { None };
        let ordered = self.caps.ordered;
        // The end of the last call that finished on its first poll: the next call's start.
        let mut clock: Option<quanta::Instant> = None;
        while !budget.spent() {
            if self.sync_settle_pending() {
                break; // the previous settle is not committed yet
            }
            let Some(part) = self.parts.get_mut(tp) else {
                return;
            };
            if part.in_flight.len() >= max || part.queue.is_empty() {
                break;
            }
            if part.hold_until.is_some_and(|h| h > now) || (ordered && !part.dead_lettering.is_empty()) {
                return; // retries are blocking: nothing passes a message being retried or dead-lettered
            }
            part.hold_until = None;
            // The retry topic's records wait until they are due (they are roughly in due order).
            if self.rt.cfg.retry_consumer
                && let Some(due) = part.queue.front().and_then(|q| header_due(q.msg.record()))
                && let Ok(wait) = due.duration_since(std::time::SystemTime::now())
            {
                part.hold_until = Some(now + wait);
                return;
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
            if ack_first {
                part.ack_first_ahead = part.ack_first_ahead.saturating_sub(1);
                part.pace.dispatched(1, now);
            }
            part.in_flight.push((offset, lane));
            let started = clock.take().unwrap_or_else(quanta::Instant::now);
            budget.spend(started);
            if let Some(done) = self.start(Call::new(&self.rt, Messages::One(msg), started)) {
                clock = Some(done.timing().ended);
                self.on_completed(done);
            }
        }
        // Calls that ended here may have used up what was committed ahead: the next runs' commit goes out
        // with this round's flush (nothing else would wake the engine for it).
        self.ack_first_advance(tp, now);
        let Some(part) = self.parts.get_mut(tp) else { return };
        // AckFirst's pace counts busy time only: nothing in flight and nothing dispatchable is idle, from
        // now (the calls of this round ended after the round's `now`).
        if ack_first
            && part.in_flight.is_empty()
            && part
                .queue
                .front()
                .is_none_or(|q| confirmed.is_none_or(|c| q.offset >= c))
        {
            part.pace.idle(Instant::now());
        }
        if part.paused {
            self.flow_control(tp);
        }
    }

    /// Polls a new handler call once, here. Most calls of a fast handler finish on that poll, and then
    /// cost no task, no wake-up and no message to the engine. The first poll uses a no-op waker: a call
    /// that is not finished goes to `running`, whose next poll registers the real one (a future must
    /// wake the waker of its latest poll, so nothing is lost).
    pub(super) fn start(&mut self, mut call: Call) -> Option<Completion> {
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
    /// Under `AckFirst` a queue whose handler waits for a commit counts only the records whose commit is
    /// confirmed: the others wait for their commit, not for a handler, and `next_step` bounds them by
    /// taking no more records while they fill the queue. (Pausing is not free: librdkafka drops what it
    /// prefetched for the partition and fetches it again on resume, so a pause must mean a handler that
    /// cannot keep up, not a commit round trip.) A queue whose handler is busy counts whole: that is a
    /// handler that cannot keep up, and without the pause its full queue would stop the intake of every
    /// other partition too.
    pub(super) fn flow_control(&mut self, tp: &TopicPartition) {
        let max = self.rt.cfg.max_buffered;
        let buffered = self.waiting(tp);
        let Some(part) = self.parts.get_mut(tp) else { return };
        self.rt.counters.buffered(part.queue.len());
        let paused = if !part.paused && buffered >= max {
            true
        } else if part.paused && buffered <= max / 4 {
            false
        } else {
            return;
        };
        self.transport.flow(tp, !paused);
        part.paused = paused;
        tracing::debug!(subscriber = %self.rt.cfg.name, %tp, buffered, paused, "flow control");
        self.rt.hooks.emit(|| HookEvent::FlowControl {
            subscriber: &self.rt.cfg.name,
            tp,
            paused,
            buffered,
        });
    }

    /// Records of a partition waiting for a handler slot (under `AckFirst`, see [`Self::flow_control`]).
    pub(super) fn waiting(&self, tp: &TopicPartition) -> usize {
        let Some(part) = self.parts.get(tp) else { return 0 };
        if self.policy() == AckPolicy::AckFirst
            && !part.paused
            && part.in_flight.len() < self.rt.cfg.max_in_flight.max(1)
        {
            let confirmed = self.transport.confirmed(tp);
            // A free handler takes what is confirmed right away; the rest waits for its commit.
            return part.queue.partition_point(|q| confirmed.is_some_and(|c| q.offset < c));
        }
        part.queue.len()
    }

    /// Batch mode (SPEC 3.10): one batch in flight at a time, so per-partition order holds; a batch
    /// starts when `max_records` are ready or the oldest ready record has waited `timeout`.
    pub(super) fn dispatch_batch(&mut self, batch: BatchConfig) {
        if self.parts.values().any(|p| !p.in_flight.is_empty()) {
            return;
        }
        let waiting: Vec<TopicPartition> = self
            .parts
            .iter()
            .filter(|(_, p)| !p.queue.is_empty())
            .map(|(tp, _)| tp.clone())
            .collect();
        let now = Instant::now();
        for tp in &waiting {
            self.ack_first_advance(tp, now);
        }
        let ack_first = self.policy() == AckPolicy::AckFirst;
        // How many records of each partition may go now: held partitions none; under AckFirst only
        // those whose commit is confirmed.
        let mut ready: Vec<(TopicPartition, usize)> = Vec::new();
        for (tp, part) in &mut self.parts {
            if part.hold_until.is_some_and(|h| h > now) || (self.caps.ordered && !part.dead_lettering.is_empty()) {
                continue;
            }
            let confirmed = self.transport.confirmed(tp);
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
            } else if ack_first {
                part.pace.idle(now); // no batch in flight and nothing of it may go
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
            if ack_first {
                part.ack_first_ahead = part.ack_first_ahead.saturating_sub(take);
                part.pace.dispatched(take, now);
            }
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
        if let Some(done) = self.start(Call::new(&self.rt, Messages::Batch(messages), quanta::Instant::now())) {
            self.on_completed(done);
        }
    }
}

/// When a record from the retry topic is due.
pub(super) fn header_due(record: &Record) -> Option<std::time::SystemTime> {
    let millis: u64 = record.headers.get_str(headers::RETRY_DUE)?.parse().ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_millis(millis))
}

/// The ordering lane of a key (SPEC 3.6): records of one lane never run at once and start in offset order.
/// A hash, so tracking a running record takes no reference on its key; two keys that share a hash share
/// a lane, which only orders more than needed, never less.
pub(super) fn lane_of(key: &Option<Bytes>) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = rustc_hash::FxHasher::default();
    key.as_deref().hash(&mut h);
    h.finish()
}

/// What one round of inline dispatch may still spend: handler calls ([`INLINE_BUDGET`]) and time
/// ([`INLINE_SLICE`], from the first call's start). The time is read off the calls' own start instants,
/// so it costs no clock read of its own; the call that starts past the slice is the round's last.
pub(super) struct Budget {
    calls: usize,
    until: Option<quanta::Instant>,
}

impl Budget {
    pub(super) fn new(calls: usize) -> Self {
        Budget { calls, until: None }
    }

    /// A call starts at `started`.
    pub(super) fn spend(&mut self, started: quanta::Instant) {
        let until = *self.until.get_or_insert_with(|| started + INLINE_SLICE);
        self.calls = if started >= until {
            0
        } else {
            self.calls.saturating_sub(1)
        };
    }

    pub(super) fn spent(&self) -> bool {
        self.calls == 0
    }
}
