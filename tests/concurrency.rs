//! SPEC 3.6 and 3.1: with `max_in_flight(n)` several messages of a partition run at once, but never two
//! of one key (or two without a key), each key starts in offset order, and commits never pass an
//! unsettled offset whatever the completion order.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrostream::{Event, Message, Settle, State, TopicPartition};
use tokio::sync::Semaphore;

/// Watches handler calls: how many run at once, per key and overall, and in which order they start.
#[derive(Clone, Default)]
struct Tracker(Arc<TrackerInner>);

#[derive(Default)]
struct TrackerInner {
    running_by_key: Mutex<HashMap<Option<Vec<u8>>, usize>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
    /// (key, offset) in the order handlers started.
    starts: Mutex<Vec<(Option<Vec<u8>>, i64)>>,
    violations: Mutex<Vec<String>>,
}

impl Tracker {
    fn enter(&self, msg: &Message) {
        let key = msg.key().map(|k| k.to_vec());
        {
            let mut by_key = self.0.running_by_key.lock().unwrap();
            let n = by_key.entry(key.clone()).or_default();
            *n += 1;
            if *n > 1 {
                self.0.violations.lock().unwrap().push(format!(
                    "offset {} started while {} other message(s) of key {:?} ran",
                    msg.offset(),
                    *n - 1,
                    key
                ));
            }
        }
        self.0.starts.lock().unwrap().push((key, msg.offset()));
        let now = self.0.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.0.max_running.fetch_max(now, Ordering::SeqCst);
    }

    fn leave(&self, msg: &Message) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
        let key = msg.key().map(|k| k.to_vec());
        *self.0.running_by_key.lock().unwrap().entry(key).or_default() -= 1;
    }

    fn max_running(&self) -> usize {
        self.0.max_running.load(Ordering::SeqCst)
    }

    fn violations(&self) -> Vec<String> {
        self.0.violations.lock().unwrap().clone()
    }

    fn starts(&self) -> Vec<(Option<Vec<u8>>, i64)> {
        self.0.starts.lock().unwrap().clone()
    }
}

/// Simulates a little work so that handlers overlap.
async fn tracked(msg: Message, State(tracker): State<Tracker>) {
    tracker.enter(&msg);
    tokio::time::sleep(Duration::from_millis(2 + (msg.offset() % 3) as u64)).await;
    tracker.leave(&msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_messages_never_overlap_and_start_in_offset_order_while_other_keys_run_concurrently() {
    common::init_tracing();
    let tracker = Tracker::default();
    let broker = common::broker().with_state(tracker.clone());
    let observer = broker.observer();
    let topic = common::topic(&broker, "conc-keys", 1).await;
    let group = common::unique("g");
    // Everything is in the partition before the consumer starts, so the first fetch offers all keys.
    let mut offsets_by_key: HashMap<Option<Vec<u8>>, Vec<i64>> = HashMap::new();
    for i in 0..60 {
        let key = format!("k{}", i % 4);
        let ack = broker.publish(format!("m{i}"), &topic).key(key.clone()).await.unwrap();
        offsets_by_key
            .entry(Some(key.into_bytes()))
            .or_default()
            .push(ack.offset);
    }
    common::member(&broker, &topic, "keyed", &group)
        .auto_commit(false)
        .max_in_flight(8)
        .handle(tracked);
    let app = common::start(&broker).await;
    let settled = observer.wait_settled("keyed", 60, common::WAIT).await.unwrap();
    observer
        .wait_committed("keyed", &TopicPartition::new(topic.as_str(), 0), 60, common::WAIT)
        .await
        .unwrap();
    app.shutdown().await.unwrap();

    assert!(settled.iter().all(|s| s.settle == Settle::Ack), "{settled:?}");
    assert_eq!(tracker.violations(), Vec::<String>::new());
    let starts = tracker.starts();
    assert_eq!(starts.len(), 60, "each message handled once");
    let mut started_by_key: HashMap<Option<Vec<u8>>, Vec<i64>> = HashMap::new();
    for (key, offset) in starts {
        started_by_key.entry(key).or_default().push(offset);
    }
    assert_eq!(
        started_by_key, offsets_by_key,
        "per key, handlers start in offset order"
    );
    assert!(
        tracker.max_running() > 1,
        "max_in_flight(8) with four keys ran only {} handler at a time",
        tracker.max_running()
    );
    assert!(
        tracker.max_running() <= 4,
        "at most one per key: {}",
        tracker.max_running()
    );
    assert_eq!(
        broker.committed_offsets(&group, &topic).await.unwrap().get(&0),
        Some(&60)
    );
}

/// A gate the handler of offset 0 waits on.
#[derive(Clone)]
struct Gate(Arc<Semaphore>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_offset_never_commits_past_an_unsettled_earlier_one() {
    common::init_tracing();
    let gate = Gate(Arc::new(Semaphore::new(0)));
    let broker = common::broker().with_state(gate.clone());
    let observer = broker.observer();
    let topic = common::topic(&broker, "conc-gate", 1).await;
    let tp = TopicPartition::new(topic.as_str(), 0);
    let group = common::unique("g");
    for k in 0..4 {
        broker
            .publish(format!("m{k}"), &topic)
            .key(format!("k{k}"))
            .await
            .unwrap();
    }
    common::member(&broker, &topic, "gated", &group)
        .auto_commit(false)
        .max_in_flight(4)
        .handle(|msg: Message, State(Gate(gate)): State<Gate>| async move {
            if msg.offset() == 0 {
                let _permit = gate.acquire().await.expect("the gate is never closed");
            }
        });
    let app = common::start(&broker).await;

    let settled = observer.wait_settled("gated", 3, common::WAIT).await.unwrap();
    let mut offsets: Vec<i64> = settled.iter().map(|s| s.offset).collect();
    offsets.sort_unstable();
    assert_eq!(
        offsets,
        vec![1, 2, 3],
        "the later offsets complete while offset 0 waits"
    );
    assert!(settled.iter().all(|s| s.settle == Settle::Ack));
    observer
        .wait_until("a commit while offset 0 is in flight", common::WAIT, |ev| {
            ev.iter()
                .any(|e| matches!(e, Event::Committed { subscriber, .. } if &**subscriber == "gated"))
                .then_some(())
        })
        .await
        .unwrap();
    assert!(
        observer.committed("gated").get(&tp).is_none_or(|c| *c == 0),
        "committed past the unsettled offset 0: {:?}",
        observer.committed("gated")
    );
    assert!(
        broker
            .committed_offsets(&group, &topic)
            .await
            .unwrap()
            .get(&0)
            .is_none_or(|c| *c == 0),
        "the broker holds a commit past offset 0"
    );
    assert!(
        observer.settled("gated").iter().all(|s| s.offset != 0),
        "offset 0 is still running"
    );

    gate.0.add_permits(1);
    observer.wait_committed("gated", &tp, 4, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    assert_eq!(
        broker.committed_offsets(&group, &topic).await.unwrap().get(&0),
        Some(&4)
    );
    assert_eq!(observer.handled("gated").len(), 4, "nothing was handled twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_messages_run_one_at_a_time_in_offset_order_despite_max_in_flight() {
    common::init_tracing();
    let tracker = Tracker::default();
    let broker = common::broker().with_state(tracker.clone());
    let observer = broker.observer();
    let topic = common::topic(&broker, "conc-keyless", 1).await;
    let group = common::unique("g");
    for i in 0..12 {
        broker.publish(format!("m{i}"), &topic).partition(0).await.unwrap();
    }
    common::member(&broker, &topic, "keyless", &group)
        .auto_commit(false)
        .max_in_flight(4)
        .handle(tracked);
    let app = common::start(&broker).await;
    observer.wait_settled("keyless", 12, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();

    assert_eq!(tracker.violations(), Vec::<String>::new());
    assert_eq!(
        tracker.max_running(),
        1,
        "keyless messages of a partition are sequential"
    );
    let order: Vec<i64> = tracker.starts().into_iter().map(|(_, o)| o).collect();
    assert_eq!(order, (0..12).collect::<Vec<_>>());
    assert_eq!(
        broker.committed_offsets(&group, &topic).await.unwrap().get(&0),
        Some(&12)
    );
}
