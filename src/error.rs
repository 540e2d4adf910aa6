//! Errors: the handler-facing [`Error`], the settling interrupts and the typed errors of each layer.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use crate::settle::Settle;

/// Any error a handler may return.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Interrupts the handler and acks the message immediately, under every policy ([guarantee 2.2](crate::guarantees)).
///
/// ```
/// fn smth_processing(body: &str) -> Result<(), ferrostream::Error> {
///     if body.is_empty() {
///         return Err(ferrostream::AckMessage.into());
///     }
///     Ok(())
/// }
/// assert!(smth_processing("").unwrap_err().interrupt().is_some());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AckMessage;

/// Interrupts the handler and nacks the message (redelivery), optionally after a delay.
///
/// ```
/// use std::time::Duration;
/// let e: ferrostream::Error = ferrostream::NackMessage::after(Duration::from_millis(50)).into();
/// assert_eq!(e.interrupt(), Some(ferrostream::Settle::Nack { delay: Some(Duration::from_millis(50)) }));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NackMessage {
    /// Minimum time before the message is delivered again.
    pub delay: Option<Duration>,
}

impl NackMessage {
    /// A nack that redelivers no earlier than `delay` from now.
    pub fn after(delay: Duration) -> Self {
        NackMessage { delay: Some(delay) }
    }
}

/// Interrupts the handler and rejects the message: it is never delivered again.
///
/// ```
/// let e: ferrostream::Error = ferrostream::RejectMessage.into();
/// assert_eq!(e.interrupt(), Some(ferrostream::Settle::Reject));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RejectMessage;

impl fmt::Display for AckMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("processing interrupted: ack the message")
    }
}
impl fmt::Display for NackMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.delay {
            Some(d) => write!(f, "processing interrupted: nack the message (redeliver after {d:?})"),
            None => f.write_str("processing interrupted: nack the message"),
        }
    }
}
impl fmt::Display for RejectMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("processing interrupted: reject the message")
    }
}
impl StdError for AckMessage {}
impl StdError for NackMessage {}
impl StdError for RejectMessage {}

/// A payload that could not be decoded into the handler's argument type ([guarantee 2.4](crate::guarantees)).
#[derive(Debug)]
pub struct DecodeError {
    /// The subscriber whose handler asked for the value.
    pub subscriber: String,
    /// The Rust type the payload was decoded into.
    pub target: &'static str,
    /// What went wrong.
    pub cause: BoxError,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "subscriber `{}`: cannot decode payload into `{}`: {}",
            self.subscriber, self.target, self.cause
        )
    }
}

impl StdError for DecodeError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(self.cause.as_ref())
    }
}

/// What a failed handler call failed of: the typed kind behind an [`Outcome::Failed`](crate::Outcome),
/// the counters and a retry policy's choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureKind {
    /// The handler returned an error.
    Handler,
    /// The payload did not decode into the handler's argument type ([guarantee 2.4](crate::guarantees)).
    Decode,
    /// The handler panicked ([guarantee 2.3](crate::guarantees)).
    Panic,
}

impl FailureKind {
    /// `handler`, `decode` or `panic`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Handler => "handler",
            FailureKind::Decode => "decode",
            FailureKind::Panic => "panic",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error type of handlers and of code under them.
///
/// It carries either a settling interrupt ([`AckMessage`], [`NackMessage`], [`RejectMessage`]), a decode
/// failure, a caught panic, or any other error. Handlers may return `Result<_, E>` for any error type `E`
/// convertible into a boxed error; interrupts are recognised anywhere in its `source()` chain.
///
/// ```
/// use ferrostream::{Error, NackMessage};
/// fn check(n: u32) -> Result<u32, Error> {
///     if n == 0 {
///         Err(NackMessage::default())?;
///     }
///     Ok(n)
/// }
/// assert!(check(0).is_err());
/// ```
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    /// Why the framework interrupted the call (e.g. no filter accepted the message): what a dead-letter
    /// record says instead of the generic interrupt text.
    reason: Option<Box<str>>,
}

/// What an [`Error`] is.
#[derive(Debug)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Settle the message this way now ([guarantee 2.2](crate::guarantees)).
    Interrupt(Settle),
    /// The payload did not decode ([guarantee 2.4](crate::guarantees)).
    Decode(DecodeError),
    /// The handler panicked ([guarantee 2.3](crate::guarantees)); the panic message.
    Panic(String),
    /// Any other handler error.
    Handler(BoxError),
}

impl Error {
    /// Wraps any error as a handler error.
    pub fn handler(err: impl Into<BoxError>) -> Self {
        Error::from_box(err.into())
    }

    /// Wraps a boxed error, recognising interrupts and known kinds inside it.
    pub(crate) fn from_box(err: BoxError) -> Self {
        let err = match err.downcast::<Error>() {
            Ok(e) => return *e,
            Err(e) => e,
        };
        let err = match err.downcast::<DecodeError>() {
            Ok(d) => {
                return Error {
                    kind: ErrorKind::Decode(*d),
                    reason: None,
                };
            }
            Err(e) => e,
        };
        if let Some(settle) = interrupt_in_chain(err.as_ref()) {
            return Error {
                kind: ErrorKind::Interrupt(settle),
                reason: None,
            };
        }
        Error {
            kind: ErrorKind::Handler(err),
            reason: None,
        }
    }

    /// An interrupt the framework makes, with the reason a dead-letter record gives.
    pub(crate) fn interrupt_because(settle: Settle, reason: impl Into<Box<str>>) -> Self {
        Error {
            kind: ErrorKind::Interrupt(settle),
            reason: Some(reason.into()),
        }
    }

    /// Why the framework interrupted the call, when it said.
    pub(crate) fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    pub(crate) fn panic(message: String) -> Self {
        Error {
            kind: ErrorKind::Panic(message),
            reason: None,
        }
    }

    /// What this error is.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The settle this error demands, when it is an interrupt.
    pub fn interrupt(&self) -> Option<Settle> {
        match self.kind {
            ErrorKind::Interrupt(s) => Some(s),
            _ => None,
        }
    }

    /// The failure this error is, unless it is an interrupt (which settles, and is no failure).
    pub fn failure(&self) -> Option<FailureKind> {
        match self.kind {
            ErrorKind::Interrupt(_) => None,
            ErrorKind::Decode(_) => Some(FailureKind::Decode),
            ErrorKind::Panic(_) => Some(FailureKind::Panic),
            ErrorKind::Handler(_) => Some(FailureKind::Handler),
        }
    }

    /// A short label for logs: `interrupt`, `decode`, `panic` or `handler`.
    pub fn label(&self) -> &'static str {
        match self.kind {
            ErrorKind::Interrupt(_) => "interrupt",
            ErrorKind::Decode(_) => "decode",
            ErrorKind::Panic(_) => "panic",
            ErrorKind::Handler(_) => "handler",
        }
    }
}

fn interrupt_in_chain(err: &(dyn StdError + 'static)) -> Option<Settle> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.is::<AckMessage>() {
            return Some(Settle::Ack);
        }
        if let Some(n) = e.downcast_ref::<NackMessage>() {
            return Some(Settle::Nack { delay: n.delay });
        }
        if e.is::<RejectMessage>() {
            return Some(Settle::Reject);
        }
        if let Some(Error {
            kind: ErrorKind::Interrupt(s),
            ..
        }) = e.downcast_ref::<Error>()
        {
            return Some(*s);
        }
        cur = e.source();
    }
    None
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ErrorKind::Interrupt(s) => match &self.reason {
                Some(reason) => write!(f, "processing interrupted: {s} ({reason})"),
                None => write!(f, "processing interrupted: {s}"),
            },
            ErrorKind::Decode(d) => d.fmt(f),
            ErrorKind::Panic(m) => write!(f, "handler panicked: {m}"),
            ErrorKind::Handler(e) => e.fmt(f),
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match &self.kind {
            ErrorKind::Decode(d) => Some(d),
            ErrorKind::Handler(e) => Some(e.as_ref()),
            _ => None,
        }
    }
}

impl From<AckMessage> for Error {
    fn from(_: AckMessage) -> Self {
        Error {
            kind: ErrorKind::Interrupt(Settle::Ack),
            reason: None,
        }
    }
}
impl From<NackMessage> for Error {
    fn from(n: NackMessage) -> Self {
        Error {
            kind: ErrorKind::Interrupt(Settle::Nack { delay: n.delay }),
            reason: None,
        }
    }
}
impl From<RejectMessage> for Error {
    fn from(_: RejectMessage) -> Self {
        Error {
            kind: ErrorKind::Interrupt(Settle::Reject),
            reason: None,
        }
    }
}
impl From<DecodeError> for Error {
    fn from(d: DecodeError) -> Self {
        Error {
            kind: ErrorKind::Decode(d),
            reason: None,
        }
    }
}

/// A configuration that cannot work, found when the app starts (never at runtime).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The policy needs committed offsets, which need a consumer group.
    #[error(
        "subscriber `{subscriber}`: ack policy {policy} needs a consumer group; add `.group_id(\"...\")` \
         or use `.ack_policy(AckPolicy::AckFirst)`"
    )]
    MissingGroup {
        /// The subscriber.
        subscriber: String,
        /// Its policy.
        policy: crate::AckPolicy,
    },
    /// `auto_commit(..)` and `ack_policy(..)` disagree.
    #[error(
        "subscriber `{subscriber}`: auto_commit({auto_commit}) contradicts ack_policy({policy}); \
         auto_commit(true) means AckFirst, auto_commit(false) any other policy: set only one of them"
    )]
    ConflictingAckSettings {
        /// The subscriber.
        subscriber: String,
        /// The `auto_commit` value given.
        auto_commit: bool,
        /// The policy given.
        policy: crate::AckPolicy,
    },
    /// A subscriber setting is out of range.
    #[error("subscriber `{subscriber}`: {what}")]
    InvalidSetting {
        /// The subscriber.
        subscriber: String,
        /// What is wrong and what to change.
        what: String,
    },
    /// Two subscribers of one app have the same name (the name keys metrics, logs and the observer).
    #[error("two subscribers are named `{name}`; give one of them another `.name(\"...\")`")]
    DuplicateSubscriber {
        /// The name.
        name: String,
    },
    /// A topic the broker would refuse.
    #[error("subscriber `{subscriber}`: topic `{topic}`: {reason}")]
    InvalidTopic {
        /// The subscriber.
        subscriber: String,
        /// The topic (the subscriber's own, its dead-letter or retry topic, or one it publishes to).
        topic: String,
        /// What the broker would say, and what to change.
        reason: String,
    },
    /// A handler takes `State<T>` but no `T` was registered with the broker.
    #[error(
        "subscriber `{subscriber}`: the handler takes State<{state}> but none was registered: add \
         `.with_state(value)` to the broker before the app starts"
    )]
    MissingState {
        /// The subscriber.
        subscriber: String,
        /// The state's type.
        state: &'static str,
    },
    /// The broker URL could not be understood.
    #[error("broker URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// Why it is not usable.
        reason: String,
    },
}

/// A failure of the broker connection itself: connecting, committing, closing, leaving a group.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The broker client reported an error for an operation.
    #[error("{op}: {source}")]
    Client {
        /// The operation, e.g. `connect` or `commit`.
        op: &'static str,
        /// The client's error.
        source: BoxError,
    },
    /// An operation did not finish in time.
    #[error("{op} timed out after {timeout:?}")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// The Kafka client (librdkafka) reported an error code for an operation.
    #[error("{op}: {message} (Kafka error {code}, {kind:?})")]
    Kafka {
        /// The operation, e.g. `commit`, `publish` or `create topic`.
        op: &'static str,
        /// What the code means for the caller.
        kind: KafkaErrorKind,
        /// librdkafka's error code (`rd_kafka_resp_err_t`: negative for the client's own errors, the Kafka
        /// protocol's error code otherwise).
        code: i32,
        /// librdkafka's description of the code.
        message: String,
    },
    /// The broker committed some partitions' offsets and refused the others' (a partition no longer
    /// assigned to this member, a rebalance in progress): the refused ones are retried.
    #[error("commit refused for {}", refused_list(.refused))]
    PartialCommit {
        /// Each refused partition and the broker's reason.
        refused: Vec<(crate::offset::TopicPartition, String)>,
    },
    /// The broker handle was shut down.
    #[error("the broker connection is closed")]
    Closed,
}

fn refused_list(refused: &[(crate::offset::TopicPartition, String)]) -> String {
    refused
        .iter()
        .map(|(tp, why)| format!("{tp} ({why})"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl BrokerError {
    /// The kind of a Kafka client error, `None` for other errors.
    ///
    /// ```
    /// use ferrostream::{BrokerError, KafkaErrorKind};
    ///
    /// fn worth_paging(e: &BrokerError) -> bool {
    ///     matches!(e.kafka_kind(), Some(KafkaErrorKind::Authentication | KafkaErrorKind::Authorization))
    /// }
    /// assert!(!worth_paging(&BrokerError::Closed));
    /// ```
    pub fn kafka_kind(&self) -> Option<KafkaErrorKind> {
        match self {
            BrokerError::Kafka { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// What a Kafka client error code means for the caller: librdkafka's many codes grouped by what one does
/// about them. [`BrokerError::Kafka`] carries the code itself too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KafkaErrorKind {
    /// No broker answers (transport failure, all brokers down, name resolution, leader or coordinator not
    /// available): transient, the client keeps retrying.
    BrokerDown,
    /// The credentials were refused (SASL or SSL).
    Authentication,
    /// The principal may not use this topic, group, cluster or transactional id (an ACL).
    Authorization,
    /// The topic or partition does not exist.
    UnknownTopicOrPartition,
    /// The group is rebalancing: the operation is retried after the rebalance.
    RebalanceInProgress,
    /// The member's generation or id is no longer the group's (a commit after its partitions moved).
    StaleMember,
    /// Another instance with the same `group.instance.id` or `transactional.id` took over.
    Fenced,
    /// The record or batch is larger than the broker or topic takes.
    MessageTooLarge,
    /// The producer's local queue is full.
    QueueFull,
    /// The operation or the delivery timed out.
    Timeout,
    /// A setting, argument or request the broker refused as invalid.
    InvalidConfig,
    /// Any other code.
    Other,
}

/// Why a publish failed: what [`Broker::publish`](crate::Broker::publish) can answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// No queue is bound for the record (RabbitMQ's `basic.return` of a mandatory publish).
    #[error(
        "no queue is bound to exchange `{exchange}` with routing key `{routing_key}` ({reason}); declare the \
         queue (a subscriber does at start) or fix the exchange or topic"
    )]
    Unroutable {
        /// The exchange (empty: the default exchange).
        exchange: String,
        /// The routing key (the topic).
        routing_key: String,
        /// The broker's reply text.
        reason: String,
    },
    /// The broker would refuse this topic name.
    #[error("topic `{topic}`: {reason}")]
    InvalidTopic {
        /// The topic.
        topic: String,
        /// Why, and what to change.
        reason: String,
    },
    /// The record is larger than the broker takes.
    #[error("the record is {size} bytes, more than the {max} the broker takes (payload, key and headers)")]
    TooLarge {
        /// The record's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The partition asked for does not exist.
    #[error("topic `{topic}` has no partition {partition}")]
    UnknownPartition {
        /// The topic.
        topic: String,
        /// The partition asked for.
        partition: i32,
    },
    /// The payload could not be encoded.
    #[error("cannot encode the payload: {source}")]
    Encode {
        /// Why.
        source: BoxError,
    },
    /// The broker refused the record (RabbitMQ's `basic.nack` of a publish, e.g. a full queue that rejects
    /// publishes).
    #[error("the broker refused the record: {reason}")]
    Refused {
        /// Why, as far as the broker says.
        reason: String,
    },
    /// The broker did not acknowledge the record in time.
    #[error("publish timed out after {timeout:?}")]
    Timeout {
        /// The deadline that passed.
        timeout: Duration,
    },
    /// This broker cannot publish that way (a partition on RabbitMQ, an exchange on a log).
    #[error("{what} is not supported by the broker at `{url}`")]
    Unsupported {
        /// What was asked.
        what: &'static str,
        /// The broker's URL.
        url: String,
    },
    /// The broker or the connection to it failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A publish middleware failed (a timeout or rate-limit layer, your own layer's error).
    #[error("publish middleware failed: {source}")]
    Middleware {
        /// The middleware's error.
        source: BoxError,
    },
    /// A publisher declared on a router that no broker includes yet.
    #[error(
        "publisher of `{topic}` belongs to a router that is not included in a broker yet: call \
         `broker.include_router(router)` before publishing"
    )]
    NotIncluded {
        /// The publisher's topic.
        topic: String,
    },
    /// No reply came for a request in time.
    #[error("no reply to the request on `{topic}` within {timeout:?} (is a subscriber consuming `{topic}` running?)")]
    NoReply {
        /// The topic the request went to.
        topic: String,
        /// The deadline that passed.
        timeout: Duration,
    },
}

impl PublishError {
    /// Keeps a publish error a middleware passed on as it was; anything else is the middleware's.
    pub(crate) fn from_box(err: BoxError) -> Self {
        match err.downcast::<PublishError>() {
            Ok(e) => *e,
            Err(source) => PublishError::Middleware { source },
        }
    }
}

/// Why an administrative call failed (creating topics or queues, reading offsets or queue depths).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// This broker has no such operation (RabbitMQ has no committed offsets; a log has no queue depth).
    #[error("`{op}` is not supported by the broker at `{url}`")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// The broker's URL.
        url: String,
    },
    /// The topic (or queue) does not exist.
    #[error("unknown topic `{topic}`")]
    UnknownTopic {
        /// The topic.
        topic: String,
    },
    /// The broker or the connection to it failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// Why an [`App`](crate::App) could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A subscriber or broker setting is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker could not be reached or refused an operation.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// Declaring what a subscriber needs (a retry topic) failed.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// A subscribed topic does not exist on the broker (Kafka creates no topic for a consumer).
    #[error(
        "subscriber `{subscriber}`: topic `{topic}` does not exist on the broker at {url}; create it first \
         (`broker.create_topic(\"{topic}\", partitions).await`) or let the subscriber create it with \
         `.create_topic(partitions)`"
    )]
    MissingTopic {
        /// The subscriber.
        subscriber: String,
        /// The topic.
        topic: String,
        /// The broker's URL (credentials hidden).
        url: String,
    },
    /// The service's HTTP server could not listen where it was told ([`App::http`](crate::App::http)).
    #[error(
        "the HTTP server cannot listen on {addr}: {source} (is another process using the port? choose another with --http HOST:PORT)"
    )]
    Http {
        /// The address asked for.
        addr: String,
        /// What the system said.
        source: std::io::Error,
    },
    /// A shutdown signal (SIGINT, SIGTERM) arrived while [`App::run`](crate::App::run) was starting.
    #[error("interrupted by a shutdown signal during start")]
    Interrupted,
    /// A lifecycle hook (`on_startup`, `after_startup`) failed.
    #[error("the {stage} hook failed: {source}")]
    Hook {
        /// Which hook.
        stage: &'static str,
        /// Its error.
        source: BoxError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapper(Error);
    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapped")
        }
    }
    impl StdError for Wrapper {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn interrupts_are_found_through_user_error_wrappers() {
        let e = Error::handler(Wrapper(RejectMessage.into()));
        assert_eq!(e.interrupt(), Some(Settle::Reject));
        let e = Error::handler(NackMessage::default());
        assert_eq!(e.interrupt(), Some(Settle::NACK));
        let e = Error::handler(std::io::Error::other("boom"));
        assert_eq!(e.interrupt(), None);
        assert_eq!(e.label(), "handler");
    }
}
