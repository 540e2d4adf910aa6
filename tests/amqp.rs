//! RabbitMQ-only behaviour, against the real server (`FERROSTREAM_TEST_AMQP`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`): exchanges and bindings, per-delivery acks under a slow
//! message, attempts counted by the broker with retries and dead letters on classic and quorum queues,
//! publishing (confirms, unroutable records, headers), graceful shutdown, and a connection the server
//! closes. The broker-neutral suites (`policy_table`, `settling`) run here too with
//! `FERROSTREAM_TEST_BROKER=amqp://...`. Without a reachable server these tests fail; they never skip.
#![cfg(feature = "amqp")]

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrostream::amqp::{Exchange, Queue};
use ferrostream::{AckPolicy, App, Attempt, Broker, Message, PublishError, RetryPolicy, RunningApp};
use tokio::sync::Notify;

fn url() -> String {
    std::env::var("FERROSTREAM_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The tests of this binary share one publisher connection (it is per process); the test that closes it
/// from the server runs alone, so no other test's publish meets the closure.
static SHARED_PUBLISHER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn broker() -> Broker {
    common::init_tracing();
    Broker::new(&url()).expect("amqp URL")
}

async fn start(broker: &Broker) -> RunningApp {
    App::new(broker.clone())
        .shutdown_timeout(Duration::from_secs(10))
        .start()
        .await
        .expect("app starts")
}

/// What the handlers saw, by payload.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl Seen {
    fn push(&self, s: String) {
        self.0.lock().unwrap().push(s);
    }
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// `rabbitmqctl list_queues`: (ready, unacknowledged) of a queue.
fn rabbitmqctl_counts(queue: &str) -> Option<(u64, u64)> {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .output()
        .expect("rabbitmqctl runs (it comes with the RabbitMQ server)");
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next()? == queue).then_some(())?;
        Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
    })
}

/// Closes, from the server side, every connection whose client-given name contains one of `names`;
/// returns how many.
fn close_connections(names: &[&str]) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "-q",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .expect("rabbitmqctl runs");
    let mut closed = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !names.iter().any(|n| line.contains(n)) {
            continue;
        }
        let Some(pid) = line.split_whitespace().next() else {
            continue;
        };
        let ok = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "closed by a ferrostream test"])
            .status()
            .is_ok_and(|s| s.success());
        closed += usize::from(ok);
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_exchange_routes_by_pattern_and_an_unroutable_publish_is_an_error() {
    let _shared = SHARED_PUBLISHER.read().await;
    let broker = broker();
    let (queue, exchange) = (common::unique("orders"), common::unique("events"));
    let seen = Seen::default();
    let s = seen.clone();
    broker
        .subscriber(&queue)
        .queue(Queue::transient().bind(Exchange::topic(&exchange).transient(), "order.*"))
        .ack_policy(AckPolicy::NackOnError)
        .handle(move |body: String| {
            let s = s.clone();
            async move { s.push(body) }
        });
    let observer = broker.observer();
    let app = start(&broker).await;
    broker
        .publish("created", "order.created")
        .exchange(&exchange)
        .await
        .unwrap();
    broker.publish("paid", "order.paid").exchange(&exchange).await.unwrap();
    let err = broker
        .publish("nobody listens", "user.created")
        .exchange(&exchange)
        .await
        .expect_err("no queue is bound for user.*");
    assert!(matches!(err, PublishError::Unroutable { .. }), "{err:?}");
    assert!(
        err.to_string().contains("user.created"),
        "the error names the routing key: {err}"
    );
    observer.wait_settled(&queue, 2, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    assert_eq!(seen.all(), ["created", "paid"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_and_headers_exchanges_route_to_their_bound_queues() {
    let _shared = SHARED_PUBLISHER.read().await;
    let broker = broker();
    let (fan, hdr) = (common::unique("fan"), common::unique("hdr"));
    let (a, b, invoices) = (common::unique("a"), common::unique("b"), common::unique("invoices"));
    let seen = Seen::default();
    for q in [&a, &b] {
        let s = seen.clone();
        let name = q.clone();
        broker
            .subscriber(q)
            .queue(Queue::transient().bind(Exchange::fanout(&fan).transient(), ""))
            .ack_policy(AckPolicy::Ack)
            .handle(move |body: String| {
                let (s, name) = (s.clone(), name.clone());
                async move { s.push(format!("{name}:{body}")) }
            });
    }
    let s = seen.clone();
    broker
        .subscriber(&invoices)
        .queue(Queue::transient().bind_headers(Exchange::headers(&hdr).transient(), [("kind", "invoice")], true))
        .ack_policy(AckPolicy::Ack)
        .handle(move |body: String| {
            let s = s.clone();
            async move { s.push(format!("invoices:{body}")) }
        });
    let observer = broker.observer();
    let app = start(&broker).await;
    broker.publish("hello", "ignored").exchange(&fan).await.unwrap();
    broker
        .publish("inv-1", "")
        .exchange(&hdr)
        .header("kind", "invoice")
        .await
        .unwrap();
    let err = broker
        .publish("receipt", "")
        .exchange(&hdr)
        .header("kind", "receipt")
        .await;
    assert!(matches!(err, Err(PublishError::Unroutable { .. })), "{err:?}");
    for q in [&a, &b, &invoices] {
        observer.wait_settled(q, 1, common::WAIT).await.unwrap();
    }
    app.shutdown().await.unwrap();
    let got: BTreeSet<String> = seen.all().into_iter().collect();
    let want: BTreeSet<String> = [format!("{a}:hello"), format!("{b}:hello"), "invoices:inv-1".to_owned()].into();
    assert_eq!(got, want);
}

/// Acks are per delivery: a message still running holds back no later ack (the broker itself shows one
/// unacknowledged message while the later ones are gone from the queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_message_never_delays_the_ack_of_a_later_one() {
    let _shared = SHARED_PUBLISHER.read().await;
    let broker = broker();
    let queue = common::unique("slow");
    broker.create_topic(&queue, 1).await.unwrap();
    let release = Arc::new(Notify::new());
    let r = release.clone();
    broker
        .subscriber(&queue)
        .max_in_flight(2)
        .ack_policy(AckPolicy::NackOnError)
        .handle(move |body: String| {
            let r = r.clone();
            async move {
                if body == "slow" {
                    r.notified().await;
                }
            }
        });
    let observer = broker.observer();
    let app = start(&broker).await;
    broker.publish("slow", &queue).await.unwrap();
    for i in 0..5 {
        broker.publish(format!("fast-{i}"), &queue).await.unwrap();
    }
    observer.wait_settled(&queue, 5, common::WAIT).await.unwrap();
    let deadline = tokio::time::Instant::now() + common::WAIT;
    let counts = loop {
        let c = rabbitmqctl_counts(&queue);
        if c == Some((0, 1)) || tokio::time::Instant::now() > deadline {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        counts,
        Some((0, 1)),
        "(ready, unacked): only the slow message is unacked"
    );
    release.notify_one();
    observer.wait_settled(&queue, 6, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    assert_eq!(broker.queue_depth(&queue).await.unwrap(), 0);
}

/// SPEC 3.12 on RabbitMQ: the attempt number comes from the broker (a quorum queue's delivery count, a
/// classic queue's attempt header), the backoff waits, and after the budget the message is published to
/// the dead-letter queue (confirmed) before the source delivery is acked.
async fn retries_then_dead_letters(queue_type: Queue) {
    let _shared = SHARED_PUBLISHER.read().await;
    let broker = broker();
    let queue = common::unique("retry");
    let dlt = format!("{queue}.dlt");
    let attempts: Arc<Mutex<Vec<u32>>> = Arc::default();
    let a = attempts.clone();
    broker
        .subscriber(&queue)
        .queue(queue_type)
        .ack_policy(AckPolicy::NackOnError)
        .retry(RetryPolicy::new(3).backoff(Duration::from_millis(20), Duration::from_millis(100)))
        .dead_letter(&dlt)
        .handle(move |body: String, Attempt(n): Attempt| {
            let a = a.clone();
            async move {
                if body == "poison" {
                    a.lock().unwrap().push(n);
                    return Err(std::io::Error::other("cannot process"));
                }
                Ok(())
            }
        });
    /// Body, attempts header and error header of a dead letter.
    type DeadLetter = (String, Option<String>, Option<String>);
    let dead: Arc<Mutex<Vec<DeadLetter>>> = Arc::default();
    let d = dead.clone();
    broker
        .subscriber(&dlt)
        .ack_policy(AckPolicy::Ack)
        .handle(move |body: String, msg: Message| {
            let d = d.clone();
            async move {
                let h = msg.headers();
                let get = |n: &str| h.get_str(n).map(str::to_owned);
                d.lock().unwrap().push((
                    body,
                    get(ferrostream::retry::headers::ATTEMPTS),
                    get(ferrostream::retry::headers::ERROR),
                ));
            }
        });
    let observer = broker.observer();
    let app = start(&broker).await;
    broker.publish("poison", &queue).await.unwrap();
    broker.publish("fine", &queue).await.unwrap();
    observer.wait_settled(&dlt, 1, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    assert_eq!(
        *attempts.lock().unwrap(),
        [1, 2, 3],
        "attempts counted across redeliveries"
    );
    let dead = dead.lock().unwrap().clone();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, "poison");
    assert_eq!(dead[0].1.as_deref(), Some("3"));
    assert!(
        dead[0].2.as_deref().is_some_and(|e| e.contains("cannot process")),
        "{dead:?}"
    );
    assert_eq!(
        common::unsettled(&broker, "", &queue, |n| n == 0).await,
        0,
        "the source message is acked once dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_counts_attempts_and_dead_letters_after_the_budget() {
    retries_then_dead_letters(Queue::durable().quorum()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_queue_counts_attempts_in_a_header_and_dead_letters_after_the_budget() {
    retries_then_dead_letters(Queue::transient()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_key_correlation_id_and_reply_to_round_trip() {
    let _shared = SHARED_PUBLISHER.read().await;
    let broker = broker();
    let queue = common::unique("props");
    broker.create_topic(&queue, 1).await.unwrap();
    let got: Arc<Mutex<Option<Message>>> = Arc::default();
    let g = got.clone();
    broker
        .subscriber(&queue)
        .ack_policy(AckPolicy::Ack)
        .handle(move |msg: Message| {
            let g = g.clone();
            async move { *g.lock().unwrap() = Some(msg) }
        });
    let observer = broker.observer();
    let app = start(&broker).await;
    let ack = broker
        .publish("body", &queue)
        .key("user-1")
        .header("tenant", "acme")
        .correlation_id("corr-7")
        .reply_to("answers")
        .await
        .unwrap();
    assert_eq!(ack.topic, queue);
    observer.wait_settled(&queue, 1, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    let msg = got.lock().unwrap().clone().expect("handled");
    assert_eq!(msg.payload().as_ref(), b"body");
    assert_eq!(msg.headers().get_str("tenant"), Some("acme"));
    assert_eq!(msg.key().map(|k| k.as_ref()), Some(&b"user-1"[..]));
    assert_eq!(msg.correlation_id(), Some("corr-7"));
    assert_eq!(msg.reply_to(), Some("answers"));
    assert_eq!(msg.topic(), queue);
    assert!(
        matches!(msg.coordinates(), ferrostream::Coordinates::Queue { queue: q, delivery_tag: 1 } if q == queue),
        "{:?}",
        msg.coordinates()
    );
    assert_eq!(msg.attempt(), 1);
}

/// SPEC 3.8 on RabbitMQ: shutdown lets the handler in flight finish and ack; what was delivered but not
/// handled goes back to the queue when the channel closes, so nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_what_runs_and_returns_the_rest_to_the_queue() {
    const N: usize = 40;
    let _shared = SHARED_PUBLISHER.read().await;
    let broker = broker();
    let queue = common::unique("drain");
    broker.create_topic(&queue, 1).await.unwrap();
    for i in 0..N {
        broker.publish(format!("m{i}"), &queue).await.unwrap();
    }
    let seen = Seen::default();
    let s = seen.clone();
    broker
        .subscriber(&queue)
        .ack_policy(AckPolicy::NackOnError)
        .handle(move |body: String| {
            let s = s.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                s.push(body);
            }
        });
    let observer = broker.observer();
    let app = start(&broker).await;
    observer.wait_settled(&queue, 5, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    let handled = seen.all().len();
    let acked = observer.settled(&queue).len();
    assert_eq!(handled, acked, "every handler that ran was acked");
    assert!(handled < N, "stopped mid-stream ({handled} of {N})");
    let left = common::unsettled(&broker, "", &queue, |n| n as usize == N - handled).await;
    assert_eq!(left as usize, N - handled, "the rest is back in the queue");
}

/// The server closes the connections (as on a broker restart, or an operator's `rabbitmqctl
/// close_connection`) in the middle of a stream: the consumer re-opens its channel with backoff, the
/// broker delivers again what was not acked, and every message is handled; publishing re-opens too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_by_the_server_is_reopened_and_nothing_is_lost() {
    const N: usize = 3000;
    // It closes this process's publisher connection, which the other tests here publish on: alone.
    let _alone = SHARED_PUBLISHER.write().await;
    let broker = broker();
    let queue = common::unique("reconnect");
    broker.create_topic(&queue, 1).await.unwrap();
    let acks = broker
        .publish_batch((0..N).map(|i| broker.publish(format!("m{i}"), &queue)))
        .await;
    assert!(acks.iter().all(Result::is_ok));
    let seen = Seen::default();
    let s = seen.clone();
    broker
        .subscriber(&queue)
        .ack_policy(AckPolicy::NackOnError)
        .handle(move |body: String| {
            let s = s.clone();
            async move {
                tokio::time::sleep(Duration::from_micros(200)).await;
                s.push(body);
            }
        });
    let observer = broker.observer();
    let app = start(&broker).await;
    observer.wait_settled(&queue, N / 5, common::WAIT).await.unwrap();
    // This test's consumer and this process's publishers only: the server is shared with other tests.
    let closed = close_connections(&[&queue, &format!("ferrostream publisher {}", std::process::id())]);
    assert!(closed >= 2, "closed {closed} connections");
    observer
        .wait_until(
            "every message handled after the reconnect",
            Duration::from_secs(60),
            |_| {
                let distinct: BTreeSet<String> = seen.all().into_iter().collect();
                (distinct.len() == N).then_some(())
            },
        )
        .await
        .unwrap();
    let assignments = observer
        .events()
        .iter()
        .filter(|e| matches!(e, ferrostream::Event::Assigned { .. }))
        .count();
    assert!(
        assignments >= 2,
        "the channel was re-opened ({assignments} assignments)"
    );
    broker
        .publish("after the reconnect", &queue)
        .await
        .expect("publishing re-opens its channel");
    observer
        .wait_until("the last message handled", common::WAIT, |_| {
            seen.all().iter().any(|b| b == "after the reconnect").then_some(())
        })
        .await
        .unwrap();
    app.shutdown().await.unwrap();
    let handled = seen.all();
    println!(
        "{} deliveries for {} messages: {} handled twice after the close",
        handled.len(),
        N + 1,
        handled.len() - (N + 1)
    );
    assert_eq!(common::unsettled(&broker, "", &queue, |n| n == 0).await, 0);
}

/// `AckFirst` acks runs of messages on receipt; when the connection is lost, those already acked are gone
/// from the broker, so they are still handled (the drain does not drop them), and the rest comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_first_still_handles_what_it_acked_when_the_connection_is_lost() {
    const N: usize = 1000;
    let _shared = SHARED_PUBLISHER.read().await;
    let broker = broker();
    let queue = common::unique("ackfirst-lost");
    broker.create_topic(&queue, 1).await.unwrap();
    let acks = broker
        .publish_batch((0..N).map(|i| broker.publish(format!("m{i}"), &queue)))
        .await;
    assert!(acks.iter().all(Result::is_ok));
    let seen = Seen::default();
    let s = seen.clone();
    broker
        .subscriber(&queue)
        .ack_policy(AckPolicy::AckFirst)
        .drain_timeout(Duration::from_secs(20))
        .handle(move |body: String| {
            let s = s.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                s.push(body);
            }
        });
    let observer = broker.observer();
    let app = start(&broker).await;
    observer
        .wait_until("a third handled", common::WAIT, |_| {
            (seen.all().len() >= N / 3).then_some(())
        })
        .await
        .unwrap();
    let lost_at = std::time::Instant::now();
    assert!(close_connections(&[&queue]) >= 1);
    observer
        .wait_until("every message handled", Duration::from_secs(60), |_| {
            let distinct: BTreeSet<String> = seen.all().into_iter().collect();
            (distinct.len() == N).then_some(())
        })
        .await
        .unwrap();
    let took = lost_at.elapsed();
    app.shutdown().await.unwrap();
    let handled = seen.all();
    println!(
        "{} handled for {N} messages, all within {took:?} of the loss",
        handled.len()
    );
    // Not waiting out the 20 s drain timeout: what was acked is handled at once, the rest comes back.
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert_eq!(common::unsettled(&broker, "", &queue, |n| n == 0).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_errors_are_typed() {
    let _shared = SHARED_PUBLISHER.read().await;
    let broker = broker();
    let missing = common::unique("missing");
    let err = broker.queue_depth(&missing).await.expect_err("no such queue");
    assert!(
        matches!(&err, ferrostream::AdminError::UnknownTopic { topic } if *topic == missing),
        "{err:?}"
    );
    let err = broker
        .committed_offsets("g", &missing)
        .await
        .expect_err("a queue keeps no offsets");
    assert!(matches!(err, ferrostream::AdminError::Unsupported { .. }), "{err:?}");
    let err = broker
        .create_topic(&missing, 3)
        .await
        .expect_err("a queue has no partitions");
    assert!(matches!(err, ferrostream::AdminError::Unsupported { .. }), "{err:?}");
    let err = broker
        .publish("x", &missing)
        .partition(1)
        .await
        .expect_err("a queue has no partitions");
    assert!(matches!(err, PublishError::Unsupported { .. }), "{err:?}");
    // The publishing channel survives the failed passive declaration above.
    let queue = common::unique("after");
    broker.create_topic(&queue, 1).await.unwrap();
    broker.publish("y", &queue).await.unwrap();
    assert_eq!(common::unsettled(&broker, "", &queue, |n| n == 1).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_fails_the_start_at_once_with_the_cause() {
    let broker = Broker::new("amqp://guest:s3cr3t-pw@127.0.0.1:1/%2f").unwrap();
    assert_eq!(
        broker.url(),
        "amqp://guest:***@127.0.0.1:1/%2f",
        "the password is never shown"
    );
    assert!(!format!("{broker:?}").contains("s3cr3t-pw"));
    broker.subscriber("nowhere").handle(|_: String| async {});
    let started = std::time::Instant::now();
    let err = App::new(broker).start().await.err().expect("nothing listens on port 1");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failed in {:?}",
        started.elapsed()
    );
    let text = err.to_string();
    assert!(text.contains("connect"), "the error says what failed: {text}");
    assert!(
        !text.contains("s3cr3t-pw") && !format!("{err:?}").contains("s3cr3t-pw"),
        "{err:?}"
    );
}
