//! Intake: assignments, revocations and records from the transport, admitted into partition queues.

use super::*;
use crate::hooks::HookEvent;
use crate::message::{Arrival, Record, Slot};
use crate::offset::Delivery;
use crate::retry::headers;

impl<T: Transport> Engine<T> {
    pub(super) async fn on_transport_event(&mut self, ev: TransportEvent<T::Release>) {
        match ev {
            TransportEvent::Records(records) => self.on_records(records),
            TransportEvent::Settled => {} // what waited for it is dispatched by the loop
            TransportEvent::Assigned(tps) => {
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
                }
                tracing::info!(subscriber = %self.rt.cfg.name, partitions = %crate::offset::Shown(&tps[..]), "partitions assigned");
                self.rt.counters.rebalanced(true);
                self.rt.hooks.emit(|| HookEvent::Assigned {
                    subscriber: &self.rt.cfg.name,
                    sources: &tps,
                });
                if let Some(ready) = self.ready.take() {
                    let _ = ready.send(());
                }
            }
            TransportEvent::Revoked { sources, release } => {
                self.drain(&sources, self.rt.cfg.drain_timeout).await;
                let holdback = self.holdback(&sources);
                self.transport.release(&sources, &holdback, release).await;
                for tp in &sources {
                    self.parts.remove(tp);
                }
                self.order.retain(|tp| self.parts.contains_key(tp));
                self.rt.counters.rebalanced(false);
                self.rt.hooks.emit(|| HookEvent::Revoked {
                    subscriber: &self.rt.cfg.name,
                    sources: &sources,
                });
            }
        }
    }

    pub(super) fn on_records(&mut self, mut records: Vec<Record>) {
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
    pub(super) fn on_run(&mut self, mut run: Vec<Record>) {
        let Some(tp) = run.first().map(|r| r.tp.clone()) else {
            return;
        };
        let Some(part) = self.parts.get_mut(&tp) else {
            return; // not ours (revoked meanwhile)
        };
        let mut deliveries = Vec::with_capacity(run.len());
        self.transport
            .receive(&tp, run.iter().map(|r| r.offset), |d| deliveries.push(d));
        let mut slots = Vec::with_capacity(run.len());
        for ((i, rec), delivery) in run.iter_mut().enumerate().zip(deliveries) {
            match delivery {
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
            let caps = self.caps;
            part.queue
                .extend(Arrival::new(run, slots).messages().map(|m| Queued::of(m, caps)));
        }
        if !part.paused {
            self.flow_control(&tp);
        } else {
            self.rt.counters.buffered(part.queue.len());
        }
    }

    /// `AckFirst` (SPEC 3.4): settles (and asks to commit) the queue in runs, at most two runs ahead of
    /// dispatch: the run being handled and the next one, whose commit is in flight meanwhile. A run is what
    /// the handler gets through in half a commit interval ([`pace`](super::pace)), so a crash loses about
    /// a commit interval of the handler's work (plus what is in flight), never more, and nothing is
    /// dispatched before its commit is confirmed.
    pub(super) fn ack_first_advance(&mut self, tp: &TopicPartition, now: Instant) {
        if self.policy() != AckPolicy::AckFirst {
            return;
        }
        let cap = self.ack_first_cap();
        let window = self.rt.cfg.commit_interval / 2;
        let Some(part) = self.parts.get_mut(tp) else { return };
        if part.ack_first_ahead > part.pace.current(cap) {
            // Two runs are ahead already (the common case: checked without reading the pace).
            return;
        }
        let run = part.pace.run(now, window, cap);
        while part.ack_first_ahead <= run && part.ack_first_ahead < part.queue.len() {
            let start = part.ack_first_ahead;
            let end = part.queue.len().min(start + run);
            for q in part.queue.range(start..end) {
                self.rt.counters.settled(Settle::Ack);
                self.rt.hooks.emit(|| HookEvent::Settled {
                    subscriber: &self.rt.cfg.name,
                    tp,
                    offset: q.offset,
                    settle: Settle::Ack,
                    by: SettledBy::Receipt,
                });
            }
            self.transport
                .settle_on_receipt(tp, part.queue.range(start..end).map(|q| q.offset));
            part.ack_first_ahead = end;
        }
    }
}

/// The attempts a record from the retry topic has already had.
pub(super) fn header_attempts(record: &Record) -> u32 {
    record
        .headers
        .get_str(headers::ATTEMPTS)
        .and_then(|a| a.parse().ok())
        .unwrap_or(0)
}

/// Admits `rec`, the `index`-th record of its arrival, for a handler: counts the attempt (continuing the
/// retry topic's count for records read from it) and wires its handle's settles back to this engine.
pub(super) fn admit(rt: &SubscriberRuntime, sink: &Arc<SettleSink>, rec: &mut Record, index: usize) -> Slot {
    let pre = (rt.cfg.policy == AckPolicy::AckFirst).then_some(Settle::Ack);
    let base = if rt.cfg.retry_consumer {
        header_attempts(rec)
    } else {
        rec.prior_attempts
    };
    rec.attempts += 1;
    Slot::new(index, base + rec.attempts, sink.clone(), pre)
}
