//! Drain and shutdown: revoked partitions and the subscriber's end (SPEC 3.7, 3.8).

use std::time::Duration;

use super::*;

impl<T: Transport> Engine<T> {
    /// Stops dispatching `tps`, and waits for their in-flight handlers and for the settles in flight, up
    /// to the drain timeout (SPEC 3.7). The transport then makes the settles final.
    pub(super) async fn drain(&mut self, tps: &[TopicPartition], timeout: Duration) {
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
                            self.dispatch_partition(tp, now, &mut dispatch::Budget::new(INLINE_BUDGET));
                        }
                    }
                }
            }
            self.transport.flush();
            // Under AckFirst a queued record still to handle is one whose receipt settle the broker
            // confirmed; the others wait for a settle in flight (which the exit condition waits for), or,
            // with none in flight, are held back for the next owner or delivered again by the broker.
            let busy = tps.iter().any(|tp| {
                let confirmed = self.transport.confirmed(tp);
                self.parts.get(tp).is_some_and(|p| {
                    !p.in_flight.is_empty()
                        || !p.dead_lettering.is_empty()
                        || !p.retrying.is_empty()
                        || (ack_first && p.queue.front().is_some_and(|q| confirmed.is_some_and(|c| q.offset < c)))
                })
            });
            if !busy && self.transport.pending() != Pending::InFlight {
                break;
            }
            let timer = self.next_timer().map_or(deadline, |t| t.min(deadline));
            match self.next_input(Some(timer), false, false).await {
                Step::Settle(ev) => self.on_settled(ev),
                Step::Forwarded(f) => self.on_forwarded(f),
                Step::Completed(c) => self.on_completed(c),
                Step::Transport(Some(_)) => {} // settles reached the broker
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
    }

    /// `AckFirst`: records settled on receipt whose settle was never confirmed and that no handler saw
    /// are left to the next owner rather than made final now: the first such offset per source.
    pub(super) fn holdback(&self, tps: &[TopicPartition]) -> Vec<(TopicPartition, i64)> {
        if self.policy() != AckPolicy::AckFirst {
            return Vec::new();
        }
        tps.iter()
            .filter_map(|tp| {
                let confirmed = self.transport.confirmed(tp);
                let first = self
                    .parts
                    .get(tp)?
                    .queue
                    .iter()
                    .map(|q| q.offset)
                    .find(|o| confirmed.is_none_or(|c| *o >= c))?;
                Some((tp.clone(), first))
            })
            .collect()
    }

    pub(super) async fn shutdown(mut self) {
        let tps: Vec<TopicPartition> = self.parts.keys().cloned().collect();
        self.drain(&tps, self.rt.cfg.shutdown_timeout).await;
        let holdback = self.holdback(&tps);
        let name = self.rt.cfg.name.clone();
        if let Err(e) = self.transport.close(holdback).await {
            tracing::error!(subscriber = %name, error = %e, "final commit or close failed");
        }
        tracing::info!(subscriber = %name, "subscriber stopped");
    }
}
