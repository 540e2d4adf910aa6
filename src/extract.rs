//! Extractors: what a handler may take as arguments.
//!
//! Any type implementing [`FromMessage`] can be a handler argument: the payload as `String`, `Bytes`,
//! `Vec<u8>` or [`Json<T>`], the [`Message`] handle, [`Headers`], [`Key`], or shared [`State<T>`].

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;

use crate::asyncapi::{Payload, Schemas};
use crate::error::{DecodeError, Error};
use crate::message::{Headers, Message};

/// Shared values handlers can ask for with [`State<T>`], keyed by type.
#[derive(Clone, Default)]
pub(crate) struct StateMap(HashMap<TypeId, Arc<dyn Any + Send + Sync>>);

impl StateMap {
    pub(crate) fn insert<T: Clone + Send + Sync + 'static>(&mut self, value: T) {
        self.0.insert(TypeId::of::<T>(), Arc::new(value));
    }
    pub(crate) fn contains(&self, t: TypeId) -> bool {
        self.0.contains_key(&t)
    }
    fn get<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.0
            .get(&TypeId::of::<T>())
            .and_then(|v| v.downcast_ref::<T>())
            .cloned()
    }
}

/// What an extractor sees: the message (or batch) and its subscriber's shared state.
pub struct Context<'a> {
    /// The message; in a batch, the first one.
    pub(crate) message: &'a Message,
    /// The payload to decode: the message's, unless a middleware replaced it.
    pub(crate) payload: &'a Bytes,
    /// Every message of the call: the batch, or just `message`.
    pub(crate) batch: &'a [Message],
    pub(crate) state: &'a StateMap,
}

impl<'a> Context<'a> {
    pub(crate) fn single(message: &'a Message, state: &'a StateMap) -> Self {
        Context {
            message,
            payload: message.payload(),
            batch: std::slice::from_ref(message),
            state,
        }
    }

    /// The message being handled (in a batch, the first one; use [`Batch`] for all of them).
    pub fn message(&self) -> &Message {
        self.message
    }

    /// The payload to decode: the message's, unless a middleware replaced it
    /// ([`Request::set_payload`](crate::middleware::Request::set_payload)). Extractors of the payload
    /// read this, not `message().payload()`.
    pub fn payload(&self) -> &Bytes {
        self.payload
    }

    /// Every message of this handler call: one, or the whole batch of a batch subscriber.
    pub fn batch(&self) -> &[Message] {
        self.batch
    }

    /// A decode error for this message's subscriber.
    pub fn decode_error<T>(&self, cause: impl Into<crate::BoxError>) -> Error {
        DecodeError {
            subscriber: self.message.subscriber().to_owned(),
            target: std::any::type_name::<T>(),
            cause: cause.into(),
        }
        .into()
    }
}

/// Builds a handler argument from the message.
///
/// ```
/// use ferrostream::{extract::{Context, FromMessage}, Error};
/// /// The tenant header, required.
/// struct Tenant(String);
/// impl FromMessage for Tenant {
///     fn from_message(cx: &Context<'_>) -> Result<Self, Error> {
///         cx.message().headers().get_str("tenant")
///             .map(|t| Tenant(t.to_owned()))
///             .ok_or_else(|| cx.decode_error::<Tenant>("missing `tenant` header"))
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a handler argument",
    label = "not an extractor",
    note = "handler arguments are extractors: `String`, `Bytes`, `Vec<u8>`, `Json<T>` (for a `T: Deserialize + JsonSchema`), \
            `Message`, `Headers`, `Key`, `Attempt`, `State<T>`, `Batch<T>`",
    note = "for your own struct, take `Json<YourStruct>`; for text, an owned `String` (not `&str`)"
)]
pub trait FromMessage: Sized + Send + 'static {
    /// Extracts the value, or fails with a typed error (usually a decode error).
    fn from_message(cx: &Context<'_>) -> Result<Self, Error>;

    /// The shared state this extractor needs registered ([`State<T>`]: `T`), checked when the app starts.
    #[doc(hidden)]
    fn required_state() -> Option<(TypeId, &'static str)> {
        None
    }

    /// The payload this extractor reads, for the service's AsyncAPI description: `None` (the default)
    /// for an extractor that does not read the payload (headers, the key, state...).
    fn describe_payload(_schemas: &mut Schemas) -> Option<Payload> {
        None
    }
}

impl FromMessage for Message {
    fn from_message(cx: &Context<'_>) -> Result<Self, Error> {
        Ok(cx.message.clone())
    }
}

impl FromMessage for Bytes {
    fn from_message(cx: &Context<'_>) -> Result<Self, Error> {
        Ok(cx.payload.clone())
    }
    fn describe_payload(schemas: &mut Schemas) -> Option<Payload> {
        Some(schemas.bytes())
    }
}

impl FromMessage for Vec<u8> {
    fn from_message(cx: &Context<'_>) -> Result<Self, Error> {
        Ok(cx.payload.to_vec())
    }
    fn describe_payload(schemas: &mut Schemas) -> Option<Payload> {
        Some(schemas.bytes())
    }
}

impl FromMessage for String {
    fn from_message(cx: &Context<'_>) -> Result<Self, Error> {
        match std::str::from_utf8(cx.payload) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(cx.decode_error::<String>(e)),
        }
    }
    fn describe_payload(schemas: &mut Schemas) -> Option<Payload> {
        Some(schemas.text())
    }
}

impl FromMessage for Headers {
    fn from_message(cx: &Context<'_>) -> Result<Self, Error> {
        Ok(cx.message.headers().clone())
    }
}

/// The message key, if any.
///
/// ```
/// async fn handler(ferrostream::Key(key): ferrostream::Key) {
///     let _ = key; // Option<bytes::Bytes>
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key(pub Option<Bytes>);

impl FromMessage for Key {
    fn from_message(cx: &Context<'_>) -> Result<Self, Error> {
        Ok(Key(cx.message.key().cloned()))
    }
}

/// Which delivery of the message this is (1 the first time); see [`Message::attempt`].
///
/// ```
/// async fn handler(ferrostream::Attempt(n): ferrostream::Attempt, body: String) {
///     if n > 1 {
///         println!("retry {n} of {body}");
///     }
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt(pub u32);

impl FromMessage for Attempt {
    fn from_message(cx: &Context<'_>) -> Result<Self, Error> {
        Ok(Attempt(cx.message.attempt()))
    }
}

/// A payload decoded from (or encoded to) JSON with serde.
///
/// ```
/// #[derive(serde::Deserialize, schemars::JsonSchema)]
/// struct Order { id: u64 }
/// async fn handler(ferrostream::Json(order): ferrostream::Json<Order>) {
///     let _ = order.id;
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned + JsonSchema + Send + 'static> FromMessage for Json<T> {
    fn from_message(cx: &Context<'_>) -> Result<Self, Error> {
        serde_json::from_slice(cx.payload)
            .map(Json)
            .map_err(|e| cx.decode_error::<T>(e))
    }
    fn describe_payload(schemas: &mut Schemas) -> Option<Payload> {
        Some(schemas.json::<T>())
    }
}

/// Shared state registered with [`Broker::with_state`](crate::Broker::with_state).
///
/// ```
/// use std::sync::{Arc, atomic::{AtomicU64, Ordering}};
/// #[derive(Clone, Default)]
/// struct Counter(Arc<AtomicU64>);
/// async fn handler(ferrostream::State(c): ferrostream::State<Counter>) {
///     c.0.fetch_add(1, Ordering::Relaxed);
/// }
/// ```
#[derive(Debug, Clone)]
pub struct State<T>(pub T);

/// Asking for state of a type nobody registered.
#[derive(Debug, thiserror::Error)]
#[error("no state of type `{0}` was registered with Broker::with_state")]
pub struct MissingState(&'static str);

impl<T: Clone + Send + Sync + 'static> FromMessage for State<T> {
    fn from_message(cx: &Context<'_>) -> Result<Self, Error> {
        cx.state
            .get::<T>()
            .map(State)
            .ok_or_else(|| Error::handler(MissingState(std::any::type_name::<T>())))
    }

    fn required_state() -> Option<(TypeId, &'static str)> {
        Some((TypeId::of::<T>(), std::any::type_name::<T>()))
    }
}

/// Every message of a batch subscriber's call, each extracted as `T` ([guarantee 3.10](crate::guarantees)).
///
/// `Batch<String>` or `Batch<Json<T>>` decodes every payload (one failure makes the call a decode error);
/// `Batch<Message>` gives the handles, to settle messages one by one or all at once.
///
/// ```
/// use ferrostream::{Batch, Message};
/// async fn handler(Batch(bodies): Batch<String>, messages: Batch<Message>) {
///     for (body, msg) in bodies.iter().zip(&messages.0) {
///         if body.is_empty() {
///             let _ = msg.reject().await; // just this one
///         }
///     }
///     messages.ack_all().await; // the rest
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Batch<T>(pub Vec<T>);

impl<T: FromMessage> FromMessage for Batch<T> {
    fn from_message(cx: &Context<'_>) -> Result<Self, Error> {
        cx.batch
            .iter()
            .map(|m| T::from_message(&Context::single(m, cx.state)))
            .collect::<Result<Vec<_>, _>>()
            .map(Batch)
    }
    fn describe_payload(schemas: &mut Schemas) -> Option<Payload> {
        T::describe_payload(schemas)
    }
}

impl Batch<Message> {
    /// Acks every message of the batch not settled yet; returns how many this call settled.
    pub async fn ack_all(&self) -> usize {
        self.settle_all(crate::Settle::Ack)
    }

    /// Nacks every message of the batch not settled yet (they are delivered again).
    pub async fn nack_all(&self) -> usize {
        self.settle_all(crate::Settle::NACK)
    }

    /// Rejects every message of the batch not settled yet.
    pub async fn reject_all(&self) -> usize {
        self.settle_all(crate::Settle::Reject)
    }

    fn settle_all(&self, settle: crate::Settle) -> usize {
        self.0
            .iter()
            .filter(|m| m.settle(settle, crate::SettledBy::User).took_effect())
            .count()
    }
}
