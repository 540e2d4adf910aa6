//! Handlers: plain `async fn`s whose arguments are extractors and whose return value says what happened.
//!
//! A handler may return `()`, a payload to publish (`String`, `&'static str`, `Bytes`, `Vec<u8>`,
//! [`Json<T>`]), `Option` of a payload, or `Result<R, E>` of any of those with any error type `E` that
//! converts into a boxed error (`ferrostream::Error`, your own error enums, `anyhow::Error`...).

use std::any::TypeId;
use std::future::Future;
use std::marker::PhantomData;

use bytes::Bytes;
use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::Serialize;

use crate::asyncapi::{Payload, Schemas};
use crate::error::{BoxError, Error};
use crate::extract::{Context, FromMessage, Json};
use crate::response::Response;

/// A value a handler can return to be published to the subscriber's `publish_to` topics.
pub trait IntoPayload {
    /// Encodes the value.
    fn into_payload(self) -> Result<Bytes, Error>;

    /// What the payload looks like, for the service's AsyncAPI description (`None`: not described).
    fn describe_payload(_schemas: &mut Schemas) -> Option<Payload>
    where
        Self: Sized,
    {
        None
    }
}

impl IntoPayload for Bytes {
    fn into_payload(self) -> Result<Bytes, Error> {
        Ok(self)
    }
    fn describe_payload(schemas: &mut Schemas) -> Option<Payload> {
        Some(schemas.bytes())
    }
}
impl IntoPayload for Vec<u8> {
    fn into_payload(self) -> Result<Bytes, Error> {
        Ok(Bytes::from(self))
    }
    fn describe_payload(schemas: &mut Schemas) -> Option<Payload> {
        Some(schemas.bytes())
    }
}
impl IntoPayload for String {
    fn into_payload(self) -> Result<Bytes, Error> {
        Ok(Bytes::from(self))
    }
    fn describe_payload(schemas: &mut Schemas) -> Option<Payload> {
        Some(schemas.text())
    }
}
impl IntoPayload for &'static str {
    fn into_payload(self) -> Result<Bytes, Error> {
        Ok(Bytes::from_static(self.as_bytes()))
    }
    fn describe_payload(schemas: &mut Schemas) -> Option<Payload> {
        Some(schemas.text())
    }
}
impl<T: Serialize + JsonSchema> IntoPayload for Json<T> {
    fn into_payload(self) -> Result<Bytes, Error> {
        serde_json::to_vec(&self.0).map(Bytes::from).map_err(Error::handler)
    }
    fn describe_payload(schemas: &mut Schemas) -> Option<Payload> {
        Some(schemas.json::<T>())
    }
}

/// What a handler's return value means: success with something to publish or not, or an error.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be returned from a handler",
    label = "not a handler return value",
    note = "a handler returns `()`, a payload to publish (`String`, `&'static str`, `Bytes`, `Vec<u8>`, \
            `Json<T>`), an `Option` of one, or a `Result` of those with an error convertible into \
            `Box<dyn Error + Send + Sync>`",
    note = "to publish your own struct, return `Json(value)`"
)]
pub trait HandlerReturn: Send + 'static {
    /// Converts the return value.
    fn into_outcome(self) -> Result<Option<Response>, Error>;

    /// What a successful call publishes (and replies), for the service's AsyncAPI description.
    fn describe_result(_schemas: &mut Schemas) -> Option<Payload> {
        None
    }
}

impl HandlerReturn for () {
    fn into_outcome(self) -> Result<Option<Response>, Error> {
        Ok(None)
    }
}

impl<R: HandlerReturn, E: Into<BoxError> + Send + 'static> HandlerReturn for Result<R, E> {
    fn into_outcome(self) -> Result<Option<Response>, Error> {
        match self {
            Ok(r) => r.into_outcome(),
            Err(e) => Err(Error::from_box(e.into())),
        }
    }
    fn describe_result(schemas: &mut Schemas) -> Option<Payload> {
        R::describe_result(schemas)
    }
}

impl<P: IntoPayload + Send + 'static> HandlerReturn for Option<P> {
    fn into_outcome(self) -> Result<Option<Response>, Error> {
        Ok(self.map(Response::new))
    }
    fn describe_result(schemas: &mut Schemas) -> Option<Payload> {
        P::describe_payload(schemas)
    }
}

impl HandlerReturn for Response {
    fn into_outcome(self) -> Result<Option<Response>, Error> {
        match self.payload {
            Ok(_) => Ok(Some(self)),
            Err(e) => Err(e),
        }
    }
}

impl HandlerReturn for Option<Response> {
    fn into_outcome(self) -> Result<Option<Response>, Error> {
        self.map_or(Ok(None), HandlerReturn::into_outcome)
    }
}

/// Implements [`HandlerReturn`] for payload types: returning one publishes it as a [`Response`].
macro_rules! payload_return {
    ($($t:ty),*) => {$(
        impl HandlerReturn for $t {
            fn into_outcome(self) -> Result<Option<Response>, Error> {
                Ok(Some(Response::new(self)))
            }
            fn describe_result(schemas: &mut Schemas) -> Option<Payload> {
                <$t as IntoPayload>::describe_payload(schemas)
            }
        }
    )*};
}

payload_return!(Bytes, Vec<u8>, String, &'static str);

impl<T: Serialize + JsonSchema + Send + 'static> HandlerReturn for Json<T> {
    fn into_outcome(self) -> Result<Option<Response>, Error> {
        Ok(Some(Response::new(self)))
    }
    fn describe_result(schemas: &mut Schemas) -> Option<Payload> {
        Some(schemas.json::<T>())
    }
}

/// An async function usable as a handler: every argument implements [`FromMessage`], the output
/// implements [`HandlerReturn`]. Implemented for functions of up to 8 arguments.
///
/// ```
/// use ferrostream::{Message, Json};
/// #[derive(serde::Deserialize, schemars::JsonSchema)]
/// struct Order { id: u64 }
/// async fn handle(Json(order): Json<Order>, msg: Message) -> Result<(), ferrostream::Error> {
///     if order.id == 0 {
///         msg.reject().await;
///     }
///     Ok(())
/// }
/// # fn assert_handler<A, H: ferrostream::Handler<A>>(_: H) {}
/// # assert_handler(handle);
/// ```
#[diagnostic::on_unimplemented(
    message = "this is not a ferrostream handler",
    label = "not a handler",
    note = "a handler is an `async fn` or a closure returning a future (`|body: String| async move {{ .. }}`), \
            `Clone + Send + Sync`; its future must be `Send` (no `Rc` or `RefCell` across an `.await`)",
    note = "check each argument: at most 8, each an owned extractor (`String`, not `&str`; `Json<MyStruct>`, \
            not `MyStruct`; `Bytes`, `Message`, `Headers`, `Key`, `Attempt`, `State<T>`, `Batch<T>`; other \
            formats: `MsgPack<T>`, `codec::Encoded<C, T>`)",
    note = "and the return value: `()`, a payload to publish (`String`, `Bytes`, `Vec<u8>`, `Json<T>`, \
            `MsgPack<T>`, `codec::Encoded<C, T>`), an `Option` of one, or a `Result` of those (a number or your \
            own struct is not a payload: wrap it in `Json(..)`)"
)]
pub trait Handler<Args>: Clone + Send + Sync + 'static {
    /// Extracts the arguments and runs the handler.
    fn call(&self, cx: &Context<'_>) -> BoxFuture<'static, Result<Option<Response>, Error>>;

    /// The shared state its extractors need (checked when the app starts).
    #[doc(hidden)]
    fn required_state(&self) -> Vec<(TypeId, &'static str)> {
        Vec::new()
    }

    /// The payload it reads (its first argument that reads one) and the payload it returns, for the
    /// service's AsyncAPI description.
    #[doc(hidden)]
    fn describe(&self, _schemas: &mut Schemas) -> (Option<Payload>, Option<Payload>) {
        (None, None)
    }
}

macro_rules! impl_handler {
    ($($arg:ident),*) => {
        impl<F, Fut, R, $($arg,)*> Handler<($($arg,)*)> for F
        where
            F: Fn($($arg),*) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = R> + Send + 'static,
            R: HandlerReturn,
            $($arg: FromMessage,)*
        {
            #[allow(non_snake_case, unused_variables)]
            fn call(&self, cx: &Context<'_>) -> BoxFuture<'static, Result<Option<Response>, Error>> {
                $(
                    let $arg = match $arg::from_message(cx) {
                        Ok(v) => v,
                        Err(e) => return Box::pin(std::future::ready(Err(e))),
                    };
                )*
                let fut = (self)($($arg),*);
                Box::pin(async move { fut.await.into_outcome() })
            }

            fn required_state(&self) -> Vec<(TypeId, &'static str)> {
                let needed: [Option<(TypeId, &'static str)>; 0 $(+ { let _ = stringify!($arg); 1 })*] =
                    [$($arg::required_state(),)*];
                needed.into_iter().flatten().collect()
            }

            fn describe(&self, schemas: &mut Schemas) -> (Option<Payload>, Option<Payload>) {
                let received: Option<Payload> = None;
                $(let received = received.or_else(|| $arg::describe_payload(schemas));)*
                (received, R::describe_result(schemas))
            }
        }
    };
}

impl_handler!();
impl_handler!(A1);
impl_handler!(A1, A2);
impl_handler!(A1, A2, A3);
impl_handler!(A1, A2, A3, A4);
impl_handler!(A1, A2, A3, A4, A5);
impl_handler!(A1, A2, A3, A4, A5, A6);
impl_handler!(A1, A2, A3, A4, A5, A6, A7);
impl_handler!(A1, A2, A3, A4, A5, A6, A7, A8);

/// A handler with its argument types erased, as the engine stores it.
pub(crate) trait ErasedHandler: Send + Sync + 'static {
    fn call(&self, cx: &Context<'_>) -> BoxFuture<'static, Result<Option<Response>, Error>>;
    fn required_state(&self) -> Vec<(TypeId, &'static str)>;
    /// What it receives and what it returns (several, for a subscriber with filters).
    fn describe(&self, schemas: &mut Schemas) -> (Vec<Payload>, Vec<Payload>);
}

pub(crate) struct Erased<H, Args> {
    handler: H,
    _args: PhantomData<fn() -> Args>,
}

impl<H, Args> Erased<H, Args> {
    pub(crate) fn new(handler: H) -> Self {
        Erased {
            handler,
            _args: PhantomData,
        }
    }
}

impl<H: Handler<Args>, Args: 'static> ErasedHandler for Erased<H, Args> {
    fn required_state(&self) -> Vec<(TypeId, &'static str)> {
        self.handler.required_state()
    }

    fn describe(&self, schemas: &mut Schemas) -> (Vec<Payload>, Vec<Payload>) {
        let (received, result) = self.handler.describe(schemas);
        (received.into_iter().collect(), result.into_iter().collect())
    }

    fn call(&self, cx: &Context<'_>) -> BoxFuture<'static, Result<Option<Response>, Error>> {
        self.handler.call(cx)
    }
}
