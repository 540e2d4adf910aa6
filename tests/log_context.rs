//! Log context (issue 14): a line logged inside a handler (or its middleware) carries the subscriber,
//! topic, partition, offset, correlation id and attempt as span fields, formatted alike (no quoted
//! strings). One test in its own binary: it installs a process-wide subscriber writing to a buffer.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrostream::middleware::{self, Next, Request};
use ferrostream::{AckPolicy, OffsetReset};

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buffer {
    type Writer = Buffer;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_logged_in_a_handler_names_the_message_it_handles() {
    let logs = Buffer::default();
    tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_env_filter("info")
        .init();
    let broker = common::broker().layer(middleware::from_fn(|req: Request, next: Next| async move {
        tracing::info!("middleware before the handler");
        next.run(req).await
    }));
    let observer = broker.observer();
    let topic = common::topic(&broker, "logctx", 1).await;
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    broker
        .subscriber(&topic)
        .name("ctx")
        .group_id(common::unique("logctx"))
        .auto_offset_reset(OffsetReset::Earliest)
        .ack_policy(AckPolicy::NackOnError)
        .handle(move |body: String| {
            let failed = failed.clone();
            async move {
                tracing::info!(%body, "inside the handler");
                tokio::time::sleep(Duration::from_millis(1)).await; // across an await too
                tracing::info!("still inside");
                if !failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    return Err(ferrostream::Error::handler(std::io::Error::other("once")));
                }
                Ok(())
            }
        });
    let app = common::start(&broker).await;
    broker
        .publish("hello", &topic)
        .header(ferrostream::CORRELATION_ID, "corr-42")
        .await
        .unwrap();
    observer.wait_finished("ctx", 1, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let context = |attempt: u32| {
        format!(
            // (with feature `otel`, the span's OpenTelemetry kind and name follow)
            "handle{{subscriber=ctx topic={topic} partition=0 offset=0 correlation_id=corr-42 attempt={attempt} batch=1"
        )
    };
    for (line, attempt) in [
        ("middleware before the handler", 1),
        ("inside the handler body=hello", 1),
        ("still inside", 1),
        ("inside the handler body=hello", 2),
        ("still inside", 2),
    ] {
        assert!(
            text.lines().any(|l| l.contains(&context(attempt)) && l.contains(line)),
            "no `{line}` line in the context of attempt {attempt} ({}):\n{text}",
            context(attempt)
        );
    }
    // The engine's own lines format their values alike: no quoted topic.
    assert!(!text.contains(&format!("topic=\"{topic}\"")), "{text}");
    assert!(
        text.contains(&format!("partitions={topic}[0]")),
        "partitions shown as topic[p]:\n{text}"
    );
}
