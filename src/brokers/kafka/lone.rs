//! A publish that is alone skips `linger.ms`; concurrent publishes still batch.
//!
//! librdkafka holds every record in its partition queue for `linger.ms` so that records sent together
//! share a produce request. For a service that awaits each publish one by one that wait is the whole
//! cost: its broker thread sleeps in whole milliseconds, so a lone record waits ~1 ms at any linger above
//! zero, against ~0.3 ms for the broker's acknowledgement. librdkafka has no per-record "send now", but
//! while a `rd_kafka_flush` call lasts its broker threads treat the linger as elapsed.
//!
//! So the backend counts the publishes it has handed over and not yet seen answered. A publish that finds
//! none in flight is alone: it is queued first, then a dedicated thread is woken to hold a flush open until
//! librdkafka has no record left unanswered, for at most one linger period and never more than 10 ms, so
//! the broker thread sends it at once. Publishes made meanwhile go out unbatched for that long at most;
//! once publishes overlap, none is alone and batching is untouched. `linger.ms=0` needs none of this.
//!
//! Invariant: every record keeps the order librdkafka gives it (one producer, one queue per partition);
//! the flush changes only *when* the broker thread sends, never *what* or in which order.

use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use rdkafka::producer::{FutureProducer, Producer};

use super::quiet::QuietContext;

/// Below this many publishes counted in flight, librdkafka is asked whether they really are.
const ASK_LIBRDKAFKA_BELOW: usize = 4;

/// The longest a flush is held open: long enough for a busy broker thread to pick the record up, short
/// enough that a burst after a lone publish is unbatched for no more than this even under a long linger.
const MAX_FLUSH: Duration = Duration::from_millis(10);

/// Wakes the flushing thread for publishes that are alone; owned by the backend.
pub(super) struct Lone {
    /// Records handed to librdkafka whose delivery future has not ended yet.
    in_flight: Arc<AtomicUsize>,
    /// A pending wake-up (capacity 1: wake-ups while a flush runs collapse into one more flush).
    wake: SyncSender<()>,
}

/// Marks one record in flight until it is dropped (its delivery future ended or was dropped).
pub(super) struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Lone {
    /// Starts the flushing thread of a producer whose linger is `linger`; `None` when the linger is zero
    /// (every record is sent at once anyway) or the thread cannot start (publishes then wait the linger).
    pub(super) fn start(producer: &Arc<FutureProducer<QuietContext>>, linger: Duration) -> Option<Self> {
        if linger.is_zero() {
            return None;
        }
        let (wake, woken) = sync_channel(1);
        let producer = Arc::downgrade(producer);
        std::thread::Builder::new()
            .name("ferrostream-kafka-lone".into())
            .spawn(move || flush_when_woken(&producer, &woken, linger))
            .ok()?;
        Some(Lone {
            in_flight: Arc::new(AtomicUsize::new(0)),
            wake,
        })
    }

    /// Counts a record just handed to librdkafka; if nothing else is in flight, it is alone and the broker
    /// thread is told to send it now. Call after the record is queued, never before.
    ///
    /// The count ends when a publish's future ends, which can be a moment after librdkafka delivered the
    /// record (the task has not run yet) or much later (a future held unpolled). So when the count says
    /// a few others are in flight, librdkafka's own count (`outstanding`, records not yet reported,
    /// this one included) decides; with many in flight batching is what is wanted and it is not asked.
    pub(super) fn queued(&self, outstanding: impl FnOnce() -> i32) -> InFlight {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if before == 0 || (before < ASK_LIBRDKAFKA_BELOW && outstanding() <= 1) {
            // Full: a flush is already due. Disconnected: the thread is gone; the record waits the linger.
            let _: Result<(), TrySendError<()>> = self.wake.try_send(());
        }
        InFlight(self.in_flight.clone())
    }

    /// Counts a record that was never alone (it waited for room in a full producer queue).
    pub(super) fn crowded(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.in_flight.clone())
    }
}

/// The flushing thread: each wake-up holds a flush open for up to one linger period. Ends when the backend
/// (the wake-up's sender) or the producer is gone.
fn flush_when_woken(producer: &Weak<FutureProducer<QuietContext>>, woken: &Receiver<()>, linger: Duration) {
    let timeout_ms = i32::try_from(linger.min(MAX_FLUSH).as_millis().max(1)).unwrap_or(i32::MAX);
    while woken.recv().is_ok() {
        let Some(producer) = producer.upgrade() else { return };
        flush_for(&producer, timeout_ms);
    }
}

/// `rd_kafka_flush` with a real timeout. rdkafka's `Producer::flush` calls it with a zero timeout in a
/// loop and polls in between, so librdkafka's "flushing" flag is up only for an instant and a broker
/// thread that wakes a moment later still waits out the linger.
#[allow(unsafe_code)]
fn flush_for(producer: &FutureProducer<QuietContext>, timeout_ms: i32) {
    let rk = producer.client().native_ptr();
    // SAFETY: `rk` is the live handle of `producer`, which this frame borrows, so it outlives the call;
    // rd_kafka_flush is thread-safe. In rdkafka's delivery-event mode it only raises the flushing flag,
    // wakes the broker threads and waits for the count of unanswered records to reach zero (the producer's
    // own polling thread serves the reports). A timeout is the normal outcome under load: ignored.
    let _ = unsafe { rdkafka::bindings::rd_kafka_flush(rk, timeout_ms) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lone() -> (Lone, Receiver<()>) {
        let (wake, woken) = sync_channel(1);
        let lone = Lone {
            in_flight: Arc::new(AtomicUsize::new(0)),
            wake,
        };
        (lone, woken)
    }

    #[test]
    fn only_a_record_with_nothing_else_in_flight_wakes_the_flusher() {
        let (lone, woken) = lone();
        let first = lone.queued(|| unreachable!("nothing else counted: no need to ask"));
        assert!(woken.try_recv().is_ok(), "the first record is alone");
        let second = lone.queued(|| 2);
        assert!(woken.try_recv().is_err(), "the second overlaps the first: it batches");
        drop(first);
        let third = lone.queued(|| 2);
        assert!(woken.try_recv().is_err(), "the second is still in flight");
        drop((second, third));
        let _fourth = lone.queued(|| unreachable!());
        assert!(
            woken.try_recv().is_ok(),
            "everything before it was answered (or dropped)"
        );
    }

    #[test]
    fn wake_ups_during_a_flush_collapse_into_one_and_a_gone_flusher_is_harmless() {
        let (lone, woken) = lone();
        drop(lone.queued(|| 1));
        drop(lone.queued(|| 1));
        assert!(woken.try_recv().is_ok());
        assert!(
            woken.try_recv().is_err(),
            "two wake-ups while the flusher was busy: one more flush"
        );
        drop(woken);
        drop(lone.queued(|| 1)); // the flushing thread is gone: the record waits the linger, nothing fails
        assert_eq!(lone.in_flight.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_record_whose_predecessor_was_delivered_but_not_yet_awaited_is_alone() {
        let (lone, woken) = lone();
        let held = lone.queued(|| 1);
        assert!(woken.try_recv().is_ok());
        // `held` was delivered (librdkafka counts only the new record) but its task has not run yet.
        let next = lone.queued(|| 1);
        assert!(woken.try_recv().is_ok(), "librdkafka says nothing else is outstanding");
        let crowd: Vec<InFlight> = (0..ASK_LIBRDKAFKA_BELOW).map(|_| lone.crowded()).collect();
        let many = lone.queued(|| unreachable!("many in flight: batching, librdkafka is not asked"));
        assert!(woken.try_recv().is_err());
        drop((held, next, crowd, many));
        assert_eq!(lone.in_flight.load(Ordering::Acquire), 0);
    }
}
