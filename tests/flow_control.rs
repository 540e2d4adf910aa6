//! SPEC 3.6: memory stays bounded on a backlog: a partition whose records pile up behind its in-flight
//! limit stops fetching, and fetches again once its queue drains.

mod common;

use std::sync::Arc;

use ferrostream::{Event, State, TopicPartition};
use tokio::sync::Semaphore;

const BACKLOG: usize = 20_000;
const MAX_BUFFERED: usize = 1_000;

#[derive(Clone)]
struct Gate(Arc<Semaphore>);

/// A one-partition topic holding `BACKLOG` messages.
async fn backlog(broker: &ferrostream::Broker, prefix: &str) -> String {
    let topic = common::topic(broker, prefix, 1).await;
    let acks = broker
        .publish_batch((0..BACKLOG).map(|i| broker.publish(format!("m{i}"), &topic).partition(0)))
        .await;
    assert!(acks.iter().all(Result::is_ok));
    topic
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_behind_a_blocked_handler_pauses_fetching_and_stays_bounded() {
    common::init_tracing();
    let gate = Gate(Arc::new(Semaphore::new(0)));
    // On Kafka, librdkafka's own prefetch comes on top of ours: keep it small (and record batches, the
    // unit a fetch returns, small too) so the bound is visible.
    let url = if common::is_memory() {
        common::broker_url()
    } else {
        format!(
            "{}?consumer.queued.min.messages=1000&consumer.max.partition.fetch.bytes=65536&consumer.fetch.max.bytes=65536&consumer.message.max.bytes=65536&producer.batch.num.messages=500",
            common::broker_url()
        )
    };
    let broker = ferrostream::Broker::new(&url).unwrap().with_state(gate.clone());
    let topic = backlog(&broker, "flow").await;
    common::member(&broker, &topic, "slow", &common::unique("g"))
        .auto_commit(false)
        .max_buffered(MAX_BUFFERED)
        .handle(|State(Gate(gate)): State<Gate>| async move {
            // Blocks until the test opens the gate; then every later message passes at once.
            let _permit = gate.acquire().await.expect("gate open");
        });
    let observer = broker.observer();
    let app = common::start(&broker).await;

    // The first handler is blocked, so records pile up until fetching pauses.
    let paused_at = observer
        .wait_until("fetching paused", common::WAIT, |events| {
            events.iter().find_map(|e| match e {
                Event::FlowControl {
                    paused: true, buffered, ..
                } => Some(*buffered),
                _ => None,
            })
        })
        .await
        .unwrap();
    assert!(paused_at >= MAX_BUFFERED, "paused with {paused_at} buffered");
    gate.0.add_permits(BACKLOG);

    let tp = TopicPartition::new(topic.as_str(), 0);
    observer
        .wait_committed("slow", &tp, BACKLOG as i64, common::WAIT)
        .await
        .unwrap();
    app.shutdown().await.unwrap();

    let high = broker.metrics().get("slow").buffered_high_water as usize;
    // Records already fetched when the pause lands still arrive: on memory:// one fetch (512 records); on
    // Kafka the poll thread's batch and the two it may run ahead (3 x 1024), plus what librdkafka had
    // prefetched (queued.min.messages and one fetch of whole record batches). Nothing like the backlog.
    let bound = if common::is_memory() {
        MAX_BUFFERED + 512
    } else {
        MAX_BUFFERED + 3 * 1024 + 1000 + 1000
    };
    println!("buffered high water: {high} (limit {MAX_BUFFERED}, bound {bound}, backlog {BACKLOG})");
    assert!(high <= bound, "buffered {high} records for a limit of {MAX_BUFFERED}");
    let resumed = observer
        .events()
        .iter()
        .any(|e| matches!(e, Event::FlowControl { paused: false, .. }));
    assert!(resumed, "fetching resumed once the queue drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_paused_before_a_rebalance_fetches_again_after_it() {
    // librdkafka keeps an application-level pause across unassign/assign; the engine must not inherit it.
    common::init_tracing();
    const PER_PARTITION: usize = 1500;
    let gate = Gate(Arc::new(Semaphore::new(0)));
    let broker = common::broker().with_state(gate.clone());
    let topic = common::topic(&broker, "flow-rebalance", 2).await;
    for p in 0..2 {
        let acks = broker
            .publish_batch((0..PER_PARTITION).map(|i| broker.publish(format!("m{i}"), &topic).partition(p)))
            .await;
        assert!(acks.iter().all(Result::is_ok));
    }
    let group = common::unique("g");
    let member = |name: &str| {
        common::member(&broker, &topic, name, &group)
            .auto_commit(false)
            .max_buffered(100)
            .drain_timeout(std::time::Duration::from_millis(500))
    };
    member("first").handle(|State(Gate(gate)): State<Gate>| async move {
        let _permit = gate.acquire().await.expect("gate open");
    });
    let observer = broker.observer();
    let first = common::start(&broker).await;
    observer
        .wait_until("the first member paused", common::WAIT, |events| {
            events
                .iter()
                .any(|e| matches!(e, Event::FlowControl { paused: true, .. }))
                .then_some(())
        })
        .await
        .unwrap();
    // A second member joins: every partition of the first is revoked (its blocked handler misses the
    // drain deadline) and handed out again.
    member("second").handle(|State(Gate(gate)): State<Gate>| async move {
        let _permit = gate.acquire().await.expect("gate open");
    });
    let second = common::start(&broker).await;
    gate.0.add_permits(10 * PER_PARTITION);
    for p in 0..2 {
        let tp = TopicPartition::new(topic.as_str(), p);
        observer
            .wait_until(&format!("{tp} committed to the end"), common::WAIT, |_| {
                let c = observer.committed("first").get(&tp).copied().unwrap_or(0);
                let d = observer.committed("second").get(&tp).copied().unwrap_or(0);
                (c.max(d) >= PER_PARTITION as i64).then_some(())
            })
            .await
            .unwrap();
    }
    second.shutdown().await.unwrap();
    first.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_first_records_waiting_for_their_commit_stay_bounded_without_a_pause() {
    // Under AckFirst a record waits for the commit ahead of it, not for a handler: that wait must not
    // pause the partition (a librdkafka pause drops what it prefetched, and fetching stalls for tens of
    // milliseconds after the resume); the engine bounds it by taking no more records while the queue is
    // full.
    common::init_tracing();
    let broker = common::broker();
    let topic = backlog(&broker, "flow-af").await;
    common::member(&broker, &topic, "af", &common::unique("g"))
        .auto_commit(true)
        .max_buffered(MAX_BUFFERED)
        .handle(|_: String| async {});
    let observer = broker.observer();
    let app = common::start(&broker).await;
    observer.wait_handled("af", BACKLOG, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();

    let pauses = observer
        .events()
        .iter()
        .filter(|e| matches!(e, Event::FlowControl { paused: true, .. }))
        .count();
    assert_eq!(
        pauses, 0,
        "AckFirst paused fetching while records only waited for their commit"
    );
    let high = broker.metrics().get("af").buffered_high_water as usize;
    // The queue stops taking records at the limit; one transport batch may land on top of it.
    let batch = if common::is_memory() { 512 } else { 1024 };
    println!("buffered high water: {high} (limit {MAX_BUFFERED} + one batch of {batch})");
    assert!(
        high <= MAX_BUFFERED + batch,
        "buffered {high} records for a limit of {MAX_BUFFERED}"
    );
    let tp = TopicPartition::new(topic.as_str(), 0);
    assert_eq!(observer.committed("af").get(&tp), Some(&(BACKLOG as i64)));
}
