//! One handler call: the handler future (panics caught), then the publish of its result.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use bytes::Bytes;
use futures::future::BoxFuture;

use super::panics;
use super::*;
use crate::error::Error;
use crate::extract::Context;
use crate::message::CORRELATION_ID;
use crate::transport::Outgoing;

/// A handler call that ended: its messages and what it returned.
pub(crate) enum Completion {
    One(Message, Result<(), Error>),
    Batch(Vec<Message>, Result<(), Error>),
}

/// The messages of one handler call.
pub(super) enum Messages {
    One(Message),
    Batch(Vec<Message>),
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
}

pub(super) enum Stage {
    Handler(BoxFuture<'static, Result<Option<Bytes>, Error>>),
    Publishing(BoxFuture<'static, Result<(), Error>>),
    /// Ended before it started: the extraction or the call itself failed.
    Ended(Result<(), Error>),
}

impl Call {
    /// Extracts the arguments and starts the handler.
    pub(super) fn new(rt: &Arc<SubscriberRuntime>, messages: Messages) -> Self {
        let stage = {
            let cx = match &messages {
                Messages::One(m) => Some(Context::single(m, &rt.state)),
                Messages::Batch(v) => v.first().map(|first| Context {
                    message: first,
                    batch: v,
                    state: &rt.state,
                }),
            };
            match cx.map(|cx| panics::catch(|| rt.handler.call(&cx))) {
                Some(Ok(fut)) => Stage::Handler(fut),
                Some(Err(panic)) => Stage::Ended(Err(Error::panic(panic))),
                None => Stage::Ended(Ok(())),
            }
        };
        Call {
            publish: (!rt.cfg.publish_to.is_empty()).then(|| rt.clone()),
            messages: Some(messages),
            stage,
        }
    }

    pub(super) fn first(&self) -> Option<&Message> {
        match self.messages.as_ref()? {
            Messages::One(m) => Some(m),
            Messages::Batch(v) => v.first(),
        }
    }
}

impl Future for Call {
    type Output = Completion;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Completion> {
        let this = &mut *self;
        loop {
            let result = match &mut this.stage {
                Stage::Handler(fut) => match panics::catch(|| fut.as_mut().poll(cx)) {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(Ok(Some(payload)))) if this.publish.is_some() => {
                        match (this.first().cloned(), &this.publish) {
                            (Some(msg), Some(rt)) => {
                                this.stage = Stage::Publishing(Box::pin(publish_result(rt.clone(), msg, payload)));
                                continue;
                            }
                            _ => Ok(()),
                        }
                    }
                    Ok(Poll::Ready(r)) => r.map(|_| ()),
                    Err(panic) => Err(Error::panic(panic)),
                },
                Stage::Publishing(fut) => match fut.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(r) => r,
                },
                Stage::Ended(r) => std::mem::replace(r, Ok(())),
            };
            return Poll::Ready(match this.messages.take() {
                Some(Messages::One(m)) => Completion::One(m, result),
                Some(Messages::Batch(v)) => Completion::Batch(v, result),
                // Polled again after it completed: a bug in the caller, not in the handler.
                None => Completion::Batch(Vec::new(), result),
            });
        }
    }
}

/// SPEC 3.11: the result is published (and acknowledged) before the incoming message is settled.
pub(super) async fn publish_result(rt: Arc<SubscriberRuntime>, msg: Message, payload: Bytes) -> Result<(), Error> {
    let correlation = msg
        .correlation_id()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{}-{}", msg.topic_partition(), msg.offset()));
    for topic in &rt.cfg.publish_to {
        let mut out = Outgoing::new(topic.clone(), payload.clone());
        out.key = msg.key().cloned();
        out.headers.set(CORRELATION_ID, correlation.clone().into_bytes());
        rt.publisher.send(out).await.map_err(Error::handler)?;
    }
    Ok(())
}
