//! One handler call: the handler future (panics caught), then the publish of its result.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use futures::future::BoxFuture;

use super::panics;
use super::*;
use crate::error::Error;
use crate::extract::Context;
pub(crate) use crate::middleware::Messages;
use crate::middleware::Request;
use bytes::Bytes;

use crate::message::CORRELATION_ID;
use crate::response::Response;
use crate::transport::Outgoing;

/// A handler call that ended: its messages and what it returned.
pub(crate) enum Completion {
    /// The message, the outcome, and when the call ended (its result's publish included).
    One(Message, Result<(), Error>, Timing),
    Batch(Vec<Message>, Result<(), Error>, Timing),
}

/// When a handler call started and ended. A call that ends on its first poll hands its end to the next
/// call of the dispatch loop as that one's start, so a fast handler costs one clock read per call, not
/// two (the engine's own work between the two calls, well under a microsecond, counts in the second).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) took: std::time::Duration,
    pub(crate) ended: quanta::Instant,
}

impl Completion {
    pub(crate) fn timing(&self) -> Timing {
        match self {
            Completion::One(_, _, t) | Completion::Batch(_, _, t) => *t,
        }
    }
}

/// One handler call under way (SPEC section 2): the handler's future (panics caught, SPEC 2.3), then the
/// publish of its result (SPEC 3.11). Written out rather than as an `async fn` so that it needs no box of
/// its own and, being `Unpin`, can be polled once in place and only then, if it waits, parked in
/// `running`.
pub(crate) struct Call {
    /// Only for a subscriber that publishes its handler's results (most do not, and then a call costs no
    /// reference count on the runtime).
    publish: Option<Arc<SubscriberRuntime>>,
    messages: Option<Messages>,
    stage: Stage,
    /// When the call started (quanta's TSC clock: a handler call reads it twice, and std's `Instant`
    /// costs twice as much).
    started: quanta::Instant,
    /// The log context of everything the handler (and its middleware) logs: entered on each poll.
    span: tracing::Span,
}

pub(super) enum Stage {
    Handler(BoxFuture<'static, Result<Option<Response>, Error>>),
    Publishing(BoxFuture<'static, Result<(), Error>>),
    /// Ended before it started: the extraction or the call itself failed.
    Ended(Result<(), Error>),
}

impl Call {
    /// Extracts the arguments and starts the handler (through its middleware, if it has any).
    /// A call that starts at `started` (the end of the call before it, or now).
    pub(super) fn new(rt: &Arc<SubscriberRuntime>, messages: Messages, started: quanta::Instant) -> Self {
        rt.counters.received(messages.as_slice().len());
        let span = match messages.first() {
            #[cfg(not(feature = "otel"))]
            Some(m) => tracing::info_span!(
                "handle",
                subscriber = %rt.cfg.name,
                topic = %m.topic(),
                partition = m.partition(),
                offset = m.offset(),
                correlation_id = %m.correlation_id().unwrap_or_default(),
                attempt = m.attempt(),
                batch = messages.as_slice().len(),
            ),
            #[cfg(feature = "otel")]
            Some(m) => {
                let span = tracing::info_span!(
                    "handle",
                    subscriber = %rt.cfg.name,
                    topic = %m.topic(),
                    partition = m.partition(),
                    offset = m.offset(),
                    correlation_id = %m.correlation_id().unwrap_or_default(),
                    attempt = m.attempt(),
                    batch = messages.as_slice().len(),
                    otel.kind = %"consumer",
                    otel.name = %format_args!("process {}", m.topic()),
                );
                let system = rt.counters.labels.get().map_or("other", |l| l.system);
                crate::otel::process(&span, m, messages.as_slice().len(), system, rt.cfg.group_id.as_deref());
                span
            }
            None => tracing::Span::none(),
        };
        let entered = span.enter();
        let stage = match &rt.service {
            Some(service) => Stage::Handler(service.call_boxed(Request {
                messages: messages.clone(),
                payload: None,
                state: rt.state.clone(),
            })),
            None => {
                let cx = messages.first().map(|first| Context {
                    message: first,
                    payload: first.payload(),
                    batch: messages.as_slice(),
                    state: &rt.state,
                });
                match cx.map(|cx| panics::catch(|| rt.handler.call(&cx))) {
                    Some(Ok(fut)) => Stage::Handler(fut),
                    Some(Err(panic)) => Stage::Ended(Err(Error::panic(panic))),
                    None => Stage::Ended(Ok(())),
                }
            }
        };
        Call {
            publish: rt.publishes(messages.as_slice()).then(|| rt.clone()),
            messages: Some(messages),
            stage,
            started,
            span: {
                drop(entered);
                span
            },
        }
    }
}

impl Future for Call {
    type Output = Completion;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Completion> {
        let this = &mut *self;
        let _in_context = this.span.enter();
        loop {
            let result = match &mut this.stage {
                Stage::Handler(fut) => match panics::catch(|| fut.as_mut().poll(cx)) {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(Ok(response))) if this.publish.is_some() => {
                        match (this.messages.clone(), &this.publish) {
                            (Some(messages), Some(rt)) => {
                                this.stage =
                                    Stage::Publishing(Box::pin(publish_result(rt.clone(), messages, response)));
                                continue;
                            }
                            _ => Ok(()),
                        }
                    }
                    Ok(Poll::Ready(r)) => r.map(|_| ()),
                    Err(panic) => Err(Error::panic(panic)),
                },
                // Publish middleware is user code too: a panic in it fails this call, not the engine.
                Stage::Publishing(fut) => match panics::catch(|| fut.as_mut().poll(cx)) {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(r)) => r,
                    Err(panic) => Err(Error::panic(panic)),
                },
                Stage::Ended(r) => std::mem::replace(r, Ok(())),
            };
            let ended = quanta::Instant::now();
            let took = Timing {
                took: ended.saturating_duration_since(this.started),
                ended,
            };
            #[cfg(feature = "otel")]
            if let Err(e) = &result {
                crate::otel::failed(&this.span, e);
            }
            return Poll::Ready(match this.messages.take() {
                Some(Messages::One(m)) => Completion::One(m, result, took),
                Some(Messages::Batch(v)) => Completion::Batch(v, result, took),
                // Polled again after it completed: a bug in the caller, not in the handler.
                None => Completion::Batch(Vec::new(), result, took),
            });
        }
    }
}

/// Guarantee 3.11: the result is published (and acknowledged) to every `publish_to` destination before
/// the incoming message is settled, and sent as the reply to each message of the call that asked for one
/// (a request whose handler returned nothing gets an empty reply, so that the requester is not left
/// waiting). A failed result publish fails the call; a failed reply does not (the requester may be gone:
/// it times out), it is logged.
pub(super) async fn publish_result(
    rt: Arc<SubscriberRuntime>,
    messages: Messages,
    response: Option<Response>,
) -> Result<(), Error> {
    let Some(first) = messages.first() else {
        return Ok(());
    };
    let (payload, key, headers) = match response {
        Some(r) => (Some(r.payload?), r.key, r.headers),
        None => (None, None, Default::default()),
    };
    let correlation = |msg: &Message| {
        msg.correlation_id()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{}-{}", msg.topic_partition(), msg.offset()))
    };
    let record = |msg: &Message, topic: String, payload: Bytes| {
        let mut out = Outgoing::new(topic, payload);
        out.key = key.clone().or_else(|| msg.key().cloned());
        out.headers = headers.clone();
        out.headers.set(CORRELATION_ID, correlation(msg).into_bytes());
        out
    };
    if let Some(payload) = &payload {
        for target in &rt.cfg.publish_to {
            let mut out = record(first, target.topic.clone(), payload.clone());
            target.defaults.apply(&mut out);
            rt.publisher.send(out).await.map_err(Error::handler)?;
        }
    }
    for msg in messages.as_slice() {
        if let Some(reply_to) = msg.reply_to() {
            let mut out = record(msg, reply_to.to_owned(), payload.clone().unwrap_or_default());
            out.mandatory = false;
            if let Err(e) = rt.publisher.send(out).await {
                tracing::warn!(subscriber = %rt.cfg.name, reply_to, error = %e,
                    "the reply could not be published; the requester will time out");
            }
        }
    }
    Ok(())
}
