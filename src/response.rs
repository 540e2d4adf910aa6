//! What a handler returns to be published: a payload, optionally with a key and headers.

use bytes::Bytes;

use crate::error::Error;
use crate::handler::IntoPayload;
use crate::message::Headers;

/// A handler's result with the key and headers it is published with (to the subscriber's `publish_to`
/// publishers and, when the message asked for one, as its reply). Returning a bare payload is the same
/// as returning `Response::new(payload)`.
///
/// ```
/// use ferrostream::{Json, Response};
/// #[derive(serde::Serialize, schemars::JsonSchema)]
/// struct Shipped { order: u64 }
/// async fn ship(body: String) -> Response {
///     Response::new(Json(Shipped { order: body.len() as u64 }))
///         .key("order-42")
///         .header("source", "shipping")
/// }
/// # fn assert_handler<A, H: ferrostream::Handler<A>>(_: H) {}
/// # assert_handler(ship);
/// ```
#[derive(Debug)]
pub struct Response {
    pub(crate) payload: Result<Bytes, Error>,
    pub(crate) key: Option<Bytes>,
    pub(crate) headers: Headers,
}

impl Response {
    /// A response carrying this payload (encoded now; an encoding failure is the handler's error).
    pub fn new(payload: impl IntoPayload) -> Self {
        Response {
            payload: payload.into_payload(),
            key: None,
            headers: Headers::new(),
        }
    }

    /// Publishes the result with this key (by default: the incoming message's key).
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header to the published result.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// The encoded payload.
    pub fn payload(&self) -> Option<&Bytes> {
        self.payload.as_ref().ok()
    }

    /// The key set on this response, if any.
    pub fn key_ref(&self) -> Option<&Bytes> {
        self.key.as_ref()
    }

    /// The headers set on this response.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// Replaces the payload (for middleware that transforms results).
    pub fn set_payload(&mut self, payload: impl IntoPayload) {
        self.payload = payload.into_payload();
    }

    /// Headers to edit (for middleware that adds to results).
    pub fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }
}

impl From<Bytes> for Response {
    fn from(payload: Bytes) -> Self {
        Response {
            payload: Ok(payload),
            key: None,
            headers: Headers::new(),
        }
    }
}
