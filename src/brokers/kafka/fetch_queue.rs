//! A librdkafka queue that collects the fetched messages of every assigned partition, read in batches.
//!
//! Why: rdkafka's `BaseConsumer::poll` returns one message per call, and each call reads the clock
//! several times, allocates (an `Arc` per message) and takes the queue's lock. At a million messages a
//! second that was about a fifth of the whole process's CPU. librdkafka's `rd_kafka_consume_batch_queue`
//! takes up to a batch of messages in one call, but it must not be used on the consumer queue itself: the
//! rebalance events rdkafka delivers there would be answered by librdkafka's "dummy" unassign instead of
//! our drain (SPEC 3.7). So each partition's fetch queue is forwarded to this queue (before the partition
//! is assigned, so none of its messages go anywhere else), messages are read here in batches, and the
//! consumer queue keeps only events, which `BaseConsumer::poll` serves as before.
//!
//! rdkafka has no safe API for this, hence `unsafe` (the crate's other such module is `commit_queue`): every
//! call is a plain librdkafka call on a live handle, each justified where it is made.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_void};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};

use super::consumer::FetchedMessage;
use crate::message::Headers;

/// The queue, owned: destroyed once, by whoever drops the last [`FetchQueue`] clone or calls
/// [`FetchQueue::close`].
struct Handle(NonNull<rd::rd_kafka_queue_t>);

// SAFETY: librdkafka queues are thread-safe (every operation takes the queue's own lock).
unsafe impl Send for Handle {}

/// The queue the partitions' messages are forwarded to. Clones share it.
#[derive(Clone)]
pub(crate) struct FetchQueue {
    /// `None` once closed: a wake-up from librdkafka's threads after that finds nothing to wake.
    handle: Arc<Mutex<Option<Handle>>>,
}

impl FetchQueue {
    /// A new, empty queue on this consumer's client.
    pub(crate) fn new<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> Option<Self> {
        // SAFETY: the client handle is live (we hold the consumer); the new queue is ours to destroy.
        let ptr = unsafe { rd::rd_kafka_queue_new(consumer.client().native_ptr()) };
        Some(FetchQueue {
            handle: Arc::new(Mutex::new(Some(Handle(NonNull::new(ptr)?)))),
        })
    }

    fn with<T>(&self, f: impl FnOnce(*mut rd::rd_kafka_queue_t) -> T) -> Option<T> {
        let guard = self.handle.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().map(|h| f(h.0.as_ptr()))
    }

    /// Sends the messages of a partition to this queue from now on. Call it before the partition is
    /// assigned: librdkafka keeps a forward the application set when it starts fetching, and clears it
    /// when it stops. Returns false when librdkafka has no such partition (its messages then arrive on
    /// the consumer queue, where `BaseConsumer::poll` still reads them).
    pub(crate) fn route<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, topic: &str, partition: i32) -> bool {
        let Ok(topic) = CString::new(topic) else { return false };
        self.with(|dst| {
            // SAFETY: live client handle, NUL-terminated topic. The partition queue handle we get is a
            // reference we release right after forwarding; the forward itself holds its own reference.
            unsafe {
                let src = rd::rd_kafka_queue_get_partition(consumer.client().native_ptr(), topic.as_ptr(), partition);
                if src.is_null() {
                    return false;
                }
                rd::rd_kafka_queue_forward(src, dst);
                rd::rd_kafka_queue_destroy(src);
            }
            true
        })
        .unwrap_or(false)
    }

    /// Makes a [`consume`](Self::consume) that is waiting (or the next one) return at once: events wait on
    /// the consumer queue.
    pub(crate) fn wake(&self) {
        // SAFETY: the handle is live while we hold the lock (close takes it out under the same lock).
        self.with(|q| unsafe { rd::rd_kafka_queue_yield(q) });
    }

    /// Waits up to `wait` for a first message, then takes what else is there, up to `max` in all.
    pub(crate) fn consume(&self, wait: Duration, max: usize, into: &mut Fetched) {
        let ptr = {
            let guard = self.handle.lock().unwrap_or_else(|p| p.into_inner());
            match guard.as_ref() {
                Some(h) => h.0.as_ptr(),
                None => return,
            }
        };
        // The lock is not held while waiting: `wake` must get through. Only the poll thread consumes and
        // closes, so the queue stays alive during this call.
        let wait_ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        into.messages.reserve(max);
        let take = |timeout_ms: i32, n: usize, into: &mut Fetched| {
            let start = into.messages.len();
            // SAFETY: the queue is live (see above); librdkafka writes at most `n` message pointers into
            // the spare capacity reserved above, and returns how many (or -1, with nothing written).
            let got =
                unsafe { rd::rd_kafka_consume_batch_queue(ptr, timeout_ms, into.messages.as_mut_ptr().add(start), n) };
            let got = usize::try_from(got).unwrap_or(0).min(n);
            // SAFETY: those `got` slots were just initialised with owned message pointers.
            unsafe { into.messages.set_len(start + got) };
            got
        };
        // One message with a wait, then the rest without: a single call with a wait would wait for a
        // full batch.
        if take(0, max, into) == 0 && take(wait_ms, 1, into) == 1 && max > 1 {
            take(0, max - 1, into);
        }
    }

    /// Destroys the queue (the partitions still forwarding to it keep it alive until they stop, and
    /// their messages are dropped). Call it before the consumer is destroyed.
    pub(crate) fn close(&self) {
        let taken = self.handle.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = taken {
            // SAFETY: taken out under the lock, so no other call uses it any more.
            unsafe { rd::rd_kafka_queue_destroy(h.0.as_ptr()) };
        }
    }
}

/// Messages taken from a [`FetchQueue`], owned until [`clear`](Self::clear) or drop.
#[derive(Default)]
pub(crate) struct Fetched {
    messages: Vec<*mut rd::rd_kafka_message_t>,
}

// SAFETY: owned librdkafka messages may be read and destroyed from any thread.
unsafe impl Send for Fetched {}

impl Fetched {
    /// The messages, in the order librdkafka returned them.
    pub(crate) fn iter(&self) -> impl Iterator<Item = RawMessage<'_>> + Clone {
        // SAFETY: every pointer is a live message owned by `self` (destroyed only in `clear`).
        self.messages.iter().map(|&m| RawMessage(unsafe { &*m }))
    }

    pub(crate) fn clear(&mut self) {
        for m in self.messages.drain(..) {
            // SAFETY: owned, destroyed once (drained out of the vector).
            unsafe { rd::rd_kafka_message_destroy(m) };
        }
    }
}

impl Drop for Fetched {
    fn drop(&mut self) {
        self.clear();
    }
}

/// A view of one fetched message.
pub(crate) struct RawMessage<'a>(&'a rd::rd_kafka_message_t);

impl FetchedMessage for RawMessage<'_> {
    /// The fetch error this message reports instead of data, if it is one.
    fn error(&self) -> Option<String> {
        if self.0.err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return None;
        }
        // SAFETY: librdkafka returns a static NUL-terminated string for every error code.
        let text = unsafe { CStr::from_ptr(rd::rd_kafka_err2str(self.0.err)) };
        Some(text.to_string_lossy().into_owned())
    }

    fn topic(&self) -> String {
        if self.0.rkt.is_null() {
            return String::new();
        }
        // SAFETY: the message holds a reference to its topic handle; the name is NUL-terminated.
        unsafe { CStr::from_ptr(rd::rd_kafka_topic_name(self.0.rkt)) }
            .to_string_lossy()
            .into_owned()
    }

    fn partition(&self) -> i32 {
        self.0.partition
    }

    fn offset(&self) -> i64 {
        self.0.offset
    }

    fn key(&self) -> Option<&[u8]> {
        // SAFETY: librdkafka's key pointer and length describe a buffer the message owns.
        bytes_at(self.0.key, self.0.key_len).map(|p| unsafe { std::slice::from_raw_parts(p, self.0.key_len) })
    }

    fn payload(&self) -> &[u8] {
        // SAFETY: as for the key.
        bytes_at(self.0.payload, self.0.len).map_or(&[], |p| unsafe { std::slice::from_raw_parts(p, self.0.len) })
    }

    /// Milliseconds since the Unix epoch, when the message has a timestamp.
    fn timestamp(&self) -> Option<i64> {
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: a live message; `kind` is a valid out-pointer.
        let ts = unsafe { rd::rd_kafka_message_timestamp(self.0, &mut kind) };
        (kind != rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE && ts >= 0).then_some(ts)
    }

    fn headers(&self) -> Headers {
        let mut headers = Headers::new();
        let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
        // SAFETY: a live message; the header list it returns is owned by the message.
        if unsafe { rd::rd_kafka_message_headers(self.0, &mut hdrs) }
            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            return headers;
        }
        for idx in 0.. {
            let (mut name, mut value, mut size): (*const c_char, *const c_void, usize) =
                (std::ptr::null(), std::ptr::null(), 0);
            // SAFETY: valid out-pointers; the strings and values stay owned by the message.
            let err = unsafe { rd::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size) };
            if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                break;
            }
            // SAFETY: header names are NUL-terminated; a value is `size` bytes (or null for no value).
            let name = unsafe { CStr::from_ptr(name) }.to_string_lossy();
            let value = bytes_at(value, size).map_or(&[][..], |p| unsafe { std::slice::from_raw_parts(p, size) });
            headers.insert(name.into_owned(), Bytes::copy_from_slice(value));
        }
        headers
    }
}

fn bytes_at(ptr: *const c_void, len: usize) -> Option<*const u8> {
    (!ptr.is_null() && len > 0).then_some(ptr.cast())
}
