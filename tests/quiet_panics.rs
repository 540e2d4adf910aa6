//! Guarantee 2.3 without noise: a handler that panics again and again is logged by the engine (subscriber,
//! coordinates, where it panicked) and does not run the process's panic hook, which would print a
//! backtrace per attempt; panics outside handlers still reach the hook.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ferrostream::observe::Outcome;
use ferrostream::{AckPolicy, FailureKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_panics_skip_the_panic_hook_and_say_where_they_happened() {
    let hooked = Arc::new(AtomicUsize::new(0));
    let h = hooked.clone();
    std::panic::set_hook(Box::new(move |_| {
        h.fetch_add(1, Ordering::SeqCst);
    }));
    let broker = common::broker();
    let topic = common::topic(&broker, "panics", 1).await;
    let observer = broker.observer();
    common::member(&broker, &topic, "sub", &common::unique("g"))
        .ack_policy(AckPolicy::NackOnError)
        .handle(|body: String| async move {
            if body == "order" {
                panic!("this order cannot be processed");
            }
        });
    let app = common::start(&broker).await;
    broker.publish("order", &topic).await.unwrap();
    let handled = observer.wait_handled("sub", 4, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    for (_, _, _, outcome) in &handled {
        match outcome {
            Outcome::Failed {
                kind: FailureKind::Panic,
                message,
            } => assert!(
                message.contains("cannot be processed") && message.contains("tests/quiet_panics.rs:"),
                "{message}"
            ),
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(
        hooked.load(Ordering::SeqCst),
        0,
        "the panic hook ran for a handler panic"
    );
    // A panic outside a handler still reaches the hook.
    let _ = std::thread::spawn(|| panic!("outside a handler")).join();
    assert_eq!(hooked.load(Ordering::SeqCst), 1);
}
