//! Codecs: the payload format is pluggable.
//!
//! [`Json<T>`](crate::Json) stays the default. A codec is a zero-sized type naming a format; it
//! implements [`Codec`] (its content type), [`Decode<T>`] for what it can read and [`Encode<T>`] for what
//! it can write. [`Encoded<C, T>`] is the extractor, handler return value and publishable payload that
//! decodes and encodes a `T` with the codec `C`:
//!
//! - [`JsonCodec`]: JSON with serde_json (`Encoded<JsonCodec, T>` behaves like `Json<T>`);
//! - `MsgPackCodec` (feature `msgpack`): MessagePack with rmp-serde, structs as maps of field names so
//!   other languages' MessagePack libraries (Python's `msgpack`, FastStream) read them; `MsgPack<T>` is
//!   its twin of `Json<T>`;
//! - your own format: implement the three traits for a type of yours, as below.
//!
//! A payload that does not decode fails the handler call with a typed
//! [`DecodeError`](crate::DecodeError) (its `target` is `T`, its `cause` the codec's error), settled by
//! the subscriber's [`AckPolicy`](crate::AckPolicy) like any other decode failure ([guarantee
//! 2.4](crate::guarantees)): a [`RetryPolicy`](crate::RetryPolicy) does not retry it by default, and a
//! rejected one goes to the subscriber's dead-letter topic if it has one. An encoding failure of a
//! returned value is the handler's error; of a published one,
//! [`PublishError::Encode`](crate::PublishError::Encode).
//!
//! # Your own format
//!
//! A codec for one type of yours (here an `id,amount` text line; a protobuf message type works the same
//! way), used to read, to return and to publish:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use bytes::Bytes;
//! use ferrostream::codec::{Codec, Decode, Encode, Encoded};
//! use ferrostream::{App, BoxError, Broker};
//!
//! /// Orders as `id,amount` lines.
//! struct Csv;
//!
//! impl Codec for Csv {
//!     const CONTENT_TYPE: &'static str = "text/csv";
//! }
//!
//! #[derive(Debug, Clone, PartialEq)]
//! struct Order {
//!     id: u64,
//!     amount: u32,
//! }
//!
//! impl Decode<Order> for Csv {
//!     fn decode(bytes: &[u8]) -> Result<Order, BoxError> {
//!         let line = std::str::from_utf8(bytes)?;
//!         let (id, amount) = line.split_once(',').ok_or("expected `id,amount`")?;
//!         Ok(Order { id: id.trim().parse()?, amount: amount.trim().parse()? })
//!     }
//! }
//!
//! impl Encode<Order> for Csv {
//!     fn encode(order: &Order) -> Result<Bytes, BoxError> {
//!         Ok(Bytes::from(format!("{},{}", order.id, order.amount)))
//!     }
//! }
//!
//! /// Doubles every order; the result is published to `publish_to`, encoded as CSV too.
//! async fn double(order: Encoded<Csv, Order>) -> Encoded<Csv, Order> {
//!     Encoded::new(Order { id: order.id, amount: order.amount * 2 })
//! }
//!
//! let broker = Broker::new("memory://")?;
//! let observer = broker.observer();
//! broker.subscriber("orders").group_id("billing").auto_commit(false).publish_to("doubled").handle(double);
//! broker.subscriber("doubled").group_id("audit").auto_commit(false)
//!     .handle(|_: Encoded<Csv, Order>| async {});
//! let app = App::new(broker.clone()).start().await?;
//!
//! broker.publish(Encoded::<Csv, _>::new(Order { id: 7, amount: 50 }), "orders").await?;
//! let seen = observer.wait_handled("doubled@audit", 1, Duration::from_secs(5)).await?;
//! assert_eq!(seen[0].2, "7,100");
//! app.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! A serde-based format implements the traits for every type at once, as [`JsonCodec`] does:
//!
//! ```
//! use bytes::Bytes;
//! use serde::{Serialize, de::DeserializeOwned};
//! use ferrostream::codec::{Codec, Decode, Encode, Encoded};
//! use ferrostream::BoxError;
//!
//! /// JSON, indented (a stand-in for any serde format: CBOR, YAML...).
//! struct PrettyJson;
//!
//! impl Codec for PrettyJson {
//!     const CONTENT_TYPE: &'static str = "application/json";
//! }
//! impl<T: DeserializeOwned> Decode<T> for PrettyJson {
//!     fn decode(bytes: &[u8]) -> Result<T, BoxError> {
//!         Ok(serde_json::from_slice(bytes)?)
//!     }
//! }
//! impl<T: Serialize + ?Sized> Encode<T> for PrettyJson {
//!     fn encode(value: &T) -> Result<Bytes, BoxError> {
//!         Ok(serde_json::to_vec_pretty(value)?.into())
//!     }
//! }
//!
//! #[derive(serde::Deserialize, serde::Serialize)]
//! struct Order { id: u64 }
//! async fn handler(order: Encoded<PrettyJson, Order>) -> Encoded<PrettyJson, Order> {
//!     order
//! }
//! # fn assert_handler<A, H: ferrostream::Handler<A>>(_: H) {}
//! # assert_handler(handler);
//! ```
//!
//! # Content type
//!
//! Codecs name their content type ([`Codec::CONTENT_TYPE`]) but nothing sets a `content-type` header by
//! itself; to send one, add it:
//!
//! ```
//! use ferrostream::codec::{Codec, JsonCodec, Encoded};
//! use ferrostream::Response;
//! async fn reply(body: String) -> Response {
//!     Response::new(Encoded::<JsonCodec, _>::new(body.len()))
//!         .header("content-type", JsonCodec::CONTENT_TYPE)
//! }
//! # fn assert_handler<A, H: ferrostream::Handler<A>>(_: H) {}
//! # assert_handler(reply);
//! ```

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::asyncapi::{Payload, Schemas};
use crate::error::{BoxError, Error};
use crate::extract::{Context, FromMessage};
use crate::handler::{HandlerReturn, IntoPayload};
use crate::response::Response;

/// A payload format. Implemented by a (usually zero-sized) type that names the format; what it can read
/// and write is said by [`Decode<T>`] and [`Encode<T>`]. See the [module docs](self) for a codec of
/// your own.
pub trait Codec: Send + Sync + 'static {
    /// The format's MIME type, e.g. `application/json`.
    const CONTENT_TYPE: &'static str;
}

/// A codec that reads a `T` from a payload.
#[diagnostic::on_unimplemented(
    message = "the codec `{Self}` cannot decode a `{T}`",
    label = "no `Decode<{T}>` for this codec",
    note = "implement `ferrostream::codec::Decode<{T}>` for `{Self}`; serde codecs (`JsonCodec`, `MsgPackCodec`) \
            decode any `T: serde::Deserialize`"
)]
pub trait Decode<T>: Codec {
    /// Decodes the payload; the error becomes the [`DecodeError`](crate::DecodeError)'s cause.
    fn decode(bytes: &[u8]) -> Result<T, BoxError>;
}

/// A codec that writes a `T` as a payload.
#[diagnostic::on_unimplemented(
    message = "the codec `{Self}` cannot encode a `{T}`",
    label = "no `Encode<{T}>` for this codec",
    note = "implement `ferrostream::codec::Encode<{T}>` for `{Self}`; serde codecs (`JsonCodec`, `MsgPackCodec`) \
            encode any `T: serde::Serialize`"
)]
pub trait Encode<T: ?Sized>: Codec {
    /// Encodes the value.
    fn encode(value: &T) -> Result<Bytes, BoxError>;
}

/// JSON with serde_json: the default format, byte for byte what [`Json<T>`](crate::Json) reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    const CONTENT_TYPE: &'static str = "application/json";
}

impl<T: DeserializeOwned> Decode<T> for JsonCodec {
    fn decode(bytes: &[u8]) -> Result<T, BoxError> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

impl<T: Serialize + ?Sized> Encode<T> for JsonCodec {
    fn encode(value: &T) -> Result<Bytes, BoxError> {
        Ok(Bytes::from(serde_json::to_vec(value)?))
    }
}

/// A value decoded from (or encoded to) a payload with the codec `C`: a handler argument, a handler
/// return value (published to the subscriber's `publish_to` topics) and a payload for
/// [`Broker::publish`](crate::Broker::publish). It dereferences to the value.
///
/// ```
/// use ferrostream::codec::{Encoded, JsonCodec};
/// #[derive(serde::Deserialize, serde::Serialize)]
/// struct Order { id: u64 }
/// #[derive(serde::Serialize)]
/// struct Billed { order: u64 }
/// async fn bill(order: Encoded<JsonCodec, Order>) -> Encoded<JsonCodec, Billed> {
///     Encoded::new(Billed { order: order.id })
/// }
/// # fn assert_handler<A, H: ferrostream::Handler<A>>(_: H) {}
/// # assert_handler(bill);
/// ```
pub struct Encoded<C, T> {
    /// The decoded value (or the value to encode).
    pub value: T,
    codec: PhantomData<fn() -> C>,
}

impl<C, T> Encoded<C, T> {
    /// Wraps a value to encode with `C`.
    pub fn new(value: T) -> Self {
        Encoded {
            value,
            codec: PhantomData,
        }
    }

    /// The value.
    pub fn into_inner(self) -> T {
        self.value
    }
}

impl<C, T> From<T> for Encoded<C, T> {
    fn from(value: T) -> Self {
        Encoded::new(value)
    }
}

impl<C, T> Deref for Encoded<C, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<C, T> DerefMut for Encoded<C, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.value
    }
}

impl<C, T: fmt::Debug> fmt::Debug for Encoded<C, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Encoded")
            .field(&std::any::type_name::<C>())
            .field(&self.value)
            .finish()
    }
}

impl<C, T: Clone> Clone for Encoded<C, T> {
    fn clone(&self) -> Self {
        Encoded::new(self.value.clone())
    }
}

impl<C, T: PartialEq> PartialEq for Encoded<C, T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl<C, T: Eq> Eq for Encoded<C, T> {}

impl<C, T: Default> Default for Encoded<C, T> {
    fn default() -> Self {
        Encoded::new(T::default())
    }
}

impl<C: Decode<T>, T: Send + 'static> FromMessage for Encoded<C, T> {
    fn from_message(cx: &Context<'_>) -> Result<Self, Error> {
        C::decode(cx.payload())
            .map(Encoded::new)
            .map_err(|e| cx.decode_error::<T>(e))
    }
    fn describe_payload(schemas: &mut Schemas) -> Option<Payload> {
        Some(schemas.opaque::<T>(C::CONTENT_TYPE))
    }
}

impl<C: Encode<T>, T> IntoPayload for Encoded<C, T> {
    fn into_payload(self) -> Result<Bytes, Error> {
        C::encode(&self.value).map_err(Error::handler)
    }
    fn describe_payload(schemas: &mut Schemas) -> Option<Payload> {
        Some(schemas.opaque::<T>(C::CONTENT_TYPE))
    }
}

impl<C: Encode<T>, T: Send + 'static> HandlerReturn for Encoded<C, T> {
    fn into_outcome(self) -> Result<Option<Response>, Error> {
        Ok(Some(Response::new(self)))
    }
    fn describe_result(schemas: &mut Schemas) -> Option<Payload> {
        Some(schemas.opaque::<T>(C::CONTENT_TYPE))
    }
}

#[cfg(feature = "msgpack")]
pub use msgpack::{MsgPack, MsgPackCodec};

#[cfg(feature = "msgpack")]
mod msgpack {
    use std::io::Cursor;

    use bytes::Bytes;
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    use super::{Codec, Decode, Encode};
    use crate::asyncapi::{Payload, Schemas};
    use crate::error::{BoxError, Error};
    use crate::extract::{Context, FromMessage};
    use crate::handler::{HandlerReturn, IntoPayload};
    use crate::response::Response;

    /// MessagePack with rmp-serde (feature `msgpack`). Structs are written as maps of field names
    /// (`rmp_serde::to_vec_named`), so other languages' MessagePack libraries read them as maps
    /// (dictionaries); reading accepts structs as maps or as arrays. A payload with bytes after its one
    /// value does not decode.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct MsgPackCodec;

    impl Codec for MsgPackCodec {
        const CONTENT_TYPE: &'static str = "application/msgpack";
    }

    /// Bytes left over after the one MessagePack value of a payload.
    #[derive(Debug, thiserror::Error)]
    #[error("{0} trailing bytes after the MessagePack value")]
    struct TrailingBytes(u64);

    impl<T: DeserializeOwned> Decode<T> for MsgPackCodec {
        fn decode(bytes: &[u8]) -> Result<T, BoxError> {
            let mut reader = Cursor::new(bytes);
            let value = rmp_serde::from_read(&mut reader)?;
            let left = (bytes.len() as u64).saturating_sub(reader.position());
            if left > 0 {
                return Err(TrailingBytes(left).into());
            }
            Ok(value)
        }
    }

    impl<T: Serialize + ?Sized> Encode<T> for MsgPackCodec {
        fn encode(value: &T) -> Result<Bytes, BoxError> {
            Ok(Bytes::from(rmp_serde::to_vec_named(value)?))
        }
    }

    /// A payload decoded from (or encoded to) MessagePack with serde (feature `msgpack`): the twin of
    /// [`Json<T>`](crate::Json), as a handler argument, a return value and a payload to publish.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use ferrostream::{App, Broker, MsgPack};
    /// #[derive(serde::Deserialize, serde::Serialize)]
    /// struct Order { id: u64 }
    /// #[derive(serde::Serialize)]
    /// struct Billed { order: u64 }
    /// async fn bill(MsgPack(order): MsgPack<Order>) -> MsgPack<Billed> {
    ///     MsgPack(Billed { order: order.id })
    /// }
    /// let broker = Broker::new("memory://")?;
    /// broker.subscriber("orders").group_id("billing").auto_commit(false).publish_to("billed").handle(bill);
    /// let app = App::new(broker.clone()).start().await?;
    /// broker.publish(MsgPack(Order { id: 7 }), "orders").await?;
    /// app.shutdown().await?;
    /// # Ok(()) }
    /// ```
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct MsgPack<T>(pub T);

    impl<T: DeserializeOwned + Send + 'static> FromMessage for MsgPack<T> {
        fn from_message(cx: &Context<'_>) -> Result<Self, Error> {
            MsgPackCodec::decode(cx.payload())
                .map(MsgPack)
                .map_err(|e| cx.decode_error::<T>(e))
        }
        fn describe_payload(schemas: &mut Schemas) -> Option<Payload> {
            Some(schemas.opaque::<T>(MsgPackCodec::CONTENT_TYPE))
        }
    }

    impl<T: Serialize> IntoPayload for MsgPack<T> {
        fn into_payload(self) -> Result<Bytes, Error> {
            MsgPackCodec::encode(&self.0).map_err(Error::handler)
        }
        fn describe_payload(schemas: &mut Schemas) -> Option<Payload> {
            Some(schemas.opaque::<T>(MsgPackCodec::CONTENT_TYPE))
        }
    }

    impl<T: Serialize + Send + 'static> HandlerReturn for MsgPack<T> {
        fn into_outcome(self) -> Result<Option<Response>, Error> {
            Ok(Some(Response::new(self)))
        }
        fn describe_result(schemas: &mut Schemas) -> Option<Payload> {
            Some(schemas.opaque::<T>(MsgPackCodec::CONTENT_TYPE))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Order {
        id: u64,
        note: Option<String>,
    }

    #[test]
    fn json_codec_round_trips_and_matches_serde_json() {
        let order = Order {
            id: 7,
            note: Some("rush".into()),
        };
        let bytes = JsonCodec::encode(&order).expect("encodes");
        assert_eq!(&bytes[..], br#"{"id":7,"note":"rush"}"#);
        let back: Order = JsonCodec::decode(&bytes).expect("decodes");
        assert_eq!(back, order);
        assert!(<JsonCodec as Decode<Order>>::decode(b"{not json").is_err());
    }

    #[cfg(feature = "msgpack")]
    #[test]
    fn msgpack_codec_writes_structs_as_maps_and_refuses_trailing_bytes() {
        let order = Order { id: 7, note: None };
        let bytes = MsgPackCodec::encode(&order).expect("encodes");
        // fixmap of 2: "id" => 7, "note" => nil
        assert_eq!(&bytes[..], b"\x82\xa2id\x07\xa4note\xc0");
        let back: Order = MsgPackCodec::decode(&bytes).expect("decodes");
        assert_eq!(back, order);
        // The array form (rmp_serde::to_vec) is read too.
        let array = rmp_serde::to_vec(&order).expect("encodes");
        let back: Order = MsgPackCodec::decode(&array).expect("decodes");
        assert_eq!(back, order);

        let mut twice = bytes.to_vec();
        twice.extend_from_slice(&bytes);
        let err = <MsgPackCodec as Decode<Order>>::decode(&twice).expect_err("trailing bytes");
        assert_eq!(err.to_string(), "11 trailing bytes after the MessagePack value");
        assert!(<MsgPackCodec as Decode<Order>>::decode(b"\xc1").is_err());
        assert!(<MsgPackCodec as Decode<Order>>::decode(b"").is_err());
    }
}
