//! The test client (`ferrostream::testing::TestApp`): the same test on memory:// and, with
//! `FERROSTREAM_TEST_BROKER` set, on a real broker (the test command runs it on Kafka).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ferrostream::observe::Outcome;
use ferrostream::testing::TestApp;
use ferrostream::{AckPolicy, Json, RetryPolicy, Settle};

#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct Order {
    id: u64,
    total: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_awaits_results_reads_publishes_and_waits_for_finished_messages_not_retries() {
    common::init_tracing();
    let broker = common::broker();
    let orders = common::topic(&broker, "tc-orders", 1).await;
    let invoices = common::topic(&broker, "tc-invoices", 1).await;
    let dlt = common::topic(&broker, "tc-dlt", 1).await;
    let failures = Arc::new(AtomicU32::new(0));
    let f = failures.clone();
    common::member(&broker, &orders, "billing", &common::unique("g"))
        .ack_policy(AckPolicy::NackOnError)
        .retry(RetryPolicy::new(3).backoff(Duration::from_millis(20), Duration::from_millis(20)))
        .dead_letter(dlt.as_str())
        .publish_to(invoices.as_str())
        .handle(move |Json(order): Json<Order>| {
            let f = f.clone();
            async move {
                // Order 2 fails twice, then succeeds; order 3 never does.
                if (order.id == 2 && f.fetch_add(1, Ordering::SeqCst) < 2) || order.id == 3 {
                    return Err(std::io::Error::other(format!("cannot bill {}", order.id)));
                }
                Ok(format!("invoice {} for {}", order.id, order.total))
            }
        });
    let app = TestApp::start(broker).await.unwrap().timeout(common::WAIT);

    // Publish and await the handler's result.
    let reply = app.request(Json(Order { id: 1, total: 30 }), &orders).await.unwrap();
    assert_eq!(reply.payload().as_ref(), b"invoice 1 for 30");

    // A message that is retried is finished only when its last attempt settles it.
    app.publish(Json(Order { id: 2, total: 5 }), &orders).await.unwrap();
    let finished = app.wait_finished("billing", 2).await.unwrap();
    assert_eq!(
        finished.iter().map(|m| m.settle).collect::<Vec<_>>(),
        [Settle::Ack, Settle::Ack]
    );
    let calls = app.calls("billing");
    assert_eq!(calls.len(), 4, "1 + three attempts of order 2: {calls:?}");
    assert!(matches!(calls[1].outcome, Outcome::Failed { .. }));
    assert_eq!(calls[3].outcome, Outcome::Ok);

    // A message that fails for good is finished once its dead letter is confirmed.
    app.publish(Json(Order { id: 3, total: 1 }), &orders).await.unwrap();
    let finished = app.wait_finished("billing", 3).await.unwrap();
    assert_eq!(finished[2].settle, Settle::Reject);
    let dead = app.published(&dlt);
    assert_eq!(
        dead.len(),
        1,
        "the dead letter is published before the reject is finished"
    );
    assert_eq!(dead[0].payload.as_ref(), br#"{"id":3,"total":1}"#);

    // What the app published: the results (the request's reply and publish_to), in order.
    let billed: Vec<_> = app.published(&invoices).into_iter().map(|p| p.payload).collect();
    assert_eq!(billed, ["invoice 1 for 30".as_bytes(), "invoice 2 for 5".as_bytes()]);
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_client_records_what_is_sent_after_every_publish_middleware() {
    use ferrostream::middleware::{self, Outgoing, PublishNext};
    common::init_tracing();
    let broker = common::broker();
    let orders = common::topic(&broker, "tc-mw", 1).await;
    let out = common::topic(&broker, "tc-mw-out", 1).await;
    common::member(&broker, &orders, "tagged", &common::unique("g"))
        .auto_commit(false)
        .publish_to(out.as_str())
        .publish_layer(middleware::publish_from_fn(
            |mut o: Outgoing, next: PublishNext| async move {
                o.headers_mut().set("stage", "subscriber");
                next.run(o).await
            },
        ))
        .handle(|body: String| async move { format!("r-{body}") });
    let app = TestApp::start(broker).await.unwrap().timeout(common::WAIT);
    app.publish("1", &orders).await.unwrap();
    let sent = app.wait_published(&out, 1).await.unwrap();
    assert_eq!(sent[0].headers.get_str("stage"), Some("subscriber"));
    app.shutdown().await.unwrap();
}
