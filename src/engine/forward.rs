//! Forwarding: dead-letter and retry-topic publishes, with the headers that say where a record came from and why.

use std::time::Duration;

use super::*;
use crate::message::{REPLY_TO, Record};
use crate::retry::headers;
use crate::transport::Outgoing;
use intake::header_attempts;

/// Where a record is published before its offset is settled.
#[derive(Debug, Clone, Copy)]
pub(super) enum Forward {
    /// Rejected by `by`: the settle is reported once the dead letter is published.
    DeadLetter {
        by: SettledBy,
    },
    Retry {
        delay: Duration,
    },
}

/// The dead-letter or retry-topic publish of a record ended.
#[derive(Debug)]
pub(super) struct Forwarded {
    pub(super) tp: TopicPartition,
    pub(super) generation: u64,
    pub(super) offset: i64,
    pub(super) record: Box<Record>,
    pub(super) to: Forward,
    pub(super) result: Result<(), String>,
}

impl<T: Transport> Engine<T> {
    /// SPEC 3.3 / 3.12: a record given up on goes to the dead-letter topic, and a record retried
    /// non-blocking goes to the retry topic; either way its offset is settled only once the broker has
    /// acknowledged that publish. Until then its partition dispatches nothing more (blocking), except
    /// for non-blocking retries, whose whole point is that the partition moves on.
    pub(super) fn forward(&mut self, generation: u64, record: Record, reason: Option<String>, to: Forward) {
        let cfg = &self.rt.cfg;
        let topic = match to {
            Forward::DeadLetter { .. } => cfg.dead_letter.clone(),
            Forward::Retry { .. } => cfg.retry_topic.clone(),
        };
        let Some(topic) = topic else { return };
        let base = if cfg.retry_consumer {
            header_attempts(&record)
        } else {
            record.prior_attempts
        };
        let Some(part) = self.parts.get_mut(&record.tp) else {
            return;
        };
        let attempts = base + record.attempts.max(1);
        match to {
            Forward::DeadLetter { .. } => part.dead_lettering.insert(record.offset),
            Forward::Retry { .. } => part.retrying.insert(record.offset),
        };
        let mut out = Outgoing::new(topic, record.payload.clone());
        out.key = record.key.clone();
        out.headers = record.headers.clone();
        if let Forward::DeadLetter { .. } = to {
            // A dead letter answers nobody: whoever reads the dead-letter topic must not reply to the
            // original requester (it gets its timeout). The retry topic keeps it: a retry may still reply.
            if let Some(reply_to) = out.headers.get(REPLY_TO).cloned() {
                out.headers.remove(REPLY_TO);
                out.headers.set(headers::ORIGINAL_REPLY_TO, reply_to);
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let mut set = |name: &str, value: String| out.headers.set(name, value.into_bytes());
        set(
            headers::ERROR,
            reason.unwrap_or_else(|| "rejected by the handler".to_owned()),
        );
        set(headers::ATTEMPTS, attempts.to_string());
        set(headers::SUBSCRIBER, cfg.name.trim_end_matches(".retry").to_owned());
        set(headers::GROUP, cfg.group_id.clone().unwrap_or_default());
        match to {
            Forward::DeadLetter { .. } => set(headers::DEAD_LETTERED_AT, now.to_string()),
            Forward::Retry { delay } => {
                // Rounded up to the millisecond, so the retry never comes before its backoff.
                let due = std::time::SystemTime::now() + delay;
                let due = due
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros().div_ceil(1000));
                set(headers::RETRY_DUE, due.to_string())
            }
        }
        // The original coordinates: kept from the first hop when the record comes from the retry topic.
        let original = [
            (headers::SOURCE_TOPIC, record.tp.topic.to_string()),
            (headers::SOURCE_PARTITION, record.tp.partition.to_string()),
            (headers::SOURCE_OFFSET, record.offset.to_string()),
            (
                headers::SOURCE_TIMESTAMP,
                record.timestamp.map(|t| t.to_string()).unwrap_or_default(),
            ),
            (headers::FIRST_FAILURE, now.to_string()),
        ];
        for (name, value) in original {
            if out.headers.get(name).is_none() && !value.is_empty() {
                out.headers.set(name, value.into_bytes());
            }
        }
        // Publish middleware runs in this send: a panic in it is a failed publish (the record comes
        // back), never a forward that never reports and leaves its partition blocked.
        let send = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.rt.publisher.send(out)));
        let events = self.forwards_tx.clone();
        tokio::spawn(async move {
            let result = match send {
                Ok(send) => match futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(send)).await {
                    Ok(r) => r.map(|_| ()).map_err(|e| e.to_string()),
                    Err(_) => Err("the publish panicked (in a publish middleware?)".to_owned()),
                },
                Err(_) => Err("the publish panicked (in a publish middleware?)".to_owned()),
            };
            let _ = events.send(Forwarded {
                tp: record.tp.clone(),
                generation,
                offset: record.offset,
                record: Box::new(record),
                to,
                result,
            });
        });
    }
}
