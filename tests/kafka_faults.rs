//! Fault injection on Kafka with librdkafka's in-process mock cluster: broker errors that a real broker
//! rarely produces on demand. These add to the real-broker suite; they never replace it.
#![cfg(feature = "kafka")]

mod common;
#[cfg(feature = "http")]
#[path = "common/web.rs"]
mod web;

use std::time::Duration;

use ferrostream::{AckPolicy, Broker, Settle, SettledBy, TopicPartition};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

/// librdkafka's in-process mock cluster with these one-partition topics, and its `kafka://` URL.
fn mock_cluster(topics: &[&str]) -> (MockCluster<'static, DefaultProducerContext>, String) {
    let cluster = MockCluster::new(1).expect("mock cluster");
    for t in topics {
        cluster.create_topic(t, 1, 1).expect("topic");
    }
    let url = format!("kafka://{}", cluster.bootstrap_servers());
    (cluster, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_commits_are_counted_and_retried_until_the_offset_lands() {
    common::init_tracing();
    let (cluster, url) = mock_cluster(&["orders"]);
    let broker = Broker::new(&url).unwrap();
    for i in 0..20 {
        broker.publish(format!("m{i}"), "orders").partition(0).await.unwrap();
    }
    // The first three commit requests fail; later ones succeed.
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE; 3],
    );
    common::member(&broker, "orders", "orders", "g")
        .auto_commit(false)
        .commit_interval(Duration::from_millis(20))
        .handle(|_: String| async {});
    let observer = broker.observer();
    let app = common::start(&broker).await;
    let tp = TopicPartition::new("orders", 0);
    observer.wait_committed("orders", &tp, 20, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    let metrics = broker.metrics().get("orders");
    assert!(metrics.commit_errors >= 1, "failed commits are counted: {metrics:?}");
    assert_eq!(
        observer.handled("orders").len(),
        20,
        "a failed commit redelivers nothing by itself"
    );
    assert_eq!(
        broker.committed_offsets("g", "orders").await.unwrap().get(&0),
        Some(&20)
    );
}

/// A message's attempt count survives a restart (guarantee 2.8): while it waits for its next attempt, the
/// group's commit of its offset carries its failed attempts in the commit's metadata, and the next life of
/// the group continues from there. Tested on librdkafka's mock cluster, which keeps commit metadata as
/// Apache Kafka does (nisshi 0.8.1, the real-broker suite's broker, drops it: there the count restarts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_count_survives_a_restart_in_the_commit_metadata() {
    use std::sync::{Arc, Mutex};
    common::init_tracing();
    let (_cluster, url) = mock_cluster(&["orders", "orders.dlt"]);
    let attempts: Arc<Mutex<Vec<(usize, u32)>>> = Arc::default();
    // One life of the service: a poison message fails every call, 4 calls at most, 1.5 s apart.
    let life = |n: usize| {
        let broker = Broker::new(&url).unwrap();
        let seen = attempts.clone();
        broker
            .subscriber("orders")
            .name("orders")
            .group_id("g")
            .ack_policy(AckPolicy::NackOnError)
            .auto_offset_reset(ferrostream::OffsetReset::Earliest)
            .retry(
                ferrostream::RetryPolicy::new(4)
                    .backoff(Duration::from_millis(1500), Duration::from_millis(1500))
                    .jitter(0.0),
            )
            .dead_letter("orders.dlt")
            .handle(move |msg: ferrostream::Message| {
                seen.lock().unwrap().push((n, msg.attempt()));
                async { Err::<(), _>(std::io::Error::other("poison")) }
            });
        broker
    };
    let first = life(1);
    first.publish("poison", "orders").partition(0).await.unwrap();
    let observer = first.observer();
    let app = common::start(&first).await;
    let tp = TopicPartition::new("orders", 0);
    // Two failed calls, and the commit that carries the second one's count (offset 0 committed again).
    observer
        .wait_until("two failed calls and a commit after them", common::WAIT, |events| {
            let failed = attempts.lock().unwrap().len();
            let commits = events
                .iter()
                .filter(|e| matches!(e, ferrostream::Event::Committed { tp: t, offset: 0, .. } if *t == tp))
                .count();
            (failed == 2 && commits >= 2).then_some(())
        })
        .await
        .unwrap();
    app.shutdown().await.unwrap();
    assert_eq!(
        *attempts.lock().unwrap(),
        [(1, 1), (1, 2)],
        "stopped during the backoff after call 2"
    );

    let second = life(2);
    let observer = second.observer();
    let app = common::start(&second).await;
    observer
        .wait_committed("orders", &tp, 1, Duration::from_secs(20))
        .await
        .expect("the poison message is dead-lettered and its offset committed");
    app.shutdown().await.unwrap();
    assert_eq!(
        *attempts.lock().unwrap(),
        [(1, 1), (1, 2), (2, 3), (2, 4)],
        "the second life continues the count: calls 3 and 4, then the dead letter (a restarted count would \
         call it 4 more times)"
    );
    assert_eq!(second.end_offsets("orders.dlt").await.unwrap().get(&0), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_result_publish_leaves_the_message_unsettled_until_it_succeeds() {
    common::init_tracing();
    let (cluster, url) = mock_cluster(&["in", "out"]);
    let broker = Broker::new(&url).unwrap();
    broker.publish("order-1", "in").await.unwrap();
    common::member(&broker, "in", "in", "g")
        .ack_policy(AckPolicy::NackOnError)
        .publish_to("out")
        .handle(|body: String| async move { format!("processed {body}") });
    // The result's first produce request is refused for good (not retriable by the producer).
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
    );
    let observer = broker.observer();
    let app = common::start(&broker).await;
    let settled = observer
        .wait_until("the result published and the message acked", common::WAIT, |_| {
            let s = observer.settled("in");
            s.iter().any(|s| s.settle == Settle::Ack).then_some(s)
        })
        .await
        .unwrap();
    app.shutdown().await.unwrap();
    // SPEC 3.11: publishing happens before the settle, so a failed publish is a handler error (nack under
    // NackOnError), and the message comes back until its result is published.
    let (last, failed) = settled.split_last().expect("settles");
    assert_eq!((last.settle, last.by), (Settle::Ack, SettledBy::Policy));
    assert!(!failed.is_empty(), "the refused publish nacked the message first");
    assert!(
        failed
            .iter()
            .all(|s| (s.settle, s.by) == (Settle::NACK, SettledBy::Policy)),
        "{settled:?}"
    );
    println!("settles: {settled:?}");
    assert_eq!(
        broker.end_offsets("out").await.unwrap().get(&0),
        Some(&1),
        "exactly one result published"
    );
    assert_eq!(broker.committed_offsets("g", "in").await.unwrap().get(&0), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_dead_letter_publish_leaves_the_source_uncommitted_until_it_succeeds() {
    common::init_tracing();
    let (cluster, url) = mock_cluster(&["orders", "orders.dlt"]);
    let broker = Broker::new(&url).unwrap();
    broker.publish("unbillable", "orders").await.unwrap();
    common::member(&broker, "orders", "orders", "g")
        .ack_policy(AckPolicy::NackOnError)
        .dead_letter("orders.dlt")
        .handle(|_: String| async { Err::<(), _>(ferrostream::RejectMessage) });
    // The first dead-letter produce request is refused for good.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
    );
    let observer = broker.observer();
    let app = common::start(&broker).await;
    observer
        .wait_committed("orders", &TopicPartition::new("orders", 0), 1, common::WAIT)
        .await
        .unwrap();
    app.shutdown().await.unwrap();
    let events = observer.events();
    let dead_lettered = events
        .iter()
        .position(|e| matches!(e, ferrostream::Event::DeadLettered { .. }));
    let committed = events
        .iter()
        .position(|e| matches!(e, ferrostream::Event::Committed { offset: 1, .. }))
        .expect("committed");
    assert!(
        dead_lettered.is_some_and(|d| d < committed),
        "the source offset was committed before its dead letter landed"
    );
    assert!(
        observer.handled("orders").len() >= 2,
        "the message came back after the failed dead-letter publish"
    );
    assert_eq!(
        broker.end_offsets("orders.dlt").await.unwrap().get(&0),
        Some(&1),
        "exactly one dead-letter record"
    );
    assert_eq!(broker.committed_offsets("g", "orders").await.unwrap().get(&0), Some(&1));
}

/// A broker that is not there fails the app's start within seconds, saying so, instead of waiting for the
/// group join's timeout while librdkafka floods the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_is_down_fails_the_start_in_seconds_with_the_cause() {
    common::init_tracing();
    // A port nothing listens on: bind one, then let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let broker = Broker::new(&format!("kafka://127.0.0.1:{port}")).unwrap();
    broker
        .subscriber("t")
        .group_id("g")
        .auto_commit(false)
        .handle(|_: String| async {});
    let started = std::time::Instant::now();
    let err = ferrostream::App::new(broker)
        .start()
        .await
        .err()
        .expect("nothing listens there");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "failed after {:?}",
        started.elapsed()
    );
    let text = err.to_string();
    assert!(
        text.contains("no Kafka broker answered") && text.contains("is it running"),
        "{text}"
    );
}

/// Issue 16, ready means ready: a publish while no broker answers fails with a typed timeout after the
/// delivery timeout (`message.timeout.ms`, 30 s by default; librdkafka's own default is 5 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_with_no_broker_fails_after_the_delivery_timeout() {
    let broker =
        Broker::kafka(ferrostream::kafka::KafkaConfig::new("127.0.0.1:1").set_producer("message.timeout.ms", "1500"))
            .unwrap();
    let started = std::time::Instant::now();
    let err = broker.publish("x", "orders").await.unwrap_err();
    assert!(
        matches!(err, ferrostream::PublishError::Timeout { timeout } if timeout == Duration::from_millis(1500)),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

/// Issue 14, health: `/health/ready` says not ready once the broker has not answered for the limit, and
/// ready again once it answers (librdkafka's mock cluster takes its broker down and up).
#[cfg(feature = "http")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_broker_going_away_and_coming_back() {
    common::init_tracing();
    let (mock, url) = mock_cluster(&["orders"]);
    let broker = Broker::new(&url).unwrap();
    broker
        .subscriber("orders")
        .group_id("g")
        .auto_commit(false)
        .auto_offset_reset(ferrostream::OffsetReset::Earliest)
        .handle(|_: String| async {});
    let app = ferrostream::App::new(broker)
        .http("127.0.0.1:0")
        .broker_down_limit(Duration::from_secs(2))
        .shutdown_timeout(Duration::from_secs(5))
        .start()
        .await
        .unwrap();
    let addr = app.http_addr().unwrap();
    let ready = |want: u16, why: &'static str| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
        loop {
            let (status, body) = web::http(addr, "GET", "/health/ready", None).await;
            if status == want {
                assert!(body.contains(why), "{body}");
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "/health/ready never answered {want}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    ready(200, "\"ready\":true").await;
    mock.broker_down(1).unwrap();
    ready(503, "has not answered").await;
    mock.broker_up(1).unwrap();
    ready(200, "\"ready\":true").await;
    let _ = app.shutdown().await;
}

/// librdkafka's error codes reach the user typed (`BrokerError::Kafka`: the code, its description and
/// what kind of failure it is), from a publish and from a refused commit (`HookEvent::CommitFailed`,
/// retried until it lands). (The mock cluster answers no CreateTopics: admin codes are unit-tested.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_errors_carry_their_kafka_code_and_kind() {
    use std::sync::{Arc, Mutex};

    use ferrostream::hooks::{Hook, HookEvent};
    use ferrostream::{BrokerError, KafkaErrorKind, PublishError};

    /// Each refused commit's kind and text.
    type Refusals = Vec<(Option<KafkaErrorKind>, String)>;
    #[derive(Clone, Default)]
    struct CommitErrors(Arc<Mutex<Refusals>>);
    impl Hook for CommitErrors {
        fn on_event(&self, event: &HookEvent<'_>) {
            if let HookEvent::CommitFailed { error, .. } = event {
                self.0.lock().unwrap().push((error.kafka_kind(), error.to_string()));
            }
        }
    }

    common::init_tracing();
    let (cluster, url) = mock_cluster(&["orders", "secret"]);
    let commit_errors = CommitErrors::default();
    let broker = Broker::new(&url).unwrap().with_hook(commit_errors.clone());

    // A produce request refused for good: the publish fails with the broker's code. (librdkafka then
    // fails that topic's records for a while: the rest of the test uses another topic.)
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
    );
    let refused = broker.publish("m", "secret").partition(0).await;
    let Err(PublishError::Broker(
        e @ BrokerError::Kafka {
            op: "publish",
            code: 29,
            ..
        },
    )) = &refused
    else {
        panic!("a refused produce is a typed Kafka error, got {refused:?}");
    };
    assert_eq!(e.kafka_kind(), Some(KafkaErrorKind::Authorization), "{e}");
    for i in 0..5 {
        broker.publish(format!("m{i}"), "orders").partition(0).await.unwrap();
    }

    // The first two commits are refused: each is reported with its kind, then the commit lands.
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED; 2],
    );
    common::member(&broker, "orders", "orders", "g")
        .commit_interval(Duration::from_millis(20))
        .handle(|_: String| async {});
    let observer = broker.observer();
    let app = common::start(&broker).await;
    observer
        .wait_committed("orders", &TopicPartition::new("orders", 0), 5, common::WAIT)
        .await
        .unwrap();
    app.shutdown().await.unwrap();
    let seen = commit_errors.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "each refused commit is reported once: {seen:?}");
    for (kind, text) in &seen {
        assert_eq!(*kind, Some(KafkaErrorKind::Authorization), "{text}");
        assert!(text.starts_with("commit: "), "{text}");
    }
}
