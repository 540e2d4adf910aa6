//! Request/reply on every broker (memory:// and, in the test command, Kafka): a request resolves to the
//! reply matched by correlation id, 1,000 concurrent requests get their own replies and leave nothing
//! waiting, a request nobody answers fails with a typed timeout.

mod common;

use std::time::{Duration, Instant};

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
