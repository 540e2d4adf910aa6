//! Settling: a call's verdict and code's settles taking effect on offsets, redelivery of nacks.

use std::time::Duration;

use super::*;
use crate::hooks::HookEvent;
use crate::message::{Arrival, Record};
use forward::Forward;
use intake::admit;
use verdict::Verdict;

/// The least time between a nack and the redelivery of its message.
const REDELIVERY_FLOOR: Duration = Duration::from_millis(10);
/// Without a delay of its own, a nacked message waits the floor doubled per delivery so far, up to this.
const REDELIVERY_CAP: Duration = Duration::from_secs(30);

/// How long a message nacked without a delay of its own waits, after `deliveries` deliveries (guarantee
/// 2.7): 10 ms, 20 ms, 40 ms... up to 30 s. A nack with a delay (a retry policy's backoff, `nack_after`)
/// waits that delay, at least the floor.
fn redelivery_delay(requested: Option<Duration>, deliveries: u32) -> Duration {
    match requested {
        Some(d) => d.max(REDELIVERY_FLOOR),
        None => REDELIVERY_FLOOR
            .saturating_mul(1 << deliveries.saturating_sub(1).min(16))
            .min(REDELIVERY_CAP),
    }
}
/// Wait before a message whose dead-letter publish failed comes back.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);

impl<T: Transport> Engine<T> {
    /// A handler call ended. Settles made by code (of its messages or of others it holds) are applied
    /// first, then the policy's settle for its outcome, then its in-flight slots are freed.
    pub(super) fn on_completed(&mut self, done: Completion) {
        // Code may have settled any message it holds a handle of, not only this call's: every settle waiting
        // in the channel is applied before this call's slots are freed. Under `AckFirst` code settles
        // nothing (every message is settled on receipt), so nothing can be waiting.
        if self.policy() != AckPolicy::AckFirst {
            while let Ok(ev) = self.settles_rx.try_recv() {
                self.on_settled(ev);
            }
        }
        let (messages, result) = match &done {
            Completion::One(m, r, _) => (std::slice::from_ref(m), r),
            Completion::Batch(v, r, _) => (&v[..], r),
        };
        self.rt.counters.process.observe(done.timing().took);
        let verdict = Verdict::of(&self.rt, messages, result);
        for msg in messages {
            self.rt.counters.handled(verdict.label);
            self.rt.hooks.emit(|| HookEvent::Handled {
                subscriber: &self.rt.cfg.name,
                message: msg,
                outcome: &verdict.outcome,
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
            Completion::One(m, _, _) => {
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
            Completion::Batch(v, _, _) => {
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
    pub(super) fn on_settled(&mut self, ev: SettleEvent) {
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
    pub(super) fn apply_settle(
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
        let dead_letters = settle == Settle::Reject && record.is_some() && self.rt.cfg.dead_letter.is_some();
        // A reject that goes to the dead-letter topic is reported settled once that publish is confirmed
        // (until then it may still come back): an observer's settled message is finished for good.
        if !dead_letters {
            self.rt.hooks.emit(|| HookEvent::Settled {
                subscriber: &self.rt.cfg.name,
                tp,
                offset,
                settle,
                by,
            });
        }
        if self.parts.get(tp).is_none_or(|p| p.generation != generation) {
            tracing::debug!(subscriber = %self.rt.cfg.name, %tp, offset, "settle of a revoked assignment ignored");
            return;
        }
        let non_blocking = self.rt.cfg.retry_topic.is_some() && by == SettledBy::Policy;
        match (settle, record, &self.rt.cfg.dead_letter) {
            (Settle::Reject, Some(record), Some(_)) => {
                self.forward(generation, *record, reason, Forward::DeadLetter { by })
            }
            (Settle::Ack | Settle::Reject, _, _) => self.transport.settle(tp, offset, settle),
            (Settle::Nack { delay }, Some(record), _) if non_blocking => {
                let delay = delay.unwrap_or_default();
                self.forward(generation, *record, reason, Forward::Retry { delay })
            }
            (Settle::Nack { delay }, Some(record), _) => self.redeliver(*record, delay),
            (Settle::Nack { .. }, None, _) => {}
        }
    }

    /// A dead-letter or retry-topic publish ended: on success the message is settled (acked: it now lives
    /// on in the other topic); on failure it stays unsettled and comes back.
    pub(super) fn on_forwarded(&mut self, f: Forwarded) {
        let Forwarded {
            tp,
            generation,
            offset,
            record,
            to,
            result,
        } = f;
        let Some(part) = self.parts.get_mut(&tp).filter(|p| p.generation == generation) else {
            return; // revoked meanwhile: the offset stayed uncommitted, the next owner retries
        };
        part.dead_lettering.remove(&offset);
        part.retrying.remove(&offset);
        match result {
            Ok(()) => {
                let subscriber = &self.rt.cfg.name;
                match to {
                    Forward::DeadLetter { .. } => self.rt.counters.dead_lettered(),
                    Forward::Retry { .. } => self.rt.counters.retry_scheduled(),
                }
                if let Forward::DeadLetter { by } = to {
                    self.rt.hooks.emit(|| HookEvent::Settled {
                        subscriber,
                        tp: &tp,
                        offset,
                        settle: Settle::Reject,
                        by,
                    });
                }
                self.rt.hooks.emit(|| match to {
                    Forward::DeadLetter { .. } => HookEvent::DeadLettered {
                        subscriber,
                        tp: &tp,
                        offset,
                    },
                    Forward::Retry { delay } => HookEvent::RetryScheduled {
                        subscriber,
                        tp: &tp,
                        offset,
                        delay,
                    },
                });
                self.transport.settle(&tp, offset, Settle::Ack);
            }
            Err(e) => {
                tracing::error!(subscriber = %self.rt.cfg.name, %tp, offset, error = %e,
                    "dead-letter or retry publish failed; the message stays unsettled and comes back");
                self.redeliver(*record, Some(DEAD_LETTER_RETRY));
            }
        }
    }

    /// A nacked record comes back no earlier than `delay`, and never sooner than a floor that grows with
    /// its deliveries ([`redelivery_delay`]): no configuration can make a failing message loop hot. Where the broker redelivers, the
    /// transport nacks it. Otherwise (SPEC 3.2) nothing at or after the nacked offset is committed until
    /// it is settled (the tracker keeps it unsettled), and it is delivered again from the queue, before
    /// the later records of its lane.
    pub(super) fn redeliver(&mut self, mut record: Record, delay: Option<Duration>) {
        let delay = redelivery_delay(delay, record.prior_attempts.saturating_add(record.attempts));
        if self.caps.redelivers {
            self.transport.nack(record, delay);
            return;
        }
        let caps = self.caps;
        self.transport.attempted(
            &record.tp,
            record.offset,
            record.prior_attempts.saturating_add(record.attempts),
        );
        let Some(part) = self.parts.get_mut(&record.tp) else {
            return;
        };
        let at = part.queue.partition_point(|q| q.offset < record.offset);
        if part.queue.get(at).is_none_or(|q| q.offset != record.offset) {
            let slot = admit(&self.rt, &part.sink, &mut record, 0);
            part.queue.insert(at, Queued::of(Arrival::single(record, slot), caps));
        }
        let until = Instant::now() + delay;
        part.hold_until = Some(part.hold_until.map_or(until, |h| h.max(until)));
    }

    pub(super) fn on_tick(&mut self) {
        let now = Instant::now();
        for part in self.parts.values_mut() {
            if part.hold_until.is_some_and(|h| h <= now) {
                part.hold_until = None;
            }
        }
        // A due commit is started by the transport's `flush` right after this.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_delay_of_its_own_a_redelivery_backs_off_exponentially_to_a_cap() {
        let ms = |n| redelivery_delay(None, n).as_millis();
        assert_eq!([ms(1), ms(2), ms(3), ms(4)], [10, 20, 40, 80]);
        assert_eq!(ms(10), 5_120);
        assert_eq!(ms(12), 20_480);
        assert_eq!(ms(13), 30_000);
        assert_eq!(ms(u32::MAX), 30_000);
        assert_eq!(redelivery_delay(Some(Duration::from_millis(1)), 9), REDELIVERY_FLOOR);
        assert_eq!(
            redelivery_delay(Some(Duration::from_secs(30)), 1),
            Duration::from_secs(30)
        );
    }
}
