//! SPEC 3.12 / 3.3: retry budgets with backoff (blocking, in place) and dead-letter topics whose publish is
//! acknowledged before the source offset is committed. On the broker under test.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrostream::retry::headers;
use ferrostream::{AckPolicy, Attempt, Event, Headers, Json, Key, Message, RetryPolicy, StartError};

const BACKOFF: Duration = Duration::from_millis(40);

/// One handler call: partition, offset, payload, attempt, when.
type Call = (i32, i64, String, u32, Instant);
/// One dead-letter record: key, payload, headers.
type DeadLetter = (Option<bytes::Bytes>, String, Headers);

#[derive(Clone, Default)]
struct Calls(Arc<Mutex<Vec<Call>>>);

async fn poison_among_many(partitions: i32) {
    common::init_tracing();
    const N: usize = 200;
    let calls = Calls::default();
    let dead: Arc<Mutex<Vec<DeadLetter>>> = Arc::default();
    let broker = common::broker().with_state(calls.clone());
    let topic = common::topic(&broker, "retry", partitions).await;
    let dlt = common::topic(&broker, "retry-dlt", 1).await;
    let group = common::unique("g");
    common::member(&broker, &topic, "orders", &group)
        .ack_policy(AckPolicy::NackOnError)
        .retry(RetryPolicy::new(5).backoff(BACKOFF, Duration::from_secs(2)).jitter(0.0))
        .dead_letter(&dlt)
        .handle(|body: String, msg: Message, Attempt(n): Attempt, ferrostream::State(calls): ferrostream::State<Calls>| async move {
            calls.0.lock().unwrap().push((msg.partition(), msg.offset(), body.clone(), n, Instant::now()));
            if body == "poison" {
                return Err(std::io::Error::other("cannot bill this order"));
            }
            Ok(())
        });
    let seen = dead.clone();
    common::member(&broker, &dlt, "dlt", &common::unique("dlt"))
        .auto_commit(false)
        .handle(move |Key(key): Key, body: String, headers: Headers| {
            let seen = seen.clone();
            async move { seen.lock().unwrap().push((key, body, headers)) }
        });
    let observer = broker.observer();
    let app = common::start(&broker).await;
    let poison_at = N / 3;
    let acks = broker
        .publish_batch((0..N).map(|i| {
            let body = if i == poison_at {
                "poison".to_owned()
            } else {
                format!("order-{i}")
            };
            broker.publish(body, &topic).key(format!("customer-{}", i % 8))
        }))
        .await;
    let acks: Vec<_> = acks.into_iter().map(|a| a.expect("published")).collect();
    let poison = acks[poison_at].clone();

    observer.wait_handled("dlt", 1, common::WAIT).await.unwrap();
    let mut ends = broker.end_offsets(&topic).await.unwrap();
    ends.retain(|_, end| *end > 0);
    for (p, end) in &ends {
        let tp = ferrostream::TopicPartition::new(topic.as_str(), *p);
        observer
            .wait_committed("orders", &tp, *end, common::WAIT)
            .await
            .unwrap();
    }
    app.shutdown().await.unwrap();

    let calls = calls.0.lock().unwrap().clone();
    let attempts: Vec<&Call> = calls.iter().filter(|c| c.2 == "poison").collect();
    assert_eq!(
        attempts.iter().map(|c| c.3).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5],
        "exactly five attempts"
    );
    for (k, pair) in attempts.windows(2).enumerate() {
        let gap = pair[1].4 - pair[0].4;
        let backoff = BACKOFF * 2u32.pow(k as u32);
        assert!(
            gap >= backoff,
            "attempt {} came {gap:?} after the previous one, before its {backoff:?} backoff",
            k + 2
        );
    }
    // Every other message was handled successfully.
    let mut handled: BTreeMap<String, usize> = BTreeMap::new();
    for c in &calls {
        *handled.entry(c.2.clone()).or_default() += 1;
    }
    for i in (0..N).filter(|i| *i != poison_at) {
        assert!(
            handled.contains_key(&format!("order-{i}")),
            "order-{i} was never handled"
        );
    }
    // One dead-letter record, with the original key and payload and the coordinates of the failure.
    let dead = dead.lock().unwrap().clone();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let (key, body, h) = &dead[0];
    assert_eq!(key.as_deref(), Some(format!("customer-{}", poison_at % 8).as_bytes()));
    assert_eq!(body, "poison");
    assert!(
        h.get_str(headers::ERROR)
            .is_some_and(|e| e.contains("cannot bill this order")),
        "{h:?}"
    );
    assert_eq!(h.get_str(headers::ATTEMPTS), Some("5"));
    assert_eq!(h.get_str(headers::SOURCE_TOPIC), Some(topic.as_str()));
    assert_eq!(
        h.get_str(headers::SOURCE_PARTITION),
        Some(poison.partition.to_string().as_str())
    );
    assert_eq!(
        h.get_str(headers::SOURCE_OFFSET),
        Some(poison.offset.to_string().as_str())
    );
    assert_eq!(h.get_str(headers::SUBSCRIBER), Some("orders"));
    assert_eq!(h.get_str(headers::GROUP), Some(group.as_str()));
    for stamp in [headers::SOURCE_TIMESTAMP, headers::DEAD_LETTERED_AT] {
        let millis: i64 = h
            .get_str(stamp)
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("{stamp}: {h:?}"));
        assert!(
            millis > 1_600_000_000_000,
            "{stamp} is a timestamp in milliseconds: {millis}"
        );
    }
    // Blocking retries: the poison's later partition-mates are handled only after it was dead-lettered.
    let events = observer.events();
    let dead_lettered_at = events
        .iter()
        .position(|e| matches!(e, Event::DeadLettered { offset, tp, .. } if *offset == poison.offset && tp.partition == poison.partition))
        .expect("a DeadLettered event");
    let first_later = events.iter().position(|e| {
        matches!(e, Event::Handled { subscriber, tp, offset, .. }
            if &**subscriber == "orders" && tp.partition == poison.partition && *offset > poison.offset)
    });
    if let Some(first_later) = first_later {
        assert!(
            first_later > dead_lettered_at,
            "a later message of the poison's partition ran before it was dead-lettered"
        );
    }
    // And the committed offsets reach the end.
    assert_eq!(broker.committed_offsets(&group, &topic).await.unwrap(), ends);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_on_one_partition_is_tried_five_times_then_dead_lettered() {
    poison_among_many(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_on_four_partitions_is_tried_five_times_then_dead_lettered() {
    poison_among_many(4).await;
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Order {
    #[allow(dead_code)]
    id: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_that_cannot_decode_is_dead_lettered_without_retries() {
    common::init_tracing();
    let broker = common::broker();
    let topic = common::topic(&broker, "retry-decode", 1).await;
    let dlt = common::topic(&broker, "retry-decode-dlt", 1).await;
    let group = common::unique("g");
    common::member(&broker, &topic, "orders", &group)
        .ack_policy(AckPolicy::NackOnError)
        .retry(RetryPolicy::new(5).backoff(BACKOFF, Duration::from_secs(1)))
        .dead_letter(&dlt)
        .handle(|Json(_): Json<Order>| async {});
    let observer = broker.observer();
    let app = common::start(&broker).await;
    broker.publish("{not json", &topic).await.unwrap();
    broker.publish(r#"{"id": 7}"#, &topic).await.unwrap();
    let tp = ferrostream::TopicPartition::new(topic.as_str(), 0);
    observer.wait_committed("orders", &tp, 2, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    let calls = observer.handled("orders");
    assert_eq!(
        calls.iter().filter(|c| c.1 == 0).count(),
        1,
        "a decode failure is not retried"
    );
    assert_eq!(
        broker.end_offsets(&dlt).await.unwrap().get(&0),
        Some(&1),
        "one dead-letter record"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_with_ack_first_are_refused_at_startup() {
    let broker = common::broker();
    broker
        .subscriber("t")
        .group_id("g")
        .auto_commit(true)
        .retry(RetryPolicy::new(3))
        .handle(|_: String| async {});
    let err = match ferrostream::App::new(broker).start().await {
        Err(StartError::Config(e)) => e,
        Err(other) => panic!("expected a configuration error, got {other}"),
        Ok(_) => panic!("AckFirst with retries must not start"),
    };
    assert!(err.to_string().contains("AckFirst"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_blocking_retries_go_through_the_retry_topic_without_holding_the_partition() {
    common::init_tracing();
    const N: usize = 100;
    const POISON: usize = 10;
    const BACKOFF: Duration = Duration::from_millis(300);
    let calls = Calls::default();
    let broker = common::broker().with_state(calls.clone());
    let topic = common::topic(&broker, "nb-retry", 1).await;
    let dlt = common::topic(&broker, "nb-retry-dlt", 1).await;
    let group = common::unique("g");
    let retry_topic = format!("{topic}.{group}.retry");
    common::member(&broker, &topic, "orders", &group)
        .ack_policy(AckPolicy::NackOnError)
        .retry(RetryPolicy::new(4).backoff(BACKOFF, Duration::from_secs(5)).jitter(0.0).non_blocking())
        .dead_letter(&dlt)
        .handle(|body: String, msg: Message, Attempt(n): Attempt, ferrostream::State(calls): ferrostream::State<Calls>| async move {
            let on_retry_topic = i32::from(msg.topic() != msg.headers().get_str(headers::SOURCE_TOPIC).unwrap_or(msg.topic()));
            calls.0.lock().unwrap().push((on_retry_topic, msg.offset(), body.clone(), n, Instant::now()));
            if body == "poison" {
                return Err(std::io::Error::other("still failing"));
            }
            Ok(())
        });
    let dead: Arc<Mutex<Vec<Headers>>> = Arc::default();
    let seen = dead.clone();
    common::member(&broker, &dlt, "dlt", &common::unique("dlt"))
        .auto_commit(false)
        .handle(move |headers: Headers| {
            let seen = seen.clone();
            async move { seen.lock().unwrap().push(headers) }
        });
    let observer = broker.observer();
    let app = common::start(&broker).await;
    let acks = broker
        .publish_batch((0..N).map(|i| {
            let body = if i == POISON {
                "poison".to_owned()
            } else {
                format!("order-{i}")
            };
            broker.publish(body, &topic).partition(0)
        }))
        .await;
    assert!(acks.iter().all(Result::is_ok));
    let tp = ferrostream::TopicPartition::new(topic.as_str(), 0);
    observer
        .wait_committed("orders", &tp, N as i64, common::WAIT)
        .await
        .unwrap();
    observer
        .wait_until("the poison dead-lettered", common::WAIT, |events| {
            events
                .iter()
                .any(|e| matches!(e, Event::DeadLettered { .. }))
                .then_some(())
        })
        .await
        .unwrap();
    observer.wait_handled("dlt", 1, common::WAIT).await.unwrap();
    let retry_tp = ferrostream::TopicPartition::new(retry_topic.as_str(), 0);
    observer
        .wait_committed("orders.retry", &retry_tp, 3, common::WAIT)
        .await
        .unwrap();
    app.shutdown().await.unwrap();

    let calls = calls.0.lock().unwrap().clone();
    let poison: Vec<&Call> = calls.iter().filter(|c| c.2 == "poison").collect();
    assert_eq!(poison.iter().map(|c| c.3).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert_eq!(
        poison.iter().map(|c| c.0).collect::<Vec<_>>(),
        vec![0, 1, 1, 1],
        "retries come from the retry topic"
    );
    for (k, pair) in poison.windows(2).enumerate() {
        let gap = pair[1].4 - pair[0].4;
        assert!(gap >= BACKOFF * 2u32.pow(k as u32), "retry {} after {gap:?}", k + 2);
    }
    // Not held up: the rest of the partition was handled before the first retry.
    let last = calls
        .iter()
        .find(|c| c.2 == format!("order-{}", N - 1))
        .expect("last message handled");
    assert!(last.4 < poison[1].4, "the source partition waited for the retry");
    assert_eq!(
        broker.end_offsets(&topic).await.unwrap().get(&0),
        Some(&(N as i64)),
        "nothing republished to the source"
    );
    assert_eq!(broker.end_offsets(&retry_topic).await.unwrap().get(&0), Some(&3));
    assert_eq!(broker.end_offsets(&dlt).await.unwrap().get(&0), Some(&1));
    // The dead letter names the original coordinates, not the retry topic's.
    let dead = dead.lock().unwrap().clone();
    let h = &dead[0];
    assert_eq!(h.get_str(headers::ATTEMPTS), Some("4"));
    assert_eq!(h.get_str(headers::SOURCE_TOPIC), Some(topic.as_str()));
    assert_eq!(h.get_str(headers::SOURCE_OFFSET), Some(POISON.to_string().as_str()));
    assert_eq!(h.get_str(headers::SUBSCRIBER), Some("orders"));
    assert!(h.get_str(headers::FIRST_FAILURE).is_some(), "{h:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_default_retry_budget_applies_to_subscribers_without_their_own() {
    common::init_tracing();
    let broker = common::broker()
        .with_default_retry(RetryPolicy::new(3).backoff(Duration::from_millis(10), Duration::from_millis(50)));
    let topic = common::topic(&broker, "default-retry", 1).await;
    let group = common::unique("g");
    common::member(&broker, &topic, "orders", &group)
        .ack_policy(AckPolicy::NackOnError)
        .handle(|_: String| async { Err::<(), _>(std::io::Error::other("always")) });
    let observer = broker.observer();
    let app = common::start(&broker).await;
    broker.publish("poison", &topic).await.unwrap();
    // Three attempts, then rejected (no dead-letter topic): the offset is committed past it.
    let tp = ferrostream::TopicPartition::new(topic.as_str(), 0);
    observer.wait_committed("orders", &tp, 1, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    let settles: Vec<ferrostream::Settle> = observer.settled("orders").iter().map(|s| s.settle).collect();
    assert_eq!(settles.len(), 3, "{settles:?}");
    assert_eq!(settles.last(), Some(&ferrostream::Settle::Reject));
    assert_eq!(observer.handled("orders").len(), 3);
}
