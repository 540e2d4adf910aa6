//! The commit cadence (SPEC 3.5): settles are committed in batches, after `commit_interval` or
//! `commit_every` settles (at once for `AckFirst` receipt settles and `commit_sync_each`), with at most one
//! commit in flight, so commits land in order. A failed commit is asked again after a short wait.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;

use super::offset::{OffsetTracker, Stamped};
use super::{Commits, LogConsumer};
use crate::config::ResolvedSubscriber;
use crate::error::BrokerError;
use crate::hooks::{HookEvent, Hooks};
use crate::metrics::Counters;
use crate::transport::Pending;

/// Wait before retrying a failed commit.
const COMMIT_RETRY: Duration = Duration::from_millis(200);
/// How long a drain that ran out of time still waits for the commit in flight (well inside the poll
/// thread's wait for a revoke's reply, which is the drain timeout plus 5 s).
const IN_FLIGHT_COMMIT_WAIT: Duration = Duration::from_secs(2);

struct InFlightCommit {
    commits: Stamped,
    future: BoxFuture<'static, Result<(), BrokerError>>,
    started: Instant,
}

/// When the next commit goes out, and the one in flight.
pub(super) struct Cadence {
    interval: Duration,
    every: usize,
    sync_each: bool,
    commit: Option<InFlightCommit>,
    /// Settles since the last commit was started.
    settles_since_commit: usize,
    /// When the next cadence commit is due (None: nothing to commit).
    commit_due: Option<Instant>,
}

impl Cadence {
    pub(super) fn new(cfg: &ResolvedSubscriber) -> Self {
        Cadence {
            interval: cfg.commit_interval,
            every: cfg.commit_every,
            sync_each: cfg.commit_sync_each,
            commit: None,
            settles_since_commit: 0,
            commit_due: None,
        }
    }

    /// `n` offsets were settled; `urgent` ones are committed at once.
    pub(super) fn note(&mut self, n: usize, urgent: bool) {
        self.settles_since_commit = self.settles_since_commit.saturating_add(n);
        let urgent = urgent || self.sync_each;
        if !urgent && self.commit_due.is_some() {
            return; // an earlier settle already set a due time, and time only moves on
        }
        let due = if urgent {
            Instant::now()
        } else {
            Instant::now() + self.interval
        };
        self.commit_due = Some(self.commit_due.map_or(due, |d| d.min(due)));
    }

    pub(super) fn pending(&self) -> Pending {
        match (&self.commit, self.commit_due) {
            (Some(_), _) => Pending::InFlight,
            (None, Some(_)) => Pending::Due,
            (None, None) => Pending::None,
        }
    }

    /// When the next commit is due, while none is in flight (its completion wakes the engine anyway).
    pub(super) fn due(&self) -> Option<Instant> {
        if self.commit.is_none() { self.commit_due } else { None }
    }

    /// The commit in flight, to await.
    pub(super) fn in_flight(&mut self) -> Option<&mut BoxFuture<'static, Result<(), BrokerError>>> {
        self.commit.as_mut().map(|c| &mut c.future)
    }

    /// Starts a commit if one is due and none is in flight.
    pub(super) fn start(&mut self, tracker: &mut OffsetTracker, consumer: &mut impl LogConsumer) {
        if self.commit.is_some() {
            return;
        }
        let Some(due) = self.commit_due else { return };
        let now_due = due <= Instant::now() || self.settles_since_commit >= self.every;
        if !now_due {
            return;
        }
        self.commit_due = None;
        self.settles_since_commit = 0;
        let commits = tracker.take_commits();
        if commits.is_empty() {
            return;
        }
        let future = consumer.commit(commits.commits.clone());
        self.commit = Some(InFlightCommit {
            commits,
            future,
            started: Instant::now(),
        });
    }

    /// The commit in flight ended: returns what the broker confirmed.
    pub(super) fn done(
        &mut self,
        tracker: &mut OffsetTracker,
        r: Result<(), BrokerError>,
        subscriber: &Arc<str>,
        counters: &Counters,
        hooks: &Hooks,
    ) -> Option<Commits> {
        let done = self.commit.take()?;
        counters.commit_latency.observe(done.started.elapsed());
        match r {
            Ok(()) => {
                counters.committed(true);
                tracker.confirm(&done.commits);
                Some(done.commits.commits)
            }
            Err(e) => {
                counters.committed(false);
                tracing::warn!(subscriber = %subscriber, error = %e, "commit failed; retrying");
                hooks.emit(|| HookEvent::CommitFailed {
                    subscriber,
                    commits: &done.commits.commits,
                    error: &e,
                });
                // Partitions the broker did commit are confirmed; the rest are asked again.
                let (ok, failed) = match &e {
                    BrokerError::PartialCommit { refused } => {
                        done.commits.split(|tp| refused.iter().any(|(r, _)| r == tp))
                    }
                    _ => (Default::default(), done.commits),
                };
                tracker.confirm(&ok);
                tracker.commit_failed(&failed);
                let retry = Instant::now() + COMMIT_RETRY;
                self.commit_due = Some(self.commit_due.map_or(retry, |d| d.max(retry)));
                (!ok.is_empty()).then_some(ok.commits)
            }
        }
    }

    /// A commit still in flight when a drain's deadline passed must land before the drain's final commit,
    /// or it could move the committed offset back after it. Waits for it, within `IN_FLIGHT_COMMIT_WAIT`.
    /// Returns what the broker confirmed.
    pub(super) async fn finish_in_flight(
        &mut self,
        tracker: &mut OffsetTracker,
        subscriber: &Arc<str>,
        counters: &Counters,
        hooks: &Hooks,
    ) -> Option<Commits> {
        let future = self.in_flight()?;
        match tokio::time::timeout(IN_FLIGHT_COMMIT_WAIT, future).await {
            Ok(r) => self.done(tracker, r, subscriber, counters, hooks),
            Err(_) => {
                self.commit = None;
                tracing::warn!(subscriber = %subscriber, wait = ?IN_FLIGHT_COMMIT_WAIT,
                    "a commit is still in flight after the drain; the final commit goes out anyway");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SubscriberConfig;
    use crate::log::LogEvent;
    use crate::offset::TopicPartition;

    /// A consumer whose commits answer what the test set.
    struct Answers(Option<BrokerError>);

    impl LogConsumer for Answers {
        async fn next(&mut self) -> Option<LogEvent> {
            None
        }
        fn pause(&mut self, _: &TopicPartition) {}
        fn resume(&mut self, _: &TopicPartition) {}
        fn commit(&mut self, _: Commits) -> BoxFuture<'static, Result<(), BrokerError>> {
            let r = self.0.take().map_or(Ok(()), Err);
            Box::pin(std::future::ready(r))
        }
        async fn close(self, _: Commits) -> Result<(), BrokerError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_partly_refused_commit_confirms_the_rest_and_asks_again_for_the_refused() {
        let cfg = SubscriberConfig::new("t").resolve(true).unwrap();
        let (a, b) = (TopicPartition::new("t", 0), TopicPartition::new("t", 1));
        let mut tracker = OffsetTracker::default();
        for tp in [&a, &b] {
            tracker.assign(tp.clone());
            let p = tracker.partition(tp).unwrap();
            p.deliver(0);
            p.settle(0);
        }
        let mut consumer = Answers(Some(BrokerError::PartialCommit {
            refused: vec![(b.clone(), "rebalance in progress".into())],
        }));
        let mut cadence = Cadence::new(&cfg);
        cadence.note(2, true);
        cadence.start(&mut tracker, &mut consumer);
        let r = cadence.in_flight().expect("a commit in flight").await;
        let (name, counters) = (Arc::from("t"), Counters::default());
        let landed = cadence.done(&mut tracker, r, &name, &counters, &Hooks::default());
        assert_eq!(
            landed,
            Some(vec![(a.clone(), 1)]),
            "what the broker took is reported committed"
        );
        assert_eq!(tracker.confirmed(&a), Some(1));
        assert_eq!(tracker.confirmed(&b), None);
        assert_eq!(
            tracker.take_commits().commits,
            vec![(b.clone(), 1)],
            "only the refused one again"
        );
    }
}
