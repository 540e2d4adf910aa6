//! The framework's own cost per message on the in-memory broker (issue 5): dispatch, decode, settle and
//! offset bookkeeping, with no network and no client library underneath.
//!
//! ```text
//! cargo bench --bench framework
//! ```
//!
//! Each iteration consumes a backlog of `MESSAGES` 100-byte messages, from the start of a fresh group to the
//! last message handled and the subscriber stopped with its final commit. Everything runs on one
//! current-thread runtime on the benchmark's thread, so wall time is CPU time and divan's allocation
//! profiler sees every allocation. Divide by `MESSAGES` (divan's `item/s` column already does) for the
//! per-message figures.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use divan::counter::ItemsCount;
use divan::{AllocProfiler, Bencher};
use ferrostream::middleware::{self, Next, Request};
use ferrostream::{AckPolicy, App, Batch, Broker, OffsetReset};

#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

/// Messages per iteration: enough that starting and stopping the subscriber is noise.
const MESSAGES: usize = 100_000;

fn main() {
    divan::main();
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    AtLeastOnce,
    AckFirst,
    Batch,
    /// At least once through one pass-through `from_fn` middleware: what a middleware layer costs.
    Middleware,
}

/// A broker holding the backlog, and a runtime to consume it with.
fn backlog(partitions: i32) -> (tokio::runtime::Runtime, Broker) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let broker = Broker::new("memory://").expect("broker");
    rt.block_on(async {
        broker.create_topic("bench", partitions).await.expect("topic");
        let payload = Bytes::from_static(&[b'x'; 100]);
        for i in 0..MESSAGES {
            broker
                .publish(payload.clone(), "bench")
                .key(format!("k{}", i % 64))
                .await
                .expect("publish");
        }
    });
    (rt, broker)
}

/// Consumes the whole backlog once with a trivial `String` handler.
fn consume(rt: &tokio::runtime::Runtime, broker: &Broker, mode: Mode) {
    let seen = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let sub = broker
        .subscriber("bench")
        .group_id("bench")
        .auto_offset_reset(OffsetReset::Earliest);
    let (s, d) = (seen.clone(), done.clone());
    let tick = move |k: usize| {
        if s.fetch_add(k, Ordering::Relaxed) + k >= MESSAGES {
            d.notify_one();
        }
    };
    match mode {
        Mode::AtLeastOnce => sub.ack_policy(AckPolicy::NackOnError).handle(move |body: String| {
            let tick = tick.clone();
            async move { tick(body.len().min(1)) }
        }),
        Mode::AckFirst => sub.ack_policy(AckPolicy::AckFirst).handle(move |body: String| {
            let tick = tick.clone();
            async move { tick(body.len().min(1)) }
        }),
        Mode::Middleware => sub
            .ack_policy(AckPolicy::NackOnError)
            .layer(middleware::from_fn(|req: Request, next: Next| next.run(req)))
            .handle(move |body: String| {
                let tick = tick.clone();
                async move { tick(body.len().min(1)) }
            }),
        Mode::Batch => sub
            .ack_policy(AckPolicy::NackOnError)
            .batch(1000, Duration::from_millis(10))
            .handle(move |Batch(bodies): Batch<String>| {
                let tick = tick.clone();
                async move { tick(bodies.len()) }
            }),
    }
    rt.block_on(async {
        let app = App::new(broker.clone()).start().await.expect("start");
        done.notified().await;
        app.shutdown().await.expect("shutdown");
    });
    assert_eq!(seen.load(Ordering::Relaxed), MESSAGES);
}

/// Times consuming a fresh backlog of `MESSAGES` (building it is not timed).
fn bench(bencher: Bencher, partitions: i32, mode: Mode) {
    bencher
        .counter(ItemsCount::new(MESSAGES))
        .with_inputs(|| backlog(partitions))
        .bench_local_refs(|(rt, broker)| consume(rt, broker, mode));
}

#[divan::bench(args = [1, 4], sample_count = 10, sample_size = 1)]
fn at_least_once(bencher: Bencher, partitions: i32) {
    bench(bencher, partitions, Mode::AtLeastOnce);
}

#[divan::bench(args = [1, 4], sample_count = 10, sample_size = 1)]
fn ack_first(bencher: Bencher, partitions: i32) {
    bench(bencher, partitions, Mode::AckFirst);
}

#[divan::bench(args = [1, 4], sample_count = 10, sample_size = 1)]
fn batch(bencher: Bencher, partitions: i32) {
    bench(bencher, partitions, Mode::Batch);
}

#[divan::bench(args = [1, 4], sample_count = 10, sample_size = 1)]
fn with_middleware(bencher: Bencher, partitions: i32) {
    bench(bencher, partitions, Mode::Middleware);
}
