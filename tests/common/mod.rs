//! Shared test setup: the broker under test is chosen by `FERROSTREAM_TEST_BROKER` (default
//! `memory://`), so the same tests run against the in-memory broker and a real Kafka-protocol broker.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ferrostream::{App, Broker, RunningApp};

/// Generous: a Kafka group join can take seconds.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn broker_url() -> String {
    std::env::var("FERROSTREAM_TEST_BROKER").unwrap_or_else(|_| "memory://".to_owned())
}

pub fn is_memory() -> bool {
    broker_url().starts_with("memory://")
}

/// A broker for one test. A requested real broker that cannot be reached fails the test loudly.
pub fn broker() -> Broker {
    let url = broker_url();
    Broker::new(&url).unwrap_or_else(|e| panic!("cannot use test broker {url}: {e}"))
}

/// A name no other test (or earlier run against the same broker) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        % 1_000_000_000;
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh topic with `partitions` partitions.
pub async fn topic(broker: &Broker, prefix: &str, partitions: i32) -> String {
    let t = unique(prefix);
    broker.create_topic(&t, partitions).await.expect("create topic");
    t
}

pub async fn start(broker: &Broker) -> RunningApp {
    App::new(broker.clone())
        .shutdown_timeout(Duration::from_secs(10))
        .start()
        .await
        .expect("app starts")
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// The setup most tests share: a subscriber named `name` in `group`, reading `topic` from the earliest
/// offset. Tests add their policy and handler.
pub fn member(broker: &Broker, topic: &str, name: &str, group: &str) -> ferrostream::SubscriberBuilder {
    broker
        .subscriber(topic)
        .name(name)
        .group_id(group)
        .auto_offset_reset(ferrostream::OffsetReset::Earliest)
}

/// Publishes `n` messages `{prefix}0..` keyed `key-{i % keys}` and returns where each landed (partition,
/// offset).
pub async fn publish_keyed(
    broker: &Broker,
    topic: &str,
    prefix: &str,
    n: usize,
    keys: usize,
) -> std::collections::BTreeSet<(i32, i64)> {
    let mut published = std::collections::BTreeSet::new();
    for i in 0..n {
        let ack = broker
            .publish(format!("{prefix}{i}"), topic)
            .key(format!("key-{}", i % keys))
            .await
            .unwrap();
        published.insert((ack.partition, ack.offset));
    }
    published
}

/// True when the broker under test is a log (memory, Kafka): offsets, partitions, per-partition order.
/// RabbitMQ (`amqp://`) is a queue: settles are per delivery, a nacked message goes back to the queue.
pub fn is_log() -> bool {
    !broker_url().starts_with("amqp://")
}

/// The settles of the message whose payload is `payload`, in order, matched through the handler calls
/// that saw it (an offset on a log, a delivery tag on RabbitMQ: each names one delivery).
pub fn settles_of_payload(
    observer: &ferrostream::Observer,
    subscriber: &str,
    payload: &str,
) -> Vec<(ferrostream::Settle, ferrostream::SettledBy)> {
    let deliveries: std::collections::BTreeSet<i64> = observer
        .handled(subscriber)
        .into_iter()
        .filter(|h| h.2 == payload)
        .map(|h| h.1)
        .collect();
    observer
        .settled(subscriber)
        .into_iter()
        .filter(|s| deliveries.contains(&s.offset))
        .map(|s| (s.settle, s.by))
        .collect()
}

/// How many messages of a one-partition topic were left unsettled once the app stopped, awaited until
/// `expected` holds (RabbitMQ puts a closed channel's unacked messages back asynchronously): on a log the
/// offsets the group has not committed, on RabbitMQ the messages back in the queue. Returns the last
/// count seen.
pub async fn unsettled(broker: &Broker, group: &str, topic: &str, expected: impl Fn(u64) -> bool) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = if !broker.url().starts_with("amqp://") {
            let end = broker.end_offsets(topic).await.unwrap().get(&0).copied().unwrap_or(0);
            let committed = broker
                .committed_offsets(group, topic)
                .await
                .unwrap()
                .get(&0)
                .copied()
                .unwrap_or(0);
            (end - committed) as u64
        } else {
            broker.queue_depth(topic).await.unwrap()
        };
        if expected(n) || tokio::time::Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `lines` lines of a log file, for a failing test's message.
pub fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
