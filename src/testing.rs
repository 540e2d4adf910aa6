//! A test client, like FastStream's `TestKafkaBroker`: run the app in a test, publish, await the
//! handler's result, assert its calls, read what it published, wait until messages are finished.
//!
//! It runs on whatever broker the [`Broker`] was made for: `memory://` for fast unit tests, a real broker
//! for the same test with one switch. [`broker_url`] reads the `FERROSTREAM_TEST_BROKER` environment
//! variable (default `memory://`), so `FERROSTREAM_TEST_BROKER=kafka://127.0.0.1:9092 cargo test` runs
//! the same tests on Kafka. Everything is read from the app's own events and publishes, so it means the
//! same on every broker.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use ferrostream::{Broker, Json, Settle, testing::TestApp};
//!
//! #[derive(serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
//! struct Order { id: u64, total: u64 }
//!
//! // In a test suite: `Broker::new(&ferrostream::testing::broker_url())`, with fresh topics created
//! // first when that is a real broker (see `tests/test_client.rs`).
//! let broker = Broker::new("memory://")?;
//! broker.subscriber("orders").group_id("billing").auto_commit(false)
//!     .publish_to("invoices")
//!     .handle(|Json(order): Json<Order>| async move { format!("invoice {} for {}", order.id, order.total) });
//!
//! let app = TestApp::start(broker).await?;
//! // Publish and await the handler's result (request/reply).
//! let reply = app.request(Json(Order { id: 7, total: 30 }), "orders").await?;
//! assert_eq!(reply.payload().as_ref(), b"invoice 7 for 30");
//! // Publish, then wait until the message is finished (acked, or rejected for good; not a nack).
//! app.publish(Json(Order { id: 8, total: 5 }), "orders").await?;
//! let finished = app.wait_finished("orders@billing", 2).await?;
//! assert!(finished.iter().all(|m| m.settle == Settle::Ack));
//! // The handler's calls, and what the app published.
//! assert_eq!(app.calls("orders@billing").len(), 2);
//! assert_eq!(app.published("invoices")[1].payload.as_ref(), b"invoice 8 for 5");
//! app.shutdown().await?;
//! # Ok(()) }
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::app::{App, RunningApp};
use crate::broker::Broker;
use crate::error::{BrokerError, StartError};
use crate::handler::IntoPayload;
use crate::message::Headers;
use crate::middleware::{self, Outgoing, PublishMiddleware, PublishNext};
use crate::observe::{Observer, Outcome, SettledMessage, WaitTimeout};
use crate::publish::Publish;
use crate::request::PendingRequest;

/// The broker URL tests run on: `FERROSTREAM_TEST_BROKER`, or `memory://` when it is not set.
pub fn broker_url() -> String {
    std::env::var("FERROSTREAM_TEST_BROKER").unwrap_or_else(|_| "memory://".to_owned())
}

/// A record the app published (through `publish`, a publisher, a handler's result, a reply or a dead
/// letter), once the broker acknowledged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The topic.
    pub topic: String,
    /// The key.
    pub key: Option<Bytes>,
    /// The payload.
    pub payload: Bytes,
    /// The headers.
    pub headers: Headers,
}

/// One handler call as the test sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerCall {
    /// The payload (lossy UTF-8).
    pub payload: String,
    /// How the call ended.
    pub outcome: Outcome,
}

/// What the app published, and a wake-up for those waiting for more.
#[derive(Default)]
struct Recorded {
    records: Mutex<Vec<Published>>,
    added: tokio::sync::Notify,
}

/// A running app under test. See the [module docs](self).
pub struct TestApp {
    broker: Broker,
    observer: Observer,
    published: Arc<Recorded>,
    running: RunningApp,
    timeout: Duration,
}

impl TestApp {
    /// Starts the app of `broker` (every subscriber declared on it and its routers) and records its events
    /// and publishes from now on.
    pub async fn start(broker: Broker) -> Result<TestApp, StartError> {
        Self::start_app(App::new(broker.clone()), broker).await
    }

    /// Starts an app built with its hooks and settings (`App::new(broker.clone())...`).
    pub async fn start_app(app: App, broker: Broker) -> Result<TestApp, StartError> {
        let published: Arc<Recorded> = Arc::default();
        let record = published.clone();
        // Innermost, next to the broker: records what is really sent, after every publish middleware.
        broker.set_publish_tap(PublishMiddleware::erase(middleware::publish_from_fn(
            move |out: Outgoing, next: PublishNext| {
                let record = record.clone();
                async move {
                    let seen = Published {
                        topic: out.topic().to_owned(),
                        key: out.key().cloned(),
                        payload: out.payload().clone(),
                        headers: out.headers().clone(),
                    };
                    let ack = next.run(out).await?;
                    record.records.lock().unwrap_or_else(|p| p.into_inner()).push(seen);
                    record.added.notify_waiters();
                    Ok(ack)
                }
            },
        )));
        let observer = broker.observer();
        let running = app.start().await?;
        Ok(TestApp {
            broker,
            observer,
            published,
            running,
            timeout: Duration::from_secs(30),
        })
    }

    /// How long the `wait_*` calls and requests wait (default 30 s: a real broker's group join takes
    /// seconds).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The broker under test.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Every event of the app's subscribers.
    pub fn observer(&self) -> &Observer {
        &self.observer
    }

    /// Publishes a payload (add key, headers... then `.await` it).
    pub fn publish(&self, payload: impl IntoPayload, topic: &str) -> Publish {
        self.broker.publish(payload, topic)
    }

    /// Publishes a payload and resolves to the handler's result (its reply).
    pub fn request(&self, payload: impl IntoPayload, topic: &str) -> PendingRequest {
        self.broker.request(payload, topic).timeout(self.timeout)
    }

    /// The handler calls of a subscriber so far, in order.
    pub fn calls(&self, subscriber: &str) -> Vec<HandlerCall> {
        self.observer
            .handled(subscriber)
            .into_iter()
            .map(|(_, _, payload, outcome)| HandlerCall { payload, outcome })
            .collect()
    }

    /// Waits until the subscriber's handler has been called `n` times; returns the calls.
    pub async fn wait_calls(&self, subscriber: &str, n: usize) -> Result<Vec<HandlerCall>, WaitTimeout> {
        self.observer.wait_handled(subscriber, n, self.timeout).await?;
        Ok(self.calls(subscriber))
    }

    /// Waits until the subscriber has finished with `n` messages: acked, or rejected for good (after the
    /// dead letter is confirmed). Nacks of retries do not count.
    pub async fn wait_finished(&self, subscriber: &str, n: usize) -> Result<Vec<SettledMessage>, WaitTimeout> {
        self.observer.wait_finished(subscriber, n, self.timeout).await
    }

    /// What the app published to `topic` so far (acknowledged by the broker), in order.
    pub fn published(&self, topic: &str) -> Vec<Published> {
        let all = self.published.records.lock().unwrap_or_else(|p| p.into_inner());
        all.iter().filter(|p| p.topic == topic).cloned().collect()
    }

    /// Waits until the app has published `n` records to `topic`; returns them.
    pub async fn wait_published(&self, topic: &str, n: usize) -> Result<Vec<Published>, WaitTimeout> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let added = self.published.added.notified();
            tokio::pin!(added);
            added.as_mut().enable();
            let seen = self.published(topic);
            if seen.len() >= n {
                return Ok(seen);
            }
            if tokio::time::timeout_at(deadline, added).await.is_err() {
                return Err(WaitTimeout {
                    what: format!("{n} records published to `{topic}`"),
                    timeout: self.timeout,
                    seen: seen.len(),
                });
            }
        }
    }

    /// Stops the app as `RunningApp::shutdown` does.
    pub async fn shutdown(self) -> Result<(), BrokerError> {
        self.running.shutdown().await
    }
}
