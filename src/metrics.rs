//! Counters per subscriber: what was handled, how it failed, how it was settled (SPEC 2.5).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::error::FailureKind;
use crate::settle::Settle;

#[derive(Debug, Default)]
pub(crate) struct Counters {
    handled: AtomicU64,
    succeeded: AtomicU64,
    handler_errors: AtomicU64,
    decode_errors: AtomicU64,
    panics: AtomicU64,
    acks: AtomicU64,
    nacks: AtomicU64,
    rejects: AtomicU64,
    commits: AtomicU64,
    commit_errors: AtomicU64,
    buffered_high_water: AtomicU64,
}

impl Counters {
    pub(crate) fn buffered(&self, n: usize) {
        self.buffered_high_water.fetch_max(n as u64, Relaxed);
    }

    pub(crate) fn handled(&self, failure: Option<FailureKind>) {
        self.handled.fetch_add(1, Relaxed);
        match failure {
            None => &self.succeeded,
            Some(FailureKind::Decode) => &self.decode_errors,
            Some(FailureKind::Panic) => &self.panics,
            Some(FailureKind::Handler) => &self.handler_errors,
        }
        .fetch_add(1, Relaxed);
    }

    pub(crate) fn settled(&self, s: Settle) {
        match s {
            Settle::Ack => &self.acks,
            Settle::Nack { .. } => &self.nacks,
            Settle::Reject => &self.rejects,
        }
        .fetch_add(1, Relaxed);
    }

    pub(crate) fn committed(&self, ok: bool) {
        if ok { &self.commits } else { &self.commit_errors }.fetch_add(1, Relaxed);
    }

    fn snapshot(&self) -> SubscriberMetrics {
        SubscriberMetrics {
            handled: self.handled.load(Relaxed),
            succeeded: self.succeeded.load(Relaxed),
            handler_errors: self.handler_errors.load(Relaxed),
            decode_errors: self.decode_errors.load(Relaxed),
            panics: self.panics.load(Relaxed),
            acks: self.acks.load(Relaxed),
            nacks: self.nacks.load(Relaxed),
            rejects: self.rejects.load(Relaxed),
            commits: self.commits.load(Relaxed),
            commit_errors: self.commit_errors.load(Relaxed),
            buffered_high_water: self.buffered_high_water.load(Relaxed),
        }
    }
}

/// A snapshot of one subscriber's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriberMetrics {
    /// Handler calls that ended (any outcome, interrupts included).
    pub handled: u64,
    /// Calls that returned successfully or with an interrupt.
    pub succeeded: u64,
    /// Calls that returned an error.
    pub handler_errors: u64,
    /// Calls whose payload did not decode.
    pub decode_errors: u64,
    /// Calls that panicked.
    pub panics: u64,
    /// Messages acked.
    pub acks: u64,
    /// Messages nacked.
    pub nacks: u64,
    /// Messages rejected.
    pub rejects: u64,
    /// Commits the broker acknowledged.
    pub commits: u64,
    /// Commits that failed (and were retried).
    pub commit_errors: u64,
    /// The most records ever seen waiting in one partition's queue when fetching was checked.
    pub buffered_high_water: u64,
}

/// Counters of every subscriber of a broker, by subscriber name.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    by_subscriber: Arc<Mutex<BTreeMap<String, Arc<Counters>>>>,
}

impl Metrics {
    pub(crate) fn counters(&self, subscriber: &str) -> Arc<Counters> {
        let mut map = self.by_subscriber.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(subscriber.to_owned()).or_default().clone()
    }

    /// The current counters of one subscriber (zero if it never ran).
    ///
    /// ```
    /// let broker = ferrostream::Broker::new("memory://").unwrap();
    /// assert_eq!(broker.metrics().get("nobody").panics, 0);
    /// ```
    pub fn get(&self, subscriber: &str) -> SubscriberMetrics {
        let map = self.by_subscriber.lock().unwrap_or_else(|p| p.into_inner());
        map.get(subscriber).map(|c| c.snapshot()).unwrap_or_default()
    }
}
