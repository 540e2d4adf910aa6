//! Offset commits whose results come straight back to the waiting engine, with no thread in between.
//!
//! Why: rdkafka's only way to wait for a commit's result is a synchronous `commit`, which blocks its
//! thread, so the engine ran it on tokio's blocking pool. That hop (a thread woken to start the commit,
//! a task woken when it returns) was about a third of a commit's round trip on a busy two-core machine,
//! and `AckFirst` waits for a commit before it dispatches a run (SPEC 3.4). Here a commit is sent with
//! `rd_kafka_commit_queue`, whose result librdkafka posts on a queue of ours; the queue calls back (from
//! librdkafka's own thread) when that result arrives, which wakes the waiting future, which then takes
//! the result without blocking.
//!
//! rdkafka has no safe API for this, hence `unsafe` (the crate's other such module is `fetch_queue`):
//! every call is a plain librdkafka call on a live handle, each justified where it is made.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::topic_partition_list::TopicPartitionList;
use tokio::sync::Notify;

use crate::error::BrokerError;
use crate::offset::TopicPartition;

/// The queue, owned: destroyed once, by [`CommitQueue::close`] (or drop).
struct Handle(NonNull<rd::rd_kafka_queue_t>);

// SAFETY: librdkafka queues are thread-safe (every operation takes the queue's own lock).
unsafe impl Send for Handle {}

type Code = rd::rd_kafka_resp_err_t;

struct State {
    /// `None` once closed.
    queue: Option<Handle>,
    /// Each commit whose future is alive, by tag, with its result once that has been taken off the queue
    /// (by whichever waiter got there first). Results of other commits are dropped: nobody waits for them.
    waiting: HashMap<usize, Option<Result<(), BrokerError>>>,
}

struct Shared {
    state: Mutex<State>,
    /// Woken by librdkafka when a result lands on the (empty) queue, and by `close`. Every waiter registers
    /// before it looks at the queue and every wake-up wakes them all, so none is missed, however many wait.
    arrived: Notify,
    next_tag: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a queue handle and a map, each left whole by any panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Commits on one consumer, each awaited without blocking a thread. Close it (or drop it) before the
/// consumer is destroyed: a queue must not outlive its client.
pub(crate) struct CommitQueue {
    /// Also what the queue's callback points at: `close` (at the latest, from `Drop`, before this field is
    /// dropped) removes the callback first.
    shared: Arc<Shared>,
}

/// Runs on a librdkafka thread, with the queue's lock held, when a result lands on the empty queue: it
/// only wakes the waiters.
unsafe extern "C" fn on_result(_rk: *mut rd::rd_kafka_t, opaque: *mut c_void) {
    // SAFETY: `opaque` points at the `Shared` its `CommitQueue` owns; `close` removes this callback (under
    // this same queue lock) before that `CommitQueue` can drop its reference.
    let shared = unsafe { &*opaque.cast::<Shared>() };
    shared.arrived.notify_waiters();
}

impl CommitQueue {
    /// A new, empty queue on this consumer's client.
    pub(crate) fn new<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> Option<Self> {
        // SAFETY: the client handle is live (we hold the consumer); the new queue is ours to destroy.
        let ptr = NonNull::new(unsafe { rd::rd_kafka_queue_new(consumer.client().native_ptr()) })?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: Some(Handle(ptr)),
                waiting: HashMap::new(),
            }),
            arrived: Notify::new(),
            next_tag: AtomicUsize::new(1),
        });
        let opaque = Arc::as_ptr(&shared).cast_mut().cast::<c_void>();
        // SAFETY: a live queue; `opaque` stays valid until `close` removes the callback (see `on_result`).
        unsafe { rd::rd_kafka_queue_cb_event_enable(ptr.as_ptr(), Some(on_result), opaque) };
        Some(CommitQueue { shared })
    }

    /// Sends a commit of `offsets` now and returns a future for its result. The consumer must be live for
    /// this call (it is: the caller holds it). Dropping the future does not cancel the commit.
    pub(crate) fn commit<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        offsets: &TopicPartitionList,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send + 'static {
        let tag = self.shared.next_tag.fetch_add(1, Ordering::Relaxed);
        let sent = {
            let mut state = self.shared.lock();
            state.waiting.insert(tag, None);
            match state.queue.as_ref() {
                // SAFETY: live client and queue (held under the lock); librdkafka copies the list. The
                // tag is only an integer carried back with the result, never dereferenced.
                Some(q) => unsafe {
                    rd::rd_kafka_commit_queue(
                        consumer.client().native_ptr(),
                        offsets.ptr(),
                        q.0.as_ptr(),
                        None,
                        tag as *mut c_void,
                    )
                },
                None => Code::RD_KAFKA_RESP_ERR__DESTROY,
            }
        };
        // Registered before the commit was sent, so its result is kept for it from the start.
        let waiter = Waiter {
            shared: self.shared.clone(),
            tag,
        };
        async move {
            if sent != Code::RD_KAFKA_RESP_ERR_NO_ERROR {
                return Err(commit_error(sent));
            }
            loop {
                let arrived = waiter.shared.arrived.notified();
                let mut arrived = std::pin::pin!(arrived);
                // Listening before looking: a result that lands after the look wakes this wait.
                arrived.as_mut().enable();
                if let Some(result) = waiter.shared.take(waiter.tag) {
                    return result;
                }
                arrived.await;
            }
        }
    }

    /// Destroys the queue; a commit still waiting fails. Idempotent.
    pub(crate) fn close(&self) {
        let taken = self.shared.lock().queue.take();
        if let Some(h) = taken {
            // SAFETY: taken out under the lock, so no other call uses it any more. Removing the callback
            // takes the queue's lock, so no callback is running or can start once it returns. A result
            // that arrives later finds the queue disabled and is freed by librdkafka (the pending commit
            // holds its own reference to the queue).
            unsafe {
                rd::rd_kafka_queue_cb_event_enable(h.0.as_ptr(), None, std::ptr::null_mut());
                rd::rd_kafka_queue_destroy(h.0.as_ptr());
            }
        }
        self.shared.arrived.notify_waiters();
    }
}

impl Drop for CommitQueue {
    fn drop(&mut self) {
        self.close();
    }
}

/// A commit's claim on its result: given up when its future is dropped.
struct Waiter {
    shared: Arc<Shared>,
    tag: usize,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.shared.lock().waiting.remove(&self.tag);
    }
}

impl Shared {
    /// The result of commit `tag`, if it has arrived (or an error once the queue is closed). Takes every
    /// result waiting on the queue, keeping those of live commits for their own waiters.
    ///
    /// A result librdkafka marks `__DESTROY` (the client terminating) never reaches the queue; the client
    /// only terminates after `close`, which fails every waiter.
    fn take(&self, tag: usize) -> Option<Result<(), BrokerError>> {
        let mut state = self.lock();
        let State { queue, waiting } = &mut *state;
        if let Some(q) = queue.as_ref() {
            // SAFETY: a live queue (held under the lock); a zero timeout never blocks. Each event is ours
            // to destroy.
            while let Some(ev) = NonNull::new(unsafe { rd::rd_kafka_queue_poll(q.0.as_ptr(), 0) }) {
                let ev = Event(ev);
                // SAFETY: `ev` is a live event until it is dropped at the end of this iteration.
                unsafe {
                    if rd::rd_kafka_event_type(ev.0.as_ptr()) != rd::RD_KAFKA_EVENT_OFFSET_COMMIT {
                        continue;
                    }
                    let of = rd::rd_kafka_event_opaque(ev.0.as_ptr()) as usize;
                    if let Some(slot) = waiting.get_mut(&of) {
                        *slot = Some(commit_result(ev.0.as_ptr()));
                    }
                }
            }
        }
        match waiting.get_mut(&tag).and_then(Option::take) {
            Some(result) => Some(result),
            None if queue.is_none() => Some(Err(commit_error(Code::RD_KAFKA_RESP_ERR__DESTROY))),
            None => None,
        }
    }
}

/// An event taken from the queue, destroyed on drop.
struct Event(NonNull<rd::rd_kafka_event_t>);

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: owned, destroyed once.
        unsafe { rd::rd_kafka_event_destroy(self.0.as_ptr()) };
    }
}

/// The commit's result. A partition whose offset was not stored has not been committed, whatever the
/// request's outcome: when some partitions were committed and others refused, the error is a
/// [`BrokerError::PartialCommit`] naming the refused ones (the others are confirmed); otherwise the
/// overall error, else the first partition's.
///
/// # Safety
/// `ev` must be a live offset-commit event.
unsafe fn commit_result(ev: *mut rd::rd_kafka_event_t) -> Result<(), BrokerError> {
    // SAFETY: the caller's contract; the partition list and its topic names belong to the event.
    let (overall, refused, total) = unsafe {
        let list = rd::rd_kafka_event_topic_partition_list(ev);
        let elems = if list.is_null() || (*list).cnt <= 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts((*list).elems, usize::try_from((*list).cnt).unwrap_or(0))
        };
        let refused: Vec<(TopicPartition, Code)> = elems
            .iter()
            .filter(|e| e.err != Code::RD_KAFKA_RESP_ERR_NO_ERROR)
            .map(|e| {
                let topic = std::ffi::CStr::from_ptr(e.topic).to_string_lossy();
                (TopicPartition::new(topic.as_ref(), e.partition), e.err)
            })
            .collect();
        (rd::rd_kafka_event_error(ev), refused, elems.len())
    };
    if !refused.is_empty() && refused.len() < total {
        return Err(BrokerError::PartialCommit {
            refused: refused
                .into_iter()
                .map(|(tp, code)| (tp, rdkafka::error::RDKafkaErrorCode::from(code).to_string()))
                .collect(),
        });
    }
    match (overall, refused.first()) {
        (Code::RD_KAFKA_RESP_ERR_NO_ERROR, None) => Ok(()),
        (Code::RD_KAFKA_RESP_ERR_NO_ERROR, Some((_, code))) => Err(commit_error(*code)),
        (code, _) => Err(commit_error(code)),
    }
}

fn commit_error(err: Code) -> BrokerError {
    super::code_error("commit", rdkafka::error::RDKafkaErrorCode::from(err))
}

#[cfg(test)]
mod tests {
    use rdkafka::consumer::DefaultConsumerContext;
    use rdkafka::topic_partition_list::Offset;

    use super::*;
    use crate::kafka::{KafkaBackend, KafkaConfig};

    /// The real broker the Kafka tests run against (scripts/test.sh starts one).
    fn bootstrap() -> String {
        let url = std::env::var("FERROSTREAM_TEST_BROKER").unwrap_or_default();
        let Some(hosts) = url.strip_prefix("kafka://") else {
            panic!(
                "these tests need a real Kafka-protocol broker: export FERROSTREAM_TEST_BROKER=$(scripts/kafka-broker.sh start)"
            );
        };
        hosts.to_owned()
    }

    fn offsets(topic: &str, of: &[(i32, i64)]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for &(p, o) in of {
            tpl.add_partition_offset(topic, p, Offset::Offset(o))
                .expect("valid offset");
        }
        tpl
    }

    #[tokio::test]
    async fn each_commit_gets_its_own_result_even_beside_a_parked_one_and_a_closed_queue_fails_commits() {
        let config = KafkaConfig::new(bootstrap());
        let backend = KafkaBackend::new(config.clone()).expect("backend");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos();
        let (topic, group) = (format!("commit-queue-{nanos}"), format!("commit-queue-{nanos}"));
        backend.create_topic(&topic, 2).await.expect("topic");
        let consumer: BaseConsumer<DefaultConsumerContext> = config
            .consumer_config(&group, None, crate::OffsetReset::Earliest)
            .create()
            .expect("consumer");
        let queue = CommitQueue::new(&consumer).expect("queue");

        // Sent, then abandoned: its result must not be taken for the next commit's.
        drop(queue.commit(&consumer, &offsets(&topic, &[(0, 5)])));
        let deadline = std::time::Duration::from_secs(10);
        tokio::time::timeout(deadline, queue.commit(&consumer, &offsets(&topic, &[(0, 7), (1, 3)])))
            .await
            .expect("the commit's result arrives")
            .expect("the commit succeeds");
        tokio::time::timeout(deadline, queue.commit(&consumer, &offsets(&topic, &[(1, 4)])))
            .await
            .expect("the commit's result arrives")
            .expect("the commit succeeds");
        let committed = backend.committed(&group, &topic).await.expect("committed offsets");
        assert_eq!(committed, [(0, 7), (1, 4)].into_iter().collect());

        // A commit parked mid-wait (as the engine leaves its in-flight commit when a drain deadline passes)
        // must not swallow the wake-up of a later commit, nor lose its own result.
        let mut parked = Box::pin(queue.commit(&consumer, &offsets(&topic, &[(0, 8)])));
        let _ = futures::poll!(parked.as_mut());
        tokio::time::timeout(deadline, queue.commit(&consumer, &offsets(&topic, &[(0, 9), (1, 5)])))
            .await
            .expect("a later commit's result reaches it while an earlier one is parked")
            .expect("the commit succeeds");
        tokio::time::timeout(deadline, parked)
            .await
            .expect("the parked commit's result was kept for it")
            .expect("the commit succeeds");
        let committed = backend.committed(&group, &topic).await.expect("committed offsets");
        assert_eq!(committed, [(0, 9), (1, 5)].into_iter().collect());

        queue.close();
        let after = queue.commit(&consumer, &offsets(&topic, &[(0, 11)])).await;
        assert!(
            matches!(after, Err(BrokerError::Kafka { op: "commit", .. })),
            "a commit on a closed queue fails with a typed error, got {after:?}"
        );
        assert_eq!(
            backend.committed(&group, &topic).await.expect("committed offsets")[&0],
            9
        );
    }
}
