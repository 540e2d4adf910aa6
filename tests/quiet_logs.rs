//! Guarantee 2.7, the logs: a message that fails again and again is logged at ERROR at its 1st, 2nd, 4th,
//! 8th, 16th attempt, not at every one; a message that cannot decode is rejected with one ERROR naming its
//! coordinates and never delivered again. One test in its own binary: it installs a process-wide tracing
//! subscriber that counts ERROR events.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use ferrostream::{AckPolicy, Json, RetryPolicy, Settle, SettledBy};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};

/// Every ERROR event of ferrostream: its message and its `offset` field.
static ERRORS: Mutex<Vec<(String, Option<i64>)>> = Mutex::new(Vec::new());

struct CountErrors;

#[derive(Default)]
struct Fields {
    message: String,
    offset: Option<i64>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        if field.name() == "offset" {
            self.offset = Some(value);
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountErrors {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() == tracing::Level::ERROR && meta.target().starts_with("ferrostream") {
            let mut fields = Fields::default();
            event.record(&mut fields);
            ERRORS.lock().unwrap().push((fields.message, fields.offset));
        }
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Order {
    #[allow(dead_code)]
    id: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_are_summarised_and_an_undecodable_message_is_rejected_once() {
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(CountErrors)).unwrap();
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
    let errors = ERRORS.lock().unwrap().clone();
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
