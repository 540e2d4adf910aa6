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
pub mod asyncapi;
mod broker;
mod brokers;
#[cfg(feature = "cli")]
pub mod cli;
pub mod codec;
mod config;
#[cfg(feature = "docs")]
pub mod docs;
mod engine;
mod error;
pub mod extract;
mod filter;
pub mod guarantees;
mod handler;
pub mod hooks;
#[cfg(feature = "http")]
pub mod http;
mod log;
mod message;
mod metrics;
pub mod middleware;
pub mod observe;
#[cfg(feature = "otel")]
pub mod otel;
#[cfg(feature = "prometheus")]
pub mod prometheus;
mod publish;
mod publisher;
mod redact;
mod request;
mod response;
pub mod retry;
mod router;
mod settle;
mod subscriber;
pub mod testing;
mod transport;

#[cfg(feature = "amqp")]
pub use brokers::amqp;
#[cfg(feature = "kafka")]
pub use brokers::kafka;
pub use log::offset;

pub use app::{App, RunningApp, ShutdownHandle};
pub use broker::Broker;
#[cfg(feature = "msgpack")]
pub use codec::MsgPack;
pub use error::{
    AckMessage, AdminError, BoxError, BrokerError, ConfigError, DecodeError, Error, ErrorKind, FailureKind,
    KafkaErrorKind, NackMessage, PublishError, RejectMessage, StartError,
};
pub use extract::{Attempt, Batch, Json, Key, State};
/// Feature `macros`: checks a handler `async fn` where it is defined and names the argument or return
/// type that is wrong, instead of one "this is not a ferrostream handler" error at `.handle(..)`.
///
/// ```
/// use ferrostream::{Broker, Json, Message, State, debug_handler};
///
/// #[derive(serde::Deserialize, schemars::JsonSchema)]
/// struct Order {
///     id: u64,
/// }
/// #[derive(Clone)]
/// struct Prefix(&'static str);
///
/// #[debug_handler]
/// async fn on_order(
///     Json(order): Json<Order>,
///     State(prefix): State<Prefix>,
///     msg: Message,
/// ) -> Result<String, ferrostream::Error> {
///     msg.ack().await;
///     Ok(format!("{} {}", prefix.0, order.id))
/// }
///
/// let broker = Broker::new("memory://")?.with_state(Prefix("order"));
/// broker.subscriber("orders").group_id("billing").handle(on_order);
/// # Ok::<(), ferrostream::ConfigError>(())
/// ```
///
/// With `order: Order` instead of `Json(order): Json<Order>`, the error points at `Order`:
///
/// ```text
/// error[E0277]: `Order` cannot be a handler argument
///    |
///    |     order: Order,
///    |            ^^^^^ not an extractor
///    = note: for your own struct, take `Json<YourStruct>`; for text, an owned `String` (not `&str`)
/// ```
#[cfg(feature = "macros")]
pub use ferrostream_macros::debug_handler;
pub use handler::{Handler, HandlerReturn, IntoPayload};
pub use message::{CORRELATION_ID, Coordinates, Headers, Message, REPLY_TO, SettledBy};
pub use metrics::{Metrics, SubscriberMetrics};
pub use observe::{Event, Observer, Outcome};
pub use offset::TopicPartition;
pub use publish::{Publish, PublishAck, PublishFuture};
pub use publisher::Publisher;
pub use request::PendingRequest;
pub use response::Response;
pub use retry::RetryPolicy;
pub use router::Router;
pub use settle::{AckPolicy, Settle, SettleOutcome};
pub use subscriber::{OffsetReset, OnDecodeError, PublishTo, SubscriberBuilder};
