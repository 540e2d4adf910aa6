//! Filters: several handlers on one subscriber, each chosen by a predicate on the message.

use std::any::TypeId;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::future::BoxFuture;

use crate::asyncapi::{Payload, Schemas};
use crate::error::Error;
use crate::extract::Context;
use crate::handler::ErasedHandler;
use crate::message::Message;
use crate::response::Response;
use crate::settle::Settle;

/// A predicate on a message.
pub(crate) type Accepts = Arc<dyn Fn(&Message) -> bool + Send + Sync>;

/// One filter: the predicate and the handler of the messages it accepts.
pub(crate) struct Route {
    pub(crate) accepts: Accepts,
    pub(crate) handler: Arc<dyn ErasedHandler>,
}

/// The handler of a filtered subscriber: the first route that accepts a message handles it; else the
/// fallback; else the message is rejected (dead-lettered where a dead-letter topic is set).
pub(crate) struct Routed {
    pub(crate) routes: Vec<Route>,
    pub(crate) fallback: Option<Arc<dyn ErasedHandler>>,
    pub(crate) unmatched: AtomicU64,
}

impl Routed {
    pub(crate) fn new(routes: Vec<Route>, fallback: Option<Arc<dyn ErasedHandler>>) -> Self {
        Routed {
            routes,
            fallback,
            unmatched: AtomicU64::new(0),
        }
    }
}

impl ErasedHandler for Routed {
    fn call(&self, cx: &Context<'_>) -> BoxFuture<'static, Result<Option<Response>, Error>> {
        let msg = cx.message();
        if let Some(route) = self.routes.iter().find(|r| (r.accepts)(msg)) {
            return route.handler.call(cx);
        }
        if let Some(fallback) = &self.fallback {
            return fallback.call(cx);
        }
        // Logged in full the first time, then as a count at 10, 100, 1000...: a stream of messages no
        // filter accepts does not flood the log.
        let n = self.unmatched.fetch_add(1, Ordering::Relaxed) + 1;
        if n == 1 || (n.is_multiple_of(10) && (n as f64).log10().fract() == 0.0) {
            tracing::warn!(
                subscriber = msg.subscriber(),
                topic = msg.topic(),
                partition = msg.partition(),
                offset = msg.offset(),
                unmatched_so_far = n,
                "no filter of the subscriber accepts the message: rejected (add `.handle(..)` after the `.when(..)`s \
                 for the messages no filter accepts)"
            );
        }
        Box::pin(std::future::ready(Err(Error::interrupt_because(
            Settle::Reject,
            "no filter of the subscriber accepts the message",
        ))))
    }

    fn required_state(&self) -> Vec<(TypeId, &'static str)> {
        self.routes
            .iter()
            .map(|r| &r.handler)
            .chain(&self.fallback)
            .flat_map(|h| h.required_state())
            .collect()
    }

    fn describe(&self, schemas: &mut Schemas) -> (Vec<Payload>, Vec<Payload>) {
        let (mut received, mut results) = (Vec::new(), Vec::new());
        for handler in self.routes.iter().map(|r| &r.handler).chain(&self.fallback) {
            let (r, p) = handler.describe(schemas);
            for (all, new) in [(&mut received, r), (&mut results, p)] {
                for payload in new {
                    if !all.contains(&payload) {
                        all.push(payload);
                    }
                }
            }
        }
        (received, results)
    }
}
