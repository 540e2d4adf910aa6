//! What ferrostream promises, broker by broker. Other pages of these docs cite the rules here by number
//! (for example "guarantee 3.2"). Every rule has a test against a real broker.
//!
//! # 1. Vocabulary
//!
//! A **settle** is the one final decision about a message: **ack** (done), **nack** (not done: deliver it
//! again) or **reject** (give up on it: never deliver it again; dead-letter it when a dead-letter topic
//! is configured). An [`AckPolicy`](crate::AckPolicy), per subscriber, says when the framework settles:
//!
//! | policy | settled | on success | on error, panic or decode error |
//! |---|---|---|---|
//! | `AckFirst` (at most once) | on receipt, before the handler runs | - | - |
//! | `Ack` | after the handler returns | ack | ack |
//! | `RejectOnError` | after the handler returns | ack | reject |
//! | `NackOnError` (at least once) | after the handler returns | ack | nack |
//! | `Manual` | only by user code | - | - |
//!
//! On Kafka, `auto_commit(true)` (the default) is `AckFirst` and `group_id(..)` with `auto_commit(false)`
//! is at least once; setting both spellings inconsistently is refused when the app starts.
//!
//! # 2. Settling, on every broker
//!
//! 1. A handler settles explicitly through its [`Message`](crate::Message): `ack()`, `nack()`,
//!    `reject()`. The first settle wins; later ones are no-ops that report "already settled", and the
//!    policy's settle after the handler does nothing for a settled message.
//! 2. Code at any depth under a handler returns [`AckMessage`](crate::AckMessage),
//!    [`NackMessage`](crate::NackMessage) or [`RejectMessage`](crate::RejectMessage) (with `?`): the
//!    handler stops there and the message is settled that way at once, under every policy.
//! 3. A handler panic is caught, logged with the subscriber and the message's coordinates, and handled as
//!    an error. The consumer keeps running.
//! 4. A payload that does not decode into the handler's argument type is a typed
//!    [`DecodeError`](crate::DecodeError) naming the subscriber, the type and the cause; the consumer keeps
//!    running. Decoding is deterministic, so by default such a message is not delivered again under any
//!    policy: it is rejected (dead-lettered where a dead-letter topic is set) with an ERROR naming its
//!    coordinates, under `Manual` too (user code never saw it). A subscriber may opt into handling it as
//!    any handler error ([`OnDecodeError::AsHandlerError`](crate::OnDecodeError)), and a
//!    [`RetryPolicy`](crate::RetryPolicy) with `retry_decode_errors(true)` retries it; a batch call with
//!    an undecodable message is settled by the policy (the error does not say which message it was).
//! 5. Every error and panic is logged and counted ([`Broker::metrics`](crate::Broker::metrics)).
//! 6. A nack may carry a delay ([`Message::nack_after`](crate::Message::nack_after)): the message comes
//!    back no earlier than that.
//! 7. No configuration makes a failing message loop hot: without a delay of its own, a nacked message
//!    comes back after 10 ms, then 20, 40... doubling up to 30 s; a [`RetryPolicy`](crate::RetryPolicy)
//!    backs off exponentially with jitter up to its cap, and every redelivery waits at least 10 ms. A
//!    message that fails again and again is logged in full at its 1st, 2nd, 4th, 8th... attempt (the others
//!    at DEBUG), and a panicking handler without a backtrace (the process's panic hook is not run for
//!    handler panics; the log line says where it panicked).
//! 8. On Kafka a message's attempt count survives a restart: while a message waits for its next attempt
//!    (a blocking retry, or a nack without a budget), the group's committed offset is that message's, with
//!    its failed attempts so far in the commit's metadata (`ferrostream:attempts=<n>`); the member that
//!    gets the partition next, after a crash, a restart or a rebalance, continues the count, so a retry
//!    budget is spent once, not once per process life (the call whose failure was not committed yet, at
//!    most one commit interval earlier, may run again). A broker that does not keep commit metadata
//!    (Apache Kafka does; nisshi 0.8.1 drops it) restarts the count from 1, and `memory://` keeps counts
//!    within its process.
//!
//! # 3. Logs: Kafka and `memory://`
//!
//! A log settles offsets, not messages. ferrostream hides that without lying about it.
//!
//! 1. **Offsets.** For each assigned partition the committed offset is always one past the highest
//!    offset `h` such that every delivered offset up to `h` is acked or rejected: an ack of a later
//!    offset never commits past an unsettled earlier one (see [`offset`](crate::offset) for the invariant).
//!    An unsettled offset that holds the commit back while later messages are settled is named in a
//!    WARN (and a `Stalled` event) once it has done so for longer than the subscriber's
//!    [`stall_warning`](crate::SubscriberBuilder::stall_warning) (60 s by default).
//! 2. **Nack** of offset `o`: nothing at or after `o` is committed until `o` is acked or rejected; `o` is
//!    delivered again before the later messages of its key, by this consumer, or after a rebalance or a
//!    crash by the next owner from the committed offset.
//! 3. **Reject**: the offset counts as settled. With a dead-letter topic, the message is first published
//!    there with headers naming its source and the error ([`retry::headers`](crate::retry::headers)),
//!    and the offset is committed only once the broker acknowledged that publish.
//! 4. **`AckFirst`** commits a message's offset before its handler runs: a crash may lose the messages
//!    being handled but never hands a message to a handler of the group twice. Commits go ahead of the
//!    handler in runs sized by the handler's own pace: a run is what the handler gets through in half a
//!    commit interval (at least 16 messages, at most 8192 or half of `max_buffered`), so a crash loses
//!    about one commit interval of the handler's work per partition plus what is in flight, whether the
//!    handler takes a microsecond or ten milliseconds. Every assigned partition is handled concurrently.
//! 5. **Commit timing.** Commits are batched (every 100 ms or 2000 settles by default, which bounds what a
//!    crash replays) and always flushed on graceful shutdown and on partition revocation;
//!    `commit_sync_each()` commits each settle before the next message starts. The engine hands its
//!    commit timer a turn by time (every 5 ms of handler calls), not by a count of calls, so a handler
//!    that holds the CPU does not stretch the interval.
//! 6. **Order and concurrency.** One message at a time per partition, in offset order, by default;
//!    with `max_in_flight(n)` messages of one key never run at once and start in offset order.
//! 7. **Rebalance.** Revoked partitions stop dispatching, their handlers in flight finish (up to the drain
//!    timeout), what is settled is committed, then they are released.
//! 8. **Graceful shutdown** (SIGINT, SIGTERM or [`RunningApp::shutdown`](crate::RunningApp::shutdown)):
//!    fetching stops, handlers in flight finish up to a deadline, settles are committed, the group is left.
//! 9. **Crash safety.** After `kill -9` at any moment and a restart, every message acknowledged by the
//!    broker on publish is handled successfully at least once under the at-least-once policies (and
//!    `Manual` with settles), and at most once under `AckFirst`.
//! 10. **Batches** ([`SubscriberBuilder::batch`](crate::SubscriberBuilder::batch)) settle every message of
//!     a call; a batch handler may also settle messages one by one.
//! 11. **Publishing** resolves once the broker acknowledged the record (`acks=all`); a handler's return
//!     value is published to its `publish_to` topics (and publishers), with the incoming correlation id,
//!     and as the reply to a message that carries `reply_to` (an empty reply when the handler returned
//!     nothing), before the incoming message is settled. A failed result publish is the handler's
//!     failure, settled by the policy. A request ([`Broker::request`](crate::Broker::request)) resolves
//!     to the reply that carries its correlation id, or fails with `PublishError::NoReply` at its
//!     deadline; a reply that comes later is dropped.
//!
//!     With filters ([`SubscriberBuilder::when`](crate::SubscriberBuilder::when)), a message that no
//!     filter accepts and no default handler takes is rejected under every policy (dead-lettered where a
//!     dead-letter topic is set).
//! 12. **Retries and dead letters.** Blocking retries redeliver in place (order per key kept);
//!     non-blocking ones go through a per-subscriber retry topic, never the source topic. A retry-topic or
//!     dead-letter publish is acknowledged before the source offset is committed; if it fails, the source
//!     message stays unsettled. A crash at any point loses nothing.
//!
//! # 4. `memory://`
//!
//! A deterministic model of Kafka, not a shortcut around it: topics with partitions and key hashing,
//! consumer groups with committed offsets and range assignment, rebalances when members join or leave,
//! redelivery on nack. It refuses what Kafka refuses (illegal topic names, records over 1,000,000 bytes).
//! The same app runs on it by changing only the broker URL.
//!
//! # 5. RabbitMQ (`amqp://`)
//!
//! Each delivery is settled on its own: ack is `basic.ack`, reject is `basic.reject(requeue=false)`, and
//! a nack puts the message back in its queue after its delay (on a quorum queue `basic.reject
//! (requeue=true)`, which the queue counts; on a classic queue a confirmed re-publish carrying the attempt
//! count, then an ack of the original). So a slow message never holds back the ack of a later one, and a
//! queue keeps no order across redeliveries. Rules 2.1 to 2.7 hold as written; rules 3.3, 3.8, 3.9 and
//! 3.11 hold with "the delivery is acked" for "the offset is committed". `AckFirst` acks on receipt,
//! before the handler runs; RabbitMQ confirms no ack, so a connection lost the instant after an ack was
//! written can have the broker deliver the message again. A lost connection is re-opened with backoff,
//! and what was not acked comes back from the broker.
