//! SPEC 3.10 batch subscribers and 3.11 `publish_batch`, on the broker under test.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrostream::{AckPolicy, Batch, Message, Settle, SettledBy, TopicPartition};

/// Publishes `n` messages "m0".."m{n-1}" to partition 0 with one `publish_batch`.
async fn publish_n(broker: &ferrostream::Broker, topic: &str, n: usize) {
    let acks = broker
        .publish_batch((0..n).map(|i| broker.publish(format!("m{i}"), topic).partition(0)))
        .await;
    let offsets: Vec<i64> = acks.into_iter().map(|a| a.expect("published").offset).collect();
    assert_eq!(
        offsets,
        (0..n as i64).collect::<Vec<_>>(),
        "publish_batch answers in input order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_hold_at_most_max_records_in_offset_order_and_commit_everything() {
    common::init_tracing();
    let broker = common::broker();
    let topic = common::topic(&broker, "batch", 1).await;
    let group = common::unique("g");
    let seen: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let record = seen.clone();
    common::member(&broker, &topic, "batch", &group)
        .auto_commit(false)
        .batch(10, Duration::from_millis(50))
        .handle(move |Batch(bodies): Batch<String>| {
            let record = record.clone();
            async move { record.lock().unwrap().push(bodies) }
        });
    let observer = broker.observer();
    let app = common::start(&broker).await;
    publish_n(&broker, &topic, 25).await;
    observer
        .wait_committed("batch", &TopicPartition::new(topic.as_str(), 0), 25, common::WAIT)
        .await
        .unwrap();
    app.shutdown().await.unwrap();
    let batches = seen.lock().unwrap().clone();
    assert!(
        batches.iter().all(|b| !b.is_empty() && b.len() <= 10),
        "sizes: {:?}",
        batches.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let flat: Vec<String> = batches.into_iter().flatten().collect();
    assert_eq!(flat, (0..25).map(|i| format!("m{i}")).collect::<Vec<_>>());
    assert_eq!(
        broker.committed_offsets(&group, &topic).await.unwrap().get(&0),
        Some(&25)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_batch_waits_for_the_batch_timeout() {
    common::init_tracing();
    const TIMEOUT: Duration = Duration::from_millis(300);
    let broker = common::broker();
    let topic = common::topic(&broker, "batch-wait", 1).await;
    let calls: Arc<Mutex<Vec<(Instant, usize)>>> = Arc::default();
    let record = calls.clone();
    common::member(&broker, &topic, "batch", &common::unique("g"))
        .auto_commit(false)
        .batch(100, TIMEOUT)
        .handle(move |Batch(bodies): Batch<String>| {
            let record = record.clone();
            async move { record.lock().unwrap().push((Instant::now(), bodies.len())) }
        });
    let observer = broker.observer();
    let app = common::start(&broker).await;
    let published = Instant::now();
    publish_n(&broker, &topic, 3).await;
    observer.wait_handled("batch", 3, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    let calls = calls.lock().unwrap().clone();
    let (first_call, _) = calls[0];
    assert!(
        first_call - published >= TIMEOUT,
        "a short batch ran after {:?}",
        first_call - published
    );
    assert_eq!(calls.iter().map(|c| c.1).sum::<usize>(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_batch_is_settled_whole_by_the_policy() {
    common::init_tracing();
    let broker = common::broker();
    let topic = common::topic(&broker, "batch-fail", 1).await;
    let group = common::unique("g");
    common::member(&broker, &topic, "batch", &group)
        .ack_policy(AckPolicy::RejectOnError)
        .batch(5, Duration::from_millis(50))
        .handle(|Batch(_): Batch<String>| async { Err::<(), _>(std::io::Error::other("the whole batch fails")) });
    let observer = broker.observer();
    let app = common::start(&broker).await;
    publish_n(&broker, &topic, 5).await;
    let settled = observer.wait_settled("batch", 5, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    assert!(
        settled
            .iter()
            .all(|s| s.settle == Settle::Reject && s.by == SettledBy::Policy),
        "{settled:?}"
    );
    assert_eq!(
        broker.committed_offsets(&group, &topic).await.unwrap().get(&0),
        Some(&5)
    );
    assert_eq!(broker.metrics().get("batch").handler_errors, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_handler_settles_messages_one_by_one_and_the_rest_together() {
    common::init_tracing();
    let broker = common::broker();
    let topic = common::topic(&broker, "batch-manual", 1).await;
    let group = common::unique("g");
    common::member(&broker, &topic, "batch", &group)
        .ack_policy(AckPolicy::Manual)
        .batch(6, Duration::from_millis(100))
        .handle(|messages: Batch<Message>| async move {
            for m in &messages.0 {
                if m.offset() % 2 == 1 {
                    let _ = m.reject().await;
                }
            }
            messages.ack_all().await;
        });
    let observer = broker.observer();
    let app = common::start(&broker).await;
    publish_n(&broker, &topic, 6).await;
    let settled = observer.wait_settled("batch", 6, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    for s in &settled {
        let expected = if s.offset % 2 == 1 { Settle::Reject } else { Settle::Ack };
        assert_eq!((s.settle, s.by), (expected, SettledBy::User), "offset {}", s.offset);
    }
    assert_eq!(
        broker.committed_offsets(&group, &topic).await.unwrap().get(&0),
        Some(&6)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_batch_is_delivered_again() {
    common::init_tracing();
    let broker = common::broker();
    let topic = common::topic(&broker, "batch-nack", 1).await;
    let group = common::unique("g");
    let calls: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let record = calls.clone();
    common::member(&broker, &topic, "batch", &group)
        .ack_policy(AckPolicy::NackOnError)
        .batch(4, Duration::from_millis(100))
        .handle(move |Batch(bodies): Batch<String>| {
            let record = record.clone();
            async move {
                let first = {
                    let mut c = record.lock().unwrap();
                    c.push(bodies);
                    c.len() == 1
                };
                if first {
                    Err(std::io::Error::other("first batch fails"))
                } else {
                    Ok(())
                }
            }
        });
    let observer = broker.observer();
    let app = common::start(&broker).await;
    publish_n(&broker, &topic, 4).await;
    observer
        .wait_committed("batch", &TopicPartition::new(topic.as_str(), 0), 4, common::WAIT)
        .await
        .unwrap();
    app.shutdown().await.unwrap();
    let calls = calls.lock().unwrap().clone();
    let all: Vec<String> = (0..4).map(|i| format!("m{i}")).collect();
    assert_eq!(calls[0], all, "the first call gets the whole batch");
    let redelivered: Vec<String> = calls[1..].iter().flatten().cloned().collect();
    assert_eq!(redelivered, all, "every nacked message comes back, in order, once");
}
