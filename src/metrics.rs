//! Counters per subscriber: what was handled, how it failed, how it was settled (SPEC 2.5).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::error::FailureKind;
use crate::offset::TopicPartition;
use crate::settle::Settle;

/// Upper bounds (seconds) of the duration histograms' buckets: from half a millisecond to ten seconds.
pub(crate) const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// [`BUCKETS`] in nanoseconds.
const BUCKET_NANOS: [u64; 14] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A duration histogram of relaxed atomics: an observation is a bucket search and two additions.
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    /// Per bucket (not cumulative); the last one is `+Inf`.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// A histogram as read at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(not(feature = "prometheus"), allow(dead_code))] // read by the exposition
pub(crate) struct HistogramSnapshot {
    /// Counts per upper bound of [`BUCKETS`] (each bucket's own, not cumulative).
    pub(crate) buckets: Vec<(f64, u64)>,
    pub(crate) count: u64,
    pub(crate) sum_seconds: f64,
}

/// Adds to a counter that only one task writes (a subscriber's engine writes its own counters): a load
/// and a store, without the locked read-modify-write a shared counter needs. A second engine under the
/// same subscriber name (two apps on one broker) may lose an increment of these; nothing else does.
#[inline]
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
}

impl Histogram {
    /// Bucket index of a duration: compared in nanoseconds, without floating point.
    #[inline]
    fn bucket(nanos: u64) -> usize {
        BUCKET_NANOS.iter().position(|b| nanos <= *b).unwrap_or(BUCKETS.len())
    }

    /// An observation by the histogram's only writer (see [`bump`]).
    pub(crate) fn observe(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        bump(&self.counts[Self::bucket(nanos)], 1);
        bump(&self.sum_nanos, nanos);
    }

    /// An observation by one of several writers (publishes come from any task).
    pub(crate) fn observe_shared(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.counts[Self::bucket(nanos)].fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }

    #[cfg_attr(not(feature = "prometheus"), allow(dead_code))] // read by the exposition
    pub(crate) fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .zip(&self.counts)
            .map(|(bound, c)| (*bound, c.load(Relaxed)))
            .collect();
        let total = buckets.iter().map(|(_, n)| n).sum::<u64>() + self.counts[BUCKETS.len()].load(Relaxed);
        HistogramSnapshot {
            buckets,
            count: total,
            sum_seconds: self.sum_nanos.load(Relaxed) as f64 / 1e9,
        }
    }
}

/// The broker family of a URL, as OpenTelemetry's `messaging.system` names it.
pub(crate) fn system_of(url: &str) -> &'static str {
    match url.split_once("://").map(|(s, _)| s) {
        Some("kafka") => "kafka",
        Some("amqp" | "amqps") => "rabbitmq",
        Some("memory") => "memory",
        _ => "other",
    }
}

/// What a subscriber is, for the labels of its metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubscriberLabels {
    /// `kafka`, `rabbitmq` or `memory`.
    pub(crate) system: &'static str,
    pub(crate) topic: String,
    pub(crate) group: Option<String>,
}

/// Where a consumer stands in one partition: what it committed, where it reads, where the log ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PartitionPosition {
    /// The committed offset (the next one the group reads after a restart); `None` before the first.
    pub(crate) committed: Option<i64>,
    /// The next offset this consumer takes.
    pub(crate) position: Option<i64>,
    /// The log end offset (high watermark), as the client last saw it.
    pub(crate) end: Option<i64>,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) labels: OnceLock<SubscriberLabels>,
    received: AtomicU64,
    dead_lettered: AtomicU64,
    retries: AtomicU64,
    assignments: AtomicU64,
    revocations: AtomicU64,
    pub(crate) process: Histogram,
    pub(crate) commit_latency: Histogram,
    /// Per owned partition (log brokers), refreshed on the commit cadence.
    positions: Mutex<BTreeMap<TopicPartition, PartitionPosition>>,
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
    /// Messages handed to a handler call.
    pub(crate) fn received(&self, n: usize) {
        bump(&self.received, n as u64);
    }

    pub(crate) fn dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Relaxed);
    }

    pub(crate) fn retry_scheduled(&self) {
        self.retries.fetch_add(1, Relaxed);
    }

    pub(crate) fn rebalanced(&self, assigned: bool) {
        if assigned { &self.assignments } else { &self.revocations }.fetch_add(1, Relaxed);
    }

    /// Replaces the positions of the partitions this subscriber owns.
    pub(crate) fn set_positions(&self, positions: BTreeMap<TopicPartition, PartitionPosition>) {
        *self.positions.lock().unwrap_or_else(|p| p.into_inner()) = positions;
    }

    #[cfg_attr(not(feature = "prometheus"), allow(dead_code))] // read by the exposition
    pub(crate) fn positions(&self) -> BTreeMap<TopicPartition, PartitionPosition> {
        self.positions.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

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

    pub(crate) fn snapshot(&self) -> SubscriberMetrics {
        SubscriberMetrics {
            received: self.received.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            retries: self.retries.load(Relaxed),
            assignments: self.assignments.load(Relaxed),
            revocations: self.revocations.load(Relaxed),
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
    /// Messages handed to handler calls (a retried message counts again).
    pub received: u64,
    /// Rejected messages published to the dead-letter topic.
    pub dead_lettered: u64,
    /// Failed messages published to the retry topic.
    pub retries: u64,
    /// Partition assignments this subscriber received (rebalances that gave it partitions).
    pub assignments: u64,
    /// Partition revocations (rebalances that took partitions away).
    pub revocations: u64,
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
    publishes: Publishes,
}

/// Publishes to the broker, by destination: sent, failed, and how long the broker took to acknowledge.
#[derive(Debug, Clone, Default)]
pub(crate) struct Publishes {
    /// Read on every publish from any task, written once per new destination: a read lock.
    by_destination: Arc<std::sync::RwLock<BTreeMap<String, Arc<PublishCounters>>>>,
}

#[derive(Debug, Default)]
pub(crate) struct PublishCounters {
    pub(crate) sent: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) latency: Histogram,
}

/// The broker's sender with every publish counted and timed, by destination.
pub(crate) struct Metered {
    pub(crate) inner: Arc<dyn crate::transport::Publisher>,
    pub(crate) publishes: Publishes,
    /// The broker family, for the trace of a publish.
    #[cfg_attr(not(feature = "otel"), allow(dead_code))]
    pub(crate) system: &'static str,
}

impl crate::transport::Publisher for Metered {
    fn send(
        &self,
        #[cfg_attr(not(feature = "otel"), allow(unused_mut))] mut out: crate::transport::Outgoing,
    ) -> futures::future::BoxFuture<'static, Result<crate::PublishAck, crate::PublishError>> {
        let meter =
            crate::transport::Meter::start(self.publishes.of(if out.mandatory { &out.topic } else { "(reply)" }));
        #[cfg(feature = "otel")]
        {
            let span = crate::otel::send(&mut out, self.system);
            let sent = self.inner.send_metered(out, meter);
            Box::pin(tracing::Instrument::instrument(sent, span))
        }
        #[cfg(not(feature = "otel"))]
        self.inner.send_metered(out, meter)
    }
}

impl crate::transport::PublishOutcomes for PublishCounters {
    fn record(&self, ok: bool, took: std::time::Duration) {
        self.latency.observe_shared(took);
        if ok { &self.sent } else { &self.failed }.fetch_add(1, Relaxed);
    }
}

impl Publishes {
    /// The counters of a destination (a topic, or `(reply)` for every reply: reply topics are the
    /// requesters', and as many as there are requesters).
    pub(crate) fn of(&self, destination: &str) -> Arc<PublishCounters> {
        if let Some(c) = self
            .by_destination
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(destination)
        {
            return c.clone();
        }
        let mut map = self.by_destination.write().unwrap_or_else(|p| p.into_inner());
        map.entry(destination.to_owned()).or_default().clone()
    }

    #[cfg_attr(not(feature = "prometheus"), allow(dead_code))] // read by the exposition
    pub(crate) fn all(&self) -> Vec<(String, Arc<PublishCounters>)> {
        let map = self.by_destination.read().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(n, c)| (n.clone(), c.clone())).collect()
    }
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

    /// Every subscriber's counters, by name.
    #[cfg_attr(not(feature = "prometheus"), allow(dead_code))] // read by the exposition
    pub(crate) fn all(&self) -> Vec<(String, Arc<Counters>)> {
        let map = self.by_subscriber.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(n, c)| (n.clone(), c.clone())).collect()
    }

    pub(crate) fn publishes(&self) -> &Publishes {
        &self.publishes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_observation_lands_in_the_first_bucket_whose_bound_it_does_not_exceed() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500)); // on the first bound
        h.observe(Duration::from_millis(3)); // in (0.0025, 0.005]
        h.observe(Duration::from_secs(60)); // past the last bound: +Inf only
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (0.0005, 1));
        assert_eq!(s.buckets[3], (0.005, 1));
        assert_eq!(s.buckets.iter().map(|b| b.1).sum::<u64>(), 2);
        assert!((s.sum_seconds - 60.0035).abs() < 1e-9);
    }
}
