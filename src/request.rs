//! Request/reply on every broker: a request is a publish carrying `reply_to` and a correlation id; the
//! broker consumes its own reply topic and hands each reply to the request waiting for that id.
//!
//! The reply topic belongs to this broker handle (`ferrostream.replies.<random>`, one partition, read
//! from its start by a consumer of its own), created on the first request. A subscriber replies to any
//! message that carries `reply_to` with its handler's result (see
//! [guarantee 3.11](crate::guarantees)), so request/reply needs nothing on the replying side.

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use crate::broker::Broker;
use crate::error::PublishError;
use crate::handler::IntoPayload;
use crate::message::Message;
use crate::publish::Publish;

/// The start of every reply topic's name (and of its consumer's).
pub(crate) const REPLY_PREFIX: &str = "ferrostream.replies.";
/// The default time a request waits for its reply.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The requests of one broker handle waiting for replies, and the consumer of its reply topic.
pub(crate) struct Replies {
    pub(crate) topic: String,
    /// Correlation id prefix unique to this handle; ids are `<prefix>-<n>`.
    prefix: String,
    next: AtomicU64,
    waiting: Mutex<HashMap<String, oneshot::Sender<Message>>>,
    /// Held to keep the reply consumer running: dropping it (with the broker handle) stops it.
    _stop: watch::Sender<bool>,
}

impl Replies {
    /// Starts consuming a new reply topic of `broker`.
    pub(crate) async fn start(broker: &Broker) -> Result<Arc<Replies>, PublishError> {
        let nonce = nonce();
        let topic = format!("{REPLY_PREFIX}{nonce:016x}");
        let (stop, stop_rx) = watch::channel(false);
        let replies = Arc::new(Replies {
            topic: topic.clone(),
            prefix: format!("{nonce:016x}"),
            next: AtomicU64::new(0),
            waiting: Mutex::new(HashMap::new()),
            _stop: stop,
        });
        let weak: Weak<Replies> = Arc::downgrade(&replies);
        broker
            .start_internal(&topic, stop_rx, move |msg: Message| {
                let weak = weak.clone();
                async move {
                    if let Some(replies) = weak.upgrade() {
                        replies.deliver(msg);
                    }
                }
            })
            .await?;
        Ok(replies)
    }

    fn deliver(&self, msg: Message) {
        let Some(id) = msg.correlation_id() else {
            tracing::debug!(topic = %self.topic, "a message without correlation id on the reply topic: dropped");
            return;
        };
        match lock(&self.waiting).remove(id) {
            Some(tx) => {
                let _ = tx.send(msg);
            }
            // The request timed out or was dropped already: quiet, this is normal under timeouts.
            None => tracing::debug!(correlation_id = id, "a reply nobody waits for (timed out?)"),
        }
    }

    fn register(self: &Arc<Self>) -> (String, oneshot::Receiver<Message>, Waiting) {
        let id = format!("{}-{}", self.prefix, self.next.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(id.clone(), tx);
        let guard = Waiting {
            replies: self.clone(),
            id: id.clone(),
        };
        (id, rx, guard)
    }

    /// Requests waiting for their reply now.
    pub(crate) fn waiting(&self) -> usize {
        lock(&self.waiting).len()
    }
}

/// Removes a request from the waiting ones however it ends (reply, timeout, or its future dropped).
struct Waiting {
    replies: Arc<Replies>,
    id: String,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        lock(&self.replies.waiting).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only inserts, removes and takes: a panic cannot leave the map half-written.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// 64 bits unlikely to repeat across processes and handles: time, process id and a counter, mixed.
fn nonce() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = nanos ^ (u64::from(std::process::id()) << 32) ^ N.fetch_add(1, Ordering::Relaxed).rotate_left(17);
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A request being built; `.await` it for the reply (a [`Message`]: payload, headers, key).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use ferrostream::{App, Broker};
/// let broker = Broker::new("memory://")?;
/// broker.subscriber("greet").group_id("greeter").auto_commit(false)
///     .handle(|name: String| async move { format!("hello, {name}") });
/// let app = App::new(broker.clone()).start().await?;
/// let reply = broker.request("Ada", "greet").timeout(Duration::from_secs(5)).await?;
/// assert_eq!(reply.payload().as_ref(), b"hello, Ada");
/// app.shutdown().await?;
/// # Ok(()) }
/// ```
#[must_use = "nothing is sent until the request is awaited"]
pub struct PendingRequest {
    broker: Broker,
    publish: Publish,
    topic: String,
    timeout: Duration,
}

impl PendingRequest {
    pub(crate) fn new(broker: Broker, payload: impl IntoPayload, topic: &str) -> Self {
        PendingRequest {
            publish: broker.publish(payload, topic),
            broker,
            topic: topic.to_owned(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// How long to wait for the reply (default 30 s); then the request fails with
    /// [`PublishError::NoReply`]. The first request of a broker handle also starts its reply consumer
    /// (on Kafka: creates the reply topic and joins a group of its own, a few seconds) before this
    /// deadline starts.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the key of the request.
    pub fn key(mut self, key: impl Into<bytes::Bytes>) -> Self {
        self.publish = self.publish.key(key);
        self
    }

    /// Adds a header to the request.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<bytes::Bytes>) -> Self {
        self.publish = self.publish.header(name, value);
        self
    }
}

impl IntoFuture for PendingRequest {
    type Output = Result<Message, PublishError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let replies = self.broker.replies().await?;
            let (id, reply, _waiting) = replies.register();
            self.publish.reply_to(replies.topic.clone()).correlation_id(id).await?;
            match tokio::time::timeout(self.timeout, reply).await {
                Ok(Ok(msg)) => Ok(msg),
                // The waiting entry went without a reply (the broker handle is going away) or the
                // deadline passed.
                Ok(Err(_)) | Err(_) => Err(PublishError::NoReply {
                    topic: self.topic,
                    timeout: self.timeout,
                }),
            }
        })
    }
}
