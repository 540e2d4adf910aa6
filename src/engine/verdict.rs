//! The verdict: what a handler call's outcome means under the policy and the retry budget.

use super::*;
use crate::config::OnDecodeError;
use crate::error::{Error, FailureKind};
use crate::hooks::Outcome;

/// What a handler call's outcome means: how it is recorded and how the policy settles its messages.
pub(super) struct Verdict {
    pub(super) outcome: Outcome,
    /// The failure kind, for the counters.
    pub(super) label: Option<FailureKind>,
    pub(super) settle: Option<(Settle, SettledBy)>,
    pub(super) reason: Option<String>,
}

impl Verdict {
    /// Reads the outcome (logging a failure) and applies the policy and the retry budget to it.
    pub(super) fn of(rt: &SubscriberRuntime, messages: &[Message], result: &Result<(), Error>) -> Self {
        let cfg = &rt.cfg;
        let outcome = match result {
            Ok(()) => Outcome::Ok,
            Err(e) => match (e.interrupt(), e.failure()) {
                (Some(s), _) => Outcome::Interrupted(s),
                (None, kind) => Outcome::Failed {
                    kind: kind.unwrap_or(FailureKind::Handler),
                    message: e.to_string(),
                },
            },
        };
        let label = match &outcome {
            Outcome::Failed { kind, .. } => Some(*kind),
            _ => None,
        };
        if let (Err(e), Some(_), Some(first)) = (result, label, messages.first()) {
            // Guarantee 2.7: a message that fails again and again is logged in full on its first
            // failure, then at its 2nd, 4th, 8th... attempt; the others at DEBUG.
            let attempt = first.attempt();
            if attempt <= 1 {
                tracing::error!(
                    subscriber = %cfg.name, topic = %first.topic(), partition = first.partition(), offset = first.offset(),
                    attempt, batch = messages.len(), kind = e.label(), error = %e, "handler failed"
                );
            } else if attempt.is_power_of_two() {
                tracing::error!(
                    subscriber = %cfg.name, topic = %first.topic(), partition = first.partition(), offset = first.offset(),
                    attempt, batch = messages.len(), kind = e.label(), error = %e,
                    "handler failed again (logged at attempts 1, 2, 4, 8...)"
                );
            } else {
                tracing::debug!(
                    subscriber = %cfg.name, topic = %first.topic(), partition = first.partition(), offset = first.offset(),
                    attempt, batch = messages.len(), kind = e.label(), error = %e, "handler failed again"
                );
            }
        }
        let (settle, reason) = match &outcome {
            Outcome::Interrupted(s) => (
                Some((*s, SettledBy::Interrupt)),
                (*s == Settle::Reject).then(|| match result.as_ref().err().and_then(Error::reason) {
                    Some(reason) => reason.to_owned(),
                    None => "rejected with RejectMessage".to_owned(),
                }),
            ),
            Outcome::Ok => (cfg.policy.after_handler(true).map(|s| (s, SettledBy::Policy)), None),
            // Guarantee 2.4: decoding is deterministic, so a message that cannot decode is not delivered
            // again (under every policy, `Manual` included: user code never saw it) unless the
            // subscriber asks for decode errors to be handler errors, or its retry policy retries them.
            Outcome::Failed {
                kind: FailureKind::Decode,
                message,
            } if cfg.decode_errors == OnDecodeError::Reject
                && cfg.policy != AckPolicy::AckFirst
                && messages.len() == 1
                && !cfg.retry.is_some_and(|r| r.retries(FailureKind::Decode)) =>
            {
                if let Some(m) = messages.first() {
                    tracing::error!(
                        subscriber = %cfg.name, topic = %m.topic(), partition = m.partition(), offset = m.offset(),
                        dead_letter = cfg.dead_letter.as_deref().unwrap_or("-"),
                        "a message that cannot decode is rejected (dead-lettered where a dead-letter topic is set), \
                         not delivered again"
                    );
                }
                (
                    Some((Settle::Reject, SettledBy::Policy)),
                    Some(format!("decode error: {message}")),
                )
            }
            Outcome::Failed { kind, message } => {
                let settle = match &cfg.retry {
                    // SPEC 3.12: with a retry budget, a failure is retried after a backoff until the budget
                    // is spent or the failure cannot succeed; then the message is rejected.
                    Some(retry) => {
                        let attempt = messages.iter().map(Message::attempt).max().unwrap_or(1);
                        Some(if retry.retries(*kind) && attempt < retry.max_attempts {
                            Settle::Nack {
                                delay: Some(retry.delay(attempt)),
                            }
                        } else {
                            Settle::Reject
                        })
                    }
                    None => cfg.policy.after_handler(false),
                };
                (
                    settle.map(|s| (s, SettledBy::Policy)),
                    Some(format!("{kind} error: {message}")),
                )
            }
        };
        Verdict {
            outcome,
            label,
            settle,
            reason,
        }
    }
}
