//! # ferrostream
//!
//! Event-driven services on message brokers: write async handlers, subscribe them to topics, and let the
//! framework consume, decode, dispatch, publish results and settle each message (ack / nack / reject)
//! exactly as the chosen [`AckPolicy`] says. The broker is chosen by URL: `memory://` (a model of Kafka
//! for tests and demos), `kafka://` (feature `kafka`) and `amqp://` (RabbitMQ, feature `amqp`).
//!
//! What a settle means depends on the broker, never what the policy promises:
//! - on a log (Kafka, `memory://`) offsets are committed only past settled messages (see [`offset`]), a
//!   nack redelivers from the nacked offset with nothing after it committed, and `AckFirst` commits before
//!   the handler runs (at most once, for real);
//! - on RabbitMQ each delivery is settled on its own (`basic.ack`, `basic.reject`, a nack puts it back in
//!   its queue), so a slow message never holds back a later one; `AckFirst` acks on receipt, before the
//!   handler runs. See the `amqp` module (feature `amqp`).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use ferrostream::{AckMessage, App, Broker, Message, Settle};
//!
//! fn smth_processing(body: &str) -> Result<(), ferrostream::Error> {
//!     if body == "done already" {
//!         Err(AckMessage)?; // stops the handler and acks, from any depth
//!     }
//!     Ok(())
//! }
//!
//! let broker = Broker::new("memory://")?;
//! let observer = broker.observer();
//! broker
//!     .subscriber("test")
//!     .group_id("group")
//!     .auto_commit(false) // at least once: ack on success, redeliver on error
//!     .handle(|body: String, msg: Message| async move {
//!         smth_processing(&body)?;
//!         msg.ack().await;
//!         Ok::<_, ferrostream::Error>(())
//!     });
//! let app = App::new(broker.clone()).start().await?;
//! broker.publish("done already", "test").await?;
//! let settled = observer.wait_settled("test@group", 1, Duration::from_secs(5)).await?;
//! assert_eq!(settled[0].settle, Settle::Ack);
//! app.shutdown().await?;
//! # Ok(()) }
//! ```

/// The README's examples, compiled and run as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

mod app;
mod broker;
mod brokers;
mod config;
mod engine;
mod error;
pub mod extract;
pub mod guarantees;
mod handler;
pub mod hooks;
mod log;
mod message;
mod metrics;
pub mod observe;
mod publish;
mod redact;
pub mod retry;
mod settle;
mod subscriber;
mod transport;

#[cfg(feature = "amqp")]
pub use brokers::amqp;
#[cfg(feature = "kafka")]
pub use brokers::kafka;
pub use log::offset;

pub use app::{App, RunningApp, ShutdownHandle};
pub use broker::Broker;
pub use error::{
    AckMessage, AdminError, BoxError, BrokerError, ConfigError, DecodeError, Error, ErrorKind, FailureKind,
    NackMessage, PublishError, RejectMessage, StartError,
};
pub use extract::{Attempt, Batch, Json, Key, State};
pub use handler::{Handler, HandlerReturn, IntoPayload};
pub use message::{CORRELATION_ID, Coordinates, Headers, Message, REPLY_TO, SettledBy};
pub use metrics::{Metrics, SubscriberMetrics};
pub use observe::{Event, Observer, Outcome};
pub use offset::TopicPartition;
pub use publish::{Publish, PublishAck};
pub use retry::RetryPolicy;
pub use settle::{AckPolicy, Settle, SettleOutcome};
pub use subscriber::{OffsetReset, SubscriberBuilder};
