//! OpenTelemetry traces (issue 14, feature `otel`): publish -> consume -> handler -> publish -> consume is
//! one trace, each span the child of the one before, with the messaging attributes. Spans go to the SDK's
//! in-memory exporter through a tracing-opentelemetry layer. One test in its own binary: it installs the
//! process-wide tracing subscriber.
#![cfg(feature = "otel")]

mod common;

use opentelemetry::trace::{SpanKind, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

fn find<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    let found: Vec<&SpanData> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(
        found.len(),
        1,
        "one span named `{name}` among {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_from_a_handler_continues_the_trace_of_the_message_it_came_from() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let broker = common::broker();
    let observer = broker.observer();
    let first = common::topic(&broker, "otel-first", 1).await;
    let second = common::topic(&broker, "otel-second", 1).await;
    broker
        .subscriber(&first)
        .name("first")
        .group_id(common::unique("otel"))
        .auto_offset_reset(ferrostream::OffsetReset::Earliest)
        .auto_commit(false)
        .publish_to(&second)
        .handle(|body: String| async move { format!("{body}, again") });
    broker
        .subscriber(&second)
        .name("second")
        .group_id(common::unique("otel"))
        .auto_offset_reset(ferrostream::OffsetReset::Earliest)
        .auto_commit(false)
        .handle(|_: String| async {});
    let app = common::start(&broker).await;
    let root = tracing::info_span!("test-root");
    async {
        broker
            .publish("hello", &first)
            .header(ferrostream::CORRELATION_ID, "c-1")
            .await
    }
    .instrument(root.clone())
    .await
    .unwrap();
    drop(root);
    observer.wait_finished("second", 1, common::WAIT).await.unwrap();
    app.shutdown().await.unwrap();
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let root = find(&spans, "test-root");
    let send_first = find(&spans, &format!("send {first}"));
    let process_first = find(&spans, &format!("process {first}"));
    let send_second = find(&spans, &format!("send {second}"));
    let process_second = find(&spans, &format!("process {second}"));
    let trace = root.span_context.trace_id();
    for (span, parent) in [
        (send_first, root),
        (process_first, send_first),
        (send_second, process_first),
        (process_second, send_second),
    ] {
        assert_eq!(span.span_context.trace_id(), trace, "`{}` is in the trace", span.name);
        assert_eq!(
            span.parent_span_id,
            parent.span_context.span_id(),
            "`{}` is a child of `{}`",
            span.name,
            parent.name
        );
    }
    assert_eq!(send_first.span_kind, SpanKind::Producer);
    assert_eq!(process_first.span_kind, SpanKind::Consumer);
    let system = if common::is_memory() { "memory" } else { "kafka" };
    assert_eq!(attribute(process_first, "messaging.system").as_deref(), Some(system));
    assert_eq!(
        attribute(process_first, "messaging.operation.type").as_deref(),
        Some("process")
    );
    assert_eq!(
        attribute(process_first, "messaging.destination.name"),
        Some(first.clone())
    );
    assert_eq!(
        attribute(process_first, "messaging.destination.partition.id").as_deref(),
        Some("0")
    );
    assert_eq!(attribute(process_first, "messaging.kafka.offset").as_deref(), Some("0"));
    assert_eq!(
        attribute(process_first, "messaging.message.conversation_id").as_deref(),
        Some("c-1")
    );
    assert!(attribute(process_first, "messaging.consumer.group.name").is_some());
    assert_eq!(
        attribute(send_second, "messaging.operation.type").as_deref(),
        Some("send")
    );
    assert_eq!(
        attribute(send_second, "messaging.destination.name"),
        Some(second.clone())
    );
}
