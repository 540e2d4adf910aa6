//! Settling: the one final decision about a message, and the policies that make it.

use std::fmt;
use std::time::Duration;

/// The final decision about one message ([guarantees](crate::guarantees) §1).
///
/// ```
/// use ferrostream::Settle;
/// use std::time::Duration;
/// let retry_later = Settle::Nack { delay: Some(Duration::from_secs(1)) };
/// assert!(!retry_later.completes());
/// assert!(Settle::Reject.completes());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Settle {
    /// Done: the message counts as processed.
    Ack,
    /// Not done: deliver it again, no earlier than `delay` when one is given.
    Nack {
        /// Minimum time before redelivery.
        delay: Option<Duration>,
    },
    /// Give up on it: never deliver it again (dead-letter it when a target is configured).
    Reject,
}

impl Settle {
    /// A nack without delay.
    pub const NACK: Settle = Settle::Nack { delay: None };

    /// True when this settle lets the committed offset move past the message (ack or reject).
    pub fn completes(self) -> bool {
        !matches!(self, Settle::Nack { .. })
    }

    /// A short lowercase name: `ack`, `nack` or `reject`.
    pub fn name(self) -> &'static str {
        match self {
            Settle::Ack => "ack",
            Settle::Nack { .. } => "nack",
            Settle::Reject => "reject",
        }
    }
}

impl fmt::Display for Settle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Settle::Nack { delay: Some(d) } => write!(f, "nack (after {d:?})"),
            other => f.write_str(other.name()),
        }
    }
}

/// What a settle call did (the first settle wins). Ignoring it is fine: `msg.ack().await;` acks, and
/// reports through this only whether the message was settled already.
///
/// ```
/// use ferrostream::{Settle, SettleOutcome};
/// let o = SettleOutcome::AlreadySettled(Settle::Ack);
/// assert!(!o.took_effect());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleOutcome {
    /// This call settled the message.
    Settled(Settle),
    /// The message had already been settled (by the user, an interrupt or the policy); nothing changed.
    AlreadySettled(Settle),
}

impl SettleOutcome {
    /// True when this call was the one that settled the message.
    pub fn took_effect(self) -> bool {
        matches!(self, SettleOutcome::Settled(_))
    }
}

/// When and how a subscriber settles its messages ([guarantees](crate::guarantees) §1, as FastStream's `AckPolicy`).
///
/// | policy | settled | success | error / panic / decode error |
/// |---|---|---|---|
/// | `AckFirst` | on receipt, before the handler | - | - |
/// | `Ack` | after the handler | ack | ack |
/// | `RejectOnError` | after the handler | ack | reject |
/// | `NackOnError` | after the handler | ack | nack |
/// | `Manual` | by user code only | - | - |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckPolicy {
    /// At most once: committed before the handler runs.
    AckFirst,
    /// Acked after the handler returns, whatever the outcome.
    Ack,
    /// Acked on success, rejected on error.
    RejectOnError,
    /// At least once: acked on success, nacked (redelivered) on error.
    NackOnError,
    /// Only user code settles.
    Manual,
}

impl AckPolicy {
    /// The settle the framework applies after the handler returns, if the message is still unsettled.
    pub(crate) fn after_handler(self, succeeded: bool) -> Option<Settle> {
        match (self, succeeded) {
            (AckPolicy::AckFirst | AckPolicy::Manual, _) => None,
            (_, true) => Some(Settle::Ack),
            (AckPolicy::Ack, false) => Some(Settle::Ack),
            (AckPolicy::RejectOnError, false) => Some(Settle::Reject),
            (AckPolicy::NackOnError, false) => Some(Settle::NACK),
        }
    }

    /// True for the policies that need a consumer group's committed offsets to mean anything.
    pub(crate) fn needs_group(self) -> bool {
        !matches!(self, AckPolicy::AckFirst)
    }
}

impl fmt::Display for AckPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}
