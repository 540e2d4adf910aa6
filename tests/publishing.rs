//! SPEC 3.11: publishing with key, partition, headers, timestamp and correlation id, and publishing a
//! handler's result to the subscriber's `publish_to` topics.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use ferrostream::observe::Outcome;
use ferrostream::{Event, Message, Settle, SettledBy, State};

/// What a handler saw of each message it received.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    partition: i32,
    offset: i64,
    key: Option<String>,
    payload: String,
    headers: Vec<(String, String)>,
    timestamp: Option<i64>,
    correlation_id: Option<String>,
}

#[derive(Clone, Default)]
struct Inbox(Arc<Mutex<Vec<Seen>>>);

impl Inbox {
    fn all(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }
}

async fn record(msg: Message, State(inbox): State<Inbox>) {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    inbox.0.lock().unwrap().push(Seen {
        partition: msg.partition(),
        offset: msg.offset(),
        key: msg.key().map(|k| text(k)),
        payload: text(msg.payload()),
        headers: msg.headers().iter().map(|(n, v)| (n.to_owned(), text(v))).collect(),
        timestamp: msg.timestamp(),
        correlation_id: msg.correlation_id().map(str::to_owned),
    });
}

/// Subscribes `record` as `name` to `topic` in a fresh group.
fn subscribe_recorder(broker: &ferrostream::Broker, topic: &str, name: &str) {
    common::member(broker, topic, name, &common::unique("g"))
        .auto_commit(false)
        .handle(record);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_with_one_key_land_in_one_partition_in_publish_order() {
    common::init_tracing();
    let inbox = Inbox::default();
    let broker = common::broker().with_state(inbox.clone());
    let observer = broker.observer();
    let topic = common::topic(&broker, "pub-keys", 4).await;
    subscribe_recorder(&broker, &topic, "reader");
    let app = common::start(&broker).await;

    let keys = ["alpha", "beta", "gamma", "delta"];
    let mut acks: BTreeMap<&str, Vec<(i32, i64)>> = BTreeMap::new();
    for i in 0..10 {
        for key in keys {
            let ack = broker.publish(format!("{key}-{i}"), &topic).key(key).await.unwrap();
            assert_eq!(ack.topic, topic);
            acks.entry(key).or_default().push((ack.partition, ack.offset));
        }
    }
    observer.wait_handled("reader", 40, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();

    for (key, coords) in &acks {
        let partition = coords[0].0;
        assert!(
            coords.iter().all(|c| c.0 == partition),
            "{key} spread over partitions: {coords:?}"
        );
        assert!(
            coords.windows(2).all(|w| w[0].1 < w[1].1),
            "{key} out of order: {coords:?}"
        );
    }
    let seen = inbox.all();
    assert_eq!(seen.len(), 40);
    for key in keys {
        let of_key: Vec<&Seen> = seen.iter().filter(|s| s.key.as_deref() == Some(key)).collect();
        let payloads: Vec<&str> = of_key.iter().map(|s| s.payload.as_str()).collect();
        let expected: Vec<String> = (0..10).map(|i| format!("{key}-{i}")).collect();
        assert_eq!(payloads, expected, "{key} is received in publish order");
        let coords: Vec<(i32, i64)> = of_key.iter().map(|s| (s.partition, s.offset)).collect();
        assert_eq!(
            coords, acks[key],
            "the handler sees where the publish ack said {key} landed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_partition_overrides_the_key() {
    common::init_tracing();
    let inbox = Inbox::default();
    let broker = common::broker().with_state(inbox.clone());
    let observer = broker.observer();
    let topic = common::topic(&broker, "pub-partition", 4).await;
    subscribe_recorder(&broker, &topic, "reader");
    let app = common::start(&broker).await;

    for (i, key) in ["alpha", "beta", "gamma", "delta"].iter().enumerate() {
        let ack = broker
            .publish(format!("m{i}"), &topic)
            .key(*key)
            .partition(3)
            .await
            .unwrap();
        assert_eq!((ack.partition, ack.offset), (3, i as i64));
    }
    let ack = broker.publish("no key", &topic).partition(1).await.unwrap();
    assert_eq!((ack.partition, ack.offset), (1, 0));
    observer.wait_handled("reader", 5, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();

    let mut seen: Vec<(i32, i64, String)> = inbox
        .all()
        .into_iter()
        .map(|s| (s.partition, s.offset, s.payload))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (1, 0, "no key".to_owned()),
            (3, 0, "m0".to_owned()),
            (3, 1, "m1".to_owned()),
            (3, 2, "m2".to_owned()),
            (3, 3, "m3".to_owned()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_a_partition_that_does_not_exist_fails() {
    common::init_tracing();
    let broker = common::broker();
    let topic = common::topic(&broker, "pub-missing", 2).await;
    let result = tokio::time::timeout(common::WAIT, broker.publish("lost", &topic).partition(7))
        .await
        .expect("the publish resolves");
    let err = result.expect_err("partition 7 of a two-partition topic");
    assert!(
        matches!(err, ferrostream::PublishError::UnknownPartition { partition: 7, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains('7'), "the error names the partition: {err}");
    assert_eq!(
        broker.end_offsets(&topic).await.unwrap().values().sum::<i64>(),
        0,
        "nothing was written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_timestamp_and_correlation_id_reach_the_handler() {
    common::init_tracing();
    let inbox = Inbox::default();
    let broker = common::broker().with_state(inbox.clone());
    let observer = broker.observer();
    let topic = common::topic(&broker, "pub-headers", 1).await;
    subscribe_recorder(&broker, &topic, "reader");
    let app = common::start(&broker).await;

    const TIMESTAMP: i64 = 1_700_000_000_123;
    broker
        .publish("with everything", &topic)
        .key("user-1")
        .header("tenant", "acme")
        .header("tag", "first")
        .header("tag", "second")
        .timestamp(TIMESTAMP)
        .correlation_id("corr-42")
        .await
        .unwrap();
    let before = now_millis();
    broker.publish("plain", &topic).await.unwrap();
    let after = now_millis();
    observer.wait_handled("reader", 2, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();

    let seen = inbox.all();
    let full = seen.iter().find(|s| s.payload == "with everything").unwrap();
    assert_eq!(full.key.as_deref(), Some("user-1"));
    assert_eq!(full.timestamp, Some(TIMESTAMP));
    assert_eq!(full.correlation_id.as_deref(), Some("corr-42"));
    let user_headers: Vec<(&str, &str)> = full
        .headers
        .iter()
        .filter(|(n, _)| n != ferrostream::CORRELATION_ID)
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        user_headers,
        vec![("tenant", "acme"), ("tag", "first"), ("tag", "second")],
        "headers arrive in order, repeated names kept"
    );

    let plain = seen.iter().find(|s| s.payload == "plain").unwrap();
    assert_eq!(plain.key, None);
    assert!(plain.headers.is_empty(), "{:?}", plain.headers);
    assert_eq!(plain.correlation_id, None);
    let ts = plain.timestamp.expect("a default timestamp");
    // Broker clocks may differ a little from ours.
    assert!(
        (before - 5_000..=after + 5_000).contains(&ts),
        "default timestamp {ts} is the publish time ({before}..{after})"
    );
}

fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_result_is_published_to_the_out_topic_with_the_correlation_id() {
    common::init_tracing();
    let inbox = Inbox::default();
    let broker = common::broker().with_state(inbox.clone());
    let observer = broker.observer();
    let in_topic = common::topic(&broker, "pub-in", 1).await;
    let out_topic = common::topic(&broker, "pub-out", 1).await;
    let group = common::unique("g");
    common::member(&broker, &in_topic, "shouter", &group)
        .auto_commit(false)
        .publish_to(&out_topic)
        .handle(|body: String| async move { body.to_uppercase() });
    subscribe_recorder(&broker, &out_topic, "listener");
    let app = common::start(&broker).await;

    broker
        .publish("hello", &in_topic)
        .key("user-7")
        .correlation_id("corr-1")
        .await
        .unwrap();
    broker
        .publish("again", &in_topic)
        .correlation_id("corr-2")
        .await
        .unwrap();
    observer.wait_handled("listener", 2, common::WAIT).await.unwrap();
    observer.wait_settled("shouter", 2, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();

    let seen = inbox.all();
    let replies: Vec<(&str, Option<&str>)> = seen
        .iter()
        .map(|s| (s.payload.as_str(), s.correlation_id.as_deref()))
        .collect();
    assert_eq!(
        replies,
        vec![("HELLO", Some("corr-1")), ("AGAIN", Some("corr-2"))],
        "each result is published with the incoming correlation id"
    );
    let settles: Vec<(i64, Settle, SettledBy)> = observer
        .settled("shouter")
        .into_iter()
        .map(|s| (s.offset, s.settle, s.by))
        .collect();
    assert_eq!(
        settles,
        vec![(0, Settle::Ack, SettledBy::Policy), (1, Settle::Ack, SettledBy::Policy)]
    );
    // The handler call (which includes the acknowledged publish) ends before its message is settled.
    let events = observer.events();
    for offset in [0, 1] {
        let handled = events.iter().position(|e| {
            matches!(e, Event::Handled { subscriber, offset: o, outcome: Outcome::Ok, .. }
                if &**subscriber == "shouter" && *o == offset)
        });
        let settled = events.iter().position(
            |e| matches!(e, Event::Settled { subscriber, offset: o, .. } if &**subscriber == "shouter" && *o == offset),
        );
        assert!(
            handled.is_some() && handled < settled,
            "offset {offset}: handled at {handled:?}, settled at {settled:?}"
        );
    }
    assert_eq!(
        broker.end_offsets(&out_topic).await.unwrap().get(&0),
        Some(&2),
        "one result per message"
    );
    assert_eq!(
        broker.committed_offsets(&group, &in_topic).await.unwrap().get(&0),
        Some(&2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_is_refused_by_a_log_broker_and_queue_depth_is_not_a_log_s() {
    let broker = common::broker();
    let topic = common::topic(&broker, "pub-exchange", 1).await;
    let err = broker
        .publish("x", &topic)
        .exchange("events")
        .await
        .expect_err("exchanges are RabbitMQ's");
    assert!(matches!(err, ferrostream::PublishError::Unsupported { .. }), "{err:?}");
    let err = broker.queue_depth(&topic).await.expect_err("a log has no queue depth");
    assert!(
        matches!(err, ferrostream::AdminError::Unsupported { op: "queue_depth", .. }),
        "{err:?}"
    );
}

/// What Kafka refuses, `memory://` refuses too, with the same typed error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_illegal_topic_name_or_an_oversized_record_is_refused() {
    if !common::is_log() {
        return;
    }
    let broker = common::broker();
    let err = broker.publish("x", "orders/eu").await.expect_err("'/' is not allowed");
    assert!(
        matches!(&err, ferrostream::PublishError::InvalidTopic { topic, .. } if topic == "orders/eu"),
        "{err:?}"
    );
    let topic = common::topic(&broker, "big", 1).await;
    let err = broker
        .publish(vec![b'x'; 1_000_001], &topic)
        .await
        .expect_err("over the default maximum message size");
    assert!(
        matches!(err, ferrostream::PublishError::TooLarge { max: 1_000_000, .. }),
        "{err:?}"
    );
    broker
        .publish(vec![b'x'; 500_000], &topic)
        .await
        .expect("under the limit");
}

/// Kafka: a publish with nothing else in flight is sent at once, not after `linger.ms`, and publishes
/// that overlap it still land in publish order (one producer, one queue per partition).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_is_alone_skips_the_linger_and_overlapping_ones_keep_their_order() {
    if common::is_memory() || !common::is_log() {
        return;
    }
    // A linger no test could sit out unnoticed: a lone publish that waited it would take 3 s.
    let url = common::broker_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    let broker = ferrostream::Broker::new(&format!("{url}{sep}producer.linger.ms=3000")).unwrap();
    let topic = common::topic(&broker, "pub-lone", 1).await;

    for i in 0..5 {
        let sent = tokio::time::timeout(
            std::time::Duration::from_millis(1500),
            broker.publish(format!("lone-{i}"), &topic),
        )
        .await;
        sent.unwrap_or_else(|_| panic!("lone publish {i} waited out the 3 s linger"))
            .unwrap();
    }

    let publishes: Vec<_> = (0..200)
        .map(|i| std::future::IntoFuture::into_future(broker.publish(format!("burst-{i}"), &topic).key("k")))
        .collect();
    let acks = futures::future::join_all(publishes).await;
    let offsets: Vec<i64> = acks.into_iter().map(|a| a.unwrap().offset).collect();
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "overlapping publishes landed out of publish order: {offsets:?}"
    );
    assert_eq!(offsets[0], 5, "the burst follows the lone publishes");
}

/// A publish is sent when it is first polled, not when it is built or turned into a future: a dropped
/// future (a `select!` branch disabled by its condition, a cancelled task) publishes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_future_that_is_never_polled_sends_nothing() {
    if !common::is_log() {
        return;
    }
    let broker = common::broker();
    let topic = common::topic(&broker, "pub-lazy", 1).await;
    let unpolled = std::future::IntoFuture::into_future(broker.publish("never", &topic));
    let send_it = false;
    tokio::select! {
        ack = broker.publish("first", &topic) => assert_eq!(ack.unwrap().offset, 0),
        _ = unpolled, if send_it => unreachable!("a disabled branch is never polled"),
    }
    let ack = broker.publish("second", &topic).await.unwrap();
    assert_eq!(ack.offset, 1, "nothing but 'first' was published before");
}
