//! Request/reply on every broker (memory:// and, in the test command, Kafka): a request resolves to the
//! reply matched by correlation id, 1,000 concurrent requests get their own replies and leave nothing
//! waiting, a request nobody answers fails with a typed timeout.

mod common;

use std::time::{Duration, Instant};

use ferrostream::observe::Outcome;
use ferrostream::{PublishError, Response};

/// A subscriber that answers `n` with `n * 2`, and one that answers nothing.
async fn doubling_service(prefix: &str) -> (ferrostream::Broker, String, String) {
    let broker = common::broker();
    let doubles = common::topic(
        &broker,
        &format!("{prefix}-double"),
        if common::is_log() { 2 } else { 1 },
    )
    .await;
    let silent = common::topic(&broker, &format!("{prefix}-silent"), 1).await;
    common::member(&broker, &doubles, "doubler", &common::unique("g"))
        .auto_commit(false)
        .max_in_flight(16)
        .handle(|body: String| async move {
            let n: u64 = body.parse()?;
            Ok::<_, std::num::ParseIntError>(Response::new((n * 2).to_string()).header("op", "double"))
        });
    common::member(&broker, &silent, "silent", &common::unique("g"))
        .auto_commit(false)
        .handle(|_: String| async {});
    (broker, doubles, silent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_resolves_to_the_reply_with_its_correlation_id_and_headers() {
    common::init_tracing();
    let (broker, doubles, silent) = doubling_service("rr-one").await;
    let app = common::start(&broker).await;
    let reply = broker
        .request("21", &doubles)
        .key("k")
        .timeout(common::WAIT)
        .await
        .unwrap();
    assert_eq!(reply.payload().as_ref(), b"42");
    assert_eq!(reply.headers().get_str("op"), Some("double"));
    assert!(reply.correlation_id().is_some());
    // A handler that returns nothing still answers: with an empty reply.
    let empty = broker.request("anything", &silent).timeout(common::WAIT).await.unwrap();
    assert!(empty.payload().is_empty());
    assert_eq!(broker.waiting_requests(), 0);
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_each_get_their_own_reply_and_nothing_leaks() {
    common::init_tracing();
    let (broker, doubles, _) = doubling_service("rr-many").await;
    let app = common::start(&broker).await;
    let requests = (0..1000u64).map(|i| {
        let broker = broker.clone();
        let doubles = doubles.clone();
        async move {
            let reply = broker
                .request(i.to_string(), &doubles)
                .key(format!("k{}", i % 7))
                .timeout(Duration::from_secs(60))
                .await?;
            Ok::<_, PublishError>((i, String::from_utf8_lossy(reply.payload()).into_owned()))
        }
    });
    let replies = futures::future::join_all(requests).await;
    let wrong: Vec<_> = replies
        .iter()
        .filter(|r| !matches!(r, Ok((i, body)) if *body == (i * 2).to_string()))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of 1000 wrong, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(3)]
    );
    assert_eq!(broker.waiting_requests(), 0, "every request stopped waiting");
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_nobody_answers_times_out_with_a_typed_error_and_stops_waiting() {
    common::init_tracing();
    let broker = common::broker();
    let nobody = common::topic(&broker, "rr-nobody", 1).await;
    let started = Instant::now();
    let err = broker
        .request("hello?", &nobody)
        .timeout(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(err, PublishError::NoReply { ref topic, .. } if *topic == nobody),
        "{err}"
    );
    assert!(err.to_string().contains("is a subscriber consuming"), "{err}");
    // The deadline, not a 30 s default (a generous bound: the first request also starts the reply
    // consumer).
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    assert_eq!(broker.waiting_requests(), 0);

    // A request whose future is dropped stops waiting too.
    let dropped = tokio::time::timeout(Duration::from_millis(50), broker.request("x", &nobody).into_future()).await;
    assert!(dropped.is_err());
    assert_eq!(broker.waiting_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_subscriber_replies_to_every_request_of_its_batch() {
    common::init_tracing();
    let broker = common::broker();
    let topic = common::topic(&broker, "rr-batch", 1).await;
    common::member(&broker, &topic, "batcher", &common::unique("g"))
        .auto_commit(false)
        .batch(50, Duration::from_millis(200))
        .handle(|ferrostream::Batch(bodies): ferrostream::Batch<String>| async move {
            format!("batch of {}", bodies.len())
        });
    let app = common::start(&broker).await;
    let requests = (0..5).map(|i| {
        broker
            .request(i.to_string(), &topic)
            .timeout(common::WAIT)
            .into_future()
    });
    let replies = futures::future::join_all(requests).await;
    for r in &replies {
        let r = r.as_ref().expect("every request of the batch got a reply");
        assert!(String::from_utf8_lossy(r.payload()).starts_with("batch of "));
    }
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_does_not_answer_the_original_request() {
    common::init_tracing();
    let broker = common::broker();
    let observer = broker.observer();
    let topic = common::topic(&broker, "rr-dl", 1).await;
    let dlt = common::topic(&broker, "rr-dl-dlt", 1).await;
    common::member(&broker, &topic, "failing", &common::unique("g"))
        .ack_policy(ferrostream::AckPolicy::NackOnError)
        .retry(ferrostream::RetryPolicy::new(1))
        .dead_letter(dlt.as_str())
        .handle(|_: String| async { Err::<String, _>(std::io::Error::other("no")) });
    // A subscriber of the dead-letter topic that returns a value: it must not reply to the requester.
    common::member(&broker, &dlt, "dlt-reader", &common::unique("g"))
        .auto_commit(false)
        .handle(|msg: ferrostream::Message| async move {
            assert!(msg.reply_to().is_none());
            assert!(
                msg.headers()
                    .get(ferrostream::retry::headers::ORIGINAL_REPLY_TO)
                    .is_some()
            );
            "from the dead-letter reader".to_owned()
        });
    let app = common::start(&broker).await;
    let request = broker
        .request("x", &topic)
        .timeout(Duration::from_secs(5))
        .into_future();
    let request = tokio::spawn(request);
    let handled = observer.wait_handled("dlt-reader", 1, common::WAIT).await.unwrap();
    assert_eq!(handled[0].3, Outcome::Ok, "the reader's own checks passed");
    let err = request.await.unwrap().unwrap_err();
    assert!(matches!(err, PublishError::NoReply { .. }), "{err}");
    app.shutdown().await.unwrap();
}

/// A hook that says when the last holder of it is gone: the broker and every engine it started (the
/// reply consumer's too) hold their broker's hooks.
struct GoneSignal(Option<tokio::sync::oneshot::Sender<()>>);

impl ferrostream::hooks::Hook for GoneSignal {
    fn on_event(&self, _: &ferrostream::hooks::HookEvent<'_>) {}
}

impl Drop for GoneSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

#[tokio::test]
async fn the_reply_consumer_stops_when_the_last_broker_handle_goes() {
    let (gone_tx, gone) = tokio::sync::oneshot::channel();
    let broker = ferrostream::Broker::new("memory://")
        .unwrap()
        .with_hook(GoneSignal(Some(gone_tx)));
    broker
        .subscriber("echo")
        .group_id("g")
        .auto_commit(false)
        .handle(|b: String| async move { b });
    // Neither publishers nor routers keep the broker alive.
    let _publisher = broker.publisher("audit");
    broker.include_router(ferrostream::Router::new("r."));
    let app = ferrostream::App::new(broker.clone()).start().await.unwrap();
    broker.request("hi", "echo").timeout(common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    drop(broker);
    tokio::time::timeout(common::WAIT, gone)
        .await
        .expect("the broker and its reply consumer went away")
        .unwrap();
}
