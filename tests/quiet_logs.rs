//! Guarantee 2.7, the logs: a message that fails again and again is logged at ERROR at its 1st, 2nd, 4th,
//! 8th, 16th attempt, not at every one; a message that cannot decode is rejected with one ERROR naming its
//! coordinates and never delivered again. One test in its own binary: it installs a process-wide tracing
//! subscriber that records ferrostream's events (common/logs.rs).

mod common;

#[path = "common/logs.rs"]
mod logs;

use std::time::Duration;

use ferrostream::{AckPolicy, Json, RetryPolicy, Settle, SettledBy};

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Order {
    #[allow(dead_code)]
    id: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_are_summarised_and_an_undecodable_message_is_rejected_once() {
    logs::install();
    let broker = common::broker();
    let observer = broker.observer();
    let failing = common::topic(&broker, "quiet-fail", 1).await;
    let undecodable = common::topic(&broker, "quiet-decode", 1).await;
    common::member(&broker, &failing, "failing", &common::unique("g"))
        .ack_policy(AckPolicy::NackOnError)
        .retry(RetryPolicy::new(17).backoff(Duration::from_millis(1), Duration::from_millis(1)))
        .handle(|_: String| async { Err::<(), _>(std::io::Error::other("downstream is down")) });
    // No retry policy, no dead-letter topic: the default is to reject it, not to loop.
    common::member(&broker, &undecodable, "decoding", &common::unique("g"))
        .ack_policy(AckPolicy::NackOnError)
        .handle(|Json(_): Json<Order>| async {});
    let app = common::start(&broker).await;
    broker.publish("x", &failing).await.unwrap();
    broker.publish("not json", &undecodable).await.unwrap();
    broker.publish(r#"{"id": 1}"#, &undecodable).await.unwrap();
    let finished = observer.wait_finished("failing", 1, common::WAIT).await.unwrap();
    assert_eq!(
        finished[0].settle,
        Settle::Reject,
        "the budget of 17 attempts was spent"
    );
    let decoded = observer.wait_finished("decoding", 2, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();

    assert_eq!(observer.handled("failing").len(), 17);
    let errors: Vec<(String, Option<i64>)> = logs::at_least(tracing::Level::ERROR)
        .into_iter()
        .map(|e| (e.message, e.offset))
        .collect();
    let failed: Vec<_> = errors.iter().filter(|(m, _)| m.starts_with("handler failed")).collect();
    // Attempts 1, 2, 4, 8, 16 of the failing message, and the one failed decode.
    assert_eq!(failed.len(), 6, "{errors:#?}");

    assert_eq!(
        (decoded[0].settle, decoded[0].by, decoded[1].settle),
        (Settle::Reject, SettledBy::Policy, Settle::Ack)
    );
    assert_eq!(
        observer.handled("decoding").len(),
        2,
        "the undecodable message was handled once"
    );
    let rejected: Vec<_> = errors
        .iter()
        .filter(|(m, _)| m.contains("cannot decode is rejected"))
        .collect();
    assert_eq!(rejected.len(), 1, "{errors:#?}");
    assert_eq!(rejected[0].1, Some(0), "the ERROR names the offset");
}
