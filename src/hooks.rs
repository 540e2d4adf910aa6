//! Hooks: how observers, metrics, tracing and middleware see what the engine does.
//!
//! A [`Hook`] receives every [`HookEvent`] of a broker's subscribers as a borrow: nothing is copied or
//! allocated for it, and with no hook installed an event is not even built. The test
//! [`Observer`] is one hook; register your own with
//! [`Broker::with_hook`](crate::Broker::with_hook).
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use ferrostream::hooks::{Hook, HookEvent};
//!
//! #[derive(Default)]
//! struct CountAcks(AtomicUsize);
//!
//! impl Hook for CountAcks {
//!     fn on_event(&self, event: &HookEvent<'_>) {
//!         if let HookEvent::Settled { settle: ferrostream::Settle::Ack, .. } = event {
//!             self.0.fetch_add(1, Ordering::Relaxed);
//!         }
//!     }
//! }
//!
//! let broker = ferrostream::Broker::new("memory://").unwrap().with_hook(CountAcks::default());
//! # let _ = broker;
//! ```

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::error::{BrokerError, FailureKind};
use crate::message::{Message, SettledBy};
use crate::observe::Observer;
use crate::offset::TopicPartition;
use crate::settle::Settle;

/// How a handler call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It returned successfully.
    Ok,
    /// It returned an interrupt (`AckMessage`, `NackMessage`, `RejectMessage`).
    Interrupted(Settle),
    /// It failed: how, and the error's text.
    Failed {
        /// What kind of failure.
        kind: FailureKind,
        /// The error, as displayed.
        message: String,
    },
}

/// Something a subscriber did. Sources are Kafka partitions, or a queue (partition 0) on brokers without
/// partitions; offsets are Kafka offsets, or the broker's delivery sequence (an AMQP delivery tag).
#[derive(Debug)]
#[non_exhaustive]
pub enum HookEvent<'a> {
    /// The subscriber now owns these sources.
    Assigned {
        /// Subscriber name.
        subscriber: &'a Arc<str>,
        /// Sources gained.
        sources: &'a [TopicPartition],
    },
    /// These sources were taken away, after their final commit.
    Revoked {
        /// Subscriber name.
        subscriber: &'a Arc<str>,
        /// Sources lost.
        sources: &'a [TopicPartition],
    },
    /// A handler call ended (once per message of a batch).
    Handled {
        /// Subscriber name.
        subscriber: &'a Arc<str>,
        /// The message.
        message: &'a Message,
        /// How the call ended.
        outcome: &'a Outcome,
    },
    /// A message was settled.
    Settled {
        /// Subscriber name.
        subscriber: &'a Arc<str>,
        /// Its source.
        tp: &'a TopicPartition,
        /// Its offset.
        offset: i64,
        /// The decision.
        settle: Settle,
        /// Who made it.
        by: SettledBy,
    },
    /// A rejected message was published to the dead-letter topic, and so counts as settled.
    DeadLettered {
        /// Subscriber name.
        subscriber: &'a Arc<str>,
        /// Its source.
        tp: &'a TopicPartition,
        /// Its offset.
        offset: i64,
    },
    /// A failed message was published to the retry topic; it will be handled again after `delay`.
    RetryScheduled {
        /// Subscriber name.
        subscriber: &'a Arc<str>,
        /// Its source.
        tp: &'a TopicPartition,
        /// Its offset.
        offset: i64,
        /// The backoff before the next attempt.
        delay: Duration,
    },
    /// Taking records from a source stopped (`paused`) because `buffered` records wait, or started again.
    FlowControl {
        /// Subscriber name.
        subscriber: &'a Arc<str>,
        /// The source.
        tp: &'a TopicPartition,
        /// True when it stopped, false when it started again.
        paused: bool,
        /// Records waiting in its queue.
        buffered: usize,
    },
    /// The broker acknowledged a commit: `offset` is the next offset the group will read.
    Committed {
        /// Subscriber name.
        subscriber: &'a Arc<str>,
        /// The partition.
        tp: &'a TopicPartition,
        /// Committed offset.
        offset: i64,
    },
    /// The broker refused a commit (it is retried). With Kafka, [`BrokerError::kafka_kind`] says why.
    CommitFailed {
        /// Subscriber name.
        subscriber: &'a Arc<str>,
        /// The offsets it tried to commit.
        commits: &'a [(TopicPartition, i64)],
        /// The broker's answer.
        error: &'a BrokerError,
    },
    /// A partition's commit has not moved for `stalled_for` because `offset` is unsettled, while later
    /// messages were settled (a `Manual` handler that never settles, a message held by user code).
    Stalled {
        /// Subscriber name.
        subscriber: &'a Arc<str>,
        /// The partition.
        tp: &'a TopicPartition,
        /// The unsettled offset that holds the commit back.
        offset: i64,
        /// How long it has held it.
        stalled_for: Duration,
    },
}

/// Receives the events of a broker's subscribers. Called on the subscriber's engine task: keep it quick
/// (count, record, hand off), never block.
pub trait Hook: Send + Sync + 'static {
    /// One event.
    fn on_event(&self, event: &HookEvent<'_>);
}

/// The hooks of one broker: the ones registered, and the observer once a test asks for it.
#[derive(Clone, Default)]
pub(crate) struct Hooks {
    list: Arc<[Arc<dyn Hook>]>,
    observer: Arc<OnceLock<Observer>>,
}

impl Hooks {
    pub(crate) fn new(list: Vec<Arc<dyn Hook>>, observer: Arc<OnceLock<Observer>>) -> Self {
        Hooks {
            list: list.into(),
            observer,
        }
    }

    /// Builds the event and hands it to every hook, only when there is one.
    #[inline]
    pub(crate) fn emit<'a>(&self, event: impl FnOnce() -> HookEvent<'a>) {
        let observer = self.observer.get();
        if self.list.is_empty() && observer.is_none() {
            return;
        }
        let event = event();
        if let Some(o) = observer {
            o.on_event(&event);
        }
        for hook in self.list.iter() {
            hook.on_event(&event);
        }
    }
}
