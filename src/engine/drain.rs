//! Drain and shutdown: revoked partitions and the subscriber's end (SPEC 3.7, 3.8).

use super::*;

/// How long a drain that ran out of time still waits for the commit in flight (well inside the poll
/// thread's wait for a revoke's reply, which is the drain timeout plus 5 s).
pub(super) const IN_FLIGHT_COMMIT_WAIT: Duration = Duration::from_secs(2);

impl<T: ConsumerTransport> Engine<T> {
    // ---- revoke and shutdown -----------------------------------------------------------------------

    /// Stops dispatching `tps`, waits for their in-flight handlers up to the drain timeout, and returns
    /// the final offsets to commit for them (SPEC 3.7).
    pub(super) async fn drain(&mut self, tps: &[TopicPartition], timeout: Duration) -> Commits {
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
    pub(super) async fn finish_commit_in_flight(&mut self) {
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

    pub(super) async fn shutdown(mut self) {
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
