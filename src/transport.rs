//! The contract between the broker-agnostic engine and one broker's consumer.
//!
//! A backend implements [`ConsumerTransport`]; the engine ([`crate::engine`]) drives it. The engine
//! decides what is dispatched, settled and committed; the transport only moves records and offsets.

use std::future::Future;

use futures::future::BoxFuture;

use crate::error::BrokerError;
use crate::message::Record;
use crate::offset::TopicPartition;

/// Offsets to commit: the next offset to consume, per partition (Kafka's convention).
pub(crate) type Commits = Vec<(TopicPartition, i64)>;

/// Called once by the engine when it has drained revoked partitions, with the offsets to commit
/// before the partitions are released.
pub(crate) type RevokeReply = Box<dyn FnOnce(Commits) + Send>;

/// What a consumer transport tells the engine.
pub(crate) enum ConsumerEvent {
    /// Records, in offset order per partition.
    Records(Vec<Record>),
    /// Partitions now owned, positioned at the committed offset (or the reset policy).
    Assigned(Vec<TopicPartition>),
    /// Partitions being taken away. Nothing more arrives for them; the engine drains them and calls
    /// `reply` with the final offsets, which the transport commits before it releases the partitions.
    Revoked {
        partitions: Vec<TopicPartition>,
        reply: RevokeReply,
    },
}

/// One consumer-group member of one subscriber, as a broker backend provides it.
pub(crate) trait ConsumerTransport: Send + 'static {
    /// The next event. Must be cancel-safe: the engine drops this future whenever another event wins.
    /// `None` means the transport has failed for good or was closed.
    fn next(&mut self) -> impl Future<Output = Option<ConsumerEvent>> + Send;

    /// Stops fetching a partition (records already fetched may still arrive).
    fn pause(&mut self, tp: &TopicPartition);

    /// Fetches a paused partition again.
    fn resume(&mut self, tp: &TopicPartition);

    /// Commits offsets; the future resolves when the broker has acknowledged them. The engine keeps at
    /// most one commit in flight per consumer, so commits land in order.
    fn commit(&mut self, commits: Commits) -> BoxFuture<'static, Result<(), BrokerError>>;

    /// Commits `final_commits` synchronously, then leaves the group and releases every resource.
    fn close(self, final_commits: Commits) -> impl Future<Output = Result<(), BrokerError>> + Send;
}
