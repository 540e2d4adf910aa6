//! Middleware around handler calls and around publishes, as [tower](https://docs.rs/tower) layers.
//!
//! A handler call is a tower [`Service`] from a [`Request`] (the message, or a batch) to the handler's
//! result (`Option<Response>`, what it publishes); a publish is a `Service` from an [`Outgoing`] record
//! to the broker's [`PublishAck`]. Any [`Layer`] over them composes: write your own with [`from_fn`] /
//! [`publish_from_fn`], or take one from the tower ecosystem (`tower::timeout::TimeoutLayer`,
//! `tower::limit::ConcurrencyLimitLayer`...; an error a layer makes is the handler's error, settled by
//! the ack policy like any other).
//!
//! A handler middleware sees the message before the call and the outcome after; it may short-circuit
//! (return without calling `next`), settle the message itself (`req.message().ack().await`), replace
//! the payload the handler decodes ([`Request::set_payload`]) or change the result.
//!
//! **Order.** Middleware is added on the broker ([`Broker::layer`](crate::Broker::layer)), on routers
//! ([`Router::layer`](crate::Router::layer)) and on subscribers
//! ([`SubscriberBuilder::layer`](crate::SubscriberBuilder::layer)). The broker's run outermost, then the
//! routers' from the outermost router in, then the subscriber's; at each level the first added runs
//! first (outermost). A subscriber without middleware calls its handler directly and pays nothing.
//! A layer is applied to each subscriber's chain on its own: state a layer keeps (a
//! `ConcurrencyLimitLayer`'s permits) is per subscriber even when the layer is added on the broker; use
//! `tower::limit::GlobalConcurrencyLimitLayer` for one limit across subscribers.
//! Publish middleware follows the same order: the broker's wrap every publish (`broker.publish`,
//! publisher objects, results, replies, dead letters); a router's or subscriber's wrap what the framework
//! publishes for its subscribers (results, replies, dead letters, retries).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use ferrostream::{Broker, middleware::{self, Next, Request}};
//!
//! let broker = Broker::new("memory://")?;
//! broker
//!     .subscriber("orders")
//!     .group_id("billing")
//!     .auto_commit(false)
//!     // Times each call; skips messages marked as tests.
//!     .layer(middleware::from_fn(|req: Request, next: Next| async move {
//!         if req.message().headers().get_str("test") == Some("true") {
//!             return Ok(None);
//!         }
//!         let started = std::time::Instant::now();
//!         let result = next.run(req).await;
//!         tracing::debug!(elapsed = ?started.elapsed(), ok = result.is_ok(), "handled");
//!         result
//!     }))
//!     .handle(|body: String| async move { println!("{body}") });
//! # Ok(()) }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};

use crate::error::{BoxError, Error, PublishError};
use crate::extract::{Context, StateMap};
use crate::handler::ErasedHandler;
use crate::message::Message;
use crate::response::Response;
pub use crate::transport::{Outgoing, PublishAck};

/// What a handler call returns: the result to publish, if any.
pub type Reply = Option<Response>;

/// The messages of one handler call.
#[derive(Clone)]
pub(crate) enum Messages {
    One(Message),
    Batch(Vec<Message>),
}

impl Messages {
    pub(crate) fn first(&self) -> Option<&Message> {
        match self {
            Messages::One(m) => Some(m),
            Messages::Batch(v) => v.first(),
        }
    }

    pub(crate) fn as_slice(&self) -> &[Message] {
        match self {
            Messages::One(m) => std::slice::from_ref(m),
            Messages::Batch(v) => v,
        }
    }
}

/// One handler call going through middleware: the message (or the batch) and what the handler's
/// extractors will see. Cheap to clone (handles and reference counts), so retrying layers can resend it.
#[derive(Clone)]
pub struct Request {
    pub(crate) messages: Messages,
    pub(crate) payload: Option<Bytes>,
    pub(crate) state: Arc<StateMap>,
}

impl Request {
    /// The message (in a batch, the first one).
    ///
    /// # Panics
    /// Never for a request the framework made: a call has at least one message.
    pub fn message(&self) -> &Message {
        self.messages.first().expect("a handler call has at least one message")
    }

    /// Every message of the call (one, or a batch subscriber's batch).
    pub fn batch(&self) -> &[Message] {
        self.messages.as_slice()
    }

    /// The payload the handler will decode: the message's, unless a middleware replaced it.
    pub fn payload(&self) -> &Bytes {
        self.payload.as_ref().unwrap_or_else(|| self.message().payload())
    }

    /// Replaces the payload the handler decodes (decryption, decompression, an envelope unwrapped...).
    /// The message handle itself, and what a dead-letter topic receives, keep the original. Applies to
    /// a single message; in a batch, to the first one.
    pub fn set_payload(&mut self, payload: impl Into<Bytes>) {
        self.payload = Some(payload.into());
    }

    pub(crate) fn context(&self) -> Option<Context<'_>> {
        let first = self.messages.first()?;
        Some(Context {
            message: first,
            payload: self.payload.as_ref().unwrap_or_else(|| first.payload()),
            batch: self.messages.as_slice(),
            state: &self.state,
        })
    }
}

/// The rest of the chain after a middleware: the next middleware, or the handler.
#[derive(Clone)]
pub struct Next(NextInner);

#[derive(Clone)]
enum NextInner {
    /// The handler itself: called directly (no clone of a boxed service, no second box of its future).
    Handler(Arc<dyn ErasedHandler>),
    /// A middleware, type-erased.
    Service(BoxCloneSyncService<Request, Reply, Error>),
}

impl Next {
    fn new<S>(service: S) -> Self
    where
        S: Service<Request, Response = Reply, Error = Error> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        Next(NextInner::Service(BoxCloneSyncService::new(service)))
    }

    /// Runs the rest of the chain.
    pub async fn run(self, req: Request) -> Result<Reply, Error> {
        match self.0 {
            NextInner::Handler(handler) => call_handler(&handler, req).await,
            NextInner::Service(service) => service.oneshot(req).await,
        }
    }

    /// The chain's future for one call, as the engine polls it.
    pub(crate) fn call_boxed(&self, req: Request) -> BoxFuture<'static, Result<Reply, Error>> {
        match &self.0 {
            NextInner::Handler(handler) => call_handler(handler, req),
            NextInner::Service(service) => Box::pin(service.clone().oneshot(req)),
        }
    }
}

/// Extracts the arguments and calls the handler (the extraction is synchronous: the request may go).
fn call_handler(handler: &Arc<dyn ErasedHandler>, req: Request) -> BoxFuture<'static, Result<Reply, Error>> {
    match req.context() {
        Some(cx) => handler.call(&cx),
        None => Box::pin(std::future::ready(Ok(None))),
    }
}

impl Service<Request> for Next {
    type Response = Reply;
    type Error = Error;
    type Future = BoxFuture<'static, Result<Reply, Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Error>> {
        match &mut self.0 {
            NextInner::Handler(_) => Poll::Ready(Ok(())),
            NextInner::Service(service) => service.poll_ready(cx),
        }
    }

    fn call(&mut self, req: Request) -> Self::Future {
        match &mut self.0 {
            NextInner::Handler(handler) => call_handler(handler, req),
            NextInner::Service(service) => service.call(req),
        }
    }
}

/// A handler middleware with its type erased: wraps the rest of the chain.
#[doc(hidden)]
pub type HandlerLayer = Arc<dyn Fn(Next) -> Next + Send + Sync>;

/// A publish middleware with its type erased.
#[doc(hidden)]
pub type PublishLayer = Arc<dyn Fn(PublishNext) -> PublishNext + Send + Sync>;

/// A tower [`Layer`] usable as handler middleware: over [`Next`], making a `Clone + Send + Sync`
/// service from a [`Request`] to the handler's result whose error converts into a boxed error (which
/// becomes the handler's error; [`Error::from_box`] keeps a ferrostream error, an interrupt included, as
/// it was). Implemented for every such layer; it only names those bounds once.
pub trait HandlerMiddleware: Send + Sync + 'static {
    /// The layer with its type erased.
    #[doc(hidden)]
    fn erase(self) -> HandlerLayer;
}

impl<L> HandlerMiddleware for L
where
    L: Layer<Next> + Send + Sync + 'static,
    L::Service: Service<Request, Response = Reply> + Clone + Send + Sync + 'static,
    <L::Service as Service<Request>>::Error: Into<BoxError>,
    <L::Service as Service<Request>>::Future: Send + 'static,
{
    fn erase(self) -> HandlerLayer {
        Arc::new(move |next| Next::new(self.layer(next).map_err(|e| Error::from_box(e.into()))))
    }
}

/// A tower [`Layer`] usable as publish middleware: over [`PublishNext`], making a `Clone + Send + Sync`
/// service from an [`Outgoing`] record to a [`PublishAck`]; an error that is not a [`PublishError`]
/// becomes [`PublishError::Middleware`]. Implemented for every such layer.
pub trait PublishMiddleware: Send + Sync + 'static {
    /// The layer with its type erased.
    #[doc(hidden)]
    fn erase(self) -> PublishLayer;
}

impl<L> PublishMiddleware for L
where
    L: Layer<PublishNext> + Send + Sync + 'static,
    L::Service: Service<Outgoing, Response = PublishAck> + Clone + Send + Sync + 'static,
    <L::Service as Service<Outgoing>>::Error: Into<BoxError>,
    <L::Service as Service<Outgoing>>::Future: Send + 'static,
{
    fn erase(self) -> PublishLayer {
        Arc::new(move |next| {
            PublishNext(PublishInner::Service(BoxCloneSyncService::new(
                self.layer(next).map_err(|e| PublishError::from_box(e.into())),
            )))
        })
    }
}

/// The handler of a subscriber wrapped in its middleware (outermost first in `layers`); `None` without
/// middleware, when the engine calls the handler directly.
pub(crate) fn handler_service(handler: Arc<dyn ErasedHandler>, layers: &[HandlerLayer]) -> Option<Next> {
    if layers.is_empty() {
        return None;
    }
    let inner = Next(NextInner::Handler(handler));
    Some(layers.iter().rev().fold(inner, |next, layer| layer(next)))
}

/// A layer from an async function of the request and the rest of the chain (like axum's `from_fn`).
/// See the [module docs](self) for an example.
pub fn from_fn<F, Fut>(f: F) -> FromFnLayer<F>
where
    F: Fn(Request, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Reply, Error>> + Send + 'static,
{
    FromFnLayer(f)
}

/// The layer [`from_fn`] makes.
#[derive(Clone)]
pub struct FromFnLayer<F>(F);

impl<F: Clone> Layer<Next> for FromFnLayer<F> {
    type Service = FromFn<F>;

    fn layer(&self, next: Next) -> FromFn<F> {
        FromFn {
            f: self.0.clone(),
            next,
        }
    }
}

/// The service [`from_fn`] makes.
#[derive(Clone)]
pub struct FromFn<F> {
    f: F,
    next: Next,
}

impl<F, Fut> Service<Request> for FromFn<F>
where
    F: Fn(Request, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Reply, Error>> + Send + 'static,
{
    type Response = Reply;
    type Error = Error;
    type Future = Fut;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Fut {
        (self.f)(req, self.next.clone())
    }
}

/// The rest of a publish chain: the next publish middleware, or the broker.
#[derive(Clone)]
pub struct PublishNext(PublishInner);

#[derive(Clone)]
enum PublishInner {
    /// The broker's sender itself, called directly.
    Sender(Arc<dyn crate::transport::Publisher>),
    /// A publish middleware, type-erased.
    Service(BoxCloneSyncService<Outgoing, PublishAck, PublishError>),
}

impl PublishNext {
    /// Sends the record on through the rest of the chain.
    pub async fn run(self, out: Outgoing) -> Result<PublishAck, PublishError> {
        match self.0 {
            PublishInner::Sender(sender) => sender.send(out).await,
            PublishInner::Service(service) => service.oneshot(out).await,
        }
    }
}

impl Service<Outgoing> for PublishNext {
    type Response = PublishAck;
    type Error = PublishError;
    type Future = BoxFuture<'static, Result<PublishAck, PublishError>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), PublishError>> {
        match &mut self.0 {
            PublishInner::Sender(_) => Poll::Ready(Ok(())),
            PublishInner::Service(service) => service.poll_ready(cx),
        }
    }

    fn call(&mut self, out: Outgoing) -> Self::Future {
        match &mut self.0 {
            PublishInner::Sender(sender) => sender.send(out),
            PublishInner::Service(service) => service.call(out),
        }
    }
}

/// A sender wrapped in publish middleware (outermost first in `layers`); the sender itself without any.
pub(crate) fn layered_sender(
    sender: Arc<dyn crate::transport::Publisher>,
    layers: &[PublishLayer],
) -> Arc<dyn crate::transport::Publisher> {
    if layers.is_empty() {
        return sender;
    }
    let inner = PublishNext(PublishInner::Sender(sender));
    Arc::new(layers.iter().rev().fold(inner, |next, layer| layer(next)))
}

impl crate::transport::Publisher for PublishNext {
    fn send(&self, out: Outgoing) -> BoxFuture<'static, Result<PublishAck, PublishError>> {
        match &self.0 {
            PublishInner::Sender(sender) => sender.send(out),
            PublishInner::Service(service) => Box::pin(service.clone().oneshot(out)),
        }
    }
}

/// A publish layer from an async function of the record and the rest of the chain.
///
/// ```
/// use ferrostream::{Broker, middleware::{self, Outgoing, PublishNext}};
/// let broker = Broker::new("memory://").unwrap()
///     .publish_layer(middleware::publish_from_fn(|mut out: Outgoing, next: PublishNext| async move {
///         out.headers_mut().set("app", "billing");
///         next.run(out).await
///     }));
/// # let _ = broker;
/// ```
pub fn publish_from_fn<F, Fut>(f: F) -> PublishFromFnLayer<F>
where
    F: Fn(Outgoing, PublishNext) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<PublishAck, PublishError>> + Send + 'static,
{
    PublishFromFnLayer(f)
}

/// The layer [`publish_from_fn`] makes.
#[derive(Clone)]
pub struct PublishFromFnLayer<F>(F);

impl<F: Clone> Layer<PublishNext> for PublishFromFnLayer<F> {
    type Service = PublishFromFn<F>;

    fn layer(&self, next: PublishNext) -> PublishFromFn<F> {
        PublishFromFn {
            f: self.0.clone(),
            next,
        }
    }
}

/// The service [`publish_from_fn`] makes.
#[derive(Clone)]
pub struct PublishFromFn<F> {
    f: F,
    next: PublishNext,
}

impl<F, Fut> Service<Outgoing> for PublishFromFn<F>
where
    F: Fn(Outgoing, PublishNext) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<PublishAck, PublishError>> + Send + 'static,
{
    type Response = PublishAck;
    type Error = PublishError;
    type Future = Fut;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), PublishError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, out: Outgoing) -> Fut {
        (self.f)(out, self.next.clone())
    }
}
