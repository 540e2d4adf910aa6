//! Between ferrostream's records and AMQP's deliveries and properties.

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::message::{CORRELATION_ID, Headers, REPLY_TO, Record};
use crate::offset::TopicPartition;
use crate::transport::Outgoing;

/// The header that carries a record's key (AMQP has no keys; it round-trips as a header).
pub(super) const KEY: &str = "key";
/// A classic queue keeps no delivery count: the transport counts attempts in this header when it puts a
/// nacked message back.
pub(super) const ATTEMPTS: &str = "x-ferrostream-delivery-count";
/// A quorum queue's own delivery count.
const DELIVERY_COUNT: &str = "x-delivery-count";

/// The properties of a record to publish: persistent, its headers, correlation id and reply-to.
pub(super) fn properties(out: &Outgoing) -> BasicProperties {
    let mut table = FieldTable::default();
    for (name, value) in out.headers.iter() {
        table.insert(name.into(), AMQPValue::LongString(LongString::from(value.to_vec())));
    }
    if let Some(key) = &out.key {
        table.insert(KEY.into(), AMQPValue::LongString(LongString::from(key.to_vec())));
    }
    let mut props = BasicProperties::default().with_delivery_mode(2).with_headers(table);
    if let Some(id) = out.headers.get_str(CORRELATION_ID) {
        props = props.with_correlation_id(id.into());
    }
    if let Some(to) = out.headers.get_str(REPLY_TO) {
        props = props.with_reply_to(to.into());
    }
    if let Some(ts) = out.timestamp.filter(|t| *t >= 0) {
        props = props.with_timestamp((ts / 1000) as u64);
    }
    props
}

fn value_bytes(v: &AMQPValue) -> Option<Bytes> {
    Some(match v {
        AMQPValue::LongString(s) => Bytes::copy_from_slice(s.as_bytes()),
        AMQPValue::ShortString(s) => Bytes::copy_from_slice(s.as_str().as_bytes()),
        AMQPValue::Boolean(b) => Bytes::from(b.to_string()),
        other => Bytes::from(int_of(other)?.to_string()),
    })
}

fn int_of(v: &AMQPValue) -> Option<i64> {
    Some(match *v {
        AMQPValue::ShortShortInt(n) => n.into(),
        AMQPValue::ShortShortUInt(n) => n.into(),
        AMQPValue::ShortInt(n) => n.into(),
        AMQPValue::ShortUInt(n) => n.into(),
        AMQPValue::LongInt(n) => n.into(),
        AMQPValue::LongUInt(n) => n.into(),
        AMQPValue::LongLongInt(n) => n,
        _ => return None,
    })
}

/// The record of a delivery from `source`: its delivery tag is its sequence; headers, correlation id and
/// reply-to become headers; the deliveries the broker counted before this one become `prior_attempts`.
/// The delivery's own properties come back beside it, for a classic queue's put-back to keep them whole.
pub(super) fn record(source: &TopicPartition, d: Delivery) -> (Record, BasicProperties) {
    let mut headers = Headers::new();
    let mut key = None;
    let mut prior = None;
    let mut counted = None;
    if let Some(table) = d.properties.headers() {
        for (name, value) in table.inner() {
            match name.as_str() {
                DELIVERY_COUNT => prior = int_of(value),
                ATTEMPTS => counted = value_bytes(value).and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok()),
                KEY => key = value_bytes(value),
                n => {
                    if let Some(v) = value_bytes(value) {
                        headers.insert(n, v);
                    }
                }
            }
        }
    }
    if headers.get(CORRELATION_ID).is_none()
        && let Some(id) = d.properties.correlation_id()
    {
        headers.insert(CORRELATION_ID, Bytes::copy_from_slice(id.as_str().as_bytes()));
    }
    if headers.get(REPLY_TO).is_none()
        && let Some(to) = d.properties.reply_to()
    {
        headers.insert(REPLY_TO, Bytes::copy_from_slice(to.as_str().as_bytes()));
    }
    // A quorum queue counts deliveries itself; a classic queue only says "redelivered", and the count
    // of the transport's own put-backs is in a header.
    // (A broker that also counts a classic queue's deliveries counts only this copy's: keep the larger.)
    let prior_attempts = prior
        .max(counted)
        .map(|n| n.clamp(0, i64::from(u32::MAX)) as u32)
        .unwrap_or(u32::from(d.redelivered));
    let record = Record {
        tp: source.clone(),
        offset: d.delivery_tag as i64,
        key,
        timestamp: d
            .properties
            .timestamp()
            .map(|s| (s.min(i64::MAX as u64 / 1000) as i64) * 1000),
        headers,
        payload: Bytes::from(d.data),
        prior_attempts,
        attempts: 0,
    };
    (record, d.properties)
}
