//! Observing what the framework did: handler calls, settles, commits, assignments.
//!
//! An [`Observer`] records events from every subscriber of a broker started after it was requested
//! with [`Broker::observer`](crate::Broker::observer). Tests await events with a deadline instead of
//! sleeping; the demo prints them. It is off unless requested, so production pays nothing for it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::hooks::{Hook, HookEvent};
use crate::message::SettledBy;
use crate::offset::TopicPartition;
use crate::settle::Settle;

pub use crate::hooks::Outcome;

/// Something the framework did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The subscriber now owns these partitions.
    Assigned {
        /// Subscriber name.
        subscriber: Arc<str>,
        /// Partitions gained.
        partitions: Vec<TopicPartition>,
    },
    /// These partitions were taken away, after their final commit.
    Revoked {
        /// Subscriber name.
        subscriber: Arc<str>,
        /// Partitions lost.
        partitions: Vec<TopicPartition>,
    },
    /// A handler call ended.
    Handled {
        /// Subscriber name.
        subscriber: Arc<str>,
        /// Partition.
        tp: TopicPartition,
        /// Offset.
        offset: i64,
        /// Its payload as (lossy) UTF-8, for reading test failures and the demo.
        payload: String,
        /// How it ended.
        outcome: Outcome,
    },
    /// A message was settled.
    Settled {
        /// Subscriber name.
        subscriber: Arc<str>,
        /// Partition.
        tp: TopicPartition,
        /// Offset.
        offset: i64,
        /// The decision.
        settle: Settle,
        /// Who made it.
        by: SettledBy,
    },
    /// A rejected message was published to the dead-letter topic (its offset now counts as settled).
    DeadLettered {
        /// Subscriber name.
        subscriber: Arc<str>,
        /// Partition.
        tp: TopicPartition,
        /// Offset.
        offset: i64,
    },
    /// A failed message was published to the retry topic (non-blocking retries); its offset now counts as
    /// settled and it will be handled again after `delay`.
    RetryScheduled {
        /// Subscriber name.
        subscriber: Arc<str>,
        /// Partition.
        tp: TopicPartition,
        /// Offset.
        offset: i64,
        /// The backoff before the next attempt.
        delay: std::time::Duration,
    },
    /// Fetching of a partition stopped (`paused`) because `buffered` records wait behind its in-flight
    /// limit, or started again.
    FlowControl {
        /// Subscriber name.
        subscriber: Arc<str>,
        /// Partition.
        tp: TopicPartition,
        /// True when fetching stopped, false when it resumed.
        paused: bool,
        /// Records waiting in the partition's queue.
        buffered: usize,
    },
    /// The broker acknowledged a commit: `offset` is the next offset the group will read.
    Committed {
        /// Subscriber name.
        subscriber: Arc<str>,
        /// Partition.
        tp: TopicPartition,
        /// Committed offset.
        offset: i64,
    },
    /// The broker refused a commit (it is retried).
    CommitFailed {
        /// Subscriber name.
        subscriber: Arc<str>,
        /// The offsets it tried to commit.
        commits: Vec<(TopicPartition, i64)>,
        /// The broker's answer, as displayed.
        error: String,
    },
    /// The partition's commit is held back by the unsettled `offset` while later messages were settled.
    Stalled {
        /// Subscriber name.
        subscriber: Arc<str>,
        /// Partition.
        tp: TopicPartition,
        /// The unsettled offset.
        offset: i64,
        /// For how long.
        stalled_for: Duration,
    },
}

impl Event {
    /// The subscriber the event is about.
    pub fn subscriber(&self) -> &str {
        match self {
            Event::Assigned { subscriber, .. }
            | Event::Revoked { subscriber, .. }
            | Event::Handled { subscriber, .. }
            | Event::Settled { subscriber, .. }
            | Event::FlowControl { subscriber, .. }
            | Event::DeadLettered { subscriber, .. }
            | Event::RetryScheduled { subscriber, .. }
            | Event::Committed { subscriber, .. }
            | Event::CommitFailed { subscriber, .. }
            | Event::Stalled { subscriber, .. } => subscriber,
        }
    }
}

/// A deadline passed before the awaited events happened.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {timeout:?} waiting for {what}; {seen} events were recorded")]
pub struct WaitTimeout {
    /// What was awaited.
    pub what: String,
    /// The deadline.
    pub timeout: Duration,
    /// How many events had been recorded.
    pub seen: usize,
}

/// A settled message, as the observer saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettledMessage {
    /// Partition.
    pub tp: TopicPartition,
    /// Offset.
    pub offset: i64,
    /// The decision.
    pub settle: Settle,
    /// Who made it.
    pub by: SettledBy,
}

#[derive(Default)]
struct Log {
    events: Mutex<Vec<Event>>,
    changed: Notify,
}

/// The event log of one broker. Cheap to clone.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use ferrostream::{App, Broker, Settle};
/// let broker = Broker::new("memory://")?;
/// let observer = broker.observer();
/// broker.subscriber("greetings").group_id("g").auto_commit(false)
///     .handle(|body: String| async move { assert_eq!(body, "hi") });
/// let app = App::new(broker.clone()).start().await?;
/// broker.publish("hi", "greetings").await?;
/// let settled = observer.wait_settled("greetings@g", 1, Duration::from_secs(5)).await?;
/// assert_eq!(settled[0].settle, Settle::Ack);
/// app.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct Observer {
    log: Arc<Log>,
}

impl Hook for Observer {
    fn on_event(&self, event: &HookEvent<'_>) {
        let event = match *event {
            HookEvent::Assigned { subscriber, sources } => Event::Assigned {
                subscriber: subscriber.clone(),
                partitions: sources.to_vec(),
            },
            HookEvent::Revoked { subscriber, sources } => Event::Revoked {
                subscriber: subscriber.clone(),
                partitions: sources.to_vec(),
            },
            HookEvent::Handled {
                subscriber,
                message,
                outcome,
            } => Event::Handled {
                subscriber: subscriber.clone(),
                tp: message.topic_partition().clone(),
                offset: message.offset(),
                payload: String::from_utf8_lossy(message.payload()).into_owned(),
                outcome: outcome.clone(),
            },
            HookEvent::Settled {
                subscriber,
                tp,
                offset,
                settle,
                by,
            } => Event::Settled {
                subscriber: subscriber.clone(),
                tp: tp.clone(),
                offset,
                settle,
                by,
            },
            HookEvent::DeadLettered { subscriber, tp, offset } => Event::DeadLettered {
                subscriber: subscriber.clone(),
                tp: tp.clone(),
                offset,
            },
            HookEvent::RetryScheduled {
                subscriber,
                tp,
                offset,
                delay,
            } => Event::RetryScheduled {
                subscriber: subscriber.clone(),
                tp: tp.clone(),
                offset,
                delay,
            },
            HookEvent::FlowControl {
                subscriber,
                tp,
                paused,
                buffered,
            } => Event::FlowControl {
                subscriber: subscriber.clone(),
                tp: tp.clone(),
                paused,
                buffered,
            },
            HookEvent::Committed { subscriber, tp, offset } => Event::Committed {
                subscriber: subscriber.clone(),
                tp: tp.clone(),
                offset,
            },
            HookEvent::CommitFailed {
                subscriber,
                commits,
                error,
            } => Event::CommitFailed {
                subscriber: subscriber.clone(),
                commits: commits.to_vec(),
                error: error.to_string(),
            },
            HookEvent::Stalled {
                subscriber,
                tp,
                offset,
                stalled_for,
            } => Event::Stalled {
                subscriber: subscriber.clone(),
                tp: tp.clone(),
                offset,
                stalled_for,
            },
        };
        self.record(event);
    }
}

impl Observer {
    fn record(&self, event: Event) {
        self.lock().push(event);
        self.log.changed.notify_waiters();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Event>> {
        self.log.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every event so far, in order.
    pub fn events(&self) -> Vec<Event> {
        self.lock().clone()
    }

    /// Waits until `done` returns `Some` for the events so far, or the deadline passes.
    pub async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[Event]) -> Option<T>,
    ) -> Result<T, WaitTimeout> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.log.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // A snapshot, so `done` may itself call the observer's accessors without deadlocking.
            let events = self.events();
            if let Some(t) = done(&events) {
                return Ok(t);
            }
            let seen = events.len();
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(WaitTimeout {
                    what: what.to_owned(),
                    timeout,
                    seen,
                });
            }
        }
    }

    /// The messages a subscriber settled, in order.
    pub fn settled(&self, subscriber: &str) -> Vec<SettledMessage> {
        settled_of(&self.lock(), subscriber)
    }

    /// Waits until a subscriber has settled at least `n` messages; returns them all in order.
    pub async fn wait_settled(
        &self,
        subscriber: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<SettledMessage>, WaitTimeout> {
        let what = format!("{n} settles by `{subscriber}`");
        self.wait_until(&what, timeout, |ev| {
            let s = settled_of(ev, subscriber);
            (s.len() >= n).then_some(s)
        })
        .await
    }

    /// The messages a subscriber finished with for good, in order: acked, or rejected (once a dead-letter
    /// topic, if it has one, confirmed the dead letter). A nack is not an end: the message comes back.
    pub fn finished(&self, subscriber: &str) -> Vec<SettledMessage> {
        finished_of(&self.lock(), subscriber)
    }

    /// Waits until a subscriber has finished with at least `n` messages ([`finished`](Self::finished):
    /// retries' nacks do not count); returns them all in order.
    pub async fn wait_finished(
        &self,
        subscriber: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<SettledMessage>, WaitTimeout> {
        let what = format!("{n} messages finished by `{subscriber}`");
        self.wait_until(&what, timeout, |ev| {
            let s = finished_of(ev, subscriber);
            (s.len() >= n).then_some(s)
        })
        .await
    }

    /// The handler calls of a subscriber: partition, offset, payload and outcome, in order.
    pub fn handled(&self, subscriber: &str) -> Vec<(TopicPartition, i64, String, Outcome)> {
        handled_of(&self.lock(), subscriber)
    }

    /// Waits until a subscriber's handler has been called at least `n` times.
    pub async fn wait_handled(
        &self,
        subscriber: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<(TopicPartition, i64, String, Outcome)>, WaitTimeout> {
        let what = format!("{n} handler calls of `{subscriber}`");
        self.wait_until(&what, timeout, |ev| {
            let h = handled_of(ev, subscriber);
            (h.len() >= n).then_some(h)
        })
        .await
    }

    /// The highest offset the broker acknowledged as committed for each partition of a subscriber.
    pub fn committed(&self, subscriber: &str) -> BTreeMap<TopicPartition, i64> {
        committed_of(&self.lock(), subscriber)
    }

    /// Waits until the subscriber's committed offset of `tp` reaches `offset`.
    pub async fn wait_committed(
        &self,
        subscriber: &str,
        tp: &TopicPartition,
        offset: i64,
        timeout: Duration,
    ) -> Result<(), WaitTimeout> {
        let what = format!("`{subscriber}` committing {tp} up to {offset}");
        self.wait_until(&what, timeout, |ev| {
            committed_of(ev, subscriber)
                .get(tp)
                .is_some_and(|c| *c >= offset)
                .then_some(())
        })
        .await
    }

    /// The partitions a subscriber owns now, according to its assignment events.
    pub fn assignment(&self, subscriber: &str) -> Vec<TopicPartition> {
        assignment_of(&self.lock(), subscriber)
    }
}

fn finished_of(events: &[Event], subscriber: &str) -> Vec<SettledMessage> {
    let mut all = settled_of(events, subscriber);
    all.retain(|s| matches!(s.settle, Settle::Ack | Settle::Reject));
    all
}

fn settled_of(events: &[Event], subscriber: &str) -> Vec<SettledMessage> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Settled {
                subscriber: s,
                tp,
                offset,
                settle,
                by,
            } if &**s == subscriber => Some(SettledMessage {
                tp: tp.clone(),
                offset: *offset,
                settle: *settle,
                by: *by,
            }),
            _ => None,
        })
        .collect()
}

fn handled_of(events: &[Event], subscriber: &str) -> Vec<(TopicPartition, i64, String, Outcome)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Handled {
                subscriber: s,
                tp,
                offset,
                payload,
                outcome,
            } if &**s == subscriber => Some((tp.clone(), *offset, payload.clone(), outcome.clone())),
            _ => None,
        })
        .collect()
}

fn committed_of(events: &[Event], subscriber: &str) -> BTreeMap<TopicPartition, i64> {
    let mut out = BTreeMap::new();
    for e in events {
        if let Event::Committed {
            subscriber: s,
            tp,
            offset,
        } = e
            && &**s == subscriber
        {
            let c = out.entry(tp.clone()).or_insert(*offset);
            *c = (*c).max(*offset);
        }
    }
    out
}

fn assignment_of(events: &[Event], subscriber: &str) -> Vec<TopicPartition> {
    let mut owned = std::collections::BTreeSet::new();
    for e in events {
        match e {
            Event::Assigned {
                subscriber: s,
                partitions,
            } if &**s == subscriber => owned.extend(partitions.iter().cloned()),
            Event::Revoked {
                subscriber: s,
                partitions,
            } if &**s == subscriber => {
                for p in partitions {
                    owned.remove(p);
                }
            }
            _ => {}
        }
    }
    owned.into_iter().collect()
}
